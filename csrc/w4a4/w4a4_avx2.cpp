// W4A4 CPU kernels, AVX2 level (compiled with -mavx2 -mfma). The kernels are
// in w4a4_x86.inc; this file supplies the dot step: vpmaddubsw (u8 x s8,
// adjacent products summed into int16; no saturation since |pair| <= 240)
// accumulated in int16, widened once per group with vpmaddwd against ones.
// vpmaddubsw and vpaddw are the whole inner loop (2 ALU ops per 32
// multiply-adds, the AVX2 bound), hence the 6 x 2 block that gives the
// most reuse of the weight loads and broadcasts in 16 registers.
#include <immintrin.h>

#include "w4a4/w4a4_kernels.h"

namespace diffboost::cpu::w4a4 {
namespace {

// 6 rows x 2 column vectors: 12 accumulators + 2 weight vectors + 1 broadcast of the 16 ymm registers.
constexpr int kMR = 6;
constexpr int kNR = 2;

// The add is written as an in-place asm statement: with the plain intrinsic
// GCC 12 adds into a fresh register and copies it back to the accumulator
// (or spills), a third of the loop's instructions.
inline __m256i dot_step(__m256i acc, __m256i w, __m256i a) {
  const __m256i products = _mm256_maddubs_epi16(w, a);
  asm("vpaddw %1, %0, %0" : "+x"(acc) : "x"(products));
  return acc;
}

// Each 32-bit lane holds two int16 partial sums; the start value goes in the
// low one. |start| <= 8 * 8 G and each partial adds G / 4 pairs of |value| <=
// 2 * 15 * 8, so a lane stays within 8 * 8 * 128 + 240 * 32 = 15872 < 32767.
inline int32_t acc_start(int32_t start) { return static_cast<int32_t>(static_cast<uint16_t>(start)); }

inline __m256i group_sums(__m256i acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }

#include "w4a4/w4a4_x86.inc"

}  // namespace

void quantize_rows_avx2(const QuantizeArgs& args, int64_t m0, int64_t m1, float* scratch) {
  quantize_rows_impl(args, m0, m1, scratch);
}

void prepare_rows_avx2(const GemmArgs& args, int64_t m0, int64_t m1, const GemmRows& rows) {
  prepare_rows_impl(args, m0, m1, rows);
}

void gemm_tile_avx2(const GemmArgs& args, const GemmRows& rows, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                    GemmWorkspace* ws, bool new_columns) {
  gemm_tile_impl(args, rows, m0, m1, n0, n1, ws, new_columns);
}

}  // namespace diffboost::cpu::w4a4
