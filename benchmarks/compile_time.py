"""Analysis time and memory: fxprune.compile against Torch-Pruning's groups, same run.

For each model and input size it measures, each (tool, model, size) in a fresh Python process
so that no tool's caches or heap help or hurt another:

* ``fxprune``: ``fxprune.compile(model, example_inputs)``: tracing, shape propagation, op
  semantics, channel dependencies and symbolic shapes, everything up to the groups; with the
  time of each step (``Program.timings`` and ``Program.cpu_timings``);
* ``tp+groups``: ``torch_pruning.DependencyGraph().build_dependency(model, example_inputs)``
  plus ``list(dg.get_all_groups())``: the step that yields what ``fxprune.compile`` yields,
  the denominator of the headline ratio;
* ``tp``: ``build_dependency`` alone;
* ``fx-trace``: fxprune's front end alone (``fxprune.passes.trace``: torch.fx symbolic tracing
  into a GraphModule). No analysis of a symbolically traced graph takes less than this;
* ``fx-floor``: stock ``torch.fx.symbolic_trace`` plus ``ShapeProp(gm).propagate`` on the real
  inputs, the pipeline's first two steps as torch.fx gives them (shape propagation then runs
  the model's forward pass, whose cost grows with the input).

In each process: a warm-up on a 2-block net (imports, first-call costs), one measured run on
the model for memory, then ``--repeats`` timed runs (median wall time and median process CPU
time; on a shared machine the CPU time is the steadier), then one run under ``tracemalloc``.
torch runs on one intra-op thread (``BENCH_THREADS`` overrides). Memory columns: ``rss`` =
peak resident set size of the first run minus the resident size before it (Linux ``VmHWM``
after a reset through ``/proc/self/clear_refs``); ``py`` = ``tracemalloc`` peak (Python heap).

The zoo models run at each of ``--sides`` (default 64 and 224 pixels, batch 1; a ViT is built
for its input size); the synthetic residual nets of ``--depths`` blocks run at 16 pixels, and
the depth sweep gives each tool's log-log slope of time against the torch.fx node count (1 is
linear growth). Each table is made by its own function from the same records, so a table of
another kind of row (e.g. region compiles) can be added beside them.

Usage::

    python benchmarks/compile_time.py                  # everything, medians of 5
    python benchmarks/compile_time.py --models resnet50 vit_b_16 --sides 224 --repeats 3
    python benchmarks/compile_time.py --models resnet_synth_10 resnet_synth_30 --repeats 1

Prints Markdown tables and writes benchmarks/results/compile_time.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _runner import run_worker  # noqa: E402
from _timing import load_average, reset_peak_rss, rss_kib, timed_runs, tp_runner  # noqa: E402

TOOLS = ("fxprune", "tp+groups", "tp", "fx-trace", "fx-floor")
ZOO = ("resnet50", "densenet121", "convnext_tiny", "efficientnet_b0", "regnet_y_400mf", "vit_b_16")
SIDES = (64, 224)
DEPTHS = (100, 300, 1000)  # residual blocks of the synthetic nets of the default depth sweep
SYNTH = "resnet_synth_"
SYNTH_SIDE = 16
PASSES = ("trace", "shape_prop", "op_semantics", "channel_deps", "symbolic_shapes")
TARGET_RATIO = 0.5  # fxprune / (TP build + groups) at the largest size
TARGET_SIZE_GROWTH = 1.2  # fxprune at 224 px / at 64 px
TARGET_DEPTH_GROWTH = 12.0  # fxprune on 1000 blocks / on 100 blocks


# ------------------------------------------------------------------------- worker process


def _runner(tool: str):
    """A function (model, example_inputs) -> summary dict that performs one analysis."""
    if tool == "fxprune":
        import fxprune

        def run(model, inputs):
            prog = fxprune.compile(model, inputs)
            return {"groups": len(prog.groups), "prunable": len(prog.prunable_groups),
                    "nodes": len(prog.module.graph.nodes), "timings": prog.timings, "cpu_timings": prog.cpu_timings}

        return run
    if tool == "fx-trace":
        from fxprune.passes import trace

        def front_end(model, inputs):
            return {"nodes": len(trace(model).graph.nodes)}

        return front_end
    if tool == "fx-floor":
        import torch
        import torch.fx
        from torch.fx.passes.shape_prop import ShapeProp

        def floor(model, inputs):
            gm = torch.fx.symbolic_trace(model)
            with torch.no_grad():
                ShapeProp(gm).propagate(*inputs)
            return {"nodes": len(gm.graph.nodes)}

        return floor
    return tp_runner(tool)


def worker(tool: str, label: str, side: int, repeats: int) -> dict:
    import torch
    import _models

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    run = _runner(tool)

    warm_model, warm_inputs = _models.build_for_benchmark("resnet_synth_2")
    run(warm_model, warm_inputs)
    del warm_model, warm_inputs

    model, inputs = _models.build_for_benchmark(label, side)
    gc.collect()
    rss_before = rss_kib("VmRSS")
    can_reset = reset_peak_rss()
    t0 = time.perf_counter()
    info = run(model, inputs)
    first = time.perf_counter() - t0
    rss_peak = (rss_kib("VmHWM") - rss_before) / 1024 if can_reset else None

    per_pass: Dict[str, Dict[str, List[float]]] = {"wall": {}, "cpu": {}}

    def timed():
        out = run(model, inputs)
        for clock, field in (("wall", "timings"), ("cpu", "cpu_timings")):
            for name, seconds in out.get(field, {}).items():
                per_pass[clock].setdefault(name, []).append(seconds)

    timing = timed_runs(timed, repeats)

    gc.collect()
    tracemalloc.start()
    run(model, inputs)
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    info.pop("timings", None)
    info.pop("cpu_timings", None)
    rec = {"tool": tool, "model": label, "side": side, "input": list(inputs[0].shape), "first_s": first, **timing,
           "rss_peak_mib": rss_peak, "py_peak_mib": py_peak / 2**20, **info}
    if per_pass["wall"]:
        rec["passes_s"] = {name: statistics.median(v) for name, v in per_pass["wall"].items()}
        rec["passes_cpu_s"] = {name: statistics.median(v) for name, v in per_pass["cpu"].items()}
    return rec


# ------------------------------------------------------------------------- driver


def measure(tool: str, label: str, side: int, repeats: int, timeout: float) -> dict:
    rec = run_worker(Path(__file__).resolve(), tool,
                     [label, "--side", str(side), "--repeats", str(repeats)], timeout)
    if "error" in rec:
        return {"tool": tool, "model": label, "side": side, "error": rec["error"]}
    return rec


def cases(models: Sequence[str], sides: Sequence[int]) -> List[tuple]:
    """(model, side) pairs: each zoo model at every side, each synthetic net at its one size."""
    out = []
    for m in models:
        for side in ((SYNTH_SIDE,) if m.startswith(SYNTH) else sides):
            out.append((m, side))
    return out


def key(model: str, side: int) -> str:
    return f"{model}@{side}"


def _fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def _div(a, b):
    return a / b if a and b else None


def _errors(row: dict) -> str:
    return "; ".join(f"{t}: {r['error']}" for t, r in row.items() if "error" in r)


def compile_table(rows: dict, pairs) -> str:
    """Times and memory of every (model, size): fxprune against Torch-Pruning's build plus groups."""
    head = ("| model | input | fx nodes | groups (prunable) | fxprune s | TP build+groups s | fxprune / TP | "
            "fxprune CPU s | TP CPU s | fxprune / TP (CPU) | TP build s | trace alone s | trace / TP | "
            "trace + ShapeProp s | fxprune RSS MiB | TP RSS MiB |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for m, side in pairs:
        row = rows[key(m, side)]
        fx, tpg, tp_ = row.get("fxprune", {}), row.get("tp+groups", {}), row.get("tp", {})
        tr, floor = row.get("fx-trace", {}), row.get("fx-floor", {})
        groups = f"{fx.get('groups', 'n/a')} ({fx.get('prunable', 'n/a')})"
        errs = _errors(row)
        out.append(
            f"| {m} | {side}x{side} | {fx.get('nodes', 'n/a')} | {groups} | {_fmt(fx.get('median_s'))} | "
            f"{_fmt(tpg.get('median_s'))} | {_fmt(_div(fx.get('median_s'), tpg.get('median_s')), '.2f')} | "
            f"{_fmt(fx.get('median_cpu_s'))} | {_fmt(tpg.get('median_cpu_s'))} | "
            f"{_fmt(_div(fx.get('median_cpu_s'), tpg.get('median_cpu_s')), '.2f')} | {_fmt(tp_.get('median_s'))} | "
            f"{_fmt(tr.get('median_s'))} | {_fmt(_div(tr.get('median_s'), tpg.get('median_s')), '.2f')} | "
            f"{_fmt(floor.get('median_s'))} | {_fmt(fx.get('rss_peak_mib'), '.1f')} | "
            f"{_fmt(tpg.get('rss_peak_mib'), '.1f')} |" + (f" {errs}" if errs else ""))
    return "\n".join(out)


def passes_table(rows: dict, pairs, field: str = "passes_cpu_s") -> str:
    """fxprune's median time per step (``Program.cpu_timings``, or ``field="passes_s"``:
    ``Program.timings``, wall clock) for every (model, size)."""
    head = "| model | input | " + " | ".join(f"{p} ms" for p in PASSES) + " | sum ms |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for m, side in pairs:
        steps = rows[key(m, side)].get("fxprune", {}).get(field)
        if not steps:
            continue
        cells = [_fmt(steps.get(p, 0.0) * 1e3, ".1f") for p in PASSES]
        out.append(f"| {m} | {side}x{side} | " + " | ".join(cells) + f" | {sum(steps.values()) * 1e3:.1f} |")
    return "\n".join(out)


def size_table(rows: dict, models, sides) -> str:
    """How each tool's time grows from the smallest to the largest input size."""
    lo, hi = min(sides), max(sides)
    head = (f"| model | fxprune {lo} px s | fxprune {hi} px s | fxprune {hi}/{lo} | TP build+groups {lo} px s | "
            f"TP build+groups {hi} px s | TP {hi}/{lo} |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in models:
        if m.startswith(SYNTH) or lo == hi:
            continue
        a, b = rows.get(key(m, lo), {}), rows.get(key(m, hi), {})
        fa, fb = a.get("fxprune", {}).get("median_s"), b.get("fxprune", {}).get("median_s")
        ta, tb = a.get("tp+groups", {}).get("median_s"), b.get("tp+groups", {}).get("median_s")
        out.append(f"| {m} | {_fmt(fa)} | {_fmt(fb)} | {_fmt(_div(fb, fa), '.2f')} | {_fmt(ta)} | {_fmt(tb)} | "
                   f"{_fmt(_div(tb, ta), '.2f')} |")
    return "\n".join(out)


def summarize(rows: dict, models, sides) -> dict:
    summary: dict = {}
    zoo = [m for m in models if not m.startswith(SYNTH)]
    def ratios(metric, top, bottom):
        """model -> ``top`` / ``bottom``, each a (tool, side), over the zoo models that have both."""
        out = {m: _div(rows[key(m, top[1])].get(top[0], {}).get(metric),
                       rows[key(m, bottom[1])].get(bottom[0], {}).get(metric)) for m in zoo}
        return {m: r for m, r in out.items() if r}

    for metric, label in (("median_s", "wall"), ("median_cpu_s", "cpu")):
        for side in sides:
            fx = ratios(metric, ("fxprune", side), ("tp+groups", side))
            if fx:
                summary[f"fxprune_over_tp_groups_{label}_{side}"] = fx
                summary[f"fxprune_over_tp_groups_{label}_{side}_max"] = max(fx.values())
            trace = ratios(metric, ("fx-trace", side), ("tp+groups", side))
            if trace:
                summary[f"trace_over_tp_groups_{label}_{side}"] = trace
        if len(sides) > 1:
            lo, hi = min(sides), max(sides)
            growth = ratios(metric, ("fxprune", hi), ("fxprune", lo))
            if growth:
                summary[f"fxprune_{hi}_over_{lo}_{label}"] = growth
                summary[f"fxprune_{hi}_over_{lo}_{label}_max"] = max(growth.values())
        deep, shallow = key(f"{SYNTH}1000", SYNTH_SIDE), key(f"{SYNTH}100", SYNTH_SIDE)
        if deep in rows and shallow in rows:
            for tool in ("fxprune", "tp+groups"):
                g = _div(rows[deep].get(tool, {}).get(metric), rows[shallow].get(tool, {}).get(metric))
                if g:
                    summary[f"{tool}_1000_over_100_{label}"] = g
    return summary


def summary_lines(summary: dict, sides) -> List[str]:
    lines = []
    hi, lo = max(sides), min(sides)
    for label in ("wall", "cpu"):
        for side in sorted(sides, reverse=True):
            mx = summary.get(f"fxprune_over_tp_groups_{label}_{side}_max")
            if mx:
                ratios = summary[f"fxprune_over_tp_groups_{label}_{side}"]
                met = [m for m, r in ratios.items() if r <= TARGET_RATIO]
                lines.append(f"fxprune / Torch-Pruning build+groups at {side} px ({label} time): max {mx:.2f}; "
                             f"<= {TARGET_RATIO} on {len(met)} of {len(ratios)} models"
                             + (f" (target applies at {hi} px)" if side != hi else ""))
            trace = summary.get(f"trace_over_tp_groups_{label}_{side}")
            if trace:
                lines.append(f"  tracing alone / Torch-Pruning build+groups at {side} px ({label}): "
                             + ", ".join(f"{m} {r:.2f}" for m, r in trace.items()))
        g = summary.get(f"fxprune_{hi}_over_{lo}_{label}_max")
        if g:
            lines.append(f"fxprune {hi} px / {lo} px ({label} time): max {g:.2f} (target <= {TARGET_SIZE_GROWTH})")
        g = summary.get(f"fxprune_1000_over_100_{label}")
        if g:
            tp_g = summary.get(f"tp+groups_1000_over_100_{label}")
            lines.append(f"fxprune 1000 blocks / 100 blocks ({label} time): {g:.2f}x (target <= {TARGET_DEPTH_GROWTH:g}x; "
                         f"linear growth = 10x)" + (f"; Torch-Pruning build+groups {tp_g:.2f}x" if tp_g else ""))
    return lines


def fx_graph_nodes(label: str) -> int:
    """Node count of the torch.fx graph of a model (plain symbolic tracing, no analysis): the
    graph size the depth sweep's times are set against, the same for every tool."""
    import torch.fx
    import _models

    model, _ = _models.build_for_benchmark(label)
    return len(torch.fx.symbolic_trace(model).graph.nodes)


def loglog_slope(x, y) -> Optional[float]:
    """Least-squares slope of ``log y`` against ``log x`` (``numpy.polyfit``, degree 1) over the
    points where both are positive; None with fewer than two such points. 1 = linear growth."""
    import numpy as np

    pts = [(a, b) for a, b in zip(x, y) if a and b and a > 0 and b > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.log(np.array(pts, dtype=float)).T
    return float(np.polyfit(lx, ly, 1)[0])


def depth_sweep(rows: dict, models) -> dict:
    """Per synthetic net (by depth): graph nodes, median wall and CPU time and peak memory of
    each tool; per tool the log-log slope of its time against the node count. Empty when fewer
    than two synthetic nets were measured."""
    labels = sorted((m for m in models if m.startswith(SYNTH)), key=lambda m: int(m[len(SYNTH):]))
    if len(labels) < 2:
        return {}
    keys = ("median_s", "median_cpu_s", "rss_peak_mib", "py_peak_mib")
    points = []
    for m in labels:
        point = {"model": m, "blocks": int(m[len(SYNTH):]), "fx_nodes": fx_graph_nodes(m)}
        for tool, r in rows[key(m, SYNTH_SIDE)].items():
            point[tool] = {k: r.get(k) for k in keys}
        points.append(point)
    nodes = [p["fx_nodes"] for p in points]
    slopes = {}
    for tool in TOOLS:
        for k, label in (("median_s", "wall"), ("median_cpu_s", "cpu")):
            slope = loglog_slope(nodes, [p.get(tool, {}).get(k) for p in points])
            if slope is not None:
                slopes[f"{tool}_{label}"] = slope
    return {"points": points, "slopes": slopes}


def sweep_table(sweep: dict) -> str:
    head = ("| blocks | fx nodes | fxprune s | TP build+groups s | TP build s | trace alone s | "
            "fxprune RSS MiB | TP build+groups RSS MiB |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in sweep["points"]:
        fx, tpg, tp_, tr = (p.get(t, {}) for t in ("fxprune", "tp+groups", "tp", "fx-trace"))
        out.append(f"| {p['blocks']} | {p['fx_nodes']} | {_fmt(fx.get('median_s'))} | {_fmt(tpg.get('median_s'))} | "
                   f"{_fmt(tp_.get('median_s'))} | {_fmt(tr.get('median_s'))} | {_fmt(fx.get('rss_peak_mib'), '.1f')} | "
                   f"{_fmt(tpg.get('rss_peak_mib'), '.1f')} |")
    names = {"fxprune": "fxprune", "tp+groups": "Torch-Pruning build+groups", "tp": "Torch-Pruning build",
             "fx-trace": "tracing alone", "fx-floor": "torch.fx trace + ShapeProp"}
    parts = []
    for tool, name in names.items():
        wall, cpu = sweep["slopes"].get(f"{tool}_wall"), sweep["slopes"].get(f"{tool}_cpu")
        if wall is not None or cpu is not None:
            parts.append(f"{name} {_fmt(wall, '.2f')} (CPU {_fmt(cpu, '.2f')})")
    if parts:
        out += ["", "log-log slope of time against fx graph nodes (numpy.polyfit on logs; 1 = linear): "
                + "; ".join(parts)]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=None,
                    help="zoo names or resnet_synth_N; default: the six zoo models and resnet_synth_N for "
                         "N in --depths")
    ap.add_argument("--sides", nargs="*", type=int, default=list(SIDES), help="input sizes of the zoo models")
    ap.add_argument("--depths", nargs="*", type=int, default=list(DEPTHS),
                    help="residual blocks of the synthetic nets of the default model list")
    ap.add_argument("--tools", nargs="*", default=list(TOOLS), choices=TOOLS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=str(HERE / "results" / "compile_time.json"))
    ap.add_argument("--worker", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    ap.add_argument("--side", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.side, args.repeats)))
        return 0

    import torch

    models = args.models or list(ZOO) + [f"{SYNTH}{d}" for d in args.depths]
    pairs = cases(models, args.sides)
    load_start = load_average()
    rows: dict = {key(m, side): {} for m, side in pairs}
    for m, side in pairs:
        deep = m.startswith(SYNTH) and int(m[len(SYNTH):]) >= 1000
        repeats = min(args.repeats, 3) if deep else args.repeats
        for tool in args.tools:
            r = measure(tool, m, side, repeats, args.timeout)
            rows[key(m, side)][tool] = r
            msg = r.get("error") or f"median {r['median_s']:.3f}s (CPU {r['median_cpu_s']:.3f}s)"
            print(f"[{m} @ {side} / {tool}] {msg}", file=sys.stderr, flush=True)

    zoo_pairs = [p for p in pairs if not p[0].startswith(SYNTH)]
    summary = summarize(rows, models, args.sides)
    print(compile_table(rows, pairs))
    print()
    print("fxprune.compile by step, median process CPU ms (`Program.cpu_timings`):\n")
    print(passes_table(rows, pairs))
    if len(args.sides) > 1 and zoo_pairs:
        print()
        print(size_table(rows, models, args.sides))
    sweep = depth_sweep(rows, models)
    if sweep:
        summary["depth_sweep"] = sweep
        print()
        print(sweep_table(sweep))
    print()
    print("\n".join(summary_lines(summary, args.sides)))

    try:
        import torch_pruning
        tp_version = torch_pruning.__version__
    except Exception:  # noqa: BLE001 - reported, not fatal
        tp_version = None
    env = {
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_pruning": tp_version, "cpu": platform.processor() or platform.machine(),
        "threads": int(os.environ.get("BENCH_THREADS", "1")),
        "loadavg_start": load_start, "loadavg_end": load_average(), "cores": os.cpu_count(),
        "sides": args.sides, "repeats": args.repeats,
        "memory": {"rss_peak_mib": "peak RSS (VmHWM) during the first run minus RSS before it",
                   "py_peak_mib": "tracemalloc peak, Python heap only"},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"env": env, "summary": summary, "results": rows}, f, indent=2)
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
