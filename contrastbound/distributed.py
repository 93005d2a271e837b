"""InfoNCE across processes with torch.distributed (gloo on CPU, NCCL on GPU).

Two strategies:

* gather: :func:`all_gather_with_grad` concatenates a tensor over ranks; its backward gives each rank the sum over
  ranks of the gradients with respect to its slice, so every rank can use the global batch as in-batch negatives
  (``info_nce(anchors, positives, None, process_group=group)``, ``nt_xent``, ``clip_loss``, ``supcon_loss`` with
  its labels gathered too, ``debiased_info_nce``, ``siglip_loss`` with every rank's texts) and DDP's averaging
  yields the gradient of the mean of the ranks' losses: the global mean loss's when the batches are equal (with
  uneven batches B_r, ``reduction="sum"`` scaled by W / sum B_r; by W / (2 sum B_r) for ``nt_xent``, whose two
  views per pair are two loss terms).
* shard: :func:`info_nce_sharded` (also ``info_nce(..., process_group=group)`` and ``debiased_info_nce``) where
  each rank holds a shard of a bank too large for one device. Rank r's loss is its own anchors against the whole
  bank; ranks exchange anchors and per-anchor log-sum-exp partials (O(B d + B) per rank), never the bank.
"""

from __future__ import annotations

import contextlib
import math
import struct
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import _backend, _ops
from .reference import _softplus
from .functional import (
    _autocast_off,
    _check_dense,
    _check_bool,
    _check_device,
    _check_features,
    _check_reduction,
    _check_scale_fits,
    _check_temperature_has_value,
    _check_temperature,
    _check_tensor,
    _check_group,
    _check_label_tensor,
    _function_group,
    _bwd_op,
    _fwd_op,
    _reduce,
    _scale_of,
    _to_bank_dtype,
    _usable_for_autograd,
)


def _world(group) -> tuple[int, int]:
    if isinstance(group, int) and not isinstance(group, bool) and group == dist.GroupMember.NON_GROUP_MEMBER:
        # (what dist.new_group returns on a rank outside the group: "got int" named no cause)
        raise ValueError("process_group: this rank is not a member of the group (dist.new_group returns "
                         "GroupMember.NON_GROUP_MEMBER on the ranks outside it); call the loss on its members only")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        # (torch's own calls fail on such an object with an AttributeError from its internals)
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD) or None, "
                        f"got {type(group).__name__}")
    return dist.get_world_size(group), dist.get_rank(group)


_DTYPE_CODES = {dt: i for i, dt in enumerate((torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                               torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                               torch.bool, torch.complex64, torch.complex128))}


_FLOATING = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# The calls that gather (the first exchange of each tells the ranks which one every rank is making).
_CALLS = ("all_gather_with_grad / gather_with_local_first", "info_nce with negatives=None (in-batch)",
          "info_nce with a bank shard", "nt_xent", "clip_loss", "supcon_loss with labels",
          "supcon_loss with labels=None", "debiased_info_nce with negatives=None (in-batch)",
          "debiased_info_nce with a bank shard and beta > 0", "debiased_info_nce with a bank shard and beta = 0",
          "siglip_loss", "info_nce with negatives=None (in-batch) and labels", "info_nce with a bank shard and labels")


_REFUSED = -1  # the call code of a rank that refused its own arguments (refusals_joined)
_OPTION_SLOTS = 2  # the options the ranks must agree on besides the temperature (beta and tau_plus at most)
_META_LEN = 14 + _OPTION_SLOTS  # _exchange_sizes's vector


def _needs_grad(tensor: torch.Tensor) -> bool:
    return bool(tensor.requires_grad and torch.is_grad_enabled())


def _exchange_sizes(tensor: torch.Tensor, group, name: str, *, call: int = 0, backward: dict[str, bool] | None = None,
                    normalize: bool | None = None, temperature=None,
                    options: tuple[tuple[str, Any], ...] = (), gathered: bool = True) -> list[int]:
    """Every rank's first dimension, once the ranks agree on the rest of the shape and the dtype, and on the call.

    A mismatch would otherwise reach the backend's all_gather, which aborts the process (gloo) or hangs; here every
    rank raises the same ValueError, naming the argument and each rank's shape and dtype. ``options``: up to
    _OPTION_SLOTS (name, a float or a scalar tensor) pairs, other arguments the ranks must agree on
    (debiased_info_nce's beta and tau_plus, siglip_loss's bias). The ranks must also be
    making the same call (``_CALLS[call]``: one rank in-batch and another with a bank shard gathered each other's
    anchors as positives, silently), with the same ``normalize`` and temperature (else each rank's loss mixes
    differently scored parts), and the same collectives in backward: besides the gathered tensor's own gradient,
    ``backward`` names the other ones that run a collective (a rank whose input needs no gradient skips the
    all_reduce that another waits in forever)."""
    world, _ = _world(group)
    tail = list(tensor.shape[1:])
    # rows, dtype, ndim, elements a row, the row shape (its first 6 dimensions; past 6, the sixth slot holds a hash
    # of the sixth and later ones: Python's hash of a tuple of ints is the same in every process), then the call,
    # its backward's collectives, normalize and the temperature's bits: one fixed-length vector, so the exchange
    # itself cannot mismatch
    row_shape = (tail + [0] * 6)[:6]
    if len(tail) > 6:
        row_shape[5] = hash(tuple(tail[5:])) & ((1 << 62) - 1)
    # (``gathered=False``: only the sizes of ``tensor`` are exchanged, a bank shard's, so its own gradient runs no
    # collective and the ranks need not agree on it: a shard that only some ranks learn, as info_nce takes it)
    grad_names = {name.split(" ")[0]: _needs_grad(tensor)} if gathered else {}
    grad_names.update(backward or {})
    grads = sum(int(g) << i for i, g in enumerate(grad_names.values()))
    norm = -1 if normalize is None else int(normalize)
    # the temperature's float64 bits (0 without one: never a valid temperature's), written on the gathered tensor's
    # device and read with the rest of the vector (no read-back of their own where a tensor temperature lives there
    # too). A float's bits are packed on the host, except under torch.compile, where a float schedule's second value
    # is traced as a symbolic float, which struct.pack cannot take (a RecursionError inside dynamo): there it goes
    # through a tensor (two small device ops, eager mode spared them).
    traced = temperature is not None and not isinstance(temperature, torch.Tensor) and torch.compiler.is_compiling()
    temp = struct.unpack("<q", struct.pack("<d", float(temperature)))[0] \
        if temperature is not None and not isinstance(temperature, torch.Tensor) and not traced else 0
    if len(options) > _OPTION_SLOTS:
        raise AssertionError(f"at most {_OPTION_SLOTS} options, got {len(options)}")  # (the library's own calls)
    opt_on_device = [isinstance(v, torch.Tensor) or torch.compiler.is_compiling() for _, v in options]
    # (+ 0.0: -0.0 and 0.0 are the same value, and their bits differ)
    opts = [struct.unpack("<q", struct.pack("<d", float(v) + 0.0))[0] if not on_device else 0
            for (_, v), on_device in zip(options, opt_on_device)]
    opts += [0] * (_OPTION_SLOTS - len(opts))  # (a fixed length: the exchange itself cannot mismatch)
    meta = torch.tensor([tensor.shape[0], _DTYPE_CODES.get(tensor.dtype, -1), tensor.dim(), math.prod(tail),
                         *row_shape, call, grads, norm, temp, *opts], device=tensor.device, dtype=torch.long)
    if isinstance(temperature, torch.Tensor):
        meta[13] = temperature.detach().reshape(()).to(device=meta.device, dtype=torch.float64).view(torch.long)
    elif traced:
        meta[13] = (torch.ones((), dtype=torch.float64, device=meta.device) * temperature).view(torch.long)
    for slot, ((_, value), on_device) in enumerate(zip(options, opt_on_device), start=14):
        if on_device:  # (as the temperature: a tensor's value, or a traced float, written without a read-back)
            meta[slot] = (torch.ones((), dtype=torch.float64, device=meta.device) * value + 0.0).view(torch.long) \
                if not isinstance(value, torch.Tensor) else \
                (value.detach().reshape(()).to(device=meta.device, dtype=torch.float64) + 0.0).view(torch.long)
    metas = [torch.zeros_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta, group=group)
    metas = [[int(v) for v in m] for m in metas]

    def per_rank(show) -> str:
        return "; ".join(f"rank {r}: {show(m)}" for r, m in enumerate(metas))

    refused = [r for r, m in enumerate(metas) if m[10] == _REFUSED]
    if refused:
        raise _joined(ValueError(f"rank{'s' if len(refused) > 1 else ''} {', '.join(map(str, refused))} of "
                                 "process_group refused its arguments (its own error says why); every rank raises"))
    if any(m[10] != metas[0][10] for m in metas):
        raise _joined(ValueError("the ranks of process_group must make the same call, got " +
                         per_rank(lambda m: _CALLS[m[10]] if 0 <= m[10] < len(_CALLS) else "another call")))
    if any(m[1:10] != metas[0][1:10] for m in metas) or metas[0][1] < 0:
        names = {v: str(k).replace("torch.", "") for k, v in _DTYPE_CODES.items()}
        allowed = [str(t).replace("torch.", "") for t in _FLOATING] if call else list(names.values())
        seen = per_rank(lambda m: (f"rows of shape {tuple(m[4:4 + m[2] - 1])}" if m[2] <= 7 else
                                   f"rows of shape {tuple(m[4:9])} x ... ({m[2] - 1} dimensions)")
                                  + f", {names.get(m[1], 'an unsupported dtype')}")
        raise _joined(ValueError(f"{name} must have the same shape past the first dimension and the same dtype on "
                                 f"every rank (one of {', '.join(allowed)}), got {seen}"))
    if any(m[12] != metas[0][12] for m in metas):
        raise _joined(ValueError("normalize must be the same on every rank of process_group, got " +
                                 per_rank(lambda m: str(bool(m[12])))))
    if any(m[13] != metas[0][13] for m in metas):
        def temp_of(m):
            return "none" if m[13] == 0 else f"{struct.unpack('<d', struct.pack('<q', m[13]))[0]:.9g}"

        raise _joined(ValueError("the temperature (or logit scale) must be the same on every rank of process_group, "
                                 "got " + per_rank(temp_of) + " (a learned one, a loss module's parameter: keep the "
                                 "ranks' copies equal by wrapping the module in DistributedDataParallel with the "
                                 "model, or by averaging its gradient over the ranks before each step)"))
    for slot, (opt_name, opt_value) in enumerate(options, start=14):
        if any(m[slot] != metas[0][slot] for m in metas):
            def show(m, as_bool=isinstance(opt_value, bool)):  # (a flag, decoupled, is exchanged as 0.0 / 1.0)
                v = struct.unpack('<d', struct.pack('<q', m[slot]))[0]
                return str(bool(v)) if as_bool else f"{v:.9g}"

            raise _joined(ValueError(f"{opt_name} must be the same on every rank of process_group, got "
                                     + per_rank(show)))
    if any(m[11] != metas[0][11] for m in metas):
        def grads_of(m):
            return ", ".join(f"{n} {'needs' if m[11] >> i & 1 else 'does not need'} a gradient"
                             for i, n in enumerate(grad_names))

        raise _joined(ValueError("the ranks of process_group would run different collectives in backward (one would "
                                 "wait forever): requires_grad (under grad mode) must agree, got "
                                 + per_rank(grads_of)))
    return [m[0] for m in metas]


def _joined(exc: BaseException) -> BaseException:
    """Marks an error that every rank raises after the same collectives (refusals_joined must not join again)."""
    exc._contrastbound_joined = True  # type: ignore[attr-defined]
    return exc


@contextlib.contextmanager
def refusals_joined(group, like):
    """Around a loss's checks of its own arguments before its first exchange (_exchange_sizes): where they refuse
    them on some ranks only, the other ranks would wait in that exchange for ever (or until the backend's timeout).
    A refusing rank therefore still takes part in the exchange, with the code _REFUSED, which makes every other
    rank raise a ValueError too, then raises its own error. (Where every rank refuses, they exchange among
    themselves and each raises its own.)"""
    try:
        yield
    except (TypeError, ValueError, IndexError, NotImplementedError) as exc:
        if not getattr(exc, "_contrastbound_joined", False) and _group_usable(group):
            try:
                world, _ = _world(group)
                # (a meta tensor, refused for that, has no data to exchange with: the CPU, as for a non-tensor)
                real = isinstance(like, torch.Tensor) and like.device.type != "meta"
                device = like.device if real else torch.device("cpu")
                if device.type == "cpu" and dist.get_backend(group) == "nccl":  # NCCL exchanges CUDA tensors only
                    device = torch.device("cuda", torch.cuda.current_device())
                meta = torch.zeros(_META_LEN, dtype=torch.long, device=device)
                meta[10] = _REFUSED
                dist.all_gather([torch.zeros_like(meta) for _ in range(world)], meta, group=group)
            except Exception:  # noqa: BLE001, S110 - this rank's own error is what it reports
                pass
            _joined(exc)
        raise


def _group_usable(group) -> bool:
    return (dist.is_available() and dist.is_initialized()
            and (group is None or isinstance(group, dist.ProcessGroup)))


def _all_gather_sized(tensor: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenation over ranks of tensors whose first dimensions are ``sizes``."""
    largest = max(sizes)
    padded = tensor
    if tensor.shape[0] < largest:
        pad = tensor.new_zeros((largest - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([tensor, pad])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _AllReduceSum(torch.autograd.Function):
    """The sum over ranks, differentiable: its adjoint is the sum over ranks again. (torch.distributed.nn's
    all_reduce does the same but is deprecated from torch 2.13 on, with a FutureWarning at every call.)"""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad, ctx.group), None


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        return _all_gather_sized(tensor, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss may depend on every slice: the gradient of a slice is the sum over ranks, through
        # _AllReduceSum, differentiable, so that a second derivative (create_graph=True) sums over ranks too: the
        # in-place dist.all_reduce has no autograd formula (torch only warns, and the second derivative silently
        # missed the other ranks' terms).
        grad = _AllReduceSum.apply(grad, ctx.group)
        _, rank = _world(ctx.group)
        start = sum(ctx.sizes[:rank])
        return grad[start : start + ctx.sizes[rank]], None, None


def _check_gather_input(tensor: object, what: str, group, name: str = "tensor") -> None:
    """The gather's own checks, before its first exchange: a rank that refuses its tensor still takes part in that
    exchange (refusals_joined), so the other ranks raise too rather than wait, or pair the exchange with this
    rank's next call."""
    with refusals_joined(group, tensor):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        _check_dense(name, tensor)
        if tensor.device.type == "meta":  # (its sizes' exchange read nothing back: Tensor.item() failed, unjoined)
            raise ValueError(f"{name} is on the meta device: {what} exchanges its values")
        if tensor.dim() == 0:
            raise ValueError(f"{name} must have at least one dimension (the rows concatenated over ranks), "
                             "got a 0-d tensor")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{what} needs torch.distributed to be initialised (init_process_group)")


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenation of ``tensor`` over the ranks of ``group`` (first dimensions may differ), differentiable.

    Backward gives this rank the sum over ranks of the gradients with respect to its slice (naive GatherLayer
    implementations return only the local gradient, which is wrong when every rank's loss uses every slice).
    The ranks must agree on the shape past the first dimension and on the dtype (ValueError on every rank).
    ``group``: a process group, None (the default group) or "world" (the same, as the losses take it).
    """
    group = _function_group(group, "group")
    _check_gather_input(tensor, "all_gather_with_grad", group)
    return _AllGatherWithGrad.apply(tensor, group, _exchange_sizes(tensor, group, "tensor"))


def gather_with_local_first(tensor: torch.Tensor, group=None, *, name: str = "tensor", **agree) -> torch.Tensor:
    """The concatenation over ranks with this rank's rows first (differentiable, all_gather_with_grad convention).

    Row i of the result is row i of ``tensor``, so losses that find an anchor's positive or itself at row i of the
    bank (in-batch InfoNCE, NT-Xent) work unchanged on the global batch. ``name`` is the argument that errors
    name; ``agree``: what else the ranks must agree on (the losses' call, normalize and temperature:
    _exchange_sizes).
    """
    group = _function_group(group, "group")
    _check_gather_input(tensor, "gather_with_local_first", group, name)
    sizes = _exchange_sizes(tensor, group, name, **agree)
    everything = _AllGatherWithGrad.apply(tensor, group, sizes)
    start = sum(sizes[: _world(group)[1]])
    end = start + tensor.shape[0]
    return torch.cat([everything[start:end], everything[:start], everything[end:]])


def gather_with_labels(features: torch.Tensor, labels: torch.Tensor | None, group, *, normalize: bool,
                       temperature, call: int | None = None, name: str = "features",
                       options: tuple[tuple[str, Any], ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """supcon_loss's exchange (and in-batch info_nce's with labels, call 11): every rank's features
    (differentiable, all_gather_with_grad convention) and their labels as int64 (no gradient), both with this
    rank's rows first. labels=None: each sample its own class, numbered over the global batch (the ranks must all
    pass labels or all pass None: two calls in _CALLS). ``options``: as in _exchange_sizes."""
    if call is None:
        call = 6 if labels is None else 5
    sizes = _exchange_sizes(features, group, name, call=call, normalize=normalize, temperature=temperature,
                            options=options)
    start = sum(sizes[: _world(group)[1]])
    end = start + features.shape[0]
    if labels is None:
        labels = torch.arange(start, end, device=features.device)
    everything = _AllGatherWithGrad.apply(features, group, sizes)
    labels = _all_gather_sized(labels.to(torch.int64), sizes, group)
    return (torch.cat([everything[start:end], everything[:start], everything[end:]]),
            torch.cat([labels[start:end], labels[:start], labels[end:]]))


class _ShardedNegativeLse(torch.autograd.Function):
    """lse_i = log sum over the whole (sharded) bank of e^{s a_hat_i . n_hat_k}, for the gathered anchors.

    Forward: this rank's partial log-sum-exp of every gathered anchor against its shard (the fused kernel, the
    positive left out), combined over ranks. Backward: the gradient reaching lse is summed over ranks (each rank's
    loss uses its own anchors' entries), then the fused backward gives this shard's gradient and this shard's part
    of the anchors' gradient, which all_gather_with_grad's backward adds up over ranks. ``labels``: None, or (the
    gathered anchors' labels, the shard's labels), int64: a shard row of the anchor's label left out of its sum (in
    the kernels' tiles, as for a shared bank); a partial sum with every row left out is -inf, which the
    combination and the shard's share (_share) take as an empty shard.
    """

    @staticmethod
    def forward(ctx, anchors_all, shard, scale, normalize, group, labels):
        zeros = torch.zeros_like(anchors_all)  # no positive: loss = lse
        # (the op's optional tail: exclude_self, excluded, negative_mask, then the label pair)
        tail = () if labels is None else (False, None, None, *labels)
        if _backend.kernel_serves(anchors_all.device):
            _, lse_part, term = _fwd_op(
                anchors_all, zeros, shard, None, scale, normalize, False, bool(ctx.needs_input_grad[0]), *tail
            )
            term = term if term.numel() else None
        else:  # pragma: no cover - fallback without the extension
            from .reference import info_nce_core_reference

            with _autocast_off(anchors_all.device.type):  # the inputs' dtype, as the kernels
                _, lse_part = info_nce_core_reference(anchors_all, zeros, shard, None, scale, normalize, False, False,
                                                      None, _keep(labels))
            term = None
        parts = [torch.empty_like(lse_part) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, lse_part.contiguous(), group=group)
        lse = torch.logsumexp(torch.stack(parts), dim=0)
        if term is not None:
            # This shard's share of V_i = sum_k softmax_ik n_hat_k, relative to the whole bank's lse.
            term = term * _share(lse_part, lse).unsqueeze(1)
        # (a tensor scale, under torch.compile: saved as a tensor)
        tensor_scale = (scale,) if isinstance(scale, torch.Tensor) else ()
        ctx.save_for_backward(anchors_all, shard, lse, term if term is not None else lse.new_empty(0),
                              *(labels or ()), *tensor_scale)
        ctx.scale, ctx.normalize, ctx.group = None if tensor_scale else scale, normalize, group
        ctx.labelled = labels is not None
        # As the op gives it (float64 from the CPU kernel): rounded to float32 it was off by eps |lse|, which the
        # loss softplus(lse - l_0) of a dominant negative keeps (2.4e-4 relative at logits 3e4).
        return lse.clone()

    @staticmethod
    def backward(ctx, grad_lse):
        _ops.refuse_double_backward()
        anchors_all, shard, lse, term, *rest = ctx.saved_tensors
        labels, tensor_scale = (tuple(rest[:2]), rest[2:]) if ctx.labelled else (None, rest)
        scale = tensor_scale[0] if tensor_scale else ctx.scale
        grad_lse = grad_lse.contiguous().clone()
        dist.all_reduce(grad_lse, op=dist.ReduceOp.SUM, group=ctx.group)
        mask = [bool(ctx.needs_input_grad[0]), False, bool(ctx.needs_input_grad[1])]
        if not any(mask):
            return None, None, None, None, None, None
        if not _backend.kernel_serves(anchors_all.device):
            ga, gn = _reference_backward(grad_lse, anchors_all, shard, lse, scale, ctx.normalize, mask, _keep(labels))
            return ga, gn, None, None, None, None
        # (the op's optional tail: exclude_self, check_indices, loss, excluded, negative_mask, then the label pair)
        tail = () if labels is None else (False, False, None, None, None, *labels)
        ga, _, gn = _bwd_op(
            grad_lse, anchors_all, torch.zeros_like(anchors_all), shard, None, lse, term, scale, ctx.normalize, False,
            mask, *tail,
        )
        return (ga if mask[0] else None), (gn if mask[2] else None), None, None, None, None


def _keep(labels: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor | None:
    """The reference's mask (B_all, K_r) for a label pair: True where the shard row's label differs."""
    return None if labels is None else labels[1][None, :] != labels[0][:, None]


class sharded_negative_lse:
    """This rank's anchors' log-sum-exps over a bank sharded over the ranks, at scales factor / temperature
    (debiased_info_nce's R at (1 + beta) / t and beta / t): ``lse = sharded_negative_lse(a, shard, t, normalize,
    group, call=...)`` exchanges the sizes and gathers the anchors once; ``lse(factor)`` is (B_r,), differentiable
    (the anchors' gradient summed over ranks, the shard's from every rank's anchors: _ShardedNegativeLse);
    ``lse.bank_rows`` is the whole bank's K. ``call`` tells the ranks apart (_CALLS: the number of lse calls each
    will make must agree); ``options`` ((name, value), ...): what else they must agree on (beta, tau_plus)."""

    def __init__(self, anchors: torch.Tensor, shard: torch.Tensor, temperature, normalize: bool, group, *,
                 call: int, options: tuple[tuple[str, Any], ...] = ()) -> None:
        self.scale = _scale_of(temperature, anchors.device)
        sizes = _exchange_sizes(anchors, group, "anchors (cast to the dtype of negatives)", call=call,
                                backward={"anchors or negatives": _needs_grad(anchors) or _needs_grad(shard)},
                                normalize=normalize, temperature=temperature, options=options)
        # the shards' sizes (they may differ; the same row shape and dtype on every rank)
        self.bank_rows = sum(_exchange_sizes(shard, group, "negatives (this rank's shard)", call=call,
                                             normalize=normalize, temperature=temperature, gathered=False))
        self.anchors_all = _AllGatherWithGrad.apply(anchors, group, sizes)
        self.start = sum(sizes[: _world(group)[1]])
        self.rows = anchors.shape[0]
        self.shard, self.normalize, self.group = shard, normalize, group

    def __call__(self, factor: float) -> torch.Tensor:
        lse = _ShardedNegativeLse.apply(self.anchors_all, self.shard, self.scale * factor, self.normalize, self.group,
                                        None)
        return lse[self.start : self.start + self.rows]


def _share(lse_part: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """d lse / d lse_part = e^(lse_part - lse): this shard's share of each anchor's softmax mass; 0 where the whole
    bank is empty (lse = -inf: e^(-inf - -inf) would be NaN)."""
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), torch.exp(lse_part - lse))


def _reference_backward(grad_lse, anchors_all, shard, lse, scale, normalize, mask, keep=None):
    """The sharded backward without the extension: this shard's partial log-sum-exp recomputed by the reference
    (materialised logits) and differentiated, weighted by the shard's share."""
    from .reference import info_nce_core_reference

    with torch.enable_grad(), torch.autocast(anchors_all.device.type, enabled=False):
        a = anchors_all.detach().requires_grad_(mask[0])
        n = shard.detach().requires_grad_(mask[2])
        _, lse_part = info_nce_core_reference(a, torch.zeros_like(a), n, None, scale, normalize, False, False, None,
                                              keep)
        wanted = [x for x, m in ((a, mask[0]), (n, mask[2])) if m]
        grads = iter(torch.autograd.grad(lse_part, wanted, grad_lse * _share(lse_part.detach(), lse)))
    return (next(grads) if mask[0] else None), (next(grads) if mask[2] else None)


def info_nce_sharded(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float | torch.Tensor = 0.1,
    *,
    process_group=None,
    normalize: bool = True,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
    negative_labels: torch.Tensor | None = None,
    decoupled: bool = False,
) -> torch.Tensor:
    """InfoNCE of this rank's anchors against a bank sharded over the ranks of ``process_group``.

    Args:
        anchors, positives: (B_r, d) this rank's batch (B_r may differ across ranks).
        negatives: (K_r, d) this rank's shard of the bank (K_r may differ, and may be 0).
        process_group: the group (None or "world": the default group).
        temperature, normalize, reduction: as in :func:`contrastbound.info_nce` (a learnable temperature is not
            supported here).
        labels, negative_labels: both or neither: integer labels (B_r,) of this rank's anchors and (K_r,) of its
            shard's rows (a queue's, :class:`contrastbound.NegativeQueue` with ``labels=True``). A bank row whose
            label equals the anchor's is left out of that anchor's sum, on every rank's shard (the anchors' labels
            are gathered with them; each shard's rows are tested in the kernels' tiles, O(B + K) memory). Every
            rank passes labels or none does.
        decoupled: leave the positive out of the denominator (DCL, as in :func:`contrastbound.info_nce`; every
            rank passes the same value). An anchor whose every bank row is left out has loss -inf.

    Returns rank r's loss over its own anchors against the concatenated bank: equal to the single-process
    ``info_nce(anchors, positives, cat(all shards))``. Gradients: anchors and positives get those of this local
    loss; a shard gets the sum over ranks of each rank's loss gradient with respect to it (W times the gradient
    of the mean of the ranks' losses: right under DDP's averaging, to be scaled by 1 / W for a shard that nothing
    averages).
    """
    process_group = _function_group(process_group)
    with refusals_joined(process_group, anchors):  # (a refusal on some ranks only: every rank raises)
        anchors, positives = _check_features(anchors, positives)
        negatives = _check_tensor("negatives", negatives, 2, "(K_r, d): this rank's shard of a shared bank")
        if negatives.shape[1] != anchors.shape[1]:
            raise ValueError(
                f"negatives must have feature size d = {anchors.shape[1]}, got shape {tuple(negatives.shape)}")
        _check_device("negatives", negatives, "anchors", anchors)  # (the kernel's own check came after the exchange)
        pair = _shard_labels(anchors, negatives, labels, negative_labels)
        t = _check_temperature(temperature)
        if isinstance(t, torch.Tensor):
            _check_temperature_has_value(t, anchors.device)  # (float() of a meta tensor: a RuntimeError, not joined)
            if t.requires_grad:
                raise ValueError(
                    "temperature must be a number with process_group (a learnable temperature is not supported)")
            t = float(t)
        normalize = _check_bool("normalize", normalize)
        reduction = _check_reduction(reduction)
        decoupled = _check_bool("decoupled", decoupled)
        _check_group("info_nce", anchors, positives, negatives)
        result = torch.promote_types(torch.promote_types(anchors.dtype, positives.dtype), negatives.dtype)
        a = _to_bank_dtype(anchors, negatives.dtype, normalize)
        p = _to_bank_dtype(positives, negatives.dtype, normalize)
        _check_scale_fits(t, negatives.dtype)
    # (a float; a tensor under torch.compile, as in info_nce: dynamo traces a float schedule's second value as a
    # symbolic float, and Python arithmetic on it here broke the traced graph)
    scale = _scale_of(t, a.device)
    call = 2 if pair is None else 12
    sizes = _exchange_sizes(a, process_group, "anchors (cast to the dtype of negatives)", call=call,
                            backward={"anchors or negatives": _needs_grad(a) or _needs_grad(negatives)},
                            normalize=normalize, temperature=t, options=(("decoupled", decoupled),))
    if decoupled:
        # the shards' sizes (ranks that got here agree on decoupled): a bank empty on every rank leaves each anchor
        # without a negative, refused on every rank, as info_nce refuses K = 0
        bank_rows = sum(_exchange_sizes(negatives, process_group, "negatives (this rank's shard)", call=call,
                                        normalize=normalize, temperature=t, gathered=False))
        if bank_rows == 0 and sum(sizes) > 0:
            raise ValueError("decoupled=True leaves the positive out of the denominator, so each anchor needs at "
                             "least one negative, but the bank's shards are empty on every rank of process_group")
    a_all = _AllGatherWithGrad.apply(a, process_group, sizes)
    if pair is not None:  # every rank's anchors' labels, in the gathered anchors' order
        pair = (_all_gather_sized(pair[0], sizes, process_group), pair[1])
    lse_neg_all = _ShardedNegativeLse.apply(a_all, negatives, scale, normalize, process_group, pair)
    start = sum(sizes[: _world(process_group)[1]])
    lse_neg = lse_neg_all[start : start + a.shape[0]]
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    a_hat, p_hat = a.to(acc), p.to(acc)
    if normalize:
        a_hat, p_hat = F.normalize(a_hat, dim=-1, eps=1e-12), F.normalize(p_hat, dim=-1, eps=1e-12)
    pos = scale * (a_hat * p_hat).sum(-1)
    # log(e^pos + e^lse_neg) - pos as softplus(lse_neg - pos): logaddexp(pos, lse_neg) - pos lost a small loss to
    # the rounding of the sum (eps |pos|; 15x the kernel's error for confident anchors at T = 0.05). The difference
    # is taken in lse's dtype (float64 on the CPU), then the loss is in the accumulation type, as the kernel's.
    # (decoupled: the negatives' log-sum-exp alone, lse_neg - pos)
    loss = lse_neg - pos.to(lse_neg.dtype) if decoupled else _softplus(lse_neg - pos.to(lse_neg.dtype))
    return _reduce(loss.to(acc), reduction, result)


def _shard_labels(anchors: torch.Tensor, shard: torch.Tensor, labels: object,
                  negative_labels: object) -> tuple[torch.Tensor, torch.Tensor] | None:
    """info_nce_sharded's labels: None, or (this rank's anchors' labels (B_r,), its shard's labels (K_r,)), int64."""
    if labels is None and negative_labels is None:
        return None
    if labels is None:
        raise ValueError("negative_labels was given without labels: pass this rank's anchors' labels (B_r,) as labels")
    if negative_labels is None:
        raise ValueError("labels was given without negative_labels: pass the labels of this rank's shard (K_r,) as "
                         "negative_labels")
    # (the shard's labels saved for backward: a copy of an inference tensor, a queue's made under inference_mode)
    return (_check_label_tensor("labels", labels, (anchors.shape[0],), "(B_r,), this rank's anchors'", anchors.device),
            _usable_for_autograd(_check_label_tensor("negative_labels", negative_labels, (shard.shape[0],),
                                                     "(K_r,), this rank's shard's", anchors.device)))
