// Tensor-core kernels with register-resident coefficients ("flash" layout), float16 / bfloat16, sm_80+. Included by
// info_nce_cuda_impl.cuh after info_nce_tc.cuh, inside its anonymous namespace; torch-free.
//
// The mma.sync kernels of info_nce_tc.cuh arrange the warps differently for the two products (4 x 2 over the
// 64 x 64 score tile, 2 x 4 over the 64 x d output), so the coefficients go through shared memory with two
// barriers per tile. Here, as in flash attention, a warp owns 16 X rows for both products: the score tile's
// float32 accumulators (16 x 64 per warp) become, after the coefficient and a cast, the A operand of the second
// product in registers (the m16n8k16 C layout of two n8 tiles is the A layout of one k16 slice), the output
// rows (16 x d, float32) stay in registers, and row reductions are quad shuffles. A block is 8 warps = 128 X rows,
// so each Y tile copied into shared memory serves twice as many rows; one barrier pair per tile guards the Y
// buffer. Modes:
//   BankGrads   X = bank,    Y = anchors: c = g_y s e^{l - lse_y} inv_y           O_x = dL/dn_hat_x, finished
//   Forward     X = anchors, Y = one K chunk: the running (max, sum) and V of the chunk in one walk (online
//               rescaling by e^{m_old - m_new}), written as the partials forward_merge_kernel merges.
//   Lse         the same walk without the second product: the (max, sum) partials only, for a forward that
//               needs no anchors' term (wgmma_kernel only: flash_kernel has no such instance).
// (No anchor-term pass: where these kernels serve, the forward is the one-pass Forward, which forms V.)
// Splits of Y (rows passes) write float32 partials that tc_finish_kernel sums in split order, as for
// mma_rows_kernel. NT: n8 tiles of the widest output row held (16: d <= 128, 32: d <= 256).
//
// STATUS: passes the CPU emulation (csrc/tests/test_mma_emu.cpp). On an H200 (2026-12-04) it agreed with the
// default kernels in bench_gpu.py's check and ran 1.39x faster than the mma.sync kernels, but slower than its wgmma
// version (the default there); its tests have not run on a GPU, so it stays opt-in (CONTRASTBOUND_TC_FLASH=1).
#pragma once

constexpr int kFlRows = 128;  // X rows per block: 8 warps x 16
constexpr int kFlCols = 64;   // Y rows per tile

enum class FlashMode { BankGrads, Forward, Lse };

struct FlArgs {
  int64_t d = 0;
  int64_t splits = 1, tiles_per_split = 0, xblocks = 0;  // Forward, Lse: splits = K chunks
  const float* scale = nullptr;  // s, in device memory (read_scale)
  bool exclude_self = false;
  const int64_t* excluded = nullptr;  // (B,) or nullptr: by X row (Forward, Lse) or by Y row (BankGrads)
  const float* x_inv = nullptr;   // (X rows,)
  const float* x_proj = nullptr;  // BankGrads: Jacobian factor of the bank rows
  const float* y_inv = nullptr;   // (Y rows,)
  const float* lse = nullptr;     // BankGrads: by Y row
  const float* g = nullptr;       // BankGrads: (Y rows,)
  const float* coef_bound = nullptr;  // float16: see TcRowsArgs::coef_bound
  float* partial = nullptr;       // (splits, X rows, d): rows passes with splits > 1; Forward: V partials
  void* out_grad = nullptr;       // BankGrads, one split: (X rows, d) in the input type
  float* part_max = nullptr;      // Forward, Lse: (chunks, X rows)
  float* part_sum = nullptr;
  // negative_mask (Problem::keep) as bits by (X row, Y row): keep_bits[x keep_words + y / 32] bit y % 32 set where
  // Y row y is kept for X row x (fl_keep_bits_kernel packs them from the mask before the launch, in this launch's
  // frame: Forward (anchor, bank row), BankGrads (bank row, anchor)); keep_words = fl_keep_words(Y rows). nullptr:
  // no mask.
  const uint32_t* keep_bits = nullptr;
  int64_t keep_words = 0;
  // labels: X row x and Y row y share a class where x_labels[x] == y_labels[y] (Forward: labels, bank_labels;
  // BankGrads: bank_labels, labels); such a pair is left out. nullptr: no labels.
  const int64_t* x_labels = nullptr;
  const int64_t* y_labels = nullptr;
};

// The words of a row of FlArgs::keep_bits over n Y rows: whole 64-row tiles (two words each).
__host__ __device__ __forceinline__ int64_t fl_keep_words(int64_t n) { return 2 * ((n + kFlCols - 1) / kFlCols); }

// One Y tile's column values, for this thread's column (threads 0 .. kFlCols - 1; the others keep the defaults):
// the inverse norm; the factor that turns the column's exponential into its coefficient (fl_coefficients):
// tc_coef_inv(inv) for Forward, g s tc_coef_inv(inv) for BankGrads, formed here once per column rather than per
// score; for BankGrads the anchor's lse and the excluded offset (tc_col_excluded); the column's label (y_labels).
// And, from every thread (kTcThreads = 2 kFlRows), one word of the tile's mask bits: word threadIdx.x % 2 of X row
// x0 + threadIdx.x / 2 (all ones without a mask). The kernels load them a tile ahead, into registers, and store
// them into the tile's slot of the column arrays (fl_store_cols) at the next barrier, so that the global loads'
// latency is hidden by a tile's work instead of holding every warp at that barrier.
struct FlColVals {
  float inv = 0.f, lse = 0.f, coef = 0.f;
  int ex = -1;
  long long lab = 0;
  uint32_t mw = ~0u;
};

// A slot of the column arrays, in 4-byte words: inv, lse, coef (float), ex (int), kFlCols each; the labels
// (int64, 2 kFlCols words); the mask words, two per X row (2 kFlRows = 4 kFlCols words).
constexpr int kFlSlotWords = 10 * kFlCols;
constexpr int kFlLabOffset = 4 * kFlCols;
constexpr int kFlMaskOffset = 6 * kFlCols;
static_assert(2 * kFlRows == 4 * kFlCols && kTcThreads == 2 * kFlRows, "one mask word per thread and tile");

template <FlashMode MODE, typename T>
__device__ __forceinline__ FlColVals fl_load_cols(const FlArgs& a, const TcOperand<T>& Y, int64_t tile, int64_t x0,
                                                  int64_t x_rows, float cscale) {
  FlColVals v;
  if (threadIdx.x < kFlCols) {
    const int64_t y = tile * kFlCols + threadIdx.x;
    const bool ok = y < Y.rows;
    v.inv = ok ? a.y_inv[y] : 0.f;
    v.lse = (ok && MODE == FlashMode::BankGrads) ? a.lse[y] * kLog2e : 0.f;  // in base 2 (fl_coefficients)
    const float w = MODE == FlashMode::BankGrads ? (ok ? a.g[y] * read_scale(a.scale) : 0.f) : 1.f;
    v.coef = w * tc_coef_inv<T>(v.inv, cscale);
    v.ex = MODE == FlashMode::BankGrads ? tc_col_excluded(a.excluded, y, Y.rows, x0, kFlRows) : -1;
    if (a.y_labels != nullptr) v.lab = ok ? a.y_labels[y] : 0;
  }
  if (a.keep_bits != nullptr) {
    const int64_t x = x0 + threadIdx.x / 2;
    v.mw = x < x_rows ? a.keep_bits[x * a.keep_words + 2 * tile + (threadIdx.x & 1)] : 0u;
  }
  return v;
}

__device__ __forceinline__ void fl_store_cols(float* cols, const FlColVals& v) {
  if (threadIdx.x < kFlCols) {
    cols[threadIdx.x] = v.inv;
    cols[kFlCols + threadIdx.x] = v.lse;
    cols[2 * kFlCols + threadIdx.x] = v.coef;
    reinterpret_cast<int*>(cols + 3 * kFlCols)[threadIdx.x] = v.ex;
    reinterpret_cast<long long*>(cols + kFlLabOffset)[threadIdx.x] = v.lab;
  }
  reinterpret_cast<uint32_t*>(cols + kFlMaskOffset)[threadIdx.x] = v.mw;
}

// The X rows' labels (kFlRows int64 after the column slots), for fl_coefficients; read after the next barrier.
__device__ __forceinline__ void fl_store_xlab(long long* xlab, const FlArgs& a, int64_t x0, int64_t x_rows) {
  if (a.x_labels != nullptr && threadIdx.x < kFlRows) {
    const int64_t x = x0 + threadIdx.x;
    xlab[threadIdx.x] = x < x_rows ? a.x_labels[x] : 0;
  }
}

// Shared memory: the X tile (128 rows), one or two Y tiles, one slot of the column arrays and the X rows' labels
// (no output staging: the epilogue writes from registers). A TcSmem so that tc_next_y serves it.
template <typename T>
TcSmem fl_smem(int64_t d, int stages) {
  TcSmem m;
  size_t o = tc_operand_tiles<T>(m, d, stages, kFlRows, kFlCols, TcTraits<T>::PAD);
  m.s = m.p = m.cols = o;
  o = tc_align(o + sizeof(float) * kFlSlotWords + sizeof(long long) * kFlRows);  // one slot, the X rows' labels
  m.total = o;
  return m;
}

__device__ __forceinline__ float fl_quad_sum(float v) {
  v += __shfl_xor_sync(kFullMask, v, 1);
  return v + __shfl_xor_sync(kFullMask, v, 2);
}
__device__ __forceinline__ float fl_quad_max(float v) {
  v = fmax_nan(v, __shfl_xor_sync(kFullMask, v, 1));
  return fmax_nan(v, __shfl_xor_sync(kFullMask, v, 2));
}

// The coefficients of one 64-column Y tile for this thread's two rows, in place of their scores, for flash_kernel
// and wgmma_kernel alike: sc[4 j + 2 h + e] is row h (row[h], in X; the mma.sync C layout and wgmma's per-warp D
// layout) and column 8 j + 2 t + e of the tile (y0 its first bank row), cols the tile's slot of the column arrays
// (fl_store_cols). l = sc xinv inv with xinv the row factor; xl2[h] = xinv log2(e), as the exponentials are taken
// in base 2. Forward: c = e^{l - m} coef with m the running max (run_m, in base 2: m log2(e); run_s updated;
// alpha[h] = e^{m_old - m}, which the caller applies to its output rows once nothing reads them); Lse: the same,
// of which the caller reads only run_m and run_s; BankGrads: c = coef e^{l - lse}. Left out (c = 0): columns past
// the bank, rows past X, the row's excluded column (row_ex), for BankGrads with an excluded array (by_col) the
// anchor a column leaves out (yex), and the pairs that a
// negative_mask (masked: the row's two mask words in the slot, one bit per column) or labels (xlab: the X rows'
// labels, nullptr without labels; the column's label in the slot) leave out. A row with nothing to leave out in
// this tile (without labels: every tile but the bank's last, the last X block's, the excluded diagonal's and those
// where the mask drops a column) takes a path without the per-column tests; the coefficient factors were formed
// once per column (fl_load_cols). Masked columns are left out by branches, not as -inf logits (in wgmma_kernel,
// -inf written into the score registers made ptxas serialize every wgmma of the kernel, note C7515).
template <FlashMode MODE>
__device__ __forceinline__ void fl_coefficients(float (&sc)[32], const float* cols, int64_t y0, int64_t y_rows,
                                                const int64_t (&row)[2], const int64_t (&row_ex)[2], int64_t x0,
                                                int64_t x_rows, const float (&xl2)[2], bool by_col, bool masked,
                                                const long long* xlab, int t, float (&run_m)[2], float (&run_s)[2],
                                                float (&alpha)[2]) {
  const float* yinv = cols;
  const float* ylse = yinv + kFlCols;
  const float* ycoef = ylse + kFlCols;
  const int* yex = reinterpret_cast<const int*>(ycoef + kFlCols);
  const long long* ylab = reinterpret_cast<const long long*>(cols + kFlLabOffset);
  const uint32_t* ymask = reinterpret_cast<const uint32_t*>(cols + kFlMaskOffset);
  const int lim = static_cast<int>(min64(kFlCols, y_rows - y0));  // valid columns of this tile
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int hlim = row[h] < x_rows ? lim : 0;
    const int64_t dself = row_ex[h] - y0;
    const int selfc = (dself >= 0 && dself < kFlCols) ? static_cast<int>(dself) : -1;
    const int xloc = static_cast<int>(row[h] - x0);  // BankGrads: compared with yex; the row in the slot's words
    // The row's mask words (columns 0 .. 31, 32 .. 63) and label.
    const uint32_t mw0 = masked ? ymask[2 * xloc] : ~0u, mw1 = masked ? ymask[2 * xloc + 1] : ~0u;
    const long long rlab = xlab != nullptr ? xlab[xloc] : 0;
    // The same for the quad's four lanes (one row), so fl_quad_max's shuffles stay outside branches that differ
    // within a quad.
    const bool plain = hlim == kFlCols && selfc < 0 && (MODE != FlashMode::BankGrads || !by_col) &&
                       (mw0 & mw1) == ~0u && xlab == nullptr;
    const auto keep = [&](int col) {
      return col < hlim && col != selfc && (MODE != FlashMode::BankGrads || yex[col] != xloc) &&
             (((col < 32 ? mw0 : mw1) >> (col & 31)) & 1u) && !(xlab != nullptr && ylab[col] == rlab);
    };
    // f(i, col) for row h's 16 scores of this thread: sc[i], i = 4 j + 2 h + e, is the tile's column 8 j + 2 t + e.
    const auto each = [&](const auto& f) {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) f(4 * j + 2 * h + e, 8 * j + 2 * t + e);
    };
    if (MODE != FlashMode::BankGrads) {  // Forward, Lse
      // The running max and sum in base 2: l2 = l log2(e) = t xl2 with t = sc inv (xl2 >= 0: the scale is positive,
      // or NaN). The tile max of l2 is xl2 times that of t (x -> x xl2 rounds monotonically), so the scores become
      // t in place, and each exponential is 2^(t xl2 - m2), one fused multiply-add and one ex2.
      float tmax = -INFINITY;
      if (plain) {  // every column is kept
        each([&](int i, int col) {
          sc[i] *= yinv[col];
          tmax = fmax_nan(tmax, sc[i]);
        });
      } else {
        each([&](int i, int col) {
          if (keep(col)) tmax = fmax_nan(tmax, sc[i] * yinv[col]);
        });
      }
      tmax = fl_quad_max(tmax);  // the quad holds the row's 64 columns
      // (no kept column: -inf, not xl2 (-inf), which is NaN where xl2 = 0)
      const float lmax = tmax == -INFINITY ? -INFINITY : tmax * xl2[h];
      const float mnew = fmax_nan(run_m[h], lmax);
      alpha[h] = run_m[h] == -INFINITY ? 0.f : fast_exp2(run_m[h] - mnew);
      run_m[h] = mnew;
      run_s[h] *= alpha[h];
      // 2^{l2 - m2}: where m2 = -inf every kept l2 is -inf (m2 is their max), and 2^{-inf - 0} = 0, as 2^{-inf - m2}
      // is for one l2 = -inf under a finite m2: no test per column.
      const float msub = mnew == -INFINITY ? 0.f : mnew;
      if (plain) {
        each([&](int i, int col) {
          const float p = fast_exp2(fmaf(sc[i], xl2[h], -msub));
          run_s[h] += p;  // this lane's part; the quad's parts are added at the end
          sc[i] = p * ycoef[col];
        });
      } else {
        each([&](int i, int col) {
          float c = 0.f;
          if (keep(col)) {
            const float p = fast_exp2(fmaf(sc[i] * yinv[col], xl2[h], -msub));
            run_s[h] += p;
            c = p * ycoef[col];
          }
          sc[i] = c;
        });
      }
    } else {
      alpha[h] = 1.f;
      // e^{l - lse} = 2^{t xl2 - lse log2(e)} (t = sc inv; the column's lse log2(e) from fl_load_cols)
      const auto coef = [&](int i, int col) {
        return ycoef[col] * fast_exp2(fmaf(sc[i] * yinv[col], xl2[h], -ylse[col]));
      };
      if (plain) {
        each([&](int i, int col) { sc[i] = coef(i, col); });
      } else {
        each([&](int i, int col) { sc[i] = keep(col) ? coef(i, col) : 0.f; });
      }
    }
  }
}

// The epilogue of flash_kernel and wgmma_kernel, from registers: acc[4 j + 2 h + e] (NT n8 tiles x 4) is row g + 8 h
// of the warp's 16, feature 8 j + 2 t + e (the mma.sync C layout and wgmma's per-warp D layout alike). Writes the
// Forward partial (max, sum), the finished bank rows (BankGrads, one split) or the float32 partials. xn(h, col):
// feature col of row h's bank row from the block's X tile in shared memory (the rows in their own type, as
// copied; BankGrads only), not from global memory: the global loads, scheduled early, held ~30 more registers and
// made the d = 256 instances spill (ptxas: 120 bytes for flash_kernel, 116 for wgmma_kernel; none now).
template <typename T, FlashMode MODE, int NT, typename XN>
__device__ __forceinline__ void fl_epilogue(const float* acc, const int64_t (&row)[2], const float (&run_m)[2],
                                            const float (&run_s)[2], int64_t split, float unscale, int t,
                                            const TcOperand<T>& X, const FlArgs& a, const XN& xn) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t r = row[h];
    const bool ok = r < X.rows;
    if (MODE != FlashMode::BankGrads) {  // Forward, Lse
      const float s = fl_quad_sum(run_s[h]);
      if (ok && t == 0) {
        a.part_max[split * X.rows + r] = run_m[h] * kLn2;  // (run_m is in base 2; the sum is 2^{l2 - m2} = e^{l - m})
        a.part_sum[split * X.rows + r] = s;
      }
    }
    if (MODE == FlashMode::BankGrads && a.splits == 1) {
      // Finish the bank row: dL/dn = inv G - c (proj n), c = n_hat . G = inv (n . G) (n in its own type; the
      // order and the proj = 0 guard of finish_bank_cols).
      float dot = 0.f;
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * j + 2 * t + e;
          if (ok && col < a.d) dot += acc[4 * j + 2 * h + e] * unscale * xn(h, col);
        }
      dot = fl_quad_sum(dot);
      if (ok) {
        const float inv = a.x_inv[r], proj = a.x_proj[r], c = proj != 0.f ? dot * inv : 0.f;
        T* out = static_cast<T*>(a.out_grad) + r * a.d;
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = 8 * j + 2 * t + e;
            if (col < a.d) {
              out[col] = from_acc<T>(inv * (acc[4 * j + 2 * h + e] * unscale) - c * (proj * xn(h, col)));
            }
          }
      }
    } else if (MODE != FlashMode::Lse && ok) {
      float* dst = a.partial + (split * X.rows + r) * a.d;
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * j + 2 * t + e;
          if (col < a.d) dst[col] = acc[4 * j + 2 * h + e] * unscale;
        }
    }
  }
}

template <typename T, FlashMode MODE, int NT>
__global__ void __launch_bounds__(kTcThreads, 1)
    flash_kernel(const TcOperand<T> X, const TcOperand<T> Y, const FlArgs a, const TcSmem m) {
  static_assert(MODE != FlashMode::Lse, "the lse-only walk is wgmma_kernel's (fl_with_kernel)");
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  unsigned char* const tc_raw = tc_dynamic_smem();
  T* xs = reinterpret_cast<T*>(tc_raw + m.x);
  float* const cols = reinterpret_cast<float*>(tc_raw + m.cols);  // the column arrays (fl_store_cols)
  long long* const xlab = reinterpret_cast<long long*>(cols + kFlSlotWords);  // the X rows' labels (fl_store_xlab)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  // ldmatrix row addresses (PTX fragment layouts as in info_nce_tc.cuh): A = the warp's 16 X rows; B of the
  // score product = Y rows 16 q + yrow (n8 tiles 2q, 2q + 1); B of the second product (.trans) = Y rows
  // 16 kk + yt_row, features 16 cf + yt_col (n8 tiles 2cf, 2cf + 1 of the output).
  const unsigned xa = smem_u32(xs + (16 * warp + (lane & 7) + ((lane >> 3) & 1) * 8) * m.ld + (lane >> 4) * 8);
  const int yrow = (lane & 7) + (lane >> 4) * 8, yk = ((lane >> 3) & 1) * 8;
  const int yt_row = (lane & 7) + ((lane >> 3) & 1) * 8, yt_col = (lane >> 4) * 8;
  const float cscale = tc_coef_scale(a.coef_bound);
  const float unscale = 1.f / cscale;  // a power of two: exact
  const int64_t ytiles = (Y.rows + kFlCols - 1) / kFlCols;
  const int64_t units = a.xblocks * a.splits;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t xb = u % a.xblocks, split = u / a.xblocks;
    const int64_t x0 = xb * kFlRows;
    const int64_t t_begin = split * a.tiles_per_split, t_end = min64(ytiles, t_begin + a.tiles_per_split);
    __syncthreads();  // the previous unit's X tile and Y buffers are no longer read
    tc_issue<T, kFlRows>(xs, m.ld, X, x0, a.d, m.dpad);
    fl_store_xlab(xlab, a, x0, X.rows);  // read after the first tile's barriers
    tc_commit();
    tc_wait<0>();
    int64_t row[2], row_ex[2];
    float xl2[2], run_m[2], run_s[2];  // xl2: the row factor times log2(e) (fl_coefficients)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row[h] = x0 + 16 * warp + g + 8 * h;
      // The column this row leaves out: by X row (Forward; exclude_self in every mode), else per
      // column (yex).
      row_ex[h] = excluded_row(a.exclude_self, MODE == FlashMode::BankGrads ? nullptr : a.excluded, row[h], X.rows);
      const bool ok = row[h] < X.rows;
      xl2[h] = ok ? row_factor(a.x_inv[row[h]] * kLog2e, read_scale(a.scale)) : 0.f;
      run_m[h] = -INFINITY;
      run_s[h] = 0.f;
    }
    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
    const int64_t y_end = min64(Y.rows, t_end * kFlCols);
    FlColVals cv = t_begin < t_end ? fl_load_cols<MODE>(a, Y, t_begin, x0, X.rows, cscale) : FlColVals{};  // this tile's, ahead
    for (int64_t tile = t_begin; tile < t_end; ++tile) {
      const int64_t y0 = tile * kFlCols;
      __syncthreads();  // the Y buffer about to be refilled and the column arrays are consumed
      const T* ys = tc_next_y<T>(tc_raw, m, Y, y0, y_end, static_cast<int>(tile - t_begin), a.d);
      fl_store_cols(cols, cv);
      __syncthreads();
      if (tile + 1 < t_end) cv = fl_load_cols<MODE>(a, Y, tile + 1, x0, X.rows, cscale);  // used at the next tile's store
      // Scores of the warp's 16 rows x the tile's 64 columns: sc[j] is n8 tile j (C layout).
      float sc[8][4];
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[j][e] = 0.f;
      unsigned ya[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) ya[q] = smem_u32(ys + (16 * q + yrow) * m.ld + yk);
#pragma unroll 2
      for (int k = 0; k < m.dpad; k += 16) {
        const unsigned off = static_cast<unsigned>(k) * 2u;
        unsigned a0, a1, a2, a3;
        ldsm_x4(xa + off, a0, a1, a2, a3);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          unsigned b0, b1, b2, b3;
          ldsm_x4(ya[q] + off, b0, b1, b2, b3);
          mma16816<T>(sc[2 * q], a0, a1, a2, a3, b0, b1);
          mma16816<T>(sc[2 * q + 1], a0, a1, a2, a3, b2, b3);
        }
      }
      // Coefficients in place of the scores (masked ones 0); Forward: the output rows to the new running max.
      float alpha[2];
      fl_coefficients<MODE>(reinterpret_cast<float(&)[32]>(sc), cols, y0, Y.rows, row, row_ex, x0, X.rows, xl2,
                            a.excluded != nullptr, a.keep_bits != nullptr, a.x_labels != nullptr ? xlab : nullptr, t,
                            run_m, run_s, alpha);
      // (not where no row of the warp has a new max: alpha = e^0 = 1 exactly there)
      if (MODE == FlashMode::Forward && warp_any(alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          acc[j][0] *= alpha[0];
          acc[j][1] *= alpha[0];
          acc[j][2] *= alpha[1];
          acc[j][3] *= alpha[1];
        }
      }
      // O (16 rows x d) += C (16 x 64) Y (64 x d): the coefficients of n8 tiles 2kk, 2kk + 1 are the A
      // fragment of k16 slice kk.
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const unsigned p0 = pack2<T>(sc[2 * kk][0], sc[2 * kk][1]), p1 = pack2<T>(sc[2 * kk][2], sc[2 * kk][3]);
        const unsigned p2 = pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
        const unsigned p3 = pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
        const unsigned yb = smem_u32(ys + (16 * kk + yt_row) * m.ld + yt_col);
#pragma unroll
        for (int cf = 0; cf < NT / 2; ++cf) {
          if (16 * cf < m.dpad) {
            unsigned b0, b1, b2, b3;
            ldsm_x4_trans(yb + static_cast<unsigned>(16 * cf) * 2u, b0, b1, b2, b3);
            mma16816<T>(acc[2 * cf], p0, p1, p2, p3, b0, b1);
            mma16816<T>(acc[2 * cf + 1], p0, p1, p2, p3, b2, b3);
          }
        }
      }
    }
    // The X tile was copied by every thread: a unit without Y tiles (no anchors) has passed no barrier since.
    __syncthreads();
    const T* xrow = xs + (16 * warp + g) * m.ld;  // row[0]'s bank row in the X tile; row[1]'s is 8 rows on
    fl_epilogue<T, MODE, NT>(&acc[0][0], row, run_m, run_s, split, unscale, t, X, a,
                             [&](int h, int col) { return to_acc<float>(xrow[8 * h * m.ld + col]); });
  }
#else
  __trap();
#endif
}
