"""contrastbound.bounds against exact arithmetic, the authors' formulas, THEORY.md's reference values and limits."""

from __future__ import annotations

import itertools
import math
import sys
from fractions import Fraction
from itertools import combinations

import mpmath
import numpy as np
import torch
import pytest

from contrastbound import bounds as B

REL = 1e-9  # the accuracy target of the issue (relative; absolute in log space where values underflow)


def rel_err(got, ref):
    got, ref = np.asarray(got, dtype=float), np.asarray(ref, dtype=float)
    return float(np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1e-300)))


def scaled_err(got, ref):
    """Error on the natural scale of a loss or a log-constant: relative above 1, absolute below (zero crossings)."""
    got, ref = np.asarray(got, dtype=float), np.asarray(ref, dtype=float)
    return float(np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1.0)))


def log_err(got, ref):
    """Error of a log-probability: relative where |ref| >= 1, absolute (= relative error of the probability) below."""
    got, ref = np.asarray(got, dtype=float), np.asarray(ref, dtype=float)
    return float(np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1.0)))


# ----------------------------------------------------------------------------------------------------------
# Oracles: the authors' scripts (github.com/nzw0301/gap-contrastive-and-supervised-losses, scripts/), restated
# ----------------------------------------------------------------------------------------------------------


def authors_coupon(k, c):
    ret = []
    for _k in k:
        p = np.zeros(c + 1)
        p[0] = 1
        for _ in range(_k):
            for i in range(c, -1, -1):
                p[i] = p[i] * i / c + p[i - 1] * (c - i + 1) / c
                if i == 0:
                    p[0] = 0
        ret.append(p[c])
    return np.array(ret)


def authors_binom_sum(k, c, f):
    return np.array(
        [np.sum([math.comb(_k, m) * (1 / c) ** m * (1 - 1 / c) ** (_k - m) * f(m, _k) for m in range(_k + 1)]) for _k in k]
    )


def fraction_coupon_uniform(n, C):
    """Exact inclusion-exclusion for a uniform prior in rationals."""
    return sum((-1) ** j * math.comb(C, j) * Fraction(C - j, C) ** n for j in range(C + 1))


def fraction_coupon(n, pi):
    """Exact inclusion-exclusion over subsets in rationals: P(all classes seen in n draws)."""
    C = len(pi)
    s = Fraction(0)
    for r in range(C + 1):
        for S in combinations(range(C), r):
            s += (-1) ** r * (1 - sum(pi[i] for i in S)) ** n
    return s


def mp_coupon_uniform(n, C):
    """Inclusion-exclusion with enough digits to survive the cancellation (terms up to 2^C, result >= C!/C^C)."""
    with mpmath.workdps(int(0.9 * C) + 40):
        s = mpmath.mpf(0)
        for j in range(C + 1):
            t = mpmath.binomial(C, j) * (mpmath.mpf(C - j) / C) ** n
            s += t if j % 2 == 0 else -t
        return float(mpmath.log(s))


def mp_binom_expect_integral(K, p, c, a=1.0):
    """E log(a + c m), m ~ Bin(K, p), from log(1 + y) = int_0^inf e^{-t}(1 - e^{-yt})/t dt (no sum over m)."""
    with mpmath.workdps(30):
        p, c, a = mpmath.mpf(p), mpmath.mpf(c) / a, mpmath.mpf(a)
        f = lambda t: mpmath.exp(-t) / t * -mpmath.expm1(K * mpmath.log1p(-p * -mpmath.expm1(-c * t)))  # noqa: E731
        pts = [0] + [mpmath.mpf(10) ** e for e in range(-12, 3)] + [mpmath.inf]
        return float(mpmath.log(a) + mpmath.quad(f, pts))


# ----------------------------------------------------------------------------------------------------------
# Reference values (THEORY.md, C = 10, K = 32, b = 1, uniform) and the authors' formulas
# ----------------------------------------------------------------------------------------------------------


def test_reference_values():
    assert abs(B.delta_upper(32, 10) - -0.2955891488) < 1e-9
    assert abs(B.delta_lower(32, 10) - -2.0922557881) < 1e-9
    assert abs(B.min_contrastive_loss(32, 10) - 2.0753361154) < 1e-9
    assert abs(B.collision_term(32, 10) - 1.3424887705) < 1e-9
    assert abs(B.coupon_collector_probability(33, 10, log=True) - -0.3304881534) < 1e-9
    # and independently of the quoted digits
    assert rel_err(B.delta_upper(32, 10), math.log(10 * math.cosh(1) ** 2 / 32)) < 1e-14
    assert rel_err(B.coupon_collector_probability(33, 10), float(fraction_coupon(33, [Fraction(1, 10)] * 10))) < 1e-12


@pytest.mark.parametrize("C", [10, 50, 100])
def test_equal_to_authors_formulas(C):
    k = np.arange(1, 151)
    b = 1.0
    cosh2 = np.cosh(b**2) ** 2
    pi = np.ones(C) / C
    ub = np.log(pi.max() * C**2 * cosh2 / k)
    lb = -np.sum(pi * np.log(pi)) + np.log(k) - 2 * np.log(1 + k) - 2 * np.log(np.cosh(b**2))
    assert scaled_err(B.delta_upper(k, C, form="paper"), ub) < 1e-12
    assert scaled_err(B.delta_upper(k, C), ub) < 1e-12
    assert scaled_err(B.delta_lower(k, C), lb) < 1e-12
    nce = authors_binom_sum(k, C, lambda m, K: np.log(1 + m + (K - m) * np.exp(-2 * b**2)))
    col = authors_binom_sum(k, C, lambda m, K: np.log(1 + m))
    assert rel_err(B.min_contrastive_loss(k, C), nce) < 1e-12
    assert rel_err(B.collision_term(k, C), col) < 1e-12
    assert rel_err(B.min_supervised_loss(C), np.log(1 + (C - 1) * np.exp(-2 * b**2))) < 1e-14
    tau = 1 - (1 - 1 / C) ** k
    assert rel_err(B.collision_probability(k, C), tau) < 1e-12
    v = authors_coupon(k + 1, C)
    defined = v > 1e-250
    assert rel_err(B.coupon_collector_probability(k + 1, C)[defined], v[defined]) < 1e-11
    # the earlier bounds, fed the authors' R_cont* as they do
    # (1 - tau is taken as (1 - 1/C)^K: the script's 1 - (1 - (1 - 1/C)^K) loses ~log10(1/(1-tau)) digits)
    harmonic = lambda c: np.log(c) + 0.577  # noqa: E731
    one_minus_tau = (1 - 1 / C) ** k
    with np.errstate(divide="ignore"):
        ar = 1 / (one_minus_tau * v) * (nce - col)
        ns = (2 * nce - col) / v
    ash = 2 * np.maximum(1, 2 * (C - 1) * harmonic(C - 1) / k) / one_minus_tau * (nce - col)
    big = k >= C
    assert rel_err(B.arora(nce, k, C)[big], ar[big]) < 1e-11
    assert rel_err(B.nozawa_sato(nce, k, C)[big], ns[big]) < 1e-11
    assert np.all(np.isnan(B.arora(nce, k, C)[~big])) and np.all(np.isnan(B.nozawa_sato(nce, k, C)[~big]))
    assert rel_err(B.ash(nce, k, C, harmonic="authors"), ash) < 1e-12
    # the default, harmonic="exact": the same with H_{C-1} = sum_{i < C} 1 / i (what gap_report and the reproduction
    # use; the authors' log(n) + 0.577 above does not pin it: H_C in its place passed every other test)
    exact_h = float(sum(Fraction(1, i) for i in range(1, C)))
    ash_exact = 2 * np.maximum(1, 2 * (C - 1) * exact_h / k) / one_minus_tau * (nce - col)
    assert rel_err(B.ash(nce, k, C), ash_exact) < 1e-12


def test_earlier_bounds_at_the_largest_k():
    # K = 2^63 - 1, the largest K taken: K + 1 wraps in int64, and upsilon_{K+1} is taken as upsilon_K (_plus_one;
    # a mutation audit: without that guard log upsilon was -inf and Nozawa-Sato silently -inf). There C (1 - 1/C)^K
    # underflows, so upsilon_K = 1 in float64 and Nozawa-Sato is 2 R_cont - col itself.
    K = 2**63 - 1
    assert B.coupon_collector_probability(K, 10) == 1.0
    value = B.nozawa_sato(3.0, K, 10)
    assert math.isfinite(value) and value == pytest.approx(2 * 3.0 - B.collision_term(K, 10), rel=1e-14, abs=0)
    # One more draw, the same float (an array's entries against each other: against the scalar call numpy's vector
    # and scalar loops may round one ulp apart, as numpy 2.4.6's did here)
    pair = B.nozawa_sato(3.0, [K, K - 1], 10)
    assert pair[0] == pair[1] and pair[0] == pytest.approx(value, rel=1e-15, abs=0), (pair, value)


def test_harmonic_numbers():
    assert B.harmonic_number(9) == pytest.approx(float(sum(Fraction(1, i) for i in range(1, 10))), rel=1e-15)
    assert abs(B.harmonic_number(9) - 2.829) < 1e-3 and abs(B.harmonic_number(9, "authors") - 2.774) < 1e-3
    # the summed range, which Ash's bound takes for every C - 1 up to 1e5 (a mutation audit: summing only up to 10
    # and Euler-Maclaurin above passed every test, 7e-10 off at n = 11): against exact rationals, to the terms'
    # rounding (each 1 / i is rounded before the exact sum: 2.1e-16 at n = 39)
    exact = Fraction(0)
    for n in range(1, 301):
        exact += Fraction(1, n)
        assert B.harmonic_number(n) == pytest.approx(float(exact), rel=1e-15, abs=0), n
    # past float's range too (n ** 2 of a Python int past ~1e154 raised OverflowError)
    for n in (1000, 99_999, 100_000, 100_001, 10**7, 10**20, 10**200, 10**400):
        with mpmath.workdps(30):
            ref = float(mpmath.harmonic(n))
        assert rel_err(B.harmonic_number(n), ref) < 1e-14
    # exact H makes Ash's coefficient larger than with log(n) + 0.577
    assert B.ash(3.0, 5, 10) > B.ash(3.0, 5, 10, harmonic="authors")
    # the empty sum (a mutation audit: H_0 = 1 and log(0) + 0.577 = 0 passed every test)
    assert B.harmonic_number(0) == 0.0 and B.harmonic_number(0, "authors") == -math.inf
    # an array of options reached `harmonic == "exact"` first: numpy's "truth value ... is ambiguous"
    for bad in (np.array(["exact", "authors"]), "Exact", None):
        with pytest.raises(ValueError, match="harmonic must be 'exact' or 'authors'"):
            B.harmonic_number(5, bad)


# ----------------------------------------------------------------------------------------------------------
# Coupon collector
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("C", [1, 2, 3, 5, 8, 12])
def test_coupon_uniform_exact_rationals(C):
    ns = np.arange(0, 8 * C + 20)
    got = B.coupon_collector_probability(ns, C)
    ref = np.array([float(fraction_coupon_uniform(int(n), C)) for n in ns])
    if C <= 5:  # the subset form agrees with the binomial form
        assert all(fraction_coupon(int(n), [Fraction(1, C)] * C) == fraction_coupon_uniform(int(n), C) for n in ns[:12])
    assert np.all(got[ns < C] == 0.0)
    assert rel_err(got[ns >= C], ref[ns >= C]) < 1e-12


@pytest.mark.parametrize("weights", [[1, 2], [1, 1, 3], [2, 3, 5, 7], [1, 1, 1, 2, 9], [1, 2, 3, 4, 5, 30]])
def test_coupon_general_prior_exact_rationals(weights):
    pi = [Fraction(w, sum(weights)) for w in weights]
    C = len(pi)
    ns = sorted({C, C + 1, C + 2, 2 * C + 1, 5 * C, 20 * C, 200, 1000, 5000})
    got = B.coupon_collector_probability(ns, prior=[float(x) for x in pi], log=True)
    ref = [math.log(fraction_coupon(n, pi)) for n in ns]
    assert log_err(got, ref) < 1e-11
    # and relatively, as the bounds see log upsilon where upsilon is near 1: log1p of the exact 1 - upsilon (the
    # absolute error above, ~1e-17 there, passed a mutation that sent every general prior to the saddle-point
    # fallback: 7e-12 relative at (2, 3, 5, 7) / 17, against 6e-14 or less on this code)
    near_one = [math.log1p(-float(1 - fraction_coupon(n, pi))) for n in ns]
    assert rel_err(got, near_one) < 1e-12


def mp_coupon_general_log(n, pi):
    """log upsilon_n by inclusion-exclusion over all subsets in 60-digit arithmetic (small C only)."""
    with mpmath.workdps(60):
        pm = [mpmath.mpf(x) for x in pi]
        miss = mpmath.mpf(0)
        for k in range(1, len(pm) + 1):
            for S in combinations(range(len(pm)), k):
                miss += (-1) ** (k + 1) * (1 - sum(pm[c] for c in S)) ** n
        return float(mpmath.log1p(-miss))


@pytest.mark.parametrize(
    "pi,ns",
    [
        ([0.6, 0.39999, 1e-5], [10**5, 3 * 10**5, 1_100_000, 2 * 10**6]),
        ([0.5, 0.499999, 1e-6], [10**6, 9 * 10**6]),
        ([1e-3, 2e-3, 0.497, 0.5], [1000, 5000, 20000, 30000]),
        ([0.2, 0.3, 0.5], [5, 20, 60, 100, 200]),
        ([0.01, 0.01, 0.01, 0.97], [400, 1581]),  # sum_c (1 - pi_c)^n just below 1e-6 at n = 1581
        ([0.1] * 5 + [0.25] * 2, [40, 152]),
    ],
)
def test_coupon_general_prior_relative_accuracy_near_one(pi, ns):
    # Where upsilon_n is close to 1, log upsilon_n is small: its *relative* error is what the bounds see. The
    # Cauchy integral alone had ~1e-10 absolute error there (1e-6 relative at pi = (0.6, 0.39999, 1e-5)).
    pi = np.array(pi) / sum(pi)
    got = B.coupon_collector_probability(ns, prior=pi, log=True)
    ref = [mp_coupon_general_log(n, list(pi)) for n in ns]
    assert rel_err(got, ref) < 1e-12


@pytest.mark.parametrize("pi", [[5.5413479e-08, 9.59075e-10, 2.9339258e-08, 0.999999914288188],
                                [1.02357e-10, 9.1193691e-08, 4.99902334e-07, 5.293238e-09, 0.99999940350838]])
def test_coupon_cauchy_integral_with_a_dominant_class(pi):
    # n = 10^7 with a class of pi ~ 1 (x = r pi ~ 10^7 on the saddle circle): the integrand's log was formed as
    # log(e^w - 1) - log(e^x - 1) = (w - x) + ..., and w - x of two numbers ~1e7 lost eps x = 2e-9 per point:
    # 5.6e-10 absolute (8e-11 relative) error in log upsilon. Here the public function takes the Cauchy integral
    # (inclusion-exclusion refuses these), and the private one is checked as well.
    pi = np.array(pi) / sum(pi)
    n = 10**7
    ref = mp_coupon_general_log(n, list(pi))
    assert rel_err(B.coupon_collector_probability(n, prior=pi, log=True), ref) < 1e-13
    assert rel_err(B._log_coupon_cauchy(np.array([n]), B._resolve_prior(None, pi)), [ref]) < 1e-13


@pytest.mark.parametrize("n", [10**16, 10**17, 5 * 10**17])
def test_coupon_dominant_class_past_2_to_the_53_draws(n):
    # x = r pi ~ n for the dominant class: the saddle point's variance mu (1 + x - mu) cancelled to 0 once 1 + x == x
    # in float64 (n >~ 2^53), the trapezoid rule took 50 points for a true sd ~ 3e8 and upsilon came out above 1
    # (log upsilon +7.4 at 1e17 where it is -9.2). Two classes: upsilon = 1 - (1 - pi_1)^n - (1 - pi_0)^n, in mpmath.
    with mpmath.workdps(60):
        pm = [mpmath.mpf(1), mpmath.mpf("1e-21")]
        pm = [x / sum(pm) for x in pm]
        ref = float(mpmath.log(1 - (1 - pm[1]) ** n - (1 - pm[0]) ** n))
    assert rel_err(B.coupon_collector_probability(n, prior=np.array([1.0, 1e-21]), log=True), ref) < 1e-12


@pytest.mark.parametrize("C", [40, 150, 400])
def test_coupon_uniform_mpmath(C):
    ns = sorted({C, C + 1, C + 3, int(1.5 * C), 2 * C, int(C * math.log(C)), 4 * C, 8 * C, 20 * C})
    got = B.coupon_collector_probability(ns, C, log=True)
    assert log_err(got, [mp_coupon_uniform(n, C) for n in ns]) < 1e-11


@pytest.mark.parametrize("C,n", [(500, 3107), (3029, 24280), (3029, 25828)])
def test_coupon_uniform_near_one_expected_missing_class(C, n):
    # x = C (1 - 1/C)^n, the expected number of missing classes, ~0.6-1 here, where the uniform coupon probability
    # takes inclusion-exclusion: a mutation audit sent such points to the Cauchy integral (its x <= 5 made 0.5),
    # 1.5e-13 off at (3029, 24280), and every other test passed. Reference: inclusion-exclusion in mpmath at 60
    # digits over j <= 200 (term j ~ x^j / j!, so the rest is below 1e-300; no cancellation to speak of at x ~ 1).
    with mpmath.workdps(60):
        terms = (mpmath.binomial(C, j) * (mpmath.mpf(C - j) / C) ** n for j in range(201))
        want = float(mpmath.log(mpmath.fsum(t if j % 2 == 0 else -t for j, t in enumerate(terms))))
    assert 0.5 < C * (1 - 1 / C) ** n < 1.1
    got = float(B.coupon_collector_probability(n, C, log=True))
    assert abs(got - want) <= 2e-14 * abs(want)


@pytest.mark.parametrize("C", [10, 3029, 10_000])
def test_coupon_closed_forms_large_C(C):
    # upsilon_C = C!/C^C, upsilon_{C+1} = C! S(C+1, C)/C^{C+1}, S(C+2, C) = binom(C+2, 3)(3C+1)/4
    base = math.lgamma(C + 1) - C * math.log(C)
    ref = [base, base + math.log(math.comb(C + 1, 2) / C), base + math.log(math.comb(C + 2, 3) * (3 * C + 1) / 4 / C**2)]
    assert log_err(B.coupon_collector_probability([C, C + 1, C + 2], C, log=True), ref) < 1e-12
    assert B.coupon_collector_probability(C - 1, C) == 0.0
    # far right tail: log upsilon = log(1 - C(1-1/C)^n + ...) to double precision, n up to 10^7
    n = 10**7 if C > 10 else 2000
    x = C * (1 - 1 / C) ** n
    assert abs(B.coupon_collector_probability(n, C, log=True) - math.log1p(-x)) < 1e-15


def test_coupon_many_groups_near_one_against_three_bonferroni_terms():
    """300 distinct prior values (more groups than inclusion-exclusion takes), n = 3800: s = sum (1 - pi_c)^n =
    1.4e-3, past the two-term Bonferroni branch (s <= 1e-5, error <= s^2 / 6). Against S1 - S2 + S3 (the next term
    <= s^4 / 24, 1.2e-10 of log upsilon): 1e-9 relative (a mutation audit moved that branch's threshold to 1e-2,
    2.9e-7 off, and no test saw it)."""
    w = 1.0 + np.arange(300) / 1000.0
    pi = w / w.sum()
    n = 3800
    s1 = np.sum((1 - pi) ** n)
    i, j = np.triu_indices(300, 1)
    s2 = np.sum((1 - pi[i] - pi[j]) ** n)
    s3 = 0.0
    for a in range(300):  # triples a < b < c
        b, c = np.triu_indices(300 - a - 1, 1)
        s3 += np.sum((1 - pi[a] - pi[a + 1 + b] - pi[a + 1 + c]) ** n)
    assert 1e-3 < s1 < 2e-3
    want = math.log1p(-(s1 - s2 + s3))
    got = B.coupon_collector_probability(n, prior=pi, log=True)
    assert abs(got - want) <= 1e-9 * abs(want), (got, want)


def test_coupon_methods_agree_where_both_apply():
    # the saddle-point Cauchy integral against the inclusion-exclusion region, and Bonferroni for a general prior
    for C in (300, 10_000):
        n = np.array([int(C * math.log(C / 4.0)), int(C * math.log(C / 2.0)), int(C * math.log(C))], dtype=np.int64)
        ie, _ = B._log_coupon_ie_uniform(n, C)
        cauchy = B._log_coupon_cauchy(n, B._resolve_prior(C, None))
        assert log_err(cauchy, ie) < 1e-10
    p = B._resolve_prior(None, np.arange(1, 51) / np.arange(1, 51).sum())
    n = np.array([20000, 40000], dtype=np.int64)
    assert log_err(B._log_coupon_cauchy(n, p), B._log_coupon(n, p)) < 1e-10


def test_coupon_arc_bound_is_an_upper_bound_decreasing_in_theta():
    # The Cauchy integral drops the points past the angle where a bound of the integrand's modulus falls below e^-60:
    # per class |e^w - 1| / (e^x - 1) <= L(x cos theta) - L(x) in logs, L(s) = log((e^s - 1) / s). A bound that is
    # not one, or not monotone on [0, pi], would drop points that matter. L against mpmath in every branch (series,
    # s > 0, s < 0; to ~1e-15 absolute), then the inequality against the modulus in mpmath and the monotonicity on a grid.
    s = np.array([-1e6, -700.0, -30.0, -1.0, -2e-5, -9e-6, -1e-9, 0.0, 1e-12, 9.99e-6, 1.01e-5, 0.3, 1.0, 40.0, 800.0, 1e7])
    got = B._log_expm1_over(s)
    with mpmath.workdps(50):
        want = [0.0 if v == 0 else float(mpmath.log(mpmath.expm1(mpmath.mpf(v)) / mpmath.mpf(v))) for v in s]
    # (absolute near 0: the bound feeds a sum compared with -60; the series' next term s^3 / 2880 is below 1e-18 there)
    assert np.all(np.abs(got - want) <= 4e-15 * np.maximum(np.abs(want), 1.0)), (got, want)
    theta = np.linspace(0.0, np.pi, 401)
    for x in (1e-7, 0.05, 0.5, 1.1, 3.0, 20.0, 300.0):
        bound = B._log_expm1_over(x * np.cos(theta)) - B._log_expm1_over(np.array(x))
        assert np.all(np.diff(bound) <= 0.0) and bound[0] == 0.0
        with mpmath.workdps(40):
            xm = mpmath.mpf(x)
            exact = [float(mpmath.log(abs(mpmath.expm1(xm * mpmath.expj(t))) / mpmath.expm1(xm))) for t in theta[::8]]
        assert np.all(np.asarray(exact) <= bound[::8] + 1e-13), x


def test_coupon_cauchy_many_small_classes_against_a_positive_power_series():
    # upsilon_n = n! [z^n] prod_c (e^{pi_c z} - 1). Scaled by z -> r z every factor's coefficients (r pi_c)^k / k! are
    # positive, so multiplying the truncated series in float64 has no cancellation (relative error ~ C n eps): an
    # oracle independent of the integral (each factor divided by e^{r pi_c} - 1, added back in logs). 300 distinct prior values and n near C, where most x_c = r pi_c are below
    # log 3 (there the old arc bound, (e^{x cos theta} + 1) / (e^x - 1) alone, kept the whole circle).
    C = 300
    pi = np.linspace(1.0, 3.0, C)
    pi /= pi.sum()
    p = B._resolve_prior(None, pi)
    n = np.array([C + 1, C + 17, 400, 2 * C], dtype=np.int64)
    got = B._log_coupon_cauchy(n, p)
    for k, nk in enumerate(n):
        r = float(B._saddle_radius(np.array([nk]), p)[0])
        m = int(nk)
        log_fact = np.array([math.lgamma(j + 1.0) for j in range(m + 1)])
        poly = np.zeros(m + 1)
        poly[0] = 1.0
        for pc in pi:  # each factor over e^{x_c} - 1 (a zero-truncated Poisson pmf), so the product cannot underflow
            with np.errstate(under="ignore"):
                f = np.exp(np.arange(m + 1) * math.log(r * pc) - log_fact - math.log(math.expm1(r * pc)))
            f[0] = 0.0
            poly = np.convolve(poly, f)[: m + 1]
        log_scale = sum(math.log(math.expm1(r * pc)) for pc in pi)
        want = math.lgamma(m + 1.0) - m * math.log(r) + log_scale + math.log(poly[m])
        assert abs(got[k] - want) <= 2e-12, (nk, got[k], want)  # log upsilon: relative error of upsilon (4e-13 seen)
    assert log_err(B._log_coupon(n, p), got) < 1e-12


@pytest.mark.parametrize("C", [10, 37])
def test_coupon_expected_collection_time(C):
    # sum_{n >= 0} P(not all collected after n draws) = C H_C
    ns = np.arange(0, 60 * C)
    tail = -np.expm1(B.coupon_collector_probability(ns, C, log=True))
    assert tail[-1] < 1e-17
    assert rel_err(math.fsum(tail), C * B.harmonic_number(C)) < 1e-11


def test_coupon_monotone_and_curve_shape():
    for kw in (dict(num_classes=3029), dict(prior=np.r_[np.full(20, 0.01), np.full(40, 0.02)])):
        lv = B.coupon_collector_probability(np.arange(1, 40_000, 7), **kw, log=True)
        lv = lv[np.isfinite(lv)]
        assert lv.size > 5000 and np.all(np.diff(lv) >= -1e-13)
        assert np.all(lv <= 0.0)


# ----------------------------------------------------------------------------------------------------------
# tau and the binomial expectations
# ----------------------------------------------------------------------------------------------------------


def test_collision_probability_exact_and_stable():
    for C, K in [(2, 1), (3, 4), (7, 10), (10, 33)]:
        ref = 1 - (1 - Fraction(1, C)) ** K
        assert rel_err(B.collision_probability(K, C), float(ref)) < 1e-14
    pi = [Fraction(1, 6), Fraction(1, 3), Fraction(1, 2)]
    for K in range(0, 12):
        ref = sum(p * (1 - (1 - p) ** K) for p in pi)
        assert abs(B.collision_probability(K, prior=[float(x) for x in pi]) - float(ref)) <= 1e-15 * max(1, float(ref))
    # log(1 - tau) where the power underflows
    assert rel_err(B.collision_probability(10**7, 100, log=True), 10**7 * math.log1p(-0.01)) < 1e-14
    with mpmath.workdps(40):
        ref = float(mpmath.log(0.3 * (1 - mpmath.mpf(0.3)) ** 10**6 + 0.7 * (1 - mpmath.mpf(0.7)) ** 10**6))
    assert rel_err(B.collision_probability(10**6, prior=[0.3, 0.7], log=True), ref) < 1e-12
    t = B.collision_probability(np.arange(0, 500), 50)
    assert t[0] == 0.0 and np.all(np.diff(t) > 0) and t[-1] < 1


@pytest.mark.parametrize("weights", [None, [1, 2, 3], [1, 1, 5, 5]])
def test_binomial_expectations_exact_small(weights):
    if weights is None:
        pi, kw = [Fraction(1, 4)] * 4, dict(num_classes=4)
    else:
        pi = [Fraction(w, sum(weights)) for w in weights]
        kw = dict(prior=[float(x) for x in pi])
    b = 0.7
    e = math.exp(-2 * b * b)
    for K in (0, 1, 2, 5, 17, 40):
        col = sum(float(p * math.comb(K, m) * p**m * (1 - p) ** (K - m)) * math.log1p(m) for p in pi for m in range(K + 1))
        mcl = sum(
            float(p * math.comb(K, m) * p**m * (1 - p) ** (K - m)) * math.log1p(m + (K - m) * e)
            for p in pi
            for m in range(K + 1)
        )
        assert abs(B.collision_term(K, **kw) - col) <= 1e-13 * max(col, 1e-300) + 1e-300
        assert abs(B.min_contrastive_loss(K, **kw, norm_bound=b) - mcl) <= 1e-13 * max(mcl, 1e-300) + 1e-300


def mp_mixed_expect_sum(K, pi, g):
    """sum_c pi_c E_{m ~ Bin(K, pi_c)} g(m, K) as the exact sum over the whole support, at 30 digits."""
    with mpmath.workdps(30):
        gm = [g(m, K) for m in range(K + 1)]
        total = mpmath.mpf(0)
        for p in pi:
            p = mpmath.mpf(float(p))
            odds, pmf, acc = p / (1 - p), (1 - p) ** K, mpmath.mpf(0)
            for m in range(K + 1):
                acc += pmf * gm[m]
                pmf *= odds * (K - m) / (m + 1)
            total += p * acc
        return float(total)


def test_binomial_expectations_long_windows_exact():
    """Windows of hundreds of points per side (the running product's two-level scan, blocks of sides of different
    lengths, the log table and the direct-log paths, a general g) against the exact sum over the whole support."""
    prior = [0.5, 0.3, 0.15, 0.05]
    e = mpmath.exp(-2 * mpmath.mpf(0.7) ** 2)
    Ks = [1, 2, 37, 1000, 10_001]
    col = np.array([mp_mixed_expect_sum(K, prior, lambda m, K: mpmath.log(m + 1)) for K in Ks])
    mcl = np.array([mp_mixed_expect_sum(K, prior, lambda m, K: mpmath.log(1 + m + (K - m) * e)) for K in Ks[:4]])
    assert rel_err(B.collision_term(np.array(Ks), prior=prior), col) < 1e-14  # few points: log(1 + m) directly
    many = np.concatenate([Ks, np.arange(9_000, 10_000)])  # many points: log(1 + m) from a table
    assert rel_err(B.collision_term(many, prior=prior)[: len(Ks)], col) < 1e-14
    assert rel_err(B.min_contrastive_loss(np.array(Ks[:4]), prior=prior, norm_bound=0.7), mcl) < 1e-14


@pytest.mark.parametrize("K,C", [(1, 10_000), (3029, 3029), (10**5, 3029), (10**6, 10), (10**7, 10_000), (10**7, 2)])
def test_binomial_expectations_large_against_integral(K, C):
    assert rel_err(B.collision_term(K, C), mp_binom_expect_integral(K, 1 / C, 1.0)) < REL
    e = math.exp(-2.0)
    # log(1 + m + (K - m) e) = log(a + (1 - e) m) with a = 1 + K e
    ref = mp_binom_expect_integral(K, 1 / C, 1 - e, a=1 + K * e)
    assert rel_err(B.min_contrastive_loss(K, C), ref) < REL


def test_binomial_expectations_monotone():
    k = np.arange(0, 20_000, 3)
    for kw in (dict(num_classes=3029), dict(prior=[0.1, 0.2, 0.7])):
        assert np.all(np.diff(B.collision_term(k, **kw)) > 0)
        assert np.all(np.diff(B.min_contrastive_loss(k, **kw)) > 0)
    # collisions: E log(1 + m) <= log(1 + K/C) (Jensen) and >= 0
    col = B.collision_term(k, 3029)
    assert np.all(col <= np.log1p(k / 3029) + 1e-15) and col[0] == 0.0


# ----------------------------------------------------------------------------------------------------------
# Delta_U, Delta_L: forms, limits, monotonicity
# ----------------------------------------------------------------------------------------------------------


def test_delta_upper_forms_and_limits():
    k = np.array([1, 2, 10, 1000, 10**7])
    for b in (0.1, 1.0, 3.0, 30.0):  # 30: cosh(900) overflows a naive evaluation
        lc = b * b + math.log1p(math.exp(-2 * b * b)) - math.log(2)
        du = B.delta_upper(k, 50, norm_bound=b)
        assert np.all(np.isfinite(du)) and np.all(np.diff(du) < 0)
        # Delta_U + log K is the constant log(C cosh(b^2)^2): the K -> infinity limit is exact at every K
        assert rel_err(du + np.log(k), math.log(50) + 2 * lc) < 1e-14
    pi = np.array([0.5, 0.3, 0.15, 0.05])
    paper = B.delta_upper(7, prior=pi, form="paper")
    assert rel_err(paper, math.log(0.5 * 16 * math.cosh(1) ** 2 / 7)) < 1e-14
    alt = math.log(math.cosh(1) ** 2 / (0.05 * 7))
    assert rel_err(B.delta_upper(7, prior=pi), min(paper, alt)) < 1e-14
    pi2 = np.array([0.9, 0.1])  # here the paper's form is the smaller one
    assert B.delta_upper(3, prior=pi2) == pytest.approx(B.delta_upper(3, prior=pi2, form="paper"), rel=1e-14)
    # a uniform prior given as a vector is the uniform prior
    assert B.delta_upper(5, prior=np.full(8, 1 / 8)) == pytest.approx(B.delta_upper(5, 8), rel=1e-14)
    # small b: Delta_U = 2 log cosh(b^2) at C = K = 1, and the log cosh keeps its relative digits (b = 1e-4:
    # 2 log cosh(1e-8) = 1e-16 - 3.3e-33 came out 2.2e-16 from |x| + log1p(e^{-2|x|}) - log 2)
    with mpmath.workdps(80):
        for b in (1e-4, 1e-2, 0.5, 0.99999, 1.00001):
            ref = float(2 * mpmath.log(mpmath.cosh(mpmath.mpf(b) ** 2)))
            assert rel_err(B.delta_upper(1, 1, norm_bound=b), ref) < 1e-14, b
            assert rel_err(B.delta_lower(1, 1, norm_bound=b, form="proved"), -math.log(2) - ref) < 1e-14, b


def test_delta_lower_forms():
    k = np.arange(1, 300)
    C = 10
    proved = B.delta_lower(k, C, form="proved")
    assert rel_err(proved, -np.log1p(k / C) - 2 * np.log(np.cosh(1.0))) < 1e-13
    assert np.all(proved <= B.delta_lower(k, C) + 1e-12)  # C >= 3: the proved constant is the looser one
    # distinct values, then repeated ones (an entropy over the distinct values alone would pass the first)
    priors = (np.array([0.05, 0.1, 0.15, 0.2, 0.5]), np.array([0.125, 0.125, 0.25, 0.25, 0.25]))
    for pi, K in itertools.product(priors, (1, 2, 3, 9, 10, 11, 50, 10**6)):
        ref = -2 * math.log(math.cosh(0.5**2)) - sum(p * math.log(max(1 + K * p, K * pi.max())) for p in pi)
        assert rel_err(B.delta_lower(K, prior=pi, norm_bound=0.5, form="proved"), ref) < 1e-13
        H = -float(np.sum(pi * np.log(pi)))
        ref = H + math.log(K) - 2 * math.log1p(K) - 2 * math.log(math.cosh(0.25))
        assert rel_err(B.delta_lower(K, prior=pi, norm_bound=0.5), ref) < 1e-13
    # Delta_L + log K -> log C - 2 log cosh(b^2) ... from below, and Delta_L decreases like -log K
    dl = B.delta_lower(np.array([10, 10**3, 10**7]), C)
    assert np.all(np.diff(dl) < 0)


def test_delta_lower_proved_curve_under_a_long_tailed_prior_stays_small():
    # A curve K = 1..N mixes small K (every class compared through 1 + K pi_c) with large ones (one class): the
    # blocks were sized by their narrowest row, so one block of ~2^18 rows x C: 1.2 GB at C = 1000, N = 20000.
    import tracemalloc

    C = 1000
    pi = 1.0 / np.arange(1, C + 1)
    pi /= pi.sum()
    k = np.arange(1, 20001)
    tracemalloc.start()
    try:
        got = B.delta_lower(k, prior=pi, form="proved")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    lc = 2 * math.log(math.cosh(1.0))
    for K in (1, 2, 7, 100, 999, 5000, 20000):  # the definition, class by class
        ref = -lc - math.fsum(p * math.log(max(1 + K * p, K * pi.max())) for p in pi)
        assert rel_err(got[K - 1], ref) < 1e-13, K


@pytest.mark.parametrize("small", [1e-12, 1e-15])
def test_collision_probability_log_with_a_class_near_one(small):
    # 1 - pi_c for pi_c = 1 - 1e-12 kept only pi_c's rounding (log(1 - tau_1) 4e-7 relative off, 1e-5 at 1e-15):
    # it is the other classes' mass. Exact: 60-digit arithmetic on the floats given, normalised.
    w = [small, 1.0 - small]
    with mpmath.workdps(60):
        pi = [mpmath.mpf(x) / mpmath.fsum([mpmath.mpf(y) for y in w]) for x in w]
        for K in (1, 2, 5, 1000):
            exact = mpmath.log(mpmath.fsum(q * (1 - q) ** K for q in pi))
            assert rel_err(B.collision_probability(K, prior=np.array(w), log=True), float(exact)) < 1e-14, K


def test_interval_and_min_losses():
    lo, hi = B.supervised_loss_interval(2.0, 32, 10)
    assert lo == pytest.approx(2.0 + B.delta_lower(32, 10)) and hi == pytest.approx(2.0 + B.delta_upper(32, 10))
    lo, hi = B.supervised_loss_interval(np.array([1.0, 2.0, 3.0]), np.array([1, 2, 4]), prior=[0.2, 0.8], norm_bound=2.0)
    assert lo.shape == hi.shape == (3,) and np.all(lo < hi)
    # the defaults are delta_upper's "best" and delta_lower's "paper" forms (a mutation audit: an interval built on
    # the paper's looser upper form passed): a prior where "best" is the tighter, -log pi_min < log(pi_max C^2)
    prior = [0.19] + [0.09] * 9
    assert -math.log(0.09) < math.log(0.19 * 100) - 0.5
    lo, hi = B.supervised_loss_interval(2.0, 8, prior=prior)
    assert hi == pytest.approx(2.0 + B.delta_upper(8, prior=prior, form="best"), rel=1e-15)
    assert hi < 2.0 + B.delta_upper(8, prior=prior, form="paper") - 0.5
    assert lo == pytest.approx(2.0 + B.delta_lower(8, prior=prior, form="paper"), rel=1e-15)
    assert lo != pytest.approx(2.0 + B.delta_lower(8, prior=prior, form="proved"), rel=1e-6)
    assert B.min_supervised_loss(10, 0.5) == pytest.approx(math.log(1 + 9 * math.exp(-0.5)), rel=1e-15)
    # the minima of the paper's synthetic figure: R_cont* + Delta_U >= R_supv* (the upper bound is consistent)
    k = np.arange(1, 200)
    assert np.all(B.min_contrastive_loss(k, 50) + B.delta_upper(k, 50) >= B.min_supervised_loss(50) - 1e-12)


# ----------------------------------------------------------------------------------------------------------
# Earlier bounds: where defined, priors
# ----------------------------------------------------------------------------------------------------------


def test_earlier_bounds_domain_and_prior():
    k = np.arange(1, 30)
    ar, ns, ash = B.arora(3.0, k, 10), B.nozawa_sato(3.0, k, 10), B.ash(3.0, k, 10)
    assert np.all(np.isnan(ar[k < 10])) and np.all(np.isfinite(ar[k >= 10]))
    assert np.all(np.isnan(ns[k < 10])) and np.all(np.isfinite(ns[k >= 10]))
    assert np.all(np.isfinite(ash))
    for fn in (B.arora, B.nozawa_sato, B.ash):
        with pytest.raises(ValueError, match="prior"):
            fn(3.0, 12, prior=[0.2, 0.8])
        assert fn(3.0, 12, prior=[0.5, 0.5]) == pytest.approx(fn(3.0, 12, 2), rel=1e-14)
    assert math.isnan(B.ash(1.0, 3, 1))
    # C = 1: 1 - tau_K = 0, so Arora et al. is undefined whatever R_cont is (was +inf, NaN or -inf by its sign)
    for r in (2.0, math.log(4.0), 1.0):
        assert math.isnan(B.arora(r, 5, 1))
    assert isinstance(B.arora(3.0, 12, 10), float) and B.arora([3.0, 4.0], 12, 10).shape == (2,)
    # huge K: 1 / (1 - tau) overflows to inf rather than raising or returning garbage
    assert B.arora(20.0, 10**5, 10) == math.inf
    assert B.nozawa_sato(20.0, 10**5, 10) == pytest.approx(40.0 - B.collision_term(10**5, 10), rel=1e-14)


# ----------------------------------------------------------------------------------------------------------
# Shapes and validation
# ----------------------------------------------------------------------------------------------------------


def test_float32_prior_is_accepted_and_renormalised():
    # A float32 probability vector sums to 1 only within its own rounding (~C eps32 >> 1e-9).
    counts = np.array([3, 1, 2, 1], dtype=np.float32)
    p32 = counts / np.float32(7)
    assert abs(float(p32.astype(np.float64).sum()) - 1.0) > 1e-9  # the case that was rejected
    exact = counts.astype(np.float64) / 7
    assert B.delta_upper(16, prior=p32) == pytest.approx(B.delta_upper(16, prior=exact), rel=1e-6)
    with pytest.raises(ValueError, match="sum to 1"):
        B.delta_upper(16, prior=np.array([0.3, 0.3, 0.3], dtype=np.float32))
    with pytest.raises(ValueError, match="sum to 1"):
        B.delta_upper(16, prior=[0.5, 0.5 + 1e-8])  # float64: still 1e-9
    with pytest.raises(ValueError, match="sum to 1"):  # not a license for any float32 vector
        B.delta_upper(16, prior=np.full(10**5, 0.96e-5, dtype=np.float32))
    # torch tensors of any float dtype, bfloat16 included (numpy has none: it was refused as "not an array")
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        t = torch.tensor([0.25, 0.75], dtype=dtype)
        assert B.delta_upper(16, prior=t) == B.delta_upper(16, prior=t.double().numpy())
    # ... and a tensor's tolerance is that of its own dtype (it was widened to float64 first, so 1e-9: a float32
    # softmax over 10^6 classes, 1.5e-6 off, was refused as a tensor and accepted as the same numpy array)
    p = torch.softmax(torch.randn(10**6, generator=torch.Generator().manual_seed(0)), 0)
    assert abs(float(p.double().sum()) - 1.0) > 1e-7
    assert B.delta_upper(32, prior=p) == B.delta_upper(32, prior=p.numpy())
    b16 = torch.tensor([0.3, 0.3, 0.4], dtype=torch.bfloat16)  # sums to 1.0020 in bfloat16
    assert B.delta_upper(8, prior=b16) == B.delta_upper(8, prior=b16.double().numpy() / float(b16.double().sum()))
    with pytest.raises(ValueError, match="sum to 1"):
        B.delta_upper(16, prior=torch.tensor([0.3, 0.3, 0.3]))


def test_half_prior_tolerance_tracks_its_rounding():
    """The tolerance is the worst case of the vector's rounding: (2 + log2 C) eps of its dtype, plus the float32
    accumulation of the total that normalised it, min(8 sqrt(C), C + 2) eps32 (torch sums half types in float32).
    A bfloat16 prior 0.1 off its sum (0.3 + 0.3 + 0.5, a typo) was accepted and silently renormalised, and so were
    unnormalised half vectors over many classes (the accumulation term took the half dtype's eps, a tolerance of 6
    at 10^4 bfloat16 classes: an exploratory review, session 20). Softmax outputs in float16 / bfloat16 (entries
    rounded once, from float32) still pass for every C, as do ones normalised in the half type itself."""
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(ValueError, match="sum to 1"):
            B.delta_upper(8, prior=torch.tensor([0.3, 0.3, 0.5], dtype=dtype))
    for p in (torch.full((10**4,), 5e-4, dtype=torch.bfloat16), torch.full((10**4,), 1.7e-4, dtype=torch.float16),
              torch.full((10**6,), 1.3e-6, dtype=torch.bfloat16)):  # sums 5.0, 1.70, 1.30 (tolerance 0.17)
        with pytest.raises(ValueError, match="sum to 1"):
            B.delta_upper(8, prior=p)

    def tolerance(C, eps):
        return (2 + math.log2(C)) * eps + min(8 * C**0.5, C + 2) * torch.finfo(torch.float32).eps

    g = torch.Generator().manual_seed(5)
    for dtype in (torch.bfloat16, torch.float16):
        eps = torch.finfo(dtype).eps
        worst = 0.0
        for C in (2, 3, 4, 5, 8, 13, 64, 300, 5000, 10**5):
            for _ in range(20 if C < 10**5 else 3):
                logits = (3 if C < 100 else 1) * torch.randn(C, generator=g)
                once = torch.softmax(logits, 0).to(dtype)  # rounded once from float32
                counts = torch.randint(1, 50, (C,), generator=g).to(dtype)
                in_half = counts / counts.sum()  # normalised in the half type (its own sum rounded too)
                # (float16's counts overflow past 65504 in all: not a vector anyone passes)
                for p in (once, in_half) if C <= 300 else (once,):
                    if not bool((p > 0).all()):  # (an entry that underflowed float16: refused for that)
                        continue
                    worst = max(worst, abs(float(p.double().sum()) - 1.0) / tolerance(C, eps))
                    B.delta_upper(4, prior=p)  # accepted
        assert worst < 0.5, worst  # the softmax / counts vectors used at most half of their tolerance


def test_log_one_minus_collision_probability_at_k0_is_exactly_zero():
    # log(1 - tau_0) = log(sum_c pi_c) came out 6.9e-17 for a prior whose renormalised sum is 1 only to rounding
    for prior in ([0.9, 0.1], [0.7, 0.2, 0.1], np.full(7, 1 / 7)):
        assert B.collision_probability(0, prior=prior, log=True) == 0.0
        assert B.collision_probability(0, prior=prior) == 0.0
    assert np.all(B.collision_probability(np.array([0, 0]), prior=[0.9, 0.1], log=True) == 0.0)


def test_argument_errors_name_the_arguments():
    # shapes that do not broadcast gave numpy's own message (no argument named); a non-bool log was taken as truthy
    with pytest.raises(ValueError, match=r"contrastive_loss \(shape \(3,\)\) and K \(shape \(2,\)\)"):
        B.ash(np.array([1.0, 2.0, 3.0]), np.array([5, 20]), num_classes=10)
    with pytest.raises(ValueError, match="contrastive_loss .* and K .* must broadcast"):
        B.supervised_loss_interval([2.3, 2.4, 2.5], [1, 32], num_classes=10)
    lo, hi = B.supervised_loss_interval(np.full((2, 1), 2.3), [4, 32], num_classes=10)  # broadcasting still works
    assert lo.shape == hi.shape == (2, 2) and np.all(lo < hi)
    for fn in (B.collision_probability, B.coupon_collector_probability):
        with pytest.raises(TypeError, match="log must be a bool"):
            fn(5, num_classes=3, log="yes")
        assert fn(5, num_classes=3, log=np.bool_(True)) == fn(5, num_classes=3, log=True)


def test_scalar_and_array_outputs():
    assert isinstance(B.delta_upper(3, 10), float)
    assert isinstance(B.collision_term(np.int64(3), 10), float)
    assert B.delta_upper(np.array([[1, 2], [3, 4]]), 10).shape == (2, 2)
    assert B.coupon_collector_probability(np.array([[10, 11], [12, 13]]), 10).shape == (2, 2)
    assert B.collision_term(np.array([1.0, 2.0]), 10).shape == (2,)  # integer-valued floats are fine
    assert B.collision_term(np.array([], dtype=np.int64), 10).shape == (0,)


def test_temperature_form_is_the_score_bound():
    # temperature t stands for L2-normalised features scored at t: every score lies in [-1/t, 1/t], so b^2 = 1/t.
    # Each function against THEORY.md's formula written out in mpmath with b^2 = 1/t, and against norm_bound =
    # t^(-1/2) (equal up to the rounding of the square root, which the temperature form avoids).
    mpmath.mp.dps = 40
    for t in (0.01, 0.07, 0.5, 1.0, 3.0):
        s = 1 / mpmath.mpf(t)
        lc = 2 * mpmath.log(mpmath.cosh(s))
        for K, C in ((1, 2), (32, 10), (1000, 100)):
            du = mpmath.log(C) + lc - mpmath.log(K)
            dl = mpmath.log(C) + mpmath.log(K) - 2 * mpmath.log(1 + K) - lc
            assert scaled_err(B.delta_upper(K, C, temperature=t), float(du)) < 1e-14, (t, K, C)
            assert scaled_err(B.delta_lower(K, C, temperature=t), float(dl)) < 1e-14, (t, K, C)
            lo, hi = B.supervised_loss_interval(2.5, K, C, temperature=t)
            assert scaled_err([lo, hi], [float(2.5 + dl), float(2.5 + du)]) < 1e-14, (t, K, C)
            e = mpmath.exp(-2 * s)
            mcl = mpmath.fsum(mpmath.binomial(K, m) * mpmath.mpf(1) / C ** m * (1 - mpmath.mpf(1) / C) ** (K - m)
                              * mpmath.log(1 + m + (K - m) * e) for m in range(K + 1))
            assert scaled_err(B.min_contrastive_loss(K, C, temperature=t), float(mcl)) < 1e-12, (t, K, C)
            assert scaled_err(B.min_supervised_loss(C, temperature=t), float(mpmath.log(1 + (C - 1) * e))) < 1e-14
            b = t ** -0.5
            assert scaled_err(B.delta_upper(K, C, temperature=t), B.delta_upper(K, C, norm_bound=b)) < 1e-13
    # exact where the square is: t = 1/4 is b = 2 bit for bit, t = 1 the default
    assert B.delta_lower(7, prior=[0.3, 0.7], temperature=0.25, form="proved") == \
        B.delta_lower(7, prior=[0.3, 0.7], norm_bound=2.0, form="proved")
    assert B.delta_upper(7, 10, temperature=1.0) == B.delta_upper(7, 10)
    assert B.min_contrastive_loss([1, 5], 3, temperature=torch.tensor(0.25)).tolist() == \
        B.min_contrastive_loss([1, 5], 3, norm_bound=2).tolist()


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: B.delta_upper(3, 10, norm_bound=1.0, temperature=1.0), ValueError, "norm_bound or temperature"),
        (lambda: B.supervised_loss_interval(2.0, 3, 10, norm_bound=1.0, temperature=0.5), ValueError, "not both"),
        (lambda: B.delta_lower(3, 10, temperature=0.0), ValueError, "temperature must be a positive finite"),
        (lambda: B.delta_lower(3, 10, temperature=-0.1), ValueError, "temperature must be a positive finite"),
        (lambda: B.min_supervised_loss(3, temperature=float("nan")), ValueError, "temperature must be"),
        (lambda: B.min_contrastive_loss(3, 10, temperature=float("inf")), ValueError, "temperature must be"),
        (lambda: B.delta_upper(3, 10, temperature="0.1"), TypeError, "temperature must be a positive"),
        (lambda: B.delta_upper(3, 10, temperature=True), TypeError, "temperature"),
        (lambda: B.delta_upper(3, 10, temperature=torch.ones(2)), TypeError, "temperature"),
        # 1 / t past float64 (the score bound would be inf and Delta_U inf without a word)
        (lambda: B.delta_upper(3, 10, temperature=1e-320), ValueError, "1 / t must be a finite float64"),
        # 1 / DBL_MAX itself: its reciprocal rounds to inf (a review's find: let through, Delta_U inf)
        (lambda: B.delta_upper(3, 10, temperature=1.0 / 1.7976931348623157e308), ValueError, "must be above"),
    ],
)
def test_temperature_validation(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_largest_norm_bound_is_taken():
    # the largest b whose square is a finite float64: taken (Delta_U = 2 b^2 + ... rounds to inf, a value beyond
    # float64, as at the smallest temperature taken); the next float up is refused
    b = math.sqrt(sys.float_info.max)
    assert b * b <= sys.float_info.max
    assert B.min_supervised_loss(3, norm_bound=b) == 0.0  # log1p(2 e^{-2 b^2})
    assert B.delta_upper(3, 10, norm_bound=b) == math.inf == B.delta_upper(3, 10, temperature=1e-308)
    with pytest.raises(ValueError, match="norm_bound"):
        B.delta_upper(3, 10, norm_bound=math.nextafter(b, math.inf))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: B.delta_upper(-1, 10), ValueError, "K"),
        (lambda: B.delta_upper(0, 10), ValueError, "K"),
        (lambda: B.collision_term(-1, 10), ValueError, "K"),
        (lambda: B.collision_term(2.5, 10), ValueError, "K"),
        (lambda: B.collision_term(True, 10), TypeError, "K"),
        # a bool among a list's counts (numpy would read [True, 2] as [1, 2])
        (lambda: B.delta_upper([True, 2], 10), TypeError, "K must be .* got a bool among its values"),
        (lambda: B.coupon_collector_probability([[3, np.bool_(False)]], 10), TypeError, "draws .* a bool"),
        (lambda: B.collision_term("3", 10), TypeError, "K"),
        (lambda: B.coupon_collector_probability(-2, 10), ValueError, "draws"),
        (lambda: B.delta_upper(3), ValueError, "num_classes"),
        (lambda: B.delta_upper(3, 10, [0.5, 0.5]), ValueError, "exactly one"),
        (lambda: B.delta_upper(3, 0), ValueError, "num_classes"),
        (lambda: B.delta_upper(3, 2.0), TypeError, "num_classes"),
        (lambda: B.delta_upper(3, prior=[0.5, 0.6]), ValueError, "sum to 1"),
        (lambda: B.delta_upper(3, prior=[1.5, -0.5]), ValueError, "non-negative"),
        (lambda: B.delta_upper(3, prior=[1.0, 0.0]), ValueError, "prior"),
        (lambda: B.delta_upper(3, prior=[[0.5, 0.5]]), ValueError, "prior"),
        (lambda: B.delta_upper(3, prior=[0.5, float("nan")]), ValueError, "prior"),
        (lambda: B.delta_upper(3, 10, norm_bound=0.0), ValueError, "norm_bound"),
        (lambda: B.delta_upper(3, 10, norm_bound=-1.0), ValueError, "norm_bound"),
        (lambda: B.delta_upper(3, 10, norm_bound=float("inf")), ValueError, "norm_bound"),
        (lambda: B.delta_upper(3, 10, norm_bound="1"), TypeError, "norm_bound"),
        (lambda: B.delta_upper(3, 10, form="proved"), ValueError, "form"),
        (lambda: B.delta_lower(3, 10, form="best"), ValueError, "form"),
        (lambda: B.ash(1.0, 3, 10, harmonic="approx"), ValueError, "harmonic"),
        # with one class too, where no harmonic number is formed (a mutation audit: NaN without ash's own check)
        (lambda: B.ash(3.0, 5, 1, harmonic="bogus"), ValueError, "harmonic must be 'exact' or 'authors'"),
        (lambda: B.arora(1.0, 0, 10), ValueError, "K"),
        (lambda: B.arora("x", 3, 10), TypeError, "contrastive_loss"),
        (lambda: B.min_supervised_loss(0), ValueError, "num_classes"),
        # past int64 (past float64: a bare OverflowError from 1.0 / C)
        (lambda: B.delta_upper(5, num_classes=10**400), ValueError, r"num_classes is too large .* 1\.000e400"),
        (lambda: B.min_supervised_loss(2**63), ValueError, "num_classes is too large"),
        # text and complex numbers were converted by numpy (the imaginary part dropped with a warning)
        (lambda: B.supervised_loss_interval("2.0", 3, 10), TypeError, "contrastive_loss"),
        (lambda: B.arora("2.0", 30, 10), TypeError, "contrastive_loss"),
        (lambda: B.delta_upper(3, prior=["0.5", "0.5"]), TypeError, "prior"),
        (lambda: B.delta_upper(3, prior=np.array([0.5 + 1j, 0.5 - 1j])), TypeError, "prior"),
        (lambda: B.delta_upper(3, prior=[True, False]), TypeError, "prior"),
        (lambda: B.delta_upper(3, num_classes=torch.tensor(10.0)), TypeError, "num_classes"),
        (lambda: B.delta_upper(3, 10, norm_bound=torch.ones(2)), TypeError, "norm_bound"),
        # numbers beyond float64 / int64 and array-valued options: named, not a bare OverflowError or numpy's
        # "truth value of an array is ambiguous" (an audit's finds)
        (lambda: B.delta_upper(3, prior=[10**400, 1]), ValueError, "prior holds a number too large"),
        (lambda: B.arora(10**400, 30, 10), ValueError, "contrastive_loss holds a number too large"),
        (lambda: B.delta_upper(3, 10, norm_bound=10**400), ValueError, "norm_bound"),
        # b^2 past float64, as temperature below 1 / DBL_MAX is refused: Delta_U was inf, Delta_L -inf, without a
        # word (the largest b whose square is finite is taken: math.sqrt(DBL_MAX) squared rounds below DBL_MAX)
        (lambda: B.delta_upper(3, 10, norm_bound=1e160), ValueError, r"norm_bound\^2 must be a finite float64"),
        (lambda: B.delta_lower(3, 10, norm_bound=math.nextafter(math.sqrt(sys.float_info.max), math.inf)),
         ValueError, r"norm_bound must be at most 1\.3407807929942596e\+154"),
        (lambda: B.min_supervised_loss(3, norm_bound=1e155), ValueError, "norm_bound"),
        (lambda: B.delta_upper(2**70, 10), ValueError, "K is too large"),
        # a float K past 2^53 is not an exact count (float64 spacing 2 or more): refused, not rounded (a mutation
        # audit: with the limit at 2^63 a float K of 2^60 gave a Delta_U of -38.4)
        (lambda: B.delta_upper(2.0**60, 10), ValueError, r"K as a float must be at most 2\^53, .* got 1152921504606846976: pass it as an int"),
        (lambda: B.delta_upper(1e18, 10), ValueError, r"K as a float must be at most 2\^53, .* got 1000000000000000000: pass"),
        # an int below int64 is too small, not too large, and names its own value (a review's find: "K is too large
        # (above 2^63 - 1), got 5"; norm_bound -10**400 was quoted as inf)
        (lambda: B.delta_upper(-(10**30), 10), ValueError, r"K must be an integer >= 1, got -10{30}"),
        (lambda: B.delta_upper([5, -(10**30)], 10), ValueError, r"K must be an integer >= 1, got -10{30}"),
        (lambda: B.delta_upper([5, 10**30], 10), ValueError, r"K is too large \(above 2\^63 - 1\), got 10{30}"),
        (lambda: B.delta_upper(3, 10, norm_bound=-(10**400)), ValueError, "got a negative integer beyond"),
        (lambda: B.delta_upper(3, 10, form=np.array(["paper", "best"])), ValueError, "form must be one of"),
        # supervised_loss_interval names its own arguments (it said "form must be one of", an argument it does not
        # have: an exploratory review, session 20)
        (lambda: B.supervised_loss_interval(2.3, 32, 10, lower_form="Proved"), ValueError,
         r"^lower_form must be one of \('paper', 'proved'\), got 'Proved'"),
        (lambda: B.supervised_loss_interval(2.3, 32, 10, upper_form="proved"), ValueError,
         r"^upper_form must be one of \('best', 'paper'\), got 'proved'"),
        (lambda: B.ash(3.0, 20, 10, harmonic=np.array(["exact", "authors"])), ValueError, "harmonic must be"),
        # ragged lists: numpy's "inhomogeneous shape" named no argument (an audit's find)
        (lambda: B.delta_upper([1, [2, 3]], 10), TypeError, "K must be an integer or an integer array, got list"),
        (lambda: B.coupon_collector_probability([1, [2, 3]], 10), TypeError, "draws must be an integer"),
        # a generator or a set: numpy made a 0-d object array of it, refused as "got dtype object" (an audit's find)
        (lambda: B.delta_upper((k for k in (3, 5)), 10), TypeError, r"K must be .* got generator: pass list\(\.\.\.\)"),
        (lambda: B.collision_term({3, 5}, 10), TypeError, "K must be .* got set"),
        (lambda: B.coupon_collector_probability(iter([3]), 10), TypeError, "draws must be .* got list_iterator"),
    ],
)
def test_validation(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_tensor_arguments_are_read_as_numbers():
    # One-element tensors (as the empirical module returns them) work like the numbers they hold; a K or a loss that
    # requires grad is detached, and a bfloat16 loss widened (numpy has no bfloat16).
    want = B.supervised_loss_interval(2.0, 3, 10, norm_bound=1.0)
    assert B.supervised_loss_interval(torch.tensor(2.0, dtype=torch.bfloat16), torch.tensor(3.0, requires_grad=True),
                                      torch.tensor(10), norm_bound=torch.tensor(1.0)) == want
    assert B.delta_upper(3, num_classes=np.int64(10)) == B.delta_upper(3, 10)
    # exact and decimal numbers are real numbers too (object arrays of them)
    from decimal import Decimal

    assert B.supervised_loss_interval(Fraction(2), 3, 10) == want
    assert B.supervised_loss_interval(Decimal("2"), 3, 10) == want
    assert B.delta_upper(3, prior=[Fraction(1, 4), Fraction(3, 4)]) == B.delta_upper(3, prior=[0.25, 0.75])


def test_one_class_and_a_nearly_uniform_prior():
    # A mutation audit's survivors: with one class every negative collides (tau_K = 1 for K >= 1, tau_0 = 0; the
    # collision count m = K surely, so the collision term is E log(1 + m) = log(1 + K)); a prior within 0.1% of
    # uniform is not uniform (the earlier bounds that need one refuse it; Delta_U's best form uses its pi_min)
    np.testing.assert_array_equal(B.collision_probability([0, 1, 5], 1), [0.0, 1.0, 1.0])
    np.testing.assert_array_equal(B.collision_probability([0, 1, 5], prior=[1.0]), [0.0, 1.0, 1.0])
    for kw in (dict(num_classes=1), dict(prior=[1.0])):
        np.testing.assert_allclose(B.collision_term([0, 1, 5], **kw), np.log1p([0, 1, 5]), rtol=1e-15, atol=0)
    pi = [0.5002, 0.4998]
    with pytest.raises(ValueError):
        B.arora(3.0, 12, prior=pi)
    # uniform means equal to float64 rounding (1e-12 relative), not within 1e-6 (a mutation that passed): 2e-9 apart
    # is a non-uniform prior, and a uniform prior given as rounded floats is uniform
    with pytest.raises(ValueError, match="uniform"):
        B.arora(3.0, 4, prior=[0.5 + 1e-9, 0.5 - 1e-9])
    assert B.arora(3.0, 4, prior=[1 / 3] * 3) == B.arora(3.0, 4, 3)
    want = 2 * math.log(math.cosh(1.0)) - math.log(3) + min(math.log(0.5002 * 4), -math.log(0.4998))
    assert B.delta_upper(3, prior=pi) == pytest.approx(want, rel=1e-14)
    assert abs(want - (2 * math.log(math.cosh(1.0)) - math.log(3) + math.log(2))) > 1e-4  # (log C differs)


def test_counts_as_an_object_array_of_small_ints():
    # numpy object arrays of Python ints (what np.array of mixed big and small ints gives) were all refused as
    # "too large (above 2^63 - 1)", whatever their values
    np.testing.assert_array_equal(B.delta_upper(np.array([3, 5], dtype=object), 10), B.delta_upper([3, 5], 10))
    assert B.coupon_collector_probability(np.array([12], dtype=object), 10)[0] == \
        B.coupon_collector_probability(12, 10)
    with pytest.raises(ValueError, match="too large"):
        B.delta_upper(np.array([3, 2**64], dtype=object), 10)
    # the boundary itself: 2^63 is one past int64 (a mutation moving the check to > 2^63 raised a bare OverflowError)
    with pytest.raises(ValueError, match=r"too large \(above 2\^63 - 1\), got 9223372036854775808"):
        B.delta_upper(np.array([3, 2**63], dtype=object), 10)
    np.testing.assert_array_equal(B.collision_probability(np.array([2**63 - 1], dtype=object), 10),
                                  B.collision_probability([2**63 - 1], 10))
    with pytest.raises(ValueError, match=">= 1"):
        B.delta_upper(np.array([0, 2**64], dtype=object), 10)


@pytest.mark.parametrize("C,n", [(3029, 32796), (500, 4000), (50, 300)])
def test_coupon_uniform_near_certain_at_1e13(C, n):
    # log upsilon_n ~ -C e^{-n/C} (0.06 ... 0.17 here) against inclusion-exclusion in 80 digits (its terms decay as
    # (C e^{-n/C})^j / j!: 200 of them are exact to far below float64); a mutation audit: the inclusion-exclusion
    # route's threshold moved (log_x <= log 0.05) left 1.3e-12 at C = 3029, 8e-16 now
    with mpmath.workdps(80):
        s = mpmath.fsum((-1) ** j * mpmath.binomial(C, j) * (1 - mpmath.mpf(j) / C) ** n
                        for j in range(min(C, 200) + 1))
        want = float(mpmath.log(s))
    assert rel_err(B.coupon_collector_probability(n, C, log=True), want) < 1e-13


def test_coupon_general_prior_few_draws_exactly():
    # n = 3, 4 draws with a class of 1e-14: against exact rational inclusion-exclusion at 1e-13 (a mutation audit:
    # Stirling's series for n! used down to n = 2 passed the looser checks at n >= 5, 2.6e-10 off here)
    w = np.array([1e-14, 1.0 - 1e-14])
    pi = w / w.sum()
    exact_pi = [Fraction(float(x)) for x in pi]
    total = sum(exact_pi)
    exact_pi = [x / total for x in exact_pi]
    for n in (2, 3, 4):
        got = B.coupon_collector_probability(n, prior=pi, log=True)
        want = math.log(fraction_coupon(n, exact_pi))
        assert rel_err(got, want) < 1e-13, (n, got, want)


def test_coupon_general_prior_tiny_probability():
    # A skewed prior and few draws: upsilon ~ 1e-19 is the rounding noise of 1 - (1 - upsilon) in the inclusion-
    # exclusion sum (it returned 2^-53, 500x too big); such n must go to the Cauchy integral.
    for weights, ns in (([1e-10, 1e-10, 1.0, 1.0], (10, 30)), ([1.0, 1.0, 1.0, 1e-14], (5, 10))):
        w = np.array(weights)
        pi = w / w.sum()
        exact_pi = [Fraction(float(x)) for x in pi]
        total = sum(exact_pi)
        exact_pi = [x / total for x in exact_pi]  # the library renormalises the float prior the same way
        for n in ns:
            got = B.coupon_collector_probability(n, prior=pi)
            want = float(fraction_coupon(n, exact_pi))
            assert rel_err(got, want) < 1e-9, (weights, n, got, want)


@pytest.mark.parametrize("tiny", [1e-30, 1e-200, 1e-300])
def test_coupon_prior_with_a_vanishing_class(tiny):
    # Classes of 1e-200: the saddle-point Newton step's d mu / dx was 0/0 at x = pi_c r ~ 1e-199 (the numerator
    # cancels, both parts underflow): NaN. Exact values by inclusion-exclusion in 800-digit arithmetic.
    import warnings

    for weights in ([tiny, 1.0 - tiny], [tiny, 0.5, 0.5 - tiny], [tiny, 1e-100, 1.0 - 1e-100 - tiny]):
        for n in (3, 10, 100, 10**6):
            with mpmath.workdps(800):  # 1 - upsilon_n = sum over missed sets S of (-1)^(|S|+1) (1 - pi(S))^n
                pi = [mpmath.mpf(w) / mpmath.fsum(weights) for w in weights]  # the floats given, normalised
                miss = sum((-1) ** (m + 1) * (1 - sum(S)) ** n
                           for m in range(1, len(pi)) for S in combinations(pi, m))
                want = float(mpmath.log(1 - miss))
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no RuntimeWarning for the classes whose 1 - pi_c rounds to 0
                got = B.coupon_collector_probability(n, prior=np.array(weights), log=True)
            assert abs(got - want) <= 1e-9 * abs(want), (weights, n, got, want)


def test_coupon_log_accurate_near_n_equal_c():
    # log upsilon_{C+1} = log(C! S(C+1, C) / C^(C+1)) with S(C+1, C) = C (C+1) / 2, for large C: the Cauchy
    # integral's base term lost ~n eps absolute there (9.5e-8 at C = 1e5).
    for C in (10_000, 100_000):
        with mpmath.workdps(40):
            want = mpmath.loggamma(C + 1) + mpmath.log(mpmath.mpf(C) * (C + 1) / 2) - (C + 1) * mpmath.log(C)
        got = B.coupon_collector_probability(C + 1, C, log=True)
        assert abs(got - float(want)) < 1e-9, (C, got, float(want))


def test_input_checks_name_the_argument():
    with pytest.raises(ValueError, match="K is too large"):
        B.delta_upper(np.uint64(2**64 - 1), 10)  # was cast to int64 and reported as "got -1"
    torch = pytest.importorskip("torch")
    loss = torch.tensor(2.5, requires_grad=True) * 1.0  # a differentiable estimate
    assert B.arora(loss, 20, num_classes=10) == B.arora(2.5, 20, num_classes=10)
    lo, hi = B.supervised_loss_interval(loss, 20, num_classes=10)
    assert (lo, hi) == B.supervised_loss_interval(2.5, 20, num_classes=10)


def test_binomial_expectations_at_huge_k_take_the_normal_law(monkeypatch):
    # K = 2^62: the exact sum's window (~sqrt(K) points) needed 48 GiB. Past sd = 2^16 the normal law serves; its
    # error, the skewness term g''' K p q (q - p) / 6 ~ 1 / (3 (Kp)^2), is far below float64 there. Oracle: the
    # delta method, log(1 + mu) - sigma^2 / (2 (1 + mu)^2), whose next terms are O(1 / mu^2).
    for K in (2**40, 2**62):
        mu, var = K / 10, K * 0.1 * 0.9
        assert B.collision_term(K, num_classes=10) == pytest.approx(math.log1p(mu) - var / (2 * (1 + mu) ** 2), rel=1e-15)
        assert math.isfinite(B.min_contrastive_loss(K, num_classes=10))
    # Against the exact sum where both run: with the threshold lowered to sd = 40, K = 1e6..1e7, p = 0.1 (sd 300 ..
    # 950), 0.3, 0.002 (sd 45 .. 245) and 0.01 at K = 2e5 (sd 44.5): the normal law alone was 2e-12 .. 2e-14 off at
    # sd >= 300 (its skewness term g''' kappa3 / 6); with the Edgeworth terms to fourth order in the quadrature's
    # weights, float64 rounding (1.8e-15 at sd 45, 3e-14 at sd 31.5; the switch is at 64).
    ks = np.array([10**6, 3 * 10**6, 10**7])
    e = math.exp(-2.0)
    for g, p, tol in ((B._LOG1P, 0.1, 5e-15), (lambda m, kk: np.log1p(m + (kk - m) * e), 0.3, 5e-15),
                      (B._LOG1P, 0.002, 5e-15), (B._LOG1P, 0.01, 5e-15)):
        if p == 0.01:
            ks = np.array([2 * 10**5])
        exact = B._binom_expect(ks, p, g)
        monkeypatch.setattr(B, "_NORMAL_MIN_SD", 40.0)
        normal = B._binom_expect(ks, p, g)
        monkeypatch.undo()
        assert np.all(np.abs(normal - exact) <= tol * exact), np.abs(normal - exact) / exact


# ---- from a test audit: branches no test reached (each test fails under the mutation named in its comment) ----


def test_collision_probability_small_tau_relative_accuracy():
    # 1 - (1 - 1/C)^K for large C: the stable path (a sign or threshold slip there passed: 2e-5 relative error at
    # C = 1e12 computed directly).
    for C in (10**6, 10**8, 10**12):
        for K in (1, 3):
            with mpmath.workdps(50):
                ref = float(1 - (1 - mpmath.mpf(1) / C) ** K)
            assert abs(B.collision_probability(K, C) - ref) <= 1e-14 * ref, (C, K)


@pytest.mark.parametrize("n", [5400, 8000])
def test_coupon_bonferroni_branch_many_distinct_values(n):
    # 300 distinct prior values: inclusion-exclusion would need > 256 groups, so the Bonferroni branch serves
    # (log1p(+s) for log1p(-s) there passed; with one term, S1 alone, the error was S2 / S1 ~ s / 2: 1.8e-9 at
    # n = 8000, 5e-6 at 5400, where s = 9.8e-6). Against log(1 - S1 + S2) in mpmath, whose next term is below
    # S1^3 / 6: the bracket [log(1 - S1 + S2 - S1^3 / 6), log(1 - S1 + S2)] is 1.6e-11 wide at n = 5400.
    w = 1.0 + np.arange(300) / 1000.0
    pi = w / w.sum()
    with mpmath.workdps(50):
        pm = [mpmath.mpf(float(x)) for x in pi]
        s1 = mpmath.fsum((1 - q) ** n for q in pm)
        assert s1 < 1e-5
        s2 = mpmath.fsum((1 - pm[i] - pm[j]) ** n for i in range(300) for j in range(i + 1, 300))
        hi, lo = float(mpmath.log(1 - s1 + s2)), float(mpmath.log(1 - s1 + s2 - s1**3 / 6))
    got = B.coupon_collector_probability(n, prior=pi, log=True)
    assert lo - 1e-14 * abs(hi) <= got <= hi + 1e-14 * abs(hi), (got, lo, hi)


def test_interval_forms_are_passed_on():
    # [0.4, 0.3, 0.3]: log(pi_max C^2) = 1.28 > -log pi_min = 1.20, so the paper's and the best upper constant
    # differ (for [0.9, 0.1] they do not); hard-coding either form passed before.
    pi = np.array([0.4, 0.3, 0.3])
    assert B.delta_upper(3, prior=pi, form="paper") != B.delta_upper(3, prior=pi)
    for uf in ("best", "paper"):
        for lf in ("paper", "proved"):
            lo, hi = B.supervised_loss_interval(2.0, 3, prior=pi, upper_form=uf, lower_form=lf)
            assert lo == 2.0 + B.delta_lower(3, prior=pi, form=lf)
            assert hi == 2.0 + B.delta_upper(3, prior=pi, form=uf)


def test_half_precision_tensor_k():
    # K as a bfloat16 / float16 tensor: numpy has no bfloat16 ("Got unsupported ScalarType BFloat16" before)
    for dtype in (torch.bfloat16, torch.float16):
        assert B.delta_upper(torch.tensor([4.0, 64.0], dtype=dtype), 3).tolist() == B.delta_upper([4, 64], 3).tolist()


# ---- past 2^53: K, C and n beyond float64's integers ----


def mp_poisson_expect_log1p(lam, a=1.0, c=1.0):
    """E log(a + c m) for m ~ Poisson(lam), in mpmath (lam <= 2: 80 terms leave < 1e-60)."""
    with mpmath.workdps(40):
        lam = mpmath.mpf(lam)
        return float(sum(mpmath.exp(-lam) * lam**m / mpmath.factorial(m) * mpmath.log(a + c * m) for m in range(80)))


@pytest.mark.parametrize("e", [54, 58, 62])
def test_binomial_expectations_with_k_past_2_to_the_53(e):
    # K = C (and 3C/2, C/3) past 2^53: the walk below the mode started from K - mode formed in float64, which is K
    # for mode = 1, so its first step had weight 0 and P(m = 0) was dropped (collision term 0.907 for 0.573). Bin(K,
    # 1/C) is Poisson(K/C) to O(1/C) < 1e-16 here.
    C = 2**e
    for K, lam in ((C, 1.0), (3 * C // 2, 1.5), (C // 3, 1 / 3)):
        assert rel_err(B.collision_term(K, C), mp_poisson_expect_log1p(lam)) < 1e-14
    # min_contrastive_loss: E log(1 + m + (K - m) e^-2) = log(K e^-2) + E log(1 + ...) -> its leading term to eps
    assert rel_err(B.min_contrastive_loss(C, C), math.log1p(C * math.exp(-2.0))) < 1e-14


@pytest.mark.parametrize("e", [53, 55, 62])
def test_coupon_closed_forms_past_2_to_the_53_classes(e):
    # n = C + 1 and C + 2 with C past 2^53: n / C - 1 rounded to 0 (saddle point x = 0, NaN), and the trapezoid
    # rule's C theta of the classes' phases lost all its digits in float64 (S < 0: NaN); both are formed in integers
    # now. log upsilon_{C+1} = log(C! / C^C) + log(binom(C + 1, 2) / C), ..._{C+2}: binom(C + 2, 3) (3C + 1) / (4 C^2).
    C = 2**e
    with mpmath.workdps(60):
        Cm = mpmath.mpf(C)
        base = mpmath.loggamma(Cm + 1) - Cm * mpmath.log(Cm)
        ref = [float(base), float(base + mpmath.log((Cm + 1) / 2)),
               float(base + mpmath.log((Cm + 2) * (Cm + 1) * Cm / 6 * (3 * Cm + 1) / (4 * Cm**2)))]
    got = B.coupon_collector_probability([C, C + 1, C + 2], C, log=True)
    assert np.all(np.abs(np.asarray(got) - ref) <= 1e-14 * np.abs(ref)), (got, ref)


def test_coupon_saddle_point_series_against_the_trapezoid_rule(monkeypatch):
    # Past a variance of 1e8 the Cauchy integral is taken by its saddle-point (Edgeworth) series, two correction
    # terms, error O(1 / var^3); at C = 2^55, n = 2C the trapezoid rule needed 4e8 points in one block (killed for
    # memory). Where both run (var 1e4 .. 1e9) they agree to the trapezoid rule's accuracy: two independent
    # evaluations of one integral. C = 2^60 with n - C = 1e6: the trapezoid rule's phases there are those formed in
    # integers.
    def both(n, p):
        n = np.array(n, dtype=np.int64)
        monkeypatch.setattr(B, "_SADDLE_SERIES_MIN_VAR", math.inf)
        trapezoid = B._log_coupon_cauchy(n, p)
        monkeypatch.setattr(B, "_SADDLE_SERIES_MIN_VAR", 0.0)
        series = B._log_coupon_cauchy(n, p)
        monkeypatch.undo()
        return trapezoid, series

    cases = [(10**4, [3 * 10**4, 8 * 10**4]), (10**6, [10**6 + 10**5, 3 * 10**6, 8 * 10**6]),
             (10**10, [10**10 + 10**7, 2 * 10**10]),
             (2**60, [2**60 + 10**6, 2**60 + 10**8])]
    for C, ns in cases:
        trapezoid, series = both(ns, B._resolve_prior(C, None))
        assert np.all(np.isfinite(trapezoid))
        # the trapezoid rule's rounding, ~eps per class and point, times C classes: 9e-11 at C = 1e6, n = 3e6;
        # at C = 1e4 (var 2.5e4) the series' second term is 1e-9 (a wrong coefficient shows)
        assert np.all(np.abs(series - trapezoid) <= 1e-14 * (C + np.abs(trapezoid))), (C, series, trapezoid)
    # a non-uniform prior: 50 distinct values, and three dominant classes among 1000 small ones
    w = 1.0 + np.arange(50) / 10.0
    for weights, ns in ((w, [1000, 3000]), (np.r_[np.ones(1000), 1e3 * np.ones(3)], [20000, 100000])):
        p = B._resolve_prior(None, weights / weights.sum())
        trapezoid, series = both(ns, p)
        assert np.all(np.abs(series - trapezoid) <= 1e-14 * (p.num_classes + np.abs(trapezoid))), (series, trapezoid)
    # the whole curve at C = 2^55 (its series beyond n ~ C + 2^28): finite, increasing, log upsilon <= 0
    C = 2**55
    n = np.array([C + 1, C + 2**20, C + 2**30, 2 * C, 20 * C, 60 * C], dtype=np.int64)
    lv = B.coupon_collector_probability(n, C, log=True)
    assert np.all(np.isfinite(lv)) and np.all(np.diff(lv) > 0) and np.all(lv <= 0.0)


def test_coupon_bonferroni_with_more_than_2048_prior_groups():
    # Past 2048 distinct prior values S2 took millions of pairs per n and was left out (S1 alone: relative error
    # S2 / S1 ~ s / 2, 5e-6 here); its binomial series is O(G) per term. Reference: S1 - S2 with S2 over all pairs
    # (3.1M) in numpy (the next Bonferroni term <= s^3 / 6 is 2e-16 of log upsilon at s = 1e-5).
    rng = np.random.default_rng(0)
    w = np.unique(np.exp(rng.uniform(0.0, 1.0, 2500)))
    pi = w / w.sum()
    i, j = np.triu_indices(pi.size, 1)
    for target in (9e-6, 1e-7):  # the first n with s = sum (1 - pi)^n below target
        lo, hi = 1, 10**8
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if np.sum((1 - pi) ** mid) > target else (lo, mid)
        n = hi
        s1 = math.fsum((1 - pi) ** n)
        s2 = math.fsum(np.exp(n * np.log1p(-(pi[i] + pi[j]))))
        assert 1e-8 < s1 < 1e-5
        want = math.log1p(-(s1 - s2))
        got = B.coupon_collector_probability(n, prior=pi, log=True)
        assert abs(got - want) <= 1e-12 * abs(want), (n, got, want, s2 / s1)


@pytest.mark.parametrize("C,m", [(2**40, 25), (2**53 + 1, 34), (2**55, 36)])
def test_coupon_saddle_point_series_keeps_log_one_minus_exp_exact(C, m):
    # n = mC draws: x ~ m per class, 1 - e^{-x} rounds near 1 and log(-expm1(-x)) carried eps / 2 per class, C of
    # them in the series' base (the trapezoid rule cancelled it): -15.0 for -15.44 at C = 2^53 + 1 (upsilon 1.55x),
    # -8.0 for -8.36 at 2^55, 3.8e-6 relative at 2^40. Reference: inclusion-exclusion in mpmath, sum_j (-1)^j
    # binom(C, j) (1 - j/C)^n (terms ~ x^j / j!, x = C (1 - 1/C)^n <= 16: 150 terms leave < 1e-60).
    n = m * C
    with mpmath.workdps(60):
        Cm = mpmath.mpf(C)
        s, t = mpmath.mpf(0), mpmath.mpf(1)
        for j in range(150):
            s += t * (1 - j / Cm) ** n
            t *= -(Cm - j) / (j + 1)
        ref = float(mpmath.log(s))
    got = B.coupon_collector_probability(n, C, log=True)
    assert abs(got - ref) <= 1e-13 * abs(ref), (got, ref)


def test_many_distinct_prior_values():
    # 2e4 distinct values (a softmax): the trapezoid rule walked its groups one numpy call at a time (~1 ms each,
    # 100 s at 1e5 values), the binomial windows at K = 2^53 up to sd = 2^16 (a 1e6-value prior: 32 GiB asked for
    # a log table, or > 120 s); groups now go in chunks and the normal law with its skewness term serves from
    # sd = 1024. upsilon_{C+1} = (C + 1)! / 2 prod_c pi_c (one class drawn twice: (C + 1)! / 2 pi_c^2 prod_{c' != c}
    # pi_c' summed over c); the collision term
    # at K = 2^53 against the delta method log(1 + mu) - s^2 / (2 (1 + mu)^2) per class (next terms ~1 / mu^2).
    rng = np.random.default_rng(3)
    z = rng.standard_normal(20_000)
    pi = np.exp(z - z.max())
    pi /= pi.sum()
    assert np.unique(pi).size == pi.size
    C = pi.size
    ref = math.lgamma(C + 2) - math.log(2.0) + math.fsum(np.log(pi))
    got = B.coupon_collector_probability(C + 1, prior=pi, log=True)
    assert abs(got - ref) <= 1e-12 * abs(ref), (got, ref)
    K = 2**53
    mu, var = K * pi, K * pi * (1 - pi)
    want = math.fsum(pi * (np.log1p(mu) - var / (2 * (1 + mu) ** 2)))
    assert B.collision_term(K, prior=pi) == pytest.approx(want, rel=1e-14)
    # a float32 softmax over 1e6 classes (~935k distinct values) at K = 2^53 + 1: a 32 GiB log table before
    # (MemoryError), now under 2 s
    z = rng.standard_normal(10**6).astype(np.float32)
    e32 = np.exp(z - z.max())
    p32 = (e32 / e32.sum()).astype(np.float32)
    pi = p32.astype(np.float64) / math.fsum(p32.astype(np.float64))  # (the bounds renormalise it alike)
    K = 2**53 + 1
    mu, var = K * pi, K * pi * (1 - pi)
    want = math.fsum(pi * (np.log1p(mu) - var / (2 * (1 + mu) ** 2)))
    assert B.collision_term(K, prior=p32) == pytest.approx(want, rel=1e-13)


def test_harmonic_number_of_a_numpy_integer_is_a_python_float():
    for n in (np.int64(7), np.int64(10**6), np.uint32(0)):
        for form in ("exact", "authors"):
            v = B.harmonic_number(n, form)
            assert type(v) is float and v == B.harmonic_number(int(n), form)


@pytest.mark.parametrize("fn", ["supervised_loss_interval", "arora", "nozawa_sato", "ash"])
@pytest.mark.parametrize("bad", [-1.0, -1e-300, math.inf, -math.inf, np.array([0.5, -3.0]), torch.tensor(-0.25)])
def test_an_impossible_contrastive_loss_is_refused(fn, bad):
    # log(1 + sum_k e^{...}) is finite and >= 0: a negative or infinite value gave a number (an interval below 0,
    # Arora et al. -63.3 at R_cont = -1; a misuse audit). NaN, a missing estimate, still gives NaN; 0 is taken.
    with pytest.raises(ValueError, match="contrastive_loss must be finite and >= 0"):
        getattr(B, fn)(bad, 20, 10)
    assert np.all(np.isnan(getattr(B, fn)(math.nan, 20, 10)))
    assert np.all(np.isfinite(getattr(B, fn)(np.array([0.0, 2.0]), 20, 10)))
