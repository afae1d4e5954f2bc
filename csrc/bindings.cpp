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
#include "cpu/parallel.h"
#include "cpu/simd_selftest.h"
#include "cuda/cuda_info.h"
#include "diffboost_build_config.h"
#include "w4a16/w4a16_cpu.h"
#include "w4a4/w4a4_cpu.h"
#include "w4a4/w4a4_cuda.h"

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

// "auto" is the level runtime dispatch picks; otherwise a level name, which
// the CPU kernels reject if it is not compiled in or not supported.
cpu::SimdLevel kernel_level(std::string_view name) {
  if (name == "auto") return cpu::best_simd_level();
  const auto level = cpu::simd_level_from_name(name);
  if (!level) throw std::invalid_argument("unknown SIMD level '" + std::string(name) + "'");
  return *level;
}

template <class T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void w4a4_quantize_cpu(std::string_view level, std::uintptr_t x, int x_dtype, std::int64_t m, std::int64_t k,
                       std::int64_t x_stride, std::uintptr_t smooth, std::uintptr_t down, std::int64_t rank,
                       std::int64_t group, std::uintptr_t qx, std::uintptr_t ascales, std::uintptr_t lr, int threads) {
  cpu::w4a4::QuantizeArgs args{};
  args.x = as_ptr<const void>(x);
  args.x_dtype = x_dtype;
  args.m = m;
  args.k = k;
  args.x_stride = x_stride;
  args.down = as_ptr<const float>(down);
  args.rank = rank;
  args.group = group;
  args.qx = as_ptr<std::uint8_t>(qx);
  args.ascales = as_ptr<float>(ascales);
  args.lr = as_ptr<float>(lr);
  const cpu::SimdLevel simd = kernel_level(level);
  py::gil_scoped_release no_gil;
  cpu::w4a4::quantize(simd, args, as_ptr<const float>(smooth), threads);
}

void w4a4_gemm_cpu(std::string_view level, std::uintptr_t qx, std::uintptr_t ascales, std::int64_t m,
                   std::uintptr_t qw, std::uintptr_t wscales, std::int64_t n, std::int64_t k, std::int64_t group,
                   std::uintptr_t lr, std::uintptr_t up, std::int64_t rank, std::uintptr_t bias, std::uintptr_t out,
                   int out_dtype, std::int64_t out_stride, int threads) {
  cpu::w4a4::GemmArgs args{};
  args.qx = as_ptr<const std::uint8_t>(qx);
  args.ascales = as_ptr<const float>(ascales);
  args.m = m;
  args.qw = as_ptr<const std::uint8_t>(qw);
  args.wscales = as_ptr<const float>(wscales);
  args.n = n;
  args.k = k;
  args.group = group;
  args.lr = as_ptr<const float>(lr);
  args.up = as_ptr<const float>(up);
  args.rank = rank;
  args.bias = as_ptr<const float>(bias);
  args.out = as_ptr<void>(out);
  args.out_dtype = out_dtype;
  args.out_stride = out_stride;
  const cpu::SimdLevel simd = kernel_level(level);
  py::gil_scoped_release no_gil;
  cpu::w4a4::gemm(simd, args, threads);
}

void w4a16_dequantize_cpu(std::uintptr_t qweight, std::uintptr_t scales, std::int64_t n, std::int64_t k,
                          std::int64_t group, bool round_bf16, std::uintptr_t out, int threads) {
  py::gil_scoped_release no_gil;
  cpu::w4a16::dequantize(as_ptr<const std::uint8_t>(qweight), as_ptr<const float>(scales), n, k, group, round_bf16,
                         as_ptr<float>(out), threads);
}

void w4a16_gemm_rows_cpu(std::string_view level, std::uintptr_t x, int x_dtype, std::int64_t m, std::int64_t k,
                         std::int64_t x_stride, std::uintptr_t qweight, std::uintptr_t scales, std::int64_t n,
                         std::int64_t group, std::uintptr_t bias, std::uintptr_t out, std::int64_t out_stride,
                         int threads) {
  cpu::w4a16::RowsArgs args{};
  args.x = as_ptr<const void>(x);
  args.x_dtype = x_dtype;
  args.m = m;
  args.k = k;
  args.x_stride = x_stride;
  args.qweight = as_ptr<const std::uint8_t>(qweight);
  args.scales = as_ptr<const float>(scales);
  args.n = n;
  args.group = group;
  args.bias = as_ptr<const float>(bias);
  args.out = as_ptr<void>(out);
  args.out_stride = out_stride;
  const cpu::SimdLevel simd = kernel_level(level);
  py::gil_scoped_release no_gil;
  cpu::w4a16::gemm_rows(simd, args, threads);
}

void w4a4_gemm_cuda(std::uintptr_t qx, std::uintptr_t ascales, std::int64_t m, std::uintptr_t qw,
                    std::uintptr_t wscales, std::int64_t n, std::int64_t k, std::int64_t group, std::uintptr_t lr,
                    std::uintptr_t up, std::int64_t rank, std::uintptr_t bias, std::uintptr_t out, int dtype,
                    std::int64_t out_stride, std::uintptr_t stream) {
  cuda::w4a4::GemmArgs args{};
  args.qx = as_ptr<const void>(qx);
  args.ascales = as_ptr<const float>(ascales);
  args.m = m;
  args.qw = as_ptr<const void>(qw);
  args.wscales = as_ptr<const void>(wscales);
  args.n = n;
  args.k = k;
  args.group = group;
  args.lr = as_ptr<const float>(lr);
  args.up = as_ptr<const void>(up);
  args.rank = rank;
  args.bias = as_ptr<const void>(bias);
  args.out = as_ptr<void>(out);
  args.dtype = dtype;
  args.out_stride = out_stride;
  args.stream = as_ptr<void>(stream);
  std::string error;
  {
    py::gil_scoped_release no_gil;
    error = cuda::w4a4::gemm(args);
  }
  if (!error.empty()) throw std::runtime_error(error);
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

  m.def("use_openmp_runtime", &diffboost::cpu::use_openmp_runtime, py::arg("path"),
        "Run the CPU kernels' threads on the OpenMP team of the runtime the process has already loaded from "
        "`path` (torch's libgomp), instead of threads of their own. Returns '' on success, otherwise why not "
        "(nothing changes then). Call before any kernel runs.");

  m.def("openmp_runtime", []() -> py::object {
        const auto& omp = diffboost::cpu::openmp_runtime();
        return omp.parallel != nullptr ? py::object(py::str(omp.path)) : py::object(py::none());
      }, "The path of the OpenMP runtime the CPU kernels run on (use_openmp_runtime), or None: threads of their own.");

  m.def("w4a4_quantize_cpu", &diffboost::w4a4_quantize_cpu, py::arg("level"), py::arg("x"), py::arg("x_dtype"),
        py::arg("m"), py::arg("k"), py::arg("x_stride"), py::arg("smooth"), py::arg("down"), py::arg("rank"),
        py::arg("group"), py::arg("qx"), py::arg("ascales"), py::arg("lr"), py::arg("threads"),
        "W4A4 activation pass on the CPU (layout: diffboost.ops.w4a4). Pointers are addresses (0 = absent): x "
        "[m, k] fp32 (x_dtype 0) or bf16 (1) with row stride x_stride; smooth [k] and down [k, rank] fp32; "
        "outputs qx uint8 [m, k/2], ascales fp32 [k/group, m], lr fp32 [m, rank]. level: 'auto' or a SIMD level "
        "name. Runs on `threads` threads without the GIL. ValueError for inconsistent sizes or a level not "
        "compiled in, RuntimeError if this CPU cannot run the level.");

  m.def("w4a4_gemm_cpu", &diffboost::w4a4_gemm_cpu, py::arg("level"), py::arg("qx"), py::arg("ascales"),
        py::arg("m"), py::arg("qw"), py::arg("wscales"), py::arg("n"), py::arg("k"), py::arg("group"),
        py::arg("lr"), py::arg("up"), py::arg("rank"), py::arg("bias"), py::arg("out"), py::arg("out_dtype"),
        py::arg("out_stride"), py::arg("threads"),
        "W4A4 GEMM on the CPU (layout: diffboost.ops.w4a4): out [m, n] (row stride out_stride, fp32 or bf16 per "
        "out_dtype) = sum over groups of qx . qw times ascales * wscales + lr @ up + bias, with wscales "
        "[k/group, n], lr [m, rank], up [rank, n] and bias [n] in fp32 (0 = absent). Errors as w4a4_quantize_cpu.");

  m.def("w4a16_dequantize_cpu", &diffboost::w4a16_dequantize_cpu, py::arg("qweight"), py::arg("scales"), py::arg("n"),
        py::arg("k"), py::arg("group"), py::arg("round_bf16"), py::arg("out"), py::arg("threads"),
        "Dequantize a packed INT4 weight (layout: diffboost.ops.w4a16; qweight uint8 [n, k/2], scales fp32 "
        "[k/group, n]) into out, fp32 [n, k], each value rounded to bf16 if round_bf16. Pointers are addresses. "
        "ValueError for inconsistent sizes.");

  m.def("w4a16_gemm_rows_cpu", &diffboost::w4a16_gemm_rows_cpu, py::arg("level"), py::arg("x"), py::arg("x_dtype"),
        py::arg("m"), py::arg("k"), py::arg("x_stride"), py::arg("qweight"), py::arg("scales"), py::arg("n"),
        py::arg("group"), py::arg("bias"), py::arg("out"), py::arg("out_stride"), py::arg("threads"),
        "W4A16 GEMM for a few rows, the weight dequantized in registers (layout: diffboost.ops.w4a16): out [m, n] "
        "(row stride out_stride) = x @ dequantized(qweight)^T + bias with fp32 sums; x [m, k] fp32 (x_dtype 0) or "
        "bf16 (1) with row stride x_stride, the weight rounded to and out written in x's dtype; scales fp32 "
        "[k/group, n], bias fp32 [n] (0 = absent). level as w4a4_gemm_cpu. Runs on `threads` threads without the "
        "GIL. ValueError for inconsistent sizes, RuntimeError if this CPU cannot run the level.");

  m.def("w4a4_gemm_cuda", &diffboost::w4a4_gemm_cuda, py::arg("qx"), py::arg("ascales"), py::arg("m"),
        py::arg("qw"), py::arg("wscales"), py::arg("n"), py::arg("k"), py::arg("group"), py::arg("lr"),
        py::arg("up"), py::arg("rank"), py::arg("bias"), py::arg("out"), py::arg("dtype"), py::arg("out_stride"),
        py::arg("stream"),
        "W4A4 GEMM on CUDA tensor cores (INT4 mma on sm80-89, INT8 on sm90+), launched on `stream` on the "
        "current device: as w4a4_gemm_cpu, with wscales, up, bias and out all float16 (dtype 0) or bfloat16 (1), "
        "qx and qw 16-byte aligned. RuntimeError if the launch fails or the build has no CUDA kernels.");
}
