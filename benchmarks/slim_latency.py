"""Latency of slim models against their full models, next to the FLOPs ratio.

For each model: ``fxprune.compile`` at batch 1; then, for each sparsity ``s``, a random
fraction ``s`` of the channels of every prunable exact group is zeroed
(``fxprune.testing.random_masks`` with ``frac=(s, s)``: ``round(s * size)`` channels per group,
at least one kept and one dropped; which channels go does not change the slim model's shape,
so random channels time the same as the lowest-L2 ones), the slim model is built and verified
(``prog.construct_subnet()``), its FLOPs are counted (``fxprune.report``, batch 1), and the
weights are restored before the next sparsity.

Latency: the full model (the user's ``nn.Module``, as deployed) and every slim model take one
forward pass in turn per round (so that a change of machine load hits them alike), under
``torch.inference_mode`` in eval mode, after ``--warmup`` untimed rounds; the table gives the
median wall time over ``--repeats`` rounds, at each batch size (the JSON also holds the median
process CPU time, all threads, which other processes on a shared machine disturb less). On CUDA the device is
synchronised before and after every pass, and ``torch.backends.cudnn.benchmark`` is on (the
warm-up rounds take its autotuning).

Columns: speed-up = full ms / slim ms; FLOPs ratio = full FLOPs / slim FLOPs; realized =
speed-up / FLOPs ratio, the share of the FLOPs reduction that shows as wall time (1 = all).

Models and inputs: resnet18, resnet50, mobilenet_v2 and convnext_tiny at 3x224x224
(``--side``), random weights (``_models.build``); vit_b_16 at the zoo's small input, 3x64x64
(16 patches and the class token; built for that size, so ``--side`` does not apply). ConvNeXt's
and ViT's residual streams are pruned too: their slim LayerNorms keep the full model's count
(``fxprune.modules.CountPreservingLayerNorm``; ``--norm-cost`` times them against stock ones).
torchvision's ViT runs
``nn.MultiheadAttention``'s fused inference path; its slim model runs
``fxprune.modules.PrunedMultiheadAttention``.

Cost of the count-preserving norms (``--norm-cost``): with the residual stream pruned, a slim
ConvNeXt or ViT normalises over fewer channels than the full model and divides by the full count
(``fxprune.modules.CountPreservingLayerNorm``, ``layer_norm_full_count``; exact). The same slim
model with stock norms (:func:`stock_norms`: each count-preserving module swapped for the torch
module of the same slim shape and parameters, each ``*_full_count`` call for the stock op; its
output differs, only its time matters) is timed with it, interleaved, next to the full model;
ratio = count-preserving ms / stock ms. Models: convnext_tiny at ``--side`` and vit_b_16 at its
64x64, sparsities 0.3 and 0.5 (``--sparsities``); written to ``results/slim_latency_norms.json``.

Usage::

    python benchmarks/slim_latency.py                    # CPU, all models, sparsity 0.3/0.5/0.7, batch 1 and 32
    python benchmarks/slim_latency.py --quick            # resnet18 and mobilenet_v2, 0.5, 64x64, 3 rounds
    python benchmarks/slim_latency.py --device cuda      # writes results/gpu/slim_latency.json
    python benchmarks/slim_latency.py --models resnet50 --sparsities 0.5 --batches 1 --threads 2
    python benchmarks/slim_latency.py --norm-cost --threads 1   # count-preserving vs stock norms

Prints a Markdown table and writes benchmarks/results/slim_latency.json (CPU) or
benchmarks/results/gpu/slim_latency.json (CUDA), unless ``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import fxprune  # noqa: E402
from fxprune.testing import random_masks  # noqa: E402
import _models  # noqa: E402
from _timing import interleaved, load_average, print_and_save, run_info  # noqa: E402

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "convnext_tiny", "vit_b_16")
QUICK_MODELS = ("resnet18", "mobilenet_v2")
SPARSITIES = (0.3, 0.5, 0.7)
BATCHES = (1, 32)


def model_side(name: str, side: int) -> int:
    """Input side of ``name``: ``side`` for a CNN; a transformer's own (it is built for it)."""
    return _models.input_side(name) if _models.is_transformer(name) else side


def slim_models(model: torch.nn.Module, x: torch.Tensor, sparsities, seed: int = 0) -> dict:
    """``{sparsity: (slim GraphModule, fxprune.Report at x, channels zeroed)}`` for ``model``
    (eval mode, on the CPU) at input ``x`` (1x3xHxW). ``model``'s weights are the same after
    the call as before (each sparsity starts from them). Raises ``fxprune.FxPruneError`` when
    compiling or building fails, ``fxprune.VerificationError`` when a slim model's output
    differs from the zeroed full model's."""
    prog = fxprune.compile(model, (x,))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    try:
        for s in sparsities:
            masks = random_masks(prog, seed, (s, s))
            prog.zero_(masks)
            slim = prog.construct_subnet().eval()
            zeroed = int(sum((~m).sum() for m in masks.values()))
            out[s] = (slim, fxprune.report(model, slim, (x,)), zeroed)
            model.load_state_dict(saved)
    finally:
        model.load_state_dict(saved)
    return out


def _prepared(name: str, side: int, sparsities, device: torch.device):
    """The model, its slim models (:func:`slim_models`) on ``device``, and the device's
    synchronisation (None on the CPU)."""
    model = _models.build(name)
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    slims = slim_models(model, x, sparsities)
    model.to(device)
    for slim, _, _ in slims.values():
        slim.to(device)
    return model, slims, torch.cuda.synchronize if device.type == "cuda" else None


def _batch(batch: int, side: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1)).to(device)


def measure(name: str, side: int, sparsities, batches, repeats: int, warmup: int,
            device: torch.device) -> list:
    """Rows of the table for one model (see the module docstring)."""
    model, slims, sync = _prepared(name, side, sparsities, device)
    rows = []
    for batch in batches:
        xb = _batch(batch, side, device)
        fns = {"full": lambda: model(xb)}
        fns.update({s: (lambda m=slim: m(xb)) for s, (slim, _, _) in slims.items()})
        with torch.inference_mode():
            timing = interleaved(fns, repeats, warmup, sync)
        full_ms, full_cpu = (statistics.median(timing["full"][k]) * 1e3 for k in ("wall_s", "cpu_s"))
        for s, (_, rep, zeroed) in slims.items():
            slim_ms, slim_cpu = (statistics.median(timing[s][k]) * 1e3 for k in ("wall_s", "cpu_s"))
            speedup = full_ms / slim_ms
            flops_ratio = rep.flops_full / rep.flops_slim
            rows.append({
                "model": name, "input": [3, side, side], "sparsity": s, "batch": batch,
                "full_ms": round(full_ms, 3), "slim_ms": round(slim_ms, 3), "speedup": round(speedup, 3),
                "flops_full": rep.flops_full, "flops_slim": rep.flops_slim, "flops_ratio": round(flops_ratio, 3),
                "realized": round(speedup / flops_ratio, 3), "full_cpu_ms": round(full_cpu, 3),
                "slim_cpu_ms": round(slim_cpu, 3), "params_full": rep.params_full,
                "params_slim": rep.params_slim, "channels_zeroed": zeroed,
            })
        print(f"[{name} batch {batch}] full {full_ms:.1f} ms", file=sys.stderr, flush=True)
    return rows


def _stock_call(fn, args: tuple, kwargs: dict):
    """``(stock op, args, kwargs)`` for a call of a ``fxprune.modules`` ``*_full_count``
    function (the same reduction divided by the slim count), or None for one with no stock
    counterpart (uneven group norm)."""
    import inspect

    import torch.nn.functional as F

    from fxprune import modules as fm

    a = inspect.signature(fn).bind(*args, **kwargs)
    a.apply_defaults()
    a = a.arguments
    if fn is fm.layer_norm_full_count:
        return F.layer_norm, (a["x"], a["normalized_shape"], a["weight"], a["bias"], a["eps"]), {}
    if fn is fm.native_layer_norm_full_count:
        return torch.ops.aten.native_layer_norm.default, (a["x"], a["normalized_shape"], a["weight"], a["bias"],
                                                          a["eps"]), {}
    if fn is fm.rms_norm_full_count:
        return F.rms_norm, (a["x"], a["normalized_shape"], a["weight"], a["eps"]), {}
    if fn is fm.mean_full_count:
        return torch.mean, (a["x"], a["dim"], a["keepdim"]), {"dtype": a["dtype"]}
    if fn in (fm.var_full_count, fm.std_full_count):
        op = torch.var if fn is fm.var_full_count else torch.std
        return op, (a["x"], a["dim"]), {"correction": a["correction"], "keepdim": a["keepdim"]}
    return None


def stock_norms(slim: torch.fx.GraphModule):
    """A copy of ``slim`` whose count-preserving norms are torch's stock ones over the same slim
    channels (dividing by the slim count: the output differs; for timing only). Returns
    ``(copy, number of modules and calls swapped)``; uneven group norms stay as they are."""
    import copy

    from fxprune import modules as fm

    gm = copy.deepcopy(slim)
    swapped = 0
    for name, m in list(gm.named_modules()):
        if isinstance(m, fm.CountPreservingLayerNorm):
            new = torch.nn.LayerNorm(m.normalized_shape, m.eps, m.elementwise_affine, m.bias_enabled)
        elif isinstance(m, fm.CountPreservingRMSNorm):
            new = torch.nn.RMSNorm(m.normalized_shape, m.eps, m.elementwise_affine)
        else:
            continue
        new.load_state_dict(m.state_dict())
        parent, _, leaf = name.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, new)
        swapped += 1
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__module__", None) == fm.__name__:
            stock = _stock_call(node.target, node.args, node.kwargs)
            if stock is not None:
                node.target, node.args, node.kwargs = stock
                swapped += 1
    gm.recompile()
    return gm, swapped


def measure_norm_cost(name: str, side: int, sparsities, batches, repeats: int, warmup: int,
                      device: torch.device) -> list:
    """Rows for ``--norm-cost``: the full model, each slim model as built and with stock norms
    (:func:`stock_norms`), timed in turn per round."""
    model, built, sync = _prepared(name, side, sparsities, device)
    slims = {s: (slim, *stock_norms(slim), rep) for s, (slim, rep, _) in built.items()}
    rows = []
    for batch in batches:
        xb = _batch(batch, side, device)
        fns = {"full": lambda: model(xb)}
        for s, (slim, stock, _, _) in slims.items():
            stock.to(device)
            fns[(s, "cp")] = lambda m=slim: m(xb)
            fns[(s, "stock")] = lambda m=stock: m(xb)
        with torch.inference_mode():
            timing = interleaved(fns, repeats, warmup, sync)
        med = {k: statistics.median(v["wall_s"]) * 1e3 for k, v in timing.items()}
        cpu = {k: statistics.median(v["cpu_s"]) * 1e3 for k, v in timing.items()}
        for s, (_, _, swapped, rep) in slims.items():
            rows.append({
                "model": name, "input": [3, side, side], "sparsity": s, "batch": batch, "norms_swapped": swapped,
                "full_ms": round(med["full"], 3), "slim_ms": round(med[(s, "cp")], 3),
                "stock_ms": round(med[(s, "stock")], 3), "ratio": round(med[(s, "cp")] / med[(s, "stock")], 4),
                "slim_cpu_ms": round(cpu[(s, "cp")], 3), "stock_cpu_ms": round(cpu[(s, "stock")], 3),
                "cpu_ratio": round(cpu[(s, "cp")] / cpu[(s, "stock")], 4),
                "params_full": rep.params_full, "params_slim": rep.params_slim,
                "flops_ratio": round(rep.flops_full / rep.flops_slim, 3),
            })
        print(f"[{name} batch {batch}] full {med['full']:.1f} ms", file=sys.stderr, flush=True)
    return rows


def _markdown(head: str, rule: str, rows: list, cells) -> str:
    """A Markdown table: ``cells(row)`` gives a row's cells after the model's name; a failed
    row gets its error in the last column."""
    out = [head, rule]
    blanks = rule.count("|") - 3
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} |" + " |" * blanks + f" error: {r['error']} |")
        else:
            out.append(f"| {r['model']} | " + " | ".join(cells(r)) + " |")
    return "\n".join(out)


def norm_cost_table(rows: list) -> str:
    return _markdown("| model | input | sparsity | batch | params cut | full ms | slim ms (count-preserving) | "
                     "slim ms (stock norms) | ratio | ratio by CPU time |",
                     "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", rows,
                     lambda r: ["x".join(map(str, r["input"][1:])), f"{r['sparsity']:.0%}", str(r["batch"]),
                                f"{1 - r['params_slim'] / r['params_full']:.1%}", f"{r['full_ms']:.1f}",
                                f"{r['slim_ms']:.1f}", f"{r['stock_ms']:.1f}", f"{r['ratio']:.3f}",
                                f"{r['cpu_ratio']:.3f}"])


def table(rows: list) -> str:
    return _markdown("| model | input | sparsity | batch | full ms | slim ms | speed-up | FLOPs full/slim | realized |",
                     "|---|---|---:|---:|---:|---:|---:|---:|---:|", rows,
                     lambda r: ["x".join(map(str, r["input"])), f"{r['sparsity']:.0%}", str(r["batch"]),
                                f"{r['full_ms']:.2f}", f"{r['slim_ms']:.2f}", f"{r['speedup']:.2f}x",
                                f"{r['flops_ratio']:.2f}x", f"{r['realized']:.2f}"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None, help=f"default: {' '.join(MODELS)}")
    ap.add_argument("--sparsities", nargs="*", type=float, default=None,
                    help="fractions of every prunable exact group's channels to zero (default 0.3 0.5 0.7)")
    ap.add_argument("--batches", nargs="*", type=int, default=list(BATCHES))
    ap.add_argument("--side", type=int, default=None, help="CNN input side (default 224; 64 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5 on CPU, 50 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1 on CPU, 10 on CUDA)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--quick", action="store_true",
                    help="resnet18 and mobilenet_v2, sparsity 0.5, 64x64, 3 rounds")
    ap.add_argument("--norm-cost", action="store_true",
                    help="count-preserving against stock norms in slim convnext_tiny and vit_b_16 (module doc)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            ap.error("--device cuda, but torch sees no CUDA device")
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models or (["convnext_tiny", "vit_b_16"] if args.norm_cost else
                             list(QUICK_MODELS if args.quick else MODELS))
    sparsities = args.sparsities or ([0.5] if args.quick else [0.3, 0.5] if args.norm_cost else list(SPARSITIES))
    side = args.side or (64 if args.quick else 224)
    repeats = args.repeats or (3 if args.quick else 50 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    out_path = Path(args.out) if args.out else (HERE / "results" / ("gpu" if cuda else "") /
                                                ("slim_latency_norms.json" if args.norm_cost else "slim_latency.json"))
    run, render = (measure_norm_cost, norm_cost_table) if args.norm_cost else (measure, table)

    load_start = load_average()
    rows = []
    for name in models:
        try:
            rows += run(name, model_side(name, side), sparsities, args.batches, repeats, warmup, device)
        except Exception as exc:  # noqa: BLE001 - one failing model is reported, the others still run
            rows.append({"model": name, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"})
            print(f"[{name}] {rows[-1]['error']}", file=sys.stderr, flush=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    info = run_info(device, load_start, repeats=repeats, warmup=warmup, cudnn_benchmark=cuda,
                    masks="random_masks(prog, seed=0, frac=(s, s))")
    header = (f"{info['device']}, torch {torch.__version__}, {info['threads']} threads, median of {repeats} "
              f"rounds after {warmup} warm-up; load average {load_start} at start, {info['load_average_end']} at end")
    return print_and_save(header, render(rows), info, rows, out_path)


if __name__ == "__main__":
    main()
