"""Analysis time and memory: fxprune.compile vs Torch-Pruning's dependency graph, same run.

For each model it measures

* ``fxprune``: ``fxprune.compile(model, example_inputs)``, i.e. torch.fx tracing, shape
  propagation, op semantics and channel dependencies (everything up to the groups);
* ``tp``: ``torch_pruning.DependencyGraph().build_dependency(model, example_inputs)``;
* ``tp+groups``: the same plus enumerating its pruning groups (``get_all_groups()``), the
  step that yields what ``fxprune.compile`` yields (not part of the headline ratio);
* ``fx-floor``: stock ``torch.fx.symbolic_trace(model)`` and
  ``torch.fx.passes.shape_prop.ShapeProp(gm).propagate(*example_inputs)`` and nothing else:
  the two passes fxprune's pipeline starts with (symbolic tracing and shape propagation), run
  bare. No analysis built on a torch.fx graph with shapes can take less time than this floor.

Each (model, tool) pair runs in a fresh Python process, so that one tool's caches and heap
never help or hurt the other. In that process: a warm-up on a 2-block net (imports, first-call
costs), then one measured run on the model for memory, then ``--repeats`` timed runs (median
reported, as wall time and as process CPU time: on a shared machine the CPU time is the
steadier of the two), then one run under ``tracemalloc``. torch runs on one intra-op thread
(``BENCH_THREADS`` overrides): both analyses are single-threaded Python around one forward
pass, and an oversubscribed thread pool only adds noise. Inputs are the zoo's small ones
(64x64; ``--side 224`` for ImageNet size), so that the graph analysis, not the convolution
arithmetic of the forward pass both tools run, is what is measured. Memory columns:

* ``rss`` = peak resident set size during the first run on the model minus the resident size
  just before it (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``). Counts
  everything: Python objects, tensors, native allocations.
* ``py`` = ``tracemalloc`` peak: Python-heap allocations only (tensor storage is not included).

Depth sweep: the default list ends with the synthetic residual nets of 100, 300 and 1000 blocks
(``--depths``). Over every ``resnet_synth_N`` measured, a second table gives each depth's node
count of the torch.fx graph (plain symbolic tracing, the same graph size for every tool), the
median times and the peak memory, and the log-log slope of each tool's time against that node
count (least squares on the logs, ``numpy.polyfit``): 1 is linear growth, 2 quadratic.

Usage::

    python benchmarks/compile_time.py                 # all models, 5 repeats (3 for 1000 blocks)
    python benchmarks/compile_time.py --models resnet50 resnet_synth_100 --repeats 3
    python benchmarks/compile_time.py --models resnet_synth_10 resnet_synth_30 --repeats 1

Prints Markdown tables and writes benchmarks/results/compile_time.json (the sweep under
``summary.depth_sweep``).
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _runner import run_worker  # noqa: E402
from _timing import load_average, timed_runs, tp_runner  # noqa: E402

TOOLS = ("fxprune", "tp", "tp+groups", "fx-floor")
DEPTHS = (100, 300, 1000)  # residual blocks of the synthetic nets of the default depth sweep
SYNTH = "resnet_synth_"


# ------------------------------------------------------------------------- worker process


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _runner(tool: str):
    """A function (model, example_inputs) -> summary dict that performs one analysis."""
    if tool == "fxprune":
        import fxprune

        def run(model, inputs):
            prog = fxprune.compile(model, inputs)
            return {"groups": len(prog.groups), "nodes": len(prog.module.graph.nodes)}

        return run
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
    rss_before = _status_kb("VmRSS")
    can_reset = _reset_peak_rss()
    t0 = time.perf_counter()
    info = run(model, inputs)
    first = time.perf_counter() - t0
    rss_peak = (_status_kb("VmHWM") - rss_before) / 1024 if can_reset else None

    timing = timed_runs(lambda: run(model, inputs), repeats)

    gc.collect()
    tracemalloc.start()
    run(model, inputs)
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    return {
        "tool": tool, "model": label, "input": list(inputs[0].shape),
        "first_s": first, **timing,
        "rss_peak_mib": rss_peak, "py_peak_mib": py_peak / 2**20, **info,
    }


# ------------------------------------------------------------------------- driver


def measure(tool: str, label: str, side: int, repeats: int, timeout: float) -> dict:
    rec = run_worker(Path(__file__).resolve(), tool, [label, "--side", str(side), "--repeats", str(repeats)],
                     timeout)
    if "error" in rec:
        return {"tool": tool, "model": label, "error": rec["error"]}
    return rec


def _fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def _div(a, b):
    return a / b if a and b else None


def table(rows: dict, models) -> str:
    head = ("| model | input | fx nodes | groups | fxprune s | TP build s | fxprune/TP | "
            "fxprune CPU s | TP CPU s | fxprune/TP (CPU) | fx floor CPU s | floor/TP (CPU) | TP build+groups s | "
            "fxprune RSS MiB | TP RSS MiB | fxprune py MiB | TP py MiB |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in models:
        fx, tp_, tpg = rows[m].get("fxprune", {}), rows[m].get("tp", {}), rows[m].get("tp+groups", {})
        floor = rows[m].get("fx-floor", {})
        shape = fx.get("input") or tp_.get("input") or []
        errs = "; ".join(f"{t}: {r['error']}" for t, r in rows[m].items() if "error" in r)
        out.append(
            f"| {m} | {'x'.join(map(str, shape))} | {fx.get('nodes', 'n/a')} | {fx.get('groups', 'n/a')} | "
            f"{_fmt(fx.get('median_s'))} | {_fmt(tp_.get('median_s'))} | "
            f"{_fmt(_div(fx.get('median_s'), tp_.get('median_s')), '.2f')} | "
            f"{_fmt(fx.get('median_cpu_s'))} | {_fmt(tp_.get('median_cpu_s'))} | "
            f"{_fmt(_div(fx.get('median_cpu_s'), tp_.get('median_cpu_s')), '.2f')} | "
            f"{_fmt(floor.get('median_cpu_s'))} | "
            f"{_fmt(_div(floor.get('median_cpu_s'), tp_.get('median_cpu_s')), '.2f')} | "
            f"{_fmt(tpg.get('median_s'))} | {_fmt(fx.get('rss_peak_mib'), '.1f')} | "
            f"{_fmt(tp_.get('rss_peak_mib'), '.1f')} | {_fmt(fx.get('py_peak_mib'), '.1f')} | "
            f"{_fmt(tp_.get('py_peak_mib'), '.1f')} |" + (f" {errs}" if errs else "")
        )
    return "\n".join(out)


def summarize(rows: dict, models) -> dict:
    summary: dict = {}
    for key, label in (("median_s", "wall"), ("median_cpu_s", "cpu")):
        fx = {m: rows[m].get("fxprune", {}).get(key) for m in models}
        tp_ = {m: rows[m].get("tp", {}).get(key) for m in models}
        growth = _div(fx.get("resnet_synth_1000"), fx.get("resnet_synth_100"))
        if growth:
            summary[f"fxprune_1000_over_100_{label}"] = growth
        growth_tp = _div(tp_.get("resnet_synth_1000"), tp_.get("resnet_synth_100"))
        if growth_tp:
            summary[f"tp_1000_over_100_{label}"] = growth_tp
        ratios = {m: fx[m] / tp_[m] for m in models if fx.get(m) and tp_.get(m)}
        summary[f"fxprune_over_tp_{label}"] = ratios
        if ratios:
            summary[f"fxprune_over_tp_{label}_max"] = max(ratios.values())
            summary[f"fxprune_over_tp_{label}_geomean"] = statistics.geometric_mean(ratios.values())
        floor = {m: rows[m].get("fx-floor", {}).get(key) for m in models}
        floors = {m: floor[m] / tp_[m] for m in models if floor.get(m) and tp_.get(m)}
        if floors:
            summary[f"floor_over_tp_{label}"] = floors
            summary[f"floor_over_tp_{label}_min"] = min(floors.values())
    return summary


def summary_lines(summary: dict) -> list:
    lines = []
    for label in ("wall", "cpu"):
        g = summary.get(f"fxprune_1000_over_100_{label}")
        if g:
            lines.append(f"fxprune {label} time, 1000 blocks / 100 blocks: {g:.2f}x "
                         f"(target <= 12x; linear growth = 10x)")
        g = summary.get(f"tp_1000_over_100_{label}")
        if g:
            lines.append(f"Torch-Pruning {label} time, 1000 blocks / 100 blocks: {g:.2f}x")
        mx = summary.get(f"fxprune_over_tp_{label}_max")
        if mx:
            lines.append(f"fxprune / Torch-Pruning build_dependency ({label} time): max {mx:.2f}, "
                         f"geometric mean {summary[f'fxprune_over_tp_{label}_geomean']:.2f} (target <= 0.5)")
        fl = summary.get(f"floor_over_tp_{label}_min")
        if fl:
            lines.append(f"torch.fx symbolic_trace + ShapeProp alone / Torch-Pruning build_dependency "
                         f"({label} time): min {fl:.2f} over the models")
    return lines


def default_models(depths) -> list:
    """The zoo models of ``_models.COMPILE_TIME_MODELS`` and one synthetic net per depth."""
    import _models

    zoo = [m for m in _models.COMPILE_TIME_MODELS if not m.startswith(SYNTH)]
    return zoo + [f"{SYNTH}{d}" for d in depths]


def fx_graph_nodes(label: str) -> int:
    """Node count of the torch.fx graph of a model (plain symbolic tracing, no analysis): the
    graph size the depth sweep's times are set against, the same for every tool."""
    import torch.fx
    import _models

    model, _ = _models.build_for_benchmark(label)
    return len(torch.fx.symbolic_trace(model).graph.nodes)


def loglog_slope(x, y):
    """Least-squares slope of ``log y`` against ``log x`` (``numpy.polyfit``, degree 1) over the
    points where both are positive; None with fewer than two such points. 1 = linear growth."""
    import numpy as np

    pts = [(a, b) for a, b in zip(x, y) if a and b and a > 0 and b > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.log(np.array(pts, dtype=float)).T
    return float(np.polyfit(lx, ly, 1)[0])


def depth_sweep(rows: dict, models) -> dict:
    """Per synthetic net of ``models`` (by depth): graph nodes, median wall and CPU time and
    peak memory of each tool; and per tool the log-log slope of its wall and CPU time against
    the node count. Empty when fewer than two synthetic nets were measured."""
    labels = sorted((m for m in models if m.startswith(SYNTH)), key=lambda m: int(m[len(SYNTH):]))
    if len(labels) < 2:
        return {}
    keys = ("median_s", "median_cpu_s", "rss_peak_mib", "py_peak_mib")
    points = []
    for m in labels:
        point = {"model": m, "blocks": int(m[len(SYNTH):]), "fx_nodes": fx_graph_nodes(m)}
        for tool, r in rows[m].items():
            point[tool] = {k: r.get(k) for k in keys}
        points.append(point)
    nodes = [p["fx_nodes"] for p in points]
    slopes = {}
    for tool in sorted({t for p in points for t in p if t in TOOLS}, key=TOOLS.index):
        for key, label in (("median_s", "wall"), ("median_cpu_s", "cpu")):
            slopes[f"{tool}_{label}"] = loglog_slope(nodes, [p.get(tool, {}).get(key) for p in points])
    return {"points": points, "slopes": slopes}


def sweep_table(sweep: dict) -> str:
    head = ("| blocks | fx nodes | fxprune s | fxprune CPU s | TP build s | TP CPU s | TP build+groups s | "
            "fxprune RSS MiB | TP RSS MiB | fxprune py MiB | TP py MiB |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in sweep["points"]:
        fx, tp_, tpg = p.get("fxprune", {}), p.get("tp", {}), p.get("tp+groups", {})
        out.append(f"| {p['blocks']} | {p['fx_nodes']} | {_fmt(fx.get('median_s'))} | {_fmt(fx.get('median_cpu_s'))} | "
                   f"{_fmt(tp_.get('median_s'))} | {_fmt(tp_.get('median_cpu_s'))} | {_fmt(tpg.get('median_s'))} | "
                   f"{_fmt(fx.get('rss_peak_mib'), '.1f')} | {_fmt(tp_.get('rss_peak_mib'), '.1f')} | "
                   f"{_fmt(fx.get('py_peak_mib'), '.1f')} | {_fmt(tp_.get('py_peak_mib'), '.1f')} |")
    names = {"fxprune": "fxprune", "tp": "Torch-Pruning build", "tp+groups": "Torch-Pruning build+groups",
             "fx-floor": "torch.fx trace + ShapeProp"}
    parts = []
    for tool, name in names.items():
        wall, cpu = sweep["slopes"].get(f"{tool}_wall"), sweep["slopes"].get(f"{tool}_cpu")
        if wall is not None or cpu is not None:
            parts.append(f"{name} {_fmt(wall, '.2f')} (CPU {_fmt(cpu, '.2f')})")
    if parts:
        out.append("")
        out.append("log-log slope of time against fx graph nodes (numpy.polyfit on logs; 1 = linear): "
                   + "; ".join(parts))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=None,
                    help="models to measure (zoo names or resnet_synth_N); default: the zoo models of "
                         "_models.COMPILE_TIME_MODELS and resnet_synth_N for N in --depths")
    ap.add_argument("--depths", nargs="*", type=int, default=list(DEPTHS),
                    help="residual blocks of the synthetic nets of the default model list")
    ap.add_argument("--tools", nargs="*", default=list(TOOLS), choices=TOOLS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--side", type=int, default=0,
                    help="input side for torchvision models; 0 = the zoo's small default "
                         "(64 for these four); synthetic nets always take 16")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=str(HERE / "results" / "compile_time.json"))
    ap.add_argument("--worker", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.side, args.repeats)))
        return 0

    import torch

    models = args.models or default_models(args.depths)
    load_start = load_average()
    rows: dict = {m: {} for m in models}
    for m in models:
        deep = m.startswith(SYNTH) and int(m[len(SYNTH):]) >= 1000
        repeats = min(args.repeats, 3) if deep else args.repeats
        for tool in args.tools:
            r = measure(tool, m, args.side, repeats, args.timeout)
            rows[m][tool] = r
            msg = r.get("error") or f"median {r['median_s']:.3f}s"
            print(f"[{m} / {tool}] {msg}", file=sys.stderr, flush=True)

    md = table(rows, models)
    print(md)
    summary = summarize(rows, models)
    sweep = depth_sweep(rows, models)
    if sweep:
        summary["depth_sweep"] = sweep
        print()
        print(sweep_table(sweep))
    print()
    print("\n".join(summary_lines(summary)))

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
        "side": args.side, "repeats": args.repeats,
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
