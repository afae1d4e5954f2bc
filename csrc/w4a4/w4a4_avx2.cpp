// W4A4 CPU kernels, AVX2 level (compiled with -mavx2 -mfma). The kernels are
// in w4a4_x86.inc; this file supplies the dot step: vpmaddubsw (u8 x s8,
// adjacent products summed into int16; no saturation since |pair| <= 240)
// accumulated in int16, widened once per group with vpmaddwd against ones.
#include <immintrin.h>

#include "w4a4/w4a4_kernels.h"

namespace diffboost::cpu::w4a4 {
namespace {

// 3 rows x 2 column vectors: 6 accumulators + 4 weight vectors + 2 broadcasts fit the 16 ymm registers.
constexpr int kMR = 3;
constexpr int kNR = 2;

inline __m256i dot_step(__m256i acc, __m256i w, __m256i a) {
  return _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, a));
}

inline __m256i group_sums(__m256i acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }

#include "w4a4/w4a4_x86.inc"

}  // namespace

void quantize_rows_avx2(const QuantizeArgs& args, int64_t m0, int64_t m1, float* scratch) {
  quantize_rows_impl(args, m0, m1, scratch);
}

void gemm_tile_avx2(const GemmArgs& args, int64_t m0, int64_t m1, int64_t n0, int64_t n1, GemmWorkspace* ws,
                    bool new_rows, bool new_columns) {
  gemm_tile_impl(args, m0, m1, n0, n1, ws, new_rows, new_columns);
}

}  // namespace diffboost::cpu::w4a4
