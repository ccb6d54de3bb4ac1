"""Time of one optimizer step: fxprune.DHSPG vs torch.optim.SGD / AdamW on ResNet-50.

All optimizers act on the same parameters: torchvision ResNet-50 (25.6M parameters),
compiled with ``fxprune.compile`` at 1x3x64x64, with fixed random gradients. Rows:

* ``torch SGD``      ``torch.optim.SGD(momentum=0.9)`` (default implementation for the device)
* ``DHSPG sgd plain`` DHSPG, SGD variant, outside the pruning phase (plain steps only)
* ``DHSPG sgd pruning`` DHSPG, SGD variant, inside the pruning phase with the redundant set
  chosen (``target_group_sparsity=0.5``): per-channel norms, inner products, adaptive lambda,
  half-space test, group-lasso shrink and zero enforcement every step
* ``torch AdamW``    ``torch.optim.AdamW``
* ``DHSPG adamw plain`` / ``DHSPG adamw pruning``: the same for the AdamW variant

Each round takes one step of every optimizer in turn (so that machine load affects them
alike); the table reports the median over rounds, in milliseconds, of wall time and of
process CPU time (all threads; less sensitive to other processes on a shared machine), and
their ratios to the torch optimizer of the same family. The learning rate is tiny so that the parameters stay
finite; timing does not depend on values. Steps in the pruning phase never project here
(``pruning_steps`` is huge and ``epsilon`` 0), so every pruning-phase step does the full work.

Usage::

    python benchmarks/optimizer_step.py              # 15 rounds
    python benchmarks/optimizer_step.py --rounds 30 --threads 2

Prints a Markdown table and writes benchmarks/results/optimizer_step.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torchvision  # noqa: E402

import fxprune  # noqa: E402
from fxprune.optim import DHSPG  # noqa: E402


def build(side: int):
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    prog = fxprune.compile(model, (torch.randn(1, 3, side, side),))
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return model, prog


def _loadavg():
    try:
        return [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--out", default=str(HERE / "results" / "optimizer_step.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, prog = build(args.side)
    params = [p for p in model.parameters()]
    lr = 1e-6
    far = 10 ** 9
    opts = {
        "torch SGD": torch.optim.SGD(params, lr=lr, momentum=0.9),
        "DHSPG sgd plain": DHSPG(prog, lr=lr, variant="sgd", momentum=0.9,
                                 target_group_sparsity=0.5, start_pruning_step=far),
        "DHSPG sgd pruning": DHSPG(prog, lr=lr, variant="sgd", momentum=0.9,
                                   target_group_sparsity=0.5, start_pruning_step=0,
                                   pruning_steps=far),
        "torch AdamW": torch.optim.AdamW(params, lr=lr, weight_decay=1e-2),
        "DHSPG adamw plain": DHSPG(prog, lr=lr, variant="adamw", weight_decay=1e-2,
                                   target_group_sparsity=0.5, start_pruning_step=far),
        "DHSPG adamw pruning": DHSPG(prog, lr=lr, variant="adamw", weight_decay=1e-2,
                                     target_group_sparsity=0.5, start_pruning_step=0,
                                     pruning_steps=far),
    }
    baseline = {"torch SGD": "torch SGD", "DHSPG sgd plain": "torch SGD",
                "DHSPG sgd pruning": "torch SGD", "torch AdamW": "torch AdamW",
                "DHSPG adamw plain": "torch AdamW", "DHSPG adamw pruning": "torch AdamW"}
    times = {k: [] for k in opts}
    cpu = {k: [] for k in opts}
    with torch.no_grad():
        for _ in range(args.warmup):
            for o in opts.values():
                o.step()
        for _ in range(args.rounds):
            for name, o in opts.items():
                c0, t0 = time.process_time(), time.perf_counter()
                o.step()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    for name in ("DHSPG sgd pruning", "DHSPG adamw pruning"):
        m = opts[name].metrics()
        assert m["redundant_channels"] == m["target_channels"] > 0, m

    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    med_cpu = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}
    rows = []
    for name in opts:
        base = baseline[name]
        rows.append({"optimizer": name, "median_ms": round(med[name], 2),
                     "min_ms": round(min(times[name]) * 1e3, 2),
                     "ratio": round(med[name] / med[base], 3),
                     "cpu_ms": round(med_cpu[name], 2),
                     "cpu_ratio": round(med_cpu[name] / med_cpu[base], 3), "vs": base})
    n_params = sum(p.numel() for p in params)
    m = opts["DHSPG sgd pruning"].metrics()
    info = {
        "model": "torchvision resnet50", "parameters": n_params,
        "parameter_tensors": len(params), "prunable_channels": m["prunable_channels"],
        "redundant_channels": m["redundant_channels"], "rounds": args.rounds,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
        "device": "cpu",
        "load_average_after": _loadavg(),
    }
    print(f"ResNet-50, {n_params / 1e6:.1f}M parameters in {len(params)} tensors, "
          f"{m['prunable_channels']} prunable channels ({m['redundant_channels']} redundant); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} rounds; "
          f"load average {info['load_average_after']}")
    print()
    print("| optimizer | median ms | min ms | ratio | CPU ms | CPU ratio | vs |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['ratio']:.2f}x "
              f"| {r['cpu_ms']:.1f} | {r['cpu_ratio']:.2f}x | {r['vs']} |")
    out = {"info": info, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
