// CUDA kernel of the sparse (top-k) residual op (torch-free; see
// residual_context_top_k_launchers.h). One block per row, in one kernel:
//   1. a single pass over the row's logits, kTileValues at a time (kItems loads in flight per
//      thread): each thread keeps an online max and exp sums (rescaled when its max rises), and
//      values above the block's threshold join a candidate buffer in shared memory; when the
//      buffer could overflow on the next tile it is bitonic-sorted, cut to the k best and the
//      threshold rises (ties: the lower column first, so only values strictly above the
//      threshold can still enter);
//   2. the block combines the statistics (alpha, the normaliser of p) and turns the k
//      candidates into probabilities;
//   3. the k chosen embedding rows are read once, coalesced along D, for the head and their
//      plain sum (for the tail's mean, with the passed table sum); the row is mixed and written.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/device_common.cuh"
#include "cuda/residual_context_top_k_launchers.h"

namespace rcd_ext::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kItems = 4;
constexpr int kTileValues = kThreads * kItems;
constexpr int kCapacity = 4096;  // >= kMaxTopK + kTileValues, a power of two
static_assert(kCapacity >= kMaxTopK + kTileValues, "the candidate buffer must hold k + a tile");
constexpr int32_t kNoColumn = 0x7fffffff;   // padding: ranks after every real candidate


// sum e^y and sum e^y y with y = (x - m) k, relative to this thread's running maximum m.
struct ExpSums {
  float s = 0.0f;
  float u = 0.0f;

  // Re-expresses the sums relative to new_m >= old_m: y' = y + d, e' = e^d e.
  __device__ void rescale(float old_m, float new_m, float k) {
    if (s == 0.0f) return;  // nothing summed yet (old_m may be -inf)
    const float d = (old_m - new_m) * k;
    if (!(d >= kLowestExponent)) {  // e^d is 0 in float (and d may be -inf: 0 * inf = NaN)
      s = u = 0.0f;
      return;
    }
    const float c = __expf(d);
    u = c * (u + s * d);
    s = c * s;
  }

  __device__ void add(float x, float m, float k) {
    const float y = fmaxf((x - m) * k, kLowestExponent);
    const float e = __expf(y);
    s += e;
    u += e * y;
  }
};

struct Candidates {
  float value[kCapacity];
  int32_t column[kCapacity];
  int count;
  float threshold;
  int has_threshold;
};

__device__ __forceinline__ bool ranks_before(float va, int32_t ca, float vb, int32_t cb) {
  return va > vb || (va == vb && ca < cb);
}

// Bitonic sort of the buffer (padded to a power of two), best first, then keep the k best.
__device__ void cut_candidates(Candidates& c, int k) {
  __syncthreads();
  const int n = c.count;
  int size = 1;
  while (size < n) size <<= 1;
  for (int i = n + threadIdx.x; i < size; i += blockDim.x) {
    c.value[i] = -INFINITY;
    c.column[i] = kNoColumn;
  }
  __syncthreads();
  for (int span = 2; span <= size; span <<= 1) {
    for (int stride = span / 2; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < size; i += blockDim.x) {
        const int j = i ^ stride;
        if (j <= i) continue;
        const bool best_first = (i & span) == 0;
        const bool j_first = ranks_before(c.value[j], c.column[j], c.value[i], c.column[i]);
        const bool i_first = ranks_before(c.value[i], c.column[i], c.value[j], c.column[j]);
        if (best_first ? j_first : i_first) {
          const float v = c.value[i];
          const int32_t col = c.column[i];
          c.value[i] = c.value[j];
          c.column[i] = c.column[j];
          c.value[j] = v;
          c.column[j] = col;
        }
      }
      __syncthreads();
    }
  }
  if (threadIdx.x == 0) {
    c.count = n < k ? n : k;
    c.threshold = c.value[k - 1];
    c.has_threshold = n >= k;
  }
  __syncthreads();
}

template <typename T, typename E>
__global__ void __launch_bounds__(kThreads)
    top_k_residual_kernel(const T* __restrict__ logits, int64_t vocab, int64_t row_stride,
                          const E* __restrict__ table, const E* __restrict__ mask,
                          int64_t table_stride, int64_t dim, const float* __restrict__ table_sum,
                          float inv_t_res, bool temper_delta, int32_t strategy,
                          float alpha_scale, float log_vocab, int k, E* __restrict__ out,
                          float* __restrict__ alpha_out, int32_t* __restrict__ status_out) {
  __shared__ Candidates cand;
  __shared__ float scratch[kThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  const T* z = logits + row * row_stride;
  const float prob_k = temper_delta ? inv_t_res : 1.0f;
  const float entropy_k = strategy_uses_entropy(strategy) ? inv_t_res : prob_k;
  const bool shared_sums = entropy_k == prob_k;
  if (threadIdx.x == 0) {
    cand.count = 0;
    cand.has_threshold = 0;
    cand.threshold = -INFINITY;
  }
  __syncthreads();

  // ---- 1. the single pass: statistics and candidates
  float m = -INFINITY;
  ExpSums ent, prob;
  float nans = 0.0f, posinfs = 0.0f;
  for (int64_t tile = 0; tile < vocab; tile += kTileValues) {
    if (cand.count > kCapacity - kTileValues) cut_candidates(cand, k);
    float x[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {  // all loads first: kItems in flight per thread
      const int64_t c = tile + i * kThreads + threadIdx.x;
      x[i] = c < vocab ? to_float(z[c]) : -INFINITY;
    }
    const bool has_threshold = cand.has_threshold;
    const float threshold = cand.threshold;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t c = tile + i * kThreads + threadIdx.x;
      if (c >= vocab) continue;
      const float v = x[i];
      if (isnan(v)) {
        nans += 1.0f;
        continue;
      }
      if (!has_threshold || v > threshold) {
        const int slot = atomicAdd(&cand.count, 1);
        cand.value[slot] = v;
        cand.column[slot] = static_cast<int32_t>(c);
      }
      if (isinf(v)) {
        posinfs += v > 0 ? 1.0f : 0.0f;
        continue;  // +inf: a bad row; -inf: e^y = 0
      }
      if (v > m) {
        ent.rescale(m, v, entropy_k);
        if (!shared_sums) prob.rescale(m, v, prob_k);
        m = v;
      }
      ent.add(v, m, entropy_k);
      if (!shared_sums) prob.add(v, m, prob_k);
    }
    __syncthreads();  // every append of this tile lands before the next overflow check
  }
  cut_candidates(cand, k);

  // ---- 2. the row's statistics
  const float row_max = block_reduce(m, MaxOp{}, scratch, -INFINITY);
  ent.rescale(m, row_max, entropy_k);
  if (!shared_sums) prob.rescale(m, row_max, prob_k);
  const float s_ent = block_reduce(ent.s, SumOp{}, scratch, 0.0f);
  const float u_ent = block_reduce(ent.u, SumOp{}, scratch, 0.0f);
  const float s_prob = shared_sums ? s_ent : block_reduce(prob.s, SumOp{}, scratch, 0.0f);
  nans = block_reduce(nans, SumOp{}, scratch, 0.0f);
  posinfs = block_reduce(posinfs, SumOp{}, scratch, 0.0f);
  const int32_t status = nans > 0.0f      ? kRowNaN
                         : posinfs > 0.0f ? kRowPosInf
                         : isinf(row_max) ? kRowNoFiniteLogit
                                          : kRowOk;
  if (status != kRowOk) {  // block-uniform
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) out[row * dim + d] = from_float<E>(NAN);
    if (threadIdx.x == 0) {
      status_out[row] = status;
      alpha_out[row] = 0.0f;
    }
    return;
  }
  const float entropy = fminf(fmaxf(logf(s_ent) - u_ent / s_ent, 0.0f), log_vocab);
  const float normalized = entropy / log_vocab;
  const float a = alpha_from_normalized<float>(strategy, normalized, alpha_scale);
  if (threadIdx.x == 0) {
    status_out[row] = kRowOk;
    alpha_out[row] = a;
  }
  const float log_norm = logf(s_prob);
  float p_mine = 0.0f;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {  // p over the k candidates, in place
    const float p = expf(fmaxf((cand.value[j] - row_max) * prob_k - log_norm, kLowestExponent));
    cand.value[j] = p;
    p_mine += p;
  }
  const float tail_mass = fmaxf(1.0f - block_reduce(p_mine, SumOp{}, scratch, 0.0f), 0.0f);

  // ---- 3. the k-row product, coalesced along D (block_reduce's barrier published the p's)
  const float inv_tail_rows = 1.0f / static_cast<float>(vocab - k);
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    float head = 0.0f, picked = 0.0f;
    for (int j = 0; j < k; ++j) {
      const float e = to_float(table[static_cast<int64_t>(cand.column[j]) * table_stride + d]);
      head = fmaf(cand.value[j], e, head);
      picked += e;
    }
    const float delta = head + tail_mass * ((table_sum[d] - picked) * inv_tail_rows);
    out[row * dim + d] = from_float<E>((1.0f - a) * to_float(mask[d]) + a * delta);
  }
}

}  // namespace

cudaError_t launch_top_k_residual(const TopKResidualArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  if (a.k < 1 || a.k > kMaxTopK || a.k >= a.vocab || a.vocab > 0x7fffffff ||
      a.rows > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  return with_type(a.logits_dtype, [&](auto* logits_tag) {
    using T = std::remove_pointer_t<decltype(logits_tag)>;
    return with_type(a.table_dtype, [&](auto* table_tag) {
      using E = std::remove_pointer_t<decltype(table_tag)>;
      top_k_residual_kernel<T, E><<<static_cast<unsigned>(a.rows), kThreads, 0, stream>>>(
          static_cast<const T*>(a.logits), a.vocab, a.row_stride,
          static_cast<const E*>(a.table), static_cast<const E*>(a.mask), a.table_stride, a.dim,
          a.table_sum, a.inv_t_res, a.temper_delta, a.strategy, a.alpha_scale, a.log_vocab,
          a.k, static_cast<E*>(a.out), a.alpha, a.status);
      return cudaGetLastError();
    });
  });
}

}  // namespace rcd_ext::cuda
