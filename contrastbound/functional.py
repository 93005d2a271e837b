"""The public InfoNCE family: argument checks, then one call into the fused op (or its fallback)."""

from __future__ import annotations

import math
from numbers import Real

import torch

from . import _backend

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("none", "mean", "sum")


# ----------------------------------------------------------------------------------------------------------
# Validation: every message names the argument and what was expected.
# ----------------------------------------------------------------------------------------------------------


def _check_tensor(name: str, x: object, ndim: int | tuple[int, ...], shape_doc: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if x.dim() not in ndims:
        raise ValueError(f"{name} must have shape {shape_doc}, got a {x.dim()}-d tensor of shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got dtype {x.dtype}"
        )
    return x


def _check_same(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}: all inputs must share a device")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has dtype {ref.dtype}: dtypes must match")


def _check_temperature(temperature: object) -> float:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a positive finite scalar, got a tensor of shape {tuple(temperature.shape)}")
        if temperature.requires_grad:
            raise TypeError(
                "temperature must be a Python number or a tensor that does not require grad "
                "(a learnable temperature is not supported yet)"
            )
        temperature = float(temperature.item())
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a positive finite number, got {type(temperature).__name__}")
    t = float(temperature)
    if not math.isfinite(t) or t <= 0.0:
        raise ValueError(f"temperature must be a positive finite number, got {t}")
    return t


def _check_reduction(reduction: object) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def _check_indices(
    name: str, indices: object, shape: tuple[int, ...], shape_doc: str, bound: int, bound_doc: str, device: torch.device
) -> torch.Tensor:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be an int64 tensor of shape {shape_doc}, got {type(indices).__name__}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 tensor of shape {shape_doc}, got dtype {indices.dtype}")
    if indices.device != device:
        raise ValueError(f"{name} is on {indices.device} but the features are on {device}")
    if tuple(indices.shape) != shape:
        raise ValueError(f"{name} must have shape {shape_doc} = {shape}, got {tuple(indices.shape)}")
    if indices.numel() > 0:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= bound:
            raise IndexError(f"{name} must lie in [0, {bound_doc}) = [0, {bound}), got values in [{lo}, {hi}]")
    return indices.to(torch.int64)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _reduce(loss: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# The core call: per-anchor (loss, lse) in the accumulation dtype, differentiable in the features.
# ----------------------------------------------------------------------------------------------------------


def _fused(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    negative_indices: torch.Tensor | None,
    scale: float,
    normalize: bool,
    include_positive: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if _backend.kernel_serves(anchors.device):
        save_anchor_term = bool(torch.is_grad_enabled() and anchors.requires_grad)
        loss, lse, _ = torch.ops.contrastbound.info_nce_fwd(
            anchors, positives, negatives, negative_indices, scale, normalize, include_positive, save_anchor_term
        )
        return loss, lse
    from .reference import info_nce_core_reference

    return info_nce_core_reference(anchors, positives, negatives, negative_indices, scale, normalize, include_positive)


def _check_features(anchors: object, positives: object) -> tuple[torch.Tensor, torch.Tensor]:
    anchors = _check_tensor("anchors", anchors, 2, "(B, d)")
    positives = _check_tensor("positives", positives, 2, "(B, d)")
    _check_same("positives", positives, "anchors", anchors)
    if positives.shape != anchors.shape:
        raise ValueError(
            f"positives must have the shape of anchors (B, d) = {tuple(anchors.shape)}, got {tuple(positives.shape)}"
        )
    return anchors, positives


def _check_negatives(
    anchors: torch.Tensor, negatives: object, negative_indices: object
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    B, d = anchors.shape
    if negatives is None:
        if negative_indices is not None:
            raise ValueError("negative_indices was given without negatives: pass the bank (M, d) as negatives")
        return None, None
    if negative_indices is not None:
        negatives = _check_tensor("negatives", negatives, 2, "(M, d) when negative_indices is given")
    else:
        negatives = _check_tensor("negatives", negatives, (2, 3), "(K, d) or (B, K, d)")
    _check_same("negatives", negatives, "anchors", anchors)
    if negatives.shape[-1] != d:
        raise ValueError(f"negatives must have feature size d = {d} in its last dimension, got shape {tuple(negatives.shape)}")
    if negatives.dim() == 3 and negatives.shape[0] != B:
        raise ValueError(f"negatives of shape (B, K, d) must have B = {B} rows, got shape {tuple(negatives.shape)}")
    if negative_indices is not None:
        if not isinstance(negative_indices, torch.Tensor) or negative_indices.dim() != 2:
            shape = tuple(negative_indices.shape) if isinstance(negative_indices, torch.Tensor) else None
            if shape is None:
                raise TypeError(f"negative_indices must be an int64 tensor of shape (B, K), got {type(negative_indices).__name__}")
            raise ValueError(f"negative_indices must have shape (B, K) with B = {B}, got {shape}")
        K = negative_indices.shape[1]
        negative_indices = _check_indices(
            "negative_indices", negative_indices, (B, K), "(B, K)", negatives.shape[0], "M", anchors.device
        )
    return negatives, negative_indices


def info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    negative_indices: torch.Tensor | None = None,
    temperature: float = 0.1,
    normalize: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Fused InfoNCE loss that never materialises the (B, K) logits.

    ``loss_i = logsumexp(s a_i.p_i, s a_i.n_i1, ..., s a_i.n_iK) - s a_i.p_i`` with ``s = 1 / temperature``:
    the positive is in the denominator.

    Args:
        anchors: (B, d) anchor features.
        positives: (B, d) positive features, row i is anchor i's positive.
        negatives: the negatives, one of
            * (K, d): one bank shared by every anchor (a MoCo queue);
            * (B, K, d): anchor i's own K negatives;
            * (M, d) with ``negative_indices`` (B, K) int64: anchor i's negatives are the rows
              ``negatives[negative_indices[i]]`` (repeats count as repeated negatives; no (B, K, d) copy);
            * None: in-batch, anchor i's negatives are the other anchors' positives (logits s A P^T, target i).
        negative_indices: (B, K) int64 rows of ``negatives``, see above.
        temperature: positive finite number.
        normalize: L2-normalise anchors, positives and negatives first (gradients flow through it; fused,
            no normalised copy of the bank is made).
        reduction: "mean", "sum" or "none" (per-anchor losses, shape (B,)).

    Returns:
        The loss in the dtype of the inputs (float16/bfloat16 inputs are accumulated in float32).
        With K = 0 negatives the loss is 0.
    """
    anchors, positives = _check_features(anchors, positives)
    negatives, negative_indices = _check_negatives(anchors, negatives, negative_indices)
    t = _check_temperature(temperature)
    normalize = _check_bool("normalize", normalize)
    reduction = _check_reduction(reduction)
    if negatives is None:
        loss, _ = _fused(anchors, positives, positives, None, 1.0 / t, normalize, False)
    else:
        loss, _ = _fused(anchors, positives, negatives, negative_indices, 1.0 / t, normalize, True)
    return _reduce(loss, reduction, anchors.dtype)


def info_nce_lse(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    negative_indices: torch.Tensor | None = None,
    temperature: float = 0.1,
    normalize: bool = True,
    include_positive: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor (loss, log-sum-exp) of :func:`info_nce`, both (B,) in float32 (float64 for float64 inputs).

    ``lse_i = log([include_positive] e^{s a_i.p_i} + sum_k e^{s a_i.n_ik})`` and ``loss_i = lse_i - s a_i.p_i``.
    With ``include_positive=False`` the positive is left out of the sum, so log-sum-exps over disjoint sets of
    negatives can be combined with :func:`torch.logaddexp` (how :func:`contrastive_loss_curve` reads a whole
    curve over K from one pass). Differentiable like :func:`info_nce` through ``loss``; ``lse`` carries no
    gradient.
    """
    anchors, positives = _check_features(anchors, positives)
    negatives, negative_indices = _check_negatives(anchors, negatives, negative_indices)
    t = _check_temperature(temperature)
    normalize = _check_bool("normalize", normalize)
    include_positive = _check_bool("include_positive", include_positive)
    if negatives is None:
        negatives, include_positive = positives, False
    loss, lse = _fused(anchors, positives, negatives, negative_indices, 1.0 / t, normalize, include_positive)
    return loss, lse.detach()


def bank_cross_entropy(
    anchors: torch.Tensor,
    bank: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    normalize: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Softmax cross-entropy of ``s anchors @ bank.T`` against ``targets`` without the (B, C) logits.

    ``loss_i = logsumexp_c(s a_i.w_c) - s a_i.w_{t_i}``; the same fused kernel as :func:`info_nce`, with the
    target row taken from the bank. The mean-classifier loss is this with bank = class means.

    Args:
        anchors: (B, d) features.
        bank: (C, d) class weights (or any bank of rows).
        targets: (B,) int64 row of the bank that is anchor i's target.
        temperature, normalize, reduction: as in :func:`info_nce` (normalize defaults to False here).
    """
    anchors = _check_tensor("anchors", anchors, 2, "(B, d)")
    bank = _check_tensor("bank", bank, 2, "(C, d)")
    _check_same("bank", bank, "anchors", anchors)
    if bank.shape[1] != anchors.shape[1]:
        raise ValueError(f"bank must have feature size d = {anchors.shape[1]}, got shape {tuple(bank.shape)}")
    if bank.shape[0] == 0:
        raise ValueError("bank must have at least one row (C >= 1)")
    B = anchors.shape[0]
    targets = _check_indices("targets", targets, (B,), "(B,)", bank.shape[0], "C", anchors.device)
    t = _check_temperature(temperature)
    normalize = _check_bool("normalize", normalize)
    reduction = _check_reduction(reduction)
    loss, _ = _fused(anchors, bank[targets], bank, None, 1.0 / t, normalize, False)
    return _reduce(loss, reduction, anchors.dtype)


class InfoNCE(torch.nn.Module):
    """:func:`info_nce` as a module: ``InfoNCE(temperature, normalize, reduction)(anchors, positives, negatives)``."""

    def __init__(self, temperature: float = 0.1, normalize: bool = True, reduction: str = "mean") -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.normalize = _check_bool("normalize", normalize)
        self.reduction = _check_reduction(reduction)

    def forward(
        self,
        anchors: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor | None = None,
        negative_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return info_nce(
            anchors,
            positives,
            negatives,
            negative_indices=negative_indices,
            temperature=self.temperature,
            normalize=self.normalize,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}, reduction={self.reduction!r}"
