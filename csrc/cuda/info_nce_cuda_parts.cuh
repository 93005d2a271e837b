// Entry points of the per-element-type parts of the CUDA kernels (info_nce_cuda_{f32_f64,f16,bf16}.cu, each
// instantiating info_nce_cuda_impl.cuh for its types) and what they share; info_nce_cuda.cu routes to them by
// dtype. Internal to the CUDA sources; torch-free.
#pragma once

#include "info_nce_cuda.cuh"

namespace contrastbound {
namespace cuda {

// The current device (-1 where it cannot be read) and an attribute of it (0 where it cannot be read; the errors are
// cleared): within an entry-point call, as read once at its start. Defined in info_nce_cuda.cu.
int current_device();
int device_attribute(cudaDeviceAttr attr);

// Whether the wgmma kernels can run on the current device (compute capability 9.0 and sm_90a code in this build);
// asked once per device. Defined in info_nce_cuda.cu.
bool device_runs_sm90a();
// Whether the code loaded for the current device was compiled for compute capability >= 8.0 (the tensor-core
// kernels are __trap() below; a 7.5+PTX build JIT-compiled on an sm_80 or newer device would reach them).
bool device_runs_tc_code();

// The run-time switches of the tensor-core kernels (CONTRASTBOUND_TC_*; README, "Building"), each as the first
// character of its environment variable ('\0' where unset or empty): within an entry-point call, as read once at
// its start with the device's attributes, so that the workspace's size, its check and the launches of one call
// follow one plan even if the environment changes meanwhile. Defined in info_nce_cuda.cu.
enum class EnvSwitch : int { TcChunked, TcStages, TcMma, TcFusedFwd, TcWgmma, TcFlash, TcWgLse };
char env_switch(EnvSwitch s);

#define CB_DECLARE_PART(NAME)                                                                                     \
  size_t forward_workspace_bytes_##NAME(const Problem& p, bool save_anchor_term, int num_sms);                   \
  size_t backward_workspace_bytes_##NAME(const Problem& p, const BackwardArgs& a, int num_sms);                  \
  cudaError_t forward_##NAME(const Problem& p, const ForwardOutputs& out, void* workspace, int num_sms,          \
                             cudaStream_t stream);                                                               \
  cudaError_t backward_##NAME(const Problem& p, const BackwardArgs& a, void* workspace, int num_sms,             \
                              cudaStream_t stream);

CB_DECLARE_PART(f32)   // info_nce_cuda_f32_f64.cu
CB_DECLARE_PART(f64)   // info_nce_cuda_f32_f64.cu
CB_DECLARE_PART(f16)   // info_nce_cuda_f16.cu
CB_DECLARE_PART(bf16)  // info_nce_cuda_bf16.cu
#undef CB_DECLARE_PART

}  // namespace cuda
}  // namespace contrastbound
