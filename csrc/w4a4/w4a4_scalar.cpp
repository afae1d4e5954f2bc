// W4A4 CPU kernels, scalar level: the fallback on every CPU and the plainest
// statement of the arithmetic (w4a4_kernels.h). No SIMD, no tricks: signed
// nibbles are multiplied directly.
#include <math.h>

#include "w4a4/w4a4_kernels.h"

namespace diffboost::cpu::w4a4 {
namespace {

inline int sign_extend_nibble(int nibble) { return (nibble ^ 8) - 8; }

inline float load_x(const QuantizeArgs& args, int64_t row, int64_t col) {
  if (args.x_dtype == kBFloat16) {
    return bf16_bits_to_float(static_cast<const uint16_t*>(args.x)[row * args.x_stride + col]);
  }
  return static_cast<const float*>(args.x)[row * args.x_stride + col];
}

}  // namespace

void quantize_rows_scalar(const QuantizeArgs& args, int64_t m0, int64_t m1, float* scratch) {
  const int64_t k = args.k, g = args.group;
  for (int64_t row = m0; row < m1; ++row) {
    float* xs = scratch;
    for (int64_t c = 0; c < k; ++c) {
      xs[c] = load_x(args, row, c);
      if (args.smooth_inv != nullptr) xs[c] *= args.smooth_inv[c];
    }
    uint8_t* qrow = args.qx + row * (k / 2);
    for (int64_t g0 = 0; g0 < k; g0 += g) {
      float amax = 0.0f;
      for (int64_t c = g0; c < g0 + g; ++c) amax = fmaxf(amax, fabsf(xs[c]));
      args.ascales[(g0 / g) * args.m + row] = amax / 7.0f;
      const float inv = 7.0f / fmaxf(amax, 1e-30f);
      for (int64_t c = g0; c < g0 + g; c += 2) {
        const int lo = static_cast<int>(nearbyintf(xs[c] * inv));  // round half to even (default FP mode)
        const int hi = static_cast<int>(nearbyintf(xs[c + 1] * inv));
        qrow[c / 2] = static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
      }
    }
    if (args.rank == 0) continue;
    // The low-rank input is xs rounded to x's dtype.
    if (args.x_dtype == kBFloat16) {
      for (int64_t c = 0; c < k; ++c) xs[c] = round_to_bf16(xs[c]);
    }
    float* lr = args.lr + row * args.rank;
    for (int64_t j = 0; j < args.rank; ++j) lr[j] = 0.0f;
    for (int64_t c = 0; c < k; ++c) {
      const float* d = args.down + c * args.rank;
      for (int64_t j = 0; j < args.rank; ++j) lr[j] += xs[c] * d[j];
    }
  }
}

void prepare_rows_scalar(const GemmArgs& args, int64_t m0, int64_t m1, const GemmRows& rows) {
  const int64_t k = args.k, half = k / 2;
  for (int64_t row = m0; row < m1; ++row) {  // signed values in channel order
    const uint8_t* p = args.qx + row * half;
    int8_t* a = rows.act + row * k;
    for (int64_t j = 0; j < half; ++j) {
      a[2 * j] = static_cast<int8_t>(sign_extend_nibble(p[j] & 0xF));
      a[2 * j + 1] = static_cast<int8_t>(sign_extend_nibble(p[j] >> 4));
    }
    for (int64_t j = 0; j < args.rank; ++j) {
      const float v = args.lr[row * args.rank + j];
      rows.lr[row * args.rank + j] = args.out_dtype == kBFloat16 ? round_to_bf16(v) : v;
    }
  }
}

void gemm_tile_scalar(const GemmArgs& args, const GemmRows& rows, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                      GemmWorkspace* /*ws*/, bool /*new_columns*/) {
  const int64_t k = args.k, g = args.group, half = k / 2;
  for (int64_t row = m0; row < m1; ++row) {
    const int8_t* a = rows.act + row * k;
    for (int64_t col = n0; col < n1; ++col) {
      const uint8_t* w = args.qw + col * half;
      float acc = 0.0f;
      for (int64_t g0 = 0; g0 < k; g0 += g) {
        int32_t dot = 0;
        for (int64_t c = g0; c < g0 + g; c += 2) {
          dot += a[c] * sign_extend_nibble(w[c / 2] & 0xF) + a[c + 1] * sign_extend_nibble(w[c / 2] >> 4);
        }
        const int64_t group = g0 / g;
        acc += static_cast<float>(dot) * (args.ascales[group * args.m + row] * args.wscales[group * args.n + col]);
      }
      for (int64_t j = 0; j < args.rank; ++j) acc += rows.lr[row * args.rank + j] * args.up[j * args.n + col];
      if (args.bias != nullptr) acc += args.bias[col];
      if (args.out_dtype == kBFloat16) {
        static_cast<uint16_t*>(args.out)[row * args.out_stride + col] = float_to_bf16_bits(acc);
      } else {
        static_cast<float*>(args.out)[row * args.out_stride + col] = acc;
      }
    }
  }
}

}  // namespace diffboost::cpu::w4a4
