"""contrastbound: fused InfoNCE at very large negative counts, and the surrogate-gap bounds of
Bao, Nagano & Nozawa (ICML 2022)."""

from __future__ import annotations

from . import _backend
from ._backend import backend_info
from . import _ops  # noqa: F401  (fake kernels and autograd for the registered ops)
from .functional import (
    ClipLoss,
    InfoNCE,
    NTXent,
    SigLIP,
    SupCon,
    bank_cross_entropy,
    clip_loss,
    debiased_info_nce,
    info_nce,
    info_nce_lse,
    nt_xent,
    siglip_loss,
    supcon_loss,
)
from .queue import NegativeQueue
from . import bounds
from .empirical import (
    class_means,
    contrastive_loss_curve,
    contrastive_loss_estimate,
    format_gap_report,
    gap_report,
    mean_classifier_loss,
)

__version__ = "0.1.0"

__all__ = [
    "bounds",
    "class_means",
    "contrastive_loss_curve",
    "contrastive_loss_estimate",
    "format_gap_report",
    "gap_report",
    "mean_classifier_loss",
    "ClipLoss",
    "InfoNCE",
    "NTXent",
    "SigLIP",
    "SupCon",
    "NegativeQueue",
    "backend_info",
    "bank_cross_entropy",
    "clip_loss",
    "debiased_info_nce",
    "info_nce",
    "info_nce_lse",
    "nt_xent",
    "siglip_loss",
    "supcon_loss",
]
