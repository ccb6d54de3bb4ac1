"""Finding and compiling the regions of a model (see :mod:`fxprune.regions`)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.fx
from torch.utils._pytree import tree_flatten

from fxprune.errors import RegionError, TraceError, first_line
from fxprune.passes.channel_deps import META_OUTPUT_REASON
from fxprune.passes.modes import eval_mode
from fxprune.passes.trace import FxPruneTracer

from .calls import CallSpec, RegionGraphModule, flat_call, region_graph_module
from .record import Call, Recording, record

INNER = "inner"  # attribute of the FlatCall wrapper that holds the submodule


@dataclass
class Region:
    """One compiled region.

    Attributes:
        name: qualified name of the submodule it replaces in ``Program.module`` (the first, if
            the same module is reached under several names: ``paths``).
        frontend: ``"fx"`` (symbolic tracing) or ``"export"`` (``torch.export``).
        program: its own :class:`fxprune.Program` (local group ids and names; the graph is
            called with the flat tensor inputs ``program.example_inputs``).
        groups: global ids (in the region program) of its groups.
        erasables: global ids of its erasable operators (mode ``"erase"``).
        calls: how many times the example run called it; ``recorded`` the calls kept
            (inputs, outputs) for verification.
    """

    name: str
    frontend: str
    program: Any
    calls: int
    recorded: List[Call] = field(default_factory=list, repr=False)
    paths: List[str] = field(default_factory=list)
    groups: List[int] = field(default_factory=list)
    erasables: List[int] = field(default_factory=list)
    shared: Dict[str, str] = field(default_factory=dict)  # local tensor name -> user outside the region

    @property
    def module(self) -> RegionGraphModule:
        return self.program.module

    @property
    def nodes(self) -> int:
        return len(self.module.graph.nodes)

    @property
    def example_inputs(self) -> tuple:
        """The flat tensor inputs of its first recorded call."""
        return self.program.example_inputs

    def __repr__(self) -> str:
        prunable = sum(1 for g in self.program.groups if g.prunable)
        return (f"Region({self.name!r}, {self.frontend}, {self.nodes} nodes, {len(self.groups)} groups "
                f"({prunable} prunable), calls={self.calls})")


class _RegionTracer(FxPruneTracer):
    """Never keeps the region's own root opaque (a region may be a single torch.nn layer
    named by the user); ``leaf_modules`` names are those of the region's wrapper."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name == INNER:
            return False
        return super().is_leaf_module(m, module_qualified_name)


def _region_tracer_for(leaf_modules, timm: bool) -> FxPruneTracer:
    """The tracer of a region (:class:`_RegionTracer`); with timm's registry of non-traceable
    modules and functions for the retry of a timm submodule."""
    if not timm:
        return _RegionTracer(leaf_modules)
    try:
        from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    except ImportError:
        return _RegionTracer(leaf_modules)
    return _RegionTracer(tuple(leaf_modules) + tuple(get_notrace_modules()),
                         autowrap_functions=tuple(get_notrace_functions()))


def _strip(target: str) -> str:
    if target == INNER:
        return ""
    return target[len(INNER) + 1:] if target.startswith(INNER + ".") else target


def _leaf_names_for(path: str, leaf_modules: Iterable[Union[type, str]]) -> list:
    """The user's leaf modules as the region's wrapper sees them."""
    out = []
    for m in leaf_modules:
        if isinstance(m, str):
            if m.startswith(path + "."):
                out.append(INNER + m[len(path):])
        else:
            out.append(m)
    return out


class _NotARegion(Exception):
    pass


USELESS = "useless"  # a submodule that compiles with nothing to prune: not a region, children not tried


def _check_same(what: str, got: Any, want: Any) -> None:
    """Raise :class:`_NotARegion` unless ``got`` equals ``want`` leaf by leaf: same structure,
    integers equal, floating point within ``1e-5`` of the larger magnitude (torch.export may
    reorder a sum)."""
    a, sa = tree_flatten(got)
    b, sb = tree_flatten(want)
    if len(a) != len(b):
        raise _NotARegion(f"{what}: {len(a)} outputs instead of {len(b)}")
    for x, y in zip(a, b):
        if isinstance(y, torch.Tensor):
            if not isinstance(x, torch.Tensor) or x.shape != y.shape or x.dtype != y.dtype:
                raise _NotARegion(f"{what}: an output is {_desc(x)} instead of {_desc(y)}")
            if y.is_floating_point() or y.is_complex():
                if y.numel():
                    scale = max(1.0, float(y.abs().max()))
                    diff = float((x - y).abs().max())
                    if not diff <= 1e-5 * scale:
                        raise _NotARegion(f"{what}: outputs differ by {diff:.3e} (max |output| {scale:.3e})")
            elif not torch.equal(x, y):
                raise _NotARegion(f"{what}: an integer output differs")
        elif not (x == y or (x != x and y != y)):
            raise _NotARegion(f"{what}: a non-tensor output is {x!r} instead of {y!r}")


def _desc(x: Any) -> str:
    return f"Tensor{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def _checked_shape_prop(tensors: Sequence[torch.Tensor], expected: Any):
    """The shape-propagation pass, whose one run of the graph on the recorded inputs doubles as
    the check that the graph computes what the eager submodule computed."""
    from fxprune.passes.shape_prop import ShapePropPass
    from torch.fx.passes.infra.pass_base import PassResult

    class CheckedShapeProp(ShapePropPass):
        def call(self, gm):
            out = self.propagate(gm)
            _check_same("the traced graph on the recorded inputs", out, expected)
            return PassResult(gm, False)

    return CheckedShapeProp(tensors, real=True)  # the check needs the values


def compile_region(module: torch.nn.Module, path: str, calls: List[Call], count: int, *, modes: tuple,
                   frontend: str, leaf_modules, allow_inexact: bool) -> Region:
    """Trace ``module`` on its first recorded call, check it against every recorded call and
    run the pipeline. Raises :class:`_NotARegion` (with the reason) if any step fails."""
    from fxprune.passes import Pipeline
    from fxprune.program import Program, _front_end

    call = calls[0]
    spec: CallSpec = call.spec
    wrapper = flat_call(module, spec)
    inputs = tuple(call.tensors)
    try:
        gm = _front_end(wrapper, inputs, frontend, origin=type(module), tracer_for=_region_tracer_for, dynamic=True,
                        leaf_modules=_leaf_names_for(path, leaf_modules))
    except TraceError as exc:
        raise _NotARegion(f"does not trace: {_short(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - any failure of a front end means: not a region
        raise _NotARegion(f"does not trace: {first_line(exc)}") from exc
    kind = "export" if _is_export(gm) else "fx"
    try:
        gm = region_graph_module(gm, spec, path, rename=_strip, original=module, class_name=type(module).__name__)
    except RegionError as exc:
        raise _NotARegion(str(exc)) from exc
    gm.training = module.training
    gm.meta[META_OUTPUT_REASON] = (f"reaches an output of region '{path}' (a region boundary: code fxprune "
                                   f"has not analysed reads it)")
    pipe = Pipeline.default(inputs, allow_inexact=allow_inexact)
    pipe.passes[0] = _checked_shape_prop(inputs, call.output)
    if "erase" in modes:
        from fxprune.passes.erasable import ErasablePass

        pipe.append(ErasablePass(inputs))
    try:
        gm = pipe.run(gm)
    except _NotARegion:
        raise
    except Exception as exc:  # noqa: BLE001 - an analysis that cannot take this graph: not a region
        raise _NotARegion(f"analysis failed: {first_line(exc)}") from exc
    for i, other in enumerate(calls[1:], 1):
        with torch.no_grad(), eval_mode(gm):
            out = gm(*other.tensors)
        _check_same(f"the traced graph on recorded call {i + 1}", out, other.output)
    prog = Program(gm, inputs, pipe, model=None, modes=modes)
    return Region(name=path, frontend=kind, program=prog, calls=count, recorded=list(calls), paths=[path])


def _short(exc: Exception, limit: int = 300) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    text = " ".join(ln.strip() for ln in lines[:2]) if lines else type(exc).__name__
    return text[:limit]


def _is_export(gm: torch.fx.GraphModule) -> bool:
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)


# ---------------------------------------------------------------------------- the walk


def _has_params(m: torch.nn.Module) -> bool:
    return next(iter(m.parameters()), None) is not None


def _builtin_leaf(m: torch.nn.Module) -> bool:
    """A torch.nn layer with no submodules: alone, its output is a boundary and its input comes
    from outside, so a region of it has nothing to prune."""
    return type(m).__module__.startswith("torch.nn.") and next(iter(m.children()), None) is None


def _under(path: str, root: str) -> bool:
    return root == "" or path == root or path.startswith(root + ".")


@dataclass
class Plan:
    """What :func:`find_regions` decided: the regions, and for every submodule tried or
    skipped, why it is not a region."""

    regions: List[Region]
    rejected: Dict[str, str]


def find_regions(model: torch.nn.Module, rec: Recording, paths: Dict[int, str], *, names: Optional[Sequence[str]],
                 exclude: Sequence[str], modes: tuple, frontend: str, leaf_modules, allow_inexact: bool) -> Plan:
    """The largest submodules that trace and reproduce their recorded calls, from the top
    (``names``: exactly these, each of which must work)."""
    regions: List[Region] = []
    rejected: Dict[str, str] = {}
    by_module: Dict[int, Region] = {}

    def why_not(m: torch.nn.Module, path: str, named: bool) -> Optional[str]:
        key = id(m)
        if not named and _builtin_leaf(m):
            return "a single torch.nn layer (nothing to prune between a region's inputs and outputs)"
        calls = rec.calls.get(key)
        if not calls:
            return "not called by the example run" if not rec.count.get(key) else "called through forward() directly"
        if key in rec.data_dependent:
            return rec.data_dependent[key]
        bad = next((c for c in calls if c.spec is None), None)
        if bad is not None:
            return bad.why
        for i, c in enumerate(calls[1:], 2):
            if not c.spec.same_as(calls[0].spec):
                return f"called with different non-tensor inputs (call {i}: {calls[0].spec.difference(c.spec)})"
        return None

    def attempt(m: torch.nn.Module, path: str, named: bool) -> Union[Region, str, None]:
        """The region, or ``USELESS`` (it compiles but has nothing to prune or erase: its
        children would have less), or None (descend)."""
        reason = why_not(m, path, named)
        if reason is None:
            try:
                region = compile_region(m, path, rec.calls[id(m)], rec.count.get(id(m), 0), modes=modes,
                                        frontend=frontend, leaf_modules=leaf_modules, allow_inexact=allow_inexact)
            except _NotARegion as exc:
                reason = str(exc)
            else:
                prog = region.program
                if named or any(g.prunable for g in prog.groups) or ("erase" in modes and prog.erasables):
                    return region
                rejected[path] = (f"compiles ({region.frontend}), but every channel in it reaches a region boundary "
                                  f"or is frozen: left as it is")
                return USELESS
        if named:
            raise RegionError(f"submodule '{path}' cannot be a region: {reason}")
        rejected[path] = reason
        return None

    def add(region: Region, m: torch.nn.Module) -> None:
        regions.append(region)
        by_module[id(m)] = region

    if names is not None:
        for name in names:
            if any(_under(name, e) for e in exclude):
                raise RegionError(f"region '{name}' is excluded (exclude={list(exclude)})")
            try:
                m = model.get_submodule(name)
            except AttributeError as exc:
                raise RegionError(f"the model has no submodule '{name}'") from exc
            if not name:
                raise RegionError("a region must be a submodule, not the whole model")
            if id(m) in by_module:
                by_module[id(m)].paths.append(name)
                continue
            if any(_under(name, r.name) or _under(r.name, name) for r in regions):
                raise RegionError(f"regions '{name}' and '{next(r.name for r in regions if _under(name, r.name) or _under(r.name, name))}' overlap")
            add(attempt(m, name, True), m)  # named: a Region or an error
        regions.sort(key=lambda r: list(paths.values()).index(r.name) if r.name in paths.values() else 0)
        return Plan(regions, rejected)

    seen = set()

    def visit(m: torch.nn.Module, path: str) -> None:
        if id(m) in by_module:
            by_module[id(m)].paths.append(path)
            return
        if id(m) in seen:
            return
        seen.add(id(m))
        if any(_under(path, e) for e in exclude):
            rejected[path] = "excluded"
            return
        if not _has_params(m):
            return
        if path and not any(_under(e, path) for e in exclude):
            region = attempt(m, path, False)
            if region is USELESS:
                return
            if region is not None:
                add(region, m)
                return
        elif path:
            rejected[path] = "contains an excluded submodule"
        for name, child in m.named_children():
            visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    return Plan(regions, rejected)


# ---------------------------------------------------------------------------- shared tensors


def shared_tensors(model: torch.nn.Module, region: Region, rec: Recording) -> Dict[str, str]:
    """Tensors of the region (local names) that code outside it also holds or reads: ``{local
    name: who}``. Outside means registered under another name (tied weights), or read by a
    torch function while the region's own module was not running (by the code around it, by
    another module it is tied into, or by a child of the region called from outside)."""
    owners: Dict[int, List[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        owners.setdefault(id(t), []).append(name)
    root = region.module.region_module
    out: Dict[str, str] = {}
    gm = region.module
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        outside = [q for q in owners.get(id(t), []) if not any(q.startswith(p + ".") for p in region.paths)]
        under = rec.tensor_under.get(id(t))
        if not outside and under is not None and root is not None and id(root) not in under:
            users = sorted(rec.tensor_users.get(id(t), ()))
            elsewhere = [u for u in users if not any(_under(u, p) for p in region.paths)]
            outside = [f"module '{(elsewhere or users or ['?'])[0] or '<root>'}'"
                       + ("" if elsewhere else " called from outside the region")]
        if outside:
            out[name] = outside[0]
    return out


def freeze_shared(region: Region, shared: Dict[str, str]) -> None:
    """Freeze every group of the region that touches a shared tensor; drop its erasables."""
    if not shared:
        return
    prog = region.program
    canonical = prog.analysis.analysis.canonical
    names = set(shared) | {canonical.get(n, n) for n in shared}
    first = {canonical.get(n, n): (n, other) for n, other in shared.items()}
    for g in prog.groups:
        hit = next((s.param for s in list(g.slices) + list(g.dependents) if s.param in names), None)
        if hit is not None:
            local, other = first.get(hit, (hit, shared.get(hit, "?")))
            g.prunable = False
            g.reason = (f"parameter '{region.name}.{local}' is shared with {other} outside region "
                        f"'{region.name}'")
    region.shared = dict(shared)


# ---------------------------------------------------------------------------- the program's module


def swap_in(model: torch.nn.Module, replacements: Dict[str, torch.nn.Module]) -> torch.nn.Module:
    """A module with ``model``'s structure in which the submodule at each path is replaced.

    Modules on the way from the root to a replaced path are shallow copies (their own dicts of
    submodules, parameters and buffers, the same tensors); every other module is ``model``'s
    own object. ``model`` is left as it was."""
    if not replacements:
        return model
    copies: Dict[str, torch.nn.Module] = {}

    def copy_of(path: str) -> torch.nn.Module:
        if path in copies:
            return copies[path]
        if path == "":
            orig = model
        else:
            parent_path, _, attr = path.rpartition(".")
            orig = copy_of(parent_path)._modules[attr]
        new = copy.copy(orig)
        new._modules = dict(orig._modules)
        new._parameters = dict(orig._parameters)
        new._buffers = dict(orig._buffers)
        if path:
            parent_path, _, attr = path.rpartition(".")
            copies[parent_path]._modules[attr] = new
        copies[path] = new
        return new

    for path, module in replacements.items():
        parent_path, _, attr = path.rpartition(".")
        copy_of(parent_path)._modules[attr] = module
    return copies[""]


__all__ = ["Region", "Plan", "compile_region", "find_regions", "shared_tensors", "freeze_shared", "swap_in",
           "record", "META_OUTPUT_REASON"]
