"""Training throughput on CIFAR-size inputs: images/s of plain SGD vs DHSPG training steps.

Models: torchvision resnet18 and resnet50 adapted for 32x32 images as ``fxprune train`` builds
them (``fxprune.models.build(name, num_classes=10, image_size=32)``: 3x3 stride-1 stem, no
max-pool), random weights. Data: one batch of random 3x32x32 images and labels, generated on
the device (no dataset, nothing downloaded). A training step is ``zero_grad``, forward,
cross-entropy, backward and the optimizer step, in train mode. Rows per model, each on its own
copy of the same initial model (compiled with ``fxprune.compile`` on the device):

* ``SGD``            ``torch.optim.SGD(lr, momentum=0.9, weight_decay=5e-4)``
* ``DHSPG plain``    ``fxprune.DHSPG`` with the same settings, before its pruning phase
* ``DHSPG pruning``  inside the pruning phase, half of the prunable channels redundant
  (``target_group_sparsity=0.5``, ``pruning_steps`` huge so that every step does the full
  half-space work)

Every round takes one step of every row in turn (so that a change of load hits them alike),
after ``--warmup`` untimed rounds; on CUDA the device is synchronised before and after every
step. images/s = batch / median step wall time; ratio = images/s over SGD's on the same model.

Usage::

    python benchmarks/train_throughput.py --device cuda          # batch 256, resnet18 and resnet50
    python benchmarks/train_throughput.py --device cpu --quick   # resnet18, batch 16, 2 rounds

Prints a Markdown table and writes benchmarks/results/train_throughput.json (CPU) or
benchmarks/results/gpu/train_throughput.json (CUDA), unless ``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fxprune  # noqa: E402
from fxprune.models import build as build_model  # noqa: E402
from _timing import interleaved, load_average, print_and_save, run_info  # noqa: E402

MODELS = ("resnet18", "resnet50")
SIDE = 32
CLASSES = 10
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


def optimizers(model: torch.nn.Module, example: tuple) -> dict:
    """``{row name: (model copy, optimizer)}`` for the rows of the module docstring; every copy
    starts from ``model``'s weights and lives on ``example``'s device."""
    far = 10 ** 9
    out = {}
    for name in ("SGD", "DHSPG plain", "DHSPG pruning"):
        net = copy.deepcopy(model).train()
        if name == "SGD":
            opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        else:
            prog = fxprune.compile(net, example)
            start = far if name == "DHSPG plain" else 0
            opt = fxprune.DHSPG(prog, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                target_group_sparsity=0.5, start_pruning_step=start, pruning_steps=far)
        out[name] = (net, opt)
    return out


def train_step(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    opt.step()


def measure(name: str, batch: int, rounds: int, warmup: int, device: torch.device) -> list:
    """Rows of the table for one model (see the module docstring)."""
    torch.manual_seed(0)
    model = build_model(name, CLASSES, image_size=SIDE).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, SIDE, SIDE, generator=gen, device=device)
    y = torch.randint(0, CLASSES, (batch,), generator=gen, device=device)
    rows_of = optimizers(model, (x[:1],))
    steps = {row: (lambda net=net, opt=opt: train_step(net, opt, x, y)) for row, (net, opt) in rows_of.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    timing = interleaved(steps, rounds, warmup, sync)
    pruning = rows_of["DHSPG pruning"][1].metrics()
    assert pruning["redundant_channels"] == pruning["target_channels"] > 0, pruning
    step_ms = {row: statistics.median(t["wall_s"]) * 1e3 for row, t in timing.items()}
    rows = []
    for row, ms in step_ms.items():
        rows.append({"model": name, "optimizer": row, "batch": batch, "step_ms": round(ms, 3),
                     "images_per_s": round(batch / ms * 1e3, 1), "ratio": round(step_ms["SGD"] / ms, 3),
                     "cpu_ms": round(statistics.median(timing[row]["cpu_s"]) * 1e3, 3)})
    print(f"[{name}] SGD step {step_ms['SGD']:.1f} ms", file=sys.stderr, flush=True)
    return rows


def table(rows: list) -> str:
    out = ["| model | optimizer | batch | step ms | images/s | vs SGD |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['optimizer']} | {r['batch']} | {r['step_ms']:.1f} | "
                   f"{r['images_per_s']:.0f} | {r['ratio']:.2f}x |")
    return "\n".join(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--models", nargs="*", default=None, help=f"default: {' '.join(MODELS)}")
    ap.add_argument("--batch", type=int, default=None, help="default 256 (16 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 20; 2 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 3; 1 with --quick)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    ap.add_argument("--quick", action="store_true", help="resnet18, batch 16, 2 rounds after 1 warm-up")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models or (["resnet18"] if args.quick else list(MODELS))
    batch = args.batch or (16 if args.quick else 256)
    rounds = args.rounds or (2 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    out_path = Path(args.out) if args.out else HERE / "results" / ("gpu" if cuda else "") / "train_throughput.json"

    load_start = load_average()
    rows = []
    for name in models:
        rows += measure(name, batch, rounds, warmup, device)
        if cuda:
            torch.cuda.empty_cache()
    info = run_info(device, load_start, input=[batch, 3, SIDE, SIDE], rounds=rounds, warmup=warmup,
                    lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    header = (f"{info['device']}, torch {torch.__version__}, {info['threads']} threads, input {batch}x3x{SIDE}x{SIDE}, "
              f"median of {rounds} rounds after {warmup} warm-up; load average {load_start} at start, "
              f"{info['load_average_end']} at end")
    return print_and_save(header, table(rows), info, rows, out_path)


if __name__ == "__main__":
    main()
