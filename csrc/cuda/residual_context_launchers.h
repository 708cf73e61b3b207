// Host launchers of the CUDA kernels of the residual-context op. Torch-free on both sides: the
// kernels (residual_context_kernels.cu) know nothing of tensors, and the torch glue
// (residual_context_cuda.cpp) only sees these declarations.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace rcd_ext::cuda {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct StatisticsArgs {
  const void* logits;  // [rows, vocab], unit column stride, rows `row_stride` apart
  DType logits_dtype;
  int64_t rows;
  int64_t vocab;
  int64_t row_stride;  // >= vocab: a column slice logits[:, :V] is read in place
  float inv_t_res;
  bool temper_delta;
  int32_t strategy;  // rcd_ext::Strategy
  float alpha_scale;
  float log_vocab;
  float* row_max;       // [rows]
  float* row_log_norm;  // [rows]: log sum e^((z - max) k), k = 1 or 1 / t_res for delta
  float* alpha;         // [rows]
  int32_t* status;      // [rows]: rcd_ext::RowStatus
  int32_t splits;       // blocks per row, from statistics_splits
  float* workspace;     // [rows * splits * kStatisticsPartialFields] float32 partials
};

constexpr int64_t kStatisticsPartialFields = 6;

// How many blocks share one row's statistics: a few rows of a large vocabulary (the usual
// decoding step: N = 32-64, V = 126k-152k) would otherwise leave most SMs idle.
int32_t statistics_splits(int64_t rows, int64_t vocab, int32_t multiprocessors);

struct ProbabilitiesArgs {
  const void* logits;
  DType logits_dtype;
  int64_t rows;
  int64_t vocab;
  int64_t row_stride;
  int64_t col0;   // first vocabulary column of the chunk
  int64_t width;  // columns in the chunk
  float k;        // 1, or 1 / t_res when temper_delta
  const float* row_max;
  const float* row_log_norm;
  void* probs;  // [rows, width] with row stride probs_stride, dtype probs_dtype
  DType probs_dtype;
  int64_t probs_stride;
};

struct MixArgs {
  const float* acc;    // [rows, dim] float32 residual
  const float* alpha;  // [rows]
  const void* mask;    // [dim]
  void* out;           // [rows, dim]
  DType dtype;         // of mask and out
  int64_t rows;
  int64_t dim;
  // null when the host has checked every row; otherwise (inside a CUDA graph capture, where the
  // host cannot look) rows whose status is not ok come out as NaN instead of an error
  const int32_t* status;
};

// Each returns the launch's cudaError_t (cudaSuccess when fine).
cudaError_t launch_row_statistics(const StatisticsArgs& args, cudaStream_t stream);
cudaError_t launch_chunk_probabilities(const ProbabilitiesArgs& args, cudaStream_t stream);
cudaError_t launch_mix(const MixArgs& args, cudaStream_t stream);

}  // namespace rcd_ext::cuda
