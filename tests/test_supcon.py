"""supcon_loss (supervised contrastive, L_out) against the materialised reference and nt_xent."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None

import contrastbound as cb
from contrastbound import _backend
from contrastbound.reference import supcon_reference

from conftest import DEVICES, PACKAGE_ROOT, TOL, assert_close_scaled, package_env

# Labels with repeats, a label of one row (no positive), a negative value and a large one.
LABELS = torch.tensor([3, 7, 3, -2, 7, 7, 10**12, 3, -2])


def _case(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()


def _loss_and_grads(fn, f, labels, t, **kw):
    loss = fn(f, labels, t, **kw)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    leaves = [f] + ([t] if isinstance(t, torch.Tensor) and t.requires_grad else [])
    return loss, torch.autograd.grad(loss, leaves, upstream.to(loss.dtype))


@pytest.mark.parametrize("shape,labels", [((9, 6), LABELS), ((9, 3, 6), LABELS), ((5, 2, 4), None),
                                          ((7, 1, 5), torch.tensor([0, 1, 0, 2, 2, 2, 9]))])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("learnable", [False, True])
def test_matches_the_reference(shape, labels, normalize, reduction, learnable):
    f = _case(shape, seed=len(shape))
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True) if learnable else 0.3
    got = _loss_and_grads(cb.supcon_loss, f, labels, t, normalize=normalize, reduction=reduction)
    want = _loss_and_grads(supcon_reference, f, labels, t, normalize=normalize, reduction=reduction)
    assert got[0].shape == want[0].shape == ({"none": shape[:-1]}.get(reduction, ()))
    assert_close_scaled(got[0], want[0], 1e-12, "loss")
    for name, x, y in zip(["features", "temperature"], got[1], want[1]):
        assert_close_scaled(x, y, 1e-11, f"grad {name}")


def test_gradcheck_float64():
    f = _case((6, 2, 3), seed=3)
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 5, 1, 7])
    assert torch.autograd.gradcheck(lambda f_, t_: cb.supcon_loss(f_, labels, t_, reduction="none"), (f, t))
    assert torch.autograd.gradcheck(lambda f_: cb.supcon_loss(f_, labels, 0.4, normalize=False), (f,))


def test_two_views_without_labels_are_nt_xent():
    # each sample its own class: a row's one positive is its other view, its denominator every other row
    z1, z2 = _case((8, 5), seed=4), _case((8, 5), seed=5)
    got = cb.supcon_loss(torch.stack([z1, z2], dim=1), None, 0.5)
    want = cb.nt_xent(z1, z2, 0.5)
    assert_close_scaled(got, want, 1e-13, "loss")
    for name, x, y in zip(("z1", "z2"), torch.autograd.grad(got, (z1, z2)), torch.autograd.grad(want, (z1, z2))):
        assert_close_scaled(x, y, 1e-12, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtypes_against_float64(device, dtype):
    # the same rounded inputs in float64: within each dtype's tolerance, the result in the features' dtype
    f = _case((40, 2, 16), seed=6, dtype=dtype).detach().to(device).requires_grad_()
    labels = torch.randint(0, 12, (40,), generator=torch.Generator().manual_seed(2)).to(device)
    got = cb.supcon_loss(f, labels, 0.1)
    f64 = f.detach().double().requires_grad_()
    want = supcon_reference(f64, labels, 0.1)
    assert got.dtype == dtype
    assert_close_scaled(got.double(), want, TOL[dtype], "loss")
    (g,), (g64,) = torch.autograd.grad(got, f), torch.autograd.grad(want, f64)
    assert_close_scaled(g.double(), g64, TOL[dtype], "grad")


def test_rows_without_a_positive():
    # a label's only row: loss 0 and no gradient, left out of the mean; none with a positive: 0 (not NaN)
    f = _case((4, 3), seed=7)
    loss = cb.supcon_loss(f, torch.tensor([0, 1, 0, 2]), 0.2, reduction="none")
    assert loss[1] == 0 and loss[3] == 0 and (loss[[0, 2]] > 0).all()
    mean = cb.supcon_loss(f, torch.tensor([0, 1, 0, 2]), 0.2)
    assert_close_scaled(mean, loss.sum() / 2, 1e-15, "mean over rows with a positive")
    alone = cb.supcon_loss(f, torch.arange(4), 0.2)
    (g,) = torch.autograd.grad(alone, f)
    assert alone.item() == 0.0 and torch.count_nonzero(g) == 0
    for empty in (torch.zeros(0, 3), torch.zeros(0, 2, 3)):
        assert cb.supcon_loss(empty, torch.zeros(empty.shape[0], dtype=torch.long)).item() == 0.0


def test_torch_compile_fullgraph():
    # no read-back (labels grouped by sorting, not torch.unique): one graph, the eager values and gradients
    f = _case((16, 2, 8), seed=8, dtype=torch.float32)
    labels = torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(lambda f_, y_: cb.supcon_loss(f_, y_, 0.1), fullgraph=True)
    got, want = compiled(f, labels), cb.supcon_loss(f, labels, 0.1)
    assert_close_scaled(got, want, 1e-6, "loss")
    assert_close_scaled(torch.autograd.grad(got, f)[0], torch.autograd.grad(want, f)[0], 1e-6, "grad")


@pytest.mark.parametrize("call,exc,text", [
    (lambda: cb.supcon_loss(torch.randn(4)), ValueError, "features must have shape (N, d) or (N, V, d)"),
    (lambda: cb.supcon_loss(torch.ones(4, 3, dtype=torch.int64)), TypeError, "features must be a floating"),
    (lambda: cb.supcon_loss(torch.randn(4, 3), [0, 1, 0, 1]), TypeError, "labels must be an integer tensor"),
    (lambda: cb.supcon_loss(torch.randn(4, 3), torch.zeros(4)), TypeError, "labels must be an integer tensor"),
    (lambda: cb.supcon_loss(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.long)), ValueError,
     "labels must have shape (N,) = (4,)"),
    (lambda: cb.supcon_loss(torch.randn(4, 2, 3), torch.zeros(8, dtype=torch.long)), ValueError,
     "labels must have shape (N,) = (4,)"),
    (lambda: cb.supcon_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long, device="meta")), ValueError,
     "labels is on meta but features is on cpu: all inputs must share a device"),
    (lambda: cb.supcon_loss(torch.randn(4, 2, 3), None, 0.0), ValueError, "temperature must be a positive"),
    (lambda: cb.supcon_loss(torch.randn(4, 2, 3), None, reduction="avg"), ValueError, "reduction"),
    # (a review's find: every row its own class, no positive anywhere: the loss was 0 without a word)
    (lambda: cb.supcon_loss(torch.randn(4, 3)), ValueError, "labels=None (each sample its own class) needs features "
     "of shape (N, V, d) with V >= 2 views, got shape (4, 3)"),
    (lambda: cb.supcon_loss(torch.randn(4, 1, 3)), ValueError, "with V >= 2 views, got shape (4, 1, 3)"),
])
def test_bad_input_is_refused_by_name(call, exc, text):
    with pytest.raises(exc, match=text.replace("(", "\\(").replace(")", "\\)")):
        call()


if given is not None:

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(n=st.integers(1, 12), views=st.integers(0, 3), d=st.integers(1, 7), classes=st.integers(1, 6),
           t=st.floats(0.05, 5.0), normalize=st.booleans(), seed=st.integers(0, 2**31 - 1))
    def test_property_matches_the_reference(n, views, d, classes, t, normalize, seed):
        # any sizes and label patterns (views = 0: (N, d) features): loss and gradient as the reference's
        g = torch.Generator().manual_seed(seed)
        shape = (n, d) if views == 0 else (n, views, d)
        f = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
        labels = torch.randint(0, classes, (n,), generator=g)
        got = cb.supcon_loss(f, labels, t, normalize=normalize)
        want = supcon_reference(f, labels, t, normalize=normalize)
        # (a loss is a log-sum-exp less a mean of logits: its error is relative to the logits, 0 where they cancel)
        # and a row's gradient to a logit's derivative in that row, s ||z|| (normalised: s / ||z||)
        norms = f.detach().reshape(-1, d).norm(dim=1)
        logits = 1.0 / t if normalize else norms.max().item() ** 2 / t
        slope = (1.0 / norms.min().item() if normalize else norms.max().item()) / t if norms.numel() else 1.0
        assert_close_scaled(got, want, 1e-12, "loss", floor=logits)
        assert_close_scaled(torch.autograd.grad(got, f)[0], torch.autograd.grad(want, f)[0], 1e-11, "grad",
                            floor=slope)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    import contrastbound as cb

    N, d = 2 ** 14, 32
    torch.manual_seed(0)
    f = torch.randn(N, d, requires_grad=True)
    labels = torch.randint(0, 100, (N,))

    def hwm_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024.0

    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current resident size
    base = hwm_mib()
    cb.supcon_loss(f, labels, 0.1).backward()
    print(json.dumps({"extra_mib": hwm_mib() - base, "matrix_mib": N * N * 4 / 2 ** 20}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not _backend.HAS_CPU_KERNEL, reason="compiled CPU kernel not loaded")
def test_memory_is_far_below_the_similarity_matrix():
    # N = 2^14 rows: the N x N logits alone take 1 GiB; the fused loss keeps O(N d) beside its tiles
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=600,
                         env=package_env(), cwd=PACKAGE_ROOT)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["extra_mib"] < r["matrix_mib"] / 20, r
