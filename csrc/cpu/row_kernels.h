// CPU kernels of the residual-context op over float tiles, torch-free.
//
// Rows are processed in tiles of kTile floats (converted from bf16/fp16 first) so the loops are
// plain float loops that the compiler vectorises: `omp simd` reductions (-fopenmp-simd, no
// OpenMP runtime) and, on x86-64 with GCC, function clones for AVX2 and AVX-512 picked at load
// time, so one build runs well on any x86-64 machine.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/vector_exp.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RCD_VECTOR_CLONES \
  __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define RCD_VECTOR_CLONES
#endif

namespace rcd_ext::cpu {

constexpr int64_t kTile = 4096;
// Below this, e^y underflows to 0 anyway; clamping keeps 0 * y from becoming 0 * -inf = NaN.
constexpr float kLowestExponent = -104.0f;

struct TileMax {
  float max;
  int64_t nan_count;
  int64_t posinf_count;
};

RCD_VECTOR_CLONES inline TileMax tile_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t nans = 0;
  int64_t posinfs = 0;
  const float inf = std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m) reduction(+ : nans, posinfs)
  for (int64_t i = 0; i < n; ++i) {
    m = x[i] > m ? x[i] : m;
    nans += x[i] != x[i];
    posinfs += x[i] == inf;
  }
  return {m, nans, posinfs};
}

// s += sum e^y and u += sum e^y * y over the tile, with y = (x - m) * k (k = 1 / temperature).
RCD_VECTOR_CLONES inline void tile_exp_sums(const float* x, int64_t n, float m, float k,
                                            double* s_out, double* u_out) {
  float s = 0.0f;
  float u = 0.0f;
#pragma omp simd reduction(+ : s, u)
  for (int64_t i = 0; i < n; ++i) {
    float y = (x[i] - m) * k;
    y = y < kLowestExponent ? kLowestExponent : y;
    const float e = vector_exp(y);
    s += e;
    u += e * y;
  }
  *s_out += s;
  *u_out += u;
}

// out = exp((x - m) * k - log_norm): one tile of one row's probabilities.
RCD_VECTOR_CLONES inline void tile_probabilities(const float* x, int64_t n, float m, float k,
                                                 float log_norm, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float y = (x[i] - m) * k - log_norm;
    y = y < kLowestExponent ? kLowestExponent : y;
    out[i] = vector_exp(y);
  }
}

}  // namespace rcd_ext::cpu
