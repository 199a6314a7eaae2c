// CPU kernels of fastreg::gram_penalty (the "cpp" backend): the epilogues of gram_penalty.h as
// loops over raw pointers, parallel over rows with at::parallel_for; the GEMMs are ATen's (MKL).
#include "gram_penalty.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>

namespace fastreg::gram {
namespace {

// Rows per parallel task: about 16k elements each.
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

struct CpuKernels {
  static constexpr bool kSplitSmallGroupsAcrossThreads = true;

  static void gather_rows(const GroupTable& t, at::ScalarType dtype, at::Tensor& wp) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gram_penalty_gather_rows", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      acc_t* dst = wp.data_ptr<acc_t>();
      const int64_t n = t.n, D = t.D;
      at::parallel_for(0, t.B * n, row_grain(D), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* src = reinterpret_cast<const scalar_t*>(t.src[r / n]) + t.perm[r] * D;
          acc_t* d = dst + r * D;
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            std::memcpy(d, src, D * sizeof(acc_t));
          } else {
            for (int64_t j = 0; j < D; ++j) d[j] = static_cast<acc_t>(src[j]);
          }
        }
      });
    });
  }

  template <Term kTerm>
  static void reduce(const GroupTable& t, at::Tensor& x, at::Tensor& y, int64_t rows, int64_t cols, double scale,
                     at::Tensor& per_layer) {
    RECORD_FUNCTION("fastreg::gram_penalty::reduce", std::vector<c10::IValue>());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gram_penalty_reduce", [&] {
      scalar_t* X = x.data_ptr<scalar_t>();
      scalar_t* Y = y.data_ptr<scalar_t>();
      const int64_t p = t.p;
      std::vector<double> row_sum(t.B * rows);
      at::parallel_for(0, t.B * rows, row_grain(cols), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t i = r % rows;
          scalar_t* xr = X + r * cols;
          scalar_t* yr = Y + r * cols;
          scalar_t s = 0;
          for (int64_t j = 0; j < cols; ++j) s += gram_term<kTerm, scalar_t>(xr[j], yr[j], i, j, p);
          row_sum[r] = s;
        }
      });
      scalar_t* out = per_layer.data_ptr<scalar_t>();
      for (int64_t b = 0; b < t.B; ++b) {
        double s = 0;
        for (int64_t i = 0; i < rows; ++i) s += row_sum[b * rows + i];
        out[t.layer[b]] += static_cast<scalar_t>(scale * s);
      }
    });
  }

  static void scatter_grads(const GroupTable& t, at::ScalarType dtype, const at::Tensor& g1, const at::Tensor& g2,
                            const at::Tensor& wp, double grad_coeff, double kept_coeff) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gram_penalty_scatter_grads", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t* G1 = g1.data_ptr<acc_t>();
      const acc_t* G2 = g2.data_ptr<acc_t>();
      const acc_t* W = wp.data_ptr<acc_t>();
      const acc_t cg = static_cast<acc_t>(grad_coeff), ck = static_cast<acc_t>(kept_coeff);
      const int64_t n = t.n, D = t.D, p = t.p, split = g1.size(1);
      at::parallel_for(0, t.B * n, row_grain(D), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = r / n, i = r - b * n;
          scalar_t* dst = reinterpret_cast<scalar_t*>(t.grad[b]) + t.perm[r] * D;
          const acc_t* g = i < split ? G1 + (b * split + i) * D : G2 + (b * (n - split) + i - split) * D;
          const acc_t* w = W + r * D;
          const bool kept = i >= p;
          if (kept && ck != acc_t(0)) {
            for (int64_t j = 0; j < D; ++j) dst[j] = static_cast<scalar_t>(assemble_grad<acc_t>(g[j], w[j], true, cg, ck));
          } else {  // w not needed: skip reading it (the loop is memory-bound)
            for (int64_t j = 0; j < D; ++j) dst[j] = static_cast<scalar_t>(assemble_grad<acc_t>(g[j], acc_t(0), false, cg, ck));
          }
        }
      });
    });
  }

  // One scratch buffer per thread, kept across calls: fresh multi-megabyte buffers would cost a
  // page fault per 4 KiB on every call. (Leaked on purpose: no destruction-order issues at exit.)
  static at::Tensor workspace(int64_t numel, const at::TensorOptions& options) {
    thread_local auto* cache = new at::Tensor[2];  // [0] float, [1] double
    at::Tensor& buf = cache[options.dtype() == at::kDouble ? 1 : 0];
    if (!buf.defined() || buf.numel() < numel) buf = at::empty({numel}, options);
    return buf.narrow(0, 0, numel);
  }
};

std::tuple<at::Tensor, std::vector<at::Tensor>> gram_penalty_cpu(at::TensorList weights, at::TensorList keep_masks,
                                                                 c10::string_view target, c10::string_view reduction,
                                                                 bool need_grad) {
  return gram_penalty_impl<CpuKernels>(weights, keep_masks, target, reduction, need_grad);
}

}  // namespace
}  // namespace fastreg::gram

TORCH_LIBRARY_IMPL(fastreg, CPU, m) { m.impl("gram_penalty", &fastreg::gram::gram_penalty_cpu); }
