// Fused CPU kernels of DHSPG's step (see _fused.py). Only ATen's tensor, dispatch and
// parallel headers and torch's pybind11 casters: the whole C++ frontend would take minutes to
// compile.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>
#include <algorithm>
#include <cmath>
#include <vector>

// Rows are summed in blocks of BLOCK elements in T (vectorised) and the block sums in double:
// the speed of float sums with close to float64 accuracy.
constexpr int64_t BLOCK = 512;
// Elements per parallel work item (whole rows): tensors are cut into items and all items of
// one call share a single parallel region.
constexpr int64_t CHUNK = 1 << 15;

struct Item { int64_t t, r0, r1; };

static int64_t row_len(const at::Tensor& x) { return x.size(0) ? x.numel() / x.size(0) : 0; }

static std::vector<Item> work_items(const std::vector<at::Tensor>& xs) {
  std::vector<Item> items;
  for (int64_t i = 0; i < static_cast<int64_t>(xs.size()); ++i) {
    const int64_t rows = xs[i].size(0);
    const int64_t step = std::max<int64_t>(1, CHUNK / std::max<int64_t>(row_len(xs[i]), 1));
    for (int64_t r = 0; r < rows; r += step) items.push_back({i, r, std::min(rows, r + step)});
  }
  return items;
}

// One row of n elements. Momentum: d <- g + wd*x + mu*d first. Step: x <- x - c*d (the new d).
// Stats: add ||x||^2, <x, d>, ||d||^2 of the row (x before the step, d after the momentum).
template <typename T, bool Momentum, bool Step, bool Stats>
static inline void one_row(T* x, T* d, const T* g, T mu, T wd, T c, int64_t n, double* s) {
  for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
    const int64_t j1 = std::min(n, j0 + BLOCK);
    T bxx = 0, bxd = 0, bdd = 0;
    #pragma omp simd reduction(+:bxx, bxd, bdd)
    for (int64_t j = j0; j < j1; ++j) {
      const T a = x[j];
      T b = d[j];
      if (Momentum) { b = (g[j] + wd * a) + mu * b; d[j] = b; }
      if (Step) x[j] = a - c * b;
      if (Stats) { bxx += a * a; bxd += a * b; bdd += b * b; }
    }
    if (Stats) { s[0] += bxx; s[1] += bxd; s[2] += bdd; }
  }
}

// Rows r0..r1 of one tensor; out (nullptr: no stats) holds [3, R] sums, this tensor's rows at
// column `start`; defer (nullptr: none) marks the flat rows whose step waits (see sgd_step).
template <typename T, bool Momentum>
static void rows_impl(T* x, T* d, const T* g, T mu, T wd, T c, int64_t n, int64_t r0, int64_t r1,
                      T* out, int64_t R, int64_t start, const bool* defer, bool step) {
  for (int64_t r = r0; r < r1; ++r) {
    T* xr = x + r * n;
    T* dr = d + r * n;
    const T* gr = Momentum ? g + r * n : nullptr;
    const bool now = step && !(defer && defer[start + r]);
    double s[3] = {0, 0, 0};
    if (out) {
      if (now) one_row<T, Momentum, true, true>(xr, dr, gr, mu, wd, c, n, s);
      else one_row<T, Momentum, false, true>(xr, dr, gr, mu, wd, c, n, s);
      out[start + r] = static_cast<T>(s[0]);
      out[R + start + r] = static_cast<T>(s[1]);
      out[2 * R + start + r] = static_cast<T>(s[2]);
    } else if (now) {
      one_row<T, Momentum, true, false>(xr, dr, gr, mu, wd, c, n, s);
    } else if (Momentum) {
      one_row<T, Momentum, false, false>(xr, dr, gr, mu, wd, c, n, s);
    }
  }
}

template <typename T>
static inline void scale_sub_row(T* x, const T* d, T s, T c, int64_t n) {
  #pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] = s * x[j] - c * d[j];
}

// In-place writes through data pointers: bump the version counters as torch's own in-place ops
// do, so that autograd notices a tensor it saved being changed (inference tensors have none).
static void written(const std::vector<at::Tensor>& ts) {
  for (const auto& t : ts)
    if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

static void check_pair(const at::Tensor& x, const at::Tensor& d) {
  TORCH_CHECK(x.dim() >= 1 && x.sizes() == d.sizes() && x.is_contiguous() && d.is_contiguous()
              && x.scalar_type() == d.scalar_type() && x.device().is_cpu());
}

static void check_flat(const at::Tensor& t, int64_t rows, c10::ScalarType dtype) {
  TORCH_CHECK(!t.defined() || (t.is_contiguous() && t.numel() >= rows && t.scalar_type() == dtype));
}

// SGD with momentum over a list of tensors of one dtype, in one pass over memory:
// bufs[i] <- grads[i] + wd * xs[i] + mu * bufs[i], then xs[i] <- xs[i] - c * bufs[i] for every row
// not marked in `defer` ([R] bool, flat row space; may be undefined). Tensors with starts[i] >= 0
// also write the row sums ||x||^2, <x, buf>, ||buf||^2 (x before the step) of their dim-0 rows
// into out[:, starts[i] + r] (out: [3, R] contiguous, dtype of xs).
void sgd_step(std::vector<at::Tensor> xs, std::vector<at::Tensor> grads, std::vector<at::Tensor> bufs,
              std::vector<int64_t> starts, std::optional<at::Tensor> defer_, std::optional<at::Tensor> out_,
              double mu, double wd, double c) {
  if (xs.empty()) return;
  const at::Tensor defer = defer_.value_or(at::Tensor()), out = out_.value_or(at::Tensor());
  TORCH_CHECK(grads.size() == xs.size() && bufs.size() == xs.size() && starts.size() == xs.size());
  const auto dtype = xs[0].scalar_type();
  const int64_t R = out.defined() ? out.size(-1) : 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    check_pair(xs[i], grads[i]);
    check_pair(xs[i], bufs[i]);
    TORCH_CHECK(xs[i].scalar_type() == dtype);
    TORCH_CHECK(starts[i] < 0 || (out.defined() && starts[i] + xs[i].size(0) <= R));
  }
  check_flat(out, 3 * R, dtype);
  TORCH_CHECK(!defer.defined() || (defer.scalar_type() == at::kBool && defer.is_contiguous()));
  const auto items = work_items(xs);
  AT_DISPATCH_FLOATING_TYPES(dtype, "sgd_step", [&] {
    scalar_t* o = out.defined() ? out.data_ptr<scalar_t>() : nullptr;
    const bool* df = defer.defined() ? defer.data_ptr<bool>() : nullptr;
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
      for (int64_t k = i0; k < i1; ++k) {
        const Item& it = items[k];
        const int64_t st = starts[it.t];
        rows_impl<scalar_t, true>(xs[it.t].data_ptr<scalar_t>(), bufs[it.t].data_ptr<scalar_t>(),
                                  grads[it.t].data_ptr<scalar_t>(), static_cast<scalar_t>(mu),
                                  static_cast<scalar_t>(wd), static_cast<scalar_t>(c), row_len(xs[it.t]),
                                  it.r0, it.r1, st >= 0 ? o : nullptr, R, st, st >= 0 ? df : nullptr, true);
      }
    });
  });
  written(xs);
  written(bufs);
}

// Row sums ||x||^2, <x, d>, ||d||^2 of the dim-0 rows of x and d into out[:, start + r].
void row_stats(at::Tensor x, at::Tensor d, at::Tensor out, int64_t start) {
  check_pair(x, d);
  const int64_t R = out.size(-1);
  TORCH_CHECK(start >= 0 && start + x.size(0) <= R);
  check_flat(out, 3 * R, x.scalar_type());
  const std::vector<at::Tensor> xs{x};
  const auto items = work_items(xs);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "row_stats", [&] {
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
      for (int64_t k = i0; k < i1; ++k)
        rows_impl<scalar_t, false>(x.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(), nullptr, 0, 0, 0,
                                   row_len(x), items[k].r0, items[k].r1, out.data_ptr<scalar_t>(), R, start,
                                   nullptr, false);
    });
  });
}

// x[r, :] <- s[start + r] * x[r, :] - c * d[r, :] for the dim-0 rows r of each x whose flat row
// start + r is marked in `rows` ([R] bool; undefined: every row); s: [R], undefined for all ones.
void scale_sub_(std::vector<at::Tensor> xs, std::vector<at::Tensor> ds, std::vector<int64_t> starts,
                std::optional<at::Tensor> s_, std::optional<at::Tensor> rows_, double c) {
  if (xs.empty()) return;
  const at::Tensor s = s_.value_or(at::Tensor()), rows = rows_.value_or(at::Tensor());
  TORCH_CHECK(ds.size() == xs.size() && starts.size() == xs.size());
  const auto dtype = xs[0].scalar_type();
  for (size_t i = 0; i < xs.size(); ++i) {
    check_pair(xs[i], ds[i]);
    TORCH_CHECK(xs[i].scalar_type() == dtype && starts[i] >= 0);
    TORCH_CHECK(!s.defined() || starts[i] + xs[i].size(0) <= s.numel());
    TORCH_CHECK(!rows.defined() || starts[i] + xs[i].size(0) <= rows.numel());
  }
  check_flat(s, 0, dtype);
  TORCH_CHECK(!rows.defined() || (rows.scalar_type() == at::kBool && rows.is_contiguous()));
  const auto items = work_items(xs);
  AT_DISPATCH_FLOATING_TYPES(dtype, "scale_sub_", [&] {
    const scalar_t* sp = s.defined() ? s.data_ptr<scalar_t>() : nullptr;
    const bool* mk = rows.defined() ? rows.data_ptr<bool>() : nullptr;
    const scalar_t cc = static_cast<scalar_t>(c);
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
      for (int64_t k = i0; k < i1; ++k) {
        const Item& it = items[k];
        const int64_t n = row_len(xs[it.t]), st = starts[it.t];
        scalar_t* x = xs[it.t].data_ptr<scalar_t>();
        const scalar_t* d = ds[it.t].data_ptr<scalar_t>();
        for (int64_t r = it.r0; r < it.r1; ++r) {
          if (mk && !mk[st + r]) continue;
          scale_sub_row(x + r * n, d + r * n, sp ? sp[st + r] : scalar_t(1), cc, n);
        }
      }
    });
  });
  written(xs);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sgd_step", &sgd_step);
  m.def("row_stats", &row_stats);
  m.def("scale_sub_", &scale_sub_);
}
