"""Alignment and uniformity on the hypersphere (Wang & Isola, "Understanding Contrastive Representation Learning
through Alignment and Uniformity on the Hypersphere", ICML 2020): the two properties contrastive losses optimise,
as diagnostics and as a training loss.

Uniformity is a log-mean-exp over all N (N - 1) ordered pairs of rows. For unit rows ``||x_i - x_j||^2 = 2 - 2 s_ij``
with ``s_ij = x_i . x_j``, so

    log mean_{i != j} exp(-t ||x_i - x_j||^2) = -2 t + log sum_i exp(lse_i) - log(N (N - 1)),
    lse_i = log sum_{j != i} exp(2 t s_ij),

and lse_i is the in-batch log-sum-exp of :func:`contrastbound.info_nce_lse` at temperature 1 / (2 t) with the
positive (the row itself) left out: the fused kernels, O(N) memory forward and backward, where ``torch.pdist``
forms the N (N - 1) / 2 distances (and autograd keeps them and their exponentials). Alignment is a row-wise mean.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from .functional import (
    _MIN_TEMPERATURE,
    _check_bool,
    _check_features,
    _check_reduction,
    _check_tensor,
    _reduce,
    info_nce_lse,
)

__all__ = ["alignment", "uniformity"]


def _check_positive(name: str, value: object, largest: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a positive finite number, got {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a positive finite number, got a value beyond float64's range") from None
    if not (0.0 < v < math.inf):
        raise ValueError(f"{name} must be a positive finite number, got {v}")
    if v > largest:
        raise ValueError(f"{name} must be at most {largest:.4g}, got {v}")
    return v


def uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    r"""Uniformity of the rows of x on the hypersphere: ``log mean_{i != j} exp(-t ||x_i - x_j||^2)`` over the rows
    L2-normalised (Wang & Isola's ``torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()`` for
    ``x = F.normalize(x)``). Lower is more uniform: -4 (at t = 2) for rows that spread evenly over a sphere of many
    dimensions, 0 for a collapse to one point. Differentiable: as a loss, ``(uniformity(z1) + uniformity(z2)) / 2``
    beside :func:`alignment`.

    ``x`` (N, d) floating, N >= 2; ``t`` > 0 (the paper's default 2). Computed through :func:`info_nce_lse`'s fused
    kernels (no N x N matrix, forward or backward; on a GPU the CUDA kernels; first-order gradients: double backward
    raises, as the losses'). A scalar in x's dtype (float32 for half x under autocast, as the losses). Every nonzero
    finite row is normalised exactly, whatever its scale (rows are scaled by a power of two first); a zero
    row stays 0, as in ``F.normalize``, where the formula above takes it as a unit row orthogonal to all others (the
    two differ for it). Precision: the exponents 2 t (s_ij - 1) carry the dot products' rounding times 2 t, an
    absolute error of ~2 t d eps of the compute dtype (float32 for half inputs): a collapse gives 0 to ~1e-6 at t = 2
    in float32 but ~0.25 at t = 1e6; pass float64 rows for large t. Over the rows given only: under data parallelism
    gather the features first (:func:`contrastbound.distributed.all_gather_with_grad`).
    """
    x = _check_tensor("x", x, 2, "(N, d)")
    t = _check_positive("t", t, 0.5 / _MIN_TEMPERATURE)
    N, d = x.shape
    if N < 2 or d < 1:
        raise ValueError(f"uniformity needs at least 2 rows of x (pairs of distinct rows) and d >= 1, got shape "
                         f"{tuple(x.shape)}")
    x = _rescaled(x)
    _, lse = info_nce_lse(x, x, None, temperature=0.5 / t, include_positive=False)
    value = torch.logsumexp(lse, 0) - (math.log(N) + math.log(N - 1)) - 2.0 * t
    return _reduce(value, "none", x.dtype)  # (x's dtype; float32 for half x under autocast, as the losses)


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0, *, normalize: bool = True,
              reduction: str = "mean") -> torch.Tensor:
    r"""Alignment of positive pairs: ``||x_i - y_i||^alpha`` (Wang & Isola's ``(x - y).norm(dim=1).pow(alpha)``), of
    the rows L2-normalised with ``normalize`` (the paper's features are), averaged (``reduction="mean"``, default),
    summed, or per pair (``"none"``, (N,)). Lower is better aligned: 0 for identical views, 4 (alpha = 2) for
    opposite ones. Differentiable; ``x``, ``y`` (N, d) floating on one device; ``alpha`` > 0 (the paper's default
    2). Half rows are compared in float32; the result has the promoted dtype of x and y (float32 for half inputs
    under autocast, as the losses); rows are normalised as in :func:`uniformity` (any nonzero scale exactly). For
    alpha < 1 the gradient at a pair of equal rows is NaN (the power's derivative is infinite at 0), as in the
    paper's code.
    """
    x, y = _check_features(x, y, ("x", "y"))
    alpha = _check_positive("alpha", alpha)
    reduction = _check_reduction(reduction)
    dtype = torch.promote_types(x.dtype, y.dtype)
    wide = torch.promote_types(dtype, torch.float32)  # (half rows in float32: their squares, norms and differences)
    x, y = x.to(wide), y.to(wide)
    if _check_bool("normalize", normalize):
        x = torch.nn.functional.normalize(_rescaled(x), dim=1, eps=1e-12)
        y = torch.nn.functional.normalize(_rescaled(y), dim=1, eps=1e-12)
    return _reduce((x - y).norm(dim=1).pow(alpha), reduction, dtype)


def _rescaled(x: torch.Tensor) -> torch.Tensor:
    """x with each row multiplied by 2^-e, e the binary exponent of its largest |entry|, so that the largest entry
    lies in [0.5, 1): exact (a power of two), so the rows' directions are unchanged and so are the scale-invariant
    results, but normalising them then neither overflows (float32 squares past norms of ~1.8e19) nor loses them to
    F.normalize's eps (norms under 1e-12) nor to underflow. 2^-e is applied as two factors, each a normal number:
    a float64 row of subnormals needs up to 2^1075, past the largest (2^1023 alone left rows under ~1e-320 short of
    unit length). The factors are constants to autograd; zero rows stay 0. Half rows are scaled in float32 and
    rounded back (exact but for entries 2^-24 below the row's largest, which float16 cannot hold beside it)."""
    wide = torch.promote_types(x.dtype, torch.float32)
    bias, mantissa = (1023, 52) if wide == torch.float64 else (127, 23)
    with torch.no_grad():
        _, e = torch.frexp(x.detach().abs().amax(dim=1, keepdim=True).to(wide))
        # (the factors' bits: a biased exponent in an integer of the float's width; shift is 0 for zero rows, and
        # frexp's exponent of inf and NaN, unspecified, is clamped)
        shift = -e.to(torch.int64 if wide == torch.float64 else torch.int32)
        first = torch.div(shift, 2, rounding_mode="floor")
        factors = [((part + bias).clamp(1, 2 * bias) << mantissa).view(wide) for part in (first, shift - first)]
    return (x.to(wide) * factors[0] * factors[1]).to(x.dtype)
