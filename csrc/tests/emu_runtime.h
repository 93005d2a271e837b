// The CUDA runtime as the host side of the kernels (csrc/cuda/info_nce_cuda*.cu) uses it, emulated on the CPU on
// top of emu_cuda.h (threads as fibers, mma.sync, ldmatrix, cp.async, shuffles) and emu_wgmma.h (warpgroup MMA),
// so that test_cuda_emu.cpp runs the library's CUDA entry points, info_nce_forward / info_nce_backward, whole:
// dtype routing, dispatch between the SIMT and tensor-core kernels, work split, workspace carving and every kernel
// (the WMMA ones on emu_wmma.h), on a machine without a GPU.
//
// Included first by each emulated translation unit (emu_part_*.cpp wrap the library's .cu files). "Device memory"
// is host memory; a launch (CB_LAUNCH, device_common.cuh) runs the kernel at once, every block in turn, one stream;
// the device's properties (compute capability, shared memory, blocks per multiprocessor, sm_90a code) are
// emu::device(), which the test sets. The runtime functions themselves are defined in test_cuda_emu.cpp.
//
// What this cannot show, beyond emu_cuda.h's list: launch failures of the real driver (resource limits, a missing
// kernel image), stream ordering.
#pragma once

#include <cuda_runtime.h>

#include <unordered_map>
#include <utility>
#include <vector>

#include "emu_cuda.h"
#include "emu_wgmma.h"

// A kernel's static shared arrays (CB_SHARED, device_common.cuh): one per kernel instance, which is right because
// blocks run one after another and the threads of a block share it; filled with NaN bytes (0xff) when the first
// thread of each block reaches the declaration, as dynamic shared memory is, so a read before any write shows.
// `__shared__` itself stays undefined here: a declaration that bypasses CB_SHARED does not compile.
#undef __shared__
namespace emu {
inline void poison_static(void* array, size_t bytes) {
  static std::unordered_map<void*, uint64_t> seen;  // array -> the block that last filled it
  uint64_t& last = seen[array];
  if (last != g.blocks_run) {
    last = g.blocks_run;
    std::memset(array, 0xff, bytes);
  }
}
}  // namespace emu
#define CB_SHARED(TYPE, NAME, DIMS) \
  static TYPE NAME DIMS;            \
  ::emu::poison_static(&NAME, sizeof(NAME))

// cuda_runtime.h declares its C++ overload only for nvcc.
template <typename T>
cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

namespace emu {

struct Device {
  int id = 0;                      // cudaGetDevice: a new id for each profile (the library caches per device)
  int major = 9, minor = 0;        // compute capability
  int smem_optin = 227 * 1024;     // cudaDevAttrMaxSharedMemoryPerBlockOptin (H100 / H200)
  int smem_per_sm = 228 * 1024;    // cudaDevAttrMaxSharedMemoryPerMultiprocessor
  int multiprocessors = 2;         // what the test passes as num_sms
  int blocks_per_sm = 2;           // the occupancy answer (capped by shared memory)
  bool sm90a = true;               // the build carries sm_90a code for this device (wgmma kernels)
};

inline Device& device() {
  static Device d;
  return d;
}

// cudaFuncAttributeMaxDynamicSharedMemorySize as set per kernel and device (test_cuda_emu.cpp's
// cudaFuncSetAttribute): a launch with more than the default 48 KiB of dynamic shared memory fails on a GPU unless
// it was raised for that kernel on that device.
struct SmemAllowed {
  const void* kernel;
  int device;
  int bytes;
};

inline std::vector<SmemAllowed>& smem_allowed() {
  static std::vector<SmemAllowed> v;
  return v;
}

// Failures on demand: every runtime call and every launch is an event, counted from 1; the events named in fail_at
// fail (a call returns its error, a launch does not run), and each failure becomes the last error, as on a GPU,
// where cudaGetLastError returns it once.
struct Faults {
  int64_t events = 0;
  std::vector<bool> is_launch;  // per event so far
  int64_t fail_at[2] = {-1, -1};
  cudaError_t last = cudaSuccess;
};

inline Faults& faults() {
  static Faults f;
  return f;
}

// Whether this event fails (then `err` is the last error).
inline bool inject(cudaError_t err, const char* what, bool launch = false) {
  Faults& f = faults();
  ++f.events;
  f.is_launch.push_back(launch);
  if (std::getenv("EMU_FAULT_VERBOSE")) std::fprintf(stderr, "  event %lld: %s\n", (long long)f.events, what);
  if (f.events != f.fail_at[0] && f.events != f.fail_at[1]) return false;
  f.last = err;
  return true;
}

// Called before each launch that runs (where set): the test's way to act part way through an entry-point call, e.g.
// to change the environment between its launches.
inline std::function<void()>& launch_hook() {
  static std::function<void()> f;
  return f;
}

// CB_LAUNCH(grid, block, shared bytes, stream, kernel)(arguments): each emulated thread calls the kernel with its
// own copy of the arguments (kernels take them by value, as a launch does). A launch the device would refuse (more
// than 48 KiB of dynamic shared memory not raised for the kernel: cudaErrorInvalidValue; a grid dimension of 0, or
// over 2^31 - 1 blocks in x or 65535 in y: cudaErrorInvalidConfiguration) or an injected failure does not run and
// leaves its error as the last error.
template <typename F>
struct Launch {
  F kernel;
  dim3 grid;
  unsigned threads;
  size_t smem;
  bool refused;
  bool bad_grid;
  template <typename... A>
  void operator()(A... args) const {
    if (bad_grid) {
      faults().last = cudaErrorInvalidConfiguration;
      return;
    }
    if (refused) {
      faults().last = cudaErrorInvalidValue;
      return;
    }
    if (inject(cudaErrorLaunchOutOfResources, "launch", /*launch=*/true)) return;
    if (launch_hook()) launch_hook()();
    const F k = kernel;
    const std::function<void()> body = [k, args...] { k(args...); };
    if (threads % 128 == 0) {
      wg::launch(grid.x, threads, smem, body, grid.y);  // also checks that no wgmma is left pending
    } else {
      launch(grid.x, threads, smem, body, grid.y);
    }
  }
};

template <typename F>
Launch<F> launcher(F kernel, dim3 grid, unsigned threads, size_t smem) {
  if (grid.z != 1) fail("three-dimensional grids are not emulated");
  bool raised = smem <= 48 * 1024;
  const void* key = reinterpret_cast<const void*>(kernel);
  for (const auto& e : smem_allowed())
    raised = raised || (e.kernel == key && e.device == device().id && static_cast<size_t>(e.bytes) >= smem);
  const bool fits = smem <= static_cast<size_t>(device().smem_optin);
  const bool bad_grid = grid.x == 0 || grid.x > 0x7fffffffu || grid.y == 0 || grid.y > 65535u;
  return Launch<F>{kernel, grid, threads, smem, !raised || !fits, bad_grid};
}

}  // namespace emu

#define CB_LAUNCH(GRID, BLOCK, SMEM, STREAM, ...) ::emu::launcher(__VA_ARGS__, GRID, BLOCK, SMEM)
