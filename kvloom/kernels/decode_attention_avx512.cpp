// Decode attention over the float pool with AVX-512 (or AVX2, below), for the head sizes and group sizes models use.
//
// The portable kernel (paged_decode_attention.cpp) ran at ~9 GB/s of KV read here, a third of the
// machine's read speed: each score ended in a horizontal sum, each exp was scalar, and each query head
// of a group re-read the value rows. Here, per (sequence, KV head):
//   scores  sixteen positions at a time: per query head, sixteen 16-lane partial dot products folded
//           into one vector of sixteen scores by a transpose-and-add tree (45 shuffles/adds, not 16 sums);
//   softmax vectorized, with a polynomial exp (relative error ~1e-7);
//   values  one pass over the rows, every query head of the group accumulating in registers.
#include "kernels.h"
#include "balanced_split.h"
#include "paged_rows.h"

#include <ATen/Parallel.h>

#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>

#include "vec_exp.h"

namespace {

// v[j] holds 16 partial sums of position j's score; returns the 16 totals, position j in lane j.
inline __m512 sum_each(__m512* v) {
  __m512 a[8], b[4], c[2];
  for (int j = 0; j < 8; ++j)   // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3]
    a[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  for (int j = 0; j < 4; ++j) {  // per 128-bit lane: the lane's sum of four positions
    const __m512d x = _mm512_castps_pd(a[2 * j]), y = _mm512_castps_pd(a[2 * j + 1]);
    b[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int j = 0; j < 2; ++j)    // across 128-bit lanes, two at a time
    c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

template <int D>
inline void prefetch_row(const float* r) {
  for (int c = 0; c < D; c += 16) _mm_prefetch(reinterpret_cast<const char*>(r + c), _MM_HINT_T0);
}

template <int D, int G>
void attend(const float* q, const float* kp, const float* vp, const int64_t* table, int64_t len, int64_t KVH,
            int64_t BS, int64_t h, float scale, const int64_t* mask, float* scores, float* out) {
  constexpr int C = D / 16;
  const PagedRows rows_of{table, KVH, BS, h, D};
  auto row = [&](const float* pool, int64_t pos) { return rows_of.at(pool, pos); };
  const int64_t padded = (len + 15) / 16 * 16;
  for (int64_t j = 16; j < std::min<int64_t>(len, 32); ++j) prefetch_row<D>(row(kp, j));
  for (int64_t p0 = 0; p0 < len; p0 += 16) {
    const int64_t cnt = std::min<int64_t>(16, len - p0);
    const float* rows[16];
    for (int64_t j = 0; j < cnt; ++j) rows[j] = row(kp, p0 + j);
    // Keys two groups ahead are fetched while these are scored: blocks are scattered 4 KB pieces, and
    // the hardware prefetcher stops at each one's end (18 -> 21-27 GB/s of KV read, 32 sequences).
    for (int64_t j = p0 + 32; j < std::min(len, p0 + 48); ++j) prefetch_row<D>(row(kp, j));
    for (int g = 0; g < G; ++g) {
      __m512 qv[C], part[16];
      for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(q + g * D + c * 16);
      for (int64_t j = 0; j < 16; ++j) {
        if (j >= cnt) { part[j] = _mm512_setzero_ps(); continue; }
        __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(rows[j]));
        for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(rows[j] + c * 16), acc);
        part[j] = acc;
      }
      _mm512_storeu_ps(scores + g * padded + p0, _mm512_mul_ps(sum_each(part), _mm512_set1_ps(scale)));
    }
  }
  if (mask)   // positions a draft token does not see score as minus infinity (exactly 0 after the softmax)
    for (int64_t pos = std::max<int64_t>(0, len - 64); pos < len; ++pos)
      if (!((static_cast<uint64_t>(*mask) >> (len - 1 - pos)) & 1))
        for (int g = 0; g < G; ++g) scores[g * padded + pos] = -std::numeric_limits<float>::infinity();
  float inv_sum[G];
  for (int g = 0; g < G; ++g) {   // softmax numerators in place; the division waits for the end
    float* s = scores + g * padded;
    const __mmask16 tail = (len % 16) ? (__mmask16)((1u << (len % 16)) - 1) : (__mmask16)0xFFFF;
    __m512 m = _mm512_set1_ps(-3.0e38f);
    for (int64_t p0 = 0; p0 < len; p0 += 16)
      m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, p0 + 16 > len ? tail : (__mmask16)0xFFFF, s + p0));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t p0 = 0; p0 < len; p0 += 16) {
      const __mmask16 k = p0 + 16 > len ? tail : (__mmask16)0xFFFF;
      const __m512 x = _mm512_loadu_ps(s + p0);
      const __mmask16 seen = k & _mm512_cmp_ps_mask(x, _mm512_set1_ps(-std::numeric_limits<float>::infinity()),
                                                    _CMP_NEQ_OQ);
      const __m512 e = _mm512_maskz_mov_ps(seen, exp_nonpositive(_mm512_sub_ps(x, mx)));
      _mm512_storeu_ps(s + p0, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv_sum[g] = 1.f / _mm512_reduce_add_ps(sum);
  }
  __m512 acc[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t pos = 0; pos < std::min<int64_t>(len, 16); ++pos) prefetch_row<D>(row(vp, pos));
  for (int64_t pos = 0; pos < len; ++pos) {
    const float* vr = row(vp, pos);
    if (pos + 16 < len) prefetch_row<D>(row(vp, pos + 16));
    __m512 v[C];
    for (int c = 0; c < C; ++c) v[c] = _mm512_loadu_ps(vr + c * 16);
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(scores[g * padded + pos]);
      for (int c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(w, v[c], acc[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c)
      _mm512_storeu_ps(out + g * D + c * 16, _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inv_sum[g])));
}

template <int D, int G>
void attend_all(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& tables,
                const torch::Tensor& lens, float scale, const int64_t* masks, torch::Tensor& out) {
  const int64_t n = q.size(0), H = q.size(1), W = tables.size(1), KVH = k.size(1), BS = k.size(2);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const int64_t *tp = tables.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  parallel_for_balanced(n * KVH, [&](int64_t task) { return attention_task_cost(lp[task / KVH]); },
                        [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / KVH, h = task % KVH, len = lp[s];
      scores.resize(G * ((len + 15) / 16 * 16));
      const int64_t first = (s * H + h * G) * D;
      attend<D, G>(qp + first, kp, vp, tp + s * W, len, KVH, BS, h, scale, masks ? masks + s : nullptr,
                   scores.data(), op + first);
    }
  });
}

template <int D>
bool attend_group(int64_t G, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                  const torch::Tensor& tables, const torch::Tensor& lens, float scale, const int64_t* masks,
                  torch::Tensor& out) {
  switch (G) {
    case 1: attend_all<D, 1>(q, k, v, tables, lens, scale, masks, out); return true;
    case 2: attend_all<D, 2>(q, k, v, tables, lens, scale, masks, out); return true;
    case 3: attend_all<D, 3>(q, k, v, tables, lens, scale, masks, out); return true;
    case 4: attend_all<D, 4>(q, k, v, tables, lens, scale, masks, out); return true;
    case 5: attend_all<D, 5>(q, k, v, tables, lens, scale, masks, out); return true;
    case 6: attend_all<D, 6>(q, k, v, tables, lens, scale, masks, out); return true;
    case 7: attend_all<D, 7>(q, k, v, tables, lens, scale, masks, out); return true;
    case 8: attend_all<D, 8>(q, k, v, tables, lens, scale, masks, out); return true;
    default: return false;
  }
}

}  // namespace

bool decode_attention_f32_avx512(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                 const torch::Tensor& tables, const torch::Tensor& lens, double scale,
                                 const int64_t* masks, torch::Tensor& out) {
  const int64_t G = q.size(1) / k.size(1), D = k.size(3);
  if (D == 64) return attend_group<64>(G, q, k, v, tables, lens, static_cast<float>(scale), masks, out);
  if (D == 128) return attend_group<128>(G, q, k, v, tables, lens, static_cast<float>(scale), masks, out);
  return false;
}

#elif defined(__AVX2__) && defined(__FMA__)
// The same kernel for AVX2 machines, 8 lanes: scores eight positions at a time (an 8-way transpose-and-add
// of hadds), the vectorized softmax with the 8-lane exp, and the values in column slices of the head
// (G query heads x CB vectors of accumulators: 16 ymm registers cannot hold a group's whole heads).
#include <immintrin.h>

#include "vec_exp.h"

namespace {

// v[j] holds 8 partial sums of position j's score; returns the 8 totals, position j in lane j.
inline __m256 sum_each(const __m256* v) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);   // [lo halves of 4 | hi halves of 4]
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline float hadd(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  m = _mm_add_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

template <int D>
inline void prefetch_row(const float* r) {
  for (int c = 0; c < D; c += 16) _mm_prefetch(reinterpret_cast<const char*>(r + c), _MM_HINT_T0);
}

template <int D, int G>
void attend(const float* q, const float* kp, const float* vp, const int64_t* table, int64_t len, int64_t KVH,
            int64_t BS, int64_t h, float scale, const int64_t* mask, float* scores, float* out) {
  constexpr int C = D / 8;
  constexpr int CB = G == 1 ? 8 : G == 2 ? 4 : G <= 4 ? 2 : 1;   // value columns (vectors) a pass
  static_assert(C % CB == 0, "head size");
  const PagedRows rows_of{table, KVH, BS, h, D};
  auto row = [&](const float* pool, int64_t pos) { return rows_of.at(pool, pos); };
  const int64_t padded = (len + 7) / 8 * 8;
  for (int64_t j = 8; j < std::min<int64_t>(len, 32); ++j) prefetch_row<D>(row(kp, j));
  for (int64_t p0 = 0; p0 < len; p0 += 8) {
    const int64_t cnt = std::min<int64_t>(8, len - p0);
    const float* rows[8];
    for (int64_t j = 0; j < cnt; ++j) rows[j] = row(kp, p0 + j);
    for (int64_t j = p0 + 32; j < std::min(len, p0 + 40); ++j) prefetch_row<D>(row(kp, j));
    for (int g = 0; g < G; ++g) {
      const float* qg = q + g * D;
      __m256 part[8];
      for (int64_t j = 0; j < 8; ++j) {
        if (j >= cnt) { part[j] = _mm256_setzero_ps(); continue; }
        __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(qg), _mm256_loadu_ps(rows[j]));
        for (int c = 1; c < C; ++c) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + c * 8), _mm256_loadu_ps(rows[j] + c * 8), acc);
        part[j] = acc;
      }
      _mm256_storeu_ps(scores + g * padded + p0, _mm256_mul_ps(sum_each(part), _mm256_set1_ps(scale)));
    }
  }
  if (mask)
    for (int64_t pos = std::max<int64_t>(0, len - 64); pos < len; ++pos)
      if (!((static_cast<uint64_t>(*mask) >> (len - 1 - pos)) & 1))
        for (int g = 0; g < G; ++g) scores[g * padded + pos] = -std::numeric_limits<float>::infinity();
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 low = _mm256_set1_ps(-3.0e38f), ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  float inv_sum[G];
  for (int g = 0; g < G; ++g) {   // softmax numerators in place (0 past len); the division waits for the end
    float* s = scores + g * padded;
    __m256 m = low;
    for (int64_t p0 = 0; p0 < len; p0 += 8) {
      const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(len - p0)), iota));
      m = _mm256_max_ps(m, _mm256_blendv_ps(low, _mm256_loadu_ps(s + p0), valid));
    }
    const __m256 mx = _mm256_set1_ps(hmax(m));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t p0 = 0; p0 < len; p0 += 8) {
      const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(len - p0)), iota));
      const __m256 x = _mm256_loadu_ps(s + p0);
      const __m256 seen = _mm256_and_ps(valid, _mm256_cmp_ps(x, ninf, _CMP_NEQ_OQ));
      const __m256 e = _mm256_and_ps(seen, exp_nonpositive(_mm256_sub_ps(x, mx)));
      _mm256_storeu_ps(s + p0, e);
      sum = _mm256_add_ps(sum, e);
    }
    inv_sum[g] = 1.f / hadd(sum);
  }
  for (int64_t pos = 0; pos < std::min<int64_t>(len, 16); ++pos) prefetch_row<D>(row(vp, pos));
  for (int c0 = 0; c0 < C; c0 += CB) {
    __m256 acc[G][CB];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < CB; ++c) acc[g][c] = _mm256_setzero_ps();
    for (int64_t pos = 0; pos < len; ++pos) {
      const float* vr = row(vp, pos) + c0 * 8;
      if (c0 == 0 && pos + 16 < len) prefetch_row<D>(row(vp, pos + 16));
      __m256 v[CB];
      for (int c = 0; c < CB; ++c) v[c] = _mm256_loadu_ps(vr + c * 8);
      for (int g = 0; g < G; ++g) {
        const __m256 w = _mm256_set1_ps(scores[g * padded + pos]);
        for (int c = 0; c < CB; ++c) acc[g][c] = _mm256_fmadd_ps(w, v[c], acc[g][c]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < CB; ++c)
        _mm256_storeu_ps(out + g * D + (c0 + c) * 8, _mm256_mul_ps(acc[g][c], _mm256_set1_ps(inv_sum[g])));
  }
}

template <int D, int G>
void attend_all(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& tables,
                const torch::Tensor& lens, float scale, const int64_t* masks, torch::Tensor& out) {
  const int64_t n = q.size(0), H = q.size(1), W = tables.size(1), KVH = k.size(1), BS = k.size(2);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const int64_t *tp = tables.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  parallel_for_balanced(n * KVH, [&](int64_t task) { return attention_task_cost(lp[task / KVH]); },
                        [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / KVH, h = task % KVH, len = lp[s];
      scores.resize(G * ((len + 15) / 16 * 16));
      const int64_t first = (s * H + h * G) * D;
      attend<D, G>(qp + first, kp, vp, tp + s * W, len, KVH, BS, h, scale, masks ? masks + s : nullptr,
                   scores.data(), op + first);
    }
  });
}

template <int D>
bool attend_group(int64_t G, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                  const torch::Tensor& tables, const torch::Tensor& lens, float scale, const int64_t* masks,
                  torch::Tensor& out) {
  switch (G) {
    case 1: attend_all<D, 1>(q, k, v, tables, lens, scale, masks, out); return true;
    case 2: attend_all<D, 2>(q, k, v, tables, lens, scale, masks, out); return true;
    case 3: attend_all<D, 3>(q, k, v, tables, lens, scale, masks, out); return true;
    case 4: attend_all<D, 4>(q, k, v, tables, lens, scale, masks, out); return true;
    case 5: attend_all<D, 5>(q, k, v, tables, lens, scale, masks, out); return true;
    case 6: attend_all<D, 6>(q, k, v, tables, lens, scale, masks, out); return true;
    case 7: attend_all<D, 7>(q, k, v, tables, lens, scale, masks, out); return true;
    case 8: attend_all<D, 8>(q, k, v, tables, lens, scale, masks, out); return true;
    default: return false;
  }
}

}  // namespace

bool decode_attention_f32_avx512(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                 const torch::Tensor& tables, const torch::Tensor& lens, double scale,
                                 const int64_t* masks, torch::Tensor& out) {
  const int64_t G = q.size(1) / k.size(1), D = k.size(3);
  if (D == 64) return attend_group<64>(G, q, k, v, tables, lens, static_cast<float>(scale), masks, out);
  if (D == 128) return attend_group<128>(G, q, k, v, tables, lens, static_cast<float>(scale), masks, out);
  return false;
}

#else

bool decode_attention_f32_avx512(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                 const torch::Tensor&, const torch::Tensor&, double, const int64_t*, torch::Tensor&) {
  return false;
}

#endif
