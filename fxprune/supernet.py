"""A super-network with redundant operators, for the erasing mode (OTOv3, arXiv 2312.09411).

:class:`DartsSupernet` is a small DARTS-style cell network (Liu et al., "DARTS: Differentiable
Architecture Search", ICLR 2019) without architecture weights: every edge of every cell holds
*all* candidate operators, and a cell node is the plain sum of every operator on every edge
into it (plus the identity where the edge keeps the resolution). Each parametric operator
is one erasable unit, so H2SPG picks the architecture by erasing operators, and the slim
network it exports is the searched cell structure, already trained.

Built for small images (the 8x8 digits upsampled to 32x32 of :mod:`fxprune.data`) and cheap
enough to train on a laptop CPU: a 3x3 stem (stride 2 by default, 32x32 -> 16x16), ``layers``
cells with a reduction cell (stride 2, doubled width) at 1/3 and 2/3 of the depth, global
average pooling and a linear classifier. The default has 3 cells of 2 nodes with 3 operators
on each of the 5 edges of a cell: 45 erasable operators.

Candidate operators (``ops``): ``"sep_conv_3x3"`` / ``"sep_conv_5x5"`` (DARTS's separable
convolution, applied twice), ``"dil_conv_3x3"`` (dilated separable), ``"conv_1x1"`` and
``"conv_3x3"`` (ReLU-conv-BN), ``"skip_connect"`` (identity, on stride-1 edges only; no
parameters, so never erased).
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
from torch import nn

__all__ = ["DartsSupernet", "darts_supernet", "OPS"]


def _relu_conv_bn(c: int, k: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, k, stride, k // 2, bias=False), nn.BatchNorm2d(c))


def _sep_conv(c: int, k: int, stride: int) -> nn.Module:
    p = k // 2
    return nn.Sequential(
        nn.ReLU(), nn.Conv2d(c, c, k, stride, p, groups=c, bias=False), nn.Conv2d(c, c, 1, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(), nn.Conv2d(c, c, k, 1, p, groups=c, bias=False), nn.Conv2d(c, c, 1, bias=False),
        nn.BatchNorm2d(c))


def _dil_conv(c: int, k: int, stride: int) -> nn.Module:
    return nn.Sequential(
        nn.ReLU(), nn.Conv2d(c, c, k, stride, k // 2 * 2, dilation=2, groups=c, bias=False),
        nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))


def _preprocess(c_in: int, c: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.ReLU(), nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))


OPS: Dict[str, Callable[[int, int], nn.Module]] = {
    "sep_conv_3x3": lambda c, s: _sep_conv(c, 3, s),
    "sep_conv_5x5": lambda c, s: _sep_conv(c, 5, s),
    "dil_conv_3x3": lambda c, s: _dil_conv(c, 3, s),
    "conv_1x1": lambda c, s: _relu_conv_bn(c, 1, s),
    "conv_3x3": lambda c, s: _relu_conv_bn(c, 3, s),
}


class Cell(nn.Module):
    """A DARTS cell with every candidate operator on every edge.

    Inputs: the outputs of the two previous cells, brought to ``c`` channels (and, after a
    reduction, to the same resolution) by a ReLU-conv-BN each. Node ``j`` (``0 <= j < steps``)
    sums every operator applied to every earlier state (the two inputs and nodes ``< j``); the
    cell's output concatenates its nodes (``steps * c`` channels).
    """

    def __init__(self, c_prev_prev: int, c_prev: int, c: int, reduction: bool, reduction_prev: bool,
                 ops: Sequence[str], steps: int, skip: bool):
        super().__init__()
        self.reduction = reduction
        self.steps = steps
        self.pre0 = _preprocess(c_prev_prev, c, 2 if reduction_prev else 1)
        self.pre1 = _preprocess(c_prev, c, 1)
        self.edges = nn.ModuleList()
        self.skips = []
        for j in range(steps):
            for i in range(2 + j):
                stride = 2 if reduction and i < 2 else 1
                self.edges.append(nn.ModuleDict({name: OPS[name](c, stride) for name in ops}))
                self.skips.append(skip and stride == 1)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        k = 0
        for _ in range(self.steps):
            total = None
            for h in states:
                terms = [op(h) for op in self.edges[k].values()]
                if self.skips[k]:
                    terms.append(h)
                for t in terms:
                    total = t if total is None else total + t
                k += 1
            states.append(total)
        return torch.cat(states[2:], dim=1)


class DartsSupernet(nn.Module):
    """A DARTS-style super-network (see the module docstring).

    Args:
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.
        width: channels of a cell node in the first stage (doubled at each reduction).
        layers: number of cells (reductions at ``layers // 3`` and ``2 * layers // 3``).
        steps: nodes per cell.
        ops: candidate operators on every edge (names of :data:`OPS`).
        skip: add the identity to every stride-1 edge.
        stem_stride: stride of the stem convolution.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 8, layers: int = 3, steps: int = 2,
                 ops: Sequence[str] = ("sep_conv_3x3", "conv_3x3", "conv_1x1"), skip: bool = True,
                 stem_stride: int = 2):
        super().__init__()
        unknown = [o for o in ops if o not in OPS]
        if unknown:
            raise ValueError(f"unknown operators {unknown}; choose from {sorted(OPS)}")
        c_stem = 3 * width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c_stem, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(c_stem))
        c_pp, c_p, c = c_stem, c_stem, width
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = layers >= 3 and i in (layers // 3, 2 * layers // 3)
            if reduction:
                c *= 2
            self.cells.append(Cell(c_pp, c_p, c, reduction, reduction_prev, ops, steps, skip))
            reduction_prev = reduction
            c_pp, c_p = c_p, steps * c
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_p, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(torch.flatten(self.pool(s1), 1))


def darts_supernet(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """``--model fxprune.supernet:darts_supernet``: the default :class:`DartsSupernet`."""
    return DartsSupernet(num_classes=num_classes, in_channels=in_channels)
