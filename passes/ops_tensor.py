"""Channel semantics of tensor ops: elementwise arithmetic with broadcasting, concatenation
and splitting, reshapes, permutations, indexing, reductions and matrix products.

Rewrites here recompute every constant argument that encodes a channel count (``view``
sizes, ``split`` sections, slice bounds, ``narrow`` lengths) from the symbolic shapes of the
pruned graph (see :mod:`fxprune.passes.symbolic`).
"""
from __future__ import annotations

import math
import operator
from numbers import Number
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from . import full_count
from .channels import (ANY, CONST, ZERO, TensorChannels, Track, broadcast_dims, norm_dim, reshape_blocks,
                       state_add, state_const_map, state_mul)
from .registry import op_name, register_function, register_method, register_module
from .size_flow import counts_channels, record_size


def _tc(ctx, v) -> Optional[TensorChannels]:
    c = v if isinstance(v, TensorChannels) else ctx.ch(v)
    return c if isinstance(c, TensorChannels) else None


# ============================================================================ elementwise


# the state of a dim a parameter broadcasts over: one data-independent value per position
BROADCAST_CONST = "broadcast-const"


def elementwise_channels(ctx, operands: Sequence[Any], kind: str,
                         out_shape: Optional[Sequence[int]] = None) -> TensorChannels:
    """Broadcasting elementwise op over tensors and scalars.

    ``kind``: ``"add"`` (zero only if all terms are zero), ``"mul"`` (zero if any factor is)
    or ``"div"`` (numerator and denominator). Output dims are unified across the operands
    that have the full size there; a channel broadcast from size 1 is frozen. Operands are
    nodes, scalars or :class:`TensorChannels` (an intermediate of a fused op, whose shape
    ``out_shape`` then gives; by default the node's output shape).
    """
    out_shape = ctx.out_shape if out_shape is None else tuple(out_shape)
    tcs = [_tc(ctx, v) for v in operands]
    scalars = [v for v, t in zip(operands, tcs) if t is None]
    tensors = [t for t in tcs if t is not None]
    # a one-element parameter or buffer read as it is: the same value at every position, for
    # every input (a StarReLU's offset), so a zeroed channel it is added to is one constant
    fixed = [isinstance(v, torch.fx.Node) and v.op == "get_attr" and math.prod(t.shape) == 1
             for v, t in zip(operands, tcs) if t is not None]
    aligned = broadcast_dims([t.shape for t in tensors], len(out_shape))
    dims: List[Optional[Track]] = []
    for d, size in enumerate(out_shape):
        full, states, missing = [], [], False
        for t, al, is_fixed in zip(tensors, aligned, fixed):
            sd = al[d]
            if sd is None or t.shape[sd] == 1:
                if sd is not None and t.dims[sd] is not None and size > 1:
                    ctx.pin(t.dims[sd], "a single channel broadcast over a dimension")
                states.append(BROADCAST_CONST if is_fixed else None)
                continue
            if t.dims[sd] is None:
                missing = True
                states.append(None)
            else:
                full.append(t.dims[sd])
                states.append(t.dims[sd].state)
        if not full:
            dims.append(None)
            continue
        if missing:
            for tr in full:
                ctx.pin(tr, "combined elementwise with a tensor whose dimension carries no channels")
        ctx.unify(*full)
        dims.append(Track(full[0].units, _combine_states(ctx, kind, states, scalars, operands, tcs, size)))
    return TensorChannels(tuple(out_shape), dims)


def _combine_states(ctx, kind, states, scalars, operands, tcs, size) -> np.ndarray:
    if kind not in ("mul", "div"):  # a sum: the parameter's value is added to a zero channel
        states = [np.full(size, CONST, np.int8) if s is BROADCAST_CONST else s for s in states]
    states = [None if s is BROADCAST_CONST else s for s in states]
    tracked = [s for s in states if s is not None]
    if kind == "mul":
        return state_mul(tracked)
    if kind == "div":
        if tcs[0] is None:  # scalar / tensor: zero maps to infinity
            return np.full(size, ANY, np.int8)
        out = states[0].copy() if states[0] is not None else np.full(size, ANY, np.int8)
        if len(states) > 1 and states[1] is not None:
            out[states[1] == ZERO] = ANY
        return out
    # add / sub
    parts = [s if s is not None else np.full(size, ANY, np.int8) for s in states]
    if any(isinstance(s, Number) and s != 0 for s in scalars):
        parts.append(np.full(size, CONST, np.int8))
    return state_add(parts)


def _binary(kind: str):
    def rule(ctx):
        a = ctx.arg(0, "input")
        b = ctx.arg(1, "other")
        if kind == "rsub":
            a, b = b, a
        out = elementwise_channels(ctx, [a, b], "add" if kind in ("add", "rsub") else kind)
        if kind == "div":
            den = _tc(ctx, b)
            if den is not None:
                for t in den.dims:
                    if t is not None and (t.state == ZERO).any():
                        ctx.inexact(t, "a zeroed channel is a divisor")
        return out

    return rule


_ADD = [operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub, torch.subtract]
_MUL = [operator.mul, operator.imul, torch.mul, torch.multiply]
_DIV = [operator.truediv, operator.itruediv, torch.div, torch.true_divide, torch.divide]
register_function(*_ADD, name="add")(_binary("add"))
register_method("add", "add_", "sub", "sub_", name="add")(_binary("add"))
register_function(torch.rsub, name="add")(_binary("rsub"))
register_function(*_MUL, name="mul")(_binary("mul"))
register_method("mul", "mul_", name="mul")(_binary("mul"))
register_function(*_DIV, name="div")(_binary("div"))
register_method("div", "div_", "true_divide", name="div")(_binary("div"))


@register_function(torch.addcmul, name="addcmul")
@register_method("addcmul", "addcmul_", name="addcmul")
def _addcmul(ctx):
    """``addcmul(input, tensor1, tensor2, value=v) = input + v * tensor1 * tensor2``: the
    product's channels and zero states, then the sum's (a layer-scale affine, timm's GRN)."""
    factors = [ctx.arg(1, "tensor1"), ctx.arg(2, "tensor2")]
    shapes = [tc.shape for tc in (_tc(ctx, v) for v in factors) if tc is not None]
    product = elementwise_channels(ctx, factors, "mul", out_shape=torch.broadcast_shapes(*shapes))
    return elementwise_channels(ctx, [ctx.arg(0, "input"), product], "add")


@register_function(operator.pow, torch.pow, name="pow")
@register_method("pow", name="pow")
def _pow(ctx):
    x = _tc(ctx, ctx.arg(0, "input"))
    e = ctx.arg(1, "exponent")
    if x is None or not isinstance(e, Number):
        return ctx.unknown("power with a tensor exponent")
    return x if e > 0 else x.map_state(state_const_map)


@register_function(torch.zero_, name="zero")
@register_method("zero_", name="zero")
def _zero(ctx):
    """``x.zero_()``: every position becomes exactly zero. When ``x`` is a view of another
    tensor (``b[k:2*k].zero_()``), that tensor's positions only turn to zero, so what the
    analysis says of them stays true."""
    x = _tc(ctx, ctx.arg(0, "input"))
    if x is None:
        return ctx.unknown("zero_ of a value fxprune cannot follow")
    return x.map_state(np.zeros_like)


@register_function(torch.where, name="where")
@register_method("where", name="where")
def _where(ctx):
    """``where(cond, a, b)``: elementwise, broadcast; a zeroed channel stays zero only where
    both branches are zero (a scalar branch counts as a constant)."""
    return elementwise_channels(ctx, [ctx.arg(0, "condition"), ctx.arg(1, "input"), ctx.arg(2, "other")], "add")


@register_function(torch.clamp_min, name="clamp")
@register_method("clamp_min", "clamp_min_", name="clamp")
def _clamp_min(ctx):
    x = _tc(ctx, ctx.arg(0, "input"))
    lo = ctx.arg(1, "min")
    if x is None or not isinstance(lo, Number):
        return ctx.unknown("clamp with a tensor bound")
    return x if lo <= 0 else x.map_state(state_const_map)


@register_function(torch.roll, name="roll")
@register_method("roll", name="roll")
def _roll(ctx):
    """A cyclic shift of spatial positions; rolling a channel dim would permute channels."""
    x = _tc(ctx, ctx.arg(0, "input"))
    dims = ctx.arg(2, "dims", None)
    rolled = range(x.ndim) if dims is None else ([dims] if isinstance(dims, int) else dims)
    for d in rolled:
        ctx.pin(x.dims[norm_dim(d, x.ndim)], "channels rolled by torch.roll")
    return x


@register_function(torch.clamp, torch.clip, name="clamp")
@register_method("clamp", "clip", "clamp_", name="clamp")
def _clamp(ctx):
    x = _tc(ctx, ctx.arg(0, "input"))
    lo = ctx.arg(1, "min", None)
    hi = ctx.arg(2, "max", None)
    if x is None or not all(v is None or isinstance(v, Number) for v in (lo, hi)):
        return ctx.unknown("clamp with tensor bounds")
    keeps_zero = (lo is None or lo <= 0) and (hi is None or hi >= 0)
    return x if keeps_zero else x.map_state(state_const_map)


# ============================================================================ concat / stack


def cat_channels(ctx, tensors: Sequence[TensorChannels], dim: int, out_shape) -> TensorChannels:
    d = norm_dim(dim, len(out_shape))
    dims: List[Optional[Track]] = []
    for k in range(len(out_shape)):
        if k == d:
            pieces = []
            for t in tensors:
                tr = t.dims[k]
                if tr is None:  # a piece without channels: fill with frozen elements
                    tr = ctx.fresh(t.shape[k], ANY)
                    ctx.pin(tr, "concatenated with a tensor whose dimension carries no channels")
                pieces.append(tr)
            dims.append(Track.concat(pieces) if any(t.dims[k] is not None for t in tensors) else None)
        else:
            present = [t.dims[k] for t in tensors]
            if any(p is not None for p in present) and out_shape[k] > 1:
                ctx.unify(*present)
                tracked = [p for p in present if p is not None]
                dims.append(Track(tracked[0].units, state_add([p.state for p in tracked])))
            else:
                dims.append(None)
    return TensorChannels(tuple(out_shape), dims)


@register_function(torch.cat, torch.concat, getattr(torch, "concatenate", None), name="cat")
def _cat(ctx):
    tensors = [_tc(ctx, v) for v in ctx.arg(0, "tensors")]
    if any(t is None for t in tensors):
        return ctx.unknown("concatenation of non-tensor values")
    return cat_channels(ctx, tensors, ctx.arg(1, "dim", 0), ctx.out_shape)


@register_function(torch.stack, name="stack")
def _stack(ctx):
    tensors = [_tc(ctx, v) for v in ctx.arg(0, "tensors")]
    if any(t is None for t in tensors):
        return ctx.unknown("stack of non-tensor values")
    out_shape = ctx.out_shape
    d = norm_dim(ctx.arg(1, "dim", 0), len(out_shape))
    expanded = [TensorChannels(t.shape[:d] + (1,) + t.shape[d:], t.dims[:d] + [None] + t.dims[d:]) for t in tensors]
    return cat_channels(ctx, expanded, d, out_shape)


# ============================================================================ split / chunk / index


def _pieces(ctx, x: TensorChannels, dim: int, sizes: Sequence[int]) -> tuple:
    d = norm_dim(dim, x.ndim)
    out, start = [], 0
    for s in sizes:
        dims = list(x.dims)
        if x.dims[d] is not None:
            dims[d] = x.dims[d].take(slice(start, start + s))
        shape = list(x.shape)
        shape[d] = s
        out.append(TensorChannels(tuple(shape), dims))
        start += s
    return tuple(out)


def _out_sizes(ctx, dim: int) -> List[int]:
    metas = ctx.node.meta.get("tensor_meta")
    return [int(m.shape[dim]) for m in metas]


def _rewrite_sections(rctx, arg_index: int, arg_name: str, to_split: bool) -> None:
    """Recompute split sections (or turn chunk into split) when the split dim holds channels."""
    x = rctx.ch(rctx.node.args[0])
    dim = rctx.arg(2 if not to_split else 2, "dim", 0)
    d = norm_dim(dim, x.ndim)
    if x.dims[d] is None:
        return
    sizes = [rctx.new_shape(p)[d] for p in rctx.out_ch]
    if to_split:
        node = rctx.node
        if node.op == "call_method":
            node.target = "split"
        else:
            node.target = torch.split
        node.args = (node.args[0], sizes, d)
        node.kwargs = {}
    else:
        rctx.set_arg(arg_index, arg_name, sizes)


@register_function(torch.split, selects=True, name="split", rewrite=lambda r: _rewrite_sections(r, 1, "split_size_or_sections", False))
@register_method("split", selects=True, name="split", rewrite=lambda r: _rewrite_sections(r, 1, "split_size", False))
def _split(ctx):
    x = _tc(ctx, ctx.arg(0, "input"))
    dim = ctx.arg(2, "dim", 0)
    return _pieces(ctx, x, dim, _out_sizes(ctx, norm_dim(dim, x.ndim)))


@register_function(torch.chunk, selects=True, name="chunk", rewrite=lambda r: _rewrite_sections(r, 1, "chunks", True))
@register_method("chunk", selects=True, name="chunk", rewrite=lambda r: _rewrite_sections(r, 1, "chunks", True))
def _chunk(ctx):
    x = _tc(ctx, ctx.arg(0, "input"))
    dim = ctx.arg(2, "dim", 0)
    return _pieces(ctx, x, dim, _out_sizes(ctx, norm_dim(dim, x.ndim)))


@register_function(torch.unbind, selects=True, name="unbind")
@register_method("unbind", selects=True, name="unbind")
def _unbind(ctx):
    x = _tc(ctx, ctx.arg(0, "input"))
    d = norm_dim(ctx.arg(1, "dim", 0), x.ndim)
    ctx.pin(x.dims[d], "each channel is taken out by unbind")
    dims = x.dims[:d] + x.dims[d + 1:]
    shape = x.shape[:d] + x.shape[d + 1:]
    return tuple(TensorChannels(shape, list(dims)) for _ in range(x.shape[d]))


def _rewrite_narrow(rctx) -> None:
    x = rctx.ch(rctx.node.args[0])
    d = norm_dim(rctx.arg(1, "dim"), x.ndim)
    t = x.dims[d]
    start, length = rctx.arg(2, "start"), rctx.arg(3, "length")
    if t is None or not isinstance(start, int) or not isinstance(length, int):
        return
    start = start % x.shape[d]
    rctx.set_arg(2, "start", rctx.new_size(t.take(slice(0, start))))
    rctx.set_arg(3, "length", rctx.new_size(t.take(slice(start, start + length))))


@register_function(torch.narrow, selects=True, name="narrow", rewrite=_rewrite_narrow)
@register_method("narrow", selects=True, name="narrow", rewrite=_rewrite_narrow)
def _narrow(ctx):
    x = _tc(ctx, ctx.arg(0, "input"))
    d = norm_dim(ctx.arg(1, "dim"), x.ndim)
    start, length = ctx.arg(2, "start"), ctx.arg(3, "length")
    if not isinstance(start, int) or not isinstance(length, int):
        ctx.pin(x.dims[d], "narrowed with computed bounds")
        return TensorChannels(ctx.out_shape, [t if k != d else None for k, t in enumerate(x.dims)])
    start = start % x.shape[d]
    return _pieces(ctx, TensorChannels(x.shape, x.dims), d, [start, length, x.shape[d] - start - length])[1]


def _index_plan(x: TensorChannels, idx) -> Optional[list]:
    """Normalise a getitem index into per-source-dim actions, or None if unsupported."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    n_used = sum(1 for i in idx if i is not None and i is not Ellipsis)
    plan, d = [], 0
    for i in idx:
        if i is Ellipsis:
            for _ in range(x.ndim - n_used):
                plan.append(("keep", d, slice(None)))
                d += 1
        elif i is None:
            plan.append(("new", None, None))
        elif isinstance(i, slice):
            plan.append(("slice", d, i))
            d += 1
        elif isinstance(i, int):
            plan.append(("int", d, i))
            d += 1
        else:
            plan.append(("tensor", d, i))
            d += 1
    while d < x.ndim:
        plan.append(("keep", d, slice(None)))
        d += 1
    return plan


def index_channels(ctx, x: TensorChannels, idx) -> TensorChannels:
    """``x[idx]`` for a getitem index (ints, slices, None, Ellipsis, one index tensor)."""
    plan = _index_plan(x, idx)
    dims: List[Optional[Track]] = []
    for kind, d, i in plan:
        if kind == "new":
            dims.append(None)
        elif kind == "keep":
            dims.append(x.dims[d])
        elif kind == "slice":
            t = x.dims[d]
            if t is not None and not all(isinstance(v, (int, type(None))) for v in (i.start, i.stop, i.step)):
                ctx.pin(t, "sliced with computed bounds")
                t = None
            if t is not None and i.step not in (None, 1):
                dims.append(_strided(ctx, t, x.shape[d], i))
            else:
                dims.append(None if t is None else t.take(i))
        elif kind == "int":
            t = x.dims[d]
            if t is not None:
                if isinstance(i, int):
                    ctx.pin(t.take([i]), "a single channel selected by index")
                else:
                    ctx.pin(t, "a channel selected by a computed index")
        else:  # advanced indexing: a single index tensor is followed
            return _gather(ctx, x, plan)
    out_shape = ctx.out_shape
    if len(dims) != len(out_shape):
        return ctx.unknown("indexing fxprune cannot follow")
    return TensorChannels(out_shape, dims)


def _strided(ctx, t: Track, n: int, i: slice) -> Optional[Track]:
    """``x[..., r::s]`` over channels: channels are removed in whole blocks of ``s`` consecutive
    positions, so every offset ``r`` keeps picking the same members of each block."""
    start = i.start or 0
    if isinstance(i.step, int) and i.step > 1 and n % i.step == 0 and 0 <= start < i.step and i.stop in (None, n):
        blocks = t.units.reshape(n // i.step, i.step)
        ctx.union(np.broadcast_to(blocks[:, :1], blocks.shape), blocks)
        return t.take(i)
    ctx.pin(t, "strided slice over channels")
    return None


def _gather(ctx, x: TensorChannels, plan) -> TensorChannels:
    """``x[..., idx, ...]`` with one integer index tensor on dim ``d`` and whole slices elsewhere
    (``table[idx]``, ``biases[:, idx]``): dim ``d`` is gathered, so its channels are frozen and
    the index's dims take its place; every other dim keeps its channels (the head dim of a
    relative-position table or of a per-head attention bias)."""
    tensors = [(d, i) for kind, d, i in plan if kind == "tensor"]
    whole = all(kind == "keep" or (kind == "slice" and i == slice(None)) for kind, _, i in plan if kind != "tensor")
    if len(tensors) != 1 or not whole:
        return ctx.unknown("advanced indexing fxprune cannot follow")
    d, index = tensors[0]
    if not _integer_index(index):
        return ctx.unknown("indexing by a mask or by a value fxprune cannot follow")
    ctx.pin(x.dims[d], "channels gathered by an index tensor")
    out_shape = ctx.out_shape
    n_index = len(out_shape) - (x.ndim - 1)
    return TensorChannels(out_shape, list(x.dims[:d]) + [None] * n_index + list(x.dims[d + 1:]))


def _integer_index(index) -> bool:
    """An integer index tensor (a graph value) or a list of ints; not a boolean mask."""
    if isinstance(index, (list, tuple)):
        return all(isinstance(i, int) for i in index)
    meta = index.meta.get("tensor_meta") if isinstance(index, torch.fx.Node) else None
    dtype = getattr(meta, "dtype", None)
    return dtype is not None and dtype != torch.bool and not dtype.is_floating_point and not dtype.is_complex


def _rewrite_getitem(rctx) -> None:
    src = rctx.node.args[0]
    x = rctx.ch(src)
    if not isinstance(x, TensorChannels):
        return
    idx = rctx.node.args[1]
    single = not isinstance(idx, tuple)
    plan = _index_plan(x, idx)
    new_idx = []
    for kind, d, i in plan:
        t = x.dims[d] if d is not None else None
        if kind == "slice" and t is not None and i.step not in (None, 1):
            new_idx.append(slice(i.start, None, i.step))  # whole blocks go: offset and step stay
        elif kind == "slice" and t is not None and all(isinstance(v, (int, type(None))) for v in (i.start, i.stop)):
            n = x.shape[d]
            start, stop, _ = i.indices(n)
            new_start = rctx.new_size(t.take(slice(0, start))) if i.start is not None else None
            new_stop = rctx.new_size(t.take(slice(0, stop))) if i.stop is not None else None
            new_idx.append(slice(new_start, new_stop, i.step))
        elif kind == "int" and t is not None and isinstance(i, int):
            new_idx.append(rctx.new_size(t.take(slice(0, i % x.shape[d]))))
        elif kind == "keep":
            continue
        else:
            new_idx.append(i)
    # re-insert the trailing/Ellipsis-expanded dims exactly as written by the user
    if any(k == "keep" for k, _, _ in plan):
        new_idx = _restore_keeps(idx, plan, new_idx)
    rctx.node.args = (src, new_idx[0] if single and len(new_idx) == 1 else tuple(new_idx))


def _restore_keeps(idx, plan, changed) -> list:
    """Rebuild the index with the user's Ellipsis and omitted trailing dims."""
    orig = idx if isinstance(idx, tuple) else (idx,)
    it = iter(changed)
    out = []
    for i in orig:
        out.append(i if i is Ellipsis else next(it))
    return out


@register_function(operator.getitem, selects=True, name="getitem", rewrite=_rewrite_getitem)
def _getitem(ctx):
    src = ctx.arg(0)
    idx = ctx.arg(1)
    c = ctx.ch(src)
    if isinstance(c, TensorChannels):
        return index_channels(ctx, c, idx)
    if isinstance(c, (list, tuple)) and isinstance(idx, int):
        return c[idx]
    if isinstance(c, (list, tuple)):
        return ctx.unknown("slicing a tuple of tensors")
    meta = ctx.node.meta.get("tensor_meta")
    return ctx.out_untracked() if meta is not None else None


@register_function(getattr, selects=True, name="getattr")
def _getattr(ctx):
    name = ctx.arg(1)
    x = _tc(ctx, ctx.arg(0))
    if name == "shape":
        record_size(ctx, x)
        return None
    if name in ("dtype", "device", "ndim", "is_cuda", "requires_grad"):
        return None
    if name == "T" and x is not None:
        return x.permute(list(reversed(range(x.ndim))))
    if name in ("data",) and x is not None:
        return x
    return ctx.unknown(f"attribute {name!r} of a tensor")


@register_method("size", "numel", "nelement", selects=True, name="metadata")
@register_function(len, selects=True, name="metadata")
def _metadata(ctx):
    x = _tc(ctx, ctx.arg(0, "input"))
    what = ctx.node.target if ctx.node.op == "call_method" else "len"
    if what == "size":
        dim = ctx.arg(1, "dim", None)
        record_size(ctx, x, "all" if dim is None else norm_dim(dim, x.ndim))
    else:
        record_size(ctx, x, 0 if what == "len" else None)
    return None


@register_method("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", selects=True, name="new_tensor")
def _new_tensor(ctx):
    """``x.new_zeros(size)`` and kin: a new tensor that takes only ``x``'s dtype and device."""
    return ctx.out_untracked()


@register_method("dim", "stride", "element_size", "is_contiguous", selects=True, name="metadata")
def _no_channel_count(ctx):
    return None


# ============================================================================ reshapes


def reshape_channels(ctx, x: TensorChannels, out_shape: Sequence[int]) -> TensorChannels:
    """Map channels through a reshape by blocks of dims with equal products.

    A channel dim split into several dims (``C -> (g, C/g)``) keeps its channels along one of
    them (the carrier) and unifies positions along the others, so that pruning keeps the
    split rectangular: this is what makes channel shuffles and head views prunable exactly.
    """
    out_shape = tuple(int(s) for s in out_shape)
    dims: List[Optional[Track]] = [None] * len(out_shape)
    for src, dst in reshape_blocks(x.shape, out_shape):
        tracked = [d for d in src if x.dims[d] is not None]
        if not tracked:
            continue
        if not dst:
            for d in tracked:
                ctx.pin(x.dims[d], "a channel dim of size 1 is dropped by a reshape")
            continue
        if len(tracked) > 1:
            for d in tracked:
                ctx.pin(x.dims[d], "a reshape merges two channel dimensions")
            continue
        d = tracked[0]
        t = x.dims[d]
        sizes = [x.shape[i] for i in src]
        bshape = [1] * len(src)
        bshape[src.index(d)] = sizes[src.index(d)]
        units = np.broadcast_to(t.units.reshape(bshape), sizes).reshape(-1)
        state = np.broadcast_to(t.state.reshape(bshape), sizes).reshape(-1)
        osizes = [out_shape[j] for j in dst]
        if len(dst) == 1:
            dims[dst[0]] = Track(units.copy(), state.copy())
            continue
        U = units.reshape(osizes)
        S = state.reshape(osizes)
        cands = [k for k in range(len(dst)) if osizes[k] > 1]
        rows = {k: np.moveaxis(U, k, 0).reshape(osizes[k], -1) for k in cands}
        constant = [k for k in cands if (rows[k] == rows[k][:, :1]).all()]
        carrier = _carrier(constant or cands, osizes, last=dst[-1] == len(out_shape) - 1)
        R = rows[carrier]
        ctx.union(np.broadcast_to(R[:, :1], R.shape), R)
        Sr = np.moveaxis(S, carrier, 0).reshape(osizes[carrier], -1)
        dims[dst[carrier]] = Track(R[:, 0].copy(), Sr.max(axis=1).astype(np.int8))
    return TensorChannels(out_shape, dims)


def _carrier(cands: List[int], osizes: List[int], last: bool) -> int:
    """Which of the dims a channel dim is split into keeps the channels.

    A split of the last dim, ``(..., C) -> (..., H, D)``, is a head view: the channels go with
    the heads (``H``), so a head is removed whole and the head width ``D`` -- and with it every
    attention scale -- is unchanged. Any other split (``(C, H, W) -> (g, C/g, H, W)``, a channel
    shuffle) keeps the channels on the largest factor, the finest exact choice.
    """
    if last and len(cands) > 1 and cands[-1] == len(osizes) - 1:
        return cands[-2]
    return max(cands, key=lambda k: (osizes[k], k))


def _rewrite_view_args(rctx) -> None:
    """view/reshape(x, *sizes): every constant size of a channel dim is recomputed."""
    node = rctx.node
    out = rctx.out_ch
    new = rctx.new_shape(out)
    first = 1
    if node.op == "call_function":  # torch.reshape(x, shape)
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")
        packed = True
    else:
        packed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
        shape = node.args[1] if packed else node.args[first:]
    if shape is None or isinstance(shape, torch.fx.Node) or (
            len(shape) == 1 and isinstance(shape[0], torch.fx.Node)
            and isinstance(rctx.ca.analysis.sizes.get(shape[0].name), list)):
        return  # a whole shape read from a tensor (reshape(y.shape)) follows that tensor's pruning
    fixed = list(shape)
    for k, s in enumerate(fixed):
        if s == -1:
            continue
        if counts_channels(rctx.ca.analysis, s):
            # a number computed from channel counts: the new size where this dim holds channels,
            # the unchanged size elsewhere (the group count of a channel shuffle)
            fixed[k] = new[k] if out.dims[k] is not None else out.shape[k]
        elif out.dims[k] is not None and (isinstance(s, int) or (isinstance(s, torch.fx.Node) and new[k] != out.shape[k])):
            fixed[k] = new[k]
    if node.op == "call_function":
        rctx.set_arg(1, "shape", type(shape)(fixed))
    elif packed:
        node.args = (node.args[0], type(shape)(fixed))
    else:
        node.args = (node.args[0], *fixed)


@register_method("view", "reshape", name="reshape", rewrite=_rewrite_view_args)
@register_function(torch.reshape, name="reshape", rewrite=_rewrite_view_args)
def _reshape(ctx):
    return reshape_channels(ctx, _tc(ctx, ctx.arg(0, "input")), ctx.out_shape)


@register_method("view_as", "reshape_as", "flatten", "squeeze", "unsqueeze", "squeeze_", "unsqueeze_",
                 name="reshape")
@register_function(torch.flatten, torch.squeeze, torch.unsqueeze, name="reshape")
def _reshape_dynamic(ctx):
    return reshape_channels(ctx, _tc(ctx, ctx.arg(0, "input")), ctx.out_shape)


@register_module(nn.Flatten, nn.Unflatten, name="reshape")
def _reshape_module(ctx):
    return reshape_channels(ctx, _tc(ctx, ctx.arg(0, "input")), ctx.out_shape)


def _rewrite_unflatten(rctx) -> None:
    node = rctx.node
    sizes = rctx.arg(2, "sizes")
    x = rctx.ch(node.args[0])
    d = norm_dim(rctx.arg(1, "dim"), x.ndim)
    if not isinstance(sizes, (list, tuple)) or x.dims[d] is None:
        return
    new = rctx.new_shape(rctx.out_ch)
    fixed = [new[d + k] if (isinstance(s, int) and s != -1 and rctx.out_ch.dims[d + k] is not None) else s
             for k, s in enumerate(sizes)]
    rctx.set_arg(2, "sizes", type(sizes)(fixed))


@register_method("unflatten", name="reshape", rewrite=_rewrite_unflatten)
@register_function(torch.unflatten, name="reshape", rewrite=_rewrite_unflatten)
def _unflatten(ctx):
    return reshape_channels(ctx, _tc(ctx, ctx.arg(0, "input")), ctx.out_shape)


def _permutation(ctx, x: TensorChannels) -> List[int]:
    node = ctx.node
    name = node.target if node.op == "call_method" else op_name(node.target)
    if name == "permute":
        order = node.args[1:] if node.op == "call_method" else [ctx.arg(1, "dims")]
        if len(order) == 1 and isinstance(order[0], (list, tuple)):
            order = order[0]
        return [norm_dim(d, x.ndim) for d in order]
    if name in ("transpose", "swapaxes", "swapdims"):
        a, b = norm_dim(ctx.arg(1, "dim0"), x.ndim), norm_dim(ctx.arg(2, "dim1"), x.ndim)
        order = list(range(x.ndim))
        order[a], order[b] = order[b], order[a]
        return order
    if name == "t":
        return list(reversed(range(x.ndim)))
    if name in ("movedim", "moveaxis"):
        src, dst = ctx.arg(1, "source"), ctx.arg(2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src = [norm_dim(s, x.ndim) for s in src]
        dst = [norm_dim(s, x.ndim) for s in dst]
        rest = [d for d in range(x.ndim) if d not in src]
        order = [None] * x.ndim
        for s, t in zip(src, dst):
            order[t] = s
        it = iter(rest)
        return [o if o is not None else next(it) for o in order]
    raise ValueError(name)


@register_method("permute", "transpose", "swapaxes", "swapdims", "t", "movedim", "moveaxis", name="permute")
@register_function(torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.t, torch.movedim,
                   torch.moveaxis, name="permute")
def _permute(ctx):
    x = _tc(ctx, ctx.arg(0, "input"))
    return x.permute(_permutation(ctx, x))


def _rewrite_expand(rctx) -> None:
    node = rctx.node
    out = rctx.out_ch
    new = rctx.new_shape(out)
    packed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
    sizes = list(node.args[1] if packed else node.args[1:])
    for k, s in enumerate(sizes):
        if isinstance(s, int) and s != -1 and out.dims[k] is not None:
            sizes[k] = new[k]
    node.args = (node.args[0], type(node.args[1])(sizes)) if packed else (node.args[0], *sizes)


@register_method("expand", name="expand", rewrite=_rewrite_expand)
def _expand(ctx):
    x = _tc(ctx, ctx.arg(0, "input"))
    return _broadcast_to(ctx, x, ctx.out_shape)


@register_method("expand_as", name="expand")
@register_function(torch.broadcast_to, name="expand")
def _expand_as(ctx):
    return _broadcast_to(ctx, _tc(ctx, ctx.arg(0, "input")), ctx.out_shape)


def _broadcast_to(ctx, x: TensorChannels, out_shape) -> TensorChannels:
    offset = len(out_shape) - x.ndim
    dims: List[Optional[Track]] = [None] * offset
    for d, t in enumerate(x.dims):
        if x.shape[d] == out_shape[d + offset]:
            dims.append(t)
        else:
            ctx.pin(t, "a single channel broadcast over a dimension")
            dims.append(None)
    return TensorChannels(tuple(out_shape), dims)


# ============================================================================ reductions


# exact over channels when a removed channel reaches them as zero: sums and norms unchanged;
# means and variances too, once the slim model divides by the full count (full_count)
_EXACT_IF_ZERO = {"sum", "nansum", "norm", "mean", "var", "std"}


def reduce_channels(ctx, x: TensorChannels, dims_arg, keepdim: bool, kind: str) -> TensorChannels:
    """Reductions: over non-channel dims they pass channels through. Over a channel dim a sum
    or norm is exact when the removed channels reach it as zero, and so are a mean, variance
    or standard deviation, which the slim model divides by the full count
    (:mod:`fxprune.passes.full_count`); a max, product, ``logsumexp`` or NaN-skipping mean
    changes when a channel is removed, so the channels are inexact."""
    reduced = full_count.reduced_dims(dims_arg, x.ndim)
    for d in reduced:
        t = x.dims[d]
        if t is None:
            continue
        if kind in _EXACT_IF_ZERO:
            ctx.require_zero(t, f"a {kind} over channels")
        else:
            ctx.inexact(t, f"a {kind} over channels changes when a channel is removed")
    dims, shape = [], []
    for d in range(x.ndim):
        if d in reduced:
            if keepdim:
                dims.append(None)
                shape.append(1)
            continue
        t = x.dims[d]
        if t is not None and kind in ("logsumexp", "prod"):
            t = Track(t.units, state_const_map(t.state))
        dims.append(t)
        shape.append(x.shape[d])
    return TensorChannels(tuple(shape), dims)


def _reduction(kind: str):
    def rule(ctx):
        x = _tc(ctx, ctx.arg(0, "input"))
        dim = ctx.arg(1, "dim", None)
        if kind in ("norm",):
            dim = ctx.arg(2, "dim", None)
            keep = ctx.arg(3, "keepdim", False)
        elif kind in ("var", "std"):
            parsed = full_count.var_arguments(ctx.node)
            if parsed is None:
                return ctx.unknown(f"a {kind} with arguments fxprune cannot read")
            dim, _, keep = parsed
        else:
            keep = ctx.arg(2, "keepdim", False)
        out = reduce_channels(ctx, x, dim, keep, kind)
        meta = ctx.node.meta.get("tensor_meta")
        if isinstance(meta, (list, tuple)) and not hasattr(meta, "shape"):  # (values, indices)
            return (out, TensorChannels(out.shape, [None] * len(out.shape)))
        return out

    return rule


_REWRITES = {"mean": full_count.rewrite_mean, "var": lambda rctx: full_count.rewrite_var(rctx, std=False),
             "std": lambda rctx: full_count.rewrite_var(rctx, std=True)}

for _kind, _fns, _methods in [
    ("sum", [torch.sum, torch.nansum], ["sum", "nansum"]),
    ("mean", [torch.mean], ["mean"]),
    ("NaN-skipping mean", [torch.nanmean], ["nanmean"]),
    ("amax", [torch.amax, torch.max], ["amax", "max"]),
    ("amin", [torch.amin, torch.min], ["amin", "min"]),
    ("var", [torch.var], ["var"]),
    ("std", [torch.std], ["std"]),
    ("logsumexp", [torch.logsumexp], ["logsumexp"]),
    ("prod", [torch.prod], ["prod"]),
    ("norm", [torch.norm], ["norm"]),
]:
    register_function(*_fns, name=_kind, rewrite=_REWRITES.get(_kind))(_reduction(_kind))
    register_method(*_methods, name=_kind, rewrite=_REWRITES.get(_kind))(_reduction(_kind))


@register_function(torch.linalg.vector_norm, name="norm")
def _vector_norm(ctx):
    """``torch.linalg.vector_norm(x, ord, dim, keepdim)``: a sum over the reduced dims, exact
    over channels for ``ord > 0`` (a removed zero adds nothing)."""
    x = _tc(ctx, ctx.arg(0, "input"))
    order = ctx.arg(1, "ord", 2)
    if x is None or not isinstance(order, Number):
        return ctx.unknown("vector norm of a value fxprune cannot follow")
    kind = "norm" if order > 0 else f"norm of order {order:g}"
    return reduce_channels(ctx, x, ctx.arg(2, "dim", None), ctx.arg(3, "keepdim", False), kind)


@register_function(torch.nn.functional.normalize, name="normalize")
def _normalize(ctx):
    """``F.normalize(x, p, dim, eps) = x / max(||x||_p, eps)`` along ``dim`` (cosine attention
    normalises q and k over the head width).

    * Along every other dim channels pass through with their zero state: a zeroed channel's
      whole slice is zero, so its norm is 0 and it stays ``0 / eps = 0``.
    * Along ``dim`` the norm sums over the channels: for ``p > 0`` a removed channel that is
      exactly zero adds nothing to it, so the others' values are unchanged (exact); a channel
      that is not zero when zeroed changes every other value (inexact). A zeroed channel comes
      out zero; any other value is divided by a data-dependent norm.
    """
    x = _tc(ctx, ctx.arg(0, "input"))
    p = ctx.arg(1, "p", 2.0)
    dim = ctx.arg(2, "dim", 1)
    if x is None or not isinstance(p, Number):
        return ctx.unknown("normalize with a tensor exponent")
    dims = list(x.dims)
    for d in ([dim] if isinstance(dim, int) else list(dim)):
        d = norm_dim(d, x.ndim)
        t = x.dims[d]
        if t is None:
            continue
        if p > 0:
            ctx.require_zero(t, f"an L{p:g} norm over channels")
        else:
            ctx.inexact(t, f"an L{p:g} norm over channels changes when a channel is removed")
        dims[d] = Track(t.units, np.where(t.state == ZERO, ZERO, ANY).astype(np.int8))
    return TensorChannels(x.shape, dims)


# ============================================================================ matrix products


def matmul_channels(ctx, a: TensorChannels, b: TensorChannels, out_shape) -> TensorChannels:
    """``a @ b`` over the last two dims, batch dims broadcast. A parameter on either side of
    the contraction is a consumer of the other side's channels (``x @ W``)."""
    ka, kb = a.dims[-1], b.dims[-2]
    if kb is not None and kb.source is not None:
        ctx.consume(ka, kb, "a matrix product with a weight")
    elif ka is not None and ka.source is not None:
        ctx.consume(kb, ka, "a matrix product with a weight")
    elif ka is not None or kb is not None:
        ctx.unify(ka, kb, reason="contracted with a dimension that carries no channels")
        if ka is not None and kb is not None:
            ctx.require_zero(Track(ka.units, state_mul([ka.state, kb.state])), "a matrix product's contraction")
    batch = len(out_shape) - 2
    ab = TensorChannels(a.shape[:-2], a.dims[:-2])
    bb = TensorChannels(b.shape[:-2], b.dims[:-2])
    dims: List[Optional[Track]] = []
    al = broadcast_dims([ab.shape, bb.shape], batch)
    for d in range(batch):
        present = [t.dims[s] for t, s in ((ab, al[0][d]), (bb, al[1][d])) if s is not None and t.shape[s] == out_shape[d]]
        tracked = [p for p in present if p is not None]
        if tracked and len(tracked) < len(present):
            for p in tracked:
                ctx.pin(p, "batched matrix product with a dimension that carries no channels")
            dims.append(None)
        elif tracked:
            ctx.unify(*tracked)
            dims.append(Track(tracked[0].units, state_mul([p.state for p in tracked])))
        else:
            dims.append(None)
    dims += [a.dims[-2], b.dims[-1]]
    return TensorChannels(tuple(out_shape), dims)


@register_function(torch.matmul, operator.matmul, torch.bmm, torch.mm, name="matmul")
@register_method("matmul", "bmm", "mm", name="matmul")
def _matmul(ctx):
    a = _tc(ctx, ctx.arg(0, "input"))
    b = _tc(ctx, ctx.arg(1, "other"))
    if a is None or b is None or a.ndim < 2 or b.ndim < 2:
        return ctx.unknown("matrix product of vectors")
    return matmul_channels(ctx, a, b, ctx.out_shape)


# ============================================================================ repeats, windows, top-k, dtype reads
# (ops found without a rule on detectors, mixture-of-experts routers, Gemma, DeBERTa, XCiT,
# HaloNet and RAFT; each states what a removed channel does through it)


@register_method("type_as", selects=True, name="type_as")
@register_function(getattr(torch.ops.aten, "type_as", None) and torch.ops.aten.type_as.default, selects=True,
                   name="type_as")
def _type_as(ctx):
    """``x.type_as(other)``: ``x`` converted to ``other``'s dtype. Only ``other``'s dtype is read,
    so its channels are neither linked nor dropped."""
    x = _tc(ctx, ctx.arg(0, "input"))
    return x if x is not None else ctx.out_untracked()


def state_reciprocal_map(state: np.ndarray) -> np.ndarray:
    """f(0) = inf (``rsqrt``, ``reciprocal``): a zero becomes unknown, a constant stays one."""
    return np.where(state == CONST, CONST, ANY).astype(np.int8)


@register_function(torch.rsqrt, torch.reciprocal, torch.ops.aten.rsqrt.default, torch.ops.aten.reciprocal.default,
                   name="reciprocal")
@register_method("rsqrt", "rsqrt_", "reciprocal", "reciprocal_", name="reciprocal")
def _reciprocal(ctx):
    """``rsqrt``/``reciprocal`` elementwise: channels pass through; a zeroed channel becomes
    infinite (unknown), a constant stays constant (``rsqrt(mean(x**2) + eps)`` of an RMS norm)."""
    x = _tc(ctx, ctx.arg(0, "input"))
    if x is None:
        return ctx.unknown("reciprocal of a value fxprune cannot follow")
    return x.map_state(state_reciprocal_map)


def _repeat_sizes(ctx) -> List[int]:
    node = ctx.node
    rest = list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple, torch.Size)):
        rest = list(rest[0])
    if not rest:
        rest = list(node.kwargs.get("repeats", node.kwargs.get("sizes", ())))
    return rest


@register_method("repeat", name="repeat")
@register_function(torch.ops.aten.repeat.default, name="repeat")
def _repeat(ctx):
    """``x.repeat(*r)``: dim ``d`` tiled ``r[d]`` times (leading dims added for extra repeats).
    The copies of a channel are the same element, so it is removed from every copy and the
    repeat counts stay valid."""
    x = _tc(ctx, ctx.arg(0, "input"))
    reps = _repeat_sizes(ctx)
    if x is None or not all(isinstance(r, int) for r in reps) or len(reps) < x.ndim:
        return ctx.unknown("repeat with computed counts")
    lead = len(reps) - x.ndim
    dims: List[Optional[Track]] = [None] * lead
    for d, t in enumerate(x.dims):
        r = reps[lead + d]
        dims.append(t if t is None or r == 1 else Track(np.tile(t.units, r), np.tile(t.state, r)))
    return TensorChannels(ctx.out_shape, dims)


def _rewrite_repeat_interleave(rctx) -> None:
    """An ATen ``repeat_interleave`` may carry the output size: recompute it."""
    x = rctx.ch(rctx.node.args[0])
    d = rctx.arg(2, "dim", None)
    if d is None or x.dims[norm_dim(d, x.ndim)] is None or rctx.arg(3, "output_size", None) is None:
        return
    rctx.set_arg(3, "output_size", rctx.new_shape(rctx.out_ch)[norm_dim(d, x.ndim)])


@register_function(torch.repeat_interleave, torch.ops.aten.repeat_interleave.self_int, name="repeat_interleave",
                   rewrite=_rewrite_repeat_interleave)
@register_method("repeat_interleave", name="repeat_interleave")
def _repeat_interleave(ctx):
    """``repeat_interleave(x, r, dim)`` with an integer ``r``: each position of ``dim`` repeated
    ``r`` times in place (grouped-query attention's key/value heads, DeBERTa). Without ``dim``
    the tensor is flattened first; a tensor of counts has a data-dependent size."""
    x = _tc(ctx, ctx.arg(0, "input"))
    r = ctx.arg(1, "repeats")
    dim = ctx.arg(2, "dim", None)
    if isinstance(r, torch.fx.Node) and "tensor_meta" not in r.meta and dim is not None and x is not None:
        d = norm_dim(dim, x.ndim)  # a count read from a size (``x.shape[0]``): shape propagation gives it
        r = ctx.out_shape[d] // x.shape[d] if x.shape[d] else None
    if x is None or not isinstance(r, int):
        return ctx.unknown("repeat_interleave with a tensor of counts")
    if dim is None:
        if x.ndim == 1 and x.dims[0] is not None:
            t = x.dims[0]
            return TensorChannels(ctx.out_shape, [Track(np.repeat(t.units, r), np.repeat(t.state, r))])
        return ctx.unknown("repeat_interleave of a flattened tensor")
    d = norm_dim(dim, x.ndim)
    dims = list(x.dims)
    if dims[d] is not None:
        dims[d] = Track(np.repeat(dims[d].units, r), np.repeat(dims[d].state, r))
    return TensorChannels(ctx.out_shape, dims)


def _rewrite_tensor_split(rctx) -> None:
    """Recompute the split points as indices (``sections`` would now cut elsewhere)."""
    x = rctx.ch(rctx.node.args[0])
    d = norm_dim(rctx.arg(2, "dim", 0), x.ndim)
    if x.dims[d] is None:
        return
    sizes = [rctx.new_shape(p)[d] for p in rctx.out_ch]
    indices = list(np.cumsum(sizes[:-1]).tolist())
    node = rctx.node
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        node.target = torch.ops.aten.tensor_split.indices
    node.args = (node.args[0], indices, d)
    node.kwargs = {}


@register_function(torch.tensor_split, *[getattr(torch.ops.aten.tensor_split, n) for n in ("sections", "indices")],
                   selects=True, name="tensor_split", rewrite=_rewrite_tensor_split)
@register_method("tensor_split", selects=True, name="tensor_split", rewrite=_rewrite_tensor_split)
def _tensor_split(ctx):
    """``tensor_split(x, sections or indices, dim)``: pieces of ``dim`` (sizes from shape
    propagation); the rewrite gives the new split points."""
    x = _tc(ctx, ctx.arg(0, "input"))
    if x is None or not isinstance(ctx.arg(1, "indices_or_sections", 0), (int, list, tuple)):
        return ctx.unknown("tensor_split at computed points")
    d = norm_dim(ctx.arg(2, "dim", 0), x.ndim)
    return _pieces(ctx, x, d, _out_sizes(ctx, d))


@register_function(torch.topk, torch.ops.aten.topk.default, name="topk")
@register_method("topk", name="topk")
def _topk(ctx):
    """``topk(x, k, dim)`` -> (values, indices). The ``k`` positions taken along ``dim`` depend
    on the values, so channels there are frozen (a mixture-of-experts router's experts); every
    other dim passes through, zero where ``x`` is (values) or unknown (indices)."""
    x = _tc(ctx, ctx.arg(0, "input"))
    if x is None:
        return ctx.unknown("top-k of a value fxprune cannot follow")
    d = norm_dim(ctx.arg(2, "dim", -1), x.ndim)
    ctx.pin(x.dims[d], "top-k picks positions of this dimension by value")
    dims = [None if k == d else t for k, t in enumerate(x.dims)]
    metas = ctx.node.meta.get("tensor_meta")
    shape = tuple(metas[0].shape)
    values = TensorChannels(shape, list(dims))
    indices = TensorChannels(shape, [None if t is None else t.with_state(ANY) for t in dims])
    return (values, indices)


@register_function(torch.ops.aten.clamp.Tensor, name="clamp")
def _clamp_tensor(ctx):
    """``clamp(x, min, max)`` with tensor bounds: elementwise over ``x`` and the bounds; a zeroed
    channel stays zero only where its bounds are zero too (else it becomes a bound)."""
    operands = [v for v in (ctx.arg(0, "self"), ctx.arg(1, "min", None), ctx.arg(2, "max", None)) if v is not None]
    return elementwise_channels(ctx, operands, "add")


@register_method("unfold", name="unfold")
@register_function(torch.ops.aten.unfold.default, name="unfold")
def _unfold(ctx):
    """``x.unfold(dim, size, step)``: windows along ``dim`` become a new last dim. Windows over
    channels would mix them (frozen); other dims pass through."""
    x = _tc(ctx, ctx.arg(0, "input"))
    if x is None:
        return ctx.unknown("unfold of a value fxprune cannot follow")
    d = norm_dim(ctx.arg(1, "dimension"), x.ndim)
    ctx.pin(x.dims[d], "unfolded into sliding windows")
    dims = [None if k == d else t for k, t in enumerate(x.dims)] + [None]
    return TensorChannels(ctx.out_shape, dims)
