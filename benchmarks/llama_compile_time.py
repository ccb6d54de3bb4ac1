"""Analysis time on a 32-layer Llama: fxprune.compile vs Torch-Pruning's dependency graph.

The model is HuggingFace's ``LlamaModel`` built from a config (random weights, nothing
downloaded): 32 decoder layers, hidden 512, 8 query heads and 2 key/value heads (grouped-query
attention), intermediate 1376, vocabulary 1000, ``use_cache=False``; the input is one sequence
of 32 token ids. For each tool, in a fresh Python process (so that neither tool's caches or
heap help or hurt the other):

* ``fxprune``: ``fxprune.compile(model, (input_ids,))`` with the default ``frontend="auto"``:
  symbolic tracing is tried first; transformers 5 has no fx tracer, so it fails and
  ``torch.export`` builds the graph (the failed attempt is part of the time, as a user pays it);
* ``fxprune-export``: the same with ``frontend="export"`` (no tracing attempt), and once more
  step by step: the CPU time of ``torch.export`` and of each pass of the default pipeline;
* ``tp``: ``torch_pruning.DependencyGraph().build_dependency(model, example_inputs=...)``;
* ``tp+groups``: the same plus enumerating its pruning groups (``get_all_groups()``).

In each process: one warm-up run on a 2-layer model of the same width (imports, first-call
costs), one first run on the 32-layer model, then ``--repeats`` timed runs (median wall time
and median process CPU time; on a shared machine the CPU time is the steadier). torch runs on
one intra-op thread (``BENCH_THREADS`` overrides). A tool that fails records its error.

Usage::

    python benchmarks/llama_compile_time.py [--repeats 3] [--layers 32]

Prints a Markdown table and writes benchmarks/results/llama_compile_time.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _runner import run_worker  # noqa: E402
from _timing import load_average, timed_runs, tp_runner  # noqa: E402

TOOLS = ("fxprune", "fxprune-export", "tp", "tp+groups")

CONFIG = dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=2,
              vocab_size=1000, max_position_embeddings=256, use_cache=False)
SEQ = 32


def build(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(num_hidden_layers=layers, **CONFIG)).eval()
    ids = torch.randint(0, CONFIG["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(0))
    return model, (ids,)


def _runner(tool: str):
    if tool.startswith("fxprune"):
        import fxprune

        frontend = "export" if tool == "fxprune-export" else "auto"

        def run(model, inputs):
            prog = fxprune.compile(model, inputs, frontend=frontend)
            exported = any(isinstance(n.target, __import__("torch")._ops.OpOverload) for n in prog.module.graph.nodes)
            return {"groups": len(prog.groups), "prunable": len(prog.prunable_groups),
                    "nodes": len(prog.module.graph.nodes), "frontend": "export" if exported else "fx"}

        return run
    return tp_runner(tool)


def stages(model, inputs) -> dict:
    """Process CPU time of each step of ``fxprune.compile(..., frontend="export")``: the
    ``torch.export`` front end, then each pass of the default pipeline."""
    from fxprune.passes import Pipeline, export

    gc.collect()
    c0 = time.process_time()
    gm = export(model, inputs)
    out = {"export": time.process_time() - c0}
    c0 = time.process_time()
    for name, gm in Pipeline.default(inputs).steps(gm):
        out[name] = time.process_time() - c0
        c0 = time.process_time()
    return out


def worker(tool: str, layers: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    rec = {"tool": tool, "layers": layers}
    try:
        run = _runner(tool)
        warm, warm_inputs = build(2)
        run(warm, warm_inputs)
        del warm
        model, inputs = build(layers)
        rec["params"] = sum(p.numel() for p in model.parameters())
        gc.collect()
        t0 = time.perf_counter()
        rec.update(run(model, inputs))
        rec["first_s"] = time.perf_counter() - t0
        rec.update(timed_runs(lambda: run(model, inputs), repeats))
        if tool == "fxprune-export":
            rec["stages_cpu_s"] = stages(model, inputs)
    except Exception as exc:
        msg = " ".join(str(exc).split())
        rec["error"] = f"{type(exc).__name__}: {msg[:600]}"
    return rec


def measure(tool: str, layers: int, repeats: int, timeout: float) -> dict:
    rec = run_worker(Path(__file__).resolve(), tool, ["--layers", str(layers), "--repeats", str(repeats)], timeout)
    if "error" in rec:
        return {"tool": tool, "layers": layers, "error": rec["error"]}
    return rec


def _f(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def table(rows: dict) -> str:
    head = "| tool | frontend | graph nodes | groups (prunable) | first run s | median s | median CPU s | vs TP (wall) | vs TP (CPU) | error |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    tp_ = rows.get("tp", {})
    for tool in TOOLS:
        r = rows.get(tool)
        if r is None:
            continue
        groups = r.get("groups", "")
        if "prunable" in r:
            groups = f"{groups} ({r['prunable']})"
        ratio = (r["median_s"] / tp_["median_s"]) if r.get("median_s") and tp_.get("median_s") else None
        ratio_cpu = (r["median_cpu_s"] / tp_["median_cpu_s"]) if r.get("median_cpu_s") and tp_.get("median_cpu_s") else None
        out.append(f"| {tool} | {r.get('frontend', '')} | {r.get('nodes', '')} | {groups} | {_f(r.get('first_s'))} | "
                   f"{_f(r.get('median_s'))} | {_f(r.get('median_cpu_s'))} | {_f(ratio)} | {_f(ratio_cpu)} | "
                   f"{r.get('error', '')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tools", nargs="*", default=list(TOOLS), choices=TOOLS)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default=str(HERE / "results" / "llama_compile_time.json"))
    ap.add_argument("--worker", metavar="TOOL", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.layers, args.repeats)))
        return 0

    load_start = load_average()
    rows = {}
    for tool in args.tools:
        r = measure(tool, args.layers, args.repeats, args.timeout)
        rows[tool] = r
        print(f"[{tool}] " + (r.get("error") or f"median {r['median_s']:.2f}s (CPU {r['median_cpu_s']:.2f}s)"),
              file=sys.stderr, flush=True)
    text = table(rows)
    st = rows.get("fxprune-export", {}).get("stages_cpu_s")
    if st:
        text += ("\n\nfxprune.compile(frontend=\"export\") by step, CPU s: "
                 + ", ".join(f"{k} {v:.2f}" for k, v in st.items()))
    fx, tp_ = rows.get("fxprune", {}), rows.get("tp", {})
    summary = {}
    if fx.get("median_s") and tp_.get("median_s"):
        summary = {"fxprune_over_tp_wall": fx["median_s"] / tp_["median_s"],
                   "fxprune_over_tp_cpu": fx["median_cpu_s"] / tp_["median_cpu_s"]}
        text += (f"\n\nfxprune.compile / Torch-Pruning build_dependency: {summary['fxprune_over_tp_wall']:.2f}x wall, "
                 f"{summary['fxprune_over_tp_cpu']:.2f}x CPU")
    print(f"LlamaModel, {args.layers} layers, hidden {CONFIG['hidden_size']}, {CONFIG['num_attention_heads']} q / "
          f"{CONFIG['num_key_value_heads']} kv heads, intermediate {CONFIG['intermediate_size']}, vocab "
          f"{CONFIG['vocab_size']}, input 1x{SEQ} token ids\n")
    print(text)
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
    out.write_text(json.dumps({"env": env, "config": dict(CONFIG, num_hidden_layers=args.layers, seq=SEQ),
                               "repeats": args.repeats, "rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
