// The 4-bit linear layer (w4a8): weights in GGUF-style blocks of 32 four-bit values with a float scale and
// offset each, activations quantized per row and block of 32 to int8 (llama.cpp's Q8 for its Q4 products).
//
// Weight row n, block b: w = d[n, b] * q + off[n, b], q in 0..15 (Q4Weights below: rows in groups of 8).
// Activation row m, block b: x ~= dx[m, b] * xq with xq = round(x / dx), dx = absmax / 127. Then
//     y[m, n] = sum_b  d[n, b] dx[m, b] (q . xq)_b  +  off[n, b] (dx[m, b] sum(xq)_b)
// The integer dot of a block is exact (u8 x s8 pairs: vpmaddubsw + vpmaddwd on AVX2, vpdpbusd with VNNI, the
// same integers). Every (m, n) pair is computed by the same sequence of float operations whatever the tile
// it falls in and however many rows the call has: a row's result never depends on its batch.
#include "kernels.h"
#include "int_sum.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t QK = 32;   // values a block

struct QuantRows {
  const int8_t* q;      // [M, K]
  const float* d;       // [M, nb]: each block's scale
  const float* dsum;    // [M, nb]: d * sum(q) of each block
  int64_t K, nb;
};

// Weights in groups of 8 rows, so that one vector holds 4 values of each of the 8 rows and a product's 8
// lanes are 8 outputs (no horizontal sums, the unpacked weights shared by every activation row of a tile).
// Group g, block b: 128 bytes, loads L = 0..3 of 32 bytes each, byte 4 j + t holding row j's value 4 L + t in
// its low nibble and value 16 + 4 L + t in its high one; then 16 floats: the 8 rows' scales, their offsets.
// The scales are float16 where the file's are exactly that (Q4_0, Q4_1: a quarter fewer bytes a weight to
// read), else float32 (Q4_K's products of two scales); either way the kernel computes with the same floats.
// Where every offset is -8 x its scale (Q4_0), only the 8 scales are stored: the kernel makes the offsets,
// the same floats (a power-of-two product is exact), from 8 fewer entries a block to read.
struct Q4Weights {
  const uint8_t* qs;      // [groups, nb, 128]
  const float* scales;    // [groups, nb, entries] float32, or null
  const uint16_t* half;   // the same as float16 bits, or null
  int64_t nb;
  int entries;            // 16: scales then offsets; 8: scales only, offsets -8 x scale
  const uint8_t* group(int64_t g) const { return qs + g * nb * 128; }
  int64_t scale_bytes() const { return entries * (half ? 2 : 4); }   // of one group's block
  const char* scales_of(int64_t g) const {
    return half ? reinterpret_cast<const char*>(half + g * nb * entries)
                : reinterpret_cast<const char*>(scales + g * nb * entries);
  }
  float stored(int64_t i) const { return half ? c10::detail::fp16_ieee_to_fp32_value(half[i]) : scales[i]; }
  // Entry j (0-7: the rows' scales, 8-15: their offsets) of group g, block b.
  float scale(int64_t g, int64_t b, int j) const {
    const int64_t at = (g * nb + b) * entries;
    if (j >= 8 && entries == 8) return -8.f * stored(at + j - 8);
    return stored(at + j);
  }
#if defined(__AVX2__)
  // Eight entries from `first` (0: scales, 8: offsets).
  __m256 load8(int64_t g, int64_t b, int first) const {
    const bool derived = first == 8 && entries == 8;
    const int64_t i = (g * nb + b) * entries + (derived ? 0 : first);
    const __m256 v = half ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(half + i)))
                          : _mm256_loadu_ps(scales + i);
    return derived ? _mm256_mul_ps(v, _mm256_set1_ps(-8.f)) : v;
  }
#endif
};

#if defined(__AVX2__)

// One block of activations: 32 floats -> 32 int8 (round half to even), its scale and d * sum(q).
inline void quantize_block(const float* x, int8_t* q, float* d, float* dsum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float mx = _mm_cvtss_f32(m);
  const float scale = mx / 127.f;
  const __m256 inv = _mm256_set1_ps(mx > 0.f ? 127.f / mx : 0.f);
  __m256i i32[4];
  for (int i = 0; i < 4; ++i)
    i32[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
  // packs works within 128-bit lanes; the permute puts the 32 values back in order.
  __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
  p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), p);
  *d = scale;
  *dsum = scale * static_cast<float>(hsum_epi32(sum));
}

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// out[i * ldo + j] = x[m0 + i] . row j of group g, for MR activation rows and the group's 8 (or `valid`) rows.
// Per block and activation row: 8 multiplies of 32 bytes give the 8 rows' exact integer dots (int16 pair sums
// stay below 8 * 2 * 15 * 127 = 30480), then one float multiply-add by the two scales.
template <int MR>
void group_tile(const QuantRows& x, int64_t m0, const Q4Weights& w, int64_t g, float* out, int64_t ldo, int valid) {
  const int64_t nb = x.nb;
  const uint8_t* q = w.group(g);
  const __m256i low = _mm256_set1_epi8(0x0F);
  // The offsets' sums are a chain of dependent multiply-adds per row. With few rows they ride along in the
  // block loop; with more there are no registers left, and they run after it, rows interleaved, so that the
  // chains overlap (one row after another they were a fifth of the tile's time). Either way each row sums
  // its offsets in block order: the same floats.
  constexpr bool kOffsetsInLoop = MR <= 2;
  __m256 acc[MR], offs[MR];
  for (int i = 0; i < MR; ++i) acc[i] = offs[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i dot[MR];
    for (int i = 0; i < MR; ++i) dot[i] = _mm256_setzero_si256();
    // Not unrolled: with all four loads unrolled GCC hoists every broadcast and spills the products to the
    // stack (16 ymm registers); this loop ran 165 -> ~205 GMAC/s at 512 rows on the AVX2 build.
#pragma GCC unroll 1
    for (int L = 0; L < 4; ++L) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * 128 + L * 32));
      const __m256i lo = _mm256_and_si256(raw, low), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
      for (int i = 0; i < MR; ++i) {
        const int8_t* xb = x.q + (m0 + i) * x.K + b * QK + 4 * L;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        dot[i] = _mm256_dpbusd_epi32(dot[i], lo, bcast4(xb));
        dot[i] = _mm256_dpbusd_epi32(dot[i], hi, bcast4(xb + 16));
#else
        dot[i] = _mm256_add_epi16(dot[i], _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(xb)),
                                                           _mm256_maddubs_epi16(hi, bcast4(xb + 16))));
#endif
      }
    }
    const __m256 d = w.load8(g, b, 0);
    for (int i = 0; i < MR; ++i) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
      const __m256i isum = dot[i];
#else
      const __m256i isum = _mm256_madd_epi16(dot[i], _mm256_set1_epi16(1));
#endif
      const __m256 s = _mm256_mul_ps(d, _mm256_set1_ps(x.d[(m0 + i) * nb + b]));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), s, acc[i]);
    }
    if (kOffsetsInLoop) {
      const __m256 off = w.load8(g, b, 8);
      for (int i = 0; i < MR; ++i) offs[i] = _mm256_fmadd_ps(off, _mm256_set1_ps(x.dsum[(m0 + i) * nb + b]), offs[i]);
    }
  }
  if (!kOffsetsInLoop) {
    for (int64_t b = 0; b < nb; ++b) {
      const __m256 off = w.load8(g, b, 8);
      for (int i = 0; i < MR; ++i) offs[i] = _mm256_fmadd_ps(off, _mm256_set1_ps(x.dsum[(m0 + i) * nb + b]), offs[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    const __m256 y = _mm256_add_ps(acc[i], offs[i]);
    if (valid == 8) {
      _mm256_storeu_ps(out + i * ldo, y);
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, y);
      std::copy(tmp, tmp + valid, out + i * ldo);
    }
  }
}

#if defined(__AVX512BW__)
constexpr bool kPairs = true;

// A pair tile reads its two groups as two streams, a group's length apart, and the hardware prefetcher does
// not keep up with that: at one activation row one thread read the weights at 9 GB/s from memory. The pair's
// bytes are one contiguous run all the same, and so are its scales: this walks that run in address order,
// one group plus kPrefetchAhead bytes ahead of the first stream (so past the second), the lines of a block
// step on their way to L2. Then one thread read 21 GB/s, two 29 (benchmarks/q4_cold_pairs.sh). Prefetches
// never fault and change no result.
constexpr int64_t kPrefetchAhead = 4096;

// (In asm: GCC 12 dropped _mm_prefetch here, in this translation unit, and kept it in a small one.)
inline void prefetch_l2(const char* p) { asm volatile("prefetcht1 %0" : : "m"(*p)); }

inline void prefetch_pair_step(const Q4Weights& w, int64_t g, int64_t b) {
  const char* q = reinterpret_cast<const char*>(w.group(g)) + (w.nb + b * 2) * 128 + kPrefetchAhead;
  for (int line = 0; line < 4; ++line) prefetch_l2(q + 64 * line);
  const int64_t sb = w.scale_bytes();
  const char* s = w.scales_of(g) + (w.nb + b * 2) * sb + kPrefetchAhead / 4;
  for (int64_t off = 0; off < 2 * sb; off += 64) prefetch_l2(s + off);
}

// Two groups (16 weight rows) at once in 512-bit registers: lanes 0-7 are group g's rows, 8-15 group g + 1's.
// Each lane runs the same operations as group_tile's (exact integer dot of the block, one rounding for the
// scale product, one fused multiply-add, the offsets summed after), so a row's result has the same bits
// whichever tile computes it: this path, the 256-bit one, and the AVX2 build.
// Prefetch: ask for the weights ahead of use (a template argument: as a runtime switch its branch in the block
// loop cost 2-7% at 48-512 rows).
template <int MR, bool Prefetch>
void group_pair_tile(const QuantRows& x, int64_t m0, const Q4Weights& w, int64_t g, float* out, int64_t ldo,
                     int valid) {
  const int64_t nb = x.nb;
  const uint8_t *q0 = w.group(g), *q1 = w.group(g + 1);
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[MR], offs[MR];   // 32 registers: the offsets' sums ride along in the block loop
  for (int i = 0; i < MR; ++i) acc[i] = offs[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    if constexpr (Prefetch) prefetch_pair_step(w, g, b);
    __m512i dot[MR];
    for (int i = 0; i < MR; ++i) dot[i] = _mm512_setzero_si512();
    for (int L = 0; L < 4; ++L) {
      const __m512i raw = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q0 + b * 128 + L * 32))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q1 + b * 128 + L * 32)), 1);
      const __m512i lo = _mm512_and_si512(raw, low), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
      for (int i = 0; i < MR; ++i) {
        const int8_t* xb = x.q + (m0 + i) * x.K + b * QK + 4 * L;
        int32_t a, c;
        __builtin_memcpy(&a, xb, 4);
        __builtin_memcpy(&c, xb + 16, 4);
#if defined(__AVX512VNNI__)
        dot[i] = _mm512_dpbusd_epi32(dot[i], lo, _mm512_set1_epi32(a));
        dot[i] = _mm512_dpbusd_epi32(dot[i], hi, _mm512_set1_epi32(c));
#else
        dot[i] = _mm512_add_epi16(dot[i], _mm512_add_epi16(_mm512_maddubs_epi16(lo, _mm512_set1_epi32(a)),
                                                           _mm512_maddubs_epi16(hi, _mm512_set1_epi32(c))));
#endif
      }
    }
    const __m512 d = _mm512_insertf32x8(_mm512_castps256_ps512(w.load8(g, b, 0)), w.load8(g + 1, b, 0), 1);
    for (int i = 0; i < MR; ++i) {
#if defined(__AVX512VNNI__)
      const __m512i isum = dot[i];
#else
      const __m512i isum = _mm512_madd_epi16(dot[i], _mm512_set1_epi16(1));
#endif
      const __m512 sc = _mm512_mul_ps(d, _mm512_set1_ps(x.d[(m0 + i) * nb + b]));
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sc, acc[i]);
    }
    const __m512 off = _mm512_insertf32x8(_mm512_castps256_ps512(w.load8(g, b, 8)), w.load8(g + 1, b, 8), 1);
    for (int i = 0; i < MR; ++i) offs[i] = _mm512_fmadd_ps(off, _mm512_set1_ps(x.dsum[(m0 + i) * nb + b]), offs[i]);
  }
  for (int i = 0; i < MR; ++i) {
    const __m512 y = _mm512_add_ps(acc[i], offs[i]);
    if (valid == 16) {
      _mm512_storeu_ps(out + i * ldo, y);
    } else {
      _mm512_mask_storeu_ps(out + i * ldo, static_cast<__mmask16>((1u << valid) - 1), y);
    }
  }
}
#endif
#else
inline void quantize_block(const float* x, int8_t* q, float* d, float* dsum) {
  float mx = 0.f;
  for (int64_t i = 0; i < QK; ++i) mx = std::max(mx, std::fabs(x[i]));
  const float scale = mx / 127.f, inv = mx > 0.f ? 127.f / mx : 0.f;
  int32_t sum = 0;
  for (int64_t i = 0; i < QK; ++i) {
    const float r = std::min(127.f, std::max(-127.f, std::nearbyint(x[i] * inv)));
    q[i] = static_cast<int8_t>(r);
    sum += q[i];
  }
  *d = scale;
  *dsum = scale * static_cast<float>(sum);
}

template <int MR>
void group_tile(const QuantRows& x, int64_t m0, const Q4Weights& w, int64_t g, float* out, int64_t ldo, int valid) {
  const uint8_t* q = w.group(g);
  for (int i = 0; i < MR; ++i) {
    const int8_t* xq = x.q + (m0 + i) * x.K;
    for (int j = 0; j < valid; ++j) {
      float acc = 0.f, offs = 0.f;
      for (int64_t b = 0; b < x.nb; ++b) {
        int32_t dot = 0;
        for (int L = 0; L < 4; ++L)
          for (int t = 0; t < 4; ++t) {
            const uint8_t byte = q[b * 128 + L * 32 + 4 * j + t];
            dot += static_cast<int32_t>(byte & 0x0F) * xq[b * QK + 4 * L + t];
            dot += static_cast<int32_t>(byte >> 4) * xq[b * QK + 16 + 4 * L + t];
          }
        acc = std::fma(static_cast<float>(dot), w.scale(g, b, j) * x.d[(m0 + i) * x.nb + b], acc);
      }
      for (int64_t b = 0; b < x.nb; ++b) offs = std::fma(w.scale(g, b, 8 + j), x.dsum[(m0 + i) * x.nb + b], offs);
      out[i * ldo + j] = acc + offs;
    }
  }
}
#endif

#if !defined(__AVX512BW__)
// Without 512-bit registers every tile is one group of 8 rows.
constexpr bool kPairs = false;
template <int MR, bool Prefetch>
void group_pair_tile(const QuantRows&, int64_t, const Q4Weights&, int64_t, float*, int64_t, int) {}
#endif

constexpr int kMR = 4;              // activation rows a tile
constexpr int64_t kRowChunk = 64;   // activation rows whose int8 copy stays in L2 while the weights pass by

// prefetch: the tile asks for the weights ahead of use (prefetch_pair_step). Only the chunk's first tile
// over a pair brings its weights in from memory (the rest find them in cache), and only a chunk of a few rows
// is bound by that read: at 1-4 rows a call ran 1.4-2.4x faster with it, at 16 1.0-1.3x; prefetching in every
// tile ran 0.6-0.74x at 512 rows on 2 threads (benchmarks/q4_cold_pairs.sh).
constexpr int64_t kPrefetchRows = 16;
template <int MR>
void tile(const QuantRows& x, int64_t m, const Q4Weights& w, int64_t g, bool pair, float* o, int64_t N, int valid,
          bool prefetch) {
  if (pair && prefetch) group_pair_tile<MR, true>(x, m, w, g, o, N, valid);
  else if (pair) group_pair_tile<MR, false>(x, m, w, g, o, N, valid);
  else group_tile<MR>(x, m, w, g, o, N, valid);
}

// out [M, N] = x . w for weight groups [g0, g1); with 512-bit registers, two groups at a time.
void product_groups(const QuantRows& x, int64_t M, const Q4Weights& w, int64_t g0, int64_t g1, float* out,
                    int64_t N) {
  for (int64_t mc = 0; mc < M; mc += kRowChunk) {
    const int64_t me = std::min(M, mc + kRowChunk);
    for (int64_t g = g0; g < g1;) {
      const bool pair = kPairs && g + 1 < g1;
      const int valid = static_cast<int>(std::min<int64_t>(pair ? 16 : 8, N - g * 8));
      float* o = out + g * 8;
      const bool few = me - mc <= kPrefetchRows;
      int64_t m = mc;
      for (; m + kMR <= me; m += kMR) tile<kMR>(x, m, w, g, pair, o + m * N, N, valid, few && m == mc);
      switch (me - m) {
        case 3: tile<3>(x, m, w, g, pair, o + m * N, N, valid, few && m == mc); break;
        case 2: tile<2>(x, m, w, g, pair, o + m * N, N, valid, few && m == mc); break;
        case 1: tile<1>(x, m, w, g, pair, o + m * N, N, valid, few && m == mc); break;
        default: break;
      }
      g += pair ? 2 : 1;
    }
  }
}

// y (+)= v + bias, rounded as the module path's separate `h + linear(x)` rounds it.
__attribute__((optimize("fp-contract=off")))
void epilogue(const float* v, const float* bias, float* y, int64_t n, bool accumulate) {
  for (int64_t j = 0; j < n; ++j) {
    const float t = bias ? v[j] + bias[j] : v[j];
    y[j] = accumulate ? y[j] + t : t;
  }
}

// A calling thread's scratch for a call's quantized activations and for its product before the epilogue,
// kept from call to call: a batch-1 decode step makes ~120 of these calls, and each temporary had been a
// torch::empty (a tensor object and a posix_memalign; glibc's allocator took ~3.4% of all samples, both
// threads, in a perf profile of batch-1 decode). The kernel's worker threads write into the caller's buffers.
struct Scratch {
  std::vector<int8_t> q;
  std::vector<float> scales, product;
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

template <class T>
T* at_least(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

}  // namespace

// y = x @ dequant(w).T (+ bias) with x quantized per block of 32; `residual`: y is added into it (h += ...).
// qs [ceil(N / 8), K / 32, 128] uint8 and scales [ceil(N / 8), K / 32, 2, 8] (or [.., 1, 8]: offsets -8 x scale)
// float32 or float16 in the grouped layout above
// (kvloom/quant/q4_linear.py packs them); n_out = N.
torch::Tensor q4_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor scales, int64_t n_out,
                        c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> residual) {
  if (residual.has_value()) {
    q4_linear_into(x, qs, scales, n_out, bias, *residual, true);
    return *residual;
  }
  auto y = torch::empty({x.size(0), n_out}, x.options());
  q4_linear_into(x, qs, scales, n_out, bias, y, false);
  return y;
}

// The same into y [M, N] (the decode stack's reused buffers): y = ..., or y += ... with `accumulate`.
void q4_linear_into(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& scales, int64_t n_out,
                    const c10::optional<torch::Tensor>& bias, torch::Tensor& y, bool accumulate) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = n_out, nb = K / QK, groups = (N + 7) / 8;
  TORCH_CHECK(K % QK == 0, "q4_linear: K must be a multiple of 32, got ", K);
  TORCH_CHECK(qs.scalar_type() == torch::kByte && qs.is_contiguous() && qs.numel() == groups * nb * 128,
              "qs: contiguous uint8 [ceil(N / 8), K / 32, 128]");
  const bool half = scales.scalar_type() == torch::kHalf;
  const int entries = scales.numel() == groups * nb * 8 ? 8 : 16;
  TORCH_CHECK((half || scales.scalar_type() == torch::kFloat) && scales.is_contiguous() &&
              scales.numel() == groups * nb * entries,
              "scales: contiguous float32 or float16 [ceil(N / 8), K / 32, 2 or 1, 8]");
  if (bias.has_value()) TORCH_CHECK(bias->is_contiguous() && bias->numel() == N, "bias: contiguous float [N]");
  Scratch& tmp = scratch();
  const float* xp = x.data_ptr<float>();
  int8_t* qp = at_least(tmp.q, M * K);
  float *dp = at_least(tmp.scales, 2 * M * nb), *sp = dp + M * nb;
  at::parallel_for(0, M * nb, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) quantize_block(xp + i * QK, qp + i * QK, dp + i, sp + i);
  });
  const QuantRows xr{qp, dp, sp, K, nb};
  const Q4Weights wr{qs.data_ptr<uint8_t>(), half ? nullptr : scales.data_ptr<float>(),
                     half ? reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()) : nullptr, nb, entries};
  TORCH_CHECK(y.is_contiguous() && y.scalar_type() == torch::kFloat && y.dim() == 2 && y.size(0) == M &&
              y.size(1) == N, accumulate ? "residual" : "out", ": contiguous float [M, N]");
  float* yp = y.data_ptr<float>();
  float* pp = (accumulate || bias.has_value()) ? at_least(tmp.product, M * N) : yp;
  const int64_t step = kPairs ? 2 : 1;      // threads split the groups at pair boundaries
  at::parallel_for(0, (groups + step - 1) / step, 1, [&](int64_t b, int64_t e) {
    product_groups(xr, M, wr, b * step, std::min(groups, e * step), pp, N);
  });
  if (pp != yp) {
    const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    at::parallel_for(0, M, 4, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) epilogue(pp + i * N, bp, yp + i * N, N, accumulate);
    });
  }
}

// What computes the 4-bit product in this build, for /server_info and the logs.
std::string q4_gemm_path() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return "w4a8 blocks of 32, rows by 16 (avx512_vnni vpdpbusd, 512-bit)";
#elif defined(__AVX512BW__)
  return "w4a8 blocks of 32, rows by 16 (avx512bw vpmaddubsw, 512-bit)";
#elif defined(__AVX2__)
  return "w4a8 blocks of 32, rows by 8 (avx2 vpmaddubsw)";
#else
  return "w4a8 blocks of 32, rows by 8 (portable loop)";
#endif
}
