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
//   direct:  (float32, stride 1) every segment its own halo'd window, and the convolution an
//            implicit GEMM over it through oneDNN's BRGEMM micro-kernel, one call per kernel tap,
//            each finished block written straight into `out` through the epilogue: no junk
//            between segments, no convolution output and no scatter pass (the strips' scatter
//            reads and writes every output once more). It runs compact masks at 0.8-1.1 of
//            f x dense where strips took 0.9-1.4 (most at the wide levels).
// sparse_conv_plan.h picks the cheapest per call (choose_layout).  For the first three the
// scatter writes each segment's outputs into `out` with the epilogue (activation,
// per-(image, channel) add, residual).
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

// Row y of segment sg's input window, prologue applied: sg.in_w pixels of C channels (x's C1,
// then x2's) written to dst with pixel stride C; `ix` is scratch.
template <typename scalar_t>
void gather_row(const Segment& sg, int64_t y, const ConvGeometry& g, const at::Tensor& x,
                const std::optional<at::Tensor>& x2, const std::vector<at::opmath_type<scalar_t>>& scale,
                const std::vector<at::opmath_type<scalar_t>>& shift, int64_t act, scalar_t* dst,
                std::vector<int64_t>& ix) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C1 = x.size(1), C2 = x2.has_value() ? x2->size(1) : 0, C = C1 + C2;
  const int64_t vy = sg.vy0 + y;
  const int64_t iy = g.transposed ? ((vy >= 0 && vy < g.H) ? vy : -1) : source_index(vy, g.Hv, g.u, g.reflect);
  if (iy < 0) {
    std::memset(dst, 0, sizeof(scalar_t) * C * sg.in_w);
    return;
  }
  const bool has_norm = !scale.empty();
  const acc_t* a = has_norm ? scale.data() + sg.b * C : nullptr;
  const acc_t* sh = has_norm ? shift.data() + sg.b * C : nullptr;
  ix.resize(sg.in_w);
  for (int64_t q = 0; q < sg.in_w; ++q) {
    const int64_t vx = sg.vx0 + q;
    ix[q] = g.transposed ? ((vx >= 0 && vx < g.W) ? vx : -1) : source_index(vx, g.Wv, g.u, g.reflect);
  }
  const Strides4 sx = strides_of(x);
  gather_pixels_any<scalar_t>(act, has_norm, dst, C, x.const_data_ptr<scalar_t>() + sg.b * sx.b + iy * sx.h, ix.data(),
                              sg.in_w, sx.w, sx.c, C1, a, sh);
  if (C2) {
    const Strides4 sx2 = strides_of(*x2);
    gather_pixels_any<scalar_t>(act, has_norm, dst + C1, C, x2->const_data_ptr<scalar_t>() + sg.b * sx2.b + iy * sx2.h,
                                ix.data(), sg.in_w, sx2.w, sx2.c, C2, a ? a + C1 : nullptr, sh ? sh + C1 : nullptr);
  }
}

template <typename scalar_t>
void gather(const std::vector<Segment>& segs, const ConvGeometry& g, const at::Tensor& x,
            const std::optional<at::Tensor>& x2, const std::vector<at::opmath_type<scalar_t>>& scale,
            const std::vector<at::opmath_type<scalar_t>>& shift, int64_t act, at::Tensor& strip) {
  const int64_t SH = strip.size(2), SW = strip.size(3);
  const int64_t C = x.size(1) + (x2.has_value() ? x2->size(1) : 0);
  // channels_last [1, C, SH, SW]: (row, col, c); a window batch [N, C, SH, SW] is the same
  // memory as one strip N * SH rows tall, each window at rows in_row .. in_row + SH
  scalar_t* sp = strip.data_ptr<scalar_t>();
  // strip rows x segments; the columns between segments' windows are zeroed by their row task
  const int64_t nseg = static_cast<int64_t>(segs.size());
  // grain: about kElementsPerTask elements per task, a task being one strip row of one segment
  const int64_t task_elems = std::max<int64_t>(1, SW * C / std::max<int64_t>(nseg, 1));
  at::parallel_for(0, nseg * SH, std::max<int64_t>(1, kElementsPerTask / task_elems), [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> ix;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t si = task / SH;
      const Segment& sg = segs[si];
      const int64_t y = task % SH;
      scalar_t* row = sp + ((sg.in_row + y) * SW) * C;
      // zero the columns up to the next window in the same strip rows (or to the row's end)
      const bool next_shares = si + 1 < nseg && segs[si + 1].in_row == sg.in_row;
      const int64_t gap_end = next_shares ? segs[si + 1].in_col : SW;
      for (int64_t xs = sg.in_col + sg.in_w; xs < gap_end; ++xs) std::memset(row + xs * C, 0, sizeof(scalar_t) * C);
      if (si == 0 || segs[si - 1].in_row != sg.in_row) {
        for (int64_t xs = 0; xs < sg.in_col; ++xs) std::memset(row + xs * C, 0, sizeof(scalar_t) * C);
      }
      gather_row<scalar_t>(sg, y, g, x, x2, scale, shift, act, row + sg.in_col * C, ix);
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

// Where the BRGEMM layouts (pixels, direct) put a finished accumulator block: straight into
// `out` (float32), through the epilogue (activation, per-(image, channel) add, residual; with
// `accumulate` the residual is out itself, each element read before it is written).
struct BlockWriter {
  float* op;
  Strides4 so;
  const float* rp;
  Strides4 sr;
  const std::vector<float>& addv;
  int64_t out_act, Cout;

  BlockWriter(at::Tensor& out, const std::optional<at::Tensor>& residual, bool accumulate,
              const std::vector<float>& add, int64_t act)
      : op(out.data_ptr<float>()), so(strides_of(out)), addv(add), out_act(act), Cout(out.size(1)) {
    rp = accumulate ? op : residual.has_value() ? residual->const_data_ptr<float>() : nullptr;
    sr = accumulate ? so : residual.has_value() ? strides_of(*residual) : Strides4{0, 0, 0, 0};
  }

  // `run` output pixels of image b from (oy, ox) along the row, channels [n0, n0 + nn): acc
  // rows of nn values each
  void write(int64_t b, int64_t oy, int64_t ox, int64_t n0, int64_t nn, const float* acc, int64_t run) const {
    const float* ap = addv.empty() ? nullptr : addv.data() + b * Cout + n0;
    const float* res = rp ? rp + b * sr.b + oy * sr.h + ox * sr.w + n0 * sr.c : nullptr;
    scatter_pixels_any<float>(out_act, ap != nullptr, res != nullptr, op + b * so.b + oy * so.h + ox * so.w + n0 * so.c,
                              so.w, so.c, acc, run, nn, ap, res, sr.w, sr.c);
  }
};

// What the BRGEMM layouts (pixels, direct) share of a float32 call: the prologue's inputs, the
// weight packed for the GEMM (gemm_cpu.h), the bias, and where finished blocks go.
struct BrgemmConv {
  const ConvGeometry& g;
  const at::Tensor& x;
  const std::optional<at::Tensor>& x2;
  const std::vector<float>& scale;
  const std::vector<float>& shift;
  int64_t act;
  int64_t C, Cout;
  at::Tensor wmat;  // cpu_gemm::packed_weight: [k * k * C, C_out]
  at::Tensor bias;  // contiguous, or undefined
  BlockWriter writer;

  const float* bias_data() const { return bias.defined() ? bias.const_data_ptr<float>() : nullptr; }
};

// The call's BRGEMM state, or nullopt where BRGEMM cannot serve it (not float32, or
// cpu_gemm::available() is false): then the strip, window and 1x1-convolution paths do.
template <typename scalar_t>
std::optional<BrgemmConv> brgemm_conv(const ConvGeometry& g, const at::Tensor& x, const std::optional<at::Tensor>& x2,
                                      const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                      const std::vector<at::opmath_type<scalar_t>>& scale,
                                      const std::vector<at::opmath_type<scalar_t>>& shift, int64_t act,
                                      int64_t out_act, const std::vector<at::opmath_type<scalar_t>>& addv,
                                      const std::optional<at::Tensor>& residual, bool accumulate, at::Tensor& out) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    return std::nullopt;
  } else {
    if (!cpu_gemm::available()) return std::nullopt;
    return BrgemmConv{g,
                      x,
                      x2,
                      scale,
                      shift,
                      act,
                      x.size(1) + (x2.has_value() ? x2->size(1) : 0),
                      out.size(1),
                      cpu_gemm::packed_weight(weight),
                      bias.has_value() ? bias->contiguous() : at::Tensor(),
                      BlockWriter(out, residual, accumulate, addv, out_act)};
  }
}

// The pixel layout's im2col GEMM through oneDNN's BRGEMM micro-kernel, the epilogue fused into
// each finished block.
void pixels_gemm(const std::vector<Segment>& pixels, int64_t max_per_call, const BrgemmConv& c) {
  const ConvGeometry& g = c.g;
  sparse_conv::for_each_batch(pixels, max_per_call, g.k, 1, [&](const std::vector<Segment>& batch) {
    const int64_t N = static_cast<int64_t>(batch.size());
    at::Tensor cols = at::empty({N, c.C, g.k, g.k}, c.x.options().memory_format(at::MemoryFormat::ChannelsLast));
    gather<float>(batch, g, c.x, c.x2, c.scale, c.shift, c.act, cols);
    cpu_gemm::gemm(cols.const_data_ptr<float>(), N, g.k * g.k * c.C, c.wmat.const_data_ptr<float>(), c.Cout,
                   c.bias_data(), [&](int64_t m0, int64_t rows, int64_t n0, int64_t n, const float* acc) {
      for (int64_t i = 0; i < rows; ++i) {
        const Segment& px = batch[m0 + i];
        c.writer.write(px.b, px.r0, px.x0, n0, n, acc + i * n, 1);
      }
    });
  });
}

// The direct layout (float32, stride 1, not transposed, through BRGEMM): each segment's halo'd
// input window is gathered, prologue applied, into a block of its own [SH, in_w, C], and the
// convolution is an implicit GEMM over it. With q the window's flat pixel index, output pixel
// (q / in_w, q % in_w) is the sum over taps (dy, dx) of window pixel q + dy * in_w + dx times the
// tap's weight [C, C_out], so each tap is one GEMM whose A rows are consecutive window pixels
// (row stride C), summed into one accumulator block; the k - 1 columns q % in_w >= w wrap into
// the next row and are junk (computed, never written). Each finished block goes straight into
// `out` through the epilogue: no strip output, no scatter pass, and no junk columns between
// segments (a strip computes k - 1 per segment too, then copies every output once more).
void direct_gemm(const std::vector<Segment>& segs, int64_t SH, const BrgemmConv& c) {
  const ConvGeometry& g = c.g;
  TORCH_INTERNAL_ASSERT(!g.transposed && g.s == 1, "the direct layout takes stride-1 convolutions");
  const int64_t C = c.C, Cout = c.Cout, k = g.k;
  const float* wp = c.wmat.const_data_ptr<float>();
  const float* bp = c.bias_data();
  // each segment's window offset in one buffer of all of them, in floats
  std::vector<int64_t> offset{0};
  for (const Segment& sg : segs) offset.push_back(offset.back() + SH * sg.in_w * C);
  // chunks of whole segments, about chunk_bytes() of windows each (they stay in cache between
  // the gather and the GEMM), each gathered, then convolved
  const int64_t budget = sparse_conv::chunk_bytes() / static_cast<int64_t>(sizeof(float));
  std::vector<size_t> ends;
  int64_t most = 0;
  for (size_t i = 0; i < segs.size();) {
    size_t j = i + 1;
    while (j < segs.size() && offset[j + 1] - offset[i] <= budget) ++j;
    ends.push_back(j);
    most = std::max(most, offset[j] - offset[i]);
    i = j;
  }
  at::Tensor buffer = at::empty({most}, c.x.options());
  float* windows = buffer.data_ptr<float>();
  for (size_t chunk = 0, first = 0; chunk < ends.size(); first = ends[chunk++]) {
    const size_t last = ends[chunk];
    const int64_t nseg = static_cast<int64_t>(last - first);
    // segment i's window, i counted from the chunk's first
    auto window_of = [&](int64_t i) { return windows + offset[first + i] - offset[first]; };
    const int64_t row_elems = std::max<int64_t>(1, (offset[last] - offset[first]) / (nseg * SH));
    at::parallel_for(0, nseg * SH, std::max<int64_t>(1, kElementsPerTask / row_elems), [&](int64_t lo, int64_t hi) {
      std::vector<int64_t> ix;
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t i = task / SH, y = task % SH;
        gather_row<float>(segs[first + i], y, g, c.x, c.x2, c.scale, c.shift, c.act,
                          window_of(i) + y * segs[first + i].in_w * C, ix);
      }
    });
    // row blocks of up to kRows flat outputs, each made of pieces of segments: a long
    // segment spans several blocks, short ones share one, so that every weight slice a block
    // reads serves up to kRows outputs (1-px tiles of deep levels: segments of 1-3 outputs,
    // whose weights, 9-19 MB at 512-1024 channels, each segment alone re-read)
    struct Piece {
      int64_t seg, m0, mm, row;  // segment in chunk, its flat outputs [m0, m0 + mm), acc row
    };
    std::vector<Piece> pieces;
    std::vector<int64_t> block_start{0};
    int64_t fill = 0;
    for (int64_t i = 0; i < nseg; ++i) {
      const Segment& sg = segs[first + i];
      const int64_t M = (sg.rows - 1) * sg.in_w + sg.w;
      for (int64_t m0 = 0; m0 < M;) {
        if (fill == cpu_gemm::kRows) {
          block_start.push_back(static_cast<int64_t>(pieces.size()));
          fill = 0;
        }
        const int64_t mm = std::min(cpu_gemm::kRows - fill, M - m0);
        pieces.push_back({i, m0, mm, fill});
        fill += mm;
        m0 += mm;
      }
    }
    block_start.push_back(static_cast<int64_t>(pieces.size()));
    // tasks: (column block, row block), column-block-major so that neighbouring tasks share
    // the weights' columns
    const int64_t row_blocks = static_cast<int64_t>(block_start.size()) - 1;
    const int64_t cols = cpu_gemm::column_block(Cout, row_blocks);
    const int64_t col_blocks = ceil_div(Cout, cols);
    at::parallel_for(0, col_blocks * row_blocks, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> acc(cpu_gemm::kRows * cols);
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t n0 = (task / row_blocks) * cols, nn = std::min(cols, Cout - n0);
        const int64_t blk = task % row_blocks;
        const Piece* p0 = pieces.data() + block_start[blk];
        const Piece* p1 = pieces.data() + block_start[blk + 1];
        if (bp) {
          const int64_t rows = (p1 - 1)->row + (p1 - 1)->mm;
          for (int64_t r = 0; r < rows; ++r) std::memcpy(acc.data() + r * nn, bp + n0, sizeof(float) * nn);
        }
        // taps outermost: a tap's weight slice [C, nn] stays in cache across the pieces
        for (int64_t dy = 0; dy < k; ++dy) {
          for (int64_t dx = 0; dx < k; ++dx) {
            const bool add = bp != nullptr || dy > 0 || dx > 0;
            for (const Piece* pc = p0; pc != p1; ++pc) {
              const float* win = window_of(pc->seg);
              cpu_gemm::accumulate(pc->mm, nn, C, C, Cout, nn, add,
                                   win + (pc->m0 + dy * segs[first + pc->seg].in_w + dx) * C,
                                   wp + (dy * k + dx) * C * Cout + n0, acc.data() + pc->row * nn);
            }
          }
        }
        // epilogue: each run of valid outputs within one output row, written in place
        for (const Piece* pc = p0; pc != p1; ++pc) {
          const Segment& sg = segs[first + pc->seg];
          for (int64_t r = 0; r < pc->mm;) {
            const int64_t q = pc->m0 + r, row = q / sg.in_w, col = q % sg.in_w;
            if (col >= sg.w) {  // junk: the window's last k - 1 columns
              r += sg.in_w - col;
              continue;
            }
            const int64_t run = std::min(sg.w - col, pc->mm - r);
            c.writer.write(sg.b, sg.r0 + row, sg.x0 + col, n0, nn, acc.data() + (pc->row + r) * nn, run);
            r += run;
          }
        }
      }
    });
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
    const bool brgemm_layout = layout == sparse_conv::Layout::kDirect || layout == sparse_conv::Layout::kPixels;
    const std::optional<BrgemmConv> fast =
        brgemm_layout ? brgemm_conv<scalar_t>(g, x, x2, weight, bias, scale, shift, act, out_act, addv, residual,
                                              accumulate, out)
                      : std::nullopt;
    if (layout == sparse_conv::Layout::kDirect) {
      // chosen only where BRGEMM serves the call (choose_layout's fast_gemm)
      TORCH_INTERNAL_ASSERT(fast.has_value(), "the direct layout needs float32 and BRGEMM");
      direct_gemm(segs, SH, *fast);
      return;
    }
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
      if (fast.has_value()) {
        pixels_gemm(pixels, max_per_call, *fast);
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
