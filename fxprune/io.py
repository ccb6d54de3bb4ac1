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
returns a ``torch.fx.GraphModule`` with the same outputs. Nothing in the files can make it run
code of the file's choosing: a submodule class must live in ``torch.nn`` or ``torchvision.ops``
(or be allowed explicitly with ``allow=``), and it is created without calling its ``__init__``;
a ``call_function`` target must be a public function of torch's operator namespaces,
``torchvision.ops``, ``operator``, ``math`` or a short list of builtins (nothing that reads or
writes files or global state); method names and ``getattr`` names starting with ``_`` and
dunder member names are refused. Anything else raises :class:`fxprune.errors.CheckpointError`.
"""
from __future__ import annotations

import builtins
import importlib
import json
import math
import os
import re
from typing import Any, Dict, Iterable, Optional, Union

import torch
import torch.fx
from torch import nn

from .errors import CheckpointError, UnsupportedInputError

FORMAT = "fxprune-graph"
VERSION = 1
MODULE_FILE = "module.py"
GRAPH_FILE = "graph.json"
TENSOR_FILE = "model.safetensors"

_MODULE_ROOTS = ("torch.nn", "torchvision.ops")
_FUNCTION_ROOTS = ("torch", "torch.nn.functional", "torch.functional", "torch.special",
                   "torch.fft", "torch.linalg", "torch._C._nn", "torch._C._VariableFunctions",
                   "torchvision.ops", "operator", "math")
_OP_NAMESPACES = ("aten", "prims", "torchvision")
_SAFE_BUILTINS = {"getattr", "len", "int", "float", "bool", "abs", "min", "max", "sum",
                  "round", "pow", "divmod", "range", "slice", "tuple", "list"}
# Public names of the allowed namespaces that touch files, global state or the interpreter.
_DENIED = re.compile(r"^(load|save|from_file|compile|export|jit|hub|manual_seed|seed|"
                     r"initial_seed|set_.*|use_deterministic_algorithms|call|attrgetter|"
                     r"methodcaller|import_module)$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ATTR_PART = re.compile(r"^(?!__)[A-Za-z0-9_]+$")  # a member name, never a dunder
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


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
    return name if _IDENT.match(name) and name != "GraphModule" else "SlimModel"


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
        target = _qualified_name(target)
        if _resolve_or_none(target) is not node.target:
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
        name = _qualified_name(v)
        if _resolve_or_none(name) is v:
            return {"function": name}
    raise TypeError(f"no JSON form for {type(v).__name__} {v!r}")


def _qualified_name(fn) -> str:
    name = torch.fx.node._get_qualified_name(fn)
    return "operator." + name[len("_operator."):] if name.startswith("_operator.") else name


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

    ``allow``: submodule classes beyond ``torch.nn`` and ``torchvision.ops`` that the caller
    trusts, as classes or as module-name prefixes (``"mypkg.layers"``). Raises
    CheckpointError when a file is missing or corrupt or names something not allowed."""
    spec, tensors = _read(directory, device)
    root = nn.Module()
    _populate(root, spec["root"], tensors, _Allow(allow))
    graph = _build_graph(spec["nodes"])
    try:
        return torch.fx.GraphModule(root, graph, class_name=spec["class_name"])
    except Exception as e:  # noqa: BLE001 - any failure here means the files disagree
        raise CheckpointError(f"{directory}: the saved graph does not fit its modules: {e}") from e


def load_submodules(module: nn.Module, directory: Union[str, os.PathLike],
                    allow: Iterable[Union[type, str]] = ()) -> nn.Module:
    """Attach the submodules, parameters and buffers saved in ``directory`` to ``module``
    (what the ``__init__`` of a saved module.py calls)."""
    spec, tensors = _read(directory, "cpu")
    _populate(module, spec["root"], tensors, _Allow(allow))
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
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{graph_path} is not valid JSON (truncated or corrupt): {e}") from e
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise CheckpointError(f"{graph_path} is not an fxprune graph file")
    if spec.get("version") != VERSION:
        raise CheckpointError(f"{graph_path} has format version {spec.get('version')}; "
                              f"this fxprune reads version {VERSION}")
    if not _IDENT.match(str(spec.get("class_name"))):
        raise CheckpointError(f"{graph_path}: bad class name {spec.get('class_name')!r}")
    try:
        tensors = load_file(tensor_path, device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{tensor_path} cannot be read (truncated or corrupt): {e}") from e
    return spec, tensors


class _Allow:
    """Which submodule classes :func:`load` may rebuild; decides on names before importing."""

    def __init__(self, allow):
        allow = list(allow)
        self.names = {f"{a.__module__}.{a.__qualname__}" for a in allow if isinstance(a, type)}
        self.prefixes = _MODULE_ROOTS + tuple(a for a in allow if isinstance(a, str))

    def __call__(self, name: str, where: str) -> type:
        if not isinstance(name, str) or not (
                name in self.names
                or any(name.startswith(p + ".") for p in self.prefixes)):
            raise CheckpointError(
                f"refusing to rebuild module {where} of class {name}: only classes from "
                f"{', '.join(_MODULE_ROOTS)} are rebuilt unless load(..., allow=[...]) "
                f"names the class or its module")
        cls = _resolve_or_none(name)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise CheckpointError(f"module {where}: {name} is not a torch.nn.Module class")
        if issubclass(cls, torch.fx.GraphModule):
            raise CheckpointError(f"module {where}: nested GraphModules are not rebuilt")
        return cls


def _populate(mod: nn.Module, spec: dict, tensors: Dict[str, torch.Tensor], allow: _Allow,
              path: str = "", params: Optional[Dict[str, nn.Parameter]] = None) -> None:
    """Fill ``mod`` from its description; ``params`` maps each stored tensor to the one
    Parameter made from it, so that weights shared when saved stay shared."""
    params = {} if params is None else params
    where = path or "<root>"
    try:
        for k, v in spec.get("attributes", {}).items():
            if k in _MODULE_INTERNALS or not (_IDENT.match(k) and _ATTR_PART.match(k)):
                raise CheckpointError(f"module {where}: bad attribute name {k!r}")
            mod.__dict__[k] = _decode(v, None)
        mod.training = bool(spec["training"])
        for k, p in spec["parameters"].items():
            _check_attr(k, where)
            if p is not None and p["tensor"] not in params:
                params[p["tensor"]] = nn.Parameter(_tensor(tensors, p["tensor"], where),
                                                   requires_grad=bool(p["requires_grad"]))
            mod._parameters[k] = None if p is None else params[p["tensor"]]
        for k, b in spec["buffers"].items():
            _check_attr(k, where)
            mod._buffers[k] = None if b is None else _tensor(tensors, b, where)
        mod._non_persistent_buffers_set.update(spec["non_persistent"])
        for k, child in spec["children"].items():
            _check_attr(k, where)
            if child is None:
                mod._modules[k] = None
                continue
            cpath = f"{path}.{k}" if path else k
            cls = allow(child["class"], cpath)
            sub = cls.__new__(cls)  # no __init__: the saved attributes are its whole state
            nn.Module.__init__(sub)
            _populate(sub, child, tensors, allow, cpath, params)
            mod._modules[k] = sub
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"module {where}: malformed description ({e!r})") from e


def _tensor(tensors, key, where) -> torch.Tensor:
    if not isinstance(key, str) or key not in tensors:
        raise CheckpointError(f"module {where}: tensor {key!r} is missing from {TENSOR_FILE}")
    return tensors[key]


def _check_attr(name: str, where: str) -> None:
    if not isinstance(name, str) or not _ATTR_PART.match(name):
        raise CheckpointError(f"module {where}: bad member name {name!r}")


def _decode(v: Any, env: Optional[Dict[str, torch.fx.Node]]) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_decode(x, env) for x in v]
    if not (isinstance(v, dict) and len(v) == 1):
        raise CheckpointError(f"malformed value {v!r}")
    (kind, x), = v.items()
    if kind == "tuple":
        return tuple(_decode(y, env) for y in x)
    if kind == "dict":
        return {_decode(k, env): _decode(y, env) for k, y in x}
    if kind == "float":
        return float(x) if x in ("inf", "-inf", "nan") else _bad(v)
    if kind == "node":
        if env is None or x not in env:
            raise CheckpointError(f"reference to unknown node {x!r}")
        return env[x]
    if kind == "slice":
        return slice(*(_decode(y, env) for y in x))
    if kind == "ellipsis":
        return Ellipsis
    if kind in ("dtype", "memory_format", "layout"):
        obj = getattr(torch, x, None) if isinstance(x, str) and _IDENT.match(x) else None
        expected = {"dtype": torch.dtype, "memory_format": torch.memory_format,
                    "layout": torch.layout}[kind]
        return obj if isinstance(obj, expected) else _bad(v)
    if kind == "device":
        try:
            return torch.device(x)
        except (TypeError, RuntimeError):
            return _bad(v)
    if kind == "function":
        return _function(x)
    return _bad(v)


def _bad(v):
    raise CheckpointError(f"malformed value {v!r}")


def _function(name: str):
    """The function ``name`` if it is on the allow-list, else CheckpointError."""
    if not isinstance(name, str):
        _bad(name)
    module, _, attr = name.rpartition(".")
    if module == "builtins" or not module:
        ok = attr in _SAFE_BUILTINS
    elif module.startswith("torch.ops."):  # torch.ops.<namespace>.<op>[.<overload>]
        parts = name.split(".")[2:]
        ok = parts[0] in _OP_NAMESPACES and len(parts) in (2, 3) and not _DENIED.match(parts[1]) \
            and all(_IDENT.match(p) and not p.startswith("_") for p in parts)
    else:
        ok = (module in _FUNCTION_ROOTS or module.startswith("torchvision.ops.")) and \
            not attr.startswith("_") and not _DENIED.match(attr)
        ok = ok or name == "torch._assert"
    fn = _resolve_or_none(name) if ok else None
    if fn is None or not callable(fn) or isinstance(fn, type(os)):
        raise CheckpointError(f"refusing to call {name!r}: not on fxprune.io's list of "
                              f"functions a saved graph may use")
    return fn


def _build_graph(nodes: list) -> torch.fx.Graph:
    graph = torch.fx.Graph()
    env: Dict[str, torch.fx.Node] = {}
    for spec in nodes:
        try:
            name, op, target = spec["name"], spec["op"], spec["target"]
            args, kwargs = _decode(spec["args"], env), _decode(spec["kwargs"], env)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"malformed node {spec!r}: {e!r}") from e
        if not isinstance(name, str) or not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise CheckpointError(f"malformed node {spec!r}")
        if op == "call_function":
            target = _function(target)
            if target is getattr and not (len(args) == 2 and isinstance(args[1], str)
                                          and not args[1].startswith("_")):
                raise CheckpointError(f"node {name!r}: getattr of {args[1:]!r} is refused")
        elif op == "call_method":
            if not (isinstance(target, str) and _IDENT.match(target)
                    and not target.startswith("_")):
                raise CheckpointError(f"node {name!r}: method name {target!r} is refused")
        elif op in ("call_module", "get_attr"):
            if not (isinstance(target, str) and all(_ATTR_PART.match(p)
                                                    for p in target.split("."))):
                raise CheckpointError(f"node {name!r}: bad {op} target {target!r}")
        elif op == "placeholder":
            if not (isinstance(target, str) and _IDENT.match(target.lstrip("*"))):
                raise CheckpointError(f"node {name!r}: bad placeholder {target!r}")
        elif op == "output":
            target = "output"
        else:
            raise CheckpointError(f"node {name!r}: unknown op {op!r}")
        env[name] = graph.create_node(op, target, args, kwargs, name=name)
    try:
        graph.lint()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"the saved graph is not valid: {e}") from e
    return graph


def _resolve_or_none(name: str):
    try:
        return _resolve(name)
    except Exception:  # noqa: BLE001
        return None


def _resolve(name: str):
    """The object with qualified name ``name`` (``pkg.mod.Class.attr``)."""
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
