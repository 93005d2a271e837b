"""Bad input raises a clear ValueError / TypeError / IndexError that names the argument; nothing crashes."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import contrastbound as cb


def _nested():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the strided layout's prototype warning
        return torch.nested.nested_tensor([torch.randn(3, 3), torch.randn(2, 3)])


def _ok(B=4, K=6, d=3, M=5):
    a = torch.randn(B, d)
    p = torch.randn(B, d)
    bank = torch.randn(K, d)
    idx_bank = torch.randn(M, d)
    idx = torch.randint(0, M, (B, K))
    return a, p, bank, idx_bank, idx


a, p, bank, idx_bank, idx = _ok()

CASES = [
    # (description, call, exception, text the message must contain)
    ("anchors rank", lambda: cb.info_nce(a[0], p, bank), ValueError, "anchors"),
    ("anchors not a tensor", lambda: cb.info_nce([[1.0]], p, bank), TypeError, "anchors"),
    ("positives rank", lambda: cb.info_nce(a, p[None], bank), ValueError, "positives"),
    ("mismatched B", lambda: cb.info_nce(a, p[:3], bank), ValueError, "positives"),
    ("mismatched d in positives", lambda: cb.info_nce(a, torch.randn(4, 5), bank), ValueError, "positives"),
    ("mismatched d in bank", lambda: cb.info_nce(a, p, torch.randn(6, 4)), ValueError, "negatives"),
    ("negatives rank 4", lambda: cb.info_nce(a, p, torch.randn(4, 6, 3, 1)), ValueError, "negatives"),
    ("per-anchor B mismatch", lambda: cb.info_nce(a, p, torch.randn(3, 6, 3)), ValueError, "negatives"),
    ("integer anchors", lambda: cb.info_nce(a.long(), p.long(), bank.long()), TypeError, "anchors"),
    ("integer negatives", lambda: cb.info_nce(a, p, bank.long()), TypeError, "negatives"),
    ("device mismatch", lambda: cb.info_nce(a, p.to("meta"), bank), ValueError, "device"),
    ("indices out of range", lambda: cb.info_nce(a, p, idx_bank, negative_indices=idx + 5), IndexError, "negative_indices"),
    ("negative indices", lambda: cb.info_nce(a, p, idx_bank, negative_indices=idx - 6), IndexError, "negative_indices"),
    ("float indices", lambda: cb.info_nce(a, p, idx_bank, negative_indices=idx.float()), TypeError, "negative_indices"),
    ("indices wrong rows", lambda: cb.info_nce(a, p, idx_bank, negative_indices=idx[:2]), ValueError, "negative_indices"),
    ("indices wrong rank", lambda: cb.info_nce(a, p, idx_bank, negative_indices=idx[0]), ValueError, "negative_indices"),
    ("indices not a tensor", lambda: cb.info_nce(a, p, idx_bank, negative_indices=[[0]]), TypeError, "negative_indices"),
    ("indices with 3-d bank", lambda: cb.info_nce(a, p, torch.randn(4, 6, 3), negative_indices=idx), ValueError, "negatives"),
    ("indices without bank", lambda: cb.info_nce(a, p, None, negative_indices=idx), ValueError, "negative_indices"),
    ("indices on another device", lambda: cb.info_nce(a, p, idx_bank, negative_indices=idx.to("meta")), ValueError,
     "negative_indices is on meta but the features are on cpu"),
    # (a mutation audit: these survived, as the op's own message or a wrong dtype's silent widening passed)
    ("targets on another device", lambda: cb.bank_cross_entropy(a, idx_bank, idx[:, 0].to("meta")), ValueError,
     "targets is on meta but the features are on cpu"),
    ("int16 indices", lambda: cb.info_nce(a, p, idx_bank, negative_indices=idx.to(torch.int16)), TypeError,
     "negative_indices must be an int64 (or int32) tensor of shape (B, K), got dtype torch.int16"),
    ("uint8 indices", lambda: cb.info_nce(a, p, idx_bank, negative_indices=idx.to(torch.uint8)), TypeError,
     "negative_indices must be an int64 (or int32) tensor of shape (B, K), got dtype torch.uint8"),
    ("bool indices", lambda: cb.info_nce(a, p, idx_bank, negative_indices=idx > 2), TypeError,
     "negative_indices must be an int64 (or int32) tensor of shape (B, K), got dtype torch.bool"),
    ("int16 targets", lambda: cb.bank_cross_entropy(a, idx_bank, idx[:, 0].to(torch.int16)), TypeError,
     "targets must be an int64 (or int32) tensor of shape (B,), got dtype torch.int16"),
    ("temperature zero tensor", lambda: cb.info_nce(a, p, bank, temperature=torch.tensor(0.0)), ValueError,
     "temperature must be a positive finite number, got 0.0"),
    ("temperature below float32's floor, half features",
     lambda: cb.info_nce(a.half(), p.half(), bank.half(), temperature=1e-39), ValueError,
     "temperature must be at least 2.94e-39 for features computed in float32 (torch.float16)"),
    ("tau_plus one", lambda: cb.debiased_info_nce(a, p, bank, tau_plus=1.0), ValueError,
     "tau_plus must be in [0, 1), got 1.0"),
    ("transposed shared-bank mask", lambda: cb.info_nce(a, p, bank, negative_mask=torch.ones(6, 4, dtype=torch.bool)),
     ValueError, "negative_mask must have shape (B, K) for a shared bank (K, d) = (4, 6), got (6, 4)"),
    ("transposed per-anchor mask",
     lambda: cb.info_nce(a, p, torch.randn(4, 6, 3), negative_mask=torch.ones(6, 4, dtype=torch.bool)), ValueError,
     "negative_mask must have shape (B, K) for negatives (B, K, d) = (4, 6), got (6, 4)"),
    ("temperature zero", lambda: cb.info_nce(a, p, bank, temperature=0.0), ValueError, "temperature"),
    ("temperature negative", lambda: cb.info_nce(a, p, bank, temperature=-1.0), ValueError, "temperature"),
    ("temperature nan", lambda: cb.info_nce(a, p, bank, temperature=math.nan), ValueError, "temperature"),
    ("temperature inf", lambda: cb.info_nce(a, p, bank, temperature=math.inf), ValueError, "temperature"),
    ("temperature string", lambda: cb.info_nce(a, p, bank, temperature="0.1"), TypeError, "temperature"),
    # float64 features: with float32 ones the float32 check (_check_scale_fits, below) answers first
    ("temperature subnormal", lambda: cb.info_nce(a.double(), p.double(), bank.double(), temperature=1e-310),
     ValueError, "1 / temperature finite"),
    # below 1 / float32's max the scale overflows the kernels' float32 accumulation: every loss NaN before
    ("temperature 1e-39", lambda: cb.info_nce(a, p, bank, temperature=1e-39), ValueError, "temperature must be at least"),
    ("temperature tensor 1e-40", lambda: cb.info_nce(a, p, bank, temperature=torch.tensor(1e-40)), ValueError,
     "temperature must be at least"),
    ("nt_xent temperature 1e-300", lambda: cb.nt_xent(a, p, 1e-300), ValueError, "temperature must be at least"),
    ("clip_loss logit_scale 1e-310", lambda: cb.clip_loss(a, p, 1e-310), ValueError, "logit_scale must be at least"),
    ("temperature float64 tensor 1e-40, float32 features",
     lambda: cb.info_nce(a, p, bank, temperature=torch.tensor(1e-40, dtype=torch.float64)), ValueError,
     "at least 2.94e-39 for features computed in float32"),
    ("bank_cross_entropy temperature 1e-39", lambda: cb.bank_cross_entropy(a, bank, torch.zeros(4, dtype=torch.long),
                                                                          temperature=1e-39), ValueError,
     "temperature must be at least"),
    ("clip_loss logit_scale tensor 1e-40", lambda: cb.clip_loss(a, p, torch.tensor(1e-40)), ValueError,
     "logit_scale must be at least"),
    ("clip_loss max_logit_scale zero", lambda: cb.clip_loss(a, p, 10.0, max_logit_scale=0.0), ValueError, "max_logit_scale"),
    ("clip_loss max_logit_scale nan", lambda: cb.clip_loss(a, p, 10.0, max_logit_scale=math.nan), ValueError, "max_logit_scale"),
    ("clip_loss max_logit_scale negative, tensor scale",
     lambda: cb.clip_loss(a, p, torch.tensor(10.0), max_logit_scale=-1.0), ValueError, "max_logit_scale"),
    ("clip_loss max_logit_scale None", lambda: cb.clip_loss(a, p, 10.0, max_logit_scale=None), TypeError, "max_logit_scale"),
    ("temperature tensor of two", lambda: cb.info_nce(a, p, bank, temperature=torch.ones(2)), ValueError, "temperature"),
    ("temperature tensor negative", lambda: cb.info_nce(a, p, bank, temperature=torch.tensor(-0.5, requires_grad=True)), ValueError, "temperature"),
    ("unknown reduction", lambda: cb.info_nce(a, p, bank, reduction="avg"), ValueError, "reduction"),
    ("normalize not bool", lambda: cb.info_nce(a, p, bank, normalize="yes"), TypeError, "normalize"),
    ("module temperature", lambda: cb.InfoNCE(temperature=0), ValueError, "temperature"),
    ("module reduction", lambda: cb.InfoNCE(reduction="max"), ValueError, "reduction"),
    ("nt_xent shape mismatch", lambda: cb.nt_xent(a, p[:2]), ValueError, "z2"),
    ("clip_loss shape mismatch", lambda: cb.clip_loss(a, p[:2], 10.0), ValueError, "text_features"),
    ("nt_xent temperature", lambda: cb.nt_xent(a, p, 0.0), ValueError, "temperature"),
    ("bank_cross_entropy targets range", lambda: cb.bank_cross_entropy(a, bank, torch.tensor([0, 1, 2, 6])), IndexError, "targets"),
    ("bank_cross_entropy targets dtype", lambda: cb.bank_cross_entropy(a, bank, torch.zeros(4)), TypeError, "targets"),
    ("bank_cross_entropy targets shape", lambda: cb.bank_cross_entropy(a, bank, torch.zeros(3, dtype=torch.long)), ValueError, "targets"),
    ("bank_cross_entropy empty bank", lambda: cb.bank_cross_entropy(a, bank[:0], torch.zeros(4, dtype=torch.long)), ValueError, "bank"),
    ("bank_cross_entropy bank d", lambda: cb.bank_cross_entropy(a, torch.randn(6, 2), torch.zeros(4, dtype=torch.long)), ValueError, "bank"),
    # sparse / mkldnn layouts: named (the dispatcher's error named an op and a backend, not the argument)
    ("sparse anchors", lambda: cb.info_nce(a.to_sparse(), p, bank), TypeError, "anchors must be a dense (strided)"),
    ("mkldnn anchors", lambda: cb.info_nce(a.to_mkldnn(), p, bank), TypeError, "anchors must be a dense (strided)"),
    ("sparse bank", lambda: cb.info_nce(a, p, bank.to_sparse()), TypeError, "negatives must be a dense (strided)"),
    ("sparse indices", lambda: cb.info_nce(a, p, idx_bank, negative_indices=idx.to_sparse()), TypeError,
     "negative_indices must be a dense (strided)"),
    ("sparse temperature", lambda: cb.info_nce(a, p, bank, temperature=torch.tensor(0.1).to_sparse()), TypeError,
     "temperature must be a dense (strided)"),
    ("sparse targets", lambda: cb.bank_cross_entropy(a, bank, torch.zeros(4, dtype=torch.long).to_sparse()),
     TypeError, "targets must be a dense (strided)"),
    ("sparse z1", lambda: cb.nt_xent(a.to_sparse(), p), TypeError, "z1 must be a dense (strided)"),
    ("sparse queue keys", lambda: cb.NegativeQueue(5, 3).enqueue(a.to_sparse()), TypeError,
     "keys must be a dense (strided)"),
    ("sparse class_means features", lambda: cb.empirical.class_means(a.to_sparse(), torch.tensor([0, 1, 0, 1])),
     TypeError, "features must be a dense (strided)"),
    ("sparse class_means labels", lambda: cb.empirical.class_means(a, torch.tensor([0, 1, 0, 1]).to_sparse()),
     TypeError, "labels must be a dense (strided)"),
    # a strided nested tensor has layout strided (its error was torch's "Internal error ... please file an issue")
    ("nested anchors", lambda: cb.info_nce(_nested(), p, bank), TypeError, "anchors must be a dense (strided)"),
    ("nested keys", lambda: cb.NegativeQueue(4, 3).enqueue(_nested()), TypeError, "keys must be a dense"),
    ("nested class_means features", lambda: cb.empirical.class_means(_nested(), torch.tensor([0, 1, 0])),
     TypeError, "features must be a dense (strided)"),
    # ints beyond float64 (OverflowError from float() before), a tiny max_logit_scale (named "temperature")
    ("temperature int beyond float64", lambda: cb.info_nce(a, p, bank, temperature=10**400), ValueError,
     "temperature must be a positive finite number"),
    ("logit_scale int beyond float64", lambda: cb.clip_loss(a, p, 10**400), ValueError, "logit_scale"),
    ("temperature Fraction beyond float64", lambda: cb.info_nce(a, p, bank, temperature=Fraction(10**400)),
     ValueError, "temperature must be a positive finite number"),
    ("logit_scale Fraction beyond float64", lambda: cb.clip_loss(a, p, Fraction(10**400)), ValueError,
     "logit_scale must be positive and finite"),
    ("max_logit_scale int beyond float64", lambda: cb.clip_loss(a, p, 14.3, max_logit_scale=10**400), ValueError,
     "max_logit_scale must be positive and finite"),
    ("max_logit_scale tiny", lambda: cb.clip_loss(a, p, 14.3, max_logit_scale=1e-320), ValueError,
     "max_logit_scale must be at least"),
    # a logit scale past float32's range for float32 features (named "temperature" before), a float or a float64
    # tensor; 3.4e38 (FLT_MAX rounded down) is accepted below
    ("logit_scale past float32", lambda: cb.clip_loss(a, p, 1e39, max_logit_scale=1e40), ValueError,
     "logit_scale (clamped to max_logit_scale) must be at most 3.403e+38 for features computed in float32"),
    ("float64 logit_scale past float32",
     lambda: cb.clip_loss(a, p, torch.tensor(1e39, dtype=torch.float64), max_logit_scale=1e40), ValueError,
     "logit_scale (clamped to max_logit_scale)"),
    # meta tensors whose value is needed (".item() cannot be called on meta tensors" / named "temperature" before)
    ("meta logit_scale", lambda: cb.clip_loss(a, p, torch.tensor(10.0, device="meta")), ValueError,
     "logit_scale is a meta tensor"),
    ("meta InfoNCE temperature", lambda: cb.InfoNCE(temperature=torch.tensor(0.1, device="meta")), ValueError,
     "temperature is a meta tensor"),
    # set after construction (a schedule): the setter read it back (torch's "Tensor.item() ..." named nothing)
    ("meta temperature set on InfoNCE", lambda: setattr(cb.InfoNCE(), "temperature", torch.tensor(0.1, device="meta")),
     ValueError, "temperature is a meta tensor"),
    ("meta temperature set on a learnable SupCon",
     lambda: setattr(cb.SupCon(learn_temperature=True), "temperature", torch.tensor(0.1, device="meta")), ValueError,
     "temperature is a meta tensor"),
    # (an audit: nt_xent checked it with process_group only: "Cannot copy out of meta tensor; no data!")
    ("meta nt_xent temperature", lambda: cb.nt_xent(a, p, torch.tensor(0.5, device="meta")), ValueError,
     "temperature is a meta tensor (no value) but the features are on cpu"),
    # float8 is a floating dtype to torch ("isfinite not implemented for Float8_e4m3fn" before)
    ("float8 class_means features",
     lambda: cb.empirical.class_means(a.to(torch.float8_e4m3fn), torch.tensor([0, 1, 0, 1])), TypeError,
     "features must be a floating tensor (float16, bfloat16, float32 or float64)"),
]


def test_float64_features_take_temperatures_below_float32s_floor():
    # The float32 floor (1 / temperature finite in float32) is for features computed in float32: float64 ones run
    # in float64 and take 1e-40 (a float, or a float64 tensor), as the reference does.
    from contrastbound.reference import info_nce_reference

    g = torch.Generator().manual_seed(0)
    x, y, n = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    ref = info_nce_reference(x, y, n, temperature=1e-40)
    for t in (1e-40, torch.tensor(1e-40, dtype=torch.float64)):
        got = cb.info_nce(x, y, n, temperature=t)
        assert torch.isfinite(got) and abs(got - ref) <= 1e-12 * abs(ref)


@pytest.mark.parametrize("description,call,exc,text", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(description, call, exc, text):
    with pytest.raises(exc) as info:
        call()
    assert text in str(info.value), f"{description}: message {info.value!s} does not name {text!r}"


def test_registered_op_checks_indices_itself():
    # A direct call of the op with bad indices must raise, not read out of bounds.
    from contrastbound import _backend

    if not _backend.EXTENSION_LOADED:
        pytest.skip("compiled extension not available")
    with pytest.raises(IndexError, match="negative_indices"):
        torch.ops.contrastbound.info_nce_fwd(a, p, idx_bank, idx + 100, 1.0, True, True, False)
    with pytest.raises(IndexError, match=r"negative_indices must lie in \[0, M\) = \[0, \d+\) or be -1 \(padding\), "
                                         r"got values in \[-"):
        torch.ops.contrastbound.info_nce_fwd(a, p, idx_bank, idx - 100, 1.0, True, True, False)
    with pytest.raises(ValueError, match="exclude_self"):
        torch.ops.contrastbound.info_nce_fwd(a, p, idx_bank, idx, 1.0, True, True, False, True)
    with pytest.raises(ValueError, match="scale"):
        torch.ops.contrastbound.info_nce_fwd(a, p, bank, None, -1.0, True, True, False)


def test_registered_ops_check_every_tensor_argument():
    # A meta tensor among CPU ones reached the fake kernels (uninitialised results); a V of another shape was read
    # as (B, d); a scale that requires grad got no gradient, silently.
    from contrastbound import _backend

    if not _backend.EXTENSION_LOADED:
        pytest.skip("compiled extension not available")
    fwd, bwd = torch.ops.contrastbound.info_nce_fwd, torch.ops.contrastbound.info_nce_bwd
    with pytest.raises(ValueError, match="negative_indices is on meta"):
        fwd(a, p, idx_bank, idx.to("meta"), 1.0, True, True, False)
    g, lse = torch.ones(4), torch.zeros(4)
    with pytest.raises(ValueError, match="grad_loss is on meta"):
        bwd(g.to("meta"), a, p, bank, None, lse, torch.empty(0), 1.0, True, True, [True, True, True])
    with pytest.raises(ValueError, match=r"anchor_term must be empty or have shape \(B, d\) = \(4, 3\), got \[3, 4\]"):
        bwd(g, a, p, bank, None, lse, torch.zeros(3, 4), 1.0, True, True, [True, True, True])
    with pytest.raises(ValueError, match=r"lse must have shape \(B,\)"):
        bwd(g, a, p, bank, None, lse[:2], torch.empty(0), 1.0, True, True, [True, True, True])
    with pytest.raises(ValueError, match=r"loss must have shape \(B,\) = \(4,\), got \[2\]"):
        bwd(g, a, p, bank, None, lse, torch.empty(0), 1.0, True, True, [True, True, True], loss=lse[:2])
    with pytest.raises(ValueError, match="loss is on meta"):
        bwd(g, a, p, bank, None, lse, torch.empty(0), 1.0, True, True, [True, True, True], loss=lse.to("meta"))
    ex = torch.tensor([0, 1, 2, 3])
    for bad, exc, text in (
        (ex.int(), TypeError, "excluded must be int64, got Int"),
        (ex[:3], ValueError, r"excluded must have shape \(B,\) = \(4,\), got \[3\]"),
        (ex.to("meta"), ValueError, "excluded is on meta"),
    ):
        with pytest.raises(exc, match=text):
            fwd(a, p, bank, None, 1.0, True, True, False, False, bad)
        with pytest.raises(exc, match=text):
            bwd(g, a, p, bank, None, lse, torch.empty(0), 1.0, True, True, [True, True, True], excluded=bad)
    with pytest.raises(ValueError, match=r"excluded needs a shared bank \(K, d\)"):
        fwd(a, p, idx_bank, idx, 1.0, True, True, False, False, ex)
    with pytest.raises(ValueError, match="excluded and exclude_self cannot both be given"):
        fwd(a, p, a, None, 1.0, True, True, False, True, ex)
    with pytest.raises(ValueError, match="loss must be a floating tensor"):
        bwd(g, a, p, bank, None, lse, torch.empty(0), 1.0, True, True, [True, True, True], loss=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="grad_loss, lse and anchor_term must be floating tensors"):
        bwd(torch.ones(4, dtype=torch.cfloat), a, p, bank, None, lse, torch.empty(0), 1.0, True, True, [True] * 3)
    with pytest.raises(ValueError, match="grad_loss, lse and anchor_term must be floating tensors"):
        bwd(g, a, p, bank, None, lse.long(), torch.empty(0), 1.0, True, True, [True] * 3)
    # a scale beyond float32's range became inf in the float32 accumulation: NaN losses, no error
    with pytest.raises(ValueError, match=r"scale \(1 / temperature\) must be at most .* for Float inputs"):
        fwd(a, p, bank, None, 1e39, True, True, True)
    with pytest.raises(ValueError, match=r"must be at most"):
        torch.ops.contrastbound.info_nce_fwd_scaled(a, p, bank, None, torch.tensor(1e39, dtype=torch.float64),
                                                    True, True, False)
    with pytest.raises(ValueError, match=r"must be at most"):
        bwd(g, a, p, bank, None, lse, torch.empty(0), 1e39, True, True, [True] * 3)
    assert torch.isfinite(fwd(a.double(), p.double(), bank.double(), None, 1e39, True, True, False)[0]).all()
    s = torch.tensor(2.0, requires_grad=True)
    with pytest.raises(ValueError, match="does not differentiate scale"):
        torch.ops.contrastbound.info_nce_fwd_scaled(a.requires_grad_(), p, bank, None, s, True, True, True)
    a.requires_grad_(False)


@pytest.mark.parametrize(
    "scale,text",
    [
        (torch.tensor(-1.0), "positive and finite"),
        (torch.tensor(float("nan")), "positive and finite"),
        (torch.ones(2), "one element"),
        (torch.tensor(3), "floating tensor"),
    ],
    ids=["negative", "nan", "two elements", "integer"],
)
def test_registered_scaled_ops_check_a_host_scale(scale, text):
    # The *_scaled ops read a CPU scale tensor on the host and check it like the float ops' scale.
    from contrastbound import _backend

    if not _backend.EXTENSION_LOADED:
        pytest.skip("compiled extension not available")
    with pytest.raises(ValueError, match=text):
        torch.ops.contrastbound.info_nce_fwd_scaled(a, p, bank, None, scale, True, True, False)
    lse = torch.zeros(a.shape[0])
    with pytest.raises(ValueError, match=text):
        torch.ops.contrastbound.info_nce_bwd_scaled(
            torch.ones(a.shape[0]), a, p, bank, None, lse, torch.empty(0), scale, True, True, [False, True, True]
        )


@pytest.mark.parametrize("value", [-0.5, 0.0, float("nan"), float("inf")])
def test_fallback_turns_an_unread_bad_temperature_into_nan(monkeypatch, value):
    # A GPU temperature is never read on the host; the kernels (read_scale) and the pure-PyTorch fallback both
    # give NaN for a value that is not positive and finite. The fallback's half, on the CPU.
    from contrastbound import _backend, functional

    monkeypatch.setattr(_backend, "kernel_serves", lambda device: False)
    loss, _ = functional._fused(a, p, bank, None, torch.tensor(value), True, True)
    assert torch.isnan(loss).all()
    good, _ = functional._fused(a, p, bank, None, torch.tensor(0.5), True, True)
    ref, _ = functional._fused(a, p, bank, None, 0.5, True, True)
    assert torch.isfinite(good).all()
    torch.testing.assert_close(good, ref)


def test_indices_read_back_once_where_the_op_checks_them(monkeypatch):
    # Where a compiled kernel serves the device, the op checks negative_indices itself: the Python layer must not
    # read them back as well (a second device synchronisation per call on a GPU). Bad indices still raise.
    from contrastbound import _backend

    if not _backend.kernel_serves(a.device):
        pytest.skip("compiled extension not available")

    def no_python_read(*args, **kwargs):
        raise AssertionError("negative_indices read back in Python")

    monkeypatch.setattr(torch, "aminmax", no_python_read)
    cb.info_nce(a, p, idx_bank, negative_indices=idx)
    with pytest.raises(IndexError, match=r"negative_indices must lie in \[0, M\)"):
        cb.info_nce(a, p, idx_bank, negative_indices=idx + 5)


def test_indices_read_back_once_per_training_step():
    # Forward's op checks negative_indices; the autograd backward passes check_indices=False (the same saved tensor,
    # version-checked by autograd), so a step reads them back once (was twice: two syncs per step on a GPU).
    from contrastbound import _backend

    if not _backend.kernel_serves(a.device):
        pytest.skip("compiled extension not available")
    aa, bank = a.clone().requires_grad_(True), idx_bank.clone().requires_grad_(True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        cb.info_nce(aa, p, bank, negative_indices=idx).backward()
    calls = sum(e.count for e in prof.key_averages() if e.key == "aten::aminmax")
    assert calls == 1, calls
    # A direct call of the backward op still checks by default.
    with torch.no_grad():
        _, lse, term = torch.ops.contrastbound.info_nce_fwd(a, p, idx_bank, idx, 1.0, True, True, True)
    with pytest.raises(IndexError, match="negative_indices"):
        torch.ops.contrastbound.info_nce_bwd(
            torch.ones(a.shape[0]), a, p, idx_bank, idx + 100, lse, term, 1.0, True, True, [True, True, True]
        )
    # check_indices=False skips it only where nothing reads the rows the indices name: with no anchor term to
    # reuse, V is recomputed from them, so the range is checked anyway (it read out of bounds: a crash).
    empty = term.new_empty((0,))
    for bad in (idx + 100, idx - 100):
        with pytest.raises(IndexError, match="negative_indices"):
            torch.ops.contrastbound.info_nce_bwd(
                torch.ones(a.shape[0]), a, p, idx_bank, bad, lse, empty, 1.0, True, True, [True, True, True],
                False, False,
            )
    # Without that recomputation, out-of-range entries are left out of the bank's gradient (never read).
    ga, gp, gn = torch.ops.contrastbound.info_nce_bwd(
        torch.ones(a.shape[0]), a, p, idx_bank, idx + 10**12, lse, term, 1.0, True, True, [True, True, True],
        False, False,
    )
    assert torch.equal(gn, torch.zeros_like(gn)) and torch.isfinite(ga).all()


def _no_read_back(*args, **kwargs):
    raise AssertionError("a value was read back while the stream is being captured")


def test_index_checks_under_cuda_graph_capture_run_in_the_stream(monkeypatch):
    # While a CUDA stream is captured into a graph no value may be read back (the capture fails with an error):
    # the Python checks of negative_indices (the reference's path) and of bank_cross_entropy's targets then run in
    # the stream (torch._assert_async: on CUDA a device assert, on the CPU an immediate RuntimeError), and the
    # eager-only shortcuts that read values back (ignore_index's count of kept rows) are not taken. The capture
    # is simulated on the CPU (functional._capturing); tests/test_cuda.py captures real graphs.
    from contrastbound import _backend, functional

    def run():
        loss = cb.info_nce(a, p, idx_bank, negative_indices=idx, reduction="none")
        targets = torch.tensor([0, -100, 4, 2])
        ce = cb.bank_cross_entropy(a, idx_bank, targets, 0.5, reduction="none")
        return loss, ce

    monkeypatch.setattr(_backend, "kernel_serves", lambda device: False)  # the reference checks in Python
    eager = run()
    monkeypatch.setattr(functional, "_capturing", lambda x: True)
    monkeypatch.setattr(functional, "_read_back", _no_read_back)
    monkeypatch.setattr(torch, "nonzero", _no_read_back)
    captured = run()
    for x, y in zip(captured, eager):
        torch.testing.assert_close(x, y)
    with pytest.raises(RuntimeError, match=r"negative_indices must lie in \[0, M\)"):
        cb.info_nce(a, p, idx_bank, negative_indices=idx + idx_bank.shape[0])
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, C\)"):
        cb.bank_cross_entropy(a, idx_bank, torch.tensor([0, 1, 5, 2]), 0.5)


def test_infonce_module_refuses_a_temperature_it_would_freeze():
    t = torch.nn.Parameter(torch.tensor(0.1))
    with pytest.raises(ValueError, match="learn_temperature=True"):
        cb.InfoNCE(temperature=t)
    module = cb.InfoNCE(temperature=t, learn_temperature=True)  # starts from its value, learns log_temperature
    assert abs(float(module.temperature.detach()) - 0.1) < 1e-6
    assert abs(float(cb.InfoNCE(temperature=torch.tensor(0.2)).temperature) - 0.2) < 1e-6  # a plain tensor: read


@pytest.mark.parametrize("learn", [False, True])
def test_infonce_module_temperature_can_be_set(learn):
    # A schedule sets module.temperature (it was a read-only property: AttributeError). The loss then equals
    # info_nce at that temperature; a learnable one is set in place, so an optimiser keeps the same parameter.
    g = torch.Generator().manual_seed(1)
    a, p, n = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.randn(10, 4, generator=g)
    module = cb.InfoNCE(temperature=0.1, learn_temperature=learn)
    params = list(module.parameters())
    for value in (0.25, torch.tensor(0.05, dtype=torch.float64)):
        module.temperature = value
        t = float(value)
        assert abs(float(torch.as_tensor(module.temperature).detach()) - t) < 1e-6 * t  # (no float() of a grad tensor)
        torch.testing.assert_close(module(a, p, n), cb.info_nce(a, p, n, temperature=t), rtol=1e-5, atol=0)
    assert [id(x) for x in module.parameters()] == [id(x) for x in params]
    for bad, err in ((0.0, ValueError), (-1.0, ValueError), (math.nan, ValueError), (math.inf, ValueError),
                     ("0.1", TypeError), (torch.tensor(0.2, requires_grad=True), ValueError),
                     (torch.nn.Parameter(torch.tensor(0.2)), ValueError)):  # (nn.Module's KeyError before)
        with pytest.raises(err, match="temperature"):
            module.temperature = bad
    assert abs(float(torch.as_tensor(module.temperature).detach()) - 0.05) < 1e-7  # a refused value changes nothing


def test_numpy_bools_are_bools_and_other_types_are_named_in_full():
    # np.True_ as torch's own bool arguments take it (was refused as "must be a bool, got bool": numpy's type is
    # also named bool); an int or a numpy int is refused with its full type name
    g = torch.Generator().manual_seed(3)
    a, p, n = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.randn(7, 4, generator=g)
    for flag in (True, False):
        torch.testing.assert_close(cb.info_nce(a, p, n, normalize=np.bool_(flag)), cb.info_nce(a, p, n, normalize=flag),
                                   rtol=0, atol=0)
        want = cb.info_nce_lse(a, p, n, normalize=flag, include_positive=flag)
        for got, w in zip(cb.info_nce_lse(a, p, n, normalize=np.bool_(flag), include_positive=np.bool_(flag)), want):
            torch.testing.assert_close(got, w, rtol=0, atol=0)
        torch.testing.assert_close(cb.nt_xent(a, p, normalize=np.bool_(flag)), cb.nt_xent(a, p, normalize=flag),
                                   rtol=0, atol=0)
    module = cb.InfoNCE(normalize=np.True_, learn_temperature=np.True_)
    assert module.normalize is True and module.learn_temperature is True
    for bad, shown in ((1, "got int"), (np.int64(1), "got numpy.int64"), (torch.tensor(True), "got torch.Tensor")):
        with pytest.raises(TypeError, match=f"normalize must be a bool, {shown}$"):
            cb.info_nce(a, p, n, normalize=bad)


def test_learnable_temperature_set_from_a_graph_says_what_to_do():
    # module.temperature = module.temperature * 0.9 on a learnable module: the message told the user to pass
    # learn_temperature=True, which they had; under no_grad the same assignment works
    module = cb.InfoNCE(temperature=0.2, learn_temperature=True)
    with pytest.raises(ValueError, match="detached tensor, or set it under torch.no_grad") as info:
        module.temperature = module.temperature * 0.5
    assert "use learn_temperature=True" not in str(info.value)
    with torch.no_grad():
        module.temperature = module.temperature * 0.5
    assert abs(float(module.temperature.detach()) - 0.1) < 1e-6


def test_modules_built_on_the_meta_device_print_and_reset():
    # The deferred-initialisation path (build on meta, to_empty, reset_parameters, as FSDP does): repr raised on
    # the meta temperature, and on the queue's uninitialised buffers after to_empty; there was no reset_parameters
    with torch.device("meta"):
        module = cb.InfoNCE(temperature=0.07, learn_temperature=True)
        queue = cb.NegativeQueue(8, 3)
    assert "temperature=(meta)" in repr(module) and "filled=?" in repr(queue)
    module.to_empty(device="cpu")
    queue.to_empty(device="cpu")
    with torch.no_grad():  # memory to_empty may hand back: a state enqueue cannot reach
        queue.ptr.fill_(5)
        queue.filled.fill_(2)
        module.log_temperature.fill_(123.0)
    assert "filled=?" in repr(queue)
    module.reset_parameters()
    queue.reset_parameters()
    assert abs(float(module.temperature.detach()) - 0.07) < 1e-7 and "temperature=0.07" in repr(module)
    assert len(queue) == 0 and "filled=0" in repr(queue) and torch.equal(queue.queue, torch.zeros(8, 3))
    keys = torch.randn(3, 3)
    queue.enqueue(keys)
    torch.testing.assert_close(queue.negatives(), keys)
    cb.InfoNCE(temperature=0.3).reset_parameters()  # nothing to reset, no error
    # a temperature set while on meta (a fill there writes nothing) is the one to_empty + reset_parameters gives
    with torch.device("meta"):
        later = cb.InfoNCE(temperature=0.07, learn_temperature=True)
    later.temperature = 0.2
    later.to_empty(device="cpu")
    later.reset_parameters()
    assert abs(float(later.temperature.detach()) - 0.2) < 1e-7
    # SigLIP (and ClipLoss) checked their learnable values by reading them back where the default device made
    # them: on meta, "Tensor.item() cannot be called on meta tensors" at construction
    with torch.device("meta"):
        siglip, clip = cb.SigLIP(5.0, -3.0), cb.ClipLoss(20.0)
    assert siglip.log_logit_scale.device.type == "meta" and "(meta)" in repr(siglip) and "(meta)" in repr(clip)
    siglip.to_empty(device="cpu")
    siglip.reset_parameters()
    assert float(siglip.logit_scale.detach()) == pytest.approx(5.0) and float(siglip.logit_bias.detach()) == -3.0
    with pytest.raises(ValueError, match="must be within its range"), torch.device("meta"):
        cb.SigLIP(1e39)


def test_meta_tensors_give_meta_results_as_torch_does():
    # Shape inference on meta tensors, as F.cross_entropy allows: no values to read, so no range checks; it raised
    # "unsupported scalarType" (autocast on meta) or "Cannot copy out of meta tensor" before.
    m = lambda *shape: torch.randn(*shape, device="meta")  # noqa: E731
    idx = torch.zeros(4, 2, dtype=torch.long, device="meta")
    for loss in (cb.info_nce(m(4, 3), m(4, 3), m(5, 3)), cb.info_nce(m(4, 3), m(4, 3), m(5, 3), negative_indices=idx),
                 cb.info_nce(m(4, 3), m(4, 3)), cb.nt_xent(m(4, 3), m(4, 3)), cb.clip_loss(m(4, 3), m(4, 3), 10.0),
                 cb.bank_cross_entropy(m(4, 3), m(5, 3), idx[:, 0])):
        assert loss.device.type == "meta" and loss.shape == ()
    per = cb.info_nce(m(4, 3), m(4, 3), m(4, 6, 3), reduction="none")
    assert per.device.type == "meta" and per.shape == (4,)
    with pytest.raises(ValueError, match="temperature"):
        cb.info_nce(a, p, bank, temperature=torch.tensor(0.5, device="meta"))


def test_queue_refuses_a_state_beyond_its_range():
    # A float64 state with values beyond float32's range: stored as inf before (enqueue refused the same keys)
    q = cb.NegativeQueue(4, 2)
    q.enqueue(torch.ones(3, 2))
    sd = {k: v.clone() for k, v in q.state_dict().items()}
    sd["queue"] = torch.full((4, 2), 1e300, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="beyond float32's range"):
        q.load_state_dict(sd)
    assert torch.equal(q.queue[:3], torch.ones(3, 2)) and len(q) == 3  # nothing loaded
    sd["queue"] = torch.full((4, 2), 1e30, dtype=torch.float64)  # within range: loaded
    q.load_state_dict(sd)
    assert torch.isfinite(q.queue).all() and float(q.queue[0, 0]) == pytest.approx(1e30, rel=1e-7)
    # float32 into bfloat16: ranges 0.4 % apart, 3.4e38 is finite in float32 and inf in bfloat16
    qb = cb.NegativeQueue(4, 2, dtype=torch.bfloat16)
    sdb = {k: v.clone() for k, v in qb.state_dict().items()}
    sdb["queue"] = torch.full((4, 2), 3.4e38, dtype=torch.float32)
    sdb["filled"] = torch.full_like(sdb["filled"], 4)  # served (the rows of an empty queue's state are not)
    with pytest.raises(RuntimeError, match="beyond bfloat16's range"):
        qb.load_state_dict(sdb)


def test_queue_cast_to_a_narrower_dtype_refuses_keys_beyond_its_range():
    # .half() of a float32 queue holding 1e5 stored inf without a word (enqueue and load_state_dict refuse such
    # keys); now ValueError, the queue left as it was; keys within range cast as before
    q = cb.NegativeQueue(4, 2)
    q.enqueue(torch.tensor([[1e5, 1.0], [0.5, -2.0]]))
    for cast in (lambda m: m.half(), lambda m: m.to(torch.float16), lambda m: m.to("cpu", torch.float16)):
        with pytest.raises(ValueError, match="beyond float16's range"):
            cast(q)
        assert q.queue.dtype == torch.float32 and float(q.queue[0, 0]) == 1e5 and len(q) == 2
    q64 = cb.NegativeQueue(3, 2, dtype=torch.float64)
    q64.enqueue(torch.full((1, 2), 1e300, dtype=torch.float64))
    with pytest.raises(ValueError, match="beyond float32's range"):
        q64.float()
    assert q64.queue.dtype == torch.float64
    ok = cb.NegativeQueue(4, 2)
    ok.enqueue(torch.tensor([[3.0, 1.0]]))
    ok.half()
    assert ok.queue.dtype == torch.float16 and float(ok.queue[0, 0]) == 3.0 and len(ok) == 1
    ok.float()  # a wider cast: nothing to check
    assert ok.queue.dtype == torch.float32


def test_queue_range_checks_look_at_the_served_keys_only():
    # Keys that clear() left behind are not served (enqueue overwrites them first): a cast or a load no longer
    # refuses them (an audit's find: .half() after clear() raised "the loss over them NaN" of an empty queue)
    q = cb.NegativeQueue(4, 2)
    q.enqueue(torch.full((4, 2), 1e5))
    q.clear()
    sd = {k: v.clone() for k, v in q.state_dict().items()}
    q.half()
    assert q.queue.dtype == torch.float16 and len(q) == 0
    q.enqueue(torch.ones(1, 2, dtype=torch.float16))
    assert torch.equal(q.negatives(), torch.ones(1, 2, dtype=torch.float16))
    q16 = cb.NegativeQueue(4, 2, dtype=torch.float16)
    q16.load_state_dict(sd)  # a float32 state of an empty queue with stale 1e5 keys
    assert len(q16) == 0
    # a served key beyond the range is still refused, by a cast and by a load
    r = cb.NegativeQueue(4, 2)
    r.enqueue(torch.full((4, 2), 1.0))
    r.clear()
    r.enqueue(torch.tensor([[1.0, 2.0], [1e5, 1.0]]))  # row 1 served, rows 2-3 stale
    with pytest.raises(ValueError, match="beyond float16's range"):
        r.half()
    sd = {k: v.clone() for k, v in r.state_dict().items()}
    with pytest.raises(RuntimeError, match="beyond float16's range"):
        q16.load_state_dict(sd)


def test_learnable_temperature_that_float32_cannot_hold():
    # InfoNCE(1e-50, learn_temperature=True) was accepted, its float32 log_temperature then read back as 0 and every
    # forward refused "0.0" (info_nce takes 1e-50 with float64 features): refused at construction and when set, by
    # name; a float64 module holds it (its forward as the functional call's)
    for bad in (1e-50, 1e-40, 1e39):
        with pytest.raises(ValueError, match="cannot be learned in float32"):
            cb.InfoNCE(bad, learn_temperature=True)
    m = cb.InfoNCE(0.5, learn_temperature=True)
    with pytest.raises(ValueError, match="cannot be learned in float32"):
        m.temperature = 1e-50
    assert float(m.temperature.detach()) == pytest.approx(0.5)  # unchanged
    m = m.double()
    m.temperature = 1e-50
    a, p, n = (torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(3))
    torch.testing.assert_close(m(a, p, n), cb.info_nce(a, p, n, temperature=1e-50), rtol=1e-12, atol=0)
    cb.InfoNCE(3e-39, learn_temperature=True)  # float32's floor for the losses: held


def test_earlier_bounds_at_the_largest_k():
    # K = 2^63 - 1 is taken; K + 1 wrapped to -2^63 in int64 (nozawa_sato gave inf where K - 1 gives 158.6)
    from contrastbound import bounds

    top = np.iinfo(np.int64).max
    got, below = bounds.nozawa_sato(100.0, top, num_classes=10), bounds.nozawa_sato(100.0, top - 1, num_classes=10)
    assert math.isfinite(got) and got == pytest.approx(below, rel=1e-12)


def test_bounds_refuse_meta_tensors_and_format_gap_report_a_non_list():
    # "Cannot copy out of meta tensor; no data!" and "'NoneType' object is not iterable" before
    from contrastbound import bounds
    from contrastbound.empirical import format_gap_report

    meta = torch.tensor([0.5, 0.5], device="meta")
    with pytest.raises(ValueError, match="prior is a meta tensor"):
        bounds.delta_lower(4, prior=meta)
    with pytest.raises(ValueError, match="K is a meta tensor"):
        bounds.delta_upper(torch.tensor(4, device="meta"), 3)
    with pytest.raises(ValueError, match="contrastive_loss is a meta tensor"):
        bounds.supervised_loss_interval(torch.tensor(1.0, device="meta"), 4, 3)
    for bad in (None, "rows", {"K": 1}):
        with pytest.raises(TypeError, match="rows must be the list of dicts gap_report returns"):
            format_gap_report(bad)


def test_compiled_clip_loss_names_a_bad_feature_argument():
    # Under torch.compile a float logit scale becomes a tensor on the features' device, read before the features
    # were checked: a list got dynamo's internal AttributeError instead of the TypeError naming the argument.
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, y: cb.clip_loss(x, y, 10.0))
    with pytest.raises(TypeError, match="image_features must be a torch.Tensor"):
        compiled([1.0, 2.0], torch.randn(3, 4))


def test_bank_cross_entropy_refuses_a_bool_ignore_index():
    # guards the bool refusal of ignore_index: True (== 1) would silently ignore every target equal to 1
    a, w = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(TypeError, match="ignore_index must be an int or None, got bool"):
        cb.bank_cross_entropy(a, w, torch.tensor([0, 1, 2, 1]), ignore_index=True)


@pytest.mark.parametrize("B", [0, 4])
def test_bank_cross_entropy_refuses_an_ignore_index_beyond_int64(B):
    # compared with int64 targets: at B = 0 it raised OverflowError ("int too big to convert"), at B > 0 it was
    # taken as no target's value (F.cross_entropy: "Overflow when unpacking long long")
    a, w = torch.randn(B, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        cb.bank_cross_entropy(a, w, torch.zeros(B, dtype=torch.long), ignore_index=2 ** 70)


def test_bank_cross_entropy_refuses_a_negative_label_smoothing():
    # guards label_smoothing's lower bound 0 (F.cross_entropy refuses a negative one; it would change the loss)
    a, w = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="label_smoothing must lie in \\[0, 1\\], got -0.1"):
        cb.bank_cross_entropy(a, w, torch.tensor([0, 1, 2, 1]), label_smoothing=-0.1)


def test_clip_loss_refuses_a_bool_max_logit_scale():
    # guards the bool refusal of max_logit_scale: True would clamp the logit scale to 1 without a word
    with pytest.raises(TypeError, match="max_logit_scale must be a positive number, got bool"):
        cb.clip_loss(a, p, 10.0, max_logit_scale=True)


def test_per_anchor_negatives_of_another_batch_refused_under_forward_mode_ad():
    # guards the (B, K, d) negatives' B check where the reference serves (forward-mode AD): ValueError, not einsum's
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(a, torch.ones_like(a))
        with pytest.raises(ValueError, match="negatives of shape \\(B, K, d\\) must have B = 4 rows"):
            cb.info_nce(dual, p, torch.randn(3, 6, 3))


def test_device_mismatch_names_the_argument_on_every_route():
    # guards the features' device check: it names each entry point's own argument, and forward-mode AD's route too
    import torch.autograd.forward_ad as fwAD

    other = p.to("meta")
    with pytest.raises(ValueError, match="z2 is on meta but z1 is on cpu"):
        cb.nt_xent(a, other)
    with pytest.raises(ValueError, match="text_features is on meta but image_features is on cpu"):
        cb.clip_loss(a, other, 10.0)
    with fwAD.dual_level():
        with pytest.raises(ValueError, match="positives is on meta but anchors is on cpu"):
            cb.info_nce(fwAD.make_dual(a, torch.ones_like(a)), other)
