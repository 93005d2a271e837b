// Probe of the wgmma layouts that csrc/cuda/info_nce_wgmma.cuh rests on, on known matrices: if the hardware reads a
// descriptor or a register fragment differently from the PTX text (and from the emulation, emu_wgmma.h), this says
// which product and which index moved, where the wgmma kernel test would only fail.
//
// One block of two warpgroups, as wgmma_kernel (so X is its 128-row tile: the X descriptor's LBO and the second
// warpgroup's start offset are the kernel's): the tiles copied by the library's own wg_issue into wg_smem's plan,
// then, with the library's primitives (wgmma_ss_n64, WgmmaRs, fences, commit, wait) and the functions wgmma_kernel
// builds its descriptors, A fragments and output product with (wg_x_desc, wg_x_step, wg_yk_desc, wg_yn_desc,
// wg_pack_a, wg_output_product), for dpad = N = 64, 128, 192, 256:
//   score product   S (128 x 64) = X Y^T, X 128 x N, Y 64 x N, K = N: N / 16 wgmma.m64n64k16, A and B K-major;
//   output product  O (128 x N) = C Y, C 128 x 64 packed into A registers as wgmma_kernel packs its coefficients,
//                   Y read N-major (imm-trans-b = 1): 4 wgmma.m64nNk16.
// Each thread writes its D fragment where the documented layout puts it. The inputs make every output exact:
//   Y read-out   X and C = +-identity (-1 in the second warpgroup's rows): S[r][c] = +-Y[c][r % 64 + 64 b],
//                O[r][n] = +-Y[r % 64][n]: Y seen through the K-major and the N-major B descriptors;
//   X/C read-out Y = identity on features 64 b .. 64 b + 63: S[r][c] = X[r][c + 64 b], O[r][n] = C[r][n - 64 b]:
//                X through the A descriptor, C through the A registers;
//   dense        small integers (sums exact in float32): everything at once.
// (b: each 64-feature block in turn.) In a read-out every operand element (i, j) holds its own code (code_value),
// so a wrong output value names the element that was read; the report gives, for the first wrong entries, what was
// expected and found, that element and the output position it belongs to, and tallies which index moved (rows,
// columns, 8-blocks, 8x8 core matrices transposed...). Then a verdict per product and dpad; exit 0 only if all match.
//
// Built from this one file two ways:
//   GPU (sm_90a):   nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a csrc/tests/wgmma_probe.cu
//                     -o /tmp/wgmma_probe && /tmp/wgmma_probe
//   CPU, emulated:  g++ -std=c++17 -O2 -fno-strict-aliasing -Wall -Wno-unknown-pragmas -I/usr/local/cuda/include
//                     -x c++ csrc/tests/wgmma_probe.cu -o /tmp/wgmma_probe_emu && /tmp/wgmma_probe_emu
// (ctest builds the emulated one from wgmma_probe_emu.cpp, which includes this file.) The emulated build also takes
// `mutation=K` (the probe with deliberate bug K, see kProbeMutationNames) and by default ends with the mutation
// checks: each mutated probe, in a child process, must report MISMATCH for the products the bug touches and only
// for those, and exit non-zero.
#ifndef __CUDACC__
#include "emu_cuda.h"
#include "emu_child.h"
#include "emu_wgmma.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "../core/online_lse.h"

namespace contrastbound {
namespace cuda {
namespace {
#include "../cuda/device_common.cuh"
#include "../cuda/info_nce_tc.cuh"
#include "../cuda/info_nce_flash.cuh"
#include "../cuda/info_nce_wgmma.cuh"

// The probe is in the library's namespace, as its kernels are: nvcc's generated launch stubs name a kernel's
// namespace, which a second anonymous namespace at file scope (with a using-directive) made ambiguous.

#ifdef CONTRASTBOUND_EMULATE
// info_nce_tc.cuh's one non-template kernel, which the probe does not launch (g++ -Wunused-function).
[[maybe_unused]] constexpr auto kUnusedBoundKernel = &tc_bound_kernel;
#endif

// Deliberate bugs, emulated build only (the mutation checks show that the probe reports each).
enum ProbeMutation {
  kProbeNone = 0,
  kProbeSwapX,    // LBO and SBO exchanged in the X (A) descriptor
  kProbeSwapYK,   // ... in the K-major Y descriptor of the score product
  kProbeSwapYN,   // ... in the N-major Y descriptor of the output product
  kProbeNoTrans,  // output product without imm-trans-b
  kProbeAOrder,   // A fragment registers 1 and 2 exchanged
  kProbeDRows,    // D fragment rows g and g + 8 exchanged when written out
  kProbeXStep,    // X descriptor advanced by one 8-feature chunk per k16 step instead of two
  kProbeMutationCount
};
#ifdef CONTRASTBOUND_EMULATE
int probe_mutation = kProbeNone;
bool probe_mut(int k) { return probe_mutation == k; }
// Mutation k: the descriptor, transpose and A-register bugs are the kernel's own (info_nce_wgmma.cuh's wg_mut hooks
// in the functions the probe shares with wgmma_kernel), the rest the probe's.
void select_mutation(int k) {
  probe_mutation = k;
  wg_mutation = k == kProbeSwapX ? kWgMutSwapX : k == kProbeSwapYK ? kWgMutSwapYK : k == kProbeSwapYN ? kWgMutSwapYN
              : k == kProbeNoTrans ? kWgMutNoTrans : k == kProbeAOrder ? kWgMutAOrder : kWgMutNone;
}
#else
[[maybe_unused]] __device__ __forceinline__ constexpr bool probe_mut(int) { return false; }
#endif

constexpr int kProbeCCols = 64;  // C: 64 columns (the Y tile's 64 rows are the output product's K)

// out[row][col] (row stride ncols) = this thread's D fragment of NCOLS / 8 n8 blocks: d[4 j + 2 h + e] is row
// 16 warp + g + 8 h of the block (64 wg + 16 (warp % 4) + ...), column 8 j + 2 t + e.
template <int NCOLS>
__device__ __forceinline__ void probe_store(const float* d, float* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < NCOLS / 8; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int hr = probe_mut(kProbeDRows) ? 1 - h : h;
        out[(16 * warp + g + 8 * hr) * NCOLS + 8 * j + 2 * t + e] = d[4 * j + 2 * h + e];
      }
}

// S = X Y^T and O = C Y as described above; X (kFlRows x N), Y (kFlCols x N) through TcOperand as wgmma_kernel
// takes them, c (kFlRows x 64), s (kFlRows x 64), o (kFlRows x N) row-major float32; m = wg_smem<T>(N).
template <typename T, int N>
__global__ void __launch_bounds__(kTcThreads, 1)
    wgmma_probe_kernel(const TcOperand<T> X, const TcOperand<T> Y, const float* c, float* s, float* o,
                       const TcSmem m) {
#if defined(CONTRASTBOUND_EMULATE) || (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL))
  static_assert(N % 64 == 0 && N <= 256, "dpad: 64, 128, 192 or 256");
  constexpr int kKsteps = N / 16;
  unsigned char* const raw = tc_dynamic_smem();
  T* const xs = reinterpret_cast<T*>(raw + m.x);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int wg = warp >> 2;
  // The tiles as wgmma_kernel's prologue copies and publishes them (Y into buffer 0).
  wg_issue<T, kFlRows>(xs, X, 0, N, N);
  wg_issue_y<T, N>(raw, m, Y, 0, N);
  tc_wait<0>();
  wg_fence_proxy_async();
  __syncthreads();
  const unsigned ya = wg_y_addr(raw, m, 0);

  // Score product: wgmma_kernel's issue_scores and the wait before its coefficients.
  const uint64_t xdesc = wg_x_desc(smem_u32(xs), wg);  // wgmma_kernel's descriptors from here on
  float sc[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) wg_fence_operand(sc[i]);
  wg_fence();
#pragma unroll
  for (int k = 0; k < kKsteps; ++k) {
    // (kProbeXStep: one feature chunk per k16 step, half of what wg_x_step adds)
    const uint64_t xk = probe_mut(kProbeXStep) ? wg_x_step(k) / 2 : wg_x_step(k);
    wgmma_ss_n64<T>(sc, xdesc + xk, wg_yk_desc(ya, k), k > 0 ? 1 : 0);
  }
  wg_commit();
  wg_wait<0>();
#pragma unroll
  for (int i = 0; i < 32; ++i) wg_fence_operand(sc[i]);
  probe_store<64>(sc, s);

  // Output product: C placed in the score fragment's layout (where wgmma_kernel forms its coefficients), packed as
  // its `coefficients` packs them, then its issue_output (B = the Y tile read N-major).
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 2; ++e) sc[4 * j + 2 * h + e] = c[(16 * warp + g + 8 * h) * kProbeCCols + 8 * j + 2 * t + e];
  unsigned pa[4][4];
  wg_pack_a<T>(sc, pa);
  float acc[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) acc[i] = 0.f;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) wg_fence_operand(acc[i]);
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int r = 0; r < 4; ++r) wg_fence_operand(pa[kk][r]);
  wg_fence();
  wg_output_product<T, N>(acc, pa, ya);
  wg_commit();
  wg_wait<0>();
#pragma unroll
  for (int i = 0; i < N / 2; ++i) wg_fence_operand(acc[i]);
  probe_store<N>(acc, o);
#elif defined(__CUDA_ARCH__)
  __trap();  // built without the sm_90a features
#endif
}

// ---- host side ----------------------------------------------------------------------------------------------

template <typename T>
struct Type;
template <>
struct Type<__nv_bfloat16> {
  static constexpr const char* name = "bf16";
  static constexpr int kMant = 7;  // stored mantissa bits
  static uint16_t bits(float v) { return static_cast<__nv_bfloat16_raw>(__float2bfloat16_rn(v)).x; }
  static float value(uint16_t b) {
    __nv_bfloat16_raw r;
    r.x = b;
    return __bfloat162float(__nv_bfloat16(r));
  }
};
template <>
struct Type<__half> {
  static constexpr const char* name = "f16";
  static constexpr int kMant = 10;
  static uint16_t bits(float v) { return static_cast<__half_raw>(__float2half_rn(v)).x; }
  static float value(uint16_t b) {
    __half_raw r;
    r.x = b;
    return __half2float(__half(r));
  }
};

// An operand element's code, (i << 8) | j (i < 128 rows, j < 256 features: 15 bits), as a value exact in T and
// far from its limits: sign = bit 14, then 4 (f16) or 7 (bf16) bits of exponent around 0, then kMant mantissa bits.
// A product with +-1 and sums with zeros keep it exact, so the value found names the element read.
template <typename T>
float code_value(int code) {
  constexpr int M = Type<T>::kMant, E = 14 - M;
  const int mant = code & ((1 << M) - 1), ex = (code >> M) & ((1 << E) - 1);
  const float v = std::ldexp(1.f + static_cast<float>(mant) / (1 << M), ex - (1 << (E - 1)));
  return (code >> 14) ? -v : v;
}
// The code whose value v is, or -1.
template <typename T>
int value_code(float v) {
  constexpr int M = Type<T>::kMant, E = 14 - M;
  if (!(std::isfinite(v) && v != 0.f)) return -1;
  int ex = 0;
  const double fr = std::frexp(std::fabs(static_cast<double>(v)), &ex);  // v = fr 2^ex, fr in [0.5, 1)
  const double mant = (2 * fr - 1) * (1 << M);
  const int e = ex - 1 + (1 << (E - 1));
  if (mant != std::floor(mant) || e < 0 || e >= (1 << E)) return -1;
  const int code = (v < 0 ? 1 << 14 : 0) | (e << M) | static_cast<int>(mant);
  return code_value<T>(code) == v ? code : -1;
}

enum Pattern { kReadY, kReadXC, kDense };

[[noreturn]] void fail_setup(const char* what) {
  std::printf("wgmma probe: FAILED to set up: %s\n", what);
  std::exit(2);
}

// One launch's inputs (exact values in T; C as float, as the kernel reads it) and expected outputs.
struct Inputs {
  Pattern pattern;
  int block;  // the 64-feature block of the read-outs
  std::vector<float> x, y, c, s, o;
};

Inputs make_inputs(Pattern p, int block, int n, bool bf16) {
  Inputs in{p, block, {}, {}, {}, {}, {}};
  in.x.assign(kFlRows * n, 0.f);
  in.y.assign(kFlCols * n, 0.f);
  in.c.assign(kFlRows * kProbeCCols, 0.f);
  const auto code = [&](int i, int j) {
    return bf16 ? code_value<__nv_bfloat16>((i << 8) | j) : code_value<__half>((i << 8) | j);
  };
  for (int r = 0; r < kFlRows; ++r) {
    const float sign = r < 64 ? 1.f : -1.f;  // the second warpgroup's rows negated: every output value distinct
    for (int j = 0; j < n; ++j) {
      if (p == kReadY) in.x[r * n + j] = j == r % 64 + 64 * block ? sign : 0.f;
      if (p == kReadXC) in.x[r * n + j] = code(r, j);
      if (p == kDense) in.x[r * n + j] = static_cast<float>((r * 7 + j * 3) % 5 - 2);
    }
    for (int k = 0; k < kProbeCCols; ++k) {
      if (p == kReadY) in.c[r * kProbeCCols + k] = k == r % 64 ? sign : 0.f;
      if (p == kReadXC) in.c[r * kProbeCCols + k] = code(r, k);
      if (p == kDense) in.c[r * kProbeCCols + k] = static_cast<float>((r * 3 + k * 13) % 9 - 4);
    }
  }
  for (int i = 0; i < kFlCols; ++i)
    for (int j = 0; j < n; ++j) {
      if (p == kReadY) in.y[i * n + j] = code(i, j);
      if (p == kReadXC) in.y[i * n + j] = j == i + 64 * block ? 1.f : 0.f;
      if (p == kDense) in.y[i * n + j] = static_cast<float>((i * 5 + j * 11) % 7 - 3);
    }
  // Expected outputs: every term is exact, and so is every sum (checked).
  in.s.assign(kFlRows * 64, 0.f);
  in.o.assign(kFlRows * n, 0.f);
  for (int r = 0; r < kFlRows; ++r) {
    for (int col = 0; col < 64; ++col) {
      double v = 0;
      for (int j = 0; j < n; ++j) v += static_cast<double>(in.x[r * n + j]) * in.y[col * n + j];
      in.s[r * 64 + col] = static_cast<float>(v);
      if (static_cast<double>(in.s[r * 64 + col]) != v) fail_setup("an expected score is not exact in float32");
    }
    for (int col = 0; col < n; ++col) {
      double v = 0;
      for (int k = 0; k < kProbeCCols; ++k) v += static_cast<double>(in.c[r * kProbeCCols + k]) * in.y[k * n + col];
      in.o[r * n + col] = static_cast<float>(v);
      if (static_cast<double>(in.o[r * n + col]) != v) fail_setup("an expected output is not exact in float32");
    }
  }
  return in;
}

// ---- the launch: emulated or on the GPU -----------------------------------------------------------------------

#ifdef CONTRASTBOUND_EMULATE
template <typename T, int N>
void run_kernel(const std::vector<uint16_t>& x, const std::vector<uint16_t>& y, const std::vector<float>& c,
                std::vector<float>& s, std::vector<float>& o) {
  const TcSmem m = wg_smem<T>(N);
  const TcOperand<T> X{reinterpret_cast<const T*>(x.data()), N, 1, kFlRows, true};
  const TcOperand<T> Y{reinterpret_cast<const T*>(y.data()), N, 1, kFlCols, true};
  s.assign(kFlRows * 64, NAN);
  o.assign(kFlRows * N, NAN);
  emu::wg::launch(1, kTcThreads, m.total, [&] { wgmma_probe_kernel<T, N>(X, Y, c.data(), s.data(), o.data(), m); });
}
#else
#define PROBE_CUDA(call)                                                                                         \
  do {                                                                                                           \
    const cudaError_t e_ = (call);                                                                               \
    if (e_ != cudaSuccess) {                                                                                     \
      std::printf("wgmma probe: FAILED to run: %s: %s (%s)\n", #call, cudaGetErrorName(e_), cudaGetErrorString(e_)); \
      std::exit(2);                                                                                              \
    }                                                                                                            \
  } while (0)

template <typename V>
V* to_device(const std::vector<V>& h) {
  V* d = nullptr;
  PROBE_CUDA(cudaMalloc(&d, h.size() * sizeof(V)));
  PROBE_CUDA(cudaMemcpy(d, h.data(), h.size() * sizeof(V), cudaMemcpyHostToDevice));
  return d;
}

template <typename T, int N>
void run_kernel(const std::vector<uint16_t>& x, const std::vector<uint16_t>& y, const std::vector<float>& c,
                std::vector<float>& s, std::vector<float>& o) {
  const TcSmem m = wg_smem<T>(N);
  uint16_t* dx = to_device(x);
  uint16_t* dy = to_device(y);
  float* dc = to_device(c);
  s.assign(kFlRows * 64, NAN);  // NaN: an entry the kernel never writes shows
  o.assign(kFlRows * N, NAN);
  float* ds = to_device(s);
  float* dout = to_device(o);
  const TcOperand<T> X{reinterpret_cast<const T*>(dx), N, 1, kFlRows, true};
  const TcOperand<T> Y{reinterpret_cast<const T*>(dy), N, 1, kFlCols, true};
  PROBE_CUDA(cudaFuncSetAttribute(wgmma_probe_kernel<T, N>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(m.total)));
  wgmma_probe_kernel<T, N><<<1, kTcThreads, m.total>>>(X, Y, dc, ds, dout, m);
  PROBE_CUDA(cudaGetLastError());
  PROBE_CUDA(cudaDeviceSynchronize());
  PROBE_CUDA(cudaMemcpy(s.data(), ds, s.size() * sizeof(float), cudaMemcpyDeviceToHost));
  PROBE_CUDA(cudaMemcpy(o.data(), dout, o.size() * sizeof(float), cudaMemcpyDeviceToHost));
  for (void* p : {static_cast<void*>(dx), static_cast<void*>(dy), static_cast<void*>(dc), static_cast<void*>(ds),
                  static_cast<void*>(dout)})
    PROBE_CUDA(cudaFree(p));
}
#endif

// ---- checks and hints -----------------------------------------------------------------------------------------

// How index a (expected) became b (found), as a kind of move: 8-blocks are the core matrices' rows / 16-byte chunks.
std::string moved(const char* index, int a, int b) {
  return std::string(index) + (a % 8 == b % 8 ? " by 8-blocks" : a / 8 == b / 8 ? " within an 8-block" : " moved");
}

// The read-out operand of a product: its name, and which index of the product (m, n or k) its rows and its
// columns are.
struct Source {
  const char* name = nullptr;
  const char* row_index = nullptr;
  const char* col_index = nullptr;
  bool sign_rows = false;  // rows 64.. are the negated rows 0.. (Y read-out)
  int rows = 0, cols = 0;  // the codes of its elements: rows x cols
};

Source source_of(Pattern p, bool score, int n) {
  if (p == kReadY) {
    return score ? Source{"Y", "n", "k", true, 2 * kFlCols, n} : Source{"Y", "k", "n", true, 2 * kFlCols, n};
  }
  if (p == kReadXC) {
    return score ? Source{"X", "m", "k", false, kFlRows, n} : Source{"C", "m", "k", false, kFlRows, kProbeCCols};
  }
  return Source{};
}

// The read-out element (i, j) that output (r, col) should hold (false: none, the value is 0).
bool expected_element(Pattern p, bool score, int block, int r, int col, int& i, int& j) {
  if (p == kReadY) {  // rows 64.. of the read-out are -Y: code row 64 + i
    i = score ? col + (r & 64) : r;
    j = score ? r % 64 + 64 * block : col;
    return true;
  }
  if (p == kReadXC) {
    i = r;
    j = score ? col + 64 * block : col - 64 * block;
    return score || (j >= 0 && j < kProbeCCols);  // O: C only on the identity's 64 columns
  }
  return false;
}

std::string element_name(const Source& src, int i, int j) {
  const bool neg = src.sign_rows && i >= 64;
  return std::string(neg ? "-" : "") + src.name + "[" + std::to_string(neg ? i - 64 : i) + "][" + std::to_string(j) +
         "]";
}

// What moved from the expected element (i, j) to the one found (fi, fj), in the product's indices (a kind, so
// that the report can count them).
std::string element_hint(const Source& src, int i, int j, int fi, int fj) {
  const std::string op = std::string(src.name) + ": ";
  if (src.sign_rows && (i ^ fi) == 64 && j == fj) return op + "sign: the other warpgroup's identity row";
  if (fi == j && fj == i) return op + "transposed";
  if (fi / 8 == i / 8 && fj / 8 == j / 8 && fi % 8 == j % 8 && fj % 8 == i % 8) {
    return op + "8x8 core matrices transposed";
  }
  std::string h;
  if (fi != i) h = moved(src.row_index, i, fi);
  if (fj != j) h += (h.empty() ? "" : " and ") + moved(src.col_index, j, fj);
  return op + h;
}

// The same for an output value found at (r, c) that belongs at (fr, fc): a moved output position (in the D fragment
// mapping, or a whole row / column of an operand read in another's place).
std::string position_hint(const char* out, int r, int c, int fr, int fc) {
  if (fr == c && fc == r) return std::string(out) + ": transposed";
  std::string h;
  if (fr != r) h = moved("rows", r, fr);
  if (fc != c) h += (h.empty() ? "" : " and ") + moved("columns", c, fc);
  return std::string(out) + ": " + h;
}

struct ProductReport {
  long entries = 0, wrong = 0;
  std::map<std::string, long> wrong_by_pattern, hints;
  std::vector<std::string> details;
};

const char* pattern_name(Pattern p, bool score) {
  if (p == kReadY) return score ? "Y read-out (A = identity)" : "Y read-out (C = identity)";
  if (p == kReadXC) return score ? "X read-out (B = identity)" : "C read-out (B = identity)";
  return "dense";
}

template <typename T>
void compare(const Inputs& in, bool score, int ncols, const std::vector<float>& got, ProductReport& rep) {
  const std::vector<float>& want = score ? in.s : in.o;
  const Source src = source_of(in.pattern, score, static_cast<int>(in.y.size()) / kFlCols);
  // The element whose code v is (false: v is no element's, e.g. several summed).
  const auto element_of = [&](float v, int& fi, int& fj) {
    const int code = src.name ? value_code<T>(v) : -1;
    fi = code >> 8;
    fj = code & 255;
    return code >= 0 && fi < src.rows && fj < src.cols;
  };
  const char* out_name = score ? "S" : "O";
  // Output positions by expected value, for "found the value expected at (r', c')" (unique values only).
  std::unordered_map<float, int> where;
  for (int e = 0; e < static_cast<int>(want.size()); ++e) {
    const auto it = where.find(want[e]);
    if (it == where.end()) where[want[e]] = e;
    else it->second = -1;
  }
  long wrong = 0;
  std::string label = std::string(pattern_name(in.pattern, score)) + ", block " + std::to_string(in.block);
  for (int e = 0; e < static_cast<int>(want.size()); ++e) {
    const float w = want[e], f = got[e];
    if (f == w || (std::isnan(f) && std::isnan(w))) continue;
    ++wrong;
    const int r = e / ncols, col = e % ncols;
    int i = 0, j = 0, fi = 0, fj = 0;
    const bool has_elem = src.name && expected_element(in.pattern, score, in.block, r, col, i, j);
    const bool found_elem = element_of(f, fi, fj);
    std::string hint;  // which element was read (read-outs)
    if (std::isnan(f)) {
      hint = "NaN (not written, or never-written shared memory read)";
    } else if (src.name && f == 0.f) {
      hint = "no element read (0)";
    } else if (src.name && !found_elem) {
      hint = "not an element (several summed?)";
    } else if (src.name) {
      hint = has_elem ? element_hint(src, i, j, fi, fj) : std::string(src.name) + ": an element where 0 was expected";
    }
    const auto it = where.find(f);
    const int at = it == where.end() ? -1 : it->second;
    // The output position that value belongs to (unique expected values only).
    const std::string pos_hint = at >= 0 ? position_hint(out_name, r, col, at / ncols, at % ncols) : std::string();
    if (!hint.empty()) ++rep.hints[hint];
    if (!pos_hint.empty()) ++rep.hints[pos_hint];
    if (wrong <= 4) {
      char buf[96];
      std::snprintf(buf, sizeof buf, "%s[%d][%d]: expected %.9g", out_name, r, col, static_cast<double>(w));
      std::string line = std::string("    ") + buf;
      if (has_elem) line += " (" + element_name(src, i, j) + ")";
      std::snprintf(buf, sizeof buf, ", found %.9g", static_cast<double>(f));
      line += buf;
      if (found_elem) line += " (" + element_name(src, fi, fj) + ")";
      if (at >= 0) {
        line += ", the value expected at " + std::string(out_name) + "[" + std::to_string(at / ncols) + "][" +
                std::to_string(at % ncols) + "]";
      }
      if (!hint.empty() || !pos_hint.empty()) {
        line += ": " + hint + (hint.empty() || pos_hint.empty() ? "" : "; ") + pos_hint;
      }
      if (wrong == 1) rep.details.push_back("  " + label + ":");
      rep.details.push_back(line);
    }
  }
  if (wrong > 4) rep.details.push_back("    ... " + std::to_string(wrong - 4) + " more in " + label);
  rep.entries += static_cast<long>(want.size());
  rep.wrong += wrong;
  rep.wrong_by_pattern[pattern_name(in.pattern, score)] += wrong;
}

void print_verdict(const char* tname, int n, bool score, const ProductReport& rep) {
  for (const std::string& l : rep.details) std::printf("%s\n", l.c_str());
  std::printf("%s dpad %d: %s: ", tname, n,
              score ? "score product (K-major A and B descriptors)"
                    : "output product (A registers, N-major B descriptor)");
  if (rep.wrong == 0) {
    std::printf("OK (%ld entries)\n", rep.entries);
    return;
  }
  std::printf("MISMATCH: %ld of %ld entries wrong (", rep.wrong, rep.entries);
  const char* sep = "";
  for (const auto& kv : rep.wrong_by_pattern) {
    std::printf("%s%s: %ld", sep, kv.first.c_str(), kv.second);
    sep = ", ";
  }
  std::printf(")");
  // The most frequent hints.
  std::vector<std::pair<long, std::string>> top;
  for (const auto& kv : rep.hints) top.push_back({kv.second, kv.first});
  std::sort(top.begin(), top.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  for (size_t k = 0; k < top.size() && k < 4; ++k) {
    std::printf("%s%ld x %s", k ? "; " : "; hints: ", top[k].first, top[k].second.c_str());
  }
  std::printf("\n");
}

template <typename T, int N>
bool probe_dpad() {
  ProductReport score, output;
  std::vector<Inputs> runs;
  for (int b = 0; b < N / 64; ++b) runs.push_back(make_inputs(kReadY, b, N, std::is_same<T, __nv_bfloat16>::value));
  for (int b = 0; b < N / 64; ++b) runs.push_back(make_inputs(kReadXC, b, N, std::is_same<T, __nv_bfloat16>::value));
  runs.push_back(make_inputs(kDense, 0, N, std::is_same<T, __nv_bfloat16>::value));
  for (const Inputs& in : runs) {
    std::vector<uint16_t> x(in.x.size()), y(in.y.size());
    for (size_t i = 0; i < x.size(); ++i) x[i] = Type<T>::bits(in.x[i]);
    for (size_t i = 0; i < y.size(); ++i) y[i] = Type<T>::bits(in.y[i]);
    for (size_t i = 0; i < x.size(); ++i)
      if (Type<T>::value(x[i]) != in.x[i]) fail_setup("an X value is not exact in the input type");
    for (size_t i = 0; i < y.size(); ++i)
      if (Type<T>::value(y[i]) != in.y[i]) fail_setup("a Y value is not exact in the input type");
    std::vector<float> s, o;
    run_kernel<T, N>(x, y, in.c, s, o);
    compare<T>(in, true, 64, s, score);
    compare<T>(in, false, N, o, output);
  }
  print_verdict(Type<T>::name, N, true, score);
  print_verdict(Type<T>::name, N, false, output);
  return score.wrong == 0 && output.wrong == 0;
}

// The probe for both types and every dpad of wgmma_kernel; true if everything matched.
bool run_probe() {
  bool ok = true;
  ok = probe_dpad<__nv_bfloat16, 64>() && ok;
  ok = probe_dpad<__nv_bfloat16, 128>() && ok;
  ok = probe_dpad<__nv_bfloat16, 192>() && ok;
  ok = probe_dpad<__nv_bfloat16, 256>() && ok;
  ok = probe_dpad<__half, 64>() && ok;
  ok = probe_dpad<__half, 128>() && ok;
  ok = probe_dpad<__half, 192>() && ok;
  ok = probe_dpad<__half, 256>() && ok;
  std::printf("wgmma probe: %s\n", ok ? "OK (layouts as the PTX ISA text says)" : "MISMATCH (see the lines above)");
  return ok;
}

#ifdef CONTRASTBOUND_EMULATE
const char* const kProbeMutationNames[kProbeMutationCount] = {
    "none", "LBO/SBO swapped in the X descriptor", "LBO/SBO swapped in the K-major Y descriptor",
    "LBO/SBO swapped in the N-major Y descriptor", "no imm-trans-b", "A fragment registers 1 and 2 swapped",
    "D fragment rows g and g + 8 swapped", "X descriptor advanced one chunk per k16 step"};
// The products each mutation breaks (1 score, 2 output), and a hint that some MISMATCH verdict must give for it.
const int kProbeMutationBreaks[kProbeMutationCount] = {0, 1, 1, 2, 2, 2, 3, 1};
const char* const kProbeMutationHints[kProbeMutationCount] = {
    "", "X: m by 8-blocks and k by 8-blocks", "Y: n by 8-blocks and k by 8-blocks",
    "Y: k by 8-blocks and n by 8-blocks", "Y: 8x8 core matrices transposed", "C: m by 8-blocks and k by 8-blocks",
    "S: rows by 8-blocks", "X: k by 8-blocks"};

// Runs the probe with mutation k in a child process: its exit status (-1 if it did not exit) and output.
int run_child(int k, std::string& out) {
  return emu_child::run(
      [k] {
        select_mutation(k);
        return run_probe() ? 0 : 1;
      },
      out);
}

// Each mutation must make the probe exit 1 with MISMATCH verdicts for exactly the products it breaks.
bool run_mutation_checks() {
  bool all = true;
  for (int k = 1; k < kProbeMutationCount; ++k) {
    std::string out;
    const int rc = run_child(k, out);
    const auto count = [&](const char* what, const char* verdict) {
      int c = 0;
      for (size_t p = 0; (p = out.find(what, p)) != std::string::npos; ++p)
        c += out.compare(out.find(": ", p + std::strlen(what)) + 2, std::strlen(verdict), verdict) == 0;
      return c;
    };
    const int score_bad = count("score product (", "MISMATCH"), output_bad = count("output product (", "MISMATCH");
    const bool want_score = kProbeMutationBreaks[k] & 1, want_output = kProbeMutationBreaks[k] & 2;
    bool hinted = false;
    for (size_t p = 0; (p = out.find("MISMATCH: ", p)) != std::string::npos; ++p)
      hinted = hinted || out.substr(p, out.find('\n', p) - p).find(kProbeMutationHints[k]) != std::string::npos;
    const bool ok = rc == 1 && (score_bad == 8) == want_score && score_bad % 8 == 0 &&
                    (output_bad == 8) == want_output && output_bad % 8 == 0 && hinted;
    // The first verdict line that says MISMATCH, shortened.
    const size_t p = out.find("MISMATCH: ");
    const size_t line0 = p == std::string::npos ? 0 : out.rfind('\n', p) + 1;
    std::string first = p == std::string::npos ? "(none)" : out.substr(line0, out.find('\n', p) - line0);
    if (first.size() > 230) first = first.substr(0, 227) + "...";
    std::printf("mutation %-46s %s (exit %d; MISMATCH in %d score, %d output verdicts of 8 each; hint \"%s\" %s)\n"
                "    %s\n",
                kProbeMutationNames[k], ok ? "reported" : "NOT REPORTED AS EXPECTED", rc, score_bad, output_bad,
                kProbeMutationHints[k], hinted ? "given" : "MISSING", first.c_str());
    all = all && ok;
  }
  std::printf("mutation checks: %s\n", all ? "every mutation reported by the products it breaks" : "FAILED");
  return all;
}
#endif

int probe_main(int argc, char** argv) {
  const std::string arg = argc > 1 ? argv[1] : "";
#ifdef CONTRASTBOUND_EMULATE
  std::printf("wgmma probe, CPU emulation (csrc/tests/emu_wgmma.h)\n");
  if (arg.rfind("mutation=", 0) == 0) {
    const int k = std::atoi(arg.c_str() + 9);
    if (k <= 0 || k >= kProbeMutationCount) {
      std::printf("mutation=K with K in 1 .. %d\n", kProbeMutationCount - 1);
      return 2;
    }
    select_mutation(k);
    std::printf("mutation: %s\n", kProbeMutationNames[probe_mutation]);
    return run_probe() ? 0 : 1;
  }
  const bool ok = run_probe();
  const bool mutations_ok = arg == "probe" || run_mutation_checks();
  return ok && mutations_ok ? 0 : 1;
#else
  if (!arg.empty()) {
    std::printf("usage: %s (mutations exist in the emulated build only)\n", argv[0]);
    return 2;
  }
  int dev = 0, major = 0, minor = 0;
  PROBE_CUDA(cudaGetDevice(&dev));
  PROBE_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  PROBE_CUDA(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  cudaDeviceProp prop;
  PROBE_CUDA(cudaGetDeviceProperties(&prop, dev));
  std::printf("wgmma probe on %s (compute capability %d.%d)\n", prop.name, major, minor);
  if (major != 9 || minor != 0) {
    std::printf("wgmma probe: NOT RUN: wgmma (sm_90a) needs compute capability 9.0\n");
    return 2;
  }
  return run_probe() ? 0 : 1;
#endif
}

}  // namespace
}  // namespace cuda
}  // namespace contrastbound

int main(int argc, char** argv) { return contrastbound::cuda::probe_main(argc, argv); }
