// CPU kernels of the masked L1 loss (forward, fused forward + gradient, backward) and their op
// entry points.  Reductions are deterministic whatever the thread count and the vector width:
// each block of rows (a partition fixed by the shape) writes its partial sums to its own slot
// (32 fixed lanes inside the block), the slots are summed in order in float64.
#include "yoda_ops.h"

#include "cpu_rows.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace yoda {
namespace {

// The loss loops do little arithmetic per byte, so the instruction set matters at sizes that
// sit in the caches: the per-task functions (l1_*_task) are compiled twice (AVX2 and the
// baseline x86-64 SSE2, YODA_CLONES) and the AVX2 clone is picked at load time where the CPU
// has it: the same scalar code, no FMA in either (-ffp-contract=off), identical results.  The
// row functions and their helpers are always_inline so that their loops are compiled inside
// each clone; the parallel_for lambdas only call the cloned functions (a lambda body would
// not be cloned).
#define YODA_INLINE inline __attribute__((always_inline))

// s[j] += v[i] for i = j (mod kLanes): fixed lanes, so the order of the additions (and the
// result) does not depend on the vector width or the thread count.  32 lanes rather than 8:
// with 8 float lanes the AVX2 loop is one chain of dependent vector adds (add latency bound,
// ~0.5 cycle per element); 32 lanes are 4 independent chains (2 to 8 vectors for other widths).
constexpr int kLanes = 32;

template <typename acc_t>
YODA_INLINE void add_lanes(const acc_t* __restrict v, int64_t n, acc_t* __restrict s) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) s[j] += v[i + j];
  for (int j = 0; i + j < n; ++j) s[j] += v[i + j];
}

// the lanes in a fixed pairwise order, in float64
template <typename acc_t>
inline double sum_lanes(const acc_t* s) {
  double d[kLanes];
  for (int j = 0; j < kLanes; ++j) d[j] = static_cast<double>(s[j]);
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) d[j] += d[j + width];
  return d[0];
}

constexpr int64_t kLossTile = 512;  // elements per tile of a row (2 acc_t tiles stay in L1)

// sign(d) with sign(0) = 0; a NaN difference stays NaN.  A bitwise blend: written with ?:
// (d > 0 ? 1 : (d < 0 ? -1 : d)) it became branches in the forward's loop (gcc: "control
// flow in loop"), unvectorised and mispredicted on random signs (~30x slower).
template <typename acc_t>
YODA_INLINE acc_t sign_of(acc_t d) {
  const uint8_t nonzero = (d > acc_t(0)) | (d < acc_t(0));  // false for +-0 and NaN
  return select_bits(nonzero, std::copysign(acc_t(1), d), d);  // d itself for +-0 and NaN
}

// What a forward pass computes besides the sum of |p - t| m: nothing, the sum of m (for
// normalize="active"), or the gradient for an incoming grad of 1 (sign(p - t) m / denom, the
// backward kernel's values, written in the same pass while p, t and m are in registers).
enum class Fwd { kSum, kCount, kGrad };

template <typename scalar_t, typename mask_t>
struct L1Args {
  const scalar_t *P, *T;
  const mask_t* M;
  scalar_t* GP;  // gradient output: backward, and the forward in Fwd::kGrad
  Strides4 sp, st, sm, sg;
  Geometry g;
};

// Adds one row's |p - t| m (and in Fwd::kCount m) to the lanes.  Per tile: an elementwise
// loop into small buffers (vectorises for every dtype / mask type), then the fixed-lane sums of
// the buffers; summing inside the elementwise loop would not vectorise (mixed-width loads in a
// reduction).
template <typename scalar_t, typename mask_t, bool kContig, Fwd kMode>
YODA_INLINE void l1_fwd_row(const scalar_t* __restrict p, const scalar_t* __restrict t, const mask_t* __restrict m,
                            scalar_t* __restrict gp, int64_t W, int64_t spw, int64_t stw, int64_t smw, int64_t sgw,
                            at::opmath_type<scalar_t> scale, at::opmath_type<scalar_t>* __restrict s,
                            at::opmath_type<scalar_t>* __restrict n) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kCount = kMode == Fwd::kCount;
  alignas(64) acc_t dv[kLossTile];
  alignas(64) acc_t mv[kCount ? kLossTile : 1];
  for (int64_t w0 = 0; w0 < W; w0 += kLossTile) {
    const int64_t len = std::min<int64_t>(kLossTile, W - w0);
    for (int64_t i = 0; i < len; ++i) {
      const int64_t w = w0 + i;
      const acc_t mm = static_cast<acc_t>(m[at_w<kContig>(w, smw)]);
      const acc_t d = static_cast<acc_t>(p[at_w<kContig>(w, spw)]) - static_cast<acc_t>(t[at_w<kContig>(w, stw)]);
      dv[i] = std::abs(d) * mm;
      if constexpr (kCount) mv[i] = mm;
      if constexpr (kMode == Fwd::kGrad) gp[at_w<kContig>(w, sgw)] = static_cast<scalar_t>(sign_of(d) * mm * scale);
    }
    add_lanes(dv, len, s);
    if constexpr (kCount) add_lanes(mv, len, n);
  }
}

// The forward's partial sums are per block of loss_block_rows(W) consecutive rows (~kLossBlock
// elements): a partition that depends only on the shape, so the result does not depend on the
// thread count; blocks rather than single rows so that short rows (W = 128) do not pay the
// lanes' final sum per row.
constexpr int64_t kLossBlock = 8192;

int64_t loss_block_rows(int64_t W) { return std::max<int64_t>(1, kLossBlock / std::max<int64_t>(W, 1)); }

template <typename scalar_t, typename mask_t, bool kContig, Fwd kMode>
YODA_CLONES void l1_fwd_task(const L1Args<scalar_t, mask_t>& a, int64_t block_begin, int64_t block_end,
                             at::opmath_type<scalar_t> scale, double* block_sum, double* block_cnt) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry g = a.g;
  const int64_t block_rows = loss_block_rows(g.W), rows = g.rows();
  for (int64_t blk = block_begin; blk < block_end; ++blk) {
    alignas(64) acc_t s[kLanes] = {};
    alignas(64) acc_t n[kMode == Fwd::kCount ? kLanes : 1] = {};
    const int64_t r_end = std::min(rows, (blk + 1) * block_rows);
    RowPos pos = row_pos(blk * block_rows, g.C, g.H);
    for (int64_t r = blk * block_rows; r < r_end; ++r, next_row(pos, g.C, g.H)) {
      l1_fwd_row<scalar_t, mask_t, kContig, kMode>(
          a.P + row_offset(a.sp, pos), a.T + row_offset(a.st, pos), a.M + mask_row_offset(a.sm, pos),
          kMode == Fwd::kGrad ? a.GP + row_offset(a.sg, pos) : nullptr, g.W, a.sp.w, a.st.w, a.sm.w, a.sg.w, scale, s,
          n);
    }
    block_sum[blk] = sum_lanes(s);
    if constexpr (kMode == Fwd::kCount) block_cnt[blk] = sum_lanes(n);
  }
}

template <typename scalar_t, typename mask_t, bool kContig, Fwd kMode>
void l1_fwd_blocks(const L1Args<scalar_t, mask_t>& a, int64_t blocks, at::opmath_type<scalar_t> scale,
                   double* block_sum, double* block_cnt) {
  const int64_t grain = std::max<int64_t>(1, row_grain(a.g.W) / loss_block_rows(a.g.W));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    l1_fwd_task<scalar_t, mask_t, kContig, kMode>(a, begin, end, scale, block_sum, block_cnt);
  });
}

template <typename scalar_t, typename mask_t, bool kContig>
YODA_INLINE void l1_bwd_row(const scalar_t* __restrict p, const scalar_t* __restrict t, const mask_t* __restrict m,
                            scalar_t* __restrict gp, int64_t W, int64_t spw, int64_t stw, int64_t smw, int64_t sgw,
                            at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t w = 0; w < W; ++w) {
    const acc_t d = static_cast<acc_t>(p[at_w<kContig>(w, spw)]) - static_cast<acc_t>(t[at_w<kContig>(w, stw)]);
    const acc_t v = sign_of(d) * static_cast<acc_t>(m[at_w<kContig>(w, smw)]) * scale;
    gp[at_w<kContig>(w, sgw)] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, typename mask_t, bool kContig>
YODA_CLONES void l1_bwd_task(const L1Args<scalar_t, mask_t>& a, int64_t begin, int64_t end,
                             at::opmath_type<scalar_t> scale) {
  const Geometry g = a.g;
  RowPos pos = row_pos(begin, g.C, g.H);
  for (int64_t r = begin; r < end; ++r, next_row(pos, g.C, g.H)) {
    l1_bwd_row<scalar_t, mask_t, kContig>(a.P + row_offset(a.sp, pos), a.T + row_offset(a.st, pos),
                                          a.M + mask_row_offset(a.sm, pos), a.GP + row_offset(a.sg, pos), g.W, a.sp.w,
                                          a.st.w, a.sm.w, a.sg.w, scale);
  }
}

template <typename scalar_t, typename mask_t, bool kContig>
void l1_bwd_rows(const L1Args<scalar_t, mask_t>& a, at::opmath_type<scalar_t> scale) {
  at::parallel_for(0, a.g.rows(), row_grain(a.g.W), [&](int64_t begin, int64_t end) {
    l1_bwd_task<scalar_t, mask_t, kContig>(a, begin, end, scale);
  });
}

// ================================================================================== ops
// The loss forward, and with `grad_pred` (normalize "all" or "sum": the denominator is known
// before the pass) the gradient for an incoming grad of 1 in the same pass.
std::tuple<at::Tensor, at::Tensor> l1_forward_cpu(const at::Tensor& pred, const at::Tensor& target,
                                                  const at::Tensor& mask_in, int64_t normalize, at::Tensor* grad_pred) {
  check_loss_inputs(pred, target, mask_in);
  TORCH_CHECK(normalize >= kNormAll && normalize <= kNormSum, "normalize must be 0 (all), 1 (active) or 2 (sum), got ",
              normalize);
  TORCH_CHECK(grad_pred == nullptr || normalize != kNormActive,
              "the fused forward needs the denominator before the pass: normalize must be 0 (all) or 2 (sum)");
  const auto acc = acc_type_of(pred.scalar_type());
  const at::Tensor mask = loss_mask(mask_in, acc);
  const Geometry g = geometry_of(pred);
  const int64_t blocks = (g.rows() + loss_block_rows(g.W) - 1) / loss_block_rows(g.W);
  std::vector<double> block_sum(static_cast<size_t>(blocks)), block_cnt(static_cast<size_t>(blocks));
  // "all" and "sum" do not depend on the pass; "active" is C * sum(mask), from the pass
  const double known_denom = normalize == kNormAll ? static_cast<double>(pred.numel()) : 1.0;
  if (grad_pred != nullptr) {
    *grad_pred = at::empty(pred.sizes(), pred.options().memory_format(output_format(pred)));
  }
  if (pred.numel() > 0) {
    const Strides4 sp = strides_of(pred), st = strides_of(target), sm = strides_of(mask);
    const Strides4 sg = grad_pred != nullptr ? strides_of(*grad_pred) : sp;
    const bool contig = unit_w({sp, st, sm, sg});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "masked_l1_fwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      // the backward kernel's scale for grad = 1, computed the same way (same bits)
      const acc_t scale = acc_t(1) / static_cast<acc_t>(known_denom);
      auto run = [&](const auto* M) {
        using mask_t = std::remove_const_t<std::remove_pointer_t<decltype(M)>>;
        const L1Args<scalar_t, mask_t> a{pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), M,
                                         grad_pred != nullptr ? grad_pred->mutable_data_ptr<scalar_t>() : nullptr,
                                         sp, st, sm, sg, g};
        auto go = [&](auto mode) {
          constexpr Fwd kMode = decltype(mode)::value;
          contig ? l1_fwd_blocks<scalar_t, mask_t, true, kMode>(a, blocks, scale, block_sum.data(), block_cnt.data())
                 : l1_fwd_blocks<scalar_t, mask_t, false, kMode>(a, blocks, scale, block_sum.data(), block_cnt.data());
        };
        if (grad_pred != nullptr) {
          go(std::integral_constant<Fwd, Fwd::kGrad>{});
        } else if (normalize == kNormActive) {  // the mask sum is only needed for "active"
          go(std::integral_constant<Fwd, Fwd::kCount>{});
        } else {
          go(std::integral_constant<Fwd, Fwd::kSum>{});
        }
      };
      if (mask.scalar_type() == at::kBool) {
        run(reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>()));
      } else {
        run(mask.const_data_ptr<acc_t>());
      }
    });
  }
  double total = 0.0, count = 0.0;  // count = C * sum(mask)
  for (int64_t k = 0; k < blocks; ++k) {
    total += block_sum[k];
    count += block_cnt[k];
  }
  const double denom = normalize == kNormActive ? std::max(1.0, count) : known_denom;
  at::Tensor loss = at::empty({}, pred.options());
  at::Tensor denom_t = at::empty({}, pred.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "masked_l1_fwd_cpu_out", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t d = static_cast<acc_t>(denom);
    *denom_t.mutable_data_ptr<acc_t>() = d;
    *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(static_cast<acc_t>(total) / d);
  });
  return {loss, denom_t};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> masked_l1_fwd_cpu(const at::Tensor& pred, const at::Tensor& target,
                                                     const at::Tensor& mask, int64_t normalize) {
  return l1_forward_cpu(pred, target, mask, normalize, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_l1_fwd_grad_cpu(const at::Tensor& pred,
                                                                      const at::Tensor& target,
                                                                      const at::Tensor& mask, int64_t normalize) {
  at::Tensor grad_pred;
  auto [loss, denom] = l1_forward_cpu(pred, target, mask, normalize, &grad_pred);
  return {loss, denom, grad_pred};
}

at::Tensor masked_l1_bwd_cpu(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
                             const at::Tensor& mask_in, const at::Tensor& denom) {
  check_loss_bwd_inputs(grad, pred, target, mask_in, denom);
  const auto acc = acc_type_of(pred.scalar_type());
  const at::Tensor mask = loss_mask(mask_in, acc);
  at::Tensor grad_pred = at::empty(pred.sizes(), pred.options().memory_format(output_format(pred)));
  if (pred.numel() == 0) return grad_pred;
  const Geometry g = geometry_of(pred);
  const Strides4 sp = strides_of(pred), st = strides_of(target), sm = strides_of(mask), sg = strides_of(grad_pred);
  const bool contig = unit_w({sp, st, sm, sg});
  const double grad_v = grad.item<double>();
  const double denom_v = denom.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "masked_l1_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(grad_v) / static_cast<acc_t>(denom_v);
    auto run = [&](const auto* M) {
      using mask_t = std::remove_const_t<std::remove_pointer_t<decltype(M)>>;
      const L1Args<scalar_t, mask_t> a{pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), M,
                                       grad_pred.mutable_data_ptr<scalar_t>(), sp, st, sm, sg, g};
      contig ? l1_bwd_rows<scalar_t, mask_t, true>(a, scale) : l1_bwd_rows<scalar_t, mask_t, false>(a, scale);
    };
    if (mask.scalar_type() == at::kBool) {
      run(reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>()));
    } else {
      run(mask.const_data_ptr<acc_t>());
    }
  });
  return grad_pred;
}

}  // namespace yoda
