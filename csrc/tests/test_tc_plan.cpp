// C++ test run by ctest (no torch, no CUDA): the tensor-core kernels' work split (csrc/cuda/tc_plan.h).
//
// Over a grid of problem and GPU sizes: every Y tile is covered and no range is empty; the partial results
// stay within the memory cap; the plan is the cheapest split count under the cap (brute force) and so never
// worse than the rule it replaced (ceil(slots / X blocks) splits). On the benchmark's shapes on an H200 it keeps
// the machine at least 90 % busy (modelled tile work over slots x modelled time), which the old rule did not.
#include <algorithm>
#include <cstdint>
#include <cstdio>

#include "cuda/tc_plan.h"

using contrastbound::cuda::kTcMaxUnitsPerSlot;
using contrastbound::cuda::kTcUnitOverheadTiles;
using contrastbound::cuda::plan_tc_split;
using contrastbound::cuda::tc_blocks_by_smem;
using contrastbound::cuda::tc_prefer_chunked;
using contrastbound::cuda::tc_ceil_div;
using contrastbound::cuda::tc_split_cost;
using contrastbound::cuda::TcSplit;

namespace {

int failures = 0;

void fail(const char* what, int64_t xb, int64_t yt, int64_t slots, int64_t splits, double v = 0) {
  std::printf("FAIL %s: xblocks %lld ytiles %lld slots %lld splits %lld (%g)\n", what, static_cast<long long>(xb),
              static_cast<long long>(yt), static_cast<long long>(slots), static_cast<long long>(splits), v);
  ++failures;
}

double busy(int64_t xb, int64_t yt, int64_t slots, int64_t splits) {
  const double work = double(xb) * (double(yt) + kTcUnitOverheadTiles * splits);
  return work / (double(slots) * tc_split_cost(xb, yt, slots, splits));
}

int64_t old_rule(int64_t xb, int64_t yt, int64_t slots) {
  const int64_t s = std::max<int64_t>(1, std::min(tc_ceil_div(slots, xb), yt));
  return tc_ceil_div(yt, tc_ceil_div(yt, s));
}

void check(int64_t xb, int64_t yt, int64_t slots) {
  const TcSplit t = plan_tc_split(xb, yt, slots);
  if (t.splits < 1 || t.tiles_per_split < 1) return fail("empty plan", xb, yt, slots, t.splits);
  // Ranges [s tiles, (s + 1) tiles) for s < splits cover [0, ytiles) and the last one is not empty.
  if (t.splits * t.tiles_per_split < yt || (t.splits - 1) * t.tiles_per_split >= yt) {
    return fail("ranges do not tile Y", xb, yt, slots, t.splits);
  }
  if (t.splits > 1 && t.splits * xb > kTcMaxUnitsPerSlot * slots) fail("over the memory cap", xb, yt, slots, t.splits);
  const int64_t cost = tc_split_cost(xb, yt, slots, t.splits);
  for (int64_t s = 1; s <= yt && s * xb <= std::max(xb, kTcMaxUnitsPerSlot * slots); ++s) {
    if (tc_split_cost(xb, yt, slots, s) < cost) return fail("a cheaper split exists", xb, yt, slots, s);
  }
  if (cost > tc_split_cost(xb, yt, slots, old_rule(xb, yt, slots))) fail("worse than the old rule", xb, yt, slots, t.splits);
}

}  // namespace

int main() {
  const int64_t slot_counts[] = {1, 2, 7, 108 * 2, 132 * 2, 132 * 3, 170 * 2};
  for (int64_t slots : slot_counts) {
    for (int64_t xb = 1; xb <= 5000; xb = xb < 20 ? xb + 1 : xb * 5 / 4) {
      for (int64_t yt = 1; yt <= 70000; yt = yt < 20 ? yt + 1 : yt * 3 / 2) check(xb, yt, slots);
    }
  }
  // The GPU benchmark on an H200 (132 SMs x 2 resident blocks): B = 8192 anchors (128 blocks of 64) against
  // K = 2^14 .. 2^22 bank rows, both ways round (anchor term: X = anchors; bank gradients: X = bank), and
  // in-batch B = K = 2^14 .. 2^17. The old rule left the anchor-term pass at K >= 2^16 at 73 % (3 splits, 384 units,
  // two waves).
  const int64_t slots = 264;
  bool old_short = false;
  for (int logk = 14; logk <= 22; ++logk) {
    const int64_t kt = (int64_t(1) << logk) / 64;
    const int64_t shapes[][2] = {{128, kt}, {kt, 128}, {kt, kt}};
    for (const auto& s : shapes) {
      if (logk > 17 && s[0] == kt && s[1] == kt) continue;  // in-batch runs up to 2^17
      const TcSplit t = plan_tc_split(s[0], s[1], slots);
      const double b = busy(s[0], s[1], slots, t.splits);
      if (b < 0.90) fail("benchmark shape under 90 % busy", s[0], s[1], slots, t.splits, b);
      old_short |= busy(s[0], s[1], slots, old_rule(s[0], s[1], slots)) < 0.80;
    }
  }
  if (!old_short) fail("the old rule was not short anywhere (test no longer shows a difference)", 0, 0, slots, 0);
  if (plan_tc_split(128, 4096, slots).splits != 2) fail("H200 anchor-term case", 128, 4096, slots, 0);
  // Chunked copies of rows wider than 256 where they keep more blocks per multiprocessor (1 KiB reserved per
  // block): the mma.sync kernels' plans at d = 512 on an H200 (228 KiB per multiprocessor), whole rows 144896
  // bytes (one block), chunked 79360 (two); at d = 384, 112128 bytes whole (two blocks): no change.
  const size_t h200 = 228 * 1024;
  if (tc_blocks_by_smem(79360, h200) != 2 || tc_blocks_by_smem(112128, h200) != 2 ||
      tc_blocks_by_smem(144896, h200) != 1 || tc_blocks_by_smem(h200 - 1024, h200) != 1 ||
      tc_blocks_by_smem(h200 - 1023, h200) != 0) {
    fail("blocks per multiprocessor by shared memory", 0, 0, 0, 0);
  }
  if (!tc_prefer_chunked(144896, 79360, h200) || tc_prefer_chunked(112128, 79360, h200) ||
      tc_prefer_chunked(79360, 79360, h200)) {
    fail("chunked rows where they keep more blocks, and only there", 0, 0, 0, 0);
  }
  if (failures == 0) std::printf("tc_plan: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
