// The float32 and float64 parts of the CUDA kernels (see info_nce_cuda_impl.cuh): float32 with TF32 takes the
// WMMA tensor-core kernels, float64 only the SIMT ones.
#define CB_TC_ELEMENT float
#include "info_nce_cuda_impl.cuh"

namespace contrastbound {
namespace cuda {
CB_DEFINE_PART(f32, float, float)
CB_DEFINE_PART(f64, double, double)
}  // namespace cuda
}  // namespace contrastbound
