"""Channel semantics of neural-network layers: convolutions, linear maps, normalizations,
activations, pooling and resampling, as modules and as functions.

Every rule states, for its op, which dimension holds channels, which parameter dimensions
produce them (zeroing those makes the channel zero: a conv's weight rows and bias, a norm's
affine parameters) and which consume them (a conv's input columns), and what a zeroed
channel becomes after the op (``relu(0) = 0``; ``sigmoid(0) = 0.5``). Each module rule has a
``rewrite`` that sets the module's size attributes after its parameters are sliced.
"""
from __future__ import annotations

import operator
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import full_count
from .channels import ANY, CONST, ZERO, TensorChannels, Track, norm_dim, state_const_map, state_mul
from .registry import REGISTRY, register_function, register_method, register_module
from .trace import training_dependent_modules

# ============================================================================ helpers


def _x(ctx) -> TensorChannels:
    tc = ctx.ch(ctx.arg(0, "input"))
    if not isinstance(tc, TensorChannels):
        raise TypeError(f"{ctx.where()}: expected a tensor input")
    return tc


def _with_dim(tc: TensorChannels, dim: int, track: Optional[Track], size: Optional[int] = None) -> TensorChannels:
    dims = list(tc.dims)
    dims[dim] = track
    shape = list(tc.shape)
    if size is not None:
        shape[dim] = size
    return TensorChannels(tuple(shape), dims)


def _keep_leading(tc: TensorChannels, out_shape, n_lead: int) -> TensorChannels:
    """Output shaped ``out_shape`` whose first ``n_lead`` dims are the input's, the rest untracked."""
    dims = list(tc.dims[:n_lead]) + [None] * (len(out_shape) - n_lead)
    return TensorChannels(tuple(out_shape), dims)


def _size_attrs(module: nn.Module, **attrs) -> None:
    for k, v in attrs.items():
        if hasattr(module, k):
            setattr(module, k, v)


# ============================================================================ convolution


def conv_channel_dim(x_ndim: int, weight_ndim: int) -> int:
    """Channel dim of a convolution's input and output: 1 when batched (N, C, *spatial), 0 for an
    unbatched input (C, *spatial), whose rank is one less than the weight's."""
    return 0 if x_ndim == weight_ndim - 1 else 1


def conv_channels(ctx, x: TensorChannels, weight: Union[TensorChannels, Tuple[Optional[Track], Optional[Track], int]],
                  bias: Optional[Track], groups: int, transposed: bool, out_shape, padding=0, *,
                  kernel: Sequence[int] = (), has_bias: Optional[bool] = None) -> TensorChannels:
    """Channels of a (transposed) convolution over ``x`` (channel dim 1, or 0 when unbatched).

    ``weight`` is the weight tensor's channels (a functional or ATen convolution: its kernel
    dims are marked as holding no channels), or ``(w0, w1, ndim)``: the tracks of a module
    weight's dims 0 and 1 and its rank; ``padding`` its padding argument (constant input
    channels fold into the bias only without padding). For ``groups == 1`` the output
    channels are the weight's output dim (producer) and the input channels its input dim
    (consumer). For grouped convolutions (depthwise included) channels are removed in whole
    groups: every input and output channel of a conv group is one element, so the slim conv
    keeps its per-group widths and has fewer groups (:func:`new_conv_groups`).

    ``kernel``: the kernel size (read from ``weight`` when it is a tensor's channels);
    ``has_bias``: the convolution adds a bias (default: ``bias`` is a track; a bias of one
    element has none). A kernel of size 1 in every spatial dim that keeps every spatial size
    applies the same map at each position, so a spatial dim that carries channels (a stream
    laid along the length: CoaT aggregates its class tokens with a ``Conv1d(3, 1, 1)``) goes
    through position by position: a removed position reads zeros in every input channel, so
    the output there is zero without a bias and the bias (a data-independent constant) with one.
    """
    if has_bias is None:
        has_bias = bias is not None
    if isinstance(weight, TensorChannels):
        kernel = weight.shape[2:]
        w0, w1, weight_ndim = weight.dims[0], weight.dims[1], weight.ndim
        for t in weight.dims[2:]:
            ctx.not_channels(t)
    else:
        w0, w1, weight_ndim = weight
    out_w, in_w = (w1, w0) if transposed else (w0, w1)
    cd = conv_channel_dim(x.ndim, weight_ndim)
    c_in = x.shape[cd]
    c_out = out_shape[cd]
    xin = x.dims[cd]
    if groups == 1:
        unpadded = padding == "valid" or not any(padding if isinstance(padding, (list, tuple)) else [padding])
        fold = ctx.fold_site(xin, in_w, bias, cd) if unpadded and not transposed else None
        ctx.consume(xin, in_w, f"the input channels of {ctx.node.name}", fold=fold)
        out = Track(out_w.units, np.full(c_out, ZERO, np.int8)) if out_w is not None else None
    else:
        # one element per conv group: all its input channels, weight rows/cols and outputs
        per_in = c_in // groups
        per_out = c_out // groups
        # depthwise: each group is one input channel, whose elements it takes (rather than fresh
        # ones unified with them), so a track that repeats per head stays so through the conv
        g_units = Track(xin.units, np.zeros(groups, np.int8)) if xin is not None and per_in == 1 else ctx.fresh(groups)
        if xin is not None:
            # A removed conv group takes its outputs with it, and when its filters are producer
            # parameters (zeroed with the group) those outputs are zero in the full model
            # whatever the input holds: only a fixed filter (a blur buffer) needs a zero input.
            if transposed or not ctx.is_producer(w0):
                ctx.require_zero(xin, f"the input channels of {ctx.node.name}")
            else:
                ctx.touched.append(xin.units)
            ctx.union(np.repeat(g_units.units, per_in), xin.units)
        else:
            ctx.pin(g_units, "grouped convolution over an input that carries no channels")
        if transposed:
            # weight (C_in, C_out/groups, k): dim 0 is per input channel, dim 1 within a group
            if w0 is not None:
                ctx.union(np.repeat(g_units.units, per_in), w0.units)
            if w1 is not None:
                ctx.pin(w1, "output width inside a transposed-conv group")
        else:
            if w0 is not None:
                ctx.union(np.repeat(g_units.units, per_out), w0.units)
            if w1 is not None and per_in > 1:
                ctx.pin(w1, "input width inside a conv group")
        out = Track(np.repeat(g_units.units, per_out), np.full(c_out, ZERO, np.int8))
    if bias is not None:
        if out is None:
            ctx.pin(bias, "bias of a conv whose output carries no channels")
        else:
            ctx.unify(out, bias)
    dims = [None] * len(out_shape)
    dims[cd] = out
    if cd == 1:
        dims[0] = x.dims[0]
    pointwise = len(kernel) > 0 and all(k == 1 for k in kernel)
    if pointwise and len(out_shape) == x.ndim and tuple(out_shape[cd + 1:]) == tuple(x.shape[cd + 1:]):
        for d in range(cd + 1, x.ndim):
            t = x.dims[d]
            if t is not None:
                dims[d] = Track(t.units, state_const_map(t.state) if has_bias else t.state.copy())
    return TensorChannels(tuple(out_shape), dims)


def new_conv_groups(rctx, x_node, groups: int, weight_ndim: int, per_group: Optional[int] = None) -> int:
    """``groups`` of a slim convolution: the per-group input width (``per_group``, by default
    the traced input width over ``groups``) is kept, so the group count is the new input width
    over it (1 stays 1)."""
    if groups == 1:
        return 1
    x = rctx.ch(x_node)
    cd = conv_channel_dim(x.ndim, weight_ndim)
    return rctx.new_shape(x)[cd] // (per_group or x.shape[cd] // groups)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _rewrite_conv(rctx) -> None:
    m = rctx.module
    w = m.weight
    transposed = isinstance(m, _CONV_TS)
    # from the module's own (in_channels, groups): a module called twice is rewritten twice
    groups = new_conv_groups(rctx, rctx.node.args[0], m.groups, w.ndim, m.in_channels // m.groups)
    in_channels = w.shape[0] if transposed else w.shape[1] * groups
    out_channels = w.shape[1] * groups if transposed else w.shape[0]
    _size_attrs(m, in_channels=in_channels, out_channels=out_channels, groups=groups)


@register_module(*_CONVS, *_CONV_TS, name="conv", rewrite=_rewrite_conv)
def _conv_module(ctx):
    m = ctx.module
    transposed = isinstance(m, _CONV_TS)
    x = _x(ctx)
    plain = m.groups == 1 and not transposed  # weight (out, in, *k); bias with the rows, x with the columns
    w0 = ctx.param("weight", 0, "in" if transposed else "out")
    w1 = ctx.param("weight", 1, "out" if transposed else "in",
                   like=x.dims[conv_channel_dim(x.ndim, m.weight.ndim)] if plain else None)
    bias = ctx.param("bias", 0, "out", like=w0 if plain else None)
    return conv_channels(ctx, x, (w0, w1, m.weight.ndim), bias, m.groups, transposed, ctx.out_shape, m.padding,
                         kernel=m.kernel_size, has_bias=m.bias is not None)


def _functional_conv(transposed: bool):
    def rule(ctx):
        x = _x(ctx)
        w = ctx.ch(ctx.arg(1, "weight"))
        b = ctx.ch(ctx.arg(2, "bias", None))
        groups = ctx.arg(6, "groups", 1)
        if not isinstance(w, TensorChannels) or not isinstance(groups, int):
            return ctx.unknown("convolution with a computed weight or group count")
        bias = b.dims[0] if isinstance(b, TensorChannels) else None
        return conv_channels(ctx, x, w, bias, groups, transposed, ctx.out_shape, ctx.arg(4, "padding", 0),
                             has_bias=ctx.arg(2, "bias", None) is not None)

    return rule


def rewrite_conv_groups_arg(index: int):
    """Rewrite of a functional convolution: its ``groups`` argument (position ``index``) is
    recomputed from the slim input width (depthwise blur filters, ATen ``convolution``)."""

    def rewrite(rctx) -> None:
        groups = rctx.arg(index, "groups", 1)
        if groups != 1:
            weight = rctx.ch(rctx.node.args[1])
            rctx.set_arg(index, "groups", new_conv_groups(rctx, rctx.node.args[0], groups, weight.ndim))

    return rewrite


register_function(F.conv1d, F.conv2d, F.conv3d, name="conv", rewrite=rewrite_conv_groups_arg(6))(
    _functional_conv(False))
register_function(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, name="conv_transpose",
                  rewrite=rewrite_conv_groups_arg(7))(_functional_conv(True))

# ============================================================================ linear / embedding


def linear_channels(ctx, x: TensorChannels, w_out: Optional[Track], w_in: Optional[Track],
                    bias: Optional[Track], out_shape) -> TensorChannels:
    ctx.consume(x.dims[-1], w_in, f"the input features of {ctx.node.name}",
                fold=ctx.fold_site(x.dims[-1], w_in, bias, -1))
    out = Track(w_out.units, np.full(len(w_out), ZERO, np.int8)) if w_out is not None else None
    if bias is not None:
        ctx.unify(out, bias)
    return TensorChannels(tuple(out_shape), list(x.dims[:-1]) + [out])


def _rewrite_linear(rctx) -> None:
    m = rctx.module
    _size_attrs(m, in_features=m.weight.shape[1], out_features=m.weight.shape[0])


@register_module(nn.Linear, name="linear", rewrite=_rewrite_linear)
def _linear_module(ctx):
    x = _x(ctx)
    w_out = ctx.param("weight", 0, "out")
    return linear_channels(ctx, x, w_out, ctx.param("weight", 1, "in", like=x.dims[-1]),
                           ctx.param("bias", 0, "out", like=w_out), ctx.out_shape)


@register_function(F.linear, name="linear")
def _linear_fn(ctx):
    w = ctx.ch(ctx.arg(1, "weight"))
    b = ctx.ch(ctx.arg(2, "bias", None))
    if not isinstance(w, TensorChannels) or w.ndim != 2:
        return ctx.unknown("linear with a computed weight")
    return linear_channels(ctx, _x(ctx), w.dims[0], w.dims[1], b.dims[0] if isinstance(b, TensorChannels) else None,
                           ctx.out_shape)


def _rewrite_embedding(rctx) -> None:
    m = rctx.module
    _size_attrs(m, embedding_dim=m.weight.shape[1], num_embeddings=m.weight.shape[0])


@register_module(nn.Embedding, name="embedding", rewrite=_rewrite_embedding)
def _embedding(ctx):
    idx = _x(ctx)
    ctx.param("weight", 0, "in")  # rows are looked up by index: never pruned
    ctx.pin(ctx.param("weight", 0, "in"), "embedding rows are addressed by token index")
    w1 = ctx.param("weight", 1, "out")
    out = Track(w1.units, np.full(len(w1), ZERO, np.int8))
    return TensorChannels(ctx.out_shape, list(idx.dims) + [out])


# ============================================================================ normalization


def _affine_state(affine: bool, x: Track, zero_maps_to_const: bool) -> np.ndarray:
    if affine:
        return np.full(len(x), ZERO, np.int8)
    return state_const_map(x.state) if zero_maps_to_const else x.state.copy()


def _norm_channel_dim(ctx, x: TensorChannels) -> int:
    return 1 if x.ndim >= 2 else 0


def _rewrite_batchnorm(rctx) -> None:
    m = rctx.module
    x = rctx.ch(rctx.node.args[0])
    _size_attrs(m, num_features=rctx.new_shape(x)[_norm_channel_dim(rctx, x)])


@register_module(nn.modules.batchnorm._BatchNorm, name="batch_norm", rewrite=_rewrite_batchnorm)
def _batchnorm(ctx):
    m = ctx.module
    x = _x(ctx)
    d = _norm_channel_dim(ctx, x)
    t = x.dims[d]
    params = [ctx.param(a, 0, "out", like=t) for a in ("weight", "bias")]
    bufs = [ctx.param(a, 0, "buffer", like=t) for a in ("running_mean", "running_var")]
    ctx.unify(t, *[p for p in params + bufs if p is not None])
    if t is None:
        return x
    # eval with running statistics maps a zero channel to -mean/std (a constant)
    uses_stats = m.track_running_stats and m.running_mean is not None
    state = _affine_state(m.affine, t, zero_maps_to_const=uses_stats)
    return _with_dim(x, d, Track(t.units, state))


def _rewrite_instancenorm(rctx) -> None:
    m = rctx.module
    x = rctx.ch(rctx.node.args[0])
    _size_attrs(m, num_features=rctx.new_shape(x)[_norm_channel_dim(rctx, x)])


@register_module(nn.modules.instancenorm._InstanceNorm, name="instance_norm", rewrite=_rewrite_instancenorm)
def _instancenorm(ctx):
    m = ctx.module
    x = _x(ctx)
    d = 1 if x.ndim - 2 == _spatial_rank(m) else 0  # batched (N, C, *) or unbatched (C, *)
    t = x.dims[d]
    params = [ctx.param(a, 0, "out", like=t) for a in ("weight", "bias")]
    bufs = [ctx.param(a, 0, "buffer", like=t) for a in ("running_mean", "running_var")]
    ctx.unify(t, *[p for p in params + bufs if p is not None])
    if t is None:
        return x
    uses_stats = m.track_running_stats and m.running_mean is not None
    return _with_dim(x, d, Track(t.units, _affine_state(m.affine, t, zero_maps_to_const=uses_stats)))


def _spatial_rank(op) -> int:
    """1, 2 or 3 from an op's name (``MaxPool3d``, ``F.avg_pool1d``); 2 if it does not say."""
    name = getattr(op, "__name__", None) or type(op).__name__
    for r in (1, 2, 3):
        if f"{r}d" in name:
            return r
    return 2


def groupnorm_channels(ctx, x: TensorChannels, num_groups: int, weight, bias,
                       group_sizes: Optional[Sequence[int]] = None) -> TensorChannels:
    """Group norm over dim 1. With an affine weight a channel may go alone: a removed channel
    must reach the norm as exact zero (its group's sums are unchanged, and the slim model
    divides by the group's full count, :mod:`fxprune.passes.full_count`) and its zeroed
    weight and bias make its output zero. Without one, a removed channel would output
    ``-mean/std`` of its group: only whole groups go (a whole zeroed group normalises to zero,
    the other groups' statistics untouched). ``group_sizes``: channels of each group where
    they differ (a slim model's group norm); default ``C // num_groups`` each."""
    t = x.dims[1]
    c = x.shape[1]
    if t is None:
        for p in (weight, bias):
            ctx.pin(p, "group norm over an input that carries no channels")
        return x
    for p in (weight, bias):
        if p is not None:
            ctx.unify(t, p)
    if weight is None:
        g_units = ctx.fresh(num_groups)
        sizes = [c // num_groups] * num_groups if group_sizes is None else list(group_sizes)
        ctx.union(np.repeat(g_units.units, sizes), t.units)
        return _with_dim(x, 1, Track(t.units, t.state.copy()))
    ctx.require_zero(t, "a group norm's statistics over its groups' channels")
    zero = weight.state == ZERO
    if bias is not None:
        zero &= bias.state == ZERO
    return _with_dim(x, 1, Track(t.units, np.where(zero, ZERO, ANY).astype(np.int8)))


@register_module(nn.GroupNorm, name="group_norm", rewrite=full_count.rewrite_group_norm_module)
def _groupnorm(ctx):
    m = ctx.module
    return groupnorm_channels(ctx, _x(ctx), m.num_groups, ctx.param("weight", 0, "out"), ctx.param("bias", 0, "out"))


@register_function(F.group_norm, name="group_norm", rewrite=full_count.rewrite_group_norm_call)
def _groupnorm_fn(ctx):
    x = _x(ctx)
    num_groups = ctx.arg(1, "num_groups")
    w = ctx.ch(ctx.arg(2, "weight", None))
    b = ctx.ch(ctx.arg(3, "bias", None))
    return groupnorm_channels(ctx, x, num_groups, w.dims[0] if isinstance(w, TensorChannels) else None,
                              b.dims[0] if isinstance(b, TensorChannels) else None)


def layernorm_channels(ctx, x: TensorChannels, n_norm: int, weight: Optional[TensorChannels],
                       bias: Optional[TensorChannels], centred: bool = True) -> TensorChannels:
    """Layer norm (``centred``) or RMS norm over the last ``n_norm`` dims.

    Channels there are normalised together: a removed channel must reach the norm as exact
    zero, which leaves every sum of its statistics unchanged, and the slim model divides by
    the full count (:mod:`fxprune.passes.full_count`); a removed channel that holds anything
    else makes them inexact. At a removed position a layer norm outputs ``-mean/std`` (data
    dependent) before its affine: it comes out zero only where the channel's affine weight is
    zeroed with it (and its bias, if any); an RMS norm scales zero to zero."""
    dims = list(x.dims)
    if bias is not None:  # a zeroed channel outside the normalised dims comes out as the bias,
        for d in range(x.ndim - n_norm):  # which varies over the normalised dims: not one constant
            if dims[d] is not None:
                dims[d] = Track(dims[d].units, np.full(len(dims[d]), ANY, np.int8))
    kind = "a layer norm's" if centred else "an RMS norm's"
    for k in range(n_norm):
        d = x.ndim - n_norm + k
        t = x.dims[d]
        ps = [p.dims[k] if isinstance(p, TensorChannels) and p.ndim == n_norm else None for p in (weight, bias)]
        if t is None:
            for p in ps:
                ctx.pin(p, "layer-norm parameter over a dimension that carries no channels")
            continue
        for p in ps:
            if p is not None:
                ctx.unify(t, p)
        ctx.require_zero(t, f"{kind} statistics over its normalised channels")
        if centred:
            w, b = ps
            zero = np.zeros(len(t), bool) if w is None else w.state == ZERO
            if b is not None:
                zero &= b.state == ZERO
            state = np.where(zero, ZERO, ANY).astype(np.int8)
        else:
            state = np.where(t.state == ZERO, ZERO, ANY).astype(np.int8)
        dims[d] = Track(t.units, state)
    return TensorChannels(x.shape, dims)


@register_module(nn.LayerNorm, name="layer_norm", rewrite=full_count.rewrite_layer_norm_module)
def _layernorm(ctx):
    m = ctx.module
    x = _x(ctx)
    n = len(m.normalized_shape)
    w = _param_tc(ctx, "weight", x.dims[x.ndim - n:])
    b = _param_tc(ctx, "bias", x.dims[x.ndim - n:])
    return layernorm_channels(ctx, x, n, w, b)


def _param_tc(ctx, attr: str, over: Sequence[Optional[Track]]) -> Optional[TensorChannels]:
    """The channels of a module's parameter whose dims are linked one to one with the tracks
    ``over`` (a LayerNorm's normalised dims)."""
    t = getattr(ctx.module, attr, None)
    if t is None:
        return None
    tracks = [ctx.param(attr, k, "out", like=like) for k, like in enumerate(over)]
    return TensorChannels(tuple(t.shape), tracks)


@register_function(F.layer_norm, name="layer_norm", rewrite=full_count.rewrite_layer_norm_call)
def _layernorm_fn(ctx):
    x = _x(ctx)
    shape = ctx.arg(1, "normalized_shape")
    n = len(shape) if isinstance(shape, (list, tuple)) else 1
    w = ctx.ch(ctx.arg(2, "weight", None))
    b = ctx.ch(ctx.arg(3, "bias", None))
    return layernorm_channels(ctx, x, n, w if isinstance(w, TensorChannels) else None,
                              b if isinstance(b, TensorChannels) else None)


def functional_norm_channels(ctx, x: TensorChannels, mean, var, weight, bias, uses_stats: bool) -> TensorChannels:
    """Batch/instance norm written as a function: per-channel statistics and affine tensors
    (tracks or None) on dim 1; without an affine scale, running statistics map zero to
    ``-mean/std``."""
    if not uses_stats:
        # statistics computed from the input over every dim but 1: channels there are
        # normalised together (weight standardisation: F.batch_norm over a reshaped weight)
        for d, other in enumerate(x.dims):
            if d != 1 and other is not None:
                ctx.inexact(other, "normalised together by statistics computed over them (their mean and "
                                   "variance change when a channel is removed)")
    t = x.dims[1]
    ctx.unify(t, *[p for p in (mean, var, weight, bias) if p is not None])
    if t is None:
        return x
    return _with_dim(x, 1, Track(t.units, _affine_state(weight is not None, t,
                                                           zero_maps_to_const=uses_stats and mean is not None)))


def _dim0(ctx, value) -> Optional[Track]:
    v = ctx.ch(value)
    return v.dims[0] if isinstance(v, TensorChannels) else None


@register_function(F.instance_norm, name="instance_norm")
def _instancenorm_fn(ctx):
    stats = [_dim0(ctx, ctx.arg(i, n, None)) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"),
                                                           (4, "bias"))]
    return functional_norm_channels(ctx, _x(ctx), *stats, uses_stats=not ctx.arg(5, "use_input_stats", True))


@register_function(F.batch_norm, name="batch_norm")
def _batchnorm_fn(ctx):
    stats = [_dim0(ctx, ctx.arg(i, n, None)) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"),
                                                           (4, "bias"))]
    return functional_norm_channels(ctx, _x(ctx), *stats, uses_stats=not ctx.arg(5, "training", False))


def embedding_channels(ctx, w: Optional[TensorChannels], idx: TensorChannels) -> TensorChannels:
    """A table lookup: rows are addressed by index (frozen), columns are the output channels."""
    if w is None or w.ndim != 2:
        return ctx.unknown("embedding of a computed table")
    ctx.pin(w.dims[0], "embedding rows are addressed by token index")
    col = w.dims[1]
    ctx.produce(col)  # the output is the table's columns: zeroed with them, even if tied to a consumer
    out = None if col is None else Track(col.units, np.full(len(col), ZERO, np.int8))
    return TensorChannels(ctx.out_shape, list(idx.dims) + [out])


@register_function(F.embedding, name="embedding")
def _embedding_fn(ctx):
    w = ctx.ch(ctx.arg(1, "weight"))
    return embedding_channels(ctx, w if isinstance(w, TensorChannels) else None, _x(ctx))


@register_module(nn.LocalResponseNorm, nn.CrossMapLRN2d, name="local_response_norm")
def _lrn(ctx):
    x = _x(ctx)
    ctx.inexact(x.dims[1], "normalised with neighbouring channels by a local response norm")
    return x


# ============================================================================ activations

# f(0) == 0: a zeroed channel stays zero
_ZERO_PRESERVING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardtanh, nn.Tanh, nn.Softsign, nn.Softshrink, nn.Hardshrink, nn.Tanhshrink, nn.RReLU,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity,
)
# f(0) == c != 0
_CONST_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid)

_ZERO_PRESERVING_FUNCTIONS = [
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.elu, F.elu_, F.selu,
    torch.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardtanh, F.hardtanh_, torch.tanh, F.tanh,
    F.softsign, F.softshrink, F.hardshrink, F.tanhshrink, F.rrelu, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, torch.dropout, torch.abs, torch.neg, torch.square,
    torch.sin, torch.sqrt, torch.erf, torch.sign, operator.neg, operator.pos, torch.nn.functional.threshold,
]
_ZERO_PRESERVING_METHODS = [
    "relu", "relu_", "tanh", "tanh_", "abs", "neg", "square", "sin", "sqrt", "sign", "erf",
    "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type", "cpu",
    "cuda", "requires_grad_",
]
_CONST_FUNCTIONS = [torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, F.logsigmoid, torch.exp, torch.cos,
                    torch.cosh, torch.special.expit]
_CONST_METHODS = ["sigmoid", "sigmoid_", "exp", "cos", "cosh"]


def identity_channels(ctx):
    x = ctx.ch(ctx.arg(0, "input"))
    return x


def _zero_preserving(ctx):
    return identity_channels(ctx)


def _const_map(ctx):
    x = _x(ctx)
    return x.map_state(state_const_map)


register_module(*_ZERO_PRESERVING_MODULES, *training_dependent_modules(), name="zero_preserving")(_zero_preserving)
register_function(*_ZERO_PRESERVING_FUNCTIONS, name="zero_preserving")(_zero_preserving)
register_method(*_ZERO_PRESERVING_METHODS, name="zero_preserving")(_zero_preserving)
register_module(*_CONST_MODULES, name="const_map")(_const_map)
register_function(*_CONST_FUNCTIONS, name="const_map")(_const_map)
register_method(*_CONST_METHODS, name="const_map")(_const_map)


@register_module(nn.Threshold, name="threshold")
def _threshold(ctx):
    m = ctx.module
    x = _x(ctx)
    return x if (0 > m.threshold or m.value == 0) else x.map_state(state_const_map)


def _prelu_channels(ctx, x: TensorChannels, w: Optional[Track]) -> TensorChannels:
    if w is not None and len(w) > 1:
        d = 1 if x.ndim >= 2 else 0
        if x.dims[d] is None:
            ctx.pin(w, "PReLU slopes over a dimension that carries no channels")
        else:
            ctx.unify(x.dims[d], w)
    return x


def _rewrite_prelu(rctx) -> None:
    rctx.module.num_parameters = rctx.module.weight.numel()


@register_module(nn.PReLU, name="prelu", rewrite=_rewrite_prelu)
def _prelu(ctx):
    w = ctx.param("weight", 0, "in") if ctx.module.weight.numel() > 1 else None
    return _prelu_channels(ctx, _x(ctx), w)


@register_function(F.prelu, torch.prelu, name="prelu")
def _prelu_fn(ctx):
    w = ctx.ch(ctx.arg(1, "weight"))
    return _prelu_channels(ctx, _x(ctx), w.dims[0] if isinstance(w, TensorChannels) and w.ndim == 1 else None)


def softmax_channels(ctx, x: TensorChannels, dim: int) -> TensorChannels:
    """Along ``dim`` every output depends on every input (inexact), and a removed channel
    comes out as ``exp(0) / sum``, data dependent; along the other dims a zeroed slice comes
    out as one constant (``1/n``)."""
    d = norm_dim(dim, x.ndim)
    ctx.inexact(x.dims[d], "normalised together with other channels by a softmax")
    out = x.map_state(state_const_map)
    t = out.dims[d]
    return out if t is None else _with_dim(out, d, Track(t.units, np.full(len(t), ANY, np.int8)))


@register_module(nn.Softmax, nn.LogSoftmax, nn.Softmin, name="softmax")
def _softmax_module(ctx):
    x = _x(ctx)
    dim = ctx.module.dim
    if dim is None:
        dim = 0 if x.ndim in (0, 1, 3) else 1
    return softmax_channels(ctx, x, dim)


@register_module(nn.Softmax2d, name="softmax")
def _softmax2d(ctx):
    return softmax_channels(ctx, _x(ctx), -3)


@register_function(F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax, name="softmax")
def _softmax_fn(ctx):
    x = _x(ctx)
    dim = ctx.arg(1, "dim", None)
    if dim is None:
        dim = 0 if x.ndim in (0, 1, 3) else 1
    return softmax_channels(ctx, x, dim)


@register_method("softmax", "log_softmax", name="softmax")
def _softmax_method(ctx):
    return softmax_channels(ctx, _x(ctx), ctx.arg(1, "dim"))


def glu_channels(ctx, x: TensorChannels, dim: int) -> TensorChannels:
    d = norm_dim(dim, x.ndim)
    t = x.dims[d]
    half = x.shape[d] // 2
    if t is None:
        return _with_dim(x, d, None, half)
    a, b = t.take(slice(0, half)), t.take(slice(half, None))
    ctx.unify(a, b)
    return _with_dim(x, d, Track(a.units, state_mul([a.state, state_const_map(b.state)])), half)


@register_module(nn.GLU, name="glu")
def _glu(ctx):
    return glu_channels(ctx, _x(ctx), ctx.module.dim)


@register_function(F.glu, name="glu")
def _glu_fn(ctx):
    return glu_channels(ctx, _x(ctx), ctx.arg(1, "dim", -1))


# ============================================================================ pooling / resampling


def spatial_channels(ctx, x: TensorChannels, n_spatial: int) -> TensorChannels:
    """Ops over the last ``n_spatial`` dims (pooling, interpolation, padding of spatial dims):
    the leading dims, channels included, pass through; a zero channel stays zero."""
    out_shape = ctx.out_shape
    if x.ndim != len(out_shape):
        return ctx.unknown("spatial op that changes the rank")
    for d in range(x.ndim - n_spatial, x.ndim):
        ctx.pin(x.dims[d], "channels in a pooled or resampled spatial dimension")
    return _keep_leading(x, out_shape, x.ndim - n_spatial)


_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
                 nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
                 nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d)


def _padded(x: TensorChannels) -> TensorChannels:
    """Padding makes a constant channel vary with position (zeros or partial averages at the
    border): its value is no longer one constant a consumer could fold into its bias."""
    return x.map_state(lambda s: np.where(s == CONST, ANY, s).astype(np.int8))


def _pads(module: nn.Module) -> bool:
    pad = getattr(module, "padding", 0)
    return any(pad) if isinstance(pad, (list, tuple)) else bool(pad)


@register_module(*_POOL_MODULES, name="pool")
def _pool_module(ctx):
    if getattr(ctx.module, "return_indices", False):
        return ctx.unknown("pooling that returns indices")
    out = spatial_channels(ctx, _x(ctx), _spatial_rank(ctx.module))
    return _padded(out) if _pads(ctx.module) else out


@register_module(nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, name="pool")
def _constant_pad(ctx):
    out = _padded(spatial_channels(ctx, _x(ctx), _spatial_rank(ctx.module)))
    return out if ctx.module.value == 0 else out.map_state(state_const_map)


_POOL_FUNCTIONS = [F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                   F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.lp_pool1d, F.lp_pool2d, torch.max_pool1d,
                   torch.max_pool2d, torch.max_pool3d, torch.avg_pool1d, torch.adaptive_avg_pool1d]


@register_function(*_POOL_FUNCTIONS, name="pool")
def _pool_fn(ctx):
    if ctx.arg(None, "return_indices", False):
        return ctx.unknown("pooling that returns indices")
    out = spatial_channels(ctx, _x(ctx), _spatial_rank(ctx.node.target))
    return out if "adaptive" in getattr(ctx.node.target, "__name__", "") else _padded(out)


@register_module(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, name="interpolate")
def _upsample(ctx):
    x = _x(ctx)
    return spatial_channels(ctx, x, x.ndim - 2)


@register_function(F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear, name="interpolate")
def _interpolate(ctx):
    x = _x(ctx)
    return spatial_channels(ctx, x, x.ndim - 2)


@register_function(F.pad, torch.constant_pad_nd, name="pad")
def _pad(ctx):
    x = _x(ctx)
    pad = ctx.arg(1, "pad")
    if not isinstance(pad, (list, tuple)):
        return ctx.unknown("padding with computed sizes")
    dims = list(x.dims)
    for k in range(len(pad) // 2):  # (left, right) pairs from the last dim backwards
        d = x.ndim - 1 - k
        if pad[2 * k] or pad[2 * k + 1]:
            ctx.pin(dims[d], "channels padded")
            dims[d] = None
    out = _padded(TensorChannels(ctx.out_shape, dims))
    value = ctx.arg(3, "value", 0) if ctx.node.target is F.pad else ctx.arg(2, "value", 0)
    mode = ctx.arg(2, "mode", "constant") if ctx.node.target is F.pad else "constant"
    return out if (mode != "constant" or not value) else out.map_state(state_const_map)


# ============================================================================ pixel / channel shuffle


def pixel_shuffle_channels(ctx, x: TensorChannels, r: int) -> TensorChannels:
    """(.., C*r*r, H, W) -> (.., C, H*r, W*r): the r*r inputs of an output channel go together."""
    d = x.ndim - 3
    t = x.dims[d]
    out_shape = ctx.out_shape
    dims = list(x.dims[:d]) + [None, None, None]
    if t is not None:
        u = t.units.reshape(-1, r * r)
        ctx.union(np.repeat(u[:, :1], r * r, axis=1), u)
        dims[d] = Track(u[:, 0].copy(), t.state.reshape(-1, r * r).max(axis=1))
    return TensorChannels(out_shape, dims)


def pixel_unshuffle_channels(ctx, x: TensorChannels, r: int) -> TensorChannels:
    d = x.ndim - 3
    t = x.dims[d]
    dims = list(x.dims[:d]) + [None, None, None]
    if t is not None:
        dims[d] = Track(np.repeat(t.units, r * r), np.repeat(t.state, r * r))
    return TensorChannels(ctx.out_shape, dims)


@register_module(nn.PixelShuffle, name="pixel_shuffle")
def _pixel_shuffle(ctx):
    return pixel_shuffle_channels(ctx, _x(ctx), ctx.module.upscale_factor)


@register_module(nn.PixelUnshuffle, name="pixel_unshuffle")
def _pixel_unshuffle(ctx):
    return pixel_unshuffle_channels(ctx, _x(ctx), ctx.module.downscale_factor)


@register_function(F.pixel_shuffle, torch.pixel_shuffle, name="pixel_shuffle")
def _pixel_shuffle_fn(ctx):
    return pixel_shuffle_channels(ctx, _x(ctx), ctx.arg(1, "upscale_factor"))


@register_function(F.pixel_unshuffle, torch.pixel_unshuffle, name="pixel_unshuffle")
def _pixel_unshuffle_fn(ctx):
    return pixel_unshuffle_channels(ctx, _x(ctx), ctx.arg(1, "downscale_factor"))


def channel_shuffle_channels(ctx, x: TensorChannels, groups: int) -> TensorChannels:
    """Channel shuffle = view (g, C/g), transpose, flatten: position j of every group goes together."""
    t = x.dims[1]
    if t is None:
        return x
    u = t.units.reshape(groups, -1)
    s = t.state.reshape(groups, -1)
    ctx.union(np.broadcast_to(u[:1], u.shape), u)
    per = u.shape[1]
    # output channel k = (k % g) * (C/g) + k // g  ->  element of column k // g
    col = np.arange(groups * per) // groups
    return _with_dim(x, 1, Track(u[0][col], s.max(axis=0)[col]))


@register_module(nn.ChannelShuffle, name="channel_shuffle")
def _channel_shuffle(ctx):
    return channel_shuffle_channels(ctx, _x(ctx), ctx.module.groups)


@register_function(*[f for f in (getattr(F, "channel_shuffle", None), getattr(torch, "channel_shuffle", None),
                                 getattr(torch, "native_channel_shuffle", None))], name="channel_shuffle")
def _channel_shuffle_fn(ctx):
    return channel_shuffle_channels(ctx, _x(ctx), ctx.arg(1, "groups"))



# ============================================================================ timm's fused norm + activation


def _norm_act(base_rule):
    """timm's ``BatchNormAct2d``/``GroupNormAct``/``LayerNormAct``: the norm's semantics, then
    the zero behaviour of the fused activation module (``self.act``)."""

    def rule(ctx):
        out = base_rule(ctx)
        act = getattr(ctx.module, "act", None)
        spec = REGISTRY.modules.get(type(act)) if act is not None else None
        if act is None or (spec is not None and spec.name == "zero_preserving"):
            return out
        return out.map_state(state_const_map)

    return rule


try:
    from timm.layers import norm_act as _timm_norm_act
except ImportError:  # timm is optional
    _timm_norm_act = None
if _timm_norm_act is not None:
    for _cls_name, _base, _rewrite in (("BatchNormAct2d", _batchnorm, _rewrite_batchnorm),
                                       ("GroupNormAct", _groupnorm, full_count.rewrite_group_norm_module),
                                       ("LayerNormAct", _layernorm, full_count.rewrite_layer_norm_module),
                                       ("LayerNormAct2d", None, None)):
        _cls = getattr(_timm_norm_act, _cls_name, None)
        if _cls is not None and _base is not None:
            register_module(_cls, name=f"{_cls_name}", rewrite=_rewrite)(_norm_act(_base))


# ============================================================================ ATen instance norm, weight norm


@register_function(torch.ops.aten.instance_norm.default, name="instance_norm")
def _aten_instance_norm(ctx):
    """``aten.instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, ...)``
    (the ATen form of ``F.instance_norm``, whose arguments come in another order): statistics
    per sample and channel, so channels stay separate (RAFT's encoders)."""
    weight, bias, mean, var = (_dim0(ctx, ctx.arg(i, None, None)) for i in (1, 2, 3, 4))
    return functional_norm_channels(ctx, _x(ctx), mean, var, weight, bias,
                                    uses_stats=not ctx.arg(5, "use_input_stats", True))


def _feeds_conv_kernel(node) -> bool:
    """Every user reads the value as a convolution's weight (argument 1)."""
    convs = (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
             torch.ops.aten.convolution.default, torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default,
             torch.ops.aten.conv3d.default)
    users = [u for u in node.users]
    if len(users) == 1 and users[0].op == "call_function" and users[0].target is operator.getitem:
        users = list(users[0].users)
    return bool(users) and all(u.op == "call_function" and u.target in convs and len(u.args) > 1 and u.args[1] is node
                               or (u.op == "call_function" and u.target is operator.getitem) for u in users)


@register_function(torch._weight_norm, torch.ops.aten._weight_norm.default,
                   torch.ops.aten._weight_norm_interface.default, name="weight_norm")
def _weight_norm(ctx):
    """``_weight_norm(v, g, dim) = g * v / ||v||`` with the norm over every dim but ``dim``
    (``torch.nn.utils.parametrizations.weight_norm``, wav2vec2's positional convolution).

    The weight keeps ``v``'s channels. ``g`` scales dim ``dim`` position by position (the same
    channels; not channels at all when ``dim`` is a convolution's kernel). A removed output row
    (dim 0) of ``v`` is zero, so it leaves every norm unchanged; removing positions of any other
    dim (input channels) changes the norm of what remains: those channels are inexact."""
    v = ctx.ch(ctx.arg(0, "v"))
    g = ctx.ch(ctx.arg(1, "g"))
    if not isinstance(v, TensorChannels) or not isinstance(g, TensorChannels) or g.ndim != v.ndim:
        return ctx.unknown("weight norm of computed tensors")
    d = norm_dim(ctx.arg(2, "dim", 0), v.ndim)
    if d >= 2 and _feeds_conv_kernel(ctx.node):
        ctx.not_channels(g.dims[d])
    else:
        ctx.unify(v.dims[d], g.dims[d], reason="scaled by a weight-norm magnitude that carries no channels")
    for e, t in enumerate(v.dims):
        if e not in (0, d) and t is not None:
            ctx.inexact(t, "normalised together by a weight norm (the norm changes when positions of this dim "
                           "are removed)")
    for e, t in enumerate(g.dims):
        if e != d and t is not None:
            ctx.pin(t, "a weight-norm magnitude broadcast over a dimension")
    out = TensorChannels(v.shape, list(v.dims))
    if ctx.node.target is torch.ops.aten._weight_norm_interface.default:
        metas = ctx.node.meta.get("tensor_meta")
        return (out, TensorChannels(tuple(metas[1].shape), [None] * len(metas[1].shape)))
    return out
