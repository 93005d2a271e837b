// C++ test (no GPU needed) of the experimental sm_90a warpgroup-MMA kernels of csrc/cuda/info_nce_wgmma.cuh,
// compiled for the CPU against emu_cuda.h + emu_wgmma.h (one fiber per CUDA thread; wgmma descriptors, canonical
// shared-memory layouts, register fragments, commit / wait groups and the async-proxy fence emulated from the PTX
// ISA text) and compared with float64 computations of the same quantities from the same rounded inputs, in the
// cases of test_mma_emu.cpp's flash checks; each result is also compared with flash_kernel's (same arguments, same
// output structure). Then the mutation checks: the kernel run with deliberate bugs (WgMutation), each in a child
// process, must fail a check or an emulation assertion, which shows the emulation can catch them.
//
//   g++ -std=c++17 -O2 -fno-strict-aliasing -Wall -Wno-unknown-pragmas -Icsrc -I/usr/local/cuda/include
//       csrc/tests/test_wgmma_emu.cpp -o /tmp/wgemu && /tmp/wgemu [quick | values | mutations | mutation=K]
#include "emu_cuda.h"
#include "emu_child.h"
#include "emu_wgmma.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "core/online_lse.h"

namespace contrastbound {
namespace cuda {
namespace {
#include "cuda/device_common.cuh"
#include "cuda/info_nce_tc.cuh"
#include "cuda/info_nce_flash.cuh"
#include "cuda/info_nce_wgmma.cuh"
}  // namespace
}  // namespace cuda
}  // namespace contrastbound

using namespace contrastbound::cuda;

namespace {

#include "emu_test_common.h"

// ---- the wgmma kernels ----

template <typename T, FlashMode MODE>
void launch_both(bool wgmma, const TcOperand<T>& X, const TcOperand<T>& Y, const FlArgs& f, int stages, unsigned grid) {
  if (wgmma || MODE == FlashMode::Lse) {  // (Lse: wgmma_kernel only)
    const TcSmem m = wg_smem<T>(f.d);  // always three Y buffers (`stages` is flash_kernel's)
    wg_with_nt(m.dpad, [&](auto nt) {
      emu::wg::launch(grid, kTcThreads, m.total, [&] { wgmma_kernel<T, MODE, decltype(nt)::value>(X, Y, f, m); });
      return 0;
    });
  } else if constexpr (MODE != FlashMode::Lse) {
    const TcSmem m = fl_smem<T>(f.d, stages);
    if (m.dpad <= 128) {
      emu::launch(grid, kTcThreads, m.total, [&] { flash_kernel<T, MODE, 16>(X, Y, f, m); });
    } else {
      emu::launch(grid, kTcThreads, m.total, [&] { flash_kernel<T, MODE, 32>(X, Y, f, m); });
    }
  }
}

double rel_diff(const std::vector<double>& a, const std::vector<double>& b) { return rel_err(a, b); }

// Bank gradients (X = bank): float64 reference, and flash_kernel's result. (The flash / wgmma kernels have no
// anchor-term pass: their one-pass forward forms the anchors' term, checked by run_forward.)
template <typename T>
void run_rows(const Case& c, std::mt19937_64& rng, double tol) {
  const Mat<T> A = with_zero_row(random_mat<T>(rng, c.B, c.d, c.strided, 1.0), c.zero_a);
  const Mat<T> N = with_zero_row(random_mat<T>(rng, c.K, c.d, c.strided, 1.0), c.zero_n);
  const std::vector<float> ai = inv_norms(A), ni = inv_norms(N);
  const std::vector<double> l = logits(A, N, ai, ni, c);
  std::vector<float> lse(c.B), gl(c.B), proj(c.K);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (int64_t i = 0; i < c.B; ++i) {
    const auto [m, s] = lse_range(l, c.K, i, 0, c.K);
    lse[i] = static_cast<float>(m + std::log(s));
    gl[i] = static_cast<float>(u(rng));
  }
  for (int64_t k = 0; k < c.K; ++k) proj[k] = ni[k] * ni[k];
  const std::vector<int64_t> ex = excluded_rows(c);
  {  // X = bank rows, Y = anchors
    const Mat<T>& Xm = N;
    const Mat<T>& Ym = A;
    const int64_t xrows = Xm.rows, yrows = Ym.rows;
    const int64_t ytiles = (yrows + kFlCols - 1) / kFlCols;
    FlArgs f;
    f.d = c.d;
    f.xblocks = (xrows + kFlRows - 1) / kFlRows;
    f.tiles_per_split = (ytiles + c.chunks - 1) / c.chunks;
    f.splits = (ytiles + f.tiles_per_split - 1) / f.tiles_per_split;
    f.scale = &c.scale;
    f.exclude_self = c.exclude_self;
    f.excluded = ex.empty() ? nullptr : ex.data();  // by Y row (the anchors)
    f.x_inv = ni.data();
    f.x_proj = proj.data();
    f.y_inv = ai.data();
    f.lse = lse.data();
    f.g = gl.data();
    const std::vector<float> bound = coef_bound<T>(ai, &gl, c.scale);
    f.coef_bound = bound.empty() ? nullptr : bound.data();
    const unsigned grid = std::min<unsigned>(c.grid, static_cast<unsigned>(f.xblocks * f.splits));
    const TcOperand<T> X = Xm.operand(), Y = Ym.operand();
    std::vector<double> outs[2];  // 0: wgmma_kernel, 1: flash_kernel
    for (int k = 0; k < 2; ++k) {
      std::vector<float> partial(f.splits * xrows * c.d, NAN);
      std::vector<T> out_grad(xrows * c.d, to_t<T>(NAN));
      f.partial = partial.data();
      f.out_grad = out_grad.data();
      launch_both<T, FlashMode::BankGrads>(k == 0, X, Y, f, c.stages, grid);
      for (int64_t x = 0; x < xrows; ++x)
        for (int64_t j = 0; j < c.d; ++j) {
          if (f.splits > 1) {
            double s = 0;
            for (int64_t sp = 0; sp < f.splits; ++sp) s += partial[(sp * xrows + x) * c.d + j];
            outs[k].push_back(s);
          } else {
            outs[k].push_back(from_t<T>(out_grad[x * c.d + j]));
          }
        }
    }
    std::vector<double> want;
    for (int64_t x = 0; x < xrows; ++x) {
      std::vector<double> G(c.d, 0.0);
      for (int64_t y = 0; y < yrows; ++y) {
        const double lv = l[y * c.K + x];
        if (lv == -INFINITY) continue;
        const double coef = gl[y] * c.scale * std::exp(lv - lse[y]) * ai[y];
        for (int64_t j = 0; j < c.d; ++j) G[j] += coef * Ym.f(y, j);
      }
      if (f.splits > 1) {
        for (int64_t j = 0; j < c.d; ++j) want.push_back(G[j]);
      } else {
        double nd = 0;
        for (int64_t j = 0; j < c.d; ++j) nd += G[j] * N.f(x, j);
        for (int64_t j = 0; j < c.d; ++j) want.push_back(ni[x] * G[j] - nd * ni[x] * proj[x] * N.f(x, j));
      }
    }
    const double e = rel_err(outs[0], want), ef = rel_diff(outs[0], outs[1]);
    const std::string what = std::string("bank gradients") + " (splits " +
                             std::to_string(f.splits) + "), " + c.name();
    expect(e <= tol, "wgmma_kernel " + what + " vs float64 (rel err " + std::to_string(e) + ")");
    expect(ef <= tol, "wgmma_kernel " + what + " vs flash_kernel (rel diff " + std::to_string(ef) + ")");
  }
}

// Forward: the chunk partials (max, sum, V relative to the kernel's max) against float64 and flash_kernel.
template <typename T>
void run_forward(const Case& c, std::mt19937_64& rng, double tol) {
  const Mat<T> A = with_zero_row(random_mat<T>(rng, c.B, c.d, c.strided, 1.0), c.zero_a);
  const Mat<T> N = with_zero_row(random_mat<T>(rng, c.K, c.d, c.strided, 1.0), c.zero_n);
  const std::vector<float> ai = inv_norms(A), ni = inv_norms(N);
  const std::vector<double> l = logits(A, N, ai, ni, c);
  const int64_t tiles = (c.K + kFlCols - 1) / kFlCols;
  FlArgs f;
  f.d = c.d;
  f.tiles_per_split = (tiles + c.chunks - 1) / c.chunks;
  f.splits = (tiles + f.tiles_per_split - 1) / f.tiles_per_split;
  f.xblocks = (c.B + kFlRows - 1) / kFlRows;
  f.scale = &c.scale;
  f.exclude_self = c.exclude_self;
  const std::vector<int64_t> ex = excluded_rows(c);
  f.excluded = ex.empty() ? nullptr : ex.data();
  f.x_inv = ai.data();
  f.y_inv = ni.data();
  const std::vector<float> bound = coef_bound<T>(ni, nullptr, 1.f);
  f.coef_bound = bound.empty() ? nullptr : bound.data();
  const unsigned grid = std::min<unsigned>(c.grid, static_cast<unsigned>(f.xblocks * f.splits));
  const TcOperand<T> X = A.operand(), Y = N.operand();
  const int64_t chunk_len = f.tiles_per_split * kFlCols;
  std::vector<double> lse_got[2], v_got[2], v_want;
  std::vector<float> wg_max, wg_sum;  // wgmma_kernel<Forward>'s (max, sum) partials
  double worst = 0;
  for (int k = 0; k < 2; ++k) {
    std::vector<float> pmax(f.splits * c.B, NAN), psum(f.splits * c.B, NAN), pw(f.splits * c.B * c.d, NAN);
    f.part_max = pmax.data();
    f.part_sum = psum.data();
    f.partial = pw.data();
    launch_both<T, FlashMode::Forward>(k == 0, X, Y, f, c.stages, grid);
    if (k == 0) wg_max = pmax, wg_sum = psum;
    for (int64_t ch = 0; ch < f.splits; ++ch) {
      const int64_t k0 = ch * chunk_len, k1 = std::min(c.K, k0 + chunk_len);
      for (int64_t i = 0; i < c.B; ++i) {
        const auto [rm, rs] = lse_range(l, c.K, i, k0, k1);
        const double gm = pmax[ch * c.B + i], gs = psum[ch * c.B + i];
        if (rm == -INFINITY) {
          if (k == 0 && !(gm == -INFINITY && gs == 0)) worst = INFINITY;
          continue;
        }
        const double got = gm + std::log(gs), want = rm + std::log(rs);
        lse_got[k].push_back(got);
        if (k == 0) worst = std::max(worst, std::fabs(got - want) / std::max(1.0, std::fabs(want)));
        for (int64_t j = 0; j < c.d; ++j) {
          v_got[k].push_back(pw[(ch * c.B + i) * c.d + j]);
          if (k == 0) {
            double v = 0;
            for (int64_t kk = k0; kk < k1; ++kk) v += std::exp(l[i * c.K + kk] - gm) * ni[kk] * N.f(kk, j);
            v_want.push_back(v);
          }
        }
      }
    }
  }
  expect(worst <= 1e-4, "wgmma_kernel<Forward> lse partials, " + c.name() + " (rel err " + std::to_string(worst) + ")");
  // Lse (no output product): the (max, sum) partials of the Forward instance, bit for bit (the same coefficient
  // code over the same scores), and no V partial written.
  {
    std::vector<float> pmax(f.splits * c.B, NAN), psum(f.splits * c.B, NAN), pw(f.splits * c.B * c.d, NAN);
    f.part_max = pmax.data();
    f.part_sum = psum.data();
    f.partial = pw.data();
    launch_both<T, FlashMode::Lse>(true, X, Y, f, c.stages, grid);
    int64_t differ = 0, written = 0;
    for (size_t i = 0; i < pmax.size(); ++i) {
      // (NaN where a partial's rows are past X in both, and the same bits elsewhere)
      differ += std::memcmp(&pmax[i], &wg_max[i], sizeof(float)) != 0 ||
                std::memcmp(&psum[i], &wg_sum[i], sizeof(float)) != 0;
    }
    for (float v : pw) written += !std::isnan(v);
    expect(differ == 0, "wgmma_kernel<Lse> (max, sum) partials are wgmma_kernel<Forward>'s, " + c.name() + ": " +
                            std::to_string(differ) + " of " + std::to_string(pmax.size()) + " differ");
    expect(written == 0, "wgmma_kernel<Lse> writes no V partial, " + c.name() + ": " + std::to_string(written));
  }
  const double e = rel_err(v_got[0], v_want), ef = rel_diff(v_got[0], v_got[1]);
  expect(e <= tol, "wgmma_kernel<Forward> V partials, " + c.name() + " vs float64 (rel err " + std::to_string(e) + ")");
  expect(ef <= tol, "wgmma_kernel<Forward> V partials, " + c.name() + " vs flash_kernel (rel diff " + std::to_string(ef) + ")");
}

std::vector<Case> value_cases(bool quick) {
  std::vector<Case> cases = {
      // B, K, d, excl, strided, stages, chunks (splits), grid, scale
      {70, 200, 64, false, false, 1, 2, 1000, 5.0f},     // edges of B and K (one warpgroup idle), two splits
      {37, 130, 19, false, true, 1, 1, 1000, 2.0f},      // d = 19: scalar copies, zero padding to dpad 64
      {130, 130, 40, true, false, 2, 3, 2, 4.0f},        // exclude_self, two stages, grid-stride; d 40 in dpad 64
      {1, 1, 1, false, false, 1, 1, 1000, 1.0f},         // one anchor, one row, d = 1
      {65, 65, 8, true, false, 1, 2, 1000, 3.0f},        // exclude_self, split 2 is one column
      {64, 64, 16, false, false, 2, 1, 1000, 10.0f},     // exactly one tile, direct finishing
      {200, 150, 80, false, false, 2, 1, 1000, 6.0f},    // two X blocks, d 80 in dpad 128 (O: m64n128k16)
      {20, 300, 256, false, false, 1, 5, 3, 14.0f},      // d = 256 (O: m64n256k16), many splits, grid-stride
      {90, 150, 136, false, false, 1, 2, 1000, 7.0f},    // d 136 in dpad 192 (NT = 24, O: m64n192k16)
      {70, 200, 64, false, false, 1, 2, 1000, 1.0f / 0.07f, 5, 130},  // zero rows: see test_mma_emu.cpp
      {130, 130, 40, true, false, 2, 3, 2, 4.0f, 7, 100},
      {150, 100, 40, false, false, 2, 3, 2, 4.0f, -1, -1, 0, true},  // an excluded array (bank_cross_entropy)
      {200, 150, 80, false, true, 1, 1, 1000, 6.0f, -1, -1, 0, true},
  };
  if (!quick) {
    cases.push_back({150, 700, 128, true, false, 2, 2, 1000, 1.0f / 0.07f});
    cases.push_back({140, 260, 200, false, true, 2, 1, 1000, 8.0f});  // d 200 in dpad 256, strided
  }
  return cases;
}

// No anchors (B = 0) and K > 0, as plan_tc_rows plans the bank pass then (one split, no Y tiles): every bank
// gradient is exactly 0. The epilogue reads the bank rows from the X tile, which no Y-tile barrier has published
// here (without the barrier before it, the reads saw the unwritten tile: NaN gradients).
template <typename T>
void run_empty_y(int64_t K, int64_t d, int stages) {
  std::mt19937_64 rng(7);
  const Mat<T> N = random_mat<T>(rng, K, d, false, 1.0);
  const Mat<T> A = random_mat<T>(rng, 1, d, false, 1.0);
  std::vector<float> ni = inv_norms(N), proj(K), one(1, 1.f);
  for (int64_t k = 0; k < K; ++k) proj[k] = ni[k] * ni[k];
  const float scale = 2.f;
  FlArgs f;
  f.d = d;
  f.xblocks = (K + kFlRows - 1) / kFlRows;
  f.splits = 1;
  f.tiles_per_split = 0;
  f.scale = &scale;
  f.x_inv = ni.data();
  f.x_proj = proj.data();
  f.y_inv = f.lse = f.g = one.data();
  TcOperand<T> X = N.operand(), Y = A.operand();
  Y.rows = 0;
  for (int k = 0; k < 2; ++k) {
    std::vector<T> out_grad(K * d, to_t<T>(NAN));
    f.out_grad = out_grad.data();
    launch_both<T, FlashMode::BankGrads>(k == 0, X, Y, f, stages, static_cast<unsigned>(f.xblocks));
    int64_t bad = 0;
    for (const T& v : out_grad) bad += from_t<T>(v) == 0.0 ? 0 : 1;
    expect(bad == 0, std::string(k == 0 ? "wgmma_kernel" : "flash_kernel") + " bank gradients with B = 0, K = " +
                         std::to_string(K) + ", d = " + std::to_string(d) + ", stages " + std::to_string(stages) +
                         ": " + std::to_string(bad) + " of " + std::to_string(K * d) + " not 0");
  }
}

template <typename T>
void run_values(bool quick, double tol, const char* tname) {
  std::mt19937_64 rng(2024);
  const std::vector<Case> cases = value_cases(quick);
  for (const Case& c : cases) {
    run_rows<T>(c, rng, tol);
    run_forward<T>(c, rng, tol);
  }
  run_empty_y<T>(200, 40, 1);
  run_empty_y<T>(200, 64, 2);
  std::printf("%s: %zu cases run\n", tname, cases.size());
}

const char* mutation_name(int k) {
  static const char* names[] = {"none", "LBO/SBO swapped in the X descriptor", "LBO/SBO swapped in the K-major Y descriptor",
                                "LBO/SBO swapped in the N-major Y descriptor", "no imm-trans-b in the second product",
                                "A fragment registers 1 and 2 swapped", "no wait_group before reading the scores",
                                "no wait_group after the second product", "no fence.proxy.async after the copies",
                                "no wgmma.fence before the score product", "both warpgroups on X rows 0-63",
                                "next coefficients written into the A registers in flight",
                                "output rows rescaled before their product completed",
                                "next Y tile copied before the barrier that frees its buffer",
                                "one slot of column arrays", "output rows written after the wgmma.fence",
                                "Lse: two column slots"};
  return names[k];
}

// The value checks of a small set of cases with mutation k: two X blocks (both warpgroups busy), several tiles per
// split, the scalar copy path, both types, both modes, output products of N = 64, 128 and 256 (d 40, 80, 200).
// (flash_kernel, the reference of each check, runs one and two stages.)
void run_mutation_cases(int k) {
  wg_mutation = k;
  std::mt19937_64 rng(7);
  run_rows<__nv_bfloat16>({130, 200, 40, false, false, 1, 1, 1000, 4.0f}, rng, 1.5e-2);
  run_forward<__half>({130, 200, 40, true, false, 2, 1, 1000, 4.0f}, rng, 4e-3);
  run_rows<__half>({70, 150, 80, false, true, 2, 1, 1000, 4.0f}, rng, 4e-3);
  run_forward<__nv_bfloat16>({70, 200, 200, false, false, 1, 1, 1000, 4.0f}, rng, 1.5e-2);
  wg_mutation = kWgMutNone;
}

// Runs run_mutation_cases(k) in a child process; true if the child failed (a
// check or an emulation assertion). `why`: the first line that says why.
bool mutation_caught(int k, std::string& why) {
  std::string out;
  const int rc = emu_child::run(
      [k] {
        run_mutation_cases(k);
        return failures == 0 ? 0 : 1;
      },
      out);
  size_t p = out.find("emu:");
  if (p == std::string::npos) p = out.find("FAIL");
  why = p == std::string::npos ? std::string("(no message)") : out.substr(p, out.find('\n', p) - p);
  return rc != 0;
}

void run_mutations() {
  std::string why;
  expect(!mutation_caught(kWgMutNone, why), std::string("unmutated kernel in the mutation harness: ") + why);
  for (int k = 1; k < kWgMutCount; ++k) {
    const bool caught = mutation_caught(k, why);
    std::printf("mutation %-45s %s: %s\n", mutation_name(k), caught ? "caught" : "NOT CAUGHT", why.c_str());
    expect(caught, std::string("mutation not caught: ") + mutation_name(k));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  const bool quick = mode == "quick";
  if (mode.empty() || mode == "quick" || mode == "values") {
    run_values<__nv_bfloat16>(quick, 1.5e-2, "bfloat16");
    run_values<__half>(quick, 4e-3, "float16");
#ifdef CONTRASTBOUND_WG_TIMING
    // WgTiming (the diagnostic build): the launches above added their warpgroups' units, tiles and phase cycles.
    namespace cc = contrastbound::cuda;
    unsigned long long phases = 0;
    for (int f = 2; f < cc::kWgTimingFields; ++f) phases += cc::wg_timing_total[f];
    std::printf("WgTiming: %u warpgroups, %llu units, %llu tiles, %llu cycles (max %u, min %u per warpgroup)\n",
                cc::wg_timing_groups, cc::wg_timing_total[0], cc::wg_timing_total[1], phases, cc::wg_timing_max,
                cc::wg_timing_min);
    expect(cc::wg_timing_groups > 0 && cc::wg_timing_total[0] > 0 && cc::wg_timing_total[1] > 0 && phases > 0 &&
               cc::wg_timing_max >= cc::wg_timing_min,
           "WgTiming's totals after the launches");
#endif
  }
  if (mode.rfind("mutation=", 0) == 0) {  // one mutation in this process (to debug what catches it)
    run_mutation_cases(std::atoi(mode.c_str() + 9));
  } else if (mode != "values") {
    run_mutations();
  }
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
