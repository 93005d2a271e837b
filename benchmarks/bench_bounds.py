"""Time every closed-form term over a whole curve K = 1..K_max (default 10^5) at C = 3029 (Wiki-3029's classes).

    python benchmarks/bench_bounds.py [--classes 3029] [--kmax 100000] [--repeat 3]

Prints a table (best of --repeat runs, seconds) and writes benchmarks/results/bench_bounds.csv.
The issue's target: each curve in under a second.
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

# Runs from a checkout with an in-place build (no install): the repository root comes first on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the extension may be missing: the bounds are pure numpy anyway
    from contrastbound import bounds as B


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=3029)
    ap.add_argument("--kmax", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_bounds.csv"))
    args = ap.parse_args()
    for name, value in (("--classes", args.classes), ("--kmax", args.kmax), ("--repeat", args.repeat)):
        if value < 1:
            ap.error(f"{name} must be >= 1, got {value}")
    from contrastbound.benchsuite.report import prepare_out_file

    prepare_out_file(ap, args.out)  # (before the timings, else a traceback after them)
    C, k = args.classes, np.arange(1, args.kmax + 1)
    r_cont = B.min_contrastive_loss(k, C)  # a realistic R_cont curve for the earlier bounds
    skewed = np.linspace(1.0, 3.0, C)
    skewed /= skewed.sum()  # C distinct prior values: the general-prior paths at their most expensive
    cases = [
        ("delta_upper", "uniform", lambda: B.delta_upper(k, C)),
        ("delta_lower", "uniform", lambda: B.delta_lower(k, C)),
        ("delta_lower(proved)", "uniform", lambda: B.delta_lower(k, C, form="proved")),
        ("collision_probability", "uniform", lambda: B.collision_probability(k, C)),
        ("coupon_collector_probability(K+1)", "uniform", lambda: B.coupon_collector_probability(k + 1, C)),
        ("collision_term", "uniform", lambda: B.collision_term(k, C)),
        ("min_contrastive_loss", "uniform", lambda: B.min_contrastive_loss(k, C)),
        ("arora", "uniform", lambda: B.arora(r_cont, k, C)),
        ("nozawa_sato", "uniform", lambda: B.nozawa_sato(r_cont, k, C)),
        ("ash", "uniform", lambda: B.ash(r_cont, k, C)),
        ("delta_upper", "skewed", lambda: B.delta_upper(k, prior=skewed)),
        ("delta_lower(proved)", "skewed", lambda: B.delta_lower(k, prior=skewed, form="proved")),
        ("collision_probability", "skewed", lambda: B.collision_probability(k, prior=skewed)),
    ]
    rows = []
    print(f"curve K = 1..{args.kmax}, C = {C}, best of {args.repeat} ({platform.processor() or platform.machine()}, "
          f"numpy {np.__version__})")
    print(f"{'term':<36}{'prior':<9}{'seconds':>9}{'us/K':>9}")
    for name, prior, fn in cases:
        s = best_of(fn, args.repeat)
        # three significant digits (fixed decimals printed a fast term as 0.0000)
        rows.append(dict(term=name, prior=prior, classes=C, kmax=args.kmax, seconds=f"{s:.3g}",
                         us_per_k=f"{1e6 * s / k.size:.3g}"))
        print(f"{name:<36}{prior:<9}{s:>9.3g}{1e6 * s / k.size:>9.3g}")
    with open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
