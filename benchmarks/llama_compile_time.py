"""Analysis time of Llama-shaped models: fxprune.compile against Torch-Pruning, and an 8B one.

Two configurations of HuggingFace's ``LlamaModel`` (built from a config, nothing downloaded;
``use_cache=False``; the input is one sequence of 32 token ids):

* ``small``: 32 decoder layers, hidden 512, 8 query / 2 key-value heads, intermediate 1376,
  vocabulary 1000, random weights on the CPU;
* ``8b``: the shape of Llama 3 8B: 32 layers, hidden 4096, 32 query / 8 key-value heads,
  intermediate 14336, vocabulary 128256, built on the meta device (no weights in memory: 8.0
  billion parameters would take 32 GB), with meta token ids. Torch-Pruning does not run on it:
  it traces an eager forward pass, which transformers' mask code cannot run on meta tensors
  (it reads a value with ``.item()``).

For each tool and configuration, in a fresh Python process (so that no tool's caches or heap
help or hurt another):

* ``fxprune``: ``fxprune.compile(model, (input_ids,))`` with the default ``frontend="auto"``:
  symbolic tracing is tried first; transformers 5 has no fx tracer, so ``torch.export`` builds
  the graph (the failed attempt is part of the time, as a user pays it). The time of each step
  comes from ``Program.timings`` (``trace`` is the front end, here ``torch.export``);
* ``tp``: ``torch_pruning.DependencyGraph().build_dependency(model, example_inputs=...)``;
* ``tp+groups``: the same plus enumerating its pruning groups (``get_all_groups()``).

In each process: one warm-up run on a 2-layer model of the same width (imports, first-call
costs), one first run on the model with its peak memory (the process's peak resident set
size, Linux ``VmHWM``, reset just before the run, and its growth over the resident size before
it), then ``--repeats`` timed runs (median wall time and median process CPU time; on a shared
machine the CPU time is the steadier). torch runs on one intra-op thread (``BENCH_THREADS``
overrides). A tool that fails records its error.

Usage::

    python benchmarks/llama_compile_time.py [--repeats 3] [--configs small 8b] [--layers 32]

Prints a Markdown table per configuration and writes benchmarks/results/llama_compile_time.json.
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
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _runner import run_worker  # noqa: E402
from _timing import load_average, reset_peak_rss, rss_kib, timed_runs, tp_runner  # noqa: E402

TOOLS = ("fxprune", "tp", "tp+groups")
CONFIGS = {
    "small": dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=2,
                  vocab_size=1000, max_position_embeddings=256, use_cache=False),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, use_cache=False),
}
META = {"small": False, "8b": True}  # built on the meta device
# Torch-Pruning traces an eager forward pass with autograd, which LlamaModel cannot run on the
# meta device (transformers' mask code reads a value with .item()): fxprune alone runs on "8b"
TOOLS_OF = {"small": TOOLS, "8b": ("fxprune",)}
SEQ = 32
PASSES = ("trace", "shape_prop", "op_semantics", "channel_deps", "symbolic_shapes")
TARGET_8B_S = 10.0
TARGET_8B_MIB = 2048.0


def build(config: str, layers: int):
    import torch
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(num_hidden_layers=layers, **CONFIGS[config])
    if META[config]:
        with torch.device("meta"):
            model = LlamaModel(cfg).eval()
        return model, (torch.zeros(1, SEQ, dtype=torch.long, device="meta"),)
    torch.manual_seed(0)
    model = LlamaModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    return model, (ids,)


def _runner(tool: str):
    if tool == "fxprune":
        import torch
        import fxprune

        def run(model, inputs):
            prog = fxprune.compile(model, inputs)
            exported = any(isinstance(n.target, torch._ops.OpOverload) for n in prog.module.graph.nodes)
            return {"groups": len(prog.groups), "prunable": len(prog.prunable_groups),
                    "nodes": len(prog.module.graph.nodes), "frontend": "export" if exported else "fx",
                    "timings": prog.timings, "cpu_timings": prog.cpu_timings}

        return run
    return tp_runner(tool)


def worker(tool: str, config: str, layers: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    rec = {"tool": tool, "config": config, "layers": layers}
    try:
        run = _runner(tool)
        warm, warm_inputs = build(config, 2)
        run(warm, warm_inputs)
        del warm, warm_inputs
        model, inputs = build(config, layers)
        rec["params"] = sum(p.numel() for p in model.parameters())
        gc.collect()
        rss_before = rss_kib("VmRSS")
        can_reset = reset_peak_rss()
        t0 = time.perf_counter()
        info = run(model, inputs)
        rec["first_s"] = time.perf_counter() - t0
        if can_reset:
            rec["peak_rss_mib"] = rss_kib("VmHWM") / 1024
            rec["rss_growth_mib"] = rec["peak_rss_mib"] - rss_before / 1024
        per_pass: Dict[str, Dict[str, List[float]]] = {"wall": {}, "cpu": {}}

        def collect(out: dict) -> None:
            for clock, field in (("wall", "timings"), ("cpu", "cpu_timings")):
                for name, seconds in out.pop(field, {}).items():
                    per_pass[clock].setdefault(name, []).append(seconds)

        collect(info)
        rec.update(info)
        rec.update(timed_runs(lambda: collect(run(model, inputs)), repeats))
        if per_pass["wall"]:
            rec["passes_s"] = {name: statistics.median(v) for name, v in per_pass["wall"].items()}
            rec["passes_cpu_s"] = {name: statistics.median(v) for name, v in per_pass["cpu"].items()}
    except Exception as exc:  # noqa: BLE001 - recorded in the table
        msg = " ".join(str(exc).split())
        rec["error"] = f"{type(exc).__name__}: {msg[:600]}"
    return rec


def measure(tool: str, config: str, layers: int, repeats: int, timeout: float) -> dict:
    rec = run_worker(Path(__file__).resolve(), tool,
                     ["--configs", config, "--layers", str(layers), "--repeats", str(repeats)], timeout)
    if "error" in rec:
        return {"tool": tool, "config": config, "layers": layers, "error": rec["error"]}
    return rec


def _f(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def _div(a, b):
    return a / b if a and b else None


def tools_table(rows: dict) -> str:
    """One configuration: every tool's time and memory, and fxprune's against Torch-Pruning's."""
    head = ("| tool | frontend | graph nodes | groups (prunable) | first run s | median s | median CPU s | "
            "vs TP build+groups (wall) | vs TP build+groups (CPU) | peak RSS MiB | RSS growth MiB | error |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    tpg = rows.get("tp+groups", {})
    for tool in TOOLS:
        r = rows.get(tool)
        if r is None:
            continue
        groups = r.get("groups", "")
        if "prunable" in r:
            groups = f"{groups} ({r['prunable']})"
        out.append(f"| {tool} | {r.get('frontend', '')} | {r.get('nodes', '')} | {groups} | {_f(r.get('first_s'))} | "
                   f"{_f(r.get('median_s'))} | {_f(r.get('median_cpu_s'))} | "
                   f"{_f(_div(r.get('median_s'), tpg.get('median_s')))} | "
                   f"{_f(_div(r.get('median_cpu_s'), tpg.get('median_cpu_s')))} | {_f(r.get('peak_rss_mib'), '.0f')} | "
                   f"{_f(r.get('rss_growth_mib'), '.0f')} | {r.get('error', '')} |")
    return "\n".join(out)


def passes_table(results: dict) -> str:
    """fxprune's median time per step in each configuration, wall clock and process CPU."""
    head = "| configuration | clock | " + " | ".join(f"{p} s" for p in PASSES) + " | sum s |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for config, rows in results.items():
        for clock, field in (("wall", "passes_s"), ("CPU", "passes_cpu_s")):
            steps = rows.get("fxprune", {}).get(field)
            if steps:
                out.append(f"| {config} | {clock} | " + " | ".join(_f(steps.get(p, 0.0), ".3f") for p in PASSES)
                           + f" | {sum(steps.values()):.3f} |")
    return "\n".join(out)


def describe(config: str, layers: int) -> str:
    c = CONFIGS[config]
    where = "meta device, meta token ids" if META[config] else "random weights on the CPU"
    return (f"`{config}`: LlamaModel, {layers} layers, hidden {c['hidden_size']}, {c['num_attention_heads']} q / "
            f"{c['num_key_value_heads']} kv heads, intermediate {c['intermediate_size']}, vocab {c['vocab_size']}, "
            f"1x{SEQ} token ids, {where}")


def summarize(results: dict) -> dict:
    summary = {}
    for config, rows in results.items():
        fx, tpg = rows.get("fxprune", {}), rows.get("tp+groups", {})
        if fx.get("median_s") and tpg.get("median_s"):
            summary[f"{config}_fxprune_over_tp_groups_wall"] = fx["median_s"] / tpg["median_s"]
            summary[f"{config}_fxprune_over_tp_groups_cpu"] = fx["median_cpu_s"] / tpg["median_cpu_s"]
    fx8 = results.get("8b", {}).get("fxprune", {})
    if fx8.get("first_s"):
        summary["8b_first_s"] = fx8["first_s"]
        summary["8b_median_s"] = fx8.get("median_s")
        summary["8b_peak_rss_mib"] = fx8.get("peak_rss_mib")
    return summary


def summary_lines(summary: dict) -> List[str]:
    lines = []
    for config in CONFIGS:
        r = summary.get(f"{config}_fxprune_over_tp_groups_wall")
        if r:
            lines.append(f"{config}: fxprune.compile / Torch-Pruning build+groups: {r:.2f}x wall, "
                         f"{summary[f'{config}_fxprune_over_tp_groups_cpu']:.2f}x CPU")
    if "8b_first_s" in summary:
        lines.append(f"8b: fxprune.compile {summary['8b_first_s']:.2f} s first run, "
                     f"{_f(summary['8b_median_s'])} s median (target <= {TARGET_8B_S:g} s); peak RSS "
                     f"{_f(summary['8b_peak_rss_mib'], '.0f')} MiB (target <= {TARGET_8B_MIB:.0f} MiB)")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tools", nargs="*", default=list(TOOLS), choices=TOOLS)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=str(HERE / "results" / "llama_compile_time.json"))
    ap.add_argument("--worker", metavar="TOOL", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.configs[0], args.layers, args.repeats)))
        return 0

    load_start = load_average()
    results: Dict[str, dict] = {}
    for config in args.configs:
        results[config] = {}
        for tool in [t for t in args.tools if t in TOOLS_OF[config]]:
            r = measure(tool, config, args.layers, args.repeats, args.timeout)
            results[config][tool] = r
            print(f"[{config} / {tool}] " + (r.get("error") or f"median {r['median_s']:.2f}s "
                                               f"(CPU {r['median_cpu_s']:.2f}s)"), file=sys.stderr, flush=True)
    for config, rows in results.items():
        print(describe(config, args.layers) + "\n")
        print(tools_table(rows))
        print()
    print("fxprune.compile by step (`Program.timings` and `Program.cpu_timings`, medians):\n")
    print(passes_table(results))
    summary = summarize(results)
    print()
    print("\n".join(summary_lines(summary)))

    import torch
    import transformers

    try:
        import torch_pruning

        tp_version = torch_pruning.__version__
    except ImportError:
        tp_version = None
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "torch_pruning": tp_version, "machine": platform.machine(), "cpus": os.cpu_count(),
           "threads": int(os.environ.get("BENCH_THREADS", "1")), "loadavg_start": load_start,
           "loadavg_end": load_average()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "configs": {c: dict(CONFIGS[c], num_hidden_layers=args.layers, seq=SEQ,
                                                               meta=META[c]) for c in args.configs},
                               "repeats": args.repeats, "results": results, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
