// Where a position of a sequence sits in a paged KV pool [blocks, KVH, BS, D].
#pragma once
#include <cstdint>

// One (sequence, KV head)'s rows. Block sizes are powers of two in practice: a shift and a mask then replace
// the integer division, which cost as much as a position's multiply-adds in the attention loops.
struct PagedRows {
  const int64_t* table;
  int64_t KVH, BS, h, D;
  int shift = -1;
  PagedRows(const int64_t* t, int64_t kvh, int64_t bs, int64_t head, int64_t d)
      : table(t), KVH(kvh), BS(bs), h(head), D(d) {
    if ((bs & (bs - 1)) == 0) shift = __builtin_ctzll(static_cast<unsigned long long>(bs));
  }
  const float* at(const float* pool, int64_t pos) const {
    const int64_t col = shift >= 0 ? pos >> shift : pos / BS, r = shift >= 0 ? pos & (BS - 1) : pos % BS;
    return pool + ((table[col] * KVH + h) * BS + r) * D;
  }
};
