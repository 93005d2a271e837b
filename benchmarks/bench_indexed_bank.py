"""Indexed negatives from a bank much larger than the indices: forward+backward time and peak memory of the fused
loss against naive PyTorch (gather the rows, materialise the logits, F.cross_entropy), with a bank that needs a
gradient, per dtype.

The case of a large memory bank or a retrieval index (M rows, each anchor's K hard negatives picked by index, B K
much smaller than M): the bank's gradient is (M, d) whatever is done, so what matters is what a step adds beyond
it. Each (method, dtype) runs in a fresh subprocess; "extra" is the peak resident memory over the timed steps less
the resident memory before them (inputs allocated, warm-up step done and its gradients freed), so it includes the
(M, d) bank gradient itself (`grad_mib` says how much that is).

    python benchmarks/bench_indexed_bank.py                      # B = 256, K = 64, M = 2^20, d = 128, 2 threads
    python benchmarks/bench_indexed_bank.py --quick              # M = 2^18
Writes benchmarks/results/bench_indexed_bank.csv (and .json) unless --out is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = ("fused", "naive")
DTYPES = ("float32", "bfloat16", "float16")


def _worker(method: str, dtype_name: str, B: int, K: int, M: int, d: int, reps: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from contrastbound.benchsuite.harness import timed_steps

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(B, d, generator=g).to(dtype).requires_grad_(True)
    p = torch.randn(B, d, generator=g).to(dtype).requires_grad_(True)
    bank = torch.randn(M, d, generator=g).to(dtype).requires_grad_(True)
    idx = torch.randint(0, M, (B, K), generator=g)
    torch.mm(torch.randn(64, 64), torch.randn(64, 64)).sum().item()  # BLAS and the thread pool, before the baseline

    if method == "fused":
        import contrastbound as cb

        def loss_fn():
            return cb.info_nce(a, p, bank, negative_indices=idx, temperature=0.1)
    else:
        def loss_fn():
            an, pn = F.normalize(a, dim=1), F.normalize(p, dim=1)
            nn_ = F.normalize(bank[idx], dim=2)  # (B, K, d) gathered rows
            logits = torch.cat([(an * pn).sum(1, keepdim=True), torch.einsum("bd,bkd->bk", an, nn_)], 1) / 0.1
            return F.cross_entropy(logits.float(), torch.zeros(B, dtype=torch.long))

    def step():
        loss = loss_fn()
        loss.backward()
        return loss

    def clear():
        a.grad = p.grad = bank.grad = None

    r = timed_steps(step, clear, reps)
    return {"time_s": r["time_s"], "extra_mib": r["extra_mib"], "grad_mib": M * d * bank.element_size() / 2**20,
            "loss": r["loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="M = 2^18, 2 repeats")
    parser.add_argument("-B", type=int, default=256)
    parser.add_argument("-K", type=int, default=64)
    parser.add_argument("--log2m", type=int, default=20)
    parser.add_argument("-d", type=int, default=128)
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None, help="timed repeats (default 5; 2 with --quick)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "bench_indexed_bank"), help="CSV/JSON path without extension")
    parser.add_argument("--worker", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        m, dt, B, K, M, d, reps, threads = args.worker
        print(json.dumps(_worker(m, dt, int(B), int(K), int(M), int(d), int(reps), int(threads))))
        return 0
    from contrastbound.benchsuite.report import check_at_least_one, prepare_out_stem, run_worker, write_rows_csv_json

    check_at_least_one(parser, args, ("B", "K", "d", "threads", "reps"))
    if not 0 <= args.log2m <= 40:
        parser.error(f"--log2m must be in [0, 40], got {args.log2m}")
    for dt in args.dtypes.split(","):
        if dt not in DTYPES + ("float64",):
            parser.error(f"--dtypes: {dt!r} is not one of {', '.join(DTYPES + ('float64',))}")

    args.out = prepare_out_stem(parser, args.out)
    M = 2 ** (18 if args.quick and args.log2m == 20 else args.log2m)
    reps = args.reps or (2 if args.quick else 5)
    rows, failed = [], 0
    print(f"B = {args.B}, K = {args.K}, M = {M}, d = {args.d}, {args.threads} threads, median of {reps}")
    print(f"{'dtype':>9} {'method':>6} {'time ms':>9} {'extra MiB':>10} {'grad MiB':>9} {'loss':>9}")
    for dt in args.dtypes.split(","):
        for method in METHODS:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, dt, str(args.B), str(args.K), str(M),
                   str(args.d), str(reps), str(args.threads)]
            r, error = run_worker(cmd)
            if r is None:
                print(f"{dt:>9} {method:>6} failed: {error}")
                failed += 1
                continue
            row = {"dtype": dt, "method": method, "B": args.B, "K": args.K, "M": M, "d": args.d,
                   "threads": args.threads, "reps": reps, **r}
            rows.append(row)
            print(f"{dt:>9} {method:>6} {1e3 * r['time_s']:9.1f} {r['extra_mib']:10.1f} {r['grad_mib']:9.1f} "
                  f"{r['loss']:9.4f}")
    write_rows_csv_json(rows, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
