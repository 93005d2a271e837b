// Shared by the emulated CUDA tests (test_mma_emu.cpp, test_wgmma_emu.cpp through emu_test_common.h, and
// test_cuda_emu.cpp): check counters and the conversions between the element types and float64. Included inside
// each test's anonymous namespace, after <cmath>, <string> and the CUDA half types.
#pragma once

int failures = 0;
int checks = 0;

void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

// x in float64 (exact for every element type), and a float64 value rounded to T (to nearest).
template <typename T>
double to_d(T x) {
  return static_cast<double>(x);
}
template <>
double to_d<__half>(__half x) {
  return __half2float(x);
}
template <>
double to_d<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename T>
T from_d(double x) {
  return static_cast<T>(x);
}
template <>
__half from_d<__half>(double x) {
  return __float2half_rn(static_cast<float>(x));
}
template <>
__nv_bfloat16 from_d<__nv_bfloat16>(double x) {
  return __float2bfloat16_rn(static_cast<float>(x));
}
