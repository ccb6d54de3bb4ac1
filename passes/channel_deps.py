"""Channel-dependency analysis: propagate channel tracks through the graph, unify them, and
collect zero-invariant groups (OTOv2, Chen et al., ICLR 2023, Sec. 3.1, "ZIG partition").

The walk visits nodes in graph order and asks each node's registry entry for the channel
tracks of its output. Unifications are collected as edges; at the end the connected
components of channel elements are the removable channels. Channels sharing the same
parameter slices (same parameters, dims and multiplicities) form one :class:`Group`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.fx

from fxprune.errors import describe_node
from fxprune.ir import Group, Slice

from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .autograd_functions import autograd_function, describe as describe_autograd_function
from .channels import ZERO, TensorChannels, unique_sorted
from .lookup import Lookup
from .op_semantics import META_SPEC
from .registry import REGISTRY, Registry
from .size_flow import follow_sizes
from .rule_context import Analysis, RuleContext, _flatten_tc

META_CHANNELS = "fxprune.channels"
META_OP = "fxprune.op"
META_OUTPUT_REASON = "fxprune.output_reason"  # why the outputs are frozen, if not the model's (a region's)


def canonical_names(gm: torch.nn.Module) -> Dict[str, str]:
    """Map every parameter/buffer name to the first name of the same tensor (tied weights)."""
    return Lookup(gm).canonical_names()


def walk(gm: torch.fx.GraphModule, registry: Registry = REGISTRY) -> Analysis:
    """Run every node's rule in graph order; returns the raw :class:`Analysis`."""
    an = Analysis()
    lookup = Lookup(gm)
    an.canonical = lookup.canonical_names()
    for node in gm.graph.nodes:
        ctx = RuleContext(an, gm, node, lookup)
        spec_name = ""
        if node.op == "placeholder":
            out = ctx.out_untracked()
        elif node.op == "get_attr":
            name = an.canonical.get(node.target, node.target)
            tensor = lookup.tensor(node.target)
            out = ctx.attr_channels(name, tensor) if tensor is not None else None
        elif node.op == "output":
            ctx.pin_all(_channels_of(an, node.args[0]), gm.meta.get(META_OUTPUT_REASON, "reaches the model output"))
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
    _freeze_outside_uses(gm, an)
    return an


# reading these from a tensor touches none of its values
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "layout", "is_cuda", "requires_grad"}
_METADATA_METHODS = {"size", "dim", "numel", "nelement", "element_size", "stride", "is_contiguous"}
_ALIASES = ({"data"}, {"detach"})  # getattr names and methods that give the same values


def _freeze_outside_uses(gm: torch.fx.GraphModule, an: Analysis) -> None:
    """A parameter or buffer of a module called as a leaf (``call_module``) is linked to
    channels by that module's rule alone. When another node also reads or writes it through a
    ``get_attr`` (``self.conv.weight.data.clamp_(-1, 1)``, a weight clipped or scaled in place
    in ``forward``), that use follows none of the module's channel semantics: every dim of the
    tensor is frozen, with the node that uses it in the reason. Reading only its shape, dtype or
    device is not a use (and makes no channels of the dims the module does not link)."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    if not called:
        return
    aliases: Dict[str, List[str]] = {}
    for alias, canonical in an.canonical.items():
        aliases.setdefault(canonical, []).append(alias)
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        name = an.canonical.get(node.target, node.target)
        owners = [a.rpartition(".")[0] for a in aliases.get(name, [node.target])]
        owner = next((o for o in owners if o in called), None)
        if owner is None:
            continue
        keys = [key for key in an.params if key[0] == name]
        user = _value_user(node)
        if user is None:
            # only its shape is read: the dims the module's rule does not link (a kernel's taps)
            # are no channels, as they would be without this read
            for key in keys:
                info = an.params[key]
                if info.default_role and info.nodes == [node.name]:
                    info.roles = {"kernel"}
                    info.default_role = False
            continue
        reason = (f"{name} belongs to module '{owner}' but is also read or written outside that "
                  f"module by {describe_node(user)}")
        for key in keys:
            an.pins.append((an.params[key].track.units.copy(), reason))


def _value_user(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The first node that reads the values of ``node`` (through ``.data`` / ``detach()``
    aliases), or None if every use reads metadata only."""
    stack = list(node.users)
    while stack:
        user = stack.pop(0)
        if user.op == "call_function" and user.target is getattr and len(user.args) > 1:
            if user.args[1] in _METADATA_ATTRS:
                continue
            if user.args[1] in _ALIASES[0]:
                stack.extend(user.users)
                continue
        if user.op == "call_method" and user.target in _METADATA_METHODS:
            continue
        if user.op == "call_method" and user.target in _ALIASES[1] and len(user.args) == 1:
            stack.extend(user.users)
            continue
        return user
    return None


def _freeze_unaccounted(ctx: RuleContext, out: Any, spec_name: str) -> None:
    """Channels that enter a node and neither leave it nor were linked, checked or frozen by
    its rule would be removed with nobody fixing this op: freeze them instead."""
    inputs = [t.units for tc in ctx.tensor_args() for t in tc.dims if t is not None]
    if not inputs:
        return
    kept = [t.units for tc in _flatten_tc(out) for t in tc.dims if t is not None] + ctx.touched
    kept_arrays = {id(u) for u in kept}
    if all(id(u) in kept_arrays for u in inputs):  # the usual case: each input's array goes on as it is
        return
    entering = np.concatenate(inputs)
    lost = entering[~ctx.analysis.store.isin(entering, np.concatenate(kept))] if kept else entering
    if len(lost):
        ctx.analysis.pins.append((unique_sorted(lost), f"channels dropped by rule '{spec_name}' ({ctx.where()})"))


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
    outs = [(t, t.state != ZERO) for tc in _flatten_tc(out) for t in tc.dims if t is not None]
    outs = [(t, nonzero) for t, nonzero in outs if nonzero.any()]
    if not ins or not outs:
        return
    zero_in = np.concatenate([t.units[t.state == ZERO] for t in ins])
    for t, nonzero in outs:
        became = t.units[nonzero & ctx.analysis.store.isin(t.units, zero_in)]
        if len(became):
            origin, where = ctx.analysis.const_origin, ctx.where()
            for e in became.tolist():
                origin.setdefault(e, where)
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
    if autograd_function(t) is not None:
        return describe_autograd_function(t)
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
    the representative of element ``e`` and ``index`` maps elements to group channels.

    A removable channel is a component (its representative) that some producer ("out")
    parameter position belongs to; channels with the same signature (the parameter keys they
    touch, with multiplicities) and the same frozen/inexact status form a group. Groups are
    ordered by their first (parameter key, position), channels within a group too.

    Parameter keys whose tracks hold the same element array (a conv's rows, its bias and the
    BatchNorm after it) map positions to channels alike, so the work is done once per such
    class of keys (:func:`_key_classes`) and its slices are repeated for each key.
    """
    comp = an.store.components()
    pin_reason = _first_reason(comp, an.pins)
    inexact_reason = _first_reason(comp, an.inexact)

    keys = list(an.params.keys())
    role_of = []
    for k in keys:
        roles = an.params[k].roles
        role_of.append("out" if "out" in roles else ("in" if "in" in roles else "buffer"))
    classes, units = _key_classes(an, keys)
    # every position of every class: its representative R, class C and position P (C-major)
    sizes = [len(u) for u in units]
    if not sum(sizes):
        return [], comp, GroupIndex(an.store.count)
    R = comp[np.concatenate(units)]
    C = np.repeat(np.arange(len(classes), dtype=np.int64), sizes)
    P = np.arange(len(R), dtype=np.int64) - np.repeat(np.cumsum([0] + sizes[:-1]), sizes)

    # classes are ordered by their first key, so a channel's first (class, position) is its
    # first (key, position)
    class_out = np.array([any(role_of[k] == "out" for k in ks) for ks in classes])
    rep, first, signature = _channels(R, C, P, class_out)
    pinned = _marked(an.store.count, pin_reason)[rep]
    inexact = _marked(an.store.count, inexact_reason)[rep] & ~pinned
    rep_group, rep_chan, heads = _partition(rep, first, signature * 4 + pinned * 2 + inexact, an.store.count)

    groups: List[Group] = []
    for gid, (head, size, flags) in enumerate(heads):
        is_pinned, is_inexact = bool(flags & 2), bool(flags & 1)
        reason = pin_reason.get(head) if is_pinned else (inexact_reason.get(head) if is_inexact else None)
        groups.append(Group(id=gid, size=size, slices=[], dependents=[], prunable=not is_pinned and (
            not is_inexact or allow_inexact), exact=not is_inexact, reason=reason))

    # slices: the positions of each class owned by each group, then one slice per key of the
    # class, added in (key, group) order
    G = rep_group[R]
    keep = G >= 0
    G, C, P, R = G[keep], C[keep], P[keep], R[keep]
    pair = C * (len(groups) + 1) + G
    order = np.argsort(pair, kind="stable")  # keeps positions ascending; nearly sorted already
    G, C, P, R, pair = G[order], C[order], P[order], R[order], pair[order]
    bounds = np.flatnonzero(np.diff(pair)) + 1
    pieces = []  # (key, group, index, channel)
    for lo, hi in zip(np.r_[0, bounds].tolist(), np.r_[bounds, len(G)].tolist()):
        if lo < hi:
            index, channel = P[lo:hi], rep_chan[R[lo:hi]]
            pieces += [(k, int(G[lo]), index, channel) for k in classes[int(C[lo])]]
    pieces.sort(key=lambda piece: piece[:2])
    for k, gid, index, channel in pieces:
        name, dim = keys[k]
        sl = Slice(param=name, dim=dim, index=torch.from_numpy(index.copy()), channel=torch.from_numpy(channel.copy()),
                   role=role_of[k])
        (groups[gid].slices if sl.role == "out" else groups[gid].dependents).append(sl)

    index = GroupIndex(an.store.count)
    index.group = rep_group[comp]
    index.channel = rep_chan[comp]
    _attach_nodes(gm, an, groups, index)
    return groups, comp, index


def _key_classes(an: Analysis, keys: list) -> Tuple[List[List[int]], List[np.ndarray]]:
    """Parameter keys (indices into ``keys``) grouped by the element array of their track, in
    order of their first key; and each class's element array."""
    by_array: Dict[int, int] = {}
    classes: List[List[int]] = []
    units: List[np.ndarray] = []
    for i, k in enumerate(keys):
        u = an.params[k].track.units
        c = by_array.setdefault(id(u), len(classes))  # the arrays stay alive in an.params: ids are unique
        if c == len(classes):
            classes.append([])
            units.append(u)
        classes[c].append(i)
    return classes, units


def _channels(R: np.ndarray, K: np.ndarray, P: np.ndarray, is_out: np.ndarray
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The channels among the parameter positions (representative ``R``, key ``K`` (here a
    class of keys), position ``P``, sorted by key then position): representatives that some
    producer key (``is_out[K]``) touches.

    Returns ``(rep, first, signature)``, ascending in ``rep``: ``first`` encodes a channel's
    first (key, position), ``signature`` is an id of the (key, multiplicity) pairs it touches.
    """
    order = np.argsort(R, kind="stable")  # -> sorted by (R, K, P)
    R, K, P = R[order], K[order], P[order]
    pair_start = np.flatnonzero(np.r_[True, (R[1:] != R[:-1]) | (K[1:] != K[:-1])])
    count = np.diff(np.r_[pair_start, len(R)])  # multiplicity of each (R, K) pair
    pr, pk = R[pair_start], K[pair_start]
    starts = np.flatnonzero(np.r_[True, pr[1:] != pr[:-1]])
    ends = np.r_[starts[1:], len(pr)]
    has_out = np.logical_or.reduceat(is_out[pk], starts)
    lo, hi = starts[has_out], ends[has_out]
    first = pk[lo] * (int(P.max()) + 1) + P[pair_start[lo]]
    signature = _segment_ids(pk * (int(count.max()) + 1) + count, lo, hi)
    return pr[lo], first, signature


def _partition(rep: np.ndarray, first: np.ndarray, bucket: np.ndarray, count: int
               ) -> Tuple[np.ndarray, np.ndarray, List[Tuple[int, int, int]]]:
    """Groups: the channels of one bucket, ordered by ``first``; groups by their first channel.

    Returns ``rep_group``/``rep_chan`` (``int64[count]``, -1 off the channels) and, per group
    in id order, ``(first representative, size, bucket % 4)``.
    """
    rep_group = np.full(count, -1, np.int64)
    rep_chan = np.full(count, -1, np.int64)
    if not len(rep):
        return rep_group, rep_chan, []
    order = _sort_order(bucket, first)
    rep, bucket, first = rep[order], bucket[order], first[order]
    b_start = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    b_size = np.diff(np.r_[b_start, len(rep)])
    b_rank = np.empty(len(b_start), np.int64)
    b_rank[np.argsort(first[b_start])] = np.arange(len(b_start))
    which = np.repeat(np.arange(len(b_start)), b_size)
    rep_group[rep] = b_rank[which]
    rep_chan[rep] = np.arange(len(rep)) - b_start[which]
    heads = [(int(rep[b_start[b]]), int(b_size[b]), int(bucket[b_start[b]]) % 4)
             for b in np.argsort(b_rank).tolist()]
    return rep_group, rep_chan, heads


def _sort_order(major: np.ndarray, minor: np.ndarray) -> np.ndarray:
    """Indices that sort non-negative integer pairs ``(major, minor)``, all distinct."""
    if not len(major):
        return np.zeros(0, np.int64)
    span = int(minor.max()) + 1
    if int(major.max()) < (1 << 62) // span:  # one int64 key: a plain sort, no lexsort
        return np.argsort(major * span + minor)
    return np.lexsort((minor, major))


def _segment_ids(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """An id per segment ``values[starts[i]:ends[i]]``, equal for equal segments."""
    lengths = ends - starts
    ids = np.empty(len(starts), np.int64)
    next_id = 0
    for n in unique_sorted(lengths).tolist():
        rows = np.flatnonzero(lengths == n)
        seqs = values[starts[rows, None] + np.arange(n)]
        order = np.lexsort(seqs.T[::-1])
        seqs = seqs[order]
        new = np.r_[True, (seqs[1:] != seqs[:-1]).any(axis=1)]
        local = np.cumsum(new) - 1
        ids[rows[order]] = next_id + local
        next_id += int(local[-1]) + 1
    return ids


def _marked(count: int, elements: Dict[int, str]) -> np.ndarray:
    """``bool[count]``, True at the given elements."""
    mask = np.zeros(count, bool)
    mask[np.fromiter(elements, np.int64, len(elements))] = True
    return mask


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
    seen: Dict[int, Tuple[np.ndarray, List[int]]] = {}  # id(units) -> (units, groups); holds units: ids stay unique
    for node in gm.graph.nodes:
        out = an.channels.get(node.name)
        node.meta[META_CHANNELS] = out
        gids = set()
        for tc in _flatten_tc(out):
            for t in tc.dims:
                if t is not None:
                    hit = seen.get(id(t.units))
                    if hit is None:  # tracks often share their element array (conv -> bn -> relu)
                        hit = seen[id(t.units)] = (t.units, unique_sorted(index.group[t.units]).tolist())
                    gids.update(hit[1])
        gids.discard(-1)
        node.meta["fxprune.groups"] = sorted(gids)
        for g in node.meta["fxprune.groups"]:
            groups[g].nodes.append(node.name)


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
