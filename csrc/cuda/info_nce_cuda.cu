// Entry points of the CUDA kernels (info_nce_cuda.cuh): each problem goes to the part of its element type
// (info_nce_cuda_{f32_f64,f16,bf16}.cu, which instantiate info_nce_cuda_impl.cuh), and the sm_90a probe of the
// wgmma kernels. Torch-free.
#include "info_nce_cuda_parts.cuh"

#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

namespace contrastbound {
namespace cuda {
namespace {

// The device attributes the planning reads.
constexpr cudaDeviceAttr kPlanAttrs[] = {cudaDevAttrComputeCapabilityMajor, cudaDevAttrComputeCapabilityMinor,
                                         cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                         cudaDevAttrMaxSharedMemoryPerMultiprocessor};
constexpr int kNumPlanAttrs = sizeof(kPlanAttrs) / sizeof(kPlanAttrs[0]);

// The environment variables of EnvSwitch, in its order.
constexpr const char* kSwitchNames[] = {"CONTRASTBOUND_TC_CHUNKED", "CONTRASTBOUND_TC_STAGES",
                                        "CONTRASTBOUND_TC_MMA",     "CONTRASTBOUND_TC_FUSED_FWD",
                                        "CONTRASTBOUND_TC_WGMMA",   "CONTRASTBOUND_TC_FLASH",
                                        "CONTRASTBOUND_TC_WG_LSE"};
constexpr int kNumSwitches = sizeof(kSwitchNames) / sizeof(kSwitchNames[0]);
static_assert(static_cast<int>(EnvSwitch::TcWgLse) == kNumSwitches - 1, "one name per switch");

char read_switch(int i) {
  const char* v = std::getenv(kSwitchNames[i]);
  return v == nullptr ? '\0' : v[0];
}

// The current device, its planning attributes and the switches as read at the start of the outermost entry-point
// call on this thread (DeviceScope): an entry point sizes its workspace, checks the caller's and carves it from one
// plan, so every decision in one call must see the same values, even where a read fails part way (a failed read
// counts as 0: no tensor cores, the SIMT kernels serve) or the environment changes.
struct DeviceSnapshot {
  int depth = 0;  // entry-point calls open on this thread
  int device = -1;
  int values[kNumPlanAttrs] = {};
  char switches[kNumSwitches] = {};
};
thread_local DeviceSnapshot snapshot;

int read_device() {
  int dev = 0;
  if (cudaGetDevice(&dev) == cudaSuccess) return dev;
  cudaGetLastError();  // not sticky
  return -1;
}

int read_attribute(int dev, cudaDeviceAttr attr) {
  int v = 0;
  if (dev < 0) return 0;
  if (cudaDeviceGetAttribute(&v, attr, dev) == cudaSuccess) return v;
  cudaGetLastError();  // not sticky; report "unsupported" and let the SIMT kernels run
  return 0;
}

class DeviceScope {
 public:
  DeviceScope() {
    if (snapshot.depth++ > 0) return;
    snapshot.device = read_device();
    for (int i = 0; i < kNumPlanAttrs; ++i) snapshot.values[i] = read_attribute(snapshot.device, kPlanAttrs[i]);
    for (int i = 0; i < kNumSwitches; ++i) snapshot.switches[i] = read_switch(i);
  }
  ~DeviceScope() { --snapshot.depth; }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
};

}  // namespace

int current_device() { return snapshot.depth > 0 ? snapshot.device : read_device(); }

int device_attribute(cudaDeviceAttr attr) {
  if (snapshot.depth > 0) {
    for (int i = 0; i < kNumPlanAttrs; ++i)
      if (kPlanAttrs[i] == attr) return snapshot.values[i];
  }
  return read_attribute(current_device(), attr);
}

char env_switch(EnvSwitch s) {
  const int i = static_cast<int>(s);
  return snapshot.depth > 0 ? snapshot.switches[i] : read_switch(i);
}

#ifndef CONTRASTBOUND_EMULATE
namespace {

// Set to 1 by sm90a_probe_kernel where this build carries sm_90a code for the running device (the wgmma kernels'
// body), else 0.
__device__ int sm90a_probe_flag;
__global__ void sm90a_probe_kernel() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  sm90a_probe_flag = 1;
#else
  sm90a_probe_flag = 0;
#endif
}

}  // namespace

// ask(answered) for the current device, once: the answer is cached per device where the probe got one (answered
// left true); one that could not run to its answer (no stream, a failed copy, e.g. out of memory or an error of
// earlier work) says "no" for that call only, and a later call asks again. No device: no.
template <typename Ask>
bool once_per_device(std::mutex& mutex, std::vector<std::pair<int, bool>>& cache, Ask ask) {
  const int device = current_device();
  if (device < 0) return false;
  const std::lock_guard<std::mutex> lock(mutex);
  for (const auto& e : cache)
    if (e.first == device) return e.second;
  bool answered = true;
  const bool ok = ask(answered);
  if (answered) cache.emplace_back(device, ok);
  return ok;
}

// Whether this thread has a CUDA error pending from earlier work (a launch its caller has not checked yet). The
// probes below clear their own failures' errors, which would clear such an error as well: with one pending they
// give no answer (the usual kernels serve this call; a later call asks again) and leave it for the caller to find.
bool error_pending() { return cudaPeekAtLastError() != cudaSuccess; }

// Whether the wgmma kernels (info_nce_wgmma.cuh) can run on the current device: compute capability 9.0 and a
// build with sm_90a code (TORCH_CUDA_ARCH_LIST containing 9.0a; a plain 9.0 build would reach their __trap()).
// Answered once per device (one tiny launch and a 4-byte copy on a stream of its own, no allocation; a probe that
// got no answer is asked again next time), and only when they are asked for. The probe may first run while the
// caller captures a CUDA graph: this thread's capture mode is relaxed for it (its synchronous copy would otherwise
// invalidate the capture) and its stream does not synchronise with the capturing one.
bool device_runs_sm90a() {
  static std::mutex mutex;
  static std::vector<std::pair<int, bool>> cache;
  return once_per_device(mutex, cache, [](bool& answered) {
    if (device_attribute(cudaDevAttrComputeCapabilityMajor) != 9 ||
        device_attribute(cudaDevAttrComputeCapabilityMinor) != 0)
      return false;
    if (error_pending()) {  // (see error_pending)
      answered = false;
      return false;
    }
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    cudaThreadExchangeStreamCaptureMode(&mode);
    cudaStream_t stream = nullptr;
    int host = 0;
    answered = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess;
    if (answered) {
      sm90a_probe_kernel<<<1, 1, 0, stream>>>();  // 1 from sm_90a code only; a failed launch leaves 0
      answered = cudaMemcpyFromSymbolAsync(&host, sm90a_probe_flag, sizeof(int), 0, cudaMemcpyDeviceToHost,
                                           stream) == cudaSuccess &&
                 cudaStreamSynchronize(stream) == cudaSuccess;
      cudaStreamDestroy(stream);
    }
    cudaThreadExchangeStreamCaptureMode(&mode);  // back to the caller's mode
    cudaGetLastError();  // a failed probe (no kernel image) means no: not an error of the caller's work
    return answered && host == 1;
  });
}

// Whether the code loaded for the current device was compiled for compute capability >= 8.0: the device's own
// capability is not enough, since a build for 7.5+PTX runs on an sm_80 or newer device through the JIT, where the
// tensor-core kernels' bodies are __trap() (a poisoned context instead of the SIMT kernels). The PTX version of the
// image chosen for the device, read by cudaFuncGetAttributes (no launch, nothing on a stream); cached per device
// once answered.
bool device_runs_tc_code() {
  static std::mutex mutex;
  static std::vector<std::pair<int, bool>> cache;
  return once_per_device(mutex, cache, [](bool& answered) {
    if (error_pending()) {  // (see error_pending)
      answered = false;
      return false;
    }
    cudaFuncAttributes attr{};
    answered = cudaFuncGetAttributes(&attr, sm90a_probe_kernel) == cudaSuccess;
    cudaGetLastError();  // (no image for this device: no, and not an error of the caller's work)
    return answered && attr.ptxVersion >= 80;
  });
}

#else
// The emulated host path (csrc/tests/test_cuda_emu.cpp): the emulated device says whether it runs sm_90a code,
// and for which compute capability the loaded code was compiled.
bool device_runs_sm90a() { return emu::device().sm90a; }
bool device_runs_tc_code() { return emu::arch_gate().code_arch >= 80; }
#endif  // CONTRASTBOUND_EMULATE

bool wgmma_available() {
  const DeviceScope scope;
  return device_runs_sm90a();
}

#define CB_ROUTE(DTYPE, CALL)                   \
  switch (DTYPE) {                              \
    case DType::Float32:                        \
      return CALL(f32);                         \
    case DType::Float64:                        \
      return CALL(f64);                         \
    case DType::Float16:                        \
      return CALL(f16);                         \
    case DType::BFloat16:                       \
      return CALL(bf16);                        \
  }

size_t info_nce_forward_workspace_bytes(const Problem& p, bool save_anchor_term, int num_sms) {
  const DeviceScope scope;
#define CB_CALL(NAME) forward_workspace_bytes_##NAME(p, save_anchor_term, num_sms)
  CB_ROUTE(p.dtype, CB_CALL)
#undef CB_CALL
  return 0;
}

size_t info_nce_backward_workspace_bytes(const Problem& p, const BackwardArgs& a, int num_sms) {
  const DeviceScope scope;
#define CB_CALL(NAME) backward_workspace_bytes_##NAME(p, a, num_sms)
  CB_ROUTE(p.dtype, CB_CALL)
#undef CB_CALL
  return 0;
}

cudaError_t info_nce_forward(const Problem& p, const ForwardOutputs& out, void* workspace, size_t workspace_bytes,
                             int num_sms, cudaStream_t stream) {
  const DeviceScope scope;  // one view of the device for the workspace check and the plan
  if (p.scale == nullptr) return cudaErrorInvalidValue;  // the kernels read it
  if (workspace_bytes < info_nce_forward_workspace_bytes(p, out.anchor_term != nullptr, num_sms)) {
    return cudaErrorInvalidValue;
  }
#define CB_CALL(NAME) forward_##NAME(p, out, workspace, num_sms, stream)
  CB_ROUTE(p.dtype, CB_CALL)
#undef CB_CALL
  return cudaErrorInvalidValue;
}

cudaError_t info_nce_backward(const Problem& p, const BackwardArgs& a, void* workspace, size_t workspace_bytes,
                              int num_sms, cudaStream_t stream) {
  const DeviceScope scope;
  if (p.scale == nullptr) return cudaErrorInvalidValue;
  if (workspace_bytes < info_nce_backward_workspace_bytes(p, a, num_sms)) return cudaErrorInvalidValue;
  if (a.grad_anchors != nullptr && a.anchor_term == nullptr) return cudaErrorInvalidValue;
  if (a.grad_negatives != nullptr && p.mode == Mode::Indexed && p.B * p.K > 0 &&
      (a.sorted_rows == nullptr || a.sorted_pairs == nullptr || a.sort_chunk < 0)) {
    return cudaErrorInvalidValue;
  }
#define CB_CALL(NAME) backward_##NAME(p, a, workspace, num_sms, stream)
  CB_ROUTE(p.dtype, CB_CALL)
#undef CB_CALL
  return cudaErrorInvalidValue;
}

#undef CB_ROUTE

}  // namespace cuda
}  // namespace contrastbound
