// Per-SIMD-level int8 dot-product kernels behind _C.simd_selftest(). They are
// tiny on purpose: they exist to prove that every level's translation unit is
// really compiled with its ISA flags and produces correct results, ahead of
// the real SIMD GEMMs that will follow the same layout.
//
// Rules for per-level translation units (dot_i8_<level>.cpp and later ones):
//   * include only C-style headers (<cstddef>, <cstdint>, <immintrin.h>).
//     An inline function or template from a C++ header instantiated here would
//     be compiled with AVX-512 instructions, and the linker may keep that copy
//     for the whole module -- crashing baseline code paths on older CPUs;
//   * never call these functions without checking cpu_supports(level) first.
#pragma once

#include <cstddef>
#include <cstdint>

namespace diffboost::cpu {

// Largest n the kernels accept. Keeps every int32 SIMD lane accumulator well
// below 2^31 for any int8 input: an AVX2 lane sums n / 8 products of magnitude
// <= 2^14, a VNNI lane n / 16 biased products of magnitude <= 255 * 128.
constexpr std::size_t kDotI8MaxLength = std::size_t{1} << 19;

// sum(a[i] * b[i]) for i < n, with n <= kDotI8MaxLength.
std::int64_t dot_i8_scalar(const std::int8_t* a, const std::int8_t* b, std::size_t n);
#if DIFFBOOST_HAVE_SIMD_AVX2
std::int64_t dot_i8_avx2(const std::int8_t* a, const std::int8_t* b, std::size_t n);
#endif
#if DIFFBOOST_HAVE_SIMD_AVX512_VNNI
std::int64_t dot_i8_avx512_vnni(const std::int8_t* a, const std::int8_t* b, std::size_t n);
#endif

}  // namespace diffboost::cpu
