// What the CPU kernels share: one pass over memory, parallel over image rows (b, c, h) with
// at::parallel_for, inner loops over w that the compiler vectorises when every operand has unit
// w-stride.  Here: the parallel grain, the walk over rows and their offsets, the branch-free
// select the row loops need to vectorise, and the attribute that compiles a loop twice (AVX2
// and baseline) and picks one at load time.
#pragma once

#include "yoda_ops.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

// GCC/Clang function multi-versioning: an AVX2 clone of a function (the Box-Muller loop, the
// loss tasks) is picked at load time on CPUs that have it (same results: no FMA, same IEEE
// float ops).
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(YODA_NO_TARGET_CLONES)
#define YODA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define YODA_CLONES
#endif

namespace yoda {

constexpr int64_t kElementsPerTask = 32768;  // grain of parallel_for, in elements

inline int64_t row_grain(int64_t W) {
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

inline Geometry geometry_of(const at::Tensor& t) {
  return {t.size(0), t.size(1), t.size(2), t.size(3)};
}

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

inline bool unit_w(std::initializer_list<Strides4> ss) {
  for (const auto& s : ss)
    if (s.w != 1) return false;
  return true;
}

}  // namespace yoda
