"""contrastbound: fused InfoNCE at very large negative counts, and the surrogate-gap bounds of
Bao, Nagano & Nozawa (ICML 2022)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if torch.distributed.is_available():
    # torch.distributed.nn.functional binds group.WORLD into ten functions' defaults when it is first imported. First
    # imported while a process group exists (torch._dynamo imports it, and this package imports torch._dynamo on
    # first use of a learnable temperature or of NegativeQueue), it keeps that group alive past
    # destroy_process_group, and a gloo group alive at exit can abort the process (README, Distributed). Imported
    # here (~4 ms), usually before init_process_group, it binds None.
    import torch.distributed.nn.functional  # noqa: F401

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
from . import bounds
from .gradcache import grad_cache
from .metrics import contrastive_accuracy, positive_rank
from .mining import MinedNegatives, mine_hard_negatives
from .geometry import alignment, uniformity
from .empirical import (
    class_means,
    contrastive_loss_curve,
    contrastive_loss_estimate,
    format_gap_report,
    gap_report,
    mean_classifier_loss,
)

if TYPE_CHECKING:
    from .queue import NegativeQueue

__version__ = "0.1.0"


def __getattr__(name: str):
    # NegativeQueue on first use: its torch.compiler.disable decorators import torch._dynamo, ~1.2 s on top of
    # torch's own ~1.5 s at every import of the package (the CLI, each worker process), whether or not a queue is used
    if name == "NegativeQueue":
        from .queue import NegativeQueue

        globals()["NegativeQueue"] = NegativeQueue  # (later lookups find it without this function)
        return NegativeQueue
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"NegativeQueue"})


__all__ = [
    "alignment",
    "bounds",
    "class_means",
    "contrastive_accuracy",
    "contrastive_loss_curve",
    "contrastive_loss_estimate",
    "format_gap_report",
    "gap_report",
    "mean_classifier_loss",
    "MinedNegatives",
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
    "grad_cache",
    "info_nce",
    "info_nce_lse",
    "mine_hard_negatives",
    "nt_xent",
    "positive_rank",
    "siglip_loss",
    "supcon_loss",
    "uniformity",
]
