// Group-norm statistics of cat(x, x2) along channels on the CPU: mean and 1/sqrt(var + eps) per
// (image, group), in one read of the maps.  The sparse UNet engine needs them for every
// normalised layer of every step (yoda_sparse/sparse/norm.py); torch.var_mean over a
// channels_last map took ~20 ms at 64x256x256 on a 2-core CPU, as long as one of its
// convolutions, where a pass at memory speed takes ~1 ms.
//
// With ``weight`` (B x H*W pixel weights, each image's summing to 1), the moments are weighted
// sums instead of pixel means: the sparse engine's "probed" statistics (active tiles and probe
// tiles only).
//
// Accumulation: per task, partial sums over at most kPixelsPerTask pixels in the map's precision
// (vectorised across the contiguous channels of a channels_last map), added into float64 totals.
#include "cpu_rows.h"
#include "yoda_ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace yoda {
namespace {

constexpr int64_t kPixelsPerTask = 512;

// sum and sum of squares of n pixels of C channels (pixel stride sp, channel stride 1), in the
// map's own precision (float partials for float maps, double for double).
template <typename scalar_t>
YODA_CLONES void accumulate_pixels(const scalar_t* __restrict src, int64_t n, int64_t sp, int64_t C,
                                   scalar_t* __restrict sum, scalar_t* __restrict sq) {
  for (int64_t q = 0; q < n; ++q) {
    const scalar_t* __restrict p = src + q * sp;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t v = p[c];
      sum[c] += v;
      sq[c] += v * v;
    }
  }
}

// the same with a weight per pixel (w[q] for pixel q); pixels of weight 0 are skipped
template <typename scalar_t>
YODA_CLONES void accumulate_weighted(const scalar_t* __restrict src, int64_t n, int64_t sp, int64_t C,
                                     const scalar_t* __restrict w, scalar_t* __restrict sum, scalar_t* __restrict sq) {
  for (int64_t q = 0; q < n; ++q) {
    const scalar_t wq = w[q];
    if (wq == scalar_t(0)) continue;
    const scalar_t* __restrict p = src + q * sp;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t v = p[c];
      sum[c] += wq * v;
      sq[c] += wq * v * v;
    }
  }
}

// per (b, c) float64 sums of one map into sum/sq [B, C_total] at channel offset c0 (weighted by
// w [B, HW] in the map's dtype when given)
template <typename scalar_t>
void channel_sums(const at::Tensor& x, int64_t c0, int64_t C_total, std::vector<double>& sum, std::vector<double>& sq,
                  const scalar_t* w = nullptr) {
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t tasks_per_image = (HW + kPixelsPerTask - 1) / kPixelsPerTask;
  const int64_t nthreads = at::get_num_threads();
  std::vector<double> part_sum(nthreads * B * C, 0.0), part_sq(nthreads * B * C, 0.0);
  at::parallel_for(0, B * tasks_per_image, 1, [&](int64_t lo, int64_t hi) {
    const int64_t tid = at::get_thread_num();
    std::vector<scalar_t> s(C), s2(C);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / tasks_per_image;
      const int64_t p0 = (task % tasks_per_image) * kPixelsPerTask;
      const int64_t n = std::min(kPixelsPerTask, HW - p0);
      std::fill(s.begin(), s.end(), scalar_t(0));
      std::fill(s2.begin(), s2.end(), scalar_t(0));
      // channels_last: pixel p of image b at b*sb + p*C (checked by the caller)
      if (w != nullptr) {
        accumulate_weighted<scalar_t>(xp + b * x.stride(0) + p0 * C, n, C, C, w + b * HW + p0, s.data(), s2.data());
      } else {
        accumulate_pixels<scalar_t>(xp + b * x.stride(0) + p0 * C, n, C, C, s.data(), s2.data());
      }
      double* ps = part_sum.data() + (tid * B + b) * C;
      double* pq = part_sq.data() + (tid * B + b) * C;
      for (int64_t c = 0; c < C; ++c) {
        ps[c] += s[c];
        pq[c] += s2[c];
      }
    }
  });
  for (int64_t t = 0; t < nthreads; ++t) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        sum[b * C_total + c0 + c] += part_sum[(t * B + b) * C + c];
        sq[b * C_total + c0 + c] += part_sq[(t * B + b) * C + c];
      }
    }
  }
}

at::Tensor as_channels_last(const at::Tensor& x) {
  return x.contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> group_stats_cpu(const at::Tensor& x, const std::optional<at::Tensor>& x2,
                                                   int64_t groups, double eps, const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(), "x must be a 4-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x must be float32 or float64");
  const int64_t B = x.size(0), C1 = x.size(1), C2 = x2.has_value() ? x2->size(1) : 0, C = C1 + C2;
  if (x2.has_value()) {
    TORCH_CHECK(x2->dim() == 4 && x2->size(0) == B && x2->size(2) == x.size(2) && x2->size(3) == x.size(3) &&
                    x2->scalar_type() == x.scalar_type() && x2->device().is_cpu(),
                "x2 must be a CPU tensor [B, C2, H, W] like x");
  }
  TORCH_CHECK(groups > 0 && C % groups == 0, "groups must divide the channels (", C, "), got ", groups);
  const int64_t HW = x.size(2) * x.size(3);
  at::Tensor w;
  if (weight.has_value()) {
    TORCH_CHECK(weight->device().is_cpu() && weight->numel() == B * HW,
                "weight must be a CPU tensor of B * H * W pixel weights");
    w = weight->to(x.scalar_type()).contiguous();
  }
  std::vector<double> sum(B * C, 0.0), sq(B * C, 0.0);
  // a map that is not channels_last is copied first (the engine's maps always are)
  const at::Tensor xc = as_channels_last(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_stats_cpu", [&] {
    const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    channel_sums<scalar_t>(xc, 0, C, sum, sq, wp);
    if (x2.has_value()) channel_sums<scalar_t>(as_channels_last(*x2), C1, C, sum, sq, wp);
  });
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({B, groups}, x.options().dtype(at::kDouble));
  at::Tensor rstd = at::empty({B, groups}, x.options().dtype(at::kDouble));
  double* mp = mean.data_ptr<double>();
  double* rp = rstd.data_ptr<double>();
  const int64_t per = C / groups;
  // weights sum to 1 per image: the pixel mean is the weighted sum
  const double count = static_cast<double>(per) * (w.defined() ? 1.0 : static_cast<double>(HW));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < groups; ++g) {
      double s = 0, s2 = 0;
      for (int64_t c = g * per; c < (g + 1) * per; ++c) {
        s += sum[b * C + c];
        s2 += sq[b * C + c];
      }
      const double m = s / count;
      const double var = std::max(s2 / count - m * m, 0.0);  // rounding can make it slightly negative
      mp[b * groups + g] = m;
      rp[b * groups + g] = 1.0 / std::sqrt(var + eps);
    }
  }
  return {mean.to(acc), rstd.to(acc)};
}

}  // namespace yoda
