"""Weights below float32's smallest normal number count as 0 in the CPU kernels; normal ones, however small, are kept
(csrc/cpu/tile_exp.h, exp_normal in csrc/core/online_lse.h).

A weight e^{l - lse} (a sigmoid in SigLIP) is subnormal where a logit lies ~87 below its row's log-sum-exp: unit
features at temperatures below ~0.02, or large unnormalised ones. ATen's vectorised exp forms such values ~100x slower
than normal ones and a matrix product with them in it ran ~200x slower (clustered features at T = 0.01: a training
step up to 50x slower, `benchmarks/bench_logit_spread.py` measures it), so the kernels set them to 0, as the CUDA
tensor-core kernels' flush-to-zero exponential does. Each problem here is built (unnormalised, temperature 1) so that
one logit lies `gap` below the others: at gap 80 its weight e^-80 ~ 1.8e-35 is normal and every gradient entry it
makes must match the float64 reference; at gap 88 (e^-88 ~ 6e-39, subnormal, as is sigmoid(-88)) the entries made of
it alone are exactly 0, where the reference has ~1e-37 or less, and every other entry still matches. (Before the
kernels flushed them, every gap-88 case gave those entries nonzero.)"""

from __future__ import annotations

import pytest
import torch

import contrastbound as cb
from contrastbound import reference as R

TINY = torch.finfo(torch.float32).tiny


def _problems(gap: float):
    """(name, kernel loss, reference loss, inputs): one logit -gap, the others 0, so that every row with it also has
    a negative at 0 (the positive's weight ~1/2: its gradient w - 1 is no difference of nearly equal numbers, which
    the float64 reference would round to 0 where the kernels' expm1 form keeps it)."""
    a, p = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    bank = torch.tensor([[-gap, 0.0], [0.0, 3.0], [0.0, 2.0]])  # logits -gap, 0, 0 against the anchor
    idx = torch.tensor([[0, 1, 2]])
    img, txt = torch.tensor([[1.0], [0.0], [0.0]]), torch.tensor([[0.0], [-gap], [0.0]])  # l_01 = -gap, the rest 0
    return [
        ("info_nce shared bank", lambda a, p, n: cb.info_nce(a, p, n, 1.0, normalize=False),
         lambda a, p, n: R.info_nce_reference(a, p, n, 1.0, normalize=False), (a, p, bank)),
        ("info_nce per-anchor", lambda a, p, n: cb.info_nce(a, p, n, 1.0, normalize=False),
         lambda a, p, n: R.info_nce_reference(a, p, n, 1.0, normalize=False), (a, p, bank[None])),
        ("info_nce indexed", lambda a, p, n: cb.info_nce(a, p, n, 1.0, negative_indices=idx, normalize=False),
         lambda a, p, n: R.info_nce_reference(a, p, n, 1.0, negative_indices=idx, normalize=False), (a, p, bank)),
        ("info_nce in-batch", lambda a, p: cb.info_nce(a, p, None, 1.0, normalize=False),
         lambda a, p: R.info_nce_reference(a, p, None, 1.0, normalize=False), (img, txt)),
        ("bank_cross_entropy", lambda a, n: cb.bank_cross_entropy(a, n, torch.tensor([1]), 1.0),
         lambda a, n: R.bank_cross_entropy_reference(a, n, torch.tensor([1]), 1.0), (a, bank)),
        ("clip_loss", lambda x, y: cb.clip_loss(x, y, 1.0, normalize=False),
         lambda x, y: R.clip_reference(x, y, 1.0, normalize=False), (img, txt)),
        ("nt_xent", lambda x, y: cb.nt_xent(x, y, 1.0, normalize=False),
         lambda x, y: R.nt_xent_reference(x, y, 1.0, normalize=False), (img, txt)),
        ("siglip_loss", lambda x, y: cb.siglip_loss(x, y, 1.0, 0.0, normalize=False),
         lambda x, y: R.siglip_reference(x, y, 1.0, 0.0, normalize=False), (img, txt)),
    ]


def _run(fn, xs, dtype):
    xs = [x.detach().to(dtype).requires_grad_() for x in xs]
    loss = fn(*xs)
    loss.backward()
    return loss.detach().double(), [x.grad.double() for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(8), ids=[p[0] for p in _problems(80.0)])
@pytest.mark.parametrize("gap", [80.0, 88.0])
def test_subnormal_weights_are_zero_and_normal_ones_kept(gap, case, dtype):
    name, kernel, reference, xs = _problems(gap)[case]
    loss, grads = _run(kernel, xs, dtype)
    want_loss, want_grads = _run(reference, xs, torch.float64)
    rel = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(loss, want_loss, rtol=rel, atol=0), (name, loss, want_loss)
    assert torch.tensor(-gap).exp() < TINY if gap == 88.0 else torch.tensor(-gap).exp() > TINY
    small = 0  # entries of the reference made of the weight e^-gap alone (between 0 and 1e-30)
    for got, want in zip(grads, want_grads):
        made_of_it = (want != 0) & (want.abs() < 1e-30)
        small += int(made_of_it.sum())
        if gap == 88.0:  # (the weight e^-88 < TINY: flushed, and every entry made of it alone with it)
            assert (got[made_of_it] == 0).all(), (name, got, want)
            keep = ~made_of_it
        else:
            keep = torch.ones_like(want, dtype=torch.bool)  # all, the ~1e-34 entries too
        assert torch.allclose(got[keep], want[keep], rtol=rel, atol=0), (name, got, want)
    assert small > 0, name  # the problem does make such entries


def test_shared_bank_backward_flushes_weights_made_subnormal_by_a_large_lse():
    # (A mutation audit of the CPU kernel, 2026-12-06.) The shared backward's underflow test must count lse's
    # log(K + 1) excess over the largest logit: here every |l| <= 43 (2 l_max < 87.3, so e^{l - max} never
    # underflows), but 1000 rows at l = 43 put lse at ~49.9 and the far row's weight e^{-43 - 49.9} ~ 4e-41 is
    # subnormal: flushed to 0 (tile_exp.h), as the tests above require at one tile's scale. Dropping the log(K + 1)
    # term kept it (a subnormal bank gradient row, the slow path).
    K, d = 1000, 2
    a = torch.tensor([[1.0, 0.0]], requires_grad=True)
    p = torch.zeros(1, d)
    bank = torch.zeros(K + 1, d)
    bank[:K, 0] = 43.0
    bank[K, 0] = -43.0
    bank.requires_grad_()
    cb.info_nce(a, p, bank, 1.0, normalize=False).backward()
    ga, gb = a.grad.clone(), bank.grad.clone()
    a64, b64 = a.detach().double().requires_grad_(), bank.detach().double().requires_grad_()
    R.info_nce_reference(a64, p.double(), b64, 1.0, normalize=False).backward()
    assert 0 < abs(float(b64.grad[K, 0])) < torch.finfo(torch.float32).tiny  # the reference's entry: subnormal
    assert (gb[K] == 0).all(), gb[K]  # flushed
    torch.testing.assert_close(gb[:K].double(), b64.grad[:K], rtol=1e-5, atol=0)
    torch.testing.assert_close(ga.double(), a64.grad, rtol=1e-5, atol=1e-7)
