// AVX2 int8 dot product. Compiled with -mavx2 -mfma; see dot_i8.h for the
// rules this translation unit follows.
#include <immintrin.h>

#include "cpu/dot_i8.h"

namespace diffboost::cpu {

std::int64_t dot_i8_avx2(const std::int8_t* a, const std::int8_t* b, std::size_t n) {
  // AVX2 has no signed x signed byte multiply-add (vpmaddubsw is unsigned x
  // signed and saturates), so sign-extend 16 bytes to int16 and use vpmaddwd,
  // which multiplies int16 pairs and adds adjacent products into int32 lanes.
  __m256i acc = _mm256_setzero_si256();
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i va = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i)));
    const __m256i vb = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i)));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(va, vb));
  }

  // Each lane fits in int32; their sum may not, so add the lanes in int64.
  alignas(32) std::int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
  std::int64_t sum = 0;
  for (std::int32_t lane : lanes) sum += lane;

  for (; i < n; ++i) sum += std::int32_t{a[i]} * std::int32_t{b[i]};
  return sum;
}

}  // namespace diffboost::cpu
