// CPU emulation of the warpgroup MMA instructions (wgmma.*) and of fence.proxy.async that
// csrc/cuda/info_nce_wgmma.cuh uses, on top of emu_cuda.h (one fiber per CUDA thread). Include after emu_cuda.h
// and before the kernel headers; launch wgmma kernels with emu::wg::launch instead of emu::launch.
//
// Semantics, from the PTX ISA (section 9.7.15, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
//  - Warpgroup collectives: wgmma.fence, wgmma.mma_async, commit_group and wait_group are .sync.aligned over the 4
//    warps of a warpgroup (warps 4i .. 4i + 3). Each is a rendezvous of the 128 threads (a barrier on top of the
//    warp-at-a-time scheduler of emu_cuda.h: a warp that reaches it yields until the other three arrive, so the
//    scheduler's deadlock check catches a warp that skips it), and every thread checks that all 128 issued the same
//    operation with the same shape, descriptors, scale-d and transpose flags ("The contents of a matrix descriptor
//    must be same across all the warps in the warpgroup").
//  - Descriptors (9.7.15.5.1.2.2): start address bits 13-0, LBO 29-16, SBO 45-32 (each (x & 0x3FFFF) >> 4),
//    base offset 51-49, swizzle 63-62. Only the no-swizzle mode is emulated (anything else fails loudly); the
//    base offset and the reserved bits must be 0. Element (mn, k) of a 16-bit operand is read at
//      K-major  ((8,m),(T,2k)):((1T,SBO),(1,LBO)):   start + (mn/8) SBO + (k/8) LBO + (mn%8) 16 + (k%8) 2
//      MN-major ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)): start + (mn/8) SBO + (k/8) LBO + (k%8) 16 + (mn%8) 2
//    (canonical layouts, 9.7.15.5.1.2.1.3, T = 8); imm-trans-a / imm-trans-b = 1 select MN-major.
//  - Register fragments of m64nNk16 (9.7.15.5.1.1.1): warp w of the warpgroup holds rows 16 w .. 16 w + 15; A
//    registers of lane (g, t) = (lane / 4, lane % 4): r0 (row g, k 2t, 2t+1), r1 (row g+8, same k), r2 (row g,
//    k 2t+8, 2t+9), r3 (row g+8, k 2t+8, 2t+9), low half first; f32 D: d[4j + 2h + e] = row g + 8h, column
//    8j + 2t + e.
//  - Asynchrony: an mma reads its shared-memory operands at issue (and checks that each byte's last generic-proxy
//    writer, cp.async completion or wg_st_smem, has executed fence.proxy.async since), remembers them, and is
//    computed only when a wait_group completes its group: D = A B + (scale-d ? D : 0), summed in float over k in
//    order. A missing wait therefore reads stale (or, with scale-d = 0, NaN-poisoned) accumulators; at completion
//    the operands are read again and a change (a buffer refilled before the wait: emu_cuda.h turns a cp.async
//    destination to NaN at issue) fails, and so does a write of the mma's A registers or of its accumulators
//    (unless an earlier pending mma of the chain writes them) since its issue. An mma needs a wgmma.fence since
//    this thread's last wait_group (the kernels touch their fragments between every wait and the next mma), and
//    none of its registers that the kernel passed to wg_fence_operand may have changed since the last fence (the
//    ISA: a wgmma.fence between a register access and the wgmma that accesses the same registers; a write of a
//    register never passed to wg_fence_operand after the fence is not seen). A thread that ends with pending or
//    uncommitted mma fails.
// What this cannot show: timing, the hardware's actual reading of a layout (only the document's), bank conflicts.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <unordered_map>
#include <vector>

#include "emu_cuda.h"

namespace emu {
namespace wg {

struct Op {  // one wgmma.mma_async of one thread, pending until a wait_group completes its group
  float* d = nullptr;
  int n = 0, scale_d = 1;
  const unsigned* a_regs = nullptr;  // A from registers: this thread's A registers, and their values at issue
  unsigned a_vals[4] = {0, 0, 0, 0};
  std::vector<float> d_vals;  // the accumulators at issue, where no earlier pending mma of this thread writes them
  float a[2][16];           // this thread's two rows of A
  std::vector<float> b;     // [n / 4 columns][16]
  std::vector<unsigned> addrs;  // shared-memory bytes read (2 per element), for the check at completion
  std::vector<uint16_t> bits;
};

struct Thread {
  std::vector<Op> open;
  std::vector<std::vector<Op>> groups;
  // Registers passed to wg_fence_operand (the kernels' accumulators and A fragments), and their bits at this
  // thread's last wgmma.fence: an mma fails if one of its registers changed since (written between the fence and
  // the mma, which the fence must separate).
  std::unordered_map<const void*, uint32_t> operands, at_fence;
  bool fenced = false;      // wgmma.fence since the last wait_group (or the start)
  unsigned phase = 0;       // warpgroup collectives so far (selects the exchange buffer)
  uint64_t proxy_fences = 0;
};

struct Mark {  // last generic-proxy write of 2 bytes of shared memory
  uint64_t block = 0;
  int writer = -1;
  uint64_t fences = 0;  // the writer's fence.proxy.async count at the write
};

struct Slot {  // what a thread contributes to a warpgroup collective
  int kind = 0, n = 0, scale_d = 0, ta = 0, tb = 0, wait_n = 0;
  uint64_t da = 0, db = 0;
  unsigned a[4] = {0, 0, 0, 0};
};

struct State {
  std::vector<Thread> th;
  int count[8] = {};
  uint64_t gen[8] = {};
  std::vector<Slot> xbuf;  // [warpgroup][2][128]
  std::vector<Mark> marks;  // per 2 bytes of shared memory
  uint64_t launches = 0;
  uint64_t mmas = 0;  // wgmma operations issued (per thread), over all launches: which kernels served a call
};

inline State s;

inline int tid() { return static_cast<int>(g.cur->tid.x); }
inline uint64_t block_key() { return (s.launches << 32) | (uint64_t(g.bid.y) * g.grid.x + g.bid.x + 1); }

inline void mark_write(unsigned addr, unsigned bytes) {
  for (unsigned i = addr / 2; i < (addr + bytes + 1) / 2 && i < s.marks.size(); ++i) {
    s.marks[i] = {block_key(), tid(), s.th[tid()].proxy_fences};
  }
}

inline void check_fenced(unsigned addr) {
  const Mark& m = s.marks[addr / 2];
  if (m.block == block_key() && m.writer >= 0 && s.th[m.writer].proxy_fences == m.fences) {
    fail("wgmma reads shared memory written through the generic proxy without a later fence.proxy.async");
  }
}

inline void barrier(int w) {
  const uint64_t gen = s.gen[w];
  ++g.progress;
  if (++s.count[w] == 128) {
    s.count[w] = 0;
    ++s.gen[w];
    return;
  }
  while (s.gen[w] == gen) yield();
}

// Writes this thread's slot, waits for its warpgroup, checks that all 128 slots agree on the operation; returns the
// warpgroup's slots (thread i of the warpgroup at index i). Two buffers alternate as in emu::exchange.
inline const Slot* exchange(const Slot& v) {
  const int w = tid() / 128, i = tid() % 128;
  Thread& t = s.th[tid()];
  Slot* base = &s.xbuf[(static_cast<size_t>(w) * 2 + (t.phase & 1)) * 128];
  base[i] = v;
  ++t.phase;
  barrier(w);
  for (int j = 0; j < 128; ++j) {
    const Slot& o = base[j];
    if (o.kind != v.kind || o.n != v.n || o.scale_d != v.scale_d || o.ta != v.ta || o.tb != v.tb ||
        o.wait_n != v.wait_n || o.da != v.da || o.db != v.db) {
      fail("the threads of a warpgroup issued different wgmma operations (or descriptors / flags)");
    }
  }
  return base;
}

struct Desc {
  unsigned start, lbo, sbo;
};

inline Desc decode(uint64_t v) {
  if ((v >> 62) != 0) fail("wgmma descriptor: only the no-swizzle mode is emulated");
  if (((v >> 49) & 7u) != 0) fail("wgmma descriptor: base offset must be 0 (no-swizzle mode)");
  const uint64_t reserved = (uint64_t(3) << 14) | (uint64_t(3) << 30) | (uint64_t(7) << 46) | (uint64_t(0x3ff) << 52);
  if ((v & reserved) != 0) fail("wgmma descriptor: reserved bits set");
  return {static_cast<unsigned>(v & 0x3fff) << 4, static_cast<unsigned>((v >> 16) & 0x3fff) << 4,
          static_cast<unsigned>((v >> 32) & 0x3fff) << 4};
}

inline unsigned elem_addr(const Desc& d, bool mn_major, int mn, int k) {
  const unsigned a = d.start + static_cast<unsigned>(mn / 8) * d.sbo + static_cast<unsigned>(k / 8) * d.lbo +
                     (mn_major ? static_cast<unsigned>(k % 8) * 16 + static_cast<unsigned>(mn % 8) * 2
                               : static_cast<unsigned>(mn % 8) * 16 + static_cast<unsigned>(k % 8) * 2);
  if (a + 2 > g.smem_bytes) fail("wgmma operand outside shared memory");
  return a;
}

template <typename T>
float read_elem(Op& op, unsigned addr) {
  check_fenced(addr);
  const uint16_t v = smem16(addr);
  op.addrs.push_back(addr);
  op.bits.push_back(v);
  return b16_to_float<T>(v);
}

inline void complete(Op& op) {
  for (size_t i = 0; i < op.addrs.size(); ++i) {
    if (smem16(op.addrs[i]) != op.bits[i]) {
      fail("shared memory read by a wgmma.mma_async changed before the wait_group that completes it");
    }
  }
  // "Accessing the accumulator register or the input register containing the fragments of matrix A of a
  // wgmma.mma_async instruction without first performing a wgmma.wait_group ... is undefined behavior": a write
  // of either while the mma is pending shows here (a read shows as a wrong value: the mma is computed only now).
  if (op.a_regs != nullptr && std::memcmp(op.a_regs, op.a_vals, sizeof op.a_vals) != 0) {
    fail("A fragment registers of a wgmma.mma_async written before the wait_group that completes it");
  }
  if (!op.d_vals.empty() && std::memcmp(op.d, op.d_vals.data(), op.d_vals.size() * sizeof(float)) != 0) {
    fail("accumulator registers of a wgmma.mma_async written before the wait_group that completes it");
  }
  const int l = tid() % 32;
  (void)l;
  for (int j = 0; j < op.n / 8; ++j)
    for (int h = 0; h < 2; ++h)
      for (int e = 0; e < 2; ++e) {
        const float* bc = &op.b[static_cast<size_t>(2 * j + e) * 16];
        float sum = 0.f;
        for (int k = 0; k < 16; ++k) sum += op.a[h][k] * bc[k];
        float& dv = op.d[4 * j + 2 * h + e];
        dv = op.scale_d ? dv + sum : sum;
      }
}

inline uint32_t bits_of(const void* p) {
  uint32_t b;
  std::memcpy(&b, p, 4);
  return b;
}

inline void fence() {
  Slot v;
  v.kind = 1;
  exchange(v);
  Thread& t = s.th[tid()];
  t.fenced = true;
  t.at_fence.clear();
  for (const auto& kv : t.operands) t.at_fence[kv.first] = bits_of(kv.first);
}

// A register of the mma about to be issued: unchanged since the last wgmma.fence, if that fence saw it.
inline void check_since_fence(const Thread& t, const void* r) {
  const auto it = t.at_fence.find(r);
  if (it != t.at_fence.end() && it->second != bits_of(r)) {
    fail("a register of a wgmma.mma_async was written between the wgmma.fence and the mma");
  }
}

inline void commit() {
  Slot v;
  v.kind = 2;
  exchange(v);
  Thread& t = s.th[tid()];
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}

inline void wait(int n) {
  Slot v;
  v.kind = 3;
  v.wait_n = n;
  exchange(v);
  Thread& t = s.th[tid()];
  while (t.groups.size() > static_cast<size_t>(n)) {
    for (Op& op : t.groups.front()) complete(op);
    t.groups.erase(t.groups.begin());
  }
  t.fenced = false;
}

// One wgmma.mma_async.m64nNk16 (f32 accumulators): A from registers (a != nullptr) or descriptor da.
template <typename T>
void mma(int n, float* d, const unsigned* a, uint64_t da, uint64_t db, int scale_d, int ta, int tb) {
  ++s.mmas;
  emu::tensor_core_instruction();
  if (n % 8 != 0 || n < 8 || n > 256) fail("wgmma: N must be a multiple of 8 in [8, 256]");
  Slot v;
  v.kind = a ? 5 : 4;
  v.n = n;
  v.scale_d = scale_d ? 1 : 0;
  v.ta = ta;
  v.tb = tb;
  v.da = da;
  v.db = db;
  if (a)
    for (int i = 0; i < 4; ++i) v.a[i] = a[i];
  const Slot* ex = exchange(v);
  Thread& th = s.th[tid()];
  if (!th.fenced) fail("wgmma.mma_async without a wgmma.fence after the last wait_group");
  for (int i = 0; i < n / 2; ++i) check_since_fence(th, d + i);
  if (a)
    for (int i = 0; i < 4; ++i) check_since_fence(th, a + i);
  const int wt = tid() % 128, w = wt / 32, l = wt % 32, gq = l / 4, t = l % 4;
  Op op;
  op.d = d;
  op.n = n;
  op.scale_d = v.scale_d;
  if (a) {
    for (int q = 0; q < 4; ++q) {  // lane 4 gq + q of this warp holds k = 2q, 2q + 1 (+ 8) of rows gq, gq + 8
      const Slot& o = ex[32 * w + 4 * gq + q];
      for (int e = 0; e < 2; ++e) {
        const auto half = [&](unsigned r) { return static_cast<uint16_t>(e ? r >> 16 : r & 0xffffu); };
        op.a[0][2 * q + e] = b16_to_float<T>(half(o.a[0]));
        op.a[1][2 * q + e] = b16_to_float<T>(half(o.a[1]));
        op.a[0][2 * q + 8 + e] = b16_to_float<T>(half(o.a[2]));
        op.a[1][2 * q + 8 + e] = b16_to_float<T>(half(o.a[3]));
      }
    }
  } else {
    const Desc dd = decode(da);
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 16; ++k) op.a[h][k] = read_elem<T>(op, elem_addr(dd, ta != 0, 16 * w + gq + 8 * h, k));
  }
  const Desc bd = decode(db);
  op.b.resize(static_cast<size_t>(n / 4) * 16);
  for (int j = 0; j < n / 8; ++j)
    for (int e = 0; e < 2; ++e)
      for (int k = 0; k < 16; ++k) {
        op.b[static_cast<size_t>(2 * j + e) * 16 + k] = read_elem<T>(op, elem_addr(bd, tb != 0, 8 * j + 2 * t + e, k));
      }
  if (!v.scale_d) {
    for (int i = 0; i < n / 2; ++i) {
      d[i] = NAN;  // overwritten at completion; read before it: NaN
      const auto it = th.at_fence.find(d + i);
      if (it != th.at_fence.end()) it->second = bits_of(d + i);  // the emulation's own write
    }
  }
  if (a) {
    op.a_regs = a;
    for (int i = 0; i < 4; ++i) op.a_vals[i] = a[i];
  }
  // The accumulators as they stand, unless an earlier pending mma of this thread writes some of them (a chain of
  // products into one accumulator: the hardware keeps them in order, and so does complete()).
  const auto overlaps = [&](const Op& o) { return o.d < d + n / 2 && d < o.d + o.n / 2; };
  bool chained = false;
  for (const Op& o : th.open) chained = chained || overlaps(o);
  for (const auto& grp : th.groups)
    for (const Op& o : grp) chained = chained || overlaps(o);
  if (!chained) op.d_vals.assign(d, d + n / 2);
  th.open.push_back(std::move(op));
}

// emu::launch for kernels that use wgmma: resets the warpgroup state and checks each thread's end.
inline void launch(unsigned grid, unsigned threads, size_t smem_bytes, std::function<void()> body,
                   unsigned grid_y = 1) {
  if (threads % 128 != 0 || threads > 1024) fail("wgmma kernels need whole warpgroups");
  ++s.launches;
  s.th.assign(threads, Thread{});
  for (int w = 0; w < 8; ++w) s.count[w] = 0;
  s.xbuf.assign(static_cast<size_t>(threads / 128) * 2 * 128, Slot{});
  s.marks.assign(smem_bytes / 2 + 1, Mark{});
  smem_write_hook = &mark_write;
  emu::launch(grid, threads, smem_bytes, [&body] {
    s.th[tid()] = Thread{};
    body();
    const Thread& t = s.th[tid()];
    if (!t.open.empty() || !t.groups.empty()) fail("thread ended with wgmma operations not waited for");
  }, grid_y);
  smem_write_hook = nullptr;
}

}  // namespace wg
}  // namespace emu

// ---- info_nce_wgmma.cuh's PTX wrappers, emulated ----------------------------------------------------------

inline void wg_fence() { emu::wg::fence(); }
inline void wg_commit() { emu::wg::commit(); }
template <int N>
void wg_wait() {
  emu::wg::wait(N);
}
inline void wg_fence_proxy_async() { ++emu::wg::s.th[emu::wg::tid()].proxy_fences; }
inline void wg_fence_operand(float& r) {
  emu::wg::Thread& t = emu::wg::s.th[emu::wg::tid()];
  t.operands[&r] = 0;
}
inline void wg_fence_operand(unsigned& r) {
  emu::wg::Thread& t = emu::wg::s.th[emu::wg::tid()];
  t.operands[&r] = 0;
}
template <typename T>
void wg_st_smem(T* p, T v) {
  *p = v;
  emu::wg::mark_write(smem_u32(p), sizeof(T));
}
template <typename T>
void wgmma_ss_n64(float (&d)[32], uint64_t da, uint64_t db, int scale_d) {
  emu::wg::mma<T>(64, d, nullptr, da, db, scale_d, 0, 0);
}
template <typename T, int N, int TB>
struct WgmmaRs {
  static void run(float* d, const unsigned (&a)[4], uint64_t db, int scale_d) {
    emu::wg::mma<T>(N, d, a, 0, db, scale_d, 0, TB);
  }
};
