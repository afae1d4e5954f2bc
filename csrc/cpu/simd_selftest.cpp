#include "cpu/simd_selftest.h"

#include <stdexcept>
#include <string>

#include "cpu/dot_i8.h"

namespace diffboost::cpu {
namespace {

using DotI8Kernel = std::int64_t (*)(const std::int8_t*, const std::int8_t*, std::size_t);

// The level's kernel, or nullptr when the level is not compiled into this build.
DotI8Kernel dot_i8_kernel(SimdLevel level) {
  switch (level) {
    case SimdLevel::kScalar:
      return dot_i8_scalar;
#if DIFFBOOST_HAVE_SIMD_AVX2
    case SimdLevel::kAvx2:
      return dot_i8_avx2;
#endif
#if DIFFBOOST_HAVE_SIMD_AVX512_VNNI
    case SimdLevel::kAvx512Vnni:
      return dot_i8_avx512_vnni;
#endif
    default:
      return nullptr;
  }
}

}  // namespace

std::int64_t simd_selftest(SimdLevel level, const std::int8_t* a, const std::int8_t* b, std::size_t n) {
  const DotI8Kernel kernel = dot_i8_kernel(level);
  if (kernel == nullptr) {
    throw std::invalid_argument(std::string("simd_selftest: ") + simd_level_name(level) +
                                " kernels are not compiled into this build");
  }
  // Calling the level's code on a CPU without it would die with SIGILL.
  if (!cpu_supports(level)) {
    throw std::runtime_error(std::string("simd_selftest: this CPU does not support ") + simd_level_name(level));
  }
  if (n > kDotI8MaxLength) {
    throw std::invalid_argument("simd_selftest: at most " + std::to_string(kDotI8MaxLength) +
                                " elements, got " + std::to_string(n));
  }
  return kernel(a, b, n);
}

}  // namespace diffboost::cpu
