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
import math
import os
import traceback
import types
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import torch
import torch.fx

from fxprune.errors import TraceError

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
        kwargs.setdefault("autowrap_modules", (math,))
        super().__init__(**kwargs)
        self.modules_done = 0  # module calls traced to their end (how far a failed trace got)
        leaf_modules = tuple(leaf_modules)
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type)) + training_dependent_modules()
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
        with eval_mode(model):  # Python branches on self.training are resolved as in inference
            graph = tr.trace(model, concrete_args=concrete_args)
    except Exception as exc:
        err = _trace_error(model, exc)
        err.modules_done = getattr(tr, "modules_done", 0)
        raise err from exc
    if concrete_args:
        _inline_concrete(graph, concrete_args, list(inspect.signature(model.forward).parameters))
    name = model.__class__.__name__
    gm = torch.fx.GraphModule(tr.root, graph, name)
    gm.training = model.training
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
            user.args = torch.fx.node.map_arg(user.args, lambda a: value if a is node else a)
            user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
        graph.erase_node(node)


def export(model: torch.nn.Module, example_inputs: tuple) -> torch.fx.GraphModule:
    """Second front end: ``torch.export`` (non-strict) to an ATen-level GraphModule, for models
    symbolic tracing cannot take (HuggingFace transformers 5, which has no fx tracer).

    The graph is exported in eval mode and, for HuggingFace models, without the key/value cache
    (:func:`no_kv_cache`); its parameters are re-pointed at the model's own, so training the
    GraphModule trains the model. Raises :class:`fxprune.TraceError`, whose ``modules_done``
    counts the module calls that ran to their end before the failure.
    """
    done = [0]

    def count(module, args, output):
        done[0] += 1

    hook = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        with eval_mode(model), no_kv_cache(model):
            gm = torch.export.export(model, tuple(example_inputs), strict=False).module()
    except Exception as exc:
        err = TraceError(f"torch.export cannot export {type(model).__qualname__}: {type(exc).__name__}: {exc}")
        err.modules_done = done[0]
        raise err from exc
    finally:
        hook.remove()
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
