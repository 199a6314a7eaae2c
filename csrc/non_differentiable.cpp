// Autograd kernels of the ops that return tensors but take no gradient (group_norms,
// group_norms_flat, group_saliency), for both namespaces: run the op below autograd. Their outputs
// then never require grad, whatever the inputs do, and a call on a model's trainable weights needs no
// torch.no_grad() around it nor builds a graph node that would only raise in backward. (PyTorch's
// advice for non-differentiable custom ops; opcheck's autograd-registration test asks for it.)
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

namespace fastreg {
namespace {

void below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace
}  // namespace fastreg

#define FASTREG_NON_DIFFERENTIABLE(NS)                                                            \
  TORCH_LIBRARY_IMPL(NS, Autograd, m) {                                                           \
    for (const char* name : {"group_norms", "group_norms_flat", "group_saliency"})                \
      m.impl(name, torch::CppFunction::makeFromBoxedFunction<&fastreg::below_autograd>());         \
  }
FASTREG_NON_DIFFERENTIABLE(fastreg)
FASTREG_NON_DIFFERENTIABLE(fastreg_triton)
