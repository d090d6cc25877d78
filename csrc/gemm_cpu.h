// The CPU sparse convolution's GEMM for its pixel layout (sparse_conv_cpu.cpp): an im2col matrix
// A [M, K] times the convolution's weight as B [K, N], blocked over output rows and channels and
// run through oneDNN's BRGEMM micro-kernel (ATen's at::native::cpublas::brgemm), each finished
// block handed to the caller's epilogue while it is still in cache.
//
// Why not at::mm or a oneDNN 1x1 convolution (measured on a 2-core Zen 5 CPU, fp32, 2 threads,
// 316 x 4608 x 512, the shape of a 32 px level's sparse step): MKL's sgemm runs 200 GF/s there
// (its AVX2 code on AMD), oneDNN's 1x1 convolution of the same matrix 1.3x the dense 3x3
// convolution's time per pixel, the blocked BRGEMM 450-480 GF/s, the dense convolution's rate.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>

namespace yoda {
namespace cpu_gemm {

// Block sizes, measured on the 2-core Zen 5 CPU (benchmarks/RESULTS.md): 64 rows and 256
// columns per block keep A's rows and B's slice of one K chunk (256 rows) in L2 together
// (316 x 4608 x 512: 478 GF/s; the whole of M per block: 246 GF/s, K unchunked: 114 GF/s).
constexpr int64_t kRows = 64;
constexpr int64_t kCols = 256;
constexpr int64_t kDepth = 256;

// Whether the BRGEMM path can serve float32 here: compiled in (torch >= 2.7 has a float32
// cpublas::brgemm), oneDNN enabled (torch.backends.mkldnn) and an AVX2 CPU (below that ATen
// falls back to a plain gemm per call), and not switched off by YODA_SPARSE_CONV_BRGEMM=0.
bool available();

// The weight [C_out, C, kh, kw] as the GEMM's B: float32 [kh * kw * C, C_out] row-major, row
// (ky, kx, c), the column order of the pixel layout's im2col matrix. Packing is a transpose of the
// whole weight (1-2 ms at 512 x 512 x 3 x 3, as long as the GEMM it serves), so it is cached
// per weight storage while it lives and is unchanged (same storage and offset, same version,
// sizes and strides: a parameter and its detached aliases share one copy);
// tensors without a version counter (inference mode) are packed per call.
at::Tensor packed_weight(const at::Tensor& weight);

// Bytes held by the packed-weight cache (weights alive now).
int64_t packed_bytes();

// Frees every cached packed weight.
void clear_packed();

// Columns per block for an N-column GEMM of `row_blocks` row blocks: kCols, or narrower (never
// under 64) where there would be fewer blocks than threads.
int64_t column_block(int64_t N, int64_t row_blocks);

// C [M, N] (row stride ld_c) = A [M, K] (row stride ld_a) times B [K, N] (row stride ld_b),
// added to C's values where `add`: one micro-kernel call per kDepth-deep slice of K (the direct
// layout's implicit GEMM, one call per kernel tap, sparse_conv_cpu.cpp).
void accumulate(int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b, int64_t ld_c, bool add, const float* A,
                const float* B, float* C);

// C = A [M, K] (row-major, ld_a = K) times B [K, N] (packed_weight) plus bias [N] (or nullptr),
// in blocks of rows x channels spread over the threads; epilogue(m0, rows, n0, cols, acc) gets
// each block, acc [rows, cols] with row stride `cols`.
void gemm(const float* A, int64_t M, int64_t K, const float* B, int64_t N, const float* bias,
          const std::function<void(int64_t, int64_t, int64_t, int64_t, const float*)>& epilogue);

}  // namespace cpu_gemm
}  // namespace yoda
