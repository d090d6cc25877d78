// Autograd of yoda_sparse::ext_masked_l1_loss in C++ (registered at the Autograd key).
//
// Why C++: the Python formula (torch.library.register_autograd) costs a Python autograd
// Function per call: its setup_context in the forward and a Python callback in the backward,
// tens of microseconds that dominated the loss at small images on the CPU.  Here the autograd
// node is a C++ torch::autograd::Function: the forward and the backward each call one
// kernel through the dispatcher (so CPU, CUDA and the fake kernels under torch.compile all go
// the same way), with no Python in between.
//
// The forward calls ext_masked_l1_fwd below the autograd keys (it has its own, Python,
// autograd formula, which must not run here); the backward calls ext_masked_l1_bwd.
//
// On plain CPU tensors with normalize "all" or "sum" the forward instead runs
// ext_masked_l1_fwd_grad, which also writes the gradient for an incoming grad of 1 in the same
// pass over pred, target and mask (the denominator is known before the pass).  loss.backward()
// passes exactly that grad (1), and the backward then only hands the tensor over: one pass over
// memory for forward + backward instead of two, and one parallel region instead of two.  Any
// other incoming grad (or a second backward with retain_graph) falls back to the backward
// kernel, so the results are the same bits either way.  Only on the CPU: reading the incoming
// grad there is free, on a GPU it would be a device sync.
#include "yoda_ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

namespace yoda {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, int64_t)>&
l1_fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("yoda_sparse::ext_masked_l1_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, int64_t)>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                              const at::Tensor&, int64_t)>&
l1_fwd_grad_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("yoda_sparse::ext_masked_l1_fwd_grad", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
  return op;
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&)>&
l1_bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("yoda_sparse::ext_masked_l1_bwd", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&)>();
  return op;
}

// A real CPU tensor whose values can be read here: not a fake or functional tensor that
// torch.compile traces with (Python, Functionalize keys), nor a torch.func wrapper, nor a lazy
// zero / conjugate / negative view.
bool plain_cpu(const at::Tensor& t) {
  static const c10::DispatchKeySet special({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                            c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchBatched,
                                            c10::DispatchKey::FuncTorchGradWrapper,
                                            c10::DispatchKey::BatchedNestedTensor, c10::DispatchKey::ZeroTensor,
                                            c10::DispatchKey::Conjugate, c10::DispatchKey::Negative});
  return t.defined() && t.device().is_cpu() && t.layout() == at::kStrided && !t.key_set().has_any(special);
}

constexpr const char* kGradForOne = "grad_pred_for_grad_1";

class MaskedL1Loss : public torch::autograd::Function<MaskedL1Loss> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& target,
                            const at::Tensor& mask, int64_t normalize, bool fused) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor loss, denom;
    if (fused) {
      at::Tensor grad_pred;
      std::tie(loss, denom, grad_pred) = l1_fwd_grad_op().call(pred, target, mask, normalize);
      ctx->saved_data[kGradForOne] = grad_pred;
    } else {
      std::tie(loss, denom) = l1_fwd_op().call(pred, target, mask, normalize);
    }
    ctx->save_for_backward({pred, target, mask, denom});
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();  // also checks that no input was modified in place
    const at::Tensor &pred = saved[0], &target = saved[1], &mask = saved[2], &denom = saved[3];
    const at::Tensor& grad = grads[0];
    const bool need_pred = ctx->needs_input_grad(0), need_target = ctx->needs_input_grad(1);
    // Double backward (create_graph=True): grad_pred = grad * sign(pred - target) * mask / denom
    // is linear in grad, and its derivative in pred and target is zero almost everywhere.
    // So only the dependence on grad is recorded (an autograd-aware multiply of the unit
    // gradient); pred and target are read below autograd, which leaves them unused in the
    // second-order graph (zero derivative).
    const bool record_grad = at::GradMode::is_enabled() && grad.requires_grad();
    at::Tensor grad_pred;
    if (need_pred || need_target) {
      const auto fused = ctx->saved_data.find(kGradForOne);
      if (fused != ctx->saved_data.end() && fused->second.isTensor() && !record_grad && plain_cpu(grad) &&
          grad.item<double>() == 1.0) {
        // Hand the forward's gradient over (dropping our reference lets AccumulateGrad keep
        // it as .grad without a copy); a later backward (retain_graph) recomputes it.
        grad_pred = fused->second.toTensor();
        fused->second = c10::IValue();
      } else {
        {
          at::AutoDispatchBelowADInplaceOrView below_autograd;
          grad_pred = l1_bwd_op().call(record_grad ? at::ones_like(grad) : grad, pred, target, mask, denom);
        }
        if (record_grad) grad_pred = grad_pred * grad;
      }
    }
    // grad_target = -grad_pred is formed only when target needs a gradient (it rarely does:
    // the target is the true noise), which saves a full-size write in training.
    return {need_pred ? grad_pred : at::Tensor(), need_target ? -grad_pred : at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor masked_l1_loss_autograd(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& mask,
                                   int64_t normalize) {
  // Fuse the gradient into the forward only where it will be used (a graph is recorded) and
  // can be handed over cheaply (plain CPU tensors), for the normalizations whose denominator is
  // known before the pass.
  const bool fused = normalize != kNormActive && at::GradMode::is_enabled() &&
                     (pred.requires_grad() || target.requires_grad()) && plain_cpu(pred) && plain_cpu(target) &&
                     plain_cpu(mask);
  return MaskedL1Loss::apply(pred, target, mask, normalize, fused);
}

}  // namespace yoda
