"""Accuracy against FLOPs cut on the digits task: dense, DHSPG, H2SPG, ATO and Torch-Pruning.

Every method trains the default model of ``fxprune train`` (ResNet-18 with a 3x3 stem and no
max-pool, random init) from scratch on scikit-learn's digits (1,437 train / 360 test images,
upsampled to 32x32) for the same number of epochs with the same learning-rate schedule, batch
size and seed, and is scored by the test accuracy of the model it hands out:

* ``dense``: ``fxprune train --target-group-sparsity 0`` (the baseline; nothing removed);
* ``dhspg@r``: ``fxprune train --target-group-sparsity r`` (OTOv2; slim model, no fine-tuning);
* ``h2spg@r``: ``fxprune train --mode erase --target-group-sparsity r`` (OTOv3: a fraction
  ``r`` of the erasable operators removed);
* ``ato@f``: ``fxprune train --method ato --target-flops f`` with ``f`` the FLOPs ratio the
  DHSPG run of the same ``r`` reached (same FLOPs cut);
* ``torch-pruning@r``: the dense schedule for the first half of the epochs, then
  Torch-Pruning's ``MetaPruner`` with ``GroupMagnitudeImportance`` (L2, uniform ratio ``r``
  per layer, the classifier kept) and fine-tuning for the other half with the schedule
  restarted (warm-up, then the decay at the same relative point): the same total epochs.

FLOPs are counted by ``fxprune.report`` (``torch.utils.flop_counter``) at 1x3x32x32 for every
method. Each run is one process-local call; ``--threads`` fixes ``torch.set_num_threads``.

Usage::

    python benchmarks/quality_digits.py                      # r = 0.3, 0.5, 0.7 (about 20 runs)
    python benchmarks/quality_digits.py --ratios 0.5 --epochs 6
    python benchmarks/quality_digits.py --quick              # 1 epoch, 300 images: a smoke test

Writes ``results/quality_digits.json``, ``results/quality_digits.md`` and, when matplotlib is
installed, ``results/quality_digits.png`` (accuracy against FLOPs cut).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fxprune  # noqa: E402
from fxprune import data as data_lib  # noqa: E402
from fxprune import models as model_lib  # noqa: E402
from fxprune.train import RunOptions, TrainConfig, evaluate, lr_at, seed_everything, steps_per_epoch, train  # noqa: E402


def fxprune_run(config: TrainConfig, label: str, workdir: str) -> dict:
    """One ``fxprune train`` run; its report reduced to the table's numbers."""
    t0 = time.perf_counter()
    rep = train(config, RunOptions(out=os.path.join(workdir, label), progress=False, overwrite=True))
    return {"method": label.split("@")[0], "label": label,
            "accuracy": rep["accuracy"]["slim"], "accuracy_full": rep["accuracy"]["full"],
            "flops_full": rep["flops"]["full"], "flops_slim": rep["flops"]["slim"],
            "params_full": rep["params"]["full"], "params_slim": rep["params"]["slim"],
            "group_sparsity": rep["group_sparsity"], "wall_s": time.perf_counter() - t0}


def _fit(model, config: TrainConfig, splits, epochs: int, first_epoch: int) -> None:
    """Plain SGD training with the schedule of ``fxprune train`` (``lr_at``), ``epochs``
    epochs whose data order is that of epochs ``first_epoch, ...`` of a run."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    spe = steps_per_epoch(len(splits.train), config.batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    gen = torch.Generator()
    model.train()
    for e in range(epochs):
        order = data_lib.epoch_order(len(splits.train), gen, config.seed, first_epoch + e)
        loader = DataLoader(splits.train, sampler=order, batch_size=config.batch_size, drop_last=True)
        for i, (x, y) in enumerate(loader):
            for g in opt.param_groups:
                g["lr"] = lr_at(config, e * spe + i, spe)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()


def torch_pruning_run(config: TrainConfig, ratio: float) -> dict:
    """Torch-Pruning's magnitude pruning at the half-way point, then fine-tuning."""
    import torch_pruning as tp
    from torch.utils.data import DataLoader

    t0 = time.perf_counter()
    splits = data_lib.load(config.dataset, config.image_size, config.train_subset, config.test_subset)
    seed_everything(config.seed)
    model = model_lib.build(config.model, splits.num_classes, splits.in_channels, config.image_size)
    first = config.epochs // 2
    # Each half keeps the run's schedule shape: decay points scaled to the half's length.
    half = dataclasses.replace(config, lr_decay_epochs=[e * first / config.epochs for e in config.lr_decay_epochs])
    _fit(model, half, splits, first, 0)
    example = splits.train[0][0].unsqueeze(0)
    model.eval()
    full = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[model.fc])
    pruner.step()
    rest = config.epochs - first
    tail = dataclasses.replace(config, lr_decay_epochs=[e * rest / config.epochs for e in config.lr_decay_epochs])
    _fit(model, tail, splits, rest, first)
    acc, _ = evaluate(model, DataLoader(splits.test, batch_size=256), "cpu")
    sizes = fxprune.report(full, model, (example,))
    return {"method": "torch-pruning", "label": f"torch-pruning@{ratio:g}", "accuracy": acc,
            "accuracy_full": None, "flops_full": sizes["flops_full"], "flops_slim": sizes["flops_slim"],
            "params_full": sizes["params_full"], "params_slim": sizes["params_slim"],
            "group_sparsity": ratio, "wall_s": time.perf_counter() - t0}


def table(rows: List[dict]) -> str:
    lines = ["| run | test accuracy (%) | FLOPs cut | params cut | wall (s) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['accuracy']:.2f} | {100 * (1 - r['flops_slim'] / r['flops_full']):.1f}% "
                     f"| {100 * (1 - r['params_slim'] / r['params_full']):.1f}% | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def plot(rows: List[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((100 * (1 - r["flops_slim"] / r["flops_full"]), r["accuracy"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xlabel("FLOPs cut (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits, ResNet-18, same epochs for every method")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--methods", nargs="+", default=["dense", "dhspg", "h2spg", "ato", "torch-pruning"])
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="1 epoch on 300 images")
    ap.add_argument("--out", default=str(HERE / "results" / "quality_digits"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = TrainConfig(epochs=args.epochs)
    if args.quick:
        base = dataclasses.replace(base, epochs=2, train_subset=300, test_subset=100,
                                   start_pruning_epoch=0.5, pruning_epochs=1.0, lr_decay_epochs=[1.5])
    rows: List[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(row: dict) -> None:
        rows.append(row)
        print(f"{row['label']}: accuracy {row['accuracy']:.2f}%, FLOPs {row['flops_slim'] / row['flops_full']:.3f} "
              f"of full, {row['wall_s']:.0f} s", flush=True)
        meta = {"epochs": base.epochs, "threads": args.threads, "torch": torch.__version__,
                "machine": platform.machine(), "cpus": os.cpu_count(), "quick": args.quick,
                "load_average": list(os.getloadavg())}
        out.with_suffix(".json").write_text(json.dumps({"info": meta, "rows": rows}, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as work:
        if "dense" in args.methods:
            record(fxprune_run(dataclasses.replace(base, target_group_sparsity=0.0), "dense", work))
        for r in args.ratios:
            dh = None
            if "dhspg" in args.methods or "ato" in args.methods:
                dh = fxprune_run(dataclasses.replace(base, target_group_sparsity=r), f"dhspg@{r:g}", work)
                if "dhspg" in args.methods:
                    record(dh)
            if "ato" in args.methods:
                f = dh["flops_slim"] / dh["flops_full"]
                record(fxprune_run(dataclasses.replace(base, method="ato", target_flops=round(f, 4)),
                                   f"ato@{f:.3f}", work))
            if "h2spg" in args.methods:
                record(fxprune_run(dataclasses.replace(base, mode="erase", target_group_sparsity=r),
                                   f"h2spg@{r:g}", work))
            if "torch-pruning" in args.methods:
                record(torch_pruning_run(base, r))
    md = table(rows)
    print(md)
    out.with_suffix(".md").write_text(md + "\n")
    if plot(rows, out.with_suffix(".png")):
        print(f"plot: {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
