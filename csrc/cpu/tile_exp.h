// Exponentials of a tile of exponent arguments (logits less a running max or a log-sum-exp) by ATen's vectorised
// exp, with the weights below float's (double's) smallest normal number set to 0, as exp_normal does for one
// (shared by the CPU kernels: csrc/cpu/*.cpp).
//
// ATen's exp leaves its vectorised path for arguments whose exponential is subnormal or 0 (-inf included): on this
// project's machine (AVX-512 build of torch 2.13) a 256 x 512 tile of arguments in [-100, -70] took 2.5 ms against
// 31 us, and a matrix product with subnormal weights in it 35 ms against 0.15 ms. Such arguments come with large
// logits: unit features at temperatures below ~0.023 (|l| <= 1 / T, spread up to 2 / T), or features used
// unnormalised; clustered features at T = 0.01 made a training step up to 50x slower. Where the caller cannot rule them
// out, the arguments are clamped to the floor first (every exponential then normal) and those at it set to 0 after,
// two more passes over the tile (~20 us of a ~200 us tile at d = 128).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <cstdint>
#if defined(__x86_64__) || defined(__SSE2__)
#include <xmmintrin.h>
#endif

#include "../core/online_lse.h"

namespace contrastbound {
namespace cpu {

// x := exp_normal(x), in place. may_underflow: whether an argument may lie below exp_floor (else a plain exp_).
// NaN stays NaN (clamp and threshold both keep it); -inf gives 0.
template <typename acc_t>
at::Tensor& exp_normal_(at::Tensor& x, bool may_underflow) {
  if (!may_underflow) return x.exp_();
  const acc_t floor = exp_floor<acc_t>();
  // threshold_(x, t, 0): x <= t ? 0 : x. The floor's exponential with a margin for the last-bit differences between
  // ATen's exp and std::exp: weights of up to 1.0001 times float's smallest normal number are set to 0 too.
  const double at_floor = std::exp(static_cast<double>(floor)) * 1.0001;
  return at::threshold_(x.clamp_min_(floor).exp_(), at_floor, 0.0);
}

// x := sigmoid(x) in place, with the values below float's (double's) smallest normal number set to 0 (a logit below
// exp_floor), as exp_normal_ does for e^x; the arguments are clamped to [exp_floor, -exp_floor] first, where
// sigmoid's own exponential stays normal (sigmoid(-exp_floor) rounds to 1, as it does beyond).
template <typename acc_t>
at::Tensor& sigmoid_normal_(at::Tensor& x, bool may_underflow) {
  if (!may_underflow) return x.sigmoid_();
  const acc_t floor = exp_floor<acc_t>();
  const double at_floor = std::exp(static_cast<double>(floor)) * 1.0001;
  return at::threshold_(x.clamp_(floor, -floor).sigmoid_(), at_floor, 0.0);
}

// Nonnegative weights formed as products of normal ones (e^{l - a} u v) with those below float's (double's)
// smallest normal number set to 0, as exp_normal_ leaves them; a no-op where !may_underflow.
template <typename acc_t>
at::Tensor& flush_subnormal_(at::Tensor& x, bool may_underflow) {
  if (!may_underflow) return x;
  return at::threshold_(x, static_cast<double>(std::numeric_limits<acc_t>::min()), 0.0);
}

// The processor's flush-to-zero mode on this thread for the scope (or until restore()), the caller's mode after: a
// floating-point result below the smallest normal number is 0 instead of a subnormal, which on x86 costs ~100x
// in each operation that forms or reads it (an assist) and on a GPU's tensor cores is the rule. Operands are read as
// they are (no denormals-are-zero): a subnormal input keeps its value. x86 (MXCSR.FTZ) and AArch64 (FPCR.FZ);
// elsewhere a no-op. Used by the row modes' loops (info_nce_cpu.cpp), which keep the terms that matter above the
// threshold: V's relative to a weight of 1, the indexed bank's scaled by 2^E, g_i multiplied in last.
class FlushToZeroScope {
 public:
  FlushToZeroScope() {
#if defined(__x86_64__) || defined(__SSE2__)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8000u);  // FTZ
    active_ = true;
#elif defined(__aarch64__)
    uint64_t fpcr;
    asm volatile("mrs %0, fpcr" : "=r"(fpcr));
    saved_ = fpcr;
    asm volatile("msr fpcr, %0" : : "r"(fpcr | (uint64_t(1) << 24)));  // FZ
    active_ = true;
#endif
  }
  ~FlushToZeroScope() { restore(); }
  void restore() {
    if (!active_) return;
#if defined(__x86_64__) || defined(__SSE2__)
    _mm_setcsr(static_cast<unsigned int>(saved_));
#elif defined(__aarch64__)
    asm volatile("msr fpcr, %0" : : "r"(saved_));
#endif
    active_ = false;
  }
  FlushToZeroScope(const FlushToZeroScope&) = delete;
  FlushToZeroScope& operator=(const FlushToZeroScope&) = delete;

 private:
  uint64_t saved_ = 0;
  bool active_ = false;
};

}  // namespace cpu
}  // namespace contrastbound
