// W4A4 CPU kernels, AVX2 level (compiled with -mavx2 -mfma). The kernels are
// in w4a4_x86.inc; this file supplies the chunk dot products: vpmaddubsw
// (u8 x s8 -> pairs summed into int16; no saturation, since the pair sums stay
// within 2 * 15 * 8) then vpmaddwd with ones (-> int32).
#include <immintrin.h>

#include "w4a4/w4a4_kernels.h"

namespace diffboost::cpu::w4a4 {
namespace {

inline __m256i dot_chunk64(__m256i w_lo, __m256i w_hi, const int8_t* a) {
  const __m256i even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  const __m256i odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32));
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(w_lo, even), _mm256_maddubs_epi16(w_hi, odd));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

inline __m256i dot_chunk32(__m256i w, const int8_t* a) {
  const __m256i act = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, act), _mm256_set1_epi16(1));
}

#include "w4a4/w4a4_x86.inc"

}  // namespace

void quantize_rows_avx2(const QuantizeArgs& args, int64_t m0, int64_t m1, float* scratch) {
  quantize_rows_impl(args, m0, m1, scratch);
}

void gemm_tile_avx2(const GemmArgs& args, int64_t m0, int64_t m1, int64_t n0, int64_t n1, GemmWorkspace* ws,
                    bool unpack) {
  gemm_tile_impl(args, m0, m1, n0, n1, ws, unpack);
}

}  // namespace diffboost::cpu::w4a4
