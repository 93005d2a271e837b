// Device helpers shared by the SIMT kernels (info_nce_cuda_impl.cuh) and the tensor-core kernels (info_nce_tc.cuh):
// launch constants, conversions to and from the accumulation type, warp reductions and the last step of a bank
// row's gradient. A fragment included inside namespace contrastbound::cuda::{anonymous} (also by the C++ test
// that emulates the tensor-core kernels on the CPU); needs online_lse.h (max_of) and the CUDA half types.
#pragma once

constexpr int kThreads = 256;  // threads of every block-per-unit kernel
constexpr int kWarps = kThreads / 32;
constexpr int kBD = 16;       // feature step of the logit GEMM
constexpr int kRowTile = 64;  // logits per online update in forward_rows
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxGrid = int64_t(1) << 30;  // grid-stride loops cover the rest

// A kernel launch, written CB_LAUNCH(grid, block, shared bytes, stream, kernel)(arguments): the triple-chevron
// launch in CUDA builds; in the emulated build of the whole host path (csrc/tests/emu_runtime.h, test_cuda_emu)
// a call of the kernel by every emulated thread of every block.
#ifndef CB_LAUNCH
#define CB_LAUNCH(GRID, BLOCK, SMEM, STREAM, ...) __VA_ARGS__<<<GRID, BLOCK, SMEM, STREAM>>>
#endif

// A statically sized shared-memory array, written CB_SHARED(type, name, dimensions): `__shared__ type name dims` in
// CUDA builds; the emulated build (csrc/tests/emu_runtime.h) fills it with NaN bytes at each block's first use, as
// it does dynamic shared memory, so that a read before any write shows.
#ifndef CB_SHARED
#define CB_SHARED(TYPE, NAME, DIMS) __shared__ TYPE NAME DIMS
#endif

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// std::min for device code (std::min is a constexpr host function; nvcc runs without relaxed constexpr in CI).
__host__ __device__ inline int64_t min64(int64_t a, int64_t b) { return b < a ? b : a; }

// The logit scale s = 1 / temperature, read from device memory: a tensor temperature reaches the kernels
// without a host read-back (no device synchronisation per step). A value that is not positive and finite
// gives NaN, so that a bad temperature shows as a NaN loss rather than a finite wrong one.
template <typename acc_t>
__device__ __forceinline__ acc_t read_scale(const acc_t* s) {
  const acc_t v = *s;
  return (v > acc_t(0) && v < acc_t(INFINITY)) ? v : acc_t(NAN);
}

// A row's factor on its raw dot products, inv * s (the tensor-core kernels scale the float32 products S of raw
// rows). A zero row (inv = 1e12, F.normalize's clamp) at a temperature below ~3e-27 makes it inf, and S = 0 times
// inf is NaN: it is capped at the largest float (0 stays 0); NaN (a bad scale, read_scale) stays NaN.
__device__ __forceinline__ float row_factor(float inv, float s) {
  const float f = inv * s;
  return f == INFINITY ? 3.402823466e38f : f;
}

// The bank row left out of anchor i's sum (shared bank): i with exclude_self (NT-Xent: the anchors are the bank),
// excluded[i] where that array is given (bank_cross_entropy: the target row is the positive), else -1 (none).
// excluded is read only for i < rows (the anchors). A negative entry (none) comes back as -1, so that callers'
// `row - first column` cannot overflow (an entry near INT64_MIN); entries >= K stay (no column matches them).
__host__ __device__ __forceinline__ int64_t excluded_row(bool exclude_self, const int64_t* excluded, int64_t i,
                                                         int64_t rows) {
  if (exclude_self) return i;
  const int64_t e = excluded != nullptr && i < rows ? excluded[i] : int64_t(-1);
  return e < 0 ? int64_t(-1) : e;
}

// A shared bank's negative_mask and labels (Problem::keep, keep_stride, labels, bank_labels), as the SIMT and the
// tensor-core kernels take them: bank row k is left out of anchor i's sum where keep[i s0 + k s1] is false or where
// bank_labels[k] == labels[i]. Both null: none (the tensor-core kernels then run their instances without the test).
struct LeftOut {
  const bool* keep = nullptr;
  int64_t keep_stride[2] = {0, 0};
  const int64_t* labels = nullptr;
  const int64_t* bank_labels = nullptr;
  __host__ __device__ bool any() const { return keep != nullptr || labels != nullptr; }
};

// Whether the mask or the labels leave bank row k out of anchor i's sum (i < B, k < K: the caller's bounds).
__device__ __forceinline__ bool left_out(const LeftOut& o, int64_t i, int64_t k) {
  return (o.keep != nullptr && !o.keep[i * o.keep_stride[0] + k * o.keep_stride[1]]) ||
         (o.labels != nullptr && o.labels[i] == o.bank_labels[k]);
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t x) {
  return static_cast<acc_t>(x);
}
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t from_acc(acc_t x) {
  return static_cast<scalar_t>(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}

// max(a, b), NaN if either is NaN (max_of's semantics): one instruction (max.NaN.f32) on sm_80 and newer. fmaxf
// would drop a NaN logit from a tile maximum, and a tile whose kept logits are all NaN would then be skipped as
// empty: a finite loss from NaN inputs.
__device__ __forceinline__ float fmax_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
#else
  return max_of(a, b);
#endif
}

// 2^x as the hardware's ex2.approx.ftz.f32 (one MUFU instruction; __expf(x) is this of x log2(e), a multiplication
// more): -inf -> 0, +inf -> +inf, NaN -> NaN, results below 2^-126 flushed to 0. On the host (the CPU emulation):
// std::exp2 with the same flush.
__device__ __forceinline__ float fast_exp2(float x) {
#if defined(CONTRASTBOUND_EMULATE)
  const float r = std::exp2(x);
  return std::fpclassify(r) == FP_SUBNORMAL ? 0.f : r;
#elif defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);  // (nvcc's host pass: never run)
#endif
}
constexpr float kLog2e = 1.44269504088896341f;  // log2(e): e^x = 2^(x log2(e))
constexpr float kLn2 = 0.693147180559945309f;    // ln(2)

// Whether p holds on any lane of the warp (every lane calls it: a warp collective).
__device__ __forceinline__ bool warp_any(bool p) { return __any_sync(kFullMask, p) != 0; }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max_of(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Finishes `cols` features of one bank row from its accumulated G = dL/dn_hat (summed over `splits` partials
// `stride` apart, in split order), given c = n_hat . G and the row's Jacobian factor proj:
// dL/dn = inv G - c (proj n) (row_scale: proj n_j, not c proj, stays finite for a small row at a tiny
// temperature). proj = 0 (normalize=false, or a norm F.normalize clamps): no Jacobian term, so a row no anchor
// used (G = 0) keeps gradient 0 even where c is not finite (0 * inf = NaN). A whole warp; lane owns features
// lane + 32 t. G, n and out start at the first of those features.
template <typename scalar_t, typename acc_t>
__device__ void finish_bank_cols(const acc_t* G, int64_t stride, int64_t splits, const scalar_t* n, int64_t sj,
                                 int64_t cols, acc_t inv, acc_t c, acc_t proj, scalar_t* out) {
  const acc_t cr = proj != acc_t(0) ? c : acc_t(0);
  for (int64_t j = threadIdx.x % 32; j < cols; j += 32) {
    acc_t gs = 0;
    for (int64_t s = 0; s < splits; ++s) gs += G[s * stride + j];
    out[j] = from_acc<scalar_t>(inv * gs - cr * (proj * to_acc<acc_t>(n[j * sj])));
  }
}

// Whether x is finite, by arithmetic (x - x is 0 for a finite x, NaN for inf or NaN): no math-library call.
template <typename acc_t>
__device__ __forceinline__ bool is_finite(acc_t x) {
  return x - x == acc_t(0);
}

// A warp's (a . b) inv for an acc_t row a (unit stride) and a raw row b (stride sb), every lane holding the result:
// where the raw product a . b overflows although the result does not (a row of norm ~1e37, or ~1e19 at s = 1e20),
// the row is scaled first, a . (b inv) (the CPU kernel's dot_scaled). `raw` is the warp's a . b already summed.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t rows_dot_scaled(acc_t raw, const acc_t* a, const scalar_t* b, int64_t sb, int64_t d,
                                                 acc_t inv) {
  const acc_t l = raw * inv;
  if (is_finite(l)) return l;  // (warp-uniform: raw is the warp's sum)
  acc_t dot = 0;
  for (int64_t j = threadIdx.x % 32; j < d; j += 32) dot += a[j] * (to_acc<acc_t>(b[j * sb]) * inv);
  return warp_sum(dot);
}

// Finishes one whole bank row, n_hat . G from the accumulated G itself. Called by a whole warp.
template <typename scalar_t, typename acc_t>
__device__ void finish_bank_row(const acc_t* G, int64_t stride, int64_t splits, const scalar_t* n, int64_t sj,
                                int64_t d, acc_t inv, acc_t proj, scalar_t* out) {
  acc_t dot = 0;
  for (int64_t j = threadIdx.x % 32; j < d; j += 32) {
    acc_t gs = 0;
    for (int64_t s = 0; s < splits; ++s) gs += G[s * stride + j];
    dot += gs * to_acc<acc_t>(n[j * sj]);
  }
  acc_t n_hat_g = warp_sum(dot) * inv;  // n . G; n_hat . G = inv (n . G)
  if (!is_finite(n_hat_g)) {  // (warp-uniform) n . G overflowed: with n scaled first (rows_dot_scaled)
    dot = 0;
    for (int64_t j = threadIdx.x % 32; j < d; j += 32) {
      acc_t gs = 0;
      for (int64_t s = 0; s < splits; ++s) gs += G[s * stride + j];
      dot += gs * (to_acc<acc_t>(n[j * sj]) * inv);
    }
    n_hat_g = warp_sum(dot);
  }
  finish_bank_cols<scalar_t, acc_t>(G, stride, splits, n, sj, d, inv, n_hat_g, proj, out);
}

