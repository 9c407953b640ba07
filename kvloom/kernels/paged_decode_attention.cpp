// Decode attention straight over the paged KV pool: one query token per sequence.
//
// The PyTorch path gathers every sequence's blocks into a contiguous copy per
// layer per step, and at 32 sequences that copy (plus reading it back) is most
// of a decode step on a CPU. Here each (sequence, KV head) task walks its block
// table in place: scores for the whole context, softmax, then the weighted sum
// of values, for the group of query heads that share the KV head.
//
// Two pools are read: float (float32, or float16 widened as it is read), and int8 (keys with a scale per
// block and channel, values with a scale per token; a block still filling has
// its keys in float staging, see kvloom/kv/int8_kv_cache.py).
#include "kernels.h"
#include "balanced_split.h"
#include "paged_rows.h"
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// The longest head a float16 row is widened for (Gemma 3's are 256).
constexpr int64_t kMaxWidenedHead = 512;

// A pool row as float32: a float32 row in place; a float16 one copied into buf first, so both pools then run
// the same loops (the compiler vectorizes a float16 loop its own way, and its sums came out in other bits).
inline const float* widened(const float* row, float*, int64_t) { return row; }
inline const float* widened(const c10::Half* row, float* buf, int64_t n) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(row[i]);
  return buf;
}

inline float dot_scaled_i8(const float* q, const int8_t* k, const float* scale, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += q[i] * (static_cast<float>(k[i]) * scale[i]);
  return s;
}

// Softmax of scores[0..len) in place, returning nothing: scores become probabilities.
inline void softmax_inplace(float* scores, int64_t len) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < len; ++i) m = std::max(m, scores[i]);
  float sum = 0.f;
  for (int64_t i = 0; i < len; ++i) {
    scores[i] = std::exp(scores[i] - m);
    sum += scores[i];
  }
  const float inv = 1.f / sum;
  for (int64_t i = 0; i < len; ++i) scores[i] *= inv;
}

void check_common(const torch::Tensor& q, const torch::Tensor& pool, const torch::Tensor& tables,
                  const torch::Tensor& lens) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat && q.is_contiguous(), "q: contiguous float [n, heads, d]");
  TORCH_CHECK(pool.dim() == 4, "KV pool: [blocks, KV heads, block size, head size]");
  const int64_t bs = pool.size(2);   // rows are addressed by shift and mask (paged_rows.h)
  TORCH_CHECK(bs > 0 && (bs & (bs - 1)) == 0, "block size must be a power of two, got ", bs);
  TORCH_CHECK(tables.scalar_type() == torch::kLong && tables.is_contiguous(), "block tables: contiguous int64");
  TORCH_CHECK(lens.scalar_type() == torch::kLong && lens.is_contiguous(), "context lengths: contiguous int64");
}

// The loop both pools share. One task per (sequence, KV head): scores of its G query heads over the whole
// context, softmax, weighted sum of values. score(qrow, s, h, col, row, blk) is q . key; add_value(o, w, h,
// row, blk) adds w * value to o. col/row/blk: the table entry, the row in the block, the block id.
// masks (optional, int64 per sequence): position p of a context of length len is seen when p < len - 64 or
// bit len - 1 - p is set: a draft token sees its ancestors only (kvloom/spec/tree_attention.py).
// window > 0: a sliding-window layer; the query at position len - 1 sees positions len - window .. len - 1 only,
// and nothing before them is read.
template <typename Score, typename AddValue>
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& tables, const torch::Tensor& lens,
                               int64_t num_kv_heads, int64_t block_size, double scale, Score score,
                               AddValue add_value, torch::Tensor out, const int64_t* masks = nullptr,
                               int64_t window = 0) {
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), W = tables.size(1);
  const int64_t KVH = num_kv_heads, BS = block_size, G = H / KVH;
  const float* qp = q.data_ptr<float>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(BS));   // BS: a power of two (check_common)
  auto cost = [&](int64_t task) { return attention_task_cost(lp[task / KVH], window); };
  parallel_for_balanced(n * KVH, cost, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / KVH, h = task % KVH, len = lp[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0, n_seen = len - first;
      const int64_t* table = tp + s * W;
      scores.assign(G * n_seen, 0.f);   // scores[g * n_seen + i]: position first + i
      for (int64_t pos = first; pos < len; ++pos) {
        const int64_t col = pos >> shift, row = pos & (BS - 1);
        for (int64_t g = 0; g < G; ++g)
          scores[g * n_seen + pos - first] = score(qp + (s * H + h * G + g) * D, s, h, col, row, table[col]) * sc;
      }
      if (masks)
        for (int64_t pos = std::max<int64_t>(first, len - 64); pos < len; ++pos)
          if (!((static_cast<uint64_t>(masks[s]) >> (len - 1 - pos)) & 1))
            for (int64_t g = 0; g < G; ++g) scores[g * n_seen + pos - first] = -std::numeric_limits<float>::infinity();
      for (int64_t g = 0; g < G; ++g) {
        float* p = scores.data() + g * n_seen;
        softmax_inplace(p, n_seen);
        float* o = op + (s * H + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
        for (int64_t pos = first; pos < len; ++pos) add_value(o, p[pos - first], h, pos & (BS - 1), table[pos >> shift]);
      }
    }
  });
  return out;
}

void check_out(const torch::Tensor& out, const torch::Tensor& q) {
  TORCH_CHECK(out.scalar_type() == torch::kFloat && out.is_contiguous() && out.sizes() == q.sizes(),
              "attention output: contiguous float of q's shape");
}

const int64_t* mask_rows(const c10::optional<torch::Tensor>& masks, const torch::Tensor& q) {
  if (!masks.has_value()) return nullptr;
  TORCH_CHECK(masks->scalar_type() == torch::kLong && masks->is_contiguous() && masks->numel() == q.size(0),
              "masks: contiguous int64, one per sequence");
  return masks->data_ptr<int64_t>();
}

template <typename T>
torch::Tensor decode_attention_float(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                     const torch::Tensor& tables, const torch::Tensor& lens, double scale,
                                     const int64_t* mp, int64_t window, torch::Tensor out) {
  const int64_t KVH = k.size(1), BS = k.size(2), D = k.size(3);
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  constexpr bool in_place = std::is_same<T, float>::value;   // float32 rows are read where they lie
  TORCH_CHECK(in_place || D <= kMaxWidenedHead, "float16 KV pool: head size ", D, " over ", kMaxWidenedHead);
  auto score = [=](const float* qr, int64_t, int64_t h, int64_t, int64_t row, int64_t blk) {
    float buf[kMaxWidenedHead];
    return dot(qr, widened(kp + ((blk * KVH + h) * BS + row) * D, buf, D), D);
  };
  auto add_value = [=](float* o, float w, int64_t h, int64_t row, int64_t blk) {
    float buf[kMaxWidenedHead];
    const float* vr = widened(vp + ((blk * KVH + h) * BS + row) * D, buf, D);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] += w * vr[d];
  };
  return decode_attention(q, tables, lens, KVH, BS, scale, score, add_value, out, mp, window);
}

}  // namespace

// q [n, H, D] float32; k, v [NB, KVH, BS, D] float32 or float16; tables [n, W] int64; lens [n] int64
// -> out [n, H, D] float32; masks: see decode_attention.
torch::Tensor decode_attention_f32(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor tables,
                                   torch::Tensor lens, double scale, c10::optional<torch::Tensor> masks,
                                   int64_t window) {
  auto out = torch::empty_like(q);
  decode_attention_f32_into(q, k, v, tables, lens, scale, masks, window, out);
  return out;
}

// The same into out, a contiguous float tensor of q's shape (the decode stack's reused buffer).
void decode_attention_f32_into(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& tables, const torch::Tensor& lens, double scale,
                               const c10::optional<torch::Tensor>& masks, int64_t window, torch::Tensor& out) {
  check_common(q, k, tables, lens);
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && v.scalar_type() == k.scalar_type() &&
              (k.scalar_type() == torch::kFloat || k.scalar_type() == torch::kHalf), "float32 or float16 KV pool");
  check_out(out, q);
  const int64_t* mp = mask_rows(masks, q);
  // The vector kernels attend over whole contexts; a window takes the loop below (Gemma's heads of 256 would too).
  if (window <= 0 && decode_attention_f32_avx512(q, k, v, tables, lens, scale, mp, out)) return;
  if (k.scalar_type() == torch::kHalf)
    decode_attention_float<c10::Half>(q, k, v, tables, lens, scale, mp, window, out);
  else
    decode_attention_float<float>(q, k, v, tables, lens, scale, mp, window, out);
}

// int8 pool: kq, vq [NB, KVH, BS, D] int8; k_scale [NB, KVH, D]; v_scale [NB, KVH, BS] (float);
// k_stage [S, KVH, BS, D] float; slots [n, W] int64: the staging slot of each table entry, -1 when sealed;
// masks: see decode_attention.
torch::Tensor decode_attention_i8(torch::Tensor q, torch::Tensor kq, torch::Tensor k_scale, torch::Tensor vq,
                                  torch::Tensor v_scale, torch::Tensor k_stage, torch::Tensor tables,
                                  torch::Tensor slots, torch::Tensor lens, double scale,
                                  c10::optional<torch::Tensor> masks) {
  auto out = torch::empty_like(q);
  decode_attention_i8_into(q, kq, k_scale, vq, v_scale, k_stage, tables, slots, lens, scale, masks, out);
  return out;
}

// The same into out, a contiguous float tensor of q's shape.
void decode_attention_i8_into(const torch::Tensor& q, const torch::Tensor& kq, const torch::Tensor& k_scale,
                              const torch::Tensor& vq, const torch::Tensor& v_scale, const torch::Tensor& k_stage,
                              const torch::Tensor& tables, const torch::Tensor& slots, const torch::Tensor& lens,
                              double scale, const c10::optional<torch::Tensor>& masks, torch::Tensor& out) {
  check_common(q, kq, tables, lens);
  check_out(out, q);
  TORCH_CHECK(kq.is_contiguous() && vq.is_contiguous() && kq.scalar_type() == torch::kChar, "int8 KV pool");
  TORCH_CHECK(k_scale.scalar_type() == torch::kFloat && v_scale.scalar_type() == torch::kFloat &&
              k_stage.scalar_type() == torch::kFloat && k_stage.is_contiguous(), "float scales and staging");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.sizes() == tables.sizes(), "slots like tables");
  const int64_t KVH = kq.size(1), BS = kq.size(2), D = kq.size(3), W = tables.size(1);
  const int8_t* kp = kq.data_ptr<int8_t>();
  const int8_t* vp = vq.data_ptr<int8_t>();
  const float* ksp = k_scale.data_ptr<float>();
  const float* vsp = v_scale.data_ptr<float>();
  const float* stp = k_stage.data_ptr<float>();
  const int64_t* slp = slots.data_ptr<int64_t>();
  auto score = [=](const float* qr, int64_t s, int64_t h, int64_t col, int64_t row, int64_t blk) {
    const int64_t slot = slp[s * W + col];
    return slot >= 0 ? dot(qr, stp + ((slot * KVH + h) * BS + row) * D, D)
                     : dot_scaled_i8(qr, kp + ((blk * KVH + h) * BS + row) * D, ksp + (blk * KVH + h) * D, D);
  };
  auto add_value = [=](float* o, float w, int64_t h, int64_t row, int64_t blk) {
    const int8_t* vr = vp + ((blk * KVH + h) * BS + row) * D;
    const float wv = w * vsp[(blk * KVH + h) * BS + row];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] += wv * static_cast<float>(vr[d]);
  };
  decode_attention(q, tables, lens, KVH, BS, scale, score, add_value, out, mask_rows(masks, q));
}
