#include "w4a4/w4a4_cpu.h"

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/checks.h"
#include "cpu/parallel.h"

namespace diffboost::cpu::w4a4 {
namespace {

using QuantizeRows = void (*)(const QuantizeArgs&, int64_t, int64_t, float*);
using PrepareRows = void (*)(const GemmArgs&, int64_t, int64_t, const GemmRows&);
using GemmTile = void (*)(const GemmArgs&, const GemmRows&, int64_t, int64_t, int64_t, int64_t, GemmWorkspace*, bool);

struct Kernels {
  QuantizeRows quantize_rows = nullptr;
  PrepareRows prepare_rows = nullptr;
  GemmTile gemm_tile = nullptr;
};

Kernels kernels_for(SimdLevel level, const char* op) {
  Kernels k;
  switch (level) {
    case SimdLevel::kScalar:
      k = {quantize_rows_scalar, prepare_rows_scalar, gemm_tile_scalar};
      break;
#if DIFFBOOST_HAVE_SIMD_AVX2
    case SimdLevel::kAvx2:
      k = {quantize_rows_avx2, prepare_rows_avx2, gemm_tile_avx2};
      break;
#endif
#if DIFFBOOST_HAVE_SIMD_AVX512_VNNI
    case SimdLevel::kAvx512Vnni:
      k = {quantize_rows_avx512_vnni, prepare_rows_avx512_vnni, gemm_tile_avx512_vnni};
      break;
#endif
    default:
      throw std::invalid_argument(std::string(op) + ": " + simd_level_name(level) +
                                  " kernels are not compiled into this build");
  }
  require_cpu_support(level, op);
  return k;
}

void check_shape(const char* op, int64_t k, int64_t group, int64_t rank) {
  check_group(op, k, group);
  check(rank >= 0 && rank % 16 == 0, op, "rank must be a multiple of 16, got " + std::to_string(rank));
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
  parallel_for(args.m, 4 * kQuantizeRows, threads, [&](int t, int64_t begin, int64_t end) {
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
  const int64_t groups = args.k / args.group;
  // The activations are unpacked once for every column tile that uses them. Left uninitialized (new T[]): every
  // element is written before it is read.
  const std::unique_ptr<int8_t[]> act(new int8_t[static_cast<size_t>(args.m * args.k)]);
  const std::unique_ptr<int32_t[]> acc_start(new int32_t[static_cast<size_t>(args.m * groups)]);
  const std::unique_ptr<float[]> lr(new float[static_cast<size_t>(args.m * args.rank)]);
  const GemmRows rows{act.get(), acc_start.get(), lr.get()};
  parallel_for(args.m, kTileM, threads, [&](int, int64_t begin, int64_t end) {
    kernels.prepare_rows(args, begin, end, rows);
  });
  struct Scratch {
    std::vector<float> tile, wscales, up;
    std::vector<uint8_t> weights;
    int64_t columns = -1;  // the column tile `weights` holds
  };
  std::vector<Scratch> scratch(static_cast<size_t>(std::min(workers, tiles_m * tiles_n)));
  for (Scratch& s : scratch) {
    s.tile.resize(static_cast<size_t>(kTileM * kTileN));
    s.weights.resize(static_cast<size_t>(kTileN * args.k));
    s.wscales.resize(static_cast<size_t>(groups * kTileN));
    s.up.resize(static_cast<size_t>(args.rank * kTileN));
  }
  // Column tiles outer, in chunks of a few row tiles: a thread's consecutive tiles mostly share their columns,
  // whose weights it re-lays out once.
  parallel_for(tiles_m * tiles_n, 4, threads, [&](int t, int64_t begin, int64_t end) {
    Scratch& s = scratch[t];
    GemmWorkspace ws{s.tile.data(), s.weights.data(), s.wscales.data(), s.up.data()};
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t tn = tile / tiles_m, tm = tile % tiles_m;
      const int64_t m0 = tm * kTileM, n0 = tn * kTileN;
      kernels.gemm_tile(args, rows, m0, std::min(args.m, m0 + kTileM), n0, std::min(args.n, n0 + kTileN), &ws,
                        tn != s.columns);
      s.columns = tn;
    }
  });
}

}  // namespace diffboost::cpu::w4a4
