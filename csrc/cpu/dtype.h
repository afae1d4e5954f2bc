// dtype codes of the CPU kernels' activations and outputs, as Python passes
// them (diffboost.ops.w4a4._CPU_DTYPE_CODES, shared by the W4A4 and W4A16 ops).
#pragma once

namespace diffboost::cpu {

enum DType : int { kFloat32 = 0, kBFloat16 = 1 };

}  // namespace diffboost::cpu
