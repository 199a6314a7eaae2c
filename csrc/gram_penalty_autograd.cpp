// Autograd of gram_penalty, for every backend: one boxed kernel registered at the Autograd key of
// both namespaces (fastreg:: — the cpp and cuda kernels — and fastreg_triton::).
//
// The op computes the penalty and, in the same pass, ∂penalty_l/∂W_l for every layer (need_grad).
// Those gradients are the op's own outputs and nothing else reads them, so the backward node keeps
// them and its first backward scales them in place by the incoming gradient and hands them on: no
// allocation and one pass over the memory, whatever the number of layers — and no Python on the
// way in or out. A second backward through the same call (retain_graph=True) finds them handed
// on and recomputes them from the saved weights.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <algorithm>

namespace fastreg::gram {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// Positions on the boxed stack: (weights, keep_masks, target, reduction, need_grad) -> (penalty, grads).
enum Arg { kWeights, kMasks, kTarget, kReduction, kNeedGrad, kNumArgs };

// A tensor with real memory: not a fake, functional or other wrapper tensor (torch.compile's tracing
// runs this backward on those).
bool is_real(const at::Tensor& t) {
  constexpr auto kWrappers = c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize});
  return t.has_storage() && (t.key_set() & kWrappers).empty() && !t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
}

// t[l] · scale[l] for every layer. Real tensors are scaled in place: on CUDA with ATen's fused
// multi-tensor kernel; on the CPU with every element of every layer taken as one index range, split
// into equal runs over the threads (ATen's per-tensor kernels would run each layer, all under its
// grain size, on one thread). Traced tensors get the out-of-place op, which functionalization wants
// (the gradients are also outputs of the traced forward).
std::vector<at::Tensor> scale_layers(std::vector<at::Tensor> t, const std::vector<at::Tensor>& scale) {
  if (t.empty()) return t;
  if (!std::all_of(t.begin(), t.end(), is_real) || !is_real(scale[0])) return at::_foreach_mul(t, scale);
  if (!t[0].is_cpu()) {
    at::_foreach_mul_(t, scale);
    return t;
  }
  std::vector<int64_t> start(t.size() + 1, 0);
  for (size_t l = 0; l < t.size(); ++l) start[l + 1] = start[l] + t[l].numel();
  std::vector<double> k(t.size());  // CPU tensors: reading them is no device sync
  for (size_t l = 0; l < t.size(); ++l)
    k[l] = l > 0 && scale[l].is_same(scale[l - 1]) ? k[l - 1] : scale[l].item<double>();
  // An incoming gradient of exactly 1 (the penalty summed into the loss as it is) leaves them as they are.
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
  c10::OperatorHandle op;
  std::vector<SavedVariable> weights;
  std::vector<at::Tensor> masks;
  std::string target, reduction;
  std::vector<at::Tensor> grads;  // unscaled ∂penalty_l/∂W_l until the first backward hands them on

  explicit GramPenaltyBackward(c10::OperatorHandle op_) : op(std::move(op_)) {}
  std::string name() const override { return "GramPenaltyBackward"; }
  void release_variables() override {
    weights.clear();
    grads.clear();
  }

  // ∂penalty_l/∂W_l again, from the saved weights (raises if they were freed or modified in place).
  std::vector<at::Tensor> recompute() {
    TORCH_CHECK(!weights.empty(), "fastreg.gram_penalty: trying to backward through the graph a second time; "
                                  "specify retain_graph=True the first time");
    std::vector<at::Tensor> w;
    w.reserve(weights.size());
    for (auto& s : weights) w.push_back(s.unpack().detach());
    at::AutoDispatchBelowADInplaceOrView guard;
    torch::jit::Stack stack{c10::IValue(w), c10::IValue(masks), c10::IValue(target), c10::IValue(reduction),
                            c10::IValue(true)};
    op.callBoxed(&stack);
    return stack[1].toTensorVector();
  }

  variable_list apply(variable_list&& grad_outputs) override {
    const at::Tensor& g = grad_outputs[0];
    if (!g.defined()) return variable_list(num_outputs());
    std::vector<at::Tensor> out = grads.empty() ? recompute() : std::move(grads);
    grads.clear();
    // The gradient of a 0-d penalty scales every layer alike; that of the [L] vector ("none") layer by layer.
    out = scale_layers(std::move(out), reduction == "none" ? g.unbind() : std::vector<at::Tensor>(out.size(), g));
    for (size_t l = 0; l < out.size(); ++l)
      if (!should_compute_output(l)) out[l] = at::Tensor();
    return out;
  }
};

void gram_penalty_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  auto& args = *stack;
  const size_t base = args.size() - kNumArgs;
  const std::vector<at::Tensor> weights = args[base + kWeights].toTensorVector();
  const bool requires_grad = torch::autograd::compute_requires_grad(at::TensorList(weights));
  if (requires_grad) args[base + kNeedGrad] = c10::IValue(true);  // the backward scales these gradients
  c10::intrusive_ptr<GramPenaltyBackward> node;
  if (requires_grad) {
    node = c10::make_intrusive<GramPenaltyBackward>(op);
    node->set_next_edges(torch::autograd::collect_next_edges(weights));
    node->masks = args[base + kMasks].toTensorVector();
    node->target = args[base + kTarget].toStringRef();
    node->reduction = args[base + kReduction].toStringRef();
    node->weights.reserve(weights.size());
    for (const auto& w : weights) node->weights.emplace_back(w, /*is_output=*/false);
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  if (node) {
    // Outputs now on the stack: (penalty, grads). Only the penalty is differentiable.
    node->grads = args[args.size() - 1].toTensorVector();
    torch::autograd::set_history(args[args.size() - 2].toTensor(), node);
  }
}

}  // namespace
}  // namespace fastreg::gram

TORCH_LIBRARY_IMPL(fastreg, Autograd, m) {
  m.impl("gram_penalty", torch::CppFunction::makeFromBoxedFunction<&fastreg::gram::gram_penalty_autograd>());
}
TORCH_LIBRARY_IMPL(fastreg_triton, Autograd, m) {
  m.impl("gram_penalty", torch::CppFunction::makeFromBoxedFunction<&fastreg::gram::gram_penalty_autograd>());
}
