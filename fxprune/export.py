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
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_flatten

from .errors import ExportError, UnsupportedInputError, VerificationError, describe_node
from .program import _normalize_inputs, max_output_difference

FORMATS = ("onnx", "pt2")
RTOL = 1e-4
ATOL = 1e-5
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
           verify: bool = True, rtol: float = RTOL, atol: float = ATOL, **kw) -> ExportResult:
    """Write ``module`` to ``path`` as a torch.export program or an ONNX file and check it.

    ``example_inputs``: a tensor, a tuple/list of the positional inputs, or a dict of keyword
    inputs of ``module.forward``; shapes are fixed to theirs unless ``kw`` asks otherwise
    (``dynamic_shapes=``). The module is exported in eval mode (each submodule's own flag is
    restored afterwards). ``kw`` goes to ``torch.export.export`` (``"pt2"``) or to
    ``torch.onnx.export`` (``"onnx"``; defaults ``dynamo=True``, ``verbose=False``, and
    ``external_data`` only for weights over 2 GiB). Missing parent folders are created.

    Verification (``verify=True``) reloads the file (``torch.export.load`` and run, or
    onnxruntime's ``CPUExecutionProvider``) and runs it on the example inputs and on a second
    set with every floating-point input redrawn from a standard normal distribution (so that a
    value baked into the file from the example cannot pass). It requires, over all output
    tensors, ``max |file - module| <= atol + rtol * max |module output|``; the defaults
    ``rtol=1e-4, atol=1e-5`` suit float32, where the runtimes reorder sums; integer outputs must
    match exactly.

    Returns an :class:`ExportResult`. Raises ``UnsupportedInputError`` for an unknown format or
    inputs the module cannot run on (naming the node of a GraphModule that fails on them),
    :class:`fxprune.errors.ExportError` when the exporter fails (naming the node it failed
    at when the traceback holds one), the written file cannot be loaded or run, or a package
    it needs is missing, and :class:`fxprune.errors.VerificationError` when the file's outputs
    differ in number, shape, integer values or beyond tolerance (the file is left in place for
    inspection).
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with eval_mode(module):
        _check_runs(module, inputs)
        try:
            _WRITERS[format](module, inputs, path, kw)
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001 - any exporter failure becomes one error type
            raise ExportError(f"{format} export failed{_where(e, module)}: {_first_line(e)}") from e
        diff = _verify(module, inputs, path, format, rtol, atol) if verify else 0.0
    return ExportResult(path, format, diff)


def _verify(module: nn.Module, inputs: tuple, path: str, format: str, rtol: float,
            atol: float) -> float:
    """Reload the file, compare it with ``module`` on each verification input set and return
    the largest absolute output difference."""
    try:
        reloaded = _Reloaded(_RELOADERS[format](path))
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{path} was written but cannot be loaded: {_first_line(e)}") from e
    worst = 0.0
    for check_inputs in _verification_inputs(inputs):
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
