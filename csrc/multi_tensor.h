// Per-element arithmetic of the fused per-step ops (DESIGN.md §1.2–1.4), shared by the CPU kernels
// (multi_tensor.cpp) and the CUDA kernels (multi_tensor_cuda.cu): the CPU tests exercise exactly the
// arithmetic the GPU runs.
//
// Every op sees a tensor as a 3-D block [outer, slices, inner] around the slicing dim d:
// outer = prod(shape[:d]), slices = shape[d], inner = prod(shape[d+1:]); element (o, s, i) sits at
// flat offset (o * slices + s) * inner + i of the contiguous tensor. dim 0 slices are rows
// (outer = 1), dim 1 slices of a conv weight N×C×k×k are input channels (outer = N, inner = k·k).
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

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

// Saliency term of one slice: ‖w‖₂ / √|w|.
template <typename A>
FASTREG_HD A saliency_term(A sumsq, int64_t slice_numel) {
  return static_cast<A>(std::sqrt(sumsq)) / static_cast<A>(std::sqrt(static_cast<double>(slice_numel)));
}

// ---------------------------------------------------------------------------------------------
// Host side: argument checks (errors name the argument), layouts, and write-aliasing waves.
// ---------------------------------------------------------------------------------------------
namespace host {

inline SliceLayout layout_of(const at::Tensor& t, int64_t dim) {
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= t.size(d);
  for (int64_t d = dim + 1; d < t.dim(); ++d) inner *= t.size(d);
  return SliceLayout{outer, t.size(dim), inner};
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
    default: TORCH_CHECK(false, "fastreg: unsupported dtype ", s);
  }
}

// A list of floating tensors on one device; contiguous when written in place.
inline void check_tensors(const char* op, const char* name, at::TensorList ts, const at::Device& device,
                          bool need_contiguous) {
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto& t = ts[i];
    TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined (missing .grad?)");
    TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name, "[", i,
                "] must be fp16/bf16/fp32/fp64, got ", t.scalar_type());
    TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(), " but ", name,
                "[0] is on ", device);
    TORCH_CHECK(!need_contiguous || t.is_contiguous(), op, ": ", name, "[", i,
                "] must be contiguous (it is updated in place)");
  }
}

inline void check_count(const char* op, const char* name, size_t n, const char* ref_name, size_t ref_n) {
  TORCH_CHECK(n == ref_n, op, ": ", name, " has ", n, " entries but ", ref_name, " has ", ref_n);
}

// b[i] has the shape, dtype and device of a[i] (a gradient and its parameter).
inline void check_pairs(const char* op, const char* a_name, at::TensorList a, const char* b_name, at::TensorList b) {
  check_count(op, a_name, a.size(), b_name, b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].sizes() == b[i].sizes(), op, ": ", a_name, "[", i, "] has shape ", a[i].sizes(), " but ",
                b_name, "[", i, "] has shape ", b[i].sizes());
    TORCH_CHECK(a[i].scalar_type() == b[i].scalar_type(), op, ": ", a_name, "[", i, "] is ", a[i].scalar_type(),
                " but ", b_name, "[", i, "] is ", b[i].scalar_type());
  }
}

inline std::vector<SliceLayout> check_dims(const char* op, at::IntArrayRef dims, at::TensorList ts, const char* name) {
  check_count(op, "dims", dims.size(), name, ts.size());
  std::vector<SliceLayout> layouts;
  layouts.reserve(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(dims[i] >= 0 && dims[i] < ts[i].dim(), op, ": dims[", i, "] = ", dims[i], " is not a dim of ",
                name, "[", i, "] (shape ", ts[i].sizes(), ")");
    layouts.push_back(layout_of(ts[i], dims[i]));
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
    TORCH_CHECK(m.scalar_type() == dtype, op, ": ", name, "[", i, "] must be ", dtype, ", got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 1 && m.size(0) == layouts[i].slices, op, ": ", name, "[", i, "] must have shape [",
                layouts[i].slices, "], got ", m.sizes());
    TORCH_CHECK(m.device() == device, op, ": ", name, "[", i, "] is on ", m.device(), ", expected ", device);
    TORCH_CHECK(m.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
  }
}

// The optional 0-d coefficient tensor: float32/float64, one element, on `device`.
inline void check_coeff(const char* op, const char* name, const std::optional<at::Tensor>& c, const at::Device& device) {
  if (!c.has_value()) return;
  TORCH_CHECK(c->numel() == 1, op, ": ", name, " must hold one element, got shape ", c->sizes());
  TORCH_CHECK(c->scalar_type() == at::kFloat || c->scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", c->scalar_type());
  TORCH_CHECK(c->device() == device, op, ": ", name, " is on ", c->device(), " but the tensors are on ", device);
}

inline const void* coeff_ptr(const std::optional<at::Tensor>& c) { return c.has_value() ? c->data_ptr() : nullptr; }
inline bool coeff_is_double(const std::optional<at::Tensor>& c) {
  return c.has_value() && c->scalar_type() == at::kDouble;
}

// Entries of `written` that update the same memory must not run concurrently: entry i goes into
// wave k when k earlier entries write the same data pointer (e.g. a conv weight listed once along
// dim 0, as its own filters, and once along dim 1, as the next group's input channels). Waves run
// one after another, which reproduces the sequential order of the reference.
inline std::vector<std::vector<int64_t>> write_waves(at::TensorList written) {
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

}  // namespace host

}  // namespace fastreg::mt
