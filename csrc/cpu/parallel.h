// A minimal thread pool for the CPU kernels: no dependency on OpenMP or torch.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace diffboost::cpu {

// Runs body(thread_index, begin, end) over [0, n) in chunks of `grain` that
// `threads` threads (the first the calling one) take in order, each as it
// finishes its previous chunk: on a CPU shared with other work, a thread that
// gets less of it takes fewer chunks instead of holding up the call.
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
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(workers - 1));
  for (int64_t t = 1; t < workers; ++t) pool.emplace_back(work, t);
  work(0);
  for (std::thread& thread : pool) thread.join();
}

}  // namespace diffboost::cpu
