// exp(x) for float written so that compilers vectorise loops over it (no calls, no branches).
//
// std::exp in a loop stays scalar, and over 64 rows x 152k logits the statistics pass would then
// cost as much as the GEMM it feeds. Cephes-style: x = n ln2 + r with |r| <= ln2 / 2, a degree-6
// polynomial for e^r, and 2^n assembled in the exponent bits. Relative error about 2 ulp;
// results below the smallest normal float (x < -87.3, including -inf) are exactly 0.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define RCD_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define RCD_ALWAYS_INLINE inline
#endif

namespace rcd_ext::cpu {

template <typename To, typename From>
RCD_ALWAYS_INLINE To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  std::memcpy(&to, &from, sizeof(to));
  return to;
}

// Inlined by force: a call inside the loop would stop vectorisation.
RCD_ALWAYS_INLINE float vector_exp(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kLowest = -87.33654f;
  constexpr float kHighest = 88.0f;  // keeps n <= 127, so 2^n stays finite

  const float underflow = x < kLowest ? 0.0f : 1.0f;
  float xc = x < kLowest ? kLowest : x;
  xc = xc > kHighest ? kHighest : xc;

  const float shifted = xc * kLog2e + kRoundMagic;
  const float n = shifted - kRoundMagic;
  const int32_t n_int = bit_cast<int32_t>(shifted) - 0x4B400000;  // the integer n, from the magic number's mantissa

  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = p * r * r + r + 1.0f;

  const int32_t scale_bits = (n_int + 127) << 23;
  const float scale = bit_cast<float>(scale_bits);
  return e_r * scale * underflow;
}

}  // namespace rcd_ext::cpu
