"""Channel semantics of library functions that timm and torchvision hide from symbolic tracing.

``torch.fx.wrap`` and timm's registry of non-traceable functions make symbolic tracing record
a call to these functions as one opaque node (their bodies branch on sizes). Without a rule
such a node freezes every channel it touches; ``fxprune.compile`` then prefers the
``torch.export`` graph, which sees through them, when it exports. The rules below cover what
their bodies do to channels, so that the symbolic trace keeps them too:

* timm's position-embedding resampling (``resample_abs_pos_embed``, its NHWC form, Qwen3-ViT's
  ``resample_pos_embed_grid``) returns the embedding itself when the size does not change;
* SAM-ViT's ``get_rel_pos`` gathers rows of a relative-position table (positions, not
  channels) and keeps its columns;
* torchvision MViT's ``_unsqueeze``/``_squeeze`` add or drop a size-1 dim, ``_add_shortcut``
  is a residual add.

Each is looked up by the function object of the installed library; a library that is missing
or lacks the function adds no rule.
"""
from __future__ import annotations

import importlib
from typing import Any, Optional

from .channels import TensorChannels, norm_dim
from .ops_tensor import elementwise_channels
from .registry import register_function


def _function(module: str, name: str) -> Optional[Any]:
    try:
        return getattr(importlib.import_module(module), name, None)
    except Exception:  # noqa: BLE001 - an optional library, or one that fails to import: no rule
        return None


def _tc(ctx, v) -> Optional[TensorChannels]:
    c = ctx.ch(v)
    return c if isinstance(c, TensorChannels) else None


def _unchanged(ctx) -> bool:
    """Shape propagation saw the output with the input's shape."""
    x = _tc(ctx, ctx.arg(0))
    meta = ctx.node.meta.get("tensor_meta")
    return x is not None and hasattr(meta, "shape") and tuple(meta.shape) == x.shape


_RESAMPLE = [_function("timm.layers.pos_embed", "resample_abs_pos_embed"),
             _function("timm.layers.pos_embed", "resample_abs_pos_embed_nhwc"),
             _function("timm.models.qwen3_vit", "resample_pos_embed_grid")]


@register_function(*_RESAMPLE, name="resample_pos_embed")
def _resample_pos_embed(ctx):
    """Resampling a position embedding to the size it already has returns it as it is."""
    if not _unchanged(ctx):
        return ctx.unknown("a position embedding resampled to another size")
    return _tc(ctx, ctx.arg(0))


@register_function(_function("timm.models.vision_transformer_sam", "get_rel_pos"), name="get_rel_pos")
def _get_rel_pos(ctx):
    """``get_rel_pos(q_size, k_size, rel_pos[L, C]) -> [q_size, k_size, C]``: rows of the table
    picked (and, if ``L`` does not fit, first interpolated) by relative offset; each column is
    resampled on its own, so a zero column stays zero."""
    table = _tc(ctx, ctx.arg(2, "rel_pos"))
    if table is None or table.ndim != 2:
        return ctx.unknown("relative positions of a computed table")
    ctx.pin(table.dims[0], "relative-position rows are picked by offset")
    return TensorChannels(ctx.out_shape, [None, None, table.dims[1]])


@register_function(_function("torchvision.models.video.mvit", "_unsqueeze"), name="mvit_unsqueeze")
def _mvit_unsqueeze(ctx):
    """``_unsqueeze(x, target_dim, expand_dim) -> (x with a size-1 dim at expand_dim if it had
    one dim too few, x.dim())``."""
    x = _tc(ctx, ctx.arg(0))
    metas = ctx.node.meta.get("tensor_meta")
    if x is None or not isinstance(metas, (list, tuple)) or not hasattr(metas[0], "shape"):
        return ctx.unknown("_unsqueeze of a value fxprune cannot follow")
    shape = tuple(metas[0].shape)
    if len(shape) == x.ndim:
        return (x, None)
    d = norm_dim(ctx.arg(2, "expand_dim"), len(shape))
    return (TensorChannels(shape, x.dims[:d] + [None] + x.dims[d:]), None)


@register_function(_function("torchvision.models.video.mvit", "_squeeze"), name="mvit_squeeze")
def _mvit_squeeze(ctx):
    """``_squeeze(x, target_dim, expand_dim, tensor_dim)``: drops the size-1 dim ``_unsqueeze``
    added."""
    x = _tc(ctx, ctx.arg(0))
    if x is None:
        return ctx.unknown("_squeeze of a value fxprune cannot follow")
    shape = ctx.out_shape
    if len(shape) == x.ndim:
        return x
    d = norm_dim(ctx.arg(2, "expand_dim"), x.ndim)
    return TensorChannels(shape, x.dims[:d] + x.dims[d + 1:])


@register_function(_function("torchvision.models.video.mvit", "_add_shortcut"), name="add")
def _mvit_add_shortcut(ctx):
    """``_add_shortcut(x, shortcut, residual_with_cls_embed)``: ``x + shortcut`` (over every
    token, or every token but the class token), written into ``x``."""
    x = ctx.arg(0, "x")
    if any(u is not ctx.node for u in getattr(x, "users", ())):
        return ctx.unknown(f"in-place add on a tensor that '{next(u for u in x.users if u is not ctx.node).name}' "
                           f"also reads")
    return elementwise_channels(ctx, [x, ctx.arg(1, "shortcut")], "add")


__all__: list = []
