"""Terms below float32's smallest normal number (1.2e-38) are kept out of the CPU kernels' loops: on x86 each
subnormal costs ~100x in every operation that forms or reads it, and small normal weights near the floor (unit
features at T ~ 0.01, a logit ~80 below its row's log-sum-exp) times an upstream gradient g ~ 1 / B or a feature made
them. Clustered features at T = 0.01 made steps 3-25x slower (`benchmarks/bench_logit_spread.py --noise 1`, and
`--bank-grad` for a bank that needs a gradient). Two ways, both checked here:
- the row modes (per-anchor and indexed negatives) run their loops in the processor's flush-to-zero mode
  (csrc/cpu/tile_exp.h, FlushToZeroScope), a result below the threshold 0 there;
- every backward forms its gradients from g 2^E and scales them back by 2^-E at the end (grad_scale_exp in
  csrc/cpu/info_nce_cpu.cpp), exact for a power of two: the shared bank's and CLIP's gradient GEMMs, whose weights
  g_i e^{l - lse} were the subnormals there, and the indexed bank's sums.

What must hold:
- upstream gradients far below 1 (down to ~1e-36, normal floats) scale the gradients, every row float32 can hold:
  the kernels form g_i apart from the weights in the mode (a product g_i w below the threshold would flush alone,
  and take normal entries with it: the bank's gradient rows came out 6 % off at g ~ 1e-36 with the plain order);
- the indexed bank's gradient is as exact as without the mode (its subnormal entries formed after it); a per-anchor
  negative's entry below the threshold may be 0;
- 2^E leaves room for the normalisation's inverse norm (up to 1e12 for a row below F.normalize's clamp);
- the caller's flush mode is left as it was, on every thread."""

from __future__ import annotations

import pytest
import torch

import contrastbound as cb

TINY = torch.finfo(torch.float32).tiny
SUB_ULP = 2.0**-149  # float32's smallest subnormal


MODES = ["per_anchor", "indexed", "shared", "clip", "nt_xent"]


def _problem(mode: str, seed: int):
    """(inputs, loss(*inputs, t, normalize) with reduction "none"). Unit rows (normalize=False takes them as they
    are): at T = 0.025 every weight e^{l - lse} >= e^{-2 / T - log(K + 1)} ~ e^-84 is a normal float32, so the floor
    that sets smaller ones to 0 (test_subnormal_weights.py) plays no part; only the terms' own size does."""
    g = torch.Generator().manual_seed(seed)
    B, K, M, d = 24, 40, 30, 8
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)
    a = unit(torch.randn(B, d, generator=g))
    p = unit(a + 0.3 * torch.randn(B, d, generator=g))
    bank = unit(torch.randn(M, d, generator=g))
    idx = torch.randint(0, M, (B, K), generator=g)
    if mode == "clip":
        return (a, p), lambda x, y, t, nz: cb.clip_loss(x, y, 1 / t, normalize=nz, reduction="none")
    if mode == "nt_xent":
        return (a, p), lambda x, y, t, nz: cb.nt_xent(x, y, t, normalize=nz, reduction="none")
    kw = dict(negative_indices=idx) if mode == "indexed" else {}
    negatives = bank[idx] if mode == "per_anchor" else bank
    return (a, p, negatives), lambda x, y, n, t, nz: cb.info_nce(x, y, n, t, normalize=nz, reduction="none", **kw)


def _grads(fn, xs, dtype, w):
    xs = [x.detach().to(dtype).requires_grad_() for x in xs]
    (fn(*xs).double() * w).sum().backward()
    return [x.grad.double().reshape(-1, x.shape[-1]) for x in xs]


def _weights(fn, xs, seed):
    """Upstream gradients in [0.5, 1), one per loss entry, float32 numbers."""
    with torch.no_grad():
        shape = fn(*xs).shape
    return (0.5 + 0.5 * torch.rand(shape, generator=torch.Generator().manual_seed(seed))).double()


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("scale", [2.0**-66, 2.0**-100, 2.0**-113, 2.0**-120])
@pytest.mark.parametrize("mode", MODES)
def test_tiny_upstream_gradients_scale_the_gradients(mode, scale, normalize):
    """Upstream gradients scale * w, scale a power of two down to 2^-120 ~ 7.5e-37 (w in [0.5, 1): normal floats):
    the gradients are scale times those for w, exactly (all the kernels' scaling is by powers of two), but for the
    entries float32 cannot hold: a per-anchor negative's entry below 1.2e-38 may be 0 (2 x 1.2e-38 per entry
    allowed), elsewhere a few steps of 2^-149 (where a subnormal result, or a subnormal factor such as the anchors'
    g_i s (w_0 - 1), rounds to them). Per gradient row, in float64."""
    t = 0.025  # logits up to 40: a flushed factor g_i w costs up to 40 x 1.2e-38 per entry
    for seed in range(3):
        xs, loss = _problem(mode, seed)
        fn = lambda *v: loss(*v, t, normalize)
        w = _weights(fn, xs, seed)
        unit = _grads(fn, xs, torch.float32, w)
        got = _grads(fn, xs, torch.float32, w * scale)
        reached = False
        for which, (gg, ww) in enumerate(zip(got, unit)):
            ww = ww * scale  # (exact in float64)
            per_entry = 2 * TINY if (which == 2 and mode == "per_anchor") else 16 * SUB_ULP
            if mode == "nt_xent":  # (its Python composition's own torch ops, softplus's and the positive logit's
                per_entry = 1024 * SUB_ULP  # gradients, form subnormal factors as any PyTorch code does)
            err = (gg - ww).norm(dim=1)
            bound = per_entry * ww.shape[1] ** 0.5
            assert (err <= bound).all(), (which, seed, float((err / bound).max()))
            reached |= bool(((ww != 0) & (ww.abs() < TINY)).any())
        assert reached or scale > 2.0**-120, "the problem must reach the threshold"


@pytest.mark.parametrize("mode", ["indexed", "shared", "clip"])
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e-30), (torch.float32, 1.0), (torch.float32, 1e20),
                                         (torch.float64, 1e-300), (torch.float64, 1.0), (torch.float64, 1e200)])
def test_the_scaled_sums_leave_room_for_a_clamped_norm(mode, dtype, scale):
    """The sums formed from g 2^E are multiplied by the row's inv before they are scaled back: up to 1e12 for a row
    below F.normalize's clamp (norm 3e-13 here; indexed: half of every anchor's negatives, so the row's sum is near
    the bound that sets E). A scale that left no room for it overflowed that row's gradient to inf (float64 too);
    against the float64 reference, for upstream gradients far below 1 and far above."""
    from conftest import assert_close_scaled
    from contrastbound import reference as R

    xs, _ = _problem("indexed", 4)
    a, p, bank = xs
    g = torch.Generator().manual_seed(4)
    if mode == "clip":  # an image row below the clamp, and a text row
        for x, m in ((a, 3), (p, 5)):
            x[m] *= 3e-13 / x[m].norm()
        ins = (a, p)
        fn = lambda x, y: cb.clip_loss(x, y, 2.0, reduction="none")
        ref = lambda x, y: R.clip_reference(x, y, 2.0, reduction="none")
        clamped = [(0, 3), (1, 5)]
    else:
        m = 7
        bank[m] *= 3e-13 / bank[m].norm()
        idx = torch.randint(0, len(bank), (len(a), 40), generator=g)
        idx[:, ::2] = m
        kw = dict(negative_indices=idx) if mode == "indexed" else {}
        ins = (a, p, bank)
        fn = lambda x, y, n: cb.info_nce(x, y, n, 0.5, reduction="none", **kw)
        ref = lambda x, y, n: R.info_nce_reference(x, y, n, 0.5, reduction="none", **kw)
        clamped = [(2, m)]
    w = _weights(fn, ins, 4) * scale
    got, want = _grads(fn, ins, dtype, w), _grads(ref, ins, torch.float64, w)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for which, (gg, ww) in enumerate(zip(got, want)):
        rows = [m for k, m in clamped if k == which]
        rest = torch.ones(len(ww), dtype=torch.bool)
        rest[rows] = False
        assert_close_scaled(gg[rest], ww[rest], tol, f"input {which}, rows above the clamp")
        for m in rows:
            assert_close_scaled(gg[m], ww[m], tol, f"input {which}, row {m} below the clamp")
            assert ww[m].abs().max() > 1e9 * ww[rest].abs().max()  # (inv ~ 1e12 there, ~1 elsewhere)


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
        xs, loss = _problem(mode, 0)
        xs = [x.clone().requires_grad_() for x in xs]
        assert _subnormal_survives(False) and _subnormal_survives(True)
        loss(*xs, 0.01, True).sum().backward()
        assert _subnormal_survives(False) and _subnormal_survives(True)
        if threads == 1 and torch.set_flush_denormal(True):  # (x86: the caller's own flush mode, kept too)
            try:
                assert not _subnormal_survives(False)
                loss(*xs, 0.01, True).sum().backward()
                assert not _subnormal_survives(False)
            finally:
                torch.set_flush_denormal(False)
            assert _subnormal_survives(False)
    finally:
        torch.set_num_threads(before)
