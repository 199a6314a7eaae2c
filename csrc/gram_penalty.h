// fastreg::gram_penalty — the masked gram-matrix penalty of DESIGN.md §1.1, shared by the CPU
// (gram_penalty.cpp) and CUDA (gram_penalty_cuda.cu) kernels.
//
// Layer l: W ∈ R^{n×D} (the weight viewed one row per filter), rows permuted so that the p pruned
// rows come first (P = rows [0, p), K = rows [p, n)); G = W Wᵀ.
//   decorrelate  E = G ⊙ (1 − m mᵀ)     identity  E = G − I     diagonal  E = G − diag(m)
// penalty_l = scale · Σ E² (scale = 1/n² for reduction "mean", else 1); ∇W = scale · 4 E W.
//
// Each layer runs on the side (n×n "N-side" or D×D "D-side") that needs fewer flops:
//   decorrelate, N-side: A = W_P Wᵀ (p×n);  Σ E² = 2‖A‖² − ‖A[:, P]‖²
//                        ∇W_P = 4 A W,  ∇W_K = 4 A[:, K]ᵀ W_P                 (6pn − 2p²)·D flops
//   decorrelate, D-side: S = W_Pᵀ W_P, R = W_Kᵀ W_K;  Σ E² = ‖S‖² + 2⟨S, R⟩
//                        ∇W_P = 4 W_P (S + R),  ∇W_K = 4 W_K S                      4nD² flops
//   diagonal/identity, N-side: E = W Wᵀ − diag(m);  ∇W = 4 E W                     4n²D flops
//   diagonal/identity, D-side: S = Wᵀ W;  Σ E² = ‖S‖² − 2 Σ_{i∈K} ‖w_i‖² + |K|
//                        ∇W = 4 (W S − diag(m) W)                                   4nD² flops
// (identity is diagonal with every row kept). Layers with equal (n, D, p, side) form one group:
// their permuted rows are gathered into one [B, n, D] buffer and every product is one batched GEMM.
//
// This header holds (1) the per-element arithmetic of the epilogues as __host__ __device__
// functions that the CPU loops and the CUDA kernels both call, and (2) the host orchestration
// (planning, grouping, the GEMMs through ATen) as a template over the device's epilogue kernels.
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
// (2) Host orchestration (ATen), shared by the CPU and CUDA implementations
// ---------------------------------------------------------------------------------------------
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <map>
#include <string_view>
#include <tuple>
#include <vector>

namespace fastreg::gram {

enum class Target { kDecorrelate, kDiagonal, kIdentity };
enum class Side { kNone, kN, kD };  // kNone: a decorrelate layer with no pruned row (penalty 0)

inline Target parse_target(std::string_view target) {
  if (target == "decorrelate") return Target::kDecorrelate;
  if (target == "diagonal") return Target::kDiagonal;
  TORCH_CHECK(target == "identity", "gram_penalty: target must be 'decorrelate', 'diagonal' or 'identity', got '",
              target, "'");
  return Target::kIdentity;
}

// Flops of one layer on each side (GEMMs only; the epilogues are O(n·D + D² + n²)).
inline double side_flops(Target target, Side side, double n, double D, double p, bool need_grad) {
  if (target == Target::kDecorrelate) {
    if (side == Side::kN) return need_grad ? (6 * p * n - 2 * p * p) * D : 2 * p * n * D;
    return (need_grad ? 4 : 2) * n * D * D;
  }
  return (need_grad ? 4 : 2) * n * (side == Side::kN ? n * D : D * D);
}

inline Side choose_side(Target target, int64_t n, int64_t D, int64_t p, bool need_grad) {
  if (target == Target::kDecorrelate && p == 0) return Side::kNone;
  return side_flops(target, Side::kD, n, D, p, need_grad) < side_flops(target, Side::kN, n, D, p, need_grad)
             ? Side::kD
             : Side::kN;
}

// The layers of one group, as offsets into the call's int64 table (copied to the device once):
// perm[b·n + i] = original row of permuted row i of layer b; src[b] / grad[b] = data pointers of
// the weight / gradient of layer b; layer[b] = its index in the call.
struct GroupTable {
  const int64_t* perm;
  const int64_t* src;
  const int64_t* grad;
  const int64_t* layer;
  int64_t B, n, D, p;
};

// out[b] = a[b] @ c[b] for a group of B layers. Small products run as one batched GEMM (BLAS
// spreads the batch over the threads); large ones one GEMM per layer, each using every thread
// (splitting a batch of 3 or 5 big products over 2 threads would leave one idle).
inline void group_mm_out(at::Tensor out, const at::Tensor& a, const at::Tensor& c) {
  constexpr double kPerLayerThreadedFlops = 32e6;
  const double flops = 2.0 * static_cast<double>(a.size(1)) * a.size(2) * c.size(2);
  if (flops < kPerLayerThreadedFlops || out.numel() == 0) {
    at::bmm_out(out, a, c);
    return;
  }
  for (int64_t b = 0; b < a.size(0); ++b) {
    at::Tensor out_b = out.select(0, b);
    at::mm_out(out_b, a.select(0, b), c.select(0, b));
  }
}

// Layers under this many GEMM flops count as small (see the group loop of gram_penalty_impl).
constexpr double kSmallLayerFlops = 16e6;

// The device kernels a backend provides (see CpuKernels in gram_penalty.cpp, CudaKernels in the .cu):
//   gather_rows(t, dtype, wp):  wp[b, i, :] = acc(weight_b[perm[b·n + i], :])
//   reduce<kTerm>(t, x, y, rows, cols, scale, per_layer):
//       per_layer[layer[b]] += scale · Σ_{i<rows, j<cols} gram_term<kTerm>(x[b,i,j], y[b,i,j], i, j, p)
//   scatter_grads(t, dtype, g1, g2, wp, grad_coeff, kept_coeff): with g[b, i] = g1[b, i] for
//       i < split = g1.size(1), else g2[b, i − split]:
//       grad_b[perm[b·n + i], :] = assemble_grad(g[b, i, :], wp[b, i, :], i ≥ p, grad_coeff, kept_coeff)
//   workspace(numel, options): a 1-D scratch tensor (the CPU reuses one per thread across calls)
//   kSplitSmallGroupsAcrossThreads: run a group of small layers as one share per thread (CPU)
template <class Kernels>
std::tuple<at::Tensor, std::vector<at::Tensor>> gram_penalty_impl(at::TensorList weights, at::TensorList keep_masks,
                                                                  std::string_view target_name,
                                                                  std::string_view reduction, bool need_grad) {
  const Target target = parse_target(target_name);
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none",
              "gram_penalty: reduction must be 'mean', 'sum' or 'none', got '", reduction, "'");
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(L > 0, "gram_penalty: weights must not be empty");
  TORCH_CHECK(target == Target::kIdentity || static_cast<int64_t>(keep_masks.size()) == L, "gram_penalty: keep_masks has ",
              keep_masks.size(), " masks but weights has ", L, " tensors");
  TORCH_CHECK(target != Target::kIdentity || keep_masks.empty(), "gram_penalty: target 'identity' takes no keep_masks");
  const auto dtype = weights[0].scalar_type();
  const auto device = weights[0].device();
  TORCH_CHECK(at::isFloatingType(dtype), "gram_penalty: weights must be floating, got ", dtype);
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(weights[l].dim() >= 2, "gram_penalty: weights[", l, "] must have at least 2 dims, got ",
                weights[l].sizes());
    TORCH_CHECK(weights[l].scalar_type() == dtype, "gram_penalty: weights must share one dtype");
    TORCH_CHECK(weights[l].device() == device, "gram_penalty: weights must share one device");
    if (!keep_masks.empty()) {
      TORCH_CHECK(keep_masks[l].scalar_type() == at::kBool, "gram_penalty: keep_masks[", l, "] must be bool");
      TORCH_CHECK(keep_masks[l].dim() == 1 && keep_masks[l].size(0) == weights[l].size(0), "gram_penalty: keep_masks[",
                  l, "] must have shape [", weights[l].size(0), "], got ", keep_masks[l].sizes());
      TORCH_CHECK(keep_masks[l].device() == device, "gram_penalty: keep_masks[", l, "] must be on ", device);
    }
  }
  const auto acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = weights[0].options().dtype(acc_dtype);

  // Contiguous N×D views (a copy only for non-contiguous weights) and the gradient outputs.
  std::vector<at::Tensor> rows(L), grads;
  for (int64_t l = 0; l < L; ++l) rows[l] = weights[l].contiguous();
  if (need_grad) {
    grads.reserve(L);
    for (int64_t l = 0; l < L; ++l) grads.push_back(at::empty(weights[l].sizes(), weights[l].options()));
  }

  // Pruned counts and row permutations (pruned rows first) on the host. On CUDA this is the one
  // device→host copy of the call: the N-side shapes depend on |P|.
  at::Tensor keep_host;
  if (!keep_masks.empty()) keep_host = at::cat(keep_masks).to(at::kCPU).contiguous();
  const bool* keep = keep_host.defined() ? keep_host.data_ptr<bool>() : nullptr;

  struct Layer {
    int64_t index, n, D, p, keep_offset;
    Side side;
  };
  std::map<std::tuple<int64_t, int64_t, int64_t, int>, std::vector<Layer>> groups;  // (n, D, p, side)
  int64_t keep_offset = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t n = weights[l].size(0), D = weights[l].numel() / std::max<int64_t>(n, 1);
    int64_t p = 0;
    if (keep && target != Target::kIdentity)
      for (int64_t i = 0; i < n; ++i) p += !keep[keep_offset + i];
    const Side side = choose_side(target, n, D, p, need_grad);
    groups[{n, D, p, static_cast<int>(side)}].push_back({l, n, D, p, keep_offset, side});
    keep_offset += n;
  }

  // The int64 table: per group [perm (B·n), src (B), grad (B), layer (B)].
  int64_t table_size = 0;
  for (auto& [key, layers] : groups)
    if (layers[0].side != Side::kNone) table_size += static_cast<int64_t>(layers.size()) * (layers[0].n + 3);
  at::Tensor table_host = at::empty({std::max<int64_t>(table_size, 1)}, at::TensorOptions().dtype(at::kLong));
  int64_t* tab = table_host.data_ptr<int64_t>();
  std::vector<int64_t> group_offset;
  int64_t off = 0;
  for (auto& [key, layers] : groups) {
    const Layer& first = layers[0];
    if (first.side == Side::kNone) continue;
    group_offset.push_back(off);
    const int64_t B = static_cast<int64_t>(layers.size()), n = first.n;
    for (int64_t b = 0; b < B; ++b) {
      const Layer& ly = layers[b];
      int64_t* perm = tab + off + b * n;
      if (keep && target != Target::kIdentity) {
        int64_t pruned = 0, kept = ly.p;
        for (int64_t i = 0; i < n; ++i) perm[keep[ly.keep_offset + i] ? kept++ : pruned++] = i;
      } else {
        for (int64_t i = 0; i < n; ++i) perm[i] = i;
      }
      tab[off + B * n + b] = reinterpret_cast<int64_t>(rows[ly.index].data_ptr());
      tab[off + B * n + B + b] = need_grad ? reinterpret_cast<int64_t>(grads[ly.index].data_ptr()) : 0;
      tab[off + B * n + 2 * B + b] = ly.index;
    }
    off += B * (n + 3);
  }
  const at::Tensor table = device.is_cpu() ? table_host : table_host.to(device);
  const int64_t* tab_dev = table.data_ptr<int64_t>();

  at::Tensor per_layer = at::zeros({L}, acc_opts);
  size_t gi = 0;
  for (auto& [key, layers] : groups) {
    const Layer& first = layers[0];
    const int64_t B = static_cast<int64_t>(layers.size()), n = first.n, D = first.D, p = first.p, k = n - p;
    const double scale = reduction == "mean" ? 1.0 / (static_cast<double>(n) * n) : 1.0;
    if (first.side == Side::kNone) {  // decorrelate, nothing pruned: E = 0
      if (need_grad)
        for (const Layer& ly : layers) grads[ly.index].zero_();
      continue;
    }
    const int64_t o = group_offset[gi++];
    const GroupTable all{tab_dev + o, tab_dev + o + B * n, tab_dev + o + B * n + B, tab_dev + o + B * n + 2 * B, B, n, D, p};
    const bool decorrelate = target == Target::kDecorrelate, nside = first.side == Side::kN;

    // Runs layers [b0, b0 + nb) of the group.
    auto run = [&](int64_t b0, int64_t nb) {
      const GroupTable t{all.perm + b0 * n, all.src + b0, all.grad + b0, all.layer + b0, nb, n, D, p};

      // Buffers, carved from one workspace: wp = the permuted rows [nb, n, D]; x (and y) = the GEMM
      // products the epilogue reduces; g1, g2 = the unscaled gradient rows [0, split) and [split, n).
      const int64_t x_rows = nside ? (decorrelate ? p : n) : D, x_cols = nside ? n : D;
      const bool has_y = decorrelate && !nside;
      const int64_t split = decorrelate ? p : n;
      const int64_t numel = nb * (n * D + x_rows * x_cols * (has_y ? 2 : 1) + (need_grad ? n * D : 0));
      at::Tensor ws = Kernels::workspace(numel, acc_opts);
      int64_t used = 0;
      auto carve = [&](int64_t rows_, int64_t cols_) {
        at::Tensor v = ws.narrow(0, used, nb * rows_ * cols_).view({nb, rows_, cols_});
        used += nb * rows_ * cols_;
        return v;
      };
      at::Tensor wp = carve(n, D), x = carve(x_rows, x_cols), y = has_y ? carve(x_rows, x_cols) : x;
      at::Tensor g1 = need_grad ? carve(split, D) : at::Tensor(), g2 = need_grad ? carve(n - split, D) : at::Tensor();
      {
        RECORD_FUNCTION("fastreg::gram_penalty::gather_rows", std::vector<c10::IValue>());
        Kernels::gather_rows(t, dtype, wp);
      }
      const at::Tensor WP = wp.narrow(1, 0, p), WK = wp.narrow(1, p, k);
      double kept_coeff = 0.0;
      if (decorrelate && nside) {
        group_mm_out(x, WP, wp.transpose(1, 2));  // A = W_P Wᵀ  [nb, p, n]
        Kernels::template reduce<Term::kDecorrelateNSide>(t, x, y, p, n, scale, per_layer);
        if (need_grad) {
          group_mm_out(g1, x, wp);                                       // A W        → rows P
          if (k > 0) group_mm_out(g2, x.narrow(2, p, k).transpose(1, 2), WP);  // A[:,K]ᵀ W_P → rows K
        }
      } else if (decorrelate) {
        group_mm_out(x, WP.transpose(1, 2), WP);  // S = W_Pᵀ W_P  [nb, D, D]
        if (k > 0) group_mm_out(y, WK.transpose(1, 2), WK);  // R = W_Kᵀ W_K
        else y.zero_();
        Kernels::template reduce<Term::kDecorrelateDSide>(t, x, y, D, D, scale, per_layer);  // y ← T = S + R
        if (need_grad) {
          group_mm_out(g1, WP, y);              // W_P T
          if (k > 0) group_mm_out(g2, WK, x);  // W_K S
        }
      } else if (nside) {  // diagonal / identity
        group_mm_out(x, wp, wp.transpose(1, 2));  // G = W Wᵀ  [nb, n, n]
        Kernels::template reduce<Term::kDiagonalNSide>(t, x, y, n, n, scale, per_layer);  // x ← E
        if (need_grad) group_mm_out(g1, x, wp);                                            // E W
      } else {
        group_mm_out(x, wp.transpose(1, 2), wp);  // S = Wᵀ W  [nb, D, D]
        Kernels::template reduce<Term::kSquares>(t, x, y, D, D, scale, per_layer);
        Kernels::template reduce<Term::kKeptRowNorms>(t, wp, wp, n, D, scale, per_layer);
        if (need_grad) group_mm_out(g1, wp, x);  // W S; the − diag(m) W is added by the scatter
        kept_coeff = 4.0 * scale;
      }
      if (need_grad) {
        RECORD_FUNCTION("fastreg::gram_penalty::scatter_grads", std::vector<c10::IValue>());
        Kernels::scatter_grads(t, dtype, g1, g2, wp, 4.0 * scale, kept_coeff);  // ∇ = scale · 4 E W
      }
    };
    // Small layers: each thread runs a share of the group's layers, single-threaded (no thread
    // synchronisation inside tiny GEMMs and epilogues). Large layers: every op uses all threads.
    if constexpr (Kernels::kSplitSmallGroupsAcrossThreads) {
      if (B > 1 && side_flops(target, first.side, n, D, p, need_grad) < kSmallLayerFlops) {
        at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) { run(b0, b1 - b0); });
        continue;
      }
    }
    run(0, B);
  }
  at::Tensor penalty = reduction == "none" ? per_layer : per_layer.sum();
  return {penalty, grads};
}

}  // namespace fastreg::gram
