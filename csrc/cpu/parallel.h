// Multithreading for the CPU kernels, without a dependency on torch.
//
// parallel_for runs on the OpenMP thread team of the host process when
// Python has attached torch's OpenMP runtime (use_openmp_runtime), and on
// threads of its own otherwise. The shared team matters on a small machine:
// after each of torch's parallel ops its OpenMP workers keep spinning for a
// while, so threads of our own would share their cores with spinning
// threads (measured on 2 cores: W4A4 layers inside a U-Net took 2.4x as long
// as alone); on the same team, the spinning threads are the ones that pick
// up our work, and no thread is created per call.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

namespace diffboost::cpu {

// Entry points of an OpenMP runtime (libgomp's ABI, which Intel's and LLVM's
// runtimes also export); null when none is attached.
struct OpenMPRuntime {
  void (*parallel)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) = nullptr;
  int (*thread_num)() = nullptr;
  std::string path;
};

// The attached runtime (parallel == nullptr: none).
const OpenMPRuntime& openmp_runtime();

// Attaches the OpenMP runtime that the process has already loaded from
// `path` (it is not loaded if absent). Returns "" on success, otherwise why
// not (the previous state is kept). Not thread-safe: call before any kernel.
std::string use_openmp_runtime(const std::string& path);

// Runs body(thread_index, begin, end) over [0, n) in chunks of `grain` that
// `threads` threads take in order, each as it finishes its previous chunk: on
// a CPU shared with other work, a thread that gets less of it takes fewer
// chunks instead of holding up the call. thread_index < threads.
template <class Body>
void parallel_for(int64_t n, int64_t grain, int threads, const Body& body) {
  const int64_t chunks = (n + grain - 1) / grain;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, chunks));
  std::atomic<int64_t> next{0};
  auto work = [&](int64_t t) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      body(static_cast<int>(t), c * grain, std::min(n, (c + 1) * grain));
    }
  };
  if (workers == 1) {
    work(0);
    return;
  }
  const OpenMPRuntime& omp = openmp_runtime();
  if (omp.parallel != nullptr) {
    using Work = decltype(work);
    struct Team {
      Work* run;
      int (*thread_num)();
    } team{&work, omp.thread_num};
    omp.parallel([](void* p) { const Team* t = static_cast<const Team*>(p); (*t->run)(t->thread_num()); }, &team,
                 static_cast<unsigned>(workers), 0);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(workers - 1));
  for (int64_t t = 1; t < workers; ++t) pool.emplace_back(work, t);
  work(0);
  for (std::thread& thread : pool) thread.join();
}

}  // namespace diffboost::cpu
