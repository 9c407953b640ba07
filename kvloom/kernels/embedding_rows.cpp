// A decode step's embedding lookup in a GGUF's own Q8_0 blocks (kvloom/quant/block_embedding.py), as one call.
//
// The lookup in PyTorch took ~15 small ops (range checks, views, casts, the scale multiply): ~150 us a batch-1
// step of the default model, run on the engine thread alone after the weights' stream had evicted the
// interpreter's caches. Each value is the same float product as that path's, int8 x float(float16 scale).
#include "kernels.h"

#include <ATen/Parallel.h>

#include <c10/util/Half.h>
#include <cstring>

namespace {
constexpr int64_t kQ8Block = 34;   // a float16 scale, then 32 int8 values
}

// table uint8 [V, row_bytes] (rows of Q8_0 blocks), ids int64 [n] -> float [n, row_bytes / 34 * 32].
// An id outside [0, V) raises IndexError.
torch::Tensor q8_0_rows(torch::Tensor table, torch::Tensor ids) {
  TORCH_CHECK(table.dim() == 2 && table.scalar_type() == torch::kByte && table.is_contiguous() &&
              table.size(1) % kQ8Block == 0, "q8_0_rows: contiguous uint8 [rows, blocks x 34]");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == torch::kLong && ids.is_contiguous(), "q8_0_rows: int64 ids [n]");
  const int64_t V = table.size(0), row_bytes = table.size(1), nb = row_bytes / kQ8Block, n = ids.size(0);
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_INDEX(ip[i] >= 0 && ip[i] < V, "token id out of range for an embedding of ", V, " rows");
  auto out = torch::empty({n, nb * 32}, torch::kFloat);
  const uint8_t* tp = table.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* row = tp + ip[i] * row_bytes;
      float* o = op + i * nb * 32;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* block = row + b * kQ8Block;
        uint16_t bits;
        std::memcpy(&bits, block, 2);
        const float scale = c10::detail::fp16_ieee_to_fp32_value(bits);
        const int8_t* q = reinterpret_cast<const int8_t*>(block + 2);
        for (int j = 0; j < 32; ++j) o[b * 32 + j] = static_cast<float>(q[j]) * scale;
      }
    }
  });
  return out;
}
