// Tensor-core tiles of the shared-bank mode (included by info_nce_cuda_impl.cuh inside its anonymous namespace;
// torch-free like the rest of csrc/cuda).
//
// float16 / bfloat16 inputs use WMMA m16n16k16 with float32 accumulation; float32 inputs use WMMA tf32
// m16n16k8 only when the caller allows TF32 (torch.backends.cuda.matmul.allow_tf32), else the SIMT kernels.
// Requires compute capability >= 8.0 and a feature width d <= kTcMaxD (d is zero-padded to a multiple of 16), or
// for the mma.sync kernels below any d whose X and Y tiles fit in shared memory (their rows passes then work in
// slices of kTcSliceD features: use_tc in info_nce_cuda_impl.cuh); anything else takes the SIMT kernels.
//
// One core serves three kernels. A block owns kTcRows "X" rows (held in shared memory for its whole life) and
// walks over tiles of kTcCols "Y" rows; for each tile it forms the raw score tile S = X Y^T (kTcRows x kTcCols,
// float32) with tensor cores into shared memory, then
//   tc_lse_kernel     X = anchors, Y = bank rows of one K chunk: folds l = s S inv_x inv_y into a running
//                     (max, sum) per anchor (4 threads per row) and writes the chunk's partial state, which
//                     forward_merge_kernel merges exactly as for the SIMT forward;
//   tc_rows_kernel    for every (x, y) a coefficient c from the logit and the final lse, written to shared
//                     memory in the input type, and O += C Y (kTcRows x d, float32 accumulators in
//                     registers) by tensor cores again:
//                       anchor term  X = anchors, Y = bank:    c = e^{l - lse_x} inv_y        O_x = V_x
//                       bank grads   X = bank,    Y = anchors: c = g_y s e^{l - lse_y} inv_y  O_x = dL/dn_hat_x
//                     A block covers all Y tiles of its split; with one split it finishes its rows itself
//                     (V stored, or the bank row's Jacobian and cast), else it writes a float32 partial that
//                     tc_finish_kernel sums in split order. Deterministic: no atomics, fixed orders.
// Logits, exponentials and coefficients never leave shared memory: O(B + K) extra memory besides the
// per-split partials (bounded by a few hundred rows x d per multiprocessor).
#pragma once

#ifndef CONTRASTBOUND_EMULATE
#include <mma.h>
#endif

#include <type_traits>

#include "tc_ptx.cuh"

constexpr int kTcRows = 64;     // X rows per block
constexpr int kTcCols = 64;     // Y rows per tile
constexpr int kTcMaxD = 256;    // widest padded feature dimension of the kernels that hold whole rows in registers
constexpr int kTcSliceD = 256;  // mma_rows_kernel: output features per block (wider rows are split into slices)
constexpr int kTcThreads = 256;  // 8 warps
constexpr int kTcLds = kTcCols + 4;  // leading dimension of the float32 score tile
constexpr int kTcDefaultStages = 1;  // Y-tile stages unless CONTRASTBOUND_TC_STAGES says otherwise

template <typename T>
struct TcTraits;

template <>
struct TcTraits<__half> {
  using frag_t = __half;
  static constexpr int KS = 16;  // k of one mma
  static constexpr int PAD = 8;  // elements of row padding (16 bytes): conflict-free fragment loads
  static constexpr int MIN_BLOCKS = 2;  // tc_rows_kernel: two blocks per multiprocessor (<= 128 registers)
};
template <>
struct TcTraits<__nv_bfloat16> {
  using frag_t = __nv_bfloat16;
  static constexpr int KS = 16;
  static constexpr int PAD = 8;
  static constexpr int MIN_BLOCKS = 2;
};
template <>
struct TcTraits<float> {
  // (precision::tf32 exists from compute capability 8.0: a build for 7.x compiles the kernels as __trap(), which
  // use_tc never launches there, and needs a name here)
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using frag_t = nvcuda::wmma::precision::tf32;
#else
  using frag_t = float;
#endif
  static constexpr int KS = 8;
  static constexpr int PAD = 4;
  static constexpr int MIN_BLOCKS = 1;  // float32 tiles take ~170 KB of shared memory anyway
};

template <typename Frag>
__device__ __forceinline__ void tc_round(Frag& f, float) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#pragma unroll
  for (int t = 0; t < f.num_elements; ++t) f.x[t] = nvcuda::wmma::__float_to_tf32(f.x[t]);
#endif
}
template <typename Frag, typename T>
__device__ __forceinline__ void tc_round(Frag&, T) {}

// Shared-memory plan of the tiles (byte offsets, 128-byte aligned).
struct TcSmem {
  int dpad = 0, ld = 0, ldp = 0, lde = 0;
  // mma.sync kernels, rows too wide for whole X and Y tiles: the tiles hold `chunk` features at a time (0: whole
  // rows). See mma_tile_scores.
  int chunk = 0;
  int stages = 1;  // 2: the next Y tile is copied (cp.async) while the current one is used (3: wgmma_kernel)
  size_t x = 0, y = 0, y1 = 0, y2 = 0, s = 0, p = 0, cols = 0, total = 0;
};

inline size_t tc_align(size_t v) { return (v + 127) / 128 * 128; }

// score_tile: the WMMA kernels' float32 score tile S (kTcRows x kTcLds); the mma.sync kernels keep their scores
// in registers and use that region only as a small scratch (kTcScratch floats), which lets two blocks with two
// Y stages share a multiprocessor.
constexpr int kTcScratch = 6 * kTcRows;

// The operand tiles every tensor-core kernel starts its shared memory with: the X tile (x_rows rows), then one or
// two Y tiles (y_rows rows), each row dpad + pad elements of T (dpad: d rounded up to a multiple of dround, 16
// or, for the wgmma kernels, 64), or chunk + pad with chunk > 0. Sets stages, dpad, chunk, ld (row width + pad;
// left 0 for pad = 0, the wgmma layout, which has no row stride), x, y and y1; returns the end offset.
template <typename T>
size_t tc_operand_tiles(TcSmem& m, int64_t d, int stages, int x_rows, int y_rows, int pad, int dround = 16,
                        int chunk = 0) {
  m.stages = stages == 2 ? 2 : 1;
  m.dpad = static_cast<int>((d + dround - 1) / dround * dround);
  m.chunk = chunk;
  const int width = chunk > 0 ? chunk : m.dpad;
  const size_t row = sizeof(T) * static_cast<size_t>(width + pad);
  m.ld = pad != 0 ? width + pad : 0;
  m.x = 0;
  m.y = tc_align(row * x_rows);
  m.y1 = m.y;
  size_t o = tc_align(m.y + row * y_rows);
  if (m.stages == 2) {
    m.y1 = o;
    o = tc_align(o + row * y_rows);
  }
  return o;
}

// chunk > 0 (mma.sync kernels only, one stage): tiles of `chunk` features (TcSmem::chunk).
template <typename T>
TcSmem tc_smem(int64_t d, bool with_p, int stages = 1, bool score_tile = true, int chunk = 0) {
  TcSmem m;
  size_t o = tc_operand_tiles<T>(m, d, chunk > 0 ? 1 : stages, kTcRows, kTcCols, TcTraits<T>::PAD, 16, chunk);
  m.ldp = kTcCols + TcTraits<T>::PAD;
  m.lde = std::min(m.dpad, kTcSliceD) + 4;
  // The float32 output tile of the rows kernels (one slice of features) reuses the X and Y tiles once the loop
  // is over.
  o = std::max(o, tc_align(sizeof(float) * kTcRows * m.lde));
  m.s = o;
  o = tc_align(o + sizeof(float) * (score_tile ? kTcRows * kTcLds : kTcScratch));
  m.p = o;
  if (with_p) o = tc_align(o + sizeof(T) * kTcRows * m.ldp);
  m.cols = o;
  o = tc_align(o + sizeof(float) * 4 * kTcCols);  // yinv, ylse, yg (float) and yex (int, tc_col_excluded)
  m.total = o;
  return m;
}

// One operand: rows of a (rows, d) matrix read through its strides. vec: 16-byte loads are legal (unit feature
// stride, row stride and base aligned to 16 bytes, d a multiple of the vector width).
template <typename T>
struct TcOperand {
  const T* ptr = nullptr;
  int64_t s0 = 0, s1 = 0, rows = 0;
  bool vec = false;
};

template <typename T>
__device__ __forceinline__ T tc_zero() {
  return from_acc<T, float>(0.f);
}

// Issues dst[r][j] = src row (row0 + r), feature j, for r < ROWS and j < dpad; zero past the rows and d. The
// 16-byte path copies asynchronously (cp.async; complete after tc_commit + tc_wait), the scalar path at once.
template <typename T, int ROWS>
__device__ __forceinline__ void tc_issue(T* dst, int ld, const TcOperand<T>& src, int64_t row0, int64_t d, int dpad) {
  if (src.vec) {
    // Chunk c = threadIdx.x + kTcThreads i is (row c / cpr, chunk c % cpr): walked incrementally (no division
    // in the loop), 32-bit shared offsets, 64-bit global offsets.
    constexpr int E = 16 / sizeof(T);
    const int cpr = dpad / E, dch = static_cast<int>(d / E);
    const int q = kTcThreads / cpr, rem = kTcThreads % cpr;
    const int64_t rows_left = src.rows - row0;
    const T* base = src.ptr + row0 * src.s0;
    const unsigned dst0 = smem_u32(dst);
    int r = threadIdx.x / cpr, jc = threadIdx.x % cpr;
    while (r < ROWS) {
      const bool ok = r < rows_left && jc < dch;
      const T* g = ok ? base + r * src.s0 + jc * E : src.ptr;  // not read when ok is false (source size 0)
      const unsigned sa = dst0 + static_cast<unsigned>((r * ld + jc * E) * static_cast<int>(sizeof(T)));
      cp_async16(sa, g, ok ? 16 : 0);
      r += q;
      jc += rem;
      if (jc >= cpr) {
        jc -= cpr;
        ++r;
      }
    }
  } else {
    for (int e = threadIdx.x; e < ROWS * dpad; e += kTcThreads) {
      const int r = e / dpad, j = e % dpad;
      const int64_t row = row0 + r;
      dst[r * ld + j] = (row < src.rows && j < d) ? src.ptr[row * src.s0 + j * src.s1] : tc_zero<T>();
    }
  }
}

// Tile `it` of a walk over Y: with two stages, tile it + 1 is issued before tile it is waited for. Called by
// every thread after the barrier that ends the use of the buffer it refills.
template <typename T>
__device__ __forceinline__ T* tc_next_y(unsigned char* raw, const TcSmem& m, const TcOperand<T>& Y, int64_t y0,
                                       int64_t y_end, int it, int64_t d) {
  T* cur = reinterpret_cast<T*>(raw + ((m.stages == 2 && (it & 1)) ? m.y1 : m.y));
  if (m.stages == 2) {
    if (it == 0) {  // prologue: the first tile
      tc_issue<T, kTcCols>(cur, m.ld, Y, y0, d, m.dpad);
      tc_commit();
    }
    if (y0 + kTcCols < y_end) {
      T* nxt = reinterpret_cast<T*>(raw + ((it & 1) ? m.y : m.y1));
      tc_issue<T, kTcCols>(nxt, m.ld, Y, y0 + kTcCols, d, m.dpad);
      tc_commit();
      tc_wait<1>();
    } else {
      tc_wait<0>();
    }
  } else {
    tc_issue<T, kTcCols>(cur, m.ld, Y, y0, d, m.dpad);
    tc_commit();
    tc_wait<0>();
  }
  return cur;
}

// S (kTcRows x kTcCols, float32, leading dimension kTcLds) = X_s Y_s^T over the padded features.
// Warps as 4 x 2: warp w owns rows 16 (w / 2) .. +15 and columns 32 (w % 2) .. +31.
template <typename T>
__device__ __forceinline__ void tc_scores(const T* xs, const T* ys, int ld, int dpad, float* S) {
  namespace wmma = nvcuda::wmma;
  using Tr = TcTraits<T>;
  const int warp = threadIdx.x / 32, wr = warp >> 1, wc = warp & 1;
  wmma::fragment<wmma::accumulator, 16, 16, Tr::KS, float> acc[2];
  wmma::fill_fragment(acc[0], 0.f);
  wmma::fill_fragment(acc[1], 0.f);
  for (int k = 0; k < dpad; k += Tr::KS) {
    wmma::fragment<wmma::matrix_a, 16, 16, Tr::KS, typename Tr::frag_t, wmma::row_major> a;
    wmma::load_matrix_sync(a, xs + (16 * wr) * ld + k, ld);
    tc_round(a, T());
#pragma unroll
    for (int f = 0; f < 2; ++f) {
      // B(k, n) = Y[n][k]: column-major over the row-major Y tile.
      wmma::fragment<wmma::matrix_b, 16, 16, Tr::KS, typename Tr::frag_t, wmma::col_major> b;
      wmma::load_matrix_sync(b, ys + (32 * wc + 16 * f) * ld + k, ld);
      tc_round(b, T());
      wmma::mma_sync(acc[f], a, b, acc[f]);
    }
  }
#pragma unroll
  for (int f = 0; f < 2; ++f) {
    wmma::store_matrix_sync(S + (16 * wr) * kTcLds + 32 * wc + 16 * f, acc[f], kTcLds, wmma::mem_row_major);
  }
}

// Running (max, sum) of exponentials; -inf max means empty.
__device__ __forceinline__ void tc_lse_merge(float& m, float& s, float om, float os) {
  const float nm = fmax_nan(m, om);
  if (nm == -INFINITY) return;
  s = (m == -INFINITY ? 0.f : s * __expf(m - nm)) + (om == -INFINITY ? 0.f : os * __expf(om - nm));
  m = nm;
}

// float16 coefficient scaling: the power of two that puts `bound` (an upper bound of every coefficient, from
// tc_bound_kernel) at or below 2^14, so that small coefficients stay normal float16 numbers; 1 without a bound.
__device__ __forceinline__ float tc_coef_scale(const float* bound_ptr) {
  if (bound_ptr == nullptr) return 1.f;
  const float bound = *bound_ptr;
  if (!(bound > 0.f && bound < INFINITY)) return 1.f;
  int e = 0;
  frexpf(16384.f / bound, &e);  // 16384 / bound = f 2^e, f in [0.5, 1)
  return ldexpf(1.f, e - 1);    // <= 16384 / bound
}

// float16 only: a row whose inverse norm is above kHalfZeroRowInv is all zero (a nonzero float16 vector has a norm
// of at least 2^-24, an inverse norm of at most 2^24; F.normalize's eps gives a zero row 1e12). Its coefficient only
// ever multiplies zeros, so it is left out of the bound (else one zero row, with inv = 1e12, would scale every
// other coefficient below float16's smallest number: a zero anchor term / bank gradient) and set to 0 (inv x
// cscale could overflow float16, and inf x 0 is NaN). bfloat16 and TF32 coefficients are not scaled.
constexpr float kHalfZeroRowInv = 1e9f;

template <typename T>
__host__ __device__ __forceinline__ bool tc_zero_row(float inv) {
  return std::is_same<T, __half>::value && inv > kHalfZeroRowInv;
}

// The inverse-norm factor of a Y row's coefficients (see tc_zero_row).
template <typename T>
__device__ __forceinline__ float tc_coef_inv(float inv, float cscale) {
  return tc_zero_row<T>(inv) ? 0.f : inv * cscale;
}

// One row's term of the float16 coefficient bound: inv |w| s (w: the row's weight, 1 when there is none).
__host__ __device__ __forceinline__ float tc_bound_term(float inv, float w_abs_s) {
  return tc_zero_row<__half>(inv) ? 0.f : inv * w_abs_s;
}

// Bank grads (X = bank rows, Y = anchors): the X row of this block that anchor y leaves out of its sum, as an
// offset from the block's first row x0, or -1 (none, or outside the block's `rows` rows). exclude_self is
// handled by the kernels' own x == y test; this serves the excluded array.
__device__ __forceinline__ int tc_col_excluded(const int64_t* excluded, int64_t y, int64_t y_rows, int64_t x0,
                                               int rows) {
  if (excluded == nullptr || y >= y_rows) return -1;
  const int64_t e = excluded[y];  // compared before subtracting: e - x0 overflows for an entry near INT64_MIN
  return e >= x0 && e - x0 < rows ? static_cast<int>(e - x0) : -1;
}

struct TcLseArgs {
  int64_t d = 0, K = 0, B = 0, chunk_len = 0, chunks = 0, xblocks = 0;
  const float* scale = nullptr;  // s, in device memory (read_scale)
  bool exclude_self = false;
  const int64_t* excluded = nullptr;  // (B,) or nullptr: bank row left out of each anchor's sum (excluded_row)
  LeftOut lo;                    // negative_mask / labels: read by the kernels' LEFT_OUT instances only
  const float* x_inv = nullptr;  // (B,) anchors
  const float* y_inv = nullptr;  // (K,) bank rows
  float* part_max = nullptr;     // (chunks, B)
  float* part_sum = nullptr;
};

// One block per (anchor block, K chunk), grid-stride over those units. LEFT_OUT: the instance that tests the
// negative_mask and labels (a.lo) per logit; the other has no such test (nor its registers).
template <typename T, bool LEFT_OUT = false>
__global__ void __launch_bounds__(kTcThreads, 2)
    tc_lse_kernel(const TcOperand<T> X, const TcOperand<T> Y, const TcLseArgs a, const TcSmem m) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  unsigned char* const tc_raw = tc_dynamic_smem();
  T* xs = reinterpret_cast<T*>(tc_raw + m.x);
  float* S = reinterpret_cast<float*>(tc_raw + m.s);
  float* yinv = reinterpret_cast<float*>(tc_raw + m.cols);
  const int tid = threadIdx.x, r = tid >> 2, q = tid & 3;
  const int64_t units = a.xblocks * a.chunks;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t xb = u % a.xblocks, c = u / a.xblocks;
    const int64_t i0 = xb * kTcRows, i = i0 + r;
    const int64_t k_begin = c * a.chunk_len, k_end = min64(a.K, k_begin + a.chunk_len);
    __syncthreads();  // the previous unit's tiles are no longer read
    tc_issue<T, kTcRows>(xs, m.ld, X, i0, a.d, m.dpad);
    tc_commit();
    tc_wait<0>();
    const float xinv = i < a.B ? row_factor(a.x_inv[i], read_scale(a.scale)) : 0.f;
    const int64_t ex = excluded_row(a.exclude_self, a.excluded, i, a.B);  // -1: none
    float mx = -INFINITY, sm = 0.f;
    int it = 0;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kTcCols, ++it) {
      __syncthreads();  // S, yinv and the Y buffer about to be refilled are consumed
      const T* ys = tc_next_y<T>(tc_raw, m, Y, k0, k_end, it, a.d);
      if (tid < kTcCols) yinv[tid] = k0 + tid < k_end ? a.y_inv[k0 + tid] : 0.f;
      __syncthreads();
      tc_scores<T>(xs, ys, m.ld, m.dpad, S);
      __syncthreads();
      float v[kTcCols / 4];
      float tmax = -INFINITY;
#pragma unroll
      for (int t = 0; t < kTcCols / 4; ++t) {
        const int col = q + 4 * t;
        const int64_t k = k0 + col;
        const bool keep = k < k_end && k != ex && !(LEFT_OUT && i < a.B && left_out(a.lo, i, k));
        v[t] = keep ? S[r * kTcLds + col] * xinv * yinv[col] : -INFINITY;
        tmax = fmax_nan(tmax, v[t]);
      }
      if (tmax != -INFINITY) {
        float ts = 0.f;
#pragma unroll
        for (int t = 0; t < kTcCols / 4; ++t) ts += __expf(v[t] - tmax);  // exp(-inf) = 0
        tc_lse_merge(mx, sm, tmax, ts);
      }
    }
    // The 4 threads of a row are neighbouring lanes.
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
      const float om = __shfl_xor_sync(kFullMask, mx, o), os = __shfl_xor_sync(kFullMask, sm, o);
      tc_lse_merge(mx, sm, om, os);
    }
    if (q == 0 && i < a.B) {
      a.part_max[c * a.B + i] = mx;
      a.part_sum[c * a.B + i] = sm;
    }
  }
#else
  __trap();
#endif
}


struct TcRowsArgs {
  int64_t d = 0;
  int64_t splits = 1, tiles_per_split = 0, xblocks = 0;
  // mma_rows_kernel: slices of kTcSliceD features (ceil(d / kTcSliceD)); a unit is (X block, split, slice) and
  // recomputes the scores over all d, so wide rows cost (slices + 1) / 2 times the work of one pass.
  int64_t slices = 1;
  const float* scale = nullptr;  // s, in device memory (read_scale)
  bool exclude_self = false;
  const int64_t* excluded = nullptr;  // (B,) or nullptr: by X row (anchor term) or by Y row (bank grads)
  // negative_mask / labels in the (anchor, bank row) frame: (x, y) for the anchor term, (y, x) for bank grads;
  // read by the kernels' LEFT_OUT instances only.
  LeftOut lo;
  // The flash-layout bank pass with a negative_mask: workspace for its mask bits in that pass's frame (bank rows x
  // fl_keep_words(anchors) words; fl_left_out packs them); nullptr otherwise.
  uint32_t* fl_keep_bits = nullptr;
  bool lse_on_x = true;          // anchor term (lse indexed by X row) or bank grads (by Y row)
  const float* x_inv = nullptr;  // (X rows,)
  const float* x_proj = nullptr;  // bank grads: Jacobian factor of the X (bank) rows
  const float* y_inv = nullptr;  // (Y rows,)
  const float* lse = nullptr;    // (B,)
  const float* g = nullptr;      // (B,) bank grads only
  float* partial = nullptr;      // (splits, X rows, d) when splits > 1
  // mma_rows_kernel bank grads with splits > 1: (splits, X rows) partial sums of n . G (n: the raw bank row),
  // formed from the scores as sum_y c(x, y) (n . y) with the coefficients c as rounded for the product, so that
  // they match G's own n . G to float32 rounding; a slice of features could not get it from its part of G.
  // nullptr: tc_finish_kernel takes n . G from the summed G (the WMMA and flash-layout kernels).
  float* partial_proj = nullptr;
  float* out_v = nullptr;        // anchor term: (B, d) float32
  void* out_grad = nullptr;      // bank grads: (K, d) input dtype
  // float16 only: an upper bound of every coefficient (max over Y of its factor; e^{l - lse} <= 1). The
  // coefficients are scaled by a power of two that puts this bound at 2^14, so that small ones stay normal
  // float16 numbers instead of flushing to zero, and the sums are scaled back in float32.
  const float* coef_bound = nullptr;
};

// O_x = sum_y c(x, y) Y_y over all Y tiles of split `split`, then finished (one split) or stored as a partial.
// LEFT_OUT: as for tc_lse_kernel.
template <typename T, bool LEFT_OUT = false>
__global__ void __launch_bounds__(kTcThreads, TcTraits<T>::MIN_BLOCKS)
    tc_rows_kernel(const TcOperand<T> X, const TcOperand<T> Y, const TcRowsArgs a, const TcSmem m) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using Tr = TcTraits<T>;
  unsigned char* const tc_raw = tc_dynamic_smem();
  T* xs = reinterpret_cast<T*>(tc_raw + m.x);
  float* E = reinterpret_cast<float*>(tc_raw);  // output tile, after the loop (aliases xs and ys)
  float* S = reinterpret_cast<float*>(tc_raw + m.s);
  T* P = reinterpret_cast<T*>(tc_raw + m.p);
  float* yinv = reinterpret_cast<float*>(tc_raw + m.cols);
  float* ylse = yinv + kTcCols;
  float* yg = ylse + kTcCols;
  int* yex = reinterpret_cast<int*>(yg + kTcCols);
  const int tid = threadIdx.x, r = tid >> 2, q = tid & 3, warp = tid / 32;
  const int rp = warp & 1, cg = warp >> 1;  // output: rows 32 rp .. +31, column fragments cg + 4 t
  const int64_t ytiles = (Y.rows + kTcCols - 1) / kTcCols;
  const int64_t units = a.xblocks * a.splits;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t xb = u % a.xblocks, split = u / a.xblocks;
    const int64_t x0 = xb * kTcRows, x = x0 + r;
    const int64_t t_begin = split * a.tiles_per_split, t_end = min64(ytiles, t_begin + a.tiles_per_split);
    __syncthreads();  // the previous unit's output tile is no longer read
    tc_issue<T, kTcRows>(xs, m.ld, X, x0, a.d, m.dpad);
    tc_commit();
    tc_wait<0>();
    const bool x_ok = x < X.rows;
    const float xinv = x_ok ? row_factor(a.x_inv[x], read_scale(a.scale)) : 0.f;
    const float cscale = tc_coef_scale(a.coef_bound);
    const float xlse = (a.lse_on_x && x_ok) ? a.lse[x] : 0.f;
    // Bank grads with an excluded array: per column (yex); a value the whole block shares (see mma_rows_kernel).
    const bool by_col = !a.lse_on_x && a.excluded != nullptr;
    wmma::fragment<wmma::accumulator, 16, 16, Tr::KS, float> acc[2][4];
#pragma unroll
    for (int i2 = 0; i2 < 2; ++i2)
#pragma unroll
      for (int t = 0; t < 4; ++t) wmma::fill_fragment(acc[i2][t], 0.f);
    const int64_t y_end = min64(Y.rows, t_end * kTcCols);
    for (int64_t tile = t_begin; tile < t_end; ++tile) {
      const int64_t y0 = tile * kTcCols;
      __syncthreads();  // S, P, the column arrays and the Y buffer about to be refilled are consumed
      const T* ys = tc_next_y<T>(tc_raw, m, Y, y0, y_end, static_cast<int>(tile - t_begin), a.d);
      if (tid < kTcCols) {
        const int64_t y = y0 + tid;
        const bool ok = y < Y.rows;
        yinv[tid] = ok ? a.y_inv[y] : 0.f;
        ylse[tid] = (ok && !a.lse_on_x) ? a.lse[y] : 0.f;
        yg[tid] = (ok && !a.lse_on_x) ? a.g[y] * read_scale(a.scale) : 0.f;
        yex[tid] = a.lse_on_x ? -1 : tc_col_excluded(a.excluded, y, Y.rows, x0, kTcRows);
      }
      __syncthreads();
      tc_scores<T>(xs, ys, m.ld, m.dpad, S);
      __syncthreads();
      // The column this row leaves out: by X row (anchor term; exclude_self in both modes), else per column (yex).
      const int64_t xex = excluded_row(a.exclude_self, a.lse_on_x ? a.excluded : nullptr, x, X.rows);
#pragma unroll
      for (int t = 0; t < kTcCols / 4; ++t) {
        const int col = q + 4 * t;
        const int64_t y = y0 + col;
        const bool keep = x_ok && y < Y.rows && y != xex && !(by_col && yex[col] == r) &&
                          !(LEFT_OUT && left_out(a.lo, a.lse_on_x ? x : y, a.lse_on_x ? y : x));
        float c = 0.f;
        if (keep) {
          const float l = S[r * kTcLds + col] * xinv * yinv[col];
          c = (a.lse_on_x ? __expf(l - xlse) : yg[col] * __expf(l - ylse[col])) * tc_coef_inv<T>(yinv[col], cscale);
        }
        P[r * m.ldp + col] = from_acc<T, float>(c);
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kTcCols; k += Tr::KS) {
        wmma::fragment<wmma::matrix_a, 16, 16, Tr::KS, typename Tr::frag_t, wmma::row_major> pa[2];
#pragma unroll
        for (int i2 = 0; i2 < 2; ++i2) {
          wmma::load_matrix_sync(pa[i2], P + (32 * rp + 16 * i2) * m.ldp + k, m.ldp);
          tc_round(pa[i2], T());
        }
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          const int cf = cg + 4 * t;
          if (16 * cf < m.dpad) {
            // B(k, n) = Y[k][n]: row-major over the Y tile.
            wmma::fragment<wmma::matrix_b, 16, 16, Tr::KS, typename Tr::frag_t, wmma::row_major> b;
            wmma::load_matrix_sync(b, ys + k * m.ld + 16 * cf, m.ld);
            tc_round(b, T());
#pragma unroll
            for (int i2 = 0; i2 < 2; ++i2) wmma::mma_sync(acc[i2][t], pa[i2], b, acc[i2][t]);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with xs and ys, which E overwrites
    const float unscale = 1.f / cscale;  // a power of two: exact
#pragma unroll
    for (int i2 = 0; i2 < 2; ++i2)
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int cf = cg + 4 * t;
        if (16 * cf < m.dpad) {
          if (cscale != 1.f) {
#pragma unroll
            for (int z = 0; z < acc[i2][t].num_elements; ++z) acc[i2][t].x[z] *= unscale;
          }
          wmma::store_matrix_sync(E + (32 * rp + 16 * i2) * m.lde + 16 * cf, acc[i2][t], m.lde,
                                  wmma::mem_row_major);
        }
      }
    __syncthreads();
    const int64_t nrows = min64(kTcRows, X.rows - x0);
    if (a.splits > 1) {
      float* dst = a.partial + (split * X.rows + x0) * a.d;
      for (int64_t e = tid; e < nrows * a.d; e += kTcThreads) {
        const int64_t rr = e / a.d, j = e % a.d;
        dst[rr * a.d + j] = E[rr * m.lde + j];
      }
    } else if (a.lse_on_x) {
      float* dst = a.out_v + x0 * a.d;
      for (int64_t e = tid; e < nrows * a.d; e += kTcThreads) {
        const int64_t rr = e / a.d, j = e % a.d;
        dst[rr * a.d + j] = E[rr * m.lde + j];
      }
    } else {
      T* grad = static_cast<T*>(a.out_grad);
      for (int64_t rr = warp; rr < nrows; rr += kTcThreads / 32) {
        const int64_t k = x0 + rr;
        finish_bank_row<T, float>(E + rr * m.lde, 0, 1, X.ptr + k * X.s0, X.s1, a.d, a.x_inv[k], a.x_proj[k],
                                  grad + k * a.d);
      }
    }
  }
#else
  __trap();
#endif
}


// Several splits: sums the partials in split order and finishes each row (one warp per row).
template <typename T>
__global__ void __launch_bounds__(kTcThreads) tc_finish_kernel(const TcOperand<T> X, const TcRowsArgs a) {
  const int64_t warps = int64_t(gridDim.x) * (kTcThreads / 32);
  const int lane = threadIdx.x % 32;
  const int64_t stride = X.rows * a.d;
  for (int64_t x = int64_t(blockIdx.x) * (kTcThreads / 32) + threadIdx.x / 32; x < X.rows; x += warps) {
    if (a.lse_on_x) {
      for (int64_t j = lane; j < a.d; j += 32) {
        float v = 0.f;
        for (int64_t s = 0; s < a.splits; ++s) v += a.partial[s * stride + x * a.d + j];
        a.out_v[x * a.d + j] = v;
      }
    } else if (a.partial_proj != nullptr) {
      float c = 0.f;
      for (int64_t s = 0; s < a.splits; ++s) c += a.partial_proj[s * X.rows + x];
      finish_bank_cols<T, float>(a.partial + x * a.d, stride, a.splits, X.ptr + x * X.s0, X.s1, a.d, a.x_inv[x],
                                 c * a.x_inv[x], a.x_proj[x], static_cast<T*>(a.out_grad) + x * a.d);
    } else {
      finish_bank_row<T, float>(a.partial + x * a.d, stride, a.splits, X.ptr + x * X.s0, X.s1, a.d, a.x_inv[x],
                                a.x_proj[x], static_cast<T*>(a.out_grad) + x * a.d);
    }
  }
}

// coef_bound for float16: max over n of w[n] * inv[n] (w = 1 when null), non-negative, by an atomic max on the
// float's bits (order-independent, so deterministic). *out must be zero before the launch.
__global__ void __launch_bounds__(kTcThreads)
    tc_bound_kernel(const float* inv, const float* w, const float* wscale, int64_t n, float* out) {
  float v = 0.f;
  for (int64_t i = int64_t(blockIdx.x) * kTcThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kTcThreads) {
    const float x = tc_bound_term(inv[i], w != nullptr ? fabsf(w[i]) * read_scale(wscale) : 1.f);
    v = fmaxf(v, x);  // NaN is dropped here; a NaN coefficient would show in the result anyway
  }
  v = warp_max(v);
  if (threadIdx.x % 32 == 0) atomicMax(reinterpret_cast<unsigned int*>(out), __float_as_uint(v));
}

// ---------------------------------------------------------------------------------------------------------
// float16 / bfloat16 with mma.sync m16n8k16 and ldmatrix (sm_80+): the same tiles and plans as above, but the
// fragments are loaded with ldmatrix from 32-bit shared addresses and the score tile stays in registers (the
// accumulator layout of mma.sync is fixed by the PTX ISA), so the scores are never written to shared memory
// and the coefficients go to shared memory once, in the input type, as the A operand of the second product.
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
//   A (16 x 16, row):  a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   B (16 x 8, col):   b0 (k 2t..2t+1, n g)  b1 (k 2t+8.., n g)
//   C (16 x 8, f32):   c0, c1 (g, 2t..2t+1)  c2, c3 (g+8, 2t..2t+1)
// ---------------------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi);
template <>
__device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}
template <>
__device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}

// v rounded to T (to nearest even, as pack2 rounds), back as a float.
template <typename T>
__device__ __forceinline__ float round_to(float v);
template <>
__device__ __forceinline__ float round_to<__nv_bfloat16>(float v) {
  return __bfloat162float(__float2bfloat16_rn(v));
}
template <>
__device__ __forceinline__ float round_to<__half>(float v) {
  return __half2float(__float2half_rn(v));
}

// Scores of this warp's 16 x 32 part of the tile (rows 16 (warp / 2), columns 32 (warp % 2)): c[j] is the n8
// tile j. xa / ya: this lane's ldmatrix row addresses (shared, bytes) at feature 0; `bytes_k` = 2 dpad.
template <typename T>
__device__ __forceinline__ void mma_scores_add(unsigned xa, unsigned ya0, unsigned ya1, int dpad, float (&c)[4][4]) {
#pragma unroll 4
  for (int k = 0; k < dpad; k += 16) {
    const unsigned off = static_cast<unsigned>(k) * 2u;
    unsigned a0, a1, a2, a3, b0, b1, b2, b3, b4, b5, b6, b7;
    ldsm_x4(xa + off, a0, a1, a2, a3);
    ldsm_x4(ya0 + off, b0, b1, b2, b3);  // n8 tiles 0, 1
    ldsm_x4(ya1 + off, b4, b5, b6, b7);  // n8 tiles 2, 3
    mma16816<T>(c[0], a0, a1, a2, a3, b0, b1);
    mma16816<T>(c[1], a0, a1, a2, a3, b2, b3);
    mma16816<T>(c[2], a0, a1, a2, a3, b4, b5);
    mma16816<T>(c[3], a0, a1, a2, a3, b6, b7);
  }
}

__device__ __forceinline__ void mma_zero(float (&c)[4][4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) c[j][e] = 0.f;
}

template <typename T>
__device__ __forceinline__ void mma_scores(unsigned xa, unsigned ya0, unsigned ya1, int dpad, float (&c)[4][4]) {
  mma_zero(c);
  mma_scores_add<T>(xa, ya0, ya1, dpad, c);
}


// This lane's ldmatrix row addresses for the score product: X rows (A operand) and Y rows (B operand, two x4
// loads covering n8 tiles 0-1 and 2-3 of the warp's 32 columns).
struct MmaLanes {
  int wr, wc, g, t;
  int xrow, xk, yrow, yk;
  __device__ __forceinline__ MmaLanes() {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    wr = warp >> 1;
    wc = warp & 1;
    g = lane >> 2;
    t = lane & 3;
    xrow = 16 * wr + (lane & 7) + ((lane >> 3) & 1) * 8;
    xk = (lane >> 4) * 8;
    yrow = 32 * wc + (lane & 7) + (lane >> 4) * 8;
    yk = ((lane >> 3) & 1) * 8;
  }
};

// sc = the scores of X rows x0.. and Y rows y0.. for this warp (mma_scores' layout), the Y tile at ys. Called by
// every thread after the barrier that frees the tiles (and after the caller's writes that the barrier below must
// publish); returns after a barrier. Whole rows (CHUNKED false): the X tile is the unit's and ys already holds the
// Y tile. Chunk mode (m.chunk > 0: rows too wide for whole X and Y tiles in shared memory): chunks of m.chunk
// features of both are copied into the X and Y tiles in turn (so X is read again for every Y tile, mostly from
// L2) and their scores summed, in the order last + 1, ..., last (cyclic): chunk `last` is left in the Y tile.
template <typename T, bool CHUNKED>
__device__ __forceinline__ void mma_tile_scores(unsigned char* raw, const TcSmem& m, const TcOperand<T>& X, int64_t x0,
                                                const TcOperand<T>& Y, int64_t y0, int64_t d, int last, unsigned xa,
                                                const T* ys, const MmaLanes& L, float (&sc)[4][4]) {
  const unsigned ya0 = smem_u32(ys + L.yrow * m.ld + L.yk), ya1 = smem_u32(ys + (L.yrow + 16) * m.ld + L.yk);
  if constexpr (!CHUNKED) {
    __syncthreads();
    mma_scores<T>(xa, ya0, ya1, m.dpad, sc);
  } else {
    T* xs = reinterpret_cast<T*>(raw + m.x);
    T* yt = reinterpret_cast<T*>(raw + m.y);
    const int chunks = (m.dpad + m.chunk - 1) / m.chunk;
    mma_zero(sc);
    for (int i = 0; i < chunks; ++i) {
      const int c0 = ((last + 1 + i) % chunks) * m.chunk;
      const int cpad = m.dpad - c0 < m.chunk ? m.dpad - c0 : m.chunk;  // padded features of this chunk
      const int64_t cd = min64(d - c0, cpad);                            // its real features (> 0)
      if (i > 0) __syncthreads();  // the previous chunk is consumed
      TcOperand<T> xc = X, yc = Y;
      xc.ptr += c0 * X.s1;
      yc.ptr += c0 * Y.s1;
      tc_issue<T, kTcRows>(xs, m.ld, xc, x0, cd, cpad);
      tc_issue<T, kTcCols>(yt, m.ld, yc, y0, cd, cpad);
      tc_commit();
      tc_wait<0>();
      __syncthreads();
      mma_scores_add<T>(xa, ya0, ya1, cpad, sc);
    }
  }
}

// Running (max, sum) merge for the lanes of a quad, then the two warps of a row block through `scratch`
// (2 x kTcRows floats); the warp with wc == 0 ends with the row's state in lanes t == 0.
__device__ __forceinline__ void mma_lse_reduce(float& m, float& s, int wc, int row, int t, float* scratch) {
#pragma unroll
  for (int o = 1; o < 4; o <<= 1) {
    const float om = __shfl_xor_sync(kFullMask, m, o), os = __shfl_xor_sync(kFullMask, s, o);
    tc_lse_merge(m, s, om, os);
  }
  if (wc == 1 && t == 0) {
    scratch[row] = m;
    scratch[kTcRows + row] = s;
  }
  __syncthreads();
  if (wc == 0 && t == 0) tc_lse_merge(m, s, scratch[row], scratch[kTcRows + row]);
}

// CHUNKED: m.chunk > 0 (mma_tile_scores); a separate instance, so that the whole-row one keeps its registers.
// Whole rows: three blocks per multiprocessor (at most 80 registers, no spills with nvcc 13 for sm_80 / sm_90a),
// as in the H200 measurements; left to itself ptxas took 86 once the excluded column came in, which fits two.
// LEFT_OUT: as for tc_lse_kernel.
template <typename T, bool CHUNKED = false, bool LEFT_OUT = false>
__global__ void __launch_bounds__(kTcThreads, CHUNKED ? 2 : 3)
    mma_lse_kernel(const TcOperand<T> X, const TcOperand<T> Y, const TcLseArgs a, const TcSmem m) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  unsigned char* const tc_raw = tc_dynamic_smem();
  T* xs = reinterpret_cast<T*>(tc_raw + m.x);
  float* scratch = reinterpret_cast<float*>(tc_raw + m.s);
  float* yinv = reinterpret_cast<float*>(tc_raw + m.cols);
  const MmaLanes L;
  const unsigned xa = smem_u32(xs + L.xrow * m.ld + L.xk);
  const int64_t units = a.xblocks * a.chunks;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t xb = u % a.xblocks, c = u / a.xblocks;
    const int64_t i0 = xb * kTcRows;
    const int64_t k_begin = c * a.chunk_len, k_end = min64(a.K, k_begin + a.chunk_len);
    __syncthreads();  // the previous unit's tiles and scratch are no longer read
    if constexpr (!CHUNKED) {  // whole rows: the X tile stays for the unit (chunk mode copies it per Y tile)
      tc_issue<T, kTcRows>(xs, m.ld, X, i0, a.d, m.dpad);
      tc_commit();
      tc_wait<0>();
    }
    int64_t row_i[2], row_ex[2];
    float xinv[2], mx[2], sm[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_i[h] = i0 + 16 * L.wr + L.g + 8 * h;
      row_ex[h] = excluded_row(a.exclude_self, a.excluded, row_i[h], a.B);  // -1: none
      xinv[h] = row_i[h] < a.B ? row_factor(a.x_inv[row_i[h]], read_scale(a.scale)) : 0.f;
      mx[h] = -INFINITY;
      sm[h] = 0.f;
    }
    int it = 0;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kTcCols, ++it) {
      __syncthreads();  // yinv and the Y buffer about to be refilled are consumed
      const T* ys = CHUNKED ? reinterpret_cast<const T*>(tc_raw + m.y) : tc_next_y<T>(tc_raw, m, Y, k0, k_end, it, a.d);
      if (threadIdx.x < kTcCols) yinv[threadIdx.x] = k0 + threadIdx.x < k_end ? a.y_inv[k0 + threadIdx.x] : 0.f;
      // (Chunks: natural order; rows past k_end are copied too, and masked below, as in the whole-row path.)
      float sc[4][4];
      mma_tile_scores<T, CHUNKED>(tc_raw, m, X, i0, Y, k0, a.d, CHUNKED ? (m.dpad + m.chunk - 1) / m.chunk - 1 : 0,
                                  xa, ys, L, sc);
      const int lim = static_cast<int>(min64(kTcCols, k_end - k0));  // valid columns of this tile
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t dself = row_ex[h] - k0;  // column of the row the anchor leaves out, if in this tile
        const int selfc = (dself >= 0 && dself < kTcCols) ? static_cast<int>(dself) : -1;
        float v[8];
        float tmax = -INFINITY;
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = 32 * L.wc + 8 * j + 2 * L.t + e;
            const bool keep = col < lim && col != selfc &&
                              !(LEFT_OUT && row_i[h] < a.B && left_out(a.lo, row_i[h], k0 + col));
            const float l = sc[j][2 * h + e] * xinv[h] * yinv[col];
            v[2 * j + e] = keep ? l : -INFINITY;
            tmax = fmax_nan(tmax, v[2 * j + e]);
          }
        if (tmax != -INFINITY) {
          float ts = 0.f;
#pragma unroll
          for (int q = 0; q < 8; ++q) ts += __expf(v[q] - tmax);
          tc_lse_merge(mx[h], sm[h], tmax, ts);
        }
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = 16 * L.wr + L.g + 8 * h;
      mma_lse_reduce(mx[h], sm[h], L.wc, row, L.t, scratch);
      if (L.wc == 0 && L.t == 0 && row_i[h] < a.B) {
        a.part_max[c * a.B + row_i[h]] = mx[h];
        a.part_sum[c * a.B + row_i[h]] = sm[h];
      }
      __syncthreads();  // scratch is reused for h = 1
    }
  }
#else
  __trap();
#endif
}

// The second product's accumulators of this warp (rows 32 rp .., 16-column groups cg + 4 q of a slice `wpad`
// features wide) times `unscale` into the float32 output tile E (kTcRows x m.lde) in shared memory.
__device__ __forceinline__ void mma_store_rows(float* E, const TcSmem& m, const float (&acc)[2][4][2][4], int rp,
                                               int cg, int wpad, const MmaLanes& L, float unscale) {
#pragma unroll
  for (int i2 = 0; i2 < 2; ++i2)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int cf = cg + 4 * q;
      if (16 * cf < wpad) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int col = 16 * cf + 8 * h + 2 * L.t;
          const int r0 = 32 * rp + 16 * i2 + L.g;
          *reinterpret_cast<float2*>(E + r0 * m.lde + col) =
              make_float2(acc[i2][q][h][0] * unscale, acc[i2][q][h][1] * unscale);
          *reinterpret_cast<float2*>(E + (r0 + 8) * m.lde + col) =
              make_float2(acc[i2][q][h][2] * unscale, acc[i2][q][h][3] * unscale);
        }
      }
    }
}

// CHUNKED: m.chunk == kTcSliceD > 0 (mma_tile_scores), as for mma_lse_kernel; LEFT_OUT: as for tc_lse_kernel.
template <typename T, bool CHUNKED = false, bool LEFT_OUT = false>
__global__ void __launch_bounds__(kTcThreads, 2)
    mma_rows_kernel(const TcOperand<T> X, const TcOperand<T> Y, const TcRowsArgs a, const TcSmem m) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  unsigned char* const tc_raw = tc_dynamic_smem();
  T* xs = reinterpret_cast<T*>(tc_raw + m.x);
  float* E = reinterpret_cast<float*>(tc_raw);  // output tile, after the loop (aliases xs and ys)
  T* P = reinterpret_cast<T*>(tc_raw + m.p);
  float* yinv = reinterpret_cast<float*>(tc_raw + m.cols);
  float* ylse = yinv + kTcCols;
  float* yg = ylse + kTcCols;
  int* yex = reinterpret_cast<int*>(yg + kTcCols);
  const MmaLanes L;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int rp = warp & 1, cg = warp >> 1;  // output: rows 32 rp .. +31, 16-column groups cg + 4 q
  const unsigned xa = smem_u32(xs + L.xrow * m.ld + L.xk);
  // Second product: A = P rows (32 rp + 16 i2 ..), B = Y tile rows (k) x features (n), transposed loads.
  const unsigned pa = smem_u32(P + (32 * rp + (lane & 7) + ((lane >> 3) & 1) * 8) * m.ldp + (lane >> 4) * 8);
  float* rowc = reinterpret_cast<float*>(tc_raw + m.s);  // bank grads: n . G per X row (2 x kTcRows halves)
  const int64_t ytiles = (Y.rows + kTcCols - 1) / kTcCols;
  const int64_t units = a.xblocks * a.splits * a.slices;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t xb = u % a.xblocks, split = (u / a.xblocks) % a.splits, slice = u / (a.xblocks * a.splits);
    const int64_t x0 = xb * kTcRows;
    const int64_t t_begin = split * a.tiles_per_split, t_end = min64(ytiles, t_begin + a.tiles_per_split);
    // This unit's output features: col0 .. col0 + wpad of the padded rows (col0 < d: slices = ceil(d / 256)).
    const int col0 = kTcSliceD * static_cast<int>(slice);
    const int wpad = m.dpad - col0 < kTcSliceD ? m.dpad - col0 : kTcSliceD;
    // This lane's transposed-load address in a Y tile, in bytes from the tile's start, at k = 0 and group cf = 0
    // (chunk mode: the tile holds just this slice's features, the last chunk copied).
    const int yt_row = (lane & 7) + ((lane >> 3) & 1) * 8, yt_col = (CHUNKED ? 0 : col0) + (lane >> 4) * 8;
    const unsigned yt_lane = static_cast<unsigned>(yt_row * m.ld + yt_col) * 2u;
    __syncthreads();  // the previous unit's output tile and rowc are no longer read
    if constexpr (!CHUNKED) {  // whole rows: the X tile stays for the unit (chunk mode copies it per Y tile)
      tc_issue<T, kTcRows>(xs, m.ld, X, x0, a.d, m.dpad);
      tc_commit();
      tc_wait<0>();
    }
    int64_t row_x[2];
    float xinv[2], xlse[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_x[h] = x0 + 16 * L.wr + L.g + 8 * h;
      const bool ok = row_x[h] < X.rows;
      xinv[h] = ok ? row_factor(a.x_inv[row_x[h]], read_scale(a.scale)) : 0.f;
      xlse[h] = (a.lse_on_x && ok) ? a.lse[row_x[h]] : 0.f;
    }
    // Bank grads with an excluded array: per column (yex). A value the whole block shares, so that the compare
    // costs nothing (and holds no registers) in the other calls.
    const bool by_col = !a.lse_on_x && a.excluded != nullptr;
    const float cscale = tc_coef_scale(a.coef_bound);
    if (threadIdx.x < 2 * kTcRows) rowc[threadIdx.x] = 0.f;  // read and written after the tile loop's barriers
    float acc[2][4][2][4];
#pragma unroll
    for (int i2 = 0; i2 < 2; ++i2)
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i2][q][h][e] = 0.f;
    const int64_t y_end = min64(Y.rows, t_end * kTcCols);
    for (int64_t tile = t_begin; tile < t_end; ++tile) {
      const int64_t y0 = tile * kTcCols;
      __syncthreads();  // P, the column arrays and the Y buffer about to be refilled are consumed
      const T* ys = CHUNKED ? reinterpret_cast<const T*>(tc_raw + m.y)
                            : tc_next_y<T>(tc_raw, m, Y, y0, y_end, static_cast<int>(tile - t_begin), a.d);
      const unsigned ys_u32 = smem_u32(ys);
      if (threadIdx.x < kTcCols) {
        const int64_t y = y0 + threadIdx.x;
        const bool ok = y < Y.rows;
        yinv[threadIdx.x] = ok ? a.y_inv[y] : 0.f;
        ylse[threadIdx.x] = (ok && !a.lse_on_x) ? a.lse[y] : 0.f;
        yg[threadIdx.x] = (ok && !a.lse_on_x) ? a.g[y] * read_scale(a.scale) : 0.f;
        yex[threadIdx.x] = a.lse_on_x ? -1 : tc_col_excluded(a.excluded, y, Y.rows, x0, kTcRows);
      }
      float sc[4][4];  // (chunks: this slice's last, so that it stays in the Y tile for the second product)
      mma_tile_scores<T, CHUNKED>(tc_raw, m, X, x0, Y, y0, a.d, static_cast<int>(slice), xa, ys, L, sc);
      // Coefficients of this lane's 2 x 8 scores, packed in pairs into P (the A operand of the next product).
      const int lim = static_cast<int>(min64(kTcCols, Y.rows - y0));  // valid columns of this tile
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = 16 * L.wr + L.g + 8 * h;
        const int hlim = row_x[h] < X.rows ? lim : 0;
        // The column this row leaves out: by X row (anchor term; exclude_self in both modes; re-read per tile
        // rather than held in registers across the loop), else per column (yex).
        const int64_t dself = excluded_row(a.exclude_self, a.lse_on_x ? a.excluded : nullptr, row_x[h], X.rows) - y0;
        const int selfc = (dself >= 0 && dself < kTcCols) ? static_cast<int>(dself) : -1;
        float ng = 0.f;  // bank grads: this lane's part of n_x . G_x = sum_y c(x, y) (n_x . y) (times cscale)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float cf[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = 32 * L.wc + 8 * j + 2 * L.t + e;
            const int64_t y = y0 + col;
            const bool keep = col < hlim && col != selfc && !(by_col && yex[col] == row) &&
                              !(LEFT_OUT && left_out(a.lo, a.lse_on_x ? row_x[h] : y, a.lse_on_x ? y : row_x[h]));
            float cv = 0.f;
            if (keep) {
              const float l = sc[j][2 * h + e] * xinv[h] * yinv[col];
              cv = (a.lse_on_x ? __expf(l - xlse[h]) : yg[col] * __expf(l - ylse[col])) *
                   tc_coef_inv<T>(yinv[col], cscale);
              cv = round_to<T>(cv);  // as the product will see it (exact: pack2 below rounds it again)
              ng += cv * sc[j][2 * h + e];
            }
            cf[e] = cv;
          }
          *reinterpret_cast<unsigned*>(P + row * m.ldp + 32 * L.wc + 8 * j + 2 * L.t) = pack2<T>(cf[0], cf[1]);
        }
        if (!a.lse_on_x) {  // summed per tile in a fixed order: the quad, then rowc (one owner per entry)
          ng += __shfl_xor_sync(kFullMask, ng, 1);
          ng += __shfl_xor_sync(kFullMask, ng, 2);
          if (L.t == 0) rowc[L.wc * kTcRows + row] += ng;
        }
      }
      __syncthreads();
      // O (32 rows x 16-column groups of this warp) += P (32 x 64) Y (64 x 16 per group).
#pragma unroll
      for (int k = 0; k < kTcCols; k += 16) {
        unsigned pa0[4], pa1[4];
        ldsm_x4(pa + static_cast<unsigned>(k) * 2u, pa0[0], pa0[1], pa0[2], pa0[3]);
        ldsm_x4(pa + static_cast<unsigned>(16 * m.ldp + k) * 2u, pa1[0], pa1[1], pa1[2], pa1[3]);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int cf = cg + 4 * q;
          if (16 * cf < wpad) {
            unsigned b0, b1, b2, b3;  // b0, b1: n8 tile 16 cf; b2, b3: n8 tile 16 cf + 8
            ldsm_x4_trans(ys_u32 + yt_lane + static_cast<unsigned>(k * m.ld + 16 * cf) * 2u, b0, b1, b2, b3);
            mma16816<T>(acc[0][q][0], pa0[0], pa0[1], pa0[2], pa0[3], b0, b1);
            mma16816<T>(acc[0][q][1], pa0[0], pa0[1], pa0[2], pa0[3], b2, b3);
            mma16816<T>(acc[1][q][0], pa1[0], pa1[1], pa1[2], pa1[3], b0, b1);
            mma16816<T>(acc[1][q][1], pa1[0], pa1[1], pa1[2], pa1[3], b2, b3);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with xs and ys, which E overwrites
    const float unscale = 1.f / cscale;  // a power of two: exact
    mma_store_rows(E, m, acc, rp, cg, wpad, L, unscale);
    __syncthreads();
    // Bank grads: n_x . G_x = (rowc[x] + rowc[64 + x]) unscale; n_hat_x . G_x = inv_x (n_x . G_x).
    const int64_t nrows = min64(kTcRows, X.rows - x0);
    const int64_t wd = min64(kTcSliceD, a.d - col0);  // features of this slice
    if (a.splits > 1) {
      float* dst = a.partial + (split * X.rows + x0) * a.d + col0;
      for (int64_t e = threadIdx.x; e < nrows * wd; e += kTcThreads) {
        const int64_t rr = e / wd, j = e % wd;
        dst[rr * a.d + j] = E[rr * m.lde + j];
      }
      if (!a.lse_on_x && slice == 0 && threadIdx.x < nrows) {
        a.partial_proj[split * X.rows + x0 + threadIdx.x] = (rowc[threadIdx.x] + rowc[kTcRows + threadIdx.x]) * unscale;
      }
    } else if (a.lse_on_x) {
      float* dst = a.out_v + x0 * a.d + col0;
      for (int64_t e = threadIdx.x; e < nrows * wd; e += kTcThreads) {
        const int64_t rr = e / wd, j = e % wd;
        dst[rr * a.d + j] = E[rr * m.lde + j];
      }
    } else {
      T* grad = static_cast<T*>(a.out_grad);
      for (int64_t rr = warp; rr < nrows; rr += kTcThreads / 32) {
        const int64_t k = x0 + rr;
        const float c = (rowc[rr] + rowc[kTcRows + rr]) * unscale * a.x_inv[k];
        finish_bank_cols<T, float>(E + rr * m.lde, 0, 1, X.ptr + k * X.s0 + col0 * X.s1, X.s1, wd, a.x_inv[k],
                                   c, a.x_proj[k], grad + k * a.d + col0);
      }
    }
  }
#else
  __trap();
#endif
}

// One-pass forward (float16 / bfloat16, mma.sync): the log-sum-exp state and the anchors' term of one K chunk in
// a single walk over the bank, as flash attention does: per tile, the row maxima of the scores are exchanged
// through shared memory, the running V accumulators (float32 registers) are rescaled by e^{m_old - m_new}, the
// weights e^{l - m_new} inv_n go to shared memory in the input type and V += W N by tensor cores. Writes the
// chunk's (max, sum, unnormalised V) partials that forward_merge_kernel merges, as for the SIMT forward.
// 4BKd flop instead of the 2BKd + 4BKd of tc_lse + tc_rows. Chosen by CONTRASTBOUND_TC_FUSED_FWD=1.
// STATUS: compiled (sm_80, sm_90a) and passes the CPU emulation (csrc/tests/test_mma_emu.cpp), but not yet run
// on a GPU: off by default until tests/test_cuda.py passes there and bench_gpu.py shows it faster.
template <typename T>
__global__ void __launch_bounds__(kTcThreads, 2)
    mma_fwd_kernel(const TcOperand<T> X, const TcOperand<T> Y, const TcLseArgs a, float* part_w,
                   const float* coef_bound, const TcSmem m) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  unsigned char* const tc_raw = tc_dynamic_smem();
  T* xs = reinterpret_cast<T*>(tc_raw + m.x);
  float* E = reinterpret_cast<float*>(tc_raw);  // output tile, after the loop (aliases xs and ys)
  T* P = reinterpret_cast<T*>(tc_raw + m.p);
  float* xmax = reinterpret_cast<float*>(tc_raw + m.s);  // [2][kTcRows]: tile row maxima of the two column halves
  float* xsum = xmax + 2 * kTcRows;                      // [2][kTcRows]: tile row sums
  float* run_m = xsum + 2 * kTcRows;                     // [kTcRows]: running max
  float* run_s = run_m + kTcRows;                        // [kTcRows]: running sum
  float* yinv = reinterpret_cast<float*>(tc_raw + m.cols);
  const MmaLanes L;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int rp = warp & 1, cg = warp >> 1;
  const unsigned xa = smem_u32(xs + L.xrow * m.ld + L.xk);
  const unsigned pa = smem_u32(P + (32 * rp + (lane & 7) + ((lane >> 3) & 1) * 8) * m.ldp + (lane >> 4) * 8);
  const int yt_row = (lane & 7) + ((lane >> 3) & 1) * 8, yt_col = (lane >> 4) * 8;
  const float cscale = tc_coef_scale(coef_bound);
  const int64_t units = a.xblocks * a.chunks;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t xb = u % a.xblocks, c = u / a.xblocks;
    const int64_t i0 = xb * kTcRows;
    const int64_t k_begin = c * a.chunk_len, k_end = min64(a.K, k_begin + a.chunk_len);
    __syncthreads();  // the previous unit's output tile and row states are no longer read
    tc_issue<T, kTcRows>(xs, m.ld, X, i0, a.d, m.dpad);
    tc_commit();
    tc_wait<0>();
    if (threadIdx.x < kTcRows) {
      run_m[threadIdx.x] = -INFINITY;
      run_s[threadIdx.x] = 0.f;
    }
    int64_t row_i[2], row_ex[2];
    float xinv[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_i[h] = i0 + 16 * L.wr + L.g + 8 * h;
      row_ex[h] = excluded_row(a.exclude_self, a.excluded, row_i[h], a.B);  // -1: none
      xinv[h] = row_i[h] < a.B ? row_factor(a.x_inv[row_i[h]], read_scale(a.scale)) : 0.f;
    }
    float acc[2][4][2][4];
#pragma unroll
    for (int i2 = 0; i2 < 2; ++i2)
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i2][q][h][e] = 0.f;
    int it = 0;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kTcCols, ++it) {
      __syncthreads();  // (A) P, yinv, the row exchanges and the Y buffer about to be refilled are consumed
      const T* ys = tc_next_y<T>(tc_raw, m, Y, k0, k_end, it, a.d);
      if (threadIdx.x < kTcCols) yinv[threadIdx.x] = k0 + threadIdx.x < k_end ? a.y_inv[k0 + threadIdx.x] : 0.f;
      __syncthreads();  // (B)
      float sc[4][4];
      mma_scores<T>(xa, smem_u32(ys + L.yrow * m.ld + L.yk), smem_u32(ys + (L.yrow + 16) * m.ld + L.yk), m.dpad, sc);
      const int lim = static_cast<int>(min64(kTcCols, k_end - k0));
      float v[2][8];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t dself = row_ex[h] - k0;
        const int selfc = (dself >= 0 && dself < kTcCols) ? static_cast<int>(dself) : -1;
        float tm = -INFINITY;
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = 32 * L.wc + 8 * j + 2 * L.t + e;
            const bool keep = col < lim && col != selfc;
            v[h][2 * j + e] = keep ? sc[j][2 * h + e] * xinv[h] * yinv[col] : -INFINITY;
            tm = fmax_nan(tm, v[h][2 * j + e]);
          }
        tm = fmax_nan(tm, __shfl_xor_sync(kFullMask, tm, 1));
        tm = fmax_nan(tm, __shfl_xor_sync(kFullMask, tm, 2));
        if (L.t == 0) xmax[L.wc * kTcRows + 16 * L.wr + L.g + 8 * h] = tm;
      }
      __syncthreads();  // (C) tile row maxima complete; run_m still holds the previous maxima
      // Weights of this lane's scores against the new running max, and the tile's row sums.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = 16 * L.wr + L.g + 8 * h;
        const float mnew = fmax_nan(run_m[row], fmax_nan(xmax[row], xmax[kTcRows + row]));
        float ps = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float w[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = 32 * L.wc + 8 * j + 2 * L.t + e;
            const float x = v[h][2 * j + e];
            const float ex = x == -INFINITY ? 0.f : __expf(x - mnew);
            ps += ex;
            w[e] = ex * tc_coef_inv<T>(yinv[col], cscale);
          }
          *reinterpret_cast<unsigned*>(P + row * m.ldp + 32 * L.wc + 8 * j + 2 * L.t) = pack2<T>(w[0], w[1]);
        }
        ps += __shfl_xor_sync(kFullMask, ps, 1);
        ps += __shfl_xor_sync(kFullMask, ps, 2);
        if (L.t == 0) xsum[L.wc * kTcRows + row] = ps;
      }
      // Rescale this warp's V rows to the new running max (read before (D); run_m changes only after it).
#pragma unroll
      for (int i2 = 0; i2 < 2; ++i2)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int row = 32 * rp + 16 * i2 + L.g + 8 * hh;
          const float mold = run_m[row];
          const float mnew = fmax_nan(mold, fmax_nan(xmax[row], xmax[kTcRows + row]));
          const float alpha = mold == -INFINITY ? 0.f : __expf(mold - mnew);
#pragma unroll
          for (int q = 0; q < 4; ++q)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              acc[i2][q][h][2 * hh] *= alpha;
              acc[i2][q][h][2 * hh + 1] *= alpha;
            }
        }
      __syncthreads();  // (D) P and the tile row sums complete; every read of the old run_m is done
      if (threadIdx.x < kTcRows) {
        const int row = threadIdx.x;
        const float mold = run_m[row];
        const float mnew = fmax_nan(mold, fmax_nan(xmax[row], xmax[kTcRows + row]));
        const float alpha = mold == -INFINITY ? 0.f : __expf(mold - mnew);
        run_s[row] = run_s[row] * alpha + xsum[row] + xsum[kTcRows + row];
        run_m[row] = mnew;
      }
#pragma unroll
      for (int k = 0; k < kTcCols; k += 16) {
        unsigned pa0[4], pa1[4];
        ldsm_x4(pa + static_cast<unsigned>(k) * 2u, pa0[0], pa0[1], pa0[2], pa0[3]);
        ldsm_x4(pa + static_cast<unsigned>(16 * m.ldp + k) * 2u, pa1[0], pa1[1], pa1[2], pa1[3]);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int cf = cg + 4 * q;
          if (16 * cf < m.dpad) {
            unsigned b0, b1, b2, b3;
            ldsm_x4_trans(smem_u32(ys + (k + yt_row) * m.ld + 16 * cf + yt_col), b0, b1, b2, b3);
            mma16816<T>(acc[0][q][0], pa0[0], pa0[1], pa0[2], pa0[3], b0, b1);
            mma16816<T>(acc[0][q][1], pa0[0], pa0[1], pa0[2], pa0[3], b2, b3);
            mma16816<T>(acc[1][q][0], pa1[0], pa1[1], pa1[2], pa1[3], b0, b1);
            mma16816<T>(acc[1][q][1], pa1[0], pa1[1], pa1[2], pa1[3], b2, b3);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with xs and ys, which E overwrites; run_m / run_s are final
    const float unscale = 1.f / cscale;
    mma_store_rows(E, m, acc, rp, cg, m.dpad, L, unscale);
    __syncthreads();
    const int64_t nrows = min64(kTcRows, a.B - i0);
    if (threadIdx.x < nrows) {
      a.part_max[c * a.B + i0 + threadIdx.x] = run_m[threadIdx.x];
      a.part_sum[c * a.B + i0 + threadIdx.x] = run_s[threadIdx.x];
    }
    float* dst = part_w + (c * a.B + i0) * a.d;
    for (int64_t e = threadIdx.x; e < nrows * a.d; e += kTcThreads) {
      const int64_t rr = e / a.d, j = e % a.d;
      dst[rr * a.d + j] = E[rr * m.lde + j];
    }
  }
#else
  __trap();
#endif
}
