"""Settings of ``fxprune train`` (and ``fxprune export``'s defaults) and their checks; imports nothing heavy (no torch), so that the
command line parses and validates its flags before any library, data or model is loaded.

:class:`TrainConfig` holds everything that determines a run's result, :class:`RunOptions` what
does not. Every setting is checked by the function of its flag group below, each registered with
:func:`check` and raising :class:`fxprune.errors.ConfigError` that names the flag
(``--target-group-sparsity must be in [0, 1), not 1.5``). A new flag is added with its field
here, its ``opt(...)`` line in :mod:`fxprune.cli`, and a line in its group's check (or a new
``@check`` function).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

from .errors import ConfigError


@dataclass
class TrainConfig:
    """Everything that determines a run's result. Epoch counts may be fractional."""

    model: str = "resnet18"
    dataset: str = "digits"
    epochs: int = 6
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    lr_decay_epochs: List[float] = field(default_factory=lambda: [4.5])
    lr_decay: float = 0.1
    target_group_sparsity: float = 0.5
    start_pruning_epoch: float = 1.0
    pruning_epochs: float = 1.5
    epsilon: float = 0.0
    seed: int = 0
    image_size: int = 32
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    mode: str = "prune"  # "prune": DHSPG zeroes channels; "erase": H2SPG erases whole operators (OTOv3)
    method: str = "dhspg"  # "dhspg" (OTOv2; H2SPG in erase mode) or "ato" (Auto-Train-Once)
    target_flops: float = 0.5  # ATO: kept fraction of the full model's FLOPs
    held_out_fraction: float = 0.05  # ATO: share of the training set the controller trains on
    accumulate: int = 1  # micro-batches per optimizer step (gradient accumulation)
    precision: str = "fp32"  # "fp32", "bf16" or "fp16" (autocast; fp16 with a GradScaler)
    sync_bn: bool = False  # SyncBatchNorm over the processes of a torchrun job (CUDA)


# fxprune export's formats and default tolerances (see fxprune.export)
EXPORT_FORMATS = ("onnx", "pt2")
EXPORT_RTOL = 1e-4
EXPORT_ATOL = 1e-5

# Settings a resumed run may change; every other one must match the checkpoint.
RESUMABLE_OVERRIDES = ("epochs",)


@dataclass
class RunOptions:
    """Settings that do not change a run's result."""

    out: Optional[str] = None
    resume: Optional[str] = None  # a checkpoint path, or "" for OUT's latest
    num_workers: int = 0
    device: Optional[str] = None
    progress: bool = True
    overwrite: bool = False  # a fresh run may replace the checkpoints and report already in OUT


def default_out(config: TrainConfig) -> str:
    """``runs/<dataset>-<model>``, e.g. ``runs/digits-resnet18``."""
    def clean(s: str) -> str:
        s = os.path.basename(os.path.normpath(s)) or s
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)
    return os.path.join("runs", f"{clean(config.dataset)}-{clean(config.model.split(':')[-1])}")


# Files a run writes into OUT (``--overwrite`` removes exactly these).
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILES = ("last.pt", "prev.pt")
SLIM_DIR = "slim"
SLIM_FILES = ("module.py", "graph.json", "model.safetensors")
REPORT_FILE = "report.json"


def previous_run(out: str) -> List[str]:
    """The files of an earlier run in ``out`` (checkpoints, report, slim model)."""
    paths = [os.path.join(out, CHECKPOINT_DIR, f) for f in CHECKPOINT_FILES]
    paths += [os.path.join(out, REPORT_FILE)] + [os.path.join(out, SLIM_DIR, f) for f in SLIM_FILES]
    return [p for p in paths if os.path.exists(p)]


# --------------------------------------------------------------------------------------------
# checks, one function per flag group

CHECKS: List[Callable[[TrainConfig, RunOptions], None]] = []


def check(fn: Callable[[TrainConfig, RunOptions], None]) -> Callable[[TrainConfig, RunOptions], None]:
    """Register a check of a group of settings (run by :func:`validate`, in order)."""
    CHECKS.append(fn)
    return fn


def flag(name: str) -> str:
    """The command-line flag of a setting: ``target_group_sparsity`` -> ``--target-group-sparsity``."""
    return "--" + name.replace("_", "-")


def require(ok: bool, name: str, what: str, value: Any) -> None:
    """Raise ConfigError ``--<name> must <what>, not <value>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{flag(name)} must {what}, not {value!r}", flag(name))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(config: TrainConfig, options: Optional[RunOptions] = None) -> None:
    """Run every registered check; the first failing one raises ConfigError naming its flag."""
    options = options or RunOptions()
    for fn in CHECKS:
        fn(config, options)


@check
def _schedule(c: TrainConfig, o: RunOptions) -> None:
    require(_integer(c.epochs) and c.epochs >= 1, "epochs", "be an integer of at least 1", c.epochs)
    require(_integer(c.batch_size) and c.batch_size >= 1, "batch_size", "be an integer of at least 1", c.batch_size)
    require(_number(c.lr) and c.lr > 0, "lr", "be a positive number", c.lr)
    require(c.optimizer in ("sgd", "adam", "adamw"), "optimizer", "be sgd, adam or adamw", c.optimizer)
    require(_number(c.momentum) and 0 <= c.momentum < 1, "momentum", "be in [0, 1)", c.momentum)
    require(_number(c.weight_decay) and c.weight_decay >= 0, "weight_decay", "be at least 0", c.weight_decay)
    require(_number(c.warmup_epochs) and c.warmup_epochs >= 0, "warmup_epochs", "be at least 0", c.warmup_epochs)
    require(isinstance(c.lr_decay_epochs, (list, tuple)) and all(_number(e) and e >= 0 for e in c.lr_decay_epochs),
            "lr_decay_epochs", "be epochs of at least 0, separated by commas", c.lr_decay_epochs)
    require(_number(c.lr_decay) and 0 < c.lr_decay <= 1, "lr_decay", "be in (0, 1]", c.lr_decay)
    require(_integer(c.seed) and c.seed >= 0, "seed", "be an integer of at least 0", c.seed)


@check
def _pruning(c: TrainConfig, o: RunOptions) -> None:
    require(c.mode in ("prune", "erase"), "mode", "be prune or erase", c.mode)
    require(c.method in ("dhspg", "ato"), "method", "be dhspg or ato", c.method)
    require(_number(c.target_group_sparsity) and 0 <= c.target_group_sparsity < 1, "target_group_sparsity",
            "be in [0, 1)", c.target_group_sparsity)
    require(_number(c.start_pruning_epoch) and c.start_pruning_epoch >= 0, "start_pruning_epoch",
            "be at least 0", c.start_pruning_epoch)
    require(_number(c.pruning_epochs) and c.pruning_epochs > 0, "pruning_epochs", "be positive", c.pruning_epochs)
    require(_number(c.epsilon) and 0 <= c.epsilon < 1, "epsilon", "be in [0, 1)", c.epsilon)


@check
def _ato(c: TrainConfig, o: RunOptions) -> None:
    if c.method != "ato":
        return
    if c.mode != "prune":
        raise ConfigError("--method ato prunes channels; it does not combine with --mode erase", "--method")
    require(_number(c.target_flops) and 0 < c.target_flops < 1, "target_flops", "be in (0, 1)", c.target_flops)
    require(_number(c.held_out_fraction) and 0 < c.held_out_fraction < 1, "held_out_fraction", "be in (0, 1)",
            c.held_out_fraction)


PRECISIONS = ("fp32", "bf16", "fp16")


@check
def _steps(c: TrainConfig, o: RunOptions) -> None:
    require(_integer(c.accumulate) and c.accumulate >= 1, "accumulate", "be an integer of at least 1", c.accumulate)
    require(c.precision in PRECISIONS, "precision", f"be one of {', '.join(PRECISIONS)}", c.precision)
    require(isinstance(c.sync_bn, bool), "sync_bn", "be a flag", c.sync_bn)


@check
def _data(c: TrainConfig, o: RunOptions) -> None:
    require(_integer(c.image_size) and 1 <= c.image_size <= 4096, "image_size", "be an integer in [1, 4096]",
            c.image_size)
    for name in ("train_subset", "test_subset"):
        v = getattr(c, name)
        require(v is None or (_integer(v) and v >= 1), name, "be an integer of at least 1", v)
    if c.dataset != "digits" and not os.path.isdir(c.dataset):
        raise ConfigError(f"--dataset must be 'digits' or an ImageFolder directory; {c.dataset!r} is "
                          f"{'a file' if os.path.exists(c.dataset) else 'not there'}", "--dataset")


@check
def _model(c: TrainConfig, o: RunOptions) -> None:
    name = c.model
    if not isinstance(name, str) or not name or name.count(":") > 1 or name.startswith(":") or name.endswith(":"):
        raise ConfigError(f"--model must be a torchvision model name or module:factory, not {name!r}", "--model")


@check
def _run(c: TrainConfig, o: RunOptions) -> None:
    require(_integer(o.num_workers) and o.num_workers >= 0, "num_workers", "be an integer of at least 0",
            o.num_workers)
    if o.resume is not None and o.overwrite:
        raise ConfigError("--resume continues the run in OUT and --overwrite replaces it: give one of them",
                          "--overwrite")
    if o.out is not None and os.path.exists(o.out) and not os.path.isdir(o.out):
        raise ConfigError(f"--out {o.out!r} is a file, not a directory", "--out")
    if o.resume is None and not o.overwrite:
        out = o.out or default_out(c)
        found = previous_run(out)
        if found:
            raise ConfigError(f"--out {out} already holds a run ({', '.join(os.path.relpath(p, out) for p in found)}); "
                              f"pass --resume to continue it or --overwrite to replace it", "--out")
