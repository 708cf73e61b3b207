// CPU implementation of rcd_ext::residual_context, and the op's schema.
//
// Statistics pass: two sweeps per row (max, then the exp sums) over float tiles. Residual: the
// probabilities of one V-chunk at a time, multiplied into a float32 accumulator by BLAS.
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "cpu/row_kernels.h"
#include "residual_context.h"

namespace rcd_ext {
namespace {

using cpu::kTile;

template <typename T>
void to_float(const T* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
void from_float(const float* src, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// Calls fn(tile_pointer, tile_length) over one row, converting to float where needed.
template <typename T, typename Fn>
void for_each_float_tile(const T* row, int64_t vocab, float* scratch, Fn&& fn) {
  for (int64_t start = 0; start < vocab; start += kTile) {
    const int64_t n = std::min(kTile, vocab - start);
    if constexpr (std::is_same_v<T, float>) {
      fn(row + start, n, start);
    } else {
      to_float(row + start, n, scratch);
      fn(static_cast<const float*>(scratch), n, start);
    }
  }
}

template <typename T>
void row_statistics_typed(const at::Tensor& logits, const ResidualParams& params,
                          at::Tensor& row_max, at::Tensor& row_log_norm, at::Tensor& alpha,
                          at::Tensor& status) {
  const int64_t rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  const T* base = logits.data_ptr<T>();
  const int64_t row_stride = logits.stride(0);
  float* max_out = row_max.data_ptr<float>();
  float* log_norm_out = row_log_norm.data_ptr<float>();
  float* alpha_out = alpha.data_ptr<float>();
  int32_t* status_out = status.data_ptr<int32_t>();
  const float prob_k = params.temper_delta ? params.inv_t_res : 1.0f;
  const bool need_entropy = strategy_uses_entropy(strategy_code(params.strategy));
  // One set of sums serves both when the entropy and the probabilities share a temperature.
  const bool shared_sums = !need_entropy || prob_k == params.inv_t_res;

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float scratch[kTile];
    for (int64_t r = begin; r < end; ++r) {
      const T* row = base + r * row_stride;
      float m = -std::numeric_limits<float>::infinity();
      int64_t nans = 0, posinfs = 0;
      for_each_float_tile(row, vocab, scratch, [&](const float* x, int64_t n, int64_t) {
        const cpu::TileMax t = cpu::tile_max(x, n);
        m = std::max(m, t.max);
        nans += t.nan_count;
        posinfs += t.posinf_count;
      });
      if (nans || posinfs || m == -std::numeric_limits<float>::infinity()) {
        status_out[r] = nans ? kRowNaN : (posinfs ? kRowPosInf : kRowNoFiniteLogit);
        max_out[r] = log_norm_out[r] = alpha_out[r] = 0.0f;
        continue;
      }
      const float entropy_k = need_entropy ? params.inv_t_res : prob_k;
      double s_ent = 0.0, u_ent = 0.0, s_prob = 0.0, u_unused = 0.0;
      for_each_float_tile(row, vocab, scratch, [&](const float* x, int64_t n, int64_t) {
        cpu::tile_exp_sums(x, n, m, entropy_k, &s_ent, &u_ent);
        if (!shared_sums) cpu::tile_exp_sums(x, n, m, prob_k, &s_prob, &u_unused);
      });
      if (shared_sums) s_prob = s_ent;
      const double entropy = std::log(s_ent) - u_ent / s_ent;
      status_out[r] = kRowOk;
      max_out[r] = m;
      log_norm_out[r] = static_cast<float>(std::log(s_prob));
      alpha_out[r] = alpha_from_entropy(entropy, params);
    }
  });
}

template <typename TIn, typename TOut>
void chunk_probabilities_typed(const at::Tensor& logits, const at::Tensor& row_max,
                               const at::Tensor& row_log_norm, const ResidualParams& params,
                               int64_t col0, at::Tensor& probs) {
  const int64_t rows = logits.size(0);
  const int64_t width = probs.size(1);
  const int64_t probs_stride = probs.stride(0);
  const TIn* base = logits.data_ptr<TIn>();
  const int64_t row_stride = logits.stride(0);
  TOut* out_base = probs.data_ptr<TOut>();
  const float* m = row_max.data_ptr<float>();
  const float* log_norm = row_log_norm.data_ptr<float>();
  const float k = params.temper_delta ? params.inv_t_res : 1.0f;

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float scratch[kTile];
    alignas(64) float tile_out[kTile];
    for (int64_t r = begin; r < end; ++r) {
      TOut* out_row = out_base + r * probs_stride;
      for_each_float_tile(base + r * row_stride + col0, width, scratch,
                          [&](const float* x, int64_t n, int64_t start) {
                            if constexpr (std::is_same_v<TOut, float>) {
                              cpu::tile_probabilities(x, n, m[r], k, log_norm[r],
                                                      out_row + start);
                            } else {
                              cpu::tile_probabilities(x, n, m[r], k, log_norm[r], tile_out);
                              from_float(tile_out, n, out_row + start);
                            }
                          });
    }
  });
}

template <typename T>
void mix_typed(const at::Tensor& acc, const at::Tensor& alpha, const at::Tensor& mask,
               at::Tensor& out) {
  const int64_t rows = acc.size(0);
  const int64_t dim = acc.size(1);
  const float* a = alpha.data_ptr<float>();
  const float* r = acc.data_ptr<float>();
  const T* m = mask.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t d = 0; d < dim; ++d) {
        const float mixed = (1.0f - a[i]) * static_cast<float>(m[d]) + a[i] * r[i * dim + d];
        o[i * dim + d] = static_cast<T>(mixed);
      }
    }
  });
}

#define RCD_DISPATCH_FLOAT(dtype, NAME, ...)                                       \
  [&] {                                                                            \
    switch (dtype) {                                                               \
      case at::kFloat: { using NAME = float; return __VA_ARGS__(); }               \
      case at::kBFloat16: { using NAME = c10::BFloat16; return __VA_ARGS__(); }    \
      case at::kHalf: { using NAME = c10::Half; return __VA_ARGS__(); }            \
      default: TORCH_CHECK_TYPE(false, "unsupported dtype ", dtype);               \
    }                                                                              \
  }()

struct CpuKernels {
  static constexpr int64_t kChunkBudgetElements = int64_t{1} << 20;

  static void row_statistics(const at::Tensor& logits, const ResidualParams& params,
                             at::Tensor& row_max, at::Tensor& row_log_norm, at::Tensor& alpha,
                             at::Tensor& status) {
    RCD_DISPATCH_FLOAT(logits.scalar_type(), T, [&] {
      row_statistics_typed<T>(logits, params, row_max, row_log_norm, alpha, status);
    });
  }

  static bool check_rows(const at::Tensor& status) {
    raise_for_row_status(status);
    return true;
  }

  static void chunk_probabilities(const at::Tensor& logits, const at::Tensor& row_max,
                                  const at::Tensor& row_log_norm, const ResidualParams& params,
                                  int64_t col0, at::Tensor& probs) {
    RCD_DISPATCH_FLOAT(logits.scalar_type(), TIn, [&] {
      RCD_DISPATCH_FLOAT(probs.scalar_type(), TOut, [&] {
        chunk_probabilities_typed<TIn, TOut>(logits, row_max, row_log_norm, params, col0,
                                             probs);
      });
    });
  }

  static void accumulate(at::Tensor& acc, const at::Tensor& probs,
                         const at::Tensor& embed_chunk) {
    if (embed_chunk.scalar_type() == at::kFloat) {
      acc.addmm_(probs, embed_chunk);
    } else if (has_native_gemm(embed_chunk.scalar_type())) {
      // ATen's CPU GEMM has no half-in, float-out form: the chunk's product is rounded to the
      // half type once, and the sum over chunks is kept in float32.
      acc.add_(at::mm(probs, embed_chunk));
    } else {
      // Without bf16/fp16 instructions ATen's half GEMM runs a slow generic path (measured on
      // an AVX2 EPYC: ~0.3-0.5 GFLOP/s against ~20 for float32 BLAS), so slices of the chunk
      // are widened to float32: the probabilities are still rounded to the half type first,
      // and the product is then exact float32, as on CUDA. Slices bound the widened copy.
      const int64_t rows_per_slice = std::max<int64_t>(
          64, kWidenBudgetElements / std::max<int64_t>(embed_chunk.size(1), 1));
      for (int64_t row0 = 0; row0 < embed_chunk.size(0); row0 += rows_per_slice) {
        const int64_t width = std::min(rows_per_slice, embed_chunk.size(0) - row0);
        acc.addmm_(probs.narrow(1, row0, width).to(at::kFloat),
                   embed_chunk.narrow(0, row0, width).to(at::kFloat));
      }
    }
  }

  // float32 values per widened slice of the embedding table (4 MiB)
  static constexpr int64_t kWidenBudgetElements = int64_t{1} << 20;

  // Whether this CPU has instructions that make ATen's half GEMM faster than float32 BLAS.
  static bool has_native_gemm(at::ScalarType dtype) {
    static const auto capabilities = at::cpu::get_cpu_capabilities();
    auto has = [](const char* name) {
      const auto found = capabilities.find(name);
      return found != capabilities.end() && found->second.isBool() && found->second.toBool();
    };
    return dtype == at::kBFloat16 ? has("avx512_bf16") || has("amx_bf16") : has("amx_fp16");
  }

  // the CPU always checks its rows first, so `unchecked_status` is always null here
  static void mix(const at::Tensor& acc, const at::Tensor& alpha, const at::Tensor& mask,
                  const at::Tensor* /*unchecked_status*/, at::Tensor& out) {
    RCD_DISPATCH_FLOAT(out.scalar_type(), T, [&] { mix_typed<T>(acc, alpha, mask, out); });
  }
};

std::tuple<at::Tensor, at::Tensor> residual_context_cpu(const at::Tensor& logits,
                                                       const at::Tensor& embed_weight,
                                                       const at::Tensor& mask_embed,
                                                       double t_res, bool temper_delta,
                                                       c10::string_view strategy,
                                                       double alpha_scale) {
  return residual_context_driver<CpuKernels>(logits, embed_weight, mask_embed, t_res,
                                             temper_delta, std::string(strategy), alpha_scale);
}

}  // namespace

TORCH_LIBRARY(rcd_ext, m) {
  m.def(
      "residual_context(Tensor logits, Tensor embed_weight, Tensor mask_embed, float t_res, "
      "bool temper_delta, str strategy, float alpha_scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rcd_ext, CPU, m) { m.impl("residual_context", &residual_context_cpu); }

}  // namespace rcd_ext
