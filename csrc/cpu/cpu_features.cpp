#include "cpu/cpu_features.h"

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DIFFBOOST_X86_CPUID 1
#include <cpuid.h>
#endif

namespace diffboost::cpu {
namespace {

struct CpuSupport {
  bool avx2 = false;
  bool avx512_vnni = false;
};

#if DIFFBOOST_X86_CPUID

// CPUID bits (Intel SDM vol. 2A, CPUID instruction). Spelled out here rather
// than taken from <cpuid.h> because GCC and Clang name some of them differently.
constexpr std::uint32_t kLeaf1EcxFma = 1u << 12;
constexpr std::uint32_t kLeaf1EcxOsxsave = 1u << 27;
constexpr std::uint32_t kLeaf1EcxAvx = 1u << 28;
constexpr std::uint32_t kLeaf7EbxAvx2 = 1u << 5;
constexpr std::uint32_t kLeaf7EbxAvx512f = 1u << 16;
constexpr std::uint32_t kLeaf7EbxAvx512bw = 1u << 30;
constexpr std::uint32_t kLeaf7EbxAvx512vl = 1u << 31;
constexpr std::uint32_t kLeaf7EcxAvx512vnni = 1u << 11;

// XCR0 bits: register state the OS saves and restores on context switches.
constexpr std::uint64_t kXcr0SseAvx = (1u << 1) | (1u << 2);  // XMM, upper YMM
constexpr std::uint64_t kXcr0Avx512 = (1u << 5) | (1u << 6) | (1u << 7);  // k0-7, upper ZMM0-15, ZMM16-31

std::uint64_t read_xcr0() {
  // Inline asm instead of _xgetbv(), which needs -mxsave on this baseline TU.
  std::uint32_t eax = 0;
  std::uint32_t edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<std::uint64_t>(edx) << 32) | eax;
}

// Done by hand rather than with __builtin_cpu_supports: older libgcc versions
// report AVX-512 from cpuid without checking that the OS enabled the opmask and
// ZMM state in XCR0, and "avx512vnni" is missing from older compilers.
CpuSupport detect() {
  CpuSupport support;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return support;
  const bool fma = ecx & kLeaf1EcxFma;
  // xgetbv faults unless OSXSAVE is set, so test it before reading XCR0.
  if (!(ecx & kLeaf1EcxOsxsave) || !(ecx & kLeaf1EcxAvx)) return support;
  const std::uint64_t xcr0 = read_xcr0();
  const bool os_avx = (xcr0 & kXcr0SseAvx) == kXcr0SseAvx;
  const bool os_avx512 = os_avx && (xcr0 & kXcr0Avx512) == kXcr0Avx512;

  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return support;
  support.avx2 = os_avx && fma && (ebx & kLeaf7EbxAvx2);
  support.avx512_vnni = os_avx512 && (ebx & kLeaf7EbxAvx512f) && (ebx & kLeaf7EbxAvx512bw) &&
                        (ebx & kLeaf7EbxAvx512vl) && (ecx & kLeaf7EcxAvx512vnni);
  return support;
}

#else

// Not x86-64 (or no GCC-style cpuid): only the scalar level exists.
CpuSupport detect() { return {}; }

#endif

const CpuSupport& cpu_support() {
  static const CpuSupport support = detect();  // thread-safe one-time init
  return support;
}

}  // namespace

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::kScalar: return "scalar";
    case SimdLevel::kAvx2: return "avx2";
    case SimdLevel::kAvx512Vnni: return "avx512_vnni";
  }
  return "unknown";
}

std::optional<SimdLevel> simd_level_from_name(std::string_view name) {
  for (SimdLevel level : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512Vnni}) {
    if (name == simd_level_name(level)) return level;
  }
  return std::nullopt;
}

std::vector<SimdLevel> compiled_simd_levels() {
  std::vector<SimdLevel> levels;
#if DIFFBOOST_HAVE_SIMD_AVX512_VNNI
  levels.push_back(SimdLevel::kAvx512Vnni);
#endif
#if DIFFBOOST_HAVE_SIMD_AVX2
  levels.push_back(SimdLevel::kAvx2);
#endif
  levels.push_back(SimdLevel::kScalar);
  return levels;
}

bool cpu_supports(SimdLevel level) {
  switch (level) {
    case SimdLevel::kScalar: return true;
    case SimdLevel::kAvx2: return cpu_support().avx2;
    case SimdLevel::kAvx512Vnni: return cpu_support().avx512_vnni;
  }
  return false;
}

SimdLevel best_simd_level() {
  for (SimdLevel level : compiled_simd_levels()) {  // most capable first
    if (cpu_supports(level)) return level;
  }
  return SimdLevel::kScalar;
}

}  // namespace diffboost::cpu
