// Where a position of a sequence sits in a paged KV pool [blocks, KVH, BS, D].
#pragma once
#include <cstdint>

// An attention task's fixed cost, in positions of context: what splitting tasks by cost adds to their length
// (balanced_split.h).
constexpr int64_t kTaskOverhead = 16;

// One (sequence, KV head)'s rows. Block sizes are powers of two (EngineConfig checks; the kernels' entry points
// too): a shift and a mask replace the integer division, which cost as much as a position's multiply-adds.
struct PagedRows {
  const int64_t* table;
  int64_t KVH, BS, h, D;
  int shift;
  PagedRows(const int64_t* t, int64_t kvh, int64_t bs, int64_t head, int64_t d)
      : table(t), KVH(kvh), BS(bs), h(head), D(d), shift(__builtin_ctzll(static_cast<unsigned long long>(bs))) {}
  const float* at(const float* pool, int64_t pos) const {
    return pool + ((table[pos >> shift] * KVH + h) * BS + (pos & (BS - 1))) * D;
  }
};
