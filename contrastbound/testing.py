r"""Exact losses of small discrete problems, and hypothesis strategies that generate them.

A :class:`DiscreteProblem` is a finite instance of the paper's setting: C latent classes with a prior, each class
a finite set of representation vectors ``f(x)`` (norm <= b) with probabilities. On it both losses can be computed
exactly, so the sandwich and any other claim can be property-tested::

    from hypothesis import given
    from contrastbound import bounds
    from contrastbound.testing import discrete_problems, exact_contrastive_loss, exact_supervised_loss

    @given(discrete_problems())
    def test_sandwich(problem):
        gap = exact_supervised_loss(problem) - exact_contrastive_loss(problem, 3)
        assert gap <= bounds.delta_upper(3, prior=problem.prior, norm_bound=problem.norm_bound) + 1e-9

The exact helpers need only numpy; the strategies need the optional dependency hypothesis (imported when a
strategy is first built, with a clear error if it is missing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations_with_replacement
from numbers import Integral, Real
from typing import Any, Sequence

import numpy as np

__all__ = [
    "DiscreteProblem",
    "exact_supervised_loss",
    "exact_contrastive_loss",
    "priors",
    "norm_bounds",
    "discrete_problems",
]


@dataclass(frozen=True, eq=False)
class DiscreteProblem:
    """C classes; class c has points ``points[c]`` (n_c, d) with probabilities ``weights[c]`` (n_c,).

    ``norm_bound`` is the b of the bounds: every point has norm <= b, so every score lies in [-b^2, b^2].
    """

    prior: np.ndarray
    points: tuple[np.ndarray, ...]
    weights: tuple[np.ndarray, ...]
    norm_bound: float
    label: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        prior = np.asarray(self.prior, dtype=np.float64)
        if prior.ndim != 1 or len(self.points) != prior.size or len(self.weights) != prior.size:
            raise ValueError("prior, points and weights must describe the same number of classes")
        if not np.all(np.isfinite(prior)) or np.any(prior <= 0) or abs(prior.sum() - 1.0) > 1e-12:
            raise ValueError("prior must be positive and sum to 1")
        object.__setattr__(self, "prior", prior)  # (a list was kept as given)
        # each class's points and weights as float64 arrays (lists, numpy arrays, CPU tensors)
        for name in ("points", "weights"):
            try:
                arrays = tuple(np.asarray(x, dtype=np.float64) for x in getattr(self, name))
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"{name} must be a sequence of real arrays, one per class ({e})") from None
            object.__setattr__(self, name, arrays)
        b = self.norm_bound
        if not isinstance(b, bool) and hasattr(b, "shape") and int(np.prod(b.shape)) == 1 \
                and getattr(b, "dtype", None) is not None and not getattr(b, "is_complex", lambda: False)():
            b = b.item()  # a one-element tensor or array, as the bounds take it
        if isinstance(b, bool) or not isinstance(b, (int, float, np.floating, np.integer)):
            raise TypeError(f"norm_bound must be a real number (or a one-element tensor), got {type(b).__name__}"
                            + (f" of shape {tuple(b.shape)}" if hasattr(b, "shape") else ""))
        if not math.isfinite(b) or b <= 0:
            raise ValueError(f"norm_bound must be a positive finite number, got {b!r}")
        object.__setattr__(self, "norm_bound", float(b))
        dims = {np.shape(x)[-1] if np.ndim(x) == 2 else None for x in self.points}
        if len(dims) > 1:
            raise ValueError(f"points: every class must have the same dimension d, got {sorted(map(str, dims))}")
        for c, (x, w) in enumerate(zip(self.points, self.weights)):
            if x.ndim != 2 or w.shape != (x.shape[0],) or x.shape[0] == 0:
                raise ValueError(f"class {c}: points must be (n_c, d) with n_c >= 1 and weights (n_c,)")
            if not np.all(np.isfinite(x)):
                raise ValueError(f"class {c}: points must be finite")  # (NaN passed the norm check below)
            if not np.all(np.isfinite(w)) or np.any(w <= 0) or abs(w.sum() - 1.0) > 1e-12:
                raise ValueError(f"class {c}: weights must be positive and sum to 1")
            if np.linalg.norm(x, axis=1).max() > b * (1 + 1e-12):
                raise ValueError(f"class {c}: a point has norm above norm_bound = {b}")

    def __eq__(self, other: object) -> bool:
        """Equal prior, points, weights and norm_bound (the label aside). The dataclass's own __eq__ compared the
        arrays as tuples, which raised numpy's "truth value of an array is ambiguous"."""
        if not isinstance(other, DiscreteProblem):
            return NotImplemented
        return (self.norm_bound == other.norm_bound and np.array_equal(self.prior, other.prior)
                and len(self.points) == len(other.points)
                and all(np.array_equal(a, b) for a, b in zip(self.points, other.points))
                and all(np.array_equal(a, b) for a, b in zip(self.weights, other.weights)))

    def __hash__(self) -> int:
        # (+ 0.0: -0.0 and 0.0 are equal, and their bytes differ)
        def key(x: np.ndarray) -> tuple:
            return x.shape, (x + 0.0).tobytes()

        return hash((self.norm_bound, key(self.prior), tuple(map(key, self.points)), tuple(map(key, self.weights))))

    @property
    def num_classes(self) -> int:
        return len(self.points)

    @property
    def means(self) -> np.ndarray:
        """(C, d) class means mu_c = sum_i w_ci x_ci."""
        return np.stack([w @ x for x, w in zip(self.points, self.weights)])

    @property
    def support(self) -> tuple[np.ndarray, np.ndarray]:
        """The marginal: all points (N, d) and their probabilities pi_c w_ci (N,)."""
        x = np.concatenate(self.points)
        q = np.concatenate([p * w for p, w in zip(self.prior, self.weights)])
        return x, q

    @classmethod
    def from_samples(cls, features: Any, labels: Any, norm_bound: float | None = None) -> "DiscreteProblem":
        """The empirical distribution of a labelled sample (each row weight 1/N; prior = class frequencies).

        features: (N, d) real, finite; labels: (N,) integers 0..C-1, each class with at least one sample."""
        try:
            f = np.asarray(features, dtype=np.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"features must be a real (N, d) array, got {type(features).__name__} ({e})") from None
        y = np.asarray(labels)
        if f.ndim != 2 or f.shape[0] == 0:
            raise ValueError(f"features must be a non-empty (N, d) array, got shape {f.shape}")
        if not np.all(np.isfinite(f)):
            raise ValueError("features must be finite")
        if y.dtype.kind not in "iu":  # (a float label would be truncated to another class)
            raise TypeError(f"labels must be integers 0..C-1, got dtype {y.dtype}")
        if y.shape != (f.shape[0],):
            raise ValueError(f"labels must have shape (N,) = ({f.shape[0]},), got {y.shape}")
        y = y.astype(np.int64)
        if y.min() < 0:
            raise ValueError(f"labels must be integers 0..C-1, got {int(y.min())}")
        C = int(y.max()) + 1
        counts = np.bincount(y, minlength=C)
        if np.any(counts == 0):
            empty = np.nonzero(counts == 0)[0][:5].tolist()
            raise ValueError(f"labels: every class 0..{C - 1} needs a sample; empty: {empty}")
        pts = tuple(f[y == c] for c in range(C))
        wts = tuple(np.full(n, 1.0 / n) for n in counts)
        # (the data's own bound at least 1e-300, so that all-zero features make a problem; a given one is checked as
        # the constructor checks it: raised to 1e-300 here, 0 and -1 were reported as a point above 1e-300)
        b = max(float(np.linalg.norm(f, axis=1).max()), 1e-300) if norm_bound is None else norm_bound
        return cls(counts / counts.sum(), pts, wts, b)


def exact_supervised_loss(problem: DiscreteProblem) -> float:
    r"""R_supv = sum_c pi_c sum_i w_ci [logsumexp_c'(x_ci . mu_c') - x_ci . mu_c], exactly (float64)."""
    mu = problem.means
    total = 0.0
    for c, (x, w) in enumerate(zip(problem.points, problem.weights)):
        logits = x @ mu.T
        total += problem.prior[c] * float(w @ (_lse_rows(logits) - logits[:, c]))
    return total


def _lse_rows(a: np.ndarray) -> np.ndarray:
    m = a.max(axis=1, keepdims=True)
    return np.log(np.exp(a - m).sum(axis=1)) + m[:, 0]


@lru_cache(maxsize=64)
def _multisets(N: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Every multiset of K draws from N items as counts (M, N), and log K!/prod(counts!)."""
    counts = np.zeros((math.comb(N + K - 1, K), N), dtype=np.float64)
    for r, combo in enumerate(combinations_with_replacement(range(N), K)):
        for j in combo:
            counts[r, j] += 1
    lgf = np.array([math.lgamma(i + 1.0) for i in range(K + 1)])
    logcoef = math.lgamma(K + 1) - lgf[counts.astype(np.int64)].sum(1)
    counts.setflags(write=False)
    logcoef.setflags(write=False)
    return counts, logcoef


def exact_contrastive_loss(problem: DiscreteProblem, K: int) -> float:
    r"""R_cont with K i.i.d. negatives from the marginal, exactly: enumerates the C(N + K - 1, K) multisets of
    negatives with their multinomial probabilities (use small N and K: N = 12, K = 6 is 12376 multisets; problems
    whose temporaries would pass 2^26 elements are refused with a ValueError).

    R_cont = E_{c ~ pi, x, x+ ~ D_c, n_1..n_K ~ D}[ -log(e^{x.x+} / (e^{x.x+} + sum_k e^{x.n_k})) ].
    """
    if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or K < 0:
        raise ValueError(f"K must be a non-negative int, got {K!r}")
    if K == 0:
        return 0.0
    X, q = problem.support
    N, n_max = X.shape[0], max(x.shape[0] for x in problem.points)
    M = math.comb(N + int(K) - 1, int(K))
    if M * n_max * max(N, n_max) > 1 << 26:  # (n_c, M, N) and (n_c, n_c, M) float64 temporaries: 512 MiB
        raise ValueError(f"K = {K} negatives over N = {N} support points make {M} multisets, too many to enumerate "
                         "(keep M * max n_c * N <= 2^26; estimate larger problems by sampling)")
    counts, logcoef = _multisets(N, int(K))
    ms_w = np.exp(logcoef + counts @ np.log(q))  # (M,) multinomial probabilities, sum to 1
    with np.errstate(divide="ignore"):
        log_counts = np.log(counts)  # (M, N), -inf where a point is not in the multiset
    total = 0.0
    for c, (x, w) in enumerate(zip(problem.points, problem.weights)):
        # log S[a, m] = log sum_k e^{x_a . n_k} over the multiset m, as a log-sum-exp: shifted by b^2 instead, every
        # term underflowed past b ~ 19.3 and the loss came out -inf (b = 20: 138.23)
        A = (x @ X.T)[:, None, :] + log_counts[None, :, :]  # (n_c, M, N)
        top = A.max(axis=2)
        log_s = np.log(np.exp(A - top[:, :, None]).sum(axis=2)) + top
        P = x @ x.T  # (anchor, positive) scores
        loss = np.logaddexp(P[:, :, None], log_s[:, None, :]) - P[:, :, None]  # log(1 + S / e^P)
        total += problem.prior[c] * float(np.einsum("a,p,apm,m->", w, w, loss, ms_w))
    return total


# ----------------------------------------------------------------------------------------------------------
# hypothesis strategies (optional dependency)
# ----------------------------------------------------------------------------------------------------------


def _strategies():
    try:
        import hypothesis.strategies as st
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "contrastbound.testing's strategies need hypothesis, an optional dependency: pip install hypothesis"
        ) from exc
    return st


def _check_sizes(**sizes: Any) -> None:
    """The strategies' sizes: ints >= 1, a min no larger than its max (min_classes = 0 divided by zero inside
    hypothesis's draw, min > max gave hypothesis's own message about integers())."""
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if "min_classes" in sizes and sizes["min_classes"] > sizes["max_classes"]:
        raise ValueError(f"min_classes must be at most max_classes, got {sizes['min_classes']} > "
                         f"{sizes['max_classes']}")


def priors(min_classes: int = 2, max_classes: int = 4, uniform: bool | None = None):
    """Strategy for class priors: uniform ones (``uniform=True``), skewed ones (``False``) or both (``None``).

    Skewed priors come from integer weights in [1, 20], so ratios up to 20 (and exactly uniform ones) occur.
    """
    _check_sizes(min_classes=min_classes, max_classes=max_classes)
    st = _strategies()
    sizes = st.integers(min_classes, max_classes)
    uni = sizes.map(lambda C: np.full(C, 1.0 / C))
    skew = sizes.flatmap(lambda C: st.lists(st.integers(1, 20), min_size=C, max_size=C)).map(
        lambda w: np.asarray(w, dtype=np.float64) / float(sum(w))
    )
    if uniform is True:
        return uni
    if uniform is False:
        return skew
    return st.one_of(uni, skew)


def norm_bounds(min_value: float = 1e-3, max_value: float = 3.0):
    """Strategy for b: a few tiny values (where the sandwich is tightest) and a continuous range;
    0 < min_value <= max_value < inf (b is a norm bound)."""
    for name, v in (("min_value", min_value), ("max_value", max_value)):
        if isinstance(v, bool) or not isinstance(v, Real) or not 0 < v < math.inf:
            raise ValueError(f"{name} must be a positive finite number (a norm bound), got {v!r}")
    if min_value > max_value:
        raise ValueError(f"min_value must be at most max_value, got {min_value} > {max_value}")
    st = _strategies()
    tiny = [v for v in (1e-3, 1e-2, 0.05) if min_value <= v <= max_value]
    return st.one_of(st.sampled_from(tiny), st.floats(max(min_value, 1e-3), max_value)) if tiny else st.floats(min_value, max_value)


def discrete_problems(
    min_classes: int = 2,
    max_classes: int = 4,
    max_points: int = 3,
    max_dim: int = 3,
    prior: Any = None,
    norm_bound: Any = None,
    collapse: Sequence[str] = ("none", "class", "all", "antipodal"),
):
    """Strategy for :class:`DiscreteProblem`.

    Args:
        min_classes, max_classes, max_points, max_dim: sizes (class sizes 1..max_points, dimension 1..max_dim).
        prior: a strategy for priors (default :func:`priors` with these sizes; its size decides C).
        norm_bound: a strategy for b (default :func:`norm_bounds`).
        collapse: the shapes drawn: "none" (free points, norm <= b), "class" (each class one repeated point),
            "all" (every point the same), "antipodal" (classes collapsed onto +-b e_1, the extreme case).
    """
    _check_sizes(min_classes=min_classes, max_classes=max_classes)
    _check_sizes(max_points=max_points, max_dim=max_dim)
    modes = ("none", "class", "all", "antipodal")
    collapse = (collapse,) if isinstance(collapse, str) else tuple(collapse)  # ("class": one mode, not 5 letters)
    unknown = [m for m in collapse if m not in modes]
    if unknown or not collapse:
        # (any other name drew the antipodal family, under the name given)
        raise ValueError(f"collapse must be a non-empty sequence of {modes}, got {collapse!r}")
    st = _strategies()
    prior_st = prior if prior is not None else priors(min_classes, max_classes)
    b_st = norm_bound if norm_bound is not None else norm_bounds()

    def vector(d: int):
        return st.tuples(
            st.lists(st.floats(-1.0, 1.0), min_size=d, max_size=d),
            st.one_of(st.just(1.0), st.floats(0.0, 1.0)),
        ).map(lambda t: _scale(t[0], t[1]))

    @st.composite
    def build(draw):
        pi = draw(prior_st)
        C = pi.size
        b = float(draw(b_st))
        d = draw(st.integers(1, max_dim))
        mode = draw(st.sampled_from(list(collapse)))
        shared = draw(vector(d))
        pts, wts = [], []
        for c in range(C):
            n = draw(st.integers(1, max_points))
            if mode == "none":
                x = np.stack([draw(vector(d)) for _ in range(n)])
            elif mode == "class":
                x = np.repeat(draw(vector(d))[None, :], n, axis=0)
            elif mode == "all":
                x = np.repeat(shared[None, :], n, axis=0)
            else:  # antipodal
                e = np.zeros(d)
                e[0] = 1.0 if draw(st.booleans()) else -1.0
                x = np.repeat(e[None, :], n, axis=0)
            w = np.asarray(draw(st.lists(st.integers(1, 5), min_size=n, max_size=n)), dtype=np.float64)
            pts.append(b * x)
            wts.append(w / w.sum())
        return DiscreteProblem(pi / pi.sum(), tuple(pts), tuple(wts), b, label=mode)

    return build()


def _scale(v: Sequence[float], radius: float) -> np.ndarray:
    x = np.asarray(v, dtype=np.float64)
    n = float(np.linalg.norm(x))
    if n < 1e-6:
        x = np.zeros_like(x)
        x[0] = 1.0
        n = 1.0
    return x * (min(1.0, radius) / n)
