"""Channel semantics of ``torch.einsum``: channels follow their subscript letter.

Every dim of every operand is named by a subscript (a letter, or one of the broadcast dims an
ellipsis stands for). Dims of the same subscript are unified across operands, as an
elementwise op unifies aligned dims; a subscript kept in the output carries its channels
there, and a subscript summed over is a contraction, as in a matrix product: a weight on one
side consumes the other side's channels, and a contraction between activations is exact when
a zeroed channel is zero in at least one factor. Anything else (a diagonal, the sublist form,
a subscript combined with a dim without channels) freezes the channels it touches, with the
reason.
"""
from __future__ import annotations

from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from .channels import TensorChannels, Track, state_mul
from .registry import register_function

Label = Hashable  # a subscript letter, or ("...", k): the k-th broadcast dim from the right


def einsum_labels(equation: str, ndims: Sequence[int]) -> Tuple[List[List[Label]], List[Label]]:
    """The subscripts of each operand and of the output of ``einsum(equation, *operands)``.

    Args:
        equation: e.g. ``"bhid,bhjd->bhij"``, ``"...ij,jk"``; spaces are ignored.
        ndims: the number of dims of each operand.

    Returns:
        ``(inputs, output)``: one label per dim of each operand, and per dim of the output.
        An ellipsis becomes the labels ``("...", k)``, ``k`` counted from its right end, so
        that the broadcast dims of different operands line up as broadcasting aligns them.
        Without ``->`` the output is the ellipsis dims followed by the letters used once, in
        alphabetical order (torch's implicit mode).

    Raises:
        ValueError: the equation does not match the number or the ranks of the operands.
    """
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ndims):
        raise ValueError(f"einsum equation {equation!r} has {len(terms)} operands, not {len(ndims)}")
    inputs = [_expand(term, ndim, equation) for term, ndim in zip(terms, ndims)]
    n_broadcast = max((sum(isinstance(x, tuple) for x in labels) for labels in inputs), default=0)
    broadcast = [("...", k) for k in reversed(range(n_broadcast))]
    if arrow:
        head, ellipsis, tail = rhs.partition("...")
        output: List[Label] = list(head) + (broadcast if ellipsis else []) + list(tail)
    else:
        letters = [x for labels in inputs for x in labels if not isinstance(x, tuple)]
        output = broadcast + sorted(x for x in set(letters) if letters.count(x) == 1)
    return inputs, output


def _expand(term: str, ndim: int, equation: str) -> List[Label]:
    head, ellipsis, tail = term.partition("...")
    n = ndim - len(head) - len(tail)
    if n < 0 or (n > 0 and not ellipsis):
        raise ValueError(f"einsum subscripts {term!r} of {equation!r} do not match an operand with {ndim} dims")
    return list(head) + [("...", k) for k in reversed(range(n))] + list(tail)


def einsum_channels(ctx, equation: str, operands: Sequence[TensorChannels], out_shape) -> TensorChannels:
    """Channel tracks of ``torch.einsum(equation, *operands)`` (see the module docstring)."""
    inputs, output = einsum_labels(equation, [t.ndim for t in operands])
    if any(len(set(labels)) < len(labels) for labels in inputs):
        return ctx.unknown("einsum over a diagonal (a subscript repeated within one operand)")
    size: Dict[Label, int] = {}
    for t, labels in zip(operands, inputs):
        for d, label in enumerate(labels):
            size[label] = max(size.get(label, 1), t.shape[d])
    carried: Dict[Label, Optional[Track]] = {}
    for label in dict.fromkeys(x for labels in inputs for x in labels):
        present: List[Optional[Track]] = []
        for t, labels in zip(operands, inputs):
            if label not in labels:
                continue
            d = labels.index(label)
            if t.shape[d] != size[label]:  # a size-1 dim broadcast against the others
                ctx.pin(t.dims[d], "a single channel broadcast over a dimension")
                continue
            present.append(t.dims[d])
        if label in output:
            carried[label] = _kept(ctx, present)
        else:
            _contracted(ctx, present)
    return TensorChannels(tuple(out_shape), [carried.get(label) for label in output])


def _kept(ctx, present: List[Optional[Track]]) -> Optional[Track]:
    """A subscript of the output: its dims are unified; a position is zero where any factor is."""
    tracked = [t for t in present if t is not None]
    if not tracked:
        return None
    if len(tracked) < len(present):
        for t in tracked:
            ctx.pin(t, "combined in an einsum with a dimension that carries no channels")
        return None
    ctx.unify(*tracked)
    return Track(tracked[0].units, state_mul([t.state for t in tracked]))


def _contracted(ctx, present: List[Optional[Track]]) -> None:
    """A subscript summed over: a weight consumes the other operand's channels; otherwise the
    dims are unified and a zeroed channel must make every product term zero."""
    tracked = [t for t in present if t is not None]
    if not tracked:
        return
    weights = [t for t in tracked if t.source is not None]
    if weights and len(present) == 2:
        w = weights[0]
        ctx.consume(present[1] if present[0] is w else present[0], w, "an einsum with a weight")
        return
    if len(tracked) < len(present):
        for t in tracked:
            ctx.pin(t, "contracted in an einsum with a dimension that carries no channels")
        return
    ctx.unify(*tracked)
    what = "an einsum's contraction" if len(tracked) > 1 else "an einsum's sum over channels"
    ctx.require_zero(Track(tracked[0].units, state_mul([t.state for t in tracked])), what)


@register_function(torch.einsum, name="einsum")
def _einsum(ctx):
    """``torch.einsum(equation, *operands)``, ``torch.einsum(equation, [operands])`` and
    ``aten.einsum(equation, operands)``."""
    equation = ctx.node.args[0] if ctx.node.args else ctx.node.kwargs.get("equation")
    operands = list(ctx.node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str):
        return ctx.unknown("einsum in the sublist form")
    tcs = [ctx.ch(v) for v in operands]
    if not tcs or not all(isinstance(t, TensorChannels) for t in tcs):
        return ctx.unknown("einsum of values fxprune cannot follow")
    return einsum_channels(ctx, equation, tcs, ctx.out_shape)
