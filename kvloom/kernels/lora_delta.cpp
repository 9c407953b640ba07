// The low-rank deltas of LoRA adapters over a mixed batch: y[m] += B[s] (A[s] x[m]) for every row m whose
// adapter slot s = slots[m] is >= 0 (the CPU counterpart of Punica's BGMV: each row gathers its own
// adapter's weights).
//
// Row by row in one fixed order of operations, so a row gets the same bits whatever else shares its
// batch: the module path (llama.py) and the decode stack call this same function, as they do the norms.
// The adapter's scaling is already folded into B.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

__attribute__((optimize("fp-contract=off")))
inline float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

}  // namespace

// x [M, in], y [M, out] float (y updated in place); a [S, R, in], b [S, out, R] float, contiguous; slots [M]
// int64 (-1: no adapter).
void lora_add(torch::Tensor x, torch::Tensor y, torch::Tensor a, torch::Tensor b, torch::Tensor slots) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && y.scalar_type() == torch::kFloat && x.dim() == 2 && y.dim() == 2 &&
              x.stride(1) == 1 && y.stride(1) == 1 && x.size(0) == y.size(0), "lora_add: float x [M, in], y [M, out]");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) &&
              a.size(1) == b.size(2) && a.size(2) == x.size(1) && b.size(1) == y.size(1),
              "lora_add: a [S, R, in] and b [S, out, R] matching x and y");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.is_contiguous() && slots.numel() == x.size(0),
              "lora_add: slots int64 [M]");
  const int64_t M = x.size(0), in = x.size(1), out = y.size(1), R = a.size(1), S = a.size(0);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) TORCH_CHECK(sp[m] < S, "lora_add: slot ", sp[m], " of ", S);
  const float *xp = x.data_ptr<float>(), *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t xs = x.stride(0), ys = y.stride(0);
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> t(R);
    for (int64_t m = begin; m < end; ++m) {
      const int64_t s = sp[m];
      if (s < 0) continue;
      const float* xr = xp + m * xs;
      const float* as = ap + s * R * in;
      for (int64_t r = 0; r < R; ++r) t[r] = dot(as + r * in, xr, in);
      const float* bs = bp + s * out * R;
      float* yr = yp + m * ys;
      for (int64_t o = 0; o < out; ++o) yr[o] += dot(bs + o * R, t.data(), R);
    }
  });
}
