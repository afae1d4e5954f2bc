#include "w4a16/w4a16_cpu.h"

#include <stdexcept>
#include <string>

#include "cpu/parallel.h"

namespace diffboost::cpu::w4a16 {

void dequantize(const std::uint8_t* qweight, const float* scales, std::int64_t n, std::int64_t k, std::int64_t group,
                std::int64_t row_begin, std::int64_t row_end, float* out, int threads) {
  const auto fail = [](const std::string& what) { throw std::invalid_argument("w4a16_dequantize_cpu: " + what); };
  if (group != 32 && group != 64 && group != 128) fail("group must be 32, 64 or 128, got " + std::to_string(group));
  if (k <= 0 || k % group != 0) fail("k=" + std::to_string(k) + " must be a positive multiple of the group");
  if (row_begin < 0 || row_begin > row_end || row_end > n) fail("need 0 <= row_begin <= row_end <= n");
  if (row_begin == row_end) return;
  const std::int64_t groups = k / group;
  // Rows in chunks of 8: each one is k / 2 bytes in and 4 k bytes out, a plain streaming loop the compiler
  // vectorizes (the nibbles are sign-extended with arithmetic shifts on int8, as in the other kernels).
  parallel_for(row_end - row_begin, 8, threads, [&](int, std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) {
      const std::int64_t row = row_begin + i;
      const std::uint8_t* packed = qweight + row * (k / 2);
      float* dst = out + i * k;
      for (std::int64_t g = 0; g < groups; ++g) {
        const float scale = scales[g * n + row];
        const std::uint8_t* q = packed + g * (group / 2);
        float* d = dst + g * group;
        for (std::int64_t j = 0; j < group / 2; ++j) {
          const auto byte = static_cast<std::int8_t>(q[j]);
          d[2 * j] = static_cast<float>(static_cast<std::int8_t>(byte << 4) >> 4) * scale;
          d[2 * j + 1] = static_cast<float>(byte >> 4) * scale;
        }
      }
    }
  });
}

}  // namespace diffboost::cpu::w4a16
