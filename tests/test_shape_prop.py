"""Shape propagation without computing on the inputs' data (passes/shape_prop.py).

Every node's ``tensor_meta`` and ``type`` must be what torch.fx's ``ShapeProp`` records in an
eager, no-grad, eval-mode run: shapes, dtypes, ``requires_grad``, tuple structure, Python types,
and (for the ops the rules of passes/shape_rules.py cover, which are all the ops of these
models) strides and memory formats. The eager run (``RecordShapes``) is the reference.
Value-dependent ops (``nonzero``, boolean masks, ``unique``, ``.item()``) run on real values
computed for just the nodes they depend on; a convolution never runs.
"""
import operator
import sys
from pathlib import Path

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import fxprune
from fxprune.passes import ShapePropPass, trace
from fxprune.passes.modes import eval_mode
from fxprune.passes.shape_prop import MetaShapes, RecordShapes


def _meta_of(gm):
    return {n.name: (n.meta.get("tensor_meta"), n.meta.get("type")) for n in gm.graph.nodes}


def _fields(tm):
    """Every field of a TensorMetadata (or a nest of them) as comparable values."""
    if hasattr(tm, "shape"):
        return (tuple(tm.shape), tm.dtype, tm.requires_grad, tuple(tm.stride), tm.memory_format, tm.is_quantized)
    if isinstance(tm, (list, tuple)):
        return type(tm)(_fields(t) for t in tm)
    if isinstance(tm, dict):
        return {k: _fields(v) for k, v in tm.items()}
    return tm


def assert_same_metadata(gm, inputs):
    """MetaShapes records on every node what the eager run records; returns the MetaShapes."""
    with torch.no_grad(), eval_mode(gm):
        RecordShapes(gm).run(*inputs)
        reference = _meta_of(gm)
        for n in gm.graph.nodes:
            n.meta.pop("tensor_meta", None)
            n.meta.pop("type", None)
        shapes = MetaShapes(gm, inputs)
        shapes.run()
    got = _meta_of(gm)
    for n in gm.graph.nodes:
        (ref_tm, ref_type), (tm, typ) = reference[n.name], got[n.name]
        assert _fields(tm) == _fields(ref_tm), f"{n.name} ({n.op} {n.target}): {tm} != {ref_tm}"
        assert typ is ref_type, f"{n.name}: type {typ} != {ref_type}"
    return shapes


# ----------------------------------------------------------------------------------------------
# models without value-dependent ops: nothing runs on real tensors
# ----------------------------------------------------------------------------------------------


class Layouts(nn.Module):
    """Channels-last and permuted layouts, depthwise convs, layer norm over a permuted map
    (ConvNeXt's LayerNorm2d), pooling with ceil_mode, broadcasting with scalars, in-place ops."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.norm = nn.LayerNorm(8)
        self.bn = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        y = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.dw(y) * 0.5 + 1
        y = F.relu(self.bn(y), inplace=True)
        y += self.gn(x)
        y = self.pool(torch.cat([y, y.sigmoid()], 1))[:, :8]
        z = F.adaptive_avg_pool2d(y, 1).flatten(1)
        return self.head(z) - z.mean(-1, keepdim=True), (y > 0).sum()


class Attention(nn.Module):
    """Self-attention through ``nn.MultiheadAttention`` (the fused inference path, with and
    without weights) and through ``F.scaled_dot_product_attention`` on heads viewed from a
    projection and transposed."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.mha_tf = nn.MultiheadAttention(16, 2)
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        a, _ = self.mha(x, x, x, need_weights=False)
        b, w = self.mha(x, x, x)
        c, _ = self.mha_tf(x, x, x)
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 4, 4).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        return a + b + c + o, w


@pytest.mark.parametrize("name", ["layouts", "attention", "resnet18", "mobilenet_v3_small", "vit"])
def test_metadata_equals_the_eager_run(name):
    torch.manual_seed(0)
    if name == "layouts":
        model, x = Layouts(), torch.randn(2, 3, 12, 12)
    elif name == "attention":
        model, x = Attention(), torch.randn(2, 5, 16)
    elif name == "vit":
        model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                     hidden_dim=32, mlp_dim=64, num_classes=10)
        x = torch.randn(2, 3, 32, 32)
    else:
        model, x = torchvision.models.get_model(name, num_classes=10), torch.randn(1, 3, 32, 32)
    gm = trace(model.eval())
    shapes = assert_same_metadata(gm, (x,))
    assert shapes.real_nodes == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_metadata_of_an_export_graph_equals_the_eager_run(dtype):
    torch.manual_seed(0)
    model = Layouts().to(dtype).eval()
    gm = fxprune.passes.export(model, (torch.randn(1, 3, 9, 9, dtype=dtype),))
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)
    assert assert_same_metadata(gm, (torch.randn(1, 3, 9, 9, dtype=dtype),)).real_nodes == []


def test_no_convolution_runs(monkeypatch):
    """The pass never calls a layer's forward or a convolution kernel on real data."""
    model = torchvision.models.resnet18(num_classes=10).eval()
    gm = trace(model)

    def refuse(*args, **kwargs):
        raise AssertionError("a convolution ran on real tensors")

    monkeypatch.setattr(nn.Conv2d, "forward", refuse)
    monkeypatch.setattr(nn.BatchNorm2d, "forward", refuse)
    ShapePropPass((torch.randn(1, 3, 64, 64),))(gm)
    assert tuple(gm.graph.find_nodes(op="output")[0].meta["tensor_meta"].shape) == (1, 10)


def test_real_mode_is_the_eager_run():
    gm = trace(Layouts().eval())
    x = torch.randn(1, 3, 8, 8)
    ShapePropPass((x,), real=True)(gm)
    real = {k: _fields(v[0]) for k, v in _meta_of(gm).items()}
    ShapePropPass((x,))(gm)
    assert {k: _fields(v[0]) for k, v in _meta_of(gm).items()} == real


# ----------------------------------------------------------------------------------------------
# value-dependent ops
# ----------------------------------------------------------------------------------------------


class ValueDependent(nn.Module):
    """Output shapes that depend on values: positions of a mask of the input, masked
    selection, ``unique``, a number read with ``.item()``; and a table gathered by an index
    buffer (computed from parameters and buffers alone, on real values)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.table = nn.Parameter(torch.randn(6, 8))
        self.register_buffer("index", torch.tensor([3, 0, 5, 1]))

    def forward(self, x):
        y = self.conv(x)
        keep = x[0, 0] > 0
        where = torch.nonzero(keep)
        picked = x.flatten(2)[:, :, keep.flatten()]
        levels = torch.unique(x.round())
        top = x.abs().max().item()
        bias = self.table[self.index].sum(0)
        return y.mean((2, 3)) + bias, where.float().mean(0) * top, picked.sum(-1), levels


def test_value_dependent_nodes_run_on_real_values_they_depend_on():
    torch.manual_seed(0)
    gm = trace(ValueDependent().eval())
    x = torch.randn(1, 3, 6, 6)
    shapes = assert_same_metadata(gm, (x,))
    # only the value-dependent ops needed real values, computed from the input alone: the
    # convolution did not run
    masked = next(n.name for n in gm.graph.nodes if n.target is operator.getitem
                  and isinstance(n.args[1], tuple) and any(isinstance(a, torch.fx.Node) for a in n.args[1]))
    assert sorted(shapes.real_nodes) == sorted(["nonzero", masked, "unique", "item"]), shapes.real_nodes
    conv = next(n for n in gm.graph.nodes if n.target == "conv")
    assert conv not in shapes.real
    index = next(n for n in gm.graph.nodes if n.op == "call_function" and n.args and getattr(n.args[0], "target", "") == "table")
    assert index in shapes.real  # a table gathered by a buffer: the model's own values


def test_after_an_in_place_op_the_prefix_runs_for_real():
    class InPlace(nn.Module):
        def forward(self, x):
            y = x * 1.0
            y.clamp_(min=0)  # changes y behind the graph's back
            return torch.nonzero(y).shape[0] + y

    gm = trace(InPlace().eval())
    x = torch.randn(2, 5)
    shapes = assert_same_metadata(gm, (x,))
    assert shapes.real_nodes == ["nonzero"]


def test_compile_with_value_dependent_ops_matches_the_eager_shapes():
    torch.manual_seed(0)
    model = ValueDependent().eval()
    prog = fxprune.compile(model, torch.randn(1, 3, 6, 6))
    assert set(prog.timings) == {"trace", "shape_prop", "op_semantics", "channel_deps", "symbolic_shapes"}
    assert set(prog.cpu_timings) == set(prog.timings)
    assert "conv" in prog.module.code  # the lazily generated code is there when asked for


# ----------------------------------------------------------------------------------------------
# the torchvision zoo (slow tier)
# ----------------------------------------------------------------------------------------------

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _models  # noqa: E402  (benchmarks/_models.py: model list, builders, input sizes)


@pytest.mark.slow
@pytest.mark.parametrize("name", _models.ALL)
def test_zoo_metadata_equals_the_eager_run(name):
    """Every torchvision model, in float64 as the zoo's equivalence test compiles it (float64
    convolutions take other CPU kernels than float32 ones), through fxprune's front end."""
    from fxprune.program import _front_end

    model = _models.build(name, seed=0).double()
    inputs = _models.example_inputs(name, seed=0, dtype=torch.float64)
    gm = _front_end(model, inputs, "auto", leaf_modules=(), concrete_args=None, tracer=None)
    assert assert_same_metadata(gm, inputs).real_nodes == []
