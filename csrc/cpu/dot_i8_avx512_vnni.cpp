// AVX-512 VNNI int8 dot product. Compiled with -mavx512f -mavx512bw -mavx512vl
// -mavx512vnni; see dot_i8.h for the rules this translation unit follows.
#include <immintrin.h>

#include "cpu/dot_i8.h"

namespace diffboost::cpu {
namespace {

std::int64_t sum_lanes(__m512i v) {
  // Lanes fit in int32, their sum may not: add them in int64.
  alignas(64) std::int32_t lanes[16];
  _mm512_store_si512(lanes, v);
  std::int64_t sum = 0;
  for (std::int32_t lane : lanes) sum += lane;
  return sum;
}

}  // namespace

std::int64_t dot_i8_avx512_vnni(const std::int8_t* a, const std::int8_t* b, std::size_t n) {
  // vpdpbusd multiplies *unsigned* bytes by signed bytes. Flipping the sign bit
  // of a maps it to the unsigned value a + 128, so
  //   sum((a + 128) * b) - 128 * sum(b) = sum(a * b),
  // the same compensation term the int8/int4 GEMMs use; 128 * sum(b) is itself
  // a vpdpbusd of a vector of 128s with b.
  const __m512i k128 = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i biased = _mm512_setzero_si512();
  __m512i compensation = _mm512_setzero_si512();
  for (std::size_t i = 0; i < n; i += 64) {
    // Masked loads (AVX-512BW) read the tail without touching memory past n;
    // masked-off bytes are 0 in both vectors, so they add nothing.
    const std::size_t remaining = n - i;
    const __mmask64 mask = remaining >= 64 ? ~__mmask64{0} : (__mmask64{1} << remaining) - 1;
    const __m512i va = _mm512_maskz_loadu_epi8(mask, a + i);
    const __m512i vb = _mm512_maskz_loadu_epi8(mask, b + i);
    biased = _mm512_dpbusd_epi32(biased, _mm512_xor_si512(va, k128), vb);
    compensation = _mm512_dpbusd_epi32(compensation, k128, vb);
  }
  return sum_lanes(biased) - sum_lanes(compensation);
}

}  // namespace diffboost::cpu
