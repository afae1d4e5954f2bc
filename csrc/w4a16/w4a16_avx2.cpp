// W4A16 few-row GEMM, AVX2 level (compiled with -mavx2 -mfma).
//
// Lanes run along K: 4 packed bytes of one output column are broadcast to the
// 8 lanes, vpsllvd moves lane i's nibble to the top and vpsrad sign-extends
// it (nibble i of the little-endian word is channel i), then a conversion and
// a product by the group scale (and, for bf16, the rounding) give 8 weights
// in fp32, which FMA into one accumulator per (row, column). A register block
// of MR rows x NC columns reuses each dequantized weight vector MR times and
// each x load NC times; the accumulators are summed across lanes once, at the
// end. For one or two rows the loop is bound by the dequantization (4-9 ALU
// operations per 8 weights), not by the multiply-adds, which is why the
// blocks are wide in columns and short in rows.
#include <immintrin.h>

#include <cstring>

#include "w4a16/w4a16_cpu.h"
#include "cpu/bf16.h"

namespace diffboost::cpu::w4a16 {
namespace {

#include "cpu/x86_vec.inc"

// What a register block reads and writes, at its first row and column.
struct Block {
  const void* x;               // [rows][k] at the block's first row
  const std::uint8_t* packed;  // [columns][k / 2] at the block's first column
  const float* scales;         // [groups][n] at the block's first column
  const float* bias;           // [columns] at the block's first column, or nullptr
  void* out;                   // [rows][out_stride] at the block's first row and column
  std::int64_t k, x_stride, n, out_stride;
};

// One register block: MR rows x NC columns, groups of G channels. Out of line and given the Block by value, so
// GCC keeps the accumulators in registers (inlined into the loops below, it stored them on every iteration); the
// inner loop has a fixed trip count (G / 8) and is unrolled.
template <bool BF16, int MR, int NC, int G>
__attribute__((noinline)) void block(const Block b) {
  const std::int64_t half = b.k / 2;
  const __m256i shifts = _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0);
  __m256 acc[MR][NC];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NC; ++j) acc[r][j] = _mm256_setzero_ps();
  for (std::int64_t c0 = 0; c0 < b.k; c0 += G) {
    const float* scales = b.scales + (c0 / G) * b.n;
#pragma GCC unroll 16
    for (int s = 0; s < G / 8; ++s) {
      const std::int64_t c = c0 + 8 * s;
      __m256 w[NC];
      for (int j = 0; j < NC; ++j) {
        std::int32_t bits;
        std::memcpy(&bits, b.packed + j * half + c / 2, sizeof(bits));
        const __m256i q = _mm256_srai_epi32(_mm256_sllv_epi32(_mm256_set1_epi32(bits), shifts), 28);
        w[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_broadcast_ss(scales + j));
        if constexpr (BF16) w[j] = round_bf16x8(w[j]);
      }
      for (int r = 0; r < MR; ++r) {
        const __m256 x = load8_as_f32(b.x, BF16, r * b.x_stride + c);
        for (int j = 0; j < NC; ++j) acc[r][j] = _mm256_fmadd_ps(x, w[j], acc[r][j]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NC; ++j) {
      float v = hsum(acc[r][j]);
      if (b.bias != nullptr) v += b.bias[j];
      if constexpr (BF16) {
        static_cast<std::uint16_t*>(b.out)[r * b.out_stride + j] = float_to_bf16_bits(v);
      } else {
        static_cast<float*>(b.out)[r * b.out_stride + j] = v;
      }
    }
  }
}

// Rows [row0, row0 + MR) of columns [n0, n1): blocks of NC columns, then single columns.
template <bool BF16, int MR, int NC, int G>
void row_block(const RowsArgs& a, std::int64_t row0, std::int64_t n0, std::int64_t n1) {
  const std::int64_t esize = BF16 ? 2 : 4;
  const auto at = [&](std::int64_t col) {
    return Block{static_cast<const char*>(a.x) + row0 * a.x_stride * esize,
                 a.qweight + col * (a.k / 2),
                 a.scales + col,
                 a.bias != nullptr ? a.bias + col : nullptr,
                 static_cast<char*>(a.out) + (row0 * a.out_stride + col) * esize,
                 a.k, a.x_stride, a.n, a.out_stride};
  };
  std::int64_t col = n0;
  for (; col + NC <= n1; col += NC) block<BF16, MR, NC, G>(at(col));
  for (; col < n1; ++col) block<BF16, MR, 1, G>(at(col));
}

// MR x NC register blocks (accumulators + NC weight vectors + one x of the 16 ymm registers): 1 x 4, 2 x 4,
// 3 x 2, 4 x 2.
template <bool BF16, int G>
void columns(const RowsArgs& a, std::int64_t n0, std::int64_t n1) {
  std::int64_t row = 0;
  for (; row + 4 <= a.m; row += 4) row_block<BF16, 4, 2, G>(a, row, n0, n1);
  switch (a.m - row) {
    case 3: row_block<BF16, 3, 2, G>(a, row, n0, n1); break;
    case 2: row_block<BF16, 2, 4, G>(a, row, n0, n1); break;
    case 1: row_block<BF16, 1, 4, G>(a, row, n0, n1); break;
    default: break;
  }
}

template <bool BF16>
void columns_of_group(const RowsArgs& a, std::int64_t n0, std::int64_t n1) {
  switch (a.group) {  // a compile-time trip count for the inner loop
    case 32: columns<BF16, 32>(a, n0, n1); break;
    case 64: columns<BF16, 64>(a, n0, n1); break;
    default: columns<BF16, 128>(a, n0, n1); break;
  }
}

}  // namespace

void gemm_columns_avx2(const RowsArgs& args, std::int64_t n0, std::int64_t n1) {
  if (args.x_dtype == kBFloat16) {
    columns_of_group<true>(args, n0, n1);
  } else {
    columns_of_group<false>(args, n0, n1);
  }
}

}  // namespace diffboost::cpu::w4a16
