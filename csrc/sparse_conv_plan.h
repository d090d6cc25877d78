// The host-side plan of the tile-sparse convolution, shared by the CPU and CUDA kernels
// (sparse_conv_cpu.cpp, sparse_conv_cuda.cu): listed tiles -> row segments -> their places in
// a strip (see sparse_conv_cpu.cpp for the scheme), and the chunking of segments into strips.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#ifdef __CUDACC__
#define YODA_HOST_DEVICE __host__ __device__
#else
#define YODA_HOST_DEVICE
#endif

namespace yoda {
namespace sparse_conv {

// Bytes of one strip (4 MiB: it stays in cache between the gather and the convolution, and
// malloc reuses its memory). YODA_SPARSE_CONV_STRIP_BYTES overrides it (the tests use small
// strips to exercise the splitting of segments across strips).
inline int64_t chunk_bytes() {
  const char* env = std::getenv("YODA_SPARSE_CONV_STRIP_BYTES");
  const long long v = env ? std::atoll(env) : 0;
  return v > 0 ? static_cast<int64_t>(v) : (int64_t(4) << 20);
}

// One run of adjacent active tiles in one tile row of one image, and where it sits in the strip.
struct Segment {
  int64_t b;
  int64_t r0, rows;        // first output row, valid output rows (<= th)
  int64_t x0, w;           // first output column, output columns
  int64_t vy0, vx0;        // virtual-input row/column of the window's first strip row/column
  int64_t in_col, in_w;    // strip input columns [in_col, in_col + in_w)
  int64_t out_row, out_col;  // strip output row/column of the segment's first output
  int64_t in_row = 0;      // strip input row of the window's first row (window batches: n * SH)
};

struct ConvGeometry {
  int64_t k, s, p, u;
  bool transposed, reflect;
  int64_t H, W;      // x's size
  int64_t Hv, Wv;    // the virtual input's size (x upsampled by u)
  int64_t th, tw;
  int64_t Ho, Wo;
};

// The geometry of one call: x [B, C, H, W] read through nearest x`upsample`, `weight`'s kernel,
// `out` [B, C_out, Ho, Wo], tiles of th x tw output pixels; padding_mode 1 = reflect.
inline ConvGeometry make_geometry(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
                                  at::IntArrayRef tile, int64_t stride, int64_t padding, int64_t padding_mode,
                                  int64_t upsample, bool transposed) {
  ConvGeometry g;
  g.k = weight.size(3);
  g.s = stride;
  g.p = padding;
  g.u = upsample;
  g.transposed = transposed;
  g.reflect = padding_mode == 1;
  g.H = x.size(2);
  g.W = x.size(3);
  g.Hv = g.H * g.u;
  g.Wv = g.W * g.u;
  g.th = tile[0];
  g.tw = tile[1];
  g.Ho = out.size(2);
  g.Wo = out.size(3);
  return g;
}

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// Sorted, de-duplicated (b, row, col) tiles -> segments with their strip placement.
inline std::vector<Segment> make_segments(const at::Tensor& tiles, int64_t n, const ConvGeometry& g, int64_t B,
                                   int64_t* strip_h) {
  const at::Tensor t = tiles.narrow(0, 0, n).contiguous();
  const int32_t* tp = t.const_data_ptr<int32_t>();
  const int64_t nH = ceil_div(g.Ho, g.th), nW = ceil_div(g.Wo, g.tw);
  std::vector<int64_t> keys;
  keys.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = tp[3 * i], r = tp[3 * i + 1], c = tp[3 * i + 2];
    TORCH_CHECK(b >= 0 && b < B && r >= 0 && r < nH && c >= 0 && c < nW, "tiles: row ", i, " = (", b, ", ", r, ", ",
                c, ") is outside b < ", B, ", tile_row < ", nH, ", tile_col < ", nW);
    keys.push_back((b * nH + r) * nW + c);
  }
  std::sort(keys.begin(), keys.end());
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  std::vector<Segment> segs;
  const int64_t s = g.s, k = g.k, p = g.p;
  for (size_t i = 0; i < keys.size();) {
    size_t j = i + 1;
    while (j < keys.size() && keys[j] == keys[j - 1] + 1 && keys[j] % nW != 0) ++j;
    const int64_t key = keys[i];
    Segment sg;
    sg.b = key / (nH * nW);
    const int64_t r = (key / nW) % nH, c0 = key % nW, c1 = c0 + static_cast<int64_t>(j - i);
    sg.r0 = r * g.th;
    sg.rows = std::min(g.th, g.Ho - sg.r0);
    sg.x0 = c0 * g.tw;
    sg.w = std::min(c1 * g.tw, g.Wo) - sg.x0;
    if (!g.transposed) {
      // output o reads virtual input o*s - p .. o*s - p + k - 1
      sg.vy0 = sg.r0 * s - p;
      sg.vx0 = sg.x0 * s - p;
      sg.in_w = (sg.w - 1) * s + k;
    } else {
      // output o = i*s - p + kk: outputs [x0, x0 + w) need inputs ceil((x0 + p - k + 1)/s) ..
      // floor((x0 + w - 1 + p)/s); windows of neighbouring segments never reach each other's
      // outputs, so they pack without a gap
      sg.vy0 = ceil_div(sg.r0 + p - k + 1, s);
      sg.vx0 = ceil_div(sg.x0 + p - k + 1, s);
      sg.in_w = floor_div(sg.x0 + sg.w - 1 + p, s) - sg.vx0 + 1;
    }
    segs.push_back(sg);
    i = j;
  }
  *strip_h = g.transposed ? floor_div(g.th - 1 + p, s) - ceil_div(p - k + 1, s) + 1 : (g.th - 1) * s + k;
  return segs;
}

// Index into the virtual input along one axis, or -1 where the padding is zero.
YODA_HOST_DEVICE inline int64_t source_index(int64_t v, int64_t n_virtual, int64_t u, bool reflect) {
  if (v < 0 || v >= n_virtual) {
    if (!reflect) return -1;
    v = v < 0 ? -v : 2 * (n_virtual - 1) - v;
    if (v < 0 || v >= n_virtual) return -1;  // beyond one reflection: only feeds cropped outputs
  }
  return v / u;
}

// The input window of outputs [x0, x0 + w) of one band: its first virtual column and width.
inline void window(int64_t x0, int64_t w, const ConvGeometry& g, int64_t* vx0, int64_t* in_w) {
  if (!g.transposed) {
    *vx0 = x0 * g.s - g.p;
    *in_w = (w - 1) * g.s + g.k;
  } else {
    *vx0 = ceil_div(x0 + g.p - g.k + 1, g.s);
    *in_w = floor_div(x0 + w - 1 + g.p, g.s) - *vx0 + 1;
  }
}

// One strip: its segments (placed) and its width in input columns.
struct Chunk {
  std::vector<Segment> segs;
  int64_t width = 0;
};

// Strip widths of a layer: `full` columns per chunk. A strip holds chunk_bytes(), or twice the
// weights where those are larger (every convolution call reorders its weights into the
// library's blocked layout: a 1024 -> 512 3x3 layer over three strips took 11% longer than over
// one), but never more than the whole level needs (`max_cols`).
inline int64_t chunk_width(int64_t col_bytes, int64_t weight_bytes, int64_t max_cols, const ConvGeometry& g) {
  const int64_t min_w = g.k + 2 * g.s * std::max(g.tw, int64_t(1));
  const int64_t bytes = std::max(chunk_bytes(), 2 * weight_bytes);
  const int64_t f = std::max<int64_t>(bytes / std::max<int64_t>(col_bytes, 1), 16);
  return std::max<int64_t>(std::min(f, max_cols), min_w);
}

// The width a strip of `need` columns is given: rounded up on a ladder of 8 widths per octave
// (at most 12.5% more, at least 8). Strips then take few widths per layer whatever the mask:
// oneDNN (and cuDNN) build one primitive per shape, and building new ones every step (JIT code
// generation, 0.5-3 ms here) cost more than the sparse convolution saved; a fixed coarse
// quantum instead cost up to a third of a deep level's dense time for a single active tile.
inline int64_t ladder_width(int64_t need) {
  if (need <= 8) return 8;
  int64_t e = 0;
  while ((int64_t(1) << (e + 1)) <= need) ++e;
  const int64_t step = int64_t(1) << std::max<int64_t>(e - 3, 0);
  return ceil_div(need, step) * step;
}

// Cut the segments into strips of exactly `full` columns (the last one given its ladder_width),
// splitting a segment where a strip ends (each piece with its own halo), and place them: input
// columns, output row/column.
inline std::vector<Chunk> make_chunks(const std::vector<Segment>& segs, const ConvGeometry& g, int64_t full) {
  std::vector<Chunk> chunks(1);
  int64_t col = 0;
  const int64_t s = g.s, p = g.p;
  for (const Segment& sg : segs) {
    int64_t from = 0;
    while (from < sg.w) {
      const int64_t start = g.transposed ? col : ceil_div(col, s) * s;
      const int64_t room = full - start;
      const int64_t left = sg.w - from;
      int64_t w = 0, vx0 = 0, in_w = 0;
      if (!g.transposed) {
        w = room >= g.k ? std::min(left, (room - g.k) / s + 1) : 0;
      } else {
        w = std::min(left, std::max<int64_t>(room, 0) * s);
        while (w > 0) {
          window(sg.x0 + from, w, g, &vx0, &in_w);
          if (in_w <= room) break;
          --w;
        }
      }
      if (w <= 0) {  // this strip is full: start the next one
        chunks.back().width = full;
        chunks.emplace_back();
        col = 0;
        continue;
      }
      Segment pc = sg;
      pc.x0 = sg.x0 + from;
      pc.w = w;
      window(pc.x0, w, g, &pc.vx0, &pc.in_w);
      pc.in_col = start;
      if (!g.transposed) {
        pc.out_row = 0;
        pc.out_col = start / s;  // strip output column j reads input columns j*s ..
      } else {
        pc.out_row = pc.r0 + p - pc.vy0 * s;
        pc.out_col = start * s + pc.x0 + p - pc.vx0 * s;
      }
      chunks.back().segs.push_back(pc);
      col = start + pc.in_w;
      from += w;
    }
  }
  if (chunks.back().segs.empty()) {
    chunks.pop_back();
  } else {
    const int64_t need = std::max<int64_t>(col, g.transposed ? 1 : g.k);
    chunks.back().width = std::max(std::min(full, ladder_width(need)), need);
  }
  return chunks;
}

// The window-batch layout (CPU): every tile its own halo'd window, the windows stacked as a
// batch [N, C, SH, WW] with WW = (tw - 1) * s + k, so no output is junk; a strip of single-tile
// segments computes (tw + k - 1) / tw columns per useful one (+25% at 8 px).
//
// The layouts' costs that choose between them, in units of the dense convolution's time per
// output pixel, fitted to a sweep of all three layouts with the fused prologue and epilogue the
// engine uses (benchmarks/bench_conv_layouts.py --fused: 2-core Zen 5 CPU, fp32, C 64-1024,
// tiles 1-8 px, compact, blob and random masks; benchmarks/RESULTS.md):
//  * strips: 0.94 per column computed (junk included), 1.2 for strips one output row tall
//    (1-px tiles: oneDNN on 3-row images);
//  * windows: 1.06 per pixel from 4 px on (1.8 at 2-3 px, 3.5 at 1 px) plus about
//    2.6 / N * 128 / C for a batch of N windows of C input channels (a small batch leaves threads
//    idle), plus kWindowGather / C_out per gathered pixel, (t + k - 1)^2 of them per t^2 outputs
//    (a gathered pixel costs ~C_in, its share of the convolution 9 C_in C_out). The gather is
//    what makes window batches lose to strips on the Zen 5 CPU, whose convolutions run twice as
//    fast as on the Zen 4 of the first measurements (where windows won on scattered tiles);
//  * pixels: 1.11 per pixel through the BRGEMM GEMM (gemm_cpu.h; 1.4 through oneDNN's 1x1
//    convolution) plus kPixelGather / C_out per im2col entry (k^2 per pixel).
constexpr double kWindowGather = 22.0;
constexpr double kPixelGather = 5.5;

inline double strip_cost(const std::vector<Segment>& segs, const ConvGeometry& g) {
  double cols = 0;
  for (const Segment& sg : segs) cols += static_cast<double>(sg.rows) * (sg.w + ceil_div(g.k - g.s, g.s));
  return (g.th == 1 ? 1.2 : 0.94) * cols;
}

inline double window_cost(const std::vector<Segment>& segs, const ConvGeometry& g, int64_t channels,
                          int64_t out_channels) {
  int64_t tiles = 0;
  for (const Segment& sg : segs) tiles += ceil_div(sg.w, g.tw);
  const double small_batch = 2.6 / static_cast<double>(std::max<int64_t>(tiles, 1)) * 128.0 /
                             static_cast<double>(std::max<int64_t>(channels, 1));
  const int64_t side = std::min(g.th, g.tw);
  const double per_pixel = (side >= 4 ? 1.06 : side >= 2 ? 1.8 : 3.5) + small_batch;
  const double window = static_cast<double>(((g.th - 1) * g.s + g.k) * ((g.tw - 1) * g.s + g.k));
  return per_pixel * static_cast<double>(tiles * g.th * g.tw) +
         kWindowGather * window * static_cast<double>(tiles) / static_cast<double>(std::max<int64_t>(out_channels, 1));
}

// The pixel layout (CPU): one k x k window per output pixel, which is an im2col matrix
// [pixels, k*k*C], convolved by one GEMM. No halo work at all, at the price of gathering every
// input k*k times: it pays for the small tiles of deep levels, where C is large and the maps
// small (C 512-1024, 1-2 px tiles: 1.0-1.4x dense per pixel, against 1.2-2.7x in strips).
inline double pixel_cost(const std::vector<Segment>& segs, const ConvGeometry& g, int64_t out_channels,
                         bool fast_gemm) {
  int64_t pixels = 0;
  for (const Segment& sg : segs) pixels += sg.rows * sg.w;
  const double p = static_cast<double>(pixels);
  return (fast_gemm ? 1.11 : 1.4) * p +
         kPixelGather * static_cast<double>(g.k * g.k) * p / static_cast<double>(std::max<int64_t>(out_channels, 1));
}

// The direct layout (CPU, float32 through BRGEMM, stride 1): one halo'd window per segment and
// an implicit GEMM per kernel tap over it, written straight into the output (no scatter pass):
// kDirect per flat output computed (the k - 1 junk columns of each window row included) plus
// kDirectSegment per segment (a segment's GEMM calls are as many as a full row block's, and
// 1-3 output segments leave the micro-kernel streaming weights for a row or two). Fitted to the
// fused sweep (bench_conv_layouts.py --fused, 2-core AMD EPYC Zen 4, fp32): 0.85-1.12 of f x
// dense where strips took 0.87-1.38 on compact masks; isolated 1-px tiles at 512 channels 1.56,
// where the pixel layout's im2col GEMM (1.23) wins.
constexpr double kDirect = 0.92;
constexpr double kDirectSegment = 1.1;

inline double direct_cost(const std::vector<Segment>& segs) {
  double flat = 0;
  for (const Segment& sg : segs) flat += static_cast<double>((sg.rows - 1) * sg.in_w + sg.w);
  return kDirect * flat + kDirectSegment * static_cast<double>(segs.size());
}

enum class Layout { kStrips, kWindows, kPixels, kDirect };

// YODA_SPARSE_CONV_LAYOUT=strip|windows|pixels|direct forces a layout (tests, benchmarks; direct
// only where it runs: `fast_gemm`, stride 1, not transposed, else strips); otherwise the cheapest
// by the costs above (`fast_gemm`: the pixel and direct layouts' GEMMs run on BRGEMM;
// YODA_SPARSE_CONV_DIRECT=0 leaves the direct layout out, for comparisons). Transposed
// convolutions take strips; 1x1 ones strips or the direct layout (neither has junk columns).
inline Layout choose_layout(const std::vector<Segment>& segs, const ConvGeometry& g, int64_t channels,
                            int64_t out_channels, bool fast_gemm) {
  if (g.transposed) return Layout::kStrips;
  const char* off = std::getenv("YODA_SPARSE_CONV_DIRECT");
  const bool direct_runs = fast_gemm && g.s == 1 && !(off && std::string(off) == "0");
  const char* env = std::getenv("YODA_SPARSE_CONV_LAYOUT");
  if (env && std::string(env) == "direct") return fast_gemm && g.s == 1 ? Layout::kDirect : Layout::kStrips;
  if (g.k <= g.s) {
    if (env && std::string(env) == "strip") return Layout::kStrips;
    return direct_runs && direct_cost(segs) < strip_cost(segs, g) ? Layout::kDirect : Layout::kStrips;
  }
  if (env && std::string(env) == "strip") return Layout::kStrips;
  if (env && std::string(env) == "windows") return Layout::kWindows;
  if (env && std::string(env) == "pixels") return Layout::kPixels;
  Layout best = Layout::kStrips;
  double cost = strip_cost(segs, g);
  const double windows = window_cost(segs, g, channels, out_channels);
  if (windows < cost) best = Layout::kWindows, cost = windows;
  // pixels only for tiles under 4 px: that is where it was measured to win
  if (std::min(g.th, g.tw) < 4) {
    const double pixels = pixel_cost(segs, g, out_channels, fast_gemm);
    if (pixels < cost) best = Layout::kPixels, cost = pixels;
  }
  if (direct_runs && direct_cost(segs) < cost) best = Layout::kDirect;
  return best;
}

// One window per output pixel of each segment (the pixel layout), placed in a batch.
inline std::vector<Segment> make_pixels(const std::vector<Segment>& segs, const ConvGeometry& g) {
  std::vector<Segment> pix;
  for (const Segment& sg : segs) {
    for (int64_t rr = 0; rr < sg.rows; ++rr) {
      for (int64_t c = 0; c < sg.w; ++c) {
        Segment pc = sg;
        pc.r0 = sg.r0 + rr;
        pc.rows = 1;
        pc.x0 = sg.x0 + c;
        pc.w = 1;
        pc.vy0 = pc.r0 * g.s - g.p;
        window(pc.x0, 1, g, &pc.vx0, &pc.in_w);
        pc.in_col = 0;
        pc.out_col = 0;
        pix.push_back(pc);
      }
    }
  }
  return pix;
}

// Windows per convolution call: the byte budget of a strip (chunk_bytes(), or twice the weights)
// in windows of `window_bytes`.
inline int64_t windows_per_call(int64_t window_bytes, int64_t weight_bytes) {
  return std::max<int64_t>(1, std::max(chunk_bytes(), 2 * weight_bytes) / std::max<int64_t>(window_bytes, 1));
}

// The batch a call of n windows is given: n itself up to 16, then rounded up on the ladder
// (ladder_width: at most 12.5% more), so a layer sees few batch sizes (one oneDNN primitive each).
inline int64_t window_batch(int64_t n, int64_t per_call) {
  return std::min(per_call, n <= 16 ? n : ladder_width(n));
}

// Calls fn(batch) over `items` (windows or pixels) in equal batches of at most `max_per_call`
// (a small remainder batch runs less efficiently), each item placed at input rows
// i * in_rows and output rows i * out_rows of its batch.
template <typename Fn>
inline void for_each_batch(const std::vector<Segment>& items, int64_t max_per_call, int64_t in_rows,
                           int64_t out_rows, Fn&& fn) {
  const int64_t n = static_cast<int64_t>(items.size());
  if (n == 0) return;
  const int64_t per_call = ceil_div(n, ceil_div(n, max_per_call));
  for (int64_t first = 0; first < n; first += per_call) {
    const int64_t n_here = std::min(per_call, n - first);
    std::vector<Segment> batch(items.begin() + first, items.begin() + first + n_here);
    for (int64_t i = 0; i < n_here; ++i) {
      batch[i].in_row = i * in_rows;
      batch[i].out_row = i * out_rows;
    }
    fn(batch);
  }
}

// One window per tile of each segment, placed in a batch of windows: windows[i] is the tile
// (its output columns clipped at the image edge) and goes to batch entry i.
inline std::vector<Segment> make_windows(const std::vector<Segment>& segs, const ConvGeometry& g) {
  std::vector<Segment> wins;
  for (const Segment& sg : segs) {
    for (int64_t from = 0; from < sg.w; from += g.tw) {
      Segment pc = sg;
      pc.x0 = sg.x0 + from;
      pc.w = std::min(g.tw, sg.w - from);
      window(pc.x0, pc.w, g, &pc.vx0, &pc.in_w);
      pc.in_col = 0;
      pc.out_col = 0;
      wins.push_back(pc);
    }
  }
  return wins;
}

}  // namespace sparse_conv
}  // namespace yoda
