"""One eager run of the model that records what region compile needs to know.

* **Calls.** For every watched submodule, the inputs and outputs of its first calls (cloned
  when they are made: a later in-place op must not change the record), bound to its
  ``forward`` signature and flattened (:class:`~fxprune.regions.calls.CallSpec`), and the
  number of calls.
* **Data dependence.** Every module that is running (the whole stack of modules, not only the
  innermost) when an ATen op runs whose output shape or value depends on tensor *values*
  (ATen tags ``dynamic_output_shape``/``data_dependent_output``: ``nonzero``, a boolean mask
  index, ``.item()``, ``bool(tensor)`` ...), or when a tensor leaves torch (``.numpy()``,
  ``.tolist()``), on a value derived from the model's inputs (values computed from parameters
  and constants alone are the same for every input): neither symbolic tracing nor
  ``torch.export`` can capture such a module as one graph that is right for other inputs, so
  region compile does not try it.
* **Parameter use.** Which module was running when each parameter or buffer was passed to a
  torch function: a parameter that code outside a region reads is shared with that code.
  So is a parameter read while the region's own module is not running (its tied copy in
  another module, a child called directly by the code around it: ``self.backbone[1](y)``).

The run is in eval mode, without autograd, on the example inputs; hooks and modes are removed
afterwards, so the model is left as it was.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Set

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .calls import CallSpec, NotFlat

MAX_CALLS = 8  # calls recorded per module (the rest are counted)

_DATA_TAGS = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output)
_LEAVES_TORCH = {"numpy", "__array__", "tolist", "data_ptr"}


@dataclass
class Call:
    """One recorded call: its spec (None if it could not be flattened, ``why`` says why), its
    tensor inputs and its output (clones)."""

    spec: Optional[CallSpec]
    tensors: List[torch.Tensor]
    output: Any = None
    why: str = ""


@dataclass
class Recording:
    """What :func:`record` saw (see the module docstring); modules are keyed by ``id``."""

    calls: Dict[int, List[Call]] = field(default_factory=dict)
    count: Dict[int, int] = field(default_factory=dict)
    data_dependent: Dict[int, str] = field(default_factory=dict)
    tensor_users: Dict[int, Set[str]] = field(default_factory=dict)
    tensor_under: Dict[int, Set[int]] = field(default_factory=dict)  # modules running at every use of a tensor
    output: Any = None


def _clone(x: Any) -> Any:
    return x.detach().clone() if isinstance(x, torch.Tensor) else x


class _Stack:
    def __init__(self):
        self.frames: List[list] = []  # [module, path, Call or None]


class _DispatchProbe(TorchDispatchMode):
    """Marks the running modules at an op with a value-dependent result on a value derived from
    the inputs (``rec.derived``, kept up to date here: an op's outputs, and the tensors an
    in-place op writes, derive from the inputs when one of its tensor arguments does).
    Computations on parameters and constants alone are not data-dependent for a tracer."""

    def __init__(self, stack: _Stack, rec: Recording, derived):
        super().__init__()
        self.stack, self.rec, self.derived = stack, rec, derived

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [a for a in _shallow(args, kwargs) if isinstance(a, torch.Tensor)]
        if any(t in self.derived for t in tensors):
            if self.stack.frames and any(t in func.tags for t in _DATA_TAGS):
                what = f"data-dependent op {func} in '{self.stack.frames[-1][1] or '<root>'}'"
                for mod, _, _ in self.stack.frames:
                    self.rec.data_dependent.setdefault(id(mod), what)
            for t in _flat_tensors(out):
                self.derived[t] = True
            if func._schema.is_mutable:
                for t in tensors:
                    self.derived[t] = True
        return out


def _flat_tensors(v: Any) -> List[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _flat_tensors(x)]
    return []


class _FunctionProbe(TorchFunctionMode):
    def __init__(self, stack: _Stack, rec: Recording, watched_tensors: Set[int], derived):
        super().__init__()
        self.stack, self.rec, self.watched, self.derived = stack, rec, watched_tensors, derived

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        frames = self.stack.frames
        if frames:
            path = frames[-1][1]
            running = None
            for a in _shallow(args, kwargs):
                if id(a) in self.watched:
                    self.rec.tensor_users.setdefault(id(a), set()).add(path)
                    running = running if running is not None else {id(f[0]) for f in frames}
                    before = self.rec.tensor_under.get(id(a))
                    self.rec.tensor_under[id(a)] = running if before is None else before & running
            if getattr(func, "__name__", "") in _LEAVES_TORCH and args and isinstance(args[0], torch.Tensor) \
                    and args[0] in self.derived:
                what = f"tensor converted by {func.__name__} in '{path or '<root>'}'"
                for mod, _, _ in frames:
                    self.rec.data_dependent.setdefault(id(mod), what)
        return func(*args, **kwargs)


def _shallow(args: tuple, kwargs: dict) -> Iterable[Any]:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


@torch.no_grad()
def record(model: torch.nn.Module, inputs: tuple, watch: Dict[int, str], paths: Dict[int, str]) -> Recording:
    """Run ``model(*inputs)`` once (eval mode, no autograd) and record (module docstring).

    Args:
        watch: ``{id(module): path}`` of the modules whose calls are recorded.
        paths: ``{id(module): path}`` of every module (names the running module).
    """
    from fxprune.passes.modes import eval_mode

    from torch.utils.weak import WeakTensorKeyDictionary

    rec = Recording()
    stack = _Stack()
    tensors = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    derived = WeakTensorKeyDictionary()  # tensors computed from the inputs
    for t in tree_flatten(list(inputs))[0]:
        if isinstance(t, torch.Tensor):
            derived[t] = True

    def pre(mod, args, kwargs):
        call = None
        key = id(mod)
        rec.count[key] = rec.count.get(key, 0) + 1
        if key in watch:
            calls = rec.calls.setdefault(key, [])
            if len(calls) < MAX_CALLS:
                try:
                    spec, leaves = CallSpec.of(mod, args, kwargs)
                    call = Call(spec, [t.detach().clone() for t in leaves])
                except (NotFlat, TypeError, ValueError) as exc:
                    call = Call(None, [], why=str(exc))
                calls.append(call)
        stack.frames.append([mod, paths.get(key, "?"), call])

    def post(mod, args, kwargs, output):
        if not stack.frames or stack.frames[-1][0] is not mod:
            return
        _, _, call = stack.frames.pop()
        if call is not None and call.spec is not None:
            call.output = tree_map(_clone, output)

    handles = []
    try:
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True, always_call=True))
        with eval_mode(model), contextlib.ExitStack() as modes:
            modes.enter_context(_FunctionProbe(stack, rec, tensors, derived))
            modes.enter_context(_DispatchProbe(stack, rec, derived))
            rec.output = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return rec


__all__ = ["Call", "Recording", "record", "MAX_CALLS"]
