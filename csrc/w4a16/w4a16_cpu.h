// Weight-only INT4 (W4A16) on the CPU (layout: diffboost.ops.w4a16: packed
// weight uint8 [n, k/2], low nibble first; scales fp32 [k / group, n]).
//
// Two ways to the layer's product, picked by Python from the number of rows:
//   * few rows (the modulation layers of a DiT: one per sample) are bound by
//     reading the weight: gemm_rows dequantizes it in registers and multiplies
//     at once, reading each packed byte once for up to four rows;
//   * many rows are bound by the multiply-adds: dequantize writes the weight in
//     fp32 for torch's GEMM.
// Either way the dequantized weight is q * scale (exact in fp32), rounded to
// bf16 when x is bf16: the arithmetic of diffboost.ops.w4a16.
#pragma once

#include <cstdint>

#include "cpu/cpu_features.h"
#include "cpu/dtype.h"

namespace diffboost::cpu::w4a16 {

// Writes the [n, k] weight to `out` (fp32, row-major):
// out[r][c] = q[r][c] * scales[c / group][r], rounded to bf16 if round_bf16,
// on `threads` threads. Throws std::invalid_argument for inconsistent sizes.
void dequantize(const std::uint8_t* qweight, const float* scales, std::int64_t n, std::int64_t k, std::int64_t group,
                bool round_bf16, float* out, int threads);

struct RowsArgs {
  const void* x;            // [m, k] fp32 or bf16 (x_dtype), unit stride along k
  int x_dtype;              // DType; also the dtype the weight is rounded to and the output's
  std::int64_t m, k, x_stride;
  const std::uint8_t* qweight;  // [n, k / 2]
  const float* scales;      // [k / group, n]
  std::int64_t n, group;
  const float* bias;        // [n], or nullptr
  void* out;                // [m, n], row stride out_stride, in x's dtype
  std::int64_t out_stride;
};

// out = x @ dequantized(weight)^T + bias, fp32 sums, for any m (meant for a
// few rows), on `threads` threads. Throws std::invalid_argument for
// inconsistent sizes, std::runtime_error for a level this CPU cannot run.
void gemm_rows(SimdLevel level, const RowsArgs& args, int threads);

// Output columns [n0, n1) of gemm_rows, per SIMD level (the AVX-512 level runs
// the AVX2 code: the loop is bound by unpacking, not by vector width).
void gemm_columns_scalar(const RowsArgs& args, std::int64_t n0, std::int64_t n1);
#if DIFFBOOST_HAVE_SIMD_AVX2
void gemm_columns_avx2(const RowsArgs& args, std::int64_t n0, std::int64_t n1);
#endif

}  // namespace diffboost::cpu::w4a16
