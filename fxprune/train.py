"""``fxprune train``: train a network from scratch with DHSPG, then export the slim model.

One run: build the model and the data (:mod:`fxprune.models`, :mod:`fxprune.data`), compile
it (``fxprune.compile``), train ``prog.module`` with ``fxprune.DHSPG`` (the dense baseline is
the same run with ``target_group_sparsity=0``; ``mode="erase"`` uses ``fxprune.H2SPG``;
``method="ato"`` trains with the plain base update while ``fxprune.ATO``'s controller learns
the masks on a held-out share of the training set), write a checkpoint after every epoch, and
at the end construct the slim model, compare it with the trained full model on the test set,
save it with :func:`fxprune.io.save` and write ``report.json``.

Checkpoints (``OUT/checkpoints/last.pt`` and the one before it, ``prev.pt``) hold the model and
optimizer states, the epoch, the history and every random state (torch, numpy, python, and the
generator that orders the data). A checkpoint is written to a temporary file in the same
directory, flushed to disk, and renamed over the old one, so a crash never leaves a half-written
``last.pt``; it carries a SHA-256 digest of its contents, so a damaged file is detected on load
and raises :class:`fxprune.errors.CheckpointError` instead of resuming from garbage. A resumed
run ends in the same bits as an uninterrupted one: the order of epoch ``e`` is drawn from a
generator seeded with ``(seed, e)`` and the learning-rate and pruning schedules are functions of
the absolute step, not of ``--epochs``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import random
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import data as data_lib
from . import distributed as dist_lib
from . import models as model_lib
from .errors import CheckpointError, ConfigError

CHECKPOINT_FORMAT = "fxprune-train-checkpoint"
CHECKPOINT_VERSION = 1
LAST = "last.pt"
PREV = "prev.pt"


# The settings live in fxprune.config (no torch import there, for the command line).
from .config import (RESUMABLE_OVERRIDES, RunOptions, TrainConfig, default_out,  # noqa: E402,F401
                     previous_run, validate)


# --------------------------------------------------------------------------------------------
# schedules


def lr_at(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up over
    ``warmup_epochs``, then multiplied by ``lr_decay`` at each of ``lr_decay_epochs``."""
    epoch = step / steps_per_epoch
    lr = config.lr * config.lr_decay ** sum(1 for e in config.lr_decay_epochs if epoch >= e)
    if config.warmup_epochs > 0 and epoch < config.warmup_epochs:
        lr *= (step + 1) / (config.warmup_epochs * steps_per_epoch)
    return lr


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps per epoch: full batches only, or one batch of all when that is less."""
    return max(1, n_train // batch_size)


# --------------------------------------------------------------------------------------------
# random states


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(data_generator: torch.Generator) -> Dict[str, Any]:
    """Every random state a run consumes, in types ``torch.load(weights_only=True)`` reads."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
        "data": data_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any], data_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    random.setstate(_tuples(state["python"]))
    data_generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(state: Dict[str, Any], directory: str) -> str:
    """Write ``state`` as ``directory/last.pt`` atomically, keeping the old one as prev.pt."""
    os.makedirs(directory, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
               "sha256": _digest(state), "state": state}
    fd, tmp = tempfile.mkstemp(prefix=".last-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        last = os.path.join(directory, LAST)
        if os.path.exists(last):
            os.replace(last, os.path.join(directory, PREV))
        os.replace(tmp, last)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)
    return last


def load_checkpoint(path: str) -> Dict[str, Any]:
    """The state saved by :func:`save_checkpoint` at ``path``; CheckpointError if it is
    missing, truncated, corrupt or not a checkpoint of this format."""
    hint = _previous_hint(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}.{hint}")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols concern its own API
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        # torch's own message advises loading with weights_only=False, which would run the
        # file's pickled code: it is not passed on, not even as the cause
        raise CheckpointError(f"checkpoint {path} cannot be read; it is truncated or corrupt "
                              f"({_unreadable(path, e)}).{hint}") from None
    if not (isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT):
        raise CheckpointError(f"{path} is not an fxprune training checkpoint.{hint}")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has version {payload.get('version')}; this "
                              f"fxprune reads version {CHECKPOINT_VERSION}.{hint}")
    state = payload.get("state")
    if _digest(state) != payload.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match the "
                              f"digest written with them.{hint}")
    return state


def _unreadable(path: str, error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` could not read a checkpoint, in fxprune's words."""
    if os.path.getsize(path) == 0:
        return "the file is empty"
    if isinstance(error, pickle.UnpicklingError):
        return "it holds objects other than the tensors and plain values a checkpoint holds"
    if "zip" in str(error) or "PytorchStreamReader" in str(error):
        return f"it is not a complete checkpoint archive ({os.path.getsize(path)} bytes)"
    return type(error).__name__


def resume_path(out: str) -> str:
    """The checkpoint ``--resume`` continues from: ``last.pt``, or ``prev.pt`` when a crash
    between the two renames of :func:`save_checkpoint` left no ``last.pt``."""
    ckpt_dir = os.path.join(out, "checkpoints")
    last, prev = os.path.join(ckpt_dir, LAST), os.path.join(ckpt_dir, PREV)
    if not os.path.exists(last) and os.path.exists(prev):
        return prev
    return last


def _previous_hint(path: str) -> str:
    directory, name = os.path.split(path)
    prev = os.path.join(directory, PREV)
    if name == LAST and os.path.isfile(prev):
        return f" The previous checkpoint {prev} is kept; resume from it with --resume {prev}"
    return ""


def _digest(obj: Any) -> str:
    """SHA-256 over a nested structure of tensors and primitives, in traversal order."""
    h = hashlib.sha256()

    def walk(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(o.shape)};".encode())
            h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
        elif isinstance(o, dict):
            h.update(f"D{len(o)};".encode())
            for k, v in o.items():
                walk(k)
                walk(v)
        elif isinstance(o, (list, tuple)):
            h.update(f"L{len(o)};".encode())
            for v in o:
                walk(v)
        else:
            h.update(f"{type(o).__name__}:{o!r};".encode())

    walk(obj)
    return h.hexdigest()


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def resume_config(saved: Dict[str, Any], given: Dict[str, Any]) -> TrainConfig:
    """The config of a resumed run: the checkpoint's, with ``epochs`` replaced when given.
    Any other given setting that differs from the checkpoint's is an error."""
    config = TrainConfig(**saved)
    for k, v in given.items():
        if k == "epochs" and config.method == "ato" and v != config.epochs:
            raise ConfigError(f"--epochs cannot change: the checkpoint is an ATO run of {config.epochs} "
                              f"epochs, whose schedule is laid out over the whole run", "--epochs")
        if k in RESUMABLE_OVERRIDES:
            setattr(config, k, v)
        elif _normalized(v) != _normalized(saved.get(k)):
            raise ConfigError(f"--{k.replace('_', '-')} cannot change on --resume: the checkpoint was "
                              f"trained with {saved.get(k)!r}, not {v!r} (only "
                              f"{', '.join('--' + r for r in RESUMABLE_OVERRIDES)} may change)",
                              f"--{k.replace('_', '-')}")
    return config


def _normalized(v):
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else v


# --------------------------------------------------------------------------------------------
# the run


def train(config: TrainConfig, options: Optional[RunOptions] = None,
          given: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run training as configured; returns the report (also written to OUT/report.json).

    ``given``: with ``options.resume``, the settings the user passed explicitly; they are
    checked against (or, for ``epochs``, applied to) the checkpoint's config.

    Launched by ``torchrun --nproc_per_node N``, every process runs this: the model trains
    under DistributedDataParallel, each process on ``batch_size / N`` examples of every
    global batch (:mod:`fxprune.distributed`); rank 0 prints, writes the checkpoints, the slim
    model and the report, which every rank returns."""
    options = options or RunOptions()
    ctx = dist_lib.init(None if options.device is None else str(_device(options.device)))  # --device checked first
    ok = False
    try:
        report = _train(config, options, given, ctx)
        ok = True
        return report
    finally:
        dist_lib.shutdown(ctx, wait=ok)


def _train(config: TrainConfig, options: Optional[RunOptions], given: Optional[Dict[str, Any]],
           ctx: dist_lib.Context) -> Dict[str, Any]:
    import fxprune
    from tqdm.auto import tqdm

    options = options or RunOptions()
    t_start, c_start = time.perf_counter(), time.process_time()
    ckpt = None
    out = options.out
    if options.resume is not None:
        path = options.resume or resume_path(out or default_out(config))
        ckpt = load_checkpoint(path)
        config = resume_config(ckpt["config"], given or {})
        out = out or os.path.dirname(os.path.dirname(os.path.abspath(path)))
    out = out or default_out(config)
    validate(config, options)  # a resumed run's settings, from its checkpoint, are checked too
    model_lib.check_name(config.model)
    if options.overwrite:
        ctx.on_main(_remove_previous_run, out)
    device = ctx.device
    per_rank = dist_lib.per_rank_batch(config.batch_size, ctx, config.accumulate)

    splits = data_lib.load(config.dataset, config.image_size, config.train_subset,
                           config.test_subset)
    # Seeded after loading the data, whose first use imports libraries that draw from
    # Python's global generator.
    seed_everything(config.seed)
    model = model_lib.build(config.model, splits.num_classes, splits.in_channels,
                            config.image_size).to(device)
    example = (splits.train[0][0].unsqueeze(0).to(device),)
    model.eval()  # tracing runs the model once; eval keeps BatchNorm statistics untouched
    prog = fxprune.compile(model, example, mode=config.mode)
    net = prog.module
    train_model = dist_lib.wrap(net, ctx, sync_bn=config.sync_bn)  # DDP on several processes
    train_set, ato = splits.train, None
    if config.method == "ato":
        from .ato import held_out_split
        train_set, held_out = held_out_split(splits.train, config.held_out_fraction, config.seed)
    spe = steps_per_epoch(len(train_set), config.batch_size)
    # ATO trains the model with the plain base update (DHSPG without a target).
    target = 0.0 if config.method == "ato" else config.target_group_sparsity
    opt = (fxprune.H2SPG if config.mode == "erase" else fxprune.DHSPG)(
        prog, lr=config.lr, variant=config.optimizer, momentum=config.momentum,
        weight_decay=config.weight_decay, target_group_sparsity=target,
        start_pruning_step=round(config.start_pruning_epoch * spe),
        pruning_steps=max(1, round(config.pruning_epochs * spe)), epsilon=config.epsilon)
    if config.method == "ato":
        # A short run has few controller steps: one per model step, at a raised learning
        # rate (see fxprune.ato). The held-out stream is unshuffled so a resumed run
        # continues it exactly.
        ato = fxprune.ATO(prog, config.target_flops, total_steps=config.epochs * spe,
                          controller_every=1, controller_lr=1e-2, seed=config.seed,
                          controller_data=DataLoader(dist_lib.eval_shard(held_out, ctx),
                                                     batch_size=max(1, 64 // ctx.world_size),
                                                     num_workers=options.num_workers))
    stepper = dist_lib.GradientStep(train_model, opt, accumulate=config.accumulate,
                                    precision=config.precision, device=device)
    data_gen = torch.Generator()
    start_epoch, history = 0, []
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if ato is not None:
            ato.load_state_dict(ckpt["ato"])
        if "grad_step" in ckpt:
            stepper.load_state_dict(ckpt["grad_step"])
        set_rng_state(_rank_rng(ckpt, ctx), data_gen)
        start_epoch, history = int(ckpt["epoch"]), list(ckpt["history"])
    pruning_end = config.start_pruning_epoch + config.pruning_epochs
    if target > 0 and config.epochs < pruning_end and ctx.is_main:
        print(f"warning: pruning ends at epoch {pruning_end:g} but the run stops after "
              f"{config.epochs}; the sparsity target will not be reached")

    loader_kw = dict(num_workers=options.num_workers, drop_last=len(train_set) >= config.batch_size)
    test_loader = DataLoader(splits.test, batch_size=256, num_workers=options.num_workers)
    # each process evaluates its share of the test set; the counts are summed
    test_shard = DataLoader(dist_lib.eval_shard(splits.test, ctx), batch_size=256,
                            num_workers=options.num_workers)
    for epoch in range(start_epoch, config.epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        order = data_lib.epoch_order(len(train_set), data_gen, config.seed, epoch)
        loader = dist_lib.epoch_loader(train_set, order, config.batch_size, ctx, **loader_kw)
        net.train()
        seen = correct = 0
        loss_sum = 0.0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not (options.progress and ctx.is_main), dynamic_ncols=True, leave=True)
        sparsity = _sparsity(opt, ato)
        for i, (x, y) in enumerate(bar):
            x, y = x.to(device), y.to(device)
            lr = lr_at(config, epoch * spe + i, spe)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            for j, (xm, ym) in enumerate(stepper.split(x, y)):
                with stepper.forward(j):
                    logits = train_model(xm)
                    loss = F.cross_entropy(logits, ym)
                stepper.backward(loss)
                seen += ym.numel()
                correct += int((logits.argmax(1) == ym).sum())
                loss_sum += loss.item() * ym.numel()
            stepper.step()
            if ato is not None:
                ato.step(opt)
            if i % 10 == 9 or i == len(loader) - 1:
                sparsity = _sparsity(opt, ato)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                            gs=f"{sparsity:.3f}", lr=f"{lr:.3g}")
        bar.close()
        loss_sum, correct, seen = ctx.all_reduce_sum([loss_sum, correct, seen])
        dist_lib.sync_buffers(net, ctx)  # rank 0's BatchNorm statistics, the ones it saves
        test_acc, _ = evaluate(net, test_shard, device, ctx)
        metrics = opt.metrics()
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                        "train_accuracy": 100 * correct / max(seen, 1), "test_accuracy": test_acc,
                        "group_sparsity": metrics["group_sparsity"],
                        "zero_channels": metrics["zero_channels"], "lr": lr,
                        "seconds": time.perf_counter() - t0,
                        "cpu_seconds": time.process_time() - c0})
        if ctx.is_main:
            print(f"epoch {epoch + 1}/{config.epochs}: loss {loss_sum / max(seen, 1):.4f}  "
                  f"train {100 * correct / max(seen, 1):.2f}%  test {test_acc:.2f}%  "
                  f"group sparsity {metrics['group_sparsity']:.3f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        state = {"epoch": epoch + 1, "config": dataclasses.asdict(config),
                 "model": net.state_dict(), "optimizer": opt.state_dict(),
                 "rng": rng_state(data_gen), "history": history}
        if ato is not None:
            state["ato"] = ato.state_dict()
        if stepper.scaler is not None:
            state["grad_step"] = stepper.state_dict()
        if ctx.distributed:  # every rank's random state, for a bit-identical resume
            state["world_size"] = ctx.world_size
            state["rng_ranks"] = ctx.all_gather_object(state["rng"])
        ctx.on_main(save_checkpoint, state, os.path.join(out, "checkpoints"))

    # rank 0 builds, checks and saves the slim model on the whole test set
    report = ctx.on_main(finish, prog, opt, splits, test_loader, example, config, out, history, device, ato)
    if ctx.is_main:
        report["world_size"] = ctx.world_size
        report["per_process_batch_size"] = per_rank
        report["skipped_steps"] = stepper.skipped
        report["wall_time_s"] = {"train": sum(h["seconds"] for h in history),
                                 "this_invocation": time.perf_counter() - t_start}
        report["cpu_time_s"] = {"train": sum(h["cpu_seconds"] for h in history),
                                "this_invocation": time.process_time() - c_start}
        _write_json(os.path.join(out, "report.json"), report)
        print(summary_table(report, out))
    return ctx.broadcast_object(report)


def _rank_rng(ckpt: Dict[str, Any], ctx: dist_lib.Context) -> Dict[str, Any]:
    """The random state this rank resumes from: its own when the checkpoint was written by as
    many processes, else rank 0's (the run then continues, not bit-identical to one that was
    not interrupted)."""
    saved = int(ckpt.get("world_size", 1))
    if saved == ctx.world_size:
        return ckpt["rng_ranks"][ctx.rank] if "rng_ranks" in ckpt else ckpt["rng"]
    if ctx.is_main:
        print(f"warning: the checkpoint was written by {saved} process(es), this run has "
              f"{ctx.world_size}; it continues with rank 0's random state and is not bit-identical "
              f"to an uninterrupted run")
    return ckpt["rng"]


@torch.no_grad()
def evaluate(net: torch.nn.Module, loader: DataLoader, device,
             ctx: Optional[dist_lib.Context] = None) -> Tuple[float, torch.Tensor]:
    """Test accuracy (%) of ``net`` in eval mode and its logits, in loader order. With ``ctx``
    each process passes its share of the test set (:func:`fxprune.distributed.eval_shard`);
    the accuracy counts every share, the logits are this process's."""
    was_training = net.training
    net.eval()
    outs, labels = [], []
    for x, y in loader:
        outs.append(net(x.to(device)).float().cpu())
        labels.append(y)
    net.train(was_training)
    logits, labels = torch.cat(outs), torch.cat(labels)
    correct, n = int((logits.argmax(1) == labels).sum()), len(labels)
    if ctx is not None:
        correct, n = ctx.all_reduce_sum([correct, n])
    return 100.0 * correct / max(n, 1), logits


def finish(prog, opt, splits, test_loader, example, config: TrainConfig, out: str,
           history: List[dict], device, ato=None) -> Dict[str, Any]:
    """Construct, compare and save the slim model; returns the report without wall times.
    With ATO, its frozen masks are hard-zeroed first (:meth:`fxprune.ATO.finalize`)."""
    import fxprune
    from . import io

    net = prog.module
    net.eval()
    slim = ato.finalize() if ato is not None else prog.construct_subnet()
    slim.eval()
    full_acc, full_logits = evaluate(net, test_loader, device)
    slim_acc, slim_logits = evaluate(slim, test_loader, device)
    sizes = fxprune.report(net, slim, example)
    io.save(slim.cpu(), os.path.join(out, "slim"))
    slim.to(device)
    metrics = opt.metrics()
    return {
        "config": dataclasses.asdict(config),
        "accuracy": {"full": full_acc, "slim": slim_acc, "equal": full_acc == slim_acc},
        "max_abs_output_diff": float((full_logits - slim_logits).abs().max()),
        "params": {"full": sizes["params_full"], "slim": sizes["params_slim"]},
        "flops": {"full": sizes["flops_full"], "slim": sizes["flops_slim"]},
        "group_sparsity": metrics["group_sparsity"],
        "zero_channels": metrics["zero_channels"],
        "prunable_channels": metrics["prunable_channels"],
        **({"erased_operators": metrics["erased_units"], "erasable_operators": metrics["units"]}
           if config.mode == "erase" else {}),
        **({"ato": ato.summary()} if ato is not None else {}),
        "test_examples": len(splits.test),
        "history": history,
        "slim_dir": os.path.join(out, "slim"),
        "device": str(device),
        "fused_optimizer_kernels": bool(getattr(opt, "fused", False)),
        "torch": torch.__version__,
    }


def summary_table(report: Dict[str, Any], out: str) -> str:
    p, f, a = report["params"], report["flops"], report["accuracy"]

    def cut(full, slim):
        return f"-{100 * (1 - slim / full):.1f}%" if full else ""

    rows = [("", "full", "slim", "change"),
            ("test accuracy (%)", f"{a['full']:.2f}", f"{a['slim']:.2f}",
             f"{a['slim'] - a['full']:+.2f}"),
            ("params (M)", f"{p['full'] / 1e6:.3f}", f"{p['slim'] / 1e6:.3f}",
             cut(p["full"], p["slim"])),
            ("FLOPs (M)", f"{f['full'] / 1e6:.1f}", f"{f['slim'] / 1e6:.1f}",
             cut(f["full"], f["slim"]))]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                       for i, c in enumerate(r)) for r in rows]
    sparsity = (f"erased operators {report['erased_operators']}/{report['erasable_operators']}"
                if "erased_operators" in report else f"group sparsity {report['group_sparsity']:.3f} "
                f"({report['zero_channels']}/{report['prunable_channels']} channels)")
    if "ato" in report:
        sparsity += (f", ATO FLOPs kept {f['slim'] / f['full']:.3f} "
                     f"(target {report['ato']['target_flops_ratio']:g})")
    lines += [f"{sparsity}, max |full - slim| output {report['max_abs_output_diff']:.2e}",
              f"training {report['wall_time_s']['train']:.0f} s wall, "
              f"{report['cpu_time_s']['train']:.0f} s CPU; slim model in "
              f"{report['slim_dir']}, report in {os.path.join(out, 'report.json')}"]
    return "\n".join(lines)


def _sparsity(opt, ato) -> float:
    """Group sparsity shown by the progress bar: zero channels (DHSPG, H2SPG), or the
    share of channels the controller's current mask switches off (ATO)."""
    if ato is None:
        return opt.metrics()["group_sparsity"]
    mask = ato.current_mask()
    return 1.0 - float(mask.float().mean())


def _device(name: Optional[str]) -> torch.device:
    """``--device``: the named torch device (cuda when available by default)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"--device must be a torch device such as cpu or cuda:0, not {name!r}", "--device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine", "--device")
    return device


def _remove_previous_run(out: str) -> None:
    """``--overwrite``: delete the files of the run in ``out`` (rank 0 of a torchrun job)."""
    for path in previous_run(out):
        os.remove(path)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)
