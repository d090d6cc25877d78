// See gemm_cpu.h.
#include "gemm_cpu.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace yoda {
namespace cpu_gemm {
namespace {

// Packed copies are keyed on the weight's storage (and offset), not on its TensorImpl: a module's
// parameter and the detached aliases a caller makes of it (one per sampling run: the sparse
// engine's channels_last view of each weight) share one packed copy, where a TensorImpl key made
// every new alias repack (117-281 MB for SR3 16->128, 0.13 s per run on the 2-core CPU). The
// version counter is shared by a tensor and its views, so an in-place update of any of them is
// seen; sizes and strides tell views at the same offset apart.
using WeakStorage = c10::weak_intrusive_ptr<c10::StorageImpl>;

struct Key {
  const c10::StorageImpl* storage;
  int64_t offset;
  bool operator==(const Key& o) const { return storage == o.storage && offset == o.offset; }
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    return std::hash<const void*>()(k.storage) ^ (std::hash<int64_t>()(k.offset) * 0x9e3779b97f4a7c15ULL);
  }
};

struct Packed {
  WeakStorage owner;  // keeps the storage's address from being reused while the entry exists
  const void* data;
  uint32_t version;
  std::vector<int64_t> sizes, strides;
  at::Tensor matrix;
};

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}

std::unordered_map<Key, Packed, KeyHash>& cache() {
  static std::unordered_map<Key, Packed, KeyHash> c;
  return c;
}

at::Tensor pack(const at::Tensor& weight) {
  return weight.permute({2, 3, 1, 0}).contiguous().view({-1, weight.size(0)});
}

}  // namespace

bool available() {
#if defined(CPUBLAS_BRGEMM_F32F32F32) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool avx2 = __builtin_cpu_supports("avx2");
  const char* env = std::getenv("YODA_SPARSE_CONV_BRGEMM");
  if (env && std::string(env) == "0") return false;
  return avx2 && at::globalContext().userEnabledMkldnn();
#else
  return false;
#endif
}

at::Tensor packed_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 4, "packed_weight takes a float32 [C_out, C, kh, kw]");
  // inference tensors have no version counter to check against: packed per call
  if (weight.is_inference() || !weight.has_storage()) return pack(weight);
  const Key key{weight.storage().unsafeGetStorageImpl(), weight.storage_offset()};
  const uint32_t version = weight.unsafeGetTensorImpl()->version_counter().current_version();
  std::lock_guard<std::mutex> lock(cache_mutex());
  auto& entries = cache();
  auto it = entries.find(key);
  if (it != entries.end() && !it->second.owner.expired() && it->second.data == weight.const_data_ptr() &&
      it->second.version == version && it->second.sizes == weight.sizes().vec() &&
      it->second.strides == weight.strides().vec()) {
    return it->second.matrix;
  }
  for (auto e = entries.begin(); e != entries.end();) e = e->second.owner.expired() ? entries.erase(e) : std::next(e);
  Packed p{WeakStorage(weight.storage().getWeakStorageImpl()), weight.const_data_ptr(), version,
           weight.sizes().vec(), weight.strides().vec(), pack(weight)};
  at::Tensor matrix = p.matrix;
  entries.insert_or_assign(key, std::move(p));
  return matrix;
}

int64_t packed_bytes() {
  std::lock_guard<std::mutex> lock(cache_mutex());
  int64_t bytes = 0;
  for (const auto& e : cache()) {
    if (!e.second.owner.expired()) bytes += e.second.matrix.numel() * e.second.matrix.element_size();
  }
  return bytes;
}

void clear_packed() {
  std::lock_guard<std::mutex> lock(cache_mutex());
  cache().clear();
}

int64_t column_block(int64_t N, int64_t row_blocks) {
  int64_t cols = std::min(N, kCols);
  // too few blocks for the threads: narrower column blocks (never under 64, a whole ZMM tile row)
  const int64_t threads = at::get_num_threads();
  if (row_blocks * ((N + cols - 1) / cols) < threads && N > 64) {
    const int64_t parts = std::min<int64_t>((threads + row_blocks - 1) / row_blocks, (N + 63) / 64);
    cols = std::max<int64_t>(64, ((N + parts - 1) / parts + 15) / 16 * 16);
  }
  return cols;
}

void accumulate(int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b, int64_t ld_c, bool add, const float* A,
                const float* B, float* C) {
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
    const int64_t kk = std::min(kDepth, K - k0);
    at::native::cpublas::brgemm(M, N, kk, ld_a, ld_b, ld_c, add || k0 > 0, A + k0, B + k0 * ld_b, C, false);
  }
#else
  TORCH_CHECK(false, "yoda_sparse: this torch has no float32 cpublas::brgemm (cpu_gemm::available() is false)");
#endif
}

void gemm(const float* A, int64_t M, int64_t K, const float* B, int64_t N, const float* bias,
          const std::function<void(int64_t, int64_t, int64_t, int64_t, const float*)>& epilogue) {
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  if (M <= 0) return;
  const int64_t row_blocks = (M + kRows - 1) / kRows;
  const int64_t cols = column_block(N, row_blocks);
  const int64_t col_blocks = (N + cols - 1) / cols;
  // column-block-major order: contiguous task ranges share B's columns
  at::parallel_for(0, col_blocks * row_blocks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> acc(kRows * cols);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t n0 = (task / row_blocks) * cols, m0 = (task % row_blocks) * kRows;
      const int64_t nn = std::min(cols, N - n0), mm = std::min(kRows, M - m0);
      if (bias) {
        for (int64_t r = 0; r < mm; ++r) std::memcpy(acc.data() + r * nn, bias + n0, sizeof(float) * nn);
      }
      accumulate(mm, nn, K, K, N, nn, bias != nullptr, A + m0 * K, B + n0, acc.data());
      epilogue(m0, mm, n0, nn, acc.data());
    }
  });
#else
  TORCH_CHECK(false, "yoda_sparse: this torch has no float32 cpublas::brgemm (cpu_gemm::available() is false)");
#endif
}

}  // namespace cpu_gemm
}  // namespace yoda
