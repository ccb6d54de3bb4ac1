"""Hand-written hard cases, at least one per supported op.

Each test builds a tiny model around the op, zeroes a random 30-50% of every prunable group
(``fxprune.testing.check_equivalence``), constructs the slim model and compares it with the
zeroed full model in float64. Where the op preserves zeros and is channel-wise, the group that
flows through it must also be prunable, so the test fails if the op silently freezes the graph.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from models_zoo_small import (  # noqa: E402
    BN,
    CONV,
    CONVT,
    ConvBNAct,
    Fn,
    Sandwich,
    SEConv,
    SELinear,
    ShuffleConst,
    ShuffleV2Block,
    TinyDenseNet,
    TinyResNet,
    TinyUNet,
    TokenSandwich,
    assert_exact_or_explained,
    assert_exact_or_frozen,
    assert_prunable,
    channel_shuffle_dynamic,
    equiv,
    group_of,
    groups_with,
    image,
    probe_nodes,
    tokens,
)

C = 8  # channels flowing through the probe in Sandwich models


def probe_check(res, zero_preserving: bool, param: str = "conv1.weight", dim: int = 0):
    """The group produced by ``param`` that flows through ``probe``: prunable for a
    zero-preserving op, otherwise exact (verified by check_equivalence) or frozen with a reason.
    (That the reason names the op is checked in test_exactness.py.)"""
    g = group_of(res.prog, param, dim)
    if zero_preserving:
        assert_prunable(g, "group through a zero-preserving op")
    else:
        assert_exact_or_frozen(g, "group through an op with f(0) != 0")
    return g


# ----------------------------------------------------------------------------------------------
# convolutions
# ----------------------------------------------------------------------------------------------


class ConvChain(nn.Module):
    """conv(3->8) -> BN -> ReLU -> conv(8 -> c_mid, groups) -> BN -> ReLU -> conv(c_mid -> 4)."""

    def __init__(self, dims=2, bias=True, groups=1, c_mid=8, stride=1, dilation=1):
        super().__init__()
        self.conv1 = CONV[dims](3, 8, 3, padding=1, bias=bias)
        self.bn1 = BN[dims](8)
        self.conv2 = CONV[dims](8, c_mid, 3, padding=dilation, groups=groups, bias=bias,
                                stride=stride, dilation=dilation)
        self.bn2 = BN[dims](c_mid)
        self.conv3 = CONV[dims](c_mid, 4, 1, bias=bias)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.conv3(x)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv_plain(dims, bias):
    res = equiv(ConvChain(dims, bias), [image(dims)])
    assert_prunable(group_of(res.prog, "conv1.weight"))
    assert_prunable(group_of(res.prog, "conv2.weight"))
    # the model's output channels are never touched
    assert all(not g.prunable for g in groups_with(res.prog, "conv3.weight", 0))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(
    "groups,c_mid",
    [(2, 8), (4, 12), (8, 8), (8, 16), (8, 24)],
    ids=["grouped2", "grouped4", "depthwise", "depthwise_x2", "depthwise_x3"],
)
def test_conv_grouped_and_depthwise(dims, groups, c_mid):
    res = equiv(ConvChain(dims, True, groups=groups, c_mid=c_mid), [image(dims)])
    g1 = group_of(res.prog, "conv1.weight")
    assert_prunable(g1, "input side of a grouped/depthwise conv")
    if groups == 8:
        # depthwise: input channel i and its multiplier outputs are one channel of one group
        g2 = groups_with(res.prog, "conv2.weight", 0)
        assert g2 and g2[0].id == g1.id, "depthwise conv must tie its in- and out-channels"
        assert g1.size == 8


def test_conv_strided_dilated():
    equiv(ConvChain(2, True, stride=2, dilation=2), [image(2)])


def test_conv_padding_modes():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
            self.c2 = nn.Conv2d(8, 6, 3, padding=1, padding_mode="circular")
            self.c3 = nn.Conv2d(6, 4, 3, padding="same", padding_mode="replicate")

        def forward(self, x):
            return self.c3(F.relu(self.c2(F.relu(self.c1(x)))))

    res = equiv(M(), [image()])
    assert_prunable(group_of(res.prog, "c1.weight"))
    assert_prunable(group_of(res.prog, "c2.weight"))


class ConvTChain(nn.Module):
    def __init__(self, dims=2, groups=1, bias=True):
        super().__init__()
        self.conv1 = CONV[dims](3, 8, 3, padding=1)
        self.up = CONVT[dims](8, 6, 2, stride=2, groups=groups, bias=bias)
        self.bn = BN[dims](6)
        self.conv2 = CONV[dims](6, 4, 1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        return self.conv2(F.relu(self.bn(self.up(x))))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose(dims, groups):
    res = equiv(ConvTChain(dims, groups), [image(dims)])
    g_in = group_of(res.prog, "conv1.weight")
    assert_prunable(g_in, "input side of ConvTranspose")
    if groups == 1:
        # ConvTranspose weight is (in, out/groups, k...): its out-channels live on dim 1
        assert_prunable(group_of(res.prog, "up.weight", 1), "output side of ConvTranspose")


def test_functional_conv():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3))
            self.b1 = nn.Parameter(torch.randn(8))
            self.conv2 = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
            return self.conv2(x)

    res = equiv(M(), [image()])
    assert_prunable(group_of(res.prog, "w1", 0))


# ----------------------------------------------------------------------------------------------
# linear and embedding
# ----------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(10, 16, bias=bias)
        self.fc2 = nn.Linear(16, 12, bias=bias)
        self.fc3 = nn.Linear(12, 3, bias=bias)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(F.relu(self.fc1(x)))))


@pytest.mark.parametrize("shape", [(2, 10), (2, 5, 10), (2, 3, 4, 10)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear(shape, bias):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    res = equiv(MLP(bias), [x])
    assert_prunable(group_of(res.prog, "fc1.weight"))
    assert_prunable(group_of(res.prog, "fc2.weight"))


def test_functional_linear():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(12, 10))
            self.b = nn.Parameter(torch.randn(12))
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            return self.fc(F.relu(F.linear(x, self.w, self.b)))

    res = equiv(M(), [tokens()])
    assert_prunable(group_of(res.prog, "w", 0))


class EmbNet(nn.Module):
    def __init__(self, functional=False):
        super().__init__()
        self.functional = functional
        self.emb = nn.Embedding(20, 16, padding_idx=0)
        self.fc1 = nn.Linear(16, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, ids):
        e = F.embedding(ids, self.emb.weight) if self.functional else self.emb(ids)
        return self.fc2(F.relu(self.fc1(e))).mean(1)


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_embedding(functional):
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    res = equiv(EmbNet(functional), [ids])
    # the embedding width is its weight's dim 1
    assert_prunable(group_of(res.prog, "emb.weight", 1), "embedding width")


class LengthwiseAggregate(nn.Module):
    """CoaT's class-token aggregation: three tokens of a width-C stream, stacked on dim 1, mixed
    by a ``Conv1d(3, 1, 1)`` whose length dim is the stream's channels, then a linear head."""

    def __init__(self, bias: bool, functional: bool):
        super().__init__()
        self.functional = functional
        self.fc = nn.Linear(10, C)
        self.ln = nn.LayerNorm(C)
        self.aggregate = nn.Conv1d(3, 1, 1, bias=bias)
        self.head = nn.Linear(C, 4)

    def forward(self, x):
        h = self.ln(self.fc(x))[:, :3]  # (B, 3, C)
        if self.functional:
            h = F.conv1d(h, self.aggregate.weight, self.aggregate.bias)
        else:
            h = self.aggregate(h)
        return self.head(h.squeeze(1))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_pointwise_conv_along_channels(bias, functional):
    """A 1-wide kernel keeps positions apart: the stream's channels go through the conv's length
    dim; a removed one is zero there, or the conv's bias, which the head folds into its own."""
    res = equiv(LengthwiseAggregate(bias, functional), [tokens()])
    g = group_of(res.prog, "fc.weight")
    assert_prunable(g, "stream through a pointwise conv's length dim")
    assert "ln.weight" in g.params and "head.weight" in {s.param for s in g.dependents}, repr(g)
    assert res.slim.get_submodule("head").in_features < C


class TiedEmbeddingLM(nn.Module):
    """A token table read twice: ``F.embedding`` (its columns are the stream's channels) and a
    tied output head ``F.linear(h, table)`` (the same columns read as input channels); the
    stream is normalised by LayerNorms, so a removed channel must be exactly zero in it.
    ``consumer_first``: the head's read of the table comes first in the graph."""

    def __init__(self, consumer_first: bool):
        super().__init__()
        self.consumer_first = consumer_first
        self.emb = nn.Embedding(20, C)
        self.aux = nn.Linear(4, C)
        self.ln1 = nn.LayerNorm(C)
        self.fc = nn.Linear(C, C)
        self.ln2 = nn.LayerNorm(C)

    def forward(self, ids, feats):
        table = self.emb.weight
        early = F.linear(self.aux(feats), table) if self.consumer_first else 0
        h = F.embedding(ids, table)
        h = h + self.fc(F.relu(self.ln1(h)))
        return F.linear(self.ln2(h), table).mean(1) + early


@pytest.mark.parametrize("consumer_first", [False, True], ids=["embedding_first", "head_first"])
def test_tied_embedding_and_output_head(consumer_first):
    """The table's columns are produced by the embedding and consumed by the tied head: they
    stay a producer (zeroed with the stream's channels) whichever read comes first, so the
    LayerNorm-normalised stream is exact."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (2, 5), generator=gen)
    feats = torch.randn(2, 4, generator=gen)
    res = equiv(TiedEmbeddingLM(consumer_first), [ids, feats])
    g = group_of(res.prog, "emb.weight", 1)
    assert_prunable(g, "tied embedding width")
    assert "emb.weight" in {s.param for s in g.slices if s.dim == 1}, repr(g)
    assert {"ln1.weight", "ln2.weight", "fc.weight"} <= set(g.params), repr(g)  # fc: its output rows


# ----------------------------------------------------------------------------------------------
# normalization
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_batchnorm(dims):
    res = equiv(Sandwich(nn.ReLU(), dims=dims, k=3), [image(dims)])
    g = group_of(res.prog, "conv1.weight")
    assert_prunable(g)
    assert g.id == group_of(res.prog, "bn1.weight").id == group_of(res.prog, "bn1.bias").id


def test_batchnorm1d_on_features():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(10, 12)
            self.bn = nn.BatchNorm1d(12)
            self.fc2 = nn.Linear(12, 3)

        def forward(self, x):
            return self.fc2(F.relu(self.bn(self.fc1(x))))

    res = equiv(M(), [torch.randn(4, 10)])
    assert_prunable(group_of(res.prog, "fc1.weight"))


def test_functional_batchnorm():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.weight = nn.Parameter(torch.ones(8))
            self.bias = nn.Parameter(torch.zeros(8))
            self.register_buffer("rm", torch.randn(8))
            self.register_buffer("rv", torch.rand(8) + 0.5)
            self.conv2 = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            x = F.batch_norm(self.conv1(x), self.rm, self.rv, self.weight, self.bias, False)
            return self.conv2(F.relu(x))

    res = equiv(M(), [image()], expect_pruned=False)
    g = group_of(res.prog, "conv1.weight")
    # the running mean maps a zero channel to a constant: zeroing weight and bias fixes it
    assert_exact_or_explained(g, ["batch_norm"], "F.batch_norm")


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_instancenorm(dims, affine):
    norm = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims](C, affine=affine)
    res = equiv(Sandwich(norm, dims=dims, bn=False), [image(dims)])
    probe_check(res, True)


def test_functional_instance_norm():
    res = equiv(Sandwich(Fn(lambda x: F.instance_norm(x)), bn=False), [image()])
    probe_check(res, True)


@pytest.mark.parametrize("num_groups,channels", [(4, 8), (2, 12), (8, 8), (3, 12)])
def test_groupnorm_without_affine_whole_groups(num_groups, channels):
    """Without an affine weight a removed channel would output its group's ``-mean/std``:
    only whole groups go, and the slim GroupNorm keeps channels per group with fewer groups."""
    res = equiv(Sandwich(nn.GroupNorm(num_groups, channels, affine=False), c_in=channels, bn=False), [image()])
    g = probe_check(res, True)
    per = channels // num_groups
    # one channel of the fxprune group is one whole GroupNorm group
    assert g.size == num_groups, f"GroupNorm({num_groups}, {channels}) gave a group of size {g.size}"
    for s in list(g.slices) + list(g.dependents):
        if s.param == "conv1.weight":
            for c in range(g.size):
                idx = sorted(s.indices_of(c).tolist())
                assert len(idx) == per, (s, c, idx)
                assert idx == list(range(idx[0], idx[0] + per)), f"{s}: channel {c} owns {idx}"
    gn = res.slim.get_submodule("probe")
    assert isinstance(gn, nn.GroupNorm) and gn.num_channels // gn.num_groups == per
    assert gn.num_groups < num_groups if num_groups >= 3 else gn.num_groups <= num_groups


@pytest.mark.parametrize("num_groups,channels", [(4, 8), (2, 12), (3, 12)])
def test_groupnorm_channels_go_alone(num_groups, channels):
    """With an affine weight each channel is its own: groups lose channels unevenly and the
    slim norm divides each group's statistics by its full count."""
    from fxprune.modules import CountPreservingGroupNorm

    res = equiv(Sandwich(nn.GroupNorm(num_groups, channels), c_in=channels, bn=False), [image()])
    g = probe_check(res, True)
    assert g.size == channels and g.exact, repr(g)
    assert isinstance(res.slim.get_submodule("probe"), CountPreservingGroupNorm)


def test_groupnorm_whole_groups_keep_a_stock_module():
    """Channels removed in whole groups leave a stock GroupNorm with fewer groups."""
    model = Sandwich(nn.GroupNorm(4, 8), bn=False).eval()
    prog = fxprune.compile(model, (image(),))
    g = group_of(prog, "conv1.weight")
    keep = np.ones(g.size, bool)
    keep[[2, 3, 6, 7]] = False  # groups 1 and 3
    prog.zero_({g.id: keep})
    gn = prog.construct_subnet().get_submodule("probe")
    assert type(gn) is nn.GroupNorm and (gn.num_groups, gn.num_channels) == (2, 4)


def test_functional_group_norm():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.w = nn.Parameter(torch.ones(8))
            self.b = nn.Parameter(torch.zeros(8))
            self.conv2 = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.conv2(F.group_norm(self.conv1(x), 4, self.w, self.b))

    res = equiv(M(), [image()])
    g = group_of(res.prog, "conv1.weight")
    assert g.prunable and g.exact and g.size == 8, repr(g)
    assert "group_norm_full_count" in res.slim.code


def test_layernorm_over_channel_is_exact():
    """A LayerNorm over the channel: a removed channel is zero at its input, and the slim
    LayerNorm divides by the full width."""
    from fxprune.modules import CountPreservingLayerNorm

    res = equiv(TokenSandwich(nn.LayerNorm(C)), [tokens()])
    g = group_of(res.prog, "fc1.weight")
    assert_prunable(g)
    assert {s.param for s in g.slices} >= {"probe.weight", "probe.bias"}
    ln = res.slim.get_submodule("probe")
    assert isinstance(ln, CountPreservingLayerNorm) and ln.full_size == C and ln.normalized_shape[0] < C
    assert_prunable(group_of(res.prog, "fc2.weight"))


def test_layernorm_without_affine_over_channel_is_inexact():
    """Without an affine weight a removed channel leaves the LayerNorm as ``-mean/std``, which
    the next layer reads: inexact, with the reason naming the norm."""
    res = equiv(TokenSandwich(nn.LayerNorm(C, elementwise_affine=False)), [tokens()])
    g = group_of(res.prog, "fc1.weight")
    assert not g.exact and not g.prunable and "probe" in g.reason, repr(g)
    assert_prunable(group_of(res.prog, "fc2.weight"))


def test_layernorm_channels_last_convnext_style():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, C, 3, padding=1)
            self.probe = nn.LayerNorm(C)
            self.pw1 = nn.Linear(C, 12)
            self.pw2 = nn.Linear(12, C)
            self.conv2 = nn.Conv2d(C, 4, 1)

        def forward(self, x):
            x = self.conv1(x)
            y = x.permute(0, 2, 3, 1)
            y = self.pw2(F.gelu(self.pw1(self.probe(y))))
            return self.conv2(x + y.permute(0, 3, 1, 2))

    res = equiv(M(), [image()])
    assert_prunable(group_of(res.prog, "conv1.weight"))
    assert_prunable(group_of(res.prog, "pw1.weight"))


@pytest.mark.parametrize(
    "norm",
    [
        lambda: nn.LayerNorm(8, elementwise_affine=False),
        lambda: nn.LayerNorm(8, bias=False),
        lambda: nn.LayerNorm([8, 8], elementwise_affine=False),
        lambda: Fn(lambda x: F.layer_norm(x, (8,))),
    ],
    ids=["no_affine", "no_bias", "HW", "functional"],
)
def test_layernorm_over_spatial_dims(norm):
    res = equiv(Sandwich(norm()), [image()])
    probe_check(res, True)


def test_layernorm_over_spatial_with_bias():
    # a bias over W maps a zero channel to that bias: exact only if handled
    res = equiv(Sandwich(nn.LayerNorm(8)), [image()], expect_pruned=False)
    probe_check(res, False)


def test_localresponsenorm():
    # LRN divides by a sum over neighbouring channels: removing a zero channel shifts windows
    res = equiv(Sandwich(nn.LocalResponseNorm(3)), [image()], expect_pruned=False)
    probe_check(res, False)


# ----------------------------------------------------------------------------------------------
# activations
# ----------------------------------------------------------------------------------------------

# (id, probe factory, zero-preserving elementwise?)
ACTIVATIONS = [
    ("ReLU", lambda: nn.ReLU(), True),
    ("ReLU_inplace", lambda: nn.ReLU(inplace=True), True),
    ("ReLU6", lambda: nn.ReLU6(), True),
    ("LeakyReLU", lambda: nn.LeakyReLU(0.1), True),
    ("PReLU_C", lambda: nn.PReLU(C), True),
    ("PReLU_1", lambda: nn.PReLU(), True),
    ("ELU", lambda: nn.ELU(), True),
    ("SELU", lambda: nn.SELU(), True),
    ("CELU", lambda: nn.CELU(0.7), True),
    ("GELU", lambda: nn.GELU(), True),
    ("GELU_tanh", lambda: nn.GELU("tanh"), True),
    ("SiLU", lambda: nn.SiLU(), True),
    ("Mish", lambda: nn.Mish(), True),
    ("Hardswish", lambda: nn.Hardswish(), True),
    ("Hardtanh", lambda: nn.Hardtanh(-0.5, 2.0), True),
    ("Tanh", lambda: nn.Tanh(), True),
    ("Softsign", lambda: nn.Softsign(), True),
    ("Softshrink", lambda: nn.Softshrink(0.3), True),
    ("Hardshrink", lambda: nn.Hardshrink(0.3), True),
    ("Tanhshrink", lambda: nn.Tanhshrink(), True),
    ("Threshold_neg", lambda: nn.Threshold(-0.1, 5.0), True),
    ("Threshold_zero_value", lambda: nn.Threshold(0.2, 0.0), True),
    ("RReLU", lambda: nn.RReLU(), True),
    ("Identity", lambda: nn.Identity(), True),
    ("Sigmoid", lambda: nn.Sigmoid(), False),
    ("Hardsigmoid", lambda: nn.Hardsigmoid(), False),
    ("Softplus", lambda: nn.Softplus(), False),
    ("LogSigmoid", lambda: nn.LogSigmoid(), False),
    ("Threshold_pos", lambda: nn.Threshold(0.1, 2.0), False),
    ("Softmax_channel", lambda: nn.Softmax(dim=1), False),
    ("Softmax_spatial", lambda: nn.Softmax(dim=-1), False),
    ("LogSoftmax_channel", lambda: nn.LogSoftmax(dim=1), False),
    ("LogSoftmax_spatial", lambda: nn.LogSoftmax(dim=2), False),
    ("Softmin_channel", lambda: nn.Softmin(dim=1), False),
    ("Softmin_spatial", lambda: nn.Softmin(dim=3), False),
    ("Softmax2d", lambda: nn.Softmax2d(), False),
    # functional forms
    ("F.relu", lambda: Fn(F.relu), True),
    ("F.relu_inplace", lambda: Fn(lambda x: F.relu(x, inplace=True)), True),
    ("F.relu_", lambda: Fn(F.relu_), True),
    ("torch.relu", lambda: Fn(torch.relu), True),
    ("F.relu6", lambda: Fn(F.relu6), True),
    ("F.leaky_relu", lambda: Fn(lambda x: F.leaky_relu(x, 0.2)), True),
    ("F.elu", lambda: Fn(F.elu), True),
    ("F.selu", lambda: Fn(F.selu), True),
    ("torch.selu", lambda: Fn(torch.selu), True),
    ("F.celu", lambda: Fn(lambda x: F.celu(x, 1.5)), True),
    ("F.gelu", lambda: Fn(F.gelu), True),
    ("F.gelu_tanh", lambda: Fn(lambda x: F.gelu(x, approximate="tanh")), True),
    ("F.silu", lambda: Fn(F.silu), True),
    ("F.mish", lambda: Fn(F.mish), True),
    ("F.hardswish", lambda: Fn(F.hardswish), True),
    ("F.hardtanh", lambda: Fn(lambda x: F.hardtanh(x, -2.0, 1.0)), True),
    ("torch.tanh", lambda: Fn(torch.tanh), True),
    ("F.tanh", lambda: Fn(F.tanh), True),
    ("F.softsign", lambda: Fn(F.softsign), True),
    ("F.softshrink", lambda: Fn(lambda x: F.softshrink(x, 0.2)), True),
    ("F.hardshrink", lambda: Fn(lambda x: F.hardshrink(x, 0.2)), True),
    ("F.tanhshrink", lambda: Fn(F.tanhshrink), True),
    ("F.threshold", lambda: Fn(lambda x: F.threshold(x, -0.1, 3.0)), True),
    ("F.rrelu_eval", lambda: Fn(lambda x: F.rrelu(x, training=False)), True),
    ("torch.clamp", lambda: Fn(lambda x: torch.clamp(x, 0.0, 6.0)), True),
    ("torch.clamp_min", lambda: Fn(lambda x: torch.clamp_min(x, 0.0)), True),
    ("F.sigmoid", lambda: Fn(F.sigmoid), False),
    ("torch.sigmoid", lambda: Fn(torch.sigmoid), False),
    ("F.hardsigmoid", lambda: Fn(F.hardsigmoid), False),
    ("F.softplus", lambda: Fn(lambda x: F.softplus(x, beta=2.0)), False),
    ("F.logsigmoid", lambda: Fn(F.logsigmoid), False),
    ("F.softmax_channel", lambda: Fn(lambda x: F.softmax(x, dim=1)), False),
    ("F.softmax_spatial", lambda: Fn(lambda x: F.softmax(x, dim=-1)), False),
    ("torch.softmax_channel", lambda: Fn(lambda x: torch.softmax(x, 1)), False),
    ("F.log_softmax_channel", lambda: Fn(lambda x: F.log_softmax(x, dim=1)), False),
    ("F.softmin_channel", lambda: Fn(lambda x: F.softmin(x, dim=1)), False),
    ("swish_expr", lambda: Fn(lambda x: x * torch.sigmoid(x)), True),
    # tensor-method forms
    ("x.relu", lambda: Fn(lambda x: x.relu()), True),
    ("x.relu_", lambda: Fn(lambda x: x.relu_()), True),
    ("x.tanh", lambda: Fn(lambda x: x.tanh()), True),
    ("x.clamp", lambda: Fn(lambda x: x.clamp(min=0.0, max=6.0)), True),
    ("x.clamp_min", lambda: Fn(lambda x: x.clamp_min(0.0)), True),
    ("x.clip", lambda: Fn(lambda x: x.clip(-1.0, 1.0)), True),
    ("x.sigmoid", lambda: Fn(lambda x: x.sigmoid()), False),
    ("x.softmax_channel", lambda: Fn(lambda x: x.softmax(1)), False),
    ("x.log_softmax_spatial", lambda: Fn(lambda x: x.log_softmax(-1)), False),
]


@pytest.mark.parametrize("factory,zero_preserving", [a[1:] for a in ACTIVATIONS],
                         ids=[a[0] for a in ACTIVATIONS])
def test_activation(factory, zero_preserving):
    # a 3x3 padded consumer: a constant left by f(0) != 0 cannot simply go into its bias
    res = equiv(Sandwich(factory(), k=3), [image()], expect_pruned=zero_preserving)
    probe_check(res, zero_preserving)


def test_activation_table_covers_torch_nn_activation():
    covered = {a[0].split("_")[0] for a in ACTIVATIONS}
    covered |= {"GLU", "MultiheadAttention"}  # tested below
    import torch.nn.modules.activation as act

    missing = [name for name in act.__all__ if name not in covered]
    assert not missing, f"activations without a test: {missing}"


@pytest.mark.parametrize(
    "probe",
    [lambda: nn.GLU(dim=1), lambda: Fn(lambda x: F.glu(x, 1)), lambda: Fn(lambda x: F.glu(x, dim=-3))],
    ids=["module", "functional", "negdim"],
)
def test_glu_over_channels(probe):
    # GLU halves the channels: out[i] = a[i] * sigmoid(b[i]) with a = x[:, :4], b = x[:, 4:]
    res = equiv(Sandwich(probe(), c_in=C, c_out=C // 2), [image()])
    g = probe_check(res, True)
    assert g.size == C // 2, f"GLU channel i ties a[i] and b[i]: expected 4 channels, got {g!r}"


def test_glu_over_spatial():
    res = equiv(Sandwich(nn.GLU(dim=-1), k=1), [image()])
    # a zero channel: 0 * sigmoid(0) = 0 -> zero-preserving
    probe_check(res, True)


def test_multihead_attention():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(10, 8)
            self.probe = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc2 = nn.Linear(8, 6)
            self.fc3 = nn.Linear(6, 3)

        def forward(self, x):
            x = self.fc1(x)
            y, _ = self.probe(x, x, x, need_weights=False)
            return self.fc3(F.relu(self.fc2(y + x)))

    res = equiv(M(), [tokens()])
    assert_prunable(group_of(res.prog, "fc2.weight"))


# ----------------------------------------------------------------------------------------------
# dropout, pooling, resampling
# ----------------------------------------------------------------------------------------------

DROPOUTS = [
    ("Dropout", 2, lambda: nn.Dropout(0.5)),
    ("Dropout1d", 1, lambda: nn.Dropout1d(0.5)),
    ("Dropout2d", 2, lambda: nn.Dropout2d(0.5)),
    ("Dropout3d", 3, lambda: nn.Dropout3d(0.5)),
    ("AlphaDropout", 2, lambda: nn.AlphaDropout(0.5)),
    ("FeatureAlphaDropout", 2, lambda: nn.FeatureAlphaDropout(0.5)),
    ("F.dropout", 2, lambda: FDrop(F.dropout)),
    ("F.dropout1d", 1, lambda: FDrop(F.dropout1d)),
    ("F.dropout2d", 2, lambda: FDrop(F.dropout2d)),
    ("F.dropout3d", 3, lambda: FDrop(F.dropout3d)),
    ("F.alpha_dropout", 2, lambda: FDrop(F.alpha_dropout)),
    ("F.feature_alpha_dropout", 2, lambda: FDrop(F.feature_alpha_dropout)),
    ("torch.dropout", 2, lambda: FDrop(torch.dropout)),
]


class FDrop(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x, 0.5, self.training)


@pytest.mark.parametrize("dims,factory", [d[1:] for d in DROPOUTS], ids=[d[0] for d in DROPOUTS])
def test_dropout(dims, factory):
    res = equiv(Sandwich(factory(), dims=dims), [image(dims)])
    probe_check(res, True)


POOLS = [
    (1, lambda: nn.MaxPool1d(2)), (2, lambda: nn.MaxPool2d(2)), (3, lambda: nn.MaxPool3d(2)),
    (2, lambda: nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)),
    (1, lambda: nn.AvgPool1d(2)), (2, lambda: nn.AvgPool2d(2)), (3, lambda: nn.AvgPool3d(2)),
    (2, lambda: nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)),
    (1, lambda: nn.AdaptiveAvgPool1d(4)), (2, lambda: nn.AdaptiveAvgPool2d((3, 2))),
    (3, lambda: nn.AdaptiveAvgPool3d(1)),
    (1, lambda: nn.AdaptiveMaxPool1d(4)), (2, lambda: nn.AdaptiveMaxPool2d(3)),
    (3, lambda: nn.AdaptiveMaxPool3d(2)),
    (1, lambda: nn.LPPool1d(2, 2)), (2, lambda: nn.LPPool2d(2, 2)),
    (1, lambda: Fn(lambda x: F.max_pool1d(x, 2))), (2, lambda: Fn(lambda x: F.max_pool2d(x, 2, 2))),
    (3, lambda: Fn(lambda x: F.max_pool3d(x, 2))),
    (1, lambda: Fn(lambda x: F.avg_pool1d(x, 2))), (2, lambda: Fn(lambda x: F.avg_pool2d(x, 2))),
    (3, lambda: Fn(lambda x: F.avg_pool3d(x, 2))),
    (1, lambda: Fn(lambda x: F.adaptive_avg_pool1d(x, 3))),
    (2, lambda: Fn(lambda x: F.adaptive_avg_pool2d(x, 1))),
    (3, lambda: Fn(lambda x: F.adaptive_avg_pool3d(x, 2))),
    (1, lambda: Fn(lambda x: F.adaptive_max_pool1d(x, 3))),
    (2, lambda: Fn(lambda x: F.adaptive_max_pool2d(x, (2, 4)))),
    (3, lambda: Fn(lambda x: F.adaptive_max_pool3d(x, 1))),
    (2, lambda: Fn(lambda x: torch.max_pool2d(x, 2))),
]


@pytest.mark.parametrize("dims,factory", POOLS, ids=[f"{i}" for i in range(len(POOLS))])
def test_pooling(dims, factory):
    res = equiv(Sandwich(factory(), dims=dims), [image(dims)])
    probe_check(res, True)


RESAMPLE = [
    (2, lambda: nn.Upsample(scale_factor=2)),
    (2, lambda: nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)),
    (2, lambda: nn.Upsample(size=(5, 7), mode="bicubic", align_corners=True)),
    (2, lambda: nn.UpsamplingNearest2d(scale_factor=2)),
    (2, lambda: nn.UpsamplingBilinear2d(scale_factor=2)),
    (1, lambda: nn.Upsample(scale_factor=2, mode="linear")),
    (3, lambda: nn.Upsample(scale_factor=2, mode="trilinear")),
    (2, lambda: Fn(lambda x: F.interpolate(x, scale_factor=2, mode="nearest"))),
    (2, lambda: Fn(lambda x: F.interpolate(x, size=(6, 6), mode="bilinear", align_corners=False))),
    (2, lambda: Fn(lambda x: F.interpolate(x, size=(4, 4), mode="area"))),
    (2, lambda: Fn(lambda x: F.interpolate(x, scale_factor=0.5, mode="nearest-exact"))),
    (1, lambda: Fn(lambda x: F.interpolate(x, size=10, mode="nearest"))),
]


@pytest.mark.parametrize("dims,factory", RESAMPLE, ids=[f"{i}" for i in range(len(RESAMPLE))])
def test_interpolate(dims, factory):
    res = equiv(Sandwich(factory(), dims=dims), [image(dims)])
    probe_check(res, True)


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_pixel_shuffle(functional):
    probe = Fn(lambda x: F.pixel_shuffle(x, 2)) if functional else nn.PixelShuffle(2)
    res = equiv(Sandwich(probe, c_in=16, c_out=4, k=3), [image()])
    g = probe_check(res, True)
    # an output channel of the shuffle is 4 consecutive input channels: they go together
    assert g.size == 4, g
    for s in g.slices:
        if s.param == "conv1.weight":
            for c in range(g.size):
                assert sorted(s.indices_of(c).tolist()) == list(range(4 * c, 4 * c + 4))


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_pixel_unshuffle(functional):
    probe = Fn(lambda x: F.pixel_unshuffle(x, 2)) if functional else nn.PixelUnshuffle(2)
    res = equiv(Sandwich(probe, c_in=4, c_out=16, k=3), [image()])
    g = probe_check(res, True)
    assert g.size == 4, g


def test_pixel_shuffle_then_unshuffle():
    probe = nn.Sequential(nn.PixelShuffle(2), nn.ReLU(), nn.PixelUnshuffle(2))
    res = equiv(Sandwich(probe, c_in=16, c_out=16), [image()])
    probe_check(res, True)


# ----------------------------------------------------------------------------------------------
# arithmetic and broadcasting
# ----------------------------------------------------------------------------------------------


class TwoBranch(nn.Module):
    """a = conv_a(x), b = conv_b(x) (C channels each); y = probe(a, b); conv_out(relu(y))."""

    def __init__(self, probe, c_out=C, b_channels=C):
        super().__init__()
        self.conv_a = nn.Conv2d(3, C, 3, padding=1)
        self.conv_b = nn.Conv2d(3, b_channels, 3, padding=1)
        self.probe = probe
        self.conv_out = nn.Conv2d(c_out, 4, 3, padding=1)

    def forward(self, x):
        return self.conv_out(F.relu(self.probe(self.conv_a(x), self.conv_b(x))))


BINARY = [
    ("add", lambda a, b: a + b, True),
    ("radd_chain", lambda a, b: b + a + a, True),
    ("sub", lambda a, b: a - b, True),
    ("torch.add_alpha", lambda a, b: torch.add(a, b, alpha=2.0), True),
    ("torch.sub", lambda a, b: torch.sub(a, b), True),
    ("method_add", lambda a, b: a.add(b), True),
    ("method_sub", lambda a, b: a.sub(b), True),
    ("mul", lambda a, b: a * b, True),
    ("torch.mul", lambda a, b: torch.mul(a, b), True),
    ("method_mul", lambda a, b: a.mul(b), True),
    ("neg", lambda a, b: -a + b, True),
    ("scalar_mul", lambda a, b: 2.0 * a + b * 0.5, True),
    ("scalar_div", lambda a, b: a / 2.0 - b.div(4.0), True),
    ("torch.div_scalar", lambda a, b: torch.div(a, 3.0) + b, True),
    ("int_mul", lambda a, b: a * 3 + b, True),
    ("iadd", None, True),
    ("addcmul", lambda a, b: torch.addcmul(a, a, b, value=0.5), False),
    ("div_by_safe_tensor", lambda a, b: a / (b.abs() + 1.0), False),
    ("div_by_tensor", lambda a, b: a / b, False),
    ("maximum", lambda a, b: torch.maximum(a, b), False),
    ("where_gt", lambda a, b: torch.where(a > 0, a, b), False),
]


class IAdd(nn.Module):
    def forward(self, a, b):
        a = a * 1.0
        a += b
        return a


@pytest.mark.parametrize("fn,zero_preserving", [b[1:] for b in BINARY], ids=[b[0] for b in BINARY])
def test_binary_op(fn, zero_preserving):
    probe = IAdd() if fn is None else Fn(fn)
    res = equiv(TwoBranch(probe), [image()], expect_pruned=zero_preserving)
    ga = group_of(res.prog, "conv_a.weight")
    gb = group_of(res.prog, "conv_b.weight")
    if zero_preserving:
        assert_prunable(ga)
        assert ga.id == gb.id, "an elementwise op on two C-channel tensors unifies their channels"
    else:
        names = probe_nodes(res.prog.module)
        assert_exact_or_explained(ga, names)
        assert_exact_or_explained(gb, names)


class Broadcast(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv1 = nn.Conv2d(3, C, 3, padding=1)
        self.conv_s = nn.Conv2d(3, 1, 3, padding=1)
        self.fc = nn.Linear(3, C)
        self.bias = nn.Parameter(torch.randn(1, C, 1, 1))
        self.gamma = nn.Parameter(torch.randn(C, 1, 1))
        self.scale = nn.Parameter(torch.tensor(0.7))
        self.conv2 = nn.Conv2d(C, 4, 3, padding=1)

    def forward(self, x):
        a = self.conv1(x)
        if self.kind == "gate_from_pool":  # (B, C, 1, 1) gate
            a = a * torch.sigmoid(self.fc(x.mean((2, 3)))).view(-1, C, 1, 1)
        elif self.kind == "spatial_mul":  # (B, 1, H, W) map broadcast over channels
            a = a * self.conv_s(x)
        elif self.kind == "bias_param":  # maps 0 to the bias unless the bias is sliced too
            a = a + self.bias
        elif self.kind == "layer_scale":
            a = self.gamma * a
        elif self.kind == "layer_scale_method":
            a = a.mul(self.gamma)
        elif self.kind == "scalar_param":
            a = a * self.scale
        elif self.kind == "batch_broadcast":  # (1, C, H, W) against (B, C, H, W)
            a = a * a[:1]
        return self.conv2(F.relu(a))


@pytest.mark.parametrize(
    "kind",
    ["gate_from_pool", "spatial_mul", "bias_param", "layer_scale", "layer_scale_method",
     "scalar_param", "batch_broadcast"],
)
def test_broadcast(kind):
    res = equiv(Broadcast(kind), [image()])
    g = group_of(res.prog, "conv1.weight")
    assert_prunable(g, kind)
    if kind == "bias_param":
        assert g.id == group_of(res.prog, "bias", 1).id
    if kind.startswith("layer_scale"):
        assert g.id == group_of(res.prog, "gamma", 0).id


@pytest.mark.parametrize("reshape", ["index", "view", "unsqueeze", "const"])
def test_se_linear(reshape):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, C, 3, padding=1)
            self.se = SELinear(C, 4, reshape)
            self.conv2 = nn.Conv2d(C, 4, 3, padding=1)

        def forward(self, x):
            return self.conv2(self.se(F.relu(self.conv1(x))))

    res = equiv(M(), [image()])
    g = group_of(res.prog, "conv1.weight")
    assert_prunable(g, "SE-gated channel")
    assert g.id == group_of(res.prog, "se.fc2.weight").id, "the gate's channel is the gated channel"
    assert_prunable(group_of(res.prog, "se.fc1.weight"), "SE hidden width")


@pytest.mark.parametrize("gate", [nn.Sigmoid, nn.Hardsigmoid], ids=["sigmoid", "hardsigmoid"])
def test_se_conv(gate):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = ConvBNAct(3, C)
            self.se = SEConv(C, 4, gate)
            self.conv2 = nn.Conv2d(C, 4, 1)

        def forward(self, x):
            return self.conv2(self.se(self.conv1(x)))

    res = equiv(M(), [image()])
    assert_prunable(group_of(res.prog, "conv1.0.weight"))
    assert_prunable(group_of(res.prog, "se.fc1.weight"))


def test_torchvision_squeeze_excitation_and_stochastic_depth():
    from torchvision.ops import SqueezeExcitation, StochasticDepth

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = ConvBNAct(3, C)
            self.se = SqueezeExcitation(C, 4)
            self.sd = StochasticDepth(0.2, "row")
            self.conv2 = nn.Conv2d(C, 4, 1)

        def forward(self, x):
            x = self.conv1(x)
            return self.conv2(x + self.sd(self.se(x)))

    res = equiv(M(), [image()])
    assert_prunable(group_of(res.prog, "se.fc1.weight"))


# ----------------------------------------------------------------------------------------------
# concatenation, stacking, splitting, slicing
# ----------------------------------------------------------------------------------------------

CATS = [
    ("cat", lambda a, b: torch.cat([a, b], 1), 2 * C),
    ("cat_tuple_kw", lambda a, b: torch.cat((b, a), dim=1), 2 * C),
    ("cat_negdim", lambda a, b: torch.cat([a, b, a], -3), 3 * C),
    ("cat_same_twice", lambda a, b: torch.cat([a, a], 1) + torch.cat([b, b], 1), 2 * C),
    ("concat_alias", lambda a, b: torch.concat([a, b], 1), 2 * C),
    ("cat_spatial", lambda a, b: torch.cat([a, b], 2)[:, :, ::2], C),
    ("stack_flatten_outer", lambda a, b: torch.stack([a, b], 1).flatten(1, 2), 2 * C),
    ("stack_flatten_inner", lambda a, b: torch.stack([a, b], 2).flatten(1, 2), 2 * C),
    ("stack_sum", lambda a, b: torch.stack([a, b], 0).sum(0), C),
    ("stack_reshape", lambda a, b: torch.stack((a, b), dim=2).reshape(2, 2 * C, 8, 8), 2 * C),
]


@pytest.mark.parametrize("fn,c_out", [c[1:] for c in CATS], ids=[c[0] for c in CATS])
def test_cat_stack(fn, c_out):
    res = equiv(TwoBranch(Fn(fn), c_out=c_out), [image()])
    assert_prunable(group_of(res.prog, "conv_a.weight"))
    assert_prunable(group_of(res.prog, "conv_b.weight"))


def test_cat_with_model_input():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, C, 3, padding=1)
            self.conv2 = nn.Conv2d(C + 3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv2(torch.cat([x, F.relu(self.conv1(x))], 1))

    res = equiv(M(), [image()])
    assert_prunable(group_of(res.prog, "conv1.weight"))


SPLITS = [
    ("slice_halves", lambda x: (x[:, :3], x[:, 3:]), (3, 5)),
    ("slice_middle", lambda x: (x[:, 2:6], x[:, 6:]), (4, 2)),
    ("slice_neg", lambda x: (x[:, -5:], x[:, :-5]), (5, 3)),
    ("slice_step", lambda x: (x[:, ::2], x[:, 1::2]), (4, 4)),
    ("slice_ellipsis", lambda x: (F.pad(x[..., 1:, :], (0, 0, 1, 0)), x[:, 4:]), (8, 4)),
    ("narrow", lambda x: (x.narrow(1, 4, 3), torch.narrow(x, 1, 0, 4)), (3, 4)),
    ("split_sizes", lambda x: torch.split(x, [3, 5], 1), (3, 5)),
    ("split_size", lambda x: torch.split(x, 3, dim=1), (3, 3, 2)),
    ("method_split", lambda x: x.split([6, 2], dim=1), (6, 2)),
    ("chunk", lambda x: x.chunk(2, 1), (4, 4)),
    ("torch_chunk", lambda x: torch.chunk(x, 2, dim=1), (4, 4)),
    ("chunk_uneven", lambda x: x.chunk(3, 1), (3, 3, 2)),
    ("tensor_split", lambda x: torch.tensor_split(x, (2, 5), dim=1), (2, 3, 3)),
    ("unbind_stack", lambda x: (torch.stack(x.unbind(1)[:5], 1), x[:, 5:]), (5, 3)),
    ("index_list", lambda x: (x[:, [0, 3, 5]], x[:, 6:]), (3, 2)),
]


class SplitNet(nn.Module):
    def __init__(self, fn, sizes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, C, 3, padding=1)
        self.fn = fn
        self.heads = nn.ModuleList(nn.Conv2d(s, 4, 3, padding=1) for s in sizes)

    def forward(self, x):
        parts = self.fn(F.relu(self.conv1(x)))
        out = 0
        for i, head in enumerate(self.heads):  # index: a traced split result cannot be iterated
            out = out + head(parts[i])
        return out


@pytest.mark.parametrize("name,fn,sizes", SPLITS, ids=[s[0] for s in SPLITS])
def test_split_slice(name, fn, sizes):
    # advanced indexing, tensor_split and unbind may be frozen (never wrong); the split/chunk/
    # slice/narrow family must stay prunable
    required = name not in ("index_list", "tensor_split", "unbind_stack")
    res = equiv(SplitNet(fn, sizes), [image()], expect_pruned=required)
    if required:
        # conv1's channels are cut into pieces: some piece stays prunable
        pieces = [g for g in groups_with(res.prog, "conv1.weight", 0) if g.prunable and g.exact]
        assert pieces, "no prunable piece of a split/sliced channel space"


def test_split_then_cat_reordered():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, C, 3, padding=1)
            self.conv_b = nn.Conv2d(5, 5, 3, padding=1)
            self.conv2 = nn.Conv2d(C, 4, 3, padding=1)

        def forward(self, x):
            a, b = torch.split(F.relu(self.conv1(x)), [3, 5], 1)
            return self.conv2(torch.cat([F.relu(self.conv_b(b)), a], 1))

    res = equiv(M(), [image()])
    assert [g for g in groups_with(res.prog, "conv1.weight", 0) if g.prunable]
    assert_prunable(group_of(res.prog, "conv_b.weight"))


def test_slice_spatial_dims():
    res = equiv(Sandwich(Fn(lambda x: x[:, :, 1:-1, ::2]), k=3), [image()])
    probe_check(res, True)


# ----------------------------------------------------------------------------------------------
# reshaping
# ----------------------------------------------------------------------------------------------

FLATTENS = [
    ("torch.flatten", lambda x: torch.flatten(x, 1)),
    ("method_flatten", lambda x: x.flatten(1)),
    ("nn.Flatten", nn.Flatten()),
    ("view_dynamic", lambda x: x.view(x.size(0), -1)),
    ("reshape_dynamic", lambda x: x.reshape(x.shape[0], -1)),
    ("view_const", lambda x: x.view(2, C * 4 * 4)),
    ("reshape_const_neg", lambda x: x.reshape(-1, C * 16)),
    ("view_shape_prod", lambda x: x.view(x.shape[0], x.shape[1] * x.shape[2] * x.shape[3])),
    ("flatten_permuted", lambda x: x.permute(0, 2, 3, 1).flatten(1)),
]


class FlattenLinear(nn.Module):
    def __init__(self, flatten):
        super().__init__()
        self.conv1 = nn.Conv2d(3, C, 3, padding=1)
        self.flatten = flatten if isinstance(flatten, nn.Module) else Fn(flatten)
        self.fc1 = nn.Linear(C * 16, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return self.fc2(F.relu(self.fc1(self.flatten(x))))


@pytest.mark.parametrize("flatten", [f[1] for f in FLATTENS], ids=[f[0] for f in FLATTENS])
def test_linear_after_flatten(flatten):
    res = equiv(FlattenLinear(flatten), [image()])
    g = group_of(res.prog, "conv1.weight")
    assert_prunable(g, "conv channels flattened into a Linear")
    # each conv channel owns its 16 spatial columns of fc1
    for s in g.dependents:
        if s.param == "fc1.weight":
            assert s.dim == 1
            for c in range(g.size):
                assert s.indices_of(c).numel() == 16


class PermuteLinear(nn.Module):
    """ConvNeXt-style pointwise Linear on channels-last maps."""

    def __init__(self, use_transpose=False):
        super().__init__()
        self.use_transpose = use_transpose
        self.conv1 = nn.Conv2d(3, C, 3, padding=1)
        self.fc1 = nn.Linear(C, 12)
        self.fc2 = nn.Linear(12, C)
        self.conv2 = nn.Conv2d(C, 4, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        y = x.transpose(1, 3) if self.use_transpose else x.permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(y.contiguous())))
        y = y.transpose(1, 3) if self.use_transpose else torch.permute(y, (0, 3, 1, 2))
        return self.conv2(x + y)


@pytest.mark.parametrize("use_transpose", [False, True], ids=["permute", "transpose"])
def test_permute_transpose_contiguous(use_transpose):
    res = equiv(PermuteLinear(use_transpose), [image()])
    assert_prunable(group_of(res.prog, "conv1.weight"))
    assert_prunable(group_of(res.prog, "fc1.weight"))
    assert group_of(res.prog, "conv1.weight").id == group_of(res.prog, "fc2.weight").id


@pytest.mark.parametrize("back", ["transpose", "swapaxes", "mT"])
def test_tokens_transpose_conv1d(back):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(10, C)
            self.conv = nn.Conv1d(C, 12, 3, padding=1)
            self.fc2 = nn.Linear(12, 3)

        def forward(self, x):
            y = F.relu(self.conv(F.relu(self.fc1(x)).transpose(1, 2)))
            if back == "transpose":
                y = torch.transpose(y, 2, 1)
            elif back == "swapaxes":
                y = y.swapaxes(1, 2)
            else:
                y = y.mT
            return self.fc2(y)

    res = equiv(M(), [tokens()])
    assert_prunable(group_of(res.prog, "fc1.weight"))
    g = group_of(res.prog, "conv.weight")
    if back == "mT":  # a tensor property: frozen is acceptable, wrong is not
        assert_exact_or_explained(g, [n.name for n in res.prog.module.graph.nodes])
    else:
        assert_prunable(g)


def test_patch_embedding_vit_style():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, C, 4, stride=4)
            self.fc1 = nn.Linear(C, 12)
            self.fc2 = nn.Linear(12, 3)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            return self.fc2(F.gelu(self.fc1(t))).mean(1)

    res = equiv(M(), [image()])
    assert_prunable(group_of(res.prog, "patch.weight"))


def test_squeeze_unsqueeze():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv1d(3, C, 3, padding=1)
            self.conv2 = nn.Conv2d(C, 12, (1, 3), padding=(0, 1))
            self.conv3 = nn.Conv1d(12, 6, 1)
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            y = F.relu(self.conv1(x)).unsqueeze(2)
            y = F.relu(self.conv2(y)).squeeze(2)
            y = F.adaptive_avg_pool1d(F.relu(self.conv3(y)), 1)
            return self.fc(y.squeeze(-1))

    res = equiv(M(), [image(1)])
    assert_prunable(group_of(res.prog, "conv1.weight"))
    assert_prunable(group_of(res.prog, "conv2.weight"))
    assert_prunable(group_of(res.prog, "conv3.weight"))


def test_view_heads_and_merge():
    class M(nn.Module):
        """Channels viewed as (heads, head_dim), a per-head op, then merged back."""

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, C, 3, padding=1)
            self.register_buffer("head_scale", torch.tensor([1.0, -0.5]).view(1, 2, 1, 1))
            self.conv2 = nn.Conv2d(C, 4, 1)

        def forward(self, x):
            y = F.relu(self.conv1(x))
            b, c, h, w = y.shape
            y = y.view(b, 2, c // 2, h * w)
            y = y * self.head_scale
            return self.conv2(y.reshape(b, c, h, w))

    res = equiv(M(), [image()], expect_pruned=False)
    g = group_of(res.prog, "conv1.weight")
    assert_exact_or_explained(g, [n.name for n in res.prog.module.graph.nodes])


# ----------------------------------------------------------------------------------------------
# channel shuffle
# ----------------------------------------------------------------------------------------------

SHUFFLES = [
    ("dynamic", lambda: Fn(lambda x: channel_shuffle_dynamic(x, 2))),
    ("dynamic_g4", lambda: Fn(lambda x: channel_shuffle_dynamic(x, 4))),
    ("const", lambda: ShuffleConst(C, 2)),
    ("nn.ChannelShuffle", lambda: nn.ChannelShuffle(2)),
    ("torch.channel_shuffle", lambda: Fn(lambda x: torch.channel_shuffle(x, 4))),
    ("F.channel_shuffle", lambda: Fn(lambda x: F.channel_shuffle(x, 2))),
]


@pytest.mark.parametrize("factory", [s[1] for s in SHUFFLES], ids=[s[0] for s in SHUFFLES])
def test_channel_shuffle(factory):
    res = equiv(Sandwich(factory(), k=3), [image()])
    probe_check(res, True)


def test_shufflenet_v2_block():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = ConvBNAct(3, C)
            self.block = ShuffleV2Block(C)
            self.block2 = ShuffleV2Block(C)
            self.head = nn.Conv2d(C, 4, 1)

        def forward(self, x):
            return self.head(self.block2(self.block(self.stem(x))))

    res = equiv(M(), [image()])
    assert_prunable(group_of(res.prog, "block.branch.0.0.weight"))


# ----------------------------------------------------------------------------------------------
# reductions
# ----------------------------------------------------------------------------------------------

REDUCE_SPATIAL = [  # (id, fn, must stay prunable)
    ("mean", lambda x: x.mean((2, 3)), True),
    ("mean_list_kw", lambda x: torch.mean(x, dim=[-1, -2]), True),
    ("sum", lambda x: x.sum(dim=(2, 3)), True),
    ("amax", lambda x: torch.amax(x, dim=(2, 3)), True),
    ("amin_method", lambda x: x.amin(-1).amax(-1), True),
    ("max_values", lambda x: x.flatten(2).max(dim=-1)[0], True),
    ("mean_keepdim", lambda x: x.mean((2, 3), keepdim=True).flatten(1), True),
    ("std", lambda x: x.std(dim=(2, 3)), False),
    ("norm", lambda x: torch.linalg.vector_norm(x, dim=(2, 3)), False),
]


@pytest.mark.parametrize("fn,required", [r[1:] for r in REDUCE_SPATIAL],
                         ids=[r[0] for r in REDUCE_SPATIAL])
def test_reduce_spatial(fn, required):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, C, 3, padding=1)
            self.probe = Fn(fn)
            self.fc = nn.Linear(C, 6)
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            return self.out(F.relu(self.fc(self.probe(F.relu(self.conv1(x))))))

    res = equiv(M(), [image()], expect_pruned=required)
    g = group_of(res.prog, "conv1.weight")
    if required:
        assert_prunable(g)
    else:
        assert_exact_or_explained(g, probe_nodes(res.prog.module))


REDUCE_CHANNEL = [
    ("sum_keepdim", lambda x: x.sum(1, keepdim=True), True),
    ("torch_sum", lambda x: torch.sum(x, dim=1).unsqueeze(1), True),
    ("norm", lambda x: x.norm(dim=1, keepdim=True), False),
    ("mean", lambda x: x.mean(1, keepdim=True), False),
    ("amax", lambda x: x.amax(1, keepdim=True), False),
    ("max", lambda x: torch.max(x, dim=1, keepdim=True)[0], False),
    ("logsumexp", lambda x: torch.logsumexp(x, 1, keepdim=True), False),
    ("var", lambda x: x.var(1, keepdim=True), False),
]


@pytest.mark.parametrize("fn,zero_preserving", [r[1:] for r in REDUCE_CHANNEL],
                         ids=[r[0] for r in REDUCE_CHANNEL])
def test_reduce_over_channel(fn, zero_preserving):
    res = equiv(Sandwich(Fn(fn), c_out=1, k=3), [image()], expect_pruned=zero_preserving)
    probe_check(res, zero_preserving)


def test_cbam_spatial_attention():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = ConvBNAct(3, C)
            self.att = nn.Conv2d(2, 1, 7, padding=3)
            self.conv2 = nn.Conv2d(C, 4, 1)

        def forward(self, x):
            x = self.conv1(x)
            a = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
            return self.conv2(x * torch.sigmoid(self.att(a)))

    res = equiv(M(), [image()], expect_pruned=False)
    g = group_of(res.prog, "conv1.0.weight")
    names = [n.name for n in res.prog.module.graph.nodes if n.name.startswith(("mean", "amax"))]
    assert_exact_or_explained(g, names)


# ----------------------------------------------------------------------------------------------
# structure: identity, shared modules, multiple inputs/outputs, U-Net, DenseNet, ResNet
# ----------------------------------------------------------------------------------------------


def test_identity_and_sequential_nesting():
    probe = nn.Sequential(nn.Identity(), nn.Sequential(nn.ReLU(), nn.Identity()))
    res = equiv(Sandwich(probe), [image()])
    probe_check(res, True)


def test_module_called_twice():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, C, 3, padding=1)
            self.shared = nn.Conv2d(C, C, 3, padding=1)
            self.conv2 = nn.Conv2d(C, 4, 1)

        def forward(self, x):
            x = F.relu(self.conv1(x))
            x = F.relu(self.shared(x))
            x = F.relu(self.shared(x))  # same weights, second call
            return self.conv2(x)

    res = equiv(M(), [image()])
    g = group_of(res.prog, "shared.weight", 0)
    # shared weights tie the shared conv's in- and out-channels into one group
    assert g.id == group_of(res.prog, "conv1.weight").id
    assert_prunable(g)


def test_shared_module_siamese():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = ConvBNAct(3, C)
            self.proj = nn.Conv2d(C, 6, 1)
            self.head = nn.Conv2d(6, 4, 1)

        def forward(self, x, y):
            return self.head(F.relu(self.proj(self.enc(x)) - self.proj(self.enc(y))))

    res = equiv(M(), [image(seed=0), image(seed=1)])
    assert_prunable(group_of(res.prog, "enc.0.weight"))
    assert_prunable(group_of(res.prog, "proj.weight"))


def test_shared_functional_weight():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, C, 3, padding=1)
            self.conv2 = nn.Conv2d(3, C, 3, padding=1)
            self.w = nn.Parameter(torch.randn(6, C, 1, 1))
            self.head = nn.Conv2d(6, 4, 1)

        def forward(self, x):
            a = F.conv2d(F.relu(self.conv1(x)), self.w)
            b = F.conv2d(F.relu(self.conv2(x)), self.w)
            return self.head(F.relu(a + b))

    res = equiv(M(), [image()])
    # both convs feed the same weight's in-channels: one group
    assert group_of(res.prog, "conv1.weight").id == group_of(res.prog, "conv2.weight").id


class MultiIO(nn.Module):
    def __init__(self, io: str):
        super().__init__()
        self.io = io
        self.conv_x = ConvBNAct(3, C)
        self.conv_y = ConvBNAct(2, C)
        self.mid = ConvBNAct(C, 6)
        self.head1 = nn.Conv2d(6, 4, 1)
        self.head2 = nn.Linear(6, 3)

    def forward(self, a, b=None):
        if self.io == "tuple_in":
            x, y = a[0], a[1]
        elif self.io == "dict_in":
            x, y = a["image"], a["aux"]
        else:
            x, y = a, b
        m = self.mid(self.conv_x(x) + self.conv_y(y))
        out1, out2 = self.head1(m), self.head2(m.mean((2, 3)))
        if self.io == "dict_out":
            return {"seg": out1, "cls": out2}
        if self.io == "list_out":
            return [out1, out2]
        if self.io == "feature_out":
            return out1, m  # an intermediate feature map is itself an output
        return out1, out2


def _multi_inputs(io):
    x, y = image(seed=0), image(channels=2, seed=1)
    if io == "tuple_in":
        return [(x, y)]
    if io == "dict_in":
        return [{"image": x, "aux": y}]
    return [x, y]


@pytest.mark.parametrize("io", ["args", "tuple_in", "dict_in", "dict_out", "list_out", "feature_out"])
def test_multiple_inputs_outputs(io):
    res = equiv(MultiIO(io), _multi_inputs(io))
    g = group_of(res.prog, "conv_x.0.weight")
    assert g.id == group_of(res.prog, "conv_y.0.weight").id
    assert_prunable(g)
    gm = group_of(res.prog, "mid.0.weight")
    if io == "feature_out":
        assert not gm.prunable, "a group that reaches the model's output must be frozen"
    else:
        assert_prunable(gm)


@pytest.mark.parametrize("up", ["convt", "upsample"])
def test_unet_skip(up):
    res = equiv(TinyUNet(4, up), [image()])
    assert_prunable(group_of(res.prog, "enc1.0.weight"))
    assert_prunable(group_of(res.prog, "dec.0.weight"))
    g_up = group_of(res.prog, "up.weight", 1) if up == "convt" else group_of(res.prog, "up.1.weight")
    assert_prunable(g_up)


def test_densenet_concat_chain():
    res = equiv(TinyDenseNet(), [image()])
    stem = group_of(res.prog, "stem.weight")
    assert_prunable(stem, "DenseNet stem (concatenated into every layer)")
    for i in range(3):
        assert_prunable(group_of(res.prog, f"layers.{i}.conv1.weight"))
        assert_prunable(group_of(res.prog, f"layers.{i}.conv2.weight"))


def test_resnet_residual_chain():
    res = equiv(TinyResNet(), [image()])
    g = group_of(res.prog, "stem.0.weight")
    assert_prunable(g)
    # every residual add ties the stem and both blocks' last convs into one group
    assert g.id == group_of(res.prog, "b1.1.0.weight").id == group_of(res.prog, "b2.1.0.weight").id
    assert_prunable(group_of(res.prog, "b1.0.0.weight"))


def test_residual_on_model_input_is_frozen():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, C, 3, padding=1)
            self.conv2 = nn.Conv2d(C, 3, 3, padding=1)
            self.head = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.head(F.relu(x + self.conv2(F.relu(self.conv1(x)))))

    res = equiv(M(), [image()])
    assert_prunable(group_of(res.prog, "conv1.weight"))
    assert not group_of(res.prog, "conv2.weight").prunable, "the model input's channels are fixed"


def test_branch_fanout():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = ConvBNAct(3, C)
            self.a = nn.Conv2d(C, 4, 1)
            self.b = nn.Conv2d(C, 4, 3, padding=1)
            self.c = nn.Linear(C, 4)

        def forward(self, x):
            x = self.conv1(x)
            return self.a(x) + self.b(x) + self.c(x.mean((2, 3)))[:, :, None, None]

    res = equiv(M(), [image()])
    assert_prunable(group_of(res.prog, "conv1.0.weight"))


# ----------------------------------------------------------------------------------------------
# more hard cases: offsets across joins, contracted channels, constants that depend on channels
# ----------------------------------------------------------------------------------------------


class HardCase(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_big = nn.Conv2d(3, 12, 3, padding=1)
        self.conv_s = nn.Conv2d(3, 1, 3, padding=1)
        self.lin_w = nn.Linear(8, 6, bias=False)
        self.head3 = nn.Conv2d(3, 4, 1)
        self.head5 = nn.Conv2d(5, 4, 1)
        self.head8 = nn.Conv2d(8, 4, 1)
        self.head10 = nn.Conv2d(10, 4, 1)
        self.head16 = nn.Conv2d(16, 4, 1)
        self.gn = nn.GroupNorm(4, 8)
        self.gconv = nn.Conv2d(8, 6, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        a, b = F.relu(self.conv_a(x)), F.relu(self.conv_b(x))
        k = self.kind
        if k == "cat_then_split_across":  # a split boundary inside a cat segment
            p, q = torch.split(torch.cat([a, b], 1), [3, 5], 1)
            return self.head3(p) + self.head5(q)
        if k == "slice_of_slice":
            return self.head5(torch.cat([a, b], 1)[:, 1:][:, 1:6])
        if k == "slice_residual":  # an add between a slice of a wide map and a narrow map
            return self.head8(F.relu(self.conv_big(x))[:, 2:10] + torch.cat([a, b], 1))
        if k == "cat_then_chunk_swap":
            p, q = torch.cat([a, b], 1).chunk(2, 1)
            return self.head8(torch.cat([q, p], 1))
        if k == "cat_gn":
            return self.head8(F.relu(self.gn(torch.cat([a, b], 1))))
        if k == "cat_grouped_conv":
            return self.head8(torch.cat([F.relu(self.gconv(torch.cat([a, b], 1))), a[:, :2]], 1))
        if k == "cat_depthwise":
            return self.head8(F.relu(self.dw(torch.cat([b, a], 1))))
        if k == "repeat":
            return self.head16(torch.cat([a, b], 1).repeat(1, 2, 1, 1))
        if k == "expand_add":  # a (B,1,H,W) map expanded to the channel count
            y = torch.cat([a, b], 1)
            return self.head8(y + F.relu(self.conv_s(x)).expand(-1, 8, -1, -1))
        if k == "zeros_const_channels":
            y = torch.cat([a, b], 1)
            return self.head8(y + torch.zeros(2, 8, 8, 8, dtype=y.dtype))
        if k == "zeros_like":
            y = torch.cat([a, b], 1)
            return self.head8(y + torch.zeros_like(y))
        if k == "pad_channels":  # F.pad over the channel dim adds two zero channels
            return self.head10(F.pad(torch.cat([a, b], 1), (0, 0, 0, 0, 1, 1)))
        if k == "linear_over_width":  # Linear over W: the channel dim passes through
            y = self.lin_w(torch.cat([a, b], 1))
            return self.head8(F.relu(y))
        if k == "einsum_1x1":
            y = torch.einsum("bchw,oc->bohw", torch.cat([a, b], 1), self.head8.weight[:, :, 0, 0])
            return y
        if k == "inplace_add":
            y = torch.cat([a, b], 1)
            z = y.clone()
            z.add_(1.0)
            return self.head8(z)
        raise ValueError(k)


HARD = {  # kind -> the conv_a / conv_b groups must stay prunable
    "cat_then_split_across": True,
    "slice_of_slice": True,
    "slice_residual": True,
    "cat_then_chunk_swap": True,
    "cat_gn": False,
    "cat_grouped_conv": False,
    "cat_depthwise": True,
    "repeat": False,
    "expand_add": False,
    "zeros_const_channels": False,
    "zeros_like": False,
    "pad_channels": False,
    "linear_over_width": True,
    "einsum_1x1": False,
    "inplace_add": False,
}


@pytest.mark.parametrize("kind", sorted(HARD))
def test_hard_case(kind):
    required = HARD[kind]
    res = equiv(HardCase(kind), [image()], expect_pruned=required)
    for p in ("conv_a.weight", "conv_b.weight"):
        for g in groups_with(res.prog, p, 0):
            if required:
                assert_prunable(g, f"{kind}: {p}")
            else:
                assert_exact_or_frozen(g, f"{kind}: {p}")


class TinyAttention(nn.Module):
    """Single-head self-attention over (B, N, 10) tokens; q and k share a contracted width."""

    def __init__(self, scale: str, heads: int = 1):
        super().__init__()
        self.scale, self.heads = scale, heads
        self.q = nn.Linear(10, 8)
        self.k = nn.Linear(10, 8)
        self.v = nn.Linear(10, 8)
        self.proj = nn.Linear(8, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.heads > 1:
            b, n, _ = x.shape
            q = q.view(b, n, self.heads, 8 // self.heads).transpose(1, 2)
            k = k.view(b, n, self.heads, 8 // self.heads).transpose(1, 2)
            v = v.view(b, n, self.heads, 8 // self.heads).transpose(1, 2)
        s = q @ k.transpose(-2, -1)
        if self.scale == "const":
            s = s * 0.3535
        elif self.scale == "computed":  # the width is used as a number: pruning would change it
            s = s * q.size(-1) ** -0.5
        a = torch.softmax(s, dim=-1) @ v
        if self.heads > 1:
            a = a.transpose(1, 2).reshape(x.shape[0], x.shape[1], 8)
        return self.out(F.relu(self.proj(a)))


@pytest.mark.parametrize("scale,heads", [("const", 1), ("computed", 1), ("const", 2)])
def test_attention(scale, heads):
    res = equiv(TinyAttention(scale, heads), [tokens()], expect_pruned=False)
    for g in res.prog.groups:
        assert_exact_or_frozen(g)
    assert_prunable(group_of(res.prog, "proj.weight"))


def test_sdpa():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(10, 24)
            self.proj = nn.Linear(8, 6)
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            a = F.scaled_dot_product_attention(q, k, v)
            return self.out(F.relu(self.proj(a)))

    res = equiv(M(), [tokens()], expect_pruned=False)
    for g in res.prog.groups:
        assert_exact_or_frozen(g)
    assert_prunable(group_of(res.prog, "proj.weight"))


# ---------------------------------------------------------------------------- transformer ops

from models_zoo_small import assert_frozen_by  # noqa: E402


class HeadAttention(nn.Module):
    """Two-head self-attention over (B, N, 10) tokens, its scores written with ``variant``:

    * ``"einsum"``: ``torch.einsum`` with spaced subscripts for the scores and an ellipsis for
      the weighted sum (torchvision MaxViT);
    * ``"cosine"``: q and k L2-normalised over the head width, times a per-head learnt scale
      (Swin v2);
    * ``"gathered_bias"``: scaled scores plus a per-head bias table gathered by an index
      buffer, ``biases[:, idx]`` (timm LeViT, EfficientFormer).
    """

    HEADS, WIDTH, N = 2, 4, 5

    def __init__(self, variant: str):
        super().__init__()
        h, d, n = self.HEADS, self.WIDTH, self.N
        self.variant = variant
        self.qkv = nn.Linear(10, 3 * h * d)
        self.proj = nn.Linear(h * d, 6)
        self.out = nn.Linear(6, 3)
        if variant == "cosine":
            self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(h, 1, 1)))
        if variant == "gathered_bias":
            self.attention_biases = nn.Parameter(torch.randn(h, 2 * n - 1))
            pos = torch.arange(n)
            self.register_buffer("attention_bias_idxs", pos[:, None] - pos[None, :] + n - 1)

    def forward(self, x):
        b, n, _ = x.shape
        h, d = self.HEADS, self.WIDTH
        q, k, v = self.qkv(x).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
        if self.variant == "einsum":
            s = torch.einsum("b h i d, b h j d -> b h i j", q, k) * d ** -0.5
            a = torch.einsum("...ij,...jd->...id", s.softmax(dim=-1), v)
        else:
            if self.variant == "cosine":
                s = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
                s = s * torch.clamp(self.logit_scale, max=4.6).exp()
            else:
                s = q @ k.transpose(-2, -1) * d ** -0.5 + self.attention_biases[:, self.attention_bias_idxs]
            a = s.softmax(dim=-1) @ v
        return self.out(F.relu(self.proj(a.transpose(1, 2).reshape(b, n, h * d))))


HEAD_PARAMS = {"einsum": [], "cosine": ["logit_scale"], "gathered_bias": ["attention_biases"]}


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("variant", sorted(HEAD_PARAMS))
def test_attention_head_variants(variant, frontend):
    """The heads are one prunable exact group that owns the q/k/v rows of each head, the
    matching columns of the output projection and each head's own scale or bias row."""
    res = equiv(HeadAttention(variant), [tokens()], frontend=frontend)
    h, d = HeadAttention.HEADS, HeadAttention.WIDTH
    heads = group_of(res.prog, "qkv.weight")
    assert_prunable(heads, f"heads through {variant}")
    assert heads.size == h, repr(heads)
    rows = next(s for s in heads.slices if s.param == "qkv.weight")
    for c in range(h):  # head c: d rows in each of the q, k and v blocks
        assert sorted(rows.indices_of(c).tolist()) == [blk * h * d + c * d + j for blk in range(3) for j in range(d)]
    for p in HEAD_PARAMS[variant]:
        assert group_of(res.prog, p, 0).id == heads.id, f"{p} rows are not sliced with their head"
    assert any(s.param == "proj.weight" and s.dim == 1 for s in heads.dependents), repr(heads)
    assert res.slim.get_parameter("proj.weight").shape[1] < h * d


def test_einsum_labels():
    from fxprune.passes.ops_einsum import einsum_labels

    assert einsum_labels("b h i d, b h j d -> b h i j", [4, 4]) == (
        [list("bhid"), list("bhjd")], list("bhij"))
    assert einsum_labels("ji,jk", [2, 2]) == ([list("ji"), list("jk")], list("ik"))  # implicit: once-used, sorted
    ell = [("...", 1), ("...", 0)]
    assert einsum_labels("...ij,jk", [4, 2]) == ([ell + list("ij"), list("jk")], ell + list("ik"))
    assert einsum_labels("...ij,...jk->...ik", [3, 4]) == (
        [ell[1:] + list("ij"), ell + list("jk")], ell + list("ik"))
    with pytest.raises(ValueError):
        einsum_labels("ij,jk->ik", [2, 3])


def test_einsum_with_weight():
    """``einsum("bnc,dc->bnd", h, w)`` is a linear layer: ``w`` consumes the hidden channels of
    ``fc1`` (its columns go with them) and produces channels of its own (its rows)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(10, 8)
            self.w = nn.Parameter(torch.randn(7, 8))
            self.fc3 = nn.Linear(7, 3)

        def forward(self, x):
            return self.fc3(F.relu(torch.einsum("bnc,dc->bnd", F.relu(self.fc1(x)), self.w)))

    res = equiv(M(), [tokens()])
    hidden = group_of(res.prog, "fc1.weight")
    assert_prunable(hidden)
    assert any(s.param == "w" and s.dim == 1 for s in hidden.dependents), repr(hidden)
    assert_prunable(group_of(res.prog, "w", 0))
    assert res.slim.w.shape[0] < 7 and res.slim.w.shape[1] < 8


def test_einsum_diagonal_freezes():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(10, 5)
            self.fc2 = nn.Linear(5, 3)

        def forward(self, x):
            h = self.fc1(x)  # (B, 5, 5): tokens x channels, a square
            return self.fc2(h * torch.einsum("bii->bi", h).unsqueeze(-1))

    res = equiv(M(), [tokens()], expect_pruned=False)
    assert_frozen_by(group_of(res.prog, "fc1.weight"), ["einsum"])


def test_normalize_over_channels():
    """``F.normalize(x, dim=1)``: a zeroed conv channel is exactly zero, adds nothing to the
    norm and stays zero, so the group is exact; after a sigmoid (zero -> 0.5) it is not."""
    res = equiv(Sandwich(Fn(lambda x: F.normalize(x, dim=1), "normalize")), [image()])
    probe_check(res, zero_preserving=True)
    res = equiv(Sandwich(Fn(lambda x: F.normalize(torch.sigmoid(x), dim=1), "normalize")), [image()],
                expect_pruned=False)
    g = group_of(res.prog, "conv1.weight")
    assert not g.exact and "norm over channels" in g.reason, repr(g)


def test_zero_on_a_view():
    """``b = bias.clone(); b[k:2k].zero_()`` (Swin v2 drops the key bias so): the slice bounds
    follow the pruned width and the zeroed block stays zero."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(10, 24)
            self.proj = nn.Linear(8, 3)

        def forward(self, x):
            bias = self.qkv.bias.clone()
            bias[8:16].zero_()
            q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)
            return self.proj(torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v)

    for frontend in ("fx", "export"):
        res = equiv(M(), [tokens()], frontend=frontend)
        qkv = groups_with(res.prog, "qkv.weight", 0)
        assert len(qkv) == 2, qkv  # q with k (contracted together), and v
        for g in qkv:
            assert_prunable(g, frontend)


def test_functional_grouped_conv_with_a_buffer_filter_prunes():
    """A blur pool (``F.conv2d(x, filt, groups=C)`` with a fixed filter buffer): its channels
    are one group with the producing conv, the buffer is sliced with them and the ``groups``
    constant is recomputed, so the slim model matches."""
    from fxprune.testing import check_equivalence

    class BlurNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 6, 3, padding=1)
            self.register_buffer("filt", torch.rand(6, 1, 3, 3))
            self.head = nn.Linear(6, 4)

        def forward(self, x):
            y = F.conv2d(self.b(torch.relu(self.a(x))), self.filt, padding=1, groups=6)
            return self.head(y.mean((2, 3)))

    model = BlurNet().eval()
    x = torch.randn(2, 3, 8, 8)
    prog = fxprune.compile(model, (x,))
    blurred = [g for g in prog.groups if any(s.param == "b.weight" for s in g.slices)]
    assert len(blurred) == 1 and blurred[0].prunable and blurred[0].exact and blurred[0].size == 6
    assert {s.param for s in blurred[0].slices + blurred[0].dependents} >= {"b.weight", "b.bias", "filt",
                                                                           "head.weight"}
    assert not any(len(g.slices) == 1 and g.slices[0].param == "filt" and g.size == 3 for g in prog.groups), \
        "the filter's kernel taps are not channels"
    res = check_equivalence(model, (x,), dtype=torch.float64)
    conv = [n for n in res.slim.graph.nodes if n.target is F.conv2d][0]
    kept = res.slim.get_buffer("filt").shape[0]
    assert kept < 6 and (conv.kwargs.get("groups") or conv.args[6]) == kept


def test_unbatched_conv1d():
    """An unbatched input (C, L): channels are dim 0, not dim 1."""
    from fxprune.testing import check_equivalence

    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv1d(4, 10, 3, padding=1)
            self.dw = nn.Conv1d(10, 10, 3, padding=1, groups=10)
            self.b = nn.Conv1d(10, 3, 1)

        def forward(self, x):
            return self.b(torch.relu(self.dw(torch.relu(self.a(x)))))

    res = check_equivalence(Unbatched().eval(), (torch.randn(4, 7),), dtype=torch.float64)
    assert res.params_slim < res.params_full
    assert res.slim.dw.groups == res.slim.dw.in_channels < 10


def test_export_prunes_depthwise_convs_and_in_place_activations():
    """Through torch.export every conv is an ATen call: depthwise convs (``groups`` recomputed)
    and in-place ReLU6 (``hardtanh_``) prune like their modules do under symbolic tracing."""
    import torchvision

    from fxprune.testing import check_equivalence

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(width_mult=0.25).eval()
    x = torch.randn(1, 3, 32, 32)
    fx_prog = fxprune.compile(model, (x,), frontend="fx")
    ex_prog = fxprune.compile(model, (x,), frontend="export")
    assert any(n.target is torch.ops.aten.hardtanh_.default for n in ex_prog.module.graph.nodes)
    count = lambda p: (sum(g.prunable for g in p.groups), sum(g.size for g in p.groups if g.prunable))
    assert count(ex_prog) == count(fx_prog)
    assert all(g.size > 3 or g.prunable for g in ex_prog.groups), "kernel taps form no group"
    res = check_equivalence(model, (x,), dtype=torch.float64, frontend="export")
    assert res.params_slim < 0.8 * res.params_full


def test_in_place_activation_on_a_shared_tensor_freezes():
    """``sigmoid_`` on a tensor something else also reads turns its zeroed channels into 0.5
    behind that reader's back: the channels freeze instead."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.b = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            y = self.a(x)
            z = self.b(y)
            return z + torch.ops.aten.sigmoid_.default(y).sum()

    prog = fxprune.compile(Shared().eval(), (torch.randn(1, 3, 4, 4),), frontend="fx")
    g = [g for g in prog.groups if any(s.param == "a.weight" for s in g.slices)][0]
    assert not g.prunable and "in-place" in g.reason


def test_weight_standardised_conv_marks_its_input_channels_inexact():
    """Weight standardisation (NF-ResNet's ScaledStdConv2d): ``F.batch_norm`` in training mode
    over the weight reshaped to (1, C_out, C_in*k*k) normalises each row over its input
    channels, so removing an input channel changes every row: that group is inexact, the
    conv's output channels stay prunable, and the slim model matches."""
    from fxprune.testing import check_equivalence

    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                             momentum=0.0, eps=1e-6).reshape_as(self.weight)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = StdConv(8, 6, 1)  # 1x1: the reshape keeps the input-channel track whole
            self.c = nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    prog = fxprune.compile(model, (x,))
    into_b = [g for g in prog.groups if any(s.param == "a.weight" for s in g.slices)][0]
    assert not into_b.exact and not into_b.prunable and "statistics computed over them" in into_b.reason
    out_of_b = [g for g in prog.groups if any(s.param == "b.weight" and s.dim == 0 for s in g.slices)][0]
    assert out_of_b.prunable and out_of_b.exact
    res = check_equivalence(model, (x,), dtype=torch.float64)
    assert res.params_slim < res.params_full


def test_depthwise_conv_called_twice():
    """One depthwise module applied twice (CoaT's position encoding): its rewrite runs once
    per call and must give the same group count both times."""
    from fxprune.testing import check_equivalence

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(self.dw(y) + self.dw(torch.relu(y)))


    model, x = Twice().eval(), torch.randn(1, 3, 6, 6)
    check_equivalence(model, (x,), dtype=torch.float64)
    prog = fxprune.compile(model, (x,))
    g = [g for g in prog.groups if any(s.param == "a.weight" for s in g.slices)][0]
    prog.zero_({g.id: torch.tensor([True, False] * 4)})  # 4 of 8 kept: 8 // 4 != 1
    slim = prog.construct_subnet()
    assert slim.dw.groups == slim.dw.in_channels == slim.dw.out_channels == 4


# ----------------------------------------------------------------------------------------------
# addcmul, ATen in-place arithmetic and resampling
# ----------------------------------------------------------------------------------------------


class AffineAddcmul(nn.Module):
    """Per-channel affine written with ``torch.addcmul`` (ResMLP's ``Affine``) and a global
    response normalisation with its ``addcmul`` tail (ConvNeXt-V2's ``GRN``), over (B, N, C)."""

    def __init__(self, grn: bool):
        super().__init__()
        self.grn = grn
        self.fc1 = nn.Linear(10, 8)
        self.alpha = nn.Parameter(torch.rand(8) + 0.5)
        self.beta = nn.Parameter(torch.randn(8))
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        if self.grn:  # exact only where beta is zero with its channel: beta is in the group
            g = h.norm(p=2, dim=1, keepdim=True)
            h = h + torch.addcmul(self.beta, self.alpha, h * (g / (g.mean(dim=-1, keepdim=True) + 1e-6)))
        else:
            h = torch.addcmul(self.beta, self.alpha, h)
        return self.fc2(h)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_addcmul_affine(frontend):
    """``addcmul(beta, alpha, h)``: alpha and beta are sliced with fc1's rows; a zeroed channel
    is ``beta`` (zeroed with it) plus ``alpha * 0``, so the group is prunable and exact."""
    res = equiv(AffineAddcmul(grn=False), [tokens()], frontend=frontend)
    g = group_of(res.prog, "fc1.weight")
    assert_prunable(g, f"addcmul affine ({frontend})")
    assert {s.param for s in g.slices} >= {"fc1.weight", "alpha", "beta"}, repr(g)
    assert res.slim.get_parameter("alpha").shape[0] < 8


def test_addcmul_grn_mean_over_channels_is_exact():
    """GRN divides by a mean over the channels: a removed channel is zero there, so the slim
    model's mean divides the same sum by the full count and the group stays exact."""
    res = equiv(AffineAddcmul(grn=True), [tokens()])
    g = group_of(res.prog, "fc1.weight")
    assert_prunable(g, "GRN")
    assert "mean_full_count" in res.slim.code


def test_export_in_place_add_and_antialiased_resampling():
    """``x += y`` exports as ``aten.add_.Tensor`` and an anti-aliased bicubic resize as
    ``aten._upsample_bicubic2d_aa``: both keep channels, so the residual group prunes."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            z = self.b(torch.relu(y))
            z += y
            return self.head(F.interpolate(z, scale_factor=0.5, mode="bicubic", antialias=True))

    res = equiv(M(), [image()], frontend="export")
    targets = {n.target for n in res.prog.module.graph.nodes}
    aten = torch.ops.aten
    assert aten.add_.Tensor in targets and aten._upsample_bicubic2d_aa.vec in targets, targets
    assert_prunable(group_of(res.prog, "a.weight"), "residual through add_ and a bicubic resize")


class OptionalMask(nn.Module):
    """``forward(x, mask=None)`` that branches on ``mask is not None`` (timm's Hiera)."""

    def __init__(self):
        super().__init__()
        self.a = ConvBNAct(3, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x, mask=None, scale: float = 1.0):
        y = self.a(x)
        if mask is not None:
            y = y * mask.unsqueeze(1)
        return self.head(y) * scale


def test_parameters_after_the_example_inputs_keep_their_defaults():
    """A parameter the example inputs do not give is fixed at its default for tracing, as the
    call with these inputs has it: ``mask=None`` takes the unmasked branch; a mask given as an
    input is traced as a tensor."""
    from fxprune.testing import check_equivalence

    x = image()
    for inputs in ((x,), {"x": x}):
        res = check_equivalence(OptionalMask(), inputs, frontend="fx")
        assert [n.name for n in res.prog.module.graph.nodes if n.op == "placeholder"] == ["x"]
        assert_prunable(group_of(res.prog, "a.0.weight"))
    mask = torch.rand(x.shape[0], *x.shape[2:])
    model = OptionalMask().eval()
    prog = fxprune.compile(model, (x, mask), frontend="fx")
    assert [n.name for n in prog.module.graph.nodes if n.op == "placeholder"] == ["x", "mask"]
    torch.testing.assert_close(prog.module(x, mask), model(x, mask))


class ConvPositionHeads(nn.Module):
    """Attention plus depthwise convs over the values laid out as an image, one per block of
    heads (1 and 3 heads, kernels 3 and 5), multiplied into the queries per head (CoaT's
    convolutional relative position encoding)."""

    HEADS, WIDTH, SIDE = 4, 5, 4  # the head width at least the head count, as in CoaT

    def __init__(self):
        super().__init__()
        d = self.WIDTH
        self.qkv = nn.Linear(10, 3 * self.HEADS * d)
        self.dw = nn.ModuleList([nn.Conv2d(d, d, 3, padding=1, groups=d),
                                 nn.Conv2d(3 * d, 3 * d, 5, padding=2, groups=3 * d)])
        self.proj = nn.Linear(self.HEADS * d, 6)

    def forward(self, x):
        b, n, _ = x.shape
        h, d, s = self.HEADS, self.WIDTH, self.SIDE
        q, k, v = self.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) each
        a = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
        blocks = torch.split(v.transpose(-1, -2).reshape(b, h * d, s, s), [d, 3 * d], dim=1)
        pos = torch.cat([self.dw[0](blocks[0]), self.dw[1](blocks[1])], dim=1)
        pos = pos.reshape(b, h, d, n).transpose(-1, -2)
        return self.proj((a + q * pos).transpose(1, 2).reshape(b, n, h * d))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_depthwise_conv_over_heads_keeps_head_groups(frontend):
    """The depthwise convs take their input's channel elements, so the values' (head, width)
    layout survives them and the heads stay prunable: two groups, the head of the first conv
    and the three of the second, each with its conv's filters."""
    res = equiv(ConvPositionHeads(), [tokens(n=16)], frontend=frontend)
    heads = sorted(groups_with(res.prog, "qkv.weight", 0), key=lambda g: g.size)
    assert [g.size for g in heads] == [1, 3], heads
    for g, conv in zip(heads, ("dw.0.weight", "dw.1.weight")):
        assert_prunable(g, "heads through a depthwise position conv")
        assert any(s.param == conv for s in g.slices), repr(g)
    assert res.slim.get_parameter("dw.1.weight").shape[0] < 3 * ConvPositionHeads.WIDTH
