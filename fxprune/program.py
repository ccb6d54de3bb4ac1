"""``fxprune.compile`` and the :class:`Program` it returns."""
from __future__ import annotations

import contextlib
import gc
import inspect
import os
import time
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.fx
from torch.utils._pytree import tree_flatten

from .errors import FxPruneError, TraceError, UnsupportedInputError, VerificationError, first_line
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
    if isinstance(model, torch.fx.GraphModule):
        from fxprune.passes.trace import realize

        realize(model)  # a lazy GraphModule's forward gets its real signature
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
            frontend: str = "auto", pipeline=None, regions: Optional[Sequence[str]] = None,
            exclude: Sequence[str] = ()) -> "Program":
    """Trace ``model`` and find its zero-invariant groups.

    A model that neither front end traces whole (data-dependent control flow, detectors'
    non-maximum suppression, calls that leave torch) is compiled as *regions*: its largest
    submodules that trace and reproduce their recorded calls, each analysed on its own, with
    the code between them left as it is (:mod:`fxprune.regions`; the result is a
    :class:`fxprune.regions.RegionProgram`). Models with stacked mixture-of-experts weights
    (HuggingFace transformers 5) are compiled as regions too, one per expert
    (:mod:`fxprune.moe`).

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
        allow_inexact: let groups that are not zero-invariant (e.g. normalised by a softmax)
            be pruned; their slim model then differs from the full one.
        frontend: ``"fx"`` (symbolic tracing: module-level graph, readable code), ``"export"``
            (``torch.export``, ATen-level graph) or ``"auto"``: symbolic tracing, and
            ``torch.export`` when tracing fails or has to keep modules opaque that the
            registry does not know (timm's non-traceable modules).
        pipeline: a :class:`fxprune.passes.Pipeline` to run instead of the default.
        regions: qualified names of the submodules to compile as regions (region compile with
            exactly these), instead of the whole model.
        exclude: qualified names of submodules kept out of every region (region compile).

    Returns:
        A :class:`Program` whose ``module`` shares parameters with ``model``.

    Raises:
        fxprune.TraceError: neither the whole model nor any submodule traces (names module,
            source line and fixes).
        fxprune.RegionError: a submodule named in ``regions`` cannot be compiled as a region.
        fxprune.UnsupportedInputError: bad ``example_inputs`` or options.
    """
    from fxprune.passes import Pipeline

    modes = _modes(mode)
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedInputError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    inputs = _normalize_inputs(model, example_inputs)
    _check_arity(model, inputs, concrete_args)
    concrete_args = _fixed_defaults(model, inputs, concrete_args)
    by_regions = regions is not None or bool(exclude)
    if not by_regions and tracer is None and pipeline is None and frontend == "auto":
        from fxprune.moe import stacked_experts

        by_regions = bool(stacked_experts(model))
    if by_regions:
        if tracer is not None or pipeline is not None:
            raise UnsupportedInputError("region compile (regions=, exclude=) takes no tracer= or pipeline=")
        from fxprune.regions import compile_regions

        return compile_regions(model, inputs, names=regions, exclude=exclude, modes=modes, frontend=frontend,
                               leaf_modules=leaf_modules, allow_inexact=allow_inexact, kwargs=concrete_args)
    auto = frontend == "auto" and tracer is None and pipeline is None and not isinstance(model, torch.fx.GraphModule)
    clock = _StepClock()
    with _gc_paused():
        try:
            gm = _front_end(model, inputs, frontend, leaf_modules=leaf_modules, concrete_args=concrete_args,
                            tracer=tracer)
        except TraceError as exc:
            if not auto:
                raise
            from fxprune.regions import compile_regions

            return compile_regions(model, inputs, modes=modes, frontend=frontend, leaf_modules=leaf_modules,
                                   allow_inexact=allow_inexact, kwargs=concrete_args, cause=exc)
        clock.lap("trace")
        pipe = pipeline if pipeline is not None else Pipeline.default(inputs, allow_inexact=allow_inexact)
        if "erase" in modes and "erasable" not in pipe.names():
            from fxprune.passes.erasable import ErasablePass

            pipe.append(ErasablePass(inputs))
        clock.restart()
        for name, gm in pipe.steps(gm):
            clock.lap(name)
    return Program(gm, inputs, pipe, model=model, modes=modes, trace_options=dict(
        leaf_modules=tuple(leaf_modules), concrete_args=concrete_args, tracer=tracer),
        timings=clock.wall, cpu_timings=clock.cpu)


class _StepClock:
    """Wall-clock and process CPU seconds of consecutive steps, by name."""

    def __init__(self):
        self.wall: Dict[str, float] = {}
        self.cpu: Dict[str, float] = {}
        self.restart()

    def restart(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.wall[name] = self.wall.get(name, 0.0) + wall - self._wall
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu - self._cpu
        self._wall, self._cpu = wall, cpu


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


def _front_end(model, inputs, frontend: str, *, origin: Optional[type] = None, tracer_for=None,
               dynamic: bool = False, **trace_kwargs) -> torch.fx.GraphModule:
    """Symbolic tracing first (module-level graph, readable code); for timm models that fail,
    again with timm's registry of non-traceable modules and functions; then torch.export.

    Where the fx graph keeps calls opaque that the op-semantics registry does not know (timm's
    non-traceable modules, functions hidden from tracing with ``torch.fx.wrap`` or timm's
    registry), they would freeze their channels; the ATen graph of torch.export sees inside
    them, so it is taken instead when it exports (``frontend="auto"``).

    ``origin``: the class whose package decides the timm path (default ``type(model)``);
    ``tracer_for(leaf_modules, timm)``: builds the tracer (default :class:`FxPruneTracer`,
    timm's tracer for the retry). ``dynamic``: torch.export with symbolic sizes
    (:func:`fxprune.passes.trace.export`).
    """
    from fxprune.passes import trace
    from fxprune.passes.trace import export as export_static

    def export(m, x):
        return export_static(m, x, dynamic=dynamic)
    from fxprune.passes.trace import timm_tracer

    from .errors import TraceError

    if frontend not in ("auto", "fx", "export"):
        raise UnsupportedInputError(f"frontend must be 'auto', 'fx' or 'export', not {frontend!r}")
    if frontend == "export":
        return export(model, inputs)
    origin = origin or type(model)
    if tracer_for is not None and trace_kwargs.get("tracer") is None:
        trace_kwargs["tracer"] = tracer_for(trace_kwargs.get("leaf_modules", ()), False)

    def prefer_export(gm, opaque):
        if frontend == "fx" or not opaque:
            return gm
        try:
            return export(model, inputs)
        except TraceError:
            return gm

    try:
        gm = trace(model, **trace_kwargs)
    except TraceError as fx_error:
        if trace_kwargs.get("tracer") is not None and tracer_for is None:
            raise
        if origin.__module__.startswith("timm."):
            leaves = trace_kwargs.get("leaf_modules", ())
            tracer = tracer_for(leaves, True) if tracer_for is not None else timm_tracer(leaves)
            try:
                gm = trace(model, concrete_args=trace_kwargs.get("concrete_args"), tracer=tracer)
            except TraceError:
                pass
            else:
                return prefer_export(gm, _opaque_leaves(gm) + _opaque_functions(gm))
        if frontend == "fx":
            raise
        try:
            return export(model, inputs)
        except TraceError as export_error:
            err = _closest(fx_error, export_error)
            raise err from err.cause

    return prefer_export(gm, _opaque_functions(gm))


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


def _opaque_functions(gm: torch.fx.GraphModule) -> list:
    """``call_function`` nodes of functions hidden from symbolic tracing (``torch.fx.wrap``,
    timm's registry of non-traceable functions) that the op-semantics registry does not know."""
    from fxprune.passes.registry import REGISTRY
    from fxprune.passes.trace import wrapped_functions

    hidden = wrapped_functions()
    return [n for n in gm.graph.nodes if n.op == "call_function" and id(n.target) in hidden
            and REGISTRY.lookup(n) is None]


class Program:
    """A traced model and its analyses.

    Attributes:
        module: the traced ``torch.fx.GraphModule``; shares parameters with the user's model,
            so training either trains both.
        groups: list of :class:`fxprune.Group`, in order of first appearance.
        example_inputs: the normalised example inputs (a tuple).
        pipeline: the passes that produced the analyses.
        modes: ``("prune",)``, ``("erase",)`` or ``("prune", "erase")``.
        timings: wall-clock seconds ``fxprune.compile`` spent in each step: ``"trace"`` (the
            front end, symbolic tracing or ``torch.export``), then each pass by name.
        cpu_timings: the same steps' process CPU seconds (all threads).
    """

    def __init__(self, module: torch.fx.GraphModule, example_inputs: tuple, pipeline, *, model=None,
                 trace_options=None, modes: Sequence[str] = ("prune",), timings: Optional[Dict[str, float]] = None,
                 cpu_timings: Optional[Dict[str, float]] = None):
        self.module = module
        self.timings: Dict[str, float] = dict(timings or {})
        self.cpu_timings: Dict[str, float] = dict(cpu_timings or {})
        self.modes = _modes(modes)
        self.example_inputs = example_inputs
        self.pipeline = pipeline
        self._model = model
        self._trace_options = trace_options or {}
        self._construction_checked: Optional[Dict[int, str]] = None
        self._meta_masks: Dict[int, np.ndarray] = {}  # zero_() on the meta device: what was asked

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
        operators: every parameter of ``erasables[i]`` and its ``slices``.

        On the meta device, where tensors hold no values, the keep-masks are recorded instead
        and :meth:`construct_subnet` removes the channels they drop."""
        for eid in erasables:
            e = self.erasables[eid]
            for p in e.params:
                self._tensor(p).zero_()
            for s in e.slices:
                t = self._tensor(s.param)
                t.index_fill_(s.dim, s.index.to(t.device), 0)
        checked = self._check_masks(masks or {})
        _zero_groups(self.module, self.groups, checked)
        if self.on_meta:
            for gid, keep in checked.items():
                self._meta_masks[gid] = self._meta_masks.get(gid, np.ones(len(keep), bool)) & keep

    def _check_masks(self, masks: Mapping[int, Any]) -> Dict[int, np.ndarray]:
        out = {}
        for gid, keep in masks.items():
            if not isinstance(gid, (int, np.integer)) or not 0 <= gid < len(self.groups):
                raise UnsupportedInputError(f"no group {gid!r}: group ids run from 0 to {len(self.groups) - 1}")
            g = self.groups[gid]
            keep = np.asarray(keep.cpu() if isinstance(keep, torch.Tensor) else keep, dtype=bool)
            if keep.shape != (g.size,):
                raise UnsupportedInputError(f"mask for group {gid} has shape {tuple(keep.shape)}, expected ({g.size},)")
            out[int(gid)] = keep
        return out

    @property
    def on_meta(self) -> bool:
        """Whether the program's tensors are on the meta device (shapes only, no values)."""
        return any(t.is_meta for t in list(self.module.parameters()) + list(self.module.buffers()))

    @torch.no_grad()
    def zero_channels(self) -> Dict[int, np.ndarray]:
        """For each prunable group, a bool array: True where the channel is zero in every
        producer slice (these are the channels ``construct_subnet`` removes)."""
        if self.on_meta:
            raise UnsupportedInputError(
                "the program's tensors are on the meta device and hold no values, so which channels are "
                "zero cannot be read: pass construct_subnet(keep={group id: keep mask}) or call "
                "prog.zero_(masks) first")
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

    def construct_subnet(self, verify: bool = True, rtol: float = 1e-4,
                         keep: Optional[Mapping[int, Any]] = None) -> torch.fx.GraphModule:
        """Build the slim model: every channel zero in all its group's producer slices is removed
        (mode ``"prune"``); every erasable operator whose parameters are all zero is deleted, its
        joins folded (mode ``"erase"``, see :func:`fxprune.passes.erase_rewrite.erase_rewrite`).

        Args:
            verify: compare the slim model's outputs on the example inputs with the full
                model's (eval mode) and raise :class:`fxprune.VerificationError` if the max abs
                difference exceeds ``rtol * max(1, max |full output|)``. On the meta device,
                where tensors hold no values, only the output shapes are compared.
            keep: ``{group id: bool keep-mask}`` to remove the channels it drops instead of the
                channels that are zero (groups not given keep every channel). On the meta
                device the default is what :meth:`zero_` was asked to zero.

        Returns a new ``torch.fx.GraphModule`` with regenerated code, on the program's device;
        the program and the user's model are left untouched. Each submodule of the slim model
        is in the training mode (``.training``) of the user's module of the same name as it is
        when this is called (``model.eval()`` then ``construct_subnet()`` gives a slim model in
        eval mode), modules the user's model lacks following their parent.

        Raises:
            fxprune.UnsupportedInputError: on the meta device, erase mode, or no ``keep`` and
                nothing recorded by :meth:`zero_`.
            fxprune.RewriteError, fxprune.VerificationError: see :mod:`fxprune.passes.prune_rewrite`.
        """
        meta = self.on_meta
        if keep is not None:
            keep = {gid: m for gid, m in self._check_masks(keep).items() if not m.all()}
        elif "prune" in self.modes and meta:
            if not self._meta_masks:
                raise UnsupportedInputError(
                    "the program's tensors are on the meta device and hold no values, so which channels "
                    "are zero cannot be read: pass construct_subnet(keep={group id: keep mask}) or call "
                    "prog.zero_(masks) first")
            keep = {gid: m for gid, m in self._meta_masks.items() if not m.all()}
        elif "prune" in self.modes:
            keep = {gid: ~zero for gid, zero in self.zero_channels().items() if zero.any()}
        else:
            keep = {}
        frozen = [gid for gid in keep if not self.groups[gid].prunable]
        if frozen:
            raise UnsupportedInputError(f"groups {frozen} are frozen and cannot lose channels: "
                                        f"{self.groups[frozen[0]].reason}")
        erase: List[int] = []
        if "erase" in self.modes:
            if meta:
                raise UnsupportedInputError("erase mode reads which operators are zero, which tensors on "
                                            "the meta device do not hold; build the slim model from real weights")
            erase = self._erase_set()
        slim = self._slim(keep, erase)
        if verify and meta:
            _check_output_shapes(self.module, slim, self.example_inputs)
        elif verify:
            check_outputs(self.module, slim, self.example_inputs, rtol)
        return slim

    def _slim(self, keep: Mapping[int, np.ndarray], erase: Sequence[int]) -> torch.fx.GraphModule:
        """The slim GraphModule keeping ``keep[g]`` channels of group ``g`` (groups left out:
        all) with the erasables ``erase`` deleted, each submodule in the training mode of the
        user's module of the same name; not verified."""
        from fxprune.passes import prune_rewrite

        if "erase" in self.modes:
            from fxprune.passes.erase_rewrite import erase_rewrite

            slim = erase_rewrite(self.module, list(erase), keep, self.example_inputs)
        else:
            slim = prune_rewrite(self.module, keep, self.example_inputs)
        copy_training_flags(slim, self._model if self._model is not None else self.module)
        return slim

    def check_construction(self, rtol: float = 1e-4) -> Dict[int, str]:
        """Find, before training, the groups whose removal cannot be built: a slim model is built
        with one channel of every prunable exact group removed (the same channels zeroed in a copy
        of the program) and compared with that copy; when it fails, halves of the groups are
        tried in turn until the failing groups are found. Those are frozen
        (``Group.prunable = False``) with the failure in ``Group.reason``, and a warning names
        them. On the meta device only the rewrite and the output shapes are checked.

        Runs once per program (the optimizers call it when created); returns ``{group id:
        reason}`` of the groups it froze."""
        if self._construction_checked is not None:
            return dict(self._construction_checked)
        if _sharded(self.module):
            warnings.warn("fxprune: the program's parameters are sharded (FSDP2 DTensors), so no slim model can be "
                          "built to check the groups; call prog.check_construction() before fully_shard "
                          "(fxprune.distributed.program_template does)", stacklevel=2)
            self._construction_checked = {}
            return {}
        gids = [g.id for g in self.groups if g.prunable and g.exact and g.size >= 2] \
            if "prune" in self.modes else []
        failing = self._failing(gids, rtol) if gids else {}
        for gid, reason in failing.items():
            g = self.groups[gid]
            g.prunable = False
            where = f" (its channels flow through {', '.join(map(repr, g.nodes[:4]))})" if g.nodes else ""
            g.reason = f"a slim model without some of its channels cannot be built{where}: {reason}"
        if failing:
            warnings.warn(f"fxprune: {len(failing)} group(s) frozen before training, since removing their "
                          f"channels fails: {sorted(failing)}; e.g. group {min(failing)}: "
                          f"{failing[min(failing)]}", stacklevel=2)
        self._construction_checked = failing
        return dict(failing)

    def _failing(self, gids: List[int], rtol: float) -> Dict[int, str]:
        error = self._trial(gids, rtol)
        if error is None:
            return {}
        if len(gids) == 1:
            return {gids[0]: error}
        half = len(gids) // 2
        found = {**self._failing(gids[:half], rtol), **self._failing(gids[half:], rtol)}
        return found or {gid: f"{error} (only with groups {gids} removed together)" for gid in gids}

    @torch.no_grad()
    def _trial(self, gids: List[int], rtol: float) -> Optional[str]:
        """None if a slim model without the last channel of each group builds and matches a copy
        of the program with those channels zeroed; else what went wrong."""
        from fxprune.passes import prune_rewrite
        from fxprune.passes.prune_rewrite import copy_graph_module

        keep = {}
        for gid in gids:  # one channel each: removing many at once could silence the whole output
            m = np.ones(self.groups[gid].size, bool)
            m[-1] = False
            keep[gid] = m
        try:
            full = copy_graph_module(self.module)
            _zero_groups(full, self.groups, keep)
            slim = prune_rewrite(full, keep, self.example_inputs)
            if self.on_meta:
                _check_output_shapes(full, slim, self.example_inputs)
                return None
            diff, scale = max_output_difference(full, slim, self.example_inputs)
        except FxPruneError as e:
            return f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - any failure of the rewrite is the group's
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if diff > rtol * max(1.0, scale):
            return f"the slim model's output differs by {diff:.3e} (max |output| {scale:.3e})"
        return None

    # ------------------------------------------------------------------ training helpers
    def gated_module(self):
        """The gated training module of Auto-Train-Once (:func:`fxprune.passes.gating.insert_gates`)."""
        from fxprune.passes.gating import insert_gates

        return insert_gates(self)

    def flops_model(self):
        """FLOPs as a function of the kept channels (:class:`fxprune.flops_model.FlopsModel`)."""
        from .flops_model import FlopsModel

        return FlopsModel(self)

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
        lines = [f"{type(self).__name__}: {self._size()}, {len(self.groups)} groups "
                 f"({len(self.prunable_groups)} prunable, {sum(g.size for g in self.prunable_groups)} channels)"]
        lines += self._summary_parts()
        for g in self.groups:
            lines.append("  " + repr(g))
        if "erase" in self.modes:
            lines.append(f"{len(self.erasables)} erasable operators")
            lines += ["  " + repr(e) for e in self.erasables]
        return "\n".join(lines)

    def _size(self) -> str:
        """What :meth:`summary`'s first line says the program is made of."""
        return f"{len(self.module.graph.nodes)} nodes"

    def _summary_parts(self) -> List[str]:
        """Lines :meth:`summary` shows before the groups (none here)."""
        return []

    def __repr__(self) -> str:
        extra = f", erasables={len(self.erasables)}" if "erase" in self.modes else ""
        return (f"{type(self).__name__}({type(self.module).__name__}, {self._repr_parts()}groups={len(self.groups)}, "
                f"prunable={len(self.prunable_groups)}{extra})")

    def _repr_parts(self) -> str:
        """Fields ``repr`` shows before the group counts (none here)."""
        return ""


def _zero_groups(module: torch.nn.Module, groups: Sequence[Group], masks: Mapping[int, np.ndarray]) -> None:
    """Zero, in ``module``'s tensors, the channels each keep-mask drops (every producer slice)."""
    with torch.no_grad():
        for gid, keep in masks.items():
            keep = torch.as_tensor(keep)
            for s in groups[gid].slices:
                drop = s.index[~keep[s.channel]]
                if len(drop):
                    path, _, attr = s.param.rpartition(".")
                    t = getattr(module.get_submodule(path) if path else module, attr)
                    t.index_fill_(s.dim, drop.to(t.device), 0)


def copy_training_flags(slim: torch.nn.Module, reference: torch.nn.Module) -> None:
    """Set each submodule of ``slim`` to the training mode of ``reference``'s module of the same
    name; a module ``reference`` lacks takes its parent's mode."""
    ref = dict(reference.named_modules(remove_duplicate=False))
    flags: Dict[str, bool] = {}
    for name, m in slim.named_modules(remove_duplicate=False):
        parent = name.rpartition(".")[0]
        src = ref.get(name)
        flags[name] = src.training if src is not None else flags.get(parent, reference.training)
        m.training = flags[name]


def _check_output_shapes(full: torch.nn.Module, slim: torch.nn.Module, inputs: Sequence) -> None:
    a, b = _run(full, inputs), _run(slim, inputs)
    if [tuple(x.shape) for x in a] != [tuple(y.shape) for y in b]:
        raise VerificationError(f"the slim model's output shapes {[tuple(y.shape) for y in b]} differ from "
                                f"the full model's {[tuple(x.shape) for x in a]}")


def _run(module: torch.nn.Module, inputs: Sequence) -> list:
    from fxprune.passes.modes import eval_mode

    with torch.no_grad(), eval_mode(module):
        out = module(*inputs)
    leaves, _ = tree_flatten(canonical_detections(out))
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def _sharded(module: torch.nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor`` (sharded by FSDP2)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in module.parameters())


def canonical_detections(out: Any) -> Any:
    """Detections (torchvision's format: a list of dicts with ``boxes [N, 4]``, ``scores [N]``,
    ``labels [N]`` and other per-detection tensors) in a canonical order: decreasing score
    (rounded to 1e-8), then label, then box. A detector sorts by score only and leaves
    detections of equal score in an order that the last bit of rounding decides (random
    weights give many exact ties); two models that compute the same detections then compare
    box by box. Anything else is returned as it is."""
    if not (isinstance(out, (list, tuple)) and out and all(
            isinstance(d, dict) and {"boxes", "scores"} <= set(d) for d in out)):
        return out
    canon = []
    for d in out:
        scores, boxes = d["scores"], d["boxes"]
        n = scores.shape[0] if scores.dim() else 0
        if n < 2 or boxes.shape[:1] != (n,):
            canon.append(d)
            continue
        labels = d.get("labels")
        keys = [(-round(float(s), 8), int(labels[i]) if labels is not None else 0,
                 tuple(round(float(v), 4) for v in boxes[i].reshape(-1))) for i, s in enumerate(scores)]
        order = torch.tensor(sorted(range(n), key=keys.__getitem__), device=scores.device)
        canon.append({k: v.index_select(0, order) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n
                      else v for k, v in d.items()})
    return type(out)(canon)


def check_outputs(full: torch.nn.Module, slim: torch.nn.Module, inputs: Sequence, rtol: float, what: str = "") -> None:
    """Raise :class:`fxprune.VerificationError` unless the slim model's outputs equal the full
    model's on ``inputs`` (eval mode): max abs difference at most ``rtol * max(1, max |full
    output|)``, the same shapes, integer outputs equal."""
    diff, scale = max_output_difference(full, slim, inputs)
    if diff > rtol * max(1.0, scale):
        raise VerificationError(
            f"the slim {what or 'model'}'s output differs from the full {what or 'model'}'s: max abs difference "
            f"{diff:.3e} (max |output| {scale:.3e}, tolerance {rtol:g} relative)")


def max_output_difference(full: torch.nn.Module, slim: torch.nn.Module, inputs: Sequence):
    """``(max abs difference, max |full output|)`` over all output tensors, in eval mode."""
    a = _run(full, inputs)
    try:
        b = _run(slim, inputs)
    except Exception as e:  # noqa: BLE001 - any failure of the rewritten graph is reported alike
        raise VerificationError(
            f"the slim model fails on the example inputs ({first_line(e)}); a constant of an op that depends on a channel "
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
