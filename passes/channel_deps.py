"""Channel-dependency analysis: propagate channel tracks through the graph, unify them, and
collect zero-invariant groups (OTOv2, Chen et al., ICLR 2023, Sec. 3.1, "ZIG partition").

The walk visits nodes in graph order and asks each node's registry entry for the channel
tracks of its output. Unifications are collected as edges; at the end the connected
components of channel elements are the removable channels. Channels sharing the same
parameter slices (same parameters, dims and multiplicities) form one :class:`Group`.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.fx

from fxprune.errors import describe_node
from fxprune.ir import Group, Slice

from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .channels import ZERO, TensorChannels
from .op_semantics import META_SPEC
from .registry import REGISTRY, Registry
from .size_flow import follow_sizes
from .rule_context import Analysis, RuleContext, _flatten_tc, _get_tensor

META_CHANNELS = "fxprune.channels"
META_OP = "fxprune.op"


def canonical_names(gm: torch.nn.Module) -> Dict[str, str]:
    """Map every parameter/buffer name to the first name of the same tensor (tied weights)."""
    first: Dict[int, str] = {}
    out: Dict[str, str] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        out[name] = first.setdefault(id(t), name)
    return out


def walk(gm: torch.fx.GraphModule, registry: Registry = REGISTRY) -> Analysis:
    """Run every node's rule in graph order; returns the raw :class:`Analysis`."""
    an = Analysis()
    an.canonical = canonical_names(gm)
    for node in gm.graph.nodes:
        ctx = RuleContext(an, gm, node)
        spec_name = ""
        if node.op == "placeholder":
            out = ctx.out_untracked()
        elif node.op == "get_attr":
            name = an.canonical.get(node.target, node.target)
            tensor = _get_tensor(gm, node.target)
            out = ctx.attr_channels(name, tensor) if tensor is not None else None
        elif node.op == "output":
            ctx.pin_all(_channels_of(an, node.args[0]), "reaches the model output")
            out = None
        else:
            spec = node.meta[META_SPEC] if META_SPEC in node.meta else registry.lookup(node, ctx.module)
            follow_sizes(ctx, spec.name if spec is not None else "")
            if spec is None:
                out = ctx.unknown(f"op without channel semantics ({_op_name(node, ctx.module)})")
            else:
                spec_name = spec.name
                try:
                    out = spec.rule(ctx)
                    _check_shapes(node, out)
                except Exception as exc:  # a rule that cannot follow this use freezes, never guesses
                    out = ctx.unknown(f"channel rule '{spec.name}' cannot follow this use: {exc}")
                if not spec.selects:
                    _freeze_unaccounted(ctx, out, spec.name)
                _note_state_changes(ctx, out)
        node.meta[META_OP] = spec_name
        an.specs[node.name] = spec_name
        an.channels[node.name] = out
    return an


def _freeze_unaccounted(ctx: RuleContext, out: Any, spec_name: str) -> None:
    """Channels that enter a node and neither leave it nor were linked, checked or frozen by
    its rule would be removed with nobody fixing this op: freeze them instead."""
    inputs = [t.units for tc in ctx.tensor_args() for t in tc.dims if t is not None]
    if not inputs:
        return
    kept = [t.units for tc in _flatten_tc(out) for t in tc.dims if t is not None] + ctx.touched
    lost = np.setdiff1d(np.concatenate(inputs), np.concatenate(kept) if kept else np.empty(0, np.int64))
    if len(lost):
        ctx.analysis.pins.append((lost, f"channels dropped by rule '{spec_name}' ({ctx.where()})"))


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _is_inplace(node: torch.fx.Node, module) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_") and node.target != "requires_grad_"
    if node.op == "call_function":
        return node.target in _INPLACE_OPERATORS or getattr(node.target, "__name__", "").endswith("_") or bool(
            node.kwargs.get("inplace"))
    return bool(getattr(module, "inplace", False))


def _note_state_changes(ctx: RuleContext, out: Any) -> None:
    """Remember which node first turns a zeroed channel into a non-zero value (for reasons), and
    freeze channels an in-place op changes behind the graph's back: later users of the mutated
    input read the new value, not the one the analysis saw."""
    ins = [t for tc in ctx.tensor_args()[:1] for t in tc.dims if t is not None]
    outs = [t for tc in _flatten_tc(out) for t in tc.dims if t is not None]
    if not ins or not outs:
        return
    zero_in = np.unique(np.concatenate([t.units[t.state == ZERO] for t in ins]))
    for t in outs:
        became = t.units[(t.state != ZERO) & np.isin(t.units, zero_in)]
        for e in became.tolist():
            ctx.analysis.const_origin.setdefault(e, ctx.where())
        if len(became) and _is_inplace(ctx.node, ctx.module):
            for tin in ins:
                ctx.pin(tin, "changed in place by an op that does not keep zeros at zero")
            return


def _channels_of(an: Analysis, v: Any) -> Any:
    if isinstance(v, torch.fx.Node):
        return an.channels.get(v.name)
    if isinstance(v, (list, tuple)):
        return [_channels_of(an, x) for x in v]
    if isinstance(v, dict):
        return [_channels_of(an, x) for x in v.values()]
    return None


def _op_name(node: torch.fx.Node, module: Optional[torch.nn.Module]) -> str:
    if node.op == "call_module":
        return f"module {type(module).__module__}.{type(module).__qualname__}"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    t = node.target
    return f"function {getattr(t, '__module__', '')}.{getattr(t, '__name__', repr(t))}"


def _check_shapes(node: torch.fx.Node, out: Any) -> None:
    """A rule's output must match the shapes seen by shape propagation."""
    meta = node.meta.get("tensor_meta")
    if isinstance(out, TensorChannels):
        if meta is None or not hasattr(meta, "shape") or tuple(meta.shape) != out.shape:
            raise ValueError(f"rule gave shape {out.shape}, shape propagation saw "
                             f"{tuple(meta.shape) if hasattr(meta, 'shape') else meta}")
        for size, t in zip(out.shape, out.dims):
            if t is not None and len(t) != size:
                raise ValueError(f"track of length {len(t)} on a dim of size {size}")
    elif isinstance(out, (list, tuple)) and isinstance(meta, (list, tuple)):
        if len(out) != len(meta):
            raise ValueError("rule gave a different number of outputs")


# ---------------------------------------------------------------------------- groups


class GroupIndex:
    """Element -> (group id, channel) maps, built once the components are known."""

    def __init__(self, count: int):
        self.group = np.full(count, -1, np.int64)
        self.channel = np.full(count, -1, np.int64)


def build_groups(gm: torch.fx.GraphModule, an: Analysis, allow_inexact: bool = False
                 ) -> Tuple[List[Group], np.ndarray, GroupIndex]:
    """Collect the groups. Returns ``(groups, components, index)`` where ``components[e]`` is
    the representative of element ``e`` and ``index`` maps elements to group channels."""
    comp = an.store.components()
    pin_reason = _first_reason(comp, an.pins)
    inexact_reason = _first_reason(comp, an.inexact)

    keys = list(an.params.keys())
    role_of = []
    for k in keys:
        roles = an.params[k].roles
        role_of.append("out" if "out" in roles else ("in" if "in" in roles else "buffer"))
    if not keys:
        return [], comp, GroupIndex(an.store.count)
    reps = [comp[an.params[k].track.units] for k in keys]
    R = np.concatenate(reps)
    K = np.concatenate([np.full(len(r), i, np.int64) for i, r in enumerate(reps)])
    P = np.concatenate([np.arange(len(r), dtype=np.int64) for r in reps])

    # signature of each representative: the (param key, multiplicity) pairs it touches
    nk = len(keys)
    code = R * nk + K
    order = np.lexsort((P, code))
    R, K, P, code = R[order], K[order], P[order], code[order]
    ucode, first_idx, counts = np.unique(code, return_index=True, return_counts=True)
    ur, uk = ucode // nk, ucode % nk
    starts = np.flatnonzero(np.r_[True, ur[1:] != ur[:-1]])
    ends = np.r_[starts[1:], len(ur)]
    is_out = np.array([r == "out" for r in role_of])
    has_out = np.logical_or.reduceat(is_out[uk], starts)
    sig_code = uk * (int(counts.max()) + 1) + counts
    first_pos: Dict[int, Tuple[int, int]] = {}
    buckets: Dict[tuple, List[int]] = defaultdict(list)
    for r, lo, hi, out in zip(ur[starts].tolist(), starts.tolist(), ends.tolist(), has_out.tolist()):
        if not out:
            continue  # nothing to zero: never removed
        first_pos[r] = (int(uk[lo]), int(P[first_idx[lo]]))
        pinned = r in pin_reason
        buckets[(sig_code[lo:hi].tobytes(), pinned, not pinned and r in inexact_reason)].append(r)

    index = GroupIndex(an.store.count)
    entries = []
    for (s, pinned, inexact), rs in buckets.items():
        rs.sort(key=lambda r: first_pos[r])
        entries.append((min(first_pos[r] for r in rs), s, pinned, inexact, rs))
    entries.sort(key=lambda e: e[0])

    rep_group = np.full(an.store.count, -1, np.int64)
    rep_chan = np.full(an.store.count, -1, np.int64)
    groups: List[Group] = []
    for gid, (_, s, pinned, inexact, rs) in enumerate(entries):
        rs_arr = np.asarray(rs, np.int64)
        rep_group[rs_arr] = gid
        rep_chan[rs_arr] = np.arange(len(rs), dtype=np.int64)
        reason = pin_reason.get(rs[0]) if pinned else (inexact_reason.get(rs[0]) if inexact else None)
        groups.append(Group(id=gid, size=len(rs), slices=[], dependents=[], prunable=not pinned and (
            not inexact or allow_inexact), exact=not inexact, reason=reason))

    # slices: positions of each param key owned by each group
    G = rep_group[R]
    keep = G >= 0
    G, Kk, Pk, Rk = G[keep], K[keep], P[keep], R[keep]
    order = np.lexsort((Pk, Kk, G))
    G, Kk, Pk, Rk = G[order], Kk[order], Pk[order], Rk[order]
    bounds = np.flatnonzero(np.diff(G * (len(keys) + 1) + Kk)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(G)]):
        if lo == hi:
            continue
        gid, k = int(G[lo]), int(Kk[lo])
        name, dim = keys[k]
        sl = Slice(param=name, dim=dim, index=torch.from_numpy(Pk[lo:hi].copy()),
                   channel=torch.from_numpy(rep_chan[Rk[lo:hi]]), role=role_of[k])
        (groups[gid].slices if sl.role == "out" else groups[gid].dependents).append(sl)

    index.group = rep_group[comp]
    index.channel = rep_chan[comp]
    _attach_nodes(gm, an, groups, index)
    return groups, comp, index


def _first_reason(comp: np.ndarray, entries: List[Tuple[np.ndarray, str]]) -> Dict[int, str]:
    """Representative -> the first reason recorded for any of its elements."""
    if not entries:
        return {}
    units = np.concatenate([u for u, _ in entries])
    which = np.concatenate([np.full(len(u), i, np.int64) for i, (u, _) in enumerate(entries)])
    reps, first = np.unique(comp[units], return_index=True)
    return dict(zip(reps.tolist(), (entries[i][1] for i in which[first].tolist())))


def _attach_nodes(gm: torch.fx.GraphModule, an: Analysis, groups: List[Group], index: GroupIndex) -> None:
    """``node.meta["fxprune.groups"]`` and ``Group.nodes``: which groups each node carries."""
    nodes = list(gm.graph.nodes)
    node_ids, group_ids = [], []
    for i, node in enumerate(nodes):
        out = an.channels.get(node.name)
        node.meta[META_CHANNELS] = out
        node.meta["fxprune.groups"] = []
        for tc in _flatten_tc(out):
            for t in tc.dims:
                if t is not None:
                    group_ids.append(index.group[t.units])
                    node_ids.append(np.full(len(t), i, np.int64))
    if not node_ids:
        return
    stride = len(groups) + 1
    codes = np.unique(np.concatenate(node_ids) * stride + np.concatenate(group_ids) + 1)
    for i, g in zip((codes // stride).tolist(), (codes % stride - 1).tolist()):
        if g < 0:
            continue
        nodes[i].meta["fxprune.groups"].append(g)
        groups[g].nodes.append(nodes[i].name)


@dataclass
class ChannelAnalysis:
    """What the channel-deps pass leaves on ``gm.meta["fxprune"]``."""

    analysis: Analysis
    groups: List[Group]
    components: np.ndarray
    index: GroupIndex


class ChannelDepsPass(PassBase):
    """Unify channel dimensions across the graph and collect the groups (ZIGs)."""

    name = "channel_deps"

    def __init__(self, allow_inexact: bool = False, registry: Registry = REGISTRY):
        super().__init__()
        self.allow_inexact = allow_inexact
        self.registry = registry

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        an = walk(gm, self.registry)
        groups, comp, index = build_groups(gm, an, self.allow_inexact)
        gm.meta["fxprune"] = ChannelAnalysis(an, groups, comp, index)
        return PassResult(gm, False)


__all__ = ["ChannelDepsPass", "ChannelAnalysis", "walk", "build_groups", "canonical_names", "GroupIndex", "META_CHANNELS", "META_OP", "describe_node"]
