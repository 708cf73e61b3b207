// The sparse residual's product over the k chosen embedding rows, over float vectors.
#pragma once

#include <cstdint>

#include "cpu/row_kernels.h"

namespace rcd_ext::cpu {

// head += w * e and picked += e over one embedding row e of n floats.
RCD_VECTOR_CLONES inline void accumulate_weighted_row(const float* e, int64_t n, float w,
                                                      float* head, float* picked) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) {
    head[d] += w * e[d];
    picked[d] += e[d];
  }
}

}  // namespace rcd_ext::cpu
