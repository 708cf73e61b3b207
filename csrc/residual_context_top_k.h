// The sparse (top-k) residual op, device-independent part: its extra argument checks.
//
// Math (plain-torch specification: rcd_ext/op_reference.py, residual_context_top_k_reference):
//   alpha   exactly as the exact op (full-vocabulary entropy)
//   S       the k columns of the largest logits (ties: the lower column first)
//   delta   sum_{j in S} p_j E_j + (1 - sum_{j in S} p_j) * (table_sum - sum_{j in S} E_j) / (V - k)
//   embeds  (1 - alpha) * mask_embed + alpha * delta
// with p the exact full-vocabulary probabilities and table_sum = sum of E[:V]'s rows (float32,
// computed once per table by the caller and passed in).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace rcd_ext {

// k and table_sum, after check_and_make_params has checked the other arguments.
inline void check_top_k_args(const at::Tensor& logits, const at::Tensor& embed_weight,
                             const at::Tensor& table_sum, int64_t k) {
  const int64_t vocab = logits.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k < vocab, "residual_top_k must be in [1, V) = [1, ", vocab,
                    ") for the sparse op (k >= V is the exact op), got ", k);
  TORCH_CHECK_VALUE(table_sum.dim() == 1 && table_sum.size(0) == embed_weight.size(1),
                    "table_sum must be [D] with D = embed_weight.shape[1] = ",
                    embed_weight.size(1), ", got ", table_sum.sizes());
  TORCH_CHECK_TYPE(table_sum.scalar_type() == at::kFloat, "table_sum dtype ",
                   table_sum.scalar_type(), " must be float32");
  TORCH_CHECK_VALUE(table_sum.device() == logits.device(), "table_sum on ", table_sum.device(),
                    " must be on the logits' device ", logits.device());
}

}  // namespace rcd_ext
