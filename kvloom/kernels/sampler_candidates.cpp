// The sampler's candidate search: per row, its largest values in order, enough of them for a top-k (a count)
// or a top-p (a mass), without sorting the vocabulary.
//
// torch's topk over a 49k vocabulary cost ~4 ms a step for 48 rows, most of a sampled step's sampler time.
// Here a row is scanned in bands below its maximum (values >= max * 2^-10, then the next 2^-10, ... for a
// mass; >= max - 8, max - 16, ... for a count), each band's members appended with a vector compare; once the
// bands hold enough, a heap gives the members in order and the row stops as soon as its need is met. Only
// comparisons pick and order the candidates, so the values returned are the input's bits, and ties come
// out lowest index first. Rows run in parallel, each on its own.
#include "kernels.h"

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
