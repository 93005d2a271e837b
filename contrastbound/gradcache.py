"""Gradient caching (Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", 2021):
a contrastive step over a batch whose encoder activations do not fit in memory at once.

The fused losses hold O(B + K) memory, but a training step also holds the encoder's activations for the whole
batch, and for a large encoder those bound the batch (and so the in-batch negatives) long before the logits would.
:func:`grad_cache` splits the step into three passes so that only one chunk's activations exist at a time:

1. the encoders run over the batch chunk by chunk without a graph, giving the features (B, d);
2. the loss runs once over all features (the fused losses: O(B + K)) and its backward gives d loss / d features;
3. each chunk runs again with a graph and its features' backward takes that chunk's slice of the cached gradient,
   so parameter gradients accumulate chunk by chunk.

The gradients are those of the direct step (the encoders over the whole batch with a graph, the loss, its backward)
up to rounding, for any encoder whose output for a sample does not depend on the other samples of its chunk. The
random state is replayed (the CPU's, and once CUDA is initialised that of the current CUDA device and of every
device the inputs and the encoder modules' parameters are on), so dropout draws the same masks in pass 3 as in
pass 1; those are the masks of draws made chunk by chunk, which on CUDA, and in a torch.compile'd encoder (a seed
drawn per call), differ from one draw over the whole batch (the same distribution, other samples). BatchNorm in
training mode depends on the chunk (its statistics are per chunk, and its running statistics are updated in both
passes): use a per-sample norm (LayerNorm, GroupNorm) or eval-mode BatchNorm. The cost is one more encoder forward
per step.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .functional import _check_int

__all__ = ["grad_cache"]


def _tensor_leaves(batch: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        return [("", batch)]
    if isinstance(batch, Mapping):
        return [(f"[{key!r}]", v) for key, v in batch.items() if isinstance(v, torch.Tensor)]
    if isinstance(batch, (tuple, list)):
        return [(f"[{i}]", v) for i, v in enumerate(batch) if isinstance(v, torch.Tensor)]
    return []


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tensor(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    return False


def _batch_size(batch: Any, where: str) -> int:
    """The common length along dim 0 of the batch's tensors (a tensor, or a tuple / list / dict holding tensors)."""
    if not isinstance(batch, (torch.Tensor, Mapping, tuple, list)):
        raise TypeError(
            f"{where} must be a tensor, or a tuple / list / dict holding tensors (split along dim 0), "
            f"got {type(batch).__name__}"
        )
    if not isinstance(batch, torch.Tensor):
        values = batch.items() if isinstance(batch, Mapping) else enumerate(batch)
        for key, v in values:
            if isinstance(v, (Mapping, tuple, list)) and _holds_tensor(v):
                shown = f"[{key!r}]" if isinstance(batch, Mapping) else f"[{key}]"
                raise ValueError(
                    f"{where}{shown} is a {type(v).__name__} holding tensors; grad_cache splits the tensors of a "
                    "tensor or of a flat tuple / list / dict (give them at the top level, or wrap the encoder)"
                )
    leaves = _tensor_leaves(batch)
    if not leaves:
        raise ValueError(f"{where} holds no tensor to split into chunks along dim 0")
    sizes = {}
    for key, t in leaves:
        if t.dim() == 0:
            raise ValueError(f"{where}{key} is a 0-dim tensor; every tensor of a batch needs a batch dimension (dim 0)")
        if t.layout != torch.strided:
            raise ValueError(f"{where}{key} has layout {t.layout}; grad_cache slices rows of dense (strided) tensors")
        sizes[key] = t.shape[0]
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{where}{key}: {n}" for key, n in sizes.items())
        raise ValueError(f"the tensors of {where} must have the same size along dim 0 (the batch); got {listed}")
    return next(iter(sizes.values()))


def _chunk(batch: Any, start: int, stop: int) -> Any:
    """Rows start:stop of every tensor in the batch (views); other values are passed to every chunk as they are."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {k: v[start:stop] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    values = [v[start:stop] if isinstance(v, torch.Tensor) else v for v in batch]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple takes its fields one by one
        return type(batch)(*values)
    return type(batch)(values)


def _with_leaves(batch: Any, made: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """The batch with each tensor that requires grad and is not a leaf (an embedding layer's inputs_embeds, slices of
    one upstream output) replaced by a leaf copy (detached, requiring grad), recorded in made (id -> (tensor, leaf);
    one leaf per tensor however often it is given). Pass 3's chunks backward into the leaves, and one backward at the
    end carries their gradients into the graph that made the tensors: run per chunk, the first chunk's backward freed
    that graph and the second raised "Trying to backward through the graph a second time"."""
    def leaf(v: Any) -> Any:
        if not isinstance(v, torch.Tensor) or not v.requires_grad or v.grad_fn is None:
            return v
        if id(v) not in made:
            made[id(v)] = (v, v.detach().requires_grad_(True))
        return made[id(v)][1]

    if isinstance(batch, torch.Tensor):
        return leaf(batch)
    if isinstance(batch, Mapping):
        return {k: leaf(v) for k, v in batch.items()}
    values = [leaf(v) for v in batch]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*values)
    return type(batch)(values)


def _call(encoder: Callable, chunk: Any) -> Any:
    if isinstance(chunk, Mapping):
        return encoder(**chunk)
    if isinstance(chunk, (tuple, list)):
        return encoder(*chunk)
    return encoder(chunk)


class _RandomState:
    """The CPU generator's state and the given CUDA devices': captured before a chunk's first forward and restored
    before its replay, so that dropout draws the same masks in both."""

    def __init__(self, cuda_devices: list[int]) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = [(i, torch.cuda.get_rng_state(i)) for i in cuda_devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for i, state in self.cuda:
            torch.cuda.set_rng_state(state, i)


def _cuda_devices(encoders: list[Callable], inputs: Sequence[Any]) -> list[int]:
    """The CUDA devices whose generators the step may draw from: those of the inputs' tensors and of the encoder
    modules' parameters, and the current device, once CUDA is initialised (torch.utils.checkpoint likewise replays
    its inputs' devices rather than every device of the node)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return []
    devices = {torch.cuda.current_device()}
    for x in inputs:
        devices.update(t.device.index for _, t in _tensor_leaves(x) if t.is_cuda)
    for e in {id(e): e for e in encoders}.values():
        if isinstance(e, torch.nn.Module):
            devices.update(p.device.index for p in e.parameters() if p.is_cuda)
    return sorted(devices)


def _chunk_sizes(chunk_size: int | Sequence[int], n: int) -> list[int]:
    per_input = isinstance(chunk_size, Sequence) and not isinstance(chunk_size, str)
    sizes = list(chunk_size) if per_input else [chunk_size] * n
    if len(sizes) != n:
        raise ValueError(f"chunk_size has {len(sizes)} entries for {n} inputs; give one int, or one per input")
    for i, c in enumerate(sizes):
        sizes[i] = _check_int(f"chunk_size[{i}]" if per_input else "chunk_size", c, 1, "a positive int")
    return sizes


def grad_cache(
    loss_fn: Callable[..., torch.Tensor],
    encoders: Callable | Sequence[Callable],
    inputs: Sequence[Any],
    *,
    chunk_size: int | Sequence[int],
) -> torch.Tensor:
    """Run a contrastive training step's forward and backward over a large batch, ``chunk_size`` rows of encoder
    activations at a time (gradient caching, Gao et al. 2021); returns the loss, detached.

    ``loss_fn(*features)`` is called once on the features of all inputs, ``features[i] = encoders[i](inputs[i])``
    computed chunk by chunk, and must return a scalar. After the call the encoders' parameters (and ``loss_fn``'s,
    such as a learnable temperature, and any input that requires grad) hold the gradients of that loss, accumulated
    into ``.grad`` as ``loss.backward()`` would: call ``optimizer.step()`` next. Gradients equal the direct step's
    up to rounding when each sample's features depend on that sample alone (dropout is replayed; training-mode
    BatchNorm is not per sample: see the module's docstring, ``contrastbound.gradcache``).

    Args:
        loss_fn: features -> scalar loss, e.g. ``contrastbound.nt_xent`` or ``lambda zi, zt: clip(zi, zt)``; may be
            a module with parameters (``ClipLoss``); captures what else it needs (labels, a bank).
        encoders: one callable per input, or one callable for all (SimCLR's two views of one encoder). A
            ``DistributedDataParallel`` module given as the encoder synchronises its gradients once, in its last
            chunk's backward (the others run under its ``no_sync``; a lambda around it synchronises every chunk);
            every rank must then split the same number of chunks.
        inputs: one batch per encoder: a tensor (``encoder(x)``), a tuple / list (``encoder(*x)``) or a dict
            (``encoder(**x)``, as tokenizers give). Its tensors are split along dim 0 and must agree in length;
            other values go to every chunk unchanged. A tensor may come from an upstream graph (inputs_embeds):
            its gradient, accumulated over the chunks, goes through that graph once at the end. A non-leaf tensor
            that an encoder captures instead (not given here) raises at the second chunk's backward.
        chunk_size: rows per encoder call (one int, or one per input); the last chunk may be shorter.

    Each encoder must return a tensor whose dim 0 is the chunk's length (wrap a model that returns a tuple or an
    output object: ``lambda **x: model(**x).pooler_output``).

    Example (CLIP at a batch of 32768 with towers that fit 512 rows at a time)::

        loss_fn = contrastbound.ClipLoss()
        loss = contrastbound.grad_cache(loss_fn, [image_tower, text_tower], [images, tokens], chunk_size=512)
        optimizer.step(); optimizer.zero_grad()
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if isinstance(inputs, (torch.Tensor, Mapping)) or not isinstance(inputs, Sequence) or isinstance(inputs, str):
        raise TypeError(
            f"inputs must be a list or tuple with one batch per encoder (e.g. [x] for one encoder), "
            f"got {type(inputs).__name__}"
        )
    n = len(inputs)
    if n == 0:
        raise ValueError("inputs is empty; give one batch per encoder")
    if isinstance(encoders, (list, tuple, torch.nn.ModuleList)):
        encoder_list = list(encoders)
        if len(encoder_list) != n:
            raise ValueError(
                f"encoders has {len(encoder_list)} entries for {n} inputs; give one encoder, or one per input"
            )
        for i, e in enumerate(encoder_list):
            if not callable(e):
                raise TypeError(f"encoders[{i}] must be callable, got {type(e).__name__}")
    elif isinstance(encoders, torch.nn.ModuleDict):
        raise TypeError("encoders is a ModuleDict, which has no forward; give list(encoders.values()) in the order "
                        "of inputs")
    elif callable(encoders):
        encoder_list = [encoders] * n
    else:
        raise TypeError(
            f"encoders must be a callable, or a list / tuple / ModuleList of them, got {type(encoders).__name__}"
        )
    sizes = _chunk_sizes(chunk_size, n)
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        raise RuntimeError(
            "grad_cache runs a backward pass, but gradients are disabled here (torch.no_grad / inference_mode); "
            "for the loss alone call loss_fn on the encoders' outputs"
        )
    batch_sizes = [_batch_size(x, f"inputs[{i}]") for i, x in enumerate(inputs)]
    bounds = [[(s, min(s + c, b)) for s in range(0, b, c)] for b, c in zip(batch_sizes, sizes)]
    for i, b in enumerate(batch_sizes):
        if b == 0:
            raise ValueError(f"inputs[{i}] has batch size 0; grad_cache needs at least one row per input")

    # pass 1: features without a graph, and the random state each chunk started from
    cuda_devices = _cuda_devices(encoder_list, inputs)
    states: list[list[_RandomState]] = []
    features = []
    with torch.no_grad():
        for i, (encoder, x) in enumerate(zip(encoder_list, inputs)):
            outs, starts = [], []
            for j, (lo, hi) in enumerate(bounds[i]):
                starts.append(_RandomState(cuda_devices))
                out = _call(encoder, _chunk(x, lo, hi))
                if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != hi - lo:
                    got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
                    raise TypeError(
                        f"encoders[{i}] must return a tensor with the chunk's {hi - lo} rows along dim 0, got {got} "
                        "(wrap a model that returns a tuple or an output object, e.g. lambda x: model(x)[0])"
                    )
                outs.append(out)
            states.append(starts)
            feats = torch.cat(outs) if len(outs) > 1 else outs[0]
            features.append(feats.detach().requires_grad_(feats.is_floating_point() or feats.is_complex()))

    # pass 2: the loss over all features, and its gradient with respect to them
    loss = loss_fn(*features)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor (reduction 'mean' or 'sum'), got {got}")
    if not loss.requires_grad:  # (the direct step's backward would raise here too)
        raise RuntimeError(
            "loss_fn's result does not require grad: it does not reach the features through autograd (computed "
            "under torch.no_grad, detached, or a non-differentiable op), so there is no gradient to cache"
        )
    loss.backward()
    after = _RandomState(cuda_devices)  # where the direct step leaves it: the encoders' draws, then the loss's

    # pass 3: each chunk again, with a graph, backward from its slice of the cached gradient
    replayed = [f.grad is not None for f in features]
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    inputs = [_with_leaves(x, made) if replayed[i] else x for i, x in enumerate(inputs)]
    backwards = 0  # (chunk backwards run so far)
    # a DDP encoder synchronises in the last chunk it runs backward for (its last input that is replayed)
    last_use = {id(e): i for i, e in enumerate(encoder_list) if replayed[i]}
    unsynced: dict[int, tuple[int, int]] = {}  # DDP encoder -> its last chunk whose backward ran under no_sync
    try:
        for i, (encoder, x) in enumerate(zip(encoder_list, inputs)):
            if not replayed[i]:
                continue  # the loss does not depend on these features
            grad = features[i].grad
            # (DDP's no_sync fails in a static graph's first iteration: there each chunk synchronises)
            no_sync = None if getattr(encoder, "static_graph", False) else getattr(encoder, "no_sync", None)
            any_graph = False
            for j, (lo, hi) in enumerate(bounds[i]):
                deferred = callable(no_sync) and not (last_use[id(encoder)] == i and j == len(bounds[i]) - 1)
                states[i][j].restore()
                with no_sync() if deferred else contextlib.nullcontext():
                    out = _call(encoder, _chunk(x, lo, hi))
                    if out.requires_grad:  # (a chunk may have no graph where others do: data-dependent paths)
                        any_graph = True
                        _chunk_backward(out, grad[lo:hi], i, backwards)
                        backwards += 1
                        if deferred:
                            unsynced[id(encoder)] = (i, j)
                        else:
                            unsynced.pop(id(encoder), None)
            if last_use.get(id(encoder)) == i and id(encoder) in unsynced:
                # The chunk meant to synchronise built no graph, so DDP reduced nothing: run the last chunk that
                # did once more, outside no_sync, with a zero gradient; its backward all-reduces what the chunks
                # accumulated (a silent divergence of the ranks' gradients otherwise)
                ii, jj = unsynced.pop(id(encoder))
                lo, hi = bounds[ii][jj]
                states[ii][jj].restore()
                out = _call(encoder, _chunk(inputs[ii], lo, hi))
                out.backward(torch.zeros_like(out))
            if not any_graph:
                warnings.warn(
                    f"grad_cache: no chunk of encoders[{i}]'s output needed a gradient when run again with a graph, "
                    "so nothing upstream of it gets one (no parameter requiring grad reached, or a reentrant "
                    "checkpoint whose inputs need no grad); for a frozen encoder, compute its features under "
                    "torch.no_grad() outside grad_cache and give them to loss_fn, which saves its second forward",
                    stacklevel=2,
                )
        if made:  # the non-leaf inputs' gradients, accumulated over the chunks, into the graph that made them
            pairs = [(t, leaf.grad) for t, leaf in made.values() if leaf.grad is not None]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
    finally:
        after.restore()
    return loss.detach()


def _chunk_backward(out: torch.Tensor, grad: torch.Tensor, i: int, earlier: int) -> None:
    """out.backward(grad), with the error of an encoder that reaches a graph built before grad_cache through a
    tensor it captures (not one given in inputs, which _with_leaves handles): the first chunk's backward freed it.
    earlier: how many chunk backwards ran before this one (of any input)."""
    try:
        out.backward(grad)
    except RuntimeError as e:
        if earlier == 0 or "backward through the graph a second time" not in str(e):
            raise
        raise RuntimeError(
            f"grad_cache: encoders[{i}] reaches a graph built before grad_cache through a tensor that requires grad "
            "and is not a leaf, captured by the encoder rather than given in inputs; an earlier chunk's backward "
            "freed that graph. Compute it inside the encoder (or detach it where no gradient should reach its "
            "graph); tensors given in inputs may be non-leaves (their gradients go through their graph once, after "
            "the chunks)"
        ) from e
