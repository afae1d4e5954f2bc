// Weight-only INT4 (W4A16) on the CPU: dequantization of the packed weight
// (layout: diffboost.ops.w4a4 / diffboost.ops.w4a16). Python multiplies the
// dequantized rows with torch's GEMM, a chunk of rows at a time.
#pragma once

#include <cstdint>

namespace diffboost::cpu::w4a16 {

// Writes rows [row_begin, row_end) of the [n, k] weight to `out` (fp32,
// row-major, (row_end - row_begin) x k): out[r][c] = q[r][c] * scales[c / group][r],
// with q the sign-extended nibbles of qweight (uint8 [n, k/2], low nibble
// first) and scales fp32 [k / group, n]. The products are exact in fp32.
// Throws std::invalid_argument for inconsistent sizes.
void dequantize(const std::uint8_t* qweight, const float* scales, std::int64_t n, std::int64_t k, std::int64_t group,
                std::int64_t row_begin, std::int64_t row_end, float* out, int threads);

}  // namespace diffboost::cpu::w4a16
