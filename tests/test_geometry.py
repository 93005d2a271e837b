"""alignment and uniformity (Wang & Isola 2020) against their definitions in float64 (torch.pdist over the normalised
rows, the paper's code), values and gradients, dtypes, odd sizes, gradcheck, their range, and their checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import contrastbound as cb
from conftest import DEVICES

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


def reference_uniformity(x: torch.Tensor, t: float) -> torch.Tensor:
    """The paper's code in float64: log of the mean of exp(-t d^2) over the N (N - 1) / 2 pairs of normalised rows."""
    z = F.normalize(x.double(), dim=1, eps=1e-12)
    return torch.pdist(z, p=2).pow(2).mul(-t).exp().mean().log()


def reference_alignment(x, y, alpha, normalize=True):
    x, y = x.double(), y.double()
    if normalize:
        x, y = F.normalize(x, dim=1, eps=1e-12), F.normalize(y, dim=1, eps=1e-12)
    return (x - y).norm(dim=1).pow(alpha)


TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _draw(N, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, d, generator=g, dtype=torch.float64).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,d", [(2, 1), (3, 5), (37, 19), (130, 7)])
@pytest.mark.parametrize("t", [0.5, 2.0, 10.0])
def test_uniformity_matches_the_papers_code(device, dtype, N, d, t):
    x = _draw(N, d, dtype, device).requires_grad_(True)
    got = cb.uniformity(x, t)
    assert got.dtype == dtype and got.shape == () and got.device == x.device
    x64 = x.detach().double().requires_grad_(True)
    want = reference_uniformity(x64, t)
    tol = TOL[dtype] * max(1.0, t)
    torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol)
    (g,) = torch.autograd.grad(got, x)
    (g_want,) = torch.autograd.grad(want, x64)
    scale = g_want.abs().max().item()
    torch.testing.assert_close(g.double(), g_want, rtol=tol, atol=tol * max(scale, 1e-3) * 10)


def test_uniformity_gradcheck():
    x = _draw(9, 4, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: cb.uniformity(x, 2.0), (x,))
    assert torch.autograd.gradcheck(lambda x: cb.uniformity(x, 0.3), (x,))


def test_uniformity_of_a_collapse_and_of_opposite_points():
    # every row the same point: every distance 0, uniformity 0; two opposite points: distance^2 4, -4 t
    x = torch.tensor([[1.0, 2.0, 2.0]]).repeat(5, 1)
    torch.testing.assert_close(cb.uniformity(x), torch.tensor(0.0), atol=1e-6, rtol=0)
    two = torch.tensor([[0.0, 3.0], [0.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(cb.uniformity(two, 1.5), torch.tensor(-6.0, dtype=torch.float64), atol=1e-12, rtol=0)


def test_a_zero_row_counts_as_a_unit_row_orthogonal_to_the_others():
    # (documented: the kernels' normalisation maps it to 0, and the formula takes d^2 = 2 - 2 s with s = 0 for it)
    x = _draw(6, 3, torch.float64)
    x[2] = 0
    z = F.normalize(x, dim=1, eps=1e-12)
    sq = 2 - 2 * (z @ z.T)
    off = ~torch.eye(6, dtype=torch.bool)
    want = torch.exp(-2.0 * sq[off]).mean().log()
    torch.testing.assert_close(cb.uniformity(x), want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-40, 1e-30, 1e-13, 1.0, 1e19, 1e30])
def test_any_row_scale_gives_the_same_values_and_gradients(dtype, scale):
    # An audit's cases: float32 rows of norm past ~1.8e19 overflowed the normalisation's squares (uniformity -4,
    # "perfectly uniform", with a zero gradient) and rows under F.normalize's eps (1e-12) stayed short of unit
    # length (-3.99 where the rows' directions give -3.34). Rows are scaled by a power of two first: the values are
    # those of the unscaled rows, and so are the gradients, times 1 / scale (the functions are scale-invariant).
    if dtype == torch.float32 and scale == 1e-40:
        scale = 1e-38  # (1e-40 is subnormal in float32: the rows would lose bits before the call)
    x = _draw(11, 6, torch.float64, seed=8)
    want_u, want_a = reference_uniformity(x, 2.0), reference_alignment(x[:6], x[5:], 2.0).mean()
    xs = (x * scale).to(dtype).requires_grad_(True)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    u = cb.uniformity(xs)
    torch.testing.assert_close(u.double(), want_u, rtol=tol, atol=tol)
    a = cb.alignment(xs[:6], xs[5:])
    torch.testing.assert_close(a.double(), want_a, rtol=tol, atol=tol)
    x1 = x.clone().requires_grad_(True)
    (g_want,) = torch.autograd.grad(reference_uniformity(x1, 2.0) + reference_alignment(x1[:6], x1[5:], 2.0).mean(),
                                    x1)
    (g,) = torch.autograd.grad(u + a, xs)
    torch.testing.assert_close(g.double() * scale, g_want, rtol=1e-4 if dtype == torch.float32 else 1e-9,
                               atol=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("dtype, exponent", [(torch.float64, -1074), (torch.float32, -149)])
def test_rows_of_subnormals_are_rows_like_any_other(dtype, exponent):
    # An audit's case: a float64 row whose largest entry is under ~1e-320 needs a factor past 2^1023 (the largest
    # float64) to reach [0.5, 1); one factor clamped there left it under F.normalize's eps (uniformity -2.78 where
    # the rows' directions give -2.51). Integer rows times the smallest subnormal are exact: scaled by two factors
    # they are the integer rows' scaled rows, bit for bit, and so are the results.
    g = torch.Generator().manual_seed(3)
    m = torch.randint(-50, 51, (7, 5), generator=g).to(dtype)
    m[2] = 0  # (a zero row stays zero)
    tiny = m * 2.0 ** exponent
    assert tiny.abs().max() < torch.finfo(dtype).tiny and torch.equal(tiny / 2.0 ** exponent, m)  # (exact subnormals)
    assert torch.equal(cb.uniformity(tiny), cb.uniformity(m))
    assert torch.equal(cb.alignment(tiny[:4], tiny[3:]), cb.alignment(m[:4], m[3:]))


def test_large_t_in_float64_and_its_float32_rounding():
    # the exponents 2 t (s - 1) carry the dot products' rounding times 2 t (documented): a collapse is 0 to
    # ~t d eps, in float64 to 1e-9 at t = 1e6, in float32 only to ~0.1 there
    x = _draw(1, 6, torch.float64, seed=2).repeat(6, 1)
    assert abs(cb.uniformity(x, 1e6).item()) <= 1e-8
    assert abs(cb.uniformity(x.float(), 2.0).item()) <= 1e-5


@settings(max_examples=40, deadline=None)
@given(N=st.integers(2, 40), d=st.integers(1, 9), t=st.floats(0.05, 20.0), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_uniformity_property(N, d, t, seed, scale):
    # against the paper's code, and within its range [-4 t, 0] (squared distances of unit rows lie in [0, 4]),
    # whatever the rows' scale (normalised first)
    x = _draw(N, d, torch.float64, seed=seed) * scale
    got = cb.uniformity(x, t)
    torch.testing.assert_close(got, reference_uniformity(x, t), rtol=1e-9, atol=1e-9)
    assert -4 * t - 1e-9 <= got.item() <= 1e-9


def test_uniformity_under_autocast_is_float32():
    x = _draw(20, 8, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cb.uniformity(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_uniformity(x, 2.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [1.0, 2.0, 3.5])
@pytest.mark.parametrize("normalize", [True, False])
def test_alignment_matches_the_papers_code(device, dtype, alpha, normalize):
    x, y = _draw(23, 6, dtype, device, seed=1), _draw(23, 6, dtype, device, seed=2)
    want = reference_alignment(x, y, alpha, normalize)
    tol = 1e-10 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 3e-2)
    got = cb.alignment(x, y, alpha, normalize=normalize, reduction="none")
    assert got.shape == (23,)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(cb.alignment(x, y, alpha, normalize=normalize).double(), want.mean(), rtol=tol, atol=tol)
    torch.testing.assert_close(cb.alignment(x, y, alpha, normalize=normalize, reduction="sum").double(), want.sum(),
                               rtol=tol, atol=tol * 23)


def test_alignment_of_half_rows_in_float32_and_under_autocast():
    x, y = _draw(40, 9, torch.float64, seed=5), _draw(40, 9, torch.float64, seed=6)
    want = reference_alignment(x.half(), y.half(), 2.0).mean()  # (the half rows, compared exactly)
    got = cb.alignment(x.half(), y.half())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=0)  # (float16's own rounding of the result)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cb.alignment(x.bfloat16(), y.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_alignment(x.bfloat16(), y.bfloat16(), 2.0).mean(), rtol=1e-6,
                               atol=0)


def test_alignment_gradcheck_and_its_range():
    x = _draw(7, 5, torch.float64, seed=3).requires_grad_(True)
    y = _draw(7, 5, torch.float64, seed=4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: cb.alignment(x, y), (x, y))
    assert torch.autograd.gradcheck(lambda x, y: cb.alignment(x, y, 1.5, normalize=False), (x, y))
    torch.testing.assert_close(cb.alignment(x, x), torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(cb.alignment(x, -3 * x), torch.tensor(4.0, dtype=torch.float64))


def test_alignment_and_uniformity_as_a_training_loss():
    # Wang & Isola's loss, alignment + (uniformity(z1) + uniformity(z2)) / 2, through an encoder: its gradient equals
    # that of the paper's code
    g = torch.Generator().manual_seed(6)
    enc = torch.nn.Linear(10, 4).double()
    v1, v2 = torch.randn(31, 10, generator=g, dtype=torch.float64), torch.randn(31, 10, generator=g,
                                                                                  dtype=torch.float64)

    def loss(align, unif):
        z1, z2 = enc(v1), enc(v2)
        return align(z1, z2) + (unif(z1) + unif(z2)) / 2

    got = torch.autograd.grad(loss(cb.alignment, cb.uniformity), list(enc.parameters()))
    want = torch.autograd.grad(loss(lambda a, b: reference_alignment(a, b, 2.0).mean(),
                                    lambda z: reference_uniformity(z, 2.0)), list(enc.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("call,error,match", [
    (lambda x, y: cb.uniformity(x.numpy()), TypeError, r"x must be a torch.Tensor of shape \(N, d\)"),
    (lambda x, y: cb.uniformity(x[0]), ValueError, r"x must have shape \(N, d\)"),
    (lambda x, y: cb.uniformity(x.long()), TypeError, "x must be a floating tensor"),
    (lambda x, y: cb.uniformity(x[:1]), ValueError, "uniformity needs at least 2 rows of x"),
    (lambda x, y: cb.uniformity(x[:, :0]), ValueError, r"and d >= 1, got shape \(5, 0\)"),
    (lambda x, y: cb.uniformity(x, 0.0), ValueError, "t must be a positive finite number, got 0.0"),
    (lambda x, y: cb.uniformity(x, -1), ValueError, "t must be a positive finite number"),
    (lambda x, y: cb.uniformity(x, math.nan), ValueError, "t must be a positive finite number, got nan"),
    (lambda x, y: cb.uniformity(x, math.inf), ValueError, "t must be a positive finite number"),
    (lambda x, y: cb.uniformity(x, 1e39), ValueError, "t must be at most"),
    (lambda x, y: cb.uniformity(x, 10**400), ValueError, "t must be a positive finite number, got a value beyond"),
    (lambda x, y: cb.uniformity(x, True), TypeError, "t must be a positive finite number, got bool"),
    (lambda x, y: cb.uniformity(x, "2"), TypeError, "t must be a positive finite number, got str"),
    (lambda x, y: cb.alignment(x, y[:3]), ValueError, r"y must have the shape of x \(B, d\)"),
    (lambda x, y: cb.alignment(x, y.long()), TypeError, "y must be a floating tensor"),
    (lambda x, y: cb.alignment(x, y, 0.0), ValueError, "alpha must be a positive finite number"),
    (lambda x, y: cb.alignment(x, y, None), TypeError, "alpha must be a positive finite number"),
    (lambda x, y: cb.alignment(x, y, reduction="max"), ValueError, "reduction must be one of"),
    (lambda x, y: cb.alignment(x, y, normalize="yes"), TypeError, "normalize"),
    (lambda x, y: cb.alignment(x, y.to("meta")), ValueError, "y is on meta but x is on cpu"),
])
def test_bad_input_is_refused_by_name(call, error, match):
    x, y = _draw(5, 3, torch.float32), _draw(5, 3, torch.float32, seed=1)
    with pytest.raises(error, match=match):
        call(x, y)
