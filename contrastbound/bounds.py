r"""Closed-form terms of the surrogate-gap sandwich (Bao, Nagano & Nozawa, ICML 2022) and the earlier bounds.

For every number of negatives K >= 1 the mean-classifier supervised loss is sandwiched by the contrastive loss::

    R_cont + Delta_L  <=  R_supv  <=  R_cont + Delta_U

Everything here is float64 numpy. ``K`` (or ``draws``) may be a Python/numpy integer or an integer array of any
shape; the result is a Python float for a scalar and an array of the same shape otherwise. The class prior is given
either as ``num_classes=C`` (uniform) or as ``prior=`` a probability vector (exactly one of the two).

Stable algorithms (docs/BOUNDS.md has the derivations):

* ``log(1 - tau_K)`` as a log-sum-exp over the distinct prior values; tau itself as a sum of positive terms.
* Binomial expectations ``E_{m ~ Bin(K, p)} g(m)`` summed over a window ``Kp +- (10 sd + 25)`` whose weights are
  running products of the exact pmf ratios outwards from the mode, normalised over the window (tail mass < e^-48);
  all (distinct prior value, K) pairs in one vectorised pass.
* The coupon-collector probability ``upsilon_n``: ``n! [z^n] prod_c (e^{pi_c z} - 1)`` as a Cauchy integral on the
  saddle-point circle (trapezoid rule, ``10 sd + 48`` points, phases reduced exactly with integer arithmetic and
  Stirling's series for ``log n!``), or past a variance of 1e8 by its saddle-point (Edgeworth) series; where the
  collision mass ``x = C (1 - 1/C)^n <= 5`` the (uniform) alternating
  inclusion-exclusion is used instead (cancellation at most e^{2x}, relative error ~1e-12); for a general prior,
  where ``s = sum_c (1 - pi_c)^n <= 5``, inclusion-exclusion over the multisets of prior groups whose terms can
  matter (pruned by ``prod_{c in S} (1 - pi_c)^n``, at most 4096 terms), accumulating ``1 - upsilon_n`` directly,
  and where that needs too many terms the first two Bonferroni terms if ``s <= 1e-5``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from numbers import Integral, Real
from typing import Any

import numpy as np

__all__ = [
    "delta_upper",
    "delta_lower",
    "supervised_loss_interval",
    "collision_probability",
    "coupon_collector_probability",
    "collision_term",
    "min_contrastive_loss",
    "min_supervised_loss",
    "arora",
    "nozawa_sato",
    "ash",
    "harmonic_number",
]

_LOG_2PI = math.log(2.0 * math.pi)
_SADDLE_SERIES_MIN_VAR = 1e8  # the coupon collector's Cauchy integral by its saddle-point series beyond this variance
_EULER_GAMMA = 0.57721566490153286061


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    """log(sum(exp(a))) along ``axis`` with the max shifted out (-inf where every entry is -inf)."""
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(a - m), axis=axis)) + np.squeeze(m, axis=axis)
_CHUNK = 1 << 21  # elements per vectorised block (keeps temporaries ~ tens of MB)


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prior:
    """A resolved class prior: distinct values and their multiplicities (a uniform prior is one group)."""

    num_classes: int
    values: np.ndarray  # (G,) distinct pi values
    counts: np.ndarray  # (G,) how many classes have that value (float64)
    uniform: bool

    @property
    def pi_max(self) -> float:
        return float(self.values.max())

    @property
    def pi_min(self) -> float:
        return float(self.values.min())

    @property
    def entropy(self) -> float:
        if self.uniform:
            return math.log(self.num_classes)
        return float(-np.sum(self.counts * self.values * np.log(self.values)))

    @cached_property
    def log1m(self) -> np.ndarray:
        """log(1 - pi) per distinct value. A class above 1/2 (there is at most one) takes the other classes' mass
        summed, not 1 - pi_c: near 1 that difference keeps only the digits of pi_c's rounding (pi_c = 1 - 1e-12:
        1e-4 relative)."""
        with np.errstate(divide="ignore"):  # -inf for a single class
            out = np.log1p(-self.values)
            top = int(np.argmax(self.values))
            if self.values[top] > 0.5:
                others = math.fsum(float(c * v) for g, (c, v) in enumerate(zip(self.counts, self.values)) if g != top)
                out[top] = math.log(others) if others > 0.0 else -math.inf
        return out


def _scalar(x: Any) -> Any:
    """A one-element torch tensor or numpy array as its Python number (then checked like one); else x."""
    if hasattr(x, "detach") and hasattr(x, "numel") and x.numel() == 1:
        return x.detach().reshape(()).item()
    if isinstance(x, np.ndarray) and x.size == 1:
        return x.reshape(()).item()
    return x


def _real_scalar(v: Any) -> bool:
    """A real number of any type (not text, bool or complex): float(v) works on it."""
    if isinstance(v, (str, bytes, bool, np.bool_, complex, np.complexfloating)):
        return False
    try:
        float(v)
    except OverflowError:
        return True  # real, beyond float64 (refused by name where converted: _as_float64)
    except (TypeError, ValueError):
        return False
    return True


def _numeric(name: str, arr: np.ndarray, what: str) -> None:
    """Refuses arrays that numpy would convert to float64 from text or by dropping an imaginary part (an object
    array passes where every element is a real number: Fraction, Decimal, mpmath, ints beyond int64)."""
    if arr.dtype.kind == "O" and all(_real_scalar(v) for v in arr.reshape(-1)):
        return
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be {what} (integers or floats), got dtype {arr.dtype}")


def _resolve_prior(num_classes: Any, prior: Any) -> _Prior:
    num_classes = _scalar(num_classes)
    if (num_classes is None) == (prior is None):
        raise ValueError(
            "pass exactly one of num_classes (uniform prior over C classes) and prior (a probability vector), "
            f"got num_classes={num_classes!r} and prior={'None' if prior is None else 'an array'}"
        )
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, Integral):
            raise TypeError(f"num_classes must be a positive int, got {type(num_classes).__name__}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes}")
        if num_classes > np.iinfo(np.int64).max:  # (1.0 / C raised a bare OverflowError past float64's range)
            digits = str(int(num_classes))
            raise ValueError(
                f"num_classes is too large (above 2^63 - 1), got {digits[0]}.{digits[1:4]}e{len(digits) - 1}"
            )
        C = int(num_classes)
        return _Prior(C, np.array([1.0 / C]), np.array([float(C)]), True)
    given_eps = None  # the machine epsilon of a floating-point tensor's own dtype (it is widened below)
    prior = _host_tensor("prior", prior)
    try:
        if hasattr(prior, "detach"):  # a torch tensor: widened first (numpy has no bfloat16)
            if prior.is_floating_point():
                import torch  # already loaded: prior is one of its tensors

                given_eps = torch.finfo(prior.dtype).eps
                prior = prior.double()
        given = np.asarray(prior)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"prior must be a 1-d array of class probabilities, got {type(prior).__name__}") from exc
    _numeric("prior", given, "a 1-d array of class probabilities")
    pi = _as_float64("prior", given)
    if pi.ndim != 1 or pi.size == 0:
        raise ValueError(f"prior must be a non-empty 1-d array of class probabilities, got shape {pi.shape}")
    if not np.all(np.isfinite(pi)):
        raise ValueError("prior must contain finite probabilities")
    if np.any(pi < 0):
        raise ValueError(f"prior must be non-negative, got min {pi.min()}")
    if np.any(pi == 0):
        raise ValueError(
            "prior must be positive: a class with zero probability has no mean (drop it and pass the rest)"
        )
    total = float(pi.sum())
    # A float32 (or half) vector cannot sum to 1 within 1e-9. Two errors remain in a vector that was normalised:
    # the rounding to the given dtype of its entries and of the total that divided them, eps / 2 each, or
    # (1 + ceil(log2 C)) eps / 2 for a total rounded to that dtype at every level of a pairwise sum: (2 + log2 C)
    # eps covers both; and the accumulation of that total, ~sqrt(C) eps of the type it was accumulated in
    # (torch.softmax over 10^6 float32 classes: 1.5e-6 = 13 eps32), never more than rounding every partial sum
    # once, ~C eps / 2. torch and numpy accumulate float16 / bfloat16 in float32, so that term takes float32's eps
    # for them: min(8 sqrt(C), C + 2) eps32. (It took the half dtype's own eps, a tolerance above 1 for bfloat16
    # past C ~ 256: 10^4 entries of 5e-4, summing to 5.0, passed and were renormalised.)
    if given_eps is None:
        given_eps = np.finfo(given.dtype).eps if np.issubdtype(given.dtype, np.floating) else 0.0
    eps = float(given_eps)
    eps_acc = min(eps, float(np.finfo(np.float32).eps))
    C = pi.size
    tol = max(1e-9, (2.0 + math.log2(C)) * eps + min(8.0 * math.sqrt(C), C + 2.0) * eps_acc)
    if abs(total - 1.0) > tol:
        raise ValueError(f"prior must sum to 1 (within {tol:.3g}), got sum {total!r}")
    pi = pi / total
    if pi.max() <= pi.min() * (1.0 + 1e-12):
        return _Prior(C, np.array([1.0 / C]), np.array([float(C)]), True)
    values, counts = np.unique(pi, return_counts=True)
    return _Prior(C, values, counts.astype(np.float64), False)


def _host_tensor(name: str, x: Any) -> Any:
    """A torch tensor detached and on the CPU (one that requires grad included; this module does not import
    torch); anything else as given. A meta tensor has no values to compute with."""
    if not (hasattr(x, "detach") and hasattr(x, "cpu")):
        return x
    if getattr(getattr(x, "device", None), "type", None) == "meta":
        raise ValueError(f"{name} is a meta tensor (no values)")
    return x.detach().cpu()


def _as_counts(name: str, K: Any, minimum: int) -> tuple[np.ndarray, bool]:
    """K as an int64 array (and whether it was a scalar); integer-valued floats are accepted."""
    if isinstance(K, bool):
        raise TypeError(f"{name} must be an integer or an integer array, got bool")
    if isinstance(K, (Iterator, set, frozenset)):
        # (numpy makes a 0-d object array of these: "got dtype object" named neither the cause nor the fix)
        raise TypeError(f"{name} must be an integer or an integer array (a list, tuple, range or array), got "
                        f"{type(K).__name__}: pass list(...) of it")
    K = _host_tensor(name, K)
    if hasattr(K, "is_floating_point") and K.is_floating_point():
        K = K.double()  # numpy has no bfloat16; float16's range would overflow the checks below
    try:
        arr = np.asarray(K)
    except (TypeError, ValueError) as exc:  # a ragged list: numpy's "inhomogeneous shape" named no argument
        raise TypeError(f"{name} must be an integer or an integer array, got {type(K).__name__}") from exc
    if arr.dtype.kind == "O" and arr.size and all(isinstance(v, Integral) and not isinstance(v, bool)
                                                  for v in arr.reshape(-1)):
        # Python ints beyond int64 (numpy's ints stop there): named by the value out of range, with its side.
        values = [int(v) for v in arr.reshape(-1)]
        low, high = min(values), max(values)
        if low < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {low}")
        if high > np.iinfo(np.int64).max:
            raise ValueError(f"{name} is too large (above 2^63 - 1), got {high}")
        arr = np.array(values, dtype=np.int64).reshape(arr.shape)  # (an object array of small ints: as int64)
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be an integer or an integer array, got dtype {arr.dtype}")
    if isinstance(K, (list, tuple)) and arr.size and \
            any(isinstance(v, (bool, np.bool_)) for v in np.asarray(K, dtype=object).reshape(-1)):
        # (numpy reads [True, 2] as the ints [1, 2]: a bool among the counts is refused, as a bool K is)
        raise TypeError(f"{name} must be an integer or an integer array, got a bool among its values")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(f"{name} must be integer-valued, got non-integer values")
        if arr.size and np.abs(arr).max() > 2.0**53:
            # (a float there is an integer, but not necessarily the one meant: float64's spacing is 2 or more)
            raise ValueError(f"{name} as a float must be at most 2^53, where float64 holds every integer, got "
                             f"{int(np.abs(arr).max())}: pass it as an int")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} is too large (above 2^63 - 1), got {arr.max()}")
    out = arr.astype(np.int64)
    if out.size and out.min() < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {out.min()}")
    return out, arr.ndim == 0


def _as_loss(name: str, value: Any) -> np.ndarray:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a real number or array, got bool")
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor (e.g. contrastive_loss_estimate's
        value = _host_tensor(name, value)  # result, which may require grad)
        value = value.double() if value.is_floating_point() else value  # numpy has no bfloat16
    try:
        given = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a real number or array, got {type(value).__name__}") from exc
    _numeric(name, given, "a real number or array")
    r = _as_float64(name, given)
    # A contrastive loss log(1 + sum_k e^{...}) is finite and never negative: -1 gave an interval below 0 and the
    # earlier bounds negative values, inf an interval (inf, inf) (a misuse audit). NaN passes (an estimate that is
    # missing: gap_report passes them through) and gives NaN.
    bad = ~(np.isnan(r) | ((r >= 0.0) & (r < math.inf)))
    if np.any(bad):
        first = float(r.reshape(-1)[np.argmax(bad.reshape(-1))])
        got = f"{first}" if r.ndim == 0 else f"{first} ({int(bad.sum())} of its {r.size} entries out of range)"
        raise ValueError(f"{name} must be finite and >= 0 (a contrastive loss is never negative), got {got}")
    return r


def _as_float64(name: str, given: np.ndarray) -> np.ndarray:
    """given as float64; a number beyond float64 (a Python int such as 10**400) named, not a bare OverflowError."""
    try:
        return given.astype(np.float64)
    except OverflowError as exc:
        raise ValueError(f"{name} holds a number too large for float64") from exc


def _positive_number(name: str, value: Any) -> float:
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a positive finite number, got {type(value).__name__}")
    try:
        x = float(value)
    except OverflowError:
        # an int beyond float64 (its float() would say inf, and -10**400 is not +inf): named with its sign
        sign = "a negative" if value < 0 else "an"
        raise ValueError(f"{name} must be a positive finite number, got {sign} integer beyond float64's "
                         "range") from None
    if not math.isfinite(x) or x <= 0.0:
        raise ValueError(f"{name} must be a positive finite number, got {x}")
    return x


def _score_bound(norm_bound: Any, temperature: Any) -> float:
    """b^2, the bound on every score |f(x).f(x')|: ``norm_bound ** 2``, or ``1 / temperature`` (L2-normalised
    features scored at that temperature); at most one of them given, b = 1 when neither is."""
    if norm_bound is not None and temperature is not None:
        raise ValueError("pass norm_bound or temperature, not both (temperature t stands for norm_bound = t^(-1/2): "
                         "L2-normalised features scored at temperature t)")
    if temperature is not None:
        t = _positive_number("temperature", temperature)
        b2 = 1.0 / t
        if not math.isfinite(b2):  # (5.56e-309 = 1 / DBL_MAX itself has an infinite reciprocal, rounded)
            raise ValueError(f"temperature must be above {1.0 / sys.float_info.max:.3g} (1 / t must be a finite "
                             f"float64), got {t}")
        return b2
    if norm_bound is None:
        return 1.0
    b = _positive_number("norm_bound", norm_bound)
    b2 = b * b
    if not math.isfinite(b2):  # (as temperature: the bounds would be +-inf without a word)
        raise ValueError(f"norm_bound must be at most {math.sqrt(sys.float_info.max)!r} (norm_bound^2 must be a "
                         f"finite float64), got {b!r}")
    return b2


def _check_form(form: Any, allowed: tuple[str, ...], name: str = "form") -> str:
    if not isinstance(form, str) or form not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {form!r}")
    return form


def _check_log(log: Any) -> bool:
    if not isinstance(log, (bool, np.bool_)):
        raise TypeError(f"log must be a bool, got {type(log).__name__} {log!r}")
    return bool(log)


def _broadcast(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a and b broadcast together (numpy's rules), or a ValueError that names both arguments."""
    try:
        return np.broadcast_arrays(a, b)
    except ValueError:
        raise ValueError(
            f"{name_a} (shape {np.shape(a)}) and {name_b} (shape {np.shape(b)}) must broadcast together"
        ) from None


def _out(values: np.ndarray, scalar: bool) -> Any:
    values = np.asarray(values, dtype=np.float64)
    return float(values.reshape(())) if scalar else values


def _log_cosh(x: float) -> float:
    """log cosh(x) without overflow: |x| + log1p(e^{-2|x|}) - log 2; below 1, log1p(2 sinh(x/2)^2) (= log1p(cosh x
    - 1)), which keeps its relative digits as x -> 0 (the first form cancels to ~1e-16 absolute: log cosh(1e-8) =
    5e-17 came out 1.1e-16)."""
    x = abs(x)
    if x < 1.0:
        return math.log1p(2.0 * math.sinh(0.5 * x) ** 2)
    return x + math.log1p(math.exp(-2.0 * x)) - math.log(2.0)


def _require_uniform(fn: str, p: _Prior) -> None:
    if not p.uniform:
        raise ValueError(
            f"{fn}: prior must be uniform: this earlier bound is a uniform-prior formula and plugging a non-uniform "
            "prior into it is not a valid bound (pass num_classes=C, or a uniform prior)"
        )


# ----------------------------------------------------------------------------------------------------------
# The sandwich constants
# ----------------------------------------------------------------------------------------------------------


def delta_upper(
    K: Any, num_classes: int | None = None, prior: Any = None, norm_bound: float | None = None, form: str = "best",
    *, temperature: float | None = None,
) -> Any:
    r"""Delta_U: ``R_supv <= R_cont + Delta_U`` for every K >= 1.

    ``form="paper"``: the paper's ``log(pi_max C^2 cosh(b^2)^2 / K)``.
    ``form="best"`` (default): ``log(cosh(b^2)^2 / K) + min(log(pi_max C^2), -log pi_min)``; both terms of the
    min are valid constants for any prior, and for a uniform prior both equal log C (the paper's value).

    Args:
        K: number of negatives, integer >= 1 (scalar or array).
        num_classes / prior: the class prior, exactly one of them.
        norm_bound: b with ``||f(x)|| <= b`` (default 1).
        form: "best" or "paper".
        temperature: instead of ``norm_bound``, for L2-normalised features scored at temperature t: b^2 = 1 / t
            (so ``temperature=0.1`` is ``norm_bound=10 ** 0.5``, without the rounding of the square root). At most
            one of the two; the same in every function here that takes ``norm_bound``.
    """
    k, scalar = _as_counts("K", K, 1)
    p = _resolve_prior(num_classes, prior)
    b2 = _score_bound(norm_bound, temperature)
    form = _check_form(form, ("best", "paper"))
    C = p.num_classes
    if p.uniform:
        head = math.log(C)
    elif form == "paper":
        head = math.log(p.pi_max) + 2.0 * math.log(C)
    else:
        head = min(math.log(p.pi_max) + 2.0 * math.log(C), -math.log(p.pi_min))
    return _out(head + 2.0 * _log_cosh(b2) - np.log(k.astype(np.float64)), scalar)


def delta_lower(
    K: Any, num_classes: int | None = None, prior: Any = None, norm_bound: float | None = None, form: str = "paper",
    *, temperature: float | None = None,
) -> Any:
    r"""Delta_L: ``R_cont + Delta_L <= R_supv`` for every K >= 1.

    ``form="paper"`` (default): the paper's ``H(pi) + log K - 2 log(1 + K) - 2 log cosh(b^2)`` (H in nats). It is
    proved for a uniform prior and held in every exact check for other priors, but is not proved for them.
    ``form="proved"``: ``-2 log cosh(b^2) - sum_c pi_c log max(1 + K pi_c, K pi_max)``, proved for any prior
    (uniform: ``-log(1 + K/C) - 2 log cosh(b^2)``). Against the paper's: for a uniform prior never tighter when
    C >= 3 (equal at C = 3, K = 1), tighter when C = 2; for a non-uniform prior tighter at small K (pi = (0.9, 0.1),
    K = 1: -1.45 against -1.93), looser at large K (the difference paper - proved tends to H(pi) + log pi_max >= 0;
    (0.9, 0.1), K = 32: -4.26 against -4.07).
    """
    k, scalar = _as_counts("K", K, 1)
    p = _resolve_prior(num_classes, prior)
    b2 = _score_bound(norm_bound, temperature)
    form = _check_form(form, ("paper", "proved"))
    kf = k.astype(np.float64)
    lc = 2.0 * _log_cosh(b2)
    if form == "paper":
        return _out(p.entropy + np.log(kf) - 2.0 * np.log1p(kf) - lc, scalar)
    if p.uniform:
        return _out(-np.log1p(kf / p.num_classes) - lc, scalar)
    # sum_c pi_c log max(1 + K pi_c, K pi_max): classes with pi_c < pi_max - 1/K take the constant log(K pi_max);
    # the others (those close to pi_max) are summed directly.
    order = np.argsort(p.values)
    vals, cnts = p.values[order], p.counts[order]
    mass_below = np.concatenate([[0.0], np.cumsum(cnts * vals)])
    flat = kf.reshape(-1)
    cut = np.searchsorted(vals, p.pi_max - 1.0 / flat, side="left")
    acc = mass_below[cut] * np.log(flat * p.pi_max)
    active = vals.size - cut  # how many classes are compared through 1 + K pi_c, per K
    by_width = np.argsort(active, kind="stable")
    widths = active[by_width]  # ascending: a block's last row is its widest
    budget = 1 << 18  # elements of a (rows, W) temporary
    start = 0
    while start < flat.size:
        n = min(flat.size - start, max(1, budget // max(1, int(widths[start]))))
        if n > 1 and n * int(widths[start + n - 1]) > budget:  # sized by the widest row, never the narrowest
            n = max(1, budget // int(widths[start + n - 1]))
        rows = by_width[start : start + n]
        W = int(widths[start + n - 1])
        j = cut[rows][:, None] + np.arange(W)[None, :]
        inside = j < vals.size
        jc = np.minimum(j, vals.size - 1)
        kk = flat[rows][:, None]
        v = vals[jc]
        term = np.where(inside, cnts[jc] * v * np.log(np.maximum(1.0 + kk * v, kk * p.pi_max)), 0.0)
        acc[rows] += term.sum(1)
        start += rows.size
    return _out(-acc.reshape(kf.shape) - lc, scalar)


def supervised_loss_interval(
    contrastive_loss: Any,
    K: Any,
    num_classes: int | None = None,
    prior: Any = None,
    norm_bound: float | None = None,
    upper_form: str = "best",
    lower_form: str = "paper",
    *,
    temperature: float | None = None,
) -> tuple[Any, Any]:
    """The interval ``(R_cont + Delta_L, R_cont + Delta_U)`` that contains R_supv (broadcast over loss and K);
    ``norm_bound`` or ``temperature`` as in :func:`delta_upper`."""
    r = _as_loss("contrastive_loss", contrastive_loss)
    # (named here: delta_lower / delta_upper call theirs "form", an argument this function does not have)
    lower_form = _check_form(lower_form, ("paper", "proved"), "lower_form")
    upper_form = _check_form(upper_form, ("best", "paper"), "upper_form")
    lo = delta_lower(K, num_classes, prior, norm_bound, form=lower_form, temperature=temperature)
    hi = delta_upper(K, num_classes, prior, norm_bound, form=upper_form, temperature=temperature)
    r_b, lo_b = _broadcast("contrastive_loss", r, "K", np.asarray(lo))
    lo_v, hi_v = r_b + lo_b, r_b + np.broadcast_to(np.asarray(hi), lo_b.shape)
    if lo_v.ndim == 0:
        return float(lo_v), float(hi_v)
    return lo_v, hi_v


# ----------------------------------------------------------------------------------------------------------
# Collision probability tau_K
# ----------------------------------------------------------------------------------------------------------


def _rows(n: int, G: int):
    """Row blocks so that a (rows, G) temporary stays around a million elements."""
    step = max(1, (1 << 20) // max(1, G))
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


def _log_one_minus_tau(k: np.ndarray, p: _Prior) -> np.ndarray:
    kf = k.astype(np.float64).reshape(-1, 1)
    out = np.empty(kf.shape[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        l1p = p.log1m  # -inf for a single class
        logw = np.log(p.counts * p.values)
        for sl in _rows(kf.shape[0], p.values.size):
            terms = logw[None, :] + np.where(kf[sl] == 0, 0.0, kf[sl] * l1p[None, :])
            out[sl] = _logsumexp(terms, axis=1)
    out[kf[:, 0] == 0] = 0.0  # tau_0 = 0 exactly (the sum of the renormalised prior is 1 only to rounding)
    return out.reshape(k.shape)


def collision_probability(K: Any, num_classes: int | None = None, prior: Any = None, *, log: bool = False) -> Any:
    r"""tau_K: probability that the anchor's class is among K i.i.d. negatives.

    Uniform: ``1 - (1 - 1/C)^K``; general prior: ``sum_c pi_c (1 - (1 - pi_c)^K)``. With ``log=True`` returns
    ``log(1 - tau_K)`` (which the direct power underflows for large K).
    """
    k, scalar = _as_counts("K", K, 0)
    p = _resolve_prior(num_classes, prior)
    if _check_log(log):
        return _out(_log_one_minus_tau(k, p), scalar)
    kf = k.astype(np.float64).reshape(-1, 1)
    tau = np.empty(kf.shape[0])
    weights = p.counts * p.values
    with np.errstate(divide="ignore", invalid="ignore"):
        l1p = p.log1m
        for sl in _rows(kf.shape[0], p.values.size):
            # 1 - tau = sum_c pi_c (1 - pi_c)^K; where it is <= 1/2, tau = 1 - (1 - tau) loses nothing
            kb = kf[sl]
            # (clamped at e^-700: denormal exponentials are slow, and such terms are far below rounding)
            rest = np.exp(np.maximum(np.where(kb == 0, 0.0, kb * l1p[None, :]), -700.0)) @ weights
            tau[sl] = 1.0 - rest
            small = rest > 0.5
            if np.any(small):  # small tau: a sum of positive terms -expm1(K log1p(-pi_c)), no cancellation
                tau[sl][small] = -np.expm1(np.where(kb[small] == 0, 0.0, kb[small] * l1p[None, :])) @ weights
    return _out(tau.reshape(k.shape), scalar)


# ----------------------------------------------------------------------------------------------------------
# Coupon collector upsilon_n
# ----------------------------------------------------------------------------------------------------------


def _stirlerr(n: np.ndarray) -> np.ndarray:
    """log n! - [(n + 1/2) log n - n + log(2 pi)/2], accurate also for huge n (no cancellation)."""
    n = np.asarray(n, dtype=np.float64)
    out = np.empty_like(n)
    small = n < 15
    ns = n[small]
    out[small] = np.array([math.lgamma(v + 1.0) for v in ns]) - (ns + 0.5) * np.log(ns) + ns - 0.5 * _LOG_2PI
    nl = n[~small]
    n2 = 1.0 / (nl * nl)
    out[~small] = (1.0 / 12 - n2 * (1.0 / 360 - n2 * (1.0 / 1260 - n2 * (1.0 / 1680 - n2 / 1188)))) / nl
    return out


def _expm1_complex(w: np.ndarray) -> np.ndarray:
    """e^w - 1 for complex w without cancellation near w = 0."""
    a, b = w.real, w.imag
    em = np.expm1(a)
    s = np.sin(0.5 * b)
    re = em * np.cos(b) - 2.0 * s * s
    im = np.exp(a) * np.sin(b)
    return re + 1j * im


def _log1mexp(x: np.ndarray) -> np.ndarray:
    """log(1 - e^{-x}) for x >= 0: log1p(-e^{-x}) above log 2, where 1 - e^{-x} rounds near 1 and its log would
    carry eps / 2 absolute (times C classes: the saddle-point series read log upsilon -15.0 for -15.44 at
    C = 2^53 + 1, n = 34 C); log(-expm1(-x)) below."""
    with np.errstate(divide="ignore"):
        big = x > math.log(2.0)
        return np.where(big, np.log1p(-np.exp(-np.where(big, x, 1.0))), np.log(-np.expm1(-np.where(big, 1.0, x))))


def _log_expm1_over(s: np.ndarray) -> np.ndarray:
    """log((e^s - 1) / s) for real s (0 at s = 0): its series s/2 + s^2/24 for |s| < 1e-5 (error < 1e-22), else
    s + log(1 - e^{-s}) - log s above 0 (no overflow) and log(1 - e^s) - log(-s) below."""
    small = np.abs(s) < 1e-5
    pos = s >= 1e-5
    sp = np.where(pos, s, 1.0)
    sn = np.where(pos | small, -1.0, s)
    return np.where(
        small, s * (0.5 + s / 24.0), np.where(pos, sp + _log1mexp(sp) - np.log(sp), np.log(-np.expm1(sn)) - np.log(-sn))
    )


def _mu(x: np.ndarray) -> np.ndarray:
    """Mean of the zero-truncated Poisson(x): x / (1 - e^{-x}) (1 at x = 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(x > 1e-300, x / -np.expm1(-np.maximum(x, 1e-300)), 1.0 + 0.5 * x)


def _dmu(x: np.ndarray) -> np.ndarray:
    """d mu / dx = (1 - e^{-x} - x e^{-x}) / (1 - e^{-x})^2; its series 1/2 + x/6 (error x^3 / 180 < 1e-17) below
    x = 1e-5, where the numerator cancels (and both underflow to 0/0 below x ~ 1e-154: a prior with a class of
    1e-200 gave NaN)."""
    xs = np.maximum(x, 1e-5)
    em = -np.expm1(-xs)
    return np.where(x < 1e-5, 0.5 + x / 6.0, (em - xs * np.exp(-xs)) / (em * em))


def _bernoulli_over_factorial(count: int) -> np.ndarray:
    """B_m / m! for m = 0 .. count - 1 (B_1 = -1/2), exact in fractions, then rounded."""
    from fractions import Fraction

    b: list[Fraction] = []
    for m in range(count):  # sum_{k <= m} binom(m + 1, k) B_k = 0 for m >= 1
        b.append(Fraction(1) if m == 0 else -sum(math.comb(m + 1, k) * b[k] for k in range(m)) / (m + 1))
    return np.array([float(v / math.factorial(m)) for m, v in enumerate(b)])


_BERN = _bernoulli_over_factorial(48)
# x^a u^b terms of D^j (x u), u = 1 / (e^x - 1), D = x d/dx, for j = 1 .. 5: D(x^a u^b) = a x^a u^b - b x^{a+1}
# (u^b + u^{b+1}) (u' = -(u + u^2)).
def _xu_polynomials(count: int) -> list[dict[tuple[int, int], int]]:
    """{(a, b): coefficient} of D^j (x u) for j = 1 .. count."""
    out, term = [], {(1, 1): 1}
    for _ in range(count):
        nxt: dict[tuple[int, int], int] = {}
        for (a, b), c in term.items():
            for key, v in (((a, b), a * c), ((a + 1, b), -b * c), ((a + 1, b + 1), -b * c)):
                nxt[key] = nxt.get(key, 0) + v
        term = {k: v for k, v in nxt.items() if v}
        out.append(term)
    return out


_XU_POLY = _xu_polynomials(5)


def _ztp_cumulants(x: np.ndarray) -> list[np.ndarray]:
    """kappa_2 .. kappa_6 of the zero-truncated Poisson(x): kappa_{j+1} = D^j mu(x) with D = x d/dx and
    mu(x) = x + x u, u = 1 / (e^x - 1). Below x = 1 from x u = sum_m B_m x^m / m! (D^j x^m = m^j x^m; the series'
    terms fall like (x / 2 pi)^m), above as polynomials in x and u. They enter only the saddle-point corrections,
    terms of order 1/var and 1/var^2, so a relative error of 1e-12 in them would not show."""
    out = []
    small = x < 1.0
    xs = np.where(small, x, 0.0)
    xl = np.where(small, 1.0, x)
    with np.errstate(over="ignore"):
        u = 1.0 / np.expm1(xl)  # 0 for x past ~710
    m = np.arange(1, _BERN.size)
    powers = xs[..., None] ** m
    for j in range(1, 6):
        series = xs + powers @ (m.astype(np.float64) ** j * _BERN[1:])
        poly = xl.copy()
        for (a, b), c in _XU_POLY[j - 1].items():
            poly = poly + c * xl**a * u**b
        out.append(np.where(small, series, poly))
    return out


def _mu_m1(x: np.ndarray) -> np.ndarray:
    """mu(x) - 1 = x / (1 - e^{-x}) - 1 without the cancellation near x = 0: below x = 0.1 its series
    x / 2 + x^2 / 12 - x^4 / 720 + x^6 / 30240 - x^8 / 1209600 (the next term < 5e-17 of the sum), above directly
    (relative error < 20 eps)."""
    small = x < 0.1
    x2 = x * x
    series = x * 0.5 + x2 * (1.0 / 12 + x2 * (-1.0 / 720 + x2 * (1.0 / 30240 - x2 / 1209600)))
    return np.where(small, series, _mu(np.where(small, 1.0, x)) - 1.0)


_SINHC_SERIES = (1.0 / 24, -1.0 / 2880, 1.0 / 181440, -1.0 / 9676800, 1.0 / 479001600)


def _log_sinhc_half(w: np.ndarray) -> np.ndarray:
    """log(sinh(w/2) / (w/2)) = w^2/24 - w^4/2880 + ... for |w| < 0.2 (the next term < 5e-18 |w|^2)."""
    w2 = w * w
    acc = np.zeros_like(w)
    for c in reversed(_SINHC_SERIES):
        acc = acc * w2 + c
    return acc * w2


def _saddle_radius(n: np.ndarray, p: _Prior) -> np.ndarray:
    """r with sum_c mu(pi_c r) = n (n > C); Newton on a convex increasing function from the right."""
    if p.uniform:
        C = p.num_classes
        # mu(x) - 1 = (n - C) / C, the excess formed in integers: n / C - 1 lost it past 2^53 classes (n = C + 1
        # read as C: x = 0, and log upsilon NaN)
        excess = (n - C).astype(np.float64) / C
        x = np.where(excess < 1.0, 2.0 * excess, excess + 1.0)
        for _ in range(60):
            step = (_mu_m1(x) - excess) / _dmu(x)
            x = np.maximum(x - step, 0.5 * x)
            if np.all(np.abs(step) <= 1e-14 * x):
                break
        return x * C
    n = n.astype(np.float64)
    r = n.copy()  # mu(x) >= x so the root is <= n
    vals, cnts = p.values[None, :], p.counts[None, :]
    for _ in range(200):
        x = r[:, None] * vals
        mu = _mu(x)
        f = (cnts * mu).sum(1) - n
        df = (cnts * vals * _dmu(x)).sum(1)
        step = f / df
        r = np.maximum(r - step, 0.5 * r)
        if np.all(np.abs(step) <= 1e-13 * r):
            break
    return r


def _bonferroni_s2_series(n: np.ndarray, p: _Prior, max_terms: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """S2 = sum_{c < c'} (1 - pi_c - pi_c')^n in O(G) per n and term, for priors with too many groups for the pairs:
    (1 - pi_c - pi_c')^n = t_c t_c' (1 - a_c a_c')^n with t = (1 - pi)^n, a = pi / (1 - pi), and the binomial series
    of (1 - y)^n separates, S2 = sum_k (-1)^k binom(n, k) [U_k^2 - V_k] / 2, U_k = sum_c t_c a_c^k, V_k = sum_c t_c^2
    a_c^2k (sums over classes: groups weighted by their counts; V_k removes the pairs of a class with itself). Each
    of binom(n, k)^{1/2} a^k is carried in logs. Where S2 matters every t_c <= s <= 1e-5, so n pi_c >= 11.5 and a pair
    whose t_c t_c' is not negligible has n a_c a_c' ~ (n pi_c)(n pi_c') / n small: the terms fall fast. Returns (S2,
    converged) per n; rows not converged within max_terms terms (a term above 1e-17 of the sum) keep S1 alone."""
    la = np.log(p.values) - p.log1m  # log a
    out = np.zeros(n.size)
    ok = np.zeros(n.size, dtype=bool)
    step = max(1, _CHUNK // max(1, p.values.size))
    for s0 in range(0, n.size, step):
        nb = n[s0 : s0 + step, None]
        base = nb * p.log1m[None, :]  # log t, (rows, G)
        lbin = np.zeros((nb.shape[0], 1))  # log binom(n, k)
        total = np.zeros(nb.shape[0])
        done = np.zeros(nb.shape[0], dtype=bool)
        for k in range(max_terms):
            lw = base + 0.5 * lbin + k * la[None, :]  # log(binom(n, k)^{1/2} t a^k)
            with np.errstate(under="ignore"):
                w = np.exp(lw)
                U = w @ p.counts
                V = (w * w) @ p.counts
            term = 0.5 * (U * U - V) * (1.0 if k % 2 == 0 else -1.0)
            total += np.where(done, 0.0, term)
            done |= (k >= 2) & (np.abs(term) <= 1e-17 * np.abs(total))
            if np.all(done):
                break
            lbin = lbin + np.log((nb - k) / (k + 1.0))
        out[s0 : s0 + step] = total
        ok[s0 : s0 + step] = done
    return out, ok


def _log_coupon_bonferroni2(n: np.ndarray, p: _Prior, log_s1: np.ndarray) -> np.ndarray:
    """log upsilon_n = log(1 - S1 + S2 - S3 + ...) from its first two Bonferroni terms, for S1 = s <= 1e-6:
    S1 = sum_c (1 - pi_c)^n, S2 = sum_{c < c'} (1 - pi_c - pi_c')^n; S3 <= S1^3 / 6, so the relative error of
    log upsilon ~ S1 is <= S1^2 / 6 (the first term alone: S2 / S1, up to S1 / 2). S2 over pairs of prior groups
    and pairs within one, for all n at once in blocks of ~2^22 (n, pair) entries; with more than 2048 groups by a
    series in O(G) per n (_bonferroni_s2_series; the first term alone before: 4.5e-6 relative at 2500 groups,
    s = 9e-6); where S1 < 1e-16 it is below double precision and left out."""
    s1 = np.exp(log_s1)
    out = np.log1p(-s1)
    rows = np.nonzero(s1 >= 1e-16)[0]
    G = p.values.size
    if rows.size == 0:
        return out
    if G > 2048:
        s2, ok = _bonferroni_s2_series(n[rows].astype(np.float64), p)
        out[rows[ok]] = np.log1p(-(s1[rows[ok]] - s2[ok]))
        return out
    g, h = np.triu_indices(G)
    with np.errstate(divide="ignore"):
        # log (1 - pi_g - pi_h) and the pairs' multiplicity: c_g c_h, or binom(c_g, 2) within a group
        log_base = np.log1p(-np.minimum(p.values[g] + p.values[h], 1.0))
    mult = np.where(g == h, p.counts[g] * (p.counts[g] - 1.0) / 2.0, p.counts[g] * p.counts[h])
    used = (mult > 0) & np.isfinite(log_base)
    log_base, mult = log_base[used], mult[used]
    step = max(1, (1 << 22) // max(1, log_base.size))
    for b0 in range(0, rows.size, step):
        r = rows[b0 : b0 + step]
        s2 = np.exp(n[r, None].astype(np.float64) * log_base[None, :]) @ mult
        out[r] = np.log1p(-(s1[r] - s2))
    return out


def _log_coupon_cauchy(n: np.ndarray, p: _Prior) -> np.ndarray:
    """log upsilon_n for n > C by the trapezoid rule on the saddle-point circle, or by the integral's saddle-point
    series where the tilted count's variance passes _SADDLE_SERIES_MIN_VAR."""
    out = np.empty(n.shape, dtype=np.float64)
    if n.size == 0:
        return out
    nf = n.astype(np.float64)
    r = _saddle_radius(n, p)
    x = r[:, None] * p.values[None, :]  # (N, G)
    mu = _mu(x)
    # variance mu (1 + x - mu), with 1 + x - mu = 1 - x / (e^x - 1): formed as written it cancelled to 0 once 1 + x
    # == x (x >= 2^53: a dominant class at ~1e17 draws), and M = 50 points for a true sd ~ 3e8 gave upsilon > 1
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        excess = np.where(x > 1e-300, 1.0 - x / np.expm1(np.maximum(x, 1e-300)), 0.5 * x)
    var = (p.counts[None, :] * mu * excess).sum(1)
    # Where var is large the trapezoid sum (10 sd points over the circle, ~0.1 sd of them inside the cut below: 4e8
    # points, and the memory for them in one block, at C = 2^55, n = 2C) gives way to its saddle-point series: the
    # integral over the circle divided by the value at theta = 0 is P(X = n) for X the sum of independent
    # zero-truncated Poisson(x_c) variables (mean n at the saddle point), and its local Edgeworth expansion at the
    # mean is (1 + rho4 / 8 - 5 rho3^2 / 24 + [-rho6 / 48 + 35 rho4^2 / 384 + 7 rho3 rho5 / 48 - 35 rho3^2 rho4 / 64
    # + 385 rho3^4 / 1152]) / sqrt(2 pi var), rho_j = kappa_j / var^{j/2} = O(var^{1 - j/2}): the first omitted
    # terms are O(1 / var^3), below 1e-24 past var = 1e8, where the trapezoid rule needs 1e5 points.
    series = var > _SADDLE_SERIES_MIN_VAR
    # log of the integrand's modulus at theta = 0, with log n! by Stirling so nothing large cancels:
    # log n! - n log r + sum_c log(e^{x_c} - 1) = stirlerr(n) + log(2 pi n)/2 + n (log n - log r) + r - n
    #   ... with sum_c log(e^{x_c} - 1) = r + sum_c log(1 - e^{-x_c}). Near r = n, r - n + n (log n - log r) =
    #   n (u - log1p(u)) with u = r/n - 1 (no cancellation); far from it (n ~ C, r << n) log1p(u) of u ~ -1 would
    #   lose n eps of absolute accuracy, so the logs are taken directly there.
    u = r / nf - 1.0
    near = np.abs(u) < 0.5
    with np.errstate(invalid="ignore", divide="ignore"):  # (u rounds to -1 for r << n past 2^53: that branch unused)
        mid = np.where(near, nf * (u - np.log1p(u)), r - nf + nf * (np.log(nf) - np.log(r)))
    log_base = (
        _stirlerr(nf)
        + 0.5 * (_LOG_2PI + np.log(nf))
        + mid
        + (p.counts[None, :] * _log1mexp(x)).sum(1)
    )
    if np.any(series):
        ks = [(p.counts[None, :] * k).sum(1) for k in _ztp_cumulants(x[series])]
        v = ks[0]
        rho3, rho4, rho5, rho6 = (ks[j - 2] / v ** (0.5 * j) for j in (3, 4, 5, 6))
        first = rho4 / 8.0 - 5.0 * rho3**2 / 24.0
        second = (
            -rho6 / 48.0 + 35.0 * rho4**2 / 384.0 + 7.0 * rho3 * rho5 / 48.0 - 35.0 * rho3**2 * rho4 / 64.0
            + 385.0 * rho3**4 / 1152.0
        )
        out[series] = log_base[series] - 0.5 * (_LOG_2PI + np.log(v)) + np.log1p(first + second)
        if np.all(series):
            return out
        keep = ~series  # the trapezoid rule for the rest
        n, nf, r, x, var, log_base = n[keep], nf[keep], r[keep], x[keep], var[keep], log_base[keep]
        todo = np.nonzero(keep)[0]
    else:
        todo = np.arange(n.size)
    excess = n - int(p.num_classes)  # draws beyond one per class (int64)
    # aliasing error ~ exp(-M^2 / (2 sd^2)) < e^-50 relative (plus the lattice terms at small sd: the +48)
    M = 2 * np.ceil((10.0 * np.sqrt(np.maximum(var, 0.0)) + 48.0) / 2.0).astype(np.int64)
    log1mex = _log1mexp(x)  # (N, G): log(1 - e^{-x})
    log_e0 = x + log1mex  # log(e^x - 1) without overflow, subtracted below
    # Only the arc where the integrand can matter is summed. Each class's factor |e^w - 1| / (e^x - 1) is bounded
    # by a function of s = x cos(theta), so decreasing on [0, pi]: by (e^s + 1) / (e^x - 1), and, as e^w - 1 =
    # w int_0^1 e^{t w} dt, by [(e^s - 1) / s] / [(e^x - 1) / x] (exact at theta = 0; the first alone exceeds 1 for
    # x < log 3 at every angle, so with many small classes it kept the whole circle: 399 of 400 points where ~20
    # matter at C = 2e4, n = 25000). Beyond the angle where the product of the smaller bounds falls under e^-60
    # (relative to theta = 0) the points are dropped (their total is < e^-60 * sd relative to the result).
    log_ratio_x = _log_expm1_over(x)

    def bound(theta: np.ndarray) -> np.ndarray:
        s = x * np.cos(theta)[:, None]
        tight = np.minimum(np.logaddexp(s, 0.0) - log_e0, _log_expm1_over(s) - log_ratio_x)
        return (p.counts[None, :] * tight).sum(1)

    lo_t, hi_t = np.zeros(n.size), np.full(n.size, np.pi)
    cut = bound(hi_t) > -60.0  # the whole circle is needed
    # hi_t stays on the dropped side, so the steps only need to resolve the points' spacing 2 pi / M: k steps leave
    # pi / 2^k, at most one point more than the exact angle would keep
    for _ in range(max(1, int(np.ceil(np.log2(max(2, int(M.max()))))) - 1)):
        mid = 0.5 * (lo_t + hi_t)
        above = bound(mid) > -60.0
        lo_t = np.where(above, mid, lo_t)
        hi_t = np.where(above, hi_t, mid)
    theta_star = np.where(cut, np.pi, hi_t)
    half_full = M // 2
    half = np.minimum(half_full, np.ceil(theta_star * M / (2.0 * np.pi)).astype(np.int64) + 1)
    G = p.values.size
    # points per block: the loop below runs over the G groups with (points,) temporaries, so a block of 2^14 points
    # stays in cache whatever G is (and makes the per-group numpy calls long enough to amortise their overhead)
    budget = 1 << 14
    start = 0
    N = n.size
    while start < N:
        # take rows while the number of points stays within the budget
        cum = np.cumsum(half[start:] + 1)
        stop = start + max(1, int(np.searchsorted(cum, budget, side="right")))
        rows = np.arange(start, stop)
        cnt = half[rows] + 1
        rid = np.repeat(rows, cnt)
        offs = np.concatenate([[0], np.cumsum(cnt)[:-1]])
        j = np.arange(rid.size) - np.repeat(offs, cnt)
        Mr = M[rid]
        theta = (2.0 * np.pi) * j / Mr
        e = np.exp(1j * theta)
        em1 = -2.0 * np.sin(0.5 * theta) ** 2 + 1j * np.sin(theta)  # e^{i theta} - 1 without cancellation
        logsum = np.zeros(rid.size, dtype=np.complex128)
        # Each class's factor (e^w - 1) / (e^x - 1), w = x e^{i theta}, without its phase e^{i theta}: the C phases
        # are joined to z^-n's exactly below ((n - C) theta mod 2 pi), where C theta formed in float64 lost it all
        # past C ~ 1e15 (S came out negative at C = 2^55). log of ((e^w - 1) / w) / ((e^x - 1) / x) = (w - x) / 2 +
        # s(w) - s(x), s(w) = log(sinh(w/2) / (w/2)): by its series where |w| = x < 0.2 (the logs' rounding, eps
        # each, times C would be larger than these O(x) terms); else on the right half-plane x (e^{i theta} - 1) +
        # log(1 - e^{-w}) - log(1 - e^{-x}) - i theta (no overflow; w - x formed as a difference would lose eps x,
        # 2e-9 for a class of x = 1e7, and the result n eps), and directly on the left (the integrand is below
        # e^-x of its peak there). Groups go in chunks of ~2^19 (point, group) entries: one at a time cost ~1 ms
        # each, 100 s for a prior of 1e5 distinct values.
        gstep = max(1, (1 << 19) // rid.size)
        for g0 in range(0, G, gstep):
            gs = slice(g0, min(G, g0 + gstep))
            xg = x[rid, gs]  # (points, groups)
            eg = np.broadcast_to(e[:, None], xg.shape)
            em1g = np.broadcast_to(em1[:, None], xg.shape)
            lg = np.empty(xg.shape, dtype=np.complex128)
            tiny = xg < 0.2
            if np.any(tiny):
                xt = xg[tiny]
                lg[tiny] = 0.5 * xt * em1g[tiny] + _log_sinhc_half(xt * eg[tiny]) - _log_sinhc_half(xt)
            right = ~tiny & (np.cos(theta) >= 0.0)[:, None]
            if np.any(right):
                wr = xg[right] * eg[right]
                lg[right] = xg[right] * em1g[right] + (np.log(-_expm1_complex(-wr)) - log1mex[rid, gs][right])
            left = ~tiny & ~right
            if np.any(left):
                lg[left] = np.log(_expm1_complex(xg[left] * eg[left])) - log_e0[rid, gs][left]
            lg -= np.where(tiny, 0.0, 1j * theta[:, None])  # log(e^w - 1) - log w: ... - log x - i theta
            logsum += lg @ p.counts[gs]
        # (n - C) theta mod 2 pi, exactly: (n - C) j mod M in integers ((n - C) mod M first: (n - C) j can pass 2^63)
        phase = (2.0 * np.pi) * (np.mod(np.mod(excess[rid], Mr) * j, Mr) / Mr)
        term = np.exp(logsum.real) * np.cos(logsum.imag - phase)
        weight = np.where((j == 0) | (2 * j == Mr), 1.0, 2.0)
        S = np.bincount(rid - start, weights=weight * term, minlength=rows.size) / M[rows]
        out[todo[rows]] = log_base[rows] + np.log(S)
        start = stop
    return out


def _log_coupon_ie_uniform(n: np.ndarray, C: int) -> tuple[np.ndarray, np.ndarray]:
    """log upsilon_n by inclusion-exclusion sum_j (-1)^j binom(C, j) (1 - j/C)^n, and the condition number
    sum_j |term_j| / |sum| (used only where C (1 - 1/C)^n <= 5, so the terms fall like 5^j / j!)."""
    J = min(C, 48)
    j = np.arange(J + 1, dtype=np.float64)
    # log binom(C, j) as a short cumulative sum: gammaln(C + 1) would carry an absolute error ~ C log C * eps
    lbin = np.concatenate([[0.0], np.cumsum(np.log((C - j[:-1]) / (j[:-1] + 1.0)))])
    with np.errstate(divide="ignore"):
        l1p = np.log1p(-j / C)
    out = np.empty(n.shape, dtype=np.float64)
    cond = np.empty(n.shape, dtype=np.float64)
    nf = n.astype(np.float64)
    step = max(1, _CHUNK // (J + 1))
    sign = np.where(j % 2 == 0, 1.0, -1.0)
    for s in range(0, n.size, step):
        t = np.exp(lbin[None, :] + nf[s : s + step, None] * l1p[None, :])
        rest = (sign[None, 1:] * t[:, 1:]).sum(1)  # upsilon - 1, so log1p keeps log upsilon accurate near 0
        with np.errstate(divide="ignore", invalid="ignore"):
            out[s : s + step] = np.log1p(rest)
            cond[s : s + step] = t.sum(1) / np.abs(1.0 + rest)
    return out, cond


def _ie_general_terms(p: _Prior, n_lo: int, n_hi: int, max_terms: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The inclusion-exclusion terms of 1 - upsilon_n = sum_{S != {}} (-1)^{|S|+1} (1 - pi(S))^n that matter for
    every n in [n_lo, n_hi]: (log multiplicity, pi(S), sign) per kept multiset of prior groups, or None if more
    than max_terms would be needed.

    A subset's term is at most prod_{c in S} (1 - pi_c)^n, so its multiplicity times that product at n_lo bounds
    it; a branch is dropped once that bound times e^{(what the remaining groups could add)} falls below 1e-22 of
    max_c (1 - pi_c)^{n_hi} (a lower bound of 1 - upsilon_n over the range).
    """
    order = np.argsort(p.values)  # small classes (large (1 - pi)^n) first
    vals, cnts = p.values[order], p.counts[order].astype(np.int64)
    l1p = p.log1m[order]  # -inf for a single class
    a_lo = np.log(cnts) + n_lo * l1p  # log of each group's share of sum_c (1 - pi_c)^n at n_lo
    floor = math.log(1e-22) + n_hi * float(l1p[0])
    # what the groups from g on can multiply a bound by: prod (1 + (1 - pi)^n)^count <= e^{sum count (1 - pi)^n}
    rest = np.concatenate([np.cumsum(np.exp(a_lo)[::-1])[::-1], [0.0]])
    keep = [g for g in range(vals.size) if a_lo[g] + rest[g] > floor]
    if len(keep) > 256:  # too many classes matter (and the recursion below would run too deep)
        return None
    terms: list[tuple[float, float, float]] = []
    # reach[i]: the largest log bound a single class of the groups keep[i:] can add (the j = 1 test below, with the
    # rest); once lbound + reach[i] is below the floor (with a margin for rounding) every later group stops at j = 0,
    # so the branch is a leaf: the same terms, without walking the remaining groups one call at a time.
    reach = [-math.inf] * (len(keep) + 1)
    for i in range(len(keep) - 1, -1, -1):
        g = keep[i]
        reach[i] = max(reach[i + 1], math.log(float(cnts[g])) + n_lo * float(l1p[g]) + float(rest[g + 1]))
    margin = 1e-9 * (abs(floor) + 1.0)

    def visit(i: int, lmult: float, lbound: float, pis: float, size: int) -> bool:
        if i == len(keep) or lbound + reach[i] <= floor - margin:
            if size > 0:
                terms.append((lmult, pis, 1.0 if size % 2 == 1 else -1.0))
            return len(terms) <= max_terms
        g = keep[i]
        c = int(cnts[g])
        lb, lm = 0.0, 0.0
        for j in range(0, c + 1):
            if j > 0:
                lm += math.log((c - j + 1) / j)
                lb = lm + j * n_lo * float(l1p[g])
                if lb + lbound + rest[g + 1] <= floor or pis + j * float(vals[g]) >= 1.0 + 1e-12:
                    break
            if not visit(i + 1, lmult + lm, lbound + (lb if j > 0 else 0.0), pis + j * float(vals[g]), size + j):
                return False
        return True

    if not visit(0, 0.0, 0.0, 0.0, 0):
        return None
    if not terms:
        return None
    t = np.array(terms)
    return t[:, 0], t[:, 1], t[:, 2]


def _log_coupon_ie_general(n: np.ndarray, p: _Prior) -> tuple[np.ndarray, np.ndarray]:
    """log upsilon_n for a non-uniform prior by inclusion-exclusion over the classes that can be missed,
    1 - upsilon_n accumulated directly (so log1p keeps log upsilon_n accurate near 0), for sorted n; returns
    (log upsilon, ok) where ok is False where the terms were too many or cancel too much (sum |t| > 1e3 |sum|)."""
    out = np.full(n.shape, np.nan)
    ok = np.zeros(n.shape, dtype=bool)
    start = 0
    while start < n.size:
        n_lo = int(n[start])
        stop = int(np.searchsorted(n, 2 * n_lo, side="right"))  # n within a factor 2: one set of terms
        stop = max(stop, start + 1)
        n_hi = int(n[stop - 1])
        found = _ie_general_terms(p, n_lo, n_hi)
        if found is not None:
            lmult, pis, sign = found
            with np.errstate(divide="ignore"):
                l1p = np.log1p(-np.minimum(pis, 1.0))
            step = max(1, _CHUNK // lmult.size)
            for s0 in range(start, stop, step):
                s1 = min(stop, s0 + step)
                nb = n[s0:s1].astype(np.float64)
                t = np.exp(lmult[None, :] + nb[:, None] * l1p[None, :])  # (N, T); -inf -> 0 where pi(S) = 1
                miss = (sign[None, :] * t).sum(1)  # 1 - upsilon_n
                with np.errstate(divide="ignore", invalid="ignore"):
                    # Accepted only where both miss and upsilon = 1 - miss are well determined by the sum: a tiny
                    # upsilon (a skewed prior, few draws) is the rounding noise of 1 - miss and goes to the Cauchy
                    # integral instead.
                    cond = t.sum(1) / np.minimum(np.abs(miss), np.abs(1.0 - miss))
                    res = np.log1p(-miss)
                out[s0:s1] = res
                ok[s0:s1] = np.isfinite(res) & (cond <= 1e3) & (miss < 1.0)
        start = stop
    return out, ok


def _log_coupon(n: np.ndarray, p: _Prior) -> np.ndarray:
    """log upsilon_n, elementwise over an int64 array n >= 0."""
    flat = n.reshape(-1)
    out = np.full(flat.shape, -np.inf)
    C = p.num_classes
    if C == 1:
        out[flat >= 1] = 0.0
        return out.reshape(n.shape)
    # n == C: C! prod_c pi_c (every draw a different class)
    at = flat == C
    out[at] = math.lgamma(C + 1.0) + float(np.sum(p.counts * np.log(p.values)))
    above = np.nonzero(flat > C)[0]
    if above.size:
        na = flat[above]
        res = np.empty(na.size)
        if p.uniform:
            log_x = math.log(C) + na * math.log1p(-1.0 / C)
            easy = log_x <= math.log(5.0)
            ie, cond = _log_coupon_ie_uniform(na[easy], C)
            good = np.isfinite(ie) & (cond <= 1e3)  # else the cancellation would cost more than ~1e-12
            res[easy] = ie
            easy[np.nonzero(easy)[0][~good]] = False
        else:
            # s = sum_c (1 - pi_c)^n decides the method (below).
            with np.errstate(divide="ignore"):  # as in _ie_general_terms
                log_s = _logsumexp(np.log(p.counts)[None, :] + na[:, None] * p.log1m[None, :], axis=1)
            # Where upsilon_n is close to 1 (sum <= 5), inclusion-exclusion over the classes that can be missed gives
            # 1 - upsilon_n to ~1e-15 relative, where it needs few terms; the Cauchy integral's absolute error (~1e-11)
            # in log upsilon would be a large relative error of it there.
            easy = np.zeros(na.shape, dtype=bool)
            mid = np.nonzero(log_s <= math.log(5.0))[0]
            if mid.size:
                srt = mid[np.argsort(na[mid], kind="stable")]
                ie, good = _log_coupon_ie_general(na[srt], p)
                res[srt[good]] = ie[good]
                easy[srt[good]] = True
            # Else, where the sum is <= 1e-5, two Bonferroni terms (relative error of log upsilon <= s^2 / 6 <= 2e-11).
            bonf = ~easy & (log_s <= math.log(1e-5))
            res[bonf] = _log_coupon_bonferroni2(na[bonf], p, log_s[bonf])
            easy |= bonf
        hard = ~easy
        if np.any(hard):
            # the Cauchy integral on unique n only (curves often repeat nothing, but arrays may)
            uniq, inv = np.unique(na[hard], return_inverse=True)
            res[hard] = _log_coupon_cauchy(uniq, p)[inv]
        out[above] = res
    return out.reshape(n.shape)


def coupon_collector_probability(draws: Any, num_classes: int | None = None, prior: Any = None, *, log: bool = False) -> Any:
    r"""upsilon_n: probability that n i.i.d. draws from the prior cover all C classes (the bounds use n = K + 1).

    Exact for every n (0 for n < C, C! prod pi_c at n = C); relative error ~1e-12 for C up to 10^4 and n up to
    10^7; where upsilon_n is close to 1, log upsilon_n keeps that relative accuracy (inclusion-exclusion over the
    classes that can be missed; the Cauchy integral only where too many of them matter), except for priors with
    more than 256 distinct values: there at most s^2 / 6 relative (s = sum_c (1 - pi_c)^n <= 1e-5, two
    Bonferroni terms; 5e-15 measured against mpmath with 300 distinct values) or
    an absolute error ~1e-12 in log upsilon_n (the Cauchy integral: 4e-13 at n = 10^7, where log upsilon_n =
    -1.7e-4, and 1e-11 at n = 10^6, each within the reference's Bonferroni bracket, with 300 distinct values in
    mpmath). Past a variance of 1e8 of the saddle point's tilted count (large C and n) the integral is taken by its
    saddle-point series (error ~1e-24), so any C and n up to 2^63 - 1 take milliseconds (1e-14 relative in log
    upsilon_n against closed forms at C = 2^62). ``log=True`` returns log upsilon_n, which stays accurate where
    upsilon_n underflows (e.g. C!/C^C).
    """
    n, scalar = _as_counts("draws", draws, 0)
    p = _resolve_prior(num_classes, prior)
    log = _check_log(log)
    lv = _log_coupon(n, p)
    return _out(lv if log else np.exp(lv), scalar)


# ----------------------------------------------------------------------------------------------------------
# Binomial expectations
# ----------------------------------------------------------------------------------------------------------


def _LOG1P(m, kk):  # noqa: N802  (a marker: g(m) = log(1 + m), served from a table of log(m + 1))
    return np.log1p(m)


_BLOCK = 1 << 16  # window points per vectorised block (a few (points,) float64 temporaries, reused)


def _one_side(kf, start, rest, ratio, steps, base, sign, g, table, g_mode, sum_w, sum_wg) -> None:
    """sum_w[j] = sum_{i < steps_j} w_i and sum_wg[j] = sum_i w_i (g(m_i) - g_mode_j) for one side of every window:
    w_i = prod_{t <= i} (K - s - t) / (s + 1 + t) * ratio (the pmf of Bin(K, p) relative to s, walking up from
    s = start; ratio = p/q) and m_i = base + sign (i + 1). rest = K - s, formed by the caller in integers: as
    kf - s it cancelled to 0 for s = K - 1 once K > 2^53 (the walk below the mode lost its first step).

    Sides are sorted by length and processed in blocks of similar length (padding <= ~25%, given weight 0). A block
    is a (steps, sides) array. Its running product is a Python loop over steps (numpy's accumulate along axis 0 is
    slow), in two levels to keep the steps few: the W steps are cut into segments of L ~ sqrt(W), stored step-major
    (row j * nseg + c holds step c * L + j), so step j of every segment is one contiguous vector: L products inside
    all segments at once, then the segments' running totals chained (nseg products of one vector) and multiplied in.
    """
    order = np.argsort(steps, kind="stable")
    order = order[steps[order] > 0]
    ws = steps[order]
    size = 0
    a = 0
    while a < ws.size:
        cap = int(1.25 * int(ws[a])) + 8  # rows of similar length: the block pads them to at most cap
        b = min(int(np.searchsorted(ws, cap, side="right")), a + max(1, _BLOCK // cap))
        rows = order[a:b]
        R = rows.size
        W = int(ws[b - 1])
        L = W if R >= 3072 or W <= 16 else math.isqrt(W)  # segment length: all W steps when a step is a long vector
        nseg = -(-W // L)
        Wp = nseg * L
        if Wp * R > size:
            size = max(Wp * R, _BLOCK + (_BLOCK >> 1))
            buf_r, buf_d, buf_m = np.empty(size), np.empty(size), np.empty(size, dtype=np.int64)
        r = buf_r[: Wp * R].reshape(Wp, R)
        d = buf_d[: Wp * R].reshape(Wp, R)
        step_i = (np.arange(L)[:, None] + L * np.arange(nseg)[None, :]).reshape(-1)  # step held by each row
        i = step_i.astype(np.float64)[:, None]
        s = start[rows]
        # r = pmf(s + i + 1) / pmf(s + i) of Bin(K, p_side) = (K - s - i) / (s + i + 1) * p_side / q_side (<= 1)
        np.subtract(rest[rows][None, :], i, out=r)
        np.add((s + 1.0)[None, :], i, out=d)
        r /= d
        r *= ratio[rows][None, :]
        st = steps[rows]
        short = np.nonzero(st < Wp)[0]
        r[(st[short] % L) * nseg + st[short] // L, short] = 0.0  # the step past the window: later weights are 0
        A = r.reshape(L, nseg, R)
        for j in range(1, L):
            np.multiply(A[j], A[j - 1], out=A[j])
        if nseg > 1:
            tot = A[L - 1]  # (nseg, R): each segment's own product; chained into a running prefix
            pre = np.empty_like(tot)
            pre[0] = 1.0
            for c in range(1, nseg):
                np.multiply(pre[c - 1], tot[c - 1], out=pre[c])
            A *= pre[None, :, :]
        if table is not None:
            m = buf_m[: Wp * R].reshape(Wp, R)
            np.add(base[rows][None, :], (sign * (step_i + 1))[:, None], out=m)
            np.take(table, m, out=d, mode="clip")  # (past the window, where w = 0, any finite value will do)
        else:
            # m of each step, held inside the window where the weight is 0 (so g stays finite)
            np.minimum(i + 1.0, st.astype(np.float64)[None, :], out=d)
            d *= sign
            d += base[rows].astype(np.float64)[None, :]
            if g is _LOG1P:
                d += 1.0
                np.log(d, out=d)
            else:
                d[...] = g(d, kf[rows][None, :])
        d -= g_mode[rows][None, :]
        sum_w[rows] = r.sum(0)
        sum_wg[rows] = np.einsum("ij,ij->j", r, d)
        a = b


# Beyond this standard deviation of Bin(K, p) (a window of ~1300 points per pair; ~1.3M at the 2^16 of before, so
# that a prior of 1e6 distinct values at K = 2^53 walked ~1e12 points) the expectation is taken under the normal law
# with its Edgeworth terms to fourth order, by Gauss-Hermite quadrature (_binom_expect).
_NORMAL_MIN_SD = 64.0
_GH_X, _GH_W = np.polynomial.hermite.hermgauss(24)
_GH_Z = math.sqrt(2.0) * _GH_X  # the standard normal's nodes
_GH_HE3 = _GH_Z**3 - 3.0 * _GH_Z
_GH_HE4 = _GH_Z**4 - 6.0 * _GH_Z**2 + 3.0
_GH_HE6 = _GH_Z**6 - 15.0 * _GH_Z**4 + 45.0 * _GH_Z**2 - 15.0


def _binom_expect(k: np.ndarray, prob: Any, g) -> np.ndarray:
    """E_{m ~ Bin(K, p)} g(m, K) for every pair of the int64 array k and the probabilities prob (broadcast).

    The sum runs over m in Kp +- (10 sd + 25) (the rest has mass < e^-48: each side < e^-50 by Bennett's
    inequality). The weights are pmf(m) / pmf(mode), built outwards from the mode by the exact pmf ratio recurrence
    pmf(m+1)/pmf(m) = (K-m)/(m+1) * p/(1-p) as a running product (every ratio is <= 1 going outwards, so it never
    overflows; one rounding per step), and normalised over the window, so no binomial coefficient (nor its overflow
    or rounding) is ever formed. The mean is taken as g(mode) + sum_m w_m (g(m) - g(mode)) / sum_m w_m, so the
    rounding of the sums only touches the correction to g(mode). All pairs go through one vectorised pass
    (_one_side, once above the modes and once below them, as Bin(K, 1 - p) above K - mode).
    Where sd > _NORMAL_MIN_SD (so Kp and K(1-p) both exceed sd^2 = 4096) the law is taken as normal with its
    Edgeworth terms to fourth order, density phi(z) (1 + rho3 He3(z) / 6 + rho4 He4(z) / 24 + rho3^2 He6(z) / 72),
    rho3 = (q - p) / sd, rho4 = (1 - 6pq) / sd^2: the first adds g'''(Kp) kappa3 / 6 ~ 1 / (3 (Kp)^2) (the normal
    law alone: 2e-12 relative at sd = 300), and what is left, led by g^(5) kappa5 / 120 ~ 1 / (5 (Kp)^4), is below
    1e-15 for the smooth g here (log-type in m; measured against the exact sum: 1.8e-15 at sd = 45); 24
    Gauss-Hermite nodes (within +- 8.5 sd, inside [0, K]) integrate g, nearly polynomial over that window, to
    float64 rounding (a lattice law's sum and the integral differ by ~e^{-2 pi^2 sd^2}).
    """
    k, prob = np.broadcast_arrays(np.asarray(k), np.asarray(prob, dtype=np.float64))
    shape = k.shape
    flat = k.reshape(-1).astype(np.int64)
    pr = prob.reshape(-1)
    out = np.empty(flat.shape, dtype=np.float64)
    full = pr >= 1.0
    if np.any(full):
        kf = flat[full].astype(np.float64)
        out[full] = g(kf, kf)
    part = np.nonzero(~full)[0]
    if part.size == 0:
        return out.reshape(shape)
    kk = flat[part]
    p = pr[part]
    q = 1.0 - p
    kf = kk.astype(np.float64)
    mean = kf * p
    sd = np.sqrt(kf * p * q)
    big = sd > _NORMAL_MIN_SD
    if np.any(big):
        nodes = mean[big, None] + math.sqrt(2.0) * sd[big, None] * _GH_X[None, :]
        rho3 = ((q - p)[big] / sd[big])[:, None]
        rho4 = ((1.0 - 6.0 * p * q)[big] / sd[big] ** 2)[:, None]
        weight = 1.0 + rho3 / 6.0 * _GH_HE3 + rho4 / 24.0 * _GH_HE4 + rho3**2 / 72.0 * _GH_HE6
        out[part[big]] = (g(nodes, kf[big, None]) * weight) @ _GH_W / math.sqrt(math.pi)
        small = ~big
        part, kk, p, q, kf, mean, sd = (x[small] for x in (part, kk, p, q, kf, mean, sd))
        if part.size == 0:
            return out.reshape(shape)
    lo = np.maximum(0, np.floor(mean - 10.0 * sd - 25.0)).astype(np.int64)
    hi = np.minimum(kk, np.ceil(mean + 10.0 * sd + 25.0)).astype(np.int64)
    mode = np.clip(np.floor((kf + 1.0) * p).astype(np.int64), lo, hi)
    up, down = hi - mode, mode - lo
    # g(mode); for log(1 + m) a table of log(m + 1) where it is smaller than the points it serves
    table = None
    if g is _LOG1P:
        top = int(hi.max()) + 1
        # (at most 2^22 entries, 32 MiB: 935k distinct prior values at K = 2^53 asked for 32 GiB)
        if top <= min(1 << 22, max(4096, int(up.sum() + down.sum()) // 2)):
            table = np.log(np.arange(1, top + 1, dtype=np.float64))
            g_mode = table[mode]
        else:
            g_mode = np.log(mode + 1.0)
    else:
        g_mode = np.broadcast_to(np.asarray(g(mode.astype(np.float64), kf), dtype=np.float64), kf.shape)
    w_up, wg_up, w_dn, wg_dn = (np.zeros(kf.size) for _ in range(4))
    modef = mode.astype(np.float64)
    with np.errstate(over="ignore"):  # q/p of a (denormal) tiny p; used only where its side has steps: p >= 1/(K+1)
        odds, inv_odds = p / q, q / p
    above = (kk - mode).astype(np.float64)  # K - mode, exact in int64 (K - 1 is not a float64 past 2^53)
    _one_side(kf, modef, above, odds, up, mode, 1, g, table, g_mode, w_up, wg_up)
    _one_side(kf, above, modef, inv_odds, down, mode, -1, g, table, g_mode, w_dn, wg_dn)
    out[part] = g_mode + (wg_up + wg_dn) / (1.0 + w_up + w_dn)
    return out.reshape(shape)


def _mixed_expect(k: np.ndarray, p: _Prior, g) -> np.ndarray:
    """sum_c pi_c E_{m ~ Bin(K, pi_c)} g(m, K): the anchor's class c ~ pi, m of its K negatives share it.

    All (distinct prior value, distinct K) pairs in one vectorised pass (in chunks of about 2^18 pairs)."""
    flat = k.reshape(-1)
    uk, inv = np.unique(flat, return_inverse=True)
    res = np.empty(uk.size)
    weights = p.counts * p.values
    step = max(1, (1 << 18) // p.values.size)
    for s0 in range(0, uk.size, step):
        res[s0 : s0 + step] = weights @ _binom_expect(uk[None, s0 : s0 + step], p.values[:, None], g)
    return res[inv.reshape(-1)].reshape(k.shape)


def collision_term(K: Any, num_classes: int | None = None, prior: Any = None) -> Any:
    r"""``E_{m ~ Bin(K, 1/C)} log(1 + m)``; general prior: ``sum_c pi_c E_{m ~ Bin(K, pi_c)} log(1 + m)``."""
    k, scalar = _as_counts("K", K, 0)
    p = _resolve_prior(num_classes, prior)
    return _out(_mixed_expect(k, p, _LOG1P), scalar)


def min_contrastive_loss(
    K: Any, num_classes: int | None = None, prior: Any = None, norm_bound: float | None = None,
    *, temperature: float | None = None,
) -> Any:
    r"""R_cont* = ``E_m log(1 + m + (K - m) e^{-2 b^2})``, m the number of same-class negatives.

    A lower bound of R_cont for every representation with ``||f|| <= b`` (the paper's synthetic curve).
    """
    k, scalar = _as_counts("K", K, 0)
    p = _resolve_prior(num_classes, prior)
    b2 = _score_bound(norm_bound, temperature)
    e = math.exp(-2.0 * b2)
    return _out(_mixed_expect(k, p, lambda m, kk: np.log1p(m + (kk - m) * e)), scalar)


def min_supervised_loss(num_classes: int, norm_bound: float | None = None, *, temperature: float | None = None) -> float:
    r"""R_supv* = ``log(1 + (C - 1) e^{-2 b^2})``: a lower bound of the mean-classifier loss for ``||f|| <= b``."""
    p = _resolve_prior(num_classes, None)
    b2 = _score_bound(norm_bound, temperature)
    return math.log1p((p.num_classes - 1) * math.exp(-2.0 * b2))


# ----------------------------------------------------------------------------------------------------------
# The earlier bounds (uniform prior)
# ----------------------------------------------------------------------------------------------------------


def harmonic_number(n: int, harmonic: str = "exact") -> float:
    """H_n = 1 + 1/2 + ... + 1/n (``"exact"``; H_0 = 0, the empty sum), or the authors' ``log(n) + 0.577``
    (``"authors"``; at n = 0 that formula's own value, ``-inf``, not H_0: :func:`ash` never asks for it, returning NaN
    for C = 1)."""
    if isinstance(n, bool) or not isinstance(n, Integral):
        raise TypeError(f"n must be a non-negative int, got {type(n).__name__} {n!r}")
    if n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    n = int(n)  # (a numpy integer gave a numpy float)
    # checked before any comparison: an array compared with "exact" raised numpy's "truth value ... is ambiguous"
    if not isinstance(harmonic, str) or harmonic not in ("exact", "authors"):
        raise ValueError(f"harmonic must be 'exact' or 'authors', got {harmonic!r}")
    if harmonic == "exact":
        if n == 0:
            return 0.0
        if n <= 100_000:
            return math.fsum(1.0 / np.arange(1, n + 1))
        # Euler-Maclaurin; the next term is below 1/(252 n^6) < 1e-32. math.log and 1 / n take an int of any size
        # (1.0 / (12 * n**2) did not: n ** 2 past float's range raised OverflowError for n > ~1e154)
        inv = 1 / n
        return math.log(n) + _EULER_GAMMA + inv / 2 - inv * inv / 12 + inv**4 / 120
    return math.log(n) + 0.577 if n > 0 else -math.inf


def _earlier_setup(fn: str, contrastive_loss: Any, K: Any, num_classes: Any, prior: Any):
    k, k_scalar = _as_counts("K", K, 1)
    r = _as_loss("contrastive_loss", contrastive_loss)
    p = _resolve_prior(num_classes, prior)
    _require_uniform(fn, p)
    r_b, k_b = _broadcast("contrastive_loss", r, "K", k)
    scalar = r_b.ndim == 0
    return r_b.astype(np.float64), k_b.astype(np.int64), p, scalar


def _plus_one(k: np.ndarray) -> np.ndarray:
    """K + 1 for upsilon_{K+1}, in int64: K = 2^63 - 1 (the largest K taken) would wrap to -2^63, so it takes
    upsilon_K there (at K ~ 9.2e18 one more draw changes log upsilon below double precision)."""
    return np.minimum(k, np.iinfo(np.int64).max - 1) + 1


def arora(contrastive_loss: Any, K: Any, num_classes: int | None = None, prior: Any = None) -> Any:
    r"""Arora et al. (2019) as the paper evaluates it: ``(R_cont - col) / ((1 - tau_K) upsilon_{K+1})``.

    Uniform prior only; NaN for K < C (where the authors do not define it) and for C = 1 (1 - tau_K = 0).
    """
    r, k, p, scalar = _earlier_setup("arora", contrastive_loss, K, num_classes, prior)
    C = p.num_classes
    col = _mixed_expect(k, p, _LOG1P)
    log_den = _log_one_minus_tau(k, p) + _log_coupon(_plus_one(k), p)
    with np.errstate(over="ignore", invalid="ignore"):  # 1/(1 - tau) overflows to inf for very large K: the bound is vacuous there
        val = (r - col) * np.exp(-log_den)
    return _out(np.where((k >= C) & (C > 1), val, np.nan), scalar)


def nozawa_sato(contrastive_loss: Any, K: Any, num_classes: int | None = None, prior: Any = None) -> Any:
    r"""Nozawa & Sato (2021) as the paper evaluates it: ``(2 R_cont - col) / upsilon_{K+1}``.

    Uniform prior only; NaN for K < C.
    """
    r, k, p, scalar = _earlier_setup("nozawa_sato", contrastive_loss, K, num_classes, prior)
    C = p.num_classes
    col = _mixed_expect(k, p, _LOG1P)
    with np.errstate(over="ignore", invalid="ignore"):  # upsilon = 0 for K < C (masked to NaN below)
        val = (2.0 * r - col) * np.exp(-_log_coupon(_plus_one(k), p))
    return _out(np.where(k >= C, val, np.nan), scalar)


def ash(contrastive_loss: Any, K: Any, num_classes: int | None = None, prior: Any = None, harmonic: str = "exact") -> Any:
    r"""Ash et al. (2022) as the paper evaluates it: ``2 max(1, 2 (C-1) H_{C-1} / K) / (1 - tau_K) (R_cont - col)``.

    Uniform prior only; defined for every K >= 1 (NaN for C = 1, where 1 - tau_K = 0). ``harmonic="exact"``
    (default) uses the exact harmonic number, ``"authors"`` the authors' ``log(n) + 0.577``.
    """
    r, k, p, scalar = _earlier_setup("ash", contrastive_loss, K, num_classes, prior)
    if not isinstance(harmonic, str) or harmonic not in ("exact", "authors"):
        raise ValueError(f"harmonic must be 'exact' or 'authors', got {harmonic!r}")
    C = p.num_classes
    if C == 1:
        return _out(np.full(k.shape, np.nan), scalar)
    H = harmonic_number(C - 1, harmonic)
    col = _mixed_expect(k, p, _LOG1P)
    with np.errstate(over="ignore"):
        coef = 2.0 * np.maximum(1.0, 2.0 * (C - 1) * H / k) * np.exp(-_log_one_minus_tau(k, p))
    return _out(coef * (r - col), scalar)
