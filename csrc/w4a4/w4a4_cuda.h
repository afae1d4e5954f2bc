// W4A4 GEMM on NVIDIA tensor cores (layout and arithmetic: w4a4_kernels.h and
// python/diffboost/ops/w4a4.py). Implemented by w4a4_cuda.cu in CUDA builds
// and by w4a4_cuda_stub.cpp in CPU-only builds. Plain C++ types only: this
// header is shared by nvcc- and g++-compiled translation units.
#pragma once

#include <cstdint>
#include <string>

namespace diffboost::cuda::w4a4 {

// dtype of wscales, up, bias and out.
enum DType : int { kFloat16 = 0, kBFloat16 = 1 };

struct GemmArgs {
  const void* qx;         // [m, k / 2] packed INT4, 16-byte aligned rows
  const float* ascales;   // [k / group, m]
  std::int64_t m;
  const void* qw;         // [n, k / 2] packed INT4, 16-byte aligned rows
  const void* wscales;    // [k / group, n] (dtype)
  std::int64_t n, k, group;
  const float* lr;        // [m, rank] fp32, or nullptr (rank 0)
  const void* up;         // [rank, n] (dtype)
  std::int64_t rank;
  const void* bias;       // [n] (dtype), or nullptr
  void* out;              // [m, n] (dtype), row stride out_stride
  int dtype;              // DType
  std::int64_t out_stride;
  void* stream;           // cudaStream_t
};

// Launches the GEMM on `stream` (the current device must be the tensors').
// Returns an empty string on success, otherwise what went wrong.
std::string gemm(const GemmArgs& args);

}  // namespace diffboost::cuda::w4a4
