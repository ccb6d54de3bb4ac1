"""Exporting a slim model to a deployable file, checked against the model after writing.

:func:`export` writes a module (a slim ``torch.fx.GraphModule`` from
``Program.construct_subnet()`` or :func:`fxprune.load`, or any exportable ``nn.Module``) as

``"pt2"``
    a ``torch.export`` program (``torch.export.export``, saved with ``torch.export.save``);
    reload it with ``torch.export.load(path).module()``.
``"onnx"``
    an ONNX model written by ``torch.onnx.export(..., dynamo=True)``. That exporter is torch's
    maintained one (the TorchScript exporter is deprecated since torch 2.9); it starts from the
    same ``torch.export`` graph as ``"pt2"``, runs offline, and needs the ``onnx`` and
    ``onnxscript`` packages. Pass ``dynamo=False`` for the TorchScript exporter.

and then reloads the file and compares its outputs with the module's (see :func:`export`).

By default the file takes any batch size, and token inputs any sequence length: the batch
dimension (dim 0 of every input whose dim 0 is the first input's) and the sequence dimension
(dim 1 of integer or boolean inputs of two or more dims) are ``torch.export.Dim`` objects in
``dynamic_shapes``, which both ``torch.export`` and the dynamo ONNX exporter take, and the file
is verified at the example's sizes and at another batch size and sequence length. A model
whose graph fixes those sizes (a ``view(1, ...)`` with a constant batch, as a graph captured
by ``torch.export`` at one input size has) raises :class:`fxprune.errors.ExportError` naming
the node; ``dynamic=False`` (``fxprune export --static``) writes fixed shapes.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_flatten

from .config import EXPORT_ATOL as ATOL, EXPORT_FORMATS as FORMATS, EXPORT_RTOL as RTOL
from .errors import ExportError, UnsupportedInputError, VerificationError, describe_node
from .program import _normalize_inputs, max_output_difference

_ONE_FILE_LIMIT = 2 ** 31 - 2 ** 26  # bytes of weights an ONNX protobuf file holds (2 GiB), with headroom


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote: ``path``, ``format`` ("onnx" or "pt2") and ``max_abs_diff``,
    the largest absolute difference between the reloaded file's outputs and the module's over
    the verification inputs (0.0 when verification was skipped)."""
    path: str
    format: str
    max_abs_diff: float


def export(module: nn.Module, example_inputs: Any, path: str | os.PathLike, format: str = "onnx", *,
           dynamic: bool = True, verify: bool = True, rtol: float = RTOL, atol: float = ATOL,
           **kw) -> ExportResult:
    """Write ``module`` to ``path`` as a torch.export program or an ONNX file and check it.

    ``example_inputs``: a tensor, a tuple/list of the positional inputs, or a dict of keyword
    inputs of ``module.forward``. With ``dynamic=True`` (default) the file takes any batch
    size, and integer or boolean inputs of two or more dims (token ids, attention masks) any
    sequence length (see :func:`dynamic_dims`); ``dynamic=False`` fixes every shape to the
    example's, as does a ``dynamic_shapes=`` of your own in ``kw``. The module is exported in
    eval mode (each submodule's own flag is restored afterwards). ``kw`` goes to
    ``torch.export.export`` (``"pt2"``) or to ``torch.onnx.export`` (``"onnx"``; defaults
    ``dynamo=True``, ``verbose=False``, and ``external_data`` only for weights over 2 GiB).
    Missing parent folders are created.

    Verification (``verify=True``) reloads the file (``torch.export.load`` and run, or
    onnxruntime's ``CPUExecutionProvider``) and runs it on the example inputs, on a second set
    with every floating-point input redrawn from a standard normal distribution (so that a
    value baked into the file from the example cannot pass) and, with ``dynamic=True``, on a
    set of another batch size and sequence length (:func:`resized_inputs`). It requires, over
    all output tensors, ``max |file - module| <= atol + rtol * max |module output|``; the
    defaults ``rtol=1e-4, atol=1e-5`` suit float32, where the runtimes reorder sums; integer
    outputs must match exactly.

    Returns an :class:`ExportResult`. Raises ``UnsupportedInputError`` for an unknown format or
    inputs the module cannot run on (naming the node of a GraphModule that fails on them),
    :class:`fxprune.errors.ExportError` when the exporter fails (naming the node it failed
    at when the traceback holds one), when ``dynamic=True`` and the model cannot take another
    batch size or sequence length (naming the node that fixes it), when the written file cannot
    be loaded or run, or when a package it needs is missing, and
    :class:`fxprune.errors.VerificationError` when the file's outputs differ in number, shape,
    integer values or beyond tolerance (the file is left in place for inspection).
    """
    if format not in FORMATS:
        raise UnsupportedInputError(f"export format must be one of {', '.join(FORMATS)}, not {format!r}")
    if not isinstance(module, nn.Module):
        raise UnsupportedInputError(f"fxprune.export takes a torch.nn.Module, not {type(module).__name__}")
    from .regions.calls import refuse_region_model

    refuse_region_model(module, "fxprune.export")
    from fxprune.passes.modes import eval_mode

    inputs = _normalize_inputs(module, example_inputs)
    path = os.fspath(path)
    dims = dynamic_dims(inputs) if dynamic and "dynamic_shapes" not in kw else None
    if dims is not None and not any(dims):
        dims = None  # no input has a batch dimension
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with eval_mode(module):
        _check_runs(module, inputs)
        checks = [inputs]
        export_inputs = inputs
        if dims is not None:
            other = resized_inputs(inputs, dims, _other_sizes(inputs, dims))
            _check_resizable(module, inputs, other, dims)
            checks.append(other)
            export_inputs = _at_least_two(inputs, dims, other)
            kw = {**kw, "dynamic_shapes": _dynamic_shapes(dims)}
        try:
            _WRITERS[format](module, export_inputs, path, kw)
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001 - any exporter failure becomes one error type
            hint = _STATIC_HINT if dims is not None and _is_constraint_violation(e) else ""
            raise ExportError(f"{format} export failed{_where(e, module)}: {_first_line(e)}{hint}") from e
        diff = _verify(module, checks, path, format, rtol, atol) if verify else 0.0
    return ExportResult(path, format, diff)


_STATIC_HINT = ("; export with fixed shapes instead: fxprune.export(..., dynamic=False), or "
                "`fxprune export --static`")
BATCH, SEQ = "batch", "seq"


def dynamic_dims(inputs: tuple) -> List[Dict[int, str]]:
    """For each input, its dynamic dims: ``{0: "batch"}`` for a tensor whose dim 0 equals the
    first tensor input's, plus ``{1: "seq"}`` for an integer or boolean one of two or more
    dims (token ids, attention masks); ``{}`` for every other input."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor) and x.dim() >= 1]
    if not tensors:
        return [{} for _ in inputs]
    batch = tensors[0].shape[0]
    out = []
    for x in inputs:
        dims: Dict[int, str] = {}
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == batch:
            dims[0] = BATCH
            if x.dim() >= 2 and not x.is_floating_point() and not x.is_complex():
                dims[1] = SEQ
        out.append(dims)
    return out


def _other_sizes(inputs: tuple, dims: List[Dict[int, str]]) -> Dict[str, int]:
    """Another batch size (one more) and sequence length (one less, or one more below 3)."""
    sizes = {}
    for x, d in zip(inputs, dims):
        for i, name in d.items():
            sizes.setdefault(name, int(x.shape[i]))
    out = {BATCH: sizes[BATCH] + 1} if BATCH in sizes else {}
    if SEQ in sizes:
        out[SEQ] = sizes[SEQ] - 1 if sizes[SEQ] >= 3 else sizes[SEQ] + 1
    return out


def resized_inputs(inputs: tuple, dims: List[Dict[int, str]], sizes: Dict[str, int], seed: int = 1) -> tuple:
    """``inputs`` with their dynamic dims set to ``sizes`` (e.g. ``{"batch": 3, "seq": 5}``):
    floating-point inputs redrawn from a standard normal distribution, integer ones drawn
    uniformly between the example's smallest and largest values (token ids stay in the
    vocabulary, an all-ones mask stays all ones), boolean ones like the example's first entry."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x, d in zip(inputs, dims):
        if not d:
            out.append(x)
            continue
        shape = list(x.shape)
        for i, name in d.items():
            shape[i] = sizes.get(name, shape[i])
        if x.is_floating_point():
            y = torch.randn(shape, generator=gen, dtype=x.dtype)
        elif x.dtype == torch.bool:
            y = torch.full(shape, bool(x.flatten()[0]) if x.numel() else True)
        else:
            lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 0)
            y = torch.randint(lo, hi + 1, shape, generator=gen, dtype=x.dtype)
        out.append(y.to(x.device))
    return tuple(out)


def _at_least_two(inputs: tuple, dims: List[Dict[int, str]], other: tuple) -> tuple:
    """The inputs torch.export traces with: a dynamic size of 1 would be specialised to the
    constant 1, so when the example has one, the resized set (sizes of 2 or more) is used."""
    ones = any(x.shape[i] == 1 for x, d in zip(inputs, dims) for i in d)
    return other if ones else inputs


def _dynamic_shapes(dims: List[Dict[int, str]]) -> tuple:
    """``dynamic_shapes`` for ``torch.export.export`` / ``torch.onnx.export(dynamo=True)``: one
    ``torch.export.Dim`` per name, shared by the inputs that have it."""
    from torch.export import Dim

    named = {name: Dim(name, min=1) for d in dims for name in d.values()}
    return tuple({i: named[name] for i, name in d.items()} or None for d in dims)


def _check_resizable(module: nn.Module, inputs: tuple, other: tuple, dims: List[Dict[int, str]]) -> None:
    """Run the module at the other sizes; if it cannot, name the node that fixes them."""
    try:
        with torch.no_grad():
            module(*other)
        return
    except Exception as e:  # noqa: BLE001 - the graph fixes a size: say where
        error = e
    sizes = ", ".join(f"{name} {x.shape[i]} -> {y.shape[i]}" for x, y, d in zip(inputs, other, dims)
                      for i, name in d.items())
    node = _size_fixing_node(module, inputs, other, dims)
    where = f" at {describe_node(node)}" if node is not None else _located(module, other)
    raise ExportError(f"the model does not run at other input sizes ({sizes}): it fixes the batch size or "
                      f"sequence length{where} ({_first_line(error)}){_STATIC_HINT}") from error


def _located(module: nn.Module, inputs: tuple) -> str:
    """`` at node ...`` for the GraphModule node that fails on ``inputs``, or ''."""
    if not isinstance(module, torch.fx.GraphModule):
        return ""
    try:
        with torch.no_grad():
            torch.fx.Interpreter(module).run(*inputs)
    except Exception as e:  # noqa: BLE001
        return _where(e, module)
    return ""


class _FirstDims(torch.fx.Interpreter):
    """Runs a GraphModule and records each node's tensor output shape until a node fails. The
    input guards of a graph captured by ``torch.export`` (``_guards_fn``, which check the
    capture's sizes) are passed over, so that the op that fixes a size is reached."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.shapes: Dict[torch.fx.Node, tuple] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op == "call_module" and n.target == "_guards_fn":
            return None
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
        return out


def _size_fixing_node(module: nn.Module, inputs: tuple, other: tuple, dims) -> Optional[torch.fx.Node]:
    """The first node of a GraphModule that sets its output's shape from its arguments, whose
    input's dim 0 follows the batch size while its output's dim 0 stays as it was (a
    ``view(1, ...)`` with the batch size as a constant)."""
    if not isinstance(module, torch.fx.GraphModule) or not any(0 in d for d in dims):
        return None
    runs = []
    for xs in (inputs, other):
        run = _FirstDims(module)
        try:
            with torch.no_grad():
                run.run(*xs)
        except Exception:  # noqa: BLE001 - the shapes up to the failing node are kept
            pass
        runs.append(run.shapes)
    a, b = runs
    for n in module.graph.nodes:
        if n not in a or n not in b or not a[n] or not b[n] or not _sets_shape(n):
            continue
        ins = [x for x in n.all_input_nodes if x in a and x in b and a[x] and b[x]]
        if any(a[x][0] != b[x][0] for x in ins) and a[n][0] == b[n][0]:
            return n
    return None


_SHAPE_SETTERS = {"view", "reshape", "expand", "broadcast_to", "_unsafe_view", "new_zeros", "new_ones", "new_empty",
                  "new_full", "zeros", "ones", "empty", "full", "arange"}


def _sets_shape(n: torch.fx.Node) -> bool:
    """The node's output shape is given by its arguments (``view``, ``reshape``, ``expand``,
    factories), so a constant there can fix the batch size."""
    if n.op == "call_method":
        return n.target in _SHAPE_SETTERS
    if n.op == "call_function":
        name = getattr(n.target, "_opname", None) or getattr(n.target, "__name__", "")
        return name in _SHAPE_SETTERS
    return False


def _is_constraint_violation(e: BaseException) -> bool:
    """torch.export found that the model fixes a size marked dynamic."""
    while e is not None:
        if "Constraints violated" in str(e) or "specialized" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _verify(module: nn.Module, checks: List[tuple], path: str, format: str, rtol: float,
            atol: float) -> float:
    """Reload the file, compare it with ``module`` on each verification input set (the example
    inputs with their floats redrawn too, and each set of ``checks``) and return the largest
    absolute output difference."""
    try:
        reloaded = _Reloaded(_RELOADERS[format](path))
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{path} was written but cannot be loaded: {_first_line(e)}") from e
    worst = 0.0
    for check_inputs in _verification_inputs(checks[0]) + list(checks[1:]):
        try:
            diff, scale = max_output_difference(module, reloaded, check_inputs)
        except VerificationError as e:  # a different number, shape or integer value of outputs
            raise VerificationError(f"{path}: {e}") from e
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"{path} was written but does not run: {_first_line(e)}") from e
        if diff > atol + rtol * scale:
            raise VerificationError(
                f"{path}: the {format} file's outputs differ from the module's by up to {diff:.3e} "
                f"(allowed: atol {atol:g} + rtol {rtol:g} * max |output| {scale:.3e})")
        worst = max(worst, diff)
    return worst


# --------------------------------------------------------------------------------------------
# writing and reloading


def _write_pt2(module: nn.Module, inputs: tuple, path: str, kw: dict) -> None:
    torch.export.save(torch.export.export(module, inputs, **kw), path)


def _reload_pt2(path: str) -> Callable:
    # the module torch.export.load gives refuses .eval(), which the comparison calls on
    # modules, so it is handed over as a plain callable
    return torch.export.load(path).module().__call__


def _write_onnx(module: nn.Module, inputs: tuple, path: str, kw: dict) -> None:
    weight_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    kw = {"dynamo": True, "verbose": False, "external_data": weight_bytes > _ONE_FILE_LIMIT, **kw}
    if kw["dynamo"]:
        _require("onnxscript", "the ONNX exporter")
    elif kw.get("dynamic_shapes") is not None:  # the TorchScript exporter names dynamic axes instead
        shapes = kw.pop("dynamic_shapes")
        names = kw.setdefault("input_names", [f"input_{i}" for i in range(len(shapes))])
        kw.setdefault("dynamic_axes", {name: {i: dim.__name__ for i, dim in spec.items()}
                                       for name, spec in zip(names, shapes) if spec})
    with warnings.catch_warnings():
        # inputs sharing a Dim share its name in the file; the exporter says so for each
        warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
        torch.onnx.export(module, inputs, path, **kw)


def _reload_onnx(path: str) -> Callable:
    ort = _require("onnxruntime", "verifying an ONNX file")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*inputs) -> List[torch.Tensor]:
        tensors = [x for x in tree_flatten(inputs)[0] if isinstance(x, torch.Tensor)]
        if len(tensors) != len(names):
            raise ExportError(f"the ONNX graph takes {len(names)} inputs ({', '.join(names)}), "
                              f"the module {len(tensors)} tensors")
        feed = {n: x.detach().cpu().numpy() for n, x in zip(names, tensors)}
        return [torch.from_numpy(y) for y in session.run(None, feed)]

    return run


_WRITERS = {"pt2": _write_pt2, "onnx": _write_onnx}
_RELOADERS = {"pt2": _reload_pt2, "onnx": _reload_onnx}


class _Reloaded(nn.Module):
    """A reloaded file as a module, so that it is compared the way slim models are."""

    def __init__(self, run: Callable):
        super().__init__()
        self.run = run

    def forward(self, *inputs):
        return self.run(*inputs)


def _require(package: str, purpose: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ExportError(f"{purpose} needs the {package} package: pip install {package}") from e


# --------------------------------------------------------------------------------------------
# inputs and failures


def _check_runs(module: nn.Module, inputs: Sequence) -> None:
    """Run the module once; on failure name the GraphModule node that raised."""
    try:
        with torch.no_grad():
            module(*inputs)
    except Exception as e:  # noqa: BLE001 - whatever fails, the inputs do not fit
        where = ""
        if isinstance(module, torch.fx.GraphModule):  # rerun node by node to find where
            try:
                with torch.no_grad():
                    torch.fx.Interpreter(module).run(*inputs)
            except Exception as again:  # noqa: BLE001
                where = _where(again, module)
        raise UnsupportedInputError(f"the module cannot run on the example inputs{where}: "
                                    f"{_first_line(e)}") from e


def _verification_inputs(inputs: tuple) -> List[tuple]:
    """The example inputs, then (if any is floating point) a copy with those redrawn."""
    gen = torch.Generator().manual_seed(0)
    leaves, spec = tree_flatten(inputs)
    if not any(isinstance(x, torch.Tensor) and x.is_floating_point() for x in leaves):
        return [inputs]
    redrawn = [torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
               if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in leaves]
    return [inputs, spec.unflatten(redrawn)]


def _node_in_traceback(exc: BaseException, module: nn.Module) -> Optional[torch.fx.Node]:
    """The innermost node of ``module``'s graph held by a frame of ``exc``'s traceback or of the
    exceptions it was raised from (torch.fx's Interpreter, which torch.export also runs a
    GraphModule with, holds the node it is executing)."""
    graph = getattr(module, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return None
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            for value in tb.tb_frame.f_locals.values():
                if isinstance(value, torch.fx.Node) and value.graph is graph:
                    found = value
            tb = tb.tb_next
        if found is not None:
            return found
        exc = exc.__cause__ or exc.__context__
    return None


def _where(exc: BaseException, module: nn.Module) -> str:
    node = _node_in_traceback(exc, module)
    return f" at {describe_node(node)}" if node is not None else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
