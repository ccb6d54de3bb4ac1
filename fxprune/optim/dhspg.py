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
from ._sharding import like, local

__all__ = ["DHSPG"]

_VARIANTS = ("sgd", "adam", "adamw")
# Reference defaults of the OTOv2 code per variant: (lmbda, lmbda_amplify, hat_lmbda_coeff).
_REFERENCE_DEFAULTS = {"sgd": (1e-3, 2.0, 10.0), "adam": (1e-2, 20.0, 1e3), "adamw": (1e-2, 20.0, 1e3)}
_TINY = 1e-30


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
        fused: take the steps of contiguous float32/float64 CPU parameters through fused C++
            kernels (:mod:`fxprune.optim._fused`): SGD's momentum step, the pruning phase's row
            reductions and the update in one pass over memory, the row-scaled update of the
            redundant rows in a second pass over those rows only. ``None`` (default): when every
            parameter is on the CPU and the kernels can be built (with the machine's C++
            compiler; about 15 s the first time on a machine, then cached), else the stock
            path, with a warning saying why. ``True``: always, raising
            :class:`fxprune.UnsupportedInputError` when the kernels cannot be built. ``False``:
            the stock ``torch`` ops. Both paths take the same steps up to rounding; the
            attribute ``fused`` says which one runs.

    **Sharded parameters (FSDP2).** Built after ``torch.distributed.fsdp.fully_shard`` (as any
    optimizer), DHSPG steps the ``DTensor`` parameters' local blocks: directions and optimizer
    state (``DTensor`` like the parameters) are local; the per-row sums ``||x||^2``,
    ``<x, d>``, ``||d||^2`` of the local blocks are all-reduced over the mesh before the channel
    math (a channel's rows may lie in one rank's block or be split over all of them), so every
    rank takes the same partition, lambdas, projections and quota, and a projected channel is
    exactly zero in every block. The step and :meth:`metrics` are then collectives: every rank
    calls them. See :mod:`fxprune.optim._sharding`. Under DistributedDataParallel nothing is
    reduced: the gradients are averaged already and every rank computes the same step.

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

    Cost: with the fused kernels (the default on the CPU) a step streams each parameter once,
    as SGD does: momentum, update and, in the pruning phase, the three row reductions
    (``||x||^2``, ``<x, d>``, ``||d||^2`` over every dim but the channel dim) in one pass. Only
    the rows of redundant channels not yet projected wait for the channel math and take a
    second pass, ``x <- s_r x - lr d``. The channel math is a few vector ops over the ``[C]``
    channels and ``[R]`` rows. The stock path takes the direction, then the reductions (four
    reads of parameter memory: two norms and a batched matmul), then a row scaling and an add.
    ``benchmarks/optimizer_step.py`` measures both against ``torch.optim.SGD``.

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
        fused: Optional[bool] = None,
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

        module = prog.module
        if params is None:
            # Named, so that param_groups carry "param_names" (torch.optim's own field).
            params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        super().__init__(params, defaults)
        if fused is None:  # the kernels where they apply and can be built, else the stock step
            on_cpu = all(p.device.type == "cpu" for g in self.param_groups for p in g["params"])
            fused = on_cpu and _fused.available()
        elif fused:
            _fused.kernels()  # build now: a missing compiler fails here, not mid-training
        #: whether steps take the fused CPU kernels (see the ``fused`` argument)
        self.fused = bool(fused)

        if self.target_group_sparsity > 0 and hasattr(prog, "check_construction"):
            # a group whose removal cannot be built is frozen now, not found after training
            prog.check_construction()
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
        self._coef: Tuple[Any, ...] = ()
        self._vector_rows: Tuple[tuple, Optional[torch.Tensor]] = ((), None)
        self._stats: Optional[torch.Tensor] = None  # row sums of a pruning step, see _stats_buffer
        self._active_key: Optional[tuple] = None  # see _active_rows
        self._scratch: Optional[torch.Tensor] = None  # row_dot products (half precision only)
        #: id(parameter) -> indices of its entries in ``layout.entries``
        self._param_entries: Dict[int, List[int]] = {}
        for i, e in enumerate(layout.entries):
            self._param_entries.setdefault(id(e.param), []).append(i)
        #: id(parameter) -> first flat row of its one entry along dim 0 (fused kernels), or -1
        self._fused_start: Dict[int, int] = {
            pid: layout.entries[ix[0]].row0 if len(ix) == 1 and layout.entries[ix[0]].dim == 0 else -1
            for pid, ix in self._param_entries.items()}
        self._step_fused: set = set()  # ids of the parameters the current step gives the kernels

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
        defer: Optional[torch.Tensor] = None  # flat rows whose update waits for the channel math
        if pruning:
            if not dh["partitioned"]:
                need_entry = [True] * len(L.entries)
                # the partition (at the first step >= start_pruning_step) makes the scales;
                # before it (H2SPG's warm-up) nothing shrinks
                defer = L.row_has_channel if t >= self.start_pruning_step else None
            else:
                defer, need_entry = self._active_rows()
                pruning = defer is not None
        self._step_fused.clear()
        need_param = {id(e.param) for e, flag in zip(L.entries, need_entry) if flag}
        # per flat row: ||x||^2, <x, d_raw>, ||d_raw||^2 of the needed entries (zero elsewhere)
        stats = self._stats_buffer() if pruning else None
        filled = [False] * len(L.entries)

        # 1. base directions; parameters without channel work are updated right away. A kept
        #    direction is (p, d_raw, a, b, lr) with d = a * d_raw + b * x. The row reductions of
        #    a kept parameter follow its direction at once, while the freshly written direction
        #    (and the parameter, for small ones) is still in cache.
        directions: Dict[int, Tuple[torch.Tensor, torch.Tensor, float, float, float]] = {}
        deferred: List[Tuple[list, list, list, float]] = []  # fused: (xs, ds, starts, lr)
        for group in self.param_groups:
            fused: Dict[torch.dtype, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("DHSPG does not support sparse gradients")
                keep_d = id(p) in need_param
                if self.fused and self._fusable(p, group, keep_d):
                    fused.setdefault(p.dtype, []).append(p)
                    continue
                out = self._direction(p, group, keep_d)
                if keep_d:
                    directions[id(p)] = (local(p),) + out + (group["lr"],)
                    self._matrix_row_stats(p, out[0], need_entry, stats, filled)
            for ps in fused.values():
                deferred.append(self._fused_sgd(ps, group, need_param, defer, stats, filled, directions))

        # 2. channel math of the pruning phase: per-row scales of the kept parameters.
        scales: Dict[int, List[Tuple[int, torch.Tensor]]] = {}
        s_rows = None
        if pruning:
            self._row_stats(need_entry, directions, stats, filled)
            L.reduce_rows_(stats)  # sharded parameters: local partial sums -> global (collective)
            scales, s_rows = self._pruning_math(t, need_entry, directions, stats)

        # 3. updates that waited for the channel math: x <- s * x - lr * d.
        self._update(directions, scales)
        for xs, ds, starts, lr in deferred:
            if xs:
                _fused.scale_sub_(xs, ds, starts, lr, s_rows, defer)

        # 4. projected channels stay exactly zero, in the parameters and their state.
        self._enforce_zeros()
        dh["step"] = t + 1
        return loss

    def _direction(self, p: torch.Tensor, group: Dict[str, Any], keep_d: bool):
        """Update the state of ``p`` and its base direction ``d = a * d_raw + b * x``.

        With ``keep_d`` returns ``(d_raw, a, b)`` (scalars ``a``, ``b``) and leaves ``p``
        alone; otherwise applies ``x <- x - lr * d`` now and returns None. A sharded ``p``
        (``DTensor``) steps its local block; its state tensors are ``DTensor`` like ``p``.
        """
        param = p
        p, grad = local(param), local(param.grad)
        wd = group["weight_decay"]
        lr = group["lr"]
        state = self.state[param]
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
            buf = local(state.get("momentum_buffer"))
            if buf is None:
                buf = torch.clone(g).detach() if g is grad else g
                state["momentum_buffer"] = like(param, buf)
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
            state["exp_avg"] = like(param, torch.zeros_like(p, memory_format=torch.preserve_format))
            state["exp_avg_sq"] = like(param, torch.zeros_like(p, memory_format=torch.preserve_format))
        if self.variant == "adam" and wd != 0.0:
            grad = grad.add(p, alpha=wd)
        state["step"] = int(state["step"]) + 1
        n = state["step"]
        m, v = local(state["exp_avg"]), local(state["exp_avg_sq"])
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
        """``x <- s * x - lr * a * d_raw`` for every kept direction of the stock path (``s`` the
        per-row scales of the channel math, or ``1 - lr * b``). With ``fused`` the matrices take
        the row-scaling kernel and the 1-d parameters a few ``_foreach`` calls, grouped by
        coefficient."""
        vectors: Dict[float, Tuple[list, list, list]] = {}
        for pid, (p, d_raw, a, b, lr) in directions.items():
            if pid in self._step_fused:
                continue
            rows = scales.get(pid)
            if self.fused:
                if p.dim() == 1 and b == 0.0 and len(rows or ()) <= 1:
                    ps, ds, ss = vectors.setdefault(lr * a, ([], [], []))
                    ps.append(p)
                    ds.append(d_raw)
                    ss.append(rows[0][1] if rows else None)
                    continue
                if rows and len(rows) == 1 and rows[0][0] == 0 and _fused.takes(p, d_raw):
                    _fused.scale_sub_([p], [d_raw], [0], lr * a, rows[0][1].reshape(-1))
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

    def _active_rows(self) -> Tuple[Optional[torch.Tensor], List[bool]]:
        """After the partition: the flat rows of the redundant channels not yet projected
        (``BoolTensor[R]``, None when there are none) and, per entry, whether it holds any.
        Kept while both sets stay the same tensors at the same version (the optimizer replaces
        them when they change; an in-place edit bumps the version), which spares the gathers in
        most steps."""
        dh = self._dh
        red, proj = dh["redundant"], dh["projected"]
        key = self._active_key
        if key is None or key[0] is not red or key[1] is not proj or key[2] != (red._version, proj._version):
            L = self._layout
            active = dh["redundant"] & ~dh["projected"]
            if bool(active.any()):
                rows = L.to_rows(active, False)
                value = (rows, L.entry_any(rows))
            else:
                value = (None, [False] * len(L.entries))
            # the key holds the tensors themselves, so that their ids cannot be reused
            self._active_key = key = (red, proj, (red._version, proj._version), value)
        return key[3]

    def _stats_buffer(self) -> torch.Tensor:
        """``[3, R]`` zeros of the accumulation dtype, one buffer reused across steps: a fresh
        block of this size would come with its page faults every step."""
        L = self._layout
        if self._stats is None:
            self._stats = torch.zeros(3, L.num_rows, dtype=self._acc, device=L.device)
        else:
            self._stats.zero_()
        return self._stats

    def _fusable(self, p: torch.Tensor, group: Dict[str, Any], keep_d: bool) -> bool:
        """Whether ``p``'s step takes the fused SGD kernel (:func:`._fused.sgd_step`): a plain
        momentum step (not the first, not Nesterov) of tensors the kernel takes, and, when its
        rows are needed, one entry along dim 0 in the accumulation dtype."""
        if self.variant != "sgd" or group["nesterov"] or group["momentum"] == 0.0:
            return False
        buf = self.state[p].get("momentum_buffer")
        if buf is None or not _fused.takes(local(p), local(p.grad), local(buf)):
            return False
        return not keep_d or (self._fused_start.get(id(p), -1) >= 0 and p.dtype == self._acc)

    def _fused_sgd(self, ps: List[torch.Tensor], group: Dict[str, Any], need_param: set,
                   defer: Optional[torch.Tensor], stats: Optional[torch.Tensor], filled: List[bool],
                   directions) -> Tuple[list, list, list, float]:
        """The momentum steps of ``ps`` (one dtype) in one kernel call. Rows of parameters with
        channel work write their row sums to ``stats``; those marked in ``defer`` keep their
        values for the row-scaled update after the channel math. Returns that update's
        ``(xs, directions, starts, lr)``."""
        L = self._layout
        lr = group["lr"]
        bufs = [local(self.state[p]["momentum_buffer"]) for p in ps]
        xs = [local(p) for p in ps]
        starts, later = [], ([], [], [], lr)
        for p, x, buf in zip(ps, xs, bufs):
            start = -1
            if id(p) in need_param:
                i = self._param_entries[id(p)][0]
                start = L.entries[i].row0
                filled[i] = True
                directions[id(p)] = (x, buf, 1.0, 0.0, lr)
                self._step_fused.add(id(p))
                if defer is not None:
                    later[0].append(x)
                    later[1].append(buf)
                    later[2].append(start)
            starts.append(start)
        _fused.sgd_step(xs, [local(p.grad) for p in ps], bufs, starts, group["momentum"], group["weight_decay"],
                        lr, defer, stats)
        return later

    def _scratch_for(self, x: torch.Tensor) -> torch.Tensor:
        """A buffer for ``x * d`` reused across steps (grown to the largest parameter)."""
        s = self._scratch
        if s is None or s.dtype != x.dtype or s.device != x.device or s.numel() < x.numel():
            s = torch.empty(max(x.numel(), 0 if s is None else s.numel()), dtype=x.dtype,
                            device=x.device)
            self._scratch = s
        return s

    def _coef_rows(self, directions) -> Tuple[Any, Any, Any]:
        """Per-row ``a``, ``b`` (``d = a d_raw + b x``) and step size ``lr`` (0 where not
        stepped), each ``Tensor[R]``, or a float where it is one value over every row (every
        entry stepped alike: the common case, which spares the row-wise products)."""
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
            rows = torch.repeat_interleave(vals, L.entry_sizes_t, dim=1).unbind(0)
            self._coef = tuple(v[0] if len(set(v)) == 1 else r for v, r in zip(key, rows))
            self._coef_key = key
        return self._coef

    def _matrix_row_stats(self, p: torch.Tensor, d_raw: torch.Tensor, need_entry: List[bool],
                          stats: torch.Tensor, filled: List[bool]) -> None:
        """Per-row ``(||x||^2, <x, d_raw>, ||d_raw||^2)`` of the needed matrix entries of ``p``
        into their columns of ``stats`` (``[3, R]``), marked in ``filled``. Vector entries (one
        scalar per row) are left to :meth:`_row_stats`, which does them all at once."""
        L = self._layout
        x = local(p).detach()
        for i in self._param_entries.get(id(p), ()):
            e = L.entries[i]
            if not need_entry[i] or e.vector:
                continue
            filled[i] = True
            if not e.n:  # a sharded parameter with no rows on this rank
                continue
            if self.fused and e.dim == 0 and x.dtype == stats.dtype and _fused.takes(x, d_raw):
                _fused.row_stats(x, d_raw, stats, e.row0)
                continue
            # row_dot writes products only for half precision (see its docstring)
            scratch = None if x.dtype == acc_dtype(x) else self._scratch_for(x)
            nx = row_norm(x, e.dim, e.n)
            nd = row_norm(d_raw, e.dim, e.n)
            xd = row_dot(x, d_raw, e.dim, e.n, scratch)
            stats[:, e.row0:e.row0 + e.n].copy_(torch.stack([nx.square_(), xd, nd.square_()]))

    def _row_stats(self, need_entry: List[bool], directions, stats: torch.Tensor,
                   filled: List[bool]) -> None:
        """Fill the columns of ``stats`` (``[3, R]``: per flat row ``||x||^2``, ``<x, d_raw>``,
        ``||d_raw||^2``) of the needed entries not ``filled`` yet: vector entries, and matrix
        entries of parameters without a kept direction (``||x||^2`` only). Zero elsewhere."""
        L = self._layout
        vx_i, vx, vd = [], [], []  # vector entries: all in one op each on their concatenation
        for i, e in enumerate(L.entries):
            if filled[i] or not need_entry[i] or not e.n:
                continue
            x = e.local().detach()
            kept = directions.get(id(e.param))
            if e.vector:
                vx_i.append(i)
                vx.append(x.reshape(-1))
                vd.append(None if kept is None else kept[1].reshape(-1))
            else:  # a matrix entry without a kept direction: only ||x||
                stats[0, e.row0:e.row0 + e.n] = row_norm(x, e.dim, e.n).square_()
        if not vx:
            return
        # a BatchNorm's weight and bias are many small tensors: per-tensor kernels would cost more
        # than the arithmetic
        cx = torch.cat(vx).to(stats.dtype)
        cd = torch.cat([x.new_zeros(x.shape) if d is None else d for x, d in zip(vx, vd)]).to(stats.dtype)
        key = tuple(vx_i)
        if self._vector_rows[0] != key:
            L_rows = [torch.arange(L.entries[i].row0, L.entries[i].row0 + L.entries[i].n,
                                   device=L.device) for i in vx_i]
            self._vector_rows = (key, torch.cat(L_rows))
        stats.index_copy_(1, self._vector_rows[1], torch.stack([cx * cx, cx * cd, cd * cd]))

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

    def _pruning_math(self, t: int, need_entry: List[bool], directions, stats: torch.Tensor
                      ) -> Tuple[Dict[int, List[Tuple[int, torch.Tensor]]], Optional[torch.Tensor]]:
        """Partition (once), adaptive lambda, half-space projection and quota of one pruning
        step. ``stats``: ``[3, R]`` row sums ``||x||^2``, ``<x, d_raw>``, ``||d_raw||^2``.
        Returns the per-row scales ``1 - lr (lambda_g / ||x_g|| + b)`` per parameter of the
        stock path, and the flat ``Tensor[R]`` of ``1 - lr lambda_g / ||x_g||`` (None where no
        channel shrinks) for the fused one."""
        L = self._layout
        dh = self._dh
        xx_r, xdr, ddr = stats.unbind(0)
        a, b, alpha = self._coef_rows(directions)
        if isinstance(a, float) and a == 1.0 and isinstance(b, float) and b == 0.0:
            rows = stats  # d = d_raw
        else:
            rows = torch.stack([xx_r, a * xdr + b * xx_r, (a * a) * ddr + (2.0 * a * b) * xdr + (b * b) * xx_r])
        if isinstance(alpha, float):
            xx, xd, dd = L.channel_sums(rows).unbind(0)
            axx, axd = alpha * xx, alpha * xd
        else:
            ch = L.channel_sums(torch.cat([rows, alpha * rows[:2]]))
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
        if not bool(shrink.any()):
            return scales, None
        c = torch.where(shrink, lam / safe_nx, torch.zeros_like(lam))
        if isinstance(alpha, float):  # scales per channel, then one gather to the rows
            s_rows = L.to_rows(1.0 - alpha * c, 1.0)
        else:
            s_rows = 1.0 - alpha * L.to_rows(c, 0.0)
        parts = None
        # every stock-path entry holding an active channel takes its scales (1 exactly where
        # nothing shrinks this step: x * 1 == x), which spares a search for the shrinking ones
        for i, e in enumerate(L.entries):
            pid = id(e.param)
            if need_entry[i] and pid in directions and pid not in self._step_fused:
                parts = L.split_rows(s_rows) if parts is None else parts
                scales.setdefault(pid, []).append((e.dim, e.local_part(parts[i])))
        # Fold the decoupled decay (b != 0) into the first scale of each parameter.
        for pid, lst in scales.items():
            p, _, _, b_p, lr_p = directions[pid]
            if b_p != 0.0:
                lst[0] = (lst[0][0], lst[0][1] - lr_p * b_p)
            for j, (dim, s) in enumerate(lst):
                if s.dtype != p.dtype:
                    lst[j] = (dim, s.to(p.dtype))
        return scales, s_rows

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
        """Set ``rows`` (global positions) along ``dim`` of ``p`` and of its parameter-shaped
        optimizer state (momentum buffer, Adam moments) to exactly 0; a sharded ``p`` zeroes
        the positions of its local block."""
        sharding = self._layout.sharding
        if sharding is not None:
            rows = sharding.localize(p, dim, rows)
            if not rows.numel():
                return
        local(p).index_fill_(dim, rows, 0)
        for v in self.state.get(p, {}).values():
            if torch.is_tensor(v) and v.shape == p.shape:
                local(v).index_fill_(dim, rows, 0)

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
        if L.entries:  # sharded parameters: a collective, every rank calls metrics()
            xx = L.channel_sum(L.row_sq_norms(self._acc))
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
