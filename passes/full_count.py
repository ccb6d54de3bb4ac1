"""Full-count rewrite: normalisations and reductions over pruned channels keep the full count.

A removed channel is exactly zero wherever it flows (a zero-invariant group guarantees it,
and the channel-deps pass requires it of every reduction's input), so in a sum over the
channel dims it adds nothing; only the number of reduced elements changes. The slim op
therefore reduces over the kept channels and divides by the full model's count, which gives
the full model's statistics exactly:

* a mean, variance or standard deviation over channel dims becomes
  :func:`fxprune.modules.mean_full_count` / ``var_full_count`` / ``std_full_count``;
* a layer norm (``nn.LayerNorm``, ``F.layer_norm``, ``aten.layer_norm``,
  ``aten.native_layer_norm``) becomes :class:`fxprune.modules.CountPreservingLayerNorm` or
  :func:`~fxprune.modules.layer_norm_full_count`;
* an RMS norm keeps its stock module where it can: over ``D'`` of ``D`` channels,
  ``x / sqrt(sum(x^2)/D + eps) * w`` equals a stock RMS norm with weight ``w * sqrt(D/D')``
  and epsilon ``eps * D/D'``; a functional one becomes :func:`~fxprune.modules.rms_norm_full_count`;
* a group norm (``nn.GroupNorm``, ``F.group_norm``, ``aten.group_norm``,
  ``aten.native_group_norm``) that lost whole groups only stays a stock group norm with fewer
  groups; one whose groups lost channels unevenly becomes
  :class:`~fxprune.modules.CountPreservingGroupNorm` / ``group_norm_full_count`` /
  ``native_group_norm_full_count`` (each group divides by its own full count).

A slim model compiled again keeps these forms: the same functions and modules then only get
their slim shapes updated, the full count staying the original model's
(:mod:`fxprune.passes.ops_full_count` gives them their channel semantics).

Each function here is the registry ``rewrite`` of its op (:mod:`fxprune.passes.prune_rewrite`
calls it with a :class:`~fxprune.passes.prune_rewrite.RewriteContext`); an op whose reduced
dims kept every channel is left as it is.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from .channels import TensorChannels, norm_dim


def _shrunk_dims(rctx, x: TensorChannels, dims: Sequence[int]) -> Tuple[bool, Tuple[int, ...], Tuple[int, ...]]:
    """(whether any of ``dims`` lost channels, full sizes, slim sizes) of ``x`` over ``dims``."""
    new = rctx.new_shape(x)
    full = tuple(x.shape[d] for d in dims)
    slim = tuple(new[d] for d in dims)
    return full != slim, full, slim


def _last_dims(x: TensorChannels, n: int) -> List[int]:
    return list(range(x.ndim - n, x.ndim))


def _replace(rctx, new: torch.nn.Module) -> None:
    """Put ``new`` in place of the node's norm module; a norm fused with its activation
    (timm's ``LayerNormAct``, ``GroupNormAct``: norm, then ``drop``, then ``act``) keeps them."""
    m = rctx.module
    tail = [getattr(m, a) for a in ("drop", "act") if isinstance(getattr(m, a, None), torch.nn.Module)]
    rctx.replace_module(torch.nn.Sequential(new, *tail) if tail else new)


def _call(rctx, fn, args: tuple) -> None:
    """Turn the node into ``fn(*args)`` (a ``call_method`` node becomes a ``call_function``)."""
    node = rctx.node
    node.op, node.target, node.args, node.kwargs = "call_function", fn, args, {}


# ---------------------------------------------------------------------------- reductions


def reduced_dims(dim, ndim: int) -> List[int]:
    """The dims a reduction's ``dim`` argument names (None or empty: all)."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(ndim))
    if isinstance(dim, int):
        return [norm_dim(dim, ndim)]
    return [norm_dim(d, ndim) for d in dim]


def _full_sizes(rctx, x: TensorChannels, dims: Sequence[int]) -> Optional[tuple]:
    """Per reduced dim, its full size where it lost channels, else None; None if none did."""
    new = rctx.new_shape(x)
    sizes = tuple(x.shape[d] if new[d] != x.shape[d] else None for d in dims)
    return sizes if any(s is not None for s in sizes) else None


def rewrite_mean(rctx) -> None:
    """``torch.mean`` / ``Tensor.mean`` / ``aten.mean.dim`` over lost channels:
    :func:`fxprune.modules.mean_full_count`."""
    from fxprune.modules import mean_full_count

    x = rctx.ch(rctx.node.args[0])
    if not isinstance(x, TensorChannels):
        return
    dim, keepdim = rctx.arg(1, "dim", None), rctx.arg(2, "keepdim", False)
    dims = reduced_dims(dim, x.ndim)
    full = _full_sizes(rctx, x, dims)
    if full is None:
        return
    dtype = rctx.node.kwargs.get("dtype")
    _call(rctx, mean_full_count, (rctx.node.args[0], tuple(dims), bool(keepdim), full))
    if dtype is not None:
        rctx.node.kwargs = {"dtype": dtype}


def var_arguments(node) -> Optional[Tuple[object, float, bool]]:
    """``(dim, correction, keepdim)`` of a ``var``/``std`` call in any of its spellings
    (``torch.var(x, dim, unbiased, keepdim)``, ``correction=``, ``aten.var.correction``,
    ``aten.var.dim``), or None when they cannot be read."""
    args, kwargs = list(node.args[1:]), dict(node.kwargs)
    dim = args.pop(0) if args else kwargs.pop("dim", None)
    if isinstance(dim, bool):  # torch.var(x, unbiased)
        kwargs.setdefault("unbiased", dim)
        dim = None
    correction: float = 1
    if args and isinstance(args[0], bool):
        correction = 1 if args.pop(0) else 0
    keepdim = args.pop(0) if args else kwargs.pop("keepdim", False)
    if "unbiased" in kwargs:
        correction = 1 if kwargs.pop("unbiased") else 0
    if "correction" in kwargs:
        c = kwargs.pop("correction")
        correction = 1 if c is None else c
    if args or kwargs or not isinstance(keepdim, bool) or not isinstance(correction, (int, float)):
        return None
    if not (dim is None or isinstance(dim, int) or (isinstance(dim, (list, tuple))
                                                   and all(isinstance(d, int) for d in dim))):
        return None
    return dim, correction, keepdim


def rewrite_var(rctx, std: bool) -> None:
    """``var``/``std`` over lost channels: :func:`fxprune.modules.var_full_count` /
    ``std_full_count``."""
    from fxprune.modules import std_full_count, var_full_count

    x = rctx.ch(rctx.node.args[0])
    parsed = var_arguments(rctx.node)
    if not isinstance(x, TensorChannels) or parsed is None:
        return
    dim, correction, keepdim = parsed
    dims = reduced_dims(dim, x.ndim)
    full = _full_sizes(rctx, x, dims)
    if full is None:
        return
    _call(rctx, std_full_count if std else var_full_count, (rctx.node.args[0], tuple(dims), correction, keepdim, full))


# ---------------------------------------------------------------------------- layer and RMS norms


def rewrite_layer_norm_module(rctx) -> None:
    """``nn.LayerNorm`` over lost channels: :class:`fxprune.modules.CountPreservingLayerNorm`
    with the (already sliced) parameters."""
    from fxprune.modules import CountPreservingLayerNorm

    m = rctx.module
    if not isinstance(m, torch.nn.LayerNorm):  # a module called twice, already replaced
        return
    x = rctx.ch(rctx.node.args[0])
    n = len(m.normalized_shape)
    shrunk, full, slim = _shrunk_dims(rctx, x, _last_dims(x, n))
    if not shrunk:
        return
    new = CountPreservingLayerNorm(slim, math.prod(full), m.eps, m.weight is not None,
                                   bias=getattr(m, "bias", None) is not None)
    new.weight, new.bias = m.weight, m.bias
    _replace(rctx, new)


def rewrite_layer_norm_call(rctx) -> None:
    """``F.layer_norm`` / ``aten.layer_norm`` (input, normalized_shape, weight, bias, eps) over
    lost channels: :func:`fxprune.modules.layer_norm_full_count`."""
    from fxprune.modules import layer_norm_full_count

    x = rctx.ch(rctx.node.args[0])
    n = len(_shape_arg(rctx.arg(1, "normalized_shape")))
    shrunk, full, slim = _shrunk_dims(rctx, x, _last_dims(x, n))
    if not shrunk:
        return
    w, b, eps = rctx.arg(2, "weight", None), rctx.arg(3, "bias", None), rctx.arg(4, "eps", 1e-5)
    _call(rctx, layer_norm_full_count, (rctx.node.args[0], slim, math.prod(full), w, b, eps))


def rewrite_native_layer_norm(rctx) -> None:
    """``aten.native_layer_norm(input, normalized_shape, weight, bias, eps)`` over lost
    channels: :func:`fxprune.modules.native_layer_norm_full_count` (same three outputs)."""
    from fxprune.modules import native_layer_norm_full_count

    x = rctx.ch(rctx.node.args[0])
    n = len(_shape_arg(rctx.arg(1)))
    shrunk, full, slim = _shrunk_dims(rctx, x, _last_dims(x, n))
    if not shrunk:
        return
    _call(rctx, native_layer_norm_full_count,
          (rctx.node.args[0], slim, rctx.arg(2), rctx.arg(3), rctx.arg(4), math.prod(full)))


def rewrite_rms_norm_module(rctx) -> None:
    """``nn.RMSNorm`` over ``D'`` of ``D`` channels: the same module with weight scaled by
    ``sqrt(D/D')`` and epsilon ``eps * D/D'`` (exact: ``sum/D' + eps D/D' = (D/D')(sum/D + eps)``);
    without a weight or an explicit epsilon, :class:`fxprune.modules.CountPreservingRMSNorm`."""
    from fxprune.modules import CountPreservingRMSNorm

    m = rctx.module
    x = rctx.ch(rctx.node.args[0])
    n = len(m.normalized_shape)
    shrunk, full, slim = _shrunk_dims(rctx, x, _last_dims(x, n))
    if not shrunk or isinstance(m, CountPreservingRMSNorm) or tuple(m.normalized_shape) == slim:
        return  # nothing lost, or a module called twice and already rewritten
    d_full, d_slim = math.prod(full), math.prod(slim)
    if m.weight is None or m.eps is None or d_slim == 0:
        new = CountPreservingRMSNorm(slim, d_full, m.eps, m.weight is not None)
        new.weight = m.weight
        _replace(rctx, new)
        return
    m.normalized_shape = tuple(slim)
    m.eps = m.eps * d_full / d_slim
    with torch.no_grad():
        m.weight.mul_(math.sqrt(d_full / d_slim))


def rewrite_rms_norm_call(rctx) -> None:
    """``F.rms_norm`` / ``aten.rms_norm`` (input, normalized_shape, weight, eps) over lost
    channels: :func:`fxprune.modules.rms_norm_full_count`."""
    from fxprune.modules import rms_norm_full_count

    x = rctx.ch(rctx.node.args[0])
    n = len(_shape_arg(rctx.arg(1, "normalized_shape")))
    shrunk, full, slim = _shrunk_dims(rctx, x, _last_dims(x, n))
    if not shrunk:
        return
    _call(rctx, rms_norm_full_count, (rctx.node.args[0], slim, math.prod(full), rctx.arg(2, "weight", None),
                                      rctx.arg(3, "eps", None)))


def _shape_arg(shape) -> tuple:
    return (shape,) if isinstance(shape, int) else tuple(shape)


# ---------------------------------------------------------------------------- group norm


def kept_per_group(rctx, x: TensorChannels, num_groups: int) -> Optional[Tuple[int, ...]]:
    """Kept channels of each group of a group norm over ``x``'s dim 1, or None when no group
    lost a channel."""
    t = x.dims[1]
    if t is None:
        return None
    kept = rctx.alive[t.units].reshape(num_groups, -1).sum(1)
    per = x.shape[1] // num_groups
    return None if (kept == per).all() else tuple(int(k) for k in kept)


def group_norm_plan(rctx, x: TensorChannels, num_groups: int):
    """``("same", None)``, ``("fewer_groups", n)`` (whole groups removed: a stock group norm
    with ``n`` groups is exact, the other groups' statistics untouched) or
    ``("full_count", kept_per_group)``."""
    kept = kept_per_group(rctx, x, num_groups)
    if kept is None:
        return "same", None
    per = x.shape[1] // num_groups
    if all(k in (0, per) for k in kept):
        return "fewer_groups", sum(1 for k in kept if k)
    return "full_count", kept


def rewrite_group_norm_module(rctx) -> None:
    """``nn.GroupNorm``: fewer groups when whole groups went, else
    :class:`fxprune.modules.CountPreservingGroupNorm`."""
    from fxprune.modules import CountPreservingGroupNorm

    m = rctx.module
    if not isinstance(m, torch.nn.GroupNorm):  # a module called twice, already replaced
        return
    x = rctx.ch(rctx.node.args[0])
    plan, value = group_norm_plan(rctx, x, m.num_groups)
    if plan == "same":
        return
    if plan == "fewer_groups":
        m.num_channels, m.num_groups = rctx.new_shape(x)[1], value
        return
    new = CountPreservingGroupNorm(value, m.num_channels // m.num_groups, m.eps, m.affine)
    new.weight, new.bias = m.weight, m.bias
    _replace(rctx, new)


def rewrite_native_group_norm(rctx) -> None:
    """``aten.native_group_norm(input, weight, bias, N, C, HxW, group, eps)``: fewer groups
    when whole groups went, else :func:`fxprune.modules.native_group_norm_full_count`."""
    from fxprune.modules import native_group_norm_full_count

    x = rctx.ch(rctx.node.args[0])
    g = rctx.arg(6)
    plan, value = group_norm_plan(rctx, x, g)
    if plan == "same":
        return
    args = list(rctx.node.args)
    if plan == "fewer_groups":
        args[4], args[6] = rctx.new_shape(x)[1], value
        rctx.node.args = tuple(args)
        return
    _call(rctx, native_group_norm_full_count, (args[0], args[1], args[2], value, x.shape[1] // g, args[7]))


def rewrite_group_norm_call(rctx) -> None:
    """``F.group_norm`` / ``aten.group_norm`` (input, num_groups, weight, bias, eps)."""
    from fxprune.modules import group_norm_full_count

    x = rctx.ch(rctx.node.args[0])
    g = rctx.arg(1, "num_groups")
    plan, value = group_norm_plan(rctx, x, g)
    if plan == "same":
        return
    if plan == "fewer_groups":
        rctx.set_arg(1, "num_groups", value)
        return
    _call(rctx, group_norm_full_count, (rctx.node.args[0], value, x.shape[1] // g, rctx.arg(2, "weight", None),
                                        rctx.arg(3, "bias", None), rctx.arg(4, "eps", 1e-5)))



# ---------------------------------------------------------------------------- a slim model pruned again


def rewrite_normalized_shape(rctx) -> None:
    """``layer_norm_full_count`` / ``native_layer_norm_full_count`` / ``rms_norm_full_count``
    (input, normalized_shape, ...): the slim shape shrinks, the full count stays."""
    x = rctx.ch(rctx.node.args[0])
    n = len(_shape_arg(rctx.arg(1, "normalized_shape")))
    shrunk, _, slim = _shrunk_dims(rctx, x, _last_dims(x, n))
    if shrunk:
        rctx.set_arg(1, "normalized_shape", slim)


def rewrite_module_normalized_shape(rctx) -> None:
    """``CountPreservingLayerNorm`` / ``CountPreservingRMSNorm``: the slim shape shrinks."""
    m = rctx.module
    x = rctx.ch(rctx.node.args[0])
    shrunk, _, slim = _shrunk_dims(rctx, x, _last_dims(x, len(m.normalized_shape)))
    if shrunk:
        m.normalized_shape = slim


def rewrite_full_sizes(index: int):
    """The rewrite of ``mean_full_count`` (``full_sizes`` at ``index`` 3) or ``var_full_count``
    / ``std_full_count`` (4): a reduced dim that loses channels now records its size before."""

    def rewrite(rctx) -> None:
        x = rctx.ch(rctx.node.args[0])
        dims = reduced_dims(rctx.arg(1, "dim", None), x.ndim)
        before = rctx.arg(index, "full_sizes", None) or ()
        new = rctx.new_shape(x)
        sizes = tuple(before[k] if k < len(before) and before[k] is not None
                      else (x.shape[d] if new[d] != x.shape[d] else None) for k, d in enumerate(dims))
        rctx.set_arg(index, "full_sizes", sizes)

    return rewrite


def _kept_after(rctx, x: TensorChannels, kept_before: Sequence[int]) -> Tuple[int, ...]:
    """Each group's kept channels after this pruning, from its channels before."""
    t = x.dims[1]
    if t is None:
        return tuple(kept_before)
    alive = rctx.alive[t.units]
    bounds = [0]
    for k in kept_before:
        bounds.append(bounds[-1] + k)
    return tuple(int(alive[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:]))


def rewrite_kept_per_group(index: int):
    """The rewrite of ``group_norm_full_count`` (``kept_per_group`` at ``index`` 1) or
    ``native_group_norm_full_count`` (3): fewer channels kept per group."""

    def rewrite(rctx) -> None:
        x = rctx.ch(rctx.node.args[0])
        rctx.set_arg(index, "kept_per_group", _kept_after(rctx, x, rctx.arg(index, "kept_per_group")))

    return rewrite


def rewrite_count_preserving_group_norm(rctx) -> None:
    """``CountPreservingGroupNorm``: fewer channels kept per group."""
    m = rctx.module
    m.kept_per_group = _kept_after(rctx, rctx.ch(rctx.node.args[0]), m.kept_per_group)
    m.num_channels = sum(m.kept_per_group)
