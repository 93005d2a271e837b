"""The CUDA kernels against the CPU kernel and the float64 reference (skipped without a GPU).

Every test here is marked ``cuda``; conftest.py skips them where torch.cuda.is_available() is False. They are
the first run of the CUDA path on hardware: scripts/gpu_check.sh runs them after building the extension.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import contrastbound as cb
from contrastbound import _backend
from contrastbound.reference import info_nce_reference

from conftest import (
    DTYPES, MODES, PACKAGE_ROOT, CUDA_TOL, assert_close_scaled, loss_and_grads as _run, make_inputs, package_env,
)

pytestmark = pytest.mark.cuda

CUDA = "cuda"


def _leaves_on(device, dtype, *xs):
    return [None if x is None else x.detach().to(device=device, dtype=dtype).requires_grad_(True) for x in xs]


# Relative Frobenius error of a CUDA gradient against the float64 reference, in every mode (_compare). The
# elementwise check above it is absolute below magnitude 1 (assert_close_scaled's CUDA floor), and the gradients of
# these problems are 0.01-0.07 at most: an all-zero bfloat16 gradient passed it (a test audit, 2026-12-02). The
# half tolerances are twice TC_REL (set on hardware for the tensor-core paths); float32 runs without TF32 here
# (conftest: matmul precision "highest"). Not yet run on a GPU with this check.
GRAD_REL = {torch.float64: 1e-8, torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 8e-3}
# _rel_err's floor (an RMS) per dtype: GRAD_REL x floor is the absolute error allowed where the reference vanishes
# (d = 1 with normalisation: the projection removes the whole gradient). float64: 1e-15, ~5 eps64 at weights
# ~1 / T = 2; the kernels' residue there was 2.1e-16 on an H200, which the earlier floor of 1e-9 (1e-17 allowed,
# below float64's rounding of the terms) failed in test_tiny_sizes. An all-zero gradient still fails wherever the
# true one has an RMS above 1e-15 (float64) or 1e-12 (float32) / 1e-11 (half).
GRAD_FLOOR = {torch.float64: 1e-7, torch.float32: 1e-9, torch.bfloat16: 1e-9, torch.float16: 1e-9}


def _compare(a, p, n, idx, dtype, check_cpu=True, **kw):
    """CUDA kernel vs the float64 reference (CUDA_TOL[dtype] per element, GRAD_REL[dtype] per gradient as a whole) and vs
    the CPU kernel in the same dtype."""
    loss, grads = _run(cb.info_nce, a, p, n, idx, **kw)
    assert loss.device.type == "cuda" and loss.dtype == dtype
    idx_cpu = None if idx is None else idx.cpu()
    ref_loss, ref_grads = _run(info_nce_reference, *_leaves_on("cpu", torch.float64, a, p, n), idx_cpu, **kw)
    assert_close_scaled(loss, ref_loss, CUDA_TOL[dtype], "loss vs reference")
    for name, g, r in zip("apn", grads, ref_grads):
        assert g.dtype == dtype and g.device.type == "cuda" and g.shape == r.shape
        assert_close_scaled(g, r, CUDA_TOL[dtype], f"grad {name} vs reference")
        err = _rel_err(g, r, floor_rms=GRAD_FLOOR[dtype])
        assert err <= GRAD_REL[dtype], f"grad {name} vs reference: relative norm error {err:.3g} > {GRAD_REL[dtype]}"
    if check_cpu:
        cpu_loss, cpu_grads = _run(cb.info_nce, *_leaves_on("cpu", dtype, a, p, n), idx_cpu, **kw)
        assert_close_scaled(loss, cpu_loss, 2 * CUDA_TOL[dtype], "loss vs CPU kernel")
        for name, g, r in zip("apn", grads, cpu_grads):
            assert_close_scaled(g, r, 2 * CUDA_TOL[dtype], f"grad {name} vs CPU kernel")
            err = _rel_err(g, r, floor_rms=GRAD_FLOOR[dtype])
            assert err <= 2 * GRAD_REL[dtype], f"grad {name} vs CPU kernel: relative norm error {err:.3g}"


def test_cuda_kernel_is_registered():
    # On a GPU machine the extension must have been built with FORCE_CUDA=1 (else the reference serves).
    assert _backend.HAS_CUDA_KERNEL, _backend.backend_info()
    assert _backend.backend_info()["cuda"] == "kernel"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("B,K,d", [(37, 1037, 19), (130, 300, 257)])
def test_matches_cpu_and_reference(dtype, mode, normalize, B, K, d):
    # 1037 and 300 are multiples of no tile (64, 32); B = 130 crosses anchor blocks; d = 257 crosses feature chunks.
    a, p, n, idx = make_inputs(mode, B=B, K=K, d=d, dtype=dtype, device=CUDA)
    if not normalize:
        # rows of norm ~1: with unit-variance entries the positive logit (~d / 0.2, 1285 at d = 257) left every
        # negative below e^-900, the float64 loss and gradients exactly 0, and these cases unable to fail (a review)
        a, p, n = _leaves_on(CUDA, dtype, *(None if x is None else x.detach().double() * d**-0.5 for x in (a, p, n)))
    kw = dict(temperature=0.2, normalize=normalize, reduction="none")
    if mode == "in_batch" and not normalize:
        # Unnormalised in-batch logits (~1600 before the inputs were scaled by d^-0.5) and the loss lse - l_ii is a
        # difference of two such numbers: its rounding error is relative to the logits, not to the loss (~0).
        # And p_i's gradient is the sum of its gradient as a positive and as a bank row, each rounded to the
        # input type first (two roundings of parts ~4x larger than the sum in bfloat16): tolerance 4 x CUDA_TOL there.
        loss, grads = _run(cb.info_nce, a, p, n, idx, **kw)
        ra, rp = _leaves_on("cpu", torch.float64, a, p)
        ref_loss, ref_grads = _run(info_nce_reference, ra, rp, None, None, **kw)
        logit_max = (ra @ rp.t()).abs().max().item() / 0.2
        assert_close_scaled(loss / logit_max, ref_loss / logit_max, CUDA_TOL[dtype], "loss / max logit")
        factor = 4 if dtype in (torch.bfloat16, torch.float16) else 1
        for name, g, r in zip("ap", grads, ref_grads):
            assert_close_scaled(g, r, factor * CUDA_TOL[dtype], f"grad {name} vs reference")
        return
    _compare(a, p, n, idx, dtype, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("d", [1000, 1024])
def test_wide_features(dtype, mode, d):
    # Rows of norm ~1, temperature 0.5 and a summed loss: gradients up to ~0.07 (with unit-variance entries, 0.1
    # and the mean they were ~1e-6, and an all-zero gradient passed the absolute tolerance)
    a, p, n, idx = make_inputs(mode, B=70, K=150, d=d, dtype=dtype, device=CUDA, seed=2, requires_grad=False)
    a, p, n = _leaves_on(CUDA, dtype, *(None if x is None else x.double() * d**-0.5 for x in (a, p, n)))
    _compare(a, p, n, idx, dtype, temperature=0.5, reduction="sum")


@pytest.mark.parametrize("mode", MODES)
def test_tiny_sizes(mode):
    for B, K, d in [(1, 1, 1), (1, 3, 1), (2, 1, 3), (3, 65, 2)]:
        a, p, n, idx = make_inputs(mode, B=B, K=K, d=d, dtype=torch.float64, device=CUDA, seed=B + K + d)
        _compare(a, p, n, idx, torch.float64, temperature=0.5)


@pytest.mark.parametrize("mode", ["shared", "per_anchor", "indexed"])
def test_zero_negatives_give_zero_loss(mode):
    a, p, n, idx = make_inputs(mode, B=5, K=0, d=4, dtype=torch.float32, device=CUDA)
    if mode == "indexed":
        idx = torch.empty(5, 0, dtype=torch.long, device=CUDA)
    loss = cb.info_nce(a, p, n, negative_indices=idx, reduction="none")
    assert torch.equal(loss.cpu(), torch.zeros(5))
    grads = torch.autograd.grad(loss.sum(), [a, p, n])
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize(
    "B,K,d",
    [
        (200, 40_000, 33),  # bank backward: more tiles than the grid, each block finishes its own tiles
        (1000, 100, 24),  # bank backward: few tiles, anchors split, partials summed by a second kernel
        (8, 70_000, 16),  # forward: one anchor block, hundreds of K chunks merged
    ],
)
def test_grid_shapes_shared(B, K, d):
    a, p, n, idx = make_inputs("shared", B=B, K=K, d=d, dtype=torch.float32, device=CUDA, seed=K)
    _compare(a, p, n, idx, torch.float32, check_cpu=False, temperature=0.1)


def test_many_chunks_rows_modes():
    for mode in ("per_anchor", "indexed"):
        a, p, n, idx = make_inputs(mode, B=3, K=20_000, d=12, dtype=torch.float32, device=CUDA, seed=6)
        _compare(a, p, n, idx, torch.float32, check_cpu=False, temperature=0.1)


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_and_expanded_inputs(mode):
    B, K, d = 11, 600, 10
    g = torch.Generator().manual_seed(7)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(CUDA).requires_grad_(True)

    a_leaf = leaf(B, 2 * d)
    a = a_leaf[:, ::2]  # inner stride 2
    p_leaf = leaf(d, B)
    p = p_leaf.t()  # transposed
    idx = None
    if mode == "shared":
        n_leaf = leaf(d, K)
        n = n_leaf.t()  # a transposed bank
    elif mode == "per_anchor":
        n_leaf = leaf(1, K, d)
        n = n_leaf.expand(B, K, d)  # stride 0 over anchors
    elif mode == "indexed":
        n_leaf = leaf(1, d)
        n = n_leaf.expand(40, d)  # stride-0 bank
        idx = torch.randint(0, 40, (B, 2 * K), generator=g).to(CUDA)[:, ::2]  # non-contiguous indices
    else:
        n_leaf, n = None, None
    leaves = [x for x in (a_leaf, p_leaf, n_leaf) if x is not None]
    loss = cb.info_nce(a, p, n, negative_indices=idx, temperature=0.3)
    grads = torch.autograd.grad(loss, leaves)
    cpu_leaves = [x.detach().cpu().requires_grad_(True) for x in leaves]
    views = {
        "a": cpu_leaves[0][:, ::2],
        "p": cpu_leaves[1].t(),
    }
    n_cpu = None
    if mode == "shared":
        n_cpu = cpu_leaves[2].t()
    elif mode == "per_anchor":
        n_cpu = cpu_leaves[2].expand(B, K, d)
    elif mode == "indexed":
        n_cpu = cpu_leaves[2].expand(40, d)
    ref = info_nce_reference(
        views["a"], views["p"], n_cpu, negative_indices=None if idx is None else idx.cpu(), temperature=0.3
    )
    ref_grads = torch.autograd.grad(ref, cpu_leaves)
    assert_close_scaled(loss, ref, 1e-9, "loss")
    for x, y in zip(grads, ref_grads):
        assert_close_scaled(x, y, 1e-9, "grad")


def test_repeated_indices_and_determinism():
    a, p, n, _ = make_inputs("indexed", B=64, K=500, d=40, dtype=torch.float32, device=CUDA, M=7)
    idx = torch.randint(0, 7, (64, 500), generator=torch.Generator().manual_seed(3)).to(CUDA)  # heavy repeats
    _compare(a, p, n, idx, torch.float32, temperature=0.2)
    # No atomics anywhere: two runs give bitwise identical gradients.
    first = _run(cb.info_nce, a, p, n, idx, temperature=0.2)
    second = _run(cb.info_nce, a, p, n, idx, temperature=0.2)
    for x, y in zip(first[1], second[1]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("mode", ["shared", "per_anchor", "in_batch"])
def test_deterministic(mode):
    a, p, n, idx = make_inputs(mode, B=300, K=3000 if mode == "shared" else 200, d=48, dtype=torch.float32, device=CUDA)
    first = _run(cb.info_nce, a, p, n, idx, temperature=0.1)
    second = _run(cb.info_nce, a, p, n, idx, temperature=0.1)
    assert torch.equal(first[0], second[0])
    for x, y in zip(first[1], second[1]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bank_cross_entropy_deterministic(dtype):
    # Classification batches repeat targets: the positives' gradient of a target row is summed over its anchors
    # (float32: index_put_'s sorted accumulation, not index_add_'s atomics), the same bits every run.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4096, 128, generator=g).to(CUDA, dtype).requires_grad_(True)
    w = torch.randn(1000, 128, generator=g).to(CUDA, dtype).requires_grad_(True)
    targets = torch.randint(0, 50, (4096,), generator=g).to(CUDA)  # ~80 anchors per target
    runs = [torch.autograd.grad(cb.bank_cross_entropy(x, w, targets, temperature=0.1, normalize=True), [x, w])
            for _ in range(3)]
    for other in runs[1:]:
        assert all(torch.equal(u, v) for u, v in zip(runs[0], other))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_unused_bank_rows_get_zero_gradient_even_if_infinite(dtype, normalize):
    # No index picks row 3 (inf): its gradient is 0, not 0 * inf = NaN (finish_bank_row skips the Jacobian term
    # where proj = 0); the used rows match the CPU kernel.
    g = torch.Generator().manual_seed(4)
    a, p = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    bank = torch.randn(6, 4, generator=g)
    bank[3] = float("inf")
    idx = torch.tensor([[0, 1, 2], [5, 5, 0], [1, 2, 5], [0, 0, 0], [2, 1, 0]])
    grads = []
    for device in ("cpu", CUDA):
        w = bank.to(device, dtype).requires_grad_(True)
        loss = cb.info_nce(a.to(device, dtype), p.to(device, dtype), w, negative_indices=idx.to(device),
                           temperature=0.5, normalize=normalize)
        grads.append(torch.autograd.grad(loss, w)[0].float().cpu())
    cpu, gpu = grads
    assert torch.isfinite(gpu).all() and torch.equal(gpu[3], torch.zeros(4))
    assert_close_scaled(gpu[[0, 1, 2, 5]], cpu[[0, 1, 2, 5]], CUDA_TOL[dtype], "used rows")


def test_low_temperature_large_logits_stay_finite():
    a, p, n, _ = make_inputs("shared", B=9, K=2000, d=32, dtype=torch.float32, device=CUDA, seed=5)
    _compare(a, p, n, None, torch.float32, temperature=0.01, normalize=False)


def test_zero_vectors_follow_f_normalize():
    a, p, n, _ = make_inputs("shared", B=3, K=4, d=3, dtype=torch.float64, device=CUDA)
    with torch.no_grad():
        a[0] = 0.0
        n[2] = 0.0
    _compare(a, p, n, None, torch.float64, temperature=0.5)


def test_detached_bank_and_frozen_anchors():
    a, p, n, _ = make_inputs("shared", B=9, K=800, d=12, dtype=torch.float64, device=CUDA, seed=11)
    ref_grads = torch.autograd.grad(info_nce_reference(a, p, n, temperature=0.2), [a, p, n])
    loss = cb.info_nce(a, p, n.detach(), temperature=0.2)
    ga, gp = torch.autograd.grad(loss, [a, p])
    assert_close_scaled(ga, ref_grads[0], 1e-9, "grad a")
    assert_close_scaled(gp, ref_grads[1], 1e-9, "grad p")
    loss = cb.info_nce(a.detach(), p, n, temperature=0.2)
    gp, gn = torch.autograd.grad(loss, [p, n])
    assert_close_scaled(gp, ref_grads[1], 1e-9, "grad p")
    assert_close_scaled(gn, ref_grads[2], 1e-9, "grad n")


@pytest.mark.parametrize("mode", MODES)
def test_anchor_term_recomputed_when_forward_did_not_save_it(mode):
    a, p, n, idx = make_inputs(mode, B=6, K=700, d=5, dtype=torch.float64, device=CUDA, requires_grad=False)
    include_positive = mode != "in_batch"
    n = p if n is None else n
    ops = torch.ops.contrastbound
    _, lse, term = ops.info_nce_fwd(a, p, n, idx, 3.0, True, include_positive, True)
    _, _, empty = ops.info_nce_fwd(a, p, n, idx, 3.0, True, include_positive, False)
    assert empty.numel() == 0 and term.shape == (6, 5)
    g = torch.ones(6, dtype=torch.float64, device=CUDA)
    full = ops.info_nce_bwd(g, a, p, n, idx, lse, term, 3.0, True, include_positive, [True, True, True])
    again = ops.info_nce_bwd(g, a, p, n, idx, lse, empty, 3.0, True, include_positive, [True, True, True])
    for x, y in zip(full, again):
        assert_close_scaled(x, y, 1e-12, "grad")


def test_backward_op_checks_indices_it_would_read():
    # check_indices=False (the autograd backward's flag) must not let a recomputation of V read the rows that
    # out-of-range indices name; the bank's gradient skips them (every row's run is looked up within [0, M)).
    a, p, n, idx = make_inputs("indexed", B=6, K=70, d=5, dtype=torch.float32, device=CUDA, requires_grad=False)
    ops = torch.ops.contrastbound
    _, lse, term = ops.info_nce_fwd(a, p, n, idx, 3.0, True, True, True)
    g = torch.ones(6, device=CUDA)
    with pytest.raises(IndexError, match="negative_indices"):
        ops.info_nce_bwd(g, a, p, n, idx + 10**6, lse, term.new_empty((0,)), 3.0, True, True, [True, True, True],
                         False, False)
    ga, gp, gn = ops.info_nce_bwd(g, a, p, n, idx + 10**6, lse, term, 3.0, True, True, [True, True, True],
                                  False, False)
    assert torch.equal(gn, torch.zeros_like(gn)) and torch.isfinite(ga).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_float64(mode, normalize):
    a, p, n, idx = make_inputs(mode, B=3, K=5, d=4, dtype=torch.float64, device=CUDA, M=3)
    leaves = tuple(x for x in (a, p, n) if x is not None)

    def f(*xs):
        n_ = xs[2] if len(xs) > 2 else None
        return cb.info_nce(xs[0], xs[1], n_, negative_indices=idx, temperature=0.7, normalize=normalize, reduction="none")

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def _op_samples():
    out = []
    for mode in MODES:
        for save in (True, False):
            for dtype in (torch.float32, torch.bfloat16):
                a, p, n, idx = make_inputs(mode, B=4, K=70, d=3, dtype=dtype, device=CUDA, M=5)
                include_positive = mode != "in_batch"
                out.append((a, p, p if n is None else n, idx, 2.5, True, include_positive, save))
    return out


def test_opcheck_forward():
    for args in _op_samples():
        torch.library.opcheck(torch.ops.contrastbound.info_nce_fwd.default, args)


def test_opcheck_backward():
    for a, p, n, idx, scale, normalize, include_positive, _ in _op_samples():
        with torch.no_grad():
            _, lse, term = torch.ops.contrastbound.info_nce_fwd(a, p, n, idx, scale, normalize, include_positive, True)
        g = torch.rand(a.shape[0], device=CUDA)
        for mask in ([True, True, True], [False, True, False], [True, False, True]):
            args = (g, a.detach(), p.detach(), n.detach(), idx, lse, term, scale, normalize, include_positive, mask)
            torch.library.opcheck(torch.ops.contrastbound.info_nce_bwd.default, args)


def _train_step_losses(compiled: bool, steps: int = 3):
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).to(CUDA)
    opt = torch.optim.SGD(encoder.parameters(), lr=0.1)
    x = torch.randn(24, 12, device=CUDA)
    x_pos = x + 0.1 * torch.randn(24, 12, device=CUDA)
    bank = torch.randn(700, 16, device=CUDA)

    def step(x, x_pos, bank):
        opt.zero_grad(set_to_none=True)
        loss = cb.info_nce(encoder(x), encoder(x_pos), bank, temperature=0.2)
        loss.backward()
        opt.step()
        return loss.detach()

    fn = torch.compile(step, fullgraph=False) if compiled else step
    return torch.stack([fn(x, x_pos, bank) for _ in range(steps)])


def test_torch_compile_training_step():
    torch._dynamo.reset()
    eager = _train_step_losses(False)
    compiled = _train_step_losses(True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    a, p, n, _ = make_inputs("shared", B=16, K=600, d=8, dtype=torch.float32, device=CUDA)
    compiled = torch.compile(lambda a, p, n: cb.info_nce(a, p, n, temperature=0.1), fullgraph=True)
    loss_c = compiled(a, p, n)
    grads_c = torch.autograd.grad(loss_c, [a, p, n])
    loss_e = cb.info_nce(a, p, n, temperature=0.1)
    grads_e = torch.autograd.grad(loss_e, [a, p, n])
    torch.testing.assert_close(loss_c, loss_e)
    for x, y in zip(grads_c, grads_e):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("mode", MODES)
def test_non_default_stream(mode):
    # The inputs are written on a side stream after a long sleep there; a kernel launched on the legacy default
    # stream instead of torch's current stream would read them before they exist.
    a0, p0, n0, idx = make_inputs(mode, B=50, K=900, d=40, dtype=torch.float32, device=CUDA, requires_grad=False)
    ref_loss, ref_grads = _run(cb.info_nce, *_leaves_on(CUDA, torch.float32, a0, p0, n0), idx, temperature=0.2)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~0.05 s of spinning on the side stream
        a, p, n = (None if x is None else (x * 1.0).requires_grad_(True) for x in (a0, p0, n0))
        loss, grads = _run(cb.info_nce, a, p, n, idx, temperature=0.2)
        # Results on the side stream; copy them out there too before synchronising.
        out = [loss.detach().clone()] + [g.detach().clone() for g in grads]
    side.synchronize()
    assert torch.equal(out[0], ref_loss)
    for x, y in zip(out[1:], ref_grads):
        assert torch.equal(x, y)


def test_other_device_index_uses_its_own_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    a, p, n, _ = make_inputs("shared", B=9, K=300, d=8, dtype=torch.float32, device="cuda:1")
    _compare(a, p, n, None, torch.float32, temperature=0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [3, 100])
def test_nt_xent_cuda_matches_reference(dtype, N):
    from contrastbound.reference import nt_xent_reference

    g = torch.Generator().manual_seed(N)
    z1 = torch.randn(N, 33, generator=g, dtype=torch.float64)
    z2 = z1 + 0.3 * torch.randn(N, 33, generator=g, dtype=torch.float64)
    c1, c2 = _leaves_on(CUDA, dtype, z1, z2)
    loss = cb.nt_xent(c1, c2, 0.1, reduction="none")
    r1, r2 = _leaves_on("cpu", torch.float64, c1, c2)
    ref = nt_xent_reference(r1, r2, 0.1, reduction="none")
    assert_close_scaled(loss, ref, CUDA_TOL[dtype], "loss")
    for x, y in zip(torch.autograd.grad(loss.sum(), [c1, c2]), torch.autograd.grad(ref.sum(), [r1, r2])):
        assert_close_scaled(x, y, CUDA_TOL[dtype], "grad")


# ---------------------------------------------------------------------------------------------------------
# Tensor-core path (shared bank; float16 / bfloat16 for d <= 2048, float32 as TF32 when allowed for d <= 256). The
# same problems also run through the SIMT kernels (CONTRASTBOUND_TENSOR_CORES=0) and the float64 reference.
# ---------------------------------------------------------------------------------------------------------

# Relative Frobenius error ||out - ref|| / ||ref|| allowed against the float64 reference on the same (rounded)
# inputs: the coefficients of the second product are rounded to the input type (bf16 ~ 4e-3, fp16 ~ 5e-4), and
# TF32 rounds the operands of the score product (~5e-4 relative per score, times the logit scale).
TC_REL = {torch.bfloat16: 1.5e-2, torch.float16: 4e-3, torch.float32: 1.5e-2}


def _rel_err(x, ref, floor_rms=1e-3):
    """||x - ref|| / max(||ref||, floor_rms sqrt(n)): relative, except where the reference itself is at rounding
    level (e.g. gradients of e^-200-sized softmax weights, or d = 1 with normalisation, where they vanish exactly).
    The tensor-core tests keep 1e-3 (set on hardware); _compare passes GRAD_FLOOR (1e-9, float64 1e-7), since its
    problems' gradients have an RMS below 1e-3 (a shared bank of 40000 rows), where 1e-3 made the check absolute and
    passed an all-zero one."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(x).all()
    floor = floor_rms * max(1, ref.numel()) ** 0.5
    return ((x - ref).norm() / max(ref.norm().item(), floor)).item()


# mma: mma.sync + ldmatrix kernels (the default but on sm_90a; CONTRASTBOUND_TC_WGMMA=0 there); wmma: the WMMA
# kernels (CONTRASTBOUND_TC_MMA=0); mma_1pass: the one-pass forward (CONTRASTBOUND_TC_FUSED_FWD=1); flash: the
# register-coefficient kernels with 128-row blocks (CONTRASTBOUND_TC_FLASH=1); wgmma: their sm_90a warpgroup-MMA
# versions (CONTRASTBOUND_TC_WGMMA=1), the default on sm_90a since these tests passed on an H200 (2026-12-04). The
# one-pass and flash kernels stay opt-in until theirs have passed on a GPU.
TC_IMPLS = ["mma", "wmma", "mma_1pass", "flash", "wgmma"]


def _set_tc_impl(monkeypatch, impl):
    # wgmma: the sm_90a warpgroup-MMA versions of the flash kernels (CONTRASTBOUND_TC_WGMMA=1); the op raises if the
    # build has no sm_90a code, so a build without 9.0a fails here rather than testing the other kernels.
    if impl == "wgmma" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernels need compute capability 9.0")
    monkeypatch.setenv("CONTRASTBOUND_TC_MMA", "0" if impl == "wmma" else "1")
    monkeypatch.setenv("CONTRASTBOUND_TC_FUSED_FWD", "1" if impl == "mma_1pass" else "0")
    monkeypatch.setenv("CONTRASTBOUND_TC_FLASH", "1" if impl == "flash" else "0")
    monkeypatch.setenv("CONTRASTBOUND_TC_WGMMA", "1" if impl == "wgmma" else "0")


def _run_path(tensor_cores: bool, monkeypatch, fn, *args, **kw):
    monkeypatch.setenv("CONTRASTBOUND_TENSOR_CORES", "1" if tensor_cores else "0")
    try:
        return _run(fn, *args, **kw)
    finally:
        monkeypatch.delenv("CONTRASTBOUND_TENSOR_CORES")


def _compare_tc(monkeypatch, a, p, n, dtype, **kw):
    loss, grads = _run_path(True, monkeypatch, cb.info_nce, a, p, n, None, **kw)
    ref_loss, ref_grads = _run(info_nce_reference, *_leaves_on(CUDA, torch.float64, a, p, n), None, **kw)
    simt_loss, simt_grads = _run_path(False, monkeypatch, cb.info_nce, a, p, n, None, **kw)
    tol = TC_REL[dtype]
    errs = {"loss": _rel_err(loss, ref_loss)}
    errs.update({f"grad {k}": _rel_err(g, r) for k, g, r in zip("apn", grads, ref_grads)})
    assert all(e <= tol for e in errs.values()), f"tensor cores vs float64 reference: {errs} (tol {tol})"
    simt = {"loss": _rel_err(simt_loss, ref_loss)}
    simt.update({f"grad {k}": _rel_err(g, r) for k, g, r in zip("apn", simt_grads, ref_grads)})
    assert all(e <= tol for e in simt.values()), f"SIMT vs float64 reference: {simt}"
    for g, x in zip(grads, (a, p, n)):
        assert g.dtype == dtype and g.shape == x.shape
    return errs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(
    "B,K,d",
    [
        (37, 1037, 19),  # d not a multiple of 8: scalar loads, zero padding to 32
        (130, 300, 256),  # widest tensor-core width, 16-byte loads
        (1, 1, 1),
        (64, 64, 16),  # exactly one tile
        (300, 5000, 77),
        (8, 70_000, 64),  # one anchor block, many K chunks merged; anchor term split over K
        (1000, 100, 24),  # few bank tiles: bank gradient split over anchors, partials summed
        (17_000, 200, 16),  # many anchor blocks: the anchor term is finished in the kernel
        (50, 20_000, 40),  # many bank tiles: bank gradient rows are finished in the kernel
        (90, 1500, 150),  # d in 129..192: flash NT = 32, wgmma NT = 24 (features padded to 192)
    ],
)
@pytest.mark.parametrize("impl", TC_IMPLS)
def test_tensor_cores_match_reference_and_simt(monkeypatch, impl, dtype, normalize, B, K, d):
    _set_tc_impl(monkeypatch, impl)
    a, p, n, _ = make_inputs("shared", B=B, K=K, d=d, dtype=dtype, device=CUDA, seed=B + K + d)
    if not normalize:
        # Unit-variance entries would give logits in the thousands: a one-hot softmax whose loss and gradients are
        # exactly 0, which any finite output matches. Rows of norm ~1 give logits of a few units.
        a, p, n = ((x.detach() * d**-0.5).requires_grad_(True) for x in (a, p, n))
    _compare_tc(monkeypatch, a, p, n, dtype, temperature=0.2, normalize=normalize, reduction="none")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(
    "B,K,d",
    [
        (70, 1100, 300),  # two feature slices of the rows passes, the second 44 wide
        (130, 5000, 520),  # three slices, the last 8 wide; several anchor blocks, bank gradients finished in-kernel
        (33, 700, 768),  # CLIP ViT-L/14's width: three full slices
        (1000, 100, 848),  # widest whole rows on an H100 / H200; few bank tiles: split bank gradients (n . G partials)
        (20, 300, 1024),  # too wide for whole-row tiles on any part: copied in chunks of 256 features
        (50, 700, 2000),  # eight slices and chunks, the last 208 wide
        (17, 200, 2100),  # past kTcMaxWideD: the SIMT kernels, the same answer
    ],
)
@pytest.mark.parametrize("tiles", ["auto", "chunked", "whole", "one_stage"])
def test_tensor_cores_wide_features(monkeypatch, tiles, dtype, normalize, B, K, d):
    """d > 256: the mma.sync kernels (the one-pass, flash-layout and wgmma kernels hold whole rows in registers
    and leave these widths to them; the WMMA ones to the SIMT kernels) split each rows pass into slices of 256
    features, every slice recomputing the scores over all d; rows too wide for whole tiles in shared memory, or
    where chunks keep more blocks per multiprocessor (auto: d > 384 on an H100/H200), or any d > 256 with
    CONTRASTBOUND_TC_CHUNKED=1, are copied in chunks of 256 features. Whole rows (=0 where they fit) take two Y
    stages by default where they keep the blocks per multiprocessor (d ~ 400 .. 560 on an H100/H200); one_stage
    forces one."""
    _set_tc_impl(monkeypatch, "mma")
    if tiles == "auto":
        monkeypatch.delenv("CONTRASTBOUND_TC_CHUNKED", raising=False)
    else:
        monkeypatch.setenv("CONTRASTBOUND_TC_CHUNKED", "1" if tiles == "chunked" else "0")
    if tiles == "one_stage":
        monkeypatch.setenv("CONTRASTBOUND_TC_STAGES", "1")
    a, p, n, _ = make_inputs("shared", B=B, K=K, d=d, dtype=dtype, device=CUDA, seed=B + K + d)
    if not normalize:
        a, p, n = ((x.detach() * d**-0.5).requires_grad_(True) for x in (a, p, n))
    _compare_tc(monkeypatch, a, p, n, dtype, temperature=0.2, normalize=normalize, reduction="none")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("impl", TC_IMPLS)
def test_tensor_cores_wide_features_in_batch(monkeypatch, impl, dtype):
    """In-batch (exclude_self) at d = 384, with each kernel choice asked for: the opt-in kernels hand that width to
    the mma.sync ones, the WMMA ones to the SIMT kernels."""
    _set_tc_impl(monkeypatch, impl)
    a, p, _, _ = make_inputs("in_batch", B=300, K=300, d=384, dtype=dtype, device=CUDA, seed=6)
    _compare_tc(monkeypatch, a, p, None, dtype, temperature=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("impl", TC_IMPLS)
def test_tensor_cores_low_temperature_and_in_batch(monkeypatch, impl, dtype):
    _set_tc_impl(monkeypatch, impl)
    a, p, n, _ = make_inputs("shared", B=200, K=3000, d=128, dtype=dtype, device=CUDA, seed=4)
    _compare_tc(monkeypatch, a, p, n, dtype, temperature=0.01, reduction="mean")
    # In-batch (the positives are the bank) and NT-Xent (exclude_self) take the shared-bank kernels too.
    a, p, _, _ = make_inputs("in_batch", B=333, K=333, d=96, dtype=dtype, device=CUDA, seed=5)
    _compare_tc(monkeypatch, a, p, None, dtype, temperature=0.1)
    from contrastbound.reference import nt_xent_reference

    z1, z2 = _leaves_on(CUDA, dtype, torch.randn(257, 64, dtype=torch.float64), torch.randn(257, 64, dtype=torch.float64))
    loss = cb.nt_xent(z1, z2, 0.1, reduction="none")
    r1, r2 = _leaves_on(CUDA, torch.float64, z1, z2)
    ref = nt_xent_reference(r1, r2, 0.1, reduction="none")
    assert _rel_err(loss, ref) <= TC_REL[dtype]
    for x, y in zip(torch.autograd.grad(loss.sum(), [z1, z2]), torch.autograd.grad(ref.sum(), [r1, r2])):
        assert _rel_err(x, y) <= TC_REL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("impl", TC_IMPLS)
def test_tensor_cores_zero_rows(monkeypatch, impl, dtype):
    """A zero anchor row and a zero bank row (a zero-initialised queue, padding). Their inverse norm is 1e12
    (F.normalize's eps); in float16 it used to set the coefficient scale, which rounded every other coefficient
    to 0: a zero anchor term (anchors' gradient) and zero bank gradients. The zero rows' own gradients (1e12 G,
    past float16's range, as in torch) are left out of the comparison."""
    _set_tc_impl(monkeypatch, impl)
    B, K, za, zn = 70, 1000, 5, 130
    a, p, n, _ = make_inputs("shared", B=B, K=K, d=64, dtype=dtype, device=CUDA, seed=21)
    with torch.no_grad():
        a[za] = 0.0
        n[zn] = 0.0
    loss, (ga, gp, gn) = _run(cb.info_nce, a, p, n, None, temperature=0.07, reduction="none")
    ref_loss, (ra, rp, rn) = _run(
        info_nce_reference, *_leaves_on(CUDA, torch.float64, a, p, n), None, temperature=0.07, reduction="none"
    )
    keep_a, keep_n = torch.arange(B, device=CUDA) != za, torch.arange(K, device=CUDA) != zn
    tol = TC_REL[dtype]
    errs = {
        "loss": _rel_err(loss, ref_loss),
        "grad a": _rel_err(ga[keep_a], ra[keep_a]),
        "grad p": _rel_err(gp, rp),
        "grad n": _rel_err(gn[keep_n], rn[keep_n]),
    }
    assert all(e <= tol for e in errs.values()), f"{errs} (tol {tol})"


def _allow_tf32(request) -> None:
    """torch.backends.cuda.matmul.allow_tf32 = True until the test ends. Not monkeypatch.setattr: the attribute is
    a property of torch's cuBLASModule that hasattr does not see, so pytest >= 9.2's undo deletes it instead of
    restoring it (AttributeError in teardown, and TF32 left on for every later test of the process)."""
    m = torch.backends.cuda.matmul
    old = m.allow_tf32
    m.allow_tf32 = True
    request.addfinalizer(lambda: setattr(m, "allow_tf32", old))


def test_allow_tf32_helper_restores():
    """_allow_tf32 puts the setting back (a leak would run later float32 tests through TF32 tensor cores)."""
    before = torch.backends.cuda.matmul.allow_tf32
    fins = []

    class _Req:
        def addfinalizer(self, f):
            fins.append(f)

    _allow_tf32(_Req())
    assert torch.backends.cuda.matmul.allow_tf32 is True
    for f in fins:
        f()
    assert torch.backends.cuda.matmul.allow_tf32 == before


def _cuda_kernel_names(fn) -> set[str]:
    """The names of the CUDA kernels fn() launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


@pytest.mark.parametrize("dtype,impl", [(dt, impl) for dt in (torch.bfloat16, torch.float16) for impl in TC_IMPLS]
                         + [(torch.float32, "wmma")], ids=str)  # (float32: the WMMA kernels, as TF32)
# (both: a mask and labels; sparse: a mask dropping ~0.5 % of the pairs, so that most rows of most tiles keep every
# column and take the flash / wgmma kernels' path without tests beside rows that drop one)
@pytest.mark.parametrize("left_out", ["labels", "both", "sparse"])
@pytest.mark.parametrize(
    "B,K,d,in_batch",
    [
        (70, 1100, 40, False),  # K a multiple of no tile, two anchor blocks
        (1000, 100, 24, False),  # few bank tiles: bank gradient split over anchors, partials summed
        (40, 700, 300, False),  # wide rows: the mma.sync rows passes in feature slices (float32: SIMT)
        (150, 150, 64, True),  # in-batch (exclude_self) with them
    ],
)
def test_tensor_cores_with_mask_and_labels(monkeypatch, request, impl, left_out, dtype, B, K, d, in_batch):
    """A negative_mask and labels on the tensor-core kernels (the LEFT_OUT instances of the mma.sync and WMMA ones,
    float32 as TF32; the flash and wgmma kernels' shared coefficient code for d <= 256; the one-pass kernel steps
    aside for them): loss and gradients against the float64 reference with the equivalent mask and against the SIMT
    kernels; the left-out negatives get no gradient; the kernels asked for (not the SIMT ones) ran."""
    _set_tc_impl(monkeypatch, impl)
    if dtype == torch.float32:
        _allow_tf32(request)
    a, p, n, _ = make_inputs("shared", B=B, K=0 if in_batch else K, d=d, dtype=dtype, device=CUDA, seed=B + K)
    if in_batch:
        n, K = None, B
    g = torch.Generator().manual_seed(K + d)
    y = torch.randint(0, 7, (B,), generator=g)
    yn = y if in_batch else torch.randint(0, 7, (K,), generator=g)
    mask = torch.rand(B, K, generator=g) > (0.005 if left_out == "sparse" else 0.3)
    kw, keep = {}, torch.ones(B, K, dtype=torch.bool)
    if left_out in ("mask", "both", "sparse"):
        kw["negative_mask"] = mask.to(CUDA)
        keep &= mask
    if left_out in ("labels", "both"):
        kw["labels"] = y.to(CUDA)
        if not in_batch:
            kw["negative_labels"] = yn.to(CUDA)
        keep &= yn[None, :] != y[:, None]
    if in_batch:
        keep.fill_diagonal_(True)  # (the positive always counts)
    opts = dict(temperature=0.2, reduction="none")
    loss, grads = _run_path(True, monkeypatch, cb.info_nce, a, p, n, None, **kw, **opts)
    simt_loss, simt_grads = _run_path(False, monkeypatch, cb.info_nce, a, p, n, None, **kw, **opts)
    ref_loss, ref_grads = _run(info_nce_reference, *_leaves_on(CUDA, torch.float64, a, p, n), None,
                               negative_mask=keep.to(CUDA), **opts)
    tol = TC_REL[dtype]
    for what, (l_, gs) in {"tensor cores": (loss, grads), "SIMT": (simt_loss, simt_grads)}.items():
        errs = {"loss": _rel_err(l_, ref_loss)}
        errs.update({f"grad {k}": _rel_err(x, r) for k, x, r in zip("apn", gs, ref_grads)})
        assert all(e <= tol for e in errs.values()), f"{what} vs float64 reference: {errs} (tol {tol})"
    if n is not None:  # a bank row no anchor keeps gets exactly 0
        unused = ~keep.any(0)
        if bool(unused.any()):
            assert bool((grads[2][unused.to(CUDA)] == 0).all())
    if d <= 256 or (dtype != torch.float32 and impl != "wmma"):  # which kernels ran: the tensor-core ones (past
        # d = 256 the WMMA kernels, float32's included, leave the rows to the SIMT kernels)
        monkeypatch.setenv("CONTRASTBOUND_TENSOR_CORES", "1")
        names = " ".join(_cuda_kernel_names(lambda: _run(cb.info_nce, a, p, n, None, **kw, **opts)))
        if not names:
            pytest.skip("torch.profiler recorded no CUDA kernels (CUPTI unavailable)")
        if impl in ("flash", "wgmma") and dtype != torch.float32 and d <= 256:  # their one-pass forward and bank pass
            assert f"{impl}_kernel" in names and "mma_lse_kernel" not in names and "mma_rows_kernel" not in names, names
            # the mask reaches them as bits packed per launch (fl_keep_bits_kernel), labels need no such pass
            assert ("fl_keep_bits_kernel" in names) == ("negative_mask" in kw), names
        else:
            family = "tc_" if impl == "wmma" or dtype == torch.float32 else "mma_"
            assert f"{family}lse_kernel" in names and f"{family}rows_kernel" in names, names
        assert "forward_shared_kernel" not in names and "backward_bank_kernel" not in names, names


@pytest.mark.parametrize("problem", ["shared", "in_batch", "shared_labels"])
def test_default_kernels_on_compute_capability_9(monkeypatch, problem):
    """The wgmma kernels are the default where they run (compute capability 9.0 and an extension with 9.0a code: on
    an H200 they ran a bf16 step 1.5x faster than the mma.sync kernels), labels and negative_labels included;
    CONTRASTBOUND_TC_WGMMA=0 turns them off and the mma.sync kernels serve, with the same loss and gradients to
    bf16's tolerance. Where they cannot run, =1 is an error naming the variable and the default is the mma.sync
    kernels."""
    for v in ("CONTRASTBOUND_TC_WGMMA", "CONTRASTBOUND_TC_FLASH", "CONTRASTBOUND_TC_FUSED_FWD", "CONTRASTBOUND_TC_MMA",
              "CONTRASTBOUND_TENSOR_CORES"):
        monkeypatch.delenv(v, raising=False)
    a, p, n, _ = make_inputs("shared", B=200, K=0 if problem == "in_batch" else 1500, d=64, dtype=torch.bfloat16,
                             device=CUDA, seed=9)
    n = None if problem == "in_batch" else n
    kw = {}
    if problem == "shared_labels":  # 7 classes: about a seventh of each anchor's negatives left out
        gen = torch.Generator().manual_seed(9)
        kw = dict(labels=torch.randint(0, 7, (a.shape[0],), generator=gen).to(CUDA),
                  negative_labels=torch.randint(0, 7, (n.shape[0],), generator=gen).to(CUDA))

    def step():
        return _run(cb.info_nce, a, p, n, None, temperature=0.1, **kw)

    monkeypatch.setenv("CONTRASTBOUND_TC_WGMMA", "1")
    try:
        step()
        runs_wgmma = True
    except RuntimeError as exc:
        assert "CONTRASTBOUND_TC_WGMMA=1" in str(exc)
        runs_wgmma = False
    monkeypatch.setenv("CONTRASTBOUND_TC_WGMMA", "0")
    off_names = " ".join(_cuda_kernel_names(step))
    if not off_names:
        pytest.skip("torch.profiler recorded no CUDA kernels (CUPTI unavailable)")
    off_loss, off_grads = step()
    monkeypatch.delenv("CONTRASTBOUND_TC_WGMMA")
    default_names = " ".join(_cuda_kernel_names(step))
    loss, grads = step()
    assert "wgmma_kernel" not in off_names and "mma_lse_kernel" in off_names, off_names
    if runs_wgmma:
        assert "wgmma_kernel" in default_names and "mma_lse_kernel" not in default_names, default_names
        assert _rel_err(loss, off_loss) <= TC_REL[torch.bfloat16]
        for g, r in zip(grads, off_grads):
            assert _rel_err(g, r) <= 2 * TC_REL[torch.bfloat16]
    else:
        assert sorted(default_names.split()) == sorted(off_names.split()), (default_names, off_names)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("problem", ["shared", "in_batch", "shared_mask", "shared_labels"])
@pytest.mark.parametrize("d", [64, 200])
def test_forward_without_gradient_takes_the_lse_walk(monkeypatch, problem, dtype, d):
    """A forward that forms no anchors' term (torch.no_grad, as in evaluation) on the wgmma kernels (compute
    capability 9.0) with CONTRASTBOUND_TC_WG_LSE=1 (opt-in until this test has passed on a GPU): their Lse walk
    serves (score products and the running max and sum, no second product), not the mma.sync lse pass, which
    serves by default; its per-anchor loss is the with-gradient forward's (the wgmma one-pass walk: the same
    coefficient code over the same scores; to float32 rounding, as the two kernels' occupancy may split K into other
    chunks) and within the dtype's tolerance of the float64 reference and of the lse pass."""
    for v in ("CONTRASTBOUND_TC_WGMMA", "CONTRASTBOUND_TC_FLASH", "CONTRASTBOUND_TC_FUSED_FWD", "CONTRASTBOUND_TC_MMA",
              "CONTRASTBOUND_TENSOR_CORES", "CONTRASTBOUND_TC_WG_LSE"):
        monkeypatch.delenv(v, raising=False)
    in_batch = problem == "in_batch"
    B, K = 200, 1500
    a, p, n, _ = make_inputs("shared", B=B, K=0 if in_batch else K, d=d, dtype=dtype, device=CUDA, seed=d + B)
    if in_batch:
        n, K = None, B
    g = torch.Generator().manual_seed(d)
    y, yn = torch.randint(0, 7, (B,), generator=g), torch.randint(0, 7, (K,), generator=g)
    kw, keep = {}, torch.ones(B, K, dtype=torch.bool)
    if problem == "shared_mask":
        keep = torch.rand(B, K, generator=g) > 0.3
        kw["negative_mask"] = keep.to(CUDA)
    elif problem == "shared_labels":
        kw = dict(labels=y.to(CUDA), negative_labels=yn.to(CUDA))
        keep = yn[None, :] != y[:, None]
    opts = dict(temperature=0.1, reduction="none", **kw)

    def evaluate():
        with torch.no_grad():
            return cb.info_nce(a, p, n, **opts)

    monkeypatch.setenv("CONTRASTBOUND_TC_WGMMA", "1")
    try:
        evaluate()
    except RuntimeError as exc:
        assert "CONTRASTBOUND_TC_WGMMA=1" in str(exc)
        pytest.skip("the wgmma kernels do not run here (compute capability 9.0 and 9.0a code needed)")
    monkeypatch.delenv("CONTRASTBOUND_TC_WGMMA")
    off_names = " ".join(_cuda_kernel_names(evaluate))  # the default: the lse pass
    if not off_names:
        pytest.skip("torch.profiler recorded no CUDA kernels (CUPTI unavailable)")
    assert "mma_lse_kernel" in off_names and "wgmma_kernel" not in off_names, off_names
    off_loss = evaluate()
    monkeypatch.setenv("CONTRASTBOUND_TC_WG_LSE", "1")
    names = " ".join(_cuda_kernel_names(evaluate))
    # (no grad: only the Lse walk of wgmma_kernel can run, its Forward and bank-pass walks need the anchors' term
    # or a backward)
    assert "wgmma_kernel" in names and "mma_lse_kernel" not in names, names
    loss = evaluate()
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in (a, p, n)]
    train_loss = cb.info_nce(*leaves, **opts).detach()
    # (float32 results that differ in their last bits round to the dtype one ulp apart where they straddle a
    # rounding boundary: at a loss ~7 that is 0.03 in bfloat16, which rtol = 1e-5 refused; a static review's find)
    torch.testing.assert_close(loss, train_loss, rtol=torch.finfo(dtype).eps, atol=1e-5)
    with torch.no_grad():  # (labels as the mask they make)
        ref = info_nce_reference(*(None if x is None else x.double() for x in (a, p, n)), temperature=0.1,
                                 reduction="none", negative_mask=keep.to(CUDA) if kw else None)
    assert _rel_err(loss, ref) <= TC_REL[dtype]
    assert _rel_err(off_loss, loss) <= TC_REL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("impl", ["simt"] + TC_IMPLS)
@pytest.mark.parametrize("B,C,d", [(300, 257, 40), (70, 5000, 130)])
def test_bank_cross_entropy_excluded_rows(monkeypatch, request, impl, normalize, dtype, B, C, d):
    """bank_cross_entropy on the GPU: the op's excluded array (the target row left out of the bank's sum, counted
    once as the positive) in every kernel family; repeated targets (B > C in one case), two or more blocks of bank
    rows, C a multiple of no tile. Loss and gradients against the float64 reference."""
    from contrastbound.reference import bank_cross_entropy_reference

    if impl == "simt":
        monkeypatch.setenv("CONTRASTBOUND_TENSOR_CORES", "0")
    else:
        _set_tc_impl(monkeypatch, impl)
        if dtype == torch.float32:
            _allow_tf32(request)
    g = torch.Generator().manual_seed(B + C)
    w = torch.randn(C, d, generator=g, dtype=torch.float64)
    t = torch.randint(0, C, (B,), generator=g)
    x = 2 * w[t] + torch.randn(B, d, generator=g, dtype=torch.float64)
    xs, ws = _leaves_on(CUDA, dtype, x, w)
    loss = cb.bank_cross_entropy(xs, ws, t.to(CUDA), temperature=0.2, normalize=normalize, reduction="none")
    gx, gw = torch.autograd.grad(loss.sum(), [xs, ws])
    rx, rw = _leaves_on(CUDA, torch.float64, xs, ws)
    ref = bank_cross_entropy_reference(rx, rw, t.to(CUDA), temperature=0.2, normalize=normalize, reduction="none")
    rgx, rgw = torch.autograd.grad(ref.sum(), [rx, rw])
    tol = TC_REL[dtype] if impl != "simt" or dtype != torch.float32 else 1e-4
    errs = {"loss": _rel_err(loss, ref), "grad anchors": _rel_err(gx, rgx), "grad bank": _rel_err(gw, rgw)}
    assert all(e <= tol for e in errs.values()), f"{errs} (tol {tol})"
    assert (loss >= 0).all()


def test_tensor_cores_non_contiguous_bf16(monkeypatch):
    B, K, d = 70, 900, 48
    g = torch.Generator().manual_seed(9)
    a = torch.randn(B, 2 * d, generator=g).to(CUDA, torch.bfloat16)[:, 1::2].requires_grad_(True)  # stride 2
    p = torch.randn(d, B, generator=g).to(CUDA, torch.bfloat16).t().requires_grad_(True)  # transposed
    n = torch.randn(K, d + 1, generator=g).to(CUDA, torch.bfloat16)[:, 1:].requires_grad_(True)  # misaligned rows
    _compare_tc(monkeypatch, a, p, n, torch.bfloat16, temperature=0.2)


def test_tf32_follows_torch_matmul_setting(monkeypatch):
    a, p, n, _ = make_inputs("shared", B=100, K=1500, d=64, dtype=torch.float32, device=CUDA, seed=8)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = _run(cb.info_nce, a, p, n, None, temperature=0.5)
        simt = _run_path(False, monkeypatch, cb.info_nce, a, p, n, None, temperature=0.5)
        # Without TF32 float32 never takes the tensor cores: bitwise the SIMT result.
        assert torch.equal(exact[0], simt[0]) and all(torch.equal(x, y) for x, y in zip(exact[1], simt[1]))
        torch.backends.cuda.matmul.allow_tf32 = True
        errs = _compare_tc(monkeypatch, a, p, n, torch.float32, temperature=0.5)
        tf32 = _run(cb.info_nce, a, p, n, None, temperature=0.5)
        # TF32 rounding shows in the results: the setting was followed.
        assert not all(torch.equal(x, y) for x, y in zip(tf32[1], exact[1])), errs
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch without fp32_precision")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tf32_follows_fp32_precision_set_alone(dtype):
    # torch.backends.cuda.matmul.fp32_precision = "tf32" set alone (the newer API): torch's legacy reader
    # allowTF32CuBLAS() raises while the two APIs disagree, and the glue called it on every CUDA call, any dtype.
    # The result must be the one allow_tf32 = True gives (the same kernels), and "ieee" the one without TF32.
    a, p, n, _ = make_inputs("shared", B=100, K=1500, d=64, dtype=dtype, device=CUDA, seed=8)
    m = torch.backends.cuda.matmul
    old, old_prec = m.allow_tf32, m.fp32_precision
    try:
        results = {}
        for name, allow in (("tf32", True), ("ieee", False)):
            m.allow_tf32 = allow
            legacy = _run(cb.info_nce, a, p, n, None, temperature=0.5)
            m.allow_tf32 = not allow  # sets both APIs; then the newer one alone: they disagree
            m.fp32_precision = name
            results[name] = _run(cb.info_nce, a, p, n, None, temperature=0.5)
            assert torch.equal(legacy[0], results[name][0]), name
            assert all(torch.equal(x, y) for x, y in zip(legacy[1], results[name][1])), name
        if dtype == torch.float32:  # the two settings took different kernels
            assert not all(torch.equal(x, y) for x, y in zip(results["tf32"][1], results["ieee"][1]))
    finally:
        m.fp32_precision = old_prec
        m.allow_tf32 = old


@pytest.mark.parametrize("stages", ["1", "2"])
@pytest.mark.parametrize("impl", ["mma", "mma_1pass", "flash", "wgmma"])
def test_tensor_cores_deterministic_and_on_side_stream(monkeypatch, stages, impl):
    if impl == "wgmma" and stages == "1":
        pytest.skip("the wgmma kernels have one pipeline (three Y buffers): the same as stages=2")
    monkeypatch.setenv("CONTRASTBOUND_TC_STAGES", stages)
    _set_tc_impl(monkeypatch, impl)
    a, p, n, _ = make_inputs("shared", B=700, K=9000, d=256, dtype=torch.bfloat16, device=CUDA, seed=12)
    first = _run(cb.info_nce, a, p, n, None, temperature=0.1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        a2, p2, n2 = ((x.detach() * 1.0).requires_grad_(True) for x in (a, p, n))
        second = _run(cb.info_nce, a2, p2, n2, None, temperature=0.1)
        second = (second[0].detach().clone(), [x.detach().clone() for x in second[1]])
    side.synchronize()
    assert torch.equal(first[0], second[0])
    for x, y in zip(first[1], second[1]):
        assert torch.equal(x, y)


# The first use of the wgmma kernels probes the device (a launch and a copy); when that first use is inside a
# CUDA graph capture the probe must not invalidate the capture. A fresh process, so the probe has not run yet.
_GRAPH_FIRST_CALL = """
import torch, contrastbound as cb
g = torch.Generator(device="cuda").manual_seed(0)
a, p = (torch.randn(130, 96, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
n = torch.randn(1000, 96, device="cuda", dtype=torch.bfloat16, generator=g)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    out = cb.info_nce(a, p, n, temperature=0.1, reduction="none")
graph.replay()
torch.cuda.synchronize()
eager = cb.info_nce(a, p, n, temperature=0.1, reduction="none")
assert torch.equal(out, eager), (out - eager).abs().max().item()
print("graph ok")
"""


@pytest.mark.parametrize("impl", ["mma", "wgmma"])
def test_first_call_inside_cuda_graph_capture(impl):
    if impl == "wgmma" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernels need compute capability 9.0")
    env = package_env(CONTRASTBOUND_TC_WGMMA="1" if impl == "wgmma" else "0")
    proc = subprocess.run([sys.executable, "-c", _GRAPH_FIRST_CALL], env=env, cwd=PACKAGE_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "graph ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


# negative_indices' range is checked in the stream while a CUDA graph is being captured (a device assert; the
# read-back of eager mode would end the capture with an error), and bank_cross_entropy's ignore_index masks rather
# than counting the kept rows on the host. A whole training step (forward and backward) captured, replayed with new
# values in its static inputs, against eager.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_indexed_mode_and_bank_cross_entropy_capture_into_a_cuda_graph(dtype):
    g = torch.Generator(device=CUDA).manual_seed(3)
    B, K, M, d = 37, 301, 50, 40

    def fresh():
        idx = torch.randint(-1, M, (B, K), device=CUDA, generator=g)
        targets = torch.randint(0, M, (B,), device=CUDA, generator=g)
        targets[::5] = -100
        return [torch.randn(n, d, device=CUDA, dtype=dtype, generator=g) for n in (B, B, M)] + [idx, targets]

    static = fresh()
    for x in static[:3]:
        x.requires_grad_(True)

    def step(a, p, bank, idx, targets):
        loss = cb.info_nce(a, p, bank, negative_indices=idx, temperature=0.1) + \
            cb.bank_cross_entropy(a, bank, targets, 0.5)
        return [loss] + list(torch.autograd.grad(loss, (a, p, bank)))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture, as torch.cuda.graph asks
            step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(*static)
    for replay in range(2):
        new = fresh()
        with torch.no_grad():
            for x, v in zip(static, new):
                x.copy_(v)
        graph.replay()
        torch.cuda.synchronize()
        eager = step(*[v.requires_grad_(True) if v.is_floating_point() else v for v in new])
        for got, want, name in zip(outs, eager, ("loss", "grad anchors", "grad positives", "grad bank")):
            assert_close_scaled(got, want, CUDA_TOL[dtype], f"replay {replay}: {name}")


_GRAPH_BAD_INDEX = """
import torch, contrastbound as cb
a, p = (torch.randn(8, 16, device="cuda") for _ in range(2))
bank = torch.randn(10, 16, device="cuda")
idx = torch.randint(0, 10, (8, 5), device="cuda")
cb.info_nce(a, p, bank, negative_indices=idx)  # warm-up
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    out = cb.info_nce(a, p, bank, negative_indices=idx)
print("captured", flush=True)
idx[3, 2] = 10
graph.replay()
torch.cuda.synchronize()
print("no assert")
"""


def test_an_out_of_range_index_in_a_captured_graph_is_a_device_assert():
    # As torch's own indexing on CUDA: the replay stops at a device assert (the context is lost: a subprocess).
    proc = subprocess.run([sys.executable, "-c", _GRAPH_BAD_INDEX], env=package_env(), cwd=PACKAGE_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert "captured" in proc.stdout and "no assert" not in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.returncode != 0 and "device-side assert" in proc.stderr, proc.stderr[-4000:]


def test_tensor_cores_extra_memory_is_o_b_plus_k():
    B, K, d = 1024, 2**20, 256
    g = torch.Generator(device=CUDA).manual_seed(0)
    a = torch.randn(B, d, device=CUDA, dtype=torch.bfloat16, generator=g).requires_grad_(True)
    p = torch.randn(B, d, device=CUDA, dtype=torch.bfloat16, generator=g).requires_grad_(True)
    n = torch.randn(K, d, device=CUDA, dtype=torch.bfloat16, generator=g).requires_grad_(True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = cb.info_nce(a, p, n, temperature=0.1)
    loss.backward()
    torch.cuda.synchronize()
    grads = sum(x.grad.numel() * x.grad.element_size() for x in (a, p, n))
    extra = torch.cuda.max_memory_allocated() - base - grads
    logits_bf16 = B * K * 2
    assert extra <= 0.05 * logits_bf16, f"extra {extra / 2**20:.1f} MiB vs bf16 logits {logits_bf16 / 2**20:.0f} MiB"


# A tensor temperature on the GPU is read by the kernels from device memory (never on the host).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("t_device", [CUDA, "cpu"])
def test_gpu_tensor_temperature_matches_cpu(mode, dtype, t_device):
    # t_device: where the GPU run's temperature lives (a CPU one is read on the host for free).
    a, p, n, idx = make_inputs(mode, B=37, K=301, d=40, dtype=dtype, M=50)
    outs = {}
    for device in ("cpu", CUDA):
        t = torch.tensor(0.07, dtype=torch.float32, device=t_device if device == CUDA else "cpu", requires_grad=True)
        xs = _leaves_on(device, dtype, a, p, n)
        leaves = [x for x in xs if x is not None] + [t]
        loss = cb.info_nce(xs[0], xs[1], xs[2], negative_indices=None if idx is None else idx.to(device),
                           temperature=t, reduction="none")
        upstream = torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype, device=device)
        outs[device] = [loss] + list(torch.autograd.grad(loss, leaves, upstream))
    tol = 2 * CUDA_TOL[dtype]
    names = ["loss"] + [name for name, x in zip("apn", (a, p, n)) if x is not None] + ["temperature"]
    for name, x, y in zip(names, outs[CUDA], outs["cpu"]):
        assert_close_scaled(x.cpu().double(), y.double(), tol, f"{name}: GPU vs CPU kernel")
        # and relative to the norm (the check above is absolute below magnitude 1: zeros would pass in bf16)
        assert _rel_err(x, y) <= tol, f"{name}: GPU vs CPU kernel, norm-relative error {_rel_err(x, y):.3g}"


@pytest.mark.parametrize("mode", ["shared", "in_batch"])
def test_cpu_features_with_a_gpu_temperature(mode):
    # The scaled op dispatches on every tensor argument: a GPU scale must not send CPU features to the GPU kernel.
    a, p, n, _ = make_inputs(mode, B=9, K=40, d=6, dtype=torch.float64)
    grads = {}
    for t_device in ("cpu", CUDA):
        t = torch.tensor(0.2, dtype=torch.float64, device=t_device, requires_grad=True)
        loss = cb.info_nce(a, p, n, temperature=t)
        leaves = [x for x in (a, p, n) if x is not None] + [t]
        grads[t_device] = [loss] + list(torch.autograd.grad(loss, leaves))
    for x, y in zip(grads[CUDA], grads["cpu"]):
        assert x.device.type == "cpu" or x.dim() == 0
        assert_close_scaled(x.cpu(), y, 1e-12, "CPU features, GPU temperature")


def test_gpu_tensor_temperature_does_not_synchronise():
    # torch's sync debug mode raises on any host read-back (item(), .cpu(), nonzero, ...) of torch's own calls.
    a, p, n, _ = make_inputs("shared", B=64, K=1000, d=32, dtype=torch.bfloat16, device=CUDA)
    t = torch.tensor(0.1, device=CUDA, requires_grad=True)
    scale = torch.tensor(20.0, device=CUDA, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = cb.info_nce(a, p, n, temperature=t) + cb.clip_loss(a, p, logit_scale=scale)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item() and t.grad is not None and scale.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("value", [-0.5, 0.0, float("nan"), float("inf")])
def test_bad_gpu_tensor_temperature_gives_nan(value, dtype):
    # Not read on the host, so no ValueError (a CPU tensor or a number gets one): the loss is NaN instead of a
    # finite number from a negative or infinite scale.
    a, p, n, _ = make_inputs("shared", B=8, K=100, d=16, dtype=dtype, device=CUDA)
    loss = cb.info_nce(a, p, n, temperature=torch.tensor(value, device=CUDA), reduction="none")
    assert torch.isnan(loss).all(), loss


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0, 0.0])
def test_bad_gpu_logit_scale_gives_nan(value):
    # Unread on the GPU: +inf must not be clamped to max_logit_scale (a finite loss), as a CPU value raises.
    a, p, _, _ = make_inputs("in_batch", B=8, K=0, d=16, dtype=torch.float32, device=CUDA)
    loss = cb.clip_loss(a, p, torch.tensor(value, device=CUDA), reduction="none")
    assert torch.isnan(loss).all(), loss


def test_infonce_module_checks_a_gpu_temperature_at_construction():
    # A fixed tensor temperature is read once, when the module is built: a bad GPU value is a ValueError there.
    with pytest.raises(ValueError, match="temperature"):
        cb.InfoNCE(temperature=torch.tensor(float("inf"), device=CUDA))
    with pytest.raises(ValueError, match="temperature"):
        cb.InfoNCE(temperature=torch.tensor(-0.1, device=CUDA))
    assert cb.InfoNCE(temperature=torch.tensor(0.2, device=CUDA)).temperature == pytest.approx(0.2)


def test_empirical_estimates_with_a_cpu_generator_match_the_cpu():
    # CUDA features with a CPU generator (as reproduce --device cuda passes): the draws are made on the CPU, so the
    # estimate equals the CPU one (it raised: a CPU generator cannot draw on a CUDA device).
    from contrastbound.empirical import contrastive_loss_curve, contrastive_loss_estimate

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(120, 6, generator=g), torch.arange(120) % 4
    cpu = contrastive_loss_estimate(x, y, 16, generator=torch.Generator().manual_seed(0))
    gpu = contrastive_loss_estimate(x.to(CUDA), y.to(CUDA), 16, generator=torch.Generator().manual_seed(0))
    assert float(gpu) == pytest.approx(float(cpu), rel=1e-5)
    curve = contrastive_loss_curve(x.to(CUDA), y.to(CUDA), [4, 16], generator=torch.Generator().manual_seed(0))
    assert float(curve[-1]) == pytest.approx(float(cpu), rel=1e-5)
