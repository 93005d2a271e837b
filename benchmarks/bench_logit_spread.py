"""Large logit spreads on the CPU: clustered unit features at small temperatures, fused vs plain PyTorch, forward +
backward.

Where a logit lies ~87 below its row's log-sum-exp (unit features: a spread up to 2 / T, so T below ~0.023), its
weight e^{l - lse} is a subnormal float32. ATen's vectorised exp forms such values ~100x slower than normal ones, and
matrix products with them in their operands run ~200x slower on x86; the CPU kernels set them to 0
(csrc/cpu/tile_exp.h). Features drawn around a few centres (--clusters, spread --noise: trained features look so)
give such spreads, random ones do not (cosines ~ 1 / sqrt(d)). This script times each loss over a range of
temperatures (siglip: logit scale 1 / T, bias -10); median of --reps timed runs after one warm-up, in this process.
The bank is a detached queue unless --bank-grad (info_nce, indexed, per_anchor, bank_ce: a learnt bank, learnt
negatives or learnt classes, whose gradient is formed too). supcon takes the centres as labels.

    python benchmarks/bench_logit_spread.py                     # the README's cases (all losses)
    python benchmarks/bench_logit_spread.py --losses indexed,per_anchor --noise 1 --bank-grad --out ...rows_bank_grad
    python benchmarks/bench_logit_spread.py --out my_run        # writes my_run.csv
Writes benchmarks/results/bench_logit_spread.csv by default.
"""

from __future__ import annotations

import argparse
import os
import sys

# Runs from a checkout with an in-place build (no install): the repository root comes first on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOSSES = ("info_nce", "nt_xent", "clip", "siglip", "indexed", "per_anchor", "supcon", "bank_ce")
BANKED = ("info_nce", "indexed", "per_anchor", "bank_ce")  # the losses with a bank (--bank-grad)
ROW_NEGATIVES = 64  # indexed / per_anchor: each anchor's negatives (indexed: rows of the bank; per_anchor: copies)


def _losses(loss: str):
    """(fused, naive) for a loss, each f(x, y, bank, T): info_nce with a shared detached bank (B anchors x, their
    positives y); indexed and per_anchor with ROW_NEGATIVES of its rows per anchor (`bank` is then (indices,
    bank) and (B, ROW_NEGATIVES, d) rows); bank_ce with the bank as classes (`bank` is (targets, bank), a random
    target row per anchor); supcon over x and y with their centres as labels (`bank` is the labels); the others
    in-batch over the pairs (x_i, y_i) (bank unused)."""
    from contrastbound import reference as R
    import torch
    import torch.nn.functional as F

    import contrastbound as cb

    def info_nce(x, y, bank, t):
        x, y, n = F.normalize(x, dim=-1), F.normalize(y, dim=-1), F.normalize(bank, dim=-1)
        logits = torch.cat([(x * y).sum(-1, keepdim=True), x @ n.T], 1) / t
        return F.cross_entropy(logits, torch.zeros(len(x), dtype=torch.long))

    def rows(x, y, negs, t):  # negs: (B, k, d)
        x, y, n = F.normalize(x, dim=-1), F.normalize(y, dim=-1), F.normalize(negs, dim=-1)
        logits = torch.cat([(x * y).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", x, n)], 1) / t
        return F.cross_entropy(logits, torch.zeros(len(x), dtype=torch.long))

    def nt_xent(x, y, bank, t):
        z = F.normalize(torch.cat([x, y]), dim=-1)
        n = len(x)
        logits = z @ z.T / t
        logits.fill_diagonal_(float("-inf"))
        return F.cross_entropy(logits, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))

    def clip(x, y, bank, t):
        logits = F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T / t
        target = torch.arange(len(x))
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

    def siglip(x, y, bank, t):
        logits = F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T / t - 10.0
        sign = 2 * torch.eye(len(x)) - 1
        return -F.logsigmoid(sign * logits).sum() / len(x)

    fused = {
        "info_nce": lambda x, y, bank, t: cb.info_nce(x, y, bank, t),
        "nt_xent": lambda x, y, bank, t: cb.nt_xent(x, y, t),
        "clip": lambda x, y, bank, t: cb.clip_loss(x, y, 1 / t),
        "siglip": lambda x, y, bank, t: cb.siglip_loss(x, y, 1 / t, -10.0),
        "indexed": lambda x, y, bank, t: cb.info_nce(x, y, bank[1], t, negative_indices=bank[0]),
        "per_anchor": lambda x, y, bank, t: cb.info_nce(x, y, bank, t),
        "supcon": lambda x, y, lab, t: cb.supcon_loss(torch.cat([x, y]), torch.cat([lab, lab]), t),
        "bank_ce": lambda x, y, bank, t: cb.bank_cross_entropy(x, bank[1], bank[0], t, normalize=True),
    }[loss]
    naive = {"info_nce": info_nce, "nt_xent": nt_xent, "clip": clip, "siglip": siglip,
             "indexed": lambda x, y, bank, t: rows(x, y, bank[1][bank[0]], t), "per_anchor": rows,
             "supcon": lambda x, y, lab, t: R.supcon_reference(torch.cat([x, y]), torch.cat([lab, lab]), t),
             "bank_ce": lambda x, y, bank, t: F.cross_entropy(
                 F.normalize(x, dim=-1) @ F.normalize(bank[1], dim=-1).T / t, bank[0])}[loss]
    return fused, naive


def clustered(n: int, d: int, centres, noise: float, g, labels=None):
    """n rows around the centres: labels[i] (drawn where not given) + noise."""
    import torch

    if labels is None:
        labels = torch.randint(0, len(centres), (n,), generator=g)
    return centres[labels] + noise * torch.randn(n, d, generator=g)


def measure(loss: str, t: float, n: int, k: int, d: int, clusters: int, noise: float, reps: int,
            bank_grad: bool = False) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(clusters, d, generator=g)
    labels = torch.randint(0, clusters, (n,), generator=g)
    x = clustered(n, d, centres, noise, g, labels).requires_grad_()
    y = (x.detach() + noise * torch.randn(n, d, generator=g)).requires_grad_()
    bank = clustered(k, d, centres, noise, g)  # (info_nce: a queue, learnt where bank_grad; row modes: rows of it)
    if loss in ("indexed", "per_anchor"):
        idx = torch.randint(0, k, (n, ROW_NEGATIVES), generator=g)
        bank = (idx, bank) if loss == "indexed" else bank[idx].contiguous()
    elif loss == "bank_ce":
        bank = (torch.randint(0, k, (n,), generator=g), bank)
    elif loss == "supcon":
        bank = labels
    if loss in BANKED:
        (bank[1] if isinstance(bank, tuple) else bank).requires_grad_(bank_grad)
    with torch.no_grad():  # the spread of l - lse over the first 256 rows (against the bank; row modes: all of it)
        xs = torch.nn.functional.normalize(x[:256], dim=-1)
        other = bank[1] if isinstance(bank, tuple) else bank if loss == "info_nce" else y
        if loss == "per_anchor":
            other = bank.reshape(-1, d)
        l = xs @ torch.nn.functional.normalize(other, dim=-1).T / t
        spread = float((torch.logsumexp(l, 1, keepdim=True) - l).max())
    kk = {"info_nce": k, "indexed": ROW_NEGATIVES, "per_anchor": ROW_NEGATIVES, "bank_ce": k}.get(loss, n)
    row = {"loss": loss, "T": t, "N": n, "K": kk, "d": d, "clusters": clusters,
           "noise": noise, "threads": torch.get_num_threads(), "bank_grad": int(bank_grad and loss in BANKED),
           "max_lse_minus_logit": round(spread, 1)}
    from contrastbound.benchsuite.report import time_fused_and_naive

    leaves = [v for v in (x, y, bank[1] if isinstance(bank, tuple) else bank) if v.requires_grad]
    return time_fused_and_naive(row, zip(("fused", "naive"), _losses(loss)), (x, y, bank, t), leaves, reps)


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated, of {', '.join(LOSSES)}")
    parser.add_argument("--temperatures", default="0.1,0.05,0.02,0.01", help="comma-separated, each > 0")
    parser.add_argument("-N", type=int, default=1024, help="pairs (info_nce: anchors)")
    parser.add_argument("-K", type=int, default=4096, help="info_nce's bank rows")
    parser.add_argument("-d", type=int, default=128, help="features")
    parser.add_argument("--clusters", type=int, default=8, help="centres the features are drawn around")
    parser.add_argument("--noise", type=float, default=0.1, help="standard deviation around a centre")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--bank-grad", action="store_true",
                        help=f"the bank needs a gradient too ({', '.join(BANKED)}; default: a detached queue)")
    parser.add_argument("--out", default=os.path.join(here, "results", "bench_logit_spread"),
                        help="output path without extension (.csv is added)")
    args = parser.parse_args(argv)
    losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    if not losses or any(s not in LOSSES for s in losses):
        parser.error(f"--losses: {args.losses!r} must name some of {', '.join(LOSSES)}")
    try:
        temps = [float(s) for s in args.temperatures.split(",")]
    except ValueError:
        temps = []
    if not temps or not all(t > 0 for t in temps):
        parser.error(f"--temperatures: {args.temperatures!r} must be positive numbers")
    for name in ("N", "K", "d", "clusters", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"-{name if len(name) == 1 else '-' + name} must be >= 1, got {getattr(args, name)}")
    if not args.noise >= 0:
        parser.error(f"--noise must be >= 0, got {args.noise}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from contrastbound.benchsuite.report import measure_and_write

    return measure_and_write(
        parser, args.out, f"{'loss':10s} {'T':>5s} {'spread':>7s} {'fused ms':>9s} {'naive ms':>9s} {'ratio':>6s}",
        (lambda loss=loss, t=t: measure(loss, t, args.N, args.K, args.d, args.clusters, args.noise, args.reps,
                                        args.bank_grad) for loss in losses for t in temps),
        lambda row: f"{row['loss']:10s} {row['T']:5.3g} {row['max_lse_minus_logit']:7.1f} {row['fused_ms']:9.2f} "
                    f"{row['naive_ms']:9.2f} {row['fused_over_naive']:6.2f}")


if __name__ == "__main__":
    sys.exit(main())
