"""Training on several processes or GPUs with torch.distributed, for any training job.

The pieces a data-parallel job needs, each a small function over torch.distributed's own
machinery (``init_process_group``, ``DistributedDataParallel``, ``DistributedSampler``,
``all_reduce``, ``torch.distributed.checkpoint``), so that a job launched by ``torchrun``
(``torchrun --nproc_per_node N -m fxprune train ...``) differs from a one-process job by a
few calls:

* :func:`init` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``),
  initializes the default process group (gloo on the CPU, NCCL on CUDA, each rank on
  ``cuda:LOCAL_RANK``) and returns a :class:`Context`; without torchrun it is a
  one-process context and every helper below does what a plain job does.
* :func:`wrap` puts a module under ``DistributedDataParallel`` (optionally with
  ``SyncBatchNorm``, :func:`sync_batchnorm_view`).
* :func:`per_rank_batch`, :func:`epoch_loader`, :func:`eval_shard`: the global batch split
  evenly over the ranks with ``DistributedSampler``. Global batch ``b`` of an epoch is the
  same set of examples as batch ``b`` of a one-process run with the same order, so with
  gradients averaged by DDP a model without batch statistics takes the same steps.
* :meth:`Context.all_reduce_sum`, :meth:`Context.broadcast_object`,
  :meth:`Context.all_gather_object`: metrics summed over ranks, a rank-0 result shared.
* :meth:`Context.on_main` runs a function (a checkpoint write, the slim-model export) on rank 0
  only and waits for it on every rank; checkpoints are then read by every rank on resume.
* :class:`GradientStep`: gradient accumulation (an optimizer step every ``k`` micro-batches,
  DDP's gradient all-reduce only on the last) and mixed precision (``torch.autocast`` bf16 or
  fp16; fp16 with ``torch.amp.GradScaler``, whose skipped steps skip the optimizer's step).
* FSDP2 (``torch.distributed.fsdp.fully_shard``): fxprune's DHSPG and H2SPG step sharded
  parameters directly (:mod:`fxprune.optim._sharding`); :func:`program_template` keeps a
  parameter-free copy of a program before sharding, and :func:`construct_subnet` gathers the
  full state on rank 0 (``torch.distributed.checkpoint.state_dict.get_model_state_dict``) and
  builds the slim model there.

Errors (a batch that does not split evenly, ``--sync-bn`` without CUDA) are
:class:`fxprune.UnsupportedInputError` naming the flag.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .config import PRECISIONS
from .errors import UnsupportedInputError

__all__ = ["Context", "init", "shutdown", "wrap", "sync_batchnorm_view", "sync_buffers", "per_rank_batch",
           "epoch_loader", "eval_shard", "GradientStep", "PRECISIONS", "program_template",
           "full_state_dict", "construct_subnet"]


def _dist():
    import torch.distributed as dist

    return dist


@dataclass
class Context:
    """Where this process stands in a torch.distributed job.

    Attributes:
        rank, world_size, local_rank: torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
            (0, 1, 0 in a one-process job).
        device: the device this rank trains on (``cuda:LOCAL_RANK`` on CUDA).
        backend: ``"gloo"`` or ``"nccl"``, None in a one-process job.
        owns_group: whether :func:`init` created the default process group (and
            :func:`shutdown` destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        """Whether there are several ranks."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that writes files and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist = _dist()
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_reduce_sum(self, values: Sequence[float]) -> List[float]:
        """``values`` summed over the ranks (float64; one all-reduce for all of them)."""
        if not self.distributed:
            return [float(v) for v in values]
        dist = _dist()
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (pickled; for small objects such as a report)."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        _dist().broadcast_object_list(box, src=src, device=self._object_device())
        return box[0]

    def all_gather_object(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order (pickled)."""
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        _dist().all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on rank 0 only, then a barrier (so that every rank may read
        what it wrote); returns its result on rank 0, None elsewhere. An exception on rank 0 is
        raised there; the other ranks then stop at the barrier's timeout or when torchrun
        ends the job."""
        out = fn(*args, **kwargs) if self.is_main else None
        self.barrier()
        return out

    def _object_device(self):
        return self.device if self.backend == "nccl" else None


def init(device: Optional[str] = None, backend: Optional[str] = None) -> Context:
    """The context of this process, initializing torch.distributed when launched by torchrun.

    Args:
        device: ``"cpu"``, ``"cuda"`` (each rank takes ``cuda:LOCAL_RANK``), a full device
            string, or None for CUDA when available, else the CPU.
        backend: the process-group backend; default NCCL for CUDA, gloo for the CPU.

    With ``WORLD_SIZE`` unset or 1 nothing is initialized: a one-process context. An already
    initialized default group is used as it is.

    Raises:
        fxprune.UnsupportedInputError: more CUDA ranks on this node than GPUs, or a
            torch built without torch.distributed.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world <= 1:
        return Context(device=dev)
    dist = _dist()
    if not dist.is_available():
        raise UnsupportedInputError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    if dev.type == "cuda":
        if dev.index is None:
            if local_rank >= torch.cuda.device_count():
                raise UnsupportedInputError(
                    f"rank {rank} has LOCAL_RANK {local_rank} but this node has "
                    f"{torch.cuda.device_count()} CUDA device(s): start at most that many processes "
                    f"per node (torchrun --nproc_per_node)")
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    owns = not dist.is_initialized()
    if owns:
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, **kwargs)
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                   device=dev, backend=dist.get_backend(), owns_group=owns)


def shutdown(ctx: Context, wait: bool = True) -> None:
    """Destroy the process group :func:`init` created (no-op otherwise). With ``wait`` (a
    normal end), once every rank is there: a rank that left early would close connections
    another rank still reads (gloo aborts on that). ``wait=False`` after an error: the other
    ranks are not waited for (torchrun stops them when one fails)."""
    if ctx.owns_group:
        dist = _dist()
        if dist.is_initialized():
            if wait:
                ctx.barrier()
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# model


def wrap(module: nn.Module, ctx: Context, *, sync_bn: bool = False, **ddp_kwargs: Any) -> nn.Module:
    """The module to train: ``DistributedDataParallel(module)`` on several ranks (``module``
    itself on one). DDP averages the gradients over the ranks in ``backward`` and broadcasts
    rank 0's parameters and buffers, so every rank's ``module`` (and an optimizer over its
    parameters, such as DHSPG over ``prog.module``) stays equal. Evaluate and export
    ``module``, not the wrapper.

    ``sync_bn``: normalise with the statistics of the global batch (torch's
    ``SyncBatchNorm``, CUDA only), through :func:`sync_batchnorm_view`; ``module`` keeps its
    BatchNorm modules, which fxprune's analyses and slim-model construction know.

    Raises:
        fxprune.UnsupportedInputError: ``sync_bn`` on a non-CUDA device.
    """
    if sync_bn and ctx.distributed and ctx.device.type != "cuda":
        raise UnsupportedInputError(
            "--sync-bn needs CUDA devices: torch's SyncBatchNorm synchronises GPU tensors only; on "
            f"{ctx.device.type} each process normalises its own share of the batch")
    if not ctx.distributed:
        return module
    target = sync_batchnorm_view(module) if sync_bn else module
    if ctx.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [ctx.device.index])
    return nn.parallel.DistributedDataParallel(target, **ddp_kwargs)


def sync_batchnorm_view(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule running ``gm``'s graph with every BatchNorm module replaced by a
    ``SyncBatchNorm`` that shares its parameters and running statistics (so training the view
    trains ``gm``). ``gm`` itself is left as it is. The other modules are shared."""
    from torch.nn.modules.batchnorm import _BatchNorm

    root = nn.Module()
    graph = copy.deepcopy(gm.graph)
    names: dict = {}

    def install(target: str, obj: Any) -> str:
        name = names.get(target)
        if name is None:
            name = "m_" + target.replace(".", "_")
            while hasattr(root, name):
                name += "_"
            names[target] = name
            if isinstance(obj, nn.Module):
                root.add_module(name, obj)
            elif isinstance(obj, nn.Parameter):
                root.register_parameter(name, obj)
            elif isinstance(obj, torch.Tensor):
                root.register_buffer(name, obj)
            else:
                setattr(root, name, obj)
        return name

    for node in graph.nodes:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
                m = _sync_bn(m)
            node.target = install(node.target, m)
        elif node.op == "get_attr":
            path, _, attr = node.target.rpartition(".")
            owner = gm.get_submodule(path) if path else gm
            node.target = install(node.target, getattr(owner, attr))
    view = torch.fx.GraphModule(root, graph, class_name=type(gm).__name__)
    view.train(gm.training)
    return view


def _sync_bn(bn: nn.Module) -> nn.SyncBatchNorm:
    """A SyncBatchNorm sharing ``bn``'s parameters and buffers."""
    sync = nn.SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    for name, p in bn.named_parameters(recurse=False):
        setattr(sync, name, p)
    for name, b in bn.named_buffers(recurse=False):
        setattr(sync, name, b)
    sync.train(bn.training)
    return sync


def sync_buffers(module: nn.Module, ctx: Context, src: int = 0) -> None:
    """Rank ``src``'s buffers (BatchNorm's running statistics) on every rank. DDP broadcasts
    them at the start of every forward, so after the last training forward each rank holds the
    statistics of its own share of the batch; call this before evaluating on several ranks, so
    that they evaluate the model rank 0 saves and exports."""
    if not ctx.distributed:
        return
    dist = _dist()
    for b in module.buffers():
        dist.broadcast(b, src=src)


# --------------------------------------------------------------------------------------------
# data


def per_rank_batch(global_batch: int, ctx: Context, accumulate: int = 1,
                   flag: str = "--batch-size") -> int:
    """Examples per rank and micro-batch: ``global_batch / (world_size * accumulate)``.

    Raises:
        fxprune.UnsupportedInputError: it does not divide evenly (names ``flag``).
    """
    parts = ctx.world_size * accumulate
    if global_batch % parts:
        how = f"{ctx.world_size} process(es)" + (f" x {accumulate} micro-batches" if accumulate > 1 else "")
        raise UnsupportedInputError(
            f"{flag} {global_batch} does not split evenly over {how}: give a multiple of {parts}")
    return global_batch // parts


def epoch_loader(dataset: Dataset, order: Sequence[int], global_batch: int, ctx: Context, *,
                 drop_last: bool = True, **loader_kwargs: Any) -> DataLoader:
    """The rank's loader of one epoch: examples in ``order``, ``global_batch`` per step over
    all ranks.

    One rank: ``DataLoader(dataset, batch_size=global_batch, sampler=order)``. Several:
    ``DistributedSampler`` (without its own shuffle) over ``Subset(dataset, order)`` and
    ``global_batch / world_size`` per rank: rank ``r`` takes positions ``r, r + N, ...``, so
    the ranks' batches ``b`` together hold positions ``b * global_batch .. (b + 1) *
    global_batch - 1`` of ``order``, the one-process batch ``b``. The sampler drops the tail
    that does not split evenly; ``drop_last`` drops a last incomplete batch, as in one process.
    """
    if not ctx.distributed:
        return DataLoader(dataset, batch_size=global_batch, sampler=list(order), drop_last=drop_last,
                          **loader_kwargs)
    from torch.utils.data.distributed import DistributedSampler

    per_rank = per_rank_batch(global_batch, ctx)
    ordered = Subset(dataset, list(order))
    sampler = DistributedSampler(ordered, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=False,
                                 drop_last=True)
    return DataLoader(ordered, batch_size=per_rank, sampler=sampler, drop_last=drop_last, **loader_kwargs)


def eval_shard(dataset: Dataset, ctx: Context) -> Dataset:
    """The rank's share of an evaluation set: examples ``rank, rank + N, ...`` (no padding, so
    counts summed with :meth:`Context.all_reduce_sum` are exact)."""
    if not ctx.distributed:
        return dataset
    return Subset(dataset, list(range(ctx.rank, len(dataset), ctx.world_size)))


# --------------------------------------------------------------------------------------------
# one optimizer step: accumulation and mixed precision


class GradientStep:
    """One optimizer step over ``accumulate`` micro-batches, in mixed precision if asked.

    Args:
        model: the module the forward runs through (a DDP wrapper or a plain module).
        optimizer: the optimizer (DHSPG, H2SPG or any ``torch.optim.Optimizer``).
        accumulate: micro-batches per optimizer step (``k``). Each micro-batch's loss is
            divided by ``k`` before ``backward``, so the accumulated gradient of ``k`` equal
            micro-batches is the gradient of their mean loss: the step of one ``k`` times
            larger batch. Under DDP the gradient all-reduce runs only on the last micro-batch
            (``no_sync`` on the others).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the forward runs under
            ``torch.autocast(device_type, dtype)``; parameters, gradients and the optimizer stay
            in their dtype (float32). ``"fp16"`` scales the loss with ``torch.amp.GradScaler``:
            ``scaler.step`` unscales the gradients before the optimizer sees them and skips
            ``optimizer.step()`` when they hold an inf or NaN (DHSPG's step counter, partition,
            projections and buffers are then untouched), and ``update`` lowers the scale. With
            sharded parameters (FSDP2) it is ``ShardedGradScaler``, which all-reduces the
            inf/NaN flag: a rank whose gradient block overflows makes every rank skip the step
            (one rank stepping alone would leave DHSPG's collectives unmatched).
        device: the device of the forward (its type picks the autocast and scaler device).

    Usage, per optimizer step::

        optimizer.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(step.split(x, y)):
            with step.forward(i):
                loss = loss_fn(model(x), y)
            step.backward(loss)           # after the block, outside autocast
        stepped = step.step()
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, accumulate: int = 1,
                 precision: str = "fp32", device: Any = "cpu") -> None:
        if int(accumulate) < 1:
            raise UnsupportedInputError(f"--accumulate must be at least 1, not {accumulate}")
        if precision not in PRECISIONS:
            raise UnsupportedInputError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.model = model
        self.optimizer = optimizer
        self.accumulate = int(accumulate)
        self.precision = precision
        self.device_type = torch.device(device).type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = None
        if precision == "fp16":
            from .optim._sharding import any_sharded

            if any_sharded(p for g in optimizer.param_groups for p in g["params"]):
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                self.scaler = ShardedGradScaler(self.device_type)
            else:
                self.scaler = torch.amp.GradScaler(self.device_type)
        #: optimizer steps the scaler skipped (inf/NaN gradients)
        self.skipped = 0

    def split(self, *tensors: torch.Tensor) -> List[tuple]:
        """``tensors`` (one batch, split along dim 0) as ``accumulate`` equal micro-batches.

        Raises:
            fxprune.UnsupportedInputError: the batch does not split evenly.
        """
        n = tensors[0].shape[0]
        k = self.accumulate
        if n % k:
            raise UnsupportedInputError(f"a batch of {n} examples does not split into --accumulate {k} "
                                        f"equal micro-batches")
        if k == 1:
            return [tensors]
        return list(zip(*(t.chunk(k) for t in tensors)))

    @contextlib.contextmanager
    def forward(self, index: int) -> Iterator[None]:
        """Context of micro-batch ``index``'s forward: autocast, and under DDP ``no_sync`` for
        every micro-batch but the last (DDP decides in the forward whether the following
        backward all-reduces). Call :meth:`backward` after the block: torch advises against
        running backward under autocast."""
        with contextlib.ExitStack() as stack:
            if index < self.accumulate - 1 and hasattr(self.model, "no_sync"):
                stack.enter_context(self.model.no_sync())
            if self.dtype is not None:
                stack.enter_context(torch.autocast(self.device_type, dtype=self.dtype))
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """``backward`` of ``loss / accumulate`` (scaled by the GradScaler under fp16)."""
        if self.accumulate > 1:
            loss = loss / self.accumulate
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def step(self) -> bool:
        """The optimizer step (through the GradScaler under fp16); returns whether it was taken
        (False when the scaler found inf/NaN gradients and skipped it)."""
        if self.scaler is None:
            self.optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # GradScaler lowers its scale exactly when it skipped the step (found inf/NaN)
        stepped = not self.scaler.get_scale() < scale
        self.skipped += not stepped
        return stepped

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped = int(state.get("skipped", 0))


# --------------------------------------------------------------------------------------------
# FSDP2: the slim model from sharded parameters


def program_template(prog: Any) -> Any:
    """A copy of ``prog`` (an ``fxprune.Program``) whose module holds no data: parameters and
    buffers on the meta device, graph and analyses copied. Make it before
    ``fully_shard(prog.module)`` (which replaces the module's parameters by ``DTensor``
    shards); :func:`construct_subnet` fills it with the gathered full state. It first runs
    ``prog.check_construction()``, which cannot run on sharded parameters."""
    from .program import Program

    prog.check_construction()  # needs the full parameters: frozen groups are then frozen in the copy too
    module = prog.module
    memo = {}
    for t in list(module.parameters()) + list(module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    skeleton = copy.deepcopy(module, memo)
    inputs = tuple(x.detach().cpu() if isinstance(x, torch.Tensor) else x for x in prog.example_inputs)
    return Program(skeleton, inputs, prog.pipeline, modes=prog.modes)


def _fsdp_module(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def root_unsharded(module: nn.Module) -> Iterator[None]:
    """FSDP2: the parameters of ``module``'s own FSDP unit gathered (``unshard``) for the block
    and sharded again after it; a collective. For code that runs ``module``'s submodules
    without calling ``module`` (a gated copy of its graph): the submodules that are FSDP units
    gather their own parameters when called, the root's are gathered here. A no-op for a
    module that is not an FSDP2 unit."""
    if not _fsdp_module(module):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def fsdp_root_ready(prog: Any) -> None:
    """FSDP2 takes the first unit whose forward runs as the root of the model. When
    ``prog.module`` is an FSDP2 unit, run it once on the program's example inputs (eval mode,
    no gradients, a collective), so that it is the root before any code calls its submodules on
    their own; a no-op otherwise."""
    module = prog.module
    if not _fsdp_module(module):
        return
    from fxprune.passes.modes import eval_mode

    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    inputs = [x.to(device) if isinstance(x, torch.Tensor) else x for x in prog.example_inputs]
    with torch.no_grad(), eval_mode(module):
        module(*inputs)


def full_state_dict(module: nn.Module) -> dict:
    """The full (unsharded) state dict of an FSDP2 module, on the CPU of rank 0 (empty on the
    other ranks); a collective: every rank calls it. ``torch.distributed.checkpoint``'s
    ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def construct_subnet(prog: Any, template: Any, *, state: Optional[dict] = None, verify: bool = True,
                     rtol: float = 1e-4) -> Optional[torch.fx.GraphModule]:
    """The slim model of a program trained with sharded parameters (FSDP2), built on rank 0.

    Gathers the full state (:func:`full_state_dict`; a collective, every rank calls this),
    loads it into a fresh copy of ``template`` (:func:`program_template` of ``prog``, made
    before sharding) on the CPU of rank 0, and runs ``Program.construct_subnet`` there
    (verified against the full model as usual). Buffers outside the state dict (non-persistent
    ones) come from ``prog.module``, which FSDP2 does not shard. ``state``: a full state dict
    already at hand (e.g. loaded from a ``torch.distributed.checkpoint`` directory with
    ``dcp_to_torch_save``); then nothing is gathered and any single process may call this.

    Returns the slim GraphModule on rank 0 (in a one-process call: always), None elsewhere.
    """
    from .program import Program

    dist = _dist()
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if state is None:
        state = full_state_dict(prog.module)
    if rank != 0:
        return None
    module = copy.deepcopy(template.module)
    module.load_state_dict(state, strict=False, assign=True)
    live = dict(prog.module.named_buffers())
    for name, buf in list(module.named_buffers()):
        if buf.is_meta and name in live:
            path, _, attr = name.rpartition(".")
            owner = module.get_submodule(path) if path else module
            owner._buffers[attr] = live[name].detach().cpu().clone()
    missing = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if missing:
        raise UnsupportedInputError(f"the gathered state has no value for {', '.join(missing[:5])}"
                                    f"{' ...' if len(missing) > 5 else ''}")
    full = Program(module, template.example_inputs, template.pipeline, modes=template.modes)
    return full.construct_subnet(verify=verify, rtol=rtol)
