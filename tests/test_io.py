"""fxprune.io: slim models saved as code + JSON + safetensors, reloaded without pickle."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.fx
import torchvision
from safetensors.torch import load_file, save_file

import fxprune
import fxprune.io as fio
from fxprune.errors import CheckpointError, UnsupportedInputError
from fxprune.models import TinyResNet, _Block

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOAD_IN_FRESH_PROCESS = """
import sys, importlib.util, torch
from safetensors.torch import load_file, save_file
import fxprune.io
d = sys.argv[1]
x = load_file(d + "/input.safetensors")["x"]
model = fxprune.io.load(d + "/slim").eval()
spec = importlib.util.spec_from_file_location("saved_module", d + "/slim/module.py")
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
readable = getattr(mod, sys.argv[2])().eval()
with torch.no_grad():
    save_file({"loaded": model(x), "module_py": readable(x)}, d + "/output.safetensors")
"""


@pytest.fixture(scope="module")
def slim_model():
    """A slim model from fxprune: TinyResNet with about half of each group's channels zeroed."""
    torch.manual_seed(0)
    model = TinyResNet(num_classes=10, width=8).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 16, 16)
    prog = fxprune.compile(model, (x,))
    gen = torch.Generator().manual_seed(1)
    masks = {}
    for g in prog.groups:
        if g.prunable:
            keep = torch.rand(g.size, generator=gen) < 0.5
            keep[0] = True
            masks[g.id] = keep
    prog.zero_(masks)
    slim = prog.construct_subnet().eval()
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    return slim


def test_roundtrip_in_fresh_process(slim_model, tmp_path):
    fio.save(slim_model, tmp_path / "slim")
    assert sorted(os.listdir(tmp_path / "slim")) == ["graph.json", "model.safetensors", "module.py"]
    x = torch.randn(4, 3, 16, 16)
    save_file({"x": x}, str(tmp_path / "input.safetensors"))
    with torch.no_grad():
        expected = slim_model(x)
    class_name = json.loads((tmp_path / "slim" / "graph.json").read_text())["class_name"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_PROCESS, str(tmp_path), class_name],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = load_file(str(tmp_path / "output.safetensors"))
    assert torch.equal(out["loaded"], expected)
    assert torch.equal(out["module_py"], expected)


def test_module_py_is_readable_code(slim_model, tmp_path):
    fio.save(slim_model, tmp_path)
    src = (tmp_path / "module.py").read_text()
    compile(src, "module.py", "exec")
    assert "def forward(self, x):" in src
    assert "Conv2d(" in src  # the submodules are described in the class


def test_load_does_not_run_module_py(slim_model, tmp_path):
    fio.save(slim_model, tmp_path)
    (tmp_path / "module.py").write_text("raise SystemExit('module.py was executed')\n")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(fio.load(tmp_path).eval()(x), slim_model(x))


def test_state_and_modes_roundtrip(slim_model, tmp_path):
    fio.save(slim_model, tmp_path)
    loaded = fio.load(tmp_path)
    assert loaded.training is False
    ref = slim_model.state_dict()
    got = loaded.state_dict()
    assert list(got) == list(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    assert [n.op for n in loaded.graph.nodes] == [n.op for n in slim_model.graph.nodes]


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5"])
def test_torchvision_graphs_roundtrip(name, tmp_path):
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(torchvision.models.get_model(name, num_classes=10).eval())
    fio.save(gm, tmp_path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fio.load(tmp_path)(x), gm(x))


class Shared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.register_buffer("scale", torch.tensor([2.0]), persistent=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) * self.scale


def test_tied_weights_and_non_persistent_buffers(tmp_path):
    gm = torch.fx.symbolic_trace(Shared())
    fio.save(gm, tmp_path)
    loaded = fio.load(tmp_path)
    assert loaded.a.weight is loaded.b.weight
    assert "scale" not in loaded.state_dict()
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), gm(x))


class BlockLeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, _Block) or super().is_leaf_module(m, qualname)


def test_user_classes_need_allow(tmp_path):
    model = TinyResNet().eval()
    gm = torch.fx.GraphModule(model, BlockLeafTracer().trace(model))
    fio.save(gm, tmp_path)
    with pytest.raises(CheckpointError, match=r"refusing to rebuild module layer1 of class "
                                              r"fxprune\.models\._Block"):
        fio.load(tmp_path)
    x = torch.randn(2, 3, 16, 16)
    for allow in ([_Block], ["fxprune.models"]):
        assert torch.equal(fio.load(tmp_path, allow=allow)(x), gm(x))


def test_damaged_files(slim_model, tmp_path):
    fio.save(slim_model, tmp_path)
    tensors = tmp_path / "model.safetensors"
    blob = tensors.read_bytes()
    tensors.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        fio.load(tmp_path)
    tensors.write_bytes(blob)
    graph = tmp_path / "graph.json"
    graph.write_text(graph.read_text()[:100])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        fio.load(tmp_path)
    os.remove(graph)
    with pytest.raises(CheckpointError, match="missing"):
        fio.load(tmp_path)


def test_save_refuses_what_it_cannot_describe(tmp_path):
    gm = torch.fx.symbolic_trace(Shared())
    gm.a.register_forward_hook(lambda *a: None)
    with pytest.raises(UnsupportedInputError, match="hooks"):
        fio.save(gm, tmp_path)
    with pytest.raises(UnsupportedInputError, match="GraphModule"):
        fio.save(Shared(), tmp_path)


def _plain_codegen(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A torch.export GraphModule with its pytree in/out handling replaced by plain code (the
    ATen nodes untouched), which the format describes."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        del gm._guards_fn
    gm.graph._codegen = torch.fx.graph.CodeGen()
    gm.recompile()
    return gm


def test_aten_level_slim_graph_roundtrips(tmp_path):
    """The ATen ops the torch.export front end produces (a HuggingFace Llama's slim model:
    embedding, rotary embeddings, masks with aten.__and__, sdpa, linear, to.dtype_layout, ...)
    are all on load's allow-list."""
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from transformers_sweep import llama_config

    from fxprune.testing import random_masks

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config()).eval()
    ids = torch.randint(0, 96, (1, 8))
    prog = fxprune.compile(model, (ids,))
    prog.zero_(random_masks(prog))
    slim = _plain_codegen(prog.construct_subnet())
    aten = {str(n.target) for n in slim.graph.nodes if n.op == "call_function" and "aten" in str(n.target)}
    assert len(aten) > 20 and "aten.__and__.Tensor" in aten
    fio.save(slim, tmp_path)
    loaded = fio.load(tmp_path)
    with torch.no_grad():
        for a, b in zip(loaded(ids), slim(ids)):
            assert torch.equal(a, b)
