// Torch glue of the CUDA kernels (compiled only in CUDA builds; setup.py adds csrc/cuda/*_glue.cpp then):
// argument checks, device guard, torch's current stream, outputs and workspace from torch's caching
// allocator, and the CUDA implementations of the contrastbound:: ops.
//
// STATUS: an earlier version (the scale passed as a double) was built and tested against torch 2.11 (CUDA 13.0)
// on an H200 by scripts/gpu_check.sh; the current one is compiled in CI only against the CPU torch's headers with
// stub library headers (CMakeLists.txt: contrastbound_cuda_glue_check), not yet built into a module against a CUDA
// torch; by hand (2026-12-04) compiled to an object file against torch 2.11.0+cu130's headers, as C++17 and C++20,
// every undefined symbol of it exported by that wheel's libraries, libstdc++, cudart or the kernels' objects.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include <array>
#include <cstdlib>
#include <string>
#include <tuple>

#include "../info_nce_checks.h"
#include "info_nce_cuda.cuh"

namespace contrastbound {
namespace cuda {
namespace {

using at::Tensor;

// Whether float32 matrix products may take TF32, as torch's own matmuls decide it. From torch 2.9 the setting is
// kept per backend and op (torch.backends.cuda.matmul.fp32_precision, which allow_tf32 and
// set_float32_matmul_precision also set), and the legacy reader allowTF32CuBLAS() raises once the two APIs
// disagree (fp32_precision = "tf32" set alone): every CUDA call of the ops failed then, whatever its dtype.
// torch 2.9 gives the setting as a string, 2.10 on as an enum; before 2.9 the legacy reader is the only one.
// Inside an at::NoTF32Guard scope (torch's internal switch, honoured by its cuBLAS calls) never.
bool tf32_matmul() {
  if (at::NoTF32Guard::should_disable_tf32()) return false;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
#elif TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 9
  return at::globalContext().float32Precision("cuda", "matmul") == "tf32";
#else
  return at::globalContext().allowTF32CuBLAS();
#endif
}

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::Float32;
    case at::kDouble:
      return DType::Float64;
    case at::kHalf:
      return DType::Float16;
    case at::kBFloat16:
      return DType::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, "contrastbound CUDA kernels support float16, bfloat16, float32 and float64, got ", t);
  }
}

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

bool has_indices(const c10::optional<Tensor>& indices) { return indices.has_value() && indices->defined(); }

// Whether the stream the op runs on (the current stream of the anchors' device) is being captured into a CUDA
// graph. negative_indices' range is then checked in the stream (a device assert, as torch's own indexing does)
// rather than read back, which would end the capture with an error.
bool capturing(const Tensor& anchors, const c10::optional<Tensor>& indices) {
  if (!has_indices(indices) || !anchors.is_cuda()) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(anchors.device().index()), &status));
  return status != cudaStreamCaptureStatusNone;
}

void check_cuda(const Tensor& anchors, const Tensor& positives, const Tensor& negatives,
                const c10::optional<Tensor>& indices) {
  TORCH_CHECK_VALUE(anchors.is_cuda() && positives.is_cuda() && negatives.is_cuda(),
                    "contrastbound CUDA kernels: anchors, positives and negatives must be CUDA tensors");
  if (has_indices(indices)) {
    TORCH_CHECK_VALUE(indices->is_cuda() && indices->device() == anchors.device(),
                      "negative_indices must be on the device of anchors (", anchors.device(), ")");
  }
}

// The scale as the kernels read it: one value of the accumulation type on the anchors' device (a fill kernel;
// call under the device guard). A float scale is checked here.
Tensor device_scale(double scale, const Tensor& anchors) {
  check_scale(scale, anchors.scalar_type());
  return at::full({}, scale, anchors.options().dtype(acc_type_of(anchors.scalar_type())));
}

// A tensor scale: a CPU one is read on the host (free); a CUDA one stays on the device, unread (no
// synchronisation), and the kernels turn a value that is not positive and finite into NaN (read_scale).
Tensor device_scale(const Tensor& scale, const Tensor& anchors) {
  check_scale_tensor(scale);
  if (!scale.is_cuda()) return device_scale(scale.item<double>(), anchors);
  return scale.reshape({}).to(anchors.device(), acc_type_of(anchors.scalar_type())).contiguous();
}

// The problem as the torch-free launchers see it: raw pointers and element strides (no copies; expanded and
// transposed inputs are read through their strides). scale: from device_scale, alive until the kernels are
// queued (the caching allocator reuses its block only in stream order).
Problem make_problem(const Tensor& anchors, const Tensor& positives, const Tensor& negatives,
                     const c10::optional<Tensor>& indices, const Tensor& scale, bool normalize,
                     bool include_positive, bool exclude_self, const Tensor& excluded,
                     const c10::optional<Tensor>& negative_mask = c10::nullopt,
                     const std::pair<Tensor, Tensor>& labels = {}) {
  Problem p;
  p.dtype = dtype_of(anchors.scalar_type());
  p.B = anchors.size(0);
  p.d = anchors.size(1);
  p.anchors = anchors.data_ptr();
  p.anchors_stride[0] = anchors.stride(0);
  p.anchors_stride[1] = anchors.stride(1);
  p.positives = positives.data_ptr();
  p.positives_stride[0] = positives.stride(0);
  p.positives_stride[1] = positives.stride(1);
  p.negatives = negatives.data_ptr();
  for (int64_t k = 0; k < negatives.dim() && k < 3; ++k) p.negatives_stride[k] = negatives.stride(k);
  if (has_indices(indices)) {
    p.mode = Mode::Indexed;
    p.K = indices->size(1);
    p.rows = negatives.size(0);
    p.indices = indices->data_ptr<int64_t>();
    p.indices_stride[0] = indices->stride(0);
    p.indices_stride[1] = indices->stride(1);
  } else if (negatives.dim() == 3) {
    p.mode = Mode::PerAnchor;
    p.K = negatives.size(1);
    p.rows = 0;
  } else {
    p.mode = Mode::Shared;
    p.K = negatives.size(0);
    p.rows = p.K;
  }
  p.scale = scale.data_ptr();
  p.normalize = normalize;
  p.include_positive = include_positive;
  p.exclude_self = exclude_self;
  if (negative_mask.has_value() && negative_mask->defined()) {  // read through its strides (LeftOut)
    p.keep = negative_mask->data_ptr<bool>();
    p.keep_stride[0] = negative_mask->stride(0);
    p.keep_stride[1] = negative_mask->stride(1);
  }
  if (labels.first.defined()) {  // contiguous (label_rows)
    p.labels = labels.first.data_ptr<int64_t>();
    p.bank_labels = labels.second.data_ptr<int64_t>();
  }
  p.excluded = excluded.defined() ? excluded.data_ptr<int64_t>() : nullptr;
  // CONTRASTBOUND_TENSOR_CORES=0 forces the SIMT kernels (tests compare both paths); float32 follows torch's
  // TF32 setting for matrix products.
  const char* tc = std::getenv("CONTRASTBOUND_TENSOR_CORES");
  p.tensor_cores = tc == nullptr || std::string(tc) != "0";
  p.tf32 = p.dtype == DType::Float32 && tf32_matmul();
  // CONTRASTBOUND_TC_WGMMA=1 (experimental) asks for the sm_90a warpgroup-MMA kernels: on a device or build where
  // they cannot run, an error rather than a silent fallback, so that a test or benchmark of them measures them.
  // Problems that the flash kernels do not serve (float32, per-anchor or indexed negatives, ...) take the usual
  // kernels, as without the variable.
  const char* wg = std::getenv("CONTRASTBOUND_TC_WGMMA");
  TORCH_CHECK(wg == nullptr || wg[0] != '1' || wgmma_available(),
              "CONTRASTBOUND_TC_WGMMA=1: the wgmma kernels need a GPU of compute capability 9.0 and an extension built "
              "with 9.0a in TORCH_CUDA_ARCH_LIST (unset the variable for the default kernels)");
  return p;
}

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

Tensor workspace(size_t bytes, const Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

// loss, lse (B,) and V (B, d) or (0,), in the accumulation type.
std::tuple<Tensor, Tensor, Tensor> forward_on_stream(const Problem& p, const Tensor& anchors, bool save) {
  const auto acc_opts = anchors.options().dtype(acc_type_of(anchors.scalar_type()));
  Tensor loss = at::empty({p.B}, acc_opts);
  Tensor lse = at::empty({p.B}, acc_opts);
  Tensor term = save ? at::empty({p.B, p.d}, acc_opts) : at::empty({0}, acc_opts);
  ForwardOutputs out;
  out.loss = loss.data_ptr();
  out.lse = lse.data_ptr();
  out.anchor_term = save ? term.data_ptr() : nullptr;
  const int sms = num_sms();
  const size_t bytes = info_nce_forward_workspace_bytes(p, save, sms);
  // Freed when this function returns, while the kernels may still be queued: safe, because torch's caching
  // allocator hands the block out again only in stream order (it was allocated on the current stream).
  Tensor ws = workspace(bytes, anchors);
  C10_CUDA_CHECK(info_nce_forward(p, out, ws.data_ptr(), bytes, sms, at::cuda::getCurrentCUDAStream().stream()));
  return {loss, lse, term};
}

// Scale: a double (info_nce_fwd) or a tensor (info_nce_fwd_scaled), see device_scale.
template <typename Scale>
std::tuple<Tensor, Tensor, Tensor> info_nce_fwd_impl(const Tensor& anchors, const Tensor& positives,
                                                     const Tensor& negatives,
                                                     const c10::optional<Tensor>& indices, const Scale& scale,
                                                     bool normalize, bool include_positive, bool save_anchor_term,
                                                     bool exclude_self, const c10::optional<Tensor>& excluded,
                                                     const c10::optional<Tensor>& negative_mask,
                                                     const c10::optional<Tensor>& labels,
                                                     const c10::optional<Tensor>& negative_labels) {
  check_info_nce_inputs(anchors, positives, negatives, indices, exclude_self, true, capturing(anchors, indices));
  check_left_out(excluded, negative_mask, labels, negative_labels, anchors, negatives, indices, exclude_self);
  check_cuda(anchors, positives, negatives, indices);
  const c10::cuda::CUDAGuard device_guard(anchors.device());
  at::NoGradGuard no_grad;
  const Tensor s = device_scale(scale, anchors);
  const Tensor excl = excluded.has_value() && excluded->defined() ? excluded->contiguous() : Tensor();
  const auto lab = label_rows(labels, negative_labels);
  const Problem p = make_problem(anchors, positives, negatives, indices, s, normalize, include_positive,
                                 exclude_self, excl, negative_mask, lab);
  return forward_on_stream(p, anchors, save_anchor_term);
}

template <typename Scale>
std::tuple<Tensor, Tensor, Tensor> info_nce_bwd_impl(const Tensor& grad_loss, const Tensor& anchors,
                                                     const Tensor& positives, const Tensor& negatives,
                                                     const c10::optional<Tensor>& indices, const Tensor& lse,
                                                     const Tensor& anchor_term, const Scale& scale, bool normalize,
                                                     bool include_positive, std::array<bool, 3> output_mask,
                                                     bool exclude_self, bool check_indices,
                                                     const c10::optional<Tensor>& loss,
                                                     const c10::optional<Tensor>& excluded,
                                                     const c10::optional<Tensor>& negative_mask,
                                                     const c10::optional<Tensor>& labels,
                                                     const c10::optional<Tensor>& negative_labels) {
  // check_indices = false (the autograd backward: forward checked the same saved tensor) is overridden where V must
  // be recomputed (no anchor term given): that pass reads the rows the indices name.
  const bool check_range = check_indices || (output_mask[0] && anchor_term.numel() == 0);
  check_info_nce_inputs(anchors, positives, negatives, indices, exclude_self, check_range,
                        check_range && capturing(anchors, indices));  // (no stream query where nothing is checked)
  check_cuda(anchors, positives, negatives, indices);
  const int64_t B = anchors.size(0), d = anchors.size(1);
  check_backward_inputs(grad_loss, lse, anchor_term, anchors, loss);
  check_left_out(excluded, negative_mask, labels, negative_labels, anchors, negatives, indices, exclude_self);
  const c10::cuda::CUDAGuard device_guard(anchors.device());
  at::NoGradGuard no_grad;
  const auto acc = acc_type_of(anchors.scalar_type());
  const Tensor s = device_scale(scale, anchors);
  const Tensor excl = excluded.has_value() && excluded->defined() ? excluded->contiguous() : Tensor();
  const auto lab = label_rows(labels, negative_labels);
  const Problem p = make_problem(anchors, positives, negatives, indices, s, normalize, include_positive,
                                 exclude_self, excl, negative_mask, lab);

  Tensor grad_a = output_mask[0] ? at::empty({B, d}, anchors.options()) : at::empty({0}, anchors.options());
  Tensor grad_p = output_mask[1] ? at::empty({B, d}, positives.options()) : at::empty({0}, positives.options());
  Tensor grad_n = output_mask[2] ? at::empty(negatives.sizes(), negatives.options()) : at::empty({0}, negatives.options());

  const Tensor g = grad_loss.to(acc).contiguous();
  const Tensor lse_c = lse.to(acc).contiguous();
  const Tensor loss_c = loss.has_value() ? loss->to(acc).contiguous() : Tensor();
  Tensor term;
  if (output_mask[0]) {
    if (anchor_term.numel() == B * d) {
      term = anchor_term.to(acc).contiguous();
    } else {
      // Forward did not save V (the anchors did not need a gradient then): one more forward pass.
      term = std::get<2>(forward_on_stream(p, anchors, true));
    }
  }
  Tensor sorted_rows, sorted_pairs;
  int64_t sort_chunk = 0;
  // (no sort where the bank's gradient has no entries, d = 0 or M = 0: the kernel gets no gradient pointer then)
  if (output_mask[2] && p.mode == Mode::Indexed && p.B * p.K > 0 && grad_n.numel() > 0) {
    // Stable sort of the flattened (B, K) indices: each bank row's pairs form one run, in flat order. torch's CUDA
    // sort refuses more than INT_MAX entries: past 2^30, consecutive pieces of 2^30 are sorted on their own (the
    // kernel visits a row's run in each piece in turn: the same order, BackwardArgs::sort_chunk).
    constexpr int64_t kSortPiece = int64_t(1) << 30;
    const Tensor flat = indices->reshape({-1});
    const int64_t n = flat.numel();
    if (n <= kSortPiece) {
      std::tie(sorted_rows, sorted_pairs) = at::sort(flat, /*stable=*/true, /*dim=*/0, false);
      sorted_rows = sorted_rows.contiguous();
      sorted_pairs = sorted_pairs.contiguous();
    } else {
      sort_chunk = kSortPiece;
      sorted_rows = at::empty({n}, flat.options());
      sorted_pairs = at::empty({n}, flat.options());
      for (int64_t c0 = 0; c0 < n; c0 += kSortPiece) {
        const int64_t len = std::min(kSortPiece, n - c0);
        Tensor r = sorted_rows.narrow(0, c0, len), q = sorted_pairs.narrow(0, c0, len);  // contiguous slices
        at::sort_out(r, q, flat.narrow(0, c0, len), /*stable=*/true, /*dim=*/0, /*descending=*/false);
        q.add_(c0);
      }
    }
  }

  BackwardArgs a;
  a.grad_loss = g.data_ptr();
  a.lse = lse_c.data_ptr();
  a.loss = loss_c.defined() ? loss_c.data_ptr() : nullptr;
  a.anchor_term = term.defined() ? term.data_ptr() : nullptr;
  a.grad_anchors = output_mask[0] ? grad_a.data_ptr() : nullptr;
  a.grad_positives = output_mask[1] ? grad_p.data_ptr() : nullptr;
  a.grad_negatives = output_mask[2] && grad_n.numel() > 0 ? grad_n.data_ptr() : nullptr;
  if (sorted_rows.defined()) {
    a.sorted_rows = sorted_rows.data_ptr<int64_t>();
    a.sorted_pairs = sorted_pairs.data_ptr<int64_t>();
    a.sort_chunk = sort_chunk;
  }
  const int sms = num_sms();
  const size_t bytes = info_nce_backward_workspace_bytes(p, a, sms);
  Tensor ws = workspace(bytes, anchors);
  C10_CUDA_CHECK(info_nce_backward(p, a, ws.data_ptr(), bytes, sms, at::cuda::getCurrentCUDAStream().stream()));
  return {grad_a, grad_p, grad_n};
}

std::tuple<Tensor, Tensor, Tensor> info_nce_fwd_cuda(const Tensor& anchors, const Tensor& positives,
                                                     const Tensor& negatives, const c10::optional<Tensor>& indices,
                                                     double scale, bool normalize, bool include_positive,
                                                     bool save_anchor_term, bool exclude_self,
                                                     const c10::optional<Tensor>& excluded,
                                                     const c10::optional<Tensor>& negative_mask,
                                                     const c10::optional<Tensor>& labels,
                                                     const c10::optional<Tensor>& negative_labels) {
  return info_nce_fwd_impl(anchors, positives, negatives, indices, scale, normalize, include_positive,
                           save_anchor_term, exclude_self, excluded, negative_mask, labels, negative_labels);
}

std::tuple<Tensor, Tensor, Tensor> info_nce_fwd_scaled_cuda(const Tensor& anchors, const Tensor& positives,
                                                            const Tensor& negatives,
                                                            const c10::optional<Tensor>& indices,
                                                            const Tensor& scale, bool normalize,
                                                            bool include_positive, bool save_anchor_term,
                                                            bool exclude_self,
                                                            const c10::optional<Tensor>& excluded,
                                                            const c10::optional<Tensor>& negative_mask,
                                                            const c10::optional<Tensor>& labels,
                                                            const c10::optional<Tensor>& negative_labels) {
  return info_nce_fwd_impl(anchors, positives, negatives, indices, scale, normalize, include_positive,
                           save_anchor_term, exclude_self, excluded, negative_mask, labels, negative_labels);
}

std::tuple<Tensor, Tensor, Tensor> info_nce_bwd_cuda(const Tensor& grad_loss, const Tensor& anchors,
                                                     const Tensor& positives, const Tensor& negatives,
                                                     const c10::optional<Tensor>& indices, const Tensor& lse,
                                                     const Tensor& anchor_term, double scale, bool normalize,
                                                     bool include_positive, std::array<bool, 3> output_mask,
                                                     bool exclude_self, bool check_indices,
                                                     const c10::optional<Tensor>& loss,
                                                     const c10::optional<Tensor>& excluded,
                                                     const c10::optional<Tensor>& negative_mask,
                                                     const c10::optional<Tensor>& labels,
                                                     const c10::optional<Tensor>& negative_labels) {
  return info_nce_bwd_impl(grad_loss, anchors, positives, negatives, indices, lse, anchor_term, scale, normalize,
                           include_positive, output_mask, exclude_self, check_indices, loss, excluded, negative_mask,
                           labels, negative_labels);
}

std::tuple<Tensor, Tensor, Tensor> info_nce_bwd_scaled_cuda(const Tensor& grad_loss, const Tensor& anchors,
                                                            const Tensor& positives, const Tensor& negatives,
                                                            const c10::optional<Tensor>& indices,
                                                            const Tensor& lse, const Tensor& anchor_term,
                                                            const Tensor& scale, bool normalize,
                                                            bool include_positive, std::array<bool, 3> output_mask,
                                                            bool exclude_self, bool check_indices,
                                                            const c10::optional<Tensor>& loss,
                                                            const c10::optional<Tensor>& excluded,
                                                            const c10::optional<Tensor>& negative_mask,
                                                            const c10::optional<Tensor>& labels,
                                                            const c10::optional<Tensor>& negative_labels) {
  return info_nce_bwd_impl(grad_loss, anchors, positives, negatives, indices, lse, anchor_term, scale, normalize,
                           include_positive, output_mask, exclude_self, check_indices, loss, excluded, negative_mask,
                           labels, negative_labels);
}

}  // namespace

TORCH_LIBRARY_IMPL(contrastbound, CUDA, m) {
  m.impl("info_nce_fwd", &info_nce_fwd_cuda);
  m.impl("info_nce_bwd", &info_nce_bwd_cuda);
  m.impl("info_nce_fwd_scaled", &info_nce_fwd_scaled_cuda);
  m.impl("info_nce_bwd_scaled", &info_nce_bwd_scaled_cuda);
}

}  // namespace cuda
}  // namespace contrastbound
