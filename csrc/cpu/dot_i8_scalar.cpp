// Baseline int8 dot product: the fallback on every CPU, and the reference the
// SIMD levels are checked against.
#include "cpu/dot_i8.h"

namespace diffboost::cpu {

std::int64_t dot_i8_scalar(const std::int8_t* a, const std::int8_t* b, std::size_t n) {
  std::int64_t sum = 0;
  for (std::size_t i = 0; i < n; ++i) sum += std::int32_t{a[i]} * std::int32_t{b[i]};
  return sum;
}

}  // namespace diffboost::cpu
