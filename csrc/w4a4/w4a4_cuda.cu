// W4A4 GEMM on tensor cores: packed INT4 activations x packed INT4 weights.
//
// out = sum_g (qx_g . qw_g) * ascale_g * wscale_g + round(lr) @ up + bias
// (python/diffboost/ops/w4a4.py specifies the layout and the arithmetic).
//
// Structure. A 256-thread block computes a 128 x 128 output tile; its 8 warps
// each own 64 x 32 (4 x 4 MMA tiles of 16 x 8). K is walked one scale group at
// a time: the group's packed operand tiles (128 rows x G/2 bytes each) arrive in
// shared memory through a 3-stage cp.async pipeline (each thread's copy
// addresses worked out once per block, StageCopy), every warp runs the
// group's MMAs into INT32 accumulators, then adds them into fp32 accumulators
// scaled by ascale[row] * wscale[col] -- once per group, outside the MMA loop.
// The INT32 -> fp32 conversion uses a bias trick (integer add + float
// subtract, both full rate; exact because a group's dot is below 2^22)
// instead of the quarter-rate I2F. The epilogue adds the low-rank branch on
// 16-bit tensor cores (lr rounded to the output dtype, fp32 accumulation, the
// same accumulator layout as the integer MMAs) and the bias.
//
// MMAs. sm80/86/89: mma.sync m16n8k64 (m16n8k32 for G = 32) on s4 operands.
// A packed 32-bit word of 4 consecutive bytes holds 8 consecutive channels in
// nibble order, which is exactly the s4 fragment register layout, so fragments
// are plain 32-bit shared-memory loads. sm90 has no INT4 tensor-core path: the
// nibbles are moved to the high halves of bytes in registers (low nibbles ->
// one register, high nibbles -> another; a byte then holds 16x its nibble,
// no sign extension needed) and fed to mma.sync m16n8k32 s8. That assigns the
// 32 channels of a step to the MMA's k slots in a permuted order, the same
// permutation for both operands, which a dot product does not see; the 256x
// is divided out exactly in the conversion to fp32.
// Only mma.sync is used (valid on every compiled arch), so no code needs the
// 90a-only guard (__CUDA_ARCH_FEAT_SM90_ALL).
//
// Shared-memory rows are padded (G/2 + 16 bytes, 48 for G = 32) so the 8 rows x
// 4 consecutive words a warp reads per fragment fall in distinct banks.
//
// Compiled with nvcc 13.0 (cuobjdump), the main loop per warp and 64-channel
// group is 408 instructions on sm_89 and 536 on sm_90 (711 and 985 when the
// copies recomputed their addresses per group and sm_90 sign-extended nibbles).
#include "w4a4/w4a4_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

namespace diffboost::cuda::w4a4 {
namespace {

constexpr int kBM = 128;
constexpr int kBN = 128;
constexpr int kThreads = 256;
constexpr int kStages = 3;
constexpr int kWarpM = 64;  // warps are laid out 2 (rows) x 4 (columns)
constexpr int kWarpN = 32;
constexpr int kMT = kWarpM / 16;
constexpr int kNT = kWarpN / 8;

template <int G>
struct Tile {
  static constexpr int kStride = G == 32 ? 48 : G / 2 + 16;
  static constexpr int kOperandBytes = kBM * kStride;  // kBM == kBN
  static constexpr int kStageBytes = 2 * kOperandBytes;
  static constexpr int kSharedBytes = kStages * kStageBytes;
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(gmem));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// The INT8 path's operands: each nibble moved to the high half of its byte, where the signed byte is 16x the
// nibble (two's complement), so no sign extension is needed. Both operands carry the 16, so an MMA's INT32 result
// is 256x the group's dot product, which group_dot_to_float divides out exactly.
__device__ __forceinline__ std::uint32_t low_nibbles_x16(std::uint32_t v) { return (v << 4) & 0xF0F0F0F0u; }
__device__ __forceinline__ std::uint32_t high_nibbles_x16(std::uint32_t v) { return v & 0xF0F0F0F0u; }
#endif

__device__ __forceinline__ std::uint32_t load_u32(const std::uint8_t* p) {
  return *reinterpret_cast<const std::uint32_t*>(p);
}

// A group's INT32 dot product as fp32, exactly, by an integer add and a float subtract (|v| < 2^22): v placed in
// the mantissa of 1.5 * 2^23, whose last place is 1. On the INT8 path v is 256x the dot, so the mantissa of
// 1.5 * 2^15 (last place 2^-8) divides it out.
__device__ __forceinline__ float group_dot_to_float(int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return __int_as_float(v + 0x47400000) - 49152.0f;
#else
  return __int_as_float(v + 0x4B400000) - 12582912.0f;
#endif
}

template <class T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// Two floats rounded to T (nearest even) in one 32-bit register, the first in the low half.
template <class T>
__device__ __forceinline__ std::uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ std::uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&v);
}
template <>
__device__ __forceinline__ std::uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&v);
}

template <class T>
__device__ __forceinline__ std::uint32_t pack2_raw(T lo, T hi) {
  const std::uint16_t l = *reinterpret_cast<const std::uint16_t*>(&lo);
  const std::uint16_t h = *reinterpret_cast<const std::uint16_t*>(&hi);
  return static_cast<std::uint32_t>(l) | (static_cast<std::uint32_t>(h) << 16);
}

// acc += A (16 x K) . B (K x 8); fragment layouts as in the PTX ISA.
template <int K>
__device__ __forceinline__ void mma_int(int (&acc)[4], const std::uint32_t* a, const std::uint32_t* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  static_assert(K == 32, "sm90 path: s8 m16n8k32");
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(acc[0]), "+r"(acc[1]), "+r"(acc[2]), "+r"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(__CUDA_ARCH__)
  if constexpr (K == 64) {
    asm volatile(
        "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(acc[0]), "+r"(acc[1]), "+r"(acc[2]), "+r"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
        : "+r"(acc[0]), "+r"(acc[1]), "+r"(acc[2]), "+r"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(b[0]));
  }
#endif
}

template <class T>
__device__ __forceinline__ void mma_16bit(float (&acc)[4], const std::uint32_t (&a)[4], const std::uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// This thread's share of copying one group's operand tiles (A rows [m0, m0 + kBM), B rows [n0, n0 + kBN)) into a
// pipeline stage, worked out once per block: per group only the source offset changes, so the loop issues its
// cp.async with no address arithmetic beyond one add (the per-group recomputation of rows, clamps and 64-bit
// products was a third of the sm_89 main loop). Rows past the matrix read its last row (results for them are never
// stored), so every copy is in bounds and unconditional.
template <int G>
struct StageCopy {
  static constexpr int kChunks = G / 32;  // 16-byte chunks per row
  static constexpr int kTotal = kBM * kChunks;  // per operand (kBM == kBN)
  static constexpr int kPerThread = (kTotal + kThreads - 1) / kThreads;
  const std::uint8_t* a[kPerThread];
  const std::uint8_t* b[kPerThread];
  int dst[kPerThread];

  __device__ __forceinline__ StageCopy(const std::uint8_t* qx, const std::uint8_t* qw, int m0, int n0, int m, int n,
                                       std::int64_t half_k) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int c = min(static_cast<int>(threadIdx.x) + i * kThreads, kTotal - 1);
      const int r = c / kChunks, chunk = c % kChunks;
      a[i] = qx + min(m0 + r, m - 1) * half_k + chunk * 16;
      b[i] = qw + min(n0 + r, n - 1) * half_k + chunk * 16;
      dst[i] = r * Tile<G>::kStride + chunk * 16;
    }
  }

  __device__ __forceinline__ void load(std::uint8_t* stage, int g) const {
    const std::int64_t offset = static_cast<std::int64_t>(g) * (G / 2);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      if (kTotal % kThreads == 0 || static_cast<int>(threadIdx.x) + i * kThreads < kTotal) {
        cp_async16(stage + dst[i], a[i] + offset);
        cp_async16(stage + Tile<G>::kOperandBytes + dst[i], b[i] + offset);
      }
    }
  }
};

// The MMAs of one group on a resident stage.
template <int G>
__device__ __forceinline__ void group_mmas(const std::uint8_t* stage, int wm, int wn, int gid, int tig,
                                           int (&acc)[kMT][kNT][4]) {
  using Layout = Tile<G>;
  constexpr int S = Layout::kStride;
  const std::uint8_t* a_tile = stage;
  const std::uint8_t* b_tile = stage + Layout::kOperandBytes;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // INT8 path: a k32 step covers 16 packed bytes per row; thread tig owns bytes [4 tig, 4 tig + 4).
#pragma unroll
  for (int step = 0; step < G / 32; ++step) {
    std::uint32_t a[kMT][4], b[kNT][2];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      const std::uint8_t* p = a_tile + (wm + mt * 16 + gid) * S + step * 16 + tig * 4;
      const std::uint32_t top = load_u32(p), bottom = load_u32(p + 8 * S);
      a[mt][0] = low_nibbles_x16(top);
      a[mt][1] = low_nibbles_x16(bottom);
      a[mt][2] = high_nibbles_x16(top);
      a[mt][3] = high_nibbles_x16(bottom);
    }
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      const std::uint32_t w = load_u32(b_tile + (wn + nt * 8 + gid) * S + step * 16 + tig * 4);
      b[nt][0] = low_nibbles_x16(w);
      b[nt][1] = high_nibbles_x16(w);
    }
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) mma_int<32>(acc[mt][nt], a[mt], b[nt]);
  }
#else
  // INT4 path: a k64 step covers 32 packed bytes per row (k32 and 16 bytes for G = 32).
  constexpr int kStep = G >= 64 ? 64 : 32;
#pragma unroll
  for (int step = 0; step < G / kStep; ++step) {
    std::uint32_t a[kMT][4], b[kNT][2];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      const std::uint8_t* p = a_tile + (wm + mt * 16 + gid) * S + step * (kStep / 2) + tig * 4;
      a[mt][0] = load_u32(p);
      a[mt][1] = load_u32(p + 8 * S);
      if constexpr (kStep == 64) {
        a[mt][2] = load_u32(p + 16);
        a[mt][3] = load_u32(p + 8 * S + 16);
      }
    }
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      const std::uint8_t* p = b_tile + (wn + nt * 8 + gid) * S + step * (kStep / 2) + tig * 4;
      b[nt][0] = load_u32(p);
      if constexpr (kStep == 64) b[nt][1] = load_u32(p + 16);
    }
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) mma_int<kStep>(acc[mt][nt], a[mt], b[nt]);
  }
#endif
}

template <class T, int G>
__global__ void __launch_bounds__(kThreads) w4a4_gemm_kernel(GemmArgs args) {
  extern __shared__ __align__(16) std::uint8_t shared[];
  using Layout = Tile<G>;
  const int m = static_cast<int>(args.m), n = static_cast<int>(args.n);
  const std::int64_t half_k = args.k / 2;
  const int groups = static_cast<int>(args.k / G);
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gid = lane >> 2, tig = lane & 3;
  const int wm = (warp / 4) * kWarpM, wn = (warp % 4) * kWarpN;
  const auto* qx = static_cast<const std::uint8_t*>(args.qx);
  const auto* qw = static_cast<const std::uint8_t*>(args.qw);
  const auto* wscales = static_cast<const T*>(args.wscales);

  // This thread's rows (2 per MMA tile) and columns (2 per MMA tile), clamped for the scale loads.
  int rows[kMT][2], cols[kNT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) rows[mt][h] = min(m0 + wm + mt * 16 + gid + 8 * h, m - 1);
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h) cols[nt][h] = min(n0 + wn + nt * 8 + tig * 2 + h, n - 1);

  float out[kMT][kNT][4];
  int acc[kMT][kNT][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) out[mt][nt][e] = 0.0f, acc[mt][nt][e] = 0;

  const StageCopy<G> copy(qx, qw, m0, n0, m, n, half_k);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < groups) copy.load(shared + s * Layout::kStageBytes, s);
    cp_async_commit();
  }
  // Scales are read straight from global memory (L2), one group ahead of their use.
  float a_scale[kMT][2], w_scale[kNT][2];
  auto load_scales = [&](int g) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) a_scale[mt][h] = args.ascales[static_cast<std::int64_t>(g) * m + rows[mt][h]];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) w_scale[nt][h] = to_float(wscales[static_cast<std::int64_t>(g) * n + cols[nt][h]]);
  };
  load_scales(0);

  for (int g = 0; g < groups; ++g) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = g + kStages - 1;
    if (next < groups) {
      copy.load(shared + (next % kStages) * Layout::kStageBytes, next);
    }
    cp_async_commit();
    group_mmas<G>(shared + (g % kStages) * Layout::kStageBytes, wm, wn, gid, tig, acc);
    float as_now[kMT][2], ws_now[kNT][2];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) as_now[mt][0] = a_scale[mt][0], as_now[mt][1] = a_scale[mt][1];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) ws_now[nt][0] = w_scale[nt][0], ws_now[nt][1] = w_scale[nt][1];
    if (g + 1 < groups) load_scales(g + 1);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float scale = as_now[mt][e >> 1] * ws_now[nt][e & 1];
          out[mt][nt][e] = fmaf(group_dot_to_float(acc[mt][nt][e]), scale, out[mt][nt][e]);
          acc[mt][nt][e] = 0;
        }
  }
  cp_async_wait<0>();

  // Low-rank branch: round(lr) @ up on 16-bit tensor cores, k16 steps.
  const auto* up = static_cast<const T*>(args.up);
  for (int k0 = 0; k0 < args.rank; k0 += 16) {
    std::uint32_t a[kMT][4], b[kNT][2];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float* lr = args.lr + static_cast<std::int64_t>(rows[mt][h]) * args.rank + k0 + tig * 2;
        a[mt][h] = pack2<T>(lr[0], lr[1]);
        a[mt][h + 2] = pack2<T>(lr[8], lr[9]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      const int col = min(n0 + wn + nt * 8 + gid, n - 1);
      const T* u = up + static_cast<std::int64_t>(k0 + tig * 2) * n + col;
      b[nt][0] = pack2_raw<T>(u[0], u[n]);
      b[nt][1] = pack2_raw<T>(u[8 * static_cast<std::int64_t>(n)], u[9 * static_cast<std::int64_t>(n)]);
    }
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) mma_16bit<T>(out[mt][nt], a[mt], b[nt]);
  }

  const auto* bias = static_cast<const T*>(args.bias);
  auto* result = static_cast<T*>(args.out);
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + wm + mt * 16 + gid + 8 * h;
      if (row >= m) continue;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        const int col = n0 + wn + nt * 8 + tig * 2;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (col + e >= n) continue;
          float v = out[mt][nt][2 * h + e];
          if (bias != nullptr) v += to_float(bias[col + e]);
          if constexpr (std::is_same_v<T, __half>) {
            result[static_cast<std::int64_t>(row) * args.out_stride + col + e] = __float2half_rn(v);
          } else {
            result[static_cast<std::int64_t>(row) * args.out_stride + col + e] = __float2bfloat16_rn(v);
          }
        }
      }
    }
}

template <class T, int G>
std::string launch(const GemmArgs& args) {
  auto kernel = w4a4_gemm_kernel<T, G>;
  constexpr int bytes = Tile<G>::kSharedBytes;
  if (bytes > 48 * 1024) {
    // Above 48 KiB of dynamic shared memory a kernel must opt in (sm80+ allow up to 163 KiB or more).
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err != cudaSuccess) return std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(err);
  }
  const dim3 grid(static_cast<unsigned>((args.n + kBN - 1) / kBN), static_cast<unsigned>((args.m + kBM - 1) / kBM));
  kernel<<<grid, kThreads, bytes, static_cast<cudaStream_t>(args.stream)>>>(args);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string("w4a4 gemm launch: ") + cudaGetErrorString(err);
}

template <class T>
std::string launch_for_group(const GemmArgs& args) {
  switch (args.group) {
    case 32: return launch<T, 32>(args);
    case 64: return launch<T, 64>(args);
    case 128: return launch<T, 128>(args);
    default: return "w4a4 gemm: group must be 32, 64 or 128, got " + std::to_string(args.group);
  }
}

}  // namespace

std::string gemm(const GemmArgs& args) {
  if (args.m <= 0 || args.n <= 0) return {};
  if (args.group <= 0 || args.k <= 0 || args.k % args.group != 0) {
    return "w4a4 gemm: k must be a positive multiple of the group";
  }
  if (args.m > (1 << 30) || args.n > (1 << 30)) return "w4a4 gemm: m and n must be below 2^30";
  if (args.rank % 16 != 0 || (args.rank > 0 && (args.lr == nullptr || args.up == nullptr))) {
    return "w4a4 gemm: rank must be a multiple of 16, with lr and up";
  }
  if ((reinterpret_cast<std::uintptr_t>(args.qx) | reinterpret_cast<std::uintptr_t>(args.qw)) % 16 != 0) {
    return "w4a4 gemm: qx and qw must be 16-byte aligned";
  }
  switch (args.dtype) {
    case kFloat16: return launch_for_group<__half>(args);
    case kBFloat16: return launch_for_group<__nv_bfloat16>(args);
    default: return "w4a4 gemm: dtype must be 0 (float16) or 1 (bfloat16)";
  }
}

}  // namespace diffboost::cuda::w4a4
