// CUDA build: reports what was compiled and whether this machine can run it.
//
// Built with the static CUDA runtime, so everything here works -- and reports
// a readable verdict -- on machines without a driver or GPU.
#include "cuda/cuda_info.h"

#include <cuda_runtime.h>

#include <cstdlib>
#include <sstream>
#include <string>
#include <utility>

#include "diffboost_build_config.h"

namespace diffboost::cuda {
namespace {

// An entry of DIFFBOOST_CUDA_ARCHS such as "86" or "90a".
struct Arch {
  std::string name;
  int major = 0;
  int minor = 0;
  bool arch_specific = false;  // "a" suffix: SASS that runs on exactly this arch
};

// CMake validated the format ([0-9]+a?), so no error handling is needed here.
Arch parse_arch(const std::string& name) {
  std::size_t digits = 0;
  const int number = std::stoi(name, &digits);
  return {name, number / 10, number % 10, digits < name.size()};
}

std::vector<std::string> split_archs(const std::string& list) {
  std::vector<std::string> out;
  std::stringstream stream(list);
  for (std::string item; std::getline(stream, item, ';');) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

// 12080 -> "12.8", the way CUDA versions are usually written.
std::string version_string(int version) {
  return std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
}

// Formats a failed call and clears the runtime's per-thread "last error", so a
// later cudaGetLastError() after a kernel launch does not report this query.
// cudaGetLastError's return value is that same error, already in hand.
std::string take_error(const char* call, cudaError_t err) {
  static_cast<void>(cudaGetLastError());
  return std::string(call) + " failed: " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

// Which code object in this module the driver would load on a device of
// compute capability major.minor. Returns it ("sm_86", "compute_90 (PTX JIT)"),
// or an empty string and sets `why_not`.
std::string code_for_device(int major, int minor, int driver_version, std::string* why_not) {
  // SASS runs on GPUs of the same major version and an equal or higher minor
  // (sm_80 code runs on sm_86); arch-specific SASS (sm_90a) only on its exact
  // arch. Among several candidates the driver takes the highest minor.
  const Arch* best = nullptr;
  std::vector<Arch> archs;
  for (const std::string& name : split_archs(DIFFBOOST_CUDA_ARCHS)) archs.push_back(parse_arch(name));
  for (const Arch& arch : archs) {
    const bool runs = arch.major == major && (arch.arch_specific ? arch.minor == minor : arch.minor <= minor);
    if (runs && (best == nullptr || arch.minor > best->minor)) best = &arch;
  }
  if (best != nullptr) return "sm_" + best->name;

  // Otherwise the driver JIT-compiles the embedded PTX: the GPU must be at
  // least the PTX arch, and the driver must know this toolkit's PTX ISA.
  const Arch ptx = parse_arch(DIFFBOOST_CUDA_PTX_ARCH);
  const std::string device_arch = std::to_string(major) + std::to_string(minor);
  if (major * 10 + minor < ptx.major * 10 + ptx.minor) {
    *why_not = "no code for sm_" + device_arch + " (SASS for " DIFFBOOST_CUDA_ARCHS ", PTX for compute_" +
               ptx.name + "); rebuild with DIFFBOOST_CUDA_ARCHS including " + device_arch;
    return "";
  }
  if (driver_version < CUDART_VERSION) {
    *why_not = "only PTX (compute_" + ptx.name + ") fits sm_" + device_arch + ", and the driver (CUDA " +
               version_string(driver_version) + ") cannot JIT PTX from CUDA " + version_string(CUDART_VERSION) +
               "; update the driver or rebuild with DIFFBOOST_CUDA_ARCHS including " + device_arch;
    return "";
  }
  return "compute_" + ptx.name + " (PTX JIT)";
}

}  // namespace

BuildInfo build_info() {
  BuildInfo info;
  info.built = true;
  info.runtime_version = CUDART_VERSION;
  info.compiler = DIFFBOOST_CUDA_COMPILER;
  info.archs = split_archs(DIFFBOOST_CUDA_ARCHS);
  info.ptx_arch = DIFFBOOST_CUDA_PTX_ARCH;
  return info;
}

RuntimeInfo runtime_info() {
  RuntimeInfo info;
  info.runtime_version = CUDART_VERSION;
  const std::string runtime = "CUDA " + version_string(CUDART_VERSION);

  cudaError_t err = cudaDriverGetVersion(&info.driver_version);
  if (err != cudaSuccess) {
    info.message = take_error("cudaDriverGetVersion", err);
    return info;
  }
  // The static runtime loads libcuda.so.1 itself and reports 0 when it can't.
  if (info.driver_version == 0) {
    info.message = "No NVIDIA driver found (libcuda.so.1 could not be loaded): diffboost's CUDA kernels (built with " +
                   runtime + ") need an NVIDIA GPU and driver.";
    return info;
  }

  int count = 0;
  err = cudaGetDeviceCount(&count);
  if (err == cudaErrorInsufficientDriver) {
    info.message = "The NVIDIA driver supports CUDA " + version_string(info.driver_version) +
                   ", but diffboost's CUDA kernels were built with " + runtime +
                   ": install a driver for CUDA " + version_string(CUDART_VERSION) +
                   " or newer, or rebuild diffboost with an older CUDA toolkit.";
    static_cast<void>(cudaGetLastError());  // see take_error
    return info;
  }
  if (err == cudaErrorNoDevice || (err == cudaSuccess && count == 0)) {
    const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
    info.message = std::string("No CUDA device is visible") +
                   (visible != nullptr ? std::string(" (CUDA_VISIBLE_DEVICES=") + visible + ")" : "") + ".";
    if (err != cudaSuccess) static_cast<void>(cudaGetLastError());  // see take_error
    return info;
  }
  if (err != cudaSuccess) {
    info.message = take_error("cudaGetDeviceCount", err);
    return info;
  }

  std::string unsupported;
  for (int index = 0; index < count; ++index) {
    cudaDeviceProp prop{};
    err = cudaGetDeviceProperties(&prop, index);
    if (err != cudaSuccess) {
      info.devices.clear();
      info.message = take_error(("cudaGetDeviceProperties(" + std::to_string(index) + ")").c_str(), err);
      return info;
    }
    DeviceInfo device;
    device.index = index;
    device.name = prop.name;
    device.major = prop.major;
    device.minor = prop.minor;
    device.sm_count = prop.multiProcessorCount;
    device.total_memory = prop.totalGlobalMem;
    std::string why_not;
    device.code = code_for_device(prop.major, prop.minor, info.driver_version, &why_not);
    device.supported = !device.code.empty();
    if (device.supported) {
      info.ok = true;
    } else {
      unsupported += " cuda:" + std::to_string(index) + " (" + device.name + "): " + why_not + ".";
    }
    info.devices.push_back(std::move(device));
  }

  if (info.ok) {
    info.message = "CUDA kernels (" + runtime + ") can run; driver supports CUDA " +
                   version_string(info.driver_version) + ".";
    if (!unsupported.empty()) info.message += " Not on:" + unsupported;
  } else {
    info.message = "No visible GPU can run diffboost's CUDA kernels:" + unsupported;
  }
  return info;
}

}  // namespace diffboost::cuda
