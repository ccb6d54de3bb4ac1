"""Gating rewrite: a training GraphModule with one multiplicative gate per group channel.

Controller-based pruning (Auto-Train-Once, Wu et al., CVPR 2024) trains a network whose
channels are switched on and off by gates. fxprune derives the gates from its groups instead
of hand-placed ``virtual_gate`` layers: for every prunable group ``g`` and every node that
*produces* the group's channels (the node that links one of the group's producer slices,
role ``"out"``: a conv or linear whose weight rows are in ``g``, a norm whose affine
parameters are in ``g``, a ``get_attr`` of a parameter used functionally), the node's output
is multiplied, along the dimension that carries the channels, by ``gate[c]`` of each position's
channel ``c``.

Why this is exact. A producer node's output at channel ``c`` is linear and homogeneous in the
node's own producer slices at ``c`` (conv/linear: weight row and bias; a norm: ``x_hat * w + b``;
a ``get_attr``: the tensor itself). So multiplying that output by ``gate[c]`` equals scaling
those slices by ``gate[c]``; doing it at every producer node of the group equals scaling every
producer slice of the group, i.e. ``Program.zero_`` when ``gate[c] = 0`` and the plain model
when ``gate[c] = 1`` -- in train and eval mode alike (the batch statistics a norm sees are
those of the zeroed model). A module whose output does not carry all of its producer channels
(the heads of ``nn.MultiheadAttention`` live inside it) has those parameters gated instead:
the call becomes a ``torch.func.functional_call`` with ``param * gate`` swapped in.

The gated module shares every parameter, buffer and module with the program (no copies; the
program's module is left untouched). Gate values live outside the graph, in the
:class:`GateBank` submodule ``fxprune_gate`` that the graph calls once per forward pass
(``fxprune_gates = self.fxprune_gate()``); :meth:`GatedGraphModule.set_gates` sets them
(``None``: every gate is 1 and the gate layers return their input unchanged). A controller may
produce them with autograd: the loss of the gated model back-propagates into them.

Channel order: the flat channel space of ``fxprune.optim._groups.ChannelLayout`` (the
prunable groups in program order, each group's channels one after the other).
"""
from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxprune.errors import FxPruneError, describe_node

from .channels import TensorChannels
from .lookup import get_tensor

GATES_ATTR = "fxprune_gates"
GATE_MODULES = "fxprune_gate"
META_GATE = "fxprune.gate"


class GateBank(nn.Module):
    """Holds the current gate values (``values``: ``Tensor[C + 1]`` whose last entry is 1, or
    None) and the gate layers as children; calling it returns the values, so the graph reads
    them once per forward pass."""

    def __init__(self):
        super().__init__()
        self.values: Optional[torch.Tensor] = None

    def forward(self) -> Optional[torch.Tensor]:
        return self.values


class ChannelGate(nn.Module):
    """``x * gates[index]`` along dimension ``dim`` (``index[k]``: flat channel of position
    ``k``, or the sentinel ``C`` whose gate is always 1). ``gates is None``: the identity."""

    def __init__(self, index: torch.Tensor, dim: int):
        super().__init__()
        self.dim = int(dim)
        self.register_buffer("index", index.to(torch.long), persistent=False)

    def forward(self, x: torch.Tensor, gates: Optional[torch.Tensor]) -> torch.Tensor:
        if gates is None:
            return x
        g = gates.index_select(0, self.index).to(x.dtype)
        shape = [1] * x.dim()
        shape[self.dim] = g.numel()
        return x * g.view(shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, positions={self.index.numel()}"


class ParamGatedCall(nn.Module):
    """Calls ``inner`` with some parameters scaled along one dim by their channels' gates.

    ``specs``: ``(attribute path inside inner, dim, LongTensor index)`` per gated parameter
    dimension (index as in :class:`ChannelGate`). ``inner`` is the program's own module.
    """

    def __init__(self, inner: nn.Module, specs: Sequence[Tuple[str, int, torch.Tensor]]):
        super().__init__()
        self.inner = inner
        self.names = [s[0] for s in specs]
        self.dims = [int(s[1]) for s in specs]
        for i, (_, _, index) in enumerate(specs):
            self.register_buffer(f"index_{i}", index.to(torch.long), persistent=False)

    def forward(self, gates: Optional[torch.Tensor], *args, **kwargs):
        if gates is None:
            return self.inner(*args, **kwargs)
        params: Dict[str, torch.Tensor] = {}
        for i, (name, dim) in enumerate(zip(self.names, self.dims)):
            p = params.get(name)
            if p is None:
                p = self.inner.get_parameter(name)
            g = gates.index_select(0, getattr(self, f"index_{i}")).to(p.dtype)
            shape = [1] * p.dim()
            shape[dim] = g.numel()
            params[name] = p * g.view(shape)
        return torch.func.functional_call(self.inner, params, args, kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}[dim {d}]" for n, d in zip(self.names, self.dims))


@dataclass
class GatePoint:
    """Where a gate acts: the output of ``node`` along ``dim`` (``kind="output"``), or the
    parameters ``params`` of the module ``node`` calls (``kind="params"``)."""

    node: str
    kind: str
    dim: Optional[int]
    channels: np.ndarray  # flat channel ids gated here (unique, sorted)
    params: Tuple[str, ...] = ()
    module: str = ""  # qualified name of the gate module in the gated GraphModule


class GatedGraphModule(torch.fx.GraphModule):
    """A GraphModule with channel gates (see the module docstring). Attributes:

    ``num_channels`` (``C``), ``group_ids`` (the prunable group ids in flat order),
    ``group_offsets`` (first flat channel of each), ``group_sizes``, ``gate_points`` (list of :class:`GatePoint`).
    """

    num_channels: int
    group_ids: List[int]
    group_offsets: List[int]
    group_sizes: List[int]
    gate_points: List[GatePoint]

    @property
    def bank(self) -> GateBank:
        return getattr(self, GATE_MODULES)

    def set_gates(self, values: Any = None) -> None:
        """Set the gate values: ``None`` (every gate 1), a ``Tensor[C]`` in flat channel order
        (autograd flows through it), or ``{group id: keep-mask or values of length size}``
        (groups left out keep gates 1)."""
        if values is None:
            self.bank.values = None
            return
        v = gate_vector(values, self.num_channels, self.flat_from_groups)
        self.bank.values = torch.cat([v, v.new_ones(1)])

    @property
    def gates(self) -> Optional[torch.Tensor]:
        """The current gate values ``Tensor[C]`` (None when every gate is 1)."""
        g = self.bank.values
        return None if g is None else g[:-1]

    @contextlib.contextmanager
    def gated(self, values: Any):
        """Context manager: gates set to ``values`` inside, restored on exit."""
        old = self.bank.values
        self.set_gates(values)
        try:
            yield self
        finally:
            self.bank.values = old

    def flat_from_groups(self, values: Mapping[int, Any]) -> torch.Tensor:
        """``{group id: values}`` -> ``Tensor[C]`` (float, ones where a group is left out)."""
        dev = self.index_device()
        out = torch.ones(self.num_channels, dtype=torch.get_default_dtype(), device=dev)
        where = dict(zip(self.group_ids, self.group_offsets))
        sizes = dict(zip(self.group_ids, self.group_sizes))
        for gid, v in values.items():
            if gid not in where:
                raise FxPruneError(f"group {gid} is not a prunable group of this program")
            t = torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v).to(dev, out.dtype).reshape(-1)
            if t.numel() != sizes[gid]:
                raise FxPruneError(f"gate values for group {gid} have {t.numel()} entries, expected {sizes[gid]}")
            out[where[gid]:where[gid] + sizes[gid]] = t
        return out

    def index_device(self) -> torch.device:
        for b in self.buffers():
            return b.device
        return torch.device("cpu")


def gate_vector(values: Any, num_channels: int, flat_from_groups) -> torch.Tensor:
    """Gate values as a floating ``Tensor[num_channels]`` in flat channel order: ``values`` is
    one already (autograd flows through it) or ``{group id: values}``, which
    ``flat_from_groups`` flattens.

    Raises:
        fxprune.FxPruneError: the values have another shape.
    """
    if isinstance(values, Mapping):
        values = flat_from_groups(values)
    v = torch.as_tensor(values)
    if not v.is_floating_point():
        v = v.to(torch.get_default_dtype())
    if v.shape != (num_channels,):
        raise FxPruneError(f"gate values of shape {tuple(v.shape)}, expected ({num_channels},)")
    return v


def _flat_ids(ca, group_ids: Sequence[int], offsets: Sequence[int]) -> Tuple[np.ndarray, int]:
    """Flat channel id of every channel element (``C`` where its group is not gated)."""
    n_groups = len(ca.groups)
    off = np.full(n_groups + 1, -1, np.int64)
    for g, o in zip(group_ids, offsets):
        off[g] = o
    C = int(sum(ca.groups[g].size for g in group_ids))
    grp = ca.index.group
    o = off[np.where(grp >= 0, grp, n_groups)]
    flat = np.where(o >= 0, o + ca.index.channel, C)
    return flat.astype(np.int64), C


def _local_param_name(module: nn.Module, tensor: torch.Tensor) -> Optional[str]:
    for name, p in module.named_parameters(remove_duplicate=False):
        if p is tensor:
            return name
    return None


def insert_gates(source: Any) -> GatedGraphModule:
    """The gated training module of a program (``fxprune.Program`` or its analysed
    ``GraphModule``). Returns a :class:`GatedGraphModule` sharing the program's parameters."""
    from fxprune.optim._groups import ChannelLayout

    gm: torch.fx.GraphModule = source.module if hasattr(source, "analysis") else source
    ca = gm.meta.get("fxprune")
    if ca is None or not hasattr(ca, "index"):
        raise FxPruneError("insert_gates needs a GraphModule analysed by the fxprune pipeline (fxprune.compile)")
    layout = ChannelLayout(gm, ca.groups)
    group_ids = [g.id for g in layout.groups]
    flat, C = _flat_ids(ca, group_ids, layout.group_offsets)
    comp = ca.components
    an = ca.analysis

    # producer keys of every node: (param name, dim) with role "out" and gated channels
    producers: Dict[str, List[Tuple[str, int]]] = defaultdict(list)
    for key, info in an.params.items():
        if "out" not in info.roles:
            continue
        if not (flat[info.track.units] < C).any():
            continue
        for nname in info.nodes:
            producers[nname].append(key)

    graph = torch.fx.Graph()
    val_map: Dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map)
    old_out = next(n for n in gm.graph.nodes if n.op == "output")
    graph.output(out, type_expr=old_out.type)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    new_of = {old.name: new for old, new in val_map.items()}

    new = GatedGraphModule(gm, graph, class_name="GatedGraphModule")
    container = GateBank()
    new.add_module(GATE_MODULES, container)

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else None
    if anchor is not None:
        with graph.inserting_after(anchor):
            gates_node = graph.create_node("call_module", GATE_MODULES, (), {}, name=GATES_ATTR)
    else:
        with graph.inserting_before(next(iter(graph.nodes))):
            gates_node = graph.create_node("call_module", GATE_MODULES, (), {}, name=GATES_ATTR)

    points: List[GatePoint] = []
    used_names = set()

    def gate_name(base: str) -> str:
        name, k = base, 1
        while name in used_names:
            name, k = f"{base}_{k}", k + 1
        used_names.add(name)
        return name

    def gate_output(node: torch.fx.Node, base: str, dim: int, index: np.ndarray) -> torch.fx.Node:
        name = gate_name(base if dim == 1 else f"{base}_dim{dim}")
        container.add_module(name, ChannelGate(torch.from_numpy(index.copy()), dim))
        users = list(node.users)
        with graph.inserting_after(node):
            g = graph.call_module(f"{GATE_MODULES}.{name}", (node, gates_node))
        g.meta[META_GATE] = True
        for u in users:
            u.replace_input_with(node, g)
        points.append(GatePoint(base, "output", dim, np.unique(index[index < C]),
                                module=f"{GATE_MODULES}.{name}"))
        return g

    for old in list(gm.graph.nodes):
        keys = producers.get(old.name)
        if not keys:
            continue
        node = new_of[old.name]
        out_tc = an.channels.get(old.name)
        if old.op == "get_attr":
            if not isinstance(out_tc, TensorChannels):
                continue
            last = node
            for d, t in enumerate(out_tc.dims):
                if t is None or t.source is None or t.source not in keys:
                    continue
                index = flat[t.units]
                if (index < C).any():
                    last = gate_output(last, old.name, d, index)
            continue
        covered = np.zeros(C + 1, bool)
        if isinstance(out_tc, TensorChannels):
            comps = np.unique(np.concatenate([comp[an.params[k].track.units] for k in keys]))
            last = node
            for d, t in enumerate(out_tc.dims):
                if t is None:
                    continue
                index = flat[t.units]
                sel = (index < C) & np.isin(comp[t.units], comps)
                if not sel.any():
                    continue
                index = np.where(sel, index, C)
                covered[index] = True
                last = gate_output(last, old.name, d, index)
        covered[C] = True
        rest = [k for k in keys if not covered[flat[an.params[k].track.units]].all()]
        if not rest:
            continue
        if old.op != "call_module":
            raise FxPruneError(f"{describe_node(old)}: produces channels of a prunable group that its output "
                               f"does not carry, and is not a module call whose parameters could be gated")
        module = gm.get_submodule(old.target)
        specs = []
        for (pname, d) in rest:
            tensor = get_tensor(gm, pname)
            local = _local_param_name(module, tensor) if tensor is not None else None
            if local is None:
                raise FxPruneError(f"{describe_node(old)}: cannot find parameter {pname!r} inside module "
                                   f"{old.target!r} to gate it")
            specs.append((local, d, torch.from_numpy(flat[an.params[(pname, d)].track.units].copy())))
        name = gate_name(f"{old.name}_params")
        container.add_module(name, ParamGatedCall(module, specs))
        with graph.inserting_after(node):
            call = graph.call_module(f"{GATE_MODULES}.{name}", (gates_node,) + tuple(node.args), dict(node.kwargs))
        call.meta = dict(node.meta)
        call.meta[META_GATE] = True
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        chans = np.unique(np.concatenate([s[2].numpy() for s in specs]))
        points.append(GatePoint(old.name, "params", None, chans[chans < C], tuple(s[0] for s in specs),
                                module=f"{GATE_MODULES}.{name}"))

    graph.lint()
    new.recompile()
    new.num_channels = C
    new.group_ids = group_ids
    new.group_offsets = list(layout.group_offsets)
    new.group_sizes = [int(g.size) for g in layout.groups]
    new.gate_points = points
    new.training = gm.training  # the shared modules keep their own modes
    return new


class GatingPass(PassBase):
    """Pass form of :func:`insert_gates`: returns the gated GraphModule (the input is left
    untouched); ``PassResult.modified`` is True."""

    name = "gating"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        return PassResult(insert_gates(gm), True)


__all__ = ["ChannelGate", "GatePoint", "GatedGraphModule", "GatingPass", "ParamGatedCall", "insert_gates"]
