// The w8a8 linear layer in one call: quantize activations per row, int8 GEMM, scale back.
#include "kernels.h"
#include "int_sum.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <string>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// v[j] holds 16 partial sums of row j; returns the 16 totals, row j in lane j (a transpose-and-add tree:
// 45 shuffles and adds for 16 rows, where 16 separate horizontal sums take ~160).
inline __m512i sum_each(const __m512i* v) {
  __m512i a[8], b[4], c[2];
  for (int j = 0; j < 8; ++j)
    a[j] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_epi32(v[2 * j], v[2 * j + 1]));
  for (int j = 0; j < 4; ++j)
    b[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(a[2 * j], a[2 * j + 1]), _mm512_unpackhi_epi64(a[2 * j], a[2 * j + 1]));
  for (int j = 0; j < 2; ++j)
    c[j] = _mm512_add_epi32(_mm512_shuffle_i32x4(b[2 * j], b[2 * j + 1], 0x88),
                            _mm512_shuffle_i32x4(b[2 * j], b[2 * j + 1], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(c[0], c[1], 0x88), _mm512_shuffle_i32x4(c[0], c[1], 0xDD));
}

// acc[m, n] = x[m] . w[n] for a few rows with VNNI's u8 x s8 dot (vpdpbusd, 64 products an instruction).
// x is signed, so it enters shifted to x + 128 (unsigned) and the shift comes back out as 128 * sum(w),
// the row sum being one more vpdpbusd against ones. One weight row at a time, in order: a single
// sequential stream ran at the machine's plain read speed (~28 GB/s), four interleaved rows at ~18.
// M is a template argument so that the accumulators live in registers; sixteen rows' accumulators
// are folded together at once.
template <int M>
void gemv_rows(const int8_t* xp, const int8_t* wp, int64_t K, int64_t n0, int64_t n1, int64_t N, int32_t* op) {
  constexpr int64_t kMaxChunks = 64;   // K up to 4096
  const int64_t chunks = (K + 63) / 64;
  const __mmask64 all = ~(__mmask64)0, tail = (K % 64) ? ((__mmask64)1 << (K % 64)) - 1 : all;
  const __m512i shift = _mm512_set1_epi8(static_cast<char>(128)), ones = _mm512_set1_epi8(1);
  const __m512i zero = _mm512_setzero_si512();
  __m512i xu[M][kMaxChunks];
  for (int m = 0; m < M; ++m)
    for (int64_t c = 0; c < chunks; ++c)   // the tail's padding stays 0 after the shift, as the weights' do
      xu[m][c] = _mm512_maskz_add_epi8(c == chunks - 1 ? tail : all,
                                       _mm512_maskz_loadu_epi8(c == chunks - 1 ? tail : all, xp + m * K + c * 64), shift);
  __m512i part[M + 1][16];   // [0]: row sums; [1 + m]: x[m]'s dot products
  for (int64_t n = n0; n < n1; n += 16) {
    const int64_t cnt = std::min<int64_t>(16, n1 - n);
    for (int64_t j = 0; j < 16; ++j) {
      __m512i acc[M], sum = zero;
      for (int m = 0; m < M; ++m) acc[m] = zero;
      if (j < cnt) {
        const int8_t* wr = wp + (n + j) * K;
        for (int64_t c = 0; c < chunks; ++c) {
          const __m512i w = _mm512_maskz_loadu_epi8(c == chunks - 1 ? tail : all, wr + c * 64);
          sum = _mm512_dpbusd_epi32(sum, ones, w);
          for (int m = 0; m < M; ++m) acc[m] = _mm512_dpbusd_epi32(acc[m], xu[m][c], w);
        }
      }
      part[0][j] = sum;
      for (int m = 0; m < M; ++m) part[1 + m][j] = acc[m];
    }
    const __mmask16 store = (__mmask16)((1u << cnt) - 1);
    const __m512i correction = _mm512_slli_epi32(sum_each(part[0]), 7);   // 128 * row sum
    for (int m = 0; m < M; ++m)
      _mm512_mask_storeu_epi32(op + m * N + n, store, _mm512_sub_epi32(sum_each(part[1 + m]), correction));
  }
}

void int8_gemv_rows(const int8_t* xp, int64_t M, const int8_t* wp, int64_t K, int64_t n0, int64_t n1,
                    int64_t N, int32_t* op) {
  switch (M) {
    case 1: return gemv_rows<1>(xp, wp, K, n0, n1, N, op);
    case 2: return gemv_rows<2>(xp, wp, K, n0, n1, N, op);
    case 3: return gemv_rows<3>(xp, wp, K, n0, n1, N, op);
    case 4: return gemv_rows<4>(xp, wp, K, n0, n1, N, op);
    case 5: return gemv_rows<5>(xp, wp, K, n0, n1, N, op);
    case 6: return gemv_rows<6>(xp, wp, K, n0, n1, N, op);
    case 7: return gemv_rows<7>(xp, wp, K, n0, n1, N, op);
    case 8: return gemv_rows<8>(xp, wp, K, n0, n1, N, op);
    default:
      for (int64_t m = 0; m < M; m += 8) int8_gemv_rows(xp + m * K, std::min<int64_t>(8, M - m), wp, K, n0, n1, N, op + m * N);
  }
}
constexpr int64_t kGemvMaxK = 4096;
#endif

#if defined(__AVX2__)
// The int8 product without VNNI (AVX2 machines), any number of rows: the GEMV of a decode step and the GEMM
// of a prefill are the same loop. llama.cpp's sign trick: x . w = |w| . (x with w's sign), so vpmaddubsw
// (u8 x s8) can multiply and sum pairs in int16, exactly (a pair is at most 2 * 128 * 127 < 2^15, as
// activations are in [-127, 127]), and vpmaddwd against ones widens the pairs to int32: 32 products in four
// instructions. Tiles of 3 activation rows x 2 weight rows keep 6 accumulators, the weights and their
// absolute values in registers. On the default model's layers (a Zen 4 host capped at AVX2, 2 threads) this
// ran 1.1-1.3x as fast as the loop it replaced (both sides widened to int16, vpmaddwd) at 16-512 rows, and
// up to 2x at 1-4 rows; 3x3 tiles spilled, 2x3 ran no faster than the int16 loop.
// A tile's sums go to sink(m, n, sums, count), a tile row at a time.
template <int MR, int NR, class Sink>
void tile_avx2(const int8_t* x, int64_t ldx, const int8_t* w, int64_t K, int64_t m0, int64_t n0, const Sink& sink) {
  __m256i acc[MR][NR];
  const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[m][j] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i wv[NR], aw[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * K + k));
      aw[j] = _mm256_abs_epi8(wv[j]);
    }
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * ldx + k));
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j)
        acc[m][j] = _mm256_add_epi32(acc[m][j],
                                     _mm256_madd_epi16(_mm256_maddubs_epi16(aw[j], _mm256_sign_epi8(xv, wv[j])), ones));
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
    int32_t t[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      t[j] = hsum_epi32(acc[m][j]);
      for (int64_t kk = k; kk < K; ++kk) t[j] += static_cast<int32_t>(x[m * ldx + kk]) * static_cast<int32_t>(w[j * K + kk]);
    }
    sink(m0 + m, n0, t, NR);
  }
}

template <int MR, class Sink>
void tiles_avx2(const int8_t* x, int64_t ldx, const int8_t* w, int64_t K, int64_t m0, int64_t n0, int64_t n1,
                const Sink& sink) {
  constexpr int NR = 2;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tile_avx2<MR, NR>(x, ldx, w + n * K, K, m0, n, sink);
  for (; n < n1; ++n) tile_avx2<MR, 1>(x, ldx, w + n * K, K, m0, n, sink);
}

// x[m] . w[n] for every row m, weight rows [n0, n1), in blocks of ~16 KB of weights that stay in L1.
template <class Sink>
void int8_gemm_rows_avx2(const int8_t* x, int64_t M, const int8_t* w, int64_t K, int64_t n0, int64_t n1,
                         const Sink& sink) {
  const int64_t block = std::max<int64_t>(12, (16384 / std::max<int64_t>(K, 1)) / 12 * 12);
  for (int64_t b = n0; b < n1; b += block) {
    const int64_t e = std::min(n1, b + block);
    int64_t m = 0;
    for (; m + 3 <= M; m += 3) tiles_avx2<3>(x + m * K, K, w, K, m, b, e, sink);
    switch (M - m) {
      case 2: tiles_avx2<2>(x + m * K, K, w, K, m, b, e, sink); break;
      case 1: tiles_avx2<1>(x + m * K, K, w, K, m, b, e, sink); break;
      default: break;
    }
  }
}

// The AVX2 product, output channels split between threads 12 at a time.
template <class Sink>
void int8_gemm_avx2_each(const int8_t* x, int64_t M, const int8_t* w, int64_t K, int64_t N, const Sink& sink) {
  at::parallel_for(0, (N + 11) / 12, 1, [&](int64_t b, int64_t e) {
    int8_gemm_rows_avx2(x, M, w, K, b * 12, std::min(e * 12, N), sink);
  });
}

torch::Tensor int8_gemm_avx2(const torch::Tensor& x, const torch::Tensor& w) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = torch::empty({M, N}, x.options().dtype(torch::kInt));
  int32_t* op = out.data_ptr<int32_t>();
  int8_gemm_avx2_each(x.data_ptr<int8_t>(), M, w.data_ptr<int8_t>(), K, N,
                      [op, N](int64_t m, int64_t n, const int32_t* t, int cnt) { std::copy(t, t + cnt, op + m * N + n); });
  return out;
}
#endif

#if !(defined(__AVX512VNNI__) && defined(__AVX512BW__))
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

// acc[m, n] = x[m] . w[n] for a few rows: streams each weight row once (~28 GB/s at one row here, oneDNN's
// int8 GEMM ~14 GB/s), the row ranges split between threads in groups of 16.
torch::Tensor int8_gemv(const torch::Tensor& x, const torch::Tensor& w) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = torch::empty({M, N}, x.options().dtype(torch::kInt));
  const int8_t* xp = x.data_ptr<int8_t>();
  const int8_t* wp = w.data_ptr<int8_t>();
  int32_t* op = out.data_ptr<int32_t>();
  at::parallel_for(0, (N + 15) / 16, 16, [&](int64_t b, int64_t e) {   // in groups of 16 rows
    int8_gemv_rows(xp, M, wp, K, b * 16, std::min(e * 16, N), N, op);
  });
  return out;
}

// Up to 16 rows the VNNI loop beats oneDNN's int8 GEMM (whole model's linears: 5.2 vs 8.8 ms at 1 row,
// 7.8 vs 13.4 at 4, 13.5 vs 16.3 at 8, 22.6 vs 25.4 at 16); the portable loop only at 1-2.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr int64_t kGemvMaxRows = 16;
#else
constexpr int64_t kGemvMaxRows = 2;
#endif

// Which loop computes the int32 product (every one exact, so the choice never changes a result's bits):
//   VNNI builds: the VNNI GEMV up to 16 rows, oneDNN's _int_mm above (its VNNI GEMM is the faster one there);
//   other AVX2 builds: the AVX2 loop at every row count, unless this CPU has AVX-512 VNNI, where oneDNN
//     (which picks its code at run time) is faster above 16 rows (a KVLOOM_ISA=avx2 build on a VNNI host);
//   builds without AVX2: the portable loop up to 2 rows, _int_mm above.
// set_int8_gemm("native" | "int_mm" | "auto") overrides the choice above 16 rows (benchmarks, tests).
enum class GemmMode { kAuto = 0, kNative = 1, kIntMm = 2 };
std::atomic<int> g_gemm_mode{static_cast<int>(GemmMode::kAuto)};

// oneDNN runs its VNNI GEMM only if this CPU has VNNI and DNNL_MAX_CPU_ISA (or ONEDNN_MAX_CPU_ISA) does not
// cap it below AVX-512 (how a VNNI host stands in for an AVX2-only one: benchmarks/cpu_class.sh avx2).
bool host_has_vnni() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool vnni = [] {
    if (!__builtin_cpu_supports("avx512vnni")) return false;
    const char* cap = std::getenv("ONEDNN_MAX_CPU_ISA");
    if (!cap) cap = std::getenv("DNNL_MAX_CPU_ISA");
    if (!cap) return true;
    std::string isa(cap);
    for (auto& c : isa) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    return isa == "ALL" || isa.find("AVX512") != std::string::npos || isa.find("AVX10") != std::string::npos ||
           isa.find("AMX") != std::string::npos;
  }();
  return vnni;
#else
  return false;
#endif
}

// The rows above which _int_mm runs (INT64_MAX: never).
int64_t int_mm_above(GemmMode mode) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return mode == GemmMode::kNative ? INT64_MAX : kGemvMaxRows;
#elif defined(__AVX2__)
  if (mode == GemmMode::kNative) return INT64_MAX;
  if (mode == GemmMode::kIntMm) return 16;
  return host_has_vnni() ? 16 : INT64_MAX;
#else
  (void)mode;
  return kGemvMaxRows;
#endif
}

GemmMode gemm_mode() { return static_cast<GemmMode>(g_gemm_mode.load(std::memory_order_relaxed)); }

// The rows up to which the grouped loop (int8_grouped_gemv.cpp) takes a layer that has packed weights (the LM
// head): on VNNI builds the VNNI GEMV's rows, where it ran the head 1.42-1.87x as fast at 4-16 rows
// (benchmarks/lm_head_gemv.py; docs/results/lm_head_rows/); on AVX2 builds every row count that
// does not go to oneDNN's VNNI GEMM (a VNNI host), where its tiles of 4 rows ran the 49152 x 576 head 2.0-2.3x
// as fast as the sign-trick GEMM at 1-4 rows and 1.2-1.4x at 16-64 (an AVX2 build capped as on an AVX2-only host).
int64_t grouped_max_rows(GemmMode mode) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  (void)mode;
  return kGemvMaxRows;
#elif defined(__AVX2__)
  return int_mm_above(mode);
#else
  (void)mode;
  return 0;
#endif
}

// Whether int8_product computes M rows of K against w [N, K] with the AVX2 loop.
bool avx2_gemm_takes(const torch::Tensor& w, int64_t M, int64_t K, GemmMode mode) {
#if defined(__AVX2__)
  if (!w.is_contiguous() || M > int_mm_above(mode)) return false;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return K > kGemvMaxK || M > kGemvMaxRows;
#else
  (void)K;
  return true;
#endif
#else
  (void)w, (void)M, (void)K, (void)mode;
  return false;
#endif
}

// acc [M, N] int32 = xq [M, K] int8 @ w_t [K, N] int8 (w_t.t() contiguous: [N, K]).
torch::Tensor int8_product(const torch::Tensor& xq, const torch::Tensor& w_t, GemmMode mode) {
  const torch::Tensor w = w_t.t();   // [N, K]
  const int64_t M = xq.size(0), K = xq.size(1);
#if defined(__AVX2__)
  if (avx2_gemm_takes(w, M, K, mode)) return int8_gemm_avx2(xq, w);
#endif
  if (!w.is_contiguous() || M > int_mm_above(mode)) return at::_int_mm(xq, w_t);
  return int8_gemv(xq, w);
}

// y = acc * row_scale * col_scale (+ bias), stored, or added to what `out` holds (a residual stream).
// No fused multiply-adds: the product is rounded before the bias and before the residual add, exactly as
// the module path's separate `h + linear(x)` rounds it, so the decode stack and the modules agree.
__attribute__((optimize("fp-contract=off")))
void dequant_row(const int32_t* a, float s, const float* cs, const float* bias, float* out, int64_t n,
                 bool accumulate) {
  if (bias && accumulate) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = out[j] + (static_cast<float>(a[j]) * s * cs[j] + bias[j]);
  } else if (bias) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(a[j]) * s * cs[j] + bias[j];
  } else if (accumulate) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = out[j] + static_cast<float>(a[j]) * s * cs[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(a[j]) * s * cs[j];
  }
}

}  // namespace

// y = dequant(quant(x) @ w): x [M, K] float -> int8 per row (scale = absmax / 127), int8 GEMM to int32,
// then y = acc * row_scale * col_scale (+ bias). One call for what is ten small ops in eager PyTorch.
// With `residual`, y is added into it in place (h += linear(x)) and it is returned.
// With `packed` and `row_sums` (int8_pack_row_groups of the same weights), up to grouped_max_rows rows take
// the grouped loop: the same exact int32 sums, so the same bits.
torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor w_t, torch::Tensor col_scales,
                          c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> residual,
                          c10::optional<torch::Tensor> packed, c10::optional<torch::Tensor> row_sums) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w_t.size(1);
  const GemmMode mode = gemm_mode();
  const bool grouped = packed.has_value() && row_sums.has_value() && M <= grouped_max_rows(mode) &&
                       int8_grouped_gemv_available();
  // The AVX2 loop hands each tile's sums straight to the epilogue: no int32 product goes through memory (at 512
  // rows, quantizing the activations and the separate epilogue took ~20% of a layer's time).
  const torch::Tensor w = w_t.t();   // [N, K]
  const bool fused = !grouped && avx2_gemm_takes(w, M, K, mode);
  auto xq = torch::empty({M, K}, x.options().dtype(torch::kChar));
  auto sx = torch::empty({M}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = xq.data_ptr<int8_t>();
  float* sp = sx.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float* row = xp + i * K;
      float m = 0.f;
#pragma omp simd reduction(max : m)
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
  auto y = residual.has_value() ? *residual : torch::empty({M, N}, x.options());
  if (residual.has_value())
    TORCH_CHECK(y.is_contiguous() && y.scalar_type() == torch::kFloat && y.size(0) == M && y.size(1) == N,
                "residual: contiguous float [M, N]");
  const float* cs = col_scales.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const bool accumulate = residual.has_value();
#if defined(__AVX2__)
  if (fused) {
    int8_gemm_avx2_each(qp, M, w.data_ptr<int8_t>(), K, N,
                        [=](int64_t m, int64_t n, const int32_t* t, int cnt) {
                          dequant_row(t, sp[m], cs + n, bp ? bp + n : nullptr, yp + m * N + n, cnt, accumulate);
                        });
    return y;
  }
#endif
  torch::Tensor acc = grouped ? int8_grouped_gemv(xq, *packed, *row_sums, N) : int8_product(xq, w_t, mode);
  const int32_t* ap = acc.data_ptr<int32_t>();
  const int64_t lda = acc.stride(0);
  at::parallel_for(0, M, 4, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dequant_row(ap + i * lda, sp[i], cs, bp, yp + i * N, N, accumulate);
  });
  return y;
}

// The int32 product alone, by a named loop: "auto" (what w8a8_linear uses), "native" (this build's own loop
// at any row count), "int_mm" (oneDNN), "avx2" (the AVX2 loop, in builds that have it). For tests and benchmarks.
torch::Tensor int8_matmul(torch::Tensor xq, torch::Tensor w_t, std::string path) {
  TORCH_CHECK(xq.dim() == 2 && xq.scalar_type() == torch::kChar && xq.is_contiguous(), "xq: contiguous int8 [M, K]");
  TORCH_CHECK(w_t.dim() == 2 && w_t.scalar_type() == torch::kChar && w_t.size(0) == xq.size(1), "w_t: int8 [K, N]");
  // w8a8 quantizes activations to [-127, 127]; the AVX2 loop's sign trick cannot negate -128.
  const int8_t* xp = xq.data_ptr<int8_t>();
  TORCH_CHECK(std::find(xp, xp + xq.numel(), INT8_MIN) == xp + xq.numel(), "xq: activations in [-127, 127]");
  if (path == "int_mm") return at::_int_mm(xq, w_t);
  if (path == "auto") return int8_product(xq, w_t, gemm_mode());
  TORCH_CHECK(w_t.t().is_contiguous(), "w_t: the transpose of a contiguous [N, K]");
#if defined(__AVX2__)
  if (path == "avx2") return int8_gemm_avx2(xq, w_t.t());
#endif
  TORCH_CHECK(path == "native", "int8_matmul: unknown path '", path, "' for this build");
  return int8_product(xq, w_t, GemmMode::kNative);
}

void set_int8_gemm(std::string mode) {
  if (mode == "auto") g_gemm_mode = static_cast<int>(GemmMode::kAuto);
  else if (mode == "native") g_gemm_mode = static_cast<int>(GemmMode::kNative);
  else if (mode == "int_mm") g_gemm_mode = static_cast<int>(GemmMode::kIntMm);
  else TORCH_CHECK(false, "set_int8_gemm: 'auto', 'native' or 'int_mm', not '", mode, "'");
}

// What computes the product of a layer that has packed weights (the LM head), for /server_info and the logs.
std::string int8_grouped_path() {
  const int64_t rows = grouped_max_rows(gemm_mode());
  if (!int8_grouped_gemv_available() || rows <= 0) return int8_gemm_path();
  if (rows == INT64_MAX) return "grouped 16-row loop (all rows)";
  return "grouped 16-row loop (<=" + std::to_string(rows) + " rows), then " + int8_gemm_path();
}

// What computes the w8a8 product in this build on this CPU, for /server_info and the logs.
std::string int8_gemm_path() {
  const int64_t above = int_mm_above(gemm_mode());
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const std::string own = "avx512_vnni gemv (<=16 rows)";
  const std::string big = above == INT64_MAX ? ", avx2 sign-trick gemm above" : ", torch._int_mm above 16 rows";
  return own + big;
#elif defined(__AVX2__)
  if (above == INT64_MAX) return "avx2 sign-trick gemm (all rows)";
  return "avx2 sign-trick gemm (<=" + std::to_string(above) + " rows), torch._int_mm above";
#else
  return "portable loop (<=2 rows), torch._int_mm above";
#endif
}
