"""bank_cross_entropy's gradients with label smoothing in bfloat16 / float16: fused vs plain PyTorch, against float64.

For each dtype, temperature and smoothing eps, the anchors and the bank are drawn in float32, rounded to the dtype,
and both losses (cb.bank_cross_entropy with normalize=True, and F.cross_entropy over the normalised (B, C) logits)
are differentiated in that dtype; the reference is F.cross_entropy in float64 from the same rounded inputs. Each
column is the relative error ||g - g64|| / ||g64|| of one gradient part (the anchors, the bank's target rows, its
other rows), the mean over --draws draws. With smoothing near 1 a target's gradient coefficient w_t - 1 + eps is
small; the fused loss forms it once (README, bank_cross_entropy).

    python benchmarks/bench_label_smoothing.py                  # the README's cases
    python benchmarks/bench_label_smoothing.py --out my_run      # writes my_run.csv
Writes benchmarks/results/bench_label_smoothing.csv by default.
"""

from __future__ import annotations

import argparse
import os
import sys

# Runs from a checkout with an in-place build (no install): the repository root comes first on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = ("bfloat16", "float16")
PARTS = ("anchors", "target_rows", "other_rows")


def measure(dtype: str, t: float, eps: float, B: int, C: int, d: int, draws: int) -> dict:
    import torch
    import torch.nn.functional as F

    import contrastbound as cb

    def naive(a, w, targets):
        return F.cross_entropy(F.normalize(a, dim=-1) @ F.normalize(w, dim=-1).T / t, targets, label_smoothing=eps)

    def fused(a, w, targets):
        return cb.bank_cross_entropy(a, w, targets, t, normalize=True, label_smoothing=eps)

    dt = getattr(torch, dtype)
    errors = {(m, p): 0.0 for m in ("fused", "naive") for p in PARTS}
    for seed in range(draws):
        g = torch.Generator().manual_seed(seed)
        a0, w0 = torch.randn(B, d, generator=g).to(dt), torch.randn(C, d, generator=g).to(dt)
        targets = torch.randint(0, C, (B,), generator=g)
        hit = torch.zeros(C, dtype=torch.bool)
        hit[targets] = True

        def grads(fn, as_dtype):
            a, w = a0.to(as_dtype).requires_grad_(), w0.to(as_dtype).requires_grad_()
            ga, gw = torch.autograd.grad(fn(a, w, targets), (a, w))
            return ga.double(), gw[hit].double(), gw[~hit].double()

        want = grads(naive, torch.float64)
        for method, fn in (("fused", fused), ("naive", naive)):
            for part, x, y in zip(PARTS, grads(fn, dt), want):
                errors[method, part] += float((x - y).norm() / y.norm()) / draws
    row = {"dtype": dtype, "T": t, "smoothing": eps, "B": B, "C": C, "d": d, "draws": draws}
    for (method, part), e in errors.items():
        row[f"{method}_{part}"] = e
    return row


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated, of {', '.join(DTYPES)}")
    parser.add_argument("--temperatures", default="1.0,0.1", help="comma-separated, each > 0")
    parser.add_argument("--smoothings", default="0.1,0.5,0.9,1.0", help="comma-separated, each in [0, 1]")
    parser.add_argument("-B", type=int, default=32, help="anchors")
    parser.add_argument("-C", type=int, default=100, help="classes (bank rows)")
    parser.add_argument("-d", type=int, default=64, help="feature size")
    parser.add_argument("--draws", type=int, default=8, help="draws per case (the mean is reported)")
    parser.add_argument("--out", default=os.path.join(here, "results", "bench_label_smoothing"),
                        help="output path without extension (.csv is added)")
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",")
    if any(dt not in DTYPES for dt in dtypes):
        parser.error(f"--dtypes must be a comma-separated list of {', '.join(DTYPES)}, got {args.dtypes!r}")

    def numbers(flag: str, text: str, ok, what: str) -> list[float]:
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            values = []
        if not values or not all(ok(v) for v in values):
            parser.error(f"{flag} must be a comma-separated list of numbers {what}, got {text!r}")
        return values

    temperatures = numbers("--temperatures", args.temperatures, lambda v: 0.0 < v < float("inf"), "> 0")
    smoothings = numbers("--smoothings", args.smoothings, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
    for flag, value in (("-B", args.B), ("-C", args.C), ("-d", args.d), ("--draws", args.draws)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    from contrastbound.benchsuite.report import measure_and_write

    cases = [(dt, t, eps) for dt in dtypes for t in temperatures for eps in smoothings]
    head = "".join(f" {p.split('_')[0][:6] + ' ' + m:>12s}" for p in PARTS for m in ("fused", "naive"))
    return measure_and_write(
        parser, args.out, f"{'dtype':9s} {'T':>5s} {'eps':>5s}{head}",
        (lambda case=case: measure(*case, args.B, args.C, args.d, args.draws) for case in cases),
        lambda row: f"{row['dtype']:9s} {row['T']:5g} {row['smoothing']:5g}" + "".join(
            f" {row[f'{m}_{p}']:12.4f}" for p in PARTS for m in ("fused", "naive")))


if __name__ == "__main__":
    sys.exit(main())
