"""grad_cache: the three-pass step against the direct step with a graph over the whole batch (float64, so any
difference beyond rounding is a wrong gradient), dropout replayed, inputs of every form, and refusals by name.

The direct step runs the encoder over the same chunks (_chunked), so that dropout draws the same masks; where the
encoder has no dropout, or a chunk holds the whole batch, that is the whole-batch step itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import contrastbound as cb

D_IN, D_OUT = 7, 5


def _encoder(seed: int, dropout: float = 0.3, device="cpu") -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(D_IN, 11), torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(11, D_OUT)
    ).double().to(device)


def _data(n: int, seed: int = 0, device="cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, D_IN, generator=g, dtype=torch.float64).to(device) for _ in range(2)]


def _chunked(encoder, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """The direct step's forward: the encoder over the same chunks, with a graph. Dropout then draws what pass 1 of
    grad_cache draws (one draw over the whole batch may give other masks: CUDA's generator does)."""
    return torch.cat([encoder(x[lo:lo + chunk]) for lo in range(0, len(x), chunk)])


def _grads(*modules) -> list[torch.Tensor]:
    return [p.grad.clone() for m in modules for p in m.parameters() if p.requires_grad]


def _assert_same_step(direct: tuple, cached: tuple) -> None:
    (loss_d, grads_d, rng_d), (loss_c, grads_c, rng_c) = direct, cached
    torch.testing.assert_close(loss_c, loss_d.detach(), rtol=1e-12, atol=0)
    assert len(grads_c) == len(grads_d)
    for g_c, g_d in zip(grads_c, grads_d):
        torch.testing.assert_close(g_c, g_d, rtol=1e-10, atol=1e-13)
    # the random stream after the step is where one forward of every chunk leaves it, as after the direct step
    assert torch.equal(rng_c, rng_d)


def _nt_xent_case(chunk, device="cpu"):
    """SimCLR: one encoder (with dropout) for both views, nt_xent over 2N rows."""
    x1, x2 = _data(19, device=device)

    def run(cached: bool):
        enc = _encoder(1, device=device)
        loss_fn = lambda a, b: cb.nt_xent(a, b, 0.5)  # noqa: E731
        torch.manual_seed(7)
        if cached:
            loss = cb.grad_cache(loss_fn, enc, [x1, x2], chunk_size=chunk)
        else:
            loss = loss_fn(_chunked(enc, x1, chunk), _chunked(enc, x2, chunk))
            loss.backward()
        return loss, _grads(enc), torch.get_rng_state()

    return run


def _clip_case(chunk, device="cpu"):
    """CLIP: two towers and a learnable logit scale (ClipLoss's parameter gets its gradient too)."""
    x1, x2 = _data(17, device=device)

    def run(cached: bool):
        image, text = _encoder(2, device=device), _encoder(3, dropout=0.1, device=device)
        loss_fn = cb.ClipLoss(logit_scale=8.0).double().to(device)
        torch.manual_seed(7)
        if cached:
            loss = cb.grad_cache(loss_fn, [image, text], [x1, x2], chunk_size=chunk)
        else:
            loss = loss_fn(_chunked(image, x1, chunk), _chunked(text, x2, chunk))
            loss.backward()
        return loss, _grads(image, text, loss_fn), torch.get_rng_state()

    return run


def _bank_case(chunk, device="cpu"):
    """MoCo-like: one input through one encoder, detached keys and a bank captured by the loss."""
    x1, x2 = _data(13, device=device)
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(13, D_OUT, generator=g, dtype=torch.float64).to(device)
    bank = torch.randn(29, D_OUT, generator=g, dtype=torch.float64).to(device)

    def run(cached: bool):
        enc = _encoder(5, device=device)
        loss_fn = lambda q: cb.info_nce(q, keys, bank, 0.2)  # noqa: E731
        torch.manual_seed(7)
        if cached:
            loss = cb.grad_cache(loss_fn, [enc], [x1], chunk_size=chunk)
        else:
            loss = loss_fn(_chunked(enc, x1, chunk))
            loss.backward()
        return loss, _grads(enc), torch.get_rng_state()

    return run


def _supcon_case(chunk, device="cpu"):
    """SupCon over two views of labelled samples, one encoder, the loss taking (N, 2, d)."""
    x1, x2 = _data(15, device=device)
    labels = torch.arange(15, device=device) % 4

    def run(cached: bool):
        enc = _encoder(6, device=device)
        loss_fn = lambda a, b: cb.supcon_loss(torch.stack([a, b], 1), labels, 0.3)  # noqa: E731
        torch.manual_seed(7)
        if cached:
            loss = cb.grad_cache(loss_fn, enc, (x1, x2), chunk_size=chunk)
        else:
            loss = loss_fn(_chunked(enc, x1, chunk), _chunked(enc, x2, chunk))
            loss.backward()
        return loss, _grads(enc), torch.get_rng_state()

    return run


CASES = {"nt_xent": _nt_xent_case, "clip": _clip_case, "bank": _bank_case, "supcon": _supcon_case}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk", [1, 4, 6, 100])
def test_matches_the_full_batch_step(case, chunk):
    run = CASES[case](chunk)
    _assert_same_step(run(cached=False), run(cached=True))


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_full_batch_step_on_cuda_with_dropout_replayed(case):
    run = CASES[case](5, device="cuda")
    torch.cuda.manual_seed_all(11)
    direct = run(cached=False)
    cuda_after_direct = torch.cuda.get_rng_state()
    torch.cuda.manual_seed_all(11)
    cached = run(cached=True)
    _assert_same_step(direct, cached)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_after_direct)


def test_dropout_masks_matter_and_are_replayed():
    """The checks above could pass with dropout off: here the masks are shown to matter (another seed gives another
    gradient), and without the replay (pass 3 drawing afresh) grad_cache would not match the direct step."""
    x1, x2 = _data(12)
    loss_fn = lambda a, b: cb.nt_xent(a, b, 0.5)  # noqa: E731
    grads = {}
    for seed in (7, 8):
        enc = _encoder(1, dropout=0.5)
        torch.manual_seed(seed)
        loss_fn(_chunked(enc, x1, 5), _chunked(enc, x2, 5)).backward()
        grads[seed] = _grads(enc)
    assert any(not torch.allclose(a, b) for a, b in zip(grads[7], grads[8]))

    enc = _encoder(1, dropout=0.5)
    torch.manual_seed(7)
    cb.grad_cache(loss_fn, enc, [x1, x2], chunk_size=5)
    for a, b in zip(_grads(enc), grads[7]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 23),
    chunk=st.integers(1, 30),
    chunk2=st.integers(1, 30),
    dropout=st.sampled_from([0.0, 0.4]),
    temperature=st.floats(0.05, 2.0),
)
def test_property_any_chunking_gives_the_direct_gradient(n, chunk, chunk2, dropout, temperature):
    x1, x2 = _data(n, seed=n)
    enc_d, enc_c = _encoder(9, dropout), _encoder(9, dropout)
    loss_fn = lambda a, b: cb.info_nce(a, b, None, temperature)  # noqa: E731  (in-batch: n - 1 negatives)
    torch.manual_seed(3)
    loss_d = loss_fn(_chunked(enc_d, x1, chunk), _chunked(enc_d, x2, chunk2))
    loss_d.backward()
    direct = (loss_d, _grads(enc_d), torch.get_rng_state())
    torch.manual_seed(3)
    loss_c = cb.grad_cache(loss_fn, enc_c, [x1, x2], chunk_size=[chunk, chunk2])
    _assert_same_step(direct, (loss_c, _grads(enc_c), torch.get_rng_state()))


def test_dict_and_tuple_batches_with_values_passed_to_every_chunk():
    """A tokenizer-like dict (encoder(**x)) with a non-tensor option, and a tuple (encoder(*x))."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, D_OUT).double()
    proj = torch.nn.Linear(D_IN, D_OUT).double()
    seen_options = []

    def text(input_ids, attention_mask, pool="mean"):
        seen_options.append(pool)
        m = attention_mask.unsqueeze(-1).double()
        return (emb(input_ids) * m).sum(1) / m.sum(1)

    def image(x, scale):
        return proj(x) * scale

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (11, 6), generator=g)
    mask = (torch.rand(11, 6, generator=g) > 0.3).long()
    mask[:, 0] = 1
    x = torch.randn(11, D_IN, generator=g, dtype=torch.float64)
    scale = torch.linspace(0.5, 2.0, 11, dtype=torch.float64)[:, None]  # a per-row tensor: split too

    loss_fn = lambda zi, zt: cb.clip_loss(zi, zt, 5.0)  # noqa: E731
    loss_fn(image(x, scale), text(ids, mask, pool="sum")).backward()
    direct = _grads(proj, emb)
    proj.zero_grad(), emb.zero_grad()
    seen_options.clear()
    batch = {"input_ids": ids, "attention_mask": mask, "pool": "sum"}
    cb.grad_cache(loss_fn, [image, text], [(x, scale), batch], chunk_size=np.int64(4))  # (any integer type)
    assert seen_options == ["sum"] * 6  # 3 chunks, twice
    for a, b in zip(_grads(proj, emb), direct):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_encoders_as_a_module_list_and_a_sequential_as_one_encoder():
    x1, x2 = _data(8)
    towers = torch.nn.ModuleList([_encoder(2, dropout=0.0), _encoder(3, dropout=0.0)])
    loss_fn = lambda a, b: cb.clip_loss(a, b, 5.0)  # noqa: E731
    loss_fn(towers[0](x1), towers[1](x2)).backward()
    direct = _grads(towers)
    towers.zero_grad()
    cb.grad_cache(loss_fn, towers, [x1, x2], chunk_size=3)  # one encoder per input
    for a, b in zip(_grads(towers), direct):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    shared = _encoder(4, dropout=0.0)  # a Sequential: indexable, yet one encoder for both inputs
    cb.grad_cache(lambda a, b: cb.nt_xent(a, b, 0.5), shared, [x1, x2], chunk_size=3)
    assert all(p.grad is not None for p in shared.parameters())


def test_a_namedtuple_batch():
    from collections import namedtuple

    Batch = namedtuple("Batch", "x scale")
    enc = _encoder(2, dropout=0.0)
    x1, x2 = _data(9)
    loss_fn = lambda a, b: cb.nt_xent(a, b, 0.5)  # noqa: E731
    loss_fn(enc(x1) * 2.0, enc(x2) * 2.0).backward()
    direct = _grads(enc)
    enc.zero_grad()
    cb.grad_cache(loss_fn, lambda x, scale: enc(x) * scale, [Batch(x1, 2.0), Batch(x2, 2.0)], chunk_size=4)
    for a, b in zip(_grads(enc), direct):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_inputs_that_require_grad_and_existing_grads_accumulate():
    x1, x2 = (x.requires_grad_() for x in _data(9))
    enc = _encoder(2, dropout=0.0)
    loss_fn = lambda a, b: cb.nt_xent(a, b, 0.5)  # noqa: E731
    loss_fn(enc(x1), enc(x2)).backward()
    direct = _grads(enc) + [x1.grad.clone(), x2.grad.clone()]
    # a second, cached step adds the same gradients again: twice the direct step's
    cb.grad_cache(loss_fn, enc, [x1, x2], chunk_size=2)
    for a, b in zip(_grads(enc) + [x1.grad, x2.grad], direct):
        torch.testing.assert_close(a, 2 * b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("form", ["tensor", "slices", "dict", "same_tensor_twice"])
def test_non_leaf_inputs_from_an_upstream_graph(form):
    # An audit's case: an input made by an upstream module (an embedding layer's inputs_embeds, slices of one
    # output) failed in the second chunk's backward ("Trying to backward through the graph a second time": the
    # first freed the upstream graph). Such inputs become leaves for the chunks, and their accumulated gradients go
    # through the upstream graph once, after them: the direct step's gradients, upstream module included.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(11, 3, generator=g, dtype=torch.float64)
    mask = torch.ones(11, 1, dtype=torch.float64)

    def run(cached: bool):
        torch.manual_seed(3)
        up = torch.nn.Linear(3, 2 * D_IN).double()
        enc = _encoder(5, dropout=0.0)
        h = up(x)
        if form == "tensor":
            inputs, encoders = [h[:, :D_IN], h[:, :D_IN] * 2], enc  # (two non-leaves of one graph)
        elif form == "slices":
            inputs, encoders = [h[:, :D_IN], h[:, D_IN:]], enc
        elif form == "dict":
            inputs = [{"z": h[:, :D_IN], "m": mask}, {"z": h[:, D_IN:], "m": mask}]
            encoders = lambda z, m: enc(z * m)  # noqa: E731
        else:
            inputs, encoders = [h[:, :D_IN]] * 2, enc  # (one tensor given twice: one leaf for both)
        loss_fn = lambda a, b: cb.nt_xent(a, b, 0.5)  # noqa: E731
        if cached:
            loss = cb.grad_cache(loss_fn, encoders, inputs, chunk_size=4)
        else:
            feats = [encoders(**i) if isinstance(i, dict) else encoders(i) for i in inputs]
            loss = loss_fn(*feats)
            loss.backward()
        return loss, _grads(up, enc)

    (loss_d, grads_d), (loss_c, grads_c) = run(False), run(True)
    torch.testing.assert_close(loss_c, loss_d.detach(), rtol=1e-12, atol=0)
    assert all(gr.abs().sum() > 0 for gr in grads_d[:2])  # (the upstream module gets a gradient)
    for g_c, g_d in zip(grads_c, grads_d):
        torch.testing.assert_close(g_c, g_d, rtol=1e-10, atol=1e-13)


def test_an_encoder_capturing_a_non_leaf_tensor_is_told_what_to_do():
    # A tensor of an upstream graph captured by the encoder (not given in inputs) cannot be made a leaf: the second
    # chunk backward finds its graph freed; the error says so and what to do, instead of autograd's own.
    up = torch.nn.Linear(3, D_OUT).double()
    enc = _encoder(6, dropout=0.0)
    x1, x2 = _data(8)

    def encoder():  # (a fresh upstream graph per call: a failed call has freed the last one)
        offset = up(torch.ones(1, 3, dtype=torch.float64))
        return lambda z: enc(z) + offset

    with pytest.raises(RuntimeError, match=r"encoders\[0\] reaches a graph built before grad_cache .* Compute it "
                                           "inside the encoder"):
        cb.grad_cache(lambda a, b: cb.nt_xent(a, b, 0.5), encoder(), [x1, x2], chunk_size=3)
    # the first chunk of a second input is a second backward too
    with pytest.raises(RuntimeError, match=r"encoders\[1\] reaches a graph built before grad_cache"):
        cb.grad_cache(lambda a, b: cb.nt_xent(a, b, 0.5), encoder(), [x1[:3], x2[:3]], chunk_size=3)
    # one input in one chunk has no second backward: it works, and the upstream module gets its gradient
    up.zero_grad()
    cb.grad_cache(lambda a: cb.info_nce(a, a.flip(0)), encoder(), [x1[:3]], chunk_size=3)
    assert up.weight.grad.abs().sum() > 0


def test_a_frozen_encoder_and_features_the_loss_ignores():
    """LiT-style: a locked image tower (no parameter requires grad) gets no gradient, and a warning that says how to
    save its second forward; features the loss does not use run no replay at all."""
    x1, x2 = _data(10)
    image, text = _encoder(2, dropout=0.0), _encoder(3, dropout=0.0)
    image.requires_grad_(False)
    loss_fn = lambda zi, zt: cb.clip_loss(zi, zt, 5.0)  # noqa: E731
    loss_fn(image(x1), text(x2)).backward()
    direct = _grads(text)
    text.zero_grad()
    calls = []
    image.register_forward_hook(lambda *_: calls.append("image"))
    with pytest.warns(UserWarning, match=r"encoders\[0\]'s output .* compute its features under torch.no_grad"):
        cb.grad_cache(loss_fn, [image, text], [x1, x2], chunk_size=3)
    assert all(p.grad is None for p in image.parameters())
    assert calls == ["image"] * 8  # 4 chunks, twice
    for a, b in zip(_grads(text), direct):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)

    calls.clear()
    text.zero_grad()
    cb.grad_cache(lambda zi, zt: (zt ** 2).mean(), [image, text], [x1, x2], chunk_size=3)
    assert calls == ["image"] * 4  # pass 1 only
    assert all(p.grad is not None for p in text.parameters())


def test_a_frozen_module_whose_output_still_learns_through_a_hook():
    """(an audit's case) Every parameter of the module is frozen, but a forward hook adds a learnable prompt: its
    gradient is the direct step's (a module is not skipped for having no trainable parameters of its own)."""
    torch.manual_seed(0)
    backbone = torch.nn.Linear(D_IN, D_OUT).double().requires_grad_(False)
    prompt = torch.randn(D_OUT, dtype=torch.float64, requires_grad=True)
    backbone.register_forward_hook(lambda module, args, out: out + prompt)
    x1, x2 = _data(7)
    loss_fn = lambda a, b: cb.nt_xent(a, b, 0.5)  # noqa: E731
    loss_fn(backbone(x1), backbone(x2)).backward()
    direct = prompt.grad.clone()
    prompt.grad = None
    cb.grad_cache(loss_fn, backbone, [x1, x2], chunk_size=3)
    torch.testing.assert_close(prompt.grad, direct, rtol=1e-10, atol=1e-13)


def test_a_chunk_without_a_graph_does_not_stop_the_others():
    """A data-dependent path (an audit's case): the trainable adapter runs only on rows flagged, and the first chunk
    has none; chunks after it still give their gradients."""
    torch.manual_seed(0)
    base = torch.nn.Linear(D_IN, D_OUT).double().requires_grad_(False)
    adapter = torch.nn.Linear(D_IN, D_OUT).double()

    def encoder(x, flag):
        out = base(x)
        return out + adapter(x) * flag[:, None] if flag.any() else out

    x1, x2 = _data(9)
    flag = torch.tensor([0, 0, 0, 1, 0, 1, 1, 0, 1], dtype=torch.float64)
    loss_fn = lambda a, b: cb.nt_xent(a, b, 0.5)  # noqa: E731
    loss_fn(_chunked(lambda v: encoder(v, flag), x1, 9), base(x2)).backward()  # (one chunk: flags present)
    direct = _grads(adapter)
    adapter.zero_grad()
    with pytest.warns(UserWarning, match=r"encoders\[1\]'s output"):  # (base, frozen, serves x2)
        cb.grad_cache(loss_fn, [encoder, base], [(x1, flag), x2], chunk_size=3)
    for a, b in zip(_grads(adapter), direct):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # (torch's own, from the checkpoint)
def test_an_encoder_whose_outputs_never_need_a_gradient_warns():
    """A reentrant checkpoint over inputs that need no grad builds no graph (torch warns too); the direct step would
    raise at backward (nothing requires grad), grad_cache says so and leaves the parameters' .grad as they were."""
    from torch.utils.checkpoint import checkpoint

    enc = _encoder(2, dropout=0.0)
    x1, x2 = _data(6)
    with pytest.warns(UserWarning, match=r"no chunk of encoders\[[01]\]'s output needed a gradient"):
        cb.grad_cache(lambda a, b: cb.nt_xent(a, b, 0.5), lambda v: checkpoint(enc, v, use_reentrant=True),
                      [x1, x2], chunk_size=4)
    assert all(p.grad is None for p in enc.parameters())


def test_the_loss_own_random_draws_are_not_replayed():
    """The random state afterwards is the direct step's: the encoders' draws, then the loss's (a dropout head in the
    loss, a sampler); the next draw does not repeat the loss's."""
    x1, x2 = _data(8)
    drawn = []

    def loss_fn(a, b):
        drawn.append(torch.rand(3, dtype=torch.float64))
        return cb.nt_xent(a, b, 0.5)

    enc, enc_cached = _encoder(1), _encoder(1)
    torch.manual_seed(5)
    loss_fn(_chunked(enc, x1, 3), _chunked(enc, x2, 3)).backward()
    after_direct = torch.rand(3, dtype=torch.float64)
    torch.manual_seed(5)
    cb.grad_cache(loss_fn, enc_cached, [x1, x2], chunk_size=3)
    after_cached = torch.rand(3, dtype=torch.float64)
    assert torch.equal(drawn[0], drawn[1]) and torch.equal(after_cached, after_direct)
    assert not torch.equal(after_cached, drawn[1])


def test_a_loss_that_needs_no_gradient_returns_its_value():
    x1, x2 = _data(6)
    enc = _encoder(2).requires_grad_(False)
    torch.manual_seed(4)
    direct = cb.nt_xent(_chunked(enc, x1, 4), _chunked(enc, x2, 4), 0.5)
    torch.manual_seed(4)
    with pytest.warns(UserWarning, match=r"encoders\[[01]\]'s output"):
        loss = cb.grad_cache(lambda a, b: cb.nt_xent(a, b, 0.5), enc, [x1, x2], chunk_size=4)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, direct, rtol=1e-12, atol=0)


def test_under_bfloat16_autocast():
    """Both passes run under the caller's autocast: the gradient is the direct step's up to bfloat16 rounding."""
    x1, x2 = (x.float() for x in _data(16))
    enc_d, enc_c = _encoder(4).float(), _encoder(4).float()
    loss_fn = lambda a, b: cb.nt_xent(a, b, 0.5)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        loss_d = loss_fn(_chunked(enc_d, x1, 5), _chunked(enc_d, x2, 5))
        loss_d.backward()
        torch.manual_seed(1)
        loss_c = cb.grad_cache(loss_fn, enc_c, [x1, x2], chunk_size=5)
    torch.testing.assert_close(loss_c, loss_d.detach(), rtol=2e-2, atol=0)
    for a, b in zip(_grads(enc_c), _grads(enc_d)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * b.abs().max().item())


def _errors():
    x = torch.randn(4, D_IN, dtype=torch.float64)
    enc = _encoder(0)
    nt = lambda a, b: cb.nt_xent(a, b, 0.5)  # noqa: E731
    one = lambda a: a.sum()  # noqa: E731
    return [
        ("loss_fn", lambda: cb.grad_cache(None, enc, [x], chunk_size=2), TypeError, "loss_fn must be callable"),
        ("inputs tensor", lambda: cb.grad_cache(one, enc, x, chunk_size=2), TypeError,
         "inputs must be a list or tuple"),
        ("inputs empty", lambda: cb.grad_cache(one, enc, [], chunk_size=2), ValueError, "inputs is empty"),
        ("encoders count", lambda: cb.grad_cache(nt, [enc], [x, x], chunk_size=2), ValueError,
         "encoders has 1 entries for 2 inputs"),
        ("encoders entry", lambda: cb.grad_cache(one, [3], [x], chunk_size=2), TypeError,
         r"encoders\[0\] must be callable, got int"),
        ("encoders type", lambda: cb.grad_cache(one, 3, [x], chunk_size=2), TypeError,
         "encoders must be a callable, or a list / tuple / ModuleList"),
        ("chunk 0", lambda: cb.grad_cache(one, enc, [x], chunk_size=0), ValueError,
         "chunk_size must be a positive int, got 0"),
        ("chunk float", lambda: cb.grad_cache(one, enc, [x], chunk_size=2.0), TypeError,
         "chunk_size must be a positive int, got float 2.0"),
        ("chunk bool", lambda: cb.grad_cache(one, enc, [x], chunk_size=True), TypeError,
         "chunk_size must be a positive int, got bool"),
        ("chunk entry", lambda: cb.grad_cache(nt, enc, [x, x], chunk_size=[2, -1]), ValueError,
         r"chunk_size\[1\] must be a positive int, got -1"),
        ("chunk str", lambda: cb.grad_cache(one, enc, [x], chunk_size="4"), TypeError,
         "chunk_size must be a positive int, got str '4'"),
        ("module dict", lambda: cb.grad_cache(one, torch.nn.ModuleDict({"a": enc}), [x], chunk_size=2), TypeError,
         r"encoders is a ModuleDict, which has no forward; give list\(encoders.values\(\)\)"),
        ("nested", lambda: cb.grad_cache(one, enc, [(x, {"w": x})], chunk_size=2), ValueError,
         r"inputs\[0\]\[1\] is a dict holding tensors"),
        ("chunk count", lambda: cb.grad_cache(nt, enc, [x, x], chunk_size=[2]), ValueError,
         "chunk_size has 1 entries for 2 inputs"),
        ("batch type", lambda: cb.grad_cache(one, enc, [3.0], chunk_size=2), TypeError,
         r"inputs\[0\] must be a tensor, or a tuple / list / dict"),
        ("no tensor", lambda: cb.grad_cache(one, enc, [["a", "b"]], chunk_size=2), ValueError,
         r"inputs\[0\] holds no tensor"),
        ("0-dim", lambda: cb.grad_cache(one, enc, [(x, torch.tensor(1.0))], chunk_size=2), ValueError,
         r"inputs\[0\]\[1\] is a 0-dim tensor"),
        ("sparse", lambda: cb.grad_cache(one, enc, [x.to_sparse()], chunk_size=2), ValueError,
         r"inputs\[0\] has layout torch.sparse_coo; grad_cache slices rows of dense"),
        ("lengths", lambda: cb.grad_cache(one, enc, [{"a": x, "b": x[:3]}], chunk_size=2), ValueError,
         r"inputs\[0\]\['a'\]: 4, inputs\[0\]\['b'\]: 3"),
        ("empty batch", lambda: cb.grad_cache(one, enc, [x[:0]], chunk_size=2), ValueError,
         r"inputs\[0\] has batch size 0"),
        ("output tuple", lambda: cb.grad_cache(one, lambda v: (v, v), [x], chunk_size=2), TypeError,
         r"encoders\[0\] must return a tensor with the chunk's 2 rows along dim 0, got tuple"),
        ("output rows", lambda: cb.grad_cache(one, lambda v: v.sum(0), [x], chunk_size=3), TypeError,
         r"encoders\[0\] must return a tensor with the chunk's 3 rows along dim 0, got shape \(7,\)"),
        ("loss shape", lambda: cb.grad_cache(lambda a: a, enc, [x], chunk_size=2), ValueError,
         r"loss_fn must return a scalar tensor .*got shape \(4, 5\)"),
        ("loss detached", lambda: cb.grad_cache(lambda a: a.sum().detach(), enc, [x], chunk_size=2), RuntimeError,
         "loss_fn's result does not require grad"),
        ("loss type", lambda: cb.grad_cache(lambda a: 1.0, enc, [x], chunk_size=2), ValueError,
         "loss_fn must return a scalar tensor .*got float"),
    ]


@pytest.mark.parametrize("name,call,error,match", _errors(), ids=[e[0] for e in _errors()])
def test_bad_arguments_are_refused_by_name(name, call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_gradients_disabled_is_refused(mode):
    x = torch.randn(4, D_IN, dtype=torch.float64)
    with getattr(torch, mode)(), pytest.raises(RuntimeError, match="grad_cache runs a backward pass"):
        cb.grad_cache(lambda a: a.sum(), _encoder(0), [x], chunk_size=2)


def test_an_error_in_the_replay_leaves_the_random_state_where_one_forward_leaves_it():
    x = torch.randn(6, D_IN, dtype=torch.float64)
    enc = _encoder(0)
    passes = []

    def flaky(v):
        passes.append(torch.is_grad_enabled())
        if len(passes) > 3:  # pass 3's first chunk
            raise RuntimeError("boom")
        return enc(v)

    torch.manual_seed(2)
    with torch.no_grad():
        for lo in range(0, 6, 2):
            enc(x[lo:lo + 2])
    expected = torch.get_rng_state()
    torch.manual_seed(2)
    with pytest.raises(RuntimeError, match="boom"):
        cb.grad_cache(lambda a: a.sum(), flaky, [x], chunk_size=2)
    assert passes == [False, False, False, True]
    assert torch.equal(torch.get_rng_state(), expected)

