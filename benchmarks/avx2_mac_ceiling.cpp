// How many multiply-accumulates a second one core retires with AVX2 instructions, for each way of computing
// int8 or float dot products, in the shape of a GEMM's inner loop: a tile of accumulators in registers,
// operands loaded each step from buffers that stay in L1 (no memory traffic: each loop's ceiling).
//   fp32_fma         float FMA, 6 rows x 16 columns (what float32 layers run)
//   int16_madd       both sides widened to int16, vpmaddwd + vpaddd, 4 x 3 (the w8a8 AVX2 loop until
//                    this benchmark was written; exact)
//   int8_sign_trick  vpsignb + vpmaddubsw + vpmaddwd + vpaddd on |w| and x with w's sign, 3 x 3 (llama.cpp's
//                    Q8_0 on AVX2, and the w8a8 AVX2 loop now; exact for activations in [-127, 127])
//   u4_x_int8        4-bit unsigned weights x int8: vpmaddubsw pairs summed in int16 before vpmaddwd, 3 x 2,
//                    as the 4-bit kernel does (exact: a pair is at most 2 * 15 * 127)
// The loops carry `#pragma GCC unroll` so that the accumulator arrays live in registers (without it GCC
// stored them to the stack every step and the float loop ran at half its speed).
// Built by benchmarks/avx2_mac_ceiling.py with -O3 -mavx2 -mfma: AVX2 code on any x86-64 host.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>

namespace {
constexpr int kSteps = 64;   // 32 bytes a step and row: x and w stay in L1
alignas(64) int8_t g_x8[6][kSteps * 32], g_w8[4][kSteps * 32], g_aw8[4][kSteps * 32];
alignas(64) int16_t g_x16[6][kSteps * 16];
alignas(64) float g_xf[6][kSteps * 8], g_wf[4][kSteps * 8];
volatile int g_sink;

template <class F>
double best_seconds(F f, long rounds) {
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {
    const auto t = std::chrono::steady_clock::now();
    f(rounds);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    best = s < best ? s : best;
  }
  return best;
}

template <int N>
int fold(const __m256i* acc) {
  __m256i s = acc[0];
#pragma GCC unroll 12
  for (int j = 1; j < N; ++j) s = _mm256_add_epi32(s, acc[j]);
  return _mm256_extract_epi32(s, 0);
}

// Each tile's shape fits the 16 ymm registers (accumulators, weights and one activation vector).
// fp32: 6 rows x 2 vectors of 8 columns, activations broadcast (an sgemm micro-kernel's shape).
void fp32_fma(long rounds) {
  constexpr int MR = 6, NR = 2;
  __m256 acc[MR * NR];
#pragma GCC unroll 12
  for (auto& a : acc) a = _mm256_setzero_ps();
  for (long r = 0; r < rounds; ++r)
    for (int s = 0; s < kSteps * 8; ++s) {
      __m256 w[NR];
#pragma GCC unroll 2
      for (int j = 0; j < NR; ++j) w[j] = _mm256_load_ps(&g_wf[j + (s & 2)][(s % kSteps) * 8]);
#pragma GCC unroll 6
      for (int m = 0; m < MR; ++m) {
        const __m256 x = _mm256_broadcast_ss(&g_xf[m][s]);
#pragma GCC unroll 2
        for (int j = 0; j < NR; ++j) acc[m * NR + j] = _mm256_fmadd_ps(x, w[j], acc[m * NR + j]);
      }
    }
  __m256 t = acc[0];
#pragma GCC unroll 12
  for (int j = 1; j < MR * NR; ++j) t = _mm256_add_ps(t, acc[j]);
  g_sink = static_cast<int>(_mm256_cvtss_f32(t));
}

// int16: 4 rows x 3 weight rows; weights widened from int8 once a step, as the w8a8 AVX2 loop does.
void int16_madd(long rounds) {
  constexpr int MR = 4, NR = 3;
  __m256i acc[MR * NR];
#pragma GCC unroll 12
  for (auto& a : acc) a = _mm256_setzero_si256();
  for (long r = 0; r < rounds; ++r)
    for (int s = 0; s < kSteps; ++s) {
      __m256i w[NR];
#pragma GCC unroll 3
      for (int j = 0; j < NR; ++j) w[j] = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(&g_w8[j][s * 16])));
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m) {
        const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(&g_x16[m][s * 16]));
#pragma GCC unroll 3
        for (int j = 0; j < NR; ++j) acc[m * NR + j] = _mm256_add_epi32(acc[m * NR + j], _mm256_madd_epi16(x, w[j]));
      }
    }
  g_sink = fold<MR * NR>(acc);
}

// int8, sign trick: 3 x 3; |w| in registers, w's signs read from memory by vpsignb.
void int8_sign_trick(long rounds) {
  constexpr int MR = 3, NR = 3;
  __m256i acc[MR * NR];
  const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 12
  for (auto& a : acc) a = _mm256_setzero_si256();
  for (long r = 0; r < rounds; ++r)
    for (int s = 0; s < kSteps; ++s) {
      __m256i aw[NR];
#pragma GCC unroll 3
      for (int j = 0; j < NR; ++j) aw[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(&g_aw8[j][s * 32]));
#pragma GCC unroll 3
      for (int m = 0; m < MR; ++m) {
        const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(&g_x8[m][s * 32]));
#pragma GCC unroll 3
        for (int j = 0; j < NR; ++j) {
          const __m256i sx = _mm256_sign_epi8(x, _mm256_load_si256(reinterpret_cast<const __m256i*>(&g_w8[j][s * 32])));
          acc[m * NR + j] = _mm256_add_epi32(acc[m * NR + j], _mm256_madd_epi16(_mm256_maddubs_epi16(aw[j], sx), ones));
        }
      }
    }
  g_sink = fold<MR * NR>(acc);
}

// 4-bit x int8: 3 rows x 2 weight rows, each 32 bytes of weights two steps of k (low and high nibbles).
void u4_x_int8(long rounds) {
  constexpr int MR = 3, NR = 2;
  __m256i acc[MR * NR];
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);
#pragma GCC unroll 12
  for (auto& a : acc) a = _mm256_setzero_si256();
  for (long r = 0; r < rounds; ++r)
    for (int s = 0; s + 1 < kSteps; s += 2) {
      __m256i lo[NR], hi[NR];
#pragma GCC unroll 2
      for (int j = 0; j < NR; ++j) {
        const __m256i packed = _mm256_load_si256(reinterpret_cast<const __m256i*>(&g_w8[j][s * 32]));
        lo[j] = _mm256_and_si256(packed, low);
        hi[j] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
      }
#pragma GCC unroll 3
      for (int m = 0; m < MR; ++m) {
        const __m256i x0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(&g_x8[m][s * 32]));
        const __m256i x1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(&g_x8[m][s * 32 + 32]));
#pragma GCC unroll 2
        for (int j = 0; j < NR; ++j)
          acc[m * NR + j] = _mm256_add_epi32(
              acc[m * NR + j], _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo[j], x0),
                                                                  _mm256_maddubs_epi16(hi[j], x1)), ones));
      }
    }
  g_sink = fold<MR * NR>(acc);
}
}  // namespace

int main() {
  uint32_t state = 12345;
  auto next = [&] { state = state * 1664525u + 1013904223u; return static_cast<int8_t>((state >> 24) % 255 - 127); };
  for (int j = 0; j < 4; ++j)
    for (int i = 0; i < kSteps * 32; ++i) g_w8[j][i] = next(), g_aw8[j][i] = static_cast<int8_t>(g_w8[j][i] < 0 ? -g_w8[j][i] : g_w8[j][i]);
  for (int m = 0; m < 6; ++m) {
    for (int i = 0; i < kSteps * 32; ++i) g_x8[m][i] = next();
    for (int i = 0; i < kSteps * 16; ++i) g_x16[m][i] = next();
    for (int i = 0; i < kSteps * 8; ++i) g_xf[m][i] = next() / 127.f;
  }
  for (int j = 0; j < 4; ++j)
    for (int i = 0; i < kSteps * 8; ++i) g_wf[j][i] = next() / 127.f;
  const long rounds = 100000;
  // MACs a call: tile accumulators x products per accumulator update x steps x rounds.
  const double fma = 12.0 * 8 * kSteps * 8 * rounds / best_seconds(fp32_fma, rounds) / 1e9;
  const double madd = 12.0 * 16 * kSteps * rounds / best_seconds(int16_madd, rounds) / 1e9;
  const double sign = 9.0 * 32 * kSteps * rounds / best_seconds(int8_sign_trick, rounds) / 1e9;
  const double u4 = 6.0 * 64 * (kSteps / 2) * rounds / best_seconds(u4_x_int8, rounds) / 1e9;
  std::printf("{\"fp32_fma\": %.1f, \"int16_madd\": %.1f, \"int8_sign_trick\": %.1f, \"u4_x_int8\": %.1f}\n", fma, madd,
              sign, u4);
}
