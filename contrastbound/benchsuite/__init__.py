"""`contrastbound bench`: how time and memory grow with the number of negatives K, for the fused loss and for
what a user would otherwise write or install, measured on this machine.

For every mode (shared bank, per-anchor, indexed, in-batch, bank cross-entropy), B, d, dtype, device and K it
measures forward, backward and forward+backward median times after warm-up and the peak extra memory (on CPU each
configuration in a fresh process), the GEMM rate of the logits shape in the same run, and each method's effective
FLOP/s and fraction of that rate. It prints a table while it runs, then the log-log slope of time against K per
method (the fused loss must be linear: 0.9..1.1 from 2^14 up, fitted over at least 3 K: --quick has 2 there and
reports "too few points") and the headline ratios, and writes CSV, JSON (with
the machine) and log-log plots. Methods that cannot run somewhere are reported with the reason.

Effective FLOP/s count the useful work, recomputation not counted: 2 R K d forward (R rows of logits over K
columns) and 2 R K d backward, twice that when the negatives need a gradient (--bank-grad, in-batch, bank-ce).
The fused loss's forward also forms the anchors' gradient product when its inputs need a gradient (one pass over
the logits), so its forward time holds part of the backward work: its forward rate (fwd_gflops in the CSV) reads
about half of what the kernel does and its backward time is short; compare forward+backward.

    contrastbound bench --quick                       # under two minutes on 2 cores
    contrastbound bench                               # K = 2^10 .. 2^22 on CPU (2^24 on GPU), every mode
    contrastbound bench --modes shared --ks 2^16,2^20 --methods fused,naive,lightly
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time

from .._cli import out_folder_problem
from .harness import Config, count_pairs, probe, run_sweep
from .methods import METHODS, MODE_SETTINGS, MODES, Method
from .report import (format_headline, format_row, format_slopes, format_table, headline, machine_info, plot,
                     slopes, stale_plots, write_csv, write_json, HEADER)

__all__ = ["main", "run_sweep", "Config", "Method", "METHODS", "MODES"]

QUICK_KS = [2**12, 2**14, 2**16]


def _parse_ks(text: str) -> list[int]:
    """--ks: a comma list of integers or powers 2^N (argparse names a failed type by its function's name: errors
    are raised as ArgumentTypeError with their own message instead)."""
    out = []
    for part in _csv_list(text):
        try:
            e = int(part[2:]) if part.startswith("2^") else None
            if e is not None and not 0 <= e <= 62:  # (2 ** 4e10 would be computed first: minutes, then MemoryError)
                raise argparse.ArgumentTypeError(f"K values must lie in [1, 2^63), got {part!r}")
            k = 2**e if e is not None else int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"K values must be integers or 2^N, e.g. 2^10,65536; got {part!r}")
        if not 1 <= k < 2**63:
            raise argparse.ArgumentTypeError(f"K values must lie in [1, 2^63), got {part!r}")
        out.append(k)
    if not out:
        raise argparse.ArgumentTypeError("give at least one K, e.g. 2^10,65536")
    return sorted(set(out))


def _parse_ints(text: str) -> list[int]:
    """-B / -d: a comma list of positive integers."""
    try:
        values = [int(v) for v in _csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, e.g. 128,256; got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return values


def _csv_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def build_parser() -> argparse.ArgumentParser:
    import torch

    p = argparse.ArgumentParser(prog="contrastbound bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="mode shared, K = 2^12, 2^14, 2^16, 2 repeats, 20 s time bound (unless given); too few K "
                        "for the slope check (3 from 2^14)")
    p.add_argument("--modes", type=_csv_list, default=None, help=f"comma list of {','.join(MODES)} (default all)")
    p.add_argument("--methods", type=_csv_list, default=None,
                   help="comma list of method names (default all; gemm is always measured); see --list-methods")
    p.add_argument("--ks", type=_parse_ks, default=None, help="explicit K values, e.g. 2^10,2^14,65536")
    p.add_argument("--k-min", type=int, default=10, help="log2 of the smallest K (default 10)")
    p.add_argument("--k-max", type=int, default=None, help="log2 of the largest K (default 22 on CPU, 24 on GPU)")
    p.add_argument("--k-step", type=int, default=1, help="step of log2 K (default 1)")
    p.add_argument("-B", "--batch", type=_parse_ints, default=[256],
                   help="anchors per batch, comma list (default 256; in-batch mode uses N = K instead)")
    p.add_argument("-d", "--dim", type=_parse_ints, default=[128],
                   help="feature size, comma list (default 128)")
    p.add_argument("--dtype", type=_csv_list, default=["float32"], help="comma list: float32,bfloat16,float16,float64")
    p.add_argument("--device", type=_csv_list, default=None, help="comma list: cpu,cuda (default cpu, and cuda "
                   "when available)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads per worker (at most the logical CPUs)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repeats (median; default 3, 2 with --quick), fewer when over the time bound")
    p.add_argument("--warmup", type=int, default=1,
                   help="warm-up steps, at least 1 (the first step compiles and allocates; default 1)")
    p.add_argument("--time-bound", type=float, default=None,
                   help="seconds per configuration (default 120, 20 with --quick): a method whose step is estimated "
                        "to overrun is not run")
    p.add_argument("--mem-fraction", type=float, default=0.7,
                   help="run only when inputs + estimated extra fit in this fraction of the available memory")
    p.add_argument("--temperature", type=float, default=0.1, help="temperature of every loss (default %(default)s)")
    p.add_argument("--bank-grad", action="store_true", help="negatives need a gradient (default: a detached queue)")
    p.add_argument("--chunk", type=int, default=8192, help="chunk size of the chunked-ckpt method")
    p.add_argument("--slope-from", type=int, default=14, help="log2 K from which slopes are fitted (default 14)")
    p.add_argument("--out", default="contrastbound-results/bench", help="output folder (default %(default)s)")
    p.add_argument("--prefix", default="scaling", help="file name prefix of the CSV, JSON and plots")
    p.add_argument("--no-plots", action="store_true", help="write no PNG (CSV and JSON only; plots need matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar (the table is printed either way)")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process (no fresh process per configuration, no memory, no estimates)")
    p.add_argument("--list-methods", action="store_true", help="print the methods and their settings, then exit")
    return p


def _list_methods(device: str) -> str:
    lines = []
    for m in METHODS.values():
        why = m.unavailable(device)
        lines.append(f"{m.name:<17} {m.kind:<8} {m.note}" + (f"  [{why}]" if why else ""))
        for mode, setting in m.settings.items():
            lines.append(f"{'':<17}   {mode:<10} {setting}")
    return "\n".join(lines)


class _Progress:
    """tqdm when installed and stderr is a terminal (rows printed above the bar), plain prints otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                bar = tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stderr, disable=None)
                self.bar = None if bar.disable else bar  # (disable=None: no bar when stderr is not a terminal)
            except ImportError:
                pass

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def update(self, row: dict) -> None:
        if self.bar is not None:
            self.bar.set_description(f"{row['mode']} K={row['K']} {row['method']}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    # A value given twice is measured once, in the order first given (as --ks and --methods).
    for name in ("modes", "dtype", "device", "batch", "dim"):
        if getattr(args, name):
            setattr(args, name, list(dict.fromkeys(getattr(args, name))))
    # Bad arguments end here, before any measurement (not as failed rows with exit status 0, or after the sweep).
    if args.k_step < 1:
        parser.error(f"--k-step must be >= 1, got {args.k_step}")
    if args.ks is not None and min(args.ks, default=1) < 1:
        parser.error(f"--ks must be positive, got {args.ks}")
    bad = [x for x in args.dtype if x not in ("float32", "bfloat16", "float16", "float64")]
    if bad:
        parser.error(f"--dtype: unknown {bad}; choose from float32, bfloat16, float16, float64")
    bad = [x for x in (args.device or []) if x not in ("cpu", "cuda")]
    if bad:
        parser.error(f"--device: unknown {bad}; choose from cpu, cuda")
    if not args.dtype:
        parser.error("--dtype: give at least one of float32, bfloat16, float16, float64")
    if args.device is not None and not args.device:  # (--device , or "": not the default, which leaving it out gives)
        parser.error("--device: give at least one of cpu, cuda")
    for name, values in (("-B/--batch", args.batch), ("-d/--dim", args.dim)):
        if not values or min(values) < 1:
            parser.error(f"{name} must be positive integers, got {values}")
    # Defaults that --quick changes, unless given.
    if args.reps is None:
        args.reps = 2 if args.quick else 3
    if args.time_bound is None:
        args.time_bound = 20.0 if args.quick else 120.0
    for name, value, low in (("--threads", args.threads, 1), ("--reps", args.reps, 1), ("--warmup", args.warmup, 1),
                             ("--chunk", args.chunk, 1), ("--k-min", args.k_min, 0)):
        if value < low:
            parser.error(f"{name} must be >= {low}, got {value}")
    # (10^9 threads made every configuration an "out of memory" row from libgomp, with exit status 0; a misuse audit)
    cpus = os.cpu_count() or 1
    if args.threads > cpus and args.threads != parser.get_default("threads"):  # (a default from OMP_NUM_THREADS runs)
        parser.error(f"--threads must be at most this machine's {cpus} logical CPUs, got {args.threads}")
    if not 0 <= args.slope_from <= 62:
        parser.error(f"--slope-from is log2 K, from 0 to 62, got {args.slope_from}")
    k_range_given = args.k_max is not None or args.k_min != parser.get_default("k_min") or \
        args.k_step != parser.get_default("k_step")
    if k_range_given and (args.ks or args.quick):
        print(f"note: --k-min / --k-max / --k-step are ignored: {'--ks' if args.ks else '--quick'} sets the K",
              file=sys.stderr)
    if args.k_max is not None and args.k_max < args.k_min:
        parser.error(f"--k-max must be >= --k-min = {args.k_min}, got {args.k_max}")
    if max(args.k_min, args.k_max or 0) > 62:
        parser.error(f"--k-min / --k-max are log2 K and must be at most 62, got {args.k_min} / {args.k_max}")
    if not (0.0 < args.temperature < math.inf):
        parser.error(f"--temperature must be positive and finite, got {args.temperature}")
    if not (0.0 < args.time_bound < math.inf):
        parser.error(f"--time-bound must be positive and finite, got {args.time_bound}")
    if not (0.0 < args.mem_fraction <= 1.0):
        parser.error(f"--mem-fraction must lie in (0, 1], got {args.mem_fraction}")
    if "cuda" in (args.device or []) and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to this torch")
    if not args.prefix or os.sep in args.prefix:
        parser.error(f"--prefix must be a file name without a folder, got {args.prefix!r}")
    if not args.out or (os.path.exists(args.out) and not os.path.isdir(args.out)):
        parser.error(f"--out must name a folder, got {args.out!r}")
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    default_k_max = max(24 if dev.startswith("cuda") else 22 for dev in devices)
    if args.k_max is None and not args.ks and not args.quick and args.k_min > default_k_max:
        # (the default largest K is 2^22 on a CPU, 2^24 on a GPU: past it the sweep would be empty)
        parser.error(f"--k-min = {args.k_min} is above the default --k-max ({default_k_max} here): give --k-max")
    modes = args.modes or (["shared"] if args.quick else list(MODES))
    bad = [m for m in modes if m not in MODES]
    if bad:
        parser.error(f"--modes: unknown {bad}; modes are {', '.join(MODES)}")
    names = args.methods or list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; see --list-methods")
    for flag, given in (("--modes", args.modes), ("--methods", args.methods)):
        if given is not None and not given:  # ("," read as no names: it ran everything)
            parser.error(f"{flag}: no name given; leave it out for all")
    if args.methods is not None and not any(n != "gemm" and any(m in METHODS[n].settings for m in modes)
                                            for n in names):
        # (only the GEMM row would run: no slopes, no headline, exit 0 without a word)
        parser.error(f"--methods {','.join(names)}: none of them runs in --modes {','.join(modes)} (the modes "
                     "of each method: --list-methods)")
    if args.list_methods:  # (before --out is made: listing writes nothing)
        print(_list_methods(devices[-1]))
        return 0
    problem = out_folder_problem(args.out)  # before the sweep, not after it: the results would be lost
    if problem is not None:
        parser.error(f"--out {args.out!r} is not a folder that can be written: {problem}")
    methods = [METHODS[n] for n in dict.fromkeys(["gemm", *names])]

    configs = []
    for device in devices:
        if args.ks:
            ks = args.ks
        elif args.quick:
            ks = QUICK_KS
        else:
            k_max = args.k_max if args.k_max is not None else (24 if device.startswith("cuda") else 22)
            ks = [2**e for e in range(args.k_min, k_max + 1, args.k_step)]
        for mode in modes:
            for dtype in args.dtype:
                for B in args.batch if mode != "in-batch" else [0]:
                    for d in args.dim:
                        for K in ks:
                            configs.append(Config(
                                mode=mode, K=K, B=B or 1, d=d, dtype=dtype, device=device, threads=args.threads,
                                reps=args.reps, warmup=args.warmup, temperature=args.temperature,
                                bank_grad=args.bank_grad, chunk=args.chunk, time_bound=args.time_bound))

    machine = machine_info(args.threads)
    print(f"contrastbound bench: {len(configs)} configurations on {', '.join(devices)}; CPU {machine['cpu']}, "
          f"{args.threads} threads, torch {machine['torch']}" + (f", GPU {machine['gpu']}" if machine["gpu"] else ""))
    print("each configuration in a fresh process; time = median over repeats after warm-up; extra MiB = peak "
          "beyond inputs" if not args.in_process else "in-process: no memory measurement")
    reasons = {}
    for device in devices:
        reasons.update(probe(methods, modes, device))
    for mode in modes:
        print(f"\n{mode}: {MODE_SETTINGS[mode]}")
        for m in methods:
            if m.setting(mode) and m.kind != "gemm":
                why = m.unavailable(devices[0]) or reasons.get((m.name, mode))
                print(f"  {m.name:<17} {m.setting(mode)}" + (f"   [cannot run: {why}]" if why else ""))
    print()

    total = count_pairs(methods, configs)
    progress = _Progress(total, enabled=not args.no_progress)
    progress.write(HEADER)
    done: list[dict] = []  # the rows so far, written out if the sweep is interrupted
    # The live table has no dtype or device column: with several, a line names them where they change (rows of
    # two dtypes read alike; the CSV has both columns)
    several = len(devices) > 1 or len(dict.fromkeys(args.dtype)) > 1
    shown: list[tuple] = []

    def on_row(row: dict) -> None:
        done.append(row)
        group = (row.get("dtype"), row.get("device"))
        if several and shown[-1:] != [group]:
            shown.append(group)
            progress.write(f"-- {group[0]} on {group[1]} --")
        progress.write(format_row(row))
        progress.update(row)

    from .._cli import Terminated, sigterm_as_interrupt

    t0 = time.perf_counter()
    try:
        with sigterm_as_interrupt():
            rows = run_sweep(methods, configs, isolate=not args.in_process, mem_fraction=args.mem_fraction,
                             on_row=on_row, probe_reasons=reasons)
    except KeyboardInterrupt as exc:
        # Ctrl-C or SIGTERM (a long sweep stopped by hand, `timeout`, a scheduler): the rows measured so far are
        # written (they were lost: an empty --out after 28 measured rows), then the signal goes on as reproduce's.
        progress.close()
        cause = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
        written = _write_results(done, args, argv, time.perf_counter() - t0, machine, interrupted=cause)
        print(f"\ncontrastbound bench: interrupted ({cause}) after {len(done)} of {total} rows; wrote "
              + ", ".join(written), file=sys.stderr)
        if isinstance(exc, Terminated):
            sys.stdout.flush()
            sys.stderr.flush()
            signal.raise_signal(signal.SIGTERM)
        raise
    progress.close()
    wall = time.perf_counter() - t0

    fits = slopes(rows, args.slope_from)
    heads = headline(rows)
    print(f"\nlog-log slope of forward+backward time against K (from K = 2^{args.slope_from})")
    print(format_slopes(fits))
    print("\nfused vs each method at the largest K where both ran (speed-up = other time / fused time; "
          "fused<= : at how many common K the fused op was at least as fast; mem<= : used at most as much memory, "
          "of the common K where both memories were measured)")
    print(format_headline(heads))

    written = _write_results(rows, args, argv, wall, machine, fits=fits, heads=heads)
    print(f"\nwall time {wall:.0f} s; wrote " + ", ".join(written))
    failed_fused = [f for f in fits if f.get("check") == "FAIL"]
    if failed_fused:
        print("warning: the fused loss is not linear in K here: "
              + "; ".join(f"{f['group']} slope {f['slope']:.2f}" for f in failed_fused))
    if not any(r.get("status") == "ok" and r.get("kind") != "gemm" for r in rows):
        # (it exited 0 with empty tables where every row was skipped or failed: K too large for the memory, say)
        print("contrastbound bench: error: no method was measured: every row was skipped or failed (their reasons "
              "are in the table and the CSV's reason column)", file=sys.stderr)
        return 1
    return 0


def _write_results(rows: list[dict], args, argv, wall: float, machine: dict, *, fits=None, heads=None,
                   interrupted: str | None = None) -> list[str]:
    """Writes the CSV, the JSON and (unless --no-plots) the plots of ``rows``; returns the paths written.
    interrupted: what stopped the sweep ("Ctrl-C", "SIGTERM"), recorded in the JSON; the rows are those measured."""
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, args.prefix)
    write_csv(rows, base + ".csv")
    payload = {"command": "contrastbound bench " + " ".join(argv if argv is not None else sys.argv[1:]),
               "wall_s": wall, "machine": machine, "options": {k: v for k, v in vars(args).items()},
               "rows": rows, "slopes": fits if fits is not None else slopes(rows, args.slope_from),
               "headline": heads if heads is not None else headline(rows)}
    if interrupted:
        payload["interrupted"] = interrupted
    write_json(payload, base + ".json")
    written = [base + ".csv", base + ".json"]
    pngs: list[str] = []
    if not args.no_plots:
        pngs = plot(rows, base)
        written += pngs
        if not pngs and any(r.get("status") == "ok" for r in rows):
            print("note: no plots: matplotlib is not installed (pip install matplotlib, or pass --no-plots)")
    stale = stale_plots(base, pngs)
    if stale:
        print(f"note: {len(stale)} plot(s) with the prefix {args.prefix!r} in {args.out} are an earlier run's "
              "(this run replaced its CSV and JSON; a new --prefix keeps runs apart): "
              + ", ".join(os.path.basename(p) for p in stale))
    return written


def table(rows: list[dict]) -> str:
    """The plain table of ``rows`` (as printed while running)."""
    return format_table(rows)
