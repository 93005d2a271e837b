"""Uniformity (Wang & Isola 2020) over N rows: forward + backward time and peak memory of cb.uniformity (the fused
in-batch log-sum-exp, O(N) memory) against the paper's code (`torch.pdist(F.normalize(x)).pow(2).mul(-t).exp()
.mean().log()`, which forms the N (N - 1) / 2 distances and autograd keeps them), per N.

Each (N, method) runs in a fresh subprocess; "extra" is the peak resident memory over the timed steps less the
resident memory before them (input allocated, a warm-up step done and its gradient freed). `value` is the
uniformity the step returned, the same problem for both methods.

    python benchmarks/bench_uniformity.py                 # d = 128, t = 2, N = 2^11 .. 2^15 (pdist up to 2^14), 2 threads
    python benchmarks/bench_uniformity.py --log2n 8,10    # smaller
Writes benchmarks/results/bench_uniformity.csv (and .json) unless --out is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = ("fused", "pdist")


def _worker(method: str, N: int, d: int, t: float, reps: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from contrastbound.benchsuite.harness import timed_steps

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, d, generator=g).requires_grad_(True)
    torch.mm(torch.randn(64, 64), torch.randn(64, 64)).sum().item()  # BLAS and the thread pool, before the baseline

    if method == "fused":
        import contrastbound as cb

        def value():
            return cb.uniformity(x, t)
    else:
        def value():
            return torch.pdist(F.normalize(x, dim=1), p=2).pow(2).mul(-t).exp().mean().log()

    def step():
        u = value()
        u.backward()
        return u

    def clear():
        x.grad = None

    r = timed_steps(step, clear, reps)
    return {"time_s": r["time_s"], "extra_mib": r["extra_mib"], "value": r["loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", type=int, default=128)
    parser.add_argument("-t", type=float, default=2.0)
    parser.add_argument("--log2n", default="11,12,13,14,15", help="row counts as powers of two, comma-separated")
    parser.add_argument("--pdist-max-log2n", type=int, default=14,
                        help="largest N (as a power of two) for the pdist method (its memory grows as N^2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2, help="timed repeats (median)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "bench_uniformity"), help="CSV/JSON path without extension")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        m, N, d, t, reps, threads = args.worker
        print(json.dumps(_worker(m, int(N), int(d), float(t), int(reps), int(threads))))
        return 0
    from contrastbound.benchsuite.report import (check_at_least_one, parse_log2_list, prepare_out_stem, run_worker,
                                                 write_rows_csv_json)

    check_at_least_one(parser, args, ("d", "threads", "reps"))
    if not 0 < args.t < float("inf"):
        parser.error(f"-t must be a positive finite number, got {args.t}")
    log2ns = parse_log2_list(parser, "--log2n", args.log2n, 1, 20)

    args.out = prepare_out_stem(parser, args.out)
    rows, failed = [], 0
    print(f"d = {args.d}, t = {args.t}, float32, {args.threads} threads, forward + backward, median of {args.reps}")
    print(f"{'N':>7} {'method':>6} {'time ms':>10} {'extra MiB':>10} {'value':>10}")
    for log2n in log2ns:
        N = 2 ** log2n
        for method in METHODS:
            if method == "pdist" and log2n > args.pdist_max_log2n:
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, str(N), str(args.d), repr(args.t),
                   str(args.reps), str(args.threads)]
            r, error = run_worker(cmd)
            if r is None:
                print(f"{N:>7} {method:>6} failed: {error}")
                failed += 1
                continue
            rows.append({"N": N, "method": method, "d": args.d, "t": args.t, "threads": args.threads,
                         "reps": args.reps, **r})
            print(f"{N:>7} {method:>6} {1e3 * r['time_s']:10.1f} {r['extra_mib']:10.1f} {r['value']:10.6f}")
    write_rows_csv_json(rows, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
