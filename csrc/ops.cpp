// Schemas of the contrastbound:: ops and the Python module entry point. The implementations are registered
// per backend (csrc/cpu/*.cpp; csrc/cuda/*_glue.cpp in CUDA builds); fake kernels and autograd are registered
// from Python (contrastbound/_ops.py).
#include <torch/library.h>

#ifndef CONTRASTBOUND_NO_PYTHON  // the C++ tests link the ops without Python
#include <Python.h>

// An empty module: importing contrastbound._C loads the library, which registers the ops.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "contrastbound compiled ops (see torch.ops.contrastbound)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
#endif

TORCH_LIBRARY(contrastbound, m) {
  // Per-anchor loss (float32, float64 for float64 inputs), per-anchor log-sum-exp (CPU: float64 for every dtype,
  // so that backward's weights e^{l - lse} carry no float32 rounding of lse; CUDA: as the loss) and, when
  // save_anchor_term, V = sum_k softmax_k n_hat_k (B, d), else an empty tensor. exclude_self (shared bank
  // only) leaves bank row i out of anchor i's sum: SimCLR's NT-Xent, where the anchors are the bank.
  // excluded (shared bank only, int64 (B,)): bank row excluded[i] is left out of anchor i's sum (an entry outside
  // [0, K) leaves none out; never used as an index): bank_cross_entropy, whose target row is the positive.
  // negative_mask (shared bank only, bool (B, K)): bank row k is in anchor i's sum only where negative_mask[i, k]
  // (with exclude_self / excluded: and not left out by them). labels / negative_labels (shared bank only, int64 (B,)
  // and (K,), both or neither): bank row k is also left out of anchor i's sum where negative_labels[k] == labels[i]
  // (the anchor's own class: O(B + K) where the equivalent mask is B K bytes). In the indexed mode an index of -1 is
  // padding.
  // Under autograd only the loss is differentiable: lse and V are marked non-differentiable (constants: a sum
  // such as loss + lse differentiates the loss alone; contrastbound.info_nce_lse attaches lse's gradient).
  m.def(
      "info_nce_fwd(Tensor anchors, Tensor positives, Tensor negatives, Tensor? negative_indices, float scale, "
      "bool normalize, bool include_positive, bool save_anchor_term, bool exclude_self=False, Tensor? excluded=None, "
      "Tensor? negative_mask=None, Tensor? labels=None, Tensor? negative_labels=None) -> (Tensor, Tensor, Tensor)");
  // Gradients for anchors, positives and negatives, each an empty tensor where output_mask is false.
  // check_indices=False skips the range check of negative_indices (a device read-back): for the autograd
  // backward, whose forward checked the same saved tensor. Out-of-range rows are then left out of the bank's
  // gradient; the check runs anyway where V must be recomputed (an empty anchor_term with anchors' gradient).
  // loss, forward's per-anchor loss (optional): the positive's softmax weight less one is then expm1(-loss), exact
  // to the loss's rounding where the positive dominates; exp(l_0 - lse) - 1 would carry lse's (eps |lse|).
  m.def(
      "info_nce_bwd(Tensor grad_loss, Tensor anchors, Tensor positives, Tensor negatives, Tensor? negative_indices, "
      "Tensor lse, Tensor anchor_term, float scale, bool normalize, bool include_positive, bool[3] output_mask, "
      "bool exclude_self=False, bool check_indices=True, Tensor? loss=None, Tensor? excluded=None, "
      "Tensor? negative_mask=None, Tensor? labels=None, Tensor? negative_labels=None) -> (Tensor, Tensor, Tensor)");
  // The same with the scale as a tensor with one element (a learnable temperature): its value is read at run
  // time, by the kernels themselves for a CUDA tensor (no host read-back; a value that is not positive and
  // finite gives NaN there), on the host otherwise (checked: an error names it).
  m.def(
      "info_nce_fwd_scaled(Tensor anchors, Tensor positives, Tensor negatives, Tensor? negative_indices, "
      "Tensor scale, bool normalize, bool include_positive, bool save_anchor_term, bool exclude_self=False, "
      "Tensor? excluded=None, Tensor? negative_mask=None, Tensor? labels=None, Tensor? negative_labels=None) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "info_nce_bwd_scaled(Tensor grad_loss, Tensor anchors, Tensor positives, Tensor negatives, "
      "Tensor? negative_indices, Tensor lse, Tensor anchor_term, Tensor scale, bool normalize, "
      "bool include_positive, bool[3] output_mask, bool exclude_self=False, bool check_indices=True, "
      "Tensor? loss=None, Tensor? excluded=None, Tensor? negative_mask=None, Tensor? labels=None, "
      "Tensor? negative_labels=None) -> (Tensor, Tensor, Tensor)");
  // CLIP's symmetric loss over in-batch pairs (image i, text i), both directions from one pass over the N x N
  // logits s image_hat_i . text_hat_j. loss (2, N) (float32, float64 for float64 inputs) and lse (2, N) in float64
  // for every dtype (backward's weights e^{l - lse} would carry a float32 lse's rounding, eps |lse|): row 0 image ->
  // text (row i of the logits), row 1 text -> image (column i); the positive is kept apart from the sums as in
  // info_nce_fwd with exclude_self. With save_scale_grad, d loss / d scale (2, N), else an empty tensor. scale is
  // a tensor with one element, read on the host (CPU kernel only: CUDA inputs take two info_nce calls). Under
  // autograd only the loss is differentiable, and scale is not (contrastbound.clip_loss attaches its gradient).
  m.def("clip_fwd(Tensor image, Tensor text, Tensor scale, bool normalize, bool save_scale_grad) "
        "-> (Tensor, Tensor, Tensor)");
  // Gradients for image and text (each empty where output_mask is false), from forward's loss and lse.
  m.def("clip_bwd(Tensor grad_loss, Tensor image, Tensor text, Tensor loss, Tensor lse, Tensor scale, "
        "bool normalize, bool[2] output_mask) -> (Tensor, Tensor)");
  // SigLIP's negative pairs (csrc/cpu/siglip.cpp, one ATen-tile core for every device): image (B, d), text (M, d)
  // with M >= B, already normalised where the loss normalises; loss (B,) (float32, float64 for float64 inputs) is
  // sum_{j != i} softplus(scale image_i . text_j + bias), the pairs (i, i) being the positives that
  // contrastbound.siglip_loss adds. scale and bias are tensors with one element (on the inputs' device or the
  // CPU); under autograd all four inputs are differentiable.
  m.def("siglip_fwd(Tensor image, Tensor text, Tensor scale, Tensor bias) -> Tensor");
  // Gradients for image, text, scale and bias (each an empty tensor where output_mask is false).
  m.def("siglip_bwd(Tensor grad_loss, Tensor image, Tensor text, Tensor scale, Tensor bias, bool[4] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}
