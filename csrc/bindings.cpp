// The one place where diffboost._C's Python API is declared.
//
// Conventions for ops added here: they take raw data pointers, shapes, dtypes
// and the CUDA stream as Python integers (never torch tensors -- the extension
// does not link against torch, so it is independent of the torch version),
// and the Python wrappers in diffboost are responsible for validating tensors.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>

#include "cpu/cpu_features.h"
#include "cpu/simd_selftest.h"
#include "cuda/cuda_info.h"
#include "diffboost_build_config.h"

namespace py = pybind11;

namespace diffboost {
namespace {

py::list simd_level_names(const std::vector<cpu::SimdLevel>& levels) {
  py::list names;
  for (cpu::SimdLevel level : levels) names.append(cpu::simd_level_name(level));
  return names;
}

// "13.0" from 13000, as torch.version.cuda spells it.
py::object cuda_version_string(int version) {
  if (version == 0) return py::none();
  return py::str(std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10));
}

py::dict build_info() {
  const cuda::BuildInfo cuda = cuda::build_info();

  std::vector<cpu::SimdLevel> supported;
  for (cpu::SimdLevel level : cpu::compiled_simd_levels()) {
    if (cpu::cpu_supports(level)) supported.push_back(level);
  }

  py::dict compilers;
  compilers["cxx"] = DIFFBOOST_CXX_COMPILER;
  compilers["cuda"] = cuda.built ? py::object(py::str(cuda.compiler)) : py::object(py::none());

  py::dict info;
  info["version"] = DIFFBOOST_VERSION;
  info["build_type"] = DIFFBOOST_BUILD_TYPE;
  info["cuda"] = cuda.built;
  info["cuda_disabled_by"] = cuda.built ? py::object(py::none()) : py::object(py::str(cuda.disabled_by));
  info["cuda_version"] = cuda_version_string(cuda.runtime_version);
  info["cuda_archs"] = cuda.archs;
  info["cuda_ptx_arch"] = cuda.built ? py::object(py::str(cuda.ptx_arch)) : py::object(py::none());
  info["compilers"] = compilers;
  info["cpu_simd_compiled"] = simd_level_names(cpu::compiled_simd_levels());
  info["cpu_simd_supported"] = simd_level_names(supported);
  info["cpu_simd_runtime"] = cpu::simd_level_name(cpu::best_simd_level());
  return info;
}

py::dict cuda_runtime_info() {
  cuda::RuntimeInfo runtime;
  {
    // The first call initializes the driver, which can take a while on big
    // machines; let other Python threads run meanwhile.
    py::gil_scoped_release no_gil;
    runtime = cuda::runtime_info();
  }

  py::list devices;
  for (const cuda::DeviceInfo& device : runtime.devices) {
    py::dict d;
    d["index"] = device.index;
    d["name"] = device.name;
    d["compute_capability"] = py::make_tuple(device.major, device.minor);
    d["sm_count"] = device.sm_count;
    d["total_memory"] = device.total_memory;
    d["supported"] = device.supported;
    d["code"] = device.supported ? py::object(py::str(device.code)) : py::object(py::none());
    devices.append(d);
  }

  py::dict info;
  info["ok"] = runtime.ok;
  info["message"] = runtime.message;
  info["runtime_version"] = runtime.runtime_version == 0 ? py::object(py::none()) : py::int_(runtime.runtime_version);
  // A CPU-only build never asks the driver, so it cannot say.
  info["driver_version"] = runtime.runtime_version == 0 ? py::object(py::none()) : py::int_(runtime.driver_version);
  info["devices"] = devices;
  return info;
}

std::int64_t simd_selftest(std::string_view level_name, const py::bytes& a_bytes, const py::bytes& b_bytes) {
  const std::string_view a = a_bytes;
  const std::string_view b = b_bytes;
  const auto level = cpu::simd_level_from_name(level_name);
  if (!level) throw std::invalid_argument("simd_selftest: unknown SIMD level '" + std::string(level_name) + "'");
  if (a.size() != b.size()) {
    throw std::invalid_argument("simd_selftest: a and b differ in length (" + std::to_string(a.size()) + " vs " +
                                std::to_string(b.size()) + ")");
  }
  return cpu::simd_selftest(*level, reinterpret_cast<const std::int8_t*>(a.data()),
                            reinterpret_cast<const std::int8_t*>(b.data()), a.size());
}

}  // namespace
}  // namespace diffboost

PYBIND11_MODULE(_C, m, py::mod_gil_not_used()) {
  m.doc() = "diffboost native extension: CUDA kernels (when built with CUDA) and CPU SIMD kernels.";

  m.def("build_info", &diffboost::build_info,
        "What this build contains: version, build type, cuda (bool), cuda_disabled_by (why not, or None), "
        "cuda_version, cuda_archs (SASS targets), cuda_ptx_arch, compilers, cpu_simd_compiled, "
        "cpu_simd_supported (compiled levels this CPU can run) and cpu_simd_runtime (the level dispatch uses).");

  m.def("cuda_runtime_info", &diffboost::cuda_runtime_info,
        "Whether this machine can run the CUDA kernels: ok, message, runtime_version (CUDART_VERSION built "
        "with, or None), driver_version (0 without a driver, None in a CPU-only build) and devices (index, "
        "name, compute_capability, sm_count, total_memory in bytes, supported, code). Creates no CUDA context.");

  m.def("simd_selftest", &diffboost::simd_selftest, py::arg("level"), py::arg("a"), py::arg("b"),
        "Dot product of a and b (bytes, read as int8 vectors of equal length) computed with the given SIMD "
        "level's kernel ('scalar', 'avx2', 'avx512_vnni'). Raises ValueError if the level is unknown or not "
        "compiled in, RuntimeError if this CPU cannot run it.");
}
