"""Errors raised by fxprune.

Every error that concerns a graph node names the node, its op and target, and the user's
source line that created it (``node.stack_trace`` / ``node.meta["stack_trace"]``), so a bad
input never ends in a bare torch.fx traceback or, worse, a silently wrong model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # this module is imported by the command line before torch is
    import torch.fx


class FxPruneError(Exception):
    """Base class of every error fxprune raises on purpose."""


def describe_node(node: Optional[torch.fx.Node]) -> str:
    """One line naming a node: ``node 'add_3' (call_function operator.add) at model.py:42``."""
    if node is None:
        return "<no node>"
    target = node.target
    if callable(target):
        target = getattr(target, "__module__", "") + "." + getattr(target, "__name__", repr(target))
    where = source_line(node)
    text = f"node '{node.name}' ({node.op} {target})"
    return f"{text} at {where}" if where else text


def source_line(node: torch.fx.Node) -> str:
    """The innermost user source location recorded for ``node``, as ``file:line``, or ''."""
    trace = node.meta.get("stack_trace") or getattr(node, "stack_trace", None)
    if not trace:
        return ""
    last = ""
    for line in trace.strip().splitlines():
        line = line.strip()
        if line.startswith("File "):
            parts = line.split(",")
            if len(parts) >= 2:
                last = parts[0][5:].strip().strip('"') + ":" + parts[1].strip().removeprefix("line ")
    return last


class TraceError(FxPruneError):
    """The model could not be traced by torch.fx symbolic tracing.

    The message names the module path being traced, the user's source line, the underlying
    torch.fx error, and how to fix it (``leaf_modules=`` or ``concrete_args=``).
    """


class UnsupportedInputError(FxPruneError):
    """``example_inputs`` or options that fxprune cannot use (wrong type, empty, ...)."""


class RewriteError(FxPruneError):
    """The prune rewrite could not produce a valid slim model (names the node)."""

    def __init__(self, message: str, node: Optional[torch.fx.Node] = None):
        super().__init__(f"{describe_node(node)}: {message}" if node is not None else message)
        self.node = node


class VerificationError(FxPruneError):
    """The slim model's output differs from the full model's beyond tolerance."""


class CheckpointError(FxPruneError):
    """A checkpoint or saved model is missing, truncated or corrupt."""


class ConfigError(FxPruneError, ValueError):
    """A setting of ``fxprune train`` (a command-line flag, a ``TrainConfig`` field) is out of
    range or conflicts with another; the message names the flag, ``flag`` holds it."""

    def __init__(self, message: str, flag: Optional[str] = None):
        super().__init__(message)
        self.flag = flag


class DatasetError(FxPruneError):
    """The training data cannot be used: a folder without images, a single class, an image that
    cannot be decoded (the message names the folder or file)."""


class RegionError(FxPruneError):
    """Region compile cannot use a submodule it was asked to (``compile(..., regions=[...])``),
    or a region's GraphModule is called with inputs other than those it was built for (names
    the region and the argument)."""


class ExportError(FxPruneError):
    """A model could not be written as a torch.export program or an ONNX file (names the node
    where the exporter failed, when it can be found)."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``"TypeName: first line of the message"`` (just the type name for an empty message),
    cut to ``limit`` characters: for error messages that quote another error."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text[:limit]
