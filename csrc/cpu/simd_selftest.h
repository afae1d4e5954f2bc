// Runtime-dispatched entry point of the SIMD self-test (_C.simd_selftest).
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/cpu_features.h"

namespace diffboost::cpu {

// sum(a[i] * b[i]) for i < n, computed with `level`'s kernel exactly as asked
// (no fallback, so a wrong result points at that level's code).
// Throws std::invalid_argument if `level` is not compiled into this build or
// n > kDotI8MaxLength, std::runtime_error if this CPU cannot run `level`.
std::int64_t simd_selftest(SimdLevel level, const std::int8_t* a, const std::int8_t* b, std::size_t n);

}  // namespace diffboost::cpu
