// Experimental Hopper (sm_90a) version of the flash-layout kernels (info_nce_flash.cuh) with warpgroup MMA
// (wgmma.mma_async). Included after info_nce_flash.cuh (FlashMode, FlArgs, kFlRows, kFlCols, fl_quad_*), inside
// the same anonymous namespace; torch-free. Opt-in (CONTRASTBOUND_TC_WGMMA=1): launch_flash in info_nce_cuda_impl.cuh
// runs these in place of flash_kernel where device_runs_sm90a() (see "Launching" below).
//
// Same arguments, work split and outputs as flash_kernel<T, MODE, NT> (NT here: dpad / 8 with dpad = d rounded up
// to 64, so 8, 16, 24 or 32; every product below has a shape fixed at compile time): a block of 256 threads owns kFlRows = 128
// X rows and walks the 64-row Y tiles of its split; the two warpgroups (warps 0-3, 4-7) own X rows 0-63 and 64-127
// of the block. Per Y tile and warpgroup:
//   S (64 x 64, f32 registers) = X_wg Y^T    wgmma m64n64k16, A and B from shared memory (descriptors, K-major),
//                                            dpad / 16 instructions, the first with scale-d = 0 (S = A B);
//   C = coefficient(S) in place (identical code to flash_kernel), cast to T and packed as the A fragments;
//   O (64 x dpad, f32 registers) += C Y     wgmma m64n64k16 with A from registers and B = the same Y tile read
//                                            as an N-major operand (imm-trans-b = 1), one per 64 features and
//                                            k16 slice (dpad / 16 instructions).
// Each product is fenced (wgmma.fence), committed and waited for (wait_group 0) before its registers are used;
// the O product is waited for before the barrier that lets the Y buffer be refilled.
//
// Shared memory: X (128 rows) and one or two Y tiles (64 rows) in the no-swizzle ("interleaved") canonical
// layout, as 16-byte chunks in chunk-column order: element (row r, feature j) of a tile of R rows is at byte
//   ((j / 8) R + r) 16 + (j % 8) 2,
// i.e. 8 x 8 core matrices of 128 contiguous bytes (row r % 8 at 16 (r % 8), feature j % 8 at 2 (j % 8)); the core
// matrix of row block r / 8 and feature block j / 8 starts at (j / 8) 16 R + (r / 8) 128.
// Descriptors (bytes; encoded >> 4; swizzle mode 0, base offset 0):
//   X as A of S, K-major (M = row, K = feature):    LBO = 16 R_x = 2048, SBO = 128, start = x + 2048 (2 k16) + 1024 wg
//   Y as B of S, K-major (N = y row, K = feature):  LBO = 16 R_y = 1024, SBO = 128, start = y + 1024 (2 k16)
//   Y as B of O, N-major (K = y row, N = feature):  LBO = 128,  SBO = 16 R_y = 1024, start = y + 1024 (8 c) + 256 k16
//   (k16: the 16-wide K slice; c: the 64-feature chunk of the output; wg: the warpgroup)
// This rests on these statements of the PTX ISA (9.7.15.5.1.2, "Shared Memory Matrix Layout", and the sections
// under it, PTX ISA 8.x/9.0; cross-checked with CUTLASS cute/atom/mma_traits_sm90_gmma.hpp, make_gmma_desc):
//  - "If the argument imm-trans-a / imm-trans-b ... is 0, then K-major is used for matrix A / B ... If the value of
//    the argument imm-trans-b is 1, then N-major is used for matrix B." and (wgmma.mma_async) "Matrices A and B
//    are stored in row-major and column-major format respectively ... The transpose operation is only supported
//    for the wgmma.mma_async variants with .f16/.bf16 types on matrices accessed from shared memory".
//  - Canonical layouts (9.7.15.5.1.2.1.3), in elements with T = 128 / 16 = 8:
//      K-major, no swizzle:  ((8,m),(T,2k)):((1T,SBO),(1,LBO))   -> (mn%8) 16 B + (mn/8) SBO + (k%8) 2 B + (k/8) LBO
//      MN-major, no swizzle: ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)) -> (mn%8) 2 B + (mn/8) SBO + (k%8) 16 B + (k/8) LBO
//    and the document's worked example "MN-Major, no-swizzling and bf16 type: ((8,1,2),(8,2)):((1,8,64),(8,128)),
//    LBO = 128*sizeof(bf16), SBO = 64*sizeof(bf16)" (SBO steps 8 MN elements, LBO steps 8 K elements), and
//    "K-Major, no-swizzling and tf32 type: ((8,2),(4,4)):((4,32),(1,64)), LBO = 64*sizeof(tf32), SBO =
//    32*sizeof(tf32)" (SBO steps 8 MN rows, LBO steps the next 16-byte K chunk). So for no swizzle both majors
//    use SBO for the next 8 M/N and LBO for the next 8 K; one physical 8x8 core matrix (8 rows of 16 bytes) is a
//    K-major core matrix of Y (rows = N, 16 bytes of K) and an N-major one (rows = K, 16 bytes of N) alike; only
//    LBO and SBO trade places between the two descriptors of the Y tile.
//  - Matrix Descriptor Format (9.7.15.5.1.2.2): bits 13-0 start address, 29-16 LBO, 45-32 SBO, each
//    matrix-descriptor-encode(x) = (x & 0x3FFFF) >> 4; bits 51-49 base offset "valid for all swizzling modes
//    except the no-swizzle mode"; bits 63-62 swizzle mode, 0 = no swizzle. "When the matrices are in shared
//    memory, their starting addresses must be aligned to 16 bytes." "The contents of a matrix descriptor must be
//    same across all the warps in the warpgroup."
//  - Register fragments of m64nNk16 (9.7.15.5.1.1.1, Figures 148 / 149, and CUTLASS ALayout_64x16 / CLayout_64xN):
//    warp w of the warpgroup holds rows 16 w .. 16 w + 15; within them A is the mma.m16n8k16 A fragment (reg 0:
//    row g, k 2t..2t+1; reg 1: row g+8; reg 2: row g, k 2t+8..; reg 3: row g+8, k 2t+8..) and the f32 D fragment
//    is, for each n8 block j, d[4j..4j+1] = row g, columns 8j+2t..+1 and d[4j+2..4j+3] = row g+8 (g = lane / 4,
//    t = lane % 4): the flash kernel's per-warp layout, so its coefficient and epilogue code carry over.
//  - wgmma.fence "must be issued by all warps of the warpgroup ... before the first wgmma.mma_async ... [and]
//    between a register access by a thread in the warpgroup and any wgmma.mma_async instruction that accesses
//    the same registers"; "An async proxy fence must be used to establish an ordering between prior writes to
//    shared memory matrices and subsequent reads of the same matrices in a wgmma.mma_async instruction."
//    (the tiles are written by cp.async / st.shared, generic proxy: each thread runs fence.proxy.async.shared::cta
//    after its copies completed and before the barrier that precedes the wgmma); wait_group: "Accessing the
//    accumulator register or the input register containing the fragments of matrix A of a wgmma.mma_async
//    instruction without first performing a wgmma.wait_group ... is undefined behavior"; and "The completion of a
//    wgmma.mma_async operation is followed by an implicit generic-async proxy fence" (so a Y buffer may be
//    refilled by cp.async after wait_group + __syncthreads).
// cp.async writes of the layout: a half-warp copies 8 rows x 2 chunks (lane & 7 = row, bit 3 = chunk), so each
// quarter-warp writes 128 contiguous bytes (no bank conflict) and each row's 32 global bytes come in one request.
// Reads by the tensor cores of the no-swizzle layout are 8 x 16-byte rows of one 128-byte core matrix: no bank
// conflict within a core matrix (how the hardware groups core matrices into wavefronts is not documented).
//
// STATUS: EXPERIMENTAL. Passes the CPU emulation (csrc/tests/test_wgmma_emu.cpp, csrc/tests/emu_wgmma.h) and
// compiles for sm_90a with HGMMA in the SASS; never run on a GPU. The emulation implements the PTX text above;
// if the hardware reads the layout differently the emulation cannot tell. ptxas keeps the wgmma instructions
// asynchronous (scripts/cpp_tests.sh fails on its C7515 "serialized" note) and, with the loops' trip counts
// fixed by NT, adds no warpgroup.arrive of its own (its C7519 note, counted there; with a run-time d it added one
// before each wgmma of the score loop and of an N = 16 / 32 / 48 / 64 branch for the last chunk).
//
// Launching (launch_flash / fl_slots via fl_with_kernel): only on compute capability 9.0 with code built for
// sm_90a (the body traps elsewhere); grid = grid_for(f.xblocks * f.splits), block = kTcThreads (256), dynamic
// shared memory = wg_smem<T>(d, stages).total (stages 2 unless it exceeds the opt-in limit), after
// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, total); NT = dpad / 8 (wg_with_nt),
// where flash_kernel takes 16 for dpad <= 128, else 32. FlArgs are filled exactly as for flash_kernel.
#pragma once

// Deliberately broken variants, selected at run time by the emulation test only (csrc/tests/test_wgmma_emu.cpp
// shows that each makes its checks fail); constant false on the device.
enum WgMutation {
  kWgMutNone = 0,
  kWgMutSwapX,         // LBO and SBO exchanged in the X (A) descriptor
  kWgMutSwapYK,        // ... in the K-major Y descriptor of the score product
  kWgMutSwapYN,        // ... in the N-major Y descriptor of the second product
  kWgMutNoTrans,       // second product without imm-trans-b
  kWgMutAOrder,        // A fragment registers 1 and 2 exchanged
  kWgMutNoWaitS,       // no wait_group before the scores are read
  kWgMutNoWaitO,       // no wait_group after the second product (Y buffer refilled while it may read it)
  kWgMutNoProxyFence,  // no fence.proxy.async after the tile copies
  kWgMutNoWgFence,     // no wgmma.fence before the score product
  kWgMutRowOffset,     // both warpgroups read X rows 0-63
  kWgMutCount
};
#ifdef CONTRASTBOUND_EMULATE
inline int wg_mutation = kWgMutNone;
inline bool wg_mut(int k) { return wg_mutation == k; }
#else
__device__ __forceinline__ constexpr bool wg_mut(int) { return false; }
#endif

#ifndef CONTRASTBOUND_EMULATE  // the PTX; the emulation (csrc/tests/emu_wgmma.h) defines the same functions
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Orders this thread's earlier generic-proxy writes of shared memory (st.shared, completed cp.async) before
// later async-proxy reads (wgmma operands).
__device__ __forceinline__ void wg_fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accesses of an accumulator register across the wgmma fence / wait.
__device__ __forceinline__ void wg_fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
template <typename T>
__device__ __forceinline__ void wg_st_smem(T* p, T v) {
  *p = v;
}

// D (m64n64, f32) = A B + (scale_d ? D : 0), A and B K-major from shared memory.
template <typename T>
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], uint64_t da, uint64_t db, int scale_d);
// D (m64nN, f32; d[0 .. N/2)) = A B + (scale_d ? D : 0), A from registers, B from shared memory (TB = imm-trans-b).
// Only N = 64 is defined: the output is always whole 64-feature chunks (dpad a multiple of 64).
template <typename T, int N, int TB>
struct WgmmaRs;

// The wgmma instructions, written once for both 16-bit types (TS: the type's PTX name, "bf16" or "f16").
#define CB_WGMMA_SS_N64(T, TS)                                                                                   \
  template <>                                                                                                    \
  __device__ __forceinline__ void wgmma_ss_n64<T>(float (&d)[32], uint64_t da, uint64_t db, int scale_d) {       \
    asm volatile(                                                                                                \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                          \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TS "." TS " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
        : "l"(da), "l"(db), "r"(scale_d));                                                                       \
  }

#define CB_WGMMA_RS_N64(T, TS)                                                                                   \
  template <int TB>                                                                                              \
  struct WgmmaRs<T, 64, TB> {                                                                                    \
    static __device__ __forceinline__ void run(float* d, const unsigned (&a)[4], uint64_t db, int scale_d) {     \
      asm volatile(                                                                                              \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                        \
          "wgmma.mma_async.sync.aligned.m64n64k16.f32." TS "." TS " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n" \
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
            "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
            "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
            "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d), "n"(TB));                         \
    }                                                                                                           \
  };

#define CB_WGMMA_ALL(T, TS) \
  CB_WGMMA_SS_N64(T, TS)    \
  CB_WGMMA_RS_N64(T, TS)

CB_WGMMA_ALL(__nv_bfloat16, "bf16")
CB_WGMMA_ALL(__half, "f16")

#undef CB_WGMMA_ALL
#undef CB_WGMMA_SS_N64
#undef CB_WGMMA_RS_N64

#endif  // CONTRASTBOUND_EMULATE

// Shared-memory matrix descriptor, no swizzle (start, LBO, SBO in bytes, 16-byte multiples below 2^18).
__device__ __forceinline__ uint64_t wg_desc(unsigned start, unsigned lbo, unsigned sbo) {
  return static_cast<uint64_t>((start & 0x3FFFFu) >> 4) | (static_cast<uint64_t>((lbo & 0x3FFFFu) >> 4) << 16) |
         (static_cast<uint64_t>((sbo & 0x3FFFFu) >> 4) << 32);
}

// Shared memory: the X tile (kFlRows rows), one or two Y tiles (kFlCols rows), each dpad features in the layout
// above (no padding: the layout is conflict-free without it), and the column arrays. ld is unused (0). dpad is d
// rounded up to 64 (zero features past d), so that the kernel for dpad has products of one fixed shape.
template <typename T>
TcSmem wg_smem(int64_t d, int stages) {
  TcSmem m;
  size_t o = tc_operand_tiles<T>(m, d, stages, kFlRows, kFlCols, 0, 64);
  m.s = m.p = m.cols = o;
  o = tc_align(o + sizeof(float) * 4 * kFlCols);  // yinv, ylse, yg (float), yex (int)
  m.total = o;
  return m;
}

// dst (ROWS rows, chunk-column layout) = src rows row0 .., features 0 .. dpad (zero past the rows and d). The
// 16-byte path copies asynchronously (complete after tc_commit + tc_wait), the scalar path at once.
template <typename T, int ROWS>
__device__ __forceinline__ void wg_issue(T* dst, const TcOperand<T>& src, int64_t row0, int64_t d, int dpad) {
  static_assert(sizeof(T) == 2, "16-bit elements");
  if (src.vec) {
    const int npairs = dpad / 16, dch = static_cast<int>(d / 8);  // chunk pairs per row; valid chunks
    const int units = (ROWS / 8) * npairs;                         // a unit: 8 rows x 2 chunks, one half-warp
    const int64_t rows_left = src.rows - row0;
    const T* base = src.ptr + row0 * src.s0;
    const unsigned dst0 = smem_u32(dst);
    const int rr = threadIdx.x & 7, cc = (threadIdx.x >> 3) & 1;
    for (int u = threadIdx.x >> 4; u < units; u += kTcThreads / 16) {
      const int rb = u / npairs;
      const int r = 8 * rb + rr, c = 2 * (u - rb * npairs) + cc;
      const bool ok = r < rows_left && c < dch;
      const T* g = ok ? base + r * src.s0 + c * 8 : src.ptr;  // not read when ok is false (source size 0)
      cp_async16(dst0 + static_cast<unsigned>((c * ROWS + r) * 16), g, ok ? 16 : 0);
    }
  } else {
    for (int e = threadIdx.x; e < ROWS * dpad; e += kTcThreads) {
      const int r = e / dpad, j = e % dpad;
      const int64_t row = row0 + r;
      wg_st_smem(dst + ((j >> 3) * ROWS + r) * 8 + (j & 7),
                 (row < src.rows && j < d) ? src.ptr[row * src.s0 + j * src.s1] : tc_zero<T>());
    }
  }
}

// tc_next_y for the wgmma layout: tile `it` of the walk (two stages: tile it + 1 issued first), complete and
// fenced for the async proxy by this thread. Called by every thread after the barrier that ends the use of the
// buffer it refills; a barrier must follow before the tile is read.
template <typename T, int DPAD>
__device__ __forceinline__ T* wg_next_y(unsigned char* raw, const TcSmem& m, const TcOperand<T>& Y, int64_t y0,
                                       int64_t y_end, int it, int64_t d) {
  T* cur = reinterpret_cast<T*>(raw + ((m.stages == 2 && (it & 1)) ? m.y1 : m.y));
  if (m.stages == 2) {
    if (it == 0) {
      wg_issue<T, kFlCols>(cur, Y, y0, d, DPAD);
      tc_commit();
    }
    if (y0 + kFlCols < y_end) {
      T* nxt = reinterpret_cast<T*>(raw + ((it & 1) ? m.y : m.y1));
      wg_issue<T, kFlCols>(nxt, Y, y0 + kFlCols, d, DPAD);
      tc_commit();
      tc_wait<1>();
    } else {
      tc_wait<0>();
    }
  } else {
    wg_issue<T, kFlCols>(cur, Y, y0, d, DPAD);
    tc_commit();
    tc_wait<0>();
  }
  if (!wg_mut(kWgMutNoProxyFence)) wg_fence_proxy_async();
  return cur;
}

// f(std::integral_constant<int, NT>) for the wgmma kernel of a plan's dpad (64, 128, 192 or 256): NT = dpad / 8
// n8 tiles per output row, so that every loop over features has a trip count fixed at compile time (with a
// run-time count ptxas adds a warpgroup.arrive before each wgmma of the loop, note C7519).
template <typename F>
auto wg_with_nt(int dpad, const F& f) {
  if (dpad <= 64) return f(std::integral_constant<int, 8>{});
  if (dpad <= 128) return f(std::integral_constant<int, 16>{});
  if (dpad <= 192) return f(std::integral_constant<int, 24>{});
  return f(std::integral_constant<int, 32>{});
}

template <typename T, FlashMode MODE, int NT>
__global__ void __launch_bounds__(kTcThreads, 1)
    wgmma_kernel(const TcOperand<T> X, const TcOperand<T> Y, const FlArgs a, const TcSmem m) {
#if defined(CONTRASTBOUND_EMULATE) || (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL))
  static_assert(NT % 8 == 0 && NT >= 8 && NT <= 32, "NT = dpad / 8: whole 64-feature chunks, d <= 256");
  constexpr int kDpad = 8 * NT;       // m.dpad (wg_with_nt chose NT from it)
  constexpr int kKsteps = kDpad / 16;  // k16 slices of the score product
  static_assert(kFlRows == 128 && kFlCols == 64 && kTcThreads == 256, "two warpgroups of 64 rows, 64-row Y tiles");
  constexpr unsigned kCore = 128;                // bytes of one 8 x 8 core matrix (the 8-row step)
  constexpr unsigned kXk = 16u * kFlRows;        // X: bytes between feature chunks (8 features)
  constexpr unsigned kYk = 16u * kFlCols;        // Y: bytes between feature chunks
  unsigned char* const tc_raw = tc_dynamic_smem();
  T* xs = reinterpret_cast<T*>(tc_raw + m.x);
  float* yinv = reinterpret_cast<float*>(tc_raw + m.cols);
  float* ylse = yinv + kFlCols;
  float* yg = ylse + kFlCols;
  int* yex = reinterpret_cast<int*>(yg + kFlCols);  // BankGrads: see tc_col_excluded
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int wg = warp >> 2;  // warpgroup: X rows 64 wg .. 64 wg + 63 of the block; warp = 4 wg + (warp & 3)
  const unsigned xa = smem_u32(xs) + (wg_mut(kWgMutRowOffset) ? 0u : static_cast<unsigned>(wg) * 8u * kCore);
  const uint64_t xdesc = wg_mut(kWgMutSwapX) ? wg_desc(xa, kCore, kXk) : wg_desc(xa, kXk, kCore);
  const float cscale = tc_coef_scale(a.coef_bound);
  const float unscale = 1.f / cscale;  // a power of two: exact
  const int64_t ytiles = (Y.rows + kFlCols - 1) / kFlCols;
  const int64_t units = a.xblocks * a.splits;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t xb = u % a.xblocks, split = u / a.xblocks;
    const int64_t x0 = xb * kFlRows;
    const int64_t t_begin = split * a.tiles_per_split, t_end = min64(ytiles, t_begin + a.tiles_per_split);
    __syncthreads();  // the previous unit's X tile and Y buffers are no longer read (its wgmma all waited for)
    wg_issue<T, kFlRows>(xs, X, x0, a.d, kDpad);
    tc_commit();
    tc_wait<0>();
    if (!wg_mut(kWgMutNoProxyFence)) wg_fence_proxy_async();
    // This thread's rows, as in flash_kernel: 16 warp + g + 8 h of the block (= 64 wg + 16 (warp & 3) + ...).
    int64_t row[2], row_ex[2];
    float xinv[2], run_m[2], run_s[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row[h] = x0 + 16 * warp + g + 8 * h;
      // The column this row leaves out: by X row (Forward; exclude_self in every mode), else per
      // column (yex).
      row_ex[h] = excluded_row(a.exclude_self, MODE == FlashMode::BankGrads ? nullptr : a.excluded, row[h], X.rows);
      const bool ok = row[h] < X.rows;
      xinv[h] = ok ? a.x_inv[row[h]] * read_scale(a.scale) : 0.f;
      run_m[h] = -INFINITY;
      run_s[h] = 0.f;
    }
    // acc[4 j + e]: n8 tile j of the output (f32 D fragment); chunk c of 64 features = acc[32 c .. 32 c + 31].
    float acc[NT * 4];
#pragma unroll
    for (int i = 0; i < NT * 4; ++i) acc[i] = 0.f;
    const int64_t y_end = min64(Y.rows, t_end * kFlCols);
    for (int64_t tile = t_begin; tile < t_end; ++tile) {
      const int64_t y0 = tile * kFlCols;
      __syncthreads();  // the Y buffer about to be refilled and the column arrays are consumed
      const T* ys = wg_next_y<T, kDpad>(tc_raw, m, Y, y0, y_end, static_cast<int>(tile - t_begin), a.d);
      if (threadIdx.x < kFlCols) {
        const int64_t y = y0 + threadIdx.x;
        const bool ok = y < Y.rows;
        yinv[threadIdx.x] = ok ? a.y_inv[y] : 0.f;
        ylse[threadIdx.x] = (ok && MODE == FlashMode::BankGrads) ? a.lse[y] : 0.f;
        yg[threadIdx.x] = (ok && MODE == FlashMode::BankGrads) ? a.g[y] * read_scale(a.scale) : 0.f;
        yex[threadIdx.x] = MODE == FlashMode::BankGrads ? tc_col_excluded(a.excluded, y, Y.rows, x0, kFlRows) : -1;
      }
      __syncthreads();  // the tile (copied and proxy-fenced by every thread) and the column arrays are complete
      const unsigned ya = smem_u32(ys);
      // Scores of the warpgroup's 64 rows x the tile's 64 columns; this thread: sc[4 j + e] (n8 tile j).
      float sc[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) wg_fence_operand(sc[i]);
      if (!wg_mut(kWgMutNoWgFence)) wg_fence();
#pragma unroll
      for (int k = 0; k < kKsteps; ++k) {
        const unsigned xk = static_cast<unsigned>(k) * 2u * kXk, yk = static_cast<unsigned>(k) * 2u * kYk;
        const uint64_t db = wg_mut(kWgMutSwapYK) ? wg_desc(ya + yk, kCore, kYk) : wg_desc(ya + yk, kYk, kCore);
        wgmma_ss_n64<T>(sc, xdesc + (xk >> 4), db, k > 0 ? 1 : 0);  // the start address field: + bytes / 16
      }
      wg_commit();
      if (!wg_mut(kWgMutNoWaitS)) wg_wait<0>();
#pragma unroll
      for (int i = 0; i < 32; ++i) wg_fence_operand(sc[i]);
      // Coefficients in place of the scores (masked ones 0): flash_kernel's code, sc[j][e] = sc[4 j + e].
      const int lim = static_cast<int>(min64(kFlCols, Y.rows - y0));  // valid columns of this tile
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int hlim = row[h] < X.rows ? lim : 0;
        const int64_t dself = row_ex[h] - y0;
        const int selfc = (dself >= 0 && dself < kFlCols) ? static_cast<int>(dself) : -1;
        const int xloc = static_cast<int>(row[h] - x0);  // BankGrads: compared with yex
        if (MODE == FlashMode::Forward) {
          // Masked columns are left out by branches, not as -inf logits: computing them as -inf in the score
          // registers made ptxas serialize every wgmma of the kernel (C7515).
          float tmax = -INFINITY;
#pragma unroll
          for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int col = 8 * j + 2 * t + e;
              if (col < hlim && col != selfc) tmax = fmax_nan(tmax, sc[4 * j + 2 * h + e] * xinv[h] * yinv[col]);
            }
          tmax = fl_quad_max(tmax);  // the quad holds the row's 64 columns
          const float mnew = fmax_nan(run_m[h], tmax);
          const float alpha = run_m[h] == -INFINITY ? 0.f : __expf(run_m[h] - mnew);
          run_m[h] = mnew;
          run_s[h] *= alpha;
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            acc[4 * j + 2 * h] *= alpha;
            acc[4 * j + 2 * h + 1] *= alpha;
          }
#pragma unroll
          for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int col = 8 * j + 2 * t + e;
              float c = 0.f;
              if (col < hlim && col != selfc) {
                const float l = sc[4 * j + 2 * h + e] * xinv[h] * yinv[col];
                const float p = l == -INFINITY ? 0.f : __expf(l - mnew);
                run_s[h] += p;  // this lane's part; the quad's parts are added at the end
                c = p * tc_coef_inv<T>(yinv[col], cscale);
              }
              sc[4 * j + 2 * h + e] = c;
            }
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int col = 8 * j + 2 * t + e;
              const bool keep = col < hlim && col != selfc && (MODE != FlashMode::BankGrads || yex[col] != xloc);
              float c = 0.f;
              if (keep) {
                const float l = sc[4 * j + 2 * h + e] * xinv[h] * yinv[col];
                c = yg[col] * __expf(l - ylse[col]) * tc_coef_inv<T>(yinv[col], cscale);
              }
              sc[4 * j + 2 * h + e] = c;
            }
        }
      }
      // O (64 x dpad) += C (64 x 64) Y (64 x dpad): the coefficients of n8 tiles 2 kk, 2 kk + 1 are the A fragment
      // of K slice kk (Y rows 16 kk ..), as in flash_kernel.
      unsigned pa[4][4];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        pa[kk][0] = pack2<T>(sc[8 * kk], sc[8 * kk + 1]);
        pa[kk][1] = pack2<T>(sc[8 * kk + 2], sc[8 * kk + 3]);
        pa[kk][2] = pack2<T>(sc[8 * kk + 4], sc[8 * kk + 5]);
        pa[kk][3] = pack2<T>(sc[8 * kk + 6], sc[8 * kk + 7]);
        if (wg_mut(kWgMutAOrder)) {
          const unsigned s = pa[kk][1];
          pa[kk][1] = pa[kk][2];
          pa[kk][2] = s;
        }
      }
#pragma unroll
      for (int i = 0; i < NT * 4; ++i) wg_fence_operand(acc[i]);
      wg_fence();  // the accumulators (Forward: rescaled) and the A fragments were written by other instructions
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
        for (int c = 0; c < NT / 8; ++c) {
          const unsigned yb = ya + static_cast<unsigned>(c) * 8u * kYk + static_cast<unsigned>(kk) * 2u * kCore;
          const uint64_t db = wg_mut(kWgMutSwapYN) ? wg_desc(yb, kYk, kCore) : wg_desc(yb, kCore, kYk);
          if (wg_mut(kWgMutNoTrans)) {
            WgmmaRs<T, 64, 0>::run(acc + 32 * c, pa[kk], db, 1);
          } else {
            WgmmaRs<T, 64, 1>::run(acc + 32 * c, pa[kk], db, 1);
          }
        }
      }
      wg_commit();
      if (!wg_mut(kWgMutNoWaitO)) wg_wait<0>();  // before the barrier after which the Y buffer may be refilled
#pragma unroll
      for (int i = 0; i < NT * 4; ++i) wg_fence_operand(acc[i]);
    }
    // The X tile was copied by every thread: a unit without Y tiles (no anchors) has passed no barrier since.
    __syncthreads();
    // Row r of the X tile, feature j: element ((j / 8) kFlRows + r) 8 + j % 8 (the interleaved layout above).
    const int xr = 16 * warp + g;  // row[0] - x0; row[1] is xr + 8
    fl_epilogue<T, MODE, NT>(acc, row, run_m, run_s, split, unscale, t, X, a, [&](int h, int col) {
      return to_acc<float>(xs[((col >> 3) * kFlRows + xr + 8 * h) * 8 + (col & 7)]);
    });
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built without the sm_90a features: never launch it there
#endif
}
