"""Hard-negative mining from a bank without the (B, M) similarities: each anchor's k most similar rows of a bank (a
memory bank, a MoCo queue, a retrieval corpus), as indices that :func:`contrastbound.info_nce` takes as
``negative_indices``.

No custom kernel: the similarities are formed by torch's GEMMs over tiles of the bank (the tile shapes of
:mod:`contrastbound.metrics`), the rows left out are set to -inf in the tile, and a running top-k per anchor is
merged with the tile's own top-k, so memory is O(B k + tile) on every device torch runs on, and the bank is never
copied (each tile is converted and normalised on its own).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple

import torch

from .functional import (_autocast_off, _check_bool, _check_dense, _check_device, _check_indices, _check_int,
                         _check_label_tensor, _check_tensor)
from . import metrics as _metrics
from .metrics import _compute_dtype, _tile_shape, _unit, _wide

__all__ = ["MinedNegatives", "mine_hard_negatives"]


class MinedNegatives(NamedTuple):
    """The result of :func:`mine_hard_negatives`, in the order of ``torch.topk``'s."""

    values: torch.Tensor
    """(B, k): the similarities of the rows picked, most similar first; -inf where fewer than k rows were left."""
    indices: torch.Tensor
    """(B, k) int64: the bank rows picked; -1 (info_nce's padding) where fewer than k rows were left."""


def _check_max_similarity(bound: object, anchors: torch.Tensor) -> torch.Tensor | float | None:
    """None, a float (not NaN), or a floating tensor of shape () or (B,) on the anchors' device (detached)."""
    if bound is None:
        return None
    B = anchors.shape[0]
    if isinstance(bound, torch.Tensor):
        _check_dense("max_similarity", bound)
        if not bound.is_floating_point():
            raise TypeError(f"max_similarity must be a number or a floating tensor of shape () or (B,) = ({B},), got "
                            f"dtype {bound.dtype}")
        if bound.device != anchors.device:
            raise ValueError(f"max_similarity is on {bound.device} but the features are on {anchors.device}")
        if bound.dim() > 1 or (bound.dim() == 1 and bound.shape[0] != B):
            raise ValueError(f"max_similarity must have shape () or (B,) = ({B},), got {tuple(bound.shape)}")
        return bound.detach()
    if isinstance(bound, bool) or not isinstance(bound, Real):
        raise TypeError(f"max_similarity must be a number or a floating tensor of shape () or (B,) = ({B},), got "
                        f"{type(bound).__name__}")
    try:
        value = float(bound)
    except OverflowError:  # (an int or Fraction past float's range: beyond every similarity)
        value = math.inf if bound > 0 else -math.inf
    if value != value:  # (NaN; a comparison, not math.isnan, which a float traced as a symbol by torch.compile fails)
        raise ValueError("max_similarity must not be NaN (inf: no bound)")
    return value


def _rounded_down(bound: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor | float:
    """The largest value of dtype at most bound (NaN stays NaN): a similarity s of that dtype has s <= bound exactly
    where s <= the result, so that the comparison in dtype does not keep a row above a bound that dtype rounds up
    (0.5 - 1e-9 is 0.5 in float32)."""
    wide = torch.as_tensor(bound, dtype=torch.float64 if isinstance(bound, float) else None)
    low = wide.to(dtype)
    if torch.promote_types(wide.dtype, dtype) != dtype:  # (a narrower or equal bound converts exactly)
        low = torch.where(low.to(wide.dtype) > wide, torch.nextafter(low, torch.full_like(low, -math.inf)), low)
    return float(low) if isinstance(bound, float) else low


def _check_exclude(exclude: object, B: int, M: int, device: torch.device, check_range: bool) -> torch.Tensor | None:
    """exclude_indices as (B, E) int64: (B,) (one row per anchor, its positive's) or (B, E), -1 for padding."""
    if exclude is None:
        return None
    if not isinstance(exclude, torch.Tensor):
        raise TypeError(f"exclude_indices must be an int64 (or int32) tensor of shape (B,) or (B, E), got "
                        f"{type(exclude).__name__}")
    if exclude.dim() == 1:
        exclude = exclude[:, None] if exclude.shape[0] == B else exclude
    if exclude.dim() != 2 or exclude.shape[0] != B:
        raise ValueError(f"exclude_indices must have shape (B,) or (B, E) with B = {B}, got {tuple(exclude.shape)}")
    return _check_indices("exclude_indices", exclude, tuple(exclude.shape), "(B, E)", M, "M", device,
                          check_range=check_range, padding=True)


def mine_hard_negatives(
    anchors: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    *,
    normalize: bool = True,
    labels: torch.Tensor | None = None,
    bank_labels: torch.Tensor | None = None,
    exclude_indices: torch.Tensor | None = None,
    max_similarity: float | torch.Tensor | None = None,
) -> MinedNegatives:
    r"""Each anchor's k most similar rows of a bank: ``(values, indices)``, each (B, k), most similar first.

    The similarity is ``a_i . n_m`` of the rows L2-normalised with ``normalize`` (cosine, as the losses compare
    them; the temperature does not change the order, so there is none), else the plain dot product. A row is left
    out for anchor i where

    - ``labels[i] == bank_labels[m]`` (both given, integer tensors (B,) and (M,): the anchor's own class, the false
      negatives of a labelled bank),
    - m is in ``exclude_indices[i]`` ((B,) or (B, E) int64 / int32, -1 for padding: the anchor's own positive where it
      is a row of the bank, its other known positives),
    - the similarity is above ``max_similarity`` (a number, or a tensor (B,) per anchor: "positive-aware" mining
      leaves out rows more similar than a fraction of the positive's similarity, likely unlabelled positives,
      ``max_similarity=0.95 * cosine(a_i, p_i)``; a NaN in the tensor bounds nothing; compared exactly, the bound
      rounded down to the comparison's dtype), or
    - the similarity is -inf.

    Where fewer than k rows are left (a small bank, many left out) the rest of the row is ``-1`` in ``indices`` and
    -inf in ``values``: ``info_nce(anchors, positives, bank, negative_indices=indices)`` takes -1 as "no negative
    here". A NaN similarity (NaN or inf features) ranks above every number, as in ``torch.topk``, so a broken row is
    picked and shows in the loss rather than being hidden. Which of several rows with the k-th largest similarity
    is picked is unspecified (as in ``torch.topk``); the rows picked are ordered by similarity, then by index.

    ``anchors`` (B, d) and ``bank`` (M, d) are floating tensors on one device; half inputs are compared in float32
    (under ``torch.autocast`` too), and ``values`` has the promoted dtype of the two, at least float32. ``k`` >= 0
    (k > M pads). No gradient: the inputs are only read (no need to detach them; inference tensors are not copied).
    Nothing of size B x M is formed: tiles of at most 2^20 similarities (2^24 on a GPU; wider where k is large) are
    reduced to their top-k as they are made, so memory is O(B k + tile) and the time that of the (B, M) GEMM plus a
    top-k pass over the tiles (on the CPU only over the anchors a tile can still change).
    """
    # (checked under no_grad: _check_tensor would copy an inference tensor, say a corpus encoded under
    # torch.inference_mode, for autograd to save; nothing here is saved)
    with torch.no_grad():
        anchors, bank, k, normalize, pair, exclude, bound, _ = _checked(
            anchors, bank, k, normalize, labels, bank_labels, exclude_indices, max_similarity)
        if isinstance(bound, float) and torch.compiler.is_compiling():
            # a 0-d tensor rather than a float argument, which dynamo would specialise on (a graph per value of a
            # schedule; as functional._scale_of does for the temperature)
            bound = torch.ones((), dtype=_wide(anchors.device), device=anchors.device) * bound
        values, indices = _mine_op(anchors.detach(), bank.detach(), k, normalize, *(pair or (None, None)), exclude,
                                   bound if isinstance(bound, torch.Tensor) else None,
                                   bound if isinstance(bound, float) else None)
    return MinedNegatives(values, indices)


# One custom op (Python, every device): torch.compile traces the mining as one opaque node with static output shapes
# (its fake kernel), instead of unrolling the loop over tiles into the graph or breaking it at the host reads.
@torch.library.custom_op("contrastbound::mine_hard_negatives", mutates_args=())
def _mine_op(anchors: torch.Tensor, bank: torch.Tensor, k: int, normalize: bool, labels: torch.Tensor | None,
             bank_labels: torch.Tensor | None, exclude: torch.Tensor | None, bound: torch.Tensor | None,
             bound_value: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of mine_hard_negatives (exclude: (B, E) int64 or None; bound: a tensor () or (B,), or
    bound_value a number, or neither). A direct call is checked as the function is, the exclude range aside (an index
    out of range fails in the scatter)."""
    checked = _checked(anchors, bank, k, normalize, labels, bank_labels, exclude,
                       bound if bound is not None else bound_value, check_range=False)
    # (autocast off: under a caller's torch.autocast the tiles' GEMM ran in bfloat16 / float16, picking other rows
    # than the float32 comparison the docstring promises, and rounding the values against max_similarity)
    with torch.no_grad(), _autocast_off(anchors.device.type):
        return tuple(_mine(*checked))


@_mine_op.register_fake
def _(anchors, bank, k, normalize, labels, bank_labels, exclude, bound, bound_value):
    anchors, bank, k, *_, dtype = _checked(anchors, bank, k, normalize, labels, bank_labels, exclude,
                                           bound if bound is not None else bound_value, check_range=False)
    B = anchors.shape[0]
    return anchors.new_empty((B, k), dtype=dtype), anchors.new_empty((B, k), dtype=torch.int64)


def _checked(anchors, bank, k, normalize, labels, bank_labels, exclude_indices, max_similarity, check_range=True):
    """mine_hard_negatives' arguments checked: (anchors, bank, k, normalize, label pair, exclude, bound, dtype)."""
    anchors = _check_tensor("anchors", anchors, 2, "(B, d)")
    bank = _check_tensor("bank", bank, 2, "(M, d)")
    _check_device("bank", bank, "anchors", anchors)
    B, d = anchors.shape
    M = bank.shape[0]
    if bank.shape[1] != d:
        raise ValueError(f"bank must have shape (M, d) with the anchors' d = {d}, got {tuple(bank.shape)}")
    k = _check_int("k", k, 0, "a non-negative int (the negatives to pick per anchor)")
    normalize = _check_bool("normalize", normalize)
    if (labels is None) != (bank_labels is None):
        given, missing = ("labels", "bank_labels") if bank_labels is None else ("bank_labels", "labels")
        raise ValueError(f"{given} was given without {missing}: pass both (labels (B,), bank_labels (M,)) or neither")
    pair = None
    if labels is not None:
        pair = (_check_label_tensor("labels", labels, (B,), "(B,)", anchors.device),
                _check_label_tensor("bank_labels", bank_labels, (M,), "(M,)", anchors.device))
    bound = _check_max_similarity(max_similarity, anchors)
    exclude = _check_exclude(exclude_indices, B, M, anchors.device, check_range)
    return anchors, bank, k, normalize, pair, exclude, bound, _compute_dtype(anchors, bank)


def _unit_rows(x: torch.Tensor, dtype: torch.dtype, normalize: bool) -> torch.Tensor:
    """x in dtype, each row divided by max(its norm, 1e-12) with normalize (as the losses' x_hat): float32 rows on the
    CPU by a float32 norm where every row's is in [1e-18, 1e18] (squares neither overflow nor lose bits; a tenth of
    the cost of metrics._unit's float64 norm, which a read-back could not choose on a GPU), else as metrics._unit
    (zero and huge rows)."""
    if normalize and dtype == torch.float32 and x.device.type == "cpu":
        x = x.detach().to(dtype)
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        if bool(((norm >= 1e-18) & (norm <= 1e18)).all()):
            return x * (1 / norm.clamp_min(1e-12))
    return _unit(x, dtype, normalize)[0]


def _mine(anchors, bank, k, normalize, pair, exclude, bound, dtype) -> MinedNegatives:
    B, M = anchors.shape[0], bank.shape[0]
    device = anchors.device
    values = torch.full((B, k), -math.inf, dtype=dtype, device=device)
    indices = torch.full((B, k), -1, dtype=torch.int64, device=device)
    if B == 0 or k == 0 or M == 0:
        return MinedNegatives(values, indices)
    a = _unit_rows(anchors, dtype, normalize)
    rows, cols = _tile_shape(B, M, a.shape[1], device.type)
    if cols < min(M, 2 * k):  # (a tile narrower than k would spend more on merging than on its GEMM)
        cols = min(M, 2 * k)
        rows = max(1, min(rows, _metrics._TILE_ELEMENTS // cols))
    if bound is not None:
        bound = _rounded_down(bound, dtype)
    if isinstance(bound, torch.Tensor):
        bound = bound.reshape(-1, 1).expand(B, 1)
    # per block of anchors: the running (values, indices), and once k are held, the k-th value (NaN as above all)
    best: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    kth: dict[int, torch.Tensor] = {}
    skip_rows = device.type == "cpu"  # (a host read per tile: free on the CPU, a synchronisation on a GPU)
    for k0 in range(0, M, cols):
        k1 = min(M, k0 + cols)
        tile = _unit_rows(bank[k0:k1], dtype, normalize)
        for i0 in range(0, B, rows):
            i1 = min(B, i0 + rows)
            sim = a[i0:i1] @ tile.T
            out = None
            if pair is not None:
                out = pair[1][None, k0:k1] == pair[0][i0:i1, None]
            if exclude is not None:
                local = exclude[i0:i1] - k0
                hit = (local >= 0) & (local < k1 - k0)
                # (one spare column takes the misses: every write is True, so repeated places do not race)
                marks = torch.zeros(i1 - i0, k1 - k0 + 1, dtype=torch.bool, device=device)
                marks.scatter_(1, torch.where(hit, local, k1 - k0), True)
                out = marks[:, :-1] if out is None else out | marks[:, :-1]
            if bound is not None:
                above = sim > (bound if isinstance(bound, float) else bound[i0:i1])
                out = above if out is None else out | above
            if out is not None:
                sim.masked_fill_(out, -math.inf)
            if i0 in kth and skip_rows:
                # Once an anchor holds k rows, a tile changes them only where it has a value above the k-th (or a
                # NaN: amax gives NaN, and NaN <= x is false). After t tiles an anchor expects k / t such values,
                # so most rows of a late tile have none: their top-k (a pass 30x the amax's cost) is skipped.
                live = (~(sim.amax(1) <= kth[i0])).nonzero().squeeze(1)
                if live.numel() == 0:
                    continue
                if live.numel() < sim.shape[0]:
                    sim = sim.index_select(0, live)
            else:
                live = None
            v, j = sim.topk(min(k, k1 - k0), dim=1, sorted=False)
            j = j + k0
            if i0 in best:
                held_v, held_j = best[i0]
                if live is not None and live.numel() < held_v.shape[0]:
                    held_v, held_j = held_v.index_select(0, live), held_j.index_select(0, live)
                v, j = torch.cat([held_v, v], 1), torch.cat([held_j, j], 1)
                if v.shape[1] > k:
                    v, keep = v.topk(k, dim=1, sorted=False)
                    j = j.gather(1, keep)
                if live is not None and live.numel() < best[i0][0].shape[0]:
                    best[i0][0].index_copy_(0, live, v)
                    best[i0][1].index_copy_(0, live, j)
                    v, j = best[i0]
            best[i0] = (v, j)
            if v.shape[1] == k:
                kth[i0] = torch.where(v.isnan(), math.inf, v).amin(1)
    for i0, (v, j) in best.items():
        # ordered by similarity, then by index: a stable sort by value of the rows sorted by index (NaN first, as
        # torch.sort places it last ascending)
        j, order = j.sort(dim=1)
        v = v.gather(1, order)
        v, order = v.sort(dim=1, descending=True, stable=True)
        j = j.gather(1, order)
        j = torch.where(v == -math.inf, torch.full_like(j, -1), j)
        n = v.shape[1]
        values[i0:i0 + v.shape[0], :n] = v
        indices[i0:i0 + v.shape[0], :n] = j
    return MinedNegatives(values, indices)
