// Vector scans of one row of floats, for the sampler's kernels: its maximum, and its members inside a band of
// values (with their indices, in index order).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

// The largest of x[0:n]; the vector loops may pass over a NaN (callers that care look for NaNs themselves).
inline float row_max(const float* x, int64_t n) {
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

// Appends the (value, index) of x[0:n] with lo <= value < hi (lo_open: lo < value) to vals/idx.
inline void append_band(const float* x, int64_t n, float lo, bool lo_open, float hi, std::vector<float>& vals,
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
