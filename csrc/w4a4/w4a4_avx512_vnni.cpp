// W4A4 CPU kernels, AVX-512 VNNI level (compiled with -mavx512f -mavx512bw
// -mavx512vl -mavx512vnni -mfma). The kernels are in w4a4_x86.inc; this file
// supplies the dot step: vpdpbusd on 256-bit registers (AVX512VL), which
// multiplies u8 x s8 and accumulates into int32 in one instruction, and the
// larger register block that AVX-512's 32 vector registers allow.
#include <immintrin.h>

#include "w4a4/w4a4_kernels.h"

namespace diffboost::cpu::w4a4 {
namespace {

// 4 rows x 3 column vectors: 12 accumulators + 6 weight vectors + 2 broadcasts of the 32 registers.
constexpr int kMR = 4;
constexpr int kNR = 3;

inline __m256i dot_step(__m256i acc, __m256i w, __m256i a) { return _mm256_dpbusd_epi32(acc, w, a); }

inline int32_t acc_start(int32_t start) { return start; }

inline __m256i group_sums(__m256i acc) { return acc; }

#include "w4a4/w4a4_x86.inc"

}  // namespace

void quantize_rows_avx512_vnni(const QuantizeArgs& args, int64_t m0, int64_t m1, float* scratch) {
  quantize_rows_impl(args, m0, m1, scratch);
}

void prepare_rows_avx512_vnni(const GemmArgs& args, int64_t m0, int64_t m1, const GemmRows& rows) {
  prepare_rows_impl(args, m0, m1, rows);
}

void gemm_tile_avx512_vnni(const GemmArgs& args, const GemmRows& rows, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                           GemmWorkspace* ws, bool new_columns) {
  gemm_tile_impl(args, rows, m0, m1, n0, n1, ws, new_columns);
}

}  // namespace diffboost::cpu::w4a4
