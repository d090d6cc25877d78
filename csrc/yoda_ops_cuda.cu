// CUDA kernels of the yoda-sparse ops.
//
// Work unit: one "quad" of 4 consecutive elements in the logical contiguous [B,C,H,W] order
// per thread and loop trip (grid-stride, int64 indices).  For in-kernel noise a quad is one
// Philox block (counters 4 blk .. 4 blk + 3, see philox.h), so each thread makes exactly one
// Philox call per trip and uses all four normals; the quads are then shifted by offset % 4.
// Every operand is addressed through its own [B,C,H,W] strides (any view, no copies); the
// position of the first element of a quad is decomposed once (32-bit division when the
// numbers fit), the other three advance incrementally.
//
// NCHW-contiguous operands take the planar fast path (below): 16-byte loads per (b, c) plane.
//
// The loss forward is deterministic: fixed per-thread order, fixed shared-memory tree per
// block, per-block partials in float64, one finishing block that sums them in a fixed order.
#include "philox.h"
#include "yoda_ops.h"

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

namespace yoda {
namespace {

constexpr int kThreads = 256;

struct Dims {
  int64_t B, C, H, W, N;
};

Dims dims_of(const at::Tensor& t) {
  return {t.size(0), t.size(1), t.size(2), t.size(3), t.numel()};
}

struct Pos {
  int64_t b, c, h, w;
};

__device__ __forceinline__ void divmod(int64_t n, int64_t d, int64_t& q, int64_t& r) {
  if (((static_cast<uint64_t>(n) | static_cast<uint64_t>(d)) >> 32) == 0) {
    const uint32_t q32 = static_cast<uint32_t>(n) / static_cast<uint32_t>(d);
    q = q32;
    r = static_cast<int64_t>(static_cast<uint32_t>(n) - q32 * static_cast<uint32_t>(d));
  } else {
    q = n / d;
    r = n - q * d;
  }
}

__device__ __forceinline__ Pos decompose(int64_t i, const Dims& d) {
  Pos p;
  int64_t t;
  divmod(i, d.W, t, p.w);
  divmod(t, d.H, t, p.h);
  divmod(t, d.C, p.b, p.c);
  return p;
}

__device__ __forceinline__ void advance(Pos& p, const Dims& d) {
  if (++p.w == d.W) {
    p.w = 0;
    if (++p.h == d.H) {
      p.h = 0;
      if (++p.c == d.C) {
        p.c = 0;
        ++p.b;
      }
    }
  }
}

__device__ __forceinline__ int64_t offset_of(const Strides4& s, const Pos& p) {
  return p.b * s.b + p.c * s.c + p.h * s.h + p.w * s.w;
}

__device__ __forceinline__ int64_t mask_offset_of(const Strides4& s, const Pos& p) {
  return p.b * s.b + p.h * s.h + p.w * s.w;
}

__device__ __forceinline__ float absv(float x) { return fabsf(x); }
__device__ __forceinline__ double absv(double x) { return fabs(x); }

template <typename acc_t, typename mask_t>
__device__ __forceinline__ acc_t mask_value(const mask_t* m, int64_t off) {
  return static_cast<acc_t>(m[off]);
}

int grid_for(int64_t work_items) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = (work_items + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, sms * 8)));
}

// Sums each thread's (s, n) over the block in a fixed shared-memory tree (deterministic: the same
// order every run); the totals are valid in thread 0.
__device__ __forceinline__ void block_sum2(double& s, double& n) {
  __shared__ double sh_s[kThreads];
  __shared__ double sh_n[kThreads];
  sh_s[threadIdx.x] = s;
  sh_n[threadIdx.x] = n;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      sh_s[threadIdx.x] += sh_s[threadIdx.x + stride];
      sh_n[threadIdx.x] += sh_n[threadIdx.x + stride];
    }
    __syncthreads();
  }
  s = sh_s[0];
  n = sh_n[0];
}

// ------------------------------------------------------------------------------- masked L1
template <typename scalar_t, typename mask_t>
__global__ void __launch_bounds__(kThreads)
    l1_fwd_kernel(const scalar_t* __restrict__ P, const scalar_t* __restrict__ T, const mask_t* __restrict__ M,
                  Strides4 sp, Strides4 st, Strides4 sm, Dims d, double* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t s = 0, n = 0;
  const int64_t nquads = (d.N + 3) / 4;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < nquads;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t i = 4 * q;
    Pos pos = decompose(i, d);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane, ++i) {
      if (i >= d.N) break;
      const acc_t diff = absv(static_cast<acc_t>(P[offset_of(sp, pos)]) - static_cast<acc_t>(T[offset_of(st, pos)]));
      const acc_t mm = mask_value<acc_t>(M, mask_offset_of(sm, pos));
      s += diff * mm;
      n += mm;
      advance(pos, d);
    }
  }
  double bs = static_cast<double>(s), bn = static_cast<double>(n);
  block_sum2(bs, bn);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = bs;
    partials[2 * blockIdx.x + 1] = bn;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    l1_finish_kernel(const double* __restrict__ partials, int nblocks, int64_t normalize, double numel,
                     scalar_t* __restrict__ loss, at::opmath_type<scalar_t>* __restrict__ denom_out) {
  using acc_t = at::opmath_type<scalar_t>;
  double s = 0.0, n = 0.0;
  for (int j = threadIdx.x; j < nblocks; j += kThreads) {
    s += partials[2 * j];
    n += partials[2 * j + 1];
  }
  block_sum2(s, n);
  if (threadIdx.x == 0) {
    double denom = 1.0;
    if (normalize == kNormAll) denom = numel;
    if (normalize == kNormActive) denom = n > 1.0 ? n : 1.0;  // n = C * sum(mask)
    const acc_t dv = static_cast<acc_t>(denom);
    *denom_out = dv;
    *loss = static_cast<scalar_t>(static_cast<acc_t>(s) / dv);
  }
}

template <typename scalar_t, typename mask_t>
__global__ void __launch_bounds__(kThreads)
    l1_bwd_kernel(const scalar_t* __restrict__ P, const scalar_t* __restrict__ T, const mask_t* __restrict__ M,
                  scalar_t* __restrict__ GP, Strides4 sp, Strides4 st, Strides4 sm, Strides4 sg, Dims d,
                  const at::opmath_type<scalar_t>* __restrict__ grad,
                  const at::opmath_type<scalar_t>* __restrict__ denom) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = grad[0] / denom[0];
  const int64_t nquads = (d.N + 3) / 4;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < nquads;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t i = 4 * q;
    Pos pos = decompose(i, d);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane, ++i) {
      if (i >= d.N) break;
      const acc_t diff = static_cast<acc_t>(P[offset_of(sp, pos)]) - static_cast<acc_t>(T[offset_of(st, pos)]);
      // sign(diff) with sign(0) = 0; NaN stays NaN
      const acc_t sgn = diff > acc_t(0) ? acc_t(1) : (diff < acc_t(0) ? acc_t(-1) : diff);
      const acc_t v = sgn * mask_value<acc_t>(M, mask_offset_of(sm, pos)) * scale;
      GP[offset_of(sg, pos)] = static_cast<scalar_t>(v);
      advance(pos, d);
    }
  }
}

// ------------------------------------------------------------------------------- YODA step
// What both step kernels read: the operands (noise pointers null for in-kernel noise), the
// step's coefficients and the Philox seed.
template <typename scalar_t>
struct StepOperands {
  const scalar_t *z, *eps, *x_bar, *noise, *lr_noise;  // x_bar may be null (means 0)
  const bool* mask;
  scalar_t* out;
  StepCoeffs<at::opmath_type<scalar_t>> k;
  uint64_t seed;
};

template <typename scalar_t>
struct StepParams : StepOperands<scalar_t> {
  Strides4 sz, se, sx, sn, sl, sm, so;
  Dims d;
  uint64_t blk0;  // first Philox block: offset / 4
  int64_t skip;   // offset % 4 for in-kernel noise, else 0
  int64_t nquads;
};

template <typename scalar_t, bool kGenNoise>
__global__ void __launch_bounds__(kThreads) yoda_step_kernel(const StepParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool has_x_bar = p.x_bar != nullptr;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < p.nquads;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float nrm[4] = {0.f, 0.f, 0.f, 0.f};
    if (kGenNoise) philox::normals4(p.seed, p.blk0 + static_cast<uint64_t>(q), nrm);
    const int64_t first = 4 * q - p.skip;  // logical index of lane 0 (may be < 0 in quad 0)
    int64_t i = first < 0 ? 0 : first;
    if (i >= p.d.N) continue;
    Pos pos = decompose(i, p.d);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t e = first + lane;
      if (e < 0) continue;
      if (e >= p.d.N) break;
      // Loads follow the mask (as the Triton kernel's predicated loads do): z, eps and the
      // noise only where the pixel is active, x_bar and the LR noise only where it is not, so
      // a YODA step reads the model output only over the active area.
      const StepCoeffs<acc_t>& k = p.k;
      acc_t v;
      if (p.mask[mask_offset_of(p.sm, pos)]) {
        const acc_t zv = static_cast<acc_t>(p.z[offset_of(p.sz, pos)]);
        const acc_t ev = static_cast<acc_t>(p.eps[offset_of(p.se, pos)]);
        const acc_t nv = kGenNoise ? static_cast<acc_t>(nrm[lane]) : static_cast<acc_t>(p.noise[offset_of(p.sn, pos)]);
        acc_t x0 = k.a * zv - k.b * ev;
        x0 = x0 < k.lo ? k.lo : (x0 > k.hi ? k.hi : x0);  // +-inf bounds when clip_x0 is off
        v = k.c1 * x0 + k.c2 * zv + k.sigma * nv;
      } else {
        const acc_t xv = has_x_bar ? static_cast<acc_t>(p.x_bar[offset_of(p.sx, pos)]) : acc_t(0);
        const acc_t nlv =
            kGenNoise ? static_cast<acc_t>(nrm[lane]) : static_cast<acc_t>(p.lr_noise[offset_of(p.sl, pos)]);
        v = k.lr_scale * xv + k.lr_sigma * nlv;
      }
      p.out[offset_of(p.so, pos)] = static_cast<scalar_t>(v);
      advance(pos, p.d);
    }
  }
}


// ------------------------------------------------------------------------------- planar fast path
// The common case: every image operand NCHW-contiguous, the mask's pixels contiguous, H*W a
// multiple of the run length V and every base pointer aligned to a run. Then blockIdx.y is a
// (b, c) plane, each thread takes runs of V pixels of that plane, and every operand is read
// with one V-wide load: no per-element index decomposition and no 64-bit stride arithmetic,
// which is what keeps the generic path above far from the memory bandwidth. V is chosen so an
// image load is 16 bytes where it can be (4 for float32, 8 for float16/bfloat16; 4 for float64).
template <typename T, int V>
struct alignas(sizeof(T) * V) Run {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ Run<T, V> load_run(const T* p) {
  return *reinterpret_cast<const Run<T, V>*>(p);
}

template <int V, typename T>
__device__ __forceinline__ void store_run(T* p, const Run<T, V>& r) {
  *reinterpret_cast<Run<T, V>*>(p) = r;
}

bool aligned_run(const at::Tensor& t, int V) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % (t.element_size() * V) == 0;
}

// The run length of the planar path for these operands, or 0 where it does not apply. Needs:
// image operands NCHW-contiguous and run-aligned; mask [B,1,H,W] with contiguous pixels and a
// run-aligned start of every batch row; H*W % V == 0; the planes fit grid.y.
int planar_vec(std::initializer_list<const at::Tensor*> images, const at::Tensor& mask) {
  const at::Tensor& first = **images.begin();
  const int64_t H = first.size(2), W = first.size(3);
  if (first.size(0) * first.size(1) > 65535) return 0;
  const bool pixels_contiguous = (W == 1 || mask.stride(3) == 1) && (H == 1 || mask.stride(2) == W);
  if (!pixels_contiguous) return 0;
  for (const at::Tensor* t : images) {
    if (t != nullptr && t->defined() && !t->is_contiguous()) return 0;
  }
  const int widest = first.element_size() <= 2 ? 8 : 4;
  for (int V = widest; V >= 4; V /= 2) {
    bool ok = (H * W) % V == 0 && aligned_run(mask, V) && mask.stride(0) % V == 0;
    for (const at::Tensor* t : images) ok = ok && (t == nullptr || !t->defined() || aligned_run(*t, V));
    if (ok) return V;
  }
  return 0;
}

// Calls f(std::integral_constant<int, V>{}) for the run length chosen by planar_vec (8 is only
// chosen, and so only compiled, for 16-bit types).
template <typename scalar_t, typename F>
void with_run_length(int V, F&& f) {
  if constexpr (sizeof(scalar_t) <= 2) {
    if (V == 8) {
      f(std::integral_constant<int, 8>{});
      return;
    }
  }
  TORCH_INTERNAL_ASSERT(V == 4, "planar run length must be 4 here, got ", V);
  f(std::integral_constant<int, 4>{});
}

// Blocks per plane: one run per thread, or fewer (a grid-stride loop) when the whole grid would
// pass max_blocks (the loss forward keeps its partial sums few; elementwise kernels pass no cap).
dim3 planar_grid(int64_t planes, int64_t HW, int V, int64_t max_blocks = std::numeric_limits<int64_t>::max()) {
  const int64_t runs = HW / V;
  const int64_t want = (runs + kThreads - 1) / kThreads;
  const int64_t cap = max_blocks / planes + (max_blocks % planes != 0);  // ceil, without overflow
  const int64_t per_plane = std::max<int64_t>(1, std::min<int64_t>(want, cap));
  return dim3(static_cast<unsigned>(std::min<int64_t>(per_plane, 65535)), static_cast<unsigned>(planes));
}

struct Planar {
  int64_t C, HW, mask_sb;  // mask batch stride
};

template <typename scalar_t, typename mask_t, int V>
__global__ void __launch_bounds__(kThreads)
    l1_fwd_planar_kernel(const scalar_t* __restrict__ P, const scalar_t* __restrict__ T,
                         const mask_t* __restrict__ M, Planar g, double* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = blockIdx.y;
  const int64_t base = plane * g.HW;
  const mask_t* mrow = M + (plane / g.C) * g.mask_sb;
  acc_t s = 0, n = 0;
  for (int64_t hw = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V; hw < g.HW;
       hw += static_cast<int64_t>(gridDim.x) * kThreads * V) {
    const Run<scalar_t, V> p = load_run<V>(P + base + hw), t = load_run<V>(T + base + hw);
    const Run<mask_t, V> m = load_run<V>(mrow + hw);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const acc_t mm = static_cast<acc_t>(m.v[j]);
      s += absv(static_cast<acc_t>(p.v[j]) - static_cast<acc_t>(t.v[j])) * mm;
      n += mm;
    }
  }
  double bs = static_cast<double>(s), bn = static_cast<double>(n);
  block_sum2(bs, bn);
  if (threadIdx.x == 0) {
    const int64_t blk = plane * gridDim.x + blockIdx.x;
    partials[2 * blk] = bs;
    partials[2 * blk + 1] = bn;
  }
}

template <typename scalar_t, typename mask_t, int V>
__global__ void __launch_bounds__(kThreads)
    l1_bwd_planar_kernel(const scalar_t* __restrict__ P, const scalar_t* __restrict__ T,
                         const mask_t* __restrict__ M, scalar_t* __restrict__ GP, Planar g,
                         const at::opmath_type<scalar_t>* __restrict__ grad,
                         const at::opmath_type<scalar_t>* __restrict__ denom) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = grad[0] / denom[0];
  const int64_t plane = blockIdx.y;
  const int64_t base = plane * g.HW;
  const mask_t* mrow = M + (plane / g.C) * g.mask_sb;
  for (int64_t hw = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V; hw < g.HW;
       hw += static_cast<int64_t>(gridDim.x) * kThreads * V) {
    const Run<scalar_t, V> p = load_run<V>(P + base + hw), t = load_run<V>(T + base + hw);
    const Run<mask_t, V> m = load_run<V>(mrow + hw);
    Run<scalar_t, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const acc_t diff = static_cast<acc_t>(p.v[j]) - static_cast<acc_t>(t.v[j]);
      const acc_t sgn = diff > acc_t(0) ? acc_t(1) : (diff < acc_t(0) ? acc_t(-1) : diff);
      o.v[j] = static_cast<scalar_t>(sgn * static_cast<acc_t>(m.v[j]) * scale);
    }
    store_run<V>(GP + base + hw, o);
  }
}

template <typename scalar_t>
struct PlanarStepParams : StepOperands<scalar_t> {
  Planar g;
  uint64_t offset;
};

// nrm[j] = buf[L + j]: L a compile-time constant, so buf and nrm stay in registers.
template <int V, int L>
__device__ __forceinline__ void pick_normals(const float* buf, float* nrm) {
#pragma unroll
  for (int j = 0; j < V; ++j) nrm[j] = buf[L + j];
}

template <typename scalar_t, bool kGenNoise, int V>
__global__ void __launch_bounds__(kThreads) yoda_step_planar_kernel(const PlanarStepParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = blockIdx.y;
  const int64_t base = plane * p.g.HW;
  const bool* mrow = p.mask + (plane / p.g.C) * p.g.mask_sb;
  const StepCoeffs<acc_t>& k = p.k;
  for (int64_t hw = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V; hw < p.g.HW;
       hw += static_cast<int64_t>(gridDim.x) * kThreads * V) {
    const int64_t i = base + hw;  // logical index of the run's first element
    const Run<bool, V> m = load_run<V>(mrow + hw);
    bool any_on = false, any_off = false;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      any_on |= m.v[j];
      any_off |= !m.v[j];
    }
    // As in the generic kernel, reads follow the mask: the model output only where active.
    Run<scalar_t, V> z{}, e{}, n{}, x{}, nl{};
    if (any_on) {
      z = load_run<V>(p.z + i);
      e = load_run<V>(p.eps + i);
      if (!kGenNoise) n = load_run<V>(p.noise + i);
    }
    if (any_off) {
      if (p.x_bar != nullptr) x = load_run<V>(p.x_bar + i);
      if (!kGenNoise) nl = load_run<V>(p.lr_noise + i);
    }
    float nrm[V];
    if (kGenNoise) {
      // Element i draws counter offset + i: Philox block (offset + i) / 4, lane (offset + i) % 4.
      // i is a multiple of V (a multiple of 4) here, so the run spans V/4 blocks, or one more
      // when offset % 4 != 0.
      const uint64_t ctr = p.offset + static_cast<uint64_t>(i);
      const int lane0 = static_cast<int>(ctr & 3u);
      float buf[V + 4];
#pragma unroll
      for (int b = 0; b <= V / 4; ++b) {
        if (b < V / 4 || lane0 != 0) {
          philox::normals4(p.seed, (ctr >> 2) + b, buf + 4 * b);
        } else {
          buf[4 * b] = buf[4 * b + 1] = buf[4 * b + 2] = buf[4 * b + 3] = 0.f;
        }
      }
      // lane0 is the same for the whole launch: no divergence
      switch (lane0) {
        case 0: pick_normals<V, 0>(buf, nrm); break;
        case 1: pick_normals<V, 1>(buf, nrm); break;
        case 2: pick_normals<V, 2>(buf, nrm); break;
        default: pick_normals<V, 3>(buf, nrm); break;
      }
    }
    Run<scalar_t, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      acc_t v;
      if (m.v[j]) {
        const acc_t zv = static_cast<acc_t>(z.v[j]);
        const acc_t nv = kGenNoise ? static_cast<acc_t>(nrm[j]) : static_cast<acc_t>(n.v[j]);
        acc_t x0 = k.a * zv - k.b * static_cast<acc_t>(e.v[j]);
        x0 = x0 < k.lo ? k.lo : (x0 > k.hi ? k.hi : x0);
        v = k.c1 * x0 + k.c2 * zv + k.sigma * nv;
      } else {
        const acc_t nlv = kGenNoise ? static_cast<acc_t>(nrm[j]) : static_cast<acc_t>(nl.v[j]);
        v = k.lr_scale * static_cast<acc_t>(x.v[j]) + k.lr_sigma * nlv;
      }
      o.v[j] = static_cast<scalar_t>(v);
    }
    store_run<V>(p.out + i, o);
  }
}

}  // namespace

// ================================================================================== ops
std::tuple<at::Tensor, at::Tensor> masked_l1_fwd_cuda(const at::Tensor& pred, const at::Tensor& target,
                                                      const at::Tensor& mask_in, int64_t normalize) {
  check_loss_inputs(pred, target, mask_in);
  TORCH_CHECK(normalize >= kNormAll && normalize <= kNormSum, "normalize must be 0 (all), 1 (active) or 2 (sum), got ",
              normalize);
  const c10::cuda::CUDAGuard guard(pred.device());
  const auto acc = acc_type_of(pred.scalar_type());
  const at::Tensor mask = loss_mask(mask_in, acc);
  const Dims d = dims_of(pred);
  at::Tensor loss = at::empty({}, pred.options());
  at::Tensor denom = at::empty({}, pred.options().dtype(acc));
  const int V = d.N > 0 ? planar_vec({&pred, &target}, mask) : 0;
  const bool planar = V != 0;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const dim3 pgrid = planar ? planar_grid(d.B * d.C, d.H * d.W, V, sms * 8) : dim3(1);
  const Planar pg{d.C, d.H * d.W, mask.stride(0)};
  // an empty image still runs one (loop-free) block, which writes zero partials for the finish
  const int blocks = planar ? static_cast<int>(pgrid.x * pgrid.y) : grid_for((d.N + 3) / 4);
  // every block writes its two partials: no zero fill needed
  at::Tensor partials = at::empty({2 * static_cast<int64_t>(blocks)}, pred.options().dtype(at::kDouble));
  auto stream = at::cuda::getCurrentCUDAStream();
  const Strides4 sp = strides_of(pred), st = strides_of(target), sm = strides_of(mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "masked_l1_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (planar) {
      with_run_length<scalar_t>(V, [&](auto run) {
        constexpr int kV = decltype(run)::value;
        if (mask.scalar_type() == at::kBool) {
          l1_fwd_planar_kernel<scalar_t, bool, kV><<<pgrid, kThreads, 0, stream>>>(
              pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(), pg,
              partials.mutable_data_ptr<double>());
        } else {
          l1_fwd_planar_kernel<scalar_t, acc_t, kV><<<pgrid, kThreads, 0, stream>>>(
              pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), mask.const_data_ptr<acc_t>(), pg,
              partials.mutable_data_ptr<double>());
        }
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      if (mask.scalar_type() == at::kBool) {
        l1_fwd_kernel<scalar_t, bool><<<blocks, kThreads, 0, stream>>>(
            pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(), sp, st,
            sm, d, partials.mutable_data_ptr<double>());
      } else {
        l1_fwd_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
            pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), mask.const_data_ptr<acc_t>(), sp, st,
            sm, d, partials.mutable_data_ptr<double>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    l1_finish_kernel<scalar_t><<<1, kThreads, 0, stream>>>(partials.const_data_ptr<double>(), blocks, normalize,
                                                           static_cast<double>(d.N), loss.mutable_data_ptr<scalar_t>(),
                                                           denom.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, denom};
}

at::Tensor masked_l1_bwd_cuda(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
                              const at::Tensor& mask_in, const at::Tensor& denom) {
  check_loss_bwd_inputs(grad, pred, target, mask_in, denom);
  const c10::cuda::CUDAGuard guard(pred.device());
  const auto acc = acc_type_of(pred.scalar_type());
  const at::Tensor mask = loss_mask(mask_in, acc);
  at::Tensor grad_pred = at::empty(pred.sizes(), pred.options().memory_format(output_format(pred)));
  const Dims d = dims_of(pred);
  if (d.N == 0) return grad_pred;
  // one-element tensors in the accumulation type, read by every thread (no host sync)
  const at::Tensor g_acc = grad.reshape({1}).to(acc).contiguous();
  const at::Tensor d_acc = denom.reshape({1}).to(acc).contiguous();
  const int blocks = grid_for((d.N + 3) / 4);
  auto stream = at::cuda::getCurrentCUDAStream();
  const Strides4 sp = strides_of(pred), st = strides_of(target), sm = strides_of(mask), sg = strides_of(grad_pred);
  const int V = planar_vec({&pred, &target, &grad_pred}, mask);
  const bool planar = V != 0;
  const dim3 pgrid = planar ? planar_grid(d.B * d.C, d.H * d.W, V) : dim3(1);
  const Planar pg{d.C, d.H * d.W, mask.stride(0)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "masked_l1_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* gp = g_acc.const_data_ptr<acc_t>();
    const acc_t* dp = d_acc.const_data_ptr<acc_t>();
    if (planar) {
      with_run_length<scalar_t>(V, [&](auto run) {
        constexpr int kV = decltype(run)::value;
        if (mask.scalar_type() == at::kBool) {
          l1_bwd_planar_kernel<scalar_t, bool, kV><<<pgrid, kThreads, 0, stream>>>(
              pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(),
              grad_pred.mutable_data_ptr<scalar_t>(), pg, gp, dp);
        } else {
          l1_bwd_planar_kernel<scalar_t, acc_t, kV><<<pgrid, kThreads, 0, stream>>>(
              pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), mask.const_data_ptr<acc_t>(),
              grad_pred.mutable_data_ptr<scalar_t>(), pg, gp, dp);
        }
      });
    } else if (mask.scalar_type() == at::kBool) {
      l1_bwd_kernel<scalar_t, bool><<<blocks, kThreads, 0, stream>>>(
          pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(),
          grad_pred.mutable_data_ptr<scalar_t>(), sp, st, sm, sg, d, gp, dp);
    } else {
      l1_bwd_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), mask.const_data_ptr<acc_t>(),
          grad_pred.mutable_data_ptr<scalar_t>(), sp, st, sm, sg, d, gp, dp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_pred;
}

at::Tensor yoda_step_cuda(const at::Tensor& z, const at::Tensor& eps, const std::optional<at::Tensor>& x_bar,
                          const at::Tensor& mask_in, const std::optional<at::Tensor>& noise,
                          const std::optional<at::Tensor>& lr_noise, int64_t seed, int64_t offset,
                          const at::Tensor& params, bool clip_x0) {
  StepScalars sc;
  check_step_inputs(z, eps, x_bar, mask_in, noise, lr_noise, seed, offset, params, sc);
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor mask = step_mask(mask_in);
  at::Tensor out = at::empty(z.sizes(), z.options().memory_format(output_format(z)));
  const Dims d = dims_of(z);
  if (d.N == 0) return out;
  const bool has_x_bar = x_bar.has_value() && x_bar->defined();
  const bool gen_noise = !(noise.has_value() && noise->defined());
  const at::Tensor nz = gen_noise ? at::Tensor() : *noise;
  const at::Tensor lnz = gen_noise ? at::Tensor() : ((lr_noise.has_value() && lr_noise->defined()) ? *lr_noise : nz);
  auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor* xb = has_x_bar ? &*x_bar : nullptr;
  // fills what both kernels read (called inside the dtype dispatch)
  auto set_operands = [&](auto& p) {
    using scalar_t = std::remove_cv_t<std::remove_pointer_t<decltype(p.out)>>;
    p.z = z.const_data_ptr<scalar_t>();
    p.eps = eps.const_data_ptr<scalar_t>();
    p.x_bar = has_x_bar ? x_bar->const_data_ptr<scalar_t>() : nullptr;
    p.noise = gen_noise ? nullptr : nz.const_data_ptr<scalar_t>();
    p.lr_noise = gen_noise ? nullptr : lnz.const_data_ptr<scalar_t>();
    p.mask = mask.const_data_ptr<bool>();
    p.out = out.mutable_data_ptr<scalar_t>();
    p.k = step_coeffs<at::opmath_type<scalar_t>>(sc, clip_x0);
    p.seed = static_cast<uint64_t>(seed);
  };
  if (const int V = planar_vec({&z, &eps, &out, xb, &nz, &lnz}, mask); V != 0) {
    const dim3 grid = planar_grid(d.B * d.C, d.H * d.W, V);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "yoda_step_cuda_planar", [&] {
      PlanarStepParams<scalar_t> p;
      set_operands(p);
      p.g = Planar{d.C, d.H * d.W, mask.stride(0)};
      p.offset = static_cast<uint64_t>(offset);
      with_run_length<scalar_t>(V, [&](auto run) {
        constexpr int kV = decltype(run)::value;
        if (gen_noise) {
          yoda_step_planar_kernel<scalar_t, true, kV><<<grid, kThreads, 0, stream>>>(p);
        } else {
          yoda_step_planar_kernel<scalar_t, false, kV><<<grid, kThreads, 0, stream>>>(p);
        }
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "yoda_step_cuda", [&] {
    StepParams<scalar_t> p;
    set_operands(p);
    p.sz = strides_of(z);
    p.se = strides_of(eps);
    p.sx = has_x_bar ? strides_of(*x_bar) : p.sz;
    p.sn = gen_noise ? p.sz : strides_of(nz);
    p.sl = gen_noise ? p.sz : strides_of(lnz);
    p.sm = strides_of(mask);
    p.so = strides_of(out);
    p.d = d;
    p.blk0 = gen_noise ? static_cast<uint64_t>(offset) >> 2 : 0;
    p.skip = gen_noise ? static_cast<int64_t>(static_cast<uint64_t>(offset) & 3u) : 0;
    p.nquads = (d.N + p.skip + 3) / 4;
    const int blocks = grid_for(p.nquads);
    if (gen_noise) {
      yoda_step_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      yoda_step_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace yoda
