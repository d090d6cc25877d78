// yoda-sparse C++/CUDA ops: declarations and the input checks shared by the CPU and CUDA
// implementations.  The op schemas live in bindings.cpp; the math is documented in
// yoda_sparse/ops/reference.py (the truth every kernel is tested against).
//
// Layout: every kernel reads its inputs through their own [B,C,H,W] strides (any view works
// without a copy; rows with unit inner stride take the vectorised path).  Outputs are
// channels_last when the first input is channels_last (and not also NCHW-contiguous), else
// NCHW-contiguous; the Python fake kernels follow the same rule.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

namespace yoda {

// normalize argument of masked_l1_fwd (order of reference.NORMALIZATIONS)
enum Normalize : int64_t { kNormAll = 0, kNormActive = 1, kNormSum = 2 };

// Order of yoda_step's `params` (a float64 CPU tensor, so that torch.compile can pass the
// step's scalars as traced values instead of constants).
enum Param : int {
  kSqrtRecipAc = 0,
  kSqrtRecipm1Ac,
  kCoef1,
  kCoef2,
  kSigma,
  kLrScale,
  kLrSigma,
  kClipLo,
  kClipHi,
  kNumParams
};

struct StepScalars {
  double v[kNumParams];
};

// The step's scalars in the kernels' accumulation type (shared by the CPU and CUDA kernels):
// x0 = clamp(a z - b eps, lo, hi); z_sr = c1 x0 + c2 z + sigma n; z_lr = lr_scale x_bar + lr_sigma n_lr.
template <typename acc_t>
struct StepCoeffs {
  acc_t a, b, c1, c2, sigma, lr_scale, lr_sigma, lo, hi;
};

// +-inf clamp bounds when clip_x0 is off, so the kernels clamp unconditionally.
template <typename acc_t>
inline StepCoeffs<acc_t> step_coeffs(const StepScalars& sc, bool clip_x0) {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  return {static_cast<acc_t>(sc.v[kSqrtRecipAc]), static_cast<acc_t>(sc.v[kSqrtRecipm1Ac]),
          static_cast<acc_t>(sc.v[kCoef1]),       static_cast<acc_t>(sc.v[kCoef2]),
          static_cast<acc_t>(sc.v[kSigma]),       static_cast<acc_t>(sc.v[kLrScale]),
          static_cast<acc_t>(sc.v[kLrSigma]),
          clip_x0 ? static_cast<acc_t>(sc.v[kClipLo]) : -inf,
          clip_x0 ? static_cast<acc_t>(sc.v[kClipHi]) : inf};
}

struct Strides4 {
  int64_t b, c, h, w;
};

inline Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::MemoryFormat output_format(const at::Tensor& like) {
  return (like.is_contiguous(at::MemoryFormat::ChannelsLast) && !like.is_contiguous())
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

inline void check_image(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a tensor");
  TORCH_CHECK(t.dim() == 4, name, " must have shape [B, C, H, W], got ", t.sizes());
  TORCH_CHECK(is_supported_float(t.scalar_type()), name,
              " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  for (int d = 0; d < 4; ++d) {
    TORCH_CHECK(t.size(d) < (int64_t(1) << 31), name, " dimension ", d, " is too large: ", t.size(d));
  }
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.defined(), name, " must be a tensor");
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ", ref.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref_name, "'s device (", ref.device(), "), got ",
              t.device());
}

inline void check_mask(const at::Tensor& mask, const at::Tensor& ref) {
  TORCH_CHECK(mask.defined(), "mask must be a tensor");
  TORCH_CHECK(mask.scalar_type() == at::kBool || is_supported_float(mask.scalar_type()),
              "mask must be bool or floating, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 4 && mask.size(0) == ref.size(0) && mask.size(1) == 1 && mask.size(2) == ref.size(2) &&
                  mask.size(3) == ref.size(3),
              "mask must have shape [B, 1, H, W] = [", ref.size(0), ", 1, ", ref.size(2), ", ", ref.size(3),
              "], got ", mask.sizes());
  TORCH_CHECK(mask.device() == ref.device(), "mask must be on the images' device (", ref.device(), "), got ",
              mask.device());
}

// Loss masks are read as bool or as the accumulation type; another float dtype is converted
// once ([B,1,H,W], 1/C of the image traffic; never per channel).
inline at::Tensor loss_mask(const at::Tensor& mask, at::ScalarType acc) {
  const auto t = mask.scalar_type();
  return (t == at::kBool || t == acc) ? mask : mask.to(acc);
}

// Step masks are binary: a float mask means "nonzero is active" (as the reference's mask != 0).
inline at::Tensor step_mask(const at::Tensor& mask) {
  return mask.scalar_type() == at::kBool ? mask : mask.ne(0);
}

inline void check_loss_inputs(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& mask) {
  check_image(pred, "pred");
  check_like(target, pred, "target", "pred");
  check_mask(mask, pred);
}

// The backward's inputs: the forward's, plus the one-element incoming grad and denominator.
inline void check_loss_bwd_inputs(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
                                  const at::Tensor& mask, const at::Tensor& denom) {
  check_loss_inputs(pred, target, mask);
  TORCH_CHECK(grad.numel() == 1 && grad.is_floating_point(), "grad must be a floating one-element tensor, got ",
              grad.sizes(), " ", grad.scalar_type());
  TORCH_CHECK(denom.numel() == 1 && denom.is_floating_point(), "denom must be a floating one-element tensor");
  TORCH_CHECK(grad.device() == pred.device() && denom.device() == pred.device(),
              "grad and denom must be on pred's device");
}

inline void check_step_inputs(const at::Tensor& z, const at::Tensor& eps, const std::optional<at::Tensor>& x_bar,
                              const at::Tensor& mask, const std::optional<at::Tensor>& noise,
                              const std::optional<at::Tensor>& lr_noise, int64_t seed, int64_t offset,
                              const at::Tensor& params, StepScalars& scalars) {
  check_image(z, "z");
  check_like(eps, z, "eps", "z");
  if (x_bar.has_value() && x_bar->defined()) check_like(*x_bar, z, "x_bar", "z");
  check_mask(mask, z);
  const bool has_noise = noise.has_value() && noise->defined();
  const bool has_lr_noise = lr_noise.has_value() && lr_noise->defined();
  if (has_noise) check_like(*noise, z, "noise", "z");
  if (has_lr_noise) {
    TORCH_CHECK(has_noise, "lr_noise needs noise too (or neither, for in-kernel noise)");
    check_like(*lr_noise, z, "lr_noise", "z");
  }
  if (!has_noise) {
    TORCH_CHECK(seed >= 0, "seed must be a non-negative int for in-kernel noise, got ", seed);
    TORCH_CHECK(offset >= 0, "offset must be a non-negative int, got ", offset);
  }
  TORCH_CHECK(params.defined() && params.device().is_cpu() && params.scalar_type() == at::kDouble &&
                  params.dim() == 1 && params.numel() == kNumParams,
              "params must be a float64 CPU tensor of ", int(kNumParams),
              " values [sqrt_recip_ac, sqrt_recipm1_ac, coef1, coef2, sigma, lr_scale, lr_sigma, clip_lo, clip_hi], got ",
              params.scalar_type(), " ", params.device(), " ", params.sizes());
  const at::Tensor pc = params.contiguous();
  const double* pv = pc.const_data_ptr<double>();
  for (int k = 0; k < kNumParams; ++k) scalars.v[k] = pv[k];
}

// ---- CPU (masked_l1_cpu.cpp, yoda_step_cpu.cpp) --------------------------------------------
std::tuple<at::Tensor, at::Tensor> masked_l1_fwd_cpu(const at::Tensor& pred, const at::Tensor& target,
                                                     const at::Tensor& mask, int64_t normalize);
at::Tensor masked_l1_bwd_cpu(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
                             const at::Tensor& mask, const at::Tensor& denom);
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_l1_fwd_grad_cpu(const at::Tensor& pred,
                                                                      const at::Tensor& target,
                                                                      const at::Tensor& mask, int64_t normalize);
at::Tensor yoda_step_cpu(const at::Tensor& z, const at::Tensor& eps, const std::optional<at::Tensor>& x_bar,
                         const at::Tensor& mask, const std::optional<at::Tensor>& noise,
                         const std::optional<at::Tensor>& lr_noise, int64_t seed, int64_t offset,
                         const at::Tensor& params, bool clip_x0);

// Tile-sparse convolution (sparse_conv_cpu.cpp): out is written in place in the listed tiles.
// padding_mode 0 = zeros, 1 = reflect; act/out_act 0 = none, 1 = silu, 2 = mish; accumulate adds
// the result to out (a residual that is out itself).
void sparse_conv2d_cpu(const at::Tensor& x, const std::optional<at::Tensor>& x2, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& tiles,
                       const std::optional<at::Tensor>& count, at::Tensor& out, at::IntArrayRef tile, int64_t stride,
                       int64_t padding, int64_t padding_mode, int64_t upsample, bool transposed,
                       const std::optional<at::Tensor>& norm_mean, const std::optional<at::Tensor>& norm_rstd,
                       const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
                       int64_t act, int64_t out_act, const std::optional<at::Tensor>& add,
                       const std::optional<at::Tensor>& residual, bool accumulate);

// Group-norm statistics of cat(x, x2) (group_stats_cpu.cpp): (mean, rstd) [B, groups] in the
// accumulation dtype; with per-pixel weights [B, H*W] (summing to 1 per image) weighted moments.
std::tuple<at::Tensor, at::Tensor> group_stats_cpu(const at::Tensor& x, const std::optional<at::Tensor>& x2,
                                                   int64_t groups, double eps,
                                                   const std::optional<at::Tensor>& weight);

// ---- autograd of ext_masked_l1_loss (yoda_autograd.cpp; any device, through the dispatcher) --
at::Tensor masked_l1_loss_autograd(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& mask,
                                   int64_t normalize);

// ---- CUDA (yoda_ops_cuda.cu; only when built with YODA_WITH_CUDA) ---------------------------
std::tuple<at::Tensor, at::Tensor> masked_l1_fwd_cuda(const at::Tensor& pred, const at::Tensor& target,
                                                      const at::Tensor& mask, int64_t normalize);
at::Tensor masked_l1_bwd_cuda(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
                              const at::Tensor& mask, const at::Tensor& denom);
void sparse_conv2d_cuda(const at::Tensor& x, const std::optional<at::Tensor>& x2, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& tiles,
                        const std::optional<at::Tensor>& count, at::Tensor& out, at::IntArrayRef tile, int64_t stride,
                        int64_t padding, int64_t padding_mode, int64_t upsample, bool transposed,
                        const std::optional<at::Tensor>& norm_mean, const std::optional<at::Tensor>& norm_rstd,
                        const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
                        int64_t act, int64_t out_act, const std::optional<at::Tensor>& add,
                        const std::optional<at::Tensor>& residual, bool accumulate);
at::Tensor yoda_step_cuda(const at::Tensor& z, const at::Tensor& eps, const std::optional<at::Tensor>& x_bar,
                          const at::Tensor& mask, const std::optional<at::Tensor>& noise,
                          const std::optional<at::Tensor>& lr_noise, int64_t seed, int64_t offset,
                          const at::Tensor& params, bool clip_x0);

}  // namespace yoda
