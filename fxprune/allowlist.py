"""What a saved slim model may name: the allow-list :func:`fxprune.io.load` checks every
``graph.json`` against.

A saved graph is data, and loading it must run nothing the file chooses. So the names in it
are never imported or looked up freely: each is matched (``re.fullmatch``, exact strings) against
tables built here from the installed torch, and anything else is refused.

Functions (``call_function`` targets and function-valued constants)
    * the pure tensor functions that ``torch.overrides.get_overridable_functions()`` lists:
      ``torch``, ``torch.functional``, ``torch.nn.functional``, ``torch.linalg``, ``torch.fft``,
      ``torch.special`` and the ``torch.Tensor`` methods, except the few with effects outside
      their tensors (:data:`DENIED_METHODS`);
    * ``torch.ops.aten`` and ``torch.ops.torchvision`` overloads (and overload packets) whose
      schema writes to nothing but their own tensor arguments and takes no storage, stream or
      class-object argument, except the ATen ops with effects outside their tensors
      (:data:`DENIED_ATEN`: ``from_file``, ``_print``, ``_backward``, cuFFT plan-cache setters,
      test ops);
    * ``operator`` arithmetic, comparisons, ``getitem``/``setitem`` (:data:`OPERATORS`); the
      functions of ``math``; the builtins ``getattr`` (of a tensor attribute or a field of a
      ``torch.return_types`` tuple only: :func:`tensor_attribute`), ``len``, ``abs``, ``min``,
      ``max``, ``sum``, ``round``, ``pow``, ``divmod``; torch.fx's own assertions; the public
      functions of ``torchvision.ops``;
    * every function that :mod:`fxprune.modules` lists in its ``__all__``.

    No class is callable (no constructor, so no ``torch.PyTorchFileWriter``,
    ``torch.CompilationUnit``, ``subprocess.Popen``), and nothing that reads or writes files,
    compiles or imports code, or changes global state is on the list.

Methods (``call_method`` targets)
    the public methods of ``torch.Tensor`` except :data:`DENIED_METHODS`.

Module classes (submodules rebuilt by :func:`fxprune.io.load`)
    every ``torch.nn.Module`` subclass defined in ``torch.nn.modules`` (lazy modules excepted)
    or ``torchvision.ops``, every ``torch.nn.Module`` subclass that :mod:`fxprune.modules`
    lists in its ``__all__``, and the classes the caller passes with ``load(..., allow=)``.

Custom autograd functions
    ``X.apply`` where ``X`` is a ``torch.autograd.Function`` subclass that the caller allows
    (``allow=[X]`` or its module) or that :mod:`fxprune.modules` lists.

A new module or function in :mod:`fxprune.modules` therefore needs no edit here.
"""
from __future__ import annotations

import builtins
import functools
import inspect
import math
import operator
import re
import types
from typing import Callable, Dict, FrozenSet, Optional

import torch
import torch.fx

# Tensor methods with effects outside the tensors they are given: autograd hooks and
# backward passes, shared or pinned memory, raw storage, callables applied element by
# element, conversion to objects (numpy arrays) whose own methods write files.
DENIED_METHODS = frozenset({
    "apply_", "map_", "map2_", "backward", "register_hook", "register_post_accumulate_grad_hook",
    "retain_grad", "set_", "share_memory_", "storage", "untyped_storage", "storage_type",
    "record_stream", "pin_memory", "numpy", "module_load", "data_ptr", "const_data_ptr",
})
# ATen ops with effects outside their tensors.
DENIED_ATEN = re.compile(r"from_file|_print|_backward|_cufft_.*|_test_.*|_propagate_xla_data|"
                         r"record_stream|set_|set")
OPERATORS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos",
             "abs", "invert", "and_", "or_", "xor", "lshift", "rshift", "not_", "truth", "eq",
             "ne", "lt", "le", "gt", "ge", "getitem", "setitem", "iadd", "isub", "imul",
             "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior", "ixor",
             "ilshift", "irshift", "index", "is_", "is_not", "contains", "concat")
BUILTINS = ("getattr", "len", "abs", "min", "max", "sum", "round", "pow", "divmod")
# Argument types that reach beyond a tensor's own values.
_UNSAFE_ARG_TYPE = re.compile(r".*\b(Storage|Stream|__torch__\.[\w.]+|Any|AnyClassType)\b.*")
# ATen names its operators' overloads ``__and__.Tensor`` too; whatever the name, only an
# OpOverloadPacket / OpOverload looked up on the namespace is accepted
_OP_NAME = re.compile(r"torch\.ops\.(aten|torchvision)\.([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?")


def qualified_name(fn: Callable) -> str:
    """The name :func:`fxprune.io.save` writes for a function: torch.fx's qualified name
    (``torch.nn.functional.relu``, ``torch.ops.aten.add.Tensor``, ``operator.add``), and
    ``module.Class.apply`` for a custom ``torch.autograd.Function``."""
    cls = autograd_function_of(fn)
    if cls is not None:
        return f"{cls.__module__}.{cls.__qualname__}.apply"
    name = torch.fx.node._get_qualified_name(fn)
    return "operator." + name[len("_operator."):] if name.startswith("_operator.") else name


def autograd_function_of(fn) -> Optional[type]:
    """``X`` if ``fn`` calls ``X.apply`` of a custom ``torch.autograd.Function`` ``X``."""
    from .passes.autograd_functions import autograd_function

    return autograd_function(fn)


def _named(table: Dict[str, Callable], fn) -> None:
    try:
        name = qualified_name(fn)
    except Exception:  # noqa: BLE001 - objects torch.fx cannot name are never saved either
        return
    if not any(part.startswith("__") for part in name.split(".")):
        table.setdefault(name, fn)


def _fxprune_modules():
    from . import modules

    return [getattr(modules, n) for n in getattr(modules, "__all__", ())]


@functools.lru_cache(maxsize=None)
def functions() -> Dict[str, Callable]:
    """Qualified name -> function, for every allowed function except ATen overloads (those are
    checked by name, :func:`aten`)."""
    table: Dict[str, Callable] = {}
    for namespace, fns in torch.overrides.get_overridable_functions().items():
        for fn in fns:
            if callable(fn) and not isinstance(fn, type) and fn.__name__ not in DENIED_METHODS:
                _named(table, fn)
    for name in OPERATORS:
        _named(table, getattr(operator, name))
    for name in BUILTINS:
        table[name] = getattr(builtins, name)
    for name, fn in vars(math).items():
        if not name.startswith("_") and isinstance(fn, types.BuiltinFunctionType):
            table[f"math.{name}"] = fn
    table["torch._assert"] = torch._assert
    _named(table, torch.fx._symbolic_trace._assert_is_none)
    try:
        import torchvision.ops
    except ImportError:
        pass
    else:
        for name in getattr(torchvision.ops, "__all__", ()):
            fn = getattr(torchvision.ops, name, None)
            if inspect.isfunction(fn):
                _named(table, fn)
    for obj in _fxprune_modules():
        if inspect.isfunction(obj) or isinstance(obj, types.BuiltinFunctionType):
            _named(table, obj)
    return table


@functools.lru_cache(maxsize=4096)
def aten(name: str):
    """The ATen (or torchvision) overload or packet ``torch.ops.<ns>.<op>[.<overload>]``, or
    None when it is not allowed (see the module docstring)."""
    m = _OP_NAME.fullmatch(name)
    if m is None or DENIED_ATEN.fullmatch(m.group(2)):
        return None
    namespace, op, overload = m.groups()
    try:
        packet = getattr(getattr(torch.ops, namespace), op)
    except (AttributeError, RuntimeError):
        return None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return None
    try:
        overloads = [getattr(packet, o) for o in ([overload] if overload else packet.overloads())]
    except (AttributeError, RuntimeError):
        return None
    if not overloads or not all(isinstance(o, torch._ops.OpOverload) and _pure_schema(o._schema)
                                for o in overloads):
        return None
    return overloads[0] if overload else packet


def _pure_schema(schema) -> bool:
    """Writes only to its own tensor arguments (in place or ``out=``) and takes no argument that
    reaches beyond a tensor's values."""
    return not any(_UNSAFE_ARG_TYPE.fullmatch(str(a.type)) for a in schema.arguments)


def function(name: str, allow_class: Callable[[str], Optional[type]]):
    """The function named ``name`` if it is allowed, else None. ``allow_class(name)`` gives a
    class the caller allowed by that name (or None); it decides on custom autograd functions."""
    if not isinstance(name, str):
        return None
    fn = functions().get(name)
    if fn is not None:
        return fn
    if name.startswith("torch.ops."):
        return aten(name)
    owner, _, attr = name.rpartition(".")
    if attr == "apply" and owner:
        cls = allowed_autograd_functions().get(owner) or allow_class(owner)
        if isinstance(cls, type) and issubclass(cls, torch.autograd.Function) \
                and cls is not torch.autograd.Function:
            from .passes.autograd_functions import function_apply

            return function_apply(cls)
    return None


@functools.lru_cache(maxsize=None)
def allowed_autograd_functions() -> Dict[str, type]:
    """``torch.autograd.Function`` subclasses that :mod:`fxprune.modules` lists, by name."""
    return {f"{c.__module__}.{c.__qualname__}": c for c in _fxprune_modules()
            if isinstance(c, type) and issubclass(c, torch.autograd.Function)}


@functools.lru_cache(maxsize=None)
def methods() -> FrozenSet[str]:
    """Allowed ``call_method`` names: the public methods of ``torch.Tensor`` less
    :data:`DENIED_METHODS`."""
    return frozenset(n for n in dir(torch.Tensor)
                     if not n.startswith("_") and n not in DENIED_METHODS
                     and callable(getattr(torch.Tensor, n, None)))


@functools.lru_cache(maxsize=None)
def tensor_attributes() -> FrozenSet[str]:
    """Names ``getattr`` may read from a graph value: the public data attributes of
    ``torch.Tensor`` (``shape``, ``dtype``, ``device``, ``T``, ``data``, ...; not ``grad_fn``)
    and the fields of the named tuples in ``torch.return_types`` (``values``, ``indices``)."""
    names = set()
    for n in dir(torch.Tensor):
        if not n.startswith("_") and n != "grad_fn" and not callable(getattr(torch.Tensor, n, None)):
            if isinstance(inspect.getattr_static(torch.Tensor, n, None),
                          (property, types.GetSetDescriptorType, types.MemberDescriptorType)):
                names.add(n)
    for cls in vars(torch.return_types).values():
        if isinstance(cls, type):
            names.update(f for f in getattr(cls, "__match_args__", ()) if not f.startswith("_"))
    return frozenset(names)


@functools.lru_cache(maxsize=None)
def module_classes() -> Dict[str, type]:
    """Qualified class name -> class, for the module classes :func:`fxprune.io.load` rebuilds
    without ``allow=``."""
    import importlib
    import pkgutil

    table: Dict[str, type] = {}

    def add_from(package) -> None:
        mods = [package] + [importlib.import_module(f"{package.__name__}.{m.name}")
                            for m in pkgutil.iter_modules(package.__path__)]
        for mod in mods:
            for obj in vars(mod).values():
                if isinstance(obj, type) and issubclass(obj, torch.nn.Module) \
                        and obj.__module__.startswith(package.__name__) \
                        and not obj.__name__.startswith(("_", "Lazy")) \
                        and not issubclass(obj, torch.fx.GraphModule):
                    table[f"{obj.__module__}.{obj.__qualname__}"] = obj

    add_from(torch.nn.modules)
    try:
        import torchvision.ops
    except ImportError:
        pass
    else:
        add_from(torchvision.ops)
    for obj in _fxprune_modules():
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
            table[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return table
