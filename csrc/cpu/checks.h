// Argument checks of the CPU kernels' dispatchers (baseline-compiled units:
// w4a4_cpu.cpp, w4a16_cpu.cpp), so the two INT4 formats refuse bad input with
// the same words.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/cpu_features.h"

namespace diffboost::cpu {

// std::invalid_argument "<op>: <what>" (ValueError in Python) unless ok.
inline void check(bool ok, const char* op, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string(op) + ": " + what);
}

// The group sizes the INT4 layouts support, and K a positive multiple of the group.
inline void check_group(const char* op, std::int64_t k, std::int64_t group) {
  check(group == 32 || group == 64 || group == 128, op, "group must be 32, 64 or 128, got " + std::to_string(group));
  check(k > 0 && k % group == 0, op, "k=" + std::to_string(k) + " must be a positive multiple of the group");
}

// std::runtime_error unless this CPU runs `level`: calling its code anyway would die with SIGILL.
inline void require_cpu_support(SimdLevel level, const char* op) {
  if (!cpu_supports(level)) {
    throw std::runtime_error(std::string(op) + ": this CPU does not support " + simd_level_name(level));
  }
}

}  // namespace diffboost::cpu
