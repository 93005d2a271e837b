"""Where the wgmma kernels' cycles go: one forward + backward of the default kernels in a diagnostic build.

Needs an extension built with `CONTRASTBOUND_WG_TIMING=1` (setup.py; scripts/gpu_check.sh builds one in a copy of
the repository where TIMING_S > 0): each warpgroup of `wgmma_kernel` then adds the multiprocessor's cycles per phase
of its units (csrc/cuda/info_nce_wgmma.cuh, `WgTiming`) into the launch's totals, and each launch prints them as
one `CB_WGT` line. This script runs the step in a child process (device printf writes to the C-level stdout),
after one warm-up step, and prints, per kernel (forward, bank pass, forward without the anchors' term), the
cycles per 64-column tile per warpgroup in each phase, their shares, and the spread of the warpgroups' totals
(largest over mean):

    prologue   a unit's start: X and the first tiles copied, the first scores and coefficients
    wait       the wait for the next tile's copy and the block's barrier
    scores     the next tile's score product issued with this tile's output product, until the scores complete
    coef       the next tile's coefficients (exponentials, sums, masks), in the shadow of the output product
    output     the wait for the output product, the rescale (forward) and the coefficient copy
    epilogue   the last output product and the unit's epilogue

The Lse walk (FlashMode 2: the forward without the anchors' term, which the script runs under torch.no_grad after
the step, with CONTRASTBOUND_TC_WG_LSE=1) has one product and its own order: `scores` is only the issue of the next tile's score product, `coef`
this tile's exponentials and sums formed while it runs, `output` the wait for it that remains after them.

A tile's two products take ~2,200 cycles at the H200's dense bf16 peak (d = 256: 2 x 64 x 64 x 256 x 2 flop per
warpgroup, two warpgroups per multiprocessor), which is what `scores` + `output` would come to if the tensor cores
were the only limit.

    python benchmarks/wg_timing.py [--problem shared|in_batch|shared_mask|shared_labels] [--B 8192] [--K 262144]
        [--d 256] [--csv out.csv]

(shared_mask / shared_labels: as bench_gpu.py's, each anchor's own class of 100 left out by a negative_mask or by
labels.)

Without a GPU it prints "no GPU" and exits with status 0; with a build that prints no CB_WGT lines it says so and
exits with status 1.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys

PHASES = ("prologue", "wait", "scores", "coef", "output", "epilogue")
MODES = {0: "bank pass (FlashMode 0)", 1: "forward (FlashMode 1)", 2: "forward, no anchors' term (FlashMode 2)"}
_LINE = re.compile(r"CB_WGT mode=(\d+) warpgroups=(\d+) units=(\d+) tiles=(\d+) cycles=([\d,]+) max=(\d+) min=(\d+)")
_BEGIN, _END = "CB_WGT_BEGIN", "CB_WGT_END"


def parse(text: str) -> dict[int, dict]:
    """Per kernel mode, from the CB_WGT lines (one per launch) between the child's markers (all lines where it
    printed none): the warpgroups, units and tiles (of the blocks; each warpgroup walks its block's tiles), the
    cycles per phase summed over warpgroups, and the largest and smallest warpgroup total."""
    if _BEGIN in text:
        text = text.split(_BEGIN, 1)[1].split(_END, 1)[0]
    out: dict[int, dict] = {}
    for m in _LINE.finditer(text):
        mode, groups, units, tiles = (int(m.group(i)) for i in range(1, 5))
        cycles = [int(x) for x in m.group(5).split(",")]
        if len(cycles) != len(PHASES):
            raise ValueError(f"a CB_WGT line with {len(cycles)} phases, expected {len(PHASES)}: {m.group(0)}")
        r = out.setdefault(mode, {"launches": 0, "warpgroups": 0, "units": 0, "tiles": 0,
                                  "cycles": [0] * len(PHASES), "max": 0, "min": None})
        r["launches"] += 1
        r["warpgroups"] += groups
        r["units"] += units
        r["tiles"] += tiles
        r["cycles"] = [a + b for a, b in zip(r["cycles"], cycles)]
        r["max"] = max(r["max"], int(m.group(6)))
        r["min"] = int(m.group(7)) if r["min"] is None else min(r["min"], int(m.group(7)))
    return out


def table(stats: dict[int, dict]) -> list[dict]:
    """One row per kernel mode: per-tile cycles per warpgroup for each phase (a phase's cycles over the tiles the
    warpgroups walked, two per tile), the phase's share, and the warpgroups' totals: mean, max, min."""
    rows = []
    for mode in sorted(stats):
        r = stats[mode]
        wg_tiles = 2 * r["tiles"]  # each tile is walked by both warpgroups of its block
        total = sum(r["cycles"])
        row = {"kernel": MODES.get(mode, f"mode {mode}"), "launches": r["launches"], "warpgroups": r["warpgroups"],
               "units": r["units"], "tiles": r["tiles"]}
        for name, c in zip(PHASES, r["cycles"]):
            row[f"{name}_per_tile"] = c / wg_tiles if wg_tiles else float("nan")
            row[f"{name}_pct"] = 100.0 * c / total if total else float("nan")
        row["total_per_tile"] = total / wg_tiles if wg_tiles else float("nan")
        row["warpgroup_cycles_mean"] = total / r["warpgroups"] if r["warpgroups"] else float("nan")
        row["warpgroup_cycles_max"] = r["max"]
        row["warpgroup_cycles_min"] = r["min"]
        rows.append(row)
    return rows


def _print(rows: list[dict]) -> None:
    head = ["kernel", "warpgroups", "tiles"] + [p for p in PHASES] + ["total", "warpgroup max / mean"]
    print(" | ".join(head))
    for r in rows:
        cells = [r["kernel"], str(r["warpgroups"]), str(r["tiles"])]
        cells += [f"{r[f'{p}_per_tile']:.0f} ({r[f'{p}_pct']:.0f} %)" for p in PHASES]
        spread = r["warpgroup_cycles_max"] / r["warpgroup_cycles_mean"] if r["warpgroup_cycles_mean"] else float("nan")
        cells += [f"{r['total_per_tile']:.0f}", f"{spread:.3f}"]
        print(" | ".join(cells))
    print("(cycles per 64-column tile per warpgroup; the two products of a tile take ~2,200 at the H200's dense "
          "bf16 peak)")


def _child(args) -> int:
    import ctypes

    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import contrastbound as cb

    g = torch.Generator(device="cuda").manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    a = torch.randn(args.B, args.d, device=dev, dtype=dt, generator=g).requires_grad_()
    p = torch.randn(args.B, args.d, device=dev, dtype=dt, generator=g).requires_grad_()
    n = None if args.problem == "in_batch" else torch.randn(args.K, args.d, device=dev, dtype=dt,
                                                            generator=g).requires_grad_()
    extra = {}  # as bench_gpu.py's problems: each anchor's own class of 100 left out
    if args.problem in ("shared_mask", "shared_labels"):
        classes = torch.randint(0, 100, (args.B + args.K,), device=dev, generator=g)
        if args.problem == "shared_mask":
            extra = dict(negative_mask=classes[:args.B, None] != classes[None, args.B:])
        else:
            extra = dict(labels=classes[:args.B], negative_labels=classes[args.B:])

    def step():
        cb.info_nce(a, p, n, temperature=0.07, **extra).backward()
        os.environ["CONTRASTBOUND_TC_WG_LSE"] = "1"  # (opt-in: read by the extension at the start of each call)
        try:
            with torch.no_grad():  # a forward without the anchors' term: the Lse walk (FlashMode 2)
                cb.info_nce(a, p, n, temperature=0.07, **extra)
        finally:
            del os.environ["CONTRASTBOUND_TC_WG_LSE"]
        torch.cuda.synchronize()

    libc = ctypes.CDLL(None)
    step()  # warm-up (its lines come before the marker)
    libc.fflush(None)
    os.write(1, (_BEGIN + "\n").encode())
    step()
    libc.fflush(None)
    os.write(1, (_END + "\n").encode())
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problem", choices=("shared", "in_batch", "shared_mask", "shared_labels"), default="shared")
    ap.add_argument("--B", type=int, default=8192)
    ap.add_argument("--K", type=int, default=2**18, help="bank rows (in_batch: ignored, B rows)")
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--csv", help="write the table here too")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)
    try:
        import torch
    except ImportError:
        print("no torch")
        return 0
    if not torch.cuda.is_available():
        print("no GPU")
        return 0
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--problem", args.problem, "--B", str(args.B),
           "--K", str(args.K), "--d", str(args.d)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stdout[-2000:] + res.stderr[-4000:])
        print(f"wg_timing: the step failed (exit status {res.returncode})")
        return 1
    stats = parse(res.stdout)
    if not stats:
        print("wg_timing: no CB_WGT lines: build the extension with CONTRASTBOUND_WG_TIMING=1 (setup.py), on a GPU "
              "where the wgmma kernels serve (compute capability 9.0, TORCH_CUDA_ARCH_LIST with 9.0a)")
        return 1
    rows = table(stats)
    print(f"{args.problem}, bf16, B = {args.B}, K = {args.B if args.problem == 'in_batch' else args.K}, d = {args.d}")
    _print(rows)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
