"""Symbolic shapes: every channel dimension's size as a sympy expression in group sizes.

A dimension that holds each channel of group ``g`` ``m`` times has size ``m*c_g`` (a
flattened ``C x 7 x 7`` feature map: ``49*c3``); a concat adds terms (``c3 + c7``); a slice
that takes part of a group's channels gets a symbol of its own for that subset. After
pruning, substituting the kept counts gives the new size of every dimension, which is how the
prune rewrite recomputes the constant arguments of ``view``, ``split``, slicing and the like.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import sympy
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .channels import TensorChannels, Track, unique_sorted

META_SHAPE = "fxprune.shape"


class SymbolicShapes:
    def __init__(self, group_of: np.ndarray, channel_of: np.ndarray, sizes: Sequence[int]):
        """``group_of[e]``/``channel_of[e]``: group and channel of channel element ``e`` (-1: none);
        ``sizes[g]``: number of channels of group ``g``."""
        self.group_of = group_of
        self.channel_of = channel_of
        self.sizes = list(sizes)
        self.full = [sympy.Symbol(f"c{g}", positive=True, integer=True) for g in range(len(self.sizes))]
        self.subsets: Dict[sympy.Symbol, Tuple[int, np.ndarray]] = {}
        self._subset_ids: Dict[Tuple[int, bytes], sympy.Symbol] = {}

    def _subset(self, g: int, channels: np.ndarray) -> sympy.Symbol:
        key = (g, channels.tobytes())
        sym = self._subset_ids.get(key)
        if sym is None:
            sym = sympy.Symbol(f"c{g}_{len(self._subset_ids)}", positive=True, integer=True)
            self._subset_ids[key] = sym
            self.subsets[sym] = (g, channels)
        return sym

    def size(self, track: Optional[Track], concrete: int = 0) -> sympy.Expr:
        """Size of a dimension: ``concrete`` if it carries no channels."""
        if track is None:
            return sympy.Integer(concrete)
        g = self.group_of[track.units]
        c = self.channel_of[track.units]
        terms = [sympy.Integer(int((g < 0).sum()))]
        for gid in unique_sorted(g[g >= 0]).tolist():
            counts = np.bincount(c[g == gid], minlength=self.sizes[gid])
            for m in unique_sorted(counts[counts > 0]).tolist():
                chans = np.flatnonzero(counts == m)
                sym = self.full[gid] if len(chans) == self.sizes[gid] else self._subset(gid, chans)
                terms.append(m * sym)
        return sympy.Add(*terms)

    def shape(self, tc: TensorChannels) -> Tuple[sympy.Expr, ...]:
        return tuple(self.size(t, s) for s, t in zip(tc.shape, tc.dims))

    def value(self, sym: sympy.Symbol, keep: Mapping[int, np.ndarray]) -> int:
        """Kept channels counted by ``sym``: ``keep[g]`` is a bool keep-mask (missing: all kept)."""
        if sym in self.subsets:
            g, chans = self.subsets[sym]
            return int(np.asarray(keep[g])[chans].sum()) if g in keep else len(chans)
        g = int(sym.name[1:])
        return int(np.asarray(keep[g]).sum()) if g in keep else self.sizes[g]

    def evaluate(self, expr: sympy.Expr, keep: Mapping[int, np.ndarray]) -> int:
        """The value of a size expression once the channels outside ``keep`` are removed."""
        return int(expr.xreplace({sym: self.value(sym, keep) for sym in expr.free_symbols}))


class SymbolicShapesPass(PassBase):
    """Attach ``node.meta["fxprune.shape"]``: each tensor's shape with channel dims as sympy
    expressions in group sizes (``(1, c3 + c7, 56, 56)``)."""

    name = "symbolic_shapes"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        ca = gm.meta["fxprune"]
        sym = SymbolicShapes(ca.index.group, ca.index.channel, [g.size for g in ca.groups])
        ca.sym = sym
        sizes: Dict[int, Tuple[np.ndarray, sympy.Expr]] = {}  # id(units) -> (units, size); holds units: ids stay unique

        def shape_of(tc: TensorChannels) -> Tuple[sympy.Expr, ...]:
            """``sym.shape(tc)``, each element array sized once (tracks often share theirs)."""
            out = []
            for concrete, track in zip(tc.shape, tc.dims):
                if track is None:
                    out.append(sympy.Integer(concrete))
                    continue
                if id(track.units) not in sizes:
                    sizes[id(track.units)] = (track.units, sym.size(track))
                out.append(sizes[id(track.units)][1])
            return tuple(out)

        for node in gm.graph.nodes:
            node.meta[META_SHAPE] = _map(ca.analysis.channels.get(node.name), shape_of)
        return PassResult(gm, False)


def _map(value, shape_of):
    if isinstance(value, TensorChannels):
        return shape_of(value)
    if isinstance(value, (list, tuple)):
        return tuple(_map(v, shape_of) for v in value)
    return None
