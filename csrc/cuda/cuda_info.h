// What the CUDA side of this build contains and whether it can run here.
//
// Implemented by cuda_info.cu in CUDA builds and by cuda_info_stub.cpp in
// CPU-only builds, so bindings.cpp is the same for both. Plain C++ types only:
// this header is shared by nvcc- and g++-compiled translation units, and
// keeping pybind11 out of nvcc keeps those compiles fast and simple.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace diffboost::cuda {

struct BuildInfo {
  bool built = false;             // CUDA kernels compiled into this module
  std::string disabled_by;        // why not, when !built
  int runtime_version = 0;        // CUDART_VERSION compiled against, e.g. 13000; 0 when !built
  std::string compiler;           // e.g. "NVIDIA 13.0.88"
  std::vector<std::string> archs; // SASS targets as in DIFFBOOST_CUDA_ARCHS, e.g. {"80", "90a"}
  std::string ptx_arch;           // arch whose PTX is embedded for JIT, e.g. "90"
};

struct DeviceInfo {
  int index = 0;
  std::string name;
  int major = 0;  // compute capability
  int minor = 0;
  int sm_count = 0;
  std::size_t total_memory = 0;  // bytes
  // Code object the driver will load for this device: "sm_86", or
  // "compute_90 (PTX JIT)"; empty when the build has nothing that runs on it.
  std::string code;
  bool supported = false;  // !code.empty()
};

struct RuntimeInfo {
  int runtime_version = 0;  // CUDART_VERSION; 0 in a CPU-only build
  int driver_version = 0;   // cudaDriverGetVersion; 0 without a driver
  std::vector<DeviceInfo> devices;
  bool ok = false;          // the CUDA kernels can run on at least one visible device
  std::string message;      // human-readable verdict; says what to fix when !ok
};

BuildInfo build_info();

// Queries the driver and devices. Never throws for a missing or old driver or
// missing devices: those are reported through ok/message. Creates no CUDA
// context, so it is cheap and does not reserve GPU memory.
RuntimeInfo runtime_info();

}  // namespace diffboost::cuda
