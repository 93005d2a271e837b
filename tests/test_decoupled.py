"""decoupled=True (DCL, Yeh et al. 2022): info_nce and nt_xent with the positive out of the denominator, against
the formula written out here (materialised logits in float64), the library's reference, and the identity that ties
it to the ordinary loss: InfoNCE = softplus(DCL) per anchor, since log(e^pos + e^lse_neg) - pos =
softplus(lse_neg - pos)."""

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
from contrastbound import reference as R

from conftest import DTYPES, MODES, assert_close_scaled, loss_and_grads, make_inputs, tol


def _dcl_formula(a, p, n, idx, temperature, normalize, mask=None):
    """Per-anchor DCL in float64, written from the definition: log sum over anchor i's negatives of e^{s a.n} minus
    s a.p (in-batch: the negatives are the other anchors' positives; idx -1 and mask False leave one out)."""
    a, p = a.double(), p.double()
    if normalize:
        a, p = F.normalize(a, dim=1), F.normalize(p, dim=1)
    s = 1.0 / temperature
    B = a.shape[0]
    pos = s * (a * p).sum(1)
    out = []
    for i in range(B):
        if n is None:
            rows = torch.cat([p[:i], p[i + 1:]])
            keep = None if mask is None else torch.cat([mask[i, :i], mask[i, i + 1:]])
        else:
            bank = n.double()
            if normalize:
                bank = F.normalize(bank, dim=-1)
            if bank.dim() == 3:
                rows = bank[i]
            elif idx is not None:
                rows = bank[idx[i].clamp(min=0)]
            else:
                rows = bank
            keep = None if mask is None else mask[i]
            if idx is not None:
                keep = (idx[i] >= 0) if keep is None else keep & (idx[i] >= 0)
        logits = s * rows @ a[i]
        if keep is not None:
            logits = logits[keep]
        out.append(torch.logsumexp(logits, 0) - pos[i])
    return torch.stack(out)


def _nt_xent_dcl_formula(z1, z2, temperature, normalize):
    """DCL over 2N views (the paper's eq. 6, both views as anchors): view i's negatives are every view but itself
    and its pair, in one log-sum-exp."""
    z = torch.cat([z1, z2]).double()
    if normalize:
        z = F.normalize(z, dim=1)
    N = z1.shape[0]
    sim = z @ z.T / temperature
    out = []
    for i in range(2 * N):
        j = (i + N) % (2 * N)
        others = [k for k in range(2 * N) if k not in (i, j)]
        out.append(torch.logsumexp(sim[i, others], 0) - sim[i, j])
    return torch.stack(out)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [True, False])
def test_info_nce_matches_the_formula_and_the_reference(mode, normalize):
    # B = 7, K = 37: no tile multiple; an indexed anchor with padding (-1) among its entries
    a, p, n, idx = make_inputs(mode, B=7, K=37, d=5, dtype=torch.float64, seed=4)
    if idx is not None:
        idx[2, ::3] = -1
    kw = dict(temperature=0.3, normalize=normalize, reduction="none", decoupled=True)
    got = loss_and_grads(cb.info_nce, a, p, n, idx, **kw)
    want = loss_and_grads(R.info_nce_reference, a, p, n, idx, **kw)
    formula = _dcl_formula(a.detach(), p.detach(), None if n is None else n.detach(), idx, 0.3, normalize)
    assert_close_scaled(got[0], formula, 1e-12, "loss vs formula")
    assert_close_scaled(want[0], formula, 1e-12, "reference vs formula")
    for x, y in zip(got[1], want[1]):
        assert_close_scaled(x, y, 1e-11, "grad")
    # the loss can be below 0 (the positive outweighs the negatives' sum): not clamped
    strong = cb.info_nce(a, a * 3, n, 0.05, negative_indices=idx, normalize=False, decoupled=True, reduction="none")
    assert (strong < 0).any(), strong


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_info_nce_dtypes_against_float64(dtype, mode):
    a, p, n, idx = make_inputs(mode, B=9, K=41, d=13, dtype=dtype, seed=1)
    kw = dict(temperature=0.2, reduction="none", decoupled=True)
    got = loss_and_grads(cb.info_nce, a, p, n, idx, **kw)
    leaves = [None if x is None else x.detach().double().requires_grad_() for x in (a, p, n)]
    want = loss_and_grads(R.info_nce_reference, *leaves, idx, **kw)
    assert got[0].dtype == dtype
    assert_close_scaled(got[0], want[0], tol(dtype, "cpu"), f"{dtype} loss")
    for x, y in zip(got[1], want[1]):
        assert x.dtype == dtype
        assert_close_scaled(x, y, 2 * tol(dtype, "cpu"), f"{dtype} grad")


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_with_a_learnable_temperature(mode):
    a, p, n, idx = make_inputs(mode, B=4, K=6, d=3, dtype=torch.float64, seed=2)
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    leaves = [x for x in (a, p, n, t) if x is not None]

    def f(*xs):
        it = iter(xs)
        a_, p_ = next(it), next(it)
        n_ = next(it) if n is not None else None
        return cb.info_nce(a_, p_, n_, next(it), negative_indices=idx, decoupled=True, reduction="none")

    assert torch.autograd.gradcheck(f, leaves)


def test_info_nce_with_mask_and_labels():
    # a shared bank with a mask and labels; in-batch with a mask (entry (i, i) is the positive: never a negative)
    a, p, n, _ = make_inputs("shared", B=6, K=23, d=4, dtype=torch.float64, seed=7)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(6, 23, generator=g) > 0.3
    labels, bank_labels = torch.randint(0, 3, (6,), generator=g), torch.randint(0, 3, (23,), generator=g)
    kw = dict(temperature=0.5, reduction="none", decoupled=True)
    got = cb.info_nce(a, p, n, negative_mask=mask, labels=labels, negative_labels=bank_labels, **kw)
    keep = mask & (bank_labels[None, :] != labels[:, None])
    assert_close_scaled(got, _dcl_formula(a.detach(), p.detach(), n.detach(), None, 0.5, True, keep), 1e-12,
                        "shared")
    a, p, _, _ = make_inputs("in_batch", B=6, K=0, d=4, dtype=torch.float64, seed=8)
    mask = torch.rand(6, 6, generator=g) > 0.4
    mask[:, 0] = True  # anchors 1..5 keep a negative, anchor 0 (column 0 is its positive) keeps column 1
    mask[0, 1] = True
    mask[3, 3] = False  # (the diagonal is the positive: out of the sum either way, whatever the mask says)
    got = cb.info_nce(a, p, negative_mask=mask, **kw)
    assert_close_scaled(got, _dcl_formula(a.detach(), p.detach(), None, None, 0.5, True, mask), 1e-12, "in-batch")


def test_the_ordinary_loss_is_softplus_of_the_decoupled_one():
    # InfoNCE_i = log(e^pos + e^lse_neg) - pos = softplus(lse_neg - pos) = softplus(DCL_i), in every mode; the two
    # run the kernels with and without the positive in the sum
    for mode in MODES:
        a, p, n, idx = make_inputs(mode, B=11, K=29, d=7, dtype=torch.float64, seed=5)
        dcl = cb.info_nce(a, p, n, 0.1, negative_indices=idx, decoupled=True, reduction="none")
        ordinary = cb.info_nce(a, p, n, 0.1, negative_indices=idx, reduction="none")
        assert_close_scaled(ordinary, F.softplus(dcl), 1e-12, mode)


def test_an_anchor_without_negatives_has_loss_minus_inf():
    # (sizes that leave every anchor without negatives raise, below; a mask that empties one anchor's row is data,
    # read by no check: its log of an empty sum is -inf, as info_nce_lse's include_positive=False gives)
    a, p, n, _ = make_inputs("shared", B=3, K=5, d=4, dtype=torch.float64, seed=1)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    got = cb.info_nce(a, p, n, negative_mask=mask, decoupled=True, reduction="none")
    assert got[1] == -math.inf and torch.isfinite(got[[0, 2]]).all(), got


@pytest.mark.parametrize("call, match", [
    (lambda a, p, n: cb.info_nce(a, p, n[:0], decoupled=True), r"negatives of shape \(0, 4\) gives none"),
    (lambda a, p, n: cb.info_nce(a, p, n[None, :0].expand(3, 0, 4), decoupled=True),
     r"negatives of shape \(3, 0, 4\) gives none"),
    (lambda a, p, n: cb.info_nce(a, p, n, negative_indices=torch.zeros(3, 0, dtype=torch.long), decoupled=True),
     r"negative_indices of shape \(3, 0\) gives none"),
    (lambda a, p, n: cb.info_nce(a[:1], p[:1], decoupled=True), "in-batch with B = 1 anchor gives none"),
    (lambda a, p, n: cb.nt_xent(a[:1], p[:1], decoupled=True), r"a single pair of views \(N = 1"),
    (lambda a, p, n: cb.info_nce(a, p, n, decoupled="yes"), "decoupled must be a bool"),
    (lambda a, p, n: cb.nt_xent(a, p, decoupled=None), "decoupled must be a bool"),
    (lambda a, p, n: cb.NTXent(decoupled=1), "decoupled must be a bool"),
    (lambda a, p, n: cb.InfoNCE(0.1, decoupled=0.0), "decoupled must be a bool"),
])
def test_bad_arguments_are_named(call, match):
    a, p, n, _ = make_inputs("shared", B=3, K=5, d=4, dtype=torch.float32, seed=1)
    with pytest.raises((ValueError, TypeError), match=match):
        call(a, p, n)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("N", [2, 7])
def test_nt_xent_matches_the_formula_and_the_reference(normalize, N):
    g = torch.Generator().manual_seed(N)
    z1 = torch.randn(N, 6, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = (z1.detach() + 0.3 * torch.randn(N, 6, generator=g, dtype=torch.float64)).requires_grad_()
    got = cb.nt_xent(z1, z2, 0.3, normalize=normalize, decoupled=True, reduction="none")
    want = R.nt_xent_reference(z1, z2, 0.3, normalize=normalize, decoupled=True, reduction="none")
    formula = _nt_xent_dcl_formula(z1.detach(), z2.detach(), 0.3, normalize)
    assert_close_scaled(got, formula, 1e-12, "loss vs formula")
    assert_close_scaled(want, formula, 1e-12, "reference vs formula")
    up = torch.rand(2 * N, generator=g, dtype=torch.float64)
    for x, y in zip(torch.autograd.grad(got, (z1, z2), up), torch.autograd.grad(want, (z1, z2), up)):
        assert_close_scaled(x, y, 1e-11, "grad")
    # and the ordinary NT-Xent is its softplus, view by view
    ordinary = cb.nt_xent(z1, z2, 0.3, normalize=normalize, reduction="none")
    assert_close_scaled(ordinary, F.softplus(got), 1e-12, "softplus")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nt_xent_dtypes_and_module(dtype):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(33, 19, generator=g, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(33, 19, generator=g, dtype=torch.float64)
    x1, x2 = (z.to(dtype).requires_grad_() for z in (z1, z2))
    got = cb.nt_xent(x1, x2, 0.2, decoupled=True)
    y1, y2 = (z.to(dtype).double().requires_grad_() for z in (z1, z2))
    want = R.nt_xent_reference(y1, y2, 0.2, decoupled=True)
    assert got.dtype == dtype
    assert_close_scaled(got, want, tol(dtype, "cpu"), "loss")
    for x, y in zip(torch.autograd.grad(got, (x1, x2)), torch.autograd.grad(want, (y1, y2))):
        assert_close_scaled(x, y, 2 * tol(dtype, "cpu"), "grad")
    module = cb.NTXent(0.2, decoupled=True)
    assert module.decoupled is True
    assert torch.equal(module(x1, x2), got)


def test_nt_xent_gradcheck():
    g = torch.Generator().manual_seed(1)
    z1, z2 = (torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, v, w: cb.nt_xent(u, v, w, decoupled=True, reduction="none"),
                                    (z1, z2, t))


def test_the_readme_dclw_recipe_is_the_weighted_loss():
    # DCLW (the paper's weighted DCL): -w_i s z1_i.z2_i + log sum over view i's 2N - 2 negatives, w = 2 - N
    # softmax(cos / sigma) without gradient, both views as anchors; the README builds it from the per-view DCL
    g = torch.Generator().manual_seed(4)
    z1 = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = (z1.detach() + 0.4 * torch.randn(9, 5, generator=g, dtype=torch.float64)).requires_grad_()
    N, temperature, sigma = z1.shape[0], 0.1, 0.5
    cos = (F.normalize(z1, dim=1) * F.normalize(z2, dim=1)).sum(1)
    w = 2 - N * torch.softmax(cos.detach() / sigma, dim=0)
    dcl = cb.nt_xent(z1, z2, temperature, decoupled=True, reduction="none")
    recipe = (dcl + ((1 - w) * cos / temperature).repeat(2)).mean()
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    # the paper's weight written as it is: 2 - e^{cos_i / sigma} / mean_j e^{cos_j / sigma}, without gradient
    e = torch.exp(sim.detach().diagonal(N) * temperature / sigma)
    weight = 2 - e / e.mean()
    terms = []
    for i in range(2 * N):
        j = (i + N) % (2 * N)
        negatives = sim[i, [k for k in range(2 * N) if k not in (i, j)]]
        terms.append(-weight[i % N] * sim[i, j] + torch.logsumexp(negatives, 0))
    direct = torch.stack(terms).mean()
    assert_close_scaled(recipe, direct, 1e-12, "loss")
    for x, y in zip(torch.autograd.grad(recipe, (z1, z2)), torch.autograd.grad(direct, (z1, z2))):
        assert_close_scaled(x, y, 1e-11, "grad")
    assert not torch.allclose(w, torch.ones_like(w))  # (the weights are not all 1: the test sees them)


@pytest.mark.parametrize("mode", MODES)
def test_the_readme_additive_margin_recipe(mode):
    # AM-softmax InfoNCE: -log e^{s(a.p - m)} / (e^{s(a.p - m)} + sum_k e^{s a.n_k}) = softplus(DCL + s m), against
    # the materialised logits with the margin taken off the positive's
    a, p, n, idx = make_inputs(mode, B=6, K=11, d=4, dtype=torch.float64, seed=9)
    margin, temperature = 0.3, 0.05
    dcl = cb.info_nce(a, p, n, temperature, negative_indices=idx, decoupled=True, reduction="none")
    recipe = F.softplus(dcl + margin / temperature).mean()
    an, pn = F.normalize(a, dim=1), F.normalize(p, dim=1)
    pos = ((an * pn).sum(1) - margin) / temperature
    if n is None:
        neg = an @ pn.T / temperature
        neg = neg.masked_fill(torch.eye(6, dtype=torch.bool), -math.inf)
    else:
        nn_ = F.normalize(n, dim=-1)
        rows = nn_[idx] if idx is not None else (nn_ if nn_.dim() == 3 else nn_.expand(6, -1, -1))
        neg = torch.einsum("bd,bkd->bk", an, rows) / temperature
    direct = (torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos).mean()
    leaves = [x for x in (a, p, n) if x is not None]
    assert_close_scaled(recipe, direct, 1e-12, "loss")
    for x, y in zip(torch.autograd.grad(recipe, leaves), torch.autograd.grad(direct, leaves)):
        assert_close_scaled(x, y, 1e-11, "grad")


@pytest.mark.parametrize("mode", MODES)
def test_the_readme_multi_positive_recipe(mode):
    # MIL-NCE: -log sum_p e^{s a.p} / (sum_p e^{s a.p} + sum_k e^{s a.n_k}), P positives per anchor, from
    # info_nce_lse's negatives-only log-sum-exp; against the materialised logits (in-batch: the negatives are the
    # other anchors' first positives, the ones passed to info_nce_lse)
    B, P, temperature = 5, 3, 0.07
    a, p, n, idx = make_inputs(mode, B=B, K=13, d=4, dtype=torch.float64, seed=10)
    g = torch.Generator().manual_seed(11)
    multi = (p.detach()[:, None] + 0.3 * torch.randn(B, P, 4, generator=g, dtype=torch.float64)).requires_grad_()
    _, lse_neg = cb.info_nce_lse(a, multi[:, 0], n, temperature, negative_indices=idx, include_positive=False)
    pos = torch.einsum("bd,bpd->bp", F.normalize(a, dim=-1), F.normalize(multi, dim=-1)) / temperature
    recipe = F.softplus(lse_neg - torch.logsumexp(pos, dim=1)).mean()
    an = F.normalize(a, dim=1)
    if n is None:
        first = F.normalize(multi[:, 0], dim=1)
        neg = (an @ first.T / temperature).masked_fill(torch.eye(B, dtype=torch.bool), -math.inf)
    else:
        nn_ = F.normalize(n, dim=-1)
        rows = nn_[idx] if idx is not None else (nn_ if nn_.dim() == 3 else nn_.expand(B, -1, -1))
        neg = torch.einsum("bd,bkd->bk", an, rows) / temperature
    direct = (torch.logsumexp(torch.cat([pos, neg], 1), 1) - torch.logsumexp(pos, 1)).mean()
    leaves = [x for x in (a, multi, n) if x is not None]
    assert_close_scaled(recipe, direct, 1e-12, "loss")
    for x, y in zip(torch.autograd.grad(recipe, leaves, retain_graph=True), torch.autograd.grad(direct, leaves)):
        assert_close_scaled(x, y, 1e-11, "grad")


def test_no_anchors_give_the_ordinary_empty_result():
    # (the size checks refuse anchors without negatives; with no anchors at all the result is the ordinary loss's:
    # an empty mean, NaN, or an empty tensor; an audit's find: nt_xent's message said N = 1 for N = 0)
    z = torch.randn(0, 4)
    for call in (lambda **kw: cb.nt_xent(z, z, **kw), lambda **kw: cb.info_nce(z, z, **kw),
                 lambda **kw: cb.info_nce(z, z, torch.randn(0, 4), **kw),
                 lambda **kw: cb.info_nce(z, z, torch.randn(3, 4), **kw)):
        assert torch.isnan(call(decoupled=True)) and torch.isnan(call())
        assert call(decoupled=True, reduction="none").shape == call(reduction="none").shape


def test_info_nce_module_passes_it_and_a_module_pickled_before_it_still_loads():
    a, p, n, _ = make_inputs("shared", B=5, K=9, d=4, dtype=torch.float64, seed=3)
    module = cb.InfoNCE(0.2, decoupled=True)
    assert torch.equal(module(a, p, n), cb.info_nce(a, p, n, 0.2, decoupled=True))
    # the repr tells a DCL module from an ordinary one (an audit's find: they printed the same)
    assert repr(module).endswith("decoupled=True)") and repr(cb.InfoNCE(0.2)).endswith("decoupled=False)")
    assert repr(cb.NTXent(decoupled=True)).endswith("decoupled=True)")
    old = cb.InfoNCE(0.2)
    del old.__dict__["decoupled"]  # (as unpickled from a version without the option)
    assert torch.equal(old(a, p, n), cb.info_nce(a, p, n, 0.2))


def test_compiled_matches_eager():
    a, p, n, _ = make_inputs("shared", B=6, K=17, d=8, dtype=torch.float32, seed=2)
    z1, z2 = a.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()

    def step(a_, p_, n_, z1_, z2_):
        return cb.info_nce(a_, p_, n_, 0.2, decoupled=True) + cb.nt_xent(z1_, z2_, 0.3, decoupled=True)

    eager = step(a, p, n, z1, z2)
    grads = torch.autograd.grad(eager, (a, p, n, z1, z2))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(a, p, n, z1, z2)
    assert_close_scaled(compiled, eager, 1e-6, "loss")
    for x, y in zip(torch.autograd.grad(compiled, (a, p, n, z1, z2)), grads):
        assert_close_scaled(x, y, 1e-6, "grad")


if given is not None:
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(mode=st.sampled_from(MODES), B=st.integers(2, 9), K=st.integers(1, 70), d=st.integers(1, 9),
           temperature=st.floats(0.01, 2.0), seed=st.integers(0, 2**16))
    def test_property_softplus_identity_and_reference(mode, B, K, d, temperature, seed):
        # float32 kernels, any size and temperature down to 0.01: finite, the reference's values (float64) to
        # float32 accuracy relative to the logits' scale, and InfoNCE = softplus(DCL)
        a, p, n, idx = make_inputs(mode, B=B, K=K, d=d, dtype=torch.float32, seed=seed, requires_grad=False)
        dcl = cb.info_nce(a, p, n, temperature, negative_indices=idx, decoupled=True, reduction="none")
        assert torch.isfinite(dcl).all()
        ref = R.info_nce_reference(a.double(), p.double(), None if n is None else n.double(), temperature,
                                   negative_indices=idx, decoupled=True, reduction="none")
        assert_close_scaled(dcl, ref, 3e-5, "reference", floor=1.0 / temperature)
        ordinary = cb.info_nce(a, p, n, temperature, negative_indices=idx, reduction="none")
        assert_close_scaled(ordinary, F.softplus(dcl.double()), 3e-5, "softplus", floor=1.0 / temperature)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_cuda_equals_cpu(dtype, mode):
    a, p, n, idx = make_inputs(mode, B=37, K=1037, d=19, dtype=dtype, seed=6)
    kw = dict(temperature=0.1, reduction="none", decoupled=True)
    want = loss_and_grads(cb.info_nce, a, p, n, idx, **kw)
    moved = [None if x is None else x.detach().cuda().requires_grad_() for x in (a, p, n)]
    got = loss_and_grads(cb.info_nce, *moved, None if idx is None else idx.cuda(), **kw)
    assert_close_scaled(got[0], want[0], tol(dtype, "cuda"), "loss")
    for x, y in zip(got[1], want[1]):
        assert_close_scaled(x, y, 2 * tol(dtype, "cuda"), "grad")
    z1, z2 = (x.detach().cuda()[:33].requires_grad_() for x in (a, p))
    assert_close_scaled(cb.nt_xent(z1, z2, decoupled=True), cb.nt_xent(z1.cpu(), z2.cpu(), decoupled=True),
                        tol(dtype, "cuda"), "nt_xent")
