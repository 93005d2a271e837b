// C++ test run by ctest where the CUDA headers are found (no GPU needed): the mma.sync tensor-core kernels of
// csrc/cuda/info_nce_tc.cuh compiled for the CPU against emu_cuda.h (one fiber per CUDA thread; ldmatrix,
// mma.sync, cp.async and warp shuffles emulated as the PTX ISA defines them) and compared with float64
// computations of the same quantities from the same rounded inputs.
//
// What it checks: fragment layouts and lane addressing, tile, split and feature-slice bookkeeping (d > 256), the
// bank rows' n . G formed from the scores, padding of d, masks at the edges of K and B, exclude_self, the float16
// coefficient scaling, one and two Y stages (cp.async waits), the grid-stride loops, the scalar (strided) copy
// path, and the finishing of bank rows. Earlier versions of mma_lse_kernel and mma_rows_kernel passed on an H200,
// which also checks the emulation; the feature slices and mma_fwd_kernel (the one-pass forward) have not run on a
// GPU yet. Not checked: speed, races hidden by the fibers' fixed order, register pressure.
//
//   test_mma_emu [quick]
#include "emu_cuda.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
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
}  // namespace
}  // namespace cuda
}  // namespace contrastbound

using namespace contrastbound::cuda;

namespace {

#include "emu_test_common.h"

// Runs forward kernel `kernel` (0: mma_lse_kernel, 1: mma_fwd_kernel, 2: flash_kernel<Forward>) on the partials
// named in `a` (and `pw`, the V partials of the one-pass kernels), with at most `grid_cap` blocks. chunk: the
// features per copied tile of mma_lse_kernel (0: whole rows).
template <typename T>
void launch_forward(int kernel, const TcOperand<T>& X, const TcOperand<T>& Y, const TcLseArgs& a, int stages,
                    unsigned grid_cap, const std::vector<float>& bound, std::vector<float>& pw, int chunk = 0) {
  const float* b = bound.empty() ? nullptr : bound.data();
  if (kernel < 2) {
    const TcSmem m = tc_smem<T>(a.d, /*with_p=*/kernel == 1, stages, /*score_tile=*/false, kernel == 0 ? chunk : 0);
    const unsigned grid = std::min<unsigned>(grid_cap, static_cast<unsigned>(a.xblocks * a.chunks));
    if (kernel == 0) {
      if (chunk > 0) {
        emu::launch(grid, kTcThreads, m.total, [&] { mma_lse_kernel<T, true>(X, Y, a, m); });
      } else {
        emu::launch(grid, kTcThreads, m.total, [&] { mma_lse_kernel<T>(X, Y, a, m); });
      }
    } else {
      emu::launch(grid, kTcThreads, m.total, [&] { mma_fwd_kernel<T>(X, Y, a, pw.data(), b, m); });
    }
    return;
  }
  FlArgs f;
  f.d = a.d;
  f.splits = a.chunks;
  f.tiles_per_split = a.chunk_len / kFlCols;
  f.xblocks = (a.B + kFlRows - 1) / kFlRows;
  f.scale = a.scale;
  f.exclude_self = a.exclude_self;
  f.excluded = a.excluded;
  f.x_inv = a.x_inv;
  f.y_inv = a.y_inv;
  f.coef_bound = b;
  f.partial = pw.data();
  f.part_max = a.part_max;
  f.part_sum = a.part_sum;
  const TcSmem m = fl_smem<T>(a.d, stages);
  const unsigned grid = std::min<unsigned>(grid_cap, static_cast<unsigned>(f.xblocks * f.splits));
  if (m.dpad <= 128) {
    emu::launch(grid, kTcThreads, m.total, [&] { flash_kernel<T, FlashMode::Forward, 16>(X, Y, f, m); });
  } else {
    emu::launch(grid, kTcThreads, m.total, [&] { flash_kernel<T, FlashMode::Forward, 32>(X, Y, f, m); });
  }
}

template <typename T>
void run_lse_and_fwd(const Case& c, std::mt19937_64& rng, double tol) {
  const Mat<T> A = with_zero_row(random_mat<T>(rng, c.B, c.d, c.strided, 1.0), c.zero_a);
  const Mat<T> N = with_zero_row(random_mat<T>(rng, c.K, c.d, c.strided, 1.0), c.zero_n);
  const std::vector<float> ai = inv_norms(A), ni = inv_norms(N);
  const std::vector<double> l = logits(A, N, ai, ni, c);
  const int64_t tiles = (c.K + kTcCols - 1) / kTcCols;
  TcLseArgs a;
  a.d = c.d;
  a.K = c.K;
  a.B = c.B;
  a.chunk_len = (tiles + c.chunks - 1) / c.chunks * kTcCols;
  a.chunks = (c.K + a.chunk_len - 1) / a.chunk_len;
  a.xblocks = (c.B + kTcRows - 1) / kTcRows;
  a.scale = &c.scale;  // device memory in the library; host memory here
  a.exclude_self = c.exclude_self;
  const std::vector<int64_t> ex = excluded_rows(c);
  a.excluded = ex.empty() ? nullptr : ex.data();
  // The kernels take inverse norms divided out of the scale here as in the library: l = s x.y inv_x inv_y.
  a.x_inv = ai.data();
  a.y_inv = ni.data();
  std::vector<float> pmax(a.chunks * c.B, NAN), psum(a.chunks * c.B, NAN), pw(a.chunks * c.B * c.d, NAN);
  a.part_max = pmax.data();
  a.part_sum = psum.data();
  const TcOperand<T> X = A.operand(), Y = N.operand();

  // 0: mma_lse_kernel, 1: mma_fwd_kernel (one pass), 2: flash_kernel<Forward> (one pass, 128-row blocks); the
  // one-pass kernels hold whole rows in registers: d <= kTcMaxD only.
  for (int kernel = 0; kernel < (c.d <= kTcMaxD ? 3 : 1); ++kernel) {
    std::fill(pmax.begin(), pmax.end(), NAN);
    std::fill(psum.begin(), psum.end(), NAN);
    std::fill(pw.begin(), pw.end(), NAN);
    launch_forward<T>(kernel, X, Y, a, c.stages, c.grid, coef_bound<T>(ni, nullptr, 1.f), pw, c.chunk);
    const char* kname = kernel == 0 ? (c.chunk > 0 ? "mma_lse_kernel (chunks)" : "mma_lse_kernel")
                        : kernel == 1 ? "mma_fwd_kernel" : "flash_kernel<Forward>";
    double worst = 0;
    std::vector<double> gw, ww;
    for (int64_t ch = 0; ch < a.chunks; ++ch) {
      const int64_t k0 = ch * a.chunk_len, k1 = std::min(c.K, k0 + a.chunk_len);
      for (int64_t i = 0; i < c.B; ++i) {
        const auto [rm, rs] = lse_range(l, c.K, i, k0, k1);
        const double gm = pmax[ch * c.B + i], gs = psum[ch * c.B + i];
        if (rm == -INFINITY) {  // nothing in this chunk for anchor i (exclude_self with a one-column chunk)
          if (!(gm == -INFINITY && gs == 0)) worst = INFINITY;
          continue;
        }
        const double got = gm + std::log(gs), want = rm + std::log(rs);
        worst = std::max(worst, std::fabs(got - want) / std::max(1.0, std::fabs(want)));
        if (kernel >= 1) {  // V partial relative to the kernel's own max: sum_k e^{l - gm} inv_k n_k
          for (int64_t j = 0; j < c.d; ++j) {
            double v = 0;
            for (int64_t k = k0; k < k1; ++k) v += std::exp(l[i * c.K + k] - gm) * ni[k] * N.f(k, j);
            ww.push_back(v);
            gw.push_back(pw[(ch * c.B + i) * c.d + j]);
          }
        }
      }
    }
    expect(worst <= 1e-4, std::string(kname) + " lse partials, " + c.name() + " (rel err " + std::to_string(worst) + ")");
    if (kernel >= 1) {
      const double e = rel_err(gw, ww);
      expect(e <= tol, std::string(kname) + " V partials, " + c.name() + " (rel err " + std::to_string(e) + ")");
    }
  }
}

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

  // anchor term (X = anchors), bank gradients (X = bank); mma, flash (d <= kTcMaxD: whole rows in registers; the
  // bank pass only: the flash kernels' anchor term comes from their one-pass forward)
  for (int pass = 0; pass < (c.d <= kTcMaxD ? 4 : 2); ++pass) {
    const bool bank = pass % 2 == 1, flash = pass >= 2;
    if (flash && !bank) continue;
    const int64_t xrows_block = flash ? kFlRows : kTcRows;
    const Mat<T>& Xm = bank ? N : A;
    const Mat<T>& Ym = bank ? A : N;
    const int64_t xrows = Xm.rows, yrows = Ym.rows;
    const int64_t ytiles = (yrows + kTcCols - 1) / kTcCols;
    TcRowsArgs r;
    r.d = c.d;
    r.xblocks = (xrows + xrows_block - 1) / xrows_block;
    r.tiles_per_split = (ytiles + c.chunks - 1) / c.chunks;
    r.splits = (ytiles + r.tiles_per_split - 1) / r.tiles_per_split;
    r.slices = flash ? 1 : (c.d + kTcSliceD - 1) / kTcSliceD;
    r.scale = &c.scale;
    r.exclude_self = c.exclude_self;
    r.excluded = ex.empty() ? nullptr : ex.data();  // by X row (anchor term) or by Y row (bank gradients)
    r.lse_on_x = !bank;
    r.x_inv = bank ? ni.data() : ai.data();
    r.x_proj = bank ? proj.data() : nullptr;
    r.y_inv = bank ? ai.data() : ni.data();
    r.lse = lse.data();
    r.g = bank ? gl.data() : nullptr;
    std::vector<float> partial(r.splits * xrows * c.d, NAN), out_v(xrows * c.d, NAN), pproj(r.splits * xrows, NAN);
    std::vector<T> out_grad(xrows * c.d, to_t<T>(NAN));
    r.partial = partial.data();
    if (!flash && bank && r.splits > 1) r.partial_proj = pproj.data();  // mma_rows_kernel: n_hat . G from logits
    r.out_v = out_v.data();
    r.out_grad = out_grad.data();
    const std::vector<float> bound = bank ? coef_bound<T>(ai, &gl, c.scale) : coef_bound<T>(ni, nullptr, 1.f);
    r.coef_bound = bound.empty() ? nullptr : bound.data();
    const unsigned grid = std::min<unsigned>(c.grid, static_cast<unsigned>(r.xblocks * r.splits * r.slices));
    const TcOperand<T> X = Xm.operand(), Y = Ym.operand();
    if (!flash) {
      const TcSmem m = tc_smem<T>(c.d, /*with_p=*/true, c.stages, /*score_tile=*/false, c.chunk);
      if (c.chunk > 0) {
        emu::launch(grid, kTcThreads, m.total, [&] { mma_rows_kernel<T, true>(X, Y, r, m); });
      } else {
        emu::launch(grid, kTcThreads, m.total, [&] { mma_rows_kernel<T>(X, Y, r, m); });
      }
    } else {
      FlArgs f;
      f.d = c.d;
      f.splits = r.splits;
      f.tiles_per_split = r.tiles_per_split;
      f.xblocks = r.xblocks;
      f.scale = r.scale;
      f.exclude_self = r.exclude_self;
      f.excluded = r.excluded;
      f.x_inv = r.x_inv;
      f.x_proj = r.x_proj;
      f.y_inv = r.y_inv;
      f.lse = r.lse;
      f.g = r.g;
      f.coef_bound = r.coef_bound;
      f.partial = r.partial;
      f.out_grad = r.out_grad;
      const TcSmem m = fl_smem<T>(c.d, c.stages);
      auto run = [&](auto mode, auto nt) {
        emu::launch(grid, kTcThreads, m.total,
                    [&] { flash_kernel<T, decltype(mode)::value, decltype(nt)::value>(X, Y, f, m); });
      };
      using BG = std::integral_constant<FlashMode, FlashMode::BankGrads>;
      using N16 = std::integral_constant<int, 16>;
      using N32 = std::integral_constant<int, 32>;
      if (m.dpad <= 128) {
        run(BG(), N16());
      } else {
        run(BG(), N32());
      }
    }
    // G_x = sum_y c(x, y) y_raw: anchor term c = e^{l - lse_x} inv_y; bank c = g_y s e^{l - lse_y} inv_y.
    std::vector<double> got, want, got_proj, want_proj;
    for (int64_t x = 0; x < xrows; ++x) {
      std::vector<double> G(c.d, 0.0);
      for (int64_t y = 0; y < yrows; ++y) {
        const double lv = bank ? l[y * c.K + x] : l[x * c.K + y];
        if (lv == -INFINITY) continue;
        const double coef = bank ? gl[y] * c.scale * std::exp(lv - lse[y]) * ai[y] : std::exp(lv - lse[x]) * ni[y];
        for (int64_t j = 0; j < c.d; ++j) G[j] += coef * Ym.f(y, j);
      }
      if (r.splits > 1) {  // the kernel's partials, summed here in split order
        for (int64_t j = 0; j < c.d; ++j) {
          double s = 0;
          for (int64_t sp = 0; sp < r.splits; ++sp) s += partial[(sp * xrows + x) * c.d + j];
          got.push_back(s);
          want.push_back(G[j]);
        }
        if (r.partial_proj != nullptr) {  // n . G
          double s = 0, nd = 0;
          for (int64_t sp = 0; sp < r.splits; ++sp) s += pproj[sp * xrows + x];
          for (int64_t j = 0; j < c.d; ++j) nd += G[j] * N.f(x, j);
          got_proj.push_back(s);
          want_proj.push_back(nd);
        }
      } else if (!bank) {
        for (int64_t j = 0; j < c.d; ++j) {
          got.push_back(out_v[x * c.d + j]);
          want.push_back(G[j]);
        }
      } else {  // finished row: inv G - (n . G) inv proj n
        double nd = 0;
        for (int64_t j = 0; j < c.d; ++j) nd += G[j] * N.f(x, j);
        for (int64_t j = 0; j < c.d; ++j) {
          got.push_back(from_t<T>(out_grad[x * c.d + j]));
          want.push_back(ni[x] * G[j] - nd * ni[x] * proj[x] * N.f(x, j));
        }
      }
    }
    const double e = rel_err(got, want);
    const std::string what = std::string(flash ? "flash_kernel " : c.chunk > 0 ? "mma_rows_kernel (chunks) " : "mma_rows_kernel ") +
                             (bank ? "bank gradients" : "anchor term") + " (splits " + std::to_string(r.splits) +
                             ", slices " + std::to_string(r.slices) + "), " + c.name();
    expect(e <= tol, what + " (rel err " + std::to_string(e) + ")");
    if (r.partial_proj != nullptr) {  // formed from the scores, with the coefficients rounded as for G
      const double ep = rel_err(got_proj, want_proj);
      expect(ep <= tol, what + ": n . G partials (rel err " + std::to_string(ep) + ")");
    }
  }
}

// A NaN in one bank row must make the lse of every anchor that sums over it NaN, in each forward kernel, wherever
// the row falls in its tile: with fmaxf, a thread whose kept columns of the last, partly filled tile were all NaN
// took the tile as empty and the NaN never reached the sum (a finite loss). Rows: the first, the middle of a full
// tile, and the only row of a one-row tail tile; also exclude_self with two rows (in-batch, B = K = 2).
template <typename T>
void run_nan_forward(std::mt19937_64& rng, int64_t B, int64_t K, int64_t nan_row, bool exclude_self, int64_t chunks) {
  const int64_t d = 16;
  const Mat<T> A = random_mat<T>(rng, B, d, false, 1.0);
  Mat<T> N = random_mat<T>(rng, K, d, false, 1.0);
  N.data[nan_row * N.s0 + 3] = to_t<T>(NAN);
  const std::vector<float> ai = inv_norms(A), ni = inv_norms(N);  // ni[nan_row] is NaN, as the library's
  const float scale = 2.0f;
  TcLseArgs a;
  a.d = d;
  a.K = K;
  a.B = B;
  const int64_t tiles = (K + kTcCols - 1) / kTcCols;
  a.chunk_len = (tiles + chunks - 1) / chunks * kTcCols;
  a.chunks = (K + a.chunk_len - 1) / a.chunk_len;
  a.xblocks = (B + kTcRows - 1) / kTcRows;
  a.scale = &scale;
  a.exclude_self = exclude_self;
  a.x_inv = ai.data();
  a.y_inv = ni.data();
  std::vector<float> pmax(a.chunks * B), psum(a.chunks * B), pw(a.chunks * B * d);
  a.part_max = pmax.data();
  a.part_sum = psum.data();
  const TcOperand<T> X = A.operand(), Y = N.operand();
  const std::vector<float> bound = coef_bound<T>(ni, nullptr, 1.f);
  for (int kernel = 0; kernel < 3; ++kernel) {
    std::fill(pmax.begin(), pmax.end(), 0.f);
    std::fill(psum.begin(), psum.end(), 1.f);
    launch_forward<T>(kernel, X, Y, a, /*stages=*/1, /*grid_cap=*/~0u, bound, pw);
    // The chunks merged as forward_merge_kernel does (online_lse.h merge).
    int64_t finite = 0;
    for (int64_t i = 0; i < B; ++i) {
      if (exclude_self && i == nan_row) continue;  // that anchor does not sum over the NaN row
      contrastbound::LseState<double> st;
      for (int64_t ch = 0; ch < a.chunks; ++ch) {
        contrastbound::LseState<double> part{pmax[ch * B + i], psum[ch * B + i]};
        double fa, fb;
        contrastbound::merge(st, part, fa, fb);
      }
      if (!std::isnan(contrastbound::finalize(st))) ++finite;
    }
    const char* kname = kernel == 0 ? "mma_lse_kernel" : kernel == 1 ? "mma_fwd_kernel" : "flash_kernel<Forward>";
    expect(finite == 0, std::string(kname) + " NaN bank row " + std::to_string(nan_row) + " of K=" +
                            std::to_string(K) + (exclude_self ? " (exclude_self)" : "") + ": " +
                            std::to_string(finite) + " anchors with a finite lse");
  }
}

template <typename T>
void run_all(bool quick, double tol, const char* tname) {
  std::mt19937_64 rng(12345);
  std::vector<Case> cases = {
      // B, K, d, excl, strided, stages, chunks, grid, scale
      {70, 200, 64, false, false, 1, 2, 1000, 5.0f},    // edges of B and K, two chunks / splits
      {37, 130, 19, false, true, 1, 1, 1000, 2.0f},     // d = 19: scalar copies, zero padding to 32
      {130, 130, 40, true, false, 2, 3, 2, 4.0f},       // exclude_self, two stages, grid-stride (2 blocks)
      {1, 1, 1, false, false, 1, 1, 1000, 1.0f},        // one anchor, one row, d = 1
      {65, 65, 8, true, false, 1, 2, 1000, 3.0f},       // exclude_self: chunk 2 is column 64 only, empty for row 64
      {64, 64, 16, false, false, 2, 1, 1000, 10.0f},    // exactly one tile, direct finishing
      {20, 300, 256, false, false, 1, 5, 3, 14.0f},     // d = 256 (one slice), many chunks, grid-stride
      // d > 256: the rows passes in slices of 256 features (the last one 44 and 8 wide), one and several splits;
      // the one-pass and flash-layout kernels do not take these widths.
      {40, 150, 300, false, false, 1, 1, 1000, 5.0f},
      {70, 130, 520, true, true, 2, 2, 3, 1.0f / 0.07f, 5, 100},
      {66, 100, 776, false, false, 2, 2, 1000, 4.0f},  // d % 8 = 0, contiguous: 16-byte copies (cp.async), 2 stages
      // The same widths, and d = 1100 (five chunks, the last 76 wide), with tiles of 256 features copied in turn
      // (chunk mode: rows too wide for whole tiles in shared memory).
      {40, 150, 300, false, false, 1, 1, 1000, 5.0f, -1, -1, 256},
      {70, 130, 520, true, true, 1, 2, 3, 1.0f / 0.07f, 5, 100, 256},
      {33, 100, 1100, false, false, 1, 3, 1000, 3.0f, -1, -1, 256},
      {66, 100, 776, false, false, 1, 2, 1000, 4.0f, -1, -1, 256},
      // A zero anchor row and a zero bank row (a zero-initialised queue, padding): their inverse norm 1e12 must
      // not set the float16 coefficient scale (every other coefficient would round to 0). Two or more splits, so
      // the zero bank row's own gradient (1e12 G, past float16's range, as in torch) is compared unfinished.
      {70, 200, 64, false, false, 1, 2, 1000, 1.0f / 0.07f, 5, 130},
      {130, 130, 40, true, false, 2, 3, 2, 4.0f, 7, 100},
      // An excluded array (bank_cross_entropy): per anchor row in the forward and anchor-term passes, per column
      // of the anchor tile in the bank gradients; B > K so rows repeat, two X blocks of bank rows, a wide case.
      {150, 100, 40, false, false, 2, 3, 2, 4.0f, -1, -1, 0, true},
      {70, 200, 64, false, true, 1, 2, 1000, 5.0f, -1, -1, 0, true},
      {70, 130, 520, false, false, 1, 2, 3, 3.0f, -1, -1, 256, true},
  };
  if (!quick) cases.push_back({150, 700, 128, true, false, 2, 2, 1000, 1.0f / 0.07f});
  for (const Case& c : cases) {
    run_lse_and_fwd<T>(c, rng, tol);
    run_rows<T>(c, rng, tol);
  }
  run_nan_forward<T>(rng, 4, 65, 64, false, 1);   // the only row of the tail tile
  run_nan_forward<T>(rng, 4, 65, 0, false, 1);    // the first row
  run_nan_forward<T>(rng, 70, 200, 130, false, 2);  // second chunk, middle of a tile
  run_nan_forward<T>(rng, 2, 2, 1, true, 1);       // in-batch, B = K = 2

  std::printf("%s: %zu cases run\n", tname, cases.size());
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  // Coefficients of the second product are rounded to the input type: bf16 ~ 2^-9 relative each, fp16 ~ 2^-12.
  run_all<__nv_bfloat16>(quick, 1.5e-2, "bfloat16");
  run_all<__half>(quick, 4e-3, "float16");
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
