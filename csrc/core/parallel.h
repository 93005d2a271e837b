// at::parallel_for with the caller's thread-local state (inference mode, grad mode, dispatch keys) installed in
// every worker: OpenMP workers do not inherit it, and an in-place ATen op there on a tensor the caller made under
// torch.inference_mode() would raise (shared by the CPU kernels: csrc/cpu/*.cpp).
//
// Work that at::parallel_for would run on the calling thread outside any parallel region (a single unit, or no
// more units than the grain) runs there with OpenMP's thread count 1 on that thread for its duration (OneThread):
// torch's own ops and matrix products inside (ATen's parallel_for, MKL, oneDNN) then run on one thread, as they do
// inside every unit of a split step, instead of splitting their own work by the thread count, which changes their
// rounding. The kernels split work by the sizes only, so their results are then the same bits with any number of
// threads (tests/test_info_nce.py, test_results_do_not_depend_on_the_thread_count and its companions;
// csrc/tests/test_online_lse.cpp, parallel). Such work ran inside a two-thread region until 2026-12-07, with the
// same bits; but the region's end waits for its second thread, and on a machine whose cores were busy with
// another process that wait made a fused step take tens of ms (bench --threads 2 at B = K = d = 1 beside one busy
// process, on 2 cores: 4 of 12 runs took 13.7-46 ms, the others 0.4-1.9 ms; inline, 14 of 14 runs 0.35-0.85 ms).
// Where torch's thread count does not follow OpenMP's (another parallel backend), the region remains the way.
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

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && !defined(__APPLE__)
// MKL's C entry point (mkl_service.h maps mkl_set_num_threads_local to it; libtorch also exports the lower-case
// name, MKL's Fortran form, which takes a pointer). Weak: null where torch's BLAS is not MKL, and then a no-op.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#define CONTRASTBOUND_MKL_LOCAL_THREADS 1
#endif

namespace contrastbound {

// torch's per-thread set-up, done once per thread before this library's first at::parallel_for there, with the
// thread's own OpenMP and MKL counts kept. at::parallel_for runs at::init_num_threads at a thread's first call
// (at::internal::lazy_init_num_threads), and the flag that remembers it is an inline function's thread_local: one
// copy per shared object, so this library's first at::parallel_for on a thread ran it again, after libtorch had.
// It sets the thread's counts to the count most recently set by any thread (torch.set_num_threads stores one for
// the process): a thread that had set 2 while another had set 1 since ran at 1 after its first loss call, its own
// torch ops included, for the rest of its life (a concurrency audit's find; csrc/tests/test_online_lse.cpp,
// parallel, and tests/test_info_nce.py). Before a count set afterwards (BlasOneThread, OneThread), it also cannot
// undo that: a nested at::parallel_for in a unit reset MKL's count to torch's for the rest of the unit.
inline void per_thread_setup() {
  thread_local bool done = false;  // (this library's copy, as lazy_init_num_threads' flag is)
  if (done) return;
  done = true;
  (void)at::get_num_threads();  // libtorch's own set-up first (its first call on this thread)
#ifdef _OPENMP
  const int omp_threads = omp_get_max_threads();
#endif
#ifdef CONTRASTBOUND_MKL_LOCAL_THREADS
  // (0: MKL's global count; MKL_Set_Num_Threads_Local returns the thread's count before the call)
  const int mkl_threads = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(0) : 0;
#endif
  at::internal::lazy_init_num_threads();
#ifdef _OPENMP
  omp_set_num_threads(omp_threads);
#endif
#ifdef CONTRASTBOUND_MKL_LOCAL_THREADS
  if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(mkl_threads);
#endif
}

// at::parallel_for after per_thread_setup: for the kernels' loops that call no BLAS (their rounding does not depend
// on the split), on the calling thread's own counts.
template <typename F>
void parallel_for_plain(int64_t begin, int64_t end, int64_t grain, const F& f) {
  per_thread_setup();
  at::parallel_for(begin, end, grain, f);
}

// MKL's thread count on this thread set to 1 for the scope, restored after (0, MKL's "the global count", where
// none was set).
class BlasOneThread {
 public:
  BlasOneThread() {
    per_thread_setup();  // (here also where MKL is not torch's BLAS: it precedes every unit)
#ifdef CONTRASTBOUND_MKL_LOCAL_THREADS
    if (MKL_Set_Num_Threads_Local == nullptr) return;
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

// OpenMP's thread count on this thread set to 1 for the scope, restored after. torch's OpenMP backend reads its
// thread count from it (at::get_num_threads is omp_get_max_threads), so ATen's parallel_for runs inline in the
// scope, and oneDNN uses one thread; the count is per thread (OpenMP's nthreads-var of this thread's task), so
// other threads are not affected. active() is false where at::get_num_threads does not follow it.
class OneThread {
 public:
  OneThread() {
#ifdef _OPENMP
    per_thread_setup();
    previous_ = omp_get_max_threads();
    omp_set_num_threads(1);
    set_ = true;
    active_ = at::get_num_threads() == 1;
#endif
  }
  ~OneThread() {
#ifdef _OPENMP
    if (set_) omp_set_num_threads(previous_);
#endif
  }
  bool active() const { return active_; }
  OneThread(const OneThread&) = delete;
  OneThread& operator=(const OneThread&) = delete;

 private:
  int previous_ = 1;
  bool set_ = false;
  bool active_ = false;
};

template <typename F>
void parallel_for_tls(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  per_thread_setup();
  const at::ThreadLocalState state;
  const auto run = [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(state);
    const BlasOneThread one_blas_thread;  // (after per_thread_setup on this thread)
    f(b, e);
  };
  const int64_t n = end - begin;
  if ((n == 1 || n <= grain) && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    {
      const OneThread one_thread;
      if (one_thread.active()) {
        run(begin, end);
        return;
      }
    }
    // Two tasks of one unit each, so that at::parallel_for opens a region; the second is empty.
    at::parallel_for(0, 2, 1, [&](int64_t u0, int64_t) {
      if (u0 == 0) run(begin, end);
    });
    return;
  }
  at::parallel_for(begin, end, grain, run);
}

}  // namespace contrastbound
