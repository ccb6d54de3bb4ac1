"""fxprune.export: slim models written as torch.export programs and ONNX files, checked.

Two slim models (ResNet-18 and a two-layer ViT, both with 30-50% of every prunable exact group
zeroed by ``fxprune.testing.random_masks``) are exported in both formats; each file is
reloaded here independently (``torch.export.load``, onnxruntime) and compared on a fresh input
with the slim model and with the zeroed full model. ``fxprune export`` is run on a model saved
by ``fxprune.io.save``, and bad inputs, exporter failures and mismatching files end in
fxprune's errors.
"""
import copy
import importlib

import onnx
import onnxruntime
import pytest
import torch
import torch.fx
import torchvision

import fxprune
import fxprune.io as fio
from fxprune.cli import main
from fxprune.errors import ExportError, UnsupportedInputError, VerificationError
from fxprune.modules import PrunedMultiheadAttention
from fxprune.testing import random_masks, randomize_norms

export_module = importlib.import_module("fxprune.export")  # `import fxprune.export` gives the function

TOL = 1e-4  # relative to the largest output magnitude, float32


def _slim(model, shape):
    """(zeroed full GraphModule, slim GraphModule, example input)."""
    torch.manual_seed(0)
    model = model.eval()
    randomize_norms(model)
    x = torch.randn(shape)
    prog = fxprune.compile(model, (x,))
    prog.zero_(random_masks(prog))
    slim = prog.construct_subnet().eval()
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in prog.module.parameters())
    return prog.module, slim, x


@pytest.fixture(scope="module")
def resnet():
    return _slim(torchvision.models.resnet18(num_classes=10), (1, 3, 32, 32))


@pytest.fixture(scope="module")
def vit():
    full, slim, x = _slim(torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
        num_classes=10), (2, 3, 32, 32))
    heads = [m.num_heads for m in slim.modules() if isinstance(m, PrunedMultiheadAttention)]
    assert heads and all(h < 4 for h in heads), heads  # attention heads were pruned
    return full, slim, x


def _run_file(path, fmt, x):
    if fmt == "pt2":
        return torch.export.load(path).module()(x)
    onnx.checker.check_model(path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    (out,) = session.run(None, {name: x.numpy()})
    return torch.from_numpy(out)


def _assert_close(actual, expected):
    scale = expected.abs().max().item()
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= TOL * scale


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
@pytest.mark.parametrize("model", ["resnet", "vit"])
def test_exported_file_matches_slim_and_full_model(model, fmt, request, tmp_path):
    full, slim, x = request.getfixturevalue(model)
    path = tmp_path / f"slim.{fmt}"
    result = fxprune.export(slim, (x,), path, fmt)
    assert result.path == str(path) and result.format == fmt and path.is_file()
    assert 0.0 <= result.max_abs_diff <= TOL
    fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    got = _run_file(str(path), fmt, fresh)
    with torch.no_grad():
        _assert_close(got, slim(fresh))
        _assert_close(got, full(fresh))
    assert not slim.training  # eval mode was restored, not changed


def test_cli_save_load_export_roundtrip(resnet, tmp_path, capsys):
    _, slim, _ = resnet
    fio.save(slim, tmp_path / "slim")
    out = tmp_path / "out" / "model.pt2"  # parent folder created on the way
    assert main(["export", "--format", "pt2", str(tmp_path / "slim"), str(out),
                 "--input-shape", "2,3,32,32"]) == 0
    assert str(out) in capsys.readouterr().out
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    got = _run_file(str(out), "pt2", x)
    with torch.no_grad():
        _assert_close(got, fxprune.load(tmp_path / "slim")(x))
        _assert_close(got, slim(x))
    assert got.shape == (2, 10)


def test_cli_errors(resnet, tmp_path, capsys):
    _, slim, _ = resnet
    fio.save(slim, tmp_path / "slim")
    # 4 channels into a 3-channel stem: the node is named, no file is written
    assert main(["export", str(tmp_path / "slim"), str(tmp_path / "m.onnx"),
                 "--input-shape", "1,4,32,32"]) == 1
    err = capsys.readouterr().err
    assert "fxprune export: error:" in err and "node 'conv1'" in err and "3 channels" in err
    assert not (tmp_path / "m.onnx").exists()
    # not a folder written by fxprune.io.save
    assert main(["export", str(tmp_path), str(tmp_path / "m.pt2"), "--format", "pt2",
                 "--input-shape", "1,3,32,32"]) == 1
    assert "graph.json is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tmp_path / "slim"), str(tmp_path / "m.onnx"), "--input-shape", "1,3,x"])
    assert exc.value.code == 2 and "positive integers separated by commas" in capsys.readouterr().err


@pytest.fixture
def tiny():
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                                                     torch.nn.Flatten(), torch.nn.Linear(16, 2)))
    return gm.eval(), torch.randn(1, 3, 4, 4)


def test_bad_inputs_raise_clear_errors(tiny, tmp_path):
    gm, x = tiny
    with pytest.raises(UnsupportedInputError, match=r"node '_0' \(call_module 0\).*3 channels"):
        fxprune.export(gm, torch.randn(1, 5, 4, 4), tmp_path / "m.pt2", "pt2")
    with pytest.raises(UnsupportedInputError, match="format must be one of onnx, pt2"):
        fxprune.export(gm, x, tmp_path / "m.tflite", "tflite")
    assert list(tmp_path.iterdir()) == []


def test_exporter_failure_names_the_node(tmp_path):
    # runs eagerly, but torch.export cannot turn a traced tensor into a numpy array
    g = torch.fx.Graph()
    x = g.placeholder("x")
    arr = g.call_method("numpy", (x,))
    g.output(g.call_function(torch.add, (g.call_function(torch.from_numpy, (arr,)), x)))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    assert torch.equal(gm(torch.ones(3)), torch.full((3,), 2.0))
    with pytest.raises(ExportError, match=r"pt2 export failed at node 'numpy' \(call_method numpy\)"):
        fxprune.export(gm, torch.ones(3), tmp_path / "m.pt2", "pt2")


def test_mismatching_file_raises_verification_error(tiny, tmp_path, monkeypatch):
    gm, x = tiny
    write = export_module._WRITERS["pt2"]

    def write_perturbed(module, inputs, path, kw):  # an exporter that changes a weight
        other = copy.deepcopy(module)
        with torch.no_grad():
            other.get_submodule("3").bias.add_(0.5)
        write(other, inputs, path, kw)

    monkeypatch.setitem(export_module._WRITERS, "pt2", write_perturbed)
    with pytest.raises(VerificationError, match=r"differ from the module's by up to 5\.000e-01"):
        fxprune.export(gm, x, tmp_path / "m.pt2", "pt2")
    assert fxprune.export(gm, x, tmp_path / "m.pt2", "pt2", atol=0.6).max_abs_diff == pytest.approx(0.5)


def test_float_inputs_are_redrawn_for_verification():
    ids, x = torch.tensor([[1, 2]]), torch.zeros(1, 3)
    first, second = export_module._verification_inputs((ids, x))
    assert first[0] is ids and first[1] is x
    assert torch.equal(second[0], ids) and second[1].shape == x.shape and second[1].abs().sum() > 0
    assert export_module._verification_inputs((ids,)) == [(ids,)]


# ----------------------------------------------------------------------------------------------
# dynamic shapes
# ----------------------------------------------------------------------------------------------


def test_readme_command_writes_onnx_that_takes_any_batch(tmp_path):
    """The README's command on the digits demo's slim ResNet-18 (``fxprune train``'s default
    model, 32x32 inputs), exported from a batch-1 shape: onnxruntime runs the file at batch 4."""
    from fxprune import models

    torch.manual_seed(0)
    model = models.build("resnet18", 10, 3, 32).eval()
    randomize_norms(model)
    prog = fxprune.compile(model, torch.randn(1, 3, 32, 32))
    prog.zero_(random_masks(prog))
    slim = prog.construct_subnet().eval()
    fio.save(slim, tmp_path / "slim")
    out = tmp_path / "slim.onnx"
    assert main(["export", "--format", "onnx", str(tmp_path / "slim"), str(out), "--input-shape", "1,3,32,32"]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]  # a symbolic batch dimension
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    (y,) = session.run(None, {inp.name: x.numpy()})
    with torch.no_grad():
        _assert_close(torch.from_numpy(y), slim(x))
    assert y.shape == (4, 10)


def test_static_keeps_the_example_shapes(resnet, tmp_path):
    _, slim, x = resnet
    fio.save(slim, tmp_path / "slim")
    out = tmp_path / "static.onnx"
    assert main(["export", "--static", str(tmp_path / "slim"), str(out), "--input-shape", "1,3,32,32"]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.shape == [1, 3, 32, 32]
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(None, {inp.name: torch.randn(4, 3, 32, 32).numpy()})
    ep = torch.export.load(str(fxprune.export(slim, x, tmp_path / "static.pt2", "pt2", dynamic=False).path))
    with pytest.raises(Exception):
        ep.module()(torch.randn(4, 3, 32, 32))


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_pt2_and_onnx_take_other_batch_sizes(vit, fmt, tmp_path):
    _, slim, x = vit  # batch 2, a ViT with pruned heads
    path = tmp_path / f"vit.{fmt}"
    fxprune.export(slim, (x,), path, fmt)
    for batch in (1, 5):
        fresh = torch.randn(batch, *x.shape[1:], generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            _assert_close(_run_file(str(path), fmt, fresh), slim(fresh))


class _Tokens(torch.nn.Module):
    """Token ids and an attention mask in, per-token logits out."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.proj = torch.nn.Linear(16, 8)

    def forward(self, ids, mask):
        h = torch.relu(self.proj(self.embed(ids)))
        return h * mask.unsqueeze(-1).to(h.dtype)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_token_inputs_take_other_batch_sizes_and_lengths(fmt, tmp_path):
    torch.manual_seed(0)
    model = _Tokens().eval()
    ids = torch.randint(0, 50, (1, 6))
    mask = torch.ones(1, 6, dtype=torch.long)
    assert export_module.dynamic_dims((ids, mask)) == [{0: "batch", 1: "seq"}] * 2
    path = tmp_path / f"tokens.{fmt}"
    fxprune.export(model, (ids, mask), path, fmt)
    for batch, length in ((3, 9), (2, 1)):
        ids2 = torch.randint(0, 50, (batch, length))
        mask2 = torch.ones(batch, length, dtype=torch.long)
        if fmt == "pt2":
            got = torch.export.load(str(path)).module()(ids2, mask2)
        else:
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            names = [i.name for i in session.get_inputs()]
            got = torch.from_numpy(session.run(None, dict(zip(names, (ids2.numpy(), mask2.numpy()))))[0])
        with torch.no_grad():
            _assert_close(got, model(ids2, mask2))


class _FixedBatch(torch.nn.Module):
    """A conv net that flattens with the batch size written as a constant."""

    def __init__(self, flatten: str):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8 * 4 * 4, 5)
        self.flatten = flatten

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = y.view(1, -1) if self.flatten == "constant" else y.view(y.size(0), -1)
        return self.fc(y)


@pytest.mark.parametrize("frontend,flatten", [("fx", "constant"), ("export", "size")])
def test_a_graph_that_fixes_the_batch_size_is_refused_naming_the_node(frontend, flatten, tmp_path):
    """A slim model whose graph holds ``view(1, ...)`` (written so, or captured by torch.export at
    batch 1) cannot take another batch: the error names the view and points to fixed shapes."""
    torch.manual_seed(0)
    model = _FixedBatch(flatten).eval()
    randomize_norms(model)
    x = torch.randn(1, 3, 6, 6)
    prog = fxprune.compile(model, x, frontend=frontend)
    prog.zero_(random_masks(prog))
    slim = prog.construct_subnet().eval()
    views = [n.name for n in slim.graph.nodes if "view" in str(n.target)]
    assert views
    for fmt in FORMATS:
        path = tmp_path / f"m.{fmt}"
        with pytest.raises(ExportError, match=rf"node '{views[0]}' .*dynamic=False.*--static"):
            fxprune.export(slim, x, path, fmt)
        assert not path.exists()
        assert fxprune.export(slim, x, path, fmt, dynamic=False).max_abs_diff <= TOL * 10


FORMATS = ("pt2", "onnx")


def test_other_sizes_and_resized_inputs():
    x, ids = torch.randn(2, 3), torch.tensor([[4, 9, 7]])
    dims = export_module.dynamic_dims((x, ids[:, :2].expand(2, 2).contiguous(), torch.ones(3)))
    assert dims == [{0: "batch"}, {0: "batch", 1: "seq"}, {}]
    other = export_module.resized_inputs((x, ids.expand(2, 3)), dims[:2], {"batch": 5, "seq": 4})
    assert other[0].shape == (5, 3) and other[1].shape == (5, 4)
    assert int(other[1].min()) >= 4 and int(other[1].max()) <= 9  # token ids stay in the example's range
