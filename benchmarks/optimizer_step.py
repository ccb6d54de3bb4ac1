"""Time of one optimizer step: fxprune's DHSPG, H2SPG and ATO vs torch.optim.SGD / AdamW on ResNet-50.

All optimizers act on the same parameters: torchvision ResNet-50 (25.6M parameters),
compiled with ``fxprune.compile`` at 1x3x64x64 (and once more with ``mode="erase"`` for
H2SPG), with fixed random gradients. Rows:

* ``torch SGD``      ``torch.optim.SGD(momentum=0.9)`` (default implementation for the device)
* ``DHSPG sgd plain`` DHSPG, SGD variant, outside the pruning phase (plain steps only), with
  its defaults (on the CPU: the fused kernels of :mod:`fxprune.optim._fused`)
* ``DHSPG sgd pruning`` DHSPG, SGD variant, inside the pruning phase with the redundant set
  chosen (``target_group_sparsity=0.5``): per-channel norms, inner products, adaptive lambda,
  half-space test, group-lasso shrink and zero enforcement every step
* ``DHSPG sgd pruning stock``: the same with ``fused=False`` (stock torch ops only)
* ``H2SPG sgd warm-up`` H2SPG (OTOv3, erase mode: ResNet-50's erasable residual blocks are the
  groups), SGD variant, before the partition: DHSPG's step plus the redundancy score of every
  erasable operator, averaged every step
* ``H2SPG sgd pruning`` H2SPG inside the pruning phase, half of the operators chosen
  (``target_group_sparsity=0.5``, a valid set checked on the erase graph at the partition)
* ``SGD + ATO proximal`` ``torch.optim.SGD`` then ATO's proximal group-lasso step on the
  channels its frozen mask switches off (the mask calibrated to 50% of the FLOPs): the cost
  ATO adds to every model step of its proximal phase
* ``SGD + ATO step`` ``torch.optim.SGD`` then ``ATO.step`` with a controller step at every
  call (``controller_every=1``; the default is one per 20 model steps, in the controller phase
  only): the controller samples a mask, runs the gated ResNet-50 on a held-out batch of
  ``CONTROLLER_BATCH`` random 64x64 images (eval mode), back-propagates into the controller
  and takes its AdamW step; then the proximal step on the channels the controller's current
  mask switches off (few, this early in a run)
* ``torch AdamW``    ``torch.optim.AdamW``
* ``DHSPG adamw plain`` / ``DHSPG adamw pruning`` / ``DHSPG adamw pruning stock``: the same
  for the AdamW variant (whose Adam direction takes stock ops; the kernels do its row
  reductions and row-scaled update)

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
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torchvision  # noqa: E402

import fxprune  # noqa: E402
from fxprune.ato import ATO  # noqa: E402
from fxprune.optim import DHSPG, H2SPG  # noqa: E402
from _timing import interleaved, load_average  # noqa: E402

CONTROLLER_BATCH = 8  # held-out images per ATO controller step


def build(side: int):
    """ResNet-50 with fixed random gradients, its program (mode "prune") and the example input."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    x = torch.randn(1, 3, side, side)
    prog = fxprune.compile(model, (x,))
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return model, prog, x


def ato_steps(model, prog, side: int, lr: float, far: int) -> dict:
    """The two ATO rows of the table. Returns ``{"steps": {row name: function taking one SGD
    step and ATO's work}, "proximal": ATO of the first row, "full": ATO of the second}``."""
    params = list(model.parameters())
    sgd_prox = torch.optim.SGD(params, lr=lr, momentum=0.9)
    ato_prox = ATO(prog, 0.5, total_steps=far)
    ato_prox.freeze()  # the calibrated mask: 50% of the FLOPs kept

    gen = torch.Generator().manual_seed(2)
    held_out = [(torch.randn(CONTROLLER_BATCH, 3, side, side, generator=gen),
                 torch.randint(0, 1000, (CONTROLLER_BATCH,), generator=gen))]
    sgd_full = torch.optim.SGD(params, lr=lr, momentum=0.9)
    ato_full = ATO(prog, 0.5, total_steps=far, controller_start=0.0, proximal_start=0.0, mask_freeze=1.0,
                   controller_every=1, controller_data=held_out)

    def proximal():
        sgd_prox.step()
        ato_prox.proximal_step(lr)

    def full_step():
        sgd_full.step()
        with torch.enable_grad():  # the controller step back-propagates
            ato_full.step(sgd_full)

    return {"steps": {"SGD + ATO proximal": proximal, "SGD + ATO step": full_step},
            "proximal": ato_prox, "full": ato_full}


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

    model, prog, x = build(args.side)
    prog_erase = fxprune.compile(model, (x,), mode="erase")
    params = [p for p in model.parameters()]
    lr = 1e-6
    far = 10 ** 9
    ato = ato_steps(model, prog, args.side, lr, far)
    pruning = dict(target_group_sparsity=0.5, start_pruning_step=0, pruning_steps=far)
    opts = {
        "torch SGD": torch.optim.SGD(params, lr=lr, momentum=0.9),
        "DHSPG sgd plain": DHSPG(prog, lr=lr, variant="sgd", momentum=0.9,
                                 target_group_sparsity=0.5, start_pruning_step=far),
        "DHSPG sgd pruning": DHSPG(prog, lr=lr, variant="sgd", momentum=0.9, **pruning),
        "DHSPG sgd pruning stock": DHSPG(prog, lr=lr, variant="sgd", momentum=0.9, fused=False, **pruning),
        "H2SPG sgd warm-up": H2SPG(prog_erase, lr=lr, variant="sgd", momentum=0.9,
                                   target_group_sparsity=0.5, start_pruning_step=far),
        "H2SPG sgd pruning": H2SPG(prog_erase, lr=lr, variant="sgd", momentum=0.9, **pruning),
        "torch AdamW": torch.optim.AdamW(params, lr=lr, weight_decay=1e-2),
        "DHSPG adamw plain": DHSPG(prog, lr=lr, variant="adamw", weight_decay=1e-2,
                                   target_group_sparsity=0.5, start_pruning_step=far),
        "DHSPG adamw pruning": DHSPG(prog, lr=lr, variant="adamw", weight_decay=1e-2, **pruning),
        "DHSPG adamw pruning stock": DHSPG(prog, lr=lr, variant="adamw", weight_decay=1e-2, fused=False,
                                           **pruning),
    }
    for name, o in opts.items():
        if isinstance(o, DHSPG):
            assert o.fused == ("stock" not in name), (name, o.fused)
    steps = {name: o.step for name, o in opts.items()}
    steps.update(ato["steps"])
    order = [n for n in steps if "adamw" not in n.lower()] + [n for n in steps if "adamw" in n.lower()]
    steps = {name: steps[name] for name in order}  # SGD family first, then AdamW
    # the row each row's ratio is taken against: the torch optimizer of the same family
    baseline = {name: "torch AdamW" if "adamw" in name.lower() else "torch SGD" for name in steps}
    with torch.no_grad():
        timing = interleaved(steps, args.rounds, args.warmup)
    for name in ("DHSPG sgd pruning", "DHSPG sgd pruning stock", "DHSPG adamw pruning", "DHSPG adamw pruning stock"):
        m = opts[name].metrics()
        assert m["redundant_channels"] == m["target_channels"] > 0, m
    h2 = opts["H2SPG sgd pruning"].metrics()
    assert h2["chosen_units"] == h2["target_units"] > 0, h2
    assert ato["full"].history["step"], "no ATO controller step was taken"

    times = {k: v["wall_s"] for k, v in timing.items()}
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    med_cpu = {k: statistics.median(v["cpu_s"]) * 1e3 for k, v in timing.items()}
    rows = []
    for name in steps:
        base = baseline[name]
        rows.append({"optimizer": name, "median_ms": round(med[name], 2),
                     "min_ms": round(min(times[name]) * 1e3, 2),
                     "ratio": round(med[name] / med[base], 3),
                     "cpu_ms": round(med_cpu[name], 2),
                     "cpu_ratio": round(med_cpu[name] / med_cpu[base], 3), "vs": base})
    n_params = sum(p.numel() for p in params)
    m = opts["DHSPG sgd pruning"].metrics()
    prox = ato["proximal"]
    info = {
        "model": "torchvision resnet50", "parameters": n_params,
        "parameter_tensors": len(params), "prunable_channels": m["prunable_channels"],
        "redundant_channels": m["redundant_channels"], "rounds": args.rounds,
        "erasable_units": h2["units"], "h2spg_chosen_units": h2["chosen_units"],
        "ato_proximal_channels_off": int((~prox.current_mask()).sum()),
        "ato_proximal_flops_ratio": round(prox.flops_ratio(), 4),
        "ato_controller_batch": [CONTROLLER_BATCH, 3, args.side, args.side],
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
        "device": "cpu",
        "load_average_after": load_average(),
    }
    print(f"ResNet-50, {n_params / 1e6:.1f}M parameters in {len(params)} tensors, "
          f"{m['prunable_channels']} prunable channels ({m['redundant_channels']} redundant), "
          f"{h2['units']} erasable operators ({h2['chosen_units']} chosen by H2SPG), ATO proximal mask "
          f"{info['ato_proximal_channels_off']} channels off (FLOPs ratio {info['ato_proximal_flops_ratio']:.2f}), "
          f"ATO controller batch {CONTROLLER_BATCH}x3x{args.side}x{args.side}; "
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
