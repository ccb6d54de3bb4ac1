"""DHSPG on a small ViT on the digits task, with and without its residual stream.

A torchvision ``VisionTransformer`` (8x8 input, 2x2 patches: 16 tokens and the class token;
``--layers`` encoder blocks of ``--heads`` heads, width ``--width``, MLP ``2 * width``; no
dropout) is trained from scratch on scikit-learn's digits at their own 8x8 size
(``fxprune.data.digits(8)``: 1,437 train / 360 test images) with DHSPG (AdamW variant) at target
group sparsity ``--sparsity`` per group (uniform partition), twice from the same initial weights
and data order:

* ``heads+mlp``: the residual-stream group (the embedding width, which every LayerNorm, the
  patch projection, the class token and every block's output projections share) is frozen
  before the optimizer is built (``Group.prunable = False``), so only attention heads and MLP
  hidden channels are pruned;
* ``all``: every prunable group, the residual stream included: its LayerNorms normalise over
  fewer channels in the slim model and keep the full model's count
  (``fxprune.modules.CountPreservingLayerNorm``), so removing its zeroed channels is exact;
* ``dense`` (``--runs dense``, not run by default): the same schedule with target group
  sparsity 0, as a reference.

Schedule: ``--epochs`` epochs of batch 64, learning rate ``--lr`` with a linear warm-up over the
first epoch and a cosine decay; the pruning phase starts after ``--epochs // 4`` epochs and
projects over the next half of the run, so the last quarter trains the pruned model. After
training ``prog.construct_subnet()`` builds the slim model (it verifies the slim model against
the trained, zeroed one); the table gives both models' test accuracy (they must be equal),
and the parameters and FLOPs cut (``fxprune.report`` at 1x3x8x8).

Usage::

    python benchmarks/vit_digits.py                 # both runs, about 2-4 minutes on 2 cores
    python benchmarks/vit_digits.py --epochs 2      # a smoke test
    python benchmarks/vit_digits.py --runs dense heads+mlp all   # with the dense reference

Prints a Markdown table and writes ``results/vit_digits.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fxprune  # noqa: E402
from fxprune import data as data_lib  # noqa: E402
from fxprune.train import evaluate, seed_everything  # noqa: E402

RUNS = ("heads+mlp", "all")
DENSE = "dense"  # optional reference: the same training with target group sparsity 0


def build_vit(layers: int, heads: int, width: int):
    """The small ViT of the module docstring (random initialisation from the current seed)."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=8, patch_size=2, num_layers=layers, num_heads=heads, hidden_dim=width,
                             mlp_dim=2 * width, num_classes=10, dropout=0.0, attention_dropout=0.0)


def residual_groups(prog) -> list:
    """The groups that carry a LayerNorm's channels: in a ViT, the residual stream."""
    norms = {name for name, m in prog.module.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    return [g for g in prog.groups if any(p.rpartition(".")[0] in norms for p in g.params)]


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def run(label: str, args, splits, init_state: dict) -> dict:
    """Train one run (see the module docstring) and return its row."""
    from torch.utils.data import DataLoader

    t0 = time.perf_counter()
    model = build_vit(args.layers, args.heads, args.width)
    model.load_state_dict(init_state)
    example = splits.test[0][0].unsqueeze(0)
    prog = fxprune.compile(model.eval(), (example,))
    frozen = []
    if label == "heads+mlp":
        for g in residual_groups(prog):
            if g.prunable:
                g.prunable, g.reason = False, "residual stream, left out of this run"
                frozen.append(g.id)
    prunable = [g for g in prog.groups if g.prunable and g.exact]
    steps_per_epoch = len(splits.train) // args.batch
    total = args.epochs * steps_per_epoch
    opt = fxprune.DHSPG(prog, lr=args.lr, variant="adamw", weight_decay=args.weight_decay,
                        target_group_sparsity=0.0 if label == DENSE else args.sparsity, start_pruning_step=(args.epochs // 4) * steps_per_epoch,
                        pruning_steps=max(1, (args.epochs // 2) * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps_per_epoch, total))
    gen = torch.Generator().manual_seed(args.seed)
    net = prog.module.train()
    for _ in range(args.epochs):
        loader = DataLoader(splits.train, batch_size=args.batch, shuffle=True, drop_last=True, generator=gen)
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            sched.step()
    net.eval()
    metrics = opt.metrics()
    test = DataLoader(splits.test, batch_size=512)
    acc_full, logits_full = evaluate(net, test, "cpu")
    slim = prog.construct_subnet().eval()
    acc_slim, logits_slim = evaluate(slim, test, "cpu")
    rep = fxprune.report(net, slim, (example,))
    by_kind = {}
    for g in prunable:
        kind = "residual" if g in residual_groups(prog) else "heads" if g.size == args.heads else "mlp"
        kept = int(opt.masks()[g.id].sum())
        by_kind.setdefault(kind, []).append(f"{kept}/{g.size}")
    return {
        "run": label, "accuracy_full": acc_full, "accuracy_slim": acc_slim,
        "max_logit_diff": float((logits_full - logits_slim).abs().max()),
        "params_full": rep.params_full, "params_slim": rep.params_slim,
        "flops_full": rep.flops_full, "flops_slim": rep.flops_slim,
        "params_cut": 1 - rep.params_slim / rep.params_full, "flops_cut": 1 - rep.flops_slim / rep.flops_full,
        "frozen_residual_groups": frozen, "kept_channels": by_kind,
        "group_sparsity": metrics["group_sparsity"], "prunable_channels": metrics["prunable_channels"],
        "count_preserving_norms": sum(type(m).__name__ == "CountPreservingLayerNorm" for m in slim.modules()),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def table(rows: list) -> str:
    out = ["| pruned groups | full test accuracy | slim test accuracy | params cut | FLOPs cut | channels kept |",
           "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        kept = "; ".join(f"{k} {', '.join(v)}" for k, v in r["kept_channels"].items())
        out.append(f"| {r['run']} | {r['accuracy_full']:.2f}% | {r['accuracy_slim']:.2f}% | {r['params_cut']:.1%} | "
                   f"{r['flops_cut']:.1%} | {kept} |")
    return "\n".join(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--sparsity", type=float, default=0.5, help="target group sparsity (per group, uniform)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    ap.add_argument("--runs", nargs="*", choices=RUNS + (DENSE,), default=list(RUNS),
                    help=f"default: {' '.join(RUNS)}; {DENSE}: the same schedule with nothing pruned")
    ap.add_argument("--out", default=str(HERE / "results" / "vit_digits.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    splits = data_lib.digits(8)
    seed_everything(args.seed)
    init_state = build_vit(args.layers, args.heads, args.width).state_dict()
    rows = []
    for label in args.runs:
        rows.append(run(label, args, splits, init_state))
        print(f"[{label}] {rows[-1]['wall_s']} s", file=sys.stderr, flush=True)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "runs")}
    header = (f"ViT ({args.layers} blocks, {args.heads} heads, width {args.width}) on digits 8x8, DHSPG adamw, "
              f"target group sparsity {args.sparsity}, {args.epochs} epochs, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
    print(header)
    print()
    print(table(rows))
    result = {"config": config, "python": platform.python_version(), "torch": torch.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
