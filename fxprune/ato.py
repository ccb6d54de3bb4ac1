"""Auto-Train-Once (ATO) over fxprune's automatic groups.

Reference: X. Wu, S. Gao, Z. Zhang, Z. Li, R. Bao, Y. Zhang, X. Wang, H. Huang.
"Auto-Train-Once: Controller Network Guided Automatic Network Pruning from Scratch".
CVPR 2024 (arXiv 2403.14729). Notation and defaults follow ``ALGORITHMS.md`` (ATO section).

ATO trains the network as usual while a small *controller* network learns which channels to
keep under a FLOPs budget, and a proximal group-lasso step drives the channels it switches
off to zero. The reference code hand-places gates per architecture and never exports a slim
model; here the gates come from the program's groups (:mod:`fxprune.passes.gating`), the FLOPs
from its graph (:mod:`fxprune.flops_model`), and the end is an exact slim GraphModule.

**Controller** (:class:`ATOController`): a fixed (never trained) orthogonally initialised
64-d embedding per prunable group -> bidirectional GRU (hidden 128) over the groups in program
order -> LayerNorm -> ReLU -> per-group Linear to one logit ``z`` per channel. Training masks
are Gumbel-sigmoid samples ``s = sigmoid((z + g + b) / T)`` (``T = 0.4``, ``b = 3``, ``g``
Gumbel noise) made hard, ``1[s >= 0.5]``, with a straight-through gradient. The deterministic
mask (no noise) keeps a channel when its sampled keep-probability ``P(z + g + b >= 0)`` is at
least 1/2, i.e. ``z + b >= -median(g)``.

**Controller loss**: task loss of the gated model on a held-out batch + ``2 R`` with
``r = (FLOPs(mask) - fixed) / (full - fixed)`` (the prunable FLOPs' kept fraction, computed
differentiably by :class:`fxprune.flops_model.FlopsModel`), target ``p`` on the same scale and
``R = w log(max(r, p + 0.005) / p)`` if ``r > p`` else ``w log(p / min(r, p - 0.005))``,
``w = 4``. ``target_flops_ratio`` is the kept fraction of the *whole* model's FLOPs (what
:func:`fxprune.report` measures); ``p = (target * full - fixed) / (full - fixed)``.
Optimizer: AdamW, lr 1e-3, weight decay 1e-2 on matrices.

**Model**: trained unmasked by the user's optimizer. After each of its steps, in the proximal
phase, every channel the current mask switches off takes the group-lasso proximal step
``x_g <- x_g / ||x_g|| * max(0, ||x_g|| - lambda * ratio_l * lr)`` (``x_g``: the channel's
entries in every producer slice of its group; ``ratio_l``: its group's share of all switched-off
channels; ``lr``: the model's current learning rate), ``lambda = 10``, raised to ``1000`` late.

**Schedule** (fractions of ``total_steps``; the paper's ImageNet run is 245 epochs): warm-up
without controller until ``0.102`` (epoch 25); controller steps every ``controller_every``
(20) model steps until ``0.510`` (epoch 125), where the deterministic mask freezes; proximal
steps from ``0.204`` (epoch 50) to the end, with ``lambda`` raised at ``0.490`` (epoch 120).
Short runs keep the fractions but have few controller steps: lower ``controller_every``
(e.g. 1) and, for large programs, raise ``controller_lr`` (e.g. 1e-2); the calibration below
meets the budget either way.

**End** (:meth:`ATO.finalize`): the frozen masks are applied with ``prog.zero_`` (the proximal
steps have normally zeroed them already; the reference never reaches exact zeros, fxprune
hard-zeroes) and ``prog.construct_subnet()`` builds and verifies the slim model. fxprune's
additions, both documented choices: every group keeps at least its highest-logit channel, and
at the freeze the deterministic mask is *calibrated* when its FLOPs miss the target by more
than ``calibrate_tol``: channels are taken in decreasing order of the controller's logits until
the FLOPs are closest to the target, so the controller's ranking decides which channels go and
the budget is met (``calibrate=False`` keeps the raw mask).

Example::

    from fxprune.ato import held_out_split

    prog = fxprune.compile(model, example_inputs)
    train_set, held_out = held_out_split(dataset, 0.05)
    ato = fxprune.ATO(prog, target_flops_ratio=0.5, total_steps=epochs * len(loader),
                      controller_data=DataLoader(held_out, batch_size=64, shuffle=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in loader:                 # every epoch
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
        ato.step(opt)
    slim = ato.finalize()
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import FxPruneError, UnsupportedInputError

__all__ = ["ATO", "ATOController", "held_out_split", "flops_regularizer", "PAPER_SCHEDULE"]

# The paper's ImageNet schedule in epochs of 245, as fractions of the run.
PAPER_SCHEDULE = {
    "epochs": 245,
    "controller_start": 25 / 245,   # warm-up ends, controller starts
    "mask_freeze": 125 / 245,       # controller stops, masks freeze
    "proximal_start": 50 / 245,     # proximal group-lasso steps start
    "lmbda_late_start": 120 / 245,  # lambda raised
}

_GUMBEL_MEDIAN = -math.log(math.log(2.0))


class ATOController(nn.Module):
    """ATO's controller: fixed group embeddings -> BiGRU -> LayerNorm -> ReLU -> per-group
    Linear, one logit per channel (flat channel order of the gated module).

    Args:
        group_sizes: channels of each prunable group, in program order.
        embed_dim, hidden: embedding width (64) and GRU hidden size per direction (128).
        temperature, base: ``T`` (0.4) and ``b`` (3) of the Gumbel-sigmoid.
        noise: ``"gumbel"`` (reference code: one Gumbel sample, median ``-log log 2``) or
            ``"logistic"`` (difference of two, median 0).
        seed: seeds the embedding and the initial weights.
    """

    def __init__(self, group_sizes: Sequence[int], *, embed_dim: int = 64, hidden: int = 128,
                 temperature: float = 0.4, base: float = 3.0, noise: str = "gumbel", seed: int = 0):
        super().__init__()
        if noise not in ("gumbel", "logistic"):
            raise UnsupportedInputError(f"noise must be 'gumbel' or 'logistic', not {noise!r}")
        self.group_sizes = [int(s) for s in group_sizes]
        self.temperature = float(temperature)
        self.base = float(base)
        self.noise = noise
        gen = torch.Generator().manual_seed(int(seed))
        emb = torch.empty(len(self.group_sizes), embed_dim)
        nn.init.orthogonal_(emb, generator=gen)
        self.register_buffer("embedding", emb)  # fixed: a buffer, never trained
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.gru = nn.GRU(embed_dim, hidden, bidirectional=True, batch_first=True)
            self.norm = nn.LayerNorm(2 * hidden)
            self.heads = nn.ModuleList(nn.Linear(2 * hidden, s, bias=False) for s in self.group_sizes)

    @property
    def num_channels(self) -> int:
        return sum(self.group_sizes)

    def logits(self) -> torch.Tensor:
        """``z``: ``Tensor[C]``."""
        h, _ = self.gru(self.embedding.unsqueeze(0))
        h = F.relu(self.norm(h[0]))
        return torch.cat([head(h[i]) for i, head in enumerate(self.heads)])

    def _noise(self, shape, device, dtype, generator: Optional[torch.Generator]) -> torch.Tensor:
        u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
        if self.noise == "gumbel":
            g = -torch.log(-torch.log(u))
        else:
            g = torch.log(u) - torch.log1p(-u)
        return g.to(device=device, dtype=dtype)

    def forward(self, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """A training sample: ``(hard, soft)``; ``hard`` is 0/1 in value with the gradient of
        ``soft = sigmoid((z + g + b) / T)`` (straight-through)."""
        z = self.logits()
        g = self._noise(z.shape, z.device, z.dtype, generator)
        soft = torch.sigmoid((z + g + self.base) / self.temperature)
        hard = (soft >= 0.5).to(soft.dtype)
        return hard + (soft - soft.detach()), soft  # exactly 0/1 in value

    def noise_median(self) -> float:
        return _GUMBEL_MEDIAN if self.noise == "gumbel" else 0.0

    @torch.no_grad()
    def keep_scores(self) -> torch.Tensor:
        """``z + b + median(g)``: >= 0 where the deterministic mask keeps the channel."""
        return self.logits() + self.base + self.noise_median()

    @torch.no_grad()
    def deterministic_mask(self) -> torch.Tensor:
        """BoolTensor[C]: keep where the sampled keep-probability is at least 1/2 (no noise)."""
        return self.keep_scores() >= 0


def flops_regularizer(r: torch.Tensor, p: float, w: float = 4.0, margin: float = 0.005) -> torch.Tensor:
    """ATO's FLOPs term ``R``: ``w log(max(r, p + margin) / p)`` if ``r > p``, else
    ``w log(p / min(r, p - margin))``; flat (zero gradient) within ``margin`` of ``p``."""
    above = w * torch.log(torch.clamp(r, min=p + margin) / p)
    below = w * torch.log(p / torch.clamp(r, max=p - margin, min=1e-12))
    return torch.where(r > p, above, below)


def held_out_split(dataset, fraction: float = 0.05, seed: int = 0):
    """Split a training set into ``(train, held_out)`` subsets (``held_out``: ``fraction`` of
    it, at least one example), for the controller; the test set is never used."""
    from torch.utils.data import Subset

    n = len(dataset)
    k = max(1, int(round(fraction * n)))
    if k >= n:
        raise UnsupportedInputError(f"held-out fraction {fraction} leaves no training data ({n} examples)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(perm[k:])), Subset(dataset, sorted(perm[:k]))


def _to_device(x: Any, device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


class ATO:
    """Auto-Train-Once on a program's groups (see the module docstring).

    Args:
        prog: a ``fxprune.Program``; its module (and the user's model) is trained unmasked.
        target_flops_ratio: kept fraction of the full model's FLOPs, in (0, 1).
        total_steps: model optimizer steps of the whole run (the schedule's unit).
        loss_fn: ``loss_fn(outputs, targets)`` of the controller's task loss (default
            cross-entropy).
        controller_data: an iterable of ``(inputs, targets)`` batches from a held-out split of
            the training data (:func:`held_out_split`), cycled; needed by :meth:`step` when a
            controller step is due (or call :meth:`controller_step` yourself).
        controller_start, mask_freeze, proximal_start, lmbda_late_start: schedule fractions of
            ``total_steps`` (defaults :data:`PAPER_SCHEDULE`).
        controller_every: model steps per controller step (20).
        lmbda, lmbda_late: proximal coefficient before / after ``lmbda_late_start`` (10, 1000).
        controller_lr, controller_weight_decay: AdamW settings (1e-3, 1e-2).
        reg_weight, reg_coef, margin: ``w`` (4), the factor of ``R`` in the loss (2), and the
            flat margin (0.005) of :func:`flops_regularizer`.
        temperature, base, noise, embed_dim, hidden: controller settings (0.4, 3, "gumbel",
            64, 128).
        controller_eval_mode: run the gated model in eval mode during controller steps, as the
            reference does (norms use running statistics; default True).
        calibrate, calibrate_tol: calibrate the frozen mask when its FLOPs ratio misses the
            target by more than ``calibrate_tol`` (absolute, default 0.01).
        seed: controller initialisation and Gumbel noise.
        process_group: data-parallel training (``torch.distributed``): every rank holds the same
            controller (same ``seed``, same noise) and runs it on its own held-out batches; the
            controller's gradients are averaged over this group's ranks before each AdamW step,
            so the controllers stay equal. Default: the default group when
            ``torch.distributed`` is initialized with several ranks, else none.

    Attributes: ``gated`` (the gated GraphModule, shares the program's parameters),
    ``flops`` (the :class:`~fxprune.flops_model.FlopsModel`), ``controller``,
    ``controller_optimizer``, ``history`` (a dict of lists: controller step, task loss,
    ``r``, ``R``, FLOPs ratio of the sample and of the deterministic mask).
    """

    def __init__(self, prog, target_flops_ratio: float, *, total_steps: int,
                 loss_fn: Optional[Callable] = None, controller_data: Optional[Iterable] = None,
                 controller_start: float = PAPER_SCHEDULE["controller_start"],
                 mask_freeze: float = PAPER_SCHEDULE["mask_freeze"],
                 proximal_start: float = PAPER_SCHEDULE["proximal_start"],
                 lmbda_late_start: float = PAPER_SCHEDULE["lmbda_late_start"],
                 controller_every: int = 20, lmbda: float = 10.0, lmbda_late: float = 1000.0,
                 controller_lr: float = 1e-3, controller_weight_decay: float = 1e-2,
                 reg_weight: float = 4.0, reg_coef: float = 2.0, margin: float = 0.005,
                 temperature: float = 0.4, base: float = 3.0, noise: str = "gumbel",
                 embed_dim: int = 64, hidden: int = 128, controller_eval_mode: bool = True,
                 calibrate: bool = True, calibrate_tol: float = 0.01, seed: int = 0,
                 process_group: Any = None):
        from fxprune.optim._groups import ChannelLayout
        from fxprune.passes.gating import insert_gates

        from .flops_model import FlopsModel

        if not 0.0 < target_flops_ratio < 1.0:
            raise UnsupportedInputError(f"target_flops_ratio must be in (0, 1), got {target_flops_ratio}")
        if int(total_steps) < 1:
            raise UnsupportedInputError(f"total_steps must be >= 1, got {total_steps}")
        if not 0.0 <= controller_start <= mask_freeze <= 1.0:
            raise UnsupportedInputError("need 0 <= controller_start <= mask_freeze <= 1")
        if int(controller_every) < 1:
            raise UnsupportedInputError(f"controller_every must be >= 1, got {controller_every}")
        self.prog = prog
        self.target_flops_ratio = float(target_flops_ratio)
        self.total_steps = int(total_steps)
        self.loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        self.controller_data = controller_data
        self._data_iter = None
        self._batches_drawn = 0
        self.controller_every = int(controller_every)
        self.lmbda, self.lmbda_late = float(lmbda), float(lmbda_late)
        self.reg_weight, self.reg_coef, self.margin = float(reg_weight), float(reg_coef), float(margin)
        self.controller_eval_mode = bool(controller_eval_mode)
        self.calibrate, self.calibrate_tol = bool(calibrate), float(calibrate_tol)
        self.process_group = process_group

        T = self.total_steps
        self.controller_start_step = int(round(controller_start * T))
        self.mask_freeze_step = max(self.controller_start_step, int(round(mask_freeze * T)))
        self.proximal_start_step = int(round(proximal_start * T))
        self.lmbda_late_step = int(round(lmbda_late_start * T))

        if hasattr(prog, "check_construction"):
            prog.check_construction()  # groups whose removal cannot be built are frozen before training
        from .distributed import fsdp_root_ready, root_unsharded

        fsdp_root_ready(prog)  # FSDP2: the gated copy calls the sharded units, never the root
        with root_unsharded(prog.module):
            # a program gives its own (a region program gates and counts every region)
            self.gated = prog.gated_module() if hasattr(prog, "gated_module") else insert_gates(prog)
            self.flops = prog.flops_model() if hasattr(prog, "flops_model") else FlopsModel(prog)
        self._layout = ChannelLayout(prog.module, prog.groups)
        if self.flops.group_ids != self.gated.group_ids or [g.id for g in self._layout.groups] != self.gated.group_ids:
            raise FxPruneError("inconsistent channel orders between gates, FLOPs model and layout")
        C = self.gated.num_channels
        if C == 0:
            raise FxPruneError("the program has no prunable channels: nothing for ATO to prune")
        full, fixed = self.flops.full, self.flops.fixed
        if full - fixed <= 0:
            raise FxPruneError("no FLOPs depend on prunable channels: a FLOPs target cannot be met by pruning")
        self.p = (self.target_flops_ratio * full - fixed) / (full - fixed)
        if self.p <= 0.0:
            raise UnsupportedInputError(
                f"target_flops_ratio {target_flops_ratio} is below the FLOPs no pruning can remove "
                f"({fixed / full:.4f} of the model)")

        device = self._layout.device
        self.controller = ATOController(self.gated.group_sizes, embed_dim=embed_dim, hidden=hidden,
                                        temperature=temperature, base=base, noise=noise, seed=seed).to(device)
        decay = [p for p in self.controller.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.controller.parameters() if p.dim() < 2]
        self.controller_optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": controller_weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=controller_lr)
        self._noise_gen = torch.Generator().manual_seed(int(seed) + 1)
        self._group_of = self._layout.channel_group  # LongTensor[C]: index into the flat groups
        self._step = 0
        self._mask = torch.ones(C, dtype=torch.bool, device=device)
        self._refresh_mask()  # the controller's deterministic mask
        self._frozen: Optional[torch.Tensor] = None
        self._raw_frozen_ratio: Optional[float] = None
        self.history: Dict[str, List[float]] = {k: [] for k in (
            "step", "task_loss", "r", "R", "sample_ratio", "mask_ratio")}
        self.residual_norm: Optional[float] = None

    # ------------------------------------------------------------------ schedule
    @property
    def step_count(self) -> int:
        return self._step

    def phase(self, t: Optional[int] = None) -> str:
        """``"warmup"``, ``"controller"`` or ``"frozen"`` at model step ``t`` (default: now)."""
        t = self._step if t is None else t
        if t < self.controller_start_step:
            return "warmup"
        if t < self.mask_freeze_step:
            return "controller"
        return "frozen"

    def lmbda_at(self, t: Optional[int] = None) -> float:
        t = self._step if t is None else t
        return self.lmbda_late if t >= self.lmbda_late_step else self.lmbda

    @property
    def frozen(self) -> bool:
        return self._frozen is not None

    # ------------------------------------------------------------------ masks
    def _with_floor(self, keep: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Every group keeps at least its highest-scoring channel."""
        keep = keep.clone()
        for g, (off, size) in enumerate(zip(self.gated.group_offsets, self.gated.group_sizes)):
            if not bool(keep[off:off + size].any()):
                keep[off + int(torch.argmax(scores[off:off + size]))] = True
        return keep

    def current_mask(self) -> torch.Tensor:
        """BoolTensor[C] (flat order): the frozen mask, else the controller's deterministic
        mask (with at least one channel per group)."""
        if self._frozen is not None:
            return self._frozen
        return self._mask

    def masks(self) -> Dict[int, np.ndarray]:
        """Keep-masks ``{group id: bool array}`` of :meth:`current_mask`, for ``prog.zero_``."""
        keep = self.current_mask().cpu().numpy()
        return {gid: keep[off:off + size].copy() for gid, off, size in
                zip(self.gated.group_ids, self.gated.group_offsets, self.gated.group_sizes)}

    def flops_ratio(self, mask: Optional[torch.Tensor] = None) -> float:
        """FLOPs of the slim model of ``mask`` (default :meth:`current_mask`) over the full model's."""
        mask = self.current_mask() if mask is None else mask
        return self.flops.flops(self._to_groups(mask)) / self.flops.full

    def _to_groups(self, mask: torch.Tensor) -> Dict[int, np.ndarray]:
        keep = mask.detach().cpu().numpy().astype(bool)
        return {gid: keep[off:off + size] for gid, off, size in
                zip(self.gated.group_ids, self.gated.group_offsets, self.gated.group_sizes)}

    def _refresh_mask(self) -> None:
        scores = self.controller.keep_scores()
        self._mask = self._with_floor(scores >= 0, scores)

    def freeze(self) -> torch.Tensor:
        """Freeze the deterministic mask now (calibrated to the FLOPs target if enabled)."""
        if self._frozen is not None:
            return self._frozen
        scores = self.controller.keep_scores()
        mask = self._with_floor(scores >= 0, scores)
        ratio = self.flops_ratio(mask)
        self._raw_frozen_ratio = ratio
        if self.calibrate and abs(ratio - self.target_flops_ratio) > self.calibrate_tol:
            mask = self._calibrated(scores)
        self._frozen = mask
        return mask

    def _calibrated(self, scores: torch.Tensor) -> torch.Tensor:
        """Channels in decreasing score order (each group's best one always kept) until the
        FLOPs ratio is closest to the target."""
        floor = self._with_floor(torch.zeros_like(scores, dtype=torch.bool), scores)
        order = torch.argsort(scores, descending=True, stable=True)
        order = order[~floor[order]].cpu()
        fm = self.flops
        base = floor.cpu().numpy().astype(np.float64)

        def ratio_of(k: int) -> float:
            keep = base.copy()
            keep[order[:k].numpy()] = 1.0
            return fm._eval_np(keep) / fm.full

        lo, hi = 0, len(order)  # largest k with ratio <= target, by bisection (monotone in k)
        if ratio_of(0) > self.target_flops_ratio:
            k = 0
        else:
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if ratio_of(mid) <= self.target_flops_ratio:
                    lo = mid
                else:
                    hi = mid - 1
            k = lo
        keep_np = base.copy()
        keep_np[order[:k].numpy()] = 1.0
        cur = fm._eval_np(keep_np) / fm.full
        t = self.target_flops_ratio
        # fill: later channels (in score order) that bring the ratio closer to the target
        for c in order[k:].tolist():
            if abs(cur - t) < 1e-4:
                break
            keep_np[c] = 1.0
            new = fm._eval_np(keep_np) / fm.full
            if abs(new - t) < abs(cur - t):
                cur = new
            else:
                keep_np[c] = 0.0
        return torch.from_numpy(keep_np > 0).to(scores.device)

    # ------------------------------------------------------------------ training
    def _next_batch(self):
        if self.controller_data is None:
            raise FxPruneError("a controller step is due but ATO has no controller_data: pass an iterable "
                               "of held-out (inputs, targets) batches, or call controller_step yourself")
        if self._data_iter is None:
            self._data_iter = iter(self.controller_data)
            skip = self._batches_drawn % len(self.controller_data) if hasattr(self.controller_data, "__len__") \
                and len(self.controller_data) else 0
            for _ in range(skip):  # resume where the stream stood
                next(self._data_iter)
        self._batches_drawn += 1
        try:
            return next(self._data_iter)
        except StopIteration:
            self._data_iter = iter(self.controller_data)
            try:
                return next(self._data_iter)
            except StopIteration:
                raise FxPruneError("controller_data yields no batches")

    def controller_due(self, t: Optional[int] = None) -> bool:
        """Whether model step ``t`` (default: now) ends with a controller step."""
        t = self._step if t is None else t
        return (self.phase(t) == "controller"
                and (t - self.controller_start_step + 1) % self.controller_every == 0)

    def controller_step(self, inputs: Any, targets: Any) -> Dict[str, float]:
        """One controller update on a held-out batch: sample a hard mask, run the gated model
        (eval mode by default), loss = task loss + ``reg_coef * R``, AdamW step. Gradients go to
        the controller only; the model's ``.grad`` are left alone."""
        device = self._layout.device
        inputs = _to_device(inputs, device)
        targets = _to_device(targets, device)
        if not isinstance(inputs, (tuple, list)):
            inputs = (inputs,)
        ctrl = self.controller
        ctrl.train()
        hard, _ = ctrl(self._noise_gen)
        from .distributed import root_unsharded

        gm = self.gated
        modes = [(m, m.training) for m in gm.modules()]  # shared with the user's model
        if self.controller_eval_mode:
            gm.eval()
        params = [p for p in ctrl.parameters() if p.requires_grad]
        # FSDP2: the root unit's parameters gathered through the forward and the backward
        with root_unsharded(self.prog.module):
            try:
                with gm.gated(hard):
                    out = gm(*inputs)
                task = self.loss_fn(out, targets)
            finally:
                for m, mode in modes:
                    m.training = mode
            flops = self.flops(hard)
            r = (flops - self.flops.fixed) / (self.flops.full - self.flops.fixed)
            R = flops_regularizer(r, self.p, self.reg_weight, self.margin)
            loss = task + self.reg_coef * R
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = self._average(params, grads)
        for p, g in zip(params, grads):
            p.grad = g
        self.controller_optimizer.step()
        self.controller_optimizer.zero_grad(set_to_none=True)
        self._refresh_mask()
        rec = {"step": float(self._step), "task_loss": float(task.detach()), "r": float(r.detach()),
               "R": float(R.detach()), "sample_ratio": float(flops.detach()) / self.flops.full,
               "mask_ratio": self.flops_ratio(self._mask)}
        for k, v in rec.items():
            self.history[k].append(v)
        return rec

    def _average(self, params: List[torch.Tensor], grads: Sequence[Optional[torch.Tensor]]) -> list:
        """The controller's gradients averaged over the data-parallel ranks (one all-reduce of
        their concatenation); as they are without ``torch.distributed``."""
        import torch.distributed as dist

        group = self.process_group
        if group is None:
            if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
                return list(grads)
            group = dist.group.WORLD
        world = dist.get_world_size(group)
        full = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        flat = torch.cat([g.reshape(-1) for g in full])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat /= world
        out = []
        for g in full:
            out.append(flat[:g.numel()].view_as(g))
            flat = flat[g.numel():]
        return out

    @torch.no_grad()
    def proximal_step(self, lr: float, lmbda: Optional[float] = None) -> None:
        """Group-lasso proximal step on the switched-off channels of :meth:`current_mask`:
        ``x_g <- x_g / ||x_g|| * max(0, ||x_g|| - lambda * ratio_l * lr)``."""
        lmbda = self.lmbda_at() if lmbda is None else float(lmbda)
        L = self._layout
        off = ~self.current_mask().to(L.device)
        n_off = int(off.sum())
        if n_off == 0 or lr <= 0 or lmbda <= 0:
            return
        per_group = torch.zeros(len(L.groups), dtype=torch.float64, device=L.device)
        per_group.index_add_(0, self._group_of, off.to(torch.float64))
        ratio = (per_group / n_off)[self._group_of]
        has = L.entry_any(L.to_rows(off, False))
        norms = self._channel_norms(has)
        shrink = lmbda * ratio * float(lr)
        scale = torch.where(off, (norms - shrink).clamp_min(0.0) / norms.clamp_min(1e-30),
                            torch.ones_like(norms))
        L.scale_rows_(L.to_rows(scale, 1.0), has)

    def _channel_norms(self, entries: Optional[List[bool]] = None) -> torch.Tensor:
        """``||x_g||`` of every channel (only the rows of ``entries`` flagged True are read;
        channels with rows elsewhere then get partial norms, so callers flag every entry that
        holds a channel they use). With sharded parameters, a collective."""
        L = self._layout
        return L.channel_sum(L.row_sq_norms(torch.float64, entries)).sqrt()

    def step(self, optimizer: Optional[torch.optim.Optimizer] = None, *, lr: Optional[float] = None) -> None:
        """Call once after every model optimizer step: a controller step when one is due
        (a batch from ``controller_data``), the proximal step in the proximal phase (``lr``:
        the model's current learning rate, default ``optimizer.param_groups[0]["lr"]``), and
        the mask freeze at ``mask_freeze``."""
        t = self._step
        if self.controller_due(t):
            batch = self._next_batch()
            self.controller_step(batch[0], batch[1])
        if t + 1 >= self.mask_freeze_step and self._frozen is None:
            self.freeze()
        if t >= self.proximal_start_step:
            if lr is None:
                if optimizer is None:
                    raise UnsupportedInputError("ATO.step needs the model's optimizer or its learning rate")
                lr = float(optimizer.param_groups[0]["lr"])
            self.proximal_step(lr)
        self._step = t + 1

    # ------------------------------------------------------------------ the end
    @torch.no_grad()
    def finalize(self, verify: bool = True, rtol: float = 1e-4, template: Any = None):
        """Hard-zero the switched-off channels of the frozen mask (``prog.zero_``) and build
        the slim model (``prog.construct_subnet``, verified). Freezes first if needed. Records
        ``residual_norm``: the norm the switched-off channels still had before the hard zero.

        With FSDP2-sharded parameters (a collective: every rank calls it), each rank zeroes the
        channels in its blocks and the slim model is built on rank 0 from the gathered state
        (:func:`fxprune.distributed.construct_subnet`; ``template``: the
        :func:`~fxprune.distributed.program_template` made before sharding); other ranks get
        None."""
        mask = self.freeze()
        L = self._layout
        off = ~mask.to(L.device)
        norms = self._channel_norms()
        self.residual_norm = float(norms[off].square().sum().sqrt()) if bool(off.any()) else 0.0
        if L.sharding is None:
            self.prog.zero_(self.masks())
            return self.prog.construct_subnet(verify=verify, rtol=rtol)
        if template is None:
            raise UnsupportedInputError("ATO.finalize on sharded parameters needs template=: "
                                        "fxprune.distributed.program_template(prog), made before fully_shard")
        from .distributed import construct_subnet

        with torch.no_grad():
            L.scale_rows_(L.to_rows(mask.to(L.device, torch.float64), 1.0), L.entry_any(L.to_rows(off, False)))
        return construct_subnet(self.prog, template, verify=verify, rtol=rtol)

    def summary(self) -> Dict[str, Any]:
        """Target, FLOPs ratios (controller's raw frozen mask, final mask), kept channels,
        controller steps, and the residual norm before the hard zero."""
        mask = self.current_mask()
        return {
            "target_flops_ratio": self.target_flops_ratio,
            "prunable_target_p": self.p,
            "raw_mask_flops_ratio": self._raw_frozen_ratio,
            "flops_ratio": self.flops_ratio(mask),
            "kept_channels": int(mask.sum()),
            "prunable_channels": int(mask.numel()),
            "controller_steps": len(self.history["step"]),
            "frozen": self.frozen,
            "residual_norm_before_zero": self.residual_norm,
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Step, controller and its optimizer, noise generator, masks, history, and how many
        held-out batches were drawn (a resumed run skips that many, modulo the length of
        ``controller_data``, so an unshuffled stream continues where it stood)."""
        return {
            "step": self._step,
            "controller": self.controller.state_dict(),
            "controller_optimizer": self.controller_optimizer.state_dict(),
            "noise_generator": self._noise_gen.get_state(),
            "mask": self._mask.cpu().clone(),
            "frozen": None if self._frozen is None else self._frozen.cpu().clone(),
            "raw_frozen_ratio": self._raw_frozen_ratio,
            "history": {k: list(v) for k, v in self.history.items()},
            "batches_drawn": self._batches_drawn,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        dev = self._layout.device
        self._step = int(state["step"])
        self.controller.load_state_dict(state["controller"])
        self.controller_optimizer.load_state_dict(state["controller_optimizer"])
        self._noise_gen.set_state(state["noise_generator"])
        self._mask = state["mask"].to(dev, torch.bool)
        self._frozen = None if state["frozen"] is None else state["frozen"].to(dev, torch.bool)
        self._raw_frozen_ratio = state.get("raw_frozen_ratio")
        self.history = {k: list(v) for k, v in state["history"].items()}
        self._batches_drawn = int(state.get("batches_drawn", 0))
        self._data_iter = None

    def __repr__(self) -> str:
        return (f"ATO(target_flops_ratio={self.target_flops_ratio}, step={self._step}/{self.total_steps}, "
                f"phase={self.phase()}, channels={self.gated.num_channels})")
