// A small CPU emulation of what the mma.sync tensor-core kernels (csrc/cuda/info_nce_tc.cuh) use from CUDA, so
// that a C++ test can run them on a machine without a GPU (test_mma_emu.cpp).
//
// Every CUDA thread is a fiber (its own stack; emu_switch below) on one OS thread; a block's fibers run
// round-robin, each until it reaches a barrier. __syncthreads is a block barrier; the warp-collective operations
// (__shfl_xor_sync, ldmatrix, mma.sync) exchange their operands through a per-warp buffer and a warp barrier, and
// each lane then computes its own result exactly as the PTX ISA lays the fragments out. cp.async copies are
// deferred until the tc_wait that must complete them, so a missing wait reads stale shared memory, and their
// destination turns to NaN bytes at issue (the copy may land any time in between), so a buffer refilled while
// another warp (or a pending wgmma, emu_wgmma.h) still reads it shows up as NaN (or fails); shared memory
// starts as NaN bytes (0xff), so a read of a never-written element shows up as NaN; a store past the end of the
// dynamic shared memory (into a canary after it) fails the run. ldmatrix bank conflicts are
// counted (ldsm_stats). What this cannot show: timing, memory-model races the round-robin order hides, other bank
// conflicts, register pressure, speed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#if !defined(__x86_64__) || defined(EMU_UCONTEXT)
#include <ucontext.h>
#define EMU_USE_UCONTEXT 1
#endif

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define CONTRASTBOUND_EMULATE 1
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace emu {

// The compute capability the loaded code was compiled for (__CUDA_ARCH__ / 10 of the image the device runs; the
// test sets it with each device profile): below 80 the tensor-core kernels are __trap() on a GPU, so a tensor-core
// instruction reached in emulation there (mma.sync, WMMA, wgmma) is counted as the trap it would be.
struct ArchGate {
  int code_arch = 90;
  long long illegal = 0;  // tensor-core instructions run where code_arch < 80
};
inline ArchGate& arch_gate() {
  static ArchGate g;
  return g;
}
inline void tensor_core_instruction() {
  if (arch_gate().code_arch < 80) ++arch_gate().illegal;
}

// Switching between fibers. On x86-64 a few instructions (emu_switch: the callee-saved registers, the SSE and x87
// control words and the stack pointer; the System V ABI leaves every other register to the caller), since
// swapcontext also saves and restores the signal mask, a system call per switch (test_cuda_emu quick: 196 s with
// it, 24 s with emu_switch). Elsewhere, or with EMU_UCONTEXT defined, ucontext (also the choice for a build run
// with CET shadow stacks enforced: a new fiber's first return, into fiber_entry, has no shadow-stack entry).
#ifndef EMU_USE_UCONTEXT
// emu_switch(save, next): stores this fiber's stack pointer in *save and resumes the one saved in next.
extern "C" void emu_switch(void** save, void* next);
asm(R"(
  .pushsection .text
  .weak emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
  .popsection
)");
#endif

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

struct Copy {
  unsigned dst;
  const void* src;
  int bytes;
};

struct Fiber {
#ifdef EMU_USE_UCONTEXT
  ucontext_t ctx;
#else
  void* sp = nullptr;  // saved stack pointer (emu_switch)
#endif
  std::vector<char> stack;
  Dim3 tid;
  bool done = false;
  bool at_block_barrier = false;  // waiting for the rest of the block
  uint64_t barrier_gen = 0;
  unsigned phase = 0;  // warp collectives so far (selects the exchange buffer)
  std::vector<Copy> open;
  std::vector<std::vector<Copy>> groups;
};

constexpr int kSlot = 32;  // bytes per lane in a warp exchange

struct State {
  Dim3 grid, block, bid;
  std::vector<Fiber> fibers;
  Fiber* cur = nullptr;
#ifdef EMU_USE_UCONTEXT
  ucontext_t sched;
#else
  void* sched_sp = nullptr;
#endif
  std::vector<unsigned char> smem_store;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  int bar_count = 0;
  uint64_t bar_gen = 0;
  int warp_count[32] = {};
  uint64_t warp_gen[32] = {};
  std::vector<unsigned char> xbuf;  // [warp][2][32 lanes][kSlot]
  std::function<void()> body;
  uint64_t progress = 0;
  uint64_t blocks_run = 0;  // blocks started so far, over all launches (a block's serial number)
};

inline State g;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emu: %s (block %u, thread %u)\n", what, g.bid.x, g.cur ? g.cur->tid.x : 0u);
  std::abort();
}

#ifdef EMU_USE_UCONTEXT
inline void yield() { swapcontext(&g.cur->ctx, &g.sched); }
inline void resume(Fiber& f) { swapcontext(&g.sched, &f.ctx); }
#else
inline void yield() { emu_switch(&g.cur->sp, g.sched_sp); }
inline void resume(Fiber& f) { emu_switch(&g.sched_sp, f.sp); }
#endif

inline void block_barrier() {
  const uint64_t gen = g.bar_gen;
  ++g.progress;
  if (++g.bar_count == static_cast<int>(g.block.x)) {
    g.bar_count = 0;
    ++g.bar_gen;
    return;
  }
  g.cur->at_block_barrier = true;
  g.cur->barrier_gen = gen;
  while (g.bar_gen == gen) yield();
  g.cur->at_block_barrier = false;
}

inline void warp_barrier(int warp) {
  const uint64_t gen = g.warp_gen[warp];
  ++g.progress;
  if (++g.warp_count[warp] == 32) {
    g.warp_count[warp] = 0;
    ++g.warp_gen[warp];
    return;
  }
  while (g.warp_gen[warp] == gen) yield();
}

inline int lane() { return static_cast<int>(g.cur->tid.x % 32); }

// Writes this lane's value into the warp's exchange buffer and waits for the whole warp; returns the buffer
// (lane l's value at l * kSlot). Two buffers alternate: a lane can only overwrite buffer b two collectives
// later, after every lane has passed the barrier of the collective in between, i.e. has read b.
template <typename V>
const unsigned char* exchange(const V& v) {
  static_assert(sizeof(V) <= kSlot, "exchange slot too small");
  const int w = static_cast<int>(g.cur->tid.x / 32);
  unsigned char* base = &g.xbuf[(static_cast<size_t>(w) * 2 + (g.cur->phase & 1)) * 32 * kSlot];
  std::memcpy(base + lane() * kSlot, &v, sizeof(V));
  ++g.cur->phase;
  warp_barrier(w);
  return base;
}

template <typename V>
V slot(const unsigned char* base, int l) {
  V v;
  std::memcpy(&v, base + l * kSlot, sizeof(V));
  return v;
}

inline void fiber_main() {
  g.body();
  g.cur->done = true;
  ++g.progress;
}

#ifdef EMU_USE_UCONTEXT
inline void start_fiber(Fiber& f) {
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack.data();
  f.ctx.uc_stack.ss_size = f.stack.size();
  f.ctx.uc_link = &g.sched;
  makecontext(&f.ctx, fiber_main, 0);
}
#else
[[noreturn]] inline void fiber_entry() {
  fiber_main();
  yield();  // done: never resumed
  std::abort();
}

// A new fiber's stack as emu_switch leaves a suspended one: control words, six callee-saved registers (zero) and
// fiber_entry as the return address, with the stack pointer at its entry 8 mod 16, as after a call.
inline void start_fiber(Fiber& f) {
  auto top = reinterpret_cast<uintptr_t>(f.stack.data() + f.stack.size()) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;  // fiber_entry's own return address: never used
  *--sp = reinterpret_cast<uint64_t>(&fiber_entry);
  for (int r = 0; r < 6; ++r) *--sp = 0;
  --sp;
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  std::memcpy(sp, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpcw, 2);
  f.sp = sp;
}
#endif

// Runs `body` (one kernel call) as a grid of `grid` x `grid_y` blocks of `threads` threads with `smem_bytes` of
// dynamic shared memory. Aborts with a message on a deadlock (a barrier some threads never reach).
inline void launch(unsigned grid, unsigned threads, size_t smem_bytes, std::function<void()> body,
                   unsigned grid_y = 1) {
  if (threads % 32 != 0 || threads > 1024) fail("threads must be a multiple of 32, at most 1024");
  g.grid = {grid, grid_y, 1};
  g.block = {threads, 1, 1};
  g.body = std::move(body);
  g.fibers.resize(threads);
  g.xbuf.assign(static_cast<size_t>(threads / 32) * 2 * 32 * kSlot, 0);
  g.smem_store.assign(smem_bytes + 256, 0);
  g.smem = g.smem_store.data() + (128 - reinterpret_cast<uintptr_t>(g.smem_store.data()) % 128);
  g.smem_bytes = smem_bytes;
  for (unsigned b = 0; b < grid * grid_y; ++b) {
    g.bid = {b % grid, b / grid, 0};
    ++g.blocks_run;
    std::memset(g.smem, 0xff, smem_bytes);  // NaN in every float type
    // A canary after the dynamic shared memory (at least 128 bytes): a store past its size is a fault on a GPU.
    unsigned char* const tail = g.smem + smem_bytes;
    const size_t tail_bytes = static_cast<size_t>(g.smem_store.data() + g.smem_store.size() - tail);
    std::memset(tail, 0xa5, tail_bytes);
    g.bar_count = 0;
    for (int w = 0; w < 32; ++w) g.warp_count[w] = 0;
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = g.fibers[t];
      if (f.stack.empty()) f.stack.resize(256 * 1024);
      start_fiber(f);
      f.tid = {t, 0, 0};
      f.done = false;
      f.phase = 0;
      f.open.clear();
      f.groups.clear();
    }
    // One warp at a time runs until all its threads wait at a block barrier (or are done), then the next: a
    // missing __syncthreads between a write by one warp and a read by another then reads stale data. The warp
    // order alternates between passes (first warp 0, then warp 7 first, ...), so both orders of each pair occur.
    unsigned alive = threads;
    const unsigned warps = threads / 32;
    int idle_passes = 0;
    for (uint64_t pass = 0; alive > 0; ++pass) {
      const uint64_t before = g.progress;
      for (unsigned wi = 0; wi < warps; ++wi) {
        const unsigned w = (pass & 1) ? warps - 1 - wi : wi;
        for (bool ran = true; ran;) {
          ran = false;
          const uint64_t inner = g.progress;
          for (unsigned l = 0; l < 32; ++l) {
            Fiber& f = g.fibers[w * 32 + ((pass & 2) ? 31 - l : l)];
            if (f.done || (f.at_block_barrier && f.barrier_gen == g.bar_gen)) continue;
            g.cur = &f;
            resume(f);
            ran = true;
            if (f.done) --alive;
          }
          if (g.progress == inner) break;  // only waiting lanes (e.g. a warp collective some lanes skip)
        }
      }
      g.cur = nullptr;
      idle_passes = g.progress == before ? idle_passes + 1 : 0;
      if (idle_passes > 2) fail("deadlock: a barrier that not every thread of the block reaches");
    }
    for (size_t i = 0; i < tail_bytes; ++i)
      if (tail[i] != 0xa5) fail("a store past the end of the block's dynamic shared memory");
  }
}

}  // namespace emu

// ---- the CUDA names the kernels use ------------------------------------------------------------------------

#define threadIdx (emu::g.cur->tid)
#define blockIdx (emu::g.bid)
#define gridDim (emu::g.grid)
#define blockDim (emu::g.block)

inline void __syncthreads() { emu::block_barrier(); }

#ifdef CONTRASTBOUND_WG_TIMING
// The wgmma kernels' diagnostic build (WgTiming): a counter that only grows, as the multiprocessor's clock does.
inline long long clock64() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
#endif

template <typename V>
V __shfl_xor_sync(unsigned, V v, int mask) {
  const unsigned char* ex = emu::exchange(v);
  return emu::slot<V>(ex, emu::lane() ^ mask);
}

inline int __any_sync(unsigned, int p) {
  const unsigned char* ex = emu::exchange(p);
  int any = 0;
  for (int l = 0; l < 32; ++l) any |= emu::slot<int>(ex, l) != 0;
  return any;
}

// The hardware's __expf: ex2.approx.ftz.f32 of x log2(e), the product rounded to float32 (a relative error of up to
// |x| 2^-24 ln 2 in the result, the larger part of the documented 2 + 1.17 |x| ulp) and results below float32's
// smallest normal (2^-126) flushed to 0. (ex2.approx's own error, ~2^-22 relative, is not modelled.) An exact exp
// here would let the emulated tests pass on more accuracy than a GPU gives.
inline float __expf(float x) {
  const float r = std::exp2(x * 1.44269504088896341f);
  return std::fpclassify(r) == FP_SUBNORMAL ? 0.f : r;
}

inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

// A thread runs until it reaches a barrier or a warp collective, so a read-modify-write is atomic here.
inline unsigned atomicMax(unsigned* address, unsigned v) {
  const unsigned old = *address;
  if (v > old) *address = v;
  return old;
}
#ifdef CONTRASTBOUND_WG_TIMING  // (the wgmma kernels' diagnostic build: WgTiming)
inline unsigned atomicMin(unsigned* address, unsigned v) {
  const unsigned old = *address;
  if (v < old) *address = v;
  return old;
}
template <typename V>
V atomicAdd(V* address, V v) {
  const V old = *address;
  *address = old + v;
  return old;
}
#endif

// ---- tc_ptx.cuh, emulated ----------------------------------------------------------------------------------

inline unsigned char* tc_dynamic_smem() { return emu::g.smem; }

inline unsigned smem_u32(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < emu::g.smem || c > emu::g.smem + emu::g.smem_bytes) emu::fail("smem_u32 of a pointer outside shared memory");
  return static_cast<unsigned>(c - emu::g.smem);
}

inline void cp_async16(unsigned dst, const void* src, int src_bytes) {
  if (dst % 16 != 0 || dst + 16 > emu::g.smem_bytes) emu::fail("cp.async destination misaligned or out of bounds");
  if (src_bytes != 0 && src_bytes != 16) emu::fail("cp.async source size must be 0 or 16 here");
  if (src_bytes == 16 && reinterpret_cast<uintptr_t>(src) % 16 != 0) emu::fail("cp.async source misaligned");
  emu::g.cur->open.push_back({dst, src, src_bytes});
  std::memset(emu::g.smem + dst, 0xff, 16);  // in flight: neither the old contents nor the new yet
}

inline void tc_commit() {
  emu::g.cur->groups.push_back(std::move(emu::g.cur->open));
  emu::g.cur->open.clear();
}

namespace emu {
// Optional observer of the shared-memory writes the emulation performs for the current thread (cp.async data,
// applied at its wait): emu_wgmma.h uses it to check the generic-to-async proxy fence before wgmma reads.
inline void (*smem_write_hook)(unsigned addr, unsigned bytes) = nullptr;
}  // namespace emu

template <int N>
void tc_wait() {
  auto& groups = emu::g.cur->groups;
  while (groups.size() > static_cast<size_t>(N)) {
    for (const emu::Copy& c : groups.front()) {
      std::memset(emu::g.smem + c.dst, 0, 16);
      if (c.bytes) std::memcpy(emu::g.smem + c.dst, c.src, c.bytes);
      if (emu::smem_write_hook) emu::smem_write_hook(c.dst, 16);
    }
    groups.erase(groups.begin());
  }
}

namespace emu {

inline uint16_t smem16(unsigned addr) {
  if (addr + 2 > g.smem_bytes) fail("ldmatrix read out of shared memory");
  uint16_t v;
  std::memcpy(&v, g.smem + addr, 2);
  return v;
}

// Shared-memory bank conflicts of ldmatrix: each 8 x 8 matrix is one access of eight 16-byte rows; rows in the same
// one of the 8 groups of 4 banks (address / 16 mod 8), at distinct addresses, take one more pass each. A property
// of the addresses alone, so the emulation counts it exactly (a speed property no timing on this machine shows).
struct LdsmStats {
  uint64_t matrices = 0, extra_passes = 0;
};

inline LdsmStats& ldsm_stats() {
  static LdsmStats st;
  return st;
}

inline void count_ldsm(const unsigned char* ex);

// ldmatrix .x4: lanes 8i .. 8i + 7 give the row addresses of 8 x 8 matrix i; lane l receives, in register i,
// elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) of matrix i, or with .trans those of its transpose.
inline void ldsm(unsigned addr, unsigned (&r)[4], bool trans) {
  if (addr % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
  const unsigned char* ex = exchange(addr);
  const int l = lane(), gq = l / 4, t = l % 4;
  if (l == 0) count_ldsm(ex);
  for (int i = 0; i < 4; ++i) {
    uint16_t e0, e1;
    if (!trans) {
      const unsigned row = slot<unsigned>(ex, 8 * i + gq);
      e0 = smem16(row + 2 * (2 * t));
      e1 = smem16(row + 2 * (2 * t + 1));
    } else {
      e0 = smem16(slot<unsigned>(ex, 8 * i + 2 * t) + 2 * gq);
      e1 = smem16(slot<unsigned>(ex, 8 * i + 2 * t + 1) + 2 * gq);
    }
    r[i] = static_cast<unsigned>(e0) | (static_cast<unsigned>(e1) << 16);
  }
}

inline void count_ldsm(const unsigned char* ex) {
  LdsmStats* st = &ldsm_stats();
  for (int i = 0; i < 4; ++i) {
    unsigned rows[8];
    int n = 0, per_group[8] = {};
    for (int j = 0; j < 8; ++j) {
      const unsigned row = slot<unsigned>(ex, 8 * i + j) / 16;
      bool seen = false;
      for (int k = 0; k < n; ++k) seen = seen || rows[k] == row;
      if (!seen) rows[n++] = row, ++per_group[row % 8];
    }
    int passes = 0;
    for (int gi = 0; gi < 8; ++gi) passes = passes > per_group[gi] ? passes : per_group[gi];
    ++st->matrices;
    st->extra_passes += static_cast<uint64_t>(passes - 1);
  }
}

template <typename T>
float b16_to_float(uint16_t bits);
template <>
inline float b16_to_float<__nv_bfloat16>(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <>
inline float b16_to_float<__half>(uint16_t bits) {
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

template <typename T>
float lo(unsigned r) {
  return b16_to_float<T>(static_cast<uint16_t>(r & 0xffffu));
}
template <typename T>
float hi(unsigned r) {
  return b16_to_float<T>(static_cast<uint16_t>(r >> 16));
}

struct MmaIn {
  unsigned a[4], b[2];
};

}  // namespace emu

inline void ldsm_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
  unsigned r[4];
  emu::ldsm(addr, r, false);
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}

inline void ldsm_x4_trans(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
  unsigned r[4];
  emu::ldsm(addr, r, true);
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}

// mma.m16n8k16.row.col, float32 accumulators (g = lane / 4, t = lane % 4):
//   A: a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   B: b0 (k 2t..2t+1, n g)  b1 (k 2t+8.., n g)
//   C: c0, c1 (g, 2t..2t+1)  c2, c3 (g+8, 2t..2t+1)
template <typename T>
void mma16816(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
  emu::tensor_core_instruction();
  using emu::hi;
  using emu::lo;
  const emu::MmaIn in{{a0, a1, a2, a3}, {b0, b1}};
  const unsigned char* ex = emu::exchange(in);
  const int l = emu::lane(), g = l / 4, t = l % 4;
  float arow[2][16], bcol[2][16];  // rows g, g + 8 of A; columns 2t, 2t + 1 of B
  for (int q = 0; q < 4; ++q) {
    const emu::MmaIn va = emu::slot<emu::MmaIn>(ex, 4 * g + q);  // lanes holding row g / g + 8, column pair q
    arow[0][2 * q] = lo<T>(va.a[0]), arow[0][2 * q + 1] = hi<T>(va.a[0]);
    arow[1][2 * q] = lo<T>(va.a[1]), arow[1][2 * q + 1] = hi<T>(va.a[1]);
    arow[0][2 * q + 8] = lo<T>(va.a[2]), arow[0][2 * q + 9] = hi<T>(va.a[2]);
    arow[1][2 * q + 8] = lo<T>(va.a[3]), arow[1][2 * q + 9] = hi<T>(va.a[3]);
    for (int e = 0; e < 2; ++e) {  // column n = 2t + e is held by lanes 4n .. 4n + 3
      const emu::MmaIn vb = emu::slot<emu::MmaIn>(ex, 4 * (2 * t + e) + q);
      bcol[e][2 * q] = lo<T>(vb.b[0]), bcol[e][2 * q + 1] = hi<T>(vb.b[0]);
      bcol[e][2 * q + 8] = lo<T>(vb.b[1]), bcol[e][2 * q + 9] = hi<T>(vb.b[1]);
    }
  }
  for (int h = 0; h < 2; ++h)
    for (int e = 0; e < 2; ++e) {
      float s = 0.f;
      for (int k = 0; k < 16; ++k) s += arow[h][k] * bcol[e][k];
      c[2 * h + e] += s;
    }
}

#include "emu_wmma.h"  // nvcuda::wmma, on the fibers above
