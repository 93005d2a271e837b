// C++ tests run by ctest: the online log-sum-exp primitives against a direct computation, the registered
// CPU kernel (called through the dispatcher) against logits materialised with ATen, parallel_for_tls, and the
// range check of negative_indices both ways (read back, and in the stream as under CUDA graph capture).
//
//   test_online_lse primitives | kernel | parallel | checks
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/online_lse.h"
#include "core/parallel.h"
#include "info_nce_checks.h"

#if defined(__GNUC__) && !defined(__APPLE__)
extern "C" int MKL_Get_Max_Threads() __attribute__((weak));  // (null where torch's BLAS is not MKL)
#endif

namespace {

int failures = 0;

void expect_close(double got, double want, double tol, const std::string& what) {
  const double err = std::abs(got - want);
  if (!(err <= tol * std::max(1.0, std::abs(want)))) {
    std::printf("FAIL %s: got %.17g want %.17g (err %.3g)\n", what.c_str(), got, want, err);
    ++failures;
  }
}

double direct_lse(const std::vector<double>& x) {
  double m = -INFINITY;
  for (double v : x) m = std::max(m, v);
  double s = 0;
  for (double v : x) s += std::exp(v - m);
  return m + std::log(s);
}

template <typename acc_t>
void check_online_update(std::mt19937_64& rng, double spread, double tol) {
  std::normal_distribution<double> normal(0.0, spread);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 3000);
    const int tile = 1 + static_cast<int>(rng() % 700);
    std::vector<double> x(n);
    std::vector<double> weight(n);
    for (int i = 0; i < n; ++i) {  // values exactly representable in acc_t: only accumulation error remains
      x[i] = static_cast<double>(static_cast<acc_t>(normal(rng)));
      weight[i] = static_cast<double>(static_cast<acc_t>(normal(rng)));
    }
    // Online over tiles, with a weighted sum rescaled like the kernel's anchor term.
    contrastbound::LseState<acc_t> st;
    acc_t weighted = 0;
    std::vector<acc_t> buf(tile);
    for (int t0 = 0; t0 < n; t0 += tile) {
      const int tk = std::min(tile, n - t0);
      for (int j = 0; j < tk; ++j) buf[j] = static_cast<acc_t>(x[t0 + j]);
      const acc_t alpha = contrastbound::online_update(st, buf.data(), tk, buf.data());
      weighted *= alpha;
      for (int j = 0; j < tk; ++j) weighted += buf[j] * static_cast<acc_t>(weight[t0 + j]);
    }
    const double lse = direct_lse(x);
    expect_close(contrastbound::finalize(st), lse, tol, "online_update lse");
    double want_weighted = 0, magnitude = 0;  // the weighted sum may cancel: scale the tolerance by sum |terms|
    for (int i = 0; i < n; ++i) {
      want_weighted += std::exp(x[i] - lse) * weight[i];
      magnitude += std::exp(x[i] - lse) * std::abs(weight[i]);
    }
    const double wtol = tol * 10 * std::max(1.0, magnitude) / std::max(1.0, std::abs(want_weighted));
    expect_close(weighted / st.sum, want_weighted, wtol, "online weighted mean");

    // Split into chunks, reduce each, merge in order: the kernel's parallel path.
    const int chunks = 1 + static_cast<int>(rng() % 9);
    contrastbound::LseState<acc_t> merged;
    acc_t merged_weighted = 0;
    for (int c = 0; c < chunks; ++c) {
      const int b = static_cast<int>(static_cast<long>(n) * c / chunks);
      const int e = static_cast<int>(static_cast<long>(n) * (c + 1) / chunks);
      contrastbound::LseState<acc_t> part;
      acc_t part_weighted = 0;
      for (int i = b; i < e; ++i) {
        acc_t v = static_cast<acc_t>(x[i]);
        const acc_t alpha = contrastbound::online_update(part, &v, 1, &v);
        part_weighted = part_weighted * alpha + v * static_cast<acc_t>(weight[i]);
      }
      acc_t fa, fb;
      contrastbound::merge(merged, part, fa, fb);
      merged_weighted = merged_weighted * fa + part_weighted * fb;
    }
    expect_close(contrastbound::finalize(merged), lse, tol, "merged lse");
    expect_close(merged_weighted / merged.sum, want_weighted, wtol, "merged weighted mean");
  }
}

void check_primitives() {
  std::mt19937_64 rng(1234);
  check_online_update<double>(rng, 1.0, 1e-12);
  check_online_update<double>(rng, 300.0, 1e-12);  // logits of temperature 0.01 and beyond
  check_online_update<float>(rng, 1.0, 2e-5);
  check_online_update<float>(rng, 100.0, 2e-6);

  // lse - x for a dominant logit x = 80 (temperature 0.01) and one other at x - 14: the loss is log1p(e^-14)
  // ~ 8.3e-7. (max - x) + log(sum) is exact to float32 rounding of log(sum); finalize(st) - x would round lse
  // ~ 80 first (spacing 7.6e-6: nothing of the loss left).
  {
    contrastbound::LseState<float> st{80.0f, 1.0f};
    float other = 80.0f - 14.0f;
    contrastbound::online_update(st, &other, 1, &other);
    const double want = std::log1p(std::exp(-14.0));
    const double got = contrastbound::finalize_minus(st, 80.0f);
    if (!(std::abs(got - want) <= 0.2 * want)) {  // float32 1 + 8.3e-7 keeps ~7 of its 24 bits of the fraction
      std::printf("FAIL finalize_minus: got %.6g want %.6g\n", got, want);
      ++failures;
    }
    if (contrastbound::finalize_minus(contrastbound::LseState<float>{80.0f, 1.0f}, 80.0f) != 0.0f) {
      std::printf("FAIL finalize_minus of the positive alone is not 0\n");
      ++failures;
    }
  }

  // softplus_loss: the positive kept apart from the negatives' state, loss = log(1 + e^{lse_neg - x}), relative
  // to float32 rounding (the gaps here are exact in float32), also where the loss is far below eps (1 + r rounds
  // to 1: finalize_minus gives 0 there, or 7 of 24 bits as above); e^-200 underflows float32 (absolute 1e-37).
  for (double gap : {-200.0, -60.0, -14.0, -1.0, 0.0, 0.5, 3.0, 30.0, 150.0}) {
    contrastbound::LseState<float> neg;
    const float other = static_cast<float>(80.0 + gap);
    float e;
    contrastbound::online_update(neg, &other, 1, &e);
    const long double z = static_cast<long double>(other) - 80.0L;  // the gap as float32 holds it
    const long double want = z > 0 ? z + std::log1p(std::exp(-z)) : std::log1p(std::exp(z));
    const double got = contrastbound::softplus_loss(neg, 80.0f);
    if (!(std::abs(got - static_cast<double>(want)) <= 1e-6 * static_cast<double>(want) + 1e-37)) {
      std::printf("FAIL softplus_loss gap %g: got %.9g want %.9g\n", gap, got, static_cast<double>(want));
      ++failures;
    }
  }
  if (contrastbound::softplus_loss(contrastbound::LseState<float>{}, 80.0f) != 0.0f) {
    std::printf("FAIL softplus_loss without negatives is not 0\n");
    ++failures;
  }
  if (!std::isnan(contrastbound::softplus_loss(contrastbound::LseState<float>{NAN, 1.0f}, 80.0f))) {
    std::printf("FAIL softplus_loss of a NaN state is not NaN\n");
    ++failures;
  }

  // Empty state: merging two empty states and finishing gives -inf; an update from empty has factor 0.
  contrastbound::LseState<double> a, b;
  double fa, fb;
  contrastbound::merge(a, b, fa, fb);
  if (!(std::isinf(contrastbound::finalize(a)) && contrastbound::finalize(a) < 0)) {
    std::printf("FAIL empty merge is not -inf\n");
    ++failures;
  }
  double v = 3.0;
  expect_close(contrastbound::online_update(a, &v, 1, &v), 0.0, 0.0, "factor from empty state");

  // NaN propagates (as torch's logsumexp): a NaN logit, a NaN-only tile, or a NaN partial state merged into an
  // empty one must give a NaN lse, never drop out of the sum.
  const double nan = std::numeric_limits<double>::quiet_NaN();
  auto expect_nan = [](double x, const char* what) {
    if (!std::isnan(x)) {
      std::printf("FAIL %s: %g is not NaN\n", what, x);
      ++failures;
    }
  };
  {
    contrastbound::LseState<double> st;
    double l[3] = {1.0, nan, 2.0};
    contrastbound::online_update(st, l, 3, l);
    expect_nan(contrastbound::finalize(st), "NaN logit inside a tile");
    double more[2] = {5.0, 6.0};
    contrastbound::online_update(st, more, 2, more);
    expect_nan(contrastbound::finalize(st), "NaN state after a later tile");
  }
  {
    contrastbound::LseState<double> st;
    double l[2] = {nan, nan};
    contrastbound::online_update(st, l, 2, l);
    expect_nan(contrastbound::finalize(st), "NaN-only tile from the empty state");
  }
  for (int order = 0; order < 2; ++order) {
    contrastbound::LseState<double> empty, poisoned{nan, 1.0};
    double f1, f2;
    if (order == 0) {
      contrastbound::merge(empty, poisoned, f1, f2);
      expect_nan(contrastbound::finalize(empty), "NaN state merged into an empty one");
    } else {
      contrastbound::merge(poisoned, empty, f1, f2);
      expect_nan(contrastbound::finalize(poisoned), "empty state merged into a NaN one");
    }
  }
  expect_nan(contrastbound::max_of(nan, 1.0), "max_of(NaN, 1)");
  expect_nan(contrastbound::max_of(1.0, nan), "max_of(1, NaN)");

  // row_scale reproduces F.normalize: 1/||x|| above eps, 1/eps (and no projection) below.
  auto r = contrastbound::row_scale<double>(4.0, true);
  expect_close(r.inv, 0.5, 1e-15, "row_scale inv");
  expect_close(r.proj, 0.25, 1e-15, "row_scale proj");
  r = contrastbound::row_scale<double>(0.0, true);
  expect_close(r.inv, 1e12, 1e-15, "row_scale eps");
  expect_close(r.proj, 0.0, 0.0, "row_scale eps proj");
  r = contrastbound::row_scale<double>(9.0, false);
  expect_close(r.inv, 1.0, 0.0, "row_scale off");

  // dot with 8 partial sums equals the plain sum for lengths around the unroll.
  for (int d = 1; d < 40; ++d) {
    std::vector<double> x(d), y(d);
    double want = 0;
    for (int j = 0; j < d; ++j) {
      x[j] = std::sin(j + 1.0);
      y[j] = std::cos(2.0 * j);
      want += x[j] * y[j];
    }
    expect_close(contrastbound::dot(x.data(), y.data(), d), want, 1e-14, "dot d=" + std::to_string(d));
  }
}

void check_kernel() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("contrastbound::info_nce_fwd", "")
                .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                      const at::Tensor&,
                                                                      const std::optional<at::Tensor>&, double, bool,
                                                                      bool, bool, bool,
                                                                      const std::optional<at::Tensor>&,
                                                                      const std::optional<at::Tensor>&,
                                                                      const std::optional<at::Tensor>&,
                                                                      const std::optional<at::Tensor>&)>();
  at::manual_seed(7);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  for (int64_t K : {0, 1, 511, 512, 513, 3001}) {
    for (bool normalize : {false, true}) {
      const int64_t B = 37, d = 19;
      const double scale = 1.0 / 0.07;
      at::Tensor a = at::randn({B, d}, opts), p = at::randn({B, d}, opts), n = at::randn({K, d}, opts);
      auto [loss, lse, term] =
          op.call(a, p, n, std::nullopt, scale, normalize, true, true, false, std::nullopt, std::nullopt,
                  std::nullopt, std::nullopt);
      at::Tensor an = a, pn = p, nn = n;
      if (normalize) {
        an = a / a.norm(2, 1, true);
        pn = p / p.norm(2, 1, true);
        nn = n / n.norm(2, 1, true).clamp_min(1e-12);
      }
      const at::Tensor pos = (an * pn).sum(1, true) * scale;
      const at::Tensor logits = at::cat({pos, at::mm(an, nn.t()) * scale}, 1);
      const at::Tensor want_lse = at::logsumexp(logits, {1});
      const at::Tensor want_term = at::mm(at::softmax(logits, 1).narrow(1, 1, K), nn);
      const std::string tag = "K=" + std::to_string(K) + (normalize ? " normalized" : "");
      expect_close((lse - want_lse).abs().max().item<double>(), 0.0, 1e-11, "kernel lse " + tag);
      expect_close((loss - (want_lse - pos.squeeze(1))).abs().max().item<double>(), 0.0, 1e-11, "kernel loss " + tag);
      expect_close((term - want_term).abs().max().item<double>(), 0.0, 1e-11, "kernel anchor term " + tag);
    }
  }
  // excluded (bank_cross_entropy's target rows): bank row excluded[i] left out of anchor i's sum; entries outside
  // [0, K), int64's extremes among them, leave none out. Several bank tiles, so a tile's first row k0 > 0 is
  // subtracted from each entry (CMake builds this test with -fsanitize=signed-integer-overflow where it can).
  const int64_t B = 37, K = 3001, d = 19;
  const double scale = 1.0 / 0.07;
  at::Tensor a = at::randn({B, d}, opts), p = at::randn({B, d}, opts), n = at::randn({K, d}, opts);
  std::vector<int64_t> rows(B);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t extremes[] = {std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max(), -1, K};
    rows[i] = i % 3 == 0 ? extremes[(i / 3) % 4] : (i * 977) % K;
  }
  const at::Tensor excluded = at::tensor(rows, at::TensorOptions().dtype(at::kLong));
  const at::Tensor lse = std::get<1>(op.call(a, p, n, std::nullopt, scale, false, true, false, false, excluded,
                                             std::nullopt, std::nullopt, std::nullopt));
  const at::Tensor pos = (a * p).sum(1, true) * scale;
  at::Tensor logits = at::cat({pos, at::mm(a, n.t()) * scale}, 1);
  for (int64_t i = 0; i < B; ++i)
    if (rows[i] >= 0 && rows[i] < K) logits.index_put_({i, rows[i] + 1}, -std::numeric_limits<double>::infinity());
  expect_close((lse - at::logsumexp(logits, {1})).abs().max().item<double>(), 0.0, 1e-11, "kernel lse, excluded");
}

// MKL's thread count on this thread: -1 where torch's BLAS is not MKL.
int mkl_threads_here() {
#if defined(__GNUC__) && !defined(__APPLE__)
  if (MKL_Get_Max_Threads != nullptr) return MKL_Get_Max_Threads();
#endif
  return -1;
}

// parallel_for_tls (csrc/core/parallel.h): every unit runs once, and torch's own parallel work inside a unit runs
// inline on the unit's thread (a split step's units in a parallel region; a one-unit step and a step within one
// grain, where at::parallel_for alone would run inline with the caller's thread count, with OpenMP's count 1 on the
// calling thread, restored after), inline where the caller is already in a region, with the caller's thread-local
// state (inference mode) in every task, and with MKL's thread count 1 in every unit, also after an ATen op large
// enough to run torch's per-thread set-up on a thread new to torch (which sets MKL's count back to torch's). Run
// alone (ctest), so the 2- and 3-thread steps meet threads new to torch.
void check_parallel() {
  const int saved = at::get_num_threads();
  struct Step {
    int64_t begin, end, grain;
    const char* what;
  };
  for (int threads : {2, 3}) {
    at::set_num_threads(threads);
    for (const Step& st : {Step{0, 1, 1, "one unit"}, Step{5, 6, 1, "one unit at an offset"},
                           Step{0, 5, 16, "five units within one grain"}, Step{0, 64, 1, "64 units"}}) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(st.end));
      std::atomic<bool> split{false}, not_inference{false};
      std::atomic<int> mkl_threads{1};
      {
        c10::InferenceMode guard;
        contrastbound::parallel_for_tls(st.begin, st.end, st.grain, [&](int64_t b, int64_t e) {
          std::atomic<int> calls{0};  // torch's parallel_for over 4 units: one inline call, or one per thread
          at::parallel_for(0, 4, 1, [&](int64_t, int64_t) { ++calls; });
          if (calls != 1) split = true;
          if (!c10::InferenceMode::is_enabled()) not_inference = true;
          // (2^20 elements: past TensorIterator's grain, so the op calls at::parallel_for)
          at::Tensor big = at::ones({int64_t(1) << 20}).add_(1);
          const int here = mkl_threads_here();
          if (here != -1 && here != 1) mkl_threads = here;
          for (int64_t u = b; u < e; ++u) ++hits[static_cast<size_t>(u)];
        });
      }
      const std::string what = std::string(st.what) + ", " + std::to_string(threads) + " threads";
      for (int64_t u = 0; u < st.end; ++u) {
        expect_close(hits[static_cast<size_t>(u)], u >= st.begin ? 1 : 0, 0, what + ": unit " + std::to_string(u));
      }
      expect_close(split ? 1 : 0, 0, 0, what + ": torch's parallel_for inline in every unit");
      expect_close(at::get_num_threads(), threads, 0, what + ": the thread count after the step");
      expect_close(not_inference ? 1 : 0, 0, 0, what + ": the caller's inference mode in every task");
      expect_close(mkl_threads, 1, 0, what + ": MKL's thread count 1 in every unit");
    }
    // Called from inside a region (a kernel's unit calling another pass): inline, on the calling thread.
    std::atomic<int> nested_units{0}, nested_elsewhere{0};
    at::parallel_for(0, 2, 1, [&](int64_t u0, int64_t) {
      if (u0 != 0) return;
      const int tid = at::get_thread_num();
      contrastbound::parallel_for_tls(0, 7, 1, [&](int64_t b, int64_t e) {
        if (at::get_thread_num() != tid) ++nested_elsewhere;
        nested_units += static_cast<int>(e - b);
      });
    });
    expect_close(nested_units, 7, 0, "nested call, " + std::to_string(threads) + " threads: every unit");
    expect_close(nested_elsewhere, 0, 0, "nested call, " + std::to_string(threads) + " threads: the caller's thread");
  }
  // A thread's first parallel_for_tls keeps the thread's own count where another thread has set another since
  // (torch.set_num_threads stores one count for the process, which torch's per-thread set-up applies): this
  // library's copy of that set-up, at the thread's first at::parallel_for from it, set the thread's count to the
  // other thread's. Each step size: one unit (OneThread's path) and 64 units (a region).
  for (int64_t units : {int64_t{1}, int64_t{64}}) {
    std::atomic<int> stage{0}, after{-1};
    std::thread first_call([&] {
      (void)at::get_num_threads();  // torch's own set-up on this thread (any torch op would run it)
      at::set_num_threads(2);
      stage = 1;
      while (stage != 2) std::this_thread::yield();
      contrastbound::parallel_for_tls(0, units, 1, [&](int64_t, int64_t) {});
      after = at::get_num_threads();
    });
    while (stage != 1) std::this_thread::yield();
    at::set_num_threads(3);  // another thread's count, set after the first thread's
    stage = 2;
    first_call.join();
    expect_close(after, 2, 0, "a thread's first step (" + std::to_string(units) + " units): its own count after");
  }
  // One thread: nothing to spare, every unit inline.
  at::set_num_threads(1);
  int units = 0;
  contrastbound::parallel_for_tls(0, 3, 1, [&](int64_t b, int64_t e) { units += static_cast<int>(e - b); });
  expect_close(units, 3, 0, "one thread: every unit");
  at::set_num_threads(saved);
}

// negative_indices' range, checked with a read-back (IndexError naming the values) or in the stream (the CUDA glue's
// choice while the stream is captured into a graph: at::_assert_async, which on the CPU raises at once and on CUDA
// is a device assert). Both ways must accept [-1, M) and refuse -2 and M, also through an expanded (stride-0) view.
void check_index_range() {
  const int64_t B = 3, M = 5, d = 4;
  const auto a = at::randn({B, d}, at::kDouble), bank = at::randn({M, d}, at::kDouble);
  struct Case {
    std::vector<int64_t> row;
    bool good;
  };
  const std::vector<Case> cases = {{{0, 4, -1}, true}, {{-1, -1, -1}, true}, {{0, 5, 1}, false},
                                   {{-2, 0, 1}, false}, {{4, 3, 7}, false}};
  for (bool in_stream : {false, true}) {
    for (const auto& c : cases) {
      const auto row = at::tensor(c.row, at::kLong);
      for (bool expanded : {false, true}) {
        // expanded: the row shared by every anchor through a stride-0 dimension (narrowed before aminmax)
        const auto idx = expanded ? row.unsqueeze(0).expand({B, 3}) : row.unsqueeze(0).repeat({B, 1});
        bool threw = false;
        std::string message;
        try {
          contrastbound::check_info_nce_inputs(a, a, bank, idx, false, true, in_stream);
        } catch (const c10::Error& e) {
          threw = true;
          message = e.what_without_backtrace();
        }
        const std::string what = std::string(in_stream ? "in stream" : "read back") + (expanded ? ", expanded" : "") +
                                 ", indices [" + std::to_string(c.row[0]) + ", " + std::to_string(c.row[1]) + ", " +
                                 std::to_string(c.row[2]) + "]";
        if (threw == c.good) {
          std::printf("FAIL index range %s: %s\n", what.c_str(), threw ? message.c_str() : "accepted");
          ++failures;
        } else if (threw && message.find("negative_indices must lie in [0, M)") == std::string::npos) {
          std::printf("FAIL index range %s: message names no argument: %s\n", what.c_str(), message.c_str());
          ++failures;
        }
      }
    }
  }
  // check_index_range = false: no check at all (the autograd backward, whose forward checked the same tensor)
  contrastbound::check_info_nce_inputs(a, a, bank, at::full({B, 2}, M, at::kLong), false, false, true);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string which = argc > 1 ? argv[1] : "all";
  if (which == "primitives" || which == "all") check_primitives();
  if (which == "kernel" || which == "all") check_kernel();
  if (which == "parallel" || which == "all") check_parallel();
  if (which == "checks" || which == "all") check_index_range();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all %s checks passed\n", which.c_str());
  return 0;
}
