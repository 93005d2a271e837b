"""Output of the scaling benchmark: the terminal table, slope fits, headline ratios, CSV, JSON and plots."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
from collections import defaultdict

from .harness import fit_slope
from .methods import CLIP_SETTING, NTXENT_SETTING

CSV_FIELDS = [
    "device", "mode", "setting", "method", "kind", "dtype", "B", "d", "K", "threads", "bank_grad", "status",
    "fwd_s", "bwd_s", "fwdbwd_s", "warmup_s", "compile_s", "reps", "extra_mib", "warmup_extra_mib", "flops",
    "eff_gflops", "fwd_gflops", "gemm_gflops", "frac_gemm", "loss", "note", "reason",
]

HEADER = (f"{'mode':<10} {'method':<16} {'K':>9} {'B':>6} {'d':>4} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} "
          f"{'extra MiB':>10} {'GFLOP/s':>8} {'of GEMM':>7}  note")


def _measured(v) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


def _num(v, fmt: str, width: int) -> str:
    return f"{v:{width}{fmt}}" if _measured(v) else f"{'-':>{width}}"


def format_row(r: dict) -> str:
    ms = lambda k: r[k] * 1e3 if isinstance(r.get(k), (int, float)) else None  # noqa: E731
    rate = r.get("eff_gflops", r.get("gemm_gflops") if r.get("kind") == "gemm" else None)
    note = r.get("reason") or r.get("note") or ""
    if r.get("compile_s") is not None:
        note = (f"compile {r['compile_s']:.1f} s; " + note).strip("; ")
    return (f"{r['mode']:<10} {r['method']:<16} {r['K']:>9} {r['B']:>6} {r['d']:>4} {_num(ms('fwd_s'), '.2f', 9)} "
            f"{_num(ms('bwd_s'), '.2f', 9)} {_num(ms('fwdbwd_s'), '.2f', 9)} {_num(r.get('extra_mib'), '.1f', 10)} "
            f"{_num(rate, '.1f', 8)} {_num(r.get('frac_gemm'), '.2f', 7)}  {note}")


def format_table(rows: list[dict]) -> str:
    return "\n".join([HEADER] + [format_row(r) for r in rows])


def _group_key(r: dict) -> tuple:
    return (r["device"], r["mode"], r["dtype"], r["B"] if r["mode"] != "in-batch" else 0, r["d"])


def _group_name(key: tuple) -> str:
    device, mode, dtype, B, d = key
    return f"{mode} {dtype} {device} d={d}" + ("" if mode == "in-batch" else f" B={B}")


def _fused_for(setting: str) -> str:
    return {NTXENT_SETTING: "fused-ntxent", CLIP_SETTING: "fused-clip"}.get(setting, "fused")


def slopes(rows: list[dict], from_log2k: int = 14) -> list[dict]:
    """Per (group, method): the log-log slope of forward+backward time against K, over K >= 2^from_log2k
    (all measured K when fewer than two are that large). Fused rows are checked against 0.9..1.1 (2 in-batch,
    where N = K) when at least three K are that large: two points at small K measure fixed costs as much as K
    (--quick's 2^14 and 2^16 gave slopes of 0.75-0.83), so they get no verdict."""
    by = defaultdict(list)
    for r in rows:
        if r.get("status") == "ok" and r.get("fwdbwd_s"):
            by[(_group_key(r), r["method"])].append(r)
    out = []
    for (g, m), rs in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        rs = sorted(rs, key=lambda r: r["K"])
        big = [r for r in rs if r["K"] >= 2**from_log2k]
        use = big if len(big) >= 2 else rs
        s = fit_slope([r["K"] for r in use], [r["fwdbwd_s"] for r in use])
        entry = {"group": _group_name(g), "method": m, "slope": s, "k_from": use[0]["K"], "k_to": use[-1]["K"],
                 "points": len(use), "kind": rs[0]["kind"]}
        if rs[0]["kind"] == "fused" and s is not None:
            expect = 2.0 if g[1] == "in-batch" else 1.0
            entry["expected"] = expect
            entry["check"] = "ok" if abs(s - expect) <= 0.1 * expect and len(big) >= 3 else (
                "too few points from 2^%d" % from_log2k if len(big) < 3 else "FAIL")
        out.append(entry)
    return out


def format_slopes(fits: list[dict]) -> str:
    lines = [f"{'group':<34} {'method':<16} {'slope':>6}  over K"]
    for f in fits:
        s = "-" if f["slope"] is None else f"{f['slope']:.2f}"
        check = f"  expected {f['expected']:.0f}: {f['check']}" if "check" in f else ""
        lines.append(f"{f['group']:<34} {f['method']:<16} {s:>6}  {f['k_from']}..{f['k_to']} "
                     f"({f['points']} points){check}")
    return "\n".join(lines)


def headline(rows: list[dict]) -> list[dict]:
    """For every method beside the fused op of its setting: the largest K where both ran, the time ratio
    (other / fused: the fused speed-up) and the memory of both there; plus the largest K each ran at all, and at
    how many of the shared K the fused op was at least as fast, and at how many of the ``mem_common`` shared K where
    both memories were measured it used at most as much memory (``less_mem_at`` None when there were none: --in-process
    measures no memory, and an unmeasured point is no memory win)."""
    ok = defaultdict(dict)
    for r in rows:
        if r.get("status") == "ok" and r["kind"] not in ("gemm",):
            ok[(_group_key(r), r["method"])][r["K"]] = r
    out = []
    for (g, m), by_k in sorted(ok.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        any_row = next(iter(by_k.values()))
        if any_row["kind"] == "fused":
            continue
        fused = ok.get((g, _fused_for(any_row["setting"])), {})
        common = sorted(set(fused) & set(by_k))
        e = {"group": _group_name(g), "method": m, "setting": any_row["setting"], "fused": _fused_for(any_row["setting"]),
             "max_k_method": max(by_k), "max_k_fused": max(fused) if fused else None}
        if common:
            k = common[-1]
            f, o = fused[k], by_k[k]
            e.update(k=k, fused_s=f["fwdbwd_s"], other_s=o["fwdbwd_s"], speedup=o["fwdbwd_s"] / f["fwdbwd_s"],
                     fused_mib=f.get("extra_mib"), other_mib=o.get("extra_mib"))
            e["faster_at"] = sum(fused[q]["fwdbwd_s"] <= by_k[q]["fwdbwd_s"] for q in common)
            mem = [q for q in common if _measured(fused[q].get("extra_mib")) and _measured(by_k[q].get("extra_mib"))]
            e["less_mem_at"] = sum(fused[q]["extra_mib"] <= by_k[q]["extra_mib"] for q in mem) if mem else None
            e["mem_common"] = len(mem)
            e["common"] = len(common)
        out.append(e)
    return out


def format_headline(entries: list[dict]) -> str:
    lines = [f"{'group':<34} {'vs method':<16} {'at K':>9} {'fused s':>9} {'other s':>9} {'speed-up':>8} "
             f"{'fused MiB':>10} {'other MiB':>10} {'fused<=':>8} {'mem<=':>6} {'max K other/fused':>18}"]
    for e in entries:
        if "k" not in e:
            lines.append(f"{e['group']:<34} {e['method']:<16} {'-':>9}  no K where both ran "
                         f"(max K {e['method']}: {e['max_k_method']}, fused: {e['max_k_fused']})")
            continue
        mem = f"{'-':>2}{'':<4}" if e["less_mem_at"] is None else f"{e['less_mem_at']:>2}/{e['mem_common']:<3}"
        lines.append(
            f"{e['group']:<34} {e['method']:<16} {e['k']:>9} {e['fused_s']:>9.3f} {e['other_s']:>9.3f} "
            f"{e['speedup']:>7.2f}x {_num(e['fused_mib'], '.1f', 10)} {_num(e['other_mib'], '.1f', 10)} "
            f"{e['faster_at']:>3}/{e['common']:<4} {mem} {e['max_k_method']:>9}/{e['max_k_fused']}")
    return "\n".join(lines)


def machine_info(threads: int) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "gpu": None}
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    try:
        from .. import backend_info

        info["contrastbound_backends"] = backend_info()
    except Exception:  # noqa: BLE001 - informational only
        pass
    from importlib import metadata

    peers = {}
    for dist in ("info-nce-pytorch", "lightly", "pytorch-metric-learning", "open-clip-torch", "cut-cross-entropy",
                 "liger-kernel", "inf-cl", "triton"):
        try:
            peers[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            peers[dist] = None
    info["peers"] = peers
    return info


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def time_fused_and_naive(row: dict, methods, args: tuple, leaves: tuple, reps: int) -> dict:
    """The standalone scripts' fused-vs-naive timing: for each (name, fn) of `methods`, fn(*args).backward() once
    (warm-up), then `reps` timed steps, the gradients of `leaves` cleared before each; fills row[name + "_ms"] (the
    median), row[name + "_loss"] (the warm-up's loss) and row["fused_over_naive"]."""
    import statistics
    import time

    for name, fn in methods:
        value = fn(*args)
        value.backward()  # warm-up
        times = []
        for _ in range(reps):
            for x in leaves:
                x.grad = None
            t0 = time.perf_counter()
            fn(*args).backward()
            times.append(time.perf_counter() - t0)
        row[f"{name}_ms"] = statistics.median(times) * 1e3
        row[f"{name}_loss"] = value.item()
    row["fused_over_naive"] = row["fused_ms"] / row["naive_ms"]
    return row


def write_rows_csv(rows: list[dict], path: str) -> None:
    """The standalone benchmark scripts' tables: one row per dict, the columns the first row's keys, in order."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write_rows_csv_json(rows: list[dict], stem: str) -> None:
    """<stem>.csv (write_rows_csv) and <stem>.json (the rows as a list), and a line saying so; nothing for no rows."""
    if not rows:
        return
    write_rows_csv(rows, stem + ".csv")
    with open(stem + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {stem}.csv and .json")


def run_worker(cmd: list[str]) -> tuple[dict | None, str]:
    """A standalone script's worker subprocess (one measurement in a fresh process): (the JSON object its last
    stdout line holds, "") where it exits 0, else (None, the last line of its stderr)."""
    import subprocess

    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return None, (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
    return json.loads(res.stdout.strip().splitlines()[-1]), ""


def measure_and_write(parser, out_arg: str, header: str, measures, line) -> int:
    """The standalone scripts' main loop: checks --out (before measuring), prints `header`, then for each callable of
    `measures` its row (a dict) as line(row), and writes the rows to <out>.csv. Returns 0 (the exit status)."""
    out = prepare_out_stem(parser, out_arg)
    rows = []
    print(header)
    for measure in measures:
        row = measure()
        rows.append(row)
        print(line(row), flush=True)
    write_rows_csv(rows, out + ".csv")
    print(f"wrote {out}.csv")
    return 0


def write_json(payload: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)


def plot(rows: list[dict], out_prefix: str) -> list[str]:
    """Three log-log PNGs per group: f+b time, extra memory and effective FLOP/s (with the GEMM rate) over K."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("status") == "ok":
            groups[_group_key(r)][r["method"]].append(r)
    written = []
    for g, methods in groups.items():
        device, mode, dtype, B, d = g
        tag = f"{mode}_{dtype}_{device.replace(':', '')}_d{d}" + ("" if mode == "in-batch" else f"_B{B}")
        xlabel = "N = K (pairs in the batch)" if mode == "in-batch" else "K (negatives per anchor)"
        specs = [
            ("time", "forward+backward time (s)", lambda r: r.get("fwdbwd_s"), False),
            ("memory", "peak extra memory (MiB, floored at 1)", lambda r: max(r["extra_mib"], 1.0)
             if r.get("extra_mib") is not None else None, False),
            ("flops", "effective GFLOP/s (model FLOPs / f+b time)", lambda r: r.get("eff_gflops"), True),
        ]
        for name, ylabel, value, with_gemm in specs:
            fig, ax = plt.subplots(figsize=(7.5, 5))
            drawn = 0
            for m, rs in sorted(methods.items()):
                rs = sorted(rs, key=lambda r: r["K"])
                if rs[0]["kind"] == "gemm":
                    if with_gemm:
                        ax.plot([r["K"] for r in rs], [r["gemm_gflops"] for r in rs], "k--", lw=2,
                                label="GEMM (torch.mm, same shape)")
                    continue
                pts = [(r["K"], value(r)) for r in rs if value(r) is not None and value(r) > 0]
                if pts:
                    style = "-o" if rs[0]["kind"] == "fused" else ("-s" if rs[0]["kind"] == "peer" else "-^")
                    ax.plot(*zip(*pts), style, ms=4, lw=2.2 if rs[0]["kind"] == "fused" else 1.2, label=m)
                    drawn += 1
            if not drawn:
                plt.close(fig)
                continue
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{_group_name(g)}: {name}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            path = f"{out_prefix}_{tag}_{name}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def stale_plots(out_prefix: str, written: list[str]) -> list[str]:
    """PNGs named as plot() names them for this prefix that this run did not write: an earlier run's groups, in a
    reused --out (its CSV and JSON are replaced; its plots would pass for this run's). Other prefixes' files (say
    scaling_cpu_shared_* beside the prefix scaling) do not match: a tag starts with a mode."""
    import glob
    import re

    from .methods import MODES

    pattern = re.compile(re.escape(os.path.basename(out_prefix)) + "_(" + "|".join(map(re.escape, MODES))
                         + r")_(float16|bfloat16|float32|float64)_[^_]+_d\d+(_B\d+)?_(time|memory|flops)\.png")
    mine = {os.path.normpath(p) for p in written}
    return sorted(p for p in glob.glob(glob.escape(out_prefix) + "_*.png")
                  if pattern.fullmatch(os.path.basename(p)) and os.path.normpath(p) not in mine)


def check_at_least_one(parser, args, names) -> None:
    """The standalone scripts' size checks: parser.error (exit 2) for the first of args' `names` below 1 (None, an
    option left to its default, passes), named as its flag (-B, --reps)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"{'-' if len(name) == 1 else '--'}{name} must be at least 1, got {value}")


def parse_log2_list(parser, flag: str, text: str, low: int, high: int) -> list[int]:
    """A comma-separated list of powers of two (--log2k 12,14): the exponents, each in [low, high], else
    parser.error naming the flag."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        parser.error(f"{flag} must be comma-separated integers, got {text!r}")
    for v in values:
        if not low <= v <= high:
            parser.error(f"{flag} values must be in [{low}, {high}], got {v}")
    return values


def prepare_out_stem(parser, out: str) -> str:
    """--out of the standalone benchmark scripts: a path without extension (a trailing .csv is dropped: bt.csv
    wrote bt.csv.csv), checked as `prepare_out_file` checks a file's path."""
    if out.endswith(".csv"):
        out = out[: -len(".csv")]
    return prepare_out_file(parser, out, example=f"{os.path.join(out, 'run')!r} (writes run.csv there)")


def prepare_out_file(parser, out: str, example: str | None = None) -> str:
    """An output path, not a folder, whose folder is made and tried for writing before any measurement (else
    parser.error: the results would be lost to a traceback at the end)."""
    import tempfile

    if not os.path.basename(out) or os.path.isdir(out):
        # (a folder: abspath dropped its trailing "/" and the folder above was checked; the files were named
        # ".csv" inside it, or the run failed at the end)
        example = example or repr(os.path.join(out, "run.csv"))
        parser.error(f"--out {out!r} names a folder: give a file's path, e.g. {example}")
    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        parser.error(f"--out {out!r}: its folder cannot be written ({exc})")
    return out
