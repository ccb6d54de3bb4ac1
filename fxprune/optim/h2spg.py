"""H2SPG: the Hierarchical Half-Space Projected Gradient optimizer of OTOv3.

Reference: T. Chen, T. Ding, Z. Zhu, Z. Chen, H. Wu, I. Zharkov, L. Liang. "OTOv3: Automatic
Architecture-Agnostic Neural Network Training and Compression from Structured Pruning to
Erasing Operators". arXiv 2312.09411, Sec. 4 (H2SPG). The reference code never released the
erasing mode; this is fxprune's implementation of the algorithm as the paper describes it:
the zero-invariant groups are whole operators (the program's
:class:`fxprune.Erasable` units), and the redundant set is chosen so that erasing it keeps the
network valid. The update itself is DHSPG's (OTOv2), which this class reuses unchanged.
"""
from __future__ import annotations

import math
import warnings
from types import SimpleNamespace
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch

from ..ir import Group, Slice
from ._groups import redundancy_saliency
from .dhspg import DHSPG

__all__ = ["H2SPG", "select_units", "unit_saliency"]


def unit_saliency(xx: torch.Tensor, xd: torch.Tensor, dd: torch.Tensor, numel: torch.Tensor) -> torch.Tensor:
    """Redundancy saliency of erasable units (``Tensor[N]`` each; OTOv2 Sec. 4, see
    :func:`fxprune.optim._groups.redundancy_saliency`); units with ``n == 0`` get ``-inf``."""
    return redundancy_saliency(xx, xd, dd, numel)


def select_units(erase_graph: Any, candidates: Sequence[int], scores: Sequence[float], *,
                 target_units: Optional[int] = None, flops_budget: Optional[float] = None) -> List[int]:
    """OTOv3's hierarchical partition: take the candidate units in decreasing ``scores`` order;
    a unit joins the redundant set (with every unit it contains) unless the set would then
    exceed the target (``target_units`` units, or ``flops_budget`` FLOPs removed) or erasing it
    would leave an invalid network (:meth:`~fxprune.passes.erasable.EraseGraph.plan`: an
    operator reading an erased value, an input cut off from an output). Skipped units are
    retried in the same order while a pass adds any. Stops once ``target_units`` is met.
    Returns the chosen unit ids (closure included), sorted."""
    order = [i for i in sorted(range(len(candidates)), key=lambda i: (-float(scores[i]), candidates[i]))
             if math.isfinite(float(scores[i]))]
    chosen: Set[int] = set()
    # Validity is not monotone (erasing every operator summed into a node is invalid until the
    # operators reading that node are erased too), so a skipped unit is tried again on the next
    # pass over the order, until a pass adds nothing.
    progressed = True
    while progressed:
        progressed = False
        for i in order:
            if target_units is not None and len(chosen) >= target_units:
                return sorted(chosen)
            u = candidates[i]
            if u in chosen:
                continue
            new = erase_graph.closure(chosen | {u})
            if target_units is not None and len(new) > target_units:
                continue
            plan = erase_graph.plan(new)
            if not plan.valid:
                continue
            if flops_budget is not None and plan.flops > flops_budget:
                continue
            chosen = set(new)
            progressed = True
    return sorted(chosen)


class H2SPG(DHSPG):
    r"""Hierarchical Half-Space Projected Gradient (OTOv3, Chen et al., arXiv 2312.09411, Sec. 4).

    Trains ``prog.module`` (a program compiled with ``mode="erase"`` or ``("prune", "erase")``)
    and drives whole erasable operators (``prog.erasables``) to exactly zero, choosing them so
    that erasing them leaves a valid network; ``prog.construct_subnet()`` then deletes them.

    **Groups.** Each erasable unit is one zero-invariant group whose variables are all its
    parameters and its ``slices`` (the downstream entries of the channels a concat branch
    feeds). Units nest (an Inception branch holds the units of its inner concat); for the
    update, every parameter row belongs to one unit, the innermost that owns the whole
    parameter (a row two units share, like a DenseNet layer's BatchNorm entry for an earlier
    layer's channels, belongs to the layer that owns the BatchNorm, and is zeroed with the
    other one too once it is erased).

    **Phases** (steps from 0):

    1. ``step < start_pruning_step`` (warm-up): the base update of DHSPG (SGD, Adam or AdamW).
       Every step the redundancy saliency of every unit (see :func:`unit_saliency`, over the
       unit's variables and those of the units it contains) is averaged with momentum:
       ``score <- m * score + (1 - m) * s`` (``score_momentum``; the first step sets it).
    2. At ``start_pruning_step``: the hierarchical partition (:func:`select_units`) takes the
       units in decreasing score order, skipping any whose erasure together with the ones
       already taken would disconnect an input from an output (graph reachability through
       networkx) or leave an operator reading an erased value, until the target is met.
    3. ``pruning_steps`` steps of DHSPG's half-space projection on the chosen units, with its
       exact-target quota: every chosen unit is exactly zero at the end.
    4. Afterwards the base update on the rest.

    **Target.** With ``target="units"`` (default) ``K = floor(target_group_sparsity * N)`` of
    the ``N`` units are erased, exactly (fewer, with a warning, only if no valid set of ``K``
    exists in score order). With ``target="flops"`` units are taken while the FLOPs they remove
    stay within ``target_group_sparsity`` of the FLOPs of all erasable operators.

    Args:
        prog: an ``fxprune.Program`` compiled with mode ``"erase"``.
        lr: learning rate (required).
        target_group_sparsity: fraction of units (or of their FLOPs) to erase, in ``[0, 1)``.
        target: ``"units"`` or ``"flops"``.
        score_momentum: momentum ``m`` of the score average, in ``[0, 1)``, default 0.9.
        erasables: ids of the units that may be erased (default: all of ``prog.erasables``).
        start_pruning_step, pruning_steps, variant, momentum, weight_decay, epsilon, lmbda, ...:
            as for :class:`fxprune.DHSPG`; ``start_pruning_step`` is the warm-up length.

    Attributes: ``target_units`` ``K``; ``chosen`` the redundant units (ids, after the
    partition); ``scores`` the averaged saliency per unit (``Tensor[N]``, NaN before the first
    step); :meth:`erased` the units already zero.

    Example::

        prog = fxprune.compile(model, x, mode="erase")
        opt = fxprune.H2SPG(prog, lr=0.05, target_group_sparsity=0.3, start_pruning_step=500,
                            pruning_steps=2000)
        ...train...
        slim = prog.construct_subnet()
    """

    def __init__(self, prog: Any, lr: float, *, target_group_sparsity: float = 0.5, target: str = "units",
                 score_momentum: float = 0.9, erasables: Optional[Iterable[int]] = None,
                 **kwargs: Any) -> None:
        if target not in ("units", "flops"):
            raise ValueError(f"target must be 'units' or 'flops', got {target!r}")
        if not 0.0 <= score_momentum < 1.0:
            raise ValueError(f"score_momentum must be in [0, 1), got {score_momentum}")
        if not 0.0 <= target_group_sparsity < 1.0:
            raise ValueError(f"target_group_sparsity must be in [0, 1), got {target_group_sparsity}")
        all_units = list(getattr(prog, "erasables", []) or [])
        if "erase" not in getattr(prog, "modes", ("erase",)):
            raise ValueError("H2SPG needs a program compiled with mode='erase' (or ('prune', 'erase'))")
        self.erase_graph = prog.erase_graph
        ids = sorted(set(erasables)) if erasables is not None else [e.id for e in all_units]
        self.unit_ids: List[int] = ids
        self.target = target
        self.score_momentum = float(score_momentum)
        N = len(ids)
        self.target_units = int(math.floor(target_group_sparsity * N + 1e-9)) if target == "units" else None
        if target == "flops":
            nodes: Set[str] = set()
            for u in ids:
                nodes |= self.erase_graph.units[u]
            total = sum(self.erase_graph.flops.get(n, 0) for n in nodes)
            self.flops_budget: Optional[float] = target_group_sparsity * total
        else:
            self.flops_budget = None

        pseudo, self._shared = _unit_groups(prog, all_units)
        view = SimpleNamespace(module=prog.module, groups=[pseudo] if pseudo.size else [])
        active = target_group_sparsity > 0 and N > 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            super().__init__(view, lr, target_group_sparsity=0.5 if active else 0.0, **kwargs)
        self.program = prog
        # a placeholder K until the partition fixes it: keeps the warm-up and pruning phases on
        self.target_channels = 1 if active else 0
        L = self._layout
        C = L.num_channels
        dev = L.device
        # membership[u_pos, c]: unit at position u_pos of unit_ids contains atom c (itself or a child)
        member = torch.zeros(N, C, dtype=self._acc, device=dev)
        for k, u in enumerate(ids):
            for w in self.erase_graph.closure([u]):
                if w < C:
                    member[k, w] = 1.0
        self._member = member
        self._unit_numel = member @ L.channel_numel.to(self._acc) if C else torch.zeros(N, dtype=self._acc)
        self._h: Dict[str, Any] = {
            "scores": torch.full((N,), math.nan, dtype=self._acc, device=dev),
            "scored_steps": 0,
            "chosen": [],
        }
        self._erased_cache: Optional[Tuple[int, List[int]]] = None

    # ------------------------------------------------------------------ properties
    @property
    def scores(self) -> torch.Tensor:
        """Averaged redundancy saliency per unit (in the order of ``unit_ids``)."""
        return self._h["scores"]

    @property
    def chosen(self) -> List[int]:
        """Units of the redundant set (empty before the partition)."""
        return list(self._h["chosen"])

    def erased(self) -> List[int]:
        """Chosen units that are exactly zero now (every atom projected)."""
        n = int(self._dh["projected"].sum())
        if self._erased_cache is not None and self._erased_cache[0] == n and self._dh["partitioned"]:
            return list(self._erased_cache[1])
        proj = self._dh["projected"]
        zeroable = self._zeroable
        out = []
        for u in self._h["chosen"]:
            atoms = [w for w in self.erase_graph.closure([u]) if w < len(proj) and bool(zeroable[w])]
            if all(bool(proj[w]) for w in atoms):
                out.append(u)
        self._erased_cache = (n, out)
        return list(out)

    def masks(self) -> Dict[int, torch.Tensor]:
        """H2SPG zeroes operators, not channels: no channel keep-masks (see :meth:`erased`)."""
        return {}

    # ------------------------------------------------------------------ DHSPG hooks
    def _phase_active(self, t: int) -> bool:
        if not self._dh["partitioned"] and t < self.start_pruning_step:
            return self.target_channels > 0 and self._layout.num_channels > 0  # warm-up: scores need directions
        return super()._phase_active(t)

    def _partition(self, xx: torch.Tensor, xd: torch.Tensor, dd: torch.Tensor) -> None:
        """Average the unit scores; at ``start_pruning_step``, choose the redundant units."""
        M = self._member
        s = unit_saliency(M @ xx, M @ xd, M @ dd, self._unit_numel)
        h = self._h
        if h["scored_steps"]:
            avg = self.score_momentum * h["scores"] + (1.0 - self.score_momentum) * s
            s = torch.where(torch.isfinite(s), avg, s)
        h["scores"] = s
        h["scored_steps"] += 1
        if int(self._dh["step"]) < self.start_pruning_step:
            return
        chosen = select_units(self.erase_graph, self.unit_ids, h["scores"].tolist(),
                              target_units=self.target_units, flops_budget=self.flops_budget)
        if self.target_units is not None and len(chosen) < self.target_units:
            warnings.warn(f"H2SPG: only {len(chosen)} of the {self.target_units} target units can be erased "
                          f"together while keeping the network valid", stacklevel=3)
        h["chosen"] = chosen
        red = torch.zeros_like(self._dh["redundant"])
        for u in chosen:
            if u < len(red):
                red[u] = bool(self._zeroable[u])
        self._dh["redundant"] = red
        self._dh["partitioned"] = True
        self.target_channels = int(red.sum())
        self._zero_rows_cache = None

    def _enforce_zeros(self) -> None:
        super()._enforce_zeros()
        if not self._shared or not self._h["chosen"]:
            return
        for u in self.erased():
            for p, dim, rows in self._shared.get(u, ()):
                self._zero_param_rows(p, dim, rows)

    # ------------------------------------------------------------------ reporting
    @torch.no_grad()
    def metrics(self) -> Dict[str, float]:
        """DHSPG's report (its "channels" are the units' atoms) plus ``units``, ``target_units``,
        ``chosen_units`` and ``erased_units``."""
        out = super().metrics()
        out.update(units=len(self.unit_ids), target_units=self.target_units if self.target_units is not None else -1,
                   chosen_units=len(self._h["chosen"]), erased_units=len(self.erased()))
        return out

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        h = self._h
        sd["h2spg"] = {"scores": h["scores"].detach().cpu().clone(), "scored_steps": int(h["scored_steps"]),
                       "chosen": torch.tensor(h["chosen"], dtype=torch.long), "unit_ids": torch.tensor(self.unit_ids),
                       "target_units": -1 if self.target_units is None else int(self.target_units)}
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("h2spg", None)
        super().load_state_dict(state_dict)
        if extra is None:
            return
        if extra["unit_ids"].tolist() != self.unit_ids:
            raise ValueError("state dict is for a different set of erasable units")
        dev = self._layout.device
        self._h = {"scores": extra["scores"].to(dev, self._acc).clone(), "scored_steps": int(extra["scored_steps"]),
                   "chosen": [int(u) for u in extra["chosen"].tolist()]}
        t = int(extra["target_units"])
        self.target_units = None if t < 0 else t
        self._erased_cache = None


def _unit_groups(prog: Any, units: Sequence[Any]
                 ) -> Tuple[Group, Dict[int, List[Tuple[torch.Tensor, int, torch.Tensor]]]]:
    """One pseudo-group whose channel ``u`` is unit ``u``'s atom: the rows it owns.

    A parameter's rows are counted along dim 0, or along the dim its units' ``slices`` use.
    Each row belongs to the innermost unit owning the whole parameter, else to the first unit
    whose ``slices`` hold it. Returns the group and, per unit, the ``(param, dim, rows)`` of its
    slices owned by another unit (zeroed with it once it is erased).
    """
    module = prog.module
    eg = prog.erase_graph
    size_of = {u.id: len(eg.units.get(u.id, ())) for u in units}
    dims: Dict[str, int] = {}
    for u in units:
        for s in u.slices:
            dims.setdefault(s.param, s.dim)
    owner: Dict[str, torch.Tensor] = {}
    tensors: Dict[str, torch.Tensor] = {}

    def rows(name: str) -> torch.Tensor:
        if name not in owner:
            t = module.get_parameter(name)
            tensors[name] = t
            d = dims.get(name, 0)
            n = t.shape[d] if t.dim() > 0 else 1
            owner[name] = torch.full((int(n),), -1, dtype=torch.long)
        return owner[name]

    # whole parameters: innermost (fewest nodes) unit first
    for u in sorted(units, key=lambda e: (size_of[e.id], e.id)):
        for p in u.params:
            r = rows(p)
            r[r < 0] = u.id
    shared: Dict[int, List[Tuple[torch.Tensor, int, torch.Tensor]]] = {}
    for u in units:
        for s in u.slices:
            r = rows(s.param)
            d = dims[s.param]
            t = tensors[s.param]
            if s.dim != d:
                shared.setdefault(u.id, []).append((t, s.dim, s.index.clone()))
                continue
            idx = s.index.long()
            free = r[idx] < 0
            r[idx[free]] = u.id
            taken = idx[r[idx] != u.id]
            if len(taken):
                shared.setdefault(u.id, []).append((t, d, taken.to(t.device)))
    slices = []
    for name, r in owner.items():
        d = dims.get(name, 0)
        for u in torch.unique(r[r >= 0]).tolist():
            pos = torch.nonzero(r == u).reshape(-1)
            slices.append(Slice(param=name, dim=d, index=pos, channel=torch.full_like(pos, int(u))))
    size = (max(u.id for u in units) + 1) if units else 0
    return Group(id=0, size=size, slices=slices), shared
