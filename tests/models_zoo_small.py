"""Small nn.Module definitions and helpers shared by the op, exactness and random-architecture tests.

Everything here is tiny on purpose (a few channels, 8x8 maps) so that hundreds of equivalence
checks run in a few minutes on a laptop CPU.
"""
from __future__ import annotations

import copy
import math
import re
from typing import Callable, Iterable, List, Optional, Sequence

import networkx as nx
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

import fxprune
import fxprune.testing

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter a random, non-trivial value.

    Default initialisations hide bugs (a BatchNorm bias of 0 or a GroupNorm weight of 1 make a
    forgotten slice look harmless), so weights get fan-in scaled normals, every 1-d parameter
    (biases, norm affines, PReLU slopes) gets a value well away from 0 and 1.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.dtype.is_floating_point:
                continue
            if p.dim() >= 2 and p.numel() > p.shape[0]:
                fan_in = max(1, p[0].numel())
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.4 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model


def to_dtype(obj, dtype=torch.float64):
    """Floating tensors inside any nest of tuples/lists/dicts converted to ``dtype``."""
    return tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, obj
    )


def out_shapes(out) -> List[tuple]:
    leaves, spec = tree_flatten(out)
    return [tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in leaves]


def inputs_reaching_output(gm: torch.fx.GraphModule) -> set:
    """Names of the graph's placeholders from which its output node is reachable."""
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n.name)
        g.add_edges_from((i.name, n.name) for i in n.all_input_nodes)
    out = next(n.name for n in gm.graph.nodes if n.op == "output")
    return {n.name for n in gm.graph.nodes if n.op == "placeholder" and nx.has_path(g, n.name, out)}


def group_summary(prog) -> str:
    return "\n".join(repr(g) for g in prog.groups)


def equiv(
    model: nn.Module,
    inputs: Sequence,
    *,
    expect_pruned: bool = True,
    seed: int = 0,
    randomize: bool = True,
    **kwargs,
):
    """Run ``fxprune.testing.check_equivalence`` on a randomised copy of ``model``.

    On top of check_equivalence's own assertions this checks that the slim model's outputs have
    exactly the shapes of the original model's outputs (outputs are never pruned) and, when
    ``expect_pruned``, that the slim model is strictly smaller.
    """
    model = copy.deepcopy(model)
    if randomize:
        randomize_(model, seed)
    model.eval()
    inputs = tuple(inputs)
    with torch.no_grad():
        ref_shapes = out_shapes(model(*copy.deepcopy(inputs)))
    res = fxprune.testing.check_equivalence(model, inputs, seed=seed, **kwargs)
    with torch.no_grad():
        slim_out = res.slim(*to_dtype(copy.deepcopy(inputs)))
    assert out_shapes(slim_out) == ref_shapes, "the slim model's outputs changed shape"
    if expect_pruned:
        assert res.params_slim < res.params_full, (
            f"nothing was pruned ({res.params_slim} >= {res.params_full}); groups:\n"
            + group_summary(res.prog)
        )
    return res


def groups_with(prog, param: str, dim: Optional[int] = None, roles=("out", "in", "buffer")):
    """Groups holding a slice of parameter ``param`` (along ``dim`` when given)."""
    found = []
    for g in prog.groups:
        for s in list(g.slices) + list(g.dependents):
            if s.param == param and (dim is None or s.dim == dim) and s.role in roles:
                found.append(g)
                break
    return found


def group_of(prog, param: str, dim: int = 0):
    """The one group whose producer (or consumer) slice is ``param`` along ``dim``."""
    gs = groups_with(prog, param, dim)
    assert gs, f"no group holds {param}[dim {dim}]; groups:\n{group_summary(prog)}"
    assert len({g.id for g in gs}) == 1, f"{param}[dim {dim}] is in several groups: {gs}"
    return gs[0]


def mentions(reason: Optional[str], names: Iterable[str]) -> bool:
    if not reason:
        return False
    return any(re.search(r"(?<![\w.])" + re.escape(n) + r"(?![\w])", reason) for n in names)


def assert_prunable(group, what: str = ""):
    assert group.prunable and group.exact, f"{what}: expected a prunable exact group, got {group!r}"


def assert_exact_or_explained(group, node_names: Iterable[str], what: str = ""):
    """A group is either prunable and exact (then check_equivalence verified it) or carries a
    reason naming one of ``node_names``."""
    node_names = list(node_names)
    if group.prunable and group.exact:
        return
    assert mentions(group.reason, node_names), (
        f"{what}: group {group.id} is frozen/inexact but its reason does not name any of "
        f"{node_names}: {group!r}"
    )


def assert_exact_or_frozen(group, what: str = ""):
    """Either prunable and exact (check_equivalence verified it) or frozen/inexact with a reason."""
    if group.prunable and group.exact:
        return
    assert group.reason, f"{what}: group {group.id} is frozen/inexact without a reason: {group!r}"


def assert_frozen_by(group, node_names: Iterable[str], what: str = ""):
    node_names = list(node_names)
    assert not group.prunable, f"{what}: expected a frozen group, got {group!r}"
    assert mentions(group.reason, node_names), (
        f"{what}: reason of group {group.id} does not name any of {node_names}: {group!r}"
    )


def nodes_where(gm: torch.fx.GraphModule, pred: Callable[[torch.fx.Node], bool]) -> List[torch.fx.Node]:
    return [n for n in gm.graph.nodes if pred(n)]


def probe_nodes(gm: torch.fx.GraphModule, prefix: str = "probe") -> List[str]:
    """Names of the nodes created inside the ``probe`` submodule of a test model.

    Works for leaf modules (``call_module probe``) and for traced-through ones, whose nodes carry
    the module path in ``nn_module_stack``.
    """
    names = []
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        if n.op == "call_module" and (n.target == prefix or str(n.target).startswith(prefix + ".")):
            names.append(n.name)
            continue
        stack = n.meta.get("nn_module_stack") or {}
        paths = [v[0] if isinstance(v, tuple) else v for v in stack.values()]
        if any(p == prefix or str(p).startswith(prefix + ".") for p in paths):
            names.append(n.name)
    return names


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: (16,), 2: (8, 8), 3: (4, 4, 4)}


def image(dims: int = 2, batch: int = 2, channels: int = 3, seed: int = 0, size=None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *(size or SPATIAL[dims]), generator=gen)


class Fn(nn.Module):
    """Wraps a plain function (traced through, so it becomes call_function/call_method nodes)."""

    def __init__(self, fn: Callable, name: str = ""):
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, *args):
        return self.fn(*args)

    def extra_repr(self) -> str:
        return self.name


class Sandwich(nn.Module):
    """conv(3 -> c_in) -> BN -> probe -> conv(c_out -> c2, k) -> ReLU -> conv(c2 -> 4, 1).

    The group of ``conv1`` (its out-channels) is the one that flows through ``probe``.
    """

    def __init__(self, probe: nn.Module, c_in: int = 8, c_out: Optional[int] = None, dims: int = 2,
                 k: int = 1, bn: bool = True, c2: int = 6):
        super().__init__()
        c_out = c_in if c_out is None else c_out
        self.conv1 = CONV[dims](3, c_in, 3, padding=1)
        self.bn1 = BN[dims](c_in) if bn else nn.Identity()
        self.probe = probe
        self.conv2 = CONV[dims](c_out, c2, k, padding=k // 2)
        self.act2 = nn.ReLU()
        self.conv3 = CONV[dims](c2, 4, 1)

    def forward(self, x):
        x = self.probe(self.bn1(self.conv1(x)))
        return self.conv3(self.act2(self.conv2(x)))


class TokenSandwich(nn.Module):
    """Linear(10 -> c) -> probe -> Linear(c -> 6) -> ReLU -> Linear(6 -> 3) over (B, N, 10)."""

    def __init__(self, probe: nn.Module, c: int = 8, c_out: Optional[int] = None):
        super().__init__()
        c_out = c if c_out is None else c_out
        self.fc1 = nn.Linear(10, c)
        self.probe = probe
        self.fc2 = nn.Linear(c_out, 6)
        self.act2 = nn.ReLU()
        self.fc3 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.probe(self.fc1(x)))))


def tokens(batch: int = 2, n: int = 5, dim: int = 10, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, dim, generator=gen)


class ConvBNAct(nn.Sequential):
    def __init__(self, cin, cout, k=3, stride=1, groups=1, act=nn.ReLU, dims=2, bias=False):
        super().__init__(
            CONV[dims](cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias),
            BN[dims](cout),
            act() if act is not None else nn.Identity(),
        )


class SEConv(nn.Module):
    """torchvision-style squeeze-excitation with 1x1 convs and a hard-sigmoid gate."""

    def __init__(self, c, hidden, gate=nn.Hardsigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, c, 1)
        self.gate = gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = self.gate(self.fc2(F.relu(self.fc1(s))))
        return x * s


class SELinear(nn.Module):
    """SE gate with Linear layers: x * sigmoid(fc2(relu(fc1(mean(x)))))[:, :, None, None]."""

    def __init__(self, c, hidden, reshape: str = "index"):
        super().__init__()
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c)
        self.reshape = reshape
        self.c = c

    def forward(self, x):
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        if self.reshape == "index":
            s = s[:, :, None, None]
        elif self.reshape == "view":
            s = s.view(x.size(0), x.size(1), 1, 1)
        elif self.reshape == "unsqueeze":
            s = s.unsqueeze(-1).unsqueeze(-1)
        elif self.reshape == "const":
            s = s.reshape(-1, self.c, 1, 1)
        return x * s


def channel_shuffle_dynamic(x, groups: int):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleConst(nn.Module):
    """Channel shuffle with every size written as a constant (must be recomputed on pruning)."""

    def __init__(self, c: int, groups: int, hw=(8, 8)):
        super().__init__()
        self.c, self.groups, self.hw = c, groups, hw

    def forward(self, x):
        h, w = self.hw
        x = x.view(2, self.groups, self.c // self.groups, h, w)
        x = x.transpose(1, 2).contiguous()
        return x.view(2, self.c, h, w)


class ShuffleV2Block(nn.Module):
    """ShuffleNetV2 stride-1 unit: chunk, branch on one half, cat, channel shuffle."""

    def __init__(self, c: int):
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(
            ConvBNAct(h, h, 1),
            ConvBNAct(h, h, 3, groups=h, act=None),
            ConvBNAct(h, h, 1),
        )

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat((x1, self.branch(x2)), dim=1)
        return channel_shuffle_dynamic(out, 2)


class TinyUNet(nn.Module):
    def __init__(self, c=4, up: str = "convt"):
        super().__init__()
        self.enc1 = ConvBNAct(3, c)
        self.enc2 = ConvBNAct(c, 2 * c)
        self.mid = ConvBNAct(2 * c, 2 * c)
        if up == "convt":
            self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        else:
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                    nn.Conv2d(2 * c, c, 1))
        self.dec = ConvBNAct(2 * c, c)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.mid(self.enc2(F.max_pool2d(e1, 2)))
        d = torch.cat([e1, self.up(e2)], dim=1)
        return self.head(self.dec(d))


class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size=2):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, feats: List[torch.Tensor]):
        x = torch.cat(feats, 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class TinyDenseNet(nn.Module):
    def __init__(self, stem=6, growth=4, layers=3):
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        self.layers = nn.ModuleList(DenseLayer(stem + i * growth, growth) for i in range(layers))
        c = stem + layers * growth
        self.trans = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                                   nn.AvgPool2d(2))
        self.norm = nn.BatchNorm2d(c // 2)
        self.fc = nn.Linear(c // 2, 3)

    def forward(self, x):
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(feats))
        x = self.trans(torch.cat(feats, 1))
        x = F.relu(self.norm(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TinyResNet(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = ConvBNAct(3, c)
        self.b1 = nn.Sequential(ConvBNAct(c, c), ConvBNAct(c, c, act=None))
        self.b2 = nn.Sequential(ConvBNAct(c, c, 1), ConvBNAct(c, c, act=None))
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.b1(x))
        x = F.relu(self.b2(x) + x)
        return self.fc(x.mean((2, 3)))
