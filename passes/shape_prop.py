"""Shape propagation: shapes and dtypes on every node (``node.meta["tensor_meta"]``), without
computing on the example inputs' data.

The metadata has the form of :class:`torch.fx.passes.shape_prop.ShapeProp`'s (``tensor_meta``:
a ``TensorMetadata`` or a nested tuple/list/dict of them, present when the node's value holds a
tensor; ``type``: the value's Python type), as an eval-mode, no-autograd run on the example
inputs would record it, but no convolution, matmul or activation is computed:

* the example inputs enter as meta tensors of the same shapes, strides and dtypes;
* each op's output metadata comes from a rule of :mod:`fxprune.passes.shape_rules` (the
  common layers and pointwise ops: their sizes follow from the module's attributes and the
  inputs' shapes), or from running the op on meta tensors (torch's meta kernels; a module with
  parameters runs on meta copies of them through ``torch.func.functional_call``);
* nodes whose inputs hold no meta tensor run on real values: arithmetic on sizes, and what
  is computed from parameters, buffers and constants alone (a relative-position index, a
  gathered bias table), so those values are the model's own;
* a node whose meta run fails (its output shape depends on values: ``nonzero``, a boolean
  mask, ``unique``, ``.item()``) runs on real tensors. Its inputs are then computed for real
  from the example inputs: the nodes it depends on, or, when an op before it may write into
  a tensor in place, every node before it, in graph order. Its real output flows on, so later
  value-dependent nodes see the model's own values.

The cost thus no longer grows with the input's spatial size or batch. Shapes, dtypes,
``requires_grad``, the structure of tuple outputs and the Python types are those of the eager
run. Strides and memory formats are exact for every op a rule covers (they follow ATen's CPU
kernels, see :mod:`fxprune.passes.shape_rules`); for other ops they are those of torch's meta
kernels, which can differ from an eager CPU run where the CPU picks a kernel by device (e.g.
``nn.MultiheadAttention``'s fused inference path, ``scaled_dot_product_attention`` on
transposed inputs). No fxprune pass reads strides. Python code inside a module without a
rule sees meta tensors (``x.device`` is ``meta`` there); at graph level, ``x.device`` and
moves to the example inputs' device are answered as the eager run would.

:class:`RecordShapes`, the real-tensor interpreter, serves as fallback and under an active
fake mode (tracing by ``torch.compile``).
"""
from __future__ import annotations

import operator
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch.fx.node import map_aggregate, map_arg
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata, _extract_tensor_metadata
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from fxprune.errors import UnsupportedInputError

from .lookup import Lookup
from .modes import eval_mode
from .shape_rules import META, function_rule, method_rule, module_rule

TENSOR_META = "tensor_meta"


class Describer:
    """``ShapeProp``'s metadata of tensors; for a dense, non-quantized tensor it depends on its
    shape, strides, dtype and ``requires_grad`` only, and is computed once per layout
    (working out a layout's memory format costs more than running a small layer)."""

    def __init__(self):
        self._layouts: Dict[Tuple, TensorMetadata] = {}

    def __call__(self, t: torch.Tensor) -> TensorMetadata:
        if t.layout != torch.strided or t.is_quantized:
            return _extract_tensor_metadata(t)
        key = (t.shape, t.stride(), t.dtype, t.requires_grad)
        meta = self._layouts.get(key)
        if meta is None:
            meta = self._layouts[key] = _extract_tensor_metadata(t)
        return meta

    def record(self, n: torch.fx.Node, result: Any) -> None:
        if type(result) is torch.Tensor:  # the usual case, without map_aggregate
            n.meta[TENSOR_META] = self(result)
            n.meta["type"] = torch.Tensor
            return
        found_tensor = False

        def describe(obj: Any) -> Any:
            nonlocal found_tensor
            if isinstance(obj, torch.Tensor):
                found_tensor = True
                return self(obj)
            return obj

        meta = map_aggregate(result, describe)
        if found_tensor:
            n.meta[TENSOR_META] = meta
        n.meta["type"] = type(result)


class RecordShapes(torch.fx.Interpreter):
    """Runs the graph on real tensors and records what :class:`ShapeProp` records on each node."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self._attrs: Dict[str, Any] = {}
        self._describe = Describer()

    def fetch_attr(self, target: str) -> Any:
        """The submodule or tensor at ``target``, looked up once per run (a module path is
        resolved attribute by attribute, which costs more than a small layer's forward)."""
        if target not in self._attrs:
            self._attrs[target] = super().fetch_attr(target)
        return self._attrs[target]

    def fetch_args_kwargs_from_env(self, n: torch.fx.Node):
        """The node's arguments, with torch.fx's immutable lists and dicts as plain ones: the
        generated code passes plain ones, and a wrapped function may edit its argument in place
        (torchvision's 3-D Swin does)."""
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        if n.op == "call_function":
            args, kwargs = _mutable(args), _mutable(kwargs)
        return args, kwargs

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        self._describe.record(n, result)
        return result


# --------------------------------------------------------------------------------------------
# metadata propagation


class NeedsValues(Exception):
    """The op cannot run on meta tensors here."""


class MetaShapes:
    """Runs ``gm`` on meta tensors (see the module docstring) and records the metadata.

    After :meth:`run`, ``real_nodes`` names the nodes that had to run on real values."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: Sequence):
        self.gm = gm
        self.inputs = tuple(example_inputs)
        self.nodes: List[torch.fx.Node] = list(gm.graph.nodes)
        self.lookup = Lookup(gm)
        self.describe = Describer()
        self.env: Dict[torch.fx.Node, Any] = {}
        self.real: Dict[torch.fx.Node, Any] = {}  # real values: inputs, attributes, nodes run for real
        self.abstract: Set[torch.fx.Node] = set()  # nodes whose value holds a meta tensor
        self._meta_copies: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # id(real) -> (real, meta copy)
        self.home = _home_device(self.lookup, self.inputs)
        self.mode = MetaMode(self)
        self.real_nodes: List[str] = []

    # ------------------------------------------------------------------ the walk
    def run(self) -> Any:
        """Record every node's metadata; returns the graph's output (meta tensors where the
        values were not needed)."""
        args_iter = iter(self.inputs)
        result = None
        env, abstract, record = self.env, self.abstract, self.describe.record
        for node in self.nodes:
            op = node.op
            if op == "placeholder":
                real = self.real[node] = _placeholder(node, args_iter)
                value = self._to_meta(real)
                if value is not real:
                    abstract.add(node)
                env[node] = value
                record(node, value)
                node.meta["type"] = type(real)
                continue
            if op == "get_attr":
                value = self.real[node] = self.lookup_attr(node.target)
            elif op == "output":
                value = result = map_arg(node.args[0], env.__getitem__)
            else:
                args = map_arg(node.args, env.__getitem__)
                kwargs = map_arg(node.kwargs, env.__getitem__)
                if any(a in abstract for a in node.all_input_nodes):
                    value = self._abstract(node, args, kwargs)
                else:
                    value = self.real[node] = self._call(node, args, kwargs)
            if _holds_meta(value):
                abstract.add(node)
            env[node] = value
            record(node, value)
        return result

    def lookup_attr(self, target: str) -> Any:
        tensor = self.lookup.tensor(target)
        if tensor is not None:
            return tensor
        obj = self.gm
        for atom in target.split("."):
            obj = getattr(obj, atom)
        return obj

    # ------------------------------------------------------------------ one node
    def _call(self, node: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
        """Run the node's op as torch.fx's Interpreter would (plain lists and dicts for a
        function, which may edit its argument in place: see :meth:`RecordShapes.fetch_args_kwargs_from_env`)."""
        if node.op == "call_function":
            return node.target(*_mutable(args), **_mutable(kwargs))
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, node.target)(*rest, **kwargs)
        return self.lookup.module(node.target)(*args, **kwargs)

    def _abstract(self, node: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
        """A node with a meta input: a rule, else the op under :class:`MetaMode`, else real values."""
        op = node.op
        try:
            if op == "call_module":
                module = self.lookup.module(node.target)
                rule = module_rule(module)
                out = _try(rule, module, args, kwargs) if rule is not None else None
                if out is None:
                    with self.mode:
                        out = module(*args, **kwargs)
                return out
            rule = function_rule(node.target) if op == "call_function" else method_rule(node.target)
            out = _try(rule, None, args, kwargs) if rule is not None else None
            if out is None:
                with self.mode:
                    out = self._call(node, args, kwargs)
            return out
        except Exception:  # noqa: BLE001 - the op needs values (or fails): run it on real ones
            return self._real_call(node)

    def _to_meta(self, value: Any) -> Any:
        """``value`` with every real tensor replaced by its meta copy; ``value`` itself when
        nothing changes."""
        if isinstance(value, torch.Tensor):
            return self.meta_copy(value) if value.device != META and _copyable(value) else value
        leaves, spec = tree_flatten(value)
        changed = False
        for i, v in enumerate(leaves):
            if isinstance(v, torch.Tensor) and v.device != META and _copyable(v):
                leaves[i] = self.meta_copy(v)
                changed = True
        return spec.unflatten(leaves) if changed else value

    def meta_copy(self, t: torch.Tensor) -> torch.Tensor:
        """A meta tensor with ``t``'s shape, strides, dtype and ``requires_grad``, made once per run."""
        hit = self._meta_copies.get(id(t))
        if hit is None or hit[0] is not t:
            meta = torch.empty_strided(tuple(t.shape), t.stride(), dtype=t.dtype, device=META,
                                       requires_grad=t.requires_grad)
            hit = self._meta_copies[id(t)] = (t, meta)
        return hit[1]

    # ------------------------------------------------------------------ real values
    def _real_call(self, node: torch.fx.Node) -> Any:
        """Run ``node`` on real values, computing those of its inputs first: the nodes it
        depends on, or every node before it when any of those may write into a tensor in place
        (its inputs then depend on the order of the writes)."""
        self.real_nodes.append(node.name)
        position = {n: i for i, n in enumerate(self.nodes)}
        before = [n for n in self.nodes[:position[node]] if n.op not in ("placeholder", "get_attr", "output")]
        if any(_may_mutate(n, self.lookup) for n in before):
            todo = before
            real = {n: v for n, v in self.real.items() if n.op in ("placeholder", "get_attr")}
        else:
            needed: Set[torch.fx.Node] = set()
            stack = [a for a in node.all_input_nodes if a not in self.real]
            while stack:
                n = stack.pop()
                if n not in needed:
                    needed.add(n)
                    stack.extend(a for a in n.all_input_nodes if a not in self.real)
            todo = sorted(needed, key=position.__getitem__)
            real = self.real
        for n in todo + [node]:
            real[n] = self._call(n, map_arg(n.args, real.__getitem__), map_arg(n.kwargs, real.__getitem__))
        if real is not self.real:
            self.real.update({n: real[n] for n in todo + [node]})
        return self.real[node]


def _try(rule, module, args: tuple, kwargs: dict) -> Any:
    """A rule's answer; None also when the rule meets an argument it does not expect."""
    try:
        return rule(module, args, kwargs) if module is not None else rule(args, kwargs)
    except Exception:  # noqa: BLE001 - torch's own kernels then decide
        return None


class MetaMode(TorchFunctionMode):
    """Runs the torch functions of one op on meta tensors: the rules of
    :mod:`fxprune.passes.shape_rules` where they apply, else torch's kernels with every real
    tensor argument replaced by its meta copy (a call on real tensors alone runs on them).
    A meta tensor stands for a tensor on the example inputs' device: its ``device`` reads as
    that device, and a device argument naming it becomes the meta device. Inside a module's
    ``forward`` it covers every call the Python code makes."""

    def __init__(self, shapes: "MetaShapes"):
        super().__init__()
        self.shapes = shapes
        self.getters = {torch.Tensor.device.__get__: "device", torch.Tensor.is_cuda.__get__: "is_cuda",
                        torch.Tensor.is_cpu.__get__: "is_cpu", torch.Tensor.is_meta.__get__: "is_meta"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.device == META:
            getter = self.getters.get(func)
            if getter is not None:
                device = self.home()
                return device if getter == "device" else device.type == getter[3:]
            if func is torch.Tensor.get_device:
                device = self.home()
                return -1 if device.type == "cpu" else device.index
            if func in (torch.Tensor.cpu, torch.Tensor.cuda):
                if self.home().type != func.__name__ or len(args) > 1 or kwargs:
                    raise NeedsValues(f"a move to another device ({func.__name__})")
                return first
        rule = function_rule(func)
        if rule is not None:
            out = _try(rule, None, args, kwargs)
            if out is not None:
                return out
        leaves, spec = tree_flatten((args, kwargs))
        if not any(isinstance(v, torch.Tensor) and v.device == META for v in leaves):
            return func(*args, **kwargs)
        for i, v in enumerate(leaves):
            if isinstance(v, torch.Tensor):
                if v.device != META and _copyable(v):
                    leaves[i] = self.shapes.meta_copy(v)
            elif isinstance(v, (torch.device, str)):
                leaves[i] = self.meta_device(v)
        args, kwargs = spec.unflatten(leaves)
        return func(*args, **kwargs)

    def home(self) -> torch.device:
        if self.shapes.home is None:
            raise NeedsValues("the tensors of this graph are on more than one device")
        return self.shapes.home

    def meta_device(self, v: Any) -> Any:
        """A device (or device name) equal to the example inputs' device becomes the meta
        device; one naming another device raises :class:`NeedsValues`; other strings stay."""
        if isinstance(v, str):
            if v.split(":")[0] not in _DEVICE_TYPES:
                return v
            v = torch.device(v)
        home = self.home()
        if v == META or v == home or (v.index is None and v.type == home.type):
            return META
        raise NeedsValues(f"a move to device {v}")


_DEVICE_TYPES = {"cpu", "cuda", "mps", "xpu", "meta", "hip", "xla", "privateuseone", "hpu", "mtia"}

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.imatmul,
                      operator.setitem}


def _placeholder(node: torch.fx.Node, args_iter) -> Any:
    """torch.fx's ``Interpreter.placeholder``."""
    if node.target.startswith("*"):
        return list(args_iter)
    try:
        return next(args_iter)
    except StopIteration:
        if node.args:
            return node.args[0]
        raise RuntimeError(f"Expected positional argument for parameter {node.target}, but one was not passed in!")


def _copyable(t: torch.Tensor) -> bool:
    """A plain dense tensor, which a meta tensor of the same strides stands for."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided and not t.is_quantized


def _holds_meta(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.device == META
    if isinstance(value, (tuple, list)):
        return any(_holds_meta(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_meta(v) for v in value.values())
    return False


def _home_device(lookup: Lookup, inputs: tuple) -> Optional[torch.device]:
    """The device of every example input, parameter and buffer (the CPU when there are
    none), or None when they differ."""
    devices = {t.device for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)}
    for m in lookup.modules():
        for t in m._parameters.values():
            if t is not None:
                devices.add(t.device)
        for t in m._buffers.values():
            if t is not None:
                devices.add(t.device)
    if not devices:
        return torch.device("cpu")
    return devices.pop() if len(devices) == 1 else None


def _may_mutate(node: torch.fx.Node, lookup: Lookup) -> bool:
    """The node may write into a tensor in place: an in-place method, operator or function
    (``x.add_(y)``, ``x += y``, ``x[i] = y``, ``inplace=True``, ``out=``, an ATen op whose schema
    mutates), an in-place module, or a module without a rule (its ``forward`` may do anything)."""
    if node.op == "call_method":
        return node.target.endswith("_") or node.target == "__setitem__"
    if node.op == "call_function":
        target = node.target
        if target in _INPLACE_OPERATORS or node.kwargs.get("inplace") or "out" in node.kwargs:
            return True
        schema = getattr(target, "_schema", None)
        return bool(schema.is_mutable) if schema is not None else getattr(target, "__name__", "").endswith("_")
    if node.op == "call_module":
        module = lookup.module(node.target)
        return bool(getattr(module, "inplace", False)) or module_rule(module) is None
    return False


# --------------------------------------------------------------------------------------------
# the pass


class ShapePropPass(PassBase):
    """Attach ``tensor_meta`` and ``type`` to every node (see the module docstring).

    ``real=True`` runs the whole graph on the real example inputs instead (torch.fx's
    ``ShapeProp`` metadata from an eager run; the cost of one forward pass)."""

    name = "shape_prop"

    def __init__(self, example_inputs: Sequence, real: bool = False):
        super().__init__()
        self.example_inputs = tuple(example_inputs)
        self.real = real

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        self.propagate(gm)
        return PassResult(gm, False)

    def propagate(self, gm: torch.fx.GraphModule) -> Any:
        """Record the metadata; returns the graph's outputs on the example inputs (holding meta
        tensors unless ``real``)."""
        try:
            with torch.no_grad(), eval_mode(gm):
                if detect_fake_mode() is not None:  # under an active fake mode (torch.compile tracing)
                    return ShapeProp(gm).propagate(*self.example_inputs)
                if self.real:
                    return RecordShapes(gm).run(*self.example_inputs)
                return MetaShapes(gm, self.example_inputs).run()
        except Exception as exc:
            raise UnsupportedInputError(
                f"the model does not run on the example inputs "
                f"({', '.join(_describe(x) for x in self.example_inputs)}): {type(exc).__name__}: {exc}") from exc


def _mutable(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        items = [_mutable(x) for x in v]
        return items if isinstance(v, list) else (type(v)(*items) if hasattr(v, "_fields") else tuple(items))
    if isinstance(v, dict):
        return {k: _mutable(x) for k, x in v.items()}
    return v


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)} {x.dtype}"
    return type(x).__name__
