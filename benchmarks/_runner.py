"""Run one benchmark worker per model in its own Python process, and many of them in turn.

A worker is the benchmark script itself called with ``--worker MODEL`` (plus its options); it
prints one JSON object per line on stdout, the last one being its record of the model (a
worker may print an early record and a fuller one later). Each model thus has bounded memory,
and a crash, a hang or a timeout stays local to its row.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence


def _last_record(stdout: Optional[str]) -> Optional[dict]:
    lines = [line for line in (stdout or "").splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def run_worker(script: Path, name: str, options: Sequence[str], timeout: float) -> dict:
    """Run ``python script --worker name *options`` and return the last JSON record it printed.

    On a timeout the last record printed before it is kept, with ``"timeout"`` set; with no
    record at all (crash, timeout before the first record) the result is an error row
    ``{"model", "verdict": "error", "error"}``. ``total_s`` (wall seconds) is always set.
    """
    cmd = [sys.executable, str(script), "--worker", name, *options]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout
        rec = _last_record(out)
        if rec is None:
            rec = {"model": name, "verdict": "error", "error": f"timeout after {timeout:.0f}s"}
        else:
            rec["timeout"] = f"stopped after {timeout:.0f}s; the record is the last one printed before"
    else:
        rec = _last_record(proc.stdout)
        if rec is None:
            tail = " | ".join((proc.stderr or "").strip().splitlines()[-3:])
            rec = {"model": name, "verdict": "error", "error": f"process exited with {proc.returncode}: {tail}"}
    rec["total_s"] = time.perf_counter() - t0
    return rec


def run_many(names: Sequence[str], run: Callable[[str], dict], jobs: int = 1,
             on_done: Optional[Callable[[int, dict], None]] = None) -> List[dict]:
    """``run(name)`` for every name, ``jobs`` at a time; records in the order of ``names``.

    ``on_done(i, record)`` is called as each one finishes (progress lines, partial saves).
    """
    records: List[Optional[dict]] = [None] * len(names)

    def task(i: int) -> None:
        records[i] = run(names[i])
        if on_done is not None:
            on_done(i, records[i])

    if jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(task, range(len(names))))
    else:
        for i in range(len(names)):
            task(i)
    return records  # type: ignore[return-value]


__all__ = ["run_many", "run_worker"]
