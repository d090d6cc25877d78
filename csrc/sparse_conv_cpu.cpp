// CPU kernel of the tile-sparse convolution (yoda_sparse/ops/sparse_conv.py has the semantics,
// sparse_conv_reference.py the truth).
//
// Scheme: the listed tiles become row segments (one per run of adjacent tiles in a tile row).
// Their halo'd input windows are gathered, with the prologue applied (concat of x and x2,
// group-norm apply, activation, nearest x2, zero/reflect padding), into one of three layouts,
// each convolved by one oneDNN or BLAS call (at::conv2d / at::conv_transpose2d without padding,
// a 1x1 convolution) so the GEMM stays large and efficient:
//   strip:   an image of the band's height whose columns are the segments' windows side by
//            side; rows need a halo only above and below the band and columns share theirs
//            within a segment, but the k - 1 output columns that straddle two windows are junk
//            (+25% for an isolated 8-px tile);
//   windows: every tile its own halo'd window, the windows a batch; nothing is junk, and oneDNN
//            runs a batch of 8x8-output windows within 2-5% of the dense convolution per output
//            pixel (2-px tiles: 25-60% slower);
//   pixels:  every output pixel its own k x k window: the batch is an im2col matrix
//            [pixels, k*k*C] and the convolution one GEMM. It reads the input k*k times, which
//            the wide deep levels (C >= 256) afford: there 1- and 2-px tiles cost 1.0-1.9x dense
//            per pixel (f >= 0.3), against 1.5-3.7x in the other two layouts.
// sparse_conv_plan.h picks the cheapest per call (choose_layout).  The scatter writes each
// segment's outputs into `out` with the epilogue (activation, per-(image, channel) add,
// residual).
#include "yoda_ops.h"

#include "cpu_rows.h"
#include "gemm_cpu.h"
#include "sparse_conv_plan.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(YODA_NO_TARGET_CLONES)
#define YODA_CLONES_512 __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define YODA_CLONES_512
#endif

namespace yoda {
namespace {

enum Act : int64_t { kActNone = 0, kActSilu = 1, kActMish = 2 };

using sparse_conv::ConvGeometry;
using sparse_conv::Segment;
using sparse_conv::ceil_div;
using sparse_conv::floor_div;
using sparse_conv::source_index;

// exp(x) for float, written so that loops over it vectorise (no libm call): Cody-Waite range
// reduction and a degree-6 polynomial; within ~2 ulp of expf on [-87, 88], saturating outside.
// always_inline: a plain inline function is not inlined into the target_clones' AVX2/AVX-512
// copies (a different target), and a call per element stops vectorisation
__attribute__((always_inline)) inline float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.44269504088896341f + 0.5f;
  const int32_t ti = static_cast<int32_t>(t);
  const int32_t n = ti - (t < static_cast<float>(ti) ? 1 : 0);  // floor
  const float fn = static_cast<float>(n);
  float r = x - fn * 0.693359375f;
  r = r + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<float>((n + 127) << 23);
}

inline double exp_poly(double x) { return std::exp(x); }

template <int ACT, typename acc_t>
__attribute__((always_inline)) inline acc_t activate(acc_t v) {
  if constexpr (ACT == kActSilu) {
    return v / (acc_t(1) + exp_poly(-v));
  } else if constexpr (ACT == kActMish) {
    // mish(v) = v tanh(softplus(v)) = v * n / (n + 2) with n = e (e + 2), e = exp(v)
    const acc_t e = exp_poly(std::min(v, acc_t(20)));
    const acc_t n = e * (e + acc_t(2));
    return v > acc_t(20) ? v : v * n / (n + acc_t(2));
  } else {
    return v;
  }
}

// n strip pixels of one strip row: pixel q reads C channels at src + ix[q] * sxw (channel
// stride sc; ix[q] < 0: a zero pad) and writes act(norm(.)) to dst + q * dst_stride.
template <typename scalar_t, int ACT, bool NORM>
YODA_CLONES_512 void gather_pixels(scalar_t* __restrict dst, int64_t dst_stride, const scalar_t* __restrict src,
                                   const int64_t* __restrict ix, int64_t n, int64_t sxw, int64_t sc, int64_t C,
                                   const at::opmath_type<scalar_t>* __restrict scale,
                                   const at::opmath_type<scalar_t>* __restrict shift) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t q = 0; q < n; ++q) {
    scalar_t* __restrict d = dst + q * dst_stride;
    if (ix[q] < 0) {
      for (int64_t c = 0; c < C; ++c) d[c] = scalar_t(0);
      continue;
    }
    const scalar_t* __restrict p = src + ix[q] * sxw;
    if (!NORM && ACT == kActNone && sc == 1) {
      std::memcpy(d, p, sizeof(scalar_t) * C);
    } else if (sc == 1) {
      for (int64_t c = 0; c < C; ++c) {
        acc_t v = static_cast<acc_t>(p[c]);
        if constexpr (NORM) v = v * scale[c] + shift[c];
        d[c] = static_cast<scalar_t>(activate<ACT>(v));
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        acc_t v = static_cast<acc_t>(p[c * sc]);
        if constexpr (NORM) v = v * scale[c] + shift[c];
        d[c] = static_cast<scalar_t>(activate<ACT>(v));
      }
    }
  }
}

template <typename scalar_t>
void gather_pixels_any(int64_t act, bool norm, scalar_t* dst, int64_t dst_stride, const scalar_t* src,
                       const int64_t* ix, int64_t n, int64_t sxw, int64_t sc, int64_t C,
                       const at::opmath_type<scalar_t>* scale, const at::opmath_type<scalar_t>* shift) {
#define YODA_GATHER(A, N) gather_pixels<scalar_t, A, N>(dst, dst_stride, src, ix, n, sxw, sc, C, scale, shift)
  if (norm) {
    if (act == kActSilu) YODA_GATHER(kActSilu, true);
    else if (act == kActMish) YODA_GATHER(kActMish, true);
    else YODA_GATHER(kActNone, true);
  } else {
    if (act == kActSilu) YODA_GATHER(kActSilu, false);
    else if (act == kActMish) YODA_GATHER(kActMish, false);
    else YODA_GATHER(kActNone, false);
  }
#undef YODA_GATHER
}

// n output pixels: dst + j * sow (channel stride soc) = act(src[j * C + c]) + add[c] + res.
// dst is not __restrict: res may alias it (accumulate into out); each element is read before
// it is written.
template <typename scalar_t, int ACT, bool ADD, bool RES>
YODA_CLONES_512 void scatter_pixels(scalar_t* dst, int64_t sow, int64_t soc, const scalar_t* __restrict src,
                                    int64_t n, int64_t C, const at::opmath_type<scalar_t>* __restrict add,
                                    const scalar_t* res, int64_t srw, int64_t src_c) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* __restrict y = src + j * C;
    scalar_t* d = dst + j * sow;
    const scalar_t* r = RES ? res + j * srw : nullptr;
    if (!ADD && !RES && ACT == kActNone && soc == 1) {
      std::memcpy(d, y, sizeof(scalar_t) * C);
    } else if (soc == 1 && (!RES || src_c == 1)) {
      for (int64_t c = 0; c < C; ++c) {
        acc_t v = activate<ACT>(static_cast<acc_t>(y[c]));
        if constexpr (ADD) v += add[c];
        if constexpr (RES) v += static_cast<acc_t>(r[c]);
        d[c] = static_cast<scalar_t>(v);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        acc_t v = activate<ACT>(static_cast<acc_t>(y[c]));
        if constexpr (ADD) v += add[c];
        if constexpr (RES) v += static_cast<acc_t>(r[c * src_c]);
        d[c * soc] = static_cast<scalar_t>(v);
      }
    }
  }
}

template <typename scalar_t>
void scatter_pixels_any(int64_t act, bool add, bool res, scalar_t* dst, int64_t sow, int64_t soc,
                        const scalar_t* src, int64_t n, int64_t C, const at::opmath_type<scalar_t>* addp,
                        const scalar_t* resp, int64_t srw, int64_t src_c) {
#define YODA_SCATTER(A, D, R) scatter_pixels<scalar_t, A, D, R>(dst, sow, soc, src, n, C, addp, resp, srw, src_c)
#define YODA_SCATTER_ACT(D, R)                   \
  if (act == kActSilu) YODA_SCATTER(kActSilu, D, R); \
  else if (act == kActMish) YODA_SCATTER(kActMish, D, R); \
  else YODA_SCATTER(kActNone, D, R)
  if (add && res) { YODA_SCATTER_ACT(true, true); }
  else if (add) { YODA_SCATTER_ACT(true, false); }
  else if (res) { YODA_SCATTER_ACT(false, true); }
  else { YODA_SCATTER_ACT(false, false); }
#undef YODA_SCATTER_ACT
#undef YODA_SCATTER
}

template <typename scalar_t>
void gather(const std::vector<Segment>& segs, const ConvGeometry& g, const at::Tensor& x,
            const std::optional<at::Tensor>& x2, const std::vector<at::opmath_type<scalar_t>>& scale,
            const std::vector<at::opmath_type<scalar_t>>& shift, int64_t act, at::Tensor& strip) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t SH = strip.size(2), SW = strip.size(3);
  const int64_t C1 = x.size(1), C2 = x2.has_value() ? x2->size(1) : 0, C = C1 + C2;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* x2p = C2 ? x2->const_data_ptr<scalar_t>() : nullptr;
  const Strides4 sx = strides_of(x);
  const Strides4 sx2 = C2 ? strides_of(*x2) : Strides4{0, 0, 0, 0};
  // channels_last [1, C, SH, SW]: (row, col, c); a window batch [N, C, SH, SW] is the same
  // memory as one strip N * SH rows tall, each window at rows in_row .. in_row + SH
  scalar_t* sp = strip.data_ptr<scalar_t>();
  const bool has_norm = !scale.empty();
  // strip rows x segments; the columns between segments' windows are zeroed by their row task
  const int64_t nseg = static_cast<int64_t>(segs.size());
  // grain: about kElementsPerTask elements per task, a task being one strip row of one segment
  const int64_t task_elems = std::max<int64_t>(1, SW * C / std::max<int64_t>(nseg, 1));
  at::parallel_for(0, nseg * SH, std::max<int64_t>(1, kElementsPerTask / task_elems), [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> ix;
    for (int64_t task = lo; task < hi; ++task) {
      const Segment& sg = segs[task / SH];
      const int64_t y = task % SH;
      const int64_t vy = sg.vy0 + y;
      const int64_t iy = g.transposed ? ((vy >= 0 && vy < g.H) ? vy : -1) : source_index(vy, g.Hv, g.u, g.reflect);
      const acc_t* a = has_norm ? scale.data() + sg.b * C : nullptr;
      const acc_t* sh = has_norm ? shift.data() + sg.b * C : nullptr;
      const int64_t si = task / SH;
      scalar_t* row = sp + ((sg.in_row + y) * SW) * C;
      // zero the columns up to the next window in the same strip rows (or to the row's end)
      const bool next_shares = si + 1 < nseg && segs[si + 1].in_row == sg.in_row;
      const int64_t gap_end = next_shares ? segs[si + 1].in_col : SW;
      for (int64_t xs = sg.in_col + sg.in_w; xs < gap_end; ++xs) std::memset(row + xs * C, 0, sizeof(scalar_t) * C);
      if (si == 0 || segs[si - 1].in_row != sg.in_row) {
        for (int64_t xs = 0; xs < sg.in_col; ++xs) std::memset(row + xs * C, 0, sizeof(scalar_t) * C);
      }
      scalar_t* dst = row + sg.in_col * C;
      if (iy < 0) {
        std::memset(dst, 0, sizeof(scalar_t) * C * sg.in_w);
        continue;
      }
      ix.resize(sg.in_w);
      for (int64_t q = 0; q < sg.in_w; ++q) {
        const int64_t vx = sg.vx0 + q;
        ix[q] = g.transposed ? ((vx >= 0 && vx < g.W) ? vx : -1) : source_index(vx, g.Wv, g.u, g.reflect);
      }
      gather_pixels_any<scalar_t>(act, has_norm, dst, C, xp + sg.b * sx.b + iy * sx.h, ix.data(), sg.in_w, sx.w,
                                  sx.c, C1, a, sh);
      if (C2) {
        gather_pixels_any<scalar_t>(act, has_norm, dst + C1, C, x2p + sg.b * sx2.b + iy * sx2.h, ix.data(), sg.in_w,
                                    sx2.w, sx2.c, C2, a ? a + C1 : nullptr, sh ? sh + C1 : nullptr);
      }
    }
  });
}

template <typename scalar_t>
void scatter(const std::vector<Segment>& segs, const at::Tensor& conv, int64_t act,
             const std::vector<at::opmath_type<scalar_t>>& add, const std::optional<at::Tensor>& residual,
             bool accumulate, at::Tensor& out) {
  const int64_t Cout = out.size(1);
  const at::Tensor y = conv.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t OW = y.size(3);
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const Strides4 so = strides_of(out);
  // accumulate: the residual is out itself (read before written, element by element)
  const scalar_t* rp = accumulate ? op : residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
  const Strides4 sr = accumulate ? so : residual.has_value() ? strides_of(*residual) : Strides4{0, 0, 0, 0};
  // tasks: (segment, output row)
  std::vector<int64_t> first(segs.size() + 1, 0);
  for (size_t i = 0; i < segs.size(); ++i) first[i + 1] = first[i] + segs[i].rows;
  const int64_t total = first.back();
  const int64_t task_elems = std::max<int64_t>(1, Cout * OW / std::max<int64_t>(segs.size(), 1));
  at::parallel_for(0, total, std::max<int64_t>(1, kElementsPerTask / task_elems), [&](int64_t lo, int64_t hi) {
    size_t si = std::upper_bound(first.begin(), first.end(), lo) - first.begin() - 1;
    for (int64_t task = lo; task < hi; ++task) {
      while (first[si + 1] <= task) ++si;
      const Segment& sg = segs[si];
      const int64_t rr = task - first[si];
      const int64_t orow = sg.r0 + rr;
      const at::opmath_type<scalar_t>* ap = add.empty() ? nullptr : add.data() + sg.b * Cout;
      const scalar_t* src = yp + ((sg.out_row + rr) * OW + sg.out_col) * Cout;
      scalar_t* dst = op + sg.b * so.b + orow * so.h + sg.x0 * so.w;
      const scalar_t* res = rp ? rp + sg.b * sr.b + orow * sr.h + sg.x0 * sr.w : nullptr;
      scatter_pixels_any<scalar_t>(act, ap != nullptr, res != nullptr, dst, so.w, so.c, src, sg.w, Cout, ap, res,
                                   sr.w, sr.c);
    }
  });
}

template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> per_image_channel(const std::optional<at::Tensor>& t, int64_t B, int64_t C) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> v;
  if (!t.has_value()) return v;
  const at::Tensor a = t->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  TORCH_CHECK(a.numel() == B * C, "add must be [B, C_out]");
  v.assign(a.const_data_ptr<acc_t>(), a.const_data_ptr<acc_t>() + B * C);
  return v;
}

// The pixel layout's im2col GEMM through oneDNN's BRGEMM micro-kernel, the epilogue fused into
// each finished block (gemm_cpu.h): float32 where cpu_gemm::available(); false (nothing done)
// otherwise, and the caller takes oneDNN's 1x1 convolution instead.
template <typename scalar_t>
bool pixels_gemm(const std::vector<Segment>& pixels, int64_t max_per_call, const ConvGeometry& g, const at::Tensor& x,
                 const std::optional<at::Tensor>& x2, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const std::vector<at::opmath_type<scalar_t>>& scale, const std::vector<at::opmath_type<scalar_t>>& shift,
                 int64_t act, int64_t out_act, const std::vector<at::opmath_type<scalar_t>>& addv,
                 const std::optional<at::Tensor>& residual, bool accumulate, at::Tensor& out) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    return false;
  } else {
    if (!cpu_gemm::available()) return false;
    const int64_t C = x.size(1) + (x2.has_value() ? x2->size(1) : 0), KK = g.k * g.k, Cout = out.size(1);
    const at::Tensor wmat = cpu_gemm::packed_weight(weight);
    const at::Tensor b32 = bias.has_value() ? bias->contiguous() : at::Tensor();
    const float* bp = b32.defined() ? b32.const_data_ptr<float>() : nullptr;
    float* op = out.data_ptr<float>();
    const Strides4 so = strides_of(out);
    // accumulate: the residual is out itself (each element read before it is written)
    const float* rp = accumulate ? op : residual.has_value() ? residual->const_data_ptr<float>() : nullptr;
    const Strides4 sr = accumulate ? so : residual.has_value() ? strides_of(*residual) : Strides4{0, 0, 0, 0};
    sparse_conv::for_each_batch(pixels, max_per_call, g.k, 1, [&](const std::vector<Segment>& batch) {
      const int64_t N = static_cast<int64_t>(batch.size());
      at::Tensor cols = at::empty({N, C, g.k, g.k}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
      gather<float>(batch, g, x, x2, scale, shift, act, cols);
      cpu_gemm::gemm(cols.const_data_ptr<float>(), N, KK * C, wmat.const_data_ptr<float>(), Cout, bp,
                     [&](int64_t m0, int64_t rows, int64_t n0, int64_t n, const float* acc) {
        for (int64_t i = 0; i < rows; ++i) {
          const Segment& px = batch[m0 + i];
          const float* ap = addv.empty() ? nullptr : addv.data() + px.b * Cout + n0;
          const float* res = rp ? rp + px.b * sr.b + px.r0 * sr.h + px.x0 * sr.w + n0 * sr.c : nullptr;
          scatter_pixels_any<float>(out_act, ap != nullptr, res != nullptr,
                                    op + px.b * so.b + px.r0 * so.h + px.x0 * so.w + n0 * so.c, so.w, so.c,
                                    acc + i * n, 1, n, ap, res, sr.w, sr.c);
        }
      });
    });
    return true;
  }
}

}  // namespace

void sparse_conv2d_cpu(const at::Tensor& x, const std::optional<at::Tensor>& x2, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& tiles,
                       const std::optional<at::Tensor>& count, at::Tensor& out, at::IntArrayRef tile, int64_t stride,
                       int64_t padding, int64_t padding_mode, int64_t upsample, bool transposed,
                       const std::optional<at::Tensor>& norm_mean, const std::optional<at::Tensor>& norm_rstd,
                       const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
                       int64_t act, int64_t out_act, const std::optional<at::Tensor>& add,
                       const std::optional<at::Tensor>& residual, bool accumulate) {
  TORCH_CHECK(x.dim() == 4 && out.dim() == 4 && weight.dim() == 4, "x, out and weight must be 4-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "the CPU sparse convolution takes float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "x, weight and out must share a dtype");
  TORCH_CHECK(tiles.scalar_type() == at::kInt && tiles.dim() == 2 && tiles.size(1) == 3 && tiles.device().is_cpu(),
              "tiles must be an int32 CPU tensor [N, 3]");
  TORCH_CHECK(tile.size() == 2 && tile[0] > 0 && tile[1] > 0, "tile must be (th, tw) > 0");
  TORCH_CHECK(act >= 0 && act <= 2 && out_act >= 0 && out_act <= 2, "act codes are 0 (none), 1 (silu), 2 (mish)");
  int64_t n = tiles.size(0);
  if (count.has_value()) {
    n = count->reshape({-1})[0].item<int64_t>();
    TORCH_CHECK(n >= 0 && n <= tiles.size(0), "count ", n, " is outside [0, ", tiles.size(0), "]");
  }
  if (n == 0) return;
  const ConvGeometry g =
      sparse_conv::make_geometry(x, weight, out, tile, stride, padding, padding_mode, upsample, transposed);
  const int64_t B = x.size(0);
  const int64_t C = x.size(1) + (x2.has_value() ? x2->size(1) : 0);
  int64_t SH = 0;
  std::vector<Segment> segs = sparse_conv::make_segments(tiles, n, g, B, &SH);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // group-norm apply folded into one scale and shift per (image, channel)
    std::vector<acc_t> scale, shift;
    if (norm_mean.has_value()) {
      const at::Tensor mean = norm_mean->to(at::kDouble).contiguous();
      const at::Tensor rstd = norm_rstd->to(at::kDouble).contiguous();
      const int64_t G = mean.size(1), per = C / G;
      const at::Tensor gw = norm_weight.has_value() ? norm_weight->to(at::kDouble).contiguous() : at::ones({C}, at::kDouble);
      const at::Tensor gb = norm_bias.has_value() ? norm_bias->to(at::kDouble).contiguous() : at::zeros({C}, at::kDouble);
      const double *mp = mean.const_data_ptr<double>(), *rp = rstd.const_data_ptr<double>();
      const double *wp = gw.const_data_ptr<double>(), *bp = gb.const_data_ptr<double>();
      scale.resize(B * C);
      shift.resize(B * C);
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t c = 0; c < C; ++c) {
          const double a = rp[b * G + c / per] * wp[c];
          scale[b * C + c] = static_cast<acc_t>(a);
          shift[b * C + c] = static_cast<acc_t>(bp[c] - mp[b * G + c / per] * a);
        }
      }
    }
    const at::Tensor w = weight.contiguous(at::MemoryFormat::ChannelsLast);
    const std::vector<acc_t> addv = per_image_channel<scalar_t>(add, B, out.size(1));
    const std::vector<int64_t> st{stride, stride}, zero{0, 0}, one{1, 1};
    // Chunks of segments, each gathered, convolved and scattered in turn: a chunk's strip and
    // its convolution output stay small enough (chunk_bytes()) for the caches and for malloc to
    // reuse its memory, where one strip of a large map costs a fresh mmap, hence a page fault
    // per 4 KiB, on every call (measured: a third of the gather time at 256x256x128).
    const int64_t col_bytes = SH * C * static_cast<int64_t>(sizeof(scalar_t));
    const sparse_conv::Layout layout =
        sparse_conv::choose_layout(segs, g, C, out.size(1), std::is_same_v<scalar_t, float> && cpu_gemm::available());
    if (layout == sparse_conv::Layout::kPixels) {
      // one k x k window per output pixel: the batch [N, C, k, k] (channels_last) is the
      // im2col matrix [N, k*k*C] in (row, column, channel) order, and the convolution is one
      // GEMM: float32 through oneDNN's BRGEMM micro-kernel with the epilogue fused (gemm_cpu.h),
      // else oneDNN's 1x1 convolution of the matrix viewed as a [1, k*k*C, N, 1] channels_last
      // image (not at::addmm: MKL's sgemm ran at half oneDNN's rate on a Zen 5 CPU), N padded on
      // the ladder (zero rows) so that a layer sees few shapes, one oneDNN primitive each.
      const int64_t KK = g.k * g.k, Cout = w.size(0);
      const int64_t max_per_call = sparse_conv::windows_per_call(
          KK * C * static_cast<int64_t>(sizeof(scalar_t)), weight.numel() * weight.element_size());
      const std::vector<Segment> pixels = sparse_conv::make_pixels(segs, g);
      if (pixels_gemm<scalar_t>(pixels, max_per_call, g, x, x2, weight, bias, scale, shift, act, out_act, addv, residual,
                                accumulate, out)) {
        return;
      }
      const at::Tensor wmat = w.permute({0, 2, 3, 1}).reshape({Cout, KK * C, 1, 1});
      sparse_conv::for_each_batch(pixels, max_per_call, g.k, 1, [&](const std::vector<Segment>& batch) {
        const int64_t n_here = static_cast<int64_t>(batch.size());
        const int64_t N = std::max(n_here, sparse_conv::window_batch(n_here, max_per_call));
        at::Tensor cols = at::empty({N, C, g.k, g.k}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
        if (N > n_here) cols.narrow(0, n_here, N - n_here).zero_();
        gather<scalar_t>(batch, g, x, x2, scale, shift, act, cols);
        const at::Tensor a = cols.permute({0, 2, 3, 1}).reshape({1, N, 1, KK * C}).permute({0, 3, 1, 2});
        const at::Tensor y = at::conv2d(a, wmat, bias, one, zero, one, 1);
        // y [1, C_out, N, 1]: its channels_last memory is [N, C_out], pixel i at "row" i
        scatter<scalar_t>(batch, y, out_act, addv, residual, accumulate, out);
      });
      return;
    }
    if (layout == sparse_conv::Layout::kWindows) {
      // window batches within a strip's byte budget, each size on the ladder (extra windows
      // stay zero)
      const int64_t WW = (g.tw - 1) * g.s + g.k;
      const int64_t max_per_call =
          sparse_conv::windows_per_call(col_bytes * WW, weight.numel() * weight.element_size());
      sparse_conv::for_each_batch(sparse_conv::make_windows(segs, g), max_per_call, SH, g.th,
                                  [&](const std::vector<Segment>& batch) {
        const int64_t n_here = static_cast<int64_t>(batch.size());
        const int64_t N = std::max(n_here, sparse_conv::window_batch(n_here, max_per_call));
        at::Tensor strip = at::empty({N, C, SH, WW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
        if (N > n_here) strip.narrow(0, n_here, N - n_here).zero_();
        gather<scalar_t>(batch, g, x, x2, scale, shift, act, strip);
        at::Tensor y = at::conv2d(strip, w, bias, st, zero, one, 1);
        scatter<scalar_t>(batch, y, out_act, addv, residual, accumulate, out);
      });
      return;
    }
    // strips: the level needs at most every band's full window row
    const int64_t max_cols = B * ceil_div(g.Ho, g.th) * ((g.Wo - 1) * g.s + g.k + g.s);
    const int64_t full = sparse_conv::chunk_width(col_bytes, weight.numel() * weight.element_size(), max_cols, g);
    for (const sparse_conv::Chunk& ch : sparse_conv::make_chunks(segs, g, full)) {
      const std::vector<Segment>& chunk = ch.segs;
      const int64_t chunk_w = ch.width;
      at::Tensor strip = at::empty({1, C, SH, chunk_w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
      gather<scalar_t>(chunk, g, x, x2, scale, shift, act, strip);
      at::Tensor y = transposed ? at::conv_transpose2d(strip, w, bias, st, zero, zero, 1, one)
                                : at::conv2d(strip, w, bias, st, zero, one, 1);
      scatter<scalar_t>(chunk, y, out_act, addv, residual, accumulate, out);
    }
  });
}

}  // namespace yoda
