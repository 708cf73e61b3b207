// Host launcher of the CUDA kernel of the sparse (top-k) residual op. Torch-free on both sides,
// like residual_context_launchers.h (whose DType it shares).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/residual_context_launchers.h"

namespace rcd_ext::cuda {

// The kernel keeps up to 4096 candidates per row in shared memory: k + one 2048-value tile.
constexpr int64_t kMaxTopK = 1024;

struct TopKResidualArgs {
  const void* logits;  // [rows, vocab], unit column stride, rows `row_stride` apart
  DType logits_dtype;
  int64_t rows;
  int64_t vocab;       // < 2^31
  int64_t row_stride;  // >= vocab: a column slice logits[:, :V] is read in place
  const void* table;   // [>= vocab, dim] embedding rows `table_stride` apart, unit column stride
  const void* mask;    // [dim], contiguous
  DType table_dtype;   // of table, mask and out
  int64_t table_stride;
  int64_t dim;
  const float* table_sum;  // [dim] sum of table[:vocab]'s rows
  float inv_t_res;
  bool temper_delta;
  int32_t strategy;  // rcd_ext::Strategy
  float alpha_scale;
  float log_vocab;
  int32_t k;  // 1 <= k < vocab, k <= kMaxTopK
  void* out;  // [rows, dim], contiguous; bad rows come out NaN
  float* alpha;     // [rows]
  int32_t* status;  // [rows]: rcd_ext::RowStatus
};

// One block per row: the single pass over the logits (statistics + top k), then the k-row
// product and the mix. Returns the launch's cudaError_t.
cudaError_t launch_top_k_residual(const TopKResidualArgs& args, cudaStream_t stream);

}  // namespace rcd_ext::cuda
