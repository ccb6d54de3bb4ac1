"""Timing harness shared by the benchmarks.

* :func:`timed_runs`: repeated runs of one function, wall and process CPU time (the compile-time
  benchmarks, which time one analysis at a time in a fresh process).
* :func:`interleaved`: round-robin timing of several functions, one call of each per round, so
  that a change of machine load affects them alike (optimizer steps, forward passes, training
  steps); an optional ``sync`` waits for an accelerator before and after every call.
* :func:`tp_runner`: the Torch-Pruning analysis the compile-time benchmarks compare with.
* :func:`load_average`: the machine's 1, 5 and 15 minute load averages, reported with numbers.
* :func:`rss_kib`, :func:`reset_peak_rss`: the process's resident set size and its peak.
"""
from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Optional


def load_average() -> Optional[List[float]]:
    """``[1 min, 5 min, 15 min]`` load averages, or None where the system has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def rss_kib(key: str = "VmRSS") -> int:
    """A memory figure of this process from ``/proc/self/status`` in KiB (``"VmRSS"``: resident
    set size now, ``"VmHWM"``: its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> bool:
    """Reset the peak resident set size (``VmHWM``) to the current one, through
    ``/proc/self/clear_refs``; False where the system does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timed_runs(fn: Callable[[], Any], repeats: int) -> Dict[str, Any]:
    """Call ``fn()`` ``repeats`` times (``repeats >= 1``), collecting garbage before each call.

    Returns ``times_s`` and ``cpu_s`` (wall and process CPU time of each call, all threads, in
    seconds) and their medians ``median_s`` and ``median_cpu_s``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times, cpu = [], []
    for _ in range(repeats):
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"times_s": times, "cpu_s": cpu, "median_s": statistics.median(times),
            "median_cpu_s": statistics.median(cpu)}


def interleaved(fns: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                sync: Optional[Callable[[], None]] = None) -> Dict[str, Dict[str, List[float]]]:
    """Time every function of ``fns`` once per round, in order, for ``warmup`` untimed rounds
    and then ``rounds`` timed ones (``rounds >= 1``).

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before the clock starts and before it
    stops, so that asynchronous device work is counted where it was launched.

    Returns, per name, ``{"wall_s": [...], "cpu_s": [...]}``: one wall time and one process
    CPU time (all threads) per timed round, in seconds.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    wait = sync or (lambda: None)
    out = {name: {"wall_s": [], "cpu_s": []} for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            wait()
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wait()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if r >= warmup:
                out[name]["wall_s"].append(wall)
                out[name]["cpu_s"].append(cpu)
    return out


def tp_runner(tool: str) -> Callable[[Any, tuple], Dict[str, int]]:
    """A function ``(model, example_inputs) -> info`` that runs Torch-Pruning's analysis:
    ``DependencyGraph().build_dependency`` (``tool="tp"``), plus enumerating its pruning groups
    with ``get_all_groups()`` (``tool="tp+groups"``). ``info`` holds ``nodes`` (its graph's
    module nodes) and, for ``tp+groups``, ``groups``. Raises ImportError without torch-pruning."""
    if tool not in ("tp", "tp+groups"):
        raise ValueError(f"tool must be 'tp' or 'tp+groups', got {tool!r}")
    import torch_pruning as tp

    def run(model, inputs) -> Dict[str, int]:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)
        out = {"nodes": len(dg.module2node)}
        if tool == "tp+groups":
            out["groups"] = sum(1 for _ in dg.get_all_groups())
        return out

    return run


__all__ = ["interleaved", "load_average", "reset_peak_rss", "rss_kib", "timed_runs", "tp_runner"]


def run_info(device, load_start, **extra) -> Dict[str, Any]:
    """The machine and settings a benchmark ran with: device name (CUDA device or CPU),
    threads, CPUs, torch and Python versions, load average at start and now, plus ``extra``."""
    import platform

    import torch

    cuda = getattr(device, "type", str(device)) == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(), **extra,
        "load_average_start": load_start, "load_average_end": load_average(),
    }


def print_and_save(header: str, table: str, info: Dict[str, Any], rows: List[dict], out_path) -> Dict[str, Any]:
    """Print ``header`` and the Markdown ``table``; write ``{"info", "rows"}`` as JSON."""
    import json

    print(header)
    print()
    print(table)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = {"info": info, "rows": rows}
    out_path.write_text(json.dumps(result, indent=2))
    return result
