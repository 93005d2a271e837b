"""Retrieval accuracy of the contrastive task without the (B, K) logits: where each anchor's positive ranks among
its negatives, and the top-k accuracy that MoCo and SimCLR log (``accuracy(output, target, topk=(1, 5))`` over the
materialised ``[l_pos, l_neg]`` logits).

No custom kernel: the similarities are formed by torch's GEMMs over tiles of at most ``_TILE_ELEMENTS`` entries
(anchors x negatives), each compared with the anchors' positive similarity and counted, so memory is O(B + K +
tile) on every device torch runs on. The inputs and their checks are those of :func:`contrastbound.info_nce`.

Ties. The positive's similarity and a negative's are dot products formed by different calls (a row's, a GEMM's),
whose roundings differ: a negative equal to the positive (a duplicate key in a queue, a repeated caption in a
batch) may come out an ulp above or below it. A negative within the rounding bound of the two dot products,
``|a.n - a.p| <= c |a| (|n| + |p|)``, ``c = (d + 2) eps + 2 u`` (eps of the comparison's dtype; d eps bounds a dot
product's rounding in any summation order, 2 eps the normalisation's; u the rounding of the GEMM's inputs where torch
lets float32 GEMMs round them: 2^-11 for TF32, 2^-8 for bfloat16, else 0), is counted as tied with the positive,
not above it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .functional import (
    _autocast_off,
    _check_bool,
    _check_features,
    _check_indices,
    _check_int,
    _check_negative_mask,
    _check_negatives,
    _func_active,
    _labels_as_exclusion,
)

__all__ = ["contrastive_accuracy", "positive_rank"]

# Entries of one similarity tile (anchors x negatives), and of the tile's converted rows (negatives x d, or anchors x
# negatives x d where rows are gathered per anchor): see _tile_shape.
_TILE_ELEMENTS = 1 << 20


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    """The promoted dtype of the features, at least float32 (half inputs are compared in float32, as the kernels
    accumulate them)."""
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _wide(device: torch.device) -> torch.dtype:
    """float64, where the device has it (not MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _norms(x: torch.Tensor) -> torch.Tensor:
    """Row norms of x, (..., 1), summed in float64 for float32 x and kept so: the squares of float32 entries past ~1e19
    overflow float32 (every such row 0 once normalised, every similarity 0, every negative tied), and a float32 row's
    norm itself past ~3.4e38 (an infinite tie band). float64 rows overflow past entries of ~1e154. By blocks of rows
    where x is not already wide: vector_norm's dtype= widens the whole of x first (in-batch, a float64 copy of every
    anchor for a moment, twice an input's size)."""
    wide = torch.promote_types(x.dtype, _wide(x.device))
    if x.dtype == wide:
        return torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return _by_rows(lambda rows: torch.linalg.vector_norm(rows, dim=-1, keepdim=True, dtype=wide), x)


def _by_rows(fn, *xs: torch.Tensor, budget: int = 1 << 20) -> torch.Tensor:
    """fn(*xs) for xs of one leading size (rows), formed on blocks of about `budget` entries of xs[0] and joined
    along dim 0: fn's temporaries a block's size, not the inputs'. fn must treat each row on its own (each row's
    result is then the one fn gives the whole)."""
    x = xs[0]
    step = max(1, budget // max(1, x[0].numel())) if x.dim() > 1 and x.shape[0] > 0 else 0
    if step == 0 or x.shape[0] <= step:
        return fn(*xs)
    return torch.cat([fn(*(t[i : i + step] for t in xs)) for i in range(0, x.shape[0], step)])


def _unit(x: torch.Tensor, dtype: torch.dtype, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in dtype, each row divided by max(||row||, 1e-12) when normalize (as the losses' x_hat); the rows' norms
    after that, (..., 1) in float64 (1, or below for rows of norm under 1e-12, 0 for zero rows)). The division is a
    product with 1 / max(||row||, 1e-12) rounded to dtype: subnormal, a few bits short, only for rows of norm past
    ~1e37."""
    x = x.detach().to(dtype)
    norm = _norms(x)
    if not normalize:
        return x, norm
    floor = norm.clamp_min(1e-12)
    return x * (1 / floor).to(dtype), norm / floor


_PRECISION_ROUNDING = {"medium": 2.0 ** -8, "high": 2.0 ** -11, "bf16": 2.0 ** -8, "tf32": 2.0 ** -11}


def _gemm_rounding(dtype: torch.dtype, device: torch.device) -> float:
    """u: the rounding of a float32 GEMM's inputs that torch's settings allow on this device (2^-11: TF32; 2^-8:
    bfloat16), 0 where it multiplies in float32 (or float64): the global set_float32_matmul_precision, the backend's
    own fp32_precision (torch >= 2.9: torch.backends.cuda.matmul on a GPU, torch.backends.mkldnn.matmul on the CPU)
    and, on a GPU, the legacy allow_tf32 flag."""
    if dtype != torch.float32:
        return 0.0
    u = 0.0
    backend = getattr(torch.backends, "cuda" if device.type == "cuda" else "mkldnn", None)
    readers = (torch.get_float32_matmul_precision,
               lambda: getattr(getattr(backend, "matmul", None), "fp32_precision", None))
    for read in readers:
        try:  # (torch raises on reading the global setting where the old and new APIs were mixed)
            u = max(u, _PRECISION_ROUNDING.get(read(), 0.0))
        except (AttributeError, RuntimeError):
            pass
    if device.type == "cuda" and u == 0.0:
        try:
            u = 2.0 ** -11 if torch._C._get_cublas_allow_tf32() else 0.0
        except (AttributeError, RuntimeError):
            u = 2.0 ** -11  # (unknown: the wider band)
    return u


def _tile_shape(B: int, K: int, per_row: int, device_type: str = "cpu") -> tuple[int, int]:
    """(anchors, negatives) of a tile: at most _TILE_ELEMENTS similarities (16 times that on a GPU, where small
    tiles would cost a launch each for little work), up to 1024 anchors, and at most as many numbers of converted rows
    (per_row numbers per negative: d for a shared bank's tile; d per similarity, rows x negatives x d, where rows are
    gathered per anchor: pass per_row = -d then)."""
    budget = _TILE_ELEMENTS * (1 if device_type == "cpu" else 16)
    if per_row < 0:  # (gathered: rows x cols x d numbers)
        budget = max(1, budget // -per_row)
        cols = max(1, min(K, budget // max(1, min(B, 1024))))
        return max(1, min(B, budget // cols)), cols
    cols = max(1, min(K, budget // max(1, min(B, 1024), per_row)))
    return max(1, min(B, budget // cols)), cols


class _Counts:
    """Per anchor: kept negatives above the positive (beyond the tie band, or NaN; every one where the positive's
    similarity is not finite) and tied with it (within the band), accumulated tile by tile."""

    def __init__(self, a, p, a_norm, p_norm, use_buffers: bool):
        """a, p: the compared rows (B, d); a_norm, p_norm: their norms, (B, 1) float64 (from _unit)."""
        self.use_buffers = use_buffers
        d, dtype = a.shape[1], a.dtype
        self.c = (d + 2) * torch.finfo(dtype).eps + 2 * _gemm_rounding(dtype, a.device)
        pos = _by_rows(lambda u, v: (u * v).sum(1), a, p)  # (no (B, d) product: in-batch, an input's size)
        # a positive similarity that is not finite (an overflowed product, inf features) ranks last, as NaN does
        self.pos = torch.where(torch.isfinite(pos), pos, torch.full_like(pos, float("nan")))
        a_c = self.c * a_norm.squeeze(1)  # (float64: a norm past float32's range still gives a finite band)
        # the positive's part of the band, c |a| |p|, and the factor c |a| of a negative's |n|
        self.pos_band = (a_c * p_norm.squeeze(1)).to(dtype)
        self.a_c = a_c.to(dtype)
        self.big = torch.finfo(dtype).max
        # per block of anchors (keyed by its first row): (above, ties) summed over the tiles; out of place, so that
        # a torch.func transform's batched counts can add up
        self.parts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.B, self.device = a.shape[0], a.device

    def add(self, i0: int, i1: int, sim: torch.Tensor, n_norm: torch.Tensor, keep: torch.Tensor | None,
            scratch: tuple[torch.Tensor, ...] | None = None) -> None:
        """sim (rows, cols): anchors i0 .. i1 - 1 against a tile; n_norm: the tile's negatives' norms as compared,
        float64, (cols, 1) or (rows, cols, 1). scratch: two bool and two float buffers of sim's shape, or None."""
        pos, band = self.pos[i0:i1, None], self.pos_band[i0:i1, None]
        a_c = self.a_c[i0:i1, None]
        n = n_norm.squeeze(-1)
        if n.dim() == 1 and sim.device.type == "cpu" and self.use_buffers and not bool((n != 1).any()):
            # Unit rows only (normalised, none of norm under 1e-12: x / x is exactly 1): the band is one number per
            # anchor, c |a| (|p| + 1): two passes over the tile instead of four (a host check, free on the CPU; not
            # under a torch.func transform, which has no data-dependent branches).
            hi, lo = pos + band + a_c, pos - band - a_c
        else:
            n = n.clamp_max(self.big).to(sim.dtype)  # (a product past the range: inf, as the similarity)
            if n.dim() == 2:  # (gathered rows: the tile is rows x cols already)
                hi, lo = pos + band + a_c * n, pos - band - a_c * n
            elif scratch is None:
                hi, lo = torch.addr(pos + band, a_c[:, 0], n), torch.addr(pos - band, a_c[:, 0], n, alpha=-1)
            else:  # (the per-element bounds into buffers: a fresh multi-MiB tensor per tile costs page faults)
                hi = torch.addr(pos + band, a_c[:, 0], n, out=scratch[2])
                lo = torch.addr(pos - band, a_c[:, 0], n, alpha=-1, out=scratch[3])
        if scratch is None:
            not_above, tied = sim <= hi, sim >= lo
        else:
            not_above = torch.le(sim, hi, out=scratch[0])
            tied = torch.ge(sim, lo, out=scratch[1])
        tied.logical_and_(not_above)
        if keep is not None:
            not_above.logical_and_(keep)
            tied.logical_and_(keep)
            total = keep.sum(1, dtype=torch.int32)
        else:
            total = sim.shape[1]
        # above: every kept negative that is not <= hi (a comparison with NaN is false: NaN similarities, and all of
        # them where the positive's is NaN). Counted in int32 within a tile (a bool sum in int64 converted the whole
        # tile first: 5x slower), int64 across tiles.
        above = (total - not_above.sum(1, dtype=torch.int32)).long()
        ties = tied.sum(1, dtype=torch.int32).long()
        if i0 in self.parts:
            above, ties = above + self.parts[i0][0], ties + self.parts[i0][1]
        self.parts[i0] = (above, ties)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(above, ties), each (B,) int64 (0 for anchors no tile reached: no negatives)."""
        if not self.parts:
            zeros = torch.zeros(self.B, dtype=torch.int64, device=self.device)
            return zeros, zeros.clone()
        blocks = [self.parts[i0] for i0 in sorted(self.parts)]
        return torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks])


def _ranks(anchors, positives, negatives, negative_indices, negative_mask, labels, negative_labels, normalize):
    """(above, ties), each (B,) int64 (see _Counts): the checks of info_nce, then the tiles of the mode."""
    anchors, positives = _check_features(anchors, positives)
    negative_indices, negative_mask, pair = _labels_as_exclusion(anchors, negatives, negative_indices, negative_mask,
                                                                 labels, negative_labels)
    if isinstance(negatives, torch.Tensor) and negatives.dim() == 3 and negative_indices is None:
        # per-anchor negatives keep their mask as a mask (the losses' (B K, d) bank view is a copy of an expanded
        # tensor)
        negatives, _, _ = _check_negatives(anchors, negatives, None, None)
        if negative_mask is not None:
            negative_mask = _check_negative_mask(negative_mask, anchors, negatives.shape[1],
                                                 "(B, K) for negatives (B, K, d)")
    else:
        negatives, negative_indices, negative_mask = _check_negatives(anchors, negatives, negative_indices,
                                                                      negative_mask)
    normalize = _check_bool("normalize", normalize)
    if negative_indices is not None:  # (the losses leave the range to the op: checked here, one read-back)
        negative_indices = _check_indices("negative_indices", negative_indices, tuple(negative_indices.shape),
                                          "(B, K)", negatives.shape[0], "M", anchors.device, padding=True)
    dtype = _compute_dtype(anchors, positives, *(() if negatives is None else (negatives,)))
    # Autocast off: under a caller's torch.autocast (the MoCo step this is called in) the gathered modes' products
    # ran in bfloat16 / float16, outside the tie band, which is set by the compute dtype (8 of 256 ranks moved at
    # K = 400, d = 128; the shared bank's out= products were never autocast).
    with _autocast_off(anchors.device.type):
        (a, a_norm), (p, p_norm) = _unit(anchors, dtype, normalize), _unit(positives, dtype, normalize)
        # (torch.func transforms have no batching rule for the out= variants: fresh tensors there)
        counts = _Counts(a, p, a_norm, p_norm, use_buffers=not _func_active())
        if negatives is None:
            _rank_shared(counts, a, (p, p_norm), None, normalize, negative_mask, pair, True)
        elif negative_indices is not None:
            _rank_gathered(counts, a, negatives, negative_indices, None, dtype, normalize)
        elif negatives.dim() == 3:
            _rank_gathered(counts, a, negatives, None, negative_mask, dtype, normalize)
        else:
            _rank_shared(counts, a, negatives, dtype, normalize, negative_mask, pair, False)
        return counts.result()


def _rank_shared(counts: _Counts, a, bank, dtype, normalize, mask, pair, in_batch) -> None:
    """A bank (K, d) shared by every anchor (in_batch: the positives, already unit rows in the compute dtype, the
    diagonal left out). The bank is read tile by tile, converted and normalised per tile (no copy of it); the
    similarities and their comparisons go to buffers made once (large fresh allocations cost page faults per tile)."""
    in_batch_norms = None
    if in_batch:
        bank, in_batch_norms = bank
    B, K = a.shape[0], bank.shape[0]
    rows, cols = _tile_shape(B, K, a.shape[1], a.device.type)
    if counts.use_buffers:
        size = min(B, rows) * min(K, cols)
        sim_buf = a.new_empty(size)
        flags = [torch.empty(size, dtype=torch.bool, device=a.device) for _ in range(2)]
        flags += [a.new_empty(size) for _ in range(2)]  # (the per-element band's bounds, where it has one)
    for k0 in range(0, K, cols):
        k1 = min(K, k0 + cols)
        if in_batch:
            tile, n_norm = bank[k0:k1], in_batch_norms[k0:k1]
        else:
            tile, n_norm = _unit(bank[k0:k1], dtype, normalize)
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
            if counts.use_buffers:
                n = (i1 - i0) * (k1 - k0)
                shape = (i1 - i0, k1 - k0)
                sim = torch.mm(a[i0:i1], tile.T, out=sim_buf[:n].view(shape))
                counts.add(i0, i1, sim, n_norm, keep, tuple(f[:n].view(shape) for f in flags))
            else:
                counts.add(i0, i1, a[i0:i1] @ tile.T, n_norm, keep)


def _rank_gathered(counts: _Counts, a, negatives, indices, mask, dtype, normalize) -> None:
    """Per-anchor negatives (B, K, d) (mask: (B, K) or None), or rows indices[i] (-1: padding) of a bank (M, d),
    gathered tile by tile (no (B, K, d) copy)."""
    B, d = a.shape
    K = negatives.shape[1] if indices is None else indices.shape[1]
    if K == 0 or (indices is not None and negatives.shape[0] == 0):  # (no row to gather: every entry is padding)
        return
    rows, cols = _tile_shape(B, K, -d, a.device.type)
    for i0 in range(0, B, rows):
        i1 = min(B, i0 + rows)
        for k0 in range(0, K, cols):
            k1 = min(K, k0 + cols)
            if indices is None:
                raw = negatives[i0:i1, k0:k1]
                keep = None if mask is None else mask[i0:i1, k0:k1]
            else:
                idx = indices[i0:i1, k0:k1]
                raw = negatives[idx.clamp_min(0)]
                keep = idx >= 0
            tile, n_norm = _unit(raw, dtype, normalize)
            sim = torch.bmm(tile, a[i0:i1, :, None]).squeeze(-1)
            counts.add(i0, i1, sim, n_norm, keep)


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
    return_ties: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""How many of each anchor's negatives rank above its positive: (B,) int64, 0 where none does.

    Negative k of anchor i ranks above its positive where ``a_i.n_ik > a_i.p_i`` (cosine similarities with
    ``normalize``, else dot products; the temperature does not change the order, so there is none) by more than the
    two dot products' rounding bound, ``c |a_i| (|n_ik| + |p_i|)`` with ``c = (d + 2) eps`` (eps of float32, or
    float64 for float64 inputs: c = 1.55e-5 at d = 128, a band of 3.1e-5 for unit rows), plus ``2 u`` where torch
    lets float32 GEMMs round their inputs (u = 2^-11 for TF32: ``torch.set_float32_matmul_precision("high")``,
    CUDA's ``allow_tf32``, a backend's ``fp32_precision = "tf32"``; 2^-8 for bfloat16: ``"medium"``, ``"bf16"``); a
    negative within it is tied with the positive (a duplicate of it always is). With
    ``return_ties=True`` also the number of tied negatives, (B,) int64: MoCo's argmax over ``[l_pos, l_neg]`` gives a
    tie to the positive, so its top-1 is ``rank == 0``; random tie-breaking puts the positive at ``rank + j`` for j
    uniform in 0 .. ties (:func:`contrastive_accuracy` averages over it). A NaN similarity counts as above, and an
    anchor whose positive similarity is NaN or infinite has every negative above it.

    The arguments are those of :func:`contrastbound.info_nce` (its modes, ``negative_indices`` with -1 for padding,
    ``negative_mask``, ``labels`` / ``negative_labels``, ``normalize``; no ``process_group``); negatives left out do
    not count. Half inputs are compared in float32 (with ``normalize=False`` a product past float32's range gives inf
    or NaN). No gradient; nothing of size B x K is kept (tiles of at most 2^20 similarities, 2^24 on a GPU; no copy
    of the bank).
    SimCLR's task over 2N views (each view's positive its other view, every other view a negative) is
    ``positive_rank(z, torch.cat([z2, z1]), z, labels=ids, negative_labels=ids)`` with ``z = torch.cat([z1, z2])``
    and ``ids = torch.arange(N).repeat(2)``: the labels leave out the view itself and its pair. In-batch over several
    processes: gather every rank's positives (no gradient needed) as the bank and leave out each anchor's own row by
    its global index, ``positive_rank(a, p, gathered, labels=rank * B + torch.arange(B),
    negative_labels=torch.arange(len(gathered)))`` (equal ranks per anchor to in-batch over the whole batch).
    """
    return_ties = _check_bool("return_ties", return_ties)
    with torch.no_grad():
        above, ties = _ranks(anchors, positives, negatives, negative_indices, negative_mask, labels, negative_labels,
                             normalize)
    return (above, ties) if return_ties else above


def _check_topk(topk: object) -> tuple[list[int], bool]:
    """(the k's, whether one was given alone). Integers of any kind (numpy's, a 0-d integer tensor), not bool."""
    def as_k(k: object) -> int:
        return _check_int("topk", k, 1, "a positive int or a non-empty sequence of them (e.g. (1, 5))", below=None)

    if isinstance(topk, (str, bytes)) or not isinstance(topk, Sequence):
        return [as_k(topk)], True
    if len(topk) == 0:
        raise ValueError("topk must be a positive int or a non-empty sequence of them (e.g. (1, 5)), got an empty "
                         "sequence")
    return [as_k(k) for k in topk], False


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
    r"""Top-k accuracy of the contrastive task: the fraction of anchors whose positive is among the k most similar
    of the positive and its negatives, ties broken uniformly at random (in expectation, no draw).

    For anchor i with ``r`` negatives above its positive and ``t`` tied with it (:func:`positive_rank` with
    ``return_ties=True``) the positive is at place ``r + j``, j uniform in 0 .. t, so it is in the top k with
    probability ``clamp((k - r) / (t + 1), 0, 1)``; the result is the mean over anchors. Without ties that is
    MoCo's ``accuracy`` (as fractions, not percentages); a collapsed model (every similarity equal) scores chance,
    k / (K + 1), where argmax's ties-to-the-positive would give it 1.

    Returns a float32 tensor on the anchors' device: shape (len(topk),) for a sequence, 0-d for one k (NaN for B =
    0). ``topk``: a positive int or a non-empty sequence of them. The other arguments as in :func:`positive_rank`.
    No gradient.
    """
    ks, single = _check_topk(topk)
    above, ties = positive_rank(anchors, positives, negatives, negative_indices=negative_indices,
                                negative_mask=negative_mask, labels=labels, negative_labels=negative_labels,
                                normalize=normalize, return_ties=True)
    wide = _wide(above.device)  # (float64 where there is one: a k past int64's range compares)
    k = torch.tensor(ks, dtype=wide, device=above.device)
    chance = ((k[:, None] - above[None, :].to(wide)) / (ties[None, :].to(wide) + 1)).clamp(0, 1)
    acc = chance.mean(1).float()
    return acc[0] if single else acc
