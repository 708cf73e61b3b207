// CUDA kernels of the residual-context op (torch-free; see residual_context_launchers.h).
//
// The op is memory-bound for N below a few hundred rows: its cost is one read of the embedding
// table, done by the tensor-core GEMM the glue issues per V-chunk. These kernels only have to
// stay small next to it: a statistics pass that reads the logits twice (max, then exp sums), a
// pass that writes one chunk of probabilities in the GEMM's input dtype, and the final mix.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/device_common.cuh"
#include "residual_context_launchers.h"

namespace rcd_ext::cuda {
namespace {

constexpr int kStatsThreads = 512;

// Statistics in two kernels so that a few rows still fill the GPU: each of `splits` blocks per
// row reduces one slice of the row to a partial (max m_b, then sum e^y and sum e^y y with
// y = (z - m_b) k, the nan / +inf counts), and one thread per row merges its partials by
// rescaling with e^(m_b - M) (the partial/merge form of the op in design.md).
// m, s_ent, u_ent, s_prob, nan count, +inf count
constexpr int64_t kPartialFields = kStatisticsPartialFields;

template <typename T>
__global__ void __launch_bounds__(kStatsThreads)
    row_partials_kernel(const T* __restrict__ logits, int64_t vocab, int64_t row_stride,
                        int32_t splits, int64_t span, float inv_t_res, float prob_k,
                        bool shared_sums, float* __restrict__ partials) {
  __shared__ float scratch[kStatsThreads / kWarpSize];
  const int64_t row = blockIdx.x / splits;
  const int64_t split = blockIdx.x % splits;
  const int64_t begin = split * span;
  const int64_t end = begin + span < vocab ? begin + span : vocab;
  const T* z = logits + row * row_stride;

  float m = -INFINITY;
  float bad_nan = 0.0f, bad_posinf = 0.0f;
  for (int64_t v = begin + threadIdx.x; v < end; v += blockDim.x) {
    const float x = to_float(z[v]);
    bad_nan += isnan(x) ? 1.0f : 0.0f;
    bad_posinf += (isinf(x) && x > 0) ? 1.0f : 0.0f;
    m = fmaxf(m, x);  // fmaxf ignores NaN: the count above reports it
  }
  m = block_reduce(m, MaxOp{}, scratch, -INFINITY);
  bad_nan = block_reduce(bad_nan, SumOp{}, scratch, 0.0f);
  bad_posinf = block_reduce(bad_posinf, SumOp{}, scratch, 0.0f);

  float s_ent = 0.0f, u_ent = 0.0f, s_prob = 0.0f;
  if (isfinite(m) && bad_nan == 0.0f && bad_posinf == 0.0f) {
    for (int64_t v = begin + threadIdx.x; v < end; v += blockDim.x) {
      const float x = to_float(z[v]) - m;
      const float y = fmaxf(x * inv_t_res, kLowestExponent);
      const float e = __expf(y);
      s_ent += e;
      u_ent += e * y;
      if (!shared_sums) s_prob += __expf(fmaxf(x * prob_k, kLowestExponent));
    }
    s_ent = block_reduce(s_ent, SumOp{}, scratch, 0.0f);
    u_ent = block_reduce(u_ent, SumOp{}, scratch, 0.0f);
    s_prob = shared_sums ? s_ent : block_reduce(s_prob, SumOp{}, scratch, 0.0f);
  }
  if (threadIdx.x == 0) {
    float* out = partials + (row * splits + split) * kPartialFields;
    out[0] = m;
    out[1] = s_ent;
    out[2] = u_ent;
    out[3] = s_prob;
    out[4] = bad_nan;
    out[5] = bad_posinf;
  }
}

__global__ void merge_partials_kernel(const float* __restrict__ partials, int64_t rows,
                                      int32_t splits, float inv_t_res, float prob_k,
                                      bool shared_sums, int32_t strategy, float alpha_scale,
                                      float log_vocab, float* __restrict__ row_max,
                                      float* __restrict__ row_log_norm,
                                      float* __restrict__ alpha, int32_t* __restrict__ status) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const float* part = partials + row * splits * kPartialFields;
  float m = -INFINITY, nans = 0.0f, posinfs = 0.0f;
  for (int32_t b = 0; b < splits; ++b) {
    m = fmaxf(m, part[b * kPartialFields]);
    nans += part[b * kPartialFields + 4];
    posinfs += part[b * kPartialFields + 5];
  }
  if (nans > 0.0f || posinfs > 0.0f || isinf(m)) {
    status[row] = nans > 0.0f ? kRowNaN : (posinfs > 0.0f ? kRowPosInf : kRowNoFiniteLogit);
    row_max[row] = row_log_norm[row] = alpha[row] = 0.0f;
    return;
  }
  // a slice's y were taken from its own max: y + d with d = (m_b - M) k from the row's max
  float s_ent = 0.0f, u_ent = 0.0f, s_prob = 0.0f;
  for (int32_t b = 0; b < splits; ++b) {
    const float* p = part + b * kPartialFields;
    if (!isfinite(p[0])) continue;  // an all -inf slice adds nothing
    const float d = (p[0] - m) * inv_t_res;
    if (d >= kLowestExponent) {  // below it every e^y of the slice is 0 at the row's scale
      const float scale = __expf(d);
      s_ent += scale * p[1];
      u_ent += scale * (p[2] + d * p[1]);
    }
    if (!shared_sums) {
      const float dp = (p[0] - m) * prob_k;
      if (dp >= kLowestExponent) s_prob += __expf(dp) * p[3];
    }
  }
  if (shared_sums) s_prob = s_ent;
  const float entropy = fminf(fmaxf(logf(s_ent) - u_ent / s_ent, 0.0f), log_vocab);
  const float normalized = entropy / log_vocab;
  const float a = alpha_from_normalized<float>(strategy, normalized, alpha_scale);
  status[row] = kRowOk;
  row_max[row] = m;
  row_log_norm[row] = logf(s_prob);
  alpha[row] = a;
}

constexpr int kProbThreads = 256;
constexpr int kProbColumnsPerThread = 4;

// grid.x walks the chunk's columns, grid.y the rows (strided: grid.y is capped at 65535).
template <typename TIn, typename TOut>
__global__ void __launch_bounds__(kProbThreads)
    chunk_probabilities_kernel(const TIn* __restrict__ logits, int64_t rows,
                               int64_t row_stride, int64_t col0, int64_t width, float k,
                               const float* __restrict__ row_max,
                               const float* __restrict__ row_log_norm, TOut* __restrict__ probs,
                               int64_t probs_stride) {
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kProbColumnsPerThread) * blockDim.x +
                        threadIdx.x;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const TIn* z = logits + row * row_stride + col0;
    TOut* out = probs + row * probs_stride;
    const float m = row_max[row];
    const float log_norm = row_log_norm[row];
#pragma unroll
    for (int j = 0; j < kProbColumnsPerThread; ++j) {
      const int64_t c = first + static_cast<int64_t>(j) * blockDim.x;
      if (c < width) {
        const float y = fmaxf((to_float(z[c]) - m) * k - log_norm, kLowestExponent);
        out[c] = from_float<TOut>(__expf(y));
      }
    }
  }
}

template <typename T>
__global__ void mix_kernel(const float* __restrict__ acc, const float* __restrict__ alpha,
                           const T* __restrict__ mask, T* __restrict__ out, int64_t rows,
                           int64_t dim, const int32_t* __restrict__ status) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * dim) return;
  const int64_t row = i / dim;
  const float a = alpha[row];
  const bool bad = status != nullptr && status[row] != kRowOk;
  out[i] = from_float<T>(bad ? NAN : (1.0f - a) * to_float(mask[i % dim]) + a * acc[i]);
}

}  // namespace

int32_t statistics_splits(int64_t rows, int64_t vocab, int32_t multiprocessors) {
  // enough blocks for ~4 per SM, each slice at least kMinSpan columns, at most kMaxSplits
  constexpr int64_t kMinSpan = 4096;
  constexpr int64_t kMaxSplits = 64;
  const int64_t wanted = (4 * static_cast<int64_t>(multiprocessors) + rows - 1) /
                         (rows > 0 ? rows : 1);
  const int64_t by_width = (vocab + kMinSpan - 1) / kMinSpan;
  int64_t splits = wanted < by_width ? wanted : by_width;
  splits = splits < kMaxSplits ? splits : kMaxSplits;
  return static_cast<int32_t>(splits > 1 ? splits : 1);
}

cudaError_t launch_row_statistics(const StatisticsArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  const float prob_k = a.temper_delta ? a.inv_t_res : 1.0f;
  // one set of sums serves alpha and the probabilities when they share a temperature
  const bool shared_sums = prob_k == a.inv_t_res;
  const int64_t span = (a.vocab + a.splits - 1) / a.splits;
  const cudaError_t partial_error = with_type(a.logits_dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const int64_t blocks = a.rows * a.splits;
    row_partials_kernel<T><<<static_cast<unsigned>(blocks), kStatsThreads, 0, stream>>>(
        static_cast<const T*>(a.logits), a.vocab, a.row_stride, a.splits, span, a.inv_t_res,
        prob_k, shared_sums, a.workspace);
    return cudaGetLastError();
  });
  if (partial_error != cudaSuccess) return partial_error;
  constexpr int kMergeThreads = 128;
  const unsigned merge_blocks = static_cast<unsigned>((a.rows + kMergeThreads - 1) / kMergeThreads);
  merge_partials_kernel<<<merge_blocks, kMergeThreads, 0, stream>>>(
      a.workspace, a.rows, a.splits, a.inv_t_res, prob_k, shared_sums, a.strategy, a.alpha_scale,
      a.log_vocab, a.row_max, a.row_log_norm, a.alpha, a.status);
  return cudaGetLastError();
}

cudaError_t launch_chunk_probabilities(const ProbabilitiesArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.width == 0) return cudaSuccess;
  const int64_t per_block = static_cast<int64_t>(kProbThreads) * kProbColumnsPerThread;
  constexpr int64_t kMaxGridY = 65535;
  const dim3 grid(static_cast<unsigned>((a.width + per_block - 1) / per_block),
                  static_cast<unsigned>(a.rows < kMaxGridY ? a.rows : kMaxGridY));
  return with_type(a.logits_dtype, [&](auto* in_tag) {
    using TIn = std::remove_pointer_t<decltype(in_tag)>;
    return with_type(a.probs_dtype, [&](auto* out_tag) {
      using TOut = std::remove_pointer_t<decltype(out_tag)>;
      chunk_probabilities_kernel<TIn, TOut><<<grid, kProbThreads, 0, stream>>>(
          static_cast<const TIn*>(a.logits), a.rows, a.row_stride, a.col0, a.width, a.k, a.row_max,
          a.row_log_norm, static_cast<TOut*>(a.probs), a.probs_stride);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_mix(const MixArgs& a, cudaStream_t stream) {
  const int64_t total = a.rows * a.dim;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned blocks = static_cast<unsigned>((total + kThreads - 1) / kThreads);
  return with_type(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    mix_kernel<T><<<blocks, kThreads, 0, stream>>>(a.acc, a.alpha, static_cast<const T*>(a.mask),
                                                   static_cast<T*>(a.out), a.rows, a.dim,
                                                   a.status);
    return cudaGetLastError();
  });
}

}  // namespace rcd_ext::cuda
