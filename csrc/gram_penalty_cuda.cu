// CUDA kernels of fastreg::gram_penalty (the "cuda" backend). The orchestration and the GEMMs
// (cuBLAS, through ATen) are gram_penalty_impl in gram_penalty.h, shared with the CPU backend; the
// epilogue kernels below run the same __host__ __device__ arithmetic (gram_term, assemble_grad)
// that the CPU loops run, so the CPU tests exercise it. One launch per group and epilogue. Per call
// nothing crosses between host and device: the row permutations and layer indices are in the mask
// set's plan (built when the masks change), the weight and gradient pointers are kernel arguments,
// and a coefficient tensor is read by the kernels.
#include "gram_penalty.h"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include <optional>

namespace fastreg::gram {
namespace {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over `total` elements (at most `cap`, at least 1).
inline unsigned blocks_for(int64_t total, int64_t cap = 4096) {
  return static_cast<unsigned>(std::clamp<int64_t>((total + kThreads - 1) / kThreads, 1, cap));
}

// dst[b, i, :] = acc(weight_b[perm[b·n + i], :])  (pruned rows first, converted to acc_t)
template <class scalar_t, class acc_t>
__global__ void gather_rows_kernel(const int64_t* perm, const LayerPointers src, acc_t* dst, int64_t B, int64_t n,
                                   int64_t D) {
  const int64_t total = B * n * D, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t r = e / D, j = e - r * D;
    const scalar_t* w = reinterpret_cast<const scalar_t*>(src.at[r / n]);
    dst[e] = static_cast<acc_t>(w[perm[r] * D + j]);
  }
}

// per_layer[layer[b]] += scale · coeff · Σ_{i, j} gram_term<kTerm>(x[b, i, j], y[b, i, j], i, j, p)
// (coeff: a device scalar, or null for 1);
// grid = (chunks, B): each block reduces a strided part of matrix b, one atomicAdd per block.
template <Term kTerm, class acc_t>
__global__ void reduce_kernel(acc_t* x, acc_t* y, const int64_t* layer, int64_t rows, int64_t cols, int64_t p,
                              acc_t scale, const acc_t* coeff, acc_t* per_layer) {
  const int64_t b = blockIdx.y, per = rows * cols, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  acc_t* xb = x + b * per;
  acc_t* yb = y + b * per;
  acc_t s = 0;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < per; e += stride) {
    const int64_t i = e / cols;
    s += gram_term<kTerm, acc_t>(xb[e], yb[e], i, e - i * cols, p);
  }
  __shared__ acc_t partial[kThreads];
  partial[threadIdx.x] = s;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width >>= 1) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) atomicAdd(per_layer + layer[b], (coeff != nullptr ? scale * *coeff : scale) * partial[0]);
}

// v = coeff · assemble_grad(g[b, i, :], wp[b, i, :], i ≥ p, grad_coeff, kept_coeff),
// g[b, i] = g1[b, i] for i < split, else g2[b, i − split];  grad_b[perm[b·n + i], :] = v, or += v
// (accumulate). coeff: a device scalar, or null for 1.
template <class scalar_t, class acc_t>
__global__ void scatter_grads_kernel(const int64_t* perm, const LayerPointers grad, const acc_t* g1, const acc_t* g2,
                                     const acc_t* wp, int64_t B, int64_t n, int64_t D, int64_t p, int64_t split,
                                     acc_t grad_coeff, acc_t kept_coeff, const acc_t* coeff, bool accumulate) {
  if (coeff != nullptr) {
    grad_coeff *= *coeff;
    kept_coeff *= *coeff;
  }
  const int64_t total = B * n * D, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t r = e / D, j = e - r * D, b = r / n, i = r - b * n;
    const acc_t g = i < split ? g1[(b * split + i) * D + j] : g2[(b * (n - split) + i - split) * D + j];
    scalar_t* out = reinterpret_cast<scalar_t*>(grad.at[b]) + perm[r] * D + j;
    const acc_t v = assemble_grad<acc_t>(g, wp[e], i >= p, grad_coeff, kept_coeff);
    *out = static_cast<scalar_t>(accumulate ? static_cast<acc_t>(*out) + v : v);
  }
}

// TF32 off for the GEMMs of one call, restored after: the diagonal/identity D-side forms Σ E² as
// ‖S‖² − 2 Σ‖w_i‖² + |K|, which cancels catastrophically with TF32's 10-bit mantissa, and the N-side's
// E = G − I is as sensitive near orthonormal rows. (A process-wide setting: not thread-safe against
// other threads changing it meanwhile, like torch.backends.cuda.matmul.fp32_precision itself.) Through
// the fp32-precision API where torch has it (mixing it with the legacy allow_tf32 one raises there).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
struct FullFp32Gemms {
  const at::Float32Precision previous =
      at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL);
  FullFp32Gemms() {
    if (previous != at::Float32Precision::IEEE)
      at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, at::Float32Precision::IEEE);
  }
  ~FullFp32Gemms() {
    if (previous == at::Float32Precision::IEEE) return;
    try {  // (a destructor must not throw; the setting was valid when read, so this never should)
      at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, previous);
    } catch (const std::exception& e) {
      TORCH_WARN("fastreg.gram_penalty: could not restore the CUDA matmul fp32 precision: ", e.what());
    }
  }
};
#else
struct FullFp32Gemms {
  const bool previous = at::globalContext().allowTF32CuBLAS();
  FullFp32Gemms() {
    if (previous) at::globalContext().setAllowTF32CuBLAS(false);
  }
  ~FullFp32Gemms() {
    if (previous) at::globalContext().setAllowTF32CuBLAS(true);
  }
};
#endif

struct CudaKernels {
  // One stream: each group runs as batched GEMMs and one launch per epilogue.
  static void run(const std::vector<Group>& groups, at::Tensor& per_layer, at::ScalarType dtype,
                  const RunOptions& options) {
    std::optional<FullFp32Gemms> full_fp32;
    if (!groups.empty() && groups[0].target != Target::kDecorrelate) full_fp32.emplace();
    run_groups_batched<CudaKernels>(groups, per_layer, dtype, options);
  }

  static void gather_rows(const GroupTable& t, at::ScalarType dtype, at::Tensor& wp) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gram_penalty_gather_rows", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      gather_rows_kernel<scalar_t, acc_t><<<blocks_for(t.B * t.n * t.D), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          t.perm, LayerPointers(t.src), wp.data_ptr<acc_t>(), t.B, t.n, t.D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  template <Term kTerm>
  static void reduce(const GroupTable& t, at::Tensor& x, at::Tensor& y, int64_t rows, int64_t cols, double scale,
                     const void* coeff, at::Tensor& per_layer) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gram_penalty_reduce", [&] {
      // Under torch.use_deterministic_algorithms(True), one block per matrix: a layer appears once in
      // a group, so its total gets one atomicAdd per launch, and the sum has a fixed order.
      const unsigned chunks = at::globalContext().deterministicAlgorithms() ? 1u : blocks_for(rows * cols, 256);
      const dim3 grid(chunks, static_cast<unsigned>(t.B));
      reduce_kernel<kTerm, scalar_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), t.layer, rows, cols, t.p, static_cast<scalar_t>(scale),
          static_cast<const scalar_t*>(coeff), per_layer.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void scatter_grads(const GroupTable& t, at::ScalarType dtype, const at::Tensor& g1, const at::Tensor& g2,
                            const at::Tensor& wp, double grad_coeff, double kept_coeff, const RunOptions& options) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gram_penalty_scatter_grads", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scatter_grads_kernel<scalar_t, acc_t>
          <<<blocks_for(t.B * t.n * t.D), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              t.perm, LayerPointers(t.grad), g1.data_ptr<acc_t>(), g2.data_ptr<acc_t>(), wp.data_ptr<acc_t>(), t.B, t.n,
              t.D, t.p, g1.size(1), static_cast<acc_t>(grad_coeff), static_cast<acc_t>(kept_coeff),
              static_cast<const acc_t*>(options.coeff), options.accumulate);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  // The caching allocator makes a fresh buffer per group cheap and stream-safe.
  static at::Tensor workspace(int64_t numel, const at::TensorOptions& options) { return at::empty({numel}, options); }
};

std::tuple<at::Tensor, std::vector<at::Tensor>> gram_penalty_cuda(at::TensorList weights, at::TensorList keep_masks,
                                                                  c10::string_view target, c10::string_view reduction,
                                                                  double coeff, bool need_grad) {
  TORCH_CHECK_VALUE(!weights.empty(), "gram_penalty: weights must not be empty");
  const c10::cuda::CUDAGuard guard(weights[0].device());
  return gram_penalty_impl<CudaKernels>(weights, keep_masks, target, reduction, coeff, need_grad);
}

at::Tensor gram_penalty_grad_cuda(at::TensorList weights, at::TensorList keep_masks, at::TensorList grads,
                                  c10::string_view target, c10::string_view reduction, double coeff,
                                  const std::optional<at::Tensor>& coeff_tensor) {
  TORCH_CHECK_VALUE(!weights.empty(), "gram_penalty: weights must not be empty");
  const c10::cuda::CUDAGuard guard(weights[0].device());
  return std::get<0>(gram_penalty_impl<CudaKernels>(weights, keep_masks, target, reduction, coeff, true, grads,
                                                    coeff_tensor, /*accumulate=*/true));
}

}  // namespace
}  // namespace fastreg::gram

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("gram_penalty_and_grads", &fastreg::gram::gram_penalty_cuda);
  m.impl("gram_penalty_grad_", &fastreg::gram::gram_penalty_grad_cuda);
}
