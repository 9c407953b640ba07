// Decode attention over the float pool with AVX-512 (or AVX2, below), for the head sizes and group sizes models use.
// The pool holds float32 or float16 (T = float or uint16_t): a float16 row is widened to float32 as it is loaded
// (vcvtph2ps, exact), so both pools run the same float arithmetic on the values they hold.
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

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// The score loops read each key row once per query head of the group: widened first, they widen nothing.
// A key row as float32: a float32 row in place, a float16 one widened once into row j of the tile.
template <int D>
inline const float* widen_key(const float* row, float*, int64_t) { return row; }
template <int D>
inline const float* widen_key(const uint16_t* row, float* tile, int64_t j) {
  float* buf = tile + j * D;
  for (int c = 0; c < D; c += 16) _mm512_storeu_ps(buf + c, load16(row + c));
  return buf;
}

template <typename T, int D, int G>
void attend(const float* q, const T* kp, const T* vp, const int64_t* table, int64_t len, int64_t KVH,
            int64_t BS, int64_t h, float scale, const int64_t* mask, float* scores, float* out) {
  constexpr int C = D / 16;
  const PagedRows rows_of{table, KVH, BS, h, D};
  auto row = [&](const T* pool, int64_t pos) { return rows_of.at(pool, pos); };
  const int64_t padded = (len + 15) / 16 * 16;
  alignas(64) float widened[sizeof(T) < sizeof(float) ? 16 * D : 1];
  for (int64_t j = 16; j < std::min<int64_t>(len, 32); ++j) prefetch_row<D>(row(kp, j));
  for (int64_t p0 = 0; p0 < len; p0 += 16) {
    const int64_t cnt = std::min<int64_t>(16, len - p0);
    const float* rows[16];
    for (int64_t j = 0; j < cnt; ++j) rows[j] = widen_key<D>(row(kp, p0 + j), widened, j);
    // Keys two groups ahead are fetched while these are scored: blocks are scattered 4 KB pieces, and
    // the hardware prefetcher stops at each one's end (18 -> 21-27 GB/s of KV read, 32 sequences).
    for (int64_t j = p0 + 32; j < std::min(len, p0 + 48); ++j) prefetch_row<D>(row(kp, j));
    // The values of these positions start on their way to L2 too, so the value pass begins warm and the two
    // streams overlap.
    for (int64_t j = p0; j < p0 + cnt; ++j) prefetch_row_l2<D>(row(vp, j));
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
    const T* vr = row(vp, pos);
    if (pos + 16 < len) prefetch_row<D>(row(vp, pos + 16));
    __m512 v[C];
    for (int c = 0; c < C; ++c) v[c] = load16(vr + c * 16);
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(scores[g * padded + pos]);
      for (int c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(w, v[c], acc[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c)
      _mm512_storeu_ps(out + g * D + c * 16, _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inv_sum[g])));
}

template <typename T, int D, int G>
void attend_all(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& tables,
                const torch::Tensor& lens, float scale, const int64_t* masks, torch::Tensor& out) {
  const int64_t n = q.size(0), H = q.size(1), W = tables.size(1), KVH = k.size(1), BS = k.size(2);
  const float* qp = q.data_ptr<float>();
  const T *kp = static_cast<const T*>(k.data_ptr()), *vp = static_cast<const T*>(v.data_ptr());
  const int64_t *tp = tables.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  parallel_for_balanced(n * KVH, [&](int64_t task) { return attention_task_cost(lp[task / KVH]); },
                        [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / KVH, h = task % KVH, len = lp[s];
      scores.resize(G * ((len + 15) / 16 * 16));
      const int64_t first = (s * H + h * G) * D;
      attend<T, D, G>(qp + first, kp, vp, tp + s * W, len, KVH, BS, h, scale, masks ? masks + s : nullptr,
                   scores.data(), op + first);
    }
  });
}

}  // namespace

#elif defined(__AVX2__) && defined(__FMA__)
// The same kernel for AVX2 machines, 8 lanes: scores eight positions at a time (an 8-way transpose-and-add
// of hadds), the vectorized softmax with the 8-lane exp, and the values in column slices of the head
// (16 ymm registers cannot hold a group's whole heads).
//
// A prompt chunk's rows are decodes of one sequence over one more position each (row i over len0 + i). Two
// such rows go together as one tile: each key and value row read serves both, and the scores pair their
// query vectors, so a multiply-add takes 0.75 loads instead of 2 (a ymm FMA waited on the load ports). Each
// (row, head, position) score and each row's softmax and value sums are the same float operations in the
// same order whichever tile holds the row: a row gets the same bits alone, in a decode batch or in a chunk.
#include <immintrin.h>

#include <cstring>

#include "vec_exp.h"

namespace {

// Stands in for the key rows past the longest context of a tile: their lanes' scores are never read.
alignas(32) const float kZeroRow[128] = {};

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// A key row as float32: in place, or a float16 one widened once into row j of the tile (the score loops read
// each key row once per pair of query vectors).
template <int D>
inline const float* widen_key(const float* row, float*, int64_t) { return row; }
template <int D>
inline const float* widen_key(const uint16_t* row, float* tile, int64_t j) {
  float* buf = tile + j * D;
  for (int c = 0; c < D; c += 8) _mm256_storeu_ps(buf + c, load8(row + c));
  return buf;
}

// NQ query vectors against four key rows: per vector, the four positions' partial sums added pairwise twice
// (hadd of hadds), the first half of an 8-position transpose-and-add; `complete` finishes it.
template <int C, int NQ>
inline void four_positions(const float* const* qv, const float* const* rows, __m256* u) {
  __m256 part[NQ][4];
  for (int c = 0; c < C; ++c) {
    __m256 qc[NQ];
    for (int n = 0; n < NQ; ++n) qc[n] = _mm256_loadu_ps(qv[n] + c * 8);
    for (int j = 0; j < 4; ++j) {
      const __m256 kv = _mm256_loadu_ps(rows[j] + c * 8);
      for (int n = 0; n < NQ; ++n) part[n][j] = c ? _mm256_fmadd_ps(qc[n], kv, part[n][j]) : _mm256_mul_ps(qc[n], kv);
    }
  }
  for (int n = 0; n < NQ; ++n)
    u[n] = _mm256_hadd_ps(_mm256_hadd_ps(part[n][0], part[n][1]), _mm256_hadd_ps(part[n][2], part[n][3]));
}

// Positions 0-3's and 4-7's halves -> the 8 scores, position j in lane j.
inline __m256 complete(__m256 lo, __m256 hi) {
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
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

// Rows a tile holds for a group size: two while their value accumulators fit the 16 registers.
constexpr int tile_rows(int G) { return G <= 7 ? 2 : 1; }

// Value columns (vectors) a pass: R x G x CB accumulators plus CB value vectors in registers.
constexpr int value_columns(int G, int R) {
  if (R == 1) return G == 1 ? 8 : G == 2 ? 4 : G <= 4 ? 2 : 1;
  return G == 1 ? 4 : G <= 3 ? 2 : 1;
}

// R rows of one sequence, row r over len0 + r positions, and the G query heads of KV head h (row r's heads
// at q + r * q_row, its outputs at out + r * out_row). scores: R * G * padded floats. A mask (draft rows) is
// only taken with R == 1.
template <typename T, int D, int G, int R>
void attend(const float* q, int64_t q_row, const T* kp, const T* vp, const int64_t* table, int64_t len0,
            int64_t KVH, int64_t BS, int64_t h, float scale, const int64_t* mask, float* scores, float* out,
            int64_t out_row) {
  constexpr int C = D / 8, N = R * G;
  constexpr int CB = value_columns(G, R);
  static_assert(C % CB == 0, "head size");
  const PagedRows rows_of{table, KVH, BS, h, D};
  auto row = [&](const T* pool, int64_t pos) { return rows_of.at(pool, pos); };
  const int64_t len_max = len0 + R - 1;
  const int64_t padded = (len_max + 7) / 8 * 8;
  alignas(32) float widened[sizeof(T) < sizeof(float) ? 8 * D : 1];
  const float* qv[N];   // query vector r * G + g: row r's head g
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) qv[r * G + g] = q + r * q_row + g * D;
  for (int64_t j = 8; j < std::min<int64_t>(len_max, 32); ++j) prefetch_row<D>(row(kp, j));
  for (int64_t p0 = 0; p0 < len_max; p0 += 8) {
    const int64_t cnt = std::min<int64_t>(8, len_max - p0);
    const float* rows[8];
    for (int64_t j = 0; j < 8; ++j) rows[j] = j < cnt ? widen_key<D>(row(kp, p0 + j), widened, j) : kZeroRow;
    for (int64_t j = p0 + 32; j < std::min(len_max, p0 + 40); ++j) prefetch_row<D>(row(kp, j));
    for (int64_t j = p0; j < p0 + cnt; ++j) prefetch_row_l2<D>(row(vp, j));   // values on their way to L2 (above)
    for (int a = 0; a < N; a += 2) {
      __m256 lo[2], hi[2];
      const int nq = a + 1 < N ? 2 : 1;
      if (nq == 2) {
        four_positions<C, 2>(qv + a, rows, lo);
        four_positions<C, 2>(qv + a, rows + 4, hi);
      } else {
        four_positions<C, 1>(qv + a, rows, lo);
        four_positions<C, 1>(qv + a, rows + 4, hi);
      }
      for (int n = 0; n < nq; ++n)
        _mm256_storeu_ps(scores + (a + n) * padded + p0, _mm256_mul_ps(complete(lo[n], hi[n]), _mm256_set1_ps(scale)));
    }
  }
  if (mask)
    for (int64_t pos = std::max<int64_t>(0, len0 - 64); pos < len0; ++pos)
      if (!((static_cast<uint64_t>(*mask) >> (len0 - 1 - pos)) & 1))
        for (int g = 0; g < G; ++g) scores[g * padded + pos] = -std::numeric_limits<float>::infinity();
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 low = _mm256_set1_ps(-3.0e38f), ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  float inv_sum[N];
  for (int a = 0; a < N; ++a) {   // softmax numerators in place (0 past the row's length); the division waits
    float* s = scores + a * padded;
    const int64_t len = len0 + a / G;
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
    inv_sum[a] = 1.f / hadd(sum);
  }
  for (int64_t pos = 0; pos < std::min<int64_t>(len_max, 16); ++pos) prefetch_row<D>(row(vp, pos));
  for (int c0 = 0; c0 < C; c0 += CB) {
    __m256 acc[N][CB];
    for (int a = 0; a < N; ++a)
      for (int c = 0; c < CB; ++c) acc[a][c] = _mm256_setzero_ps();
    // Position pos adds to the rows it is inside of: every row up to len0, then from row pos - len0 + 1 on.
    auto add_position = [&](int64_t pos, int first_row) {
      const T* vr = row(vp, pos) + c0 * 8;
      if (c0 == 0 && pos + 16 < len_max) prefetch_row<D>(row(vp, pos + 16));
      __m256 v[CB];
      for (int c = 0; c < CB; ++c) v[c] = load8(vr + c * 8);
      for (int a = 0; a < N; ++a) {
        if (a < first_row * G) continue;   // (constant indices keep the accumulators in registers)
        const __m256 w = _mm256_set1_ps(scores[a * padded + pos]);
        for (int c = 0; c < CB; ++c) acc[a][c] = _mm256_fmadd_ps(w, v[c], acc[a][c]);
      }
    };
    for (int64_t pos = 0; pos < len0; ++pos) add_position(pos, 0);
    for (int64_t pos = len0; pos < len_max; ++pos) add_position(pos, static_cast<int>(pos - len0 + 1));
    for (int a = 0; a < N; ++a)
      for (int c = 0; c < CB; ++c)
        _mm256_storeu_ps(out + (a / G) * out_row + (a % G) * D + (c0 + c) * 8,
                         _mm256_mul_ps(acc[a][c], _mm256_set1_ps(inv_sum[a])));
  }
}

// A tile: `count` rows from `first` (one, or two whose contexts are one sequence's, one position apart).
struct Tile {
  int64_t first, count;
};

// Row i + 1 continues row i: the same blocks and one more position, neither a masked draft row.
bool continues(const int64_t* tp, int64_t W, const int64_t* lp, const int64_t* masks, int64_t BS, int64_t i) {
  if (lp[i + 1] != lp[i] + 1) return false;
  if (masks && (masks[i] != -1 || masks[i + 1] != -1)) return false;
  const int64_t used = std::min<int64_t>(W, (lp[i + 1] + BS - 1) / BS);
  return std::memcmp(tp + i * W, tp + (i + 1) * W, used * sizeof(int64_t)) == 0;
}

template <typename T, int D, int G>
void attend_all(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& tables,
                const torch::Tensor& lens, float scale, const int64_t* masks, torch::Tensor& out) {
  constexpr int R = tile_rows(G);
  const int64_t n = q.size(0), H = q.size(1), W = tables.size(1), KVH = k.size(1), BS = k.size(2);
  const float* qp = q.data_ptr<float>();
  const T *kp = static_cast<const T*>(k.data_ptr()), *vp = static_cast<const T*>(v.data_ptr());
  const int64_t *tp = tables.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  std::vector<Tile> tiles;
  tiles.reserve(n);
  for (int64_t i = 0; i < n;) {
    const int64_t count = R == 2 && i + 1 < n && continues(tp, W, lp, masks, BS, i) ? 2 : 1;
    tiles.push_back({i, count});
    i += count;
  }
  const int64_t num_tiles = static_cast<int64_t>(tiles.size());
  parallel_for_balanced(num_tiles * KVH, [&](int64_t task) {
    const Tile& t = tiles[task / KVH];
    return t.count * attention_task_cost(lp[t.first]);
  }, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const Tile& t = tiles[task / KVH];
      const int64_t s = t.first, h = task % KVH, len = lp[s];
      scores.resize(R * G * ((len + R + 6) / 8 * 8));
      const int64_t first = (s * H + h * G) * D;
      if (t.count == 2)
        attend<T, D, G, R>(qp + first, H * D, kp, vp, tp + s * W, len, KVH, BS, h, scale, nullptr, scores.data(),
                        op + first, H * D);
      else
        attend<T, D, G, 1>(qp + first, H * D, kp, vp, tp + s * W, len, KVH, BS, h, scale, masks ? masks + s : nullptr,
                        scores.data(), op + first, H * D);
    }
  });
}

}  // namespace

#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
namespace {

// attend_all<T, D, G>: the class's kernel above, for a pool of T (float, or uint16_t holding float16).
template <typename T, int D>
bool attend_group(int64_t G, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                  const torch::Tensor& tables, const torch::Tensor& lens, float scale, const int64_t* masks,
                  torch::Tensor& out) {
  switch (G) {
    case 1: attend_all<T, D, 1>(q, k, v, tables, lens, scale, masks, out); return true;
    case 2: attend_all<T, D, 2>(q, k, v, tables, lens, scale, masks, out); return true;
    case 3: attend_all<T, D, 3>(q, k, v, tables, lens, scale, masks, out); return true;
    case 4: attend_all<T, D, 4>(q, k, v, tables, lens, scale, masks, out); return true;
    case 5: attend_all<T, D, 5>(q, k, v, tables, lens, scale, masks, out); return true;
    case 6: attend_all<T, D, 6>(q, k, v, tables, lens, scale, masks, out); return true;
    case 7: attend_all<T, D, 7>(q, k, v, tables, lens, scale, masks, out); return true;
    case 8: attend_all<T, D, 8>(q, k, v, tables, lens, scale, masks, out); return true;
    default: return false;
  }
}

}  // namespace

bool decode_attention_f32_avx512(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                 const torch::Tensor& tables, const torch::Tensor& lens, double scale,
                                 const int64_t* masks, torch::Tensor& out) {
  const int64_t G = q.size(1) / k.size(1), D = k.size(3);
  const float sc = static_cast<float>(scale);
  if (k.scalar_type() == torch::kHalf) {
    if (D == 64) return attend_group<uint16_t, 64>(G, q, k, v, tables, lens, sc, masks, out);
    if (D == 128) return attend_group<uint16_t, 128>(G, q, k, v, tables, lens, sc, masks, out);
    return false;
  }
  if (D == 64) return attend_group<float, 64>(G, q, k, v, tables, lens, sc, masks, out);
  if (D == 128) return attend_group<float, 128>(G, q, k, v, tables, lens, sc, masks, out);
  return false;
}

#else

bool decode_attention_f32_avx512(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                 const torch::Tensor&, const torch::Tensor&, double, const int64_t*, torch::Tensor&) {
  return false;
}

#endif
