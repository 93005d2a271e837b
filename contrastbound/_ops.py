"""Fake (meta) kernels and autograd for the ops that csrc/ registers as contrastbound::*.

The forward op returns the per-anchor loss, the per-anchor log-sum-exp (saved for backward) and, when asked,
the softmax-weighted sum of the normalised negatives that the anchors' gradient needs (accumulated online in
forward, as flash-attention accumulates its output), so that backward recomputes tiles only for the
negatives' gradient.
"""

from __future__ import annotations

import functools

import torch

from . import _backend
from . import _op_checks as checks


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lse_dtype(anchors: torch.Tensor) -> torch.dtype:
    """info_nce_fwd's lse: float64 from the CPU kernel whatever the inputs (backward weighs each logit by
    e^{l - lse}; a float32 lse's rounding, eps |lse|, would be in every weight), the accumulation type on CUDA."""
    return torch.float64 if anchors.device.type == "cpu" else _acc_dtype(anchors.dtype)


def refuse_double_backward() -> None:
    """Raises where a backward of the fused loss runs with create_graph=True.

    The kernels give first-order gradients only; without this, a second differentiation (a Hessian, a gradient
    penalty, MAML's outer step) would silently treat the gradient as a constant and return wrong numbers.
    (torch.compile traces backward with grad mode off, so compiled training is unaffected.)
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            "contrastbound: double backward is not supported (the fused InfoNCE kernels give first-order gradients "
            "only): a backward of the loss ran with create_graph=True, e.g. for a Hessian, a gradient penalty or "
            "MAML; use the loss's pure-PyTorch form in contrastbound.reference there (info_nce_reference, "
            "nt_xent_reference, clip_reference, supcon_reference, debiased_info_nce_reference, siglip_reference, ...)"
        )


def savable(x):
    """x, or a copy of it where it is an inference tensor (made under torch.inference_mode, say a momentum
    encoder's keys): autograd cannot save those for backward ("Inference tensors cannot be saved for backward"),
    where plain torch's F.normalize would have made a new tensor of them first."""
    return x.clone() if isinstance(x, torch.Tensor) and x.is_inference() else x


def _check_output_mask(output_mask, n: int) -> None:
    """The backward ops' bool[n] (which gradients to form): the fake kernels indexed it, an IndexError for a short
    list and a long one taken (an op audit). The real kernels' schema conversion refuses both, in torch's words."""
    if len(output_mask) != n:
        raise ValueError(f"output_mask must list {n} bools (which gradients to form), got {len(output_mask)}")


def _scalars_have_values(like: torch.Tensor, like_is: str, **scalars) -> None:
    """A meta scalar (scale, bias) among real tensors sends the call to the fake kernels, which would return
    uninitialised real tensors; scalars may otherwise be on any device. like_is: "anchors are", "image is", ..."""
    for name, t in scalars.items():
        if isinstance(t, torch.Tensor) and t.device.type == "meta" and like.device.type != "meta":
            raise ValueError(f"{name} is on the meta device but {like_is} on {like.device}")


def _same_device(anchors: torch.Tensor, **tensors) -> None:
    """A meta tensor among real ones sends the call to the fake kernels, which would return uninitialised real
    tensors: every tensor argument must be on the device of anchors (the scale of the *_scaled ops may be on any)."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != anchors.device:
            raise ValueError(f"{name} is on {t.device} but anchors are on {anchors.device}: the contrastbound ops need "
                             "every tensor on one device")


_LIBRARIES: dict[str, torch.library.Library] = {}


def _lean_autograd_parts():
    """The dispatcher pieces a lean Autograd kernel needs (None if this torch lacks one): the guard that sends a call
    below autograd and the keyset past it, as torch.library's own kernel uses them."""
    guard = getattr(torch._C, "_AutoDispatchBelowAutograd", None)
    below = getattr(torch._C, "_after_autograd_keyset", None)
    any_requires_grad = getattr(torch._C, "_any_requires_grad", None)
    if guard is None or below is None or any_requires_grad is None:
        return None
    return guard, below, any_requires_grad


def without_autocast(backward):
    """backward, run with autocast off on its gradients' device. Autograd runs a backward under the autocast state
    of the thread that called .backward(): called inside the caller's torch.autocast, the torch products of the
    backward formulas ran in bfloat16 / float16 (bank_cross_entropy's half-bank target rows: 2.4e-2 off float64
    where 2.3e-3 with backward outside; label smoothing's mean-row terms likewise). Every backward registered here
    and in functional goes through this, so where backward is called does not change a bit."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        from .functional import _autocast_off  # (functional imports this module)

        device = next((g.device.type for g in grads if isinstance(g, torch.Tensor)), "cpu")
        with _autocast_off(device):
            return backward(ctx, *grads)

    return run


def register_autograd(qualname: str, backward, setup_context) -> None:
    """torch.library.register_autograd(qualname, backward, setup_context=setup_context), at less cost per call.

    torch.library's Autograd kernel gives setup_context every argument, the defaulted ones filled in by a loop that
    reads the schema's argument list anew at each step (O(n^2) in its length): with it info_nce_fwd (13 arguments)
    took 130 us with a gradient against the op's own 50 us (B = K = 8, d = 16, one thread), with this one 77 us.
    This kernel is that one with the defaults read once, at registration: the same autograd.Function around a call
    below autograd, the same inputs to setup_context (a tuple with every argument, defaults filled in) and to
    backward (ctx.needs_input_grad per argument passed). Where this torch lacks a piece it uses, or the op has
    keyword-only arguments, torch.library.register_autograd itself is registered."""
    ns, name = qualname.split("::")
    op = getattr(getattr(torch.ops, ns), name).default
    backward = without_autocast(backward)
    parts = _lean_autograd_parts()
    schema = op._schema
    if parts is None or not hasattr(op, "redispatch") or any(a.kwarg_only for a in schema.arguments):
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
        return
    guard, below, any_requires_grad = parts
    defaults = tuple(a.default_value for a in schema.arguments)

    def run_below(keyset, args):
        with guard():
            return op.redispatch(keyset & below, *args)

    def forward(ctx, *args):
        keyset, args = args[-1], args[:-1]
        result = run_below(keyset, args)
        # (the dispatcher drops trailing arguments equal to their defaults)
        setup_context(ctx=ctx, inputs=args + defaults[len(args):], output=result)
        return result

    def backward_(ctx, *grads):
        needs = ctx.needs_input_grad
        n = len(needs) - 1  # (the keyset's entry last)
        try:
            ctx.needs_input_grad = needs[:-1]
            result = backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        result = result if isinstance(result, tuple) else (result,)
        return (*result[:n], None)

    generated = type(f"LeanBackwardFor_{ns}_{name}", (torch.autograd.Function,),
                     {"forward": staticmethod(forward), "backward": staticmethod(backward_)})

    def autograd_kernel(keyset, *args):
        if torch.is_grad_enabled() and any_requires_grad(*args):
            return generated.apply(*args, keyset)
        return run_below(keyset, args)

    if ns not in _LIBRARIES:  # (kept alive: a Library's registrations end with it)
        _LIBRARIES[ns] = torch.library.Library(ns, "FRAGMENT")
    _LIBRARIES[ns].impl(name, autograd_kernel, "Autograd", with_keyset=True)


if _backend.EXTENSION_LOADED:

    @torch.library.register_fake("contrastbound::info_nce_fwd")
    def _info_nce_fwd_fake(
        anchors, positives, negatives, negative_indices, scale, normalize, include_positive, save_anchor_term,
        exclude_self=False, excluded=None, negative_mask=None, labels=None, negative_labels=None,
    ):
        _same_device(anchors, positives=positives, negatives=negatives, negative_indices=negative_indices,
                     excluded=excluded, negative_mask=negative_mask, labels=labels, negative_labels=negative_labels)
        _scalars_have_values(anchors, "anchors are", scale=scale)
        if isinstance(scale, torch.Tensor):  # (the *_scaled ops read it first)
            checks.check_scale(scale, anchors.dtype)
        checks.check_info_nce_inputs(anchors, positives, negatives, negative_indices, exclude_self)
        checks.check_left_out(excluded, negative_mask, labels, negative_labels, anchors, negatives, negative_indices,
                              exclude_self)
        checks.check_scale(scale, anchors.dtype)
        B, d = anchors.shape
        acc = _acc_dtype(anchors.dtype)
        loss = anchors.new_empty((B,), dtype=acc)
        lse = anchors.new_empty((B,), dtype=_lse_dtype(anchors))
        term = anchors.new_empty((B, d) if save_anchor_term else (0,), dtype=acc)
        return loss, lse, term

    @torch.library.register_fake("contrastbound::info_nce_bwd")
    def _info_nce_bwd_fake(
        grad_loss, anchors, positives, negatives, negative_indices, lse, anchor_term, scale, normalize,
        include_positive, output_mask, exclude_self=False, check_indices=True, loss=None, excluded=None,
        negative_mask=None, labels=None, negative_labels=None,
    ):
        _same_device(anchors, grad_loss=grad_loss, positives=positives, negatives=negatives,
                     negative_indices=negative_indices, lse=lse, anchor_term=anchor_term, loss=loss,
                     excluded=excluded, negative_mask=negative_mask, labels=labels, negative_labels=negative_labels)
        _scalars_have_values(anchors, "anchors are", scale=scale)
        _check_output_mask(output_mask, 3)
        if isinstance(scale, torch.Tensor):
            checks.check_scale(scale, anchors.dtype)
        checks.check_info_nce_inputs(anchors, positives, negatives, negative_indices, exclude_self)
        checks.check_scale(scale, anchors.dtype)
        checks.check_backward_inputs(grad_loss, lse, anchor_term, anchors, loss)
        checks.check_left_out(excluded, negative_mask, labels, negative_labels, anchors, negatives, negative_indices,
                              exclude_self)

        def out(x, needed):
            return torch.empty_like(x, memory_format=torch.contiguous_format) if needed else x.new_empty((0,))

        return out(anchors, output_mask[0]), out(positives, output_mask[1]), out(negatives, output_mask[2])

    # Autograd, shared by info_nce_fwd (scale a float, kept on ctx) and info_nce_fwd_scaled (scale a tensor,
    # saved with the inputs; its own gradient is attached by functional._with_temperature_grad from lse and V).
    def _setup_context(ctx, inputs, output):
        anchors, positives, negatives, negative_indices, scale, normalize, include_positive, _ = inputs[:8]
        ctx.exclude_self = bool(inputs[8]) if len(inputs) > 8 else False
        excluded = inputs[9] if len(inputs) > 9 else None
        negative_mask = inputs[10] if len(inputs) > 10 else None
        labels = inputs[11] if len(inputs) > 11 else None
        negative_labels = inputs[12] if len(inputs) > 12 else None
        loss, lse, term = output
        tensor_scale = isinstance(scale, torch.Tensor)
        if tensor_scale and scale.requires_grad:
            # Its gradient needs lse, V and the anchors' logits (functional._with_temperature_grad): silently None
            # here would freeze a learnable temperature.
            raise ValueError(
                "info_nce_fwd_scaled does not differentiate scale: pass a learnable temperature to "
                "contrastbound.info_nce / info_nce_lse (which attach its exact gradient), or detach scale"
            )
        # The loss too: the positive's gradient is formed from it (expm1(-loss), see the op's schema). A copy (B
        # values): the returned loss may be modified in place before backward (reduction="none", then l.mul_(w)),
        # which F.cross_entropy allows.
        ctx.save_for_backward(
            *map(savable, (anchors, positives, negatives, negative_indices)), lse, term,
            loss.detach().clone() if include_positive else None, savable(excluded), savable(negative_mask),
            savable(labels), savable(negative_labels), *((savable(scale),) if tensor_scale else ())
        )
        ctx.scale = None if tensor_scale else scale
        ctx.normalize = normalize
        ctx.include_positive = include_positive
        ctx.mark_non_differentiable(lse, term)

    def _backward(ctx, grad_loss, grad_lse, grad_term):
        refuse_double_backward()
        (anchors, positives, negatives, negative_indices, lse, term, loss, excluded, negative_mask, labels,
         negative_labels, *tensor_scale) = ctx.saved_tensors
        mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[2])]
        if not any(mask):
            return (None,) * 13
        op = torch.ops.contrastbound.info_nce_bwd_scaled if tensor_scale else torch.ops.contrastbound.info_nce_bwd
        ga, gp, gn = op(
            grad_loss.contiguous(), anchors, positives, negatives, negative_indices, lse, term,
            tensor_scale[0] if tensor_scale else ctx.scale, ctx.normalize, ctx.include_positive, mask,
            ctx.exclude_self, False,  # check_indices: forward checked the same saved tensor
            loss, excluded, negative_mask, labels, negative_labels,
        )
        return (
            ga if mask[0] else None,
            gp if mask[1] else None,
            gn if mask[2] else None,
            None, None, None, None, None, None, None, None, None, None,
        )

    # The same ops with the logit scale as a tensor with one element (a learnable or tensor temperature),
    # registered in csrc/ops.cpp. Its value is read at run time, inside the op: torch.compile traces them as
    # opaque ops with the same fake kernels, so a temperature that changes every step neither breaks the graph nor
    # re-specialises it, and on a GPU the kernels read it from device memory (no synchronisation per step).
    torch.library.register_fake("contrastbound::info_nce_fwd_scaled")(_info_nce_fwd_fake)
    torch.library.register_fake("contrastbound::info_nce_bwd_scaled")(_info_nce_bwd_fake)
    for _name in ("contrastbound::info_nce_fwd", "contrastbound::info_nce_fwd_scaled"):
        register_autograd(_name, _backward, setup_context=_setup_context)

    if hasattr(torch.ops.contrastbound, "clip_fwd"):  # (not in a stale build of the extension)
        # clip_fwd / clip_bwd (csrc/ops.cpp): CLIP's two directions from one pass over the logits. loss, lse and
        # d loss / d scale are (2, N): row 0 image -> text, row 1 text -> image; lse in float64 for every dtype.
        @torch.library.register_fake("contrastbound::clip_fwd")
        def _clip_fwd_fake(image, text, scale, normalize, save_scale_grad):
            _same_device(image, text=text)
            _scalars_have_values(image, "image is", scale=scale)
            checks.check_clip_inputs(image, text)
            checks.check_scale(scale, image.dtype)
            n = image.shape[0]
            acc = _acc_dtype(image.dtype)
            return (image.new_empty((2, n), dtype=acc), image.new_empty((2, n), dtype=torch.float64),
                    image.new_empty((2, n) if save_scale_grad else (0,), dtype=acc))

        @torch.library.register_fake("contrastbound::clip_bwd")
        def _clip_bwd_fake(grad_loss, image, text, loss, lse, scale, normalize, output_mask):
            _same_device(image, grad_loss=grad_loss, text=text, loss=loss, lse=lse)
            _scalars_have_values(image, "image is", scale=scale)  # (it returned uninitialised gradients: an audit)
            _check_output_mask(output_mask, 2)
            checks.check_clip_inputs(image, text)
            checks.check_clip_backward_inputs(grad_loss, loss, lse, image)
            checks.check_scale(scale, image.dtype)

            def out(x, needed):
                return torch.empty_like(x, memory_format=torch.contiguous_format) if needed else x.new_empty((0,))

            return out(image, output_mask[0]), out(text, output_mask[1])

        def _clip_setup_context(ctx, inputs, output):
            image, text, scale, normalize, _ = inputs
            loss, lse, dloss_dscale = output
            if scale.requires_grad:
                raise ValueError(
                    "clip_fwd does not differentiate scale: pass a learnable logit scale to contrastbound.clip_loss "
                    "(which attaches its exact gradient), or detach scale"
                )
            # A copy of the loss (see _setup_context): the positives' gradient is formed from it.
            ctx.save_for_backward(savable(image), savable(text), loss.detach().clone(), lse, savable(scale))
            ctx.normalize = normalize
            ctx.mark_non_differentiable(lse, dloss_dscale)

        def _clip_backward(ctx, grad_loss, grad_lse, grad_dloss_dscale):
            refuse_double_backward()
            image, text, loss, lse, scale = ctx.saved_tensors
            mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
            if not any(mask):
                return None, None, None, None, None
            ga, gt = torch.ops.contrastbound.clip_bwd(grad_loss.contiguous(), image, text, loss, lse, scale,
                                                      ctx.normalize, mask)
            return ga if mask[0] else None, gt if mask[1] else None, None, None, None

        register_autograd("contrastbound::clip_fwd", _clip_backward, setup_context=_clip_setup_context)


if _backend.EXTENSION_LOADED and _backend.HAS_SIGLIP_KERNEL:
    # siglip_fwd / siglip_bwd (csrc/cpu/siglip.cpp): the negative pairs' softplus sums (B,) and their gradients;
    # all four inputs (image, text, scale, bias) are differentiable.
    @torch.library.register_fake("contrastbound::siglip_fwd")
    def _siglip_fwd_fake(image, text, scale, bias):
        _same_device(image, text=text)
        _scalars_have_values(image, "image is", scale=scale, bias=bias)
        checks.check_siglip_inputs(image, text, scale, bias)
        return image.new_empty((image.shape[0],), dtype=_acc_dtype(image.dtype))

    @torch.library.register_fake("contrastbound::siglip_bwd")
    def _siglip_bwd_fake(grad_loss, image, text, scale, bias, output_mask):
        _same_device(image, grad_loss=grad_loss, text=text)
        _scalars_have_values(image, "image is", scale=scale, bias=bias)
        _check_output_mask(output_mask, 4)
        checks.check_siglip_inputs(image, text, scale, bias)
        checks.check_siglip_grad_loss(grad_loss, image)

        def out(x, needed):
            return torch.empty_like(x, memory_format=torch.contiguous_format) if needed else x.new_empty((0,))

        return (out(image, output_mask[0]), out(text, output_mask[1]), out(scale, output_mask[2]),
                out(bias, output_mask[3]))

    def _siglip_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*map(savable, inputs))

    def _siglip_backward(ctx, grad_loss):
        refuse_double_backward()
        image, text, scale, bias = ctx.saved_tensors
        mask = [bool(ctx.needs_input_grad[i]) for i in range(4)]
        if not any(mask):
            return None, None, None, None
        grads = torch.ops.contrastbound.siglip_bwd(grad_loss.contiguous(), image, text, scale, bias, mask)
        return tuple(g if m else None for g, m in zip(grads, mask))

    register_autograd("contrastbound::siglip_fwd", _siglip_backward, setup_context=_siglip_setup_context)


def _k_of(negatives_shape, indices_shape) -> int:
    """K, the negatives per anchor, from the shapes the ops take: (B, K) indices, (B, K, d) or (K, d) negatives."""
    if indices_shape is not None:
        return indices_shape[1]
    return negatives_shape[1] if len(negatives_shape) == 3 else negatives_shape[0]


def _register_flop_formulas() -> None:
    """torch.utils.flop_counter.FlopCounterMode's count of the ops: the useful work, 2 B K d per product of the
    (B, d) anchors with K negatives, as torch counts naive PyTorch's matmuls, and no recomputation (the kernels'
    own cost is in docs/ARCHITECTURE.md and differs by device). Forward: the logits, and the anchors' gradient
    product V when it saves it; backward: the negatives' gradient where asked, and the anchors' where forward did
    not save V. A training step counts 4 B K d with a detached bank, 6 B K d with one that learns, as naive
    PyTorch's. clip_loss's and siglip_loss's ops: the N x N logits forward, a product per side's gradient backward."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    ops = torch.ops.contrastbound

    def formula(targets):
        targets = [t for t in targets if t not in flop_registry]  # (a reload of this module)
        return register_flop_formula(targets) if targets else (lambda f: f)

    @formula([ops.info_nce_fwd, ops.info_nce_fwd_scaled])
    def _info_nce_fwd_flop(anchors, positives, negatives, negative_indices, scale, normalize, include_positive,
                           save_anchor_term, *args, out_shape=None, **kwargs) -> int:
        B, d = anchors
        return 2 * B * _k_of(negatives, negative_indices) * d * (2 if save_anchor_term else 1)

    @formula([ops.info_nce_bwd, ops.info_nce_bwd_scaled])
    def _info_nce_bwd_flop(grad_loss, anchors, positives, negatives, negative_indices, lse, anchor_term, scale,
                           normalize, include_positive, output_mask, *args, out_shape=None, **kwargs) -> int:
        B, d = anchors
        products = int(bool(output_mask[2])) + int(bool(output_mask[0]) and anchor_term[0] == 0)
        return 2 * B * _k_of(negatives, negative_indices) * d * products

    if hasattr(ops, "clip_fwd"):
        @formula([ops.clip_fwd])
        def _clip_fwd_flop(image, text, *args, out_shape=None, **kwargs) -> int:
            return 2 * image[0] * text[0] * image[1]

        @formula([ops.clip_bwd])
        def _clip_bwd_flop(grad_loss, image, text, loss, lse, scale, normalize, output_mask, *args, out_shape=None,
                           **kwargs) -> int:
            return 2 * image[0] * text[0] * image[1] * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


    if hasattr(ops, "siglip_fwd"):  # SigLIP's negative pairs: the (B, M) products, as naive PyTorch's x @ y.T
        @formula([ops.siglip_fwd])
        def _siglip_fwd_flop(image, text, *args, out_shape=None, **kwargs) -> int:
            return 2 * image[0] * text[0] * image[1]

        @formula([ops.siglip_bwd])
        def _siglip_bwd_flop(grad_loss, image, text, scale, bias, output_mask, *args, out_shape=None, **kwargs) -> int:
            return 2 * image[0] * text[0] * image[1] * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def register_bank_rows_flops() -> None:
    """The formula of functional's Python custom op contrastbound::bank_rows_fwd (bank_cross_entropy's forward:
    the (B, d) anchors against the C bank rows, V where saved), registered once that op exists. FlopCounterMode
    counts an op without entering it, so the info_nce_fwd call inside is not seen; its backward is info_nce_bwd."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    op = torch.ops.contrastbound.bank_rows_fwd
    if op in flop_registry:
        return

    @register_flop_formula([op])
    def _bank_rows_fwd_flop(anchors, bank, rows, scale_tensor, scale, normalize, save_anchor_term, *args,
                            out_shape=None, **kwargs) -> int:
        return 2 * anchors[0] * bank[0] * anchors[1] * (2 if save_anchor_term else 1)


if _backend.EXTENSION_LOADED:
    _register_flop_formulas()
