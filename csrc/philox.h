// Counter-based Philox4x32-10 (Salmon et al., SC'11; Random123's constants) plus a
// Box-Muller transform written with explicit IEEE float32 operations, so the CPU and the
// CUDA build produce bit-identical standard normals for the same (seed, counter).
//
// Counter mapping (the contract every backend of yoda_step's in-kernel noise follows):
//   element i of the logical contiguous [B,C,H,W] order uses counter k = offset + i (uint64);
//   Philox block  blk = k / 4,  lane = k % 4;
//   key   = (seed & 0xffffffff, seed >> 32)
//   ctr   = (blk & 0xffffffff, blk >> 32, 0, 0)
//   (x0, x1, x2, x3) = Philox4x32-10(ctr, key)
//   lanes 0,1 = Box-Muller(x0, x1) = (R cos T, R sin T); lanes 2,3 = Box-Muller(x2, x3).
// Box-Muller(a, b):
//   u = (2 * (a >> 9) + 1) * 2^-24           in [2^-24, 1 - 2^-24], exact in float32
//   R = sqrt(-2 log u)                        (|normal| <= 5.77: tail cut at ~1e-8)
//   q = (b >> 22) & 3 (quadrant), r = b & (2^22 - 1)
//   x = (2 r + 1 - 2^22) * (pi/2 / 2^23)      in (-pi/4, pi/4)
//   T = q * pi/2 + x                          (uniform on the circle)
// log, sin and cos are short polynomials evaluated with plain float32 + - * / sqrt (no
// FMA: the CUDA side uses the __f*_rn intrinsics, the host side is compiled with
// -ffp-contract=off), so the results do not depend on libm or on the device's math library.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define YODA_HD __host__ __device__ __forceinline__
#else
#define YODA_HD inline
#endif

namespace yoda {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;

// ---- float32 arithmetic that no compiler may contract into FMA ---------------------------
#if defined(__CUDA_ARCH__)
YODA_HD float fmul(float a, float b) { return __fmul_rn(a, b); }
YODA_HD float fadd(float a, float b) { return __fadd_rn(a, b); }
YODA_HD float fsub(float a, float b) { return __fsub_rn(a, b); }
YODA_HD float fdiv(float a, float b) { return __fdiv_rn(a, b); }
YODA_HD float fsqrt(float a) { return __fsqrt_rn(a); }
YODA_HD uint32_t f2u(float a) { return __float_as_uint(a); }
YODA_HD float u2f(uint32_t a) { return __uint_as_float(a); }
#else
YODA_HD float fmul(float a, float b) { return a * b; }
YODA_HD float fadd(float a, float b) { return a + b; }
YODA_HD float fsub(float a, float b) { return a - b; }
YODA_HD float fdiv(float a, float b) { return a / b; }
YODA_HD float fsqrt(float a) { return __builtin_sqrtf(a); }
YODA_HD uint32_t f2u(float a) { uint32_t u; std::memcpy(&u, &a, 4); return u; }
YODA_HD float u2f(uint32_t a) { float f; std::memcpy(&f, &a, 4); return f; }
#endif

// ---- Philox4x32-10 ------------------------------------------------------------------------
struct U4 {
  uint32_t x, y, z, w;
};

YODA_HD U4 philox4x32_10(U4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c.x;
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c.z;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c = U4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += kW0;
    k1 += kW1;
  }
  return c;
}

// ---- Box-Muller in explicit float32 -------------------------------------------------------
// log(u) for u = (2a+1) 2^-24 (normal, positive, < 1): u = m 2^e with m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + s^6/7 + s^8/9), s = (m-1)/(m+1), |s| <= 0.1716.
YODA_HD float log_unit(float u) {
  const uint32_t bits = f2u(u);
  const uint32_t mant = bits & 0x007fffffu;
  const int big = mant > 0x003504f3u;  // m > sqrt(2): use m/2 and e+1
  const float m = u2f(mant | (big ? 0x3f000000u : 0x3f800000u));
  const float e = static_cast<float>(static_cast<int>(bits >> 23) - 127 + big);
  const float s = fdiv(fsub(m, 1.0f), fadd(m, 1.0f));
  const float s2 = fmul(s, s);
  float p = 0.11111111f;                  // 1/9
  p = fadd(fmul(p, s2), 0.14285715f);     // 1/7
  p = fadd(fmul(p, s2), 0.2f);            // 1/5
  p = fadd(fmul(p, s2), 0.33333334f);     // 1/3
  p = fadd(fmul(p, s2), 1.0f);
  const float log_m = fmul(fmul(2.0f, s), p);
  // e * ln2 with ln2 split in a short high part (e * hi is exact) and the rest.
  return fadd(fmul(e, 0.693145751953125f), fadd(log_m, fmul(e, 1.428606765330187e-06f)));
}

// sin and cos of x in [-pi/4, pi/4] (Taylor to x^9 / x^10: error < 2e-9).
YODA_HD void sincos_quarter(float x, float* s_out, float* c_out) {
  const float x2 = fmul(x, x);
  float s = 2.7557319e-06f;                // 1/9!
  s = fadd(fmul(s, x2), -1.9841270e-04f);  // -1/7!
  s = fadd(fmul(s, x2), 8.3333333e-03f);   // 1/5!
  s = fadd(fmul(s, x2), -1.6666667e-01f);  // -1/3!
  s = fadd(fmul(s, x2), 1.0f);
  float c = -2.7557319e-07f;               // -1/10!
  c = fadd(fmul(c, x2), 2.4801587e-05f);   // 1/8!
  c = fadd(fmul(c, x2), -1.3888889e-03f);  // -1/6!
  c = fadd(fmul(c, x2), 4.1666667e-02f);   // 1/4!
  c = fadd(fmul(c, x2), -0.5f);
  c = fadd(fmul(c, x2), 1.0f);
  *s_out = fmul(s, x);
  *c_out = c;
}

// Two independent standard normals from two uint32 words.
YODA_HD void box_muller(uint32_t a, uint32_t b, float* n0, float* n1) {
  const float u = fmul(static_cast<float>(static_cast<int>(((a >> 9) << 1) | 1u)), 5.9604644775390625e-08f);  // 2^-24
  const float radius = fsqrt(fmul(-2.0f, log_unit(u)));
  const uint32_t q = (b >> 22) & 3u;
  const int r2 = static_cast<int>(((b & 0x003fffffu) << 1) | 1u) - (1 << 22);  // odd, |r2| < 2^22
  const float x = fmul(static_cast<float>(r2), 1.8725351414619535e-07f);         // (pi/2) / 2^23
  float s, c;
  sincos_quarter(x, &s, &c);
  // rotate (c, s) by q quarter turns: q=0 (c,s), 1 (-s,c), 2 (-c,-s), 3 (s,-c)
  const float cs = (q & 1u) ? s : c;
  const float sn = (q & 1u) ? c : s;
  const float cos_t = (q == 1u || q == 2u) ? -cs : cs;
  const float sin_t = (q >= 2u) ? -sn : sn;
  *n0 = fmul(radius, cos_t);
  *n1 = fmul(radius, sin_t);
}

// The four standard normals of Philox block `blk` (counters 4 blk .. 4 blk + 3).
YODA_HD void normals4(uint64_t seed, uint64_t blk, float out[4]) {
  const U4 r = philox4x32_10(U4{static_cast<uint32_t>(blk), static_cast<uint32_t>(blk >> 32), 0u, 0u},
                             static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  box_muller(r.x, r.y, &out[0], &out[1]);
  box_muller(r.z, r.w, &out[2], &out[3]);
}

}  // namespace philox
}  // namespace yoda
