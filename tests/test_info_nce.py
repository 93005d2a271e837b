"""The fused InfoNCE kernel against the float64 reference: values and gradients in every mode and dtype."""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # a GPU machine without network may lack it: only the property test below needs it
    given = None

import contrastbound as cb
from contrastbound import _backend
from contrastbound.reference import (bank_cross_entropy_reference, info_nce_reference, nt_xent_reference,
                                     supcon_reference)

from conftest import DEVICES, DTYPES, MODES, TOL, as_float, assert_close_scaled, loss_and_grads as _run, make_inputs, tol
from conftest import near_duplicate_pairs


def _reference_in_float64(a, p, n, idx, **kw):
    cast = [None if x is None else x.detach().to(torch.float64).requires_grad_(True) for x in (a, p, n)]
    loss, grads = _run(info_nce_reference, *cast, idx, **kw)
    return loss, grads


def _check_against_reference(a, p, n, idx, dtype, floor=None, **kw):
    loss, grads = _run(cb.info_nce, a, p, n, idx, **kw)
    ref_loss, ref_grads = _reference_in_float64(a, p, n, idx, **kw)
    assert loss.dtype == dtype
    assert_close_scaled(loss, ref_loss, tol(dtype, a.device), "loss", floor)
    for name, g, r in zip("apn", grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape
        assert_close_scaled(g, r, tol(dtype, a.device), f"grad {name}", floor)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(device, dtype, mode, normalize, reduction):
    # K = 1037 crosses the kernel's bank tiles (512) and row tiles (256) with a remainder; d = 19 is odd.
    a, p, n, idx = make_inputs(mode, B=37, K=1037, d=19, dtype=dtype, device=device)
    # Relative to the largest magnitude on CPU (a zero gradient of the mean fails); the CUDA tensor-core gradients
    # (bf16 coefficients, ~1e-2 relative) are held to that standard by test_cuda.py's norm-relative checks.
    _check_against_reference(a, p, n, idx, dtype, temperature=0.2, normalize=normalize, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("temperature", [0.01, 0.07, 1.0, 10.0])
@pytest.mark.parametrize("mode", MODES)
def test_temperature_range(dtype, temperature, mode):
    a, p, n, idx = make_inputs(mode, B=13, K=700, d=8, dtype=dtype, seed=3)
    _check_against_reference(a, p, n, idx, dtype, temperature=temperature, normalize=True, reduction="mean")


@pytest.mark.parametrize("mode", ["shared", "in_batch"])
def test_several_anchor_blocks(mode):
    # B = 300 > 256 anchors per GEMM block.
    a, p, n, idx = make_inputs(mode, B=300, K=1500, d=16, dtype=torch.float64, seed=4)
    _check_against_reference(a, p, n, idx, torch.float64, temperature=0.1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_a_chunk_of_several_bank_tiles(dtype):
    # B = 40 > 32 anchors and K = 5000: a K chunk spans several 512-row bank tiles, and the anchors' weighted sum is
    # rescaled as each tile raises the running max. A mutation audit's survivor (2026-12-02): without that rescale
    # the anchor gradient was 7.2e-2 off (its largest entry 1.73), the losses unchanged; only a test comparing two
    # thread counts, equally wrong, had such a chunk.
    a, p, n, idx = make_inputs("shared", B=40, K=5000, d=24, dtype=dtype, seed=0)
    _check_against_reference(a, p, n, idx, dtype, temperature=0.1, reduction="none")


@pytest.mark.parametrize("mode", ["shared", "per_anchor", "indexed"])
def test_few_anchors_many_negatives_split_into_chunks(mode):
    # B = 2 with K = 3000: the kernel splits K into several chunks per anchor and merges their partial states.
    a, p, n, idx = make_inputs(mode, B=2, K=3000, d=11, dtype=torch.float64, seed=8, M=500)
    _check_against_reference(a, p, n, idx, torch.float64, temperature=0.05)


def test_low_temperature_large_logits_stay_finite():
    # Unnormalised features at temperature 0.01: logits in the thousands; the online max keeps exp in range.
    a, p, n, idx = make_inputs("shared", B=9, K=2000, d=32, dtype=torch.float32, seed=5)
    loss = cb.info_nce(a, p, n, temperature=0.01, normalize=False)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(x.grad).all() for x in (a, p, n))
    ref = info_nce_reference(*(x.detach().double() for x in (a, p, n)), temperature=0.01, normalize=False)
    assert abs(loss.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))



@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, temperature", [(torch.float32, 1e-20), (torch.float32, 1e25),
                                                (torch.float64, 1e-160), (torch.float64, 1e160)], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [True, False])
def test_extreme_temperatures_gradients(device, mode, dtype, temperature, normalize):
    # Temperatures the op accepts (down to 2.9e-39 in float32) whose scale s = 1 / T squared leaves the type: the
    # anchors' and positives' gradients formed (s a_hat) . (s ...) / s and were NaN, inf or 0 (T = 1e-20: NaN
    # anchors' gradient; T = 1e25: positives' gradient 0), while the loss was right.
    a, p, n, idx = make_inputs(mode, B=6, K=40, d=7, dtype=dtype, device=device, seed=13)
    _check_against_reference(a, p, n, idx, dtype, temperature=temperature, normalize=normalize, reduction="sum")


@pytest.mark.parametrize("dtype, temperature", [(torch.float32, 1e-28), (torch.float64, 1e-300)], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_zero_anchor_row_at_a_tiny_temperature(mode, dtype, temperature):
    # A zero anchor row normalises to 0 (F.normalize clamps its norm to 1e-12), so its logits are 0 and its loss
    # log(K + 1) at any temperature. Folding the scale as x * (1e12 / T) overflowed (float32 below T ~ 3e-27,
    # float64 below ~6e-297) and gave 0 * inf = NaN; (x / ||x||) / T keeps it 0. The other rows' losses (~1 / T)
    # must match the reference too.
    a, p, n, idx = make_inputs(mode, B=5, K=9, d=6, dtype=dtype, seed=12, requires_grad=False)
    a[2] = 0
    loss = cb.info_nce(a, p, n, negative_indices=idx, temperature=temperature, reduction="none")
    ref = info_nce_reference(*(None if x is None else x.double() for x in (a, p, n)), negative_indices=idx,
                             temperature=temperature, reduction="none")
    assert torch.isfinite(loss).all(), loss
    assert_close_scaled(loss, ref, TOL[dtype], "loss")
    k = n.shape[-2] if idx is None and n is not None else (idx.shape[1] if idx is not None else a.shape[0] - 1)
    assert loss[2].item() == pytest.approx(math.log(k + 1), rel=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, temperature, c", [(torch.float32, 1e-28, 2.0**-20), (torch.float64, 1e-292, 2.0**-30)],
                         ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_small_norm_rows_at_a_tiny_temperature(device, mode, dtype, temperature, c):
    # With normalize=True the loss does not change when a row is scaled by c > 0, so that row's gradient is 1 / c
    # times the unscaled row's: an oracle where a float64 reference overflows (c a power of two: every step scales
    # exactly). The normalisation's radial term (x_hat . G) proj x formed (x_hat . G) proj first, proj = 1 / |x|^2:
    # float32 inf at |x| ~ 1e-6 and T = 1e-28 (anchors, positives, per-anchor and indexed bank rows), where the
    # true gradient is ~1e34 (float64: |x| ~ 1e-9 at T = 1e-292, ~1e301).
    a, p, n, idx = make_inputs(mode, B=5, K=9, d=6, dtype=dtype, device=device, seed=12, requires_grad=False)
    # Positives apart from their anchors: at this temperature a negative often wins and the gradients are not 0.
    p = torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(p)
    scaled = [torch.zeros(x.shape[:-1], dtype=torch.bool, device=device) for x in (a, p, n) if x is not None]
    scaled[0][[1, 3]] = True
    scaled[1][[2, 4]] = True
    if mode == "per_anchor":  # the rows that win at this temperature (the others' gradients are 0)
        win = torch.einsum("bd,bkd->bk", F.normalize(a, dim=1), F.normalize(n, dim=2)).argmax(1)
        scaled[2][[1, 3], win[[1, 3]]] = True
    elif n is not None:  # bank rows: in the indexed mode, rows that indices use
        scaled[2][idx[:2, 0] if idx is not None else [0, 4]] = True

    def grads(xs):
        leaves = [x.clone().requires_grad_() for x in xs]
        args = leaves + [None] * (3 - len(leaves))
        loss = cb.info_nce(*args, negative_indices=idx, temperature=temperature, reduction="sum")
        return torch.autograd.grad(loss, leaves)

    base = [x for x in (a, p, n) if x is not None]
    expected = [g * torch.where(m, 1 / c, 1.0).unsqueeze(-1).to(g) for g, m in zip(grads(base), scaled)]
    actual = grads([x * torch.where(m, c, 1.0).unsqueeze(-1).to(x) for x, m in zip(base, scaled)])
    for name, g, e, m in zip("apn", actual, expected, scaled):
        assert torch.isfinite(e).all() and (e[m] != 0).any(), name  # the oracle itself: finite, and not all 0
        assert_close_scaled(g, e, tol(dtype, device), f"grad {name}")


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_and_expanded_inputs(mode):
    B, K, d = 11, 600, 10
    g = torch.Generator().manual_seed(7)
    a_leaf = torch.randn(B, 2 * d, generator=g, dtype=torch.float64, requires_grad=True)
    a = a_leaf[:, ::2]  # inner stride 2
    p_leaf = torch.randn(d, B, generator=g, dtype=torch.float64, requires_grad=True)
    p = p_leaf.t()  # transposed
    idx = None
    if mode == "shared":
        n_leaf = torch.randn(d, K, generator=g, dtype=torch.float64, requires_grad=True)
        n = n_leaf.t()  # a transposed bank
    elif mode == "per_anchor":
        n_leaf = torch.randn(1, K, d, generator=g, dtype=torch.float64, requires_grad=True)
        n = n_leaf.expand(B, K, d)  # stride 0 over anchors
    elif mode == "indexed":
        n_leaf = torch.randn(1, d, generator=g, dtype=torch.float64, requires_grad=True)
        n = n_leaf.expand(40, d)  # stride-0 bank
        idx = torch.randint(0, 40, (B, 2 * K), generator=g)[:, ::2]  # non-contiguous indices
    else:
        n_leaf, n = None, None
    leaves = [x for x in (a_leaf, p_leaf, n_leaf) if x is not None]
    loss = cb.info_nce(a, p, n, negative_indices=idx, temperature=0.3)
    grads = torch.autograd.grad(loss, leaves)
    ref = info_nce_reference(a, p, n, negative_indices=idx, temperature=0.3)
    ref_grads = torch.autograd.grad(ref, leaves)
    assert_close_scaled(loss, ref, 1e-9, "loss")
    for x, y in zip(grads, ref_grads):
        assert_close_scaled(x, y, 1e-9, "grad")


@pytest.mark.skipif(not _backend.kernel_serves(torch.device("cpu")), reason="needs the CPU kernel")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_indexed_negatives_from_a_transposed_bank_read_only_the_used_rows(dtype, monkeypatch):
    # A performance review (2026-12-06): indices into a (d, M).t() bank that needs no gradient copied the whole bank
    # at every call (M = 2^20, d = 128, B = 32, K = 16: 420 ms and 256 MiB, 0.34 ms with a contiguous bank). Now the
    # used rows are gathered: the op sees a bank of at most B K rows, the loss and the anchors' and positives'
    # gradients are those of the contiguous bank (padding -1 and repeated rows included), and an index out of
    # range is still named by the kernel's own check.
    from contrastbound import functional

    g = torch.Generator().manual_seed(3)
    M, B, K, d = 4000, 7, 9, 33
    bank_t = torch.randn(d, M, generator=g).to(dtype).t()  # rows strided by M
    idx = torch.randint(0, M, (B, K), generator=g)
    idx[0, :4] = -1
    idx[1, :] = idx[1, 0]  # one row, K times
    a, p = (torch.randn(B, d, generator=g).to(dtype).requires_grad_(True) for _ in range(2))
    seen = []
    real = functional._fwd_op
    monkeypatch.setattr(functional, "_fwd_op", lambda *args: (seen.append(tuple(args[2].shape)), real(*args))[1])
    out = []
    for bank in (bank_t, bank_t.contiguous()):
        loss = cb.info_nce(a, p, bank, 0.05, negative_indices=idx)
        out.append((loss.detach(), *torch.autograd.grad(loss, [a, p])))
    assert seen[0][0] <= B * K and seen[1][0] == M, seen  # the transposed bank's used rows only
    for x, y, name in zip(out[0], out[1], ("loss", "grad anchors", "grad positives")):
        assert_close_scaled(x, y, 1e-12 if dtype == torch.float64 else 1e-5, name)
    bad = idx.clone()
    bad[2, 3] = M
    with pytest.raises(IndexError, match=r"negative_indices must lie in \[0, M\) = \[0, 4000\)"):
        cb.info_nce(a, p, bank_t, 0.05, negative_indices=bad)
    # a bank that needs a gradient is passed whole (its gradient is (M, d)), as before
    seen.clear()
    bank_leaf = bank_t.detach().requires_grad_(True)
    cb.info_nce(a, p, bank_leaf, 0.05, negative_indices=idx).backward()
    assert seen == [(M, d)] and bank_leaf.grad.shape == (M, d)


def test_repeated_indices_count_twice():
    a, p, n, _ = make_inputs("indexed", B=4, K=3, d=5, dtype=torch.float64, M=6)
    idx = torch.tensor([[0, 0, 1], [2, 2, 2], [5, 4, 5], [3, 3, 0]])
    loss = cb.info_nce(a, p, n, negative_indices=idx, reduction="none")
    materialised = cb.info_nce(a, p, n.detach()[idx], reduction="none")
    assert_close_scaled(loss, materialised, 1e-12, "loss")
    (gn,) = torch.autograd.grad(loss.sum(), [n])
    ref = info_nce_reference(a, p, n, negative_indices=idx, reduction="sum")
    (rn,) = torch.autograd.grad(ref, [n])
    assert_close_scaled(gn, rn, 1e-12, "bank grad")


@pytest.mark.parametrize("mode", ["shared", "per_anchor", "indexed"])
def test_zero_negatives_give_zero_loss(mode):
    a, p, n, idx = make_inputs(mode, B=5, K=0, d=4, dtype=torch.float64)
    if mode == "indexed":
        idx = torch.empty(5, 0, dtype=torch.long)
    loss = cb.info_nce(a, p, n, negative_indices=idx, reduction="none")
    assert torch.equal(loss, torch.zeros(5, dtype=torch.float64))
    grads = torch.autograd.grad(loss.sum(), [a, p, n])
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_empty_batch(mode, dtype, device):
    # B = 0 (an empty last batch, a rank without rows): an empty per-anchor loss, sum 0 and mean NaN as
    # F.cross_entropy gives, and zero / empty gradients.
    K = 0 if mode == "in_batch" else 70
    a, p, n, idx = make_inputs(mode, B=0, K=K, d=5, dtype=dtype, device=device, M=9)
    if mode == "indexed":
        idx = torch.empty(0, 70, dtype=torch.long, device=device)
    loss = cb.info_nce(a, p, n, negative_indices=idx, reduction="none")
    assert loss.shape == (0,) and loss.dtype == dtype
    assert cb.info_nce(a, p, n, negative_indices=idx, reduction="sum").item() == 0
    assert torch.isnan(cb.info_nce(a, p, n, negative_indices=idx, reduction="mean"))
    leaves = [x for x in (a, p, n) if x is not None]
    grads = torch.autograd.grad(cb.info_nce(a, p, n, negative_indices=idx, reduction="sum"), leaves)
    for g, x in zip(grads, leaves):
        assert g.shape == x.shape and torch.count_nonzero(g) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_family(device):
    z = torch.randn(0, 6, device=device, requires_grad=True)
    w = torch.randn(0, 6, device=device, requires_grad=True)
    bank = torch.randn(40, 6, device=device, requires_grad=True)
    targets = torch.empty(0, dtype=torch.long, device=device)
    losses = {
        "nt_xent": cb.nt_xent(z, w, 0.5, reduction="sum"),
        "clip_loss": cb.clip_loss(z, w, 10.0, reduction="sum"),
        "bank_cross_entropy": cb.bank_cross_entropy(z, bank, targets, reduction="sum"),
        "info_nce_lse": cb.info_nce_lse(z, w, bank)[0].sum(),
    }
    for name, loss in losses.items():
        assert loss.item() == 0, name
        grads = torch.autograd.grad(loss, [z, w, bank], allow_unused=True)
        assert all(g is None or torch.count_nonzero(g) == 0 for g in grads), name


@pytest.mark.parametrize("mode", MODES)
def test_tiny_sizes(mode):
    for B, K, d in [(1, 1, 1), (1, 3, 1), (2, 1, 3)]:
        a, p, n, idx = make_inputs(mode, B=B, K=K, d=d, dtype=torch.float64, seed=B + K + d)
        # a normalised d = 1 row is +-1 whatever its value: its gradient is 0 up to the rounding of terms ~ s = 2
        floor = 2.0 if d == 1 else 0.0
        _check_against_reference(a, p, n, idx, torch.float64, floor, temperature=0.5)


def _assert_same_bits_with_1_and_2_threads(a, p, n, idx):
    threads = torch.get_num_threads()
    out = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            loss, grads = _run(cb.info_nce, a, p, n, idx, temperature=0.1, reduction="none")
            out.append((loss, *grads))
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(*out):
        assert torch.equal(x, y)


@pytest.mark.parametrize("mode", ["shared", "per_anchor", "indexed", "in_batch"])
def test_results_do_not_depend_on_the_thread_count(mode):
    # The kernel's units follow the sizes, not the threads: the same bits with 1 and 2 threads (K spans chunks).
    a, p, n, idx = make_inputs(mode, B=37, K=3000, d=19, dtype=torch.float32, M=2000)
    _assert_same_bits_with_1_and_2_threads(a, p, n, idx)


def _labels(n, classes, seed):
    return torch.randint(classes, (n,), generator=torch.Generator().manual_seed(seed))


# Steps of one unit (a bank of one tile, in-batch below a block of rows): at::parallel_for ran them on the calling
# thread outside a parallel region, where torch's matrix product inside split its own work by the thread count
# (MKL): the loss and gradients differed by ~1e-7 between 1 and 3 threads (2 and 1 with d = 1000). They now run
# inside a region (csrc/core/parallel.h). Sizes from a thread audit; each case differed before.
_ONE_UNIT_CASES = {
    "bank_37x100": lambda x: cb.info_nce(x[0], x[1], x[2], 0.1, reduction="none"),
    "bank_300x300": lambda x: cb.info_nce(x[0], x[1], x[2], 0.1, reduction="none"),
    "bank_3x5_d1000": lambda x: cb.info_nce(x[0], x[1], x[2], 0.1, reduction="none"),
    "in_batch": lambda x: cb.info_nce(x[0], x[1], None, 0.1, reduction="none"),
    "nt_xent": lambda x: cb.nt_xent(x[0], x[1], 0.1, reduction="none"),
    "supcon": lambda x: cb.supcon_loss(x[0], _labels(37, 7, 1), 0.1, reduction="none"),
    "debiased": lambda x: cb.debiased_info_nce(x[0], x[1], None, 0.1, tau_plus=0.1, reduction="none"),
    "clip": lambda x: cb.clip_loss(x[0], x[1], 10.0, reduction="none"),
    "siglip": lambda x: cb.siglip_loss(x[0], x[1], 10.0, -10.0, reduction="none"),
}
_ONE_UNIT_SHAPES = {"bank_37x100": [(37, 19), (37, 19), (100, 19)], "bank_300x300": [(300, 40)] * 3,
                    "bank_3x5_d1000": [(3, 1000), (3, 1000), (5, 1000)], "supcon": [(37, 19)]}


@pytest.mark.parametrize("case", sorted(_ONE_UNIT_CASES))
def test_one_unit_steps_give_the_same_bits_with_any_thread_count(case):
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(*shape, generator=gen) for shape in _ONE_UNIT_SHAPES.get(case, [(37, 19)] * 2)]
    threads = torch.get_num_threads()
    out = []
    try:
        for t in (1, 2, 3, 4):
            torch.set_num_threads(t)
            xs = [x.clone().requires_grad_() for x in inputs]
            loss = _ONE_UNIT_CASES[case](xs)
            out.append((loss.detach(), *torch.autograd.grad(loss.sum(), xs)))
    finally:
        torch.set_num_threads(threads)
    for t, got in zip((2, 3, 4), out[1:]):
        for i, (x, y) in enumerate(zip(out[0], got)):
            assert torch.equal(x, y), f"{case}: output {i} with {t} threads differs from 1 thread by {(x - y).abs().max()}"


@pytest.mark.parametrize("size", ["one_unit", "split"])
def test_a_threads_first_loss_keeps_its_thread_count(size):
    # torch.set_num_threads stores one count for the process; the library's first at::parallel_for on a thread ran
    # torch's per-thread set-up again (its flag is per shared object), which set that thread's count to whatever
    # thread had set one last: a thread at 2 ran at 1 after its first loss, its own torch ops too (a concurrency
    # audit's find). Sizes: a one-unit step and a split one.
    import threading

    B, K = (3, 5) if size == "one_unit" else (300, 3000)
    gen = torch.Generator().manual_seed(1)
    a, p, n = torch.randn(B, 8, generator=gen), torch.randn(B, 8, generator=gen), torch.randn(K, 8, generator=gen)
    threads = torch.get_num_threads()
    stage, seen, errors = threading.Condition(), {}, []

    def first_call():
        try:
            torch.get_num_threads()  # torch's own set-up on this thread, as any torch op would run it
            torch.set_num_threads(2)
            with stage:
                seen["set"] = True
                stage.notify_all()
                stage.wait_for(lambda: "other" in seen, timeout=60)
            cb.info_nce(a.clone().requires_grad_(), p, n, 0.1).backward()
            seen["after"] = torch.get_num_threads()
        except Exception as exc:  # (reported below: an exception in a thread would not fail the test)
            errors.append(exc)

    worker = threading.Thread(target=first_call)
    try:
        worker.start()
        with stage:
            stage.wait_for(lambda: "set" in seen, timeout=60)
            torch.set_num_threads(1)  # another thread's count, set after the first thread's
            seen["other"] = True
            stage.notify_all()
        worker.join(timeout=120)
    finally:
        torch.set_num_threads(threads)
    assert not errors and not worker.is_alive()
    assert seen["after"] == 2


# At d ~ 1000 MKL, running on one thread inside a region, still chose its code path by the thread count torch had
# set: every case here differed between 1 thread and 2, 3, 4 or 8 (by up to ~4e-9) until each unit set MKL's own
# count to 1 (csrc/core/parallel.h, BlasOneThread). Not bank_cross_entropy with a half bank: its target rows'
# gradient comes from torch's own products in Python, which round by the thread count (docs/LIMITS.md, Reproducibility).
_LARGE_D_CASES = {  # (loss of the inputs, the inputs' shapes)
    "bank": (lambda x: cb.info_nce(x[0], x[1], x[2], 0.1, reduction="none"), [(37, 1000)] * 2 + [(3000, 1000)]),
    "in_batch": (lambda x: cb.info_nce(x[0], x[1], None, 0.1, reduction="none"), [(64, 1024)] * 2),
    "nt_xent": (lambda x: cb.nt_xent(x[0], x[1], 0.1, reduction="none"), [(64, 1024)] * 2),
    "supcon": (lambda x: cb.supcon_loss(x[0], _labels(64, 7, 1), 0.1, reduction="none"), [(64, 1024)]),
    "clip": (lambda x: cb.clip_loss(x[0], x[1], 10.0, reduction="none"), [(64, 1024)] * 2),
    "siglip": (lambda x: cb.siglip_loss(x[0], x[1], 10.0, -10.0, reduction="none"), [(64, 1024)] * 2),
    "bank_cross_entropy": (lambda x: cb.bank_cross_entropy(x[0], x[1], _labels(37, 3000, 2), 0.1, reduction="none"),
                           [(37, 1000), (3000, 1000)]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(_LARGE_D_CASES))
def test_same_bits_with_any_thread_count_at_large_d(case, dtype):
    if not torch.backends.mkl.is_available():
        pytest.skip("BlasOneThread sets MKL's count; other BLAS builds of torch are untested "
                    "(docs/LIMITS.md, Reproducibility)")
    if case == "bank_cross_entropy" and dtype != torch.float32:
        pytest.skip("a half bank's target rows come from torch's own products (docs/LIMITS.md, Reproducibility)")
    loss_of, shapes = _LARGE_D_CASES[case]
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randn(*shape, generator=gen).to(dtype) for shape in shapes]
    threads = torch.get_num_threads()
    out = []
    try:
        for t in (1, 2, 3, 8):
            torch.set_num_threads(t)
            xs = [x.clone().requires_grad_() for x in inputs]
            loss = loss_of(xs)
            out.append((loss.detach(), *torch.autograd.grad(loss.sum(), xs)))
    finally:
        torch.set_num_threads(threads)
    for t, got in zip((2, 3, 8), out[1:]):
        for i, (x, y) in enumerate(zip(out[0], got)):
            assert torch.equal(x, y), f"{case}: output {i} with {t} threads differs from 1 thread by {(x - y).abs().max()}"


# The indexed mode's two walks of the bank (csrc/cpu/info_nce_cpu.cpp): row by row, and by bank blocks (taken
# for banks beyond 2 MiB). CONTRASTBOUND_CPU_INDEXED forces one; "blocked:R:G:E" sets R rows per block, G anchors
# per group and E indices listed at once (fewer than a chunk's: windows of k; the forward's only, backward counts
# a group of one anchor's hits without listing them), so that small inputs cross many blocks, groups, windows and
# row tiles (1037 = 4 x 256 + 13 indices per anchor).
INDEXED_WALKS = ["rows", "blocked", "blocked:7", "blocked:7:3", "blocked:1:1", "blocked:1000:2", "blocked:7:1:50",
                 "blocked:7:3:50"]


@pytest.mark.parametrize("walk", INDEXED_WALKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_indexed_walks_match_reference(monkeypatch, walk, dtype):
    monkeypatch.setenv("CONTRASTBOUND_CPU_INDEXED", walk)
    a, p, n, idx = make_inputs("indexed", B=37, K=1037, d=19, dtype=dtype, M=301, seed=11)
    _check_against_reference(a, p, n, idx, dtype, temperature=0.1, reduction="none")


@pytest.mark.parametrize("walk", ["blocked:7:3", "blocked:1:1", "blocked:3:2:7"])
def test_indexed_blocked_walk_gradcheck_and_threads(monkeypatch, walk):
    monkeypatch.setenv("CONTRASTBOUND_CPU_INDEXED", walk)
    a, p, n, idx = make_inputs("indexed", B=5, K=40, d=6, dtype=torch.float64, M=13, seed=12)
    assert torch.autograd.gradcheck(
        lambda a, p, n: cb.info_nce(a, p, n, negative_indices=idx, temperature=0.3, reduction="none"), (a, p, n),
        eps=1e-6, atol=1e-7, rtol=1e-5
    )
    a, p, n, idx = make_inputs("indexed", B=37, K=3000, d=19, dtype=torch.float32, M=2000, seed=13)
    _assert_same_bits_with_1_and_2_threads(a, p, n, idx)


def test_indexed_large_bank_takes_the_blocked_walk(monkeypatch):
    # 5000 rows x 128 float32 = 2.4 MiB: past the 2 MiB threshold, 10 blocks of 512 rows, 6000 indices per anchor.
    a, p, n, idx = make_inputs("indexed", B=9, K=6000, d=128, dtype=torch.float32, M=5000, seed=14)
    out = {}
    for walk in (None, "blocked", "rows"):
        if walk is None:
            monkeypatch.delenv("CONTRASTBOUND_CPU_INDEXED", raising=False)
        else:
            monkeypatch.setenv("CONTRASTBOUND_CPU_INDEXED", walk)
        loss, grads = _run(cb.info_nce, a, p, n, idx, temperature=0.1, reduction="none")
        out[walk] = (loss, *grads)
    assert all(torch.equal(x, y) for x, y in zip(out[None], out["blocked"]))
    # The two walks sum in different orders: not the same bits, the same values to float32 rounding.
    assert not all(torch.equal(x, y) for x, y in zip(out["blocked"], out["rows"]))
    for x, y in zip(out["blocked"], out["rows"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    _check_against_reference(a, p, n, idx, torch.float32, temperature=0.1, reduction="none")


@pytest.mark.parametrize("walk", ["rows", "blocked:7:3", "blocked:1:1"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_indexed_bank_with_more_rows_than_indices(monkeypatch, walk, normalize, dtype):
    # Fewer index entries (B K = 37 x 5) than bank rows (M = 3000): the kernel forms each row's norm where it reads
    # the row instead of a table over the whole bank (csrc/cpu/info_nce_cpu.cpp, IndexedScales). Rows of zeros
    # among those picked take F.normalize's clamped norm (proj = 0); not in float16, where their gradient (the
    # upstream one over eps = 1e-12) is beyond the range, inf as for naive PyTorch. The bank's first and last rows
    # among those picked, one twice: the half types' backward keeps float32 rows for the picked rows only, row m at a
    # slot of its own (a slot table that took m > 0 for a picked row wrote row 0's gradient before the buffer: a
    # mutation audit's survivor, as random indices seldom pick row 0).
    monkeypatch.setenv("CONTRASTBOUND_CPU_INDEXED", walk)
    a, p, n, idx = make_inputs("indexed", B=37, K=5, d=19, dtype=dtype, M=3000, seed=21)
    idx[4:6, 1], idx[6, 2] = 0, 2999
    if dtype != torch.float16:
        with torch.no_grad():
            n[idx[:3, 0]] = 0
    # (Raw features at T = 0.1: a positive logit ~190 above the rest, every loss ~e^-146.)
    t = 0.1 if normalize else 5.0
    _check_against_reference(a, p, n, idx, dtype, temperature=t, reduction="none", normalize=normalize)


@pytest.mark.parametrize("walk", ["rows", "blocked:7:3"])
def test_indexed_row_scales_formed_where_read_give_the_tables_bits(monkeypatch, walk):
    # The same 64 anchors and indices with a bank of 1000 rows: alone (64 x 5 = 320 entries < 1000 rows: norms formed
    # where read) and with 136 more anchors (1000 entries: a table of every row's norm). 64 anchors or more: one K
    # chunk in both, so each anchor's sums run in the same order. Their losses and the bank's gradient (the extra
    # anchors' losses weighted 0) must have the same bits.
    monkeypatch.setenv("CONTRASTBOUND_CPU_INDEXED", walk)
    a, p, n, idx = make_inputs("indexed", B=200, K=5, d=19, dtype=torch.float32, M=1000, seed=22)
    with torch.no_grad():
        n[idx[0, 0]] = 0
    out = []
    for b in (64, 200):
        n.grad = None
        loss = cb.info_nce(a[:b], p[:b], n, negative_indices=idx[:b], temperature=0.1, reduction="none")
        loss[:64].sum().backward()
        out.append((loss[:64].detach(), n.grad.clone()))
    assert out[1][1].abs().sum() > 0
    for x, y in zip(*out):
        assert torch.equal(x, y)


@pytest.mark.parametrize("walk", ["blocked", "blocked:7", "blocked:7:3", "blocked:1:1", "blocked:7:1:50"])
@pytest.mark.parametrize("normalize", [True, False])
def test_indexed_bank_gradient_same_bits_in_both_walks(monkeypatch, walk, normalize):
    # The blocked backward adds each bank row's terms in anchor order, one per anchor (its hits counted): given
    # the same lse, the row walk's bits.
    a, p, n, idx = make_inputs("indexed", B=37, K=1037, d=19, dtype=torch.float32, M=301, seed=15)
    a, p, n = a.detach(), p.detach(), n.detach()
    _, lse, term = torch.ops.contrastbound.info_nce_fwd(a, p, n, idx, 10.0, normalize, True, True)
    grad = torch.rand(37, dtype=torch.float32)
    out = []
    for w in ("rows", walk):
        monkeypatch.setenv("CONTRASTBOUND_CPU_INDEXED", w)
        out.append(torch.ops.contrastbound.info_nce_bwd(grad, a, p, n, idx, lse, term, 10.0, normalize, True,
                                                        [True, True, True]))
    assert out[1][2].abs().sum() > 0
    for x, y in zip(*out):
        assert torch.equal(x, y)


@pytest.mark.parametrize("walk", ["rows", "blocked", "blocked:2:1"])
def test_indexed_bank_rows_hit_many_times_keep_their_gradient(monkeypatch, walk):
    # Each anchor hits one bank row K = 10^6 times (an expanded index): the loss and gradients have a closed form,
    # log(e^{l_pos} + K e^{l_neg}) - l_pos, taken in float64 by autograd. Added hit by hit in float32, the row's
    # gradient stagnated (2e-2 relative here, 0.98 at K = 7.2e8); counted per (anchor, row), ~1e-7. And rows of a
    # 5-row bank drawn with replacement, 4 x 2 x 10^5 hits, against the float64 reference.
    monkeypatch.setenv("CONTRASTBOUND_CPU_INDEXED", walk)
    g = torch.Generator().manual_seed(21)
    a, p, bank = (torch.randn(*shape, generator=g, requires_grad=True) for shape in ((3, 4), (3, 4), (5, 4)))
    rows, K, T = torch.tensor([1, 3, 1]), 10**6, 0.5
    cb.info_nce(a, p, bank, negative_indices=rows[:, None].expand(3, K), temperature=T).backward()
    a64, p64, b64 = (x.detach().double().requires_grad_(True) for x in (a, p, bank))
    an, pn, bn = (F.normalize(x, dim=1) for x in (a64, p64, b64))
    l_pos, l_neg = (an * pn).sum(1) / T, (an * bn[rows]).sum(1) / T
    (torch.logaddexp(l_pos, l_neg + math.log(K)) - l_pos).mean().backward()
    for got, want in ((a.grad, a64.grad), (p.grad, p64.grad), (bank.grad, b64.grad)):
        assert float((got.double() - want).norm() / want.norm()) < 1e-5
    assert torch.equal(bank.grad[[0, 2, 4]], torch.zeros(3, 4))  # rows no index used
    a, p, n, _ = make_inputs("indexed", B=4, K=8, d=6, dtype=torch.float32, M=5, seed=22)
    idx = torch.randint(0, 5, (4, 200_000), generator=g)
    _check_against_reference(a, p, n, idx, torch.float32, temperature=0.2)


@pytest.mark.parametrize("walk", [None, "blocked:1", "blocked:1:2", "blocked:2:3"])
def test_indexed_backward_with_ranges_past_the_bank(monkeypatch, walk):
    # The backward splits the bank into min(M, 2 threads) ranges of ceil(M / ranges) rows: with 16 threads and
    # M = 65 the last ranges start past M, and their negative block count sized a vector ("cannot create
    # std::vector larger than max_size()"): the default plan (65 rows of 4096 float32 take the blocked walk), and
    # the forced group walks on a 5-row bank with 2 threads
    if walk is None:
        monkeypatch.delenv("CONTRASTBOUND_CPU_INDEXED", raising=False)
        a, p, n, idx = make_inputs("indexed", B=4, K=64, d=4096, dtype=torch.float32, M=65, seed=23)
    else:
        monkeypatch.setenv("CONTRASTBOUND_CPU_INDEXED", walk)
        a, p, n, idx = make_inputs("indexed", B=6, K=40, d=5, dtype=torch.float32, M=5, seed=23)
    threads = torch.get_num_threads()
    torch.set_num_threads(16 if walk is None else 2)
    try:
        _check_against_reference(a, p, n, idx, torch.float32, temperature=0.2)
    finally:
        torch.set_num_threads(threads)


def test_inference_mode_with_worker_threads():
    # OpenMP workers did not inherit inference mode: in-place updates of the caller's inference tensors raised.
    a, p, n, _ = make_inputs("shared", B=300, K=2000, d=8, dtype=torch.float32, requires_grad=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            loss, lse, term = torch.ops.contrastbound.info_nce_fwd(a, p, n, None, 10.0, True, True, True)
            grads = torch.ops.contrastbound.info_nce_bwd(torch.ones(300), a, p, n, None, lse, term, 10.0, True, True,
                                                         [True, True, True])
    finally:
        torch.set_num_threads(threads)
    want = cb.info_nce(a, p, n, temperature=0.1, reduction="none")
    assert_close_scaled(loss, want, TOL[torch.float32], "loss under inference_mode")
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("normalize", [True, False])
def test_unused_bank_rows_get_zero_gradient_even_if_not_finite(normalize):
    # No index picks row 3 (inf) or row 4 (NaN): their gradient is 0, as autograd's, not 0 * inf = NaN (which
    # clip_grad_norm_ would spread to every parameter).
    a, p, _, _ = make_inputs("shared", B=5, K=1, d=4, dtype=torch.float64, requires_grad=False)
    bank = torch.randn(6, 4, dtype=torch.float64)
    bank[3] = float("inf")
    bank[4, 1] = float("nan")
    bank.requires_grad_(True)
    idx = torch.tensor([[0, 1, 2], [5, 5, 0], [1, 2, 5], [0, 0, 0], [2, 1, 0]])
    loss = cb.info_nce(a, p, bank, negative_indices=idx, temperature=0.5, normalize=normalize)
    (g,) = torch.autograd.grad(loss, bank)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert torch.equal(g[3:5], torch.zeros(2, 4, dtype=torch.float64))
    ref = bank.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(info_nce_reference(a, p, ref, negative_indices=idx, temperature=0.5,
                                                     normalize=normalize), ref)
    assert_close_scaled(g[[0, 1, 2, 5]], want[[0, 1, 2, 5]], TOL[torch.float64], "used rows")


def test_weighted_sum_accurate_at_large_k():
    # V = sum_k softmax_k n_hat_k over 2^20 indexed negatives in float32: summed by tiles, its error stays near
    # one rounding. Four distinct rows make every term alike, the worst case of a running sum (row by row it was
    # 2.9e-3 off here).
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(4, 2, generator=g)
    a, p = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    idx = torch.randint(0, 4, (1, 2**20), generator=g).expand(4, -1)
    _, _, term = torch.ops.contrastbound.info_nce_fwd(a, p, bank, idx, 3.0, True, True, True)
    _, _, want = torch.ops.contrastbound.info_nce_fwd(a.double(), p.double(), bank.double(), idx, 3.0, True, True, True)
    a64, bank64 = F.normalize(a.double(), dim=1), F.normalize(bank.double(), dim=1)
    counts = torch.bincount(idx[0], minlength=4).double()  # the float64 oracle from the 4 rows' multiplicities
    pos = 3.0 * (a64 * F.normalize(p.double(), dim=1)).sum(1, keepdim=True)
    e = torch.exp(torch.cat([pos, 3.0 * a64 @ bank64.T], 1))
    oracle = (e[:, 1:] * counts) @ bank64 / (e[:, :1] + (e[:, 1:] * counts).sum(1, keepdim=True))
    assert (term.double() - oracle).abs().max() < 2e-5, (term.double() - oracle).abs().max()
    assert_close_scaled(want, oracle, 1e-12, "float64 V")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["shared_mask", "in_batch"])
def test_more_than_2_31_logits(mode):
    # B K > 2^31 logits at d = 2, in the memory a test can take: a shared bank with a (B, K) bool mask of 2.2 GB,
    # each row a different rotation of one pattern (the mask's row offsets i K pass 2^31), and in-batch N^2. The
    # anchors at the start, middle and end (past the 2^31-th logit), loss and gradient, against float64 over their
    # own columns. About 25 s each on 2 cores. (Indices (B, K) past 2^31 take 8.6 GB as int32: not tested; with
    # expanded indices the row offsets are 0.)
    if not _backend.kernel_serves(torch.device("cpu")):
        pytest.skip("the compiled CPU kernel's indexing")
    g = torch.Generator().manual_seed(31)
    B, K, d = (46343, 0, 2) if mode == "in_batch" else (257, (1 << 23) + 3, 2)
    a, p = torch.randn(B, d, generator=g).requires_grad_(), torch.randn(B, d, generator=g).requires_grad_()
    if mode == "shared_mask":
        bank = torch.randn(K, d, generator=g)
        pattern = torch.rand(K, generator=g) > 0.5
        mask = torch.empty(B, K, dtype=torch.bool)
        for i in range(B):
            mask[i] = pattern.roll(977 * i)
        loss = cb.info_nce(a, p, bank, negative_mask=mask, temperature=0.5, reduction="none")
        columns = lambda i: bank[mask[i]]  # noqa: E731
    else:
        loss = cb.info_nce(a, p, None, temperature=0.5, reduction="none")
        columns = lambda i: torch.cat([p.detach()[:i], p.detach()[i + 1:]])  # noqa: E731
    assert B * (K or B) > 2**31
    (grad,) = torch.autograd.grad(loss.sum(), a)
    for i in (0, B // 2, B - 1):
        ai = a.detach()[i].double().requires_grad_()
        logits = 2.0 * torch.cat([(F.normalize(ai, dim=0) * F.normalize(p.detach()[i].double(), dim=0)).sum()[None],
                                  F.normalize(columns(i).double(), dim=1) @ F.normalize(ai, dim=0)])
        want = torch.logsumexp(logits, 0) - logits[0]
        (want_grad,) = torch.autograd.grad(want, ai)
        got_i, want = float(loss[i].detach()), float(want.detach())
        assert abs(got_i - want) <= 1e-6 * abs(want), (i, got_i, want)
        err = float((grad[i].double() - want_grad).norm() / want_grad.norm())
        assert err < 1e-4, (i, err)


@pytest.mark.slow
def test_per_anchor_negatives_past_2_31_elements():
    # Per-anchor negatives are read and their gradient written through raw pointers: offsets i sb + k sk and
    # (i K + k) d must be 64-bit. Anchor 1's rows lie past element 2^31 of a storage that is mostly never touched
    # (torch.empty: the pages stay unallocated), each anchor's K rows one repeated row (stride 0); the gradient is a
    # dense (2, K, 64) bfloat16 tensor of 2^31 + ... elements (4.8 GB), anchor 1's rows from element 2^30 (9/8) up.
    # Every logit of an anchor is the same l, so in float64 loss = log(e^{l0} + K e^{l}) - l0 and each row's gradient
    # is 1/K of the one row's (autograd through l + log K; ~1e-9: bfloat16, as float16 would flush it to 0). A 32-bit
    # offset reads or writes the wrong place: a wrong loss, a row left unwritten or a crash. Bounds: 3x bfloat16's
    # rounding (2^-8 relative) of the outputs. 16 s and 6.2 GB peak on 2 cores.
    if not _backend.kernel_serves(torch.device("cpu")):
        pytest.skip("the compiled CPU kernel's indexing")
    g = torch.Generator().manual_seed(7)
    B, d, K = 2, 64, (1 << 24) + (1 << 21) + 7
    sb = (1 << 31) + 5 * d
    rows = torch.randn(B, d, generator=g).bfloat16()
    storage = torch.empty(sb + d, dtype=torch.bfloat16)
    storage[:d], storage[sb:] = rows[0], rows[1]
    negatives = storage.as_strided((B, K, d), (sb, 0, 1)).requires_grad_()
    a = torch.randn(B, d, generator=g).bfloat16().requires_grad_()
    p = torch.randn(B, d, generator=g).bfloat16()
    loss = cb.info_nce(a, p, negatives, temperature=0.5, reduction="none")
    ga, gn = torch.autograd.grad(loss.sum(), (a, negatives))
    loss = loss.detach()
    assert gn.shape == (B, K, d) and (B * K - 1) * d > 2**31
    bound = 3 * 2.0**-8
    for i in range(B):
        ai, ni = a.detach()[i].double().requires_grad_(), rows[i].double().requires_grad_()
        an, pn, nn = F.normalize(ai, dim=0), F.normalize(p[i].double(), dim=0), F.normalize(ni, dim=0)
        l0, l = 2.0 * (an @ pn), 2.0 * (an @ nn)
        want = torch.logsumexp(torch.stack([l0, l + math.log(K)]), 0) - l0
        want_a, want_n = torch.autograd.grad(want, (ai, ni))
        assert abs(float(loss[i]) - float(want.detach())) <= bound * float(want.detach()), i
        assert float((ga[i].double() - want_a).norm()) <= bound * float(want_a.norm()), i
        assert float((gn[i, 0].double() - want_n / K).norm()) <= bound * float(want_n.norm()) / K, i
        assert bool((gn[i] == gn[i, 0]).all()), f"anchor {i}: its gradient rows differ (a row written elsewhere)"


@pytest.mark.parametrize("layout", ["rows", "transposed", "indexed", "targets"])
def test_bank_strides_past_2_31_elements(layout):
    # A bank whose rows (or, transposed as MoCo's queue.T, whose features) lie more than 2^31 elements apart in a
    # storage that is mostly never touched (torch.empty: 4.3 GB of address space, a few pages used): the kernel
    # reads it in place through raw pointers (row norms, indexed rows), so the offsets r stride and j inner must be
    # 64-bit ("targets": bank_cross_entropy's, its target row left out and compared with the positive). The same
    # call on a contiguous copy of the bank gives the same bits (the same sums in the same order).
    if not _backend.kernel_serves(torch.device("cpu")):
        pytest.skip("the compiled CPU kernel's indexing")
    g = torch.Generator().manual_seed(3)
    M, d, far = 3, (3 if layout == "transposed" else 24), (1 << 30) + 5
    rows = torch.randn(M, d, generator=g).bfloat16()
    storage = torch.empty(2 * far + d, dtype=torch.bfloat16)
    strides = (1, far) if layout == "transposed" else (far, 1)
    bank = storage.as_strided((M, d), strides)
    with torch.no_grad():
        bank.copy_(rows)
    assert (M - 1) * max(strides) > 2**31
    a = torch.randn(5, d, generator=g).bfloat16().requires_grad_()
    p = torch.randn(5, d, generator=g).bfloat16()
    idx = torch.randint(0, M, (5, 7), generator=g) if layout == "indexed" else None
    targets = torch.tensor([2, 0, 1, 2, 2])
    got, want = [], []
    for b, out in ((bank.requires_grad_(), got), (rows.clone().requires_grad_(), want)):
        if layout == "targets":
            loss = cb.bank_cross_entropy(a, b, targets, 0.3, normalize=True, reduction="none")
        else:
            loss = cb.info_nce(a, p, b, negative_indices=idx, temperature=0.3, reduction="none")
        out += [loss.detach(), *torch.autograd.grad(loss.sum(), (a, b))]
    for name, x, y in zip(("loss", "anchors' gradient", "bank gradient"), got, want):
        assert torch.equal(x, y), name


def test_indices_strides_past_2_31_elements():
    # int64 indices (B, K) whose second row lies 2^31 entries after the first, in a storage that is mostly never
    # touched (17 GB of address space, a few pages used): the kernel reads them in place through their strides
    # (forward and the bank's gradient), so i is0 + k is1 must be 64-bit. The same bits as contiguous indices.
    if not _backend.kernel_serves(torch.device("cpu")):
        pytest.skip("the compiled CPU kernel's indexing")
    g = torch.Generator().manual_seed(3)
    B, K, M, d, far = 2, 9, 5, 8, (1 << 31) + 3
    want_idx = torch.randint(0, M, (B, K), generator=g)
    idx = torch.empty(far + K, dtype=torch.int64).as_strided((B, K), (far, 1))
    idx.copy_(want_idx)
    bank = torch.randn(M, d, generator=g, requires_grad=True)
    a = torch.randn(B, d, generator=g, requires_grad=True)
    p = torch.randn(B, d, generator=g)
    got, want = [], []
    for ix, out in ((idx, got), (want_idx, want)):
        loss = cb.info_nce(a, p, bank, negative_indices=ix, reduction="none")
        out += [loss.detach(), *torch.autograd.grad(loss.sum(), (a, bank))]
    for name, x, y in zip(("loss", "anchors' gradient", "bank gradient"), got, want):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("mode", ["shared", "indexed"])
def test_bank_gradient_stays_tangent_with_many_hits_per_row(mode):
    # With normalize, the loss sees a bank row only through n_hat, so its gradient is orthogonal to n_hat. A row
    # hit 2^14 times (indexed) or by 2^16 anchors (shared) accumulates that many terms; forming n_hat . G from a
    # sum of w l kept apart from G left both sums' rounding in the radial part: 2.4e-3 of the gradient's norm
    # (indexed, K = 1e6) where torch's float32 autograd leaves 1.2e-6. Bound: 2e-5, ~170 float32 roundings.
    g = torch.Generator().manual_seed(0)
    B, M, d = (1, 64, 2) if mode == "indexed" else (2**16, 64, 2)
    idx = torch.randint(0, M, (B, 2**20), generator=g) if mode == "indexed" else None
    a = torch.randn(B, d, generator=g)
    p = a + 0.3 * torch.randn(B, d, generator=g)
    bank = torch.randn(M, d, generator=g, requires_grad=True)
    loss = cb.info_nce(a, p, bank, negative_indices=idx, temperature=0.01, reduction="sum")
    (grad,) = torch.autograd.grad(loss, bank)
    radial = (grad.double() * F.normalize(bank.detach().double(), dim=1)).sum(1).abs().max()
    assert radial <= 2e-5 * grad.double().norm(), (radial / grad.double().norm()).item()


@pytest.mark.parametrize("mode", ["shared", "in_batch"])
def test_row_whose_norm_overflows_gets_zero_gradient(mode):
    # A row of norm ~6e19: its float32 sum of squares overflows, so normalisation maps it to 0 (as F.normalize
    # does) and its gradient is 0, not NaN (0 / 0 in the Jacobian's factor before).
    g = torch.Generator().manual_seed(0)
    a, p, bank = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    big = p if mode == "in_batch" else bank
    with torch.no_grad():
        big[1] *= 3e19
    x = big.clone().requires_grad_(True)
    args = (a, x) if mode == "in_batch" else (a, p, x)
    loss = cb.info_nce(*args, temperature=0.1)
    (grad,) = torch.autograd.grad(loss, x)
    ref = big.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(info_nce_reference(*args[:-1], ref, temperature=0.1), ref)
    assert torch.isfinite(grad).all() and torch.equal(grad[1], torch.zeros(4))
    assert torch.equal(want[1], torch.zeros(4))
    assert_close_scaled(loss, info_nce_reference(*args[:-1], big, temperature=0.1), TOL[torch.float32], "loss")
    assert_close_scaled(grad, want, TOL[torch.float32], "gradient")


@pytest.mark.parametrize("mode", ["shared", "per_anchor", "indexed"])
def test_row_whose_raw_product_overflows(mode):
    # Per-anchor and indexed negatives scored a row as (s a_hat . n) / ||n||: the raw product overflowed float32 for
    # a row of entries 1e37 (its norm overflows too: F.normalize maps it to 0) and for a row of norm 1e19 at
    # T = 1e-20 (logits ~1e20, finite), and the loss was NaN; a shared bank scales its rows first and was right.
    g = torch.Generator().manual_seed(0)
    for entry, t in ((1e37, 0.01), (1e19, 1e-20)):
        a, p, bank = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g), torch.randn(3, 4, generator=g)
        bank[1] = torch.tensor([entry, entry if t > 1e-10 else 0.0, 0.0, 0.0])
        a[:, 0] += 3.0  # the anchors lean towards that row
        n, idx = bank, None
        if mode == "per_anchor":
            n = bank.expand(2, 3, 4).clone()
        elif mode == "indexed":
            # (no repeated index: at logits ~1e20 the references' lse rounds l + log 2 to l, weighing each copy of the
            # dominant row 1; the kernel counts an anchor's hits of a row once)
            idx = torch.tensor([[0, 1, 2], [2, 1, 0]])
        x, ax = n.clone().requires_grad_(True), a.clone().requires_grad_(True)
        loss = cb.info_nce(ax, p, x, negative_indices=idx, temperature=t, reduction="none")
        ga, gn = torch.autograd.grad(loss.sum(), [ax, x])
        # float64 from the same float32 inputs (the 1e37 row normalised as float32 torch does: to zero)
        n64 = n.double() if t < 1e-10 else F.normalize(n, dim=-1).double()
        ax64, x64 = a.double().requires_grad_(True), n64.clone().requires_grad_(True)
        want = info_nce_reference(ax64, p.double(), x64, negative_indices=idx, temperature=t, reduction="none",
                                  normalize=True)
        wa, = torch.autograd.grad(want.sum(), [ax64])
        assert torch.isfinite(loss).all() and torch.isfinite(ga).all() and torch.isfinite(gn).all(), (entry, loss)
        assert_close_scaled(loss, want, 1e-5, f"loss at entries {entry}")
        assert_close_scaled(ga, wa, 1e-4, f"anchors' gradient at entries {entry}")


def test_zero_vectors_follow_f_normalize():
    a, p, n, _ = make_inputs("shared", B=3, K=4, d=3, dtype=torch.float64)
    with torch.no_grad():
        a[0] = 0.0
        n[2] = 0.0
    _check_against_reference(a, p, n, None, torch.float64, temperature=0.5)


@pytest.mark.parametrize("mode", MODES)
def test_rows_below_the_norm_clamp_follow_f_normalize(mode):
    # 0 < ||x|| < 1e-12: F.normalize divides by 1e-12 and its gradient has no radial term (the norm is clamped).
    # Exact zero rows (test above) cannot tell a kernel that drops the clamp's rule from one that keeps it.
    a, p, n, idx = make_inputs(mode, B=5, K=7, d=4, dtype=torch.float64, seed=21)
    with torch.no_grad():
        for x, row in ((a, 1), (p, 3)):
            x[row] *= 3e-13 / x[row].norm()
        if mode == "per_anchor":
            n[2, 4] *= 3e-13 / n[2, 4].norm()
        elif n is not None:
            m = int(idx[0, 0]) if idx is not None else 2
            n[m] *= 3e-13 / n[m].norm()
    _check_against_reference(a, p, n, idx, torch.float64, temperature=0.5)


def test_thread_count_changes_only_rounding():
    a, p, n, _ = make_inputs("shared", B=40, K=5000, d=24, dtype=torch.float32, seed=9)
    old = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            loss, grads = _run(cb.info_nce, a, p, n, None, temperature=0.1, reduction="none")
            out.append((loss, grads))
    finally:
        torch.set_num_threads(old)
    assert_close_scaled(out[0][0], out[1][0], 1e-5, "loss")
    for x, y in zip(out[0][1], out[1][1]):
        assert_close_scaled(x, y, 1e-5, "grad")


def test_detached_bank_and_frozen_anchors():
    a, p, n, _ = make_inputs("shared", B=9, K=800, d=12, dtype=torch.float64, seed=11)
    ref_grads = torch.autograd.grad(info_nce_reference(a, p, n, temperature=0.2), [a, p, n])
    # A detached MoCo queue: only anchors and positives get gradients.
    loss = cb.info_nce(a, p, n.detach(), temperature=0.2)
    ga, gp = torch.autograd.grad(loss, [a, p])
    assert_close_scaled(ga, ref_grads[0], 1e-9, "grad a")
    assert_close_scaled(gp, ref_grads[1], 1e-9, "grad p")
    # Anchors that need no gradient: forward saves no anchor term; the bank gradient is still right.
    loss = cb.info_nce(a.detach(), p, n, temperature=0.2)
    gp, gn = torch.autograd.grad(loss, [p, n])
    assert_close_scaled(gn, ref_grads[2], 1e-9, "grad n")


def test_anchor_term_recomputed_when_forward_did_not_save_it():
    # Call the registered backward directly with an empty anchor term: it must recompute V itself.
    a, p, n, _ = make_inputs("shared", B=6, K=700, d=5, dtype=torch.float64, requires_grad=False)
    if not _backend.kernel_serves(a.device):
        pytest.skip("compiled extension not available")
    ops = torch.ops.contrastbound
    loss, lse, term = ops.info_nce_fwd(a, p, n, None, 3.0, True, True, True)
    _, _, empty = ops.info_nce_fwd(a, p, n, None, 3.0, True, True, False)
    assert empty.numel() == 0
    g = torch.ones(6, dtype=torch.float64)
    full = ops.info_nce_bwd(g, a, p, n, None, lse, term, 3.0, True, True, [True, True, True])
    recomputed = ops.info_nce_bwd(g, a, p, n, None, lse, empty, 3.0, True, True, [True, True, True])
    for x, y in zip(full, recomputed):
        assert_close_scaled(x, y, 1e-12, "grad")


def test_module_matches_function():
    a, p, n, _ = make_inputs("shared", B=5, K=30, d=6, dtype=torch.float64)
    module = cb.InfoNCE(temperature=0.3, normalize=False, reduction="sum")
    assert "temperature=0.3" in repr(module)
    assert torch.equal(module(a, p, n), cb.info_nce(a, p, n, temperature=0.3, normalize=False, reduction="sum"))


@pytest.mark.parametrize("form", ["NTXent", "SupCon", "SupCon without labels"])
@pytest.mark.parametrize("learn", [False, True])
def test_nt_xent_and_supcon_modules_match_their_functions(form, learn):
    # cb.NTXent / cb.SupCon: the function at the module's temperature, normalize and reduction, a schedule set on
    # the module, a learnable temperature's gradient (as log_temperature: d/d log t = t d/dt), state_dict, repr and
    # the refusals that name the module and its function
    g = torch.Generator().manual_seed(6)
    z1, z2 = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 2, 0, 3, 2])
    cls = getattr(cb, form.split()[0])
    if form == "NTXent":
        args, fn, default = (z1, z2), cb.nt_xent, 0.5
    else:
        args = (torch.stack([z1, z2], 1), None if "without" in form else y)
        fn, default = cb.supcon_loss, 0.1
    assert cls().temperature == default and cls(learn_temperature=learn).learn_temperature is learn
    module = cls(0.3, normalize=False, reduction="sum", learn_temperature=learn).double()
    assert "temperature=0.3" in repr(module) and "reduction='sum'" in repr(module)
    assert ("log_temperature" in module.state_dict()) is learn
    # (a learnable one: log(0.3) stored in float32 at construction, then made float64)
    t = (module.log_temperature.detach().exp() if learn else torch.tensor(0.3, dtype=torch.float64)).requires_grad_()
    want = fn(*args, t, normalize=False, reduction="sum")
    got = module(*args)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    if learn:
        got.backward()
        (gt,) = torch.autograd.grad(want, [t])
        torch.testing.assert_close(module.log_temperature.grad, t.detach() * gt, rtol=1e-10, atol=0)
    module.temperature = 0.7
    torch.testing.assert_close(module(*args), fn(*args, 0.7, normalize=False, reduction="sum"), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=f"{cls.__name__} reads temperature once.*contrastbound.{fn.__name__}"):
        cls(torch.nn.Parameter(torch.tensor(0.2)))
    with pytest.raises(ValueError, match="reduction"):
        cls(reduction="max")


@pytest.mark.parametrize("normalize", [False, True])
def test_bank_cross_entropy_matches_reference(normalize):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(23, 9, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1100, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 1100, (23,), generator=g)
    loss = cb.bank_cross_entropy(a, w, t, temperature=0.5, normalize=normalize)
    ref = bank_cross_entropy_reference(a, w, t, temperature=0.5, normalize=normalize)
    assert_close_scaled(loss, ref, 1e-10, "loss")
    for x, y in zip(torch.autograd.grad(loss, [a, w]), torch.autograd.grad(ref, [a, w])):
        assert_close_scaled(x, y, 1e-10, "grad")


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_bank_cross_entropy_targets_at_chunk_starts_with_several_threads(threads):
    # B = 8 anchors over C = 2048 classes: the kernel splits the bank into 4 chunks of one 512-row tile each (from
    # the sizes alone), run in parallel. A target row at a chunk's start (512, 1024, 1536) lies one past the end of
    # the chunk before it, whose capture of the target's logit must stop at col < tk: at col <= tk it took the next
    # anchor's first logit, and with threads the two chunks' writes raced (the loss 10.7 off in 50 calls at 2
    # threads; at 1 thread the later chunk always wrote last, so every other test passed). Targets next to the
    # boundaries too; against F.cross_entropy in float64, several calls (the race's outcome varies).
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 16, generator=g, dtype=torch.float64)
    bank = torch.randn(2048, 16, generator=g, dtype=torch.float64)
    t = torch.tensor([512, 1024, 1536, 511, 513, 1023, 2047, 0])
    want = F.cross_entropy(a @ bank.T, t, reduction="none")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for _ in range(10):
            got = cb.bank_cross_entropy(a, bank, t, reduction="none")
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("temperature,spread", [(0.05, 0.2), (0.02, 0.3)])
def test_confident_loss_float32(temperature, spread):
    # The loss of a dominant positive, softplus(lse_neg - l_0) from the negatives' state kept apart from the
    # positive: log of a total 1 + r (the positive inside the sum) keeps none of r's digits below float32's eps, so
    # a loss of ~6e-5 came out 2.8e-4 off (median relative; torch's F.cross_entropy: 5e-3) and one of ~1e-11 as 0
    # (torch too). Per-anchor, against float64 at the float32-rounded inputs.
    g = torch.Generator().manual_seed(1)
    a = F.normalize(torch.randn(256, 64, generator=g, dtype=torch.float64), dim=1)
    p = a + spread / 8 * torch.randn(256, 64, generator=g, dtype=torch.float64)
    n = torch.randn(1024, 64, generator=g, dtype=torch.float64)
    a, p, n = (x.float() for x in (a, p, n))
    got = cb.info_nce(a, p, n, temperature=temperature, reduction="none").double()
    # In float64 too, lse - l_0 would round lse (~50) to 7e-15, a quarter of the smallest losses here: softplus.
    an, pn, nn = (F.normalize(x.double(), dim=1) for x in (a, p, n))
    pos = (an * pn).sum(1) / temperature
    want = F.softplus(torch.logsumexp(an @ nn.T / temperature, 1) - pos)
    assert want.max() < 1e-3  # the regime meant: every anchor confident
    rel = (got - want).abs() / want
    assert rel.max() <= 1e-4, (rel.median().item(), rel.max().item())


def test_confident_positive_gradient_float32():
    # A confident positive (w0 -> 1): its gradient g s (w0 - 1) is formed as expm1(-loss) from forward's loss
    # (log(sum) where the positive is the largest logit), not as exp(l_0 - lse) - 1, which carries lse's rounding
    # (eps |lse|, |lse| ~ 20 at T = 0.05) into a difference of ~1e-4. Measured at the float32-rounded inputs against
    # float64: anchors / positives / temperature 6.8e-4 / 1.9e-3 / 1.2e-3 before (5x, 5x, 2x torch's float32
    # cross-entropy), 4e-5 / 1.1e-4 / 2.2e-5 with it, 2.3e-6 / 2.1e-6 / 5.8e-7 with the loss as softplus
    # (test_confident_loss_float32; torch: 1.3e-4 / 3.7e-4 / 5.6e-4).
    if not _backend.kernel_serves(torch.device("cpu")):
        pytest.skip("compiled extension not available")
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(64, 32, generator=g, dtype=torch.float64), dim=1)
    p = a + 0.05 * torch.randn(64, 32, generator=g, dtype=torch.float64)
    n = torch.randn(200, 32, generator=g, dtype=torch.float64)
    a, p, n = (x.float().double() for x in (a, p, n))

    def plain(a, p, n, t):
        a, p, n = (F.normalize(x, dim=-1) for x in (a, p, n))
        logits = torch.cat([(a * p).sum(-1, keepdim=True), a @ n.T], 1) / t
        return F.cross_entropy(logits, torch.zeros(len(a), dtype=torch.long), reduction="sum")

    def grads(fn, dtype):
        xs = [x.to(dtype).requires_grad_(True) for x in (a, p, n)]
        t = torch.tensor(0.05, dtype=dtype, requires_grad=True)
        return torch.autograd.grad(fn(*xs, t), [xs[0], xs[1], t])

    want = grads(plain, torch.float64)
    errors = {}
    for name, fn in (("fused", lambda a, p, n, t: cb.info_nce(a, p, n, temperature=t, reduction="sum")),
                     ("torch", plain)):
        errors[name] = [((x.double() - w).norm() / w.norm()).item() for x, w in zip(grads(fn, torch.float32), want)]
    for what, fused, torch_err in zip(("anchors", "positives", "temperature"), errors["fused"], errors["torch"]):
        assert fused <= torch_err, (what, fused, torch_err)


def _excluded_rows_reference(a, p, n, excluded, s, normalize):
    """The loss of the ops' `excluded` from materialised logits: bank row excluded[i] left out of anchor i's sum."""
    if normalize:
        a, p, n = (F.normalize(x, dim=-1) for x in (a, p, n))
    pos = (a * p).sum(-1) * s
    logits = (a @ n.T * s).masked_fill(torch.arange(n.shape[0])[None, :] == excluded[:, None], float("-inf"))
    return torch.logsumexp(torch.cat([pos[:, None], logits], 1), 1) - pos


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_op_excluded_rows_match_masked_reference(dtype, normalize):
    # The ops' `excluded` (bank_cross_entropy's target rows): bank row excluded[i] is left out of anchor i's sum;
    # -1 and rows past the bank leave none out; rows repeat (B > K + 3). Loss and gradients against float64 logits
    # with those entries masked, at the rounded inputs. B = 70 and K = 131 are multiples of no block or tile.
    if not _backend.kernel_serves(torch.device("cpu")):
        pytest.skip("compiled extension not available")
    g = torch.Generator().manual_seed(7)
    B, K, d, s = 140, 131, 9, 1 / 0.3
    excluded = (torch.arange(B) * 37 + 11) % (K + 3) - 1
    xs = [torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype) for shape in ((B, d), (B, d), (K, d))]
    up = torch.rand(B, generator=g, dtype=torch.float64)

    def reference(a, p, n):
        return _excluded_rows_reference(a, p, n, excluded, s, normalize)

    leaves = [x.detach().double().requires_grad_(True) for x in xs]
    want = reference(*leaves)
    want_grads = torch.autograd.grad(want, leaves, up)
    leaves = [x.detach().requires_grad_(True) for x in xs]
    loss, lse, _ = torch.ops.contrastbound.info_nce_fwd(*leaves, None, s, normalize, True, True, False, excluded)
    got_grads = torch.autograd.grad(loss, leaves, up.to(loss.dtype))
    assert_close_scaled(loss, want, TOL[dtype], "loss")
    assert_close_scaled(lse - loss, (leaves[0].double() * leaves[1].double()).sum(-1) * s if not normalize else
                        F.cosine_similarity(leaves[0].double(), leaves[1].double(), dim=-1, eps=1e-12) * s,
                        TOL[dtype], "lse - loss = the positive's logit")
    for name, got, ref in zip(("anchors", "positives", "bank"), got_grads, want_grads):
        assert_close_scaled(got, ref, TOL[dtype], name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_half_inputs_give_the_float32_kernels_results_rounded_once(mode, normalize, dtype):
    # The CPU kernel widens half tiles to float32 and computes in float32 (docs/LIMITS.md): the op on half inputs
    # gives exactly the float32 op's loss and lse on the widened inputs, and its gradients rounded once to the half
    # type. Sums of squares of half bank rows formed in the half type broke this by 1e-5 / 7e-5 relative in the
    # loss (float16 / bfloat16; a mutation audit), within the tolerance of the value tests. K = 600 spans two tiles.
    if not _backend.kernel_serves(torch.device("cpu")):
        pytest.skip("compiled extension not available")
    half = make_inputs(mode, B=16, K=600, d=64, dtype=dtype, seed=2)
    widened = [x.detach().float().requires_grad_() if x is not None else None for x in half[:3]]
    up = torch.linspace(0.1, 1.0, 16)
    scale = 10.0 if normalize else 0.25
    out = []
    for a, p, n in (half[:3], widened):
        # in-batch: the positives are the bank, each anchor's own positive left out of its sum (exclude_self); the
        # bank a separate leaf, whose gradient autograd would otherwise add to the positives' in the half type
        bank = p.detach().clone().requires_grad_() if n is None else n
        loss, lse, _ = torch.ops.contrastbound.info_nce_fwd(a, p, bank, half[3], scale, normalize, True, True,
                                                            n is None)
        leaves = (a, p, bank)
        out.append((loss, lse, torch.autograd.grad(loss, leaves, up)))
    (loss16, lse16, grads16), (loss32, lse32, grads32) = out
    assert torch.equal(loss16, loss32) and torch.equal(lse16, lse32)
    for name, g16, g32 in zip(("anchors", "positives", "bank"), grads16, grads32):
        assert g16.dtype == dtype and torch.equal(g16, g32.to(dtype)), name


@pytest.mark.parametrize("d,normalize", [(1, False), (6, False), (6, True)])
def test_op_positive_is_its_excluded_row_only_when_every_feature_is_equal(d, normalize):
    # The op takes the positive's logit from the bank tile where the positive equals its excluded row (compared
    # feature by feature). Half the positives here are their rows, half differ from them in the last feature only
    # (with d = 1, in their one feature): a comparison that stopped a feature short took the row's logit for those
    # (0.24 off; a mutation audit). Loss and gradients against masked float64 logits.
    if not _backend.kernel_serves(torch.device("cpu")):
        pytest.skip("compiled extension not available")
    g = torch.Generator().manual_seed(11)
    B, K, s = 10, 13, 1 / 0.2
    excluded = torch.arange(B) % K
    n = torch.randn(K, d, generator=g, dtype=torch.float64)
    a = torch.randn(B, d, generator=g, dtype=torch.float64)
    p = n[excluded].clone()
    p[1::2, -1] += 0.7
    up = torch.rand(B, generator=g, dtype=torch.float64)

    def reference(a, p, n):
        return _excluded_rows_reference(a, p, n, excluded, s, normalize)

    leaves = [x.clone().requires_grad_(True) for x in (a, p, n)]
    want = reference(*leaves)
    want_grads = torch.autograd.grad(want, leaves, up)
    leaves = [x.clone().requires_grad_(True) for x in (a, p, n)]
    loss, _, _ = torch.ops.contrastbound.info_nce_fwd(*leaves, None, s, normalize, True, True, False, excluded)
    got_grads = torch.autograd.grad(loss, leaves, up)
    assert_close_scaled(loss, want, TOL[torch.float64], "loss")
    for name, got, ref in zip(("anchors", "positives", "bank"), got_grads, want_grads):
        assert_close_scaled(got, ref, TOL[torch.float64], name)


@pytest.mark.parametrize("normalize,temperature", [(False, 1.0), (True, 0.05)])
def test_bank_cross_entropy_confident_float32(normalize, temperature):
    # A confident classifier (each anchor near its class row x3). The target's logit entered the bank's sum and was
    # subtracted again (computed another way), so the loss carried both roundings (-3.05e-5 at T = 1, logits
    # ~100) and a target row's gradient was the difference of a bank part and a positive part of size g s |a|:
    # bank gradient error 23 at T = 1 (torch's float32 cross-entropy: 0.71, itself at float32's resolution
    # there), anchors / bank 7.5e-4 / 1.8e-3 at T = 0.05 (torch 1.8e-4 / 2.0e-4). With the target row left out of
    # the sum (the op's excluded), the loss as softplus(lse_neg - l_t) and the positive's weight from it:
    # 1.1e-6 / 1.1e-6 and 1.5e-6 / 1.6e-6.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(100, 32, generator=g, dtype=torch.float64)
    t = torch.randint(0, 100, (64,), generator=g)
    x = (3 * w[t] + torch.randn(64, 32, generator=g, dtype=torch.float64)).float().double()
    w = w.float().double()

    def grads(fn, dtype):
        leaves = [x.to(dtype).requires_grad_(True), w.to(dtype).requires_grad_(True)]
        loss = fn(*leaves, t, temperature=temperature, normalize=normalize, reduction="none")
        return loss.detach(), torch.autograd.grad(loss.sum(), leaves)

    _, want = grads(bank_cross_entropy_reference, torch.float64)
    loss, got = grads(cb.bank_cross_entropy, torch.float32)
    _, plain = grads(bank_cross_entropy_reference, torch.float32)  # torch's float32 cross-entropy
    assert (loss >= 0).all(), loss.min()
    for name, a, b, r in zip(("anchors", "bank"), got, plain, want):
        err, err_torch = (((v.double() - r).norm() / r.norm()).item() for v in (a, b))
        assert err <= min(1.5 * err_torch, 1e-4), (name, err, err_torch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bank_cross_entropy_half_bank_target_rows_at_tiny_losses(dtype):
    # A half-precision bank's target rows get their gradient from float32 terms (_target_rows_gradient), the
    # anchor's own with the coefficient w - 1 = expm1(-loss). At a logit gap of 16 the loss is 2.3e-7, where
    # exp(-loss) - 1 in float32 is -2.4e-7 (float32's spacing below 1 is 6e-8): the target rows' gradient 6 % off
    # with it, 0.2 % (bfloat16's rounding) with expm1; every other test passed with exp - 1 (a mutation audit,
    # 2026-12-07). Against float64, gaps 8 to 16 (losses 7e-4 to 2.3e-7).
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [-1.0, 0.0]], dtype=dtype)
    targets = torch.tensor([0, 1])
    for gap in (8.0, 12.0, 16.0):
        a = torch.tensor([[gap, 0.0], [0.5, gap]], requires_grad=True)
        b = bank.clone().requires_grad_(True)
        cb.bank_cross_entropy(a, b, targets, reduction="sum").backward()
        b64 = bank.double().requires_grad_(True)
        bank_cross_entropy_reference(a.detach().double(), b64, targets, reduction="sum").backward()
        torch.testing.assert_close(b.grad[targets].double(), b64.grad[targets], rtol=1e-2, atol=0)


@pytest.mark.parametrize("call", ["shared", "in_batch", "info_nce_lse", "bank_cross_entropy"])
def test_per_anchor_loss_may_be_modified_in_place_before_backward(call):
    # reduction="none", then a per-anchor weight applied in place (as F.cross_entropy allows): the autograd backward
    # keeps its own copy of the loss it needs (saving the returned tensor made this raise "modified by an inplace
    # operation").
    g = torch.Generator().manual_seed(2)
    a = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.randn(6, 5, generator=g, dtype=torch.float64)
    n = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, 3, 8, 1, 2])
    w = torch.rand(6, generator=g, dtype=torch.float64)
    fused, ref = {
        "shared": (lambda: cb.info_nce(a, p, n, temperature=0.1, reduction="none"),
                   lambda: info_nce_reference(a, p, n, temperature=0.1, reduction="none")),
        "in_batch": (lambda: cb.info_nce(a, n[:6], temperature=0.1, reduction="none"),
                     lambda: info_nce_reference(a, n[:6], temperature=0.1, reduction="none")),
        "info_nce_lse": (lambda: cb.info_nce_lse(a, p, n, temperature=0.1)[0],
                         lambda: info_nce_reference(a, p, n, temperature=0.1, reduction="none")),
        "bank_cross_entropy": (lambda: cb.bank_cross_entropy(a, n, t, reduction="none"),
                               lambda: bank_cross_entropy_reference(a, n, t, reduction="none")),
    }[call]
    loss = fused()
    loss.mul_(w)
    got = torch.autograd.grad(loss.sum(), [a, n])
    want = torch.autograd.grad((ref() * w).sum(), [a, n])
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


def test_bank_cross_entropy_reference_path_counts_the_target_once(monkeypatch):
    # Without the kernels (no extension, forward-mode AD, torch.func) the materialised path also leaves the target
    # row out of the bank's sum: never negative, and the kernel's values.
    from contrastbound import _backend

    g = torch.Generator().manual_seed(0)
    w = torch.randn(100, 32, generator=g)
    t = torch.randint(0, 100, (64,), generator=g)
    x = 3 * w[t] + torch.randn(64, 32, generator=g)
    kernel = cb.bank_cross_entropy(x, w, t, reduction="none")
    monkeypatch.setattr(_backend, "kernel_serves", lambda device: False)
    fallback = cb.bank_cross_entropy(x, w, t, reduction="none")
    assert (fallback >= 0).all(), fallback.min()
    # (the materialised lse carries its own rounding, eps |lse| with logits ~100: ~1e-5 absolute)
    torch.testing.assert_close(fallback, kernel, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_bank_cross_entropy_target_rows_formula(monkeypatch, normalize):
    # The float32 recomputation of half-precision target rows (functional._target_rows_gradient), run in float64
    # against autograd through the reference: repeated targets, a zero row (F.normalize's clamped norm) among them,
    # and chunks of one row.
    from contrastbound.functional import _target_rows_gradient

    g = torch.Generator().manual_seed(5)
    a = torch.randn(9, 4, generator=g, dtype=torch.float64)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64)
    w[3] = 0.0
    t = torch.tensor([2, 3, 2, 0, 6, 2, 3, 3, 5])
    up = torch.rand(9, generator=g, dtype=torch.float64)
    ref_w = w.clone().requires_grad_(True)
    ref = bank_cross_entropy_reference(a, ref_w, t, temperature=0.3, normalize=normalize, reduction="none")
    (want,) = torch.autograd.grad(ref, ref_w, up)
    logits = (F.normalize(a, dim=1) @ F.normalize(w, dim=1).T if normalize else a @ w.T).div(0.3)
    lse = logits.logsumexp(1)
    loss = lse - logits[torch.arange(9), t]
    for budget in (1 << 22, 9):
        rows, got = _target_rows_gradient(a, w, t, lse, loss, up, 1 / 0.3, normalize, budget=budget)
        assert torch.equal(rows, torch.tensor([0, 2, 3, 5, 6]))
        assert_close_scaled(got, want[rows], 1e-12, "target rows")
    # The form taken on a GPU and in a graph: all B targets sorted, repeats with the first one's row, bit for bit.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    rows, got = _target_rows_gradient(a, w, t, lse, loss, up, 1 / 0.3, normalize, budget=4)
    assert torch.equal(rows, torch.sort(t).values)
    assert_close_scaled(got, want[rows], 1e-12, "target rows, static form")
    for r in rows.unique():
        same = got[rows == r]
        assert torch.equal(same, same[:1].expand_as(same))


@pytest.mark.parametrize("normalize", [False, True])
def test_bank_cross_entropy_confident_half_precision_bank_gradient(normalize):
    # A confident classifier (each anchor near its class row, T = 0.05 or 1 with rows x3): a target row's gradient
    # g s (w - 1) a_hat nearly vanishes. Formed as a bank part and a positive part, each rounded to bfloat16, it
    # was noise of size s |a|: 2.2 of the bank gradient's norm (normalize, T = 0.05; torch's bfloat16 autograd:
    # 0.54). Recomputed in float32 for the target rows: 1.7e-3 (about 4e-3 before the target was counted once), the
    # rounding of the result.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(100, 32, generator=g, dtype=torch.float64)
    t = torch.randint(0, 100, (64,), generator=g)
    x = 3 * w[t] + torch.randn(64, 32, generator=g, dtype=torch.float64)
    temperature = 0.05 if normalize else 1.0
    xb, wb = x.bfloat16().requires_grad_(True), w.bfloat16().requires_grad_(True)
    loss = cb.bank_cross_entropy(xb, wb, t, temperature=temperature, normalize=normalize, reduction="sum")
    (got,) = torch.autograd.grad(loss, wb)
    ref_w = wb.detach().double().requires_grad_(True)  # the float64 gradient at the rounded inputs
    ref = bank_cross_entropy_reference(xb.detach().double(), ref_w, t, temperature=temperature, normalize=normalize,
                                       reduction="sum")
    (want,) = torch.autograd.grad(ref, ref_w)
    # torch's float32 autograd on the same rounded inputs: at T = 1 with rows x3 the true gradient is ~1e-8 per
    # row, below float32's resolution of the logits (~1e2 eps): it is off by 0.81 itself there (the old path: 3e5).
    w32 = wb.detach().float().requires_grad_(True)
    ref32 = bank_cross_entropy_reference(xb.detach().float(), w32, t, temperature=temperature, normalize=normalize,
                                         reduction="sum")
    (want32,) = torch.autograd.grad(ref32, w32)
    err, err32 = (((x.double() - want).norm() / want.norm()).item() for x in (got, want32))
    assert err <= max(2e-2, 2 * err32), (err, err32)


def test_bank_cross_entropy_half_bank_target_rows_take_the_float64_lse():
    # A float16 bank's target rows are recomputed in float32 against the op's float64 lse, taken as hi + res in
    # float32: at logits ~1e5 (T = 1e-3, near-equal rows) dropping res leaves e^{l - lse} off by lse's float32
    # rounding (~1e-2 in l): the bank gradient was off by 356 where its largest entry is 3.2e4, 22 float16 ulps
    # (a mutation audit's survivor); with res, within one ulp (7.7 here).
    g = torch.Generator().manual_seed(19)
    v = torch.randn(1, 8, generator=g) * 4
    bank = (v + 0.002 * torch.randn(6, 8, generator=g)).half()
    anchors = (v + 0.002 * torch.randn(4, 8, generator=g)).half()
    targets = torch.tensor([0, 1, 2, 0])
    b = bank.clone().requires_grad_()
    cb.bank_cross_entropy(anchors, b, targets, 1e-3, reduction="sum").backward()
    b64 = bank.double().requires_grad_()
    bank_cross_entropy_reference(anchors.double(), b64, targets, temperature=1e-3, reduction="sum").backward()
    scale = b64.grad.abs().max().item()
    assert scale > 1e4  # (the case: large logits)
    assert (b.grad.double() - b64.grad).abs().max().item() <= torch.finfo(torch.float16).eps * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bank_cross_entropy_one_class_with_label_smoothing_is_exactly_zero(dtype):
    # One class: every loss is lse(l) - l = 0, and label smoothing's l_t - mean_c l_c is 0 too. Formed through the
    # target row and through the mean row, that term's gradient was their rounding, scaled by s / |w|: the bank's
    # gradient 512 in bfloat16 at T = 0.01 (a fuzz against F.cross_entropy, which gives 0).
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 2, generator=g).to(dtype).requires_grad_(True)
    w = (1e-3 * torch.randn(1, 2, generator=g)).to(dtype).requires_grad_(True)
    t = torch.zeros(64, dtype=torch.int64)
    loss = cb.bank_cross_entropy(a, w, t, 0.01, normalize=True, label_smoothing=0.1, reduction="sum")
    ga, gw = torch.autograd.grad(loss, [a, w])
    assert loss.item() == 0.0 and not ga.any() and not gw.any(), (loss, ga.abs().max(), gw)
    want = F.cross_entropy(a.detach().double() @ w.detach().double().T, t, label_smoothing=0.1)
    assert want.item() == 0.0


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.6])
def test_bank_cross_entropy_gradcheck_repeated_targets(normalize, learnable, smoothing):
    # Several anchors share a target row (its gradient sums their positive terms and its bank term); with label
    # smoothing the op's loss holds eps l_t, whose gradient the kernels form through L' (bank_rows_fwd)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([2, 2, 0, 6, 2])
    temp = torch.tensor(0.7, dtype=torch.float64, requires_grad=learnable)
    leaves = (a, w, temp) if learnable else (a, w)

    def f(*xs):
        return cb.bank_cross_entropy(xs[0], xs[1], t, temperature=xs[2] if learnable else 0.7,
                                     normalize=normalize, reduction="none", label_smoothing=smoothing)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("which", ["anchors", "bank"])
def test_bank_cross_entropy_gradient_of_one_input(which):
    g = torch.Generator().manual_seed(4)
    a = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=which == "anchors")
    w = torch.randn(300, 6, generator=g, dtype=torch.float64, requires_grad=which == "bank")
    t = torch.randint(0, 300, (9,), generator=g)
    leaf = a if which == "anchors" else w
    (got,) = torch.autograd.grad(cb.bank_cross_entropy(a, w, t, temperature=0.3), [leaf])
    (want,) = torch.autograd.grad(bank_cross_entropy_reference(a, w, t, temperature=0.3), [leaf])
    assert_close_scaled(got, want, 1e-10, f"grad of {which}")


def test_info_nce_lse_combines_disjoint_sets():
    a, p, n, idx = make_inputs("indexed", B=8, K=90, d=6, dtype=torch.float64, M=40)
    _, full = cb.info_nce_lse(a, p, n, negative_indices=idx, temperature=0.4)
    _, first = cb.info_nce_lse(a, p, n, negative_indices=idx[:, :50], temperature=0.4)
    _, rest = cb.info_nce_lse(a, p, n, negative_indices=idx[:, 50:], temperature=0.4, include_positive=False)
    assert_close_scaled(torch.logaddexp(first, rest), full, 1e-12, "lse")


def _cross_entropy_of_logits(a, w, targets, t, normalize, **kw):
    if normalize:
        a, w = F.normalize(a, dim=-1), F.normalize(w, dim=-1)
    return F.cross_entropy(a @ w.T / t, targets, **kw)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index,smoothing", [(-100, 0.0), (-100, 0.1), (3, 0.25), (None, 1.0)])
def test_bank_cross_entropy_ignore_index_and_label_smoothing(normalize, reduction, ignore_index, smoothing):
    # F.cross_entropy's ignore_index and label_smoothing (a first-use audit: missing, an LM-style vocabulary's
    # padding had to be cut out by hand): values and the gradients of anchors, bank and a learnable temperature
    g = torch.Generator().manual_seed(7)
    B, C, d = 13, 29, 6
    a = torch.randn(B, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, d, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, C, (B,), generator=g)
    targets[[2, 5, 11]] = -100 if ignore_index == -100 else 3
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    got = cb.bank_cross_entropy(a, w, targets, t, normalize=normalize, ignore_index=ignore_index, **kw)
    want = _cross_entropy_of_logits(a, w, targets, t, normalize, ignore_index=-100 if ignore_index is None
                                    else ignore_index, **kw)
    assert_close_scaled(got, want, 1e-12, "loss")
    up = torch.rand(got.shape, generator=g, dtype=torch.float64) + 0.5
    for name, x, y in zip("awt", torch.autograd.grad(got, (a, w, t), up), torch.autograd.grad(want, (a, w, t), up)):
        assert_close_scaled(x, y, 1e-12, f"grad {name}")
    ref = bank_cross_entropy_reference(a, w, targets, t, normalize=normalize, ignore_index=ignore_index, **kw)
    assert_close_scaled(ref, want, 1e-14, "reference")


@pytest.mark.parametrize("C", [1, 2, 3, 7])
@pytest.mark.parametrize("normalize", [False, True])
def test_bank_cross_entropy_label_smoothing_with_few_classes(C, normalize):
    # as F.cross_entropy for every C, two classes too (a mutation audit: the smoothing term skipped at C = 2, where
    # the loss was 0.16 off, passed every test; at C = 1 both are 0), padding rows included
    g = torch.Generator().manual_seed(C)
    a = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, C, (9,), generator=g)
    targets[[1, 6]] = -100
    for smoothing in (0.3, 1.0):
        got = cb.bank_cross_entropy(a, w, targets, 0.8, normalize=normalize, label_smoothing=smoothing)
        want = _cross_entropy_of_logits(a, w, targets, 0.8, normalize, label_smoothing=smoothing)
        assert_close_scaled(got, want, 1e-12, f"loss, C = {C}, eps = {smoothing}")
        for name, x, y in zip("aw", torch.autograd.grad(got, (a, w)), torch.autograd.grad(want, (a, w))):
            assert_close_scaled(x, y, 1e-12, f"grad {name}, C = {C}, eps = {smoothing}")


def test_bank_cross_entropy_leaves_ignored_rows_out_of_the_work():
    # (padding-heavy batches) in eager mode the ignored rows are not computed and dropped but left out: the op
    # counts the kept rows' products only (FlopCounterMode), with the masked form's values and gradients; under
    # torch.compile (static shapes) the rows are masked, the same numbers
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(21)
    a = torch.randn(40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (40,), generator=g)
    targets[::2] = -100  # half the rows padding
    with FlopCounterMode(display=False) as counter:
        loss = cb.bank_cross_entropy(a, w, targets, 0.5, label_smoothing=0.1)
    assert counter.get_total_flops() == 2 * 2 * 20 * 30 * 8  # the logits and V of the 20 kept rows
    want = bank_cross_entropy_reference(a, w, targets, 0.5, label_smoothing=0.1)
    assert_close_scaled(loss, want, 1e-12, "loss")
    grads = torch.autograd.grad(loss, (a, w))
    for name, x, y in zip(("anchors", "bank"), grads, torch.autograd.grad(want, (a, w))):
        assert_close_scaled(x, y, 1e-12, f"grad {name}")
    assert torch.count_nonzero(grads[0][::2]) == 0
    compiled = torch.compile(lambda a_, w_, t_: cb.bank_cross_entropy(a_, w_, t_, 0.5, label_smoothing=0.1),
                             backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    try:
        assert_close_scaled(compiled(a, w, targets), want, 1e-12, "compiled")
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bank_cross_entropy_label_smoothing_compiled_matches_eager(dtype):
    # The smoothing term's mean row and its in-place gradient (bank_rows_fwd) under torch.compile: traced with fake
    # tensors, where a half bank is widened at once rather than by chunks of rows; values and gradients as eager's
    g = torch.Generator().manual_seed(8)
    a0, w0 = torch.randn(12, 8, generator=g).to(dtype), torch.randn(37, 8, generator=g).to(dtype)
    targets = torch.randint(0, 37, (12,), generator=g)

    def run(fn):
        a, w = a0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(a, w, targets)
        return [loss, *torch.autograd.grad(loss, (a, w))]

    def f(a_, w_, t_):
        return cb.bank_cross_entropy(a_, w_, t_, 0.2, normalize=True, label_smoothing=0.3)

    torch._dynamo.reset()
    try:
        got = run(torch.compile(f, backend="aot_eager", fullgraph=True))
    finally:
        torch._dynamo.reset()
    for name, x, y in zip(("loss", "anchors", "bank"), got, run(f)):
        assert_close_scaled(x, y, 1e-6 if dtype == torch.float32 else 1e-2, name)


def test_bank_cross_entropy_ignored_rows_under_vmap():
    # (a mutation audit's survivor) under vmap the rows are masked, not selected by a read-back of their count
    g = torch.Generator().manual_seed(0)
    a, bank = torch.randn(3, 4, 8, generator=g), torch.randn(5, 8, generator=g)
    t = torch.tensor([[0, -100, 2, 1], [1, 2, -100, -100], [4, 3, 2, 1]])
    got = torch.func.vmap(lambda a_, t_: cb.bank_cross_entropy(a_, bank, t_, reduction="none"))(a, t)
    want = torch.stack([cb.bank_cross_entropy(a[i], bank, t[i], reduction="none") for i in range(3)])
    assert_close_scaled(got, want, 1e-6, "loss")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_under_a_fake_tensor_mode(dtype):
    # Shape and memory estimators run a step under FakeTensorMode (no values): bank_cross_entropy read its targets
    # back for their range check (DataDependentOutputException), with ignore_index twice more; now the checks are
    # ops there, as under torch.compile. Every loss gives its real shapes and dtypes, backward included.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.randn(6, 8, dtype=dtype, requires_grad=True)
        bank = torch.randn(11, 8, dtype=dtype, requires_grad=True)
        t, idx = torch.randint(0, 11, (6,)), torch.randint(0, 11, (6, 4))
        calls = {
            "bank_cross_entropy": lambda: cb.bank_cross_entropy(a, bank, t),
            "ignore_index": lambda: cb.bank_cross_entropy(a, bank, t, ignore_index=-100, reduction="none"),
            "smoothing": lambda: cb.bank_cross_entropy(a, bank, t, ignore_index=3, label_smoothing=0.1),
            "info_nce indexed": lambda: cb.info_nce(a, a, bank, negative_indices=idx),
            "info_nce labels": lambda: cb.info_nce(a, a, bank, labels=t, negative_labels=torch.randint(0, 3, (11,))),
            "supcon": lambda: cb.supcon_loss(a, t),
        }
        for name, call in calls.items():
            loss = call()
            assert loss.shape == ((6,) if name == "ignore_index" else ()) and loss.dtype == dtype, name
            ga, gb = torch.autograd.grad(loss.sum(), [a, bank], allow_unused=True)
            assert ga.shape == a.shape and (gb is None or gb.shape == bank.shape), name


def test_bank_cross_entropy_ignore_index_edge_cases():
    g = torch.Generator().manual_seed(8)
    a, w = torch.randn(4, 5, generator=g, requires_grad=True), torch.randn(9, 5, generator=g, requires_grad=True)
    every = torch.full((4,), -100)
    assert torch.isnan(cb.bank_cross_entropy(a, w, every))  # as F.cross_entropy: 0 / 0
    total = cb.bank_cross_entropy(a, w, every, reduction="sum", label_smoothing=0.3)
    assert total.item() == 0.0
    total.backward()
    assert torch.count_nonzero(a.grad) == 0 and torch.count_nonzero(w.grad) == 0
    with pytest.raises(IndexError, match="targets must lie in"):
        cb.bank_cross_entropy(a, w, every, ignore_index=None)  # no ignoring: -100 is out of range
    import numpy as np  # (a review's nit: F.cross_entropy takes a numpy integer)

    assert cb.bank_cross_entropy(a, w, torch.tensor([1, 2, 3, 4]), ignore_index=np.int64(2)).isfinite()
    with pytest.raises(IndexError, match="targets must lie in"):
        cb.bank_cross_entropy(a, w, torch.tensor([0, -1, 2, 3]))  # another negative is still refused
    with pytest.raises(TypeError, match="ignore_index must be an int or None, got float"):
        cb.bank_cross_entropy(a, w, every, ignore_index=-100.0)
    with pytest.raises(TypeError, match="label_smoothing must be a number"):
        cb.bank_cross_entropy(a, w, every, label_smoothing=True)
    with pytest.raises(ValueError, match="label_smoothing must lie in \\[0, 1\\], got 1.5"):
        cb.bank_cross_entropy(a, w, every, label_smoothing=1.5)
    with pytest.raises(ValueError, match="label_smoothing must be a number in \\[0, 1\\], got a value beyond"):
        cb.bank_cross_entropy(a, w, every, label_smoothing=10**400)  # (float() raised a bare OverflowError)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bank_cross_entropy_label_smoothing_half_and_float32(dtype):
    # the smoothing term in the accumulation dtype: within each dtype's tolerance of float64 from the same inputs
    g = torch.Generator().manual_seed(9)
    a64, w64 = torch.randn(33, 16, generator=g, dtype=torch.float64), torch.randn(301, 16, generator=g,
                                                                                     dtype=torch.float64)
    targets = torch.randint(0, 301, (33,), generator=g)
    targets[::4] = -100
    a, w = a64.to(dtype).requires_grad_(), w64.to(dtype).requires_grad_()
    got = cb.bank_cross_entropy(a, w, targets, 0.1, normalize=True, label_smoothing=0.2)
    want = _cross_entropy_of_logits(a.detach().double().requires_grad_(), w.detach().double(), targets, 0.1, True,
                                    label_smoothing=0.2)
    assert got.dtype == dtype
    assert_close_scaled(got.double(), want, TOL[dtype], "loss")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("learnable", [False, True])
def test_bank_cross_entropy_label_smoothing_with_degenerate_bank_rows(dtype, learnable):
    # The mean row and its gradient, which bank_rows_fwd forms itself (in place into the kernel's gradients, F.normalize's
    # Jacobian written out): rows of norm 0, below F.normalize's eps (gradient I / eps, no projection), 1e-3 and 1e15
    # (|b|^3 overflows float32), an anchor of norm 0 and one below eps; values and gradients against
    # F.cross_entropy over F.normalize's rows in float64 from the same inputs
    g = torch.Generator().manual_seed(11)
    w = torch.randn(23, 6, generator=g, dtype=torch.float64)
    w[3], w[5], w[7], w[8] = 0.0, w[5] * 1e-14, w[7] * 1e15, w[8] * 1e-3
    a = torch.randn(9, 6, generator=g, dtype=torch.float64)
    a[2], a[4] = 0.0, a[4] * 1e-14
    targets = torch.tensor([3, 5, 7, 8, 0, 1, 7, 22, 3])
    a, w = a.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    t = torch.tensor(0.3, dtype=dtype, requires_grad=True) if learnable else 0.3
    up = torch.rand(9, generator=g, dtype=torch.float64) + 0.5
    got = cb.bank_cross_entropy(a, w, targets, t, normalize=True, label_smoothing=0.4, reduction="none")
    leaves = (a, w, t) if learnable else (a, w)
    grads = torch.autograd.grad(got, leaves, up.to(dtype))
    ref = [x.detach().double().requires_grad_() for x in leaves]
    want = _cross_entropy_of_logits(ref[0], ref[1], targets, ref[2] if learnable else 0.3, True,
                                     label_smoothing=0.4, reduction="none")
    want_grads = torch.autograd.grad(want, ref, up)
    tol = TOL[dtype] * (10 if dtype == torch.float32 else 1)  # (float32: the 1e14-scaled rows' rounding)
    assert_close_scaled(got, want, tol, "loss")
    for name, x, y in zip("awt", grads, want_grads):
        assert_close_scaled(x, y, tol, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smoothing,temperature", [(0.9, 1.0), (1.0, 1.0), (1.0, 0.1)])
def test_bank_cross_entropy_strong_label_smoothing_half_gradients_beat_naive_half(dtype, smoothing, temperature):
    # A fuzz's case: with smoothing near 1 a target's gradient coefficient w_t - 1 + eps is small, and its two parts
    # (the op's w_t - 1 and the smoothing term's eps), each rounded to bfloat16 before they were added, left a
    # bfloat16 bank's target rows 0.47 off float64 (eps = 1, T = 1; naive bfloat16 F.cross_entropy 0.11). Here
    # every gradient part (the anchors, the target rows, the other rows), its relative error against float64 from
    # the same (rounded) inputs summed over 4 draws, is within 1.5x of naive half-precision F.cross_entropy's
    # (2026-12-06: the worst part of each case 0.13x to 0.46x naive's; before, 2.4x to 4.3x, the target rows' in
    # all six cases)
    B, C, d = 32, 100, 64
    errors = torch.zeros(2, 3, dtype=torch.float64)  # (fused, naive) x (anchors, target rows, other rows)
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        a0, w0 = torch.randn(B, d, generator=g).to(dtype), torch.randn(C, d, generator=g).to(dtype)
        targets = torch.randint(0, C, (B,), generator=g)
        hit = torch.zeros(C, dtype=torch.bool)
        hit[targets] = True

        def grads(fn, dt):
            a, w = a0.to(dt).requires_grad_(), w0.to(dt).requires_grad_()
            return [x.double() for x in torch.autograd.grad(fn(a, w), (a, w))]

        want = grads(lambda a, w: _cross_entropy_of_logits(a, w, targets, temperature, True,
                                                           label_smoothing=smoothing), torch.float64)
        got = (grads(lambda a, w: cb.bank_cross_entropy(a, w, targets, temperature, normalize=True,
                                                        label_smoothing=smoothing), dtype),
               grads(lambda a, w: _cross_entropy_of_logits(a, w, targets, temperature, True,
                                                           label_smoothing=smoothing), dtype))
        for k, (ga, gw) in enumerate(got):
            for j, (x, y) in enumerate(((ga, want[0]), (gw[hit], want[1][hit]), (gw[~hit], want[1][~hit]))):
                errors[k, j] += (x - y).norm() / y.norm()
    assert torch.all(errors[0] <= 1.5 * errors[1]), f"fused {errors[0].tolist()} vs naive {errors[1].tolist()}"


def test_info_nce_over_a_bank_in_parts_from_info_nce_lse():
    # README's recipe: the positive in one part's lse (include_positive=True), the other part's without it; then
    # loss_1 + softplus(lse_2 - lse_1) = logaddexp(lse_1, lse_2) - s a . p is info_nce over the whole bank (values
    # and gradients), an anchor without negatives in a part included (anchor 0 has none in part 2, anchor 1 none in
    # part 1). The recipe before (both parts without the positive, s a . p taken as lse - loss) was NaN for those:
    # -inf - (-inf) (a review's find).
    a, p, n, _ = make_inputs("shared", B=7, K=93, d=6, dtype=torch.float64)
    n.requires_grad_(True)
    mask = torch.ones(7, 93, dtype=torch.bool)
    mask[0, 40:] = False
    mask[1, :40] = False
    want = _run(cb.info_nce, a, p, n, None, temperature=0.3, reduction="none", negative_mask=mask)

    def in_parts(a_, p_, n_, negative_indices=None):
        loss1, lse1 = cb.info_nce_lse(a_, p_, n_[:40], temperature=0.3, negative_mask=mask[:, :40])
        _, lse2 = cb.info_nce_lse(a_, p_, n_[40:], temperature=0.3, negative_mask=mask[:, 40:],
                                  include_positive=False)
        return loss1 + F.softplus(lse2 - lse1)

    got = _run(in_parts, a, p, n, None)
    assert_close_scaled(got[0], want[0], 1e-12, "loss")
    for name, x, y in zip("apn", got[1], want[1]):
        assert torch.isfinite(x).all(), name
        assert_close_scaled(x, y, 1e-12, f"grad {name}")


def test_temperature_is_the_fourth_positional_argument():
    # as nt_xent(z1, z2, temperature) and clip_loss(image, text, logit_scale): info_nce(a, p, bank, 0.07) raised
    # TypeError (temperature was keyword-only); the indices stay keyword-only, and passed fourth they are named
    a, p, n, idx = make_inputs("indexed", B=5, K=11, d=4, dtype=torch.float64, M=9)
    w, t = n, torch.tensor([1, 0, 8, 3, 3])
    assert torch.equal(cb.info_nce(a, p, n, 0.3), cb.info_nce(a, p, n, temperature=0.3))
    assert torch.equal(cb.info_nce(a, p, None, 0.3), cb.info_nce(a, p, temperature=0.3))
    for x, y in zip(cb.info_nce_lse(a, p, n, 0.3), cb.info_nce_lse(a, p, n, temperature=0.3)):
        assert torch.equal(x, y)
    assert torch.equal(cb.bank_cross_entropy(a, w, t, 0.3), cb.bank_cross_entropy(a, w, t, temperature=0.3))
    assert torch.equal(info_nce_reference(a, p, n, 0.3), info_nce_reference(a, p, n, temperature=0.3))
    assert torch.equal(bank_cross_entropy_reference(a, w, t, 0.3),
                       bank_cross_entropy_reference(a, w, t, temperature=0.3))
    with pytest.raises(TypeError, match="temperature must be .* torch.int64 tensor of shape \\(5, 11\\).*"
                                        "negative_indices="):
        cb.info_nce(a, p, n, idx)
    with pytest.raises(TypeError, match="positional"):
        cb.info_nce(a, p, n, 0.3, idx)
    with pytest.raises(TypeError, match="negative_indices="):  # one anchor's (1-D) indices too (a review's nit)
        cb.info_nce(a[:1], p[:1], n, idx[0])


@pytest.mark.parametrize("mode", ["shared", "per_anchor", "indexed", "in_batch"])
def test_info_nce_lse_of_an_empty_set_is_minus_inf_with_grad(mode):
    # K = 0 (in-batch: B = 1) without the positive: the log-sum-exp of nothing, -inf as torch.logsumexp gives, also
    # when a gradient is recorded (it was NaN there: -inf - -inf), so logaddexp with another set leaves that set.
    B = 1 if mode == "in_batch" else 4
    a, p, n, idx = make_inputs(mode, B=B, K=0, d=3, dtype=torch.float64, M=5)
    _, empty = cb.info_nce_lse(a, p, n, negative_indices=idx, include_positive=False)
    assert torch.equal(empty, torch.full((B,), -math.inf, dtype=torch.float64))
    bank = torch.randn(6, 3, dtype=torch.float64)
    _, full = cb.info_nce_lse(a, p, bank)
    (got,) = torch.autograd.grad(torch.logaddexp(full, empty).sum(), a, retain_graph=True)
    (want,) = torch.autograd.grad(full.sum(), a)
    assert_close_scaled(got, want, 1e-12, "gradient")


def test_bank_gradient_over_many_anchor_blocks_keeps_float32_accuracy():
    """A bank row's gradient is a sum over B / 256 anchor blocks (2^12 here), each block's product added with Kahan's
    compensation: identical anchors make every block's term the same, where plain float32 additions drift together.
    2.0e-6 relative against float64 (1.9e-5 with the compensation removed: a mutation audit's survivor; naive
    float32 PyTorch, the reference, 5.9e-3: its product sums over the 2^20 anchors itself)."""
    if not _backend.kernel_serves(torch.device("cpu")):
        pytest.skip("the compiled CPU kernel's summation")
    B, d = 1 << 20, 2
    a = torch.tensor([[1.0, 0.3]]).expand(B, d)
    p = torch.tensor([[0.7, 0.2]]).expand(B, d)
    n = torch.tensor([[0.9, -0.1], [0.1, 0.8]])

    def bank_grad(dtype):
        bank = n.to(dtype).requires_grad_()
        cb.info_nce(a.to(dtype), p.to(dtype), bank, temperature=0.5, reduction="sum", normalize=False).backward()
        return bank.grad.double()

    want = bank_grad(torch.float64)
    err = float((bank_grad(torch.float32) - want).norm() / want.norm())
    assert err < 5e-6, err


def test_loss_without_the_positive_at_large_exact_logits_keeps_float32_accuracy():
    """include_positive=False: loss = lse - l_0 formed as (max - l_0) + log(sum), not (max + log(sum)) - l_0, which
    rounds max + log(sum) at |l| ~ 1e4 first (5.0e-3 relative; 4.5e-7 here; a mutation audit's survivor). Integer
    features: the logits 10109 and 10106 are exact in float32, so the error is the kernel's own."""
    a = torch.tensor([[3.0, 60.0, 70.0, 40.0]])
    n = torch.cat([a, a - torch.tensor([[1.0, 0.0, 0.0, 0.0]])])
    got, _ = cb.info_nce_lse(a, a, n, temperature=1.0, normalize=False, include_positive=False)
    want, _ = cb.info_nce_lse(a.double(), a.double(), n.double(), temperature=1.0, normalize=False,
                              include_positive=False)
    assert want.item() == pytest.approx(math.log1p(math.exp(-3.0)), rel=1e-12)  # log(e^0 + e^-3)
    assert abs(got.item() - want.item()) <= 1e-6 * want.item(), (got.item(), want.item())


@pytest.mark.parametrize("mode", ["in_batch", "bank_cross_entropy"])
def test_a_positive_that_is_a_bank_row_takes_its_logit_from_the_tile_product(mode):
    """Where the positive is the bank row left out of the sum (in-batch, bank_cross_entropy's target), its logit is
    the tile product's, as its near duplicates' are: the float32 loss equals the log-sum-exp of the product's own
    logits, (s a) p^T (one tile here), minus that entry, to float32 rounding of the loss. Formed apart (a dot product
    in prepare) it differed from theirs by ~eps |l|: with a near duplicate of the positive at logits ~1e4
    (normalize=False) the loss was up to 85x and the gradient 94x naive float32's error (24x / 61x now: what is
    left is the product's own rounding, which naive's a @ p^T happened to correlate)."""
    if not _backend.kernel_serves(torch.device("cpu")):
        pytest.skip("the compiled CPU kernel's tiles")
    g = torch.Generator().manual_seed(5)
    worst = 0.0
    for _ in range(40):
        a, p = near_duplicate_pairs(g)
        N = a.shape[0]
        logits = ((a * 10.0) @ p.T).double()  # the kernel's product: s a, then one GEMM (N <= 256: one tile)
        target = torch.arange(N)
        if mode == "in_batch":
            got = cb.info_nce(a, p, temperature=0.1, normalize=False, reduction="none")
        else:
            got = cb.bank_cross_entropy(a, p, target, temperature=0.1, normalize=False, reduction="none")
        want = torch.logsumexp(logits, 1) - logits[target, target]
        worst = max(worst, ((got.double() - want).abs() / want.abs().clamp_min(1e-3)).max().item())
    assert worst < 1e-6, worst


def test_info_nce_lse_of_an_empty_set_gives_a_learnable_temperature_no_gradient():
    # K = 0 without the positive: lse = -inf does not depend on the temperature, so d loss / d t = 0 (the empty
    # rows are masked in the exact temperature gradient; a mutation audit's find: unmasked it was 0.157, finite and
    # wrong, where torch.logsumexp over an empty set gives no gradient).
    a, p = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    loss, lse = cb.info_nce_lse(a, p, torch.empty(0, 8, dtype=torch.float64), temperature=t, include_positive=False)
    assert torch.equal(lse, torch.full((4,), -math.inf, dtype=torch.float64))
    (g,) = torch.autograd.grad(loss, t, grad_outputs=torch.ones_like(loss))
    assert g.item() == 0.0


def test_info_nce_lse_in_batch_with_mixed_dtypes():
    # In-batch with anchors and positives of different dtypes: both in the promoted dtype, the bank (the positives)
    # included (a mutation audit: the bank kept bfloat16 and the call raised "must share a dtype").
    g = torch.Generator().manual_seed(4)
    a, p = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g).to(torch.bfloat16)
    loss, lse = cb.info_nce_lse(a, p)
    want_loss, want_lse = cb.info_nce_lse(a, p.float())
    assert loss.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_losses_are_reduced_in_float32_then_rounded(dtype):
    # "sum" and "mean" reduce the float32 per-anchor losses and round once to the input dtype (rounding each loss
    # first, bfloat16 gave 2032 for a sum of 2038.3 (2040 rounded once); a mutation audit's find).
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 16, generator=g).repeat(1000, 1)
    p = torch.randn(1, 16, generator=g).repeat(1000, 1)
    n = torch.randn(8, 16, generator=g)
    args = (a.to(dtype), p.to(dtype), n.to(dtype))
    per_anchor = cb.info_nce_lse(*args, temperature=0.7)[0]
    assert per_anchor.dtype == torch.float32
    assert torch.equal(cb.info_nce(*args, temperature=0.7, reduction="sum"), per_anchor.sum().to(dtype))
    assert torch.equal(cb.info_nce(*args, temperature=0.7, reduction="mean"), per_anchor.mean().to(dtype))


def test_info_nce_lse_in_batch_without_the_positive():
    a, p, _, _ = make_inputs("in_batch", B=7, K=0, d=5, dtype=torch.float64, requires_grad=False)
    _, lse = cb.info_nce_lse(a, p, temperature=0.3, include_positive=False)
    logits = F.normalize(a, dim=1) @ F.normalize(p, dim=1).T / 0.3
    want = logits.masked_fill(torch.eye(7, dtype=torch.bool), -math.inf).logsumexp(1)  # j != i
    assert_close_scaled(lse, want, 1e-12, "lse over j != i")
    _, with_pos = cb.info_nce_lse(a, p, temperature=0.3)
    assert_close_scaled(with_pos, logits.logsumexp(1), 1e-12, "lse over all j")


# ----------------------------------------------------------------------------------------------------------
# Forward-mode AD (the ops have no forward formula: the reference serves such calls)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_forward_mode_ad_matches_reference(mode):
    a, p, n, idx = make_inputs(mode, B=5, K=40, d=4, dtype=torch.float64, M=30, requires_grad=False)
    g = torch.Generator().manual_seed(3)
    leaves = [x for x in (a, p, n) if x is not None]
    tangents = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in leaves]

    def loss_of(fn):
        def f(*xs):
            n_ = xs[2] if len(xs) == 3 else None
            return fn(xs[0], xs[1], n_, negative_indices=idx, temperature=0.3, reduction="none")

        return f

    _, got = torch.func.jvp(loss_of(cb.info_nce), tuple(leaves), tuple(tangents))
    _, want = torch.func.jvp(loss_of(info_nce_reference), tuple(leaves), tuple(tangents))
    assert got.abs().max() > 0.1  # a dropped tangent gave 0
    assert_close_scaled(got, want, 1e-10, "jvp")
    with fwAD.dual_level():
        dual = fwAD.make_dual(a, tangents[0])
        out = cb.info_nce(dual, p, n, negative_indices=idx, temperature=0.3, reduction="sum")
        tangent = fwAD.unpack_dual(out).tangent
    _, want_a = torch.func.jvp(lambda x: info_nce_reference(x, p, n, negative_indices=idx, temperature=0.3,
                                                            reduction="sum"), (a,), (tangents[0],))
    assert tangent is not None
    assert_close_scaled(tangent, want_a, 1e-10, "forward_ad")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("include_positive", [True, False])
def test_forward_mode_ad_of_info_nce_lse(mode, include_positive):
    # lse lost its tangent (0 under torch.func.jvp / jacfwd, None under forward_ad) while loss kept it
    a, p, n, idx = make_inputs(mode, B=5, K=40, d=4, dtype=torch.float64, M=30, requires_grad=False)
    g = torch.Generator().manual_seed(5)
    v = torch.randn(a.shape, generator=g, dtype=torch.float64)

    def lse_of(fn):
        return lambda x: fn(x, p, n, negative_indices=idx, temperature=0.3, include_positive=include_positive)[1]

    def lse_ref(x):  # the documented definition, with the logits materialised
        ah, ph = F.normalize(x, dim=-1), F.normalize(p, dim=-1)
        if n is None:
            logits = ah @ ph.T / 0.3
            logits = logits.masked_fill(torch.eye(len(x), dtype=torch.bool), float("-inf"))
        elif idx is not None:
            logits = (ah[:, None, :] * F.normalize(n, dim=-1)[idx]).sum(-1) / 0.3
        elif n.dim() == 3:
            logits = (ah[:, None, :] * F.normalize(n, dim=-1)).sum(-1) / 0.3
        else:
            logits = ah @ F.normalize(n, dim=-1).T / 0.3
        if include_positive:
            logits = torch.cat([(ah * ph).sum(-1, keepdim=True) / 0.3, logits], 1)
        return torch.logsumexp(logits, 1)

    value, got = torch.func.jvp(lse_of(cb.info_nce_lse), (a,), (v,))
    want_value, want = torch.func.jvp(lse_ref, (a,), (v,))
    assert want.abs().max() > 0.1
    assert_close_scaled(value, want_value, 1e-10, "lse")
    assert_close_scaled(got, want, 1e-10, "jvp of lse")
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(lse_of(cb.info_nce_lse)(fwAD.make_dual(a, v))).tangent
    assert tangent is not None
    assert_close_scaled(tangent, want, 1e-10, "forward_ad of lse")


def test_forward_mode_ad_temperature_and_bank_cross_entropy():
    a, p, n, _ = make_inputs("shared", B=6, K=30, d=4, dtype=torch.float64, requires_grad=False)
    t = torch.tensor(0.3, dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)
    _, got = torch.func.jvp(lambda x: cb.info_nce(a, p, n, temperature=x), (t,), (one,))
    _, want = torch.func.jvp(lambda x: info_nce_reference(a, p, n, temperature=x), (t,), (one,))
    assert abs(float(got)) > 0.1
    assert_close_scaled(got, want, 1e-10, "d loss / d temperature")
    targets = torch.tensor([0, 3, 3, 29, 7, 1])
    v = torch.randn(n.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, got = torch.func.jvp(lambda w: cb.bank_cross_entropy(a, w, targets, temperature=0.3), (n,), (v,))
    _, want = torch.func.jvp(lambda w: bank_cross_entropy_reference(a, w, targets, temperature=0.3), (n,), (v,))
    assert abs(float(got)) > 1e-3
    assert_close_scaled(got, want, 1e-10, "bank cross-entropy jvp")


# ----------------------------------------------------------------------------------------------------------
# torch.func transforms that differentiate (torch.library refuses them for ops defined in C++: the reference serves)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_torch_func_grad_vjp_jacrev_match_autograd(mode):
    a, p, n, idx = make_inputs(mode, B=5, K=40, d=4, dtype=torch.float64, M=30, requires_grad=False)

    def loss(x, reduction="mean"):
        return cb.info_nce(x, p, n, negative_indices=idx, temperature=0.3, reduction=reduction)

    x = a.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(loss(x), x)  # the compiled ops' backward
    assert want.abs().max() > 1e-2
    assert_close_scaled(torch.func.grad(loss)(a), want, 1e-12, "torch.func.grad")
    value, vjp_fn = torch.func.vjp(loss, a)
    assert_close_scaled(value, loss(a), 1e-12, "torch.func.vjp value")
    assert_close_scaled(vjp_fn(torch.ones((), dtype=torch.float64))[0], want, 1e-12, "torch.func.vjp")
    assert_close_scaled(torch.func.jacrev(loss)(a), want, 1e-12, "torch.func.jacrev")
    if mode == "in_batch":
        return
    # per-sample gradients (vmap over grad): loss_i depends on a_i alone, so they are the rows of the summed loss's
    # gradient
    (want_rows,) = torch.autograd.grad(loss(x, "sum"), x)
    batched = [p] + ([n] if mode == "per_anchor" else []) + ([idx] if mode == "indexed" else [])

    def loss_i(row, p_i, *rest):
        n_i = rest[0][None] if mode == "per_anchor" else n
        idx_i = rest[0][None] if mode == "indexed" else None
        return cb.info_nce(row[None], p_i[None], n_i, negative_indices=idx_i, temperature=0.3)

    rows = torch.func.vmap(torch.func.grad(loss_i))(a, *batched)
    assert_close_scaled(rows, want_rows, 1e-12, "per-sample gradients")


_OTHER_LOSSES = {
    "nt_xent": lambda a, b, _: cb.nt_xent(a, b, 0.3),
    "clip_loss": lambda a, b, _: cb.clip_loss(a, b, torch.tensor(4.0, dtype=torch.float64)),
    "supcon_loss": lambda a, b, _: cb.supcon_loss(torch.stack([a, b], 1), torch.tensor([0, 1, 0, 2, 1, 0]), 0.3),
    "debiased_info_nce": lambda a, b, bank: cb.debiased_info_nce(a, b, bank, temperature=0.3, tau_plus=0.1),
    "debiased_info_nce in-batch": lambda a, b, _: cb.debiased_info_nce(a, b, temperature=0.3, tau_plus=0.1),
    "siglip_loss": lambda a, b, _: cb.siglip_loss(a, b, torch.tensor(3.0, dtype=torch.float64),
                                                  torch.tensor(-2.0, dtype=torch.float64)),
}


@pytest.mark.parametrize("name", list(_OTHER_LOSSES))
def test_torch_func_grad_and_jvp_of_the_other_losses_match_autograd(name):
    # The losses built on info_nce's core take the reference under a differentiating torch.func transform and
    # forward-mode AD (as info_nce above), where the lse they combine carries its own derivatives: nt_xent added
    # its pair side's lse undetached to that lse's gradient (counted twice) and its torch.func.grad was off by
    # 0.095 (0.29 at most), its jvp by 0.26, with autograd on the kernels right; no test ran these losses under a
    # transform (a mutation audit, 2026-12-07).
    g = torch.Generator().manual_seed(4)
    x, y, u, v = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(4))
    bank = torch.randn(9, 5, generator=g, dtype=torch.float64)

    def loss(a, b):
        return _OTHER_LOSSES[name](a, b, bank)

    a, b = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    want = torch.autograd.grad(loss(a, b), (a, b))  # the kernels' backward
    assert min(w.abs().max() for w in want) > 1e-2
    for got, w, what in zip(torch.func.grad(loss, argnums=(0, 1))(x, y), want, ("a", "b")):
        assert_close_scaled(got, w, 1e-12, f"torch.func.grad in {what}")
    _, tangent = torch.func.jvp(loss, (x, y), (u, v))
    assert_close_scaled(tangent, (want[0] * u).sum() + (want[1] * v).sum(), 1e-12, "torch.func.jvp")


def test_vmap_of_bank_cross_entropy_and_learnable_temperature():
    # Their Python autograd.Functions have no setup_context, which vmap requires: the reference serves there.
    a, p, n, _ = make_inputs("shared", B=4, K=6, d=3, dtype=torch.float64, requires_grad=False)
    targets = torch.tensor([0, 1, 2, 5])
    got = torch.func.vmap(lambda r, t: cb.bank_cross_entropy(r[None], n, t[None]))(a, targets)
    want = torch.stack([cb.bank_cross_entropy(a[i : i + 1], n, targets[i : i + 1]) for i in range(4)])
    assert_close_scaled(got, want, 1e-12, "vmap of bank_cross_entropy")
    temp = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    got = torch.func.vmap(lambda r, q: cb.info_nce(r[None], q[None], n, temperature=temp))(a, p)
    want = torch.stack([cb.info_nce(a[i : i + 1], p[i : i + 1], n, temperature=temp) for i in range(4)])
    assert_close_scaled(got, want, 1e-12, "vmap with a learnable temperature")
    (g_got,) = torch.autograd.grad(got.sum(), temp)
    (g_want,) = torch.autograd.grad(want.sum(), temp)
    assert_close_scaled(g_got, g_want, 1e-10, "its temperature gradient")


def _clustered_float64(seed: int, N: int = 16, d: int = 32):
    """Two tight clusters of float64 rows, labels by cluster, and second views near the first: at T = 0.02 the
    temperature's gradient is a sum of parts of ~1e3 (log-sum-exps against positive logits) that nearly cancel."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N) % 2
    z1 = torch.randn(2, d, generator=g, dtype=torch.float64)[labels] + 0.1 * torch.randn(N, d, generator=g,
                                                                                        dtype=torch.float64)
    z2 = z1 + 0.05 * torch.randn(N, d, generator=g, dtype=torch.float64)
    return z1, z2, labels


def _assert_rounded_once(fn, value: float, dtype: torch.dtype, floor: float):
    """fn(x) for x a scalar tensor of `value` in `dtype` needing grad, and for its float64 widening (the same value:
    every narrower float is a float64): x's gradient must be the float64 one rounded once to dtype (within dtype's
    eps, relative), not the sum of parts each rounded to it. floor: the least |gradient| that is a gradient, not
    rounding noise, in that case. Returns the two losses (narrow, wide)."""
    x = torch.tensor(value, dtype=dtype, requires_grad=True)
    wide = x.detach().double().requires_grad_()
    got, want = fn(x), fn(wide)
    got.backward()
    want.backward()
    exact = wide.grad.item()  # float64 throughout (against the reference in the losses' own tests)
    assert x.grad.dtype == dtype and abs(exact) > floor, (x.grad.dtype, exact)
    assert abs(x.grad.item() - exact) <= torch.finfo(dtype).eps * abs(exact), (x.grad.item(), exact)
    return got, want


_NARROW_TEMPERATURE_LOSSES = {
    "supcon": lambda z1, z2, y, t: cb.supcon_loss(z1, y, t),
    "supcon_bank": lambda z1, z2, y, t: cb.supcon_loss(z1, y, t, bank=z2, bank_labels=y),
    "nt_xent": lambda z1, z2, y, t: cb.nt_xent(z1, z2, t),
    "debiased": lambda z1, z2, y, t: cb.debiased_info_nce(z1, z2, None, t, tau_plus=0.1, beta=0.5),
    "debiased_bank": lambda z1, z2, y, t: cb.debiased_info_nce(z1, z2, z2.flip(0), t, tau_plus=0.1, beta=0.5),
}


@pytest.mark.parametrize("t_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", sorted(_NARROW_TEMPERATURE_LOSSES))
def test_float64_features_with_a_narrower_temperature_round_once(loss, t_dtype):
    """float64 features, a float32 / half temperature tensor: the loss is the float64 one at that temperature's
    value (widened exactly), and the temperature's gradient the float64 gradient rounded once to its dtype. The parts
    of the gradient (each use of t) were rounded to the temperature's dtype on their own and then added: supcon's
    was off by 2e-4 relative, nt_xent's by 1.5e-6, and debiased_info_nce's loss by 3e-8 (t / (1 + beta) formed in
    float32); a fuzz's finds."""
    fn = _NARROW_TEMPERATURE_LOSSES[loss]
    z1, z2, y = _clustered_float64(0)
    got, want = _assert_rounded_once(lambda t: fn(z1, z2, y, t), 0.02, t_dtype, floor=0.1)
    assert got.dtype == torch.float64
    assert abs(got.item() - want.item()) <= 1e-13 * abs(want.item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", ["supcon", "nt_xent", "debiased"])
def test_half_features_with_a_half_temperature_compute_in_float32(loss, dtype):
    """Half features and a temperature of the same half dtype: computed in float32 (the temperature widened to it),
    so the loss and the temperature's gradient are the float32 computation's on the same values, each rounded once
    to the half dtype. Kept in half, the gradient's parts (~1e3, cancelling to ~0.2 at T = 0.02) were rounded each:
    supcon's d loss / d t came out 0 where it is -0.245 (float16), debiased's 32 where it is 20 (bfloat16) (a
    mutation audit: no test had half features with a half temperature, the float32 floor of _widened untested)."""
    fn = _NARROW_TEMPERATURE_LOSSES[loss]
    z1, z2, y = (x.to(dtype) if x.is_floating_point() else x for x in _clustered_float64(0))
    t = torch.tensor(0.02, dtype=dtype, requires_grad=True)
    t32 = t.detach().float().requires_grad_()
    got, want = fn(z1, z2, y, t), fn(z1.float(), z2.float(), y, t32)
    got.backward()
    want.backward()
    eps = torch.finfo(dtype).eps
    assert t.grad.dtype == dtype and abs(t32.grad.item()) > 0.1, t32.grad  # (a gradient, not rounding noise)
    assert abs(got.item() - want.item()) <= 2 * eps * abs(want.item()), (got.item(), want.item())
    assert abs(t.grad.item() - t32.grad.item()) <= 2 * eps * abs(t32.grad.item()), (t.grad.item(), t32.grad.item())


@pytest.mark.parametrize("t_dtype", [torch.float32, torch.bfloat16])
def test_bank_cross_entropy_smoothing_with_a_narrower_temperature_rounds_once(t_dtype):
    """bank_cross_entropy with label smoothing uses t twice (the kernel's loss and the smoothing term): with float64
    features and a float32 temperature the two parts of d loss / d t, which nearly cancel at eps = 0.9, T = 1, were
    rounded to float32 each (4.3e-6 relative off, 36 times float32's eps); now their sum is rounded once."""
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 16, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 50, (64,), generator=g)
    anchors = bank[targets] + 0.3 * torch.randn(64, 16, generator=g, dtype=torch.float64)
    # (the gradient: 8.1e-3 here, its two parts +-0.85)
    _assert_rounded_once(lambda t: cb.bank_cross_entropy(anchors, bank, targets, t, normalize=True,
                                                         label_smoothing=0.9), 1.0, t_dtype, floor=1e-3)


_NARROW_SCALAR_CASES = {
    # (loss of (z1, z2, bank, x), the scalar's value): lse's gradient in t is the kernel loss's plus the positive
    # logit's, siglip's bias and scale feed the op and the positives' logits
    "info_nce_lse lse, T = 2": (lambda z1, z2, bank, x: cb.info_nce_lse(z1, z2, bank, temperature=x)[1].sum(), 2.0),
    "info_nce_lse lse, T = 5": (lambda z1, z2, bank, x: cb.info_nce_lse(z1, z2, bank, temperature=x)[1].sum(), 5.0),
    # at the bias where the two parts of d loss / d b balance (None: found below)
    "siglip bias": (lambda z1, z2, bank, x: cb.siglip_loss(z1, z2, 10.0, x), None),
}


def _balancing_bias(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """The float32 bias nearest to the root of d siglip_loss / d b (float64, by bisection): there the negatives'
    part sum_j sigmoid(l_ij) and the positives' -sigmoid(-l_ii) cancel. -20 and 20 bracket it (every sigmoid near 0
    or 1 there)."""
    def slope(b: float) -> float:
        x = torch.tensor(b, dtype=torch.float64, requires_grad=True)
        cb.siglip_loss(z1, z2, 10.0, x).backward()
        return x.grad.item()
    lo, hi = -20.0, 20.0
    assert slope(lo) < 0 < slope(hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
    return float(torch.tensor(lo, dtype=torch.float32))


@pytest.mark.parametrize("case", sorted(_NARROW_SCALAR_CASES))
def test_float64_features_with_a_float32_scalar_used_twice_round_once(case):
    """As test_float64_features_with_a_narrower_temperature_round_once, for info_nce_lse's lse (the kernel's loss
    plus the positive logit) and siglip_loss's bias (the op and the positives' logits; its scale takes the same
    path): their gradients' parts were rounded to float32 each (lse at T = 5: 23 eps off; siglip's bias near the
    balance of its two parts: 925 eps; a review's finds)."""
    fn, value = _NARROW_SCALAR_CASES[case]
    z1, z2, _ = _clustered_float64(0)
    value = _balancing_bias(z1, z2) if value is None else value
    bank = torch.randn(40, z1.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _assert_rounded_once(lambda x: fn(z1, z2, bank, x), value, torch.float32, floor=1e-7)


_HALF_SCALAR_LOSSES = {
    # (loss of (z1, z2, y, x), x's value): every loss that uses its temperature (or scale / bias) more than once
    "supcon": (lambda z1, z2, y, x: cb.supcon_loss(z1, y, x), 0.07),
    "nt_xent": (lambda z1, z2, y, x: cb.nt_xent(z1, z2, x), 0.07),
    "debiased": (lambda z1, z2, y, x: cb.debiased_info_nce(z1, z2, None, x, tau_plus=0.1, beta=0.5), 0.07),
    "info_nce_lse lse": (lambda z1, z2, y, x: cb.info_nce_lse(z1, z2, z2.flip(0), temperature=x)[1].sum(), 0.5),
    "bank_cross_entropy smoothing": (lambda z1, z2, y, x: cb.bank_cross_entropy(z1, z2[:7], y, x, normalize=True,
                                                                                label_smoothing=0.9), 1.0),
    "siglip scale": (lambda z1, z2, y, x: cb.siglip_loss(z1, z2, x, -5.0), 10.0),
    "siglip bias": (lambda z1, z2, y, x: cb.siglip_loss(z1, z2, 10.0, x), -5.0),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(_HALF_SCALAR_LOSSES))
def test_half_features_with_a_half_scalar_round_its_gradient_once(case, dtype):
    """_widened's half-precision rule: a half temperature (scale, bias) with half features is widened to float32,
    so that its gradient's parts are summed in float32 and rounded to its dtype once. A float32 scalar of the same
    value runs the same float32 computation, so the half one's gradient is exactly the float32 one's, rounded (a
    mutation audit: without the float32 floor the parts were summed in bfloat16, off on 5 seeds of 20)."""
    fn, value = _HALF_SCALAR_LOSSES[case]
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        z1 = torch.randn(48, 16, generator=g).to(dtype)
        z2 = (z1.float() + 0.3 * torch.randn(48, 16, generator=g)).to(dtype)
        y = torch.randint(0, 7, (48,), generator=g)
        x = torch.tensor(value, dtype=dtype, requires_grad=True)
        x32 = x.detach().float().requires_grad_()  # (the same value)
        fn(z1, z2, y, x).backward()
        fn(z1, z2, y, x32).backward()
        assert x.grad.dtype == dtype and torch.isfinite(x32.grad) and x32.grad != 0
        assert torch.equal(x.grad, x32.grad.to(dtype)), (seed, x.grad.item(), x32.grad.item())


@pytest.mark.parametrize("fn,defaults", [
    # the defaults the docstrings and README give (a mutation audit: nt_xent's 0.5 and siglip_loss's -10 could change
    # unnoticed): a call without them is the call with them
    (lambda z1, z2, **kw: cb.info_nce(z1, z2, z2.flip(0), **kw), dict(temperature=0.1, normalize=True)),
    (lambda z1, z2, **kw: cb.nt_xent(z1, z2, **kw), dict(temperature=0.5, normalize=True)),
    (lambda z1, z2, **kw: cb.supcon_loss(z1, torch.arange(12) % 3, **kw), dict(temperature=0.1, normalize=True)),
    (lambda z1, z2, **kw: cb.debiased_info_nce(z1, z2, **kw), dict(temperature=0.1, tau_plus=0.1, beta=0.0)),
    (lambda z1, z2, **kw: cb.siglip_loss(z1, z2, **kw), dict(logit_scale=10.0, logit_bias=-10.0, normalize=True)),
    (lambda z1, z2, **kw: cb.clip_loss(z1, z2, 50.0, **kw), dict(max_logit_scale=100.0, normalize=True)),
    (lambda z1, z2, **kw: cb.bank_cross_entropy(z1, z2[:5], torch.arange(12) % 5, **kw),
     dict(temperature=1.0, normalize=False, ignore_index=-100, label_smoothing=0.0)),
], ids=["info_nce", "nt_xent", "supcon_loss", "debiased_info_nce", "siglip_loss", "clip_loss", "bank_cross_entropy"])
def test_documented_defaults(fn, defaults):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(12, 8, generator=g, dtype=torch.float64), torch.randn(12, 8, generator=g, dtype=torch.float64)
    z2[:, 0] += 3.0  # (not normalised: normalize's default shows)
    assert torch.equal(fn(z1, z2), fn(z1, z2, **defaults))
    others = dict(ignore_index=0, label_smoothing=0.4, max_logit_scale=20.0)  # (targets of class 0 then ignored)
    for key, value in defaults.items():  # and each one matters here (another value changes the loss)
        other = others.get(key, not value if isinstance(value, bool) else 2 * value + 0.3)
        assert not torch.equal(fn(z1, z2), fn(z1, z2, **{**defaults, key: other})), key


def test_vmap_over_a_per_sample_temperature():
    # A temperature batched by vmap (one per sample) was read with .item() for its check, which vmap refuses
    # (RuntimeError); the batch underneath is checked instead, and a bad value is named.
    a, p, n, _ = make_inputs("shared", B=4, K=6, d=3, dtype=torch.float64, requires_grad=False)
    temps = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    per_sample = torch.func.vmap(lambda r, q, t: cb.info_nce(r[None], q[None], n, temperature=t))
    want = torch.stack([cb.info_nce(a[i : i + 1], p[i : i + 1], n, temperature=float(temps[i])) for i in range(4)])
    assert_close_scaled(per_sample(a, p, temps), want, 1e-12, "vmap over temperatures")
    rows = torch.func.vmap(torch.func.grad(lambda r, q, t: cb.info_nce(r[None], q[None], n, temperature=t)))(a, p, temps)
    want_rows = torch.stack([
        torch.func.grad(lambda r: cb.info_nce(r[None], p[i : i + 1], n, temperature=float(temps[i])))(a[i])
        for i in range(4)
    ])
    assert_close_scaled(rows, want_rows, 1e-12, "per-sample gradients over temperatures")
    with pytest.raises(ValueError, match="temperature must be a positive finite number, got -1"):
        per_sample(a, p, torch.tensor([0.1, -1.0, 0.3, 0.4], dtype=torch.float64))
    # Learnable: batched by vmap it reports requires_grad=False; on the kernels its gradient was lost (0, or
    # nt_xent's -0.98 for -108). Every loss against a per-sample loop.
    z = torch.randn(4, 3, 3, dtype=torch.float64)  # per sample: a batch of 3 views
    targets = torch.tensor([0, 1, 2, 5])
    losses = {  # f(sample's data, its temperature)
        "info_nce": (lambda x, t: cb.info_nce(x[:1], x[1:], n, temperature=t), torch.stack([a, p], 1)),
        "in_batch": (lambda x, t: cb.info_nce(x, x + 0.1, temperature=t), z),
        "nt_xent": (lambda x, t: cb.nt_xent(x, x + 0.1, t), z),
        "clip_loss": (lambda x, t: cb.clip_loss(x, x + 0.1, 1 / t), z),
        "bank_cross_entropy": (lambda x, t: cb.bank_cross_entropy(x[0][None], n, x[1, :1].long(), temperature=t),
                               torch.stack([a, targets[:, None].double().expand(4, 3)], 1)),
    }
    for name, (f, data) in losses.items():
        t = temps.clone().requires_grad_(True)
        got = torch.func.vmap(f)(data, t)
        (g_got,) = torch.autograd.grad(got.sum(), t)
        t2 = temps.clone().requires_grad_(True)
        want = torch.stack([f(data[i], t2[i]) for i in range(4)])
        (g_want,) = torch.autograd.grad(want.sum(), t2)
        assert_close_scaled(got, want, 1e-12, f"{name} under vmap")
        assert_close_scaled(g_got, g_want, 1e-10, f"{name}: temperature gradient under vmap")


@pytest.mark.parametrize("case", ["shared K=0", "in_batch B=1", "bank C=1", "info_nce_lse K=0"])
def test_forward_mode_and_hessian_without_negatives(case):
    # The reference (forward-mode AD and the torch.func transforms take it) with no negatives: loss 0 from where(),
    # not a log-sum-exp of -inf alone, whose tangent and second derivative are NaN.
    a = torch.randn(3, 4, dtype=torch.float64)
    p = torch.randn(3, 4, dtype=torch.float64)
    f = {
        "shared K=0": lambda x: cb.info_nce(x, p, p[:0], reduction="sum"),
        "in_batch B=1": lambda x: cb.info_nce(x[:1], p[:1], reduction="sum"),
        "bank C=1": lambda x: cb.bank_cross_entropy(x, p[:1], torch.zeros(3, dtype=torch.long), reduction="sum"),
        "info_nce_lse K=0": lambda x: cb.info_nce_lse(x, p, p[:0])[1].sum(),
    }[case]
    _, tangent = torch.func.jvp(f, (a,), (torch.ones_like(a),))
    hess = torch.func.hessian(f)(a)
    assert torch.isfinite(tangent).all() and torch.isfinite(hess).all(), (tangent, hess)


def test_reference_path_float64_when_the_positive_is_far_below():
    # F.softplus returns its argument above its threshold (20 by default): where lse_neg - l_0 > 20 the
    # reference's gradients (which torch.func.grad and forward-mode AD get) were 2e-9 off in float64, against the
    # kernels' 1e-16. Kernel (autograd) and reference (torch.func.grad) gradients agree to float64 rounding.
    g = torch.Generator().manual_seed(3)
    a = F.normalize(torch.randn(16, 8, generator=g, dtype=torch.float64), dim=1)
    p = torch.randn(16, 8, generator=g, dtype=torch.float64)  # unrelated positives: l_0 in about [-7, 7]
    n = a[torch.arange(40) % 16] + 0.1 * torch.randn(40, 8, generator=g, dtype=torch.float64)  # lse_neg ~ 21
    # (lse_neg - l_0 between 20 and ~37, where sigmoid differs from 1 in float64)

    def f(x):
        return cb.info_nce(x, p, n, temperature=0.05, reduction="sum")

    x = a.clone().requires_grad_(True)
    (kernel,) = torch.autograd.grad(f(x), x)
    reference = torch.func.grad(f)(a)
    assert_close_scaled(reference, kernel, 1e-13, "reference vs kernel")


def test_torch_func_out_of_range_indices_raise():
    a, p, n, idx = make_inputs("indexed", B=4, K=2, d=3, dtype=torch.float64, M=6, requires_grad=False)
    bad = idx.clone()
    bad[3, 1] = 6  # M = 6
    per_sample = torch.func.grad(lambda r, p_i, i: cb.info_nce(r[None], p_i[None], n, negative_indices=i[None]))
    # Per-sample indices under vmap are checked as the batch underneath: an IndexError naming the argument (it
    # was torch's own "index 6 is out of bounds", or none at all for a negative index under vmap(grad), which
    # n[idx] counted from the end).
    for fn in (torch.func.vmap(per_sample), torch.func.vmap(lambda r, p_i, i: cb.info_nce(
            r[None], p_i[None], n, negative_indices=i[None]))):
        with pytest.raises(IndexError, match="negative_indices must lie in"):
            fn(a, p, bad)
    negative = idx.clone()
    negative[3, 1] = -2  # (-1 is padding)
    with pytest.raises(IndexError, match="negative_indices must lie in"):
        torch.func.vmap(per_sample)(a, p, negative)
    # per-sample padding: the gradients of the losses without those negatives
    negative[3, 1], negative[0] = -1, -1
    got = torch.func.vmap(per_sample)(a, p, negative)
    for i in range(4):
        rows = negative[i][negative[i] >= 0]
        want = torch.func.grad(lambda r: cb.info_nce(r[None], p[i:i + 1], n[rows]))(a[i])
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-14)
    targets = torch.tensor([0, 1, 2, -1])
    with pytest.raises(IndexError, match="targets must lie in"):
        torch.func.vmap(torch.func.grad(lambda r, t: cb.bank_cross_entropy(r[None], n, t[None])))(a, targets)
    with pytest.raises(IndexError, match="targets must lie in"):
        torch.func.vmap(lambda t: cb.bank_cross_entropy(a, n, t))(torch.tensor([[0, 1, 2, 3], [0, 77, 1, 2]]))
    with pytest.raises(IndexError, match="negative_indices"):
        torch.func.grad(lambda x: cb.info_nce(x, p, n, negative_indices=bad))(a)


def test_torch_func_hessian_and_other_losses():
    a, p, n, _ = make_inputs("shared", B=4, K=9, d=3, dtype=torch.float64, requires_grad=False)
    hess = torch.func.hessian(lambda x: cb.info_nce(x, p, n, temperature=0.5))(a)
    want = torch.autograd.functional.hessian(lambda x: info_nce_reference(x, p, n, temperature=0.5), a)
    assert hess.abs().max() > 1e-2
    assert_close_scaled(hess, want, 1e-10, "torch.func.hessian")
    t = torch.tensor(0.3, dtype=torch.float64)
    targets = torch.tensor([0, 3, 8, 1])
    for name, fn in {
        "bank_cross_entropy": lambda w: cb.bank_cross_entropy(a, w, targets, temperature=0.3),
        "nt_xent": lambda w: cb.nt_xent(a, w[:4], temperature=0.3),
        "clip_loss": lambda w: cb.clip_loss(a, w[:4], 1 / 0.3),
        "info_nce_lse": lambda w: cb.info_nce_lse(a, p, w, temperature=0.3)[1].sum(),
        "temperature": lambda w: cb.info_nce(a, p, n, temperature=t * (w.sum() / w.sum().detach())),
    }.items():
        w = n.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(fn(w), w)
        assert want.abs().max() > 1e-3, name
        assert_close_scaled(torch.func.grad(fn)(n), want, 1e-12, f"torch.func.grad of {name}")


# ----------------------------------------------------------------------------------------------------------
# Property test over shapes and values
# ----------------------------------------------------------------------------------------------------------


if given is not None:

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        mode=st.sampled_from(MODES),
        B=st.integers(1, 12),
        K=st.integers(0, 700),
        d=st.integers(1, 9),
        temperature=st.floats(0.01, 10.0),
        normalize=st.booleans(),
        scale=st.floats(1e-3, 30.0),
        seed=st.integers(0, 2**16),
    )
    def test_property_matches_reference(mode, B, K, d, temperature, normalize, scale, seed):
        if mode == "in_batch":
            K = 0
        a, p, n, idx = make_inputs(mode, B=B, K=K, d=d, dtype=torch.float64, seed=seed, requires_grad=False)
        a, p = (a * scale).requires_grad_(True), (p * scale).requires_grad_(True)
        n = None if n is None else (n * scale).requires_grad_(True)
        # Absolute below magnitude 1 (floor 1): the drawn extremes (d = 1 with normalize, temperature 0.01,
        # features scaled up to 30) give losses and gradients at the rounding level of terms that cancelled; the
        # fixed-size tests above are relative.
        _check_against_reference(a, p, n, idx, torch.float64, 1.0, temperature=temperature, normalize=normalize)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        seed=st.integers(0, 2**31 - 1),
        B=st.integers(1, 70),
        C=st.integers(1, 90),
        d=st.integers(1, 40),
        margin=st.floats(0.0, 30.0),
        temperature=st.floats(0.01, 2.0),
        normalize=st.booleans(),
        dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    )
    def test_property_bank_cross_entropy_is_never_negative(seed, B, C, d, margin, temperature, normalize, dtype):
        # A cross-entropy is >= 0. With the target's logit inside the bank's sum and subtracted again (two roundings
        # of one dot product) a confident anchor came out at -3e-5; now the loss is (max - l_t) + log(sum) with the
        # target counted once.
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(C, d, generator=g)
        t = torch.randint(0, C, (B,), generator=g)
        x = (margin * w[t] + torch.randn(B, d, generator=g)).to(dtype)
        loss = cb.bank_cross_entropy(x, w.to(dtype), t, temperature=temperature, normalize=normalize, reduction="none")
        assert (loss >= 0).all(), loss.min().item()

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        entry=st.sampled_from(["shared", "per_anchor", "indexed", "in_batch", "nt_xent", "clip", "bank_ce"]),
        dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
        B=st.integers(1, 20),
        K=st.integers(0, 200),
        d=st.integers(2, 40),
        temperature=st.sampled_from([0.05, 0.2, 1.0]),
        normalize=st.booleans(),
        strided=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_property_every_entry_point_and_dtype(entry, dtype, B, K, d, temperature, normalize, strided, seed):
        # Every entry point in the low-precision dtypes (the property test above is float64, info_nce only), on
        # strided inputs too, against the float64 reference from the same rounded inputs: loss and every gradient.
        g = torch.Generator().manual_seed(seed)

        def draw(*shape):
            x = torch.randn(*shape[:-1], 2 * shape[-1] if strided else shape[-1], generator=g, dtype=torch.float64)
            x = x[..., ::2] if strided else x
            return (x if normalize else x / math.sqrt(d)).to(dtype)

        a, p = draw(B, d), draw(B, d)
        idx = None
        if entry in ("shared", "bank_ce"):
            n = draw(max(K, 1) if entry == "bank_ce" else K, d)
            idx = torch.randint(0, n.shape[0], (B,), generator=g) if entry == "bank_ce" else None
        elif entry == "per_anchor":
            n = draw(B, K, d)
        elif entry == "indexed":
            n = draw(K // 3 + 1, d)
            idx = torch.randint(0, n.shape[0], (B, K), generator=g)
        else:
            n = None
        weights = torch.rand(2 * B, generator=g, dtype=torch.float64) + 0.5

        def run(a, p, n, fused):
            xs = [x.clone().requires_grad_(True) for x in (a, p, n) if x is not None]
            a, p, n = xs[0], xs[1], (xs[2] if n is not None else None)
            kw = dict(normalize=normalize, reduction="none")
            if entry == "nt_xent":
                out = (cb.nt_xent if fused else nt_xent_reference)(a, p, temperature=temperature, **kw)
            elif entry == "clip":
                if fused:
                    out = cb.clip_loss(a, p, 1.0 / temperature, **kw)
                else:
                    out = 0.5 * (info_nce_reference(a, p, None, temperature=temperature, **kw)
                                 + info_nce_reference(p, a, None, temperature=temperature, **kw))
            elif entry == "bank_ce":
                fn = cb.bank_cross_entropy if fused else bank_cross_entropy_reference
                out = fn(a, n, idx, temperature=temperature, **kw)
            elif fused:
                out = cb.info_nce(a, p, n, negative_indices=idx, temperature=temperature, **kw)
            else:
                out = info_nce_reference(a, p, None if n is None else (n if idx is None else n[idx]),
                                         temperature=temperature, **kw)
            (out.double() * weights[: out.numel()]).sum().backward()
            return out, [x.grad for x in xs]

        out, grads = run(a, p, n, True)
        want, want_grads = run(a.double(), p.double(), None if n is None else n.double(), False)
        assert out.dtype == dtype
        tol = 2 * TOL[dtype]
        assert_close_scaled(out, want, tol, "loss", floor=1.0)
        for name, x, y in zip(("first", "second", "negatives"), grads, want_grads):
            if y is None:  # bank_cross_entropy: positives unused
                continue
            # relative to the gradient's own largest entry, down to float32's rounding of terms of size 1 / T
            # (16 eps / T absolute: a confident anchor's gradient of 1e-12, or a float16 one below its smallest
            # subnormal, is rounding). A floor of 1 / T let float32 negatives' gradients of 1/K-sized entries be
            # 19% off (a test audit, 2026-12-02)
            floor = 16 * torch.finfo(torch.float32).eps / (temperature * tol)
            assert_close_scaled(x if x is not None else torch.zeros_like(y), y, tol, f"{name} gradient", floor=floor)

else:

    def test_property_matches_reference():
        pytest.importorskip("hypothesis")  # skipped only where hypothesis does not import


# ----------------------------------------------------------------------------------------------------------
# Learnable temperature, mixed dtypes, autocast
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [True, False])
def test_learnable_temperature_gradcheck(mode, normalize):
    a, p, n, idx = make_inputs(mode, B=3, K=5, d=4, dtype=torch.float64, M=4)
    t = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    leaves = tuple(x for x in (a, p, n) if x is not None) + (t,)

    def f(*xs):
        n_ = xs[2] if len(xs) == 4 else None
        return cb.info_nce(xs[0], xs[1], n_, negative_indices=idx, temperature=xs[-1], normalize=normalize,
                           reduction="none")

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1e-20, 1e-25])
def test_float64_learnable_temperature_with_float32_features(temperature):
    # d s / d t = -1 / t^2 was formed in the features' float32: inf where the float64 temperature holds it (plain
    # torch on the same float32 features: -2.593e39 at T = 1e-20)
    a, p, n, _ = make_inputs("shared", B=6, K=40, d=7, dtype=torch.float32, seed=14, requires_grad=False)
    t = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
    cb.info_nce(a, p, n, temperature=t, normalize=False, reduction="sum").backward()
    t_ref = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
    info_nce_reference(a.double(), p.double(), n.double(), temperature=t_ref, normalize=False,
                       reduction="sum").backward()
    assert torch.isfinite(t.grad) and t.grad.item() == pytest.approx(t_ref.grad.item(), rel=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [0.05, 1e4])
def test_learnable_temperature_matches_reference(mode, temperature):
    # At a high temperature the positive logit is small beside lse ~ log K: taken as lse - loss it lost its
    # digits (float32 temperature gradient 1e-2 relative at t = 1e4, 2x off at 1e6).
    a, p, n, idx = make_inputs(mode, B=21, K=900, d=7, dtype=torch.float32, seed=12)
    t = torch.tensor(temperature, requires_grad=True)
    t_ref = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
    loss = cb.info_nce(a, p, n, negative_indices=idx, temperature=t)
    (gt,) = torch.autograd.grad(loss, [t])
    cast = [None if x is None else x.detach().double() for x in (a, p, n)]
    ref = info_nce_reference(*cast, negative_indices=idx, temperature=t_ref)
    (rt,) = torch.autograd.grad(ref, [t_ref])
    assert_close_scaled(loss, ref, 1e-5, "loss")
    assert_close_scaled(gt, rt, 1e-4, "temperature grad")


def test_learnable_temperature_gradient_where_the_positive_dominates():
    # d loss / d s = (E - l_0) / s with E - l_0 = (w_0 - 1) l_0 + s a . V: w_0 - 1 taken as expm1(-loss), since
    # exp(-loss) - 1 in float32 has an absolute error of ~6e-8 (the spacing below 1), which is the whole of w_0 - 1
    # at a loss of 4e-9. With exp - 1 the temperature's gradient was 6 % off at a logit gap of 16 (loss 2.3e-7) and
    # 0 instead of 8.2e-8 at a gap of 20, and every other test passed (a mutation audit, 2026-12-07); with expm1
    # it is within 1e-6 of float64 at gaps 8 to 20.
    p, n = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, -1.0], [-1.0, 0.0]])
    for gap in (8.0, 12.0, 16.0, 20.0):
        a = torch.tensor([[gap, 0.0]])
        t, t64 = torch.tensor(1.0, requires_grad=True), torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        (got,) = torch.autograd.grad(cb.info_nce(a, p, n, temperature=t, normalize=False), t)
        (want,) = torch.autograd.grad(info_nce_reference(a.double(), p.double(), n.double(), temperature=t64,
                                                         normalize=False), t64)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", ["nt_xent_N1", "lse_no_negatives", "in_batch_lse_B1"])
def test_learnable_temperature_gradient_where_a_row_has_no_negatives(case):
    # A row whose set is empty (no negatives, positive left out) has lse = -inf and does not depend on the
    # temperature: its share of the temperature's gradient is 0, not 0 * NaN (a last batch of one sample in
    # SimCLR with a learnable temperature made the parameter NaN). Expected: the float64 reference's gradient.
    torch.manual_seed(3)
    a, p = torch.randn(1 if case != "lse_no_negatives" else 3, 4), torch.randn(1 if case != "lse_no_negatives" else 3, 4)

    def run(t, dtype):
        x, y = a.to(dtype), p.to(dtype)
        if case == "nt_xent_N1":
            return (cb.nt_xent if dtype == torch.float32 else nt_xent_reference)(x, y, t)
        bank = torch.zeros(0, 4, dtype=dtype)
        if dtype == torch.float32:  # in-batch with B = 1 and the positive left out: no other anchor, an empty set
            _, lse = (cb.info_nce_lse(x, y, None, temperature=t, include_positive=False) if case == "in_batch_lse_B1"
                      else cb.info_nce_lse(x, y, bank, temperature=t, include_positive=False))
        else:  # the reference: an empty set's log-sum-exp is -inf whatever the temperature
            lse = torch.full((x.shape[0],), -math.inf, dtype=dtype) + 0 * t
        return torch.logaddexp(lse, torch.zeros_like(lse)).sum()

    t = torch.tensor(0.5, requires_grad=True)
    t64 = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(run(t, torch.float32), [t])
    (g64,) = torch.autograd.grad(run(t64, torch.float64), [t64])
    assert torch.isfinite(g) and torch.isfinite(g64)
    assert abs(g.item() - g64.item()) <= 1e-5 * max(1.0, abs(g64.item()))


def test_infonce_module_deepcopy_shares_its_process_group():
    # EMA / teacher copies deep-copy the model: a process group cannot be copied (nor pickled), so the copy shares
    # it; the learnable temperature is copied. (A group that no init_process_group made: no exchange runs here.)
    import copy

    import torch.distributed as dist

    group = dist.ProcessGroup(dist.HashStore(), 0, 1)
    with pytest.raises(Exception):  # (what the module's deepcopy has to work around)
        copy.deepcopy(group)
    module = cb.InfoNCE(temperature=0.2, learn_temperature=True, process_group=group)
    twin = copy.deepcopy(module)
    assert twin.process_group is group
    assert twin.log_temperature is not module.log_temperature
    assert torch.equal(twin.log_temperature.detach(), module.log_temperature.detach())


def test_infonce_module_learns_its_temperature():
    module = cb.InfoNCE(temperature=0.2, learn_temperature=True)
    assert [name for name, _ in module.named_parameters()] == ["log_temperature"]
    a, p, n, _ = make_inputs("shared", B=8, K=50, d=4, dtype=torch.float32)
    module(a, p, n).backward()
    assert module.log_temperature.grad is not None and torch.isfinite(module.log_temperature.grad)
    assert abs(float(module.temperature.detach()) - 0.2) < 1e-6


def test_mixed_dtypes_compute_in_the_bank_dtype():
    a, p, n, _ = make_inputs("shared", B=9, K=300, d=8, dtype=torch.float32, seed=13)
    a16 = a.detach().bfloat16().requires_grad_(True)
    loss = cb.info_nce(a16, p, n)
    assert loss.dtype == torch.float32
    ref = cb.info_nce(a16.detach().float(), p, n)
    assert_close_scaled(loss, ref, 1e-6, "loss")
    (ga,) = torch.autograd.grad(loss, [a16])
    assert ga.dtype == torch.bfloat16


def test_mixed_dtypes_float32_features_beyond_a_float16_bank_range():
    # Rows normalised before the cast down to the bank's float16: entries past 65504 would otherwise become inf.
    a, p, n, _ = make_inputs("shared", B=6, K=200, d=8, dtype=torch.float32, seed=14, requires_grad=False)
    a, p = (a * 1e6).requires_grad_(True), (p * 1e6).requires_grad_(True)
    loss = cb.info_nce(a, p, n.half(), temperature=0.2)
    ref = info_nce_reference(a.detach().double(), p.detach().double(), n.half().double(), temperature=0.2)
    assert loss.dtype == torch.float32
    assert_close_scaled(loss, ref, 2e-3, "loss")
    ga, gp = torch.autograd.grad(loss, [a, p])
    assert torch.isfinite(ga).all() and torch.isfinite(gp).all()


@pytest.mark.parametrize("mode", ["shared", "per_anchor", "indexed", "bank_cross_entropy", "supcon"])
def test_mixed_dtypes_zero_row_gradient_follows_f_normalize(mode):
    # float32 features against a bfloat16 bank are normalised before the cast down, and the kernel normalises them
    # again: a zero row's gradient must carry F.normalize's 1 / eps once (~1e12 here, as the reference), not
    # twice (it was ~1e24). A fuzz against the references found it (supcon on bfloat16 features, cast to float32).
    a, p, n, idx = make_inputs(mode if mode in ("per_anchor", "indexed") else "shared", B=5, K=7, d=4,
                               dtype=torch.float32, seed=22, requires_grad=False)
    with torch.no_grad():
        a[1] = 0.0
    n16 = n.bfloat16()
    targets = torch.tensor([0, 3, 6, 2, 2])
    labels, bank_labels = torch.tensor([0, 1, 0, 1, 1]), torch.tensor([0, 1, 1, 0, 1, 0, 1])

    def loss_of(x, bank):
        if mode == "bank_cross_entropy":
            return cb.bank_cross_entropy(x, bank, targets, 0.5, normalize=True, reduction="sum")
        if mode == "supcon":
            return cb.supcon_loss(x, labels, 0.5, bank=bank, bank_labels=bank_labels, reduction="sum")
        return cb.info_nce(x, p.to(x.dtype), bank, 0.5, negative_indices=idx, reduction="sum")

    def reference(x, bank):
        if mode == "bank_cross_entropy":
            return bank_cross_entropy_reference(x, bank, targets, 0.5, normalize=True, reduction="sum")
        if mode == "supcon":
            return supcon_reference(x, labels, 0.5, bank=bank, bank_labels=bank_labels, reduction="sum")
        return info_nce_reference(x, p.double(), bank, 0.5, negative_indices=idx, reduction="sum")

    x = a.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_of(x, n16), [x])
    x64 = a.double().requires_grad_(True)
    (want,) = torch.autograd.grad(reference(x64, n16.double()), [x64])
    assert 1e11 < want[1].abs().max() < 1e14  # (the zero row's F.normalize gradient: 1 / eps times O(1))
    assert_close_scaled(g[1], want[1], 2e-2, f"{mode}: the zero row's gradient")
    assert_close_scaled(g[[0, 2, 3, 4]], want[[0, 2, 3, 4]], 2e-2, f"{mode}: the other rows' gradient")


@pytest.mark.parametrize("mode", ["shared", "bank_cross_entropy"])
def test_mixed_dtypes_float16_zero_row_is_not_nan(mode):
    # float16 features against a bfloat16 bank are normalised in float16 before the cast: F.normalize of a float16
    # zero row is 0 / 0 (its eps, 1e-12, rounds to 0), which made the row's loss NaN. Its loss is log(K + 1) (or
    # log C), and its gradient overflows float16 (~1e12, as every float16 path gives it): inf, not NaN.
    g = torch.Generator().manual_seed(23)
    a = torch.randn(3, 4, generator=g).half()
    a[0] = 0.0
    a.requires_grad_(True)
    bank = torch.randn(5, 4, generator=g).bfloat16()
    if mode == "shared":
        loss = cb.info_nce(a, torch.randn(3, 4, generator=g).half(), bank, 0.5, reduction="none")
        log_count = math.log(6)
    else:
        loss = cb.bank_cross_entropy(a, bank, torch.tensor([0, 1, 2]), 0.5, normalize=True, reduction="none")
        log_count = math.log(5)
    (grad,) = torch.autograd.grad(loss.sum(), [a])
    assert torch.isfinite(loss).all(), loss
    assert abs(loss[0].item() - log_count) < 1e-6, loss
    assert not grad.isnan().any() and torch.isfinite(grad[1:]).all(), grad


def test_float16_features_against_a_bfloat16_bank_normalise_in_float32():
    # (a differential fuzz's case) float16 rows are cast to a bfloat16 bank's dtype after F.normalize; in float16 a
    # row of subnormal norm made its backward g / |x| overflow and the projection inf - inf: a NaN gradient where
    # the float64 reference's is -7e-12. Now normalised in float32: finite, and the reference's to float16 rounding.
    a = torch.tensor([[1.0], [1.0]], dtype=torch.float16, requires_grad=True)
    p = torch.tensor([[1.2e-5], [1.0]], dtype=torch.float16, requires_grad=True)
    bank = torch.tensor([[1.0], [-1.0]], dtype=torch.bfloat16)
    got = cb.info_nce(a, p, bank, 0.9, reduction="sum")
    (ga, gp) = torch.autograd.grad(got, [a, p])
    a64, p64 = a.detach().double().requires_grad_(), p.detach().double().requires_grad_()
    want = info_nce_reference(a64, p64, bank.double(), 0.9, reduction="sum")
    (wa, wp) = torch.autograd.grad(want, [a64, p64])
    assert torch.isfinite(ga).all() and torch.isfinite(gp).all(), (ga, gp)
    assert abs(got.item() - want.item()) < 1e-2 * abs(want.item())
    assert torch.equal(gp, wp.half()) and torch.equal(ga, wa.half()), (ga, gp, wa, wp)
    # d = 4, random rows with norms from 1e-3 to 1e2 (gradients within float16's range): the reference's to
    # bfloat16 rounding
    g = torch.Generator().manual_seed(4)
    a = (torch.randn(6, 4, generator=g) * torch.logspace(-3, 2, 6)[:, None]).half().requires_grad_()
    p = (torch.randn(6, 4, generator=g) * torch.logspace(2, -3, 6)[:, None]).half().requires_grad_()
    bank = torch.randn(11, 4, generator=g).bfloat16()
    got = cb.info_nce(a, p, bank, 0.5, reduction="sum")
    grads = torch.autograd.grad(got, [a, p])
    a64, p64 = a.detach().double().requires_grad_(), p.detach().double().requires_grad_()
    wants = torch.autograd.grad(info_nce_reference(a64, p64, bank.double(), 0.5, reduction="sum"), [a64, p64])
    for name, x, y in zip("ap", grads, wants):
        # (relative to each row's own scale: the rows' gradients span 1e-2 to 1e6 as 1 / |row|)
        scale = y.abs().amax(dim=1, keepdim=True)
        assert ((x.double() - y).abs() <= 0.02 * scale + 1e-30).all(), (name, x, y)


def test_in_batch_mixed_dtypes_promote():
    # No bank: every input is (B, d), so nothing is rounded down and the in-batch entry points agree.
    a, p, _, _ = make_inputs("in_batch", B=9, K=0, d=8, dtype=torch.float32, seed=15, requires_grad=False)
    a16, p32 = a.half(), p * 1e5  # p past float16's range: a cast of p to a16's dtype would overflow
    ref = info_nce_reference(a16.double(), p32.double(), temperature=0.2, reduction="none")
    loss = cb.info_nce(a16, p32, temperature=0.2, reduction="none")
    lse_loss, _ = cb.info_nce_lse(a16, p32, temperature=0.2)
    assert loss.dtype == torch.float32
    assert_close_scaled(loss, ref, 1e-5, "info_nce")
    assert_close_scaled(lse_loss, ref, 1e-5, "info_nce_lse")
    z = cb.nt_xent(a16, p32, 0.2, reduction="none")
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    assert_close_scaled(z, nt_xent_reference(a16.double(), p32.double(), 0.2, reduction="none"), 1e-5, "nt_xent")


@pytest.mark.parametrize("K", [0, 9])
def test_fallback_lse_without_the_positive_and_without_negatives(monkeypatch, K):
    # The fallback's (info_nce_core_reference's) include_positive=False loss and its K = 0 rows against the kernel's
    # (a mutation audit: lse + l_0 for lse - l_0 there, and lse = 0 or loss 0 for empty rows, passed every test)
    a, p, n, _ = make_inputs("shared", B=5, K=K, d=4, dtype=torch.float64, seed=7)
    for include_positive in (False, True):
        kernel = cb.info_nce_lse(a, p, n, 0.3, include_positive=include_positive)
        with monkeypatch.context() as m:
            m.setattr(_backend, "kernel_serves", lambda device: False)
            fallback = cb.info_nce_lse(a, p, n, 0.3, include_positive=include_positive)
        pos = (F.normalize(a, dim=1) * F.normalize(p, dim=1)).sum(1) / 0.3
        if K == 0:  # lse over nothing is -inf, with the positive the positive's logit; the loss is lse - l_0
            want = torch.full_like(pos, -math.inf) if not include_positive else pos
            torch.testing.assert_close(fallback[1], want)
            if include_positive:
                torch.testing.assert_close(fallback[0], torch.zeros_like(pos))
        for got, w, what in zip(fallback, kernel, ("loss", "lse")):
            if K == 0 and not include_positive:
                assert torch.isinf(got).all() and torch.isinf(w).all(), what
                continue
            assert_close_scaled(got, w, 1e-12, f"{what}, include_positive={include_positive}")


def test_fallback_lse_without_the_positive_has_the_log_sum_exp_gradient(monkeypatch):
    # Where the reference serves (no compiled kernel), its lse carries a gradient of its own: the construction of
    # lse's gradient from the loss's must start from the detached values, else the gradient doubles (a mutation
    # audit's survivor: no test took lse's gradient on that route).
    g = torch.Generator().manual_seed(3)
    a, p, n = (torch.randn(*s, dtype=torch.float64, generator=g) for s in ((5, 4), (5, 4), (7, 4)))
    a.requires_grad_()
    with monkeypatch.context() as m:
        m.setattr(_backend, "kernel_serves", lambda device: False)
        _, lse = cb.info_nce_lse(a, p, n, 0.5, include_positive=False)
        (got,) = torch.autograd.grad(lse.sum(), a)
    a64 = a.detach().clone().requires_grad_()
    want_lse = (F.normalize(a64, dim=1) @ F.normalize(n, dim=1).T / 0.5).logsumexp(1)
    (want,) = torch.autograd.grad(want_lse.sum(), a64)
    torch.testing.assert_close(lse.detach(), want_lse.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_references_return_the_inputs_dtype():
    # as the losses do (a mutation audit: info_nce_reference's float32 result for bfloat16 inputs passed)
    a, p, n, _ = make_inputs("shared", B=4, K=6, d=3, dtype=torch.bfloat16, requires_grad=False)
    assert info_nce_reference(a, p, n).dtype == torch.bfloat16
    assert info_nce_reference(a, p, None, reduction="none").dtype == torch.bfloat16
    assert nt_xent_reference(a, p).dtype == torch.bfloat16


def test_references_refuse_what_the_losses_refuse():
    # negative indices counted from the end and float labels truncated silently (the losses raise; -1 is padding)
    from contrastbound.reference import debiased_info_nce_reference, supcon_reference

    a, p, n, _ = make_inputs("indexed", B=3, K=4, d=2, dtype=torch.float64, requires_grad=False)
    idx = torch.tensor([[0, 1], [2, -2], [1, 1]])
    for fn in (cb.info_nce, info_nce_reference, debiased_info_nce_reference):
        with pytest.raises((IndexError, RuntimeError)):
            fn(a, p, n, negative_indices=idx)
    for fn in (cb.supcon_loss, supcon_reference):
        with pytest.raises(TypeError, match="labels"):
            fn(torch.randn(4, 3), torch.tensor([0.2, 0.7, 1.0, 1.0]))


def test_bank_cross_entropy_reference_without_ignore_index_refuses_what_it_cannot_index():
    # ignore_index=None ignores nothing: a target of -100 is out of range, as for bank_cross_entropy (a mutation
    # audit: the reference ignoring -100 there passed every test)
    a, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    t = torch.tensor([1, -100, 2])
    with pytest.raises(IndexError):
        cb.bank_cross_entropy(a, w, t, ignore_index=None)
    with pytest.raises((IndexError, RuntimeError)):
        bank_cross_entropy_reference(a, w, t, ignore_index=None)
    torch.testing.assert_close(bank_cross_entropy_reference(a, w, t), cb.bank_cross_entropy(a, w, t))


def test_fallback_ignores_autocast(monkeypatch):
    # The reference serving as the fallback keeps the inputs' dtype (float32 here) under autocast, as the kernels.
    a, p, n, _ = make_inputs("shared", B=16, K=500, d=32, dtype=torch.float32, seed=16, requires_grad=False)
    kernel = cb.info_nce(a, p, n, temperature=0.05, reduction="none")
    monkeypatch.setattr(_backend, "kernel_serves", lambda device: False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fallback = cb.info_nce(a, p, n, temperature=0.05, reduction="none")
    assert fallback.dtype == torch.float32
    # logits ~ 1 / 0.05 = 20 cancel to losses ~1e-2; bfloat16 logits (the bug) were 6e-2 off, a float32 reference
    # under autocast's matmul 1.1e-4 (a mutation audit's find: the bound was 2e-4), the kernel's order 8e-9
    assert_close_scaled(fallback, kernel, 1e-6, "fallback under autocast", floor=1 / 0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_returns_float32_losses(dtype):
    # Under autocast the loss is float32, as autocast's F.cross_entropy: half-precision activations without a bank
    # (in-batch, NT-Xent, CLIP) or with a half bank returned a half loss, the float32 value the kernels accumulate
    # rounded to 3 digits (bfloat16: 2.3e-3 relative error for NT-Xent); the value is that of float64 on the same
    # (half) inputs to float32 accumulation. Without autocast the promoted dtype, as before.
    a, p, n, _ = make_inputs("shared", B=40, K=300, d=16, dtype=dtype, seed=19, requires_grad=False)
    calls = {
        "in-batch": (lambda: cb.info_nce(a, p, temperature=0.1, reduction="none"),
                     lambda: info_nce_reference(a.double(), p.double(), temperature=0.1, reduction="none")),
        "bank": (lambda: cb.info_nce(a, p, n, temperature=0.1),
                 lambda: info_nce_reference(a.double(), p.double(), n.double(), temperature=0.1)),
        "nt_xent": (lambda: cb.nt_xent(a, p, temperature=0.1, reduction="sum"),
                    lambda: nt_xent_reference(a.double(), p.double(), temperature=0.1, reduction="sum")),
        "clip": (lambda: cb.clip_loss(a, p, 10.0),  # (the mean of the two directions, its docstring's definition)
                 lambda: (info_nce_reference(a.double(), p.double(), temperature=0.1)
                          + info_nce_reference(p.double(), a.double(), temperature=0.1)) / 2),
    }
    for name, (fused, ref) in calls.items():
        with torch.autocast("cpu", dtype=dtype):
            got = fused()
        assert got.dtype == torch.float32, name
        assert_close_scaled(got, ref(), 2e-5, name)
        assert fused().dtype == dtype, name  # outside autocast: the inputs' dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_matches_float32(dtype):
    torch.manual_seed(0)
    encoder = torch.nn.Linear(16, 32)
    x, x_pos = torch.randn(24, 16), torch.randn(24, 16)
    queue = torch.randn(2000, 32)
    ref = cb.info_nce(encoder(x), encoder(x_pos), queue, temperature=0.05)
    with torch.autocast("cpu", dtype=dtype):
        za, zp = encoder(x), encoder(x_pos)
        assert za.dtype == dtype
        loss = cb.info_nce(za, zp, queue, temperature=0.05)
        loss_half_bank = cb.info_nce(za, zp, queue.to(dtype), temperature=0.05)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(loss_half_bank)
    assert all(torch.isfinite(w.grad).all() for w in encoder.parameters())
    # The features are rounded to `dtype` by autocast (the bank too in loss_half_bank): measured errors 5e-3 / 2.1e-2
    # (bf16) and 8e-4 / 2.2e-3 (fp16) on a loss of 10.4, within TOL relative.
    assert abs(loss.item() - ref.item()) <= TOL[dtype] * abs(ref.item())
    assert abs(loss_half_bank.float().item() - ref.item()) <= TOL[dtype] * abs(ref.item())


@pytest.mark.parametrize("bank_dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_bank_cross_entropy_smoothing_under_a_batched_backward(bank_dtype, normalize):
    # An audit's case: a batched backward (jacobian(vectorize=True), is_grads_batched) with label smoothing scaled a
    # half bank's widened chunk, unbatched, in place by a batched factor ("vmap: aten::mul_ ... is not possible").
    # The vectorized Jacobian is the one computed row by row.
    g = torch.Generator().manual_seed(42)
    a = torch.randn(4, 8, generator=g, dtype=torch.float64)
    w = torch.randn(6, 8, generator=g, dtype=torch.float64).to(bank_dtype)
    t = torch.tensor([0, 3, 5, 1])

    def per_anchor(bank):
        return cb.bank_cross_entropy(a, bank, t, 0.5, normalize=normalize, label_smoothing=0.1, reduction="none")

    want = torch.autograd.functional.jacobian(per_anchor, w)
    got = torch.autograd.functional.jacobian(per_anchor, w, vectorize=True)
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("learn_t", [False, True])
def test_bank_cross_entropy_backward_inside_autocast_is_the_one_outside(dtype, smoothing, learn_t):
    # An audit's case: backward() called inside torch.autocast ran the half bank's target-row recomputation
    # (functional._target_rows_gradient) in bfloat16: the bank gradient 2.4e-2 off float64 where it is 2.3e-3
    # without autocast (4.7e-2 with a learnable temperature). Where backward runs must not matter: the same bits.
    g = torch.Generator().manual_seed(23)
    a0 = torch.randn(24, 32, generator=g).to(dtype)
    w0 = torch.randn(200, 32, generator=g).to(dtype)
    t = torch.randint(0, 200, (24,), generator=g)

    def grads(inside: bool):
        a, w = a0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        temp = torch.tensor(0.1, requires_grad=True) if learn_t else 0.1
        with torch.autocast("cpu", dtype=dtype):
            loss = cb.bank_cross_entropy(a, w, t, temperature=temp, normalize=True, label_smoothing=smoothing)
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        return a.grad, w.grad, (temp.grad if learn_t else None)

    for got, want in zip(grads(True), grads(False)):
        assert (got is None and want is None) or torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("row", [0, 1500, 4095])
@pytest.mark.parametrize("route", ["shared", "lse_without_positive", "bank_cross_entropy", "in_batch", "nt_xent", "clip"])
def test_nan_input_gives_nan_loss(device, row, route):
    # A NaN in a bank row must make every loss that sums over that row NaN (as torch's logsumexp / cross_entropy),
    # wherever the row falls among the kernel's K chunks. Before, a NaN partial state merged into an empty one was
    # dropped: finite wrong losses (bank cross-entropy) or -inf (in-batch).
    g = torch.Generator().manual_seed(row)
    bank = torch.randn(4096, 8, generator=g).to(device)
    a = torch.randn(6, 8, generator=g).to(device)
    p = torch.randn(6, 8, generator=g).to(device)
    if route in ("in_batch", "nt_xent", "clip"):
        z = torch.randn(4096, 8, generator=g).to(device)
        z[row, 3] = float("nan")
        if route == "in_batch":
            loss = cb.info_nce(z, z.flip(0), reduction="none")
        elif route == "nt_xent":
            loss = cb.nt_xent(z, z.flip(0), 0.5, reduction="none")
        else:
            loss = cb.clip_loss(z, z.flip(0), 10.0, reduction="none")
    else:
        bank[row, 5] = float("nan")
        if route == "shared":
            loss = cb.info_nce(a, p, bank, reduction="none")
        elif route == "lse_without_positive":
            loss = cb.info_nce_lse(a, p, bank, include_positive=False)[1]
        else:
            loss = cb.bank_cross_entropy(a, bank, torch.tensor([1, 2, 3, 4, 5, 6], device=device), reduction="none")
    assert torch.isnan(loss).all(), loss


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("K,row", [(65, 64), (65, 0), (2, 1)])
def test_nan_bank_row_in_a_partial_tile_gives_nan(device, dtype, K, row):
    # Half precision takes the tensor-core kernels on a GPU: a NaN row alone in the last, partly filled tile was
    # dropped there (fmaxf in the tile maximum), giving a finite loss.
    g = torch.Generator().manual_seed(K + row)
    bank = torch.randn(K, 16, generator=g).to(device, dtype)
    bank[row, 3] = float("nan")
    a = torch.randn(4, 16, generator=g).to(device, dtype)
    loss = cb.info_nce_lse(a, a, bank, include_positive=False)[1]
    assert torch.isnan(loss).all(), loss
    z = torch.randn(K, 16, generator=g).to(device, dtype)
    z[row, 3] = float("nan")
    in_batch = cb.info_nce(z, z.flip(0), reduction="none")
    assert torch.isnan(in_batch).all(), in_batch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["shared", "indexed", "per_anchor"])
@pytest.mark.parametrize("case", ["one_row", "every_row"])
def test_negative_logits_overflowing_to_minus_inf_stay_finite(device, mode, case):
    # A float32 dot product that overflows to -inf (normalize=False, norms ~1e20) is a negative with weight 0, as in
    # the reference. The CPU shared-bank kernel turned a chunk whose logits were all -inf into max = -inf and
    # sum = exp(-inf - -inf) = NaN: a NaN loss and NaN gradients for every bank row (one such row alone in the last
    # chunk of K = 513 sufficed; with every row -inf every chunk is such). Per-anchor negatives (the bank as a
    # (1, K, d) batch): running the per-anchor backward's normalisation step with normalize=False (0 x -inf there)
    # made such a row's gradient NaN and passed every other test (a mutation audit, 2026-12-07).
    K = 513
    a = torch.tensor([[1e20, 1.0]], device=device)
    p = torch.tensor([[1e-20, 1.0]], device=device)
    bank = torch.randn(K, 2, generator=torch.Generator().manual_seed(0)).to(device)
    bank[:, 0] = 0.0
    if case == "one_row":
        bank[K - 1] = torch.tensor([-1e20, 0.0])
    else:
        bank[:, 0] = -1e20
    idx = torch.arange(K, device=device)[None] if mode == "indexed" else None
    if mode == "per_anchor":
        bank = bank[None]
    for reduction in ("mean", "none"):
        b1, b2 = bank.clone().requires_grad_(True), bank.clone().requires_grad_(True)
        a1, a2 = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
        got = cb.info_nce(a1, p, b1, negative_indices=idx, temperature=1.0, normalize=False, reduction=reduction)
        want = info_nce_reference(a2, p, b2, negative_indices=idx, temperature=1.0, normalize=False,
                                  reduction=reduction)
        assert torch.isfinite(got).all() and torch.isfinite(want).all(), (got, want)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        got.sum().backward()
        want.sum().backward()
        for x, y in ((a1.grad, a2.grad), (b1.grad, b2.grad)):
            assert torch.isfinite(x).all(), x
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not _backend.kernel_serves(torch.device("cpu")), reason="needs the CPU kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_transposed_shared_bank_is_not_copied_and_gives_the_same_bits(dtype, normalize):
    # A shared bank passed as a transposed (d, K) buffer (MoCo's queue layout) is read in place: its norms a feature
    # at a time over blocks of rows, its tiles copied one at a time. Same bits as the contiguous bank (K = 1100: 4
    # full 256-row blocks and a partial one, 3 bank tiles; d = 19: two 8-wide groups and a tail), and no (K, d)
    # copy in the forward.
    B, K, d = 13, 1100, 19
    a, p, bank, _ = make_inputs("shared", B=B, K=K, d=d, dtype=dtype, seed=23)
    bank_t = bank.detach().t().contiguous().t().requires_grad_()  # strides (1, K)
    assert bank_t.stride() == (1, K)
    outs = []
    for n in (bank, bank_t):
        loss = cb.info_nce(a, p, n, temperature=0.1, normalize=normalize, reduction="none")
        outs.append((loss, *torch.autograd.grad(loss.sum(), (a, p, n))))
    for x, y in zip(*outs):
        assert torch.equal(x, y)
    with torch.profiler.profile(record_shapes=True) as prof, torch.no_grad():
        cb.info_nce(a, p, bank_t, temperature=0.1, normalize=normalize)
    copies = [e.name for e in prof.events() if e.name in ("aten::clone", "aten::contiguous", "aten::copy_")
              and [K, d] in e.input_shapes]
    assert copies == []


@pytest.mark.skipif(not _backend.kernel_serves(torch.device("cpu")), reason="needs the CPU kernel")
def test_backward_does_not_copy_a_strided_bank_it_does_not_read():
    # A (K, d) bank with a non-unit feature stride (a transposed buffer) is copied only where the backward reads
    # it: with a detached bank and a saved V, the anchors' and positives' gradients need O(B d) work.
    B, K, d = 8, 3000, 16
    a, p, _, _ = make_inputs("shared", B=B, K=0, d=d, dtype=torch.float32, seed=17)
    bank = torch.randn(d, K).t()  # strides (1, K)
    loss = cb.info_nce(a, p, bank)

    def bank_copies(fn):
        with torch.profiler.profile(record_shapes=True) as prof:
            fn()
        return [e for e in prof.events() if e.name in ("aten::clone", "aten::contiguous") and [K, d] in e.input_shapes]

    assert bank_copies(lambda: loss.backward()) == []
    bank.requires_grad_(True)
    assert bank_copies(lambda: cb.info_nce(a, p, bank).backward()) != []  # the check sees a copy where one is made


@pytest.mark.parametrize("include_positive", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_info_nce_lse_gradient(mode, include_positive):
    # lse keeps the kernel's values and has the gradient of the log-sum-exp, so losses assembled from combined
    # lse's (torch.logaddexp over disjoint sets) train every part of them.
    a, p, n, idx = make_inputs(mode, B=4, K=9, d=5, dtype=torch.float64, M=7)
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    leaves = tuple(x for x in (a, p, n, t) if x is not None)

    def lse_of(*xs):
        n_ = xs[2] if len(xs) == 4 else None
        return cb.info_nce_lse(xs[0], xs[1], n_, negative_indices=idx, temperature=xs[-1],
                               include_positive=include_positive)[1]

    def both_of(*xs):  # loss and lse in one graph: each output's gradient from its own backward
        n_ = xs[2] if len(xs) == 4 else None
        loss, lse = cb.info_nce_lse(xs[0], xs[1], n_, negative_indices=idx, temperature=xs[-1],
                                    include_positive=include_positive)
        return loss, lse

    assert torch.autograd.gradcheck(lse_of, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradcheck(both_of, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)
    with torch.no_grad():
        _, plain = cb.info_nce_lse(a, p, n, negative_indices=idx, temperature=0.4, include_positive=include_positive)
    assert torch.equal(lse_of(*leaves).detach(), plain)


@pytest.mark.parametrize("include_positive", [True, False])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_info_nce_lse_gradient_of_lse_in_low_precision(device, dtype, mode, include_positive):
    # lse's gradient was formed as d loss + d l_0: two gradients of size ~ s |a|, each rounded to the inputs' dtype,
    # whose sum is w0 s a (w0 the positive's softmax weight, small here: K = 512 random negatives). d lse / d p was
    # 2.2 relative off in bfloat16 (the reference in bfloat16: 1.5e-3) and 2e-4 in float32 (2e-7); the anchors'
    # without the positive 16-30x the reference's error (a differential fuzz's find). Now lse's own backward: at
    # most 4x the error of the reference run in the same dtype, against float64. (CUDA: floors for the tensor
    # cores' rounded coefficients, ~1e-2 of a gradient in bfloat16 (docs/LIMITS.md); not yet run on a GPU.)
    from contrastbound.reference import info_nce_core_reference

    B, K, d = 6, 512, 64
    a0, p0, n0, idx = make_inputs(mode, B=B, K=K, d=d, dtype=torch.float64, M=300, seed=5, requires_grad=False)
    p0 = a0 + 10.0 * (p0 - a0)  # a weak positive: w0 ~ 1e-3 at T = 0.1
    a0, p0 = a0.to(device), p0.to(device)
    n0, idx = (None if n0 is None else n0.to(device)), (None if idx is None else idx.to(device))
    w = torch.linspace(0.5, 1.5, B, dtype=torch.float64, device=device)

    def grads(fn, dt):
        xs = [x.to(dt).requires_grad_() if x is not None else None for x in (a0, p0, n0)]
        leaves = [x for x in xs if x is not None]
        lse = fn(*xs)
        return torch.autograd.grad((lse * w.to(lse.dtype)).sum(), leaves, allow_unused=True)

    def lib(a, p, n):
        return cb.info_nce_lse(a, p, n, 0.1, negative_indices=idx, include_positive=include_positive)[1]

    def ref(a, p, n):
        n_ = p if mode == "in_batch" else n
        return info_nce_core_reference(a, p, n_, idx, 10.0, True, include_positive, mode == "in_batch")[1]

    want, base, got = grads(ref, torch.float64), grads(ref, dtype), grads(lib, dtype)
    floor = {torch.bfloat16: 1e-3, torch.float16: 2e-4, torch.float32: 1e-6}[dtype]
    if device == "cuda":
        floor = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-5}[dtype]
    for name, g_, b_, w_ in zip(("anchors", "positives", "negatives"), got, base, want):
        if w_ is None:  # the positives without the positive in the sum (not in-batch): exactly 0
            assert torch.equal(g_, torch.zeros_like(g_)), name
            continue

        def err(x):
            return float((x.double() - w_).norm() / w_.norm())

        assert err(g_) <= 4 * err(b_) + floor, (name, err(g_), err(b_))


@pytest.mark.parametrize("mode", MODES)
def test_info_nce_lse_without_the_positive_sends_it_no_gradient(mode):
    # lse over the negatives alone does not depend on the positives as positives: their gradient is exactly 0
    # (in-batch: their use as the bank's rows alone), where d loss + d l_0 cancelled only to rounding (float32:
    # 2.4e-7 at |p| ~ 1, 2.6e5 for a zero row through F.normalize; an audit's find). The loss keeps its gradient.
    a, p, n, idx = make_inputs(mode, B=4, K=9, d=5, dtype=torch.float32, M=7, seed=2)
    p = p.detach().clone()
    p[1] = 0.0  # a zero row: F.normalize's gradient there is G / 1e-12
    p[2] *= 1e-3
    p.requires_grad_()
    loss, lse = cb.info_nce_lse(a, p, n, negative_indices=idx, temperature=0.3, include_positive=False)
    (g,) = torch.autograd.grad(lse.sum(), p, retain_graph=True)
    if mode == "in_batch":  # the bank's part: the same as the gradient of lse with the positives' rows as a bank only
        p2 = p.detach().clone().requires_grad_()
        _, lse2 = cb.info_nce_lse(a, p.detach(), p2, temperature=0.3, include_positive=False,
                                  negative_mask=~torch.eye(4, dtype=torch.bool))
        (want,) = torch.autograd.grad(lse2.sum(), p2)
        assert torch.allclose(g, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    else:
        assert torch.equal(g, torch.zeros_like(p))
    # the loss = lse - l_0 still trains the positives (-d l_0, and the bank's part in-batch): as float64
    (gl,) = torch.autograd.grad(loss.sum(), p)
    p64 = p.detach().double().requires_grad_()
    loss64, _ = cb.info_nce_lse(*(x.double() if x is not None else None for x in (a.detach(),)), p64,
                                None if n is None else n.detach().double(), negative_indices=idx, temperature=0.3,
                                include_positive=False)
    (gl64,) = torch.autograd.grad(loss64.sum(), p64)
    rows = [0, 2, 3]  # (the zero row's gradient is G / 1e-12: compared on the others)
    assert torch.allclose(gl[rows].double(), gl64[rows], rtol=1e-4, atol=1e-4 * float(gl64[rows].abs().max()))


def test_info_nce_lse_without_the_positive_or_negatives_trains_as_the_reference():
    # an anchor whose negatives are all masked out: lse -inf, loss = -inf - l_0, whose gradient in the anchor and
    # the positive is -d l_0, as the reference (torch.func's route) gives; a mutation audit's find (the positive's
    # had been set to 0 there by the change that sends lse's gradient none)
    from contrastbound.reference import info_nce_core_reference

    g = torch.Generator().manual_seed(0)
    a, p = torch.randn(3, 4, dtype=torch.float64, generator=g), torch.randn(3, 4, dtype=torch.float64, generator=g)
    n = torch.randn(5, 4, dtype=torch.float64, generator=g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0] = False
    grads = []
    for fn in (lambda a_, p_: cb.info_nce_lse(a_, p_, n, 0.5, include_positive=False, negative_mask=mask)[0],
               lambda a_, p_: info_nce_core_reference(a_, p_, n, None, 2.0, True, False, False, None, mask)[0]):
        a_, p_ = a.clone().requires_grad_(), p.clone().requires_grad_()
        loss = fn(a_, p_)
        assert torch.isneginf(loss[0]) and torch.isfinite(loss[1:]).all()
        grads.append(torch.autograd.grad(loss[0] + loss[1:].sum(), [a_, p_]))
    for got, want in zip(*grads):
        assert got[0].abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not _backend.kernel_serves(torch.device("cpu")), reason="needs the CPU kernel")
def test_expanded_negative_indices_are_read_in_place():
    # One set of indices for every anchor, expanded (stride 0): the same results as the materialised (B, K)
    # indices, and the kernel reads them through their strides (no B x K copy).
    B, K, M = 6, 5000, 300
    a, p, n, _ = make_inputs("indexed", B=B, K=0, d=7, dtype=torch.float64, M=M, seed=18)
    row = torch.randint(0, M, (1, K), generator=torch.Generator().manual_seed(5))
    expanded, full = row.expand(B, K), row.expand(B, K).contiguous()
    want = _run(cb.info_nce, a, p, n, full, temperature=0.3, reduction="none")
    with torch.profiler.profile(record_shapes=True) as prof:
        got = _run(cb.info_nce, a, p, n, expanded, temperature=0.3, reduction="none")
    assert_close_scaled(got[0], want[0], 1e-12, "loss", 0.0)
    for name, x, y in zip("apn", got[1], want[1]):
        assert_close_scaled(x, y, 1e-12, f"grad {name}", 0.0)
    copies = [e for e in prof.events() if e.name in ("aten::clone", "aten::contiguous") and [B, K] in e.input_shapes]
    assert copies == []


@pytest.mark.parametrize("device", DEVICES)
def test_int32_indices_and_targets_give_the_int64_results(device):
    # Documented (README: "int64 (or int32)"); no test used an int32 index before (accepting int64 only passed).
    g = torch.Generator().manual_seed(3)
    a, p, bank = (torch.randn(*s, generator=g, dtype=torch.float64).to(device) for s in ((4, 3), (4, 3), (9, 3)))
    idx = torch.randint(0, 9, (4, 5), generator=g).to(device)
    t = torch.tensor([0, 8, 3, 3], device=device)
    cases = ((lambda i, b: cb.info_nce(a, p, b, negative_indices=i), idx),
             (lambda i, b: cb.bank_cross_entropy(a, b, i), t))
    for call, i64 in cases:
        b1, b2 = bank.clone().requires_grad_(True), bank.clone().requires_grad_(True)
        l1, l2 = call(i64, b1), call(i64.int(), b2)
        assert torch.equal(l1, l2)
        (g1,), (g2,) = torch.autograd.grad(l1, [b1]), torch.autograd.grad(l2, [b2])
        assert torch.equal(g1, g2) and g1.abs().sum() > 0


def test_expanded_int32_indices_are_not_materialised():
    # int32 indices are widened to int64 for the op; an expanded (B, K) view of K indices must stay a view (its
    # (K,) values widened, then expanded): a plain .to(torch.int64) wrote all B K of them (2 GiB at B = 65536,
    # K = 4096).
    from contrastbound.functional import _as_int64

    idx = torch.arange(7, dtype=torch.int32)[None].expand(5, 7)
    wide = _as_int64(idx)
    assert wide.dtype == torch.int64 and wide.stride() == (0, 1) and torch.equal(wide, idx.long())
    col = torch.arange(5, dtype=torch.int32)[:, None].expand(5, 7)  # the other dimension expanded
    assert _as_int64(col).stride() == (1, 0) and torch.equal(_as_int64(col), col.long())
    plain = torch.randint(0, 9, (3, 4), dtype=torch.int32)
    assert torch.equal(_as_int64(plain), plain.long())
    g = torch.Generator().manual_seed(5)
    a, p, bank = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 3), (5, 3), (9, 3)))
    torch.testing.assert_close(cb.info_nce(a, p, bank, negative_indices=idx),
                               cb.info_nce(a, p, bank, negative_indices=idx.long()), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fallback_accumulates_half_inputs_in_float32(monkeypatch, dtype):
    # The pure-PyTorch fallback (no kernel for the device) takes half inputs to float32 as the kernels do: its
    # log-sum-exp and loss are float32 and within float32 rounding of float64 on the same rounded inputs (computed
    # in the half dtype they are ~1e-2 off).
    g = torch.Generator().manual_seed(4)
    a, p = (torch.randn(16, 40, generator=g).to(dtype) for _ in range(2))
    bank = torch.randn(3000, 40, generator=g).to(dtype)
    want_loss, want_lse = cb.info_nce_lse(a.double(), p.double(), bank.double(), temperature=0.05)
    monkeypatch.setattr(_backend, "kernel_serves", lambda device: False)
    loss, lse = cb.info_nce_lse(a, p, bank, temperature=0.05)
    assert loss.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), want_lse, rtol=2e-6, atol=0)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    full = cb.info_nce(a, p, bank, temperature=0.05, reduction="none")
    assert full.dtype == dtype
    torch.testing.assert_close(full.double(), want_loss, rtol=torch.finfo(dtype).eps, atol=0)  # rounded once


def test_bank_cross_entropy_half_target_row_below_the_norm_clamp():
    # A bfloat16 bank whose target row has norm ~7e-13 < 1e-12: F.normalize divides by the clamp and has no radial
    # term there; the target rows' float32 gradient (functional._target_rows_gradient) must follow it.
    g = torch.Generator().manual_seed(8)
    a = torch.randn(6, 24, generator=g)
    bank = torch.randn(50, 24, generator=g)
    bank[7] = bank[7] / bank[7].norm() * 7e-13  # n / max(norm, eps) has norm 0.7: a radial term would show
    bank = bank.to(torch.bfloat16)
    targets = torch.tensor([7, 7, 3, 7, 11, 7])
    b = bank.clone().requires_grad_(True)
    cb.bank_cross_entropy(a, b, targets, temperature=0.1, normalize=True, reduction="sum").backward()
    b64 = bank.double().requires_grad_(True)
    bank_cross_entropy_reference(a.double(), b64, targets, temperature=0.1, normalize=True, reduction="sum").backward()
    assert float(bank[7].double().norm()) < 1e-12
    # bfloat16's rounding of a row's gradient: ~2e-3 of its norm (here 2.6e-3 for row 7; 0.11 with a radial term)
    for row in (7, 3, 11):
        err = float((b.grad[row].double() - b64.grad[row]).norm() / b64.grad[row].norm())
        assert err < 8e-3, (row, err)


def test_shared_bank_gradient_summed_over_many_anchors():
    # A bank row's gradient sums over every anchor: added block after block (256 anchors each) its float32 error grew
    # like sqrt(blocks) (7.3e-6 relative at B = 10^6, where the float32 reference has 4.2e-6); the blocks are now
    # added with Kahan's compensation (9.0e-7). Asked: no worse than the reference in float32.
    g = torch.Generator().manual_seed(0)
    B, K, d = 1_000_000, 16, 4
    a = torch.randn(B, d, generator=g)
    p = a + 0.3 * torch.randn(B, d, generator=g)
    n = torch.randn(K, d, generator=g)

    def bank_grad(dtype, fused):
        x = n.to(dtype).clone().requires_grad_(True)  # a leaf of its own (n.to(float32) is n itself)
        fn = cb.info_nce if fused else info_nce_reference
        fn(a.to(dtype), p.to(dtype), x, temperature=0.01, reduction="sum").backward()
        return x.grad.double()

    want = bank_grad(torch.float64, False)
    err = float((bank_grad(torch.float32, True) - want).norm() / want.norm())
    naive = float((bank_grad(torch.float32, False) - want).norm() / want.norm())
    assert err <= naive, (err, naive)


def _dominant_row_problem(L: float):
    """One anchor (e_0, d = 4) and bank rows whose logits with it (temperature 1, normalize=False) are L (row 0, the
    dominant wrong row: softmax weight 0.9999), L - 9 (row 1), L - 40 (row 2, the target / positive) and 1, -2, 3;
    off-axis parts keep the rows distinct without changing those logits."""
    rows = torch.zeros(6, 4, dtype=torch.float64)
    rows[0, 0], rows[1, 0], rows[2, 0] = L, L - 9.0, L - 40.0
    rows[0, 1], rows[1, 2], rows[2, 3] = 0.3, 0.7, 0.5
    rows[3:, 0] = torch.tensor([1.0, -2.0, 3.0])
    return torch.tensor([[1.0, 0.0, 0.0, 0.0]]), rows.float()


_DOMINANT_CALLS = {  # (fused, naive) losses of (anchor, rows): the target is row 2, the negatives the others
    "shared": lambda a, r: cb.info_nce(a, r[2:3], torch.cat([r[:2], r[3:]]), temperature=1.0, normalize=False),
    "per_anchor": lambda a, r: cb.info_nce(a, r[2:3], torch.cat([r[:2], r[3:]])[None], temperature=1.0,
                                           normalize=False),
    "indexed": lambda a, r: cb.info_nce(a, r[2:3], r, negative_indices=torch.tensor([[0, 1, 3, 4, 5]]),
                                        temperature=1.0, normalize=False),
    "bank_cross_entropy": lambda a, r: cb.bank_cross_entropy(a, r, torch.tensor([2]), temperature=1.0,
                                                             normalize=False),
}


@pytest.mark.parametrize("mode", list(_DOMINANT_CALLS))
@pytest.mark.parametrize("L", [30.0, 3000.0, 30000.0])
def test_a_dominant_negative_at_large_logits_is_as_accurate_as_naive_float32(mode, L):
    """The dominant row's gradient (weight 1 - 1.2e-4) in float32 within 2x naive float32 PyTorch's error, both
    against float64 from the same float32 inputs. Backward weighs each logit by e^{l - lse}: with lse saved in
    float32 its rounding, eps |lse| ~ 2e-4 at L = 3e3, was in the weight (1.2e-4 relative where naive has 1.3e-8);
    the CPU op's lse is float64 now. (An audit's case.)"""
    a, rows = _dominant_row_problem(L)

    def naive(a_, r_):
        return F.cross_entropy(a_ @ r_.T, torch.tensor([2]))

    grads = {}
    for name, fn, x, r in (("fused", _DOMINANT_CALLS[mode], a, rows), ("naive", naive, a, rows),
                           ("exact", naive, a.double(), rows.double())):
        r = r.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(x, r), r)
        grads[name] = g[0].double()
    err = {k: ((grads[k] - grads["exact"]).norm() / grads["exact"].norm()).item() for k in ("fused", "naive")}
    assert err["fused"] <= 2 * err["naive"] + 1e-7, err


@pytest.mark.parametrize("L", [30.0, 3000.0, 30000.0])
def test_a_dominant_in_batch_positive_at_large_logits_is_as_accurate_as_naive_float32(L):
    """In-batch: anchor 0's logits with the positives are L - 40 (its own), L (sample 1's: weight 0.9999) and L - 9;
    the gradient of positive row 1 within 2x naive float32's error (it was 1.2e-4 where naive has 1.3e-8)."""
    a = torch.eye(3, 4)
    p = torch.zeros(3, 4, dtype=torch.float64)
    p[0, 0], p[1, 0], p[2, 0] = L - 40.0, L, L - 9.0
    p[0, 3], p[1, 1], p[2, 2] = 0.5, 1.0, 1.0
    p = p.float()

    def fused(a_, p_):
        return cb.info_nce(a_, p_, temperature=1.0, normalize=False, reduction="none")[0]

    def naive(a_, p_):
        return F.cross_entropy(a_ @ p_.T, torch.arange(3), reduction="none")[0]

    grads = {}
    for name, fn, x, q in (("fused", fused, a, p), ("naive", naive, a, p), ("exact", naive, a.double(), p.double())):
        q = q.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(x, q), q)
        grads[name] = g[1].double()
    err = {k: ((grads[k] - grads["exact"]).norm() / grads["exact"].norm()).item() for k in ("fused", "naive")}
    assert err["fused"] <= 2 * err["naive"] + 1e-7, err


def test_an_infinite_lse_weighs_finite_logits_zero_not_nan():
    """Backward forms e^{(l - hi) - res} with lse = hi + res; for an infinite lse the residual is 0, not inf - inf =
    NaN: a row whose lse is +inf (an overflowed sum) gives its finite logits weight 0, as e^{l - inf} does."""
    if not _backend.kernel_serves(torch.device("cpu")):
        pytest.skip("needs the CPU kernel")
    g = torch.Generator().manual_seed(3)
    a, p, n = (torch.randn(s, 5, generator=g) for s in (3, 3, 7))
    loss, lse, term = torch.ops.contrastbound.info_nce_fwd(a, p, n, None, 2.0, True, True, True)
    grad = torch.tensor([1.0, 0.5, 2.0])
    for dtype in (torch.float64, torch.float32):
        bad = lse.clone().to(dtype)
        bad[1] = torch.inf
        gn = torch.ops.contrastbound.info_nce_bwd(grad, a, p, n, None, bad, term, 2.0, True, True,
                                                  [False, False, True])[2]
        # row 1's terms vanish: the same as a zero upstream gradient for it
        want = torch.ops.contrastbound.info_nce_bwd(grad * torch.tensor([1.0, 0.0, 1.0]), a, p, n, None, lse, term,
                                                    2.0, True, True, [False, False, True])[2]
        assert torch.isfinite(gn).all(), dtype
        torch.testing.assert_close(gn, want, rtol=1e-6, atol=1e-7)


def test_target_rows_gradient_with_an_infinite_lse_has_no_nan():
    """bank_cross_entropy's half-bank target rows (functional._target_rows_gradient) split lse into hi + res as the
    kernel does; an infinite lse gives residual 0 (not inf - inf = NaN), so that anchor's terms weigh 0."""
    from contrastbound.functional import _target_rows_gradient

    g = torch.Generator().manual_seed(6)
    a, bank = torch.randn(4, 8, generator=g).bfloat16(), torch.randn(30, 8, generator=g).bfloat16()
    rows, loss, grad = torch.tensor([3, 7, 3, 11]), torch.rand(4, generator=g), torch.ones(4)
    lse = torch.randn(4, generator=g, dtype=torch.float64)
    out = {}
    for value in (torch.inf, 1e30):
        bad = lse.clone()
        bad[1] = value
        out[value] = _target_rows_gradient(a, bank, rows, bad, loss, grad, 2.0, True)
    torch.testing.assert_close(out[torch.inf][0], out[1e30][0])
    assert torch.isfinite(out[torch.inf][1]).all()
    torch.testing.assert_close(out[torch.inf][1], out[1e30][1])


@pytest.mark.parametrize("route", ["one call", "two calls"])
def test_clip_reference_is_clip_loss(monkeypatch, route):
    # reference.clip_reference (materialised N x N logits, for users' own tests) against clip_loss and against the
    # definition spelt out here: each direction's cross-entropy over s I T^T with the clamp at max_logit_scale;
    # values and gradients (the features' and a tensor logit scale's, zero once the clamp binds), every reduction
    from contrastbound.reference import clip_reference

    if route == "two calls":
        monkeypatch.setattr(_backend, "clip_kernel_serves", lambda device: False)
    g = torch.Generator().manual_seed(4)
    img, txt = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    for scale_value, normalize, reduction in ((7.0, True, "mean"), (150.0, True, "sum"), (0.4, False, "none")):
        grads = []
        for fn in (cb.clip_loss, clip_reference, "definition"):
            i, t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
            scale = torch.tensor(scale_value, dtype=torch.float64, requires_grad=True)
            if fn == "definition":
                a, b = (F.normalize(i, dim=-1), F.normalize(t, dim=-1)) if normalize else (i, t)
                logits = min(scale_value, 100.0) / scale_value * scale * a @ b.T
                y = torch.arange(9)
                per_pair = (F.cross_entropy(logits, y, reduction="none") + F.cross_entropy(logits.T, y,
                                                                                          reduction="none")) / 2
                loss = {"mean": per_pair.mean(), "sum": per_pair.sum(), "none": per_pair}[reduction]
            else:
                loss = fn(i, t, scale, normalize=normalize, reduction=reduction)
            loss.sum().backward()
            grads.append((loss.detach(), i.grad, t.grad, scale.grad))
        if scale_value > 100:  # the clamp binds: no gradient to the scale
            assert float(grads[0][3]) == 0.0 and float(grads[1][3]) == 0.0
            grads = [g_[:3] for g_ in grads]
        for got in grads[:2]:
            for x, want in zip(got, grads[2]):
                torch.testing.assert_close(x, want, rtol=1e-10, atol=1e-12)
    # a float scale: clamped as a tensor one (150 -> 100), as clip_loss
    torch.testing.assert_close(clip_reference(img, txt, 150.0), clip_reference(img, txt, 100.0), rtol=0, atol=0)
    torch.testing.assert_close(clip_reference(img, txt, 150.0), cb.clip_loss(img, txt, 150.0), rtol=1e-12, atol=0)
    # half inputs computed in float32 and returned in their dtype
    i16, t16 = img.to(torch.bfloat16), txt.to(torch.bfloat16)
    got = clip_reference(i16, t16, 7.0, reduction="none")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, clip_reference(i16.float(), t16.float(), 7.0, reduction="none").bfloat16())
    torch.testing.assert_close(got, cb.clip_loss(i16, t16, 7.0, reduction="none"), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("route", ["one call", "two calls"])
def test_clip_loss_of_float64_features_takes_a_float32_logit_scale_exactly(monkeypatch, route):
    # The two-call route (CUDA, process_group, no CPU clip kernel) took its temperature as 1 / scale in float32, the
    # scale's dtype: float64 losses 1.2e-7 off the float64 reference at that scale's value (a distributed fuzz's
    # find); the one-call route and the other losses widen the scale to the features' dtype first
    from contrastbound.reference import clip_reference

    if route == "two calls":
        monkeypatch.setattr(_backend, "clip_kernel_serves", lambda device: False)
    g = torch.Generator().manual_seed(0)
    img, txt = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(2))
    for value in (3.7, 0.3, 41.9):
        s32 = torch.tensor(value)
        got = cb.clip_loss(img, txt, s32, reduction="none")
        torch.testing.assert_close(got, clip_reference(img, txt, s32.double(), reduction="none"), rtol=1e-12,
                                   atol=1e-13)


@pytest.mark.parametrize("route", ["one call", "two calls"])
def test_clip_loss_half_precision_is_rounded_once(monkeypatch, route):
    # clip_loss's two-call route (on CUDA, with a process_group, or without the CPU clip kernel) took each
    # direction's per-pair losses back in bfloat16, then averaged and reduced them there: per-pair errors up to
    # 0.117 (a double rounding) where the one-call route has 0.062, each within half a bfloat16 ulp of float64 now
    if route == "two calls":
        monkeypatch.setattr(_backend, "clip_kernel_serves", lambda device: False)
    g = torch.Generator().manual_seed(0)
    for seed in range(4):
        i, t = (torch.randn(512, 32, generator=g).bfloat16() for _ in range(2))
        a, b = F.normalize(i.double(), dim=-1), F.normalize(t.double(), dim=-1)
        logits, y = 20.0 * a @ b.T, torch.arange(512)
        want = 0.5 * (F.cross_entropy(logits, y, reduction="none") + F.cross_entropy(logits.T, y, reduction="none"))
        for reduction, w in (("none", want), ("mean", want.mean()), ("sum", want.sum())):
            got = cb.clip_loss(i, t, 20.0, reduction=reduction)
            assert got.dtype == torch.bfloat16
            half_ulp = torch.exp2(torch.floor(torch.log2(w.abs())) - 8)  # bfloat16: 8 significant bits
            assert ((got.double() - w).abs() <= half_ulp + 1e-5 * w.abs()).all(), (route, reduction, seed)


def _clip_written_out(img, txt, scale, reduction="mean"):
    """CLIP's loss as open_clip writes it: the N x N logits, cross-entropy both ways, averaged."""
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = scale * img @ txt.T
    target = torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(logits, target, reduction=reduction)
                  + F.cross_entropy(logits.T, target, reduction=reduction))


def test_clip_module_learns_its_logit_scale():
    import copy

    torch.manual_seed(3)
    img, txt = torch.randn(11, 6, dtype=torch.float64), torch.randn(11, 6, dtype=torch.float64)
    module = cb.ClipLoss().double()
    assert [name for name, _ in module.named_parameters()] == ["log_logit_scale"]
    assert abs(as_float(module.logit_scale) - 1 / 0.07) < 1e-6  # CLIP's 0.07 (a float32 parameter)
    module(img, txt).backward()
    log_s = module.log_logit_scale.detach().clone().requires_grad_(True)
    want = _clip_written_out(img, txt, log_s.exp())
    want.backward()
    torch.testing.assert_close(module(img, txt), want.detach())
    torch.testing.assert_close(module.log_logit_scale.grad, log_s.grad)
    # an optimiser step moves it; reset_parameters restores it; a copy (EMA / teacher) owns its own parameter
    torch.optim.SGD(module.parameters(), lr=0.5).step()
    assert abs(as_float(module.logit_scale) - 1 / 0.07) > 1e-3
    twin = copy.deepcopy(module)
    assert twin.log_logit_scale is not module.log_logit_scale
    module.reset_parameters()
    assert abs(as_float(module.logit_scale) - 1 / 0.07) < 1e-12  # (filled in float64 now)
    # an optimiser step past max_logit_scale: the forward clamps the parameter in place to log(100), as open_clip
    # clamps after each step, and the gradient flows there (a clamp inside the forward froze it for good: a review)
    clamped = cb.ClipLoss().double()
    with torch.no_grad():
        clamped.log_logit_scale.fill_(math.log(100.0) + 0.01)
    log_cap = torch.tensor(math.log(100.0), dtype=torch.float64, requires_grad=True)
    want = _clip_written_out(img, txt, log_cap.exp())
    want.backward()
    got = clamped(img, txt)
    got.backward()
    assert float(clamped.log_logit_scale.detach()) == math.log(100.0)
    torch.testing.assert_close(got, want.detach())
    torch.testing.assert_close(clamped.log_logit_scale.grad, log_cap.grad)
    assert float(clamped.log_logit_scale.grad) != 0.0
    # that clamp is in place (README) but leaves autograd's version counter alone: a use of the parameter recorded
    # before the forward (a penalty computed first) met torch's in-place check at backward on every forward (two
    # audits); used before or after, the same gradient, the loss's plus the penalty's 2e-3 log s
    grads = []
    for penalty_first in (False, True):
        m = cb.ClipLoss().double()
        penalty = 1e-3 * m.log_logit_scale ** 2 if penalty_first else None
        loss = m(img, txt)
        (loss + (penalty if penalty_first else 1e-3 * m.log_logit_scale ** 2)).backward()
        grads.append(m.log_logit_scale.grad.clone())
    log_s = torch.tensor(math.log(1 / 0.07), dtype=torch.float32).double().requires_grad_(True)
    (_clip_written_out(img, txt, log_s.exp()) + 1e-3 * log_s ** 2).backward()
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], log_s.grad)
    # where the clamp binds, a penalty computed first had the uncapped value in its forward and takes the capped one
    # in its backward (README: no read-back, so no error; its gradient is taken at the cap)
    capped = cb.ClipLoss().double()
    with torch.no_grad():
        capped.log_logit_scale.fill_(math.log(100.0) + 0.5)
    penalty = capped.log_logit_scale ** 2
    assert float(penalty.detach()) == pytest.approx((math.log(100.0) + 0.5) ** 2)
    (penalty + capped(img, txt)).backward()
    torch.testing.assert_close(capped.log_logit_scale.grad, log_cap.grad + 2 * math.log(100.0))
    with pytest.raises(ValueError, match=r"logit_scale \(150\) must be at most max_logit_scale \(100\)"):
        cb.ClipLoss(logit_scale=150.0)
    wider = cb.ClipLoss(logit_scale=150.0, max_logit_scale=200.0).double()
    torch.testing.assert_close(wider(img, txt), _clip_written_out(img, txt, wider.logit_scale.detach()))
    assert abs(float(wider.logit_scale.detach()) - 150.0) < 1e-4


def test_clip_module_under_vmap_of_an_ensemble():
    # torch.func's ensembling recipe (stack_module_state, functional_call under vmap) failed in ClipLoss's forward:
    # "accessing 'data' under vmap transform is not allowed" (an audit). Under a transform the value used is
    # capped, with the in-place clamp's gradient (the capped value's), and the stacked parameters are left alone.
    import copy

    from torch.func import functional_call, grad, stack_module_state, vmap

    torch.manual_seed(5)
    img, txt = torch.randn(3, 7, 5, dtype=torch.float64), torch.randn(3, 7, 5, dtype=torch.float64)
    members = [cb.ClipLoss(10.0).double(), cb.ClipLoss(50.0).double(), cb.ClipLoss().double()]
    with torch.no_grad():
        members[2].log_logit_scale.fill_(math.log(300.0))  # past the cap of 100, as an optimiser step can take it
    params, buffers = stack_module_state(copy.deepcopy(members))
    base = copy.deepcopy(members[0]).to("meta")

    def loss(p, b, i, t):
        return functional_call(base, (p, b), (i, t))

    got = vmap(loss)(params, buffers, img, txt)
    got_grad = vmap(grad(loss))(params, buffers, img, txt)["log_logit_scale"]
    assert as_float(params["log_logit_scale"][2]) == math.log(300.0)  # (not clamped in place under the transform)
    for k, member in enumerate(members):
        want = member(img[k], txt[k])  # (eager: the third clamps its parameter to log(100) in place)
        want.backward()
        torch.testing.assert_close(got[k], want.detach())
        torch.testing.assert_close(got_grad[k], member.log_logit_scale.grad)
    log_cap = torch.tensor(math.log(100.0), dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(got[2], _clip_written_out(img[2], txt[2], log_cap.exp()).detach())


def test_clip_module_fixed_scale_options_and_errors():
    torch.manual_seed(4)
    img, txt = torch.randn(7, 5), torch.randn(7, 5)
    fixed = cb.ClipLoss(20.0, learnable=False, reduction="none")
    assert list(fixed.state_dict()) == [] and fixed.logit_scale == 20.0 and "learnable=False" in repr(fixed)
    got = fixed(img, txt)
    assert got.shape == (7,)
    torch.testing.assert_close(got, _clip_written_out(img, txt, 20.0, reduction="none"))
    raw = cb.ClipLoss(20.0, learnable=False, normalize=False, reduction="sum")
    torch.testing.assert_close(raw(img, txt), cb.clip_loss(img, txt, 20.0, normalize=False, reduction="sum"))
    # a fixed scale above the default cap with its own max_logit_scale: the module's cap reaches clip_loss (which
    # would clamp at 100), and a scale equal to the cap, CLIP's usual end state, is taken (a mutation audit's gaps)
    wide = cb.ClipLoss(150.0, learnable=False, max_logit_scale=200.0)
    torch.testing.assert_close(wide(img, txt), cb.clip_loss(img, txt, 150.0, max_logit_scale=200.0))
    assert not torch.allclose(wide(img, txt), cb.clip_loss(img, txt, 150.0))
    for module in (cb.ClipLoss(100.0), cb.ClipLoss(100.0, learnable=False), cb.ClipLoss(50.0, max_logit_scale=50.0)):
        assert abs(as_float(module.logit_scale) - module.max_logit_scale) < 1e-4 * module.max_logit_scale
        module.logit_scale = module.max_logit_scale
    with torch.device("meta"):
        deferred = cb.ClipLoss(25.0)
    assert "logit_scale=(meta)" in repr(deferred)
    deferred.to_empty(device="cpu")
    deferred.reset_parameters()
    assert float(deferred.logit_scale.detach()) == pytest.approx(25.0)
    for bad, exc, match in ((torch.tensor(3.0), TypeError, "ClipLoss takes logit_scale as a number"),
                            (True, TypeError, "logit_scale as a number"), (-1.0, ValueError, "logit_scale must be"),
                            (float("nan"), ValueError, "logit_scale must be"), (1e39, ValueError, "range")):
        with pytest.raises(exc, match=match):
            cb.ClipLoss(bad, max_logit_scale=1e300)
    # values the forward would refuse are refused here (a review: built, then raised at the first call)
    for bad, exc, match in ((dict(max_logit_scale=1e-320), ValueError, "max_logit_scale must be at least"),
                            (dict(logit_scale=1e-320, learnable=False), ValueError, "logit_scale must be at least"),
                            (dict(logit_scale=1e-40), ValueError, "from 2.94e-39")):
        with pytest.raises(exc, match=match):
            cb.ClipLoss(**bad)
    for kw, exc, match in ((dict(max_logit_scale=0.0), ValueError, "max_logit_scale"),
                           (dict(max_logit_scale="100"), TypeError, "max_logit_scale"),
                           (dict(learnable=1), TypeError, "learnable"),
                           (dict(reduction="avg"), ValueError, "reduction")):
        with pytest.raises(exc, match=match):
            cb.ClipLoss(**kw)


@pytest.mark.parametrize("module_type", ["clip", "siglip"])
@pytest.mark.parametrize("learnable", [True, False])
def test_logit_scale_can_be_set(module_type, learnable):
    # module.logit_scale = s (a schedule): the next forward uses s; a learnable scale's parameter takes log s in place
    # (the optimiser's state stays attached to it); checked as at construction, named by the argument
    torch.manual_seed(6)
    img, txt = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    if module_type == "clip":
        module, call = cb.ClipLoss(learnable=learnable).double(), lambda s: cb.clip_loss(img, txt, s)
    else:
        module, call = cb.SigLIP(learnable=learnable).double(), lambda s: cb.siglip_loss(img, txt, s, -10.0)
    param = module.log_logit_scale if learnable else None
    before = module(img, txt).detach()
    for value in (30.0, torch.tensor(42.0), torch.tensor([7.5], dtype=torch.float64)):
        module.logit_scale = value
        s = float(value)
        assert float(torch.as_tensor(module.logit_scale).detach()) == pytest.approx(s, rel=1e-12)
        torch.testing.assert_close(module(img, txt).detach(), call(s))
    assert not torch.equal(before, module(img, txt).detach())
    if learnable:
        assert module.log_logit_scale is param and list(dict(module.named_parameters())) == ["log_logit_scale"] + (
            ["logit_bias"] if module_type == "siglip" else [])
    for bad, exc, match in ((0.0, ValueError, "logit_scale must be a positive finite number"),
                            (math.inf, ValueError, "logit_scale must be a positive finite number"),
                            ("10", TypeError, "logit_scale must be a positive number"),
                            (True, TypeError, "logit_scale must be a positive number"),
                            (torch.tensor([1.0, 2.0]), TypeError, "one element"),
                            (torch.tensor(3, dtype=torch.int64), TypeError, "one element"),
                            (torch.tensor(3.0, requires_grad=True), ValueError, "would never be learned"),
                            (torch.nn.Parameter(torch.tensor(3.0)), ValueError, "would never be learned"),
                            (torch.tensor(3.0, device="meta"), ValueError, "meta tensor")):
        with pytest.raises(exc, match=match):
            module.logit_scale = bad
    assert float(torch.as_tensor(module.logit_scale).detach()) == pytest.approx(7.5, rel=1e-12)  # unchanged
    if module_type == "clip":  # at most max_logit_scale (100), as the initial value
        with pytest.raises(ValueError, match=r"logit_scale \(150\) must be at most max_logit_scale \(100\)"):
            module.logit_scale = 150.0
    if learnable:  # the parameter's dtype bounds what it can hold
        small = (cb.ClipLoss(max_logit_scale=1e300) if module_type == "clip" else cb.SigLIP())
        with pytest.raises(ValueError, match="learns log\\(logit_scale\\) in torch.float32"):
            small.logit_scale = 1e39
        if module_type == "siglip":  # nor below: log(1e-46) is held, but its exp in float32 is 0 (a mutation audit)
            kept = small.log_logit_scale.detach().clone()
            with pytest.raises(ValueError, match="learns log\\(logit_scale\\) in torch.float32"):
                small.logit_scale = 1e-46
            assert torch.equal(small.log_logit_scale.detach(), kept)
        small.double().logit_scale = 1e39  # float64 holds it
        # on the meta device (FSDP's deferred initialisation) the value set is the one to_empty + reset_parameters
        # gives (a fill on meta writes nothing)
        with torch.device("meta"):
            deferred = cb.ClipLoss() if module_type == "clip" else cb.SigLIP(logit_bias=-3.0)
        deferred.logit_scale = 12.5
        deferred.to_empty(device="cpu")
        deferred.reset_parameters()
        assert float(deferred.logit_scale.detach()) == pytest.approx(12.5)
        if module_type == "siglip":
            assert float(deferred.logit_bias.detach()) == -3.0
    with pytest.raises(TypeError, match="logit_scale must be a dense"):
        module.logit_scale = torch.tensor([3.0]).to_sparse()


@pytest.mark.parametrize("learnable", [True, False])
def test_siglip_logit_bias_can_be_set(learnable):
    # module.logit_bias = b (a number): the next forward uses b; a learnable bias's parameter takes it in place (the
    # optimiser's state stays attached; torch's own assignment raised TypeError); checked as at construction
    torch.manual_seed(7)
    img, txt = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    module = cb.SigLIP(logit_scale=8.0, learnable=learnable).double()
    param = module.logit_bias if learnable else None
    before = module(img, txt).detach()
    module.logit_bias = -3.5
    assert as_float(module.logit_bias) == -3.5
    torch.testing.assert_close(module(img, txt).detach(), cb.siglip_loss(img, txt, 8.0, -3.5))
    assert not torch.equal(before, module(img, txt).detach())
    if learnable:
        assert module.logit_bias is param and isinstance(module.logit_bias, torch.nn.Parameter)
        assert list(dict(module.named_parameters())) == ["log_logit_scale", "logit_bias"]
        assert as_float(module.state_dict()["logit_bias"]) == -3.5
    for bad, exc, match in ((math.inf, ValueError, "logit_bias must be a finite number"),
                            (math.nan, ValueError, "logit_bias must be a finite number"),
                            ("-3", TypeError, "logit_bias must be a finite number or a scalar tensor"),
                            (True, TypeError, "logit_bias must be a finite number or a scalar tensor")):
        with pytest.raises(exc, match=match):
            module.logit_bias = bad
    assert as_float(module.logit_bias) == -3.5  # unchanged
    if learnable:
        with pytest.raises(ValueError, match=r"learns logit_bias in torch.float32: logit_bias -1e\+39"):
            cb.SigLIP().logit_bias = -1e39
        module.logit_bias = -1e39  # (the float64 module holds it)
        # a parameter is torch's assignment, as it is (a new parameter replaces the old one)
        module.logit_bias = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        assert module.logit_bias is not param and as_float(module.logit_bias) == 2.0
        # on the meta device the value set is the one to_empty + reset_parameters gives
        with torch.device("meta"):
            deferred = cb.SigLIP(logit_scale=4.0)
        deferred.logit_bias = -6.0
        deferred.to_empty(device="cpu")
        deferred.reset_parameters()
        assert float(deferred.logit_bias.detach()) == -6.0 and float(deferred.logit_scale.detach()) == pytest.approx(4)
    # where the parameter is gone (deleted, pruned, FSDP's views), and for None, torch's own assignment, as before
    gone = cb.SigLIP(learnable=learnable)
    del gone.logit_bias
    gone.logit_bias = -2.0
    assert gone.logit_bias == -2.0 and "logit_bias" not in dict(gone.named_parameters())
    gone.logit_bias = None
    assert gone.logit_bias is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_features_of_size_zero_give_log_of_one_plus_k_in_every_mode(dtype):
    # d = 0: every logit is 0, so loss_i = log(1 + K_i) (K_i the negatives anchor i keeps). Per-anchor and indexed
    # negatives lost negatives (an empty tensor's null data pointer read as padding): log 4 came out 0 (an audit).
    B, K, M = 3, 4, 6
    a, p = torch.randn(B, 0, dtype=dtype, requires_grad=True), torch.randn(B, 0, dtype=dtype)
    idx = torch.tensor([[0, 5, 5, 2], [1, -1, 3, -1], [-1, -1, -1, -1]])
    mask = torch.tensor([[True, False, True, True], [True, True, True, True], [False, False, False, False]])
    kept = lambda m: torch.log1p(m.sum(1).double())  # noqa: E731
    cases = [
        (dict(negatives=torch.randn(K, 0, dtype=dtype)), torch.full((B,), math.log(1 + K))),
        (dict(negatives=torch.randn(B, K, 0, dtype=dtype)), torch.full((B,), math.log(1 + K))),
        (dict(negatives=torch.randn(M, 0, dtype=dtype), negative_indices=idx), kept(idx >= 0)),
        (dict(negatives=torch.randn(M, 0, dtype=dtype), negative_indices=idx.clamp(min=0)),
         torch.full((B,), math.log(5))),
        (dict(negatives=torch.randn(K, 0, dtype=dtype), negative_mask=mask), kept(mask)),
        (dict(negatives=torch.randn(B, K, 0, dtype=dtype), negative_mask=mask), kept(mask)),
        (dict(negatives=None), torch.full((B,), math.log(B))),
    ]
    for kw, want in cases:
        negatives = kw.pop("negatives")
        got = cb.info_nce(a, p, negatives, reduction="none", **kw)
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-6  # (the loss in the inputs' dtype)
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol, msg=str(kw.keys()))
        ref = info_nce_reference(a.detach().double(), p.double(), None if negatives is None else negatives.double(),
                                 reduction="none", **kw)
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
        (g,) = torch.autograd.grad(got.sum(), [a])
        assert g.shape == (B, 0)


# From a mutation audit of functional.py (2026-12-06): each fails on the mutant it was written for.
def test_float32_row_past_float16s_range_with_zero_entries_against_a_float16_bank():
    # _to_bank_dtype normalises a row before the cast to a narrower bank whenever it is not all zero: a row with
    # some zero entries and others past float16's range (65504) must not become inf (a NaN loss).
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 8, generator=g)
    a[0] = 0.0
    a[0, :4] = 1e5
    p = torch.randn(3, 8, generator=g)
    bank = torch.randn(16, 8, generator=g).half()
    got = cb.info_nce(a, p, bank, 0.1, reduction="none")
    want = cb.info_nce(a.double(), p.double(), bank.double(), 0.1, reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3)


def test_label_smoothing_with_a_half_bank_widened_in_chunks():
    # A bfloat16 bank of more than 2^22 values: _mean_row and the mean row's gradient widen it a chunk of rows at a
    # time (_row_chunks); every row, the last of each chunk included, gets label smoothing's share of the gradient.
    g = torch.Generator().manual_seed(0)
    C, d = (1 << 16) + 3, 64  # chunks of 2^16 rows: [0, 65536) and [65536, C)
    bank = torch.randn(C, d, generator=g).bfloat16().requires_grad_()
    a = torch.randn(3, d, generator=g).bfloat16().requires_grad_()
    targets = torch.tensor([0, C - 1, 5])
    loss = cb.bank_cross_entropy(a, bank, targets, 1.0, normalize=True, label_smoothing=0.5)
    (gb,) = torch.autograd.grad(loss, bank)
    a64, b64 = a.detach().double(), bank.detach().double().requires_grad_()
    want = F.cross_entropy(F.normalize(a64, dim=-1) @ F.normalize(b64, dim=-1).T, targets, label_smoothing=0.5)
    (wb,) = torch.autograd.grad(want, b64)
    torch.testing.assert_close(loss.double(), want, rtol=1e-2, atol=0.0)
    for row in (65534, 65535, 65536, C - 2, C - 1):
        err = (gb[row].double() - wb[row]).norm() / wb[row].norm()
        assert err < 0.05, (row, err)


@pytest.mark.parametrize("C", [1 << 16, 1 << 18])
def test_label_smoothing_mean_row_of_many_equal_rows_keeps_float32_accuracy(C):
    # Every bank row the same: every logit is s = 20, so the loss is log C exactly, label smoothing or not. The mean
    # row (its logit is smoothing's term) was one float32 product b^T (1 / |b|) summed along C: relative error
    # 4.5e-4 at C = 2^16 and 2e-3 at 2^18, which moved the loss by 1.6e-3 (a differential fuzz's find). Allowed: a
    # few float32 roundings of logits of size 20 (8 eps 20 = 1.9e-5).
    g = torch.Generator().manual_seed(0)
    d = 4
    bank = torch.randn(1, d, generator=g).expand(C, d).contiguous()
    a = torch.randn(2, d, generator=g)
    loss = cb.bank_cross_entropy(a, bank, torch.tensor([0, 1]), 0.05, normalize=True, reduction="none",
                                 label_smoothing=0.1)
    assert (loss.double() - math.log(C)).abs().max() < 8 * torch.finfo(torch.float32).eps * 20


@pytest.mark.parametrize("normalize", [False, True])
def test_label_smoothing_on_the_reference_path_matches_cross_entropy(monkeypatch, normalize):
    # Without the kernels (no extension, a GPU build without them, forward-mode AD, torch.func) label smoothing's
    # term comes from _target_less_mean_logit: l_t - mean_c l_c, the mean row the bank's (normalised rows') mean.
    from contrastbound import _backend

    g = torch.Generator().manual_seed(0)
    bank = torch.randn(5, 8, generator=g, dtype=torch.float64)
    a = torch.randn(4, 8, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 1, 4, 2])
    an, bn = (F.normalize(a, dim=-1), F.normalize(bank, dim=-1)) if normalize else (a, bank)
    want = F.cross_entropy(an @ bn.T / 0.5, targets, label_smoothing=0.4, reduction="none")
    monkeypatch.setattr(_backend, "kernel_serves", lambda device: False)
    got = cb.bank_cross_entropy(a, bank, targets, 0.5, normalize=normalize, label_smoothing=0.4, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_label_smoothing_on_the_reference_path_rounds_a_float32_temperatures_gradient_once(monkeypatch):
    # On the reference path label smoothing uses t twice (_fused and _target_less_mean_logit): with float64
    # features a float32 temperature's two gradient parts (+-0.85, sum 8e-3) are summed in float64, rounded once.
    from contrastbound import _backend

    g = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 16, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 50, (64,), generator=g)
    anchors = bank[targets] + 0.3 * torch.randn(64, 16, generator=g, dtype=torch.float64)
    monkeypatch.setattr(_backend, "kernel_serves", lambda device: False)

    def grad(dtype):
        t = torch.tensor(1.0, dtype=dtype, requires_grad=True)
        cb.bank_cross_entropy(anchors, bank, targets, t, normalize=True, label_smoothing=0.9).backward()
        return t.grad.double()

    got, want = grad(torch.float32), grad(torch.float64)
    assert abs(got - want) <= 4 * torch.finfo(torch.float32).eps * abs(want), (got, want)


def test_info_nce_lse_of_an_anchor_without_negatives_or_positive_has_no_gradient():
    # include_positive=False and an anchor whose negatives are all padding: lse = -inf, the log-sum-exp of nothing,
    # does not depend on the features (gradient 0, as torch.logsumexp's); the other anchors keep theirs.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 8, generator=g, dtype=torch.float64).requires_grad_()
    p = torch.randn(3, 8, generator=g, dtype=torch.float64)
    bank = torch.randn(5, 8, generator=g, dtype=torch.float64)
    idx = torch.tensor([[0, 2], [-1, -1], [4, -1]])
    _, lse = cb.info_nce_lse(a, p, bank, negative_indices=idx, include_positive=False)
    assert torch.isneginf(lse[1]) and torch.isfinite(lse[[0, 2]]).all()
    (grad,) = torch.autograd.grad(lse[1], a)
    assert torch.equal(grad, torch.zeros_like(a))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [False, True])
def test_label_smoothing_of_one_class_on_the_reference_path_is_exactly_zero(monkeypatch, dtype, normalize):
    # One class: l_t - mean_c l_c is 0, so the reference path (as the kernel path) adds no smoothing term, whose two
    # paths' rounding would leave a gradient (up to 32 here) where the loss is 0 whatever the inputs.
    from contrastbound import _backend

    monkeypatch.setattr(_backend, "kernel_serves", lambda device: False)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        a = (torch.randn(5, 7, generator=g) * 10.0 ** torch.randint(-3, 4, (5, 1), generator=g)).to(dtype)
        bank = (torch.randn(1, 7, generator=g) * 10.0 ** (seed % 7 - 3)).to(dtype).requires_grad_()
        a.requires_grad_()
        t = torch.tensor(0.3, requires_grad=True)
        loss = cb.bank_cross_entropy(a, bank, torch.zeros(5, dtype=torch.long), t, normalize=normalize,
                                     label_smoothing=0.7, reduction="none")
        for x, gx in zip((a, bank, t), torch.autograd.grad(loss.sum(), (a, bank, t))):
            assert torch.equal(gx, torch.zeros_like(x)), (seed, gx)
        assert torch.equal(loss, torch.zeros_like(loss))


@pytest.mark.parametrize("used", ["loss", "lse", "both"])
@pytest.mark.parametrize("mode", MODES)
def test_info_nce_lse_backward_calls_the_backward_op_once_per_gradient_used(monkeypatch, mode, used):
    # An output outside the graph reached the op's backward as zeros (autograd materialises them), and backward
    # took its both-gradients path: three backward-op calls where one is the work (a static review's find). Both
    # used: one call each for the anchors' and positives' gradients, one for the negatives'.
    from contrastbound import functional

    calls = []
    real = functional._bwd_op
    monkeypatch.setattr(functional, "_bwd_op", lambda *args: calls.append(1) or real(*args))
    a, p, n, idx = make_inputs(mode, B=5, K=11, d=7, dtype=torch.float64, M=9)
    leaves = [x for x in (a, p, n) if x is not None]
    loss, lse = cb.info_nce_lse(a, p, n, 0.3, negative_indices=idx)
    out = {"loss": loss.sum(), "lse": lse.sum(), "both": loss.sum() + 0.5 * lse.sum()}[used]
    got = torch.autograd.grad(out, leaves)
    assert len(calls) == (3 if used == "both" else 1)
    from contrastbound.reference import info_nce_core_reference  # the same gradients as the reference's

    n_ = p if mode == "in_batch" else n
    loss_r, lse_r = info_nce_core_reference(a, p, n_, idx, 1 / 0.3, True, True, mode == "in_batch")
    want_out = {"loss": loss_r.sum(), "lse": lse_r.sum(), "both": loss_r.sum() + 0.5 * lse_r.sum()}[used]
    want = torch.autograd.grad(want_out, leaves)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-10, atol=1e-12)
