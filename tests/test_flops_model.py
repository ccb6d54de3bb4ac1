"""Tests of fxprune.flops_model: FLOPs as a function of kept channels, from the graph.

The central check: for random keep-masks, the model's prediction equals what
``torch.utils.flop_counter`` measures on the slim model that ``construct_subnet`` builds
(required within 1%; it is exact), over ResNet-18, MobileNetV2, a VGG-style net and hand-made
cases (transposed conv, DenseNet concat, token linears and matmuls, einsum, attention).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import sympy
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import sdpa_flop_count

import fxprune
from fxprune.flops_model import FlopsModel, sdpa_terms
from fxprune.report import count_flops
from fxprune.testing import random_masks

import models_zoo_small as Z


def vgg_ish(num_classes=10):
    cfg = [16, 16, "M", 32, 32, "M", 64, 64, "M"]
    layers, c = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(inplace=True),
                         nn.Dropout(), nn.Linear(128, num_classes))


class TokenMixer(nn.Module):
    """Linears over (B, N, C), a matmul between activations and a two-operand einsum."""

    def __init__(self, d=12):
        super().__init__()
        self.q = nn.Linear(10, d)
        self.k = nn.Linear(10, d)
        self.v = nn.Linear(10, 8)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        att = torch.softmax(q @ k.transpose(1, 2), -1)
        y = torch.einsum("bnm,bmc->bnc", att, v)
        return self.out(F.relu(self.mix(y)))


class Attention(nn.Module):
    def __init__(self, d=16, heads=4):
        super().__init__()
        self.inp = nn.Linear(10, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc = nn.Linear(d, 3)

    def forward(self, x):
        x = self.inp(x)
        a, _ = self.attn(x, x, x)
        return self.fc(F.relu(x + a))


class GroupedNet(nn.Module):
    """Grouped and depthwise convs (channels leave in whole conv groups), a concat and a
    residual add."""

    def __init__(self):
        super().__init__()
        self.stem = Z.ConvBNAct(3, 12)
        self.grouped = Z.ConvBNAct(12, 12, groups=3)
        self.branch = nn.Conv2d(12, 6, 1)
        self.dw = Z.ConvBNAct(18, 18, groups=18)
        self.head = nn.Conv2d(18, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.grouped(x)
        x = torch.cat([x, F.relu(self.branch(x))], 1)
        return self.head(self.dw(x))


ARCHS = {
    # name: (factory, input shape)
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 32, 32)),
    "vgg_ish": (vgg_ish, (2, 3, 32, 32)),
    "unet_convtranspose": (Z.TinyUNet, (2, 3, 8, 8)),
    "densenet": (Z.TinyDenseNet, (2, 3, 8, 8)),
    "token_mixer": (TokenMixer, (2, 5, 10)),
    "grouped_depthwise": (GroupedNet, (2, 3, 8, 8)),
}


def _setup(name, seed=0):
    factory, shape = ARCHS[name]
    torch.manual_seed(seed)
    model = factory().eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return model, x


@pytest.mark.parametrize("name", list(ARCHS))
def test_matches_flop_counter_on_slim_model(name, record_property):
    model, x = _setup(name)
    prog = fxprune.compile(model, x)
    fm = FlopsModel(prog)
    assert fm.full == count_flops(prog.module, (x,)) == count_flops(model, (x,))
    assert fm.mismatches() == []
    masks = random_masks(prog, seed=3, frac=(0.2, 0.7))
    prog.zero_(masks)
    slim = prog.construct_subnet()
    measured = count_flops(slim, (x,))
    predicted = fm.flops(masks)
    err = abs(predicted - measured) / measured
    record_property("flops_model_rel_error", err)
    assert measured < fm.full
    assert err < 0.01, f"{name}: predicted {predicted}, measured {measured}"
    assert predicted == measured  # exact, in fact
    # the differentiable evaluation agrees with the exact one
    keep = torch.as_tensor(fm.flat_keep(masks), dtype=torch.float64)
    assert fm(keep).item() == pytest.approx(predicted, rel=1e-12)


def test_gradient_is_marginal_cost():
    """For a channel whose group enters every term linearly, d FLOPs / d keep_c is exactly the
    FLOPs that removing the channel saves."""
    model, x = _setup("vgg_ish")
    prog = fxprune.compile(model, x)
    fm = FlopsModel(prog)
    keep = torch.ones(fm.num_channels, dtype=torch.float64, requires_grad=True)
    total = fm(keep)
    total.backward()
    assert total.item() == fm.full
    for gid, off, size in zip(fm.group_ids, fm.group_offsets, fm.group_sizes):
        mask = np.ones(size, bool)
        mask[0] = False
        saved = fm.full - fm.flops({gid: mask})
        assert keep.grad[off].item() == pytest.approx(saved, rel=1e-12)
        assert saved > 0


def test_soft_keep_values_interpolate():
    model, x = _setup("resnet18")
    prog = fxprune.compile(model, x)
    fm = FlopsModel(prog)
    half = fm(torch.full((fm.num_channels,), 0.5))
    zero = fm(torch.zeros(fm.num_channels))
    assert zero.item() == pytest.approx(fm.fixed)  # every prunable channel off
    assert zero.item() < half.item() < fm.full
    # conv costs are products of two channel counts: halving every group quarters most of them
    assert half.item() / fm.full == pytest.approx(0.25, abs=0.05)


def test_expression_is_symbolic_in_group_sizes():
    model, x = _setup("vgg_ish")
    prog = fxprune.compile(model, x)
    fm = FlopsModel(prog)
    expr = fm.expression()
    syms = prog.analysis.sym
    assert expr.free_symbols <= set(syms.full)
    assert int(expr.subs({s: n for s, n in zip(syms.full, syms.sizes)})) == fm.full
    # the conv between the first two groups: 2 * N * 32 * 32 * 9 * c0 * c1
    c0, c1 = syms.full[0], syms.full[1]
    assert expr.coeff(c0 * c1) == 2 * 2 * 32 * 32 * 9


def test_sdpa_formula_matches_flop_counter_formula():
    for shapes in [((2, 4, 8, 16), (2, 4, 10, 16), (2, 4, 10, 12)), ((3, 5, 7), (3, 6, 7), (3, 6, 9))]:
        q, k, v = shapes
        terms = sdpa_terms(*[tuple(sympy.Integer(n) for n in s) for s in shapes])
        total = sum(c * int(np.prod([int(f) for f in fs])) for c, fs in terms)
        if len(q) == 4:
            assert total == sdpa_flop_count(q, k, v)
        else:
            assert total == sdpa_flop_count((q[0], 1) + q[1:], (k[0], 1) + k[1:], (v[0], 1) + v[1:])


def test_attention_module():
    """nn.MultiheadAttention: projections, the two products and the output projection. Train
    mode, where the flop counter sees the composite path (the eval fast path is opaque to it)."""
    torch.manual_seed(0)
    model = Attention()
    x = torch.randn(2, 5, 10)
    prog = fxprune.compile(model, x)
    fm = FlopsModel(prog)
    model.train()
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    assert fm.full == counter.get_total_flops()
    heads = [g for g in prog.prunable_groups if any(s.param == "attn.in_proj_weight" for s in g.slices)]
    assert heads
    masks = {heads[0].id: np.array([True, False, True, False])}
    prog.zero_(masks)
    slim = prog.construct_subnet().train()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        slim(x)
    assert fm.flops(masks) == counter.get_total_flops() < fm.full


class ManyOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(10, 12)
        self.conv = nn.Conv2d(3, 4, 3)
        self.convt = nn.ConvTranspose2d(4, 2, 2, stride=2)

    def forward(self, x, y):
        a = self.lin(x)
        b = a @ a.transpose(1, 2)
        e = torch.einsum("bij,bjk->bik", b, a)
        c = torch.bmm(b, a) + torch.baddbmm(a, b, a)
        return e.sum() + c.sum() + self.convt(self.conv(y)).sum() + F.conv2d(y, self.conv.weight).sum()


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_formulas_match_measurement_per_node(frontend):
    """Every formula at full size equals the flop counter's count of its node, for module,
    function and method calls (fx) and for ATen overloads (torch.export)."""
    model = ManyOps().eval()
    inputs = (torch.randn(2, 5, 10), torch.randn(2, 3, 8, 8))
    prog = fxprune.compile(model, inputs, frontend=frontend)
    fm = FlopsModel(prog)
    assert all(nc.modeled for nc in fm.nodes)
    assert len(fm.nodes) == 8
    assert fm.mismatches() == []
    assert fm.full == count_flops(model, inputs)


class OpaqueMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return x @ self.w


def test_node_without_formula_is_measured():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.opaque = OpaqueMatmul()
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.head(self.opaque(F.relu(self.conv(x))))

    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    prog = fxprune.compile(model, x, leaf_modules=[OpaqueMatmul])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fm = FlopsModel(prog)
    cost = {nc.node: nc for nc in fm.nodes}
    assert not cost["opaque"].modeled and cost["opaque"].full == 2 * (2 * 8 * 8 * 8) * 8
    assert fm.full == count_flops(model, (x,))
    assert not any("opaque" in str(w.message) for w in caught)  # it touches no prunable channel


def test_ratio_and_flat_keep_errors():
    model, x = _setup("vgg_ish")
    prog = fxprune.compile(model, x)
    fm = FlopsModel(prog)
    assert fm.ratio() == 1.0
    with pytest.raises(fxprune.FxPruneError):
        fm.flops({fm.group_ids[0]: np.ones(3, bool)})
    with pytest.raises(fxprune.FxPruneError):
        fm(torch.ones(fm.num_channels + 1))
    per_node = fm.node_flops()
    assert sum(per_node.values()) == fm.full
