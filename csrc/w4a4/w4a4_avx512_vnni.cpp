// W4A4 CPU kernels, AVX-512 VNNI level (compiled with -mavx512f -mavx512bw
// -mavx512vl -mavx512vnni -mfma). The kernels are in w4a4_x86.inc; this file
// supplies the chunk dot products with vpdpbusd on 256-bit registers
// (AVX512VL), which multiplies u8 x s8 and accumulates into int32 in one
// instruction, replacing AVX2's vpmaddubsw + vpmaddwd pair.
#include <immintrin.h>

#include "w4a4/w4a4_kernels.h"

namespace diffboost::cpu::w4a4 {
namespace {

inline __m256i dot_chunk64(__m256i w_lo, __m256i w_hi, const int8_t* a) {
  const __m256i even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  const __m256i odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32));
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w_lo, even), w_hi, odd);
}

inline __m256i dot_chunk32(__m256i w, const int8_t* a) {
  const __m256i act = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, act);
}

#include "w4a4/w4a4_x86.inc"

}  // namespace

void quantize_rows_avx512_vnni(const QuantizeArgs& args, int64_t m0, int64_t m1, float* scratch) {
  quantize_rows_impl(args, m0, m1, scratch);
}

void gemm_tile_avx512_vnni(const GemmArgs& args, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                           GemmWorkspace* ws, bool unpack) {
  gemm_tile_impl(args, m0, m1, n0, n1, ws, unpack);
}

}  // namespace diffboost::cpu::w4a4
