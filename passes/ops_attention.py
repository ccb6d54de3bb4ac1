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
    if ctx.arg(None, "enable_gqa", False) or not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
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


def _rewrite_rmsnorm(rctx) -> None:
    m = rctx.module
    x = rctx.ch(rctx.node.args[0])
    n = len(m.normalized_shape)
    m.normalized_shape = tuple(rctx.new_shape(x)[-n:])


if hasattr(nn, "RMSNorm"):
    @register_module(nn.RMSNorm, name="rms_norm", rewrite=_rewrite_rmsnorm)
    def _rmsnorm(ctx):
        m = ctx.module
        x = _tc(ctx, ctx.arg(0, "input"))
        n = len(m.normalized_shape)
        w = None
        if m.weight is not None:
            w = TensorChannels(tuple(m.weight.shape), [ctx.param("weight", k, "out") for k in range(n)])
        return layernorm_channels(ctx, x, n, w, None)
