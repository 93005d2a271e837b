// at::parallel_for with the caller's thread-local state (inference mode, grad mode, dispatch keys) installed in
// every worker: OpenMP workers do not inherit it, and an in-place ATen op there on a tensor the caller made under
// torch.inference_mode() would raise (shared by the CPU kernels: csrc/cpu/*.cpp).
//
// Work that at::parallel_for would run on the calling thread outside any parallel region (a single unit, or no
// more units than the grain) runs inside one here, where there are threads to spare: there torch's matrix
// products (MKL, OpenBLAS) run on one thread, as they do inside every unit of a split step, instead of splitting
// their own work by the thread count, which changes their rounding. The kernels split work by the sizes only, so
// their results are then the same bits with any number of threads (tests/test_info_nce.py,
// test_results_do_not_depend_on_the_thread_count and its companions; csrc/tests/test_online_lse.cpp, parallel).
//
// Inside a region MKL runs on one thread, but it still picked its code path by the thread count set (torch gives
// every thread the count of torch.set_num_threads): at d ~ 1000 the products rounded differently with 1 and 2
// threads (27 of 72 cases of a check over the losses, four sizes and two dtypes differed between 1 thread and 2,
// 3, 4 or 8, by up to 4e-9 in a gradient). Every unit therefore runs with MKL's count
// set to 1 on its thread (BlasOneThread), after torch's own per-thread set-up, which would otherwise reset it at
// the first ATen op of a thread new to torch.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>

#if defined(__GNUC__) && !defined(__APPLE__)
// MKL's C entry point (mkl_service.h maps mkl_set_num_threads_local to it; libtorch also exports the lower-case
// name, MKL's Fortran form, which takes a pointer). Weak: null where torch's BLAS is not MKL, and then a no-op.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#define CONTRASTBOUND_MKL_LOCAL_THREADS 1
#endif

namespace contrastbound {

// MKL's thread count on this thread set to 1 for the scope, restored after (0, MKL's "the global count", where
// none was set).
class BlasOneThread {
 public:
  BlasOneThread() {
#ifdef CONTRASTBOUND_MKL_LOCAL_THREADS
    if (MKL_Set_Num_Threads_Local == nullptr) return;
    (void)at::get_num_threads();  // torch's per-thread set-up (at::init_num_threads) first, so it cannot undo this
    previous_ = MKL_Set_Num_Threads_Local(1);
    active_ = true;
#endif
  }
  ~BlasOneThread() {
#ifdef CONTRASTBOUND_MKL_LOCAL_THREADS
    if (active_) MKL_Set_Num_Threads_Local(previous_);
#endif
  }
  BlasOneThread(const BlasOneThread&) = delete;
  BlasOneThread& operator=(const BlasOneThread&) = delete;

 private:
  int previous_ = 0;
  bool active_ = false;
};

template <typename F>
void parallel_for_tls(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  const at::ThreadLocalState state;
  const auto run = [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(state);
    const BlasOneThread one_blas_thread;
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
