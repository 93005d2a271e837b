r"""Empirical losses of the surrogate-gap sandwich, computed on the library's fused kernels.

Conventions (the paper's setting, kept consistent across every function here):

* ``normalize=True`` (default) means the representation is ``f(x) = features / ||features||``: class means are
  means of the normalised features, the mean classifier scores normalised features against those means (the means
  themselves are not re-normalised), and the contrastive estimators normalise anchors, positives and negatives.
  With ``normalize=False`` the features are used as given.
* Scores are ``f(x).f(x') / temperature``; the paper uses temperature 1. The sandwich then holds with
  ``b^2 = max ||f||^2 / temperature`` (``1 / temperature`` for normalised features).
* The contrastive loss follows the theorem, not the authors' training estimator: each anchor's positive is drawn
  from its own class of the given set (the anchor itself included, so the estimate targets R_cont of the empirical
  distribution) and its K negatives are drawn i.i.d. with replacement from the whole set (collisions included).
  Negatives reach the kernel as ``negative_indices`` rows into the feature matrix: no (B, K, d) copy is made.
* Non-finite features are not checked by :func:`class_means`, :func:`mean_classifier_loss`,
  :func:`contrastive_loss_estimate` and :func:`contrastive_loss_curve`: NaN propagates into what they return, as
  in torch's own functions (a check would read every feature back to the host each call). :func:`gap_report`,
  whose rows feed the bounds, refuses NaN or inf features with a ValueError naming the argument.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import bounds as _bounds
from .functional import _check_bool, _check_dense, bank_cross_entropy, info_nce_lse
from .reference import _softplus

__all__ = [
    "class_means",
    "mean_classifier_loss",
    "contrastive_loss_estimate",
    "contrastive_loss_curve",
    "gap_report",
    "format_gap_report",
]

_EPS = 1e-12  # the eps of torch.nn.functional.normalize, which the kernels use too
_GATHER_BUDGET = 1 << 25  # B * K * d per fused call: bounds the pure-PyTorch fallback's (B, K, d) gather (128 MB fp32)


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def _check_features(name: str, features: Any, rows: str = "N") -> torch.Tensor:
    """A floating (rows, d) tensor with at least one row (features; rows = "C" for class means)."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({rows}, d), got {type(features).__name__}")
    _check_dense(name, features)
    if features.dim() != 2:
        raise ValueError(f"{name} must have shape ({rows}, d), got shape {tuple(features.shape)}")
    if features.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):  # float8 is floating too
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got dtype "
                        f"{features.dtype}")
    if features.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row")
    if features.shape[1] == 0:
        raise ValueError(f"{name} must have at least one feature (d >= 1), got shape {tuple(features.shape)}")
    if features.device.type == "meta":  # (torch's own error came from reading the labels: "Tensor.item() ...")
        raise ValueError(f"{name} is a meta tensor (no values): the estimators read the features")
    return features


def _check_labels(name: str, labels: Any, features: torch.Tensor, num_classes: int | None = None) -> tuple[torch.Tensor, int]:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor of shape (N,), got {type(labels).__name__}")
    _check_dense(name, labels)
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor of shape (N,), got dtype {labels.dtype}")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"{name} must have shape (N,) = ({features.shape[0]},), got {tuple(labels.shape)}")
    if labels.device != features.device:
        raise ValueError(f"{name} is on {labels.device} but the features are on {features.device}")
    labels = labels.to(torch.int64)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise ValueError(f"{name} must be non-negative class indices, got min {lo}")
    if num_classes is None:
        num_classes = hi + 1
    else:  # as the estimators' counts (an int, a one-element integer tensor, an integer-valued float)
        num_classes = _check_count("num_classes", num_classes, 1)
    if hi >= num_classes:
        raise ValueError(f"{name} must lie in [0, num_classes) = [0, {num_classes}), got max {hi}")
    return labels, int(num_classes)


# Draws per anchor (K) and anchors: each is an int64 index row or column in memory at once (16 GiB at 2^31).
_MAX_DRAWS = 1 << 31


def _check_draws(name: str, value: int) -> int:
    if value > _MAX_DRAWS:
        raise ValueError(f"{name} must be at most 2^31 (its int64 indices are held at once: {8 * value / 2**30:.3g} "
                         f"GiB), got {value}")
    return value


def _check_bool_arg(name: str, value: Any) -> None:
    _check_bool(name, value)  # (a numpy bool passes: it acts as a bool wherever it is used)


def _check_count(name: str, value: Any, minimum: int) -> int:
    """An int, as the bounds take their counts: Python / numpy integers, integer-valued floats, and one-element
    tensors or arrays of either; TypeError for anything else, ValueError below the minimum."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool and \
            not value.is_complex():
        if value.device.type == "meta":
            raise ValueError(f"{name} is a meta tensor (no value): pass a number or a tensor that holds one")
        value = value.detach().item()  # (a float one as the bounds take it: integer-valued, checked below)
    elif isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iuf":
        value = value.item()
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_ks(ks: Any, minimum: int) -> np.ndarray:
    """ks as a non-empty 1-d int64 array of values >= minimum: ints, or integer-valued floats as the bounds take K
    (:func:`contrastbound.bounds.delta_upper`, :func:`contrastive_loss_estimate`); TypeError for other types,
    ValueError for other shapes and values."""
    arr, _ = _bounds._as_counts("ks", ks, minimum)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"ks must be a non-empty 1-d sequence of ints >= {minimum}, got shape {tuple(arr.shape)}")
    _check_draws("max(ks)", int(arr.max()))
    return arr


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        if value.device.type == "meta":  # (else torch's "Tensor.item() cannot be called on meta tensors")
            raise ValueError(f"{name} is a meta tensor (no value): pass a number or a tensor that holds one")
        value = float(value.detach())  # a one-element tensor (numpy scalars are Real below)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a positive finite number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _prepare(features: torch.Tensor, normalize: bool) -> torch.Tensor:
    if not normalize:
        return features
    if features.dtype in (torch.float16, torch.bfloat16):
        # the norm in float32: a float16 row of norm > 65504 (finite entries) normalised to zeros, and the mean
        # classifier's loss read log C
        return F.normalize(features.float(), dim=-1, eps=_EPS).to(features.dtype)
    return F.normalize(features, dim=-1, eps=_EPS)


# ----------------------------------------------------------------------------------------------------------
# Mean classifier
# ----------------------------------------------------------------------------------------------------------


def class_means(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None, normalize: bool = True
) -> torch.Tensor:
    r"""Class means ``mu_c = mean_{i: y_i = c} f(x_i)``, shape (C, d), in the dtype of ``features``.

    Args:
        features: (N, d) features.
        labels: (N,) integer classes in [0, C).
        num_classes: C (default: ``labels.max() + 1``). Every class must have at least one sample.
        normalize: average L2-normalised features (the paper's mean classifier) instead of the raw ones.
    Accumulated in float64 on the CPU and for float64 features, in float32 for lower-precision features on a GPU.
    """
    _check_bool_arg("normalize", normalize)
    features = _check_features("features", features)
    labels, C = _check_labels("labels", labels, features, num_classes)
    if C > labels.numel():  # some class is empty for sure: say so before bincount allocates C counts
        raise ValueError(
            f"labels: every class needs at least one sample to have a mean; C = {C} classes (the largest label + 1 "
            f"unless num_classes is given) but only N = {labels.numel()} samples (labels are class indices 0..C-1: "
            "remap other ids with torch.unique(labels, return_inverse=True)[1])"
        )
    counts = torch.bincount(labels, minlength=C)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise ValueError(
            f"labels: every class needs at least one sample to have a mean; empty classes include {missing} "
            "(labels are class indices 0..C-1: remap other ids with torch.unique(labels, return_inverse=True)[1])"
        )
    acc_dtype = torch.float64 if features.device.type == "cpu" or features.dtype == torch.float64 else torch.float32
    f = _prepare(features.to(acc_dtype), normalize)
    sums = torch.zeros(C, f.shape[1], dtype=acc_dtype, device=f.device).index_add_(0, labels, f)
    return (sums / counts.to(acc_dtype)[:, None]).to(features.dtype)


def mean_classifier_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    means: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
    *,
    normalize: bool = True,
) -> torch.Tensor:
    r"""R_supv: softmax cross-entropy of ``f(x_i) . mu_c / temperature`` over the C classes against ``y_i``.

    Runs on :func:`contrastbound.bank_cross_entropy` with bank = ``means`` (the (N, C) logits are never formed,
    so C may be 10^5). ``normalize=True`` scores L2-normalised features against the means as given (means of
    normalised features from :func:`class_means`), the paper's R_supv.

    Args:
        features: (N, d); labels: (N,) in [0, C); means: (C, d).
        reduction: "mean", "sum" or "none" (per-sample (N,)).
    Computed in the promoted dtype of ``features`` and ``means`` (torch's rule, as for ``features @ means.T``),
    accumulated in float32 for half precision; the result has that dtype (float32 for a half dtype under
    ``torch.autocast``, as every loss here).
    """
    features = _check_features("features", features)
    means = _check_features("means", means, rows="C")
    if means.device != features.device:
        raise ValueError(f"means is on {means.device} but the features are on {features.device}")
    if means.shape[1] != features.shape[1]:
        raise ValueError(f"means must have shape (C, d) with d = {features.shape[1]} (the features'), got "
                         f"{tuple(means.shape)}")
    _check_bool_arg("normalize", normalize)
    labels, _ = _check_labels("labels", labels, features, means.shape[0])
    # torch's type promotion, as in features @ means.T: float64 features against float32 means are scored in float64
    dtype = torch.promote_types(features.dtype, means.dtype)
    f = _prepare(features.to(dtype), normalize)
    return bank_cross_entropy(f, means.to(dtype), labels, temperature=temperature, normalize=False,
                              reduction=reduction, ignore_index=None)  # (labels checked above: none to ignore)


# ----------------------------------------------------------------------------------------------------------
# Contrastive loss
# ----------------------------------------------------------------------------------------------------------


class _Sampler:
    """Draws anchors, positives (same class) and negatives (whole set, with replacement) in anchor chunks.

    Both estimators use it with the same draw order, so for one seed the curve at its largest K equals the estimate
    at that K (smaller K: the first K columns of the same draws).
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_anchors: int | None, generator: torch.Generator | None):
        self.N = features.shape[0]
        self.device = features.device
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        self._rng = generator.device if generator is not None else self.device  # where the draws are made
        labels = torch.unique(labels, return_inverse=True)[1]  # ids 0..G-1: memory O(N) whatever the largest id
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels)
        self.order, self.counts = order, counts
        self.starts = torch.cumsum(counts, 0) - counts
        self.labels = labels
        self.index_budget = max(1 << 12, _GATHER_BUDGET // max(1, features.shape[1]))
        if num_anchors is None:
            self.anchors = torch.arange(self.N, device=self.device)
        else:
            self.anchors = torch.randint(self.N, (num_anchors,), device=self._rng, generator=generator).to(self.device)

    def chunks(self, K: int):
        per = max(1, self.index_budget // max(1, K))
        for s in range(0, self.anchors.numel(), per):
            a = self.anchors[s : s + per]
            y = self.labels[a]
            # Drawn where the generator lives (a CPU generator with CUDA features: the same draws as on the CPU).
            u = torch.rand(a.numel(), dtype=torch.float64, device=self._rng, generator=self.generator).to(self.device)
            n_c = self.counts[y]
            off = torch.minimum((u * n_c.to(torch.float64)).to(torch.int64), n_c - 1)
            pos = self.order[self.starts[y] + off]
            neg = torch.randint(self.N, (a.numel(), K), device=self._rng, generator=self.generator).to(self.device)
            yield a, pos, neg


def _setup(features, labels, temperature, num_anchors, normalize, differentiable=False):
    features = _check_features("features", features)
    labels, _ = _check_labels("labels", labels, features)
    if differentiable and isinstance(temperature, torch.Tensor) and temperature.requires_grad:
        from .functional import _check_temperature

        t = _check_temperature(temperature)  # a learnable temperature stays a tensor: the estimate's gradient reaches it
    else:
        t = _check_positive("temperature", temperature)
    if num_anchors is not None:
        num_anchors = _check_draws("num_anchors", _check_count("num_anchors", num_anchors, 1))
    _check_bool_arg("normalize", normalize)
    return features, labels, t, num_anchors


def contrastive_loss_estimate(
    features: torch.Tensor,
    labels: torch.Tensor,
    K: int,
    *,
    temperature: float = 1.0,
    normalize: bool = True,
    num_anchors: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Monte Carlo estimate of the theorem's R_cont with K negatives (a differentiable 0-d tensor).

    Each anchor (every row, or ``num_anchors`` rows drawn with replacement) gets a positive drawn uniformly from its
    own class and K negatives drawn i.i.d. uniformly from all rows, and contributes
    ``-log(e^{s a.p} / (e^{s a.p} + sum_k e^{s a.n_k}))``, s = 1/temperature, through :func:`contrastbound.info_nce_lse`
    with ``negative_indices`` (no (B, K, d) copy). The standard error is roughly sd(loss_i) / sqrt(B).
    The draws come from ``generator`` (a CPU one serves CUDA features too, with the same draws), or from torch's
    default generator of the features' device when it is None, whose state they advance.
    """
    features, labels, t, num_anchors = _setup(features, labels, temperature, num_anchors, normalize, differentiable=True)
    K = _check_draws("K", _check_count("K", K, 0))
    sampler = _Sampler(features, labels, num_anchors, generator)
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    if K == 0:  # no negatives: every loss is 0 (differentiable, as info_nce's: in the features and a learnable
        # temperature, whose graph was missing where only it required grad)
        zero = (features.to(acc) * 0).sum()
        return zero + (t * 0).sum().to(acc) if isinstance(t, torch.Tensor) else zero
    total = features.new_zeros((), dtype=acc)
    for a, pos, neg in sampler.chunks(K):
        # per-anchor losses in float32 or better (info_nce_lse: info_nce's would come back in float16, inf past
        # 65504), summed so: a float16 sum of ~1e5 losses overflows
        loss, _ = info_nce_lse(
            features[a], features[pos], features, negative_indices=neg, temperature=t, normalize=normalize
        )
        total = total + loss.to(acc).sum()
    return total / sampler.anchors.numel()


def _log_expm1(x: torch.Tensor) -> torch.Tensor:
    """log(e^x - 1) for x >= 0 (-inf at 0): x + log(-expm1(-x)) above 1, log(expm1(x)) below."""
    big = x > 1.0
    return torch.where(big, x + torch.log(-torch.expm1(-torch.where(big, x, 1.0))), torch.log(torch.expm1(x)))


def contrastive_loss_curve(
    features: torch.Tensor,
    labels: torch.Tensor,
    ks: Sequence[int] | np.ndarray,
    *,
    temperature: float = 1.0,
    normalize: bool = True,
    num_anchors: int | None = None,
    generator: torch.Generator | None = None,
    return_std_error: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    r"""R_cont at every K in ``ks`` from ONE pass over max(ks) negatives per anchor; float64 array like ``ks``.

    With ``return_std_error=True`` also the Monte Carlo standard error of each value, sd(loss_i) / sqrt(n) over the n
    anchors' losses (NaN for one anchor): the error of the estimate of the loss over this data, which is what a
    comparison with the bounds on the same set has to allow for.

    The loss at K uses the first K negatives of each anchor: the index columns are processed in slices
    [k_{j-1}, k_j) by :func:`contrastbound.info_nce_lse`, whose loss per slice, log(1 + sum_slice e^{l_k - l_+}),
    is formed relative to the positive; the slices are joined in float64 as log(e^loss - 1) with
    :func:`torch.logaddexp`. With the same generator state the value at max(ks) equals
    :func:`contrastive_loss_estimate` at that K (to the rounding of that join); at a smaller K the curve uses the
    first K columns of the same draws, so it agrees with the estimate in distribution, not draw for draw.
    ``generator`` as in :func:`contrastive_loss_estimate` (None: torch's default generator, advanced).
    """
    features, labels, t, num_anchors = _setup(features, labels, temperature, num_anchors, normalize)
    ks_arr = _check_ks(ks, 0)
    uniq = np.unique(ks_arr)
    kmax = int(uniq[-1])
    _check_bool_arg("return_std_error", return_std_error)
    sampler = _Sampler(features, labels, num_anchors, generator)
    # per K: anchors so far, the mean of their losses and the sum of squared deviations, merged chunk by chunk
    # (Chan et al.'s update: no cancellation of sum x^2 against n mean^2)
    count = np.zeros(uniq.size)
    mean = np.zeros(uniq.size)
    # sums of squared deviations over scale^2: deviations past ~1e154 (T ~ 1e-300) square past float64's range;
    # scale is a power of 2 (exact), 1 unless losses reach 2^500
    m2 = np.zeros(uniq.size)
    scale = np.ones(uniq.size)

    def add(i: int, losses: torch.Tensor) -> None:
        n_b = losses.numel()
        if n_b == 0:
            return
        big = float(losses.max())  # (losses are >= 0)
        if 2.0 ** 500 <= big < math.inf and (grown := 2.0 ** math.frexp(big)[1]) > scale[i]:
            m2[i] *= (scale[i] / grown) ** 2
            scale[i] = grown
        s = scale[i]
        mean_b = float(losses.mean())
        m2_b = float((((losses - mean_b) / s) ** 2).sum())
        if count[i] == 0:  # (the update below would take inf * 0 for losses past ~1e154: NaN)
            mean[i], m2[i], count[i] = mean_b, m2_b, n_b
            return
        n = count[i] + n_b
        delta = (mean_b - mean[i]) / s
        mean[i] += delta * n_b / n * s
        m2[i] += m2_b + delta * delta * count[i] * n_b / n
        count[i] = n

    for a, pos, neg in sampler.chunks(kmax):
        fa, fp = features[a], features[pos]
        running = None  # log sum over the slices so far of e^{l_k - l_+}, per anchor (float64)
        prev = 0
        with torch.no_grad():
            for i, k in enumerate(uniq.tolist()):
                if k == 0:
                    continue
                if k > prev:
                    # each slice's loss log(1 + sum_slice e^{l_k - l_+}) is formed by the kernel relative to the
                    # positive (softplus(lse - l_+)); carried as log(e^loss - 1). Joining the slices' log-sum-exps
                    # instead (logaddexp, then minus the first's) cost an ulp of the logits per anchor: 1e-2
                    # relative at logits ~2e5 in float32.
                    loss_s, _ = info_nce_lse(
                        fa, fp, features, negative_indices=neg[:, prev:k].contiguous(), temperature=t,
                        normalize=normalize, include_positive=True,
                    )
                    d = _log_expm1(loss_s.double())
                    running = d if running is None else torch.logaddexp(running, d)
                prev = k
                add(i, _softplus(running))  # (F.softplus returns its input above 20: 2e-9 low there)
        for i, k in enumerate(uniq.tolist()):
            if k == 0:
                add(i, torch.zeros(a.numel(), dtype=torch.float64))
    at = np.searchsorted(uniq, ks_arr)
    values = mean[at]
    if not return_std_error:
        return values
    n = sampler.anchors.numel()
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(m2 / (n - 1) / n) * scale if n > 1 else np.full(uniq.size, np.nan)
    return values, se[at]


# ----------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------


def gap_report(
    features: torch.Tensor,
    labels: torch.Tensor,
    ks: Sequence[int] | np.ndarray,
    *,
    test_features: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    normalize: bool = True,
    prior: str | Sequence[float] | np.ndarray = "empirical",
    num_anchors: int | None = None,
    generator: torch.Generator | None = None,
    harmonic: str = "exact",
    lower_form: str = "paper",
) -> list[dict[str, Any]]:
    r"""For each K: R_cont, R_supv, Delta_L, Delta_U, the interval, whether R_supv is inside, and earlier bounds.

    R_cont is estimated on (``features``, ``labels``) by :func:`contrastive_loss_curve` (one pass); the means come from
    the same set and R_supv is evaluated on the test set when given (else on the same set); its draws come from
    ``generator`` as in :func:`contrastive_loss_estimate` (None: torch's default generator, advanced). The constants use
    ``b = max ||f|| / sqrt(temperature)`` (``1 / sqrt(temperature)`` with ``normalize=True``) and the prior
    ``"empirical"`` (class frequencies of ``labels``; exactly uniform frequencies count as uniform), ``"uniform"``, or a
    probability vector. The earlier bounds (Arora et al., Nozawa & Sato, Ash et al.) are uniform-prior formulas: they
    are NaN for a non-uniform prior and where they are undefined (K < C for the first two). The theorem holds for one
    distribution: on the same set (no test set) R_supv lies inside up to the Monte Carlo error of R_cont (``R_cont_se``,
    its standard error: an ``inside`` of False within a few of it is sampling noise, more ``num_anchors`` shrink it);
    with a test set ``inside`` compares the test set's R_supv with the training set's interval, which no theorem
    guarantees (a shifted test distribution can fall outside). Half-precision features are widened to float32 for the
    means and R_supv. ``lower_form`` is passed to :func:`contrastbound.bounds.delta_lower`: the paper's constant
    (default) is proved for a uniform prior only (it held in every exact check for others); ``"proved"`` takes the
    constant proved for any prior, which the empirical prior of unbalanced labels may call for.

    Returns:
        A list of dicts (one per K, in the order of ``ks``) with keys ``K, R_cont, R_cont_se, R_supv, delta_lower,
        delta_upper, lower, upper, inside, arora, nozawa_sato, ash, num_classes, norm_bound``; print it with
        :func:`format_gap_report`.
    """
    features, labels, t, num_anchors = _setup(features, labels, temperature, num_anchors, normalize)
    if not isinstance(harmonic, str) or harmonic not in ("exact", "authors"):
        raise ValueError(f"harmonic must be 'exact' or 'authors', got {harmonic!r}")
    if not isinstance(lower_form, str) or lower_form not in ("paper", "proved"):
        raise ValueError(f"lower_form must be 'paper' or 'proved', got {lower_form!r}")
    if test_features is not None:  # (before the finiteness checks below read it: a meta, sparse or float8 tensor)
        test_features = _check_features("test_features", test_features)
    for name, x in (("features", features), ("test_features", test_features)):
        if isinstance(x, torch.Tensor) and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} must be finite: it holds NaN or inf entries")
        # (the norm of a half row in float32, as the estimators take it: a float16 row of norm > 65504 is fine there
        # and was refused here)
        wide = torch.float32 if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16) else None
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 2 and \
                not bool(torch.isfinite(torch.linalg.vector_norm(x, dim=-1, dtype=wide)).all()):
            # (finite entries whose squares overflow: the losses would be NaN and every row read "not inside")
            wider = "" if x.dtype == torch.float64 else " or pass them in float64"
            raise ValueError(f"{name}: a row's norm overflows {x.dtype} (entries up to {float(x.abs().max()):.3g}); "
                             f"rescale the features{wider}")
    C = int(labels.max()) + 1
    ks_arr = _check_ks(ks, 1)
    if (test_features is None) != (test_labels is None):
        raise ValueError("pass both test_features and test_labels, or neither")
    # R_supv from float32 (or better) means and scores: half-precision means shift it by ~1e-3 (2e-2 at large b),
    # enough to move it across a bound
    widen = lambda x: x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # noqa: E731
    means = class_means(widen(features), labels, C, normalize=normalize)
    if test_features is not None:
        test_labels, _ = _check_labels("test_labels", test_labels, test_features, C)
        if test_features.shape[1] != features.shape[1]:
            raise ValueError(f"test_features must have feature size d = {features.shape[1]}, got shape "
                             f"{tuple(test_features.shape)}")
        sup_f, sup_y = widen(test_features), test_labels
    else:
        sup_f, sup_y = widen(features), labels
    with torch.no_grad():
        r_supv = float(mean_classifier_loss(sup_f, sup_y, means, t, normalize=normalize).double())
        if normalize:
            b2 = 1.0 / t
        else:
            norms = [features.double().norm(dim=1).max()]
            if test_features is not None:
                norms.append(test_features.double().norm(dim=1).max())
            b2 = float(max(norms)) ** 2 / t
            if not math.isfinite(b2):
                # (the bounds would refuse norm_bound = inf, an argument the caller never passed)
                raise ValueError(f"features and temperature: the bound on the scores, max ||f||^2 / temperature = "
                                 f"{float(max(norms)):.3g}^2 / {t:.3g}, overflows float64; rescale the features or "
                                 "raise the temperature")
    b = math.sqrt(max(b2, 1e-300))
    r_cont, r_cont_se = contrastive_loss_curve(
        features, labels, ks_arr, temperature=t, normalize=normalize, num_anchors=num_anchors, generator=generator,
        return_std_error=True,
    )
    if isinstance(prior, str):
        if prior == "uniform":
            pr = dict(num_classes=C)
        elif prior == "empirical":
            freq = torch.bincount(labels, minlength=C).double().cpu().numpy()
            pr = dict(num_classes=C) if np.all(freq == freq[0]) else dict(prior=freq / freq.sum())
        else:
            raise ValueError(f"prior must be 'empirical', 'uniform' or a probability vector, got {prior!r}")
    else:
        # Passed on as given: the bounds' check of its sum allows for the vector's own dtype (a float32 softmax).
        shape = tuple(prior.shape) if hasattr(prior, "shape") else np.shape(prior)
        if shape != (C,):
            raise ValueError(f"prior must be a probability vector of length C = {C} (the classes of labels), "
                             f"got shape {shape}")
        pr = dict(prior=prior)
    d_lo = np.atleast_1d(_bounds.delta_lower(ks_arr, norm_bound=b, form=lower_form, **pr))
    d_hi = np.atleast_1d(_bounds.delta_upper(ks_arr, norm_bound=b, **pr))
    uniform = "num_classes" in pr or _bounds._resolve_prior(None, pr["prior"]).uniform
    if uniform:
        ar = _bounds.arora(r_cont, ks_arr, num_classes=C)
        ns = _bounds.nozawa_sato(r_cont, ks_arr, num_classes=C)
        ah = _bounds.ash(r_cont, ks_arr, num_classes=C, harmonic=harmonic)
    else:
        ar = ns = ah = np.full(ks_arr.shape, np.nan)
    rows = []
    for i, k in enumerate(ks_arr.tolist()):
        lo, hi = r_cont[i] + d_lo[i], r_cont[i] + d_hi[i]
        rows.append(
            dict(
                K=int(k), R_cont=float(r_cont[i]), R_cont_se=float(r_cont_se[i]), R_supv=r_supv,
                delta_lower=float(d_lo[i]), delta_upper=float(d_hi[i]),
                lower=float(lo), upper=float(hi), inside=bool(lo <= r_supv <= hi), arora=float(ar[i]),
                nozawa_sato=float(ns[i]), ash=float(ah[i]), num_classes=C, norm_bound=b,
            )
        )
    return rows


_COLUMNS = (
    ("K", "K", "{:d}"),
    ("R_cont", "R_cont", "{:.4f}"),
    ("R_cont_se", "+-se", "{:.2g}"),
    ("R_supv", "R_supv", "{:.4f}"),
    ("delta_lower", "Delta_L", "{:.4f}"),
    ("delta_upper", "Delta_U", "{:.4f}"),
    ("lower", "lower", "{:.4f}"),
    ("upper", "upper", "{:.4f}"),
    ("inside", "inside", "{}"),
    ("arora", "Arora", "{:.4g}"),
    ("nozawa_sato", "Nozawa-Sato", "{:.4g}"),
    ("ash", "Ash", "{:.4g}"),
)


def _formatted(rows: Sequence[dict[str, Any]], i: int, key: str, fmt: str) -> str:
    """rows[i][key] formatted by fmt, or a ValueError naming the cell (not a bare format error)."""
    v = rows[i][key]
    try:
        return fmt.format(v)
    except (TypeError, ValueError):
        raise ValueError(f"rows[{i}][{key!r}] = {v!r} cannot be formatted as {fmt!r}: format_gap_report takes the "
                         "rows gap_report returns") from None


def _is_nan(v: Any) -> bool:
    """Whether a cell is a NaN: a float, a numpy float (np.float32 is no Python float), or a 0-d floating tensor or
    array (formatted by its value, as a number: its NaN printed "nan")."""
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and v.is_floating_point() and v.device.type != "meta" and bool(torch.isnan(v.detach()))
    if isinstance(v, np.ndarray):
        return v.ndim == 0 and np.issubdtype(v.dtype, np.floating) and bool(np.isnan(v))
    return isinstance(v, (float, np.floating)) and math.isnan(v)


def format_gap_report(rows: Sequence[dict[str, Any]]) -> str:
    """Render :func:`gap_report` rows as a plain-text table (NaN shows as "-")."""
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Sequence):
        raise TypeError(f"rows must be the list of dicts gap_report returns, got {type(rows).__name__}")
    header = [title for _, title, _ in _COLUMNS]
    needed = [key for key, _, _ in _COLUMNS] + ["num_classes", "norm_bound"]
    body = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"rows[{i}] must be a dict as gap_report returns, got {type(row).__name__}")
        missing = [key for key in needed if key not in row]
        if missing:
            raise ValueError(f"rows[{i}] lacks the key(s) {', '.join(missing)}: format_gap_report takes the rows "
                             "gap_report returns")
        cells = []
        for key, _, fmt in _COLUMNS:
            v = row[key]
            nan = _is_nan(v)
            cells.append("-" if nan else _formatted(rows, i, key, fmt))
        body.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in body]
    if rows:
        b = _formatted(rows, 0, "norm_bound", "{:.4g}")
        out.append(f"C = {rows[0]['num_classes']}, b = {b}; R_supv inside [lower, upper] for every K: "
                   f"{all(r['inside'] for r in rows)}")
    return "\n".join(out)
