// The thread pool pattern of the tiler and the row ops: items 0..n-1 handed out in turn from an atomic counter to
// up to `num_threads` native threads (the caller's included).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <system_error>
#include <thread>
#include <vector>

namespace grpo_fast {

// fn(i) for every i < n; fn must not throw (catch inside it). Returns when every call has returned.
template <class F>
void parallel_for(int64_t n, int num_threads, const F& fn) {
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    for (int64_t i = next++; i < n; i = next++) fn(i);
  };
  const int64_t extra = std::max<int64_t>(0, std::min<int64_t>(num_threads, n) - 1);
  std::vector<std::thread> threads;
  threads.reserve(extra);
  try {
    for (int64_t t = 0; t < extra; ++t) threads.emplace_back(worker);
  } catch (const std::system_error&) {
    // No more threads (a thread limit, no memory for a stack): the ones started and this one do all the items.
  }
  worker();
  for (auto& t : threads) t.join();
}

}  // namespace grpo_fast
