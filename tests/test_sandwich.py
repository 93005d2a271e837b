"""The sandwich R_cont + Delta_L <= R_supv <= R_cont + Delta_U on exact small problems, and Monte Carlo at larger K.

The strategies reach tiny b and collapsed classes, where the slack on each side tends to log((K+1)/K): so these
tests fail if Delta_U is lowered or Delta_L raised by log((K+1)/K) + 0.01 (test_perturbed_bounds_are_caught
checks exactly that with hypothesis.find).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

from contrastbound import bounds as B
from contrastbound.testing import (
    DiscreteProblem,
    discrete_problems,
    exact_contrastive_loss,
    exact_supervised_loss,
    priors,
)

TOL = 1e-9  # float64 evaluation of the exact losses (sums of <= 12376 terms)
# Each generated problem is checked at every K = 1..6, so 700 examples are 4200 exact (problem, K) checks.
FAST = settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
SOME = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

KS = np.arange(1, 7)


def gap(problem: DiscreteProblem, K: int) -> tuple[float, float, float]:
    r_cont = exact_contrastive_loss(problem, K)
    r_supv = exact_supervised_loss(problem)
    return r_cont, r_supv, r_supv - r_cont


def curves(problem: DiscreteProblem) -> tuple[np.ndarray, float, np.ndarray]:
    """Exact R_cont at K = 1..6, R_supv, and the gap R_supv - R_cont at each K."""
    r_cont = np.array([exact_contrastive_loss(problem, int(K)) for K in KS])
    r_supv = exact_supervised_loss(problem)
    return r_cont, r_supv, r_supv - r_cont


@FAST
@given(discrete_problems(prior=priors(2, 4, uniform=True), max_points=3))
def test_exact_sandwich_uniform_prior(problem):
    C, b = problem.num_classes, problem.norm_bound
    r_cont, r_supv, g = curves(problem)
    assert np.all(g <= B.delta_upper(KS, C, norm_bound=b) + TOL)
    assert np.all(g >= B.delta_lower(KS, C, norm_bound=b) - TOL)
    assert np.all(g >= B.delta_lower(KS, C, norm_bound=b, form="proved") - TOL)
    # the smallest values are lower bounds
    assert np.all(r_cont >= B.min_contrastive_loss(KS, C, norm_bound=b) - TOL)
    assert r_supv >= B.min_supervised_loss(C, norm_bound=b) - TOL
    # the earlier bounds are upper bounds of R_supv wherever they are defined
    for value in (B.arora(r_cont, KS, C), B.nozawa_sato(r_cont, KS, C), B.ash(r_cont, KS, C)):
        defined = ~np.isnan(value)
        assert np.all(r_supv <= value[defined] + TOL)


@FAST
@given(discrete_problems(prior=priors(2, 4), max_points=3))
def test_exact_sandwich_any_prior(problem):
    pi, b = problem.prior, problem.norm_bound
    r_cont, r_supv, g = curves(problem)
    assert np.all(g <= B.delta_upper(KS, prior=pi, norm_bound=b) + TOL)  # "best" = min of two valid constants
    assert np.all(g <= B.delta_upper(KS, prior=pi, norm_bound=b, form="paper") + TOL)
    assert np.all(g >= B.delta_lower(KS, prior=pi, norm_bound=b, form="proved") - TOL)
    assert np.all(g >= B.delta_lower(KS, prior=pi, norm_bound=b) - TOL)  # the paper's: not proved for skewed priors
    assert np.all(r_cont >= B.min_contrastive_loss(KS, prior=pi, norm_bound=b) - TOL)


@SOME
@given(discrete_problems(max_classes=3, max_points=2), st.integers(1, 5))
def test_exact_losses_against_brute_force(problem, K):
    # (every collapse mode: with "class" and "antipodal" alone every point of a class was the same, so a positive
    # taken as the anchor itself, or a point's weight ignored, went unseen)
    # R_cont by sampling every ordered K-tuple of negatives (product form), not multisets
    X, q = problem.support
    from itertools import product

    if X.shape[0] ** K > 4000:
        K = 2
    total = 0.0
    for c, (x, w) in enumerate(zip(problem.points, problem.weights)):
        for a, wa in zip(x, w):
            for pos, wp in zip(x, w):
                for tup in product(range(X.shape[0]), repeat=K):
                    s = sum(math.exp(a @ X[j]) for j in tup)
                    prob = math.prod(q[j] for j in tup)
                    total += problem.prior[c] * wa * wp * prob * math.log1p(s / math.exp(a @ pos))
    assert abs(exact_contrastive_loss(problem, K) - total) < 1e-10 * max(1.0, total)
    # R_supv directly from its definition, the class means formed here (weighted), not by problem.means
    mu = [sum(wi * xi for xi, wi in zip(x, w)) for x, w in zip(problem.points, problem.weights)]
    ref = sum(
        problem.prior[c] * wi * (math.log(sum(math.exp(xi @ m) for m in mu)) - xi @ mu[c])
        for c, (x, w) in enumerate(zip(problem.points, problem.weights))
        for xi, wi in zip(x, w)
    )
    assert abs(exact_supervised_loss(problem) - ref) < 1e-12 * max(1.0, abs(ref))


def test_exact_contrastive_loss_at_large_norm_bounds():
    # scores shifted by b^2 underflowed for every term past b ~ 19.3: -inf at b = 20 (138.23) and 30 (310.10).
    # Brute force over the ordered pairs of negatives in mpmath.
    import mpmath

    for b in (19.0, 20.0, 30.0):
        pts = (np.array([[b, 0.0], [-b, 0.0]]), np.array([[-b, 0.0]]))
        p = DiscreteProblem(np.array([0.5, 0.5]), pts, (np.array([0.5, 0.5]), np.array([1.0])), b)
        X, q = p.support
        with mpmath.workdps(40):
            ref = mpmath.mpf(0)
            for c, (x, w) in enumerate(zip(p.points, p.weights)):
                for a, wa in zip(x, w):
                    for pos, wp in zip(x, w):
                        for i in range(len(q)):
                            for j in range(len(q)):
                                s = mpmath.exp(a @ X[i]) + mpmath.exp(a @ X[j])
                                ref += p.prior[c] * wa * wp * q[i] * q[j] * mpmath.log1p(s / mpmath.exp(a @ pos))
        got = exact_contrastive_loss(p, 2)
        assert abs(got - float(ref)) <= 1e-12 * float(ref), (b, got, float(ref))


def test_upper_constant_needs_its_cosh_term():
    # Delta_U with 2 log cosh(b^2) left out survived the property tests (the strategies rarely draw b ~ 3 with a
    # skewed prior and aligned points); on this problem (a mutation audit's witness) the gap exceeds that truncated
    # constant by up to 0.48 while staying under the true one
    pi = np.array([1 / 11, 10 / 11])
    p = DiscreteProblem(pi, (np.array([[-3.0]]), np.array([[-1.5]])), (np.ones(1), np.ones(1)), 3.0)
    r_cont, r_supv, g = curves(p)
    upper = B.delta_upper(KS, prior=pi, norm_bound=3.0)
    assert np.all(g <= upper + TOL)
    assert np.all(g[1:] > upper[1:] - 2.0 * math.log(math.cosh(9.0)) + 0.3)


def test_discrete_problem_refuses_what_it_cannot_score():
    ok = (np.array([0.5, 0.5]), (np.zeros((1, 2)), np.ones((1, 2))), (np.ones(1), np.ones(1)))
    for bad, match in (
        (dict(points=(np.array([[np.nan, 0.0]]), np.ones((1, 2)))), "finite"),
        (dict(norm_bound=float("nan")), "norm_bound"),
        (dict(norm_bound=0.0), "norm_bound"),
        (dict(points=(np.zeros((1, 2)), np.ones((1, 3)))), "dimension"),
    ):
        kw = dict(prior=ok[0], points=ok[1], weights=ok[2], norm_bound=2.0)
        kw.update(bad)
        with pytest.raises(ValueError, match=match):
            DiscreteProblem(**kw)
    p = DiscreteProblem([0.5, 0.5], ok[1], ok[2], 2.0)  # a list prior is kept as an array
    assert isinstance(p.prior, np.ndarray)
    with pytest.raises(ValueError, match="labels: every class"):  # was "prior must be positive" (a class missing)
        DiscreteProblem.from_samples(np.ones((3, 2)), np.array([0, 2, 2]))
    # An audit's finds: float labels were truncated to other classes (0.5 -> 0, 1.2 -> 1: a problem the sample
    # never meant), the rest raised numpy's or Python's errors naming no argument
    f = np.eye(3)
    for features, labels, exc, match in (
        (f, np.array([0.5, 1.2, 0.0]), TypeError, "labels must be integers"),
        (f, np.array([0, -1, 1]), ValueError, "labels must be integers 0..C-1, got -1"),
        (f, np.array([0, 1]), ValueError, r"labels must have shape \(N,\) = \(3,\)"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), ValueError, "features must be a non-empty"),
        (np.ones(3), np.zeros(3, dtype=int), ValueError, "features must be a non-empty"),
        (np.array([[np.inf, 0.0]]), np.zeros(1, dtype=int), ValueError, "features must be finite"),
        ("abc", np.zeros(1, dtype=int), TypeError, "features must be a real"),
    ):
        with pytest.raises(exc, match=match):
            DiscreteProblem.from_samples(features, labels)
    # a prior or weights off 1 by 1e-8, a zero weight: refused (the tolerance is float64 rounding's; a mutation
    # loosening it to 1e-6, and one taking w = 0, passed)
    for bad, match in (
        (dict(prior=np.array([0.5, 0.5 + 1e-8])), "prior must be positive and sum to 1"),
        (dict(weights=(np.array([0.5, 0.5 + 1e-8]), np.ones(1)), points=(np.zeros((2, 2)), np.ones((1, 2)))),
         "class 0: weights must be positive and sum to 1"),
        (dict(weights=(np.array([1.0, 0.0]), np.ones(1)), points=(np.zeros((2, 2)), np.ones((1, 2)))),
         "class 0: weights must be positive and sum to 1"),
    ):
        kw = dict(prior=ok[0], points=ok[1], weights=ok[2], norm_bound=2.0)
        kw.update(bad)
        with pytest.raises(ValueError, match=match):
            DiscreteProblem(**kw)
    # a given norm_bound is checked as the constructor checks it: raised to 1e-300, 0 and -1 were reported as "a point
    # has norm above norm_bound = 1e-300", and "2" was taken (an audit)
    for b, exc in ((0.0, ValueError), (-1.0, ValueError), ("2", TypeError)):
        with pytest.raises(exc, match="norm_bound must be a"):
            DiscreteProblem.from_samples(np.eye(2) * 0.5, np.array([0, 1]), norm_bound=b)
    assert DiscreteProblem.from_samples(np.zeros((2, 2)), np.array([0, 1])).norm_bound == 1e-300  # (all zero)
    # from_samples takes a given norm_bound, else the largest norm in the sample (a mutation ignoring it passed)
    assert DiscreteProblem.from_samples(np.eye(2) * 0.5, np.array([0, 1]), norm_bound=2.0).norm_bound == 2.0
    assert DiscreteProblem.from_samples(np.eye(2) * 0.5, np.array([0, 1])).norm_bound == 0.5
    # lists and tensors as the points and weights: the same problem as arrays
    as_lists = DiscreteProblem([0.5, 0.5], ([[0.0, 0.0]], [[1.0, 1.0]]), ([1.0], [1.0]), 2.0)
    assert exact_supervised_loss(as_lists) == exact_supervised_loss(DiscreteProblem(ok[0], ok[1], ok[2], 2.0))
    with pytest.raises(TypeError, match="points must be a sequence of real arrays"):
        DiscreteProblem(ok[0], ("x", "y"), ok[2], 2.0)
    # C(N + K - 1, K) multisets: 30 points and K = 10 would be 6.4e8 of them (tens of GiB); refused by name
    big = DiscreteProblem.from_samples(np.eye(30), np.arange(30) % 3)
    with pytest.raises(ValueError, match="K = 10 negatives over N = 30"):
        exact_contrastive_loss(big, 10)


@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_slack_tends_to_log_k_plus_one_over_k(K):
    # b -> 0: R_cont -> log(1 + K), R_supv -> log C, so each side's slack -> log((K+1)/K) from above
    b = 1e-3
    for pi in (np.full(3, 1 / 3), np.array([0.5, 0.25, 0.25])):
        x = [np.array([[b, 0.0]]), np.array([[-b, 0.0]]), np.array([[0.0, b]])]
        problem = DiscreteProblem(pi, tuple(x), tuple(np.ones(1) for _ in x), b)
        _, _, g = gap(problem, K)
        slack_hi = B.delta_upper(K, prior=pi, norm_bound=b) - g
        slack_lo = g - B.delta_lower(K, prior=pi, norm_bound=b)
        target = math.log((K + 1) / K)
        # a skewed prior adds log C - H(pi) to the lower slack and min(log(pi_max C), -log(pi_min C)) to the upper
        extra_lo = math.log(3) + float(np.sum(pi * np.log(pi)))
        extra_hi = min(math.log(pi.max() * 3), -math.log(pi.min() * 3))
        # THEORY.md's small-b expansion: slack >= log(1 + 1/K) - 1/(2(K+1)^2), and -> log(1 + 1/K) as b -> 0
        assert target - 1e-5 <= slack_lo - extra_lo < target + 1e-4
        assert target - 1e-5 <= slack_hi - extra_hi < target + 1e-4


def test_perturbed_bounds_are_caught():
    """A Delta_U lowered (or Delta_L raised) by log((K+1)/K) + 0.01 is violated by some generated problem."""
    strategy = st.tuples(discrete_problems(max_classes=3, max_points=2), st.integers(1, 4))
    # no shrinking: any witness will do, and the search alone takes a second or two
    cfg = settings(max_examples=3000, deadline=None, database=None, suppress_health_check=list(HealthCheck), phases=[Phase.generate])

    def violates_upper(case):
        problem, K = case
        shift = math.log((K + 1) / K) + 0.01
        return gap(problem, K)[2] > B.delta_upper(K, prior=problem.prior, norm_bound=problem.norm_bound) - shift

    def violates_lower(case):
        problem, K = case
        shift = math.log((K + 1) / K) + 0.01
        return gap(problem, K)[2] < B.delta_lower(K, prior=problem.prior, norm_bound=problem.norm_bound) + shift

    for cond in (violates_upper, violates_lower):
        problem, K = find(strategy, cond, settings=cfg)
        assert problem.norm_bound < 0.5  # the witness is a small-b problem, as the theory says


# ----------------------------------------------------------------------------------------------------------
# Monte Carlo at larger K
# ----------------------------------------------------------------------------------------------------------


def mc_contrastive_loss(problem: DiscreteProblem, K: int, n: int, rng: np.random.Generator) -> tuple[float, float]:
    """Plain i.i.d. Monte Carlo of R_cont: (mean, standard error)."""
    X, q = problem.support
    offsets = np.cumsum([0] + [len(w) for w in problem.weights])
    c = rng.choice(problem.num_classes, size=n, p=problem.prior)
    a = np.empty(n, dtype=np.int64)
    p = np.empty(n, dtype=np.int64)
    for cls in range(problem.num_classes):
        sel = c == cls
        w = problem.weights[cls]
        a[sel] = offsets[cls] + rng.choice(len(w), size=sel.sum(), p=w)
        p[sel] = offsets[cls] + rng.choice(len(w), size=sel.sum(), p=w)
    neg = rng.choice(len(q), size=(n, K), p=q)
    scores = X @ X.T
    pos = scores[a, p]
    negs = scores[a[:, None], neg]
    m = np.maximum(pos, negs.max(1))
    loss = np.log(np.exp(pos - m) + np.exp(negs - m[:, None]).sum(1)) + m - pos
    return float(loss.mean()), float(loss.std(ddof=1) / math.sqrt(n))


Z = 5.0  # margin in standard errors: a correct bound fails a check with probability < 6e-7 (hypothesis draws the seeds)


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(discrete_problems(min_classes=3, max_classes=6, max_points=4, max_dim=4), st.sampled_from([32, 128, 512]), st.integers(0, 2**32 - 1))
def test_monte_carlo_sandwich_large_k(problem, K, seed):
    r_cont, se = mc_contrastive_loss(problem, K, 4000, np.random.default_rng(seed))
    g = exact_supervised_loss(problem) - r_cont
    pi, b = problem.prior, problem.norm_bound
    assert g <= B.delta_upper(K, prior=pi, norm_bound=b) + Z * se + 1e-12
    assert g >= B.delta_lower(K, prior=pi, norm_bound=b, form="proved") - Z * se - 1e-12
    assert g >= B.delta_lower(K, prior=pi, norm_bound=b) - Z * se - 1e-12


def test_monte_carlo_harness_matches_exact():
    # the Monte Carlo estimator above is itself unbiased: it matches the exact loss at small K
    rng = np.random.default_rng(0)
    x = (np.array([[0.8, 0.1], [0.2, 0.9]]), np.array([[-0.7, 0.3]]), np.array([[0.1, -0.95], [0.5, 0.5]]))
    w = (np.array([0.3, 0.7]), np.ones(1), np.array([0.5, 0.5]))
    problem = DiscreteProblem(np.array([0.2, 0.3, 0.5]), x, w, 1.0)
    for K in (1, 3, 5):
        est, se = mc_contrastive_loss(problem, K, 40_000, rng)
        assert abs(est - exact_contrastive_loss(problem, K)) < Z * se


# ---------------------------------------------------------------------------------------------------------------
# The generators and checks of contrastbound.testing themselves (a mutation audit, 2026-12-06: a loosened
# tolerance, a one-sided "antipodal" strategy, priors never skewed, collapse="all" drawing free points and K = 0 all
# passed the property tests above)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    (dict(points=(np.array([[1.0001, 0.0], [0.0, 1.0]]), np.zeros((1, 2)))), "norm above norm_bound"),  # 1e-4 above b = 1
    (dict(weights=(np.array([0.5, 0.4995]), np.ones(1))), "weights must be positive and sum to 1"),
    (dict(prior=np.array([1.0, 0.0])), "prior must be positive"),
])
def test_discrete_problem_refuses_slightly_invalid_problems(bad, match):
    # the bounds hold only for norm <= b, probabilities that sum to 1 and a positive prior: a point 1e-4 above b,
    # weights summing to 0.9995 and a class of prior 0 must be refused, not scored
    kw = dict(prior=np.array([0.5, 0.5]), points=(np.array([[1.0, 0.0], [0.0, 1.0]]), np.zeros((1, 2))),
              weights=(np.array([0.5, 0.5]), np.ones(1)), norm_bound=1.0)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        DiscreteProblem(**kw)


def test_antipodal_problems_reach_both_signs():
    # "antipodal": classes collapsed onto +-b e_1, both signs among the classes (the extreme case of the bounds)
    found = find(discrete_problems(collapse=("antipodal",)),
                            lambda pr: len({float(np.sign(x[0, 0])) for x in pr.points}) == 2,
                            settings=settings(max_examples=200, database=None))
    assert {float(np.sign(x[0, 0])) for x in found.points} == {-1.0, 1.0}


def test_skewed_priors_are_skewed():
    # uniform=False: integer weights in [1, 20], ratios up to 20 occur
    found = find(priors(2, 4, uniform=False), lambda pi: pi.max() / pi.min() >= 5,
                            settings=settings(max_examples=200, database=None))
    assert found.max() / found.min() >= 5


def test_all_collapse_puts_every_point_on_one_vector():
    @settings(max_examples=40, database=None, deadline=None)
    @given(discrete_problems(collapse=("all",), max_points=3, max_dim=3))
    def check(pr):
        x = np.concatenate(pr.points)
        assert np.allclose(x, x[0]), x

    check()


def test_strategies_refuse_unknown_modes_and_bad_sizes():
    # An exploratory review (session 20): collapse=("Class",) (a typo) drew the antipodal family under the name
    # "Class", and collapse="class" would have drawn from its five letters; min_classes=0 divided by zero inside a
    # draw. Each is refused when the strategy is made, naming the argument.
    modes = r"collapse must be a non-empty sequence of \('none', 'class', 'all', 'antipodal'\)"
    for collapse in (("Class",), ("none", "antipodol"), ()):
        with pytest.raises(ValueError, match=modes):
            discrete_problems(collapse=collapse)
    for kw, match in ((dict(min_classes=0), "min_classes must be an int >= 1, got 0"),
                      (dict(min_classes=5, max_classes=3), "min_classes must be at most max_classes, got 5 > 3"),
                      (dict(max_points=0), "max_points must be an int >= 1"),
                      (dict(max_dim=2.5), "max_dim must be an int >= 1")):
        with pytest.raises(ValueError, match=match):
            discrete_problems(**kw)
    with pytest.raises(ValueError, match="min_classes must be an int >= 1, got 0"):
        priors(0, 0)

    @settings(max_examples=30, database=None, deadline=None)
    @given(discrete_problems(collapse="class", max_points=3))
    def one_mode_by_name(pr):  # a single name is that mode: each class one repeated point
        assert pr.label == "class"
        for x in pr.points:
            assert np.array_equal(x, np.repeat(x[:1], len(x), axis=0))

    one_mode_by_name()


def test_discrete_problem_takes_a_one_element_tensor_norm_bound():
    # as the bounds take b: a one-element tensor or array is its value (it was refused as "must be a positive finite
    # number, got tensor(1.)"); other types are a TypeError naming norm_bound
    kw = dict(prior=[1.0], points=(np.ones((1, 1)),), weights=(np.ones(1),))
    for b in (torch.tensor(1.5), np.array([1.5]), 1.5):
        pr = DiscreteProblem(norm_bound=b, **kw)
        assert pr.norm_bound == 1.5 and type(pr.norm_bound) is float
    for b in (torch.ones(2), "1", None):
        with pytest.raises(TypeError, match="norm_bound must be a real number"):
            DiscreteProblem(norm_bound=b, **kw)
    with pytest.raises(ValueError, match="norm_bound must be a positive finite number, got -1.0"):
        DiscreteProblem(norm_bound=torch.tensor(-1.0), **kw)


def test_exact_contrastive_loss_without_negatives_is_zero():
    # K = 0: -log(e^{x.x+} / e^{x.x+}) = 0 for every problem
    pr = DiscreteProblem(np.array([0.3, 0.7]), (np.array([[1.0, 0.0]]), np.array([[0.0, 0.5], [0.6, 0.0]])),
                         (np.ones(1), np.array([0.25, 0.75])), 1.0)
    assert exact_contrastive_loss(pr, 0) == 0.0
    # and K = 1 by brute force over (class, anchor, positive, negative), as a cross-check of the same problem
    X, q = pr.support
    want = 0.0
    for c, (x, w) in enumerate(zip(pr.points, pr.weights)):
        for i in range(len(x)):
            for j in range(len(x)):
                for m in range(len(X)):
                    l0, l1 = x[i] @ x[j], x[i] @ X[m]
                    want += pr.prior[c] * w[i] * w[j] * q[m] * np.logaddexp(0.0, l1 - l0)
    assert abs(exact_contrastive_loss(pr, 1) - want) < 1e-12


def test_discrete_problems_draw_every_shape_they_promise():
    # The property tests above hold only for the problems the strategy draws: a mutation fixing d = 1, one drawing
    # every point on the sphere of radius b, one making the within-class weights uniform and one refusing
    # min_classes = max_classes each passed the suite. hypothesis's find shows each kind is drawn.
    cfg = settings(max_examples=300, database=None, phases=[Phase.generate])
    s = discrete_problems()
    assert find(s, lambda p: p.points[0].shape[1] > 1, settings=cfg).points[0].shape[1] > 1
    find(s, lambda p: p.label == "none" and bool(
        (np.linalg.norm(np.concatenate(p.points), axis=1) < 0.99 * p.norm_bound).any()), settings=cfg)
    find(s, lambda p: any(np.ptp(w) > 0 for w in p.weights), settings=cfg)
    assert find(discrete_problems(min_classes=3, max_classes=3), lambda p: True, settings=cfg).num_classes == 3


def test_discrete_problems_compare_and_hash_by_value():
    # A frozen dataclass of arrays: == compared the arrays as tuples and raised numpy's "truth value of an array is
    # ambiguous", hash() raised "unhashable type" (an audit). Equal by prior, points, weights and bound (not the
    # label), with equal hashes; -0.0 and 0.0 are equal points.
    import copy

    p = DiscreteProblem([0.5, 0.5], (np.array([[0.0, -0.0]]), np.ones((1, 2))), (np.ones(1), np.ones(1)), 2.0, "a")
    q = DiscreteProblem([0.5, 0.5], (np.array([[-0.0, 0.0]]), np.ones((1, 2))), (np.ones(1), np.ones(1)), 2.0, "b")
    assert p == copy.deepcopy(p) and p == q and hash(p) == hash(q) and len({p, q}) == 1
    assert p != DiscreteProblem([0.5, 0.5], q.points, q.weights, 3.0)
    assert p != DiscreteProblem([0.25, 0.75], q.points, q.weights, 2.0)
    assert p != DiscreteProblem([0.5, 0.5], (np.zeros((1, 2)), np.full((1, 2), 0.5)), q.weights, 2.0)
    assert p != "a problem"


@pytest.mark.parametrize("bounds, match", [
    ((0.0, 1.0), "min_value must be a positive finite number"), ((-1.0, 1e-4), "min_value must be a positive"),
    ((1e-3, math.inf), "max_value must be a positive finite number"), ((2.0, 1.0), "min_value must be at most"),
])
def test_norm_bounds_refuses_bounds_that_are_not_norms(bounds, match):
    # norm_bounds(-1.0, 1e-4) drew -1.0 and (0.0, 1e-4) drew 0.0, which then failed inside discrete_problems' draw;
    # (2, 1) gave hypothesis's own InvalidArgument (an audit)
    from contrastbound.testing import norm_bounds

    with pytest.raises(ValueError, match=match):
        norm_bounds(*bounds)
