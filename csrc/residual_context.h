// The residual-context op, device-independent part: argument checks, the chunking policy and
// the driver that strings the per-device kernels together.
//
// Math (see rcd_ext/op_reference.py for the plain-torch specification):
//   row statistics  m = max z,  log s = log sum e^(z-m)  (and the tempered pair for z / t_res),
//                   H = entropy of softmax(z / t_res),  alpha from H by the strategy
//   residual        delta = softmax(z) @ E[:V]   computed as sum over V-chunks of p_chunk @ E_chunk
//   output          (1 - alpha) * mask_embed + alpha * delta
// The probabilities are only ever formed one V-chunk at a time (bounded memory whatever V is),
// and every product accumulates in float32.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

#include "residual_codes.h"

namespace rcd_ext {

struct ResidualParams {
  float inv_t_res;     // 1 / t_res, for alpha (and delta when temper_delta)
  bool temper_delta;   // delta from softmax(z / t_res) instead of softmax(z)
  Strategy strategy;
  float alpha_scale;
  float log_vocab;     // log V: the entropy normaliser
};

inline Strategy parse_strategy(const std::string& name) {
  if (name == "entropy") return Strategy::kEntropy;
  if (name == "confidence") return Strategy::kConfidence;
  if (name == "fixed") return Strategy::kFixed;
  TORCH_CHECK_VALUE(false, "strategy '", name, "' has no fused kernel (kernels: 'entropy', "
                    "'confidence', 'fixed'; strategies registered only in Python run through "
                    "rcd_ext.op_reference)");
}

// The Strategy value the kernels are launched with, checked: no unknown code reaches a kernel.
inline int32_t strategy_code(Strategy strategy) {
  const int32_t code = static_cast<int32_t>(strategy);
  TORCH_CHECK(is_strategy_code(code), "internal error: unknown alpha strategy code ", code);
  return code;
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline ResidualParams check_and_make_params(const at::Tensor& logits,
                                            const at::Tensor& embed_weight,
                                            const at::Tensor& mask_embed, double t_res,
                                            bool temper_delta, const std::string& strategy,
                                            double alpha_scale) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK_VALUE(embed_weight.dim() == 2, "embed_weight must be [V', D], got ",
                    embed_weight.sizes());
  TORCH_CHECK_VALUE(mask_embed.dim() == 1 && mask_embed.size(0) == embed_weight.size(1),
                    "mask_embed must be [D] with D = embed_weight.shape[1] = ",
                    embed_weight.size(1), ", got ", mask_embed.sizes());
  TORCH_CHECK_TYPE(is_supported_float(logits.scalar_type()), "logits dtype ",
                   logits.scalar_type(), " is not one of float32, bfloat16, float16");
  TORCH_CHECK_TYPE(is_supported_float(embed_weight.scalar_type()), "embed_weight dtype ",
                   embed_weight.scalar_type(), " is not one of float32, bfloat16, float16");
  TORCH_CHECK_TYPE(mask_embed.scalar_type() == embed_weight.scalar_type(), "mask_embed dtype ",
                   mask_embed.scalar_type(), " != embed_weight dtype ",
                   embed_weight.scalar_type());
  TORCH_CHECK_VALUE(logits.device() == embed_weight.device() &&
                        logits.device() == mask_embed.device(),
                    "all inputs must be on one device, got logits on ", logits.device(),
                    ", embed_weight on ", embed_weight.device(), ", mask_embed on ",
                    mask_embed.device());
  const int64_t vocab = logits.size(1);
  TORCH_CHECK_VALUE(vocab >= 2, "logits need at least 2 vocabulary columns, got V=", vocab);
  TORCH_CHECK_VALUE(vocab <= embed_weight.size(0), "logits have V=", vocab,
                    " columns but embed_weight has only ", embed_weight.size(0),
                    " rows: every logit column needs an embedding row");
  // The kernels multiply by 1 / t_res in float32: it must be finite there, not only in double.
  TORCH_CHECK_VALUE(t_res > 0 && std::isfinite(t_res) &&
                        std::isfinite(static_cast<float>(1.0 / t_res)),
                    "t_res must be a finite number >= 2.94e-39 (1 / t_res must be a finite "
                    "float32), got ", t_res);
  TORCH_CHECK_VALUE(alpha_scale >= 0 && alpha_scale <= 1, "alpha_scale must be in [0, 1], got ",
                    alpha_scale);
  return ResidualParams{static_cast<float>(1.0 / t_res), temper_delta, parse_strategy(strategy),
                        static_cast<float>(alpha_scale),
                        static_cast<float>(std::log(static_cast<double>(vocab)))};
}

// alpha from a row's entropy by the strategy (residual_codes.h; the CUDA kernels call the same)
inline float alpha_from_entropy(double entropy, const ResidualParams& p) {
  const double log_vocab = static_cast<double>(p.log_vocab);
  const double normalized = std::clamp(entropy, 0.0, log_vocab) / log_vocab;
  return static_cast<float>(alpha_from_normalized<double>(strategy_code(p.strategy), normalized,
                                                          p.alpha_scale));
}

// Raises the error for the first row whose status is not kRowOk. `status` is int32 on the CPU.
inline void raise_for_row_status(const at::Tensor& status_cpu) {
  const int32_t* s = status_cpu.data_ptr<int32_t>();
  for (int64_t row = 0; row < status_cpu.numel(); ++row) {
    switch (s[row]) {
      case kRowOk:
        break;
      case kRowNaN:
        TORCH_CHECK_VALUE(false, "logits row ", row, " contains NaN");
      case kRowPosInf:
        TORCH_CHECK_VALUE(false, "logits row ", row, " contains +inf");
      case kRowNoFiniteLogit:
        TORCH_CHECK_VALUE(false, "logits row ", row,
                          " has no finite logit (every entry is -inf)");
      default:
        TORCH_CHECK(false, "internal error: unknown row status ", s[row], " at row ", row);
    }
  }
}

// Columns per V-chunk: the chunk of probabilities holds about `budget_elements` values whatever
// N and V are, rounded to a multiple of 256 (GEMM-friendly) and never below 256.
inline int64_t chunk_columns(int64_t rows, int64_t vocab, int64_t budget_elements) {
  int64_t cols = budget_elements / std::max<int64_t>(rows, 1);
  cols = std::max<int64_t>(256, (cols / 256) * 256);
  return std::min(cols, vocab);
}

// Kernels provides, for one device:
//   static constexpr int64_t kChunkBudgetElements;
//   static void row_statistics(logits, params, row_max, row_log_norm, alpha, status);
//   static bool check_rows(status);     raises for the first bad row; false where it cannot look
//                                       (CUDA graph capture): mix then turns bad rows into NaN
//   static void chunk_probabilities(logits, row_max, row_log_norm, params, col0, probs);
//   static void accumulate(acc, probs, embed_chunk);          acc += probs @ embed_chunk (fp32)
//   static void mix(acc, alpha, mask_embed, unchecked_status, out);   out = (1-a) m + a acc
// Logits are read with their row stride (unit column stride required): the logits[:, :V] slice
// of a model whose head is wider than its vocabulary is not copied.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor> residual_context_driver(const at::Tensor& logits_in,
                                                          const at::Tensor& embed_weight,
                                                          const at::Tensor& mask_embed,
                                                          double t_res, bool temper_delta,
                                                          const std::string& strategy,
                                                          double alpha_scale) {
  const ResidualParams params = check_and_make_params(logits_in, embed_weight, mask_embed, t_res,
                                                      temper_delta, strategy, alpha_scale);
  const int64_t rows = logits_in.size(0);
  const int64_t vocab = logits_in.size(1);
  const int64_t dim = embed_weight.size(1);
  const auto f32 = logits_in.options().dtype(at::kFloat);
  at::Tensor out = at::empty({rows, dim}, embed_weight.options());
  at::Tensor alpha = at::empty({rows}, f32);
  if (rows == 0) return {out, alpha};

  const bool rows_in_place = logits_in.stride(1) == 1 && logits_in.stride(0) >= vocab;
  const at::Tensor logits = rows_in_place ? logits_in : logits_in.contiguous();
  const at::Tensor mask = mask_embed.contiguous();
  at::Tensor row_max = at::empty({rows}, f32);
  at::Tensor row_log_norm = at::empty({rows}, f32);
  at::Tensor status = at::empty({rows}, f32.dtype(at::kInt));
  Kernels::row_statistics(logits, params, row_max, row_log_norm, alpha, status);
  const bool rows_checked = Kernels::check_rows(status);

  at::Tensor acc = at::zeros({rows, dim}, f32);
  const int64_t cols = chunk_columns(rows, vocab, Kernels::kChunkBudgetElements);
  at::Tensor probs_buffer = at::empty({rows, cols}, embed_weight.options());
  for (int64_t col0 = 0; col0 < vocab; col0 += cols) {
    const int64_t width = std::min(cols, vocab - col0);
    at::Tensor probs = probs_buffer.narrow(1, 0, width);
    Kernels::chunk_probabilities(logits, row_max, row_log_norm, params, col0, probs);
    Kernels::accumulate(acc, probs, embed_weight.narrow(0, col0, width));
  }
  Kernels::mix(acc, alpha, mask, rows_checked ? nullptr : &status, out);
  return {out, alpha};
}

}  // namespace rcd_ext
