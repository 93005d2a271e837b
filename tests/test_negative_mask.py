"""Variable negatives: padding (-1) in negative_indices and negative_mask in every mode, against the reference, a
loss computed anchor by anchor from the kept negatives alone, gradcheck, torch.compile and the argument checks."""

from __future__ import annotations

import pytest
import torch

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # a GPU machine without network may lack it: only the property test below needs it
    given = None

import contrastbound as cb
from contrastbound import _backend
from contrastbound.reference import debiased_info_nce_reference, info_nce_reference

from conftest import DEVICES, DTYPES, TOL, assert_close_scaled, make_inputs, tol

# The modes with left-out negatives: a shared bank, per-anchor negatives and in-batch with a mask; indexed with
# padding, with a mask, and with both.
CASES = ["shared_mask", "per_anchor_mask", "in_batch_mask", "indexed_pad", "indexed_mask", "indexed_pad_mask"]


def _inputs(case, B=7, K=37, d=5, dtype=torch.float64, device="cpu", seed=0, M=None):
    """(a, p, n, kwargs) with about a third of the negatives left out and anchor 2's all of them."""
    mode = case.split("_mask")[0].split("_pad")[0]
    a, p, n, idx = make_inputs(mode, B=B, K=K if mode != "in_batch" else 0, d=d, dtype=dtype, device=device,
                               seed=seed, M=M)
    g = torch.Generator().manual_seed(seed + 100)
    width = B if mode == "in_batch" else K
    kw = {}
    if "pad" in case:
        idx = idx.clone()
        idx[(torch.rand(B, K, generator=g) < 0.3).to(device)] = -1
        idx[2] = -1
    if "mask" in case:
        mask = torch.rand(B, width, generator=g) > 0.3
        mask[2] = False
        kw["negative_mask"] = mask.to(device)
        if idx is not None:  # masked-out entries may hold anything, out of range included
            idx = torch.where(mask.to(device), idx, torch.full_like(idx, 10**6))
    if idx is not None:
        kw["negative_indices"] = idx
    return a, p, n, kw


def _grads(fn, a, p, n, kw, **extra):
    loss = fn(a, p, n, **kw, **extra)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    leaves = [x for x in (a, p, n) if x is not None]
    return loss, torch.autograd.grad(loss, leaves, upstream.to(loss.device, loss.dtype))


def _float64(a, p, n):
    return [None if x is None else x.detach().cpu().to(torch.float64).requires_grad_() for x in (a, p, n)]


def _cpu(kw):
    return {k: v.cpu() for k, v in kw.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference(device, dtype, case, normalize):
    # K = 37: no tile multiple; anchor 2 has no negatives at all (loss 0, lse its positive logit)
    a, p, n, kw = _inputs(case, dtype=dtype, device=device)
    extra = dict(temperature=0.2, normalize=normalize, reduction="none")
    loss, grads = _grads(cb.info_nce, a, p, n, kw, **extra)
    a64, p64, n64 = _float64(a, p, n)
    ref_loss, ref_grads = _grads(info_nce_reference, a64, p64, n64, _cpu(kw), **extra)
    assert loss.dtype == dtype
    assert_close_scaled(loss, ref_loss, tol(dtype, device), "loss")
    assert loss[2].item() == 0.0
    for name, g, r in zip("apn", grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape
        assert_close_scaled(g, r, tol(dtype, device), f"grad {name}")
    if not normalize:
        return  # (unnormalised rows of d = 5 at T = 0.2: the positive dominates many anchors' sums)
    # the left-out negatives mattered: the same inputs without them left out give other losses
    full = {k: v for k, v in kw.items() if k != "negative_mask"}
    if "negative_indices" in full:
        full["negative_indices"] = full["negative_indices"].clamp(0, n.shape[0] - 1).cpu()
    unmasked = info_nce_reference(a64, p64, n64, **_cpu(full), **extra)
    assert (unmasked - ref_loss).abs().max() > 1e-2


@pytest.mark.parametrize("case,B,K", [("shared_mask", 7, 1100), ("in_batch_mask", 530, 0)])
def test_masks_across_bank_tiles(case, B, K):
    # Banks past the CPU kernel's 512-row tiles, the last one partial: each tile reads its own columns of the mask
    # (a mask read from column 0 in every tile passed the K = 37 cases above; a mutation audit, 2026-12-06).
    a, p, n, kw = _inputs(case, B=B, K=K)
    extra = dict(temperature=0.2, normalize=True, reduction="none")
    loss, grads = _grads(cb.info_nce, a, p, n, kw, **extra)
    ref_loss, ref_grads = _grads(info_nce_reference, *_float64(a, p, n), kw, **extra)
    assert_close_scaled(loss, ref_loss, tol(torch.float64, "cpu"), "loss")
    for name, g, r in zip("apn", grads, ref_grads):
        assert_close_scaled(g, r, tol(torch.float64, "cpu"), f"grad {name}")


def _kept_rows(case, i, p, n, kw):
    """Anchor i's kept negatives as a (K_i, d) bank: in-batch the other positives its mask keeps, else the rows its
    indices (not -1) and mask name."""
    mask = kw["negative_mask"][i] if "negative_mask" in kw else None
    if case.startswith("in_batch"):
        keep = mask.clone()
        keep[i] = False
        return p[keep]
    if "negative_indices" in kw:
        idx = kw["negative_indices"][i]
        return n[idx[(idx >= 0) & (mask if mask is not None else True)]]
    return (n if n.dim() == 2 else n[i])[mask]


@pytest.mark.parametrize("case", CASES)
def test_equals_the_kept_negatives_anchor_by_anchor(case):
    # An oracle apart from the reference: anchor i's loss is info_nce over its kept negatives only (a batch of one).
    a, p, n, kw = _inputs(case, B=6, K=23, d=4)
    loss = cb.info_nce(a, p, n, temperature=0.3, reduction="none", **kw)
    for i in range(a.shape[0]):
        want = cb.info_nce(a[i:i + 1], p[i:i + 1], _kept_rows(case, i, p, n, kw), temperature=0.3, reduction="none")
        assert torch.allclose(loss[i:i + 1], want, rtol=1e-12, atol=1e-13), (i, loss[i].item(), want.item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_left_out_rows_get_no_gradient(device, case):
    a, p, n, kw = _inputs(case, device=device)
    loss = cb.info_nce(a, p, n, temperature=0.2, **kw)
    if case.startswith("in_batch"):
        return  # the positives are their own anchors' positives too
    (grad_n,) = torch.autograd.grad(loss, (n,))
    if "negative_indices" in kw:
        idx = kw["negative_indices"]
        keep = idx >= 0 if "negative_mask" not in kw else kw["negative_mask"] & (idx >= 0)
        used = torch.zeros(n.shape[0], dtype=torch.bool, device=device)
        used[idx[keep]] = True
        assert (grad_n[~used] == 0).all() and (grad_n[used] != 0).any(dim=1).all()
    elif n.dim() == 3:
        mask = kw["negative_mask"]
        assert (grad_n[~mask] == 0).all() and (grad_n[mask] != 0).any(dim=1).all()
    else:  # a shared bank: a column no anchor keeps has no gradient
        used = kw["negative_mask"].any(dim=0)
        assert (grad_n[~used] == 0).all() and (grad_n[used] != 0).any(dim=1).all()


@pytest.mark.parametrize("case", ["shared_mask", "per_anchor_mask", "in_batch_mask", "indexed_pad_mask"])
def test_gradcheck_float64(case):
    a, p, n, kw = _inputs(case, B=4, K=6, d=3, M=5)
    leaves = tuple(x for x in (a, p, n) if x is not None)

    def f(*xs):
        return cb.info_nce(xs[0], xs[1], xs[2] if len(xs) > 2 else None, temperature=0.7, reduction="none", **kw)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("walk", ["rows", "blocked:7", "blocked:7:3", "blocked:1:1", "blocked:7:3:50", "blocked:3:1:7"])
def test_cpu_indexed_walks(monkeypatch, walk):
    # The CPU kernel's walks of an indexed bank (see test_info_nce.py's INDEXED_WALKS), with padding: row tiles of
    # 256 with padding inside them, blocks and windows that padding leaves empty.
    if not _backend.kernel_serves(torch.device("cpu")):
        pytest.skip("the CPU kernel is not built")
    monkeypatch.setenv("CONTRASTBOUND_CPU_INDEXED", walk)
    a, p, n, kw = _inputs("indexed_pad", B=9, K=700, d=7, dtype=torch.float32, M=60, seed=4)
    idx = kw["negative_indices"]
    idx[5, 100:600] = -1  # whole row tiles of padding
    loss, grads = _grads(cb.info_nce, a, p, n, kw, temperature=0.1, reduction="none")
    ref_loss, ref_grads = _grads(info_nce_reference, *_float64(a, p, n), kw, temperature=0.1, reduction="none")
    assert_close_scaled(loss, ref_loss, TOL[torch.float32], "loss")
    for name, g, r in zip("apn", grads, ref_grads):
        assert_close_scaled(g, r, TOL[torch.float32], f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_no_padding_gives_the_same_bits(device):
    # The kernels' padding branch costs nothing where there is none: a mask that keeps everything and no mask
    # give the same loss and gradients bit for bit.
    a, p, n, kw = _inputs("indexed_pad", B=5, K=300, d=9, dtype=torch.float32, device=device, seed=6, M=40)
    idx = kw["negative_indices"].clamp_min(0)
    everything = torch.ones_like(idx, dtype=torch.bool)
    x = _grads(cb.info_nce, a, p, n, {"negative_indices": idx})
    y = _grads(cb.info_nce, a, p, n, {"negative_indices": idx, "negative_mask": everything})
    assert torch.equal(x[0], y[0]) and all(torch.equal(u, v) for u, v in zip(x[1], y[1]))


def test_shared_bank_and_in_batch_masks_reach_the_cpu_tiles(monkeypatch):
    # The CPU kernel's shared-bank tiles apply the mask (no (B, K) int64 indices, no row walk): the same bits as no
    # mask where it keeps everything, and no detour through the indexed mode.
    if not _backend.kernel_serves(torch.device("cpu")):
        pytest.skip("the CPU kernel is not built")
    from contrastbound import functional

    def no_indices(*args):
        raise AssertionError("a shared bank's mask became indices")

    monkeypatch.setattr(functional, "_masked_indices", no_indices)
    for case in ("shared_mask", "in_batch_mask"):
        a, p, n, kw = _inputs(case, B=300, K=1100, d=9, dtype=torch.float32, seed=9)  # 2 x 3 tiles of 256 x 512
        cb.info_nce(a, p, n, 0.1, **kw).backward()
        everything = torch.ones_like(kw["negative_mask"])
        x = _grads(cb.info_nce, a, p, n, {"negative_mask": everything})
        y = _grads(cb.info_nce, a, p, n, {})
        assert torch.equal(x[0], y[0]) and all(torch.equal(u, v) for u, v in zip(x[1], y[1])), case


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "column_slice", "expanded_column", "expanded_row"])
def test_a_mask_of_any_strides_gives_the_bits_of_its_contiguous_copy(device, layout):
    # The kernels read a shared bank's and an in-batch mask through its strides. A mutation audit's survivor
    # (2026-12-02): the tile's column offset taken without the column stride read a transposed mask wrongly from the
    # second bank tile on (loss 0.211 off at K = 1100), and every mask tested had column stride 1. K = 1100 is three
    # bank tiles of 512; B = 8 keeps a transposed mask's row stride small.
    g = torch.Generator().manual_seed(17)
    for case in ("shared_mask", "in_batch_mask"):
        B, K = (8, 1100) if case == "shared_mask" else (1100, 0)
        a, p, n, kw = _inputs(case, B=B, K=K, d=16, dtype=torch.float32, device=device, seed=17)
        cols = kw["negative_mask"].shape[1]
        # The layout is made on the device itself: .to(device) of a strided CPU view copies it contiguous where it
        # is not dense (a column slice, an expanded dimension), which on an H200 left three cases testing nothing.
        def draw(*shape):
            return (torch.rand(*shape, generator=g) < 0.5).to(device)

        if layout == "transposed":
            mask = draw(cols, B).t()
        elif layout == "column_slice":
            mask = draw(B, 2 * cols)[:, ::2]
        elif layout == "expanded_column":  # a row per anchor: all of its negatives kept, or none
            mask = draw(B, 1).expand(B, cols)
        else:
            mask = draw(1, cols).expand(B, cols)
        assert not mask.is_contiguous()
        x = _grads(cb.info_nce, a, p, n, {"negative_mask": mask}, temperature=0.1, reduction="none")
        y = _grads(cb.info_nce, a, p, n, {"negative_mask": mask.contiguous()}, temperature=0.1, reduction="none")
        assert torch.equal(x[0], y[0]) and all(torch.equal(u, v) for u, v in zip(x[1], y[1])), case


@pytest.mark.skipif(not _backend.EXTENSION_LOADED, reason="compiled extension not loaded")
def test_the_op_checks_its_mask():
    a, p, n, kw = _inputs("shared_mask", B=4, K=6, d=3, dtype=torch.float32)
    a, p, n, mask = a.detach(), p.detach(), n.detach(), kw["negative_mask"]
    fwd = torch.ops.contrastbound.info_nce_fwd
    with pytest.raises((RuntimeError, TypeError), match="negative_mask must be bool"):
        fwd(a, p, n, None, 2.0, True, True, False, False, None, mask.to(torch.uint8))
    with pytest.raises((RuntimeError, ValueError), match=r"negative_mask must have shape \(B, K\) = \(4, 6\)"):
        fwd(a, p, n, None, 2.0, True, True, False, False, None, mask[:, :5])
    with pytest.raises((RuntimeError, ValueError), match="negative_mask needs a shared bank"):
        fwd(a, p, n, torch.zeros(4, 6, dtype=torch.long), 2.0, True, True, False, False, None, mask)
    with pytest.raises((RuntimeError, ValueError), match="negative_mask needs a shared bank"):
        fwd(a, p, n.expand(4, 6, 3), None, 2.0, True, True, False, False, None, mask)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tau_plus,beta", [(0.0, 0.0), (0.1, 0.0), (0.2, 0.5)])
def test_debiased_counts_each_anchors_negatives(case, tau_plus, beta):
    a, p, n, kw = _inputs(case, B=7, K=19, d=5, seed=2)
    extra = dict(temperature=0.4, tau_plus=tau_plus, beta=beta, reduction="none")
    loss, grads = _grads(cb.debiased_info_nce, a, p, n, kw, **extra)
    ref_loss, ref_grads = _grads(debiased_info_nce_reference, *_float64(a, p, n), kw, **extra)
    assert_close_scaled(loss, ref_loss, 1e-12, "loss")
    for g, r in zip(grads, ref_grads):
        assert_close_scaled(g, r, 1e-11, "grad")
    assert loss[2].item() == 0.0 and all(torch.isfinite(g).all() for g in grads)
    # K is each anchor's own count: anchor i alone with its kept negatives gives its loss
    want = cb.debiased_info_nce(a[:1], p[:1], _kept_rows(case, 0, p, n, kw), **extra)
    assert torch.allclose(loss[:1], want, rtol=1e-12, atol=1e-13)


def test_info_nce_lse_in_batch_mask_without_the_positive():
    # include_positive=False: the log-sum-exp over the kept j != i (the diagonal left out whatever the mask says)
    a, p, _, kw = _inputs("in_batch_mask", B=6, d=4)
    mask = kw["negative_mask"]
    mask[0, 0] = True
    _, lse = cb.info_nce_lse(a, p, None, 0.5, negative_mask=mask, include_positive=False)
    an, pn = (torch.nn.functional.normalize(x.detach(), dim=1) for x in (a, p))
    logits = (an @ pn.T / 0.5).masked_fill(~mask | torch.eye(6, dtype=torch.bool), float("-inf"))
    assert torch.allclose(lse, torch.logsumexp(logits, dim=1), rtol=1e-12, atol=0)
    assert torch.isneginf(lse[2])  # no negatives


def test_an_anchor_without_negatives_has_no_lse_gradient():
    # include_positive=False and nothing kept: lse = -inf, gradient 0 (the kernel's path as the reference's, which
    # torch.func.jacrev takes); a review found d l_0 left there
    a, p, n, kw = _inputs("shared_mask", B=4, K=5, d=4, seed=12)
    mask = kw["negative_mask"]

    def lse_of(x):
        return cb.info_nce_lse(x, p.detach(), n.detach(), 0.5, negative_mask=mask, include_positive=False)[1]

    (grad,) = torch.autograd.grad(lse_of(a).sum(), (a,))
    assert torch.isneginf(lse_of(a)[2]) and (grad[2] == 0).all() and (grad[0] != 0).any()
    assert torch.allclose(grad, torch.func.jacrev(lse_of)(a.detach()).sum(0), rtol=1e-12, atol=1e-14)


def test_references_refuse_bad_indices_into_an_empty_bank():
    a, p = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    empty = torch.zeros(0, 3, dtype=torch.float64)
    for idx in ([[0, -1], [-1, -1]], [[-2, -1], [-1, -1]]):
        for fn in (info_nce_reference, debiased_info_nce_reference):
            with pytest.raises(IndexError):
                fn(a, p, empty, negative_indices=torch.tensor(idx))
    padding = torch.full((2, 2), -1)
    assert info_nce_reference(a, p, empty, negative_indices=padding).item() == 0.0
    assert cb.info_nce(a, p, empty, negative_indices=padding).item() == 0.0


def test_module_and_compile():
    a, p, n, kw = _inputs("shared_mask", dtype=torch.float32, B=8, K=50, d=6, seed=8)
    module = cb.InfoNCE(temperature=0.2)
    eager = module(a, p, n, negative_mask=kw["negative_mask"])
    assert torch.allclose(eager, cb.info_nce(a, p, n, 0.2, negative_mask=kw["negative_mask"]))
    compiled = torch.compile(lambda a, p, n, m: cb.info_nce(a, p, n, 0.2, negative_mask=m), fullgraph=True)
    got = compiled(a, p, n, kw["negative_mask"])
    assert torch.allclose(got, eager, rtol=1e-5, atol=1e-6)
    a, p, n, kw = _inputs("indexed_pad", dtype=torch.float32, B=8, K=50, d=6, seed=8)
    compiled = torch.compile(lambda a, p, n, i: cb.info_nce(a, p, n, 0.2, negative_indices=i), fullgraph=True)
    got = compiled(a, p, n, kw["negative_indices"])
    assert torch.allclose(got, cb.info_nce(a, p, n, 0.2, **kw), rtol=1e-5, atol=1e-6)


if given is not None:

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(B=st.integers(1, 5), K=st.integers(0, 9), keep=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
    def test_property_mask_equals_dropping(B, K, keep, seed):
        # a shared bank with any mask (empty rows, an empty bank, everything kept) is each anchor's own bank
        g = torch.Generator().manual_seed(seed)
        a, p = torch.randn(B, 3, generator=g, dtype=torch.float64), torch.randn(B, 3, generator=g, dtype=torch.float64)
        n = torch.randn(K, 3, generator=g, dtype=torch.float64)
        mask = torch.rand(B, K, generator=g) < keep
        loss = cb.info_nce(a, p, n, 0.25, negative_mask=mask, reduction="none")
        for i in range(B):
            want = cb.info_nce(a[i:i + 1], p[i:i + 1], n[mask[i]], 0.25, reduction="none")
            assert torch.allclose(loss[i:i + 1], want, rtol=1e-12, atol=1e-14)


# ---- argument checks ----------------------------------------------------------------------------------------


def test_bad_masks_are_refused_by_name():
    a, p, n, kw = _inputs("shared_mask", B=4, K=6, d=3)
    mask = kw["negative_mask"]
    with pytest.raises(TypeError, match=r"negative_mask must be a bool tensor of shape \(B, K\).*dtype torch.uint8"):
        cb.info_nce(a, p, n, negative_mask=mask.to(torch.uint8))
    with pytest.raises(TypeError, match="negative_mask must be a bool tensor.*got list"):
        cb.info_nce(a, p, n, negative_mask=mask.tolist())
    with pytest.raises(ValueError, match=r"negative_mask must have shape \(B, K\) for a shared bank \(K, d\) = "
                                         r"\(4, 6\), got \(4, 5\)"):
        cb.info_nce(a, p, n, negative_mask=mask[:, :5])
    with pytest.raises(ValueError, match=r"negative_mask must have shape \(B, B\) for in-batch negatives = \(4, 4\)"):
        cb.info_nce(a, p, None, negative_mask=mask)
    with pytest.raises(ValueError, match="negative_mask is on meta but the features are on cpu"):
        cb.info_nce(a, p, n, negative_mask=mask.to("meta"))
    with pytest.raises(TypeError, match="negative_mask must be a dense"):
        cb.info_nce(a, p, n, negative_mask=mask.to_sparse())
    a, p, n, kw = _inputs("indexed_pad", B=4, K=6, d=3, M=5)
    with pytest.raises(ValueError, match=r"negative_mask must have shape \(B, K\), the shape of negative_indices"):
        cb.info_nce(a, p, n, negative_indices=kw["negative_indices"], negative_mask=mask[:, :5])


def test_indices_below_minus_one_and_kept_ones_out_of_range_are_refused():
    a, p, n, kw = _inputs("indexed_pad", B=4, K=6, d=3, M=5)
    idx = kw["negative_indices"].clone()
    idx[0, 0] = -2
    with pytest.raises(IndexError, match=r"negative_indices must lie in \[0, M\) = \[0, 5\) or be -1 \(padding\), "
                                         r"got values in \[-2, "):
        cb.info_nce(a, p, n, negative_indices=idx)
    # masked out: anything goes; kept: checked
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 0] = False
    cb.info_nce(a, p, n, negative_indices=idx, negative_mask=mask)
    idx[1, 1] = 5
    with pytest.raises(IndexError, match=r"negative_indices must lie in \[0, M\) = \[0, 5\) or be -1"):
        cb.info_nce(a, p, n, negative_indices=idx, negative_mask=mask)
    with pytest.raises(IndexError, match="or be -1"):
        cb.debiased_info_nce(a, p, n, negative_indices=idx, negative_mask=mask)


@pytest.mark.skipif(not _backend.EXTENSION_LOADED, reason="compiled extension not loaded")
def test_the_op_takes_minus_one_and_refuses_minus_two():
    a, p, n, kw = _inputs("indexed_pad", B=4, K=6, d=3, M=5, dtype=torch.float32)
    idx = kw["negative_indices"]
    torch.ops.contrastbound.info_nce_fwd(a.detach(), p.detach(), n.detach(), idx, 2.0, True, True, False)
    with pytest.raises((RuntimeError, IndexError), match=r"negative_indices must lie in \[0, M\) = \[0, 5\) or be "
                                                          r"-1 \(padding\)"):
        torch.ops.contrastbound.info_nce_fwd(a.detach(), p.detach(), n.detach(), idx - 1, 2.0, True, True, False)
