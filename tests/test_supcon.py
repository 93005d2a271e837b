"""supcon_loss (supervised contrastive, L_out) against the materialised reference and nt_xent."""

from __future__ import annotations

import math
import textwrap
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None

import contrastbound as cb
from contrastbound import _backend
from contrastbound.reference import supcon_reference

from conftest import DEVICES, PEAK_RSS_HELPERS, assert_close_scaled, child_json, tol

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
    assert torch.autograd.gradcheck(lambda f_, t_: cb.supcon_loss(f_, labels, t_, reduction="none"), (f, t),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda f_: cb.supcon_loss(f_, labels, 0.4, normalize=False), (f,),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


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
    assert_close_scaled(got.double(), want, tol(dtype, device), "loss")
    (g,), (g64,) = torch.autograd.grad(got, f), torch.autograd.grad(want, f64)
    assert_close_scaled(g.double(), g64, tol(dtype, device), "grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("labelled", [False, True])
def test_half_gradients_where_the_positives_dominate_stay_at_the_rounding_floor(dtype, labelled):
    """Two close views per sample at T = 0.07: each row's softmax sits on its positives, so the denominators'
    gradient and the positives' nearly cancel. Summed in float32 and rounded once (the CPU widens half features for
    the kernel), the gradient is within 2x of the float64 one rounded to the dtype; each part rounded on its own
    gave 0.37 (bfloat16) and 3.2e-2 (float16) relative error, 10-200x that (an audit's case)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    views = torch.stack([x, x + 0.3 * torch.randn(64, 32, generator=g)], 1).to(dtype)
    labels = torch.arange(64) // 2 if labelled else None  # labelled: two samples per class, four rows
    f64 = views.double().requires_grad_()
    f = views.clone().requires_grad_()
    want = supcon_reference(f64, torch.arange(64) if labels is None else labels, 0.07)
    (g64,) = torch.autograd.grad(want, f64)
    (got,) = torch.autograd.grad(cb.supcon_loss(f, labels, 0.07), f)
    floor = float((g64.to(dtype).double() - g64).norm() / g64.norm())
    err = float((got.double() - g64).norm() / g64.norm())
    assert err < 2 * floor, (err, floor)


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


@pytest.mark.parametrize("bank", [False, True])
def test_never_negative_where_the_positives_dominate(bank):
    # loss_i = lse_i - mean positive logit >= log(positives) >= 0, as lse_i runs over the positives too. Where a
    # positive is a near copy of the anchor at logits ~3.7e3 (unnormalised features, T = 0.01), rows 0 and 2 have a
    # true loss of 3e-5 and 8e-5 (row 4, close to anchor 0 and of another label, ~10 below the positive's logit),
    # below float32's spacing there (2.4e-4), and the difference of the two rounded terms comes out -4.9e-4 for both
    # without the clamp. The value is clamped at 0; the gradient is the unclamped one's (straight through: 0.014 and
    # 0.036 at most here), not a plain clamp's 0. The bank's rows (-f[:3]: each 2200 or more below an anchor's
    # positive logit) add nothing to the sums and take the labelled-bank path. (The case before 2026-12-07, unit
    # features, never went below 0: the test passed without the clamp and with a plain clamp_min.)
    g = torch.Generator().manual_seed(25)
    base = torch.randn(2, 4, generator=g) * 3
    near = base + 1e-3 * torch.randn(2, 4, generator=g)  # rows 2, 3: the positives of rows 0, 1
    f = torch.cat([base, near, base[:1] + 0.02 * torch.randn(1, 4, generator=g)])
    f.requires_grad_()
    labels = torch.tensor([0, 1, 0, 1, 2])
    kw = dict(bank=-f[:3].detach(), bank_labels=torch.tensor([5, 6, 7])) if bank else {}
    loss = cb.supcon_loss(f, labels, 0.01, normalize=False, reduction="none", **kw)
    f64 = f.detach().double().requires_grad_()
    ref = supcon_reference(f64, labels, 0.01, normalize=False, reduction="none",
                           **{k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()})
    assert (loss >= 0).all(), loss
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-3, rtol=0)
    clamped = ((loss == 0) & (ref > 1e-5)).nonzero().flatten().tolist()
    assert clamped, (loss, ref)  # the case reaches the clamp (else it tests nothing; rows 0 and 2 here)
    for i in clamped:
        (grad,) = torch.autograd.grad(loss[i], f, retain_graph=True)
        (want,) = torch.autograd.grad(ref[i], f64, retain_graph=True)
        assert want.abs().max() > 5e-3
        torch.testing.assert_close(grad.double(), want, atol=1e-4, rtol=1e-3)


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


# A bank (queue) of 11 rows: labels that match batch labels (3, 7, -2, 10**12), labels of no batch row (5, 0),
# a duplicate row of the batch's and some rows of one class only.
BANK_LABELS = torch.tensor([3, 5, 7, 10**12, -2, 0, 3, 3, 7, 5, 10**12])


def _bank(d, seed=20, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(BANK_LABELS), d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("shape,labels,bank_labels", [
    ((9, 6), LABELS, True), ((9, 6), LABELS, False), ((9, 3, 6), LABELS, True), ((5, 2, 4), None, False),
    ((7, 1, 5), torch.tensor([0, 1, 0, 2, 2, 2, 9]), True), ((7, 1, 5), torch.tensor([0, 1, 0, 2, 2, 2, 9]), False)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bank_matches_the_reference(shape, labels, bank_labels, normalize, reduction):
    # bank rows in every anchor's denominator and, with labels, among the positives of their class; gradients in
    # the features, the bank (here it requires grad) and a learnable temperature
    f = _case(shape, seed=len(shape))
    bank = _bank(shape[-1], requires_grad=True)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    kw = dict(bank=bank, bank_labels=BANK_LABELS if bank_labels else None, normalize=normalize,
              reduction=reduction)
    got, want = cb.supcon_loss(f, labels, t, **kw), supcon_reference(f, labels, t, **kw)
    assert got.shape == want.shape == ({"none": shape[:-1]}.get(reduction, ()))
    assert_close_scaled(got, want, 1e-12, "loss")
    upstream = torch.rand(got.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    grads = [torch.autograd.grad(x, (f, bank, t), upstream) for x in (got, want)]
    for name, x, y in zip(["features", "bank", "temperature"], *grads):
        assert_close_scaled(x, y, 1e-11, f"grad {name}")


def test_bank_changes_the_loss_as_it_should():
    # (checks of the reference's own reading) the bank's labelled rows are positives: an anchor whose class has no
    # other batch row gets a loss and joins the mean; a bank whose labels match no anchor is negatives only, as
    # bank_labels=None; an empty bank is no bank; bank rows are not anchors (the loss's shape is the batch's)
    f, bank = _case((9, 6), seed=2), _bank(6)
    alone = cb.supcon_loss(f, LABELS, 0.3, reduction="none")
    assert alone[6] == 0  # label 10**12 has one batch row ...
    with_bank = cb.supcon_loss(f, LABELS, 0.3, bank=bank, bank_labels=BANK_LABELS, reduction="none")
    assert with_bank.shape == (9,) and with_bank[6] > 0  # ... and two bank rows
    mean = cb.supcon_loss(f, LABELS, 0.3, bank=bank, bank_labels=BANK_LABELS)
    assert_close_scaled(mean, with_bank.sum() / 9, 1e-15, "mean over the 9 anchors with a positive")
    foreign = BANK_LABELS + 1000
    negatives_only = cb.supcon_loss(f, LABELS, 0.3, bank=bank, bank_labels=foreign, reduction="none")
    assert_close_scaled(negatives_only, cb.supcon_loss(f, LABELS, 0.3, bank=bank, reduction="none"), 1e-15, "loss")
    assert (negatives_only[alone > 0] > alone[alone > 0]).all()  # more negatives, same positives: a larger loss
    empty = cb.supcon_loss(f, LABELS, 0.3, bank=bank[:0], bank_labels=BANK_LABELS[:0], reduction="none")
    assert_close_scaled(empty, alone, 0.0, "empty bank")
    # (an audit's find) an empty bank that requires grad gets an empty gradient, as info_nce gives it, not None
    for labels in (BANK_LABELS[:0], None):
        rows = bank[:0].detach().requires_grad_()
        (g,) = torch.autograd.grad(cb.supcon_loss(f, LABELS, 0.3, bank=rows, bank_labels=labels), [rows])
        assert g.shape == rows.shape
    # (a review's find) the result's dtype is promoted with an empty bank's too: a filling float32 queue kept a
    # bfloat16 loss until its first keys arrived
    half = f.detach().bfloat16()
    for rows in (0, 3):
        assert cb.supcon_loss(half, LABELS, 0.3, bank=bank[:rows].float()).dtype == torch.float32


def test_bank_gradcheck_float64():
    f = _case((5, 2, 3), seed=3)
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    labels, bank = torch.tensor([0, 1, 0, 5, 1]), _bank(3, requires_grad=True)[:6]
    bank_labels = torch.tensor([5, 0, 2, 1, 1, 7])
    assert torch.autograd.gradcheck(
        lambda f_, b_, t_: cb.supcon_loss(f_, labels, t_, bank=b_, bank_labels=bank_labels, reduction="none"),
        (f, bank, t), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda f_, b_: cb.supcon_loss(f_, None, 0.4, bank=b_, normalize=False),
                                    (f, bank), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_bank_label_sums_in_slices_equal_one_pass():
    # the bank's per-label sums are formed a slice of rows at a time: slices of 1, 3 and 4 rows give the one pass's
    # sums and counts (a bank larger than the budget of 2^20 values takes this path in supcon_loss)
    from contrastbound.functional import _add_bank_to_label_sums

    ordered = torch.sort(LABELS).values
    slot = torch.searchsorted(ordered, LABELS)
    rows = _case((9, 6), seed=4).detach()
    sums0 = torch.zeros_like(rows).index_add(0, slot, rows)
    count0 = torch.zeros(9, dtype=torch.float64).index_add(0, slot, torch.ones(9, dtype=torch.float64))
    bank = _bank(6)
    whole = _add_bank_to_label_sums(sums0, count0, ordered, bank, BANK_LABELS, True, torch.float64)
    for budget in (6, 18, 24):
        part = _add_bank_to_label_sums(sums0, count0, ordered, bank, BANK_LABELS, True, torch.float64,
                                       budget=budget)
        assert_close_scaled(part[0], whole[0], 1e-15, f"sums, budget {budget}")
        assert torch.equal(part[1], whole[1])
    # the counts: each label's batch rows plus its bank rows (labels 5 and 0 are in no batch row: not counted)
    first = {int(v): int(torch.searchsorted(ordered, v)) for v in LABELS}
    for label, n in ((3, 3 + 3), (7, 3 + 2), (-2, 2 + 1), (10**12, 1 + 2)):
        assert whole[1][first[label]] == n


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype,acc", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                       (torch.bfloat16, torch.float32), (torch.float16, torch.float64)])
def test_bank_label_sums_gradient_in_slices(normalize, dtype, acc):
    # A bank that needs a gradient: the sums are an autograd.Function that keeps no rows and forms the bank's
    # gradient a slice at a time. Its values and gradient are autograd's through F.normalize and index_add (a row
    # whose norm is below the clamp included), in the bank's dtype, for slices of 1, 3 rows and one pass.
    from contrastbound.functional import _add_bank_to_label_sums

    ordered = torch.sort(LABELS).values
    g = torch.Generator().manual_seed(11)
    sums0 = torch.randn(9, 6, generator=g, dtype=torch.float64).to(acc)
    count0 = torch.ones(9, dtype=acc)
    weights = torch.randn(9, 6, generator=g, dtype=torch.float64).to(acc)
    bank = _bank(6, dtype=dtype)
    if dtype != torch.float16:  # (its gradient, 1e12 times the upstream one, is past float16's range)
        bank[4] *= 1e-14  # (a norm below the clamp's 1e-12, not 0: only the clamped Jacobian gets it right)
    bank.requires_grad_()
    # the reference: each bank row at its label's first position in `ordered`, rows of labels not there dropped
    at = torch.searchsorted(ordered, BANK_LABELS).clamp_max(8)
    keep = ordered[at] == BANK_LABELS
    rows = bank.to(acc)
    if normalize:
        rows = torch.nn.functional.normalize(rows, dim=-1, eps=1e-12)
    want = sums0.index_add(0, at[keep], rows[keep])
    (g_want,) = torch.autograd.grad((want * weights).sum(), bank)
    for budget in (6, 18, 1 << 20):
        sums, _ = _add_bank_to_label_sums(sums0, count0, ordered, bank, BANK_LABELS, normalize, acc,
                                          budget=budget)
        add = sums.grad_fn.next_functions[0][0]  # (its path taken: the sums' slice of batch sums + the Function's)
        assert type(add.next_functions[1][0]).__name__ == "_BankLabelSumsBackward", add.next_functions
        assert_close_scaled(sums, want, 4 * torch.finfo(acc).eps, f"sums, budget {budget}")
        (got,) = torch.autograd.grad((sums * weights).sum(), bank)
        assert got.dtype == dtype
        assert_close_scaled(got.double(), g_want.double(), 4 * torch.finfo(dtype).eps, f"gradient, budget {budget}")
    if normalize and dtype != torch.float16:
        assert g_want[4].abs().max() > 1e6  # (the clamped row: I / 1e-12, as F.normalize)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,bank_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                              (torch.float32, torch.float64)])
def test_bank_dtypes_against_float64(device, dtype, bank_dtype):
    # the same rounded inputs in float64; the bank's part runs in the bank's dtype (features cast to it), the
    # result in the promoted dtype
    f = _case((40, 2, 16), seed=6, dtype=dtype).detach().to(device).requires_grad_()
    labels = torch.randint(0, 12, (40,), generator=torch.Generator().manual_seed(2)).to(device)
    bank = torch.randn(300, 16, generator=torch.Generator().manual_seed(5)).to(device, bank_dtype)
    bank_labels = torch.randint(0, 15, (300,), generator=torch.Generator().manual_seed(6)).to(device)
    got = cb.supcon_loss(f, labels, 0.1, bank=bank, bank_labels=bank_labels)
    f64 = f.detach().double().requires_grad_()
    want = supcon_reference(f64, labels, 0.1, bank=bank.double(), bank_labels=bank_labels)
    assert got.dtype == torch.promote_types(dtype, bank_dtype)
    tol_ = max(tol(dtype, device), tol(bank_dtype, device))
    assert_close_scaled(got.double(), want, tol_, "loss")
    (g,), (g64,) = torch.autograd.grad(got, f), torch.autograd.grad(want, f64)
    assert_close_scaled(g.double(), g64, tol_, "grad")


def test_bank_torch_compile_fullgraph():
    f = _case((16, 2, 8), seed=8, dtype=torch.float32)
    labels = torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(3))
    bank = torch.randn(50, 8, generator=torch.Generator().manual_seed(4))
    bank_labels = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(lambda f_, y_, b_, yb_: cb.supcon_loss(f_, y_, 0.1, bank=b_, bank_labels=yb_),
                             fullgraph=True)
    got, want = compiled(f, labels, bank, bank_labels), cb.supcon_loss(f, labels, 0.1, bank=bank,
                                                                        bank_labels=bank_labels)
    assert_close_scaled(got, want, 1e-6, "loss")
    assert_close_scaled(torch.autograd.grad(got, f)[0], torch.autograd.grad(want, f)[0], 1e-6, "grad")


def test_bank_under_torch_func():
    # torch.func.grad in the features and in the bank (the reference serves the transforms), vmap over banks
    f, bank = _case((6, 2, 4), seed=11).detach(), _bank(4)[:5]
    labels, bank_labels = torch.tensor([0, 1, 0, 2, 1, 3]), torch.tensor([3, 0, 9, 1, 1])
    for arg, call in ((f, lambda x, fn: fn(x, labels, 0.3, bank=bank, bank_labels=bank_labels)),
                      (bank, lambda x, fn: fn(f, labels, 0.3, bank=x, bank_labels=bank_labels))):
        got = torch.func.grad(lambda x: call(x, cb.supcon_loss))(arg)
        leaf = arg.clone().requires_grad_()
        (want,) = torch.autograd.grad(call(leaf, supcon_reference), leaf)
        assert_close_scaled(got, want, 1e-12, "torch.func.grad")
    banks = _case((3, 5, 4), seed=12).detach()
    got = torch.vmap(lambda b: cb.supcon_loss(f, labels, 0.3, bank=b, bank_labels=bank_labels))(banks)
    want = torch.stack([supcon_reference(f, labels, 0.3, bank=b, bank_labels=bank_labels) for b in banks])
    assert_close_scaled(got, want, 1e-12, "vmap over banks")


def test_bank_of_a_filling_queue_compiles_once():
    # (a review's find) the bank's rows were summed by label in slices over K, a loop that specialised the graph to
    # K: a new graph at every size of a filling queue, and fullgraph=True failed at the 9th. Now at most 2 graphs
    # for 10 sizes (one for the first size, one with K dynamic), each step's values as eager's
    torch._dynamo.reset()
    frames = []
    compiled = torch.compile(lambda f_, y_, b_, yb_: cb.supcon_loss(f_, y_, 0.1, bank=b_, bank_labels=yb_),
                             fullgraph=True, backend=lambda gm, ex: frames.append(gm) or gm.forward)
    queue = cb.NegativeQueue(200, 8, labels=True)
    g = torch.Generator().manual_seed(15)
    try:
        for step in range(10):
            f = torch.randn(16, 2, 8, generator=g, requires_grad=True)
            y = torch.randint(0, 5, (16,), generator=g)
            got, want = (fn(f, y, queue.negatives(), queue.labels()) for fn in (compiled, lambda *a: cb.supcon_loss(
                a[0], a[1], 0.1, bank=a[2], bank_labels=a[3])))
            assert_close_scaled(got, want, 1e-6, f"step {step}")
            queue.enqueue(f[:, 1].detach(), y)
    finally:
        torch._dynamo.reset()
    assert len(frames) <= 2, len(frames)


def test_bank_labels_of_any_layout():
    # strided labels (a slice with a step) and a transposed bank: the same values, and no warning (searchsorted
    # warned about non-contiguous values)
    import warnings

    f, bank = _case((9, 6), seed=13), _bank(6)
    labels2 = torch.stack([BANK_LABELS, BANK_LABELS], 1).reshape(-1)[::2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = cb.supcon_loss(f, LABELS, 0.3, bank=bank.T.contiguous().T, bank_labels=labels2)
    assert_close_scaled(got, supcon_reference(f, LABELS, 0.3, bank=bank, bank_labels=BANK_LABELS), 1e-12, "loss")


def test_bank_from_a_labelled_queue():
    # the module over NegativeQueue(labels=True): the queue's rows and labels in the order it serves them
    queue = cb.NegativeQueue(7, 5, labels=True, dtype=torch.float64)
    keys = _case((10, 5), seed=9).detach()
    queue.enqueue(keys[:4], torch.tensor([0, 1, 2, 3]))
    queue.enqueue(keys[4:], torch.tensor([4, 0, 1, 2, 3, 9]))  # wraps: the first three are overwritten
    assert torch.equal(queue.labels(), torch.tensor([2, 3, 9, 3, 4, 0, 1]))
    assert torch.equal(queue.negatives(), keys[[7, 8, 9, 3, 4, 5, 6]])
    f, labels = _case((6, 5), seed=10), torch.tensor([0, 1, 1, 4, 8, 8])
    got = cb.SupCon(0.2)(f, labels, queue.negatives(), queue.labels())
    want = supcon_reference(f, labels, 0.2, bank=keys[[7, 8, 9, 3, 4, 5, 6]],
                            bank_labels=torch.tensor([2, 3, 9, 3, 4, 0, 1]))
    assert_close_scaled(got, want, 1e-12, "loss")


@pytest.mark.parametrize("call,exc,text", [
    (lambda: cb.supcon_loss(torch.randn(4, 3), torch.arange(4), bank_labels=torch.arange(2)), ValueError,
     "bank_labels was given without bank"),
    (lambda: cb.supcon_loss(torch.randn(4, 2, 3), None, bank=torch.randn(2, 3), bank_labels=torch.arange(2)),
     ValueError, "bank_labels was given with labels=None"),
    (lambda: cb.supcon_loss(torch.randn(4, 3), torch.arange(4), bank=torch.randn(2, 4)), ValueError,
     "bank must have shape (K, d) with the features' d = 3, got (2, 4)"),
    (lambda: cb.supcon_loss(torch.randn(4, 3), torch.arange(4), bank=torch.randn(3)), ValueError,
     "bank must have shape (K, d)"),
    (lambda: cb.supcon_loss(torch.randn(4, 3), torch.arange(4), bank=torch.ones(2, 3, dtype=torch.int64)),
     TypeError, "bank must be a floating tensor"),
    (lambda: cb.supcon_loss(torch.randn(4, 3), torch.arange(4), bank=[[0.0] * 3]), TypeError,
     "bank must be a torch.Tensor of shape (K, d)"),
    (lambda: cb.supcon_loss(torch.randn(4, 3), torch.arange(4), bank=torch.randn(2, 3, device="meta")),
     ValueError, "bank is on meta but features is on cpu"),
    (lambda: cb.supcon_loss(torch.randn(4, 3), torch.arange(4), bank=torch.randn(2, 3), bank_labels=torch.zeros(2)),
     TypeError, "bank_labels must be an integer tensor of shape (K,) = (2,), got dtype torch.float32"),
    (lambda: cb.supcon_loss(torch.randn(4, 3), torch.arange(4), bank=torch.randn(2, 3), bank_labels=torch.arange(3)),
     ValueError, "bank_labels must have shape (K,) = (2,), got (3,)"),
    (lambda: cb.supcon_loss(torch.randn(4, 3), torch.arange(4), bank=torch.randn(2, 3), bank_labels=[0, 1]),
     TypeError, "bank_labels must be an integer tensor of shape (K,) or None, got list"),
    (lambda: cb.supcon_loss(torch.randn(4, 3), torch.arange(4), bank=torch.randn(2, 3),
                            bank_labels=torch.arange(2, device="meta")), ValueError,
     "bank_labels is on meta but features is on cpu"),
])
def test_bank_bad_input_is_refused_by_name(call, exc, text):
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


    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(n=st.integers(1, 10), views=st.integers(0, 3), d=st.integers(1, 6), k=st.integers(0, 12),
           classes=st.integers(1, 6), labelled=st.booleans(), t=st.floats(0.05, 5.0), normalize=st.booleans(),
           seed=st.integers(0, 2**31 - 1))
    def test_property_bank_matches_the_reference(n, views, d, k, classes, labelled, t, normalize, seed):
        # any sizes, a bank of K >= 0 rows with labels from a range wider than the batch's (rows of no anchor's
        # class) or none: loss and gradients (features and bank) as the reference's
        g = torch.Generator().manual_seed(seed)
        shape = (n, d) if views == 0 else (n, views, d)
        f = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
        bank = torch.randn(k, d, generator=g, dtype=torch.float64, requires_grad=True)
        labels = torch.randint(0, classes, (n,), generator=g)
        bank_labels = torch.randint(0, classes + 2, (k,), generator=g) if labelled else None
        got = cb.supcon_loss(f, labels, t, bank=bank, bank_labels=bank_labels, normalize=normalize)
        want = supcon_reference(f, labels, t, bank=bank, bank_labels=bank_labels, normalize=normalize)
        rows = torch.cat([f.detach().reshape(-1, d), bank.detach()])
        norms = rows.norm(dim=1)
        logits = 1.0 / t if normalize else norms.max().item() ** 2 / t
        slope = (1.0 / norms.min().item() if normalize else norms.max().item()) / t
        assert_close_scaled(got, want, 1e-12, "loss", floor=logits)
        for name, x, y in zip(("features", "bank"), torch.autograd.grad(got, (f, bank), allow_unused=True),
                              torch.autograd.grad(want, (f, bank), allow_unused=True)):
            x = torch.zeros_like(y) if x is None and y is not None else x
            y = torch.zeros_like(x) if y is None and x is not None else y
            if x is not None:
                assert_close_scaled(x, y, 1e-11, f"grad {name}", floor=slope)


MEMORY_SCRIPT = PEAK_RSS_HELPERS + textwrap.dedent(
    """
    import json
    import torch
    import contrastbound as cb

    torch.set_num_threads(2)  # (the kernel's per-thread partial sums are (B, d) each)
    N, d = 2 ** 14, 32
    torch.manual_seed(0)
    f = torch.randn(N, d, requires_grad=True)
    labels = torch.randint(0, 100, (N,))

    extra = []
    for _ in range(2):  # the first call with its one-off costs (code pages, thread pool), then a training step's
        f.grad = None
        reset_hwm()
        base = hwm_mib()
        cb.supcon_loss(f, labels, 0.1).backward()
        extra.append(hwm_mib() - base)
    print(json.dumps({"extra_mib": extra[0], "step_copies": extra[1] / (N * d * 4 / 2 ** 20),
                      "matrix_mib": N * N * 4 / 2 ** 20}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not _backend.HAS_CPU_KERNEL, reason="compiled CPU kernel not loaded")
def test_memory_is_far_below_the_similarity_matrix():
    # N = 2^14 rows: the N x N logits alone take 1 GiB; the fused loss keeps O(N d) beside its tiles (34 MiB, the
    # first call's one-off costs included, 2026-12-08). A step's peak in float32 copies of the features: 11.0 in
    # 3 runs (the kernel's call up to 5 for a moment, then the positives' float64 rows); 12.9 while the features were
    # widened to float64 twice, once for the label sums and once for the dot products.
    r = child_json(MEMORY_SCRIPT)
    assert r["extra_mib"] < r["matrix_mib"] / 20, r
    assert r["step_copies"] < 12, r


BANK_MEMORY_SCRIPT = PEAK_RSS_HELPERS + textwrap.dedent(
    """
    import json
    import torch
    import contrastbound as cb

    N, K, d = 256, 2 ** 19, 32
    torch.manual_seed(0)
    f = torch.randn(N, d, requires_grad=True)
    labels = torch.randint(0, 100, (N,))
    bank, bank_labels = torch.randn(K, d), torch.randint(0, 100, (K,))

    reset_hwm()
    base = hwm_mib()
    cb.supcon_loss(f, labels, 0.1, bank=bank, bank_labels=bank_labels).backward()
    print(json.dumps({"extra_mib": hwm_mib() - base, "matrix_mib": N * K * 4 / 2 ** 20}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not _backend.HAS_CPU_KERNEL, reason="compiled CPU kernel not loaded")
def test_bank_memory_is_far_below_the_logits():
    # a labelled bank of K = 2^19 rows: the N x K logits take 512 MiB, the bank itself 64 MiB; the loss keeps the
    # kernel's tiles, O(K) label slots and 4 MiB slices of normalised rows (30 MiB measured, 2026-12-01; 27.7 MiB
    # in each of 8 runs with the mmap threshold fixed, 2026-12-07)
    r = child_json(BANK_MEMORY_SCRIPT)
    assert r["extra_mib"] < r["matrix_mib"] / 8, r


COMPILED_BANK_MEMORY_SCRIPT = PEAK_RSS_HELPERS + textwrap.dedent(
    """
    import json
    import torch
    import contrastbound as cb

    N, K, d = 256, 2 ** 19, 128
    torch.manual_seed(0)
    f = torch.randn(N, d, requires_grad=True)
    labels = torch.randint(0, 100, (N,))
    bank, bank_labels = torch.randn(K, d), torch.randint(0, 100, (K,))
    loss_fn = torch.compile(lambda f_, y_, b_, yb_: cb.supcon_loss(f_, y_, 0.1, bank=b_, bank_labels=yb_),
                            fullgraph=True)
    for _ in range(2):  # (the first call compiles; the second's peak is the step's own)
        f.grad = None
        reset_hwm()
        base = hwm_mib()
        loss = loss_fn(f, labels, bank, bank_labels)
        loss.backward()
    eager = cb.supcon_loss(f.detach(), labels, 0.1, bank=bank, bank_labels=bank_labels)
    print(json.dumps({"extra_mib": hwm_mib() - base, "rows_mib": K * d * 4 / 2 ** 20,
                      "rel_diff": abs(loss.item() - eager.item()) / abs(eager.item())}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not _backend.HAS_CPU_KERNEL, reason="compiled CPU kernel not loaded")
def test_compiled_bank_keeps_no_copy_of_the_rows():
    # Under torch.compile the bank's per-label sums are one index_add over all K normalised rows (a loop over
    # slices would make one graph per bank size); inductor fuses the normalisation into the sums, so no (K, d)
    # copy of the rows is formed: 18-19 MiB beyond the inputs at K = 2^19 and 2^20, d = 128 (torch 2.13, the
    # rows 256 / 512 MiB; eager 32-36 MiB, 2026-12-06). A graph that materialised them would hold at least the rows.
    r = child_json(COMPILED_BANK_MEMORY_SCRIPT)
    assert r["rel_diff"] < 1e-5, r
    assert r["extra_mib"] < r["rows_mib"] / 4, r


BANK_GRAD_MEMORY_SCRIPT = PEAK_RSS_HELPERS + textwrap.dedent(
    """
    import json
    import torch
    import contrastbound as cb

    N, K, d = 64, 2 ** 19, 64
    torch.manual_seed(0)
    f = torch.randn(N, 2, d, requires_grad=True)
    labels = torch.randint(0, 10, (N,))
    bank, bank_labels = torch.randn(K, d, requires_grad=True), torch.randint(0, 10, (K,))
    for _ in range(2):  # (the second call's peak: the first one's buffers are the allocator's by then)
        bank.grad = None
        reset_hwm()
        base = hwm_mib()
        loss = cb.supcon_loss(f, labels, 0.1, bank=bank, bank_labels=bank_labels)
        forward = hwm_mib() - base
        loss.backward()
    print(json.dumps({"forward_mib": forward, "extra_mib": hwm_mib() - base, "grad_mib": K * d * 4 / 2 ** 20}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not _backend.HAS_CPU_KERNEL, reason="compiled CPU kernel not loaded")
def test_bank_gradient_memory():
    # A labelled bank that needs a gradient: its per-label sums kept every slice of normalised rows from forward to
    # backward (a bank-sized copy) and autograd sliced a bank-sized zero gradient for each (K = 2^20, d = 64:
    # 790 MiB beyond the inputs for a 256 MiB gradient, 282 MiB in forward; 2026-12-06). Now forward keeps the
    # kernel's O(K) and the slices' budget, backward the kernel's bank gradient and the sums' (539 MiB measured).
    r = child_json(BANK_GRAD_MEMORY_SCRIPT)
    assert r["forward_mib"] < r["grad_mib"] / 4, r
    assert r["extra_mib"] < 2.5 * r["grad_mib"], r


def test_strided_labels_give_no_warning():
    # labels as a column of a targets tensor (non-contiguous): torch.searchsorted warned "input value tensor is
    # non-contiguous" at every call (a review's find); the loss was and is the contiguous labels' loss
    targets = torch.randint(0, 3, (8, 2), generator=torch.Generator().manual_seed(0))
    f = _case((8, 16), seed=9)
    y = targets[:, 0]
    assert not y.is_contiguous()
    bank = _bank(16)[:5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = cb.supcon_loss(f, y, 0.2, bank=bank, bank_labels=targets[:5, 1])
    want = cb.supcon_loss(f, y.contiguous(), 0.2, bank=bank, bank_labels=targets[:5, 1].contiguous())
    assert torch.isfinite(got) and torch.equal(got, want)


def test_bank_edge_cases_from_a_mutation_audit():
    # each of these checks failed to catch a mutant of this session's code (a mutation audit, 2026-12-01)
    # float32 rows past float16's range against a float16 bank: normalised before the cast (else NaN)
    g = torch.Generator().manual_seed(0)
    f = torch.randn(6, 8, generator=g) * 1e5
    y, b, yb = torch.tensor([0, 1, 0, 1, 2, 2]), torch.randn(5, 8, generator=g).half(), torch.tensor([0, 1, 2, 3, 0])
    got, want = cb.supcon_loss(f, y, bank=b, bank_labels=yb), supcon_reference(f, y, bank=b, bank_labels=yb)
    assert torch.isfinite(got) and torch.allclose(got, want.float(), rtol=1e-2), (got, want)
    # an empty batch with a labelled bank
    out = cb.supcon_loss(torch.randn(0, 8), torch.zeros(0, dtype=torch.long), bank=torch.randn(3, 8),
                         bank_labels=torch.tensor([0, 1, 2]), reduction="none")
    assert out.shape == (0,)
    # bool and sparse labels are refused by name, for the batch and the bank
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        cb.supcon_loss(x, torch.tensor([True, False, True, False]))
    with pytest.raises(TypeError, match="bank_labels must be an integer tensor"):
        cb.supcon_loss(x, torch.arange(4), bank=torch.randn(2, 8), bank_labels=torch.tensor([True, False]))
    with pytest.raises(TypeError, match="labels must be a dense"):
        cb.supcon_loss(x, torch.tensor([0, 1, 0, 1]).to_sparse())
    # the reference's own contract: bank_labels needs labels, integer bank labels, the promoted result dtype
    with pytest.raises(ValueError, match="bank_labels needs bank and labels"):
        supcon_reference(torch.randn(3, 2, 8), None, bank=torch.randn(2, 8), bank_labels=torch.arange(2))
    with pytest.raises(TypeError, match="bank_labels must be an integer tensor"):
        supcon_reference(x, torch.arange(4), bank=torch.randn(2, 8), bank_labels=torch.zeros(2))
    assert supcon_reference(x, torch.arange(4), bank=torch.randn(2, 8, dtype=torch.float64)).dtype == torch.float64


def test_features_of_size_zero():
    # d = 0: every logit is 0, so an anchor with a positive has loss log(number of other rows + bank rows), one
    # without has 0. It raised "cannot reshape tensor of 0 elements into shape [-1, 0]" (an audit).
    f = torch.randn(3, 0, requires_grad=True)
    got = cb.supcon_loss(f, torch.tensor([0, 0, 1]), reduction="none")
    torch.testing.assert_close(got, torch.tensor([math.log(2), math.log(2), 0.0]))
    views = torch.randn(3, 2, 0)
    torch.testing.assert_close(cb.supcon_loss(views, None, reduction="none"), torch.full((3, 2), math.log(5)))
    with_bank = cb.supcon_loss(f, torch.tensor([0, 0, 1]), bank=torch.randn(4, 0),
                               bank_labels=torch.tensor([0, 1, 1, 2]), reduction="none")
    torch.testing.assert_close(with_bank, torch.full((3,), math.log(6)))  # 2 others + 4 bank rows; each has one
    (g,) = torch.autograd.grad(got.sum(), [f])
    assert g.shape == (3, 0)


# From a mutation audit of functional.py (2026-12-06): each fails on the mutant it was written for.
def test_supcon_forward_ad_through_a_labelled_bank_that_requires_grad():
    # A bank that requires grad and carries a forward-mode tangent: _BankLabelSums has no jvp, so the labelled
    # bank's sums must take autograd's path (the _forward_ad check); its jvp matches a central difference.
    g = torch.Generator().manual_seed(0)
    f = torch.randn(6, 2, 8, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    bank = torch.randn(10, 8, generator=g, dtype=torch.float64).requires_grad_()
    bank_labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    tangent = torch.randn(10, 8, generator=g, dtype=torch.float64)
    with fwAD.dual_level():
        loss = cb.supcon_loss(f, labels, 0.5, bank=fwAD.make_dual(bank, tangent), bank_labels=bank_labels)
        jvp = fwAD.unpack_dual(loss).tangent
    h = 1e-6
    plus = cb.supcon_loss(f, labels, 0.5, bank=(bank + h * tangent).detach(), bank_labels=bank_labels)
    minus = cb.supcon_loss(f, labels, 0.5, bank=(bank - h * tangent).detach(), bank_labels=bank_labels)
    torch.testing.assert_close(jvp, (plus - minus) / (2 * h), rtol=1e-6, atol=1e-9)


def test_bank_label_sums_gradient_of_a_float16_row_whose_norm_is_past_float16s_range():
    # _BankLabelSums's backward forms |b| in the accumulation dtype: a float16 row with entries in range but a norm
    # past 65504 (here 7.3e4) has a gradient ~1/|b|, which a norm taken in float16 (inf) turned into 0.
    from contrastbound.functional import _add_bank_to_label_sums

    ordered = torch.tensor([0, 0, 1, 2])
    sums0, count0 = torch.zeros(4, 6), torch.ones(4)
    signs = torch.tensor([[1.0, -1, 1, -1, 1, -1], [1, 1, -1, -1, 1, 1], [-1, 1, 1, 1, -1, 1]])
    bank = (signs * 3e4).half().requires_grad_()
    bank_labels = torch.tensor([0, 1, 2])
    weights = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    sums, _ = _add_bank_to_label_sums(sums0, count0, ordered, bank, bank_labels, True, torch.float32)
    (got,) = torch.autograd.grad((sums * weights).sum(), bank)
    b64 = bank.detach().double().requires_grad_()
    at = torch.searchsorted(ordered, bank_labels)
    want_sums = sums0.double().index_add(0, at, F.normalize(b64, dim=-1))
    (want,) = torch.autograd.grad((want_sums * weights.double()).sum(), b64)
    assert got.dtype == torch.float16
    err = (got.double() - want).abs().max() / want.abs().max()
    assert err < 1e-2, err


EPS32 = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("bank_rows,seed", [(0, 1), (0, 2), (0, 3), (1 << 16, 0)])
def test_many_equal_rows_of_one_label_keep_float32_accuracy(bank_rows, seed):
    # Every row the same (one label): every logit is s = 10, so the loss is log(N - 1 + K) exactly. The per-label
    # sums were float32 index_adds, whose error grows with the label's count: the loss was off by 1.2e-3 to 1.6e-3
    # (N = 16384, no bank, these rows) and 4.5e-3 (N = 512, K = 2^16) (a differential fuzz's find). Allowed: a few
    # float32 roundings of logits of size 10 (8 eps (1 + 10) = 1e-5).
    g = torch.Generator().manual_seed(seed)
    d = 4
    row = torch.randn(1, d, generator=g)
    N = 16384 if bank_rows == 0 else 512
    kw = {}
    if bank_rows:
        kw = dict(bank=row.expand(bank_rows, d).contiguous(), bank_labels=torch.zeros(bank_rows, dtype=torch.long))
    loss = cb.supcon_loss(row.expand(N, d).contiguous(), torch.zeros(N, dtype=torch.long), 0.1, **kw)
    assert abs(float(loss) - math.log(N - 1 + bank_rows)) < 8 * EPS32 * (1 + 10)


def test_near_equal_rows_of_one_label_get_float32_accurate_gradients():
    # 512 features and a bank of 2^16 rows, all of one label, each a copy of one row plus noise 1e-3: the loss's
    # gradient is nearly 0 (~1e-11), the difference of the log-sum-exp's part and the positives' mean's, each of size
    # ~s / (N |f|) per feature row (s / ((N + K) |b|) per bank row), each rounded in float32 before they cancel. With
    # float32 label sums the features' gradient was off by 8.9e-4 (a differential fuzz's find); now a few roundings
    # of those parts (allowed: 16 eps each).
    g = torch.Generator().manual_seed(1)
    N, K, d, s = 512, 1 << 16, 4, 10.0
    row = torch.randn(1, d, generator=g)
    f = (row + 1e-3 * torch.randn(N, d, generator=g)).requires_grad_()
    bank = (row + 1e-3 * torch.randn(K, d, generator=g)).requires_grad_()
    y, yb = torch.zeros(N, dtype=torch.long), torch.zeros(K, dtype=torch.long)
    gf, gb = torch.autograd.grad(cb.supcon_loss(f, y, 1 / s, bank=bank, bank_labels=yb), (f, bank))
    f64, b64 = f.detach().double().requires_grad_(), bank.detach().double().requires_grad_()
    wf, wb = torch.autograd.grad(supcon_reference(f64, y, 1 / s, bank=b64, bank_labels=yb), (f64, b64))
    norm = float(row.norm())
    assert (gf.double() - wf).abs().max() < 16 * EPS32 * s / (N * norm)
    assert (gb.double() - wb).abs().max() < 16 * EPS32 * s / ((N + K) * norm)


@pytest.mark.parametrize("normalize", [True, False])
def test_bank_gradient_under_a_batched_backward(normalize):
    # An audit's case: a batched backward (is_grads_batched, jacobian(vectorize=True), gradcheck's
    # check_batched_grad) through the labelled bank's sums wrote batched slices into an unbatched buffer ("vmap:
    # aten::copy_ ... is not possible"). The vectorized Jacobian is the one computed row by row.
    g = torch.Generator().manual_seed(41)
    f = torch.randn(6, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    bank = torch.randn(5, 4, generator=g, dtype=torch.float64)
    bank_labels = torch.tensor([0, 1, 2, 1, 3])

    def per_anchor(b):
        return cb.supcon_loss(f, labels, 0.5, bank=b, bank_labels=bank_labels, normalize=normalize, reduction="none")

    want = torch.autograd.functional.jacobian(per_anchor, bank)
    got = torch.autograd.functional.jacobian(per_anchor, bank, vectorize=True)
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda b: per_anchor(b).sum(), bank.clone().requires_grad_(True),
                                    check_batched_grad=True)
