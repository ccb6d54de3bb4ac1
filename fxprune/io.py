"""Saving and loading slim models without pickle.

``save(gm, directory)`` writes three files:

``module.py``
    The model as readable Python: a ``torch.nn.Module`` class whose ``forward`` is the
    GraphModule's generated code. Its ``__init__`` attaches the saved submodules and weights
    (``load_submodules``), so a user may import it, read it and edit it. :func:`load` never
    imports or executes this file.
``graph.json``
    What :func:`load` rebuilds from: every submodule as its class's import path plus its plain
    attributes (``in_channels``, ``stride``, ``eps``, ...), and every graph node as
    ``(name, op, target, args, kwargs)`` with constants encoded as JSON.
``model.safetensors``
    Every parameter and buffer (a tensor shared by several modules is stored once).

``load(directory)`` rebuilds the module tree and the ``torch.fx.Graph`` from ``graph.json`` and
returns a ``torch.fx.GraphModule`` with the same outputs.

Safety: every file is treated as hostile, and loading runs nothing the files choose.

* Names are never imported or looked up freely. Every function, method, ``getattr`` name and
  module class in ``graph.json`` must be on the allow-list of :mod:`fxprune.allowlist`
  (matched with ``re.fullmatch``): pure tensor functions (what
  ``torch.overrides.get_overridable_functions()`` lists, ATen and torchvision overloads that
  write only to their own tensor arguments, ``operator`` arithmetic and ``getitem``, ``math``),
  the public methods of ``torch.Tensor`` less those with outside effects, the module classes of
  ``torch.nn`` and ``torchvision.ops``, and every ``torch.nn.Module`` subclass and function
  that :mod:`fxprune.modules` lists in its ``__all__``. No class constructor is callable. Other
  module classes and custom ``torch.autograd.Function`` subclasses load only when the caller
  names them (``allow=``).
* A submodule is rebuilt by its class's constructor, run on the meta device (so a hostile size
  allocates nothing) with the saved attributes of the same names as the constructor's
  parameters. Only attributes the class declares are restored: the instance attributes its
  constructor sets, its ``__constants__`` and annotations; never a name starting with ``_``
  (``_compiled_call_impl``) or one the class defines (``forward``). Every stored parameter and
  buffer must have the shape the constructed module gives it (a conv weight ``(out, in /
  groups, *kernel_size)``, a BatchNorm's ``(num_features,)``, a Linear ``(out_features,
  in_features)``) and the same kind of dtype (floating point or not); a class whose
  constructor needs an argument the file does not hold (allowed by the caller) is created
  without its ``__init__`` and its tensors are not checked against it.
* Graph node names, keyword-argument names and placeholder names must be identifiers (they
  become the generated code's variable names); ``get_attr`` must name a saved tensor and
  ``call_module`` a saved submodule; a tensor key must be a dotted name that the module tree
  uses, and every tensor in ``model.safetensors`` must be used.

Anything else raises :class:`fxprune.errors.CheckpointError` naming the node, module,
attribute or tensor.
"""
from __future__ import annotations

import ast
import builtins
import functools
import importlib
import inspect
import json
import keyword
import math
import os
import re
import textwrap
from typing import Any, Dict, Iterable, Optional, Set, Union

import torch
import torch.fx
from torch import nn

from . import allowlist
from .errors import CheckpointError, UnsupportedInputError

FORMAT = "fxprune-graph"
VERSION = 1
MODULE_FILE = "module.py"
GRAPH_FILE = "graph.json"
TENSOR_FILE = "model.safetensors"

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ATTRIBUTE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")  # a module attribute: never "_..."
# a parameter, buffer or child: "0" in a Sequential, "block1-0" in RegNet, "_tensor_constant0"
# of torch.fx; never a dunder (torch.fx writes such names into generated code)
_MEMBER = re.compile(r"_?[A-Za-z0-9][A-Za-z0-9_-]*")
_TENSOR_KEY = re.compile(r"{0}(\.{0})*".format(_MEMBER.pattern))
_MODULE_NAME = re.compile(r"(?!__)[A-Za-z_][A-Za-z0-9_]*(\.(?!__)[A-Za-z_][A-Za-z0-9_]*)*")  # no dunder part
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


# --------------------------------------------------------------------------------------------
# save


def save(gm: torch.fx.GraphModule, directory: Union[str, os.PathLike]) -> str:
    """Write ``gm`` to ``directory`` (created if needed) as module.py, graph.json and
    model.safetensors; returns the directory. Raises UnsupportedInputError for a graph or
    submodule that the format cannot describe (hooks, a non-JSON attribute, a custom codegen)."""
    from safetensors.torch import save_file

    from .regions.calls import refuse_region_model

    refuse_region_model(gm, "fxprune.save")
    if not isinstance(gm, torch.fx.GraphModule):
        raise UnsupportedInputError(f"fxprune.io.save takes a torch.fx.GraphModule, "
                                    f"not {type(gm).__name__}")
    if type(gm.graph._codegen) is not torch.fx.graph.CodeGen:
        raise UnsupportedInputError(f"fxprune.io.save supports plain torch.fx code generation, "
                                    f"not {type(gm.graph._codegen).__name__}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors: Dict[str, torch.Tensor] = {}
    keys: Dict[int, str] = {}

    def tensor_key(t: torch.Tensor, name: str) -> str:
        if id(t) not in keys:
            keys[id(t)] = name
            tensors[name] = t.detach().cpu().clone().contiguous()
        return keys[id(t)]

    spec = {
        "format": FORMAT,
        "version": VERSION,
        "class_name": _class_name(gm),
        "root": _describe_module(gm, "", tensor_key, root=True),
        "nodes": [_describe_node(n) for n in gm.graph.nodes],
    }
    save_file(tensors, os.path.join(directory, TENSOR_FILE), metadata={"format": FORMAT})
    _write_text(os.path.join(directory, GRAPH_FILE), json.dumps(spec, indent=1))
    _write_text(os.path.join(directory, MODULE_FILE), _module_source(gm, spec["class_name"]))
    return directory


def _class_name(gm: torch.fx.GraphModule) -> str:
    name = type(gm).__name__  # GraphModule(..., class_name=) names the class
    return name if _IDENT.fullmatch(name) and name != "GraphModule" else "SlimModel"


def _describe_module(mod: nn.Module, path: str, tensor_key, root: bool = False) -> dict:
    where = path or "<root>"
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                  "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
        if getattr(mod, hooks, None):
            raise UnsupportedInputError(f"module {where} has {hooks}; hooks cannot be saved")
    prefix = path + "." if path else ""
    out: dict = {"training": mod.training}
    if not root:
        cls = type(mod)
        out["class"] = f"{cls.__module__}.{cls.__qualname__}"
        if _resolve_or_none(out["class"]) is not cls:
            raise UnsupportedInputError(f"module {where}: class {out['class']} is not importable "
                                        f"by its name, so it cannot be rebuilt")
        attrs = {}
        for k, v in vars(mod).items():
            if k in _MODULE_INTERNALS:
                continue
            try:
                attrs[k] = _encode(v)
            except TypeError as e:
                raise UnsupportedInputError(f"module {where} ({out['class']}): attribute {k!r} "
                                            f"cannot be saved: {e}") from None
        out["attributes"] = attrs
    out["parameters"] = {
        k: None if p is None else {"tensor": tensor_key(p, prefix + k),
                                   "requires_grad": p.requires_grad}
        for k, p in mod._parameters.items()}
    out["buffers"] = {k: None if b is None else tensor_key(b, prefix + k)
                      for k, b in mod._buffers.items()}
    out["non_persistent"] = sorted(mod._non_persistent_buffers_set)
    out["children"] = {k: None if c is None else _describe_module(c, prefix + k, tensor_key)
                       for k, c in mod._modules.items()}
    return out


def _describe_node(node: torch.fx.Node) -> dict:
    target = node.target
    if node.op == "call_function":
        target = allowlist.qualified_name(target)
        cls = allowlist.autograd_function_of(node.target)
        if cls is not None:  # a custom autograd Function: its class must be importable
            if _resolve_or_none(target.rpartition(".")[0]) is not cls:
                raise UnsupportedInputError(f"node {node.name!r}: autograd Function {target} is not "
                                            f"importable by its name")
        elif _resolve_or_none(target) != node.target:
            raise UnsupportedInputError(f"node {node.name!r}: function {target} is not "
                                        f"importable by its name")
    try:
        return {"name": node.name, "op": node.op, "target": target,
                "args": _encode(node.args), "kwargs": _encode(node.kwargs)}
    except TypeError as e:
        raise UnsupportedInputError(f"node {node.name!r} ({node.op} {target}): {e}") from None


def _encode(v: Any) -> Any:
    """JSON form of a module attribute or a node argument."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, torch.fx.Node):
        return {"node": v.name}
    if isinstance(v, tuple):  # also torch.Size
        return {"tuple": [_encode(x) for x in v]}
    if isinstance(v, list):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return {"dict": [[_encode(k), _encode(x)] for k, x in v.items()]}
    if isinstance(v, slice):
        return {"slice": [_encode(v.start), _encode(v.stop), _encode(v.step)]}
    if v is Ellipsis:
        return {"ellipsis": None}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).removeprefix("torch.")}
    if isinstance(v, torch.layout):
        return {"layout": str(v).removeprefix("torch.")}
    if callable(v) and not isinstance(v, (nn.Module, type)):
        name = allowlist.qualified_name(v)
        if _resolve_or_none(name) == v:
            return {"function": name}
    raise TypeError(f"no JSON form for {type(v).__name__} {v!r}")


def _module_source(gm: torch.fx.GraphModule, class_name: str) -> str:
    code = gm.graph.python_code(root_module="self")
    lines = [
        f'"""{class_name}: a slim model saved by fxprune.io.save.',
        "",
        "fxprune.io.load(<this directory>) rebuilds it from graph.json and model.safetensors",
        "without running this file. Importing this file and calling",
        f"{class_name}() builds the same model from the files next to it.",
        '"""',
        "import os",
        "",
        "import torch",
        "",
        "import fxprune.io",
    ]
    used = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", code.src))
    for name, obj in sorted(code.globals.items()):
        line = _import_line(name, obj) if name in used else ""
        if line:
            lines.append(line)
    body = code.src.strip("\n").splitlines()
    start = next(i for i, row in enumerate(body) if row.startswith("def forward"))
    lines += body[:start]  # module-level statements of fx's code, e.g. torch.fx.wrap(...)
    lines += ["", "", f"class {class_name}(torch.nn.Module):",
              "    # Submodules and weights (see graph.json and model.safetensors):"]
    lines += ["    #   " + row for row in _tree_lines(gm)]
    lines += ["", "    def __init__(self, directory=os.path.dirname(os.path.abspath(__file__))):",
              "        super().__init__()",
              "        fxprune.io.load_submodules(self, directory)", ""]
    lines += ["    " + row if row.strip() else "" for row in body[start:]]
    return "\n".join(lines) + "\n"


def _import_line(name: str, obj: Any) -> str:
    if name == "torch" or getattr(builtins, name, None) is obj:
        return ""
    cls = allowlist.autograd_function_of(obj)
    if cls is not None:
        return (f"import {cls.__module__}\nimport fxprune.passes.autograd_functions\n{name} = "
                f"fxprune.passes.autograd_functions.function_apply({cls.__module__}.{cls.__qualname__})")
    if name in ("inf", "nan"):
        return f"{name} = float({name!r})"
    if obj is type(None):
        return f"{name} = type(None)"
    if isinstance(obj, type(os)):
        return f"import {obj.__name__} as {name}" if obj.__name__ != name else f"import {name}"
    module, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if module and qual and "." not in qual and "<" not in qual:
        return f"from {module} import {qual} as {name}" if qual != name else \
            f"from {module} import {name}"
    return f"# {name}: {obj!r}"


def _tree_lines(gm: nn.Module) -> list:
    rows = []
    for name, mod in gm.named_modules():
        if type(mod) is nn.Module or mod is gm:  # a plain container: list its own tensors
            for k, t in list(mod._parameters.items()) + list(mod._buffers.items()):
                if t is not None:
                    rows.append(f"{name + '.' if name else ''}{k}: tensor "
                                f"{tuple(t.shape)} {t.dtype}")
        elif mod._modules:  # its children get rows of their own
            rows.append(f"{name}: {type(mod).__qualname__}")
        else:
            rows.append(f"{name}: {mod!r}")
    return rows


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# load


def load(directory: Union[str, os.PathLike], allow: Iterable[Union[type, str]] = (),
         device: Union[str, torch.device] = "cpu") -> torch.fx.GraphModule:
    """Rebuild the GraphModule that :func:`save` wrote to ``directory``.

    ``allow``: module classes and custom ``torch.autograd.Function`` classes beyond the
    allow-list (see the module docstring) that the caller trusts, as classes or as module-name
    prefixes (``"mypkg.layers"``). ``device``: where the tensors are placed.

    Raises CheckpointError when a file is missing, truncated or corrupt, names anything not
    allowed, or holds a tensor whose shape does not fit its module."""
    spec, tensors = _read(directory, device)
    policy = _Policy(allow)
    root = nn.Module()
    loaded = _Loaded()
    _populate(root, _section(spec, "root", dict, "<file>"), tensors, policy, loaded)
    loaded.check_all_used(tensors)
    graph = _build_graph(_section(spec, "nodes", list, "<file>"), policy, loaded)
    try:
        return torch.fx.GraphModule(root, graph, class_name=spec["class_name"])
    except Exception as e:  # noqa: BLE001 - any failure here means the files disagree
        raise CheckpointError(f"{directory}: the saved graph does not fit its modules: {e}") from e


def load_submodules(module: nn.Module, directory: Union[str, os.PathLike],
                    allow: Iterable[Union[type, str]] = ()) -> nn.Module:
    """Attach the submodules, parameters and buffers saved in ``directory`` to ``module``
    (what the ``__init__`` of a saved module.py calls); checked as :func:`load` checks them."""
    spec, tensors = _read(directory, "cpu")
    loaded = _Loaded()
    _populate(module, _section(spec, "root", dict, "<file>"), tensors, _Policy(allow), loaded)
    loaded.check_all_used(tensors)
    return module


def _read(directory, device):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    graph_path = os.path.join(directory, GRAPH_FILE)
    tensor_path = os.path.join(directory, TENSOR_FILE)
    for p in (graph_path, tensor_path):
        if not os.path.isfile(p):
            raise CheckpointError(f"{p} is missing: {directory} is not a model saved by "
                                  f"fxprune.io.save")
    try:
        with open(graph_path, encoding="utf-8") as f:
            spec = json.load(f)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{graph_path} is not valid JSON (truncated or corrupt): {e}") from e
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise CheckpointError(f"{graph_path} is not an fxprune graph file")
    if spec.get("version") != VERSION:
        raise CheckpointError(f"{graph_path} has format version {spec.get('version')}; "
                              f"this fxprune reads version {VERSION}")
    name = spec.get("class_name")
    if not (isinstance(name, str) and _IDENT.fullmatch(name) and not keyword.iskeyword(name)):
        raise CheckpointError(f"{graph_path}: bad class name {name!r}")
    try:
        tensors = load_file(tensor_path, device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{tensor_path} cannot be read (truncated or corrupt): {e}") from e
    # each tensor in an allocation of its own: views into the file's buffer sit at unaligned
    # offsets, where CPU kernels take other code paths and round differently from the model saved
    return spec, {name: t.clone() for name, t in tensors.items()}


def _section(spec: Any, key: str, kind: type, where: str) -> Any:
    value = spec.get(key) if isinstance(spec, dict) else None
    if not isinstance(value, kind):
        raise CheckpointError(f"module {where}: malformed description ({key!r} is "
                              f"{type(value).__name__}, not {kind.__name__})")
    return value


class _Policy:
    """What the caller allows beyond :mod:`fxprune.allowlist`; decides on names before
    importing anything, and imports only inside the allowed module prefixes."""

    def __init__(self, allow: Iterable[Union[type, str]]):
        allow = list(allow)
        self.classes = {f"{a.__module__}.{a.__qualname__}": a for a in allow if isinstance(a, type)}
        self.prefixes = tuple(a for a in allow if isinstance(a, str))
        for p in self.prefixes:
            if not _MODULE_NAME.fullmatch(p):
                raise UnsupportedInputError(f"allow= takes classes or module names, not {p!r}")

    def user_class(self, name: str) -> Optional[type]:
        """The class ``name`` if the caller allowed it (by class or module prefix), else None."""
        if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
            return None
        if name in self.classes:
            return self.classes[name]
        if any(name.startswith(p + ".") for p in self.prefixes):
            obj = _resolve_or_none(name)
            return obj if isinstance(obj, type) else None
        return None

    def module_class(self, name: Any, where: str) -> type:
        cls = allowlist.module_classes().get(name) if isinstance(name, str) else None
        if cls is None:
            cls = self.user_class(name)
        if cls is None:
            raise CheckpointError(
                f"refusing to rebuild module {where} of class {name}: only the module classes "
                f"of torch.nn, torchvision.ops and fxprune.modules are rebuilt unless "
                f"load(..., allow=[...]) names the class or its module")
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise CheckpointError(f"module {where}: {name} is not a torch.nn.Module class")
        if issubclass(cls, torch.fx.GraphModule):
            raise CheckpointError(f"module {where}: nested GraphModules are not rebuilt")
        return cls

    def function(self, name: Any, where: str):
        fn = allowlist.function(name, self.user_class)
        if fn is None:
            raise CheckpointError(f"{where}: refusing to call {name!r}: not on fxprune's list of "
                                  f"functions a saved graph may use (fxprune.allowlist)")
        return fn


class _Loaded:
    """What the module tree of a file holds: tensor keys used, tensor and module paths."""

    def __init__(self):
        self.keys: Set[str] = set()
        self.tensors: Set[str] = set()
        self.modules: Set[str] = set()
        self.params: Dict[str, nn.Parameter] = {}  # stored tensor -> the Parameter made of it

    def check_all_used(self, tensors: Dict[str, torch.Tensor]) -> None:
        extra = sorted(set(tensors) - self.keys)
        if extra:
            raise CheckpointError(f"{TENSOR_FILE} holds tensors no module uses: "
                                  f"{', '.join(map(repr, extra[:5]))}")


def _populate(mod: nn.Module, spec: dict, tensors: Dict[str, torch.Tensor], policy: _Policy,
              loaded: _Loaded, path: str = "", ref: Optional["_Reference"] = None) -> None:
    """Fill ``mod`` from its description: the root, or a module built by :func:`_build_module`
    whose constructed tensors and children (``ref``) the file's must match. A stored tensor used
    by several modules becomes one Parameter, so tied weights stay tied."""
    where = path or "<root>"
    prefix = path + "." if path else ""
    ref = ref or _Reference(None)
    training = spec.get("training")
    if not isinstance(training, bool):
        raise CheckpointError(f"module {where}: malformed description ('training' is {training!r})")
    mod.training = training
    for kind, table in (("parameter", mod._parameters), ("buffer", mod._buffers)):
        for k, entry in _section(spec, kind + "s", dict, where).items():
            _check_member(mod, k, where)
            if entry is None:
                ref.check_none(k, kind, where)
                table[k] = None
                continue
            if kind == "parameter":
                if not (isinstance(entry, dict) and isinstance(entry.get("requires_grad"), bool)):
                    raise CheckpointError(f"module {where}: malformed parameter {k!r}")
                key = entry.get("tensor")
            else:
                key = entry
            t = _tensor(tensors, key, where, loaded)
            ref.check(k, t, kind, where)
            if kind == "parameter":
                if key not in loaded.params:
                    loaded.params[key] = nn.Parameter(t, requires_grad=entry["requires_grad"])
                t = loaded.params[key]
            table[k] = t
            loaded.tensors.add(prefix + k)
    non_persistent = _section(spec, "non_persistent", list, where)
    if not all(isinstance(k, str) and k in mod._buffers for k in non_persistent):
        raise CheckpointError(f"module {where}: non-persistent names {non_persistent!r} are not "
                              f"all buffers")
    mod._non_persistent_buffers_set = set(non_persistent)
    for k, child in _section(spec, "children", dict, where).items():
        _check_member(mod, k, where)
        if child is None:
            mod._modules[k] = None
            continue
        if not isinstance(child, dict):
            raise CheckpointError(f"module {where}: malformed child {k!r}")
        ref.check_child(k, where)
        mod._modules[k] = _build_module(child, tensors, policy, loaded, prefix + k)
        loaded.modules.add(prefix + k)
    ref.check_complete(mod, where)


def _build_module(spec: dict, tensors, policy: _Policy, loaded: _Loaded, path: str) -> nn.Module:
    """A submodule of the class the file names, built by that class's constructor on the meta
    device when the saved attributes give its arguments (else without ``__init__``), with only
    the attributes the class declares restored, then filled by :func:`_populate`."""
    cls = policy.module_class(spec.get("class"), path)
    attrs = {}
    for k, v in _section(spec, "attributes", dict, path).items():
        if not (isinstance(k, str) and _IDENT.fullmatch(k)) or k in _MODULE_INTERNALS:
            raise CheckpointError(f"module {path}: refusing attribute {k!r}")
        attrs[k] = _decode(v, None, policy, f"module {path} attribute {k!r}")
    presence = {k: v is not None for part in ("parameters", "buffers")
                for k, v in _section(spec, part, dict, path).items()}
    mod, constructed = _construct(cls, attrs, presence, path)
    declared = _declared_attributes(cls, mod)
    cname = f"{cls.__module__}.{cls.__qualname__}"
    for k, v in attrs.items():
        if k.startswith("_"):
            # derived state (a conv's _reversed_padding_repeated_twice) is never restored: it
            # must be what the constructor made from the saved arguments
            if not (constructed and k in vars(mod) and _same(vars(mod)[k], v)):
                raise CheckpointError(f"module {path}: refusing attribute {k!r}: a name starting "
                                      f"with '_' is never restored")
            continue
        if k not in declared or k in mod._parameters or k in mod._buffers or k in mod._modules:
            raise CheckpointError(f"module {path}: refusing attribute {k!r}: class {cname} "
                                  f"does not declare it")
        mod.__dict__[k] = v
    checked = constructed and type(mod) not in (nn.Module,) + _CONTAINERS
    _populate(mod, spec, tensors, policy, loaded, path, _Reference(mod if checked else None))
    return mod


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _construct(cls: type, attrs: Dict[str, Any], presence: Dict[str, bool], path: str):
    """``(module, True)``: ``cls(**arguments)`` on the meta device, its arguments taken from the
    saved attributes of the same names (a tensor's presence for a flag named like it, e.g.
    ``bias``); ``(bare instance, False)`` when an argument without default is not in the file."""
    kwargs: Dict[str, Any] = {}
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        params = None
    for p in params or ():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype"):
            continue
        if p.kind is not p.POSITIONAL_ONLY and not p.name.startswith("_") and p.name in attrs:
            kwargs[p.name] = attrs[p.name]
        elif p.kind is not p.POSITIONAL_ONLY and not p.name.startswith("_") and p.name in presence:
            kwargs[p.name] = presence[p.name]
        elif p.default is p.empty:
            params = None
            break
    if params is None:
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        return mod, False
    try:
        with torch.device("meta"):
            return cls(**kwargs), True
    except Exception as e:  # noqa: BLE001 - the class refuses the saved values
        raise CheckpointError(f"module {path}: {cls.__module__}.{cls.__qualname__} cannot be built "
                              f"from the saved attributes ({type(e).__name__}: {e})") from e


def _declared_attributes(cls: type, mod: nn.Module) -> Set[str]:
    """Public names the class declares: instance attributes its constructor set (this instance
    or, read from the source, ``self.<name> = ...`` in the ``__init__`` of the class and its
    bases), ``__constants__``, annotations and constructor parameters; never one the class
    defines as a method or property (``forward``)."""
    names = set(vars(mod)) | _class_declarations(cls)
    return {n for n in names if isinstance(n, str) and _ATTRIBUTE.fullmatch(n)
            and n not in _MODULE_INTERNALS and not _class_defines(cls, n)}


@functools.lru_cache(maxsize=None)
def _class_declarations(cls: type) -> frozenset:
    names: Set[str] = set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        names.update(getattr(klass, "__constants__", ()))
        names.update(vars(klass).get("__annotations__", {}))
        init = vars(klass).get("__init__")
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(init))) if init else None
        except (OSError, TypeError, SyntaxError):
            tree = None
        for node in ast.walk(tree) if tree is not None else ():
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                    and isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
    try:
        names.update(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        pass
    return frozenset(names)


def _class_defines(cls: type, name: str) -> bool:
    """``cls`` (or a base) defines ``name`` as behaviour: a function, method or descriptor."""
    try:
        obj = inspect.getattr_static(cls, name)
    except AttributeError:
        return False
    return callable(obj) or hasattr(obj, "__get__")


class _Reference:
    """The tensors and children of a module as its constructor built them (``mod`` None: none
    to check, as for the root, containers and classes built without ``__init__``)."""

    def __init__(self, mod: Optional[nn.Module]):
        self.mod = mod
        if mod is not None:
            self.name = f"{type(mod).__module__}.{type(mod).__qualname__}"
            self.tensors = {"parameter": dict(mod._parameters), "buffer": dict(mod._buffers)}
            self.children = set(mod._modules)

    def check(self, k: str, t: torch.Tensor, kind: str, where: str) -> None:
        if self.mod is None:
            return
        ref = self.tensors[kind].get(k)
        if ref is None:
            raise CheckpointError(f"module {where}: tensor {k!r} is not a {kind} that {self.name} "
                                  f"has when built from the saved attributes")
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"module {where}: tensor {kind} {k!r} has shape {tuple(t.shape)}, "
                                  f"but {self.name} with the saved attributes needs {tuple(ref.shape)}")
        kind_of = lambda x: (x.is_floating_point(), x.is_complex(),  # noqa: E731
                             None if x.is_floating_point() or x.is_complex() else x.dtype)
        if kind_of(t) != kind_of(ref):
            raise CheckpointError(f"module {where}: tensor {kind} {k!r} has dtype {t.dtype}, but "
                                  f"{self.name} keeps it as {ref.dtype}")

    def check_none(self, k: str, kind: str, where: str) -> None:
        if self.mod is not None and k not in self.tensors[kind]:
            raise CheckpointError(f"module {where}: {k!r} is not a {kind} of {self.name}")

    def check_child(self, k: str, where: str) -> None:
        if self.mod is not None and k not in self.children:
            raise CheckpointError(f"module {where}: submodule {k!r} is not one {self.name} has")

    def check_complete(self, mod: nn.Module, where: str) -> None:
        """Nothing the constructor made is left unfilled (still on the meta device)."""
        if self.mod is None:
            return
        for kind, table in (("parameter", mod._parameters), ("buffer", mod._buffers)):
            for k, t in table.items():
                if t is not None and t.is_meta:
                    raise CheckpointError(f"module {where}: {kind} {k!r} is missing from the file")
        for k in self.children:
            c = mod._modules.get(k)
            if c is not None and any(t.is_meta for t in list(c.parameters()) + list(c.buffers())):
                raise CheckpointError(f"module {where}: submodule {k!r} is missing from the file")


def _tensor(tensors, key, where, loaded: _Loaded) -> torch.Tensor:
    if not (isinstance(key, str) and _TENSOR_KEY.fullmatch(key)):
        raise CheckpointError(f"module {where}: bad tensor key {key!r}")
    if key not in tensors:
        raise CheckpointError(f"module {where}: tensor {key!r} is missing from {TENSOR_FILE}")
    loaded.keys.add(key)
    return tensors[key]


def _check_member(mod: nn.Module, name: Any, where: str) -> None:
    """A parameter, buffer or child name: a plain name that nothing of the class shadows."""
    if not (isinstance(name, str) and _MEMBER.fullmatch(name)) or name in _MODULE_INTERNALS \
            or _class_defines(type(mod), name):
        raise CheckpointError(f"module {where}: refusing member name {name!r}")


def _decode(v: Any, env: Optional[Dict[str, torch.fx.Node]], policy: _Policy, where: str) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_decode(x, env, policy, where) for x in v]
    if not (isinstance(v, dict) and len(v) == 1):
        raise CheckpointError(f"{where}: malformed value {v!r}")
    (kind, x), = v.items()
    if kind == "tuple" and isinstance(x, list):
        return tuple(_decode(y, env, policy, where) for y in x)
    if kind == "dict" and isinstance(x, list) and all(isinstance(p, list) and len(p) == 2 for p in x):
        return {_decode(k, env, policy, where): _decode(y, env, policy, where) for k, y in x}
    if kind == "float" and x in ("inf", "-inf", "nan"):
        return float(x)
    if kind == "node":
        if env is None or not isinstance(x, str) or x not in env:
            raise CheckpointError(f"{where}: reference to unknown node {x!r}")
        return env[x]
    if kind == "slice" and isinstance(x, list) and len(x) == 3:
        return slice(*(_decode(y, env, policy, where) for y in x))
    if kind == "ellipsis" and x is None:
        return Ellipsis
    if kind in ("dtype", "memory_format", "layout"):
        expected = {"dtype": torch.dtype, "memory_format": torch.memory_format,
                    "layout": torch.layout}[kind]
        obj = getattr(torch, x, None) if isinstance(x, str) and _ATTRIBUTE.fullmatch(x) else None
        if isinstance(obj, expected):
            return obj
    if kind == "device" and isinstance(x, str) and re.fullmatch(r"[a-z_]+(:[0-9]+)?", x):
        try:
            return torch.device(x)
        except (TypeError, RuntimeError):
            pass
    if kind == "function":
        return policy.function(x, where)
    raise CheckpointError(f"{where}: malformed value {v!r}")


def _build_graph(nodes: list, policy: _Policy, loaded: _Loaded) -> torch.fx.Graph:
    graph = torch.fx.Graph()
    env: Dict[str, torch.fx.Node] = {}
    for spec in nodes:
        if not isinstance(spec, dict):
            raise CheckpointError(f"malformed node {spec!r}")
        name, op, target = spec.get("name"), spec.get("op"), spec.get("target")
        if not (isinstance(name, str) and name.isidentifier() and _IDENT.fullmatch(name)
                and not keyword.iskeyword(name)) or name in env:
            raise CheckpointError(f"refusing node name {name!r} (not an identifier, or repeated)")
        where = f"node {name!r}"
        args = _decode(spec.get("args"), env, policy, where)
        kwargs = _decode(spec.get("kwargs"), env, policy, where)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise CheckpointError(f"{where}: malformed arguments")
        if not all(isinstance(k, str) and _IDENT.fullmatch(k) and not keyword.iskeyword(k)
                   for k in kwargs):
            raise CheckpointError(f"{where}: refusing keyword names {list(kwargs)!r}")
        target = _node_target(op, target, args, where, policy, loaded)
        env[name] = graph.create_node(op, target, args, kwargs, name=name)
        if env[name].name != name:
            raise CheckpointError(f"refusing node name {name!r} (it clashes with a name the "
                                  f"generated code uses)")
    try:
        graph.lint()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"the saved graph is not valid: {e}") from e
    return graph


def _node_target(op: Any, target: Any, args: tuple, where: str, policy: _Policy, loaded: _Loaded):
    """The checked target of one node (see the module docstring)."""
    if op == "call_function":
        fn = policy.function(target, where)
        if fn is getattr and not (len(args) == 2 and isinstance(args[0], torch.fx.Node)
                                  and args[1] in allowlist.tensor_attributes()):
            raise CheckpointError(f"{where}: getattr of {args[1:]!r} is refused (only tensor "
                                  f"attributes and torch.return_types fields are read)")
        return fn
    if op == "call_method":
        if not (isinstance(target, str) and target in allowlist.methods()):
            raise CheckpointError(f"{where}: method name {target!r} is refused (not a public "
                                  f"torch.Tensor method on fxprune.allowlist)")
        if not (args and isinstance(args[0], torch.fx.Node)):
            raise CheckpointError(f"{where}: method {target!r} must be called on a graph value")
        return target
    if op == "get_attr":
        if target not in loaded.tensors:
            raise CheckpointError(f"{where}: get_attr {target!r} does not name a saved tensor")
        return target
    if op == "call_module":
        if target not in loaded.modules:
            raise CheckpointError(f"{where}: call_module {target!r} does not name a saved submodule")
        return target
    if op == "placeholder":
        if not (isinstance(target, str) and _IDENT.fullmatch(target.removeprefix("**").removeprefix("*"))
                and not keyword.iskeyword(target.lstrip("*"))):
            raise CheckpointError(f"{where}: bad placeholder {target!r}")
        return target
    if op == "output":
        return "output"
    raise CheckpointError(f"{where}: unknown op {op!r}")


def _resolve_or_none(name: str):
    try:
        return _resolve(name)
    except Exception:  # noqa: BLE001
        return None


def _resolve(name: str):
    """The object with qualified name ``name`` (``pkg.mod.Class.attr``); used by ``save`` to
    check that a name leads back to its object, and by ``load`` only for names inside module
    prefixes the caller allowed."""
    if name.startswith("torch.ops."):
        obj = torch.ops
        for part in name.split(".")[2:]:
            obj = getattr(obj, part)
        return obj
    if "." not in name:
        return getattr(builtins, name)
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(name)
