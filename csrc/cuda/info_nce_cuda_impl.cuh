// CUDA kernels of the fused InfoNCE family and their dispatch. Torch-free (see info_nce_cuda.cuh); the glue
// registers them. Included by one translation unit per element type (info_nce_cuda_{f32_f64,f16,bf16}.cu, each
// defining CB_TC_ELEMENT and its entry points with CB_DEFINE_PART), so that nvcc compiles the three sets of
// kernels in parallel; info_nce_cuda.cu routes each problem to its part by dtype.
//
// STATUS: run on one H200 (torch 2.11, CUDA 13.0): tests/test_cuda.py passes (208 tests) against the CPU kernel
// and the float64 reference. The kernels below are plain SIMT float32/float64 FMA with the structure of the CPU
// kernel (csrc/cpu/info_nce_cpu.cpp); they serve float64, float32 without TF32, the per-anchor and indexed
// modes, and d > 256. The shared bank (and in-batch) in float16/bfloat16, and float32 when TF32 is allowed, take
// the tensor-core kernels of info_nce_tc.cuh (mma.sync / WMMA), dispatched near the end of this file.
//
// Layout of the work (acc_t = float, or double for float64 inputs; BA = BK = 64 for float, 32 for double;
// kThreads = 256 threads as a 16 x 16 grid, each owning BA/16 x BK/16 outputs of a tile):
//
//   prepare          one block per anchor: row norms, s * a_hat and p_hat (B x d, acc_t, in the workspace),
//                    the positive logit. bank_scales: one warp per bank row: 1/||n|| and the Jacobian factor.
//   forward_shared   one block per (anchor block of BA rows, K chunk). For each bank tile of BK rows it forms
//                    the BA x BK logits in registers by a shared-memory tiled GEMM over d (steps of kBD; the
//                    left-out entries, exclude_self / excluded / a negative_mask, set to -inf; also in backward),
//                    folds them into a running (max, sum) per anchor (online log-sum-exp) and, if V is wanted,
//                    rescales the chunk's partial V (in global memory, owned by this block) and adds
//                    P x N_hat_tile. Logits never leave shared memory.
//   forward_rows     per-anchor and indexed negatives: one block per (anchor, K chunk); a warp per negative
//                    row computes its dot product (an index of -1, padding, gives -inf and reads no row), warp 0
//                    folds a tile of kRowTile logits, all threads update the partial V (thread j owns feature j).
//   forward_merge    one block per anchor: merges the chunks' partial states in chunk order (fixed), adds the
//                    positive, writes loss, lse and V.
//   anchor_grads     one block per anchor: the anchors' and positives' gradients from lse and V (no tile work).
//   backward_bank    shared bank: one block per bank tile (BK rows), optionally split over anchor ranges.
//                    For each anchor block it recomputes the logit tile, W = g exp(l - lse), and adds W^T (s A_hat)
//                    into the tile's gradient accumulator (global scratch owned by the block). Each row is then
//                    finished by one warp (normalisation Jacobian, cast). Splits write separate partials that a
//                    second kernel sums in split order. Deterministic: no atomics, fixed summation orders.
//   backward_rows    per-anchor negatives: one warp per (anchor, k) row, which is its own gradient row.
//   backward_indexed one warp per bank row, over that row's run in the stably sorted indices (fixed order;
//                    padding, -1, sorts first and is in no row's run).
//
// All index arithmetic is int64; every kernel loops over its units with a grid stride, so grids are capped.

#pragma once

#ifndef CB_TC_ELEMENT
#error "define CB_TC_ELEMENT (the tensor-core element type of this part) before including info_nce_cuda_impl.cuh"
#endif

#include "info_nce_cuda_parts.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>  // (device printf: the wgmma kernels' diagnostic build, CONTRASTBOUND_WG_TIMING)
#include <mutex>
#include <utility>
#include <type_traits>
#include <vector>

#include "../core/online_lse.h"
#include "tc_plan.h"

namespace contrastbound {
namespace cuda {
namespace {

#include "device_common.cuh"  // constants, conversions, warp reductions, finish_bank_row

// Tile sizes: float 64 x 64 (43 KB of static shared memory), double 32 x 32 (25 KB).
template <typename acc_t>
struct Tile {
  static constexpr int BA = 64;
};
template <>
struct Tile<double> {
  static constexpr int BA = 32;
};
inline int tile_rows(DType t) { return t == DType::Float64 ? 32 : 64; }

// ---------------------------------------------------------------------------------------------------------
// Conversions and reductions
// ---------------------------------------------------------------------------------------------------------

// Sum over the block (every thread gets the result); `smem` holds one value per warp. Fixed order.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* smem) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  acc_t r = 0;
  for (int w = 0; w < warps; ++w) r += smem[w];
  __syncthreads();  // smem may be reused right after
  return r;
}

// ---------------------------------------------------------------------------------------------------------
// Workspace: pointers into one buffer, carved identically by the size query and the launch.
// ---------------------------------------------------------------------------------------------------------

struct Carver {
  char* base;
  size_t used = 0;
  explicit Carver(void* b) : base(static_cast<char*>(b)) {}
  template <typename T>
  T* take(int64_t n) {
    used = (used + 255) / 256 * 256;
    T* p = base ? reinterpret_cast<T*>(base + used) : nullptr;
    used += static_cast<size_t>(n) * sizeof(T);
    return p;
  }
};

template <typename acc_t>
struct Prepared {
  acc_t* as = nullptr;  // (B, d) s * a_hat, for the SIMT kernels only (nullptr on the tensor-core path)
  acc_t *a_inv = nullptr, *a_proj = nullptr, *p_inv = nullptr, *p_proj = nullptr;  // (B,)
  acc_t* pos = nullptr;                                                            // (B,) s a_hat . p_hat
  acc_t *n_inv = nullptr, *n_proj = nullptr;                                       // (rows,) bank rows
  acc_t* tc_bound = nullptr;  // one value: the float16 tensor-core coefficient bound (info_nce_tc.cuh)
};

// The SIMT kernels read the scaled anchors as (B, d) rows; the tensor-core kernels read the raw rows and their
// scales, so with `simt` false no (B, d) array is carved (it was 8 B d bytes with p_hat's: 32 GiB in-batch at
// B = 2^22, d = 1024). p_hat has none anywhere: the anchors' gradient forms it from the raw positive and its scale.
template <typename acc_t>
Prepared<acc_t> carve_prepared(Carver& c, const Problem& p, bool simt) {
  Prepared<acc_t> pr;
  if (simt) pr.as = c.take<acc_t>(p.B * p.d);
  pr.a_inv = c.take<acc_t>(p.B);
  pr.a_proj = c.take<acc_t>(p.B);
  pr.p_inv = c.take<acc_t>(p.B);
  pr.p_proj = c.take<acc_t>(p.B);
  pr.pos = c.take<acc_t>(p.B);
  if (p.mode != Mode::PerAnchor) {
    pr.n_inv = c.take<acc_t>(p.rows);
    pr.n_proj = c.take<acc_t>(p.rows);
  }
  pr.tc_bound = c.take<acc_t>(1);
  return pr;
}

// How the K negatives of an anchor (block) are split into chunks whose partial states forward_merge merges.
struct ForwardPlan {
  int64_t units_per_chunk_row = 0;  // anchor blocks (Shared) or anchors (rows modes)
  int64_t chunks = 0, chunk_len = 0;
};

ForwardPlan plan_forward(const Problem& p, int num_sms) {
  ForwardPlan f;
  const int64_t target = 4 * std::max(1, num_sms);
  const int64_t step = p.mode == Mode::Shared ? tile_rows(p.dtype) : kRowTile;
  f.units_per_chunk_row = p.mode == Mode::Shared ? ceil_div(p.B, tile_rows(p.dtype)) : p.B;
  if (p.K == 0 || p.B == 0) return f;
  const int64_t want = ceil_div(target, std::max<int64_t>(1, f.units_per_chunk_row));
  f.chunks = std::max<int64_t>(1, std::min(want, ceil_div(p.K, step)));
  f.chunk_len = ceil_div(ceil_div(p.K, f.chunks), step) * step;
  f.chunks = ceil_div(p.K, f.chunk_len);  // no empty chunk
  return f;
}

template <typename acc_t>
struct ForwardWork {
  Prepared<acc_t> pr;
  acc_t *part_max = nullptr, *part_sum = nullptr;  // (chunks, B)
  acc_t* part_w = nullptr;                         // (chunks, B, d) when V is wanted
};

template <typename acc_t>
ForwardWork<acc_t> carve_forward(Carver& c, const Problem& p, const ForwardPlan& f, bool save, bool simt = true) {
  ForwardWork<acc_t> w;
  w.pr = carve_prepared<acc_t>(c, p, simt);
  w.part_max = c.take<acc_t>(f.chunks * p.B);
  w.part_sum = c.take<acc_t>(f.chunks * p.B);
  if (save) w.part_w = c.take<acc_t>(f.chunks * p.B * p.d);
  return w;
}

// Backward of a shared bank: tiles of BK rows, each anchor range (split) a separate partial.
struct BankPlan {
  int64_t tiles = 0, splits = 0, blocks_per_split = 0, grid_x = 0;
  bool direct = true;  // splits == 1: each block finishes its tiles itself, scratch per block
};

BankPlan plan_bank(const Problem& p, int num_sms) {
  BankPlan b;
  const int64_t BK = tile_rows(p.dtype);
  b.tiles = ceil_div(p.K, BK);
  if (b.tiles == 0) return b;
  const int64_t target = 4 * std::max(1, num_sms);
  const int64_t anchor_blocks = std::max<int64_t>(1, ceil_div(p.B, BK));
  b.splits = std::max<int64_t>(1, std::min(ceil_div(target, b.tiles), anchor_blocks));
  b.blocks_per_split = ceil_div(anchor_blocks, b.splits);
  b.splits = ceil_div(anchor_blocks, b.blocks_per_split);
  b.direct = b.splits == 1;
  // Direct: a persistent grid, scratch O(grid * BK * d) whatever K is. Split: one block per (tile, split);
  // only chosen when tiles < target, so the scratch splits * tiles * BK * d is bounded as well.
  b.grid_x = b.direct ? std::min<int64_t>(b.tiles, 8 * std::max(1, num_sms)) : b.tiles;
  return b;
}

int64_t indexed_warps(const Problem& p, int num_sms) {
  return std::min<int64_t>(ceil_div(std::max<int64_t>(p.rows, 1), kWarps), 8 * std::max(1, num_sms)) * kWarps;
}

template <typename acc_t>
struct BackwardWork {
  Prepared<acc_t> pr;
  acc_t* grad_scratch = nullptr;
  uint32_t* keep_bits = nullptr;  // TcRowsArgs::fl_keep_bits
};

float* carve_backward_tc(Carver& c, const Problem& p, int num_sms);  // tensor-core bank grads, further down
uint32_t* carve_backward_keep_bits(Carver& c, const Problem& p);  // the flash-layout bank pass's mask bits

template <typename acc_t>
BackwardWork<acc_t> carve_backward(Carver& c, const Problem& p, const BackwardArgs& a, int num_sms, bool tc) {
  BackwardWork<acc_t> w;
  w.pr = carve_prepared<acc_t>(c, p, /*simt=*/!tc);
  if (a.grad_negatives != nullptr) {
    if (p.mode == Mode::Shared && tc) {
      w.grad_scratch = reinterpret_cast<acc_t*>(carve_backward_tc(c, p, num_sms));  // acc_t is float here
      w.keep_bits = carve_backward_keep_bits(c, p);
    } else if (p.mode == Mode::Shared) {
      const BankPlan b = plan_bank(p, num_sms);
      const int64_t BK = tile_rows(p.dtype);
      const int64_t slots = b.direct ? b.grid_x : b.splits * b.tiles;
      w.grad_scratch = c.take<acc_t>(slots * BK * p.d);
    } else if (p.mode == Mode::Indexed) {
      w.grad_scratch = c.take<acc_t>(indexed_warps(p, num_sms) * p.d);
    }
  }
  return w;
}

// ---------------------------------------------------------------------------------------------------------
// Preparation
// ---------------------------------------------------------------------------------------------------------

// One block per anchor: row scales of a_i and p_i, s * a_hat_i and p_hat_i in acc_t, the positive logit.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) prepare_kernel(const Problem p, const Prepared<acc_t> pr) {
  CB_SHARED(acc_t, red, [kWarps]);
  const scalar_t* a = static_cast<const scalar_t*>(p.anchors);
  const scalar_t* q = static_cast<const scalar_t*>(p.positives);
  const int64_t d = p.d, as0 = p.anchors_stride[0], as1 = p.anchors_stride[1];
  const int64_t ps0 = p.positives_stride[0], ps1 = p.positives_stride[1];
  const acc_t s = read_scale(static_cast<const acc_t*>(p.scale));
  for (int64_t i = blockIdx.x; i < p.B; i += gridDim.x) {
    acc_t ssa = 0, ssp = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      const acc_t x = to_acc<acc_t>(a[i * as0 + j * as1]);
      const acc_t y = to_acc<acc_t>(q[i * ps0 + j * ps1]);
      ssa += x * x;
      ssp += y * y;
    }
    ssa = block_sum(ssa, red);
    ssp = block_sum(ssp, red);
    const RowScale<acc_t> ra = row_scale<acc_t>(ssa, p.normalize);
    const RowScale<acc_t> rp = row_scale<acc_t>(ssp, p.normalize);
    acc_t dot = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      const acc_t x = to_acc<acc_t>(a[i * as0 + j * as1]) * ra.inv * s;  // 0 for a zero row, as (inv s) may overflow
      const acc_t y = to_acc<acc_t>(q[i * ps0 + j * ps1]) * rp.inv;
      if (pr.as != nullptr) pr.as[i * d + j] = x;
      dot += x * y;
    }
    dot = block_sum(dot, red);
    if (threadIdx.x == 0) {
      pr.a_inv[i] = ra.inv;
      pr.a_proj[i] = ra.proj;
      pr.p_inv[i] = rp.inv;
      pr.p_proj[i] = rp.proj;
      pr.pos[i] = dot;
    }
  }
}

// One warp per row of a (rows, d) bank: 1/||n|| and the Jacobian factor (1 and 0 without normalisation).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) bank_scales_kernel(const Problem p, const Prepared<acc_t> pr) {
  const scalar_t* n = static_cast<const scalar_t*>(p.negatives);
  const int64_t s0 = p.negatives_stride[0], s1 = p.negatives_stride[1];
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * kWarps;
  for (int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; r < p.rows; r += warps) {
    acc_t ss = 0;
    if (p.normalize) {
      for (int64_t j = lane; j < p.d; j += 32) {
        const acc_t x = to_acc<acc_t>(n[r * s0 + j * s1]);
        ss += x * x;
      }
      ss = warp_sum(ss);
    }
    const RowScale<acc_t> rs = row_scale<acc_t>(ss, p.normalize);
    if (lane == 0) {
      pr.n_inv[r] = rs.inv;
      pr.n_proj[r] = rs.proj;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Logit tile: acc[a][b] = (s a_hat_{i0 + ty + 16a}) . n_hat_{k0 + tx + 16b}, by a shared-memory tiled GEMM over d,
// the bank rows scaled by their inverse norms as they are loaded (the raw product, scaled after, overflowed for a row
// of norm ~1e37, or ~1e19 at s = 1e20, where the logit is finite). Rows past B and bank rows past k_end: zeros.
// ---------------------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t, int BA>
__device__ __forceinline__ void logit_tile(const Problem& p, const acc_t* as, const acc_t* n_inv, int64_t i0,
                                           int64_t k0, int64_t k_end, acc_t (*a_s)[BA + 1], acc_t (*n_s)[BA + 1],
                                           acc_t (&acc)[BA / 16][BA / 16]) {
  constexpr int R = BA / 16;
  const scalar_t* bank = static_cast<const scalar_t*>(p.negatives);
  const int64_t s0 = p.negatives_stride[0], s1 = p.negatives_stride[1], d = p.d;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
#pragma unroll
  for (int a = 0; a < R; ++a)
#pragma unroll
    for (int b = 0; b < R; ++b) acc[a][b] = 0;
  for (int64_t j0 = 0; j0 < d; j0 += kBD) {
    __syncthreads();  // the previous step's readers of a_s / n_s are done
    for (int e = tid; e < BA * kBD; e += kThreads) {
      const int r = e / kBD, c = e % kBD;
      const int64_t i = i0 + r, j = j0 + c;
      a_s[c][r] = (i < p.B && j < d) ? as[i * d + j] : acc_t(0);
      const int64_t k = k0 + r;
      n_s[c][r] = (k < k_end && j < d) ? to_acc<acc_t>(bank[k * s0 + j * s1]) * n_inv[k] : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < kBD; ++jj) {
      acc_t af[R], nf[R];
#pragma unroll
      for (int a = 0; a < R; ++a) af[a] = a_s[jj][ty + 16 * a];
#pragma unroll
      for (int b = 0; b < R; ++b) nf[b] = n_s[jj][tx + 16 * b];
#pragma unroll
      for (int a = 0; a < R; ++a)
#pragma unroll
        for (int b = 0; b < R; ++b) acc[a][b] += af[a] * nf[b];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------

// Shared bank: p's negative_mask and labels (device_common.cuh's left_out tests an entry).
__host__ __device__ __forceinline__ LeftOut left_out_of(const Problem& p) {
  LeftOut o;
  o.keep = p.keep;
  o.keep_stride[0] = p.keep_stride[0];
  o.keep_stride[1] = p.keep_stride[1];
  o.labels = p.labels;
  o.bank_labels = p.bank_labels;
  return o;
}

// Sets the entries of a (BA x BK) tile in shared memory (anchors i0.., bank rows k0.. < k_end) that the mask or the
// labels leave out to value: a pass of its own after the tile is written, only where a mask or labels exist, so that
// the register-heavy loop that writes the tile carries no extra condition (ptxas spilled there with both in it).
template <typename acc_t, int BA, int BK>
__device__ __forceinline__ void clear_left_out(const Problem& p, acc_t (*tile)[BK + 1], int64_t i0, int64_t k0,
                                               int64_t k_end, acc_t value) {
  const LeftOut o = left_out_of(p);
  if (!o.any()) return;  // (uniform over the block)
  __syncthreads();
  for (int e = threadIdx.x; e < BA * BK; e += kThreads) {
    const int r = e / BK, col = e % BK;
    const int64_t i = i0 + r, k = k0 + col;
    if (i < p.B && k < k_end && left_out(o, i, k)) tile[r][col] = value;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_shared_kernel(const Problem p, const ForwardWork<acc_t> w, const ForwardPlan f) {
  constexpr int BA = Tile<acc_t>::BA, BK = BA, R = BA / 16;
  CB_SHARED(acc_t, a_s, [kBD][BA + 1]);
  CB_SHARED(acc_t, n_s, [kBD][BA + 1]);
  CB_SHARED(acc_t, l_s, [BA][BK + 1]);  // logits, then softmax numerators times 1/||n_k||
  CB_SHARED(acc_t, v_s, [BK][BK + 1]);  // bank rows x feature chunk, for V
  CB_SHARED(acc_t, row_max, [BA]);
  CB_SHARED(acc_t, row_sum, [BA]);
  CB_SHARED(acc_t, row_alpha, [BA]);
  CB_SHARED(acc_t, col_inv, [BK]);

  const scalar_t* bank = static_cast<const scalar_t*>(p.negatives);
  const int64_t s0 = p.negatives_stride[0], s1 = p.negatives_stride[1];
  const int64_t B = p.B, K = p.K, d = p.d;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16, lane = tid % 32, warp = tid / 32;
  const bool save = w.part_w != nullptr;
  const acc_t ninf = neg_infinity<acc_t>();
  const int64_t units = f.units_per_chunk_row * f.chunks;

  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t blk = u / f.chunks, c = u % f.chunks;
    const int64_t i0 = blk * BA;
    const int64_t k_begin = min64(K, c * f.chunk_len), k_end = min64(K, k_begin + f.chunk_len);
    if (tid < BA) {
      row_max[tid] = ninf;
      row_sum[tid] = 0;
    }
    acc_t* wpart = save ? w.part_w + c * B * d : nullptr;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
      if (tid < BK) col_inv[tid] = (k0 + tid < k_end) ? w.pr.n_inv[k0 + tid] : acc_t(1);
      __syncthreads();
      acc_t acc[R][R];
      logit_tile<scalar_t, acc_t, BA>(p, w.pr.as, w.pr.n_inv, i0, k0, k_end, a_s, n_s, acc);
#pragma unroll
      for (int a = 0; a < R; ++a) {
        const int64_t i = i0 + ty + 16 * a;
        const int64_t ex = excluded_row(p.exclude_self, p.excluded, i, B);  // -1: none
#pragma unroll
        for (int b = 0; b < R; ++b) {
          const int col = tx + 16 * b;
          const bool self = ex == k0 + col;
          l_s[ty + 16 * a][col] = k0 + col < k_end && !self ? acc[a][b] : ninf;
        }
      }
      clear_left_out<acc_t, BA, BK>(p, l_s, i0, k0, k_end, ninf);  // (negative_mask, labels)
      __syncthreads();
      // Online log-sum-exp: one warp per anchor row of the tile.
      for (int r = warp; r < BA; r += kWarps) {
        acc_t m = ninf;
        for (int col = lane; col < BK; col += 32) m = max_of(m, l_s[r][col]);
        m = warp_max(m);
        const acc_t old = row_max[r];
        const acc_t nm = max_of(old, m);
        acc_t alpha = 1, sum = 0;
        if (nm == ninf) {
          for (int col = lane; col < BK; col += 32) l_s[r][col] = 0;
        } else {
          alpha = rescale_factor(old, nm);
          for (int col = lane; col < BK; col += 32) {
            const acc_t e = std::exp(l_s[r][col] - nm);
            sum += e;
            l_s[r][col] = e * col_inv[col];  // V sums n_hat = n / ||n||
          }
        }
        sum = warp_sum(sum);
        if (lane == 0) {
          row_sum[r] = row_sum[r] * alpha + sum;
          row_max[r] = nm;
          row_alpha[r] = alpha;
        }
      }
      __syncthreads();
      if (save) {
        // V_part[i, j0:j0+BK] = alpha_i V_part[i, ...] + sum_k P[i, k] n[k, j0:j0+BK]
        for (int64_t j0 = 0; j0 < d; j0 += BK) {
          for (int e = tid; e < BK * BK; e += kThreads) {
            const int kk = e / BK, cc = e % BK;
            const int64_t k = k0 + kk, j = j0 + cc;
            v_s[kk][cc] = (k < k_end && j < d) ? to_acc<acc_t>(bank[k * s0 + j * s1]) : acc_t(0);
          }
          __syncthreads();
          acc_t out[R][R];
#pragma unroll
          for (int a = 0; a < R; ++a)
#pragma unroll
            for (int b = 0; b < R; ++b) out[a][b] = 0;
          for (int kk = 0; kk < BK; ++kk) {
            acc_t pf[R], vf[R];
#pragma unroll
            for (int a = 0; a < R; ++a) pf[a] = l_s[ty + 16 * a][kk];
#pragma unroll
            for (int b = 0; b < R; ++b) vf[b] = v_s[kk][tx + 16 * b];
#pragma unroll
            for (int a = 0; a < R; ++a)
#pragma unroll
              for (int b = 0; b < R; ++b) out[a][b] += pf[a] * vf[b];
          }
#pragma unroll
          for (int a = 0; a < R; ++a) {
            const int r = ty + 16 * a;
            const int64_t i = i0 + r;
            if (i >= B) continue;
#pragma unroll
            for (int b = 0; b < R; ++b) {
              const int64_t j = j0 + tx + 16 * b;
              if (j >= d) continue;
              acc_t* dst = wpart + i * d + j;
              // The first tile of the chunk initialises (the scratch is uninitialised memory).
              *dst = (k0 == k_begin ? acc_t(0) : *dst * row_alpha[r]) + out[a][b];
            }
          }
          __syncthreads();  // before v_s is reloaded
        }
      }
      __syncthreads();  // l_s, col_inv and the row state are reused by the next tile
    }
    if (tid < BA && i0 + tid < B) {
      w.part_max[c * B + i0 + tid] = row_max[tid];
      w.part_sum[c * B + i0 + tid] = row_sum[tid];
    }
    __syncthreads();  // before the next unit resets the row state
  }
}

// Per-anchor (PerAnchor) and gathered (Indexed) negatives: one block per (anchor, chunk).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_rows_kernel(const Problem p, const ForwardWork<acc_t> w, const ForwardPlan f) {
  CB_SHARED(acc_t, t_l, [kRowTile]);
  CB_SHARED(acc_t, t_inv, [kRowTile]);
  CB_SHARED(int64_t, t_off, [kRowTile]);
  CB_SHARED(acc_t, st_max, );
  CB_SHARED(acc_t, st_sum, );
  CB_SHARED(acc_t, st_alpha, );

  const scalar_t* n = static_cast<const scalar_t*>(p.negatives);
  const int64_t s0 = p.negatives_stride[0], s1 = p.negatives_stride[1], s2 = p.negatives_stride[2];
  const int64_t sj = p.mode == Mode::PerAnchor ? s2 : s1;  // feature stride
  const int64_t B = p.B, K = p.K, d = p.d;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const bool save = w.part_w != nullptr;
  const acc_t ninf = neg_infinity<acc_t>();
  const int64_t units = B * f.chunks;

  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t i = u / f.chunks, c = u % f.chunks;
    const int64_t k_begin = min64(K, c * f.chunk_len), k_end = min64(K, k_begin + f.chunk_len);
    const acc_t* ai = w.pr.as + i * d;
    acc_t* wi = save ? w.part_w + (c * B + i) * d : nullptr;
    if (tid == 0) {
      st_max = ninf;
      st_sum = 0;
    }
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kRowTile) {
      const int tk = static_cast<int>(min64(kRowTile, k_end - k0));
      for (int t = warp; t < tk; t += kWarps) {  // warp-uniform
        const int64_t k = k0 + t;
        int64_t off, m = 0;
        if (p.mode == Mode::PerAnchor) {
          off = i * s0 + k * s1;
        } else {
          m = p.indices[i * p.indices_stride[0] + k * p.indices_stride[1]];
          if (m < 0) {  // padding (-1): no negative, a logit of -inf (weight 0); no row is read (t_off < 0)
            if (lane == 0) {
              t_l[t] = ninf;
              t_inv[t] = 0;
              t_off[t] = -1;
            }
            continue;  // warp-uniform: every lane read the same index
          }
          off = m * s0;
        }
        acc_t dot = 0, ss = 0;
        for (int64_t j = lane; j < d; j += 32) {
          const acc_t x = to_acc<acc_t>(n[off + j * sj]);
          dot += ai[j] * x;
          ss += x * x;
        }
        dot = warp_sum(dot);
        acc_t inv;
        if (p.mode == Mode::PerAnchor) {
          inv = row_scale<acc_t>(warp_sum(ss), p.normalize).inv;
        } else {
          inv = w.pr.n_inv[m];
        }
        const acc_t l = rows_dot_scaled<scalar_t, acc_t>(dot, ai, n + off, sj, d, inv);
        if (lane == 0) {
          t_l[t] = l;
          t_inv[t] = inv;
          t_off[t] = off;
        }
      }
      __syncthreads();
      if (warp == 0) {
        acc_t mx = ninf;
        for (int t = lane; t < tk; t += 32) mx = max_of(mx, t_l[t]);
        mx = warp_max(mx);
        const acc_t old = st_max;
        const acc_t nm = max_of(old, mx);
        acc_t alpha = 1, sum = 0;
        if (nm == ninf) {
          for (int t = lane; t < tk; t += 32) t_l[t] = 0;
        } else {
          alpha = rescale_factor(old, nm);
          for (int t = lane; t < tk; t += 32) {
            const acc_t e = std::exp(t_l[t] - nm);
            sum += e;
            t_l[t] = e * t_inv[t];
          }
        }
        sum = warp_sum(sum);
        if (lane == 0) {
          st_sum = st_sum * alpha + sum;
          st_max = nm;
          st_alpha = alpha;
        }
      }
      __syncthreads();
      if (save) {
        const acc_t alpha = st_alpha;
        for (int64_t j = tid; j < d; j += kThreads) {  // thread j owns feature j of the partial V
          // the tile's sum apart, then added (as the CPU kernel): added term by term to the chunk's running sum,
          // an anchor's K hits of one row stagnated in float32 (2.4e-5 of V at K = 4000, emulated)
          acc_t v = 0;
          for (int t = 0; t < tk; ++t) {
            if (t_off[t] >= 0) v += t_l[t] * to_acc<acc_t>(n[t_off[t] + j * sj]);
          }
          wi[j] = (k0 == k_begin) ? v : wi[j] * alpha + v;
        }
      }
      __syncthreads();
    }
    if (tid == 0) {
      w.part_max[c * B + i] = st_max;
      w.part_sum[c * B + i] = st_sum;
    }
    __syncthreads();
  }
}

// One block per anchor: merge the chunk states in chunk order, add the positive, finish loss, lse and V.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_merge_kernel(const Problem p, const ForwardWork<acc_t> w, const ForwardPlan f, acc_t* loss, acc_t* lse,
                         acc_t* v) {
  const int64_t B = p.B, d = p.d;
  for (int64_t i = blockIdx.x; i < B; i += gridDim.x) {
    LseState<acc_t> st, neg;  // with the positive (lse, V); the negatives alone (the loss: softplus_loss)
    if (p.include_positive) {
      st.max = w.pr.pos[i];
      st.sum = 1;
    }
    acc_t* vi = v != nullptr ? v + i * d : nullptr;
    if (vi != nullptr)
      for (int64_t j = threadIdx.x; j < d; j += blockDim.x) vi[j] = 0;
    for (int64_t c = 0; c < f.chunks; ++c) {
      LseState<acc_t> b;
      b.max = w.part_max[c * B + i];
      b.sum = w.part_sum[c * B + i];
      acc_t fa, fb;
      merge(st, b, fa, fb);  // every thread computes the same state
      if (vi != nullptr) {
        const acc_t* wc = w.part_w + (c * B + i) * d;
        for (int64_t j = threadIdx.x; j < d; j += blockDim.x) vi[j] = vi[j] * fa + wc[j] * fb;
      }
      if (p.include_positive) merge(neg, b, fa, fb);
    }
    if (threadIdx.x == 0) {
      lse[i] = finalize(st);
      loss[i] = p.include_positive ? softplus_loss(neg, w.pr.pos[i]) : finalize_minus(st, w.pr.pos[i]);
    }
    if (vi != nullptr) {
      const acc_t inv_sum = st.sum > acc_t(0) ? acc_t(1) / st.sum : acc_t(0);  // no negatives: V = 0
      for (int64_t j = threadIdx.x; j < d; j += blockDim.x) vi[j] *= inv_sum;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

// One block per anchor: gradients of anchors and positives (only lse, V and the positive logit are needed).
//   G_a = g s [(w0 - 1) p_hat + V],  dA = inv_a G_a - (a_hat . G_a) proj_a a
//   G_p = g s (w0 - 1) a_hat,         dP = inv_p G_p - (p_hat . G_p) proj_p p,   w0 = [incl] e^{l_0 - lse}
// and w0 - 1 = expm1(-loss) where forward's loss is given.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    anchor_grads_kernel(const Problem p, const Prepared<acc_t> pr, const acc_t* g, const acc_t* lse,
                        const acc_t* loss, const acc_t* v, scalar_t* ga, scalar_t* gp) {
  CB_SHARED(acc_t, red, [kWarps]);
  const scalar_t* a = static_cast<const scalar_t*>(p.anchors);
  const scalar_t* q = static_cast<const scalar_t*>(p.positives);
  const int64_t d = p.d, as0 = p.anchors_stride[0], as1 = p.anchors_stride[1];
  const int64_t ps0 = p.positives_stride[0], ps1 = p.positives_stride[1];
  const acc_t s = read_scale(static_cast<const acc_t*>(p.scale));
  for (int64_t i = blockIdx.x; i < p.B; i += gridDim.x) {
    const acc_t gi = g[i];
    const acc_t w0m1 = !p.include_positive ? acc_t(-1)
                       : loss != nullptr  ? std::expm1(-loss[i])
                                          : std::exp(pr.pos[i] - lse[i]) - acc_t(1);
    const acc_t gs = gi * s, coef = gs * w0m1;
    // a_hat from the raw row, not pr.as / s: products of as and s-scaled terms form s^2, which leaves float32 for
    // s beyond ~2e19 or below ~1e-19 (temperatures the op accepts). p_hat from the raw row too, as prepare_kernel
    // forms it (the same bits; no (B, d) copy in the workspace).
    const acc_t a_inv = pr.a_inv[i], p_inv = pr.p_inv[i];
    const auto p_hat = [&](int64_t j) { return to_acc<acc_t>(q[i * ps0 + j * ps1]) * p_inv; };
    if (ga != nullptr) {
      const acc_t* vi = v + i * d;
      acc_t part = 0;
      for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
        part += to_acc<acc_t>(a[i * as0 + j * as1]) * a_inv * (w0m1 * p_hat(j) + vi[j]);
      }
      const acc_t ahat_dot_g = gs * block_sum(part, red);
      const acc_t proj = pr.a_proj[i];  // radial term as (a_hat . G) (proj a_j): row_scale
      for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
        const acc_t gj = gs * (w0m1 * p_hat(j) + vi[j]);
        ga[i * d + j] = from_acc<scalar_t>(a_inv * gj - ahat_dot_g * (proj * to_acc<acc_t>(a[i * as0 + j * as1])));
      }
    }
    if (gp != nullptr) {
      const acc_t phat_dot_g = gi * w0m1 * pr.pos[i];  // p_hat . G_p, pos = s a_hat . p_hat
      const acc_t inv = p_inv, proj = pr.p_proj[i];
      for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
        const acc_t gj = coef * (to_acc<acc_t>(a[i * as0 + j * as1]) * a_inv);
        gp[i * d + j] = from_acc<scalar_t>(inv * gj - phat_dot_g * (proj * to_acc<acc_t>(q[i * ps0 + j * ps1])));
      }
    }
  }
}

// Shared bank. Grid (grid_x, splits). Direct (one split): block x owns bank tiles x, x + grid_x, ... and a
// scratch slot of BK x d; it finishes each tile itself. Split: block (t, y) accumulates tile t over split y's
// anchor blocks into partial slot (y, t); finish_bank_kernel sums the splits.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_bank_kernel(const Problem p, const Prepared<acc_t> pr, const acc_t* g, const acc_t* lse,
                         acc_t* scratch, const BankPlan bp, scalar_t* grad) {
  constexpr int BA = Tile<acc_t>::BA, BK = BA, R = BA / 16;
  CB_SHARED(acc_t, a_s, [kBD][BA + 1]);
  CB_SHARED(acc_t, n_s, [kBD][BA + 1]);
  CB_SHARED(acc_t, w_s, [BA][BK + 1]);  // W = g exp(l - lse) of the anchor block x bank tile
  CB_SHARED(acc_t, a2_s, [BA][BK + 1]);  // anchors x feature chunk
  CB_SHARED(acc_t, col_inv, [BK]);

  const scalar_t* bank = static_cast<const scalar_t*>(p.negatives);
  const int64_t s0 = p.negatives_stride[0], s1 = p.negatives_stride[1];
  const int64_t B = p.B, K = p.K, d = p.d;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16, warp = tid / 32;
  const int64_t anchor_blocks = ceil_div(B, BA);
  const int64_t y = blockIdx.y;
  const int64_t ab_begin = min64(anchor_blocks, y * bp.blocks_per_split);
  const int64_t ab_end = min64(anchor_blocks, ab_begin + bp.blocks_per_split);

  for (int64_t t = blockIdx.x; t < bp.tiles; t += gridDim.x) {
    const int64_t k0 = t * BK, k_end = min64(K, k0 + BK);
    acc_t* G = bp.direct ? scratch + int64_t(blockIdx.x) * BK * d : scratch + (y * bp.tiles + t) * BK * d;
    if (tid < BK) col_inv[tid] = (k0 + tid < k_end) ? pr.n_inv[k0 + tid] : acc_t(1);
    // An empty split (possible only when B == 0) still leaves a zero partial behind.
    if (ab_begin == ab_end)
      for (int64_t e = tid; e < int64_t(BK) * d; e += kThreads) G[e] = 0;
    __syncthreads();
    for (int64_t ab = ab_begin; ab < ab_end; ++ab) {
      const int64_t i0 = ab * BA;
      acc_t acc[R][R];
      logit_tile<scalar_t, acc_t, BA>(p, pr.as, pr.n_inv, i0, k0, k_end, a_s, n_s, acc);
#pragma unroll
      for (int a = 0; a < R; ++a) {
        const int r = ty + 16 * a;
        const int64_t i = i0 + r;
        const int64_t ex = excluded_row(p.exclude_self, p.excluded, i, B);  // -1: none
#pragma unroll
        for (int b = 0; b < R; ++b) {
          const int col = tx + 16 * b;
          const bool keep = i < B && k0 + col < k_end && ex != k0 + col;
          w_s[r][col] = keep ? g[i] * std::exp(acc[a][b] - lse[i]) : acc_t(0);
        }
      }
      clear_left_out<acc_t, BA, BK>(p, w_s, i0, k0, k_end, acc_t(0));  // (negative_mask, labels)
      __syncthreads();
      // G[k, j0:j0+BK] (+)= sum_i W[i, k] (s a_hat_i)[j0:j0+BK]   (dL/dn_hat_k)
      for (int64_t j0 = 0; j0 < d; j0 += BK) {
        for (int e = tid; e < BA * BK; e += kThreads) {
          const int r = e / BK, cc = e % BK;
          const int64_t i = i0 + r, j = j0 + cc;
          a2_s[r][cc] = (i < B && j < d) ? pr.as[i * d + j] : acc_t(0);
        }
        __syncthreads();
        acc_t out[R][R];
#pragma unroll
        for (int a = 0; a < R; ++a)
#pragma unroll
          for (int b = 0; b < R; ++b) out[a][b] = 0;
        for (int r = 0; r < BA; ++r) {
          acc_t wf[R], af[R];
#pragma unroll
          for (int a = 0; a < R; ++a) wf[a] = w_s[r][ty + 16 * a];
#pragma unroll
          for (int b = 0; b < R; ++b) af[b] = a2_s[r][tx + 16 * b];
#pragma unroll
          for (int a = 0; a < R; ++a)
#pragma unroll
            for (int b = 0; b < R; ++b) out[a][b] += wf[a] * af[b];
        }
#pragma unroll
        for (int a = 0; a < R; ++a) {
          const int kk = ty + 16 * a;  // every row of the slot, also past k_end (zeros there)
#pragma unroll
          for (int b = 0; b < R; ++b) {
            const int64_t j = j0 + tx + 16 * b;
            if (j >= d) continue;
            acc_t* dst = G + int64_t(kk) * d + j;
            *dst = (ab == ab_begin ? acc_t(0) : *dst) + out[a][b];
          }
        }
        __syncthreads();  // before a2_s is reloaded / w_s is rewritten
      }
    }
    if (bp.direct) {
      __syncthreads();  // G written by all threads of the block (global memory, visible after the barrier)
      for (int r = warp; r < BK; r += kWarps) {
        const int64_t k = k0 + r;
        if (k >= k_end) continue;
        finish_bank_row<scalar_t, acc_t>(G + int64_t(r) * d, 0, 1, bank + k * s0, s1, d, pr.n_inv[k], pr.n_proj[k],
                                         grad + k * d);
      }
    }
    __syncthreads();  // G and col_inv are reused by the next tile
  }
}

// Split path: one warp per bank row sums the partials (split order) and finishes the row.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    finish_bank_kernel(const Problem p, const Prepared<acc_t> pr, const acc_t* scratch, const BankPlan bp,
                       scalar_t* grad) {
  const scalar_t* bank = static_cast<const scalar_t*>(p.negatives);
  const int64_t s0 = p.negatives_stride[0], s1 = p.negatives_stride[1], d = p.d;
  const int64_t BK = Tile<acc_t>::BA;
  const int64_t stride = bp.tiles * BK * d;  // between splits: slot (y, t) row r is (y * tiles * BK + k) * d
  const int64_t warps = int64_t(gridDim.x) * kWarps;
  for (int64_t k = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; k < p.K; k += warps) {
    finish_bank_row<scalar_t, acc_t>(scratch + k * d, stride, bp.splits, bank + k * s0, s1, d, pr.n_inv[k],
                                     pr.n_proj[k], grad + k * d);
  }
}

// Per-anchor negatives: one warp per (i, k); that row's gradient is
//   dL/dn_ik = w inv s a_hat_i - w l proj n_ik,  w = g_i e^{l - lse_i}.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_rows_kernel(const Problem p, const Prepared<acc_t> pr, const acc_t* g, const acc_t* lse, scalar_t* grad) {
  const scalar_t* n = static_cast<const scalar_t*>(p.negatives);
  const int64_t s0 = p.negatives_stride[0], s1 = p.negatives_stride[1], s2 = p.negatives_stride[2];
  const int64_t K = p.K, d = p.d, pairs = p.B * p.K;
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * kWarps;
  for (int64_t q = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; q < pairs; q += warps) {
    const int64_t i = q / K, k = q % K;
    const scalar_t* row = n + i * s0 + k * s1;
    const acc_t* ai = pr.as + i * d;
    acc_t dot = 0, ss = 0;
    for (int64_t j = lane; j < d; j += 32) {
      const acc_t x = to_acc<acc_t>(row[j * s2]);
      dot += ai[j] * x;
      ss += x * x;
    }
    dot = warp_sum(dot);
    ss = warp_sum(ss);
    const RowScale<acc_t> rs = row_scale<acc_t>(ss, p.normalize);
    const acc_t l = rows_dot_scaled<scalar_t, acc_t>(dot, ai, row, s2, d, rs.inv);
    const acc_t wgt = g[i] * std::exp(l - lse[i]);
    const acc_t wl = wgt * l;  // radial term as (w l) (proj n_j): row_scale
    scalar_t* out = grad + q * d;
    for (int64_t j = lane; j < d; j += 32) {
      out[j] = from_acc<scalar_t>(wgt * rs.inv * ai[j] - wl * (rs.proj * to_acc<acc_t>(row[j * s2])));
    }
  }
}

__device__ __forceinline__ int64_t lower_bound(const int64_t* x, int64_t n, int64_t v) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (x[mid] < v) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Indexed bank: anchor i's c hits of row m add c w_im a_i to the warp's accumulator G (the logit depends on (i, m)
// only, so the hits carry equal terms; added hit by hit, K hits of one row stagnated in float32: 2e-2 of the
// gradient lost at K = 10^6 on the CPU, which counts them the same way).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void add_anchor_hits(const Prepared<acc_t>& pr, const acc_t* g, const acc_t* lse,
                                                const scalar_t* row, int64_t s1, int64_t d, acc_t inv, int64_t i,
                                                int64_t c, int lane, acc_t* G, bool& first) {
  const acc_t* ai = pr.as + i * d;
  acc_t dot = 0;
  for (int64_t j = lane; j < d; j += 32) dot += ai[j] * to_acc<acc_t>(row[j * s1]);
  const acc_t l = rows_dot_scaled<scalar_t, acc_t>(warp_sum(dot), ai, row, s1, d, inv);
  const acc_t wgt = static_cast<acc_t>(c) * (g[i] * std::exp(l - lse[i]));
  for (int64_t j = lane; j < d; j += 32) G[j] = (first ? acc_t(0) : G[j]) + wgt * ai[j];
  first = false;
}

// Indexed bank: one warp per bank row m over its run [lo, hi) of the stably sorted indices (of every piece of
// sort_chunk entries in turn, BackwardArgs::sort_chunk), so the pairs that hit m come in increasing flat order
// (i * K + k) and an anchor's hits are adjacent (across pieces too): each anchor's are counted and added once
// (add_anchor_hits), anchors in increasing order, so that pieces give the one-piece bits. Deterministic, no
// atomics. Scratch: d per warp.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_indexed_kernel(const Problem p, const Prepared<acc_t> pr, const acc_t* g, const acc_t* lse,
                            const int64_t* sorted_rows, const int64_t* sorted_pairs, int64_t sort_chunk,
                            acc_t* scratch, scalar_t* grad) {
  const scalar_t* n = static_cast<const scalar_t*>(p.negatives);
  const int64_t s0 = p.negatives_stride[0], s1 = p.negatives_stride[1];
  const int64_t K = p.K, d = p.d, pairs = p.B * p.K;
  const int lane = threadIdx.x % 32;
  const int64_t warp_id = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t warps = int64_t(gridDim.x) * kWarps;
  acc_t* G = scratch + warp_id * d;
  const int64_t piece = sort_chunk > 0 ? sort_chunk : pairs;
  for (int64_t m = warp_id; m < p.rows; m += warps) {
    const scalar_t* row = n + m * s0;
    scalar_t* out = grad + m * d;
    const acc_t inv = pr.n_inv[m];
    bool first = true;  // G holds nothing yet
    int64_t anchor = -1, hits = 0;  // the anchor whose hits are being counted, and how many so far
    for (int64_t c0 = 0; c0 < pairs; c0 += piece) {
      const int64_t len = min64(piece, pairs - c0);
      const int64_t lo = c0 + lower_bound(sorted_rows + c0, len, m);
      const int64_t hi = c0 + lower_bound(sorted_rows + c0, len, m + 1);
      for (int64_t e = lo; e < hi;) {
        // anchor i's hits in this piece end where the flat index reaches (i + 1) K: a binary search, not a walk
        // over them (a row hit 10^7 times by one anchor)
        const int64_t i = sorted_pairs[e] / K;
        const int64_t next = e + lower_bound(sorted_pairs + e, hi - e, (i + 1) * K);
        if (i != anchor) {
          if (hits > 0) add_anchor_hits<scalar_t, acc_t>(pr, g, lse, row, s1, d, inv, anchor, hits, lane, G, first);
          anchor = i;
          hits = 0;
        }
        hits += next - e;
        e = next;
      }
    }
    if (hits > 0) add_anchor_hits<scalar_t, acc_t>(pr, g, lse, row, s1, d, inv, anchor, hits, lane, G, first);
    if (first) {
      for (int64_t j = lane; j < d; j += 32) out[j] = from_acc<scalar_t>(acc_t(0));
      continue;
    }
    finish_bank_row<scalar_t, acc_t>(G, 0, 1, row, s1, d, inv, pr.n_proj[m], out);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Tensor cores (shared bank; float16 / bfloat16, float32 as TF32 when allowed): info_nce_tc.cuh
// ---------------------------------------------------------------------------------------------------------

#include "info_nce_tc.cuh"
#include "info_nce_flash.cuh"
#include "info_nce_wgmma.cuh"

// ---------------------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------------------

dim3 grid_for(int64_t units) { return dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min(units, kMaxGrid)))); }

template <typename scalar_t, typename acc_t>
void launch_prepare(const Problem& p, const Prepared<acc_t>& pr, cudaStream_t stream) {
  if (p.B > 0) CB_LAUNCH(grid_for(p.B), kThreads, 0, stream, prepare_kernel<scalar_t, acc_t>)(p, pr);
  if (p.mode != Mode::PerAnchor && p.rows > 0) {
    CB_LAUNCH(grid_for(ceil_div(p.rows, kWarps)), kThreads, 0, stream, bank_scales_kernel<scalar_t, acc_t>)(p, pr);
  }
}

template <typename T>
struct TcType : std::false_type {};
template <>
struct TcType<__half> : std::true_type {};
template <>
struct TcType<__nv_bfloat16> : std::true_type {};
template <>
struct TcType<float> : std::true_type {};

inline bool tc_use_mma();

// Widest rows the tensor cores take (float16/bfloat16, mma.sync kernels). Each rows pass costs (slices + 1) / 2
// times its one-slice flop (slices = ceil(d / 256)): 4.5x at d = 2048, where the tensor cores' rate (~6x the SIMT
// kernels' in the H200 figures, README) still wins by a modelled ~1.5x; not measured.
constexpr int64_t kTcMaxWideD = 2048;

// Rows wider than kTcMaxD that the mma.sync kernels copy in chunks of kTcSliceD features (mma_tile_scores): where
// whole X and Y tiles do not fit in a block's shared memory on this device, or where chunks keep more blocks per
// multiprocessor than whole rows (tc_prefer_chunked: d > 384 on an H100 / H200). CONTRASTBOUND_TC_CHUNKED=1
// chooses chunks for every d > kTcMaxD, =0 whole rows wherever they fit (the default before 2026-12-04).
inline bool tc_chunked(int64_t d) {
  if (d <= kTcMaxD) return false;
  const char env = env_switch(EnvSwitch::TcChunked);
  if (env == '1') return true;
  const size_t whole = tc_smem<__half>(d, true, 1, /*score_tile=*/false).total;
  if (whole > static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin))) return true;
  if (env == '0') return false;
  const size_t chunked = tc_smem<__half>(d, true, 1, /*score_tile=*/false, kTcSliceD).total;
  return tc_prefer_chunked(whole, chunked,
                           static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor)));
}

// Whether the tensor-core kernels serve this problem (else the SIMT kernels above). d <= kTcMaxD on every
// tensor-core kernel; wider rows, up to kTcMaxWideD (float16/bfloat16), on the mma.sync ones, which split each
// rows pass into slices of kTcSliceD features; whole rows where one X and one Y tile of them fit in shared memory
// (d <= 848 on an H100 / H200, 592 on an A100, 336 on 99 KiB parts such as sm_86), else in chunks.
// A negative_mask or labels go to the mma.sync / WMMA kernels' LEFT_OUT instances (TcLseArgs::lo, TcRowsArgs::lo);
// the flash and wgmma kernels test them in fl_coefficients (FlArgs::keep_bits: the mask packed into bits per launch
// by fl_left_out; FlArgs::x_labels, y_labels).
bool use_tc(const Problem& p) {
  if (!p.tensor_cores || p.mode != Mode::Shared || p.d < 1) return false;
  if (p.dtype == DType::Float64 || (p.dtype == DType::Float32 && !p.tf32)) return false;
  const bool wide = p.d > kTcMaxD;
  if (wide && (p.dtype == DType::Float32 || !tc_use_mma() || p.d > kTcMaxWideD)) return false;
  if (device_attribute(cudaDevAttrComputeCapabilityMajor) < 8 || !device_runs_tc_code()) return false;
  const int chunk = tc_chunked(p.d) ? kTcSliceD : 0;
  const size_t need = p.dtype == DType::Float32 ? tc_smem<float>(p.d, true).total
                      : wide ? tc_smem<__half>(p.d, true, 1, /*score_tile=*/false, chunk).total
                             : tc_smem<__half>(p.d, true).total;
  return need <= static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
}

// Y-tile stages (1: copy, then compute; 2: the next tile's copy overlaps the current tile's work; more shared
// memory). CONTRASTBOUND_TC_STAGES=1|2 chooses; 2 only where it fits. Default: kTcDefaultStages (one: on the
// H200 two stages were slower where they cost a block per multiprocessor), except for whole rows wider than
// kTcMaxD, whose one-stage tiles already leave a single block per multiprocessor from d ~ 400 on an H100 /
// H200: there two stages where they fit and keep as many blocks (shared memory per multiprocessor / per block,
// 1 KiB reserved per block), so the copy of the next Y tile overlaps the work on this one (d <= 560 there).
template <typename T>
int tc_stages(int64_t d, bool with_p, bool score_tile) {
  const char env = env_switch(EnvSwitch::TcStages);
  const int forced = (env == '1' || env == '2') ? env - '0' : 0;
  const size_t optin = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  const size_t two = tc_smem<T>(d, with_p, 2, score_tile).total;
  if (two > optin) return 1;
  if (forced != 0) return forced;
  if (!score_tile && d > kTcMaxD) {
    const size_t per_sm = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor));
    const size_t one = tc_smem<T>(d, with_p, 1, score_tile).total;
    if (per_sm / (two + 1024) >= per_sm / (one + 1024)) return 2;
  }
  return kTcDefaultStages;
}

// float16/bfloat16: mma.sync + ldmatrix kernels (mma_*_kernel) unless CONTRASTBOUND_TC_MMA=0 asks for the WMMA
// ones (tc_*_kernel, which float32/TF32 always uses).
inline bool tc_use_mma() {
  return env_switch(EnvSwitch::TcMma) != '0';
}

// One-pass forward (mma_fwd_kernel) for float16/bfloat16 when the anchors' term is wanted:
// CONTRASTBOUND_TC_FUSED_FWD=1 (off by default: on an H200 it agreed with the default kernels in the benchmark and
// ran 1.27x faster than the two-pass forward's step, but its tests have not run there). Not with a negative_mask or labels, which
// it does not test (the lse and rows kernels serve them).
inline bool tc_fused_fwd(const Problem& p, bool save) {
  return save && p.dtype != DType::Float32 && p.d <= kTcMaxD && tc_use_mma() &&
         env_switch(EnvSwitch::TcFusedFwd) == '1' &&
         !left_out_of(p).any();
}

// Whether the mma.sync kernels (rather than the WMMA ones) serve element type T.
template <typename T>
bool tc_mma() {
  if constexpr (std::is_same<T, float>::value) {
    return false;
  } else {
    return tc_use_mma();
  }
}

// Shared-memory plan of the kernel that serves (T, d): with_p for the kernels with a second product (rows,
// one-pass forward); the WMMA kernels also hold the float32 score tile.
template <typename T>
TcSmem tc_kernel_smem(int64_t d, bool with_p) {
  const bool score_tile = !tc_mma<T>();
  if (!score_tile && tc_chunked(d)) return tc_smem<T>(d, with_p, 1, false, kTcSliceD);
  return tc_smem<T>(d, with_p, tc_stages<T>(d, with_p, score_tile), score_tile);
}

// Lets `kernel` launch with `bytes` of dynamic shared memory on the current device. The attribute is per (kernel,
// device) and shared by every host thread, so it is only ever raised: setting it to each launch's own size would
// let one thread lower it between another thread's setting and launch (a launch with a larger plan, e.g. another
// d, would then fail with cudaErrorInvalidValue). Raised under a lock, remembered per (kernel, device), so a
// launch whose size is already allowed makes no driver call.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  struct Entry {
    const void* kernel;
    int device;
    size_t bytes;
  };
  static std::mutex mutex;
  static std::vector<Entry> allowed;
  const void* key = reinterpret_cast<const void*>(kernel);
  const int device = current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  Entry* entry = nullptr;
  for (Entry& e : allowed)
    if (e.kernel == key && e.device == device) entry = &e;
  if (entry != nullptr && entry->bytes >= bytes) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  if (entry != nullptr) {
    entry->bytes = bytes;
  } else {
    allowed.push_back({key, device, bytes});
  }
  return cudaSuccess;
}

// Units of `kernel` resident at once: blocks per multiprocessor (registers, shared memory) x multiprocessors.
// 2 per multiprocessor (the kernels' launch bound) if the occupancy query fails. The answer depends only on
// (kernel, shared memory, device), so it is asked once per such triple (every forward and backward plans
// several passes, the workspace size and the launch alike).
template <typename Kernel>
int64_t tc_slots(Kernel kernel, size_t smem, int num_sms) {
  struct Entry {
    const void* kernel;
    size_t smem;
    int device, per_sm;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;
  const int device = current_device();
  const void* key = reinterpret_cast<const void*>(kernel);
  int per_sm = 0;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    for (const Entry& e : cache)
      if (e.kernel == key && e.smem == smem && e.device == device) per_sm = e.per_sm;
  }
  if (per_sm == 0) {
    if (allow_smem(kernel, smem) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kTcThreads, smem) != cudaSuccess) {
      cudaGetLastError();  // not sticky
      per_sm = 2;
    }
    per_sm = std::max(1, per_sm);
    const std::lock_guard<std::mutex> lock(mutex);
    cache.push_back({key, smem, device, per_sm});
  }
  return static_cast<int64_t>(per_sm) * std::max(1, num_sms);
}

// The kernel that serves the rows pass (anchor term, bank gradients) of T with shared-memory plan sm: mma.sync
// (tc_mma) or WMMA, whole rows or chunks, the instance that tests a negative_mask and labels where lo.
template <typename T>
auto tc_rows_kernel_for(const TcSmem& sm, bool lo) {
  if constexpr (!std::is_same<T, float>::value) {
    if (tc_mma<T>()) {
      return sm.chunk > 0 ? (lo ? mma_rows_kernel<T, true, true> : mma_rows_kernel<T, true>)
                          : (lo ? mma_rows_kernel<T, false, true> : mma_rows_kernel<T>);
    }
  }
  return lo ? tc_rows_kernel<T, true> : tc_rows_kernel<T>;
}

// The same for the forward's lse pass.
template <typename T>
auto tc_lse_kernel_for(const TcSmem& sm, bool lo) {
  if constexpr (!std::is_same<T, float>::value) {
    if (tc_mma<T>()) {
      return sm.chunk > 0 ? (lo ? mma_lse_kernel<T, true, true> : mma_lse_kernel<T, true>)
                          : (lo ? mma_lse_kernel<T, false, true> : mma_lse_kernel<T>);
    }
  }
  return lo ? tc_lse_kernel<T, true> : tc_lse_kernel<T>;
}

// The residency of the rows pass's kernel.
template <typename T>
int64_t tc_rows_slots(int64_t d, bool lo, int num_sms) {
  const TcSmem sm = tc_kernel_smem<T>(d, /*with_p=*/true);
  return tc_slots(tc_rows_kernel_for<T>(sm, lo), sm.total, num_sms);
}

// Warpgroup-MMA kernels for float16/bfloat16 on sm_90a: the default wherever they can run (compute capability 9.0
// and a build with 9.0a code). On an H200 (2026-12-04) they passed tests/test_cuda.py's wgmma cases and ran a
// bf16 step 1.5x faster than the mma.sync kernels in one process (B = 8192, K = 2^18, d = 256: 22.9 against 34.5 ms;
// 31 % against 20 % of the matmul rate). CONTRASTBOUND_TC_WGMMA=0 turns them off (the mma.sync kernels, or the flash ones with
// CONTRASTBOUND_TC_FLASH=1, serve); =1 asks for them and is an error where they cannot run (the glue's check). They
// replace the flash-layout kernels one for one (same work split, arguments and outputs), so everything below that
// plans for the flash kernels serves them too.
inline bool tc_wgmma() {
  if (env_switch(EnvSwitch::TcWgmma) == '0') return false;
  return tc_use_mma() && device_runs_sm90a();
}

// Flash-layout kernels (info_nce_flash.cuh) for float16/bfloat16: CONTRASTBOUND_TC_FLASH=1 (off by default: on an
// H200 they agreed with the default kernels in the benchmark's check and ran 1.4x faster than the mma.sync kernels,
// slower than wgmma; their tests have not run on a GPU), or their wgmma versions (tc_wgmma, the default on sm_90a). They take the bank pass and, when the anchors' term is
// wanted, a one-pass forward that forms it (so no anchor-term pass of theirs). Only where their one-stage plan for
// d fits the device's shared memory (it does not at d > 240 on 99 KiB parts such as sm_86 / sm_89): else the
// mma.sync kernels serve.
template <typename T>
bool tc_flash(int64_t d) {
  if constexpr (std::is_same<T, float>::value) {
    return false;
  } else {
    if (d > kTcMaxD || !tc_use_mma() || !(env_switch(EnvSwitch::TcFlash) == '1' || tc_wgmma())) return false;
    if (!device_runs_tc_code()) return false;
    const size_t need = tc_wgmma() ? wg_smem<T>(d).total : fl_smem<T>(d, 1).total;
    return need <= static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  }
}

// Whether the flash-layout kernels (or their wgmma versions) serve problem p; with a negative_mask or labels too
// (fl_coefficients tests them per score: FlArgs::keep_bits, x_labels, y_labels).
template <typename T>
bool tc_flash(const Problem& p) {
  return tc_flash<T>(p.d);
}

// Two Y stages unless CONTRASTBOUND_TC_STAGES=1 (one block per multiprocessor: nothing else hides the copies).
// (wgmma: always its three Y buffers, in its unpadded core-matrix layout; tc_flash checked that they fit.)
template <typename T>
TcSmem fl_kernel_smem(int64_t d) {
  if (tc_wgmma()) return wg_smem<T>(d);
  const auto plan = [&](int stages) { return fl_smem<T>(d, stages); };
  int stages = env_switch(EnvSwitch::TcStages) == '1' ? 1 : 2;
  if (stages == 2 && plan(2).total > static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin))) {
    stages = 1;
  }
  return plan(stages);
}

// f(kernel) for the flash-layout kernel (or its wgmma version) of (T, MODE) whose NT fits dpad. Lse: wgmma_kernel
// only (served where tc_wg_lse says so).
template <typename T, FlashMode MODE, typename F>
auto fl_with_kernel(int dpad, const F& f) {
  if constexpr (MODE == FlashMode::Lse) {
    return wg_with_nt(dpad, [&](auto nt) { return f(wgmma_kernel<T, MODE, decltype(nt)::value>); });
  } else {
    if (tc_wgmma()) return wg_with_nt(dpad, [&](auto nt) { return f(wgmma_kernel<T, MODE, decltype(nt)::value>); });
    return dpad <= 128 ? f(flash_kernel<T, MODE, 16>) : f(flash_kernel<T, MODE, 32>);
  }
}

template <typename T, FlashMode MODE>
int64_t fl_slots(int64_t d, int num_sms) {
  const TcSmem sm = fl_kernel_smem<T>(d);
  return fl_with_kernel<T, MODE>(sm.dpad, [&](auto kernel) { return tc_slots(kernel, sm.total, num_sms); });
}

#ifdef CONTRASTBOUND_WG_TIMING
// (wgmma_kernel's diagnostic timing, WgTiming: launched after each of its launches)
// Prints and clears the launch's totals (one thread).
__global__ void wg_timing_print_kernel(int mode) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const unsigned long long* v = wg_timing_total;
  printf("CB_WGT mode=%d warpgroups=%u units=%llu tiles=%llu cycles=%llu,%llu,%llu,%llu,%llu,%llu max=%u min=%u\n",
         mode, wg_timing_groups, v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], wg_timing_max, wg_timing_min);
  for (int f = 0; f < kWgTimingFields; ++f) wg_timing_total[f] = 0;
  wg_timing_groups = 0;
  wg_timing_max = 0;
  wg_timing_min = ~0u;
}
#endif

template <typename T, FlashMode MODE>
cudaError_t launch_flash(const TcOperand<T>& X, const TcOperand<T>& Y, const FlArgs& f, cudaStream_t stream) {
  const TcSmem sm = fl_kernel_smem<T>(f.d);
  const dim3 grid = grid_for(f.xblocks * f.splits);
  if (MODE == FlashMode::Lse && !tc_wgmma()) return cudaErrorInvalidValue;  // (wgmma_kernel's plan only)
  if (tc_wgmma() && sm.chunk != 0) return cudaErrorInvalidValue;  // wgmma_kernel's keep0 must be 0
  return fl_with_kernel<T, MODE>(sm.dpad, [&](auto kernel) {
    const cudaError_t e = allow_smem(kernel, sm.total);
    if (e == cudaSuccess) CB_LAUNCH(grid, kTcThreads, sm.total, stream, kernel)(X, Y, f, sm);
#ifdef CONTRASTBOUND_WG_TIMING
    if (e == cudaSuccess && tc_wgmma()) {
      CB_LAUNCH(dim3(1), 32, 0, stream, wg_timing_print_kernel)(static_cast<int>(MODE));
    }
#endif
    return e;
  });
}

// The forward without the anchors' term (no gradient, or none for the anchors) on the wgmma kernels' Lse walk
// (score products and the running max and sum, 2BKd flop) where they serve the one-pass forward and
// CONTRASTBOUND_TC_WG_LSE=1 asks for it; else the lse pass of the mma.sync / WMMA kernels. Opt-in until its tests
// have run on a GPU (it passes the CPU emulation only), as the flash and one-pass kernels were: on the H200 the
// mma.sync lse pass took 6.6 ms at B = 8192, K = 2^18, d = 256, 32 % of the matmul rate by its 2BKd, the wgmma
// kernels 63-66 % by their 4BKd.
template <typename T>
bool tc_wg_lse(const Problem& p) {
  if constexpr (std::is_same<T, float>::value) {
    return false;
  } else {
    if (env_switch(EnvSwitch::TcWgLse) != '1') return false;
    return tc_wgmma() && tc_flash<T>(p);
  }
}

// The kernel that serves the forward's walk over the bank (lse only, or one pass with the anchor term).
template <typename T>
int64_t tc_lse_slots(const Problem& p, bool save, int num_sms) {
  if constexpr (!std::is_same<T, float>::value) {
    if (save && tc_flash<T>(p)) return fl_slots<T, FlashMode::Forward>(p.d, num_sms);
    if (!save && tc_wg_lse<T>(p)) return fl_slots<T, FlashMode::Lse>(p.d, num_sms);
    if (tc_fused_fwd(p, save)) return tc_slots(mma_fwd_kernel<T>, tc_kernel_smem<T>(p.d, true).total, num_sms);
  }
  const TcSmem sm = tc_kernel_smem<T>(p.d, /*with_p=*/false);
  return tc_slots(tc_lse_kernel_for<T>(sm, left_out_of(p).any()), sm.total, num_sms);
}

// f(T()) for the tensor-core element type of p: CB_TC_ELEMENT, the one this translation unit serves (its
// problems have that dtype; float for the float32 / float64 part, whose float64 problems never reach this).
// Naming only that type keeps the other types' kernels out of this translation unit.
template <typename F>
auto tc_typed(DType, const F& f) {
  return f(CB_TC_ELEMENT());
}

// X blocks x feature slices x Y splits of a rows pass (tc_plan.h: the split count whose waves waste least).
struct TcPlan {
  int64_t xblocks = 0, slices = 1, splits = 1, tiles_per_split = 0;
  bool mma = false;  // mma_rows_kernel serves (n_hat . G from the logits: TcRowsArgs::partial_proj)
  bool flash = false;  // the flash-layout bank pass serves (tc_flash)
};

// Whether the flash-layout kernels serve p (float16/bfloat16 with CONTRASTBOUND_TC_FLASH=1).
bool tc_flash_for(const Problem& p) {
  return tc_typed(p.dtype, [&](auto x) { return tc_flash<decltype(x)>(p); });
}

// Whether the wgmma kernels' Lse walk serves a forward without the anchors' term (tc_wg_lse).
bool tc_wg_lse_for(const Problem& p) {
  return tc_typed(p.dtype, [&](auto x) { return tc_wg_lse<decltype(x)>(p); });
}

// Whether the forward walks the bank with the flash / wgmma kernels (128-row X blocks): the one pass with the
// anchors' term, or the Lse walk without it.
bool fl_forward(const Problem& p, bool save) { return save ? tc_flash_for(p) : tc_wg_lse_for(p); }

// bank_pass: X = bank, Y = anchors (the bank gradients), else the anchors' term.
TcPlan plan_tc_rows(const Problem& p, int64_t xrows, int64_t yrows, int num_sms, bool bank_pass) {
  TcPlan t;
  // The flash kernels serve the bank pass only: where they are on, the forward is their one pass (the anchors' term
  // included) and this plan's anchors' pass is not launched; it is planned as launch_tc_rows would run it, with the
  // mma.sync (or WMMA) kernels.
  const bool flash = bank_pass && tc_flash_for(p);
  t.flash = flash;
  t.xblocks = ceil_div(xrows, flash ? kFlRows : kTcRows);
  t.mma = !flash && tc_typed(p.dtype, [](auto x) { return tc_mma<decltype(x)>(); });
  t.slices = t.mma ? ceil_div(p.d, kTcSliceD) : 1;
  const int64_t ytiles = ceil_div(yrows, kTcCols);
  if (t.xblocks == 0 || ytiles == 0) return t;
  const int64_t slots = tc_typed(p.dtype, [&](auto x) -> int64_t {
    using T = decltype(x);
    if constexpr (!std::is_same<T, float>::value) {
      if (flash) return fl_slots<T, FlashMode::BankGrads>(p.d, num_sms);
    }
    return tc_rows_slots<T>(p.d, left_out_of(p).any(), num_sms);
  });
  const TcSplit s = plan_tc_split(t.xblocks * t.slices, ytiles, slots);
  t.splits = s.splits;
  t.tiles_per_split = s.tiles_per_split;
  return t;
}

// The forward's K chunks on the tensor-core path: the same split rule over (anchor blocks, bank tiles).
ForwardPlan plan_forward_tc(const Problem& p, bool save, int num_sms) {
  ForwardPlan f;
  f.units_per_chunk_row = ceil_div(p.B, fl_forward(p, save) ? kFlRows : kTcRows);
  if (p.K == 0 || p.B == 0) return f;
  const int64_t slots = tc_typed(p.dtype, [&](auto x) { return tc_lse_slots<decltype(x)>(p, save, num_sms); });
  const TcSplit s = plan_tc_split(f.units_per_chunk_row, ceil_div(p.K, kTcCols), slots);
  f.chunk_len = s.tiles_per_split * kTcCols;
  f.chunks = s.splits;
  return f;
}

template <typename T>
TcOperand<T> tc_operand(const void* ptr, const int64_t* stride, int64_t rows, int64_t d) {
  TcOperand<T> o;
  o.ptr = static_cast<const T*>(ptr);
  o.s0 = stride[0];
  o.s1 = stride[1];
  o.rows = rows;
  constexpr int64_t E = 16 / sizeof(T);
  o.vec = o.s1 == 1 && (o.s0 % E == 0 || rows <= 1) && d % E == 0 && reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  return o;
}

struct TcForwardWork {
  ForwardWork<float> w;
  float* v_partial = nullptr;  // (splits, B, d) when the anchor term is split over K
  uint32_t* keep_bits = nullptr;  // the flash / wgmma forward with a negative_mask: (B, fl_keep_words(K)) words
};

TcForwardWork carve_forward_tc(Carver& c, const Problem& p, const ForwardPlan& f, bool save, int num_sms) {
  TcForwardWork t;
  if (save && (tc_fused_fwd(p, save) || tc_flash_for(p))) {  // per-chunk V partials, merged by forward_merge
    t.w = carve_forward<float>(c, p, f, /*save=*/true, /*simt=*/false);
    if (p.keep != nullptr && tc_flash_for(p)) t.keep_bits = c.take<uint32_t>(p.B * fl_keep_words(p.K));
    return t;
  }
  t.w = carve_forward<float>(c, p, f, /*save=*/false, /*simt=*/false);  // no per-chunk V: formed after the lse
  if (!save) {
    if (p.keep != nullptr && tc_wg_lse_for(p)) t.keep_bits = c.take<uint32_t>(p.B * fl_keep_words(p.K));
    return t;
  }
  const TcPlan vp = plan_tc_rows(p, p.B, p.K, num_sms, /*bank_pass=*/false);
  if (save && vp.splits > 1) t.v_partial = c.take<float>(vp.splits * p.B * p.d);
  return t;
}

// The bank pass's float32 partials (splits, K, d), followed for the mma.sync kernel by its (splits, K) partial
// sums of n_hat . G (TcRowsArgs::partial_proj); nullptr with one split.
float* carve_backward_tc(Carver& c, const Problem& p, int num_sms) {
  const TcPlan bp = plan_tc_rows(p, p.K, p.B, num_sms, /*bank_pass=*/true);
  return bp.splits > 1 ? c.take<float>(bp.splits * p.K * (p.d + (bp.mma ? 1 : 0))) : nullptr;
}

// The mask bits of FlArgs::keep_bits from a (rows x cols) bool mask whose element (r, c) is keep[r sr + c sc]:
// out[r words + w] bit b = keep(r, 32 w + b) (0 past cols). Thread i takes one word; consecutive threads take
// consecutive r where sr <= sc (the reads of a warp then lie together when sr is 1), else consecutive w.
__global__ void fl_keep_bits_kernel(const bool* keep, int64_t sr, int64_t sc, int64_t rows, int64_t cols,
                                    int64_t words, uint32_t* out) {
  const int64_t n = rows * words;
  const bool r_fast = sr <= sc;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = r_fast ? i % rows : i / words, w = r_fast ? i / rows : i % words;
    uint32_t bits = 0;
    const bool* src = keep + r * sr;
    for (int b = 0; b < 32; ++b) {
      const int64_t c = 32 * w + b;
      if (c < cols && src[c * sc]) bits |= 1u << b;
    }
    out[r * words + w] = bits;
  }
}

// The negative_mask and labels of a flash-layout launch (FlArgs::keep_bits, x_labels, y_labels), from lo (the
// (anchor, bank row) frame): bank_pass puts the bank rows in X (x_rows of them) and the anchors in Y (y_rows), the
// forward the other way round. With a mask, packs it into bits (x_rows x fl_keep_words(y_rows) words of
// workspace): one pass over the mask per launch, so that the kernels read one word per X row and tile instead of
// a byte per score.
cudaError_t fl_left_out(const LeftOut& lo, bool bank_pass, uint32_t* bits, int64_t x_rows, int64_t y_rows,
                        cudaStream_t stream, FlArgs& f) {
  f.x_labels = bank_pass ? lo.bank_labels : lo.labels;
  f.y_labels = bank_pass ? lo.labels : lo.bank_labels;
  if (lo.keep == nullptr) return cudaSuccess;
  f.keep_bits = bits;
  f.keep_words = fl_keep_words(y_rows);
  const int64_t n = x_rows * f.keep_words;
  if (n == 0) return cudaSuccess;
  const int64_t sr = lo.keep_stride[bank_pass ? 1 : 0], sc = lo.keep_stride[bank_pass ? 0 : 1];
  CB_LAUNCH(grid_for(std::min<int64_t>(ceil_div(n, kThreads), 4096)), kThreads, 0, stream, fl_keep_bits_kernel)(
      lo.keep, sr, sc, x_rows, y_rows, f.keep_words, bits);
  return cudaGetLastError();
}

// (bank rows, fl_keep_words(anchors)) words where the flash-layout bank pass serves p and p has a negative_mask.
uint32_t* carve_backward_keep_bits(Carver& c, const Problem& p) {
  return p.keep != nullptr && tc_flash_for(p) ? c.take<uint32_t>(p.K * fl_keep_words(p.B)) : nullptr;
}

// float16 only: *slot = max over the n rows of inv[i] |w[i]| *wscale (w null: 1), the bound behind the coefficient
// scaling of the tensor-core kernels. Returns slot for float16 (and n > 0), nullptr otherwise.
template <typename T>
cudaError_t launch_coef_bound(float* slot, const float* inv, const float* w, const float* wscale, int64_t n,
                              cudaStream_t stream, const float** bound) {
  *bound = nullptr;
  if (!std::is_same<T, __half>::value || n == 0) return cudaSuccess;
  const cudaError_t e = cudaMemsetAsync(slot, 0, sizeof(float), stream);
  if (e != cudaSuccess) return e;
  CB_LAUNCH(grid_for(std::min<int64_t>(ceil_div(n, kTcThreads), 1024)), kTcThreads, 0, stream, tc_bound_kernel)(
      inv, w, wscale, n, slot);
  *bound = slot;
  return cudaSuccess;
}

// bound_w: the Y rows' weights of the float16 coefficient bound (nullptr: 1), times *bound_wscale.
template <typename T>
cudaError_t launch_tc_rows(const TcOperand<T>& X, const TcOperand<T>& Y, TcRowsArgs args, const TcPlan& plan,
                           int64_t d, float* bound_slot, const float* bound_w, const float* bound_wscale,
                           cudaStream_t stream) {
  args.d = d;
  args.splits = plan.splits;
  args.tiles_per_split = plan.tiles_per_split;
  args.xblocks = plan.xblocks;
  args.slices = plan.slices;
  if (plan.mma && !args.lse_on_x && plan.splits > 1) args.partial_proj = args.partial + plan.splits * X.rows * d;
  if (plan.xblocks == 0) return cudaSuccess;
  const float* bound = nullptr;
  cudaError_t e = launch_coef_bound<T>(bound_slot, args.y_inv, bound_w, bound_wscale, Y.rows, stream, &bound);
  if (e != cudaSuccess) return e;
  if (bound != nullptr) args.coef_bound = bound;
  bool launched = false;
  if constexpr (!std::is_same<T, float>::value) {
    if (plan.flash) {  // the bank pass (see plan_tc_rows)
      FlArgs f;
      f.d = d;
      f.splits = plan.splits;
      f.tiles_per_split = plan.tiles_per_split;
      f.xblocks = plan.xblocks;
      f.scale = args.scale;
      f.exclude_self = args.exclude_self;
      f.excluded = args.excluded;
      f.x_inv = args.x_inv;
      f.x_proj = args.x_proj;
      f.y_inv = args.y_inv;
      f.lse = args.lse;
      f.g = args.g;
      f.coef_bound = args.coef_bound;
      f.partial = args.partial;
      f.out_grad = args.out_grad;
      // the bank pass: X = bank rows, Y = anchors
      e = fl_left_out(args.lo, /*bank_pass=*/true, args.fl_keep_bits, X.rows, Y.rows, stream, f);
      if (e != cudaSuccess) return e;
      e = launch_flash<T, FlashMode::BankGrads>(X, Y, f, stream);
      if (e != cudaSuccess) return e;
      launched = true;
    }
  }
  if (!launched) {
    const TcSmem sm = tc_kernel_smem<T>(d, /*with_p=*/true);
    const dim3 grid = grid_for(plan.xblocks * plan.splits * plan.slices);  // (WMMA: slices = 1)
    const auto kernel = tc_rows_kernel_for<T>(sm, args.lo.any());
    e = allow_smem(kernel, sm.total);
    if (e != cudaSuccess) return e;
    CB_LAUNCH(grid, kTcThreads, sm.total, stream, kernel)(X, Y, args, sm);
  }
  if (plan.splits > 1) {
    CB_LAUNCH(grid_for(ceil_div(X.rows, kTcThreads / 32)), kTcThreads, 0, stream, tc_finish_kernel<T>)(X, args);
  }
  return cudaGetLastError();
}

// Arguments of the lse / one-pass forward kernels: anchors as X, one K chunk of the bank as Y.
TcLseArgs tc_lse_args(const Problem& p, const ForwardPlan& f, const ForwardWork<float>& w) {
  TcLseArgs la;
  la.d = p.d;
  la.K = p.K;
  la.B = p.B;
  la.chunk_len = f.chunk_len;
  la.chunks = f.chunks;
  la.xblocks = ceil_div(p.B, kTcRows);
  la.scale = static_cast<const float*>(p.scale);
  la.exclude_self = p.exclude_self;
  la.excluded = p.excluded;
  la.lo = left_out_of(p);
  la.x_inv = w.pr.a_inv;
  la.y_inv = w.pr.n_inv;
  la.part_max = w.part_max;
  la.part_sum = w.part_sum;
  return la;
}

// The flash-layout / wgmma forward walks' arguments (Forward, Lse): X = anchors, Y = the bank in f's K chunks, whose
// (max, sum) partials go to t's workspace; the mask's bits and the labels are added by fl_left_out.
inline FlArgs fl_forward_args(const Problem& p, const ForwardPlan& f, const TcForwardWork& t) {
  FlArgs fa;
  fa.d = p.d;
  fa.splits = f.chunks;
  fa.tiles_per_split = f.chunk_len / kFlCols;
  fa.xblocks = ceil_div(p.B, kFlRows);
  fa.scale = static_cast<const float*>(p.scale);
  fa.exclude_self = p.exclude_self;
  fa.excluded = p.excluded;
  fa.x_inv = t.w.pr.a_inv;
  fa.y_inv = t.w.pr.n_inv;
  fa.part_max = t.w.part_max;
  fa.part_sum = t.w.part_sum;
  return fa;
}

template <typename T>
cudaError_t forward_tc(const Problem& p, const ForwardOutputs& out, void* workspace, int num_sms, cudaStream_t stream) {
  const bool save = out.anchor_term != nullptr;
  const ForwardPlan f = plan_forward_tc(p, save, num_sms);
  Carver carver(workspace);
  const TcForwardWork t = carve_forward_tc(carver, p, f, save, num_sms);
  launch_prepare<T, float>(p, t.w.pr, stream);
  const TcOperand<T> A = tc_operand<T>(p.anchors, p.anchors_stride, p.B, p.d);
  const TcOperand<T> N = tc_operand<T>(p.negatives, p.negatives_stride, p.K, p.d);
  if constexpr (!std::is_same<T, float>::value) {
    if (save && (tc_flash<T>(p) || tc_fused_fwd(p, save))) {
      // One pass over the bank: (max, sum, V) partials per K chunk, merged with the positive below.
      if (f.chunks > 0) {
        const float* bound = nullptr;
        cudaError_t e = launch_coef_bound<T>(t.w.pr.tc_bound, t.w.pr.n_inv, nullptr, nullptr, p.K, stream, &bound);
        if (e != cudaSuccess) return e;
        if (tc_flash<T>(p)) {
          FlArgs fa = fl_forward_args(p, f, t);
          fa.coef_bound = bound;
          fa.partial = t.w.part_w;
          e = fl_left_out(left_out_of(p), /*bank_pass=*/false, t.keep_bits, p.B, p.K, stream, fa);
          if (e == cudaSuccess) e = launch_flash<T, FlashMode::Forward>(A, N, fa, stream);
        } else {
          const TcLseArgs la = tc_lse_args(p, f, t.w);
          const TcSmem sm = tc_kernel_smem<T>(p.d, /*with_p=*/true);
          e = allow_smem(mma_fwd_kernel<T>, sm.total);
          if (e == cudaSuccess) {
            CB_LAUNCH(grid_for(la.xblocks * la.chunks), kTcThreads, sm.total, stream, mma_fwd_kernel<T>)(
                A, N, la, t.w.part_w, bound, sm);
          }
        }
        if (e != cudaSuccess) return e;
      }
      if (p.B > 0) {
        CB_LAUNCH(grid_for(p.B), kThreads, 0, stream, forward_merge_kernel<float>)(
            p, t.w, f, static_cast<float*>(out.loss), static_cast<float*>(out.lse),
            static_cast<float*>(out.anchor_term));
      }
      return cudaGetLastError();
    }
    if (!save && tc_wg_lse<T>(p)) {
      // The Lse walk: (max, sum) partials per K chunk, merged with the positive below (no coefficient bound: no
      // coefficient becomes an operand).
      if (f.chunks > 0) {
        FlArgs fa = fl_forward_args(p, f, t);
        cudaError_t e = fl_left_out(left_out_of(p), /*bank_pass=*/false, t.keep_bits, p.B, p.K, stream, fa);
        if (e == cudaSuccess) e = launch_flash<T, FlashMode::Lse>(A, N, fa, stream);
        if (e != cudaSuccess) return e;
      }
      if (p.B > 0) {
        CB_LAUNCH(grid_for(p.B), kThreads, 0, stream, forward_merge_kernel<float>)(
            p, t.w, f, static_cast<float*>(out.loss), static_cast<float*>(out.lse), nullptr);
      }
      return cudaGetLastError();
    }
  }
  if (f.chunks > 0) {
    const TcLseArgs la = tc_lse_args(p, f, t.w);
    const TcSmem sm = tc_kernel_smem<T>(p.d, /*with_p=*/false);
    const auto kernel = tc_lse_kernel_for<T>(sm, la.lo.any());
    const cudaError_t e = allow_smem(kernel, sm.total);
    if (e != cudaSuccess) return e;
    CB_LAUNCH(grid_for(la.xblocks * la.chunks), kTcThreads, sm.total, stream, kernel)(A, N, la, sm);
  }
  float* lse = static_cast<float*>(out.lse);
  if (p.B > 0) {
    CB_LAUNCH(grid_for(p.B), kThreads, 0, stream, forward_merge_kernel<float>)(
        p, t.w, f, static_cast<float*>(out.loss), lse, nullptr);
  }
  if (save && p.B > 0) {
    TcRowsArgs ra;
    ra.scale = static_cast<const float*>(p.scale);
    ra.exclude_self = p.exclude_self;
    ra.excluded = p.excluded;
    ra.lo = left_out_of(p);
    ra.lse_on_x = true;
    ra.x_inv = t.w.pr.a_inv;
    ra.y_inv = t.w.pr.n_inv;
    ra.lse = lse;
    ra.partial = t.v_partial;
    ra.out_v = static_cast<float*>(out.anchor_term);
    return launch_tc_rows<T>(A, N, ra, plan_tc_rows(p, p.B, p.K, num_sms, false), p.d, t.w.pr.tc_bound, nullptr, nullptr,
                             stream);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t bank_grads_tc(const Problem& p, const Prepared<float>& pr, const float* g, const float* lse,
                          float* scratch, uint32_t* keep_bits, T* grad, int num_sms, cudaStream_t stream) {
  const TcOperand<T> N = tc_operand<T>(p.negatives, p.negatives_stride, p.K, p.d);
  const TcOperand<T> A = tc_operand<T>(p.anchors, p.anchors_stride, p.B, p.d);
  TcRowsArgs ra;
  ra.scale = static_cast<const float*>(p.scale);
  ra.exclude_self = p.exclude_self;
  ra.excluded = p.excluded;
  ra.lo = left_out_of(p);
  ra.lse_on_x = false;
  ra.x_inv = pr.n_inv;
  ra.x_proj = pr.n_proj;
  ra.y_inv = pr.a_inv;
  ra.lse = lse;
  ra.g = g;
  ra.partial = scratch;
  ra.fl_keep_bits = keep_bits;
  ra.out_grad = grad;
  return launch_tc_rows<T>(N, A, ra, plan_tc_rows(p, p.K, p.B, num_sms, true), p.d, pr.tc_bound, g, ra.scale, stream);
}

template <typename scalar_t, typename acc_t>
cudaError_t forward_typed(const Problem& p, const ForwardOutputs& out, void* workspace, int num_sms,
                          cudaStream_t stream) {
  if constexpr (TcType<scalar_t>::value) {
    if (use_tc(p)) return forward_tc<scalar_t>(p, out, workspace, num_sms, stream);
  }
  const ForwardPlan f = plan_forward(p, num_sms);
  const bool save = out.anchor_term != nullptr;
  Carver carver(workspace);
  const ForwardWork<acc_t> w = carve_forward<acc_t>(carver, p, f, save);
  launch_prepare<scalar_t, acc_t>(p, w.pr, stream);
  if (f.chunks > 0) {
    if (p.mode == Mode::Shared) {
      CB_LAUNCH(grid_for(f.units_per_chunk_row * f.chunks), kThreads, 0, stream,
                forward_shared_kernel<scalar_t, acc_t>)(p, w, f);
    } else {
      CB_LAUNCH(grid_for(p.B * f.chunks), kThreads, 0, stream, forward_rows_kernel<scalar_t, acc_t>)(p, w, f);
    }
  }
  if (p.B > 0) {
    CB_LAUNCH(grid_for(p.B), kThreads, 0, stream, forward_merge_kernel<acc_t>)(
        p, w, f, static_cast<acc_t*>(out.loss), static_cast<acc_t*>(out.lse), static_cast<acc_t*>(out.anchor_term));
  }
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t backward_typed(const Problem& p, const BackwardArgs& a, void* workspace, int num_sms,
                           cudaStream_t stream) {
  const bool tc = TcType<scalar_t>::value && use_tc(p);
  Carver carver(workspace);
  const BackwardWork<acc_t> w = carve_backward<acc_t>(carver, p, a, num_sms, tc);
  const acc_t* g = static_cast<const acc_t*>(a.grad_loss);
  const acc_t* lse = static_cast<const acc_t*>(a.lse);
  launch_prepare<scalar_t, acc_t>(p, w.pr, stream);
  if ((a.grad_anchors != nullptr || a.grad_positives != nullptr) && p.B > 0) {
    CB_LAUNCH(grid_for(p.B), kThreads, 0, stream, anchor_grads_kernel<scalar_t, acc_t>)(
        p, w.pr, g, lse, static_cast<const acc_t*>(a.loss), static_cast<const acc_t*>(a.anchor_term),
        static_cast<scalar_t*>(a.grad_anchors),
        static_cast<scalar_t*>(a.grad_positives));
  }
  if (a.grad_negatives != nullptr) {
    scalar_t* gn = static_cast<scalar_t*>(a.grad_negatives);
    if (p.mode == Mode::Shared && tc) {
      if constexpr (TcType<scalar_t>::value) {
        const cudaError_t e = bank_grads_tc<scalar_t>(p, w.pr, g, lse, w.grad_scratch, w.keep_bits, gn, num_sms,
                                                        stream);
        if (e != cudaSuccess) return e;
      }
    } else if (p.mode == Mode::Shared) {
      const BankPlan bp = plan_bank(p, num_sms);
      if (bp.tiles > 0) {
        const dim3 grid(static_cast<unsigned>(bp.grid_x), static_cast<unsigned>(bp.splits));
        CB_LAUNCH(grid, kThreads, 0, stream, backward_bank_kernel<scalar_t, acc_t>)(
            p, w.pr, g, lse, w.grad_scratch, bp, gn);
        if (!bp.direct) {
          CB_LAUNCH(grid_for(ceil_div(p.K, kWarps)), kThreads, 0, stream, finish_bank_kernel<scalar_t, acc_t>)(
              p, w.pr, w.grad_scratch, bp, gn);
        }
      }
    } else if (p.mode == Mode::PerAnchor) {
      if (p.B * p.K > 0) {
        CB_LAUNCH(grid_for(ceil_div(p.B * p.K, kWarps)), kThreads, 0, stream, backward_rows_kernel<scalar_t, acc_t>)(
            p, w.pr, g, lse, gn);
      }
    } else if (p.rows > 0) {
      CB_LAUNCH(grid_for(indexed_warps(p, num_sms) / kWarps), kThreads, 0, stream,
                backward_indexed_kernel<scalar_t, acc_t>)(
          p, w.pr, g, lse, a.sorted_rows, a.sorted_pairs, a.sort_chunk, w.grad_scratch, gn);
    }
  }
  return cudaGetLastError();
}

// The entry points of this translation unit's element types (info_nce_cuda_parts.cuh).
template <typename scalar_t, typename acc_t>
size_t forward_workspace_bytes_typed(const Problem& p, bool save_anchor_term, int num_sms) {
  Carver c(nullptr);
  if constexpr (TcType<scalar_t>::value) {
    if (use_tc(p)) {
      carve_forward_tc(c, p, plan_forward_tc(p, save_anchor_term, num_sms), save_anchor_term, num_sms);
      return c.used;
    }
  }
  carve_forward<acc_t>(c, p, plan_forward(p, num_sms), save_anchor_term);
  return c.used;
}

template <typename scalar_t, typename acc_t>
size_t backward_workspace_bytes_typed(const Problem& p, const BackwardArgs& a, int num_sms) {
  Carver c(nullptr);
  carve_backward<acc_t>(c, p, a, num_sms, TcType<scalar_t>::value && use_tc(p));
  return c.used;
}

}  // namespace

// Defines the entry points of element type SCALAR (accumulating in ACC) declared in info_nce_cuda_parts.cuh.
#define CB_DEFINE_PART(NAME, SCALAR, ACC)                                                                         \
  size_t forward_workspace_bytes_##NAME(const Problem& p, bool save_anchor_term, int num_sms) {                  \
    return forward_workspace_bytes_typed<SCALAR, ACC>(p, save_anchor_term, num_sms);                             \
  }                                                                                                              \
  size_t backward_workspace_bytes_##NAME(const Problem& p, const BackwardArgs& a, int num_sms) {                 \
    return backward_workspace_bytes_typed<SCALAR, ACC>(p, a, num_sms);                                           \
  }                                                                                                              \
  cudaError_t forward_##NAME(const Problem& p, const ForwardOutputs& out, void* workspace, int num_sms,          \
                             cudaStream_t stream) {                                                              \
    return forward_typed<SCALAR, ACC>(p, out, workspace, num_sms, stream);                                       \
  }                                                                                                              \
  cudaError_t backward_##NAME(const Problem& p, const BackwardArgs& a, void* workspace, int num_sms,             \
                              cudaStream_t stream) {                                                             \
    return backward_typed<SCALAR, ACC>(p, a, workspace, num_sms, stream);                                        \
  }

}  // namespace cuda
}  // namespace contrastbound
