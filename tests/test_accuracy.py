"""positive_rank and contrastive_accuracy against the materialised logits (every mode, masks, labels, tiles that
split B and K unevenly, ties, NaN), their checks, and MoCo's own top-k accuracy on the same logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import contrastbound as cb
import contrastbound.metrics as metrics
from conftest import DEVICES

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


def _unit(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    x = x.double()
    return F.normalize(x, dim=-1, eps=1e-12) if normalize else x


def reference_rank(anchors, positives, negatives=None, negative_indices=None, negative_mask=None, labels=None,
                   negative_labels=None, normalize=True, band=0.0):
    """The (B, K) similarities in float64 (as the logits without the temperature), each anchor's kept negatives
    counted where they are above the positive by more than band |a| (|n| + |p|), or NaN; all of them where the
    positive is NaN. (band: the library's (d + 2) eps of its comparison dtype; 0 for float64 inputs, where that band
    is ~1e-15 and random data has no gap that small.)"""
    a, p = _unit(anchors, normalize), _unit(positives, normalize)
    B = a.shape[0]
    pos = (a * p).sum(1)
    a_norm, p_norm = a.norm(dim=1), p.norm(dim=1)
    if negatives is None:  # in-batch: the other anchors' positives
        sim = a @ p.T
        keep = ~torch.eye(B, dtype=torch.bool, device=a.device)
        if labels is not None:
            keep &= labels[None, :] != labels[:, None]
    elif negative_indices is not None:
        n = _unit(negatives, normalize)
        idx = negative_indices.long()
        sim = torch.einsum("bd,bkd->bk", a, n[idx.clamp_min(0)])
        keep = idx >= 0
        if labels is not None:
            keep &= negative_labels[idx.clamp_min(0)] != labels[:, None]
    elif negatives.dim() == 3:
        sim = torch.einsum("bd,bkd->bk", a, _unit(negatives, normalize))
        keep = torch.ones_like(sim, dtype=torch.bool)
        if labels is not None:
            keep &= negative_labels != labels[:, None]
    else:
        sim = a @ _unit(negatives, normalize).T
        keep = torch.ones_like(sim, dtype=torch.bool)
        if labels is not None:
            keep &= negative_labels[None, :] != labels[:, None]
    if negative_mask is not None:
        keep &= negative_mask
    if band:
        assert negatives is None or (negatives.dim() == 2 and negative_indices is None)  # (what the tests pass)
        n_norm = (p if negatives is None else _unit(negatives, normalize)).norm(dim=1)
        sim = sim - band * a_norm[:, None] * (n_norm[None, :] + p_norm[:, None])
    above = (sim > pos[:, None]) | sim.isnan() | pos.isnan()[:, None]
    return (above & keep).sum(1)


def _problem(mode, B, K, d, dtype=torch.float64, device="cpu", seed=0, integer=False, M=None):
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        x = torch.randint(-3, 4, shape, generator=g).double() if integer else torch.randn(*shape, generator=g,
                                                                                          dtype=torch.float64)
        return x.to(dtype).to(device)

    a = draw(B, d)
    p = (a.double() + 0.8 * draw(B, d).double()).to(dtype) if not integer else draw(B, d)  # (correlated: some right)
    kw = {}
    if mode == "shared":
        n = draw(K, d)
    elif mode == "per_anchor":
        n = draw(B, K, d)
    elif mode == "indexed":
        M = M or K + 3
        n = draw(M, d)
        kw["negative_indices"] = torch.randint(-1, M, (B, K), generator=g).to(device)
    else:
        n = None
    return a, p, n, kw


MODES = ["shared", "per_anchor", "indexed", "in_batch"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tile", [None, 5, 64])
@pytest.mark.parametrize("normalize", [True, False])
def test_rank_matches_materialised_logits(mode, tile, normalize, device, monkeypatch):
    """Continuous float64 features (no ties): the exact counts, whatever the tiles (5 and 64 split B = 37 and
    K = 101 unevenly; with d = 7 an indexed tile of 64 numbers gathers 9 rows)."""
    if tile is not None:
        monkeypatch.setattr(metrics, "_TILE_ELEMENTS", tile)
    B, K = 37, (37 if mode == "in_batch" else 101)
    a, p, n, kw = _problem(mode, B, K, 7, device=device, seed=1)
    got = cb.positive_rank(a, p, n, normalize=normalize, **kw)
    want = reference_rank(a, p, n, normalize=normalize, **kw)
    assert got.dtype == torch.int64 and got.device == a.device and got.shape == (B,)
    assert torch.equal(got, want)
    assert 0 < int((got == 0).sum()) < B  # (the correlated positives: some anchors right, some wrong)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_labels", [False, True])
def test_masks_and_labels_leave_negatives_out(mode, with_mask, with_labels, monkeypatch):
    monkeypatch.setattr(metrics, "_TILE_ELEMENTS", 11)
    B, K = 23, (23 if mode == "in_batch" else 31)
    a, p, n, kw = _problem(mode, B, K, 5, seed=2)
    g = torch.Generator().manual_seed(3)
    if with_mask:
        kw["negative_mask"] = torch.rand(B, K, generator=g) < 0.6
    if with_labels:
        kw["labels"] = torch.randint(0, 4, (B,), generator=g)
        if mode == "shared":
            kw["negative_labels"] = torch.randint(0, 4, (K,), generator=g)
        elif mode == "per_anchor":
            kw["negative_labels"] = torch.randint(0, 4, (B, K), generator=g)
        elif mode == "indexed":
            kw["negative_labels"] = torch.randint(0, 4, (n.shape[0],), generator=g)
    got = cb.positive_rank(a, p, n, **kw)
    want = reference_rank(a, p, n, **kw)
    assert torch.equal(got, want)
    if with_mask or with_labels:  # (what is left out changes the counts here)
        assert not torch.equal(got, reference_rank(a, p, n, negative_indices=kw.get("negative_indices")))


@pytest.mark.parametrize("mode", MODES)
def test_ties_go_to_the_positive_as_argmax_gives_them(mode):
    """Small integer features without normalising: exact dot products, many ties. A tie is not counted; the
    positive ranks first exactly where argmax over [l_pos, l_neg] (first index of the maximum) is 0."""
    B, K = 40, (40 if mode == "in_batch" else 25)
    a, p, n, kw = _problem(mode, B, K, 3, dtype=torch.float32, seed=4, integer=True)
    rank = cb.positive_rank(a, p, n, normalize=False, **kw)
    assert torch.equal(rank, reference_rank(a, p, n, normalize=False, **kw))
    a64, p64 = a.double(), p.double()
    if mode == "in_batch":
        sim = a64 @ p64.T
        neg = sim.masked_fill(torch.eye(B, dtype=torch.bool), float("-inf"))
    elif mode == "shared":
        neg = a64 @ n.double().T
    elif mode == "per_anchor":
        neg = torch.einsum("bd,bkd->bk", a64, n.double())
    else:
        idx = kw["negative_indices"]
        neg = torch.einsum("bd,bkd->bk", a64, n.double()[idx.clamp_min(0)]).masked_fill(idx < 0, float("-inf"))
    logits = torch.cat([(a64 * p64).sum(1, keepdim=True), neg], 1)
    ties = (neg == logits[:, :1]).any(1)
    assert bool(ties.any())  # (the case this test is about occurs)
    assert torch.equal(rank == 0, logits.argmax(1) == 0)
    above, tied = cb.positive_rank(a, p, n, normalize=False, return_ties=True, **kw)
    assert torch.equal(above, rank) and torch.equal(tied, (neg == logits[:, :1]).sum(1))
    # top-k: the positive uniformly at places above .. above + ties
    for k in (1, 2, 5):
        want = ((k - above.double()) / (tied.double() + 1)).clamp(0, 1).mean()
        assert cb.contrastive_accuracy(a, p, n, normalize=False, topk=k, **kw).item() == pytest.approx(want.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_half_inputs_are_compared_in_float32(dtype, mode):
    """Integer features, unnormalised: exact in every dtype, ties included. Continuous features rounded to the dtype,
    normalised: the counts of those values in float64 (no near ties at this size) and of their float32 upcast."""
    B, K = 19, (19 if mode == "in_batch" else 23)
    a, p, n, kw = _problem(mode, B, K, 6, dtype=dtype, seed=5, integer=True)
    assert torch.equal(cb.positive_rank(a, p, n, normalize=False, **kw),
                       reference_rank(a, p, n, normalize=False, **kw))
    a, p, n, kw = _problem(mode, B, K, 6, dtype=dtype, seed=5)
    got = cb.positive_rank(a, p, n, **kw)
    assert torch.equal(got, reference_rank(a, p, n, **kw))
    assert torch.equal(got, cb.positive_rank(*[None if x is None else x.float() for x in (a, p, n)], **kw))


@pytest.mark.parametrize("dtype, big", [(torch.bfloat16, 256.0), (torch.float16, 2048.0)])
def test_half_similarities_are_not_rounded_to_half(dtype, big):
    """a.n = big + 1 against a.p = big, every input exact in the dtype: in float32 the negative ranks above; rounded
    to the half dtype (8 / 11 significant bits) big + 1 would tie with big and go to the positive."""
    a = torch.tensor([[1.0, 1.0]], dtype=dtype)
    p = torch.tensor([[big, 0.0]], dtype=dtype)
    n = torch.tensor([[big, 1.0]], dtype=dtype)
    assert (a @ n.T).item() == big  # (the half product's rounding, which the comparison must not take)
    assert cb.positive_rank(a, p, n, normalize=False).tolist() == [1]
    assert cb.positive_rank(a, p, normalize=False).tolist() == [0]  # (in-batch: no other pair)


def test_mixed_dtypes_compare_in_the_promoted_dtype():
    a, p, n, _ = _problem("shared", 17, 29, 4, seed=6)
    got = cb.positive_rank(a.bfloat16(), p.float(), n.bfloat16())
    assert torch.equal(got, cb.positive_rank(a.bfloat16().float(), p.float(), n.bfloat16().float()))


@settings(max_examples=60, deadline=None)
@given(mode=st.sampled_from(MODES), B=st.integers(0, 9), K=st.integers(0, 12), d=st.integers(1, 5),
       integer=st.booleans(), normalize=st.booleans(), tile=st.integers(1, 40), seed=st.integers(0, 2 ** 16))
def test_property_rank_is_the_count_over_the_materialised_logits(mode, B, K, d, integer, normalize, tile, seed):
    """Any mode, size and tiling. Integer features are compared unnormalised (exact products, ties among them: the
    tie rule exactly); normalised, parallel integer rows would tie up to rounding, which may fall either way."""
    if mode == "in_batch":
        K = B
    normalize = normalize and not integer
    old = metrics._TILE_ELEMENTS
    metrics._TILE_ELEMENTS = tile
    try:
        a, p, n, kw = _problem(mode, B, K, d, seed=seed, integer=integer)
        got = cb.positive_rank(a, p, n, normalize=normalize, **kw)
    finally:
        metrics._TILE_ELEMENTS = old
    assert torch.equal(got, reference_rank(a, p, n, normalize=normalize, **kw))


def test_simclr_recipe_matches_the_2n_logits():
    """The README's SimCLR recipe: the 2N x 2N similarities with the diagonal out, each view's target its other
    view; top-1 accuracy equals that of argmax over those logits."""
    N, d = 30, 8
    g = torch.Generator().manual_seed(7)
    z1 = torch.randn(N, d, generator=g, dtype=torch.float64)
    z2 = z1 + 0.7 * torch.randn(N, d, generator=g, dtype=torch.float64)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(N, 2 * N), torch.arange(N)])
    ids = torch.arange(N).repeat(2)
    args = (torch.cat([z1, z2]), torch.cat([z2, z1]), torch.cat([z1, z2]))
    rank = cb.positive_rank(*args, labels=ids, negative_labels=ids)
    assert torch.equal(rank, (sim > sim[torch.arange(2 * N), target][:, None]).sum(1))
    acc = cb.contrastive_accuracy(*args, labels=ids, negative_labels=ids, topk=1)
    assert acc.item() == pytest.approx((sim.argmax(1) == target).double().mean().item())
    assert 0 < acc.item() < 1


def _moco_accuracy(output: torch.Tensor, topk) -> list[float]:
    """MoCo's main_moco.accuracy (target 0 for every row), as fractions."""
    _, pred = output.topk(max(topk), 1, True, True)
    correct = pred.eq(torch.zeros(output.shape[0], 1, dtype=torch.long))
    return [correct[:, :k].any(1).double().mean().item() for k in topk]


@pytest.mark.parametrize("device", DEVICES)
def test_accuracy_matches_moco_topk(device):
    a, p, n, _ = _problem("shared", 64, 500, 16, device=device, seed=8)
    a, p, n = a.float(), p.float(), n.float()
    acc = cb.contrastive_accuracy(a, p, n, topk=(1, 5, 50))
    assert acc.dtype == torch.float32 and acc.shape == (3,) and acc.device == a.device
    an, pn, nn = (F.normalize(x.double().cpu(), dim=1) for x in (a, p, n))
    logits = torch.cat([(an * pn).sum(1, keepdim=True), an @ nn.T], 1) / 0.07
    assert acc.cpu().tolist() == pytest.approx(_moco_accuracy(logits, (1, 5, 50)))
    assert 0 < acc[0] < acc[1] <= acc[2] <= 1  # (top-1 not trivial on these correlated pairs)
    assert cb.contrastive_accuracy(a, p, n, topk=5).shape == ()
    assert cb.contrastive_accuracy(a, p, n, topk=5).item() == acc[1].item()


def test_nan_counts_against_the_positive():
    a, p, n, _ = _problem("shared", 6, 10, 4, seed=9)
    n[3, 0] = float("nan")  # a NaN negative ranks above every positive
    p[2, 1] = float("nan")  # anchor 2's positive is NaN: it ranks last
    rank = cb.positive_rank(a, p, n)
    assert torch.equal(rank, reference_rank(a, p, n))
    assert rank[2] == 10
    assert bool((rank >= 1).all())
    mask = torch.ones(6, 10, dtype=torch.bool)
    mask[:, 3] = False  # left out, the NaN row does not count
    mask[2, :4] = False
    rank = cb.positive_rank(a, p, n, negative_mask=mask)
    assert rank[2] == 6 and torch.equal(rank, reference_rank(a, p, n, negative_mask=mask))


def test_no_negatives_and_no_anchors():
    a, p, _, _ = _problem("shared", 5, 0, 3, seed=10)
    assert torch.equal(cb.positive_rank(a, p, a.new_zeros(0, 3)), torch.zeros(5, dtype=torch.int64))
    assert cb.contrastive_accuracy(a, p, a.new_zeros(0, 3), topk=1).item() == 1.0
    idx = torch.full((5, 4), -1)
    assert torch.equal(cb.positive_rank(a, p, a.new_zeros(0, 3), negative_indices=idx), torch.zeros(5, dtype=torch.int64))
    assert cb.positive_rank(a[:0], p[:0], a).shape == (0,)
    assert cb.contrastive_accuracy(a[:0], p[:0], a, topk=(1, 5)).isnan().all()
    assert torch.equal(cb.positive_rank(a[:1], p[:1]), torch.zeros(1, dtype=torch.int64))  # in-batch, B = 1


def test_no_gradient_and_inputs_untouched():
    a, p, n, _ = _problem("shared", 8, 12, 4, seed=11)
    a.requires_grad_(True)
    n.requires_grad_(True)
    before = n.detach().clone()
    with torch.enable_grad():
        rank = cb.positive_rank(a, p, n)
        acc = cb.contrastive_accuracy(a, p, n)
    assert not rank.requires_grad and not acc.requires_grad and rank.grad_fn is None
    assert torch.equal(n.detach(), before)


def test_strided_inputs():
    """A transposed bank, expanded positives and a column-sliced anchor matrix: as their contiguous copies."""
    a, p, n, _ = _problem("shared", 9, 14, 5, seed=12)
    wide = torch.cat([a, a], 1)[:, ::2]
    bank_t = n.T.contiguous().T
    pos_e = p[:1].expand(9, 5)
    got = cb.positive_rank(wide, pos_e, bank_t)
    assert not wide.is_contiguous() and not bank_t.is_contiguous()
    assert torch.equal(got, cb.positive_rank(wide.contiguous(), pos_e.contiguous(), bank_t.contiguous()))
    assert torch.equal(got, reference_rank(wide, pos_e, bank_t))


@pytest.mark.parametrize("topk, error, match", [
    (0, ValueError, "topk must be a positive int"), (-1, ValueError, "topk must be a positive int"),
    ([1, 0], ValueError, "topk must be a positive int"), ((), ValueError, "non-empty sequence"),
    (True, TypeError, "topk must be a positive int"), (1.5, TypeError, "topk must be a positive int"),
    ("1", TypeError, "topk must be a positive int"), ((1, None), TypeError, "topk must be a positive int"),
    (None, TypeError, "topk must be a positive int"), (torch.tensor(True), TypeError, "topk must be a positive int"),
    (torch.tensor([2]), TypeError, r"topk must be .*got a tensor of shape \(1,\)"),
])
def test_bad_topk_is_named(topk, error, match):
    a, p, n, _ = _problem("shared", 4, 6, 3, seed=13)
    with pytest.raises(error, match=match):
        cb.contrastive_accuracy(a, p, n, topk=topk)


def test_topk_takes_any_integer():
    """numpy's integers and 0-d integer tensors as ints; a k past any rank (2^63 too) is every anchor."""
    np = pytest.importorskip("numpy")
    a, p, n, _ = _problem("shared", 12, 20, 3, seed=17)
    want = cb.contrastive_accuracy(a, p, n, topk=(1, 3))
    assert torch.equal(cb.contrastive_accuracy(a, p, n, topk=(np.int64(1), torch.tensor(3))), want)
    assert torch.equal(cb.contrastive_accuracy(a, p, n, topk=np.int32(3)), want[1])
    assert cb.contrastive_accuracy(a, p, n, topk=[21, 2 ** 63]).tolist() == [1.0, 1.0]


def test_bad_inputs_are_named():
    a, p, n, _ = _problem("shared", 4, 6, 3, seed=14)
    with pytest.raises(TypeError, match="anchors must be a torch.Tensor"):
        cb.positive_rank(a.tolist(), p, n)
    with pytest.raises(ValueError, match="positives must have the shape of anchors"):
        cb.positive_rank(a, p[:3], n)
    with pytest.raises(ValueError, match="feature size d = 3"):
        cb.positive_rank(a, p, n[:, :2])
    with pytest.raises(TypeError, match="floating"):
        cb.positive_rank(a, p, n.long())
    with pytest.raises(IndexError, match=r"negative_indices must lie in \[0, M\) = \[0, 6\) or be -1"):
        cb.positive_rank(a, p, n, negative_indices=torch.tensor([[0, 6]] * 4))
    with pytest.raises(IndexError, match="negative_indices must lie"):
        cb.positive_rank(a, p, n, negative_indices=torch.tensor([[0, -2]] * 4))
    with pytest.raises(ValueError, match=r"negative_mask must have shape"):
        cb.positive_rank(a, p, n, negative_mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels was given without negative_labels"):
        cb.positive_rank(a, p, n, labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="normalize must be"):
        cb.positive_rank(a, p, n, normalize="yes")


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_equals_cpu(mode):
    a, p, n, kw = _problem(mode, 33, (33 if mode == "in_batch" else 70), 9, dtype=torch.float32, seed=15)
    want = cb.positive_rank(a, p, n, **kw)
    moved = [None if x is None else x.cuda() for x in (a, p, n)]
    got = cb.positive_rank(*moved, **{k: v.cuda() for k, v in kw.items()})
    assert got.is_cuda and torch.equal(got.cpu(), want)


def test_torch_compile_gives_the_eager_result():
    a, p, n, kw = _problem("indexed", 8, 6, 4, dtype=torch.float32, seed=16)
    compiled = torch.compile(lambda *xs: cb.contrastive_accuracy(*xs, topk=(1, 3), **kw))
    assert torch.equal(compiled(a, p, n), cb.contrastive_accuracy(a, p, n, topk=(1, 3), **kw))


@pytest.mark.parametrize("mode", MODES)
def test_a_duplicate_of_the_positive_is_a_tie(mode):
    """Negatives that are exact copies of the positive (a repeated key in a queue, a repeated caption in a batch):
    formed by a GEMM (bmm) and the positive by a row's dot product, their similarities differ by rounding, which put
    a copy above the positive in about half the anchors (float32, d = 16) before the tie band; they are ties."""
    B, d = 64, 16
    g = torch.Generator().manual_seed(18)
    a = torch.randn(B, d, generator=g)
    p = a + 0.3 * torch.randn(B, d, generator=g)
    kw = {}
    if mode == "shared":
        n = p.clone()  # anchor i's own positive is bank row i; the other rows are other anchors' positives
    elif mode == "per_anchor":
        n = p.clone()[:, None, :].repeat(1, 3, 1)
    elif mode == "indexed":
        n = p.clone()
        kw["negative_indices"] = torch.arange(B)[:, None].repeat(1, 2)
    else:
        n = None
        p = torch.cat([p[: B // 2], p[: B // 2]])  # in-batch: positives i and i + B / 2 are the same row
    above, ties = cb.positive_rank(a, p, n, return_ties=True, **kw)
    copies = {"shared": 1, "per_anchor": 3, "indexed": 2, "in_batch": 1}[mode]
    assert bool((ties >= copies).all())
    if mode in ("per_anchor", "indexed"):  # (the copies are the only negatives)
        assert bool((above == 0).all())
        assert cb.contrastive_accuracy(a, p, n, topk=1, **kw).item() == pytest.approx(1 / (copies + 1))
    else:  # the other negatives as the float64 reference ranks them, the copies left out of it (in float64 too
        # they would fall on either side of the positive by rounding)
        if mode == "shared":
            others = ~torch.eye(B, dtype=torch.bool)
        else:
            pair = torch.arange(B) % (B // 2)
            others = pair[:, None] != pair[None, :]
        band = (d + 2) * torch.finfo(torch.float32).eps  # (random near ties within it are ties too)
        assert torch.equal(above, reference_rank(a, p, n, negative_mask=others, band=band))


def test_a_collapsed_model_scores_chance():
    """Every feature the same (or zero): every negative tied with the positive, top-k = k / (K + 1), not the 1 that
    ties given to the positive would report."""
    B, K, d = 10, 19, 8
    same = torch.ones(1, d).expand(B, d)
    for a in (same, torch.zeros(B, d)):
        acc = cb.contrastive_accuracy(a, same, torch.ones(K, d), topk=(1, 5, 20))
        assert acc.tolist() == pytest.approx([1 / 20, 5 / 20, 1.0])
        above, ties = cb.positive_rank(a, same, torch.ones(K, d), return_ties=True)
        assert above.tolist() == [0] * B and ties.tolist() == [K] * B


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_huge_rows_normalise_without_overflow(dtype):
    """Rows of entries ~1e20 (float32) or ~1e30 (bfloat16) have squares past float32's range, the comparison's:
    summed in float64, their ranks are those of the same rows at magnitude ~1 (before: every row 0, every negative
    tied, accuracy 1). float16 at ~1e4, near its own largest number, is the half-input case that never overflowed."""
    a, p, n, _ = _problem("shared", 12, 30, 6, dtype=torch.float32, seed=19)
    big = 1e4 if dtype == torch.float16 else 1e20 if dtype == torch.float32 else 1e30
    args = [(x * big).to(dtype) for x in (a, p, n)]
    want = cb.positive_rank(*[(x.to(dtype).float() * 1.0) for x in (a, p, n)])
    assert bool(torch.isfinite(args[2].float()).all())
    assert torch.equal(cb.positive_rank(*args), want)
    assert torch.equal(cb.positive_rank(args[0], args[1]), cb.positive_rank(a.to(dtype).float(), p.to(dtype).float()))


def test_tiles_bound_the_memory():
    """_tile_shape: at most _TILE_ELEMENTS similarities, and at most that many numbers of converted rows (a shared
    bank's tile: cols x d; gathered rows: rows x cols x d), for small and large B, K and d (B = 1 took the whole bank
    as one tile)."""
    budget = metrics._TILE_ELEMENTS
    for B in (1, 7, 256, 5000):
        for K in (1, 100, 2 ** 20, 2 ** 26):
            for d in (1, 128, 4096):
                rows, cols = metrics._tile_shape(B, K, d)
                assert 1 <= rows <= B and 1 <= cols <= K and rows * cols <= budget and cols * d <= max(budget, d)
                rows, cols = metrics._tile_shape(B, K, -d)
                assert 1 <= rows <= B and 1 <= cols <= K and rows * cols * d <= max(budget, d)


def test_peak_memory_without_copies():
    """In a child process, the peak resident memory beyond the inputs: B = 1 against a 256 MiB bank; per-anchor
    negatives expanded from one (K, d) block, with a mask (a (B K, d) view of them would be a 1 GiB copy); a bank made
    under inference_mode, called with grad mode on (the losses' checks clone such a tensor); in-batch over N = 2^15
    rows of d = 256 (32 MiB an input), which needs the two inputs' unit rows: the norms' float64 copy of an input and
    the positives' (N, d) product made a third (3.0 inputs measured, 2.07 now; 2026-12-08, an audit's case). Each well
    under the size of the copy it used to make."""
    from conftest import PEAK_RSS_HELPERS, child_json

    script = PEAK_RSS_HELPERS + """
import gc, json, torch, contrastbound as cb
torch.set_num_threads(1)
out = {}
a, p = torch.randn(64, 64), torch.randn(64, 64)
bank = torch.randn(2 ** 20, 64)
block = torch.randn(2 ** 16, 64)
neg = block[None].expand(64, 2 ** 16, 64)
mask = torch.rand(64, 2 ** 16) < 0.5
with torch.inference_mode():
    ibank = torch.randn(2 ** 20, 64)
ia, ip = torch.randn(2 ** 15, 256), torch.randn(2 ** 15, 256)
calls = {"in_batch": lambda: cb.contrastive_accuracy(ia, ip),
         "one_anchor": lambda: cb.positive_rank(a[:1], p[:1], bank),
         "expanded_masked": lambda: cb.positive_rank(a, p, neg, negative_mask=mask),
         "inference_bank": lambda: cb.positive_rank(a, p, ibank)}
for name, call in calls.items():
    call()  # (the allocator's one-off growth: the first call at a size)
    gc.collect(); reset_hwm(); base = hwm_mib()
    call()
    out[name] = hwm_mib() - base
print(json.dumps(out))
"""
    out = child_json(script)
    assert out["one_anchor"] < 64 and out["expanded_masked"] < 128 and out["inference_bank"] < 64, out
    assert out["in_batch"] < 2.5 * 32, out


def test_vmap_over_problems():
    """torch.func.vmap over a batch of problems: each problem's counts (the out= buffers are not used there)."""
    g = torch.Generator().manual_seed(20)
    a, p, n = (torch.randn(3, *shape, generator=g, dtype=torch.float64) for shape in ((5, 4), (5, 4), (9, 4)))
    got = torch.func.vmap(lambda x, y, z: cb.positive_rank(x, y, z, return_ties=True))(a, p, n)
    for i in range(3):
        above, ties = cb.positive_rank(a[i], p[i], n[i], return_ties=True)
        assert torch.equal(got[0][i], above) and torch.equal(got[1][i], ties)


def _band_problem(mode, a, p, rows):
    """(anchors, positives, negatives, kwargs) giving anchor 0 the negatives `rows` in each mode."""
    kw, m = {}, rows.shape[0]
    if mode == "shared":
        return a, p, rows, kw
    if mode == "per_anchor":
        return a, p, rows[None], kw
    if mode == "indexed":
        kw["negative_indices"] = torch.arange(m)[None]
        return a, p, rows, kw
    return torch.cat([a, a.expand(m, -1)]), torch.cat([p, rows]), None, kw  # in-batch: the other positives


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_band_grows_with_the_positives_norm(mode, dtype):
    """a = (1, 0), p = (1, 1024): a.p = 1 with |p| ~ 1024, so the band c |a| (|n| + |p|) is ~1025 c, 4100 ulp(1),
    where 2 |n| would give 8 ulp: a negative 2000 ulp above the positive is a tie, 6000 ulp above ranks above."""
    eps = torch.finfo(dtype).eps
    a = torch.tensor([[1.0, 0.0]], dtype=dtype)
    p = torch.tensor([[1.0, 1024.0]], dtype=dtype)
    rows = torch.tensor([[1.0 + 2000 * eps, 0.0], [1.0 + 6000 * eps, 0.0]], dtype=dtype)
    above, ties = cb.positive_rank(*_band_problem(mode, a, p, rows)[:3], normalize=False, return_ties=True,
                                   **_band_problem(mode, a, p, rows)[3])
    assert (above[0].item(), ties[0].item()) == (1, 1)


def test_the_band_of_a_zero_or_tiny_negative_is_its_own_norm():
    """Normalised, a zero row stays 0 (norm 0) and a row of norm 1e-14 becomes x / 1e-12 (norm 0.01): their part of
    the band is c |a| |n_hat|, not c |a| (a bound of 1 made them ties of a positive 1.5 c away)."""
    d = 128
    c = (d + 2) * torch.finfo(torch.float32).eps
    a = torch.zeros(1, d)
    a[0, 0] = 1.0
    p = torch.zeros(1, d)
    p[0, 0], p[0, 1] = 1.5 * c, 1.0  # a.p_hat = 1.5 c (|p| = 1 to rounding): outside c |a| (0 + |p|)
    rows = torch.zeros(3, d)
    rows[1, 5] = 1e-14  # (orthogonal to a: similarity 0 too)
    for mode in MODES:
        args, kw = _band_problem(mode, a, p, rows)[:3], _band_problem(mode, a, p, rows)[3]
        above, ties = cb.positive_rank(*args, return_ties=True, **kw)
        assert (above[0].item(), ties[0].item()) == (0, 0), mode
        assert cb.contrastive_accuracy(args[0][:1], args[1][:1], rows, topk=1).item() == 1.0


def test_float32_norms_past_float32s_range():
    """normalize=False, a = p = (1, 0): negatives (3e38, 3e38) and (-3e38, -3e38) have norms ~4.2e38, past float32's
    largest number: kept in float64 the band stays finite (one above, one below; an infinite band tied both)."""
    a = torch.tensor([[1.0, 0.0]])
    rows = torch.tensor([[3e38, 3e38], [-3e38, -3e38]])
    for mode in MODES:
        args, kw = _band_problem(mode, a, a.clone(), rows)[:3], _band_problem(mode, a, a.clone(), rows)[3]
        above, ties = cb.positive_rank(*args, normalize=False, return_ties=True, **kw)
        assert (above[0].item(), ties[0].item()) == (1, 0), mode


def test_an_infinite_positive_similarity_ranks_last():
    """normalize=False with an infinite anchor: a.p = inf is no similarity to rank by (as NaN): every negative above
    (a copy of the positive, inf = inf, was neither above nor tied)."""
    a = torch.tensor([[float("inf"), 0.0]])
    p = torch.tensor([[1.0, 0.0]])
    rows = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    above, ties = cb.positive_rank(a, p, rows, normalize=False, return_ties=True)
    assert (above.item(), ties.item()) == (3, 0)


def test_reduced_precision_gemms_widen_the_band():
    """Under torch.set_float32_matmul_precision("high") (TF32 allowed) the band gains 2 u |a| (|n| + |p|), u = 2^-11:
    a negative 2^-11 above a unit positive is a tie there, above it under "highest" (the tests' setting)."""
    a = torch.tensor([[1.0, 0.0]])
    rows = torch.tensor([[1.0 + 2.0 ** -11, 0.0]])
    assert cb.positive_rank(a, a.clone(), rows, normalize=False, return_ties=True) == (1, 0)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert cb.positive_rank(a, a.clone(), rows, normalize=False, return_ties=True) == (0, 1)
        # float64 GEMMs do not round: the band stays (d + 2) eps
        assert cb.positive_rank(a.double(), a.double(), rows.double(), normalize=False, return_ties=True) == (1, 0)
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.skipif(not hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision"),
                    reason="torch without the per-backend fp32_precision")
def test_the_cpu_backends_own_precision_widens_the_band():
    """torch.backends.mkldnn.matmul.fp32_precision = "bf16" lets the CPU's float32 GEMMs take bfloat16 inputs: u =
    2^-8, so a negative 2^-8 above a unit positive is a tie; back to the old setting, above."""
    a = torch.tensor([[1.0, 0.0]])
    rows = torch.tensor([[1.0 + 2.0 ** -8, 0.0]])
    matmul = torch.backends.mkldnn.matmul
    old = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        assert cb.positive_rank(a, a.clone(), rows, normalize=False, return_ties=True) == (0, 1)
    finally:
        matmul.fp32_precision = old
    assert cb.positive_rank(a, a.clone(), rows, normalize=False, return_ties=True) == (1, 0)


@pytest.mark.parametrize("mode", ["shared", "per_anchor", "indexed", "in_batch"])
@pytest.mark.parametrize("x", [1.0, 1024.0])
def test_the_tie_band_is_d_plus_2_eps_a_times_n_plus_p(mode, x):
    """Exact float32 values, normalize=False, d = 2: a = (1, 0), p = (x, 0), negatives (x + j ulp(x), 0), so
    a.n - a.p = j ulp(x) exactly. The band (d + 2) eps |a| (|n| + |p|) is ~8 ulp(x) at x = 1 and 1024 (eps = ulp(1)
    / 1 = 2^-23, |n| + |p| ~ 2x): j = 7 is a tie, j = 9 above, j = -7 a tie, j = -9 below (neither); a
    band of (d + 1) eps, 6 ulp, would put j = 7 above."""
    ulp = x * 2.0 ** -23
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[x, 0.0]])
    steps = torch.tensor([7.0, 9.0, -7.0, -9.0, 0.0])
    rows = torch.stack([x + steps * ulp, torch.zeros(5)], 1)
    assert torch.equal((rows[:, 0] - x) / ulp, steps)  # (exact in float32)
    kw = {}
    if mode == "shared":
        n = rows
    elif mode == "per_anchor":
        n = rows[None]
    elif mode == "indexed":
        n, kw["negative_indices"] = rows, torch.arange(5)[None]
    else:  # in-batch: anchor 0's negatives are positives 1 .. 5 (the other anchors ranked too)
        a, p, n = torch.cat([a, a.expand(5, 2)]), torch.cat([p, rows]), None
    above, ties = cb.positive_rank(a, p, n, normalize=False, return_ties=True, **kw)
    assert (above[0].item(), ties[0].item()) == (1, 3)


@pytest.mark.parametrize("mode", MODES)
def test_the_band_of_unit_rows(mode):
    """normalize=True, d = 2, float32: a = (1, 0), a.p_hat = 0.5; negatives at 0.5 + delta. For unit rows the band is
    c (|p| + |n|) = 2 (d + 2) eps = 9.5e-7 (the shared bank's one-number-per-anchor path on the CPU): delta = 7e-7 is a
    tie (margin 2.5e-7 over the rows' normalisation rounding, ~1e-7), 1.6e-6 above; half the band would put 7e-7
    above."""
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.5, 0.75 ** 0.5]])
    rows = torch.tensor([[0.5 + dl, (1 - (0.5 + dl) ** 2) ** 0.5] for dl in (7e-7, 1.6e-6, -7e-7, -1.6e-6)])
    above, ties = cb.positive_rank(*_band_problem(mode, a, p, rows)[:3], return_ties=True,
                                   **_band_problem(mode, a, p, rows)[3])
    assert (above[0].item(), ties[0].item()) == (1, 2)


def test_the_docstrings_recipe_across_processes():
    """positive_rank's docstring: each "rank" of two ranks its own anchors against the gathered positives with its
    own rows left out by global index, and gets the in-batch ranks (and ties) of the whole batch."""
    g = torch.Generator().manual_seed(21)
    a = torch.randn(16, 8, generator=g)
    p = a + torch.randn(16, 8, generator=g)
    whole = cb.positive_rank(a, p, return_ties=True)
    B = 8
    for rank in range(2):
        mine = slice(rank * B, rank * B + B)
        got = cb.positive_rank(a[mine], p[mine], p, labels=rank * B + torch.arange(B),
                               negative_labels=torch.arange(len(p)), return_ties=True)
        assert torch.equal(got[0], whole[0][mine]) and torch.equal(got[1], whole[1][mine])
        assert 0 < int((got[0] == 0).sum()) < B


def _autocast_dtypes(device):
    """The autocast dtypes a device takes here (float16 on the CPU needs a torch that lists it)."""
    return [torch.bfloat16] + ([torch.float16] if device == "cuda" else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_ranks_under_autocast_are_those_without(device, mode):
    # An audit's case: under torch.autocast(bfloat16) the per-anchor and indexed modes' products ran in bfloat16,
    # outside the float32 tie band (8 of 256 ranks moved, K = 400, d = 128). The ranks are those of float32 features
    # whatever the autocast state. (Positives 3.5 sigma from the anchors: ranks spread over 0 .. K.)
    a, _, n, kw = _problem(mode, 96, 200, 64, dtype=torch.float32, device=device, seed=21)
    g = torch.Generator().manual_seed(22)
    p = a + 3.5 * torch.randn(a.shape, generator=g).to(device)
    want = cb.positive_rank(a, p, n, return_ties=True, **kw)
    assert 0 < want[0].float().mean() < 150  # (not all at one end)
    for dtype in _autocast_dtypes(device):
        with torch.autocast(device, dtype=dtype):
            got = cb.positive_rank(a, p, n, return_ties=True, **kw)
            acc = cb.contrastive_accuracy(a, p, n, topk=(1, 5), **kw)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert torch.equal(acc, cb.contrastive_accuracy(a, p, n, topk=(1, 5), **kw))
