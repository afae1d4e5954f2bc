// CPU-only build: the W4A4 CUDA entry point exists and says why it cannot run.
#include "w4a4/w4a4_cuda.h"

#include "diffboost_build_config.h"

namespace diffboost::cuda::w4a4 {

std::string gemm(const GemmArgs&) {
  return std::string("diffboost was built without CUDA kernels (") + DIFFBOOST_CUDA_DISABLED_BY + ")";
}

}  // namespace diffboost::cuda::w4a4
