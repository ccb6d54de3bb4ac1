"""Channel semantics of core ATen ops, the vocabulary of ``torch.export`` graphs.

Most ATen overloads take their arguments in the order of the torch function they implement
(``aten.linear`` as ``F.linear``, ``aten.view`` as ``Tensor.view``), so they share that
function's registry entry (:data:`ALIASES`). The others get rules here: ops whose argument
order differs (``aten.embedding(weight, indices)``, ``aten.convolution``, ``aten.addmm``),
ops that return statistics beside their output (``native_layer_norm``), and the slicing ops
whose constant bounds the rewrite recomputes (``aten.slice``, ``aten.select``, ``aten.split``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import full_count, ops_attention, ops_einsum  # noqa: F401  (entries aliased below)
from .channels import TensorChannels, norm_dim
from .ops_nn import (_dim0, conv_channels, embedding_channels, functional_norm_channels, groupnorm_channels,
                     layernorm_channels, rewrite_conv_groups_arg)
from .ops_tensor import _pieces, elementwise_channels, index_channels, matmul_channels
from .registry import REGISTRY, OpSpec, register_function
from .size_flow import record_size

aten = torch.ops.aten


def _overloads(packet, names):
    return [getattr(packet, n) for n in names if hasattr(packet, n)]


# ATen overload -> torch callable (or Tensor method name) with the same argument order
ALIASES = {
    F.linear: [aten.linear.default],
    F.conv1d: [aten.conv1d.default], F.conv2d: [aten.conv2d.default], F.conv3d: [aten.conv3d.default],
    torch.add: _overloads(aten.add, ["Tensor", "Scalar"]), torch.sub: _overloads(aten.sub, ["Tensor", "Scalar"]),
    torch.mul: _overloads(aten.mul, ["Tensor", "Scalar"]), torch.div: _overloads(aten.div, ["Tensor", "Scalar"]),
    torch.rsub: _overloads(aten.rsub, ["Tensor", "Scalar"]),
    torch.pow: _overloads(aten.pow, ["Tensor_Scalar"]),
    torch.cat: [aten.cat.default], torch.stack: [aten.stack.default],
    torch.reshape: [aten.reshape.default, aten.view.default, aten._unsafe_view.default],
    torch.unsqueeze: [aten.unsqueeze.default], torch.squeeze: _overloads(aten.squeeze, ["default", "dim", "dims"]),
    torch.flatten: [aten.flatten.using_ints], torch.unflatten: [aten.unflatten.int],
    torch.permute: [aten.permute.default], torch.transpose: [aten.transpose.int], torch.t: [aten.t.default],
    torch.movedim: [aten.movedim.int],
    torch.mean: [aten.mean.dim], torch.sum: [aten.sum.dim_IntList], torch.amax: [aten.amax.default],
    torch.amin: [aten.amin.default], torch.var: _overloads(aten.var, ["correction", "dim"]),
    torch.std: _overloads(aten.std, ["correction", "dim"]),
    torch.matmul: [aten.matmul.default, aten.bmm.default, aten.mm.default], torch.einsum: [aten.einsum.default],
    torch.where: _overloads(aten.where, ["self", "ScalarOther", "ScalarSelf", "Scalar"]),
    F.layer_norm: [aten.layer_norm.default], F.group_norm: [aten.group_norm.default],
    F.scaled_dot_product_attention: [aten.scaled_dot_product_attention.default],
    F.softmax: [aten.softmax.int, aten._softmax.default], F.log_softmax: [aten.log_softmax.int, aten._log_softmax.default],
    torch.relu: [aten.relu.default], F.gelu: [aten.gelu.default], F.silu: [aten.silu.default],
    torch.tanh: [aten.tanh.default], F.hardswish: [aten.hardswish.default], F.hardtanh: [aten.hardtanh.default],
    F.leaky_relu: [aten.leaky_relu.default], F.elu: [aten.elu.default], F.mish: [aten.mish.default],
    torch.sigmoid: [aten.sigmoid.default], F.hardsigmoid: [aten.hardsigmoid.default], torch.exp: [aten.exp.default],
    F.softplus: [aten.softplus.default], torch.abs: [aten.abs.default], torch.neg: [aten.neg.default],
    torch.sqrt: [aten.sqrt.default], torch.erf: [aten.erf.default], torch.sin: [aten.sin.default],
    torch.cos: [aten.cos.default], torch.square: [aten.square.default],
    F.dropout: [aten.dropout.default], torch.clamp: [aten.clamp.default], torch.clamp_min: [aten.clamp_min.default],
    torch.linalg.vector_norm: [aten.linalg_vector_norm.default],
    F.adaptive_avg_pool2d: [aten.adaptive_avg_pool2d.default], F.avg_pool2d: [aten.avg_pool2d.default],
    F.max_pool2d: [aten.max_pool2d.default], F.pixel_shuffle: [aten.pixel_shuffle.default],
    F.pixel_unshuffle: [aten.pixel_unshuffle.default], F.interpolate: [
        ov for name in ("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
                        "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "upsample_linear1d",
                        "upsample_bilinear2d", "upsample_bicubic2d", "upsample_trilinear3d",
                        "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa")
        for ov in _overloads(getattr(aten, name), ["vec", "default"])],
    torch.addcmul: [aten.addcmul.default],
    F.pad: [aten.pad.default], torch.roll: [aten.roll.default],
    "contiguous": [aten.contiguous.default, aten.clone.default, aten.detach.default, aten.alias.default,
                   aten._to_copy.default, aten.lift_fresh_copy.default] + _overloads(aten.to, ["dtype", "dtype_layout"]),
    "reshape_as": [aten.reshape_as.default, aten.view_as.default],
    "expand": [aten.expand.default], "expand_as": [aten.expand_as.default], "zero_": [aten.zero_.default],
    "new_zeros": _overloads(aten.new_zeros, ["default"]) + _overloads(aten.new_ones, ["default"]) + _overloads(
        aten.new_full, ["default"]) + _overloads(aten.new_empty, ["default"]),
}

# ops whose in-place overload (``aten.relu_.default``, ``aten.add_.Tensor``: ``inplace=True``
# modules and ``x += y`` export as these) gets the out-of-place rule, guarded by _in_place
IN_PLACE = [aten.relu.default, aten.gelu.default, aten.silu.default, aten.tanh.default, aten.hardswish.default,
            aten.hardtanh.default, aten.leaky_relu.default, aten.elu.default, aten.mish.default,
            aten.sigmoid.default, aten.hardsigmoid.default, aten.addcmul.default] + [
    getattr(getattr(aten, op), ov) for op in ("add", "sub", "mul", "div") for ov in ("Tensor", "Scalar")]

for _fn, _overloads_list in ALIASES.items():
    _spec = REGISTRY.methods[_fn] if isinstance(_fn, str) else REGISTRY.functions[_fn]
    for _ov in _overloads_list:
        REGISTRY.functions[_ov] = _spec


def _in_place(spec: OpSpec) -> OpSpec:
    """An in-place op has its out-of-place op's channels, provided nothing else reads the tensor
    it mutates: another reader would see the new values while its tracks record the old state
    (a sigmoid turns a zeroed channel into 0.5)."""

    def rule(ctx):
        x = ctx.arg(0)
        others = [u for u in getattr(x, "users", ()) if u is not ctx.node]
        if others:
            return ctx.unknown(f"in-place op on a tensor that '{others[0].name}' also reads")
        return spec.rule(ctx)

    return OpSpec(spec.name + "_", rule, spec.rewrite, spec.selects)


for _op in IN_PLACE:
    _mutating = getattr(getattr(aten, _op._opname + "_", None), _op._overloadname, None)
    if _mutating is not None and _op in REGISTRY.functions:
        REGISTRY.functions[_mutating] = _in_place(REGISTRY.functions[_op])


def _tc(ctx, v):
    c = ctx.ch(v)
    return c if isinstance(c, TensorChannels) else None


def _with_stats(ctx, out: TensorChannels):
    """(output, statistics...) for ops that also return per-sample statistics."""
    metas = ctx.node.meta.get("tensor_meta")
    if not isinstance(metas, (list, tuple)) or hasattr(metas, "shape"):
        return out
    rest = [None if m is None else TensorChannels(tuple(m.shape), [None] * len(m.shape)) for m in metas[1:]]
    return (out, *rest)


@register_function(aten.embedding.default, name="embedding")
def _embedding(ctx):
    """``aten.embedding(weight, indices)``."""
    return embedding_channels(ctx, _tc(ctx, ctx.arg(0, "weight")), _tc(ctx, ctx.arg(1, "indices")))


@register_function(aten.convolution.default, name="conv", rewrite=rewrite_conv_groups_arg(8))
def _convolution(ctx):
    x, w = _tc(ctx, ctx.arg(0)), _tc(ctx, ctx.arg(1))
    b = _tc(ctx, ctx.arg(2))
    transposed, groups = ctx.arg(6), ctx.arg(8)
    if x is None or w is None or not isinstance(groups, int):
        return ctx.unknown("convolution with a computed weight or group count")
    return conv_channels(ctx, x, w, b.dims[0] if b is not None else None, groups, bool(transposed), ctx.out_shape,
                         ctx.arg(4), has_bias=ctx.arg(2) is not None)


@register_function(aten.addmm.default, name="addmm")
def _addmm(ctx):
    """``addmm(bias, x, w) = bias + x @ w`` (a linear layer written as a matrix product)."""
    bias, a, b = (_tc(ctx, ctx.arg(i)) for i in range(3))
    if a is None or b is None:
        return ctx.unknown("addmm of non-tensors")
    prod = matmul_channels(ctx, a, b, ctx.out_shape)
    if bias is None:
        return prod
    return elementwise_channels(ctx, [prod, bias], "add")


def _aten_batch_norm(training_index):
    """``aten.batch_norm(input, weight, bias, running_mean, running_var, training, ...)`` and
    ``_native_batch_norm_legit_no_training(input, weight, bias, running_mean, running_var, ...)``."""

    def rule(ctx):
        weight, bias, mean, var = (_dim0(ctx, ctx.arg(i)) for i in (1, 2, 3, 4))
        training = bool(ctx.arg(training_index)) if training_index is not None else False
        return _with_stats(ctx, functional_norm_channels(ctx, _tc(ctx, ctx.arg(0)), mean, var, weight, bias,
                                                         uses_stats=not training))

    return rule


register_function(aten.batch_norm.default, name="batch_norm")(_aten_batch_norm(5))
register_function(aten._native_batch_norm_legit_no_training.default, name="batch_norm")(_aten_batch_norm(None))


@register_function(aten.native_layer_norm.default, name="layer_norm", rewrite=full_count.rewrite_native_layer_norm)
def _native_layer_norm(ctx):
    x = _tc(ctx, ctx.arg(0))
    shape = ctx.arg(1)
    w, b = _tc(ctx, ctx.arg(2)), _tc(ctx, ctx.arg(3))
    return _with_stats(ctx, layernorm_channels(ctx, x, len(shape), w, b))


@register_function(aten.native_group_norm.default, name="group_norm", rewrite=full_count.rewrite_native_group_norm)
def _native_group_norm(ctx):
    """``aten.native_group_norm(input, weight, bias, N, C, HxW, group, eps)``."""
    w, b = _tc(ctx, ctx.arg(1)), _tc(ctx, ctx.arg(2))
    return _with_stats(ctx, groupnorm_channels(ctx, _tc(ctx, ctx.arg(0)), ctx.arg(6), w.dims[0] if w else None,
                                               b.dims[0] if b else None))


@register_function(aten.rms_norm.default, getattr(F, "rms_norm", None), name="rms_norm",
                   rewrite=full_count.rewrite_rms_norm_call)
def _rms_norm(ctx):
    x = _tc(ctx, ctx.arg(0))
    shape = ctx.arg(1)
    w = _tc(ctx, ctx.arg(2, "weight", None))
    return layernorm_channels(ctx, x, len(shape), w, None, centred=False)


@register_function(aten.native_dropout.default, name="zero_preserving")
def _native_dropout(ctx):
    return _with_stats(ctx, _tc(ctx, ctx.arg(0)))


# ---------------------------------------------------------------------------- slicing


def _rewrite_slice(rctx) -> None:
    x = rctx.ch(rctx.node.args[0])
    d = norm_dim(rctx.arg(1, "dim", 0), x.ndim)
    t = x.dims[d]
    if t is None:
        return
    start, end, _ = slice(rctx.arg(2, "start", None), rctx.arg(3, "end", None)).indices(x.shape[d])
    rctx.set_arg(2, "start", rctx.new_size(t.take(slice(0, start))))
    rctx.set_arg(3, "end", rctx.new_size(t.take(slice(0, end))))


@register_function(aten.slice.Tensor, selects=True, name="slice", rewrite=_rewrite_slice)
def _slice(ctx):
    x = _tc(ctx, ctx.arg(0))
    d = norm_dim(ctx.arg(1, "dim", 0), x.ndim)
    start, end, step = ctx.arg(2, "start", None), ctx.arg(3, "end", None), ctx.arg(4, "step", 1)
    t = x.dims[d]
    dims = list(x.dims)
    if t is not None:
        if step != 1 or not all(isinstance(v, (int, type(None))) for v in (start, end)):
            ctx.pin(t, "strided or computed slice over channels")
            dims[d] = None
        else:
            dims[d] = t.take(slice(start, end))
    return TensorChannels(ctx.out_shape, dims)


def _rewrite_select(rctx) -> None:
    x = rctx.ch(rctx.node.args[0])
    d = norm_dim(rctx.arg(1, "dim"), x.ndim)
    index = rctx.arg(2, "index")
    if x.dims[d] is not None and isinstance(index, int):
        rctx.set_arg(2, "index", rctx.new_size(x.dims[d].take(slice(0, index % x.shape[d]))))


@register_function(aten.select.int, selects=True, name="select", rewrite=_rewrite_select)
def _select(ctx):
    x = _tc(ctx, ctx.arg(0))
    d = norm_dim(ctx.arg(1, "dim"), x.ndim)
    index = ctx.arg(2, "index")
    if x.dims[d] is not None:
        ctx.pin(x.dims[d].take([index]) if isinstance(index, int) else x.dims[d], "a single channel selected by index")
    return TensorChannels(ctx.out_shape, x.dims[:d] + x.dims[d + 1:])


@register_function(aten.index.Tensor, selects=True, name="index")
def _index(ctx):
    """``aten.index(x, indices)``: ``x[indices]`` with ``None`` for a whole dim (``x[:, idx]``)."""
    x = _tc(ctx, ctx.arg(0))
    if x is None:
        return ctx.unknown("indexing a value fxprune cannot follow")
    return index_channels(ctx, x, tuple(slice(None) if i is None else i for i in ctx.arg(1, "indices")))


def _rewrite_split(rctx) -> None:
    x = rctx.ch(rctx.node.args[0])
    d = norm_dim(rctx.arg(2, "dim", 0), x.ndim)
    if x.dims[d] is None:
        return
    sizes = [rctx.new_size(p.dims[d]) for p in rctx.out_ch]
    rctx.node.target = aten.split_with_sizes.default
    rctx.node.args = (rctx.node.args[0], sizes, d)
    rctx.node.kwargs = {}


@register_function(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, selects=True, name="split",
                   rewrite=_rewrite_split)
def _split(ctx):
    x = _tc(ctx, ctx.arg(0))
    d = norm_dim(ctx.arg(2, "dim", 0), x.ndim)
    sizes = [int(m.shape[d]) for m in ctx.node.meta["tensor_meta"]]
    return _pieces(ctx, x, d, sizes)


@register_function(aten.unbind.int, selects=True, name="unbind")
def _unbind(ctx):
    return REGISTRY.functions[torch.unbind].rule(ctx)


@register_function(*[getattr(aten, n).default for n in ("_assert_tensor_metadata", "_assert_scalar",
                                                        "sym_constrain_range_for_size") if hasattr(aten, n)],
                   selects=True, name="assertion")
def _assertion(ctx):
    """Shape and dtype checks that torch.export leaves in the graph: they read no values."""
    return None


# ---------------------------------------------------------------------------- symbolic sizes
# (torch.export with dynamic dims: a size read from a tensor is a node, as ``x.size(d)`` is in a
# symbolic trace)


@register_function(torch.ops.aten.sym_size.int, selects=True, name="metadata")
def _sym_size(ctx):
    x = _tc(ctx, ctx.arg(0))
    record_size(ctx, x, norm_dim(ctx.arg(1, "dim"), x.ndim) if x is not None else 0)
    return None


@register_function(torch.ops.aten.sym_numel.default, selects=True, name="metadata")
def _sym_numel(ctx):
    record_size(ctx, _tc(ctx, ctx.arg(0)), None)
    return None


# ---------------------------------------------------------------------------- 1-d and 3-d pooling
# (video models through torch.export: swin3d's and MViT's pooling)

for _fn, _names in ((F.adaptive_avg_pool3d, ("adaptive_avg_pool3d", "_adaptive_avg_pool3d")),
                    (F.avg_pool3d, ("avg_pool3d",)), (F.max_pool3d, ("max_pool3d",)),
                    (F.adaptive_avg_pool1d, ("adaptive_avg_pool1d",)), (F.avg_pool1d, ("avg_pool1d",)),
                    (F.max_pool1d, ("max_pool1d",))):
    for _name in _names:
        _ov = getattr(getattr(aten, _name, None), "default", None)
        if _ov is not None and _ov not in REGISTRY.functions and _fn in REGISTRY.functions:
            REGISTRY.functions[_ov] = REGISTRY.functions[_fn]
