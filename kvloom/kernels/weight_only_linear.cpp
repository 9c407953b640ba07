// The weight-only modes' product: float activations times weights stored as int8 (one scale a column) or
// 4-bit (a scale and an offset per column and group of k), widened to float a slice at a time.
//
// PyTorch's own int8- and int4-weight CPU kernels have an AVX-512 path and a scalar one: on an AVX2-only
// host the weight-only modes decoded at 0.3-0.4x float32's speed and prefilled at 0.02x. Here the weights
// are read at one or half a byte each and widened to float: for up to a tile's rows (8 on AVX-512, 6 on AVX2)
// in registers, used at once; above, into a small buffer (a panel of 16 columns, kSegment values of k: 16 KB,
// in L1) that tiles of activation rows pass over with FMAs, a register-tiled float GEMM.
//
// Every output is one FMA chain over k in order, acc = fma(x[m, k], w[k, n], acc), with the widened weight
// w = q (int8: the column's scale multiplies the sum at the end) or w = fma(q, scale, offset) (4-bit). The
// chain does not depend on the tile, the segment (a partial sum waits in the output), the thread or the row
// count, and it is the same on AVX-512, AVX2 and the scalar path: a row's bits never depend on its batch,
// nor on the machine's class.
//
// Packing (kvloom/quant/weight_panels.py): panels of 16 columns, k-major. int8: [P, K, 16]. 4-bit: [P, K, 8]
// bytes, byte j holding column j in its low nibble and column j + 8 in its high one; scales and offsets
// [P, G, 16] for G groups of k; the bias, like the column scales, [P * 16]. Columns past N are zero.
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kPanel = 16;      // output columns a panel
constexpr int64_t kSegment = 256;   // values of k widened at once
constexpr int64_t kRowBlock = 64;   // activation rows kept in L2 while a thread's panels pass

// 16 floats: one panel's weights at one k, or 16 accumulators.
#if defined(__AVX512F__)
struct Vec16 {
  __m512 v;
  static Vec16 zero() { return {_mm512_setzero_ps()}; }
  static Vec16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  // a * b + c, one rounding
  static Vec16 fma(Vec16 a, Vec16 b, Vec16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec16 fma(float a, Vec16 b, Vec16 c) { return {_mm512_fmadd_ps(_mm512_set1_ps(a), b.v, c.v)}; }
};
#elif defined(__AVX2__)
struct Vec16 {
  __m256 lo, hi;
  static Vec16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static Vec16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  void store(float* p) const { _mm256_storeu_ps(p, lo); _mm256_storeu_ps(p + 8, hi); }
  static Vec16 fma(Vec16 a, Vec16 b, Vec16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
  static Vec16 fma(float a, Vec16 b, Vec16 c) {
    const __m256 x = _mm256_set1_ps(a);
    return {_mm256_fmadd_ps(x, b.lo, c.lo), _mm256_fmadd_ps(x, b.hi, c.hi)};
  }
};
#else
struct Vec16 {
  float v[kPanel];
  static Vec16 zero() { return {}; }
  static Vec16 load(const float* p) { Vec16 r; std::copy(p, p + kPanel, r.v); return r; }
  void store(float* p) const { std::copy(v, v + kPanel, p); }
  static Vec16 fma(Vec16 a, Vec16 b, Vec16 c) {
    for (int j = 0; j < kPanel; ++j) c.v[j] = std::fma(a.v[j], b.v[j], c.v[j]);
    return c;
  }
  static Vec16 fma(float a, Vec16 b, Vec16 c) {
    for (int j = 0; j < kPanel; ++j) c.v[j] = std::fma(a, b.v[j], c.v[j]);
    return c;
  }
};
#endif

// Each panel format calls f(k, w) for k in [k0, k1) with w its 16 widened weights at k.
struct Int8Panels {
  const int8_t* q;    // [P, K, 16]
  int64_t K;
  template <class F>
  void each_k(int64_t p, int64_t k0, int64_t k1, F&& f) const {
    const int8_t* src = q + (p * K + k0) * kPanel;
    for (int64_t k = k0; k < k1; ++k, src += kPanel) {
#if defined(__AVX512F__)
      f(k, Vec16{_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))))});
#elif defined(__AVX2__)
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
      f(k, Vec16{_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)))});
#else
      Vec16 w;
      for (int j = 0; j < kPanel; ++j) w.v[j] = static_cast<float>(src[j]);
      f(k, w);
#endif
    }
  }
};

struct Int4Panels {
  const uint8_t* q;       // [P, K, 8]
  const float* scale;     // [P, G, 16]
  const float* offset;    // [P, G, 16]
  int64_t K, group, groups;
  // w = fma(q, scale, offset), the group's scale and offset held while its k pass
  template <class F>
  void each_k(int64_t p, int64_t k0, int64_t k1, F&& f) const {
    for (int64_t k = k0; k < k1;) {
      const int64_t at = (p * groups + k / group) * kPanel, end = std::min(k1, (k / group + 1) * group);
      const Vec16 s = Vec16::load(scale + at), o = Vec16::load(offset + at);
      const uint8_t* src = q + (p * K + k) * (kPanel / 2);
      for (; k < end; ++k, src += kPanel / 2) {
#if defined(__AVX512F__)
        // lanes 0-7 take the 8 bytes' low nibbles, lanes 8-15 their high ones
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
        const __m512i v = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(b, b));
        const __m512i shift = _mm512_set_epi32(4, 4, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0);
        const __m512i nib = _mm512_and_si512(_mm512_srlv_epi32(v, shift), _mm512_set1_epi32(15));
        f(k, Vec16::fma(Vec16{_mm512_cvtepi32_ps(nib)}, s, o));
#elif defined(__AVX2__)
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
        const Vec16 qf{_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15))),
                       _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4))};
        f(k, Vec16::fma(qf, s, o));
#else
        Vec16 qf;
        for (int j = 0; j < kPanel / 2; ++j) {
          qf.v[j] = static_cast<float>(src[j] & 15);
          qf.v[j + 8] = static_cast<float>(src[j] >> 4);
        }
        f(k, Vec16::fma(qf, s, o));
#endif
      }
    }
  }
};

// The epilogue: y = fma(acc, column scale, bias), one rounding (the compiler may fuse a multiply and an add
// in one tile's code and not another's), with scale 1 (4-bit) and bias 0 where null.
alignas(64) constexpr float kOnes[kPanel] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
alignas(64) constexpr float kZeros[kPanel] = {};
struct Epilogue {
  const float* col_scale;   // [P * 16] or null
  const float* bias;        // [P * 16] or null
  Vec16 finish(Vec16 acc, int64_t col) const {
    return Vec16::fma(acc, Vec16::load(col_scale ? col_scale + col : kOnes), Vec16::load(bias ? bias + col : kZeros));
  }
};

#if defined(__AVX512F__)
constexpr int kTileRows = 8;
#elif defined(__AVX2__)
constexpr int kTileRows = 6;   // 12 accumulators, the weights' two halves and a broadcast: 15 ymm registers
#else
constexpr int kTileRows = 4;
#endif

// Rows [0, MR) of a tile against a widened segment w [k1 - k0, 16]: acc (the partial sums in y, or zero
// when first) += x[:, k0:k1] . w; finished by the epilogue when last.
template <int MR>
void tile(const float* x, int64_t K, const float* w, int64_t k0, int64_t k1, float* y, int64_t ldy, bool first,
          bool last, const Epilogue& ep, int64_t col) {
  Vec16 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = first ? Vec16::zero() : Vec16::load(y + r * ldy);
  for (int64_t k = k0; k < k1; ++k, w += kPanel) {
    const Vec16 wv = Vec16::load(w);
    for (int r = 0; r < MR; ++r) acc[r] = Vec16::fma(x[r * K + k], wv, acc[r]);
  }
  for (int r = 0; r < MR; ++r) (last ? ep.finish(acc[r], col) : acc[r]).store(y + r * ldy);
}

template <int MR = kTileRows>
void tile_rows(int rows, const float* x, int64_t K, const float* w, int64_t k0, int64_t k1, float* y,
               int64_t ldy, bool first, bool last, const Epilogue& ep, int64_t col) {
  if constexpr (MR > 1) {
    if (rows < MR) return tile_rows<MR - 1>(rows, x, K, w, k0, k1, y, ldy, first, last, ep, col);
  }
  tile<MR>(x, K, w, k0, k1, y, ldy, first, last, ep, col);
}

// Panels [p0, p1) for every activation row: per block of rows (kept in L2), per panel, per segment, widen
// the segment once into L1 and run every tile of the block's rows over it.
template <class Panels>
void panels(const Panels& wp, const float* x, int64_t M, int64_t K, int64_t p0, int64_t p1, float* y,
            int64_t ldy, const Epilogue& ep) {
  alignas(64) float seg[kSegment * kPanel];
  for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
    const int64_t m1 = std::min(M, m0 + kRowBlock);
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t k0 = 0; k0 < K; k0 += kSegment) {
        const int64_t k1 = std::min(K, k0 + kSegment);
        wp.each_k(p, k0, k1, [&](int64_t k, Vec16 w) { w.store(seg + (k - k0) * kPanel); });
        for (int64_t m = m0; m < m1; m += kTileRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kTileRows, m1 - m));
          tile_rows(rows, x + m * K, K, seg, k0, k1, y + m * ldy + p * kPanel, ldy, k0 == 0, k1 == K, ep,
                    p * kPanel);
        }
      }
  }
}

// A few rows: each weight widened in registers and used at once, no buffer (decode steps, where the
// weights' bytes are the cost). The same FMA chain as the tiles.
template <int MR, class Panels>
void direct(const Panels& wp, const float* x, int64_t K, int64_t p0, int64_t p1, float* y, int64_t ldy,
            const Epilogue& ep) {
  for (int64_t p = p0; p < p1; ++p) {
    Vec16 acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = Vec16::zero();
    wp.each_k(p, 0, K, [&](int64_t k, Vec16 w) {
      for (int r = 0; r < MR; ++r) acc[r] = Vec16::fma(x[r * K + k], w, acc[r]);
    });
    for (int r = 0; r < MR; ++r) ep.finish(acc[r], p * kPanel).store(y + r * ldy + p * kPanel);
  }
}

template <int MR = kTileRows, class Panels>
void direct_rows(int rows, const Panels& wp, const float* x, int64_t K, int64_t p0, int64_t p1, float* y,
                 int64_t ldy, const Epilogue& ep) {
  if constexpr (MR > 1) {
    if (rows < MR) return direct_rows<MR - 1>(rows, wp, x, K, p0, p1, y, ldy, ep);
  }
  direct<MR>(wp, x, K, p0, p1, y, ldy, ep);
}

// Up to a tile's rows, the weights are widened in registers; 1.1-1.9x faster than through the buffer at 5-8
// rows on a Zen 4 host (the AVX-512 and the AVX2 build).
template <class Panels>
void product(const Panels& wp, const float* x, int64_t M, int64_t K, int64_t p0, int64_t p1, float* y,
             int64_t ldy, const Epilogue& ep) {
  if (M == 0) return;   // (a step can hand a layer no rows)
  if (M <= kTileRows) return direct_rows(static_cast<int>(M), wp, x, K, p0, p1, y, ldy, ep);
  panels(wp, x, M, K, p0, p1, y, ldy, ep);
}

template <class Panels>
torch::Tensor run(const Panels& wp, const torch::Tensor& x, int64_t P, int64_t n_out, const float* col_scale,
                  const c10::optional<torch::Tensor>& bias) {
  const int64_t M = x.size(0), K = x.size(1), width = P * kPanel;
  TORCH_CHECK(n_out > 0 && n_out <= width, "n_out must be in (0, panels * 16]");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)   // padded when the layer was packed (weight_panels.padded_columns), not on every call
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->is_contiguous() && bias->numel() == width,
                "bias: float [P * 16], zero past n_out");
  torch::Tensor y = torch::empty({M, width}, x.options());
  const Epilogue ep{col_scale, has_bias ? bias->data_ptr<float>() : nullptr};
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Whole panels per thread: a column's chain is computed by one thread, so the split changes no bits.
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) { product(wp, xp, M, K, p0, p1, yp, width, ep); });
  return n_out == width ? y : y.narrow(1, 0, n_out).contiguous();
}

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x: contiguous float32 [M, K] on the CPU");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the weights ", K);
}

}  // namespace

torch::Tensor int8_weight_linear(torch::Tensor x, torch::Tensor q, torch::Tensor col_scales, int64_t n_out,
                                 c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(q.dim() == 3 && q.size(2) == kPanel && q.scalar_type() == torch::kChar && q.is_contiguous(),
              "q: int8 panels [P, K, 16]");
  const int64_t P = q.size(0), K = q.size(1);
  check_x(x, K);
  TORCH_CHECK(col_scales.scalar_type() == torch::kFloat && col_scales.is_contiguous() && col_scales.numel() == P * kPanel,
              "col_scales: float [P * 16]");
  return run(Int8Panels{q.data_ptr<int8_t>(), K}, x, P, n_out, col_scales.data_ptr<float>(), bias);
}

torch::Tensor int4_weight_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor offsets,
                                 int64_t group, int64_t n_out, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(q.dim() == 3 && q.size(2) == kPanel / 2 && q.scalar_type() == torch::kByte && q.is_contiguous(),
              "q: uint8 panels [P, K, 8]");
  const int64_t P = q.size(0), K = q.size(1);
  check_x(x, K);
  TORCH_CHECK(group > 0 && K % group == 0, "group must divide K");
  const int64_t G = K / group;
  for (const auto& t : {scales, offsets})
    TORCH_CHECK(t.dim() == 3 && t.size(0) == P && t.size(1) == G && t.size(2) == kPanel &&
                    t.scalar_type() == torch::kFloat && t.is_contiguous(),
                "scales, offsets: float [P, K / group, 16]");
  const Int4Panels wp{q.data_ptr<uint8_t>(), scales.data_ptr<float>(), offsets.data_ptr<float>(), K, group, G};
  return run(wp, x, P, n_out, nullptr, bias);
}

std::string weight_only_path() {
#if defined(__AVX512F__)
  return "native weight-only GEMM (AVX-512 FMA, 8-row tiles)";
#elif defined(__AVX2__)
  return "native weight-only GEMM (AVX2 FMA, 6-row tiles)";
#else
  return "native weight-only GEMM (scalar fma)";
#endif
}
