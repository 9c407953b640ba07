// The int8 product of a few activation rows with weights repacked in groups of 16 rows (the LM head's GEMV).
//
// The row-at-a-time GEMV (w8a8_linear.cpp) keeps one accumulator per weight row and folds sixteen of them
// with a transpose tree, and it recomputes every row's sum for the unsigned shift: at one activation row the
// 49k x 576 head read at ~20 GB/s. Here a 64-byte load holds 4 consecutive bytes of 16 rows, so one vpdpbusd
// against 4 broadcast activation bytes adds into all 16 rows' totals, lane j being row j: no horizontal sums,
// and the row sums (for the shift of the activations to unsigned) are computed once, when packing. AVX2
// builds do the same with 8 rows a 32-byte register: vpmaddubsw of |w| against x carrying w's sign
// (no saturation: a pair is at most 2 * 128 * 127), then vpmaddwd against ones.
// Every sum is an exact int32, so the results equal the row-at-a-time loop's, whatever the row count.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGroup = 16;   // weight rows a group
constexpr int64_t kQuad = 4;     // bytes of one row a group holds per 64-byte step

// Activation row m's bytes k..k+3 as one 32-bit word (k beyond K: zero, as the packed padding is).
inline uint32_t quad(const int8_t* x, int64_t K, int64_t k, uint8_t add) {
  uint8_t b[4];
  for (int i = 0; i < 4; ++i) b[i] = k + i < K ? static_cast<uint8_t>(x[k + i] + add) : add;
  uint32_t v;
  std::memcpy(&v, b, 4);
  return v;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Groups [g0, g1): out[m, 16g + j] = x[m] . w[16g + j]. x enters as x + 128 (vpdpbusd's unsigned side); the
// shift comes back out as 128 * the row's sum. Four accumulators a row over alternating steps hide
// vpdpbusd's latency; the weights stream once, in order.
template <int M>
void groups_vnni(const int8_t* x, int64_t K, const int8_t* packed, const int32_t* row_sums, int64_t g0, int64_t g1,
                 int64_t N, int32_t* out) {
  const int64_t steps = (K + kQuad - 1) / kQuad;
  std::vector<uint32_t> xq(M * steps);
  for (int m = 0; m < M; ++m)
    for (int64_t s = 0; s < steps; ++s) xq[m * steps + s] = quad(x + m * K, K, s * kQuad, 128);
  for (int64_t g = g0; g < g1; ++g) {
    const int8_t* w = packed + g * kGroup * steps * kQuad;
    __m512i acc[M][4];
    for (int m = 0; m < M; ++m)
      for (int c = 0; c < 4; ++c) acc[m][c] = _mm512_setzero_si512();
    int64_t s = 0;
    for (; s + 4 <= steps; s += 4)
      for (int c = 0; c < 4; ++c) {
        const __m512i wv = _mm512_loadu_si512(w + (s + c) * 64);
        for (int m = 0; m < M; ++m)
          acc[m][c] = _mm512_dpbusd_epi32(acc[m][c], _mm512_set1_epi32(static_cast<int>(xq[m * steps + s + c])), wv);
      }
    for (; s < steps; ++s) {
      const __m512i wv = _mm512_loadu_si512(w + s * 64);
      for (int m = 0; m < M; ++m)
        acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], _mm512_set1_epi32(static_cast<int>(xq[m * steps + s])), wv);
    }
    const int64_t n = g * kGroup, cnt = std::min<int64_t>(kGroup, N - n);
    const __mmask16 keep = static_cast<__mmask16>((1u << cnt) - 1);
    const __m512i shift = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(keep, row_sums + n), 7);
    for (int m = 0; m < M; ++m) {
      const __m512i t = _mm512_add_epi32(_mm512_add_epi32(acc[m][0], acc[m][1]), _mm512_add_epi32(acc[m][2], acc[m][3]));
      _mm512_mask_storeu_epi32(out + m * N + n, keep, _mm512_sub_epi32(t, shift));
    }
  }
}
constexpr int kMaxTemplateRows = 4;
#define KVLOOM_GROUPS groups_vnni
#elif defined(__AVX2__)
// The same with 8 rows a ymm (a group is two), two accumulators a half over alternating steps.
template <int M>
void groups_avx2(const int8_t* x, int64_t K, const int8_t* packed, const int32_t*, int64_t g0, int64_t g1,
                 int64_t N, int32_t* out) {
  const int64_t steps = (K + kQuad - 1) / kQuad;
  std::vector<uint32_t> xq(M * steps);
  for (int m = 0; m < M; ++m)
    for (int64_t s = 0; s < steps; ++s) xq[m * steps + s] = quad(x + m * K, K, s * kQuad, 0);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = g0; g < g1; ++g) {
    const int8_t* w = packed + g * kGroup * steps * kQuad;
    __m256i acc[M][2][2];   // [row][half][step parity]
    for (int m = 0; m < M; ++m)
      for (int h = 0; h < 2; ++h) acc[m][h][0] = acc[m][h][1] = _mm256_setzero_si256();
    for (int64_t s = 0; s < steps; ++s) {
      const int p = s & 1;
      for (int h = 0; h < 2; ++h) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + s * 64 + h * 32));
        const __m256i wa = _mm256_abs_epi8(wv);
        for (int m = 0; m < M; ++m) {
          const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(static_cast<int>(xq[m * steps + s])), wv);
          acc[m][h][p] = _mm256_add_epi32(acc[m][h][p], _mm256_madd_epi16(_mm256_maddubs_epi16(wa, xs), ones));
        }
      }
    }
    const int64_t n = g * kGroup, cnt = std::min<int64_t>(kGroup, N - n);
    for (int m = 0; m < M; ++m) {
      alignas(32) int32_t t[kGroup];
      for (int h = 0; h < 2; ++h)
        _mm256_store_si256(reinterpret_cast<__m256i*>(t + 8 * h), _mm256_add_epi32(acc[m][h][0], acc[m][h][1]));
      std::memcpy(out + m * N + n, t, cnt * sizeof(int32_t));
    }
  }
}
constexpr int kMaxTemplateRows = 2;
#define KVLOOM_GROUPS groups_avx2
#endif

#if defined(KVLOOM_GROUPS)
void groups(const int8_t* x, int64_t M, int64_t K, const int8_t* packed, const int32_t* sums, int64_t g0, int64_t g1,
            int64_t N, int32_t* out) {
  for (int64_t m = 0; m < M; m += kMaxTemplateRows) {
    const int64_t rows = std::min<int64_t>(kMaxTemplateRows, M - m);
    const int8_t* xm = x + m * K;
    int32_t* om = out + m * N;
    switch (rows) {
      case 1: KVLOOM_GROUPS<1>(xm, K, packed, sums, g0, g1, N, om); break;
      case 2: KVLOOM_GROUPS<2>(xm, K, packed, sums, g0, g1, N, om); break;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
      case 3: KVLOOM_GROUPS<3>(xm, K, packed, sums, g0, g1, N, om); break;
      case 4: KVLOOM_GROUPS<4>(xm, K, packed, sums, g0, g1, N, om); break;
#endif
      default: break;
    }
  }
}
#endif

}  // namespace

bool int8_grouped_gemv_available() {
#if defined(KVLOOM_GROUPS)
  return true;
#else
  return false;
#endif
}

// w [N, K] int8 -> (packed: groups of 16 rows (zero rows pad the last), each as K/4 steps of 16 rows x 4 bytes
// (zero bytes pad K to a multiple of 4); the rows' sums [N] int32).
std::vector<torch::Tensor> int8_pack_row_groups(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kChar && w.is_contiguous(), "w: contiguous int8 [N, K]");
  const int64_t N = w.size(0), K = w.size(1), steps = (K + kQuad - 1) / kQuad, groups_n = (N + kGroup - 1) / kGroup;
  auto packed = torch::zeros({groups_n * kGroup * steps * kQuad}, w.options());
  auto sums = torch::empty({N}, w.options().dtype(torch::kInt));
  const int8_t* wp = w.data_ptr<int8_t>();
  int8_t* pp = packed.data_ptr<int8_t>();
  int32_t* sp = sums.data_ptr<int32_t>();
  at::parallel_for(0, N, 256, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const int64_t g = n / kGroup, j = n % kGroup;
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) {
        pp[((g * steps + k / kQuad) * kGroup + j) * kQuad + k % kQuad] = wp[n * K + k];
        s += wp[n * K + k];
      }
      sp[n] = s;
    }
  });
  return {packed, sums};
}

// acc [M, N] int32 = xq [M, K] int8 @ w.T, w packed by int8_pack_row_groups; threads split the groups.
torch::Tensor int8_grouped_gemv(torch::Tensor xq, torch::Tensor packed, torch::Tensor row_sums, int64_t N) {
  TORCH_CHECK(xq.dim() == 2 && xq.scalar_type() == torch::kChar && xq.is_contiguous(), "xq: contiguous int8 [M, K]");
  const int64_t M = xq.size(0), K = xq.size(1), steps = (K + kQuad - 1) / kQuad, groups_n = (N + kGroup - 1) / kGroup;
  TORCH_CHECK(packed.scalar_type() == torch::kChar && packed.is_contiguous() &&
                  packed.numel() == groups_n * kGroup * steps * kQuad,
              "packed: int8_pack_row_groups of an [N, K] int8 weight");
  TORCH_CHECK(row_sums.scalar_type() == torch::kInt && row_sums.is_contiguous() && row_sums.numel() == N,
              "row_sums: int32 [N]");
  auto out = torch::empty({M, N}, xq.options().dtype(torch::kInt));
#if defined(KVLOOM_GROUPS)
  const int8_t* xp = xq.data_ptr<int8_t>();
  const int8_t* pp = packed.data_ptr<int8_t>();
  const int32_t* sp = row_sums.data_ptr<int32_t>();
  int32_t* op = out.data_ptr<int32_t>();
  at::parallel_for(0, groups_n, 16, [&](int64_t b, int64_t e) { groups(xp, M, K, pp, sp, b, e, N, op); });
#else
  TORCH_CHECK(false, "int8_grouped_gemv: this build has no grouped loop (it needs AVX2 or AVX-512 VNNI)");
#endif
  return out;
}
