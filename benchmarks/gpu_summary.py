"""Issue 4's GPU targets against bench_gpu.py's CSVs: one line per (problem, kernel variant).

    python benchmarks/gpu_summary.py OUT/bench_gpu.csv [OUT/bench_gpu_opt_in.csv ...]

For every fused variant (the default kernels, "fused", and each switch that bench_gpu.py timed) and problem
(shared bank, in-batch), from the rows measured at K >= 2^18 (the speed target's range; all K where none are):
- rate: the lowest and the median percentage of the same run's bf16 matmul rate (target: >= 50 %);
- vs naive: naive's forward + backward time over the variant's, the lowest over every K where naive ran (the
  target, >= 2x, names no K range);
- vs peers: the variant's time against Inf-CL's and Cut Cross-Entropy's (exact and default, filtering) at the
  same K (target: at least as fast: ratio peer / variant >= 1);
- memory: the variant's peak extra memory over naive's at the largest K where both ran (target at K = 2^22:
  <= 5 %; naive does not fit there, so the largest common K is what can be quoted);
- failures: rows whose note says the variant failed or disagreed with the default kernels (rows skipped for the
  time budget or memory are left out).
Then per problem the fastest variant at K = 2^18 (where not measured there, the largest K of the default kernels)
among those with no failure: the candidate default; and the forward without gradients (eval_fwd_ms: evaluation,
no anchors' term) of the default kernels at the same K, beside the wgmma Lse walk's (eval_fwd_ms_wg_lse, opt-in),
naive's and the training forward's (fwd_ms), where the CSV has them. A row "rest of this problem" (an error bench_gpu did not
catch per row) is a failure of the default kernels; in an opt-in run, "rest of this problem (flash run)", of every
variant of its families.
Rows from several CSVs are merged; where two give the same (problem, impl, K), the first file's row is kept (the
opt-in runs measure the default kernels again, as their reference), unless it was skipped and a later one was not.
"""

from __future__ import annotations

import csv
import math
import statistics
import sys

PEERS = ("inf_cl", "cut_cross_entropy", "cut_cross_entropy_exact")
SPEED_FROM_K = 2**18


def _f(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def load(paths) -> list[dict]:
    rows, where = [], {}
    for path in paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"problem", "impl", "K"} - set(reader.fieldnames or ())
            if missing:
                # e.g. bench_gpu_opt_in_kernels.csv (per-kernel rows), caught by a glob of bench_gpu*.csv
                raise ValueError(f"{path}: not a bench_gpu.py results CSV (no column {', '.join(sorted(missing))}; "
                                 f"per-kernel CSVs such as bench_gpu_opt_in_kernels.csv are not summarised)")
            for r in reader:
                key = (r.get("problem"), r.get("impl"), r.get("K"))
                if key not in where:
                    where[key] = len(rows)
                    rows.append(r)
                elif _status(rows[where[key]]) == "skipped" and _status(r) != "skipped":
                    rows[where[key]] = r  # a later file measured what the first skipped (the time budget)
    return rows


def _status(r: dict) -> str:
    """"ok" (timed), "skipped" (budget, memory estimate: not measured, not a failure) or "failed" (an error, a result
    that disagreed with the default kernels or the fused loss, or no time)."""
    note = r.get("note") or ""
    if note.startswith("skipped"):
        return "skipped"
    if any(s in note for s in ("failed", "WRONG RESULT", "LOSS MISMATCH")) or not _f(r.get("fwdbwd_ms")) > 0:
        return "failed"
    return "ok"


def _failed(r: dict) -> bool:
    return _status(r) != "ok"


def summarise(rows: list[dict]) -> tuple[list[dict], dict]:
    """Per (problem, variant): the figures above; and per problem the candidate default: the fastest variant
    without failures at K = 2^18, or where that K was not measured, at the largest K the default kernels ran."""
    by, opt_in_rest = {}, []
    for r in rows:
        impls = [r["impl"]]
        if impls[0] == "rest of this problem":
            # An error that bench_gpu did not catch per row: the default kernels' own calls (the reference loss,
            # their timing) or the inputs; the variants did not run at that K either. A failure of "fused".
            impls = ["fused"]
            r = dict(r, note=r.get("note") or "failed")
        elif impls[0].startswith("rest of this problem ("):
            opt_in_rest.append(dict(r, note=r.get("note") or "failed"))
            continue
        for impl in impls:
            by.setdefault((r["problem"], impl), []).append(r)
    for r in opt_in_rest:
        # The same in an opt-in run, "rest of this problem (flash run)": a failure of each variant of its families
        # (with their other pipelines, e.g. fused_flash_1stage), not of the default kernels.
        families = r["impl"][len("rest of this problem ("):].removesuffix(" run)").split("/")
        names = {x for p, x in by if p == r["problem"] and any(x.startswith(f"fused_{f}") for f in families)}
        for impl in names | {f"fused_{f}" for f in families}:
            by.setdefault((r["problem"], impl), []).append(r)
    out, best = [], {}
    for (problem, impl), rs in sorted(by.items()):
        if not impl.startswith("fused"):
            continue
        ok = [r for r in rs if _status(r) == "ok"]
        big = [r for r in ok if int(r["K"]) >= SPEED_FROM_K] or ok
        pct = [_f(r["pct_of_matmul"]) for r in big if math.isfinite(_f(r["pct_of_matmul"]))]
        line = dict(problem=problem, impl=impl, measured=len(ok), failed=sum(_status(r) == "failed" for r in rs),
                    ks=sorted(int(r["K"]) for r in big),
                    pct_min=min(pct) if pct else math.nan, pct_median=statistics.median(pct) if pct else math.nan)

        def other(name, K):
            r = by.get((problem, name), [])
            r = [x for x in r if int(x["K"]) == K and not _failed(x)]
            return _f(r[0]["fwdbwd_ms"]) if r else math.nan

        vs_naive = [other("naive", int(r["K"])) / _f(r["fwdbwd_ms"]) for r in ok]
        vs_naive = [v for v in vs_naive if math.isfinite(v)]
        line["vs_naive_min"] = min(vs_naive) if vs_naive else math.nan
        for peer in PEERS:
            ratios = [other(peer, int(r["K"])) / _f(r["fwdbwd_ms"]) for r in big]
            ratios = [v for v in ratios if math.isfinite(v)]
            line[f"vs_{peer}_min"] = min(ratios) if ratios else math.nan
        common = [r for r in ok if math.isfinite(_f(r["peak_extra_gib"]))
                  and any(int(x["K"]) == int(r["K"]) and not _failed(x) for x in by.get((problem, "naive"), []))]
        if common:
            r = max(common, key=lambda x: int(x["K"]))
            naive = next(x for x in by[(problem, "naive")] if int(x["K"]) == int(r["K"]))
            line["mem_k"] = int(r["K"])
            line["mem_pct_of_naive"] = 100 * _f(r["peak_extra_gib"]) / _f(naive["peak_extra_gib"])
        out.append(line)
    for problem in sorted({ln["problem"] for ln in out}):
        default_ks = [int(r["K"]) for r in by.get((problem, "fused"), []) if _status(r) == "ok"]
        if not default_ks:
            continue
        K = SPEED_FROM_K if SPEED_FROM_K in default_ks else max(default_ks)
        for ln in out:
            if ln["problem"] != problem or ln["failed"]:
                continue
            at = [r for r in by[(problem, ln["impl"])] if int(r["K"]) == K and _status(r) == "ok"]
            if at and (problem not in best or _f(at[0]["fwdbwd_ms"]) < best[problem][1]):
                best[problem] = (ln["impl"], _f(at[0]["fwdbwd_ms"]), _f(at[0]["pct_of_matmul"]), K)
    return out, best


def eval_forward(rows: list[dict]) -> dict:
    """Per problem, the default kernels' forward without gradients at K = 2^18 (else the largest K where measured):
    (K, eval ms, the wgmma Lse walk's ms, naive's eval ms, training forward ms); NaN where a column is missing or
    empty."""
    out = {}
    fused = [r for r in rows if r.get("impl") == "fused" and _status(r) == "ok" and _f(r.get("eval_fwd_ms")) > 0]
    for problem in sorted({r["problem"] for r in fused}):
        mine = {int(r["K"]): r for r in fused if r["problem"] == problem}
        K = SPEED_FROM_K if SPEED_FROM_K in mine else max(mine)
        r = mine[K]
        naive = [x for x in rows if x.get("impl") == "naive" and x["problem"] == problem and int(x["K"]) == K]
        out[problem] = (K, _f(r["eval_fwd_ms"]), _f(r.get("eval_fwd_ms_wg_lse")),
                        _f(naive[0].get("eval_fwd_ms")) if naive else math.nan, _f(r.get("fwd_ms")))
    return out


def _fmt(v, spec="{:.3g}") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else spec.format(v)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 64
    try:
        rows = load(argv)
    except (OSError, ValueError) as e:
        print(f"gpu_summary: {e}", file=sys.stderr)
        return 2
    lines, best = summarise(rows)
    if not lines:
        print("gpu_summary: no fused rows in " + ", ".join(argv))
        return 1
    print("Issue 4 targets: rate >= 50 % of matmul and peers / fused >= 1 (at K >= 2^18 where measured), >= 2x "
          "naive (at every K where naive ran), memory <= 5 % of naive (at the largest K where both ran)")
    head = ["problem", "impl", "ok/failed", "% of matmul min / median", "x naive (min)", "Inf-CL / fused",
            "CCE / fused", "CCE exact / fused", "memory % of naive (K)"]
    print(" | ".join(head))
    for ln in lines:
        mem = "-" if "mem_k" not in ln else f"{_fmt(ln['mem_pct_of_naive'])} (2^{int(math.log2(ln['mem_k']))})"
        print(" | ".join([
            ln["problem"], ln["impl"], f"{ln['measured']}/{ln['failed']}",
            f"{_fmt(ln['pct_min'])} / {_fmt(ln['pct_median'])}", _fmt(ln["vs_naive_min"]),
            _fmt(ln["vs_inf_cl_min"]), _fmt(ln["vs_cut_cross_entropy_min"]),
            _fmt(ln["vs_cut_cross_entropy_exact_min"]), mem]))
    for problem in sorted({ln["problem"] for ln in lines}):
        if problem not in best:
            print(f"{problem}: no variant ran without failures (the ok/failed column; notes in the CSVs)")
            continue
        impl, t, pct, K = best[problem]
        print(f"fastest without failures at K = 2^{int(math.log2(K))}, {problem}: {impl} ({_fmt(t)} ms, "
              f"{_fmt(pct)} % of matmul)")
    for problem, (K, ms, walk, naive, train) in eval_forward(rows).items():
        print(f"forward without gradients at K = 2^{int(math.log2(K))}, {problem}: {_fmt(ms)} ms (wgmma Lse walk, "
              f"CONTRASTBOUND_TC_WG_LSE=1: {_fmt(walk)} ms; naive {_fmt(naive)} ms; the training forward "
              f"{_fmt(train)} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
