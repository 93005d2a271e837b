// The float16 part of the CUDA kernels (see info_nce_cuda_impl.cuh).
#include <cuda_fp16.h>
#define CB_TC_ELEMENT __half
#include "info_nce_cuda_impl.cuh"

namespace contrastbound {
namespace cuda {
CB_DEFINE_PART(f16, __half, float)
}  // namespace cuda
}  // namespace contrastbound
