// CPU-only build: the CUDA info functions exist and say why there are no kernels.
#include "cuda/cuda_info.h"

#include "diffboost_build_config.h"

namespace diffboost::cuda {

BuildInfo build_info() {
  BuildInfo info;
  info.disabled_by = DIFFBOOST_CUDA_DISABLED_BY;
  return info;
}

RuntimeInfo runtime_info() {
  RuntimeInfo info;
  info.message = std::string("diffboost was built without CUDA kernels (") + DIFFBOOST_CUDA_DISABLED_BY +
                 "); reinstall with a CUDA toolkit >= 12.0 (nvcc on PATH, or CUDACXX or CUDA_HOME set) to enable them.";
  return info;
}

}  // namespace diffboost::cuda
