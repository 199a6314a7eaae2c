// CUDA kernels of the fused per-step ops (DESIGN.md §1.2–1.4), multi-tensor-apply style.
//
// A Table (kernel argument, < 4 KB) holds the addresses, slice layouts and dtype codes of up to
// kMaxTensors tensors plus the prefix sum of blocks per tensor; block b finds its tensor by binary
// search and works on its chunk. One launch covers tensors of mixed sizes and dtypes (the dtype is
// switched once per block); longer lists take ⌈n / kMaxTensors⌉ launches. Two kernel shapes:
//
// * update_kernel:  one block per chunk of kElemsPerBlock elements; each element finds its slice
//                   and is updated only if the slice is pruned (l2_grad_, shrink_, slimming_grad_,
//                   the apply pass of the coupled group lasso).
// * reduce_kernel:  one warp per slice; reduces the slice (Σ|x| or Σx²) and then writes a norm,
//                   adds to a group total (atomics in double), or — per-slice group lasso — reuses
//                   the norm to update the slice's gradient in the same pass.
//
// Determinism: every result but a group total has a fixed summation order. Group totals (saliency,
// coupled group lasso) are atomic adds in double, whose order varies from run to run (in the last
// bits of a double); under torch.use_deterministic_algorithms(True) the kernel writes each slice's
// share instead, and index_add_ (deterministic in that mode) sums them per group.
// Index math is 32-bit for tensors of fewer than 2^32 elements (SliceLayout::fits32).
//
// The per-element arithmetic is multi_tensor.h's, shared with the CPU kernels. Cannot run on our
// GPU-less machines: compiled in CI, exercised through the shared functors on CPU.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <climits>

#include "mask_bytes.h"
#include "multi_tensor.h"

namespace fastreg {
namespace {

using mt::SliceLayout;
namespace host = mt::host;

constexpr int kMaxTensors = 36;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kElemsPerBlock = kThreads * 8;

struct Table {
  void* dst[kMaxTensors];        // written: gradients, tensors (shrink_), or outputs (norms)
  const void* src[kMaxTensors];  // read: parameters (== dst for shrink_)
  const void* vec[kMaxTensors];  // per-slice vector: bool keep mask or int64 group ids (or null)
  int64_t outer[kMaxTensors], slices[kMaxTensors], inner[kMaxTensors];
  int32_t block_start[kMaxTensors + 1];
  int8_t dtype[kMaxTensors];
  int32_t n;
};
static_assert(sizeof(Table) < 4000, "the tensor table must fit the 4 KB kernel argument space");

struct Entry {
  void* dst;
  const void* src;
  const void* vec;
  SliceLayout layout;
  int8_t dtype;
};

// Launch `launch(table, blocks)` over every entry, at most kMaxTensors per launch; a tensor gets
// ⌈units / units_per_block⌉ blocks, units = slices (by_slices) or elements.
template <typename Launch>
void launch_batched(const std::vector<Entry>& entries, int64_t units_per_block, bool by_slices, const Launch& launch) {
  Table tab{};
  int64_t blocks = 0;
  auto flush = [&] {
    if (tab.n == 0) return;
    tab.block_start[tab.n] = static_cast<int32_t>(blocks);
    launch(tab, static_cast<unsigned>(blocks));
    tab = Table{};
    blocks = 0;
  };
  for (const Entry& e : entries) {
    const int64_t units = by_slices ? e.layout.slices : e.layout.numel();
    if (units == 0) continue;
    const int64_t nb = (units + units_per_block - 1) / units_per_block;
    TORCH_CHECK(nb < INT32_MAX, "fastreg: tensor too large for one launch");
    if (tab.n == kMaxTensors || blocks + nb >= INT32_MAX) flush();
    const int i = tab.n++;
    tab.dst[i] = e.dst;
    tab.src[i] = e.src;
    tab.vec[i] = e.vec;
    tab.outer[i] = e.layout.outer;
    tab.slices[i] = e.layout.slices;
    tab.inner[i] = e.layout.inner;
    tab.dtype[i] = e.dtype;
    tab.block_start[i] = static_cast<int32_t>(blocks);
    blocks += nb;
  }
  flush();
}

__device__ __forceinline__ int tensor_of_block(const Table& tab, int32_t block) {
  int lo = 0, hi = tab.n - 1;  // the last tensor whose first block is <= block
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tab.block_start[mid] <= block) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ SliceLayout layout_at(const Table& tab, int t) {
  return SliceLayout{tab.outer[t], tab.slices[t], tab.inner[t]};
}

// The elements [block_begin, block_end) of tensor t this block updates (kElemsPerBlock, fewer at the end).
__device__ __forceinline__ int64_t block_begin(const Table& tab, int t) {
  return static_cast<int64_t>(blockIdx.x - tab.block_start[t]) * kElemsPerBlock;
}

__device__ __forceinline__ int64_t block_end(int64_t begin, const SliceLayout& L) {
  return begin + kElemsPerBlock < L.numel() ? begin + kElemsPerBlock : L.numel();
}

// f(T{}) with T the C++ type of dtype code `code` (uniform per block: no divergence).
template <typename F>
__device__ __forceinline__ void with_dtype(int8_t code, const F& f) {
  switch (code) {
    case mt::kFloat32: f(float{}); break;
    case mt::kFloat64: f(double{}); break;
    case mt::kFloat16: f(c10::Half{}); break;
    case mt::kBFloat16: f(c10::BFloat16{}); break;
    default: break;
  }
}

using mt::Coeff;

// ---------------------------------------------------------------------------------------------
// Element-wise masked updates
// ---------------------------------------------------------------------------------------------
enum class Update { L2, Shrink, Slimming, GroupedLasso };

struct GroupArgs {
  const double* group_sumsq = nullptr;
  const uint8_t* pruned_groups = nullptr;
  int64_t num_groups = 0;
};

template <Update mode>
__global__ void update_kernel(Table tab, Coeff coeff, GroupArgs groups) {
  const int t = tensor_of_block(tab, blockIdx.x);
  const SliceLayout L = layout_at(tab, t);
  const int64_t begin = block_begin(tab, t), end = block_end(begin, L);
  with_dtype(tab.dtype[t], [&](auto tag) {
    using T = decltype(tag);
    using A = mt::acc_t<T>;
    T* dst = static_cast<T*>(tab.dst[t]);
    const T* src = static_cast<const T*>(tab.src[t]);
    const A c = coeff.get<A>();
    const double lam = coeff.get<double>();
    const bool small = L.fits32();  // uniform per block
    for (int64_t e = begin + threadIdx.x; e < end; e += blockDim.x) {
      if constexpr (mode == Update::Slimming) {
        mt::slimming_elem<T, A>(dst[e], src[e], c);
        continue;
      }
      const int64_t slice = small ? static_cast<int64_t>(L.slice_of32(static_cast<uint32_t>(e))) : L.slice_of(e);
      if constexpr (mode == Update::GroupedLasso) {
        const int64_t g = static_cast<const int64_t*>(tab.vec[t])[slice];
        CUDA_KERNEL_ASSERT(g >= -1 && g < groups.num_groups && "group_ids out of [-1, num_groups)");
        if (g < 0 || g >= groups.num_groups || !groups.pruned_groups[g]) continue;
        const A scale = static_cast<A>(mt::lasso_scale<double>(groups.group_sumsq[g], lam));
        mt::l2_grad_elem<T, A>(dst[e], src[e], scale);
      } else {
        if (static_cast<const uint8_t*>(tab.vec[t])[slice]) continue;  // kept: untouched
        if constexpr (mode == Update::L2) mt::l2_grad_elem<T, A>(dst[e], src[e], c);
        else mt::shrink_elem<T, A>(dst[e], c);
      }
    }
  });
}

template <Update mode>
void run_update(const std::vector<Entry>& entries, Coeff coeff, GroupArgs groups = {}) {
  launch_batched(entries, kElemsPerBlock, false, [&](const Table& tab, unsigned blocks) {
    update_kernel<mode><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(tab, coeff, groups);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------
// Per-slice reductions: one warp per slice
// ---------------------------------------------------------------------------------------------
enum class Reduce { Norms, Saliency, GroupSumsq, SliceLasso };

struct ReduceArgs {
  int p = 2;                 // Norms: L1 or L2
  double* total = nullptr;   // Saliency: Σ ‖w‖/√|w| per group; GroupSumsq: Σ w² per group
  double* count = nullptr;   // Saliency: slices per group
  const uint8_t* pruned_groups = nullptr;  // GroupSumsq
  int64_t num_groups = 0;
  Coeff coeff{};             // SliceLasso: λ
  // Saliency, GroupSumsq: > 0 writes each slice's share to dst[s] (and, saliency, 1 to
  // dst[s + per_slice_stride]) instead of the atomic adds (run_group_sums).
  int64_t per_slice_stride = 0;
};

template <Reduce mode>
__global__ void reduce_kernel(Table tab, ReduceArgs args) {
  const int t = tensor_of_block(tab, blockIdx.x);
  const int lane = threadIdx.x % 32;
  const SliceLayout L = layout_at(tab, t);
  const int64_t s = static_cast<int64_t>(blockIdx.x - tab.block_start[t]) * kWarps + threadIdx.x / 32;
  if (s >= L.slices) return;  // warp-uniform
  int64_t g = -1;
  if constexpr (mode == Reduce::Saliency || mode == Reduce::GroupSumsq) {
    g = static_cast<const int64_t*>(tab.vec[t])[s];
    // An id out of range (the host checks run outside torch.compile only) is a device-side assert, as
    // for ATen's index ops, never a write out of bounds; -1 (no group) is skipped.
    CUDA_KERNEL_ASSERT(g >= -1 && g < args.num_groups && "group_ids out of [-1, num_groups)");
    if (g < 0 || g >= args.num_groups) return;
    if constexpr (mode == Reduce::GroupSumsq) {
      if (!args.pruned_groups[g]) return;
    }
  }
  if constexpr (mode == Reduce::SliceLasso) {
    if (static_cast<const uint8_t*>(tab.vec[t])[s]) return;  // kept slices are not read
  }
  with_dtype(tab.dtype[t], [&](auto tag) {
    using T = decltype(tag);
    using A = mt::acc_t<T>;
    const T* src = static_cast<const T*>(tab.src[t]);
    const int64_t n = L.slice_numel();
    const bool small = L.fits32();  // uniform per block
    auto offset = [&](int64_t j) {
      return small ? static_cast<int64_t>(L.offset32(static_cast<uint32_t>(s), static_cast<uint32_t>(j))) : L.offset(s, j);
    };
    A acc = 0;
    for (int64_t j = lane; j < n; j += 32) {
      const T x = src[offset(j)];
      if constexpr (mode == Reduce::Norms) acc += mt::norm_term<T, A>(x, args.p);
      else acc += mt::square_term<T, A>(x);
    }
    for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
    acc = __shfl_sync(0xffffffffu, acc, 0);  // every lane holds the slice total
    if constexpr (mode == Reduce::Norms) {
      if (lane == 0) static_cast<T*>(tab.dst[t])[s] = static_cast<T>(mt::finish_norm<A>(acc, args.p));
    } else if constexpr (mode == Reduce::Saliency) {
      if (lane == 0) {
        const double share = mt::saliency_term<double>(static_cast<double>(acc), n);
        if (args.per_slice_stride > 0) {
          double* out = static_cast<double*>(tab.dst[t]);
          out[s] = share;
          out[s + args.per_slice_stride] = 1.0;
        } else {
          atomicAdd(&args.total[g], share);
          atomicAdd(&args.count[g], 1.0);
        }
      }
    } else if constexpr (mode == Reduce::GroupSumsq) {
      if (lane == 0) {
        if (args.per_slice_stride > 0) static_cast<double*>(tab.dst[t])[s] = static_cast<double>(acc);
        else atomicAdd(&args.total[g], static_cast<double>(acc));
      }
    } else {  // SliceLasso: grad += λ / ‖w_s‖ · w_s over the slice just reduced
      const A scale = mt::lasso_scale<A>(acc, args.coeff.get<A>());
      T* dst = static_cast<T*>(tab.dst[t]);
      for (int64_t j = lane; j < n; j += 32) {
        const int64_t off = offset(j);
        mt::l2_grad_elem<T, A>(dst[off], src[off], scale);
      }
    }
  });
}

template <Reduce mode>
void run_reduce(const std::vector<Entry>& entries, const ReduceArgs& args) {
  launch_batched(entries, kWarps, true, [&](const Table& tab, unsigned blocks) {
    reduce_kernel<mode><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(tab, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Group totals of a Saliency / GroupSumsq reduction over `entries` (whose slices' group ids are
// group_ids, in order) into `totals` ([rows, G] doubles, zeroed; rows = 2 for saliency: sums,
// counts). By default atomic adds; under torch.use_deterministic_algorithms(True) each slice's share
// goes to a zeroed [rows, S] buffer (skipped slices keep 0) and index_add_ sums it per group in a
// fixed order.
template <Reduce mode>
void run_group_sums(std::vector<Entry> entries, at::TensorList group_ids, ReduceArgs args, const at::Tensor& totals,
                    int64_t rows) {
  if (!at::globalContext().deterministicAlgorithms()) {
    run_reduce<mode>(entries, args);
    return;
  }
  int64_t slices = 0;
  for (const Entry& e : entries) slices += e.layout.slices;
  if (slices == 0 || totals.numel() == 0) return;  // (no group: every id is −1)
  const at::Tensor shares = at::zeros({rows, slices}, totals.options());
  int64_t offset = 0;
  for (Entry& e : entries) {
    e.dst = shares.data_ptr<double>() + offset;
    offset += e.layout.slices;
  }
  args.per_slice_stride = slices;
  run_reduce<mode>(entries, args);
  // A slice in no group (id −1) or in an unpruned group has share 0: adding it to group 0 is harmless.
  totals.view({rows, totals.numel() / rows}).index_add_(1, at::cat(group_ids).clamp_min(0), shares);
}

template <typename O>
__global__ void saliency_finish_kernel(const double* total, const double* count, O* out, int64_t num_groups) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g < num_groups) out[g] = static_cast<O>(mt::group_mean<double>(total[g], count[g]));
}

// ---------------------------------------------------------------------------------------------
// Host entry points (argument checks shared with the CPU kernels)
// ---------------------------------------------------------------------------------------------
std::vector<Entry> entries_of(at::TensorList dst, at::TensorList src, at::TensorList vecs,
                              const std::vector<SliceLayout>& layouts, const std::vector<int64_t>& which) {
  std::vector<Entry> out;
  out.reserve(which.size());
  for (int64_t i : which) {
    out.push_back(Entry{dst[i].data_ptr(), src[i].data_ptr(), vecs.empty() ? nullptr : vecs[i].data_ptr(), layouts[i],
                        host::dtype_code(src[i].scalar_type())});
  }
  return out;
}

// launch(entries) for the entries (dst[i], src[i], vecs[i]) of each write wave of dst, in order
// (host::write_waves: entries that write the same memory are never in one launch).
template <typename Launch>
void launch_in_waves(at::TensorList dst, at::TensorList src, at::TensorList vecs,
                     const std::vector<SliceLayout>& layouts, const Launch& launch) {
  for (const auto& wave : host::write_waves(dst)) launch(entries_of(dst, src, vecs, layouts, wave));
}

void l2_grad_cuda(at::TensorList grads, at::TensorList params, at::TensorList keep_masks, at::IntArrayRef dims,
                  double coeff, const std::optional<at::Tensor>& coeff_tensor) {
  const auto args = host::validate_l2_grad(grads, params, keep_masks, dims, coeff_tensor);
  if (!args) return;
  const c10::cuda::CUDAGuard guard(args->device);
  launch_in_waves(grads, args->sources, keep_masks, args->layouts, [&](const std::vector<Entry>& entries) {
    run_update<Update::L2>(entries, host::coeff_of(coeff, coeff_tensor));
  });
}

void shrink_cuda(at::TensorList tensors, at::TensorList keep_masks, at::IntArrayRef dims, double factor,
                 const std::optional<at::Tensor>& factor_tensor) {
  const auto args = host::validate_shrink(tensors, keep_masks, dims, factor_tensor);
  if (!args) return;
  const c10::cuda::CUDAGuard guard(args->device);
  launch_in_waves(tensors, tensors, keep_masks, args->layouts, [&](const std::vector<Entry>& entries) {
    run_update<Update::Shrink>(entries, host::coeff_of(factor, factor_tensor));
  });
}

void slimming_grad_cuda(at::TensorList grads, at::TensorList bn_weights, double s,
                        const std::optional<at::Tensor>& s_tensor) {
  const auto args = host::validate_slimming_grad(grads, bn_weights, s_tensor);
  if (!args) return;
  const c10::cuda::CUDAGuard guard(args->device);
  launch_in_waves(grads, args->sources, {}, args->layouts, [&](const std::vector<Entry>& entries) {
    run_update<Update::Slimming>(entries, host::coeff_of(s, s_tensor));
  });
}

void group_lasso_grad_cuda(at::TensorList grads, at::TensorList params, at::TensorList keep_masks,
                           at::IntArrayRef dims, double lam, const std::optional<at::Tensor>& lam_tensor) {
  const auto args = host::validate_group_lasso_grad(grads, params, keep_masks, dims, lam_tensor);
  if (!args) return;
  const c10::cuda::CUDAGuard guard(args->device);
  ReduceArgs reduce_args;
  reduce_args.coeff = host::coeff_of(lam, lam_tensor);
  launch_in_waves(grads, args->sources, keep_masks, args->layouts, [&](const std::vector<Entry>& entries) {
    run_reduce<Reduce::SliceLasso>(entries, reduce_args);
  });
}

void group_lasso_grad_grouped_cuda(at::TensorList grads, at::TensorList params_in, at::IntArrayRef dims,
                                   at::TensorList group_ids, const at::Tensor& pruned_groups, double lam,
                                   const std::optional<at::Tensor>& lam_tensor) {
  const auto args =
      host::validate_group_lasso_grad_grouped(grads, params_in, dims, group_ids, pruned_groups, lam_tensor);
  if (!args) return;
  const auto& layouts = args->layouts;
  const std::vector<at::Tensor>& params = args->sources;  // laid out as the grads
  const c10::cuda::CUDAGuard guard(args->device);
  const at::Tensor pruned = pruned_groups.contiguous();
  const int64_t num_groups = pruned.size(0);
  const at::Tensor group_sumsq = at::zeros({num_groups}, params[0].options().dtype(at::kDouble));
  ReduceArgs reduce_args;
  reduce_args.total = group_sumsq.data_ptr<double>();
  reduce_args.pruned_groups = mask_bytes(pruned);
  reduce_args.num_groups = num_groups;
  run_group_sums<Reduce::GroupSumsq>(entries_of(params, params, group_ids, layouts, host::all_indices(params.size())),
                                     group_ids, reduce_args, group_sumsq, 1);
  const GroupArgs groups{group_sumsq.data_ptr<double>(), mask_bytes(pruned), num_groups};
  launch_in_waves(grads, params, group_ids, layouts, [&](const std::vector<Entry>& entries) {
    run_update<Update::GroupedLasso>(entries, host::coeff_of(lam, lam_tensor), groups);
  });
}

std::optional<host::FlatNorms> group_norms_cuda(at::TensorList tensors_in, int64_t p, int64_t dim) {
  const auto args = host::validate_group_norms(tensors_in, p, dim);
  if (!args) return std::nullopt;
  const auto& layouts = args->layouts;
  const auto& tensors = args->sources;
  const c10::cuda::CUDAGuard guard(args->device);
  host::FlatNorms out(tensors, layouts);
  auto entries = entries_of(tensors, tensors, {}, layouts, host::all_indices(tensors.size()));
  for (size_t i = 0; i < entries.size(); ++i) entries[i].dst = out.dst[i];
  ReduceArgs reduce_args;
  reduce_args.p = static_cast<int>(p);
  run_reduce<Reduce::Norms>(entries, reduce_args);
  return out;
}

at::Tensor group_saliency_cuda(at::TensorList tensors_in, at::IntArrayRef dims, at::TensorList group_ids,
                               int64_t num_groups) {
  const auto args = host::validate_grouped_reduction(host::kGroupSaliencyOp, tensors_in, dims, group_ids, num_groups);
  const auto& tensors = args.sources;
  const c10::cuda::CUDAGuard guard(args.device);
  const at::Tensor sums = at::zeros({2, num_groups}, tensors[0].options().dtype(at::kDouble));
  ReduceArgs reduce_args;
  reduce_args.total = sums.data_ptr<double>();
  reduce_args.count = reduce_args.total + num_groups;
  reduce_args.num_groups = num_groups;
  run_group_sums<Reduce::Saliency>(
      entries_of(tensors, tensors, group_ids, args.layouts, host::all_indices(tensors.size())), group_ids, reduce_args,
      sums, 2);
  const auto out_dtype = host::saliency_dtype(tensors);
  at::Tensor out = at::empty({num_groups}, tensors[0].options().dtype(out_dtype));
  if (num_groups > 0) {
    const unsigned blocks = static_cast<unsigned>((num_groups + kThreads - 1) / kThreads);
    AT_DISPATCH_FLOATING_TYPES(out_dtype, "group_saliency_finish", [&] {
      saliency_finish_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          reduce_args.total, reduce_args.count, out.data_ptr<scalar_t>(), num_groups);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("group_norms", &host::group_norms_per_tensor<&group_norms_cuda>);
  m.impl("group_norms_flat", &host::group_norms_flat<&group_norms_cuda>);
  m.impl("group_saliency", &group_saliency_cuda);
  m.impl("l2_grad_", &l2_grad_cuda);
  m.impl("shrink_", &shrink_cuda);
  m.impl("group_lasso_grad_", &group_lasso_grad_cuda);
  m.impl("group_lasso_grad_grouped_", &group_lasso_grad_grouped_cuda);
  m.impl("slimming_grad_", &slimming_grad_cuda);
}

}  // namespace fastreg

// ---------------------------------------------------------------------------------------------
// Per-group coefficients: group_sq_sums, l2_grad_grouped_, group_norm_gamma
// ---------------------------------------------------------------------------------------------
#include <math_constants.h>

namespace fastreg {
namespace {

// grad += coeff · group_coeffs[g] · w over the slices of group g (id -1 or a coefficient of 0: untouched).
__global__ void grouped_coeff_update_kernel(Table tab, Coeff coeff, const double* group_coeffs, int64_t num_groups) {
  const int t = tensor_of_block(tab, blockIdx.x);
  const SliceLayout L = layout_at(tab, t);
  const int64_t begin = block_begin(tab, t), end = block_end(begin, L);
  with_dtype(tab.dtype[t], [&](auto tag) {
    using T = decltype(tag);
    using A = mt::acc_t<T>;
    T* dst = static_cast<T*>(tab.dst[t]);
    const T* src = static_cast<const T*>(tab.src[t]);
    const double c = coeff.get<double>();
    for (int64_t e = begin + threadIdx.x; e < end; e += blockDim.x) {
      const int64_t g = static_cast<const int64_t*>(tab.vec[t])[L.slice_of(e)];
      CUDA_KERNEL_ASSERT(g >= -1 && g < num_groups && "group_ids out of [-1, num_groups)");
      if (g < 0 || g >= num_groups || group_coeffs[g] == 0.0) continue;
      mt::l2_grad_elem<T, A>(dst[e], src[e], static_cast<A>(c * group_coeffs[g]));
    }
  });
}

// One block per segment: max, min and NaN of √x over the segment, then γ of every element.
__global__ void group_norm_gamma_kernel(const double* x, int64_t n, const int64_t* offsets, double alpha, bool guard,
                                        double* gamma) {
  __shared__ double hi_s[kThreads], lo_s[kThreads];
  __shared__ int nan_s[kThreads];
  const int64_t begin = offsets[blockIdx.x], end = offsets[blockIdx.x + 1];
  CUDA_KERNEL_ASSERT(0 <= begin && begin <= end && end <= n && "segment_offsets must not decrease, within [0, n]");
  double hi = -CUDART_INF, lo = CUDART_INF;
  int nan = 0;
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const double imp = sqrt(x[j]);
    nan |= isnan(imp) ? 1 : 0;
    hi = fmax(hi, imp);
    lo = fmin(lo, imp);
  }
  hi_s[threadIdx.x] = hi;
  lo_s[threadIdx.x] = lo;
  nan_s[threadIdx.x] = nan;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      hi_s[threadIdx.x] = fmax(hi_s[threadIdx.x], hi_s[threadIdx.x + stride]);
      lo_s[threadIdx.x] = fmin(lo_s[threadIdx.x], lo_s[threadIdx.x + stride]);
      nan_s[threadIdx.x] |= nan_s[threadIdx.x + stride];
    }
    __syncthreads();
  }
  hi = hi_s[0];
  lo = lo_s[0];
  nan = nan_s[0];
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    if (nan) gamma[j] = 0.0;
    else if (hi == lo) gamma[j] = guard ? 1.0 : CUDART_NAN;
    else gamma[j] = pow(alpha, (hi - sqrt(x[j])) / (hi - lo));
  }
}

at::Tensor group_sq_sums_cuda(at::TensorList tensors_in, at::IntArrayRef dims, at::TensorList group_ids,
                              int64_t num_groups) {
  const auto args = host::validate_grouped_reduction(host::kGroupSqSumsOp, tensors_in, dims, group_ids, num_groups);
  const auto& tensors = args.sources;
  const c10::cuda::CUDAGuard guard(args.device);
  const at::Tensor total = at::zeros({num_groups}, tensors[0].options().dtype(at::kDouble));
  const at::Tensor every_group = at::ones({num_groups}, tensors[0].options().dtype(at::kBool));
  ReduceArgs reduce_args;
  reduce_args.total = total.data_ptr<double>();
  reduce_args.pruned_groups = mask_bytes(every_group);
  reduce_args.num_groups = num_groups;
  run_reduce<Reduce::GroupSumsq>(entries_of(tensors, tensors, group_ids, args.layouts, host::all_indices(tensors.size())),
                                 reduce_args);
  return total.to(host::saliency_dtype(tensors));
}

void l2_grad_grouped_cuda(at::TensorList grads, at::TensorList params_in, at::IntArrayRef dims,
                          at::TensorList group_ids, const at::Tensor& group_coeffs, double coeff,
                          const std::optional<at::Tensor>& coeff_tensor) {
  const auto args = host::validate_l2_grad_grouped(grads, params_in, dims, group_ids, group_coeffs, coeff_tensor);
  if (!args) return;
  const c10::cuda::CUDAGuard guard(args->device);
  const at::Tensor coeffs = group_coeffs.to(at::kDouble).contiguous();
  const int64_t num_groups = coeffs.size(0);
  const Coeff c = host::coeff_of(coeff, coeff_tensor);
  launch_in_waves(grads, args->sources, group_ids, args->layouts, [&](const std::vector<Entry>& entries) {
    launch_batched(entries, kElemsPerBlock, false, [&](const Table& tab, unsigned blocks) {
      grouped_coeff_update_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          tab, c, coeffs.data_ptr<double>(), num_groups);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor group_norm_gamma_cuda(const at::Tensor& importance, const at::Tensor& segment_offsets, double alpha,
                                 bool guard) {
  host::validate_group_norm_gamma(importance, segment_offsets);
  const c10::cuda::CUDAGuard device_guard(importance.device());
  const at::Tensor x = importance.to(at::kDouble).contiguous();
  const at::Tensor offsets = segment_offsets.contiguous();
  at::Tensor gamma = at::empty_like(x);
  const int64_t segments = offsets.numel() - 1;  // (the offsets' range is not read on the host: no sync)
  if (segments > 0) {
    group_norm_gamma_kernel<<<static_cast<unsigned>(segments), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<double>(), x.numel(), offsets.data_ptr<int64_t>(), alpha, guard, gamma.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return gamma.to(importance.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("group_sq_sums", &group_sq_sums_cuda);
  m.impl("l2_grad_grouped_", &l2_grad_grouped_cuda);
  m.impl("group_norm_gamma", &group_norm_gamma_cuda);
}

}  // namespace fastreg
