// The bfloat16 part of the CUDA kernels (see info_nce_cuda_impl.cuh).
#include <cuda_bf16.h>
#define CB_TC_ELEMENT __nv_bfloat16
#include "info_nce_cuda_impl.cuh"

namespace contrastbound {
namespace cuda {
CB_DEFINE_PART(bf16, __nv_bfloat16, float)
}  // namespace cuda
}  // namespace contrastbound
