// Tensor-core tiles of the shared-bank mode (included by info_nce_cuda.cu inside its anonymous namespace;
// torch-free like the rest of csrc/cuda).
//
// float16 / bfloat16 inputs use WMMA m16n16k16 with float32 accumulation; float32 inputs use WMMA tf32
// m16n16k8 only when the caller allows TF32 (torch.backends.cuda.matmul.allow_tf32), else the SIMT kernels.
// Requires compute capability >= 8.0 and a feature width d <= kTcMaxD (d is zero-padded to a multiple of 16);
// anything else takes the SIMT kernels of info_nce_cuda.cu.
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

#include <mma.h>

constexpr int kTcRows = 64;     // X rows per block
constexpr int kTcCols = 64;     // Y rows per tile
constexpr int kTcMaxD = 256;    // widest padded feature dimension held in shared memory
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
  using frag_t = nvcuda::wmma::precision::tf32;
  static constexpr int KS = 8;
  static constexpr int PAD = 4;
  static constexpr int MIN_BLOCKS = 1;  // float32 tiles take ~170 KB of shared memory anyway
};

template <typename Frag>
__device__ __forceinline__ void tc_round(Frag& f, float) {
#pragma unroll
  for (int t = 0; t < f.num_elements; ++t) f.x[t] = nvcuda::wmma::__float_to_tf32(f.x[t]);
}
template <typename Frag, typename T>
__device__ __forceinline__ void tc_round(Frag&, T) {}

// Shared-memory plan of the tiles (byte offsets, 128-byte aligned).
struct TcSmem {
  int dpad = 0, ld = 0, ldp = 0, lde = 0;
  int stages = 1;  // 2: the next Y tile is copied (cp.async) while the current one is used
  size_t x = 0, y = 0, y1 = 0, s = 0, p = 0, cols = 0, total = 0;
};

inline size_t tc_align(size_t v) { return (v + 127) / 128 * 128; }

template <typename T>
TcSmem tc_smem(int64_t d, bool with_p, int stages = 1) {
  TcSmem m;
  m.stages = stages == 2 ? 2 : 1;
  m.dpad = static_cast<int>((d + 15) / 16 * 16);
  m.ld = m.dpad + TcTraits<T>::PAD;
  m.ldp = kTcCols + TcTraits<T>::PAD;
  m.lde = m.dpad + 4;
  size_t o = 0;
  m.x = o;
  o = tc_align(o + sizeof(T) * kTcRows * m.ld);
  m.y = o;
  o = tc_align(o + sizeof(T) * kTcCols * m.ld);
  m.y1 = m.y;
  if (m.stages == 2) {
    m.y1 = o;
    o = tc_align(o + sizeof(T) * kTcCols * m.ld);
  }
  // The float32 output tile of tc_rows_kernel reuses the X and Y tiles once the loop is over.
  o = std::max(o, tc_align(sizeof(float) * kTcRows * m.lde));
  m.s = o;
  o = tc_align(o + sizeof(float) * kTcRows * kTcLds);
  m.p = o;
  if (with_p) o = tc_align(o + sizeof(T) * kTcRows * m.ldp);
  m.cols = o;
  o = tc_align(o + sizeof(float) * 3 * kTcCols);
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
    constexpr int E = 16 / sizeof(T);
    const int cpr = dpad / E;
    for (int c = threadIdx.x; c < ROWS * cpr; c += kTcThreads) {
      const int r = c / cpr, j = (c % cpr) * E;
      const int64_t row = row0 + r;
      const bool ok = row < src.rows && j < d;
      const T* g = ok ? src.ptr + row * src.s0 + j : src.ptr;  // not read when ok is false (source size 0)
      const unsigned sa = static_cast<unsigned>(__cvta_generic_to_shared(dst + r * ld + j));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(g), "r"(ok ? 16 : 0));
    }
  } else {
    for (int e = threadIdx.x; e < ROWS * dpad; e += kTcThreads) {
      const int r = e / dpad, j = e % dpad;
      const int64_t row = row0 + r;
      dst[r * ld + j] = (row < src.rows && j < d) ? src.ptr[row * src.s0 + j * src.s1] : tc_zero<T>();
    }
  }
}

__device__ __forceinline__ void tc_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void tc_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
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
  const float nm = fmaxf(m, om);
  if (nm == -INFINITY) return;
  s = (m == -INFINITY ? 0.f : s * __expf(m - nm)) + (om == -INFINITY ? 0.f : os * __expf(om - nm));
  m = nm;
}

struct TcLseArgs {
  int64_t d = 0, K = 0, B = 0, chunk_len = 0, chunks = 0, xblocks = 0;
  float scale = 1.f;
  bool exclude_self = false;
  const float* x_inv = nullptr;  // (B,) anchors
  const float* y_inv = nullptr;  // (K,) bank rows
  float* part_max = nullptr;     // (chunks, B)
  float* part_sum = nullptr;
};

// One block per (anchor block, K chunk), grid-stride over those units.
template <typename T>
__global__ void __launch_bounds__(kTcThreads, 2)
    tc_lse_kernel(const TcOperand<T> X, const TcOperand<T> Y, const TcLseArgs a, const TcSmem m) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char tc_raw[];
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
    const float xinv = i < a.B ? a.x_inv[i] * a.scale : 0.f;
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
        const bool keep = k < k_end && !(a.exclude_self && k == i);
        v[t] = keep ? S[r * kTcLds + col] * xinv * yinv[col] : -INFINITY;
        tmax = fmaxf(tmax, v[t]);
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
  float scale = 1.f;
  bool exclude_self = false;
  bool lse_on_x = true;          // anchor term (lse indexed by X row) or bank grads (by Y row)
  const float* x_inv = nullptr;  // (X rows,)
  const float* x_proj = nullptr;  // bank grads: Jacobian factor of the X (bank) rows
  const float* y_inv = nullptr;  // (Y rows,)
  const float* lse = nullptr;    // (B,)
  const float* g = nullptr;      // (B,) bank grads only
  float* partial = nullptr;      // (splits, X rows, d) when splits > 1
  float* out_v = nullptr;        // anchor term: (B, d) float32
  void* out_grad = nullptr;      // bank grads: (K, d) input dtype
  // float16 only: an upper bound of every coefficient (max over Y of its factor; e^{l - lse} <= 1). The
  // coefficients are scaled by a power of two that puts this bound at 2^14, so that small ones stay normal
  // float16 numbers instead of flushing to zero, and the sums are scaled back in float32.
  const float* coef_bound = nullptr;
};

// O_x = sum_y c(x, y) Y_y over all Y tiles of split `split`, then finished (one split) or stored as a partial.
template <typename T>
__global__ void __launch_bounds__(kTcThreads, TcTraits<T>::MIN_BLOCKS)
    tc_rows_kernel(const TcOperand<T> X, const TcOperand<T> Y, const TcRowsArgs a, const TcSmem m) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using Tr = TcTraits<T>;
  extern __shared__ __align__(128) unsigned char tc_raw[];
  T* xs = reinterpret_cast<T*>(tc_raw + m.x);
  float* E = reinterpret_cast<float*>(tc_raw);  // output tile, after the loop (aliases xs and ys)
  float* S = reinterpret_cast<float*>(tc_raw + m.s);
  T* P = reinterpret_cast<T*>(tc_raw + m.p);
  float* yinv = reinterpret_cast<float*>(tc_raw + m.cols);
  float* ylse = yinv + kTcCols;
  float* yg = ylse + kTcCols;
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
    const float xinv = x_ok ? a.x_inv[x] * a.scale : 0.f;
    float cscale = 1.f;
    if (a.coef_bound != nullptr) {
      const float bound = *a.coef_bound;
      if (bound > 0.f && bound < INFINITY) {
        int e = 0;
        frexpf(16384.f / bound, &e);  // 16384 / bound = f 2^e, f in [0.5, 1)
        cscale = ldexpf(1.f, e - 1);   // <= 16384 / bound
      }
    }
    const float xlse = (a.lse_on_x && x_ok) ? a.lse[x] : 0.f;
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
        yg[tid] = (ok && !a.lse_on_x) ? a.g[y] * a.scale : 0.f;
      }
      __syncthreads();
      tc_scores<T>(xs, ys, m.ld, m.dpad, S);
      __syncthreads();
#pragma unroll
      for (int t = 0; t < kTcCols / 4; ++t) {
        const int col = q + 4 * t;
        const int64_t y = y0 + col;
        const bool keep = x_ok && y < Y.rows && !(a.exclude_self && x == y);
        float c = 0.f;
        if (keep) {
          const float l = S[r * kTcLds + col] * xinv * yinv[col];
          c = (a.lse_on_x ? __expf(l - xlse) : yg[col] * __expf(l - ylse[col])) * (yinv[col] * cscale);
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
    } else {
      finish_bank_row<T, float>(a.partial + x * a.d, stride, a.splits, X.ptr + x * X.s0, X.s1, a.d, a.x_inv[x],
                                a.x_proj[x], static_cast<T*>(a.out_grad) + x * a.d);
    }
  }
}

// coef_bound for float16: max over n of w[n] * inv[n] (w = 1 when null), non-negative, by an atomic max on the
// float's bits (order-independent, so deterministic). *out must be zero before the launch.
__global__ void __launch_bounds__(kTcThreads)
    tc_bound_kernel(const float* inv, const float* w, float wscale, int64_t n, float* out) {
  float v = 0.f;
  for (int64_t i = int64_t(blockIdx.x) * kTcThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kTcThreads) {
    const float x = inv[i] * (w != nullptr ? fabsf(w[i]) * wscale : 1.f);
    v = fmaxf(v, x);  // NaN is dropped here; a NaN coefficient would show in the result anyway
  }
  v = warp_max(v);
  if (threadIdx.x % 32 == 0) atomicMax(reinterpret_cast<unsigned int*>(out), __float_as_uint(v));
}
