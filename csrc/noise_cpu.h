// Standard normals from Philox on the CPU: bit-identical to the CUDA kernels' in-kernel noise
// for the same (seed, counter) (the counter mapping is in philox.h).
#pragma once

#include <cstdint>

namespace yoda {

// out[j] = standard normal of counter k0 + j, j < n (see philox.h for the mapping).
void fill_normals(uint64_t seed, uint64_t k0, int64_t n, float* out);

}  // namespace yoda
