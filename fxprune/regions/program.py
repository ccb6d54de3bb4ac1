"""The Program of a region-compiled model: the regions' groups and erasables under global ids,
named from the root of ``Program.module``, and the slim model built region by region."""
from __future__ import annotations

import copy
import os
import re
import warnings
from dataclasses import replace
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from fxprune.errors import FxPruneError, VerificationError
from fxprune.ir import Erasable, Group, Slice
from fxprune.program import Program, check_outputs, copy_training_flags

from .build import Region
from .calls import KwargsCall, rebound_original, region_graph_module


def _prefixed(region: str, name: str) -> str:
    return f"{region}.{name}"


def _node(region: str, node: str) -> str:
    return f"{region}:{node}"


class RegionProgram(Program):
    """A :class:`fxprune.Program` over the regions of a model (see :mod:`fxprune.regions`).

    Attributes:
        module: the model the user trains: the user's model with every region's
            :class:`~fxprune.regions.calls.RegionGraphModule` in place of its submodule; it
            shares every parameter with the user's model.
        regions: list of :class:`~fxprune.regions.build.Region`, in module order.
        rejected: ``{qualified name: reason}`` of the submodules tried or skipped.
        groups, erasables: those of every region, with global ids (region by region, in each
            region's order) and parameter names from the root of ``module``.
    """

    def __init__(self, module: torch.nn.Module, example_inputs: tuple, regions: List[Region], *, model=None,
                 modes: Sequence[str] = ("prune",), rejected: Optional[Dict[str, str]] = None,
                 call_kwargs: Optional[dict] = None):
        super().__init__(module, example_inputs, None, model=model, modes=modes)
        self.regions = regions
        self.rejected = dict(rejected or {})
        self.call_kwargs = dict(call_kwargs or {})
        self._groups: List[Group] = []
        self._local: List[Tuple[int, int]] = []  # global group id -> (region index, local id)
        self._erasables: List[Erasable] = []
        self._local_erasable: List[Tuple[int, int]] = []
        self._global_of: List[Dict[int, int]] = []
        for ri, r in enumerate(regions):
            gmap = {}
            for g in r.program.groups:
                gid = len(self._groups)
                gmap[g.id] = gid
                self._groups.append(Group(
                    id=gid, size=g.size, slices=[_rename(s, r.name) for s in g.slices],
                    dependents=[_rename(s, r.name) for s in g.dependents], prunable=g.prunable, exact=g.exact,
                    reason=g.reason, nodes=[_node(r.name, n) for n in g.nodes]))
                self._local.append((ri, g.id))
            self._global_of.append(gmap)
            r.groups = list(gmap.values())
        for ri, r in enumerate(regions):
            if "erase" not in self.modes:
                break
            shared = set(r.shared)
            local = [e for e in r.program.erasables
                     if not (set(e.params) | {s.param for s in e.slices}) & shared]
            emap = {e.id: len(self._erasables) + k for k, e in enumerate(local)}
            for e in local:
                self._erasables.append(replace(
                    e, id=emap[e.id], nodes=[_node(r.name, n) for n in e.nodes],
                    params=[_prefixed(r.name, p) for p in e.params],
                    parents=[emap[p] for p in e.parents if p in emap],
                    children=[emap[c] for c in e.children if c in emap],
                    sink=_node(r.name, e.sink), joints=[_node(r.name, j) for j in e.joints],
                    slices=[_rename(s, r.name) for s in e.slices],
                    channels={self._global_of[ri][g]: c for g, c in e.channels.items()}))
                self._local_erasable.append((ri, e.id))
            r.erasables = list(emap.values())

    # ------------------------------------------------------------------ analyses
    @property
    def analysis(self):
        raise FxPruneError("a region-compiled program has one analysis per region: prog.regions[i].program.analysis")

    @property
    def groups(self) -> List[Group]:
        return self._groups

    @property
    def passes(self) -> List[str]:
        return ["record", "regions"] + (self.regions[0].program.passes if self.regions else [])

    @property
    def erasables(self) -> List[Erasable]:
        return self._erasables

    @property
    def erase_graph(self) -> "RegionEraseGraph":
        return RegionEraseGraph(self)

    def region_of(self, gid: int) -> Region:
        """The region of global group ``gid``."""
        return self.regions[self._local[gid][0]]

    def local_keep(self, keep: Mapping[int, np.ndarray]) -> List[Dict[int, np.ndarray]]:
        """Global ``{group id: mask}`` -> one local dict per region."""
        out: List[Dict[int, np.ndarray]] = [{} for _ in self.regions]
        for gid, mask in keep.items():
            ri, lid = self._local[gid]
            out[ri][lid] = mask
        return out

    def check_construction(self, rtol: float = 1e-4) -> Dict[int, str]:
        """:meth:`fxprune.Program.check_construction` region by region (each region's program
        on its first recorded call); the groups it freezes, ``{global group id: reason}``, are
        frozen here too, their reason naming the region."""
        if self._construction_checked is not None:
            return dict(self._construction_checked)
        failing: Dict[int, str] = {}
        for ri, r in enumerate(self.regions):
            for lid, reason in r.program.check_construction(rtol).items():
                g = self._groups[self._global_of[ri][lid]]
                g.prunable = False
                g.reason = f"region '{r.name}': {r.program.groups[lid].reason}"
                failing[g.id] = reason
        self._construction_checked = failing
        return dict(failing)

    # ------------------------------------------------------------------ the slim model
    def construct_subnet(self, verify: bool = True, rtol: float = 1e-4) -> torch.nn.Module:
        """The slim model: a deep copy of :attr:`module` in which every region is its slim
        GraphModule (channels zero in all their group's producer slices removed; zero erasable
        operators deleted in mode ``"erase"``). The program and the user's model are left
        untouched.

        With ``verify`` (default), each slim region is compared with its full region on every
        recorded call, and the slim model with :attr:`module` on the example inputs (eval
        mode): :class:`fxprune.VerificationError` if an output differs by more than ``rtol *
        max(1, max |full output|)``, changes shape, or an integer output (labels) changes.
        """
        keep = {}
        if "prune" in self.modes:
            keep = {gid: ~zero for gid, zero in self.zero_channels().items() if zero.any()}
        per_region = self.local_keep(keep)
        erase: List[List[int]] = [[] for _ in self.regions]
        if "erase" in self.modes:
            for eid in self._erase_set():
                ri, lid = self._local_erasable[eid]
                erase[ri].append(lid)
        memo: Dict[int, torch.nn.Module] = {}
        for r, k, e in zip(self.regions, per_region, erase):
            if not k and not e:
                continue
            flat = r.program._slim(k, e)
            if verify:
                for i, call in enumerate(r.recorded):
                    check_outputs(r.module, flat, call.tensors, rtol, what=f"region '{r.name}' (recorded call {i + 1})")
            memo[id(r.module)] = region_graph_module(flat, r.module.region_call, r.name,
                                                     original=rebound_original(r.module.region_module, flat),
                                                     class_name=type(r.module).__name__)
        slim = copy.deepcopy(self.module, memo)
        copy_training_flags(slim, self._model if self._model is not None else self.module)
        if verify:
            full, new = (KwargsCall(self.module, self.call_kwargs), KwargsCall(slim, self.call_kwargs)) if self.call_kwargs \
                else (self.module, slim)
            try:
                check_outputs(full, new, self.example_inputs, rtol)
            except VerificationError as exc:
                worst = self._check_regions_in_place(full, slim, rtol)
                warnings.warn(
                    f"{exc}. Every slim region matches its full region on the inputs it receives in this run (max "
                    f"abs difference {worst:.3e}), so the code between the regions (the model's own Python, e.g. a "
                    f"detector's top-k and non-maximum suppression) turns rounding differences into different "
                    f"outputs; compare in float64 to see them vanish", RuntimeWarning, stacklevel=2)
        return slim

    def _check_regions_in_place(self, full: torch.nn.Module, slim: torch.nn.Module, rtol: float) -> float:
        """Run ``full`` on the example inputs, feed every region's inputs of that run to the slim
        region, and raise :class:`fxprune.VerificationError` (naming the region) where an
        output differs beyond ``rtol``. Returns the largest absolute difference."""
        from fxprune.passes.modes import eval_mode
        from fxprune.program import max_output_difference

        seen: Dict[str, list] = {r.name: [] for r in self.regions}
        handles = [r.module.register_forward_hook(
            lambda mod, args, out, name=r.name: seen[name].append(tuple(a.detach() for a in args)))
            for r in self.regions]
        try:
            with torch.no_grad(), eval_mode(full):
                full(*self.example_inputs)
        finally:
            for h in handles:
                h.remove()
        worst = 0.0
        for r in self.regions:
            new = slim.get_submodule(r.name)
            for i, args in enumerate(seen[r.name]):
                diff, scale = max_output_difference(r.module, new, args)
                if diff > rtol * max(1.0, scale):
                    raise VerificationError(
                        f"the slim model's region '{r.name}' differs from the full one on its inputs of call {i + 1}: "
                        f"max abs difference {diff:.3e} (max |output| {scale:.3e}, tolerance {rtol:g} relative)")
                worst = max(worst, diff)
        return worst

    # ------------------------------------------------------------------ training helpers
    def gated_module(self):
        """The gated model of Auto-Train-Once: every region's gated GraphModule in place
        (:func:`fxprune.regions.training.insert_region_gates`)."""
        from .training import insert_region_gates

        return insert_region_gates(self)

    def flops_model(self):
        """FLOPs as a function of the kept channels (:class:`fxprune.regions.training.RegionFlopsModel`)."""
        from .training import RegionFlopsModel

        return RegionFlopsModel(self)

    # ------------------------------------------------------------------ inspection
    def to_dot(self, path: Optional[str] = None) -> str:
        """DOT of every region's graph (one cluster per region, nodes coloured by global group)
        and a legend of the groups. Written to ``path`` if given; returns the text."""
        from fxprune.dot import regions_to_dot

        text = regions_to_dot(self).to_string()
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def dump(self, directory: str) -> List[str]:
        """Each region's IR after every pass, in a folder per region (see :meth:`Program.dump`)."""
        written = []
        for r in self.regions:
            written += r.program.dump(os.path.join(directory, re.sub(r"\W+", "_", r.name)))
        return written

    def _size(self) -> str:
        return f"{len(self.regions)} regions"

    def _summary_parts(self) -> List[str]:
        lines = [f"  {r!r}" + (f" at {', '.join(r.paths[1:])} too" if len(r.paths) > 1 else "") for r in self.regions]
        return lines + [f"  not a region: {name or '<root>'}: {why}" for name, why in self.rejected.items()]

    def _repr_parts(self) -> str:
        return f"regions={len(self.regions)}, "


def _rename(s: Slice, region: str) -> Slice:
    return replace(s, param=_prefixed(region, s.param))


class RegionEraseGraph:
    """The erase graphs of every region behind global erasable ids (what H2SPG and
    ``construct_subnet`` ask of :class:`fxprune.passes.erasable.EraseGraph`)."""

    def __init__(self, prog: RegionProgram):
        self.prog = prog
        self.parts = [r.program.erase_graph if r.program.erasables else None for r in prog.regions]
        self.units: Dict[int, frozenset] = {}
        self.flops: Dict[str, int] = {}
        for gid, (ri, lid) in enumerate(prog._local_erasable):
            name = prog.regions[ri].name
            self.units[gid] = frozenset(_node(name, n) for n in self.parts[ri].units[lid])
        for r, eg in zip(prog.regions, self.parts):
            if eg is not None:
                self.flops.update({_node(r.name, n): f for n, f in eg.flops.items()})

    def _split(self, ids: Iterable[int]) -> Dict[int, List[int]]:
        out: Dict[int, List[int]] = {}
        for gid in ids:
            ri, lid = self.prog._local_erasable[gid]
            out.setdefault(ri, []).append(lid)
        return out

    def _global(self, ri: int, lids: Iterable[int]) -> Set[int]:
        back = {(r, l): g for g, (r, l) in enumerate(self.prog._local_erasable)}
        return {back[(ri, l)] for l in lids if (ri, l) in back}

    def closure(self, ids: Iterable[int]) -> Set[int]:
        out: Set[int] = set()
        for ri, lids in self._split(ids).items():
            out |= self._global(ri, self.parts[ri].closure(lids))
        return out

    def plan(self, ids: Iterable[int]):
        from fxprune.passes.erasable import ErasePlan

        units = self.closure(ids)
        plan = ErasePlan(tuple(sorted(units)))
        plan.flops = 0
        for ri, lids in self._split(units).items():
            name = self.prog.regions[ri].name
            part = self.parts[ri].plan(lids)
            if not part.valid and plan.valid:
                plan.valid, plan.reason = False, f"region '{name}': {part.reason}"
            plan.flops += part.flops
            plan.dead |= {_node(name, n) for n in part.dead}
            plan.removed |= {_node(name, n) for n in part.removed}
        return plan

    def is_valid(self, ids: Iterable[int]) -> bool:
        return self.plan(ids).valid


__all__ = ["RegionProgram", "RegionEraseGraph"]
