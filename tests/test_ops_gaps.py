"""Op rules and front-end fixes for ops that froze groups or failed on detectors, video models,
mixture-of-experts routers, Gemma, DeBERTa, XCiT, HaloNet, RAFT, wav2vec2, EvoNorm and MViT.

Each case compiles a small model that uses the op where a channel flows through it, checks
that the groups it touches are prunable (or frozen for the reason the op gives), and runs the
float64 equivalence check (``fxprune.testing.check_equivalence``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.errors import first_line
from fxprune.testing import check_equivalence

X = torch.randn(2, 3, 8, 8)


def _frozen_reasons(prog):
    return [g.reason for g in prog.groups if not g.prunable]


def _inner(prog, param):
    return next(g for g in prog.groups if param in g.params)


class TypeAs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.a(x)).type_as(self.b(x)) + self.b(x))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_type_as_reads_only_a_dtype(frontend):
    prog = fxprune.compile(TypeAs().eval(), X, frontend=frontend)
    assert _inner(prog, "a.weight").prunable
    check_equivalence(TypeAs().eval(), X, frontend=frontend)


class QKNorm(nn.Module):
    """Gemma-3's q/k norm: an RMS norm over the head width written with ``rsqrt``."""

    def __init__(self, heads=4, width=8):
        super().__init__()
        self.h, self.w = heads, width
        self.q, self.k, self.v = (nn.Linear(16, heads * width) for _ in range(3))
        self.o = nn.Linear(heads * width, 16)
        self.scale = nn.Parameter(torch.rand(width) + 0.5)

    def norm(self, t):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.h, self.w).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(self.norm(q), self.norm(k), v, scale=0.3)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_rsqrt_norm_keeps_heads_prunable(frontend):
    x = torch.randn(2, 5, 16)
    prog = fxprune.compile(QKNorm().eval(), x, frontend=frontend)
    heads = _inner(prog, "q.weight")
    assert heads.prunable and heads.exact and heads.size == 4
    check_equivalence(QKNorm().eval(), x, frontend=frontend)


class Repeats(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(12, 4, 1)
        self.d = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        tiled = torch.relu(self.a(x)).repeat(1, 2, 1, 1)
        interleaved = torch.relu(self.b(x)).repeat_interleave(2, dim=1)
        return self.c(tiled) + self.d(interleaved)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_repeat_and_repeat_interleave(frontend):
    prog = fxprune.compile(Repeats().eval(), X, frontend=frontend)
    assert _inner(prog, "a.weight").prunable and _inner(prog, "b.weight").prunable
    r = check_equivalence(Repeats().eval(), X, frontend=frontend)
    assert r.params_slim < r.params_full


class TensorSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.b, self.c = nn.Conv2d(6, 4, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        p, q = torch.tensor_split(torch.relu(self.a(x)), 2, dim=1)
        return self.b(p) + self.c(q)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_tensor_split_points_are_recomputed(frontend):
    prog = fxprune.compile(TensorSplit().eval(), X, frontend=frontend)
    assert _inner(prog, "a.weight").prunable
    check_equivalence(TensorSplit().eval(), X, frontend=frontend)


class Router(nn.Module):
    """A mixture-of-experts router: top-k over the expert logits; the hidden width before it
    stays prunable, the experts are frozen by top-k."""

    def __init__(self):
        super().__init__()
        self.up, self.gate = nn.Linear(16, 24), nn.Linear(24, 6)

    def forward(self, x):
        logits = self.gate(torch.relu(self.up(x)))
        values, index = torch.topk(logits.softmax(-1), 2, dim=-1)
        return values, index


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_topk_freezes_only_the_selected_dim(frontend):
    x = torch.randn(7, 16)
    prog = fxprune.compile(Router().eval(), x, frontend=frontend)
    assert _inner(prog, "up.weight").prunable
    experts = _inner(prog, "gate.weight")
    assert not experts.prunable and "top-k" in experts.reason
    check_equivalence(Router().eval(), x, frontend=frontend)


class ClampTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.register_buffer("lo", torch.full((1, 1, 1, 1), -0.5))
        self.register_buffer("hi", torch.full((1, 1, 1, 1), 0.5))

    def forward(self, x):
        return self.b(torch.clamp(self.a(x), min=self.lo, max=self.hi))


def test_clamp_with_tensor_bounds():
    prog = fxprune.compile(ClampTensor().eval(), X, frontend="export")
    assert any(n.target is torch.ops.aten.clamp.Tensor for n in prog.module.graph.nodes)
    g = _inner(prog, "a.weight")
    assert g.prunable and "op without channel semantics" not in (g.reason or "")
    check_equivalence(ClampTensor().eval(), X, frontend="export")


class WeightNormed(nn.Module):
    """A weight-normed conv over its output channels (dim 0) and one over its kernel taps
    (dim 2, wav2vec2's positional convolution)."""

    def __init__(self):
        super().__init__()
        wn = torch.nn.utils.parametrizations.weight_norm
        self.a = wn(nn.Conv1d(3, 8, 3, padding=1), dim=0)
        self.b = wn(nn.Conv1d(8, 8, 3, padding=1, groups=2), dim=2)
        self.c = nn.Conv1d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_weight_norm():
    x = torch.randn(2, 3, 10)
    prog = fxprune.compile(WeightNormed().eval(), x)
    assert not any("op without channel semantics" in r for r in _frozen_reasons(prog))
    assert _inner(prog, "a.parametrizations.weight.original1").prunable
    check_equivalence(WeightNormed().eval(), x)


def test_aten_instance_norm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.ReLU(),
                          nn.Conv2d(8, 4, 1)).eval()
    prog = fxprune.compile(model, X, frontend="export")
    assert any("instance_norm" in str(n.target) for n in prog.module.graph.nodes)
    assert _inner(prog, "0.weight").prunable
    check_equivalence(model, X, frontend="export")


class Unfold(nn.Module):
    """HaloNet's blocking: windows over a spatial dim."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Linear(8, 4)

    def forward(self, x):
        w = self.a(x).unfold(3, 4, 4)  # (B, C, H, W/4, 4)
        return self.b(w.mean(-1).mean(-1).mean(-1))


def test_unfold_over_spatial_dims():
    prog = fxprune.compile(Unfold().eval(), X)
    assert _inner(prog, "a.weight").prunable
    check_equivalence(Unfold().eval(), X)


class GQA(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 32), nn.Linear(16, 16), nn.Linear(16, 16)
        self.o = nn.Linear(32, 16)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, 8).transpose(1, 2)
        k = self.k(x).view(b, n, 2, 8).transpose(1, 2)
        v = self.v(x).view(b, n, 2, 8).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=0.3)
        return self.o(out.transpose(1, 2).reshape(b, n, 32))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_grouped_query_attention_prunes_query_groups_with_their_kv_head(frontend):
    x = torch.randn(2, 5, 16)
    prog = fxprune.compile(GQA().eval(), x, frontend=frontend)
    g = _inner(prog, "k.weight")
    assert g.prunable and g.size == 2 and "q.weight" in g.params
    r = check_equivalence(GQA().eval(), x, frontend=frontend)
    assert r.params_slim < r.params_full


# ---------------------------------------------------------------------------- library functions


def test_timm_resample_abs_pos_embed_has_a_rule():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, dynamic_img_size=True, depth=2,
                              num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    prog = fxprune.compile(model, x, frontend="fx")
    calls = [n for n in prog.module.graph.nodes if getattr(n.target, "__name__", "") == "resample_abs_pos_embed"]
    assert calls and prog.analysis.analysis.specs[calls[0].name] == "resample_pos_embed"
    assert not any("resample" in r or "op without channel semantics (function timm" in r
                   for r in _frozen_reasons(prog))
    assert any(g.prunable for g in prog.groups if any("mlp.fc1" in p for p in g.params))
    check_equivalence(model, x, frontend="fx")


try:
    from timm.models.vision_transformer_sam import get_rel_pos
except ImportError:  # timm is optional
    get_rel_pos = None


@pytest.mark.skipif(get_rel_pos is None, reason="timm is not installed")
def test_sam_get_rel_pos_rule():
    from fxprune.passes.trace import FxPruneTracer

    class RelPos(nn.Module):
        def __init__(self):
            super().__init__()
            self.rel_pos = nn.Parameter(torch.randn(7, 8))
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):  # x: (4, 4, 8)
            r = get_rel_pos(4, 4, self.rel_pos)
            return self.b(torch.relu(self.a(x)) * r)

    x = torch.randn(4, 4, 8)
    tracer = FxPruneTracer(autowrap_functions=(get_rel_pos,))
    prog = fxprune.compile(RelPos().eval(), x, tracer=tracer)
    assert any(n.target is get_rel_pos for n in prog.module.graph.nodes)
    reasons = _frozen_reasons(prog)
    assert any("relative-position rows" in r for r in reasons)
    assert not any("op without channel semantics" in r for r in reasons)


def _edits_its_list(x, sizes):
    sizes[0] = min(sizes[0], x.shape[1])  # what torchvision's 3-D Swin helpers do
    return x * sizes[0]


torch.fx.wrap("_edits_its_list")


def test_shape_propagation_hands_plain_lists_to_wrapped_functions():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(_edits_its_list(self.a(x), [2, 3]))

    prog = fxprune.compile(M().eval(), X, frontend="fx")
    assert any(n.target is _edits_its_list for n in prog.module.graph.nodes)


def _opaque_double(x):
    return x * 2


torch.fx.wrap("_opaque_double")


def test_functions_hidden_from_tracing_make_compile_prefer_torch_export():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(_opaque_double(torch.relu(self.a(x))))

    fx = fxprune.compile(M().eval(), X, frontend="fx")
    assert not _inner(fx, "a.weight").prunable  # the opaque call freezes
    auto = fxprune.compile(M().eval(), X)
    assert not any(n.target is _opaque_double for n in auto.module.graph.nodes)
    assert _inner(auto, "a.weight").prunable


def test_evonorm_assertion_on_a_channel_count_is_dropped():
    timm = pytest.importorskip("timm")
    model = timm.create_model("test_efficientnet_evos", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    r = check_equivalence(model, x)
    assert r.params_slim < r.params_full


def test_error_messages_survive_empty_exception_messages():
    assert first_line(AssertionError()) == "AssertionError"
    assert first_line(ValueError("\n\nsecond")) == "ValueError: second"

    class Fails(nn.Module):
        def forward(self, x):
            raise AssertionError()

    from fxprune.program import max_output_difference

    with pytest.raises(fxprune.VerificationError, match=r"fails on the example inputs \(AssertionError\)"):
        max_output_difference(nn.Identity(), Fails(), (X,))
