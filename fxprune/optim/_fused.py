"""Fused CPU kernels for the pruning-phase step of DHSPG (``DHSPG(..., fused=True)``).

A pruning step updates SGD's momentum buffer ``d``, reads each parameter ``x`` and ``d`` for
three row reductions (``||x||``, ``<x, d>``, ``||d||``) and then rewrites ``x <- s_r x - c d``
with a per-row scale ``s_r``. With stock torch ops that is one pass for the momentum, three
for the reductions (two norms and a batched matmul) and two for the update (a row scaling,
then an add); these kernels do the momentum and the reductions in one pass and the update in
another, which is what the step is bound by.

They are C++ (``torch.utils.cpp_extension.load_inline``), built on first use with the
machine's C++ compiler and ninja (``pip install 'fxprune[fused]'``; about half a minute, then
cached in torch's extension directory),
for contiguous float32/float64 CPU tensors whose rows are their dim 0. Anything else takes
the stock path, which gives the same values up to rounding (the kernels accumulate each row
in float64).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from ..errors import UnsupportedInputError

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>

// Rows are summed in blocks of BLOCK elements in T (vectorised) and the block sums in double:
// the speed of float sums with close to float64 accuracy.
constexpr int64_t BLOCK = 512;

// Per row ||x||, <x, d>, ||d|| (written as T); with Momentum, d is first updated in place:
// d <- g + wd*x + mu*d.
template <typename T, bool Momentum>
static void row_stats_impl(const T* x, T* d, const T* g, T mu, T wd, T* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * n;
      T* dr = d + r * n;
      const T* gr = Momentum ? g + r * n : nullptr;
      double xx = 0, xd = 0, dd = 0;
      for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
        const int64_t j1 = std::min(n, j0 + BLOCK);
        T bxx = 0, bxd = 0, bdd = 0;
        #pragma omp simd reduction(+:bxx, bxd, bdd)
        for (int64_t j = j0; j < j1; ++j) {
          const T a = xr[j];
          T b = dr[j];
          if (Momentum) { b = (gr[j] + wd * a) + mu * b; dr[j] = b; }
          bxx += a * a; bxd += a * b; bdd += b * b;
        }
        xx += bxx; xd += bxd; dd += bdd;
      }
      out[r] = static_cast<T>(std::sqrt(xx));
      out[rows + r] = static_cast<T>(xd);
      out[2 * rows + r] = static_cast<T>(std::sqrt(dd));
    }
  });
}

template <typename T>
static void scale_sub_impl(T* x, const T* d, const T* s, T c, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* xr = x + r * n;
      const T* dr = d + r * n;
      const T sr = s[r];
      #pragma omp simd
      for (int64_t j = 0; j < n; ++j) xr[j] = sr * xr[j] - c * dr[j];
    }
  });
}

static void check_rows(const torch::Tensor& x, const torch::Tensor& d) {
  TORCH_CHECK(x.dim() == 2 && x.sizes() == d.sizes() && x.is_contiguous() && d.is_contiguous()
              && x.scalar_type() == d.scalar_type());
}

// (||x||, <x, d>, ||d||) of every row of two [rows, n] tensors: [3, rows], dtype of x
torch::Tensor row_stats(torch::Tensor x, torch::Tensor d) {
  check_rows(x, d);
  auto out = torch::empty({3, x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "row_stats", [&] {
    row_stats_impl<scalar_t, false>(x.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(), nullptr, 0, 0,
                                    out.data_ptr<scalar_t>(), x.size(0), x.size(1));
  });
  return out;
}

// buf <- g + wd * x + mu * buf (SGD momentum), then row_stats(x, buf)
torch::Tensor momentum_row_stats(torch::Tensor x, torch::Tensor g, torch::Tensor buf, double mu, double wd) {
  check_rows(x, buf);
  check_rows(x, g);
  auto out = torch::empty({3, x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "momentum_row_stats", [&] {
    row_stats_impl<scalar_t, true>(x.data_ptr<scalar_t>(), buf.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                                   static_cast<scalar_t>(mu), static_cast<scalar_t>(wd),
                                   out.data_ptr<scalar_t>(), x.size(0), x.size(1));
  });
  return out;
}

// x[r, :] = s[r] * x[r, :] - c * d[r, :], in place
void scale_sub_(torch::Tensor x, torch::Tensor d, torch::Tensor s, double c) {
  check_rows(x, d);
  TORCH_CHECK(s.is_contiguous() && s.numel() == x.size(0) && s.scalar_type() == x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scale_sub_", [&] {
    scale_sub_impl<scalar_t>(x.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(),
                             static_cast<scalar_t>(c), x.size(0), x.size(1));
  });
}
"""


@functools.lru_cache(maxsize=None)
def kernels():
    """The compiled extension (built once per process, cached on disk by torch).

    Raises:
        fxprune.UnsupportedInputError: the extension cannot be built (no C++ compiler).
    """
    from torch.utils.cpp_extension import load_inline

    # float64 accumulation keeps up with memory only with wide vectors: use AVX2 where torch's
    # own kernels found it (the build is cached per capability)
    wide = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    flags = ["-O3", "-fopenmp"] + (["-mavx2", "-mfma"] if wide else [])
    name = "fxprune_dhspg_fused_v3" + ("_avx2" if wide else "")
    try:
        return load_inline(name, cpp_sources=_SOURCE, functions=["row_stats", "momentum_row_stats", "scale_sub_"],
                           extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # compiler missing or failing: say so, with the cause
        raise UnsupportedInputError(f"DHSPG(fused=True) needs a C++ compiler and ninja (pip install "
                                    f"'fxprune[fused]') to build its CPU kernels: {type(exc).__name__}: {exc}") from exc


def _rows(t: torch.Tensor, dim: int, size: int) -> Optional[torch.Tensor]:
    """``t`` as ``[size, -1]`` rows when the kernels take it."""
    if (dim != 0 or t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64)
            or not t.is_contiguous() or t.dim() < 2):
        return None
    return t.view(size, -1)


def row_stats(x: torch.Tensor, d: torch.Tensor, dim: int, size: int
              ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(||x||, <x, d>, ||d||)`` per row (dtype of ``x``), or None where the kernel does not
    apply (then use :func:`~fxprune.optim._groups.row_norm` / ``row_dot``)."""
    x2, d2 = _rows(x, dim, size), _rows(d, dim, size)
    if x2 is None or d2 is None or d.dtype != x.dtype:
        return None
    return tuple(kernels().row_stats(x2, d2).unbind(0))


def momentum_row_stats(x: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, momentum: float,
                       weight_decay: float, size: int) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """SGD's momentum update ``buf <- grad + weight_decay * x + momentum * buf`` fused with
    :func:`row_stats` of ``(x, buf)`` over the rows of dim 0; None (nothing done) where the
    kernel does not apply."""
    x2, g2, b2 = _rows(x, 0, size), _rows(grad, 0, size), _rows(buf, 0, size)
    if x2 is None or g2 is None or b2 is None or not (x.dtype == grad.dtype == buf.dtype):
        return None
    stats = kernels().momentum_row_stats(x2, g2, b2, float(momentum), float(weight_decay))
    torch.autograd.graph.increment_version(buf)
    return tuple(stats.unbind(0))


def scale_sub_(x: torch.Tensor, d: torch.Tensor, s: torch.Tensor, c: float, dim: int) -> bool:
    """``x <- s * x - c * d`` with ``s`` one scale per row along ``dim``; False (nothing done)
    where the kernel does not apply."""
    size = x.shape[dim] if x.dim() else 0
    x2, d2 = _rows(x, dim, size), _rows(d, dim, size)
    if x2 is None or d2 is None or d.dtype != x.dtype:
        return False
    s = s.reshape(-1)
    if s.numel() != x2.shape[0] or s.dtype != x.dtype or not s.is_contiguous():
        return False
    kernels().scale_sub_(x2, d2, s, float(c))
    torch.autograd.graph.increment_version(x)  # written through its data pointer
    return True
