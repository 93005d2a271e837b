"""Where the fused losses lose on the CPU: small and wide in-batch problems, fused vs plain PyTorch, forward + backward.

The fused kernels pay a fixed cost per call, recompute the logits in backward (4 GEMM-sized products against
naive's 3; clip_loss's both-directions CPU kernel 4 against 3, where its two in-batch calls took 8, as they still
do on CUDA); bfloat16 tiles are multiplied in float32. This script measures those costs where the (N, N) logits
would fit in memory anyway (docs/LIMITS.md).
Median of --reps timed runs after one warm-up, in this process (memory is not measured here: bench_training.py
does, per process).

    python benchmarks/bench_small.py                     # the README's cases
    python benchmarks/bench_small.py --out my_run       # writes my_run.csv
Writes benchmarks/results/bench_small.csv by default.
"""

from __future__ import annotations

import argparse
import os
import sys

# Runs from a checkout with an in-place build (no install): the repository root comes first on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (loss, N, d, dtype): nt_xent and clip_loss over N pairs, in-batch info_nce over N anchors.
CASES = [
    ("nt_xent", 64, 128, "float32"),
    ("nt_xent", 256, 128, "float32"),
    ("nt_xent", 1024, 128, "float32"),
    ("clip", 256, 128, "float32"),
    ("clip", 1024, 768, "float32"),
    ("clip", 1024, 768, "bfloat16"),
    ("clip", 4096, 256, "float32"),
    ("in-batch", 1024, 768, "float32"),
    ("in-batch", 1024, 768, "bfloat16"),
]


def _plain(loss: str):
    import torch
    import torch.nn.functional as F

    def nt_xent(z1, z2, t):
        z = F.normalize(torch.cat([z1, z2]), dim=-1)
        n = len(z1)
        logits = (z @ z.T).float() / t
        logits.fill_diagonal_(float("-inf"))
        return F.cross_entropy(logits, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))

    def clip(x, y, scale):
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
        logits = scale * x @ y.T
        target = torch.arange(len(x))
        return 0.5 * (F.cross_entropy(logits.float(), target) + F.cross_entropy(logits.T.float(), target))

    def in_batch(a, p, t):
        a, p = F.normalize(a, dim=-1), F.normalize(p, dim=-1)
        return F.cross_entropy((a @ p.T).float() / t, torch.arange(len(a)))

    return {"nt_xent": nt_xent, "clip": clip, "in-batch": in_batch}[loss]


def _fused(loss: str):
    import contrastbound as cb

    return {"nt_xent": cb.nt_xent, "clip": cb.clip_loss, "in-batch": lambda a, p, t: cb.info_nce(a, p, temperature=t)}[
        loss]


def measure(loss: str, n: int, d: int, dtype: str, reps: int) -> dict:
    import torch

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    x = torch.randn(n, d, dtype=dt, requires_grad=True)
    y = (x.detach() + torch.randn(n, d, dtype=dt)).requires_grad_()
    arg = {"nt_xent": 0.5, "clip": 1 / 0.07, "in-batch": 0.07}[loss]
    row = {"loss": loss, "N": n, "d": d, "dtype": dtype, "threads": torch.get_num_threads()}
    from contrastbound.benchsuite.report import time_fused_and_naive

    return time_fused_and_naive(row, (("fused", _fused(loss)), ("naive", _plain(loss))), (x, y, arg), (x, y), reps)


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7, help="timed runs per case (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cases", default=None,
                        help="comma-separated loss:N:d:dtype, e.g. nt_xent:64:16:float32 (default: the README's)")
    parser.add_argument("--out", default=os.path.join(here, "results", "bench_small"),
                        help="output path without extension (.csv is added)")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    cases = CASES
    if args.cases:
        cases = []
        for item in args.cases.split(","):
            parts = item.split(":")
            if len(parts) != 4 or parts[0] not in ("nt_xent", "clip", "in-batch") or parts[3] not in (
                    "float32", "float64", "bfloat16", "float16") or not (parts[1].isdigit() and parts[2].isdigit()) \
                    or int(parts[1]) < 1 or int(parts[2]) < 1:
                parser.error(f"--cases: {item!r} is not loss:N:d:dtype (loss nt_xent, clip or in-batch; N, d >= 1)")
            cases.append((parts[0], int(parts[1]), int(parts[2]), parts[3]))
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from contrastbound.benchsuite.report import measure_and_write

    return measure_and_write(
        parser, args.out,
        f"{'loss':9s} {'N':>5s} {'d':>4s} {'dtype':9s} {'fused ms':>9s} {'naive ms':>9s} {'ratio':>6s}",
        (lambda case=case: measure(*case, reps=args.reps) for case in cases),
        lambda row: f"{row['loss']:9s} {row['N']:5d} {row['d']:4d} {row['dtype']:9s} {row['fused_ms']:9.2f} "
                    f"{row['naive_ms']:9.2f} {row['fused_over_naive']:6.2f}")


if __name__ == "__main__":
    sys.exit(main())
