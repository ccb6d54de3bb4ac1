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


# Every public class and function defined in this file: what fxprune.io.load may rebuild or call.
__all__ = sorted(name for name, obj in list(globals().items())
                 if not name.startswith("_") and getattr(obj, "__module__", None) == __name__
                 and (isinstance(obj, type) or callable(obj)))
