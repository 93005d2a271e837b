// The f32_f64 part of the CUDA kernels (csrc/cuda/info_nce_cuda_f32_f64.cu) compiled for the CPU emulation
// (emu_runtime.h, test_cuda_emu.cpp).
#include "emu_runtime.h"

#include "cuda/info_nce_cuda_f32_f64.cu"
