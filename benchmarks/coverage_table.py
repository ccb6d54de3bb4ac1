"""Coverage of the torchvision zoo: what fxprune finds and what it can cut, model by model.

For every torchvision classification and segmentation model (random weights, small input,
eval mode, float32, randomised normalisation statistics) it

1. compiles the model (``fxprune.compile``) and counts its groups: prunable and exact,
   prunable but inexact, frozen;
2. zeroes 50% of the channels of every prunable exact group (a random half by default,
   ``--zero first`` for the first half), constructs the slim model and compares its output
   with the zeroed full model's (max |diff| / max |output|; above ``--rtol`` is an error);
3. reports parameters and FLOPs (``fxprune.report``) of full vs slim.

Verdict per model:

* ``exact``   every group is prunable and exact, or frozen only because it reaches the model
              output; the slim model matches;
* ``partial`` some groups are frozen for other reasons (listed), none is inexact; the slim
              model built from the exact ones matches;
* ``inexact`` some groups are inexact (listed; frozen, or prunable only with
              ``allow_inexact``; never zeroed here); the slim model built from the exact
              ones matches;
* ``frozen``  no prunable exact group at all;
* ``error``   an exception (the stage and message are given) or an output mismatch.

Each model runs in its own Python process (bounded memory, a crash or hang stays local).

Usage::

    python benchmarks/coverage_table.py                       # every model
    python benchmarks/coverage_table.py --models resnet18 vit_b_16 --zero first

Prints a Markdown table and a deduplicated summary of the reasons of every non-exact group;
writes benchmarks/results/coverage.json (every group's precise reason) and coverage.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
import traceback
from collections import OrderedDict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _runner import run_many, run_worker  # noqa: E402

OUTPUT_REASON = re.compile(r"reaches the model output|a region boundary", re.I)  # a region's outputs are its boundary


# ------------------------------------------------------------------------- worker process


def _keep_masks(prog, how: str, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    masks = {}
    for g in prog.groups:
        if not (g.prunable and g.exact) or g.size < 2:
            continue
        n_drop = g.size // 2
        keep = np.ones(g.size, bool)
        drop = np.arange(n_drop) if how == "first" else rng.choice(g.size, n_drop, replace=False)
        keep[drop] = False
        masks[g.id] = keep
    return masks


def _group_record(g) -> dict:
    return {"id": g.id, "size": g.size, "prunable": bool(g.prunable), "exact": bool(g.exact),
            "reason": g.reason, "params": g.params}


def judge(model, inputs: tuple, how: str = "random", seed: int = 0, rtol: float = 1e-4) -> dict:
    """fxprune's verdict on one built model (eval mode, normalisations already randomised).

    Compiles ``model`` (its parameters are zeroed in place: pass a copy to keep them), zeroes
    50% of every prunable exact group (``how``: ``"random"`` or ``"first"`` half), constructs
    the slim model and compares it with the zeroed full model on ``inputs``. Returns the record
    fields (group counts, ``max_rel_diff``, parameters and FLOPs, ``verdict``, and ``error``
    with the failing stage); never raises.
    """
    import _models
    import fxprune
    from fxprune.program import max_output_difference

    rec: dict = {}
    stage = "compile"
    try:
        t0 = time.perf_counter()
        prog = fxprune.compile(model, inputs)
        rec["compile_s"] = time.perf_counter() - t0
        groups = prog.groups
        regions = getattr(prog, "regions", None)  # a region program: nodes of every region
        rec["nodes"] = sum(r.nodes for r in regions) if regions is not None else len(prog.module.graph.nodes)
        if regions is not None:
            rec["regions"] = [r.name for r in regions]
        rec["groups"] = len(groups)
        rec["prunable"] = sum(1 for g in groups if g.prunable)
        rec["prunable_exact"] = sum(1 for g in groups if g.prunable and g.exact)
        rec["inexact"] = sum(1 for g in groups if not g.exact)
        rec["frozen"] = sum(1 for g in groups if not g.prunable)
        rec["channels"] = sum(g.size for g in groups)
        rec["channels_prunable_exact"] = sum(g.size for g in groups if g.prunable and g.exact)
        rec["group_details"] = [_group_record(g) for g in groups]

        stage = "zero"
        masks = _keep_masks(prog, how, seed)
        prog.zero_(masks)
        rec["zeroed_channels"] = int(sum((~m).sum() for m in masks.values()))

        stage = "construct"
        t0 = time.perf_counter()
        slim = prog.construct_subnet(verify=False)
        rec["construct_s"] = time.perf_counter() - t0

        stage = "compare"
        diff, scale = max_output_difference(prog.module, slim, prog.example_inputs)
        rec["max_abs_diff"] = diff
        rec["max_rel_diff"] = diff / scale if scale > 0 else diff

        stage = "report"
        rep = fxprune.report(prog.module, slim, prog.example_inputs)
        rec.update(params_full=rep.params_full, params_slim=rep.params_slim,
                   flops_full=rep.flops_full, flops_slim=rep.flops_slim)
        rec["params_model"] = _models.num_params(model)

        if rec["max_rel_diff"] > rtol:
            rec["verdict"] = "error"
            rec["error"] = (f"output mismatch: max rel diff {rec['max_rel_diff']:.3e} > {rtol:g} "
                            f"(max abs {diff:.3e})")
        elif rec["prunable_exact"] == 0:
            rec["verdict"] = "frozen"
        elif rec["zeroed_channels"] and rec["params_slim"] >= rec["params_full"]:
            rec["verdict"] = "error"
            rec["error"] = f"{rec['zeroed_channels']} channels zeroed but the slim model is not smaller"
        elif rec["inexact"]:
            rec["verdict"] = "inexact"
        elif any(not g.prunable and not OUTPUT_REASON.search(g.reason or "") for g in groups):
            rec["verdict"] = "partial"
        else:
            rec["verdict"] = "exact"
    except Exception as exc:  # noqa: BLE001 - every failure is a row of the table
        rec["verdict"] = "error"
        rec["error"] = f"{stage}: {type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc(limit=-6)
    return rec


def worker(name: str, how: str, seed: int, rtol: float) -> dict:
    import torch

    import _models
    from fxprune.testing import randomize_norms

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    rec: dict = {"model": name, "input": list(_models.input_shape(name))}
    t_start = time.perf_counter()
    try:
        model = _models.build(name, seed=seed)
        randomize_norms(model, seed)
        inputs = _models.example_inputs(name, seed=seed)
    except Exception as exc:  # noqa: BLE001 - every failure is a row of the table
        rec.update(verdict="error", error=f"build: {type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc(limit=-6))
    else:
        rec.update(judge(model, inputs, how, seed, rtol))
    rec["total_s"] = time.perf_counter() - t_start
    return rec


# ------------------------------------------------------------------------- driver


def run_one(name: str, how: str, seed: int, rtol: float, timeout: float) -> dict:
    return run_worker(Path(__file__).resolve(), name,
                      ["--zero", how, "--seed", str(seed), "--rtol", str(rtol)], timeout)


def normalize_reason(reason: str) -> str:
    """A reason with node names, numbers and source lines blanked, for deduplication."""
    r = re.sub(r" at [^\s()]+:\d+", "", reason)
    r = re.sub(r"\s*\(node '[^']*' \([^()]*\)\)", "", r)
    r = re.sub(r"node '[^']*'", "node '*'", r)
    r = re.sub(r"\b\d+\b", "N", r)
    return r.strip()


def _m(x) -> str:
    return "" if x is None else f"{x / 1e6:.2f}"


def _pct(full, slim) -> str:
    if not full or slim is None:
        return ""
    return f"{100 * (1 - slim / full):.1f}%"


def _short(text: str, n: int = 90) -> str:
    text = (text or "").replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


def markdown(records) -> str:
    head = ("| model | input | nodes | groups | prunable | exact | inexact | frozen | params M | slim M | "
            "params cut | FLOPs cut | max rel diff | compile s | verdict |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        shape = "x".join(map(str, r.get("input", [])[2:])) if r.get("input") else ""
        verdict = r["verdict"]
        if verdict == "error":
            verdict += ": " + _short(r.get("error", ""))
        diff = r.get("max_rel_diff")
        lines.append(
            f"| {r['model']} | {shape} | {r.get('nodes', '')} | {r.get('groups', '')} | "
            f"{r.get('prunable', '')} | {r.get('prunable_exact', '')} | {r.get('inexact', '')} | "
            f"{r.get('frozen', '')} | "
            f"{_m(r.get('params_full'))} | {_m(r.get('params_slim'))} | "
            f"{_pct(r.get('params_full'), r.get('params_slim'))} | "
            f"{_pct(r.get('flops_full'), r.get('flops_slim'))} | "
            f"{'' if diff is None else f'{diff:.1e}'} | "
            f"{'' if r.get('compile_s') is None else format(r['compile_s'], '.2f')} | {verdict} |"
        )
    counts = OrderedDict((v, 0) for v in ("exact", "partial", "inexact", "frozen", "error"))
    for r in records:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    lines.append("")
    lines.append("Columns: prunable = groups construction may cut; exact = prunable and exact (these "
                 "are zeroed); inexact = not zero-invariant (e.g. normalised by a LayerNorm), frozen "
                 "or not; frozen = not prunable (every model has one: the group that feeds the output).")
    lines.append("")
    lines.append("Verdicts: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" (of {len(records)})")
    return "\n".join(lines)


def reason_summary(records) -> tuple[str, list]:
    """Deduplicated reasons of every non-exact (frozen or inexact) group, and model errors."""
    buckets: "OrderedDict[str, dict]" = OrderedDict()
    for r in records:
        for g in r.get("group_details", []):
            if g["prunable"] and g["exact"]:
                continue
            kind = ("frozen" if not g["prunable"] else "prunable") + (", inexact" if not g["exact"] else "")
            reason = g["reason"] or "(no reason given)"
            key = f"{kind}: {normalize_reason(reason)}"
            b = buckets.setdefault(key, {"kind": kind, "pattern": normalize_reason(reason),
                                         "groups": 0, "models": [], "example": reason})
            b["groups"] += 1
            if r["model"] not in b["models"]:
                b["models"].append(r["model"])
    items = sorted(buckets.values(), key=lambda b: (-len(b["models"]), -b["groups"]))
    lines = ["| kind | reason (node names and numbers blanked) | groups | models | example |",
             "|---|---|---|---|---|"]
    for b in items:
        models = b["models"]
        shown = ", ".join(models[:6]) + (f", … (+{len(models) - 6})" if len(models) > 6 else "")
        lines.append(f"| {b['kind']} | {_short(b['pattern'], 200)} | {b['groups']} | "
                     f"{len(models)}: {shown} | {_short(b['example'], 200)} |")
    errors = [r for r in records if r["verdict"] == "error"]
    if errors:
        lines += ["", "Errors:", ""]
        for r in errors:
            lines.append(f"- **{r['model']}**: {_short(r.get('error', ''), 600)}")
    return "\n".join(lines), items


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=None, help="default: every classification + segmentation model")
    ap.add_argument("--zero", choices=("random", "first"), default="random",
                    help="which half of each prunable exact group to zero")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rtol", type=float, default=1e-4, help="max |slim - full| / max |full| (float32)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per model")
    ap.add_argument("--jobs", type=int, default=1, help="models run in parallel")
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for coverage.json/.md")
    ap.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.zero, args.seed, args.rtol)))
        return 0

    import _models
    import torch

    names = args.models or _models.ALL
    t0 = time.perf_counter()

    def progress(i, r):
        extra = r.get("error", "") if r["verdict"] == "error" else ""
        print(f"[{i + 1}/{len(names)}] {names[i]}: {r['verdict']} ({r.get('total_s', 0):.1f}s) {_short(extra, 200)}",
              file=sys.stderr, flush=True)

    records = run_many(names, lambda name: run_one(name, args.zero, args.seed, args.rtol, args.timeout),
                       args.jobs, progress)
    wall = time.perf_counter() - t0

    table = markdown(records)
    reasons, buckets = reason_summary(records)
    print(table)
    print()
    print("Reasons of non-exact groups (deduplicated):")
    print()
    print(reasons)
    print(f"\n{len(names)} models in {wall:.0f}s", file=sys.stderr)

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "torchvision": __import__("torchvision").__version__, "cores": os.cpu_count(),
           "threads": int(os.environ.get("BENCH_THREADS", "2")), "dtype": "float32",
           "zero": args.zero, "seed": args.seed, "rtol": args.rtol, "wall_s": wall}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "coverage.json", "w") as f:
        json.dump({"env": env, "models": records, "reasons": buckets}, f, indent=2)
    with open(out / "coverage.md", "w") as f:
        f.write("# fxprune coverage of the torchvision zoo\n\n")
        f.write(f"Generated by `python benchmarks/coverage_table.py` (torch {env['torch']}, "
                f"torchvision {env['torchvision']}, float32, random weights, 50% of every prunable "
                f"exact group zeroed ({args.zero}), seed {args.seed}).\n\n")
        f.write(table + "\n\n## Reasons of non-exact groups (deduplicated)\n\n" + reasons + "\n")
    print(f"wrote {out / 'coverage.json'} and {out / 'coverage.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
