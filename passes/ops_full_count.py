"""Channel semantics of the count-preserving norms and reductions of :mod:`fxprune.modules`.

A slim model holds them where a norm or reduction lost channels
(:mod:`fxprune.passes.full_count`); they have the semantics of the stock op they replace, so a
slim model compiled again prunes exactly as the full one did, and its rewrite only updates the
slim shapes (the full count stays the original model's). Symbolic tracing keeps the functions
as single calls and the modules as leaves (:class:`fxprune.passes.trace.FxPruneTracer`).
"""
from __future__ import annotations

from fxprune import modules as fm

from . import full_count
from .channels import TensorChannels
from .ops_aten import _with_stats
from .ops_nn import _param_tc, _x, groupnorm_channels, layernorm_channels
from .ops_tensor import reduce_channels
from .registry import register_function, register_module


def _tc(ctx, value):
    c = ctx.ch(value)
    return c if isinstance(c, TensorChannels) else None


def _n(shape) -> int:
    return 1 if isinstance(shape, int) else len(shape)


@register_function(fm.layer_norm_full_count, name="layer_norm", rewrite=full_count.rewrite_normalized_shape)
def _layer_norm(ctx):
    """``layer_norm_full_count(input, normalized_shape, full_size, weight, bias, eps)``."""
    return layernorm_channels(ctx, _x(ctx), _n(ctx.arg(1)), _tc(ctx, ctx.arg(3, "weight", None)),
                              _tc(ctx, ctx.arg(4, "bias", None)))


@register_function(fm.native_layer_norm_full_count, name="layer_norm", rewrite=full_count.rewrite_normalized_shape)
def _native_layer_norm(ctx):
    """``native_layer_norm_full_count(input, normalized_shape, weight, bias, eps, full_size)``."""
    return _with_stats(ctx, layernorm_channels(ctx, _x(ctx), _n(ctx.arg(1)), _tc(ctx, ctx.arg(2)),
                                               _tc(ctx, ctx.arg(3))))


@register_function(fm.rms_norm_full_count, name="rms_norm", rewrite=full_count.rewrite_normalized_shape)
def _rms_norm(ctx):
    """``rms_norm_full_count(input, normalized_shape, full_size, weight, eps)``."""
    return layernorm_channels(ctx, _x(ctx), _n(ctx.arg(1)), _tc(ctx, ctx.arg(3, "weight", None)), None,
                              centred=False)


@register_function(fm.mean_full_count, name="mean", rewrite=full_count.rewrite_full_sizes(3))
def _mean(ctx):
    """``mean_full_count(input, dim, keepdim, full_sizes)``."""
    return reduce_channels(ctx, _x(ctx), ctx.arg(1, "dim", None), ctx.arg(2, "keepdim", False), "mean")


@register_function(fm.var_full_count, fm.std_full_count, name="var", rewrite=full_count.rewrite_full_sizes(4))
def _var(ctx):
    """``var_full_count`` / ``std_full_count(input, dim, correction, keepdim, full_sizes)``."""
    return reduce_channels(ctx, _x(ctx), ctx.arg(1, "dim", None), ctx.arg(3, "keepdim", False), "var")


def _group_norm_channels(ctx, kept, w, b):
    return groupnorm_channels(ctx, _x(ctx), len(kept), w.dims[0] if w is not None else None,
                              b.dims[0] if b is not None else None, group_sizes=kept)


@register_function(fm.group_norm_full_count, name="group_norm", rewrite=full_count.rewrite_kept_per_group(1))
def _group_norm(ctx):
    """``group_norm_full_count(input, kept_per_group, channels_per_group, weight, bias, eps)``."""
    return _group_norm_channels(ctx, ctx.arg(1, "kept_per_group"), _tc(ctx, ctx.arg(3, "weight", None)),
                                _tc(ctx, ctx.arg(4, "bias", None)))


@register_function(fm.native_group_norm_full_count, name="group_norm", rewrite=full_count.rewrite_kept_per_group(3))
def _native_group_norm(ctx):
    """``native_group_norm_full_count(input, weight, bias, kept_per_group, channels_per_group, eps)``."""
    return _with_stats(ctx, _group_norm_channels(ctx, ctx.arg(3), _tc(ctx, ctx.arg(1)), _tc(ctx, ctx.arg(2))))


@register_module(fm.CountPreservingLayerNorm, name="layer_norm", rewrite=full_count.rewrite_module_normalized_shape)
def _layer_norm_module(ctx):
    x = _x(ctx)
    n = len(ctx.module.normalized_shape)
    over = x.dims[x.ndim - n:]
    return layernorm_channels(ctx, x, n, _param_tc(ctx, "weight", over), _param_tc(ctx, "bias", over))


@register_module(fm.CountPreservingRMSNorm, name="rms_norm", rewrite=full_count.rewrite_module_normalized_shape)
def _rms_norm_module(ctx):
    x = _x(ctx)
    n = len(ctx.module.normalized_shape)
    return layernorm_channels(ctx, x, n, _param_tc(ctx, "weight", x.dims[x.ndim - n:]), None, centred=False)


@register_module(fm.CountPreservingGroupNorm, name="group_norm", rewrite=full_count.rewrite_count_preserving_group_norm)
def _group_norm_module(ctx):
    m = ctx.module
    return groupnorm_channels(ctx, _x(ctx), len(m.kept_per_group), ctx.param("weight", 0, "out"),
                              ctx.param("bias", 0, "out"), group_sizes=m.kept_per_group)


LEAF_MODULES = (fm.CountPreservingLayerNorm, fm.CountPreservingRMSNorm, fm.CountPreservingGroupNorm)
FUNCTIONS = (fm.layer_norm_full_count, fm.native_layer_norm_full_count, fm.rms_norm_full_count,
             fm.mean_full_count, fm.var_full_count, fm.std_full_count, fm.group_norm_full_count,
             fm.native_group_norm_full_count)
