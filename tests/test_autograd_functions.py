"""Custom ``torch.autograd.Function``s stay opaque calls: ``prog.module`` has the model's gradients.

Two Functions whose backward is not the gradient of their forward: a straight-through
rounding estimator (forward rounds, backward passes the gradient through) and an identity
whose backward scales the gradient by 3. Through both front ends, each call is one
``call_function`` node, the channels it touches are frozen with a reason naming the class, the
gradients of ``prog.module`` equal the model's, and the slim model still matches.
"""
import pytest
import torch
import torch.nn as nn

import fxprune
import fxprune.io as fio
from fxprune.errors import CheckpointError
from fxprune.passes import REGISTRY, register_function
from fxprune.passes.autograd_functions import autograd_function
from fxprune.passes.ops_nn import identity_channels
from fxprune.testing import random_masks, randomize_norms


class RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class Net(nn.Module):
    """conv -> bn -> STE(4x)/4 -> conv -> ScaleGrad -> relu -> conv -> conv (4 groups)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 6, 3, padding=1)
        self.c4 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = RoundSTE.apply(self.bn(self.c1(x)) * 4) / 4
        y = ScaleGrad.apply(self.c2(y), 3.0)
        return self.c4(torch.relu(self.c3(torch.relu(y))))


def _grads(module, x):
    module.zero_grad(set_to_none=True)
    module(x).square().sum().backward()
    return {k: p.grad.clone() for k, p in module.named_parameters()}


@pytest.fixture
def net():
    torch.manual_seed(0)
    model = Net()
    randomize_norms(model)
    return model, torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_gradients_equal_the_models(net, frontend):
    model, x = net
    prog = fxprune.compile(model.eval(), (x,), frontend=frontend)
    calls = [n for n in prog.module.graph.nodes if autograd_function(n.target) is not None]
    assert [autograd_function(n.target) for n in calls] == [RoundSTE, ScaleGrad]
    targets = {str(n.target) for n in prog.module.graph.nodes}
    assert not any("round" in t or "autograd_boundary" in t for t in targets), targets  # forward not inlined
    # fx graphs train like the model; exported graphs have eval-mode semantics baked in
    mode = frontend == "fx"
    model.train(mode)
    prog.module.train(mode)
    ref, got = _grads(model, x), _grads(prog.module, x)
    assert ref["c1.weight"].abs().sum() > 0  # the STE passes the gradient through
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_channels_through_the_call_are_frozen_with_a_reason(net, frontend):
    model, x = net
    prog = fxprune.compile(model.eval(), (x,), frontend=frontend)
    by_width = {g.size: g for g in prog.groups}
    for size, cls in ((8, "RoundSTE"), (8, "ScaleGrad")):
        frozen = [g for g in prog.groups if g.size == size and not g.prunable]
        assert any(f"custom torch.autograd.Function {__name__}.{cls}" in g.reason for g in frozen), \
            [g.reason for g in frozen]
    assert by_width[6].prunable  # the conv after the relu is not touched by a custom Function
    prog.zero_(random_masks(prog, seed=0))
    slim = prog.construct_subnet()
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())


def test_a_registered_rule_lifts_the_freeze(net):
    model, x = net
    register_function(ScaleGrad.apply, name="zero_preserving")(identity_channels)
    try:
        prog = fxprune.compile(model.eval(), (x,))
    finally:
        del REGISTRY.functions[ScaleGrad.apply]
    reasons = [g.reason or "" for g in prog.groups]
    assert not any("ScaleGrad" in r for r in reasons), reasons
    assert any("RoundSTE" in r for r in reasons)
    c2_group = next(g for g in prog.groups if any(s.param == "c2.weight" for s in g.slices))
    assert c2_group.prunable
    model.train()
    prog.module.train()
    ref, got = _grads(model, x), _grads(prog.module, x)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)


def test_saved_slim_model_loads_only_when_the_function_is_allowed(net, tmp_path):
    model, x = net
    prog = fxprune.compile(model.eval(), (x,))
    prog.zero_(random_masks(prog, seed=1))
    slim = prog.construct_subnet().eval()
    fio.save(slim, tmp_path)
    with pytest.raises(CheckpointError, match=rf"refusing to call '{__name__}.RoundSTE.apply'"):
        fio.load(tmp_path)
    loaded = fio.load(tmp_path, allow=[RoundSTE, ScaleGrad]).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), slim(x))
    assert [autograd_function(n.target) for n in loaded.graph.nodes
            if autograd_function(n.target)] == [RoundSTE, ScaleGrad]


class TwoOutputs(torch.autograd.Function):
    """Returns (rounded x, 2 x) with straight-through gradients for both."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x), x * 2

    @staticmethod
    def backward(ctx, g_round, g_double):
        return g_round + 2 * g_double


class TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        r, d = TwoOutputs.apply(self.c1(x) * 3)
        return self.c2(r + d * d)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_function_with_several_outputs(frontend):
    torch.manual_seed(0)
    model, x = TupleNet().eval(), torch.randn(2, 3, 6, 6)
    prog = fxprune.compile(model, (x,), frontend=frontend)
    assert sum(autograd_function(n.target) is TwoOutputs for n in prog.module.graph.nodes) == 1
    assert not any("round" in str(n.target) for n in prog.module.graph.nodes)
    ref, got = _grads(model, x), _grads(prog.module, x)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(prog.module(x), model(x), rtol=0, atol=0)
