"""Top-1/top-5 accuracy of the contrastive task over a shared bank, without the logits (contrastbound's
contrastive_accuracy) against MoCo's way (materialise [l_pos, l_neg], torch.topk): time and peak memory, per K.

B = 256 anchors, d = 128, float32, no gradient (a metric logged beside the loss). Each (method, K) runs in a fresh
subprocess; "extra" is the peak resident memory over the timed calls less the resident memory before them (inputs
allocated, a warm-up call done). The torch.mm rate is that of the same (B, d) x (d, K) product into a preallocated
output, in the same worker (the fused method's), and the fused rate counts its 2BKd flop.

    python benchmarks/bench_accuracy.py                     # K = 2^12 ... 2^20, 2 threads
    python benchmarks/bench_accuracy.py --log2k 12,16       # chosen K
Writes benchmarks/results/bench_accuracy.csv unless --out is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = ("fused", "naive")


def _worker(method: str, B: int, K: int, d: int, reps: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from contrastbound.benchsuite.harness import timed_steps

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(B, d, generator=g)
    p = a + 2 * torch.randn(B, d, generator=g)  # (correlated pairs: accuracies away from 0 and 1)
    bank = torch.randn(K, d, generator=g)
    torch.mm(torch.randn(64, 64), torch.randn(64, 64)).sum().item()  # BLAS and the thread pool, before the baseline

    if method == "fused":
        import contrastbound as cb

        def step():
            return cb.contrastive_accuracy(a, p, bank, topk=(1, 5))
    else:
        def step():  # MoCo's accuracy(output, target, topk=(1, 5)) on its logits
            an, pn, bn = F.normalize(a, dim=1), F.normalize(p, dim=1), F.normalize(bank, dim=1)
            logits = torch.cat([(an * pn).sum(1, keepdim=True), an @ bn.T], 1)
            _, pred = logits.topk(5, 1, True, True)
            correct = pred.eq(0)
            return torch.stack([correct[:, :k].any(1).float().mean() for k in (1, 5)])

    result = {}
    with torch.no_grad():
        r = timed_steps(lambda: step()[0], lambda: None, reps)
        result.update(time_s=r["time_s"], extra_mib=r["extra_mib"], acc1=r["loss"], acc5=float(step()[1]))
        if method == "fused":
            bn = F.normalize(bank, dim=1)
            out = torch.empty(B, K)  # (written in place, as the fused tiles are: no page faults of a fresh output)
            times = []
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                torch.mm(a, bn.T, out=out)
                times.append(time.perf_counter() - t0)
            result["mm_gflops"] = 2 * B * K * d / sorted(times[1:])[len(times[1:]) // 2] / 1e9
            result["gflops"] = 2 * B * K * d / r["time_s"] / 1e9
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log2k", default="12,14,16,18,20", help="comma-separated log2 K (default 12,14,16,18,20)")
    parser.add_argument("-B", type=int, default=256)
    parser.add_argument("-d", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5, help="timed calls per (method, K), median (default 5)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "bench_accuracy"), help="CSV path without extension")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        m, B, K, d, reps, threads = args.worker
        print(json.dumps(_worker(m, int(B), int(K), int(d), int(reps), int(threads))))
        return 0
    from contrastbound.benchsuite.report import (check_at_least_one, parse_log2_list, prepare_out_stem, run_worker,
                                                 write_rows_csv)

    check_at_least_one(parser, args, ("B", "d", "threads", "reps"))
    log2k = parse_log2_list(parser, "--log2k", args.log2k, 0, 30)

    args.out = prepare_out_stem(parser, args.out)
    rows, failed = [], 0
    print(f"B = {args.B}, d = {args.d}, float32, {args.threads} threads, median of {args.reps}, no gradient")
    print(f"{'K':>9} {'method':>6} {'time ms':>9} {'extra MiB':>10} {'acc@1':>7} {'acc@5':>7} {'GF/s':>7} {'mm GF/s':>8}")
    for e in log2k:
        K = 2 ** e
        for method in METHODS:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, str(args.B), str(K), str(args.d),
                   str(args.reps), str(args.threads)]
            r, error = run_worker(cmd)
            if r is None:
                print(f"{K:>9} {method:>6} failed: {error}")
                failed += 1
                continue
            rows.append({"K": K, "method": method, "B": args.B, "d": args.d, "threads": args.threads,
                         "reps": args.reps, **r})
            rate = f"{r['gflops']:7.1f} {r['mm_gflops']:8.1f}" if "gflops" in r else f"{'':7} {'':8}"
            print(f"{K:>9} {method:>6} {1e3 * r['time_s']:9.2f} {r['extra_mib']:10.1f} {r['acc1']:7.4f} "
                  f"{r['acc5']:7.4f} {rate}")
    if rows:
        write_rows_csv(rows, args.out + ".csv")
        print(f"wrote {args.out}.csv")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
