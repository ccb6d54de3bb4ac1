"""What Auto-Train-Once needs of a region-compiled program: channel gates over every region and
FLOPs as a function of the kept channels, both in the program's flat channel order (the
prunable groups by global id, each group's channels in turn: region by region)."""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from fxprune.errors import FxPruneError
from fxprune.passes.gating import gate_vector

from .build import swap_in
from .calls import CallSpec


class GatedRegion(nn.Module):
    """A region's gated GraphModule called as the region's submodule was."""

    def __init__(self, gated: nn.Module, spec: CallSpec, name: str):
        super().__init__()
        self.gated = gated
        self.spec = spec
        self.name = name

    def forward(self, *args, **kwargs):
        return self.gated(*self.spec.tensors(args, kwargs, self.name))


class RegionGatedModule(nn.Module):
    """The gated model of a region program (what :func:`fxprune.passes.gating.insert_gates` is
    for one graph): ``Program.module`` with each region's
    :class:`~fxprune.passes.gating.GatedGraphModule` in place; every parameter is shared.

    Attributes: ``num_channels`` (``C``), ``group_ids`` (global ids of the prunable groups, in
    flat order), ``group_offsets``, ``group_sizes``; :meth:`set_gates`, :meth:`gated`,
    :attr:`gates` as on ``GatedGraphModule``.
    """

    def __init__(self, prog):
        from fxprune.passes.gating import insert_gates

        super().__init__()
        self.parts: List[Tuple[nn.Module, int, int]] = []  # (gated graph, flat offset, channels)
        self.group_ids: List[int] = []
        self.group_offsets: List[int] = []
        self.group_sizes: List[int] = []
        replacements = {}
        offset = 0
        for ri, r in enumerate(prog.regions):
            gated = insert_gates(r.program)
            c = int(gated.num_channels)
            self.parts.append((gated, offset, c))
            gmap = prog._global_of[ri]
            self.group_ids += [gmap[g] for g in gated.group_ids]
            self.group_offsets += [offset + o for o in gated.group_offsets]
            self.group_sizes += list(gated.group_sizes)
            wrapper = GatedRegion(gated, r.module.region_call, r.name)
            for p in r.paths:
                replacements[p] = wrapper
            offset += c
        self.num_channels = offset
        self.model = swap_in(prog.module, replacements)
        self._gates: Optional[torch.Tensor] = None

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def set_gates(self, values: Any = None) -> None:
        """``None`` (every gate 1), a ``Tensor[C]`` in flat channel order (autograd flows
        through it) or ``{group id: values of length size}``."""
        if values is None:
            self._gates = None
            for gated, _, _ in self.parts:
                gated.set_gates(None)
            return
        v = gate_vector(values, self.num_channels, self.flat_from_groups)
        self._gates = v
        for gated, off, c in self.parts:
            gated.set_gates(v[off:off + c] if c else None)

    @property
    def gates(self) -> Optional[torch.Tensor]:
        return self._gates

    @contextlib.contextmanager
    def gated(self, values: Any):
        """Gates set to ``values`` inside, restored on exit."""
        old = self._gates
        self.set_gates(values)
        try:
            yield self
        finally:
            self.set_gates(old)

    def flat_from_groups(self, values: Mapping[int, Any]) -> torch.Tensor:
        out = torch.ones(self.num_channels, dtype=torch.get_default_dtype())
        where = dict(zip(self.group_ids, self.group_offsets))
        sizes = dict(zip(self.group_ids, self.group_sizes))
        for gid, v in values.items():
            if gid not in where:
                raise FxPruneError(f"group {gid} is not a prunable group of this program")
            t = torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v).to(out.dtype).reshape(-1)
            if t.numel() != sizes[gid]:
                raise FxPruneError(f"gate values for group {gid} have {t.numel()} entries, expected {sizes[gid]}")
            out[where[gid]:where[gid] + sizes[gid]] = t
        return out


def insert_region_gates(prog) -> RegionGatedModule:
    return RegionGatedModule(prog)


class RegionFlopsModel:
    """FLOPs of a region program as a function of its kept channels
    (:class:`fxprune.flops_model.FlopsModel` per region, in the program's flat channel order).

    The whole model runs once on the example inputs under ``FlopCounterMode``: what the regions
    do in that run is counted by their models, scaled by ``weight`` (a region called twice, or
    on more rows than its first recorded call, counts for more); the rest (the code between
    regions) is a constant, ``outside``. ``full``, ``fixed``, ``flops(keep)``,
    ``ratio(keep)``, ``flat_keep(keep)`` and calling it on a ``Tensor[C]`` are those of
    ``FlopsModel``."""

    def __init__(self, prog, *, measure: bool = True):
        from torch.utils.flop_counter import FlopCounterMode

        from fxprune.flops_model import FlopsModel
        from fxprune.passes.modes import eval_mode

        self.parts: List[Tuple[FlopsModel, int, int, float]] = []  # (model, flat offset, channels, weight)
        self.group_ids: List[int] = []
        self.group_offsets: List[int] = []
        self.group_sizes: List[int] = []
        in_run: Dict[str, float] = {r.name: 0.0 for r in prog.regions}
        with FlopCounterMode(display=False) as counter:
            marks: Dict[str, float] = {}
            handles = []
            for r in prog.regions:
                handles.append(r.module.register_forward_pre_hook(
                    lambda m, a, name=r.name: marks.__setitem__(name, counter.get_total_flops())))
                handles.append(r.module.register_forward_hook(
                    lambda m, a, o, name=r.name: in_run.__setitem__(
                        name, in_run[name] + counter.get_total_flops() - marks[name])))
            try:
                with torch.no_grad(), eval_mode(prog.module):
                    args = prog.example_inputs
                    prog.module(*args, **prog.call_kwargs)
            finally:
                for h in handles:
                    h.remove()
        total = float(counter.get_total_flops())
        offset = 0
        for ri, r in enumerate(prog.regions):
            fm = FlopsModel(r.program, measure=measure)
            first = float(sum(nc.measured or 0 for nc in fm.nodes))
            weight = in_run[r.name] / first if first > 0 else float(r.calls)
            self.parts.append((fm, offset, fm.num_channels, weight))
            gmap = prog._global_of[ri]
            self.group_ids += [gmap[g] for g in fm.group_ids]
            self.group_offsets += [offset + o for o in fm.group_offsets]
            self.group_sizes += list(fm.group_sizes)
            offset += fm.num_channels
        self.num_channels = offset
        self.outside = max(0.0, total - sum(in_run.values()))
        self.full = int(round(self.outside + sum(w * fm.full for fm, _, _, w in self.parts)))
        self.fixed = int(round(self.outside + sum(w * fm.fixed for fm, _, _, w in self.parts)))
        self.prunable_full = self.full - self.fixed
        self._offset = dict(zip(self.group_ids, self.group_offsets))

    def flat_keep(self, keep: Optional[Mapping[int, Any]] = None) -> np.ndarray:
        out = np.ones(self.num_channels)
        for gid, mask in (keep or {}).items():
            if gid not in self._offset:
                continue
            size = self.group_sizes[self.group_ids.index(gid)]
            m = np.asarray(mask, dtype=bool).reshape(-1)
            if m.shape != (size,):
                raise FxPruneError(f"keep-mask for group {gid} has {m.size} entries, expected {size}")
            out[self._offset[gid]:self._offset[gid] + size] = m
        return out

    def _eval_np(self, keep: Optional[np.ndarray]) -> float:
        total = self.outside
        for fm, off, c, w in self.parts:
            total += w * fm._eval_np(None if keep is None else keep[off:off + c])
        return float(total)

    def flops(self, keep: Optional[Mapping[int, Any]] = None) -> int:
        return int(round(self._eval_np(self.flat_keep(keep))))

    def ratio(self, keep: Optional[Mapping[int, Any]] = None) -> float:
        return self.flops(keep) / max(1, self.full)

    def __call__(self, keep: torch.Tensor) -> torch.Tensor:
        if keep.shape != (self.num_channels,):
            raise FxPruneError(f"keep values of shape {tuple(keep.shape)}, expected ({self.num_channels},)")
        dtype = keep.dtype if keep.dtype in (torch.float32, torch.float64) else torch.float32
        total = keep.new_tensor(self.outside, dtype=dtype)
        for fm, off, c, w in self.parts:
            part = fm(keep[off:off + c]) if c else keep.new_tensor(float(fm.full), dtype=dtype)
            total = total + w * part.to(dtype)
        return total

    def __repr__(self) -> str:
        return (f"RegionFlopsModel(full={self.full:,}, fixed={self.fixed:,}, regions={len(self.parts)}, "
                f"channels={self.num_channels})")


__all__ = ["GatedRegion", "RegionGatedModule", "RegionFlopsModel", "insert_region_gates"]
