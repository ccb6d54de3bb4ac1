"""Channel semantics of attention: ``F.scaled_dot_product_attention`` and RMSNorm.

Heads are batch-like dims of q, k and v: a head whose q, k and v projections are zero
attends uniformly (softmax of zeros) over zero values, so its output is exactly zero and the
head can be removed with the matching input columns of the output projection. The head width
is left alone: the default scale ``1/sqrt(head_dim)`` would change with it.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch.nn as nn
import torch.nn.functional as F

from . import full_count
from .channels import TensorChannels, Track, broadcast_dims, state_mul
from .ops_nn import layernorm_channels
from .registry import register_function, register_module


def _tc(ctx, v) -> Optional[TensorChannels]:
    c = ctx.ch(v)
    return c if isinstance(c, TensorChannels) else None


@register_function(getattr(F, "scaled_dot_product_attention", None), name="sdpa")
def _sdpa(ctx):
    q, k, v = (_tc(ctx, ctx.arg(i, n)) for i, n in ((0, "query"), (1, "key"), (2, "value")))
    if q is None or k is None or v is None or min(q.ndim, k.ndim, v.ndim) < 2:
        return ctx.unknown("attention over non-tensor inputs")
    if ctx.arg(7, "enable_gqa", False):
        k, v = _gqa_expanded(q, k), _gqa_expanded(q, v)
        if k is None or v is None:
            return ctx.unknown("grouped-query attention whose query heads are not a multiple of the key/value heads")
    if not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        return ctx.unknown("grouped-query attention (head counts differ)")
    mask = _tc(ctx, ctx.arg(3, "attn_mask", None))
    scale = ctx.arg(6, "scale", None)
    # contraction over the head width
    qe, ke = q.dims[-1], k.dims[-1]
    if qe is not None or ke is not None:
        ctx.unify(qe, ke, reason="attention width contracted with one that carries no channels")
        if scale is None and qe is not None:
            ctx.inexact(qe, "the default attention scale 1/sqrt(head_dim) changes when the head width shrinks")
        if qe is not None and ke is not None:
            ctx.require_zero(Track(qe.units, state_mul([qe.state, ke.state])), "an attention score")
    # keys and values share the sequence dim
    if k.dims[-2] is not None or v.dims[-2] is not None:
        ctx.unify(k.dims[-2], v.dims[-2])
    out_shape = ctx.out_shape
    nb = len(out_shape) - 2
    dims: List[Optional[Track]] = []
    operands = [q, k, v] + ([mask] if mask is not None else [])
    aligned = broadcast_dims([t.shape[:-2] for t in operands], nb)
    for d in range(nb):
        present = []
        for t, al in zip(operands, aligned):
            sd = al[d]
            if sd is None or t.shape[sd] == 1:
                continue
            present.append(t.dims[sd])
        tracked = [p for p in present if p is not None]
        if tracked and len(tracked) < len(present):
            for p in tracked:
                ctx.pin(p, "attention heads combined with a dimension that carries no channels")
            dims.append(None)
        elif tracked:
            ctx.unify(*tracked)
            vd = v.dims[aligned[2][d]] if aligned[2][d] is not None else None
            # a head with zero values outputs zero, whatever its (uniform) attention weights
            dims.append(Track(tracked[0].units, vd.state.copy() if vd is not None else tracked[0].state))
        else:
            dims.append(None)
    dims += [q.dims[-2], v.dims[-1]]
    return TensorChannels(tuple(out_shape), dims)


def _gqa_expanded(q: TensorChannels, kv: TensorChannels) -> Optional[TensorChannels]:
    """``enable_gqa=True``: key/value head ``h`` serves query heads ``h*g .. h*g+g-1`` (``g`` =
    query heads / key-value heads), as if repeated ``g`` times in place along the head dim
    (-3). Its track is repeated the same way, so unifying heads makes each query group one
    channel with its key/value head: pruned whole, the ratio ``g`` stays and ``enable_gqa``
    still holds."""
    if q.ndim < 3 or kv.ndim != q.ndim or q.shape[:-3] != kv.shape[:-3]:
        return None
    hq, hkv = q.shape[-3], kv.shape[-3]
    if hq == hkv:
        return kv
    if hkv == 0 or hq % hkv:
        return None
    g = hq // hkv
    t = kv.dims[-3]
    dims = list(kv.dims)
    dims[-3] = None if t is None else Track(np.repeat(t.units, g), np.repeat(t.state, g))
    shape = list(kv.shape)
    shape[-3] = hq
    return TensorChannels(tuple(shape), dims)


if hasattr(nn, "RMSNorm"):
    @register_module(nn.RMSNorm, name="rms_norm", rewrite=full_count.rewrite_rms_norm_module)
    def _rmsnorm(ctx):
        m = ctx.module
        x = _tc(ctx, ctx.arg(0, "input"))
        n = len(m.normalized_shape)
        w = None
        if m.weight is not None:
            w = TensorChannels(tuple(m.weight.shape), [ctx.param("weight", k, "out") for k in range(n)])
        return layernorm_channels(ctx, x, n, w, None, centred=False)


# ---------------------------------------------------------------------------- nn.MultiheadAttention


def _rewrite_mha(rctx) -> None:
    """After whole heads are removed the inner width no longer equals ``embed_dim``, which
    ``nn.MultiheadAttention`` cannot express: swap in :class:`PrunedMultiheadAttention`."""
    from fxprune.modules import PrunedMultiheadAttention

    m = rctx.module
    inner, embed_dim = m.in_proj_weight.shape[0] // 3, m.in_proj_weight.shape[1]
    m.out_proj.in_features, m.out_proj.out_features = inner, m.out_proj.weight.shape[0]
    if isinstance(m, PrunedMultiheadAttention):
        m.num_heads, m.embed_dim = inner // m.head_dim, embed_dim
        return
    if inner == m.embed_dim == embed_dim:
        return
    new = PrunedMultiheadAttention(embed_dim, inner // m.head_dim, m.head_dim, bias=m.in_proj_bias is not None,
                                   dropout=m.dropout, batch_first=m.batch_first)
    new.in_proj_weight = m.in_proj_weight
    new.in_proj_bias = m.in_proj_bias
    new.out_proj = m.out_proj
    new.train(m.training)
    rctx.gm.add_submodule(rctx.node.target, new)


def _mha_modules():
    from fxprune.modules import PrunedMultiheadAttention

    return nn.MultiheadAttention, PrunedMultiheadAttention


@register_module(*_mha_modules(), name="multihead_attention", rewrite=_rewrite_mha)
def _mha(ctx):
    """Heads of ``nn.MultiheadAttention``: head ``h`` owns rows ``h*D..(h+1)*D`` of each of the
    q, k and v blocks of ``in_proj_weight`` (and bias) and the same columns of ``out_proj``."""
    m = ctx.module
    if not getattr(m, "_qkv_same_embed_dim", True) or getattr(m, "bias_k", None) is not None or getattr(
            m, "add_zero_attn", False):
        return ctx.unknown("nn.MultiheadAttention with separate k/v widths, bias_k/bias_v or add_zero_attn")
    mask = ctx.ch(ctx.arg(5, "attn_mask", None))
    if isinstance(mask, TensorChannels) and mask.ndim == 3:
        return ctx.unknown("a per-head attention mask")
    q, k, v = (_tc(ctx, ctx.arg(i, n)) for i, n in ((0, "query"), (1, "key"), (2, "value")))
    d = m.head_dim
    inner = m.in_proj_weight.shape[0] // 3
    heads = ctx.fresh(inner // d)
    head_of_row = (np.arange(3 * inner) % inner) // d
    for attr in ("in_proj_weight", "in_proj_bias"):
        t = ctx.param(attr, 0, "out")
        if t is not None:
            ctx.union(heads.units[head_of_row], t.units)
    w_in = ctx.param("in_proj_weight", 1, "in")
    for x in (q, k, v):
        ctx.consume(x.dims[-1], w_in, f"the input projection of {ctx.node.name}")
        for t in x.dims[:-1]:
            ctx.pin(t, "positions mixed by attention")
    out_cols = ctx.param("out_proj.weight", 1, "in")
    ctx.union(heads.units[np.arange(inner) // d], out_cols.units)
    w_out = ctx.param("out_proj.weight", 0, "out")
    b_out = ctx.param("out_proj.bias", 0, "out")
    if b_out is not None:
        ctx.unify(w_out, b_out)
    metas = ctx.node.meta["tensor_meta"]
    out_shape = tuple(metas[0].shape)
    out = TensorChannels(out_shape, [None] * (len(out_shape) - 1) + [Track(w_out.units, np.zeros(len(w_out), np.int8))])
    weights = None if metas[1] is None else TensorChannels(tuple(metas[1].shape), [None] * len(metas[1].shape))
    return (out, weights)
