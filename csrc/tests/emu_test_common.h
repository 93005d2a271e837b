// Shared by the emulated kernel tests (test_mma_emu.cpp, test_wgmma_emu.cpp): check counters, rounded random
// inputs, their float64 logits / log-sum-exps, the float16 coefficient bound, and the test cases. Included inside
// each test's anonymous namespace, after the kernels (it uses tc_bound_term).
#pragma once

#include "emu_checks.h"

// float to and from the half types (through the float64 conversions of emu_checks.h: the same roundings).
template <typename T>
T to_t(float x) {
  return from_d<T>(x);
}
template <typename T>
float from_t(T x) {
  return static_cast<float>(to_d(x));
}

// A (rows, d) matrix in type T, stored with row stride s0 and feature stride s1 (s1 = 2: every other element, so
// the kernels take the scalar copy path). `f(i, j)` is its value in float64 (after rounding to T).
template <typename T>
struct Mat {
  int64_t rows = 0, d = 0, s0 = 0, s1 = 1;
  std::vector<T> data;
  double f(int64_t i, int64_t j) const { return from_t<T>(data[i * s0 + j * s1]); }
  TcOperand<T> operand() const {
    TcOperand<T> o;
    o.ptr = data.data();
    o.s0 = s0;
    o.s1 = s1;
    o.rows = rows;
    constexpr int64_t E = 16 / sizeof(T);
    o.vec = s1 == 1 && (s0 % E == 0 || rows <= 1) && d % E == 0 && reinterpret_cast<uintptr_t>(o.ptr) % 16 == 0;
    return o;
  }
};

template <typename T>
Mat<T> random_mat(std::mt19937_64& rng, int64_t rows, int64_t d, bool strided, double spread) {
  Mat<T> m;
  m.rows = rows;
  m.d = d;
  m.s1 = strided ? 2 : 1;
  m.s0 = strided ? 2 * d + 3 : d;
  m.data.assign(std::max<int64_t>(1, rows * m.s0 + 8), to_t<T>(0.f));
  std::normal_distribution<double> nd(0.0, spread);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < d; ++j) m.data[i * m.s0 + j * m.s1] = to_t<T>(static_cast<float>(nd(rng)));
  return m;
}

template <typename T>
std::vector<float> inv_norms(const Mat<T>& m) {
  std::vector<float> inv(m.rows);
  for (int64_t i = 0; i < m.rows; ++i) {
    double s = 0;
    for (int64_t j = 0; j < m.d; ++j) s += m.f(i, j) * m.f(i, j);
    inv[i] = static_cast<float>(1.0 / std::max(std::sqrt(s), 1e-12));
  }
  return inv;
}

template <typename T>
double dot(const Mat<T>& x, int64_t i, const Mat<T>& y, int64_t k) {
  double s = 0;
  for (int64_t j = 0; j < x.d; ++j) s += x.f(i, j) * y.f(k, j);
  return s;
}

// ||got - want|| / max(||want||, 1e-3 sqrt(n)): relative Frobenius error, except where the reference is itself at
// rounding level (d = 1 with normalisation: a bank row's gradient vanishes exactly), as in tests/test_cuda.py.
double rel_err(const std::vector<double>& got, const std::vector<double>& want) {
  const double floor = 1e-3 * std::sqrt(static_cast<double>(std::max<size_t>(1, want.size())));
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), floor);
}

struct Case {
  int64_t B, K, d;
  bool exclude_self, strided;
  int stages;
  int64_t chunks;   // lse / one-pass: K chunks; rows: Y splits
  unsigned grid;    // blocks launched (fewer than units: the grid-stride loops)
  float scale;
  int64_t zero_a = -1, zero_n = -1;  // an anchor row / a bank row set to zero (-1: none)
  int chunk = 0;  // mma.sync kernels: features per copied tile (TcSmem::chunk; 0: whole rows)
  // An excluded array (bank_cross_entropy's targets): anchor i leaves bank row excluded_rows(c)[i] out.
  bool excl_rows = false;
  std::string name() const {
    char buf[200];
    std::snprintf(buf, sizeof buf, "B=%lld K=%lld d=%lld excl=%d strided=%d stages=%d chunks=%lld grid=%u%s%s%s",
                  (long long)B, (long long)K, (long long)d, exclude_self, strided, stages, (long long)chunks, grid,
                  zero_a >= 0 || zero_n >= 0 ? " zero rows" : "", chunk > 0 ? " tile chunks" : "",
                  excl_rows ? " excluded rows" : "");
    return buf;
  }
};

// The excluded array of a case (empty without excl_rows): values in [-1, K + 1], so -1 and rows past the bank
// (which exclude nothing), repeats, and rows in every tile.
inline std::vector<int64_t> excluded_rows(const Case& c) {
  std::vector<int64_t> ex;
  if (c.excl_rows)
    for (int64_t i = 0; i < c.B; ++i) ex.push_back((i * 37 + 11) % (c.K + 3) - 1);
  return ex;
}

// Row `row` of m set to zero (nothing for row < 0).
template <typename T>
Mat<T> with_zero_row(Mat<T> m, int64_t row) {
  if (row >= 0)
    for (int64_t j = 0; j < m.d; ++j) m.data[row * m.s0 + j * m.s1] = to_t<T>(0.f);
  return m;
}

// The logits l(i, k) = s a_i.n_k inv_a inv_n in float64, -inf where excluded.
template <typename T>
std::vector<double> logits(const Mat<T>& A, const Mat<T>& N, const std::vector<float>& ai, const std::vector<float>& ni,
                           const Case& c) {
  std::vector<double> l(A.rows * N.rows);
  const std::vector<int64_t> ex = excluded_rows(c);
  for (int64_t i = 0; i < A.rows; ++i)
    for (int64_t k = 0; k < N.rows; ++k) {
      const bool out = (c.exclude_self && i == k) || (!ex.empty() && ex[i] == k);
      l[i * N.rows + k] = out ? -INFINITY : c.scale * dot(A, i, N, k) * ai[i] * ni[k];
    }
  return l;
}

std::pair<double, double> lse_range(const std::vector<double>& l, int64_t K, int64_t i, int64_t k0, int64_t k1) {
  double m = -INFINITY;
  for (int64_t k = k0; k < k1; ++k) m = std::max(m, l[i * K + k]);
  double s = 0;
  if (m != -INFINITY)
    for (int64_t k = k0; k < k1; ++k) s += std::exp(l[i * K + k] - m);
  return {m, s};
}

// float16: the coefficient bound the host side computes with tc_bound_kernel (max of inv x |w| scale), here by
// that kernel (two blocks, so its grid-stride loop and atomic max across blocks) and checked against a host loop.
template <typename T>
std::vector<float> coef_bound(const std::vector<float>& inv, const std::vector<float>* w, float wscale) {
  if (!std::is_same<T, __half>::value) return {};
  float b = 0;
  for (size_t i = 0; i < inv.size(); ++i)
    b = std::max(b, tc_bound_term(inv[i], w ? std::fabs((*w)[i]) * wscale : 1.f));
  float got = 0.f;  // the launcher zeroes it first
  const float* wp = w ? w->data() : nullptr;
  const int64_t n = static_cast<int64_t>(inv.size());
  emu::launch(2, kTcThreads, 0, [&] { tc_bound_kernel(inv.data(), wp, &wscale, n, &got); });
  expect(got == b, "tc_bound_kernel: " + std::to_string(got) + " vs " + std::to_string(b));
  return {b};
}
