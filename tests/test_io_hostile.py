"""Hostile saved models: ``fxprune.io.load`` must refuse each with ``CheckpointError`` and run
nothing the files choose.

Every payload edits a genuine saved model (``graph.json``, ``model.safetensors`` or both) so
that, if the loader obeyed it, it would create a marker file, run a process, execute code,
import a module, or silently change the model. Each is attempted against ``load``; the test
asserts the ``CheckpointError``, that the marker does not exist, and, through a
``sys.addaudithook`` hook active during the attempt, that no process was started, no code was
compiled or executed, no module imported and no file other than the model's own opened.
"""
import json
import os
import re
import sys

import pytest
import torch
import torch.fx
from safetensors.torch import load_file, save_file

import fxprune.io as fio
from fxprune.errors import CheckpointError

# ---------------------------------------------------------------------------- audit hook

_EVENTS = None  # a list while an attempt runs


def _hook(event, args):
    if _EVENTS is not None:
        _EVENTS.append((event, args))


sys.addaudithook(_hook)  # audit hooks cannot be removed; this one records only during attempts

_FORBIDDEN = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "subprocess.",
              "exec", "import", "ctypes.", "socket.", "os.remove", "os.rename", "os.truncate",
              "os.mkdir", "shutil.", "os.chmod", "os.symlink", "os.link", "pty.", "webbrowser.")


def _forbidden(events, model_dir):
    bad = []
    for event, args in events:
        if event.startswith(_FORBIDDEN):
            bad.append(event)
        elif event == "compile" and args and args[-1] != "<unknown>":  # ast.parse is "<unknown>"
            bad.append(f"compile {args[-1]!r}")
        elif event == "open":
            path, mode = os.fspath(args[0]) if not isinstance(args[0], int) else "", args[1]
            if isinstance(path, bytes):
                path = path.decode(errors="replace")
            outside = path and not os.path.abspath(path).startswith(os.path.abspath(model_dir))
            if outside or (isinstance(mode, str) and any(c in mode for c in "wax+")):
                bad.append(f"open {path!r} {mode!r}")
    return bad


# ---------------------------------------------------------------------------- the model


class Base(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.register_buffer("scale", torch.tensor([2.0]))

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.b(torch.relu(self.a(y))) * self.scale


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    fio.save(torch.fx.symbolic_trace(Base().eval()), d)
    fio.load(d)  # warm up: every module the loader itself needs is imported before auditing
    return d


# ---------------------------------------------------------------------------- edits


def _t(*items):
    return {"tuple": list(items)}


def _kw(**items):
    return {"dict": [[k, v] for k, v in items.items()]}


def _node(spec, name):
    return next(n for n in spec["nodes"] if n["name"] == name)


MARKER = "MARKER"  # replaced by the marker file's path in the edited graph.json


def call(target, *args, node="relu", **kwargs):
    """The relu node calls ``target(*args, **kwargs)`` instead."""
    def edit(spec, marker):
        _node(spec, node).update(target=target, args=_t(*args), kwargs=_kw(**kwargs))
    return edit


def module_attr(child, name, value):
    def edit(spec, marker):
        spec["root"]["children"][child]["attributes"][name] = value
    return edit


def chain(*nodes):
    """Insert nodes (name, op, target, args) before the output, which returns the last one."""
    def edit(spec, marker):
        out = spec["nodes"].pop()
        for name, op, target, args in nodes:
            spec["nodes"].append({"name": name, "op": op, "target": target, "args": _t(*args),
                                  "kwargs": _kw()})
        out["args"] = _t({"node": nodes[-1][0]})
        spec["nodes"].append(out)
    return edit


def rename_tensor(old, new):
    """Store tensor ``old`` under key ``new`` (in both files)."""
    def edit(spec, marker, tensors):
        tensors[new] = tensors.pop(old)
        for mod in _modules(spec["root"]):
            for p in mod["parameters"].values():
                if p and p["tensor"] == old:
                    p["tensor"] = new
            for k, b in list(mod["buffers"].items()):
                if b == old:
                    mod["buffers"][k] = new
    return edit


def replace_tensor(key, value):
    def edit(spec, marker, tensors):
        tensors[key] = value
    return edit


def _modules(m):
    yield m
    for c in m["children"].values():
        if c:
            yield from _modules(c)


def raw(fn):
    """An edit of the JSON text itself."""
    fn.raw = True
    return fn


def set_class(name, **attributes):
    def edit(spec, marker):
        spec["root"]["children"]["a"].update({"class": name, **({"attributes": attributes} if attributes else {})})
    return edit


X = {"node": "bn"}  # the relu node's input
REFUSED_CALL = "refusing to call '{}'"
# name -> (edit, what the error must say)
PAYLOADS = {
    # torch's file and TorchScript classes, reachable by name under a deny-list
    "torch.PyTorchFileWriter": (call("torch.PyTorchFileWriter", MARKER), REFUSED_CALL.format("torch.PyTorchFileWriter")),
    "torch.PyTorchFileReader": (call("torch.PyTorchFileReader", MARKER), REFUSED_CALL.format("torch.PyTorchFileReader")),
    "torch.CompilationUnit": (call("torch.CompilationUnit", "def f(x):\n    return x\n"),
                              REFUSED_CALL.format("torch.CompilationUnit")),
    "torch.import_ir_module": (call("torch.import_ir_module", None, MARKER, None, None),
                               REFUSED_CALL.format("torch.import_ir_module")),
    "torch.import_ir_module_from_buffer": (call("torch.import_ir_module_from_buffer", None, "x", None, {"dict": []}),
                                           REFUSED_CALL.format("torch.import_ir_module_from_buffer")),
    "torch.load": (call("torch.load", MARKER), REFUSED_CALL.format("torch.load")),
    "torch.save": (call("torch.save", X, MARKER), REFUSED_CALL.format("torch.save")),
    "torch.hub.load": (call("torch.hub.load", "owner/repo", "m"), REFUSED_CALL.format("torch.hub.load")),
    "aten.from_file": (call("torch.ops.aten.from_file.default", MARKER, True, 16),
                       REFUSED_CALL.format("torch.ops.aten.from_file.default")),
    "aten namespace dunder": (call("torch.ops.aten.__class__", X), REFUSED_CALL.format("torch.ops.aten.__class__")),
    # module state the class does not declare
    "_compiled_call_impl -> torch.neg": (module_attr("a", "_compiled_call_impl", {"function": "torch.neg"}),
                                         "refusing attribute '_compiled_call_impl'"),
    "_compiled_call_impl -> PyTorchFileWriter": (
        module_attr("a", "_compiled_call_impl", {"function": "torch.PyTorchFileWriter"}),
        "refusing to call 'torch.PyTorchFileWriter'|refusing attribute '_compiled_call_impl'"),
    "forward -> torch.neg": (module_attr("a", "forward", {"function": "torch.neg"}), "refusing attribute 'forward'"),
    "attribute is os.system": (module_attr("a", "in_features", {"function": "os.system"}),
                               REFUSED_CALL.format("os.system")),
    "undeclared attribute": (module_attr("bn", "weight_hook", 3), "refusing attribute 'weight_hook'"),
    "_parameters attribute": (module_attr("bn", "_parameters", {"dict": []}), "refusing attribute '_parameters'"),
    # names that pass a check anchored with `$` (trailing newline)
    "function name with newline": (call("torch.relu\n", X), re.escape(REFUSED_CALL.format(repr("torch.relu\n")[1:-1]))),
    "attribute name with newline": (module_attr("a", "in_features\n", 4), r"refusing attribute 'in_features\\n'"),
    "class name with newline": (lambda spec, marker: spec.update(class_name="Base\n"), re.escape("bad class name " + repr("Base\n"))),
    # the interpreter and the operating system
    "os.system": (call("os.system", "touch MARKER"), REFUSED_CALL.format("os.system")),
    "builtins.eval": (call("builtins.eval", "open('MARKER', 'w')"), REFUSED_CALL.format("builtins.eval")),
    "eval": (call("eval", "open('MARKER', 'w')"), REFUSED_CALL.format("eval")),
    "exec": (call("exec", "open('MARKER', 'w')"), REFUSED_CALL.format("exec")),
    "__import__": (call("__import__", "os"), REFUSED_CALL.format("__import__")),
    "builtins.__import__": (call("builtins.__import__", "os"), REFUSED_CALL.format("builtins.__import__")),
    "importlib.import_module": (call("importlib.import_module", "os"), REFUSED_CALL.format("importlib.import_module")),
    "subprocess.check_call": (call("subprocess.check_call", ["touch", MARKER]), REFUSED_CALL.format("subprocess.check_call")),
    "subprocess.Popen as module class": (set_class("subprocess.Popen", args=["touch", MARKER]),
                                         "refusing to rebuild module a of class subprocess.Popen"),
    "operator.methodcaller": (call("operator.methodcaller", "system", MARKER), REFUSED_CALL.format("operator.methodcaller")),
    "operator.attrgetter": (call("operator.attrgetter", "__class__"), REFUSED_CALL.format("operator.attrgetter")),
    "functools.partial": (call("functools.partial", {"function": "torch.relu"}, X), REFUSED_CALL.format("functools.partial")),
    "class constructor int": (call("int", "7"), REFUSED_CALL.format("int")),
    # getattr chains, methods and dunder members
    "getattr __class__ chain": (chain(("g1", "call_function", "getattr", [{"node": "x"}, "__class__"]),
                                      ("g2", "call_function", "getattr", [{"node": "g1"}, "__init__"])),
                                "node 'g1': getattr of .*'__class__'"),
    "getattr __globals__ of a function": (chain(("g1", "call_function", "getattr", [{"function": "torch.relu"}, "__globals__"])),
                                          "node 'g1': getattr of .*'__globals__'"),
    "getattr grad_fn then register_hook": (chain(
        ("g1", "call_function", "getattr", [{"node": "x"}, "grad_fn"]),
        ("g2", "call_method", "register_hook", [{"node": "g1"}, {"function": "torch.neg"}])), "getattr of .*'grad_fn'"),
    "getattr data then untyped_storage": (chain(
        ("g1", "call_function", "getattr", [{"node": "x"}, "data"]),
        ("g2", "call_method", "untyped_storage", [{"node": "g1"}])), "method name 'untyped_storage' is refused"),
    "method numpy then tofile": (chain(("g1", "call_method", "numpy", [{"node": "x"}]),
                                       ("g2", "call_method", "tofile", [{"node": "g1"}, MARKER])),
                                 "method name 'numpy' is refused"),
    "method register_hook": (chain(("g1", "call_method", "register_hook", [{"node": "x"}, {"function": "torch.neg"}])),
                             "method name 'register_hook' is refused"),
    "method __reduce_ex__": (lambda spec, marker: _node(spec, "relu").update(op="call_method", target="__reduce_ex__"),
                             "method name '__reduce_ex__' is refused"),
    "method __setattr__": (lambda spec, marker: _node(spec, "relu").update(op="call_method", target="__setattr__"),
                           "method name '__setattr__' is refused"),
    "method on a constant": (lambda spec, marker: _node(spec, "relu").update(op="call_method", target="split",
                                                                            args=_t(MARKER, "/")),
                             "method 'split' must be called on a graph value"),
    "call_module dunder target": (lambda spec, marker: _node(spec, "a").update(target="a.__class__"),
                                  "call_module 'a.__class__' does not name a saved submodule"),
    "get_attr of a module": (lambda spec, marker: _node(spec, "scale").update(target="a"),
                             "get_attr 'a' does not name a saved tensor"),
    "child named __class__": (lambda spec, marker: spec["root"]["children"].update(
        {"__class__": spec["root"]["children"]["a"]}), "refusing member name '__class__'"),
    "child named forward": (lambda spec, marker: spec["root"]["children"]["bn"]["children"].update(
        {"forward": spec["root"]["children"]["a"]}), "refusing member name 'forward'"),
    # code injection through names that torch.fx writes into generated code
    "node name injection": (raw(lambda text, marker: text.replace(
        '"relu"', json.dumps(f"x = __import__('os').system('touch {marker}')#"))), "refusing node name"),
    "keyword name injection": (lambda spec, marker: _node(spec, "relu").update(kwargs=_kw(**{
        "input=__import__('os').system('touch MARKER') or x, other": 1})), "refusing keyword names"),
    "member name injection": (lambda spec, marker: (
        spec["root"]["children"].update({'a"), __import__("os").system("touch MARKER"), ("':
                                         spec["root"]["children"].pop("a")}),
        _node(spec, "a").update(target='a"), __import__("os").system("touch MARKER"), ("')),
        "refusing member name"),
    "placeholder injection": (lambda spec, marker: _node(spec, "x").update(
        target="x=__import__('os').system('touch MARKER')"), "bad placeholder"),
    "device string injection": (lambda spec, marker: _node(spec, "relu").update(
        target="torch.zeros", args=_t(1), kwargs=_kw(device={"device": "cpu'); import os; ('"})), "malformed value"),
    # classes that are not allowed
    "user class without allow": (set_class("fxprune.models._Block"),
                                 "refusing to rebuild module a of class fxprune.models._Block"),
    "nested GraphModule": (set_class("torch.fx.graph_module.GraphModule"),
                           "refusing to rebuild module a of class torch.fx.graph_module.GraphModule"),
    "script module": (set_class("torch.jit._script.RecursiveScriptModule"),
                      "refusing to rebuild module a of class torch.jit._script.RecursiveScriptModule"),
    # tensors: path traversal in keys, resizing, dtypes
    "path traversal in a tensor key": (rename_tensor("conv.weight", "../../MARKER"), "bad tensor key '../../"),
    "absolute path as tensor key": (rename_tensor("conv.bias", "/tmp/MARKER"), "bad tensor key '/tmp/"),
    "extra tensor with traversal key": (replace_tensor("../../../etc/passwd", torch.zeros(1)),
                                        "holds tensors no module uses: '../../../etc/passwd'"),
    "conv weight resized": (replace_tensor("conv.weight", torch.zeros(4, 3, 1, 9)),
                            r"module conv: tensor parameter 'weight' has shape \(4, 3, 1, 9\).*needs \(4, 3, 3, 3\)"),
    "conv bias resized": (replace_tensor("conv.bias", torch.zeros(5)), r"parameter 'bias' has shape \(5,\)"),
    "batchnorm statistics resized": (replace_tensor("bn.running_mean", torch.zeros(6)),
                                     r"module bn: tensor buffer 'running_mean' has shape \(6,\)"),
    "linear weight resized": (replace_tensor("a.weight", torch.zeros(4, 5)), r"module a: tensor parameter 'weight'"),
    "weight stored as integers": (replace_tensor("conv.weight", torch.zeros(4, 3, 3, 3, dtype=torch.int64)),
                                  "'weight' has dtype torch.int64"),
    "counter stored as float": (replace_tensor("bn.num_batches_tracked", torch.zeros(())),
                                "'num_batches_tracked' has dtype torch.float32"),
    "hostile size in attributes": (module_attr("a", "in_features", 10 ** 12),
                                   r"'weight' has shape \(4, 4\), but .* needs \(4, 1000000000000\)"),
    "deeply nested JSON": (raw(lambda text, marker: text.replace('"x"', "[" * 100000 + "]" * 100000, 1)),
                           "not valid JSON"),
}
TRUNCATIONS = {"truncated tensors": 0.5, "truncated header": 0.001}


def _attempt(saved, tmp_path, edit, raw_text=False):
    import shutil

    global _EVENTS
    d = tmp_path / "model"
    shutil.copytree(saved, d)
    marker = tmp_path / "marker"
    graph_path, tensor_path = d / "graph.json", d / "model.safetensors"
    if raw_text:
        graph_path.write_text(edit(graph_path.read_text(), marker))
    else:
        spec = json.loads(graph_path.read_text())
        nargs = edit.__code__.co_argcount if hasattr(edit, "__code__") else 2
        if nargs == 3:
            tensors = load_file(str(tensor_path))
            edit(spec, marker, tensors)
            tensors = {k.replace(MARKER, str(marker)): v for k, v in tensors.items()}
            save_file(tensors, str(tensor_path))
        else:
            edit(spec, marker)
        graph_path.write_text(json.dumps(spec).replace(MARKER, str(marker)))
    events = []
    _EVENTS = events
    try:
        with pytest.raises(CheckpointError) as info:
            fio.load(d)
    finally:
        _EVENTS = None
    assert not marker.exists(), "the payload ran"
    assert not _forbidden(events, d), _forbidden(events, d)
    return str(info.value)


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_hostile_payload_is_refused(saved, tmp_path, name):
    edit, expected = PAYLOADS[name]
    message = _attempt(saved, tmp_path, edit, raw_text=getattr(edit, "raw", False))
    assert re.search(expected, message), message


@pytest.mark.parametrize("name", list(TRUNCATIONS))
def test_truncated_tensor_file_is_refused(saved, tmp_path, name):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(saved, d)
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[: max(1, int(len(blob) * TRUNCATIONS[name]))])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        fio.load(d)


def test_the_unedited_file_loads(saved):
    """The base model itself loads under the audit hook without any forbidden event."""
    global _EVENTS
    events = []
    _EVENTS = events
    try:
        gm = fio.load(saved)
    finally:
        _EVENTS = None
    assert not [e for e, _ in events if e.startswith(("os.system", "os.exec", "os.posix_spawn", "subprocess.",
                                                      "import", "socket.", "ctypes."))]
    x = torch.randn(2, 3, 5, 5)
    ref = torch.fx.symbolic_trace(Base().eval())
    ref.load_state_dict(gm.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), ref(x))
