// CUDA kernels of the tile-sparse convolution: the CPU scheme (sparse_conv_cpu.cpp) on the GPU.
// The listed tiles are read on the host (one synchronisation per call) and planned into row
// segments and strips (sparse_conv_plan.h); per strip, a gather kernel writes the halo'd
// windows with the prologue applied (concat, group-norm apply, activation, nearest x2,
// zero/reflect padding) into a channels_last strip, cuDNN convolves the strip (at::conv2d /
// at::conv_transpose2d), and a scatter kernel writes the segments' outputs into `out` with the
// epilogue (activation, per-(image, channel) add, residual or accumulate).
//
// The Triton backend (kernels/sparse_conv.py) is the one without host synchronisation (CUDA
// graphs); this one keeps cuDNN's convolution. benchmarks/bench_sparse_conv.py times both.
#include "sparse_conv_plan.h"
#include "yoda_ops.h"

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace yoda {
namespace {

using sparse_conv::ConvGeometry;
using sparse_conv::Segment;
using sparse_conv::ceil_div;
using sparse_conv::source_index;

constexpr int kThreads = 256;

template <typename acc_t>
__device__ __forceinline__ acc_t activate_dev(acc_t v, int act) {
  if (act == 1) return v / (acc_t(1) + exp(-v));
  if (act == 2) {
    const acc_t e = exp(v < acc_t(20) ? v : acc_t(20));
    const acc_t n = e * (e + acc_t(2));
    return v > acc_t(20) ? v : v * n / (n + acc_t(2));
  }
  return v;
}

// Per strip column: which segment it belongs to (-1: a gap) and where its window starts.
struct ColumnInfo {
  int32_t seg;
  int32_t q;  // column inside the segment's window
};

struct SegmentDev {
  int64_t b, vy0, vx0;
};

template <typename scalar_t>
struct GatherArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* x2;
  Strides4 sx, sx2;
  int64_t C1, C2, SH, SW;
  const ColumnInfo* cols;
  const SegmentDev* segs;
  const acc_t* scale;  // [B, C] or null
  const acc_t* shift;
  int act;
  bool transposed, reflect;
  int64_t H, W, Hv, Wv, u;
  scalar_t* strip;  // channels_last [1, C, SH, SW]
};

template <typename scalar_t>
__global__ void gather_kernel(GatherArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = a.C1 + a.C2;
  const int64_t total = a.SH * a.SW * C;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % C;
    const int64_t pix = i / C;
    const int64_t xs = pix % a.SW;
    const int64_t y = pix / a.SW;
    const ColumnInfo ci = a.cols[xs];
    acc_t v = acc_t(0);
    if (ci.seg >= 0) {
      const SegmentDev sg = a.segs[ci.seg];
      const int64_t vy = sg.vy0 + y, vx = sg.vx0 + ci.q;
      int64_t iy, ix;
      if (a.transposed) {
        iy = (vy >= 0 && vy < a.H) ? vy : -1;
        ix = (vx >= 0 && vx < a.W) ? vx : -1;
      } else {
        iy = source_index(vy, a.Hv, a.u, a.reflect);
        ix = source_index(vx, a.Wv, a.u, a.reflect);
      }
      if (iy >= 0 && ix >= 0) {
        v = c < a.C1 ? static_cast<acc_t>(a.x[sg.b * a.sx.b + c * a.sx.c + iy * a.sx.h + ix * a.sx.w])
                     : static_cast<acc_t>(a.x2[sg.b * a.sx2.b + (c - a.C1) * a.sx2.c + iy * a.sx2.h + ix * a.sx2.w]);
        if (a.scale != nullptr) v = v * a.scale[sg.b * C + c] + a.shift[sg.b * C + c];
        v = activate_dev<acc_t>(v, a.act);
      }
    }
    a.strip[i] = static_cast<scalar_t>(v);
  }
}

// Per strip output column: segment (-1: junk) and output column j inside it.
template <typename scalar_t>
struct ScatterArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* y;  // channels_last [1, Cout, OH, OW]
  int64_t OH, OW, Cout;
  const ColumnInfo* cols;
  const int64_t* seg_r0;
  const int64_t* seg_rows;
  const int64_t* seg_x0;
  const int64_t* seg_out_row;
  const int64_t* seg_b;
  int act;
  const acc_t* add;  // [B, Cout] or null
  const scalar_t* res;
  Strides4 sr;
  scalar_t* out;
  Strides4 so;
  int64_t rows;  // output rows per segment in the strip (th)
};

template <typename scalar_t>
__global__ void scatter_kernel(ScatterArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = a.rows * a.OW * a.Cout;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % a.Cout;
    const int64_t pix = i / a.Cout;
    const int64_t col = pix % a.OW;
    const int64_t rr = pix / a.OW;
    const ColumnInfo ci = a.cols[col];
    if (ci.seg < 0 || rr >= a.seg_rows[ci.seg]) continue;
    const int64_t s = ci.seg;
    const int64_t yrow = a.seg_out_row[s] + rr;
    if (yrow < 0 || yrow >= a.OH) continue;
    acc_t v = static_cast<acc_t>(a.y[(yrow * a.OW + col) * a.Cout + c]);
    v = activate_dev<acc_t>(v, a.act);
    const int64_t b = a.seg_b[s], orow = a.seg_r0[s] + rr, ocol = a.seg_x0[s] + ci.q;
    if (a.add != nullptr) v += a.add[b * a.Cout + c];
    if (a.res != nullptr) v += static_cast<acc_t>(a.res[b * a.sr.b + c * a.sr.c + orow * a.sr.h + ocol * a.sr.w]);
    a.out[b * a.so.b + c * a.so.c + orow * a.so.h + ocol * a.so.w] = static_cast<scalar_t>(v);
  }
}

int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 4));
}

}  // namespace

void sparse_conv2d_cuda(const at::Tensor& x, const std::optional<at::Tensor>& x2, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const at::Tensor& tiles,
                        const std::optional<at::Tensor>& count, at::Tensor& out, at::IntArrayRef tile, int64_t stride,
                        int64_t padding, int64_t padding_mode, int64_t upsample, bool transposed,
                        const std::optional<at::Tensor>& norm_mean, const std::optional<at::Tensor>& norm_rstd,
                        const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
                        int64_t act, int64_t out_act, const std::optional<at::Tensor>& add,
                        const std::optional<at::Tensor>& residual, bool accumulate) {
  TORCH_CHECK(x.is_cuda() && out.is_cuda() && weight.is_cuda(), "x, weight and out must be CUDA tensors");
  TORCH_CHECK(x.dim() == 4 && out.dim() == 4 && weight.dim() == 4, "x, out and weight must be 4-D");
  TORCH_CHECK(is_supported_float(x.scalar_type()), "x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK(tile.size() == 2 && tile[0] > 0 && tile[1] > 0, "tile must be (th, tw) > 0");
  const c10::cuda::CUDAGuard guard(x.device());
  // the plan is made on the host: one synchronisation per call
  const at::Tensor tiles_host = tiles.to(at::kCPU);
  int64_t n = tiles_host.size(0);
  if (count.has_value()) {
    n = count->to(at::kCPU).reshape({-1})[0].item<int64_t>();
    TORCH_CHECK(n >= 0 && n <= tiles_host.size(0), "count ", n, " is outside [0, ", tiles_host.size(0), "]");
  }
  if (n == 0) return;
  const ConvGeometry g =
      sparse_conv::make_geometry(x, weight, out, tile, stride, padding, padding_mode, upsample, transposed);
  const int64_t B = x.size(0), C1 = x.size(1), C2 = x2.has_value() ? x2->size(1) : 0, C = C1 + C2;
  const int64_t Cout = out.size(1);
  int64_t SH = 0;
  std::vector<Segment> segs = sparse_conv::make_segments(tiles_host, n, g, B, &SH);
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor scale, shift;
  if (norm_mean.has_value()) {
    const int64_t G = norm_mean->size(1), per = C / G;
    const at::Tensor rstd = norm_rstd->to(acc_type).repeat_interleave(per, 1);
    const at::Tensor mean = norm_mean->to(acc_type).repeat_interleave(per, 1);
    const at::Tensor w = norm_weight.has_value() ? norm_weight->to(acc_type) : at::ones({C}, x.options().dtype(acc_type));
    const at::Tensor bb = norm_bias.has_value() ? norm_bias->to(acc_type) : at::zeros({C}, x.options().dtype(acc_type));
    scale = (rstd * w.unsqueeze(0)).contiguous();
    shift = (bb.unsqueeze(0) - mean * scale).contiguous();
  }
  const at::Tensor addv = add.has_value() ? add->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor wcl = weight.contiguous(at::MemoryFormat::ChannelsLast);
  const std::vector<int64_t> st{stride, stride}, zero{0, 0}, one{1, 1};
  const int64_t col_bytes = SH * C * static_cast<int64_t>(x.element_size());
  const auto idx_opts = at::TensorOptions().dtype(at::kLong);
    // the level needs at most every band's full window row
    const int64_t max_cols = B * ceil_div(g.Ho, g.th) * ((g.Wo - 1) * g.s + g.k + g.s);
    const int64_t full = sparse_conv::chunk_width(col_bytes, weight.numel() * weight.element_size(), max_cols, g);
  for (const sparse_conv::Chunk& ch : sparse_conv::make_chunks(segs, g, full)) {
    const std::vector<Segment>& chunk = ch.segs;
    const int64_t SW = ch.width;
    const int64_t nseg = static_cast<int64_t>(chunk.size());
    // host tables of the chunk, uploaded once
    std::vector<ColumnInfo> in_cols(SW, ColumnInfo{-1, 0});
    std::vector<int64_t> seg_tab(nseg * 8);
    for (int64_t s = 0; s < nseg; ++s) {
      const Segment& sg = chunk[s];
      for (int64_t q = 0; q < sg.in_w; ++q) in_cols[sg.in_col + q] = ColumnInfo{static_cast<int32_t>(s), static_cast<int32_t>(q)};
      const int64_t row[8] = {sg.b, sg.vy0, sg.vx0, sg.r0, sg.rows, sg.x0, sg.out_row, 0};
      std::copy(row, row + 8, seg_tab.begin() + s * 8);
    }
    at::Tensor strip = at::empty({1, C, SH, SW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    at::Tensor cols_dev = at::from_blob(in_cols.data(), {SW * 2}, at::TensorOptions().dtype(at::kInt)).to(x.device());
    at::Tensor tab_dev = at::from_blob(seg_tab.data(), {nseg, 8}, idx_opts).to(x.device());
    // SegmentDev rows: (b, vy0, vx0) = columns 0..2 of the table
    at::Tensor seg_dev = tab_dev.narrow(1, 0, 3).contiguous();
    at::Tensor y;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_conv_gather_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      GatherArgs<scalar_t> a;
      a.x = x.const_data_ptr<scalar_t>();
      a.x2 = C2 ? x2->const_data_ptr<scalar_t>() : nullptr;
      a.sx = strides_of(x);
      a.sx2 = C2 ? strides_of(*x2) : Strides4{0, 0, 0, 0};
      a.C1 = C1;
      a.C2 = C2;
      a.SH = SH;
      a.SW = SW;
      a.cols = reinterpret_cast<const ColumnInfo*>(cols_dev.const_data_ptr<int32_t>());
      a.segs = reinterpret_cast<const SegmentDev*>(seg_dev.const_data_ptr<int64_t>());
      a.scale = scale.defined() ? scale.const_data_ptr<acc_t>() : nullptr;
      a.shift = shift.defined() ? shift.const_data_ptr<acc_t>() : nullptr;
      a.act = static_cast<int>(act);
      a.transposed = transposed;
      a.reflect = g.reflect;
      a.H = g.H;
      a.W = g.W;
      a.Hv = g.Hv;
      a.Wv = g.Wv;
      a.u = g.u;
      a.strip = strip.data_ptr<scalar_t>();
      gather_kernel<scalar_t><<<blocks_for(SH * SW * C), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    y = transposed ? at::conv_transpose2d(strip, wcl, bias, st, zero, zero, 1, one)
                   : at::conv2d(strip, wcl, bias, st, zero, one, 1);
    y = y.contiguous(at::MemoryFormat::ChannelsLast);
    // output columns of the strip -> (segment, column inside it)
    const int64_t OW = y.size(3), OH = y.size(2);
    std::vector<ColumnInfo> out_cols(OW, ColumnInfo{-1, 0});
    for (int64_t s = 0; s < nseg; ++s) {
      const Segment& sg = chunk[s];
      for (int64_t j = 0; j < sg.w; ++j) {
        const int64_t col = sg.out_col + j;
        if (col >= 0 && col < OW) out_cols[col] = ColumnInfo{static_cast<int32_t>(s), static_cast<int32_t>(j)};
      }
    }
    at::Tensor ocols_dev = at::from_blob(out_cols.data(), {OW * 2}, at::TensorOptions().dtype(at::kInt)).to(x.device());
    const at::Tensor tab_t = tab_dev.t().contiguous();  // [8, nseg]: one array per field
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_conv_scatter_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      ScatterArgs<scalar_t> a;
      a.y = y.const_data_ptr<scalar_t>();
      a.OH = OH;
      a.OW = OW;
      a.Cout = Cout;
      a.cols = reinterpret_cast<const ColumnInfo*>(ocols_dev.const_data_ptr<int32_t>());
      const int64_t* tp = tab_t.const_data_ptr<int64_t>();
      a.seg_b = tp;
      a.seg_r0 = tp + 3 * nseg;
      a.seg_rows = tp + 4 * nseg;
      a.seg_x0 = tp + 5 * nseg;
      a.seg_out_row = tp + 6 * nseg;
      a.act = static_cast<int>(out_act);
      a.add = addv.defined() ? addv.const_data_ptr<acc_t>() : nullptr;
      a.res = accumulate ? out.const_data_ptr<scalar_t>()
                         : residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
      a.sr = accumulate ? strides_of(out) : residual.has_value() ? strides_of(*residual) : Strides4{0, 0, 0, 0};
      a.out = out.data_ptr<scalar_t>();
      a.so = strides_of(out);
      a.rows = g.th;
      scatter_kernel<scalar_t><<<blocks_for(g.th * OW * Cout), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

}  // namespace yoda
