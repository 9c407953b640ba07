// Horizontal sum of eight int32 lanes (AVX2), shared by the int8 and 4-bit products.
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>

#include <cstdint>

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#endif
