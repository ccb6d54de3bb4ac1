"""Command line: ``fxprune train ...`` and ``fxprune export ...`` (also ``python -m fxprune ...``).

With no options, ``fxprune train`` trains a CIFAR-style ResNet-18 from scratch on
scikit-learn's bundled digits with DHSPG at group sparsity 0.5, a few minutes on two CPU cores,
and writes the slim model and report.json to ``runs/digits-resnet18``. Add
``--target-group-sparsity 0`` for the dense baseline.

``fxprune export SLIM_DIR OUT_PATH --input-shape 1,3,32,32`` writes a slim model saved by
``fxprune.io.save`` as an ONNX file or a torch.export program and checks the file's outputs
against the model's (:func:`fxprune.export.export`).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import List, Optional

# Nothing here imports torch: `fxprune train -h` answers at once, and the flags are checked
# (fxprune.config) before any library, data or model is loaded. The work is imported after.
from .config import EXPORT_ATOL as ATOL, EXPORT_FORMATS as FORMATS, EXPORT_RTOL as RTOL
from .config import RunOptions, TrainConfig, validate
from .errors import ConfigError, DatasetError, FxPruneError

_DEFAULTS = TrainConfig()
TASKS = ("image-classification", "causal-lm")

USAGE_ERROR = 2  # bad flags or data: one line on stderr, as argparse's own errors


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``fxprune train: error: argument --epochs: ... (see -h)``."""

    def error(self, message):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def _epochs_list(text: str) -> List[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxprune", description="fxprune: train once, get an exact slim network.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser(
        "train", help="train with DHSPG (or H2SPG, ATO) and export the slim model",
        description="Train a model from scratch with the DHSPG optimizer (H2SPG with --mode "
        "erase, Auto-Train-Once with --method ato), construct the slim model, save it and write "
        "OUT/report.json. Defaults: the digits/ResNet-18 demo.")
    d = _DEFAULTS
    p.add_argument("--task", choices=TASKS, default=TASKS[0], help="image-classification (the options below) or "
                   "causal-lm (a language model on the standard library's sources; see fxprune train --task "
                   "causal-lm --help) (default: image-classification)")

    def opt(flag, type_, default, help_, **kw):
        # None marks "not given", so that a resumed run can tell given settings from defaults.
        p.add_argument(flag, type=type_, default=None, help=f"{help_} (default: {default})", **kw)

    opt("--model", str, d.model, "torchvision classification model name, or module:factory "
        "(e.g. fxprune.models:tiny_resnet)")
    opt("--dataset", str, d.dataset, "'digits' (scikit-learn, bundled) or an ImageFolder path")
    opt("--epochs", int, d.epochs, "training epochs")
    opt("--batch-size", int, d.batch_size, "batch size (under torchrun: the global batch, split "
        "evenly over the processes)")
    opt("--lr", float, d.lr, "peak learning rate")
    opt("--optimizer", str, d.optimizer, "DHSPG base update", choices=("sgd", "adam", "adamw"))
    opt("--momentum", float, d.momentum, "SGD momentum")
    opt("--weight-decay", float, d.weight_decay, "weight decay")
    opt("--warmup-epochs", float, d.warmup_epochs, "linear learning-rate warm-up")
    opt("--lr-decay-epochs", _epochs_list, ",".join(f"{e:g}" for e in d.lr_decay_epochs),
        "epochs at which the learning rate is multiplied by --lr-decay (comma separated)")
    opt("--lr-decay", float, d.lr_decay, "learning-rate decay factor")
    opt("--target-group-sparsity", float, d.target_group_sparsity,
        "fraction of prunable channels driven to zero; 0 trains the dense baseline")
    opt("--start-pruning-epoch", float, d.start_pruning_epoch, "epoch at which DHSPG partitions "
        "the channels and starts pruning")
    opt("--pruning-epochs", float, d.pruning_epochs, "epochs over which DHSPG reaches the target")
    opt("--epsilon", float, d.epsilon, "DHSPG half-space epsilon")
    opt("--mode", str, d.mode, "prune: DHSPG zeroes channels; erase: H2SPG erases whole operators "
        "(OTOv3; e.g. --model fxprune.supernet:darts_supernet)", choices=("prune", "erase"))
    opt("--method", str, d.method, "dhspg: DHSPG drives channels to zero (H2SPG in erase mode); "
        "ato: Auto-Train-Once, a controller network learns channel masks under a FLOPs budget",
        choices=("dhspg", "ato"))
    opt("--target-flops", float, d.target_flops, "ATO: kept fraction of the full model's FLOPs")
    opt("--held-out-fraction", float, d.held_out_fraction, "ATO: share of the training set held "
        "out for the controller")
    opt("--seed", int, d.seed, "random seed (model initialisation and data order)")
    opt("--image-size", int, d.image_size, "input images are resized to this square size")
    opt("--accumulate", int, d.accumulate, "micro-batches per optimizer step (gradient accumulation): "
        "each --batch-size batch is split into this many, and the step sees their mean gradient")
    opt("--precision", str, d.precision, "fp32, or mixed precision: bf16 or fp16 autocast (fp16 with "
        "a GradScaler, whose skipped steps skip DHSPG's)", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--sync-bn", action="store_true", default=None, help="under torchrun: BatchNorm "
                   "with the statistics of the global batch (SyncBatchNorm, CUDA only)")
    opt("--train-subset", int, "all", "use only the first N training examples")
    opt("--test-subset", int, "all", "use only the first N test examples")
    p.add_argument("--out", default=None, help="output directory (default: runs/<dataset>-<model>)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from OUT/checkpoints/last.pt, or from CHECKPOINT; settings "
                   "come from the checkpoint, and only --epochs may change")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes (default: 0)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an OUT that holds an "
                   "earlier run, replacing its checkpoints, slim model and report")
    p.add_argument("--no-progress", action="store_true", help="no progress bars; one line per epoch "
                   "(for logs and CI)")
    _add_export_parser(sub)
    return parser


def _shape(text: str) -> tuple:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas "
                                         f"(e.g. 1,3,32,32), not {text!r}")
    return shape


def _add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a saved slim model to ONNX or torch.export (.pt2)",
        description="Load a slim model saved by fxprune.io.save (e.g. OUT/slim of fxprune "
        "train), export it with a dynamic batch dimension (fixed shapes with --static), reload the "
        "file and compare its outputs with the model's on random standard-normal float32 inputs of "
        "the given shapes and of another batch size.")
    p.add_argument("slim_dir", metavar="SLIM_DIR", help="folder written by fxprune.io.save")
    p.add_argument("out_path", metavar="OUT_PATH", help="file to write (e.g. model.onnx, model.pt2)")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="file format (default: onnx)")
    # fxprune.io.save records no input shapes, so they are given here
    p.add_argument("--input-shape", type=_shape, action="append", required=True, metavar="SHAPE",
                   help="shape of one model input, comma separated (e.g. 1,3,32,32); repeat it "
                   "for each input of a model with several")
    p.add_argument("--static", action="store_true", help="fixed input shapes (those of --input-shape); by "
                   "default the file takes any batch size (dim 0)")
    p.add_argument("--rtol", type=float, default=RTOL, help=f"verification: allowed difference "
                   f"relative to the largest output magnitude (default: {RTOL:g})")
    p.add_argument("--atol", type=float, default=ATOL, help=f"verification: allowed absolute "
                   f"difference (default: {ATOL:g})")


def _export(args: argparse.Namespace) -> int:
    for name in ("rtol", "atol"):
        if not getattr(args, name) >= 0:
            return _usage_error("export", ConfigError(f"--{name} must be at least 0, not {getattr(args, name)}"))
    if not os.path.isdir(args.slim_dir):
        return _usage_error("export", ConfigError(f"SLIM_DIR {args.slim_dir!r} is not a directory"))
    import torch

    from . import io
    from .export import export

    gen = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(shape, generator=gen) for shape in args.input_shape)
    try:
        result = export(io.load(args.slim_dir), inputs, args.out_path, args.format, dynamic=not args.static,
                        rtol=args.rtol, atol=args.atol)
    except FxPruneError as e:
        print(f"fxprune export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {result.path} ({result.format}); max |file - model| output difference "
          f"{result.max_abs_diff:.2e}")
    return 0


def _task(argv: List[str]) -> tuple:
    """``(task, the other arguments)`` of a ``train`` command line."""
    pre = argparse.ArgumentParser(prog="fxprune train", add_help=False)
    pre.add_argument("--task", choices=TASKS, default=TASKS[0])
    known, rest = pre.parse_known_args(argv)
    return known.task, rest


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"] and _task(argv[1:])[0] == "causal-lm":
        from .lm.cli import main as lm_main

        return lm_main(_task(argv[1:])[1])
    args = build_parser().parse_args(argv)
    if args.command == "export":
        return _export(args)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    options = RunOptions(out=args.out, resume=args.resume, num_workers=args.num_workers,
                         device=args.device, progress=not args.no_progress, overwrite=args.overwrite)
    try:
        config = TrainConfig(**given)
        validate(config, options)  # resumed runs are checked against their checkpoint's config later
        from .train import train

        train(config, options, given)
    except (ConfigError, DatasetError) as e:
        return _usage_error("train", e)
    except (FxPruneError, ValueError) as e:
        print(f"fxprune train: error: {e}", file=sys.stderr)
        return 1
    return 0


def _usage_error(command: str, e: Exception) -> int:
    print(f"fxprune {command}: error: {e}", file=sys.stderr)
    return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
