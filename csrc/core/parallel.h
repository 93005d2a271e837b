// at::parallel_for with the caller's thread-local state (inference mode, grad mode, dispatch keys) installed in
// every worker: OpenMP workers do not inherit it, and an in-place ATen op there on a tensor the caller made under
// torch.inference_mode() would raise (shared by the CPU kernels: csrc/cpu/*.cpp).
//
// Work that at::parallel_for would run on the calling thread outside any parallel region (a single unit, or no
// more units than the grain) runs inside one here, where there are threads to spare: there torch's matrix
// products (MKL, OpenBLAS) run on one thread, as they do inside every unit of a split step, instead of splitting
// their own work by the thread count, which changes their rounding. The kernels split work by the sizes only, so
// their results are then the same bits with any number of threads (tests/test_info_nce.py,
// test_results_do_not_depend_on_the_thread_count and its companions; csrc/tests/test_online_lse.cpp, parallel),
// as far as the product itself allows: MKL's rounding inside a region still depends on the thread count set at
// some shapes (d ~ 1000; README, Limits, Reproducibility).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>

namespace contrastbound {

template <typename F>
void parallel_for_tls(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  const at::ThreadLocalState state;
  const auto run = [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(state);
    f(b, e);
  };
  const int64_t n = end - begin;
  if ((n == 1 || n <= grain) && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    // Two tasks of one unit each, so that at::parallel_for opens a region; the second is empty.
    at::parallel_for(0, 2, 1, [&](int64_t u0, int64_t) {
      if (u0 == 0) run(begin, end);
    });
    return;
  }
  at::parallel_for(begin, end, grain, run);
}

}  // namespace contrastbound
