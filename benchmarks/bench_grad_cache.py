"""grad_cache against the direct step: SimCLR (nt_xent over two views of N samples) with an MLP encoder, one
training step's forward + backward, time and peak memory, on the CPU.

The encoder: d_in -> hidden -> hidden -> 128 (GELU, dropout 0.1, float32), whose saved activations (~18 KiB a row
at hidden = 1024) grow with the batch while the fused loss's memory stays O(N). Methods:
- direct: the encoder over each whole view, then the fused ``nt_xent`` (the usual step);
- grad_cache: ``contrastbound.grad_cache(nt_xent, encoder, [view1, view2], chunk_size=--chunk)``;
- plain: the encoder over each whole view, then nt_xent over the materialised 2N x 2N logits (skipped where four
  copies of that matrix would pass 0.7 of the memory available when the script starts).
Each (method, N) runs in a fresh subprocess; memory is the peak resident memory of the step above a baseline taken
after a warm-up step with its gradients freed (VmHWM reset; ru_maxrss where /proc is missing), as in
bench_training.py. The gradients of both methods are compared in float64 by tests/test_grad_cache.py, not here.

    python benchmarks/bench_grad_cache.py                        # N = 2^11 ... 2^15, chunk 512
    python benchmarks/bench_grad_cache.py --max-log2n 12 --reps 1  # quicker
Writes benchmarks/results/bench_grad_cache.csv (or --out OUT: OUT.csv).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import statistics
import sys
import time

# Runs from a checkout with an in-place build (no install): the repository root comes first on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = ("direct", "grad_cache", "plain")


def _plain_nt_xent(z1, z2, t):
    import torch
    import torch.nn.functional as F

    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    n = len(z1)
    logits = z @ z.T / t
    logits.fill_diagonal_(float("-inf"))
    return F.cross_entropy(logits, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))


def _worker(method: str, N: int, d_in: int, hidden: int, chunk: int, reps: int, threads: int) -> dict:
    import torch

    import contrastbound as cb
    from contrastbound.benchsuite.harness import _reset_rss_peak, _rss_peak_mib

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden), torch.nn.GELU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(hidden, 128),
    )
    x1, x2 = torch.randn(N, d_in), torch.randn(N, d_in)
    loss_fn = lambda a, b: cb.nt_xent(a, b, 0.5)  # noqa: E731
    if method == "grad_cache":
        def step():
            return cb.grad_cache(loss_fn, encoder, [x1, x2], chunk_size=chunk)
    else:
        plain = method == "plain"

        def step():
            z1, z2 = encoder(x1), encoder(x2)
            loss = _plain_nt_xent(z1, z2, 0.5) if plain else loss_fn(z1, z2)
            loss.backward()
            return loss.detach()

    def run():
        encoder.zero_grad(set_to_none=False)  # (gradient buffers kept, as an optimizer loop keeps them)
        return step()

    t0 = time.perf_counter()
    run()  # warm-up: allocates the gradient buffers and pays one-off costs
    warmup = time.perf_counter() - t0
    gc.collect()
    _reset_rss_peak()
    base = _rss_peak_mib()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        loss = run()
        times.append(time.perf_counter() - t0)
    return {"time_s": statistics.median(times), "warmup_s": warmup, "extra_mib": _rss_peak_mib() - base,
            "loss_value": float(loss)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-log2n", type=int, default=11)
    parser.add_argument("--max-log2n", type=int, default=15)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of %(default)s")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "bench_grad_cache"),
                        help="output path without extension: writes OUT.csv (default %(default)s)")
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, *numbers = args.worker
        print(json.dumps(_worker(method, *map(int, numbers))))
        return 0
    for name in ("d_in", "hidden", "chunk", "reps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.min_log2n <= args.max_log2n:
        parser.error(f"need 0 <= --min-log2n <= --max-log2n, got {args.min_log2n} and {args.max_log2n}")
    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    if not methods or any(m not in METHODS for m in methods):
        parser.error(f"--methods takes a comma list of {', '.join(METHODS)}, got {args.methods!r}")
    from contrastbound.benchsuite.report import prepare_out_stem, run_worker

    args.out = prepare_out_stem(parser, args.out)
    from contrastbound.benchsuite.harness import available_mib

    plain_limit_mib = 0.7 * available_mib("cpu")  # (inf where /proc/meminfo is missing: plain always runs)
    print(f"SimCLR step, MLP {args.d_in} -> {args.hidden} -> {args.hidden} -> 128, float32, chunk {args.chunk}, "
          f"{args.threads} threads; each row a fresh process")
    print(f"{'N':>7} {'method':>10} {'time s':>8} {'extra MiB':>10}  note")
    rows = []
    for log2n in range(args.min_log2n, args.max_log2n + 1):
        N = 2**log2n
        for method in methods:
            row = {"N": N, "method": method, "d_in": args.d_in, "hidden": args.hidden,
                   "chunk": args.chunk if method == "grad_cache" else "", "threads": args.threads}
            matrix_mib = (2 * N) ** 2 * 4 / 2**20
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, str(N), str(args.d_in),
                   str(args.hidden), str(args.chunk), str(args.reps), str(args.threads)]
            if method == "plain" and 4 * matrix_mib > plain_limit_mib:
                row["note"] = (f"not run: the {2 * N} x {2 * N} logits and the copies its step holds need "
                               f"~{4 * matrix_mib / 1024:.1f} GiB, over 0.7 of the memory available")
            else:
                r, error = run_worker(cmd)
                if r is None:
                    row["note"] = "failed: " + error[:100]
                else:
                    row.update(r)
            rows.append(row)
            print(f"{N:>7} {method:>10} {row.get('time_s', float('nan')):>8.3f} "
                  f"{row.get('extra_mib', float('nan')):>10.1f}  {row.get('note', '')}", flush=True)
    with open(args.out + ".csv", "w", newline="") as f:
        keys = ["N", "method", "d_in", "hidden", "chunk", "threads", "time_s", "warmup_s", "extra_mib",
                "loss_value", "note"]
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
