// CPU kernels of the yoda-sparse ops: one pass over memory, parallel over image rows
// (b, c, h) with at::parallel_for, inner loops over w that the compiler vectorises when every
// operand has unit w-stride.  Reductions are deterministic whatever the thread count and the
// vector width: each block of rows (a partition fixed by the shape) writes its partial sums to
// its own slot (32 fixed lanes inside the block), the slots are summed in order in float64.
//
// Build flags matter: -O3 -fno-math-errno (sqrt must not set errno, or the noise loop does
// not vectorise) and -ffp-contract=off (no FMA contraction, so the Philox normals are
// bit-identical to the CUDA ones; see philox.h).
#include "yoda_ops.h"
#include "philox.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace yoda {
namespace {

// GCC/Clang function multi-versioning: an AVX2 clone of the Box-Muller loop is picked at load
// time on CPUs that have it (same results: no FMA, same IEEE float ops).
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(YODA_NO_TARGET_CLONES)
#define YODA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define YODA_CLONES
#endif

constexpr int64_t kElementsPerTask = 32768;  // grain of parallel_for, in elements

int64_t row_grain(int64_t W) {
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(W, 1));
}

// Position of row r = (b * C + c) * H + h, advanced incrementally inside a task.
struct RowPos {
  int64_t b, c, h;
};

inline RowPos row_pos(int64_t r, int64_t C, int64_t H) {
  const int64_t bc = r / H;
  return {bc / C, bc % C, r % H};
}

inline void next_row(RowPos& p, int64_t C, int64_t H) {
  if (++p.h == H) {
    p.h = 0;
    if (++p.c == C) {
      p.c = 0;
      ++p.b;
    }
  }
}

inline int64_t row_offset(const Strides4& s, const RowPos& p) {
  return p.b * s.b + p.c * s.c + p.h * s.h;
}

inline int64_t mask_row_offset(const Strides4& s, const RowPos& p) {
  return p.b * s.b + p.h * s.h;
}

template <bool kContig>
inline int64_t at_w(int64_t w, int64_t stride) {
  return kContig ? w : w * stride;
}

struct Geometry {
  int64_t B, C, H, W;
  int64_t rows() const { return B * C * H; }
};

Geometry geometry_of(const at::Tensor& t) {
  return {t.size(0), t.size(1), t.size(2), t.size(3)};
}

// ------------------------------------------------------------------------------- noise
constexpr int kNoiseChunk = 64;      // Philox blocks per inner batch (256 normals)
constexpr int64_t kNoiseGroup = 4096;  // normals drawn per batch of rows

// Philox words of blocks blk .. blk + cnt - 1 as Box-Muller pairs: pair 2 j = (x, y) of block j,
// pair 2 j + 1 = (z, w).  Portable version (gcc vectorises it, but emulates the 32x32->64-bit
// products poorly) ...
void philox_pairs_generic(uint64_t seed, uint64_t blk, int cnt, uint32_t* __restrict a, uint32_t* __restrict b) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int j = 0; j < cnt; ++j) {
    const uint64_t ctr = blk + static_cast<uint64_t>(j);
    const philox::U4 r = philox::philox4x32_10(
        philox::U4{static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), 0u, 0u}, k0, k1);
    a[2 * j] = r.x;
    b[2 * j] = r.y;
    a[2 * j + 1] = r.z;
    b[2 * j + 1] = r.w;
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(YODA_NO_TARGET_CLONES)
#define YODA_HAVE_AVX2_PHILOX 1
// ... and an AVX2 one, 16 blocks per step in two independent groups of 8 (one group alone is
// bound by the latency of a round): the high and low halves of the products come from two
// vpmuludq (even and odd 32-bit lanes) and two blends.  Integer ops only: the same words.
struct Philox8 {
  __m256i c0, c1, c2, c3;
};

__attribute__((target("avx2"), always_inline)) inline Philox8 philox8_counters(uint64_t first) {
  Philox8 g;
  if (static_cast<uint32_t>(first) <= 0xFFFFFFF8u) {  // no carry into the high word in these 8
    g.c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    g.c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32)));
  } else {
    alignas(32) uint32_t lo[8], hi[8];
    for (int l = 0; l < 8; ++l) {
      lo[l] = static_cast<uint32_t>(first + l);
      hi[l] = static_cast<uint32_t>((first + l) >> 32);
    }
    g.c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
    g.c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
  }
  g.c2 = _mm256_setzero_si256();
  g.c3 = _mm256_setzero_si256();
  return g;
}

__attribute__((target("avx2"), always_inline)) inline void philox8_round(Philox8& g, __m256i k0, __m256i k1) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(philox::kM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(philox::kM1));
  const __m256i p0e = _mm256_mul_epu32(g.c0, m0), p0o = _mm256_mul_epu32(_mm256_srli_epi64(g.c0, 32), m0);
  const __m256i p1e = _mm256_mul_epu32(g.c2, m1), p1o = _mm256_mul_epu32(_mm256_srli_epi64(g.c2, 32), m1);
  const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(p0e, 32), p0o, 0xAA);
  const __m256i lo0 = _mm256_blend_epi32(p0e, _mm256_slli_epi64(p0o, 32), 0xAA);
  const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(p1e, 32), p1o, 0xAA);
  const __m256i lo1 = _mm256_blend_epi32(p1e, _mm256_slli_epi64(p1o, 32), 0xAA);
  g.c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, g.c1), k0);
  g.c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, g.c3), k1);
  g.c1 = lo1;
  g.c3 = lo0;
}

// (x, z) of blocks 0..7 -> a[0..15] and (y, w) -> b[0..15], interleaved per block: unpack
// within the 128-bit halves, then put the halves in order.
__attribute__((target("avx2"), always_inline)) inline void philox8_store(const Philox8& g, uint32_t* a, uint32_t* b) {
  const __m256i xz_lo = _mm256_unpacklo_epi32(g.c0, g.c2), xz_hi = _mm256_unpackhi_epi32(g.c0, g.c2);
  const __m256i yw_lo = _mm256_unpacklo_epi32(g.c1, g.c3), yw_hi = _mm256_unpackhi_epi32(g.c1, g.c3);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(a), _mm256_permute2x128_si256(xz_lo, xz_hi, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + 8), _mm256_permute2x128_si256(xz_lo, xz_hi, 0x31));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(b), _mm256_permute2x128_si256(yw_lo, yw_hi, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(b + 8), _mm256_permute2x128_si256(yw_lo, yw_hi, 0x31));
}

__attribute__((target("avx2"))) void philox_pairs_avx2(uint64_t seed, uint64_t blk, int cnt,
                                                       uint32_t* __restrict a, uint32_t* __restrict b) {
  const __m256i w0 = _mm256_set1_epi32(static_cast<int>(philox::kW0));
  const __m256i w1 = _mm256_set1_epi32(static_cast<int>(philox::kW1));
  const __m256i key0 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed)));
  const __m256i key1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed >> 32)));
  int j = 0;
  for (; j + 16 <= cnt; j += 16) {
    Philox8 g = philox8_counters(blk + static_cast<uint64_t>(j));
    Philox8 h = philox8_counters(blk + static_cast<uint64_t>(j + 8));
    __m256i k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
      philox8_round(g, k0, k1);
      philox8_round(h, k0, k1);
      k0 = _mm256_add_epi32(k0, w0);
      k1 = _mm256_add_epi32(k1, w1);
    }
    philox8_store(g, a + 2 * j, b + 2 * j);
    philox8_store(h, a + 2 * j + 16, b + 2 * j + 16);
  }
  if (j < cnt) philox_pairs_generic(seed, blk + static_cast<uint64_t>(j), cnt - j, a + 2 * j, b + 2 * j);
}
#endif

using PhiloxPairsFn = void (*)(uint64_t, uint64_t, int, uint32_t*, uint32_t*);

// Picked once: the AVX2 version where the CPU has it, after checking that it reproduces the
// portable one word for word (a cheap guard against a miscompiled or mis-dispatched path).
PhiloxPairsFn philox_pairs_impl() {
  static const PhiloxPairsFn impl = [] {
#ifdef YODA_HAVE_AVX2_PHILOX
    if (__builtin_cpu_supports("avx2")) {
      uint32_t a0[2 * 37], b0[2 * 37], a1[2 * 37], b1[2 * 37];
      const uint64_t seed = 0x0123456789abcdefULL, blk = 0x00000001fffffff3ULL;  // carries into the hi word
      philox_pairs_generic(seed, blk, 37, a0, b0);
      philox_pairs_avx2(seed, blk, 37, a1, b1);
      TORCH_CHECK(std::memcmp(a0, a1, sizeof(a0)) == 0 && std::memcmp(b0, b1, sizeof(b0)) == 0,
                  "yoda_sparse: the AVX2 Philox differs from the portable one (please report)");
      return static_cast<PhiloxPairsFn>(&philox_pairs_avx2);
    }
#endif
    return static_cast<PhiloxPairsFn>(&philox_pairs_generic);
  }();
  return impl;
}

// Box-Muller over 2 cnt independent pairs (vectorised; an AVX2 clone where available).
YODA_CLONES void box_muller_pairs(const uint32_t* __restrict a, const uint32_t* __restrict b, int pairs,
                                  float* __restrict out) {
  alignas(64) float n0[2 * kNoiseChunk];
  alignas(64) float n1[2 * kNoiseChunk];
  for (int j = 0; j < pairs; ++j) philox::box_muller(a[j], b[j], &n0[j], &n1[j]);
  for (int j = 0; j < pairs; ++j) {
    out[2 * j] = n0[j];
    out[2 * j + 1] = n1[j];
  }
}

// out[4 j + l] = normal of counter 4 (blk + j) + l, j < cnt <= kNoiseChunk: pair 2 j holds
// lanes 0,1 of block j and pair 2 j + 1 lanes 2,3, hence out[2 p + {0,1}].
void philox_normal_blocks(PhiloxPairsFn philox_pairs, uint64_t seed, uint64_t blk, int cnt, float* out) {
  alignas(64) uint32_t a[2 * kNoiseChunk];
  alignas(64) uint32_t b[2 * kNoiseChunk];
  philox_pairs(seed, blk, cnt, a, b);
  box_muller_pairs(a, b, 2 * cnt, out);
}

// out[j] = standard normal of counter k0 + j, j < n (see philox.h for the mapping).
void fill_normals(uint64_t seed, uint64_t k0, int64_t n, float* out) {
  const uint64_t blk0 = k0 >> 2;
  const int64_t skip = static_cast<int64_t>(k0 & 3u);
  const int64_t nblk = (skip + n + 3) >> 2;
  alignas(64) float tmp[4 * kNoiseChunk];
  const PhiloxPairsFn philox_pairs = philox_pairs_impl();
  for (int64_t j0 = 0; j0 < nblk; j0 += kNoiseChunk) {
    const int cnt = static_cast<int>(std::min<int64_t>(kNoiseChunk, nblk - j0));
    philox_normal_blocks(philox_pairs, seed, blk0 + static_cast<uint64_t>(j0), cnt, tmp);
    const int64_t first = 4 * j0 - skip;  // element index of tmp[0]
    const int64_t t_begin = first < 0 ? -first : 0;
    const int64_t t_end = std::min<int64_t>(4 * cnt, n - first);
    if (t_end > t_begin) std::memcpy(out + first + t_begin, tmp + t_begin, sizeof(float) * (t_end - t_begin));
  }
}

// ------------------------------------------------------------------------------- helpers
// m ? a : b as a bitwise blend.  A plain ?: lets gcc sink each side's arithmetic into a branch
// and then refuse to vectorise the loop ("control flow in loop"); the blend keeps it straight.
template <typename F>
inline F select_bits(uint8_t m, F a, F b) {
  using U = std::conditional_t<sizeof(F) == 8, uint64_t, uint32_t>;
  U ua, ub;
  std::memcpy(&ua, &a, sizeof(F));
  std::memcpy(&ub, &b, sizeof(F));
  const U mask = U(0) - static_cast<U>(m != 0);
  const U r = (ua & mask) | (ub & ~mask);
  F f;
  std::memcpy(&f, &r, sizeof(F));
  return f;
}

// ------------------------------------------------------------------------------- masked L1
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

// ------------------------------------------------------------------------------- YODA step
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

bool unit_w(std::initializer_list<Strides4> ss) {
  for (const auto& s : ss)
    if (s.w != 1) return false;
  return true;
}

}  // namespace

// ================================================================================== ops
namespace {

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
