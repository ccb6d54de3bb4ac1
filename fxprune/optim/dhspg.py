"""DHSPG: the Dual Half-Space Projected Gradient optimizer of OTOv2.

Reference: T. Chen, L. Liang, T. Ding, Z. Zhu, I. Zharkov. "OTOv2: Automatic, Generic,
User-Friendly". ICLR 2023, Sec. 4 and Algorithm 2; the half-space projection comes from HSPG
(T. Chen et al., "A Half-Space Stochastic Projected Gradient Method for Group Sparsity
Regularization", 2020). Notation: ``x_g`` the flattened
variables of one zero-invariant group (here: one channel of one prunable group), ``n_g``
their count, ``d_g`` the base optimizer's update direction, ``alpha`` the learning rate.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from . import _fused
from ._groups import ChannelLayout, acc_dtype, redundancy_saliency, row_dot, row_norm

__all__ = ["DHSPG"]

_VARIANTS = ("sgd", "adam", "adamw")
# Reference defaults of the OTOv2 code per variant: (lmbda, lmbda_amplify, hat_lmbda_coeff).
_REFERENCE_DEFAULTS = {"sgd": (1e-3, 2.0, 10.0), "adam": (1e-2, 20.0, 1e3), "adamw": (1e-2, 20.0, 1e3)}
_TINY = 1e-30


def _split_like(flat: torch.Tensor, parts: List[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """``flat`` (a concatenation of ``parts``) cut back into pieces of their sizes (views)."""
    return torch.split(flat, [t.numel() for t in parts])


class DHSPG(torch.optim.Optimizer):
    r"""Dual Half-Space Projected Gradient (OTOv2, Chen et al., ICLR 2023, Sec. 4, Alg. 2).

    Trains every parameter of ``prog.module`` with a base update (SGD with momentum, Adam or
    AdamW) and drives a chosen set of channels of the program's prunable groups to exactly
    zero, so that ``prog.construct_subnet()`` can remove them.

    **Variables.** Each channel ``c`` of each prunable group is one zero-invariant group
    (ZIG); its variables ``x_g`` are the positions of ``c`` in every producer slice
    (``Group.slices``) of the group, ``n_g`` scalars in all. Sparsity is counted in channels:
    with ``C`` prunable channels the target is ``K = floor(target_group_sparsity * C)`` zero
    channels. Parameters outside every prunable group take the plain base step.

    **Update direction** ``d`` (per parameter, shape of the parameter):

    * ``"sgd"``: ``buf = momentum * buf + (grad + weight_decay * x)``; ``d = buf``
      (``d = grad + momentum * buf`` with ``nesterov=True``; ``d = grad + wd x`` with
      ``momentum=0``). The first step sets ``buf = grad + wd x``, as ``torch.optim.SGD``.
    * ``"adam"``: Adam on ``grad + weight_decay * x`` (L2 penalty);
      ``d = m_hat / (sqrt(v_hat) + eps)``.
    * ``"adamw"``: Adam on ``grad`` with decoupled decay; ``d = m_hat / (sqrt(v_hat) + eps)
      + weight_decay * x`` so that ``x - lr * d`` is exactly AdamW's step.

    **Phases** (steps counted from 0, one per :meth:`step` call):

    1. ``step < start_pruning_step``: every parameter takes ``x <- x - lr * d``.
    2. At the first step ``>= start_pruning_step`` the channels are partitioned by the
       redundancy saliency of OTOv2 (Sec. 4)
       ``s_g = 0.5 N(cos(x_g, d_g)) + 0.5 N(1 / (||x_g|| / n_g + 1e-6))``, ``N`` the division
       by the L2 norm over all channels. ``K`` channels form the redundant set ``G_r``; the
       others are important (``G_i``). Which ``K``, by ``partition``:

       * ``"global"`` (OTOv2's ranking): the ``K`` channels of highest ``s_g`` over the whole
         model, except the channel of lowest saliency of each group.
       * ``"uniform"`` (default, fxprune's choice): every group gives up the same fraction
         ``r = target_group_sparsity`` of its channels, ``floor(r z_g)`` of its ``z_g``, plus
         one each for the groups with the largest remainders ``r z_g - floor(r z_g)`` until
         the total is ``K``; inside a group the channels of highest ``s_g`` are taken. The
         global ranking compares magnitudes averaged over very different fan-ins and can
         strip a whole stage: on the digits/ResNet-18 task at ``r = 0.5`` it left the
         512-channel residual stream of ``layer4`` one channel wide (test accuracy 31.7%
         after 6 epochs), where the uniform partition keeps every group half wide.

       Either way every group keeps at least one channel (``K`` is capped at ``C`` minus the
       number of groups, with a warning).
    3. Pruning steps ``start_pruning_step <= step < start_pruning_step + pruning_steps``:
       important channels take the plain step; each redundant channel not yet zero takes the
       trial step ``x~_g = x_g - lr d_g - lr lambda_g x_g / ||x_g||`` with the adaptive
       ``lambda_g`` of OTOv2: ``lambda_g = lmbda`` unless ``<x_g, d_g> < 0``; then with
       ``lambda_lo = -<x_g, d_g> / ||x_g||`` and ``lambda_hi = -||d_g||^2 ||x_g|| / <x_g, d_g>``,
       ``lambda_g = clip(lmbda_amplify * lambda_lo, lmbda, hat_lmbda_coeff * lmbda)``, replaced
       by ``(lambda_lo + lambda_hi) / 2`` when it reaches ``lambda_hi``. Then the half-space
       projection: ``x_g <- 0`` if ``<x~_g, x_g> < epsilon ||x_g||^2``, else ``x_g <- x~_g``.
    4. Afterwards every nonzero channel takes the plain step.

    A projected channel stays zero for good: after every step its entries, and the entries of
    its optimizer state (momentum buffer, Adam moments), are set to exactly 0.

    **Exact target (fxprune's design).** Only redundant channels can ever be projected, and
    there are exactly ``K`` of them, so the zero count never exceeds ``K``. To reach ``K``
    by the end of the pruning phase, each pruning step ``k = step - start_pruning_step``
    (``0 <= k < pruning_steps``) has a quota ``q_k``: with ``projection_schedule="linear"``
    (default) ``q_k = floor(K (k + 1) / pruning_steps)``, with ``"final"`` ``q_k = 0`` before
    the last pruning step and ``K`` on it. When the half-space projection leaves fewer than
    ``q_k`` channels zero, the missing ones are projected too, taken among the remaining
    redundant channels in increasing order of ``<x~_g, x_g> / ||x_g||^2`` (those closest to
    the projection half-space first). So after step ``start_pruning_step + pruning_steps - 1``
    exactly ``K`` channels are zero. (The reference implementation leaves the count to the
    projection alone and misses or overshoots the target.)

    Several learning rates: with parameter groups of different ``lr``, a channel spanning them
    takes, per scalar, the step ``lr_e (d_e + lambda_g x_e / ||x_g||)`` and the projection
    test uses that trial point; with one learning rate this is exactly the formula above.
    A parameter without gradient in a step (or outside ``params``) takes no step; its entries
    still count in ``||x_g||`` and are zeroed when their channel is projected.

    Args:
        prog: an ``fxprune.Program`` (anything with ``.module`` and ``.groups``).
        lr: learning rate ``alpha`` (required).
        variant: ``"sgd"`` (default), ``"adam"`` or ``"adamw"``.
        momentum: SGD momentum, default 0.9. ``nesterov``: Nesterov momentum, default False.
        betas, eps: Adam coefficients, default ``(0.9, 0.999)`` and ``1e-8``.
        weight_decay: L2 (sgd, adam) or decoupled (adamw) decay, default 0.
        target_group_sparsity: fraction of prunable channels to zero, in ``[0, 1)``,
            default 0.5.
        start_pruning_step: step at which the partition is made, default 0.
        pruning_steps: length of the pruning phase in steps (``>= 1``), default 1000; the
            target is met at its end.
        epsilon: half-space control ``epsilon`` in ``[0, 1)``, default 0.0 (the reference
            tutorials use 0.9-0.95 for faster projection).
        lmbda: base group-lasso coefficient; default 1e-3 (sgd), 1e-2 (adam, adamw).
        lmbda_amplify: ``a`` above; default 2 (sgd), 20 (adam, adamw).
        hat_lmbda_coeff: ``c_hat`` above; default 10 (sgd), 1e3 (adam, adamw).
        projection_schedule: ``"linear"`` (default) or ``"final"``, the quota above.
        partition: ``"uniform"`` (default) or ``"global"``, the scope of the partition
            above.
        params: optional iterable of parameters or parameter-group dicts, as for any
            ``torch.optim.Optimizer``; default every trainable parameter of ``prog.module``.
        fused: take the pruning-phase row reductions and update of contiguous float32/64 CPU
            parameters in two fused C++ kernels (:mod:`fxprune.optim._fused`, built with the
            machine's C++ compiler on construction, about half a minute the first time, then
            cached); default False. Same values up to rounding. Raises
            :class:`fxprune.UnsupportedInputError` when the kernels cannot be built.

    Units: ``lr``, ``weight_decay``, ``lmbda`` are per step and unitless, as in
    ``torch.optim``; steps are optimizer steps (not epochs).

    Attributes: ``param_groups`` are ordinary ``torch.optim`` groups (by default one group of
    every trainable parameter of ``prog.module``, with torch's ``param_names``);
    ``prunable_groups`` the program's prunable groups in channel order; ``target_channels``
    ``K``; ``redundant`` / ``projected`` ``BoolTensor[C]`` over the flat channel space (the
    channels of ``prunable_groups`` one after the other); :meth:`masks` the keep-masks per
    group id; :meth:`metrics` a report. :meth:`state_dict` holds everything a resumed run
    needs to continue bit for bit (step counter, partition, projected set, optimizer state;
    the checkpoint's DHSPG settings win over the constructor's on load).

    Cost: outside the pruning phase a step costs what the base optimizer's step costs. A
    pruning-phase step adds, per parameter holding redundant channels, three row reductions
    (``||x||``, ``<x, d>``, ``||d||`` over every dim but the channel dim; the inner product
    as one batched matmul, so four reads of parameter memory in all, taken right after the
    parameter's direction) and one row scaling (one more pass); the channel math itself is
    a few vector ops over ``[C]`` (see ``benchmarks/optimizer_step.py``).

    Example::

        prog = fxprune.compile(model, example_inputs)
        opt = DHSPG(prog, lr=0.1, target_group_sparsity=0.5, start_pruning_step=1000,
                    pruning_steps=5000)
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        slim = prog.construct_subnet()
    """

    def __init__(
        self,
        prog: Any,
        lr: float,
        *,
        variant: str = "sgd",
        momentum: float = 0.9,
        nesterov: bool = False,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        target_group_sparsity: float = 0.5,
        start_pruning_step: int = 0,
        pruning_steps: int = 1000,
        epsilon: float = 0.0,
        lmbda: Optional[float] = None,
        lmbda_amplify: Optional[float] = None,
        hat_lmbda_coeff: Optional[float] = None,
        projection_schedule: str = "linear",
        partition: str = "uniform",
        params: Optional[Iterable] = None,
        fused: bool = False,
    ) -> None:
        if variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not 0.0 <= target_group_sparsity < 1.0:
            raise ValueError(f"target_group_sparsity must be in [0, 1), got {target_group_sparsity}")
        if int(pruning_steps) < 1:
            raise ValueError(f"pruning_steps must be >= 1, got {pruning_steps}")
        if int(start_pruning_step) < 0:
            raise ValueError(f"start_pruning_step must be >= 0, got {start_pruning_step}")
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
        if projection_schedule not in ("linear", "final"):
            raise ValueError(f"projection_schedule must be 'linear' or 'final', got {projection_schedule!r}")
        if partition not in ("uniform", "global"):
            raise ValueError(f"partition must be 'uniform' or 'global', got {partition!r}")
        if variant == "sgd":
            if momentum < 0.0:
                raise ValueError(f"invalid momentum {momentum}")
            if nesterov and momentum <= 0.0:
                raise ValueError("nesterov momentum requires momentum > 0")
            defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        else:
            if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
                raise ValueError(f"invalid betas {betas}")
            defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

        ref = _REFERENCE_DEFAULTS[variant]
        self.variant = variant
        self.lmbda = float(ref[0] if lmbda is None else lmbda)
        self.lmbda_amplify = float(ref[1] if lmbda_amplify is None else lmbda_amplify)
        self.hat_lmbda_coeff = float(ref[2] if hat_lmbda_coeff is None else hat_lmbda_coeff)
        self.epsilon = float(epsilon)
        self.target_group_sparsity = float(target_group_sparsity)
        self.start_pruning_step = int(start_pruning_step)
        self.pruning_steps = int(pruning_steps)
        self.projection_schedule = projection_schedule
        self.partition = partition
        self.program = prog
        self.fused = bool(fused)
        if self.fused:
            _fused.kernels()  # build now: a missing compiler fails here, not mid-training

        module = prog.module
        if params is None:
            # Named, so that param_groups carry "param_names" (torch.optim's own field).
            params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        super().__init__(params, defaults)

        layout = ChannelLayout(module, prog.groups)
        self._layout = layout
        C = layout.num_channels
        dev = layout.device
        self._acc = torch.float64 if any(e.param.dtype == torch.float64 for e in layout.entries) \
            else torch.float32

        zeroable = layout.channel_numel > 0
        groups_with = torch.zeros(len(layout.groups), dtype=torch.long, device=dev)
        groups_with.index_add_(0, layout.channel_group, zeroable.long())
        cap = int(zeroable.sum()) - int((groups_with > 0).sum())
        k = int(math.floor(self.target_group_sparsity * C + 1e-9))
        if k > cap:
            warnings.warn(f"DHSPG: target of {k} zero channels capped at {cap} so that every "
                          f"group keeps at least one channel", stacklevel=2)
            k = max(cap, 0)
        self.target_channels = k
        self._zeroable = zeroable
        self._dh: Dict[str, Any] = {
            "step": 0,
            "partitioned": False,
            "redundant": torch.zeros(C, dtype=torch.bool, device=dev),
            "projected": torch.zeros(C, dtype=torch.bool, device=dev),
        }
        self._zero_rows_cache: Optional[List[Tuple[torch.Tensor, int, torch.Tensor]]] = None
        self._coef_key: Optional[tuple] = None
        self._coef: Tuple[torch.Tensor, ...] = ()
        self._scratch: Optional[torch.Tensor] = None  # row_dot products (half precision only)
        self._zero_rows = torch.zeros(max(layout.entry_sizes, default=0), dtype=self._acc,
                                      device=dev)
        #: id(parameter) -> indices of its entries in ``layout.entries``
        self._param_entries: Dict[int, List[int]] = {}
        for i, e in enumerate(layout.entries):
            self._param_entries.setdefault(id(e.param), []).append(i)

    # ------------------------------------------------------------------ properties
    @property
    def prunable_groups(self) -> list:
        """The program's prunable groups, in the order of the flat channel space."""
        return list(self._layout.groups)

    @property
    def num_channels(self) -> int:
        """``C``: prunable channels of the program."""
        return self._layout.num_channels

    @property
    def step_count(self) -> int:
        """Number of :meth:`step` calls made so far."""
        return int(self._dh["step"])

    @property
    def redundant(self) -> torch.Tensor:
        """``BoolTensor[C]``: the redundant set ``G_r`` (all False before the partition)."""
        return self._dh["redundant"]

    @property
    def projected(self) -> torch.Tensor:
        """``BoolTensor[C]``: channels projected to zero (a subset of ``redundant``)."""
        return self._dh["projected"]

    def masks(self) -> Dict[int, torch.Tensor]:
        """Keep-masks of the projected channels: ``{group id: BoolTensor[size]}`` (True = keep),
        in the format of ``Program.zero_``."""
        keep = ~self._dh["projected"]
        out = {}
        for g, off in zip(self._layout.groups, self._layout.group_offsets):
            out[g.id] = keep[off:off + int(g.size)].clone()
        return out

    # ------------------------------------------------------------------ the step
    def _phase_active(self, t: int) -> bool:
        return (self.target_channels > 0
                and self.start_pruning_step <= t < self.start_pruning_step + self.pruning_steps)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Take one optimization step (see the class docstring); returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        dh = self._dh
        L = self._layout
        t = int(dh["step"])
        pruning = self._phase_active(t)
        need_entry: List[bool] = [False] * len(L.entries)
        if pruning:
            if not dh["partitioned"]:
                need_entry = [True] * len(L.entries)
            else:
                active = dh["redundant"] & ~dh["projected"]
                if bool(active.any()):
                    need_entry = L.entry_any(L.to_rows(active, False))
                else:
                    pruning = False
        need_param = set()
        for i, flag in enumerate(need_entry):
            if flag:
                need_param.add(id(L.entries[i].param))

        # 1. base directions; parameters without channel work are updated right away.
        #    A kept direction is (p, d_raw, a, b, lr) with d = a * d_raw + b * x. The row
        #    reductions of a kept parameter follow its direction at once, while the freshly
        #    written direction (and the parameter, for small ones) is still in cache.
        directions: Dict[int, Tuple[torch.Tensor, torch.Tensor, float, float, float]] = {}
        row_stats: List[Optional[Tuple[torch.Tensor, ...]]] = [None] * len(L.entries)
        for group in self.param_groups:
            batched = []  # fused: 1-d parameters whose momentum step is one _foreach call
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("DHSPG does not support sparse gradients")
                keep_d = id(p) in need_param
                if keep_d and self.fused:
                    if p.dim() == 1 and self._momentum_buffer(p, group) is not None:
                        batched.append(p)
                        continue
                    out = self._fused_direction(p, group, need_entry, row_stats)
                else:
                    out = None
                if out is None:
                    out = self._direction(p, group, keep_d)
                    if keep_d:
                        self._matrix_row_stats(p, out[0], need_entry, row_stats)
                if keep_d:
                    directions[id(p)] = (p,) + out + (group["lr"],)
            for p, buf in zip(batched, self._foreach_momentum(batched, group)):
                directions[id(p)] = (p, buf, 1.0, 0.0, group["lr"])

        # 2. channel math of the pruning phase: per-row scales of the kept parameters.
        scales: Dict[int, List[Tuple[int, torch.Tensor]]] = {}
        if pruning:
            scales = self._pruning_math(t, need_entry, directions, row_stats)

        # 3. updates that waited for the channel math: x <- s * x - lr * d.
        self._update(directions, scales)

        # 4. projected channels stay exactly zero, in the parameters and their state.
        self._enforce_zeros()
        dh["step"] = t + 1
        return loss

    def _direction(self, p: torch.Tensor, group: Dict[str, Any], keep_d: bool):
        """Update the state of ``p`` and its base direction ``d = a * d_raw + b * x``.

        With ``keep_d`` returns ``(d_raw, a, b)`` (scalars ``a``, ``b``) and leaves ``p``
        alone; otherwise applies ``x <- x - lr * d`` now and returns None.
        """
        grad = p.grad
        wd = group["weight_decay"]
        lr = group["lr"]
        state = self.state[p]
        if self.variant == "sgd":
            mom = group["momentum"]
            if mom == 0.0:
                if keep_d:
                    return grad, 1.0, wd
                if wd != 0.0:
                    p.add_(grad.add(p, alpha=wd), alpha=-lr)
                else:
                    p.add_(grad, alpha=-lr)
                return None
            g = grad.add(p, alpha=wd) if wd != 0.0 else grad
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = torch.clone(g).detach() if g is grad else g
                state["momentum_buffer"] = buf
            else:
                torch.add(g, buf, alpha=mom, out=buf)
            d = g.add(buf, alpha=mom) if group["nesterov"] else buf
            if not keep_d:
                p.add_(d, alpha=-lr)
                return None
            return d, 1.0, 0.0

        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if self.variant == "adam" and wd != 0.0:
            grad = grad.add(p, alpha=wd)
        state["step"] = int(state["step"]) + 1
        n = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(grad, 1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        bc1 = 1.0 - beta1 ** n
        bc2_sqrt = math.sqrt(1.0 - beta2 ** n)
        denom = v.sqrt().div_(bc2_sqrt).add_(group["eps"])
        decoupled = self.variant == "adamw" and wd != 0.0
        if not keep_d:
            if decoupled:
                p.mul_(1.0 - lr * wd)
            p.addcdiv_(m, denom, value=-lr / bc1)
            return None
        d_raw = torch.div(m, denom, out=denom)
        return d_raw, 1.0 / bc1, (wd if decoupled else 0.0)

    def _update(self, directions, scales: Dict[int, List[Tuple[int, torch.Tensor]]]) -> None:
        """``x <- s * x - lr * a * d_raw`` for every kept direction (``s`` the per-row scales of
        the channel math, or ``1 - lr * b``). With ``fused`` the matrices take the fused kernel
        and the 1-d parameters a few ``_foreach`` calls, grouped by coefficient."""
        vectors: Dict[float, Tuple[list, list, list]] = {}
        for pid, (p, d_raw, a, b, lr) in directions.items():
            rows = scales.get(pid)
            if self.fused:
                if p.dim() == 1 and b == 0.0 and len(rows or ()) <= 1:
                    ps, ds, ss = vectors.setdefault(lr * a, ([], [], []))
                    ps.append(p)
                    ds.append(d_raw)
                    ss.append(rows[0][1] if rows else None)
                    continue
                if rows and len(rows) == 1 and _fused.scale_sub_(p, d_raw, rows[0][1], lr * a, rows[0][0]):
                    continue
            if rows:
                for _, s in rows:
                    p.mul_(s)
            elif b != 0.0:
                p.mul_(1.0 - lr * b)
            p.add_(d_raw, alpha=-lr * a)
        for c, (ps, ds, ss) in vectors.items():
            scaled = [(p, s) for p, s in zip(ps, ss) if s is not None]
            if scaled:
                torch._foreach_mul_([p for p, _ in scaled], [s for _, s in scaled])
            torch._foreach_add_(ps, ds, alpha=-c)

    def _momentum_buffer(self, p: torch.Tensor, group: Dict[str, Any]) -> Optional[torch.Tensor]:
        """The SGD momentum buffer of ``p`` when its next step is a plain momentum step (not the
        first, not Nesterov), else None."""
        if self.variant != "sgd" or group["nesterov"] or group["momentum"] == 0.0:
            return None
        return self.state[p].get("momentum_buffer")

    def _foreach_momentum(self, ps: List[torch.Tensor], group: Dict[str, Any]) -> List[torch.Tensor]:
        """``buf <- grad + weight_decay * x + momentum * buf`` of several parameters at once;
        returns their buffers (the directions)."""
        if not ps:
            return []
        grads = [p.grad for p in ps]
        if group["weight_decay"] != 0.0:
            grads = torch._foreach_add(grads, ps, alpha=group["weight_decay"])
        bufs = [self.state[p]["momentum_buffer"] for p in ps]
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, grads)
        return bufs

    def _fused_direction(self, p: torch.Tensor, group: Dict[str, Any], need_entry: List[bool],
                         out: List[Optional[Tuple[torch.Tensor, ...]]]):
        """:meth:`_direction` and :meth:`_matrix_row_stats` in one pass over memory (SGD with
        momentum whose needed entries are all rows of dim 0, see :mod:`._fused`): returns
        ``(d_raw, a, b)`` with the rows stored in ``out``, or None (nothing done)."""
        buf = self._momentum_buffer(p, group)
        if buf is None:
            return None
        needed = [i for i in self._param_entries.get(id(p), ()) if need_entry[i]]
        L = self._layout
        if not needed or any(L.entries[i].vector or L.entries[i].dim != 0 for i in needed):
            return None
        stats = _fused.momentum_row_stats(p.detach(), p.grad, buf, group["momentum"], group["weight_decay"],
                                          p.shape[0])
        if stats is None:
            return None
        for i in needed:
            out[i] = stats
        return buf, 1.0, 0.0

    def _scratch_for(self, x: torch.Tensor) -> torch.Tensor:
        """A buffer for ``x * d`` reused across steps (grown to the largest parameter)."""
        s = self._scratch
        if s is None or s.dtype != x.dtype or s.device != x.device or s.numel() < x.numel():
            s = torch.empty(max(x.numel(), 0 if s is None else s.numel()), dtype=x.dtype,
                            device=x.device)
            self._scratch = s
        return s

    def _coef_rows(self, directions) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row ``a``, ``b`` (``d = a d_raw + b x``) and step size ``lr`` (0 where not
        stepped), each ``Tensor[R]``."""
        L = self._layout
        a_l, b_l, lr_l = [], [], []
        for e in L.entries:
            kept = directions.get(id(e.param))
            if kept is None:
                a_l.append(0.0); b_l.append(0.0); lr_l.append(0.0)
            else:
                a_l.append(float(kept[2])); b_l.append(float(kept[3])); lr_l.append(float(kept[4]))
        key = (tuple(a_l), tuple(b_l), tuple(lr_l))
        if key != self._coef_key:
            vals = torch.tensor([a_l, b_l, lr_l], dtype=self._acc, device=L.device)
            self._coef = torch.repeat_interleave(vals, L.entry_sizes_t, dim=1).unbind(0)
            self._coef_key = key
        return self._coef

    def _matrix_row_stats(self, p: torch.Tensor, d_raw: torch.Tensor, need_entry: List[bool],
                          out: List[Optional[Tuple[torch.Tensor, ...]]]) -> None:
        """Per-row ``(||x||, <x, d_raw>, ||d_raw||)`` of the needed matrix entries of ``p``,
        stored at their entry index in ``out``. Vector entries (one scalar per row) are left
        to :meth:`_row_norms`, which does them all in three ``_foreach`` calls."""
        L = self._layout
        x = p.detach()
        for i in self._param_entries.get(id(p), ()):
            e = L.entries[i]
            if need_entry[i] and not e.vector:
                if self.fused:
                    out[i] = _fused.row_stats(x, d_raw, e.dim, e.size)
                    if out[i] is not None:
                        continue
                # row_dot writes products only for half precision (see its docstring)
                scratch = None if x.dtype == acc_dtype(x) else self._scratch_for(x)
                out[i] = (row_norm(x, e.dim, e.size),
                          row_dot(x, d_raw, e.dim, e.size, scratch),
                          row_norm(d_raw, e.dim, e.size))

    def _row_norms(self, need_entry: List[bool], directions,
                   row_stats: List[Optional[Tuple[torch.Tensor, ...]]]) -> Tuple[torch.Tensor, ...]:
        """Flat per-row ``||x||``, ``<x, d_raw>``, ``||d_raw||`` (``Tensor[R]`` each; zeros
        for the entries not needed and for parameters without a kept direction).
        ``row_stats``: the matrix entries' rows from :meth:`_matrix_row_stats`."""
        L = self._layout
        acc = self._acc
        E = len(L.entries)
        nx: List[Optional[torch.Tensor]] = [None] * E
        xd: List[Optional[torch.Tensor]] = [None] * E
        nd: List[Optional[torch.Tensor]] = [None] * E
        zeros = self._zero_rows
        vx_i, vx = [], []          # vector entries: |x| in one foreach call
        vd_i, vdx, vdd = [], [], []  # vector entries with a direction
        for i, (e, need) in enumerate(zip(L.entries, need_entry)):
            if row_stats[i] is not None:
                nx[i], xd[i], nd[i] = row_stats[i]
                continue
            z = zeros[:e.size]
            if not need:
                nx[i] = xd[i] = nd[i] = z
                continue
            x = e.param.detach()
            kept = directions.get(id(e.param))
            if e.vector:
                vx_i.append(i)
                vx.append(x.reshape(-1))
                if kept is not None:
                    vd_i.append(i)
                    vdx.append(x.reshape(-1))
                    vdd.append(kept[1].reshape(-1))
                else:
                    xd[i] = nd[i] = z
                continue
            # a matrix entry without a kept direction: only ||x||
            nx[i] = row_norm(x, e.dim, e.size)
            xd[i] = nd[i] = z
        # vector entries (a BatchNorm's weight and bias: many small tensors) in one op each on
        # their concatenation: per-tensor kernels would cost more than the arithmetic
        if vx:
            for i, v in zip(vx_i, _split_like(torch.cat(vx).abs_(), vx)):
                nx[i] = v
        if vdx:
            cx, cd = torch.cat(vdx), torch.cat(vdd)
            for i, v, w in zip(vd_i, _split_like(cx.mul_(cd), vdx), _split_like(cd.abs_(), vdd)):
                xd[i] = v
                nd[i] = w
        out = []
        for parts in (nx, xd, nd):
            flat = torch.cat(parts) if len({t.dtype for t in parts}) == 1 \
                else torch.cat([t.to(acc) for t in parts])
            out.append(flat if flat.dtype == acc else flat.to(acc))
        return tuple(out)

    def _partition(self, xx: torch.Tensor, xd: torch.Tensor, dd: torch.Tensor) -> None:
        """Choose the redundant set from the saliency of DHSPG step 1 (see class docstring)."""
        L = self._layout
        sal = redundancy_saliency(xx, xd, dd, L.channel_numel)
        sal = torch.where(self._zeroable, sal, torch.full_like(sal, -math.inf))
        # Channels ranked by saliency within their group, most redundant first.
        order = torch.argsort(sal, descending=True, stable=True)
        order = order[torch.argsort(L.channel_group[order], stable=True)]
        grp = L.channel_group[order]
        starts = torch.zeros(len(L.groups) + 1, dtype=torch.long, device=grp.device)
        starts[1:] = torch.cumsum(torch.bincount(grp, minlength=len(L.groups)), 0)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=grp.device) - starts[grp]
        quota = self._group_quota(sal) if self.partition == "uniform" else None
        if quota is None:
            # Global: the K channels of highest saliency, the top-ranked (least redundant)
            # channel of every group excluded.
            last = torch.zeros_like(self._zeroable)
            last[order] = self._last_kept(grp, order)
            candidate = self._zeroable & ~last
            score = torch.where(candidate, sal, torch.full_like(sal, -math.inf))
            red = torch.zeros_like(self._dh["redundant"])
            red[torch.topk(score, self.target_channels, sorted=False).indices] = True
            red &= candidate
        else:
            red = self._zeroable & (rank < quota[L.channel_group])
        self._dh["redundant"] = red
        self._dh["partitioned"] = True

    def _last_kept(self, grp: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Over channels in ``order`` (grouped, most redundant first): True at the last
        zeroable channel of each group, the one a global partition never takes."""
        z = self._zeroable[order]
        pos = torch.arange(len(order), device=order.device)
        key = torch.where(z, pos, torch.full_like(pos, -1))
        last = torch.full((len(self._layout.groups),), -1, dtype=torch.long, device=order.device)
        last.scatter_reduce_(0, grp, key, reduce="amax")
        out = torch.zeros_like(z)
        out[last[last >= 0]] = True
        return out

    def _group_quota(self, sal: torch.Tensor) -> torch.Tensor:
        """Redundant channels per group of the uniform partition (``LongTensor[groups]``):
        ``floor(r z_g)`` of the ``z_g`` zeroable channels of group ``g`` (at most
        ``z_g - 1``), the remaining ``K - sum`` handed out one each to the groups with the
        largest fractional part ``r z_g - floor(r z_g)`` (ties in group order)."""
        L = self._layout
        z = torch.bincount(L.channel_group[self._zeroable], minlength=len(L.groups)).tolist()
        r = self.target_group_sparsity
        room = [max(n - 1, 0) for n in z]
        quota = [min(int(math.floor(r * n + 1e-9)), m) for n, m in zip(z, room)]
        rest = self.target_channels - sum(quota)
        by_fraction = sorted(range(len(z)), key=lambda g: (-(r * z[g] - quota[g]), g))
        while rest > 0:
            before = rest
            for g in by_fraction:
                if rest and quota[g] < room[g]:
                    quota[g] += 1
                    rest -= 1
            if rest == before:
                break
        return torch.tensor(quota, dtype=torch.long, device=sal.device)

    def _pruning_math(self, t: int, need_entry: List[bool], directions,
                      row_stats) -> Dict[int, List[Tuple[int, torch.Tensor]]]:
        """Partition (once), adaptive lambda, half-space projection and quota of one pruning
        step; returns the per-row scales ``1 - lr (lambda_g / ||x_g|| + b)`` per parameter.
        ``row_stats``: the matrix entries' row reductions (see :meth:`_matrix_row_stats`)."""
        L = self._layout
        dh = self._dh
        nx_r, xdr, ndr = self._row_norms(need_entry, directions, row_stats)
        a, b, alpha = self._coef_rows(directions)
        xx_r = nx_r.square()
        xd_r = a * xdr + b * xx_r
        dd_r = (a * a) * ndr.square() + (2.0 * a * b) * xdr + (b * b) * xx_r
        ch = L.channel_sums([xx_r, xd_r, dd_r, alpha * xx_r, alpha * xd_r])
        xx, xd, dd, axx, axd = ch.unbind(0)
        if not dh["partitioned"]:
            self._partition(xx, xd, dd)
        active = dh["redundant"] & ~dh["projected"]

        lmbda = self.lmbda
        nx = xx.sqrt()
        safe_nx = nx.clamp_min(_TINY)
        lam = torch.full_like(xx, lmbda)
        grow = xd < 0
        lo = -xd / safe_nx
        hi = -dd * nx / torch.where(grow, xd, torch.full_like(xd, -1.0))
        lam_adapt = (self.lmbda_amplify * lo).clamp(lmbda, self.hat_lmbda_coeff * lmbda)
        lam_adapt = torch.where(lam_adapt >= hi, 0.5 * (lo + hi), lam_adapt)
        lam = torch.where(grow, lam_adapt, lam)
        inner = xx - axd - lam * axx / safe_nx
        proj = active & ((xx <= 0) | (inner < self.epsilon * xx))

        # Quota of the exact-target schedule.
        k = t - self.start_pruning_step
        K = self.target_channels
        if self.projection_schedule == "linear":
            quota = (K * (k + 1)) // self.pruning_steps
        else:
            quota = K if k == self.pruning_steps - 1 else 0
        have = int(dh["projected"].sum()) + int(proj.sum())
        if have < quota:
            rest = active & ~proj
            ratio = torch.where(rest, inner / xx.clamp_min(_TINY), torch.full_like(xx, math.inf))
            extra = torch.topk(ratio, quota - have, largest=False).indices
            proj[extra] = True
        if bool(proj.any()):
            dh["projected"] = dh["projected"] | proj
            self._zero_rows_cache = None

        # Group-lasso shrink of the redundant channels that stay: x <- (1 - lr lambda/||x||) x.
        shrink = active & ~proj
        scales: Dict[int, List[Tuple[int, torch.Tensor]]] = {}
        if bool(shrink.any()):
            c = torch.where(shrink, lam / safe_nx, torch.zeros_like(lam))
            c_rows = L.to_rows(c, 0.0)
            s_rows = 1.0 - alpha * c_rows
            parts = L.split_rows(s_rows)
            # every entry holding an active channel takes its scales (1 exactly where nothing
            # shrinks this step: x * 1 == x), which spares a search for the shrinking ones
            for i, e in enumerate(L.entries):
                kept = directions.get(id(e.param))
                if need_entry[i] and kept is not None:
                    s = parts[i]
                    scales.setdefault(id(e.param), []).append((e.dim, s))
            # Fold the decoupled decay (b != 0) into the first scale of each parameter.
            for pid, lst in scales.items():
                p, _, _, b_p, lr_p = directions[pid]
                if b_p != 0.0:
                    lst[0] = (lst[0][0], lst[0][1] - lr_p * b_p)
                for j, (dim, s) in enumerate(lst):
                    if s.dtype != p.dtype:
                        lst[j] = (dim, s.to(p.dtype))
        return scales

    def _enforce_zeros(self) -> None:
        dh = self._dh
        if self._zero_rows_cache is None:
            L = self._layout
            ext = torch.cat([dh["projected"], dh["projected"].new_zeros(1)])
            cache = []
            if bool(dh["projected"].any()):
                for e in L.entries:
                    r = L.rows_of(e, ext)
                    if r.numel():
                        cache.append((e.param, e.dim, r))
            self._zero_rows_cache = cache
        for p, dim, r in self._zero_rows_cache:
            self._zero_param_rows(p, dim, r)

    def _zero_param_rows(self, p: torch.Tensor, dim: int, rows: torch.Tensor) -> None:
        """Set ``rows`` along ``dim`` of ``p`` and of its parameter-shaped optimizer state
        (momentum buffer, Adam moments) to exactly 0."""
        p.index_fill_(dim, rows, 0)
        for v in self.state.get(p, {}).values():
            if torch.is_tensor(v) and v.shape == p.shape:
                v.index_fill_(dim, rows, 0)

    # ------------------------------------------------------------------ reporting
    @torch.no_grad()
    def metrics(self) -> Dict[str, float]:
        """Sparsity and norm report of the current parameters.

        Returns a dict with ``step`` (steps taken), ``group_sparsity`` (zero channels /
        prunable channels), ``zero_channels`` (channels whose every producer entry is exactly
        0), ``target_channels`` (``K``), ``projected_channels`` (channels this optimizer
        projected), ``redundant_channels`` (``|G_r|``), ``prunable_channels`` (``C``),
        ``norm_important`` and ``norm_redundant`` (L2 norms of the important / redundant
        channels' variables taken together).
        """
        L = self._layout
        dh = self._dh
        C = L.num_channels
        if L.entries:
            parts = [row_norm(e.param.detach(), e.dim, e.size).to(self._acc) for e in L.entries]
            xx = L.channel_sum(torch.cat(parts).square_())
        else:
            xx = torch.zeros(C, dtype=self._acc)
        zero = int(((xx == 0) & self._zeroable).sum())
        red = dh["redundant"]
        return {
            "step": int(dh["step"]),
            "group_sparsity": zero / C if C else 0.0,
            "zero_channels": zero,
            "target_channels": int(self.target_channels),
            "projected_channels": int(dh["projected"].sum()),
            "redundant_channels": int(red.sum()),
            "prunable_channels": int(C),
            "norm_important": float(xx[~red].sum().sqrt()),
            "norm_redundant": float(xx[red].sum().sqrt()),
        }

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> Dict[str, Any]:
        """The ``torch.optim`` state dict plus a ``"dhspg"`` entry: step counter, partition,
        projected set (``BoolTensor[C]``) and the DHSPG hyperparameters. Tensors and
        primitive containers only, so ``torch.load(weights_only=True)`` reads it back."""
        sd = super().state_dict()
        dh = self._dh
        sd["dhspg"] = {
            "step": int(dh["step"]),
            "partitioned": bool(dh["partitioned"]),
            "redundant": dh["redundant"].detach().cpu().clone(),
            "projected": dh["projected"].detach().cpu().clone(),
            "num_channels": int(self._layout.num_channels),
            "target_channels": int(self.target_channels),
            "variant": self.variant,
            "lmbda": self.lmbda,
            "lmbda_amplify": self.lmbda_amplify,
            "hat_lmbda_coeff": self.hat_lmbda_coeff,
            "epsilon": self.epsilon,
            "target_group_sparsity": self.target_group_sparsity,
            "start_pruning_step": self.start_pruning_step,
            "pruning_steps": self.pruning_steps,
            "projection_schedule": self.projection_schedule,
            "partition": self.partition,
        }
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the run then continues exactly as if uninterrupted."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("dhspg", None)
        if extra is not None:
            if int(extra["num_channels"]) != self._layout.num_channels:
                raise ValueError(
                    f"state dict has {extra['num_channels']} prunable channels, this program "
                    f"has {self._layout.num_channels}")
            if extra.get("variant", self.variant) != self.variant:
                raise ValueError(f"state dict is for variant {extra['variant']!r}, "
                                 f"this optimizer is {self.variant!r}")
        super().load_state_dict(state_dict)
        if extra is None:
            return
        dev = self._layout.device
        self._dh = {
            "step": int(extra["step"]),
            "partitioned": bool(extra["partitioned"]),
            "redundant": extra["redundant"].to(dev, torch.bool).clone(),
            "projected": extra["projected"].to(dev, torch.bool).clone(),
        }
        self.target_channels = int(extra["target_channels"])
        for key in ("lmbda", "lmbda_amplify", "hat_lmbda_coeff", "epsilon", "target_group_sparsity"):
            setattr(self, key, float(extra[key]))
        self.start_pruning_step = int(extra["start_pruning_step"])
        self.pruning_steps = int(extra["pruning_steps"])
        self.projection_schedule = str(extra["projection_schedule"])
        self.partition = str(extra.get("partition", "global"))
        self._zero_rows_cache = None
        # Per-parameter Adam step counts are plain ints; torch's loader leaves them as saved.
        for st in self.state.values():
            if "step" in st and torch.is_tensor(st["step"]):
                st["step"] = int(st["step"].item())
