"""clip_loss on the CPU: the both-directions kernel (contrastbound::clip_fwd / clip_bwd) against the two in-batch
info_nce calls it replaced (the route CUDA and process_group still take), forward + backward, in one process; with
--loss nt_xent, nt_xent with its two sides' pair calls made by that kernel against four info_nce calls.

The kernel forms each logit tile once in forward and once per backward pass (4 N x N x d products up to N = 1024,
5 beyond; two calls: 8) and one exponential per logit and pass where the tile's values allow (two where they
spread beyond 20: docs/ARCHITECTURE.md); small d shows the exponentials' cost. Median of --reps runs after one
warm-up per route; the routes alternate twice and the better median of each is kept.

    python benchmarks/bench_clip_routes.py              # writes benchmarks/results/bench_clip_routes.csv
    python benchmarks/bench_clip_routes.py --cases 2048:512,8192:64 --out my_run
    python benchmarks/bench_clip_routes.py --loss nt_xent --cases 1024:128,4096:128,16384:128 \
        --out benchmarks/results/bench_clip_routes_nt_xent
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# Runs from a checkout with an in-place build (no install): the repository root comes first on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = [(1024, 768), (4096, 128), (16384, 128), (16384, 16), (4096, 1)]  # (N, d), float32


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", help="comma-separated N:d (default: %s)" % ",".join(f"{n}:{d}" for n, d in CASES))
    parser.add_argument("--loss", choices=["clip", "nt_xent"], default="clip")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "bench_clip_routes"))
    args = parser.parse_args()
    if args.reps < 1 or args.threads < 1:
        parser.error("--reps and --threads must be >= 1")
    from contrastbound.benchsuite.report import prepare_out_stem, write_rows_csv

    args.out = prepare_out_stem(parser, args.out)  # (before measuring: a missing folder lost the results)
    cases = CASES
    if args.cases:
        try:
            cases = [tuple(int(v) for v in c.split(":")) for c in args.cases.split(",")]
        except ValueError:
            cases = []
        if not cases or any(len(c) != 2 or c[0] < 1 or c[1] < 1 for c in cases):
            parser.error(f"--cases takes comma-separated N:d with N, d >= 1, got {args.cases!r}")
    import torch

    import contrastbound as cb
    from contrastbound import _backend

    if not _backend.clip_kernel_serves(torch.device("cpu")):
        print("the compiled CPU clip kernel is not loaded: nothing to compare", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    print(f"{args.loss}, float32, {args.threads} threads, forward + backward, "
          + ("logit scale 14" if args.loss == "clip" else "temperature 0.5"))
    print(f"{'N':>6} {'d':>4} {'kernel ms':>10} {'calls ms':>13} {'ratio':>6}")
    for N, d in cases:
        a = torch.randn(N, d, requires_grad=True)
        b = torch.randn(N, d, requires_grad=True)
        reps = args.reps if N * N * max(d, 16) < 2**34 else max(1, args.reps // 2)
        medians: dict[str, list[float]] = {"kernel": [], "calls": []}
        values = {}
        loss_fn = (lambda: cb.clip_loss(a, b, 14.0)) if args.loss == "clip" else (lambda: cb.nt_xent(a, b, 0.5))
        try:
            for route in ("kernel", "calls", "kernel", "calls"):
                _backend._HAS_CLIP_KERNEL["cpu"] = route == "kernel"
                loss = loss_fn()  # warm-up
                loss.backward()
                values[route] = loss.item()
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    loss_fn().backward()
                    times.append(time.perf_counter() - t0)
                medians[route].append(statistics.median(times) * 1e3)
        finally:
            _backend._HAS_CLIP_KERNEL["cpu"] = True
        k, t = min(medians["kernel"]), min(medians["calls"])
        rows.append({"loss": args.loss, "N": N, "d": d, "threads": args.threads, "kernel_ms": k, "calls_ms": t,
                     "ratio": k / t, "kernel_loss": values["kernel"], "calls_loss": values["calls"]})
        print(f"{N:>6} {d:>4} {k:>10.1f} {t:>13.1f} {k / t:>6.2f}", flush=True)
    out = args.out
    write_rows_csv(rows, out + ".csv")
    print(f"wrote {out}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
