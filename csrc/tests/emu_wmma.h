// CPU emulation of the part of nvcuda::wmma (mma.h) that the WMMA tensor-core kernels use (info_nce_tc.cuh:
// float32 as TF32, and float16 / bfloat16 with CONTRASTBOUND_TC_MMA=0), on the fibers of emu_cuda.h.
//
// A fragment's layout across the lanes is unspecified in CUDA (kernels may only load, store, fill, mma and apply
// an element-wise operation to all of x[]), so here every lane holds the whole tile: load_matrix_sync reads all of
// it, mma_sync forms the whole product, store_matrix_sync writes all of it (the lanes write the same values). The
// memory operations are warp collectives (a warp barrier before and after, so a lane never runs ahead of the
// others' part of the copy; a divergent call deadlocks, which the emulation reports), and check what CUDA requires
// of their arguments: a 256-bit aligned pointer and a leading dimension that is a multiple of 16 bytes. mma_sync
// takes precision::tf32 operands as the tensor cores do, ignoring the 13 low mantissa bits (the kernels round with
// __float_to_tf32 first, which rounds to nearest, ties away from zero, as cvt.rna.tf32.f32); products and sums in
// float32. Not caught: a read of another lane's stored elements without a barrier after store_matrix_sync (every
// lane here has stored them all).
namespace emu {
inline void check_wmma_args(const void* p, unsigned ld, size_t elem) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) fail("wmma load/store pointer not 256-bit aligned");
  if ((ld * elem) % 16 != 0) fail("wmma leading dimension not a multiple of 16 bytes");
}
}  // namespace emu
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

namespace detail {
template <typename Use, int M, int N, int K>
struct Shape;
template <int M, int N, int K>
struct Shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct Shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct Shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

inline float tf32_truncate(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u &= 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
}

inline void warp_sync() { emu::warp_barrier(static_cast<int>(emu::g.cur->tid.x / 32)); }
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = detail::Shape<Use, M, N, K>::rows, cols = detail::Shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;  // the whole tile in every lane (see above)
  float x[rows * cols];
};

// Element (r, c) of the tile at p[r * ld + c] (row_major) or p[c * ld + r] (col_major).
template <typename Use, int M, int N, int K, typename T, typename Layout, typename U>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const U* p, unsigned ld) {
  static_assert(!std::is_same<Layout, void>::value, "the kernels load operand fragments with a layout");
  emu::check_wmma_args(p, ld, sizeof(U));
  detail::warp_sync();
  constexpr bool row = std::is_same<Layout, row_major>::value;
  for (int r = 0; r < f.rows; ++r)
    for (int c = 0; c < f.cols; ++c) f.x[r * f.cols + c] = detail::to_float(row ? p[r * ld + c] : p[c * ld + r]);
  detail::warp_sync();
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ld, layout_t layout) {
  emu::check_wmma_args(p, ld, sizeof(float));
  detail::warp_sync();
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_row_major ? p[r * ld + c] : p[c * ld + r]) = f.x[r * N + c];
  detail::warp_sync();
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  for (float& e : f.x) e = v;
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  emu::tensor_core_instruction();
  constexpr bool tf32 = std::is_same<T, precision::tf32>::value;
  const auto in = [](float v) { return tf32 ? detail::tf32_truncate(v) : v; };
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += in(a.x[i * K + k]) * in(b.x[k * N + j]);
      out[i * N + j] = s;
    }
  std::memcpy(d.x, out, sizeof out);
}

// cvt.rna.tf32.f32: to the nearest value with 10 mantissa bits, ties away from zero; infinities and NaN unchanged.
inline float __float_to_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
}

}  // namespace wmma
}  // namespace nvcuda
