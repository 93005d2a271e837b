"""Hard-negative mining from a large bank: time and peak memory of cb.mine_hard_negatives (tiles of the bank, a
running top-k) against naive PyTorch (normalise the bank, materialise the (B, M) similarities, torch.topk), per
bank size M.

Each (M, method) runs in a fresh subprocess; "extra" is the peak resident memory over the timed calls less the
resident memory before them (inputs allocated, a warm-up call done), so the bank itself is not counted. `agree` is
the fraction of the (B, k) indices equal to naive's (float32 near-ties may go either way), `gflops` the GEMM's
2 B M d flop over the time, `mm_gflops` (mine's rows) the rate of the same tiled GEMMs alone, torch.mm into a
preallocated tile, measured in the same process after the timed calls.

    python benchmarks/bench_mining.py                    # B = 256, d = 128, k = 16, M = 2^16 .. 2^22, 2 threads
    python benchmarks/bench_mining.py --log2m 12,14      # smaller banks
Writes benchmarks/results/bench_mining.csv (and .json) unless --out is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = ("mine", "naive")


def _worker(method: str, B: int, M: int, d: int, k: int, reps: int, threads: int, indices_path: str) -> dict:
    import torch
    import torch.nn.functional as F

    from contrastbound.benchsuite.harness import timed_steps

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(B, d, generator=g)
    bank = torch.randn(M, d, generator=g)
    torch.mm(torch.randn(64, 64), torch.randn(64, 64)).sum().item()  # BLAS and the thread pool, before the baseline
    out = {}

    if method == "mine":
        import contrastbound as cb

        def mine():
            return cb.mine_hard_negatives(a, bank, k)
    else:
        def mine():
            sim = F.normalize(a, dim=1) @ F.normalize(bank, dim=1).T  # (B, M)
            return sim.topk(k, dim=1)

    def step():
        out["result"] = mine()
        return out["result"].values[:, 0].sum()

    def clear():
        out.pop("result", None)

    r = timed_steps(step, clear, reps)
    step()
    if indices_path:
        torch.save(out["result"].indices, indices_path)
    mm = float("nan")
    if method == "mine":
        mm = 2 * B * M * d / _tile_gemm_time(a, bank) / 1e9
    return {"time_s": r["time_s"], "extra_mib": r["extra_mib"], "gflops": 2 * B * M * d / r["time_s"] / 1e9,
            "mm_gflops": mm, "top_sum": r["loss"]}


def _tile_gemm_time(a, bank) -> float:
    """Seconds of the tiled product alone: torch.mm of each block of anchors with each tile of the bank (the tile
    shape mine_hard_negatives uses, k aside) into one preallocated output, the rows not normalised: the rate of the
    GEMMs the mining is made of, measured in the same process (best of 2)."""
    import time

    import torch

    from contrastbound.metrics import _tile_shape

    B, d = a.shape
    M = bank.shape[0]
    rows, cols = _tile_shape(B, M, d)
    buf = torch.empty(min(B, rows), min(M, cols))
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        for k0 in range(0, M, cols):
            tile = bank[k0:k0 + cols]
            for i0 in range(0, B, rows):
                blk = a[i0:i0 + rows]
                torch.mm(blk, tile.T, out=buf[:blk.shape[0], :tile.shape[0]])
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-B", type=int, default=256)
    parser.add_argument("-d", type=int, default=128)
    parser.add_argument("-k", type=int, default=16)
    parser.add_argument("--log2m", default="16,18,20,22", help="bank sizes as powers of two, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3, help="timed repeats (median)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "bench_mining"), help="CSV/JSON path without extension")
    parser.add_argument("--worker", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        m, B, M, d, k, reps, threads, path = args.worker
        print(json.dumps(_worker(m, int(B), int(M), int(d), int(k), int(reps), int(threads), path)))
        return 0
    import tempfile

    import torch

    from contrastbound.benchsuite.report import (check_at_least_one, parse_log2_list, prepare_out_stem, run_worker,
                                                 write_rows_csv_json)

    check_at_least_one(parser, args, ("B", "d", "k", "threads", "reps"))
    log2ms = parse_log2_list(parser, "--log2m", args.log2m, 0, 34)

    args.out = prepare_out_stem(parser, args.out)
    rows, failed = [], 0
    print(f"B = {args.B}, d = {args.d}, k = {args.k}, float32, {args.threads} threads, median of {args.reps}")
    print(f"{'M':>9} {'method':>6} {'time ms':>9} {'GFLOP/s':>8} {'mm GF/s':>8} {'extra MiB':>10} {'agree':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for log2m in log2ms:
            M = 2 ** log2m
            found = {}
            for method in METHODS:
                path = os.path.join(tmp, f"{method}_{M}.pt")
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, str(args.B), str(M),
                       str(args.d), str(args.k), str(args.reps), str(args.threads), path]
                r, error = run_worker(cmd)
                if r is None:
                    print(f"{M:>9} {method:>6} failed: {error}")
                    failed += 1
                    continue
                found[method] = (r, torch.load(path))
            for method, (r, idx) in found.items():
                agree = float((idx == found["naive"][1]).float().mean()) if "naive" in found else float("nan")
                row = {"M": M, "method": method, "B": args.B, "d": args.d, "k": args.k, "threads": args.threads,
                       "reps": args.reps, **r, "agree": agree}
                rows.append(row)
                print(f"{M:>9} {method:>6} {1e3 * r['time_s']:9.1f} {r['gflops']:8.1f} {r['mm_gflops']:8.1f} "
                      f"{r['extra_mib']:10.1f} {agree:6.3f}")
    write_rows_csv_json(rows, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
