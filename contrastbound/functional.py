"""The public InfoNCE family: argument checks, then one call into the fused op (or its fallback)."""

from __future__ import annotations

import contextlib
import copy
import math
import operator
import sys
import warnings
from numbers import Integral, Real
from typing import NamedTuple

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

from . import _backend, _ops
from .reference import _softplus

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("none", "mean", "sum")
# The smallest temperature: its scale 1 / t must be finite in the accumulation type, float32 for float32 / float16 /
# bfloat16 features (below ~2.9e-39 every loss would be NaN), float64 for float64 ones (~5.6e-309).
_MIN_TEMPERATURE = 1.0 / torch.finfo(torch.float32).max
_MIN_TEMPERATURE_F64 = 1.0 / torch.finfo(torch.float64).max


def _min_reciprocal(dtype: torch.dtype) -> float:
    """The smallest value whose reciprocal is finite in `dtype`'s accumulation type (float32 at least)."""
    return _MIN_TEMPERATURE_F64 if dtype == torch.float64 else _MIN_TEMPERATURE


# _min_reciprocal's values (and float32's largest scale) as text, formatted at import: under
# torch.compile(dynamic=True) dynamo traces a module's float as a symbol, which an f-string in traced code cannot
# format with a format spec (fullgraph=True failed with "BUILD_STRING" where the refusal's message was meant).
_MIN_RECIPROCAL_TEXT = {True: f"{_MIN_TEMPERATURE_F64:.3g}", False: f"{_MIN_TEMPERATURE:.3g}"}
_MAX_F32_SCALE_TEXT = f"{1.0 / _MIN_TEMPERATURE:.4g}"


# ----------------------------------------------------------------------------------------------------------
# Validation: every message names the argument and what was expected.
# ----------------------------------------------------------------------------------------------------------


def _check_dense(name: str, x: torch.Tensor) -> None:
    """The kernels read strided memory: a sparse or mkldnn tensor is refused by name (the dispatcher's error would
    name an op and a backend)."""
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}: convert it with .to_dense()")
    if x.is_nested:  # a strided nested tensor has layout strided, but no sizes
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor: pad it (to_padded_tensor) "
                        "or concatenate its rows")


def _usable_for_autograd(x: torch.Tensor) -> torch.Tensor:
    """x, or a copy where it is an inference tensor (made under torch.inference_mode, say a momentum encoder's
    keys) and autograd may have to save it (grad mode on, outside inference mode): autograd cannot save one
    ("Inference tensors cannot be saved for backward"), in the ops' backward nor in the reference's. (Not under
    torch.compile: dynamo cannot trace is_inference; a compiled step given inference tensors then raises that
    error in backward, as compiled plain torch does.)"""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return x
    return _ops.savable(x)


def _check_tensor(name: str, x: object, ndim: int | tuple[int, ...], shape_doc: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    _check_dense(name, x)
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if x.dim() not in ndims:
        raise ValueError(f"{name} must have shape {shape_doc}, got a {x.dim()}-d tensor of shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got dtype {x.dtype}"
        )
    return _usable_for_autograd(x)


def _check_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}: all inputs must share a device")


def _read_back(x: torch.Tensor, read):
    """read(values) on the host, values being x without its functorch wrappers (under vmap: the whole batch of a
    per-sample tensor, whose own .item() vmap refuses), with the transforms off for the read (before torch 2.10
    they also wrapped the results of ops on plain tensors, which cannot be read back) and back on at once, also
    when the read raises."""
    values = x
    while torch._C._functorch.is_functorch_wrapped_tensor(values):
        values = torch._C._functorch.get_unwrapped(values)
    guard = torch._C._DisableFuncTorch() if _func_active() else None  # noqa: F841
    try:
        return read(values)
    finally:
        del guard


def _check_positive_scalar_tensor(name: str, x: torch.Tensor) -> torch.Tensor:
    """x as a 0-d tensor after checking it holds one floating value, and, on the CPU, that the value is finite and
    positive, with a reciprocal finite in x's own accumulation type (float32 at least; features of a narrower type
    are checked again in _check_scale_fits).

    CPU, eager: the value is read and a ValueError names it. CPU under torch.compile: the check is an op in the
    graph (torch._assert_async: no read-back, so a value that changes every step does not re-specialise the
    graph). On a GPU the value is not read here (a read-back would synchronise the device every step): the
    kernels, and the fallback through _poison_bad_scale, turn a value that is not positive and finite into a NaN
    loss. (With CPU features a GPU temperature is copied to the CPU later, see _scale_of.)
    """
    _check_dense(name, x)
    if x.numel() != 1 or not x.is_floating_point():
        raise ValueError(
            f"{name} must be a positive finite scalar: a number or a floating tensor with one element, "
            f"got a {x.dtype} tensor of shape {tuple(x.shape)}"
        )
    x = _usable_for_autograd(x.reshape(()))
    minimum = _min_reciprocal(x.dtype)
    if x.device.type != "cpu":
        return x
    if torch.compiler.is_compiling():
        # Not for a value batched by vmap: _assert_async has no batching rule (compile of vmap over temperatures
        # failed); the reference, which every transform takes there, makes a bad value's loss NaN
        # (_poison_bad_scale), as on a GPU. (Under grad the check stays: a bad value raises.)
        if not _batched_while_compiling(x):
            v = x.detach()
            # (v > 0 as well: in float16 the minimum rounds to 0)
            torch._assert_async(torch.isfinite(v) & (v > 0) & (v.double() >= minimum),
                                f"{name} must be a positive finite number (at least "
                                f"{_MIN_RECIPROCAL_TEXT[x.dtype == torch.float64]})")
    else:
        # (under vmap the whole batch of per-sample values, see _read_back)
        for v in _read_back(x.detach(), lambda values: values.reshape(-1).tolist()):
            if not math.isfinite(v) or v <= 0.0:
                raise ValueError(f"{name} must be a positive finite number, got {v}")
            if v < minimum:
                acc = "float64" if x.dtype == torch.float64 else "float32"
                raise ValueError(f"{name} must be at least {minimum:.3g} (its reciprocal finite in {acc}), got {v}")
    return x


def _as_float(name: str, value: Real, must: str = "a positive finite number") -> float:
    """float(value), with a ValueError naming the argument for an int (or a Fraction) beyond float64's range."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be {must}, got a value beyond float64's range") from None


def _check_temperature(temperature: object) -> float | torch.Tensor:
    """A positive finite float, or, for a tensor (learnable or not), the 0-d tensor itself: its value then goes
    to the kernels as a tensor (the *_scaled ops), never through Python."""
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() > 1 and not (temperature.is_floating_point() or temperature.is_complex()
                                             or temperature.dtype == torch.bool):
            # info_nce(a, p, bank, idx): temperature is the fourth positional argument, the indices a keyword
            raise TypeError(f"temperature must be a positive finite number or a scalar tensor, got a "
                            f"{temperature.dtype} tensor of shape {tuple(temperature.shape)}: negative indices are "
                            f"passed by keyword, negative_indices=")
        return _check_positive_scalar_tensor("temperature", temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a positive finite number or a scalar tensor, got {type(temperature).__name__}")
    t = _as_float("temperature", temperature)
    # Comparisons rather than math.isfinite: under torch.compile(dynamic=True) a float from a config or module
    # attribute is traced as a symbol, which math.isfinite cannot take (NaN fails both comparisons).
    if not (0.0 < t < math.inf):
        raise ValueError(f"temperature must be a positive finite number, got {t}")
    if not (t >= _MIN_TEMPERATURE_F64):  # a subnormal temperature: 1 / t overflows (float32: _check_scale_fits)
        raise ValueError(f"temperature must be at least {_MIN_RECIPROCAL_TEXT[True]} (1 / temperature finite), "
                         f"got {t}")
    return t


def _widened(t: float | torch.Tensor, *features: torch.Tensor | None) -> float | torch.Tensor:
    """A tensor temperature (or scale) in the widest of its own dtype, float32 and the features' dtypes (a float:
    as is). A loss that uses it more than once (supcon_loss, nt_xent, debiased_info_nce, info_nce_lse's lse,
    bank_cross_entropy with label smoothing, siglip_loss's scale and bias) then sums the parts of its gradient in
    that dtype and rounds the sum once into a narrower temperature's; each part rounded to float32 on its own, parts
    of ~1e3 that cancel left supcon's d loss / d t off by 2e-4 relative with float64 features (naive PyTorch: 1e-8;
    a fuzz's find), and t / (1 + beta) in float32 moved debiased_info_nce's float64 loss by 3e-8. A half-precision
    temperature is widened to float32 at least, with half features too (its parts were rounded to its type each)."""
    if not isinstance(t, torch.Tensor):
        return t
    wide = torch.promote_types(t.dtype, torch.float32)
    for x in features:
        if x is not None:
            wide = torch.promote_types(wide, x.dtype)
    return t if wide == t.dtype else t.to(wide)


def _float64_host_values(x: float | torch.Tensor) -> list[float]:
    """The values a float64 check can read without cost: a float's, a float64 CPU tensor's in eager mode (every
    sample's under vmap); none of another tensor (a narrower one holds no value past float32's range; a GPU one is
    not read back; under torch.compile a read would break the graph)."""
    if not isinstance(x, torch.Tensor):
        return [x]
    if x.dtype != torch.float64 or x.device.type != "cpu" or torch.compiler.is_compiling():
        return []
    return _read_back(x.detach(), lambda v: v.reshape(-1).tolist())


def _check_scale_fits(temperature: float | torch.Tensor, dtype: torch.dtype) -> None:
    """For features computed in float32 (float32, float16, bfloat16): 1 / temperature must be finite in float32,
    or every loss would be NaN. A float64 temperature (a float, or a float64 CPU tensor, read in eager mode) can
    pass _check_temperature and not this; a narrower tensor was already held to it; a GPU one is not read."""
    if dtype == torch.float64:
        return
    for t in _float64_host_values(temperature):
        if not (t >= _MIN_TEMPERATURE):
            raise ValueError(
                f"temperature must be at least {_MIN_RECIPROCAL_TEXT[False]} for features computed in float32 "
                f"({dtype}): 1 / temperature overflows float32, got {t}"
            )


def _check_logit_scale_fits(clamped: float | torch.Tensor, dtype: torch.dtype) -> None:
    """clip_loss's _check_scale_fits, named for its argument: a logit scale (after the clamp to max_logit_scale)
    whose reciprocal, the temperature, is below _MIN_TEMPERATURE overflows float32 for features computed in it
    (the same test as _check_scale_fits on 1 / scale, so that this one raises first)."""
    if dtype == torch.float64:
        return
    for v in _float64_host_values(clamped):
        if not (1.0 / v >= _MIN_TEMPERATURE):
            raise ValueError(
                f"logit_scale (clamped to max_logit_scale) must be at most {_MAX_F32_SCALE_TEXT} for features "
                f"computed in float32 ({dtype}): it overflows float32, got {v}"
            )


def _check_reduction(reduction: object) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def _check_indices(
    name: str,
    indices: object,
    shape: tuple[int, ...],
    shape_doc: str,
    bound: int,
    bound_doc: str,
    device: torch.device,
    check_range: bool = True,
    padding: bool = False,
) -> torch.Tensor:
    """padding: -1 is allowed too (negative_indices: no negative at that place)."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be an int64 (or int32) tensor of shape {shape_doc}, got {type(indices).__name__}")
    _check_dense(name, indices)
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 (or int32) tensor of shape {shape_doc}, got dtype {indices.dtype}")
    if indices.device != device:
        raise ValueError(f"{name} is on {indices.device} but the features are on {device}")
    if tuple(indices.shape) != shape:
        raise ValueError(f"{name} must have shape {shape_doc} = {shape}, got {tuple(indices.shape)}")
    pad_doc = " or be -1 (padding)" if padding else ""
    if indices.numel() > 0 and check_range:
        if _in_graph(indices):
            # Reading the values back would break the graph (torch.compile's, or a CUDA graph being captured,
            # where a synchronisation is an error) or find none (a FakeTensor): the same check as an op in the
            # graph instead (on CPU it raises RuntimeError with this message; on CUDA, like
            # torch's own indexing, a device assert).
            # Not for indices batched by vmap (_assert_async has no batching rule: compile of vmap over indices
            # failed); every transform takes the reference there, whose indexing refuses a bad one (torch's message).
            if not _batched_while_compiling(indices):
                # Without the bound's value: formatting a size that dynamo traces as a symbol (dynamic=True, or
                # export with a dynamic dimension) specialised it, a graph per size, and export printed the
                # symbol's name (dynamo's type() / isinstance of a symbolic size say int, so it cannot be told).
                torch._assert_async(((indices >= (-1 if padding else 0)) & (indices < bound)).all(),
                                    f"{name} must lie in [0, {bound_doc}){pad_doc}")
        elif indices.device.type != "meta":
            # Per-sample indices under vmap are checked as the whole batch of them (see _read_back).
            ends = _read_back(indices, lambda values: torch.stack(torch.aminmax(values)).tolist())  # one read-back
            lo, hi = (int(v) for v in ends)
            if lo < (-1 if padding else 0) or hi >= bound:
                raise IndexError(f"{name} must lie in [0, {bound_doc}) = [0, {bound}){pad_doc}, got values in "
                                 f"[{lo}, {hi}]")
    return _as_int64(_usable_for_autograd(indices))


def _in_graph(x: torch.Tensor) -> bool:
    """Whether x's values cannot be read back on the host here: torch.compile is tracing, x is a FakeTensor (a
    caller's FakeTensorMode, no values), or a CUDA graph is being captured (see _capturing)."""
    return torch.compiler.is_compiling() or isinstance(x, FakeTensor) or _capturing(x)


def _may_read_back(x: torch.Tensor) -> bool:
    """Whether x's values may be read back on the host (eager, real values): not _in_graph and not a meta tensor."""
    return x.device.type != "meta" and not _in_graph(x)


def _capturing(x: torch.Tensor) -> bool:
    """Whether x is a CUDA tensor and the current stream is being captured into a CUDA graph (torch.cuda.graph,
    torch.compile's cudagraph trees): no value may be read back then (the capture fails with an error), so value
    checks run in the stream (torch._assert_async) and data-dependent shortcuts are not taken."""
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _as_int64(indices: torch.Tensor) -> torch.Tensor:
    """int32 indices as int64 without materialising an expanded (stride-0) tensor: only the distinct elements are
    widened, then expanded again (the kernels read int64 indices through their strides; a plain .to(torch.int64)
    of a (B, K) expansion of K indices would write B K of them)."""
    if indices.dtype == torch.int64:
        return indices
    keep = tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for st, n in zip(indices.stride(), indices.shape))
    return indices[keep].to(torch.int64).expand(indices.shape)


def _info_nce_global_batch(anchors, positives, temperature, normalize, reduction, process_group, *, call=1,
                           names=("anchors", "positives"), per_anchor=False, labels=None, decoupled=False):
    """info_nce with negatives=None over the global batch: the positives of every rank gathered (this rank's first,
    so row i is still positive i). ``call`` and ``names``: what the ranks' agreement check calls this call and the
    arguments (clip_loss's are image_features and text_features). ``per_anchor``: (the per-anchor losses in the
    accumulation dtype, the result dtype) instead of the reduced loss (clip_loss averages two directions first).
    ``labels`` (B,): gathered with the positives (call 11), a positive of the anchor's label left out of its sum."""
    from .distributed import gather_with_labels, gather_with_local_first

    with _refusals_joined(process_group, anchors):  # (a refusal on some ranks only: every rank raises)
        anchors, positives = _check_features(anchors, positives, names)
        t = _check_temperature(temperature)
        normalize = _check_bool("normalize", normalize)
        reduction = _check_reduction(reduction)
        decoupled = _check_bool("decoupled", decoupled)
        _check_group("clip_loss" if call == 4 else "info_nce", anchors, positives, t)
        compute, result = _promoted(anchors, positives)
        # here, not in _fused after the exchange, where a lone refusal would leave the other ranks waiting
        _check_scale_fits(t, compute)
        _check_temperature_has_value(t, anchors.device)
        if labels is not None:
            labels = _check_label_tensor("labels", labels, (anchors.shape[0],), "(B,)", anchors.device)
    a, p = anchors.to(compute), positives.to(compute)
    name = f"{names[1]} (in the promoted dtype of {names[0]} and {names[1]})"
    pair = None
    agree = (("decoupled", decoupled),)  # (every rank passes it: a lone option's check would be one-sided)
    if labels is None:
        bank = gather_with_local_first(p, process_group, name=name, call=call, normalize=normalize, temperature=t,
                                       options=agree)
    else:
        bank, bank_labels = gather_with_labels(p, labels, process_group, normalize=normalize, temperature=t, call=11,
                                               name=name, options=agree)
        pair = (labels, bank_labels)
    if decoupled and bank.shape[0] == 1:  # (the same gathered size on every rank: all raise)
        raise ValueError("decoupled=True leaves the positive out of the denominator, so each anchor needs at least "
                         "one negative (its loss would be -inf), but the global batch has a single anchor")
    loss, _ = _fused(a, p, bank, None, t, normalize, not decoupled, exclude_self=True, labels=pair)
    return (loss, result) if per_anchor else _reduce(loss, reduction, result)


def _refusals_joined(process_group, like):
    """distributed.refusals_joined around a loss's own checks where it has a process_group (else nothing)."""
    if process_group is None:
        return contextlib.nullcontext()
    from .distributed import refusals_joined

    return refusals_joined(process_group, like)


def _check_bool(name: str, value: object) -> bool:
    """value as a bool: a Python bool or a numpy one (np.True_, as torch's own arguments take); anything else, an
    int or a one-element tensor included, is refused (TypeError naming its type in full: numpy's is also 'bool')."""
    if isinstance(value, bool):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {_type_name(value)}")


def _type_name(value: object) -> str:
    """value's type, qualified by its module where that is not builtins (numpy's bool is also named 'bool')."""
    kind = type(value)
    return f"{kind.__module__ + '.' if kind.__module__ != 'builtins' else ''}{kind.__qualname__}"


def _check_int(name: str, value: object, minimum: int, expected: str, below: int | None = 2 ** 62) -> int:
    """value as an int (Python or numpy integers, 0-d integer tensors: operator.index) in [minimum, below): TypeError
    for anything else (a bool, a float such as 2.0, a string, a tensor of another shape or dtype), ValueError for a
    value out of range, as torch tells them apart. expected: what the message says the argument must be ("a positive
    int"). below: 2^62 keeps a size's index arithmetic in int64; None where any larger value is meaningful (a top-k
    past every rank)."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and (
            value.dim() != 0 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex())):
        value_type = f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}" \
            if isinstance(value, torch.Tensor) else _type_name(value)
        raise TypeError(f"{name} must be {expected}, got {value_type}")
    try:
        n = operator.index(value)
    except (TypeError, RuntimeError):  # (RuntimeError: a meta tensor, which holds no value)
        raise TypeError(f"{name} must be {expected}, got {_type_name(value)} {value!r}") from None
    if n < minimum:
        raise ValueError(f"{name} must be {expected}, got {n}")
    if below is not None and n >= below:
        raise ValueError(f"{name} must be {expected} below {'2^62' if below == 2 ** 62 else below}, got {n}")
    return n


def _autocast_available(device_type: str) -> bool:
    """torch.amp.is_autocast_available(device_type) (True where torch lacks it), remembered per device type and
    asked at import for cpu, cuda and meta: dynamo before torch 2.13 cannot trace the builtin it calls (under
    torch.compile a graph break, fatal with fullgraph=True; seen with torch 2.11), a lookup in a dict it can."""
    known = _AUTOCAST_AVAILABLE.get(device_type)
    if known is None:
        available = getattr(torch.amp, "is_autocast_available", None)
        known = _AUTOCAST_AVAILABLE[device_type] = available is None or bool(available(device_type))
    return known


_AUTOCAST_AVAILABLE: dict[str, bool] = {}
for _device_type in ("cpu", "cuda", "meta"):
    _autocast_available(_device_type)


def _autocast_enabled(device_type: str) -> bool:
    if not _autocast_available(device_type):  # (meta: torch.is_autocast_enabled("meta") raises)
        return False
    return torch.is_autocast_enabled(device_type)


def _autocast_off(device_type: str):
    """torch.autocast(device_type, enabled=False), or nothing where that device has no autocast (meta tensors:
    torch.autocast("meta") raises)."""
    if not _autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _gradient_only(x: torch.Tensor) -> torch.Tensor:
    """0 with the gradient of x: x - x.detach(), but 0 where x is infinite (an empty sum's log-sum-exp is -inf,
    and -inf - -inf would make a value and gradient that are NaN)."""
    return torch.where(torch.isinf(x.detach()), 0.0, x - x.detach())


def _reduce(loss: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """loss (per anchor, in the accumulation dtype) reduced and cast to the result dtype; float32 instead of a
    half dtype under torch.autocast on the loss's device, as autocast runs torch's losses (F.cross_entropy
    returns float32 there: a bfloat16 loss would round the float32 value the kernels accumulated to 3 digits)."""
    if dtype in (torch.float16, torch.bfloat16) and _autocast_enabled(loss.device.type):
        dtype = torch.float32
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
    temperature: float | torch.Tensor,
    normalize: bool,
    include_positive: bool,
    exclude_self: bool = False,
    excluded: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    labels: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """negative_mask (B, K) bool, a shared bank only: bank row k in anchor i's sum only where it holds. labels, a
    shared bank only: (labels (B,), bank labels (K,)) int64, bank row k left out of anchor i's sum where they agree.
    Returns (loss, lse), both (B,) in the accumulation type; lse is a constant (no gradient) from the kernels, the
    reference's own differentiable one where that serves (info_nce_lse attaches the kernels' lse its gradient)."""
    _check_scale_fits(temperature, anchors.dtype)  # anchors: in the computation's dtype here
    if _kernels_serve(anchors, positives, negatives, temperature):
        run = _fused_kernel(anchors, positives, negatives, negative_indices, temperature, normalize, include_positive,
                            exclude_self, excluded, negative_mask, labels)
        # (the CPU op's lse is float64, kept so for its backward, which autograd saved; callers get the loss's dtype)
        return run.loss, run.lse.to(run.loss.dtype)
    from .reference import info_nce_core_reference

    if labels is not None:  # (the reference materialises the logits anyway: the labels as a mask)
        keep = labels[1][None, :] != labels[0][:, None]
        negative_mask = keep if negative_mask is None else negative_mask & keep
    scale = 1.0 / temperature
    if isinstance(scale, torch.Tensor):
        if anchors.device.type == "cpu" and scale.device.type != "cpu":
            scale = scale.cpu()  # differentiable; a GPU 0-d tensor cannot meet CPU features in an op
        scale = _poison_bad_scale(scale)
    # The reference in the inputs' dtype, as the kernels (float32 accumulation for half inputs): autocast would
    # run its logits' matmul in bfloat16/float16.
    with _autocast_off(anchors.device.type):
        return info_nce_core_reference(
            anchors, positives, negatives, negative_indices, scale, normalize, include_positive, exclude_self,
            excluded, negative_mask,
        )


def _kernels_serve(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                   temperature: float | torch.Tensor) -> bool:
    """Whether _fused runs the ops (else the reference). Under a torch.func transform a tensor temperature takes the
    reference: one batched by vmap reports requires_grad=False even where it is learnable, and the kernels would take
    it as a detached scale (its gradient silently lost)."""
    return (_backend.kernel_serves(anchors.device) and not _needs_reference(anchors, positives, negatives, temperature)
            and not (isinstance(temperature, torch.Tensor) and _func_active()))


class _KernelRun(NamedTuple):
    """One forward op call of _fused_kernel: its outputs (lse as the op gives it: float64 on the CPU), and the
    negatives, indices and scale it was given (a strided bank's used rows: _used_rows_of_strided_bank)."""

    loss: torch.Tensor
    lse: torch.Tensor
    term: torch.Tensor
    negatives: torch.Tensor
    negative_indices: torch.Tensor | None
    scale: float | torch.Tensor


def _fused_kernel(anchors, positives, negatives, negative_indices, temperature, normalize: bool,
                  include_positive: bool, exclude_self: bool = False, excluded=None, negative_mask=None,
                  labels=None, detached: bool = False) -> _KernelRun:
    """The forward op under autograd (_fused's arguments; _kernels_serve holds), a learnable temperature's gradient
    attached to the loss. detached: the op outside autograd (the caller attaches gradients; V saved as a gradient
    would need it)."""
    learnable = isinstance(temperature, torch.Tensor) and temperature.requires_grad
    grad = torch.is_grad_enabled()
    if negative_indices is not None:
        negatives, negative_indices = _used_rows_of_strided_bank(negatives, negative_indices)
    save_anchor_term = bool(grad and (anchors.requires_grad or learnable))
    scale = _scale_of(temperature, anchors.device)
    with torch.no_grad() if detached else contextlib.nullcontext():
        loss, lse, term = _fwd_op(
            anchors, positives, negatives, negative_indices, scale, normalize, include_positive, save_anchor_term,
            exclude_self,
            *(() if excluded is None and negative_mask is None and labels is None else (excluded,)),
            *(() if negative_mask is None and labels is None else (negative_mask,)),
            *(() if labels is None else labels),
        )
    if learnable and grad and not detached:
        loss = _with_temperature_grad(loss, lse, term, anchors, positives, temperature, normalize, include_positive)
    return _KernelRun(loss, lse, term, negatives, negative_indices, scale)


def _used_rows_of_strided_bank(bank: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bank, indices), or the rows the indices use, contiguous, and the indices into them, for a CPU bank whose rows
    are strided (a transposed (d, M) queue, `queue.T`) and which needs no gradient, where the indices are far fewer
    than its rows. The CPU kernel reads rows through a pointer, so it copied such a bank whole at each call: M = 2^20,
    d = 128, B = 32, K = 16, 420 ms and 256 MiB where a contiguous bank took 0.34 ms (a performance review,
    2026-12-06). The same rows, so the same loss (only the kernel's walk, planned from the bank's size, may sum in
    another order). Indices out of range are left to the kernel's own check and message; eager mode only (under
    torch.compile, export and torch.func transforms the shapes would depend on the values)."""
    if (bank.device.type != "cpu" or bank.dim() != 2 or bank.stride(-1) == 1 or indices.numel() == 0
            or 4 * indices.numel() >= bank.shape[0] or (bank.requires_grad and torch.is_grad_enabled())
            or torch.compiler.is_compiling() or _exporting() or _func_active() or isinstance(bank, FakeTensor)
            or isinstance(indices, FakeTensor)):
        return bank, indices
    lo, hi = (int(v) for v in torch.aminmax(indices))
    if lo < -1 or hi >= bank.shape[0]:
        return bank, indices
    used, inverse = torch.unique(indices, return_inverse=True)  # (-1, padding, first where there is any)
    rows = bank.detach().index_select(0, used.clamp_min(0))  # (a contiguous copy of the used rows only)
    return rows, torch.where(indices >= 0, inverse, torch.full_like(inverse, -1))


def _forward_ad(*xs: object) -> bool:
    """Whether forward-mode AD (torch.autograd.forward_ad, torch.func.jvp / jacfwd) carries a tangent on one of xs.

    The compiled ops have no forward-mode formula, and torch.library's autograd wrapper runs them below autograd
    when no input requires grad, which drops the tangents silently (a derivative of 0)."""
    if fwAD._current_level < 0:
        return False
    return any(isinstance(x, torch.Tensor) and fwAD.unpack_dual(x).tangent is not None for x in xs)


def _transforms_active_while_compiling() -> bool:
    """Under torch.compile: whether a torch.func transform is being traced. Dynamo traces this one query (the
    interpreter stack and the tensor-wrapper tests are opaque to it), which cannot tell grad from vmap: every
    transform takes the reference there (compile of vmap too, at the reference's O(B K) memory)."""
    return bool(getattr(torch._C, "_are_functorch_transforms_active", lambda: False)())


def _batched_while_compiling(x: torch.Tensor) -> bool:
    """Under torch.compile: whether x is batched by vmap at its outermost level (dynamo traces this test; it
    cannot see through a grad wrapper, so vmap(grad(f)) taken with respect to x itself still fails to compile)."""
    if not _transforms_active_while_compiling():
        return False
    return bool(getattr(torch._C._functorch, "is_batchedtensor", lambda t: False)(x))


def _func_active() -> bool:
    """Whether any torch.func transform (vmap included) is active: the reference serves the calls that use the
    custom ops here (_bank_rows_fwd, _attach_scale_grad) under any of them."""
    if torch.compiler.is_compiling():
        return _transforms_active_while_compiling()
    return bool(getattr(torch._C._functorch, "get_interpreter_stack", lambda: None)())


def _batched(t: torch.Tensor) -> bool:
    """Whether t is batched by a vmap: functorch's (torch.func.vmap, jacrev) or the legacy one that backward uses
    for is_grads_batched and jacobian(vectorize=True), under which no interpreter is on functorch's stack. An
    in-place write of a batched tensor into an unbatched buffer is refused there. (Private predicates, read with a
    default: where this torch lacks one, False.)"""
    functorch = torch._C._functorch
    return any(getattr(functorch, name, lambda _: False)(t) for name in ("is_batchedtensor", "is_legacy_batchedtensor"))


def _exporting() -> bool:
    """Whether torch.export is tracing (strict or not); False on a torch without torch.compiler.is_exporting."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def _func_differentiates() -> bool:
    """Whether a torch.func transform that differentiates (grad, vjp, jacrev, hessian, jvp) is active.

    torch.library's autograd wrapper of an op defined in C++ is an autograd.Function without setup_context, which
    those transforms refuse (RuntimeError). vmap alone is served by torch's per-sample fallback over the ops."""
    if torch.compiler.is_compiling():
        return _transforms_active_while_compiling()  # (grad and vmap alike: see there)
    stack = getattr(torch._C._functorch, "get_interpreter_stack", lambda: None)()
    differentiating = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)
    return bool(stack) and any(level.key() in differentiating for level in stack)


def _needs_reference(*xs: object) -> bool:
    """Whether the call must take the reference (correct derivatives, materialised logits) instead of the ops:
    a forward-mode tangent on one of xs, or a differentiating torch.func transform."""
    return _forward_ad(*xs) or _func_differentiates()


def _check_group(function: str, *xs: object) -> None:
    """torch.distributed must be up for process_group; the gathers over ranks are autograd.Functions with neither
    a forward formula nor setup_context, so no forward-mode AD or torch.func transform that differentiates."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RuntimeError(f"{function} with process_group needs torch.distributed to be initialised (init_process_group)")
    if _needs_reference(*xs):
        raise NotImplementedError(
            "forward-mode AD (torch.autograd.forward_ad) and torch.func transforms that differentiate (grad, vjp, "
            "jacrev, jvp, jacfwd) are not supported with process_group"
        )


def _poison_bad_scale(scale: torch.Tensor) -> torch.Tensor:
    """NaN where the scale is not positive and finite: the fallback's equivalent of the kernels' read_scale for a
    GPU temperature, whose value is never read on the host (see _check_positive_scalar_tensor)."""
    ok = torch.isfinite(scale) & (scale > 0)
    return torch.where(ok, scale, torch.full_like(scale, float("nan")))


def _check_temperature_has_value(temperature: float | torch.Tensor, device: torch.device,
                                  name: str = "temperature") -> None:
    """A meta temperature has no value to compute with, unless the features are meta too (tracing)."""
    if isinstance(temperature, torch.Tensor) and temperature.device.type == "meta" and device.type != "meta":
        raise ValueError(f"{name} is a meta tensor (no value) but the features are on {device}")


def _scale_of(temperature: float | torch.Tensor, device: torch.device) -> float | torch.Tensor:
    """1 / temperature: a float, or a detached float64 0-d tensor for a tensor temperature. For CPU features a
    GPU temperature comes to the CPU (a read-back): the dispatcher would otherwise pick the GPU kernel."""
    if isinstance(temperature, torch.Tensor):
        _check_temperature_has_value(temperature, device)
        scale = 1.0 / temperature.detach().to(torch.float64)
        return scale.cpu() if device.type == "cpu" and scale.device.type != "cpu" else scale
    if torch.compiler.is_compiling():
        # A tensor scale (the *_scaled ops) rather than a float argument, which dynamo would specialise on: a
        # temperature schedule would recompile the graph for every value (as a tensor division, a float input
        # becomes a graph input once dynamo sees it change; torch.full / torch.tensor of it would specialise).
        return torch.ones((), dtype=torch.float64, device=device) / temperature
    return 1.0 / temperature


def _fwd_op(anchors, positives, negatives, negative_indices, scale, *flags):
    """The forward op: info_nce_fwd for a float scale, info_nce_fwd_scaled for a tensor one."""
    if isinstance(scale, torch.Tensor):
        return torch.ops.contrastbound.info_nce_fwd_scaled(anchors, positives, negatives, negative_indices, scale, *flags)
    return torch.ops.contrastbound.info_nce_fwd(anchors, positives, negatives, negative_indices, scale, *flags)


def _bwd_op(grad_loss, anchors, positives, negatives, negative_indices, lse, term, scale, *flags):
    """The backward op for a float or a tensor scale (see _fwd_op)."""
    if isinstance(scale, torch.Tensor):
        return torch.ops.contrastbound.info_nce_bwd_scaled(
            grad_loss, anchors, positives, negatives, negative_indices, lse, term, scale, *flags
        )
    return torch.ops.contrastbound.info_nce_bwd(
        grad_loss, anchors, positives, negatives, negative_indices, lse, term, scale, *flags
    )


def _with_temperature_grad(loss, lse, term, anchors, positives, temperature, normalize, include_positive,
                           loss_bwd=None, smoothing_mean=None, lse_out=None):
    """Attaches the exact gradient with respect to a learnable temperature to the kernel's per-anchor loss; with
    lse_out (info_nce_lse: the values of lse) returns (loss, lse_out), each with its own gradient, d lse_i / d s =
    E_i / s, from one pass over the features.

    With s = 1/t every logit is l = s x, so d loss_i / d s = (E_i - l_i0) / s, where E_i = sum_j w_ij l_ij is the
    softmax-weighted logit: w_i0 l_i0 for the positive plus s a_hat_i . V_i for the negatives, V_i being the
    softmax-weighted sum of normalised negatives that forward saved. O(B d) work; value unchanged. l_i0 is formed
    from the features, not as lse_i - loss_i: that difference of two numbers of size ~log K loses l_i0's digits
    where it is small (a high temperature: at s = 1e-6 the float32 gradient was off by a factor of two).
    loss_bwd, smoothing_mean: bank_rows_fwd's L' and (eps, m) where its loss is CE + eps (l_t - l_m) (label
    smoothing): d eps l_t / d s = eps l_i0 / s adds eps to w0 - 1, which expm1(-L') holds; d eps l_m / d s =
    eps a_hat . m.
    """
    if loss.device.type == "cpu" and temperature.device.type != "cpu":
        temperature = temperature.cpu()  # differentiable; a GPU 0-d tensor cannot meet CPU features in an op
    with torch.no_grad():
        scale = 1.0 / temperature.detach().to(loss.dtype)
        a, p = anchors.detach().to(loss.dtype), positives.detach().to(loss.dtype)
        if normalize:
            a, p = F.normalize(a, dim=-1, eps=1e-12), F.normalize(p, dim=-1, eps=1e-12)
        l0 = scale * (a * p).sum(-1)
        negatives_part = scale * (a * term).sum(-1)  # s a_hat . V
        # A row whose set is empty (no negatives, positive left out: lse = -inf) does not depend on the scale:
        # 0, whatever its loss (-inf) and saved V hold, so that no 0 * NaN reaches the temperature's gradient.
        empty = torch.isneginf(lse)
        # E - l0 = (w0 - 1) l0 + s a_hat . V, with w0 - 1 = expm1(-loss): no cancellation where the positive
        # dominates (w0 -> 1), as in the kernels' gradient of the positive.
        w0_minus_1 = torch.expm1(-(loss if loss_bwd is None else loss_bwd)) if include_positive else -1.0
        e_minus_l0 = negatives_part + w0_minus_1 * l0
        if smoothing_mean is not None:
            e_minus_l0 = e_minus_l0 - smoothing_mean[0] * scale * (a * smoothing_mean[1]).sum(-1)
        dloss_dscale = torch.where(empty, 0.0, e_minus_l0 / scale)
        if lse_out is not None:
            # lse: E = w0 l0 + s a_hat . V, w0 = e^{-loss}, formed as it is (E - l0 + l0 cancels where the
            # positive's share is small)
            w0 = torch.exp(-loss.detach()) if include_positive else 0.0
            dlse_dscale = torch.where(empty, 0.0, (negatives_part + w0 * l0) / scale)
    # 1 / t in the wider of the two types: a float64 temperature with float32 features keeps d s / d t = -1 / t^2
    # in float64 (in float32 it overflowed at t = 1e-20: an inf or NaN gradient where plain torch gives -2.6e39).
    scale_in_graph = 1.0 / temperature.to(torch.promote_types(temperature.dtype, loss.dtype))
    loss = _attach_scale_grad(loss, scale_in_graph, dloss_dscale)
    return loss if lse_out is None else (loss, _attach_scale_grad(lse_out, scale_in_graph, dlse_dscale))


# The two steps below are custom ops (torch.library.custom_op, with their autograd registered) rather than
# torch.autograd.Functions: torch.export keeps an op and its registered backward, but drops a Function's backward
# (an exported training step gave a learnable temperature no gradient, and bank_cross_entropy or nt_xent wrong
# or missing ones). torch.compile traces them as opaque ops, with their fake kernels.


@torch.library.custom_op("contrastbound::attach_scale_grad", mutates_args=())
def _attach_scale_grad(loss: torch.Tensor, scale: torch.Tensor, dloss_dscale: torch.Tensor) -> torch.Tensor:
    """loss unchanged (a copy); backward hands the scale sum(grad * dloss/dscale), and refuses a second
    differentiation (dloss/dscale is computed without a graph: a Hessian through it would be silently wrong)."""
    _check_attach_scale_grad(loss, scale, dloss_dscale)
    return loss.clone()


def _check_attach_scale_grad(loss: torch.Tensor, scale: torch.Tensor, dloss_dscale: torch.Tensor) -> None:
    """For a direct call of the op (the library passes these right): a meta tensor among real ones sent the call to
    the fake kernel (uninitialised memory back), and a dloss_dscale that broadcast against loss gave the scale a
    wrong gradient without an error (an op audit, 2026-12-02)."""
    for name, t in (("loss", loss), ("scale", scale), ("dloss_dscale", dloss_dscale)):
        if not t.is_floating_point():
            raise TypeError(f"attach_scale_grad: {name} must be a floating tensor, got {t.dtype}")
    _ops._scalars_have_values(loss, "loss is", scale=scale, dloss_dscale=dloss_dscale)
    if dloss_dscale.shape != loss.shape or dloss_dscale.device != loss.device:
        raise ValueError(f"attach_scale_grad: dloss_dscale must have loss's shape {tuple(loss.shape)} on "
                         f"{loss.device}, got {tuple(dloss_dscale.shape)} on {dloss_dscale.device}")
    if scale.numel() != 1:
        raise ValueError(f"attach_scale_grad: scale must have one element, got shape {tuple(scale.shape)}")


@_attach_scale_grad.register_fake
def _(loss, scale, dloss_dscale):
    _check_attach_scale_grad(loss, scale, dloss_dscale)
    return torch.empty_like(loss)


def _attach_scale_grad_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])


def _attach_scale_grad_backward(ctx, grad):
    _ops.refuse_double_backward()
    (dloss_dscale,) = ctx.saved_tensors
    return grad, (grad * dloss_dscale).sum(), None


_attach_scale_grad.register_autograd(_ops.without_autocast(_attach_scale_grad_backward),
                                     setup_context=_attach_scale_grad_setup)


@torch.library.custom_op("contrastbound::loss_and_lse", mutates_args=())
def _loss_and_lse(loss: torch.Tensor, lse: torch.Tensor, anchors: torch.Tensor, positives: torch.Tensor,
                  negatives: torch.Tensor, negative_indices: torch.Tensor | None, anchor_term: torch.Tensor,
                  scale: float, scale_tensor: torch.Tensor | None, normalize: bool, include_positive: bool,
                  exclude_self: bool, negative_mask: torch.Tensor | None, labels: torch.Tensor | None,
                  negative_labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """info_nce_lse's (loss, lse): copies of the forward op's outputs (lse, float64 on the CPU, in loss's dtype), each
    with its own gradient for anchors, positives and negatives. The other arguments are those the forward op was
    called with (scale_tensor: the *_scaled ops' scale, else None and scale), anchor_term its V.

    Backward: the backward op gives the positive the coefficient g expm1(-L) from the loss L it is handed: the
    loss's own g (w0 - 1) with L = loss, lse's g w0 with L = -softplus(-loss) (expm1 of softplus(-loss) is e^{-loss}
    = w0, the positive's softmax weight, exact to loss's rounding however small), 0 with L = 0 for a positive left
    out of the sum. Formed as d loss + d l_0 instead, lse's gradient was the difference of two gradients of size
    ~ s |a|, each rounded to the inputs' dtype, for w0 s a: bfloat16 gradients 2x their size off where w0 is small,
    float32 ones 1e-3 (a differential fuzz's find). Both gradients wanted: the anchors' and positives' (O(B d),
    from the saved V) by one call each, the negatives' (the tiles recomputed) by one call with g_loss + g_lse, as
    they share their weights."""
    _check_loss_and_lse(loss, lse, anchors)
    return loss.clone(), lse.to(loss.dtype, copy=True)


def _check_loss_and_lse(loss: torch.Tensor, lse: torch.Tensor, anchors: torch.Tensor) -> None:
    """For a direct call of the op (info_nce_lse passes these right): the shapes its backward relies on."""
    B = anchors.shape[0] if anchors.dim() == 2 else -1
    if anchors.dim() != 2 or lse.shape != (B,) or loss.shape != (B,):
        raise ValueError(f"loss_and_lse: anchors must be (B, d) and loss and lse (B,), got anchors "
                         f"{tuple(anchors.shape)}, loss {tuple(loss.shape)}, lse {tuple(lse.shape)}")
    if not (lse.is_floating_point() and loss.is_floating_point()):
        raise TypeError(f"loss_and_lse: loss and lse must be floating tensors, got {loss.dtype} and {lse.dtype}")
    _ops._same_device(anchors, loss=loss, lse=lse)


@_loss_and_lse.register_fake
def _(loss, lse, anchors, positives, negatives, negative_indices, anchor_term, scale, scale_tensor, normalize,
      include_positive, exclude_self, negative_mask, labels, negative_labels):
    _check_loss_and_lse(loss, lse, anchors)
    return torch.empty_like(loss), torch.empty_like(lse, dtype=loss.dtype)


def _loss_and_lse_setup(ctx, inputs, output):
    (loss, lse, anchors, positives, negatives, negative_indices, term, scale, scale_tensor, normalize,
     include_positive, exclude_self, negative_mask, labels, negative_labels) = inputs
    ctx.save_for_backward(loss, lse, *map(_ops.savable, (anchors, positives, negatives, negative_indices)), term,
                          *map(_ops.savable, (negative_mask, labels, negative_labels)),
                          *(() if scale_tensor is None else (_ops.savable(scale_tensor),)))
    ctx.scale, ctx.normalize, ctx.include_positive, ctx.exclude_self = scale, normalize, include_positive, exclude_self
    # An output outside the graph (the usual case: loss or lse used alone) then reaches backward as None, not as
    # zeros: with zeros, backward took the both-outputs path, three backward-op calls for one (a static review's
    # find; clip_loss's CUDA route and debiased_info_nce take this op).
    ctx.set_materialize_grads(False)


def _loss_and_lse_backward(ctx, grad_loss, grad_lse):
    _ops.refuse_double_backward()
    (loss, lse, anchors, positives, negatives, negative_indices, term, negative_mask, labels, negative_labels,
     *tensor_scale) = ctx.saved_tensors
    need = [bool(ctx.needs_input_grad[2]), bool(ctx.needs_input_grad[3]), bool(ctx.needs_input_grad[4])]
    if not any(need) or (grad_loss is None and grad_lse is None):
        return (None,) * 15
    scale = tensor_scale[0] if tensor_scale else ctx.scale
    tail = (None, negative_mask, *((labels, negative_labels) if labels is not None else (None, None)))

    def call(g, mask, of_lse):
        # of_lse: the positive's coefficient g w0 (or 0 without it), told include_positive=True (in backward the
        # flag chooses only that coefficient; the weights come from lse, the forward's either way)
        term_ = term
        if of_lse and mask[0] and not ctx.include_positive and term.numel() != anchors.numel():
            # V of the negatives alone, where forward did not save it (the op, told include_positive, would form it
            # with the positive in the sum)
            with torch.no_grad():
                term_ = _fwd_op(anchors, positives, negatives, negative_indices, scale, ctx.normalize, False, True,
                                ctx.exclude_self, *tail)[2]
        if not of_lse:
            loss_bwd, include = loss, ctx.include_positive
        else:
            loss_bwd, include = (-F.softplus(-loss) if ctx.include_positive else torch.zeros_like(loss)), True
        return _bwd_op(g.contiguous(), anchors, positives, negatives, negative_indices, lse, term_, scale,
                       ctx.normalize, include, mask, ctx.exclude_self, False, loss_bwd, *tail)

    if grad_lse is None or grad_loss is None:
        ga, gp, gn = call(grad_loss if grad_lse is None else grad_lse, need, of_lse=grad_lse is not None)
    else:
        ga, gp, _ = call(grad_loss, [need[0], need[1], False], of_lse=False)
        ga2, gp2, _ = call(grad_lse, [need[0], need[1], False], of_lse=True)
        ga, gp = (ga + ga2 if need[0] else ga), (gp + gp2 if need[1] else gp)
        gn = call(grad_loss + grad_lse, [False, False, need[2]], of_lse=False)[2] if need[2] else None
    return (None, None, ga if need[0] else None, gp if need[1] else None, gn if need[2] else None) + (None,) * 10


_loss_and_lse.register_autograd(_ops.without_autocast(_loss_and_lse_backward),
                                setup_context=_loss_and_lse_setup)


def _bank_rows_impl(anchors: torch.Tensor, bank: torch.Tensor, rows: torch.Tensor, scale_tensor: torch.Tensor | None,
                   scale: float, normalize: bool, save_anchor_term: bool, smoothing: float = 0.0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused op with anchor i's positive taken from the bank: positives = bank[rows], and that row left out
    of anchor i's sum over the bank (the op's ``excluded``), so that the target's logit enters once, as the
    positive: the loss is softplus(lse_others - l_t), never below 0, and the target's gradient coefficient is
    expm1(-loss) (see the op's schema). Counted in the bank as well and subtracted, the loss carried the rounding
    of both forms of l_t (it came out -3e-5 at logits ~100) and the target row's gradient was a difference of
    two terms of size g s |a| (float32: 30x torch's error for a confident classifier). The scale is scale_tensor
    (a detached 0-d tensor, see _scale_of) where given, else the float scale.

    Through autograd, ``bank[rows]`` would hand the bank a second dense (C, d) gradient (its backward scatters
    into zeros) for the engine to add to the op's: at C = 2^22, d = 128 in float32 that is 2 GiB on top of the
    gradient itself. Here backward adds the positives' (B, d) gradient into the op's fresh bank gradient in
    place instead.

    smoothing eps > 0 (label smoothing): the loss is CE + eps (l_t - l_m), l_t = s a_hat . b_hat_t and l_m = s
    a_hat . m the mean logit through the bank's mean row m (of its normalised rows with normalize), formed from the
    features. The target's coefficient g (w_t - 1 + eps) is formed by the kernels as g expm1(-L') with L' =
    -log1p(expm1(-CE) + eps): one coefficient, rounded once, where eps l_t's gradient taken apart (g eps s b_hat_t,
    g eps s a_hat_i) and added to the op's after both were rounded to a half input's type nearly cancelled the
    kernel's (w_t - 1) part (a bfloat16 bank's target rows: 0.47 relative error at eps = 1, T = 1 against naive
    bfloat16's 0.11). l_m's gradient is added into the kernels' in place (_add_mean_row_gradient): through autograd
    it was a second (C, d) gradient, and through F.normalize more (C, d) buffers (2652 MiB beyond the inputs
    against 614 without smoothing at C = 2^21, d = 64 float32).

    Returns (loss, lse, V, L', m): lse and V as the forward op's, L' (the CE where eps = 0) the loss that
    backward's kernels and the temperature's gradient take, m the mean row ((0,) where eps = 0); lse, V, L' and m
    are not differentiable.
    """
    # A direct call of the op named the inner op's arguments (excluded, positives) or none (an op audit)
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64 or rows.dim() != 1 or \
            rows.shape[0] != anchors.shape[0] or rows.device != anchors.device:
        got = (f"{rows.dtype} of shape {tuple(rows.shape)} on {rows.device}" if isinstance(rows, torch.Tensor)
               else type(rows).__name__)
        raise ValueError(f"bank_rows_fwd: rows (the targets) must be int64 of shape (B,) = ({anchors.shape[0]},) on "
                         f"{anchors.device}, got {got}")
    if bank.dim() != 2 or anchors.dim() != 2 or bank.shape[1] != anchors.shape[1]:
        raise ValueError(f"bank_rows_fwd: anchors (B, d) and bank (C, d) must be 2-d with the same d, got "
                         f"{tuple(anchors.shape)} and {tuple(bank.shape)}")
    if rows.device.type == "cpu" and rows.numel() and not isinstance(rows, FakeTensor):
        # Under torch.compile the caller's range check is an op in the graph, which may run after this one (it
        # did with ignore_index: index_select's "index out of range in self" named nothing). On the CPU the check
        # costs no sync; on CUDA index_select's device assert stands, as for torch's own indexing.
        lo, hi = (int(v) for v in torch.aminmax(rows))
        if lo < 0 or hi >= bank.shape[0]:
            raise IndexError(f"targets must lie in [0, C) = [0, {bank.shape[0]}), got values in [{lo}, {hi}]")
    positives = bank.index_select(0, rows)
    loss, lse, term = _fwd_op(anchors, positives, bank, None, scale if scale_tensor is None else scale_tensor,
                              normalize, True, save_anchor_term, False, rows)
    if not smoothing:  # (outputs may not alias one another)
        return loss, lse, term, loss.clone(), loss.new_empty(0)
    if not 0.0 < smoothing <= 1.0:
        raise ValueError(f"bank_rows_fwd: smoothing must lie in [0, 1], got {smoothing}")
    a, p = anchors.to(loss.dtype), positives.to(loss.dtype)
    if normalize:
        a, p = F.normalize(a, dim=-1, eps=1e-12), F.normalize(p, dim=-1, eps=1e-12)
    mean = _mean_row(bank, normalize, loss.dtype)
    s = scale if scale_tensor is None else scale_tensor.to(loss.dtype)
    smoothed = loss + smoothing * ((a * (p - mean)).sum(-1) * s)
    return smoothed, lse, term, -torch.log1p(torch.expm1(-loss) + smoothing), mean


def _mean_row(bank: torch.Tensor, normalize: bool, acc: torch.dtype) -> torch.Tensor:
    """mean_c b_c, or with normalize mean_c b_c / max(|b_c|, 1e-12) (F.normalize's rows), (d,) in acc.

    With normalize the rows are scaled and summed by torch's reduction (pairwise on the CPU, a tree on a GPU) a
    chunk of at most 2^22 values at a time (no (C, d) temporary), the chunks' sums added in float64. The product
    b^T (1 / |b|) this was summed along C in float32 as the BLAS does, with a relative error growing with C: 7e-3
    at C = 2^20 equal rows, which moved label smoothing's loss by 2e-3 at C = 2^18 (a differential fuzz's find)."""
    if not normalize:
        return bank.sum(0, dtype=acc) / bank.shape[0]
    wide = _wide_dtype(acc, bank.device)
    total = None
    for rows in _row_chunks(bank, acc, every_dtype=True):
        b = bank[rows].to(acc)
        part = (b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp_min(1e-12)).sum(0).to(wide)
        total = part if total is None else total + part
    return (total / bank.shape[0]).to(acc)


def _wide_dtype(acc: torch.dtype, device: torch.device) -> torch.dtype:
    """float64 for sums whose float32 rounding would grow with their length (none on Apple's MPS: acc there)."""
    return acc if device.type == "mps" else torch.float64


def _row_chunks(bank: torch.Tensor, acc: torch.dtype, budget: int = 1 << 22, every_dtype: bool = False) -> list[slice]:
    """Row slices of the bank, each at most `budget` values where it is not in acc (a half bank's rows are widened a
    chunk at a time, not as one (C, d) copy) or with every_dtype; one slice for a bank in acc, or while tracing (no
    loop over a symbolic size)."""
    C = bank.shape[0]
    if (bank.dtype == acc and not every_dtype) or _fake_mode_active() or torch.compiler.is_compiling():
        return [slice(0, C)]
    step = max(1, budget // max(1, bank.shape[1]))
    return [slice(c0, min(C, c0 + step)) for c0 in range(0, C, step)]


def _add_mean_row_gradient(ga, gn, anchors, bank, mean, grad_loss, scale, normalize: bool, smoothing: float):
    """Label smoothing's -eps l_m, l_m = s a_hat . m (m: _mean_row), differentiated in place into the kernel's
    gradients: ga (or None) gets -eps s g_i J_a(m) (rounded once with the kernel's part), gn (or None)
    -(eps s / C) J_c(u), u = sum_i g_i a_hat_i, added row by row in place: no second (C, d) gradient (J: F.normalize's
    Jacobian (I - n n^T) / |x|, I / 1e-12 where the norm was clamped, or I without normalize). Returns ga."""
    acc = mean.dtype
    g = grad_loss.to(acc)
    s = scale.to(acc) if isinstance(scale, torch.Tensor) else scale
    a = anchors.detach().to(acc)
    if normalize:
        a_norm = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
        a_clamped = a_norm.clamp_min(1e-12)
        a = a / a_clamped
    if ga is not None:
        extra = mean.expand_as(a)
        if normalize:  # (m - (a_hat . m) a_hat) / |a|
            radial = (a * mean).sum(-1, keepdim=True) * (a_norm >= 1e-12)
            extra = (extra - radial * a) / a_clamped
        ga = (ga.to(acc) - (smoothing * s) * g[:, None] * extra).to(ga.dtype)
    if gn is not None:
        u = (g[:, None] * a).sum(0) * (-smoothing * s / bank.shape[0])
        if normalize:  # (u - (n . u) n) / |b| = u / |b| - (b . u) b / |b|^3, added in place, |b|^3 not formed
            for rows in _row_chunks(bank, acc):
                b = bank.detach()[rows]
                b_acc = b.to(acc)
                norm = torch.linalg.vector_norm(b_acc, dim=-1)
                clamped = norm.clamp_min(1e-12)
                radial = torch.where(norm >= 1e-12, (b_acc @ u) / clamped / clamped, 0.0)  # (b . u) / |b|^2
                inv = 1.0 / clamped
                part = gn[rows]  # (a view: the adds go into gn)
                if b_acc is b:  # (in place: no (C, d) temporary)
                    part.addcmul_(b, -(radial * inv)[:, None])
                    part.addcmul_(inv[:, None], u[None, :])
                else:  # a half bank's widened chunk, reused (mixed-type addcmul_ took twice the time)
                    # (under vmap, a batched backward (is_grads_batched, jacobian(vectorize=True)), radial is
                    # batched and b_acc is not: an in-place product of the two is refused, a new one is not)
                    scaled = b_acc * -radial[:, None] if _func_active() or _batched(u) else b_acc.mul_(-radial[:, None])
                    part.add_(scaled.add_(u).mul_(inv[:, None]))
        else:
            gn.add_(u)
    return ga


_bank_rows_fwd = torch.library.custom_op("contrastbound::bank_rows_fwd", mutates_args=())(_bank_rows_impl)
# The same body as its fake kernel: on fake tensors index_select and the forward op's fake give the shapes.
_bank_rows_fwd.register_fake(_bank_rows_impl)


def _bank_rows_setup(ctx, inputs, output):
    anchors, bank, rows, scale_tensor, scale, normalize, _, smoothing = inputs
    _, lse, term, loss_bwd, mean = output
    # L', not the loss: the returned loss may be modified in place before backward (see _ops._setup_context), and
    # with smoothing backward's target coefficient is expm1(-L')
    ctx.save_for_backward(*map(_ops.savable, (anchors, bank, rows)), lse, term, loss_bwd, mean,
                          *(() if scale_tensor is None else (_ops.savable(scale_tensor),)))
    ctx.scale = scale
    ctx.normalize = normalize
    ctx.smoothing = smoothing
    ctx.mark_non_differentiable(lse, term, loss_bwd, mean)


def _bank_rows_backward(ctx, grad_loss, grad_lse, grad_term, grad_loss_bwd, grad_mean):
    _ops.refuse_double_backward()
    anchors, bank, rows, lse, term, loss, mean, *tensor_scale = ctx.saved_tensors  # (loss: L', see _bank_rows_impl)
    need_a, need_bank = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    if not (need_a or need_bank):
        return None, None, None, None, None, None, None, None
    scale = tensor_scale[0] if tensor_scale else ctx.scale
    # float16 / bfloat16: a target row's gradient is recomputed in float32 (below), so the op need not form
    # the positives' gradient.
    half = bank.dtype in (torch.float16, torch.bfloat16)
    ga, gp, gn = _bwd_op(
        grad_loss.contiguous(), anchors, bank.index_select(0, rows), bank, None, lse, term, scale,
        ctx.normalize, True, [need_a, need_bank and not half, need_bank], False, False, loss, rows,
    )
    if need_bank:
        if half:
            targets, grad_rows = _target_rows_gradient(anchors, bank, rows, lse, loss, grad_loss, scale,
                                                       ctx.normalize)
            gn.index_copy_(0, targets, grad_rows.to(gn.dtype))
        elif gn.device.type == "cpu":
            gn.index_add_(0, rows, gp)  # gn is the op's own new tensor; serial on the CPU: a fixed order
        else:
            # index_add_ adds with atomics on a GPU (a target hit by several anchors: other bits each run);
            # index_put_'s accumulation sorts the indices first and adds each row's terms in order.
            gn.index_put_((rows,), gp, accumulate=True)
    if ctx.smoothing:
        ga = _add_mean_row_gradient(ga if need_a else None, gn if need_bank else None, anchors, bank, mean,
                                    grad_loss, scale, ctx.normalize, ctx.smoothing)
    return (ga if need_a else None), (gn if need_bank else None), None, None, None, None, None, None


_bank_rows_fwd.register_autograd(_ops.without_autocast(_bank_rows_backward),
                                 setup_context=_bank_rows_setup)
_ops.register_bank_rows_flops()  # (FlopCounterMode)


def _fake_mode_active() -> bool:
    """Whether a fake-tensor mode is active (tracing: a custom op's backward traced by torch.compile, where torch
    2.5's torch.compiler.is_compiling() is False and the saved tensors are functional wrappers of fake ones)."""
    try:
        from torch._guards import detect_fake_mode
    except ImportError:  # pragma: no cover
        return False
    return detect_fake_mode() is not None


def _target_rows_gradient(anchors, bank, rows, lse, loss, grad_loss, scale, normalize, budget=1 << 22):
    """(target rows T, the loss's gradient for them in float32), for half-precision banks: T the distinct targets
    (CPU, eager) or all B of them, sorted (a GPU or a graph; repeats carry equal rows).

    A target row's gradient from anchor i is g_i s (w_it - 1) a_hat_i: the op forms it as a bank part
    g s w a_hat and a positive part -g s a_hat, each rounded to the input type before they are added, which leaves
    bfloat16 noise of size s |a| where a confident prediction's true gradient (w -> 1) vanishes (2.2 of the bank
    gradient's norm at temperature 0.05 in a test, where torch's own bfloat16 autograd is off by 0.54). Here every
    anchor's term for the rows of T is formed with the coefficient g (w - [t_i = c]) in float32 (B x |T| logits,
    in chunks of `budget`; w - 1 = expm1(-loss_i) for the anchor's own target, as the op forms it), through the
    normalisation's Jacobian, and rounded once."""
    acc = loss.dtype
    if torch.compiler.is_compiling() or _fake_mode_active() or rows.device.type != "cpu":
        # No data-dependent sizes in a graph (nor a device read-back on a GPU, which torch.unique's size would be):
        # every anchor's target, sorted; repeats computed again, then given the first one's result, so that
        # index_copy_ writes the same bits for all of them (in any order).
        targets = torch.sort(rows).values
        first = torch.ones_like(targets, dtype=torch.bool)
        first[1:] = targets[1:] != targets[:-1]
        positions = torch.arange(targets.numel(), device=targets.device)
        first_of = torch.where(first, positions, 0).cummax(0).values
    else:
        targets, first_of = torch.unique(rows), None
    a = anchors.detach().to(acc)
    if normalize:
        a = F.normalize(a, dim=-1, eps=1e-12)
    s = scale.to(acc) if isinstance(scale, torch.Tensor) else scale
    g = grad_loss.to(acc)  # (backward runs without a graph; no detach: vmap, is_grads_batched, has no rule for it)
    # the CPU op's lse is float64: as hi + res in acc (res 0 for an lse in acc), so that e^{l - lse} is not off by
    # lse's own rounding besides l's. l itself comes from a product over the |T| rows, which may round otherwise than
    # forward's tiles (with another number of rows the BLAS may sum in another order): ~eps |l| in each weight, a row's
    # weights summing to 1 +- 12 % at |l| ~ 5e5 (docs/LIMITS.md)
    lse_hi = lse.detach().to(acc)
    wide = lse.detach().to(torch.float64)
    lse_res = torch.where(torch.isfinite(wide), wide - lse_hi.to(torch.float64), 0.0).to(acc)  # (no inf - inf)
    # (chunks joined at the end, not written into a buffer: under vmap, is_grads_batched, g is batched and a
    # buffer is not; the rows are at most B x d)
    out = [torch.empty(0, bank.shape[1], dtype=acc, device=bank.device)]
    step = max(1, budget // max(1, anchors.shape[0]))
    for c0 in range(0, targets.numel(), step):
        t = targets[c0 : c0 + step]
        n = bank.detach().index_select(0, t).to(acc)
        if normalize:  # F.normalize's: n / max(|n|, eps), and its Jacobian
            norm = n.norm(dim=-1, keepdim=True)
            inv = 1.0 / norm.clamp_min(1e-12)
            n = n * inv
        own = rows[:, None] == t[None, :]
        coef = torch.where(own, torch.expm1(-loss.detach())[:, None],
                           torch.exp((a @ n.T) * s - lse_hi[:, None] - lse_res[:, None]))
        grad = (coef * g[:, None]).T @ a * s  # dL/dn_hat
        if normalize:  # inv (G - (n_hat . G) n_hat), no projection where the norm was clamped
            radial = (n * grad).sum(-1, keepdim=True) * (norm >= 1e-12)
            grad = inv * (grad - radial * n)
        out.append(grad)
    out = torch.cat(out)
    return targets, (out if first_of is None else out.index_select(0, first_of))


def _check_features(
    anchors: object, positives: object, names: tuple[str, str] = ("anchors", "positives")
) -> tuple[torch.Tensor, torch.Tensor]:
    first, second = names
    anchors = _check_tensor(first, anchors, 2, "(B, d)")
    positives = _check_tensor(second, positives, 2, "(B, d)")
    _check_device(second, positives, first, anchors)
    if positives.shape != anchors.shape:
        raise ValueError(
            f"{second} must have the shape of {first} (B, d) = {tuple(anchors.shape)}, got {tuple(positives.shape)}"
        )
    return anchors, positives


def _check_negative_mask(negative_mask: object, anchors: torch.Tensor, K: int, shape_doc: str) -> torch.Tensor:
    """negative_mask: a bool tensor of shape (B, K) on the anchors' device (True: the negative counts)."""
    B = anchors.shape[0]
    if not isinstance(negative_mask, torch.Tensor):
        raise TypeError(f"negative_mask must be a bool tensor of shape {shape_doc} = {(B, K)}, got "
                        f"{type(negative_mask).__name__}")
    _check_dense("negative_mask", negative_mask)
    if negative_mask.dtype != torch.bool:
        raise TypeError(f"negative_mask must be a bool tensor of shape {shape_doc} (True: the negative counts), got "
                        f"dtype {negative_mask.dtype}")
    if negative_mask.device != anchors.device:
        raise ValueError(f"negative_mask is on {negative_mask.device} but the features are on {anchors.device}")
    if tuple(negative_mask.shape) != (B, K):
        raise ValueError(f"negative_mask must have shape {shape_doc} = {(B, K)}, got {tuple(negative_mask.shape)}")
    return negative_mask


def _masked_indices(negative_mask: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """indices (B, K) with -1 (padding: the kernels' "no negative here") where negative_mask is False."""
    return torch.where(negative_mask, indices, torch.full((), -1, dtype=indices.dtype, device=indices.device))


def _in_batch_count(negative_mask: torch.Tensor) -> torch.Tensor:
    """(B,) in-batch negatives each anchor keeps: j != i where negative_mask[i, j] holds (the diagonal is the
    positive, counted apart)."""
    return negative_mask.sum(1) - negative_mask.diagonal().to(torch.int64)


def _check_label_tensor(name: str, x: object, shape: tuple[int, ...], shape_doc: str,
                        device: torch.device) -> torch.Tensor:
    """An integer tensor of the given shape on the features' device, as int64 (equal values: the same class)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor of shape {shape_doc} = {shape}, got {type(x).__name__}")
    _check_dense(name, x)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:  # (as supcon_loss's labels)
        raise TypeError(f"{name} must be an integer tensor of shape {shape_doc}, got dtype {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the features are on {device}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape_doc} = {shape}, got {tuple(x.shape)}")
    return x.to(torch.int64)


def _labels_as_exclusion(
    anchors: torch.Tensor, negatives: object, negative_indices: object, negative_mask: object, labels: object,
    negative_labels: object,
) -> tuple[object, object, tuple[torch.Tensor, torch.Tensor] | None]:
    """(negative_indices, negative_mask, label pair): the negatives that share the anchor's label left out. A shared
    bank and in-batch negatives keep the labels as they are, (B,) and (K,) int64, for the kernels' tiles (O(B + K)
    where the equivalent mask is B K bytes); per-anchor labels (B, K) become a mask, and a bank's labels (M,) under
    negative_indices become padding (-1) where a kept index names a row of the anchor's label."""
    if labels is None and negative_labels is None:
        return negative_indices, negative_mask, None
    B = anchors.shape[0]
    if labels is None:
        raise ValueError("negative_labels was given without labels: pass the anchors' labels (B,) as labels")
    labels = _check_label_tensor("labels", labels, (B,), "(B,)", anchors.device)
    if negatives is None:  # in-batch: the negatives are the positives, whose labels are the anchors'
        if negative_labels is not None:
            raise ValueError("in-batch negatives are the positives, whose labels are labels: pass labels only "
                             "(negative_labels=None)")
        return negative_indices, negative_mask, (labels, labels)
    if negative_labels is None:
        raise ValueError("labels was given without negative_labels: pass the negatives' labels as well ((K,) for a "
                         "shared bank, (B, K) for per-anchor negatives, (M,) for the bank of negative_indices)")
    if not isinstance(negatives, torch.Tensor) or negatives.dim() not in (2, 3):
        return negative_indices, negative_mask, None  # (_check_negatives names what is wrong with negatives)
    if negative_indices is not None:
        if not isinstance(negative_indices, torch.Tensor) or negative_indices.dim() != 2 or negatives.dim() != 2:
            return negative_indices, negative_mask, None  # (named by _check_negatives)
        M, K = negatives.shape[0], negative_indices.shape[1]
        bank_labels = _check_label_tensor("negative_labels", negative_labels, (M,), "(M,), the rows of negatives",
                                          anchors.device)
        if negative_mask is not None:
            negative_mask = _check_negative_mask(negative_mask, anchors, K, "(B, K), the shape of negative_indices")
            negative_indices = _check_indices("negative_indices", negative_indices, (B, K), "(B, K)", M, "M",
                                              anchors.device, check_range=False)
            negative_indices = _masked_indices(negative_mask, negative_indices)
        negative_indices = _check_indices("negative_indices", negative_indices, (B, K), "(B, K)", M, "M",
                                          anchors.device, check_range=False)
        if M == 0:
            return negative_indices, None, None
        # gathered within range; an entry out of it is left as it is, for the range check after (the op's own: one
        # read-back, as without labels)
        named = bank_labels[negative_indices.clamp(0, M - 1).to(torch.int64)]
        same = (named == labels[:, None]) & (negative_indices >= 0) & (negative_indices < M)
        return _masked_indices(~same, negative_indices), None, None
    if negatives.dim() == 3:
        if negatives.shape[0] != B:
            return negative_indices, negative_mask, None  # (named by _check_negatives)
        K = negatives.shape[1]
        per_anchor = _check_label_tensor("negative_labels", negative_labels, (B, K), "(B, K) for negatives (B, K, d)",
                                         anchors.device)
        keep = per_anchor != labels[:, None]
        if negative_mask is not None:
            keep = keep & _check_negative_mask(negative_mask, anchors, K, "(B, K) for negatives (B, K, d)")
        return negative_indices, keep, None
    K = negatives.shape[0]
    bank_labels = _check_label_tensor("negative_labels", negative_labels, (K,), "(K,) for a shared bank (K, d)",
                                      anchors.device)
    return negative_indices, negative_mask, (labels, bank_labels)


def _check_negatives(
    anchors: torch.Tensor, negatives: object, negative_indices: object, negative_mask: object = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(negatives, negative_indices, negative_mask) checked. A mask stays a mask for a shared bank (K, d) and
    in-batch (B, B) (the kernels' tiles apply it); with per-anchor negatives (B, K, d) or indices it becomes the
    indexed mode, -1 (padding) where it is False: the (B, K, d) negatives as a (B K, d) bank."""
    B, d = anchors.shape
    if negatives is None:
        if negative_indices is not None:
            raise ValueError("negative_indices was given without negatives: pass the bank (M, d) as negatives")
        if negative_mask is not None:
            negative_mask = _check_negative_mask(negative_mask, anchors, B, "(B, B) for in-batch negatives")
        return None, None, negative_mask
    if negative_indices is not None:
        negatives = _check_tensor("negatives", negatives, 2, "(M, d) when negative_indices is given")
    else:
        negatives = _check_tensor("negatives", negatives, (2, 3), "(K, d) or (B, K, d)")
    _check_device("negatives", negatives, "anchors", anchors)
    if negatives.shape[-1] != d:
        raise ValueError(f"negatives must have feature size d = {d} in its last dimension, got shape {tuple(negatives.shape)}")
    if negatives.dim() == 3 and negatives.shape[0] != B:
        raise ValueError(f"negatives of shape (B, K, d) must have B = {B} rows, got shape {tuple(negatives.shape)}")
    if negative_indices is not None:
        if not isinstance(negative_indices, torch.Tensor) or negative_indices.dim() != 2:
            shape = tuple(negative_indices.shape) if isinstance(negative_indices, torch.Tensor) else None
            if shape is None:
                raise TypeError(
                    f"negative_indices must be an int64 (or int32) tensor of shape (B, K), got "
                    f"{type(negative_indices).__name__}")
            raise ValueError(f"negative_indices must have shape (B, K) with B = {B}, got {shape}")
        K = negative_indices.shape[1]
        if negative_mask is not None:
            negative_mask = _check_negative_mask(negative_mask, anchors, K, "(B, K), the shape of negative_indices")
            negative_indices = _check_indices("negative_indices", negative_indices, (B, K), "(B, K)",
                                              negatives.shape[0], "M", anchors.device, check_range=False)
            # (the masked-out entries may hold anything: only the kept ones are range-checked, below)
            negative_indices = _masked_indices(negative_mask, negative_indices)
        # The compiled op checks the range itself (IndexError, one read-back): checking here as well would read
        # the indices back twice (two device synchronisations per call on a GPU).
        negative_indices = _check_indices(
            "negative_indices", negative_indices, (B, K), "(B, K)", negatives.shape[0], "M", anchors.device,
            check_range=not _backend.kernel_serves(anchors.device) or _needs_reference(anchors, negatives),
            padding=True,
        )
        return negatives, negative_indices, None
    if negative_mask is not None:
        K = negatives.shape[-2]
        what = "(B, K) for a shared bank (K, d)" if negatives.dim() == 2 else "(B, K) for negatives (B, K, d)"
        negative_mask = _check_negative_mask(negative_mask, anchors, K, what)
        if negatives.dim() == 3:  # per-anchor: the flattened (B K, d) bank, anchor i's rows i K ... i K + K - 1
            columns = torch.arange(B * K, device=anchors.device).view(B, K)
            return negatives.reshape(B * K, d), _masked_indices(negative_mask, columns), None
    return negatives, None, negative_mask


def _common_dtypes(big: torch.Tensor, *small: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype, result dtype) for mixed inputs with a bank, as under autocast (bf16 activations, a float32
    queue).

    The kernel runs in the dtype of the bank, so that it is never copied; the small (B, d) tensors are cast to it
    (the cast is differentiable, and may round down: float32 features against a bfloat16 bank run in bfloat16).
    The result has the promoted dtype of all inputs. Without a bank (in-batch, NT-Xent, CLIP) every input is
    small: see _promoted.
    """
    result = big.dtype
    for x in small:
        result = torch.promote_types(result, x.dtype)
    return big.dtype, result


def _to_bank_dtype(x: torch.Tensor, dtype: torch.dtype, normalize: bool) -> torch.Tensor:
    """x (B, d) cast to the bank's dtype. Where that rounds down (float32 features, a float16 bank) and the rows are
    normalised anyway, they are normalised first, in x's dtype (float32 for half x): a row with entries past
    float16's range (65504) would otherwise become inf (a NaN loss), one below 6e-8 zero. Differentiable; the
    kernel's own normalisation of a unit row changes it only by rounding.

    A zero row is passed through as it is (value 0, gradient unchanged): the kernel's normalisation then gives it
    its own gradient, 1 / eps as F.normalize's. Normalised here as well, the two 1 / eps multiplied to 1 / eps^2
    (a zero anchor's gradient 1.4e24 where the reference has 1.4e12), and float16 features gave a NaN loss (F.normalize
    of a float16 zero row is 0 / 0: its eps rounds to 0)."""
    if x.dtype == dtype:
        return x
    if normalize and torch.promote_types(x.dtype, dtype) != dtype:
        nonzero = (x != 0).any(dim=-1, keepdim=True)
        # Half rows (float16 features, a bfloat16 bank) are normalised in float32: in float16, a row of subnormal
        # norm made F.normalize's backward g / |x| overflow and its projection inf - inf, a NaN gradient where the
        # true one is ~0 (a differential fuzz's case; F.normalize of the float16 tensor alone gives that NaN too).
        wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        # (zero rows out of F.normalize's way as well: in float16 its eps, 1e-12, is 0, and 0 / 0 there would reach
        # the gradient through the unused branch of the outer where, NaN times 0)
        unit = F.normalize(torch.where(nonzero, wide, torch.ones_like(wide)), dim=-1, eps=1e-12)
        x = torch.where(nonzero, unit, x)
    return x.to(dtype)


def _promoted(*xs: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype, result dtype) when every input is (B, d)-sized (in-batch, NT-Xent, CLIP): no copy is worth
    avoiding, so they run in their promoted dtype, as torch's ops would (nothing rounded down; float32 features
    above float16's range do not overflow), and the in-batch entry points agree on the same inputs."""
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype, dtype


def info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 0.1,
    *,
    negative_indices: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    negative_labels: torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    decoupled: bool = False,
    process_group=None,
) -> torch.Tensor:
    r"""Fused InfoNCE loss that never materialises the (B, K) logits.

    ``loss_i = logsumexp(s a_i.p_i, s a_i.n_i1, ..., s a_i.n_iK) - s a_i.p_i`` with ``s = 1 / temperature``:
    the positive is in the denominator. With ``decoupled=True`` it is not (the decoupled contrastive loss of
    Yeh et al. 2022, DCL): ``loss_i = logsumexp(s a_i.n_i1, ..., s a_i.n_iK) - s a_i.p_i``.

    Args:
        anchors: (B, d) anchor features.
        positives: (B, d) positive features, row i is anchor i's positive.
        negatives: the negatives, one of
            * (K, d): one bank shared by every anchor (a MoCo queue);
            * (B, K, d): anchor i's own K negatives;
            * (M, d) with ``negative_indices`` (B, K) int64 (or int32): anchor i's negatives are the rows
              ``negatives[negative_indices[i]]`` (repeats count as repeated negatives; no (B, K, d) copy);
            * None: in-batch, anchor i's negatives are the other anchors' positives (logits s A P^T, target i).
        negative_indices: (B, K) int64 (or int32) rows of ``negatives``, see above. An entry of -1 is padding:
            no negative there (a variable number of negatives per anchor; faiss's -1 for a missing neighbour). An
            anchor whose entries are all -1 has no negatives: loss 0.
        negative_mask: (B, K) bool, True where the negative counts (False: left out of anchor i's sum, as
            padding; its gradient is 0): for a shared bank (K, d) (say the queue rows of the anchor's own class),
            per-anchor negatives (B, K, d), or ``negative_indices``; in-batch, (B, B), where entry (i, i), the
            positive, always counts. A shared bank's and an in-batch mask go to the kernels (CPU: inside the GEMM
            tiles; CUDA: inside the tensor-core tiles, or the SIMT ones for float32 without TF32 and float64);
            per-anchor and indexed negatives take -1 where it is False (a (B, K) int64 tensor; per-anchor
            negatives read as a (B K, d) bank: a view, or a copy where their layout has none, an expanded or
            permuted tensor).
        labels, negative_labels: integer class labels: a negative whose label equals its anchor's is left out of
            that anchor's sum, as negative_mask leaves it out (false negatives of the anchor's own class; the
            positive always counts). ``labels`` (B,), the anchors'; ``negative_labels``: (K,) for a shared bank,
            (B, K) for per-anchor negatives, (M,) for the bank of ``negative_indices``, None in-batch (the
            negatives are the positives, labelled ``labels``). A shared bank's and in-batch labels go to the
            kernels' tiles as they are (O(B + K) memory, where the same mask is B K bytes); the other modes turn
            them into a mask / padding. Together with ``negative_mask``, a negative counts where both keep it.
        temperature: positive finite number, or a scalar tensor; one that requires grad is learnable and gets
            its exact gradient.
        normalize: L2-normalise anchors, positives and negatives first (gradients flow through it; fused,
            no normalised copy of the bank is made).
        reduction: "mean", "sum" or "none" (per-anchor losses, shape (B,)).
        decoupled: leave the positive out of the denominator (DCL). The loss may then be negative, and an anchor
            left without negatives (every entry masked, padded or of its own label) has loss -inf; sizes that
            leave every anchor without one (K = 0, or a single anchor in-batch) raise.
        process_group: a torch.distributed group (``torch.distributed.group.WORLD``, or ``"world"`` for it). With
            ``negatives`` (K_r, d),
            a shared bank sharded over the ranks: the loss is this rank's anchors against the whole bank (see
            :func:`contrastbound.distributed.info_nce_sharded`); with ``labels`` (B_r,) and ``negative_labels``
            (K_r,), this shard's rows' labels, every rank's rows of the anchor's label are left out. With
            ``negatives=None``, in-batch over the global batch: anchor i's negatives are every rank's positives
            except its own (gathered, B_total x d); the loss is over this rank's anchors, and gradients follow the
            all_gather_with_grad convention (each rank's positives get the sum over ranks' losses); ``labels`` are
            gathered with them (every rank's positives of the anchor's label left out). No masks or indices with
            a group.

    Returns:
        The loss in the dtype of the inputs (float16/bfloat16 inputs are accumulated in float32). Mixed floating
        dtypes (e.g. bfloat16 activations under autocast with a float32 queue) are allowed: the kernel runs in
        the dtype of the negatives, so the bank is never copied, and the loss has the promoted dtype (float32
        features against a bfloat16/float16 bank therefore run in the bank's precision; with ``normalize`` they
        are normalised before that cast, so no entry overflows float16). In-batch (no bank) the promoted dtype.
        With K = 0 negatives the loss is 0.
    """
    process_group = _function_group(process_group)
    given = [name for name, x in (("negative_indices", negative_indices), ("negative_mask", negative_mask),
                                   ("labels", labels), ("negative_labels", negative_labels)) if x is not None]
    if process_group is not None and negatives is None and given == ["labels"]:  # in-batch over the global batch
        return _info_nce_global_batch(anchors, positives, temperature, normalize, reduction, process_group,
                                      labels=labels, decoupled=decoupled)
    if process_group is not None and negatives is not None and given and set(given) <= {"labels", "negative_labels"}:
        from .distributed import info_nce_sharded  # a bank shard with its rows' labels (both checked there)

        return info_nce_sharded(anchors, positives, negatives, process_group=process_group, temperature=temperature,
                                normalize=normalize, reduction=reduction, labels=labels,
                                negative_labels=negative_labels, decoupled=decoupled)
    if process_group is not None and given:
        with _refusals_joined(process_group, anchors):  # (a refusal on some ranks only: every rank raises)
            if negatives is None and negative_indices is not None:
                raise ValueError("negative_indices was given without negatives: pass the bank (M, d) as negatives")
            if negatives is None and given in (["negative_labels"], ["labels", "negative_labels"]):
                raise ValueError("in-batch negatives are the positives, whose labels are labels: pass labels only "
                                 "(negative_labels=None)")
            named = [x for x in given if x not in ("labels", "negative_labels")]  # (never empty here)
            with_labels = [x for x in given if x in ("labels", "negative_labels")]
            raise ValueError(
                "process_group takes negatives as this rank's shard (K_r, d) of a shared bank (with labels and "
                "negative_labels) or None for in-batch negatives over the global batch (with labels), not "
                + named[0] + (f" (with {' and '.join(with_labels)})" if with_labels else "")
            )
    if process_group is not None and negatives is None:
        return _info_nce_global_batch(anchors, positives, temperature, normalize, reduction, process_group,
                                      decoupled=decoupled)
    if process_group is not None:
        from .distributed import info_nce_sharded

        return info_nce_sharded(anchors, positives, negatives, process_group=process_group, temperature=temperature,
                                normalize=normalize, reduction=reduction, decoupled=decoupled)
    anchors, positives = _check_features(anchors, positives)
    negative_indices, negative_mask, pair = _labels_as_exclusion(anchors, negatives, negative_indices, negative_mask,
                                                                 labels, negative_labels)
    negatives, negative_indices, negative_mask = _check_negatives(anchors, negatives, negative_indices, negative_mask)
    t = _check_temperature(temperature)
    normalize = _check_bool("normalize", normalize)
    reduction = _check_reduction(reduction)
    # (with process_group the paths above check it, inside their refusal guards: a lone refusal there reaches
    # every rank)
    decoupled = _check_bool("decoupled", decoupled)
    if decoupled:
        _check_some_negatives(anchors, negatives, negative_indices)
    if negatives is None:
        compute, result = _promoted(anchors, positives)
        a, p = anchors.to(compute), positives.to(compute)
        # The diagonal out of the bank and counted once as the positive (as in info_nce_lse): the same sum, with
        # e^{l_ii} and its gradient coefficient computed in float32 rather than inside the tensor-core tiles.
        # (decoupled: the diagonal simply left out, the positive not counted.)
        loss, _ = _fused(a, p, p, None, t, normalize, not decoupled, exclude_self=True, negative_mask=negative_mask,
                         labels=pair)
    else:
        compute, result = _common_dtypes(negatives, anchors, positives)
        a, p = _to_bank_dtype(anchors, compute, normalize), _to_bank_dtype(positives, compute, normalize)
        loss, _ = _fused(a, p, negatives, negative_indices, t, normalize, not decoupled, negative_mask=negative_mask,
                         labels=pair)
    return _reduce(loss, reduction, result)


def _check_some_negatives(anchors: torch.Tensor, negatives: torch.Tensor | None,
                          negative_indices: torch.Tensor | None) -> None:
    """decoupled=True: the sizes must leave each anchor a negative (its loss is log of its negatives' sum)."""
    if negatives is None:
        count, what = anchors.shape[0] - 1, f"in-batch with B = {anchors.shape[0]} anchor"
    elif negative_indices is not None:
        count, what = negative_indices.shape[1], f"negative_indices of shape {tuple(negative_indices.shape)}"
    else:
        count, what = negatives.shape[-2], f"negatives of shape {tuple(negatives.shape)}"
    if count == 0 and anchors.shape[0] > 0:  # (no anchors: an empty loss, as without decoupled)
        raise ValueError(f"decoupled=True leaves the positive out of the denominator, so each anchor needs at least "
                         f"one negative (its loss would be -inf), but {what} gives none")


def info_nce_lse(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 0.1,
    *,
    negative_indices: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    negative_labels: torch.Tensor | None = None,
    normalize: bool = True,
    include_positive: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor (loss, log-sum-exp) of :func:`info_nce`, both (B,) in the accumulation type of the computation:
    float64 where it runs in float64 (a float64 bank, or float64 inputs without one), else float32. (Mixed dtypes
    run in the bank's dtype, as in :func:`info_nce`, which then casts its reduced loss to the promoted dtype.)

    ``lse_i = log([include_positive] e^{s a_i.p_i} + sum_k e^{s a_i.n_ik})`` and ``loss_i = lse_i - s a_i.p_i``.
    With ``include_positive=False`` the positive is left out of the sum, so log-sum-exps over disjoint sets of
    negatives can be combined with :func:`torch.logaddexp` (how :func:`contrastive_loss_curve` reads a whole
    curve over K from one pass). Both are differentiable: ``lse`` has the values the kernel computed and the
    gradient of the log-sum-exp, formed by its own backward (so a loss assembled from combined lse's trains every
    part of it; formed as the gradient of ``loss + s a_i.p_i`` its two parts cancelled, in half precision to
    errors larger than the gradient); with ``include_positive=False`` that gradient reaches the positives only
    through their use as negatives (in-batch), exactly 0 otherwise. (A backward that needs both loss's and lse's
    gradients runs the backward op twice.)
    ``negative_indices`` (-1: padding), ``negative_mask``, ``labels`` and ``negative_labels`` as in
    :func:`info_nce`; an anchor left without negatives has ``lse = -inf`` with ``include_positive=False`` (and
    ``loss = -inf``: ``lse - loss`` is then NaN, not ``s a_i.p_i``). InfoNCE over a bank in parts takes the positive
    in one part: ``loss_1 + softplus(lse_2 - lse_1)``, part 1's with ``include_positive=True``, part 2's without.
    """
    anchors, positives = _check_features(anchors, positives)
    negative_indices, negative_mask, pair = _labels_as_exclusion(anchors, negatives, negative_indices, negative_mask,
                                                                 labels, negative_labels)
    negatives, negative_indices, negative_mask = _check_negatives(anchors, negatives, negative_indices, negative_mask)
    t = _check_temperature(temperature)
    normalize = _check_bool("normalize", normalize)
    include_positive = _check_bool("include_positive", include_positive)
    exclude_self = False
    if negatives is None:
        # In-batch: anchor i's denominator is every positive. Kernels see the bank = positives with the diagonal
        # taken out of the bank (exclude_self) and counted once as the positive (include_positive): the same sum,
        # but the dominant term e^{l_ii} is then computed once, in float32, rather than inside the bank's tiles
        # (where float16/bfloat16 coefficients and a second rounding of l_ii would cancel against the positive).
        # With include_positive=False the diagonal is simply left out: the log-sum-exp over j != i.
        negatives, exclude_self = positives, True
        compute, _ = _promoted(anchors, positives)
    else:
        compute, _ = _common_dtypes(negatives, anchors, positives)
    t = _widened(t, anchors, positives, negatives)  # (lse's gradient: the kernel's loss and pos below)
    a, p = _to_bank_dtype(anchors, compute, normalize), _to_bank_dtype(positives, compute, normalize)
    if negatives is positives:
        negatives = p
    if not _kernels_serve(a, p, negatives, t):
        # The reference serves (forward-mode AD, a differentiating torch.func transform, no kernel for the device):
        # its lse carries its own derivatives, forward-mode ones included.
        return _fused(a, p, negatives, negative_indices, t, normalize, include_positive, exclude_self,
                      negative_mask=negative_mask, labels=pair)
    _check_scale_fits(t, a.dtype)
    # The op outside autograd; loss and lse then get their gradients from one node (loss_and_lse), where wanted.
    run = _fused_kernel(a, p, negatives, negative_indices, t, normalize, include_positive, exclude_self,
                        negative_mask=negative_mask, labels=pair, detached=True)
    grad = torch.is_grad_enabled()
    if grad and any(x.requires_grad for x in (a, p, run.negatives)):
        scale = run.scale
        loss, lse = _loss_and_lse(run.loss, run.lse, a, p, run.negatives, run.negative_indices, run.term,
                                  scale if not isinstance(scale, torch.Tensor) else 1.0,
                                  scale if isinstance(scale, torch.Tensor) else None, normalize, include_positive,
                                  exclude_self, negative_mask, *(pair if pair is not None else (None, None)))
    else:
        loss, lse = run.loss, run.lse.to(run.loss.dtype)
    if grad and isinstance(t, torch.Tensor) and t.requires_grad:
        loss, lse = _with_temperature_grad(loss, run.lse, run.term, a, p, t, normalize, include_positive,
                                           lse_out=lse)
    return loss, lse


def debiased_info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 0.1,
    *,
    tau_plus: float = 0.1,
    beta: float = 0.0,
    negative_indices: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    process_group=None,
) -> torch.Tensor:
    r"""Debiased InfoNCE (Chuang et al. 2020) and its hard-negative form (Robinson et al. 2021) without the B x K
    logits, in every negatives mode of :func:`info_nce`.

    With ``l_k = s a.n_k`` the K negatives' logits and ``l_0 = s a.p`` the positive's (s = 1 / temperature), the
    negatives' sum is reweighted towards hard ones, ``R = K sum_k e^{(1+beta) l_k} / sum_k e^{beta l_k}`` (``beta =
    0``: the plain sum), the expected share of same-class negatives is taken out,
    ``Ng = max((R - tau_plus K e^{l_0}) / (1 - tau_plus), K e^{-s})``, and ``loss = log(1 + Ng / e^{l_0})``, as in the
    authors' code (their floor ``K e^{-1/t}`` is the least the sum can be for normalised features, so with
    ``tau_plus = beta = 0`` and ``normalize=True`` this is :func:`info_nce`). ``tau_plus`` is the
    class-collision probability of a negative (for C balanced classes 1 / C:
    ``contrastbound.bounds.collision_probability(1, num_classes=C)``; with a prior, its ``prior=``).

    Computed in log space from the fused kernel's log-sum-exps over the negatives at the scales (1 + beta) s and
    beta s (:func:`info_nce_lse` with ``include_positive=False``: one call for beta = 0, two otherwise), so memory
    stays O(B d) beside the inputs and their gradients, and every input (and a tensor temperature) gets its gradient.

    Args:
        anchors, positives, negatives, negative_indices, negative_mask, temperature, normalize, reduction: as in
            :func:`info_nce` (``negatives=None``: in-batch, the other B - 1 positives). With padding (-1 indices)
            or a mask, K is each anchor's own count of negatives (loss 0 for an anchor with none).
        tau_plus: the class prior of a negative sharing the anchor's class, in [0, 1).
        beta: the hardness concentration, >= 0 (0: DCL; Robinson et al. use 0.5 to 1). The loss carries a
            rounding of about eps (1 + beta) / temperature (eps of the compute dtype): past beta ~ 1e3, float64.
        process_group: as in :func:`info_nce`: ``negatives=None``, in-batch over the global batch (anchor i's
            negatives every rank's positives but its own, K = global B - 1); negatives (K_r, d), this rank's shard
            of a shared bank (K = the sum of the shards; a learnable temperature is not supported there). This
            rank's loss is over its own anchors; gradients follow the all_gather_with_grad convention.
    """
    process_group = _function_group(process_group)
    with _refusals_joined(process_group, anchors):  # (a refusal on some ranks only: every rank raises)
        tau_plus = _check_unit_interval("tau_plus", tau_plus)
        if isinstance(beta, bool) or not isinstance(beta, Real):
            raise TypeError(f"beta must be a non-negative number, got {type(beta).__name__}")
        beta = _as_float("beta", beta, "a non-negative finite number")
        if not (0.0 <= beta < math.inf):
            raise ValueError(f"beta must be a non-negative finite number, got {beta}")
        anchors, positives = _check_features(anchors, positives)
        if process_group is not None and (negative_indices is not None or negative_mask is not None):
            raise ValueError("process_group takes negatives as this rank's shard (K_r, d) of a shared bank (or None "
                             "for in-batch negatives over the global batch), not "
                             + ("negative_indices" if negative_indices is not None else "negative_mask"))
        negatives, negative_indices, negative_mask = _check_negatives(anchors, negatives, negative_indices,
                                                                      negative_mask)
        t = _check_temperature(temperature)
        normalize = _check_bool("normalize", normalize)
        reduction = _check_reduction(reduction)
        # K: an int, or each anchor's count (B,) where padding or a mask leaves some negatives out
        if negatives is None:
            compute, result = _promoted(anchors, positives)
            K = anchors.shape[0] - 1 if negative_mask is None else _in_batch_count(negative_mask)
        else:
            compute, result = _common_dtypes(negatives, anchors, positives)
            K = ((negative_indices >= 0).sum(1) if negative_indices is not None else
                 negative_mask.sum(1) if negative_mask is not None else negatives.shape[-2])
        if process_group is not None:  # before the exchange: a lone refusal after it would leave the others waiting
            if negatives is not None and negatives.dim() != 2:
                raise ValueError(f"process_group takes negatives as this rank's shard (K_r, d) of a shared bank, got "
                                 f"shape {tuple(negatives.shape)}")
            if negatives is not None and isinstance(t, torch.Tensor) and t.requires_grad:
                raise ValueError("temperature must not require grad with a sharded bank (process_group): a "
                                 "learnable temperature is not supported there")
            _check_group("debiased_info_nce", anchors, positives, t, *(() if negatives is None else (negatives,)))
            _check_temperature_has_value(t, anchors.device)
            for factor in (1.0 + beta,) + ((beta,) if beta > 0.0 else ()):
                _check_lse_temperature(t, factor, beta, compute)
    t = _widened(t, anchors, positives, negatives)
    a, p = _to_bank_dtype(anchors, compute, normalize), _to_bank_dtype(positives, compute, normalize)
    if negatives is None and compute in (torch.float16, torch.bfloat16) and a.device.type == "cpu":
        # In-batch half features on the CPU run in float32 (the CPU kernel's tiles are float32 anyway), as
        # supcon_loss's: the log-sum-exps' gradient and the positive logit's meet in float32 and reach the features
        # rounded once. Each in float16 on its own overflowed where their sum does not (rows of norm 1e-3 at
        # temperature 0.01: a NaN gradient where info_nce gives -1.1e4; a fuzz against the reference found it).
        # On CUDA the tensor-core kernels keep the half type, and there the two still meet in it (README).
        a, p = a.float(), p.float()
    if not isinstance(t, torch.Tensor) and torch.compiler.is_compiling():
        # A tensor (as _scale_of makes one): Python arithmetic on a traced float (t / factor, 1 / t) made dynamo
        # specialise it, one graph per value of a temperature schedule.
        t = torch.ones((), dtype=torch.float64, device=anchors.device) * t

    if process_group is not None and negatives is None:
        from .distributed import gather_with_local_first

        # every rank's positives, this rank's first: row i of the bank is anchor i's positive, left out
        bank = gather_with_local_first(p, process_group, name="positives (in the promoted dtype of anchors and "
                                       "positives)", call=7, normalize=normalize, temperature=t,
                                       options=(("beta", beta), ("tau_plus", tau_plus)))
        K = bank.shape[0] - 1

        def lse_at(factor: float) -> torch.Tensor:  # over every rank's positives but anchor i's own
            return _fused(a, torch.zeros_like(a), bank, None, t / factor, normalize, False, exclude_self=True)[0]
    elif process_group is not None:
        from .distributed import sharded_negative_lse

        # (beta sets every shard's scales: the ranks must agree on it, not only on beta > 0; and on tau_plus, as
        # the in-batch call: each rank's loss weights the gradients it sends to the others' rows)
        sharded = sharded_negative_lse(a, negatives, t, normalize, process_group, call=8 if beta > 0.0 else 9,
                                       options=(("beta", beta), ("tau_plus", tau_plus)))
        K = sharded.bank_rows

        def lse_at(factor: float) -> torch.Tensor:  # over the whole sharded bank
            return sharded(factor)
    else:
        def lse_at(factor: float) -> torch.Tensor:  # log sum_k e^{factor s a.n_k}, differentiable
            try:
                return info_nce_lse(a, p, negatives, t / factor, negative_indices=negative_indices,
                                    negative_mask=negative_mask,
                                    normalize=normalize, include_positive=False)[1]
            except ValueError as exc:  # (a scale (1 + beta) / t too large for the dtype, or t / beta not finite)
                if "temperature" not in str(exc):
                    raise
                raise ValueError(f"debiased_info_nce computes log-sum-exps at temperature / {factor:g} (beta = "
                                 f"{beta:g}): {exc}") from None

    log_r = lse_at(1.0 + beta)
    acc = log_r.dtype
    ah, ph = a.to(acc), p.to(acc)
    if normalize:
        ah, ph = F.normalize(ah, dim=-1, eps=1e-12), F.normalize(ph, dim=-1, eps=1e-12)
    tt = t.to(acc) if isinstance(t, torch.Tensor) else t
    pos = (ah * ph).sum(-1) / tt
    empty = None  # per-anchor counts: the anchors without negatives (loss 0), computed with a stand-in below
    if isinstance(K, torch.Tensor):
        empty = K == 0
        log_k = K.clamp_min(1).to(acc).log()
        # (-inf there: a finite stand-in, so that no inf - inf reaches the loss or its gradient)
        log_r = torch.where(empty, torch.zeros_like(log_r), log_r)
    elif K <= 0:  # nothing to contrast (K = 0, or in-batch with B <= 1): loss 0 as info_nce's, zero gradients
        zero = pos * 0.0
        if negatives is not None and negatives.requires_grad:
            # an empty bank's gradient an empty tensor, as info_nce gives it, not None (an audit)
            zero = zero + negatives.sum().to(zero.dtype) * 0.0
        return _reduce(zero, reduction, result)
    else:
        # log K as a tensor: math.log of the size made dynamo specialise on it (one graph per K or B)
        log_k = (torch.ones((), dtype=acc, device=pos.device) * K).log()
    if beta > 0.0:
        log_b = lse_at(beta)
        if empty is not None:
            log_b = torch.where(empty, torch.zeros_like(log_b), log_b)
        log_r = log_r - log_b + log_k
    log_r = log_r.to(acc)
    raw = log_r
    if tau_plus > 0.0:
        # log Ng = log R + log1p(-share) - log(1 - tau_plus), share = tau_plus K e^{l_0 - log R}, where share < 1
        # and that is above the floor log K - s; else the floor alone. share in log space: e^{l_0 - log R}
        # overflowed float32 where the positive dominates (l_0 - log R > 88), and the unused branch's inf or NaN
        # reached the gradient.
        if torch.compiler.is_compiling():
            # 0-d float64 tensors (the same values, promoted as the Python floats are): math.log of a traced float
            # made dynamo specialise on it, one graph per value of a tau_plus schedule (with fullgraph=True, a
            # hard failure after 8 values)
            tp = torch.ones((), dtype=torch.float64, device=pos.device) * tau_plus
            log_tau, log1m_tau = tp.log(), torch.log1p(-tp)
        else:
            log_tau, log1m_tau = math.log(tau_plus), math.log1p(-tau_plus)
        log_share = (log_tau + log_k) + (pos - log_r)
        below = log_share >= 0.0
        share = torch.exp(torch.clamp(log_share, max=0.0))
        raw = log_r + torch.log1p(-torch.where(below, torch.zeros_like(share), share)) - log1m_tau
        raw = torch.where(below, torch.full_like(raw, -math.inf), raw)
    log_ng = torch.maximum(raw, log_k - 1.0 / tt)
    loss = _softplus(log_ng - pos)
    if empty is not None:
        loss = torch.where(empty, pos * 0.0, loss)
    return _reduce(loss, reduction, result)


def _check_lse_temperature(t: float | torch.Tensor, factor: float, beta: float, compute: torch.dtype) -> None:
    """debiased_info_nce's temperatures t / factor checked as the kernel calls would check them (with
    process_group: before the exchange)."""
    try:
        _check_scale_fits(_check_temperature(t / factor), compute)
    except ValueError as exc:
        raise ValueError(f"debiased_info_nce computes log-sum-exps at temperature / {factor:g} (beta = {beta:g}): "
                         f"{exc}") from None


def _check_unit_interval(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {type(value).__name__}")
    value = _as_float(name, value, "a number in [0, 1)")
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def bank_cross_entropy(
    anchors: torch.Tensor,
    bank: torch.Tensor,
    targets: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    *,
    normalize: bool = False,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    r"""Softmax cross-entropy of ``s anchors @ bank.T`` against ``targets`` without the (B, C) logits.

    ``loss_i = logsumexp_c(s a_i.w_c) - s a_i.w_{t_i}``; the same fused kernel as :func:`info_nce`, with the
    target row taken from the bank as the positive and left out of the bank's sum (counted once: the loss is
    never negative, and a confident target's gradient keeps float32 accuracy). The mean-classifier loss is this
    with bank = class means.

    Args:
        anchors: (B, d) features.
        bank: (C, d) class weights (or any bank of rows).
        targets: (B,) int64 (or int32) row of the bank that is anchor i's target.
        temperature, normalize, reduction: as in :func:`info_nce` (normalize defaults to False here).
        ignore_index, label_smoothing: as in :func:`torch.nn.functional.cross_entropy`. A target equal to
            ``ignore_index`` (None: none) contributes nothing: loss 0 and no gradient, and ``"mean"`` divides by the
            number of the others (NaN where every target is ignored, as torch). In eager mode ignored anchors
            are left out of the kernel's work (one more read-back); under torch.compile or a torch.func
            transform they are computed against row 0 and masked. ``label_smoothing`` eps takes the
            target distribution (1 - eps) one-hot + eps / C: ``loss_i + eps (l_{i,t_i} - mean_c l_ic)``, the
            mean logit from the bank's mean row (with ``normalize``, of its normalised rows), O(C d + B d) beside
            the kernel, its gradient added into the kernel's in place.
    """
    anchors = _check_tensor("anchors", anchors, 2, "(B, d)")
    bank = _check_tensor("bank", bank, 2, "(C, d)")
    if ignore_index is not None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, Integral):
            raise TypeError(f"ignore_index must be an int or None, got {type(ignore_index).__name__}")
        ignore_index = int(ignore_index)  # (a numpy integer too, as F.cross_entropy takes it)
        if not -(2 ** 63) <= ignore_index < 2 ** 63:  # (compared with int64 targets; an OverflowError at B = 0)
            raise ValueError(f"ignore_index must fit in int64 (as the targets), got {ignore_index}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, Real):
        raise TypeError(f"label_smoothing must be a number in [0, 1], got {type(label_smoothing).__name__}")
    smoothing = _as_float("label_smoothing", label_smoothing, "a number in [0, 1]")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {smoothing}")
    _check_device("bank", bank, "anchors", anchors)
    if bank.shape[1] != anchors.shape[1]:
        raise ValueError(f"bank must have feature size d = {anchors.shape[1]}, got shape {tuple(bank.shape)}")
    if bank.shape[0] == 0:
        raise ValueError("bank must have at least one row (C >= 1)")
    B = anchors.shape[0]
    ignored, in_range = None, False
    if ignore_index is not None:
        targets = _check_indices("targets", targets, (B,), "(B,)", bank.shape[0], "C", anchors.device,
                                 check_range=False)
        if targets.numel() and _may_read_back(targets):
            # Eager: the range check reads the targets' ends back anyway; where ignore_index lies outside them
            # (the usual -100 and no padding) that one read-back serves both and the masking ops are skipped (40
            # us of a 400 us step at B = 8, C = 64); where a target equals it the masked targets are read again.
            lo, hi = (int(v) for v in _read_back(targets, lambda v: torch.stack(torch.aminmax(v)).tolist()))
            in_range = 0 <= lo and hi < bank.shape[0]
            ignore_index = ignore_index if lo <= ignore_index <= hi else None
    keep = None
    if ignore_index is not None:
        ignored = targets == ignore_index
        targets = targets.masked_fill(ignored, 0)  # any row: the anchor's loss is dropped
        in_range = False
        if _may_read_back(targets) and not _func_active() and not _needs_reference(anchors, bank):
            # Eager: the ignored rows (padding) are left out of the kernel's work rather than computed and dropped
            # (one more read-back, the kept rows' count; half the time of a batch half padding). Under
            # torch.compile (static shapes), CUDA graph capture and the torch.func transforms they are masked
            # instead.
            keep = torch.nonzero(~ignored).flatten()
            keep = None if keep.numel() == B else keep
    targets = _check_indices("targets", targets, (B,), "(B,)", bank.shape[0], "C", anchors.device,
                             check_range=not in_range)
    if keep is not None:
        anchors, targets = anchors.index_select(0, keep), targets.index_select(0, keep)
    t = _check_temperature(temperature)
    normalize = _check_bool("normalize", normalize)
    reduction = _check_reduction(reduction)
    compute, result = _common_dtypes(bank, anchors)
    if label_smoothing:  # (t used twice: the kernel's and the smoothing term's gradients; see _widened)
        t = _widened(t, anchors, bank)
    anchors = _to_bank_dtype(anchors, compute, normalize)
    if _backend.kernel_serves(anchors.device) and not _needs_reference(anchors, bank, t) and not _func_active():
        _check_scale_fits(t, compute)  # (the reference branch's _fused checks it)
        learnable = isinstance(t, torch.Tensor) and t.requires_grad
        grad = torch.is_grad_enabled()
        save = bool(grad and (anchors.requires_grad or learnable))
        scale = _scale_of(t, bank.device)
        tensor_scale = isinstance(scale, torch.Tensor)
        # (one class: l_t - mean_c l_c is 0, its two paths' rounding is not: no smoothing term)
        eps = float(label_smoothing) if bank.shape[0] > 1 else 0.0
        # (the op's loss holds the smoothing term: one gradient coefficient for the target, see _bank_rows_impl)
        loss, lse, term, loss_bwd, mean = _bank_rows_fwd(anchors, bank, targets, scale if tensor_scale else None,
                                                         0.0 if tensor_scale else scale, normalize, save, eps)
        if learnable and grad:
            loss = _with_temperature_grad(loss, lse, term, anchors, bank.index_select(0, targets), t, normalize,
                                          True, loss_bwd, (eps, mean) if eps else None)  # target: the positive
    else:
        # The same form on the reference (forward-mode AD, torch.func, no extension): the target counted once.
        loss, _ = _fused(anchors, bank.index_select(0, targets), bank, None, t, normalize, True, excluded=targets)
        if label_smoothing and bank.shape[0] > 1:
            loss = loss + float(label_smoothing) * _target_less_mean_logit(anchors, bank, targets, t, normalize,
                                                                           loss.dtype)
    if keep is not None:  # the kept rows' losses in their places, 0 (and no gradient) for the ignored ones
        loss = loss.new_zeros(B).index_copy(0, keep, loss)
    if ignored is None:
        return _reduce(loss, reduction, result)
    loss = loss.masked_fill(ignored, 0.0)
    if reduction == "mean":  # over the anchors not ignored, as F.cross_entropy
        loss = loss.sum() / (~ignored).sum().to(loss.dtype)
        reduction = "none"  # (cast by _reduce)
    return _reduce(loss, reduction, result)


def _target_less_mean_logit(anchors: torch.Tensor, bank: torch.Tensor, targets: torch.Tensor, t, normalize: bool,
                            acc: torch.dtype) -> torch.Tensor:
    """l_{i,t_i} - mean_c l_ic (B,) in dtype acc, differentiable in anchors, bank and a tensor temperature (also by
    forward-mode AD and the torch.func transforms): label smoothing's term on the reference path, with the mean
    logit taken through the bank's mean row (the fused path forms it in bank_rows_fwd)."""
    a, rows = anchors.to(acc), bank.index_select(0, targets).to(acc)
    if normalize:
        a, rows = F.normalize(a, dim=-1, eps=1e-12), F.normalize(rows, dim=-1, eps=1e-12)
        mean = F.normalize(bank.to(acc), dim=-1, eps=1e-12).mean(0)  # (a (C, d) copy)
    else:
        mean = bank.sum(0, dtype=acc) / bank.shape[0]  # (accumulated in acc without a copy of the bank)
    return (a * (rows - mean)).sum(-1) / (t.to(acc) if isinstance(t, torch.Tensor) else t)


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float | torch.Tensor = 0.5,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    decoupled: bool = False,
    process_group=None,
) -> torch.Tensor:
    r"""SimCLR's NT-Xent loss over 2N views without the 2N x 2N similarity matrix.

    The views are ``z = cat(z1, z2)``; view i's positive is its pair (i + N mod 2N) and its negatives are the
    other 2N - 2 views (itself excluded):
    ``loss_i = -log( e^{s z_i.z_pair(i)} / sum_{j != i} e^{s z_i.z_j} )``, averaged over all 2N views.
    With ``decoupled=True``, the decoupled contrastive loss (DCL, Yeh et al. 2022, eq. 6): the positive's term
    leaves the denominator, ``loss_i = log sum_{j != i, pair(i)} e^{s z_i.z_j} - s z_i.z_pair(i)``.

    Args:
        z1, z2: (N, d), row i of each is a view of sample i.
        temperature: positive number or scalar tensor (learnable when it requires grad).
        normalize: L2-normalise first (SimCLR uses cosine similarity).
        reduction: "mean", "sum" or "none" (shape (2N,): the N views of z1, then those of z2).
        decoupled: DCL, as above (the loss may be negative; N = 1, no negatives at all, raises). One log-sum-exp
            over both views' negatives, as the paper writes it (lightly's ``DCLLoss`` adds two, one per side).
        process_group: a torch.distributed group ("world": the world group): every rank's views are negatives
            of every other rank's (the
            global batch); this rank's loss is over its own 2N_r views, and gradients follow the
            all_gather_with_grad convention (each rank's features get the sum over ranks' losses).
    """
    process_group = _function_group(process_group)
    with _refusals_joined(process_group, z1):  # (a refusal on some ranks only: every rank raises)
        z1, z2 = _check_features(z1, z2, ("z1", "z2"))
        t = _check_temperature(temperature)
        normalize = _check_bool("normalize", normalize)
        reduction = _check_reduction(reduction)
        decoupled = _check_bool("decoupled", decoupled)
        if process_group is not None:
            _check_group("nt_xent", z1, z2, t)
        compute, result = _promoted(z1, z2)
        _check_temperature_has_value(t, z1.device)  # (else "Cannot copy out of meta tensor" from the pair sides)
        if process_group is not None:  # before the exchange: a lone refusal after it would leave the others waiting
            _check_scale_fits(t, compute)
    z1, z2 = z1.to(compute), z2.to(compute)
    t = _widened(t, z1)
    bank1, bank2 = z1, z2
    if process_group is not None:
        from .distributed import gather_with_local_first

        agree = dict(call=3, normalize=normalize, temperature=t, options=(("decoupled", decoupled),))
        # row i is still view i
        bank1 = gather_with_local_first(z1, process_group, name="z1 (in the promoted dtype of z1 and z2)", **agree)
        bank2 = gather_with_local_first(z2, process_group, name="z2 (in the promoted dtype of z1 and z2)", **agree)
    # View i's sum splits into its pair's side (every view of the other side: in-batch, the pair out of the bank
    # and counted once as the positive) and its own side (every other view there). One call over all 2N views
    # would hold the positive inside the bank and subtract it again: when it dominates (a trained model, a low
    # temperature) the loss and the positive's gradient were left as differences of rounded values (bfloat16
    # gradients off by more than their size). Here the positive's term is computed once, and the own side
    # enters as softplus(lse_own - lse_pair), whose gradient adds to the pair side's without cancelling.
    if decoupled and bank1.shape[0] == 1:  # (the gathered size, the same on every rank: all raise)
        raise ValueError("decoupled=True leaves the positive out of the denominator, so each view needs a negative, "
                         "but a single pair of views (N = 1 over all ranks) has none")
    pair_sides = (None, None)
    if process_group is None and not decoupled and _clip_kernel_serves(z1, z2, t):
        # The two halves' pair sides are the two directions of the (z1, z2) logits, CLIP's: one call of the
        # both-directions kernel (row 0 z1's views against z2, row 1 z2's against z1; the pair counted once).
        _check_scale_fits(t, compute)
        if isinstance(t, torch.Tensor):
            # t is already widened (above) to the features' precision at least: float64 features with a float32
            # temperature give 1 / t in float64, as _scale_of gives the own sides (rounded to float32 the two
            # sides' scales differed by ~1e-8)
            scale = 1.0 / t
        elif torch.compiler.is_compiling():
            scale = torch.ones((), dtype=torch.float64, device=z1.device) / t  # (see _scale_of)
        else:
            scale = 1.0 / t
        loss2, lse2 = _both_directions(z1, z2, scale, normalize)
        lse2 = lse2.to(loss2.dtype)  # (float64 from the op; the own sides' lse are in the accumulation dtype)
        pair_sides = ((loss2[0], lse2[0]), (loss2[1], lse2[1]))
    # View i's positive logit, the same for both halves (z1_i . z2_i): formed once, as a gradient only.
    acc = _ops._acc_dtype(compute)  # (the kernels' loss dtype; _nt_xent_half casts to the loss's own)
    z1h, z2h = z1.to(acc), z2.to(acc)
    if normalize:
        z1h, z2h = F.normalize(z1h, dim=-1, eps=1e-12), F.normalize(z2h, dim=-1, eps=1e-12)
    pos_grad = _gradient_only((z1h * z2h).sum(-1) / t)
    loss = torch.cat([
        _nt_xent_half(z1, z2, bank1, bank2, t, normalize, pos_grad, pair_sides[0], decoupled),
        _nt_xent_half(z2, z1, bank2, bank1, t, normalize, pos_grad, pair_sides[1], decoupled),
    ])
    return _reduce(loss, reduction, result)


def _nt_xent_half(
    z: torch.Tensor, pair: torch.Tensor, own_bank: torch.Tensor, pair_bank: torch.Tensor, t, normalize: bool,
    pos_grad: torch.Tensor, pair_side: tuple[torch.Tensor, torch.Tensor] | None = None, decoupled: bool = False,
) -> torch.Tensor:
    """NT-Xent loss of the views z (N, d), their pairs `pair`, over the views of their own side `own_bank` and the
    pairs' side `pair_bank` (both with this rank's rows first): row i of each bank is view i's self / pair.
    pos_grad: 0 with the gradient of the positive logits s z_i . pair_i (_gradient_only; cast to the loss's dtype).
    pair_side: the pair side's (loss, lse) where already computed (nt_xent's both-directions call).
    decoupled: the pair side's sum without the positive (DCL); the rest is the same algebra:
    logaddexp(lse_own, lse_pair) - pos = loss_pair + softplus(lse_own - lse_pair)."""
    if pair_side is None:
        loss_pair, lse_pair = _fused(z, pair, pair_bank, None, t, normalize, not decoupled, exclude_self=True)
    else:
        loss_pair, lse_pair = pair_side
    # The own side without a positive: zero positives give a logit of 0 (normalised or not), so the op's loss is
    # this side's log-sum-exp itself, differentiable through the op.
    lse_own, _ = _fused(z, torch.zeros_like(z), own_bank, None, t, normalize, False, exclude_self=True)
    # lse_pair = loss_pair + the positive's logit: as info_nce_lse, the kernel's value with that gradient.
    lse_pair = lse_pair.detach() + _gradient_only(loss_pair) + pos_grad.to(loss_pair.dtype)
    return loss_pair + _softplus(lse_own - lse_pair)


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 0.1,
    *,
    bank: torch.Tensor | None = None,
    bank_labels: torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    process_group=None,
) -> torch.Tensor:
    r"""Supervised contrastive loss (Khosla et al. 2020, the L_out form) without the M x M similarity matrix.

    Every row z_i of the M rows is an anchor; its positives P(i) are the other rows of its label and its
    denominator every other row:
    ``loss_i = log sum_{j != i} e^{s z_i.z_j} - (1 / |P(i)|) sum_{p in P(i)} s z_i.z_p``.
    The log-sum-exp is the fused kernel's (in-batch, the row itself left out); the positives' mean logit is
    s z_i . (S_{y_i} - z_i) / (n_{y_i} - 1) from the per-label sums S (O(M d)). An anchor without a positive (its
    label's only row) has loss 0 and no gradient, and "mean" averages over the anchors that have one (0 where
    none has), as pytorch-metric-learning's SupConLoss; SupContrast's reference code keeps them in its mean as
    zeros (its mean = this one x the fraction of anchors with a positive). The loss is a difference of the
    log-sum-exp and a mean of logits, each rounded on its own: float32 results carry an absolute error of a few
    eps |logit| where they cancel (positives that are near copies of the anchor at large logits), as naive
    cross-entropy over float32 logits; :func:`nt_xent` forms its one positive inside the kernel and does not.
    Since the loss is never below 0 (the log-sum-exp runs over the positives too), a value rounded below 0 is
    returned as 0, its gradient left as formed.

    With a ``bank`` (a memory bank or queue of K earlier features, as in MoCo-style SupCon or
    pytorch-metric-learning's CrossBatchMemory) its rows join every anchor's denominator and, where
    ``bank_labels`` gives their labels, the positives of the anchors of their label: the sums run over j != i in
    the batch and over all K bank rows. The bank rows are not anchors. Their log-sum-exp is the fused kernel's
    shared-bank pass (no M x K logits; computed in the bank's dtype as in :func:`info_nce`, the features cast to
    it), combined with the batch's by logaddexp; their per-label sums are accumulated in slices of ~2^20 values
    in eager mode (at once under torch.compile).

    Args:
        features: (N, d), or (N, V, d) with V views of each sample (the views of sample n share its label).
        labels: (N,) integers (any values: equal means same class). None: each sample its own class, so a row's
            positives are its sample's other views (with V = 2, :func:`nt_xent` of the two views; needs
            (N, V, d) features with V >= 2; a bank's rows are then negatives only).
        temperature: positive number or scalar tensor (learnable when it requires grad).
        bank: (K, d) extra rows (a queue; usually detached, gradients flow into it if it requires grad). Not
            gathered over ranks with ``process_group``: each rank passes its own (MoCo keeps it identical).
        bank_labels: (K,) integers, the bank rows' labels (compared with ``labels``); None: the bank rows are in
            no anchor's class (negatives only). Needs ``labels`` and ``bank``.
        normalize: L2-normalise first (cosine similarity, as SupCon); the bank's rows too.
        reduction: "mean", "sum" or "none" (the shape of the rows: (N,) or (N, V)).
        process_group: a torch.distributed group ("world": the world group): every rank's rows (and labels)
            join the global batch, as
            positives and in the denominator; this rank's loss is over its own rows ("mean": those with a
            positive anywhere), gradients follow the all_gather_with_grad convention (each rank's features get
            the sum over ranks' losses). With labels=None each rank's samples are their own classes.

    Returns:
        The loss in the features' dtype promoted with the bank's (an empty bank too: a filling queue keeps the
        loss's dtype from its first step).
    """
    process_group = _function_group(process_group)
    with _refusals_joined(process_group, features):  # (a refusal on some ranks only: every rank raises)
        features = _check_tensor("features", features, (2, 3), "(N, d) or (N, V, d)")
        N = features.shape[0]
        if labels is None:
            if bank_labels is not None:
                raise ValueError("bank_labels was given with labels=None: the bank's labels are compared with the "
                                 "batch's labels, so pass labels (N,) as well (or bank_labels=None: the bank rows "
                                 "are then negatives only)")
            if features.dim() != 3 or features.shape[1] < 2:
                raise ValueError(f"labels=None (each sample its own class) needs features of shape (N, V, d) with "
                                 f"V >= 2 views, got shape {tuple(features.shape)}: no row would have a positive")
        else:
            _check_labels("labels", labels, N, "N", features)
        if bank is not None:
            bank = _check_tensor("bank", bank, 2, "(K, d)")
            _check_device("bank", bank, "features", features)
            if bank.shape[1] != features.shape[-1]:
                raise ValueError(f"bank must have shape (K, d) with the features' d = {features.shape[-1]}, got "
                                 f"{tuple(bank.shape)}")
            if bank_labels is not None:
                _check_labels("bank_labels", bank_labels, bank.shape[0], "K", features)
        elif bank_labels is not None:
            raise ValueError("bank_labels was given without bank: pass the bank's rows (K, d) as bank")
        t = _check_temperature(temperature)
        normalize = _check_bool("normalize", normalize)
        reduction = _check_reduction(reduction)
        if bank is not None:  # (the bank's pass runs in its dtype: checked here, before any exchange)
            _check_scale_fits(t, bank.dtype)
        if process_group is not None:  # before the exchange: a lone refusal after it would leave the others waiting
            _check_group("supcon_loss", features, t, *(() if bank is None else (bank,)))
            _check_scale_fits(t, features.dtype)
            _check_temperature_has_value(t, features.device)
    shape = features.shape[:-1]
    t = _widened(t, features, bank)
    if process_group is not None:
        from .distributed import gather_with_labels

        # every rank's rows and labels, this rank's first (row i of the bank is row i of z: exclude_self holds)
        everything, rows = gather_with_labels(features, labels, process_group, normalize=normalize, temperature=t)
    else:
        everything = features
        rows = torch.arange(N, device=features.device) if labels is None else labels.to(torch.int64).contiguous()
    if features.dim() == 3:
        rows = rows.repeat_interleave(features.shape[1])
    z = features.flatten(0, -2)  # row n * V + v: view v of sample n (not reshape(-1, d): d = 0 is ambiguous there)
    batch = everything.flatten(0, -2)
    if z.dtype in (torch.float16, torch.bfloat16) and z.device.type == "cpu":
        # Half features on the CPU: the denominators' kernel reads float32 copies (its tiles are float32 there
        # anyway), so its gradient and the positives' meet in float32 and reach the features rounded once. Where
        # the positives dominate the two nearly cancel, and each rounded to the half type on its own left 0.37 of
        # the gradient at T = 0.07 in bfloat16 (an audit's case). On CUDA the tensor-core kernels keep the half
        # type (docs/LIMITS.md).
        z = z.float()
        batch = z if process_group is None else batch.float()
    # The denominator: each row's log-sum-exp over the others (the op's loss with a zero positive, as nt_xent's
    # own side), differentiable in every row as anchor and as bank row.
    lse, _ = _fused(z, torch.zeros_like(z), batch, None, t, normalize, False, exclude_self=True)
    result = features.dtype if bank is None else torch.promote_types(features.dtype, bank.dtype)
    if bank is not None and bank.shape[0] > 0:
        # ... and over the bank's rows (a shared bank, in its dtype as info_nce runs it), joined in log space
        zc = _to_bank_dtype(z, bank.dtype, normalize)
        lse_bank, _ = _fused(zc, torch.zeros_like(zc), bank, None, t, normalize, False)
        acc = torch.promote_types(lse.dtype, lse_bank.dtype)
        lse = torch.logaddexp(lse.to(acc), lse_bank.to(acc))
    elif bank is not None and bank.requires_grad:
        # an empty bank (a queue not yet filled): its gradient an empty tensor, as info_nce gives it, not None
        lse = lse + bank.sum().to(lse.dtype) * 0.0
    acc = lse.dtype
    zh = z.to(acc)
    if normalize:
        zh = F.normalize(zh, dim=-1, eps=1e-12)
    bh = zh
    if process_group is not None:
        bh = batch.to(acc)
        if normalize:
            bh = F.normalize(bh, dim=-1, eps=1e-12)
    # Per-label sums without torch.unique (no read-back, static shapes under torch.compile): a label's slot is the
    # position of its first row in sorted order. (With process_group the batch's rows, this rank's first.) Summed,
    # and the positives' mean logit formed, in float64 (wide): index_add adds a label's rows one after another, and
    # in float32 the sum's error grew with the label's count: 65536 near-equal rows of one label moved the loss by
    # 2.3e-3 and the gradient by 8.9e-4 where it is ~1e-8 (a differential fuzz's find). The counts too (float32
    # counts exactly only to 2^24).
    wide = _wide_dtype(acc, bh.device)
    zw = zh.to(wide)
    ordered = torch.sort(rows).values
    slot = torch.searchsorted(ordered, rows)
    sums = torch.zeros(bh.shape, dtype=wide, device=bh.device).index_add(0, slot, zw if bh is zh else bh.to(wide))
    count = torch.zeros(rows.shape, dtype=wide, device=rows.device).index_add(0, slot,
                                                                             torch.ones_like(rows, dtype=wide))
    if bank_labels is not None and bank.shape[0] > 0 and rows.numel() > 0:
        sums, count = _add_bank_to_label_sums(sums, count, ordered, bank, bank_labels, normalize, acc)
    mine = slot[: z.shape[0]]
    count = count[mine]
    has = count > 1
    positive = ((zw * (sums.index_select(0, mine) - zw)).sum(-1) / torch.where(has, count - 1, 1.0)).to(acc)
    loss = torch.where(has, lse - positive / (t.to(acc) if isinstance(t, torch.Tensor) else t), 0.0)
    # lse runs over the positives too, so loss >= log(positives) >= 0; where they dominate, the difference of the
    # two rounded terms can come out below 0 by their rounding (-4e-6 at logits ~1e3 in float32): the value is
    # clamped at 0, the gradient kept as formed (straight through; NaN stays NaN).
    loss = loss + (loss.clamp_min(0.0) - loss).detach()
    if reduction == "mean":
        loss = loss.sum() / has.sum().clamp_min(1).to(acc)
        reduction = "none"  # (cast by _reduce)
    elif reduction == "none":
        loss = loss.reshape(shape)
    return _reduce(loss, reduction, result)


class _BankLabelSums(torch.autograd.Function):
    """sum_k [at_k = j] r_k for each slot j < slots in `sum_dtype`, r_k the bank's row k in `dtype` (L2-normalised
    with `normalize`), formed `step` rows at a time. Autograd's own index_add keeps every slice of the rows for its
    backward (a (K, d) copy in `dtype` from forward to backward) and slices a bank-sized zero gradient for each
    of them; here forward keeps only the bank and `at`, and backward writes the bank's gradient slice by slice into
    one (K, d) tensor in the bank's dtype (J^T g_{at_k}, J F.normalize's Jacobian (I - r r^T) / |b|, I / 1e-12
    where the norm was clamped). Eager mode only (supcon_loss's caller takes autograd's path under torch.compile,
    forward-mode AD and torch.func)."""

    @staticmethod
    def forward(ctx, bank, at, slots, dtype, normalize, step, sum_dtype):
        ctx.save_for_backward(bank, at)
        ctx.normalize, ctx.step, ctx.dtype = normalize, step, dtype
        out = torch.zeros(slots, bank.shape[1], dtype=sum_dtype, device=bank.device)
        for k0, rows in _bank_row_slices(bank, dtype, normalize, step):
            out.index_add_(0, at[k0 : k0 + step], rows.to(sum_dtype))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        bank, at = ctx.saved_tensors
        # Under vmap (a batched backward: is_grads_batched, jacobian(vectorize=True)) grad_out is batched and a
        # buffer made here is not, so writing slices into it is refused: the slices are joined at the end there
        # (twice the (K, d) memory for a moment), written in place otherwise.
        batched = _func_active() or _batched(grad_out)
        grad = [] if batched else torch.empty_like(bank, memory_format=torch.contiguous_format)
        for k0 in range(0, bank.shape[0], ctx.step):
            g = grad_out.index_select(0, at[k0 : k0 + ctx.step]).to(ctx.dtype)
            if ctx.normalize:
                b = bank[k0 : k0 + ctx.step].to(ctx.dtype)
                norm = torch.linalg.vector_norm(b, dim=-1, keepdim=True)
                clamped = norm.clamp_min(1e-12)
                r = b / clamped
                radial = (r * g).sum(-1, keepdim=True) * (norm >= 1e-12)  # (none where the norm was clamped)
                g = (g - radial * r) / clamped
            if batched:
                grad.append(g)
            else:
                grad[k0 : k0 + ctx.step] = g
        if batched:
            grad = torch.cat(grad) if grad else torch.zeros_like(bank, dtype=ctx.dtype)
        return grad, None, None, None, None, None, None


def _check_labels(name: str, labels: object, n: int, n_name: str, features: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor of shape ({n_name},) or None, got {type(labels).__name__}")
    _check_dense(name, labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of shape ({n_name},) = ({n},), got dtype {labels.dtype}")
    if tuple(labels.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n_name},) = ({n},), got {tuple(labels.shape)}")
    if labels.device != features.device:
        raise ValueError(f"{name} is on {labels.device} but features is on {features.device}: all inputs must share "
                         "a device")


def _add_bank_to_label_sums(sums: torch.Tensor, count: torch.Tensor, ordered: torch.Tensor, bank: torch.Tensor,
                            bank_labels: torch.Tensor, normalize: bool, acc: torch.dtype, budget: int = 1 << 20):
    """The per-label sums and counts of supcon_loss with the bank's rows of the batch's labels added at their
    label's slot (the first position of the label in the sorted batch labels `ordered`); the other rows go to a
    spare slot, dropped after. In eager mode the (normalised, accumulation-dtype) rows are formed ~`budget` values
    at a time, so the extra memory is O(K) int64 slots and O(M d + budget) values whatever K (a bank that needs a
    gradient: _BankLabelSums, whose backward adds one (K, d) gradient in the bank's dtype). Under torch.compile
    they are formed at once (a loop over K's slices would specialise the graph to K: one graph per size of a
    filling queue); inductor fuses the normalisation into the index_add, so no (K, d) copy is formed there either
    (tests/test_supcon.py::test_compiled_bank_keeps_no_copy_of_the_rows)."""
    yb = bank_labels.to(torch.int64).contiguous()
    at = torch.searchsorted(ordered, yb).clamp_max(ordered.shape[0] - 1)
    spare = sums.shape[0]
    at = torch.where(ordered.index_select(0, at) == yb, at, spare)
    sums = torch.cat([sums, sums.new_zeros(1, sums.shape[1])])
    count = torch.cat([count, count.new_zeros(1)]).index_add(0, at, torch.ones_like(at, dtype=count.dtype))
    step = max(1, budget // max(1, bank.shape[1]))
    # (the rows normalised in acc, as the batch's are, then widened to the sums' dtype)
    if torch.compiler.is_compiling():
        rows = bank.to(acc)
        if normalize:
            rows = F.normalize(rows, dim=-1, eps=1e-12)
        return sums.index_add(0, at, rows.to(sums.dtype))[:spare], count[:spare]
    if (bank.requires_grad and torch.is_grad_enabled() and not _func_active() and not _forward_ad(bank, sums)
            and not isinstance(bank, FakeTensor)):
        return ((sums + _BankLabelSums.apply(bank, at, spare + 1, acc, normalize, step, sums.dtype))[:spare],
                count[:spare])
    for k0, rows in _bank_row_slices(bank, acc, normalize, step):
        sums = sums.index_add(0, at[k0 : k0 + step], rows.to(sums.dtype))  # (not in place: torch.func's vmap may batch the rows)
    return sums[:spare], count[:spare]


def _bank_row_slices(bank: torch.Tensor, dtype: torch.dtype, normalize: bool, step: int):
    """(k0, rows k0 .. k0 + step of the bank in `dtype`, L2-normalised with `normalize`), slice by slice."""
    for k0 in range(0, bank.shape[0], step):
        rows = bank[k0 : k0 + step].to(dtype)
        yield k0, (F.normalize(rows, dim=-1, eps=1e-12) if normalize else rows)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    max_logit_scale: float = 100.0,
    process_group=None,
) -> torch.Tensor:
    r"""CLIP's symmetric contrastive loss without the N x N logits.

    ``loss = (info_nce(img, txt) + info_nce(txt, img)) / 2`` with in-batch negatives and temperature
    ``1 / logit_scale``: pair i is the positive, the other N - 1 texts (images) are the negatives.

    Args:
        image_features, text_features: (N, d), row i of each is a matching pair.
        logit_scale: the multiplier of the cosine similarities (CLIP passes ``log_scale.exp()``), a positive number
            or a scalar tensor that receives a gradient. As in CLIP and open_clip it is clamped to at most
            ``max_logit_scale`` (100); once the clamp binds, no gradient flows to it.
        normalize: L2-normalise the features first (CLIP does).
        reduction: "mean", "sum" or "none" (per pair, the average of the two directions, shape (N,)).
        process_group: a torch.distributed group ("world": the world group): each rank's pairs are scored
            against the texts (images) of all
            ranks; this rank's loss is over its own pairs (all_gather_with_grad convention for gradients).
    """
    process_group = _function_group(process_group)
    with _refusals_joined(process_group, image_features):  # (a refusal on some ranks only: every rank raises)
        if not isinstance(max_logit_scale, Real) or isinstance(max_logit_scale, bool):
            raise TypeError(f"max_logit_scale must be a positive number, got {type(max_logit_scale).__name__}")
        max_scale = _as_float("max_logit_scale", max_logit_scale, "positive and finite")
        if not (0.0 < max_scale < math.inf):
            raise ValueError(f"max_logit_scale must be positive and finite, got {max_scale}")
        if not (max_scale >= _MIN_TEMPERATURE_F64):  # its reciprocal, the lowest temperature, finite
            raise ValueError(f"max_logit_scale must be at least {_MIN_RECIPROCAL_TEXT[True]}, got {max_scale}")
        scale = logit_scale
        if isinstance(scale, torch.Tensor):
            scale = _check_positive_scalar_tensor("logit_scale", scale)
            if scale.device.type != "cpu":
                scale = _poison_bad_scale(scale)  # unread on a GPU: +inf must give NaN, not the clamp's 100
            # 1 / scale in float32 at least (float16's range would overflow for a scale below 1.5e-5); a tensor: no
            # read-back. The reciprocal is taken below, once the features are checked, in their dtype too.
            clamped = scale.clamp(max=max_scale).to(torch.promote_types(scale.dtype, torch.float32))
            temperature = None
        elif isinstance(scale, Real) and not isinstance(scale, bool):
            value = _as_float("logit_scale", scale, "positive and finite")
            if not (0.0 < value < math.inf):  # not math.isfinite: see _check_temperature
                raise ValueError(f"logit_scale must be positive and finite, got {value}")
            if not (value >= _MIN_TEMPERATURE_F64):  # its reciprocal, the temperature, finite
                raise ValueError(f"logit_scale must be at least {_MIN_RECIPROCAL_TEXT[True]}, got {value}")
            if torch.compiler.is_compiling():
                # A tensor, as _scale_of makes one: Python arithmetic on a traced float (min, 1 / x) made torch
                # 2.11's dynamo specialise it, one graph per value of a logit-scale schedule.
                device = getattr(image_features, "device", None)  # (checked below)
                clamped = torch.ones((), dtype=torch.float64, device=device) * (value if value <= max_scale else
                                                                                  max_scale)
                temperature = 1.0 / clamped
            else:
                clamped = min(value, max_scale)
                temperature = 1.0 / clamped
        else:
            raise TypeError(f"logit_scale must be a positive number or a scalar tensor, got {type(scale).__name__}")
        reduction = _check_reduction(reduction)
        normalize = _check_bool("normalize", normalize)  # (the op would take 0 or None as False)
        _check_features(image_features, text_features, ("image_features", "text_features"))
        if temperature is None:
            # the two in-batch calls' temperature in the features' precision too: 1 / a float32 scale rounded to
            # float32 moved float64 losses by ~1e-7 (process_group, CUDA; a distributed fuzz's find)
            temperature = 1.0 / _widened(clamped, image_features, text_features)
        _check_temperature_has_value(scale, image_features.device, "logit_scale")
        _check_logit_scale_fits(clamped, torch.promote_types(image_features.dtype, text_features.dtype))
    if process_group is None and _clip_kernel_serves(image_features, text_features, temperature):
        return _clip_fused(image_features, text_features, clamped, temperature, normalize, reduction)
    # In-batch both ways (over the global batch with process_group: row i of each gathered bank is pair i's positive).
    # Each direction's per-pair losses in the accumulation dtype, averaged and reduced there, then cast (as the
    # one-call kernel does): per-pair losses rounded to bfloat16 first, then averaged and meaned in bfloat16, had
    # twice its error (0.059 against 0.031 at N = 512).
    if process_group is not None:  # the texts, then the images gathered (errors name them so; _check_group there)
        args = (temperature, normalize, "none", process_group)
        i2t, result = _info_nce_global_batch(image_features, text_features, *args, call=4,
                                             names=("image_features", "text_features"), per_anchor=True)
        t2i, _ = _info_nce_global_batch(text_features, image_features, *args, call=4,
                                        names=("text_features", "image_features"), per_anchor=True)
    else:
        kw = dict(temperature=temperature, normalize=normalize)
        i2t, _ = info_nce_lse(image_features, text_features, **kw)
        t2i, _ = info_nce_lse(text_features, image_features, **kw)
        _, result = _promoted(image_features, text_features)
    return _reduce(0.5 * (i2t + t2i), reduction, result)


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor = 10.0,
    logit_bias: float | torch.Tensor = -10.0,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    process_group=None,
) -> torch.Tensor:
    r"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023) without the N x N logits.

    With l_ij = t x_i . y_j + b (t = ``logit_scale``, b = ``logit_bias``) every (image i, text j) pair is a binary
    task, positive on the diagonal: ``loss_i = softplus(-l_ii) + sum_{j != i} softplus(l_ij)``, and "mean" is
    ``sum_i loss_i / N`` (the paper's ``-1/|B| sum_i sum_j log sigmoid(z_ij l_ij)``). The negative pairs' sums are
    the fused op's (contrastbound::siglip_fwd: logit tiles by matrix products, reduced at once, recomputed in
    backward; extra memory O(N d + tile) instead of the N x N logits); the positives' terms are O(N d) beside it.
    Accumulates in float32 for float16 / bfloat16 inputs.

    Args:
        image_features, text_features: (N, d), row i of each is a matching pair.
        logit_scale: t > 0, a number or a scalar tensor that receives a gradient (SigLIP learns log t from log 10
            and passes ``log_t.exp()``; it is not clamped).
        logit_bias: b, a finite number or a scalar tensor that receives a gradient (SigLIP starts it at -10).
        normalize: L2-normalise the features first (SigLIP does).
        reduction: "mean" (the sum over pairs / N), "sum", or "none" (per image row, (N,)).
        process_group: a torch.distributed group ("world": the world group): every rank's texts are gathered,
            so rank r's loss is its images
            against the global batch's texts (the other ranks' texts are negatives of its images), the sum over
            ranks of their "sum" losses is the global one (each rank's "mean" divides by its own N); gradients
            follow the all_gather_with_grad convention. The ranks must agree on normalize, the logit scale and the
            bias (checked, without a read-back for tensors).
    """
    process_group = _function_group(process_group)
    with _refusals_joined(process_group, image_features):  # (a refusal on some ranks only: every rank raises)
        image, text = _check_features(image_features, text_features, ("image_features", "text_features"))
        scale = _check_siglip_scalar("logit_scale", logit_scale, positive=True)
        bias = _check_siglip_scalar("logit_bias", logit_bias, positive=False)
        normalize = _check_bool("normalize", normalize)
        reduction = _check_reduction(reduction)
        compute, result = _promoted(image, text)
        _check_temperature_has_value(scale, image.device, "logit_scale")
        _check_temperature_has_value(bias, image.device, "logit_bias")
        _check_siglip_fits(scale, bias, compute)
        if process_group is not None:  # before the exchange: a lone refusal after it would leave the others waiting
            _check_group("siglip_loss", image, text, *(x for x in (scale, bias) if isinstance(x, torch.Tensor)))
    acc = _ops._acc_dtype(compute)
    x, y = image.to(acc), text.to(acc)
    if normalize:
        x, y = F.normalize(x, dim=-1, eps=1e-12), F.normalize(y, dim=-1, eps=1e-12)
    # (each used twice, by the op and the positives' logits: widened as a temperature, see _widened)
    st, bt = (_widened(v, x).to(x.device) if isinstance(v, torch.Tensor) else torch.ones((), dtype=torch.float64,
                                                                                          device=x.device) * v
              for v in (scale, bias))
    if x.device.type != "cpu":
        st, bt = _poison_bad_siglip_scalars(st, bt)
    texts = y
    if process_group is not None:
        from .distributed import gather_with_local_first

        # every rank's texts, this rank's first: text i is still image i's positive. Gathered in the promoted dtype
        # (as nt_xent's and clip_loss's), then widened and normalised as y: gathered once in the accumulation dtype,
        # ranks with float16 and float32 features passed the exchange's dtype check (a distributed audit), and
        # each computed its own loss in its own dtype
        texts = gather_with_local_first(text.to(compute), process_group, name="text_features (in the "
                                        "promoted dtype of image_features and text_features)", call=10,
                                        normalize=normalize, temperature=scale, options=(("logit_bias", bias),))
        texts = texts.to(acc)
        if normalize:
            texts = F.normalize(texts, dim=-1, eps=1e-12)
    if _siglip_kernel_serves(x.device) and not _needs_reference(x, texts, st, bt):
        negatives = torch.ops.contrastbound.siglip_fwd(x, texts, st, bt)  # (the op keeps autocast out itself)
    else:
        with _autocast_off(x.device.type):  # float32 logits, as the op's
            negatives = _siglip_negatives_reference(x, texts, st, bt)
    positives = st.to(acc) * (x * y).sum(-1) + bt.to(acc)
    from .reference import _softplus

    return _reduce(negatives + _softplus(-positives), reduction, result)


def _siglip_kernel_serves(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda") and _backend.siglip_kernel_serves()


def _siglip_negatives_reference(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                                bias: torch.Tensor) -> torch.Tensor:
    """The op's contract materialised: sum over j != i of softplus(scale x_i . y_j + bias), (B,)."""
    from .reference import _softplus

    acc = x.dtype
    terms = _softplus(scale.to(acc) * (x @ y.T) + bias.to(acc))
    pairs = torch.eye(x.shape[0], y.shape[0], dtype=torch.bool, device=x.device)
    return terms.masked_fill(pairs, 0.0).sum(1)


def _check_siglip_scalar(name: str, value: object, positive: bool) -> float | torch.Tensor:
    """A finite number (positive for the scale), or a floating tensor with one element (0-d, differentiable),
    checked as the temperature is (_check_positive_scalar_tensor): a CPU tensor's value read in eager mode (under
    vmap every sample's), an in-graph assert under torch.compile; a GPU one is not read back (siglip_loss makes the
    loss NaN for a bad value there, _poison_bad_siglip_scalars)."""
    must = "a positive finite number" if positive else "a finite number"
    if isinstance(value, torch.Tensor):
        if positive:
            return _check_positive_scalar_tensor(name, value)
        _check_dense(name, value)
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be {must} or a floating tensor with one element, got a {value.dtype} "
                             f"tensor of shape {tuple(value.shape)}")
        x = _usable_for_autograd(value.reshape(()))
        if x.device.type != "cpu":
            return x
        if torch.compiler.is_compiling():
            if not _batched_while_compiling(x):
                torch._assert_async(torch.isfinite(x.detach()), f"{name} must be {must}")
        else:
            for v in _read_back(x.detach(), lambda values: values.reshape(-1).tolist()):
                if not math.isfinite(v):
                    raise ValueError(f"{name} must be {must}, got {v}")
        return x
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {must} or a scalar tensor, got {type(value).__name__}")
    v = _as_float(name, value, must)
    if not (-math.inf < v < math.inf and (v > 0.0 or not positive)):
        raise ValueError(f"{name} must be {must}, got {v}")
    return v


_F32_OVERFLOW = 2.0**128 - 2.0**103  # the smallest magnitude float32 rounds to inf (below it: to at most FLT_MAX)
# As the messages print it: formatted once, since torch.compile(dynamic=True) traces a module's float as a symbol,
# and a symbol formatted into a string stopped a fullgraph compile of siglip_loss ("BUILD_STRING type error").
_F32_OVERFLOW_TEXT = f"{_F32_OVERFLOW:.8g}"


def _check_siglip_fits(scale: float | torch.Tensor, bias: float | torch.Tensor, dtype: torch.dtype) -> None:
    """For features computed in float32 (float32, float16, bfloat16) the scale and the bias are taken in float32:
    a float64 value past its range (a float, or a float64 CPU tensor: read in eager mode, an in-graph assert under
    torch.compile) would become inf and the loss NaN or inf, so it is refused as _check_scale_fits refuses such a
    temperature."""
    if dtype == torch.float64:
        return
    for name, v in (("logit_scale", scale), ("logit_bias", bias)):
        must = f"{name} must be below {_F32_OVERFLOW_TEXT} in magnitude for features computed in float32 ({dtype})"
        if isinstance(v, torch.Tensor) and torch.compiler.is_compiling():
            if v.dtype == torch.float64 and v.device.type == "cpu" and not _batched_while_compiling(v):
                torch._assert_async((v.detach().abs() < _F32_OVERFLOW).all(), must)
            continue
        for x in _float64_host_values(v):
            if not abs(x) < _F32_OVERFLOW:
                raise ValueError(f"{must}: float32 rounds it to inf, got {x}")  # (not :g, which a symbol refused)


def _poison_bad_siglip_scalars(scale: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN for a scale that is not positive and finite or a bias that is not finite, where their values were not
    read (GPU tensors): the loss is then NaN, as a bad GPU temperature makes the other losses."""
    bias = torch.where(torch.isfinite(bias), bias, torch.full_like(bias, float("nan")))
    return _poison_bad_scale(scale), bias


def _clip_kernel_serves(image: torch.Tensor, text: torch.Tensor, temperature: float | torch.Tensor) -> bool:
    """Whether clip_loss takes the both-directions kernel (contrastbound::clip_fwd): where one is compiled for the
    device, and not where _fused would take the reference (forward-mode AD, a differentiating torch.func
    transform, a tensor temperature under any transform)."""
    return (_backend.clip_kernel_serves(image.device) and not _needs_reference(image, text, temperature)
            and not (isinstance(temperature, torch.Tensor) and _func_active()))


def _clip_fused(image: torch.Tensor, text: torch.Tensor, logit_scale: float | torch.Tensor,
                temperature: float | torch.Tensor, normalize: bool, reduction: str) -> torch.Tensor:
    """clip_loss by one kernel call for both directions: the N x N logits are formed once in forward and once (N <=
    1024) or twice (one pass per gradient) in backward, where two info_nce calls form them and V twice each.
    logit_scale is the clamped scale (a float, or a tensor whose gradient is attached in _both_directions)."""
    compute, result = _promoted(image, text)
    _check_scale_fits(temperature, compute)
    loss, _ = _both_directions(image.to(compute), text.to(compute), logit_scale, normalize)
    return _reduce(0.5 * (loss[0] + loss[1]), reduction, result)


def _both_directions(image: torch.Tensor, text: torch.Tensor, logit_scale: float | torch.Tensor,
                     normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """contrastbound::clip_fwd on features of one dtype: (loss, lse), each (2, N), loss in the accumulation dtype and
    lse in float64 (row 0 image -> text, row 1 text -> image), the loss differentiable in the features and in
    logit_scale (a float, or a tensor whose exact gradient is attached from the op's d loss / d scale)."""
    if isinstance(logit_scale, torch.Tensor):
        if image.device.type == "cpu" and logit_scale.device.type != "cpu":
            logit_scale = logit_scale.cpu()  # differentiable (see _with_temperature_grad)
        scale = logit_scale.detach().to(torch.float64)
    else:
        scale = torch.tensor(logit_scale, dtype=torch.float64)
    learnable = isinstance(logit_scale, torch.Tensor) and logit_scale.requires_grad and torch.is_grad_enabled()
    loss, lse, dloss_dscale = torch.ops.contrastbound.clip_fwd(image, text, scale, normalize, learnable)
    if learnable:
        loss = _attach_scale_grad(loss, logit_scale, dloss_dscale)
    return loss, lse


def _check_storable(t: float, dtype: torch.dtype) -> None:
    """A learnable temperature is kept as its logarithm in `dtype` (InfoNCE's log_temperature): exp of the rounded
    log must read back as a temperature the losses take (float32: 2.9e-39 .. 3.4e38), not 0 or inf (1e-50 was
    accepted, then every forward refused "0.0"). Skipped while dynamo traces (a float read of a tensor there)."""
    if torch.compiler.is_compiling() or not dtype.is_floating_point:
        return
    back = float(torch.tensor(math.log(t), dtype=dtype, device="cpu").exp())  # (on the CPU under a meta default)
    floor = _min_reciprocal(dtype)
    if not (floor <= back < math.inf):
        raise ValueError(
            f"temperature {t:.3g} cannot be learned in {str(dtype).replace('torch.', '')}: log_temperature holds its "
            f"log, whose exp reads back as {back:.3g} (at least {floor:.3g}, finite, is needed); convert the module "
            "to float64 first (.double()), then set module.temperature"
        )


class _LocalGroup:
    """The modules' default process_group (no group: each rank's loss alone), told apart from a None passed on
    purpose, which is what dist.group.WORLD is before init_process_group. Shown as None in signatures."""

    def __repr__(self) -> str:
        return "None"


_LOCAL = _LocalGroup()


def _module_group(module: str, process_group):
    """A loss module's process_group as kept: None, a group, or "world" (dist.group.WORLD, looked up at each call).

    A None given on purpose while torch.distributed is not yet initialised is what `dist.group.WORLD` reads then:
    the module, built before init_process_group (a framework's usual order), would compute each rank's loss alone
    at every step, without an error (an exploratory review, 2026-12-06): a warning says so."""
    if process_group is _LOCAL:
        return None
    if isinstance(process_group, str):
        if process_group != "world":
            raise ValueError(f"{module}: process_group must be a torch.distributed ProcessGroup, None or 'world' (the "
                             f"world group, looked up at each call), got {process_group!r}")
        return process_group
    _check_group_type(process_group, "process_group", f"{module}: ")
    if process_group is None and torch.distributed.is_available() and not torch.distributed.is_initialized():
        warnings.warn(
            f"{module}(process_group=None) while torch.distributed is not initialised: dist.group.WORLD is None until "
            "init_process_group, so this module computes each rank's loss alone at every step. Build it after "
            "init_process_group, or pass process_group='world' (the world group, looked up at each call); leave "
            "process_group out for a per-rank loss.", stacklevel=_first_caller_outside())
    return process_group


def _first_caller_outside() -> int:
    """warnings.warn's stacklevel, from its caller here, of the first frame outside this file (the user's line: a
    module's constructor may run through a subclass's)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def _function_group(process_group, name: str = "process_group"):
    """A loss function's process_group: "world" (as the modules take it) is dist.group.WORLD, looked up now; any
    other string is refused by name, and so is what is not a group (before the check that torch.distributed is
    up, whose message named no fault of the argument's: a misuse audit); a group or None as given."""
    if isinstance(process_group, str):
        if process_group != "world":
            raise ValueError(f"{name} must be a torch.distributed ProcessGroup, None or 'world' (the world "
                             f"group), got {process_group!r}")
        return _call_group(process_group)
    _check_group_type(process_group, name)
    return process_group


def _check_group_type(process_group, name: str, prefix: str = "") -> None:
    """Refuses a process_group that is neither None nor a torch.distributed ProcessGroup (an int, a list, a rank
    number): TypeError naming it. dist.new_group's marker for a rank outside the group passes (the gathers say
    what it means)."""
    if process_group is None or not torch.distributed.is_available():
        return
    if isinstance(process_group, torch.distributed.ProcessGroup):
        return
    if (isinstance(process_group, int) and not isinstance(process_group, bool)
            and process_group == torch.distributed.GroupMember.NON_GROUP_MEMBER):
        return
    raise TypeError(f"{prefix}{name} must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD), None or "
                    f"'world' (the world group), got {type(process_group).__name__}")


def _call_group(process_group):
    """The group a module's forward passes on: "world" resolved to dist.group.WORLD now."""
    if isinstance(process_group, str):
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("process_group='world' needs torch.distributed to be initialised (init_process_group) "
                               "before the loss is called")
        return torch.distributed.group.WORLD
    return process_group


class _LossModule(torch.nn.Module):
    """The loss modules' base: a copy (an EMA / teacher model) shares its process group, which can be neither copied
    nor pickled; the properties named in _settable (a temperature, a logit scale) are set through their setters."""

    _settable: tuple[str, ...] = ()
    _takes_reciprocal = False  # (ClipLoss: its temperature, 1 / scale, must be finite as well)

    def __setattr__(self, name: str, value) -> None:
        # nn.Module.__setattr__ registers an nn.Parameter value under its name before a property's setter runs (a
        # KeyError "attribute 'temperature' already exists"): the setter gives the module's own message.
        if name in self._settable:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __deepcopy__(self, memo):
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        return copy._reconstruct(self, memo, *self.__reduce_ex__(4))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A finite value that this module's parameter dtype holds as inf, or a log whose exp reads back as 0 or inf
        # there (a float32 state into a .half() module: SigLIP's bias -1e6, a temperature of 1e-5), is refused, and
        # nothing loaded, as a cast to such a dtype and the setters refuse it; it was loaded, and the next forward
        # refused a value the user never gave (an audit). Non-finite values in the state are torch's to load, and
        # so is load_state_dict(assign=True), which keeps the state's own dtypes.
        assign = local_metadata.get("assign_to_params_buffers", False)
        for name, param in ([] if assign else self._parameters.items()):
            value = state_dict.get(prefix + name)
            if (param is not None and isinstance(value, torch.Tensor) and param.is_floating_point()
                    and (value.is_complex() or value.dtype == torch.bool)):
                # (the copy into the real parameter dropped the imaginary part, torch warning only; a misuse audit)
                error_msgs.append(f"{type(self).__name__} ({prefix or 'top level'}): {name} must be a real number, "
                                  f"got a {value.dtype} tensor; nothing was loaded")
                return
            if param is None or not isinstance(value, torch.Tensor) or param.is_meta or value.is_meta or \
                    value.numel() != 1 or not (value.is_floating_point() and param.is_floating_point()):
                continue
            v = float(value.detach().reshape(()).to(torch.float64, copy=True).cpu())
            stored = torch.tensor(v, dtype=torch.float64).to(param.dtype)  # (as copy_ rounds it into the parameter)
            if not math.isfinite(v):
                continue
            if name.startswith("log_"):
                cap = getattr(self, "max_logit_scale", None)  # (ClipLoss clamps the log first, in its forward)
                if name == "log_logit_scale" and cap is not None:
                    stored = stored.clamp(max=math.log(cap))
                back = float(stored.exp())
                floor = _min_reciprocal(param.dtype) if name == "log_temperature" or self._takes_reciprocal else 0.0
                ok = floor <= back < math.inf and back > 0.0
                what = f"{name} {v:g} (exp: {math.exp(min(v, 709.0)):g}) reads back in {param.dtype} as {back:g}"
            else:
                ok = math.isfinite(float(stored))
                what = f"{name} {v:g} is stored in {param.dtype} as {float(stored):g}"
            if not ok:
                error_msgs.append(f"{type(self).__name__} ({prefix or 'top level'}): {what}, beyond that dtype's "
                                  "range; nothing was loaded (.double() or .float() the module first)")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class _TemperatureLoss(_LossModule):
    """The modules' common part: a fixed or learnable temperature (see :class:`InfoNCE`), normalize, reduction and
    process_group, passed to the function ``_function`` by each subclass's forward."""

    _settable = ("temperature",)
    _function = "info_nce"
    _takes_decoupled = False  # (InfoNCE, NTXent: the option shows in their repr)

    def __init__(
        self,
        temperature: float | torch.Tensor = 0.1,
        normalize: bool = True,
        reduction: str = "mean",
        learn_temperature: bool = False,
        process_group=_LOCAL,
    ) -> None:
        super().__init__()
        self.process_group = _module_group(type(self).__name__, process_group)
        t = _check_temperature(temperature)
        if isinstance(t, torch.Tensor) and t.requires_grad and not learn_temperature:
            # Read once here, the tensor would never receive a gradient: a parameter silently frozen.
            raise ValueError(
                f"{type(self).__name__} reads temperature once, at construction, so a tensor that requires grad would "
                "never be learned: pass learn_temperature=True (the module then learns log_temperature from this "
                f"value), or call contrastbound.{self._function}(..., temperature=<your parameter>)"
            )
        if isinstance(t, torch.Tensor) and t.device.type == "meta":
            raise ValueError(f"temperature is a meta tensor (no value), but {type(self).__name__} reads it at "
                             "construction: pass a number (a module built on the meta device takes a number too)")
        t = float(t.detach()) if isinstance(t, torch.Tensor) else t  # read once, at construction
        if not (0.0 < t < math.inf):
            raise ValueError(f"temperature must be a positive finite number, got {t}")
        self.learn_temperature = _check_bool("learn_temperature", learn_temperature)
        self._initial_temperature = t  # for reset_parameters
        if self.learn_temperature:
            _check_storable(t, torch.get_default_dtype())
            self.log_temperature = torch.nn.Parameter(torch.tensor(math.log(t)))
        else:
            self._temperature = t
        self.normalize = _check_bool("normalize", normalize)
        self.reduction = _check_reduction(reduction)

    @property
    def temperature(self) -> float | torch.Tensor:
        return self.log_temperature.exp() if self.learn_temperature else self._temperature

    @temperature.setter
    def temperature(self, value: float | torch.Tensor) -> None:
        # A new value (a temperature schedule), checked and read now as at construction; with learn_temperature the
        # parameter log_temperature takes its log in place, so an optimiser holding it keeps its state.
        t = _check_temperature(value)
        if isinstance(t, torch.Tensor):
            if t.requires_grad:
                if self.learn_temperature:
                    raise ValueError(
                        f"{type(self).__name__}(learn_temperature=True) copies a temperature set on it into "
                        "log_temperature; the "
                        "tensor given requires grad (a graph through it would be cut): set a float or a detached "
                        "tensor, or set it under torch.no_grad()"
                    )
                raise ValueError(
                    f"{type(self).__name__} reads temperature when it is set, so a tensor that requires grad would "
                    "never be learned: use learn_temperature=True, or call "
                    f"contrastbound.{self._function}(..., temperature=<your parameter>)"
                )
            if t.device.type == "meta":  # (else torch's "Tensor.item() cannot be called on meta tensors")
                raise ValueError(f"temperature is a meta tensor (no value), but {type(self).__name__} reads it when "
                                 "it is set: pass a number")
            t = float(t)
        if not (0.0 < t < math.inf):
            raise ValueError(f"temperature must be a positive finite number, got {t}")
        if self.learn_temperature:
            _check_storable(t, self.log_temperature.dtype)
            with torch.no_grad():
                self.log_temperature.fill_(math.log(t))
            if self.log_temperature.is_meta:  # (no value to hold: to_empty + reset_parameters gives this one)
                self._initial_temperature = t
        else:
            self._temperature = t

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Sets a learnable temperature back to the value given at construction (what ``to_empty`` and FSDP's
        deferred initialisation call; a fixed temperature has nothing to reset)."""
        if self.learn_temperature:
            t0 = getattr(self, "_initial_temperature", None)
            if t0 is None:  # (a module pickled by a version without reset_parameters)
                raise RuntimeError(f"{type(self).__name__}.reset_parameters: this module does not know its initial "
                                   "temperature "
                                   "(pickled by an older contrastbound); set module.temperature instead")
            self.log_temperature.fill_(math.log(t0))

    def extra_repr(self) -> str:
        t = self.temperature
        if isinstance(t, torch.Tensor):  # (a module built on the meta device holds no value to print)
            t = "(meta)" if t.device.type == "meta" else format(float(t.detach()), "g")
        else:
            t = format(t, "g")
        decoupled = f", decoupled={getattr(self, 'decoupled', False)}" if self._takes_decoupled else ""
        return (
            f"temperature={t}, normalize={self.normalize}, reduction={self.reduction!r}, "
            f"learn_temperature={self.learn_temperature}{decoupled}"
        )


class InfoNCE(_TemperatureLoss):
    """:func:`info_nce` as a module: ``InfoNCE(temperature, normalize, reduction)(anchors, positives, negatives)``.

    ``process_group`` is passed to every call (a sharded bank, or in-batch over the global batch; see
    :func:`info_nce`); ``"world"`` is ``dist.group.WORLD`` looked up at each call, for a module built before
    ``init_process_group`` (``dist.group.WORLD`` is None until then: passed as such, the module warns).

    With ``learn_temperature=True`` the temperature is a parameter, stored as its logarithm
    (``log_temperature``) so that it stays positive under any optimiser step. A tensor ``temperature`` is read once,
    at construction (one that requires grad is refused without ``learn_temperature=True``: it would never learn).
    ``module.temperature = t`` sets a new value (a schedule), checked and read the same way; with
    ``learn_temperature=True`` it sets ``log_temperature`` in place (the optimiser keeps its parameter). Only the
    learnable one is in ``state_dict``: a fixed temperature is a hyperparameter, as ``nn.CrossEntropyLoss``'s
    options are, so a schedule's current value is the training script's to restore. ``decoupled=True``: DCL, the
    positive out of the denominator (see :func:`info_nce`).
    """

    _takes_decoupled = True

    def __init__(self, temperature: float | torch.Tensor = 0.1, normalize: bool = True, reduction: str = "mean",
                 learn_temperature: bool = False, process_group=_LOCAL, *, decoupled: bool = False) -> None:
        super().__init__(temperature, normalize, reduction, learn_temperature, process_group)
        self.decoupled = _check_bool("decoupled", decoupled)

    def forward(
        self,
        anchors: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor | None = None,
        negative_indices: torch.Tensor | None = None,
        negative_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        negative_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return info_nce(
            anchors,
            positives,
            negatives,
            negative_indices=negative_indices,
            negative_mask=negative_mask,
            labels=labels,
            negative_labels=negative_labels,
            temperature=self.temperature,
            normalize=self.normalize,
            reduction=self.reduction,
            decoupled=getattr(self, "decoupled", False),  # (a module pickled before the option: False)
            process_group=_call_group(self.process_group),
        )


class NTXent(_TemperatureLoss):
    """:func:`nt_xent` as a module: ``NTXent(temperature=0.5)(z1, z2)``; the temperature (fixed, a schedule through
    ``module.temperature = t``, or learnable with ``learn_temperature=True``), ``normalize``, ``reduction`` and
    ``process_group`` as in :class:`InfoNCE`; ``decoupled=True``: DCL (see :func:`nt_xent`)."""

    _function = "nt_xent"
    _takes_decoupled = True

    def __init__(self, temperature: float | torch.Tensor = 0.5, normalize: bool = True, reduction: str = "mean",
                 learn_temperature: bool = False, process_group=_LOCAL, *, decoupled: bool = False) -> None:
        super().__init__(temperature, normalize, reduction, learn_temperature, process_group)
        self.decoupled = _check_bool("decoupled", decoupled)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent(z1, z2, self.temperature, normalize=self.normalize, reduction=self.reduction,
                       decoupled=getattr(self, "decoupled", False), process_group=_call_group(self.process_group))


class SupCon(_TemperatureLoss):
    """:func:`supcon_loss` as a module: ``SupCon(temperature=0.1)(features, labels)``, or with a labelled bank
    ``(features, labels, bank, bank_labels)`` (a queue: :class:`NegativeQueue` with ``labels=True``); the temperature (fixed, a
    schedule through ``module.temperature = t``, or learnable with ``learn_temperature=True``), ``normalize``,
    ``reduction`` and ``process_group`` as in :class:`InfoNCE`."""

    _function = "supcon_loss"

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None, bank: torch.Tensor | None = None,
                bank_labels: torch.Tensor | None = None) -> torch.Tensor:
        return supcon_loss(features, labels, self.temperature, bank=bank, bank_labels=bank_labels,
                           normalize=self.normalize, reduction=self.reduction, process_group=_call_group(self.process_group))


class _LogitScaleLoss(_LossModule):
    """ClipLoss and SigLIP: the logit scale, learnable (the parameter ``log_logit_scale``) or fixed (a number), read
    as ``module.logit_scale`` and set by ``module.logit_scale = s`` (a schedule), checked as at construction; a
    learnable one's parameter takes log s in place, so an optimiser holding it keeps its state."""

    _settable = ("logit_scale",)
    _function = ""  # the function the module calls, for messages

    @property
    def logit_scale(self) -> float | torch.Tensor:
        """The scale (ClipLoss: before its clamp): ``log_logit_scale.exp()`` (learnable) or the fixed number."""
        return self.log_logit_scale.exp() if self.learnable else self._scale

    @logit_scale.setter
    def logit_scale(self, value: float | torch.Tensor) -> None:
        if isinstance(value, torch.Tensor):
            _check_dense("logit_scale", value)
            if value.numel() != 1 or not value.is_floating_point():
                raise TypeError(f"logit_scale must be a positive number or a floating tensor with one element, got a "
                                f"{value.dtype} tensor of shape {tuple(value.shape)}")
            if value.requires_grad:
                raise ValueError(
                    f"{type(self).__name__} reads logit_scale when it is set (a learnable one is copied into "
                    "log_logit_scale), so a tensor that requires grad would never be learned: set a float or a "
                    f"detached tensor, or call contrastbound.{self._function}(..., logit_scale=<your parameter>)"
                )
            if value.device.type == "meta":
                raise ValueError(f"logit_scale is a meta tensor (no value), but {type(self).__name__} reads it when "
                                 "it is set: pass a number")
            value = float(value)
        elif isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"logit_scale must be a positive number, got {type(value).__name__}")
        scale = self._check_scale(_as_float("logit_scale", value, "a positive finite number"))
        if not self.learnable:
            self._scale = scale
            return
        self._check_learnable(scale, self.log_logit_scale.dtype)
        with torch.no_grad():
            self.log_logit_scale.fill_(math.log(scale))
        if self.log_logit_scale.is_meta:  # (no value to hold: to_empty + reset_parameters gives this one)
            self._set_initial_scale(scale)

    def _set_initial_scale(self, scale: float) -> None:
        self._initial = scale  # (what reset_parameters restores)

    def _check_scale(self, scale: float) -> float:
        """A scale the forward takes (positive, finite), as at construction."""
        if not (0.0 < scale < math.inf):
            raise ValueError(f"logit_scale must be a positive finite number, got {scale}")
        return scale

    def _check_learnable(self, scale: float, dtype: torch.dtype) -> None:
        """log_logit_scale holds log(scale) in dtype: exp of the rounded log must read back as a scale the forward
        takes (checked on the CPU: under a meta default device the values cannot be read)."""
        back = float(torch.tensor(math.log(scale), dtype=dtype, device="cpu").exp())
        floor = _min_reciprocal(dtype) if self._takes_reciprocal else 0.0
        if not (floor <= back < math.inf and back > 0.0):
            raise ValueError(f"{type(self).__name__} learns log(logit_scale) in {dtype}: logit_scale {scale:g} (stored "
                             f"as {back:g}) must be within its range (from {floor:.3g}; .double() the module for a "
                             "wider one)")


class SigLIP(_LogitScaleLoss):
    """:func:`siglip_loss` as a module with SigLIP's learnable logit scale and bias: ``SigLIP()(image, text)``.

    With ``learnable=True`` (the default, as in the paper) the scale is a parameter stored as its logarithm,
    ``log_logit_scale`` (from log 10: it stays positive under any optimiser step), and the bias a parameter
    ``logit_bias`` (from -10); both are in ``state_dict`` and get their gradients from the fused op. With
    ``learnable=False`` both are fixed numbers (hyperparameters, not in ``state_dict``). ``module.logit_scale = s``
    sets the scale (the parameter's log in place), ``module.logit_bias = b`` (a number) the bias (the parameter in
    place). ``normalize``, ``reduction`` and ``process_group`` as in :func:`siglip_loss`. A cast that would store
    the learnable bias as inf (``.half()`` of a bias beyond 65504) raises ValueError and leaves this module as it
    was (a containing module's children cast before it stay cast); so does ``reset_parameters`` in such a dtype,
    and ``load_state_dict`` refuses such a state whole (every loss module: a scale or temperature whose exp reads back
    as 0 or inf in the parameter's dtype too).
    """

    _function = "siglip_loss"
    # The learnable scale reaches siglip_loss as a tensor, which it takes from _min_reciprocal of its dtype (as
    # clip_loss): the constructor, the setter and load_state_dict check that floor (a fixed scale is a number, no floor)
    _takes_reciprocal = True

    def __setattr__(self, name: str, value) -> None:
        # module.logit_bias = b, a number: checked as at construction; a learnable bias's parameter takes it in place
        # (an optimiser holding it keeps its state), where torch's own assignment raised TypeError. A tensor goes to
        # torch's assignment as it is (a parameter replaced; FSDP's views of the flat parameter).
        # None, too, goes to torch's assignment; so does the checked number where the parameter is gone (deleted,
        # pruned, parametrized)
        if (name == "logit_bias" and "learnable" in self.__dict__ and value is not None
                and not isinstance(value, torch.Tensor)):
            bias = _check_siglip_scalar("logit_bias", value, positive=False)
            param = self._parameters.get("logit_bias")
            if param is not None:
                stored = float(torch.tensor(bias, dtype=param.dtype, device="cpu"))
                if not math.isfinite(stored):
                    raise ValueError(f"SigLIP learns logit_bias in {param.dtype}: logit_bias {bias:g} (stored as "
                                     f"{stored:g}) must be within its range (.double() the module for a wider one)")
                with torch.no_grad():
                    param.fill_(bias)
                if param.is_meta:  # (no value to hold: to_empty + reset_parameters gives this one)
                    self._initial = (self._initial[0], bias)
                return
            value = bias
        super().__setattr__(name, value)

    def __init__(self, logit_scale: float = 10.0, logit_bias: float = -10.0, learnable: bool = True,
                 normalize: bool = True, reduction: str = "mean", process_group=_LOCAL) -> None:
        super().__init__()
        scale = _check_siglip_scalar("logit_scale", logit_scale, positive=True)
        bias = _check_siglip_scalar("logit_bias", logit_bias, positive=False)
        if isinstance(scale, torch.Tensor) or isinstance(bias, torch.Tensor):
            raise TypeError("SigLIP takes logit_scale and logit_bias as numbers (its initial values with "
                            "learnable=True); pass tensors to contrastbound.siglip_loss instead")
        self.learnable = _check_bool("learnable", learnable)
        self.normalize = _check_bool("normalize", normalize)
        self.reduction = _check_reduction(reduction)
        self.process_group = _module_group(type(self).__name__, process_group)
        self._initial = (scale, bias)
        if self.learnable:
            # checked on the CPU (under a meta default device, as FSDP's deferred initialisation builds modules,
            # the values cannot be read), then made where the default device says
            log_scale, bias_value = (torch.tensor(v, device="cpu") for v in (math.log(scale), bias))
            stored = float(log_scale.exp())
            # (siglip_loss takes a tensor scale from _min_reciprocal of its dtype: the floor of the forward)
            floor = _min_reciprocal(log_scale.dtype)
            if not (floor <= stored < math.inf and stored > 0.0 and math.isfinite(float(bias_value))):
                raise ValueError(f"SigLIP learns log(logit_scale) and logit_bias in {log_scale.dtype}: logit_scale "
                                 f"{scale:g} (stored as {stored:g}, from {floor:.3g}) and logit_bias {bias:g} must be "
                                 "within its range (.double() the module for a wider one)")
            self.log_logit_scale = torch.nn.Parameter(torch.tensor(math.log(scale)))
            self.logit_bias = torch.nn.Parameter(torch.tensor(bias))
        else:
            self._scale = scale
            self.logit_bias = bias

    def _set_initial_scale(self, scale: float) -> None:
        self._initial = (scale, self._initial[1])

    def _apply(self, fn, recurse=True):
        # A cast to a narrower dtype (.half() of a bias beyond 65504) would store the learnable bias as inf, and the
        # next forward refused "logit_bias inf", a value the user never gave: refused here instead, the module left
        # as it was (as NegativeQueue refuses such a cast of its keys). fn is tried on the 0-d bias alone first.
        bias = self._parameters.get("logit_bias")
        if bias is not None and bias.device.type != "meta":
            bias = bias.detach()  # (float() of a parameter that requires grad warns)
            cast = fn(bias)
            if cast.dtype != bias.dtype and cast.device.type != "meta" and cast.is_floating_point() and \
                    torch.finfo(cast.dtype).max < torch.finfo(bias.dtype).max and \
                    not math.isfinite(float(cast)) and math.isfinite(float(bias)):
                name = str(cast.dtype).replace("torch.", "")
                raise ValueError(f"SigLIP's logit_bias {float(bias):g} is beyond {name}'s range: a cast to {name} "
                                 f"would store it as {float(cast):g}; the module was left in {bias.dtype}")
        return super()._apply(fn, recurse)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return siglip_loss(image_features, text_features, self.logit_scale, self.logit_bias, normalize=self.normalize,
                           reduction=self.reduction, process_group=_call_group(self.process_group))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Sets learnable scale and bias back to their initial values (what ``to_empty`` and FSDP's deferred
        initialisation call)."""
        if self.learnable:
            # (a meta module cast to float16, then to_empty: the cast check saw no value; a review's find)
            stored = float(torch.tensor(self._initial[1], dtype=self.logit_bias.dtype, device="cpu"))
            if not math.isfinite(stored):
                raise ValueError(f"SigLIP learns logit_bias in {self.logit_bias.dtype}: its initial value "
                                 f"{self._initial[1]:g} (stored as {stored:g}) is beyond that range (.double() or "
                                 ".float() the module)")
            self.log_logit_scale.fill_(math.log(self._initial[0]))
            self.logit_bias.fill_(self._initial[1])

    def extra_repr(self) -> str:
        if self.learnable and self.log_logit_scale.device.type == "meta":
            values = "(meta)"
        else:
            scale, bias = (self.logit_scale.detach(), self.logit_bias.detach()) if self.learnable else \
                (self._scale, self.logit_bias)
            values = f"logit_scale={float(scale):g}, logit_bias={float(bias):g}"
        return f"{values}, learnable={self.learnable}, normalize={self.normalize}, reduction={self.reduction!r}"


class ClipLoss(_LogitScaleLoss):
    """:func:`clip_loss` as a module with CLIP's learnable logit scale: ``ClipLoss()(image, text)``.

    With ``learnable=True`` (the default, as in CLIP and open_clip) the scale is a parameter stored as its
    logarithm, ``log_logit_scale``, from log(1 / 0.07) (CLIP's initial temperature 0.07): it stays positive under
    any optimiser step; add the module's parameters to the optimiser. As open_clip clamps its parameter to
    log(100) after each optimiser step, the module clamps ``log_logit_scale`` in place (through ``.data``: autograd's
    version counter untouched) to log(``max_logit_scale``) at the start of each forward (the same values, and the
    gradient flows at the cap: a clamp inside the forward,
    as :func:`clip_loss` does for a tensor it is given, would give a scale that an optimiser step took past the cap
    no gradient, for good). Under a torch.func transform and in torch.export, which cannot write ``.data``, the
    value used is capped with that gradient (straight through) and the parameter is left as it is. With
    ``learnable=False`` the scale is a fixed number (a hyperparameter, not in
    ``state_dict``). ``module.logit_scale = s`` sets the scale (the parameter's log in place; at most
    ``max_logit_scale``, as the initial one). ``normalize``, ``reduction`` and ``process_group`` as in
    :func:`clip_loss`.
    """

    _function = "clip_loss"
    _takes_reciprocal = True

    def __init__(self, logit_scale: float = 1 / 0.07, learnable: bool = True, max_logit_scale: float = 100.0,
                 normalize: bool = True, reduction: str = "mean", process_group=_LOCAL) -> None:
        super().__init__()
        if isinstance(logit_scale, (torch.Tensor, bool)) or not isinstance(logit_scale, Real):
            raise TypeError(f"ClipLoss takes logit_scale as a number (its initial value with learnable=True), got "
                            f"{type(logit_scale).__name__}; pass a tensor to contrastbound.clip_loss instead")
        if isinstance(max_logit_scale, bool) or not isinstance(max_logit_scale, Real):
            raise TypeError(f"max_logit_scale must be a positive number, got {type(max_logit_scale).__name__}")
        self.max_logit_scale = _as_float("max_logit_scale", max_logit_scale, "positive and finite")
        if not (0.0 < self.max_logit_scale < math.inf):
            raise ValueError(f"max_logit_scale must be positive and finite, got {self.max_logit_scale}")
        if not (self.max_logit_scale >= _MIN_TEMPERATURE_F64):  # (the lowest temperature finite: as clip_loss checks)
            raise ValueError(f"max_logit_scale must be at least {_MIN_RECIPROCAL_TEXT[True]}, got "
                             f"{self.max_logit_scale}")
        scale = self._check_scale(_as_float("logit_scale", logit_scale, "a positive finite number"))
        self.learnable = _check_bool("learnable", learnable)
        self.normalize = _check_bool("normalize", normalize)
        self.reduction = _check_reduction(reduction)
        self.process_group = _module_group(type(self).__name__, process_group)
        self._initial = scale
        if self.learnable:
            self._check_learnable(scale, torch.get_default_dtype())  # (1 / scale finite in the parameter's dtype)
            self.log_logit_scale = torch.nn.Parameter(torch.tensor(math.log(scale)))
        else:
            self._scale = scale

    def _check_scale(self, scale: float) -> float:
        scale = super()._check_scale(scale)
        if not (scale >= _MIN_TEMPERATURE_F64):  # (its reciprocal, the temperature, finite: as clip_loss checks)
            raise ValueError(f"logit_scale must be at least {_MIN_RECIPROCAL_TEXT[True]}, got {scale}")
        if scale > self.max_logit_scale:
            raise ValueError(f"logit_scale ({scale:g}) must be at most max_logit_scale ({self.max_logit_scale:g})")
        return scale

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        if not self.learnable:
            return clip_loss(image_features, text_features, self._scale, normalize=self.normalize,
                             reduction=self.reduction, max_logit_scale=self.max_logit_scale,
                             process_group=_call_group(self.process_group))
        # (no read-back: the cap applied on the device.) Through .data, leaving the version counter alone: a use of
        # the parameter that autograd recorded before this forward (a penalty on the scale, computed first) failed
        # backward's in-place check at every forward, the clamp changing nothing in all but the first after a step
        # past the cap (an audit). Where it binds, that use's backward reads the capped value while its forward read
        # the uncapped one (README): the price of no read-back, off by one step's overshoot.
        log_scale = self.log_logit_scale
        if not log_scale.is_floating_point():
            # (a module moved to a complex dtype: the clamp below failed with torch's "clamp is not supported for
            # complex types"; a misuse audit)
            raise TypeError(f"logit_scale must be a real floating tensor: log_logit_scale is a {log_scale.dtype} "
                            "parameter (convert the module with .float() or .double())")
        cap = math.log(self.max_logit_scale)
        if _exporting() or _func_active():
            # torch.export lifted .data as a fake constant (non-strict) or traced the clamp away (strict: the cap
            # lost from the exported program), and a torch.func transform refuses .data (vmap over a stacked
            # ensemble's parameters). There the value used is capped, with the gradient of the in-place clamp (that
            # of the capped value, straight through), and the parameter is left as it is.
            log_scale = log_scale.detach().clamp(max=cap) + _gradient_only(log_scale)
        else:
            log_scale.data.clamp_(max=cap)
        # the scale is at most the cap now; clip_loss's own clamp set where it cannot bind, its dtype's largest
        # value (exp of a rounded log(100) in float32 is 100.0000076: a clamp at 100 would cut the gradient at the cap)
        return clip_loss(image_features, text_features, log_scale.exp(), normalize=self.normalize,
                         reduction=self.reduction, max_logit_scale=torch.finfo(self.log_logit_scale.dtype).max,
                         process_group=_call_group(self.process_group))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Sets a learnable scale back to its initial value (what ``to_empty`` and FSDP's deferred initialisation
        call)."""
        if self.learnable:
            self.log_logit_scale.fill_(math.log(self._initial))

    def extra_repr(self) -> str:
        if self.learnable and self.log_logit_scale.device.type == "meta":
            value = "(meta)"
        else:
            value = format(float(self.logit_scale.detach()) if self.learnable else self._scale, "g")
        return (f"logit_scale={value}, learnable={self.learnable}, max_logit_scale={self.max_logit_scale:g}, "
                f"normalize={self.normalize}, reduction={self.reduction!r}")
