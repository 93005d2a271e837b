"""labels / negative_labels: negatives of the anchor's own class left out of its sum, in every mode, against the
same call with the equivalent negative_mask (already tested against the reference), the float64 reference, a loss
computed anchor by anchor from the kept negatives, gradcheck, opcheck, torch.compile and the argument checks."""

from __future__ import annotations

import pytest
import torch

import contrastbound as cb
from contrastbound import _backend
from contrastbound.reference import info_nce_reference

from conftest import DEVICES, DTYPES, assert_close_scaled, make_inputs, tol

MODES = ["shared", "in_batch", "per_anchor", "indexed", "indexed_pad", "shared_mask", "indexed_mask",
         "per_anchor_mask"]


def _inputs(case, B=9, K=37, d=5, dtype=torch.float64, device="cpu", seed=0, classes=3):
    """(a, p, n, label kwargs, the equivalent negative_mask kwargs). Anchor 0 has a class of its own (it keeps every
    negative); with a shared bank anchor 1's class is every bank row's but its first (one negative left)."""
    mode = case.split("_mask")[0].split("_pad")[0]
    a, p, n, idx = make_inputs(mode, B=B, K=K if mode != "in_batch" else 0, d=d, dtype=dtype, device=device,
                               seed=seed)
    g = torch.Generator().manual_seed(seed + 200)
    y = torch.randint(0, classes, (B,), generator=g)
    y[0] = classes
    kw, eq = {"labels": y.to(device)}, {}
    if mode == "in_batch":
        keep = y[None, :] != y[:, None]
        keep.fill_diagonal_(True)
    elif mode == "shared":
        yn = torch.randint(0, classes, (K,), generator=g)
        y[1] = classes + 1
        yn[1:] = classes + 1
        kw["labels"] = y.to(device)
        kw["negative_labels"] = yn.to(device)
        keep = yn[None, :] != y[:, None]
    elif mode == "per_anchor":
        yn = torch.randint(0, classes, (B, K), generator=g)
        kw["negative_labels"] = yn.to(device)
        keep = yn != y[:, None]
    else:  # indexed: the bank rows' labels (M,)
        M = n.shape[0]
        yn = torch.randint(0, classes, (M,), generator=g)
        kw["negative_labels"] = yn.to(device)
        if "pad" in case:
            idx = idx.clone()
            idx[(torch.rand(B, K, generator=g) < 0.3).to(device)] = -1
        kw["negative_indices"] = idx
        eq["negative_indices"] = idx
        keep = (yn[idx.clamp(min=0).cpu()] != y[:, None]) & (idx.cpu() >= 0)
    if "mask" in case:
        mask = torch.rand(keep.shape, generator=g) > 0.3
        kw["negative_mask"] = mask.to(device)
        keep = keep & mask
        if "negative_indices" in kw:  # masked-out entries may hold anything, out of range included
            kw["negative_indices"] = torch.where(mask.to(device), idx, torch.full_like(idx, 10**6))
    if "negative_indices" in eq:
        eq["negative_indices"] = torch.where(keep.to(device), idx, torch.full_like(idx, -1))
    else:
        eq["negative_mask"] = keep.to(device)
    return a, p, n, kw, eq


def _loss_and_grads(fn, a, p, n, kw, **extra):
    loss = fn(a, p, n, **kw, **extra)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    leaves = [x for x in (a, p, n) if x is not None]
    return loss, torch.autograd.grad(loss, leaves, upstream.to(loss.device, loss.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MODES)
def test_labels_equal_their_mask_and_the_reference(device, dtype, case):
    # K = 37: no tile multiple. The same computation as the mask (the tiles leave out the same entries): equal up to
    # float rounding; against float64 within the dtype's tolerance.
    a, p, n, kw, eq = _inputs(case, dtype=dtype, device=device)
    extra = dict(temperature=0.2, reduction="none")
    loss, grads = _loss_and_grads(cb.info_nce, a, p, n, kw, **extra)
    want, want_grads = _loss_and_grads(cb.info_nce, a, p, n, eq, **extra)
    assert loss.dtype == dtype
    assert_close_scaled(loss, want, tol(dtype, device), "loss vs mask")
    for name, g, w in zip("apn", grads, want_grads):
        assert_close_scaled(g, w, tol(dtype, device), f"grad {name} vs mask")
    f64 = [None if x is None else x.detach().cpu().double().requires_grad_() for x in (a, p, n)]
    ref, ref_grads = _loss_and_grads(info_nce_reference, *f64, {k: v.cpu() for k, v in eq.items()}, **extra)
    assert_close_scaled(loss, ref, tol(dtype, device), "loss")
    for name, g, r in zip("apn", grads, ref_grads):
        assert_close_scaled(g, r, tol(dtype, device), f"grad {name}")
    if case.startswith("shared"):
        assert abs(loss[1].item() - ref[1].item()) < 1e-2 * max(1.0, abs(ref[1].item()))  # one negative left
    # the reference takes the labels as the loss does (its own mask from them): the same numbers as from the mask
    ref_labels, ref_labels_grads = _loss_and_grads(info_nce_reference, *f64, {k: v.cpu() for k, v in kw.items()},
                                                   **extra)
    torch.testing.assert_close(ref_labels, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(ref_labels_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    # the labels mattered
    plain = {k: v for k, v in kw.items() if k == "negative_indices"}
    if "negative_indices" in plain:
        plain["negative_indices"] = plain["negative_indices"].clamp(0, n.shape[0] - 1).cpu()
    unlabelled = info_nce_reference(*f64, **plain, **extra)
    assert (unlabelled - ref).abs().max() > 1e-2


@pytest.mark.parametrize("case", MODES)
def test_equals_the_kept_negatives_anchor_by_anchor(case):
    # An oracle apart from the reference and the mask: anchor i's loss is info_nce over the negatives whose label is
    # not its own (a batch of one).
    a, p, n, kw, _ = _inputs(case, B=6, K=23, d=4)
    loss = cb.info_nce(a, p, n, temperature=0.3, reduction="none", **kw)
    y = kw["labels"]
    for i in range(a.shape[0]):
        keep = torch.ones(1, dtype=torch.bool)
        if case == "in_batch":
            rows = p[(y != y[i]) & (torch.arange(len(y)) != i)]
        elif case.startswith("shared"):
            keep = kw["negative_labels"] != y[i]
            if "negative_mask" in kw:
                keep = keep & kw["negative_mask"][i]
            rows = n[keep]
        elif case.startswith("per_anchor"):
            keep = kw["negative_labels"][i] != y[i]
            if "negative_mask" in kw:  # (a per-anchor mask is and-ed with the labels: or-ing them passed before)
                keep = keep & kw["negative_mask"][i]
            rows = n[i][keep]
        else:
            idx = kw["negative_indices"][i]
            ok = idx >= 0 if "negative_mask" not in kw else kw["negative_mask"][i]
            idx = idx[ok]
            rows = n[idx[kw["negative_labels"][idx] != y[i]]]
        one = cb.info_nce(a[i : i + 1], p[i : i + 1], rows, temperature=0.3, reduction="none")
        torch.testing.assert_close(loss[i : i + 1], one, rtol=1e-12, atol=1e-12)


def test_same_bits_as_the_mask_through_the_shared_tiles():
    # The CPU kernel leaves out the same tile entries whether a mask or the labels name them: the same bits, also
    # across several tiles (K = 1100, B = 300) and with a learnable temperature.
    if not _backend.kernel_serves(torch.device("cpu")):
        pytest.skip("the compiled CPU kernel is not loaded")
    a, p, n, kw, eq = _inputs("shared", B=300, K=1100, d=16, dtype=torch.float32, classes=50)
    t = torch.tensor(0.1, requires_grad=True)
    leaves = [a, p, n, t]
    got = torch.autograd.grad(cb.info_nce(a, p, n, temperature=t, **kw), leaves)
    want = torch.autograd.grad(cb.info_nce(a, p, n, temperature=t, **eq), leaves)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_the_shared_bank_takes_no_mask():
    # The labels reach the op as they are: no (B, K) tensor is made on the way (the point of labels over a mask).
    if not _backend.kernel_serves(torch.device("cpu")):
        pytest.skip("the compiled CPU kernel is not loaded")
    a, p, n, kw, _ = _inputs("shared", B=64, K=500)
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(x, torch.Tensor) and x.numel() >= 64 * 500:
                    seen.append(getattr(func, "__name__", str(func)))
            return out

    with Spy():
        cb.info_nce(a, p, n, **kw)
    assert seen == [], seen


def test_the_reference_takes_labels_of_an_empty_indexed_bank():
    # every index padding (-1) into a bank of no rows: loss 0, as info_nce gives; the labels' gather raised
    # IndexError there (a review's find)
    a, p = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    kw = dict(negative_indices=torch.full((3, 2), -1), labels=torch.tensor([0, 1, 0]),
              negative_labels=torch.empty(0, dtype=torch.long), reduction="none")
    bank = torch.empty(0, 4, dtype=torch.float64)
    assert torch.equal(info_nce_reference(a, p, bank, **kw), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(cb.info_nce(a, p, bank, **kw), info_nce_reference(a, p, bank, **kw))


def test_the_reference_refuses_labels_it_cannot_pair():
    a, p, n = torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 4)
    y, yn = torch.tensor([0, 1, 0]), torch.tensor([0, 1, 1, 2, 0])
    with pytest.raises(ValueError, match="without labels"):
        info_nce_reference(a, p, n, negative_labels=yn)
    with pytest.raises(ValueError, match="without negative_labels"):
        info_nce_reference(a, p, n, labels=y)
    with pytest.raises(ValueError, match="negative_labels=None"):
        info_nce_reference(a, p, None, labels=y, negative_labels=yn)


def test_gradcheck_float64():
    for case in ("shared", "in_batch", "indexed_mask"):
        a, p, n, kw, _ = _inputs(case, B=5, K=7, d=3)
        leaves = [x for x in (a, p, n) if x is not None]

        def fn(*xs, case=case, kw=kw):
            a_, p_ = xs[0], xs[1]
            n_ = None if case == "in_batch" else xs[2]
            return cb.info_nce(a_, p_, n_, temperature=0.5, reduction="none", **kw)

        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("K", [9, 37])
def test_the_fallback_takes_a_labelled_shared_bank(K):
    # Forward-mode AD and differentiating torch.func transforms take the pure-PyTorch fallback (functional._fused),
    # which makes the labels a (B, K) mask: only the in-batch case (labels against themselves, where a transposed
    # mask is the same) reached it, so a transposed one passed (a mutation audit: wrong losses at K = B, a shape
    # error otherwise). Against the kernel's loss and gradients, at K = B = 9 and K = 37.
    import torch.autograd.forward_ad as fwAD

    a, p, n, kw, _ = _inputs("shared", B=9, K=K, d=5)
    want = cb.info_nce(a, p, n, temperature=0.5, reduction="none", **kw)
    with fwAD.dual_level():
        tangent = torch.randn_like(a)
        out = cb.info_nce(fwAD.make_dual(a.detach(), tangent), p.detach(), n.detach(), temperature=0.5,
                          reduction="none", **kw)
        primal, jvp = fwAD.unpack_dual(out)
    assert_close_scaled(primal, want, 1e-12, "forward AD's loss")
    (g_a,) = torch.autograd.grad(want.sum(), [a])
    assert_close_scaled(jvp.sum(), (g_a * tangent).sum(), 1e-10, "forward AD's directional derivative")

    def total(a_):
        return cb.info_nce(a_, p.detach(), n.detach(), temperature=0.5, **kw)

    assert_close_scaled(torch.func.grad(total)(a.detach()), torch.autograd.grad(total(a), [a])[0], 1e-12,
                        "torch.func.grad")


def test_any_integer_dtype_serves_as_labels():
    # as supcon_loss's labels: equal values are the same class (uint64 past 2^63 too: int64 keeps equality)
    a, p, n, kw, eq = _inputs("shared")
    want = cb.info_nce(a, p, n, **eq)
    for dtype in (torch.int32, torch.int16, torch.uint8, torch.uint16, torch.uint32):
        got = cb.info_nce(a, p, n, labels=kw["labels"].to(dtype), negative_labels=kw["negative_labels"].to(dtype))
        torch.testing.assert_close(got, want)


def test_info_nce_lse_and_the_module_take_labels():
    a, p, n, kw, eq = _inputs("shared")
    got_loss, got_lse = cb.info_nce_lse(a, p, n, include_positive=False, **kw)
    want_loss, want_lse = cb.info_nce_lse(a, p, n, include_positive=False, **eq)
    torch.testing.assert_close(got_lse, want_lse)
    torch.testing.assert_close(got_loss, want_loss)
    module = cb.InfoNCE(temperature=0.2)
    torch.testing.assert_close(module(a, p, n, labels=kw["labels"], negative_labels=kw["negative_labels"]),
                               cb.info_nce(a, p, n, 0.2, **eq))


def test_compile_fullgraph():
    a, p, n, kw, eq = _inputs("shared", dtype=torch.float32)
    compiled = torch.compile(lambda a, p, n, y, yn: cb.info_nce(a, p, n, labels=y, negative_labels=yn),
                             fullgraph=True)
    got = compiled(a, p, n, kw["labels"], kw["negative_labels"])
    torch.testing.assert_close(got, cb.info_nce(a, p, n, **eq))
    got.backward()
    assert a.grad is not None and n.grad is not None


a0, p0, n0 = torch.randn(4, 3), torch.randn(4, 3), torch.randn(6, 3)
y0, yn0 = torch.tensor([0, 1, 0, 2]), torch.tensor([0, 1, 1, 2, 2, 0])


@pytest.mark.parametrize("call,exc,text", [
    (lambda: cb.info_nce(a0, p0, n0, labels=y0), ValueError, "labels was given without negative_labels"),
    (lambda: cb.info_nce(a0, p0, n0, negative_labels=yn0), ValueError, "negative_labels was given without labels"),
    (lambda: cb.info_nce(a0, p0, labels=y0, negative_labels=y0), ValueError,
     "in-batch negatives are the positives, whose labels are labels"),
    (lambda: cb.info_nce(a0, p0, n0, labels=y0.float(), negative_labels=yn0), TypeError,
     "labels must be an integer tensor of shape (B,), got dtype torch.float32"),
    (lambda: cb.info_nce(a0, p0, n0, labels=y0 > 0, negative_labels=yn0), TypeError, "labels must be an integer"),
    (lambda: cb.info_nce(a0, p0, n0, labels=[0, 1, 0, 2], negative_labels=yn0), TypeError,
     "labels must be an integer tensor of shape (B,) = (4,), got list"),
    (lambda: cb.info_nce(a0, p0, n0, labels=y0[:3], negative_labels=yn0), ValueError,
     "labels must have shape (B,) = (4,), got (3,)"),
    (lambda: cb.info_nce(a0, p0, n0, labels=y0, negative_labels=yn0[:5]), ValueError,
     "negative_labels must have shape (K,) for a shared bank (K, d) = (6,), got (5,)"),
    (lambda: cb.info_nce(a0, p0, n0.expand(4, 6, 3), labels=y0, negative_labels=yn0), ValueError,
     "negative_labels must have shape (B, K) for negatives (B, K, d) = (4, 6), got (6,)"),
    (lambda: cb.info_nce(a0, p0, n0, negative_indices=torch.zeros(4, 2, dtype=torch.long), labels=y0,
                         negative_labels=yn0[:4]), ValueError, "negative_labels must have shape (M,), the rows of"),
    (lambda: cb.info_nce(a0, p0, n0, labels=y0.to("meta"), negative_labels=yn0), ValueError,
     "labels is on meta but the features are on cpu"),
    (lambda: cb.info_nce(a0, p0, n0, negative_indices=torch.tensor([[0, 6]] * 4), labels=y0,
                         negative_labels=yn0), IndexError, "negative_indices must lie in [0, M) = [0, 6)"),
    # the negatives' own shape named, not negative_labels' (a review's find)
    (lambda: cb.info_nce(a0, p0, n0.expand(4, 6, 3), negative_indices=torch.zeros(4, 2, dtype=torch.long),
                         labels=y0, negative_labels=yn0), ValueError, "negatives must have shape (M, d) when"),
    (lambda: cb.info_nce(a0, p0, torch.randn(5, 6, 3), labels=y0,
                         negative_labels=torch.zeros(5, 6, dtype=torch.long)),
     ValueError, "negatives of shape (B, K, d) must have B = 4 rows"),
])
def test_bad_labels_are_refused_by_name(call, exc, text):
    with pytest.raises(exc) as info:
        call()
    assert text in str(info.value)


@pytest.mark.skipif(not _backend.EXTENSION_LOADED, reason="the compiled ops are not loaded")
def test_the_op_checks_its_labels():
    op = torch.ops.contrastbound.info_nce_fwd
    base = (a0, p0, n0, None, 2.0, True, True, False, False, None, None)
    with pytest.raises(ValueError, match="labels and negative_labels must be given together"):
        op(*base, y0, None)
    with pytest.raises(TypeError, match="labels must be int64"):
        op(*base, y0.int(), yn0)
    with pytest.raises(ValueError, match=r"negative_labels must have shape \(K,\)"):
        op(*base, y0, yn0[:5])
    with pytest.raises(ValueError, match="labels need a shared bank"):
        op(a0, p0, n0, torch.zeros(4, 2, dtype=torch.long), 2.0, True, True, False, False, None, None, y0, yn0)
    loss, _, _ = op(*base, y0, yn0)
    keep = yn0[None, :] != y0[:, None]
    want, _, _ = op(*base[:-1], keep)
    torch.testing.assert_close(loss, want)


def test_a_labelled_queue_serves_as_the_bank():
    # README's recipe: a NegativeQueue with labels=True gives the bank and its labels
    a, p, n, kw, eq = _inputs("shared", K=40)
    queue = cb.NegativeQueue(40, n.shape[1], labels=True, dtype=torch.float64)
    queue.enqueue(n, kw["negative_labels"])
    got = cb.info_nce(a, p, queue.negatives(), labels=kw["labels"], negative_labels=queue.labels())
    torch.testing.assert_close(got, cb.info_nce(a, p, n, **eq))


def test_an_index_past_the_bank_is_refused_where_its_clamped_row_shares_the_label():
    # The labels are looked up at indices clamped into [0, M); an index of M reads row M - 1's label, and where that
    # is the anchor's own the entry must not be turned into padding (-1) before the range check: it is refused, as
    # without labels (a mutation audit: dropping the upper bound from the label test gave loss 0, no error).
    g = torch.Generator().manual_seed(0)
    a, p, bank = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g), torch.randn(6, 5, generator=g)
    idx = torch.tensor([[0, 1], [2, 3], [4, 6]])
    kw = dict(labels=torch.tensor([0, 1, 2]), negative_labels=torch.tensor([0, 0, 1, 1, 2, 2]))
    with pytest.raises(IndexError, match=r"negative_indices must lie in \[0, M\) = \[0, 6\)"):
        cb.info_nce(a, p, bank, negative_indices=idx, **kw)
