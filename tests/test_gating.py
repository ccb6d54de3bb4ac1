"""Tests of the gating rewrite (fxprune.passes.gating).

The contract: the gated GraphModule shares every parameter with the program; with no gates
or all gates at 1 it computes exactly the plain model; with gates at 0 for some channels it
computes exactly the model that ``Program.zero_`` leaves (eval and train mode), over models
with residual adds, concat, depthwise and grouped convs, transposed convs, channel shuffle,
SE gates, functional parameters (``get_attr``) and attention heads (parameter gating).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import fxprune
from fxprune.passes.gating import ChannelGate, GatedGraphModule, GatingPass, ParamGatedCall, insert_gates
from fxprune.testing import random_masks

import models_zoo_small as Z


class ConvNet(nn.Module):
    """Residual add, concat, depthwise conv, bias convs and a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = Z.ConvBNAct(3, 8)
        self.c1 = Z.ConvBNAct(8, 12)
        self.c2 = Z.ConvBNAct(12, 8, act=None)
        self.branch = nn.Conv2d(8, 6, 1)
        self.dw = nn.Conv2d(14, 14, 3, padding=1, groups=14)
        self.grouped = nn.Conv2d(14, 8, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.c2(self.c1(x)))
        x = torch.cat([x, F.relu(self.branch(x))], 1)
        x = F.relu(self.bn(self.grouped(F.relu(self.dw(x)))))
        return self.fc(x.mean((2, 3)))


class Functional(nn.Module):
    """Parameters used through get_attr: F.conv2d, F.batch_norm affine, a layer scale."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8))
        self.bn_w = nn.Parameter(torch.rand(8) + 0.5)
        self.bn_b = nn.Parameter(torch.randn(8))
        self.register_buffer("mean", torch.randn(8))
        self.register_buffer("var", torch.rand(8) + 0.5)
        self.scale = nn.Parameter(torch.randn(8, 1, 1))
        self.conv = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.conv2d(x, self.w1, self.b1, padding=1)
        x = F.batch_norm(x, self.mean, self.var, self.bn_w, self.bn_b, False)
        return self.conv(F.relu(x) * self.scale)


class Attention(nn.Module):
    """nn.MultiheadAttention (heads are gated through its parameters) in a token MLP."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.inp = nn.Linear(10, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc1 = nn.Linear(d, 24)
        self.fc2 = nn.Linear(24, 3)

    def forward(self, x):
        x = self.inp(x)
        a, _ = self.attn(x, x, x)
        return self.fc2(F.gelu(self.fc1(x + a)))


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, idx):
        return self.fc2(F.relu(self.fc1(self.emb(idx)))).mean(1)


def _resnet18():
    return torchvision.models.resnet18(num_classes=10)


def _mobilenet():
    return torchvision.models.mobilenet_v2(num_classes=10)


CASES = {
    # name: (factory, input factory, compile kwargs)
    "convnet": (ConvNet, lambda: Z.image(), {}),
    "tiny_resnet": (Z.TinyResNet, lambda: Z.image(), {}),
    "unet_convtranspose": (Z.TinyUNet, lambda: Z.image(), {}),
    "densenet": (Z.TinyDenseNet, lambda: Z.image(), {}),
    "shufflenet_block": (lambda: nn.Sequential(Z.ConvBNAct(3, 8), Z.ShuffleV2Block(8), nn.Conv2d(8, 4, 1)),
                         lambda: Z.image(), {}),
    "se_block": (lambda: nn.Sequential(Z.ConvBNAct(3, 8), Z.SEConv(8, 4), nn.Conv2d(8, 4, 1)),
                 lambda: Z.image(), {}),
    "functional": (Functional, lambda: Z.image(), {}),
    "attention": (Attention, lambda: Z.tokens(), {}),
    "embedding": (Embed, lambda: torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0)), {}),
    "resnet18": (_resnet18, lambda: Z.image(size=(32, 32)), {}),
    "mobilenet_v2": (_mobilenet, lambda: Z.image(size=(32, 32)), {}),
}


def _compile(name, seed=0):
    factory, inputs, kw = CASES[name]
    torch.manual_seed(seed)
    model = Z.randomize_(factory().double(), seed)
    x = inputs()
    x = x.double() if x.is_floating_point() else x
    return model, x, fxprune.compile(model, x, **kw), kw


def _zeroed_copy(model, x, kw, masks):
    m2 = copy.deepcopy(model)
    p2 = fxprune.compile(m2, x, **kw)
    p2.zero_(masks)
    return p2


def _rel(a, b):
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


@pytest.mark.parametrize("name", list(CASES))
def test_gates_one_and_zero(name):
    model, x, prog, kw = _compile(name)
    gated = insert_gates(prog)
    assert isinstance(gated, GatedGraphModule) and gated.num_channels > 0
    gated.eval(), prog.module.eval()
    with torch.no_grad():
        ref = prog.module(x)
        assert torch.equal(gated(x), ref)  # no gates: the plain model, bit for bit
        gated.set_gates(torch.ones(gated.num_channels, dtype=torch.float64))
        assert torch.equal(gated(x), ref)  # gates at 1
        masks = {g: m for g, m in random_masks(prog, seed=1, frac=(0.3, 0.6)).items() if g in gated.group_ids}
        assert masks
        gated.set_gates(masks)
        out = gated(x)
        gated.set_gates(None)
    zeroed = _zeroed_copy(model, x, kw, masks)
    zeroed.module.eval()
    with torch.no_grad():
        want = zeroed.module(x)
    assert _rel(out, want) < 1e-10, name
    assert _rel(out, ref) > 1e-6, f"{name}: zeroing channels changed nothing (a vacuous check)"


@pytest.mark.parametrize("name", ["convnet", "tiny_resnet", "densenet", "functional"])
def test_gates_zero_train_mode(name):
    """Train mode: the norms see the zeroed model's batch statistics and update their running
    statistics the same way."""
    model, x, prog, kw = _compile(name)
    gated = insert_gates(prog)
    masks = {g: m for g, m in random_masks(prog, seed=2).items() if g in gated.group_ids}
    zeroed = _zeroed_copy(model, x, kw, masks)
    gated.train(), zeroed.module.train()
    with torch.no_grad(), gated.gated(masks):
        out = gated(x)
        want = zeroed.module(x)
    assert _rel(out, want) < 1e-10
    for (n1, b1), (n2, b2) in zip(prog.module.named_buffers(), zeroed.module.named_buffers()):
        if b1.is_floating_point():
            assert torch.allclose(b1, b2, rtol=1e-10, atol=1e-12), n1


def test_each_group_fully_off_equals_zeroed():
    model, x, prog, kw = _compile("convnet")
    gated = insert_gates(prog).eval()
    for gid, size in zip(gated.group_ids, gated.group_sizes):
        mask = {gid: np.zeros(size, bool)}
        with torch.no_grad(), gated.gated(mask):
            out = gated(x)
        zeroed = _zeroed_copy(model, x, kw, mask).module.eval()
        with torch.no_grad():
            assert _rel(out, zeroed(x)) < 1e-10, f"group {gid}"


def test_shares_parameters_and_leaves_program_untouched():
    model, x, prog, _ = _compile("resnet18")
    code_before = prog.module.code
    gated = insert_gates(prog)
    assert prog.module.code == code_before
    prog_params = {id(p) for p in prog.module.parameters()}
    gated_params = {id(p) for p in gated.parameters()}
    assert gated_params == prog_params  # the same tensors, nothing copied, nothing added
    assert {id(p) for p in model.parameters()} == prog_params
    # training the gated module trains the model
    gated.train()
    opt = torch.optim.SGD(gated.parameters(), lr=0.1)
    w0 = model.conv1.weight.detach().clone()
    gated(x).sum().backward()
    opt.step()
    assert not torch.equal(model.conv1.weight, w0)
    assert "fxprune_gate" in gated.code and "fxprune_gates = self.fxprune_gate()" in gated.code


def test_gradient_reaches_gates():
    _, x, prog, _ = _compile("attention")
    gated = insert_gates(prog)
    kinds = {p.kind for p in gated.gate_points}
    assert kinds == {"output", "params"}  # heads are gated through the attention's parameters
    g = torch.full((gated.num_channels,), 0.7, dtype=torch.float64, requires_grad=True)
    gated.set_gates(g)
    gated(x).square().sum().backward()
    gated.set_gates(None)
    covered = np.unique(np.concatenate([p.channels for p in gated.gate_points]))
    assert covered.tolist() == list(range(gated.num_channels))  # every channel has a gate
    assert (g.grad != 0).sum() > 0.9 * gated.num_channels


def test_gate_modules_and_points():
    _, x, prog, _ = _compile("convnet")
    gated = insert_gates(prog)
    gates = [m for m in gated.modules() if isinstance(m, ChannelGate)]
    assert len(gates) == sum(p.kind == "output" for p in gated.gate_points)
    assert not any(isinstance(m, ParamGatedCall) for m in gated.modules())
    produced = {p.node for p in gated.gate_points}
    assert {"stem_0", "stem_1", "c1_0", "branch", "dw", "grouped", "bn"} <= produced
    assert "fc" not in produced  # the output group is frozen: not gated


def test_flat_from_groups_and_errors():
    _, x, prog, _ = _compile("convnet")
    gated = insert_gates(prog)
    gid, size, off = gated.group_ids[1], gated.group_sizes[1], gated.group_offsets[1]
    v = gated.flat_from_groups({gid: np.zeros(size)})
    assert v.shape == (gated.num_channels,)
    assert v[off:off + size].sum() == 0 and v.sum() == gated.num_channels - size
    with pytest.raises(fxprune.FxPruneError):
        gated.set_gates(torch.ones(gated.num_channels + 1))
    with pytest.raises(fxprune.FxPruneError):
        gated.set_gates({gid: np.ones(size + 1)})
    with pytest.raises(fxprune.FxPruneError):
        insert_gates(torch.fx.symbolic_trace(nn.Linear(3, 3)))


def test_pass_form():
    _, x, prog, _ = _compile("tiny_resnet")
    result = GatingPass()(prog.module)
    assert result.modified and isinstance(result.graph_module, GatedGraphModule)
    with torch.no_grad():
        assert torch.equal(result.graph_module.eval()(x), prog.module.eval()(x))


def test_modes_of_shared_modules_untouched():
    model, x, prog, _ = _compile("tiny_resnet")
    model.train()
    prog.module.training = False  # a stale root flag must not leak into the shared modules
    insert_gates(prog)
    assert all(m.training for m in model.modules())
