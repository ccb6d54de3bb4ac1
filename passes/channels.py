"""Channel algebra: the per-dimension channel tracks that the channel-deps pass propagates.

Every tensor dimension that carries channels gets a :class:`Track`: for each position along
the dimension, the id of the *channel element* it holds and its *zero state*. Elements are
unified (union-find) whenever an op forces two positions to be removed together (an
elementwise add, a conv linking its output to its weight rows, a concat of a concat, ...);
after the walk, each connected component of elements is one removable channel (one ZIG).

Zero states (an abstract interpretation of "what this position holds when its channel's
producer parameters are zero"):

* ``ZERO``  exactly zero, so removing the position changes nothing downstream;
* ``CONST`` a data-independent value that is not known to be zero (``sigmoid(0) = 0.5``);
* ``ANY``   not known (comes from outside fxprune's knowledge).

A dimension with no track (``None``) carries no channels: spatial dims, batch dims, the
model's inputs, the output of an op fxprune does not know.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import List, Optional, Sequence, Tuple

import numpy as np

ZERO, CONST, ANY = 0, 1, 2
STATE_NAMES = {ZERO: "zero", CONST: "const", ANY: "any"}


@dataclass
class Track:
    """Channel elements and zero states along one tensor dimension.

    Attributes:
        units: ``int64[size]`` element id of each position (an element may repeat, e.g. a
            flattened ``C x H x W`` dim holds each channel element ``H*W`` times).
        state: ``int8[size]`` zero state of each position (``ZERO``/``CONST``/``ANY``).
        source: ``(parameter name, dim)`` when the track is a parameter dimension itself.
    """

    units: np.ndarray
    state: np.ndarray
    source: Optional[Tuple[str, int]] = None  # (parameter name, dim) if this is a parameter's own track

    def __len__(self) -> int:
        return len(self.units)

    def with_state(self, state) -> "Track":
        return Track(self.units, np.broadcast_to(np.asarray(state, np.int8), self.units.shape).copy())

    def take(self, index) -> "Track":
        return Track(self.units[index], self.state[index])

    @staticmethod
    def concat(tracks: Sequence["Track"]) -> "Track":
        return Track(np.concatenate([t.units for t in tracks]), np.concatenate([t.state for t in tracks]))


@dataclass
class TensorChannels:
    """The channel tracks of one tensor value: its concrete shape and a track (or None) per dim."""

    shape: Tuple[int, ...]
    dims: List[Optional[Track]]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def tracked(self) -> List[int]:
        return [d for d, t in enumerate(self.dims) if t is not None]

    def permute(self, order: Sequence[int]) -> "TensorChannels":
        return TensorChannels(tuple(self.shape[d] for d in order), [self.dims[d] for d in order])

    def map_state(self, fn) -> "TensorChannels":
        return TensorChannels(self.shape, [None if t is None else Track(t.units, fn(t.state)) for t in self.dims])

    def __repr__(self) -> str:
        parts = []
        for size, t in zip(self.shape, self.dims):
            parts.append(f"{size}" if t is None else f"{size}*")
        return f"TC({', '.join(parts)})"


def untracked(shape: Sequence[int]) -> TensorChannels:
    return TensorChannels(tuple(int(s) for s in shape), [None] * len(shape))


# ---------------------------------------------------------------------------- zero-state algebra

def state_add(states: Sequence[np.ndarray]) -> np.ndarray:
    """Zero state of a sum: zero only if every term is zero; any ANY makes ANY."""
    return np.maximum.reduce(list(states)).astype(np.int8)


def state_mul(states: Sequence[np.ndarray]) -> np.ndarray:
    """Zero state of a product: zero if any factor is zero."""
    out = np.maximum.reduce(list(states)).astype(np.int8)
    any_zero = np.logical_or.reduce([s == ZERO for s in states])
    out[any_zero] = ZERO
    return out


def state_const_map(state: np.ndarray) -> np.ndarray:
    """f(0) = c != 0 (sigmoid, exp, x + 1): zero becomes CONST, ANY stays ANY."""
    return np.where(state == ANY, ANY, CONST).astype(np.int8)


def unique_sorted(values: np.ndarray) -> np.ndarray:
    """The distinct values of an integer array, sorted (``np.unique`` by sorting: NumPy's
    hash-table ``np.unique`` is many times slower on the dense id ranges used here)."""
    s = np.sort(np.asarray(values), axis=None)
    if len(s) < 2:
        return s
    return s[np.concatenate(([True], s[1:] != s[:-1]))]


# ---------------------------------------------------------------------------- union-find

class ElementStore:
    """Allocates channel elements and records unifications as edges.

    Components are computed once, vectorised, by :meth:`components` (min-label propagation
    with pointer jumping), so that unifying large index arrays costs no Python loop.
    """

    def __init__(self):
        self.count = 0
        self._edges_a: List[np.ndarray] = []
        self._edges_b: List[np.ndarray] = []
        self._marks = np.zeros(0, bool)  # scratch for isin(), all False between calls

    def fresh(self, n: int) -> np.ndarray:
        ids = np.arange(self.count, self.count + n, dtype=np.int64)
        self.count += n
        return ids

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a = np.asarray(a, np.int64).ravel()
        b = np.asarray(b, np.int64).ravel()
        keep = a != b
        if len(a) and keep.all():  # the usual case: no copies (element arrays are never written to)
            self._edges_a.append(a)
            self._edges_b.append(b)
        elif keep.any():
            self._edges_a.append(a[keep])
            self._edges_b.append(b[keep])

    def union_all(self, ids: np.ndarray) -> None:
        """Unify every element of ``ids`` with its first."""
        ids = np.asarray(ids, np.int64).ravel()
        if len(ids) > 1:
            self.union(np.full(len(ids) - 1, ids[0]), ids[1:])

    def isin(self, elements: np.ndarray, among: np.ndarray) -> np.ndarray:
        """``bool[len(elements)]``: whether each element id occurs in ``among`` (``np.isin``
        for element ids, in linear time: a mark per element of the store)."""
        if len(self._marks) < self.count:
            self._marks = np.zeros(max(self.count, 2 * len(self._marks)), bool)
        self._marks[among] = True
        hit = self._marks[elements]
        self._marks[among] = False
        return hit

    def components(self) -> np.ndarray:
        """``int64[count]``: a representative (the smallest id) for every element."""
        label = np.arange(self.count, dtype=np.int64)
        if not self._edges_a:
            return label
        a = np.concatenate(self._edges_a)
        b = np.concatenate(self._edges_b)
        while True:
            la, lb = label[a], label[b]
            m = np.minimum(la, lb)
            new = label.copy()
            np.minimum.at(new, a, m)
            np.minimum.at(new, b, m)
            # pointer jumping until labels are fixed points of themselves
            while True:
                jumped = new[new]
                if np.array_equal(jumped, new):
                    break
                new = jumped
            if np.array_equal(new, label):
                return label
            label = new


# ---------------------------------------------------------------------------- shape helpers

def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def broadcast_dims(shapes: Sequence[Sequence[int]], out_ndim: int) -> List[List[Optional[int]]]:
    """For each operand, the operand dim aligned (numpy broadcasting) with each output dim."""
    result = []
    for shape in shapes:
        offset = out_ndim - len(shape)
        result.append([d - offset if d - offset >= 0 else None for d in range(out_ndim)])
    return result


def reshape_blocks(src: Sequence[int], dst: Sequence[int]) -> List[Tuple[List[int], List[int]]]:
    """Split a reshape into blocks of source and destination dims with equal products.

    Size-1 dims are their own blocks (they carry no channels). Raises ValueError if the
    sizes do not match.
    """
    if prod(src) != prod(dst):
        raise ValueError(f"cannot reshape {tuple(src)} to {tuple(dst)}")
    blocks: List[Tuple[List[int], List[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1:
            blocks.append(([i], []))
            i += 1
            continue
        if j < len(dst) and dst[j] == 1:
            blocks.append(([], [j]))
            j += 1
            continue
        bi, bj = [i], [j]
        pi, pj = src[i], dst[j]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                bi.append(i)
                pi *= src[i]
                i += 1
            else:
                bj.append(j)
                pj *= dst[j]
                j += 1
        blocks.append((bi, bj))
    return blocks
