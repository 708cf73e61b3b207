// Host-side helpers shared by the torch glue of the exact and the sparse CUDA op.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include "cuda/residual_context_launchers.h"

namespace rcd_ext {

inline cuda::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kHalf:
      return cuda::DType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, "unsupported dtype ", t);
  }
}

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "rcd_ext: CUDA launch of ", what, " failed: ",
              cudaGetErrorString(err));
}

}  // namespace rcd_ext
