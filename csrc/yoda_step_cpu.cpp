// CPU kernel of the YODA step and its op entry point: per element, z_sr where the mask is set
// and z_lr elsewhere (the math is in yoda_sparse/ops/reference.py), with the noise read from
// tensors or drawn in the kernel (Philox normals, noise_cpu.h).
#include "yoda_ops.h"

#include "cpu_rows.h"
#include "noise_cpu.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace yoda {
namespace {

constexpr int64_t kNoiseGroup = 4096;  // normals drawn per batch of rows

template <typename scalar_t>
struct StepArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *z, *eps, *x_bar, *noise, *lr_noise;
  const uint8_t* mask;  // bool storage (0/1 bytes): gcc has no vector type for bool loads
  scalar_t* out;
  Strides4 sz, se, sx, sn, sl, sm, so;
  Geometry g;
  StepCoeffs<acc_t> k;
  uint64_t seed, offset;
};

// One row of W elements: everything by value or __restrict so the loop vectorises.
// n / nl: the rows of noise / lr_noise, or (noise_t = float, stride 1) the in-kernel normals.
template <typename scalar_t, typename noise_t, bool kContig>
inline void step_row(const scalar_t* __restrict z, const scalar_t* __restrict e, const scalar_t* __restrict xb,
                     const noise_t* __restrict n, const noise_t* __restrict nl, const uint8_t* __restrict m,
                     scalar_t* __restrict o, int64_t W, Strides4 sz, Strides4 se, Strides4 sx, int64_t snw,
                     int64_t slw, Strides4 sm, Strides4 so, StepCoeffs<at::opmath_type<scalar_t>> k) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t w = 0; w < W; ++w) {
    const acc_t zv = static_cast<acc_t>(z[at_w<kContig>(w, sz.w)]);
    const acc_t ev = static_cast<acc_t>(e[at_w<kContig>(w, se.w)]);
    const acc_t xv = static_cast<acc_t>(xb[at_w<kContig>(w, sx.w)]);
    const acc_t nv = static_cast<acc_t>(n[at_w<kContig>(w, snw)]);
    const acc_t nlv = static_cast<acc_t>(nl[at_w<kContig>(w, slw)]);
    // clamp that keeps NaN (as torch.clamp); +-inf bounds when clip_x0 is off
    const acc_t x0 = std::min(std::max(k.a * zv - k.b * ev, k.lo), k.hi);
    const acc_t z_sr = k.c1 * x0 + k.c2 * zv + k.sigma * nv;
    const acc_t z_lr = k.lr_scale * xv + k.lr_sigma * nlv;
    o[at_w<kContig>(w, so.w)] = static_cast<scalar_t>(select_bits(m[at_w<kContig>(w, sm.w)], z_sr, z_lr));
  }
}

template <typename scalar_t, bool kGenNoise, bool kContig>
void step_rows(const StepArgs<scalar_t>& A) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry g = A.g;
  // the step's scalars by value, so the compiler keeps them in registers (read through a
  // reference they could alias the output and would be reloaded every element)
  const StepCoeffs<acc_t> k = A.k;
  // Consecutive rows are consecutive in the logical NCHW order, so the normals of a group of
  // rows (~kNoiseGroup elements) are drawn in one go: no partial Philox blocks per short row.
  const int64_t group_rows = kGenNoise ? std::max<int64_t>(1, kNoiseGroup / std::max<int64_t>(g.W, 1)) : 1;
  at::parallel_for(0, g.rows(), row_grain(g.W), [&](int64_t begin, int64_t end) {
    std::vector<float> normals(kGenNoise ? static_cast<size_t>(group_rows * g.W) : 0);
    int64_t group_begin = begin, group_end = begin;  // rows whose normals are in `normals`
    RowPos pos = row_pos(begin, g.C, g.H);
    for (int64_t r = begin; r < end; ++r, next_row(pos, g.C, g.H)) {
      if (kGenNoise && r == group_end) {
        group_begin = r;
        group_end = std::min(end, r + group_rows);
        // the logical NCHW index of row r's first element is r * W
        fill_normals(A.seed, A.offset + static_cast<uint64_t>(r) * static_cast<uint64_t>(g.W), (group_end - r) * g.W,
                     normals.data());
      }
      const scalar_t* z = A.z + row_offset(A.sz, pos);
      const scalar_t* e = A.eps + row_offset(A.se, pos);
      const scalar_t* xb = A.x_bar + row_offset(A.sx, pos);
      const uint8_t* m = A.mask + mask_row_offset(A.sm, pos);
      scalar_t* o = A.out + row_offset(A.so, pos);
      if (kGenNoise) {
        const float* nrm = normals.data() + (r - group_begin) * g.W;
        step_row<scalar_t, float, kContig>(z, e, xb, nrm, nrm, m, o, g.W, A.sz, A.se, A.sx, 1, 1, A.sm, A.so, k);
      } else {
        const scalar_t* n = A.noise + row_offset(A.sn, pos);
        const scalar_t* nl = A.lr_noise + row_offset(A.sl, pos);
        step_row<scalar_t, scalar_t, kContig>(z, e, xb, n, nl, m, o, g.W, A.sz, A.se, A.sx, A.sn.w, A.sl.w, A.sm,
                                              A.so, k);
      }
    }
  });
}

}  // namespace

at::Tensor yoda_step_cpu(const at::Tensor& z, const at::Tensor& eps, const std::optional<at::Tensor>& x_bar,
                         const at::Tensor& mask_in, const std::optional<at::Tensor>& noise,
                         const std::optional<at::Tensor>& lr_noise, int64_t seed, int64_t offset,
                         const at::Tensor& params, bool clip_x0) {
  StepScalars sc;
  check_step_inputs(z, eps, x_bar, mask_in, noise, lr_noise, seed, offset, params, sc);
  const at::Tensor mask = step_mask(mask_in);
  at::Tensor out = at::empty(z.sizes(), z.options().memory_format(output_format(z)));
  if (z.numel() == 0) return out;
  const Geometry g = geometry_of(z);
  const bool has_x_bar = x_bar.has_value() && x_bar->defined();
  const bool gen_noise = !(noise.has_value() && noise->defined());
  // x_bar None means 0: read a zero row (W elements) with zero b/c/h strides.
  const at::Tensor xb = has_x_bar ? *x_bar : at::zeros({1, 1, 1, g.W}, z.options()).expand(z.sizes());
  const at::Tensor nz = gen_noise ? at::Tensor() : *noise;
  const at::Tensor lnz = gen_noise ? at::Tensor() : ((lr_noise.has_value() && lr_noise->defined()) ? *lr_noise : nz);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "yoda_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    StepArgs<scalar_t> A;
    A.z = z.const_data_ptr<scalar_t>();
    A.eps = eps.const_data_ptr<scalar_t>();
    A.x_bar = xb.const_data_ptr<scalar_t>();
    A.noise = gen_noise ? nullptr : nz.const_data_ptr<scalar_t>();
    A.lr_noise = gen_noise ? nullptr : lnz.const_data_ptr<scalar_t>();
    A.mask = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
    A.out = out.mutable_data_ptr<scalar_t>();
    A.sz = strides_of(z);
    A.se = strides_of(eps);
    A.sx = strides_of(xb);
    A.sn = gen_noise ? A.sz : strides_of(nz);
    A.sl = gen_noise ? A.sz : strides_of(lnz);
    A.sm = strides_of(mask);
    A.so = strides_of(out);
    A.g = g;
    A.k = step_coeffs<acc_t>(sc, clip_x0);
    A.seed = static_cast<uint64_t>(seed);
    A.offset = static_cast<uint64_t>(offset);
    const bool contig = unit_w({A.sz, A.se, A.sx, A.sm, A.so}) && (gen_noise || unit_w({A.sn, A.sl}));
    if (gen_noise) {
      contig ? step_rows<scalar_t, true, true>(A) : step_rows<scalar_t, true, false>(A);
    } else {
      contig ? step_rows<scalar_t, false, true>(A) : step_rows<scalar_t, false, false>(A);
    }
  });
  return out;
}

}  // namespace yoda
