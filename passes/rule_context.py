"""What an op rule sees and may do while the channel-deps pass walks the graph.

A rule reads its node's arguments and their channel tracks, and answers with the channel
tracks of the node's output. On the way it may

* link parameter dimensions to channels (:meth:`RuleContext.param`), as producers
  (``"out"``: a conv's weight rows, a BatchNorm's affine parameters) or consumers (``"in"``:
  a conv's input columns, see :meth:`RuleContext.consume`);
* unify positions that must be removed together (:meth:`RuleContext.unify`);
* freeze channels (:meth:`RuleContext.pin`) or mark them inexact (:meth:`RuleContext.inexact`),
  always with a reason that names the node.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np
import torch
import torch.fx

from fxprune.errors import describe_node

from .channels import ANY, CONST, ZERO, ElementStore, TensorChannels, Track, untracked
from .lookup import Lookup

_MISSING = object()


@dataclass
class ParamInfo:
    """A parameter or buffer dimension linked to channels."""

    track: Track
    roles: Set[str] = field(default_factory=set)
    default_role: bool = False
    nodes: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class FoldSite:
    """A consumer whose constant inputs can be folded into its bias: a linear layer or an
    unpadded convolution reading channels through ``weight``'s dim ``in_dim``, with a bias.

    A removed input channel that still holds a data-independent constant ``c`` (a StarReLU's
    offset, ``sigmoid(0)``) adds ``sum(weight[o, channel, ...]) * c`` to output ``o`` at every
    position; the slim model adds it to ``bias`` instead (:mod:`fxprune.passes.bias_fold`).
    """

    node: str
    weight: str
    in_dim: int
    bias: Optional[str]  # None: a module without bias, which the slim model gives one
    channel_dim: int  # the consumer input's channel dim (-1 for linear, 1 or 0 for a conv)
    module: Optional[str] = None  # the consumer module (call_module nodes)


@dataclass
class Analysis:
    """Everything the channel-deps walk learns; stored on ``gm.meta["fxprune"]``."""

    store: ElementStore = field(default_factory=ElementStore)
    channels: Dict[str, Any] = field(default_factory=dict)  # node name -> TensorChannels / nested
    params: Dict[Tuple[str, int], ParamInfo] = field(default_factory=dict)
    pins: List[Tuple[np.ndarray, str]] = field(default_factory=list)
    inexact: List[Tuple[np.ndarray, str]] = field(default_factory=list)
    specs: Dict[str, str] = field(default_factory=dict)  # node name -> op spec name ("" if none)
    canonical: Dict[str, str] = field(default_factory=dict)  # tensor name -> first name of the same tensor
    sizes: Dict[str, Any] = field(default_factory=dict)  # node name -> the channel tracks its number counts
    const_origin: Dict[int, str] = field(default_factory=dict)  # element -> node that first made it non-zero
    folds: List[Tuple[FoldSite, np.ndarray]] = field(default_factory=list)  # (site, its input's units)


class RuleContext:
    """The interface between one node's rule and the analysis (see module docstring)."""

    def __init__(self, analysis: Analysis, gm: torch.fx.GraphModule, node: torch.fx.Node,
                 lookup: Optional[Lookup] = None):
        """``lookup``: a :class:`Lookup` of ``gm`` shared by the contexts of one walk (optional)."""
        self.analysis = analysis
        self.gm = gm
        self.node = node
        self.lookup = lookup if lookup is not None else Lookup(gm, index=False)
        self.module = self.lookup.module(node.target) if node.op == "call_module" else None
        self.touched: List[np.ndarray] = []  # elements the rule linked, froze or checked
        self._tensor_args: Optional[List[TensorChannels]] = None
        self._where: Optional[str] = None

    # ----------------------------------------------------------------- reading the node
    def arg(self, index: int, name: Optional[str] = None, default: Any = _MISSING) -> Any:
        """Positional argument ``index`` or keyword ``name`` of the node."""
        if index is not None and index < len(self.node.args):
            return self.node.args[index]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        if default is _MISSING:
            raise IndexError(f"{describe_node(self.node)} has no argument {name or index}")
        return default

    def ch(self, value: Any) -> Any:
        """Channel tracks of an argument (TensorChannels, nested for tuples, None otherwise)."""
        if isinstance(value, torch.fx.Node):
            return self.analysis.channels.get(value.name)
        if isinstance(value, (list, tuple)):
            return type(value)(self.ch(v) for v in value)
        return None

    def tensor_args(self) -> List[TensorChannels]:
        """Channel tracks of every tensor among the node's (flattened) arguments."""
        if self._tensor_args is None:  # inputs do not change while the node's rule runs
            self._tensor_args = []
            for v in (self.node.args, self.node.kwargs):
                _collect_tensors(v, self.analysis.channels, self._tensor_args)
        return list(self._tensor_args)

    @property
    def out_shape(self) -> Tuple[int, ...]:
        """Concrete shape of the node's (single tensor) output, from shape propagation."""
        meta = self.node.meta.get("tensor_meta")
        if isinstance(meta, (list, tuple)) and not hasattr(meta, "shape") and meta:
            meta = meta[0]  # ops returning (output, statistics...): the first is the output
        if meta is None or not hasattr(meta, "shape"):
            raise ValueError(f"{describe_node(self.node)} has no single-tensor shape")
        return tuple(int(s) for s in meta.shape)

    def out_untracked(self) -> Any:
        """An output with no channel tracks, shaped like the node's output."""
        return _untracked_like(self.node.meta.get("tensor_meta"))

    def where(self) -> str:
        """The node, its op and its source line, for reasons (worked out once per node)."""
        if self._where is None:
            self._where = describe_node(self.node)
        return self._where

    # ----------------------------------------------------------------- elements
    def fresh(self, n: int, state: int = ZERO) -> Track:
        return Track(self.analysis.store.fresh(n), np.full(n, state, np.int8))

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Unify element arrays position by position (``a`` broadcast to ``b``'s shape)."""
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.ndim != 1:
            a, b = (x.ravel() for x in np.broadcast_arrays(a, b))
        self.touched += [a, b]
        self.analysis.store.union(a, b)

    def unify(self, *tracks: Optional[Track], reason: str = "") -> None:
        """Unify tracks position by position; a missing track freezes the others."""
        present = [t for t in tracks if t is not None]
        if len(present) < len(tracks):
            for t in present:
                self.pin(t, reason or "combined with a dimension that carries no channels")
        for t in present[1:]:
            if len(t) != len(present[0]):
                raise ValueError(f"{self.where()}: cannot unify dims of size {len(present[0])} and {len(t)}")
            self.union(present[0].units, t.units)

    def pin(self, track: Optional[Track], reason: str) -> None:
        """Freeze the channels of ``track`` (they are never pruned)."""
        if track is not None and len(track):
            self.touched.append(track.units)
            self.analysis.pins.append((track.units.copy(), f"{reason} ({self.where()})"))

    def inexact(self, track: Optional[Track], reason: str) -> None:
        """Removing these channels would change the output (e.g. a softmax over them)."""
        if track is not None and len(track):
            self.touched.append(track.units)
            self.analysis.inexact.append((track.units.copy(), f"{reason} ({self.where()})"))

    def is_producer(self, track: Optional[Track]) -> bool:
        """``track`` is a parameter dimension linked as a producer (zeroed with its group). A
        parameter read by ``get_attr`` is a producer by default; this makes it one for good, so
        that a later consumer use adds a role instead of replacing it."""
        if track is None or track.source is None:
            return False
        info = self.analysis.params.get(track.source)
        if info is None or "out" not in info.roles:
            return False
        info.default_role = False
        return True

    def produce(self, track: Optional[Track]) -> None:
        """``track``, a parameter dimension read by ``get_attr``, is a producer for good: this node
        outputs its values as they are (an embedding table's columns), so the dimension is
        zeroed with its group even where another node reads the same tensor as a consumer (an
        output projection tied to the table), whichever of the two comes first."""
        if track is None or track.source is None:
            return
        info = self.analysis.params.get(track.source)
        if info is None:
            return
        if info.default_role:
            info.roles.clear()
            info.default_role = False
        info.roles.add("out")

    def not_channels(self, track: Optional[Track]) -> None:
        """A parameter dimension that holds no channels (a convolution kernel's taps, read as a
        ``get_attr`` tensor): it forms no group and is never sliced."""
        if track is None:
            return
        self.touched.append(track.units)
        if track.source is not None:
            info = self.analysis.params[track.source]
            if info.default_role:
                info.roles.clear()
                info.default_role = False
            info.roles.add("kernel")

    def pin_all(self, value: Any, reason: str) -> None:
        for tc in _flatten_tc(value):
            for t in tc.dims:
                self.pin(t, reason)

    def unknown(self, reason: str) -> Any:
        """Freeze every channel the node touches; its output carries no channels."""
        for tc in self.tensor_args():
            for t in tc.dims:
                self.pin(t, reason)
        return self.out_untracked()

    # ----------------------------------------------------------------- parameters
    def param(self, attr: str, dim: int, role: str, *, qualified: bool = False,
              like: Optional[Track] = None) -> Optional[Track]:
        """The track of dimension ``dim`` of a parameter or buffer, linked with ``role``.

        ``attr`` is an attribute of the node's module (``"weight"``) unless ``qualified``.
        ``like``: a track the rule unifies this dimension with position by position (a
        BatchNorm's input channels); a dimension seen for the first time then takes its
        elements instead of fresh ones, the same components with fewer elements and edges.
        Returns None if the module has no such tensor (``bias=False``).
        """
        name = attr if qualified else f"{self.node.target}.{attr}"
        tensor = self.lookup.tensor(name)
        if tensor is None:
            return None
        name = self.analysis.canonical.get(name, name)
        return self._link(name, tensor, dim, role, like=like)

    def _link(self, name: str, tensor: torch.Tensor, dim: int, role: str, default: bool = False,
              like: Optional[Track] = None) -> Track:
        key = (name, dim % tensor.dim())
        info = self.analysis.params.get(key)
        if info is None:
            n = tensor.shape[key[1]]
            state = ZERO if role == "out" else CONST
            units = like.units if like is not None and len(like) == n else self.analysis.store.fresh(n)
            info = ParamInfo(Track(units, np.full(n, state, np.int8), source=key))
            self.analysis.params[key] = info
        if default:
            if not info.roles:
                info.roles.add(role)
                info.default_role = True
        else:
            if info.default_role:
                info.roles.clear()
                info.default_role = False
            info.roles.add(role)
        if self.node.name not in info.nodes:
            info.nodes.append(self.node.name)
        return info.track

    def attr_channels(self, name: str, tensor: torch.Tensor) -> TensorChannels:
        """Tracks for a tensor read by ``get_attr``: every dim of size > 1 is linked.

        Parameters default to producers (zeroing them zeroes a product or a sum they join);
        a later consumer use (``F.linear(x, w)``) turns a dim into a consumer.
        """
        is_param = isinstance(tensor, torch.nn.Parameter)
        dims: List[Optional[Track]] = []
        for d, size in enumerate(tensor.shape):
            if size == 1:
                dims.append(None)
                continue
            t = self._link(name, tensor, d, "out" if is_param else "buffer", default=True)
            dims.append(Track(t.units, np.full(size, ZERO if is_param else CONST, np.int8), source=t.source))
        return TensorChannels(tuple(tensor.shape), dims)

    def fold_site(self, x: Optional[Track], w_in: Optional[Track], bias: Optional[Track],
                  channel_dim: int) -> Optional[FoldSite]:
        """The :class:`FoldSite` of this node, if input channels ``x`` hold a constant and its
        weight and bias are parameters read as they are, by this node only; else None."""
        module = self.node.target if self.node.op == "call_module" else None
        if x is None or not (x.state == CONST).any():
            return None
        if w_in is None or w_in.source is None or w_in.source[1] != 1:
            return None  # weights here are (out, in, *kernel): the input dim is 1
        if bias is None and (module is None or getattr(self.module, "bias", 0) is not None):
            return None  # only a module's missing bias can be created
        if bias is not None and bias.source is None:
            return None
        if not self._sole_reader():
            return None  # another op reads the same weights: their bias must stay as it is
        bias_name = bias.source[0] if bias is not None else None
        names = {w_in.source[0], bias_name} - {None}
        if any(self.analysis.canonical.get(alias) in names for alias in self.analysis.canonical
               if alias not in names):
            return None  # a shared tensor: folding into it would change its other users
        return FoldSite(self.node.name, w_in.source[0], w_in.source[1], bias_name, channel_dim, module)

    def _sole_reader(self) -> bool:
        """This node is the only reader of its weight and bias: a module called once, or
        ``get_attr`` weight and bias nodes (arguments 1 and 2) with no other user."""
        node = self.node
        if node.op == "call_module":
            return sum(n.op == "call_module" and n.target == node.target for n in node.graph.nodes) == 1
        args = [self.arg(i, name, None) for i, name in ((1, "weight"), (2, "bias"))]
        return all(a is None or (isinstance(a, torch.fx.Node) and a.op == "get_attr" and len(a.users) == 1)
                   for a in args)

    def consume(self, x: Optional[Track], w: Optional[Track], what: str = "",
                fold: Optional[FoldSite] = None) -> None:
        """``w`` (a weight dim) reads channels ``x``: unify them, mark ``w`` a consumer, and
        mark inexact every channel that does not reach it as exact zero (or, with a ``fold``
        site, as a constant that the slim model folds into the bias)."""
        if w is not None and w.source is not None:
            info = self.analysis.params[w.source]
            if info.default_role:
                info.roles.clear()
                info.default_role = False
            info.roles.add("in")
        if x is None or w is None:
            self.unify(x, w, reason="consumer of a dimension that carries no channels")
            return
        self.unify(x, w)
        self.require_zero(x, what or "a consumer's input channels", fold)

    def require_zero(self, x: Optional[Track], what: str, fold: Optional[FoldSite] = None) -> None:
        """Positions of ``x`` must be exactly zero when zeroed, or their channels are inexact;
        with a ``fold`` site a data-independent constant is accepted too (folded later)."""
        if x is None:
            return
        self.touched.append(x.units)
        bad = x.state != ZERO
        if fold is not None and (x.state == CONST).any():
            self.analysis.folds.append((fold, x.units.copy()))
            bad = x.state == ANY
        if bad.any():
            kind = "a non-zero constant" if (x.state[bad] == CONST).all() else "an unknown value"
            origins = sorted({self.analysis.const_origin[e] for e in x.units[bad].tolist()
                              if e in self.analysis.const_origin})
            made = f" made by {', '.join(origins[:2])}" if origins else ""
            self.inexact(x.take(bad), f"a zeroed channel still holds {kind}{made} where it reaches {what}")


def _collect_tensors(v: Any, channels: Dict[str, Any], out: List[TensorChannels]) -> None:
    """Append the channel tracks of every tensor in a node argument (nested lists, tuples and
    dicts; a node's tuple output contributes its tensors)."""
    if isinstance(v, torch.fx.Node):
        c = channels.get(v.name)
        if isinstance(c, TensorChannels):
            out.append(c)
        elif isinstance(c, (list, tuple)):
            out.extend(x for x in c if isinstance(x, TensorChannels))
    elif isinstance(v, (list, tuple)):
        for x in v:
            _collect_tensors(x, channels, out)
    elif isinstance(v, dict):
        for x in v.values():
            _collect_tensors(x, channels, out)


def _flatten_tc(value: Any) -> List[TensorChannels]:
    if isinstance(value, TensorChannels):
        return [value]
    if isinstance(value, (list, tuple)):
        return [tc for v in value for tc in _flatten_tc(v)]
    if isinstance(value, dict):
        return [tc for v in value.values() for tc in _flatten_tc(v)]
    return []


def _untracked_like(meta: Any) -> Any:
    if meta is None:
        return None
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return untracked(meta.shape)
    if isinstance(meta, (list, tuple)):
        return type(meta)(_untracked_like(m) for m in meta) if not hasattr(meta, "_fields") else tuple(
            _untracked_like(m) for m in meta)
    if isinstance(meta, dict):
        return {k: _untracked_like(v) for k, v in meta.items()}
    return None
