"""Channel counts read as numbers (``x.size(1)``, ``x.shape``, ``C // 4``).

Such a value changes when channels are removed. That is harmless, even wanted, where it only
sizes a reshape whose arguments the prune rewrite recomputes; anywhere else (a mean written
as ``sum / x.size(1)``, an attention scale ``q.size(-1) ** -0.5``) the slim model would
compute something else, so the channels it counts are frozen.
"""
from __future__ import annotations

import operator
from typing import Any, List, Optional

import torch
import torch.fx

from .channels import TensorChannels, Track

# ops whose size arguments the prune rewrite recomputes
SIZE_CONSUMERS = {"reshape", "expand", "split", "chunk", "narrow"}


def record_size(ctx, x: Optional[TensorChannels], dim: Any = "all") -> None:
    """Record that this node's value is ``x``'s shape (``dim="all"``), one of its sizes, or a
    count over all of them (``dim=None``: ``numel``)."""
    if x is None:
        return
    if dim == "all":
        ctx.analysis.sizes[ctx.node.name] = list(x.dims)
    elif dim is None:
        ctx.analysis.sizes[ctx.node.name] = [t for t in x.dims if t is not None]
    else:
        ctx.analysis.sizes[ctx.node.name] = x.dims[dim]


def _flat(v: Any) -> List[Track]:
    if isinstance(v, Track):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _flat(x)]
    return []


def follow_sizes(ctx, spec_name: str) -> None:
    """Propagate size values through scalar arithmetic; freeze what other ops consume."""
    node = ctx.node
    sizes = ctx.analysis.sizes
    used = [a for a in node.all_input_nodes if a.name in sizes]
    if not used or node.name in sizes:
        return
    if node.op == "call_function" and node.target is operator.getitem and node.args[0] in used:
        src, idx = sizes[node.args[0].name], node.args[1]
        if isinstance(src, list) and isinstance(idx, (int, slice)):
            sizes[node.name] = src[idx]
            return
    meta = node.meta.get("tensor_meta")
    tracks = [t for a in used for t in _flat(sizes[a.name])]
    if meta is None and node.op in ("call_function", "call_method"):  # scalar arithmetic on sizes
        sizes[node.name] = tracks
    elif spec_name not in SIZE_CONSUMERS:
        for t in tracks:
            ctx.pin(t, "its channel count is used as a number")


def counts_channels(analysis, value: Any) -> bool:
    """Whether an argument is a number derived from some channel count."""
    return isinstance(value, torch.fx.Node) and bool(_flat(analysis.sizes.get(value.name)))
