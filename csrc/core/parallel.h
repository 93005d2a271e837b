// at::parallel_for with the caller's thread-local state (inference mode, grad mode, dispatch keys) installed in
// every worker: OpenMP workers do not inherit it, and an in-place ATen op there on a tensor the caller made under
// torch.inference_mode() would raise (shared by the CPU kernels: csrc/cpu/*.cpp).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>

namespace contrastbound {

template <typename F>
void parallel_for_tls(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(state);
    f(b, e);
  });
}

}  // namespace contrastbound
