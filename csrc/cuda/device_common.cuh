// Device helpers shared by the CUDA kernels of the exact and the sparse op: dtype conversion,
// warp and block reductions (strategy and row-status codes: csrc/residual_codes.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/residual_context_launchers.h"
#include "residual_codes.h"  // Strategy, RowStatus, alpha_from_normalized

namespace rcd_ext::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr float kLowestExponent = -104.0f;  // e^y is 0 below; avoids 0 * -inf in e^y * y


__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Reduces over the block; every thread gets the result. `scratch` holds one float per warp.
template <typename Op>
__device__ float block_reduce(float v, Op op, float* scratch, float identity) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  v = warp_reduce(v, op);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : identity;
  return warp_reduce(v, op);
}

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};

// Calls fn with a null pointer of the C++ type that `dtype` names.
template <typename Fn>
cudaError_t with_type(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      return fn(static_cast<float*>(nullptr));
    case DType::kBFloat16:
      return fn(static_cast<__nv_bfloat16*>(nullptr));
    case DType::kFloat16:
      return fn(static_cast<__half*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace rcd_ext::cuda
