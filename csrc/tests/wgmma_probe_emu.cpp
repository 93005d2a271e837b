// The wgmma probe (wgmma_probe.cu) built by the host compiler against the CPU emulation: a .cpp so that CMake
// compiles it as C++ (the same file as a CUDA source is the sm_90a build). See wgmma_probe.cu.
#include "wgmma_probe.cu"
