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
C++ compiler and ninja (a dependency of fxprune; about 15 s), then cached once per machine in
torch's extension directory under a name that hashes the source, torch's version and the flags
(:func:`build_spec`), for contiguous float32/float64 CPU tensors whose rows are their dim 0,
in lists (one call per step, one parallel region over all the tensors' rows). Anything else
takes the stock path, which gives the same values up to rounding (rows are summed in float64).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from ..errors import UnsupportedInputError

_SOURCE = Path(__file__).with_name("_fused.cpp")


def kernels():
    """The compiled extension (built once per machine from ``_fused.cpp``, about 15 s; cached on
    disk, see :func:`build_spec`; a failed build is not retried in this process).

    Raises:
        fxprune.UnsupportedInputError: the extension cannot be built (no C++ compiler or ninja).
    """
    out = _build()
    if isinstance(out, UnsupportedInputError):
        raise out
    return out


def _flags() -> Tuple[List[str], List[str]]:
    # float64 accumulation keeps up with memory only with wide vectors: use AVX2 where torch's
    # own kernels found it
    wide = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return ["-O3", "-fopenmp"] + (["-mavx2", "-mfma"] if wide else []), ["-fopenmp"]


def cache_key(source: bytes, cflags: Sequence[str], ldflags: Sequence[str]) -> str:
    """What a build depends on: the kernel source, torch's version, Python's, the platform, the
    compiler named by ``CXX`` and the flags; never the path of the checkout or environment."""
    h = hashlib.sha256()
    for part in (source, torch.__version__, sys.version.split()[0], sys.abiflags if hasattr(sys, "abiflags") else "",
                 platform.machine(), os.environ.get("CXX", ""), " ".join(cflags), " ".join(ldflags)):
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def build_spec(source_path: Path = _SOURCE) -> Tuple[str, str]:
    """``(extension name, build directory)`` of the kernels: the name carries
    :func:`cache_key`, the directory is torch's for that name (``$TORCH_EXTENSIONS_DIR/<name>``
    or ``~/.cache/torch_extensions/<python>_<accelerator>/<name>``), so every checkout and
    virtual environment on a machine with the same source, torch and flags shares one build,
    and a different source builds next to it instead of over it."""
    cflags, ldflags = _flags()
    name = f"fxprune_dhspg_{cache_key(source_path.read_bytes(), cflags, ldflags)}"
    cpp_extension = _cpp_extension()
    try:
        directory = cpp_extension._get_build_directory(name, verbose=False)
    except AttributeError:  # torch moved it: the same layout under TORCH_EXTENSIONS_DIR
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
        directory = os.path.join(root, name)
        os.makedirs(directory, exist_ok=True)
    return name, directory


def _cpp_extension():
    """``torch.utils.cpp_extension``: importing it probes for a CUDA toolkit and, with a CUDA
    build of torch on a machine without a GPU, logs a warning that has nothing to do with these
    CPU kernels; it is silenced."""
    probe = logging.getLogger("torch.utils.cpp_extension")
    level = probe.level
    probe.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        probe.setLevel(level)
    return cpp_extension


def _source_in(directory: str, name: str, source: bytes) -> str:
    """The kernel source as ``<directory>/<name>.cpp``: written once, atomically (a linked
    temporary file), never rewritten, so that ninja sees the same input path and time from
    every checkout and concurrent processes never see a half-written file."""
    path = os.path.join(directory, f"{name}.cpp")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".src-", suffix=".cpp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(source)
            os.chmod(tmp, 0o644)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process wrote the same content first
        finally:
            os.remove(tmp)
    return path


@functools.lru_cache(maxsize=None)
def _build():
    """The extension, or the error that building it gave."""
    load = _cpp_extension().load
    cflags, ldflags = _flags()
    try:
        name, directory = build_spec()
        source = _source_in(directory, name, _SOURCE.read_bytes())
        # torch.utils.cpp_extension holds a file lock on the build directory while it builds:
        # processes that start together build once, the others wait and load that build
        return load(name, sources=[source], build_directory=directory, extra_cflags=cflags,
                    extra_ldflags=ldflags, verbose=False)
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
