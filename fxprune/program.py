"""``fxprune.compile`` and the :class:`Program` it returns."""
from __future__ import annotations

import contextlib
import gc
import inspect
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.fx
from torch.utils._pytree import tree_flatten

from .errors import FxPruneError, UnsupportedInputError, VerificationError
from .ir import Erasable, Group

MODES = ("prune", "erase")


def _modes(mode: Any) -> tuple:
    """``"prune"``, ``"erase"`` or a tuple of them -> a tuple in canonical order."""
    given = (mode,) if isinstance(mode, str) else tuple(mode) if isinstance(mode, (tuple, list)) else None
    if not given or any(m not in MODES for m in given):
        raise UnsupportedInputError(f"mode must be 'prune', 'erase' or ('prune', 'erase'), not {mode!r}")
    return tuple(m for m in MODES if m in given)


def _normalize_inputs(model: torch.nn.Module, example_inputs: Any) -> tuple:
    """A tensor, a tuple/list of positional inputs, or a dict of keyword inputs -> a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) == 0:
            raise UnsupportedInputError("example_inputs is empty: pass the tensors the model's forward takes")
        return tuple(example_inputs)
    if isinstance(example_inputs, Mapping):
        if not example_inputs:
            raise UnsupportedInputError("example_inputs is empty: pass the tensors the model's forward takes")
        sig = inspect.signature(model.forward)
        try:
            bound = sig.bind(**example_inputs)
        except TypeError as exc:
            raise UnsupportedInputError(f"example_inputs do not match {type(model).__name__}.forward{sig}: {exc}")
        given = set(bound.arguments)
        bound.apply_defaults()
        names = list(bound.arguments)
        last = max(i for i, name in enumerate(names) if name in given)
        return tuple(bound.arguments[name] for name in names[:last + 1])  # trailing defaults: see _fixed_defaults
    raise UnsupportedInputError(
        f"example_inputs must be a tensor, a tuple/list of inputs or a dict of keyword inputs, "
        f"not {type(example_inputs).__name__}")


def _check_arity(model: torch.nn.Module, inputs: tuple, concrete_args) -> None:
    params = list(inspect.signature(model.forward).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return
    free = [p for p in params if p.name not in (concrete_args or {})]
    if len(inputs) > len(free):
        raise UnsupportedInputError(
            f"{len(inputs)} example inputs given, but {type(model).__name__}.forward takes {len(free)} "
            f"({', '.join(p.name for p in free)})")


def _fixed_defaults(model: torch.nn.Module, inputs: tuple, concrete_args) -> Optional[Dict[str, Any]]:
    """``concrete_args`` plus the default value of every ``forward`` parameter after the ones
    the example inputs give (``mask=None``), as a call with these inputs would have it.

    Left free, such a parameter would become a placeholder that symbolic tracing treats as a
    tensor: ``if mask is not None`` would trace the branch a call without a mask never takes,
    and the graph would fail on the example inputs.
    """
    if isinstance(model, torch.fx.GraphModule):
        return concrete_args
    params = [p for p in inspect.signature(model.forward).parameters.values() if p.name not in (concrete_args or {})]
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return concrete_args
    fixed = {p.name: p.default for p in params[len(inputs):]
             if p.kind is not inspect.Parameter.VAR_KEYWORD and p.default is not inspect.Parameter.empty}
    return {**(concrete_args or {}), **fixed} if fixed else concrete_args


def compile(model: torch.nn.Module, example_inputs: Any, *, mode: Union[str, Sequence[str]] = "prune",
            leaf_modules: Iterable[Union[type, str]] = (), concrete_args: Optional[Dict[str, Any]] = None,
            tracer: Optional[torch.fx.Tracer] = None, allow_inexact: bool = False,
            frontend: str = "auto", pipeline=None) -> "Program":
    """Trace ``model`` and find its zero-invariant groups.

    Args:
        model: any ``nn.Module`` torch.fx can trace (or a ``torch.fx.GraphModule``).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs;
            used for shape propagation and to verify the slim model.
        mode: ``"prune"`` (channel groups), ``"erase"`` (erasable operators, OTOv3) or
            ``("prune", "erase")`` (both: whole operators erased, channels pruned in the rest).
        leaf_modules: module classes or qualified names kept opaque by the tracer.
        concrete_args: arguments fixed at trace time (``torch.fx.Tracer.trace``). Parameters
            of ``forward`` after those the example inputs give are fixed at their defaults.
        tracer: a ``torch.fx.Tracer`` of your own.
        allow_inexact: let groups that are not zero-invariant (e.g. normalised by a LayerNorm)
            be pruned; their slim model then differs from the full one.
        frontend: ``"fx"`` (symbolic tracing: module-level graph, readable code), ``"export"``
            (``torch.export``, ATen-level graph) or ``"auto"``: symbolic tracing, and
            ``torch.export`` when tracing fails or has to keep modules opaque that the
            registry does not know (timm's non-traceable modules).
        pipeline: a :class:`fxprune.passes.Pipeline` to run instead of the default.

    Returns:
        A :class:`Program` whose ``module`` shares parameters with ``model``.

    Raises:
        fxprune.TraceError: symbolic tracing failed (names module, source line and fixes).
        fxprune.UnsupportedInputError: bad ``example_inputs`` or options.
    """
    from fxprune.passes import Pipeline

    modes = _modes(mode)
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedInputError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    inputs = _normalize_inputs(model, example_inputs)
    _check_arity(model, inputs, concrete_args)
    concrete_args = _fixed_defaults(model, inputs, concrete_args)
    with _gc_paused():
        gm = _front_end(model, inputs, frontend, leaf_modules=leaf_modules, concrete_args=concrete_args,
                        tracer=tracer)
        pipe = pipeline if pipeline is not None else Pipeline.default(inputs, allow_inexact=allow_inexact)
        if "erase" in modes and "erasable" not in pipe.names():
            from fxprune.passes.erasable import ErasablePass

            pipe.append(ErasablePass(inputs))
        gm = pipe.run(gm)
    return Program(gm, inputs, pipe, model=model, modes=modes, trace_options=dict(
        leaf_modules=tuple(leaf_modules), concrete_args=concrete_args, tracer=tracer))


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector off for the duration (its state is restored after).

    Compiling creates many long-lived objects (graph nodes, channel tracks, groups); every time
    they grow by a quarter, CPython runs a full collection over all objects in the process,
    the model's included, so on a deep model these collections cost more than the analysis.
    The analysis itself leaves almost no cyclic garbage behind.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _front_end(model, inputs, frontend: str, **trace_kwargs) -> torch.fx.GraphModule:
    """Symbolic tracing first (module-level graph, readable code); for timm models that fail,
    again with timm's registry of non-traceable modules and functions; then torch.export."""
    from fxprune.passes import export, trace
    from fxprune.passes.trace import timm_tracer

    from .errors import TraceError

    if frontend not in ("auto", "fx", "export"):
        raise UnsupportedInputError(f"frontend must be 'auto', 'fx' or 'export', not {frontend!r}")
    if frontend == "export":
        return export(model, inputs)
    try:
        return trace(model, **trace_kwargs)
    except TraceError as fx_error:
        if trace_kwargs.get("tracer") is not None:
            raise
        if type(model).__module__.startswith("timm."):
            tracer = timm_tracer(trace_kwargs.get("leaf_modules", ()))
            try:
                gm = trace(model, concrete_args=trace_kwargs.get("concrete_args"), tracer=tracer)
            except TraceError:
                pass
            else:
                # timm's non-traceable modules stay opaque and freeze their channels; the ATen
                # graph of torch.export sees inside them, so it is preferred when it works
                if frontend == "fx" or not _opaque_leaves(gm):
                    return gm
                try:
                    return export(model, inputs)
                except TraceError:
                    return gm
        if frontend == "fx":
            raise
        try:
            return export(model, inputs)
        except TraceError as export_error:
            err = _closest(fx_error, export_error)
            raise err from err.cause


def _closest(fx_error, export_error):
    """One error for two failed front ends, led by the one that came closer: the one with
    more module calls traced to their end before it failed (symbolic tracing on a tie)."""
    from .errors import TraceError

    fx_done, ex_done = getattr(fx_error, "modules_done", 0), getattr(export_error, "modules_done", 0)
    if ex_done > fx_done:
        err = TraceError(f"{export_error}\n(torch.export traced {ex_done} module calls to their end, symbolic "
                         f"tracing {fx_done})\n\nThe torch.fx front end failed too: {fx_error}")
        err.cause = export_error
    else:
        err = TraceError(f"{fx_error}\n\nThe torch.export front end failed too: {export_error}")
        err.cause = fx_error
    err.modules_done = max(fx_done, ex_done)
    return err


def _opaque_leaves(gm: torch.fx.GraphModule) -> list:
    """``call_module`` nodes whose module the op-semantics registry does not know."""
    from fxprune.passes.registry import REGISTRY

    return [n for n in gm.graph.nodes
            if n.op == "call_module" and REGISTRY.lookup(n, gm.get_submodule(n.target)) is None]


class Program:
    """A traced model and its analyses.

    Attributes:
        module: the traced ``torch.fx.GraphModule``; shares parameters with the user's model,
            so training either trains both.
        groups: list of :class:`fxprune.Group`, in order of first appearance.
        example_inputs: the normalised example inputs (a tuple).
        pipeline: the passes that produced the analyses.
        modes: ``("prune",)``, ``("erase",)`` or ``("prune", "erase")``.
    """

    def __init__(self, module: torch.fx.GraphModule, example_inputs: tuple, pipeline, *, model=None,
                 trace_options=None, modes: Sequence[str] = ("prune",)):
        self.module = module
        self.modes = _modes(modes)
        self.example_inputs = example_inputs
        self.pipeline = pipeline
        self._model = model
        self._trace_options = trace_options or {}

    # ------------------------------------------------------------------ groups
    @property
    def analysis(self):
        return self.module.meta["fxprune"]

    @property
    def groups(self) -> List[Group]:
        return self.analysis.groups

    @property
    def prunable_groups(self) -> List[Group]:
        return [g for g in self.groups if g.prunable]

    @property
    def passes(self) -> List[str]:
        return ["trace"] + self.pipeline.names()

    def group(self, gid: int) -> Group:
        return self.groups[gid]

    # ------------------------------------------------------------------ erasable operators
    @property
    def erasables(self) -> List[Erasable]:
        """The erasable operators (OTOv3) found by the erasable pass (mode ``"erase"``)."""
        return self.module.meta.get("fxprune.erasables", [])

    @property
    def erase_graph(self):
        """The :class:`fxprune.passes.erasable.EraseGraph`: checks and plans erasures."""
        from fxprune.passes.erasable import erase_graph

        return erase_graph(self.module)

    def erasable(self, eid: int) -> Erasable:
        return self.erasables[eid]

    @torch.no_grad()
    def zero_erasables(self) -> List[int]:
        """Ids of the erasables whose parameters (and ``slices``) are all exactly zero."""
        def zero(e: Erasable) -> bool:
            if any(self._tensor(p).detach().any() for p in e.params):
                return False
            for s in e.slices:
                t = self._tensor(s.param).detach()
                if t.index_select(s.dim, s.index.to(t.device)).any():
                    return False
            return True

        return [e.id for e in self.erasables if zero(e)]

    def _erase_set(self) -> List[int]:
        """A valid set of zero erasables to erase: all of them if valid, else a greedy subset
        (largest first); a zero erasable left in place changes nothing."""
        zero = self.zero_erasables()
        if not zero:
            return []
        eg = self.erase_graph
        if eg.plan(zero).valid:
            return zero
        chosen: List[int] = []
        for eid in sorted(zero, key=lambda i: (-len(eg.units[i]), i)):
            if eid in eg.closure(chosen):
                continue
            if eg.plan(chosen + [eid]).valid:
                chosen.append(eid)
        return sorted(eg.closure(chosen))

    def _tensor(self, name: str) -> torch.Tensor:
        path, _, attr = name.rpartition(".")
        return getattr(self.module.get_submodule(path) if path else self.module, attr)

    @torch.no_grad()
    def zero_(self, masks: Optional[Mapping[int, Any]] = None, erasables: Iterable[int] = ()) -> None:
        """Zero chosen channels: ``masks[group_id]`` is a bool keep-mask of length ``size``
        (False = zero that channel in every producer slice of the group); and chosen erasable
        operators: every parameter of ``erasables[i]`` and its ``slices``."""
        for eid in erasables:
            e = self.erasables[eid]
            for p in e.params:
                self._tensor(p).zero_()
            for s in e.slices:
                t = self._tensor(s.param)
                t.index_fill_(s.dim, s.index.to(t.device), 0)
        for gid, keep in (masks or {}).items():
            if not isinstance(gid, (int, np.integer)) or not 0 <= gid < len(self.groups):
                raise UnsupportedInputError(f"no group {gid!r}: group ids run from 0 to {len(self.groups) - 1}")
            g = self.groups[gid]
            keep = torch.as_tensor(np.asarray(keep, dtype=bool))
            if keep.shape != (g.size,):
                raise UnsupportedInputError(f"mask for group {gid} has shape {tuple(keep.shape)}, expected ({g.size},)")
            for s in g.slices:
                drop = s.index[~keep[s.channel]]
                if len(drop):
                    t = self._tensor(s.param)
                    t.index_fill_(s.dim, drop.to(t.device), 0)

    @torch.no_grad()
    def zero_channels(self) -> Dict[int, np.ndarray]:
        """For each prunable group, a bool array: True where the channel is zero in every
        producer slice (these are the channels ``construct_subnet`` removes)."""
        out = {}
        for g in self.prunable_groups:
            nonzero = torch.zeros(g.size, dtype=torch.bool)
            for s in g.slices:
                t = self._tensor(s.param).detach()
                per_pos = t.index_select(s.dim, s.index.to(t.device)).movedim(s.dim, 0).reshape(len(s.index), -1)
                nz = (per_pos != 0).any(dim=1).cpu()
                nonzero.index_put_((s.channel,), nz, accumulate=True)
            out[g.id] = ~nonzero.numpy()
        return out

    def construct_subnet(self, verify: bool = True, rtol: float = 1e-4) -> torch.fx.GraphModule:
        """Build the slim model: every channel zero in all its group's producer slices is removed
        (mode ``"prune"``); every erasable operator whose parameters are all zero is deleted, its
        joins folded (mode ``"erase"``, see :func:`fxprune.passes.erase_rewrite.erase_rewrite`).

        Returns a new ``torch.fx.GraphModule`` with regenerated code; the program and the
        user's model are left untouched. With ``verify`` (default) the slim model's outputs
        on the example inputs are compared with the full model's (eval mode) and a
        :class:`fxprune.VerificationError` is raised if the max abs difference exceeds
        ``rtol * max(1, max |full output|)``.
        """
        from fxprune.passes import prune_rewrite

        keep = {}
        if "prune" in self.modes:
            keep = {gid: ~zero for gid, zero in self.zero_channels().items() if zero.any()}
        if "erase" in self.modes:
            from fxprune.passes.erase_rewrite import erase_rewrite

            slim = erase_rewrite(self.module, self._erase_set(), keep, self.example_inputs)
        else:
            slim = prune_rewrite(self.module, keep, self.example_inputs)
        slim.train(self.module.training)
        if verify:
            diff, scale = max_output_difference(self.module, slim, self.example_inputs)
            if diff > rtol * max(1.0, scale):
                raise VerificationError(
                    f"the slim model's output differs from the full model's: max abs difference {diff:.3e} "
                    f"(max |output| {scale:.3e}, tolerance {rtol:g} relative)")
        return slim

    # ------------------------------------------------------------------ inspection
    def to_dot(self, path: Optional[str] = None) -> str:
        """The group graph as DOT (pydot); written to ``path`` if given. Returns the DOT text."""
        from .dot import program_to_dot

        text = program_to_dot(self).to_string()
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def dump(self, directory: str) -> List[str]:
        """Re-run the pipeline pass by pass and write the IR after each one, as text
        (``NN_pass.txt``) and DOT (``NN_pass.dot``). Returns the written paths."""
        from fxprune.passes import trace

        from .dot import graph_to_dot, ir_text

        os.makedirs(directory, exist_ok=True)
        written = []
        gm = trace(self._model if self._model is not None else self.module, **self._trace_options)
        steps = [("trace", gm)] + list(self.pipeline.steps(gm))
        for i, (name, g) in enumerate(steps):
            base = os.path.join(directory, f"{i:02d}_{name}")
            with open(base + ".txt", "w") as f:
                f.write(ir_text(g))
            with open(base + ".dot", "w") as f:
                f.write(graph_to_dot(g).to_string())
            written += [base + ".txt", base + ".dot"]
        return written

    def summary(self) -> str:
        lines = [f"Program: {len(self.module.graph.nodes)} nodes, {len(self.groups)} groups "
                 f"({len(self.prunable_groups)} prunable, {sum(g.size for g in self.prunable_groups)} channels)"]
        for g in self.groups:
            lines.append("  " + repr(g))
        if "erase" in self.modes:
            lines.append(f"{len(self.erasables)} erasable operators")
            lines += ["  " + repr(e) for e in self.erasables]
        return "\n".join(lines)

    def __repr__(self) -> str:
        extra = f", erasables={len(self.erasables)}" if "erase" in self.modes else ""
        return (f"Program({type(self.module).__name__}, groups={len(self.groups)}, "
                f"prunable={len(self.prunable_groups)}{extra})")


def _run(module: torch.nn.Module, inputs: Sequence) -> list:
    from fxprune.passes.modes import eval_mode

    with torch.no_grad(), eval_mode(module):
        out = module(*inputs)
    leaves, _ = tree_flatten(out)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def max_output_difference(full: torch.nn.Module, slim: torch.nn.Module, inputs: Sequence):
    """``(max abs difference, max |full output|)`` over all output tensors, in eval mode."""
    a = _run(full, inputs)
    try:
        b = _run(slim, inputs)
    except Exception as e:  # noqa: BLE001 - any failure of the rewritten graph is reported alike
        raise VerificationError(
            f"the slim model fails on the example inputs ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]}); a constant of an op that depends on a channel "
            f"count was not recomputed by the rewrite") from e
    if len(a) != len(b):
        raise VerificationError(f"the slim model returns {len(b)} tensors, the full model {len(a)}")
    diff, scale = 0.0, 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise VerificationError(f"output shape changed: {tuple(x.shape)} -> {tuple(y.shape)}")
        if x.is_floating_point():
            diff = max(diff, (x.double() - y.double()).abs().max().item() if x.numel() else 0.0)
            scale = max(scale, x.double().abs().max().item() if x.numel() else 0.0)
        elif not torch.equal(x, y):
            raise VerificationError("an integer output changed")
    return diff, scale


__all__ = ["compile", "Program", "max_output_difference", "FxPruneError"]
