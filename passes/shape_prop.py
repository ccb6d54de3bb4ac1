"""Shape propagation: real shapes and dtypes on every node (``node.meta["tensor_meta"]``),
by running the graph once on the example inputs, in eval mode and without autograd so that
the model's state (BatchNorm statistics) is left untouched.

The metadata is exactly that of :class:`torch.fx.passes.shape_prop.ShapeProp`
(``tensor_meta`` and ``type``), but each distinct tensor layout is described once: working out
a layout's memory format costs more than running a small layer.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch.fx.node import map_aggregate
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata, _extract_tensor_metadata

from fxprune.errors import UnsupportedInputError

from .modes import eval_mode


class RecordShapes(torch.fx.Interpreter):
    """Runs the graph and records what :class:`ShapeProp` records on each node."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self._layouts: Dict[Tuple, TensorMetadata] = {}
        self._attrs: Dict[str, Any] = {}

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
        found_tensor = False

        def describe(obj: Any) -> Any:
            nonlocal found_tensor
            if isinstance(obj, torch.Tensor):
                found_tensor = True
                return self.describe(obj)
            return obj

        meta = map_aggregate(result, describe)
        if found_tensor:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result

    def describe(self, t: torch.Tensor) -> TensorMetadata:
        """``ShapeProp``'s metadata of ``t``; for a dense, non-quantized tensor it depends on
        its shape, strides, dtype and ``requires_grad`` only, and is computed once per layout."""
        if t.layout != torch.strided or t.is_quantized:
            return _extract_tensor_metadata(t)
        key = (t.shape, t.stride(), t.dtype, t.requires_grad)
        meta = self._layouts.get(key)
        if meta is None:
            meta = self._layouts[key] = _extract_tensor_metadata(t)
        return meta


class ShapePropPass(PassBase):
    name = "shape_prop"

    def __init__(self, example_inputs: Sequence):
        super().__init__()
        self.example_inputs = tuple(example_inputs)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        self.propagate(gm)
        return PassResult(gm, False)

    def propagate(self, gm: torch.fx.GraphModule) -> Any:
        """Record the metadata; returns the graph's outputs on the example inputs."""
        # under an active fake mode (torch.compile tracing), ShapeProp's fake-tensor path
        interpreter = ShapeProp(gm).propagate if detect_fake_mode() is not None else RecordShapes(gm).run
        try:
            with torch.no_grad(), eval_mode(gm):
                return interpreter(*self.example_inputs)
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
