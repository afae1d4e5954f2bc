// W4A4 on the CPU: the activation pass and the GEMM, dispatched to the SIMD
// level asked for and run on several threads (w4a4_kernels.h has the layout).
#pragma once

#include "cpu/cpu_features.h"
#include "w4a4/w4a4_kernels.h"

namespace diffboost::cpu::w4a4 {

// `smooth` is [k] (the factors themselves, or nullptr); args.smooth_inv is
// filled here. Throws std::invalid_argument for inconsistent sizes or a level
// not compiled into this build, std::runtime_error if this CPU cannot run it.
void quantize(SimdLevel level, QuantizeArgs args, const float* smooth, int threads);

void gemm(SimdLevel level, const GemmArgs& args, int threads);

}  // namespace diffboost::cpu::w4a4
