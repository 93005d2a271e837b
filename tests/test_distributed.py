"""torch.distributed with gloo on CPU: 2 and 3 processes against the single-process result."""

from __future__ import annotations

import datetime
import functools
import gc
import math
import os
import socket
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torch.nn.functional as F

import contrastbound as cb
from contrastbound import _backend
from contrastbound.distributed import all_gather_with_grad, gather_with_local_first, info_nce_sharded

from conftest import assert_close_scaled

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

D = 6
ANCHORS_PER_RANK = {2: [5, 3], 3: [4, 1, 6]}  # batch sizes differ across ranks
SHARDS = {2: [700, 333], 3: [0, 517, 612]}  # shard sizes differ; one rank may hold none


def _global_data():
    g = torch.Generator().manual_seed(0)
    B = 20
    a = torch.randn(B, D, generator=g, dtype=torch.float64)
    p = a + 0.4 * torch.randn(B, D, generator=g, dtype=torch.float64)
    bank = torch.randn(2000, D, generator=g, dtype=torch.float64)
    return a, p, bank


def _confident_data():
    """Anchors near e_1, positives near them, bank rows near -e_1 (float32-rounded, float64): every anchor's
    positive dominates at temperature 0.05 (losses ~1e-6)."""
    g = torch.Generator().manual_seed(5)
    e1 = torch.zeros(D, dtype=torch.float64)
    e1[0] = 1.0
    a = F.normalize(e1 + 0.1 * torch.randn(20, D, generator=g, dtype=torch.float64), dim=1)
    p = a + 0.02 * torch.randn(20, D, generator=g, dtype=torch.float64)
    bank = F.normalize(-e1 + 0.5 * torch.randn(2000, D, generator=g, dtype=torch.float64), dim=1)
    return tuple(x.float().double() for x in (a, p, bank))


def _slices(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _gloo_threads() -> list[str]:
    """This process's threads that torch's gloo backend started (its work loops and its transport's event loop)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # (the thread ended meanwhile)
            pass
    return [n for n in names if "gloo" in n]


def _gloo_worker(**init_kwargs):
    """A spawned rank (_run_ranks starts them): joins a gloo group of ``world`` processes through ``init_file``, runs
    the decorated ``body(rank, world)``, saves what it returns to ``out_dir``, then frees the group while the
    interpreter is still whole.

    torch's gloo work threads drop a finished collective's tensors after the waiting rank has moved on, and dropping
    a tensor made in Python takes the GIL. Where the group outlives destroy_process_group (a local
    ``w = dist.group.WORLD`` in the frame that calls it, a frame kept by an exception's reference cycle, a live
    DistributedDataParallel module, torch.distributed.nn first imported while the group exists) and the rank exits
    at once, such a thread can still be waiting for the GIL when the interpreter finalises; it is ended inside C++
    and the rank aborts ("terminate called without an active exception": 1 in ~30 runs of the supcon worker on 3
    ranks, 2 cores, before this wrapper). Here the body's frame is gone and its cycles are collected before
    destroy_process_group, so the group's last reference goes there and its destructor joins those threads
    (releasing the GIL to do so). A successful body then leaves no gloo thread behind, which is checked: a group
    kept by the library (a cache, a module) fails it."""

    def wrap(body):
        @functools.wraps(body)  # (spawn pickles the wrapper by the body's module-level name)
        def worker(rank, world, init_file, out_dir):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            # (this module's import of contrastbound, before the group exists, imports torch.distributed.nn, which
            # would keep a group that exists at its first import: the check below covers that too)
            dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                    **init_kwargs)
            try:
                torch.save(body(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
            finally:
                gc.collect()
                dist.destroy_process_group()
            # (a joined thread can still be listed for a moment: the kernel wakes its joiner before removing it)
            deadline = time.monotonic() + 5.0
            while (left := _gloo_threads()) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not left, f"rank {rank}: gloo threads outlive destroy_process_group: {left}"

        return worker

    return wrap


def _run_ranks(worker, world: int) -> list:
    """Runs ``world`` ranks of a _gloo_worker and returns what each rank's body returned, by rank."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]


def WORLD_GROUP():
    return dist.group.WORLD


def _in_batch_labels(n: int) -> torch.Tensor:
    """Labels of the global batch's rows for the in-batch labels case: 4 classes, so each rank sees others' rows of
    its anchors' classes."""
    return torch.arange(n) % 4


def _bank_labels(world: int) -> torch.Tensor:
    """Labels of the bank's rows for the sharded labels case: 4 classes, the first non-empty shard all of class 0
    (its partial log-sum-exp is -inf for anchors of class 0, the other shards' finite)."""
    first = next(s for s in SHARDS[world] if s)
    k = torch.arange(sum(SHARDS[world]))
    return torch.where(k < first, 0, k % 4)


# (a bounded wait: a lone refusal that fails to reach the other ranks fails the test rather than hanging it)
@_gloo_worker(timeout=datetime.timedelta(seconds=120))
def _worker(rank, world):
    torch.set_num_threads(1)
    a, p, bank = _global_data()
    rows = _slices(ANCHORS_PER_RANK[world], rank)
    shard_rows = _slices(SHARDS[world], rank)
    K = sum(SHARDS[world])
    a_r = a[rows].clone().requires_grad_(True)
    p_r = p[rows].clone().requires_grad_(True)
    shard = bank[:K][shard_rows].clone().requires_grad_(True)
    # shard strategy
    loss = cb.info_nce(a_r, p_r, shard, temperature=0.2, process_group=dist.group.WORLD)
    loss.backward()
    # forward-mode AD is refused (before any collective, on every rank alike)
    refused = False
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(a_r.detach(), torch.ones_like(a_r))
        try:
            cb.info_nce(dual, p_r.detach(), shard.detach(), temperature=0.2, process_group=dist.group.WORLD)
        except NotImplementedError:
            refused = True
    try:  # and so are the differentiating torch.func transforms
        torch.func.grad(lambda x: cb.info_nce(x, p_r.detach(), shard.detach(), process_group=dist.group.WORLD))(
            a_r.detach()
        )
        refused = False
    except NotImplementedError:
        pass
    # in-batch over the global batch: every rank's positives but anchor i's own are its negatives
    ib_a = a[rows].clone().requires_grad_(True)
    ib_p = p[rows].clone().requires_grad_(True)
    ib = cb.info_nce(ib_a, ib_p, None, temperature=0.3, process_group=dist.group.WORLD)
    ib.backward()
    module = cb.InfoNCE(temperature=0.3, process_group=dist.group.WORLD)(a[rows], p[rows])  # the same loss
    # with labels (int32 on one rank): every rank's positives of the anchor's label left out, gathered with them
    lab_a = a[rows].clone().requires_grad_(True)
    lab_p = p[rows].clone().requires_grad_(True)
    y = _in_batch_labels(sum(ANCHORS_PER_RANK[world]))[rows]
    ib_labels = cb.info_nce(lab_a, lab_p, None, temperature=0.3, labels=y.to(torch.int32 if rank else torch.int64),
                            reduction="sum", process_group=dist.group.WORLD)
    ib_labels.backward()
    # a bank shard with labels (int32 on one rank): every rank's rows of the anchor's label left out
    yb = _bank_labels(world)[shard_rows]
    sl = [x.clone().requires_grad_(True) for x in (a[rows], p[rows], bank[:K][shard_rows])]
    sl_loss = cb.info_nce(*sl, temperature=0.2, labels=y.to(torch.int32 if rank else torch.int64),
                          negative_labels=yb, reduction="sum", process_group=dist.group.WORLD)
    sl_loss.backward()
    # every shard empty (step 0 of a sharded queue): loss 0 and zero gradients, not NaN
    e_a = a[rows].clone().requires_grad_(True)
    empty = cb.info_nce(e_a, p[rows], bank[:0].clone().requires_grad_(True), process_group=dist.group.WORLD)
    empty.backward()
    # without the compiled kernel (the reference recomputes the shard's partial log-sum-exp in backward)
    fb = [x.clone().requires_grad_(True) for x in (a[rows], p[rows], bank[:K][shard_rows])]
    f32 = [x.detach().float() for x in fb]
    kernel32 = cb.info_nce(*f32, temperature=0.2, process_group=dist.group.WORLD)
    had_kernel, _backend.HAS_CPU_KERNEL = _backend.HAS_CPU_KERNEL, False
    try:
        fb_loss = cb.info_nce(*fb, temperature=0.2, process_group=dist.group.WORLD)
        fb_loss.backward()
        sl_fb = [x.detach().clone().requires_grad_(True) for x in sl]
        sl_fb_loss = cb.info_nce(*sl_fb, temperature=0.2, labels=y, negative_labels=yb, reduction="sum",
                                 process_group=dist.group.WORLD)
        sl_fb_loss.backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the fallback keeps float32, as the kernel
            fb_autocast = cb.info_nce(*f32, temperature=0.2, process_group=dist.group.WORLD)
    finally:
        _backend.HAS_CPU_KERNEL = had_kernel
    fb_autocast_error = float((fb_autocast - kernel32).abs())
    # confident anchors in float32 (losses ~1e-6)
    ca, cp, cbank = _confident_data()
    confident = cb.info_nce(ca[rows].float(), cp[rows].float(), cbank[:K][shard_rows].float(), temperature=0.05,
                            reduction="none", process_group=dist.group.WORLD)
    # ranks that disagree on the feature size or dtype: the same ValueError on every rank, not an abort
    mismatch = []
    for x in (torch.zeros(2, 3 + rank), torch.zeros(2, 3, dtype=torch.float64 if rank else torch.float32),
              torch.zeros(2, 2, 3, 4) if rank == 0 else torch.zeros(2, 2, 4, 3),  # same element count
              # rows of 8 dimensions differing past the sixth (compared by element count alone before: rank 1's
              # rows reached rank 0 reinterpreted as (..., 3, 4))
              torch.zeros(2, 1, 1, 1, 1, 1, 1, 3, 4) if rank == 0 else torch.zeros(2, 1, 1, 1, 1, 1, 1, 4, 3)):
        try:
            all_gather_with_grad(x)
        except ValueError as exc:
            mismatch.append(str(exc))
    try:
        cb.info_nce(torch.zeros(2, 3 + rank), torch.zeros(2, 3 + rank), None, process_group=dist.group.WORLD)
    except ValueError as exc:
        mismatch.append(str(exc))
    # ranks that disagree on the call, a setting or the gradients: the same ValueError on every rank (before, one
    # rank in-batch and one with a shard gathered each other's anchors as positives, silently, then timed out;
    # different requires_grad hung in backward; different temperatures or normalize mixed unlike losses)
    x, w = torch.randn(3, 4), WORLD_GROUP()
    disagree = []
    for call in (lambda: cb.info_nce(x, x, None if rank == 0 else torch.randn(5, 4), process_group=w),
                 lambda: cb.info_nce(x, x, None, temperature=0.2 + 0.1 * rank, process_group=w),
                 lambda: cb.info_nce(x, x, torch.randn(5, 4), normalize=rank == 0, process_group=w),
                 lambda: cb.info_nce(x, x.clone().requires_grad_(rank == 0), None, process_group=w),
                 lambda: cb.info_nce(x, x, torch.randn(5, 4).requires_grad_(rank == 0), process_group=w),
                 lambda: (cb.nt_xent(x, x, 0.2, process_group=w) if rank
                          else cb.clip_loss(x, x, 5.0, process_group=w)),
                 lambda: cb.clip_loss(x, torch.randn(3, 4 + rank)[:, :4] if rank else x, 5.0, process_group=w),
                 lambda: cb.clip_loss(torch.randn(3, 4 + rank), torch.randn(3, 4 + rank), 5.0, process_group=w),
                 # tensor temperatures (logit scales) that differ: accepted without a word before
                 lambda: cb.info_nce(x, x, None, temperature=torch.tensor(0.2 + 0.1 * rank), process_group=w),
                 lambda: cb.nt_xent(x, x, torch.tensor(0.2 + 0.1 * rank, requires_grad=True), process_group=w),
                 lambda: cb.clip_loss(x, x, torch.tensor(5.0 + rank), process_group=w),
                 # equal ones (a replicated parameter) pass
                 lambda: cb.clip_loss(x, x, torch.tensor(5.0, requires_grad=True), process_group=w),
                 # in-batch labels on one rank only (the others would gather no labels)
                 lambda: cb.info_nce(x, x, None, labels=torch.arange(3) if rank == 0 else None, process_group=w),
                 # a bank shard's labels on one rank only
                 lambda: cb.info_nce(x, x, torch.randn(5, 4), labels=torch.arange(3) if rank == 0 else None,
                                     negative_labels=torch.arange(5) if rank == 0 else None, process_group=w)):
        try:
            call()
            disagree.append(None)
        except ValueError as exc:
            disagree.append(str(exc))
    # a rank that refuses its own arguments (a shard of another feature size, a learnable temperature, a bad
    # reduction) while the others proceed: before, they waited in the first exchange until the backend's
    # timeout; now every rank raises (the refusing one its own error)
    refused = []
    learnable = torch.tensor(0.2, requires_grad=True)
    for call in (lambda: cb.info_nce(x, x, torch.randn(5, 4 + (rank == 1)), process_group=w),
                 lambda: cb.info_nce(x, x, torch.randn(5, 4), temperature=learnable if rank == 1 else 0.2,
                                     process_group=w),
                 lambda: cb.info_nce(x, x, None, reduction="mean" if rank != 1 else "avg", process_group=w),
                 lambda: cb.nt_xent(x, x if rank != 1 else x[:2], 0.2, process_group=w),
                 lambda: cb.clip_loss(x, x, 5.0 if rank != 1 else -1.0, process_group=w),
                 lambda: cb.info_nce(x, x, torch.randn(5, 4), process_group=w,
                                     negative_indices=torch.zeros(3, 2, dtype=torch.long) if rank == 1 else None),
                 lambda: cb.info_nce(x, x, None, process_group=w,
                                     negative_indices=torch.zeros(3, 2, dtype=torch.long) if rank == 1 else None),
                 lambda: cb.info_nce(x, x, torch.randn(5, 4), labels=torch.arange(3),
                                     negative_labels=torch.arange(5 if rank != 1 else 4), process_group=w),
                 # a temperature too small for float32 features (checked after the exchange before: the
                 # others went on and waited in backward)
                 lambda: cb.info_nce(x, x, None, process_group=w,
                                     temperature=torch.tensor(1e-300 if rank == 1 else 0.2, dtype=torch.float64)),
                 lambda: cb.nt_xent(x, x, torch.tensor(1e-300 if rank == 1 else 0.2, dtype=torch.float64),
                                    process_group=w),
                 # a meta temperature (no value): refused after the exchange before
                 lambda: cb.info_nce(x, x, None, process_group=w,
                                     temperature=torch.tensor(0.2, device="meta" if rank == 1 else "cpu")),
                 lambda: cb.nt_xent(x, x, torch.tensor(0.2, device="meta" if rank == 1 else "cpu"),
                                    process_group=w),
                 lambda: cb.info_nce(x, x, torch.randn(5, 4), process_group=w,
                                     temperature=torch.tensor(0.2, device="meta" if rank == 1 else "cpu")),
                 # a shard on another device than the rank's features (meta standing in for a CPU shard beside
                 # CUDA features): refused after the exchange before, the others waiting in the lse gather
                 lambda: cb.info_nce(x, x, torch.randn(5, 4, device="meta" if rank == 1 else "cpu"),
                                     process_group=w),
                 # the gather's own refusals (before, the others' first exchange paired with this rank's next
                 # call: another step's rows, silently, or a hang)
                 lambda: all_gather_with_grad(x if rank != 1 else torch.tensor(1.0), group=w),
                 lambda: all_gather_with_grad(x if rank != 1 else [1.0, 2.0], group=w),
                 # a meta first argument (the joining exchange was made on its device, failed, and the others
                 # waited until the backend's timeout; the gather read its size back: a RuntimeError, unjoined)
                 lambda: cb.info_nce(x if rank != 1 else x.to("meta"), x, None, 0.2, process_group=w),
                 lambda: cb.nt_xent(x if rank != 1 else x.to("meta"), x, 0.2, process_group=w),
                 lambda: cb.supcon_loss(x if rank != 1 else x.to("meta"), torch.arange(3), 0.2, process_group=w),
                 lambda: all_gather_with_grad(x if rank != 1 else x.to("meta"), group=w)):
        try:
            call()
            refused.append(None)
        except (ValueError, TypeError) as exc:
            refused.append(str(exc))
    # second derivatives through all_gather_with_grad: rank r's loss sum(y^3) over the gathered y; the
    # gradient of x_r is the sum over ranks, W 3 x_r^2, and its derivative W 6 x_r (the backward's all_reduce
    # is differentiable; the in-place one dropped the sum over ranks: 6 x_r)
    xg = (torch.tensor([[1.0, 2.0]], dtype=torch.float64) + rank).requires_grad_(True)
    (g1,) = torch.autograd.grad((all_gather_with_grad(xg) ** 3).sum(), xg, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), xg)
    second_order = (g1.detach(), g2, xg.detach())
    # a rank without rows (the end of an uneven epoch) still gathers the others'
    rows_gathered = tuple(all_gather_with_grad(torch.full((0 if rank == 0 else 2, 3), float(rank))).shape)
    # gather strategy: all_gather_with_grad's gathered positives as a shared bank (each anchor's positive is
    # then in its denominator twice: once as the positive, once as a bank row)
    z = a[rows].clone().requires_grad_(True)
    zp = p[rows].clone().requires_grad_(True)
    zp_all = all_gather_with_grad(zp)
    start = sum(ANCHORS_PER_RANK[world][:rank])
    logits_loss = cb.info_nce(z, zp_all[start : start + z.shape[0]], zp_all, temperature=0.3)
    logits_loss.backward()
    # nt_xent and clip_loss over the global batch
    v1 = a[rows].clone().requires_grad_(True)
    v2 = p[rows].clone().requires_grad_(True)
    nt = cb.nt_xent(v1, v2, 0.3, process_group=dist.group.WORLD)
    nt.backward()
    i1 = a[rows].clone().requires_grad_(True)
    t1 = p[rows].clone().requires_grad_(True)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    cl = cb.clip_loss(i1, t1, scale, process_group=dist.group.WORLD)
    cl.backward()
    return (
        {"loss": loss.detach(), "refused_forward_ad": refused, "ga": a_r.grad, "gp": p_r.grad, "gn": shard.grad,
         "gather_loss": logits_loss.detach(), "gz": z.grad, "gzp": zp.grad,
         "nt": nt.detach(), "gv1": v1.grad, "gv2": v2.grad,
         "clip": cl.detach(), "gi": i1.grad, "gt": t1.grad, "gscale": scale.grad,
         "ib": ib.detach(), "ib_module": module.detach(), "g_ib_a": ib_a.grad, "g_ib_p": ib_p.grad,
         "ib_labels": ib_labels.detach(), "g_lab_a": lab_a.grad, "g_lab_p": lab_p.grad,
         "shard_labels": [sl_loss.detach(), *(x.grad for x in sl)],
         "shard_labels_fb": [sl_fb_loss.detach(), *(x.grad for x in sl_fb)],
         "empty": empty.detach(), "g_empty": e_a.grad, "mismatch": mismatch, "disagree": disagree,
         "refused": refused, "second_order": second_order,
         "rows_gathered": rows_gathered,
         "fb_loss": fb_loss.detach(), "fb_grads": [x.grad for x in fb], "fb_autocast_error": fb_autocast_error,
         "confident": confident.detach()}
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_bank_and_gather_match_single_process(world):
    results = _run_ranks(_worker, world)
    assert all(r["refused_forward_ad"] for r in results)

    a, p, bank = _global_data()
    K = sum(SHARDS[world])
    bank_full = bank[:K].clone().requires_grad_(True)
    shard_grad_total = torch.zeros_like(bank_full)
    zp_full = p.clone().requires_grad_(True)
    for rank in range(world):
        rows = _slices(ANCHORS_PER_RANK[world], rank)
        a_r = a[rows].clone().requires_grad_(True)
        p_r = p[rows].clone().requires_grad_(True)
        loss = cb.info_nce(a_r, p_r, bank_full, temperature=0.2)
        ga, gp, gn = torch.autograd.grad(loss, [a_r, p_r, bank_full])
        shard_grad_total += gn
        res = results[rank]
        assert_close_scaled(res["loss"], loss, 1e-10, f"rank {rank} loss")
        assert_close_scaled(res["ga"], ga, 1e-10, f"rank {rank} anchors grad")
        assert_close_scaled(res["gp"], gp, 1e-10, f"rank {rank} positives grad")
        for got, want, what in zip([res["fb_loss"], *res["fb_grads"]], [loss, ga, gp],
                                   ["loss", "anchors grad", "positives grad"]):
            assert_close_scaled(got, want, 1e-10, f"rank {rank} without the kernel: {what}")
        # float32 confident losses against float64 softplus(lse_neg - l_0) at the rounded inputs: the sharded loss as
        # logaddexp(l_0, lse_neg) - l_0 lost them to the rounding of the sum.
        ca, cp, cn = (F.normalize(x, dim=1) for x in _confident_data())
        ca, cp, cn = ca[rows], cp[rows], cn[:K]
        want = F.softplus(torch.logsumexp(ca @ cn.T / 0.05, 1) - (ca * cp).sum(1) / 0.05)
        assert want.max() < 1e-3
        rel = ((res["confident"].double() - want).abs() / want).max().item()
        assert rel < 1e-4, (rank, rel)
        assert res["fb_autocast_error"] < 1e-4, res["fb_autocast_error"]  # bfloat16 logits were 7.5e-2 off
        assert res["rows_gathered"] == (2 * (world - 1), 3)
        assert float(res["empty"]) == 0.0 and torch.equal(res["g_empty"], torch.zeros_like(res["g_empty"]))
        assert len(res["mismatch"]) == 5 and all("same shape past the first dimension" in m for m in res["mismatch"])
        assert "rows of shape (1, 1, 1, 1, 1) x ..." in res["mismatch"][3], res["mismatch"][3]
        assert res["mismatch"][4].startswith("positives (in the promoted dtype of anchors and positives) must have")
        assert "(one of float64, float32, float16, bfloat16)" in res["mismatch"][4], res["mismatch"][4]
        got = res["disagree"]
        want = ["must make the same call", "temperature (or logit scale) must be the same",
                "normalize must be the same", "different collectives in backward",
                "different collectives in backward", "must make the same call", None,
                "text_features (in the promoted dtype of image_features and text_features) must have",
                "temperature (or logit scale) must be the same", "temperature (or logit scale) must be the same",
                "temperature (or logit scale) must be the same", None, "must make the same call",
                "must make the same call"]
        assert len(got) == len(want), got
        for g, w in zip(got, want):
            assert (g is None) if w is None else (g is not None and w in g), (g, w)
        assert got == results[0]["disagree"]  # the same message on every rank
        g1, g2, xg = res["second_order"]
        torch.testing.assert_close(g1, world * 3 * xg**2)
        torch.testing.assert_close(g2, world * 6 * xg)
        assert len(res["refused"]) == 20, res["refused"]
        for i, msg in enumerate(res["refused"]):
            if rank == 1:
                assert msg is not None and "refused its arguments" not in msg, (i, msg)  # its own error
            else:
                assert msg is not None and "rank 1 of process_group refused its arguments" in msg, (i, msg)
        # gather strategy: rank r's loss uses the global positives as negatives
        n_all = sum(ANCHORS_PER_RANK[world])
        total_rows = slice(0, n_all)
        z = a[rows].clone().requires_grad_(True)
        gl = cb.info_nce(z, zp_full[rows], zp_full[total_rows], temperature=0.3)
        (gz,) = torch.autograd.grad(gl, [z], retain_graph=True)
        gl.backward()
        assert_close_scaled(res["gather_loss"], gl, 1e-10, f"rank {rank} gather loss")
        assert_close_scaled(res["gz"], gz, 1e-10, f"rank {rank} gather anchors grad")
    # in-batch over the global batch, from the logits: rank r's loss is cross-entropy over its own rows of
    # s A P^T (target i); the features get the gradient of the sum of all ranks' losses
    n_all = sum(ANCHORS_PER_RANK[world])
    ib_a, ib_p = a[:n_all].clone().requires_grad_(True), p[:n_all].clone().requires_grad_(True)
    logits = F.normalize(ib_a, dim=1) @ F.normalize(ib_p, dim=1).T / 0.3
    per_anchor = F.cross_entropy(logits, torch.arange(n_all), reduction="none")
    ib_total = 0.0
    for rank in range(world):
        rows = _slices(ANCHORS_PER_RANK[world], rank)
        assert_close_scaled(results[rank]["ib"], per_anchor[rows].mean(), 1e-10, f"rank {rank} global in-batch loss")
        assert_close_scaled(results[rank]["ib_module"], per_anchor[rows].mean(), 1e-10, f"rank {rank} InfoNCE module")
        ib_total = ib_total + per_anchor[rows].mean()
    g_ib_a, g_ib_p = torch.autograd.grad(ib_total, [ib_a, ib_p])
    for rank in range(world):
        rows = _slices(ANCHORS_PER_RANK[world], rank)
        assert_close_scaled(results[rank]["g_ib_a"], g_ib_a[rows], 1e-10, f"rank {rank} global in-batch anchors grad")
        assert_close_scaled(results[rank]["g_ib_p"], g_ib_p[rows], 1e-10, f"rank {rank} global in-batch positives grad")
    # with labels: the same logits with every other pair of the anchor's label out of its sum ("sum" per rank)
    y = _in_batch_labels(n_all)
    logits = F.normalize(ib_a, dim=1) @ F.normalize(ib_p, dim=1).T / 0.3  # (a graph of its own)
    left_out = (y[:, None] == y[None, :]) & ~torch.eye(n_all, dtype=torch.bool)
    assert bool(left_out.any())
    per_anchor = F.cross_entropy(logits.masked_fill(left_out, float("-inf")), torch.arange(n_all), reduction="none")
    assert (per_anchor - F.cross_entropy(logits, torch.arange(n_all), reduction="none")).abs().max() > 1e-2
    for rank in range(world):
        rows = _slices(ANCHORS_PER_RANK[world], rank)
        assert_close_scaled(results[rank]["ib_labels"], per_anchor[rows].sum(), 1e-10, f"rank {rank} labels loss")
    g_ib_a, g_ib_p = torch.autograd.grad(per_anchor.sum(), [ib_a, ib_p])
    for rank in range(world):
        rows = _slices(ANCHORS_PER_RANK[world], rank)
        assert_close_scaled(results[rank]["g_lab_a"], g_ib_a[rows], 1e-10, f"rank {rank} labels anchors grad")
        assert_close_scaled(results[rank]["g_lab_p"], g_ib_p[rows], 1e-10, f"rank {rank} labels positives grad")
    # a bank shard with labels: rank r's anchors against the whole bank, its rows of the anchor's label out of the
    # sum (from the logits: the positive first, then the masked bank); the shard gets every rank's losses' gradient
    yb = _bank_labels(world)
    bank_l = bank[:K].clone().requires_grad_(True)
    total, total_plain, whole_shard_out = 0.0, 0.0, False
    for rank in range(world):
        rows = _slices(ANCHORS_PER_RANK[world], rank)
        a_r, p_r = a[rows].clone().requires_grad_(True), p[rows].clone().requires_grad_(True)
        an, pn, bn = (F.normalize(x, dim=1) for x in (a_r, p_r, bank_l))
        pos = (an * pn).sum(1, keepdim=True) / 0.2
        neg = an @ bn.T / 0.2
        same = yb[None, :] == y[rows][:, None]
        first = slice(0, SHARDS[world][0] or SHARDS[world][1])
        whole_shard_out = whole_shard_out or bool(same[:, first].all(dim=1).any())
        want = (torch.logsumexp(torch.cat([pos, neg.masked_fill(same, float("-inf"))], 1), 1) - pos[:, 0]).sum()
        plain = (torch.logsumexp(torch.cat([pos, neg], 1), 1) - pos[:, 0]).sum()
        ga, gp = torch.autograd.grad(want, [a_r, p_r], retain_graph=True)
        total, total_plain = total + want, total_plain + plain.detach()
        for key in ("shard_labels", "shard_labels_fb"):
            got = results[rank][key]
            assert_close_scaled(got[0], want, 1e-10, f"rank {rank} {key} loss")
            assert_close_scaled(got[1], ga, 1e-10, f"rank {rank} {key} anchors grad")
            assert_close_scaled(got[2], gp, 1e-10, f"rank {rank} {key} positives grad")
    assert whole_shard_out  # an anchor whose partial log-sum-exp over the first shard is -inf
    assert abs(float(total.detach()) - float(total_plain)) > 1e-2  # the labels change the loss
    (gn,) = torch.autograd.grad(total, [bank_l])
    for rank in range(world):
        shard_rows = _slices(SHARDS[world], rank)
        for key in ("shard_labels", "shard_labels_fb"):
            assert_close_scaled(results[rank][key][3], gn[shard_rows], 1e-10, f"rank {rank} {key} shard grad")
    # nt_xent / clip_loss: rank r's loss is the global loss restricted to its own views / pairs; features get
    # the gradient of the sum of all ranks' losses; the logit scale gets this rank's own loss gradient.
    n_all = sum(ANCHORS_PER_RANK[world])
    v1, v2 = a[:n_all].clone().requires_grad_(True), p[:n_all].clone().requires_grad_(True)
    per_view = cb.nt_xent(v1, v2, 0.3, reduction="none")
    i1, t1 = a[:n_all].clone().requires_grad_(True), p[:n_all].clone().requires_grad_(True)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    per_pair = cb.clip_loss(i1, t1, scale, reduction="none")
    nt_total, clip_total = 0.0, 0.0
    for rank in range(world):
        rows = _slices(ANCHORS_PER_RANK[world], rank)
        idx = torch.arange(n_all)[rows]
        nt_r = torch.cat([per_view[idx], per_view[n_all + idx]]).mean()
        clip_r = per_pair[idx].mean()
        assert_close_scaled(results[rank]["nt"], nt_r, 1e-10, f"rank {rank} nt_xent")
        assert_close_scaled(results[rank]["clip"], clip_r, 1e-10, f"rank {rank} clip_loss")
        (gs,) = torch.autograd.grad(clip_r, [scale], retain_graph=True)
        assert_close_scaled(results[rank]["gscale"], gs, 1e-10, f"rank {rank} logit_scale grad")
        nt_total, clip_total = nt_total + nt_r, clip_total + clip_r
    g1, g2 = torch.autograd.grad(nt_total, [v1, v2])
    gi, gt = torch.autograd.grad(clip_total, [i1, t1])
    for rank in range(world):
        rows = _slices(ANCHORS_PER_RANK[world], rank)
        assert_close_scaled(results[rank]["gv1"], g1[rows], 1e-10, f"rank {rank} nt_xent z1 grad")
        assert_close_scaled(results[rank]["gv2"], g2[rows], 1e-10, f"rank {rank} nt_xent z2 grad")
        assert_close_scaled(results[rank]["gi"], gi[rows], 1e-10, f"rank {rank} clip image grad")
        assert_close_scaled(results[rank]["gt"], gt[rows], 1e-10, f"rank {rank} clip text grad")

    for rank in range(world):
        shard_rows = _slices(SHARDS[world], rank)
        assert_close_scaled(results[rank]["gn"], shard_grad_total[shard_rows], 1e-10, f"rank {rank} shard grad")
        assert_close_scaled(results[rank]["fb_grads"][2], shard_grad_total[shard_rows], 1e-10,
                            f"rank {rank} shard grad without the kernel")
        rows = _slices(ANCHORS_PER_RANK[world], rank)
        # the gathered positives' gradient is the sum over ranks' losses
        assert_close_scaled(results[rank]["gzp"], zp_full.grad[rows], 1e-10, f"rank {rank} gathered grad")


@_gloo_worker()
def _ddp_queue_worker(rank, world):
    # a queue whose buffers DDP overwrites with rank 0's (restored on rank 0 only): every rank sees rank 0's (and
    # the DDP module, gone with this frame, no longer holds the group when the wrapper destroys it)
    model = torch.nn.Linear(2, 2)
    model.queue = cb.NegativeQueue(4, 2)
    if rank == 0:
        model.queue.enqueue(torch.ones(3, 2))
    torch.nn.parallel.DistributedDataParallel(model)
    state = (len(model.queue), tuple(model.queue.negatives().shape))
    model.queue.enqueue(torch.zeros(1, 2))  # at slot 3 on every rank
    state += (model.queue.queue.sum().item(), len(model.queue))
    return state


@pytest.mark.parametrize("world", [2, 3])
def test_a_queue_under_ddp_holds_rank_0s_buffers_on_every_rank(world):
    results = _run_ranks(_ddp_queue_worker, world)
    assert results == [(3, (3, 2), 6.0, 4)] * world


_LEARNABLE_TEMPERATURE_THEN_EXIT = """
import os, sys, tempfile, time
import contrastbound as cb
import torch, torch.distributed as dist
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
assert "torch._dynamo" not in sys.modules
dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "init"), rank=0, world_size=1)
x = torch.randn(5, 4, requires_grad=True)
cb.info_nce(x, x, None, temperature=torch.tensor(0.2, requires_grad=True), process_group=dist.group.WORLD).backward()
assert "torch._dynamo" in sys.modules  # (imported by the learnable temperature's first call, the group alive)
dist.destroy_process_group()
sys.path.insert(0, sys.argv[1])
from test_distributed import _gloo_threads
deadline = time.monotonic() + 5.0
while (left := _gloo_threads()) and time.monotonic() < deadline:
    time.sleep(0.01)
print("left", left)
"""


def test_a_learnable_temperature_with_a_group_leaves_the_group_free_to_go():
    """A user's script: contrastbound imported first, then the group, whose first learnable-temperature call imports
    torch._dynamo (and so torch.distributed.nn, which keeps a group alive that exists at its first import): after
    destroy_process_group no gloo thread remains (the package imported torch.distributed.nn before the group)."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", _LEARNABLE_TEMPERATURE_THEN_EXIT, os.path.dirname(__file__)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "left []", done.stdout


def test_needs_initialised_process_group():
    x = torch.randn(3, 2)
    with pytest.raises(RuntimeError, match="init"):
        all_gather_with_grad(x)
    from contrastbound.distributed import gather_with_local_first

    for gather in (all_gather_with_grad, gather_with_local_first):  # (a sparse tensor: a memory-format error)
        with pytest.raises(TypeError, match="tensor must be a dense"):
            gather(x.to_sparse())
    # a group object that no init_process_group made (anything else is refused by type first: test below)
    group = dist.ProcessGroup(dist.HashStore(), 0, 1)
    for name, call in [
        ("info_nce", lambda: cb.info_nce(x, x, None, process_group=group)),  # in-batch over the global batch
        ("info_nce", lambda: cb.info_nce(x, x, x, process_group=group)),  # sharded bank
        ("nt_xent", lambda: cb.nt_xent(x, x, process_group=group)),
        ("clip_loss", lambda: cb.clip_loss(x, x, 10.0, process_group=group)),
    ]:
        with pytest.raises(RuntimeError, match=f"{name} with process_group needs torch.distributed to be initialised"):
            call()
    with pytest.raises(ValueError, match="negative_indices"):
        cb.info_nce(x, x, x, negative_indices=torch.zeros(3, 1, dtype=torch.long), process_group=group)


def test_loss_modules_built_before_init_warn_and_take_world_looked_up_at_each_call(tmp_path, monkeypatch):
    # An exploratory review (2026-12-06): NTXent(process_group=dist.group.WORLD) built before init_process_group
    # (a framework's usual order) kept None, what WORLD reads then, and computed each rank's loss alone at every
    # step without a word. Now a None given on purpose before init warns, and process_group="world" is looked up
    # at each call. One process (gloo, world size 1); the group each forward passes on is read from the function.
    import warnings

    from contrastbound import functional

    assert not dist.is_initialized()
    modules = (cb.InfoNCE, cb.NTXent, cb.SupCon, cb.ClipLoss, cb.SigLIP)
    for cls in modules:
        with pytest.warns(UserWarning, match=rf"{cls.__name__}\(process_group=None\) while torch.distributed is "
                                             r"not initialised: .* or pass process_group='world'"):
            cls(process_group=dist.group.WORLD)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the default (a per-rank loss) and "world" say nothing
            cls()
            cls(process_group="world")
        with pytest.raises(ValueError, match=rf"{cls.__name__}: process_group must be a torch.distributed "
                                             r"ProcessGroup, None or 'world'"):
            cls(process_group="WORLD")
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="process_group='world' needs torch.distributed to be initialised"):
        cb.NTXent(process_group="world")(x, x)
    seen = []
    for name in ("info_nce", "nt_xent", "supcon_loss", "clip_loss", "siglip_loss"):
        real = getattr(functional, name)
        monkeypatch.setattr(functional, name, lambda *a, _real=real, **k: (seen.append(k["process_group"]),
                                                                              _real(*a, **k))[1])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        calls = {cb.InfoNCE: (x, x), cb.NTXent: (x, x), cb.SupCon: (x, torch.tensor([0, 1, 0, 1])),
                 cb.ClipLoss: (x, x), cb.SigLIP: (x, x)}
        for cls in modules:
            seen.clear()
            world, local = cls(process_group="world")(*calls[cls]), cls()(*calls[cls])
            assert seen == [dist.group.WORLD, None], (cls, seen)
            torch.testing.assert_close(world, local)  # (one rank: the same loss)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # after init, None is a choice
            cb.InfoNCE(process_group=None)
    finally:
        dist.destroy_process_group()


def test_a_process_group_that_is_not_one_is_named(tmp_path):
    # With torch.distributed up, a string or a bool as the group reached torch's internals: AttributeError "'str'
    # object has no attribute 'size'". One process (gloo, world size 1).
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        x = torch.randn(3, 2)
        for call in (lambda: cb.info_nce(x, x, x, process_group=True),
                     lambda: cb.nt_xent(x, x, process_group=1),
                     lambda: all_gather_with_grad(x, group=object())):
            with pytest.raises(TypeError, match="(process_)?group must be a torch.distributed ProcessGroup"):
                call()
        for call in (lambda: cb.info_nce(x, x, None, process_group="WORLD"),  # (a string other than "world")
                     lambda: cb.clip_loss(x, x, 10.0, process_group="WORLD"),
                     lambda: all_gather_with_grad(x, group="bad")):
            with pytest.raises(ValueError, match="(process_)?group must be a torch.distributed ProcessGroup, None "
                                                 "or 'world' .*got '(WORLD|bad)'"):
                call()
        assert torch.equal(all_gather_with_grad(x, group=dist.group.WORLD), x)  # a real group still works
        assert torch.equal(all_gather_with_grad(x, group="world"), x)  # and "world", as the losses take it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("group", [5, 1.0, [0], object(), True])
def test_a_process_group_that_is_not_one_is_named_before_init(group):
    # Without torch.distributed up, process_group=5 (or a list, a float) said "needs torch.distributed to be
    # initialised", which named no fault of the argument's, and the modules kept it until their first call (a
    # misuse audit). Now each function, module and gather names it; a group or None is unchanged.
    assert not dist.is_initialized()
    x = torch.randn(4, 3)
    labels = torch.tensor([0, 1, 0, 1])
    calls = [
        lambda: cb.info_nce(x, x, x, process_group=group),
        lambda: cb.info_nce(x, x, None, process_group=group),
        lambda: cb.debiased_info_nce(x, x, None, tau_plus=0.1, process_group=group),
        lambda: cb.nt_xent(x, x, process_group=group),
        lambda: cb.supcon_loss(x, labels, process_group=group),
        lambda: cb.clip_loss(x, x, 10.0, process_group=group),
        lambda: cb.siglip_loss(x, x, process_group=group),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=f"^process_group must be a torch.distributed ProcessGroup .*got "
                                            f"{type(group).__name__}$"):
            call()
    for cls in (cb.InfoNCE, cb.NTXent, cb.SupCon, cb.ClipLoss, cb.SigLIP):
        with pytest.raises(TypeError, match=f"^{cls.__name__}: process_group must be a torch.distributed "
                                            f"ProcessGroup"):
            cls(process_group=group)
    for gather in (all_gather_with_grad, gather_with_local_first):
        with pytest.raises(TypeError, match="^group must be a torch.distributed ProcessGroup"):
            gather(x, group)
    # None is no group in the losses (a per-rank loss), as before
    torch.testing.assert_close(cb.info_nce(x, x, x, process_group=None), cb.info_nce(x, x, x))


def test_loss_functions_take_world_as_the_modules_do(tmp_path):
    # The modules took process_group="world" and the functions refused it (TypeError "got str"): the same name is
    # dist.group.WORLD at the call for both (a carried review note). Before init it is a RuntimeError; after, each
    # function gives what it gives with dist.group.WORLD (one rank: gloo, world size 1), a sharded bank included.
    from contrastbound.distributed import info_nce_sharded

    g = torch.Generator().manual_seed(3)
    x, y, bank = (torch.randn(4, 3, generator=g, requires_grad=True) for _ in range(3))
    labels = torch.tensor([0, 1, 0, 1])
    calls = {
        "info_nce in-batch": lambda group: cb.info_nce(x, y, None, 0.2, process_group=group),
        "info_nce shard": lambda group: cb.info_nce(x, y, bank, 0.2, process_group=group),
        "info_nce_sharded": lambda group: info_nce_sharded(x, y, bank, 0.2, process_group=group),
        "debiased_info_nce": lambda group: cb.debiased_info_nce(x, y, None, 0.2, tau_plus=0.1, process_group=group),
        "nt_xent": lambda group: cb.nt_xent(x, y, 0.2, process_group=group),
        "supcon_loss": lambda group: cb.supcon_loss(x, labels, 0.2, process_group=group),
        "clip_loss": lambda group: cb.clip_loss(x, y, 10.0, process_group=group),
        "siglip_loss": lambda group: cb.siglip_loss(x, y, 10.0, -10.0, process_group=group),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="process_group='world' needs torch.distributed to be initialised"):
            call("world")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        for name, call in calls.items():
            got = call("world")
            (g_got,) = torch.autograd.grad(got, x)
            want = call(dist.group.WORLD)
            (g_want,) = torch.autograd.grad(want, x)
            assert torch.equal(got, want) and torch.equal(g_got, g_want), name
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("L", [30.0, 3000.0, 30000.0])
def test_sharded_bank_with_a_dominant_negative_is_as_accurate_as_one_process(tmp_path, L):
    """float32, temperature 1, normalize=False: logits L - 40 (the positive), L (a negative of softmax weight 0.9999),
    L - 9 and 1, -2, 3. The sharded loss within 2x the single-process kernel's error against float64 (its lse was
    rounded to float32 before softplus(lse - l_0): 2.4e-4 relative at L = 3e4, where one process has 3.9e-7), and
    the shard's gradient within 2x naive float32 PyTorch's (a review's case)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        a = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
        rows = torch.zeros(6, 4, dtype=torch.float64)
        rows[:, 0] = torch.tensor([L - 40.0, L, L - 9.0, 1.0, -2.0, 3.0])
        rows[0, 3], rows[1, 1], rows[2, 2] = 0.5, 0.3, 0.7  # distinct rows, the same logits
        rows = rows.float()

        def sharded(x, r):
            return cb.info_nce(x, r[:1], r[1:], temperature=1.0, normalize=False, process_group=dist.group.WORLD)

        def single(x, r):
            return cb.info_nce(x, r[:1], r[1:], temperature=1.0, normalize=False)

        def naive(x, r):
            return F.cross_entropy(x @ r.T, torch.tensor([0]))

        out = {}
        for name, fn, x, r in (("sharded", sharded, a, rows), ("single", single, a, rows), ("naive", naive, a, rows),
                               ("exact", naive, a.double(), rows.double())):
            r = r.clone().requires_grad_()
            loss = fn(x, r)
            (g,) = torch.autograd.grad(loss, r)
            out[name] = (loss.detach().double(), g[1].double())  # row 1: the dominant negative
        loss_want, grad_want = out["exact"]
        loss_err = {k: abs(float(out[k][0] - loss_want)) / float(loss_want) for k in ("sharded", "single")}
        grad_err = {k: float((out[k][1] - grad_want).norm() / grad_want.norm()) for k in ("sharded", "naive")}
        assert loss_err["sharded"] <= 2 * loss_err["single"] + 1e-7, loss_err
        assert grad_err["sharded"] <= 2 * grad_err["naive"] + 1e-7, grad_err
    finally:
        dist.destroy_process_group()


def test_sharded_bank_options_single_rank(tmp_path):
    # normalize=False through the sharded path (a sharded path that always normalised passed), and the documented
    # refusal of a learnable temperature with a process group (removing it passed: the temperature was detached).
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(2)
        a, p = (torch.randn(9, 5, generator=g, dtype=torch.float64) for _ in range(2))
        bank = torch.randn(40, 5, generator=g, dtype=torch.float64) * 3
        got = cb.info_nce(a, p, bank, temperature=0.5, normalize=False, process_group=dist.group.WORLD)
        want = cb.info_nce(a, p, bank, temperature=0.5, normalize=False)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
        t = torch.tensor(0.5, requires_grad=True)
        with pytest.raises(ValueError, match="learnable temperature is not supported"):
            cb.info_nce(a, p, bank, temperature=t, process_group=dist.group.WORLD)
        # The result's dtype: that of the single-process call (the promoted input types), not the float32
        # accumulation, for half-precision banks and mixed inputs too.
        half = (torch.bfloat16, torch.float16)
        for fa, fb in ((half[0], half[0]), (half[1], half[1]), (torch.float32, half[0]), (half[0], torch.float32)):
            for reduction in ("mean", "none"):
                kw = dict(temperature=0.5, reduction=reduction)
                got = cb.info_nce(a.to(fa), p.to(fa), bank.to(fb), process_group=dist.group.WORLD, **kw)
                want = cb.info_nce(a.to(fa), p.to(fa), bank.to(fb), **kw)
                assert got.dtype == want.dtype == torch.promote_types(fa, fb), (fa, fb, got.dtype, want.dtype)
                torch.testing.assert_close(got, want, rtol=2e-2, atol=0)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 6),
                    reason="torch 2.5's dynamo specialises every float (one graph per value)")
@pytest.mark.parametrize("form", ["sharded", "in_batch", "nt_xent", "clip", "supcon", "debiased_in_batch",
                                  "debiased_sharded", "siglip"])
def test_torch_compile_float_temperature_schedule_with_process_group(tmp_path, form):
    # A float temperature that changes between calls of a compiled step with process_group: its second value is
    # traced as a symbolic float, which the exchange of the ranks' arguments packed with struct.pack (dynamo raised
    # RecursionError for every form but clip_loss, whose float becomes a tensor first). Each value's loss and
    # gradient as the single-process eager call's.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(3)
        a, p, n = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g), torch.randn(8, 5, generator=g)
        W = dist.group.WORLD
        fns = {
            "sharded": lambda x, t, **kw: cb.info_nce(x, p, n, temperature=t, **kw),
            "in_batch": lambda x, t, **kw: cb.info_nce(x, p, None, temperature=t, **kw),
            "nt_xent": lambda x, t, **kw: cb.nt_xent(x, p, t, **kw),
            "clip": lambda x, t, **kw: cb.clip_loss(x, p, t, **kw),  # t: the logit scale
            "supcon": lambda x, t, **kw: cb.supcon_loss(torch.stack([x, p], 1), None, t, **kw),
            "debiased_in_batch": lambda x, t, **kw: cb.debiased_info_nce(x, p, None, t, beta=0.5, **kw),
            "debiased_sharded": lambda x, t, **kw: cb.debiased_info_nce(x, p, n, t, beta=0.5, **kw),
            "siglip": lambda x, t, **kw: cb.siglip_loss(x, p, 1.0 / t, -2.0, **kw),
        }
        fn = fns[form]
        torch._dynamo.reset()
        compiled = torch.compile(lambda x, t: fn(x, t, process_group=W), backend="aot_eager")
        for t in (0.2, 0.3, 0.45):
            t = 1.0 / t if form == "clip" else t
            got_a, want_a = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
            got, want = compiled(got_a, t), fn(want_a, t)
            got.backward()
            want.backward()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_a.grad, want_a.grad, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()


def test_uneven_batch_scaling_counts_the_loss_terms():
    # The README's recipe for uneven batches under DDP: reduction="sum" scaled by W / (global count of loss terms).
    # That count is sum B_r for info_nce and clip_loss and 2 sum B_r for nt_xent (an audit: W / sum B_r gave twice
    # the global mean's gradient there): each form's sum is its mean times that many terms.
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64)
    lone = torch.arange(14) // 2
    lone[13] = 99
    for fn, terms in ((lambda r: cb.info_nce(z1, z2, None, temperature=0.3, reduction=r), 7),
                      (lambda r: cb.clip_loss(z1, z2, 3.0, reduction=r), 7),
                      (lambda r: cb.nt_xent(z1, z2, 0.3, reduction=r), 14),
                      # supcon_loss: the rows with a positive (two views: every row, a lone sample's views have
                      # each other; one view with labels 0 0 1 1 ... 5 5 6 99: all but the two lone rows)
                      (lambda r: cb.supcon_loss(torch.stack([z1, z2], 1), torch.tensor([0, 1, 1, 2, 2, 2, 6]), 0.3,
                                                reduction=r), 14),
                      (lambda r: cb.supcon_loss(torch.cat([z1, z2]), lone, 0.3, reduction=r), 12)):
        torch.testing.assert_close(fn("sum"), terms * fn("mean"), rtol=1e-12, atol=0)


def test_an_unsupported_dtype_is_refused_by_name(tmp_path):
    # A dtype the exchange has no code for (uint16, float8, complex32) reached gloo's all_gather: "Invalid scalar
    # type" on one rank (an abort with several), instead of the ValueError naming it
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        for dtype in (torch.uint16, torch.float8_e4m3fn, torch.complex32):
            with pytest.raises(ValueError, match="an unsupported dtype"):
                all_gather_with_grad(torch.ones(2, 3).to(dtype))
    finally:
        dist.destroy_process_group()


SUPCON_PER_RANK = {2: [7, 4], 3: [5, 1, 6]}  # samples per rank: uneven


def _supcon_data():
    """17 samples of 2 views (float64) and labels in 0..4 with one singleton class (label 9, sample 3)."""
    g = torch.Generator().manual_seed(11)
    n = 17
    y = torch.randint(0, 5, (n,), generator=g)
    y[3] = 9
    centres = torch.randn(10, D, generator=g, dtype=torch.float64)
    views = centres[y].unsqueeze(1) + 0.7 * torch.randn(n, 2, D, generator=g, dtype=torch.float64)
    return views, y


def _supcon_bank():
    """9 bank rows (float64) with labels 0..6: some of the batch's classes, the singleton's (9) and others."""
    g = torch.Generator().manual_seed(12)
    return torch.randn(9, D, generator=g, dtype=torch.float64), torch.tensor([0, 1, 9, 5, 6, 0, 2, 2, 4])


@_gloo_worker()
def _supcon_worker(rank, world):
    torch.set_num_threads(1)
    views, y = _supcon_data()
    rows = _slices(SUPCON_PER_RANK[world], rank)
    w = dist.group.WORLD
    out = {}
    # labels, two views, a learnable temperature (each rank's own loss gradient), labels as int32 on one rank
    f = views[rows].clone().requires_grad_(True)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss = cb.supcon_loss(f, y[rows].to(torch.int32 if rank == 1 else torch.int64), t, process_group=w)
    loss.backward()
    out["labels"] = (loss.detach(), f.grad, t.grad)
    # labels=None: each sample its own class over the global batch
    f = views[rows].clone().requires_grad_(True)
    loss = cb.supcon_loss(f, None, 0.2, reduction="none", process_group=w)
    (loss * torch.arange(1.0, loss.numel() + 1, dtype=loss.dtype).reshape(loss.shape)).sum().backward()
    out["none"] = (loss.detach(), f.grad)
    # one view (N, d), the singleton without a positive (left out of its rank's mean), normalize=False
    f = views[rows, 0].clone().requires_grad_(True)
    loss = cb.supcon_loss(f, y[rows], 0.5, normalize=False, process_group=w)
    loss.backward()
    out["one_view"] = (loss.detach(), f.grad)
    # a bank (the same on every rank, as MoCo's queue) with labels: in every anchor's denominator and among the
    # positives of its class; not gathered
    bank, bank_labels = _supcon_bank()
    f = views[rows].clone().requires_grad_(True)
    loss = cb.supcon_loss(f, y[rows], 0.3, bank=bank, bank_labels=bank_labels, process_group=w)
    loss.backward()
    out["bank"] = (loss.detach(), f.grad)
    # float32 through the kernel
    f = views[rows].float().requires_grad_(True)
    loss = cb.supcon_loss(f, y[rows], 0.1, reduction="sum", process_group=w)
    loss.backward()
    out["float32"] = (loss.detach(), f.grad)
    # disagreement and lone refusals: every rank raises
    x, lab = torch.randn(3, 2, 4), torch.arange(3)
    errors = []
    for call in (lambda: cb.supcon_loss(x, lab if rank == 0 else None, process_group=w),
                 lambda: cb.supcon_loss(x, lab, 0.1 + 0.1 * rank, process_group=w),
                 lambda: cb.supcon_loss(x, lab if rank != 1 else lab[:2], process_group=w),
                 lambda: cb.supcon_loss(x if rank != 1 else x[:, 0], None, process_group=w),
                 lambda: cb.supcon_loss(x, lab, process_group=w, reduction="avg" if rank == 1 else "mean"),
                 lambda: cb.supcon_loss(x, lab, torch.tensor(1e-300 if rank == 1 else 0.2, dtype=torch.float64),
                                        process_group=w),
                 lambda: cb.supcon_loss(torch.randn(3, 2, 4 + rank), lab, process_group=w),
                 # (a review's find: a bank too narrow for the temperature was refused after the exchange)
                 lambda: cb.supcon_loss(x.double(), lab, 1e-39, bank=torch.randn(2, 4) if rank == 1 else None,
                                        process_group=w)):
        try:
            call()
            errors.append(None)
        except (ValueError, TypeError) as exc:
            errors.append(str(exc))
    out["errors"] = errors
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_supcon_over_the_global_batch_matches_single_process(world):
    results = _run_ranks(_supcon_worker, world)
    from contrastbound.reference import supcon_reference

    views, y = _supcon_data()
    sizes = SUPCON_PER_RANK[world]
    n = sum(sizes)
    views, y = views[:n], y[:n]

    def per_rank(key, make):
        # the materialised global loss per row; rank r's loss is its rows' part of it; features get the gradient
        # of the sum over ranks of their losses, a learnable temperature this rank's own
        f = views.clone().requires_grad_(True)
        t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        rows_loss, reduce = make(f, t)
        total = 0.0
        for rank in range(world):
            mine = reduce(rows_loss[_slices(sizes, rank)], rank)
            got = results[rank][key]
            assert_close_scaled(got[0], mine, 1e-10, f"{key}: rank {rank} loss")
            if len(got) == 3:
                (gt,) = torch.autograd.grad(mine, [t], retain_graph=True)
                assert_close_scaled(got[2], gt, 1e-10, f"{key}: rank {rank} temperature grad")
            total = total + (mine if mine.dim() == 0 else (mine * weights(mine)).sum())
        (gf,) = torch.autograd.grad(total, [f])
        for rank in range(world):
            want = gf[_slices(sizes, rank)]
            got = results[rank][key][1]
            assert_close_scaled(got, want if got.dim() == want.dim() else want[:, 0], 1e-10 if got.dtype ==
                                torch.float64 else 1e-4, f"{key}: rank {rank} features grad")

    def weights(loss):
        return torch.arange(1.0, loss.numel() + 1, dtype=loss.dtype).reshape(loss.shape)

    per_rank("labels", lambda f, t: (supcon_reference(f, y, t, reduction="none"), lambda x, r: x.mean()))
    ids = torch.arange(n)
    per_rank("none", lambda f, t: (supcon_reference(f, ids, 0.2, reduction="none"), lambda x, r: x))

    def one_view(f, t):
        rows_loss = supcon_reference(f[:, 0], y, 0.5, normalize=False, reduction="none")
        has = (y.unsqueeze(0) == y.unsqueeze(1)).sum(1) > 1
        assert not has.all()  # (the singleton is there)
        return rows_loss, lambda x, r: x.sum() / has[_slices(sizes, r)].sum()

    per_rank("one_view", one_view)
    bank, bank_labels = _supcon_bank()
    per_rank("bank", lambda f, t: (supcon_reference(f, y, 0.3, bank=bank, bank_labels=bank_labels,
                                                    reduction="none"), lambda x, r: x.mean()))
    g = views.float().double().requires_grad_(True)
    rows_loss = supcon_reference(g, y, 0.1, reduction="none")
    for rank in range(world):
        mine = rows_loss[_slices(sizes, rank)].sum()
        torch.testing.assert_close(results[rank]["float32"][0].double(), mine.detach(), rtol=1e-5, atol=1e-5)
    (gg,) = torch.autograd.grad(rows_loss.sum() * 1.0, [g])
    for rank in range(world):  # each rank's features: the sum over ranks' sums = the global sum's gradient
        torch.testing.assert_close(results[rank]["float32"][1].double(), gg[_slices(sizes, rank)], rtol=1e-4,
                                   atol=1e-5)
    want = ["must make the same call", "temperature (or logit scale) must be the same", "refused", "refused",
            "refused", "refused", "features must have the same shape past the first dimension", "refused"]
    for rank in range(world):
        got = results[rank]["errors"]
        assert len(got) == len(want), got
        for i, (g, w) in enumerate(zip(got, want)):
            assert g is not None, (rank, i)
            if w == "refused":  # rank 1 its own error, the others one naming rank 1
                assert ("rank 1 of process_group refused its arguments" in g) == (rank != 1), (rank, i, g)
            else:
                assert w in g, (rank, i, g)


@_gloo_worker()
def _no_grad_worker(rank, world):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(3, 4, generator=g).requires_grad_(rank == 0)
    n = torch.randn(5, 4, generator=g).requires_grad_(rank == 1)
    with torch.no_grad():  # no backward runs: requires_grad may differ across ranks
        out = {"in_batch": cb.info_nce(x, x + 0.1, None, process_group=dist.group.WORLD),
               "sharded": cb.info_nce(x, x + 0.1, n, process_group=dist.group.WORLD),
               "rows": all_gather_with_grad(x).shape[0]}
    return out


def test_requires_grad_may_differ_across_ranks_under_no_grad():
    results = _run_ranks(_no_grad_worker, 2)
    for r in results:
        assert torch.isfinite(r["in_batch"]) and torch.isfinite(r["sharded"]) and r["rows"] == 6


@_gloo_worker()
def _subgroup_worker(rank, world):
    torch.set_num_threads(1)
    sub = dist.new_group([1, 2])  # (every rank calls new_group) group rank = global rank - 1
    if rank == 0:  # outside the group: a ValueError saying so ("got int", the sentinel's type, named no cause)
        x = torch.randn(3, 4)
        errors = []
        for call in (lambda: cb.info_nce(x, x, None, process_group=sub), lambda: all_gather_with_grad(x, group=sub),
                     lambda: cb.nt_xent(x, x, process_group=sub)):
            try:
                call()
                errors.append(None)
            except ValueError as exc:
                errors.append(str(exc))
        return errors
    a, p, bank = _subgroup_data()
    rows, shard = _SUBGROUP_ROWS[rank]
    x = a[rows].clone().requires_grad_(True)
    gathered = all_gather_with_grad(x, group=sub)
    (gathered * torch.arange(1.0, 8.0, dtype=torch.float64)[:, None]).sum().backward()
    a_r, p_r, s_r = (t.clone().requires_grad_(True) for t in (a[rows], p[rows], bank[shard]))
    loss = cb.info_nce(a_r, p_r, s_r, temperature=0.2, process_group=sub)
    loss.backward()
    return {"gathered": gathered.detach(), "gx": x.grad, "loss": loss.detach(), "ga": a_r.grad, "gn": s_r.grad}


_SUBGROUP_ROWS = {1: (slice(0, 3), slice(0, 10)), 2: (slice(3, 7), slice(10, 30))}  # uneven anchors and shards


def _subgroup_data():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (7, 7, 30))


def test_a_subgroup_whose_ranks_are_not_the_global_ones():
    # Every other test passes the whole world, where a group's rank and size are the global ones: a rank or size
    # taken from the world instead of the group passed them all (a mutation audit). Here global ranks 1 and 2 form
    # the group (0 stays out): the gather and the sharded bank against one process, by the convention above.
    res = _run_ranks(_subgroup_worker, 3)
    assert len(res[0]) == 3 and all(e is not None and e.startswith("process_group: this rank is not a member of the "
                                                                  "group") for e in res[0]), res[0]
    a, p, bank = _subgroup_data()
    weights = torch.arange(1.0, 8.0, dtype=torch.float64)[:, None].expand(7, 4)
    bank_full = bank.clone().requires_grad_(True)
    bank_grad = torch.zeros_like(bank)
    for r, (rows, _) in _SUBGROUP_ROWS.items():
        assert torch.equal(res[r]["gathered"], a)
        torch.testing.assert_close(res[r]["gx"], 2 * weights[rows])  # every rank's loss used every slice: sum of 2
        a_r = a[rows].clone().requires_grad_(True)
        loss = cb.info_nce(a_r, p[rows], bank_full, temperature=0.2)
        ga, gn = torch.autograd.grad(loss, [a_r, bank_full])
        bank_grad += gn
        torch.testing.assert_close(res[r]["loss"], loss, rtol=1e-10, atol=0)
        torch.testing.assert_close(res[r]["ga"], ga, rtol=1e-10, atol=1e-12)
    for r, (_, shard) in _SUBGROUP_ROWS.items():
        torch.testing.assert_close(res[r]["gn"], bank_grad[shard], rtol=1e-10, atol=1e-12)


@_gloo_worker(timeout=datetime.timedelta(seconds=20))  # (a bound on the wait this test guards against)
def _lone_forward_ad_worker(rank, world):
    from torch.autograd import forward_ad

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(rank))
    got = []
    for negatives in (torch.randn(5, 4), None):  # sharded bank, in-batch
        with forward_ad.dual_level():
            a = forward_ad.make_dual(x, torch.ones_like(x)) if rank == 1 else x
            try:
                cb.info_nce(a, x, negatives, process_group=dist.group.WORLD)
                got.append(None)
            except Exception as exc:  # noqa: BLE001
                got.append(f"{type(exc).__name__}: {exc}")
    return got


def test_forward_ad_on_one_rank_only_makes_every_rank_raise():
    # A rank that refuses forward-mode AD (NotImplementedError, before the exchange) still takes part in the
    # exchange: the others raise ValueError naming it instead of waiting for the backend's timeout
    got = _run_ranks(_lone_forward_ad_worker, 2)
    for msg in got[1]:
        assert msg.startswith("NotImplementedError: forward-mode AD"), msg
    for msg in got[0]:
        assert msg.startswith("ValueError: rank 1 of process_group refused its arguments"), msg


@_gloo_worker()
def _debiased_worker(rank, world):
    torch.set_num_threads(1)
    a, p, bank = _global_data()
    rows = _slices(ANCHORS_PER_RANK[world], rank)
    K = sum(SHARDS[world])
    shard_rows = _slices(SHARDS[world], rank)
    w = dist.group.WORLD
    out = {}
    for beta in (0.0, 0.5):
        # in-batch over the global batch (a learnable temperature: this rank's own loss's gradient)
        a_r, p_r = a[rows].clone().requires_grad_(True), p[rows].clone().requires_grad_(True)
        t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        loss = cb.debiased_info_nce(a_r, p_r, None, t, tau_plus=0.1, beta=beta, process_group=w)
        loss.backward()
        out[("in_batch", beta)] = (loss.detach(), a_r.grad, p_r.grad, t.grad)
        # a shared bank sharded over the ranks (shard sizes differ, one may be empty), reduction "none"
        a_r, p_r = a[rows].clone().requires_grad_(True), p[rows].clone().requires_grad_(True)
        shard = bank[:K][shard_rows].clone().requires_grad_(True)
        loss = cb.debiased_info_nce(a_r, p_r, shard, 0.2, tau_plus=0.1, beta=beta, reduction="none",
                                    process_group=w)
        (loss * torch.arange(1.0, loss.numel() + 1, dtype=loss.dtype)).sum().backward()
        out[("sharded", beta)] = (loss.detach(), a_r.grad, p_r.grad, shard.grad)
        # a shard that only rank 0 learns (info_nce takes it; debiased_info_nce refused it as "different
        # collectives in backward", which the shard's own gradient never runs: an exploratory review, 2026-12-06)
        a_r, p_r = a[rows].clone().requires_grad_(True), p[rows].clone().requires_grad_(True)
        shard = bank[:K][shard_rows].clone().requires_grad_(rank == 0)
        loss = cb.debiased_info_nce(a_r, p_r, shard, 0.2, tau_plus=0.1, beta=beta, reduction="none",
                                    process_group=w)
        (loss * torch.arange(1.0, loss.numel() + 1, dtype=loss.dtype)).sum().backward()
        out[("sharded_rank0", beta)] = (loss.detach(), a_r.grad, p_r.grad, shard.grad)
    # disagreements and lone refusals: every rank raises (no hang)
    x, y, s = torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 4)
    errors = []
    for call in (lambda: cb.debiased_info_nce(x, y, s, beta=0.5 if rank == 1 else 0.0, process_group=w),
                 # (a review's find: betas that differ, both > 0, gave each shard's part at its rank's scale)
                 lambda: cb.debiased_info_nce(x, y, s, beta=1.0 if rank == 1 else 0.5, process_group=w),
                 lambda: cb.debiased_info_nce(x, y, s if rank == 0 else None, process_group=w),
                 lambda: cb.debiased_info_nce(x, y, None, tau_plus=1.0 if rank == 1 else 0.1, process_group=w),
                 lambda: cb.debiased_info_nce(x, y, s, negative_indices=torch.zeros(3, 2, dtype=torch.long),
                                              process_group=w),
                 lambda: cb.debiased_info_nce(x, y, s, torch.tensor(0.1, requires_grad=rank == 1),
                                              process_group=w),
                 lambda: cb.debiased_info_nce(x, y, None, 0.1 if rank == 0 else 0.2, process_group=w),
                 # (a helper's observation, then fixed) tau_plus, and beta in-batch, were not compared: each rank
                 # weighted the gradients it sends to the others' rows by its own
                 lambda: cb.debiased_info_nce(x, y, s, tau_plus=0.25 if rank == 1 else 0.1, process_group=w),
                 lambda: cb.debiased_info_nce(x, y, None, tau_plus=0.25 if rank == 1 else 0.1, process_group=w),
                 lambda: cb.debiased_info_nce(x, y, None, beta=1.0 if rank == 1 else 0.5, process_group=w)):
        try:
            call()
            errors.append(None)
        except (ValueError, TypeError) as exc:
            errors.append(str(exc))
    out["errors"] = errors
    # -0.0 and 0.0 are the same beta and tau_plus (their bits differ: compared as bits, they were refused)
    zero = -0.0 if rank == 1 else 0.0
    out["signed_zero"] = [float(cb.debiased_info_nce(x, y, neg, tau_plus=zero, beta=zero, process_group=w))
                          for neg in (None, s)]
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_debiased_over_the_global_batch_and_a_sharded_bank_match_single_process(world):
    # rank r's loss is the single-process loss of its anchors against the global batch (K = B - 1 positives) or
    # the whole bank (K = sum of shards); features and shards get the gradient of the sum over ranks' losses
    results = _run_ranks(_debiased_worker, world)
    from contrastbound.reference import debiased_info_nce_reference

    a, p, bank = _global_data()
    sizes, K = ANCHORS_PER_RANK[world], sum(SHARDS[world])
    n = sum(sizes)
    a, p, bank = a[:n], p[:n], bank[:K]
    for beta in (0.0, 0.5):
        # in-batch: the reference over the global batch, each rank's mean over its rows
        ga, gp = a.clone().requires_grad_(True), p.clone().requires_grad_(True)
        t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        rows_loss = debiased_info_nce_reference(ga, gp, None, t, tau_plus=0.1, beta=beta, reduction="none")
        total = 0.0
        for rank in range(world):
            mine = rows_loss[_slices(sizes, rank)].mean()
            got = results[rank][("in_batch", beta)]
            assert_close_scaled(got[0], mine, 1e-11, f"in-batch beta {beta}: rank {rank} loss")
            (gt,) = torch.autograd.grad(mine, [t], retain_graph=True)
            assert_close_scaled(got[3], gt, 1e-10, f"in-batch beta {beta}: rank {rank} temperature grad")
            total = total + mine
        grads = torch.autograd.grad(total, [ga, gp])
        for rank in range(world):
            got = results[rank][("in_batch", beta)]
            for name, g, x in zip(("anchors", "positives"), grads, got[1:3]):
                assert_close_scaled(x, g[_slices(sizes, rank)], 1e-10, f"in-batch beta {beta}: rank {rank} {name}")
        # sharded: each rank's weighted "none" losses against the whole bank
        ga, gp, gb = (x.clone().requires_grad_(True) for x in (a, p, bank))
        rows_loss = debiased_info_nce_reference(ga, gp, gb, 0.2, tau_plus=0.1, beta=beta, reduction="none")
        total = 0.0
        for rank in range(world):
            mine = rows_loss[_slices(sizes, rank)]
            got = results[rank][("sharded", beta)]
            assert_close_scaled(got[0], mine, 1e-11, f"sharded beta {beta}: rank {rank} loss")
            total = total + (mine * torch.arange(1.0, mine.numel() + 1, dtype=mine.dtype)).sum()
        grads = torch.autograd.grad(total, [ga, gp, gb])
        for rank in range(world):
            got = results[rank][("sharded", beta)]
            for name, g, x in zip(("anchors", "positives"), grads, got[1:3]):
                assert_close_scaled(x, g[_slices(sizes, rank)], 1e-10, f"sharded beta {beta}: rank {rank} {name}")
            assert_close_scaled(got[3], grads[2][_slices(SHARDS[world], rank)], 1e-10,
                                f"sharded beta {beta}: rank {rank} shard")
            once = results[rank][("sharded_rank0", beta)]
            for name, x, y in zip(("loss", "anchors", "positives"), once[:3], got[:3]):
                assert_close_scaled(x, y, 1e-12, f"sharded beta {beta}, rank 0 learning its shard: rank {rank} {name}")
            if rank == 0:
                assert_close_scaled(once[3], grads[2][_slices(SHARDS[world], 0)], 1e-10, f"beta {beta}: shard 0")
            else:
                assert once[3] is None
    want = ["must make the same call", "beta must be the same on every rank of process_group, got rank 0: 0.5; "
            "rank 1: 1", "must make the same call", "refused", "not negative_indices", "refused",
            "temperature (or logit scale) must be the same",
            "tau_plus must be the same on every rank of process_group, got rank 0: 0.1; rank 1: 0.25",
            "tau_plus must be the same on every rank of process_group, got rank 0: 0.1; rank 1: 0.25",
            "beta must be the same on every rank of process_group, got rank 0: 0.5; rank 1: 1"]
    for rank in range(world):
        assert all(math.isfinite(v) for v in results[rank]["signed_zero"]), results[rank]["signed_zero"]
        got = results[rank]["errors"]
        assert len(got) == len(want), got
        for i, (g, w) in enumerate(zip(got, want)):
            assert g is not None, (rank, i)
            if w == "refused":  # rank 1 its own error, the others one naming rank 1
                assert ("rank 1 of process_group refused its arguments" in g) == (rank != 1), (rank, i, g)
            else:
                assert w in g, (rank, i, g)


@_gloo_worker()
def _siglip_worker(rank, world):
    torch.set_num_threads(1)
    a, p, _ = _global_data()
    rows = _slices(ANCHORS_PER_RANK[world], rank)
    w = dist.group.WORLD
    x, y = a[rows].clone().requires_grad_(True), p[rows].clone().requires_grad_(True)
    s = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    loss = cb.siglip_loss(x, y, s, b, reduction="none", process_group=w)
    (loss * torch.arange(1.0, loss.numel() + 1, dtype=loss.dtype)).sum().backward()
    out = {"none": (loss.detach(), x.grad, y.grad, s.grad, b.grad)}
    errors = []
    for call in (lambda: cb.siglip_loss(x, y, 6.0 + rank, process_group=w),
                 lambda: cb.siglip_loss(x, y, -1.0 if rank == 1 else 6.0, process_group=w),
                 lambda: cb.siglip_loss(x, y, normalize=rank == 0, process_group=w),
                 lambda: cb.siglip_loss(x, y, 6.0, -3.0 - rank, process_group=w),
                 lambda: cb.siglip_loss(x, y, s, torch.tensor(-3.0 - rank, requires_grad=True), process_group=w),
                 # (a distributed audit's: float16 on one rank and float32 on another passed, compared after the
                 # widening to float32, and each rank computed in its own dtype)
                 lambda: cb.siglip_loss(*(v.detach().to(torch.float16 if rank else torch.float32) for v in (x, y)),
                                        process_group=w)):
        try:
            call()
            errors.append(None)
        except (ValueError, TypeError) as exc:
            errors.append(str(exc))
    out["errors"] = errors
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_siglip_over_the_global_batch_matches_single_process(world):
    # rank r's images against every rank's texts: its rows of the global N x N loss; features get the gradient of
    # the sum over ranks' (weighted) losses, the scale and bias this rank's own
    results = _run_ranks(_siglip_worker, world)
    from contrastbound.reference import siglip_reference

    a, p, _ = _global_data()
    sizes = ANCHORS_PER_RANK[world]
    n = sum(sizes)
    x, y = a[:n].clone().requires_grad_(True), p[:n].clone().requires_grad_(True)
    s = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    rows_loss = siglip_reference(x, y, s, b, reduction="none")
    total = 0.0
    for rank in range(world):
        mine = rows_loss[_slices(sizes, rank)]
        weighted = (mine * torch.arange(1.0, mine.numel() + 1, dtype=mine.dtype)).sum()
        got = results[rank]["none"]
        assert_close_scaled(got[0], mine, 1e-12, f"rank {rank} loss")
        gs, gb = torch.autograd.grad(weighted, [s, b], retain_graph=True)
        assert_close_scaled(got[3], gs, 1e-11, f"rank {rank} scale grad")
        assert_close_scaled(got[4], gb, 1e-11, f"rank {rank} bias grad")
        total = total + weighted
    gx, gy = torch.autograd.grad(total, [x, y])
    for rank in range(world):
        got = results[rank]["none"]
        assert_close_scaled(got[1], gx[_slices(sizes, rank)], 1e-11, f"rank {rank} image grad")
        assert_close_scaled(got[2], gy[_slices(sizes, rank)], 1e-11, f"rank {rank} text grad")
    want = ["temperature (or logit scale) must be the same", "refused", "normalize must be the same",
            "logit_bias must be the same on every rank of process_group, got rank 0: -3; rank 1: -4",
            "logit_bias must be the same on every rank of process_group, got rank 0: -3; rank 1: -4",
            "text_features (in the promoted dtype of image_features and text_features) must have the same shape "
            "past the first dimension and the same dtype on every rank"]
    for rank in range(world):
        got = results[rank]["errors"]
        assert len(got) == len(want), got
        for i, (g, w) in enumerate(zip(got, want)):
            assert g is not None, (rank, i)
            if w == "refused":
                assert ("rank 1 of process_group refused its arguments" in g) == (rank != 1), (rank, i, g)
            else:
                assert w in g, (rank, i, g)


@_gloo_worker(timeout=datetime.timedelta(seconds=60))  # (a bounded wait: a lone refusal fails the test, no hang)
def _decoupled_worker(rank, world):
    torch.set_num_threads(1)
    a, p, bank = _global_data()
    rows = _slices(ANCHORS_PER_RANK[world], rank)
    K = sum(SHARDS[world])
    labels = _in_batch_labels(sum(ANCHORS_PER_RANK[world]))[rows]
    w = dist.group.WORLD
    out = {}
    for form in ("sharded", "sharded_labels", "in_batch", "in_batch_labels", "nt_xent"):
        x, y = a[rows].clone().requires_grad_(True), p[rows].clone().requires_grad_(True)
        shard = bank[:K][_slices(SHARDS[world], rank)].clone().requires_grad_(True)
        if form == "sharded":
            loss = cb.info_nce(x, y, shard, 0.2, decoupled=True, reduction="none", process_group=w)
        elif form == "sharded_labels":
            loss = cb.info_nce(x, y, shard, 0.2, labels=labels, negative_labels=_bank_labels(world)[
                _slices(SHARDS[world], rank)], decoupled=True, reduction="none", process_group=w)
        elif form == "in_batch":
            loss = cb.info_nce(x, y, None, 0.2, decoupled=True, reduction="none", process_group=w)
        elif form == "in_batch_labels":
            loss = cb.info_nce(x, y, None, 0.2, labels=labels, decoupled=True, reduction="none", process_group=w)
        else:
            loss = cb.nt_xent(x, y, 0.3, decoupled=True, reduction="none", process_group=w)
        (loss * torch.arange(1.0, loss.numel() + 1, dtype=loss.dtype)).sum().backward()
        out[form] = (loss.detach(), x.grad, y.grad, shard.grad if form.startswith("sharded") else None)
    # ranks that disagree on decoupled: every rank raises, naming it (no hang, no silently mixed loss)
    def messages(*calls):  # each call's error message, None where it returned
        got = []
        for call in calls:
            try:
                call()
                got.append(None)
            except (ValueError, TypeError) as exc:
                got.append(str(exc))
        return got

    xs, ys, ss = torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 4)
    out["errors"] = messages(
        lambda: cb.info_nce(xs, ys, ss, decoupled=rank == 1, process_group=w),
        lambda: cb.info_nce(xs, ys, None, decoupled=rank == 1, process_group=w),
        lambda: cb.info_nce(xs, ys, None, labels=torch.arange(3), decoupled=rank == 1, process_group=w),
        lambda: cb.nt_xent(xs, ys, decoupled=rank == 1, process_group=w))
    # a value that rank 1 alone refuses (an audit's find: info_nce checked it before its refusal guard, so rank 1
    # raised alone and the others waited in the exchange), and a bank whose shards are all empty (refused on every
    # rank, as info_nce refuses K = 0; it gave -inf)
    out["lone"] = messages(
        lambda: cb.info_nce(xs, ys, ss, decoupled="yes" if rank == 1 else True, process_group=w),
        lambda: cb.info_nce(xs, ys, None, decoupled="yes" if rank == 1 else True, process_group=w),
        lambda: cb.nt_xent(xs, ys, decoupled="yes" if rank == 1 else True, process_group=w),
        lambda: cb.info_nce(xs, ys, ss[:0], decoupled=True, process_group=w))
    return out


def test_decoupled_over_the_global_batch_and_a_sharded_bank_matches_single_process():
    # DCL (decoupled=True): rank r's losses are the single-process ones of its anchors against the whole bank /
    # global batch; features and shards get the gradient of the sum over ranks' weighted losses
    world = 3
    results = _run_ranks(_decoupled_worker, world)
    from contrastbound.reference import info_nce_reference, nt_xent_reference

    a, p, bank = _global_data()
    sizes, K = ANCHORS_PER_RANK[world], sum(SHARDS[world])
    n = sum(sizes)
    labels = _in_batch_labels(n)
    for form in ("sharded", "sharded_labels", "in_batch", "in_batch_labels", "nt_xent"):
        x, y, b = a[:n].clone().requires_grad_(True), p[:n].clone().requires_grad_(True), \
            bank[:K].clone().requires_grad_(True)
        if form == "nt_xent":
            both = nt_xent_reference(x, y, 0.3, decoupled=True, reduction="none")
            per_rank = [torch.cat([both[:n][_slices(sizes, r)], both[n:][_slices(sizes, r)]]) for r in range(world)]
        else:
            kw = dict(labels=labels, negative_labels=_bank_labels(world) if form == "sharded_labels" else None) \
                if form.endswith("labels") else {}
            rows_loss = info_nce_reference(x, y, b if form.startswith("sharded") else None, 0.2, decoupled=True,
                                           reduction="none", **kw)
            per_rank = [rows_loss[_slices(sizes, r)] for r in range(world)]
        total = 0.0
        for rank in range(world):
            mine = per_rank[rank]
            got = results[rank][form]
            assert_close_scaled(got[0], mine, 1e-11, f"{form}: rank {rank} loss")
            total = total + (mine * torch.arange(1.0, mine.numel() + 1, dtype=mine.dtype)).sum()
        grads = torch.autograd.grad(total, [x, y, b], allow_unused=True)
        for rank in range(world):
            got = results[rank][form]
            for name, g, v in zip(("anchors", "positives"), grads, got[1:3]):
                assert_close_scaled(v, g[_slices(sizes, rank)], 1e-10, f"{form}: rank {rank} {name}")
            if form.startswith("sharded"):
                assert_close_scaled(got[3], grads[2][_slices(SHARDS[world], rank)], 1e-10, f"{form}: rank {rank} shard")
    for rank in range(world):
        got = results[rank]["errors"]
        want = "decoupled must be the same on every rank of process_group, got rank 0: False; rank 1: True; rank 2: False"
        assert len(got) == 4 and all(g is not None and want in g for g in got), (rank, got)
        lone = results[rank]["lone"]
        assert len(lone) == 4 and all(g is not None for g in lone), (rank, lone)
        for g in lone[:3]:
            want = "decoupled must be a bool" if rank == 1 else "rank 1 of process_group refused its arguments"
            assert want in g, (rank, g)
        assert "the bank's shards are empty on every rank" in lone[3], (rank, lone[3])


def test_refusals_with_process_group_single_rank(tmp_path):
    # (a mutation audit's survivors) refused before any exchange, on one gloo rank: per-anchor negatives given to
    # debiased_info_nce as a "shard" (it computed silently without the check), t / beta beyond float64 (as without
    # a group), forward-mode AD through a supcon bank or a siglip scale (no forward formula through the gathers)
    import torch.autograd.forward_ad as fwAD

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        g = dist.group.WORLD
        a, p = torch.randn(4, 8), torch.randn(4, 8)
        with pytest.raises(ValueError, match=r"shard \(K_r, d\) of a shared bank, got shape"):
            cb.debiased_info_nce(a, p, torch.randn(4, 3, 8), beta=0.5, process_group=g)
        for negatives in (None, torch.randn(5, 8)):
            with pytest.raises(ValueError, match="temperature / 1e-310"):
                cb.debiased_info_nce(a, p, negatives, 0.1, beta=1e-310, process_group=g)
        # labels: in-batch over the (one-rank) global batch, and with a bank shard, as without the group; a shard
        # with every row of the anchors' label: loss 0 and zero gradients, with the kernel and without; refused by
        # name: one of the two label tensors with a shard, or of another shape, or negative_labels in-batch
        y = torch.tensor([0, 1, 0, 2])
        torch.testing.assert_close(cb.info_nce(a, p, None, labels=y, reduction="none", process_group=g),
                                   cb.info_nce(a, p, None, labels=y, reduction="none"))
        bank, yb = torch.randn(5, 8), torch.tensor([0, 0, 1, 3, 2])
        torch.testing.assert_close(cb.info_nce(a, p, bank, labels=y, negative_labels=yb, reduction="none",
                                               process_group=g),
                                   cb.info_nce(a, p, bank, labels=y, negative_labels=yb, reduction="none"))
        with torch.inference_mode():  # a queue's labels made under inference_mode: saved for backward as a copy
            yb_inference = yb.clone()
        had_kernel = _backend.HAS_CPU_KERNEL
        for kernel in (True, False):
            _backend.HAS_CPU_KERNEL = kernel
            try:
                xs = [x.clone().requires_grad_(True) for x in (a, p, bank)]
                cb.info_nce(*xs, labels=y, negative_labels=yb_inference, process_group=g).backward()
                assert all(x.grad is not None for x in xs)
                xs = [x.clone().requires_grad_(True) for x in (a, p, bank)]
                loss = cb.info_nce(*xs, labels=torch.zeros(4, dtype=torch.long),
                                   negative_labels=torch.zeros(5, dtype=torch.long), process_group=g)
                loss.backward()
            finally:
                _backend.HAS_CPU_KERNEL = had_kernel
            assert float(loss.detach()) == 0.0, kernel
            assert all(torch.equal(x.grad, torch.zeros_like(x)) for x in xs), kernel
        with pytest.raises(ValueError, match=r"labels was given without negative_labels: pass the labels of this "
                                             r"rank's shard \(K_r,\)"):
            cb.info_nce(a, p, bank, labels=y, process_group=g)
        with pytest.raises(ValueError, match=r"negative_labels was given without labels"):
            cb.info_nce(a, p, bank, negative_labels=yb, process_group=g)
        with pytest.raises(ValueError, match=r"negative_labels must have shape \(K_r,\), this rank's shard's = \(5,\)"):
            cb.info_nce(a, p, bank, labels=y, negative_labels=yb[:4], process_group=g)
        with pytest.raises(ValueError, match=r"not negative_mask \(with labels and negative_labels\)"):
            cb.info_nce(a, p, bank, labels=y, negative_labels=yb, negative_mask=torch.ones(4, 5, dtype=torch.bool),
                        process_group=g)
        with pytest.raises(ValueError, match=r"pass labels only \(negative_labels=None\)"):
            cb.info_nce(a, p, None, labels=y, negative_labels=y, process_group=g)
        with pytest.raises(ValueError, match=r"labels must have shape \(B,\)"):
            cb.info_nce(a, p, None, labels=y[:3], process_group=g)
        with fwAD.dual_level():
            bank = fwAD.make_dual(torch.randn(3, 8), torch.randn(3, 8))
            with pytest.raises(NotImplementedError, match="forward-mode AD"):
                cb.supcon_loss(a, torch.tensor([0, 1, 0, 1]), bank=bank, process_group=g)
            with pytest.raises(NotImplementedError, match="forward-mode AD"):
                cb.siglip_loss(a, p, fwAD.make_dual(torch.tensor(10.0), torch.ones(())), -10.0, process_group=g)
    finally:
        dist.destroy_process_group()


# A mutation audit of distributed.py (2026-12-06): each test below failed with a mutant that passed every other test.
@_gloo_worker()
def _shared_gradient_worker(rank, world):
    torch.set_num_threads(1)
    w = dist.group.WORLD
    out = {}
    # two gathers whose outputs are added: autograd hands both backward passes the same gradient tensor, which the
    # first one's all_reduce must not change in place (the second then summed W times the sum: W^2)
    g = torch.Generator().manual_seed(rank)
    x1, x2 = (torch.randn(2, 3, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(2))
    c = torch.arange(1.0, 2 * world * 3 + 1, dtype=torch.float64).reshape(2 * world, 3)
    ((all_gather_with_grad(x1, w) + all_gather_with_grad(x2, w)) * c).sum().backward()
    out["shared"] = (x1.grad, x2.grad)
    # a tensor logit_bias of -0.0 on one rank and 0.0 on another: the same value (as the float beta / tau_plus)
    x, y = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    try:
        out["signed_zero_bias"] = float(cb.siglip_loss(x, y, 6.0, torch.tensor(-0.0 if rank == 1 else 0.0),
                                                       process_group=w))
    except ValueError as exc:
        out["signed_zero_bias"] = str(exc)
    return out


def test_gathers_sharing_a_gradient_and_a_signed_zero_bias():
    world = 2
    res = _run_ranks(_shared_gradient_worker, world)
    c = torch.arange(1.0, 2 * world * 3 + 1, dtype=torch.float64).reshape(2 * world, 3)
    for r in range(world):
        want = world * c[2 * r : 2 * r + 2]  # every rank's loss uses every slice: the sum over ranks
        torch.testing.assert_close(res[r]["shared"][0], want)
        torch.testing.assert_close(res[r]["shared"][1], want)
        assert isinstance(res[r]["signed_zero_bias"], float) and math.isfinite(res[r]["signed_zero_bias"]), res[r]


def test_sharded_bank_direct_call_and_precision_single_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        w = dist.group.WORLD
        # info_nce_sharded's defaults are info_nce's (temperature 0.1, normalize=True, reduction="mean")
        g = torch.Generator().manual_seed(2)
        a, p = (torch.randn(9, 5, generator=g, dtype=torch.float64) for _ in range(2))
        bank = torch.randn(40, 5, generator=g, dtype=torch.float64) * 3
        torch.testing.assert_close(info_nce_sharded(a, p, bank, process_group=w), cb.info_nce(a, p, bank),
                                   rtol=1e-12, atol=0)
        # positives in the bank's dtype, as in one process (float32 features, half-precision banks)
        for fb in (torch.bfloat16, torch.float16):
            got = cb.info_nce(a.float(), p.float(), bank.to(fb), 0.5, reduction="none", process_group=w)
            want = cb.info_nce(a.float(), p.float(), bank.to(fb), 0.5, reduction="none")
            torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        # a temperature too small for the bank's dtype: refused before the exchange, as without a group
        with pytest.raises(ValueError, match="1 / temperature overflows float32"):
            cb.info_nce(a.float(), p.float(), bank.float(), 1e-39, process_group=w)
        # a dominant positive (loss ~4e-18, logits 3e4): softplus(lse_neg - l_0) keeps it; logaddexp(l_0, lse_neg)
        # - l_0 lost it to the rounding of the sum (eps |l_0| ~ 4e-12, even in float64)
        L = 3e4
        rows = torch.zeros(4, 4, dtype=torch.float64)
        rows[:, 0] = torch.tensor([L, L - 40.0, L - 45.0, 1.0])
        rows[1, 1], rows[2, 2] = 0.5, 0.5
        anchor = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
        exact = torch.log1p(torch.exp(rows[1:, 0] - L).sum())
        for dtype in (torch.float64, torch.float32):
            got = cb.info_nce(anchor.to(dtype), rows[:1].to(dtype), rows[1:].to(dtype), temperature=1.0,
                              normalize=False, process_group=w)
            assert abs(float(got) - float(exact)) <= 1e-5 * float(exact), (dtype, float(got), float(exact))
    finally:
        dist.destroy_process_group()


def _compiled_temperature_worker(rank, world, init_file, out_dir):
    # (not a _gloo_worker: a compiled graph that took the group keeps gloo's threads past destroy_process_group)
    import os
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        w = dist.group.WORLD
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
        torch._dynamo.reset()
        compiled = torch.compile(lambda a, t: cb.info_nce(a, y, None, temperature=t, process_group=w),
                                 backend="aot_eager")
        errors = []
        for t in (0.2, 0.3 + 0.1 * rank):  # the second value is traced as a symbolic float
            try:
                compiled(x, t)
                errors.append(None)
            except ValueError as exc:
                errors.append(str(exc))
        torch.save(errors, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch._dynamo.reset()
        gc.collect()  # (as _gloo_worker: the group's last reference goes in destroy_process_group)
        dist.destroy_process_group()


def test_a_compiled_float_temperature_that_differs_across_ranks_is_refused():
    # A compiled step whose float temperature differs across ranks on a later call: refused on every rank, as in
    # eager mode (the traced float's bits are written to the exchanged vector through a tensor)
    for got in _run_ranks(_compiled_temperature_worker, 2):
        assert got[0] is None and got[1] is not None, got
        assert "temperature (or logit scale) must be the same" in got[1], got
        # and says how a learned one is kept equal (a learnable temperature in a loss module outside DDP drifted
        # apart after one step and the message said not what to do: an exploratory review, 2026-12-06)
        assert "wrapping the module in DistributedDataParallel" in got[1], got


@_gloo_worker()
def _grad_cache_ddp_worker(rank, world):
    # one DDP encoder for both views, nt_xent over the global batch: the cached step (chunks of 3 rows) against the
    # direct one (both views in one forward, as SimCLR code calls a DDP module), and the allreduces each one runs
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def encoder():
        torch.manual_seed(0)  # the same initial weights on every rank
        return torch.nn.Sequential(torch.nn.Linear(D, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4)).double()

    g = torch.Generator().manual_seed(10 + rank)
    x1, x2 = (torch.randn(7, D, generator=g, dtype=torch.float64) for _ in range(2))
    loss_fn = lambda a, b: cb.nt_xent(a, b, 0.5, process_group=dist.group.WORLD)  # noqa: E731
    out = {}
    for form in ("direct", "cached", "cached_static_graph"):
        # (a static graph's first iteration refuses DDP's no_sync: grad_cache then synchronises every chunk)
        ddp = torch.nn.parallel.DistributedDataParallel(encoder(), static_graph=form == "cached_static_graph")
        reductions = []

        def hook(state, bucket):
            reductions.append(bucket.index())
            return allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, hook)
        if form == "direct":
            z = ddp(torch.cat([x1, x2]))
            loss = loss_fn(z[:7], z[7:])
            loss.backward()
        else:
            loss = cb.grad_cache(loss_fn, ddp, [x1, x2], chunk_size=3)
        out[form] = (loss.detach(), [p.grad.clone() for p in ddp.parameters()], len(reductions))
        del ddp, hook
    return out


def test_grad_cache_with_a_ddp_encoder_syncs_once_and_matches_the_direct_step():
    world = 2
    results = _run_ranks(_grad_cache_ddp_worker, world)
    for rank in range(world):
        loss_d, grads_d, n_d = results[rank]["direct"]
        for form in ("cached", "cached_static_graph"):
            loss_c, grads_c, n_c = results[rank][form]
            assert_close_scaled(loss_c, loss_d, 1e-12, f"rank {rank} {form} loss")
            for g_c, g_d, g_0 in zip(grads_c, grads_d, results[0][form][1]):
                assert_close_scaled(g_c, g_d, 1e-11, f"rank {rank} {form} grad")
                assert torch.equal(g_c, g_0)  # synchronised: every rank holds the same gradient
        # the 6 chunk backwards (2 views x 3 chunks) reduce as often as the direct step's one backward does; with
        # a static graph each of them reduces
        assert n_d >= 1 and results[rank]["cached"][2] == n_d, (rank, n_d, results[rank]["cached"][2])
        assert results[rank]["cached_static_graph"][2] == 6 * n_d, (rank, n_d, results[rank]["cached_static_graph"])


class _FlaggedAdapter(torch.nn.Module):
    """A base layer plus an adapter applied to flagged rows only: a chunk without a flagged row leaves the adapter
    unused (a data-dependent path)."""

    def __init__(self, frozen_base=False):
        super().__init__()
        torch.manual_seed(0)  # the same initial weights on every rank
        self.base = torch.nn.Linear(D, 4).double().requires_grad_(not frozen_base)
        self.adapter = torch.nn.Linear(D, 4).double()

    def forward(self, x, flag):
        out = self.base(x)
        return out + self.adapter(x) * flag[:, None] if bool(flag.any()) else out


@_gloo_worker()
def _grad_cache_unused_worker(rank, world):
    # each chunk is a DDP iteration: with find_unused_parameters=True (the documented requirement) two SGD steps of
    # grad_cache, whose first chunk leaves the adapter unused, match two direct steps. With a frozen base the last
    # chunks (no flagged row) build no graph at all, so the chunk meant to synchronise reduces nothing: grad_cache
    # then synchronises through the last chunk that had a graph (before that fix the ranks' gradients diverged
    # silently), with find_unused_parameters True or False
    g = torch.Generator().manual_seed(20 + rank)
    x1, x2 = (torch.randn(6, D, generator=g, dtype=torch.float64) for _ in range(2))
    f1 = torch.tensor([0, 0, 1, 0, 1, 1], dtype=torch.float64)
    loss_fn = lambda a, b: cb.nt_xent(a, b, 0.5, process_group=dist.group.WORLD)  # noqa: E731
    out = {}
    for case, frozen_base, f2, find_unused in (
        ("some_chunks_unused", False, [0, 0, 0, 1, 0, 0], True),
        ("last_chunk_no_graph", True, [1, 0, 0, 0, 0, 0], True),
        ("last_chunk_no_graph_all_used", True, [1, 0, 0, 0, 0, 0], False),
    ):
        f2 = torch.tensor(f2, dtype=torch.float64)
        for form in ("direct", "cached"):
            ddp = torch.nn.parallel.DistributedDataParallel(_FlaggedAdapter(frozen_base),
                                                            find_unused_parameters=find_unused)
            opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
            for _ in range(2):
                opt.zero_grad()
                if form == "direct":
                    z = ddp(torch.cat([x1, x2]), torch.cat([f1, f2]))
                    loss_fn(z[:6], z[6:]).backward()
                else:
                    cb.grad_cache(loss_fn, ddp, [(x1, f1), (x2, f2)], chunk_size=2)
                opt.step()
            out[case, form] = [p.detach().clone() for p in ddp.parameters()]
            del ddp, opt
    return out


def test_grad_cache_under_ddp_with_parameters_some_chunks_do_not_use():
    results = _run_ranks(_grad_cache_unused_worker, 2)
    for case in ("some_chunks_unused", "last_chunk_no_graph", "last_chunk_no_graph_all_used"):
        for rank in range(2):
            cached, direct, rank0 = (results[r][case, f] for r, f in ((rank, "cached"), (rank, "direct"), (0, "cached")))
            for p_c, p_d, p_0 in zip(cached, direct, rank0):
                assert_close_scaled(p_c, p_d, 1e-12, f"{case}: rank {rank} parameters after two steps")
                assert torch.equal(p_c, p_0), case
