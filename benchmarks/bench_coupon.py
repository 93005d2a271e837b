"""Time coupon_collector_probability for priors with many distinct values (its costly case: the Cauchy integral's
points times the distinct prior values; a uniform prior is one value, see bench_bounds.py).

    python benchmarks/bench_coupon.py [--repeat 1] [--cases skewed,dirichlet,softmax] [--root PATH]
                                      [--out benchmarks/results/bench_coupon.csv]

Cases: a skewed prior over 3029 classes (3029 distinct values, as in bench_bounds.py) at every 1000th n from
C + 1 to 10^5 + 1; a Dirichlet(1) draw over 2 * 10^4 classes at 54 n from C to 10^7 (log-spaced); a softmax of standard
normal logits over 10^5 classes at n = 10^5 + 7, 3 * 10^5 and 10^6. Prints a table (best of --repeat runs, seconds)
and writes the CSV, with the sum of the returned log upsilon_n per case (to compare two trees' results).
--root imports contrastbound from another checkout (e.g. a clone of an older commit: the bounds are pure numpy,
no build needed), so two trees can be timed one after the other on the same machine.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    skewed = np.linspace(1.0, 3.0, 3029)
    skewed /= skewed.sum()
    dirichlet = np.random.default_rng(0).dirichlet(np.ones(20_000))
    z = np.random.default_rng(1).standard_normal(100_000)
    softmax = np.exp(z - z.max())
    softmax /= softmax.sum()
    return [
        ("skewed", skewed, np.arange(3030, 100_002, 1000)),
        ("dirichlet", dirichlet, np.unique(np.logspace(np.log10(20_000), 7, 54).astype(np.int64))),
        ("softmax", softmax, np.array([100_007, 300_000, 1_000_000])),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cases", default="skewed,dirichlet,softmax", help="comma-separated subset, in this order")
    ap.add_argument("--root", default=HERE, help="the checkout whose contrastbound is timed (default: this one)")
    ap.add_argument("--out", default=os.path.join(HERE, "benchmarks", "results", "bench_coupon.csv"))
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    known = [name for name, _, _ in cases()]
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not chosen or any(c not in known for c in chosen):
        ap.error(f"--cases takes a comma-separated subset of {','.join(known)}, got {args.cases!r}")
    if not os.path.isfile(os.path.join(args.root, "contrastbound", "bounds.py")):
        ap.error(f"--root {args.root!r} has no contrastbound/bounds.py")
    sys.path.insert(0, os.path.abspath(args.root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the extension may be missing: the bounds are pure numpy anyway
        from contrastbound import bounds as B
    if not os.path.basename(args.out) or os.path.isdir(args.out):
        ap.error(f"--out {args.out!r} names a folder: give a file's path")
    try:  # before the timings, else the results would be lost to a traceback after them
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a"):
            pass
    except OSError as exc:
        ap.error(f"--out {args.out!r} cannot be written: {exc}")
    print(f"coupon_collector_probability(log=True), best of {args.repeat}, {B.__file__} "
          f"({platform.processor() or platform.machine()}, numpy {np.__version__})")
    print(f"{'prior':<11}{'classes':>9}{'n values':>10}{'seconds':>10}{'s per n':>10}{'sum log upsilon':>24}")
    rows = []
    for name, prior, ns in cases():
        if name not in chosen:
            continue
        best, value = float("inf"), None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            value = B.coupon_collector_probability(ns, prior=prior, log=True)
            best = min(best, time.perf_counter() - t0)
        total = float(np.sum(value))
        rows.append(dict(prior=name, classes=prior.size, n_values=ns.size, seconds=f"{best:.3g}",
                         s_per_n=f"{best / ns.size:.3g}", sum_log_upsilon=repr(total)))
        print(f"{name:<11}{prior.size:>9}{ns.size:>10}{best:>10.3g}{best / ns.size:>10.3g}{total:>24.17g}")
    with open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
