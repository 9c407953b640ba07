// The int8 product with weights repacked in groups of 16 rows (the LM head's): up to 16 activation rows on VNNI
// builds (an int8 GEMM above), any number on AVX2 builds.
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

// Rows [0, M) of x as words of 4 bytes (each plus `add`), row m's at [m * steps, (m + 1) * steps).
std::vector<uint32_t> quads(const int8_t* x, int64_t M, int64_t K, uint8_t add) {
  const int64_t steps = (K + kQuad - 1) / kQuad;
  std::vector<uint32_t> xq(M * steps);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t s = 0; s < steps; ++s) xq[m * steps + s] = quad(x + m * K, K, s * kQuad, add);
  return xq;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Groups [g0, g1): out[m, 16g + j] = x[m] . w[16g + j]. x enters as x + 128 (vpdpbusd's unsigned side); the
// shift comes back out as 128 * the row's sum. Four accumulators a row over alternating steps hide
// vpdpbusd's latency; the weights stream once, in order.
template <int M>
void groups_vnni(const uint32_t* xq, int64_t steps, const int8_t* packed, const int32_t* row_sums, int64_t g0,
                 int64_t g1, int64_t N, int32_t* out) {
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
constexpr int kTileRows = 4;          // activation rows a call of groups_vnni
constexpr uint8_t kQuadShift = 128;   // the activations enter unsigned

// One tile of up to 4 rows over groups [g0, g1).
void tile_groups(const uint32_t* xm, int64_t rows, int64_t steps, const int8_t* packed, const int32_t* sums,
                 int64_t g0, int64_t g1, int64_t N, int32_t* om) {
  switch (rows) {
    case 1: groups_vnni<1>(xm, steps, packed, sums, g0, g1, N, om); break;
    case 2: groups_vnni<2>(xm, steps, packed, sums, g0, g1, N, om); break;
    case 3: groups_vnni<3>(xm, steps, packed, sums, g0, g1, N, om); break;
    case 4: groups_vnni<4>(xm, steps, packed, sums, g0, g1, N, om); break;
    default: break;
  }
}

// Above one tile's rows, group by group, every tile over the group while its 16 weight rows (9 KB for the head)
// sit in L1: the weights stream from memory once whatever the row count. At 5-16 rows the head ran 1.55-1.87x
// as fast as through the VNNI GEMV (benchmarks/lm_head_gemv.py, docs/results/lm_head_rows/).
void groups(const uint32_t* xq, int64_t M, int64_t steps, const int8_t* packed, const int32_t* sums, int64_t g0,
            int64_t g1, int64_t N, int32_t* out) {
  if (M <= kTileRows) {
    tile_groups(xq, M, steps, packed, sums, g0, g1, N, out);
    return;
  }
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t m = 0; m < M; m += kTileRows)
      tile_groups(xq + m * steps, std::min<int64_t>(kTileRows, M - m), steps, packed, sums, g, g + 1, N, out + m * N);
}
#define KVLOOM_HAS_GROUPS
#elif defined(__AVX2__)
// The same with 8 rows a ymm (a group is two halves), for MR activation rows at a time: the group's weights
// are loaded once for the tile's rows and the absolute values shared by them.
template <int MR>
void group_tile_avx2(const uint32_t* xq, int64_t steps, const int8_t* w, int32_t* out, int64_t N, int64_t cnt) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  for (int64_t s = 0; s < steps; ++s) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + s * 64));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + s * 64 + 32));
    const __m256i a0 = _mm256_abs_epi8(w0), a1 = _mm256_abs_epi8(w1);
    for (int m = 0; m < MR; ++m) {
      const __m256i xb = _mm256_set1_epi32(static_cast<int>(xq[m * steps + s]));
      acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(xb, w0)), ones));
      acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(xb, w1)), ones));
    }
  }
  for (int m = 0; m < MR; ++m) {
    alignas(32) int32_t t[kGroup];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), acc[m][0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(t + 8), acc[m][1]);
    std::memcpy(out + m * N, t, cnt * sizeof(int32_t));
  }
}

// Groups [g0, g1), every activation row: per group (its 16 weight rows stay in L1 while the rows pass), tiles
// of 4 rows (4 x 2 accumulators, the group's two halves and their absolute values fill the 16 ymm registers).
// On the LM head (49152 x 576) this ran 1.23-1.36x as fast as the widened int16 loop in w8a8_linear.cpp at
// 16-64 rows and 1.68x at 8 (benchmarks/lm_head_gemv.py); at 1-4 rows about as fast as one row pair at a time.
constexpr uint8_t kQuadShift = 0;   // the sign trick takes the activations as they are

void groups(const uint32_t* xm, int64_t M, int64_t steps, const int8_t* packed, const int32_t*, int64_t g0,
            int64_t g1, int64_t N, int32_t* out) {
  for (int64_t g = g0; g < g1; ++g) {
    const int8_t* w = packed + g * kGroup * steps * kQuad;
    const int64_t n = g * kGroup, cnt = std::min<int64_t>(kGroup, N - n);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) group_tile_avx2<4>(xm + m * steps, steps, w, out + m * N + n, N, cnt);
    switch (M - m) {
      case 3: group_tile_avx2<3>(xm + m * steps, steps, w, out + m * N + n, N, cnt); break;
      case 2: group_tile_avx2<2>(xm + m * steps, steps, w, out + m * N + n, N, cnt); break;
      case 1: group_tile_avx2<1>(xm + m * steps, steps, w, out + m * N + n, N, cnt); break;
      default: break;
    }
  }
}
#define KVLOOM_HAS_GROUPS
#endif

}  // namespace

bool int8_grouped_gemv_available() {
#if defined(KVLOOM_HAS_GROUPS)
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
#if defined(KVLOOM_HAS_GROUPS)
  const int8_t* xp = xq.data_ptr<int8_t>();
  const int8_t* pp = packed.data_ptr<int8_t>();
  const int32_t* sp = row_sums.data_ptr<int32_t>();
  int32_t* op = out.data_ptr<int32_t>();
  const std::vector<uint32_t> xw = quads(xp, M, K, kQuadShift);   // once, shared by the threads
  at::parallel_for(0, groups_n, 16, [&](int64_t b, int64_t e) { groups(xw.data(), M, steps, pp, sp, b, e, N, op); });
#else
  TORCH_CHECK(false, "int8_grouped_gemv: this build has no grouped loop (it needs AVX2 or AVX-512 VNNI)");
#endif
  return out;
}
