"""Pure-PyTorch reference implementations.

They materialise the full (B, 1 + K) logits, so they are only for small problems: they are the oracle
that the kernels are tested against and the fallback when the compiled extension is missing.
Half-precision inputs are computed in float32 (or in ``compute_dtype`` when given).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-12  # the eps of torch.nn.functional.normalize, which the kernels reproduce



def _softplus(z: torch.Tensor) -> torch.Tensor:
    """log(1 + e^z): the loss softplus(lse_negatives - l_0) with a positive. F.softplus returns z itself above its
    threshold (20 by default), e^-20 = 2e-9 relative off: float64 needs 40."""
    return F.softplus(z, threshold=40.0)

def _compute_dtype(dtype: torch.dtype, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _gather_rows(n: torch.Tensor, negative_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, d) rows of n by index and the (B, K) bool of the real ones: -1 is padding (a zero row, to be
    masked out by the caller). index_select, not n[idx]: any other negative index raises instead of counting
    from the end (under vmap the callers cannot check the per-sample values first)."""
    valid = negative_indices != -1
    # a zero row in front for the padding (so an empty bank works too); -2 becomes -1 and M becomes M + 1: both
    # still out of range, and raise
    safe = torch.where(valid, negative_indices + 1, torch.zeros_like(negative_indices))
    padded = torch.cat([n.new_zeros(1, n.shape[-1]), n])
    rows = padded.index_select(0, safe.reshape(-1)).view(*negative_indices.shape, n.shape[-1])
    return rows, valid


def _kept_indices(negative_indices: torch.Tensor, negative_mask: torch.Tensor | None) -> torch.Tensor:
    """-1 where the mask leaves an entry out (it may hold anything there, as for the loss)."""
    if negative_mask is None:
        return negative_indices
    return torch.where(negative_mask, negative_indices, torch.full_like(negative_indices, -1))


def _negative_validity(
    negatives: torch.Tensor | None, negative_indices: torch.Tensor | None, negative_mask: torch.Tensor | None,
    B: int,
) -> torch.Tensor | None:
    """(B, K) bool of the negatives that count (indices >= 0 and the mask), or None where all do."""
    valid = None if negative_indices is None else negative_indices != -1
    if negative_mask is not None:
        if negatives is None:  # in-batch: the diagonal is the positive
            negative_mask = negative_mask | torch.eye(B, dtype=torch.bool, device=negative_mask.device)
        valid = negative_mask if valid is None else valid & negative_mask
    return valid


def _label_mask(negatives: torch.Tensor | None, negative_indices: torch.Tensor | None,
                negative_mask: torch.Tensor | None, labels: torch.Tensor | None,
                negative_labels: torch.Tensor | None) -> torch.Tensor | None:
    """(B, K) bool, True where the negative's label differs from its anchor's, from ``labels`` (B,) and
    ``negative_labels``: None in-batch (the positives carry ``labels``), (K,) for a shared bank, (B, K) for
    per-anchor negatives, (M,) for the bank of ``negative_indices`` (padding and masked-out entries, which may
    hold anything, read an appended label: they are left out anyway)."""
    if labels is None and negative_labels is None:
        return None
    if labels is None:
        raise ValueError("negative_labels was given without labels")
    if negatives is None:
        if negative_labels is not None:
            raise ValueError("in-batch the negatives are the positives, labelled labels: pass negative_labels=None")
        return labels[:, None] != labels[None, :]
    if negative_labels is None:
        raise ValueError("labels was given without negative_labels")
    if negative_indices is not None:
        # padding and left-out entries read an appended row (an empty bank's labels have no row 0)
        kept = _kept_indices(negative_indices, negative_mask)
        padded = torch.cat([negative_labels, negative_labels.new_zeros(1)])
        negative_labels = padded[torch.where(kept < 0, negative_labels.shape[0], kept)]
    return labels[:, None] != (negative_labels if negative_labels.dim() == 2 else negative_labels[None, :])


def info_nce_reference(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 0.1,
    *,
    negative_indices: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    negative_labels: torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    decoupled: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """InfoNCE with materialised logits; same contract as :func:`contrastbound.info_nce`.

    loss_i = logsumexp(s a_i.p_i, s a_i.n_i1, ..., s a_i.n_iK) - s a_i.p_i with s = 1 / temperature (``decoupled``:
    without s a_i.p_i inside the logsumexp); with ``negatives=None`` the logits are s A P^T and anchor i's target is
    column i. ``labels`` /
    ``negative_labels`` leave out the negatives of the anchor's class, as a (B, K) mask made here (see
    :func:`_label_mask`) and'ed with ``negative_mask``.
    """
    label_mask = _label_mask(negatives, negative_indices, negative_mask, labels, negative_labels)
    if label_mask is not None:
        negative_mask = label_mask if negative_mask is None else negative_mask & label_mask
    dt = _compute_dtype(anchors.dtype, compute_dtype)
    a = anchors.to(dt)
    p = positives.to(dt)
    if normalize:
        a = F.normalize(a, dim=-1, eps=_EPS)
        p = F.normalize(p, dim=-1, eps=_EPS)
    scale = 1.0 / temperature
    valid = _negative_validity(negatives, negative_indices, negative_mask, a.shape[0])
    if negatives is None:
        logits = (a @ p.transpose(0, 1)) * scale
        if valid is not None:  # masked columns out; the diagonal (the positive) is always valid
            logits = logits.masked_fill(~valid, float("-inf"))
        pos = logits.diagonal()
        if decoupled:
            logits = logits.masked_fill(torch.eye(a.shape[0], dtype=torch.bool, device=a.device), float("-inf"))
        loss = torch.logsumexp(logits, dim=1) - pos
    else:
        n = negatives.to(dt)
        if normalize:
            n = F.normalize(n, dim=-1, eps=_EPS)
        if negative_indices is not None:  # (B, K, d); -1 is padding, any other negative index raises
            n, _ = _gather_rows(n, _kept_indices(negative_indices, negative_mask))
        pos = (a * p).sum(-1, keepdim=True) * scale
        if n.dim() == 2:
            neg = (a @ n.transpose(0, 1)) * scale
        else:
            neg = torch.einsum("bd,bkd->bk", a, n) * scale
        if valid is not None:
            neg = neg.masked_fill(~valid, float("-inf"))
        logits = neg if decoupled else torch.cat([pos, neg], dim=1)
        loss = torch.logsumexp(logits, dim=1) - pos.squeeze(1)
    return _reduce(loss, reduction).to(anchors.dtype)


def debiased_info_nce_reference(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 0.1,
    *,
    tau_plus: float = 0.1,
    beta: float = 0.0,
    negative_indices: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Debiased / hard-negative InfoNCE as the authors' code writes it (Chuang et al. 2020; Robinson et al. 2021):
    exponentiated logits materialised, so only for moderate logits (e^{(1+beta) / t} must fit the dtype); the
    contract of :func:`contrastbound.debiased_info_nce`."""
    dt = _compute_dtype(anchors.dtype, compute_dtype)
    a, p = anchors.to(dt), positives.to(dt)
    if normalize:
        a, p = F.normalize(a, dim=-1, eps=_EPS), F.normalize(p, dim=-1, eps=_EPS)
    valid = None
    if negatives is None:  # in-batch: the other positives
        off = ~torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
        others = max(a.shape[0] - 1, 0)  # (B = 0: (0, 0), not the ambiguous (0, -1))
        sims = (a @ p.T)[off].reshape(a.shape[0], others)
        if negative_mask is not None:
            valid = negative_mask[off].reshape(a.shape[0], others)
    else:
        n = negatives.to(dt)
        if normalize:
            n = F.normalize(n, dim=-1, eps=_EPS)
        if negative_indices is not None:  # -1 is padding, any other negative index raises, as the loss
            n, _ = _gather_rows(n, _kept_indices(negative_indices, negative_mask))
        sims = a @ n.T if n.dim() == 2 else torch.einsum("bd,bkd->bk", a, n)
        valid = _negative_validity(negatives, negative_indices, negative_mask, a.shape[0])
    pos = torch.exp((a * p).sum(-1) / temperature)
    neg = torch.exp(sims / temperature)
    if valid is None:
        K = neg.shape[1]
        imp = (beta * neg.log()).exp()
        # (K = 0: no negatives, the loss 0 as the fused loss's; the mean over none would give 0 / NaN = NaN)
        reweight_neg = (imp * neg).sum(dim=-1) / imp.mean(dim=-1) if K > 0 else neg.sum(dim=-1)
    else:  # each anchor's own K; the left-out negatives weigh 0 (an anchor without any: loss 0, below)
        K = valid.sum(dim=-1).to(dt)
        imp = (beta * sims / temperature).exp() * valid
        # (1 where K = 0, whose loss is 0 anyway: no 0 / 0 in the values or the gradient)
        mean_imp = torch.where(K > 0, imp.sum(dim=-1) / K.clamp_min(1), torch.ones_like(K))
        reweight_neg = (imp * neg).sum(dim=-1) / mean_imp
    Ng = (-tau_plus * K * pos + reweight_neg) / (1 - tau_plus)
    Ng = torch.maximum(Ng, K * torch.exp(-1 / torch.as_tensor(temperature, dtype=dt)))
    loss = -torch.log(pos / (pos + Ng))
    if valid is not None:
        loss = torch.where(K > 0, loss, torch.zeros_like(loss))
    return _reduce(loss, reduction).to(torch.promote_types(anchors.dtype, positives.dtype)
                                       if negatives is None else
                                       torch.promote_types(torch.promote_types(anchors.dtype, positives.dtype),
                                                           negatives.dtype))


def nt_xent_reference(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float | torch.Tensor = 0.5,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    decoupled: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """SimCLR's NT-Xent with the (2N, 2N) similarity matrix, the diagonal masked (``decoupled``, DCL: the pair's
    column masked in the denominator as well)."""
    dt = _compute_dtype(z1.dtype, compute_dtype)
    z = torch.cat([z1, z2]).to(dt)
    if normalize:
        z = F.normalize(z, dim=-1, eps=_EPS)
    n = z1.shape[0]
    sim = (z @ z.t()) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    if decoupled:
        pos = sim.gather(1, target[:, None]).squeeze(1)
        loss = torch.logsumexp(sim.scatter(1, target[:, None], float("-inf")), dim=1) - pos
    else:
        loss = F.cross_entropy(sim, target, reduction="none")
    return _reduce(loss, reduction).to(z1.dtype)


def clip_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    max_logit_scale: float = 100.0,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """CLIP's symmetric loss with the materialised N x N logits; same contract as :func:`contrastbound.clip_loss`
    (the logit scale clamped to at most ``max_logit_scale``; per pair the mean of the two directions)."""
    dt = _compute_dtype(torch.promote_types(image_features.dtype, text_features.dtype), compute_dtype)
    i, t = image_features.to(dt), text_features.to(dt)
    if normalize:
        i, t = F.normalize(i, dim=-1, eps=_EPS), F.normalize(t, dim=-1, eps=_EPS)
    scale = logit_scale.clamp(max=max_logit_scale) if isinstance(logit_scale, torch.Tensor) else \
        min(float(logit_scale), max_logit_scale)
    logits = scale * (i @ t.T)
    target = torch.arange(i.shape[0], device=i.device)
    loss = 0.5 * (F.cross_entropy(logits, target, reduction="none")
                  + F.cross_entropy(logits.T, target, reduction="none"))
    return _reduce(loss, reduction).to(torch.promote_types(image_features.dtype, text_features.dtype))


def siglip_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor = 10.0,
    logit_bias: float | torch.Tensor = -10.0,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """SigLIP's sigmoid loss with the materialised N x N logits; same contract as :func:`contrastbound.siglip_loss`:
    ``loss_i = sum_j log(1 + e^{-z_ij (t x_i . y_j + b)})`` with z_ii = 1 and z_ij = -1 elsewhere, per image row;
    "mean" divides the sum by N (the paper's 1 / |B|)."""
    dtype = torch.promote_types(image_features.dtype, text_features.dtype)
    dt = _compute_dtype(dtype, compute_dtype)
    x, y = image_features.to(dt), text_features.to(dt)
    if normalize:
        x, y = F.normalize(x, dim=-1, eps=_EPS), F.normalize(y, dim=-1, eps=_EPS)
    logits = logit_scale * (x @ y.T) + logit_bias
    z = 2.0 * torch.eye(x.shape[0], y.shape[0], dtype=dt, device=x.device) - 1.0
    loss = _softplus(-z * logits).sum(1)
    return _reduce(loss, reduction).to(dtype)


def bank_cross_entropy_reference(
    anchors: torch.Tensor,
    bank: torch.Tensor,
    targets: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    *,
    normalize: bool = False,
    reduction: str = "mean",
    compute_dtype: torch.dtype | None = None,
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of the logits s A bank^T against target rows ``targets`` (materialised): F.cross_entropy."""
    dt = _compute_dtype(anchors.dtype, compute_dtype)
    a = anchors.to(dt)
    n = bank.to(dt)
    if normalize:
        a = F.normalize(a, dim=-1, eps=_EPS)
        n = F.normalize(n, dim=-1, eps=_EPS)
    logits = (a @ n.transpose(0, 1)) / temperature
    if ignore_index is None:  # (none ignored, as contrastbound.bank_cross_entropy's None)
        ignore_index = torch.iinfo(torch.int64).min
    loss = F.cross_entropy(logits, targets, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
    return loss.to(anchors.dtype)


def supcon_reference(
    features: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 0.1,
    *,
    bank: torch.Tensor | None = None,
    bank_labels: torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Supervised contrastive loss (L_out) from the materialised M x (M + K) logits; same contract as
    :func:`contrastbound.supcon_loss` (anchors without a positive: loss 0, left out of the mean; a bank's rows are
    columns only, positives of the anchors of their label, none without bank_labels). Everything in the promoted
    dtype (float32 for half inputs), where supcon_loss runs the bank's pass in the bank's dtype: with a narrower
    bank they differ by its rounding."""
    for name, y in (("labels", labels), ("bank_labels", bank_labels)):
        if y is not None and (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool):
            raise TypeError(f"{name} must be an integer tensor, got dtype {y.dtype}")  # (as supcon_loss)
    if bank_labels is not None and (bank is None or labels is None):
        raise ValueError("bank_labels needs bank and labels")
    dtype = features.dtype if bank is None else torch.promote_types(features.dtype, bank.dtype)
    dt = _compute_dtype(dtype, compute_dtype)
    z = features.flatten(0, -2).to(dt)
    y = torch.arange(features.shape[0], device=features.device) if labels is None else labels.to(torch.int64)
    if features.dim() == 3:
        y = y.repeat_interleave(features.shape[1])
    if normalize:
        z = F.normalize(z, dim=-1, eps=_EPS)
    columns, same = z, y[:, None] == y[None, :]
    if bank is not None:
        b = bank.to(dt)
        if normalize:
            b = F.normalize(b, dim=-1, eps=_EPS)
        columns = torch.cat([z, b])
        # a bank without labels: no row of any anchor's class
        in_bank = (y[:, None] == bank_labels.to(torch.int64)[None, :]) if bank_labels is not None else \
            torch.zeros(len(z), len(b), dtype=torch.bool, device=z.device)
        same = torch.cat([same, in_bank], dim=1)
    logits = (z @ columns.T) / temperature
    own = torch.eye(len(z), len(columns), dtype=torch.bool, device=z.device)
    lse = torch.logsumexp(logits.masked_fill(own, float("-inf")), dim=1)
    positive = same & ~own
    count = positive.sum(1)
    loss = torch.where(count > 0, lse - (logits * positive).sum(1) / count.clamp_min(1), 0.0)
    if reduction == "mean":
        return (loss.sum() / (count > 0).sum().clamp_min(1)).to(dtype)
    return _reduce(loss.reshape(features.shape[:-1]), reduction).to(dtype)


def info_nce_core_reference(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    negative_indices: torch.Tensor | None,
    scale: float,
    normalize: bool,
    include_positive: bool,
    exclude_self: bool = False,
    excluded: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The registered op's contract in plain PyTorch: per-anchor (loss, lse) in the accumulation dtype.

    lse_i = log( [include_positive] e^{l_i0} + sum_k e^{l_ik} ), loss_i = lse_i - l_i0, with
    l_i0 = s a_i.p_i and l_ik = s a_i.n_ik; k runs over the bank except row i (exclude_self) or row excluded[i]
    (excluded, a shared bank: an entry outside [0, K) leaves none out) or where negative_mask (B, K) is False, and
    over the indices but -1 (padding). Used as the fallback when the extension is not built.
    """
    dt = _compute_dtype(anchors.dtype, None)
    a = anchors.to(dt)
    p = positives.to(dt)
    n = negatives.to(dt)
    if normalize:
        a = F.normalize(a, dim=-1, eps=_EPS)
        p = F.normalize(p, dim=-1, eps=_EPS)
        n = F.normalize(n, dim=-1, eps=_EPS)
    pad = None
    if negative_indices is not None:  # -1 is padding (left out below)
        n, valid = _gather_rows(n, negative_indices)
        pad = ~valid
    pos = (a * p).sum(-1) * scale
    if n.dim() == 2:
        neg = (a @ n.transpose(0, 1)) * scale
    else:
        neg = torch.einsum("bd,bkd->bk", a, n) * scale
    if pad is not None:
        neg = neg.masked_fill(pad, float("-inf"))
    if negative_mask is not None:
        neg = neg.masked_fill(~negative_mask, float("-inf"))
    if exclude_self:  # bank row i is anchor i: not its own negative
        eye = torch.eye(neg.shape[0], neg.shape[1], dtype=torch.bool, device=neg.device)
        neg = neg.masked_fill(eye, float("-inf"))
    if excluded is not None:  # bank_cross_entropy: the target row is the positive, not also a negative
        cols = torch.arange(neg.shape[1], device=neg.device)
        neg = neg.masked_fill(cols[None, :] == excluded[:, None], float("-inf"))
    if include_positive:
        # softplus(lse_neg - l_0), as the kernels: lse - l_0 would leave lse's rounding in a small loss. A row
        # without negatives (K = 0, or every one excluded) gets loss 0 and lse = l_0 through where(), not from a
        # log-sum-exp of -inf alone, whose gradient is NaN where every negative logit overflowed to -inf from finite
        # inputs (tests/test_reference.py; for excluded ones masked_fill's backward already drops it).
        if neg.shape[1] == 0:
            empty = torch.ones_like(pos, dtype=torch.bool)
            lse_neg = torch.full_like(pos, float("-inf"))
        else:
            empty = torch.isneginf(neg.detach()).all(dim=1)
            lse_neg = torch.logsumexp(neg.masked_fill(empty[:, None], 0.0), dim=1)
        z = torch.where(empty, torch.full_like(pos, float("-inf")), lse_neg - pos)
        loss = _softplus(z)
        lse = torch.where(empty, pos, torch.logaddexp(pos, torch.where(empty, pos, lse_neg)))
        return loss, lse
    lse_neg = torch.logsumexp(neg, dim=1)  # -inf without negatives
    return lse_neg - pos, lse_neg
