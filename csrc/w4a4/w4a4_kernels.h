// W4A4 CPU kernels: arguments and the per-SIMD-level entry points.
//
// The layout and arithmetic are those of python/diffboost/ops/w4a4.py (its
// module docstring is the specification): packed INT4 activations and weights,
// two's complement nibbles, channel 2j in the low nibble of byte j; group
// scales ascales [K/G, M] (fp32) and wscales [K/G, N]; activations quantized
// per row and group with round-half-even; GEMM = sum over groups of exact
// integer dots times ascale * wscale, plus lr @ up (lr rounded to the output
// dtype) plus bias.
//
// Each level's translation unit (w4a4_<level>.cpp) implements the functions
// declared below for its level; w4a4_cpu.cpp dispatches and runs them on
// several threads. Like csrc/cpu/dot_i8.h, this header includes only C-style
// headers and defines nothing with external linkage, so level TUs compiled
// with different ISA flags cannot leak code into each other.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "cpu/bf16.h"
#include "cpu/dtype.h"

namespace diffboost::cpu::w4a4 {

// Rows of one GEMM tile: the unit of the fp32 result tile and of the epilogue.
constexpr int64_t kTileM = 64;
// Columns of one GEMM tile: the unit of weight re-layout (kept in L2 while
// every row tile of the thread consumes it); a multiple of 8.
constexpr int64_t kTileN = 128;
// Rows the activation pass handles together (shares each load of lora_down).
constexpr int64_t kQuantizeRows = 4;

struct QuantizeArgs {
  const void* x;             // [m, k] fp32 or bf16 (x_dtype), unit stride along k
  int x_dtype;               // DType
  int64_t m, k, x_stride;    // x_stride: elements between rows
  const float* smooth_inv;   // [k] reciprocal of the smoothing factors, or nullptr
  const float* down;         // [k, rank] fp32, or nullptr (rank 0)
  int64_t rank;
  int64_t group;             // 32, 64 or 128
  uint8_t* qx;               // [m, k / 2]
  float* ascales;            // [k / group, m]
  float* lr;                 // [m, rank]
};

struct GemmArgs {
  const uint8_t* qx;         // [m, k / 2]
  const float* ascales;      // [k / group, m]
  int64_t m;
  const uint8_t* qw;         // [n, k / 2]
  const float* wscales;      // [k / group, n] fp32
  int64_t n, k, group;
  const float* lr;           // [m, rank] fp32, or nullptr (rank 0)
  const float* up;           // [rank, n] fp32
  int64_t rank;
  const float* bias;         // [n] fp32, or nullptr
  void* out;                 // [m, n] with row stride out_stride, fp32 or bf16 (out_dtype)
  int out_dtype;             // DType
  int64_t out_stride;
};

// The GEMM's activations in the form a level's tile kernels read, prepared
// once per call for all rows (prepare_rows_<level>) and shared by the threads;
// allocated by the dispatcher with the sizes below, laid out by each level.
struct GemmRows {
  int8_t* act;         // m * k bytes: the activations, unpacked
  int32_t* acc_start;  // m * (k / group): per row and group, the level's integer accumulator start value
  float* lr;           // m * rank: lr rounded to the output dtype
};

// Per-thread scratch of the GEMM, allocated by the dispatcher with the sizes
// below; each level uses what it needs, laid out its own way.
struct GemmWorkspace {
  float* tile;       // kTileM * kTileN: fp32 results before the epilogue
  uint8_t* weights;  // kTileN * k bytes: the column tile's weights, re-laid out
  float* wscales;    // (k / group) * kTileN: the column tile's scales
  float* up;         // rank * kTileN: the column tile's columns of up
};

// Scratch of the activation pass: kQuantizeRows * k floats.
//
// quantize_rows_<level>: rows [m0, m1) of the activation pass.
// prepare_rows_<level>: rows [m0, m1) of `rows`.
// gemm_tile_<level>: output rows [m0, m1) x columns [n0, n1) (at most kTileM x
//   kTileN), after prepare_rows for all rows. `new_columns` is true when the
//   columns differ from the previous call on the same workspace (the level
//   refills what it derives from them).
void quantize_rows_scalar(const QuantizeArgs& args, int64_t m0, int64_t m1, float* scratch);
void prepare_rows_scalar(const GemmArgs& args, int64_t m0, int64_t m1, const GemmRows& rows);
void gemm_tile_scalar(const GemmArgs& args, const GemmRows& rows, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                      GemmWorkspace* ws, bool new_columns);
#if DIFFBOOST_HAVE_SIMD_AVX2
void quantize_rows_avx2(const QuantizeArgs& args, int64_t m0, int64_t m1, float* scratch);
void prepare_rows_avx2(const GemmArgs& args, int64_t m0, int64_t m1, const GemmRows& rows);
void gemm_tile_avx2(const GemmArgs& args, const GemmRows& rows, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                    GemmWorkspace* ws, bool new_columns);
#endif
#if DIFFBOOST_HAVE_SIMD_AVX512_VNNI
void quantize_rows_avx512_vnni(const QuantizeArgs& args, int64_t m0, int64_t m1, float* scratch);
void prepare_rows_avx512_vnni(const GemmArgs& args, int64_t m0, int64_t m1, const GemmRows& rows);
void gemm_tile_avx512_vnni(const GemmArgs& args, const GemmRows& rows, int64_t m0, int64_t m1, int64_t n0,
                           int64_t n1, GemmWorkspace* ws, bool new_columns);
#endif

}  // namespace diffboost::cpu::w4a4
