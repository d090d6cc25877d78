// The CPU Philox normals (yoda_step's in-kernel noise): Philox words for a run of blocks (a
// portable version and an AVX2 one, chosen once at load time after a self-check), then the
// Box-Muller transform (an AVX2 clone where the CPU has it).
//
// Build flags matter: -O3 -fno-math-errno (sqrt must not set errno, or the noise loop does
// not vectorise) and -ffp-contract=off (no FMA contraction, so the Philox normals are
// bit-identical to the CUDA ones; see philox.h).
#include "noise_cpu.h"

#include "cpu_rows.h"  // YODA_CLONES
#include "philox.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace yoda {
namespace {

constexpr int kNoiseChunk = 64;  // Philox blocks per inner batch (256 normals)

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

}  // namespace

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

}  // namespace yoda
