// The CUDA entry points (csrc/cuda/info_nce_cuda.cu: routing by dtype, workspace checks) compiled for the CPU
// emulation (emu_runtime.h, test_cuda_emu.cpp).
#include "emu_runtime.h"

#include "cuda/info_nce_cuda.cu"
