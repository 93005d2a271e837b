// Online log-sum-exp and L2-normalisation primitives shared by every InfoNCE mode.
//
// Torch-free and header-only, so the C++ tests (csrc/tests) check them against a direct computation, and
// the CPU kernel (csrc/cpu) and the CUDA kernels (csrc/cuda) use the same arithmetic. Under nvcc the scalar
// primitives (LseState, rescale_factor, merge, finalize, row_scale) are __host__ __device__; host builds see
// exactly the code they saw before (CB_HOST_DEVICE expands to nothing, neg_infinity to numeric_limits).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define CB_HOST_DEVICE __host__ __device__
#else
#define CB_HOST_DEVICE
#endif

namespace contrastbound {

// -infinity in acc_t. Device code cannot call the constexpr host function numeric_limits::infinity() unless
// nvcc runs with --expt-relaxed-constexpr, so device code takes it from the compiler builtin.
template <typename acc_t>
CB_HOST_DEVICE inline acc_t neg_infinity() {
#if defined(__CUDA_ARCH__)
  return -static_cast<acc_t>(__builtin_huge_valf());
#else
  return -std::numeric_limits<acc_t>::infinity();
#endif
}

// The larger of a and b, NaN if either is NaN (as torch.maximum), usable in device code without relaxed
// constexpr. std::max / fmax would drop a NaN: a NaN logit or partial state would then vanish from the sum
// (a finite wrong loss) instead of making it NaN.
template <typename acc_t>
CB_HOST_DEVICE inline acc_t max_of(acc_t a, acc_t b) {
  return (a < b || b != b) ? b : a;
}

// F.normalize's eps: x / max(||x||, eps).
constexpr double kNormEps = 1e-12;

// Running state of log(sum_j exp(l_j)) = max + log(sum), sum taken relative to max.
template <typename acc_t>
struct LseState {
  acc_t max = neg_infinity<acc_t>();
  acc_t sum = 0;
};

// Factor that rescales a sum taken relative to old_max to one relative to new_max (0 for an empty state).
template <typename acc_t>
CB_HOST_DEVICE inline acc_t rescale_factor(acc_t old_max, acc_t new_max) {
  return old_max == neg_infinity<acc_t>() ? acc_t(0) : std::exp(old_max - new_max);
}

// The exponent below which e^x is no normal number of acc_t: e^-87.3365 = 1.17554e-38 >= 2^-126 (float32's
// smallest normal), e^-708.396 = 2.22517e-308 >= 2^-1022 (float64's).
template <typename acc_t>
constexpr acc_t exp_floor() {
  return sizeof(acc_t) == sizeof(float) ? acc_t(-87.3365f) : acc_t(-708.396);
}

// e^x, or 0 where x < exp_floor (NaN stays NaN): the CPU kernels' weights e^{l - max} and e^{l - lse}. A subnormal
// weight carries few digits and, on x86, costs ~20x in every operation it enters (and ATen's vectorised exp forms
// it ~100x slower than a normal one); the CUDA tensor-core kernels' __expf (ex2.approx.ftz) flushes the same
// weights to 0 (the SIMT kernels keep them: subnormals cost a GPU nothing).
// Against a sum of weights >= 1 (the largest is e^0) the flushed ones, each below 1.2e-38, change nothing.
template <typename acc_t>
inline acc_t exp_normal(acc_t x) {
  // (the exponential of the clamped argument, then a select: no branch, which in online_update's loop cost ~2 ns a
  // weight against the plain std::exp loop; the clamp keeps std::exp off its subnormal path)
  const bool below = x < exp_floor<acc_t>();
  const acc_t e = std::exp(below ? exp_floor<acc_t>() : x);
  return below ? acc_t(0) : e;
}

// Folds logits[0, n) into st. Writes exp(logit - new max) into exps (which may alias logits) and returns the
// factor by which accumulations made before this call (weighted sums of rows) must be rescaled.
template <typename acc_t>
inline acc_t online_update(LseState<acc_t>& st, const acc_t* logits, int64_t n, acc_t* exps) {
  acc_t tile_max = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < n; ++j) tile_max = max_of(tile_max, logits[j]);
  const acc_t new_max = max_of(st.max, tile_max);
  if (new_max == -std::numeric_limits<acc_t>::infinity()) {
    for (int64_t j = 0; j < n; ++j) exps[j] = 0;
    return acc_t(1);
  }
  const acc_t alpha = rescale_factor(st.max, new_max);
  acc_t s = 0;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t e = exp_normal(logits[j] - new_max);
    exps[j] = e;
    s += e;
  }
  st.sum = st.sum * alpha + s;
  st.max = new_max;
  return alpha;
}

// Merges b into a. fa and fb receive the factors that rescale a's and b's weighted sums to the merged state.
template <typename acc_t>
CB_HOST_DEVICE inline void merge(LseState<acc_t>& a, const LseState<acc_t>& b, acc_t& fa, acc_t& fb) {
  const acc_t m = max_of(a.max, b.max);
  if (m == neg_infinity<acc_t>()) {
    fa = fb = acc_t(0);
    return;
  }
  fa = rescale_factor(a.max, m);
  fb = rescale_factor(b.max, m);
  a.sum = a.sum * fa + b.sum * fb;
  a.max = m;
}

template <typename acc_t>
CB_HOST_DEVICE inline acc_t finalize(const LseState<acc_t>& st) {
  return st.max + std::log(st.sum);
}

// lse - x for a logit x of the sum (the positive), as (max - x) + log(sum): where x is the largest logit (a
// confident positive) that is log(sum) exactly, as in torch's log_softmax, where finalize(st) - x would leave
// the rounding of lse (eps |lse|) in a loss that may be far smaller.
template <typename acc_t>
CB_HOST_DEVICE inline acc_t finalize_minus(const LseState<acc_t>& st, acc_t x) {
  return (st.max - x) + std::log(st.sum);
}

// The loss log(e^x + sum_k e^{l_k}) - x of a positive x kept apart from the negatives' state neg, as
// softplus(lse_neg - x). Its relative error is the absolute error of lse_neg - x (~eps |lse|): with the positive
// inside the sum, a dominant one gives log(1 + r) from a total 1 + r whose rounding costs r its digits below eps
// (relative error eps / r: 6e-4 for a loss of 1e-4 in float32). 0 without negatives (lse_neg = -inf); NaN stays NaN.
template <typename acc_t>
CB_HOST_DEVICE inline acc_t softplus_loss(const LseState<acc_t>& neg, acc_t x) {
  const acc_t z = (neg.max - x) + std::log(neg.sum);  // lse_neg - x
  return z > acc_t(0) ? z + std::log1p(std::exp(-z)) : std::log1p(std::exp(z));
}

// How a row x enters the logits: x_hat = inv * x. For the gradient,
// d/dx = inv * g - (x_hat . g) * proj * x, with proj = inv^2 where ||x|| >= eps (the normalisation's
// Jacobian) and 0 where F.normalize clamps the norm (or normalize=false: inv = 1, proj = 0). Form the radial
// term as (x_hat . g) * (proj * x_j), |proj * x_j| <= inv: (x_hat . g) * proj first overflows for a small row
// at a tiny temperature (x_hat . g ~ 1 / T) where the gradient itself is finite.
template <typename acc_t>
struct RowScale {
  acc_t inv = 1;
  acc_t proj = 0;
};

template <typename acc_t>
CB_HOST_DEVICE inline RowScale<acc_t> row_scale(acc_t sum_of_squares, bool normalize) {
  RowScale<acc_t> r;
  if (!normalize) return r;
  const acc_t norm = std::sqrt(sum_of_squares);
  if (norm >= acc_t(kNormEps)) {
    r.inv = acc_t(1) / norm;
    r.proj = r.inv * r.inv;
  } else {
    r.inv = acc_t(1) / acc_t(kNormEps);
    r.proj = 0;
  }
  return r;
}

// Dot product of an accumulation-type row with a row of any type, accumulated in acc_t with eight
// independent partial sums (so the compiler can vectorise it without reassociating one sum).
template <typename acc_t, typename in_t>
inline acc_t dot(const acc_t* a, const in_t* b, int64_t d) {
  acc_t p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    for (int u = 0; u < 8; ++u) p[u] += a[j + u] * static_cast<acc_t>(b[j + u]);
  }
  for (; j < d; ++j) p[0] += a[j] * static_cast<acc_t>(b[j]);
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

// (a . b) inv for a raw row b and its inverse norm inv, e.g. a logit (s a_hat) . n_hat or n_hat . G: where the raw
// product overflows although the result does not (a row of norm ~1e37, or ~1e19 with s = 1e20), the row is scaled
// first, a . (b inv), as a shared bank's tiles are (the usual case pays one isfinite test). A row the normalisation
// maps to zero (its norm overflows: inv = 0) then gives 0, as with F.normalize, not inf * 0 = NaN.
template <typename acc_t, typename in_t>
inline acc_t dot_scaled(const acc_t* a, const in_t* b, int64_t d, acc_t inv) {
  const acc_t l = dot(a, b, d) * inv;
  if (std::isfinite(l)) return l;
  acc_t p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    for (int u = 0; u < 8; ++u) p[u] += a[j + u] * (static_cast<acc_t>(b[j + u]) * inv);
  }
  for (; j < d; ++j) p[0] += a[j] * (static_cast<acc_t>(b[j]) * inv);
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

template <typename acc_t, typename in_t>
inline acc_t sum_of_squares(const in_t* x, int64_t d) {
  acc_t p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    for (int u = 0; u < 8; ++u) {
      const acc_t v = static_cast<acc_t>(x[j + u]);
      p[u] += v * v;
    }
  }
  for (; j < d; ++j) {
    const acc_t v = static_cast<acc_t>(x[j]);
    p[0] += v * v;
  }
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

// y += alpha * x
template <typename acc_t, typename in_t>
inline void axpy(acc_t* y, acc_t alpha, const in_t* x, int64_t d) {
  for (int64_t j = 0; j < d; ++j) y[j] += alpha * static_cast<acc_t>(x[j]);
}

}  // namespace contrastbound
