"""The CPU row modes (per-anchor and indexed negatives) run their loops under the processor's flush-to-zero mode
(csrc/cpu/tile_exp.h, FlushToZeroScope): a result below float32's smallest normal number is 0 there, not a subnormal,
which on x86 costs ~100x in each operation (clustered features at T = 0.01 made a step with the bank's gradient 3x
slower: `benchmarks/bench_logit_spread.py --losses indexed,per_anchor --bank-grad --noise 1`).

What must hold under it:
- upstream gradients far below 1 (down to ~1e-36, normal floats) scale the gradients, every row float32 can hold:
  the kernels form g_i apart from the weights (a product g_i w below the threshold would flush alone, and take
  normal entries with it: the bank's gradient rows came out 6 % off at g ~ 1e-36 with the plain order);
- the indexed bank's gradient, accumulated in units of 2^-E, is as exact as without the mode (its subnormal entries
  formed after the scope); a per-anchor negative's entry below the threshold may be 0 (at most ~2 x 1.2e-38 off);
- the caller's mode is left as it was, on every thread."""

from __future__ import annotations

import pytest
import torch

import contrastbound as cb

TINY = torch.finfo(torch.float32).tiny
SUB_ULP = 2.0**-149  # float32's smallest subnormal


def _problem(mode: str, seed: int):
    """Unit rows (normalize=False takes them as they are): at T = 0.025 every weight e^{l - lse} >= e^{-2 / T -
    log(K + 1)} ~ e^-84 is a normal float32, so the floor that sets smaller ones to 0 (test_subnormal_weights.py)
    plays no part; only the flush-to-zero mode does."""
    g = torch.Generator().manual_seed(seed)
    B, K, M, d = 24, 40, 30, 8
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)
    a = unit(torch.randn(B, d, generator=g))
    p = unit(a + 0.3 * torch.randn(B, d, generator=g))
    bank = unit(torch.randn(M, d, generator=g))
    idx = torch.randint(0, M, (B, K), generator=g)
    return (a, p, bank if mode == "indexed" else bank[idx]), (dict(negative_indices=idx) if mode == "indexed" else {})


def _grads(fn, xs, dtype, w):
    xs = [x.detach().to(dtype).requires_grad_() for x in xs]
    (fn(*xs).double() * w).sum().backward()
    return [x.grad.double().reshape(-1, x.shape[-1]) for x in xs]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("scale", [1e-20, 1e-30, 1e-34, 1e-36])
@pytest.mark.parametrize("mode", ["per_anchor", "indexed"])
def test_tiny_upstream_gradients_scale_the_gradients(mode, scale, normalize):
    """The gradients for upstream gradients scale * w are scale times those for w, per row, where float32 can hold
    them: within 1e-5 of the row, plus, for a per-anchor negative's row, 2 x 1.2e-38 per entry (entries below the
    threshold may be 0), or a few steps of 2^-149 elsewhere (the indexed bank's rows, and the anchors' and positives',
    formed outside the mode, where a subnormal factor g_i s (w_0 - 1) rounds to them)."""
    t = 0.025  # logits up to 40: a flushed factor g_i w costs up to 40 x 1.2e-38 per entry
    for seed in range(3):
        xs, kw = _problem(mode, seed)
        w = torch.rand(len(xs[0]), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        fn = lambda x, y, n: cb.info_nce(x, y, n, t, reduction="none", normalize=normalize, **kw)
        unit = _grads(fn, xs, torch.float32, w)
        got = _grads(fn, xs, torch.float32, w * scale)
        reached = False
        for which, (gg, ww) in enumerate(zip(got, unit)):
            ww = ww * scale  # (float64)
            per_entry = 2 * TINY if (which == 2 and mode == "per_anchor") else 16 * SUB_ULP
            err = (gg - ww).norm(dim=1)
            bound = 1e-5 * ww.norm(dim=1) + per_entry * ww.shape[1] ** 0.5
            assert (err <= bound).all(), (which, seed, float((err / bound).max()))
            reached |= bool(((ww != 0) & (ww.abs() < TINY)).any())
        assert reached or scale > 1e-34, "the problem must reach the threshold"


def _subnormal_survives(threads_product: bool) -> bool:
    """Whether a float32 product that is subnormal (1e-20 * 1e-20 = 1e-40) comes out nonzero: on the calling thread
    (a one-element product), or on torch's worker threads (a large one, which ATen splits among them)."""
    n = 1 << 20 if threads_product else 1
    x = torch.full((n,), 1e-20)
    return bool(((x * x) != 0).all())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", ["per_anchor", "indexed"])
def test_the_callers_flush_mode_is_left_as_it_was(mode, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # 1: the kernels' loops run on this thread
    try:
        xs, kw = _problem(mode, 0)
        xs = [x.clone().requires_grad_() for x in xs]
        assert _subnormal_survives(False) and _subnormal_survives(True)
        cb.info_nce(*xs, 0.01, **kw).backward()
        assert _subnormal_survives(False) and _subnormal_survives(True)
        if threads == 1 and torch.set_flush_denormal(True):  # (x86: the caller's own flush mode, kept too)
            try:
                assert not _subnormal_survives(False)
                cb.info_nce(*xs, 0.01, **kw).backward()
                assert not _subnormal_survives(False)
            finally:
                torch.set_flush_denormal(False)
            assert _subnormal_survives(False)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e-30), (torch.float32, 1.0), (torch.float32, 1e20),
                                         (torch.float64, 1e-300), (torch.float64, 1.0), (torch.float64, 1e200)])
def test_the_scaled_sums_leave_room_for_a_clamped_norm(dtype, scale):
    """The indexed bank's sums, scaled by 2^E, are multiplied by the row's inv before they are scaled back: up to
    1e12 for a row below F.normalize's clamp (norm 3e-13 here, half of every anchor's negatives). A scale that left no
    room for it overflowed that row's gradient to inf (float64 too); against the float64 reference, for upstream
    gradients far below 1 and far above."""
    from conftest import assert_close_scaled
    from contrastbound import reference as R

    xs, kw = _problem("indexed", 4)
    a, p, bank = xs
    m = int(kw["negative_indices"][0, 0])
    bank[m] *= 3e-13 / bank[m].norm()
    kw["negative_indices"][:, ::2] = m  # every anchor's half: the row's sum near the bound that sets 2^E
    w = torch.rand(len(a), generator=torch.Generator().manual_seed(4), dtype=torch.float64) * scale
    got = _grads(lambda x, y, n: cb.info_nce(x, y, n, 0.5, reduction="none", **kw), (a, p, bank), dtype, w)
    want = _grads(lambda x, y, n: R.info_nce_reference(x, y, n, 0.5, reduction="none", **kw), (a, p, bank),
                  torch.float64, w)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    rest = torch.arange(len(bank)) != m
    for name, gg, ww in (("anchors", got[0], want[0]), ("positives", got[1], want[1]),
                         ("the clamped row", got[2][m], want[2][m]), ("the other rows", got[2][rest], want[2][rest])):
        assert_close_scaled(gg, ww, tol, name)
    assert want[2][m].abs().max() > 1e9 * want[2][rest].abs().max()  # (inv ~ 1e12 there, ~1 elsewhere)
