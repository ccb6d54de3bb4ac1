"""Front end: torch.fx symbolic tracing, with errors that say where and how to fix.

The default tracer keeps torch.nn modules as leaves (as torch.fx does), plus modules whose
forward depends on ``self.training`` at run time (torchvision's ``StochasticDepth``), so that
the traced graph trains and evaluates like the model. Users add leaves by class or qualified
name (``leaf_modules``), fix arguments (``concrete_args``), or pass a tracer of their own.
"""
from __future__ import annotations

import contextlib
import inspect
import linecache
import logging
import math
import os
import traceback
import types
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import torch
import torch.fx
from torch.fx._symbolic_trace import _assert_is_none

from fxprune.errors import TraceError

from .autograd_functions import collapse_marked, marked_for_export, opaque_for_fx
from .modes import eval_mode


def training_dependent_modules() -> Tuple[type, ...]:
    """Modules whose forward branches on ``self.training`` (stochastic depth): kept as leaves so
    the traced graph trains with them and evaluates without them."""
    leaves = []
    try:
        from torchvision.ops import StochasticDepth

        leaves.append(StochasticDepth)
    except ImportError:
        pass
    try:
        from timm.layers import DropPath

        leaves.append(DropPath)
    except ImportError:
        pass
    return tuple(leaves)


def functions_to_trace_through() -> Tuple[Callable, ...]:
    """Functions that a library hides from symbolic tracing with ``torch.fx.wrap`` (their
    bodies branch on tensor shapes) although fxprune needs their bodies to follow channels:
    torchvision Swin's windowed attention and relative-position bias, whose heads, projections
    and bias tables would otherwise all be frozen.

    Symbolic tracing cannot take these bodies, so :class:`FxPruneTracer` stops at a call to
    one of them and ``fxprune.compile`` (``frontend="auto"``) falls back to ``torch.export``,
    which traces them with concrete shapes into ATen ops the registry knows.
    """
    try:
        from torchvision.models import swin_transformer
    except ImportError:
        return ()
    return tuple(getattr(swin_transformer, n) for n in ("shifted_window_attention", "_get_relative_position_bias")
                 if callable(getattr(swin_transformer, n, None)))


def wrapped_functions() -> set:
    """``id`` of every function hidden from symbolic tracing: registered with ``torch.fx.wrap``
    (torchvision's ``_unsqueeze``, ``roi_align`` ...) or in timm's registry of non-traceable
    functions. Symbolic tracing records a call to one as a single opaque node."""
    from torch.fx import _symbolic_trace

    ids = {id(g.get(name)) for (_, name), g in getattr(_symbolic_trace, "_wrapped_fns_to_patch", {}).items()
           if g.get(name) is not None}
    try:
        from timm.models._features_fx import get_notrace_functions
    except ImportError:
        return ids
    return ids | {id(f) for f in get_notrace_functions()}


class OpaqueFunctionError(RuntimeError):
    """A call to a function of :func:`functions_to_trace_through` met during symbolic tracing."""


class FxPruneTracer(torch.fx.Tracer):
    """A :class:`torch.fx.Tracer` with user leaf modules and traceable error reports.

    Args:
        leaf_modules: module classes or qualified names kept as single ``call_module`` nodes
            (fxprune freezes the channels they touch unless the registry knows the class).
        trace_through: ``torch.fx.wrap``-ped functions that must not become opaque nodes:
            tracing stops with :class:`OpaqueFunctionError` where one is called (default:
            :func:`functions_to_trace_through`; ``()`` keeps every wrapped function opaque).
    """

    def __init__(self, leaf_modules: Iterable[Union[type, str]] = (),
                 trace_through: Optional[Iterable[Callable]] = None, **kwargs):
        from .ops_full_count import FUNCTIONS, LEAF_MODULES  # a slim model's count-preserving norms

        kwargs.setdefault("autowrap_modules", (math,))
        kwargs.setdefault("autowrap_functions", FUNCTIONS)
        super().__init__(**kwargs)
        self.modules_done = 0  # module calls traced to their end (how far a failed trace got)
        leaf_modules = tuple(leaf_modules)
        self.leaf_types = (tuple(m for m in leaf_modules if isinstance(m, type)) + training_dependent_modules()
                           + LEAF_MODULES)
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.trace_through = tuple(functions_to_trace_through() if trace_through is None else trace_through)

    def create_proxy(self, kind, target, args, kwargs, *rest, **kw):
        if kind == "call_function" and any(target is f for f in self.trace_through):
            raise OpaqueFunctionError(
                f"{target.__module__}.{target.__qualname__} is hidden from symbolic tracing by torch.fx.wrap and "
                f"its channels can only be followed through its body; torch.export traces it "
                f"(fxprune.compile(..., frontend='export'), which frontend='auto' falls back to)")
        return super().create_proxy(kind, target, args, kwargs, *rest, **kw)

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        if torch.nn.utils.parametrize.is_parametrized(m) or isinstance(m, torch.nn.utils.parametrize.ParametrizationList) \
                or ".parametrizations." in f".{module_qualified_name}":
            # its weight is computed (weight norm, spectral norm): traced through, so the graph
            # reads the real parameters and the computation has its own rule
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            out = super().call_module(m, forward, args, kwargs)
            self.modules_done += 1
            return out
        except Exception as exc:
            if not hasattr(exc, "_fxprune_module"):
                try:
                    exc._fxprune_module = (self.path_of_module(m), type(m).__qualname__)
                except Exception:
                    exc._fxprune_module = ("?", type(m).__qualname__)
            raise


def _user_frame(tb) -> Optional[traceback.FrameSummary]:
    """Innermost frame of the traceback outside torch itself."""
    import fxprune

    # directories with a trailing separator: torch's must not also match torchvision's
    skip = tuple(os.path.join(os.path.dirname(f), "") for f in (torch.__file__, __file__, fxprune.__file__))
    frames = traceback.extract_tb(tb)
    for fr in reversed(frames):
        if not fr.filename.startswith(skip):
            return fr
    return frames[-1] if frames else None


def trace(model: torch.nn.Module, *, leaf_modules: Iterable[Union[type, str]] = (),
          concrete_args: Optional[Dict[str, Any]] = None, tracer: Optional[torch.fx.Tracer] = None
          ) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` into a GraphModule that shares its parameters.

    A ``torch.fx.GraphModule`` is returned as it is. Raises :class:`fxprune.TraceError`
    naming the module path, the source line and the fixes when tracing fails.
    """
    if isinstance(model, torch.fx.GraphModule):
        return model
    tr = tracer if tracer is not None else FxPruneTracer(leaf_modules)
    try:
        # Python branches on self.training are resolved as in inference; custom autograd
        # Functions stay single opaque calls, so that their own backward runs
        with eval_mode(model), opaque_for_fx():
            graph = tr.trace(model, concrete_args=concrete_args)
    except Exception as exc:
        err = _trace_error(model, exc)
        err.modules_done = getattr(tr, "modules_done", 0)
        raise err from exc
    if concrete_args:
        _inline_concrete(graph, concrete_args, list(inspect.signature(model.forward).parameters))
    name = model.__class__.__name__
    gm = graph_module(tr.root, graph, name)
    _set_container_flags(gm, model)
    return gm


def _set_container_flags(gm: torch.fx.GraphModule, model: torch.nn.Module) -> None:
    """The GraphModule and the plain ``nn.Module`` containers torch.fx creates for the paths
    to its submodules get the model's train/eval flag (they are created in training mode);
    the model's own submodules keep theirs."""
    own = {id(m) for m in model.modules()}
    stack = [gm]
    while stack:
        m = stack.pop()
        if id(m) in own:
            continue
        m.training = model.training
        stack.extend(c for c in m._modules.values() if c is not None)


def graph_module(root: torch.nn.Module, graph: torch.fx.Graph, name: str) -> torch.fx.GraphModule:
    """A GraphModule whose Python code is generated when it is first needed (its first call, or
    ``.code``): torch.fx's lazy GraphModule, as ``torch.compile`` uses it. Analyses read only the
    graph, and generating and compiling the code of a 250-node graph costs about 7 ms."""
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:  # pragma: no cover - older torch
        return torch.fx.GraphModule(root, graph, name)
    return _LazyGraphModule(root, graph, name)


def realize(gm: torch.nn.Module) -> torch.nn.Module:
    """Generate a lazy GraphModule's code now, so that ``forward`` has its real signature (for
    ``inspect.signature``, ``torch.export``, the ONNX exporter). Returns ``gm``."""
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:  # pragma: no cover - older torch
        return gm
    _LazyGraphModule.force_recompile(gm)
    return gm


def timm_tracer(leaf_modules: Iterable[Union[type, str]] = ()) -> Optional[FxPruneTracer]:
    """A tracer that also keeps timm's registered non-traceable modules as leaves and wraps its
    non-traceable functions (``timm.models._features_fx``); None when timm is not installed."""
    try:
        from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    except ImportError:
        return None
    return FxPruneTracer(tuple(leaf_modules) + tuple(get_notrace_modules()),
                         autowrap_functions=tuple(get_notrace_functions()))


def _inline_concrete(graph: torch.fx.Graph, concrete_args: Dict[str, Any], names: list) -> None:
    """torch.fx keeps a concrete argument as a placeholder guarded by an assert; fold the value
    in and drop the placeholder, so the GraphModule takes only the free inputs. Placeholders
    follow the order of ``forward``'s parameters (their names may carry a suffix)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for name, node in zip(names, placeholders):
        if name not in concrete_args:
            continue
        value = concrete_args[name]
        for user in list(node.users):
            if user.op == "call_function" and user.target is _assert_is_none and not user.users:
                graph.erase_node(user)  # torch.fx's guard of a None argument: checks the value folded in
                continue
            user.args = torch.fx.node.map_arg(user.args, lambda a: value if a is node else a)
            user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
        graph.erase_node(node)


def export(model: torch.nn.Module, example_inputs: tuple, dynamic: bool = False) -> torch.fx.GraphModule:
    """Second front end: ``torch.export`` (non-strict) to an ATen-level GraphModule, for models
    symbolic tracing cannot take (HuggingFace transformers 5, which has no fx tracer).

    The graph is exported in eval mode and, for HuggingFace models, without the key/value cache
    (:func:`no_kv_cache`); its parameters are re-pointed at the model's own, so training the
    GraphModule trains the model; custom ``torch.autograd.Function`` calls are kept
    as opaque calls (:mod:`fxprune.passes.autograd_functions`). With ``dynamic`` every dim of
    every tensor input is ``torch.export.Dim.AUTO``: sizes the code does not specialise (a
    sequence length, a number of boxes) stay symbolic, so the graph takes other sizes than the
    example's (dims of size 0 or 1 are always specialised); if that export fails, a static one
    is tried. Raises :class:`fxprune.TraceError`, whose ``modules_done`` counts the module
    calls that ran to their end before the failure.
    """
    inputs = tuple(example_inputs)
    done = [0]

    def count(module, args, output):
        done[0] += 1

    hook = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        with eval_mode(model), no_kv_cache(model), marked_for_export() as marks:
            gm = None
            if dynamic and all(isinstance(x, torch.Tensor) for x in inputs):
                shapes = tuple({d: torch.export.Dim.AUTO for d in range(x.dim())} for x in inputs)
                log = logging.getLogger("torch._export.non_strict_utils")  # notes every size-1 dim it specialises
                level = log.level
                log.setLevel(logging.ERROR)
                try:
                    gm = torch.export.export(model, inputs, dynamic_shapes=shapes, strict=False).module()
                except Exception:  # noqa: BLE001 - the static export below reports the error
                    gm = None
                    marks.calls.clear()
                finally:
                    log.setLevel(level)
            if gm is None:
                done[0] = 0
                gm = torch.export.export(model, inputs, strict=False).module()
    except Exception as exc:
        text = str(exc).strip()
        text = text[:2000] + " ..." if len(text) > 2000 else text
        err = TraceError(f"torch.export cannot export {type(model).__qualname__}: {type(exc).__name__}: {text}")
        err.modules_done = done[0]
        raise err from exc
    finally:
        hook.remove()
    if marks.calls:  # custom autograd Functions: their inlined forwards become opaque calls again
        collapse_marked(gm, marks)
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(dict(model.named_buffers(remove_duplicate=False)))
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        src = own.get(name)
        if src is not None and src.shape == t.shape and src is not t:
            path, _, attr = name.rpartition(".")
            owner = gm.get_submodule(path) if path else gm
            if isinstance(src, torch.nn.Parameter):
                owner._parameters[attr] = src
            else:
                owner._buffers[attr] = src
    # an exported graph has its eval-mode semantics baked in; let train()/eval() just set flags
    gm.train = types.MethodType(torch.nn.Module.train, gm)
    gm.eval = types.MethodType(torch.nn.Module.eval, gm)
    return gm


@contextlib.contextmanager
def no_kv_cache(model: torch.nn.Module):
    """Run with ``use_cache=False`` in every HuggingFace config inside ``model`` (restored after).

    A decoder built with its default ``use_cache=True`` returns its key/value cache (a
    ``transformers.DynamicCache``) from ``forward``; torch.export refuses that type in an
    output, and were it registered as a pytree its tensors would be model outputs, which
    freezes every attention-head group. The graph is the same without it: the cache is only
    written, never read, by a call that is given none.
    """
    saved = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and id(cfg) not in saved and getattr(cfg, "use_cache", None) is True:
            saved[id(cfg)] = cfg
    for cfg in saved.values():
        cfg.use_cache = False
    try:
        yield
    finally:
        for cfg in saved.values():
            cfg.use_cache = True


def _trace_error(model: torch.nn.Module, exc: Exception) -> TraceError:
    path, cls = getattr(exc, "_fxprune_module", ("", type(model).__qualname__))
    fr = _user_frame(exc.__traceback__)
    where = ""
    if fr is not None:
        code = (fr.line or linecache.getline(fr.filename, fr.lineno)).strip()
        where = f" at {fr.filename}:{fr.lineno}: `{code}`"
    module = f"module '{path}' ({cls})" if path else f"model {cls}"
    return TraceError(
        f"torch.fx cannot trace {module}{where}\n"
        f"  reason: {type(exc).__name__}: {exc}\n"
        f"  fix: keep that module opaque with fxprune.compile(..., leaf_modules=[{cls}]) (its channels are then "
        f"frozen), fix the value that drives the branch with concrete_args={{'name': value}}, or pass a "
        f"tracer of your own with tracer=...")
