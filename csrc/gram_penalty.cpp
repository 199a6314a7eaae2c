// CPU kernels of fastreg::gram_penalty (the "cpp" backend). Each layer runs its Program (see
// gram_penalty.h) on raw pointers into a per-thread workspace: gather its rows, the GEMMs straight
// through BLAS (sgemm_/dgemm_, which libtorch_cpu exports from its MKL; ATen's mm if absent), the
// reductions and the gradient scatter, with no ATen call per layer. Small layers are spread over
// the threads, largest first, each on one thread (a thread pulls the next layer when it is done);
// large layers then run one at a time with every thread (threaded BLAS, parallel epilogues).
#include "gram_penalty.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <type_traits>

extern "C" {
// Fortran BLAS (column-major). Weak: resolved from libtorch_cpu when its BLAS exports them.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace fastreg::gram {
namespace {

// Rows per parallel task: about 16k elements each.
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// A row-major matrix view v as the column-major operand vᵀ that BLAS multiplies: stored as is
// ('N', v row-major) or transposed ('T', v column-major, i.e. a transposed view).
struct BlasOperand {
  char trans;
  int ld;
};
inline BlasOperand blas_operand(const MatView& v) {
  if (v.cs == 1 && (v.rs >= v.cols || v.rows <= 1)) return {'N', static_cast<int>(std::max<int64_t>({v.rs, v.cols, 1}))};
  return {'T', static_cast<int>(std::max<int64_t>({v.cs, v.rows, 1}))};
}

// c = alpha · a @ b + beta · c for row-major views (offsets ignored: the pointers point at element
// (0, 0)); beta is 0 or 1. In BLAS's column-major terms: cᵀ = alpha · bᵀ aᵀ + beta · cᵀ.
template <class acc_t>
void gemm(acc_t* pc, const MatView& c, const acc_t* pa, const MatView& a, const acc_t* pb, const MatView& b,
          acc_t alpha = 1, acc_t beta = 0) {
  if (c.empty()) return;
  auto* blas = [] {
    if constexpr (std::is_same_v<acc_t, float>) return sgemm_;
    else return dgemm_;
  }();
  if (blas == nullptr) {  // no BLAS symbols: ATen's mm on views of the same memory
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
    auto as_tensor = [&](const acc_t* p, const MatView& v) {
      return at::from_blob(const_cast<acc_t*>(p), {v.rows, v.cols}, {v.rs, v.cs}, opts);
    };
    at::Tensor out = as_tensor(pc, c);
    if (beta != acc_t(0)) {
      out.addmm_(as_tensor(pa, a), as_tensor(pb, b), beta, alpha);
      return;
    }
    at::mm_out(out, as_tensor(pa, a), as_tensor(pb, b));
    if (alpha != acc_t(1)) out.mul_(alpha);
    return;
  }
  const BlasOperand x = blas_operand(b), y = blas_operand(a);
  const int m = static_cast<int>(c.cols), n = static_cast<int>(c.rows), k = static_cast<int>(a.cols);
  const int ldc = static_cast<int>(std::max<int64_t>({c.rs, c.cols, 1}));
  blas(&x.trans, &y.trans, &m, &n, &k, &alpha, pb, &x.ld, pa, &y.ld, &beta, pc, &ldc);
}

// out = a @ b on a layer's workspace ws.
template <class acc_t>
void gemm(acc_t* ws, const MatView& out, const MatView& a, const MatView& b) {
  gemm(ws + out.start(1, 0), out, ws + a.start(1, 0), a, ws + b.start(1, 0), b);
}

// A row-major [rows, cols] matrix.
inline MatView dense(int64_t rows, int64_t cols) {
  MatView v;
  v.rows = rows;
  v.cols = cols;
  v.rs = cols;
  return v;
}

// The N-side in the layer's own row order, for fp32/fp64 weights: no permuted copy of W and the
// gradient GEMM writes straight into the output,
//   decorrelate: A = W_P Wᵀ (W_P gathered), E = the n×n error matrix in row order built from A
//                (E[P_i, :] = A[i, :], E[k, P_i] = A[i, k] for kept k, 0 elsewhere)
//   diagonal:    E = W Wᵀ − diag(m)
// then Σ E² and ∇W = 4·scale · E W (one GEMM straight into the gradient, β = 1 when it accumulates).  Decorrelate flops 2pnD + 2n²D: more than the permuted program's
// (6pn − 2p²)D, but no gather/scatter pass — the better trade for small layers at p ≈ n/2. (It never
// computes the gram W Wᵀ: only A's p rows, the n×n E is A scattered. Measured on ResNet-56's convs
// against the permuted program for every decorrelate layer: 10–20% faster on one thread.)
template <class acc_t>
double run_nside_in_row_order(const Group& group, int64_t b, acc_t* ws, const RunOptions& options) {
  const GroupTable& t = group.table;
  const int64_t n = t.n, D = t.D, p = t.p;
  const int64_t* perm = t.perm + b * n;
  const acc_t* w = reinterpret_cast<const acc_t*>(t.src[b]);
  const MatView W = dense(n, D);
  acc_t* E = ws;  // [n, n]
  if (group.target == Target::kDecorrelate) {
    acc_t* wp = ws + n * n;  // W_P [p, D]
    acc_t* A = wp + p * D;   // [p, n]
    for (int64_t i = 0; i < p; ++i) std::memcpy(wp + i * D, w + perm[i] * D, D * sizeof(acc_t));
    gemm(A, dense(p, n), wp, dense(p, D), w, W.t());
    std::fill(E, E + n * n, acc_t(0));
    for (int64_t i = 0; i < p; ++i) {
      std::memcpy(E + perm[i] * n, A + i * n, n * sizeof(acc_t));
      for (int64_t r = p; r < n; ++r) E[perm[r] * n + perm[i]] = A[i * n + perm[r]];
    }
  } else {
    gemm(E, dense(n, n), w, W, w, W.t());
    for (int64_t r = p; r < n; ++r) E[perm[r] * (n + 1)] -= acc_t(1);  // kept rows: E_ii = G_ii − 1
  }
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    acc_t row = 0;
    for (int64_t j = 0; j < n; ++j) row += E[i * n + j] * E[i * n + j];
    sum += row;
  }
  if (options.need_grad)
    gemm(reinterpret_cast<acc_t*>(t.grad[b]), W, E, dense(n, n), w, W, static_cast<acc_t>(4.0 * group.scale),
         acc_t(options.accumulate ? 1 : 0));
  return sum;
}

// Whether run_nside_in_row_order runs this group (fp32/fp64 small N-side layers at a flop cost
// within 1.25× of the permuted program's).
inline bool in_row_order(const Group& g, at::ScalarType dtype) {
  if (g.side != Side::kN || g.layer_flops >= kSmallLayerFlops || (dtype != at::kFloat && dtype != at::kDouble))
    return false;
  const double n = g.table.n, D = g.table.D, p = g.table.p;
  const double flops = (g.target == Target::kDecorrelate ? 2 * p * n * D : 2 * n * n * D) + 2 * n * n * D;
  return flops <= 1.25 * g.layer_flops;
}

inline int64_t row_order_numel(const Group& g) { return g.table.n * g.table.n + g.table.p * (g.table.D + g.table.n); }

// Σ_{i<rows, j<cols} gram_term<kTerm>(x[i, j], y[i, j], i, j, p) over one layer's region.
template <Term kTerm, class acc_t>
double reduce(acc_t* x, acc_t* y, int64_t rows, int64_t cols, int64_t p) {
  std::vector<double> row_sum(rows);
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t* xr = x + i * cols;
      acc_t* yr = y + i * cols;
      acc_t s = 0;
      for (int64_t j = 0; j < cols; ++j) s += gram_term<kTerm, acc_t>(xr[j], yr[j], i, j, p);
      row_sum[i] = s;
    }
  });
  double s = 0;
  for (double r : row_sum) s += r;
  return s;
}

// Layer b of a group: its program on workspace ws; writes per_layer[layer] and writes (or adds into)
// its gradient.
template <class scalar_t>
void run_layer(const Group& group, int64_t b, at::opmath_type<scalar_t>* ws, at::opmath_type<scalar_t>* per_layer,
               const RunOptions& options) {
  using acc_t = at::opmath_type<scalar_t>;
  const Program& pr = group.program;
  const GroupTable& t = group.table;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (in_row_order(group, c10::CppTypeToScalarType<scalar_t>::value)) {
      per_layer[t.layer[b]] = static_cast<acc_t>(group.scale * run_nside_in_row_order(group, b, ws, options));
      return;
    }
  }
  const int64_t n = t.n, D = t.D, p = t.p;
  const int64_t* perm = t.perm + b * n;
  acc_t* wp = ws + pr.wp.start(1, 0);

  const scalar_t* src = reinterpret_cast<const scalar_t*>(t.src[b]);
  at::parallel_for(0, n, row_grain(D), [&](int64_t begin, int64_t end) {  // wp[i] = acc(w[perm[i]])
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* s = src + perm[i] * D;
      acc_t* d = wp + i * D;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        std::memcpy(d, s, D * sizeof(acc_t));
      } else {
        for (int64_t j = 0; j < D; ++j) d[j] = static_cast<acc_t>(s[j]);
      }
    }
  });

  double sum = 0.0;
  for (const Step& s : pr.steps) {
    if (s.gemm) {
      gemm(ws, s.out, s.a, s.b);
    } else {
      with_term(s.term, [&](auto term) {
        sum += reduce<decltype(term)::value>(ws + s.out.start(1, 0), ws + s.a.start(1, 0), s.out.rows, s.out.cols, p);
      });
    }
  }
  per_layer[t.layer[b]] = static_cast<acc_t>(group.scale * sum);
  if (!options.need_grad) return;
  const bool add = options.accumulate;

  scalar_t* grad = reinterpret_cast<scalar_t*>(t.grad[b]);
  const acc_t cg = static_cast<acc_t>(4.0 * group.scale), ck = static_cast<acc_t>(4.0 * group.scale * pr.kept_factor);
  const int64_t split = pr.g1.rows;
  const acc_t* g1 = ws + pr.g1.start(1, 0);
  const acc_t* g2 = ws + pr.g2.start(1, 0);
  at::parallel_for(0, n, row_grain(D), [&](int64_t begin, int64_t end) {  // ∇ = scale · 4 E W
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* dst = grad + perm[i] * D;
      const acc_t* g = i < split ? g1 + i * D : g2 + (i - split) * D;
      const acc_t* w = wp + i * D;
      const bool kept = i >= p && ck != acc_t(0);  // else w is not needed: not read (the loop is memory-bound)
      if (add) {
        for (int64_t j = 0; j < D; ++j)
          dst[j] = static_cast<scalar_t>(static_cast<acc_t>(dst[j]) +
                                         assemble_grad<acc_t>(g[j], kept ? w[j] : acc_t(0), kept, cg, ck));
      } else if (kept) {
        for (int64_t j = 0; j < D; ++j) dst[j] = static_cast<scalar_t>(assemble_grad<acc_t>(g[j], w[j], true, cg, ck));
      } else {
        for (int64_t j = 0; j < D; ++j) dst[j] = static_cast<scalar_t>(assemble_grad<acc_t>(g[j], acc_t(0), false, cg, ck));
      }
    }
  });
}

// One scratch buffer per thread, kept across calls: fresh multi-megabyte buffers would cost a
// page fault per 4 KiB on every call.
template <class acc_t>
acc_t* workspace(int64_t numel) {
  thread_local std::vector<acc_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < numel) buffer.resize(numel);
  return buffer.data();
}

struct CpuKernels {
  static void run(const std::vector<Group>& groups, at::Tensor& per_layer, at::ScalarType dtype, const RunOptions& options) {
    struct Task {
      const Group* group;
      int64_t b;
    };
    std::vector<Task> small, large;
    int64_t small_numel = 0;
    for (const Group& g : groups) {
      const bool is_small = g.layer_flops < kSmallLayerFlops;
      if (is_small) small_numel = std::max({small_numel, g.program.numel, row_order_numel(g)});
      for (int64_t b = 0; b < g.table.B; ++b) (is_small ? small : large).push_back({&g, b});
    }
    std::stable_sort(small.begin(), small.end(),
                     [](const Task& a, const Task& b) { return a.group->layer_flops > b.group->layer_flops; });
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gram_penalty_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      acc_t* out = per_layer.data_ptr<acc_t>();
      const int64_t num_small = static_cast<int64_t>(small.size());
      std::atomic<int64_t> next{0};
      auto run_small = [&](int64_t, int64_t) {  // this thread's share: the next layer not yet taken
        acc_t* ws = workspace<acc_t>(small_numel);
        for (int64_t i = next++; i < num_small; i = next++) run_layer<scalar_t>(*small[i].group, small[i].b, ws, out, options);
      };
      const int64_t threads = std::min<int64_t>(at::get_num_threads(), num_small);
      if (threads > 1) at::parallel_for(0, threads, 1, run_small);
      else run_small(0, 1);
      for (const Task& task : large)
        run_layer<scalar_t>(*task.group, task.b, workspace<acc_t>(task.group->program.numel), out, options);
    });
  }
};

std::tuple<at::Tensor, std::vector<at::Tensor>> gram_penalty_cpu(at::TensorList weights, at::TensorList keep_masks,
                                                                 c10::string_view target, c10::string_view reduction,
                                                                 double coeff, bool need_grad) {
  return gram_penalty_impl<CpuKernels>(weights, keep_masks, target, reduction, coeff, need_grad);
}

at::Tensor gram_penalty_grad_cpu(at::TensorList weights, at::TensorList keep_masks, at::TensorList grads,
                                 c10::string_view target, c10::string_view reduction, double coeff,
                                 const std::optional<at::Tensor>& coeff_tensor) {
  return std::get<0>(gram_penalty_impl<CpuKernels>(weights, keep_masks, target, reduction, coeff, true, grads,
                                                   coeff_tensor, /*accumulate=*/true));
}

}  // namespace
}  // namespace fastreg::gram

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("gram_penalty_and_grads", &fastreg::gram::gram_penalty_cpu);
  m.impl("gram_penalty_grad_", &fastreg::gram::gram_penalty_grad_cpu);
}
