// Splitting tasks of unequal cost between the threads.
//
// at::parallel_for gives each thread an equal count of tasks. Attention tasks cost their context length, and a
// prefill chunk lists its tokens in order: with 2 threads the first half of a 512-token prompt costs a third of
// the second, so one core idled a quarter of the attention time. Here each thread gets a contiguous range of
// about equal total cost instead; each task is computed exactly as before, so no result changes.
#pragma once
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

// fn(begin, end) over contiguous ranges of [0, n) whose summed cost(task) are about equal, one range a thread.
template <typename Cost, typename Fn>
void parallel_for_balanced(int64_t n, Cost cost, const Fn& fn) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || at::in_parallel_region()) {
    if (n > 0) fn(0, n);
    return;
  }
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += static_cast<double>(cost(i));
  std::vector<int64_t> bounds(threads + 1, n);   // thread t: [bounds[t], bounds[t + 1])
  bounds[0] = 0;
  double before = 0.0;   // the cost of the tasks ahead of `i`
  for (int64_t i = 0, t = 1; i < n && t < threads; ++i) {
    while (t < threads && before >= total * static_cast<double>(t) / static_cast<double>(threads)) bounds[t++] = i;
    before += static_cast<double>(cost(i));
  }
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      if (bounds[t] < bounds[t + 1]) fn(bounds[t], bounds[t + 1]);
  });
}
