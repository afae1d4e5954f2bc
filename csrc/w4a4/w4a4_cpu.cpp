#include "w4a4/w4a4_cpu.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace diffboost::cpu::w4a4 {
namespace {

using QuantizeRows = void (*)(const QuantizeArgs&, int64_t, int64_t, float*);
using GemmTile = void (*)(const GemmArgs&, int64_t, int64_t, int64_t, int64_t, GemmWorkspace*, bool, bool);

struct Kernels {
  QuantizeRows quantize_rows = nullptr;
  GemmTile gemm_tile = nullptr;
};

Kernels kernels_for(SimdLevel level, const char* op) {
  Kernels k;
  switch (level) {
    case SimdLevel::kScalar:
      k = {quantize_rows_scalar, gemm_tile_scalar};
      break;
#if DIFFBOOST_HAVE_SIMD_AVX2
    case SimdLevel::kAvx2:
      k = {quantize_rows_avx2, gemm_tile_avx2};
      break;
#endif
#if DIFFBOOST_HAVE_SIMD_AVX512_VNNI
    case SimdLevel::kAvx512Vnni:
      k = {quantize_rows_avx512_vnni, gemm_tile_avx512_vnni};
      break;
#endif
    default:
      throw std::invalid_argument(std::string(op) + ": " + simd_level_name(level) +
                                  " kernels are not compiled into this build");
  }
  // Calling the level's code on a CPU without it would die with SIGILL.
  if (!cpu_supports(level)) {
    throw std::runtime_error(std::string(op) + ": this CPU does not support " + simd_level_name(level));
  }
  return k;
}

void check(bool ok, const char* op, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string(op) + ": " + what);
}

void check_shape(const char* op, int64_t k, int64_t group, int64_t rank) {
  check(group == 32 || group == 64 || group == 128, op, "group must be 32, 64 or 128, got " + std::to_string(group));
  check(k > 0 && k % group == 0, op, "k=" + std::to_string(k) + " must be a positive multiple of the group");
  check(rank >= 0 && rank % 16 == 0, op, "rank must be a multiple of 16, got " + std::to_string(rank));
}

// Runs body(thread_index, begin, end) over [0, n) split into `threads` ranges
// of whole `grain`s, the first on the calling thread.
template <class Body>
void parallel_for(int64_t n, int64_t grain, int threads, const Body& body) {
  const int64_t units = (n + grain - 1) / grain;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, units));
  auto range = [&](int64_t t) {
    const int64_t begin = std::min(n, units * t / workers * grain);
    const int64_t end = std::min(n, units * (t + 1) / workers * grain);
    body(static_cast<int>(t), begin, end);
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(workers - 1));
  for (int64_t t = 1; t < workers; ++t) pool.emplace_back(range, t);
  range(0);
  for (std::thread& thread : pool) thread.join();
}

}  // namespace

void quantize(SimdLevel level, QuantizeArgs args, const float* smooth, int threads) {
  const char* op = "w4a4_quantize_cpu";
  const Kernels kernels = kernels_for(level, op);
  check_shape(op, args.k, args.group, args.rank);
  check(args.m >= 0 && args.x_stride >= args.k, op, "need m >= 0 and x_stride >= k");
  check(args.x_dtype == kFloat32 || args.x_dtype == kBFloat16, op, "x_dtype must be 0 (fp32) or 1 (bf16)");
  if (args.m == 0) return;  // empty tensors may have null data pointers
  check(args.rank == 0 || (args.down != nullptr && args.lr != nullptr), op, "rank > 0 needs down and lr");
  std::vector<float> inverse;
  if (smooth != nullptr) {
    inverse.resize(static_cast<size_t>(args.k));
    for (int64_t c = 0; c < args.k; ++c) inverse[c] = 1.0f / smooth[c];  // IEEE division: same bits as torch
    args.smooth_inv = inverse.data();
  } else {
    args.smooth_inv = nullptr;
  }
  const int64_t workers = std::max(1, threads);
  std::vector<std::vector<float>> scratch(static_cast<size_t>(workers),
                                          std::vector<float>(static_cast<size_t>(kQuantizeRows * args.k)));
  parallel_for(args.m, kQuantizeRows, threads, [&](int t, int64_t begin, int64_t end) {
    kernels.quantize_rows(args, begin, end, scratch[t].data());
  });
}

void gemm(SimdLevel level, const GemmArgs& args, int threads) {
  const char* op = "w4a4_gemm_cpu";
  const Kernels kernels = kernels_for(level, op);
  check_shape(op, args.k, args.group, args.rank);
  check(args.m >= 0 && args.n >= 0 && args.out_stride >= args.n, op, "need m, n >= 0 and out_stride >= n");
  check(args.out_dtype == kFloat32 || args.out_dtype == kBFloat16, op, "out_dtype must be 0 (fp32) or 1 (bf16)");
  if (args.m == 0 || args.n == 0) return;  // empty tensors may have null data pointers
  check(args.rank == 0 || (args.lr != nullptr && args.up != nullptr), op, "rank > 0 needs lr and up");
  const int64_t tiles_m = (args.m + kTileM - 1) / kTileM;
  const int64_t tiles_n = (args.n + kTileN - 1) / kTileN;
  const int64_t workers = std::max(1, threads);
  struct Scratch {
    std::vector<int8_t> act;
    std::vector<int32_t> act_sums;
    std::vector<float> lr, tile, wscales;
    std::vector<uint8_t> weights;
  };
  const int64_t groups = args.k / args.group;
  std::vector<Scratch> scratch(static_cast<size_t>(std::min(workers, tiles_m * tiles_n)));
  for (Scratch& s : scratch) {
    s.act.resize(static_cast<size_t>(kTileM * args.k));
    s.act_sums.resize(static_cast<size_t>(kTileM * groups));
    s.lr.resize(static_cast<size_t>(kTileM * args.rank));
    s.tile.resize(static_cast<size_t>(kTileM * kTileN));
    s.weights.resize(static_cast<size_t>(kTileN * args.k / 2));
    s.wscales.resize(static_cast<size_t>(groups * kTileN));
  }
  // Column tiles outer: a thread's consecutive tiles share their columns, whose weights it re-lays out once.
  parallel_for(tiles_m * tiles_n, 1, threads, [&](int t, int64_t begin, int64_t end) {
    Scratch& s = scratch[t];
    GemmWorkspace ws{s.act.data(), s.act_sums.data(), s.lr.data(), s.tile.data(), s.weights.data(),
                     s.wscales.data()};
    int64_t rows_done = -1, columns_done = -1;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t tn = tile / tiles_m, tm = tile % tiles_m;
      const int64_t m0 = tm * kTileM, n0 = tn * kTileN;
      kernels.gemm_tile(args, m0, std::min(args.m, m0 + kTileM), n0, std::min(args.n, n0 + kTileN), &ws,
                        tm != rows_done, tn != columns_done);
      rows_done = tm;
      columns_done = tn;
    }
  });
}

}  // namespace diffboost::cpu::w4a4
