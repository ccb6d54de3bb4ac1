"""Erasing operators (OTOv3): the erasable pass, the erase rewrite and the Program API.

The central check: zero the parameters of a random valid subset of a model's erasable
operators, construct, and compare with the zeroed full model in float64, eval mode (relative
difference at most 1e-6), over residual networks (torchvision ResNet, MobileNetV2, ConvNeXt),
DenseNet, Inception-style blocks and the DARTS super-network; the slim graph must have fewer
nodes and modules. Then the cases that must *not* be erased, each with its reason.

Fast tier: small inputs; ``-m slow`` adds DenseNet-121, GoogLeNet, Inception-v3 and others, each
also with channel pruning.
"""
from __future__ import annotations

import copy
import random
import warnings
from typing import List, Optional

import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
from fxprune.passes.erasable import joint_of
from fxprune.passes.erase_rewrite import erase_rewrite
from fxprune.program import max_output_difference
from fxprune.supernet import DartsSupernet
from fxprune.testing import random_masks, randomize_norms
from models_zoo_small import inputs_reaching_output

RTOL = 1e-6


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norm statistics and affine parameters, and non-zero biases: a forgotten constant
    cannot hide behind a default zero."""
    randomize_norms(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith("bias") and not p.any():
            p.copy_(0.1 * torch.randn(p.shape, generator=g).to(p))
    return model


def random_valid_subset(prog, seed: int, p: float = 0.6) -> List[int]:
    """A random set of erasables that the program says can be erased together."""
    rng = random.Random(seed)
    eg = prog.erase_graph
    ids = [e.id for e in prog.erasables]
    rng.shuffle(ids)
    chosen: List[int] = []
    for i in ids:
        if rng.random() < p and eg.plan(chosen + [i]).valid:
            chosen.append(i)
    return sorted(chosen)


def _count_modules(m: nn.Module) -> int:
    return sum(1 for _ in m.modules())


def erase_check(model: nn.Module, inputs, *, seed: int = 0, mode="erase", p: float = 0.6,
                min_erasables: int = 1, chosen: Optional[List[int]] = None, **kw):
    """Zero a random valid subset of erasables (and, with mode ("prune", "erase"), random channels),
    construct, and assert the slim model equals the zeroed full one and is smaller."""
    model = _randomize(copy.deepcopy(model).double().eval(), seed)
    inputs = tuple(x.double() if x.is_floating_point() else x for x in
                   (inputs if isinstance(inputs, (tuple, list)) else (inputs,)))
    prog = fxprune.compile(model, inputs, mode=mode, **kw)
    assert len(prog.erasables) >= min_erasables, prog.module.meta["fxprune.erasables_rejected"]
    if chosen is None:
        chosen = random_valid_subset(prog, seed, p)
    masks = random_masks(prog, seed) if "prune" in prog.modes else None
    prog.zero_(masks=masks, erasables=chosen)
    assert set(chosen) <= set(prog.zero_erasables())
    slim = prog.construct_subnet(verify=False)
    diff, scale = max_output_difference(prog.module, slim, prog.example_inputs)
    assert diff <= RTOL * max(scale, 1e-12), f"slim differs from the zeroed model: {diff:.3e} (scale {scale:.3e})"
    if chosen:
        assert len(slim.graph.nodes) < len(prog.module.graph.nodes)
        assert _count_modules(slim) < _count_modules(prog.module)
        names = {n.name for n in slim.graph.nodes}
        for e in prog.erase_graph.plan(chosen).units:
            assert not set(prog.erasables[e].nodes) & names
    _check_connected(slim)
    return prog, slim, chosen


def _check_connected(gm: torch.fx.GraphModule) -> None:
    """Every input of the slim graph still reaches its output."""
    placeholders = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    assert inputs_reaching_output(gm) == placeholders, "an input no longer reaches the output"


def image(side: int = 32, batch: int = 1, channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, side, side, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------
# small models
# ----------------------------------------------------------------------------------------------


def conv_bn(cin: int, cout: int, k: int = 3, relu: bool = True) -> nn.Module:
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class InceptionBlock(nn.Module):
    """Inception-style block: a 1x1 branch, a 1x1 -> (1x3 | 3x1) branch whose two halves are
    concatenated again (a nested unit), a 3x3 double branch and a pooled branch, concatenated;
    then a BatchNorm-ReLU-conv consumer (the dropped columns' BatchNorm entries go too)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.b1 = conv_bn(c, 4, 1)
        self.b2 = conv_bn(c, 6, 1)
        self.b2a = nn.Sequential(nn.Conv2d(6, 4, (1, 3), padding=(0, 1)), nn.BatchNorm2d(4))
        self.b2b = nn.Sequential(nn.Conv2d(6, 4, (3, 1), padding=(1, 0)), nn.BatchNorm2d(4))
        self.b3 = nn.Sequential(conv_bn(c, 4), conv_bn(4, 4))
        self.b4 = nn.Sequential(nn.AvgPool2d(3, 1, 1), conv_bn(c, 4, 1))
        self.post = nn.Sequential(nn.BatchNorm2d(20), nn.ReLU(), nn.Conv2d(20, c, 1))

    def forward(self, x):
        y = self.b2(x)
        b2 = torch.cat([self.b2a(y), self.b2b(y)], 1)
        return self.post(torch.cat([self.b1(x), b2, self.b3(x), self.b4(x)], 1))


class InceptionNet(nn.Module):
    def __init__(self, c: int = 8, blocks: int = 2, summed: bool = False):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.blocks = nn.ModuleList(InceptionBlock(c) if not summed else SumBlock(c) for _ in range(blocks))
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.fc(x.mean((2, 3)))


class SumBlock(nn.Module):
    """Multi-branch sum (Inception-ResNet / DARTS node): x + b1(x) + b2(x) + b3(x)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.b1 = conv_bn(c, c, 1, relu=False)
        self.b2 = nn.Sequential(conv_bn(c, c), conv_bn(c, c, relu=False))
        self.b3 = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, groups=c), nn.Conv2d(c, c, 1),
                                nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.b1(x) + self.b2(x) + self.b3(x))


def small_densenet() -> nn.Module:
    return torchvision.models.DenseNet(growth_rate=6, block_config=(3, 3), num_init_features=8, bn_size=2,
                                       num_classes=5)


def small_supernet(**kw) -> nn.Module:
    kw.setdefault("width", 4)
    return DartsSupernet(num_classes=5, **kw)


# ----------------------------------------------------------------------------------------------
# equivalence: erase a random valid subset
# ----------------------------------------------------------------------------------------------

FAST = [
    ("resnet18", lambda: torchvision.models.resnet18(num_classes=10), 32, 11),
    ("resnet50", lambda: torchvision.models.resnet50(num_classes=10), 32, 20),
    ("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(num_classes=10), 32, 10),
    ("convnext_tiny", lambda: torchvision.models.convnext_tiny(num_classes=10), 32, 18),
    ("densenet_small", small_densenet, 32, 6),
    ("inception_blocks", lambda: InceptionNet(), 12, 12),
    ("multi_branch_sum", lambda: InceptionNet(summed=True), 12, 6),
    ("darts_supernet", small_supernet, 32, 45),
]


@pytest.mark.parametrize("name,build,side,count", FAST, ids=[f[0] for f in FAST])
def test_erase_equivalence(name, build, side, count):
    torch.manual_seed(0)
    prog, slim, chosen = erase_check(build(), image(side), seed=1)
    assert len(prog.erasables) == count
    assert chosen


@pytest.mark.parametrize("seed", [2, 3])
def test_erase_equivalence_more_subsets(seed):
    torch.manual_seed(seed)
    erase_check(InceptionNet(), image(12), seed=seed, p=0.8)
    erase_check(small_supernet(), image(32), seed=seed, p=0.8)


SLOW = [("resnet50", 32), ("convnext_tiny", 32), ("densenet121", 32), ("googlenet", 64), ("inception_v3", 80),
        ("efficientnet_b0", 32), ("squeezenet1_0", 64), ("regnet_x_400mf", 32)]


@pytest.mark.slow
@pytest.mark.parametrize("name,side", SLOW, ids=[s[0] for s in SLOW])
@pytest.mark.parametrize("mode", ["erase", ("prune", "erase")], ids=["erase", "both"])
def test_erase_equivalence_zoo(name, side, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, num_classes=10, **(
            {"init_weights": True} if name in ("googlenet", "inception_v3") else {}))
    erase_check(model, image(side), seed=0, mode=mode)


@pytest.mark.parametrize("build,side", [(lambda: torchvision.models.resnet18(num_classes=10), 32),
                                        (small_densenet, 32), (lambda: InceptionNet(), 12), (small_supernet, 32)],
                         ids=["resnet18", "densenet_small", "inception_blocks", "darts_supernet"])
def test_prune_and_erase_together(build, side):
    """mode=("prune", "erase"): whole operators go, and channels are pruned in the rest."""
    torch.manual_seed(0)
    prog, slim, chosen = erase_check(build(), image(side), seed=4, mode=("prune", "erase"))
    assert prog.modes == ("prune", "erase")
    full_params = sum(p.numel() for p in prog.module.parameters())
    erased = prog.erase_graph.plan(chosen).units
    erased_params = sum(prog.erasables[e].num_params for e in erased if not prog.erasables[e].children)
    # channels were pruned too: the slim model lost more than the erased operators
    assert sum(p.numel() for p in slim.parameters()) < full_params - erased_params


# ----------------------------------------------------------------------------------------------
# what the pass finds
# ----------------------------------------------------------------------------------------------


def test_resnet_units_are_residual_branches_and_downsamples():
    prog = fxprune.compile(torchvision.models.resnet18().eval(), image(32), mode="erase")
    sinks = [e.sink for e in prog.erasables]
    assert sinks == ["layer1_0_bn2", "layer1_1_bn2", "layer2_0_bn2", "layer2_0_downsample_1", "layer2_1_bn2",
                     "layer3_0_bn2", "layer3_0_downsample_1", "layer3_1_bn2", "layer4_0_bn2",
                     "layer4_0_downsample_1", "layer4_1_bn2"]
    e = prog.erasables[0]
    assert e.nodes == ["layer1_0_conv1", "layer1_0_bn1", "layer1_0_relu", "layer1_0_conv2", "layer1_0_bn2"]
    assert e.params == ["layer1.0.bn1.bias", "layer1.0.bn1.weight", "layer1.0.bn2.bias", "layer1.0.bn2.weight",
                        "layer1.0.conv1.weight", "layer1.0.conv2.weight"]
    assert e.kind == "sum" and e.joints == ["add"] and not e.slices and not e.channels
    assert e.num_params == 2 * 64 * 64 * 9 + 4 * 64
    assert e.flops == 2 * 2 * (64 * 64 * 9) * 8 * 8  # two 3x3 convs at 8x8, 2 FLOPs per MAC
    # a block's branch and its downsample shortcut: each can go, not both
    eg = prog.erase_graph
    assert eg.plan([2]).valid and eg.plan([3]).valid and not eg.plan([2, 3]).valid


def test_nested_units_and_parents():
    prog = fxprune.compile(InceptionNet(blocks=1).eval(), image(12), mode="erase")
    by_sink = {e.sink: e for e in prog.erasables}
    outer = next(e for e in prog.erasables if e.children)
    inner = [prog.erasables[i] for i in outer.children]
    assert {"blocks_0_b2_0", "cat"} <= set(outer.nodes)  # the 1x1 conv of the split branch, the inner concat
    assert len(inner) == 2 and all(outer.id in e.parents for e in inner)
    assert all(set(e.nodes) < set(outer.nodes) for e in inner)
    assert len(by_sink) == 6  # b1, b2 (outer), b2a, b2b, b3, b4
    # a concat branch takes the consumer's BatchNorm entries of its columns with it
    e = by_sink["blocks_0_b1_2"]
    assert e.kind == "concat" and {s.param for s in e.slices} == {"blocks.0.post.0.weight", "blocks.0.post.0.bias"}
    assert all(len(s.index) == 4 for s in e.slices)
    g, ch = next(iter(e.channels.items()))
    assert len(ch) == 4
    # erasing both halves of the inner concat erases it, and leaves the 1x1 conv unused
    plan = prog.erase_graph.plan([i.id for i in inner])
    assert plan.valid and "blocks_0_b2_0" in plan.removed and outer.sink in plan.dead
    assert all({s.param for s in e.slices} == {"blocks.0.post.0.weight", "blocks.0.post.0.bias"} for e in inner)


def test_darts_parents_and_dead_nodes():
    """A cell node whose operators are all erased disappears from the cell's concat; every
    operator reading it must be erased too (its parents)."""
    prog = fxprune.compile(small_supernet(skip=False).eval(), image(32), mode="erase")
    eg = prog.erase_graph
    into, reading = {}, {}
    for e in prog.erasables:
        if e.nodes[0].startswith("cells_1_edges_"):
            edge = int(e.nodes[0].split("_")[3])
            (into if edge < 2 else reading).setdefault(edge, []).append(e.id)
    ops_node0 = into[0] + into[1]           # every operator into node 0 of cell 1
    ops_from_node0 = reading[4]             # node 1's edge from node 0 (edges 2, 3 from the inputs)
    for e in ops_from_node0:
        assert set(ops_node0) <= set(prog.erasables[e].parents)
    assert not eg.plan(ops_node0).valid
    plan = eg.plan(ops_node0 + ops_from_node0)
    assert plan.valid and plan.drop  # node 0's columns leave the concat
    erase_check(small_supernet(skip=False), image(32), chosen=ops_node0 + ops_from_node0, seed=5)


def test_supernet_structure():
    net = DartsSupernet()
    prog = fxprune.compile(net.eval(), image(32), mode="erase")
    assert len(prog.erasables) == 45 and all(e.kind == "sum" for e in prog.erasables)
    # operators reading a cell input have no parents; those reading node 0 depend on the operators
    # summed into it, except in the normal cell, where node 0 also sums its inputs (identity edges)
    assert sum(1 for e in prog.erasables if not e.parents) == 3 * 4 * 3 + 3


# ----------------------------------------------------------------------------------------------
# what must not be erased
# ----------------------------------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self, branch, combine=lambda x, f: x + f, c: int = 4):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.branch = branch
        self.combine = combine
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(self.combine(x, self.branch(x)).mean((2, 3)))


def _rejected(model, x=None) -> dict:
    prog = fxprune.compile(model.eval(), image(8) if x is None else x, mode="erase")
    assert not prog.erasables, prog.erasables
    return prog.module.meta["fxprune.erasables_rejected"]


def test_not_erasable_when_zero_is_not_zero():
    why = _rejected(Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Sigmoid())))
    assert "not provably zero" in next(iter(why.values()))
    why = _rejected(Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False))))
    assert "not provably zero" in next(iter(why.values()))


def test_not_erasable_shared_module():
    conv = nn.Conv2d(4, 4, 3, padding=1)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.conv, self.fc = conv_bn(3, 4), conv, nn.Linear(4, 3)

        def forward(self, x):
            x = self.stem(x)
            y = x + self.conv(x)
            return self.fc(self.conv(y).mean((2, 3)))

    why = _rejected(Shared())
    assert any("also used by" in w for w in why.values())


def test_not_erasable_first_operand_of_sub_or_broadcast():
    why = _rejected(Residual(conv_bn(4, 4, relu=False), combine=lambda x, f: f - x))
    assert "cannot drop" in next(iter(why.values()))
    prog = fxprune.compile(Residual(conv_bn(4, 4, relu=False), combine=lambda x, f: x - f).eval(), image(8),
                           mode="erase")
    assert len(prog.erasables) == 1

    class Broadcast(nn.Module):  # (N, C, 1, 1) + (N, C, H, W): without the second term the shape changes
        def __init__(self):
            super().__init__()
            self.stem, self.branch, self.fc = conv_bn(3, 4), conv_bn(4, 4, relu=False), nn.Linear(4, 3)

        def forward(self, x):
            x = self.stem(x)
            return self.fc((x.mean((2, 3), keepdim=True) + self.branch(x)).mean((2, 3)))

    why = _rejected(Broadcast())
    assert "broadcast" in next(iter(why.values()))


def test_not_erasable_when_an_input_would_be_cut_off():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.f, self.g, self.fc = conv_bn(3, 4, relu=False), conv_bn(3, 4, relu=False), nn.Linear(4, 3)

        def forward(self, a, b):
            return self.fc((self.f(a) + self.g(b)).mean((2, 3)))

    why = _rejected(TwoInputs(), (image(8), image(8)))
    assert len(why) == 2 and all("input" in w for w in why.values())


def test_not_erasable_output_or_frozen_concat():
    class CatOut(nn.Module):  # the concat is the model's output: its columns cannot go
        def __init__(self):
            super().__init__()
            self.stem, self.a, self.b = conv_bn(3, 4), conv_bn(4, 4), conv_bn(4, 4)

        def forward(self, x):
            x = self.stem(x)
            return torch.cat([self.a(x), self.b(x)], 1)

    why = _rejected(CatOut())
    assert len(why) == 2 and all("cannot be removed downstream" in w for w in why.values())


def test_not_erasable_inplace_on_shared_input():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.conv = conv_bn(3, 4), nn.Conv2d(4, 4, 1)
            self.bn, self.fc = nn.BatchNorm2d(4), nn.Linear(4, 3)

        def forward(self, x):
            x = self.stem(x)
            return self.fc((x + self.bn(self.conv(x.relu_()))).mean((2, 3)))

    why = _rejected(InPlace())
    assert "in place" in next(iter(why.values()))


def test_invalid_set_is_refused_by_the_rewrite():
    prog = fxprune.compile(torchvision.models.resnet18().eval(), image(32), mode="erase")
    with pytest.raises(fxprune.RewriteError, match="cannot be erased together"):
        erase_rewrite(prog.module, [2, 3])
    # construct_subnet never fails on it: it erases a valid subset and leaves the rest zero
    prog.zero_(erasables=[2, 3])
    slim = prog.construct_subnet()
    assert len(slim.graph.nodes) < len(prog.module.graph.nodes)


# ----------------------------------------------------------------------------------------------
# API
# ----------------------------------------------------------------------------------------------


def test_modes_and_errors():
    m = Residual(conv_bn(4, 4, relu=False)).eval()
    assert fxprune.compile(m, image(8)).erasables == []
    assert fxprune.compile(m, image(8), mode=["erase", "prune"]).modes == ("prune", "erase")
    with pytest.raises(fxprune.UnsupportedInputError):
        fxprune.compile(m, image(8), mode="shrink")
    with pytest.raises(fxprune.FxPruneError, match="mode='erase'"):
        fxprune.compile(m, image(8)).erase_graph
    prog = fxprune.compile(m, image(8), mode="erase")
    assert "erasable" in prog.passes and "erasables=1" in repr(prog) and "Erasable(id=0" in prog.summary()
    assert isinstance(prog.erasables[0], fxprune.Erasable)


def test_zero_and_construct_untouched_model():
    """Nothing zero: construct_subnet returns an equivalent graph with every operator."""
    prog = fxprune.compile(InceptionNet().eval(), image(12), mode="erase")
    assert prog.zero_erasables() == []
    slim = prog.construct_subnet()
    assert len(slim.graph.nodes) == len(prog.module.graph.nodes)


def test_dot_draws_erasables(tmp_path):
    import pydot

    prog = fxprune.compile(InceptionNet(blocks=1).eval(), image(12), mode="erase")
    text = prog.to_dot(str(tmp_path / "g.dot"))
    assert "cluster_erasables" in text and text.count("penwidth=3") > len(prog.erasables)
    assert pydot.graph_from_dot_data(text)


def test_export_front_end():
    """The ATen graph of torch.export has the same erasable operators."""
    torch.manual_seed(0)
    prog, slim, chosen = erase_check(InceptionNet(blocks=1), image(12), seed=2, frontend="export", min_erasables=6)
    fx = fxprune.compile(InceptionNet(blocks=1).eval(), image(12), mode="erase")
    assert len(prog.erasables) == len(fx.erasables)


def test_joint_of():
    g = torch.fx.symbolic_trace(Residual(conv_bn(4, 4, relu=False), combine=lambda x, f: torch.add(x, f, alpha=2)))
    j = [joint_of(n) for n in g.graph.nodes if joint_of(n) is not None]
    assert len(j) == 1 and j[0].kind == "add" and j[0].removable == (1,)
