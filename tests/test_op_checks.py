"""The registered ops' argument checks (kernel, fake and meta calls alike) and autograd wiring, where
tests/test_ops.py's variant test cannot reach: another negatives layout, a missing tensor, half inputs, the
message's "got" part, siglip with M < B, lse's differentiability, inference tensors saved for backward, the clip /
siglip backward fakes and siglip's output mask. From a mutation audit of _op_checks.py and _ops.py (2026-12-06: 116
mutants, 89 killed before; the 17 real gaps of the 27 survivors now killed, 10 equivalent or needing two GPUs).
"""

from __future__ import annotations

import pytest
import torch

import contrastbound as cb
from contrastbound import _backend

pytestmark = pytest.mark.skipif(not _backend.EXTENSION_LOADED, reason="compiled extension not loaded")

ops = torch.ops.contrastbound if _backend.EXTENSION_LOADED else None


def _raised(op, args):
    """(exception type name, first line of the message), or None where the call returned."""
    try:
        op(*args)
    except Exception as e:  # noqa: BLE001 (compared, whatever it is)
        return type(e).__name__, str(e).splitlines()[0]
    return None


def _all_refuse(op, args, exc, text):
    """The kernel, the fake kernel (FakeTensorMode) and a meta call all raise exc with a message containing text
    (the fake kernels are all torch.compile / memory estimators see)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    kernel = _raised(op, args)
    with FakeTensorMode() as mode:
        fake = _raised(op, [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in args])
    meta = _raised(op, [x.to("meta") if isinstance(x, torch.Tensor) else x for x in args])
    for where, got in (("kernel", kernel), ("fake", fake), ("meta", meta)):
        assert got is not None and got[0] == exc.__name__ and text in got[1], (where, got, text)


def _features(B=4, K=6, d=3, M=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return r(B, d), r(B, d), r(K, d), r(B, K, d), r(M, d), torch.randint(0, M, (B, K), generator=g)


# ---- the fake kernels' structural checks that tests/test_ops.py::test_fake_kernels_refuse_what_the_kernels_refuse
# cannot reach (it varies dtypes and sizes of one argument, never which mode the call is in, never a missing tensor)

@pytest.mark.parametrize("mode", ["indexed", "per_anchor"])
@pytest.mark.parametrize("left_out", ["excluded", "negative_mask", "labels"])
def test_fake_kernels_refuse_left_out_rows_without_a_shared_bank(mode, left_out):
    a, p, bank, per_anchor, idx_bank, idx = _features()
    neg, ind = (idx_bank, idx) if mode == "indexed" else (per_anchor, None)
    rest = {"excluded": ([torch.tensor([0, 1, 2, 3])], "excluded needs a shared bank (K, d)"),
            "negative_mask": ([None, torch.ones(4, 6, dtype=torch.bool)], "negative_mask needs a shared bank (K, d)"),
            "labels": ([None, None, torch.tensor([0, 1, 0, 2]), torch.tensor([0, 1, 2, 0, 1, 2])],
                       "labels need a shared bank (K, d)")}
    extra, text = rest[left_out]
    _all_refuse(ops.info_nce_fwd, [a, p, neg, ind, 2.0, True, True, False, False, *extra], ValueError, text)


@pytest.mark.parametrize("which", ["labels", "negative_labels"])
def test_fake_kernels_refuse_labels_without_negative_labels(which):
    a, p, bank, *_ = _features()
    y, yn = torch.tensor([0, 1, 0, 2]), torch.tensor([0, 1, 2, 0, 1, 2])
    labels = (y, None) if which == "labels" else (None, yn)
    _all_refuse(ops.info_nce_fwd, [a, p, bank, None, 2.0, True, True, False, False, None, None, *labels],
                ValueError, "labels and negative_labels must be given together")


def test_fake_kernels_refuse_an_empty_tensor_scale():
    a, p, bank, *_ = _features()
    for scale in (torch.empty(0), torch.empty(0, dtype=torch.float64)):
        _all_refuse(ops.info_nce_fwd_scaled, [a, p, bank, None, scale, True, True, False], ValueError,
                    "scale (1 / temperature) must be a floating tensor with one element")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fake_kernels_refuse_a_scale_beyond_float32_for_half_inputs(dtype):
    # the variant test draws its calls in float32 only: a fake check of float32 alone (not float16 / bfloat16,
    # which the kernels accumulate in float32 too) passed it
    a, p, bank, *_ = _features(dtype=dtype)
    _all_refuse(ops.info_nce_fwd, [a, p, bank, None, 1e39, True, True, False], ValueError,
                "scale (1 / temperature) must be at most")
    # (a tensor scale's value is the kernels' to check: the fakes have none)


def test_fake_kernels_take_a_scale_of_exactly_float32_max():
    from torch._subclasses.fake_tensor import FakeTensorMode

    a, p, bank, *_ = _features()
    top = float(torch.finfo(torch.float32).max)
    assert _raised(ops.info_nce_fwd, [a, p, bank, None, top, True, True, False]) is None
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(x) for x in (a, p, bank)]
        assert _raised(ops.info_nce_fwd, [*args, None, top, True, True, False]) is None


def test_siglip_fake_kernel_refuses_fewer_texts_than_images():
    g = torch.Generator().manual_seed(1)
    image, s, b = torch.randn(5, 3, generator=g), torch.tensor(2.0), torch.tensor(-1.0)
    for m in (4, 1):
        _all_refuse(ops.siglip_fwd, [image, torch.randn(m, 3, generator=g), s, b], ValueError,
                    "siglip: text must be (M, d) with M >= B = 5")
    # M == B is taken
    from torch._subclasses.fake_tensor import FakeTensorMode

    text = torch.randn(5, 3, generator=g)
    assert _raised(ops.siglip_fwd, [image, text, s, b]) is None
    with FakeTensorMode() as mode:
        assert _raised(ops.siglip_fwd, [mode.from_tensor(x) for x in (image, text, s, b)]) is None


# ---- the messages name what was given: the variant test compares messages up to ", got" only

def test_fake_kernel_messages_print_the_shape_that_was_given():
    from torch._subclasses.fake_tensor import FakeTensorMode

    a, p, bank, per_anchor, idx_bank, idx = _features()
    g = torch.Generator().manual_seed(2)
    cases = [
        (ops.info_nce_fwd, [a, p[:3], bank, None, 2.0, True, True, False], "got [3, 3]"),
        (ops.info_nce_fwd, [a, p, idx_bank, idx[:3], 2.0, True, True, False], "got [3, 6]"),
        (ops.info_nce_fwd, [a, p, per_anchor[:, :, :2], None, 2.0, True, True, False], "got [4, 6, 2]"),
        (ops.siglip_fwd, [torch.randn(5, 3, generator=g), torch.randn(4, 3, generator=g), torch.tensor(2.0),
                          torch.tensor(-1.0)], "got [4, 3]"),
    ]
    for op, args, text in cases:
        kernel = _raised(op, args)
        with FakeTensorMode() as mode:
            fake = _raised(op, [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in args])
        assert text in kernel[1] and fake == kernel, (kernel, fake)


# ---- autograd wiring of the registered ops

def test_lse_and_saved_terms_of_the_ops_are_not_differentiable():
    # _setup_context / _clip_setup_context mark them non-differentiable: backward ignores grad_lse and the gradient of
    # V, so a graph through them would give silently wrong (missing) gradients; they must say requires_grad=False
    a, p, bank, *_ = _features(dtype=torch.float64)
    a.requires_grad_()
    for fwd, scale in ((ops.info_nce_fwd, 2.0), (ops.info_nce_fwd_scaled, torch.tensor(2.0, dtype=torch.float64))):
        loss, lse, term = fwd(a, p, bank, None, scale, True, True, True)
        assert loss.requires_grad and not lse.requires_grad and not term.requires_grad
    if hasattr(ops, "clip_fwd"):
        loss, lse, dloss_dscale = ops.clip_fwd(a, p, torch.tensor(3.0, dtype=torch.float64), True, True)
        assert loss.requires_grad and not lse.requires_grad and not dloss_dscale.requires_grad


def test_inference_tensors_are_saved_for_backward_as_copies():
    # savable(): a bank / positives made under torch.inference_mode (a momentum encoder's keys) with learnable
    # anchors: "Inference tensors cannot be saved for backward" without the copy
    a, p, bank, *_ = _features(dtype=torch.float64)
    with torch.inference_mode():
        p_inf, bank_inf = p.clone(), bank.clone()
    a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    (g_inf,) = torch.autograd.grad(cb.info_nce(a1, p_inf, bank_inf, temperature=0.5), [a1])
    (g,) = torch.autograd.grad(cb.info_nce(a2, p, bank, temperature=0.5), [a2])
    torch.testing.assert_close(g_inf, g)
    # the raw op and the clip / siglip ops too
    a3 = a.clone().requires_grad_()
    loss, _, _ = ops.info_nce_fwd(a3, p_inf, bank_inf, None, 2.0, True, True, True)
    loss.sum().backward()
    assert a3.grad is not None
    if hasattr(ops, "clip_fwd"):
        a4 = a.clone().requires_grad_()
        with torch.inference_mode():
            s_inf = torch.tensor(3.0, dtype=torch.float64)
        ops.clip_fwd(a4, p_inf, s_inf, True, False)[0].sum().backward()
        assert a4.grad is not None
    if hasattr(ops, "siglip_fwd"):
        a5 = a.clone().requires_grad_()
        with torch.inference_mode():
            s_inf, b_inf = torch.tensor(3.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
        ops.siglip_fwd(a5, p_inf, s_inf, b_inf).sum().backward()
        assert a5.grad is not None


def test_fake_scaled_ops_check_the_scale_tensor_before_the_features():
    # the kernels of the *_scaled ops read (and check) the scale first; so must their fakes, or a call with two bad
    # arguments is refused for a different one under torch.compile than eagerly
    a, p, bank, *_ = _features()
    args = [a, p[:3], bank, None, torch.tensor(2), True, True, False]
    _all_refuse(ops.info_nce_fwd_scaled, args, ValueError, "scale (1 / temperature) must be a floating tensor")
    lse = torch.zeros(4, dtype=torch.float64)
    _all_refuse(ops.info_nce_bwd_scaled, [torch.ones(4), a, p[:3], bank, None, lse, torch.empty(0), torch.ones(2),
                                          True, True, [True] * 3], ValueError, "with one element")


def test_clip_and_siglip_backward_fakes_refuse_an_output_mask_of_another_length():
    # (test_ops checks info_nce_bwd's fake only: clip_bwd's fake indexed output_mask, a long list taken)
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = torch.Generator().manual_seed(3)
    i, t = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    s, b = torch.tensor(2.0), torch.tensor(-1.0)
    with FakeTensorMode() as mode:
        i_f, t_f, s_f, b_f = (mode.from_tensor(x) for x in (i, t, s, b))
        if hasattr(ops, "clip_fwd"):
            loss, lse, _ = ops.clip_fwd(i_f, t_f, s_f, True, False)
            for mask in ([True], [True, True, True]):
                with pytest.raises(ValueError, match="output_mask must list 2 bools"):
                    ops.clip_bwd(mode.from_tensor(torch.ones(2, 5)), i_f, t_f, loss, lse, s_f, True, mask)
        if hasattr(ops, "siglip_fwd"):
            for mask in ([True] * 3, [True] * 5):
                with pytest.raises(ValueError, match="output_mask must list 4 bools"):
                    ops.siglip_bwd(mode.from_tensor(torch.ones(5)), i_f, t_f, s_f, b_f, mask)


def test_siglip_counts_and_computes_only_the_gradients_asked_for():
    # siglip_bwd's flop formula and _siglip_backward's mask: with frozen text features only the image side's
    # product is formed and counted, 2 N M d forward + 2 N M d backward (test_siglip counts the both-sides case only)
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(4)
    N, M, d = 6, 6, 5
    x = torch.randn(N, d, generator=g, requires_grad=True)
    y = torch.randn(M, d, generator=g)
    with FlopCounterMode(display=False) as counter:
        cb.siglip_loss(x, y, 10.0, -10.0).backward()
    assert counter.get_total_flops() == 4 * N * M * d
