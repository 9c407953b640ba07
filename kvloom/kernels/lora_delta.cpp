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

// d += t * b, element by element (no sum across elements: vectorizes without reordering anything)
__attribute__((optimize("fp-contract=off")))
inline void axpy(float t, const float* b, float* d, int64_t n) {
  if (t == 0.f) return;   // a padded rank or an untargeted part (t is exactly 0): nothing to add
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] += t * b[i];
}

}  // namespace

// x [M, in], y [M, out] float (y updated in place); a [S, R, in], b_t [S, R, out] (B transposed) float,
// contiguous; slots [M] int64 (-1: no adapter); spans [R, 2] int64: the outputs each rank row can touch (a fused
// linear's part: q's rows only q's outputs), the rest of its row being zeros never read.
void lora_add(torch::Tensor x, torch::Tensor y, torch::Tensor a, torch::Tensor b_t, torch::Tensor slots,
              torch::Tensor spans) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && y.scalar_type() == torch::kFloat && x.dim() == 2 && y.dim() == 2 &&
              x.stride(1) == 1 && y.stride(1) == 1 && x.size(0) == y.size(0), "lora_add: float x [M, in], y [M, out]");
  TORCH_CHECK(a.is_contiguous() && b_t.is_contiguous() && a.dim() == 3 && b_t.dim() == 3 && a.size(0) == b_t.size(0) &&
              a.size(1) == b_t.size(1) && a.size(2) == x.size(1) && b_t.size(2) == y.size(1),
              "lora_add: a [S, R, in] and b_t [S, R, out] matching x and y");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.is_contiguous() && slots.numel() == x.size(0),
              "lora_add: slots int64 [M]");
  TORCH_CHECK(spans.scalar_type() == torch::kLong && spans.is_contiguous() && spans.numel() == 2 * a.size(1),
              "lora_add: spans int64 [R, 2]");
  const int64_t M = x.size(0), in = x.size(1), out = y.size(1), R = a.size(1), S = a.size(0);
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* span = spans.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) TORCH_CHECK(sp[m] < S, "lora_add: slot ", sp[m], " of ", S);
  const float *xp = x.data_ptr<float>(), *ap = a.data_ptr<float>(), *bp = b_t.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t xs = x.stride(0), ys = y.stride(0);
  // Each output element is computed the same way whichever thread computes it and whatever else it computes,
  // so splitting the work differently (across rows, or within one row) never changes a bit.
  auto row_part = [&](int64_t m, float* t, int64_t r0, int64_t r1) {      // t[r] for r in [r0, r1)
    const float* as = ap + sp[m] * R * in;
    for (int64_t r = r0; r < r1; ++r) t[r] = dot(as + r * in, xp + m * xs, in);
  };
  auto out_part = [&](int64_t m, const float* t, int64_t o0, int64_t o1) {  // y[o] for o in [o0, o1)
    // d = B t as R scaled rows of B^T summed in order r = 0, 1, ...: vectorized across the outputs (a dot of
    // length R per output would spend its time reducing).
    const float* bs = bp + sp[m] * R * out;
    std::vector<float> d(o1 - o0, 0.f);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t lo = std::max(o0, span[2 * r]), hi = std::min(o1, span[2 * r + 1]);
      if (lo < hi) axpy(t[r], bs + r * out + lo, d.data() + (lo - o0), hi - lo);
    }
    float* yr = yp + m * ys;
#pragma omp simd
    for (int64_t o = o0; o < o1; ++o) yr[o] += d[o - o0];
  };
  if (M == 1) {   // one row (batch-1 decode): its outputs split across the threads
    if (sp[0] < 0) return;
    std::vector<float> t(R);
    at::parallel_for(0, R, 8, [&](int64_t b, int64_t e) { row_part(0, t.data(), b, e); });
    at::parallel_for(0, out, 256, [&](int64_t b, int64_t e) { out_part(0, t.data(), b, e); });
    return;
  }
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> t(R);
    for (int64_t m = begin; m < end; ++m) {
      if (sp[m] < 0) continue;
      row_part(m, t.data(), 0, R);
      out_part(m, t.data(), 0, out);
    }
  });
}
