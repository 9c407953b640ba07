// Where a position of a sequence sits in a paged KV pool [blocks, KVH, BS, D].
#pragma once
#include <cstdint>

// What one (sequence, KV head) attention task costs, for splitting tasks between threads (balanced_split.h):
// the positions it reads (its window's, on a sliding-window layer), plus a fixed part worth 16 of them.
inline int64_t attention_task_cost(int64_t len, int64_t window = 0) {
  return (window > 0 && window < len ? window : len) + 16;
}

// One (sequence, KV head)'s rows. Block sizes are powers of two (EngineConfig checks; the kernels' entry points
// too): a shift and a mask replace the integer division, which cost as much as a position's multiply-adds.
struct PagedRows {
  const int64_t* table;
  int64_t KVH, BS, h, D;
  int shift;
  PagedRows(const int64_t* t, int64_t kvh, int64_t bs, int64_t head, int64_t d)
      : table(t), KVH(kvh), BS(bs), h(head), D(d), shift(__builtin_ctzll(static_cast<unsigned long long>(bs))) {}
  template <typename T>   // float, or uint16_t for a float16 pool
  const T* at(const T* pool, int64_t pos) const {
    return pool + ((table[pos >> shift] * KVH + h) * BS + (pos & (BS - 1))) * D;
  }
};

#if defined(__SSE__)
#include <xmmintrin.h>

// A row of D values (float or float16) on its way to L1 (prefetch_row) or L2 (prefetch_row_l2), line by line:
// blocks are scattered 4 KB pieces, and the hardware prefetcher stops at each one's end.
template <int D, typename T>
inline void prefetch_row(const T* r) {
  for (int c = 0; c < D * static_cast<int>(sizeof(T)); c += 64) _mm_prefetch(reinterpret_cast<const char*>(r) + c, _MM_HINT_T0);
}

template <int D, typename T>
inline void prefetch_row_l2(const T* r) {
  for (int c = 0; c < D * static_cast<int>(sizeof(T)); c += 64) _mm_prefetch(reinterpret_cast<const char*>(r) + c, _MM_HINT_T1);
}
#endif
