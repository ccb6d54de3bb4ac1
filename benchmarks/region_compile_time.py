"""Region compile time against one eager forward pass of the same model.

``fxprune.compile`` on a model that neither front end traces whole (``maskrcnn_resnet50_fpn``
by default, random weights, eval mode, one 320x320 image with ``min_size=max_size=320`` so that
the network really runs at 320 px) does: symbolic tracing of the whole model (fails at once),
one recording run of the model (hooks, a data-dependence probe, clones of the recorded calls),
then for every region candidate a trace, one run of its graph on its recorded inputs (shape
propagation, which doubles as the check against the eager outputs) and the analyses. The
target is at most 3x one eager forward pass; both are measured in the same process, one
thread, after a warm-up, as medians of ``repeats`` runs (the ratio is the median of the
per-repeat ratios, each taken back to back so that load changes hit both).

:func:`measure` is self-contained (``benchmarks/compile_time.py`` can call it and print its
row); ``python benchmarks/region_compile_time.py`` prints a table and writes
``benchmarks/results/region_compile_time.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence

HERE = Path(__file__).resolve().parent


def measure(model_name: str = "maskrcnn_resnet50_fpn", side: int = 320, repeats: int = 5,
            threads: int = 1, regions: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Median times (s) of one eager forward pass (``torch.no_grad``, eval) and of
    ``fxprune.compile`` of a torchvision detector at ``side`` px, and their ratio.

    ``regions``: compile with these named regions instead of finding them. Returns a dict:
    ``model``, ``side``, ``eager_s``, ``compile_s``, ``ratio`` (median of per-repeat
    compile/eager ratios), ``regions`` (the names found), ``phases`` (median seconds of the
    recording run and of the region compiles), ``repeats``, ``threads``.
    """
    import torch
    from torchvision.models import detection

    import fxprune
    import fxprune.regions as R
    import fxprune.regions.build as B

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = getattr(detection, model_name)(weights=None, weights_backbone=None, min_size=side, max_size=side).eval()
    x = ([torch.rand(3, side, side, generator=torch.Generator().manual_seed(0))],)

    phases: Dict[str, float] = {}
    originals = {}

    def timed(mod, name):
        fn = getattr(mod, name)
        originals[(mod, name)] = fn

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        setattr(mod, name, wrapper)

    def eager() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model(*x)
        return time.perf_counter() - t

    def compile_once():
        t = time.perf_counter()
        prog = fxprune.compile(model, x, **({"regions": list(regions)} if regions else {}))
        return time.perf_counter() - t, prog

    eager()
    compile_once()  # warm-up: imports, lazy initialisation
    timed(R, "record_model")
    timed(B, "compile_region")
    rows = []
    try:
        for _ in range(repeats):
            phases.clear()
            e = eager()
            c, prog = compile_once()
            rows.append((e, c, dict(phases)))
    finally:
        for (mod, name), fn in originals.items():
            setattr(mod, name, fn)
    return {
        "model": model_name, "side": side, "repeats": repeats, "threads": threads,
        "eager_s": statistics.median(r[0] for r in rows),
        "compile_s": statistics.median(r[1] for r in rows),
        "ratio": statistics.median(r[1] / r[0] for r in rows),
        "phases": {k: statistics.median(r[2].get(k, 0.0) for r in rows) for k in ("record_model", "compile_region")},
        "regions": [r.name for r in prog.regions],
    }


def row(result: Dict[str, object]) -> str:
    """One Markdown table row of :func:`measure`'s result."""
    return (f"| {result['model']} ({result['side']} px) | {len(result['regions'])} | {result['eager_s']:.2f} | "
            f"{result['compile_s']:.2f} | {result['ratio']:.2f}x | {result['phases']['record_model']:.2f} | "
            f"{result['phases']['compile_region']:.2f} |")


HEADER = ("| model | regions | eager forward s | region compile s | compile / eager | recording run s | "
          "region traces + analyses s |\n|---|---:|---:|---:|---:|---:|---:|")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="maskrcnn_resnet50_fpn")
    ap.add_argument("--side", type=int, default=320)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    result = measure(args.model, args.side, args.repeats, args.threads)
    print(HEADER)
    print(row(result))
    print(f"regions: {', '.join(result['regions'])}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    result["env"] = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()}
    (out / "region_compile_time.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
