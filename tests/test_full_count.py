"""Normalisations and reductions over pruned channels (``passes/full_count.py``).

A removed channel is exactly zero where it flows, so a sum over the channels is unchanged and
only the count differs: the slim op divides by the full model's count. Checked here:

* the count-preserving functions and modules of :mod:`fxprune.modules` against the stock ops
  on a zeroed full tensor (float64);
* every normalisation and reduction, written as a module, a function, a method or an ATen op,
  through both front ends: its channels are exact and prunable, the slim model equals the
  zeroed full one (float64, 1e-6 relative) and uses the count-preserving form;
* the traps that must stay inexact (a LayerNorm without affine parameters, a softmax over
  channels, ``x - x.mean(1)``, a normalised input that is not zero at removed channels);
* slim models with count-preserving norms save, load and export (ONNX, pt2).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune import modules as fm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from models_zoo_small import Fn, Sandwich, TokenSandwich, equiv, group_of, image, tokens  # noqa: E402

C = 8


def _zeroed(x: torch.Tensor, dim: int, removed) -> torch.Tensor:
    x = x.clone()
    x.index_fill_(dim, torch.as_tensor(removed), 0.0)
    return x


def _kept(n: int, removed) -> torch.Tensor:
    return torch.tensor([i for i in range(n) if i not in set(removed)])


# ---------------------------------------------------------------------------- the functions


def test_layer_and_rms_norm_functions_equal_the_full_norms():
    gen = torch.Generator().manual_seed(0)
    x = _zeroed(torch.randn(3, 5, 12, generator=gen, dtype=torch.float64), -1, [1, 4, 5, 9])
    w, b = torch.randn(12, generator=gen, dtype=torch.float64), torch.randn(12, generator=gen, dtype=torch.float64)
    k = _kept(12, [1, 4, 5, 9])
    full = F.layer_norm(x, (12,), w, b, 1e-5)[..., k]
    torch.testing.assert_close(fm.layer_norm_full_count(x[..., k], (8,), 12, w[k], b[k], 1e-5), full, rtol=1e-12,
                               atol=1e-12)
    out, mean, rstd = fm.native_layer_norm_full_count(x[..., k], (8,), w[k], b[k], 1e-5, 12)
    ref = torch.ops.aten.native_layer_norm(x, [12], w, b, 1e-5)
    torch.testing.assert_close(out, ref[0][..., k], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((mean, rstd), (ref[1], ref[2]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fm.rms_norm_full_count(x[..., k], (8,), 12, w[k], 1e-6),
                               F.rms_norm(x, (12,), w, 1e-6)[..., k], rtol=1e-12, atol=1e-12)


def test_reductions_divide_by_the_full_count():
    gen = torch.Generator().manual_seed(1)
    x = _zeroed(torch.randn(2, 6, 4, 5, generator=gen, dtype=torch.float64), 1, [0, 3])
    k = _kept(6, [0, 3])
    xs = x[:, k]
    torch.testing.assert_close(fm.mean_full_count(xs, (1,), False, (6,)), x.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fm.mean_full_count(xs, (1, 2), True, (6, None)), x.mean((1, 2), keepdim=True),
                               rtol=1e-12, atol=1e-12)
    for correction in (0, 1):
        torch.testing.assert_close(fm.var_full_count(xs, (1, 3), correction, False, (6, None)),
                                   x.var((1, 3), correction=correction), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fm.std_full_count(xs, (1,), 1, True, (6,)), x.std(1, keepdim=True), rtol=1e-12,
                               atol=1e-12)


def test_group_norm_function_with_uneven_groups():
    gen = torch.Generator().manual_seed(2)
    removed = [1, 2, 3, 6]  # group 0 keeps 1 of 4, group 1 keeps 3 of 4, group 2 all
    x = _zeroed(torch.randn(2, 12, 3, 3, generator=gen, dtype=torch.float64), 1, removed)
    w, b = torch.randn(12, generator=gen, dtype=torch.float64), torch.randn(12, generator=gen, dtype=torch.float64)
    k = _kept(12, removed)
    full = F.group_norm(x, 3, w, b, 1e-5)[:, k]
    torch.testing.assert_close(fm.group_norm_full_count(x[:, k], (1, 3, 4), 4, w[k], b[k], 1e-5), full,
                               rtol=1e-12, atol=1e-12)
    out, mean, rstd = fm.native_group_norm_full_count(x[:, k], w[k], b[k], (1, 3, 4), 4, 1e-5)
    ref = torch.ops.aten.native_group_norm(x, w, b, 2, 12, 9, 3, 1e-5)
    torch.testing.assert_close((out, mean, rstd), (ref[0][:, k], ref[1], ref[2]), rtol=1e-12, atol=1e-12)


def test_half_precision_statistics_are_accumulated_in_float32():
    gen = torch.Generator().manual_seed(3)
    x = _zeroed(torch.randn(4, 64, generator=gen) * 30, -1, list(range(0, 64, 4)))
    k = _kept(64, list(range(0, 64, 4)))
    ref = F.layer_norm(x, (64,))[..., k]
    out = fm.layer_norm_full_count(x[..., k].to(torch.bfloat16), (48,), 64)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------- through the front ends


class RMSNormLike(nn.Module):
    """An RMS norm written out, as HuggingFace's LlamaRMSNorm and T5LayerNorm are."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class TokenNorms:
    """Normalisations over the last (channel) dim of ``(B, N, C)`` tokens, with what the slim
    model must call in their place."""
    cases = {
        "LayerNorm": (lambda: nn.LayerNorm(C), "CountPreservingLayerNorm"),
        "LayerNorm_no_bias": (lambda: nn.LayerNorm(C, bias=False), "CountPreservingLayerNorm"),
        "F.layer_norm": (lambda: _Affine(lambda x, w, b: F.layer_norm(x, (C,), w, b)), "layer_norm_full_count"),
        "aten.native_layer_norm": (lambda: _Affine(lambda x, w, b: torch.ops.aten.native_layer_norm.default(
            x, [C], w, b, 1e-5)[0]), "native_layer_norm_full_count"),
        "RMSNorm": (lambda: nn.RMSNorm(C, eps=1e-6), "RMSNorm"),
        "RMSNorm_no_eps": (lambda: nn.RMSNorm(C), "CountPreservingRMSNorm"),
        "F.rms_norm": (lambda: _Affine(lambda x, w, b: F.rms_norm(x, (C,), w, 1e-6)), "rms_norm_full_count"),
        "written_out_rms": (lambda: RMSNormLike(C), "mean_full_count"),
        "var_normalised": (lambda: _Affine(lambda x, w, b: x / (x.var(-1, keepdim=True) + 1e-5).sqrt() * w),
                           "var_full_count"),
        "std_normalised": (lambda: _Affine(lambda x, w, b: x / (torch.std(x, -1, keepdim=True) + 1e-5) * w),
                           "std_full_count"),
        "vector_norm": (lambda: _Affine(lambda x, w, b: x / (torch.linalg.vector_norm(x, 2, -1, True) + 1e-5) * w),
                        None),
    }


class _Affine(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.ones(C))
        self.bias = nn.Parameter(torch.zeros(C))

    def forward(self, x):
        return self.fn(x, self.weight, self.bias)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", list(TokenNorms.cases))
def test_token_norms_are_exact(name, frontend):
    build, slim_uses = TokenNorms.cases[name]
    res = equiv(TokenSandwich(build()), [tokens()], frontend=frontend)
    g = group_of(res.prog, "fc1.weight")
    assert g.prunable and g.exact, repr(g)
    assert res.slim.get_parameter("fc1.weight").shape[0] < C
    if slim_uses is not None and frontend == "fx":
        described = res.slim.code + "".join(type(m).__name__ for m in res.slim.modules())
        assert slim_uses in described, f"{name}: the slim model does not use {slim_uses}:\n{res.slim.code}"


class ImageNorms:
    """Normalisations over the channel dim (1) of ``(N, C, H, W)``."""
    cases = {
        "GroupNorm": lambda: nn.GroupNorm(2, C),
        "F.group_norm": lambda: _Affine(lambda x, w, b: F.group_norm(x, 4, w, b)),
        "aten.native_group_norm": lambda: _Affine(lambda x, w, b: torch.ops.aten.native_group_norm.default(
            x, w, b, x.shape[0], C, x.shape[2] * x.shape[3], 2, 1e-5)[0]),
        "LayerNorm2d": lambda: LayerNorm2d(C),
        "grn": lambda: GRN(C),
        "channel_mean": lambda: _Affine(lambda x, w, b: x * (1 + x.mean(1, keepdim=True)) * w[:, None, None]),
    }


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's LayerNorm over channels of an NCHW tensor."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class GRN(nn.Module):
    """ConvNeXt-V2's global response normalisation (channels first)."""

    def __init__(self, c: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x):
        gx = torch.linalg.vector_norm(x, 2, dim=(2, 3), keepdim=True)
        nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", list(ImageNorms.cases))
def test_channel_norms_are_exact(name, frontend):
    res = equiv(Sandwich(ImageNorms.cases[name](), bn=False), [image()], frontend=frontend)
    g = group_of(res.prog, "conv1.weight")
    assert g.prunable and g.exact and g.size == C, repr(g)
    assert res.slim.get_parameter("conv1.weight").shape[0] < C


def test_a_norm_over_channels_merged_with_positions_is_exact_with_affine():
    """A LayerNorm over ``flatten(1)`` of a feature map normalises channels with positions:
    a removed channel's positions are all zero and its affine entries are in the group."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, C, 3, padding=1)
            self.norm = nn.LayerNorm(C * 16)
            self.fc = nn.Linear(C * 16, 5)

        def forward(self, x):
            return self.fc(self.norm(self.conv1(x).flatten(1)))

    res = equiv(M(), [torch.randn(2, 3, 4, 4)])
    g = group_of(res.prog, "conv1.weight")
    assert g.prunable and g.exact, repr(g)
    assert isinstance(res.slim.norm, fm.CountPreservingLayerNorm) and res.slim.norm.full_size == C * 16


# ---------------------------------------------------------------------------- traps


class _Softmax(nn.Module):
    def forward(self, x):
        return x.softmax(-1)


class _Centre(nn.Module):
    def forward(self, x):
        return x - x.mean(1, keepdim=True)


class _SigmoidThenNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(C)

    def forward(self, x):
        return self.norm(torch.sigmoid(x))  # a removed channel reaches the norm as 0.5


class _MixedNoAffine(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, C, 3, padding=1)
        self.norm = nn.LayerNorm(C * 16, elementwise_affine=False)
        self.fc = nn.Linear(C * 16, 5)

    def forward(self, x):
        return self.fc(self.norm(self.conv1(x).flatten(1)))


TRAPS = {
    "layer_norm_without_affine": (lambda: TokenSandwich(nn.LayerNorm(C, elementwise_affine=False)), tokens,
                                  "fc1.weight", ("probe", "layer_norm")),
    "functional_layer_norm_without_affine": (
        lambda: TokenSandwich(Fn(lambda x: F.layer_norm(x, (C,)))), tokens, "fc1.weight", "layer_norm"),
    "softmax_over_channels": (lambda: TokenSandwich(_Softmax()), tokens, "fc1.weight", "softmax"),
    "minus_channel_mean": (lambda: Sandwich(_Centre(), bn=False), image, "conv1.weight", "sub"),
    "norm_of_a_non_zero_input": (lambda: TokenSandwich(_SigmoidThenNorm()), tokens, "fc1.weight", "sigmoid"),
    "reshaped_mix_without_affine": (_MixedNoAffine, lambda: torch.randn(2, 3, 4, 4), "conv1.weight", "norm"),
}


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", list(TRAPS))
def test_traps_stay_inexact(name, frontend):
    """Each keeps a data-dependent value at a removed channel where a consumer reads it: the
    group stays whole, with the reason naming the op, and the rest still matches."""
    build, inputs, param, op = TRAPS[name]
    res = equiv(build(), [inputs()], frontend=frontend, expect_pruned=False)
    g = group_of(res.prog, param)
    assert not g.prunable and not g.exact, repr(g)
    ops = (op,) if isinstance(op, str) else op
    assert any(o in g.reason for o in ops), f"{name}: the reason does not name {op!r}: {g.reason}"


def test_allow_inexact_still_prunes_what_stays_inexact_and_verification_catches_it():
    model = TokenSandwich(_Softmax()).eval().double()
    x = tokens().double()
    prog = fxprune.compile(model, (x,), allow_inexact=True)
    g = group_of(prog, "fc1.weight")
    assert g.prunable and not g.exact
    keep = np.ones(g.size, bool)
    keep[:3] = False
    prog.zero_({g.id: keep})
    with pytest.raises(fxprune.VerificationError):
        prog.construct_subnet(verify=True)


# ---------------------------------------------------------------------------- files


def _slim_with_norms():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, C, 3, padding=1)
            self.gn = nn.GroupNorm(2, C)
            self.ln = LayerNorm2d(C)
            self.pooled_norm = nn.LayerNorm(C)
            self.rms = nn.RMSNorm(C)
            self.fc = nn.Linear(C, 4)

        def forward(self, x):
            y = self.ln(self.gn(self.conv1(x)))
            y = y * (1 + y.var(1, keepdim=True))
            return self.fc(self.rms(self.pooled_norm(y.mean((2, 3)))))

    torch.manual_seed(0)
    model = M().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, 6, 6)
    prog = fxprune.compile(model, (x,))
    g = group_of(prog, "conv1.weight")
    keep = np.ones(g.size, bool)
    keep[[0, 1, 5]] = False  # uneven: GroupNorm group 0 keeps 2 of 4, group 1 keeps 3
    prog.zero_({g.id: keep})
    return prog, prog.construct_subnet(), x


def test_slim_model_with_count_preserving_norms_saves_and_loads(tmp_path):
    prog, slim, x = _slim_with_norms()
    kinds = {type(m).__name__ for m in slim.modules()}
    assert {"CountPreservingGroupNorm", "CountPreservingLayerNorm", "CountPreservingRMSNorm"} <= kinds, kinds
    assert "layer_norm_full_count" in slim.code and "var_full_count" in slim.code
    fxprune.save(slim, tmp_path / "slim")
    loaded = fxprune.load(tmp_path / "slim")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), prog.module(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_slim_model_with_count_preserving_norms_exports(tmp_path, fmt):
    _, slim, x = _slim_with_norms()
    res = fxprune.export(slim, (x,), tmp_path / f"slim.{fmt}", format=fmt)
    assert res.max_abs_diff < 1e-4


def test_a_slim_model_compiled_again_keeps_its_norms_exact():
    """The count-preserving norms of a slim model have the semantics of the stock ones: a slim
    model compiled again prunes its channels exactly, the full count staying the original's.
    (Symbolic tracing keeps them whole; ``torch.export`` would decompose them, so a slim model
    is compiled again with ``frontend="fx"``, which ``"auto"`` tries first.)"""
    prog, slim, x = _slim_with_norms()
    again = fxprune.compile(slim, (x,))
    g = group_of(again, "conv1.weight")
    assert g.prunable and g.exact, repr(g)
    keep = np.ones(g.size, bool)
    keep[[0, 3]] = False
    again.zero_({g.id: keep})
    slimmer = again.construct_subnet()
    assert slimmer.get_parameter("conv1.weight").shape[0] == g.size - 2
    gn = next(m for m in slimmer.modules() if isinstance(m, fm.CountPreservingGroupNorm))
    assert gn.channels_per_group == 4 and sum(gn.kept_per_group) == g.size - 2
    with torch.no_grad():
        torch.testing.assert_close(slimmer(x), again.module(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_slim_transformer_compiled_again(frontend):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(16, 8, 2, 4, 32, 64, num_classes=5).eval().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for front in (frontend, "fx"):  # prune, then prune the slim model (a GraphModule) again
        prog = fxprune.compile(model, (x,), frontend=front)
        residual = max((g for g in prog.groups if g.prunable), key=lambda g: len(g.params))
        assert residual.exact and "conv_proj.weight" in residual.params, repr(residual)
        keep = np.ones(residual.size, bool)
        keep[: residual.size // 4] = False
        prog.zero_({residual.id: keep})
        model = prog.construct_subnet(verify=True, rtol=1e-9)
    assert model.get_parameter("conv_proj.weight").shape[0] == 32 - 8 - 6
