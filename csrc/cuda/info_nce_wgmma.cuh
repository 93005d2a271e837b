// Hopper (sm_90a) version of the flash-layout kernels (info_nce_flash.cuh) with warpgroup MMA (wgmma.mma_async).
// Included after info_nce_flash.cuh (FlashMode, FlArgs, kFlRows, kFlCols, fl_quad_*, fl_coefficients), inside the
// same anonymous namespace; torch-free. The default where device_runs_sm90a() (tc_wgmma; CONTRASTBOUND_TC_WGMMA=0
// turns it off): launch_flash in info_nce_cuda_impl.cuh runs these in place of flash_kernel (see "Launching" below).
//
// Same arguments, work split and outputs as flash_kernel<T, MODE, NT> (NT here: dpad / 8 with dpad = d rounded up
// to 64, so 8, 16, 24 or 32; every product below has a shape fixed at compile time): a block of 256 threads owns
// kFlRows = 128 X rows and walks the 64-row Y tiles of its split; the two warpgroups (warps 0-3, 4-7) own X rows
// 0-63 and 64-127 of the block. Per Y tile and warpgroup:
//   S (64 x 64, f32 registers) = X_wg Y^T    wgmma m64n64k16, A and B from shared memory (descriptors, K-major),
//                                            dpad / 16 instructions, the first with scale-d = 0 (S = A B);
//   C = coefficient(S) in place (identical code to flash_kernel), cast to T and packed as the A fragments;
//   O (64 x dpad, f32 registers) += C Y     wgmma m64n{dpad}k16 with A from registers and B = the same Y tile
//                                            read as an N-major operand (imm-trans-b = 1), one per k16 slice (4).
// Pipelined as FlashAttention-3's intra-warpgroup overlap: per tile i, after one barrier, S(i + 1) and O(i) are
// issued as two commit groups; wait_group 1 completes S(i + 1), whose coefficients (the exponentials: the CUDA
// cores' share of the work) are formed while O(i) runs on the tensor cores; wait_group 0 then completes O(i) before
// its accumulators are rescaled (Forward: e^{m_old - m_new} of tile i + 1's max) and its A registers take tile
// i + 1's coefficients (pa / pn: two sets, as the product in flight reads its A registers). Y tiles go through three
// buffers: tile i + 2 is copied (cp.async) while tiles i and i + 1 are read; the barrier of tile i (after every
// thread's wait for O(i - 1) and for its copies of tile i + 1) frees buffer (i + 2) % 3. The column arrays (inverse
// norms, lse, g s, excluded offsets) have two slots in use, tile i + 1's written before that barrier.
// MODE Lse (a forward that needs no anchors' term: no gradient, or anchors that take none; flash_kernel has no such
// instance): the same walk without the output product; per tile i, after the barrier, S(i + 1) is issued and tile
// i's exponentials and sums (its scores held in registers since the previous step) are formed while it runs, then
// wait_group 0; the (max, sum) partials only. Its Y tiles are copied two steps ahead (tile i + 3 into the buffer
// of tile i, whose scores are complete), and its column arrays have three slots (tile i's read while tile i + 2's
// are written).
//
// Shared memory: X (128 rows) and three Y tiles (64 rows) in the no-swizzle ("interleaved") canonical
// layout, as 16-byte chunks in chunk-column order: element (row r, feature j) of a tile of R rows is at byte
//   ((j / 8) R + r) 16 + (j % 8) 2,
// i.e. 8 x 8 core matrices of 128 contiguous bytes (row r % 8 at 16 (r % 8), feature j % 8 at 2 (j % 8)); the core
// matrix of row block r / 8 and feature block j / 8 starts at (j / 8) 16 R + (r / 8) 128.
// Descriptors (bytes; encoded >> 4; swizzle mode 0, base offset 0):
//   X as A of S, K-major (M = row, K = feature):    LBO = 16 R_x = 2048, SBO = 128, start = x + 2048 (2 k16) + 1024 wg
//   Y as B of S, K-major (N = y row, K = feature):  LBO = 16 R_y = 1024, SBO = 128, start = y + 1024 (2 k16)
//   Y as B of O, N-major (K = y row, N = feature):  LBO = 128,  SBO = 16 R_y = 1024, start = y + 256 k16
//   (k16: the 16-wide K slice; wg: the warpgroup)
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
// STATUS: the default on sm_90a (tc_wgmma). Passes the CPU emulation (csrc/tests/test_wgmma_emu.cpp,
// csrc/tests/emu_wgmma.h) and compiles for sm_90a with HGMMA in the SASS. On an H200 (2026-12-04) the layout probe
// (csrc/tests/wgmma_probe.cu) read every product as the PTX text says, tests/test_cuda.py's wgmma cases passed and
// a bf16 step ran 1.5x faster than on the mma.sync kernels (B = 8192, K = 2^18, d = 256); the shared coefficient code
// (fl_coefficients: its path without per-column tests, the masks and labels) came later and has not run there yet.
// ptxas keeps the wgmma instructions asynchronous (scripts/cpp_tests.sh fails on its C7510-C7518 "serialized" notes)
// and, with the loops' trip counts fixed by NT, adds no warpgroup.arrive of its own (its C7519 note, counted there;
// with a run-time d it added one before each wgmma of the score loop and of an N = 16 / 32 / 48 / 64 branch for the
// last chunk).
//
// Launching (launch_flash / fl_slots via fl_with_kernel): only on compute capability 9.0 with code built for
// sm_90a (the body traps elsewhere); grid = grid_for(f.xblocks * f.splits), block = kTcThreads (256), dynamic
// shared memory = wg_smem<T>(d).total (three Y buffers, whatever CONTRASTBOUND_TC_STAGES says), after
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
  kWgMutNoWaitO,       // no wait_group after the second product (its registers reused while it may run)
  kWgMutNoProxyFence,  // no fence.proxy.async after the tile copies
  kWgMutNoWgFence,     // no wgmma.fence before the score product
  kWgMutRowOffset,     // both warpgroups read X rows 0-63
  kWgMutReuseA,        // the next tile's coefficients written into the A registers of the product in flight
  kWgMutEarlyRescale,  // Forward: the output rows rescaled before the product that accumulates into them completed
  kWgMutEarlyRefill,   // tile i + 2 copied before the barrier after which no warpgroup reads its buffer
  kWgMutOneColSlot,    // one slot of column arrays (tile i + 2's written while tile i + 1's are read)
  kWgMutWriteAfterFence,  // Forward: the output rows rescaled after the wgmma.fence that precedes their product
  kWgMutLseTwoSlots,   // Lse: column slots by tile % 2 (tile + 2's written over tile's, which are being read)
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
__device__ __forceinline__ void wg_fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving accesses of an accumulator (or A fragment) register across the wgmma fence / wait.
__device__ __forceinline__ void wg_fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void wg_fence_operand(unsigned& r) { asm volatile("" : "+r"(r)::"memory"); }
template <typename T>
__device__ __forceinline__ void wg_st_smem(T* p, T v) {
  *p = v;
}

// D (m64n64, f32) = A B + (scale_d ? D : 0), A and B K-major from shared memory.
template <typename T>
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], uint64_t da, uint64_t db, int scale_d);
// D (m64nN, f32; d[0 .. N/2)) = A B + (scale_d ? D : 0), A from registers, B from shared memory (TB = imm-trans-b).
// N = 64, 128, 192, 256: the output product covers all dpad features of a row in one instruction per k16 slice.
template <typename T, int N, int TB>
struct WgmmaRs;

// The wgmma instructions, written once for both 16-bit types (TS: the type's PTX name, "bf16" or "f16") and, for
// the register-A form, every N = 64 .. 256 (64 j columns: 32 j accumulators, then the A registers, the B
// descriptor, scale-d and imm-trans-b). Operand lists by blocks of 8: CB_WG_R<b> names %8b .. %8b+7, CB_WG_D8(b)
// binds d[b] .. d[b + 7].
#define CB_WG_R0 "%0, %1, %2, %3, %4, %5, %6, %7"
#define CB_WG_R1 "%8, %9, %10, %11, %12, %13, %14, %15"
#define CB_WG_R2 "%16, %17, %18, %19, %20, %21, %22, %23"
#define CB_WG_R3 "%24, %25, %26, %27, %28, %29, %30, %31"
#define CB_WG_R4 "%32, %33, %34, %35, %36, %37, %38, %39"
#define CB_WG_R5 "%40, %41, %42, %43, %44, %45, %46, %47"
#define CB_WG_R6 "%48, %49, %50, %51, %52, %53, %54, %55"
#define CB_WG_R7 "%56, %57, %58, %59, %60, %61, %62, %63"
#define CB_WG_R8 "%64, %65, %66, %67, %68, %69, %70, %71"
#define CB_WG_R9 "%72, %73, %74, %75, %76, %77, %78, %79"
#define CB_WG_R10 "%80, %81, %82, %83, %84, %85, %86, %87"
#define CB_WG_R11 "%88, %89, %90, %91, %92, %93, %94, %95"
#define CB_WG_R12 "%96, %97, %98, %99, %100, %101, %102, %103"
#define CB_WG_R13 "%104, %105, %106, %107, %108, %109, %110, %111"
#define CB_WG_R14 "%112, %113, %114, %115, %116, %117, %118, %119"
#define CB_WG_R15 "%120, %121, %122, %123, %124, %125, %126, %127"
#define CB_WG_D8(b) "+f"(d[b]), "+f"(d[b + 1]), "+f"(d[b + 2]), "+f"(d[b + 3]), "+f"(d[b + 4]), "+f"(d[b + 5]), \
                    "+f"(d[b + 6]), "+f"(d[b + 7])
#define CB_WG_D32(b) CB_WG_D8(b), CB_WG_D8(b + 8), CB_WG_D8(b + 16), CB_WG_D8(b + 24)
#define CB_WG_REGS32 CB_WG_R0 ", " CB_WG_R1 ", " CB_WG_R2 ", " CB_WG_R3
#define CB_WG_REGS64 CB_WG_REGS32 ", " CB_WG_R4 ", " CB_WG_R5 ", " CB_WG_R6 ", " CB_WG_R7
#define CB_WG_REGS96 CB_WG_REGS64 ", " CB_WG_R8 ", " CB_WG_R9 ", " CB_WG_R10 ", " CB_WG_R11
#define CB_WG_REGS128 CB_WG_REGS96 ", " CB_WG_R12 ", " CB_WG_R13 ", " CB_WG_R14 ", " CB_WG_R15

#define CB_WGMMA_SS_N64(T, TS)                                                                                   \
  template <>                                                                                                    \
  __device__ __forceinline__ void wgmma_ss_n64<T>(float (&d)[32], uint64_t da, uint64_t db, int scale_d) {       \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                    \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TS "." TS " {" CB_WG_REGS32                     \
                 "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                                              \
                 : CB_WG_D32(0)                                                                                  \
                 : "l"(da), "l"(db), "r"(scale_d));                                                              \
  }

// N, its accumulators' register list, the operand numbers of scale-d (for setp) and of the A registers .. trans-b
// (the tail of the instruction), then the accumulators' bindings.
#define CB_WGMMA_RS(T, TS, N, REGS, SCALE, TAIL, ...)                                                            \
  template <int TB>                                                                                              \
  struct WgmmaRs<T, N, TB> {                                                                                     \
    static __device__ __forceinline__ void run(float* d, const unsigned (&a)[4], uint64_t db, int scale_d) {     \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"                                           \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TS "." TS " {" REGS "}, " TAIL ";\n}\n"  \
                   : __VA_ARGS__                                                                                 \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d), "n"(TB));               \
    }                                                                                                           \
  };

#define CB_WGMMA_ALL(T, TS)                                                                                      \
  CB_WGMMA_SS_N64(T, TS)                                                                                         \
  CB_WGMMA_RS(T, TS, 64, CB_WG_REGS32, "%37", "{%32, %33, %34, %35}, %36, p, 1, 1, %38", CB_WG_D32(0))          \
  CB_WGMMA_RS(T, TS, 128, CB_WG_REGS64, "%69", "{%64, %65, %66, %67}, %68, p, 1, 1, %70", CB_WG_D32(0),         \
              CB_WG_D32(32))                                                                                     \
  CB_WGMMA_RS(T, TS, 192, CB_WG_REGS96, "%101", "{%96, %97, %98, %99}, %100, p, 1, 1, %102", CB_WG_D32(0),      \
              CB_WG_D32(32), CB_WG_D32(64))                                                                      \
  CB_WGMMA_RS(T, TS, 256, CB_WG_REGS128, "%133", "{%128, %129, %130, %131}, %132, p, 1, 1, %134", CB_WG_D32(0), \
              CB_WG_D32(32), CB_WG_D32(64), CB_WG_D32(96))

CB_WGMMA_ALL(__nv_bfloat16, "bf16")
CB_WGMMA_ALL(__half, "f16")

#undef CB_WGMMA_ALL
#undef CB_WGMMA_SS_N64
#undef CB_WGMMA_RS
#undef CB_WG_REGS128
#undef CB_WG_REGS96
#undef CB_WG_REGS64
#undef CB_WG_REGS32
#undef CB_WG_D32
#undef CB_WG_D8
#undef CB_WG_R0
#undef CB_WG_R1
#undef CB_WG_R2
#undef CB_WG_R3
#undef CB_WG_R4
#undef CB_WG_R5
#undef CB_WG_R6
#undef CB_WG_R7
#undef CB_WG_R8
#undef CB_WG_R9
#undef CB_WG_R10
#undef CB_WG_R11
#undef CB_WG_R12
#undef CB_WG_R13
#undef CB_WG_R14
#undef CB_WG_R15

#endif  // CONTRASTBOUND_EMULATE

// Slots of the column arrays: tile i + 1's are written while tile i's are read (Forward, BankGrads: slot i % 2);
// the Lse walk reads tile i's while tile i + 1's scores are formed and writes tile i + 2's (slot i % 3).
constexpr int kWgColSlots = 3;

// Shared-memory matrix descriptor, no swizzle (start, LBO, SBO in bytes, 16-byte multiples below 2^18).
__device__ __forceinline__ uint64_t wg_desc(unsigned start, unsigned lbo, unsigned sbo) {
  return static_cast<uint64_t>((start & 0x3FFFFu) >> 4) | (static_cast<uint64_t>((lbo & 0x3FFFFu) >> 4) << 16) |
         (static_cast<uint64_t>((sbo & 0x3FFFFu) >> 4) << 32);
}

// wgmma_kernel's operands in the layout of the header (bytes), its descriptors, A fragments and output product, as
// functions
// so that csrc/tests/wgmma_probe.cu runs this very code on known matrices (hardware diagnosis). The wg_mut hooks
// are the emulation test's deliberate bugs (constant false on the device).
constexpr unsigned kWgCore = 128;          // one 8 x 8 core matrix: the 8-row step
constexpr unsigned kWgXk = 16u * kFlRows;  // X tile: between feature chunks (8 features)
constexpr unsigned kWgYk = 16u * kFlCols;  // Y tile: between feature chunks

// The X tile at shared address xs, rows 64 wg .. 64 wg + 63 (warpgroup wg), as A of the score product, K-major;
// k16 slice k: + wg_x_step(k).
__device__ __forceinline__ uint64_t wg_x_desc(unsigned xs, int wg) {
  const unsigned xa = xs + (wg_mut(kWgMutRowOffset) ? 0u : static_cast<unsigned>(wg) * 8u * kWgCore);
  return wg_mut(kWgMutSwapX) ? wg_desc(xa, kWgCore, kWgXk) : wg_desc(xa, kWgXk, kWgCore);
}
// What k16 slice k adds to an X descriptor: its start address field (bytes / 16) moved by two feature chunks.
__device__ __forceinline__ uint64_t wg_x_step(int k) { return (static_cast<unsigned>(k) * 2u * kWgXk) >> 4; }

// The Y tile at shared address ya, k16 slice k, as B of the score product, K-major (N = Y row, K = feature).
__device__ __forceinline__ uint64_t wg_yk_desc(unsigned ya, int k) {
  const unsigned yk = ya + static_cast<unsigned>(k) * 2u * kWgYk;
  return wg_mut(kWgMutSwapYK) ? wg_desc(yk, kWgCore, kWgYk) : wg_desc(yk, kWgYk, kWgCore);
}

// The Y tile at ya, K slice kk (Y rows 16 kk .. 16 kk + 15), as B of the output product, N-major (K = Y row,
// N = feature; the product's imm-trans-b is 1).
__device__ __forceinline__ uint64_t wg_yn_desc(unsigned ya, int kk) {
  const unsigned yb = ya + static_cast<unsigned>(kk) * 2u * kWgCore;
  return wg_mut(kWgMutSwapYN) ? wg_desc(yb, kWgYk, kWgCore) : wg_desc(yb, kWgCore, kWgYk);
}

// The A fragments of the output product from a 64 x 64 f32 fragment in the score product's D layout (sc[4 j + e]:
// n8 tile j): pa[kk] = K slice kk = n8 tiles 2 kk and 2 kk + 1, in the mma.m16n8k16 A register order.
template <typename T>
__device__ __forceinline__ void wg_pack_a(const float (&sc)[32], unsigned (&pa)[4][4]) {
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
}

// O (64 x N, this thread's acc[N / 2], f32 D fragment) += C Y: C in the A registers pa (wg_pack_a), the Y tile at
// ya read N-major, one wgmma per K slice (issued, not committed; the caller fences before and commits after).
template <typename T, int N>
__device__ __forceinline__ void wg_output_product(float* acc, const unsigned (&pa)[4][4], unsigned ya) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint64_t db = wg_yn_desc(ya, kk);
    if (wg_mut(kWgMutNoTrans)) {
      WgmmaRs<T, N, 0>::run(acc, pa[kk], db, 1);
    } else {
      WgmmaRs<T, N, 1>::run(acc, pa[kk], db, 1);
    }
  }
}

// Shared memory: the X tile (kFlRows rows), three Y tiles (kFlCols rows: the pipeline below reads two while the
// third is copied), each dpad features in the layout above (no padding: the layout is conflict-free without it),
// and kWgColSlots slots of the column arrays. ld is unused (0). dpad is d rounded up to 64 (zero features past d),
// so that the kernel for dpad has products of one fixed shape. 168.5 KiB at d = 256 (an H100 / H200 block may
// have 227 KiB).
template <typename T>
TcSmem wg_smem(int64_t d) {
  TcSmem m;
  size_t o = tc_operand_tiles<T>(m, d, 2, kFlRows, kFlCols, 0, 64);  // X, Y buffers 0 and 1
  m.chunk = 0;  // whole rows (also the kernel's keep0, which must be 0)
  m.y2 = o;
  o = tc_align(o + sizeof(T) * static_cast<size_t>(m.dpad) * kFlCols);
  m.stages = 3;
  m.s = m.p = m.cols = o;
  // the column slots (fl_store_cols), then the X rows' labels (fl_store_xlab)
  o = tc_align(o + sizeof(float) * kWgColSlots * kFlSlotWords + sizeof(long long) * kFlRows);
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

// Issues the copy of Y tile `tile` (rows tile * kFlCols ..) into Y buffer tile % 3 and commits it (one cp.async
// group). Every thread calls it, after the barrier that ends the last use of that buffer.
template <typename T, int DPAD>
__device__ __forceinline__ void wg_issue_y(unsigned char* raw, const TcSmem& m, const TcOperand<T>& Y, int64_t tile,
                                           int64_t d) {
  T* dst = reinterpret_cast<T*>(raw + m.y + static_cast<size_t>(tile % 3) * (m.y1 - m.y));
  wg_issue<T, kFlCols>(dst, Y, tile * kFlCols, d, DPAD);
  tc_commit();
}

// The shared-memory address of Y tile `tile`'s buffer (the buffers are equally spaced: wg_smem).
__device__ __forceinline__ unsigned wg_y_addr(unsigned char* raw, const TcSmem& m, int64_t tile) {
  return smem_u32(raw + m.y) + static_cast<unsigned>(tile % 3) * static_cast<unsigned>(m.y1 - m.y);
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

// Diagnostic build only (CONTRASTBOUND_WG_TIMING, setup.py's switch of the same name): each warpgroup adds the
// multiprocessor's cycles spent in the phases of wgmma_kernel's units, from the lower 32 bits of clock64 (a phase
// and a warpgroup's sums stay far below 2^32 cycles at the sizes benchmarked), and thread 0 of each warpgroup adds
// them at exit into the launch's totals (wg_timing_total, atomics: a grid has up to thousands of blocks), with the
// largest and smallest warpgroup total; launch_flash then prints and clears them (wg_timing_print_kernel), one line
// per launch, which benchmarks/wg_timing.py reads. (A printf in wgmma_kernel itself made ptxas serialize its wgmma,
// note C7510: a call inside the pipeline's function.) Phases: 0 a unit's prologue (X and the first tiles copied,
// the first scores and coefficients), 1 the wait for tile + 1's copy and the barrier, 2 the score product of
// tile + 1 issued with the output product of tile, until the scores are complete, 3 the coefficients, 4 the wait
// for the output product, the rescale and the A copy, 5 the last output product and the epilogue. In the default
// build every member is empty and the kernel is unchanged.
#ifdef CONTRASTBOUND_WG_TIMING
constexpr int kWgTimingFields = 8;  // units, tiles (warpgroup 0's: its block's), the six phases (both warpgroups)
__device__ unsigned long long wg_timing_total[kWgTimingFields];
__device__ unsigned wg_timing_groups = 0, wg_timing_max = 0, wg_timing_min = ~0u;
#endif

struct WgTiming {
#ifdef CONTRASTBOUND_WG_TIMING
  unsigned t = 0, units = 0, tiles = 0, sum[6] = {0, 0, 0, 0, 0, 0};
  __device__ __forceinline__ void start() { t = static_cast<unsigned>(clock64()); }
  __device__ __forceinline__ void lap(int phase) {
    const unsigned now = static_cast<unsigned>(clock64());
    sum[phase] += now - t;
    t = now;
  }
  __device__ __forceinline__ void report(int wg) const {
    if ((threadIdx.x & 127) != 0) return;
    if (wg == 0) {
      atomicAdd(&wg_timing_total[0], static_cast<unsigned long long>(units));
      atomicAdd(&wg_timing_total[1], static_cast<unsigned long long>(tiles));
    }
    unsigned total = 0;
    for (int f = 0; f < 6; ++f) {
      atomicAdd(&wg_timing_total[2 + f], static_cast<unsigned long long>(sum[f]));
      total += sum[f];
    }
    atomicAdd(&wg_timing_groups, 1u);
    atomicMax(&wg_timing_max, total);
    atomicMin(&wg_timing_min, total);
  }
#else
  __device__ __forceinline__ void start() {}
  __device__ __forceinline__ void lap(int) {}
  __device__ __forceinline__ void report(int) const {}
#endif
};

template <typename T, FlashMode MODE, int NT>
__global__ void __launch_bounds__(kTcThreads, 1)
    wgmma_kernel(const TcOperand<T> X, const TcOperand<T> Y, const FlArgs a, const TcSmem m) {
#if defined(CONTRASTBOUND_EMULATE) || (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL))
  static_assert(NT % 8 == 0 && NT >= 8 && NT <= 32, "NT = dpad / 8: whole 64-feature chunks, d <= 256");
  constexpr int kDpad = 8 * NT;       // m.dpad (wg_with_nt chose NT from it); the N of the output product
  constexpr int kKsteps = kDpad / 16;  // k16 slices of the score product
  // Lse: the score product and the running (max, sum) alone (no coefficients packed, no output product, whose
  // accumulators the compiler then drops), in a walk of its own below.
  constexpr bool kOut = MODE != FlashMode::Lse;
  static_assert(kFlRows == 128 && kFlCols == 64 && kTcThreads == 256, "two warpgroups of 64 rows, 64-row Y tiles");
  unsigned char* const tc_raw = tc_dynamic_smem();
  T* xs = reinterpret_cast<T*>(tc_raw + m.x);
  float* const cols = reinterpret_cast<float*>(tc_raw + m.cols);  // slot s: cols + kFlSlotWords s (store_cols)
  // The X rows' labels (fl_store_xlab), after the slots
  long long* const xlab = reinterpret_cast<long long*>(cols + kWgColSlots * kFlSlotWords);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int wg = warp >> 2;  // warpgroup: X rows 64 wg .. 64 wg + 63 of the block; warp = 4 wg + (warp & 3)
  const uint64_t xdesc = wg_x_desc(smem_u32(xs), wg);
  const float cscale = tc_coef_scale(a.coef_bound);
  const float unscale = 1.f / cscale;  // a power of two: exact
  const int64_t ytiles = (Y.rows + kFlCols - 1) / kFlCols;
  const int64_t units = a.xblocks * a.splits;
  // 0 (wg_smem's plan, checked by launch_flash), unknown to the compiler: see pa = pn below.
  const unsigned keep0 = static_cast<unsigned>(m.chunk);
  WgTiming timing;  // (the diagnostic build's phase cycles; empty otherwise)
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    timing.start();
    const int64_t xb = u % a.xblocks, split = u / a.xblocks;
    const int64_t x0 = xb * kFlRows;
    const int64_t t_begin = split * a.tiles_per_split, t_end = min64(ytiles, t_begin + a.tiles_per_split);
    // Tile `tile`'s column values (fl_load_cols) into its slot of the column arrays (kWgColSlots). Loaded right
    // after the barrier of tile - 2 and stored late in that step, so that the global loads' latency hides behind
    // the tensor cores' work rather than stalling every warp at the next barrier.
    const auto load_cols = [&](int64_t tile) { return fl_load_cols<MODE>(a, Y, tile, x0, X.rows, cscale); };
    const auto slot_of = [&](int64_t tile) -> float* {
      const int64_t s = wg_mut(kWgMutOneColSlot) ? 0 : (kOut || wg_mut(kWgMutLseTwoSlots)) ? (tile & 1) : tile % 3;
      return cols + s * kFlSlotWords;
    };
    const auto store_cols = [&](int64_t tile, const FlColVals& v) { fl_store_cols(slot_of(tile), v); };
    __syncthreads();  // the previous unit's X tile, Y buffers and columns are no longer read (its wgmma waited for)
    // Prologue: X with tile t_begin (one cp.async group), tile t_begin + 1 (a second; Lse: and tile t_begin + 2,
    // a third, possibly empty); wait for the first.
    wg_issue<T, kFlRows>(xs, X, x0, a.d, kDpad);
    if (t_begin < t_end) {
      wg_issue_y<T, kDpad>(tc_raw, m, Y, t_begin, a.d);
    } else {
      tc_commit();
    }
    if (t_begin + 1 < t_end) {
      wg_issue_y<T, kDpad>(tc_raw, m, Y, t_begin + 1, a.d);
      if constexpr (kOut) {
        tc_wait<1>();
      } else {
        if (t_begin + 2 < t_end) {
          wg_issue_y<T, kDpad>(tc_raw, m, Y, t_begin + 2, a.d);
        } else {
          tc_commit();
        }
        tc_wait<2>();
      }
    } else {
      tc_wait<0>();
    }
    if (!wg_mut(kWgMutNoProxyFence)) wg_fence_proxy_async();
    fl_store_xlab(xlab, a, x0, X.rows);
    if (t_begin < t_end) store_cols(t_begin, load_cols(t_begin));
    if (t_begin + 1 < t_end) store_cols(t_begin + 1, load_cols(t_begin + 1));
    __syncthreads();  // X, tile t_begin and the columns of tiles t_begin and t_begin + 1 are complete
    // This thread's rows, as in flash_kernel: 16 warp + g + 8 h of the block (= 64 wg + 16 (warp & 3) + ...).
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
    // S (this warpgroup's 64 rows x tile's 64 columns, this thread: sc[4 j + e], n8 tile j) = X Y^T, issued and
    // committed (one group).
    const auto issue_scores = [&](float (&sc)[32], int64_t tile) {
      const unsigned ya = wg_y_addr(tc_raw, m, tile);
#pragma unroll
      for (int k = 0; k < kKsteps; ++k) wgmma_ss_n64<T>(sc, xdesc + wg_x_step(k), wg_yk_desc(ya, k), k > 0 ? 1 : 0);
      wg_commit();
    };
    // The coefficients of tile `tile` from its scores (fl_coefficients, flash_kernel's code), packed as the A
    // fragments of the output product: pa[kk] = K slice kk (Y rows 16 kk ..) = n8 tiles 2 kk, 2 kk + 1. Forward:
    // the running max and sum are updated here; alpha[h] = e^{m_old - m_new} is the factor for the output rows,
    // applied by the caller once the product that accumulates into them has completed.
    const bool by_col = a.excluded != nullptr, masked = a.keep_bits != nullptr;
    const long long* const labelled = a.x_labels != nullptr ? xlab : nullptr;
    const auto coefficients = [&](float (&sc)[32], int64_t tile, unsigned (&pa)[4][4], float (&alpha)[2]) {
      fl_coefficients<MODE>(sc, slot_of(tile), tile * kFlCols, Y.rows, row, row_ex, x0, X.rows, xl2, by_col, masked,
                            labelled, t, run_m, run_s, alpha);
      if constexpr (kOut) wg_pack_a<T>(sc, pa);
    };
    // acc[4 j + e]: n8 tile j of the output (f32 D fragment), features 8 j ...
    float acc[NT * 4];
#pragma unroll
    for (int i = 0; i < NT * 4; ++i) acc[i] = 0.f;
    unsigned pa[4][4];  // the coefficients of the tile whose output product is issued next
    float alpha[2] = {1.f, 1.f};  // (set by every coefficients call before it is read)
    float held[32];  // Lse: the scores of the tile whose coefficients the next step forms
    if (t_begin < t_end) {
      float sc[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) wg_fence_operand(sc[i]);
      if (!wg_mut(kWgMutNoWgFence)) wg_fence();
      issue_scores(sc, t_begin);
      wg_wait<0>();
#pragma unroll
      for (int i = 0; i < 32; ++i) wg_fence_operand(sc[i]);
      if constexpr (kOut) {
        coefficients(sc, t_begin, pa, alpha);  // alpha: the output is still 0
      } else {
#pragma unroll
        for (int i = 0; i < 32; ++i) held[i] = sc[i];
      }
    }
    // O (64 x dpad) += C (64 x 64) Y (64 x dpad) of tile `tile`, one instruction per K slice (B = the Y tile read
    // N-major), fenced and committed as one group.
    const auto issue_output = [&](int64_t tile, bool in_step) {
      // Each group opens with its fence (CUTLASS: warpgroup_arrive).
      if (!wg_mut(kWgMutNoWgFence) && !(in_step && wg_mut(kWgMutWriteAfterFence))) wg_fence();
      wg_output_product<T, kDpad>(acc, pa, wg_y_addr(tc_raw, m, tile));
      wg_commit();
    };
    const auto fence_acc_pa = [&] {
#pragma unroll
      for (int i = 0; i < NT * 4; ++i) wg_fence_operand(acc[i]);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) wg_fence_operand(pa[kk][r]);
    };
    const auto rescale = [&] {  // Forward: the output rows to the running max of the coefficients just formed
      // Not where no row of the warp has a new max: alpha = e^0 = 1 exactly there, so the product would change
      // nothing (after the first tiles of a split the usual case: 4 NT multiplications a thread per tile saved).
      if (!warp_any(alpha[0] != 1.f || alpha[1] != 1.f)) return;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        acc[4 * j] *= alpha[0];
        acc[4 * j + 1] *= alpha[0];
        acc[4 * j + 2] *= alpha[1];
        acc[4 * j + 3] *= alpha[1];
      }
    };
    // Per tile but the last (FA3's intra-warpgroup overlap): the scores of tile + 1 and the output product of tile
    // are issued together; the coefficients of tile + 1 are formed while the output product runs on the tensor
    // cores. (Every stage issues both products: with the score product under a condition, ptxas serialized all
    // wgmma of the kernel, note C7514; so the last tile's output product is issued after the loop.)
    timing.lap(0);
    if constexpr (kOut) {
      for (int64_t tile = t_begin; tile + 1 < t_end; ++tile) {
        tc_wait<0>();  // this thread's copies of tile + 1 (the only group in flight)
        if (!wg_mut(kWgMutNoProxyFence)) wg_fence_proxy_async();
        // Tile + 1 is complete (its columns were stored in the previous step); both warpgroups have waited for their
        // products of tile - 1, so its buffer ((tile + 2) % 3) may be refilled, and the coefficients of tile were
        // formed, so its column slot (that of tile + 2) may be rewritten.
        if (wg_mut(kWgMutEarlyRefill) && tile + 2 < t_end) wg_issue_y<T, kDpad>(tc_raw, m, Y, tile + 2, a.d);
        __syncthreads();
        if (!wg_mut(kWgMutEarlyRefill) && tile + 2 < t_end) wg_issue_y<T, kDpad>(tc_raw, m, Y, tile + 2, a.d);
        const FlColVals next_cols = tile + 2 < t_end ? load_cols(tile + 2) : FlColVals{};
        float sc[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) wg_fence_operand(sc[i]);
        fence_acc_pa();
        // The accumulators (Forward: rescaled) and the A fragments were written by other instructions.
        if (!wg_mut(kWgMutNoWgFence)) wg_fence();
        if (wg_mut(kWgMutWriteAfterFence) && MODE == FlashMode::Forward) rescale();  // the previous step's factor
        timing.lap(1);
        issue_scores(sc, tile + 1);
        issue_output(tile, true);
        if (!wg_mut(kWgMutNoWaitS)) wg_wait<1>();  // the scores (the older group); the output product may run on
#pragma unroll
        for (int i = 0; i < 32; ++i) wg_fence_operand(sc[i]);
        timing.lap(2);
        unsigned pn[4][4];
        if (wg_mut(kWgMutReuseA)) {
          coefficients(sc, tile + 1, pa, alpha);  // overwrites the A fragments of the product in flight
        } else {
          coefficients(sc, tile + 1, pn, alpha);
        }
        if (wg_mut(kWgMutEarlyRescale) && MODE == FlashMode::Forward) rescale();
        if (tile + 2 < t_end) store_cols(tile + 2, next_cols);
        timing.lap(3);
        // The output product is complete before its accumulators are rescaled, its A registers reused and (after
        // the next barrier) its Y buffer refilled.
        if (!wg_mut(kWgMutNoWaitO)) wg_wait<0>();
        fence_acc_pa();
        if (MODE == FlashMode::Forward && !wg_mut(kWgMutEarlyRescale) && !wg_mut(kWgMutWriteAfterFence)) rescale();
        if (!wg_mut(kWgMutReuseA)) {
          // pa = pn, written so that the old pa is read here (keep0 is 0). With a plain copy (and with an asm mov,
          // and with two sets used in turn by a loop unrolled twice) ptxas serialized every wgmma of the kernel,
          // note C7513 "non wgmma instructions defining input registers of a wgmma between start and end of the
          // pipeline stage": it seems to have given the two sets the same registers, so that tile + 1's
          // coefficients would be formed in the A registers of the product in flight. Reading the old pa after
          // the wait keeps them apart (no note; checked by scripts/cpp_tests.sh).
#pragma unroll
          for (int kk = 0; kk < 4; ++kk)
#pragma unroll
            for (int r = 0; r < 4; ++r) pa[kk][r] = pn[kk][r] | (pa[kk][r] & keep0);
        }
        timing.lap(4);
      }
      if (t_begin < t_end) {  // the last tile's output product (its tile and coefficients are complete)
        fence_acc_pa();
        issue_output(t_end - 1, false);
        if (!wg_mut(kWgMutNoWaitO)) wg_wait<0>();
        fence_acc_pa();
      }
    } else {
      // Lse, per tile but the last: the scores of tile + 1 are issued, and the coefficients of tile (held) are
      // formed while the tensor cores form them; then the wait, and they are held for the next step. The Y tiles
      // are copied two steps ahead (the steps are short, one product each): at step `tile` the copy of tile + 3
      // goes into the buffer of tile, whose scores every warpgroup waited for in the previous step, while tile +
      // 2's copy is still in flight (one cp.async group per step, empty past the split's end, so that tc_wait<1>
      // always leaves exactly tile + 2's). Three column slots, since tile's are read while tile + 2's are written.
      for (int64_t tile = t_begin; tile + 1 < t_end; ++tile) {
        tc_wait<1>();  // this thread's copies of tile + 1 (tile + 2's may still be in flight)
        if (!wg_mut(kWgMutNoProxyFence)) wg_fence_proxy_async();
        // Tile + 1 is complete (its columns were stored two steps back, or by the prologue); every thread waited for
        // its scores of tile and formed the coefficients of tile - 1, so the buffer of tile (that of tile + 3) may
        // be refilled and the column slot of tile - 1 (that of tile + 2) rewritten.
        const auto refill = [&] {
          if (tile + 3 < t_end) {
            wg_issue_y<T, kDpad>(tc_raw, m, Y, tile + 3, a.d);
          } else {
            tc_commit();
          }
        };
        if (wg_mut(kWgMutEarlyRefill)) refill();
        __syncthreads();
        if (!wg_mut(kWgMutEarlyRefill)) refill();
        const FlColVals next_cols = tile + 2 < t_end ? load_cols(tile + 2) : FlColVals{};
        float sc[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) wg_fence_operand(sc[i]);
        if (!wg_mut(kWgMutNoWgFence)) wg_fence();
        timing.lap(1);
        issue_scores(sc, tile + 1);
        timing.lap(2);
        coefficients(held, tile, pa, alpha);  // (the running max and sum; the registers of sc are not touched)
        if (tile + 2 < t_end) store_cols(tile + 2, next_cols);
        timing.lap(3);
        if (!wg_mut(kWgMutNoWaitS)) wg_wait<0>();  // the scores of tile + 1
#pragma unroll
        for (int i = 0; i < 32; ++i) {
          wg_fence_operand(sc[i]);
          held[i] = sc[i];
        }
        timing.lap(4);
      }
      if (t_begin < t_end) coefficients(held, t_end - 1, pa, alpha);
    }
    // The X tile was copied by every thread: a unit without Y tiles (no anchors) has passed no barrier since.
    __syncthreads();
    // Row r of the X tile, feature j: element ((j / 8) kFlRows + r) 8 + j % 8 (the interleaved layout above).
    const int xr = 16 * warp + g;  // row[0] - x0; row[1] is xr + 8
    fl_epilogue<T, MODE, NT>(acc, row, run_m, run_s, split, unscale, t, X, a, [&](int h, int col) {
      return to_acc<float>(xs[((col >> 3) * kFlRows + xr + 8 * h) * 8 + (col & 7)]);
    });
    timing.lap(5);
#ifdef CONTRASTBOUND_WG_TIMING
    ++timing.units;
    timing.tiles += static_cast<unsigned>(t_end > t_begin ? t_end - t_begin : 0);
#endif
  }
  timing.report(wg);
#elif defined(__CUDA_ARCH__)
  __trap();  // built without the sm_90a features: never launch it there
#endif
}
