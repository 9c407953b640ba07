// The w8a8 linear layer in one call: quantize activations per row, int8 GEMM, scale back.
#include "kernels.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>

// acc[m, n] = x[m] . w[n] for a few rows with VNNI's u8 x s8 dot (vpdpbusd, 64 products an instruction).
// x is signed, so it enters as |x| and its signs move to the weights (w negated where x < 0; weights are
// in [-127, 127], so negation is exact). One weight row at a time, in order: a single sequential stream
// ran at the machine's plain read speed (~28 GB/s), four interleaved rows at ~18.
void int8_gemv_rows(const int8_t* xp, int64_t M, const int8_t* wp, int64_t K, int64_t n0, int64_t n1,
                    int64_t N, int32_t* op) {
  constexpr int64_t kMaxRows = 2, kMaxChunks = 64;   // K up to 4096
  const int64_t chunks = (K + 63) / 64;
  const __mmask64 all = ~(__mmask64)0, tail = (K % 64) ? ((__mmask64)1 << (K % 64)) - 1 : all;
  __m512i ax[kMaxRows][kMaxChunks];
  __mmask64 neg[kMaxRows][kMaxChunks];
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512i v = _mm512_maskz_loadu_epi8(c == chunks - 1 ? tail : all, xp + m * K + c * 64);
      ax[m][c] = _mm512_abs_epi8(v);
      neg[m][c] = _mm512_movepi8_mask(v);
    }
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = wp + n * K;
    __m512i acc[kMaxRows] = {zero, zero};
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512i w = _mm512_maskz_loadu_epi8(c == chunks - 1 ? tail : all, wr + c * 64);
      for (int64_t m = 0; m < M; ++m)
        acc[m] = _mm512_dpbusd_epi32(acc[m], ax[m][c], _mm512_mask_sub_epi8(w, neg[m][c], zero, w));
    }
    for (int64_t m = 0; m < M; ++m) op[m * N + n] = _mm512_reduce_add_epi32(acc[m]);
  }
}
constexpr int64_t kGemvMaxK = 4096;
#else
// acc[m, n] = x[m] . w[n] for a few rows, one weight row at a time (the compiler vectorizes the dot).
void int8_gemv_rows(const int8_t* xp, int64_t M, const int8_t* wp, int64_t K, int64_t n0, int64_t n1,
                    int64_t N, int32_t* op) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = wp + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* xr = xp + m * K;
      int32_t acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += static_cast<int32_t>(xr[k]) * static_cast<int32_t>(wr[k]);
      op[m * N + n] = acc;
    }
  }
}
constexpr int64_t kGemvMaxK = INT64_MAX;
#endif

// acc[m, n] = x[m] . w[n] for a few rows: streams each weight row once. ~28 GB/s at one row here
// against ~14 GB/s for oneDNN's int8 GEMM (576x3072 .. 49152x576); slower than oneDNN from 4 rows on.
torch::Tensor int8_gemv(const torch::Tensor& x, const torch::Tensor& w) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = torch::empty({M, N}, x.options().dtype(torch::kInt));
  const int8_t* xp = x.data_ptr<int8_t>();
  const int8_t* wp = w.data_ptr<int8_t>();
  int32_t* op = out.data_ptr<int32_t>();
  at::parallel_for(0, N, 256, [&](int64_t b, int64_t e) { int8_gemv_rows(xp, M, wp, K, b, e, N, op); });
  return out;
}

constexpr int64_t kGemvMaxRows = 2;

}  // namespace

// y = dequant(quant(x) @ w): x [M, K] float -> int8 per row (scale = absmax / 127), int8 GEMM to int32,
// then y = acc * row_scale * col_scale (+ bias). One call for what is ten small ops in eager PyTorch.
torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor w_t, torch::Tensor col_scales,
                          c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w_t.size(1);
  auto xq = torch::empty({M, K}, x.options().dtype(torch::kChar));
  auto sx = torch::empty({M}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = xq.data_ptr<int8_t>();
  float* sp = sx.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float* row = xp + i * K;
      float m = 0.f;
      for (int64_t j = 0; j < K; ++j) m = std::max(m, std::fabs(row[j]));
      const float scale = std::max(m / 127.f, 1e-12f);
      int8_t* out = qp + i * K;
#pragma omp simd
      for (int64_t j = 0; j < K; ++j) {
        float r = std::nearbyint(row[j] / scale);   // half to even, as torch.round
        out[j] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, r)));
      }
      sp[i] = scale;
    }
  });
  const torch::Tensor w = w_t.t();   // [N, K]
  torch::Tensor acc = (M <= kGemvMaxRows && K <= kGemvMaxK && w.is_contiguous()) ? int8_gemv(xq, w) : at::_int_mm(xq, w_t);
  auto y = torch::empty({M, N}, x.options());
  const int32_t* ap = acc.data_ptr<int32_t>();
  const int64_t lda = acc.stride(0);
  const float* cs = col_scales.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, 4, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float s = sp[i];
      const int32_t* a = ap + i * lda;
      float* o = yp + i * N;
      if (bp) {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) o[j] = static_cast<float>(a[j]) * s * cs[j] + bp[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) o[j] = static_cast<float>(a[j]) * s * cs[j];
      }
    }
  });
  return y;
}
