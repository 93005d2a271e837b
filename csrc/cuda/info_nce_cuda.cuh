// Host interface of the CUDA kernels of the fused InfoNCE family (csrc/cuda/info_nce_cuda.cu, which routes each
// problem to the part of its dtype, info_nce_cuda_{f32_f64,f16,bf16}.cu).
//
// Torch-free on purpose: CI compiles the .cu with plain nvcc (sm_80, sm_90a) on machines without a CUDA
// torch. Tensors cross this boundary as raw pointers with int64 sizes and element strides; the torch glue
// (info_nce_cuda_glue.cpp, compiled only in CUDA builds) checks arguments, allocates outputs and workspace
// through torch's caching allocator and passes torch's current stream.
//
// Semantics are those of the CPU kernel (csrc/cpu/info_nce_cpu.cpp): s = scale, hats = x / max(||x||, 1e-12)
// when normalize (identity otherwise),
//   l_i0 = s a_hat_i . p_hat_i,  l_ik = s a_hat_i . n_hat_ik,
//   lse_i = log([include_positive] e^{l_i0} + sum_k e^{l_ik}),  loss_i = lse_i - l_i0,
//   V_i = sum_k softmax_ik n_hat_ik (softmax over the full denominator; the anchors' gradient needs it).
//
// STATUS: compiled with nvcc (sm_80, sm_90a) in CI; ran on one H200 on 2026-12-04 (scripts/gpu_check.sh and two
// follow-ups, benchmarks/results/h200_2026-12-04/): the default group's tests passed but for test fixes and one
// crash in the formatting of a C++ error message (a libstdc++ copy in the module, setup.py), the wgmma kernels'
// tests passed and they became the default on sm_90a; the one-pass and flash kernels (off by default) agreed with
// the default kernels in the benchmark, their tests not yet run there. These entry points run
// whole, every kernel but the WMMA ones, under the CPU emulation of csrc/tests/test_cuda_emu.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace contrastbound {
namespace cuda {

enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// How anchor i's negatives are given.
//   Shared:    negatives (K, d), one bank for every anchor (in-batch: the positives themselves);
//   PerAnchor: negatives (B, K, d);
//   Indexed:   negatives (M, d) and indices (B, K) int64, anchor i's k-th negative is row indices[i, k]; an
//              index of -1 is padding (no negative there).
enum class Mode : int { Shared = 0, PerAnchor = 1, Indexed = 2 };

// One problem. Pointers are to the first element; strides are in elements and may be 0 or transposed
// (kernels index with them; nothing is copied). All sizes and offsets are int64.
struct Problem {
  DType dtype = DType::Float32;  // of anchors, positives and negatives
  Mode mode = Mode::Shared;
  int64_t B = 0;     // anchors
  int64_t K = 0;     // negatives per anchor
  int64_t d = 0;     // features
  int64_t rows = 0;  // rows of the negatives matrix: K (Shared), M (Indexed), unused (PerAnchor)

  const void* anchors = nullptr;  // (B, d)
  int64_t anchors_stride[2] = {0, 0};
  const void* positives = nullptr;  // (B, d)
  int64_t positives_stride[2] = {0, 0};
  // Shared / Indexed: (rows, d) with strides {row, feature, unused}; PerAnchor: (B, K, d) with 3 strides.
  const void* negatives = nullptr;
  int64_t negatives_stride[3] = {0, 0, 0};
  const int64_t* indices = nullptr;  // Indexed only: (B, K)
  int64_t indices_stride[2] = {0, 0};

  // s = 1 / temperature: one value of the accumulation type (float64 for Float64 inputs, else float32) in
  // device memory, read by the kernels (read_scale), so that a tensor temperature needs no host read-back.
  const void* scale = nullptr;
  bool normalize = true;
  bool include_positive = true;
  bool exclude_self = false;  // Shared only: bank row i is not a negative of anchor i (NT-Xent)
  // Shared only, (B,) contiguous or nullptr: bank row excluded[i] is not a negative of anchor i (an entry outside
  // [0, K) excludes none; compared, never used as an index). Not together with exclude_self.
  const int64_t* excluded = nullptr;
  // Shared only, (B, K) bool or nullptr (negative_mask): bank row k is in anchor i's sum only where
  // keep[i * keep_stride[0] + k * keep_stride[1]]. Every shared-bank kernel tests it (device_common.cuh's LeftOut).
  const bool* keep = nullptr;
  int64_t keep_stride[2] = {0, 0};
  // Shared only, (B,) and (K,) contiguous, or nullptr (labels / negative_labels): bank row k is left out of anchor
  // i's sum where bank_labels[k] == labels[i]; tested with the mask (LeftOut).
  const int64_t* labels = nullptr;
  const int64_t* bank_labels = nullptr;

  // Tensor cores (Shared mode, d <= 256, compute capability >= 8.0): float16/bfloat16 always unless
  // tensor_cores is false; float32 as TF32 only when tf32 is true (torch allows TF32 in float32 matmuls:
  // allow_tf32, fp32_precision = "tf32" or set_float32_matmul_precision("high")).
  bool tensor_cores = true;
  bool tf32 = false;
};

// Forward outputs, all contiguous, in the accumulation type (float64 for Float64 inputs, else float32).
struct ForwardOutputs {
  void* loss = nullptr;         // (B,)
  void* lse = nullptr;          // (B,)
  void* anchor_term = nullptr;  // (B, d) V, or nullptr when it is not wanted
};

// Backward inputs and outputs.
struct BackwardArgs {
  const void* grad_loss = nullptr;    // (B,) accumulation type, contiguous
  const void* lse = nullptr;          // (B,) accumulation type, contiguous
  const void* anchor_term = nullptr;  // (B, d) accumulation type, contiguous; needed iff grad_anchors
  // Forward's per-anchor loss, (B,) accumulation type, contiguous, or nullptr: with include_positive the
  // positive's weight less one is then expm1(-loss), free of lse's rounding where the positive dominates.
  const void* loss = nullptr;
  // Outputs, contiguous, in the input dtype; nullptr where that gradient is not wanted.
  void* grad_anchors = nullptr;    // (B, d)
  void* grad_positives = nullptr;  // (B, d)
  void* grad_negatives = nullptr;  // shape of the negatives
  // Indexed mode with grad_negatives: the flattened indices (row-major (B, K)) sorted stably, and the flat
  // position i * K + k of each sorted entry. Each bank row's gradient is then summed by one warp over its
  // contiguous run of pairs in a fixed order: deterministic, no atomics. sort_chunk > 0: the flat array was
  // sorted in consecutive pieces of sort_chunk entries (the last one shorter), each on its own (torch's CUDA sort
  // takes at most INT_MAX entries); a row's runs are then visited piece by piece, the same flat order.
  const int64_t* sorted_rows = nullptr;   // (B * K,)
  const int64_t* sorted_pairs = nullptr;  // (B * K,)
  int64_t sort_chunk = 0;
};

// Whether the experimental warpgroup-MMA kernels (CONTRASTBOUND_TC_WGMMA=1) can run on the current device:
// compute capability 9.0 and a build carrying sm_90a code. The first call per device runs a one-thread probe
// kernel and synchronises.
bool wgmma_available();

// Bytes of scratch memory that info_nce_forward / info_nce_backward need (pass at least that many, any
// alignment of 256 bytes). num_sms: multiprocessors of the device (sizes the grids and the scratch).
size_t info_nce_forward_workspace_bytes(const Problem& p, bool save_anchor_term, int num_sms);
size_t info_nce_backward_workspace_bytes(const Problem& p, const BackwardArgs& a, int num_sms);

// Enqueue the work on `stream`; return the first launch error (cudaSuccess otherwise). Nothing synchronises.
cudaError_t info_nce_forward(const Problem& p, const ForwardOutputs& out, void* workspace, size_t workspace_bytes,
                             int num_sms, cudaStream_t stream);
cudaError_t info_nce_backward(const Problem& p, const BackwardArgs& a, void* workspace, size_t workspace_bytes,
                              int num_sms, cudaStream_t stream);

}  // namespace cuda
}  // namespace contrastbound
