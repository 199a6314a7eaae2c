// Autograd kernels of the ops that take no gradient, for both namespaces. Each runs its op below
// autograd:
// - the ops that return tensors (group_norms, group_norms_flat, group_saliency): their outputs then
//   never require grad, whatever the inputs do, and a call on a model's trainable weights needs no
//   torch.no_grad() around it nor builds a graph node that would only raise in backward. (PyTorch's
//   advice for non-differentiable custom ops; opcheck's autograd-registration test asks for it.)
// - the in-place ops (l2_grad_, shrink_, group_lasso_grad_, group_lasso_grad_grouped_, slimming_grad_):
//   then every tensor their schema marks as written (Tensor(a!)[]) gets its version bumped, as
//   PyTorch's own in-place ops do, so that a backward through a graph that saved one of them raises
//   "modified by an inplace operation" instead of computing with the new values.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <vector>

namespace fastreg {
namespace {

void below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

// below_autograd, then a version bump of every tensor of every argument the schema marks as written.
void mutate_below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const auto in = torch::jit::last(*stack, args.size());
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i].alias_info() == nullptr || !args[i].alias_info()->isWrite()) continue;
    if (in[i].isTensorList()) {
      for (const at::Tensor& t : in[i].toTensorList()) written.push_back(t);
    } else if (in[i].isTensor()) {
      written.push_back(in[i].toTensor());
    }
  }
  below_autograd(op, keys, stack);
  for (const at::Tensor& t : written) torch::autograd::increment_version(t);
}

}  // namespace
}  // namespace fastreg

#define FASTREG_NON_DIFFERENTIABLE(NS)                                                                          \
  TORCH_LIBRARY_IMPL(NS, Autograd, m) {                                                                         \
    for (const char* name : {"group_norms", "group_norms_flat", "group_saliency"})                              \
      m.impl(name, torch::CppFunction::makeFromBoxedFunction<&fastreg::below_autograd>());                       \
    for (const char* name :                                                                                     \
         {"l2_grad_", "shrink_", "group_lasso_grad_", "group_lasso_grad_grouped_", "slimming_grad_"})            \
      m.impl(name, torch::CppFunction::makeFromBoxedFunction<&fastreg::mutate_below_autograd>());                \
  }
FASTREG_NON_DIFFERENTIABLE(fastreg)
FASTREG_NON_DIFFERENTIABLE(fastreg_triton)

// The per-group coefficient ops (Torch-Pruning's regularizing pruners), as above.
#define FASTREG_NON_DIFFERENTIABLE_GROUPED(NS)                                                                  \
  TORCH_LIBRARY_IMPL(NS, Autograd, m) {                                                                         \
    for (const char* name : {"group_sq_sums", "group_norm_gamma"})                                              \
      m.impl(name, torch::CppFunction::makeFromBoxedFunction<&fastreg::below_autograd>());                       \
    m.impl("l2_grad_grouped_", torch::CppFunction::makeFromBoxedFunction<&fastreg::mutate_below_autograd>());     \
  }
FASTREG_NON_DIFFERENTIABLE_GROUPED(fastreg)
FASTREG_NON_DIFFERENTIABLE_GROUPED(fastreg_triton)
