"""Fused CPU kernels of DHSPG's step (``DHSPG(..., fused=None or True)``, see ``_fused.cpp``).

A pruning step updates SGD's momentum buffer ``d``, reduces the rows of each parameter ``x``
and of ``d`` (``||x||^2``, ``<x, d>``, ``||d||^2``) and rewrites ``x <- s_r x - lr d`` with a
per-row scale ``s_r`` that the channel math computes from those reductions. With stock torch
ops that is one pass over memory for the momentum, three for the reductions and two for the
update. Here one kernel does the momentum, the reductions and the update of every row whose
scale is known to be 1 (:func:`sgd_step`); only the rows of shrinking channels wait, and
:func:`scale_sub_` updates them once their scales are known. Memory traffic, which bounds the
step, is then SGD's plus one more pass over the redundant rows.

The kernels are C++ built with ``torch.utils.cpp_extension`` on first use, with the machine's
C++ compiler and ninja (a dependency of fxprune; about 15 s, then cached in torch's extension
directory), for contiguous float32/float64 CPU tensors whose rows are their dim 0,
in lists (one call per step, one parallel region over all the tensors' rows). Anything else
takes the stock path, which gives the same values up to rounding (rows are summed in float64).
"""
from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path
from typing import List, Optional

import torch

from ..errors import UnsupportedInputError

_SOURCE = Path(__file__).with_name("_fused.cpp")


def kernels():
    """The compiled extension (built once per machine from ``_fused.cpp``, about 15 s; cached
    on disk by torch, per source and flags; a failed build is not retried in this process).

    Raises:
        fxprune.UnsupportedInputError: the extension cannot be built (no C++ compiler or ninja).
    """
    out = _build()
    if isinstance(out, UnsupportedInputError):
        raise out
    return out


@functools.lru_cache(maxsize=None)
def _build():
    """The extension, or the error that building it gave."""
    # importing it probes for a CUDA toolkit and, with a CUDA build of torch on a machine
    # without a GPU, logs a warning that has nothing to do with these CPU kernels
    probe = logging.getLogger("torch.utils.cpp_extension")
    level = probe.level
    probe.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        probe.setLevel(level)

    # float64 accumulation keeps up with memory only with wide vectors: use AVX2 where torch's
    # own kernels found it (the build is cached per capability)
    wide = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    flags = ["-O3", "-fopenmp"] + (["-mavx2", "-mfma"] if wide else [])
    name = "fxprune_dhspg_fused" + ("_avx2" if wide else "")
    try:
        return load(name, sources=[str(_SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # compiler missing or failing: say so, with the cause
        err = UnsupportedInputError(f"DHSPG's fused CPU kernels need a C++ compiler and ninja to build, and "
                                    f"the build failed: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err


def available() -> bool:
    """Whether the kernels can be used here (building them if needed); warns once with the reason
    when they cannot."""
    try:
        kernels()
    except UnsupportedInputError as exc:  # shown once per call site (Python's default filter)
        warnings.warn(f"{exc}; DHSPG takes its stock step (about twice the time of SGD's)", stacklevel=3)
        return False
    return True


def takes(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: contiguous CPU float32/float64 of one dtype and
    one shape, at least 1-d (rows are dim 0)."""
    x = tensors[0]
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() < 1:
        return False
    for t in tensors:
        if t.dtype != x.dtype or not t.is_contiguous() or t.device != x.device or t.shape != x.shape:
            return False
    return True


def sgd_step(xs: List[torch.Tensor], grads: List[torch.Tensor], bufs: List[torch.Tensor],
             starts: List[int], momentum: float, weight_decay: float, lr: float,
             defer: Optional[torch.Tensor] = None, stats: Optional[torch.Tensor] = None) -> None:
    """SGD's momentum step of every ``xs[i]`` in one pass over memory (all checked by :func:`takes`,
    one dtype): ``buf <- grad + weight_decay * x + momentum * buf``, then ``x <- x - lr * buf``.

    Where ``starts[i] >= 0`` the dim-0 rows of ``xs[i]`` are rows ``starts[i] + r`` of a flat row
    space ``[R]``: their sums ``||x||^2``, ``<x, buf>``, ``||buf||^2`` (``x`` before the step) go to
    ``stats[:, starts[i] + r]`` (``stats``: ``[3, R]``, dtype of ``xs``), and rows marked in
    ``defer`` (``BoolTensor[R]``) keep ``x`` unchanged, for :func:`scale_sub_` to step later."""
    kernels().sgd_step(xs, grads, bufs, starts, defer, stats, float(momentum), float(weight_decay), float(lr))


def row_stats(x: torch.Tensor, d: torch.Tensor, stats: torch.Tensor, start: int) -> None:
    """``||x||^2``, ``<x, d>``, ``||d||^2`` of the dim-0 rows ``r`` of ``x`` and ``d`` into
    ``stats[:, start + r]`` (``stats``: ``[3, R]`` contiguous, dtype of ``x``)."""
    kernels().row_stats(x, d, stats, int(start))


def scale_sub_(xs: List[torch.Tensor], ds: List[torch.Tensor], starts: List[int], lr: float,
               scales: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None) -> None:
    """``x[r] <- scales[starts[i] + r] * x[r] - lr * d[r]`` over the dim-0 rows of every ``xs[i]``
    (``scales``: ``[R]``, None for all ones), only the flat rows marked in ``rows``
    (``BoolTensor[R]``) when given. The kernels bump the version counters of the tensors they
    write, as torch's in-place ops do."""
    kernels().scale_sub_(xs, ds, starts, scales, rows, float(lr))
