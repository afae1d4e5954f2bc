#include "w4a16/w4a16_cpu.h"

#include <stdexcept>
#include <string>

#include "cpu/bf16.h"
#include "cpu/checks.h"
#include "cpu/parallel.h"

namespace diffboost::cpu::w4a16 {
namespace {

// The sign-extended nibble `i` of a packed row (arithmetic shifts on int8, as in the other kernels).
inline int nibble(const std::uint8_t* packed, std::int64_t i) {
  const auto byte = static_cast<std::int8_t>(packed[i / 2]);
  return i % 2 == 0 ? static_cast<std::int8_t>(byte << 4) >> 4 : byte >> 4;
}

}  // namespace

void dequantize(const std::uint8_t* qweight, const float* scales, std::int64_t n, std::int64_t k, std::int64_t group,
                bool round_bf16, float* out, int threads) {
  const char* op = "w4a16_dequantize_cpu";
  check_group(op, k, group);
  check(n >= 0, op, "need n >= 0");
  if (n == 0) return;
  const std::int64_t groups = k / group;
  // Rows in chunks of 8: each one is k / 2 bytes in and 4 k bytes out, a plain streaming loop the compiler
  // vectorizes.
  parallel_for(n, 8, threads, [&](int, std::int64_t begin, std::int64_t end) {
    for (std::int64_t row = begin; row < end; ++row) {
      const std::uint8_t* packed = qweight + row * (k / 2);
      float* dst = out + row * k;
      for (std::int64_t g = 0; g < groups; ++g) {
        const float scale = scales[g * n + row];
        const std::uint8_t* q = packed + g * (group / 2);
        float* d = dst + g * group;
        for (std::int64_t j = 0; j < group / 2; ++j) {
          const auto byte = static_cast<std::int8_t>(q[j]);
          d[2 * j] = static_cast<float>(static_cast<std::int8_t>(byte << 4) >> 4) * scale;
          d[2 * j + 1] = static_cast<float>(byte >> 4) * scale;
        }
        if (round_bf16) {
          for (std::int64_t j = 0; j < group; ++j) d[j] = round_to_bf16(d[j]);
        }
      }
    }
  });
}

void gemm_columns_scalar(const RowsArgs& args, std::int64_t n0, std::int64_t n1) {
  const bool bf16 = args.x_dtype == kBFloat16;
  const std::int64_t k = args.k;
  for (std::int64_t col = n0; col < n1; ++col) {
    const std::uint8_t* packed = args.qweight + col * (k / 2);
    for (std::int64_t row = 0; row < args.m; ++row) {
      float acc = 0.0f;
      for (std::int64_t c = 0; c < k; ++c) {
        float w = static_cast<float>(nibble(packed, c)) * args.scales[(c / args.group) * args.n + col];
        float x;
        if (bf16) {
          w = round_to_bf16(w);
          x = bf16_bits_to_float(static_cast<const std::uint16_t*>(args.x)[row * args.x_stride + c]);
        } else {
          x = static_cast<const float*>(args.x)[row * args.x_stride + c];
        }
        acc += x * w;
      }
      if (args.bias != nullptr) acc += args.bias[col];
      const std::int64_t at = row * args.out_stride + col;
      if (bf16) {
        static_cast<std::uint16_t*>(args.out)[at] = float_to_bf16_bits(acc);
      } else {
        static_cast<float*>(args.out)[at] = acc;
      }
    }
  }
}

void gemm_rows(SimdLevel level, const RowsArgs& args, int threads) {
  const char* op = "w4a16_gemm_rows_cpu";
  check_group(op, args.k, args.group);
  check(args.x_dtype == kFloat32 || args.x_dtype == kBFloat16, op, "x_dtype must be 0 (fp32) or 1 (bf16)");
  check(args.m >= 0 && args.n >= 0 && args.x_stride >= args.k && args.out_stride >= args.n, op,
        "need m, n >= 0, x_stride >= k and out_stride >= n");
  auto columns = gemm_columns_scalar;
  if (level >= SimdLevel::kAvx2) {
#if DIFFBOOST_HAVE_SIMD_AVX2
    require_cpu_support(level, op);
    require_cpu_support(SimdLevel::kAvx2, op);  // what an AVX-512 level runs here
    columns = gemm_columns_avx2;
#else
    throw std::invalid_argument(std::string(op) + ": " + simd_level_name(level) +
                                " kernels are not compiled into this build");
#endif
  }
  if (args.m == 0 || args.n == 0) return;  // empty tensors may have null data pointers
  // Columns in chunks of 32 (~50 KB of packed weight at k = 3072): enough chunks to balance the threads.
  parallel_for(args.n, 32, threads, [&](int, std::int64_t begin, std::int64_t end) { columns(args, begin, end); });
}

}  // namespace diffboost::cpu::w4a16
