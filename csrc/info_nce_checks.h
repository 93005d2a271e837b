// Argument checks shared by the CPU and CUDA implementations of the registered ops. The Python API checks
// the same things first with friendlier messages; these guard direct calls of torch.ops.contrastbound.*.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <utility>

namespace contrastbound {

// The feature dtypes the kernels take (float8 types are floating too, and were refused only by the dtype dispatch,
// NotImplementedError, after every check had passed).
inline bool kernel_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

inline void check_info_nce_inputs(const at::Tensor& anchors, const at::Tensor& positives, const at::Tensor& negatives,
                                  const c10::optional<at::Tensor>& indices, bool exclude_self,
                                  bool check_index_range = true, bool range_in_stream = false) {
  TORCH_CHECK_VALUE(anchors.dim() == 2, "anchors must have shape (B, d), got ", anchors.sizes());
  TORCH_CHECK_TYPE(kernel_dtype(anchors.scalar_type()),
                   "anchors must be a floating tensor (float16, bfloat16, float32 or float64), got ",
                   anchors.scalar_type());
  TORCH_CHECK_VALUE(positives.sizes() == anchors.sizes(), "positives must have the shape of anchors ",
                    anchors.sizes(), ", got ", positives.sizes());
  TORCH_CHECK_TYPE(positives.scalar_type() == anchors.scalar_type() &&
                       negatives.scalar_type() == anchors.scalar_type(),
                   "anchors, positives and negatives must share a dtype, got ", anchors.scalar_type(), ", ",
                   positives.scalar_type(), ", ", negatives.scalar_type());
  TORCH_CHECK_VALUE(positives.device() == anchors.device() && negatives.device() == anchors.device(),
                    "anchors, positives and negatives must be on one device");
  const int64_t B = anchors.size(0), d = anchors.size(1);
  const bool indexed = indices.has_value() && indices->defined();
  if (indexed) {
    const auto& idx = *indices;
    TORCH_CHECK_VALUE(negatives.dim() == 2 && negatives.size(1) == d,
                      "negatives must have shape (M, d) with d = ", d, " when negative_indices is given, got ",
                      negatives.sizes());
    TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, "negative_indices must be int64, got ", idx.scalar_type());
    TORCH_CHECK_VALUE(idx.dim() == 2 && idx.size(0) == B, "negative_indices must have shape (B, K) with B = ", B,
                      ", got ", idx.sizes());
    TORCH_CHECK_VALUE(idx.device() == anchors.device(), "negative_indices must be on the device of anchors");
    if (check_index_range && idx.numel() > 0) {
      // Over the distinct elements only: an expanded dimension (stride 0) is narrowed to one entry, since aminmax
      // would first copy an expanded (B, K) tensor to B x K.
      at::Tensor distinct = idx;
      for (int64_t dim = 0; dim < distinct.dim(); ++dim)
        if (distinct.stride(dim) == 0 && distinct.size(dim) > 1) distinct = distinct.narrow(dim, 0, 1);
      const auto range = at::aminmax(distinct);
      if (range_in_stream) {
        // No read-back (a CUDA stream being captured into a graph may not synchronise): the check runs in the
        // stream, a device assert where an index is out of range, as torch's own indexing does on CUDA.
        at::_assert_async((std::get<0>(range) >= -1).logical_and_(std::get<1>(range) < negatives.size(0)),
                          "negative_indices must lie in [0, M) or be -1 (padding)");
      } else {
        // one read-back of both ends (a device synchronisation on CUDA)
        const at::Tensor ends = at::stack({std::get<0>(range), std::get<1>(range)}).cpu();
        const int64_t lo = ends[0].item<int64_t>(), hi = ends[1].item<int64_t>();
        // -1 marks padding (no negative there: a variable number of negatives per anchor, faiss's missing
        // neighbours); any other negative value is an error.
        TORCH_CHECK_INDEX(lo >= -1 && hi < negatives.size(0), "negative_indices must lie in [0, M) = [0, ",
                          negatives.size(0), ") or be -1 (padding), got values in [", lo, ", ", hi, "]");
      }
    }
  } else if (negatives.dim() == 3) {
    TORCH_CHECK_VALUE(negatives.size(0) == B && negatives.size(2) == d, "negatives must have shape (B, K, d) = (",
                      B, ", K, ", d, "), got ", negatives.sizes());
  } else {
    TORCH_CHECK_VALUE(negatives.dim() == 2 && negatives.size(1) == d, "negatives must have shape (K, d) with d = ",
                      d, ", got ", negatives.sizes());
  }
  TORCH_CHECK_VALUE(!exclude_self || (!indexed && negatives.dim() == 2),
                    "exclude_self needs a shared bank (K, d) whose row i is anchor i");
  // (a bank of fewer rows than anchors leaves anchors B - K.. with no row of their own: nothing left out there)
  TORCH_CHECK_VALUE(!exclude_self || negatives.size(0) >= B,
                    "exclude_self needs a shared bank (K, d) with K >= B = ", B, " (row i is anchor i), got ",
                    negatives.sizes());
}

// excluded (optional, int64 (B,)): bank row excluded[i] is not a negative of anchor i (shared bank only).
inline void check_excluded(const c10::optional<at::Tensor>& excluded, const at::Tensor& anchors,
                           const at::Tensor& negatives, const c10::optional<at::Tensor>& indices, bool exclude_self) {
  if (!excluded.has_value() || !excluded->defined()) return;
  const auto& e = *excluded;
  TORCH_CHECK_TYPE(e.scalar_type() == at::kLong, "excluded must be int64, got ", e.scalar_type());
  TORCH_CHECK_VALUE(e.dim() == 1 && e.size(0) == anchors.size(0), "excluded must have shape (B,) = (",
                    anchors.size(0), ",), got ", e.sizes());
  TORCH_CHECK_VALUE(e.device() == anchors.device(), "excluded must be on the device of anchors (", anchors.device(),
                    "), got ", e.device());
  TORCH_CHECK_VALUE(!(indices.has_value() && indices->defined()) && negatives.dim() == 2,
                    "excluded needs a shared bank (K, d)");
  TORCH_CHECK_VALUE(!exclude_self, "excluded and exclude_self cannot both be given");
}

// negative_mask (optional, bool (B, K)): which bank rows are in each anchor's sum (shared bank only).
inline void check_negative_mask(const c10::optional<at::Tensor>& mask, const at::Tensor& anchors,
                                const at::Tensor& negatives, const c10::optional<at::Tensor>& indices) {
  if (!mask.has_value() || !mask->defined()) return;
  const auto& m = *mask;
  TORCH_CHECK_VALUE(!(indices.has_value() && indices->defined()) && negatives.dim() == 2,
                    "negative_mask needs a shared bank (K, d) (indexed negatives take -1 as padding instead)");
  TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "negative_mask must be bool, got ", m.scalar_type());
  TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == anchors.size(0) && m.size(1) == negatives.size(0),
                    "negative_mask must have shape (B, K) = (", anchors.size(0), ", ", negatives.size(0), "), got ",
                    m.sizes());
  TORCH_CHECK_VALUE(m.device() == anchors.device(), "negative_mask must be on the device of anchors (",
                    anchors.device(), "), got ", m.device());
}

// labels / negative_labels (optional, int64 (B,) and (K,), both or neither): bank row k is left out of anchor i's
// sum where negative_labels[k] == labels[i] (shared bank only; the negatives of the anchor's own class).
inline void check_labels(const c10::optional<at::Tensor>& labels, const c10::optional<at::Tensor>& negative_labels,
                         const at::Tensor& anchors, const at::Tensor& negatives,
                         const c10::optional<at::Tensor>& indices) {
  const bool has_l = labels.has_value() && labels->defined();
  const bool has_n = negative_labels.has_value() && negative_labels->defined();
  if (!has_l && !has_n) return;
  TORCH_CHECK_VALUE(has_l && has_n, "labels and negative_labels must be given together");
  TORCH_CHECK_VALUE(!(indices.has_value() && indices->defined()) && negatives.dim() == 2,
                    "labels need a shared bank (K, d) (indexed negatives take -1 as padding instead)");
  const int64_t expect[2] = {anchors.size(0), negatives.size(0)};
  const char* names[2] = {"labels", "negative_labels"};
  const char* shapes[2] = {"(B,)", "(K,)"};
  const at::Tensor* ts[2] = {&*labels, &*negative_labels};
  for (int j = 0; j < 2; ++j) {
    const at::Tensor& t = *ts[j];
    TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, names[j], " must be int64, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == expect[j], names[j], " must have shape ", shapes[j], " = (",
                      expect[j], ",), got ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == anchors.device(), names[j], " must be on the device of anchors (",
                      anchors.device(), "), got ", t.device());
  }
}

// What leaves bank rows out of anchors' sums besides padding: excluded, negative_mask, labels / negative_labels
// (each optional; the forward and backward ops of both devices check the same).
inline void check_left_out(const c10::optional<at::Tensor>& excluded, const c10::optional<at::Tensor>& negative_mask,
                           const c10::optional<at::Tensor>& labels, const c10::optional<at::Tensor>& negative_labels,
                           const at::Tensor& anchors, const at::Tensor& negatives,
                           const c10::optional<at::Tensor>& indices, bool exclude_self) {
  check_excluded(excluded, anchors, negatives, indices, exclude_self);
  check_negative_mask(negative_mask, anchors, negatives, indices);
  check_labels(labels, negative_labels, anchors, negatives, indices);
}

// labels / negative_labels (checked) as contiguous tensors, undefined if not given: the caller holds them while the
// kernels read them.
inline std::pair<at::Tensor, at::Tensor> label_rows(const c10::optional<at::Tensor>& labels,
                                                    const c10::optional<at::Tensor>& negative_labels) {
  if (!labels.has_value() || !labels->defined()) return {at::Tensor(), at::Tensor()};
  return {labels->contiguous(), negative_labels->contiguous()};
}

inline void check_scale(double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "scale (1 / temperature) must be positive and finite, got ",
                    scale);
}

// ... and finite in the kernels' accumulation type: float32 for float32 / float16 / bfloat16 inputs (a larger scale
// became inf there, and every loss NaN).
inline void check_scale(double scale, at::ScalarType dtype) {
  check_scale(scale);
  TORCH_CHECK_VALUE(dtype == at::kDouble || scale <= static_cast<double>(std::numeric_limits<float>::max()),
                    "scale (1 / temperature) must be at most ", std::numeric_limits<float>::max(), " for ", dtype,
                    " inputs (accumulated in float32), got ", scale);
}

// The backward op's own inputs: grad_loss and lse (B,), anchor_term empty (forward did not save V) or (B, d),
// all on the device of anchors. A V of another shape would be read as if it were (B, d).
inline void check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& lse, const at::Tensor& anchor_term,
                                  const at::Tensor& anchors, const c10::optional<at::Tensor>& loss = c10::nullopt) {
  const int64_t B = anchors.size(0), d = anchors.size(1);
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == B, "info_nce_bwd: grad_loss must have shape (B,) = (",
                    B, ",), got ", grad_loss.sizes());
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == B, "info_nce_bwd: lse must have shape (B,) = (", B, ",), got ",
                    lse.sizes());
  TORCH_CHECK_VALUE(anchor_term.numel() == 0 || (anchor_term.dim() == 2 && anchor_term.size(0) == B &&
                                                 anchor_term.size(1) == d),
                    "info_nce_bwd: anchor_term must be empty or have shape (B, d) = (", B, ", ", d, "), got ",
                    anchor_term.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(grad_loss.scalar_type()) && at::isFloatingType(lse.scalar_type()) &&
                        (anchor_term.numel() == 0 || at::isFloatingType(anchor_term.scalar_type())),
                    "info_nce_bwd: grad_loss, lse and anchor_term must be floating tensors, got ",
                    grad_loss.scalar_type(), ", ", lse.scalar_type(), " and ", anchor_term.scalar_type());
  TORCH_CHECK_VALUE(grad_loss.device() == anchors.device() && lse.device() == anchors.device() &&
                        anchor_term.device() == anchors.device(),
                    "info_nce_bwd: grad_loss, lse and anchor_term must be on the device of anchors (",
                    anchors.device(), ")");
  if (loss.has_value()) {
    TORCH_CHECK_VALUE(loss->dim() == 1 && loss->size(0) == B, "info_nce_bwd: loss must have shape (B,) = (", B,
                      ",), got ", loss->sizes());
    TORCH_CHECK_VALUE(loss->device() == anchors.device(), "info_nce_bwd: loss must be on the device of anchors (",
                      anchors.device(), "), got ", loss->device());
    TORCH_CHECK_VALUE(at::isFloatingType(loss->scalar_type()), "info_nce_bwd: loss must be a floating tensor, got ",
                      loss->scalar_type());
  }
}

// The scale of the *_scaled ops: a floating tensor with one element (any device).
inline void check_scale_tensor(const at::Tensor& scale) {
  TORCH_CHECK_VALUE(scale.numel() == 1 && at::isFloatingType(scale.scalar_type()),
                    "scale (1 / temperature) must be a floating tensor with one element, got a ", scale.scalar_type(),
                    " tensor of shape ", scale.sizes());
}

// Its value read on the host (CPU kernels; a device synchronisation if the tensor lives on a GPU) and checked.
inline double scale_value(const at::Tensor& scale) {
  check_scale_tensor(scale);
  const double s = scale.item<double>();
  check_scale(s);
  return s;
}

// clip_fwd / clip_bwd: image and text features (N, d), one floating dtype, one device.
inline void check_clip_inputs(const at::Tensor& image, const at::Tensor& text) {
  TORCH_CHECK_VALUE(image.dim() == 2, "image must have shape (N, d), got ", image.sizes());
  TORCH_CHECK_TYPE(kernel_dtype(image.scalar_type()),
                   "image must be a floating tensor (float16, bfloat16, float32 or float64), got ", image.scalar_type());
  TORCH_CHECK_VALUE(text.sizes() == image.sizes(), "text must have the shape of image ", image.sizes(), ", got ",
                    text.sizes());
  TORCH_CHECK_TYPE(text.scalar_type() == image.scalar_type(), "image and text must share a dtype, got ",
                   image.scalar_type(), " and ", text.scalar_type());
  TORCH_CHECK_VALUE(text.device() == image.device(), "image and text must be on one device, got ", image.device(),
                    " and ", text.device());
}

// clip_bwd's own inputs: grad_loss, loss and lse (2, N) floating tensors on the device of image.
inline void check_clip_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& loss, const at::Tensor& lse,
                                       const at::Tensor& image) {
  const int64_t N = image.size(0);
  for (const auto& named : {std::make_pair("grad_loss", &grad_loss), std::make_pair("loss", &loss),
                            std::make_pair("lse", &lse)}) {
    const at::Tensor& x = *named.second;
    TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == 2 && x.size(1) == N, "clip_bwd: ", named.first,
                      " must have shape (2, N) = (2, ", N, "), got ", x.sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "clip_bwd: ", named.first, " must be a floating tensor, got ",
                     x.scalar_type());
    TORCH_CHECK_VALUE(x.device() == image.device(), "clip_bwd: ", named.first, " must be on the device of image (",
                      image.device(), "), got ", x.device());
  }
}

}  // namespace contrastbound
