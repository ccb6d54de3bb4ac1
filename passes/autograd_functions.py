"""Custom ``torch.autograd.Function`` calls as opaque graph nodes, in both front ends.

A custom Function pairs a ``forward`` with a ``backward`` of its own (a straight-through
estimator, a gradient scaled or clipped on its way back). Tracing through it keeps only the
forward: torch.fx symbolic tracing runs ``forward`` on proxies and records its ops, and
``torch.export`` (strict or not) inlines it too. The traced graph then computes the same values
but other gradients (a rounding STE's become zero), and since ``Program.module`` is what
training steps, the run would silently train another model.

So fxprune keeps every ``X.apply(...)`` call as one ``call_function`` node whose target is
:func:`function_apply` ``(X)``, a plain function that calls ``X.apply``: at run time the user's
forward and backward both run, so ``Program.module``'s gradients are the model's. torch's own
Functions (the autograd of custom ops, activation checkpointing), whose backward is the exact
gradient of their forward, are traced through as before.

* symbolic tracing (:func:`opaque_for_fx`): while the model is traced, ``Function.apply``
  records a node instead of running when one of its arguments is a ``torch.fx.Proxy``;
* ``torch.export`` (:func:`marked_for_export`, then :func:`collapse_marked`): while the model is
  exported, each tensor entering and leaving a custom Function passes through an identity op
  ``fxprune::autograd_boundary`` that carries the call's number; afterwards the ops between a
  call's boundaries (its inlined forward) are replaced by the one opaque node.

The channel-deps pass knows nothing about such a node: it freezes every channel the call touches,
and says so (:func:`describe`), unless a rule is registered for it
(``fxprune.passes.register_function(X.apply)``, e.g. an elementwise rule for an activation).
"""
from __future__ import annotations

import contextlib
import itertools
import operator
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.fx
import torch.utils._pytree as pytree

_APPLY = "apply"
_LOCK = threading.RLock()
_WRAPPERS: Dict[type, Callable] = {}


def function_apply(cls: type) -> Callable:
    """The graph target that calls ``cls.apply`` (one per class, so equal targets mean the same
    Function). Its ``__fxprune_autograd_function__`` is ``cls``."""
    with _LOCK:
        fn = _WRAPPERS.get(cls)
        if fn is None:
            def fn(*args, **kwargs):
                return cls.apply(*args, **kwargs)

            fn.__name__ = f"{cls.__name__}_apply"
            fn.__qualname__ = fn.__name__
            fn.__module__ = __name__
            fn.__doc__ = f"``{cls.__module__}.{cls.__qualname__}.apply``, kept opaque by fxprune."
            fn.__fxprune_autograd_function__ = cls
            _WRAPPERS[cls] = fn
        return fn


def autograd_function(target: Any) -> Optional[type]:
    """``X`` if ``target`` calls ``X.apply`` of a custom ``torch.autograd.Function`` (a target
    made by :func:`function_apply`, or ``X.apply`` itself); else None."""
    cls = getattr(target, "__fxprune_autograd_function__", None)
    if cls is None and getattr(target, "__name__", None) == _APPLY:
        owner = getattr(target, "__self__", None)
        cls = owner if isinstance(owner, type) else None
    ok = isinstance(cls, type) and issubclass(cls, torch.autograd.Function) and cls is not torch.autograd.Function
    return cls if ok else None


def describe(target: Any) -> str:
    """The reason given for the channels an opaque custom Function call freezes."""
    cls = autograd_function(target)
    name = f"{cls.__module__}.{cls.__qualname__}"
    return (f"custom torch.autograd.Function {name} (kept opaque so that its own backward runs; "
            f"register a channel rule with fxprune.passes.register_function({cls.__qualname__}.apply))")


def _user_function(cls: type) -> bool:
    """A Function of the user's (or a library's), not one of torch's own: torch implements
    some ops with Functions whose backward is their forward's exact gradient (the autograd of
    custom ops, activation checkpointing), and those are traced through as before."""
    module = getattr(cls, "__module__", "") or ""
    return not (module == "torch" or module.startswith("torch.") or module == __name__)


def _node_name(cls: type) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", cls.__name__).lower()


@contextlib.contextmanager
def _patched_apply(replacement: Callable) -> Iterator[None]:
    """``torch.autograd.Function.apply`` replaced for the duration (a C classmethod in recent
    torch, a Python one before); classes that define their own ``apply`` are not affected."""
    original = torch.autograd.Function.__dict__[_APPLY]
    with _LOCK:
        torch.autograd.Function.apply = classmethod(replacement)
        try:
            yield
        finally:
            torch.autograd.Function.apply = original


_ORIGINAL_APPLY = torch.autograd.Function.__dict__[_APPLY]


def _original(cls, *args, **kwargs):
    return _ORIGINAL_APPLY.__get__(None, cls)(*args, **kwargs)


# ------------------------------------------------------------------------------------ fx


@contextlib.contextmanager
def opaque_for_fx() -> Iterator[None]:
    """While symbolic tracing runs: a custom Function applied to a ``torch.fx.Proxy`` becomes one
    ``call_function`` node (target :func:`function_apply`), its body not traced."""
    def apply(cls, *args, **kwargs):
        proxies = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.fx.Proxy)]
        if not proxies or not _user_function(cls):
            return _original(cls, *args, **kwargs)
        return proxies[0].tracer.create_proxy("call_function", function_apply(cls), args, kwargs,
                                              name=_node_name(cls))

    with _patched_apply(apply):
        yield


# ------------------------------------------------------------------------------------ export


@torch.library.custom_op("fxprune::autograd_boundary", mutates_args=())
def _boundary(x: torch.Tensor, call: int, index: int, leaving: bool) -> torch.Tensor:
    """Identity marking tensor ``index`` entering (or ``leaving``) custom Function call ``call``
    while ``torch.export`` traces; removed from the graph by :func:`collapse_marked`."""
    return x.clone()


@_boundary.register_fake
def _(x, call, index, leaving):
    return torch.empty_like(x)


@dataclass
class _Call:
    cls: type
    inputs: List[Any]  # flat (args, kwargs) leaves; tensors are replaced by the graph's nodes
    in_spec: Any
    out_paths: List[Any]  # key path of each tensor among the outputs


@dataclass
class Marks:
    """The custom Function calls seen while exporting, by call number."""

    calls: Dict[int, _Call]


@contextlib.contextmanager
def marked_for_export() -> Iterator[Marks]:
    """While ``torch.export`` runs: every tensor entering and leaving a custom Function passes
    through ``fxprune::autograd_boundary``; yields the record that :func:`collapse_marked`
    turns into opaque nodes."""
    marks = Marks({})
    counter = itertools.count()

    def apply(cls, *args, **kwargs):
        if not _user_function(cls):
            return _original(cls, *args, **kwargs)
        call = next(counter)
        flat, spec = pytree.tree_flatten((args, kwargs))
        flat = [_boundary(a, call, i, False) if isinstance(a, torch.Tensor) else a
                for i, a in enumerate(flat)]
        args, kwargs = pytree.tree_unflatten(flat, spec)
        out = _original(cls, *args, **kwargs)
        leaves, out_spec = pytree.tree_flatten_with_path(out)
        paths, marked = [], []
        for path, v in leaves:
            if isinstance(v, torch.Tensor):
                v = _boundary(v, call, len(paths), True)
                paths.append(path)
            marked.append(v)
        marks.calls[call] = _Call(cls, flat, spec, paths)
        return pytree.tree_unflatten(marked, out_spec)

    with _patched_apply(apply):
        yield marks


def collapse_marked(gm: torch.fx.GraphModule, marks: Marks) -> torch.fx.GraphModule:
    """Replace, for every custom Function call marked during export, the ops between its
    boundaries by one opaque call (in place; returns ``gm``). Raises TraceError when a call's
    inputs or outputs cannot be written as graph arguments."""
    from fxprune.errors import TraceError

    graph = gm.graph
    target = torch.ops.fxprune.autograd_boundary.default
    entering: Dict[int, Dict[int, torch.fx.Node]] = {}
    leaving: Dict[int, Dict[int, torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is target:
            _, call, index, out = node.args
            (leaving if out else entering).setdefault(call, {})[index] = node
    for call in sorted(set(entering) | set(leaving)):
        record = marks.calls.get(call)
        ins, outs = entering.get(call, {}), leaving.get(call, {})
        if record is None or any(getattr(n, "_erased", False) for n in list(ins.values()) + list(outs.values())):
            continue  # a call nested in another one, removed with the outer call's body
        order = {n: i for i, n in enumerate(graph.nodes)}
        anchor = min(outs.values(), key=order.__getitem__) if outs else None
        flat = [ins[i].args[0] if i in ins else v for i, v in enumerate(record.inputs)]
        args, kwargs = pytree.tree_unflatten(flat, record.in_spec)
        with graph.inserting_before(anchor) if anchor is not None else graph.inserting_after(
                max(ins.values(), key=order.__getitem__)):
            try:
                opaque = graph.create_node("call_function", function_apply(record.cls), tuple(args), dict(kwargs),
                                           name=_node_name(record.cls))
            except Exception as exc:  # noqa: BLE001
                raise TraceError(f"custom torch.autograd.Function {record.cls.__qualname__} cannot be kept "
                                 f"opaque in the exported graph: {exc}") from exc
            first = anchor if anchor is not None else next(iter(ins.values()))
            for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
                if key in first.meta:
                    opaque.meta[key] = first.meta[key]
            for index, node in outs.items():
                with graph.inserting_before(node):
                    value = opaque
                    for key in record.out_paths[index]:
                        value = graph.call_function(_GETTERS[type(key)], (value, _key(key)))
                node.replace_all_uses_with(value)
        _erase_body(graph, list(ins.values()), list(outs.values()))
    graph.lint()
    gm.recompile()
    return gm


_GETTERS = {pytree.SequenceKey: operator.getitem, pytree.MappingKey: operator.getitem, pytree.GetAttrKey: getattr}


def _key(key) -> Any:
    if isinstance(key, pytree.SequenceKey):
        return key.idx
    if isinstance(key, pytree.MappingKey):
        return key.key
    return key.name


def _erase_body(graph: torch.fx.Graph, ins: List[torch.fx.Node], outs: List[torch.fx.Node]) -> None:
    """Erase the boundary nodes of one call and what lies between them: every node reachable
    from an entering boundary without passing a leaving one, and the nodes left without users
    that only fed a leaving boundary."""
    body = set()
    stack = list(ins)
    stop = set(outs)
    while stack:
        n = stack.pop()
        if n in body or n in stop:
            continue
        body.add(n)
        stack.extend(n.users)
    feeders = set(outs)
    for n in outs:
        feeders.update(n.all_input_nodes)
    for node in reversed(list(graph.nodes)):
        if (node in body or node in stop) and not node.users:
            graph.erase_node(node)
    changed = True
    while changed:  # producers of the outputs that read no entering tensor (constants)
        changed = False
        for node in reversed(list(graph.nodes)):
            if node in feeders and node.op not in ("placeholder", "output", "get_attr") \
                    and not node.users and not node.is_impure():
                feeders.update(node.all_input_nodes)
                graph.erase_node(node)
                changed = True
