// fastreg::gram_penalty — the masked gram-matrix penalty of DESIGN.md §1.1, shared by the CPU
// (gram_penalty.cpp) and CUDA (gram_penalty_cuda.cu) kernels.
//
// Layer l: W ∈ R^{n×D} (the weight viewed one row per filter), rows permuted so that the p pruned
// rows come first (P = rows [0, p), K = rows [p, n)); G = W Wᵀ.
//   decorrelate  E = G ⊙ (1 − m mᵀ)     identity  E = G − I     diagonal  E = G − diag(m)
// penalty_l = scale · Σ E² (scale = coeff/n² for reduction "mean", else coeff); ∇W = scale · 4 E W.
// (coeff: the caller's factor on the penalty, e.g. TPP's lw·reg, folded in here so that the
// gradients come out scaled and a loss that adds the penalty as it is needs no pass over them.)
//
// Each layer runs on the side (n×n "N-side" or D×D "D-side") that needs fewer flops:
//   decorrelate, N-side: A = W_P Wᵀ (p×n);  Σ E² = 2‖A‖² − ‖A[:, P]‖²
//                        ∇W_P = 4 A W,  ∇W_K = 4 A[:, K]ᵀ W_P                 (6pn − 2p²)·D flops
//   decorrelate, D-side: S = W_Pᵀ W_P, R = W_Kᵀ W_K;  Σ E² = ‖S‖² + 2⟨S, R⟩
//                        ∇W_P = 4 W_P (S + R),  ∇W_K = 4 W_K S                      4nD² flops
//   diagonal/identity, N-side: E = W Wᵀ − diag(m);  ∇W = 4 E W                     4n²D flops
//   diagonal/identity, D-side: S = Wᵀ W;  Σ E² = ‖S‖² − 2 Σ_{i∈K} ‖w_i‖² + |K|
//                        ∇W = 4 (W S − diag(m) W)                                   4nD² flops
// (identity is diagonal with every row kept). Layers with equal (n, D, p, side) form one group with
// one Program (make_program): the products above as GEMM and reduction steps over a workspace that
// holds the layer's permuted rows. The CUDA backend runs each group as batched GEMMs
// (run_groups_batched); the CPU backend runs each layer's program on one thread (small layers,
// spread over the threads) or on all of them (large layers), and small fp32/fp64 N-side layers
// in their own row order when that costs at most 1.25× the flops (gram_penalty.cpp).
//
// This header holds (1) the per-element arithmetic of the epilogues as __host__ __device__
// functions that the CPU loops and the CUDA kernels both call, and (2) the host orchestration
// (checks, planning, grouping, the programs, the batched executor) shared by both backends.
#pragma once

#include <cstdint>

#ifndef FASTREG_HD
#if defined(__CUDACC__)
#define FASTREG_HD __host__ __device__ __forceinline__
#else
#define FASTREG_HD inline
#endif
#endif

namespace fastreg::gram {

// ---------------------------------------------------------------------------------------------
// (1) Per-element arithmetic (host and device)
// ---------------------------------------------------------------------------------------------

// Which squared-sum a reduction epilogue computes over a [B, rows, cols] buffer X (and Y).
enum class Term : int {
  kDecorrelateNSide,  // X = A = W_P Wᵀ (p×n): Σ_j (j < p ? 1 : 2) · A_ij²
  kDecorrelateDSide,  // X = S, Y = R (D×D): Σ S (S + 2R); Y ← S + R (= T, the ∇W_P factor)
  kDiagonalNSide,     // X = G (n×n): X ← E = G − [i = j ∧ i ≥ p]; Σ E²
  kSquares,           // X = S = Wᵀ W (D×D): Σ S²
  kKeptRowNorms,      // X = W (n×D): Σ_{i ≥ p} (1 − 2 ‖w_i‖²)  (the diag(m) part of the D-side)
};

// The contribution of element (i, j) of X (and Y) to the layer's Σ E²; may update X/Y in place
// (each element is visited exactly once). p = number of pruned rows (they come first).
template <Term kTerm, class acc_t>
FASTREG_HD acc_t gram_term(acc_t& x, acc_t& y, int64_t i, int64_t j, int64_t p) {
  if constexpr (kTerm == Term::kDecorrelateNSide) {
    // column j < p is a pruned column: A_ij appears once (row i of E); else twice (row and column)
    return (j < p ? acc_t(1) : acc_t(2)) * x * x;
  } else if constexpr (kTerm == Term::kDecorrelateDSide) {
    const acc_t s = x, r = y;
    y = s + r;
    return s * (s + acc_t(2) * r);
  } else if constexpr (kTerm == Term::kDiagonalNSide) {
    x -= (i == j && i >= p) ? acc_t(1) : acc_t(0);
    return x * x;
  } else if constexpr (kTerm == Term::kSquares) {
    return x * x;
  } else {  // kKeptRowNorms: the constant 1 of a kept row is counted at its column 0
    if (i < p) return acc_t(0);
    return (j == 0 ? acc_t(1) : acc_t(0)) - acc_t(2) * x * x;
  }
}

// One element of a layer's gradient from the GEMM result g (E W up to the diagonal term):
// grad_coeff · g − kept_coeff · w on kept rows, grad_coeff · g on pruned rows. grad_coeff = 4·scale;
// kept_coeff = 4·scale for the diagonal D-side (its − diag(m) W), else 0.
template <class acc_t>
FASTREG_HD acc_t assemble_grad(acc_t g, acc_t w, bool kept, acc_t grad_coeff, acc_t kept_coeff) {
  return kept ? grad_coeff * g - kept_coeff * w : grad_coeff * g;
}

}  // namespace fastreg::gram

// ---------------------------------------------------------------------------------------------
// ---------------------------------------------------------------------------------------------
// (2) Host orchestration (ATen), shared by the CPU and CUDA implementations
// ---------------------------------------------------------------------------------------------
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "mask_bytes.h"
#include "outputs.h"

namespace fastreg::gram {

enum class Target { kDecorrelate, kDiagonal, kIdentity };
enum class Side { kNone, kN, kD };  // kNone: a decorrelate layer with no pruned row (penalty 0)

inline Target parse_target(std::string_view target) {
  if (target == "decorrelate") return Target::kDecorrelate;
  if (target == "diagonal") return Target::kDiagonal;
  TORCH_CHECK_VALUE(target == "identity", "gram_penalty: target must be 'decorrelate', 'diagonal' or 'identity', got '",
              target, "'");
  return Target::kIdentity;
}

// Flops of one layer on each side (GEMMs only; the epilogues are O(n·D + D² + n²)); with need_grad,
// fastreg.reference.gram_side_flops is the same model in Python (the tests and benchmarks use it).
inline double side_flops(Target target, Side side, double n, double D, double p, bool need_grad) {
  if (target == Target::kDecorrelate) {
    if (side == Side::kN) return need_grad ? (6 * p * n - 2 * p * p) * D : 2 * p * n * D;
    return (need_grad ? 4 : 2) * n * D * D;
  }
  return (need_grad ? 4 : 2) * n * (side == Side::kN ? n * D : D * D);
}

inline Side choose_side(Target target, int64_t n, int64_t D, int64_t p, bool need_grad) {
  if (target == Target::kDecorrelate && p == 0) return Side::kNone;
  // diagonal / identity on the D-side get Σ E² as ‖S‖² − 2 Σ_K ‖w_i‖² + |K|, a difference of terms of
  // size |K|: taken only when |K| > D, where Σ E² ≥ |K| − D ≥ 1 (more than D kept rows cannot be
  // orthonormal), never for a penalty near 0 that rounding would swamp (or make negative).
  if (target != Target::kDecorrelate && n - p <= D) return Side::kN;
  return side_flops(target, Side::kD, n, D, p, need_grad) < side_flops(target, Side::kN, n, D, p, need_grad)
             ? Side::kD
             : Side::kN;
}

// Layers under this many GEMM flops count as small: the CPU runs each on one thread, the layers
// spread over the threads; larger layers run one at a time with every thread.
constexpr double kSmallLayerFlops = 16e6;

// The layers of one group (at most kMaxBatch: the CUDA kernels take the pointers by value):
// perm[b·n + i] = original row of permuted row i of layer b and layer[b] = its index in the call,
// both in the mask set's cached table (on the device for CUDA weights: GramPlan); src[b] / grad[b] =
// the data pointers of layer b's weight rows / gradient, host values set per call.
constexpr int64_t kMaxBatch = 64;
struct GroupTable {
  const int64_t* perm;
  const int64_t* layer;
  std::vector<int64_t> src, grad;
  int64_t B, n, D, p;
};

// The pointers of a group as a CUDA kernel argument (by value: no host→device copy per call).
struct LayerPointers {
  int64_t at[kMaxBatch];
  explicit LayerPointers(const std::vector<int64_t>& v) {
    std::fill(at, at + kMaxBatch, int64_t{0});
    std::copy(v.begin(), v.end(), at);
  }
};

// A matrix in a group's workspace, possibly a block or a transpose of a buffer. The workspace of
// nb layers holds each buffer ("region") as nb consecutive [rows, cols] row-major matrices, so
// element (i, j) of layer b's matrix is at  nb·region + b·batch + offset + i·rs + j·cs.
struct MatView {
  int64_t region = 0, batch = 0, offset = 0, rows = 0, cols = 0, rs = 0, cs = 1;
  MatView t() const {
    MatView v = *this;
    std::swap(v.rows, v.cols);
    std::swap(v.rs, v.cs);
    return v;
  }
  MatView block(int64_t r0, int64_t nr, int64_t c0, int64_t nc) const {
    MatView v = *this;
    v.offset += r0 * rs + c0 * cs;
    v.rows = nr;
    v.cols = nc;
    return v;
  }
  int64_t start(int64_t nb, int64_t b) const { return nb * region + b * batch + offset; }
  bool empty() const { return rows == 0 || cols == 0; }
};

// One step of a layer's computation: out = a @ b (gemm), or (reduce) the layer's Σ E² +=
// Σ_{i,j} gram_term<term>(x[i, j], y[i, j], i, j, p) over whole regions x = out, y = a.
struct Step {
  bool gemm;
  Term term;
  MatView out, a, b;
};

// What each layer of a group computes — the table at the top of this file as GEMMs and
// reductions over its workspace (wp = its rows, pruned first) — and its gradient rows:
//   grad[perm[i]] = assemble_grad(g[i], wp[i], i ≥ p, 4·scale, kept_factor · 4·scale),
//   g[i] = g1[i] for i < g1.rows, else g2[i − g1.rows]   (unscaled E W).
struct Program {
  int64_t numel = 0;  // workspace elements per layer
  MatView wp, g1, g2;
  std::vector<Step> steps;
  double kept_factor = 0.0;
};

inline Program make_program(Target target, Side side, int64_t n, int64_t D, int64_t p, bool need_grad) {
  Program pr;
  auto region = [&](int64_t rows, int64_t cols) {
    MatView v;
    v.region = pr.numel;
    v.batch = rows * cols;
    v.rows = rows;
    v.cols = cols;
    v.rs = cols;
    pr.numel += rows * cols;
    return v;
  };
  auto gemm = [&](const MatView& out, const MatView& a, const MatView& b) {
    if (!out.empty()) pr.steps.push_back({true, Term::kSquares, out, a, b});
  };
  auto reduce = [&](Term term, const MatView& x, const MatView& y) { pr.steps.push_back({false, term, x, y, {}}); };
  const int64_t k = n - p;
  pr.wp = region(n, D);
  const MatView W = pr.wp, WP = W.block(0, p, 0, D), WK = W.block(p, k, 0, D);
  if (target == Target::kDecorrelate && side == Side::kN) {
    const MatView A = region(p, n);
    gemm(A, WP, W.t());  // A = W_P Wᵀ  [p, n]
    reduce(Term::kDecorrelateNSide, A, A);
    if (need_grad) {
      pr.g1 = region(p, D);
      pr.g2 = region(k, D);
      gemm(pr.g1, A, W);                         // A W          → rows P
      gemm(pr.g2, A.block(0, p, p, k).t(), WP);  // A[:, K]ᵀ W_P → rows K
    }
  } else if (target == Target::kDecorrelate) {
    const MatView S = region(D, D);
    MatView T = S;           // the ∇W_P factor S + R (= S when no row is kept)
    gemm(S, WP.t(), WP);     // S = W_Pᵀ W_P  [D, D]
    if (k > 0) {
      T = region(D, D);
      gemm(T, WK.t(), WK);  // R = W_Kᵀ W_K
      reduce(Term::kDecorrelateDSide, S, T);  // Σ S (S + 2R);  T ← S + R
    } else {
      reduce(Term::kSquares, S, S);
    }
    if (need_grad) {
      pr.g1 = region(p, D);
      pr.g2 = region(k, D);
      gemm(pr.g1, WP, T);  // W_P T
      gemm(pr.g2, WK, S);  // W_K S
    }
  } else if (side == Side::kN) {  // diagonal / identity
    const MatView E = region(n, n);
    gemm(E, W, W.t());  // G = W Wᵀ  [n, n]
    reduce(Term::kDiagonalNSide, E, E);  // E ← G − diag(m)
    if (need_grad) {
      pr.g1 = region(n, D);
      pr.g2 = region(0, D);
      gemm(pr.g1, E, W);  // E W
    }
  } else {
    const MatView S = region(D, D);
    gemm(S, W.t(), W);  // S = Wᵀ W  [D, D]
    reduce(Term::kSquares, S, S);
    reduce(Term::kKeptRowNorms, W, W);
    if (need_grad) {
      pr.g1 = region(n, D);
      pr.g2 = region(0, D);
      gemm(pr.g1, W, S);  // W S; the − diag(m) W is added by the scatter
    }
    pr.kept_factor = 1.0;
  }
  return pr;
}

// One group of layers with equal (n, D, p, side): their program, table and reduction scale.
struct Group {
  Program program;
  GroupTable table;
  double scale;      // coeff/n² ("mean") or coeff (on CUDA, times *RunOptions::coeff when given)
  double layer_flops;
  Target target;
  Side side;
};

// Calls f(std::integral_constant<Term, term>{}) — a runtime Term as a template argument.
template <class F>
void with_term(Term term, F&& f) {
  switch (term) {
    case Term::kDecorrelateNSide: return f(std::integral_constant<Term, Term::kDecorrelateNSide>{});
    case Term::kDecorrelateDSide: return f(std::integral_constant<Term, Term::kDecorrelateDSide>{});
    case Term::kDiagonalNSide: return f(std::integral_constant<Term, Term::kDiagonalNSide>{});
    case Term::kSquares: return f(std::integral_constant<Term, Term::kSquares>{});
    case Term::kKeptRowNorms: return f(std::integral_constant<Term, Term::kKeptRowNorms>{});
  }
}

// out[b] = a[b] @ c[b] for a group of B layers. Small products run as one batched GEMM; large
// ones one GEMM per layer, each using the whole device.
inline void group_mm_out(at::Tensor out, const at::Tensor& a, const at::Tensor& c) {
  constexpr double kPerLayerFlops = 32e6;
  const double flops = 2.0 * static_cast<double>(a.size(1)) * a.size(2) * c.size(2);
  if (flops < kPerLayerFlops || out.numel() == 0) {
    at::bmm_out(out, a, c);
    return;
  }
  for (int64_t b = 0; b < a.size(0); ++b) {
    at::Tensor out_b = out.select(0, b);
    at::mm_out(out_b, a.select(0, b), c.select(0, b));
  }
}

// What a run writes besides per_layer: accumulate = add each gradient into its destination (else
// overwrite it); coeff = a device scalar (acc dtype) multiplying the penalty and the gradients, or null
// (the CPU backend folds a coefficient tensor into Group::scale instead: reading it is no device sync).
struct RunOptions {
  bool need_grad = false;
  bool accumulate = false;
  const void* coeff = nullptr;
};

// Runs each group as batched ATen GEMMs over one [B, ...] workspace and one launch of each
// epilogue kernel (the CUDA backend). The kernels a backend provides for this:
//   gather_rows(t, dtype, wp):  wp[b, i, :] = acc(weight_b[perm[b·n + i], :])
//   reduce<kTerm>(t, x, y, rows, cols, scale, coeff, per_layer):
//       per_layer[layer[b]] += scale · coeff · Σ_{i<rows, j<cols} gram_term<kTerm>(x[b,i,j], y[b,i,j], i, j, p)
//   scatter_grads(t, dtype, g1, g2, wp, grad_coeff, kept_coeff, options): with g[b, i] = g1[b, i] for
//       i < split = g1.size(1), else g2[b, i − split], v = coeff · assemble_grad(g[b, i, :], wp[b, i, :],
//       i ≥ p, grad_coeff, kept_coeff):  grad_b[perm[b·n + i], :] (+)= v
//   workspace(numel, options): a 1-D scratch tensor
template <class Kernels>
void run_groups_batched(const std::vector<Group>& groups, at::Tensor& per_layer, at::ScalarType dtype,
                        const RunOptions& options) {
  for (const Group& group : groups) {
    const Program& pr = group.program;
    const GroupTable& t = group.table;
    const int64_t B = t.B;
    at::Tensor ws = Kernels::workspace(B * pr.numel, per_layer.options());
    auto view = [&](const MatView& v) {
      return ws.as_strided({B, v.rows, v.cols}, {v.batch, v.rs, v.cs}, ws.storage_offset() + v.start(B, 0));
    };
    at::Tensor wp = view(pr.wp);
    Kernels::gather_rows(t, dtype, wp);
    for (const Step& s : pr.steps) {
      at::Tensor x = view(s.out), y = view(s.a);
      if (s.gemm) {
        group_mm_out(x, y, view(s.b));
      } else {
        with_term(s.term, [&](auto term) {
          Kernels::template reduce<decltype(term)::value>(t, x, y, s.out.rows, s.out.cols, group.scale, options.coeff,
                                                          per_layer);
        });
      }
    }
    if (options.need_grad)
      Kernels::scatter_grads(t, dtype, view(pr.g1), view(pr.g2), wp, 4.0 * group.scale,
                             4.0 * group.scale * pr.kept_factor, options);
  }
}

// The argument checks of both ops (ValueError / TypeError in Python: argument errors, which the Python
// fast paths catch to rerun the checked path for its message; nothing else is caught there).
inline void check_arguments(at::TensorList weights, at::TensorList keep_masks, Target target,
                            std::string_view reduction, double coeff) {
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum" || reduction == "none",
                    "gram_penalty: reduction must be 'mean', 'sum' or 'none', got '", reduction, "'");
  TORCH_CHECK_VALUE(std::isfinite(coeff), "gram_penalty: coeff must be a finite number, got ", coeff);
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(L > 0, "gram_penalty: weights must not be empty");
  TORCH_CHECK_VALUE(target == Target::kIdentity || static_cast<int64_t>(keep_masks.size()) == L,
                    "gram_penalty: keep_masks has ", keep_masks.size(), " masks but weights has ", L, " tensors");
  TORCH_CHECK_VALUE(target != Target::kIdentity || keep_masks.empty(), "gram_penalty: target 'identity' takes no keep_masks");
  const auto dtype = weights[0].scalar_type();
  const auto device = weights[0].device();
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "gram_penalty: weights must be floating, got ", dtype);
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK_VALUE(weights[l].dim() >= 2, "gram_penalty: weights[", l, "] must have at least 2 dims, got ",
                      weights[l].sizes());
    TORCH_CHECK_VALUE(weights[l].numel() > 0, "gram_penalty: weights[", l, "] is empty (shape ", weights[l].sizes(),
                      "): a layer needs at least one row and one column");
    TORCH_CHECK_TYPE(weights[l].scalar_type() == dtype, "gram_penalty: weights must share one dtype");
    TORCH_CHECK_VALUE(weights[l].device() == device, "gram_penalty: weights must share one device");
    if (!keep_masks.empty()) {
      TORCH_CHECK_TYPE(keep_masks[l].scalar_type() == at::kBool, "gram_penalty: keep_masks[", l, "] must be bool");
      TORCH_CHECK_VALUE(keep_masks[l].dim() == 1 && keep_masks[l].size(0) == weights[l].size(0),
                        "gram_penalty: keep_masks[", l, "] must have shape [", weights[l].size(0), "], got ",
                        keep_masks[l].sizes());
      TORCH_CHECK_VALUE(keep_masks[l].device() == device, "gram_penalty: keep_masks[", l, "] must be on ", device);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The plan of a mask set: pruned counts, groups, programs, and the perm/layer table (on the weights'
// device), built when the masks change and reused by every later call with the same masks — so the
// per-step path of CUDA weights reads no mask on the host and copies nothing to the device.
// ---------------------------------------------------------------------------------------------
struct GramPlan {
  std::vector<Group> groups;       // scale = 1/n² or 1 (the call's coeff multiplies it); src/grad empty
  std::vector<std::vector<int64_t>> group_layers;  // each group's layer indices
  std::vector<int64_t> unpruned;   // decorrelate layers with no pruned row (penalty and gradient 0)
  at::Tensor table;                // [perm (B·n), layer (B)] per group, int64
};

// A mask as the cache sees it: the tensor (held, so that its address stays its own), its version
// counter (bumped by every in-place change) and its data pointer.
struct MaskId {
  const c10::TensorImpl* impl;
  int64_t version;
  const void* data;
  bool operator==(const MaskId& o) const { return impl == o.impl && version == o.version && data == o.data; }
};

struct PlanKey {
  c10::Device device = at::kCPU;
  Target target = Target::kDecorrelate;
  bool need_grad = false;
  std::vector<int64_t> shapes;  // (n, D) per layer
  std::vector<MaskId> masks;
  bool operator==(const PlanKey& o) const {
    return device == o.device && target == o.target && need_grad == o.need_grad && shapes == o.shapes && masks == o.masks;
  }
};

inline std::shared_ptr<const GramPlan> build_plan(at::TensorList weights, at::TensorList keep_masks, Target target,
                                                  bool need_grad) {
  const int64_t L = static_cast<int64_t>(weights.size());
  const auto device = weights[0].device();
  // The masks on the host (on CUDA the one device→host copy, made when the masks change).
  std::vector<at::Tensor> keep_host;
  std::vector<const uint8_t*> keep(L, nullptr);
  if (!keep_masks.empty() && target != Target::kIdentity) {
    if (device.is_cpu()) {
      for (int64_t l = 0; l < L; ++l) keep[l] = mask_bytes(keep_host.emplace_back(keep_masks[l].contiguous()));
    } else {
      const uint8_t* all = mask_bytes(keep_host.emplace_back(at::cat(keep_masks).to(at::kCPU).contiguous()));
      for (int64_t l = 0, offset = 0; l < L; offset += weights[l].size(0), ++l) keep[l] = all + offset;
    }
  }
  struct Layer {
    int64_t index, n, D, p;
    Side side;
  };
  std::map<std::tuple<int64_t, int64_t, int64_t, int>, std::vector<Layer>> by_shape;  // (n, D, p, side)
  auto plan = std::make_shared<GramPlan>();
  for (int64_t l = 0; l < L; ++l) {
    const int64_t n = weights[l].size(0), D = weights[l].numel() / n;
    int64_t p = 0;
    if (keep[l])
      for (int64_t i = 0; i < n; ++i) p += !keep[l][i];
    const Side side = choose_side(target, n, D, p, need_grad);
    if (side == Side::kNone) plan->unpruned.push_back(l);
    else by_shape[{n, D, p, static_cast<int>(side)}].push_back({l, n, D, p, side});
  }
  // Groups of at most kMaxBatch layers; the table: per group [perm (B·n), layer (B)].
  std::vector<std::vector<Layer>> chunks;
  int64_t table_size = 0;
  for (auto& [key, layers] : by_shape)
    for (size_t b0 = 0; b0 < layers.size(); b0 += kMaxBatch) {
      chunks.emplace_back(layers.begin() + b0, layers.begin() + std::min(layers.size(), b0 + kMaxBatch));
      table_size += static_cast<int64_t>(chunks.back().size()) * (layers[0].n + 1);
    }
  at::Tensor table_host = at::empty({std::max<int64_t>(table_size, 1)}, at::TensorOptions().dtype(at::kLong));
  int64_t* tab = table_host.data_ptr<int64_t>();
  std::vector<int64_t> offsets;
  int64_t off = 0;
  for (const auto& layers : chunks) {
    offsets.push_back(off);
    const int64_t B = static_cast<int64_t>(layers.size()), n = layers[0].n;
    for (int64_t b = 0; b < B; ++b) {
      const Layer& ly = layers[b];
      int64_t* perm = tab + off + b * n;
      if (keep[ly.index]) {
        int64_t pruned = 0, kept = ly.p;
        for (int64_t i = 0; i < n; ++i) perm[keep[ly.index][i] ? kept++ : pruned++] = i;
      } else {
        for (int64_t i = 0; i < n; ++i) perm[i] = i;
      }
      tab[off + B * n + b] = ly.index;
    }
    off += B * (n + 1);
  }
  plan->table = device.is_cpu() ? table_host : table_host.to(device);
  const int64_t* tab_dev = plan->table.data_ptr<int64_t>();
  for (size_t c = 0; c < chunks.size(); ++c) {
    const auto& layers = chunks[c];
    const Layer& first = layers[0];
    const int64_t B = static_cast<int64_t>(layers.size()), n = first.n, D = first.D, p = first.p;
    const int64_t* t = tab_dev + offsets[c];
    plan->groups.push_back({make_program(target, first.side, n, D, p, need_grad), GroupTable{t, t + B * n, {}, {}, B, n, D, p},
                            1.0, side_flops(target, first.side, n, D, p, need_grad), target, first.side});
    std::vector<int64_t> indices;
    for (const Layer& ly : layers) indices.push_back(ly.index);
    plan->group_layers.push_back(std::move(indices));
  }
  return plan;
}

// The plan for these weights' shapes and masks: a small cache (most recent first), searched by the
// masks' identities and versions; a mask changed in place (version bump) or replaced gets a new plan.
// (Masks written behind PyTorch's back, e.g. through a NumPy view, are not seen: replace them instead.)
inline std::shared_ptr<const GramPlan> plan_for(at::TensorList weights, at::TensorList keep_masks, Target target,
                                                bool need_grad) {
  struct Entry {
    PlanKey key;
    std::vector<at::Tensor> masks;  // held: their addresses identify them while the entry lives
    std::shared_ptr<const GramPlan> plan;
  };
  constexpr size_t kEntries = 8;
  static std::mutex mutex;
  static std::vector<Entry> cache;
  PlanKey key;
  key.device = weights[0].device();
  key.target = target;
  key.need_grad = need_grad;
  key.shapes.reserve(2 * weights.size());
  for (const auto& w : weights) {
    key.shapes.push_back(w.size(0));
    key.shapes.push_back(w.numel() / w.size(0));
  }
  bool cacheable = true;
  if (target != Target::kIdentity) {
    key.masks.reserve(keep_masks.size());
    for (const auto& m : keep_masks) {
      if (m.is_inference()) {  // no version counter to watch: planned on every call
        cacheable = false;
        break;
      }
      key.masks.push_back({m.unsafeGetTensorImpl(), m._version(), m.const_data_ptr()});
    }
  }
  if (cacheable) {
    const std::lock_guard<std::mutex> lock(mutex);
    for (size_t i = 0; i < cache.size(); ++i)
      if (cache[i].key == key) {
        std::rotate(cache.begin(), cache.begin() + i, cache.begin() + i + 1);
        return cache[0].plan;
      }
  }
  auto plan = build_plan(weights, keep_masks, target, need_grad);
  if (cacheable) {
    const std::lock_guard<std::mutex> lock(mutex);
    cache.insert(cache.begin(), Entry{std::move(key), keep_masks.vec(), plan});
    if (cache.size() > kEntries) cache.pop_back();
  }
  return plan;
}

// Whether row i of t (dim 0) is one block of D = numel/size(0) consecutive elements and the whole
// tensor is dense: its memory is then an N×D matrix whose columns are the other dims in some order.
inline bool rows_are_blocks(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() && (t.size(0) == 1 || t.stride(0) == t.numel() / t.size(0));
}

// Whether a and b (one shape) put every element at the same memory offset (size-1 dims aside).
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

// The op. accumulate_into empty: returns (penalty, [∂penalty_l/∂W_l] if need_grad, contiguous). Else
// adds ∂penalty_l/∂W_l into accumulate_into[l] where it lies (any dense layout: a layer whose gradient
// and weight share a layout with rows as blocks reads and writes both in place, since the gram and
// E W do not depend on the order of the columns) and returns (penalty, []). coeff_tensor: a 0-d
// factor on top of coeff (read on the host for CPU weights, by the kernels for CUDA ones).
template <class Kernels>
std::tuple<at::Tensor, std::vector<at::Tensor>> gram_penalty_impl(at::TensorList weights, at::TensorList keep_masks,
                                                                  std::string_view target_name,
                                                                  std::string_view reduction, double coeff,
                                                                  bool need_grad, at::TensorList accumulate_into = {},
                                                                  const std::optional<at::Tensor>& coeff_tensor = {},
                                                                  bool accumulate = false) {
  const Target target = parse_target(target_name);
  check_arguments(weights, keep_masks, target, reduction, coeff);
  const int64_t L = static_cast<int64_t>(weights.size());
  const auto dtype = weights[0].scalar_type();
  const auto device = weights[0].device();
  const auto acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = weights[0].options().dtype(acc_dtype);
  if (accumulate) {
    need_grad = true;
    TORCH_CHECK_VALUE(static_cast<int64_t>(accumulate_into.size()) == L, "gram_penalty_grad_: grads has ",
                      accumulate_into.size(), " tensors but weights has ", L);
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor& g = accumulate_into[l];
      TORCH_CHECK_VALUE(g.sizes() == weights[l].sizes(), "gram_penalty_grad_: grads[", l, "] has shape ", g.sizes(),
                        " but weights[", l, "] has shape ", weights[l].sizes());
      TORCH_CHECK_TYPE(g.scalar_type() == dtype, "gram_penalty_grad_: grads[", l, "] has dtype ", g.scalar_type(),
                       " but weights[", l, "] has ", dtype);
      TORCH_CHECK_VALUE(g.device() == device, "gram_penalty_grad_: grads[", l, "] is on ", g.device(), " but weights[",
                        l, "] on ", device);
      TORCH_CHECK_VALUE(g.is_non_overlapping_and_dense(), "gram_penalty_grad_: grads[", l,
                        "] is updated in place, so it must be dense in memory, got strides ", g.strides());
    }
  }
  const at::Tensor* coeff_device = nullptr;
  at::Tensor coeff_acc;
  if (coeff_tensor.has_value()) {
    const at::Tensor& c = *coeff_tensor;
    TORCH_CHECK_VALUE(c.numel() == 1, "gram_penalty: coeff_tensor must have one element, got shape ", c.sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(c.scalar_type()), "gram_penalty: coeff_tensor must be floating, got ",
                     c.scalar_type());
    TORCH_CHECK_VALUE(c.device() == device, "gram_penalty: coeff_tensor is on ", c.device(), " but the weights on ",
                      device);
    coeff_acc = c.reshape({}).to(acc_dtype);
    if (device.is_cpu()) {  // a host value: no sync (read without a dispatcher call)
      coeff *= acc_dtype == at::kDouble ? *coeff_acc.const_data_ptr<double>() : *coeff_acc.const_data_ptr<float>();
    } else {
      coeff_device = &coeff_acc;
    }
  }

  // Each layer's rows (src) and where its gradient goes (dst); temp[l]: a contiguous buffer added into
  // accumulate_into[l] afterwards (a gradient whose rows are not blocks, e.g. a transposed matrix).
  std::vector<at::Tensor> src(L), dst, temp;
  if (accumulate) {
    dst.resize(L);
    temp.resize(L);
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor &w = weights[l], &g = accumulate_into[l];
      if (!rows_are_blocks(g)) {
        src[l] = w.contiguous();
        dst[l] = temp[l] = at::zeros(w.sizes(), w.options());
      } else if (rows_are_blocks(w) && same_layout(w, g)) {
        src[l] = w;
        dst[l] = g;
      } else {  // the weight copied into the gradient's layout
        src[l] = at::empty_strided(g.sizes(), g.strides(), w.options()).copy_(w);
        dst[l] = g;
      }
    }
  } else {
    for (int64_t l = 0; l < L; ++l) src[l] = weights[l].contiguous();
    if (need_grad) {
      std::vector<c10::IntArrayRef> shapes;
      for (int64_t l = 0; l < L; ++l) shapes.push_back(weights[l].sizes());
      dst = empty_many(shapes, weights[0].options());  // one allocation for every layer's gradient
    }
  }

  const auto plan = plan_for(weights, keep_masks, target, need_grad);
  if (need_grad && !accumulate)
    for (int64_t l : plan->unpruned) dst[l].zero_();
  const double reduction_coeff = coeff;
  std::vector<Group> groups = plan->groups;
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    Group& group = groups[gi];
    const int64_t n = group.table.n;
    group.scale = (reduction == "mean" ? 1.0 / (static_cast<double>(n) * n) : 1.0) * reduction_coeff;
    for (int64_t l : plan->group_layers[gi]) {
      group.table.src.push_back(reinterpret_cast<int64_t>(src[l].data_ptr()));
      group.table.grad.push_back(need_grad ? reinterpret_cast<int64_t>(dst[l].data_ptr()) : 0);
    }
  }

  at::Tensor per_layer = at::zeros({L}, acc_opts);
  RunOptions options;
  options.need_grad = need_grad;
  options.accumulate = accumulate;
  options.coeff = coeff_device != nullptr ? coeff_device->const_data_ptr() : nullptr;
  Kernels::run(groups, per_layer, dtype, options);
  std::vector<at::Tensor> grads;
  if (accumulate) {
    for (int64_t l = 0; l < L; ++l)
      if (temp[l].defined()) accumulate_into[l].add_(temp[l]);
  } else {
    grads = std::move(dst);
  }
  if (reduction == "none") return {per_layer, grads};
  if (!device.is_cpu()) return {per_layer.sum(), grads};
  double total = 0.0;  // on the host: a few adds, not an ATen reduction
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "gram_penalty_total", [&] {
    const scalar_t* v = per_layer.data_ptr<scalar_t>();
    for (int64_t l = 0; l < L; ++l) total += static_cast<double>(v[l]);
  });
  return {at::scalar_tensor(total, acc_opts), grads};
}

}  // namespace fastreg::gram
