// fastreg::gram_penalty and fastreg_triton::gram_penalty — the differentiable penalty — over the
// backends' kernel op <namespace>::gram_penalty_and_grads, which computes the penalty and, in the
// same pass, ∂penalty_l/∂W_l for every layer (need_grad). Two boxed kernels, registered for both
// namespaces: the Autograd one, and a CompositeExplicitAutograd one for calls below autograd
// (inference mode), which asks for no gradients.
//
// The gradients the kernel op returns are held by the backward node only, so its first backward
// scales them in place by the incoming gradient (or leaves them as they are when it is exactly 1) and
// hands them on: no allocation and at most one pass over the memory, whatever the number of layers,
// and no Python on the way in or out. A second backward through the same call (retain_graph=True)
// finds them handed on and recomputes them from the saved weights.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <utility>

namespace fastreg::gram {
namespace {

using torch::autograd::variable_list;

// A new autograd node, held as the installed torch holds nodes: c10::intrusive_ptr in recent releases
// (2.13, 2.14), std::shared_ptr in older ones (2.11).
template <class T, class... Args>
auto make_node(Args&&... args) {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, torch::autograd::Node>) {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  } else {
    return std::make_shared<T>(std::forward<Args>(args)...);
  }
}

// gram_penalty's arguments on the boxed stack: (weights, keep_masks, target, reduction, coeff) -> penalty.
enum Arg { kWeights, kMasks, kTarget, kReduction, kCoeff, kNumArgs };

// <namespace>::gram_penalty_and_grads for the <namespace>::gram_penalty being called.
const c10::OperatorHandle& kernel_op_of(const c10::OperatorHandle& op) {
  static const auto fastreg = c10::Dispatcher::singleton().findSchemaOrThrow("fastreg::gram_penalty_and_grads", "");
  static const auto triton = c10::Dispatcher::singleton().findSchemaOrThrow("fastreg_triton::gram_penalty_and_grads", "");
  return op.schema().name().rfind("fastreg_triton::", 0) == 0 ? triton : fastreg;
}

// kernel(weights, keep_masks, target, reduction, coeff, need_grad) -> (penalty, grads), below autograd.
std::pair<at::Tensor, std::vector<at::Tensor>> call_kernel(const c10::OperatorHandle& kernel, c10::IValue weights,
                                                           c10::IValue masks, c10::IValue target,
                                                           c10::IValue reduction, double coeff, bool need_grad) {
  at::AutoDispatchBelowADInplaceOrView guard;
  torch::jit::Stack stack{std::move(weights), std::move(masks), std::move(target), std::move(reduction),
                          c10::IValue(coeff), c10::IValue(need_grad)};
  kernel.callBoxed(&stack);
  return {stack[0].toTensor(), stack[1].toTensorVector()};
}

// A tensor with real memory: not a fake, functional or other wrapper tensor (torch.compile's tracing
// runs this backward on those).
bool is_real(const at::Tensor& t) {
  constexpr auto kWrappers = c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize});
  return t.has_storage() && (t.key_set() & kWrappers).empty() && !t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
}

// t[l] · g (0-d g), or t[l] · g[l] (g of shape [L], reduction "none"), for every layer. Real tensors
// are scaled in place: on CUDA with one multi-tensor multiply by the device tensor g (no host read of
// it: a backward never syncs), _foreach_mul_(TensorList, Tensor); on the CPU, g read through its data
// pointer (no dispatcher call) and every element of every layer taken as one index range, split into
// equal runs over the threads (ATen's per-tensor kernels would run each layer, all under its grain
// size, on one thread), nothing at all when g is exactly 1 (the penalty summed into the loss as it is).
// Traced tensors get the out-of-place op, which functionalization wants (the gradients are also
// outputs of the traced forward).
std::vector<at::Tensor> scale_layers(std::vector<at::Tensor> t, const at::Tensor& g, bool per_layer) {
  if (t.empty()) return t;
  if (!std::all_of(t.begin(), t.end(), is_real) || !is_real(g))
    return per_layer ? at::_foreach_mul(t, g.unbind()) : at::_foreach_mul(t, g);
  if (!t[0].is_cpu() || !g.is_cpu()) {
    if (per_layer) at::_foreach_mul_(t, g.unbind());
    else at::_foreach_mul_(t, g);
    return t;
  }
  std::vector<int64_t> start(t.size() + 1, 0);
  for (size_t l = 0; l < t.size(); ++l) start[l + 1] = start[l] + t[l].numel();
  std::vector<double> k(t.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gram_penalty_backward_scale", [&] {
    const scalar_t* v = g.const_data_ptr<scalar_t>();
    for (size_t l = 0; l < t.size(); ++l) k[l] = static_cast<double>(per_layer ? v[l * g.stride(0)] : v[0]);
  });
  if (std::all_of(k.begin(), k.end(), [](double v) { return v == 1.0; })) return t;
  at::parallel_for(0, start.back(), int64_t{1} << 15, [&](int64_t begin, int64_t end) {
    size_t l = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    for (; l < t.size() && start[l] < end; ++l) {
      const int64_t lo = std::max(begin, start[l]) - start[l], hi = std::min(end, start[l + 1]) - start[l];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t[l].scalar_type(), "gram_penalty_backward", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        scalar_t* p = t[l].data_ptr<scalar_t>();
        const auto kl = static_cast<opmath_t>(k[l]);
        for (int64_t i = lo; i < hi; ++i) p[i] = static_cast<scalar_t>(static_cast<opmath_t>(p[i]) * kl);
      });
    }
  });
  return t;
}

struct GramPenaltyBackward : public torch::autograd::Node {
  c10::OperatorHandle kernel;
  // The weights and their versions (for a recompute): plain references, not SavedVariables — they
  // are leaves in practice, and a SavedVariable per layer per step costs more than the checks.
  std::vector<at::Tensor> weights;
  std::vector<uint32_t> versions;
  std::vector<at::Tensor> masks;
  std::string target, reduction;
  double coeff = 1.0;
  std::vector<at::Tensor> grads;  // unscaled ∂penalty_l/∂W_l until the first backward hands them on

  explicit GramPenaltyBackward(c10::OperatorHandle kernel_) : kernel(std::move(kernel_)) {}
  std::string name() const override { return "GramPenaltyBackward"; }
  void release_variables() override {
    weights.clear();
    grads.clear();
  }

  // As autograd's saved tensors: a weight modified in place since the forward raises (the gradients
  // computed with the penalty would still be right for the forward's values, but such a step is most
  // likely a mistake, and the reference backend's autograd raises there too).
  // Only the weights whose gradient this backward asks for (a frozen one, or one left out of
  // autograd.grad's inputs, may change freely).
  void check_versions() {
    for (size_t l = 0; l < weights.size(); ++l)
      TORCH_CHECK(!task_should_compute_output(l) || weights[l]._version() == versions[l], "fastreg.gram_penalty: weights[", l,
                  "] needed for the gradient has been modified by an inplace operation since the forward");
  }

  // ∂penalty_l/∂W_l again, from the saved weights (raises if they were freed or modified in place).
  std::vector<at::Tensor> recompute() {
    TORCH_CHECK(!weights.empty(), "fastreg.gram_penalty: trying to backward through the graph a second time; "
                                  "specify retain_graph=True the first time");
    check_versions();
    std::vector<at::Tensor> w;
    w.reserve(weights.size());
    for (size_t l = 0; l < weights.size(); ++l) w.push_back(weights[l].detach());
    return call_kernel(kernel, c10::IValue(w), c10::IValue(masks), c10::IValue(target), c10::IValue(reduction), coeff,
                       true)
        .second;
  }

  variable_list apply(variable_list&& grad_outputs) override {
    const at::Tensor& g = grad_outputs[0];
    if (!g.defined()) return variable_list(num_outputs());
    // The gradients it hands on are constants to autograd: a gradient of them would be silently wrong.
    TORCH_CHECK(!torch::autograd::GradMode::is_enabled() || !is_real(g),
                "fastreg.gram_penalty: double backward (create_graph=True) is not supported; the gradients "
                "it returns are not differentiable");
    if (!grads.empty()) check_versions();
    std::vector<at::Tensor> out = grads.empty() ? recompute() : std::move(grads);
    grads.clear();
    // The gradient of a 0-d penalty scales every layer alike; that of the [L] vector ("none") layer by layer.
    out = scale_layers(std::move(out), g, reduction == "none");
    for (size_t l = 0; l < out.size(); ++l)
      if (!should_compute_output(l)) out[l] = at::Tensor();
    return out;
  }
};

void gram_penalty_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  auto args = torch::jit::last(*stack, kNumArgs).vec();
  torch::jit::drop(*stack, kNumArgs);
  const std::vector<at::Tensor> weights = args[kWeights].toTensorVector();
  const c10::OperatorHandle& kernel = kernel_op_of(op);
  // Forward-mode AD (torch.func.jvp, forward_ad.make_dual) has no formula here: raise rather than
  // hand back no tangent (which reads as a tangent of 0).
  for (size_t l = 0; l < weights.size(); ++l)
    TORCH_CHECK(!weights[l]._fw_grad(/*level=*/0).defined(), "fastreg.gram_penalty: weights[", l,
                "] carries a forward-mode AD tangent, which this backend does not support; use backend='reference'");
  if (!torch::autograd::compute_requires_grad(at::TensorList(weights))) {
    stack->push_back(
        call_kernel(kernel, args[kWeights], args[kMasks], args[kTarget], args[kReduction], args[kCoeff].toDouble(), false)
            .first);
    return;
  }
  auto node = make_node<GramPenaltyBackward>(kernel);
  node->set_next_edges(torch::autograd::collect_next_edges(weights));
  node->masks = args[kMasks].toTensorVector();
  node->target = args[kTarget].toStringRef();
  node->reduction = args[kReduction].toStringRef();
  node->coeff = args[kCoeff].toDouble();
  node->weights = weights;
  node->versions.reserve(weights.size());
  for (const auto& w : weights) node->versions.push_back(w._version());
  auto [penalty, grads] =
      call_kernel(kernel, args[kWeights], args[kMasks], args[kTarget], args[kReduction], node->coeff, true);
  node->grads = std::move(grads);
  torch::autograd::set_history(penalty, node);
  stack->push_back(std::move(penalty));
}

// Below autograd (inference mode, or autograd excluded): the penalty alone.
void gram_penalty_no_grad(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  auto args = torch::jit::last(*stack, kNumArgs).vec();
  torch::jit::drop(*stack, kNumArgs);
  stack->push_back(call_kernel(kernel_op_of(op), args[kWeights], args[kMasks], args[kTarget], args[kReduction],
                               args[kCoeff].toDouble(), false)
                       .first);
}

// gram_penalty_grad_ (the in-place op) under autograd: below it, then a version bump of every gradient
// it wrote, as PyTorch's own in-place ops do. Its penalty never requires grad.
void gram_penalty_grad_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  constexpr size_t kGrads = 2, kNumGradArgs = 7;
  const std::vector<at::Tensor> grads = torch::jit::peek(*stack, kGrads, kNumGradArgs).toTensorVector();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& g : grads) torch::autograd::increment_version(g);
}

}  // namespace
}  // namespace fastreg::gram

#define FASTREG_GRAM_PENALTY_IMPLS(NS)                                                                    \
  TORCH_LIBRARY_IMPL(NS, Autograd, m) {                                                                   \
    m.impl("gram_penalty", torch::CppFunction::makeFromBoxedFunction<&fastreg::gram::gram_penalty_autograd>()); \
    m.impl("gram_penalty_grad_",                                                                          \
           torch::CppFunction::makeFromBoxedFunction<&fastreg::gram::gram_penalty_grad_autograd>());      \
  }                                                                                                       \
  TORCH_LIBRARY_IMPL(NS, CompositeExplicitAutograd, m) {                                                  \
    m.impl("gram_penalty", torch::CppFunction::makeFromBoxedFunction<&fastreg::gram::gram_penalty_no_grad>()); \
  }
FASTREG_GRAM_PENALTY_IMPLS(fastreg)
FASTREG_GRAM_PENALTY_IMPLS(fastreg_triton)
