// The sampler's kernels: a greedy row's argmax, and a sampled row's whole draw in one kernel a row
// (temperature, top-k, softmax, min-p, top-p, then the inverse-CDF draw at the row's uniform number), the way
// sampler.py's torch path does them (the same filters, the same order of tokens; probabilities equal up to
// float rounding).
//
// Nothing sorts the vocabulary. Probabilities are kept in units of the row's largest (e = exp(y - max y), 1
// at the top), so min-p is a fixed threshold. The top-k threshold, the end of the top-p nucleus and the place
// the draw lands in it are each a point of the row in sorted order; each is found by vector passes that count
// (or add up) the values at or above a level, halving a bracket of levels until few values lie inside, and
// only those few are sorted. A flat row, whose nucleus holds thousands of tokens, takes a few dozen passes,
// where putting its nucleus in order took ~0.6 ms.
#include "kernels.h"
#include "vec_exp.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// The largest of x[0:n]; the vector loops may pass over a NaN (callers that care look for NaNs themselves).
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

// Appends the (value, index) of x[0:n] with lo <= value < hi to vals/idx, in index order.
void append_band(const float* x, int64_t n, float lo, float hi, std::vector<float>& vals, std::vector<int32_t>& idx) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  const __m512i step = _mm512_set1_epi32(16);
  __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; i + 16 <= n; i += 16, iv = _mm512_add_epi32(iv, step)) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __mmask16 m = _mm512_cmp_ps_mask(v, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v, vhi, _CMP_LT_OQ);
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
    int m = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(v, vlo, _CMP_GE_OQ), _mm256_cmp_ps(v, vhi, _CMP_LT_OQ)));
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
    if (v >= lo && v < hi) {
      vals.push_back(v);
      idx.push_back(static_cast<int32_t>(i));
    }
  }
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

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kFewInBracket = 64;   // a bracket holding this many values or fewer is sorted

struct Above {
  int64_t count;
  double mass;
};

// The values of x[0:n] at or above t: how many, and their sum (in double: a float sum of 49k terms is off by
// ~1e-4 of itself).
Above at_least(const float* x, int64_t n, float t) {
  int64_t i = 0, count = 0;
  double mass = 0;
#if defined(__AVX512F__)
  const __m512 vt = _mm512_set1_ps(t);
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __mmask16 m = _mm512_cmp_ps_mask(v, vt, _CMP_GE_OQ);
    if (!m) continue;
    count += __builtin_popcount(m);
    const __m512 kept = _mm512_maskz_mov_ps(m, v);
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(kept)));
    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(kept), 1))));
  }
  mass = _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
#elif defined(__AVX2__)
  const __m256 vt = _mm256_set1_ps(t);
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 m = _mm256_cmp_ps(v, vt, _CMP_GE_OQ);
    const int bits = _mm256_movemask_ps(m);
    if (!bits) continue;
    count += __builtin_popcount(bits);
    const __m256 kept = _mm256_and_ps(m, v);
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(kept)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(kept, 1)));
  }
  double lanes[4];
  _mm256_storeu_pd(lanes, _mm256_add_pd(lo, hi));
  for (double v : lanes) mass += v;
#endif
  for (; i < n; ++i)
    if (x[i] >= t) {
      ++count;
      mass += x[i];
    }
  return {count, mass};
}

// The k-th largest of x[0:n] (1 <= k < n, no NaNs): torch.topk(x, k).values[k - 1]. Levels below the top
// widen (8, 16, 32, ...) until k values are at or above one; the bracket is then halved until few values lie
// inside it, and those are selected among.
float kth_largest(const float* x, int64_t n, float top, int64_t k, std::vector<float>& band,
                  std::vector<int32_t>& idx) {
  float hi = std::nextafter(top, kInf), lo = top;
  int64_t above_hi = 0, above_lo = at_least(x, n, lo).count;
  for (float width = 8.f; above_lo < k; width *= 2.f) {
    hi = lo;
    above_hi = above_lo;
    lo = std::isfinite(top - width) ? top - width : -kInf;
    above_lo = lo == -kInf ? n : at_least(x, n, lo).count;
  }
  while (above_lo - above_hi > kFewInBracket && lo > -kInf) {
    const float mid = lo + (hi - lo) * 0.5f;
    if (!(mid > lo && mid < hi)) break;   // adjacent floats: what is left are ties
    const int64_t c = at_least(x, n, mid).count;
    if (c >= k) lo = mid, above_lo = c;
    else hi = mid, above_hi = c;
  }
  band.clear();
  idx.clear();
  append_band(x, n, lo, hi, band, idx);
  const int64_t want = k - above_hi;   // 1 <= want <= band.size()
  std::nth_element(band.begin(), band.begin() + (want - 1), band.end(), std::greater<float>());
  return band[want - 1];
}

// A token's place in the row's sorted order (values down, indices up among equal ones), and the sum of the
// values from the top through it.
struct Place {
  float value;
  int64_t index;
  double mass_through;
};

bool before(const Place& a, const Place& b) { return a.value > b.value || (a.value == b.value && a.index < b.index); }

struct RowScratch {
  std::vector<float> e, band;
  std::vector<int32_t> idx;
  std::vector<Place> sorted;   // mass_cut's bracket, in order; from the top when `from_top`
  bool from_top = false;
};

// The first of `sorted` (from_top: the row's values from its largest down) where the running sum passes
// target: exceeds it (strict) or reaches it; the last when none does (rounding).
Place walk(std::vector<Place>& sorted, double start, double target, bool strict) {
  double run = start;
  for (Place& p : sorted) {
    run += p.value;
    p.mass_through = run;
    if (strict ? run > target : run >= target) return p;
  }
  return sorted.empty() ? Place{0.f, 0, run} : sorted.back();
}

// The first place in sorted order where the running sum of e[0:n] (positive values only; e's top is `top`)
// passes target: exceeds it (strict) or reaches it. The last positive value when nothing does (rounding).
// Leaves the bracket's values in order in s.sorted.
Place mass_cut(const float* e, int64_t n, float top, double target, bool strict, RowScratch& s) {
  auto passes = [&](double m) { return strict ? m > target : m >= target; };
  const float smallest = std::numeric_limits<float>::denorm_min();
  float hi = std::nextafter(top, kInf), lo = std::max(std::ldexp(top, -10), smallest);
  Above a_hi{0, 0.0}, a_lo = at_least(e, n, lo);
  for (int k = 2; !passes(a_lo.mass) && lo > smallest; ++k) {   // bands of 2^-10 of the top
    hi = lo;
    a_hi = a_lo;
    lo = std::max(std::ldexp(top, -10 * k), smallest);
    a_lo = at_least(e, n, lo);
  }
  while (a_lo.count - a_hi.count > kFewInBracket && passes(a_lo.mass)) {
    const float mid = lo + (hi - lo) * 0.5f;
    if (!(mid > lo && mid < hi)) break;
    const Above a = at_least(e, n, mid);
    if (passes(a.mass)) lo = mid, a_lo = a;
    else hi = mid, a_hi = a;
  }
  s.band.clear();
  s.idx.clear();
  append_band(e, n, lo, hi, s.band, s.idx);
  s.sorted.resize(s.band.size());
  for (size_t j = 0; j < s.band.size(); ++j) s.sorted[j] = {s.band[j], s.idx[j], 0.0};
  std::sort(s.sorted.begin(), s.sorted.end(), before);
  s.from_top = a_hi.count == 0;
  return walk(s.sorted, a_hi.mass, target, strict);
}

// e[i] = exp(x[i] / temp - top) where x[i] / temp >= floor, else 0 (a masked -inf logit too, where the vector
// exp would give its smallest normal number). Returns the sum of e; then zeroes e under min_p (min-p in units
// of the largest probability) and returns that sum in kept.
double row_exp(const float* x, int64_t n, float temp, float top, float floor, float min_p, float* e, double& kept) {
  int64_t i = 0;
  double sum = 0, sum_kept = 0;
#if defined(__AVX512F__)
  const __m512 vt = _mm512_set1_ps(temp), vtop = _mm512_set1_ps(top), vfloor = _mm512_set1_ps(floor),
               vninf = _mm512_set1_ps(-kInf), vmin = _mm512_set1_ps(min_p);
  __m512d a_lo = _mm512_setzero_pd(), a_hi = _mm512_setzero_pd(), k_lo = a_lo, k_hi = a_lo;
  for (; i + 16 <= n; i += 16) {
    const __m512 y = _mm512_div_ps(_mm512_loadu_ps(x + i), vt);
    const __mmask16 keep = _mm512_cmp_ps_mask(y, vfloor, _CMP_GE_OQ) & _mm512_cmp_ps_mask(y, vninf, _CMP_GT_OQ);
    const __m512 v = _mm512_maskz_mov_ps(keep, exp_nonpositive(_mm512_sub_ps(y, vtop)));
    const __m512 w = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, vmin, _CMP_GE_OQ), v);
    _mm512_storeu_ps(e + i, w);
    a_lo = _mm512_add_pd(a_lo, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    a_hi = _mm512_add_pd(a_hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
    k_lo = _mm512_add_pd(k_lo, _mm512_cvtps_pd(_mm512_castps512_ps256(w)));
    k_hi = _mm512_add_pd(k_hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w), 1))));
  }
  sum = _mm512_reduce_add_pd(_mm512_add_pd(a_lo, a_hi));
  sum_kept = _mm512_reduce_add_pd(_mm512_add_pd(k_lo, k_hi));
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 vt = _mm256_set1_ps(temp), vtop = _mm256_set1_ps(top), vfloor = _mm256_set1_ps(floor),
               vninf = _mm256_set1_ps(-kInf), vmin = _mm256_set1_ps(min_p);
  __m256d a_lo = _mm256_setzero_pd(), a_hi = _mm256_setzero_pd(), k_lo = a_lo, k_hi = a_lo;
  for (; i + 8 <= n; i += 8) {
    const __m256 y = _mm256_div_ps(_mm256_loadu_ps(x + i), vt);
    const __m256 keep = _mm256_and_ps(_mm256_cmp_ps(y, vfloor, _CMP_GE_OQ), _mm256_cmp_ps(y, vninf, _CMP_GT_OQ));
    const __m256 v = _mm256_and_ps(keep, exp_nonpositive(_mm256_sub_ps(y, vtop)));
    const __m256 w = _mm256_and_ps(_mm256_cmp_ps(v, vmin, _CMP_GE_OQ), v);
    _mm256_storeu_ps(e + i, w);
    a_lo = _mm256_add_pd(a_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    a_hi = _mm256_add_pd(a_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    k_lo = _mm256_add_pd(k_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(w)));
    k_hi = _mm256_add_pd(k_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(w, 1)));
  }
  double lanes[4];
  _mm256_storeu_pd(lanes, _mm256_add_pd(a_lo, a_hi));
  for (double v : lanes) sum += v;
  _mm256_storeu_pd(lanes, _mm256_add_pd(k_lo, k_hi));
  for (double v : lanes) sum_kept += v;
#endif
  for (; i < n; ++i) {
    const float y = x[i] / temp;
    const float v = y >= floor && y > -kInf ? std::exp(y - top) : 0.f;
    e[i] = v >= min_p ? v : 0.f;
    sum += v;
    sum_kept += e[i];
  }
  kept = sum_kept;
  return sum;
}

// The first index whose running sum of w (in index order) exceeds target, or last when none does: an
// inverse-CDF draw, which never lands on a zero weight.
int64_t first_past(const float* w, int64_t n, double target, int64_t last) {
  double run = 0;
  for (int64_t i = 0; i < n; ++i) {
    run += w[i];
    if (run > target) return i;
  }
  return last;
}

// One sampled row's token: logits / temperature; top-k keeps the values at or above the k-th largest;
// softmax; min-p zeroes probabilities under min_p times the largest; top-p keeps the likeliest tokens until
// the mass before them reaches top_p; the inverse-CDF draw at u, over the nucleus in order of likelihood, or
// over the whole row in vocabulary order without top-p.
int64_t row_draw(const float* x, int64_t n, float temp, int64_t k, float top_p, float min_p, float u,
                 RowScratch& s) {
  const float top_x = row_max(x, n);
  if (!(top_x > -kInf)) return 0;   // every token masked: nothing can be drawn (the engine's grammars never do this)
  const float top = top_x / temp;   // dividing by a positive number keeps the order: max(x / t) = max(x) / t
  // The k-th largest logit, divided as every other (the k-th largest of x / t).
  const float floor = k > 0 && k < n ? kth_largest(x, n, top_x, k, s.band, s.idx) / temp : -kInf;
  s.e.resize(n);
  float* e = s.e.data();
  double kept = 0;
  const double total = row_exp(x, n, temp, top, floor, min_p, e, kept);   // the softmax's denominator
  if (top_p >= 1.f) return first_past(e, n, static_cast<double>(u) * kept, n - 1);
  // The nucleus ends at the first token whose running mass reaches top_p; the draw lands at the first token
  // whose running mass exceeds u times the nucleus's mass, which is inside it (u < 1; rounding is clamped).
  // A nucleus found in a bracket that starts at the top (a peaked row's few likeliest tokens) is in s.sorted
  // already: the draw walks it without another pass over the row.
  const Place end = mass_cut(e, n, 1.f, static_cast<double>(top_p) * total, false, s);
  const double target = static_cast<double>(u) * end.mass_through;
  const Place drawn = s.from_top ? walk(s.sorted, 0.0, target, true) : mass_cut(e, n, 1.f, target, true, s);
  return before(end, drawn) ? end.index : drawn.index;
}

}  // namespace

// values [rows, n] float logits (contiguous; masked tokens -inf); per row: temperature > 0, top_k (<= 0 or
// >= n: none), top_p in (0, 1], min_p in [0, 1], a uniform number in [0, 1) -> [rows] int64 tokens.
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

// A plain function, not the lambda's body: GCC left the loop scalar there (~11x slower).
static bool all_finite_range(const float* x, int64_t n) {
  float zero = 0.f;   // stays 0 while every x is finite: inf * 0 and NaN * 0 are NaN
#pragma omp simd reduction(+ : zero)
  for (int64_t i = 0; i < n; ++i) zero += x[i] * 0.f;
  return zero == 0.f;
}

// Whether every value of a contiguous float tensor is finite: the step's check for NaN or inf logits in one
// call (the PyTorch check was a sum, an isfinite and a read back, ~130 us a batch-1 step on a cold cache).
bool all_finite(torch::Tensor values) {
  TORCH_CHECK(values.scalar_type() == torch::kFloat && values.is_contiguous(), "all_finite: contiguous float");
  const float* xp = values.data_ptr<float>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, values.numel(), 1 << 16, [&](int64_t begin, int64_t end) {   // a batch's rows: both cores
    if (!all_finite_range(xp + begin, end - begin)) finite = false;
  });
  return finite;
}
