"""Modules and functions that slim models are built from when torch.nn cannot express the
pruned model itself.

Contract with :func:`fxprune.io.load` (see :mod:`fxprune.allowlist`): every public
``torch.nn.Module`` subclass, function and ``torch.autograd.Function`` subclass defined here is
listed in ``__all__`` (built at the end of this file) and so may appear in a saved slim model
with no other edit. ``load`` rebuilds a module by calling its constructor on the meta device
with the saved attributes of the same names as the constructor's parameters, restores only
the attributes the class declares (set in ``__init__``, never a name starting with ``_``) and
checks every stored parameter and buffer against the shape the constructor gave it. A module
added here must therefore keep each constructor argument as an attribute of the same name
(``self.num_heads = num_heads``) and derive its tensors' shapes from them; a function must be
pure (tensors in, tensors out, no files, no global state).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` whose inner width ``num_heads * head_dim`` may differ from
    ``embed_dim`` (after whole heads are removed). Same call signature and outputs.

    Parameters keep ``nn.MultiheadAttention``'s names and layouts: ``in_proj_weight``
    ``(3 * num_heads * head_dim, embed_dim)``, ``in_proj_bias``, ``out_proj`` (Linear from
    ``num_heads * head_dim`` to ``embed_dim``).
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = False):
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, lq, _ = query.shape
        ls = key.shape[1]
        h, d = self.num_heads, self.head_dim
        w = self.in_proj_weight.chunk(3)
        b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, w[0], b[0]).view(n, lq, h, d).transpose(1, 2)
        k = F.linear(key, w[1], b[1]).view(n, ls, h, d).transpose(1, 2)
        v = F.linear(value, w[2], b[2]).view(n, ls, h, d).transpose(1, 2)
        mask = _merge_masks(attn_mask, key_padding_mask, q.dtype, n, lq, ls)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) * (d ** -0.5)
            if is_causal and mask is None:
                mask = torch.ones(lq, ls, dtype=torch.bool, device=q.device).tril().logical_not()
                mask = torch.zeros(lq, ls, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
            if mask is not None:
                scores = scores + mask
            attn = scores.softmax(-1)
            weights = attn.mean(1) if average_attn_weights else attn
            out = F.dropout(attn, p, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                 is_causal=is_causal and mask is None)
        out = self.out_proj(out.transpose(1, 2).reshape(n, lq, h * d))
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights


def _merge_masks(attn_mask, key_padding_mask, dtype, n, lq, ls) -> Optional[torch.Tensor]:
    """Additive float mask of shape broadcastable to (n, heads, lq, ls)."""
    mask = None
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dtype != torch.bool else torch.zeros_like(attn_mask, dtype=dtype).masked_fill(
            attn_mask, float("-inf"))
        mask = mask.to(dtype)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(n, 1, 1, ls)
        kpm = kpm.to(dtype) if kpm.dtype != torch.bool else torch.zeros(kpm.shape, dtype=dtype,
                                                                         device=kpm.device).masked_fill(kpm,
                                                                                                        float("-inf"))
        mask = kpm if mask is None else mask + kpm
    return mask



# ---------------------------------------------------------------------------- full-count normalisation
#
# A removed channel is exactly zero wherever it flows, so in a reduction over the channel
# dims it adds nothing to any sum: only the count of reduced elements changes. These forms
# reduce over the slim channels and divide by the full model's count, which reproduces the
# full model's statistics exactly. (A stock norm over the slim channels divides by the slim
# count, which changes every statistic.)


def _reduce_dims(x: torch.Tensor, dim) -> Tuple[int, ...]:
    """The reduced dims, non-negative, in the order given (``full_sizes`` follows it)."""
    if dim is None:
        return tuple(range(x.dim()))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(d % x.dim() for d in dims) if dims else tuple(range(x.dim()))


def _full_count(x: torch.Tensor, dims: Tuple[int, ...], full_sizes) -> int:
    """The full model's number of reduced elements: ``full_sizes`` aligned with ``dims``
    (None: the input's own size there)."""
    count = 1
    for k, d in enumerate(dims):
        f = full_sizes[k] if full_sizes is not None and k < len(full_sizes) else None
        count *= x.shape[d] if f is None else f
    return count


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Statistics of half-precision inputs are accumulated in float32, as torch's norms do."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _mean_and_centred_square_sum(x: torch.Tensor, dims: Tuple[int, ...], count: int):
    """Mean over ``dims`` of the full tensor (the slim ``x`` plus ``count - kept`` zeros) and
    the sum of squared deviations from it, zeros included: each missing zero deviates by
    ``-mean``, so it adds ``mean**2`` (two passes, as stable as torch's own variance)."""
    kept = 1
    for d in dims:
        kept *= x.shape[d]
    mean = x.sum(dims, keepdim=True) / count
    centred = x - mean
    return mean, centred, centred.square().sum(dims, keepdim=True) + (count - kept) * mean.square()


def mean_full_count(x: torch.Tensor, dim, keepdim: bool = False, full_sizes=None, *,
                    dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x.mean(dim, keepdim)`` of a slim tensor as the full model computes it: the sum over
    ``dim`` divided by the full count.

    Args:
        x: the slim input, zero-free (its removed channels were exactly zero).
        dim: the reduced dims (int, sequence, or None for all).
        full_sizes: the full model's size of each reduced dim, aligned with ``dim`` (None
            entries: the input's own size).
    """
    dims = _reduce_dims(x, dim)
    return x.sum(dims, keepdim=keepdim, dtype=dtype) / _full_count(x, dims, full_sizes)


def var_full_count(x: torch.Tensor, dim, correction: float = 1, keepdim: bool = False,
                   full_sizes=None) -> torch.Tensor:
    """``x.var(dim, correction=correction, keepdim=keepdim)`` of a slim tensor as the full
    model computes it (``full_sizes`` as in :func:`mean_full_count`): the removed zeros' squared
    deviations are added back and the divisor is the full count minus ``correction``."""
    dims = _reduce_dims(x, dim)
    count = _full_count(x, dims, full_sizes)
    _, _, ss = _mean_and_centred_square_sum(x, dims, count)
    var = ss / max(count - correction, 0)
    return var if keepdim else var.squeeze(dims)


def std_full_count(x: torch.Tensor, dim, correction: float = 1, keepdim: bool = False,
                   full_sizes=None) -> torch.Tensor:
    """``x.std(...)`` of a slim tensor as the full model computes it (:func:`var_full_count`)."""
    return var_full_count(x, dim, correction, keepdim, full_sizes).sqrt()


def _affine(y: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            inplace: bool = False) -> torch.Tensor:
    """``y * weight + bias`` (either may be None); ``inplace``: written into ``y``."""
    if weight is not None and bias is not None:
        return torch.addcmul(bias, y, weight, out=y) if inplace else torch.addcmul(bias, y, weight)
    if weight is not None:
        return y.mul_(weight) if inplace else y * weight
    if bias is not None:
        return y.add_(bias) if inplace else y + bias
    return y


def _layer_norm_full_count(x: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], eps: float, full_size: int, stats: bool = True):
    """``(output, mean, rstd)`` of :func:`native_layer_norm_full_count` (upcast as
    :func:`_upcast`; the output in ``x``'s dtype); ``stats=False``: ``mean`` and ``rstd`` may
    be None (not computed)."""
    dims = tuple(range(x.dim() - len(tuple(normalized_shape)), x.dim()))
    xf = _upcast(x)
    kept = 1
    for d in dims:
        kept *= x.shape[d]
    r = kept / full_size
    tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if eps <= 0 or tracked:  # see native_layer_norm_full_count
        mean, centred, ss = _mean_and_centred_square_sum(xf, dims, full_size)
        rstd = torch.rsqrt(ss / full_size + eps)
        return _affine((centred * rstd).to(x.dtype), weight, bias), mean, rstd
    shape = tuple(x.shape[dims[0]:])
    # A unit weight: torch's CPU kernel is faster with an affine weight than without.
    z, slim_mean, slim_rstd = torch.native_layer_norm(xf, shape, xf.new_ones(shape), None, eps / r)
    ms = slim_mean * slim_rstd
    scale = (ms * ms).mul_(r * (1.0 - r)).add_(r).rsqrt_()  # rstd / slim_rstd
    # Nothing is differentiated here: the kernel's fresh output is updated in place.
    y = z.add_(ms, alpha=1.0 - r).mul_(scale).to(x.dtype)
    y = _affine(y, weight, bias, inplace=True)
    return (y, slim_mean * r, scale * slim_rstd) if stats else (y, None, None)


def layer_norm_full_count(x: torch.Tensor, normalized_shape, full_size: int, weight: Optional[torch.Tensor] = None,
                          bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm`` over the slim channels with the full model's statistics.

    With ``D = full_size`` elements per normalised slice of which the slim input holds the
    non-removed ones: ``mean = sum(x) / D``, ``var = (sum((x - mean)**2) + (D - D') mean**2) / D``
    (the removed zeros included), then ``(x - mean) / sqrt(var + eps) * weight + bias``
    (computed as :func:`native_layer_norm_full_count` says).

    Args:
        x: ``(*, *normalized_shape)``, the slim input.
        normalized_shape: the slim normalised shape (the last dims of ``x``).
        full_size: number of elements of the full model's normalised shape.
    """
    return _layer_norm_full_count(x, normalized_shape, weight, bias, eps, full_size, stats=False)[0]


def native_layer_norm_full_count(x: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor],
                                 bias: Optional[torch.Tensor], eps: float, full_size: int):
    """``aten.native_layer_norm`` with the full model's statistics: ``(output, mean, rstd)``,
    the statistics shaped ``(*, 1, ..., 1)`` (:func:`layer_norm_full_count`).

    When nothing is differentiated (inference: grad mode off, or no input requires a gradient)
    and ``eps > 0``, the slim slice goes through torch's own fused layer norm, whose statistics
    are then corrected for the missing zeros. With ``r = D' / D`` (kept / full elements) and the
    slim mean ``m'`` and biased variance ``v'``, the full ones are ``mean = r m'`` and
    ``var = r (v' + (1 - r) m'**2)``. ``aten.native_layer_norm`` run with ``eps / r`` returns
    ``z = (x - m') s'`` and ``s' = (v' + eps / r)**-1/2``, so
    ``var + eps = r (s'**-2 + (1 - r) m'**2)`` (both terms non-negative: nothing cancels) and
    ``(x - mean) rstd = (z + (1 - r) m' s') a`` with the per-slice
    ``a = rstd / s' = (r + r (1 - r) (m' s')**2)**-1/2``: two elementwise passes after torch's
    kernel, one more for the affine map, all in place in the kernel's output. (A stock layer
    norm takes one pass in all; a per-slice scale and a per-channel weight cannot share one
    elementwise op without a full-size product.) Otherwise (torch's kernel does not differentiate its
    statistics outputs; with ``eps / r = 0`` it would divide by a zero variance) the statistics
    take two explicit passes over the slim elements (``sum``, then the centred squares)."""
    return _layer_norm_full_count(x, normalized_shape, weight, bias, eps, full_size)


def rms_norm_full_count(x: torch.Tensor, normalized_shape, full_size: int, weight: Optional[torch.Tensor] = None,
                        eps: Optional[float] = None) -> torch.Tensor:
    """``F.rms_norm`` over the slim channels with the full model's count:
    ``x / sqrt(sum(x**2) / full_size + eps) * weight`` (``eps`` None: the dtype's epsilon,
    as ``F.rms_norm``).

    Args:
        x: ``(*, *normalized_shape)``, the slim input.
        full_size: number of elements of the full model's normalised shape.
    """
    dims = tuple(range(x.dim() - len(tuple(normalized_shape)), x.dim()))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    xf = _upcast(x)
    y = (xf * torch.rsqrt(xf.square().sum(dims, keepdim=True) / full_size + eps)).to(x.dtype)
    return y * weight if weight is not None else y


def group_norm_full_count(x: torch.Tensor, kept_per_group, channels_per_group: int,
                          weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                          eps: float = 1e-5) -> torch.Tensor:
    """``F.group_norm`` after channels were removed unevenly from its groups: each group's
    statistics are taken over its kept channels and divided by its full count
    (``channels_per_group`` times the positions per channel).

    Args:
        x: ``(N, C', *)`` with ``C' = sum(kept_per_group)``; the kept channels of group 0
            first, then group 1's, and so on (a group may keep none).
        kept_per_group: how many channels each of the full model's groups kept.
        channels_per_group: channels per group in the full model.
        weight, bias: ``(C',)`` affine parameters.
    """
    return _group_norm_full_count(x, kept_per_group, channels_per_group, weight, bias, eps)[0]


def native_group_norm_full_count(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                                 kept_per_group, channels_per_group: int, eps: float):
    """``aten.native_group_norm`` with each group's full count: ``(output, mean, rstd)``, the
    statistics shaped ``(N, groups)`` (:func:`group_norm_full_count`)."""
    return _group_norm_full_count(x, kept_per_group, channels_per_group, weight, bias, eps)


def _group_norm_full_count(x, kept_per_group, channels_per_group, weight, bias, eps):
    n, c = x.shape[0], x.shape[1]
    xf = _upcast(x).reshape(n, c, -1)
    positions = xf.shape[-1]
    count = channels_per_group * positions
    group_of = torch.tensor([g for g, k in enumerate(kept_per_group) for _ in range(k)], device=x.device)
    member = torch.eye(len(kept_per_group), dtype=xf.dtype, device=x.device)[group_of]  # (C', groups)
    kept = torch.tensor(list(kept_per_group), device=x.device)
    mean = (xf.sum(-1) @ member) / count  # (N, groups)
    centred = xf - (mean @ member.t()).unsqueeze(-1)
    missing = (channels_per_group - kept.to(xf.dtype)) * positions
    rstd = torch.rsqrt(((centred.square().sum(-1) @ member) + missing * mean.square()) / count + eps)
    y = (centred * (rstd @ member.t()).unsqueeze(-1)).reshape(x.shape).to(x.dtype)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y, mean, rstd


class CountPreservingLayerNorm(nn.Module):
    """``nn.LayerNorm`` over the slim channels whose mean and variance divide by the full
    model's count (:func:`layer_norm_full_count`); the parameters keep ``nn.LayerNorm``'s names.

    Args:
        normalized_shape: the slim normalised shape.
        full_size: number of elements of the full model's normalised shape.
    """

    def __init__(self, normalized_shape, full_size: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.full_size, self.eps = int(full_size), eps
        self.elementwise_affine, self.bias_enabled = elementwise_affine, bias
        self.weight = nn.Parameter(torch.ones(self.normalized_shape)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape)) if elementwise_affine and bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_full_count(x, self.normalized_shape, self.full_size, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, full_size={self.full_size}, eps={self.eps}"


class CountPreservingRMSNorm(nn.Module):
    """``nn.RMSNorm`` over the slim channels whose mean square divides by the full model's
    count (:func:`rms_norm_full_count`)."""

    def __init__(self, normalized_shape, full_size: int, eps: Optional[float] = None,
                 elementwise_affine: bool = True):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.full_size, self.eps, self.elementwise_affine = int(full_size), eps, elementwise_affine
        self.weight = nn.Parameter(torch.ones(self.normalized_shape)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_full_count(x, self.normalized_shape, self.full_size, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, full_size={self.full_size}, eps={self.eps}"


class CountPreservingGroupNorm(nn.Module):
    """``nn.GroupNorm`` whose groups lost channels unevenly: statistics per group over its kept
    channels, divided by its full count (:func:`group_norm_full_count`).

    Args:
        kept_per_group: kept channels of each of the full model's groups (``num_channels`` is
            their sum).
        channels_per_group: channels per group in the full model.
    """

    def __init__(self, kept_per_group, channels_per_group: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.kept_per_group = tuple(int(k) for k in kept_per_group)
        self.channels_per_group, self.eps, self.affine = int(channels_per_group), eps, affine
        self.num_channels = sum(self.kept_per_group)
        self.weight = nn.Parameter(torch.ones(self.num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(self.num_channels)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_full_count(x, self.kept_per_group, self.channels_per_group, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"kept_per_group={self.kept_per_group}, channels_per_group={self.channels_per_group}, eps={self.eps}"


# Every public class and function defined in this file: what fxprune.io.load may rebuild or call.
__all__ = sorted(name for name, obj in list(globals().items())
                 if not name.startswith("_") and getattr(obj, "__module__", None) == __name__
                 and (isinstance(obj, type) or callable(obj)))
