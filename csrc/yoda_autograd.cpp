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

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&)>&
l1_bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("yoda_sparse::ext_masked_l1_bwd", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&)>();
  return op;
}

class MaskedL1Loss : public torch::autograd::Function<MaskedL1Loss> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& target,
                            const at::Tensor& mask, int64_t normalize) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, denom] = l1_fwd_op().call(pred, target, mask, normalize);
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
      {
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        grad_pred = l1_bwd_op().call(record_grad ? at::ones_like(grad) : grad, pred, target, mask, denom);
      }
      if (record_grad) grad_pred = grad_pred * grad;
    }
    // grad_target = -grad_pred is formed only when target needs a gradient (it rarely does:
    // the target is the true noise), which saves a full-size write in training.
    return {need_pred ? grad_pred : at::Tensor(), need_target ? -grad_pred : at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

at::Tensor masked_l1_loss_autograd(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& mask,
                                   int64_t normalize) {
  return MaskedL1Loss::apply(pred, target, mask, normalize);
}

}  // namespace yoda
