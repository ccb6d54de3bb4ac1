"""Removed channels that hold a constant are folded into their consumer's bias.

A zeroed channel that comes out of ``s * relu(x)**2 + b`` (StarReLU) or ``sigmoid`` is a
constant, not zero; a linear layer or an unpadded convolution reading it adds the same amount
at every position, which the slim model adds to the consumer's bias (creating one where the
module had none). Where that would not be exact (padding, a module called twice) the channel
stays inexact as before.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.testing import check_equivalence


class StarReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([0.8]))
        self.bias = nn.Parameter(torch.tensor([-0.3]))

    def forward(self, x):
        return self.scale * F.relu(x) ** 2 + self.bias


class StarMLP(nn.Module):
    """fc1 -> StarReLU -> fc2, both without bias (timm's PoolFormerV2 MLP)."""

    def __init__(self, conv: bool):
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 1, bias=False)) if conv else (lambda i, o: nn.Linear(i, o, bias=False))
        self.fc1, self.act, self.fc2 = layer(6, 12), StarReLU(), layer(12, 5)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _hidden(prog, name="fc1.weight"):
    return [g for g in prog.groups if any(s.param == name and s.dim == 0 for s in g.slices)][0]


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv1x1"])
def test_star_relu_offset_folds_into_a_new_bias(conv):
    model = StarMLP(conv).eval()
    x = torch.randn(2, 6, 5, 5) if conv else torch.randn(3, 4, 6)
    prog = fxprune.compile(model, (x,))
    g = _hidden(prog)
    assert g.prunable and g.exact, g
    res = check_equivalence(model, (x,), dtype=torch.float64, seed=3)
    assert res.max_rel_diff <= 1e-12
    assert res.slim.fc2.bias is not None and res.slim.fc2.bias.shape == (5,)
    assert res.slim.fc2.weight.shape[1] < 12
    assert model.fc2.bias is None, "the user's model is left as it was"


def test_sigmoid_gate_folds_into_an_existing_bias():
    """conv -> sigmoid -> 1x1 conv with bias: a removed channel reads 0.5."""

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(torch.sigmoid(self.a(x)))

    model = Gate().eval()
    x = torch.randn(2, 3, 6, 6)
    prog = fxprune.compile(model, (x,))
    assert _hidden(prog, "a.weight").exact
    masks = {_hidden(prog, "a.weight").id: torch.tensor([True, False] * 4)}
    with torch.no_grad():
        prog.zero_(masks)
        want = prog.module(x)
    slim = prog.construct_subnet()
    assert slim.b.weight.shape[1] == 4
    torch.testing.assert_close(slim(x), want, rtol=1e-5, atol=1e-6)
    # the folded amount: half the removed columns' weights times sigmoid(0)
    removed = model.b.weight[:, 1::2].sum((1, 2, 3)) * 0.5
    torch.testing.assert_close(slim.b.bias, model.b.bias + removed)


def test_padded_conv_does_not_fold():
    """A 3x3 conv with zero padding sees the constant only inside the image: inexact."""

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            return self.b(torch.sigmoid(self.a(x)))

    prog = fxprune.compile(Padded().eval(), (torch.randn(1, 3, 6, 6),))
    g = _hidden(prog, "a.weight")
    assert not g.exact and "non-zero constant" in g.reason


def test_shared_consumer_does_not_fold():
    """A module called on two inputs: one bias cannot absorb both calls' constants."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.shared = nn.Linear(6, 3)

        def forward(self, x):
            return self.shared(torch.sigmoid(self.a(x))) + self.shared(self.a(x))

    prog = fxprune.compile(Twice().eval(), (torch.randn(2, 4),))
    g = _hidden(prog, "a.weight")
    assert not g.exact and "non-zero constant" in g.reason


def test_position_dependent_constant_does_not_fold():
    """A zeroed channel plus a per-position parameter is data-independent but not one
    constant: it is not folded."""

    class PosAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.pos = nn.Parameter(torch.randn(1, 1, 5, 5))
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(self.a(x) + self.pos)

    prog = fxprune.compile(PosAdd().eval(), (torch.randn(1, 3, 5, 5),))
    assert not _hidden(prog, "a.weight").exact
    check_equivalence(PosAdd().eval(), (torch.randn(1, 3, 5, 5),), dtype=torch.float64)


class ConstIntoGrouped(nn.Module):
    """pw conv -> sigmoid -> a 3x3 depthwise conv (learnt filters, or a fixed blur buffer)."""

    def __init__(self, fixed: bool):
        super().__init__()
        self.fixed = fixed
        self.a = nn.Conv2d(3, 8, 1)
        if fixed:
            self.register_buffer("blur", torch.rand(8, 1, 3, 3))
        else:
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.sigmoid(self.a(x))
        y = F.conv2d(y, self.blur, padding=1, groups=8) if self.fixed else self.dw(y)
        return self.b(torch.relu(y))


def test_constant_into_a_depthwise_conv_is_exact():
    """A removed depthwise group takes its output with it, and its zeroed filter makes that
    output zero in the full model whatever the input holds: no fold needed, exact."""
    model, x = ConstIntoGrouped(fixed=False).eval(), torch.randn(2, 3, 6, 6)
    prog = fxprune.compile(model, (x,))
    g = _hidden(prog, "a.weight")
    assert g.prunable and g.exact and any(s.param == "dw.weight" for s in g.slices), g
    res = check_equivalence(model, (x,), dtype=torch.float64)
    assert res.max_rel_diff <= 1e-12 and res.slim.dw.groups < 8


def test_constant_into_a_fixed_depthwise_filter_stays_inexact():
    """A blur buffer is not zeroed with the group: 0.5 * sum(filter) would reach the next layer."""
    model, x = ConstIntoGrouped(fixed=True).eval(), torch.randn(2, 3, 6, 6)
    g = _hidden(fxprune.compile(model, (x,)), "a.weight")
    assert not g.exact and "non-zero constant" in g.reason
