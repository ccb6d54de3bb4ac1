"""Exactness and error contracts.

* An op that maps a zeroed channel to a non-zero value (sigmoid, x + 1, BatchNorm without affine,
  softmax, ...) never yields a wrong slim model: either its constant is folded exactly into the
  consumer, or the groups it touches are inexact/frozen with a reason naming the node.
* An op fxprune has no semantics for (a custom leaf module, a ``torch.fx.wrap``-ed function)
  freezes every group it touches and names its node.
* The model's outputs are never pruned.
* Untraceable models raise ``fxprune.TraceError`` with a message that helps; bad inputs raise
  ``fxprune.FxPruneError`` subclasses.
"""
from __future__ import annotations

import inspect
import os
import sys

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxprune  # noqa: E402
from models_zoo_small import (  # noqa: E402
    ConvBNAct,
    Fn,
    Sandwich,
    TokenSandwich,
    assert_exact_or_explained,
    assert_exact_or_frozen,
    assert_frozen_by,
    assert_prunable,
    equiv,
    group_of,
    groups_with,
    image,
    out_shapes,
    probe_nodes,
    randomize_,
    tokens,
)

C = 8


# ----------------------------------------------------------------------------------------------
# ops that map 0 to a non-zero value
# ----------------------------------------------------------------------------------------------

ZERO_TO_CONST = [
    ("sigmoid", lambda: nn.Sigmoid()),
    ("torch.sigmoid", lambda: Fn(torch.sigmoid)),
    ("hardsigmoid", lambda: nn.Hardsigmoid()),
    ("add_scalar", lambda: Fn(lambda x: x + 1.0)),
    ("rsub_scalar", lambda: Fn(lambda x: 2.0 - x)),
    ("exp", lambda: Fn(torch.exp)),
    ("clamp_min_pos", lambda: Fn(lambda x: x.clamp(min=0.5))),
    ("threshold_value", lambda: nn.Threshold(0.1, 2.0)),
    ("batchnorm_no_affine", lambda: nn.BatchNorm2d(C, affine=False)),
    ("softmax_channel", lambda: nn.Softmax(dim=1)),
    ("softmax2d", lambda: nn.Softmax2d()),
    ("softmax_spatial", lambda: nn.Softmax(dim=-1)),  # a zero channel becomes 1/W everywhere
    ("sigmoid_then_maxpool", lambda: nn.Sequential(nn.Sigmoid(), nn.MaxPool2d(2))),
    # count_include_pad turns the constant into a border pattern: no longer a constant
    ("sigmoid_then_avgpool_pad",
     lambda: nn.Sequential(nn.Sigmoid(), nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=True))),
    ("layernorm_spatial_bias", lambda: nn.LayerNorm(8)),  # a zero channel becomes the bias over W
]


@pytest.mark.parametrize("factory", [z[1] for z in ZERO_TO_CONST], ids=[z[0] for z in ZERO_TO_CONST])
@pytest.mark.parametrize("k", [1, 3], ids=["1x1_consumer", "3x3_padded_consumer"])
def test_zero_to_constant_feeding_conv(factory, k):
    # never a wrong model (check_equivalence); exact, or frozen/inexact with a reason
    res = equiv(Sandwich(factory(), k=k), [image()], expect_pruned=False)
    assert_exact_or_frozen(group_of(res.prog, "conv1.weight"), "0 -> c op feeding a conv")


@pytest.mark.parametrize(
    "factory",
    [lambda: nn.Sigmoid(), lambda: nn.Hardsigmoid(), lambda: Fn(lambda x: x + 1.0),
     lambda: nn.BatchNorm2d(C, affine=False), lambda: nn.Softmax(dim=1), lambda: nn.Softmax(dim=-1)],
    ids=["sigmoid", "hardsigmoid", "add_scalar", "batchnorm_no_affine", "softmax_channel",
         "softmax_spatial"],
)
def test_zero_to_constant_reason_names_the_op(factory):
    """A 3x3 padded consumer cannot absorb the constant into its bias; if the group is not kept
    exact, its reason must name the op that turned zero into a constant, not only the consumer."""
    res = equiv(Sandwich(factory(), k=3), [image()], expect_pruned=False)
    names = probe_nodes(res.prog.module)
    assert names
    assert_exact_or_explained(group_of(res.prog, "conv1.weight"), names, "0 -> c op feeding a conv")


@pytest.mark.parametrize(
    "factory",
    [lambda: nn.Sigmoid(), lambda: Fn(lambda x: x + 1.0), lambda: nn.BatchNorm2d(C, affine=False)],
    ids=["sigmoid", "add_scalar", "batchnorm_no_affine"],
)
@pytest.mark.parametrize("consumer", ["flatten_linear", "depthwise", "grouped", "convtranspose",
                                      "strided"])
def test_zero_to_constant_other_consumers(factory, consumer):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, C, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(C)
            self.probe = factory()
            if consumer == "flatten_linear":
                self.next = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(C * 16, 6))
            elif consumer == "depthwise":
                self.next = nn.Sequential(nn.Conv2d(C, C, 3, padding=1, groups=C), nn.ReLU(),
                                          nn.Conv2d(C, 6, 1))
            elif consumer == "grouped":
                self.next = nn.Conv2d(C, 6, 3, padding=1, groups=2)
            elif consumer == "convtranspose":
                self.next = nn.ConvTranspose2d(C, 6, 3, stride=2, padding=1)
            else:
                self.next = nn.Conv2d(C, 6, 2, stride=2)
            self.head = nn.Linear(6, 3) if consumer == "flatten_linear" else nn.Conv2d(6, 3, 1)

        def forward(self, x):
            return self.head(F.relu(self.next(self.probe(self.bn1(self.conv1(x))))))

    res = equiv(M(), [image()], expect_pruned=False)
    assert_exact_or_frozen(group_of(res.prog, "conv1.weight"))


def test_sigmoid_gate_times_zeroed_channel_is_exact_or_explained():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_a = nn.Conv2d(3, C, 3, padding=1)
            self.conv_b = nn.Conv2d(3, C, 3, padding=1)
            self.conv2 = nn.Conv2d(C, 4, 3, padding=1)

        def forward(self, x):
            # sigmoid(0) = 0.5, but it multiplies a channel that is zeroed with it
            return self.conv2(torch.sigmoid(self.conv_a(x)) * self.conv_b(x))

    res = equiv(M(), [image()], expect_pruned=False)
    names = [n.name for n in res.prog.module.graph.nodes if n.op != "placeholder"]
    assert_exact_or_explained(group_of(res.prog, "conv_a.weight"), names)


def test_constant_through_residual_add():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_a = nn.Conv2d(3, C, 3, padding=1)
            self.conv_b = nn.Conv2d(3, C, 3, padding=1)
            self.conv2 = nn.Conv2d(C, 4, 1)

        def forward(self, x):
            y = (self.conv_a(x) + 1.0) + self.conv_b(x)
            return self.conv2(y)

    res = equiv(M(), [image()], expect_pruned=False)
    assert_exact_or_frozen(group_of(res.prog, "conv_a.weight"))


def test_add_of_channel_broadcast_map():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, C, 3, padding=1)
            self.conv_s = nn.Conv2d(3, 1, 3, padding=1)
            self.conv2 = nn.Conv2d(C, 4, 1)

        def forward(self, x):
            # a zeroed channel of conv1 becomes the (input-dependent) map conv_s(x)
            return self.conv2(F.relu(self.conv1(x) + self.conv_s(x)))

    res = equiv(M(), [image()], expect_pruned=False)
    assert_exact_or_frozen(group_of(res.prog, "conv1.weight"))


def test_mean_over_channel_is_not_silently_pruned():
    res = equiv(Sandwich(Fn(lambda x: x - x.mean(1, keepdim=True))), [image()], expect_pruned=False)
    assert_exact_or_explained(group_of(res.prog, "conv1.weight"), probe_nodes(res.prog.module))


def test_channel_count_used_as_a_number():
    # the slim model would divide by a smaller x.size(1) unless fxprune notices
    res = equiv(Sandwich(Fn(lambda x: x.sum(1, keepdim=True) / x.size(1)), c_out=1),
                [image()], expect_pruned=False)
    assert_exact_or_explained(group_of(res.prog, "conv1.weight"), probe_nodes(res.prog.module))


def test_batchnorm_no_affine_folding_exact_when_prunable():
    """BN without affine maps a zero channel to -mean/sqrt(var+eps); when fxprune keeps the group
    prunable it must fold that constant, and the slim model is then smaller and equal."""
    res = equiv(Sandwich(nn.BatchNorm2d(C, affine=False), bn=False, k=1), [image()],
                expect_pruned=False)
    g = group_of(res.prog, "conv1.weight")
    if g.prunable and g.exact:
        assert res.params_slim < res.params_full
    else:
        assert_exact_or_frozen(g)


# ----------------------------------------------------------------------------------------------
# ops fxprune has no semantics for
# ----------------------------------------------------------------------------------------------


class FlipChannels(nn.Module):
    """A custom op: reverses the channel order. Treating it as elementwise would be wrong."""

    def forward(self, x):
        return torch.flip(x, [1]) * 2.0


def opaque_mix(x):
    return x.roll(1, dims=1) + 0.0


def opaque_pair(a, b):
    return a * 0.5 + b.flip(1)


torch.fx.wrap("opaque_mix")
torch.fx.wrap("opaque_pair")


class UnknownNet(nn.Module):
    """conv0 -> ReLU -> conv1 -> probe -> conv2 -> ReLU -> conv3 (output)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv0 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1 = nn.Conv2d(6, C, 3, padding=1)
        self.conv1b = nn.Conv2d(6, C, 3, padding=1)
        self.probe = FlipChannels()
        self.conv2 = nn.Conv2d(C, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = F.relu(self.conv0(x))
        y = self.conv1(x)
        if self.kind == "leaf":
            y = self.probe(y)
        elif self.kind == "wrap":
            y = opaque_mix(y)
        else:
            y = opaque_pair(y, self.conv1b(x))
        return self.conv3(F.relu(self.conv2(y)))


@pytest.mark.parametrize("kind", ["leaf", "wrap", "wrap_two_inputs"])
def test_unknown_op_freezes_touched_groups(kind):
    # frontend="fx": compile's own choice would take torch.export, which sees through a wrapped function
    kw = {"leaf_modules": (FlipChannels,)} if kind == "leaf" else {"frontend": "fx"}
    res = equiv(UnknownNet(kind), [image()], **kw)
    gm = res.prog.module
    if kind == "leaf":
        names = [n.name for n in gm.graph.nodes if n.op == "call_module" and n.target == "probe"]
    else:
        fn = opaque_mix if kind == "wrap" else opaque_pair
        names = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target is fn]
    assert names, "the unknown op is not a single node of the traced graph"
    assert_frozen_by(group_of(res.prog, "conv1.weight"), names, f"input of unknown op ({kind})")
    if kind == "wrap_two_inputs":
        assert_frozen_by(group_of(res.prog, "conv1b.weight"), names, "second input of unknown op")
    # the groups that do not touch it are still pruned
    assert_prunable(group_of(res.prog, "conv0.weight"))
    assert_prunable(group_of(res.prog, "conv2.weight"))


@pytest.mark.parametrize(
    "fn",
    [lambda x: torch.cumsum(x, 1), lambda x: torch.flip(x, [1]), lambda x: x.roll(2, 1),
     lambda x: x.sort(dim=1)[0], lambda x: torch.fft.fft(x, dim=1).real, lambda x: x.cummax(1)[0],
     lambda x: x.index_select(1, torch.arange(7, -1, -1)), lambda x: x.flip(-1).cumsum(-1)],
    ids=["cumsum", "flip", "roll", "sort", "fft", "cummax", "index_select", "spatial_cumsum"],
)
def test_channel_mixing_torch_ops_never_wrong(fn):
    res = equiv(Sandwich(Fn(fn), k=3), [image()], expect_pruned=False)
    assert_exact_or_explained(group_of(res.prog, "conv1.weight"), probe_nodes(res.prog.module))


# ----------------------------------------------------------------------------------------------
# model outputs are never pruned
# ----------------------------------------------------------------------------------------------


class OutputNet(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv1 = ConvBNAct(3, C)
        self.conv2 = nn.Conv2d(C, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(6 * 64, 3)

    def forward(self, x):
        a = self.conv1(x)
        b = self.conv2(a)
        c = self.conv3(F.relu(b))
        if self.kind == "plain":
            return c
        if self.kind == "tuple_with_intermediate":
            return c, a
        if self.kind == "dict_with_intermediate":
            return {"out": c, "feat": b, "nested": [a]}
        if self.kind == "slice":
            return c, b[:, :4]
        if self.kind == "flatten":
            return b.flatten(1), self.fc(F.relu(b).flatten(1))
        if self.kind == "pooled":
            return c, b.mean((2, 3))
        if self.kind == "permuted":
            return b.permute(0, 2, 3, 1)
        if self.kind == "cat":
            return torch.cat([a, c], 1)
        if self.kind == "same_twice":
            return c, c


@pytest.mark.parametrize("kind", ["plain", "tuple_with_intermediate", "dict_with_intermediate",
                                  "slice", "flatten", "pooled", "permuted", "cat", "same_twice"])
def test_outputs_never_pruned(kind):
    model = OutputNet(kind)
    res = equiv(model, [image()], expect_pruned=False)  # also checks output shapes
    gm = res.prog.module
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    flat = []
    torch.fx.node.map_arg(out_node.args[0], flat.append)
    for n in flat:
        for g in res.prog.groups:
            if n.name in g.nodes:
                assert not g.prunable, f"group {g!r} carries output node {n.name} but is prunable"
    # the producer of every returned channel space is frozen
    frozen = {
        "plain": ["conv3.weight"],
        "tuple_with_intermediate": ["conv1.0.weight", "conv3.weight"],
        "dict_with_intermediate": ["conv1.0.weight", "conv2.weight", "conv3.weight"],
        "flatten": ["conv2.weight"],
        "pooled": ["conv2.weight"],
        "permuted": ["conv2.weight"],
        "cat": ["conv1.0.weight", "conv3.weight"],
        "same_twice": ["conv3.weight"],
    }.get(kind, [])
    for p in frozen:
        for g in groups_with(res.prog, p, 0):
            assert not g.prunable, f"{p} reaches the output but its group is prunable: {g!r}"


def test_outputs_keep_channels_after_real_pruning():
    """compile -> zero_ -> construct_subnet by hand: output channel counts are unchanged."""
    model = randomize_(OutputNet("tuple_with_intermediate")).eval()
    x = image()
    prog = fxprune.compile(model, (x,))
    masks = {}
    for g in prog.groups:
        if g.prunable and g.exact and g.size >= 2:
            keep = torch.ones(g.size, dtype=torch.bool)
            keep[: g.size // 2] = False
            masks[g.id] = keep
    assert masks, f"no prunable group: {prog.groups}"
    prog.zero_(masks)
    slim = prog.construct_subnet(verify=True)
    with torch.no_grad():
        assert out_shapes(slim(x)) == out_shapes(model(x))


# ----------------------------------------------------------------------------------------------
# trace errors
# ----------------------------------------------------------------------------------------------


class DataDependentGate(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(c, 1, 1))

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: symbolic tracing cannot take it
            return x * self.scale
        return x


GATE_LINE = inspect.getsourcelines(DataDependentGate.forward)[1] + 1


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = ConvBNAct(C, C)
        self.gate = DataDependentGate(C)

    def forward(self, x):
        return self.gate(self.conv(x))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvBNAct(3, C)
        self.body = Body()
        self.head = nn.Conv2d(C, 4, 1)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def test_trace_error_message():
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.compile(Untraceable(), (image(),))
    msg = str(info.value)
    assert isinstance(info.value, fxprune.FxPruneError)
    assert "body.gate" in msg, f"module path missing: {msg}"
    assert os.path.basename(__file__) in msg and (str(GATE_LINE) in msg or "x.sum() > 0" in msg), (
        f"source line missing (expected line {GATE_LINE}): {msg}"
    )
    assert "leaf_modules" in msg and "concrete_args" in msg, msg


def test_trace_error_fixed_by_leaf_modules():
    res = equiv(Untraceable(), [image()], leaf_modules=[DataDependentGate])
    gm = res.prog.module
    names = [n.name for n in gm.graph.nodes if n.op == "call_module" and n.target == "body.gate"]
    assert names, "the leaf module is not one node"
    # the opaque leaf freezes what flows into it, nothing else
    assert_frozen_by(group_of(res.prog, "body.conv.0.weight"), names)
    assert_prunable(group_of(res.prog, "stem.0.weight"))


class FlagModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = ConvBNAct(3, C)
        self.aux = nn.Conv2d(C, C, 1)
        self.head = nn.Conv2d(C, 4, 1)

    def forward(self, x, use_aux=False):
        y = self.conv1(x)
        if use_aux:
            y = y + self.aux(y)
        return self.head(y)


def test_control_flow_on_argument_needs_concrete_args():
    """A branch on an argument given as an example input cannot be traced: the error says how
    to fix it. Left out of the example inputs, the argument keeps its default."""
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.compile(FlagModel(), (image(), True), frontend="fx")
    assert "concrete_args" in str(info.value) and "use_aux" in str(info.value)
    res = equiv(FlagModel(), [image()], frontend="fx")
    assert not groups_with(res.prog, "aux.weight")


@pytest.mark.parametrize("flag", [False, True])
def test_concrete_args(flag):
    res = equiv(FlagModel(), [image()], concrete_args={"use_aux": flag})
    assert_prunable(group_of(res.prog, "conv1.0.weight"))
    assert bool(groups_with(res.prog, "aux.weight")) == flag


# ----------------------------------------------------------------------------------------------
# bad inputs and misuse
# ----------------------------------------------------------------------------------------------


def _small():
    return Sandwich(nn.ReLU())


@pytest.mark.parametrize(
    "inputs",
    [
        "not a tensor",
        None,
        (),
        (torch.randn(2, 5, 8, 8),),  # wrong channel count
        (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)),  # one input too many
        (torch.randn(3, 8, 8, 8, 8, 8),),  # wrong rank
        ("abc",),
        {},
    ],
    ids=["str", "none", "empty", "wrong_channels", "too_many", "wrong_rank", "str_in_tuple", "empty_dict"],
)
def test_bad_example_inputs(inputs):
    with pytest.raises(fxprune.FxPruneError):
        fxprune.compile(_small(), inputs)


def test_model_not_a_module():
    with pytest.raises(fxprune.FxPruneError):
        fxprune.compile(lambda x: x * 2, (image(),))


def test_zero_with_bad_masks():
    prog = fxprune.compile(randomize_(_small()).eval(), (image(),))
    g = next(g for g in prog.groups if g.prunable)
    with pytest.raises(fxprune.FxPruneError):
        prog.zero_({max(x.id for x in prog.groups) + 100: torch.ones(3, dtype=torch.bool)})
    with pytest.raises(fxprune.FxPruneError):
        prog.zero_({g.id: torch.ones(g.size + 1, dtype=torch.bool)})


def test_construct_without_zeroing_is_identity():
    model = randomize_(_small()).eval()
    x = image()
    prog = fxprune.compile(model, (x,))
    slim = prog.construct_subnet(verify=True)
    n_full = sum(p.numel() for p in model.parameters())
    n_slim = sum(p.numel() for p in slim.parameters())
    assert n_slim == n_full
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x))


def test_inexact_group_fails_verification():
    """A LayerNorm without affine parameters over the channel: the group is inexact (a removed
    channel comes out as ``-mean/std``). If a user forces it (allow_inexact), the verifier must
    catch the difference instead of returning a wrong model."""
    model = randomize_(TokenSandwich(nn.LayerNorm(C, elementwise_affine=False))).eval().double()
    x = tokens().double()
    prog = fxprune.compile(model, (x,))
    g = group_of(prog, "fc1.weight")
    assert not g.exact and g.reason
    prog = fxprune.compile(model, (x,), allow_inexact=True)
    g = group_of(prog, "fc1.weight")
    assert not g.exact
    assert g.prunable, "allow_inexact=True should let an inexact group be pruned"
    keep = torch.ones(g.size, dtype=torch.bool)
    keep[:3] = False
    prog.zero_({g.id: keep})
    with pytest.raises(fxprune.VerificationError):
        prog.construct_subnet(verify=True)


def test_slim_model_that_fails_to_run_raises_verification_error():
    """A rewritten graph that raises when run (e.g. a channel-count constant left stale)
    surfaces as fxprune.VerificationError from the check, not as a bare RuntimeError."""
    from fxprune.program import max_output_difference

    x = torch.randn(1, 3, 8, 8)
    full, broken = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(2, 4, 1)  # expects 2 channels
    with pytest.raises(fxprune.VerificationError, match="fails on the example inputs"):
        max_output_difference(full, broken, (x,))
