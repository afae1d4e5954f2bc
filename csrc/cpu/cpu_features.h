// CPU SIMD levels: which ones this binary was compiled with, and which ones
// the CPU we are running on can execute.
//
// Pattern for SIMD kernels (see diffboost_add_simd_sources in CMakeLists.txt):
//   * each level's code lives in its own translation unit, <op>_<level>.cpp,
//     the only files compiled with that level's ISA flags;
//   * the level's functions are declared under #if DIFFBOOST_HAVE_SIMD_<LEVEL>
//     (defined by CMake when the level is compiled in);
//   * a baseline-compiled dispatcher calls them only after cpu_supports(level),
//     falling back to the scalar version.
#pragma once

#include <optional>
#include <string_view>
#include <vector>

namespace diffboost::cpu {

// Ordered from least to most capable, so levels compare with < and >.
enum class SimdLevel : int {
  kScalar = 0,
  kAvx2 = 1,        // AVX2 + FMA
  kAvx512Vnni = 2,  // AVX-512 F/BW/VL + VNNI
};

// Python-facing name: "scalar", "avx2", "avx512_vnni".
const char* simd_level_name(SimdLevel level);

// Inverse of simd_level_name; std::nullopt for an unknown name.
std::optional<SimdLevel> simd_level_from_name(std::string_view name);

// Levels this binary contains code for, most capable first; ends with kScalar.
std::vector<SimdLevel> compiled_simd_levels();

// True when both the CPU and the OS support `level` (the OS must save the
// wider register state on context switches, which cpuid alone does not tell).
// Independent of what was compiled in. Detection runs once and is cached.
bool cpu_supports(SimdLevel level);

// The level runtime dispatch uses: the most capable compiled-in level that
// the CPU supports.
SimdLevel best_simd_level();

}  // namespace diffboost::cpu
