// CPU kernels of fastreg::gram_penalty (the "cpp" backend): the epilogues of gram_penalty.h as
// loops over raw pointers, parallel over rows with at::parallel_for; the GEMMs are ATen's (MKL).
#include "gram_penalty.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace fastreg::gram {
namespace {

// Rows per parallel task: about 16k elements each.
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

struct CpuKernels {
  static void gather_rows(const GroupTable& t, at::ScalarType dtype, at::Tensor& wp) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gram_penalty_gather_rows", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      acc_t* dst = wp.data_ptr<acc_t>();
      const int64_t n = t.n, D = t.D;
      at::parallel_for(0, t.B * n, row_grain(D), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* src = reinterpret_cast<const scalar_t*>(t.src[r / n]) + t.perm[r] * D;
          acc_t* d = dst + r * D;
          for (int64_t j = 0; j < D; ++j) d[j] = static_cast<acc_t>(src[j]);
        }
      });
    });
  }

  template <Term kTerm>
  static void reduce(const GroupTable& t, at::Tensor& x, at::Tensor& y, int64_t rows, int64_t cols, double scale,
                     at::Tensor& per_layer) {
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

  static void scatter_grads(const GroupTable& t, at::ScalarType dtype, const at::Tensor& gp, const at::Tensor& wp,
                            double kept_coeff) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gram_penalty_scatter_grads", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t* G = gp.data_ptr<acc_t>();
      const acc_t* W = wp.data_ptr<acc_t>();
      const acc_t c = static_cast<acc_t>(kept_coeff);
      const int64_t n = t.n, D = t.D, p = t.p;
      at::parallel_for(0, t.B * n, row_grain(D), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          scalar_t* dst = reinterpret_cast<scalar_t*>(t.grad[r / n]) + t.perm[r] * D;
          const acc_t* g = G + r * D;
          const acc_t* w = W + r * D;
          const bool kept = r % n >= p;
          for (int64_t j = 0; j < D; ++j) dst[j] = static_cast<scalar_t>(assemble_grad<acc_t>(g[j], w[j], kept, c));
        }
      });
    });
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
