// bfloat16 <-> fp32 in scalar code, with torch's rounding.
//
// `static inline`: every translation unit gets its own copy, compiled with its
// own ISA flags (a shared out-of-line copy from an AVX-512 unit could
// otherwise end up in the code a baseline CPU runs).
#pragma once

#include <stdint.h>

namespace diffboost::cpu {

static inline float bf16_bits_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  __builtin_memcpy(&out, &wide, sizeof(out));
  return out;
}

// Round to nearest even, as torch's fp32 -> bf16 conversion of finite values.
static inline uint16_t float_to_bf16_bits(float value) {
  uint32_t bits;
  __builtin_memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN stays a (quiet) NaN
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

static inline float round_to_bf16(float value) { return bf16_bits_to_float(float_to_bf16_bits(value)); }

}  // namespace diffboost::cpu
