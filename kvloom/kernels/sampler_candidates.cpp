// The sampler's row kernels: the candidate search (per row, its largest values in order, enough of them for a
// top-k (a count) or a top-p (a mass), without sorting the vocabulary), the greedy rows' argmax, and a sampled
// row's whole draw in one pass of the row's memory (draw_rows, at the end).
//
// torch's topk over a 49k vocabulary cost ~4 ms a step for 48 rows, most of a sampled step's sampler time.
// Here a row is scanned in bands below its maximum (values >= max * 2^-10, then the next 2^-10, ... for a
// mass; >= max - 8, max - 16, ... for a count), each band's members appended with a vector compare; once the
// bands hold enough, a heap gives the members in order and the row stops as soon as its need is met. Only
// comparisons pick and order the candidates, so the values returned are the input's bits, and ties come
// out lowest index first. Rows run in parallel, each on its own.
#include "kernels.h"
#include "vec_exp.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// Appends the (value, index) of x[0:n] with lo <= value < hi (lo_open: lo < value) to vals/idx.
void append_band(const float* x, int64_t n, float lo, bool lo_open, float hi, std::vector<float>& vals,
                 std::vector<int32_t>& idx) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  const __m512i step = _mm512_set1_epi32(16);
  __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; i + 16 <= n; i += 16, iv = _mm512_add_epi32(iv, step)) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __mmask16 m = (lo_open ? _mm512_cmp_ps_mask(v, vlo, _CMP_GT_OQ) : _mm512_cmp_ps_mask(v, vlo, _CMP_GE_OQ)) &
                        _mm512_cmp_ps_mask(v, vhi, _CMP_LT_OQ);
    if (m) {
      const size_t at = vals.size(), k = __builtin_popcount(m);
      vals.resize(at + k);
      idx.resize(at + k);
      _mm512_mask_compressstoreu_ps(vals.data() + at, m, v);
      _mm512_mask_compressstoreu_epi32(idx.data() + at, m, iv);
    }
  }
#elif defined(__AVX2__)
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 above = lo_open ? _mm256_cmp_ps(v, vlo, _CMP_GT_OQ) : _mm256_cmp_ps(v, vlo, _CMP_GE_OQ);
    int m = _mm256_movemask_ps(_mm256_and_ps(above, _mm256_cmp_ps(v, vhi, _CMP_LT_OQ)));
    while (m) {
      const int j = __builtin_ctz(m);
      m &= m - 1;
      vals.push_back(x[i + j]);
      idx.push_back(static_cast<int32_t>(i + j));
    }
  }
#endif
  for (; i < n; ++i) {
    const float v = x[i];
    if ((lo_open ? v > lo : v >= lo) && v < hi) {
      vals.push_back(v);
      idx.push_back(static_cast<int32_t>(i));
    }
  }
}

float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 vm = _mm512_set1_ps(m);
  for (; i + 16 <= n; i += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(x + i));
  m = _mm512_reduce_max_ps(vm);
#elif defined(__AVX2__)
  __m256 vm = _mm256_set1_ps(m);
  for (; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i));
  float lanes[8];
  _mm256_storeu_ps(lanes, vm);
  for (float v : lanes) m = std::max(m, v);
#endif
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// The first index at or after `from` whose value equals `target` or, with nan, is a NaN; n when none.
int64_t first_match(const float* x, int64_t from, int64_t n, float target, bool match_value) {
  int64_t i = from;
#if defined(__AVX512F__)
  const __m512 vt = _mm512_set1_ps(target);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    __mmask16 m = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    if (match_value) m |= _mm512_cmp_ps_mask(v, vt, _CMP_EQ_OQ);
    if (m) return i + __builtin_ctz(m);
  }
#elif defined(__AVX2__)
  const __m256 vt = _mm256_set1_ps(target);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    __m256 m = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    if (match_value) m = _mm256_or_ps(m, _mm256_cmp_ps(v, vt, _CMP_EQ_OQ));
    if (const int bits = _mm256_movemask_ps(m)) return i + __builtin_ctz(bits);
  }
#endif
  for (; i < n; ++i)
    if (std::isnan(x[i]) || (match_value && x[i] == target)) return i;
  return n;
}

// torch.argmax of one row: the first index of its maximum, or of its first NaN if it has one.
int64_t row_argmax(const float* x, int64_t n) {
  const int64_t at = first_match(x, 0, n, row_max(x, n), true);   // the vector max may drop a NaN: look on
  if (at == n || std::isnan(x[at])) return at == n ? 0 : at;
  const int64_t nan = first_match(x, at + 1, n, 0.f, false);
  return nan < n ? nan : at;
}

struct Candidate {
  float value;
  int32_t index;
};

// Heap order: the top of the heap is the largest value, lowest index among equals.
bool after(const Candidate& a, const Candidate& b) {
  return a.value < b.value || (a.value == b.value && a.index > b.index);
}

// One row: its first `count` values in order, continued until their sum reaches `mass` (mass > 0: only
// positive values count, as for probabilities). Fewer when the row has fewer.
void row_candidates(const float* x, int64_t n, int64_t count, double mass, std::vector<float>& vals,
                    std::vector<int32_t>& idx, std::vector<Candidate>& out) {
  vals.clear();
  idx.clear();
  out.clear();
  const bool by_mass = mass > 0;
  const float top = row_max(x, n);
  if (std::isnan(top) || (by_mass && !(top > 0.f))) return;   // no candidates (non-finite rows end earlier)
  float hi = std::numeric_limits<float>::infinity();
  double band_mass = 0;
  for (int band = 0;; ++band) {
    // Bands: by mass, [max * 2^-10k, max * 2^-10(k-1)) down to the smallest positive value; by count,
    // [max - 8 * 2^k, ...) and, once max is not finite or the bands run out, everything left.
    float lo;
    bool last;
    if (by_mass) {
      lo = std::ldexp(top, -10 * (band + 1));
      last = lo < std::numeric_limits<float>::min();
      if (last) lo = 0.f;
    } else {
      lo = std::isfinite(top) && band < 12 ? top - std::ldexp(8.f, band) : -std::numeric_limits<float>::infinity();
      last = !(lo > -std::numeric_limits<float>::infinity());
    }
    const size_t before = vals.size();
    append_band(x, n, lo, by_mass && last, hi, vals, idx);
    if (by_mass)
      for (size_t j = before; j < vals.size(); ++j) band_mass += vals[j];
    if (last || (static_cast<int64_t>(vals.size()) >= count && (!by_mass || band_mass >= mass))) break;
    hi = lo;
  }
  std::vector<Candidate>& heap = out;   // built in place, then popped from the back
  heap.resize(vals.size());
  for (size_t j = 0; j < vals.size(); ++j) heap[j] = {vals[j], idx[j]};
  std::make_heap(heap.begin(), heap.end(), after);
  // Pop the largest to the end of the heap's range until the need is met; the popped tail is in order.
  auto end = heap.end();
  double sum = 0;
  int64_t taken = 0;
  while (end != heap.begin() && (taken < count || (by_mass && sum < mass))) {
    std::pop_heap(heap.begin(), end, after);
    --end;
    sum += end->value;
    ++taken;
  }
  std::reverse(end, heap.end());
  heap.erase(heap.begin(), end);
}

}  // namespace

// values [rows, n] float (contiguous); counts [rows] int64; masses [rows] float64 (0: no mass asked).
// -> (values [rows, width] in decreasing order, lowest index first among equals, zero-padded;
//     their indices [rows, width] int64, zero-padded; lengths [rows] int64), width the longest row's.
std::vector<torch::Tensor> top_candidates(torch::Tensor values, torch::Tensor counts, torch::Tensor masses) {
  TORCH_CHECK(values.dim() == 2 && values.scalar_type() == torch::kFloat && values.is_contiguous(),
              "top_candidates: contiguous float [rows, n]");
  const int64_t rows = values.size(0), n = values.size(1);
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), "top_candidates: rows longer than int32");
  auto c = counts.to(torch::kLong).contiguous();
  auto m = masses.to(torch::kDouble).contiguous();
  TORCH_CHECK(c.numel() == rows && m.numel() == rows, "top_candidates: one count and one mass a row");
  const float* xp = values.data_ptr<float>();
  const int64_t* cp = c.data_ptr<int64_t>();
  const double* mp = m.data_ptr<double>();
  std::vector<std::vector<Candidate>> found(rows);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> vals;
    std::vector<int32_t> idx;
    for (int64_t r = begin; r < end; ++r) row_candidates(xp + r * n, n, cp[r], mp[r], vals, idx, found[r]);
  });
  int64_t width = 0;
  for (const auto& f : found) width = std::max<int64_t>(width, f.size());
  auto out_v = torch::zeros({rows, width}, values.options());
  auto out_i = torch::zeros({rows, width}, torch::kLong);
  auto lens = torch::empty({rows}, torch::kLong);
  float* ov = out_v.data_ptr<float>();
  int64_t *oi = out_i.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    lp[r] = found[r].size();
    for (size_t j = 0; j < found[r].size(); ++j) {
      ov[r * width + j] = found[r][j].value;
      oi[r * width + j] = found[r][j].index;
    }
  }
  return {out_v, out_i, lens};
}

// values [rows, n] float (contiguous), n > 0 -> [rows] int64: each row's torch.argmax, without its scalar loop
// (~1 ms for 48 rows of a 49k vocabulary on 2 threads; this is ~0.1 ms).
torch::Tensor argmax_rows(torch::Tensor values) {
  TORCH_CHECK(values.dim() == 2 && values.scalar_type() == torch::kFloat && values.is_contiguous() &&
                  values.size(1) > 0,
              "argmax_rows: contiguous float [rows, n] with n > 0");
  const int64_t rows = values.size(0), n = values.size(1);
  auto out = torch::empty({rows}, torch::kLong);
  const float* xp = values.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op[r] = row_argmax(xp + r * n, n);
  });
  return out;
}

namespace {

// e[i] = exp(x[i] / temp - top) where x[i] / temp >= floor, else 0 (a masked -inf logit is 0 too, where the
// vector exp would give its smallest normal number). Returns the sum of e, added in double: the draw's
// running sum is, and a float sum of 49k terms is off by ~1e-4 of itself, enough to move ~1% of draws.
double row_exp(const float* x, int64_t n, float temp, float top, float floor, float* e) {
  int64_t i = 0;
  double sum = 0;
#if defined(__AVX512F__)
  const __m512 vt = _mm512_set1_ps(temp), vtop = _mm512_set1_ps(top), vfloor = _mm512_set1_ps(floor),
               vninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512d acc_lo = _mm512_setzero_pd(), acc_hi = _mm512_setzero_pd();
  for (; i + 16 <= n; i += 16) {
    const __m512 y = _mm512_div_ps(_mm512_loadu_ps(x + i), vt);
    const __mmask16 keep = _mm512_cmp_ps_mask(y, vfloor, _CMP_GE_OQ) & _mm512_cmp_ps_mask(y, vninf, _CMP_GT_OQ);
    const __m512 v = _mm512_maskz_mov_ps(keep, exp_nonpositive(_mm512_sub_ps(y, vtop)));
    _mm512_storeu_ps(e + i, v);
    acc_lo = _mm512_add_pd(acc_lo, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    acc_hi = _mm512_add_pd(acc_hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
  }
  sum = _mm512_reduce_add_pd(_mm512_add_pd(acc_lo, acc_hi));
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 vt = _mm256_set1_ps(temp), vtop = _mm256_set1_ps(top), vfloor = _mm256_set1_ps(floor),
               vninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256d acc_lo = _mm256_setzero_pd(), acc_hi = _mm256_setzero_pd();
  for (; i + 8 <= n; i += 8) {
    const __m256 y = _mm256_div_ps(_mm256_loadu_ps(x + i), vt);
    const __m256 keep = _mm256_and_ps(_mm256_cmp_ps(y, vfloor, _CMP_GE_OQ), _mm256_cmp_ps(y, vninf, _CMP_GT_OQ));
    const __m256 v = _mm256_and_ps(keep, exp_nonpositive(_mm256_sub_ps(y, vtop)));
    _mm256_storeu_ps(e + i, v);
    acc_lo = _mm256_add_pd(acc_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    acc_hi = _mm256_add_pd(acc_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  double lanes[4];
  _mm256_storeu_pd(lanes, _mm256_add_pd(acc_lo, acc_hi));
  for (double v : lanes) sum += v;
#endif
  for (; i < n; ++i) {
    const float y = x[i] / temp;
    e[i] = y >= floor && y > -std::numeric_limits<float>::infinity() ? std::exp(y - top) : 0.f;
    sum += e[i];
  }
  return sum;
}

// The first index whose running sum of w (in order) exceeds target, or last when none does: an inverse-CDF
// draw, which never lands on a zero weight.
int64_t first_past(const float* w, int64_t n, double target, int64_t last) {
  double run = 0;
  for (int64_t i = 0; i < n; ++i) {
    run += w[i];
    if (run > target) return i;
  }
  return last;
}

struct RowScratch {
  std::vector<float> e, vals, kept;
  std::vector<int32_t> idx;
  std::vector<Candidate> cands;
};

// One sampled row's token, the way sampler.py's torch path draws it: logits / temperature; top-k keeps the
// values at or above the k-th largest; softmax; min-p zeroes probabilities under min_p times the largest;
// top-p keeps the likeliest tokens until the mass before them reaches top_p; then the inverse-CDF draw at u
// (over the nucleus in order of likelihood, or over the whole row in vocabulary order without top-p).
// Probabilities are worked in units of the largest one (exp(y - max y) is 1 there), so min-p is a fixed
// threshold and only the draw's target needs the row's sum.
int64_t row_draw(const float* x, int64_t n, float temp, int64_t k, float top_p, float min_p, float u,
                 RowScratch& s) {
  const float inf = std::numeric_limits<float>::infinity();
  const float top_x = row_max(x, n);
  if (!(top_x > -inf)) return 0;   // every token masked: nothing can be drawn (the engine's grammars never do this)
  const float top = top_x / temp;  // dividing by a positive number keeps the order: max(x / t) = max(x) / t
  float floor = -inf;
  if (k > 0 && k < n) {            // the k-th largest logit, divided as every other
    row_candidates(x, n, k, 0.0, s.vals, s.idx, s.cands);
    floor = s.cands[k - 1].value / temp;
  }
  s.e.resize(n);
  float* e = s.e.data();
  const double total = row_exp(x, n, temp, top, floor, e);   // the softmax's denominator, min-p not applied
  double kept_total = total;
  if (min_p > 0) {
    kept_total = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (e[i] < min_p) e[i] = 0.f;
      kept_total += e[i];
    }
  }
  if (top_p >= 1.f) return first_past(e, n, static_cast<double>(u) * kept_total, n - 1);
  // The nucleus, searched among the candidates whose mass reaches top_p (with the margin sampler.py allows
  // for rounding), then cut where the mass before a token reaches top_p.
  const double need = static_cast<double>(top_p) * total;
  row_candidates(e, n, 0, need * (1 + 1e-5), s.vals, s.idx, s.cands);
  const int64_t m = s.cands.size();
  if (m == 0) return 0;
  s.kept.resize(m);
  double before = 0, kept_sum = 0;
  for (int64_t j = 0; j < m; ++j) {
    s.kept[j] = before >= need ? 0.f : s.cands[j].value;
    before += s.cands[j].value;
    kept_sum += s.kept[j];
  }
  return s.cands[first_past(s.kept.data(), m, static_cast<double>(u) * kept_sum, m - 1)].index;
}

}  // namespace

// values [rows, n] float logits (contiguous; masked tokens -inf); per row: temperature > 0, top_k (<= 0 or
// >= n: none), top_p in (0, 1], min_p in [0, 1], a uniform number in [0, 1) -> [rows] int64 tokens.
// sampler.py's native path: one kernel in place of a division, a softmax and a candidate search over the
// batch (~0.7 ms against ~3 ms a step for 48 rows of a 49k vocabulary).
torch::Tensor draw_rows(torch::Tensor values, torch::Tensor temperature, torch::Tensor top_k, torch::Tensor top_p,
                        torch::Tensor min_p, torch::Tensor uniforms) {
  TORCH_CHECK(values.dim() == 2 && values.scalar_type() == torch::kFloat && values.is_contiguous() &&
                  values.size(1) > 0,
              "draw_rows: contiguous float [rows, n] with n > 0");
  const int64_t rows = values.size(0), n = values.size(1);
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), "draw_rows: rows longer than int32");
  auto t = temperature.to(torch::kFloat).contiguous(), p = top_p.to(torch::kFloat).contiguous();
  auto mp = min_p.to(torch::kFloat).contiguous(), un = uniforms.to(torch::kFloat).contiguous();
  auto k = top_k.to(torch::kLong).contiguous();
  TORCH_CHECK(t.numel() == rows && p.numel() == rows && mp.numel() == rows && un.numel() == rows &&
                  k.numel() == rows,
              "draw_rows: one setting of each kind a row");
  const float *xp = values.data_ptr<float>(), *tp = t.data_ptr<float>(), *pp = p.data_ptr<float>(),
              *mpp = mp.data_ptr<float>(), *up = un.data_ptr<float>();
  const int64_t* kp = k.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) TORCH_CHECK(tp[r] > 0, "draw_rows: a temperature must be > 0");
  auto out = torch::empty({rows}, torch::kLong);
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    RowScratch s;
    for (int64_t r = begin; r < end; ++r) op[r] = row_draw(xp + r * n, n, tp[r], kp[r], pp[r], mpp[r], up[r], s);
  });
  return out;
}
