"""mine_hard_negatives against the materialised (B, M) similarities in float64 (every exclusion, tiles that split B
and M unevenly, padding, ties, NaN), its checks, and the indices it returns as info_nce's negative_indices."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import contrastbound as cb
import contrastbound.metrics as metrics
from conftest import DEVICES

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


def reference_similarities(anchors, bank, normalize=True, labels=None, bank_labels=None, exclude=None, bound=None):
    """(B, M) float64 similarities of the inputs as given (half inputs widened exactly), -inf where a row is left
    out: same label, listed in exclude (B, E) (-1 ignored), above bound (a number or (B,)), or itself -inf."""
    a, n = anchors.double(), bank.double()
    if normalize:
        a, n = F.normalize(a, dim=1, eps=1e-12), F.normalize(n, dim=1, eps=1e-12)
    sim = a @ n.T
    out = torch.zeros_like(sim, dtype=torch.bool)
    if labels is not None:
        out |= labels[:, None] == bank_labels[None, :]
    if exclude is not None:
        ex = exclude.long().reshape(anchors.shape[0], -1)
        for i in range(ex.shape[0]):
            rows = ex[i][ex[i] >= 0]
            out[i, rows] = True
    if bound is not None:
        b = torch.as_tensor(bound, dtype=torch.float64, device=sim.device).reshape(-1, 1)
        out |= sim > b
    return sim.masked_fill(out, -math.inf)


def check_against_reference(result, sim, k, tol):
    """result's values and indices against the (B, M) reference similarities sim (-inf: left out): the rows picked
    are distinct, not left out, ordered, their values those of sim within tol, and no row left aside is more
    similar than the k-th picked by more than tol (near-ties may go either way); where fewer than k rows are left
    every one of them is picked and the rest is padding."""
    values, indices = result
    B, M = sim.shape
    assert values.shape == indices.shape == (B, k)
    assert indices.dtype == torch.int64
    sim = sim.cpu()
    values, indices = values.double().cpu(), indices.cpu()
    for i in range(B):
        eligible = int((sim[i] > -math.inf).sum())
        n = min(k, eligible)
        picked = indices[i, :n]
        assert (indices[i, n:] == -1).all() and (values[i, n:] == -math.inf).all(), (i, indices[i], values[i])
        assert (picked >= 0).all() and len(set(picked.tolist())) == n, (i, picked)
        true = sim[i, picked]
        assert (true > -math.inf).all(), (i, picked)  # (none left out)
        torch.testing.assert_close(values[i, :n], true, rtol=0, atol=tol)
        assert (values[i, :n].diff() <= 0).all(), values[i]
        if n and n < eligible:
            rest = sim[i].clone()
            rest[picked] = -math.inf
            assert rest.max() <= true.min() + 2 * tol, (i, rest.max(), true.min())


TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


def _draw(B, M, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, d, generator=g, dtype=torch.float64).to(dtype).to(device)
    bank = torch.randn(M, d, generator=g, dtype=torch.float64).to(dtype).to(device)
    return a, bank


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("B,M,d,k", [(1, 1, 1, 1), (13, 301, 7, 5), (37, 1003, 19, 17), (5, 40, 3, 64), (9, 77, 5, 77)])
def test_matches_the_materialised_similarities(device, dtype, normalize, B, M, d, k):
    a, bank = _draw(B, M, d, dtype, device)
    result = cb.mine_hard_negatives(a, bank, k, normalize=normalize)
    assert result.values.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert result.values.device == a.device and result.indices.device == a.device
    tol = TOL[dtype] * (1 if normalize else d)
    check_against_reference(result, reference_similarities(a, bank, normalize), k, tol)


@pytest.mark.parametrize("tile", [1, 7, 64, 300])
def test_tiles_that_split_anchors_and_bank_unevenly(tile):
    # tiles of at most `tile` similarities (1: one anchor against one row at a time; k wider than a tile widens it)
    a, bank = _draw(23, 517, 11, torch.float64)
    labels, bank_labels = torch.arange(23) % 5, torch.arange(517) % 7
    exclude = torch.randint(-1, 517, (23, 4), generator=torch.Generator().manual_seed(1))
    bound = torch.rand(23, dtype=torch.float64) * 0.5
    with mock.patch.object(metrics, "_TILE_ELEMENTS", tile):
        for k in (1, 6, 40):
            result = cb.mine_hard_negatives(a, bank, k, labels=labels, bank_labels=bank_labels,
                                            exclude_indices=exclude, max_similarity=bound)
            sim = reference_similarities(a, bank, True, labels, bank_labels, exclude, bound)
            check_against_reference(result, sim, k, 1e-12)
            whole = (sim.topk(k, dim=1))  # (random float64 data: no ties, the same rows in the same order)
            expect = torch.where(whole.values == -math.inf, -1, whole.indices)
            assert torch.equal(result.indices, expect)


@pytest.mark.parametrize("device", DEVICES)
def test_exclusions_each_on_its_own(device):
    a, bank = _draw(17, 211, 6, torch.float32, device)
    labels = torch.randint(0, 4, (17,), device=device)
    bank_labels = torch.randint(0, 4, (211,), device=device)
    own = torch.randint(0, 211, (17,), device=device)  # (B,): one row per anchor, say its positive's
    several = torch.stack([own, torch.full_like(own, -1), (own + 3) % 211, own], 1)  # (-1 pads; a repeat)
    cases = [
        ({"labels": labels, "bank_labels": bank_labels}, {"labels": labels, "bank_labels": bank_labels}),
        ({"labels": labels.int(), "bank_labels": bank_labels.to(torch.int16)},
         {"labels": labels, "bank_labels": bank_labels}),
        ({"exclude_indices": own}, {"exclude": own}),
        ({"exclude_indices": several.int()}, {"exclude": several}),
        ({"max_similarity": 0.3}, {"bound": 0.3}),
        ({"max_similarity": torch.tensor(0.2, device=device)}, {"bound": 0.2}),
        ({"max_similarity": -2.0}, {"bound": -2.0}),  # (nothing left: all padding)
        ({"max_similarity": math.inf}, {}),
    ]
    for passed, ref in cases:
        result = cb.mine_hard_negatives(a, bank, 9, **passed)
        check_against_reference(result, reference_similarities(a, bank, **ref), 9, 2e-6)
    # a NaN in a per-anchor bound bounds nothing for that anchor
    bound = torch.full((17,), 0.1, device=device)
    bound[3] = math.nan
    result = cb.mine_hard_negatives(a, bank, 9, max_similarity=bound)
    ref_bound = bound.clone()
    ref_bound[3] = math.inf
    check_against_reference(result, reference_similarities(a, bank, bound=ref_bound), 9, 2e-6)


def test_positive_aware_bound_leaves_out_rows_near_the_positive():
    # NV-Retriever's "TopK-PercPos": rows more similar than 0.95 times the positive's similarity are left out. A bank
    # holding near-copies of the positives: without the bound they are the hardest negatives, with it none is picked.
    g = torch.Generator().manual_seed(3)
    a = torch.randn(8, 16, generator=g)
    p = a + 0.1 * torch.randn(8, 16, generator=g)
    bank = torch.cat([p + 1e-3 * torch.randn(8, 16, generator=g), torch.randn(500, 16, generator=g)])
    plain = cb.mine_hard_negatives(a, bank, 4)
    assert (plain.indices[:, 0] == torch.arange(8)).all()
    bound = 0.95 * F.cosine_similarity(a, p)
    aware = cb.mine_hard_negatives(a, bank, 4, max_similarity=bound)
    assert (aware.indices >= 8).all()
    assert (aware.values <= bound[:, None]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_tiny_rows_are_scaled_as_the_losses_scale_them(dtype):
    # rows of norm below 1e-12 are divided by 1e-12, not by their norm (F.normalize's eps, the losses' x_hat): a row
    # of norm 1e-15 has cosine 1e-3 with everything, whether the other rows of its tile are tiny or not (an audit's
    # case: float32 on the CPU ranked it first, with similarity 1, unless a zero row shared its tile)
    a = torch.tensor([[1.0, 0.0]], dtype=dtype)
    for bank in ([[1e-15, 0.0], [0.5, 0.5]], [[1e-15, 0.0], [0.5, 0.5], [0.0, 0.0]]):
        bank = torch.tensor(bank, dtype=dtype)
        result = cb.mine_hard_negatives(a, bank, 2)
        assert result.indices.tolist() == [[1, 0]], (bank, result)
        check_against_reference(result, reference_similarities(a, bank), 2, 1e-5)
    tiny_anchor = torch.tensor([[1e-15, 0.0]], dtype=dtype)
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=dtype)
    result = cb.mine_hard_negatives(tiny_anchor, bank, 2, max_similarity=0.5)
    assert result.indices.tolist() == [[0, 1]]
    check_against_reference(result, reference_similarities(tiny_anchor, bank, bound=0.5), 2, 1e-5)


def test_a_bound_between_two_float32_values_is_not_rounded_up():
    # 0.5 - 1e-9 is 0.5 in float32: the row of similarity 0.5 is above the bound and must be left out (an audit's
    # case), whether the bound is a number or a float64 tensor; a bound of float32 values is compared as it is
    a = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[0.5, 0.0], [0.25, 0.0]])
    for bound in (0.5 - 1e-9, torch.tensor(0.5 - 1e-9, dtype=torch.float64),
                  torch.tensor([0.5 - 1e-9], dtype=torch.float64)):
        assert cb.mine_hard_negatives(a, bank, 2, normalize=False, max_similarity=bound).indices.tolist() == [[1, -1]]
    for bound in (0.5, torch.tensor(0.5), torch.tensor([0.5], dtype=torch.bfloat16), 10**400):
        assert cb.mine_hard_negatives(a, bank, 2, normalize=False, max_similarity=bound).indices.tolist() == [[0, 1]]
    assert cb.mine_hard_negatives(a, bank, 2, normalize=False, max_similarity=-10**400).indices.tolist() == [[-1, -1]]
    assert cb.mine_hard_negatives(a, bank, 2, normalize=False, max_similarity=1e39).indices.tolist() == [[0, 1]]


def test_padding_where_few_rows_are_left():
    a, bank = _draw(4, 6, 3, torch.float32)
    result = cb.mine_hard_negatives(a, bank, 10)  # k > M
    assert (result.indices[:, :6] >= 0).all() and (result.indices[:, 6:] == -1).all()
    assert (result.values[:, 6:] == -math.inf).all()
    assert [sorted(r.tolist()) for r in result.indices[:, :6]] == [list(range(6))] * 4
    for k in (0, 3):
        empty = cb.mine_hard_negatives(a, bank[:0], k)
        assert empty.indices.shape == (4, k) and (empty.indices == -1).all() and (empty.values == -math.inf).all()
    none = cb.mine_hard_negatives(a[:0], bank, 3)
    assert none.indices.shape == (0, 3) and none.values.shape == (0, 3)
    zero = cb.mine_hard_negatives(a, bank, 0)
    assert zero.indices.shape == (4, 0) and zero.values.dtype == torch.float32


def test_ties_are_ordered_by_index_and_duplicates_all_count():
    # integer rows, dot products exact: rows 0, 2 and 5 are the same vector, the most similar to the anchor
    a = torch.tensor([[1.0, 2.0, 0.0]])
    bank = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 2.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 0.0, 0.0],
                         [1.0, 2.0, 0.0]])
    result = cb.mine_hard_negatives(a, bank, 4, normalize=False)
    assert result.indices.tolist() == [[0, 2, 5, 3]]
    assert result.values.tolist() == [[5.0, 5.0, 5.0, 3.0]]
    with mock.patch.object(metrics, "_TILE_ELEMENTS", 2):  # (the same across tiles)
        assert cb.mine_hard_negatives(a, bank, 4, normalize=False).indices.tolist() == [[0, 2, 5, 3]]


def test_nan_rows_rank_first_and_minus_inf_rows_are_never_picked():
    a = torch.tensor([[1.0, 0.5], [0.0, 1.0]])
    bank = torch.tensor([[1.0, 0.0], [math.nan, 0.0], [0.0, 1.0], [-math.inf, 0.0], [0.5, 0.5]])
    result = cb.mine_hard_negatives(a, bank, 5, normalize=False)
    # anchor 0: row 3 is -inf (left out); anchor 1: row 3 gives 0 * -inf = NaN, which ranks first with row 1's
    assert result.indices[0].tolist() == [1, 0, 4, 2, -1]
    assert math.isnan(result.values[0, 0]) and result.values[0, 4] == -math.inf
    assert result.indices[1].tolist()[:2] == [1, 3] and result.indices[1].tolist()[2:] == [2, 4, 0]
    # a NaN row in a late tile, after each anchor holds k rows, is still picked first (and a -inf one never)
    # (anchors of positive entries: row 390's dot product is -inf, not NaN)
    a, bank = _draw(6, 400, 5, torch.float32)
    a = a.abs() + 0.1
    bank[350, 2], bank[390] = math.nan, torch.tensor([-math.inf, 0, 0, 0, 0])
    with mock.patch.object(metrics, "_TILE_ELEMENTS", 60):
        tiled = cb.mine_hard_negatives(a, bank, 3, normalize=False)
        everything = cb.mine_hard_negatives(a, bank, 400, normalize=False)
    assert (tiled.indices[:, 0] == 350).all() and tiled.values[:, 0].isnan().all()
    assert (everything.indices[:, :399] != 390).all() and (everything.indices[:, 399] == -1).all()
    assert torch.equal(tiled.indices, cb.mine_hard_negatives(a, bank, 3, normalize=False).indices)


def test_non_contiguous_inputs_and_inputs_that_require_grad():
    a, bank = _draw(11, 97, 8, torch.float32)
    a_t = a.T.contiguous().T.requires_grad_(True)  # (column-major)
    bank_s = torch.stack([bank, bank], 2)[:, :, 0]  # (a stride-2 view of the bank's values)
    assert not a_t.is_contiguous() and not bank_s.is_contiguous()
    result = cb.mine_hard_negatives(a_t, bank_s, 6)
    assert not result.values.requires_grad
    assert torch.equal(result.indices, cb.mine_hard_negatives(a, bank, 6).indices)
    assert a_t.grad is None


def test_an_inference_mode_bank_is_not_copied():
    # a corpus encoded under torch.inference_mode, mined with grad mode on: the losses' checks copy an inference
    # tensor for autograd to save (_ops.savable); the mining saves nothing and must not copy a bank of GiBs
    from contrastbound import _ops

    a, bank = _draw(7, 300, 9, torch.float32)
    with torch.inference_mode():
        frozen = bank * 1
    assert frozen.is_inference()
    with mock.patch.object(_ops, "savable", side_effect=AssertionError("copied")):
        result = cb.mine_hard_negatives(a.requires_grad_(True), frozen, 5)
    assert torch.equal(result.indices, cb.mine_hard_negatives(a, bank, 5).indices)


@pytest.mark.parametrize("device", DEVICES)
def test_indices_feed_info_nce(device):
    # the mined rows as negative_indices: the loss of info_nce over exactly those rows of the bank (its gradient
    # reaching the bank rows picked), as over per-anchor negatives bank[idx]
    a, bank = _draw(12, 300, 16, torch.float64, device)
    p = a + 0.5 * _draw(12, 1, 16, torch.float64, device, seed=5)[0]
    labels = torch.arange(12, device=device) % 3
    bank_labels = torch.arange(300, device=device) % 3
    idx = cb.mine_hard_negatives(a, bank, 250, labels=labels, bank_labels=bank_labels).indices
    assert (idx[:, 200:] == -1).all()  # (a third of the rows share the label: 200 left)
    bank.requires_grad_(True)
    loss = cb.info_nce(a, p, bank, negative_indices=idx, temperature=0.2)
    ref = cb.info_nce(a, p, bank[idx[:, :200]], temperature=0.2)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    (g,) = torch.autograd.grad(loss, bank)
    used = torch.zeros(300, dtype=torch.bool, device=device)
    used[idx[idx >= 0]] = True
    assert (g[~used] == 0).all() and (g[used].abs().sum(1) > 0).all()


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 9), M=st.integers(1, 60), d=st.integers(1, 5), k=st.integers(0, 70),
       tile=st.sampled_from([1, 3, 17, 1 << 20]), seed=st.integers(0, 2**31 - 1), normalize=st.booleans(),
       use_labels=st.booleans(), use_exclude=st.booleans(), use_bound=st.booleans())
def test_property_matches_the_reference(B, M, d, k, tile, seed, normalize, use_labels, use_exclude, use_bound):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, d, generator=g, dtype=torch.float64)
    bank = torch.randn(M, d, generator=g, dtype=torch.float64)
    kw, ref = {}, {"normalize": normalize}
    if use_labels:
        kw["labels"] = ref["labels"] = torch.randint(0, 3, (B,), generator=g)
        kw["bank_labels"] = ref["bank_labels"] = torch.randint(0, 3, (M,), generator=g)
    if use_exclude:
        kw["exclude_indices"] = ref["exclude"] = torch.randint(-1, M, (B, 3), generator=g)
    if use_bound:
        kw["max_similarity"] = ref["bound"] = torch.rand(B, generator=g, dtype=torch.float64)
    with mock.patch.object(metrics, "_TILE_ELEMENTS", tile):
        result = cb.mine_hard_negatives(a, bank, k, normalize=normalize, **kw)
    check_against_reference(result, reference_similarities(a, bank, **ref), k, 1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_picks_the_cpu_rows():
    a, bank = _draw(300, 70001, 64, torch.float32)
    labels, bank_labels = torch.arange(300) % 10, torch.arange(70001) % 10
    cpu = cb.mine_hard_negatives(a, bank, 33, labels=labels, bank_labels=bank_labels)
    gpu = cb.mine_hard_negatives(a.cuda(), bank.cuda(), 33, labels=labels.cuda(), bank_labels=bank_labels.cuda())
    sim = reference_similarities(a, bank, True, labels, bank_labels)
    check_against_reference(gpu, sim, 33, 1e-5)
    agree = (gpu.indices.cpu() == cpu.indices).float().mean()
    assert agree > 0.99, agree  # (near-ties in float32 may go either way)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    # the custom op behind mine_hard_negatives: schema, fake kernel (output shapes and dtypes for every input dtype),
    # no aliasing, with each optional argument
    op = torch.ops.contrastbound.mine_hard_negatives.default
    g = torch.Generator().manual_seed(9)
    a, bank = torch.randn(5, 7, generator=g).to(device), torch.randn(23, 7, generator=g).to(device)
    labels, bank_labels = torch.arange(5, device=device) % 2, torch.arange(23, device=device) % 3
    exclude = torch.tensor([[0, -1], [3, 3], [22, 1], [-1, -1], [5, 6]], device=device)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        a_, bank_ = a.to(dtype), bank.to(dtype)
        for args in ((a_, bank_, 4, True, None, None, None, None, None),
                     (a_, bank_, 30, False, labels, bank_labels, exclude, None, 0.5),
                     (a_, bank_, 0, True, None, None, exclude, torch.rand(5, generator=g).to(device), None),
                     (a_, bank_, 3, True, None, None, None, torch.tensor(0.1, device=device), None)):
            torch.library.opcheck(op, args)


def test_compiled_step_matches_eager_and_does_not_recompile_per_value():
    # mining and the loss over the rows mined in one compiled step (fullgraph: the op is one opaque node with static
    # output shapes, not a loop unrolled over tiles nor broken at its host reads), as eager; a bank that grows and a
    # float bound that changes each step compile at most twice (static, then dynamic), as info_nce's temperature
    from torch._dynamo.testing import CompileCounterWithBackend

    def step(a, p, bank, exclude, bound):
        hard = cb.mine_hard_negatives(a, bank, 5, exclude_indices=exclude, max_similarity=bound)
        return cb.info_nce(a, p, bank, negative_indices=hard.indices), hard

    g = torch.Generator().manual_seed(4)
    torch._dynamo.reset()
    try:
        for bounds in ("tensor", "float"):
            counter = CompileCounterWithBackend("aot_eager")
            f = torch.compile(step, backend=counter, fullgraph=True)
            for i in range(4):
                a = torch.randn(16, 8, generator=g, requires_grad=True)
                p = torch.randn(16, 8, generator=g)
                bank = torch.randn(300 + 7 * i, 8, generator=g)
                exclude = torch.randint(-1, 300, (16, 2), generator=g)
                bound = torch.rand(16, generator=g) if bounds == "tensor" else 0.1 + 0.1 * i
                (loss, hard), (want_loss, want) = f(a, p, bank, exclude, bound), step(a, p, bank, exclude, bound)
                assert torch.equal(hard.indices, want.indices) and torch.equal(hard.values, want.values)
                torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
                (ga,) = torch.autograd.grad(loss, a)
                torch.testing.assert_close(ga, torch.autograd.grad(want_loss, a)[0], rtol=1e-5, atol=1e-7)
            assert counter.frame_count <= 2, (bounds, counter.frame_count)
    finally:
        torch._dynamo.reset()


def _bad(**kw):
    a, bank = _draw(4, 10, 3, torch.float32)
    args = {"anchors": a, "bank": bank, "k": 2}
    args.update(kw)
    return cb.mine_hard_negatives(args.pop("anchors"), args.pop("bank"), args.pop("k"), **args)


@pytest.mark.parametrize("kw,error,match", [
    ({"anchors": torch.ones(4, 3).numpy()}, TypeError, r"anchors must be a torch.Tensor of shape \(B, d\)"),
    ({"anchors": torch.ones(4)}, ValueError, r"anchors must have shape \(B, d\)"),
    ({"anchors": torch.ones(4, 3, dtype=torch.int64)}, TypeError, "anchors must be a floating tensor"),
    ({"bank": torch.ones(10, 3, 1)}, ValueError, r"bank must have shape \(M, d\)"),
    ({"bank": torch.ones(10, 4)}, ValueError, r"bank must have shape \(M, d\) with the anchors' d = 3"),
    ({"bank": torch.ones(10, 3).to_sparse()}, TypeError, "bank must be a dense"),
    ({"bank": torch.ones(10, 3, device="meta")}, ValueError, "bank is on meta but anchors is on cpu"),
    ({"k": -1}, ValueError, "k must be a non-negative int"),
    ({"k": 2.0}, TypeError, "k must be a non-negative int"),
    ({"k": True}, TypeError, "k must be a non-negative int"),
    ({"k": torch.tensor([2])}, TypeError, "k must be a non-negative int"),
    ({"k": 2**63}, ValueError, r"k must be a non-negative int .* below 2\^62"),
    ({"k": np.True_}, TypeError, "k must be a non-negative int .*got numpy.bool"),
    ({"normalize": 1}, TypeError, "normalize"),
    ({"labels": torch.zeros(4, dtype=torch.int64)}, ValueError, "labels was given without bank_labels"),
    ({"bank_labels": torch.zeros(10, dtype=torch.int64)}, ValueError, "bank_labels was given without labels"),
    ({"labels": torch.zeros(5, dtype=torch.int64), "bank_labels": torch.zeros(10, dtype=torch.int64)}, ValueError,
     r"labels must have shape \(B,\) = \(4,\)"),
    ({"labels": torch.zeros(4), "bank_labels": torch.zeros(10, dtype=torch.int64)}, TypeError,
     "labels must be an integer tensor"),
    ({"labels": torch.zeros(4, dtype=torch.int64), "bank_labels": torch.zeros(9, dtype=torch.int64)}, ValueError,
     r"bank_labels must have shape \(M,\) = \(10,\)"),
    ({"exclude_indices": [0, 1, 2, 3]}, TypeError, "exclude_indices must be an int64"),
    ({"exclude_indices": torch.zeros(5, dtype=torch.int64)}, ValueError,
     r"exclude_indices must have shape \(B,\) or \(B, E\) with B = 4"),
    ({"exclude_indices": torch.zeros(4, 2, 1, dtype=torch.int64)}, ValueError, "exclude_indices must have shape"),
    ({"exclude_indices": torch.zeros(4, dtype=torch.float32)}, TypeError, "exclude_indices must be an int64"),
    ({"exclude_indices": torch.full((4,), 10)}, IndexError, r"exclude_indices must lie in \[0, M\) = \[0, 10\)"),
    ({"exclude_indices": torch.full((4, 2), -2)}, IndexError, "or be -1"),
    ({"max_similarity": math.nan}, ValueError, "max_similarity must not be NaN"),
    ({"max_similarity": "0.9"}, TypeError, "max_similarity must be a number or a floating tensor"),
    ({"max_similarity": True}, TypeError, "max_similarity must be a number"),
    ({"max_similarity": torch.ones(4, dtype=torch.int64)}, TypeError, "max_similarity must be a number or a floating"),
    ({"max_similarity": torch.ones(3)}, ValueError, r"max_similarity must have shape \(\) or \(B,\) = \(4,\)"),
    ({"max_similarity": torch.ones(4, 1)}, ValueError, r"max_similarity must have shape \(\) or \(B,\)"),
    ({"max_similarity": torch.ones(4, device="meta")}, ValueError, "max_similarity is on meta"),
])
def test_bad_input_is_refused_by_name(kw, error, match):
    with pytest.raises(error, match=match):
        _bad(**kw)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_does_not_lower_the_comparison(device):
    # An audit's case: under torch.autocast(bfloat16) the tiles' GEMM ran in bfloat16 (81 % of the rows a float64
    # comparison picks, values 1.6e-3 off, max_similarity compared with rounded values). Mining compares in float32
    # whatever the autocast state: the same rows and values as without it.
    a, bank = _draw(64, 3000, 128, torch.float32, device, seed=31)
    bound = torch.full((64,), 0.3, device=device)
    want = cb.mine_hard_negatives(a, bank, 16, max_similarity=bound)
    assert want.values.dtype == torch.float32
    for dtype in [torch.bfloat16] + ([torch.float16] if device == "cuda" else []):
        with torch.autocast(device, dtype=dtype):
            got = cb.mine_hard_negatives(a, bank, 16, max_similarity=bound)
        assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
