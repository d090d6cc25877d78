// Op schemas of the yoda-sparse C++/CUDA extension and their CPU/CUDA kernels.
//
// FRAGMENT, not TORCH_LIBRARY: Python registers other ops in the same `yoda_sparse` namespace.
// The fake (meta) kernels are registered from Python (yoda_sparse/ops/cpp_backend.py), as
// pytorch/extension-cpp does.  The loss the public op calls, ext_masked_l1_loss, has its
// autograd in C++ (yoda_autograd.cpp); the lower-level ext_masked_l1_fwd keeps a Python formula.
#include <Python.h>
#include <torch/library.h>

#include "gemm_cpu.h"
#include "yoda_ops.h"

extern "C" {
// `import yoda_sparse._C` only has to load the library (the static initialisers below register
// the ops); a module without methods avoids pybind11 and keeps the build fast.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "yoda-sparse C++/CUDA ops (registered as torch.ops.yoda_sparse.ext_*)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {
// ext_masked_l1_loss below autograd (no gradient needed, e.g. under torch.inference_mode): the
// forward kernel's loss.
at::Tensor masked_l1_loss_cpu(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& mask,
                              int64_t normalize) {
  return std::get<0>(yoda::masked_l1_fwd_cpu(pred, target, mask, normalize));
}

#ifdef YODA_WITH_CUDA
at::Tensor masked_l1_loss_cuda(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& mask,
                               int64_t normalize) {
  return std::get<0>(yoda::masked_l1_fwd_cuda(pred, target, mask, normalize));
}
#endif
}  // namespace

TORCH_LIBRARY_FRAGMENT(yoda_sparse, m) {
  // Eq. 10, differentiable in pred and target (autograd in C++: one forward kernel, one backward
  // kernel, no Python in the autograd graph); the public masked_l1_loss calls this one.
  m.def("ext_masked_l1_loss(Tensor pred, Tensor target, Tensor mask, int normalize) -> Tensor");
  // Eq. 10 forward: (loss in pred's dtype, denominator in the accumulation dtype);
  // normalize: 0 = "all", 1 = "active", 2 = "sum".
  m.def("ext_masked_l1_fwd(Tensor pred, Tensor target, Tensor mask, int normalize) -> (Tensor, Tensor)");
  // Eq. 10 backward: grad_pred = grad * sign(pred - target) * mask / denom (sign(0) = 0);
  // grad_target = -grad_pred is formed only when target needs a gradient (it rarely does: the
  // target is the true noise), which saves a full-size write in training.
  m.def("ext_masked_l1_bwd(Tensor grad, Tensor pred, Tensor target, Tensor mask, Tensor denom) -> Tensor");
  // CPU only: the forward plus, in the same pass, grad_pred for an incoming grad of 1
  // (= ext_masked_l1_bwd(1, ...), same bits); normalize 0 ("all") or 2 ("sum") only, whose
  // denominator is known before the pass.  ext_masked_l1_loss's autograd uses it on the CPU.
  m.def("ext_masked_l1_fwd_grad(Tensor pred, Tensor target, Tensor mask, int normalize) -> (Tensor, Tensor, Tensor)");
  // Eq. 11-14, one masked reverse step; noise None -> Philox noise from (seed, offset).
  // params: float64 CPU [9] = sqrt_recip_ac, sqrt_recipm1_ac, coef1, coef2, sigma, lr_scale,
  // lr_sigma, clip_lo, clip_hi (a tensor, not float[]: under torch.compile these are traced
  // SymFloats, which float[] cannot take); seed/offset are SymInt for the same reason.
  m.def(
      "ext_yoda_step(Tensor z, Tensor eps, Tensor? x_bar, Tensor mask, Tensor? noise, Tensor? lr_noise, SymInt seed, "
      "SymInt offset, Tensor params, bool clip_x0) -> Tensor");
  // Tile-sparse convolution, in place in `out`'s listed tiles (yoda_sparse/ops/sparse_conv.py):
  // tiles int32 [N, 3] (b, tile_row, tile_col), the first `count` used; padding_mode 0 zeros /
  // 1 reflect; act, out_act 0 none / 1 silu / 2 mish; accumulate adds the result to out.
  m.def(
      "ext_sparse_conv2d(Tensor x, Tensor? x2, Tensor weight, Tensor? bias, Tensor tiles, Tensor? count, "
      "Tensor(a!) out, int[] tile, int stride, int padding, int padding_mode, int upsample, bool transposed, "
      "Tensor? norm_mean, Tensor? norm_rstd, Tensor? norm_weight, Tensor? norm_bias, int act, int out_act, "
      "Tensor? add, Tensor? residual, bool accumulate) -> ()");
  // Group-norm statistics of cat(x, x2) along channels: (mean, 1/sqrt(var + eps)) per
  // (image, group), float32 (float64 for float64 maps); with per-pixel weights, weighted
  // moments. The sparse engine's "current" and "probed" norms.
  m.def("ext_group_stats(Tensor x, Tensor? x2, int groups, float eps, Tensor? weight=None) -> (Tensor, Tensor)");
  // Bytes of the CPU sparse convolution's packed weights (gemm_cpu.h) whose weight tensors are
  // alive: memory the pixel layout holds beside the model's own weights.
  m.def("ext_packed_weight_bytes() -> int", []() -> int64_t { return yoda::cpu_gemm::packed_bytes(); });
}

TORCH_LIBRARY_IMPL(yoda_sparse, Autograd, m) {
  m.impl("ext_masked_l1_loss", &yoda::masked_l1_loss_autograd);
}

TORCH_LIBRARY_IMPL(yoda_sparse, CPU, m) {
  m.impl("ext_masked_l1_loss", &masked_l1_loss_cpu);
  m.impl("ext_masked_l1_fwd", &yoda::masked_l1_fwd_cpu);
  m.impl("ext_masked_l1_bwd", &yoda::masked_l1_bwd_cpu);
  m.impl("ext_masked_l1_fwd_grad", &yoda::masked_l1_fwd_grad_cpu);
  m.impl("ext_yoda_step", &yoda::yoda_step_cpu);
  m.impl("ext_sparse_conv2d", &yoda::sparse_conv2d_cpu);
  m.impl("ext_group_stats", &yoda::group_stats_cpu);
}

#ifdef YODA_WITH_CUDA
TORCH_LIBRARY_IMPL(yoda_sparse, CUDA, m) {
  m.impl("ext_masked_l1_loss", &masked_l1_loss_cuda);
  m.impl("ext_masked_l1_fwd", &yoda::masked_l1_fwd_cuda);
  m.impl("ext_masked_l1_bwd", &yoda::masked_l1_bwd_cuda);
  m.impl("ext_yoda_step", &yoda::yoda_step_cuda);
  m.impl("ext_sparse_conv2d", &yoda::sparse_conv2d_cuda);
}
#endif
