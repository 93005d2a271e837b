"""contrastbound.reference against independent computations (F.cross_entropy over materialised logits, a
float64 form, hand-written formulas), never against the kernels: the paths of the oracle and fallback that no kernel
comparison reaches (compute_dtype, half inputs of the clip / SupCon / bank references, the fallback's guard where
every negative logit is -inf). From a mutation audit of reference.py (2026-12-06): each test kills a mutant that the
rest of the suite let through."""


import pytest
import torch
import torch.nn.functional as F

from contrastbound.reference import (bank_cross_entropy_reference, clip_reference, debiased_info_nce_reference,
                                     info_nce_reference, supcon_reference)


def _gen(seed=0):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)


def _assert_correctly_rounded(got, want, dtype):
    """got (dtype) is want (float32 / float64) rounded to dtype: within half a unit in the last place (plus float32's
    own rounding), which a computation in the half dtype itself misses by a few units."""
    bits = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    g, w = got.double(), want.double()
    ulp = torch.exp2(torch.floor(torch.log2(g.abs())) - bits)
    err = (g - w).abs()
    assert torch.all(err <= 0.5 * ulp + 1e-5 * w.abs()), (err / ulp).max()


def test_reference_honours_compute_dtype_wider_than_the_inputs():
    # compute_dtype=float64 on float32 inputs: e^{l / t} of debiased InfoNCE (l / t up to 100 here) overflows float32
    # (the authors' form: inf / inf) but not float64; the result is the float64 loss rounded to float32.
    r = _gen(1)
    a, p, n = (F.normalize(r(4, 8), dim=-1).float() for _ in range(3))
    a = p.clone()  # positives aligned: l_0 / t = 100
    got = debiased_info_nce_reference(a, p, n, 0.01, tau_plus=0.05, beta=1.0, reduction="none",
                                      compute_dtype=torch.float64)
    want = debiased_info_nce_reference(a.double(), p.double(), n.double(), 0.01, tau_plus=0.05, beta=1.0,
                                       reduction="none")
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-30)


def test_info_nce_reference_compute_dtype_float64_matches_float64_exactly():
    # float32 inputs computed in float64 then rounded: bit-equal to the float64 loss rounded (every row; a float32
    # computation differs from it in the last bits of some rows)
    r = _gen(2)
    a, p, n = r(64, 16).float(), r(64, 16).float(), r(40, 16).float()
    got = info_nce_reference(a, p, n, 0.07, reduction="none", compute_dtype=torch.float64)
    want = info_nce_reference(a.double(), p.double(), n.double(), 0.07, reduction="none").float()
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_clip_reference_accumulates_half_inputs_in_float32(dtype):
    # the module's contract: half inputs computed in float32. Independent oracle: F.cross_entropy of the float32
    # logits of the (rounded) half features, both directions, rounded once to the inputs' dtype.
    r = _gen(3)
    img, txt = r(32, 16).to(dtype), r(32, 16).to(dtype)
    got = clip_reference(img, txt, 100.0, reduction="none")
    i, t = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    logits = 100.0 * (i @ t.T)
    target = torch.arange(32)
    want = 0.5 * (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none"))
    assert got.dtype == dtype
    _assert_correctly_rounded(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_supcon_reference_accumulates_half_inputs_in_float32(dtype):
    # SupCon L_out by hand in float32 from the rounded half features (self left out of the denominator, the mean
    # over each anchor's positives), rounded once to the inputs' dtype
    r = _gen(4)
    z = r(24, 16).to(dtype)
    y = torch.arange(24) % 4
    t = 0.05
    got = supcon_reference(z, y, t, reduction="none")
    f = F.normalize(z.float(), dim=-1)
    logits = f @ f.T / t
    own = torch.eye(24, dtype=torch.bool)
    log_prob = logits - torch.logsumexp(logits.masked_fill(own, float("-inf")), dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~own
    want = -(log_prob * pos).sum(1) / pos.sum(1)
    assert got.dtype == dtype
    _assert_correctly_rounded(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bank_cross_entropy_reference_returns_the_inputs_dtype(dtype):
    # as info_nce_reference / nt_xent_reference (tests/test_info_nce.py::test_references_return_the_inputs_dtype,
    # which leaves bank_cross_entropy_reference out); and the value is F.cross_entropy of the float32 logits
    r = _gen(5)
    a, w = r(6, 8).to(dtype), r(10, 8).to(dtype)
    tg = torch.tensor([0, 3, 9, 2, 2, 5])
    got = bank_cross_entropy_reference(a, w, tg, 0.5, reduction="none")
    assert got.dtype == dtype
    want = F.cross_entropy(a.float() @ w.float().T / 0.5, tg, reduction="none").to(dtype)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def test_fallback_gradient_where_every_negative_logit_overflows_to_minus_inf():
    # float32 logits a.n = -1e40 -> -inf for every negative: loss softplus(-inf) = 0 and a zero gradient, on the
    # reference path (torch.func.grad) as on the kernels' (the log-sum-exp of -inf alone gave NaN gradients)
    import contrastbound as cb
    a = torch.tensor([[1e20, 0.0]])
    p = torch.tensor([[1e-20, 0.0]])
    n = torch.tensor([[-1e20, 0.0], [-2e20, 0.0]])

    def loss(a_, p_, n_):
        return cb.info_nce(a_, p_, n_, 1.0, normalize=False, reduction="sum")

    assert loss(a, p, n).item() == 0.0
    for g in torch.func.grad(loss, argnums=(0, 1, 2))(a, p, n):
        assert torch.equal(g, torch.zeros_like(g)), g
