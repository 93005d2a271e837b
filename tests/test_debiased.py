"""debiased_info_nce (Chuang et al. 2020; Robinson et al. 2021) against the authors' formula materialised."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None

import contrastbound as cb
from contrastbound.reference import debiased_info_nce_reference

from conftest import DEVICES, MODES, assert_close_scaled, loss_and_grads, make_inputs, tol


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tau_plus,beta", [(0.0, 0.0), (0.1, 0.0), (0.1, 1.0), (0.3, 0.5)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_the_reference(mode, tau_plus, beta, normalize, reduction):
    # K = 37 and B = 7: no tile multiple; features of norm ~1 with normalize=False keep e^{(1+beta) l} moderate
    a, p, n, idx = make_inputs(mode, B=7, K=37, d=5, dtype=torch.float64, seed=3)
    if not normalize:
        with torch.no_grad():
            for x in (a, p, n):
                if x is not None:
                    x /= math.sqrt(5)
    kw = dict(temperature=0.4, tau_plus=tau_plus, beta=beta, normalize=normalize, reduction=reduction)
    got = loss_and_grads(cb.debiased_info_nce, a, p, n, idx, **kw)
    want = loss_and_grads(debiased_info_nce_reference, a, p, n, idx, **kw)
    assert_close_scaled(got[0], want[0], 1e-12, "loss")
    for x, y in zip(got[1], want[1]):
        assert_close_scaled(x, y, 1e-11, "grad")


def test_the_floor_binds_as_in_the_authors_code():
    # tau_plus large and positives that dominate: R - tau_plus K e^{l_0} <= 0 for some anchors, whose sum then takes
    # the floor K e^{-s} (constant: no gradient to the negatives through it), others stay above it
    g = torch.Generator().manual_seed(2)
    a = F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    p = (a + torch.tensor([0.01, 0.01, 0.01, 2.0, 2.0, 2.0], dtype=torch.float64)[:, None]
         * torch.randn(6, 4, generator=g, dtype=torch.float64)).requires_grad_()
    n = torch.randn(20, 4, generator=g, dtype=torch.float64).requires_grad_()
    a.requires_grad_()
    kw = dict(tau_plus=0.5, beta=0.5, reduction="none")
    got = loss_and_grads(cb.debiased_info_nce, a, p, n, None, temperature=0.5, **kw)
    want = loss_and_grads(debiased_info_nce_reference, a, p, n, None, temperature=0.5, **kw)
    # the floor's case occurs, and not for every anchor
    an, pn, nn_ = (F.normalize(x.detach(), dim=1) for x in (a, p, n))
    e_pos, e_neg = torch.exp((an * pn).sum(1) / 0.5), torch.exp(an @ nn_.T / 0.5)
    reweight = (e_neg ** 1.5).sum(1) / (e_neg ** 0.5).mean(1)
    floored = reweight - 0.5 * 20 * e_pos <= 0.5 * 20 * math.exp(-2.0)
    assert 0 < int(floored.sum()) < 6, floored
    assert_close_scaled(got[0], want[0], 1e-12, "loss")
    for x, y in zip(got[1], want[1]):
        assert_close_scaled(x, y, 1e-11, "grad")


def test_no_debiasing_is_info_nce():
    a, p, n, idx = make_inputs("shared", B=9, K=50, d=6, dtype=torch.float64)
    got = loss_and_grads(cb.debiased_info_nce, a, p, n, idx, temperature=0.2, tau_plus=0.0, beta=0.0)
    want = loss_and_grads(cb.info_nce, a, p, n, idx, temperature=0.2)
    assert_close_scaled(got[0], want[0], 1e-13, "loss")
    for x, y in zip(got[1], want[1]):
        assert_close_scaled(x, y, 1e-12, "grad")


def test_gradcheck_float64_with_a_learnable_temperature():
    a, p, n, idx = make_inputs("indexed", B=3, K=5, d=4, dtype=torch.float64, seed=1)
    t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def fn(a_, p_, n_, t_):
        return cb.debiased_info_nce(a_, p_, n_, t_, tau_plus=0.2, beta=0.7, negative_indices=idx, reduction="none")

    assert torch.autograd.gradcheck(fn, (a, p, n, t), eps=1e-6, atol=1e-7, rtol=1e-5)
    want = debiased_info_nce_reference(a, p, n, t, tau_plus=0.2, beta=0.7, negative_indices=idx)
    got = cb.debiased_info_nce(a, p, n, t, tau_plus=0.2, beta=0.7, negative_indices=idx)
    (gt,) = torch.autograd.grad(got, [t])
    (wt,) = torch.autograd.grad(want, [t])
    assert_close_scaled(gt, wt, 1e-11, "temperature grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_and_single_precision_against_float64(device, dtype):
    a, p, n, idx = make_inputs("shared", B=13, K=301, d=16, dtype=dtype, device=device, seed=4)
    got = loss_and_grads(cb.debiased_info_nce, a, p, n, idx, temperature=0.1, tau_plus=0.1, beta=1.0)
    d64 = [x.detach().double().cpu().requires_grad_() for x in (a, p, n)]
    want = loss_and_grads(debiased_info_nce_reference, *d64, None, temperature=0.1, tau_plus=0.1, beta=1.0)
    assert got[0].dtype == dtype
    tol_ = tol(dtype, device) * (5 if dtype != torch.float32 else 1)
    assert_close_scaled(got[0], want[0], tol_, "loss", floor=1.0)
    for x, y in zip(got[1], want[1]):
        assert_close_scaled(x, y, tol_, "grad", floor=1.0)


@pytest.mark.parametrize("tau_plus,beta", [(0.0, 0.5), (0.1, 0.0)])
def test_in_batch_float16_gradient_where_each_term_alone_overflows(tau_plus, beta):
    # Anchors of norm ~1e-3 at temperature 0.01: the log-sum-exps' gradient and the positive logit's are each past
    # float16's 65504, their sum (-1.1e4 here) is not. In float16 each on its own overflowed (a NaN gradient, a
    # fuzz's find); on the CPU both now meet in float32, as info_nce's single kernel forms them.
    g = torch.Generator().manual_seed(4)
    a = (torch.randn(3, 2, generator=g) * 1e-3).half().requires_grad_()
    p = torch.randn(3, 2, generator=g).half().requires_grad_()
    loss = cb.debiased_info_nce(a, p, None, 0.01, tau_plus=tau_plus, beta=beta, reduction="sum")
    ga, gp = torch.autograd.grad(loss, [a, p])
    assert loss.dtype == ga.dtype == torch.float16
    a64, p64 = (x.detach().double().requires_grad_() for x in (a, p))
    want = debiased_info_nce_reference(a64, p64, None, 0.01, tau_plus=tau_plus, beta=beta, reduction="sum")
    wa, wp = torch.autograd.grad(want, [a64, p64])
    assert 1e4 < wa.abs().max() < 65504  # (the premise: a large gradient that float16 holds)
    assert_close_scaled(ga, wa, 2e-3, "anchors' gradient")
    assert_close_scaled(gp, wp, 2e-3, "positives' gradient")
    assert_close_scaled(loss, want, 2e-3, "loss")


def test_low_temperature_and_large_k_stay_finite():
    # temperature 0.01 with beta = 1: the reweighted sum e^{(1+beta) l} reaches e^200, past float32 (the authors'
    # form overflows there: inf / inf); in log space it is finite and matches float64's form
    a, p, n, _ = make_inputs("shared", B=8, K=5000, d=8, dtype=torch.float32, seed=5)
    loss = cb.debiased_info_nce(a, p, n, 0.01, tau_plus=0.05, beta=1.0, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and all(torch.isfinite(x.grad).all() for x in (a, p, n))
    assert not torch.isfinite(debiased_info_nce_reference(a.detach(), p.detach(), n.detach(), 0.01, tau_plus=0.05,
                                                          beta=1.0, compute_dtype=torch.float32)).all()
    want = debiased_info_nce_reference(*(x.detach().double() for x in (a, p, n)), 0.01, tau_plus=0.05, beta=1.0,
                                       reduction="none")
    assert_close_scaled(loss, want, 1e-4, "loss", floor=100.0)  # (logits ~100: float32's rounding of them)


@pytest.mark.parametrize("tau_plus", [0.0, 0.1])
@pytest.mark.parametrize("normalize", [False, True])
def test_a_dominant_positive_gives_loss_zero_and_finite_gradients(tau_plus, normalize):
    # l_0 - log R > 88: tau_plus K e^{l_0 - log R} overflowed float32, a NaN loss for tau_plus = 0 (0 * inf) and NaN
    # gradients otherwise (the unused branch's inf through exp); float64 gives loss ~0 and finite gradients
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 512, generator=g)
    p = a + 0.3 * torch.randn(8, 512, generator=g)
    n = torch.randn(1024, 512, generator=g)
    t = 1.0 if not normalize else 0.01
    if normalize:
        n = -a[:1] + 0.1 * torch.randn(1024, 512, generator=g)
    leaves = [x.clone().requires_grad_() for x in (a, p, n)]
    loss = cb.debiased_info_nce(*leaves, t, tau_plus=tau_plus, beta=0.5, normalize=normalize, reduction="none")
    loss.sum().backward()
    want = debiased_info_nce_reference(*(x.double() for x in (a, p, n)), t, tau_plus=tau_plus, beta=0.5,
                                       normalize=normalize, reduction="none")
    assert torch.isfinite(loss).all() and all(torch.isfinite(x.grad).all() for x in leaves)
    assert (want < 1e-30).all() and (loss < 1e-30).all(), (loss, want)


def test_compiled_with_a_temperature_schedule_and_changing_sizes():
    # math.log(K) and Python arithmetic on the float temperature made dynamo specialise: a graph per temperature
    # and per (B, K), FailOnRecompileLimitHit under fullgraph=True after 8 values (info_nce settles at 2)
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(lambda a, p, n, t: cb.debiased_info_nce(a, p, n, t, tau_plus=0.1, beta=0.5), backend=counter,
                      fullgraph=True)
    g = torch.Generator().manual_seed(1)
    try:
        for i in range(10):
            a, p = torch.randn(4 + i, 8, generator=g), torch.randn(4 + i, 8, generator=g)
            n = torch.randn(16 + 3 * i, 8, generator=g)
            got, want = f(a, p, n, 0.1 + 0.01 * i), cb.debiased_info_nce(a, p, n, 0.1 + 0.01 * i, tau_plus=0.1,
                                                                           beta=0.5)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert counter.frame_count <= 2, counter.frame_count
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("schedule", ["tau_plus", "beta"])
def test_compiled_with_a_tau_plus_or_beta_schedule(schedule):
    # math.log(tau_plus) made dynamo specialise on tau_plus: a graph per value, FailOnRecompileLimitHit under
    # fullgraph=True after 8 (a compile audit); beta already settled at 2
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def loss(a, p, n, x):
        kw = {"tau_plus": x, "beta": 0.5} if schedule == "tau_plus" else {"tau_plus": 0.1, "beta": x}
        return cb.debiased_info_nce(a, p, n, 0.2, **kw)

    f = torch.compile(loss, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(2)
    a, p, n = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(11, 8, generator=g)
    try:
        for i in range(10):
            x = 0.01 + 0.05 * i
            torch.testing.assert_close(f(a, p, n, x), loss(a, p, n, x), rtol=1e-6, atol=1e-7)
        assert counter.frame_count <= 2, counter.frame_count
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["shared", "per_anchor", "indexed", "mask"])
def test_an_empty_bank_gets_an_empty_gradient_as_in_info_nce(mode):
    # (an audit's find) K = 0 with a bank that requires grad: info_nce gives the bank a gradient of its own (empty)
    # shape; debiased_info_nce left it None, so code reading bank.grad after backward (an optimizer step, a
    # norm) failed on the first step of a filling queue. Both now give the same zero gradients.
    kind = "shared" if mode == "mask" else mode
    a, p, n, idx = make_inputs(kind, B=4, K=0, d=3, dtype=torch.float64, M=5)
    if mode == "indexed":
        idx = torch.empty(4, 0, dtype=torch.long)
    mask = torch.zeros(4, 0, dtype=torch.bool) if mode == "mask" else None
    for beta in (0.0, 1.0):
        got = torch.autograd.grad(cb.debiased_info_nce(a, p, n, negative_indices=idx, negative_mask=mask,
                                                       beta=beta), [a, p, n], allow_unused=True)
        want = torch.autograd.grad(cb.info_nce(a, p, n, negative_indices=idx, negative_mask=mask), [a, p, n],
                                   allow_unused=True)
        for g, w, x in zip(got, want, (a, p, n)):
            assert g is not None and w is not None, mode
            assert g.shape == x.shape and torch.equal(g, w), mode


def test_no_negatives_give_zero():
    a, p, n, _ = make_inputs("shared", B=4, K=0, d=3, dtype=torch.float64)
    loss = cb.debiased_info_nce(a, p, n, tau_plus=0.1, beta=1.0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(a.grad, torch.zeros_like(a))
    # the reference agrees (its mean importance over no negatives gave NaN: an audit), gradient 0 as well
    ref = debiased_info_nce_reference(a, p, n, tau_plus=0.1, beta=1.0)
    assert float(ref.detach()) == 0.0
    assert torch.equal(torch.autograd.grad(ref, a)[0], torch.zeros_like(a))
    assert float(cb.debiased_info_nce(a[:1], p[:1], None).detach()) == 0.0  # in-batch with one pair
    # no pairs at all: as info_nce (the mean of nothing), not a "math domain error" from log(K = -1)
    for reduction in ("mean", "sum", "none"):
        got = cb.debiased_info_nce(a[:0], p[:0], None, reduction=reduction)
        want = cb.info_nce(a[:0], p[:0], None, reduction=reduction)
        torch.testing.assert_close(got, want, equal_nan=True)
        # and the reference (its in-batch reshape to (0, -1) raised torch's "ambiguous" error: an audit)
        ref = debiased_info_nce_reference(a[:0], p[:0], None, reduction=reduction)
        torch.testing.assert_close(ref, want, equal_nan=True)


@pytest.mark.parametrize("kw,err,match", [
    (dict(tau_plus=1.0), ValueError, r"tau_plus must be in \[0, 1\)"),
    (dict(tau_plus=-0.1), ValueError, "tau_plus"),
    (dict(tau_plus=True), TypeError, "tau_plus must be a number"),
    (dict(tau_plus=torch.tensor(0.1)), TypeError, "tau_plus must be a number"),
    (dict(beta=-1.0), ValueError, "beta must be a non-negative finite number"),
    (dict(beta=math.inf), ValueError, "beta"),
    (dict(beta="1"), TypeError, "beta must be a non-negative number"),
    (dict(beta=1e-310, temperature=0.1), ValueError, "temperature / 1e-310"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(temperature=0.0), ValueError, "temperature"),
])
def test_bad_arguments_are_named(kw, err, match):
    a, p, n, _ = make_inputs("shared", B=3, K=4, d=2)
    with pytest.raises(err, match=match):
        cb.debiased_info_nce(a, p, n, **kw)


def test_bad_shapes_are_named_as_info_nce_names_them():
    a, p, n, _ = make_inputs("shared", B=3, K=4, d=2)
    with pytest.raises(ValueError, match="negatives must have feature size d = 2"):
        cb.debiased_info_nce(a, p, torch.randn(4, 3))
    with pytest.raises(ValueError, match="negative_indices must have shape"):
        cb.debiased_info_nce(a, p, n, negative_indices=torch.zeros(3, dtype=torch.long))


if given is not None:

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(seed=st.integers(0, 2**31 - 1), tau_plus=st.floats(1e-3, 0.5), t=st.floats(0.1, 1.0))
    def test_debiasing_lowers_the_loss_exactly_where_the_positive_beats_the_mean_negative(seed, tau_plus, t):
        # With beta = 0 and the floor not binding, Ng <= sum_k e^{l_k} iff tau_plus (mean_k e^{l_k} - e^{l_0}) <= 0:
        # the debiased loss is below info_nce's exactly for anchors whose positive beats the negatives' mean
        # (Chuang et al.'s correction removes the expected same-class share). A property the formula's sign,
        # the K factor and the 1 - tau_plus normalisation all enter.
        a, p, n, _ = make_inputs("shared", B=6, K=9, d=3, dtype=torch.float64, seed=seed, requires_grad=False)
        deb = cb.debiased_info_nce(a, p, n, t, tau_plus=tau_plus, reduction="none")
        plain = cb.info_nce(a, p, n, t, reduction="none")
        an, pn, nn_ = (F.normalize(x, dim=1) for x in (a, p, n))
        e_pos, e_neg = torch.exp((an * pn).sum(1) / t), torch.exp(an @ nn_.T / t)
        ng = (e_neg.sum(1) - tau_plus * 9 * e_pos) / (1 - tau_plus)
        floor = 9 * math.exp(-1 / t)
        for i in range(6):
            if ng[i] <= floor * (1 + 1e-9):
                continue
            gap = float(e_neg[i].mean() - e_pos[i])
            if abs(gap) < 1e-6 * float(e_pos[i]):  # (a change below the losses' rounding)
                continue
            assert (float(deb[i]) < float(plain[i])) == (gap < 0), (i, gap, float(deb[i]), float(plain[i]))


@pytest.mark.parametrize("tau_plus,beta", [(0.1, 0.0), (0.1, 1.0), (0.0, 0.0)])
def test_simclr_views_with_a_mask_are_the_authors_2n_minus_2(tau_plus, beta):
    # The authors' SimCLR code (DCL; HCL with beta): each of the 2N views against the other 2N - 2, written out here
    # as their loop does it. With anchors [z1; z2], positives [z2; z1] and the in-batch mask that leaves out each
    # anchor's own row among the positives (column i + N mod 2N), the loss is theirs (README's recipe).
    g = torch.Generator().manual_seed(21)
    N, d, t = 5, 4, 0.5
    z1 = torch.randn(N, d, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(N, d, generator=g, dtype=torch.float64, requires_grad=True)
    mask = ~torch.eye(2 * N, dtype=torch.bool).roll(N, dims=1)
    got = cb.debiased_info_nce(torch.cat([z1, z2]), torch.cat([z2, z1]), None, t, tau_plus=tau_plus, beta=beta,
                               negative_mask=mask)
    out = F.normalize(torch.cat([z1, z2]), dim=1)
    neg = torch.exp(out @ out.t() / t)
    keep = ~(torch.eye(2 * N, dtype=torch.bool) | torch.eye(2 * N, dtype=torch.bool).roll(N, dims=1))
    neg = neg.masked_select(keep).view(2 * N, -1)
    pos = torch.exp((out[:N] * out[N:]).sum(-1) / t)
    pos = torch.cat([pos, pos])
    K = 2 * N - 2
    imp = (beta * neg.log()).exp()
    reweight = (imp * neg).sum(-1) / imp.mean(-1)
    ng = ((-tau_plus * K * pos + reweight) / (1 - tau_plus)).clamp(min=K * math.exp(-1 / t))
    want = (-torch.log(pos / (pos + ng))).mean()
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    gz = torch.autograd.grad(got, (z1, z2))
    wz = torch.autograd.grad(want, (z1, z2))
    assert all(torch.allclose(x, y, rtol=1e-10, atol=1e-13) for x, y in zip(gz, wz))
    # without the mask each anchor also sees itself among the positives: another loss
    plain = cb.debiased_info_nce(torch.cat([z1, z2]), torch.cat([z2, z1]), None, t, tau_plus=tau_plus, beta=beta)
    assert (plain - want).abs() > 1e-3
