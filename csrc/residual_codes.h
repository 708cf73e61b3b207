// Codes shared by every kernel of the residual-context op, host and device alike (no torch
// here: the CUDA kernels include it too, so there is one definition, not a copy per device).
//
// Alpha strategies: the Python registry (rcd_ext/alpha_strategies.py) is the list of strategies;
// `kernel_code` there is the Strategy value below for the strategies these kernels fuse
// (tests/test_registries.py compares the two). To fuse a strategy registered in Python: add its
// enumerator, count it in kStrategyCount, give it a case in `alpha_from_normalized` (and in
// `strategy_uses_entropy` if it ignores the entropy), name it in `parse_strategy`
// (residual_context.h), then set its kernel_code.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define RCD_HOST_DEVICE __host__ __device__
#else
#define RCD_HOST_DEVICE
#endif

namespace rcd_ext {

enum class Strategy : int32_t { kEntropy = 0, kConfidence = 1, kFixed = 2 };
constexpr int32_t kStrategyCount = 3;

// Per-row verdict of the statistics pass. Rows that are not kRowOk abort the op with an error
// naming the row: there is no defined residual for them.
enum RowStatus : int32_t { kRowOk = 0, kRowNaN = 1, kRowPosInf = 2, kRowNoFiniteLogit = 3 };

RCD_HOST_DEVICE inline bool is_strategy_code(int32_t code) {
  return 0 <= code && code < kStrategyCount;
}

// Whether alpha reads the entropy (the kernels skip the tempered sums when it does not).
RCD_HOST_DEVICE inline bool strategy_uses_entropy(int32_t code) {
  return code != static_cast<int32_t>(Strategy::kFixed);
}

// alpha from the normalized entropy H / log V in [0, 1]. T is double on the CPU, float on the
// GPU. An unknown code gives NaN (the glue refuses unknown codes before any launch).
template <class T>
RCD_HOST_DEVICE inline T alpha_from_normalized(int32_t code, T normalized, T alpha_scale) {
  switch (static_cast<Strategy>(code)) {
    case Strategy::kEntropy:
      return alpha_scale * normalized;
    case Strategy::kConfidence:
      return alpha_scale * (T(1) - normalized);
    case Strategy::kFixed:
      return alpha_scale;
  }
  return static_cast<T>(NAN);
}

}  // namespace rcd_ext
