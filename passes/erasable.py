"""Erasable operators (OTOv3, Chen et al., arXiv 2312.09411, Sec. 3, "generalized zero-invariant
groups" and the dependency graph that keeps an erased network valid).

A *joint* is a node that combines several values so that one of them may go: an add (``a + b``,
``torch.add``, ``+=``; for ``a - b`` and ``torch.add(a, b, alpha=k)`` only ``b``) or a concat
(``torch.cat``) whose consumers can take a narrower input. The graph is cut into units at the
joints and at nodes with several users. For every value ``v`` whose consumers are all joints,
the unit of ``v`` is the set of nodes that reach the model's outputs only through ``v`` (the
nodes ``v`` post-dominates). On a chain this is the segment between two joints (the residual
branch ``f`` of ``x + f(x)``, one operator of a DARTS cell's sum, one branch of an Inception
block's concat); where a branch has joints of its own (an Inception branch that splits and
concatenates again), the unit holds them and the units inside it are its children.

A unit is reported as an :class:`fxprune.Erasable` when

* it owns trainable parameters, and no node outside it uses any of them;
* with all of them zero, ``v`` is exactly zero: checked by abstract interpretation with the
  op-semantics registry's zero states (the unit's inputs taken as unknown, its parameters as
  zero) and confirmed numerically on the example inputs;
* each concat it feeds can drop its columns: the channels ``v`` contributes belong to prunable,
  exact groups (the channel analysis knows every consumer slice they reach). The producer
  slices of those channels that lie outside the unit (e.g. the affine entries of the next
  layer's BatchNorm in a DenseNet) are zeroed with it (``Erasable.slices``), so that the
  dropped channels are exactly zero wherever they flow;
* erasing it alone leaves a valid network (:meth:`EraseGraph.plan`).

:class:`EraseGraph` answers, for any set of units, whether erasing them together leaves a valid
network and how to rewrite it: a joint whose inputs are all erased is erased too, an add left
with one input becomes that input, a concat drops the erased inputs' columns; any other node
that reads an erased value, or an input of the model that no longer reaches an output (graph
reachability through networkx), makes the set invalid.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import networkx as nx
import numpy as np
import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.utils.flop_counter import FlopCounterMode

from fxprune.errors import FxPruneError, describe_node
from fxprune.ir import Erasable, Slice

from .channels import ANY, ZERO, TensorChannels, Track
from .lookup import get_tensor
from .op_semantics import META_SPEC
from .rule_context import Analysis, RuleContext

META_ERASABLES = "fxprune.erasables"
META_REJECTED = "fxprune.erasables_rejected"
META_NODE_UNITS = "fxprune.erasable"
META_FLOPS = "fxprune.flops"

_aten = torch.ops.aten
_CAT_FNS = tuple(f for f in (torch.cat, torch.concat, getattr(torch, "concatenate", None), _aten.cat.default)
                 if f is not None)
_ADD_FNS = (operator.add, operator.iadd, torch.add, _aten.add.Tensor, _aten.add_.Tensor)
_SUB_FNS = (operator.sub, operator.isub, torch.sub, torch.subtract, _aten.sub.Tensor, _aten.sub_.Tensor)
_INPLACE_FNS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor)


# ============================================================================ joints


@dataclass(frozen=True)
class Joint:
    """A node that can lose an input: ``kind`` is ``"add"`` or ``"cat"``; ``operands`` the node
    names (or Python scalars) it combines; ``removable`` the operand positions that may go
    while another stays; ``dim`` the concat dimension."""

    kind: str
    operands: Tuple[Any, ...]
    removable: Tuple[int, ...]
    dim: int = 0


def joint_of(node: torch.fx.Node) -> Optional[Joint]:
    """The :class:`Joint` a node is, or None."""
    if node.op == "call_function" and node.target in _CAT_FNS:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        meta = node.meta.get("tensor_meta")
        if (not isinstance(tensors, (list, tuple)) or not tensors or "out" in node.kwargs or not isinstance(dim, int)
                or not all(isinstance(t, torch.fx.Node) for t in tensors) or not hasattr(meta, "shape")):
            return None
        ndim = len(meta.shape)
        return Joint("cat", tuple(t.name for t in tensors), tuple(range(len(tensors))), dim % max(ndim, 1))
    if node.op == "call_function":
        is_add, is_sub = node.target in _ADD_FNS, node.target in _SUB_FNS
        a = node.args[0] if node.args else node.kwargs.get("input")
    elif node.op == "call_method":
        is_add, is_sub = node.target in ("add", "add_"), node.target in ("sub", "sub_")
        a = node.args[0] if node.args else None
    else:
        return None
    if not (is_add or is_sub) or len(node.args) > 2 or "out" in node.kwargs:
        return None
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    alpha = node.kwargs.get("alpha", 1)
    if not isinstance(a, torch.fx.Node) and not isinstance(b, torch.fx.Node):
        return None
    if any(not isinstance(x, (torch.fx.Node, int, float)) for x in (a, b)) or not isinstance(alpha, (int, float)):
        return None
    removable = (0, 1) if (is_add and alpha == 1) else (1,)
    ops = tuple(x.name if isinstance(x, torch.fx.Node) else x for x in (a, b))
    return Joint("add", ops, removable)


def _mutated_input(node: torch.fx.Node, gm: torch.fx.GraphModule) -> Optional[str]:
    """Name of the input an in-place op writes to, or None."""
    first = node.args[0] if node.args else None
    if not isinstance(first, torch.fx.Node):
        return None
    if node.op == "call_module":
        inplace = bool(getattr(gm.get_submodule(node.target), "inplace", False))
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if isinstance(node.target, torch._ops.OpOverload):
            name = node.target._schema.name.split("::")[-1]
        inplace = (node.kwargs.get("inplace") is True or node.target in _INPLACE_FNS
                   or (name.endswith("_") and not name.endswith("__")))
    elif node.op == "call_method":
        inplace = node.target.endswith("_") and not node.target.endswith("__")
    else:
        inplace = False
    return first.name if inplace else None


# ============================================================================ the erase graph


@dataclass
class CatDrop:
    """What dropping one input of a concat removes: ``channels`` ``{group: channel indices}``,
    and the producer slices ``{param: (dim, positions)}`` that must all be zero for it to be
    exact; ``reason`` says why the input cannot be dropped (then the rest is empty)."""

    channels: Dict[int, np.ndarray] = field(default_factory=dict)
    producers: Dict[str, Tuple[int, np.ndarray]] = field(default_factory=dict)
    reason: Optional[str] = None


@dataclass
class ErasePlan:
    """How erasing a set of units rewrites the graph.

    Attributes:
        units: the erased units (the ones asked for and every unit they contain).
        valid: whether the erased network is valid; ``reason`` says why not.
        dead: nodes deleted because they are erased (units, and joints left without inputs).
        removed: ``dead`` plus the nodes left without users (computed only for valid plans).
        folds: ``{add node: operand node}``, each add left with one input becomes it.
        cats: ``{concat node: kept operand positions}``.
        drop: ``{group id: channel indices}`` removed downstream (the dropped concat columns).
        flops: FLOPs of the removed nodes on the example inputs.
    """

    units: Tuple[int, ...]
    valid: bool = True
    reason: Optional[str] = None
    dead: Set[str] = field(default_factory=set)
    removed: Set[str] = field(default_factory=set)
    folds: Dict[str, str] = field(default_factory=dict)
    cats: Dict[str, List[int]] = field(default_factory=dict)
    drop: Dict[int, np.ndarray] = field(default_factory=dict)
    flops: int = 0


class EraseGraph:
    """The data-flow graph of a traced model as far as erasing operators is concerned.

    Built from an analysed GraphModule (``gm.meta["fxprune"]`` from the channel-deps pass).
    ``graph`` is a ``networkx.DiGraph`` over node names. Units are registered with
    :meth:`set_units`; :meth:`plan` checks and plans the erasure of any set of them.
    """

    def __init__(self, gm: torch.fx.GraphModule, ca: Any):
        self.ca = ca
        self.order: List[str] = []
        self.op: Dict[str, str] = {}
        self.inputs: Dict[str, List[str]] = {}
        self.users: Dict[str, Set[str]] = {}
        self.joints: Dict[str, Joint] = {}
        self.shape: Dict[str, Optional[Tuple[Tuple[int, ...], Any]]] = {}
        self.mutates: Dict[str, str] = {}
        self.flops: Dict[str, int] = {}
        self.graph = nx.DiGraph()
        output = None
        for node in gm.graph.nodes:
            name = node.name
            self.order.append(name)
            self.op[name] = node.op
            ins = list(dict.fromkeys(n.name for n in node.all_input_nodes))
            self.inputs[name] = ins
            self.users[name] = {u.name for u in node.users}
            self.graph.add_node(name)
            self.graph.add_edges_from((i, name) for i in ins)
            meta = node.meta.get("tensor_meta")
            self.shape[name] = (tuple(meta.shape), meta.dtype) if hasattr(meta, "shape") else None
            j = joint_of(node)
            if j is not None:
                self.joints[name] = j
            m = _mutated_input(node, gm)
            if m is not None:
                self.mutates[name] = m
            if node.op == "output":
                output = name
        if output is None:
            raise FxPruneError("the graph has no output node")
        self.output = output
        self.outputs: Set[str] = set(self.inputs[output])
        self.placeholders = [n for n in self.order if self.op[n] == "placeholder"]
        self.reach: Dict[str, Set[str]] = {}
        for p in self.placeholders:
            got = (nx.descendants(self.graph, p) | {p}) & self.outputs
            if got:
                self.reach[p] = got
        self.useless = set(self.order) - nx.ancestors(self.graph, output) - {output} - set(self.placeholders)
        self.unit_sink: Dict[int, str] = {}
        self.units: Dict[int, FrozenSet[str]] = {}
        self.unit_params: Dict[int, FrozenSet[str]] = {}
        self.unit_extra: Dict[int, Dict[str, Tuple[int, np.ndarray]]] = {}
        self.children: Dict[int, Set[int]] = {}
        self._cat_drop: Dict[Tuple[str, int], CatDrop] = {}
        self._producers: Dict[Tuple[int, bytes], List[Tuple[str, int, np.ndarray]]] = {}

    # ----------------------------------------------------------------- units
    def set_units(self, units: Sequence[Tuple[str, Iterable[str], Iterable[str], Mapping[str, Tuple[int, np.ndarray]]]]
                  ) -> None:
        """Register the units, id ``k`` for ``units[k] = (sink, nodes, params, extra)``: ``params``
        the whole parameters it owns, ``extra`` ``{param: (dim, positions)}`` the producer slices
        outside it that are zeroed with it."""
        self.unit_sink = {k: u[0] for k, u in enumerate(units)}
        self.units = {k: frozenset(u[1]) for k, u in enumerate(units)}
        self.unit_params = {k: frozenset(u[2]) for k, u in enumerate(units)}
        self.unit_extra = {k: dict(u[3] or {}) for k, u in enumerate(units)}
        self.children = {k: set() for k in self.units}
        for u, sink in self.unit_sink.items():
            for w, nodes in self.units.items():
                if w != u and sink in nodes:
                    self.children[w].add(u)

    def closure(self, ids: Iterable[int]) -> Set[int]:
        """The units and every unit they contain."""
        out: Set[int] = set()
        for u in ids:
            out.add(u)
            out |= self.children.get(u, set())
        return out

    # ----------------------------------------------------------------- concat inputs
    def cat_drop(self, cat: str, i: int) -> CatDrop:
        """What dropping operand ``i`` of concat ``cat`` removes (cached)."""
        key = (cat, i)
        if key not in self._cat_drop:
            self._cat_drop[key] = self._compute_cat_drop(cat, i)
        return self._cat_drop[key]

    def _compute_cat_drop(self, cat: str, i: int) -> CatDrop:
        ca = self.ca
        j = self.joints[cat]
        src = j.operands[i]
        tc = ca.analysis.channels.get(src)
        if not isinstance(tc, TensorChannels) or j.dim >= tc.ndim:
            return CatDrop(reason=f"the input {src} of concat {cat} carries no channel information")
        t = tc.dims[j.dim]
        if t is None:
            return CatDrop(reason=f"the columns {src} gives concat {cat} carry no channels")
        gids = ca.index.group[t.units]
        chans = ca.index.channel[t.units]
        if (gids < 0).any():
            return CatDrop(reason=f"some columns {src} gives concat {cat} belong to no group")
        channels: Dict[int, np.ndarray] = {}
        for g in np.unique(gids).tolist():
            grp = ca.groups[g]
            if not grp.prunable or not grp.exact:
                why = grp.reason or ("inexact" if not grp.exact else "frozen")
                return CatDrop(reason=f"the channels {src} gives concat {cat} cannot be removed downstream "
                                      f"(group {g}: {why})")
            channels[g] = np.unique(chans[gids == g])
        # the same channels must not also arrive through another input of the concat
        mine = gids * (ca.index.channel.max() + 1) + chans
        others = self._cat_codes(cat, exclude=src)
        if len(others) and np.isin(mine, others).any():
            return CatDrop(reason=f"concat {cat} receives the channels of {src} through another input too")
        producers: Dict[str, Tuple[int, np.ndarray]] = {}
        for g, ch in channels.items():
            for param, dim, pos in self._group_producers(g, ch):
                if param in producers:
                    old_dim, old = producers[param]
                    if old_dim != dim:
                        return CatDrop(reason=f"parameter {param} produces the channels of {src} along two dims")
                    pos = np.union1d(old, pos)
                producers[param] = (dim, pos)
        return CatDrop(channels, producers)

    def _group_producers(self, g: int, ch: np.ndarray) -> List[Tuple[str, int, np.ndarray]]:
        """``(param, dim, positions)`` of the producer slices of channels ``ch`` of group ``g`` (cached)."""
        key = (g, ch.tobytes())
        hit = self._producers.get(key)
        if hit is None:
            hit = []
            full = len(ch) == self.ca.groups[g].size
            for s in self.ca.groups[g].slices:
                idx = s.index.numpy()
                pos = idx if full else idx[np.isin(s.channel.numpy(), ch)]
                if len(pos):
                    hit.append((s.param, s.dim, np.unique(pos)))
            self._producers[key] = hit
        return hit

    def _cat_codes(self, cat: str, exclude: str) -> np.ndarray:
        """Group-channel codes of the concat's columns that do not come from ``exclude``."""
        ca = self.ca
        j = self.joints[cat]
        width = ca.index.channel.max() + 1
        parts = []
        for other in j.operands:
            if other == exclude:
                continue
            otc = ca.analysis.channels.get(other)
            ot = otc.dims[j.dim] if isinstance(otc, TensorChannels) and j.dim < otc.ndim else None
            if ot is not None:
                g = ca.index.group[ot.units]
                parts.append((g * width + ca.index.channel[ot.units])[g >= 0])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    # ----------------------------------------------------------------- planning
    def plan(self, ids: Iterable[int]) -> ErasePlan:
        """Check and plan erasing the units ``ids`` (and every unit they contain) together."""
        units = self.closure(ids)
        plan = ErasePlan(tuple(sorted(units)))
        dead = plan.dead
        whole: Set[str] = set()
        extra: Dict[str, Tuple[int, np.ndarray]] = {}
        for u in units:
            dead |= self.units[u]
            whole |= self.unit_params[u]
            for p, (dim, pos) in self.unit_extra[u].items():
                if p in extra and extra[p][0] == dim:
                    pos = np.union1d(extra[p][1], pos)
                extra[p] = (dim, pos)
        drop: Dict[int, Set[int]] = defaultdict(set)

        def fail(why: str) -> ErasePlan:
            plan.valid, plan.reason = False, why
            return plan

        for name in self.order:
            if name in dead:
                continue
            hit = [m for m in self.inputs[name] if m in dead]
            if not hit:
                continue
            if name in self.useless:  # computed but never used: goes with what it reads
                dead.add(name)
                continue
            j = self.joints.get(name)
            if j is None:
                if name == self.output:
                    return fail(f"the model output {hit[0]} would be erased")
                return fail(f"{name} reads {hit[0]}, which would be erased")
            node_ops = [(i, o) for i, o in enumerate(j.operands) if isinstance(o, str)]
            dead_i = [i for i, o in node_ops if o in dead]
            live_i = [i for i, o in node_ops if o not in dead]
            if j.kind == "add":
                scalars = [o for o in j.operands if not isinstance(o, str)]
                if not live_i:
                    if any(s != 0 for s in scalars):
                        return fail(f"{name} would be left with a constant")
                    dead.add(name)
                    continue
                if any(i not in j.removable for i in dead_i):
                    return fail(f"{name} cannot drop its operand {j.operands[dead_i[0]]}")
                if scalars:
                    return fail(f"{name} would be left with a scalar operand")
                keep = j.operands[live_i[0]]
                if self.shape.get(keep) != self.shape.get(name):
                    return fail(f"{name} would change shape without {j.operands[dead_i[0]]} (broadcast)")
                plan.folds[name] = keep
            else:
                if not live_i:
                    dead.add(name)
                    continue
                for i in dead_i:
                    cd = self.cat_drop(name, i)
                    if cd.reason is not None:
                        return fail(cd.reason)
                    for p, (dim, pos) in cd.producers.items():
                        if p in whole:
                            continue
                        have = extra.get(p)
                        if have is None or have[0] != dim or not np.isin(pos, have[1]).all():
                            return fail(f"concat {name} cannot drop {j.operands[i]}: its channels are not zero in {p}")
                    for g, ch in cd.channels.items():
                        drop[g].update(ch.tolist())
                plan.cats[name] = live_i
        # every input of the model must still reach every output it reached
        live = self.graph.subgraph([n for n in self.order if n not in dead])
        for p, outs in self.reach.items():
            got = nx.descendants(live, p) | {p}
            lost = outs - got
            if lost:
                return fail(f"input {p} would no longer reach output {sorted(lost)[0]}")
        plan.drop = {g: np.asarray(sorted(ch), np.int64) for g, ch in drop.items()}
        plan.removed = self._unused(dead, set(plan.folds) | set(plan.cats))
        plan.flops = int(sum(self.flops.get(n, 0) for n in plan.removed))
        return plan

    def _unused(self, dead: Set[str], rewired: Set[str]) -> Set[str]:
        """``dead`` plus every node whose users would all be gone."""
        removed = set(dead)
        changed = True
        while changed:
            changed = False
            for n in reversed(self.order):
                if n in removed or n in rewired or self.op[n] in ("placeholder", "output"):
                    continue
                us = self.users[n]
                if not us or not us <= removed:
                    continue
                m = self.mutates.get(n)
                if m is not None and not (self.users[m] - {n}) <= removed:
                    continue  # writes to a value that is still read
                removed.add(n)
                changed = True
        return removed

    def is_valid(self, ids: Iterable[int]) -> bool:
        return self.plan(ids).valid


# ============================================================================ the pass


def _fresh_any(value: Any, an: Analysis) -> Any:
    """The channel tracks of a unit's input: same structure, fresh elements, every position ANY."""
    if isinstance(value, TensorChannels):
        dims = [None if t is None else Track(an.store.fresh(len(t)), np.full(len(t), ANY, np.int8)) for t in value.dims]
        return TensorChannels(value.shape, dims)
    if isinstance(value, (list, tuple)):
        return type(value)(_fresh_any(v, an) for v in value) if not hasattr(value, "_fields") else tuple(
            _fresh_any(v, an) for v in value)
    if isinstance(value, dict):
        return {k: _fresh_any(v, an) for k, v in value.items()}
    return value


def _abstract_zero(gm: torch.fx.GraphModule, ca: Any, nodes: Sequence[torch.fx.Node], sink: str) -> Optional[str]:
    """None if the unit's sink is exactly zero when its parameters are, else the reason.

    Runs the registry's rules over the unit alone: its inputs carry unknown values (ANY), its
    parameters are the only producers, so a ZERO state at the sink means zero whatever flows in.
    """
    an = Analysis()
    an.canonical = ca.analysis.canonical
    inside = {n.name for n in nodes}
    for node in nodes:
        for inp in node.all_input_nodes:
            if inp.name not in inside and inp.name not in an.channels:
                an.channels[inp.name] = _fresh_any(ca.analysis.channels.get(inp.name), an)
        ctx = RuleContext(an, gm, node)
        if node.op == "get_attr":
            tensor = get_tensor(gm, node.target)
            out = ctx.attr_channels(an.canonical.get(node.target, node.target), tensor) if tensor is not None else None
        else:
            spec = node.meta.get(META_SPEC)
            if spec is None:
                return f"{describe_node(node)} has no channel semantics"
            try:
                out = spec.rule(ctx)
            except Exception as exc:  # a rule that cannot follow this use: not provably zero
                return f"the rule of {describe_node(node)} cannot follow it ({type(exc).__name__}: {exc})"
        an.channels[node.name] = out
    tc = an.channels.get(sink)
    if isinstance(tc, TensorChannels) and any(t is not None and len(t) and (t.state == ZERO).all() for t in tc.dims):
        return None
    return f"{sink} is not provably zero when the unit's parameters are (no dimension is ZERO throughout)"


class _Probe(torch.fx.Interpreter):
    """Runs the graph once: FLOPs of every node, and the values of chosen nodes."""

    def __init__(self, gm: torch.fx.GraphModule, keep: Set[str]):
        super().__init__(gm)
        self.keep = keep
        self.flops: Dict[str, int] = {}
        self.values: Dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op in ("call_module", "call_function", "call_method"):
            with FlopCounterMode(display=False) as fc:
                out = super().run_node(n)
            self.flops[n.name] = int(fc.get_total_flops())
        else:
            out = super().run_node(n)
        if n.name in self.keep:
            self.values[n.name] = out
        return out


def _eval(gm: torch.nn.Module) -> List[Tuple[torch.nn.Module, bool]]:
    """Put every module in eval mode; returns what :func:`_restore` needs to undo it."""
    modes = [(m, m.training) for m in gm.modules()]
    for m, _ in modes:
        m.training = False
    return modes


def _restore(modes: List[Tuple[torch.nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


def _zeros(t: torch.Tensor) -> torch.Tensor:
    """A zero tensor shaped like ``t`` that allocates nothing (a broadcast view)."""
    return torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)


def _numeric_zero(gm: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node], sink: str,
                  values: Mapping[str, Any]) -> bool:
    """Run the unit alone with zero parameters on the recorded inputs: is its sink all zero?"""
    env: Dict[str, Any] = {}

    def load(n: torch.fx.Node) -> Any:
        return env[n.name] if n.name in env else values[n.name]

    for node in nodes:
        args = torch.fx.node.map_arg(node.args, load)
        kwargs = torch.fx.node.map_arg(node.kwargs, load)
        if node.op == "get_attr":
            val = get_tensor(gm, node.target)
            if val is None:
                val = gm
                for part in node.target.split("."):
                    val = getattr(val, part)
            elif isinstance(val, torch.nn.Parameter):
                val = _zeros(val)
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            state = {k: _zeros(p) for k, p in mod.named_parameters()}
            state.update({k: b.clone() for k, b in mod.named_buffers()})
            val = torch.func.functional_call(mod, state, tuple(args), kwargs)
        elif node.op == "call_function":
            val = node.target(*args, **kwargs)
        else:
            self_obj, *rest = args
            val = getattr(self_obj, node.target)(*rest, **kwargs)
        env[node.name] = val
    out = env[sink]
    return isinstance(out, torch.Tensor) and bool((out == 0).all())


class ErasablePass(PassBase):
    """Find the erasable operators (see the module docstring).

    Writes ``gm.meta["fxprune.erasables"]`` (a list of :class:`fxprune.Erasable`),
    ``gm.meta["fxprune.erasables_rejected"]`` (``{sink node: reason}`` for the candidates that
    failed a check), ``node.meta["fxprune.erasable"]`` (ids of the units holding the node),
    ``node.meta["fxprune.flops"]``, and the :class:`EraseGraph` as ``gm.meta["fxprune"].erase_graph``.
    Needs the channel-deps pass; ``example_inputs`` give the FLOPs and the numeric check.
    """

    name = "erasable"

    def __init__(self, example_inputs: Sequence):
        super().__init__()
        self.example_inputs = tuple(example_inputs)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        ca = gm.meta.get("fxprune")
        if ca is None:
            raise FxPruneError("the erasable pass needs the channel-deps pass to run first")
        eg = EraseGraph(gm, ca)
        by_name = {n.name: n for n in gm.graph.nodes}
        canon = ca.analysis.canonical

        # parameters each node uses (tied tensors compared by identity)
        node_params: Dict[str, List[Tuple[str, torch.Tensor]]] = {}
        users_of: Dict[int, Set[str]] = defaultdict(set)
        for node in gm.graph.nodes:
            ps: List[Tuple[str, torch.Tensor]] = []
            if node.op == "call_module":
                for pname, p in gm.get_submodule(node.target).named_parameters():
                    full = f"{node.target}.{pname}"
                    ps.append((canon.get(full, full), p))
            elif node.op == "get_attr":
                t = get_tensor(gm, node.target)
                if isinstance(t, torch.nn.Parameter):
                    ps.append((canon.get(node.target, node.target), t))
            node_params[node.name] = ps
            for _, p in ps:
                users_of[id(p)].add(node.name)

        # post-dominator tree (dominators of the reversed graph, rooted at the output)
        ipdom = nx.immediate_dominators(eg.graph.reverse(copy=False), eg.output)
        kids: Dict[str, List[str]] = defaultdict(list)
        for n, d in ipdom.items():
            if n != d:
                kids[d].append(n)
        position = {n: i for i, n in enumerate(eg.order)}

        def region(v: str) -> List[str]:
            out, stack = [], [v]
            while stack:
                n = stack.pop()
                out.append(n)
                stack.extend(kids.get(n, ()))
            return sorted(out, key=position.__getitem__)

        rejected: Dict[str, str] = {}
        cands: List[dict] = []
        for v in eg.order:
            node = by_name[v]
            if node.op not in ("call_module", "call_function", "call_method") or v not in ipdom or not node.users:
                continue
            if eg.shape.get(v) is None or any(u.name not in eg.joints for u in node.users):
                continue
            nodes = region(v)
            params: Dict[str, torch.Tensor] = {}
            for n in nodes:
                params.update(node_params[n])
            if not any(p.requires_grad for p in params.values()):
                continue
            why = self._check(gm, ca, eg, by_name, nodes, v, params, users_of)
            if why is not None:
                rejected[v] = why
                continue
            cands.append(dict(sink=v, nodes=nodes, params=params))

        # concat consumers: the columns it feeds must go, with their producer slices
        for c in cands:
            extra: Dict[str, Tuple[int, np.ndarray]] = {}
            channels: Dict[int, set] = defaultdict(set)
            kinds = set()
            for u in by_name[c["sink"]].users:
                j = eg.joints[u.name]
                kinds.add("sum" if j.kind == "add" else "concat")
                if j.kind != "cat":
                    continue
                for i, o in enumerate(j.operands):
                    if o != c["sink"]:
                        continue
                    cd = eg.cat_drop(u.name, i)
                    if cd.reason is not None:
                        c["reason"] = cd.reason
                        break
                    for g, ch in cd.channels.items():
                        channels[g].update(ch.tolist())
                    for p, (dim, pos) in cd.producers.items():
                        if p in c["params"]:
                            continue
                        if p in extra:
                            if extra[p][0] != dim:
                                c["reason"] = f"parameter {p} produces its channels along two dims"
                                break
                            pos = np.union1d(extra[p][1], pos)
                        extra[p] = (dim, pos)
            c["extra"] = extra
            c["channels"] = {g: np.asarray(sorted(ch), np.int64) for g, ch in channels.items()}
            c["kind"] = "+".join(k for k in ("sum", "concat") if k in kinds)
        for c in cands:
            if "reason" in c:
                rejected[c["sink"]] = c["reason"]
        cands = [c for c in cands if "reason" not in c]

        # FLOPs of every node, and the values the numeric check reads
        need = set()
        for c in cands:
            inside = set(c["nodes"])
            for n in c["nodes"]:
                need.update(i for i in eg.inputs[n] if i not in inside)
        flops, values = self._probe(gm, need)
        eg.flops = flops
        modes = _eval(gm)
        try:
            with torch.no_grad():
                ok = []
                for c in cands:
                    try:
                        zero = _numeric_zero(gm, [by_name[n] for n in c["nodes"]], c["sink"], values)
                    except Exception as exc:
                        rejected[c["sink"]] = (f"running it alone with zero parameters failed: "
                                               f"{type(exc).__name__}: {exc}")
                        continue
                    if not zero:
                        rejected[c["sink"]] = "its output is not zero on the example inputs when its parameters are"
                        continue
                    ok.append(c)
        finally:
            _restore(modes)
        cands = ok
        del values

        # erasing each alone must leave a valid network
        eg.set_units([(c["sink"], c["nodes"], c["params"], c["extra"]) for c in cands])
        keep = []
        for k, c in enumerate(cands):
            p = eg.plan([k])
            if p.valid:
                keep.append(c)
            else:
                rejected[c["sink"]] = p.reason
        # a unit that only gathers the units inside it (a partial sum of branches) is no operator
        eg.set_units([(c["sink"], c["nodes"], c["params"], c["extra"]) for c in keep])
        own = []
        for k, c in enumerate(keep):
            inner = set()
            for w in eg.children[k]:
                inner |= eg.unit_params[w]
            if set(c["params"]) <= inner:
                rejected[c["sink"]] = "it owns no parameters beyond the erasable operators it contains"
            else:
                own.append(c)
        keep = own
        eg.set_units([(c["sink"], c["nodes"], c["params"], c["extra"]) for c in keep])

        erasables = self._build(gm, eg, keep, flops, by_name)
        for node in gm.graph.nodes:
            node.meta[META_FLOPS] = flops.get(node.name, 0)
            node.meta[META_NODE_UNITS] = []
        for e in erasables:
            for n in e.nodes:
                by_name[n].meta[META_NODE_UNITS].append(e.id)
        ca.erase_graph = eg
        gm.meta[META_ERASABLES] = erasables
        gm.meta[META_REJECTED] = rejected
        return PassResult(gm, False)

    # ----------------------------------------------------------------- checks
    @staticmethod
    def _check(gm, ca, eg: EraseGraph, by_name, nodes: List[str], sink: str, params: Dict[str, torch.Tensor],
               users_of: Mapping[int, Set[str]]) -> Optional[str]:
        inside = set(nodes)
        for n in nodes:
            if eg.op[n] == "placeholder":
                return f"it holds the model input {n}"
            m = eg.mutates.get(n)
            if m is not None and m not in inside:
                return f"{n} writes in place to {m}, which is computed outside it"
        for name, p in params.items():
            outside = users_of[id(p)] - inside
            if outside:
                return f"parameter {name} is also used by {sorted(outside)[0]}"
        return _abstract_zero(gm, ca, [by_name[n] for n in nodes], sink)

    def _probe(self, gm: torch.fx.GraphModule, keep: Set[str]) -> Tuple[Dict[str, int], Dict[str, Any]]:
        modes = _eval(gm)
        try:
            with torch.no_grad():
                probe = _Probe(gm, keep)
                probe.run(*self.example_inputs)
        finally:
            _restore(modes)
        return probe.flops, probe.values

    @staticmethod
    def _build(gm, eg: EraseGraph, cands: List[dict], flops: Mapping[str, int], by_name) -> List[Erasable]:
        sink_unit = {c["sink"]: k for k, c in enumerate(cands)}
        memo: Dict[str, Set[int]] = {}

        def support(m: str) -> Set[int]:
            """Units whose joint erasure removes the value ``m``."""
            if m in memo:
                return memo[m]
            memo[m] = set()
            if m in sink_unit:
                out = {sink_unit[m]}
            else:
                j = eg.joints.get(m)
                out = set()
                if j is not None and not any(not isinstance(o, str) and o != 0 for o in j.operands):
                    subs = [support(o) for o in j.operands if isinstance(o, str)]
                    if subs and all(subs):
                        out = set().union(*subs)
            memo[m] = out
            return out

        erasables = []
        for k, c in enumerate(cands):
            inside = eg.units[k]
            parents = {w for w, ch in eg.children.items() if k in ch}
            for n in c["nodes"]:
                if n in eg.joints:
                    continue
                for m in eg.inputs[n]:
                    if m not in inside:
                        parents |= support(m)
            parents -= eg.children[k] | {k}
            slices = [Slice(param=p, dim=dim, index=torch.from_numpy(np.asarray(pos, np.int64)),
                            channel=torch.zeros(len(pos), dtype=torch.long), role="out")
                      for p, (dim, pos) in sorted(c["extra"].items())]
            num = sum(int(p.numel()) for p in c["params"].values())
            for s in slices:
                t = get_tensor(gm, s.param)
                num += len(s.index) * (t.numel() // max(1, t.shape[s.dim]) if t is not None else 1)
            erasables.append(Erasable(
                id=k, nodes=list(c["nodes"]), params=sorted(c["params"]), parents=sorted(parents),
                flops=int(sum(flops.get(n, 0) for n in c["nodes"])), num_params=num, sink=c["sink"],
                joints=sorted({u.name for u in by_name[c["sink"]].users}), slices=slices, channels=c["channels"],
                children=sorted(eg.children[k]), kind=c["kind"]))
        return erasables


def erase_graph(gm: torch.fx.GraphModule) -> EraseGraph:
    """The :class:`EraseGraph` the erasable pass left on an analysed GraphModule."""
    ca = gm.meta.get("fxprune")
    eg = getattr(ca, "erase_graph", None)
    if eg is None:
        raise FxPruneError("this GraphModule was not analysed for erasable operators: compile with mode='erase'")
    return eg


__all__ = ["CatDrop", "ErasablePass", "EraseGraph", "ErasePlan", "Joint", "META_ERASABLES", "META_FLOPS",
           "META_NODE_UNITS", "META_REJECTED", "erase_graph", "joint_of"]
