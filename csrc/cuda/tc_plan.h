// How the tensor-core kernels split their work over the GPU (pure host C++: no CUDA, no torch, so the C++
// tests check it on any machine).
//
// Each tensor-core kernel walks, for one block of 64 "X" rows, over a range of 64-row "Y" tiles; a unit of work
// is (X block, Y split). Units are long (thousands of tiles at large K) and a launch runs `slots` of them at a
// time (multiprocessors x resident blocks per multiprocessor), so the number of units decides how full the last
// wave is: 384 units on 264 slots take two waves, the second 45 % full, i.e. 27 % of the time idle. The plan
// picks the number of splits whose modelled time, waves x (tiles per split + a fixed cost per unit for the X
// tile and the epilogue), is least; ties go to fewer splits (less partial-result memory, a shorter merge).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace contrastbound {
namespace cuda {

// Per-unit cost besides its Y tiles, in tiles: the X tile's copy and the epilogue (a 64 x d float32 partial
// written or a row block finished), each about one Y tile's copy.
constexpr int64_t kTcUnitOverheadTiles = 2;
constexpr int64_t kTcMaxUnitsPerSlot = 4;

struct TcSplit {
  int64_t splits = 1;           // Y ranges per X block (>= 1, none empty)
  int64_t tiles_per_split = 0;  // Y tiles in each range but the last
};

inline int64_t tc_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Modelled time of `splits` ranges (in tiles): waves of `slots` units x the longest unit.
inline int64_t tc_split_cost(int64_t xblocks, int64_t ytiles, int64_t slots, int64_t splits) {
  const int64_t tiles = tc_ceil_div(ytiles, splits);
  const int64_t used = tc_ceil_div(ytiles, tiles);  // splits that are not empty
  return tc_ceil_div(xblocks * used, slots) * (tiles + kTcUnitOverheadTiles);
}

// xblocks X blocks, ytiles Y tiles, slots units resident at once (>= 1). Splits are searched while the units
// stay within kTcMaxUnitsPerSlot waves (more splits mean more float32 partial rows: at most that many waves'
// worth, 4 x 264 x 64 rows x d floats = 69 MB at d = 256 on an H200, and only when X is small).
inline TcSplit plan_tc_split(int64_t xblocks, int64_t ytiles, int64_t slots) {
  TcSplit t;
  if (xblocks <= 0 || ytiles <= 0) return t;
  slots = std::max<int64_t>(1, slots);
  const int64_t cap = std::min(ytiles, std::max<int64_t>(1, kTcMaxUnitsPerSlot * slots / xblocks));
  int64_t best = tc_split_cost(xblocks, ytiles, slots, 1);
  int64_t best_s = 1;
  for (int64_t s = 2; s <= cap; ++s) {
    const int64_t c = tc_split_cost(xblocks, ytiles, slots, s);
    if (c < best) {
      best = c;
      best_s = s;
    }
  }
  t.tiles_per_split = tc_ceil_div(ytiles, best_s);
  t.splits = tc_ceil_div(ytiles, t.tiles_per_split);
  return t;
}

// Blocks of `bytes` of shared memory each that one multiprocessor of `per_sm` bytes holds (1 KiB reserved per
// block, as the occupancy calculator counts it).
inline int64_t tc_blocks_by_smem(size_t bytes, size_t per_sm) {
  return static_cast<int64_t>(per_sm / (bytes + 1024));
}

// Whether rows wider than 256 features that fit whole in shared memory (`whole` bytes per block with one Y stage)
// are better copied in 256-feature chunks (`chunked` bytes): where that keeps more blocks per multiprocessor. On
// the H200 (228 KiB per multiprocessor) whole rows leave one block from d = 385, chunked ones two; at d = 512
// (B = 8192, K = 2^16, bf16) the chunked step took 31.3-31.5 ms against 35.7-36.1 ms for whole rows in three runs
// (2026-12-04; the chunked path reads the X tile again per Y tile, mostly from L2, which the second block hides).
inline bool tc_prefer_chunked(size_t whole, size_t chunked, size_t per_sm) {
  return tc_blocks_by_smem(chunked, per_sm) > tc_blocks_by_smem(whole, per_sm);
}

}  // namespace cuda
}  // namespace contrastbound
