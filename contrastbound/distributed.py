"""InfoNCE across processes with torch.distributed (gloo on CPU, NCCL on GPU).

Two strategies:

* gather: :func:`all_gather_with_grad` concatenates a tensor over ranks; its backward gives each rank the sum over
  ranks of the gradients with respect to its slice, so every rank can use the global batch as in-batch negatives
  and DDP's averaging yields the gradient of the mean loss.
* shard: :func:`info_nce_sharded` (also ``info_nce(..., process_group=group)``) where each rank holds a shard of
  a bank too large for one device. Rank r's loss is its own anchors against the whole bank; ranks exchange
  anchors and per-anchor log-sum-exp partials (O(B d + B) per rank), never the bank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import _backend, _ops
from .functional import (
    _check_bool,
    _check_features,
    _check_reduction,
    _check_temperature,
    _check_tensor,
    _needs_reference,
    _reduce,
    _to_bank_dtype,
)


def _world(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def _all_gather_varying(tensor: torch.Tensor, group=None) -> tuple[torch.Tensor, list[int]]:
    """Concatenation over ranks of tensors whose first dimension may differ, and the sizes."""
    world, _ = _world(group)
    n = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    largest = max(sizes)
    padded = tensor
    if tensor.shape[0] < largest:
        pad = tensor.new_zeros((largest - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([tensor, pad])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sizes


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        out, sizes = _all_gather_varying(tensor, group)
        ctx.group, ctx.sizes = group, sizes
        return out

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss may depend on every slice: the gradient of a slice is the sum over ranks.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        _, rank = _world(ctx.group)
        start = sum(ctx.sizes[:rank])
        return grad[start : start + ctx.sizes[rank]], None


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenation of ``tensor`` over the ranks of ``group`` (first dimensions may differ), differentiable.

    Backward gives this rank the sum over ranks of the gradients with respect to its slice (naive GatherLayer
    implementations return only the local gradient, which is wrong when every rank's loss uses every slice).
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("all_gather_with_grad needs torch.distributed to be initialised (init_process_group)")
    return _AllGatherWithGrad.apply(tensor, group)


def gather_with_local_first(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """The concatenation over ranks with this rank's rows first (differentiable, all_gather_with_grad convention).

    Row i of the result is row i of ``tensor``, so losses that find an anchor's positive or itself at row i of the
    bank (in-batch InfoNCE, NT-Xent) work unchanged on the global batch.
    """
    everything = all_gather_with_grad(tensor, group)
    start = _offset(tensor.shape[0], group, tensor.device)
    end = start + tensor.shape[0]
    return torch.cat([everything[start:end], everything[:start], everything[end:]])


class _ShardedNegativeLse(torch.autograd.Function):
    """lse_i = log sum over the whole (sharded) bank of e^{s a_hat_i . n_hat_k}, for the gathered anchors.

    Forward: this rank's partial log-sum-exp of every gathered anchor against its shard (the fused kernel, the
    positive left out), combined over ranks. Backward: the gradient reaching lse is summed over ranks (each rank's
    loss uses its own anchors' entries), then the fused backward gives this shard's gradient and this shard's part
    of the anchors' gradient, which all_gather_with_grad's backward adds up over ranks.
    """

    @staticmethod
    def forward(ctx, anchors_all, shard, scale, normalize, group):
        zeros = torch.zeros_like(anchors_all)  # no positive: loss = lse
        if _backend.kernel_serves(anchors_all.device):
            _, lse_part, term = torch.ops.contrastbound.info_nce_fwd(
                anchors_all, zeros, shard, None, scale, normalize, False, bool(ctx.needs_input_grad[0])
            )
            term = term if term.numel() else None
        else:  # pragma: no cover - fallback without the extension
            from .reference import info_nce_core_reference

            _, lse_part = info_nce_core_reference(anchors_all, zeros, shard, None, scale, normalize, False)
            term = None
        parts = [torch.empty_like(lse_part) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, lse_part.contiguous(), group=group)
        lse = torch.logsumexp(torch.stack(parts), dim=0)
        if term is not None:
            # This shard's share of V_i = sum_k softmax_ik n_hat_k, relative to the whole bank's lse.
            term = term * torch.exp(lse_part - lse).unsqueeze(1)
        ctx.save_for_backward(anchors_all, shard, lse, term if term is not None else lse.new_empty(0))
        ctx.scale, ctx.normalize, ctx.group = scale, normalize, group
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        _ops.refuse_double_backward()
        anchors_all, shard, lse, term = ctx.saved_tensors
        grad_lse = grad_lse.contiguous().clone()
        dist.all_reduce(grad_lse, op=dist.ReduceOp.SUM, group=ctx.group)
        mask = [bool(ctx.needs_input_grad[0]), False, bool(ctx.needs_input_grad[1])]
        if not any(mask):
            return None, None, None, None, None
        if not _backend.kernel_serves(anchors_all.device):  # pragma: no cover
            raise RuntimeError("the sharded backward needs the compiled extension")
        ga, _, gn = torch.ops.contrastbound.info_nce_bwd(
            grad_lse, anchors_all, torch.zeros_like(anchors_all), shard, None, lse, term, ctx.scale, ctx.normalize,
            False, mask,
        )
        return (ga if mask[0] else None), (gn if mask[2] else None), None, None, None


def info_nce_sharded(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    *,
    process_group=None,
    temperature: float = 0.1,
    normalize: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """InfoNCE of this rank's anchors against a bank sharded over the ranks of ``process_group``.

    Args:
        anchors, positives: (B_r, d) this rank's batch (B_r may differ across ranks).
        negatives: (K_r, d) this rank's shard of the bank (K_r may differ, and may be 0).
        process_group: the group (None: the default group).
        temperature, normalize, reduction: as in :func:`contrastbound.info_nce` (a learnable temperature is not
            supported here).

    Returns rank r's loss over its own anchors against the concatenated bank: equal to the single-process
    ``info_nce(anchors, positives, cat(all shards))``. Gradients: anchors and positives get those of this local
    loss; a shard gets the sum over ranks of each rank's loss gradient with respect to it.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("info_nce with process_group needs torch.distributed to be initialised")
    anchors, positives = _check_features(anchors, positives)
    negatives = _check_tensor("negatives", negatives, 2, "(K_r, d): this rank's shard of a shared bank")
    if negatives.shape[1] != anchors.shape[1]:
        raise ValueError(f"negatives must have feature size d = {anchors.shape[1]}, got shape {tuple(negatives.shape)}")
    t = _check_temperature(temperature)
    if isinstance(t, torch.Tensor):
        if t.requires_grad:
            raise ValueError("temperature must be a number with process_group (a learnable temperature is not supported)")
        t = float(t)
    normalize = _check_bool("normalize", normalize)
    reduction = _check_reduction(reduction)
    if _needs_reference(anchors, positives, negatives):
        raise NotImplementedError(
            "forward-mode AD (torch.autograd.forward_ad) and torch.func transforms that differentiate (grad, vjp, "
            "jacrev, jvp, jacfwd) are not supported with process_group"
        )
    result = torch.promote_types(torch.promote_types(anchors.dtype, positives.dtype), negatives.dtype)
    a = _to_bank_dtype(anchors, negatives.dtype, normalize)
    p = _to_bank_dtype(positives, negatives.dtype, normalize)
    scale = 1.0 / t
    a_all = all_gather_with_grad(a, process_group)
    lse_neg_all = _ShardedNegativeLse.apply(a_all, negatives, scale, normalize, process_group)
    start = _offset(a.shape[0], process_group, a.device)
    lse_neg = lse_neg_all[start : start + a.shape[0]]
    acc = lse_neg.dtype
    a_hat, p_hat = a.to(acc), p.to(acc)
    if normalize:
        a_hat, p_hat = F.normalize(a_hat, dim=-1, eps=1e-12), F.normalize(p_hat, dim=-1, eps=1e-12)
    pos = scale * (a_hat * p_hat).sum(-1)
    loss = torch.logaddexp(pos, lse_neg) - pos
    return _reduce(loss, reduction, result)


def _offset(local_rows: int, group, device) -> int:
    """Where this rank's rows start in a concatenation over ranks."""
    world, rank = _world(group)
    n = torch.tensor([local_rows], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    return int(sum(int(s) for s in sizes[:rank]))
