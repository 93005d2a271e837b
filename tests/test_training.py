"""Training-loop pieces: clip_loss, NegativeQueue."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import contrastbound as cb
from contrastbound.reference import info_nce_reference

from conftest import assert_close_scaled


def _clip_reference(img, txt, logit_scale):
    img, txt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    logits = logit_scale.clamp(max=100) * img @ txt.t()
    target = torch.arange(len(img))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


@pytest.mark.parametrize("scale", [1.0, 14.3, 250.0])
def test_clip_loss_matches_open_clip_formula(scale):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(33, 12, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(33, 12, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    s_ref = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    loss = cb.clip_loss(img, txt, s)
    ref = _clip_reference(img, txt, s_ref)
    assert_close_scaled(loss, ref, 1e-10, "loss")
    grads = torch.autograd.grad(loss, [img, txt, s])
    ref_grads = torch.autograd.grad(ref, [img, txt, s_ref])
    for x, y in zip(grads, ref_grads):
        assert_close_scaled(x, y, 1e-9, "grad")
    if scale > 100:
        assert grads[2] == 0  # the clamp binds


def test_clip_loss_gradcheck():
    g = torch.Generator().manual_seed(1)
    img = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda i, t, s: cb.clip_loss(i, t, s, reduction="none"), (img, txt, s),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


def test_clip_loss_small_float16_logit_scale():
    # 1 / logit_scale is formed in float32 at least: in float16 a scale below 1.5e-5 gave an infinite temperature
    # and an error naming "temperature". Expected: the open_clip formula at the float16 value, in float64.
    g = torch.Generator().manual_seed(2)
    img, txt = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    s = torch.tensor(1e-6, dtype=torch.float16, requires_grad=True)
    loss = cb.clip_loss(img, txt, s)
    s_ref = s.detach().double().requires_grad_(True)
    ref = _clip_reference(img.double(), txt.double(), s_ref)
    assert_close_scaled(loss.double(), ref, 1e-5, "loss")
    (gs,) = torch.autograd.grad(loss, [s])
    (gr,) = torch.autograd.grad(ref, [s_ref])
    assert gs.dtype == torch.float16 and torch.isfinite(gs)
    assert abs(gs.double() - gr) <= 2e-3 * abs(gr)  # float16's resolution (the temperature's gradient: below)


@pytest.mark.parametrize("scale", [1e-6, 1e-3])
def test_clip_loss_small_logit_scale_gradient_float32(scale):
    # A small logit_scale (a high temperature): the positive logit is tiny beside lse ~ log N, and the scale's
    # gradient was formed from lse - loss (2x off at 1e-6, 4e-3 relative at 1e-3). Expected: float64 autograd.
    g = torch.Generator().manual_seed(2)
    img, txt = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    s = torch.tensor(scale, requires_grad=True)
    s_ref = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    (gs,) = torch.autograd.grad(cb.clip_loss(img, txt, s), [s])
    (gr,) = torch.autograd.grad(_clip_reference(img.double(), txt.double(), s_ref), [s_ref])
    assert abs(gs.double() - gr) <= 1e-5 * abs(gr)


def test_clip_loss_bad_scale():
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="logit_scale"):
        cb.clip_loss(x, x, 0.0)
    with pytest.raises(TypeError, match="logit_scale"):
        cb.clip_loss(x, x, "10")
    with pytest.raises(ValueError, match="logit_scale"):
        cb.clip_loss(x, x, torch.ones(2))


def test_queue_wraps_around_and_keeps_the_newest():
    q = cb.NegativeQueue(5, 2)
    assert len(q) == 0 and q.negatives().shape == (0, 2)
    q.enqueue(torch.tensor([[1.0, 1], [2, 2], [3, 3]]))
    assert len(q) == 3 and q.negatives()[:, 0].tolist() == [1, 2, 3]
    q.enqueue(torch.tensor([[4.0, 4], [5, 5], [6, 6]]))
    assert len(q) == 5 and sorted(q.negatives()[:, 0].tolist()) == [2, 3, 4, 5, 6]
    q.enqueue(torch.arange(14.0).reshape(7, 2))  # more keys than the queue holds: the last 5 stay
    assert sorted(q.negatives()[:, 0].tolist()) == [4, 6, 8, 10, 12]


def test_queue_enqueues_its_own_rows():
    """Keys that are rows of the queue itself (``q.enqueue(q.negatives())``, a slice of it) are copied before the
    writes overlap them (a mutation audit: without the copy the whole queue came out [6, 7, 6, 7] and a slice raised
    torch's "refer to a single memory location")."""
    q = cb.NegativeQueue(4, 1)
    q.enqueue(torch.arange(8.0)[:, None])  # rows [4, 5, 6, 7]: the newest 4, written from position 0 after a wrap
    q.enqueue(torch.tensor([[8.0], [9.0]]))  # rows [8, 9, 6, 7], ptr 2
    assert q.queue.flatten().tolist() == [8.0, 9.0, 6.0, 7.0] and int(q.ptr) == 2
    q.enqueue(q.negatives())  # the same 4 keys again, written from ptr 2 with a wrap
    assert q.queue.flatten().tolist() == [6.0, 7.0, 8.0, 9.0] and int(q.ptr) == 2
    q2 = cb.NegativeQueue(4, 1)
    q2.enqueue(torch.arange(4.0)[:, None])
    q2.enqueue(q2.negatives()[1:3])  # rows 1, 2 written over rows 0, 1
    assert q2.queue.flatten().tolist() == [1.0, 2.0, 2.0, 3.0]


def test_queue_detaches_casts_and_saves_state():
    q = cb.NegativeQueue(4, 3, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 3, generator=g, requires_grad=True)
    q.enqueue(k)
    assert q.negatives().dtype == torch.float64 and not q.negatives().requires_grad
    state = q.state_dict()
    q2 = cb.NegativeQueue(4, 3, dtype=torch.float64)
    q2.load_state_dict(state)
    assert len(q2) == 2 and torch.equal(q2.negatives(), q.negatives())
    # The queue's bank in a loss: the anchors' gradient is the reference's (no gradient flows into the queue).
    a = torch.randn(2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    cb.info_nce(a, a.detach() + 0.1, q.negatives()).backward()
    ref = info_nce_reference(a, a.detach() + 0.1, k.detach().double())  # the queue holds k's two rows
    assert_close_scaled(a.grad, torch.autograd.grad(ref, a)[0], 1e-12, "anchors' gradient")


def test_queue_state_round_trip_keeps_the_write_position():
    # After load_state_dict the next keys go where the saved queue would have put them (wrap-around included).
    q = cb.NegativeQueue(5, 1)
    q.enqueue(torch.arange(7.0).reshape(7, 1))  # keeps 2..6 in slots 0..4, next write at slot 0
    q2 = cb.NegativeQueue(5, 1)
    q2.load_state_dict(q.state_dict())
    for x in (q, q2):
        x.enqueue(torch.tensor([[10.0], [11.0]]))
    assert len(q2) == 5 and torch.equal(q2.negatives(), q.negatives())
    assert sorted(q2.negatives()[:, 0].tolist()) == [4, 5, 6, 10, 11]
    assert int(q2.ptr) == int(q.ptr) == 2 and int(q2.filled) == 5


def test_queue_reads_nothing_back_from_its_buffers():
    # enqueue / negatives / len use host copies: the buffers are only written (no device read-back on a GPU).
    q = cb.NegativeQueue(4, 2)
    q.enqueue(torch.ones(3, 2))

    class NoRead(torch.Tensor):
        def __int__(self):
            raise AssertionError("buffer read back")

        __index__ = __int__

        def item(self):
            raise AssertionError("buffer read back")

    q.ptr = q.ptr.as_subclass(NoRead)
    q.filled = q.filled.as_subclass(NoRead)
    q.enqueue(torch.zeros(2, 2))
    assert len(q) == 4 and q.negatives().shape == (4, 2)
    q.clear()  # (its own write of the buffers: the host copies follow without a read-back; a mutation audit's gap)
    assert len(q) == 0
    q.enqueue(torch.zeros(2, 2))
    assert len(q) == 2


def test_queue_negatives_and_labels_are_views_of_the_buffers():
    # "a view, no copy" (a mutation audit: a copy passed every test): the keys as stored, filling and full
    q = cb.NegativeQueue(8, 4, labels=True)
    q.enqueue(torch.randn(3, 4), torch.arange(3))
    n, y = q.negatives(), q.labels()
    assert n._base is q.queue and n.data_ptr() == q.queue.data_ptr() and n.shape == (3, 4)
    assert y._base is q.queue_labels and y.data_ptr() == q.queue_labels.data_ptr()
    q.enqueue(torch.randn(6, 4), torch.arange(6))
    assert q.negatives() is q.queue and q.labels() is q.queue_labels


def test_queue_follows_writes_it_did_not_make():
    # DDP's buffer broadcast, a user's fill_ or module.to write the buffers: the host ints follow (one read-back)
    q = cb.NegativeQueue(4, 2)
    q.enqueue(torch.ones(3, 2))
    q.ptr.fill_(1)
    q.filled.fill_(1)
    assert len(q) == 1 and q.negatives().shape == (1, 2)
    q.enqueue(torch.full((2, 2), 5.0))  # at slots 1 and 2
    assert len(q) == 3 and q.queue[:, 0].tolist() == [1, 5, 5, 0]
    q.filled.fill_(9)
    with pytest.raises(ValueError, match="filled = 9"):
        len(q)
    q.filled.fill_(3)
    q.to(torch.float64)
    assert len(q) == 3
    # writes that bypass the version counters are seen after resync()
    q.ptr.data.fill_(2)
    q.filled.data.fill_(2)
    q.resync()
    assert len(q) == 2
    q.ptr.fill_(3)
    q.filled.fill_(3)
    # rows of the queue itself enqueued again (overlapping writes are cloned first)
    q.enqueue(q.negatives()[:2])
    assert q.queue[:, 0].tolist() == [5, 5, 5, 1]


def test_queue_refuses_a_fill_level_apart_from_its_write_position():
    # Until full, keys sit in rows [0, filled) and the next goes to row filled: "clearing" by filled.fill_(0) alone
    # served the stale row 0 after the next write (enqueue wrote at ptr = 3). Refused now, also from a state_dict,
    # and clear() does it right.
    q = cb.NegativeQueue(4, 1)
    q.enqueue(torch.tensor([[1.0], [2.0], [3.0]]))
    q.filled.fill_(0)
    with pytest.raises(ValueError, match="write position equals the fill level"):
        q.enqueue(torch.tensor([[9.0]]))
    q.clear()
    q.enqueue(torch.tensor([[9.0]]))
    assert q.negatives().tolist() == [[9.0]]
    state = q.state_dict()
    state["ptr"] = torch.tensor(3)
    with pytest.raises(RuntimeError, match="write position equals the fill level"):
        cb.NegativeQueue(4, 1).load_state_dict(state)


def test_queue_negatives_and_labels_follow_a_load_without_len_first():
    # README's SupCon recipe calls queue.negatives() / queue.labels() with no len(q) before them: each must
    # re-read the fill level itself (a mutation audit: with only len() re-reading it, every test passed, and a
    # loaded queue served 0 rows, or stale ones after a write it did not make).
    src = cb.NegativeQueue(5, 2, labels=True)
    src.enqueue(torch.arange(6.0).reshape(3, 2), torch.tensor([7, 8, 9]))
    q = cb.NegativeQueue(5, 2, labels=True)
    q.load_state_dict(src.state_dict())
    assert q.negatives().tolist() == [[0, 1], [2, 3], [4, 5]]
    q2 = cb.NegativeQueue(5, 2, labels=True)
    q2.load_state_dict(src.state_dict())
    assert q2.labels().tolist() == [7, 8, 9]
    q2.ptr.fill_(1)
    q2.filled.fill_(1)
    assert q2.labels().tolist() == [7] and q2.negatives().tolist() == [[0, 1]]


@pytest.mark.parametrize("filled", [-1, 5])
def test_queue_refuses_a_fill_level_outside_the_queue(filled):
    # 0 <= filled <= size: a level of size + 1 loaded (a mutation audit), and len(q) counted a key the queue lacks
    q = cb.NegativeQueue(4, 2)
    q.enqueue(torch.ones(4, 2))
    state = q.state_dict()
    state["filled"] = torch.tensor(filled)
    fresh = cb.NegativeQueue(4, 2)
    with pytest.raises(RuntimeError, match="not a state of a queue of size 4"):
        fresh.load_state_dict(state)
    assert len(fresh) == 0
    q.filled.fill_(filled)
    with pytest.raises(ValueError, match="not a state of a queue of size 4"):
        len(q)


def test_queue_reads_its_buffers_back_once_after_a_write_it_did_not_make():
    # "re-read (once)": after a load (or resync) the next use reads the buffers and later ones use the host ints
    # again (a mutation audit: re-reading at every len / negatives passed every test, a GPU sync each time)
    src = cb.NegativeQueue(4, 2)
    src.enqueue(torch.ones(3, 2))
    q = cb.NegativeQueue(4, 2)
    q.load_state_dict(src.state_dict())
    reads = []

    class Counted(torch.Tensor):
        def __int__(self):
            reads.append(1)
            return int(self.as_subclass(torch.Tensor))

    q.ptr, q.filled = q.ptr.as_subclass(Counted), q.filled.as_subclass(Counted)
    q._seen = None  # (the swap above is itself a write the queue did not make)
    for _ in range(5):
        assert len(q) == 3 and q.negatives().shape == (3, 2)
    assert len(reads) == 2  # ptr and filled, once each
    q.resync()
    assert len(q) == 3 and len(reads) == 4


def test_queue_repr_of_a_state_enqueue_cannot_reach():
    # print(model) must not raise: a queue whose buffers hold no valid state prints its level as "?"
    q = cb.NegativeQueue(4, 2)
    q.ptr.fill_(2)  # (ptr != filled before the queue is full)
    assert "filled=? (the buffers hold no valid state" in repr(q)
    q.clear()
    assert "filled=0" in repr(q)
    # the rest of the line: size, dim and dtype (only filled= and labels= were checked: a mutation printing
    # "dtype=?" passed)
    assert repr(cb.NegativeQueue(8, 4, dtype=torch.float16)) == \
        "NegativeQueue(size=8, dim=4, dtype=torch.float16, filled=0)"


def test_queue_reset_parameters_zeroes_keys_and_labels():
    # the docstring's promise (a mutation audit: keeping the keys passed every test); after to_empty the buffers
    # hold whatever memory they got
    q = cb.NegativeQueue(4, 2, labels=True, device="meta").to_empty(device="cpu")
    q.queue.fill_(7.0)
    q.queue_labels.fill_(3)
    q.reset_parameters()
    assert len(q) == 0 and torch.count_nonzero(q.queue) == 0 and torch.count_nonzero(q.queue_labels) == 0
    q.enqueue(torch.ones(3, 2), torch.tensor([1, 2, 3]))
    q.reset_parameters()
    assert len(q) == 0 and torch.count_nonzero(q.queue) == 0 and torch.count_nonzero(q.queue_labels) == 0


@pytest.mark.parametrize("ptr", [-1, 4])
def test_queue_refuses_a_write_position_outside_the_queue(ptr):
    # ptr must lie in [0, size): at -1 a full queue's next key went to queue[-1:0], an empty slice (the key lost,
    # ptr then 0); no test had covered the bounds (a mutation audit)
    state = cb.NegativeQueue(4, 1).state_dict()
    state["ptr"], state["filled"] = torch.tensor(ptr), torch.tensor(4)
    with pytest.raises(RuntimeError, match="not a state of a queue of size 4"):
        cb.NegativeQueue(4, 1).load_state_dict(state)
    q = cb.NegativeQueue(4, 1)
    q.enqueue(torch.arange(4.0)[:, None])
    q.ptr.fill_(ptr)
    with pytest.raises(ValueError, match="not a state of a queue of size 4"):
        q.enqueue(torch.tensor([[9.0]]))


def test_queue_buffers_follow_the_device_argument():
    # the meta device is not the default one, so it shows a buffer made without device= (on a GPU it would be
    # the labels left on the CPU; a mutation audit)
    q = cb.NegativeQueue(8, 3, labels=True, device="meta")
    assert {b.device.type for b in q.buffers()} == {"meta"}


def test_queue_load_state_dict_is_all_or_nothing():
    # A queue of another size: torch copied the buffers that fit (ptr = filled = 3) before reporting the one that
    # did not, leaving three zero rows counted as keys for a caller that caught the error.
    other = cb.NegativeQueue(5, 3)
    other.enqueue(torch.randn(3, 3))
    q = cb.NegativeQueue(4, 3)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="nothing was loaded"):
            q.load_state_dict(other.state_dict(), strict=strict)
        assert len(q) == 0 and int(q.ptr) == 0 and int(q.filled) == 0


@pytest.mark.parametrize("drop", ["ptr", "filled", "queue", "ptr+filled"])
def test_queue_load_state_dict_with_missing_keys_loads_nothing(drop):
    # torch copies the keys present before it reports the missing ones (strict=True), or never reports them
    # (strict=False): keys without their fill level, or a fill level serving zero rows as negatives, were left.
    src = cb.NegativeQueue(4, 2)
    src.enqueue(torch.full((3, 2), 7.0))
    state = {k: v for k, v in src.state_dict().items() if k not in drop.split("+")}
    for strict in (True, False):
        q = cb.NegativeQueue(4, 2)
        q.enqueue(torch.ones(1, 2))
        with pytest.raises(RuntimeError, match="loaded together"):
            q.load_state_dict(state, strict=strict)
        assert len(q) == 1 and int(q.ptr) == 1 and q.negatives().tolist() == [[1.0, 1.0]]


def test_queue_load_state_dict_refuses_float_positions():
    state = cb.NegativeQueue(4, 2).state_dict()
    state["ptr"], state["filled"] = torch.tensor(2.7), torch.tensor(2.7)
    with pytest.raises(RuntimeError, match="integer tensors"):
        cb.NegativeQueue(4, 2).load_state_dict(state)


def test_queue_under_inference_mode():
    # inference tensors have no version counter: a queue made and used there works as before
    with torch.inference_mode():
        q = cb.NegativeQueue(4, 2)
        q.enqueue(torch.ones(3, 2))
        q.enqueue(torch.zeros(2, 2))
        assert len(q) == 4 and q.negatives().shape == (4, 2) and int(q.ptr) == 1
    # a state loaded into such a queue is served (the load wrote in place, unseen by the stamp: len 0, and the next
    # enqueue wrote row 0 over the loaded keys)
    src = cb.NegativeQueue(4, 2)
    src.enqueue(torch.arange(6.0).reshape(3, 2))
    with torch.inference_mode():
        q = cb.NegativeQueue(4, 2)
        q.load_state_dict(src.state_dict())
        assert len(q) == 3 and torch.equal(q.negatives(), src.negatives())
        q.enqueue(torch.full((1, 2), -1.0))
        assert len(q) == 4 and int(q.ptr) == 0 and torch.equal(q.queue[:3], src.queue[:3])


def test_queue_in_a_compiled_step_does_not_recompile_per_position():
    # Traced, the host ints were constants: one recompilation per write position until the limit (8), then eager.
    torch._dynamo.reset()
    torch.manual_seed(0)
    q = cb.NegativeQueue(64, 8)
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(a, k):
        loss = cb.info_nce(a, k, q.negatives() if len(q) else None)
        q.enqueue(k)
        return loss

    compiled = torch.compile(step, backend=count)
    eager_q = cb.NegativeQueue(64, 8)
    for _ in range(30):  # 16 steps to fill, then wrap-around
        a, k = torch.randn(4, 8), torch.randn(4, 8)
        loss = compiled(a, k)
        ref = cb.info_nce(a, k, eager_q.negatives() if len(eager_q) else None)
        eager_q.enqueue(k)
        torch.testing.assert_close(loss, ref)
    assert len(graphs) <= 3, f"{len(graphs)} graphs compiled"
    assert torch.equal(q.queue, eager_q.queue) and len(q) == 64


def test_queue_bad_input():
    with pytest.raises(ValueError, match="size"):
        cb.NegativeQueue(0, 3)
    with pytest.raises(ValueError, match="dim"):
        cb.NegativeQueue(3, -1)
    # a value that is not an integer is a TypeError (as torch.zeros(2.0) gives), one below 1 a ValueError
    for size in (True, 2.0, "3", None):
        with pytest.raises(TypeError, match="size must be a positive int"):
            cb.NegativeQueue(size, 3)
    with pytest.raises(TypeError, match="dim must be a positive int, got float"):
        cb.NegativeQueue(3, 2.5)
    for dtype in ("float32", torch.int64, torch.float8_e4m3fn):  # (float8 was taken, then refused by info_nce)
        with pytest.raises(TypeError, match="dtype must be torch.float32, float64, float16 or bfloat16"):
            cb.NegativeQueue(3, 2, dtype=dtype)
    assert cb.NegativeQueue(np.int64(3), np.int32(2)).queue.shape == (3, 2)  # numpy integers are integers
    # the device and the size are named (torch.zeros's own errors were "Storage size calculation overflowed",
    # "Expected one of cpu, cuda, ..." and, for "cuda" on a CPU build, AssertionError "Torch not compiled with CUDA")
    with pytest.raises(ValueError, match="size x dim = 4611686018427387904 x 2 .* past what one tensor can address"):
        cb.NegativeQueue(2**62, 2)
    # the boundary: exactly 2^63 bytes (float32 keys) is one past what a tensor addresses (a mutation moving the
    # limit to 2^64 passed with 2^66 bytes alone, leaving torch's "Storage size calculation overflowed" here)
    for size, dim in ((2**61, 1), (2**31, 2**30)):
        with pytest.raises(ValueError, match=f"size x dim = {size} x {dim} .* take 9223372036854775808 bytes"):
            cb.NegativeQueue(size, dim)
    with pytest.raises(ValueError, match="device must be a torch.device, .* got 'cpux'"):
        cb.NegativeQueue(3, 2, device="cpux")
    with pytest.raises(TypeError, match="device must be a torch.device, .* got float 3.5"):
        cb.NegativeQueue(3, 2, device=3.5)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' cannot hold the queue here"):
            cb.NegativeQueue(3, 2, device="cuda")
    for device in ("cpu", torch.device("cpu"), "meta"):
        assert cb.NegativeQueue(3, 2, device=device).queue.device == torch.device(device)
    q = cb.NegativeQueue(3, 2)
    with pytest.raises(ValueError, match="keys"):
        q.enqueue(torch.randn(2, 5))
    with pytest.raises(TypeError, match="keys"):
        q.enqueue(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="keys are a meta tensor"):  # torch's copy error named no argument
        q.enqueue(torch.ones(2, 2, device="meta"))
    assert len(q) == 0


def test_labelled_queue_keeps_each_key_with_its_label():
    # labels follow their keys through a wrap, more keys than the queue holds, its own rows, a state_dict round trip
    # (write position included), .to(float16) (the labels stay int64) and reset_parameters
    q = cb.NegativeQueue(5, 1, labels=True)
    assert q.labels().shape == (0,) and q.labels().dtype == torch.int64 and "labels=True" in repr(q)
    q.enqueue(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([10, 20, 30], dtype=torch.int32))
    q.enqueue(torch.tensor([[4.0], [5.0], [6.0]]), torch.tensor([40, 50, 60]))
    assert q.negatives()[:, 0].tolist() == [6, 2, 3, 4, 5] and q.labels().tolist() == [60, 20, 30, 40, 50]
    q.enqueue(torch.arange(7.0)[:, None], torch.arange(7) * 100)  # the last 5, from position 1
    assert q.negatives()[:, 0].tolist() == [6, 2, 3, 4, 5] and q.labels().tolist() == [600, 200, 300, 400, 500]
    own = cb.NegativeQueue(4, 1, labels=True)
    own.enqueue(torch.arange(4.0)[:, None], torch.arange(4))
    own.enqueue(torch.tensor([[9.0]]), torch.tensor([9]))  # [9, 1, 2, 3], next write at position 1
    own.enqueue(own.negatives()[0:2], own.labels()[0:2])  # its own rows 0, 1 written over rows 1, 2
    assert own.labels().tolist() == own.negatives()[:, 0].long().tolist() == [9, 9, 1, 3]
    q2 = cb.NegativeQueue(5, 1, labels=True)
    q2.load_state_dict(q.state_dict())
    for x in (q, q2):
        x.enqueue(torch.tensor([[7.0]]), torch.tensor([7]))
    assert q2.labels().tolist() == q.labels().tolist() == [600, 7, 300, 400, 500]
    half = q2.half()
    assert half.queue.dtype == torch.float16 and half.labels().dtype == torch.int64
    q2.reset_parameters()
    assert len(q2) == 0 and q2.queue_labels.abs().sum() == 0


def test_labelled_queue_state_dict_and_bad_input():
    q, plain = cb.NegativeQueue(3, 2, labels=True), cb.NegativeQueue(3, 2)
    q.enqueue(torch.randn(2, 2), torch.tensor([4, 5]))
    # a state without labels into a labelled queue loads nothing (keys without labels would be served)
    fresh = cb.NegativeQueue(3, 2, labels=True)
    with pytest.raises(RuntimeError, match="queue, ptr, filled, queue_labels are loaded together, but queue_labels "
                                           "missing; nothing was loaded"):
        fresh.load_state_dict(plain.state_dict())
    assert len(fresh) == 0
    for bad in (torch.zeros(3), torch.zeros(3, dtype=torch.bool)):  # (bool labels loaded as 0 / 1 before)
        with pytest.raises(RuntimeError, match="queue_labels must be an integer tensor of shape \\(3,\\)"):
            fresh.load_state_dict({**q.state_dict(), "queue_labels": bad})
    # a labelled state into a plain queue: the labels are an unexpected key, left to strict as torch does
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "queue_labels"'):
        plain.load_state_dict(q.state_dict())
    assert plain.load_state_dict(q.state_dict(), strict=False).unexpected_keys == ["queue_labels"]
    assert len(plain) == 2
    with pytest.raises(ValueError, match="keeps a label per key \\(labels=True\\): pass enqueue\\(keys, labels\\)"):
        q.enqueue(torch.randn(1, 2))
    with pytest.raises(ValueError, match="labels were given to a NegativeQueue built without labels=True"):
        plain.enqueue(torch.randn(1, 2), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="this NegativeQueue keeps no labels"):
        plain.labels()
    with pytest.raises(TypeError, match="labels must be an integer tensor of shape \\(n,\\) = \\(1,\\), got dtype"):
        q.enqueue(torch.randn(1, 2), torch.tensor([1.0]))
    with pytest.raises(TypeError, match="labels must be an integer tensor of shape \\(n,\\) = \\(1,\\), got list"):
        q.enqueue(torch.randn(1, 2), [1])
    with pytest.raises(ValueError, match="labels must have shape \\(n,\\) = \\(2,\\) \\(one per key\\), got \\(3,\\)"):
        q.enqueue(torch.randn(2, 2), torch.arange(3))
    with pytest.raises(ValueError, match="labels are a meta tensor"):
        q.enqueue(torch.randn(1, 2), torch.zeros(1, dtype=torch.long, device="meta"))
    with pytest.raises(TypeError, match="labels must be a bool"):
        cb.NegativeQueue(3, 2, labels=1)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):  # (a mutation audit's survivors below)
        q.enqueue(torch.randn(2, 2), torch.tensor([True, False]))
    assert q.labels().tolist() == [4, 5]  # nothing refused was written
    wrong = cb.NegativeQueue(3, 2, labels=True)
    wrong.enqueue(torch.randn(3, 2), torch.arange(3))
    state = {**wrong.state_dict(), "queue_labels": torch.zeros(9, dtype=torch.long)}
    with pytest.raises(RuntimeError, match="queue_labels must be an integer tensor of shape"):
        q.load_state_dict(state)
    assert len(q) == 2 and q.labels().tolist() == [4, 5]  # all or nothing: the fill level untouched
    old = cb.NegativeQueue(3, 2)
    del old.__dict__["with_labels"]  # (a queue pickled before labels existed: the class default, no labels)
    old.enqueue(torch.randn(1, 2))
    assert len(old) == 1


def test_float16_queue_refuses_keys_beyond_its_range():
    # A finite key beyond 65504 became inf in a float16 queue (torch's cast), and the loss over the queue NaN.
    q = cb.NegativeQueue(4, 2, dtype=torch.float16)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        with pytest.raises(ValueError, match=r"float16's range \(largest finite magnitude 7[.0-9]*e\+04 > 65504\)"):
            q.enqueue(torch.tensor([[1.0, 2.0], [-7e4, 0.0]], dtype=dtype))
        assert len(q) == 0  # nothing written
    q.enqueue(torch.tensor([[65519.0, -1.0]]))  # rounds to 65504: representable
    q.enqueue(torch.tensor([[float("inf"), 0.0]]))  # inf given stays inf (as in a float32 queue)
    # Only the rows kept count: of 5 keys the first is dropped (the queue holds 4).
    q.enqueue(torch.cat([torch.full((1, 2), 1e6), torch.ones(4, 2)]))
    assert len(q) == 4 and torch.equal(q.negatives(), torch.ones(4, 2, dtype=torch.float16))
    a = torch.randn(3, 2, dtype=torch.float16)
    assert torch.isfinite(cb.info_nce(a, a, q.negatives())).all()


@pytest.mark.parametrize("queue_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_queue_refuses_float64_keys_beyond_its_range(queue_dtype):
    # float64 keys beyond ~3.4e38 were stored as inf in a float32 / bfloat16 queue without an error.
    q = cb.NegativeQueue(4, 2, dtype=queue_dtype)
    name = str(queue_dtype).replace("torch.", "")
    message = rf"beyond {name}'s range \(largest finite magnitude 1e\+39 > 3\.[0-9]+e\+38\).*float64 queue"
    with pytest.raises(ValueError, match=message):
        q.enqueue(torch.tensor([[1.0, 2.0], [-1e39, float("inf")]], dtype=torch.float64))  # names the finite one
    assert len(q) == 0  # nothing written
    q.enqueue(torch.tensor([[1e38, float("-inf")]], dtype=torch.float64))  # in range / inf given: stored as given
    assert len(q) == 1 and q.negatives()[0, 1] == float("-inf") and torch.isfinite(q.negatives()[0, 0])
    # float32 keys are not checked: a bfloat16 queue's range is 0.4 % smaller, so 3.4e38 becomes inf there (the
    # documented gap), and stays finite in a float32 queue
    q.enqueue(torch.full((1, 2), 3.4e38))
    assert len(q) == 2 and bool(torch.isinf(q.negatives()[1]).all()) == (queue_dtype == torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [1, 7, 300])  # 2N = 600 crosses the kernel's anchor blocks and bank tiles
@pytest.mark.parametrize("temperature", [0.01, 0.5])
def test_nt_xent_matches_reference(dtype, N, temperature):
    from contrastbound.reference import nt_xent_reference

    from conftest import TOL

    g = torch.Generator().manual_seed(N)
    z1 = torch.randn(N, 9, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    z2 = (z1.detach().double() + 0.3 * torch.randn(N, 9, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True)
    loss = cb.nt_xent(z1, z2, temperature, reduction="none")
    r1, r2 = (x.detach().double().requires_grad_(True) for x in (z1, z2))
    ref = nt_xent_reference(r1, r2, temperature, reduction="none")
    assert loss.shape == (2 * N,) and loss.dtype == dtype
    # Logits of magnitude 1 / temperature cancel: N = 1 (no negatives) gives a loss and gradients of exactly 0 up
    # to that rounding, and N = 7 at temperature 0.01 losses of ~1e-11; elsewhere relative (at N = 300 the
    # largest loss is ~8).
    floor = 1 / temperature if N == 1 or (N <= 7 and temperature < 0.05) else 0.0
    assert_close_scaled(loss, ref, TOL[dtype], "loss", floor=floor)
    up = torch.rand(2 * N, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(loss, [z1, z2], up.to(dtype))
    ref_grads = torch.autograd.grad(ref, [r1, r2], up)
    for x, y in zip(grads, ref_grads):
        assert_close_scaled(x, y, TOL[dtype], "grad", floor=floor)


def test_nt_xent_gradcheck_with_learnable_temperature():
    g = torch.Generator().manual_seed(3)
    z1 = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, t: cb.nt_xent(a, b, t, reduction="none"), (z1, z2, t),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


def test_nt_xent_confident_pairs_keep_the_positive_term_exact():
    # A trained model: each view's pair dominates its sum (T = 0.05, pairs at distance ~0.2 of unit-scale rows).
    # With the pair's logit inside the bank and subtracted again, the bfloat16 gradient was the difference of two
    # rounded vectors of size s |a|: norm-relative error 2.1 against float64 (torch's own bfloat16 autograd 0.40),
    # the float32 loss 7.1e-2 (median relative; torch 3.0e-3), and a loss of z against itself came out negative.
    # Now: loss 1.1e-3 / 1.6e-3, gradients 4.2e-3 / 8.2e-3 (float32 / bfloat16).
    from contrastbound.reference import nt_xent_reference

    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(256, 64, generator=g, dtype=torch.float64)
    z2 = z1 + 0.2 * torch.randn(256, 64, generator=g, dtype=torch.float64)
    r1, r2 = (x.clone().requires_grad_(True) for x in (z1, z2))
    ref = nt_xent_reference(r1, r2, 0.05, reduction="none")
    want = torch.autograd.grad(ref.sum(), [r1, r2])
    for dtype, loss_tol, grad_tol in [(torch.float32, 1e-2, 2e-2), (torch.bfloat16, 2e-2, 5e-2)]:
        x1, x2 = (x.to(dtype).requires_grad_(True) for x in (z1, z2))
        loss = cb.nt_xent(x1, x2, 0.05, reduction="none")
        # the float64 loss of the rounded inputs: bfloat16's rounding of z moves the losses (~1e-5) themselves
        ref_d = nt_xent_reference(x1.detach().double(), x2.detach().double(), 0.05, reduction="none")
        rel = ((loss.double() - ref_d).abs() / ref_d).median()
        assert rel <= loss_tol, (dtype, rel.item())
        got = torch.autograd.grad(loss.sum(), [x1, x2])
        for x, y in zip(got, want):
            err = ((x.double() - y).norm() / y.norm()).item()
            assert err <= grad_tol, (dtype, err)
    z = torch.randn(4, 8, generator=g)
    assert (cb.nt_xent(z, z, 0.01, reduction="none") >= 0).all()


def test_nt_xent_single_pair_has_finite_zero_gradient():
    # N = 1: a view's own side is empty (log-sum-exp -inf), its pair side holds only the positive.
    z1, z2 = (torch.randn(1, 5, requires_grad=True) for _ in range(2))
    loss = cb.nt_xent(z1, z2, 0.1)
    g1, g2 = torch.autograd.grad(loss, [z1, z2])
    assert loss.item() == 0.0 and torch.equal(g1, torch.zeros_like(g1)) and torch.equal(g2, torch.zeros_like(g2))


# ---- from a test audit: options no test reached (each test fails under the mutation named in its comment) ----


def _pairs64(seed=0, n=9, d=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64))


def test_clip_loss_custom_max_logit_scale():
    # The clamp takes max_logit_scale, for a float and a tensor scale (hard-coding 100 in either path passed).
    img, txt = _pairs64()
    assert cb.clip_loss(img, txt, 50.0, max_logit_scale=20.0) == cb.clip_loss(img, txt, 20.0)
    s = torch.tensor(50.0, dtype=torch.float64, requires_grad=True)
    loss = cb.clip_loss(img, txt, s, max_logit_scale=20.0)
    torch.testing.assert_close(loss, cb.clip_loss(img, txt, 20.0), rtol=1e-12, atol=0)
    (g,) = torch.autograd.grad(loss, s)
    assert g == 0  # the clamp binds


def test_nt_xent_and_clip_without_normalize_match_formulas():
    # normalize=False reaches both (nt_xent's half that always normalised kept the loss right and the raw
    # features' gradient wrong; clip_loss ignoring the flag passed).
    from contrastbound.reference import nt_xent_reference

    z1, z2 = _pairs64(4)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    r1, r2 = (x.detach().clone().requires_grad_(True) for x in (z1, z2))
    loss = cb.nt_xent(z1, z2, 2.0, normalize=False, reduction="none")
    ref = nt_xent_reference(r1, r2, 2.0, normalize=False, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for x, y in zip(torch.autograd.grad(loss.sum(), [z1, z2]), torch.autograd.grad(ref.sum(), [r1, r2])):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    s = 0.5
    i, t = (x.detach() for x in (z1, z2))
    logits = s * i @ t.T
    want = 0.5 * (F.cross_entropy(logits, torch.arange(9)) + F.cross_entropy(logits.T, torch.arange(9)))
    torch.testing.assert_close(cb.clip_loss(i, t, s, normalize=False), want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["shared", "indexed", "in_batch", "nt_xent", "clip", "bank_cross_entropy",
                                  "tensor_temperature", "nt_xent_unnormalised", "lse_unnormalised"])
def test_inputs_made_under_inference_mode(case, dtype):
    # A momentum encoder run under torch.inference_mode (rather than no_grad) gives inference tensors, which
    # autograd cannot save for backward: the losses raised "Inference tensors cannot be saved for backward" where
    # plain torch (normalise, matmul, cross-entropy) trains. They are copied for backward now: the same loss and
    # gradients as with ordinary tensors (also where the reference serves, and in the plain-torch terms of
    # nt_xent and info_nce_lse without normalisation).
    g = torch.Generator().manual_seed(12)
    q = torch.randn(9, 16, generator=g).to(dtype)
    k, bank = torch.randn(9, 16, generator=g).to(dtype), torch.randn(40, 16, generator=g).to(dtype)
    idx, targets = torch.randint(0, 40, (9, 7), generator=g), torch.randint(0, 40, (9,), generator=g)
    t = torch.tensor(0.2)

    def loss(q, k, bank, idx, targets, t):
        if case == "shared":
            return cb.info_nce(q, k, bank, temperature=0.2)
        if case == "indexed":
            return cb.info_nce(q, k, bank, negative_indices=idx, temperature=0.2)
        if case == "in_batch":
            return cb.info_nce(q, k, temperature=0.2)
        if case == "nt_xent":
            return cb.nt_xent(q, k, temperature=0.2)
        if case == "clip":
            return cb.clip_loss(q, k, 1.0 / t)
        if case == "bank_cross_entropy":
            return cb.bank_cross_entropy(q, bank, targets, temperature=0.2)
        if case == "nt_xent_unnormalised":
            return cb.nt_xent(q, k, temperature=2.0, normalize=False)
        if case == "lse_unnormalised":
            loss, lse = cb.info_nce_lse(q, k, bank, temperature=2.0, normalize=False)
            return loss.sum() + lse.sum()
        return cb.info_nce(q, k, bank, temperature=t)

    with torch.inference_mode():
        made = [x.clone() for x in (k, bank, idx, targets, t)]
    assert all(x.is_inference() for x in made)
    q1, q2 = q.clone().requires_grad_(True), q.clone().requires_grad_(True)
    got, want = loss(q1, *made), loss(q2, k, bank, idx, targets, t)
    got.backward()
    want.backward()
    assert torch.equal(got, want)
    assert torch.equal(q1.grad, q2.grad)


def test_queue_clear_leaves_a_state_dict_that_loads():
    # clear() zeroes both buffers (not only the host ints): its state_dict loads as an empty queue
    q = cb.NegativeQueue(4, 1)
    q.enqueue(torch.arange(4.0)[:, None])
    q.enqueue(torch.tensor([[4.0], [5.0]]))  # full, write position 2
    q.clear()
    assert int(q.ptr) == 0 and int(q.filled) == 0
    q2 = cb.NegativeQueue(4, 1)
    q2.load_state_dict(q.state_dict())
    assert len(q2) == 0 and q2.negatives().shape == (0, 1)


def test_queue_follows_a_write_to_its_write_position_alone():
    # a full queue: any write position is a state enqueue can reach; a fill_ of ptr alone moves the next write
    q = cb.NegativeQueue(4, 1)
    q.enqueue(torch.arange(4.0)[:, None])  # full, write position 0
    q.ptr.fill_(2)
    q.enqueue(torch.tensor([[9.0]]))
    assert q.queue.flatten().tolist() == [0.0, 1.0, 9.0, 3.0] and int(q.ptr) == 3


def test_queue_absent_from_a_checkpoint_is_left_to_strict():
    # a checkpoint from before the queue was added: strict=False reports the three keys missing and loads the rest
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(2, 2)
    state = model.state_dict()
    model.queue = cb.NegativeQueue(4, 2)
    result = model.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["queue.filled", "queue.ptr", "queue.queue"] and len(model.queue) == 0
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(state)


@pytest.mark.parametrize("bad", ["ptr", "filled", "both"])
@pytest.mark.parametrize("shape", [(2,), (1, 1)])
def test_queue_load_state_dict_refuses_positions_of_several_values_or_dims(bad, shape):
    # A (1, 1) position passed the one-value check, then failed torch's shape check after the keys and the other
    # position were copied: a queue with ptr 4 and filled 3 that every later use refused (a queue audit). Refused
    # whole now: the queue keeps its keys and positions. ((1,) loads, as torch copies it into the 0-d buffer.)
    q = cb.NegativeQueue(5, 2)
    q.enqueue(torch.full((4, 2), 9.0))
    src = cb.NegativeQueue(5, 2)
    src.enqueue(torch.ones(3, 2))
    state = src.state_dict()
    for name in (("ptr", "filled") if bad == "both" else (bad,)):
        state[name] = torch.full(shape, 3)
    with pytest.raises(RuntimeError, match=r"ptr and filled must hold one value each, of shape \(\) or \(1,\), "
                                           r"got shapes .*; nothing was loaded"):
        q.load_state_dict(state)
    assert len(q) == 4 and q.negatives().eq(9.0).all()
    state["ptr"], state["filled"] = torch.tensor([3]), torch.tensor([3])
    q.load_state_dict(state)
    assert len(q) == 3 and q.negatives().eq(1.0).all()


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("case", ["int positions", "list keys", "meta positions", "bool positions", "complex keys",
                                  "integer keys"])
def test_queue_load_state_dict_refuses_values_it_cannot_hold(case, assign):
    # non-tensors raised AttributeError ('int' object has no attribute 'numel'), meta positions torch's
    # "Tensor.item() cannot be called on meta tensors", bool positions loaded as 1, complex keys lost their
    # imaginary parts with a warning only, and integer keys, assigned (assign=True), made the next enqueue fail in
    # torch.finfo (a misuse audit); now each is a load error naming the entry, and nothing is loaded
    state = {"queue": torch.ones(4, 2), "ptr": torch.tensor(2), "filled": torch.tensor(2)}
    bad, text = {
        "int positions": ({"ptr": 2, "filled": 2}, "ptr must be a tensor, got int; filled must be a tensor"),
        "list keys": ({"queue": [[1.0, 1.0]] * 4}, "queue must be a tensor, got list"),
        "meta positions": ({"ptr": torch.tensor(2, device="meta"), "filled": torch.tensor(2, device="meta")},
                           "ptr and filled must hold values, got meta tensors"),
        "bool positions": ({"ptr": torch.tensor(True), "filled": torch.tensor(True)},
                           "ptr and filled must be integer tensors, got torch.bool"),
        "complex keys": ({"queue": torch.ones(4, 2) * (1 + 5j)}, "queue must be a tensor of keys in float32, float64, "
                         "float16 or bfloat16, got torch.complex64"),
        "integer keys": ({"queue": torch.ones(4, 2, dtype=torch.long)}, "queue must be a tensor of keys in float32, "
                         "float64, float16 or bfloat16, got torch.int64"),
    }[case]
    q = cb.NegativeQueue(4, 2)
    q.enqueue(torch.full((1, 2), 3.0))
    with pytest.raises(RuntimeError, match=re.escape(text) + ".*nothing was loaded"):
        q.load_state_dict({**state, **bad}, assign=assign)
    assert len(q) == 1 and q.negatives().tolist() == [[3.0, 3.0]]


def test_queue_keeps_infinite_keys_through_a_load_and_a_narrowing_cast():
    # enqueue stores an inf key as given; a float64 state holding one loads into a float32 queue, and .half()
    # keeps it (only finite keys that would become inf are refused)
    src = cb.NegativeQueue(4, 2, dtype=torch.float64)
    src.enqueue(torch.tensor([[float("inf"), 1.0]], dtype=torch.float64))
    q = cb.NegativeQueue(4, 2)
    q.load_state_dict(src.state_dict())
    assert len(q) == 1 and q.negatives()[0, 0] == float("inf")
    q.half()
    assert q.queue.dtype == torch.float16 and len(q) == 1 and q.negatives()[0, 0] == float("inf")


def test_queue_built_on_the_meta_device_casts():
    # deferred initialisation: a cast of the meta buffers has no values to check
    with torch.device("meta"):
        q = cb.NegativeQueue(8, 3)
    q.half()
    assert q.queue.dtype == torch.float16 and q.queue.device.type == "meta"


def test_queue_refuses_a_write_position_behind_the_fill_level():
    # ptr 1 with filled 3 (not full): the next key would go to row 1 and count row 3, never written, as a key
    q = cb.NegativeQueue(4, 1)
    q.enqueue(torch.tensor([[1.0], [2.0], [3.0]]))
    state = q.state_dict()
    state["ptr"] = torch.tensor(1)
    with pytest.raises(RuntimeError, match="write position equals the fill level"):
        cb.NegativeQueue(4, 1).load_state_dict(state)
    q.ptr.fill_(1)
    with pytest.raises(ValueError, match="write position equals the fill level"):
        q.enqueue(torch.tensor([[9.0]]))
