// CPU implementation of rcd_ext::residual_context_top_k (the sparse residual), and its schema.
//
// Phase 1, one pass over each row's logits (at::parallel_for over rows): per float tile, the
// tile's maximum and bad-value counts, the exp sums for alpha's entropy and for p with the
// online-softmax rescaling when the running maximum rises, and the top-k candidates
// (cpu/top_k_select.h). Bad rows are then reported, before any table read.
// Phase 2: per row, p at the k chosen columns, the k embedding rows read once (head and their
// plain sum, for the tail's mean), the tail from the passed table sum, and the mix.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/gather_rows.h"
#include "cpu/row_kernels.h"
#include "cpu/top_k_select.h"
#include "residual_context.h"
#include "residual_context_top_k.h"

namespace rcd_ext {
namespace {

using cpu::kTile;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// sum e^y and sum e^y y with y = (x - m) k, kept relative to a running maximum m.
struct OnlineExpSums {
  double s = 0.0;
  double u = 0.0;

  // Re-expresses the sums relative to new_m > old_m: y' = y + d, e' = e^d e, d = (old_m - new_m) k.
  void rescale(float old_m, float new_m, float k) {
    if (s == 0.0) return;  // nothing summed yet (old_m may be -inf)
    const double d = (static_cast<double>(old_m) - static_cast<double>(new_m)) * k;
    const double c = std::exp(d);
    u = c * (u + s * d);
    s = c * s;
  }
};

struct RowResult {
  int32_t status;
  float max;
  double log_norm;  // log sum e^((z - max) k_p): p's normaliser
  float alpha;
};

// The single pass over one row: statistics and the top k (left in `selector`).
template <typename T>
RowResult scan_row(const T* row, int64_t vocab, const ResidualParams& params,
                   cpu::TopKSelector& selector, float* scratch) {
  const float prob_k = params.temper_delta ? params.inv_t_res : 1.0f;
  const bool need_entropy = strategy_uses_entropy(strategy_code(params.strategy));
  const float entropy_k = need_entropy ? params.inv_t_res : prob_k;
  // one set of sums serves both when the entropy and p share a temperature
  const bool shared_sums = entropy_k == prob_k;
  OnlineExpSums ent, prob;
  float m = kNegInf;
  bool posinf = false;
  selector.reset();
  for (int64_t start = 0; start < vocab; start += kTile) {
    const int64_t n = std::min(kTile, vocab - start);
    const float* x;
    if constexpr (std::is_same_v<T, float>) {
      x = row + start;
    } else {
      for (int64_t i = 0; i < n; ++i) scratch[i] = static_cast<float>(row[start + i]);
      x = scratch;
    }
    const cpu::TileMax t = cpu::tile_max(x, n);
    if (t.nan_count) return {kRowNaN, 0.0f, 0.0, 0.0f};  // NaN outranks +inf anywhere in the row
    posinf = posinf || t.posinf_count;
    if (posinf) continue;  // only a later NaN can still change the verdict
    if (t.max > m) {
      ent.rescale(m, t.max, entropy_k);
      if (!shared_sums) prob.rescale(m, t.max, prob_k);
      m = t.max;
    }
    selector.offer(x, n, start, t.max);
    if (m == kNegInf) continue;  // every e^y so far is 0
    double u_unused = 0.0;
    cpu::tile_exp_sums(x, n, m, entropy_k, &ent.s, &ent.u);
    if (!shared_sums) cpu::tile_exp_sums(x, n, m, prob_k, &prob.s, &u_unused);
  }
  if (posinf) return {kRowPosInf, 0.0f, 0.0, 0.0f};
  if (m == kNegInf) return {kRowNoFiniteLogit, 0.0f, 0.0, 0.0f};
  const double s_prob = shared_sums ? ent.s : prob.s;
  const double entropy = std::log(ent.s) - ent.u / ent.s;
  return {kRowOk, m, std::log(s_prob), alpha_from_entropy(entropy, params)};
}

template <typename T>
void select_rows_typed(const at::Tensor& logits, const ResidualParams& params, int64_t k,
                       at::Tensor& columns, at::Tensor& probs, at::Tensor& alpha,
                       at::Tensor& status) {
  const int64_t rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  const T* base = logits.data_ptr<T>();
  const int64_t row_stride = logits.stride(0);
  int64_t* columns_out = columns.data_ptr<int64_t>();
  float* probs_out = probs.data_ptr<float>();
  float* alpha_out = alpha.data_ptr<float>();
  int32_t* status_out = status.data_ptr<int32_t>();
  const float prob_k = params.temper_delta ? params.inv_t_res : 1.0f;

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float scratch[kTile];
    cpu::TopKSelector selector(k);
    for (int64_t r = begin; r < end; ++r) {
      const T* row = base + r * row_stride;
      const RowResult result = scan_row(row, vocab, params, selector, scratch);
      status_out[r] = result.status;
      alpha_out[r] = result.alpha;
      if (result.status != kRowOk) continue;
      const std::vector<cpu::Candidate>& top = selector.finish();
      for (int64_t j = 0; j < k; ++j) {
        // p_j from the row's own logit (exact in its dtype), in double: k exps only
        const double y = (static_cast<double>(static_cast<float>(row[top[j].column])) -
                          result.max) * prob_k - result.log_norm;
        columns_out[r * k + j] = top[j].column;
        probs_out[r * k + j] = static_cast<float>(std::exp(y));
      }
    }
  });
}

template <typename E>
void gather_mix_typed(const at::Tensor& embed_weight, const at::Tensor& mask_embed,
                      const at::Tensor& table_sum, int64_t vocab, const at::Tensor& columns,
                      const at::Tensor& probs, const at::Tensor& alpha, at::Tensor& out) {
  const int64_t rows = columns.size(0);
  const int64_t k = columns.size(1);
  const int64_t dim = embed_weight.size(1);
  const E* table = embed_weight.data_ptr<E>();
  const int64_t table_stride = embed_weight.stride(0);
  const E* mask = mask_embed.data_ptr<E>();
  const float* sum = table_sum.data_ptr<float>();
  const int64_t* cols = columns.data_ptr<int64_t>();
  const float* p = probs.data_ptr<float>();
  const float* a = alpha.data_ptr<float>();
  E* o = out.data_ptr<E>();
  const float inv_tail_rows = static_cast<float>(1.0 / static_cast<double>(vocab - k));

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> head(dim), picked(dim), converted(std::is_same_v<E, float> ? 0 : dim);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(head.begin(), head.end(), 0.0f);
      std::fill(picked.begin(), picked.end(), 0.0f);
      double p_head = 0.0;
      for (int64_t j = 0; j < k; ++j) {
        const float w = p[r * k + j];
        p_head += w;
        const E* e = table + cols[r * k + j] * table_stride;
        const float* ef;
        if constexpr (std::is_same_v<E, float>) {
          ef = e;
        } else {
          for (int64_t d = 0; d < dim; ++d) converted[d] = static_cast<float>(e[d]);
          ef = converted.data();
        }
        cpu::accumulate_weighted_row(ef, dim, w, head.data(), picked.data());
      }
      const float tail_mass = static_cast<float>(std::max(0.0, 1.0 - p_head));
      const float ar = a[r];
      for (int64_t d = 0; d < dim; ++d) {
        const float tail_mean = (sum[d] - picked[d]) * inv_tail_rows;
        const float delta = head[d] + tail_mass * tail_mean;
        o[r * dim + d] = static_cast<E>((1.0f - ar) * static_cast<float>(mask[d]) + ar * delta);
      }
    }
  });
}

#define RCD_TOP_K_DISPATCH_FLOAT(dtype, NAME, ...)                                 \
  [&] {                                                                            \
    switch (dtype) {                                                               \
      case at::kFloat: { using NAME = float; return __VA_ARGS__(); }               \
      case at::kBFloat16: { using NAME = c10::BFloat16; return __VA_ARGS__(); }    \
      case at::kHalf: { using NAME = c10::Half; return __VA_ARGS__(); }            \
      default: TORCH_CHECK_TYPE(false, "unsupported dtype ", dtype);               \
    }                                                                              \
  }()

std::tuple<at::Tensor, at::Tensor> residual_context_top_k_cpu(
    const at::Tensor& logits_in, const at::Tensor& embed_weight_in, const at::Tensor& mask_embed,
    const at::Tensor& table_sum, double t_res, bool temper_delta, c10::string_view strategy,
    double alpha_scale, int64_t k) {
  const ResidualParams params =
      check_and_make_params(logits_in, embed_weight_in, mask_embed, t_res, temper_delta,
                            std::string(strategy), alpha_scale);
  check_top_k_args(logits_in, embed_weight_in, table_sum, k);
  const int64_t rows = logits_in.size(0);
  const int64_t vocab = logits_in.size(1);
  const auto f32 = logits_in.options().dtype(at::kFloat);
  at::Tensor out = at::empty({rows, embed_weight_in.size(1)}, embed_weight_in.options());
  at::Tensor alpha = at::empty({rows}, f32);
  if (rows == 0) return {out, alpha};

  // rows read in place with their stride: the logits[:, :V] slice is not copied
  const bool rows_in_place = logits_in.stride(1) == 1 && logits_in.stride(0) >= vocab;
  const at::Tensor logits = rows_in_place ? logits_in : logits_in.contiguous();
  const at::Tensor embed_weight =
      embed_weight_in.stride(1) == 1 ? embed_weight_in : embed_weight_in.contiguous();
  at::Tensor columns = at::empty({rows, k}, f32.dtype(at::kLong));
  at::Tensor probs = at::empty({rows, k}, f32);
  at::Tensor status = at::empty({rows}, f32.dtype(at::kInt));
  RCD_TOP_K_DISPATCH_FLOAT(logits.scalar_type(), T, [&] {
    select_rows_typed<T>(logits, params, k, columns, probs, alpha, status);
  });
  raise_for_row_status(status);
  RCD_TOP_K_DISPATCH_FLOAT(embed_weight.scalar_type(), E, [&] {
    gather_mix_typed<E>(embed_weight, mask_embed.contiguous(), table_sum.contiguous(), vocab,
                        columns, probs, alpha, out);
  });
  return {out, alpha};
}

}  // namespace

// The schema lives here, in a fragment: TORCH_LIBRARY(rcd_ext, ...) is residual_context_cpu.cpp's
// and a second one for the namespace would abort the process at load.
TORCH_LIBRARY_FRAGMENT(rcd_ext, m) {
  m.def(
      "residual_context_top_k(Tensor logits, Tensor embed_weight, Tensor mask_embed, "
      "Tensor table_sum, float t_res, bool temper_delta, str strategy, float alpha_scale, "
      "int k) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rcd_ext, CPU, m) {
  m.impl("residual_context_top_k", &residual_context_top_k_cpu);
}

}  // namespace rcd_ext
