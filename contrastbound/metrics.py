"""Retrieval accuracy of the contrastive task without the (B, K) logits: where each anchor's positive ranks among
its negatives, and the top-k accuracy that MoCo and SimCLR log (``accuracy(output, target, topk=(1, 5))`` over the
materialised ``[l_pos, l_neg]`` logits).

No custom kernel: the similarities are formed by torch's GEMMs over tiles of at most ``_TILE_ELEMENTS`` entries
(anchors x negatives), each compared with the anchors' positive similarity and counted, so memory is O(B + K +
tile) on every device torch runs on. The inputs and their checks are those of :func:`contrastbound.info_nce`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .functional import (
    _check_bool,
    _check_features,
    _check_indices,
    _check_negatives,
    _labels_as_exclusion,
)

__all__ = ["contrastive_accuracy", "positive_rank"]

# Entries of one similarity tile (anchors x negatives); an indexed or per-anchor tile also gathers its rows, d times
# that many numbers over the tile's columns (see _tile_shape).
_TILE_ELEMENTS = 1 << 20


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    """The promoted dtype of the features, at least float32 (half inputs are compared in float32, as the kernels
    accumulate them)."""
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _unit(x: torch.Tensor, dtype: torch.dtype, normalize: bool) -> torch.Tensor:
    """x in dtype, each row divided by max(||row||, 1e-12) when normalize (as the losses' x_hat)."""
    x = x.detach().to(dtype)
    if normalize:
        x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
    return x


def _tile_shape(B: int, K: int, per_row: int) -> tuple[int, int]:
    """(anchors, negatives) of a tile of at most _TILE_ELEMENTS similarities (of those divided by per_row where each
    similarity gathers a row of per_row numbers): up to 1024 anchors, the negatives filling the rest."""
    budget = max(1, _TILE_ELEMENTS // max(per_row, 1))
    cols = max(1, min(K, budget // max(1, min(B, 1024))))
    rows = max(1, min(B, budget // cols))
    return rows, cols


def _above(sim: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor | None, scratch: torch.Tensor) -> torch.Tensor:
    """(rows,) count of the tile's negatives that rank above the positive: a similarity strictly above it, or NaN;
    every negative where the positive's similarity is NaN. keep: False where a negative does not count. All three
    are the negatives where sim <= pos fails (a comparison with NaN is false): one comparison, into scratch (bool, of
    sim's shape)."""
    torch.le(sim, pos[:, None], out=scratch)
    if keep is None:
        return sim.shape[1] - scratch.sum(1)
    return keep.sum(1) - scratch.logical_and_(keep).sum(1)


def positive_rank(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    negative_indices: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    negative_labels: torch.Tensor | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    r"""How many of each anchor's negatives rank above its positive: (B,) int64, 0 where the positive ranks first.

    Negative k of anchor i ranks above its positive where ``a_i.n_ik > a_i.p_i`` (cosine similarities with
    ``normalize``, else dot products; the temperature does not change the order, so there is none). A tie goes to the
    positive, as ``argmax`` over the logits ``[l_pos, l_neg]`` (MoCo's target 0) gives it; ties within rounding
    (a negative equal to the positive up to an ulp) may fall either way, since the positive's similarity is a row's dot
    product and the negatives' come from a GEMM. A NaN similarity counts as above, and an anchor whose positive
    similarity is NaN ranks last (every negative counts): a diverged model does not score. Anchor i is right at top-k
    where ``positive_rank(...)[i] < k``.

    The arguments are those of :func:`contrastbound.info_nce` (modes, ``negative_indices`` with -1 for padding,
    ``negative_mask``, ``labels`` / ``negative_labels``, ``normalize``); negatives left out do not count. Half
    inputs are compared in float32. No gradient flows; nothing of size B x K is kept (tiles of at most 2^20
    similarities). SimCLR's task over 2N views (each view's positive is its other view, every other view a
    negative) is ``positive_rank(torch.cat([z1, z2]), torch.cat([z2, z1]), torch.cat([z1, z2]), labels=ids,
    negative_labels=ids)`` with ``ids = torch.arange(N).repeat(2)``: the labels leave out the view itself and its pair.
    """
    anchors, positives = _check_features(anchors, positives)
    negative_indices, negative_mask, pair = _labels_as_exclusion(anchors, negatives, negative_indices, negative_mask,
                                                                 labels, negative_labels)
    negatives, negative_indices, negative_mask = _check_negatives(anchors, negatives, negative_indices, negative_mask)
    normalize = _check_bool("normalize", normalize)
    B = anchors.shape[0]
    if negative_indices is not None:  # (the losses leave the range to the op: checked here, one read-back)
        negative_indices = _check_indices("negative_indices", negative_indices, tuple(negative_indices.shape),
                                          "(B, K)", negatives.shape[0], "M", anchors.device, padding=True)
    with torch.no_grad():
        dtype = _compute_dtype(anchors, positives, *(() if negatives is None else (negatives,)))
        a, p = _unit(anchors, dtype, normalize), _unit(positives, dtype, normalize)
        pos = (a * p).sum(1)
        rank = torch.zeros(B, dtype=torch.int64, device=anchors.device)
        if negatives is None:
            _rank_shared(a, pos, p, None, normalize, negative_mask, pair, True, rank)
        elif negative_indices is not None:
            _rank_indexed(a, pos, negatives, negative_indices, dtype, normalize, rank)
        elif negatives.dim() == 3:
            _rank_per_anchor(a, pos, negatives, dtype, normalize, rank)
        else:
            _rank_shared(a, pos, negatives, dtype, normalize, negative_mask, pair, False, rank)
    return rank


def _rank_shared(a, pos, bank, dtype, normalize, mask, pair, in_batch, rank) -> None:
    """A bank (K, d) shared by every anchor (in_batch: the positives, already unit rows in the compute dtype, the
    diagonal left out). The bank is read tile by tile, converted and normalised per tile (no copy of it); the
    similarities and their comparison go to buffers made once (large fresh allocations cost page faults per tile)."""
    B, K = a.shape[0], bank.shape[0]
    rows, cols = _tile_shape(B, K, 1)
    sim_buf = a.new_empty(min(B, rows) * min(K, cols))
    le_buf = torch.empty(sim_buf.shape, dtype=torch.bool, device=a.device)
    for k0 in range(0, K, cols):
        k1 = min(K, k0 + cols)
        tile = bank[k0:k1] if dtype is None else _unit(bank[k0:k1], dtype, normalize)
        for i0 in range(0, B, rows):
            i1 = min(B, i0 + rows)
            keep = None if mask is None else mask[i0:i1, k0:k1]
            if pair is not None:
                differ = pair[1][k0:k1][None, :] != pair[0][i0:i1, None]
                keep = differ if keep is None else keep & differ
            if in_batch:
                rows_i = torch.arange(i0, i1, device=a.device)[:, None]
                off_diagonal = rows_i != torch.arange(k0, k1, device=a.device)[None, :]
                keep = off_diagonal if keep is None else keep & off_diagonal
            n = (i1 - i0) * (k1 - k0)
            sim = torch.mm(a[i0:i1], tile.T, out=sim_buf[:n].view(i1 - i0, k1 - k0))
            rank[i0:i1] += _above(sim, pos[i0:i1], keep, le_buf[:n].view(i1 - i0, k1 - k0))


def _rank_per_anchor(a, pos, negatives, dtype, normalize, rank) -> None:
    """negatives (B, K, d): anchor i's own K rows, tile by tile of anchors and negatives."""
    B, K, d = negatives.shape
    rows, cols = _tile_shape(B, K, d)
    for i0 in range(0, B, rows):
        i1 = min(B, i0 + rows)
        for k0 in range(0, K, cols):
            k1 = min(K, k0 + cols)
            tile = _unit(negatives[i0:i1, k0:k1], dtype, normalize)
            sim = torch.bmm(tile, a[i0:i1, :, None]).squeeze(-1)
            rank[i0:i1] += _above(sim, pos[i0:i1], None, torch.empty_like(sim, dtype=torch.bool))


def _rank_indexed(a, pos, bank, indices, dtype, normalize, rank) -> None:
    """Rows indices[i] (-1: padding) of bank (M, d), gathered tile by tile (no (B, K, d) copy)."""
    B, K = indices.shape
    if K == 0 or bank.shape[0] == 0:  # (no row to gather: every entry is padding)
        return
    rows, cols = _tile_shape(B, K, bank.shape[1])
    for i0 in range(0, B, rows):
        i1 = min(B, i0 + rows)
        for k0 in range(0, K, cols):
            k1 = min(K, k0 + cols)
            idx = indices[i0:i1, k0:k1]
            tile = _unit(bank[idx.clamp_min(0)], dtype, normalize)
            sim = torch.bmm(tile, a[i0:i1, :, None]).squeeze(-1)
            rank[i0:i1] += _above(sim, pos[i0:i1], idx >= 0, torch.empty_like(sim, dtype=torch.bool))


def _check_topk(topk: object) -> tuple[list[int], bool]:
    """(the k's, whether one int was given)."""
    single = isinstance(topk, int) and not isinstance(topk, bool)
    ks = [topk] if single else topk
    if not isinstance(ks, Sequence) or isinstance(ks, str) or len(ks) == 0 or any(
            not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"topk must be a positive int or a non-empty sequence of them (e.g. (1, 5)), got {topk!r}")
    return list(ks), single


def contrastive_accuracy(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    topk: int | Sequence[int] = (1, 5),
    negative_indices: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    negative_labels: torch.Tensor | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    r"""Top-k accuracy of the contrastive task: the fraction of anchors whose positive ranks among the k most similar
    of the positive and its negatives (:func:`positive_rank` ``< k``).

    Returns a float32 tensor on the anchors' device: shape (len(topk),) for a sequence, 0-d for an int (fractions
    in [0, 1]; MoCo's ``accuracy`` gives percentages; NaN for B = 0). The other arguments, the tie rule (ties go to
    the positive, as argmax over ``[l_pos, l_neg]``) and NaN handling are those of :func:`positive_rank`. No gradient.
    """
    ks, single = _check_topk(topk)
    rank = positive_rank(anchors, positives, negatives, negative_indices=negative_indices,
                         negative_mask=negative_mask, labels=labels, negative_labels=negative_labels,
                         normalize=normalize)
    k = torch.tensor(ks, device=rank.device)
    acc = (rank[None, :] < k[:, None]).float().mean(1)
    return acc[0] if single else acc
