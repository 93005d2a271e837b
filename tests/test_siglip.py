"""siglip_loss (SigLIP's pairwise sigmoid loss) against the materialised reference: values and gradients (features,
logit scale, logit bias), both paths of the op (CPU work units; the in-order tiles other devices take), opcheck,
gradcheck, dtypes, torch.compile, torch.func, bad input, memory."""

from __future__ import annotations

import math
import textwrap
import warnings

import pytest
import torch

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None

import contrastbound as cb
from contrastbound import _backend
from contrastbound.reference import siglip_reference

from conftest import DEVICES, PEAK_RSS_HELPERS, as_float, assert_close_scaled, child_json, tol

# Tests of the op itself; the others run on the fallback too (a build without the extension,
# CONTRASTBOUND_TEST_FALLBACK=1), as the rest of the suite does.
needs_op = pytest.mark.skipif(not _backend.HAS_SIGLIP_KERNEL, reason="the extension has no siglip op")

# Sizes around the CPU op's work units (256 image rows, tiles of 512 texts): one row, odd sizes, several units
# and tiles (N = 1100: 5 row blocks, 3 text tiles).
# 257: the pair (256, 256) falls in the last column of its tile (rows from 256, a 257-wide tile), which the pairs'
# zeroing must reach (one column short, the loss was 1.4e-2 off and every other shape passed)
SHAPES = [(1, 4), (2, 1), (5, 3), (67, 7), (257, 8), (300, 9), (1100, 3)]


def _pair(n, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)  # pairs related: positive logits larger
    return x.to(dtype).requires_grad_(), y.to(dtype).requires_grad_()


def _scalars(learnable, scale=7.0, bias=-4.0):
    if not learnable:
        return scale, bias
    return (torch.tensor(scale, dtype=torch.float64, requires_grad=True),
            torch.tensor(bias, dtype=torch.float64, requires_grad=True))


def _loss_and_grads(fn, x, y, s, b, **kw):
    loss = fn(x, y, s, b, **kw)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    leaves = [x, y] + [v for v in (s, b) if isinstance(v, torch.Tensor)]
    return loss, torch.autograd.grad(loss, leaves, upstream.to(loss.dtype))


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("learnable", [False, True])
def test_matches_the_reference(n, d, normalize, reduction, learnable):
    x, y = _pair(n, d, seed=n)
    s, b = _scalars(learnable)
    got = _loss_and_grads(cb.siglip_loss, x, y, s, b, normalize=normalize, reduction=reduction)
    want = _loss_and_grads(siglip_reference, x, y, s, b, normalize=normalize, reduction=reduction)
    assert got[0].shape == want[0].shape == ({"none": (n,)}.get(reduction, ()))
    assert_close_scaled(got[0], want[0], 1e-13, "loss")
    for name, g, w in zip(["image", "text", "logit_scale", "logit_bias"], got[1], want[1]):
        assert_close_scaled(g, w, 1e-12, f"grad {name}")


@needs_op
@pytest.mark.parametrize("tile", [1, 7, 1000, 1 << 24])
def test_the_in_order_path_other_devices_take(monkeypatch, tile):
    # CUDA tensors take the op's in-order tiles (the scale and bias as device tensors, both gradients from one
    # recomputation); CONTRASTBOUND_SIGLIP_SEQUENTIAL=1 sends CPU tensors there too, tiles of `tile` logits
    monkeypatch.setenv("CONTRASTBOUND_SIGLIP_SEQUENTIAL", "1")
    monkeypatch.setenv("CONTRASTBOUND_SIGLIP_TILE_LOGITS", str(tile))
    x, y = _pair(67, 5, seed=3)
    s, b = _scalars(True)
    got = _loss_and_grads(cb.siglip_loss, x, y, s, b, reduction="none")
    want = _loss_and_grads(siglip_reference, x, y, s, b, reduction="none")
    assert_close_scaled(got[0], want[0], 1e-13, "loss")
    for name, g, w in zip(["image", "text", "logit_scale", "logit_bias"], got[1], want[1]):
        assert_close_scaled(g, w, 1e-12, f"grad {name}")


@needs_op
@pytest.mark.parametrize("B, M", [(300, 1500), (700, 2000), (600, 1000), (1100, 1100), (1100, 600 + 1100)])
@pytest.mark.parametrize("mask", [(True, True, True, True), (False, True, False, False), (True, False, True, True),
                                  (False, True, True, False)])
def test_the_op_backward_with_more_texts_than_images(B, M, mask):
    # The op's backward against its formula (siglip.cpp's header) from the B x M logits, texts past row B without
    # a positive (other ranks' texts under process_group): units of 256 rows in every proportion, with both
    # gradients in the wavefront (600 x 1000: 3 units against 4 text tiles; 1100 x 1100: 5 and 5; 1100 x 1700: 5
    # and 7) or in two passes (300 x 1500: 2 and 6; 700 x 2000: 3 and 8: too many texts), and one gradient alone
    g = torch.Generator().manual_seed(B + M)
    x, y = torch.randn(B, 6, generator=g, dtype=torch.float64), torch.randn(M, 6, generator=g, dtype=torch.float64)
    s, b = torch.tensor(2.5, dtype=torch.float64), torch.tensor(-1.5, dtype=torch.float64)
    grad = torch.rand(B, generator=g, dtype=torch.float64)
    w = grad[:, None] * torch.sigmoid(s * x @ y.T + b)
    w[torch.arange(B), torch.arange(B)] = 0.0
    want = [s * w @ y, s * w.T @ x, (w * (x @ y.T)).sum(), w.sum()]
    got = torch.ops.contrastbound.siglip_bwd(grad, x, y, s, b, list(mask))
    for name, needed, gv, wv in zip(["image", "text", "logit_scale", "logit_bias"], mask, got, want):
        if needed:
            assert_close_scaled(gv.reshape(wv.shape), wv, 1e-12, f"grad {name}")
        else:
            assert gv.numel() == 0, name


@needs_op
def test_same_bits_with_any_thread_count():
    # the CPU op's work units depend on the sizes only (N = 1100: 5 image-row units and 5 text tiles, in backward's
    # wavefront order)
    x, y = _pair(1100, 33, seed=4, dtype=torch.float32)
    s, b = _scalars(True)

    def run():
        xs, ys = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
        ss, bs = s.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        loss = cb.siglip_loss(xs, ys, ss, bs, reduction="none")
        loss.sum().backward()
        return [loss.detach(), xs.grad, ys.grad, ss.grad, bs.grad]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(3)
        three = run()
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(one, three):
        assert torch.equal(a, c)


def test_gradcheck_float64():
    x, y = _pair(6, 3, seed=5)
    s, b = _scalars(True, 3.0, -1.0)
    assert torch.autograd.gradcheck(lambda *a: cb.siglip_loss(*a, reduction="none"), (x, y, s, b),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda *a: cb.siglip_loss(*a, normalize=False), (x, y, s, b),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_op
def test_opcheck():
    g = torch.Generator().manual_seed(6)
    for n, m, d, dtype in [(5, 5, 3, torch.float32), (4, 9, 2, torch.float64), (3, 3, 6, torch.bfloat16),
                           (0, 2, 3, torch.float32)]:
        x = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
        y = torch.randn(m, d, generator=g).to(dtype).requires_grad_()
        s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(-2.0, requires_grad=True)
        torch.library.opcheck(torch.ops.contrastbound.siglip_fwd.default, (x, y, s, b))
        grad = torch.rand(n, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        for mask in ([True, True, True, True], [True, False, False, True], [False, True, True, False]):
            torch.library.opcheck(torch.ops.contrastbound.siglip_bwd.default,
                                  (grad, x.detach(), y.detach(), s.detach(), b.detach(), mask))


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 8e-3), (torch.float16, 1.5e-3)])
def test_half_features_per_pair_losses_keep_float32_accumulation(dtype, tol):
    # Each row's loss (reduction="none") from half features, against float64 on the same rounded inputs: the
    # normalisation and logits in float32 keep it near the half type's rounding of the result (bfloat16 2.7e-3,
    # float16 3.4e-4 relative); in the half type itself 4.6e-2 and 6.1e-3 (a mutation audit: the "mean" loss of the
    # dtype test hid the per-row error).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    y = x + 0.05 * torch.randn(64, 32, generator=g)
    x, y = x.to(dtype), y.to(dtype)
    got = cb.siglip_loss(x, y, 10.0, -10.0, reduction="none")
    want = siglip_reference(x.double(), y.double(), 10.0, -10.0, reduction="none")
    err = float((got.double() - want).norm() / want.norm())
    assert err < tol, err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtypes_against_float64(device, dtype):
    # the same rounded inputs in float64: within each dtype's tolerance (float32 accumulation for half inputs)
    x, y = _pair(90, 16, seed=7, dtype=dtype)
    x, y = x.detach().to(device).requires_grad_(), y.detach().to(device).requires_grad_()
    wide = torch.float64 if dtype == torch.float64 else torch.float32  # (a parameter's usual dtype)
    s = torch.tensor(10.0, dtype=wide, device=device, requires_grad=True)
    b = torch.tensor(-10.0, dtype=wide, device=device, requires_grad=True)
    got = cb.siglip_loss(x, y, s, b)
    leaves = [v.detach().double().requires_grad_() for v in (x, y, s, b)]
    want = siglip_reference(*leaves)
    assert got.dtype == dtype
    assert_close_scaled(got.double(), want, tol(dtype, device), "loss")
    for name, g, w in zip(["image", "text", "logit_scale", "logit_bias"], torch.autograd.grad(got, [x, y, s, b]),
                          torch.autograd.grad(want, leaves)):
        assert_close_scaled(g.double(), w, tol(dtype, device), f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_many_tiles_against_float64(device):
    # N = 4500: 2.0e7 logits, more than one tile of the in-order path (2^24) on a GPU, 18 x 9 units on the CPU;
    # float32 on the device against the CPU op in float64 (itself checked against the reference above), learnable
    # scale and bias on the device
    x, y = _pair(4500, 16, seed=18, dtype=torch.float32)
    s = torch.tensor(10.0, device=device, requires_grad=True)
    b = torch.tensor(-10.0, device=device, requires_grad=True)
    xd, yd = x.detach().to(device).requires_grad_(), y.detach().to(device).requires_grad_()
    got = cb.siglip_loss(xd, yd, s, b)
    leaves = [v.detach().cpu().double().requires_grad_() for v in (xd, yd, s, b)]
    want = cb.siglip_loss(*leaves)
    assert_close_scaled(got.double().cpu(), want, 1e-5, "loss")
    for name, g, w in zip(["image", "text", "logit_scale", "logit_bias"], torch.autograd.grad(got, [xd, yd, s, b]),
                          torch.autograd.grad(want, leaves)):
        assert_close_scaled(g.double().cpu(), w, 1e-4, f"grad {name}")


def test_confident_pairs_keep_their_accuracy_in_float32():
    # orthonormal images, each text a near copy of its image, scale 50, bias -20: the negative logits ~ -20
    # (softplus ~ e^-20 each), the positive ones ~ 30 (e^-30): the float32 loss stays within 1e-5 relative of
    # float64, where log(1 + e^l) in float32 gives 0 (1 + 2e-9 rounds to 1)
    g = torch.Generator().manual_seed(8)
    x = torch.eye(32, 64, dtype=torch.float64)
    y = x + 1e-3 * torch.randn(32, 64, generator=g, dtype=torch.float64)
    x, y = x.float().double(), y.float().double()
    want = siglip_reference(x, y, 50.0, -20.0, reduction="none")
    got = cb.siglip_loss(x.float(), y.float(), 50.0, -20.0, reduction="none")
    assert (0 < want).all() and (want < 1e-6).all()
    z = 2.0 * torch.eye(32) - 1.0
    naive = torch.log(1 + torch.exp(-z * (50.0 * (x.float() @ y.float().T) - 20.0))).sum()
    assert naive < 1e-7 < float(want.sum())  # (how plain float32 would lose it)
    assert_close_scaled(got.double(), want, 1e-5, "loss")


def test_torch_compile_fullgraph():
    # learnable scale and bias through the op (one graph), and a float scale schedule without a graph per value
    x, y = _pair(40, 8, seed=9, dtype=torch.float32)
    s = torch.tensor(5.0, requires_grad=True)
    b = torch.tensor(-3.0, requires_grad=True)
    compiled = torch.compile(lambda *a: cb.siglip_loss(*a), fullgraph=True)
    got, want = compiled(x, y, s, b), cb.siglip_loss(x, y, s, b)
    assert_close_scaled(got, want, 1e-6, "loss")
    for name, g, w in zip(["image", "text", "logit_scale", "logit_bias"], torch.autograd.grad(got, [x, y, s, b]),
                          torch.autograd.grad(want, [x, y, s, b])):
        assert_close_scaled(g, w, 1e-5, f"grad {name}")
    torch._dynamo.reset()
    frames = []
    counted = torch.compile(lambda x_, t: cb.siglip_loss(x_, y, t, -2.0), fullgraph=True,
                            backend=lambda gm, ex: frames.append(gm) or gm.forward)
    for t in (5.0, 6.0, 7.5, 9.0):
        assert_close_scaled(counted(x, t), cb.siglip_loss(x, y, t, -2.0), 1e-6, f"scale {t}")
    assert len(frames) <= 2, len(frames)
    torch._dynamo.reset()


def test_torch_func_takes_the_reference():
    # grad (the op has no forward derivative: the reference serves differentiating transforms) and vmap (the op
    # per sample, torch's batching fallback)
    x, y = (v.detach() for v in _pair(7, 4, seed=10))
    got = torch.func.grad(lambda a: cb.siglip_loss(a, y, 5.0, -2.0))(x)
    leaf = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(siglip_reference(leaf, y, 5.0, -2.0), leaf)
    assert_close_scaled(got, want, 1e-12, "torch.func.grad")
    biases = torch.tensor([-1.0, -2.0, -5.0], dtype=torch.float64)
    got = torch.vmap(lambda b: cb.siglip_loss(x, y, 5.0, b))(biases)
    want = torch.stack([siglip_reference(x, y, 5.0, b) for b in biases])
    assert_close_scaled(got, want, 1e-12, "vmap over biases")


def test_fallback_without_the_op_matches(monkeypatch):
    x, y = _pair(30, 5, seed=11)
    s, b = _scalars(True)
    want = _loss_and_grads(cb.siglip_loss, x, y, s, b, reduction="none")
    monkeypatch.setattr(_backend, "HAS_SIGLIP_KERNEL", False)
    got = _loss_and_grads(cb.siglip_loss, x, y, s, b, reduction="none")
    assert_close_scaled(got[0], want[0], 1e-13, "loss")
    for g, w in zip(got[1], want[1]):
        assert_close_scaled(g, w, 1e-12, "grad")


def test_flop_counter_counts_the_useful_work():
    # FlopCounterMode: forward and backward as naive PyTorch's x @ y.T and its two gradient products, 6 N^2 d
    from torch.utils.flop_counter import FlopCounterMode

    x, y = _pair(50, 8, seed=19, dtype=torch.float32)
    counts = []
    for fn in (cb.siglip_loss, lambda a, b: siglip_reference(a, b, 10.0, -10.0)):
        with FlopCounterMode(display=False) as counter:
            fn(x, y).backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 6 * 50 * 50 * 8


@needs_op
def test_double_backward_is_refused():
    x, y = _pair(5, 3, seed=12)
    with pytest.raises(RuntimeError, match="double backward is not supported.*siglip_reference"):
        torch.autograd.grad(cb.siglip_loss(x, y), x, create_graph=True)


@needs_op  # (the fallback's forward is checked at the end; its backward inside autocast follows autocast, as torch's)
@pytest.mark.parametrize("in_order", [False, True])
def test_autocast_keeps_float32_logits(monkeypatch, in_order):
    # (a review's find) the op is CompositeExplicitAutograd: under torch.autocast its own products ran in bfloat16
    # (forward 5e-4 off float64) and backward's float32 accumulations met bfloat16 tiles (a RuntimeError). Now the
    # same values and gradients as without autocast, on both paths, backward inside the autocast region too
    if in_order:
        monkeypatch.setenv("CONTRASTBOUND_SIGLIP_SEQUENTIAL", "1")
    x, y = _pair(64, 32, seed=16, dtype=torch.float32)
    want = cb.siglip_loss(x, y, 10.0, 0.0)
    (want_grad,) = torch.autograd.grad(want, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cb.siglip_loss(x, y, 10.0, 0.0)
        (got_grad,) = torch.autograd.grad(got, x)
    assert got.dtype == torch.float32
    assert_close_scaled(got, want, 1e-6, "loss")
    assert_close_scaled(got_grad, want_grad, 1e-6, "grad")
    monkeypatch.setattr(_backend, "HAS_SIGLIP_KERNEL", False)  # the fallback's forward: float32 logits too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fallback = cb.siglip_loss(x, y, 10.0, 0.0)
    assert_close_scaled(fallback, want, 1e-6, "loss through the fallback")


def test_bad_scale_or_bias_values_outside_eager_mode():
    # under torch.compile an in-graph assert, as for a temperature; a GPU value is never read back: NaN loss there
    # (the poisoning is device-independent code, checked here on CPU tensors)
    from contrastbound.functional import _poison_bad_siglip_scalars

    x, y = (v.detach().float() for v in _pair(6, 3, seed=17))
    compiled = torch.compile(lambda a, b, s, c: cb.siglip_loss(a, b, s, c), fullgraph=True)
    with pytest.raises(Exception, match="logit_scale must be a positive finite number"):
        compiled(x, y, torch.tensor(-10.0), torch.tensor(0.0))
    with pytest.raises(Exception, match="logit_bias must be a finite number"):
        compiled(x, y, torch.tensor(10.0), torch.tensor(float("inf")))
    torch._dynamo.reset()
    s, b = _poison_bad_siglip_scalars(torch.tensor([-1.0, 2.0, float("inf")]), torch.tensor([0.0, -float("inf"), 1.0]))
    assert torch.isnan(s[0]) and s[1] == 2.0 and torch.isnan(s[2])
    assert b[0] == 0.0 and torch.isnan(b[1]) and b[2] == 1.0


def test_small_batches():
    # N = 1: its one pair, no negatives; N = 0: a mean of nothing is NaN as torch's mean, the sum 0
    x, y = _pair(1, 3, seed=13)
    assert_close_scaled(cb.siglip_loss(x, y, 4.0, -1.0), siglip_reference(x, y, 4.0, -1.0), 1e-15, "N = 1")
    empty = torch.zeros(0, 3)
    assert cb.siglip_loss(empty, empty, reduction="sum").item() == 0.0
    assert cb.siglip_loss(empty, empty, reduction="none").shape == (0,)
    assert torch.isnan(cb.siglip_loss(empty, empty)) and torch.isnan(siglip_reference(empty, empty))


@pytest.mark.parametrize("call,exc,text", [
    (lambda: cb.siglip_loss(torch.randn(4, 3), torch.randn(5, 3)), ValueError,
     "text_features must have the shape of image_features (B, d) = (4, 3), got (5, 3)"),
    (lambda: cb.siglip_loss(torch.randn(4), torch.randn(4)), ValueError, "image_features must have shape (B, d)"),
    (lambda: cb.siglip_loss(torch.ones(4, 3, dtype=torch.int64), torch.ones(4, 3)), TypeError,
     "image_features must be a floating tensor"),
    (lambda: cb.siglip_loss(torch.randn(4, 3), torch.randn(4, 3, device="meta")), ValueError,
     "text_features is on meta but image_features is on cpu"),
    (lambda: cb.siglip_loss(torch.randn(4, 3), torch.randn(4, 3), 0.0), ValueError,
     "logit_scale must be a positive finite number, got 0.0"),
    (lambda: cb.siglip_loss(torch.randn(4, 3), torch.randn(4, 3), torch.tensor(-1.0)), ValueError,
     "logit_scale must be a positive finite number, got -1.0"),
    (lambda: cb.siglip_loss(torch.randn(4, 3), torch.randn(4, 3), torch.ones(2)), ValueError,
     "logit_scale must be a positive finite scalar: a number or a floating tensor with one element"),
    # (a review's finds: a meta scale reached a copy's error, or, given to the op, its fake kernel's empty output)
    (lambda: cb.siglip_loss(torch.randn(4, 3), torch.randn(4, 3), torch.tensor(10.0, device="meta")), ValueError,
     "logit_scale is a meta tensor (no value) but the features are on cpu"),
    (lambda: cb.siglip_loss(torch.randn(4, 3), torch.randn(4, 3), 10.0, torch.tensor(0.0, device="meta")),
     ValueError, "logit_bias is a meta tensor (no value) but the features are on cpu"),
    (lambda: cb.SigLIP(10.0, 1e39), ValueError, "SigLIP learns log(logit_scale) and logit_bias in torch.float32"),
    (lambda: cb.siglip_loss(torch.randn(4, 3), torch.randn(4, 3), "10"), TypeError, "logit_scale must be"),
    (lambda: cb.siglip_loss(torch.randn(4, 3), torch.randn(4, 3), 10.0, float("nan")), ValueError,
     "logit_bias must be a finite number, got nan"),
    (lambda: cb.siglip_loss(torch.randn(4, 3), torch.randn(4, 3), 10.0, torch.tensor(float("inf"))), ValueError,
     "logit_bias must be a finite number, got inf"),
    (lambda: cb.siglip_loss(torch.randn(4, 3), torch.randn(4, 3), 10.0, torch.tensor(1)), ValueError,
     "logit_bias must be a finite number or a floating tensor with one element, got a torch.int64"),
    (lambda: cb.siglip_loss(torch.randn(4, 3), torch.randn(4, 3), reduction="avg"), ValueError, "reduction"),
    # past float32's range for features computed in float32: inf there, a NaN loss (an audit's find)
    (lambda: cb.siglip_loss(torch.eye(2), torch.eye(2), 1e39, -1.0), ValueError,
     "logit_scale must be below 3.4028236e.38 in magnitude for features computed in float32 (torch.float32)"),
    (lambda: cb.siglip_loss(torch.eye(2).bfloat16(), torch.eye(2).bfloat16(), torch.tensor(1e39, dtype=torch.float64)),
     ValueError, "logit_scale must be below 3.4028236e.38 in magnitude"),
    (lambda: cb.siglip_loss(torch.eye(2), torch.eye(2), 10.0, torch.tensor(-1e39, dtype=torch.float64)), ValueError,
     "logit_bias must be below 3.4028236e.38 in magnitude"),
    # the boundary itself: 2^128 - 2^103 is the smallest magnitude float32 rounds to inf (a mutation audit's gap)
    (lambda: cb.siglip_loss(torch.eye(2), torch.eye(2), 1.0, -(2.0**128 - 2.0**103)), ValueError,
     "logit_bias must be below 3.4028236e.38 in magnitude"),
    (lambda: cb.siglip_loss(torch.randn(4, 3), torch.randn(4, 3), normalize=1), TypeError, "normalize"),
])
def test_bad_input_is_refused_by_name(call, exc, text):
    with pytest.raises(exc, match=text.replace("(", "\\(").replace(")", "\\)")):
        call()


def test_float64_scale_and_bias_past_float32_range():
    # FLT_MAX itself fits (3.4028235e38 rounds to it); under torch.compile the check is an assert in the graph (it
    # was skipped there: the loss came out inf, a review's find)
    x, y = torch.eye(3), torch.eye(3)
    assert torch.isfinite(cb.siglip_loss(x, y, 3.4028235e38, -1.0))
    # ... and so does the largest float64 below 2^128 - 2^103 (float32 rounds it to FLT_MAX; the value itself is
    # refused, test_bad_input_is_refused_by_name)
    import math

    assert torch.isfinite(cb.siglip_loss(x, y, math.nextafter(2.0**128 - 2.0**103, 0.0), -1.0))
    compiled = torch.compile(cb.siglip_loss, backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match="logit_scale must be below"):
        compiled(x, y, torch.tensor(1e39, dtype=torch.float64), torch.tensor(-1.0))
    with pytest.raises(RuntimeError, match="logit_bias must be below"):
        compiled(x, y, torch.tensor(10.0), torch.tensor(-1e39, dtype=torch.float64))
    assert torch.isfinite(compiled(x, y, torch.tensor(10.0, dtype=torch.float64), torch.tensor(-1.0)))


@needs_op
def test_the_op_refuses_bad_input_by_name():
    ops = torch.ops.contrastbound
    with pytest.raises(ValueError, match="text must be \\(M, d\\) with M >= B"):
        ops.siglip_fwd(torch.randn(4, 3), torch.randn(3, 3), torch.tensor(1.0), torch.tensor(0.0))
    with pytest.raises(ValueError, match="scale is on the meta device"):  # (its fake kernel's output otherwise)
        ops.siglip_fwd(torch.randn(4, 3), torch.randn(4, 3), torch.tensor(1.0, device="meta"), torch.tensor(0.0))


if given is not None:

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(n=st.integers(1, 40), d=st.integers(1, 9), scale=st.floats(0.1, 30.0), bias=st.floats(-15.0, 5.0),
           normalize=st.booleans(), seed=st.integers(0, 2**31 - 1))
    def test_property_matches_the_reference(n, d, scale, bias, normalize, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
        y = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
        got = cb.siglip_loss(x, y, scale, bias, normalize=normalize)
        want = siglip_reference(x, y, scale, bias, normalize=normalize)
        # the loss is a sum of n terms per row, each of a logit's size at most
        norms = torch.cat([x.detach(), y.detach()]).norm(dim=1)
        logit = scale * (1.0 if normalize else norms.max().item() ** 2) + abs(bias)
        assert_close_scaled(got, want, 1e-12, "loss", floor=logit)
        slope = scale * (1.0 / norms.min().item() if normalize else norms.max().item())
        for v, name in ((x, "image"), (y, "text")):
            (gv,), (wv,) = torch.autograd.grad(got, v, retain_graph=True), torch.autograd.grad(want, v,
                                                                                             retain_graph=True)
            assert_close_scaled(gv, wv, 1e-11, f"grad {name}", floor=slope)

    @settings(max_examples=30, deadline=None)
    @given(n=st.integers(1, 600), d=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
    def test_property_symmetric_and_permutation_equivariant(n, d, seed):
        # the sum over all pairs does not care which side is the image (l_ij(x, y) = l_ji(y, x)), and permuting
        # the pairs permutes the rows' losses: what a misplaced diagonal (a pair counted as a negative, across the
        # op's 256-row units and 512-row tiles) or a row written by the wrong unit would break
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        y = torch.randn(n, d, generator=g, dtype=torch.float64)
        total = cb.siglip_loss(x, y, 8.0, -5.0, reduction="sum")
        assert_close_scaled(cb.siglip_loss(y, x, 8.0, -5.0, reduction="sum"), total, 1e-12, "swapped sides")
        perm = torch.randperm(n, generator=g)
        rows = cb.siglip_loss(x, y, 8.0, -5.0, reduction="none")
        assert_close_scaled(cb.siglip_loss(x[perm], y[perm], 8.0, -5.0, reduction="none"), rows[perm], 1e-12,
                            "permuted pairs")


MEMORY_SCRIPT = PEAK_RSS_HELPERS + textwrap.dedent(
    """
    import json
    import torch
    import contrastbound as cb

    N, d = 2 ** 13, 32
    torch.manual_seed(0)
    x, y = torch.randn(N, d, requires_grad=True), torch.randn(N, d, requires_grad=True)
    s, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)

    w = torch.randn(64, d, requires_grad=True)
    cb.siglip_loss(w, w.detach() + 1, s, b).backward()  # first-use costs (code pages, thread pool) apart
    reset_hwm()
    base = hwm_mib()
    cb.siglip_loss(x, y, s, b).backward()
    print(json.dumps({"extra_mib": hwm_mib() - base, "matrix_mib": N * N * 4 / 2 ** 20}))
    """
)


@needs_op
@pytest.mark.slow
def test_memory_is_far_below_the_logits():
    # N = 2^13 pairs: the N x N logits alone take 256 MiB (naive PyTorch holds several such); the op keeps O(N d)
    # beside its tiles (2 threads: 13 MiB at N = 2^12, 21 MiB at 2^14, measured 2026-12-01)
    r = child_json(MEMORY_SCRIPT)
    assert r["extra_mib"] < r["matrix_mib"] / 8, r


def test_module_learns_scale_and_bias():
    # the parameters (log scale from log 10, bias from -10) get the fused op's gradients: those of the reference
    torch.manual_seed(0)
    module = cb.SigLIP()
    assert sorted(module.state_dict()) == ["log_logit_scale", "logit_bias"]
    x, y = _pair(12, 6, seed=14, dtype=torch.float32)
    module(x, y).backward()
    log_t = torch.tensor(torch.log(torch.tensor(10.0)).item(), requires_grad=True)
    b = torch.tensor(-10.0, requires_grad=True)
    want = siglip_reference(x.detach(), y.detach(), log_t.exp(), b)
    want.backward()
    assert_close_scaled(module.log_logit_scale.grad, log_t.grad, 1e-5, "log scale")
    assert_close_scaled(module.logit_bias.grad, b.grad, 1e-5, "bias")
    torch.optim.SGD(module.parameters(), lr=0.5).step()
    assert float(module.logit_scale.detach()) != 10.0 and float(module.logit_bias.detach()) != -10.0
    module.reset_parameters()
    assert float(module.logit_scale.detach()) == pytest.approx(10.0) and float(module.logit_bias.detach()) == -10.0
    fixed = cb.SigLIP(5.0, -2.0, learnable=False, reduction="sum")
    assert list(fixed.state_dict()) == [] and "learnable=False" in repr(fixed)
    assert fixed.logit_scale == 5.0 and fixed.logit_bias == -2.0
    assert_close_scaled(fixed(x, y), siglip_reference(x, y, 5.0, -2.0, reduction="sum"), 1e-6, "fixed")
    with pytest.raises(ValueError, match="logit_scale must be a positive finite number"):
        cb.SigLIP(-1.0)
    with pytest.raises(TypeError, match="SigLIP takes logit_scale and logit_bias as numbers"):
        cb.SigLIP(torch.tensor(3.0))


def test_module_refuses_a_cast_that_overflows_its_bias():
    # an audit's: SigLIP(10, 1e5).half() stored the bias as float16 inf, and the next forward refused "logit_bias
    # inf", a value the user never gave. The cast is refused now, the module left as it was; a bias within the
    # narrower range, a widening cast, bfloat16 (float32's range), to_empty and a meta module cast as before
    import warnings

    module = cb.SigLIP(10.0, 1e5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (float() of the parameter itself warned before the ValueError)
        with pytest.raises(ValueError, match=r"logit_bias 100000 is beyond float16's range.*left in torch.float32"):
            module.half()
    assert module.logit_bias.dtype == module.log_logit_scale.dtype == torch.float32
    assert as_float(module.logit_bias) == 1e5
    assert as_float(cb.SigLIP(10.0, 1e5).bfloat16().logit_bias) == pytest.approx(1e5, rel=1e-2)
    assert cb.SigLIP(10.0, 1e5).double().logit_bias.dtype == torch.float64
    assert as_float(cb.SigLIP(10.0, 6e4).half().logit_bias) == pytest.approx(6e4, rel=1e-3)
    assert cb.SigLIP(10.0, 1e5).to("meta").half().logit_bias.dtype == torch.float16
    empty = cb.SigLIP(10.0, 1e5).to_empty(device="cpu")
    empty.reset_parameters()
    assert as_float(empty.logit_bias) == 1e5
    # a meta module cast to float16 has no value to check; its reset_parameters (FSDP's deferred initialisation)
    # refuses to store the bias as inf instead (a review's find)
    deferred = cb.SigLIP(10.0, 1e5).to("meta").half().to_empty(device="cpu")
    with pytest.raises(ValueError, match=r"logit_bias in torch.float16: its initial value 100000"):
        deferred.reset_parameters()


def test_learnable_module_refuses_a_scale_its_forward_would_refuse():
    # an audit's: SigLIP(learnable=True) took a logit_scale below siglip_loss's floor for a float32 tensor scale
    # (2.94e-39, as clip_loss's) at construction, by its setter and by load_state_dict, and the next forward refused
    # a value the user never gave (1.00001e-40 for 1e-40). Refused where it is given now, as ClipLoss does.
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"logit_scale 1e-40 \(stored as 1.00001e-40, from 2.94e-39\)"):
        cb.SigLIP(logit_scale=1e-40)
    m = cb.SigLIP()
    with pytest.raises(ValueError, match=r"from 2.94e-39; .double\(\) the module"):
        m.logit_scale = 1e-40
    with pytest.raises(RuntimeError, match=r"log_logit_scale -92 .* reads back in torch.float32 as 1.1089"):
        m.load_state_dict({"log_logit_scale": torch.tensor(-92.0), "logit_bias": torch.tensor(-10.0)})
    assert float(m.logit_scale.detach()) == pytest.approx(10.0, rel=1e-6)  # left as it was
    # in float64 the floor is float64's, the fixed module's number has none: both run
    wide = cb.SigLIP(logit_scale=1.0).double()
    wide.logit_scale = 1e-40
    assert torch.isfinite(wide(x.double(), y.double()))
    assert torch.isfinite(cb.SigLIP(1e-40, learnable=False)(x, y))


@pytest.mark.parametrize("bad", [torch.tensor(1.0 + 2.0j), torch.tensor(True)])
def test_modules_refuse_a_complex_or_bool_parameter_in_a_state(bad):
    # A misuse audit: a complex log_temperature loaded with its imaginary part dropped (torch's warning only) and a
    # bool one as 1.0; now a load error naming it, the module left as it was.
    for module, name, keep in ((cb.InfoNCE(0.2, learn_temperature=True), "log_temperature", "temperature"),
                               (cb.SigLIP(), "logit_bias", "logit_bias"), (cb.ClipLoss(), "log_logit_scale", "logit_scale")):
        before = float(getattr(module, keep).detach())
        state = {**module.state_dict(), name: bad}
        with pytest.raises(RuntimeError, match=f"{name} must be a real number, got a {bad.dtype} tensor; nothing was "
                                               "loaded"):
            module.load_state_dict(state)
        assert float(getattr(module, keep).detach()) == before


def test_clip_module_moved_to_a_complex_dtype_names_its_logit_scale():
    # ClipLoss().to(torch.complex64) failed in forward with torch's "clamp is not supported for complex types" (a
    # misuse audit); InfoNCE and SigLIP named their parameter already.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's "Complex modules are a new feature" warning)
        module = cb.ClipLoss().to(torch.complex64)
    with pytest.raises(TypeError, match="logit_scale must be a real floating tensor: log_logit_scale is a "
                                        "torch.complex64 parameter"):
        module(torch.randn(4, 3), torch.randn(4, 3))


def test_modules_refuse_a_state_their_dtype_cannot_hold():
    # an audit's: a float32 state loaded into a .half() module stored SigLIP's bias -1e6 as -inf (the cast and the
    # setter refuse it, the load took it), and the next forward refused a value the user never gave; so did a scale
    # or temperature whose exp reads back as inf or 0 there. Refused now, the module left as it was; a state within
    # range, a ClipLoss scale its forward clamps anyway, and non-finite values (torch's to load) load as before.
    half = cb.SigLIP().half()
    for state, text in (({"log_logit_scale": torch.tensor(2.3), "logit_bias": torch.tensor(-1e6)},
                         r"logit_bias -1e\+06 is stored in torch.float16 as -inf"),
                        ({"log_logit_scale": torch.tensor(20.0), "logit_bias": torch.tensor(-10.0)},
                         r"log_logit_scale 20 \(exp: 4.85165e\+08\) reads back in torch.float16 as inf")):
        with pytest.raises(RuntimeError, match=f"SigLIP \\(top level\\): {text}.*nothing was loaded"):
            half.load_state_dict(state)
        assert float(half.logit_bias.detach()) == -10.0
        assert float(half.logit_scale.detach()) == pytest.approx(10.0, rel=1e-3)
    half.load_state_dict(cb.SigLIP(5.0, -3.0).state_dict())
    assert float(half.logit_bias.detach()) == -3.0 and float(half.logit_scale.detach()) == pytest.approx(5.0, rel=1e-3)
    info = cb.InfoNCE(0.1, learn_temperature=True).half()
    tiny = r"log_temperature -20 \(exp: 2.06115e-09\) reads back in torch.float16 as 0"
    with pytest.raises(RuntimeError, match=tiny):
        info.load_state_dict({"log_temperature": torch.tensor(-20.0)})
    assert float(info.temperature.detach()) == pytest.approx(0.1, rel=1e-3)
    clip = cb.ClipLoss().half()
    clip.load_state_dict({"log_logit_scale": torch.tensor(12.0)})  # exp 162755 is inf in float16; clamped to 100 first
    assert torch.isfinite(clip(torch.randn(4, 3).half(), torch.randn(4, 3).half()))
    assert float(clip.logit_scale.detach()) == pytest.approx(100.0, rel=1e-3)
    wide = cb.SigLIP()
    wide.load_state_dict({"log_logit_scale": torch.tensor(20.0), "logit_bias": torch.tensor(-1e6)})  # float32 holds it
    assert float(wide.logit_bias.detach()) == -1e6
    wide.load_state_dict({"log_logit_scale": torch.tensor(float("nan")), "logit_bias": torch.tensor(-1.0)})
    assert math.isnan(float(wide.log_logit_scale.detach()))
    # assign=True keeps the state's own dtype (float32 here): loaded as before
    half = cb.SigLIP().half()
    half.load_state_dict({"log_logit_scale": torch.tensor(2.3), "logit_bias": torch.tensor(-1e6)}, assign=True)
    assert half.logit_bias.dtype == torch.float32 and float(half.logit_bias.detach()) == -1e6
    # nested: the message names the module's prefix
    parent = torch.nn.ModuleDict({"loss": cb.SigLIP().half()})
    with pytest.raises(RuntimeError, match=r"SigLIP \(loss\.\): logit_bias"):
        parent.load_state_dict({"loss.log_logit_scale": torch.tensor(2.3), "loss.logit_bias": torch.tensor(-1e6)})


def test_edge_cases_from_a_mutation_audit():
    # each of these checks failed to catch a mutant of this session's code (a mutation audit, 2026-12-01)
    # the fallback (forward-mode AD takes it) where the pairs' own terms dominate: masked out, not subtracted
    import copy

    import torch.autograd.forward_ad as fwAD

    x = torch.eye(4, 8)
    with fwAD.dual_level():
        loss = cb.siglip_loss(x, x, fwAD.make_dual(torch.tensor(1e8), torch.ones(())), 0.0, reduction="none")
        primal = fwAD.unpack_dual(loss).primal
    assert torch.allclose(primal, torch.full((4,), 3 * torch.log(torch.tensor(2.0)).item()), rtol=1e-5), primal
    # a sparse bias is refused by name
    with pytest.raises(TypeError, match="logit_bias must be a dense"):
        cb.siglip_loss(torch.randn(3, 4), torch.randn(3, 4), 10.0, torch.tensor([-10.0]).to_sparse())
    # the module: a deep copy shares its process group (which cannot be copied), a meta module prints
    group = torch.distributed.ProcessGroup(torch.distributed.HashStore(), 0, 1)  # (no init_process_group: no exchange)
    assert copy.deepcopy(cb.SigLIP(process_group=group)).process_group is group
    assert "(meta)" in repr(cb.SigLIP().to("meta"))


@pytest.mark.parametrize("extra", [1, 2])
def test_siglip_a_last_text_tile_of_one_or_two_columns(extra):
    # (a mutation audit, 2026-12-06) N = kColTile + 1: the forward's last text tile holds one column (a loop bound `j0 + 1 < M` dropped it, and
    # every image row lost one softplus term); + 2 for the neighbour. Loss and gradients against the reference.
    n = 512 + extra  # (siglip.cpp's kColTile: texts per tile of the forward and the image rows' pass)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = x + 0.8 * torch.randn(n, 5, generator=g, dtype=torch.float64)
    leaves = [v.clone().requires_grad_() for v in (x, y, torch.tensor(7.0, dtype=torch.float64),
                                                   torch.tensor(-4.0, dtype=torch.float64))]
    refs = [v.detach().clone().requires_grad_() for v in leaves]
    got = cb.siglip_loss(*leaves, reduction="none")
    want = siglip_reference(*refs, reduction="none")
    assert_close_scaled(got, want, 1e-13, "loss")
    upstream = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    for name, a, b in zip(["image", "text", "logit_scale", "logit_bias"], torch.autograd.grad(got, leaves, upstream),
                          torch.autograd.grad(want, refs, upstream)):
        assert_close_scaled(a, b, 1e-12, f"grad {name}")


@needs_op
@pytest.mark.parametrize("gap", [80.0, 88.0])
def test_siglip_weights_made_subnormal_by_the_bias_alone_are_flushed(gap):
    # (a mutation audit, 2026-12-06) As test_subnormal_weights.py, with the underflow coming from the bias: x . y = 0 for every pair, so each logit is
    # the bias -gap and its |s| ||x|| ||y|| part is 0. siglip.cpp's bound |s| max||x|| max||y|| + |b| must count |b|:
    # at gap 88 (sigmoid(-88) ~ 6e-39 < float32's smallest normal, while e^88 < float32's max, so that a plain
    # float32 sigmoid gives it subnormal rather than 0 by overflow, as the gap in test_subnormal_weights.py) the text
    # gradient row 1, made of the weight sigmoid(l_01) alone (x_1 = 0: its positive pair contributes nothing), is
    # flushed to exactly 0; at gap 80 (sigmoid(-80) ~ 1.8e-35, normal) it is kept and matches the float64 reference.
    img = torch.tensor([[1.0], [0.0]], requires_grad=True)
    txt = torch.tensor([[0.0], [0.0]], requires_grad=True)
    cb.siglip_loss(img, txt, 1.0, -gap, normalize=False, reduction="sum").backward()
    img64, txt64 = img.detach().double().requires_grad_(), txt.detach().double().requires_grad_()
    siglip_reference(img64, txt64, 1.0, -gap, normalize=False, reduction="sum").backward()
    want = float(txt64.grad[1, 0])
    assert want == pytest.approx(torch.sigmoid(torch.tensor(-gap, dtype=torch.float64)).item(), rel=1e-12)
    if gap == 88.0:
        assert 0 < want < torch.finfo(torch.float32).tiny
        assert 0 < float(torch.sigmoid(torch.tensor(-gap))) < torch.finfo(torch.float32).tiny  # (what an unflushed float32 weight is)
        assert txt.grad[1, 0] == 0, txt.grad
    else:
        assert want > torch.finfo(torch.float32).tiny
        assert float(txt.grad[1, 0]) == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(img.grad.double(), img64.grad, rtol=1e-5, atol=0)
    torch.testing.assert_close(txt.grad[0].double(), txt64.grad[0], rtol=1e-5, atol=0)
