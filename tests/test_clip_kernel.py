"""clip_loss's both-directions kernel (contrastbound::clip_fwd / clip_bwd, CPU): values and gradients against
materialised float64 logits and against the two info_nce calls it replaces, gradcheck, opcheck, the op's argument
checks, thread-count independence, and that clip_loss really takes it."""

from __future__ import annotations

import contextlib
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import contrastbound as cb
from contrastbound import _backend

from conftest import PEAK_RSS_HELPERS, child_json, near_duplicate_pairs

pytestmark = pytest.mark.skipif(not _backend.clip_kernel_serves(torch.device("cpu")),
                                reason="the compiled CPU clip kernel is not loaded")

# N crosses the kernel's tiles (256 rows, 512 columns) and its forward groups (ceil(N / 256), at most 16).
SIZES = [(1, 3), (2, 5), (7, 4), (257, 9), (513, 17), (1100, 19)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def naive_clip(img, txt, logit_scale, normalize=True):
    """Per-pair loss (N,) with the N x N logits materialised, in the inputs' dtype (float64 here)."""
    if normalize:
        img, txt = F.normalize(img, dim=-1, eps=1e-12), F.normalize(txt, dim=-1, eps=1e-12)
    logits = logit_scale * img @ txt.T
    target = torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(logits, target, reduction="none")
                  + F.cross_entropy(logits.T, target, reduction="none"))


@contextlib.contextmanager
def _without_clip_kernel():
    """The routes taken where the clip kernel is not compiled (CUDA): info_nce calls."""
    saved = dict(_backend._HAS_CLIP_KERNEL)
    _backend._HAS_CLIP_KERNEL.update(cpu=False)
    try:
        yield
    finally:
        _backend._HAS_CLIP_KERNEL.update(saved)


def two_calls(img, txt, logit_scale, normalize=True, reduction="none"):
    """clip_loss as it runs where the kernel is not compiled (CUDA): two in-batch info_nce calls."""
    with _without_clip_kernel():
        return cb.clip_loss(img, txt, logit_scale, normalize=normalize, reduction=reduction)


def ops_called(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def tolerance(dtype):
    # Half inputs are rounded once (the kernel accumulates in float32): a few of their ulps on O(1) values.
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d", SIZES)
@pytest.mark.parametrize("normalize", [True, False])
def test_values_and_gradients_match_float64_logits(dtype, N, d, normalize):
    g = torch.Generator().manual_seed(N * 31 + d)
    img = torch.randn(N, d, generator=g).to(dtype).requires_grad_()
    txt = torch.randn(N, d, generator=g).to(dtype).requires_grad_()
    scale = torch.tensor(7.0 if normalize else 1.3, requires_grad=True)
    weights = torch.rand(N, generator=g, dtype=torch.float64)  # an uneven upstream gradient
    loss = cb.clip_loss(img, txt, scale, normalize=normalize, reduction="none")
    assert loss.dtype == dtype and loss.shape == (N,)
    (loss.double() * weights).sum().backward()

    i64, t64 = img.detach().double().requires_grad_(), txt.detach().double().requires_grad_()
    s64 = scale.detach().double().requires_grad_()
    ref = naive_clip(i64, t64, s64, normalize)
    (ref * weights).sum().backward()
    tol = tolerance(dtype)
    ref_loss = ref.detach().to(dtype).double() if dtype in (torch.bfloat16, torch.float16) else ref.detach()
    assert torch.allclose(loss.detach().double(), ref_loss, rtol=tol, atol=tol)
    for got, want in ((img.grad, i64.grad), (txt.grad, t64.grad)):
        assert got.dtype == dtype
        assert torch.allclose(got.double(), want, rtol=tol, atol=tol * want.abs().max().item() + 1e-12)
    assert torch.allclose(scale.grad.double(), s64.grad, rtol=max(tol, 1e-6), atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_clip_loss_takes_the_kernel(reduction):
    img, txt = torch.randn(9, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    names = ops_called(lambda: cb.clip_loss(img, txt, 10.0, reduction=reduction).sum().backward())
    assert "contrastbound::clip_fwd" in names and "contrastbound::clip_bwd" in names
    assert "contrastbound::info_nce_fwd" not in names
    names = ops_called(lambda: two_calls(img, txt, 10.0, reduction=reduction))
    assert "contrastbound::clip_fwd" not in names and "contrastbound::info_nce_fwd" in names


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 600), d=st.integers(2, 24), log_scale=st.floats(-3.0, 4.6), normalize=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**31 - 1))
def test_the_kernel_agrees_with_the_two_info_nce_calls(N, d, log_scale, normalize, dtype, seed):
    """Property: the fused route and the two-call route it replaces give the same losses and gradients, for any
    size and logit scale up to 100 (a temperature of 0.01): the kernel merges rows and columns correctly. (d >= 2: a
    normalised scalar's gradient is 0, and both routes return rounding noise of eps / |x| for a tiny one.)"""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, d, generator=g, dtype=dtype)
    # Some pairs nearly aligned (a dominant positive), others not.
    img = base.clone().requires_grad_()
    noise = torch.randn(N, d, generator=g, dtype=dtype) * torch.rand(N, 1, generator=g, dtype=dtype)
    txt = (base + noise).requires_grad_()
    scale = torch.tensor(float(torch.tensor(log_scale).exp()), dtype=dtype, requires_grad=True)
    outs = []
    for fn in (cb.clip_loss, two_calls):
        for x in (img, txt, scale):
            x.grad = None
        loss = fn(img, txt, scale, normalize=normalize, reduction="none")
        loss.sum().backward()
        outs.append((loss.detach(), img.grad, txt.grad, scale.grad))
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for got, want in zip(*outs):
        assert torch.isfinite(got).all()
        assert torch.allclose(got, want, rtol=tol, atol=tol * (1 + want.abs().max().item())), (got, want)


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_float64(normalize):
    img = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    f = lambda i, t, s: cb.clip_loss(i, t, s, normalize=normalize, reduction="none")  # noqa: E731
    assert torch.autograd.gradcheck(f, (img, txt, scale), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_opcheck():
    g = torch.Generator().manual_seed(3)
    for N, d, dtype in [(5, 3, torch.float32), (7, 2, torch.float64), (4, 6, torch.bfloat16)]:
        img = torch.randn(N, d, generator=g).to(dtype).requires_grad_()
        txt = torch.randn(N, d, generator=g).to(dtype).requires_grad_()
        scale = torch.tensor(3.0, dtype=torch.float64)
        for normalize in (True, False):
            for save in (True, False):
                torch.library.opcheck(torch.ops.contrastbound.clip_fwd.default, (img, txt, scale, normalize, save))
            loss, lse, _ = torch.ops.contrastbound.clip_fwd(img.detach(), txt.detach(), scale, normalize, False)
            grad = torch.randn(2, N, generator=g, dtype=loss.dtype)
            for mask in ([True, True], [True, False], [False, True]):
                torch.library.opcheck(torch.ops.contrastbound.clip_bwd.default,
                                      (grad, img.detach(), txt.detach(), loss, lse, scale, normalize, mask))


def test_same_bits_with_any_thread_count():
    """The kernel's units and merge order depend on the sizes only (N = 1100: 5 forward groups, 5 row blocks,
    3 column tiles)."""
    g = torch.Generator().manual_seed(11)
    img, txt = torch.randn(1100, 33, generator=g), torch.randn(1100, 33, generator=g)
    scale = torch.tensor(12.0, requires_grad=True)

    def run():
        i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        scale.grad = None
        loss = cb.clip_loss(i, t, scale, reduction="none")
        loss.sum().backward()
        return loss.detach(), i.grad, t.grad, scale.grad

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        many = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_confident_pairs_at_the_lowest_temperature_stay_accurate():
    """logit_scale 100 (temperature 0.01, CLIP's clamp) with matched pairs: each loss ~e^-100-small, kept apart from
    the sums as in info_nce (softplus of lse_others - l_ii), not 0 or a rounding residue, and finite gradients."""
    g = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(300, 16, generator=g), dim=-1)
    txt = (img + 0.02 * torch.randn(300, 16, generator=g)).requires_grad_()
    img.requires_grad_()
    loss = cb.clip_loss(img, txt, 100.0, reduction="none")
    loss.sum().backward()
    # float64 reference of the same form, softplus(lse over j != i - l_ii) per direction: cross_entropy's lse - l_ii
    # in float64 rounds these losses to 0 or to multiples of 2^-52 relative to lse.
    i64, t64 = F.normalize(img.detach().double(), dim=-1), F.normalize(txt.detach().double(), dim=-1)
    logits = 100.0 * i64 @ t64.T
    diag = torch.eye(300, dtype=torch.bool)
    others = logits.masked_fill(diag, -torch.inf)
    ref = 0.5 * (F.softplus(others.logsumexp(1) - logits.diagonal())
                 + F.softplus(others.logsumexp(0) - logits.diagonal()))
    assert (ref > 0).all()
    assert torch.isfinite(img.grad).all() and torch.isfinite(txt.grad).all()
    assert torch.allclose(loss.double(), ref, rtol=1e-4, atol=0)


def test_a_frozen_tower_gets_no_gradient_and_no_work():
    """Only the text tower trains (a frozen image encoder): the images' backward pass is skipped."""
    img = torch.randn(20, 6)
    txt = torch.randn(20, 6, requires_grad=True)
    cb.clip_loss(img, txt, 10.0).backward()
    assert img.grad is None and txt.grad is not None
    i64, t64 = img.double(), txt.detach().double().requires_grad_()
    naive_clip(i64, t64, 10.0).mean().backward()
    assert torch.allclose(txt.grad.double(), t64.grad, rtol=1e-5, atol=1e-7)


def test_empty_batch():
    img = torch.randn(0, 4, requires_grad=True)
    txt = torch.randn(0, 4, requires_grad=True)
    loss = cb.clip_loss(img, txt, 10.0, reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and img.grad.shape == (0, 4)


BAD_OP_CALLS = [
    ("image 1-d", lambda a, b, s: torch.ops.contrastbound.clip_fwd(a[0], b, s, True, False), "image must have shape"),
    ("text shape", lambda a, b, s: torch.ops.contrastbound.clip_fwd(a, b[:3], s, True, False),
     "text must have the shape of image"),
    ("dtype mismatch", lambda a, b, s: torch.ops.contrastbound.clip_fwd(a, b.double(), s, True, False),
     "image and text must share a dtype"),
    ("integer features", lambda a, b, s: torch.ops.contrastbound.clip_fwd(a.long(), b.long(), s, True, False),
     "image must be a floating tensor"),
    ("scale zero", lambda a, b, s: torch.ops.contrastbound.clip_fwd(a, b, s * 0, True, False),
     "scale (1 / temperature) must be positive and finite"),
    ("scale two elements", lambda a, b, s: torch.ops.contrastbound.clip_fwd(a, b, s.repeat(2), True, False),
     "scale (1 / temperature) must be a floating tensor with one element"),
    ("grad_loss shape", lambda a, b, s: torch.ops.contrastbound.clip_bwd(
        torch.ones(5), a, b, torch.ones(2, 5), torch.ones(2, 5), s, True, [True, True]),
     "grad_loss must have shape (2, N)"),
    ("lse shape", lambda a, b, s: torch.ops.contrastbound.clip_bwd(
        torch.ones(2, 5), a, b, torch.ones(2, 5), torch.ones(5, 2), s, True, [True, True]),
     "lse must have shape (2, N)"),
    ("loss dtype", lambda a, b, s: torch.ops.contrastbound.clip_bwd(
        torch.ones(2, 5), a, b, torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5), s, True, [True, True]),
     "loss must be a floating tensor"),
]


@pytest.mark.parametrize("case,call,message", BAD_OP_CALLS, ids=[c[0] for c in BAD_OP_CALLS])
def test_raw_op_refuses_bad_input(case, call, message):
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    with pytest.raises((ValueError, TypeError)) as info:
        call(a, b, torch.tensor(2.0, dtype=torch.float64))
    assert message in str(info.value)


def test_raw_op_refuses_a_scale_that_requires_grad():
    a, b = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3)
    with pytest.raises(ValueError, match="clip_fwd does not differentiate scale"):
        torch.ops.contrastbound.clip_fwd(a, b, torch.tensor(2.0, dtype=torch.float64, requires_grad=True), True, False)


@pytest.mark.parametrize("N", [300, 1024])
def test_one_pass_backward_gives_the_texts_own_pass_bits(N):
    """With both gradients and N <= 1024 the backward forms W once per tile and keeps a partial texts' gradient per row
    block; asked for the texts alone it takes their own pass over column tiles. The same operations in the same
    order: the same bits (and the images' gradient too)."""
    g = torch.Generator().manual_seed(N)
    img, txt = torch.randn(N, 37, generator=g), torch.randn(N, 37, generator=g)
    scale = torch.tensor(9.0, dtype=torch.float64)
    loss, lse, _ = torch.ops.contrastbound.clip_fwd(img, txt, scale, True, False)
    grad = torch.randn(2, N, generator=g)
    both = torch.ops.contrastbound.clip_bwd(grad, img, txt, loss, lse, scale, True, [True, True])
    images = torch.ops.contrastbound.clip_bwd(grad, img, txt, loss, lse, scale, True, [True, False])[0]
    texts = torch.ops.contrastbound.clip_bwd(grad, img, txt, loss, lse, scale, True, [False, True])[1]
    assert torch.equal(both[0], images) and torch.equal(both[1], texts)


@pytest.mark.parametrize("value", [None, 0, 1, "no", torch.tensor(False)])
def test_normalize_must_be_a_bool(value):
    """The op's bool argument would take 0, None or a 0-d tensor as a silent False (the two-call route refused)."""
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        cb.clip_loss(a, b, 10.0, normalize=value)


def test_scale_gradient_with_overflowed_logits_matches_the_two_calls():
    """normalize=False with huge features: a logit of -inf (an overflowed dot product, -1e40 in float32) has weight
    0 and leaves the scale's gradient finite (its term e^{l - m} (l - l_0) is 0 x -inf, taken as 0); all logits
    +inf make the loss NaN, and the scale's gradient NaN with it (not 0). Until 2026-12-07 the first case had
    features of 1e19 whose largest product, 1.6e38, stayed finite: dropping the kernel's 0 for that term (NaN
    instead) passed every test; it fails this one."""
    img = torch.tensor([[1e20, 0.0], [0.0, 1.0], [0.0, 1.0]])
    txt = torch.tensor([[0.0, 1.0], [-1e20, 0.0], [0.0, 1.0]])
    assert (img @ txt.T).isneginf().sum() == 1 and (img @ txt.T).diagonal().isfinite().all()  # (the case is there)
    for img, txt in ((img, txt), (torch.ones(3, 2) * 1e20, torch.ones(3, 2) * 1e20)):
        grads = []
        for fn in (cb.clip_loss, two_calls):
            scale = torch.tensor(1.0, requires_grad=True)
            loss = fn(img, txt, scale, normalize=False, reduction="sum")
            loss.backward()
            grads.append((loss.detach(), scale.grad))
        (fused_loss, fused_grad), (two_loss, two_grad) = grads
        assert torch.allclose(fused_loss, two_loss, equal_nan=True)
        assert torch.allclose(fused_grad, two_grad, rtol=1e-5, equal_nan=True), (fused_grad, two_grad)
        assert torch.isnan(fused_grad) == torch.isnan(fused_loss)
        if torch.isfinite(fused_loss):  # float64 holds the products (-1e40): the same loss and gradient
            scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
            want = two_calls(img.double(), txt.double(), scale, normalize=False, reduction="sum")
            want.backward()
            torch.testing.assert_close(fused_loss.double(), want.detach(), rtol=1e-6, atol=0)
            torch.testing.assert_close(fused_grad.double(), scale.grad, rtol=1e-5, atol=0)


@pytest.mark.parametrize("d", [100, 37])
def test_scale_gradient_of_identical_pairs_is_zero(d):
    # Two identical pairs (every image and text row the same x, normalize=False): every logit is s |x|^2, so each
    # direction's loss is log 2 whatever the scale s, and d loss / d s = 0. The kernel sums e^{l_j - m} (l_j - l_0)
    # against the positive's logit from prepare's dot product, then moves it to the tile's own l_0 (the GEMM's);
    # without that correction the gradient kept their rounding difference (|x|^2 ~ 8e3 / 3e3 at s = 1): 2.4e-4 to
    # 4.9e-4 on 4 of 5 seeds at d = 100, 3e-5 to 6e-5 on 3 of 5 at d = 37, where the corrected sum gave 0 and at most
    # 3e-8 (float32 differences of logits that are equal in exact arithmetic).
    for seed in range(5):
        x = torch.randn(d, generator=torch.Generator().manual_seed(seed)) * 9
        img = torch.stack([x, x])
        scale = torch.tensor(1.0, requires_grad=True)
        loss = cb.clip_loss(img, img.clone(), scale, normalize=False, max_logit_scale=1e4)
        loss.backward()
        assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-6)
        assert abs(scale.grad.item()) <= 1e-6, (seed, scale.grad.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_where_the_log_sum_exps_spread_widely(dtype):
    """Logit scale 100, half the pairs matched (log-sum-exp ~100) and half random (~25): tiles holding both have a
    spread beyond 60 and form the columns' exponentials (forward) and W (backward) with two exponentials; tiles of
    random pairs alone with one (clip_factors, clip_weights). Both against float64 logits."""
    g = torch.Generator().manual_seed(17)
    N, d = 600, 256
    img = F.normalize(torch.randn(N, d, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.randn(N, d, generator=g, dtype=torch.float64)
    txt[:300] = img[:300] + 0.05 * txt[:300] / d**0.5
    weights = torch.rand(N, generator=g, dtype=torch.float64)
    i64, t64 = img.clone().requires_grad_(), txt.clone().requires_grad_()
    ref = naive_clip(i64, t64, 100.0)
    (ref * weights).sum().backward()
    with torch.no_grad():  # the regime is really there: a spread beyond 60 in the first tile, within it in the last
        logits = 100.0 * F.normalize(i64, dim=-1) @ F.normalize(t64, dim=-1).T
        rows, cols = logits.logsumexp(1), logits.logsumexp(0)
        assert rows[:256].max() - cols[:512].min() > 60 and rows[512:].max() - cols[512:].min() < 60
    ic, tc = img.to(dtype).requires_grad_(), txt.to(dtype).requires_grad_()
    loss = cb.clip_loss(ic, tc, 100.0, reduction="none")
    (loss.double() * weights).sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert torch.allclose(loss.detach().double(), ref.detach(), rtol=tol, atol=tol)
    for got, want in ((ic.grad, i64.grad), (tc.grad, t64.grad)):
        assert torch.allclose(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def _naive_float32_clip_and_grads(img, txt, scale, fn):
    a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
    loss = fn(a, b, scale, normalize=False) if fn is naive_clip else fn(a, b, scale, normalize=False, reduction="none")
    return (loss.detach(), *torch.autograd.grad(loss.sum(), (a, b)))


def test_large_logits_with_a_near_duplicate_are_as_accurate_as_naive_float32():
    """normalize=False, logits ~1e3-1e4 (features of norm ~30, scale 10), a near duplicate text of pair 0's: the
    kernel's float32 losses and gradients within 2x the error of naive float32 PyTorch, both against float64 from the
    same float32 inputs. Backward's weights e^{l - lse} with a float32 lse summed to 1 + ~eps |lse| per row (up to
    600x naive's gradient error here), and the positive logit formed apart from the product that formed its near
    duplicate's gave their difference ~eps |l| (losses 100x naive's); the op's lse is float64 and its positives are
    the product's now (tile_pos)."""
    g = torch.Generator().manual_seed(5)
    worst = {"grad": 0.0, "loss": 0.0}
    for _ in range(60):
        img, txt = near_duplicate_pairs(g)
        ref = _naive_float32_clip_and_grads(img.double(), txt.double(), 10.0, naive_clip)
        errors = []
        for fn in (cb.clip_loss, naive_clip):
            out = _naive_float32_clip_and_grads(img, txt, 10.0, fn)
            grad = max(((x.double() - y).norm() / y.norm()).item() for x, y in zip(out[1:], ref[1:]))
            loss = ((out[0].double() - ref[0]).abs() / ref[0].abs().clamp_min(1e-3)).max().item()
            errors.append((grad, loss))
        (kernel_grad, kernel_loss), (naive_grad, naive_loss) = errors
        worst["grad"] = max(worst["grad"], kernel_grad / max(naive_grad, 1e-8))
        worst["loss"] = max(worst["loss"], kernel_loss / max(naive_loss, 1e-8))
    assert worst["grad"] <= 2.0 and worst["loss"] <= 2.0, worst


def _per_direction_float64(img, txt, scale, weights):
    """float64 per-direction losses (2, N) as softplus(lse over the others - l_ii) (accurate for tiny losses) and
    the gradients of sum(weights * losses) for images and texts."""
    a, b = img.detach().double().requires_grad_(), txt.detach().double().requires_grad_()
    logits = scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    eye = torch.eye(len(a), dtype=torch.bool)
    losses = torch.stack([F.softplus(l.masked_fill(eye, -torch.inf).logsumexp(1) - l.diagonal())
                          for l in (logits, logits.T)])
    (losses * weights).sum().backward()
    return a.grad, b.grad


def _per_direction_kernel(img, txt, scale, weights, two_call_route):
    a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
    if two_call_route:
        t = 1.0 / scale
        losses = torch.stack([cb.info_nce(a, b, temperature=t, reduction="none"),
                              cb.info_nce(b, a, temperature=t, reduction="none")])
    else:
        losses = torch.ops.contrastbound.clip_fwd(a, b, torch.tensor(scale, dtype=torch.float64), True, False)[0]
    (losses.double() * weights).sum().backward()
    return a.grad, b.grad


def _row_errors(got, want):
    norms = want.norm(dim=1)
    keep = norms > 1e-35  # (rows whose float32 gradient is representable)
    return ((got.double() - want).norm(dim=1)[keep] / norms[keep])


def test_tiny_gradients_of_confident_pairs_keep_their_accuracy():
    """A confident pair's gradient is made of terms e^{l_ij - lse} far below 1; backward's one-exponential form must
    not let them underflow where they are normal floats (a per-row shift did: image 2 here came out 0, relative error
    1, at logit scale 96.6 < CLIP's 100; so did upstream gradients ~1e-36, whose factor g e^{lo - lse} went
    subnormal). Per-row errors against float64, at most 100x the two-call route's."""
    img = torch.tensor([[-0.0892, 0.1946, 0.9145, -1.0095], [0.4890, 0.6619, 0.4269, -1.2933],
                        [-0.2628, -2.1822, 0.5558, 1.1321]])
    txt = torch.tensor([[0.2435, -0.2323, 0.0156, -0.5871], [0.4023, 0.5754, 0.3973, -1.2277],
                        [-0.2696, -2.2257, 0.5984, 1.0873]])
    cases = [(img, txt, 96.6, torch.full((2, 3), 1 / 6, dtype=torch.float64))]
    g = torch.Generator().manual_seed(2)
    for _ in range(150):  # random small problems, most pairs matched, scales 30 ... 100
        N, d = int(torch.randint(2, 24, (1,), generator=g)), int(torch.randint(2, 6, (1,), generator=g))
        a, b = torch.randn(N, d, generator=g), torch.randn(N, d, generator=g)
        matched = torch.rand(N, generator=g) < 0.6
        b[matched] = a[matched] + 0.05 * torch.randn(int(matched.sum()), d, generator=g)
        w = torch.rand(2, N, generator=g, dtype=torch.float64)
        w[int(torch.randint(0, 2, (1,), generator=g))] *= float(torch.rand(1, generator=g) < 0.5)
        if torch.rand(1, generator=g) < 0.3:  # tiny upstream gradients, normal floats (a factor g e^-20 is not)
            w *= 1e-36
        cases.append((a, b, float(30 + 70 * torch.rand(1, generator=g)), w))
    for a, b, scale, w in cases:
        want = _per_direction_float64(a, b, scale, w)
        kernel = _per_direction_kernel(a, b, scale, w, False)
        calls = _per_direction_kernel(a, b, scale, w, True)
        for k, c, r in zip(kernel, calls, want):
            ek, ec = _row_errors(k, r), _row_errors(c, r)
            assert (ek <= 100 * ec.clamp_min(1e-5)).all(), (scale, ek.max().item(), ec.max().item())


def _nt_xent_two_calls_per_side(z1, z2, t, **kw):
    """nt_xent as it runs where the clip kernel is not compiled: each side's pair sum by its own info_nce call."""
    with _without_clip_kernel():
        return cb.nt_xent(z1, z2, t, **kw)


def test_nt_xent_takes_the_kernel_for_its_pair_sides():
    """The pair sides of nt_xent's two halves are the two directions of the (z1, z2) logits: one clip_fwd call, and
    the own sides' two info_nce calls (three calls, was four)."""
    z1, z2 = torch.randn(9, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        cb.nt_xent(z1, z2, 0.5).backward()
    names = [e.name for e in prof.events()]
    assert names.count("contrastbound::clip_fwd") == 1 and names.count("contrastbound::info_nce_fwd") == 2
    assert "contrastbound::clip_bwd" in names


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 300), d=st.integers(2, 16), log_t=st.floats(-4.6, 1.0), normalize=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32]), aligned=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_nt_xent_with_the_kernel_agrees_with_the_calls_per_side(N, d, log_t, normalize, dtype, aligned, seed):
    """Property: nt_xent's values and gradients (views and a learnable temperature, down to 0.01) are the same
    through the clip kernel as through one info_nce call per side, with dominant pairs (aligned) or not."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(N, d, generator=g, dtype=dtype)
    z2 = (z1 + 0.01 * torch.randn(N, d, generator=g, dtype=dtype)) if aligned else torch.randn(N, d, generator=g,
                                                                                                  dtype=dtype)
    z1.requires_grad_()
    z2.requires_grad_()
    t = torch.tensor(float(torch.tensor(log_t).exp()), dtype=dtype, requires_grad=True)
    outs = []
    for fn in (cb.nt_xent, _nt_xent_two_calls_per_side):
        for x in (z1, z2, t):
            x.grad = None
        loss = fn(z1, z2, t, normalize=normalize, reduction="none")
        (loss * torch.linspace(0.5, 1.5, 2 * N, dtype=dtype)).sum().backward()
        outs.append((loss.detach(), z1.grad, z2.grad, t.grad))
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for got, want in zip(*outs):
        assert torch.isfinite(got).all()
        assert torch.allclose(got, want, rtol=tol, atol=tol * (1 + want.abs().max().item())), (got, want)


@pytest.mark.parametrize("t_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nt_xent_float64_features_keep_float64_accuracy_with_a_narrower_temperature(t_dtype):
    """float64 views with a float32 / half temperature tensor: both sides take 1 / t in float64 (the pair side's
    scale was rounded to float32 once: 3.5e-8 off where the four calls are 1.8e-15)."""
    g = torch.Generator().manual_seed(4)
    z1 = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.07, dtype=t_dtype, requires_grad=True)
    outs = []
    for fn in (cb.nt_xent, _nt_xent_two_calls_per_side):
        for x in (z1, z2, t):
            x.grad = None
        loss = fn(z1, z2, t, reduction="none")
        loss.sum().backward()
        outs.append((loss.detach(), z1.grad, z2.grad, t.grad))
    for got, want in zip(outs[0][:3], outs[1][:3]):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), (got - want).abs().max()
    assert torch.allclose(outs[0][3].double(), outs[1][3].double(), rtol=1e-2 if t_dtype != torch.float32 else 1e-6)


def test_an_infinite_lse_weighs_finite_logits_zero_not_nan():
    """clip_bwd carries lse as hi + res; for an infinite lse the residual is 0, not inf - inf = NaN: a direction
    whose lse is +inf gives its finite logits weight 0, as e^{l - inf} does, the same as a huge finite lse."""
    g = torch.Generator().manual_seed(4)
    img, txt = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    scale = torch.tensor(3.0, dtype=torch.float64)
    loss, lse, _ = torch.ops.contrastbound.clip_fwd(img, txt, scale, True, False)
    grad = torch.ones(2, 5)
    out = {}
    for value in (torch.inf, 1e30):
        bad = lse.clone()
        bad[0, 2] = value  # image 2's row: its W terms e^{l - lse} vanish
        out[value] = torch.ops.contrastbound.clip_bwd(grad, img, txt, loss, bad, scale, True, [True, True])
    for x, y in zip(out[torch.inf], out[1e30]):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y)


def _weighted_clip_grads(img, txt, scale, weights, fn, **kwargs):
    """Gradients of sum_i weights_i loss_i (per pair, reduction "none") with respect to both feature sets."""
    i, t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    (fn(i, t, scale, reduction="none", **kwargs).double() * weights).sum().backward()
    return i.grad.double(), t.grad.double()


def _naive_per_pair(img, txt, scale, reduction="none", normalize=True):
    if normalize:
        img, txt = F.normalize(img, dim=-1, eps=1e-12), F.normalize(txt, dim=-1, eps=1e-12)
    logits = scale * img @ txt.T
    target = torch.arange(img.shape[0])
    loss = 0.5 * (F.cross_entropy(logits, target, reduction="none")
                  + F.cross_entropy(logits.T, target, reduction="none"))
    return loss if reduction == "none" else loss.sum()


def test_one_exponential_backward_with_exact_large_logits_carries_the_lse_residuals():
    """Integer features, scale 1, normalize=False: every logit (~1.2e4, a few units apart) is exact in float32 and
    every tile's lse lie within the one-exponential window, so the error is the kernel's own. Gradients within 2x naive
    float32's (2.8e-7 vs 3.7e-7); leaving out the rows' or the columns' lse residual there gave 4.4e-4 / 4.8e-4 and
    no test saw it (a mutation audit)."""
    g = torch.Generator().manual_seed(0)
    N, d = 16, 4
    base = torch.tensor([110.0, 0.0, 0.0, 0.0])
    img = base + F.pad(torch.randint(-1, 2, (N, d - 1), generator=g).float(), (1, 0))
    txt = base + F.pad(torch.randint(-1, 2, (N, d - 1), generator=g).float(), (1, 0))
    w = torch.rand(N, generator=g, dtype=torch.float64)
    want = _weighted_clip_grads(img.double(), txt.double(), 1.0, w, _naive_per_pair, normalize=False)
    errors = []
    for fn in (cb.clip_loss, _naive_per_pair):
        got = _weighted_clip_grads(img, txt, 1.0, w, fn, normalize=False)
        errors.append(max(((x - y).norm() / y.norm()).item() for x, y in zip(got, want)))
    assert errors[0] <= 2 * errors[1] + 1e-7, errors


def test_small_upstream_gradients_with_a_wide_lse_spread_keep_their_accuracy():
    """Image 0 and texts 0-3 near duplicates at logit scale 60: row 0's lse ~60, the others' ~15, a spread within a
    tile past the one-exponential window (20), with upstream gradients 1e-26 (normal, but g e^{lo - lse} is not
    where lse - lo > 20 + 87). Per-row gradient error against float64 at 1e-5 (6.4e-7 here; a window widened to 80
    gave 1.9e-2 and no test saw it: a mutation audit)."""
    g = torch.Generator().manual_seed(0)
    N, d, scale = 8, 16, 60.0
    img = torch.randn(N, d, generator=g, dtype=torch.float64)
    txt = torch.randn(N, d, generator=g, dtype=torch.float64)
    txt[:4] = img[0] + 0.01 * torch.randn(4, d, generator=g, dtype=torch.float64)
    for w in (1.0, 1e-26):
        weights = torch.full((N,), w, dtype=torch.float64)
        want = _weighted_clip_grads(img, txt, scale, weights, _naive_per_pair)
        got = _weighted_clip_grads(img.float(), txt.float(), scale, weights, cb.clip_loss)
        for x, y in zip(got, want):
            err = ((x - y).norm(dim=1) / y.norm(dim=1)).max().item()
            assert err < 1e-5, (w, err)


def test_rows_below_the_norm_clamp_follow_f_normalize():
    """Rows of norm below F.normalize's eps (1e-12) are divided by eps, not by their norm, and their Jacobian has no
    radial part: gradients as F.normalize's, float64 (a mutation audit: the clamped rows' Jacobian factor changed to
    inv^2 gave errors of 1e11 on gradients of 3e12, and no CLIP test saw it; info_nce had such a test)."""
    torch.manual_seed(0)
    N, d = 6, 5
    img, txt = torch.randn(N, d, dtype=torch.float64), torch.randn(N, d, dtype=torch.float64)
    img[2] *= 1e-13 / img[2].norm()
    txt[4] *= 3e-13 / txt[4].norm()
    weights = torch.ones(N, dtype=torch.float64)
    got = _weighted_clip_grads(img, txt, 5.0, weights, cb.clip_loss)
    want = _weighted_clip_grads(img, txt, 5.0, weights, _naive_per_pair)
    for x, y in zip(got, want):
        assert ((x - y).abs().max() / y.abs().max()).item() < 1e-12


def test_two_call_route_returns_the_promoted_dtype_of_mixed_features():
    # guards the two-call route's result dtype (no clip kernel: CUDA): the promoted dtype, as the kernel route
    g = torch.Generator().manual_seed(11)
    single, double = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g, dtype=torch.float64)
    for img, txt in ((single, double), (double, single)):
        want = cb.clip_loss(img, txt, 10.0, reduction="none")
        got = two_calls(img, txt, 10.0)
        assert want.dtype == got.dtype == torch.float64
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-6


def test_raw_op_loss_may_be_modified_in_place_before_backward():
    # guards clip_fwd's saved copy of its loss: the returned loss scaled in place, then backward (as F.cross_entropy)
    g = torch.Generator().manual_seed(12)
    img = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(9.0, dtype=torch.float64)
    w = torch.rand(2, 7, generator=g, dtype=torch.float64) + 0.5
    want = torch.autograd.grad((torch.ops.contrastbound.clip_fwd(img, txt, scale, True, False)[0] * w).sum(),
                               (img, txt))
    loss = torch.ops.contrastbound.clip_fwd(img, txt, scale, True, False)[0]
    loss.mul_(w)
    got = torch.autograd.grad(loss.sum(), (img, txt))
    for x, y in zip(got, want):
        assert torch.equal(x, y)


def _compensated_sum_case(N):
    """Features whose every logit tile is one-hot to float32 (gaps of 64 logit units or more), so each tile's product
    is exact and a gradient entry is a plain sum of one term per tile: a large term and small ones of 0.45 ulp of it.
    Summed in float32 with the large term first, each small one rounds away (0.9-1.8 ulp off in all); a compensated
    sum keeps them and gives the exact sum rounded once.

    Images i and texts j are rows of an N x N score table L (logits 64 L_ij, `normalize=False`): L_ii = 1 (each
    pair its own best), and two kinds of marked entries, each a tile's single term of a measured gradient entry:
    - texts' gradient: a marked text j gets, in every 256-image block b, one image with L_ij = 3 + 2b, whose
      feature N (free of the logits) carries the term; the measured entry is grad_text[j, N]. Each such image's
      and the text's softmax is one-hot on their marked logits (weights 0.5 or 1 with "sum").
    - images' gradient: a marked image i gets one text per 256-text tile (or per 512-text tile) with L_ij = 3 + 2c,
      the term in the text's feature N + 1; the measured entry is grad_image[i, N + 1].
    The large term is placed in the block (tile) that each summation order takes first: the wavefront backward
    (both gradients, N > 1024) starts text tile c at image block c and image block u at text tile u; the other
    forms start at the first block (tile). The images' own pass takes 512-text tiles, so an image with a marked text
    in every 256-text tile has two terms in one product there: those images (the last list) are measured only where
    the wavefront runs. Returns image, text, the scale and the measured rows: texts, images, wavefront images."""
    s = 64.0
    blocks = -(-N // 256)
    small = 0.45 * 2.0 ** -23
    img = torch.zeros(N, N + 2, dtype=torch.float64)
    txt = torch.zeros(N, N + 2, dtype=torch.float64)
    img[:, :N] = torch.eye(N, dtype=torch.float64)
    txt[:, :N] = torch.eye(N, dtype=torch.float64)

    def place(rows, cols, feature_side, first):
        """rows[k] x cols[k] get L = 3 + 2k; the term sits in feature_side's row (images' rows for the texts'
        gradient); the term at position `first` is 1 (in units of the measured entry), the others `small`."""
        values = [1.0 if k == first else small for k in range(len(rows))]
        top = len(rows) - 1  # the largest L: the measured row's own softmax peaks there (weight 0.5 + 0.5)
        for k, (r, c) in enumerate(zip(rows, cols)):
            img[r, c] = 3.0 + 2 * k
            weight = 1.0 if k == top else 0.5
            if feature_side == "image":
                img[r, N] = values[k] / (s * weight)          # grad_text[c, N] = sum_r W_rc s img[r, N]
            else:
                txt[c, N + 1] = values[k] / (s * weight)      # grad_image[r, N + 1] = s sum_c W_rc txt[c, N + 1]

    text_entries, image_entries, wave_entries = [], [], []
    for c in range(blocks):
        for variant, first in enumerate([c, 0]):  # wavefront order first, then the passes' order
            j = c * 256 + 200 + variant
            if j >= N:
                continue
            rows = [b * 256 + 10 + 2 * c + variant for b in range(blocks)]
            place(rows, [j] * blocks, "image", first)
            text_entries.append(j)
    for u in range(blocks):
        i = u * 256 + 100
        if i < N:  # one text per 256-text tile, the wavefront's order starting at tile u
            place([i] * blocks, [c * 256 + 120 + u for c in range(blocks)], "text", u)
            wave_entries.append(i)
        i = u * 256 + 101
        tiles = range(0, blocks, 2)  # one text per 512-text tile: the images' own pass sums those
        if i < N and len(tiles) >= 3:
            place([i] * len(tiles), [c * 256 + 140 + u for c in tiles], "text", 0)
            image_entries.append(i)
    return img, txt, s, text_entries, image_entries, wave_entries


@pytest.mark.parametrize("N", [1000, 1280])
@pytest.mark.parametrize("which", ["both", "images", "texts"])
def test_gradients_sum_their_tiles_with_compensation(N, which):
    """Every backward form (the wavefront beyond N = 1024, the one-pass form, each gradient's own pass) sums a
    gradient row's tile products with Kahan's compensation: on the exact-term case above, each measured entry is
    the exact float64 sum rounded once to float32, where a plain float32 sum in the same order is 0.9 ulp or more
    off (asserted on the terms, so the case does test something)."""
    img64, txt64, s, text_entries, image_entries, wave_entries = _compensated_sum_case(N)
    if which == "both" and N > 1024:
        image_entries = image_entries + wave_entries
    img = img64.float().requires_grad_(which in ("both", "images"))
    txt = txt64.float().requires_grad_(which in ("both", "texts"))
    cb.clip_loss(img, txt, s, normalize=False, reduction="sum", max_logit_scale=s).backward()
    i64, t64 = img64.clone().requires_grad_(), txt64.clone().requires_grad_()
    naive_clip(i64, t64, s, normalize=False).sum().backward()
    # The oracle's sums are exact: each is 1 + k small (at most 25 significant bits) plus terms below 1e-50.
    if which != "images":
        exact = t64.grad[text_entries, N]
        assert torch.equal(txt.grad[text_entries, N], exact.float()), (txt.grad[text_entries, N] - exact) / 2.0 ** -23
    if which != "texts":
        exact = i64.grad[image_entries, N + 1]
        assert torch.equal(img.grad[image_entries, N + 1], exact.float()), \
            (img.grad[image_entries, N + 1] - exact) / 2.0 ** -23
    # The case's point: a plain float32 sum of these terms, large first, is not the rounded exact sum.
    blocks = -(-N // 256)
    terms = [torch.tensor(1.0)] + [torch.tensor(0.45 * 2.0 ** -23)] * (blocks - 1)
    plain = torch.tensor(0.0)
    for t in terms:  # float32 tensors: float32 additions
        plain = plain + t
    assert plain != torch.tensor(sum(float(t) for t in terms), dtype=torch.float64).float()


BACKWARD_MEMORY_SCRIPT = PEAK_RSS_HELPERS + textwrap.dedent(
    """
    import json
    import torch
    import contrastbound as cb

    torch.set_num_threads(2)
    N, d = 4096, 1024  # (beyond the one-pass size: the wavefront backward)
    torch.manual_seed(0)
    image, text = torch.randn(N, d, requires_grad=True), torch.randn(N, d, requires_grad=True)
    for _ in range(2):  # (the second call's: the first one's one-off costs apart)
        image.grad = text.grad = None
        loss = cb.clip_loss(image, text, 0.1)
        reset_hwm()
        base = hwm_mib()
        loss.backward()
        copies = (hwm_mib() - base) / (N * d * 4 / 2 ** 20)
    print(json.dumps({"copies": copies}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not _backend.HAS_CPU_KERNEL, reason="compiled CPU kernel not loaded")
def test_backward_memory_in_copies_of_an_input():
    # Both gradients of float32 features, in (N, d) float32 copies beyond what forward left: the unit rows (2), the
    # gradients (2) and their Kahan compensations (2) are needed: 6.3 measured here (2026-12-08; the threads' tiles
    # the rest), 6.1 at N = 8192, d = 4096. The gradients were formed in buffers of their own and copied out, and the
    # positives' terms added through whole-size temporaries: 8.0 here, and at N = 8192, d = 4096 (an audit's case).
    r = child_json(BACKWARD_MEMORY_SCRIPT)
    assert r["copies"] < 6.6, r
