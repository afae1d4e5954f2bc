#include "cpu/parallel.h"

#include <dlfcn.h>

namespace diffboost::cpu {
namespace {

OpenMPRuntime& runtime() {
  static OpenMPRuntime r;
  return r;
}

}  // namespace

const OpenMPRuntime& openmp_runtime() { return runtime(); }

std::string use_openmp_runtime(const std::string& path) {
  // RTLD_NOLOAD: only a library the process already runs (torch's); the handle's reference is kept for good.
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (handle == nullptr) return path + " is not loaded in this process";
  OpenMPRuntime r;
  r.parallel = reinterpret_cast<decltype(r.parallel)>(dlsym(handle, "GOMP_parallel"));
  r.thread_num = reinterpret_cast<decltype(r.thread_num)>(dlsym(handle, "omp_get_thread_num"));
  if (r.parallel == nullptr || r.thread_num == nullptr) {
    dlclose(handle);
    return path + " has no GOMP_parallel / omp_get_thread_num";
  }
  r.path = path;
  runtime() = r;
  return "";
}

}  // namespace diffboost::cpu
