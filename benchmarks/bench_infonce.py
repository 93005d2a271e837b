"""Forward+backward time and peak memory of the fused InfoNCE against naive PyTorch, over K.

Every (method, K) runs in a fresh subprocess. Memory: after the warm-up step (whose one-off costs, code pages,
thread pools, autograd's and inductor's first use, go to `warmup_extra_mib`), with its gradients and loss freed
(gradients set to None between steps, as `zero_grad()` does), the peak resident memory (Linux VmHWM) is reset to
the current one; "extra" is the peak over the timed steps minus it: what a step needs beyond its inputs, their
gradients included (`grads_mib` says how much of it they are: 512 MiB of bank gradient at K = 2^20). Before
2026-12-01 it was the peak from before the warm-up less the gradients, which counted the one-off costs and, for
naive, subtracted a bank gradient that is not alive at its peak (its peak comes before that gradient exists). The GEMM rate is
torch.mm's of the same (B, d) x (d, K) product in column tiles of 4096 written into one reused (B, 4096) buffer (in
cache: a compute rate; the whole (B, K) product written to memory was the rate of memory writes, which the fused loss
exceeded). The effective rate is the loss's matrix flop count over the forward+backward time: 6*B*K*d (logits,
anchors' and bank's gradients), 4*B*K*d for a detached bank (no bank gradient).

    python benchmarks/bench_infonce.py                 # K = 2^12 ... 2^22, B = 256, d = 128, float32, 2 threads
    python benchmarks/bench_infonce.py --quick         # K = 2^12 ... 2^16
Writes benchmarks/results/bench_infonce.csv (and .json) unless --out is given.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time

# Runs from a checkout with an in-place build (no install): the repository root comes first on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = {
    "fused": "contrastbound.info_nce, bank needs grad",
    "fused_detached": "contrastbound.info_nce, detached bank (MoCo queue)",
    "naive": "materialised logits + F.cross_entropy, bank needs grad",
    "naive_detached": "materialised logits + F.cross_entropy, detached bank",
    "compiled_naive": "torch.compile(naive), bank needs grad (compile time apart)",
}


def _naive(a, p, n, temperature=0.1):
    import torch
    import torch.nn.functional as F

    a = F.normalize(a, dim=1)
    p = F.normalize(p, dim=1)
    n = F.normalize(n, dim=1)
    logits = torch.cat([(a * p).sum(1, keepdim=True), a @ n.t()], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(a.shape[0], dtype=torch.long))


def _worker(method: str, B: int, K: int, d: int, reps: int, threads: int) -> dict:
    import torch

    from contrastbound.benchsuite.harness import timed_steps

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    detached = method.endswith("detached")
    a = torch.randn(B, d, requires_grad=True)
    p = torch.randn(B, d, requires_grad=True)
    bank = torch.randn(K, d, requires_grad=not detached)
    # Initialise BLAS and the thread pool before the baseline, so their buffers are not counted as extra.
    torch.mm(torch.randn(64, 64), torch.randn(64, 64)).sum().item()
    if method == "gemm":
        cols = min(K, 4096)
        out = torch.empty(B, cols)
        x, y = a.detach(), bank.detach()

        def run():
            for s in range(0, K, cols):
                e = min(K, s + cols)
                torch.mm(x, y[s:e].t(), out=out[:, : e - s])

        run()  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return {"time_s": statistics.median(times), "gflops": 2 * B * K * d / statistics.median(times) / 1e9}

    if method.startswith("fused"):
        import contrastbound as cb

        def step():
            loss = cb.info_nce(a, p, bank, temperature=0.1)
            loss.backward()
            return loss
    else:
        fn = _naive
        if method == "compiled_naive":
            fn = torch.compile(_naive)

        def step():
            loss = fn(a, p, bank)
            loss.backward()
            return loss

    grads_mib = (2 * B * d + (0 if detached else K * d)) * 4 / 2**20

    def clear():
        a.grad = p.grad = bank.grad = None

    r = timed_steps(step, clear, reps)
    return {
        "time_s": r["time_s"],
        "warmup_s": r["warmup_s"],
        "extra_mib": r["extra_mib"],
        "warmup_extra_mib": r["warmup_extra_mib"],
        "grads_mib": grads_mib,
        "loss": r["loss"],
        "effective_gflops": (4 if detached else 6) * B * K * d / r["time_s"] / 1e9,
    }


def _estimate_extra_mib(method: str, B: int, K: int) -> float:
    # Measured here (K = 2^21, d = 128): naive ~3.0 logits' worth beyond the gradients, torch.compile ~1.6.
    logits = B * K * 4 / 2**20
    return {"naive": 3.2, "naive_detached": 3.2, "compiled_naive": 1.8}.get(method, 0.05) * logits


def _available_mib() -> float:
    from contrastbound.benchsuite.harness import available_mib

    return available_mib("cpu")


def _machine(threads: int) -> dict:
    from contrastbound.benchsuite.report import machine_info

    return machine_info(threads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="K = 2^12 ... 2^16, 2 repeats (unless --reps is given)")
    parser.add_argument("--min-log2k", type=int, default=12)
    parser.add_argument("--max-log2k", type=int, default=22)
    parser.add_argument("-B", type=int, default=256)
    parser.add_argument("-d", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None, help="timed repeats (default 3; 2 with --quick)")
    parser.add_argument("--methods", default=",".join(["gemm", *METHODS]))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "bench_infonce"),
                        help="output path without extension: writes OUT.csv and OUT.json (a trailing .csv is dropped; "
                             "default %(default)s)")
    parser.add_argument("--worker", nargs=6, metavar=("METHOD", "B", "K", "D", "REPS", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        m, B, K, d, reps, threads = args.worker
        print(json.dumps(_worker(m, int(B), int(K), int(d), int(reps), int(threads))))
        return 0
    if args.reps is None:
        args.reps = 2 if args.quick else 3
    if args.quick:
        args.max_log2k = min(args.max_log2k, 16)
    if args.min_log2k < 0 or args.max_log2k < args.min_log2k:
        # (an empty range wrote a table of no rows over the committed one; 2^-1 failed as K = 0.5)
        parser.error(f"--min-log2k and --max-log2k must satisfy 0 <= min <= max, got {args.min_log2k} and "
                     f"{args.max_log2k}" + (" (--quick caps max at 16)" if args.quick else ""))
    # (the GEMM first, whatever the order given: the other rows' fraction of its rate needs it; repeats once)
    methods = sorted(dict.fromkeys(args.methods.split(",")), key=lambda m: m != "gemm")
    unknown = [m for m in methods if m not in ("gemm", *METHODS)]
    if unknown:  # (an unknown name was measured as naive PyTorch under that name)
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(['gemm', *METHODS])}")
    for name in ("B", "d", "threads", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"-{name if len(name) == 1 else '-' + name} must be >= 1, got {getattr(args, name)}")
    from contrastbound.benchsuite.report import prepare_out_stem, run_worker

    args.out = prepare_out_stem(parser, args.out)  # (before measuring)
    rows = []
    header = f"{'K':>9} {'method':>15} {'time s':>8} {'extra MiB':>10} {'eff GF/s':>9} {'of GEMM':>8} {'note':}"
    print(f"B = {args.B}, d = {args.d}, float32, {args.threads} threads; each row a fresh process")
    print(header)
    for log2k in range(args.min_log2k, args.max_log2k + 1):
        K = 2**log2k
        gemm_rate = None
        for m in methods:
            row = {"K": K, "B": args.B, "d": args.d, "method": m, "threads": args.threads}
            est = _estimate_extra_mib(m, args.B, K) + K * args.d * 4 * 2 / 2**20  # + the bank and its gradient
            if est > 0.7 * _available_mib():
                row["note"] = f"not run: needs about {est / 1024:.1f} GiB, {_available_mib() / 1024:.1f} GiB available"
            else:
                reps = args.reps if K < 2**21 else min(args.reps, 2)  # the largest sizes take tens of seconds each
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", m, str(args.B), str(K), str(args.d),
                       str(reps), str(args.threads)]
                r, error = run_worker(cmd)
                if r is None:
                    row["note"] = "failed: " + error[:120]
                else:
                    row.update(r)
                    if m == "gemm":
                        gemm_rate = row["gflops"]
                    elif gemm_rate:
                        row["fraction_of_gemm"] = row["effective_gflops"] / gemm_rate
            rows.append(row)
            eff = row.get("effective_gflops", row.get("gflops"))
            print(
                f"{K:>9} {m:>15} {row.get('time_s', float('nan')):>8.3f} {row.get('extra_mib', float('nan')):>10.1f} "
                f"{eff if eff is not None else float('nan'):>9.1f} {row.get('fraction_of_gemm', float('nan')):>8.2f} "
                f"{row.get('note', '')}",
                flush=True,
            )
    # Headline ratios at each K where both ran.
    by = {(r["K"], r["method"]): r for r in rows}
    print("\nspeed-up of fused over the others (time ratio) and memory ratio (extra MiB fused / other)")
    for K in sorted({r["K"] for r in rows}):
        f = by.get((K, "fused"))
        if not f or "time_s" not in f:
            continue
        parts = []
        for other in ("naive", "compiled_naive"):
            o = by.get((K, other))
            if o and "time_s" in o:
                mem = f"{f['extra_mib'] / o['extra_mib']:.3f}" if o["extra_mib"] >= 1.0 else "n/a (other's extra < 1 MiB)"
                parts.append(f"vs {other}: {o['time_s'] / f['time_s']:.2f}x time, memory {mem}")
        fd, nd = by.get((K, "fused_detached")), by.get((K, "naive_detached"))
        if fd and nd and "time_s" in fd and "time_s" in nd:
            parts.append(f"detached: {nd['time_s'] / fd['time_s']:.2f}x")
        print(f"K = 2^{K.bit_length() - 1}: " + "; ".join(parts))
    keys = ["K", "B", "d", "method", "threads", "time_s", "warmup_s", "extra_mib", "warmup_extra_mib", "grads_mib",
            "effective_gflops", "gflops", "fraction_of_gemm", "loss", "note"]
    with open(args.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(args.out + ".json", "w") as f:
        json.dump({"machine": _machine(args.threads), "command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    print(f"\nwrote {args.out}.csv and {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
