// fastreg::SlicePlan — the lists of a fastreg.PrunedSlices plan (tensors, keep masks, dims) or of a
// fastreg.CoupledGroups plan (tensors, dims, group ids), or BatchNorm weights alone (the slimming
// term of fastreg.torch_pruning.BNScalePruner), held in C++. A step calls one method with its
// coefficient (and a CoupledGroups step its pruned-group mask) only: no list of tensors crosses from
// Python, and the parameters' .grad are read here. Each method calls the op itself through the
// dispatcher, so the kernel of the tensors' device runs and checks every argument as on any other
// call; what the plan saves is the Python side: reading 165 .grad and passing 3 × 165 tensors cost
// 70–190 µs per call on ResNet-56's convs, BN γ and β here, 10–25% of the call.
// (A plan for group_norms saved nothing: over 55 one-element tensors it took 29–44 µs per call, the op
// called from Python 28–42 µs.)
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace fastreg {
namespace {

// (Tensor(a!)[] grads, Tensor[] params, Tensor[] keep_masks, int[] dims, float c, Tensor? c_tensor) -> ()
using MaskedGrad = void(at::TensorList, at::TensorList, at::TensorList, at::IntArrayRef, double,
                        const std::optional<at::Tensor>&);
// (Tensor(a!)[] grads, Tensor[] params, int[] dims, Tensor[] group_ids, Tensor pruned_groups, float lam,
//  Tensor? lam_tensor) -> ()
using GroupedLasso = void(at::TensorList, at::TensorList, at::IntArrayRef, at::TensorList, const at::Tensor&, double,
                          const std::optional<at::Tensor>&);
// (Tensor(a!)[] grads, Tensor[] bn_weights, float s, Tensor? s_tensor) -> ()
using Slimming = void(at::TensorList, at::TensorList, double, const std::optional<at::Tensor>&);
// (Tensor(a!)[] tensors, Tensor[] keep_masks, int[] dims, float factor, Tensor? factor_tensor) -> ()
using Shrink = void(at::TensorList, at::TensorList, at::IntArrayRef, double, const std::optional<at::Tensor>&);

template <class Signature>
c10::TypedOperatorHandle<Signature> fastreg_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

struct SlicePlan : torch::CustomClassHolder {
  // keep_masks[i] (PrunedSlices) or group_ids[i] (CoupledGroups) runs along dims[i] of tensors[i];
  // a plan holds one of the two lists, the other is empty.
  std::vector<at::Tensor> tensors, keep_masks, group_ids;
  std::vector<int64_t> dims;

  SlicePlan(std::vector<at::Tensor> tensors_, std::vector<at::Tensor> keep_masks_, std::vector<int64_t> dims_,
            std::vector<at::Tensor> group_ids_)
      : tensors(std::move(tensors_)),
        keep_masks(std::move(keep_masks_)),
        group_ids(std::move(group_ids_)),
        dims(std::move(dims_)) {}

  // p.grad[pruned] += c · c_tensor · p[pruned]
  void l2_grad_(double c, const std::optional<at::Tensor>& c_tensor) const {
    static const auto op = fastreg_op<MaskedGrad>("fastreg::l2_grad_");
    masked_grad(op, c, c_tensor);
  }
  // grad[g] += λ · w_g / ‖w_g‖₂ for every pruned slice g
  void group_lasso_grad_(double lam, const std::optional<at::Tensor>& lam_tensor) const {
    static const auto op = fastreg_op<MaskedGrad>("fastreg::group_lasso_grad_");
    masked_grad(op, lam, lam_tensor);
  }
  // grad[slice] += λ · slice / ‖w_g‖₂ over every slice of every group g with pruned_groups[g]
  void group_lasso_grad_grouped_(const at::Tensor& pruned_groups, double lam,
                                 const std::optional<at::Tensor>& lam_tensor) const {
    static const auto op = fastreg_op<GroupedLasso>("fastreg::group_lasso_grad_grouped_");
    const auto grads = grads_of_tensors();
    const at::NoGradGuard no_grad;
    op.call(grads, tensors, dims, group_ids, pruned_groups, lam, lam_tensor);
  }
  // Network slimming over the tensors (BatchNorm weights γ) that have a .grad, the others skipped:
  // γ.grad += s · s_tensor · sign(γ). (53 BatchNorms of ResNet-50: the call from Python passes no list.)
  void slimming_grad_(double s, const std::optional<at::Tensor>& s_tensor) const {
    static const auto op = fastreg_op<Slimming>("fastreg::slimming_grad_");
    std::vector<at::Tensor> grads, with_grad;
    grads.reserve(tensors.size());
    for (const auto& t : tensors)
      if (auto g = t.grad(); g.defined()) grads.push_back(std::move(g));
    if (grads.size() < tensors.size()) {
      for (const auto& t : tensors)
        if (t.grad().defined()) with_grad.push_back(t);
    }
    if (grads.empty()) return;
    const at::NoGradGuard no_grad;
    op.call(grads, grads.size() < tensors.size() ? at::TensorList(with_grad) : at::TensorList(tensors), s, s_tensor);
  }
  // t[pruned] *= factor · factor_tensor
  void shrink_(double factor, const std::optional<at::Tensor>& factor_tensor) const {
    static const auto op = fastreg_op<Shrink>("fastreg::shrink_");
    const at::NoGradGuard no_grad;
    op.call(tensors, keep_masks, dims, factor, factor_tensor);
  }

 private:
  std::vector<at::Tensor> grads_of_tensors() const {
    std::vector<at::Tensor> grads;
    grads.reserve(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
      grads.push_back(tensors[i].grad());
      TORCH_CHECK_VALUE(grads.back().defined(), "fastreg: params[", i,
                  "].grad is None: call backward() first (or the parameter is unused)");
    }
    return grads;
  }
  void masked_grad(const c10::TypedOperatorHandle<MaskedGrad>& op, double c,
                   const std::optional<at::Tensor>& c_tensor) const {
    const auto grads = grads_of_tensors();
    const at::NoGradGuard no_grad;
    op.call(grads, tensors, keep_masks, dims, c, c_tensor);
  }
};

}  // namespace
}  // namespace fastreg

TORCH_LIBRARY_FRAGMENT(fastreg, m) {
  m.class_<fastreg::SlicePlan>("SlicePlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>, std::vector<at::Tensor>>())
      .def("l2_grad_", &fastreg::SlicePlan::l2_grad_)
      .def("group_lasso_grad_", &fastreg::SlicePlan::group_lasso_grad_)
      .def("group_lasso_grad_grouped_", &fastreg::SlicePlan::group_lasso_grad_grouped_)
      .def("slimming_grad_", &fastreg::SlicePlan::slimming_grad_)
      .def("shrink_", &fastreg::SlicePlan::shrink_);
}
