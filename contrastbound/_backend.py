"""Loads the compiled extension, or records why the pure-PyTorch fallback serves instead."""

from __future__ import annotations

import importlib.machinery
import os
import sys
import warnings

import torch

_load_error: str | None = None


def _user_stacklevel() -> int:
    """warnings.warn's stacklevel for the first frame outside this package: the user's import, not ours.

    (The import machinery's frames, which warnings skip when it counts, are skipped here too.)"""
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    level, frame = 1, sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not ("importlib" in name and "_bootstrap" in name):
            if not os.path.abspath(name).startswith(here):
                return level
            level += 1
        frame = frame.f_back
    return level


try:
    from . import _C  # noqa: F401  (registers the contrastbound:: ops)
except ImportError as exc:  # tests/test_packaging.py: a tree never built, a library that does not load
    _here = os.path.dirname(os.path.abspath(__file__))
    # Only a library this interpreter would load counts (one built for another Python is not "there").
    _built = sorted(f for f in os.listdir(_here) if f in {"_C" + x for x in importlib.machinery.EXTENSION_SUFFIXES})
    if not _built:
        # Python's own message ("cannot import name '_C' from partially initialized module ... circular import")
        # would point the wrong way.
        _load_error = f"the extension was never built: no compiled _C library in {_here}"
        _advice = ("Build it against the installed torch: `pip install --no-build-isolation -e .` in a source "
                   "checkout (or `bash scripts/setup.sh`).")
    else:
        _load_error = f"{type(exc).__name__}: {exc}"
        _advice = (f"{_built[0]} is there but does not load: most likely it was built against another torch than "
                   f"this one ({torch.__version__}), or the build is incomplete. Rebuild it against the installed "
                   "torch (`pip install --no-build-isolation -e .` in a source checkout, `pip install "
                   "--no-build-isolation .` for an install).")
    warnings.warn(
        f"contrastbound: the compiled extension contrastbound._C could not be loaded ({_load_error}); falling back "
        f"to the pure-PyTorch implementation, which materialises the logits. {_advice}",
        RuntimeWarning,
        stacklevel=_user_stacklevel(),
    )

EXTENSION_LOADED = _load_error is None


def _has_kernel(dispatch_key: str, op: str = "info_nce_fwd") -> bool:
    if not EXTENSION_LOADED:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"contrastbound::{op}", dispatch_key)
    except RuntimeError:  # an op this build does not define
        return False


HAS_CPU_KERNEL = _has_kernel("CPU")
HAS_CUDA_KERNEL = _has_kernel("CUDA")
# clip_loss's both-directions kernel (contrastbound::clip_fwd): CPU only so far; elsewhere two info_nce calls.
_HAS_CLIP_KERNEL = {"cpu": _has_kernel("CPU", "clip_fwd"), "cuda": _has_kernel("CUDA", "clip_fwd")}


# siglip_loss's op (contrastbound::siglip_fwd): one ATen-tile core registered for every device
# (CompositeExplicitAutograd), in every build of the extension.
HAS_SIGLIP_KERNEL = _has_kernel("CompositeExplicitAutograd", "siglip_fwd")


def siglip_kernel_serves() -> bool:
    """True where the compiled SigLIP op is there (tests set HAS_SIGLIP_KERNEL = False to take the fallback)."""
    return HAS_SIGLIP_KERNEL


def kernel_serves(device: torch.device) -> bool:
    """True where a compiled kernel serves tensors on ``device``; else the fallback does."""
    if device.type == "cpu":
        return HAS_CPU_KERNEL
    if device.type == "cuda":
        return HAS_CUDA_KERNEL
    return False


def clip_kernel_serves(device: torch.device) -> bool:
    """True where the compiled both-directions CLIP kernel serves tensors on ``device``."""
    return kernel_serves(device) and _HAS_CLIP_KERNEL.get(device.type, False)


def backend_info() -> dict[str, str]:
    """Which backend serves CPU and CUDA tensors, and why.

    Returns a dict with keys ``"cpu"`` and ``"cuda"`` (each ``"kernel"`` or ``"reference"``), ``"cpu_reason"``,
    ``"cuda_reason"``, ``"siglip"`` (``"kernel"``: siglip_loss's op, one ATen-tile core that serves CPU and CUDA
    tensors in any build of the extension; else ``"reference"``) and ``"torch"`` (the torch version the library
    runs on).
    """
    if not EXTENSION_LOADED:
        why = f"extension not loaded ({_load_error}); the pure-PyTorch reference serves"
        return {"cpu": "reference", "cuda": "reference", "cpu_reason": why, "cuda_reason": why, "siglip": "reference",
                "torch": torch.__version__}
    cpu_reason = "compiled C++ kernel (contrastbound._C)" if HAS_CPU_KERNEL else "extension has no CPU kernel"
    if HAS_CUDA_KERNEL:
        cuda_reason = "compiled CUDA kernel (contrastbound._C)"
    else:
        cuda_reason = (
            "the extension was built without CUDA kernels (CPU-only torch or no nvcc at build time; "
            "rebuild with FORCE_CUDA=1); CUDA tensors use the pure-PyTorch reference (siglip_loss excepted: see "
            "'siglip')"
        )
    return {
        "cpu": "kernel" if HAS_CPU_KERNEL else "reference",
        "cuda": "kernel" if HAS_CUDA_KERNEL else "reference",
        "cpu_reason": cpu_reason,
        "cuda_reason": cuda_reason,
        "siglip": "kernel" if HAS_SIGLIP_KERNEL else "reference",
        "torch": torch.__version__,
    }
