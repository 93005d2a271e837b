"""The registered ops' argument checks as the fake (meta) kernels run them: shapes, dtypes and flags, the part of
csrc/info_nce_checks.h (and siglip.cpp's check_inputs) that needs no values.

Under FakeTensorMode (torch.compile's tracing, memory estimators) and on meta tensors only the fake kernels run: a
call that the compiled kernels refuse by name got plausible output shapes there, and a compiled graph reported it
only when it ran. Each function here mirrors the C++ check of the same name, with the same exception type
(TORCH_CHECK_VALUE: ValueError, TORCH_CHECK_TYPE: TypeError) and the words of its message up to the value given
(C++ prints values its own way: Int for torch.int32, 6 significant digits of a float);
tests/test_ops.py::test_fake_kernels_refuse_what_the_kernels_refuse holds the two to each other, call by call.
Devices and value checks (index ranges, finite scales held in tensors) stay where they were: _ops' _same_device
and the kernels.
"""

from __future__ import annotations

import math

import torch

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _floating(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # (C++ kernel_dtype)


def _given(t) -> bool:
    return isinstance(t, torch.Tensor)


def _shape(t: torch.Tensor) -> list:
    """Its sizes as the C++ messages print them, [B, d]."""
    return list(t.shape)


def check_info_nce_inputs(anchors, positives, negatives, indices, exclude_self) -> None:
    if anchors.dim() != 2:
        raise ValueError(f"anchors must have shape (B, d), got {_shape(anchors)}")
    if anchors.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"anchors must be a floating tensor (float16, bfloat16, float32 or float64), got "
                        f"{anchors.dtype}")
    if _shape(positives) != _shape(anchors):
        raise ValueError(f"positives must have the shape of anchors {_shape(anchors)}, got {_shape(positives)}")
    if positives.dtype != anchors.dtype or negatives.dtype != anchors.dtype:
        raise TypeError(f"anchors, positives and negatives must share a dtype, got {anchors.dtype}, "
                        f"{positives.dtype}, {negatives.dtype}")
    B, d = anchors.shape
    indexed = _given(indices)
    if indexed:
        if negatives.dim() != 2 or negatives.shape[1] != d:
            raise ValueError(f"negatives must have shape (M, d) with d = {d} when negative_indices is given, got "
                             f"{_shape(negatives)}")
        if indices.dtype != torch.int64:
            raise TypeError(f"negative_indices must be int64, got {indices.dtype}")
        if indices.dim() != 2 or indices.shape[0] != B:
            raise ValueError(f"negative_indices must have shape (B, K) with B = {B}, got {_shape(indices)}")
    elif negatives.dim() == 3:
        if negatives.shape[0] != B or negatives.shape[2] != d:
            raise ValueError(f"negatives must have shape (B, K, d) = ({B}, K, {d}), got {_shape(negatives)}")
    elif negatives.dim() != 2 or negatives.shape[1] != d:
        raise ValueError(f"negatives must have shape (K, d) with d = {d}, got {_shape(negatives)}")
    if exclude_self and (indexed or negatives.dim() != 2):
        raise ValueError("exclude_self needs a shared bank (K, d) whose row i is anchor i")
    if exclude_self and negatives.shape[0] < B:
        raise ValueError(f"exclude_self needs a shared bank (K, d) with K >= B = {B} (row i is anchor i), got "
                         f"{_shape(negatives)}")


def _shared_bank(negatives, indices) -> bool:
    return not _given(indices) and negatives.dim() == 2


def check_left_out(excluded, negative_mask, labels, negative_labels, anchors, negatives, indices,
                   exclude_self) -> None:
    B = anchors.shape[0]
    if _given(excluded):
        if excluded.dtype != torch.int64:
            raise TypeError(f"excluded must be int64, got {excluded.dtype}")
        if excluded.dim() != 1 or excluded.shape[0] != B:
            raise ValueError(f"excluded must have shape (B,) = ({B},), got {_shape(excluded)}")
        if not _shared_bank(negatives, indices):
            raise ValueError("excluded needs a shared bank (K, d)")
        if exclude_self:
            raise ValueError("excluded and exclude_self cannot both be given")
    if _given(negative_mask):
        if not _shared_bank(negatives, indices):
            raise ValueError("negative_mask needs a shared bank (K, d) (indexed negatives take -1 as padding instead)")
        if negative_mask.dtype != torch.bool:
            raise TypeError(f"negative_mask must be bool, got {negative_mask.dtype}")
        if _shape(negative_mask) != [B, negatives.shape[0]]:
            raise ValueError(f"negative_mask must have shape (B, K) = ({B}, {negatives.shape[0]}), got "
                             f"{_shape(negative_mask)}")
    if _given(labels) or _given(negative_labels):
        if not (_given(labels) and _given(negative_labels)):
            raise ValueError("labels and negative_labels must be given together")
        if not _shared_bank(negatives, indices):
            raise ValueError("labels need a shared bank (K, d) (indexed negatives take -1 as padding instead)")
        for name, t, n, doc in (("labels", labels, B, "(B,)"), ("negative_labels", negative_labels,
                                                                negatives.shape[0], "(K,)")):
            if t.dtype != torch.int64:
                raise TypeError(f"{name} must be int64, got {t.dtype}")
            if t.dim() != 1 or t.shape[0] != n:
                raise ValueError(f"{name} must have shape {doc} = ({n},), got {_shape(t)}")


def check_scale(scale, dtype: torch.dtype) -> None:
    """A float scale (info_nce_fwd / _bwd) is a constant of the call, checked here as the kernels check it; a tensor
    one (the *_scaled ops, clip, siglip) by its shape and dtype."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or not _floating(scale):
            raise ValueError(f"scale (1 / temperature) must be a floating tensor with one element, got a "
                             f"{scale.dtype} tensor of shape {_shape(scale)}")
        return
    if not isinstance(scale, (float, int)):  # a symbol (torch.SymFloat under dynamic shapes): the kernels check it
        return
    s = float(scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"scale (1 / temperature) must be positive and finite, got {s}")
    if dtype != torch.float64 and s > _FLOAT32_MAX:
        raise ValueError(f"scale (1 / temperature) must be at most {_FLOAT32_MAX:g} for {dtype} inputs (accumulated "
                         f"in float32), got {s}")


def check_backward_inputs(grad_loss, lse, anchor_term, anchors, loss) -> None:
    B, d = anchors.shape
    if grad_loss.dim() != 1 or grad_loss.shape[0] != B:
        raise ValueError(f"info_nce_bwd: grad_loss must have shape (B,) = ({B},), got {_shape(grad_loss)}")
    if lse.dim() != 1 or lse.shape[0] != B:
        raise ValueError(f"info_nce_bwd: lse must have shape (B,) = ({B},), got {_shape(lse)}")
    term_empty = anchor_term.numel() == 0
    if not term_empty and _shape(anchor_term) != [B, d]:
        raise ValueError(f"info_nce_bwd: anchor_term must be empty or have shape (B, d) = ({B}, {d}), got "
                         f"{_shape(anchor_term)}")
    if not (_floating(grad_loss) and _floating(lse) and (term_empty or _floating(anchor_term))):
        raise ValueError(f"info_nce_bwd: grad_loss, lse and anchor_term must be floating tensors, got "
                         f"{grad_loss.dtype}, {lse.dtype} and {anchor_term.dtype}")
    if _given(loss):
        if loss.dim() != 1 or loss.shape[0] != B:
            raise ValueError(f"info_nce_bwd: loss must have shape (B,) = ({B},), got {_shape(loss)}")
        if not _floating(loss):
            raise ValueError(f"info_nce_bwd: loss must be a floating tensor, got {loss.dtype}")


def check_clip_inputs(image, text) -> None:
    if image.dim() != 2:
        raise ValueError(f"image must have shape (N, d), got {_shape(image)}")
    if image.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"image must be a floating tensor (float16, bfloat16, float32 or float64), got {image.dtype}")
    if _shape(text) != _shape(image):
        raise ValueError(f"text must have the shape of image {_shape(image)}, got {_shape(text)}")
    if text.dtype != image.dtype:
        raise TypeError(f"image and text must share a dtype, got {image.dtype} and {text.dtype}")


def check_clip_backward_inputs(grad_loss, loss, lse, image) -> None:
    N = image.shape[0]
    for name, x in (("grad_loss", grad_loss), ("loss", loss), ("lse", lse)):
        if _shape(x) != [2, N]:
            raise ValueError(f"clip_bwd: {name} must have shape (2, N) = (2, {N}), got {_shape(x)}")
        if not _floating(x):
            raise TypeError(f"clip_bwd: {name} must be a floating tensor, got {x.dtype}")


def check_siglip_inputs(image, text, scale, bias) -> None:
    if image.dim() != 2:
        raise ValueError(f"siglip: image must be (B, d), got {_shape(image)}")
    B, d = image.shape
    if text.dim() != 2 or text.shape[1] != d or text.shape[0] < B:
        raise ValueError(f"siglip: text must be (M, d) with M >= B = {B} and d = {d}, got {_shape(text)}")
    if image.dtype not in _KERNEL_DTYPES or text.dtype != image.dtype:
        raise TypeError(f"siglip: image and text must share a floating dtype (float16, bfloat16, float32 or float64), "
                        f"got {image.dtype} and {text.dtype}")
    for t in (scale, bias):
        if t.numel() != 1 or not _floating(t):
            raise ValueError(f"siglip: scale and bias must be floating tensors with one element, got {_shape(t)} "
                             f"{t.dtype}")


def check_siglip_grad_loss(grad_loss, image) -> None:
    B = image.shape[0]
    if grad_loss.dim() != 1 or grad_loss.shape[0] != B:
        raise ValueError(f"siglip: grad_loss must be (B,) = ({B},), got {_shape(grad_loss)}")
    if not _floating(grad_loss):
        raise TypeError(f"siglip: grad_loss must be a floating tensor, got {grad_loss.dtype}")
