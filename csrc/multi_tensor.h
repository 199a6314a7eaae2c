// Per-element arithmetic of the fused per-step ops (DESIGN.md §1.2–1.4), shared by the CPU kernels
// (multi_tensor.cpp) and the CUDA kernels (multi_tensor_cuda.cu): the CPU tests exercise exactly the
// arithmetic the GPU runs.
//
// Every op sees a tensor as a 3-D block [outer, slices, inner] around the slicing dim d: element
// (o, s, i) sits at memory offset (o * slices + s) * inner + i from the tensor's data pointer. For a
// contiguous tensor outer = prod(shape[:d]), slices = shape[d], inner = prod(shape[d+1:]): dim 0
// slices are rows (outer = 1), dim 1 slices of a conv weight N×C×k×k are input channels (outer = N,
// inner = k·k). Any dense tensor (its elements fill one block of memory once, in some dim order:
// channels_last, a transposed matrix, ...) is such a block too, with inner = stride[d]: the dims of
// smaller stride make up the inner block, those of larger stride the outer one. Within a slice the
// elements come in memory order, which no op depends on: an update pairs a gradient with its
// parameter element by element in one memory layout, and a reduction sums the slice.
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/core/InferenceMode.h>

#include "outputs.h"

#include <algorithm>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

#if defined(__CUDACC__)
#define FASTREG_HD __host__ __device__ __forceinline__
#else
#define FASTREG_HD inline
#endif

namespace fastreg::mt {

// Accumulation type: float for fp16/bf16/fp32, double for fp64.
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// Dtype codes stored in the CUDA tensor tables (one launch covers tensors of mixed dtypes).
enum DtypeCode : int8_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct SliceLayout {
  int64_t outer, slices, inner;

  FASTREG_HD int64_t numel() const { return outer * slices * inner; }
  // Elements per slice: |w| in the saliency formula.
  FASTREG_HD int64_t slice_numel() const { return outer * inner; }
  // Slice index of flat element e.
  FASTREG_HD int64_t slice_of(int64_t e) const { return (e / inner) % slices; }
  // Flat offset of the j-th element (j < outer·inner) of slice s.
  FASTREG_HD int64_t offset(int64_t s, int64_t j) const {
    const int64_t o = j / inner;
    return (o * slices + s) * inner + (j - o * inner);
  }
  // The same in 32-bit arithmetic, for tensors of fewer than 2^32 elements (fits32()): a GPU's
  // 64-bit division is a software routine several times slower than its 32-bit one.
  FASTREG_HD bool fits32() const { return numel() <= static_cast<int64_t>(UINT32_MAX); }
  FASTREG_HD uint32_t slice_of32(uint32_t e) const {
    return (e / static_cast<uint32_t>(inner)) % static_cast<uint32_t>(slices);
  }
  FASTREG_HD uint32_t offset32(uint32_t s, uint32_t j) const {
    const uint32_t in = static_cast<uint32_t>(inner), o = j / in;
    return (o * static_cast<uint32_t>(slices) + s) * in + (j - o * in);
  }
};

// The effective coefficient: c · c_tensor when a 0-d device tensor (float32 or float64) is given,
// so that a schedule kept on the device never forces a host sync.
template <typename A>
FASTREG_HD A effective_coeff(double c, const void* c_tensor, bool c_tensor_is_double) {
  if (c_tensor == nullptr) return static_cast<A>(c);
  const double t = c_tensor_is_double ? *static_cast<const double*>(c_tensor)
                                      : static_cast<double>(*static_cast<const float*>(c_tensor));
  return static_cast<A>(c * t);
}

// GReg / TPP Eq. 5 on a pruned element: g += c · w.
template <typename T, typename A>
FASTREG_HD void l2_grad_elem(T& g, T w, A c) {
  g = static_cast<T>(static_cast<A>(g) + c * static_cast<A>(w));
}

// OCSPruner Eq. 9 on a pruned element: t *= f.
template <typename T, typename A>
FASTREG_HD void shrink_elem(T& t, A f) {
  t = static_cast<T>(static_cast<A>(t) * f);
}

// Network slimming: g += s · sign(γ).
template <typename T, typename A>
FASTREG_HD void slimming_elem(T& g, T w, A s) {
  const A x = static_cast<A>(w);
  const A sign = static_cast<A>((x > A(0)) - (x < A(0)));
  g = static_cast<T>(static_cast<A>(g) + s * sign);
}

// Reduction terms: |x| for the L1 norm, x² for the L2 norm (and group norms).
template <typename T, typename A>
FASTREG_HD A abs_term(T x) {
  const A v = static_cast<A>(x);
  return v < A(0) ? -v : v;
}
template <typename T, typename A>
FASTREG_HD A square_term(T x) {
  const A v = static_cast<A>(x);
  return v * v;
}
template <typename T, typename A>
FASTREG_HD A norm_term(T x, int p) {
  return p == 1 ? abs_term<T, A>(x) : square_term<T, A>(x);
}
// ‖·‖_p from the accumulated terms.
template <typename A>
FASTREG_HD A finish_norm(A acc, int p) {
  return p == 1 ? acc : static_cast<A>(std::sqrt(acc));
}

// Group lasso (OCSPruner Eq. 8): grad[g] += λ · w_g / ‖w_g‖₂, written as grad += scale · w with
// scale = λ / ‖w_g‖₂, and exactly 0 where ‖w_g‖₂ = 0 (the gradient of ‖·‖₂ is undefined there).
template <typename A>
FASTREG_HD A lasso_scale(A sumsq, A lam) {
  return sumsq > A(0) ? lam / static_cast<A>(std::sqrt(sumsq)) : A(0);
}

// Saliency term of one slice: ‖w‖₂ / √|w|, and 0 for a slice of no elements (|w| = 0, e.g. the
// columns of a [N, 0] weight), which still counts as one of its group's slices.
template <typename A>
FASTREG_HD A saliency_term(A sumsq, int64_t slice_numel) {
  return slice_numel > 0 ? static_cast<A>(std::sqrt(sumsq)) / static_cast<A>(std::sqrt(static_cast<double>(slice_numel)))
                         : A(0);
}

// Mean saliency of a group: Σ terms / number of slices, 0 for a group with no slice.
template <typename A>
FASTREG_HD A group_mean(A total, A count) {
  return count > A(0) ? total / count : A(0);
}

// A coefficient as the kernels read it: c, times *c_tensor when a 0-d tensor is given.
struct Coeff {
  double c = 0.0;
  const void* c_tensor = nullptr;
  bool c_tensor_is_double = false;
  template <typename A>
  FASTREG_HD A get() const { return effective_coeff<A>(c, c_tensor, c_tensor_is_double); }
};

// ---------------------------------------------------------------------------------------------
// Host side: argument checks (errors name the argument), layouts, and write-aliasing waves.
// ---------------------------------------------------------------------------------------------
namespace host {

// Whether the kernels address t in place: dense, in any dim order (see the top of this file).
inline bool is_dense(const at::Tensor& t) { return t.is_contiguous() || t.is_non_overlapping_and_dense(); }

// t's [outer, slices, inner] block around dim: from its strides when t is dense but not contiguous,
// else from its shape (that of t itself, or of the contiguous copy the kernels read: dense_all).
inline SliceLayout layout_of(const at::Tensor& t, int64_t dim) {
  if (!t.is_contiguous() && t.is_non_overlapping_and_dense()) {
    const int64_t numel = t.numel(), slices = t.size(dim);
    const int64_t inner = slices > 1 ? t.stride(dim) : numel;
    return SliceLayout{numel / (slices * inner), slices, inner};
  }
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= t.size(d);
  for (int64_t d = dim + 1; d < t.dim(); ++d) inner *= t.size(d);
  return SliceLayout{outer, t.size(dim), inner};
}

inline at::Device device_of(at::TensorList ts) {
  TORCH_CHECK_VALUE(!ts.empty(), "fastreg: empty tensor list");
  return ts[0].device();
}

inline std::vector<int64_t> all_indices(size_t n) {
  std::vector<int64_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<int64_t>(i);
  return v;
}

// The tensors the kernels read: each dense one as it is, a contiguous copy of any other.
inline std::vector<at::Tensor> dense_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(is_dense(t) ? t : t.contiguous());
  return out;
}

// Whether a and b (one shape) put every element at the same memory offset.
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

// srcs[i] laid out in memory as dsts[i] (dense, of its shape and dtype): as it is when it already is,
// else a copy with dsts[i]'s strides. An update that reads srcs[i] into dsts[i] then pairs them
// element by element in one layout (e.g. a channels_last parameter whose .grad is contiguous).
inline std::vector<at::Tensor> laid_out_like(at::TensorList dsts, at::TensorList srcs) {
  std::vector<at::Tensor> out;
  out.reserve(srcs.size());
  for (size_t i = 0; i < srcs.size(); ++i)
    out.push_back(same_layout(srcs[i], dsts[i]) ? srcs[i] : at::empty_like(dsts[i]).copy_(srcs[i]));
  return out;
}

inline bool is_float_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

inline int8_t dtype_code(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: TORCH_CHECK_TYPE(false, "fastreg: unsupported dtype ", s);
  }
}

// A list of floating tensors on one device. Written in place: dense, and not an inference tensor
// outside inference mode (PyTorch's own in-place ops refuse that too; checked here, before any write,
// rather than by the version bump after it).
inline void check_tensors(const char* op, const char* name, at::TensorList ts, const at::Device& device,
                          bool written) {
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto& t = ts[i];
    TORCH_CHECK_VALUE(t.defined(), op, ": ", name, "[", i, "] is undefined (missing .grad?)");
    TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), op, ": ", name, "[", i,
                "] must be fp16/bf16/fp32/fp64, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(), " but ", name,
                "[0] is on ", device);
    if (!written) continue;
    TORCH_CHECK_VALUE(is_dense(t), op, ": ", name, "[", i,
                "] is updated in place, so it must be dense in memory (contiguous, channels_last or any other "
                "dim order), got shape ", t.sizes(), " with strides ", t.strides());
    TORCH_CHECK_VALUE(!t.is_inference() || c10::InferenceMode::is_enabled(), op, ": ", name, "[", i,
                "] is an inference tensor (made under torch.inference_mode()): it can be updated in place only "
                "inside inference_mode (or clone it to get a normal tensor)");
  }
}

inline void check_count(const char* op, const char* name, size_t n, const char* ref_name, size_t ref_n) {
  TORCH_CHECK_VALUE(n == ref_n, op, ": ", name, " has ", n, " entries but ", ref_name, " has ", ref_n);
}

// b[i] has the shape, dtype and device of a[i] (a gradient and its parameter).
inline void check_pairs(const char* op, const char* a_name, at::TensorList a, const char* b_name, at::TensorList b) {
  check_count(op, a_name, a.size(), b_name, b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK_VALUE(a[i].sizes() == b[i].sizes(), op, ": ", a_name, "[", i, "] has shape ", a[i].sizes(), " but ",
                b_name, "[", i, "] has shape ", b[i].sizes());
    TORCH_CHECK_TYPE(a[i].scalar_type() == b[i].scalar_type(), op, ": ", a_name, "[", i, "] is ", a[i].scalar_type(),
                " but ", b_name, "[", i, "] is ", b[i].scalar_type());
  }
}

// dims[i] is a dim of ts[i]; returns the layout of each of `layout_ts` (ts unless given: tensors of
// the same shapes) around it.
inline std::vector<SliceLayout> check_dims(const char* op, at::IntArrayRef dims, at::TensorList ts, const char* name,
                                           at::TensorList layout_ts = {}) {
  check_count(op, "dims", dims.size(), name, ts.size());
  if (layout_ts.empty()) layout_ts = ts;
  std::vector<SliceLayout> layouts;
  layouts.reserve(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK_VALUE(dims[i] >= 0 && dims[i] < ts[i].dim(), op, ": dims[", i, "] = ", dims[i], " is not a dim of ",
                name, "[", i, "] (shape ", ts[i].sizes(), ")");
    layouts.push_back(layout_of(layout_ts[i], dims[i]));
  }
  return layouts;
}

// masks[i]: contiguous 1-D tensor of `dtype` with layouts[i].slices entries, on `device`.
inline void check_slice_vectors(const char* op, const char* name, at::TensorList masks,
                                const std::vector<SliceLayout>& layouts, at::ScalarType dtype,
                                const at::Device& device) {
  check_count(op, name, masks.size(), "the tensor list", layouts.size());
  for (size_t i = 0; i < masks.size(); ++i) {
    const auto& m = masks[i];
    TORCH_CHECK_TYPE(m.scalar_type() == dtype, op, ": ", name, "[", i, "] must be ", dtype, ", got ", m.scalar_type());
    TORCH_CHECK_VALUE(m.dim() == 1 && m.size(0) == layouts[i].slices, op, ": ", name, "[", i, "] must have shape [",
                layouts[i].slices, "], got ", m.sizes());
    TORCH_CHECK_VALUE(m.device() == device, op, ": ", name, "[", i, "] is on ", m.device(), ", expected ", device);
    TORCH_CHECK_VALUE(m.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
  }
}

// The optional 0-d coefficient tensor: float32/float64, one element, on `device`.
inline void check_coeff(const char* op, const char* name, const std::optional<at::Tensor>& c, const at::Device& device) {
  if (!c.has_value()) return;
  TORCH_CHECK_VALUE(c->numel() == 1, op, ": ", name, " must hold one element, got shape ", c->sizes());
  TORCH_CHECK_TYPE(c->scalar_type() == at::kFloat || c->scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", c->scalar_type());
  TORCH_CHECK_VALUE(c->device() == device, op, ": ", name, " is on ", c->device(), " but the tensors are on ", device);
}

inline Coeff coeff_of(double c, const std::optional<at::Tensor>& c_tensor) {
  if (!c_tensor.has_value()) return Coeff{c, nullptr, false};
  return Coeff{c, c_tensor->data_ptr(), c_tensor->scalar_type() == at::kDouble};
}

// Entries of `written` that update the same memory must not run concurrently: entry i goes into
// wave k when k earlier entries write the same data pointer (e.g. a conv weight listed once along
// dim 0, as its own filters, and once along dim 1, as the next group's input channels). Waves run
// one after another, which reproduces the sequential order of the reference.
inline std::vector<std::vector<int64_t>> write_waves(at::TensorList written) {
  {  // the usual call writes each tensor once: one wave, found without a hash map (an allocation per entry)
    std::vector<const void*> ptrs(written.size());
    for (size_t i = 0; i < written.size(); ++i) ptrs[i] = written[i].data_ptr();
    std::sort(ptrs.begin(), ptrs.end());
    if (std::adjacent_find(ptrs.begin(), ptrs.end()) == ptrs.end()) return {all_indices(written.size())};
  }
  std::vector<std::vector<int64_t>> waves(1);
  std::unordered_map<const void*, int64_t> times_seen;
  times_seen.reserve(written.size());
  for (size_t i = 0; i < written.size(); ++i) {
    const int64_t k = times_seen[written[i].data_ptr()]++;
    if (static_cast<int64_t>(waves.size()) <= k) waves.resize(k + 1);
    waves[k].push_back(static_cast<int64_t>(i));
  }
  return waves;
}

// ---------------------------------------------------------------------------------------------
// Argument validation of each op, shared by its CPU and CUDA entry points. A validator returns the
// device of the tensors and their slice layouts; std::nullopt for an empty list (nothing to do).
// ---------------------------------------------------------------------------------------------

// Op names as the errors print them.
inline constexpr const char* kL2GradOp = "fastreg::l2_grad_";
inline constexpr const char* kShrinkOp = "fastreg::shrink_";
inline constexpr const char* kSlimmingGradOp = "fastreg::slimming_grad_";
inline constexpr const char* kGroupNormsOp = "fastreg::group_norms";
inline constexpr const char* kGroupSaliencyOp = "fastreg::group_saliency";
inline constexpr const char* kGroupLassoGradOp = "fastreg::group_lasso_grad_";
inline constexpr const char* kGroupLassoGradGroupedOp = "fastreg::group_lasso_grad_grouped_";

struct CheckedArgs {
  at::Device device;
  std::vector<SliceLayout> layouts;
  // What the kernels read: an update's parameters, each laid out as the gradient it writes
  // (laid_out_like; shrink_ reads what it writes), a reduction's tensors made dense (dense_all).
  std::vector<at::Tensor> sources;
};

// grads[i] (written: dense) pairs params[i] (read, sliced along dims[i], any layout); params must not
// be empty. The layouts are the grads'; the sources, the params laid out as their grads.
inline CheckedArgs check_grads_of_params(const char* op, at::TensorList grads, at::TensorList params,
                                         at::IntArrayRef dims) {
  const at::Device device = device_of(params);
  check_pairs(op, "grads", grads, "params", params);
  check_tensors(op, "grads", grads, device, true);
  check_tensors(op, "params", params, device, false);
  return CheckedArgs{device, check_dims(op, dims, params, "params", grads), laid_out_like(grads, params)};
}

// l2_grad_ and group_lasso_grad_: grads, params, bool keep_masks per slice, coefficient tensor.
inline std::optional<CheckedArgs> validate_masked_grad(const char* op, at::TensorList grads, at::TensorList params,
                                                       at::TensorList keep_masks, at::IntArrayRef dims,
                                                       const char* coeff_name,
                                                       const std::optional<at::Tensor>& coeff_tensor) {
  if (params.empty()) return std::nullopt;
  CheckedArgs args = check_grads_of_params(op, grads, params, dims);
  check_slice_vectors(op, "keep_masks", keep_masks, args.layouts, at::kBool, args.device);
  check_coeff(op, coeff_name, coeff_tensor, args.device);
  return args;
}

inline std::optional<CheckedArgs> validate_l2_grad(at::TensorList grads, at::TensorList params,
                                                   at::TensorList keep_masks, at::IntArrayRef dims,
                                                   const std::optional<at::Tensor>& coeff_tensor) {
  return validate_masked_grad(kL2GradOp, grads, params, keep_masks, dims, "coeff_tensor", coeff_tensor);
}

inline std::optional<CheckedArgs> validate_group_lasso_grad(at::TensorList grads, at::TensorList params,
                                                            at::TensorList keep_masks, at::IntArrayRef dims,
                                                            const std::optional<at::Tensor>& lam_tensor) {
  return validate_masked_grad(kGroupLassoGradOp, grads, params, keep_masks, dims, "lam_tensor", lam_tensor);
}

inline std::optional<CheckedArgs> validate_group_lasso_grad_grouped(at::TensorList grads, at::TensorList params,
                                                                    at::IntArrayRef dims, at::TensorList group_ids,
                                                                    const at::Tensor& pruned_groups,
                                                                    const std::optional<at::Tensor>& lam_tensor) {
  constexpr const char* op = kGroupLassoGradGroupedOp;
  if (params.empty()) return std::nullopt;
  CheckedArgs args = check_grads_of_params(op, grads, params, dims);
  check_slice_vectors(op, "group_ids", group_ids, args.layouts, at::kLong, args.device);
  TORCH_CHECK_VALUE(pruned_groups.scalar_type() == at::kBool && pruned_groups.dim() == 1, op,
              ": pruned_groups must be a 1-D bool tensor, got ", pruned_groups.scalar_type(), " of shape ",
              pruned_groups.sizes());
  TORCH_CHECK_VALUE(pruned_groups.device() == args.device, op, ": pruned_groups is on ", pruned_groups.device(),
              " but params are on ", args.device);
  check_coeff(op, "lam_tensor", lam_tensor, args.device);
  return args;
}

inline std::optional<CheckedArgs> validate_shrink(at::TensorList tensors, at::TensorList keep_masks,
                                                  at::IntArrayRef dims,
                                                  const std::optional<at::Tensor>& factor_tensor) {
  constexpr const char* op = kShrinkOp;
  if (tensors.empty()) return std::nullopt;
  const at::Device device = device_of(tensors);
  check_tensors(op, "tensors", tensors, device, true);
  CheckedArgs args{device, check_dims(op, dims, tensors, "tensors"), tensors.vec()};
  check_slice_vectors(op, "keep_masks", keep_masks, args.layouts, at::kBool, device);
  check_coeff(op, "factor_tensor", factor_tensor, device);
  return args;
}

// Every element of a BN weight is a slice of its own: layout {1, numel, 1}.
inline std::optional<CheckedArgs> validate_slimming_grad(at::TensorList grads, at::TensorList bn_weights,
                                                         const std::optional<at::Tensor>& s_tensor) {
  constexpr const char* op = kSlimmingGradOp;
  if (bn_weights.empty()) return std::nullopt;
  CheckedArgs args{device_of(bn_weights), {}, {}};
  check_pairs(op, "grads", grads, "bn_weights", bn_weights);
  check_tensors(op, "grads", grads, args.device, true);
  check_tensors(op, "bn_weights", bn_weights, args.device, false);
  for (size_t i = 0; i < bn_weights.size(); ++i)
    TORCH_CHECK_VALUE(bn_weights[i].dim() >= 1, op, ": bn_weights[", i, "] must have at least 1 dims, got shape ",
                bn_weights[i].sizes());
  check_coeff(op, "s_tensor", s_tensor, args.device);
  // Element-wise, so any dense layout is one slice per element in memory order.
  args.layouts.reserve(grads.size());
  for (const auto& g : grads) args.layouts.push_back(SliceLayout{1, g.numel(), 1});
  args.sources = laid_out_like(grads, bn_weights);
  return args;
}

// tensors may have any layout (the kernels read the dense ones in place, copies of the others).
inline std::optional<CheckedArgs> validate_group_norms(at::TensorList tensors, int64_t p, int64_t dim) {
  constexpr const char* op = kGroupNormsOp;
  TORCH_CHECK_VALUE(p == 1 || p == 2, op, ": p must be 1 or 2, got ", p);
  if (tensors.empty()) return std::nullopt;
  const at::Device device = device_of(tensors);
  check_tensors(op, "tensors", tensors, device, false);
  const std::vector<int64_t> dims(tensors.size(), dim);
  return CheckedArgs{device, check_dims(op, dims, tensors, "tensors"), dense_all(tensors)};
}

// Ops reducing slices into groups (group_saliency, group_sq_sums): tensors must not be empty; any layout
// (as for group_norms); group_ids[i] int64 over the slices of tensors[i] along dims[i].
inline CheckedArgs validate_grouped_reduction(const char* op, at::TensorList tensors, at::IntArrayRef dims,
                                              at::TensorList group_ids, int64_t num_groups) {
  TORCH_CHECK_VALUE(num_groups >= 0, op, ": num_groups must be >= 0, got ", num_groups);
  TORCH_CHECK_VALUE(!tensors.empty(), op, ": tensors must not be empty");
  const at::Device device = device_of(tensors);
  check_tensors(op, "tensors", tensors, device, false);
  CheckedArgs args{device, check_dims(op, dims, tensors, "tensors"), dense_all(tensors)};
  check_slice_vectors(op, "group_ids", group_ids, args.layouts, at::kLong, device);
  return args;
}

// group_norms' output: the norms of every tensor's slices, in two forms — concatenated in list
// order in the tensors' promoted dtype (finish(), group_norms_flat), or one tensor per input in its
// own dtype (per_tensor(), group_norms). dst[i] is where the kernels write tensor i's norms in tensor
// i's own dtype: its segment of `flat`, or — a tensor of another dtype than `flat` — a tensor of its
// own, which finish() copies into its segment.
struct FlatNorms {
  at::Tensor flat;
  std::vector<void*> dst;
  std::vector<int64_t> offset, count;  // tensor i's segment of flat
  std::vector<at::Tensor> own;         // tensor i's norms when its dtype is not flat's, else undefined

  FlatNorms(at::TensorList tensors, const std::vector<SliceLayout>& layouts)
      : dst(tensors.size()), offset(tensors.size()), count(tensors.size()), own(tensors.size()) {
    at::ScalarType dtype = tensors[0].scalar_type();
    int64_t total = 0;
    for (size_t i = 0; i < tensors.size(); ++i) {
      dtype = at::promoteTypes(dtype, tensors[i].scalar_type());
      offset[i] = total;
      count[i] = layouts[i].slices;
      total += count[i];
    }
    flat = at::empty({total}, tensors[0].options().dtype(dtype));
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].scalar_type() == dtype) {
        dst[i] = static_cast<char*>(flat.data_ptr()) + offset[i] * flat.element_size();
      } else {
        own[i] = at::empty({count[i]}, tensors[i].options());
        dst[i] = own[i].data_ptr();
      }
    }
  }
  at::Tensor finish() {
    for (size_t i = 0; i < own.size(); ++i)
      if (own[i].defined()) flat.narrow(0, offset[i], count[i]).copy_(own[i]);
    return flat;
  }
  // Tensor i's norms as a tensor of its own (see outputs.h): its segment of flat, or its own tensor.
  std::vector<at::Tensor> per_tensor() const {
    std::vector<at::Tensor> out(own.size());
    for (size_t i = 0; i < own.size(); ++i) out[i] = own[i].defined() ? own[i] : carve(flat, offset[i], {count[i]});
    return out;
  }
};

// The two entry points of group_norms over a backend's compute(tensors, p, dim) ->
// std::optional<FlatNorms> (std::nullopt: no tensors).
template <auto Compute>
std::vector<at::Tensor> group_norms_per_tensor(at::TensorList tensors, int64_t p, int64_t dim) {
  auto out = Compute(tensors, p, dim);
  return out ? out->per_tensor() : std::vector<at::Tensor>{};
}
template <auto Compute>
at::Tensor group_norms_flat(at::TensorList tensors, int64_t p, int64_t dim) {
  auto out = Compute(tensors, p, dim);
  return out ? out->finish() : at::empty({0}, tensors.empty() ? at::TensorOptions() : tensors[0].options());
}

// group_saliency's output dtype: float64 when the first tensor is, float32 otherwise.
inline at::ScalarType saliency_dtype(at::TensorList tensors) {
  return tensors[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace host

}  // namespace fastreg::mt

// ---------------------------------------------------------------------------------------------
// Per-group coefficients (Torch-Pruning's regularizing pruners): group_sq_sums, l2_grad_grouped_,
// group_norm_gamma. Slice j of tensor i along dims[i] belongs to group group_ids[i][j] (-1: none).
// ---------------------------------------------------------------------------------------------
namespace fastreg::mt {
namespace host {

inline constexpr const char* kGroupSqSumsOp = "fastreg::group_sq_sums";
inline constexpr const char* kL2GradGroupedOp = "fastreg::l2_grad_grouped_";
inline constexpr const char* kGroupNormGammaOp = "fastreg::group_norm_gamma";

// A 1-D float32/float64 vector on `device` (contiguous copies are taken by the kernels).
inline void check_float_vector(const char* op, const char* name, const at::Tensor& v, const at::Device& device) {
  TORCH_CHECK(v.dim() == 1, op, ": ", name, " must be 1-D, got shape ", v.sizes());
  TORCH_CHECK(v.scalar_type() == at::kFloat || v.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", v.scalar_type());
  TORCH_CHECK(v.device() == device, op, ": ", name, " is on ", v.device(), " but the tensors are on ", device);
}

inline std::optional<CheckedArgs> validate_l2_grad_grouped(at::TensorList grads, at::TensorList params,
                                                           at::IntArrayRef dims, at::TensorList group_ids,
                                                           const at::Tensor& group_coeffs,
                                                           const std::optional<at::Tensor>& coeff_tensor) {
  constexpr const char* op = kL2GradGroupedOp;
  if (params.empty()) return std::nullopt;
  CheckedArgs args = check_grads_of_params(op, grads, params, dims);
  check_slice_vectors(op, "group_ids", group_ids, args.layouts, at::kLong, args.device);
  check_float_vector(op, "group_coeffs", group_coeffs, args.device);
  check_coeff(op, "coeff_tensor", coeff_tensor, args.device);
  return args;
}

// importance: float vector; segment_offsets: int64 [S + 1], 0 = o_0 <= o_1 <= ... <= o_S = importance.numel().
inline void validate_group_norm_gamma(const at::Tensor& importance, const at::Tensor& segment_offsets) {
  constexpr const char* op = kGroupNormGammaOp;
  check_float_vector(op, "importance", importance, importance.device());
  TORCH_CHECK(segment_offsets.scalar_type() == at::kLong && segment_offsets.dim() == 1 && segment_offsets.numel() >= 1,
              op, ": segment_offsets must be a non-empty 1-D int64 tensor, got ", segment_offsets.scalar_type(),
              " of shape ", segment_offsets.sizes());
  TORCH_CHECK(segment_offsets.device() == importance.device(), op, ": segment_offsets is on ",
              segment_offsets.device(), " but importance is on ", importance.device());
}

}  // namespace host
}  // namespace fastreg::mt

#include <limits>

namespace fastreg::mt {
// DepGraph's per-channel weights over one segment (one Torch-Pruning group) of n importances x
// (before the square root): imp = √x, γ = α^((max imp − imp) / (max imp − min imp)). A segment holding a NaN
// gets γ = 0 (no update); one whose importances are all equal gets γ = 1 (guard) or NaN (0/0, as
// Torch-Pruning computes it).
inline void group_norm_gamma_segment(const double* x, int64_t n, double alpha, bool guard, double* gamma) {
  double hi = -std::numeric_limits<double>::infinity(), lo = std::numeric_limits<double>::infinity();
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) {
    const double imp = std::sqrt(x[j]);
    nan = nan || std::isnan(imp);
    hi = std::max(hi, imp);
    lo = std::min(lo, imp);
  }
  for (int64_t j = 0; j < n; ++j) {
    if (nan) {
      gamma[j] = 0.0;
    } else if (hi == lo) {
      gamma[j] = guard ? 1.0 : std::numeric_limits<double>::quiet_NaN();
    } else {
      gamma[j] = std::pow(alpha, (hi - std::sqrt(x[j])) / (hi - lo));
    }
  }
}
}  // namespace fastreg::mt
