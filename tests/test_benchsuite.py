"""The scaling-benchmark harness: table, reasons, memory measurement and the command end to end.

No timing assertions: costs come from a fake clock that the fake methods advance by known amounts.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from contrastbound.__main__ import main as cli_main
from contrastbound.benchsuite import harness, report
from contrastbound.benchsuite.harness import Config, run_isolated, run_sweep
from contrastbound.benchsuite.methods import METHODS, Method
from conftest import FakeClock

SETTING = "fake setting"


def fake_method(name: str, kind: str, clock: FakeClock, us_per_k: float) -> Method:
    """Forward costs K * us_per_k microseconds on the fake clock, backward twice that."""

    def build(cfg, x):
        def step():
            clock.advance(cfg.K * us_per_k * 1e-6)
            w = torch.ones((), requires_grad=True)
            loss = w * 2.0
            loss.register_hook(lambda g: clock.advance(2 * cfg.K * us_per_k * 1e-6))
            return loss

        return step

    return Method(name, build, {"shared": SETTING}, kind=kind)


def raising_method(name: str = "broken") -> Method:
    def build(cfg, x):
        def step():
            raise RuntimeError("boom: this method always fails")

        return step

    return Method(name, build, {"shared": SETTING}, kind="peer")


def _alloc_build(cfg, x):
    def step():
        buf = torch.ones(200 * 2**18)  # 200 MiB of float32, touched
        return buf[:1].sum() * 0 + x["anchors"].sum()

    return step


# A module-level method so that the fresh worker process can import it.
ALLOC = Method("alloc-200mib", _alloc_build, {"shared": "allocates a 200 MiB tensor"}, kind="test")
ALLOC.ref = f"{__name__}:ALLOC"

_ONE_OFF = []


def _one_off_build(cfg, x):
    def step():
        if not _ONE_OFF:  # the first step's one-off cost, kept (as a compiler's or a thread pool's): 150 MiB
            _ONE_OFF.append(torch.ones(150 * 2**18))
        buf = torch.ones(40 * 2**18)  # every step's own 40 MiB
        return buf[:1].sum() * 0 + x["anchors"].sum()

    return step


ONE_OFF = Method("one-off-150mib", _one_off_build, {"shared": "a 150 MiB one-off, then 40 MiB a step"}, kind="test")
ONE_OFF.ref = f"{__name__}:ONE_OFF"

KS = [2**10, 2**12, 2**14]


def _configs(**kw):
    return [Config(mode="shared", K=k, B=4, d=8, reps=3, warmup=1, **kw) for k in KS]


def test_fake_costs_give_the_right_table():
    clock = FakeClock()
    methods = [fake_method("fused", "fused", clock, 1.0), fake_method("slow", "peer", clock, 4.0)]
    rows = run_sweep(methods, _configs(), isolate=False, clock=clock)
    assert len(rows) == 2 * len(KS)
    for r in rows:
        us = 1.0 if r["method"] == "fused" else 4.0
        assert r["status"] == "ok"
        assert r["setting"] == SETTING
        assert r["fwd_s"] == pytest.approx(r["K"] * us * 1e-6)
        assert r["bwd_s"] == pytest.approx(2 * r["K"] * us * 1e-6)
        assert r["fwdbwd_s"] == pytest.approx(3 * r["K"] * us * 1e-6)
        assert r["reps"] == 3
        fwd, bwd = harness.model_flops(Config(mode="shared", K=r["K"], B=4, d=8), SETTING)
        assert r["eff_gflops"] == pytest.approx((fwd + bwd) / r["fwdbwd_s"] / 1e9)
    table = report.format_table(rows)
    assert table.splitlines()[0] == report.HEADER
    line = next(ln for ln in table.splitlines() if " slow " in ln and f" {2**12} " in ln)
    assert f"{4 * 2**12 * 1e-3:.2f}" in line  # forward 16.38 ms
    assert f"{12 * 2**12 * 1e-3:.2f}" in line  # forward+backward 49.15 ms
    fits = {f["method"]: f for f in report.slopes(rows, from_log2k=10)}
    assert fits["fused"]["slope"] == pytest.approx(1.0)
    assert fits["fused"]["check"] == "ok"
    # two K from 2^from_log2k on: a slope, but no verdict (fixed costs weigh as much as K there)
    two = {f["method"]: f for f in report.slopes(rows, from_log2k=12)}
    assert two["fused"]["points"] == 2 and two["fused"]["check"].startswith("too few points")
    assert fits["slow"]["slope"] == pytest.approx(1.0)
    (head,) = report.headline(rows)
    assert head["method"] == "slow" and head["k"] == 2**14
    assert head["speedup"] == pytest.approx(4.0)
    assert head["faster_at"] == head["common"] == 3
    assert "4.00x" in report.format_headline([head])


def test_a_method_that_raises_is_reported_with_its_reason():
    clock = FakeClock()
    rows = run_sweep([fake_method("fused", "fused", clock, 1.0), raising_method()], _configs(), isolate=False,
                     clock=clock)
    broken = [r for r in rows if r["method"] == "broken"]
    assert len(broken) == len(KS)  # reported at every K, never dropped
    assert broken[0]["status"] == "failed" and "boom" in broken[0]["reason"]
    for r in broken[1:]:
        assert r["status"] == "skipped" and "boom" in r["reason"] and f"K={KS[0]}" in r["reason"]
    assert all(r["status"] == "ok" for r in rows if r["method"] == "fused")
    assert "boom" in report.format_table(rows)
    entry = next(e for e in report.headline(rows) if e["method"] == "broken") if any(
        e["method"] == "broken" for e in report.headline(rows)) else None
    assert entry is None  # no K where it ran: it has no headline ratio


def test_bank_ce_rows_say_their_classes_take_a_gradient():
    # bank-ce's classifier rows always need a gradient (its flops count it), but its rows said bank_grad=False
    rows = run_sweep([METHODS["fused"]], [Config(mode="bank-ce", K=64, B=4, d=8, reps=1),
                                         Config(mode="shared", K=64, B=4, d=8, reps=1)], isolate=False)
    assert [(r["mode"], r["status"], r["bank_grad"]) for r in rows] == [("bank-ce", "ok", True),
                                                                       ("shared", "ok", False)], rows


def test_every_bench_option_says_what_it_does():
    # --temperature, --no-plots and --no-progress had no help text in `contrastbound bench --help`
    import argparse

    import contrastbound.benchsuite as bs

    bare = [a.option_strings for a in bs.build_parser()._actions
            if a.option_strings and a.help != argparse.SUPPRESS and not (a.help or "").strip()]
    assert bare == []


def test_unavailable_and_gpu_only_methods_have_reasons():
    missing = Method("ghost", lambda c, x: None, {"shared": SETTING}, kind="peer", requires=("no_such_module_xyz",))
    rows = run_sweep([missing, METHODS["liger"]], _configs() + [Config(mode="bank-ce", K=64, B=4, d=8)],
                     isolate=False)
    reasons = {(r["method"], r["K"]): r for r in rows}
    assert all(reasons[("ghost", k)]["reason"] == "not installed (no_such_module_xyz)" for k in KS)
    assert reasons[("liger", 64)]["status"] == "skipped" and "GPU only" in reasons[("liger", 64)]["reason"]
    probed = harness.probe([raising_method()], ["shared"], "cpu")
    assert "boom" in probed[("broken", "shared")]


def test_out_of_memory_by_estimate_is_reported():
    big = Config(mode="shared", K=2**40, B=256, d=128)
    why = harness.plan_row(METHODS["naive"], big, None, None, mem_fraction=0.7)
    assert why is not None and why.startswith("out of memory by estimate")


def test_subprocess_memory_sees_a_200_mib_allocation():
    row = run_isolated(ALLOC, Config(mode="shared", K=16, B=4, d=8, reps=1, warmup=1), timeout=120)
    assert row["status"] == "ok", row
    assert 180.0 <= row["extra_mib"] <= 260.0


def test_subprocess_memory_leaves_the_warm_up_apart():
    # The first step's one-off costs (code pages, thread pools, a compiler) were counted as every step's extra
    # memory (fused "14 MiB" at small K, torch.compile ~50 MiB); now the warm-up's peak is warmup_extra_mib
    row = run_isolated(ONE_OFF, Config(mode="shared", K=16, B=4, d=8, reps=2, warmup=1), timeout=120)
    assert row["status"] == "ok", row
    assert 30.0 <= row["extra_mib"] <= 80.0, row
    assert row["warmup_extra_mib"] >= 180.0, row


TRIM_SCRIPT = """
import gc, torch, contrastbound as cb
from contrastbound.benchsuite.harness import _reset_rss_peak, _rss_peak_mib
torch.set_num_threads(1)
x1, x2 = torch.randn(2 ** 13, 128, requires_grad=True), torch.randn(2 ** 13, 128, requires_grad=True)
def step():
    x1.grad = x2.grad = None
    cb.clip_loss(x1, x2, 14.3).backward()
step()  # warm-up
x1.grad = x2.grad = None
_reset_rss_peak()
base = _rss_peak_mib()
step()
print(_rss_peak_mib() - base)
"""


def test_reset_peak_counts_memory_the_allocator_kept():
    # After the warm-up the allocator kept its freed blocks resident (below glibc's mmap threshold): the timed step
    # reused them and the extra read 4.4 MiB for a step whose gradients alone take 8 MiB (two 4 MiB tensors)
    out = subprocess.run([sys.executable, "-c", TRIM_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) >= 8.0, out.stdout


def test_gemm_reference_writes_cache_sized_tiles(monkeypatch):
    # The torch.mm reference wrote the whole (rows, K) product to memory (256 MiB tiles): the rate of those writes,
    # which the fused loss "exceeded" (1.76x at 2^20); on a CPU its tiles are now at most 4 MiB
    shapes = []
    real_mm = torch.mm

    def mm(a, b, out=None):
        shapes.append(tuple(out.shape))
        return real_mm(a, b, out=out)

    monkeypatch.setattr(torch, "mm", mm)
    row = harness.measure(METHODS["gemm"], Config(mode="shared", K=2**16, B=256, d=8, reps=1), memory=False)
    assert row["gemm_gflops"] > 0 and shapes
    assert all(r * c * 4 <= 4 * 2**20 for r, c in shapes) and sum(c for _, c in shapes[-16:]) == 2**16, shapes[:3]


def test_no_input_sized_headroom_buffer_where_the_peak_resets(monkeypatch):
    # The worker allocated and freed a buffer the size of the inputs before its baseline (room for the bank's
    # gradient where only ru_maxrss is available): a transient twice the inputs that the memory planner did not
    # count, also where VmHWM can be reset, which makes it useless
    cfg = Config(mode="shared", K=2**12, B=8, d=16, reps=1)
    big, real_empty = [], torch.empty

    def empty(*size, **kw):
        t = real_empty(*size, **kw)
        if t.dtype == torch.float64 and t.numel() * 8 >= harness.input_bytes(cfg) // 2:
            big.append(t.numel())
        return t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(harness, "_reset_rss_peak", lambda: True)
    harness.measure(METHODS["fused"], cfg, memory=True)
    assert big == []
    monkeypatch.setattr(harness, "_reset_rss_peak", lambda: False)  # ru_maxrss: the room is still made
    harness.measure(METHODS["fused"], cfg, memory=True)
    assert len(big) == 1


def test_chunked_and_naive_match_the_fused_loss():
    from contrastbound.benchsuite.methods import chunked_loss, naive_loss

    for mode in ("shared", "per-anchor", "indexed", "in-batch", "bank-ce"):
        cfg = Config(mode=mode, K=37, B=5, d=8)
        x = harness.make_inputs(cfg)
        fused = METHODS["fused"].build(cfg, x)()
        args = {k: x.get(k) for k in ("anchors", "positives", "negatives", "negative_indices", "targets")}
        t = 1.0 if mode == "bank-ce" else cfg.temperature
        torch.testing.assert_close(naive_loss(mode, t, **args), fused, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(chunked_loss(mode, t, 8, **args), fused, rtol=1e-5, atol=1e-5)


def test_bench_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = cli_main(["bench", "--quick", "--ks", "256,1024", "-B", "8", "-d", "16", "--methods", "fused,naive",
                   "--reps", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert report.HEADER in text and "log-log slope" in text
    with open(out / "scaling.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["method"], r["K"]) for r in rows} == {(m, k) for m in ("gemm", "fused", "naive") for k in ("256", "1024")}
    assert all(r["status"] == "ok" for r in rows), [r["reason"] for r in rows]
    payload = json.loads((out / "scaling.json").read_text())
    # the CSV holds the warm-up's memory as the JSON does (it had extra_mib alone)
    by_key = {(r["method"], int(r["K"])): r for r in payload["rows"]}
    for r in rows:
        if r["method"] != "gemm":
            assert float(r["warmup_extra_mib"]) == pytest.approx(by_key[r["method"], int(r["K"])]["warmup_extra_mib"],
                                                                 rel=1e-5, abs=1e-3), r
    assert {"cpu", "threads", "torch", "gpu"} <= set(payload["machine"])
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    expected = ["flops.png", "memory.png", "time.png"] if importlib.util.find_spec("matplotlib") else []  # optional
    assert [p.rsplit("_", 1)[1] for p in pngs] == expected


_BAD_BENCH_ARGS = [
    ["--k-step", "0"], ["--ks", "0"], ["--dtype", "float8"], ["--device", "tpu"], ["--out", ""],
    # (these ran as failed rows with exit status 0, ran with other values, or crashed after the sweep)
    ["-B", "0"], ["-B", "-3"], ["-d", "0"], ["--threads", "0"], ["--reps", "0"], ["--warmup", "-5"],
    ["--chunk", "0"], ["--k-min", "-2"], ["--k-max", "4", "--k-min", "8"], ["--dtype", ""], ["--temperature", "0"],
    ["--temperature", "nan"], ["--time-bound", "-1"], ["--mem-fraction", "0"], ["--prefix", "sub/x"],
    ["--out", "/proc/contrastbound-x"],
    # (an audit's: "," ran everything; methods that serve none of the modes left the GEMM row alone, exit 0)
    ["--modes", ","], ["--methods", ","], ["--modes", "shared", "--methods", "fused-ntxent,open_clip"],
    ["--device", ","], ["--device", ""],  # (a CLI audit's: measured on the default devices, exit 0)
    ["--k-min", "30"],  # above the default --k-max: an empty sweep with exit status 0 before
    # (argparse named the type functions, "invalid _parse_ks value", "invalid <lambda> value"; 2^70 ran as
    # skipped rows with exit status 0)
    ["--ks", "abc"], ["--ks", "2^70"], ["--ks", "2^40000000000"], ["--ks", ","], ["-d", "abc"], ["-B", "x"],
    ["--k-max", "70"],
    ["--warmup", "0"],  # (accepted, and one warm-up step ran anyway)
    # (a misuse audit's: 10^9 threads made every row libgomp's "out of memory", exit 0; --slope-from took any int)
    ["--threads", "1000000000"], ["--slope-from", "-1"], ["--slope-from", "1000000"],
] + ([] if torch.cuda.is_available() else [["--device", "cuda"]])


def test_bench_quick_keeps_given_reps_and_time_bound(monkeypatch, tmp_path):
    # --quick's 2 repeats and 20 s bound are defaults: a value the user gives stays (it capped --reps at 2, and
    # replaced --time-bound 120 because it equalled the default)
    import contrastbound.benchsuite as bs

    seen = {}

    def fake_sweep(methods, configs, **kw):
        seen["reps"], seen["bound"] = configs[0].reps, configs[0].time_bound
        raise SystemExit(0)

    monkeypatch.setattr(bs, "run_sweep", fake_sweep)
    for argv, want in ((["--quick"], (2, 20.0)), (["--quick", "--reps", "5", "--time-bound", "120"], (5, 120.0)),
                       ([], (3, 120.0))):
        with pytest.raises(SystemExit):
            cli_main(["bench", "--methods", "fused", "--modes", "shared", "--ks", "64", "--no-progress",
                      "--out", str(tmp_path), *argv])
        assert (seen["reps"], seen["bound"]) == want, argv


def test_headline_counts_memory_only_where_both_were_measured():
    # In-process rows have no memory: they are no memory wins ("mem<= 3/3" before: a missing figure counted as 0)
    clock = FakeClock()
    methods = [fake_method("fused", "fused", clock, 1.0), fake_method("slow", "peer", clock, 4.0)]
    rows = run_sweep(methods, _configs(), isolate=False, clock=clock)
    assert all(r.get("extra_mib") is None for r in rows)
    (head,) = report.headline(rows)
    assert head["less_mem_at"] is None and head["mem_common"] == 0 and head["faster_at"] == head["common"] == 3
    line = report.format_headline([head]).splitlines()[1]
    assert re.search(rf" 3/3 +- +{2**14}/", line), line
    # measured at two K of three: counted over those two only (fused used more at 2^12)
    mib = {("fused", 2**12): 5.0, ("slow", 2**12): 2.0, ("fused", 2**14): 1.0, ("slow", 2**14): 10.0,
           ("fused", 2**10): 1.0, ("slow", 2**10): float("nan")}
    for r in rows:
        if (r["method"], r["K"]) in mib:
            r["extra_mib"] = mib[(r["method"], r["K"])]
    (head,) = report.headline(rows)
    assert (head["less_mem_at"], head["mem_common"], head["common"]) == (1, 2, 3)
    assert re.search(r" 3/3 +1/2 ", report.format_headline([head]).splitlines()[1])


def test_bench_in_process_reports_no_memory_wins(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli_main(["bench", "--in-process", "--modes", "shared", "--ks", "2^10,2^11", "--methods", "fused,naive",
                     "--reps", "1", "-B", "8", "-d", "16", "--out", str(out), "--no-progress", "--no-plots"]) == 0
    (head,) = json.loads((out / "scaling.json").read_text())["headline"]
    assert head["common"] == 2 and head["less_mem_at"] is None and head["mem_common"] == 0
    text = capsys.readouterr().out.split("fused vs each method")[1]
    line = next(ln for ln in text.splitlines() if ln.startswith("shared float32") and " naive " in ln)
    assert re.search(r" [0-2]/2 +- +2048/2048$", line), line


def test_bench_drops_repeated_values_keeping_their_order(monkeypatch, tmp_path):
    # `--modes shared,shared` measured the same configurations twice (--ks and --methods already dropped repeats)
    import contrastbound.benchsuite as bs

    seen = []

    def fake_sweep(methods, configs, **kw):
        seen.extend((c.mode, c.dtype, c.device, c.B, c.d, c.K) for c in configs)
        raise SystemExit(0)

    monkeypatch.setattr(bs, "run_sweep", fake_sweep)
    with pytest.raises(SystemExit):
        cli_main(["bench", "--methods", "fused", "--modes", "shared,indexed,shared", "--ks", "64,64",
                  "--dtype", "float64,float32,float64", "--device", "cpu,cpu", "-B", "8,4,8", "-d", "16,16",
                  "--no-progress", "--out", str(tmp_path)])
    assert seen == [(mode, dtype, "cpu", B, 16, 64) for mode in ("shared", "indexed") for dtype in ("float64", "float32")
                    for B in (8, 4)]


def test_bench_says_what_it_ignores_or_cannot_do(monkeypatch, tmp_path, capsys):
    # --k-min / --k-max / --k-step beside --ks or --quick were dropped without a word, and so were the plots
    # without matplotlib
    import builtins
    import contrastbound.benchsuite as bs

    monkeypatch.setattr(bs, "run_sweep", lambda methods, configs, **kw: (_ for _ in ()).throw(SystemExit(0)))
    for extra in (["--ks", "64", "--k-max", "12"], ["--quick", "--k-step", "2"], ["--ks", "64", "--k-min", "4"]):
        with pytest.raises(SystemExit):
            cli_main(["bench", "--methods", "fused", "--no-progress", "--out", str(tmp_path), *extra])
        assert "--k-min / --k-max / --k-step are ignored" in capsys.readouterr().err, extra
    with pytest.raises(SystemExit):
        cli_main(["bench", "--methods", "fused", "--no-progress", "--out", str(tmp_path), "--ks", "64"])
    assert "ignored" not in capsys.readouterr().err
    monkeypatch.undo()
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert cli_main(["bench", "--in-process", "--modes", "shared", "--ks", "2^6", "--methods", "fused", "--reps", "1",
                     "-B", "4", "-d", "8", "--out", str(tmp_path / "np"), "--no-progress"]) == 0
    assert "no plots: matplotlib is not installed" in capsys.readouterr().out


def test_bench_names_an_earlier_runs_plots_in_a_reused_out(tmp_path, capsys):
    # a reused --out kept the PNGs of groups this run did not measure beside its own, as if they were this run's
    pytest.importorskip("matplotlib")
    from contrastbound.benchsuite.report import stale_plots

    old = tmp_path / "scaling_indexed_float32_cpu_d8_B4_time.png"
    other_prefix = tmp_path / "scaling_cpu_shared_shared_float32_cpu_d128_B256_time.png"
    for f in (old, other_prefix):
        f.write_bytes(b"")
    assert cli_main(["bench", "--in-process", "--modes", "shared", "--ks", "2^6", "--methods", "fused", "--reps", "1",
                     "-B", "4", "-d", "8", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "note: 1 plot(s) with the prefix 'scaling'" in out and old.name in out and other_prefix.name not in out
    mine = [str(tmp_path / f"scaling_shared_float32_cpu_d8_B4_{name}.png") for name in ("time", "flops")]
    assert stale_plots(str(tmp_path / "scaling"), mine) == [str(old)]
    assert cli_main(["bench", "--in-process", "--modes", "shared", "--ks", "2^6", "--methods", "fused", "--reps", "1",
                     "-B", "4", "-d", "8", "--out", str(tmp_path), "--no-progress", "--no-plots"]) == 0
    assert "note: 3 plot(s) with the prefix 'scaling'" in capsys.readouterr().out  # (none of them this run's)


def test_bench_writes_the_rows_measured_before_an_interruption(monkeypatch, tmp_path, capsys):
    # Ctrl-C (or SIGTERM, the same path) in a sweep left --out empty however many rows had been measured (a CLI
    # audit: 28 rows, no CSV and no JSON); now they are written, the JSON says why it stopped, and the interruption
    # goes on (exit_from_cli ends the process by SIGINT)
    import contrastbound.benchsuite as bench

    real = bench.run_sweep

    def stopped_after_one_row(methods, configs, *, on_row, **kw):
        def on_row_then_stop(row):
            on_row(row)
            raise KeyboardInterrupt

        return real(methods, configs, on_row=on_row_then_stop, **kw)

    monkeypatch.setattr(bench, "run_sweep", stopped_after_one_row)
    with pytest.raises(KeyboardInterrupt):
        cli_main(["bench", "--in-process", "--modes", "shared", "--ks", "2^6,2^7", "--methods", "fused", "--reps", "1",
                  "-B", "4", "-d", "8", "--out", str(tmp_path), "--no-progress", "--no-plots"])
    assert "interrupted (Ctrl-C) after 1 of" in capsys.readouterr().err
    with open(tmp_path / "scaling.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 1
    with open(tmp_path / "scaling.json") as fh:
        payload = json.load(fh)
    assert payload["interrupted"] == "Ctrl-C" and len(payload["rows"]) == 1


def test_bench_sigterm_writes_the_rows_so_far_and_ends_by_sigterm(tmp_path):
    # `timeout` or a scheduler's SIGTERM mid-sweep (here while a configuration's worker process runs): the rows so
    # far written, the worker killed, then the process ends by SIGTERM
    import signal

    from conftest import PACKAGE_ROOT

    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=PACKAGE_ROOT)
    cmd = [sys.executable, "-m", "contrastbound", "bench", "--modes", "shared", "--methods", "fused", "--ks",
           ",".join(str(2**e) for e in range(6, 16)), "-B", "4", "-d", "8", "--reps", "1", "--no-progress",
           "--no-plots", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        for line in proc.stdout:  # the first measured fused row, then the signal (9 configurations left)
            if re.match(r"shared\s+fused\s+64\s", line):
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, err[-2000:])
    assert "interrupted (SIGTERM)" in err, err[-2000:]
    with open(tmp_path / "scaling.json") as fh:
        payload = json.load(fh)
    assert payload["interrupted"] == "SIGTERM" and [r["K"] for r in payload["rows"] if r["method"] == "fused"][0] == 64


def test_bench_live_table_names_the_dtype_where_several_run(tmp_path, capsys):
    # the table printed while running has no dtype column: two dtypes' rows read alike (a CLI audit's find)
    assert cli_main(["bench", "--in-process", "--modes", "shared", "--ks", "2^6", "--methods", "fused", "--reps", "1",
                     "-B", "4", "-d", "8", "--dtype", "float32,float64", "--out", str(tmp_path), "--no-progress",
                     "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "-- float32 on cpu --" in out and "-- float64 on cpu --" in out
    assert out.index("-- float32 on cpu --") < out.index("-- float64 on cpu --")
    assert cli_main(["bench", "--in-process", "--modes", "shared", "--ks", "2^6", "--methods", "fused", "--reps", "1",
                     "-B", "4", "-d", "8", "--out", str(tmp_path), "--no-progress", "--no-plots"]) == 0
    assert " on cpu --" not in capsys.readouterr().out  # (one dtype, one device: no such lines)


def test_bench_exits_nonzero_where_nothing_was_measured(tmp_path, capsys):
    # every row skipped (a K far past the memory): it printed empty tables and exited 0 (a CLI audit's find)
    assert cli_main(["bench", "--modes", "shared", "--ks", "2^40", "--methods", "fused", "--out", str(tmp_path),
                     "--no-progress", "--no-plots"]) == 1
    assert "no method was measured" in capsys.readouterr().err
    assert (tmp_path / "scaling.csv").exists()  # (the skipped rows and their reasons)


def test_bench_progress_bar_only_on_a_terminal(capsys):
    # (under pytest stderr is captured, not a terminal: the bar's redraws would fill a log)
    pytest.importorskip("tqdm")
    import contrastbound.benchsuite as bs

    progress = bs._Progress(3, enabled=True)
    assert progress.bar is None
    progress.close()


def test_bench_list_methods_writes_nothing(tmp_path, capsys):
    out = tmp_path / "not-made"
    assert cli_main(["bench", "--list-methods", "--out", str(out)]) == 0
    assert "fused" in capsys.readouterr().out and not out.exists()


@pytest.mark.parametrize("argv", _BAD_BENCH_ARGS, ids=[" ".join(a) for a in _BAD_BENCH_ARGS])
def test_bench_bad_arguments_fail_before_measuring(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert argv[0] in err and "lambda" not in err and "_parse" not in err, err


def test_bench_out_at_a_broken_symbolic_link_is_named(tmp_path, capsys):
    # os.makedirs on a link to a missing path raised "[Errno 17] File exists", which named no link (a CLI audit)
    link = tmp_path / "gone_link"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "--quick", "--out", str(link)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and "symbolic link to" in err and "does not exist" in err, err


@pytest.mark.parametrize("argv", [["--modes", "nosuch"], ["--methods", "fused,nosuch"]])
def test_bench_unknown_names_make_no_folder(argv, tmp_path, capsys):
    # the output folder was made (and tested for writing) before these were checked
    out = tmp_path / "not-made"
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", *argv, "--out", str(out)])
    assert exc.value.code == 2 and "nosuch" in capsys.readouterr().err and not out.exists()


def test_bench_infonce_script_memory_and_flops(tmp_path):
    """benchmarks/bench_infonce.py end to end at a small size: the extra memory of the timed steps includes the
    gradients (the fused loss's is its bank gradient and little more; with a detached bank far below it), the
    warm-up's is reported apart, and a detached bank is credited 4 B K d flop, not 6. (Before 2026-12-01 the extra
    was taken less the gradients, which for naive PyTorch subtracted a gradient not alive at its peak.)"""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_infonce.py")
    K, B, d = 2**17, 16, 64  # bank gradient 32 MiB: above glibc's mmap threshold, so it shows in the peak
    out = tmp_path / "b"
    proc = subprocess.run([sys.executable, script, "--min-log2k", "17", "--max-log2k", "17", "-B", str(B), "-d", str(d),
                           "--reps", "1", "--threads", "1", "--methods", "fused,fused_detached", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {r["method"]: r for r in csv.DictReader(open(str(out) + ".csv"))}
    grads = {m: float(rows[m]["grads_mib"]) for m in rows}
    assert grads["fused"] == pytest.approx((2 * B * d + K * d) * 4 / 2**20)
    assert grads["fused_detached"] == pytest.approx(2 * B * d * 4 / 2**20)
    for m, flop in (("fused", 6), ("fused_detached", 4)):
        r = rows[m]
        assert float(r["effective_gflops"]) * float(r["time_s"]) == pytest.approx(flop * B * K * d / 1e9)
    assert 0.9 * grads["fused"] <= float(rows["fused"]["extra_mib"]) < 1.5 * grads["fused"], rows["fused"]
    assert float(rows["fused_detached"]["extra_mib"]) < 0.5 * grads["fused"], rows["fused_detached"]
    assert all(float(r["warmup_extra_mib"]) > 0 for r in rows.values())


def test_bench_training_script_leaves_the_warm_up_apart(tmp_path):
    # bench_training.py's extra memory counted the first step's one-off costs (code pages, thread pools, ~10 MiB)
    # as the loss's: the fused rows at N = 256 read ~10 MiB where their gradients take 32 KiB
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_training.py")
    out = tmp_path / "t"
    proc = subprocess.run([sys.executable, script, "--min-log2n", "8", "--max-log2n", "8", "-d", "16", "--reps", "1",
                           "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    every = list(csv.DictReader(open(str(out) + ".csv")))
    rows = [r for r in every if r["method"] == "fused"]
    # each loss's plain form is the same loss: the two steps' values agree to float32 rounding
    plain = {r["loss"]: float(r["loss_value"]) for r in every if r["method"] == "plain"}
    for r in rows:
        assert float(r["loss_value"]) == pytest.approx(plain[r["loss"]], rel=1e-5), (r, plain[r["loss"]])
    # (the timed step's residue, pages and allocator state, read 0.9-2.2 MiB in repeated runs: 2.0 was too tight)
    spec = importlib.util.spec_from_file_location("bench_training", script)
    bench_training = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_training)
    assert [r["loss"] for r in rows] == list(bench_training.LOSSES), rows  # (each of its LOSSES)
    assert all(float(r["extra_mib"]) < 5.0 for r in rows), rows
    assert all(float(r["warmup_extra_mib"]) > 2 * float(r["extra_mib"]) for r in rows), rows


def test_bench_training_script_skips_plain_by_the_memory_available(tmp_path, monkeypatch):
    # plain PyTorch was skipped above a fixed 16 GiB of matrices, whatever the machine had: a 24 GiB machine ran a
    # 16 GiB step, and a large one skipped what it could run. The 512 x 512 float32 matrix is 1 MiB (x 4 copies):
    # a fraction of the available memory below that skips it, the default runs it
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_training.py")
    for fraction, runs in (("1e-9", False), ("0.7", True)):
        out = tmp_path / f"m{fraction}"
        proc = subprocess.run([sys.executable, script, "--min-log2n", "8", "--max-log2n", "8", "-d", "8", "--reps",
                               "1", "--threads", "1", "--losses", "nt_xent", "--mem-fraction", fraction, "--out",
                               str(out)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        (row,) = [r for r in csv.DictReader(open(str(out) + ".csv")) if r["method"] == "plain"]
        assert (row["time_s"] != "") == runs, row
        assert ("GiB available" in row["note"]) == (not runs), row
    proc = subprocess.run([sys.executable, script, "--mem-fraction", "0", "--out", str(tmp_path / "z")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--mem-fraction" in proc.stderr, proc.stderr
    # without /proc/meminfo (available_mib: inf) the physical memory stands in, not "no limit" (a review's find)
    import runpy

    from contrastbound.benchsuite import harness

    monkeypatch.setattr(harness, "available_mib", lambda device: float("inf"))
    monkeypatch.setattr(sys, "argv", [script, "--min-log2n", "8", "--max-log2n", "8", "-d", "8", "--reps", "1",
                                      "--threads", "1", "--losses", "nt_xent", "--mem-fraction", "1e-9", "--out",
                                      str(tmp_path / "nomem")])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(script, run_name="__main__")
    assert done.value.code == 0
    (row,) = [r for r in csv.DictReader(open(str(tmp_path / "nomem") + ".csv")) if r["method"] == "plain"]
    assert row["time_s"] == "" and "GiB available" in row["note"], row


def test_bench_infonce_script_times_the_gemm_first(tmp_path):
    # "--methods fused,gemm" measured the GEMM after the fused row, which then had no fraction of its rate
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_infonce.py")
    out = tmp_path / "g"
    proc = subprocess.run([sys.executable, script, "--min-log2k", "8", "--max-log2k", "8", "-B", "4", "-d", "8",
                           "--reps", "1", "--threads", "1", "--methods", "fused,gemm,fused", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(str(out) + ".csv")))
    assert [r["method"] for r in rows] == ["gemm", "fused"] and float(rows[1]["fraction_of_gemm"]) > 0


@pytest.mark.parametrize("script,argv", [
    ("bench_infonce.py", ["--methods", "fused,fuse"]),  # a typo was measured as naive PyTorch under its name
    ("bench_infonce.py", ["-B", "0"]),
    ("bench_bounds.py", ["--repeat", "0"]),  # a traceback (min of nothing) after the work
    ("bench_bounds.py", ["--kmax", "0"]),
    ("bench_training.py", ["--reps", "0"]),
    ("bench_training.py", ["--losses", "nt_xent,supcon"]),
    ("bench_training.py", ["--out", "/proc/contrastbound-x/bt"]),  # (checked after measuring: results lost)
    ("bench_infonce.py", ["--out", "/proc/contrastbound-x/bi"]),
    # an audit's: an empty K range wrote an empty table (over the committed one by default), 2^-1 a failed row; a
    # folder as --out ("dir/") wrote dir/.csv, or lost the results at the end; an N of 0 made NaN rows
    ("bench_infonce.py", ["--min-log2k", "5", "--max-log2k", "3"]),
    ("bench_infonce.py", ["--min-log2k", "-1"]),
    ("bench_training.py", ["--out", "/tmp/"]),
    ("bench_small.py", ["--threads", "0"]),
    ("bench_small.py", ["--cases", "nt_xent:0:8:float32"]),
    ("bench_small.py", ["--out", "/proc/contrastbound-x/bs"]),
    ("bench_logit_spread.py", ["--losses", "info_nce,triplet"]),
    ("bench_logit_spread.py", ["--temperatures", "0.1,0"]),
    ("bench_logit_spread.py", ["-K", "0"]),
    ("bench_logit_spread.py", ["--out", "/proc/contrastbound-x/ls"]),
    ("bench_clip_routes.py", ["--out", "/proc/contrastbound-x/cr"]),
    ("bench_indexed_bank.py", ["--out", "/proc/contrastbound-x/ib"]),
    ("bench_indexed_bank.py", ["-K", "0"]),
    ("bench_indexed_bank.py", ["--dtypes", "float8"]),
    ("bench_bounds.py", ["--out", "/proc/contrastbound-x/bb.csv"]),  # (checked after the timings)
    ("bench_bounds.py", ["--out", "/tmp/"]),
    ("bench_label_smoothing.py", ["--dtypes", "bfloat16,float32"]),
    ("bench_label_smoothing.py", ["--temperatures", "1,0"]),
    ("bench_label_smoothing.py", ["--smoothings", "0.5,1.5"]),
    ("bench_label_smoothing.py", ["--smoothings", "x"]),
    ("bench_label_smoothing.py", ["-C", "0"]),
    ("bench_label_smoothing.py", ["--out", "/proc/contrastbound-x/sm"]),
    ("bench_coupon.py", ["--repeat", "0"]),
    ("bench_coupon.py", ["--cases", "skewed,zipf"]),
    ("bench_coupon.py", ["--root", "/proc/contrastbound-x"]),
    ("bench_coupon.py", ["--out", "/proc/contrastbound-x/bc.csv"]),
    ("bench_coupon.py", ["--out", "/tmp/"]),
    ("bench_accuracy.py", ["--reps", "0"]),
    ("bench_accuracy.py", ["--log2k", "12,x"]),
    ("bench_accuracy.py", ["--log2k", "31"]),
    ("bench_accuracy.py", ["--out", "/proc/contrastbound-x/ba"]),
    ("bench_mining.py", ["-k", "0"]),
    ("bench_mining.py", ["--log2m", "12,x"]),
    ("bench_mining.py", ["--log2m", "35"]),
    ("bench_mining.py", ["--out", "/proc/contrastbound-x/bm"]),
    ("bench_uniformity.py", ["-t", "0"]),
    ("bench_uniformity.py", ["--log2n", "x"]),
    ("bench_uniformity.py", ["--log2n", "0"]),
    ("bench_uniformity.py", ["--reps", "0"]),
    ("bench_uniformity.py", ["--out", "/proc/contrastbound-x/bu"]),
])
def test_benchmark_scripts_refuse_bad_arguments(script, argv):
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", script)
    proc = subprocess.run([sys.executable, path, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and argv[0] in proc.stderr, (proc.returncode, proc.stderr[-500:])


def test_bench_coupon_one_case_against_the_library(tmp_path):
    # benchmarks/bench_coupon.py's skewed case, its CSV row against the library called here on the same prior and n
    import numpy as np

    from contrastbound import bounds as B

    root = os.path.join(os.path.dirname(__file__), "..")
    out = tmp_path / "bc.csv"
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_coupon.py"), "--cases", "skewed",
                           "--root", root, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-500:]
    rows = list(csv.DictReader(open(out)))
    skewed = np.linspace(1.0, 3.0, 3029)
    skewed /= skewed.sum()
    ns = np.arange(3030, 100_002, 1000)
    want = float(np.sum(B.coupon_collector_probability(ns, prior=skewed, log=True)))
    assert [(r["prior"], int(r["classes"]), int(r["n_values"])) for r in rows] == [("skewed", 3029, ns.size)]
    assert float(rows[0]["sum_log_upsilon"]) == want and float(rows[0]["seconds"]) > 0


def test_benchmark_script_writes_to_a_bare_file_name(tmp_path):
    # --out without a folder part: os.makedirs('') raised FileNotFoundError after every measurement
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_bounds.py")
    proc = subprocess.run([sys.executable, path, "--kmax", "20", "--classes", "3", "--repeat", "1", "--out", "bb.csv"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert (tmp_path / "bb.csv").exists()


def test_benchmark_script_takes_an_out_with_csv(tmp_path):
    # bench_training / bench_infonce take --out without extension; bt.csv wrote bt.csv.csv
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_training.py")
    proc = subprocess.run([sys.executable, path, "--min-log2n", "6", "--max-log2n", "6", "-d", "8", "--reps", "1",
                           "--threads", "1", "--out", "bt.csv"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bt.csv"]


def test_bench_small_runs_and_writes_its_csv(tmp_path):
    # Every loss of benchmarks/bench_small.py on a tiny case; the fused and naive losses agree (same problem).
    import csv

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_small.py")
    cases = "nt_xent:8:16:float32,clip:8:16:bfloat16,in-batch:9:5:float64"
    proc = subprocess.run([sys.executable, path, "--cases", cases, "--reps", "1", "--threads", "1", "--out", "bs.csv"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-1000:]
    with open(tmp_path / "bs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["loss"], r["N"], r["dtype"]) for r in rows] == [
        ("nt_xent", "8", "float32"), ("clip", "8", "bfloat16"), ("in-batch", "9", "float64")]
    for r in rows:
        assert float(r["fused_ms"]) > 0 and float(r["naive_ms"]) > 0
        # bfloat16: naive's logits are rounded to bfloat16 (0.06 at a logit of 14), the fused ones are not.
        tol = 2e-2 if r["dtype"] == "bfloat16" else 1e-5
        assert abs(float(r["fused_loss"]) - float(r["naive_loss"])) <= tol * max(1.0, abs(float(r["naive_loss"]))), r
    bad = subprocess.run([sys.executable, path, "--cases", "clip:8:16", "--out", "x"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and "loss:N:d:dtype" in bad.stderr


def test_bench_label_smoothing_runs_and_writes_its_csv(tmp_path):
    # Every case of benchmarks/bench_label_smoothing.py on a tiny problem: one row per (dtype, T, eps) in order, each
    # error a finite positive number (the half gradients are not float64's), the fused ones within a few ulps of
    # the dtype (bfloat16 2^-8, float16 2^-11) at eps = 0.1
    import csv
    import math

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_label_smoothing.py")
    proc = subprocess.run([sys.executable, path, "-B", "6", "-C", "9", "-d", "5", "--draws", "2", "--temperatures",
                           "1,0.5", "--smoothings", "0.1,1", "--out", "sm"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-1000:]
    with open(tmp_path / "sm.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["dtype"], float(r["T"]), float(r["smoothing"])) for r in rows] == [
        (dt, t, eps) for dt in ("bfloat16", "float16") for t in (1.0, 0.5) for eps in (0.1, 1.0)]
    for r in rows:
        errors = [float(r[f"{m}_{p}"]) for m in ("fused", "naive") for p in ("anchors", "target_rows", "other_rows")]
        assert all(math.isfinite(e) and e > 0 for e in errors), r
        if float(r["smoothing"]) == 0.1:
            assert max(errors[:3]) < 8 * (2 ** -8 if r["dtype"] == "bfloat16" else 2 ** -11), r


def test_bench_logit_spread_runs_and_writes_its_csv(tmp_path):
    # Every loss of benchmarks/bench_logit_spread.py on a tiny problem at two temperatures; the fused and naive losses
    # agree (same problem), and the spread grows as the temperature falls.
    import csv

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_logit_spread.py")
    proc = subprocess.run([sys.executable, path, "-N", "9", "-K", "13", "-d", "6", "--temperatures", "0.1,0.01",
                           "--reps", "1", "--threads", "1", "--out", "ls.csv"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-1000:]
    with open(tmp_path / "ls.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["loss"], float(r["T"])) for r in rows] == [
        (loss, t) for loss in ("info_nce", "nt_xent", "clip", "siglip", "indexed", "per_anchor", "supcon", "bank_ce")
        for t in (0.1, 0.01)]
    for r in rows:
        assert float(r["fused_ms"]) > 0 and float(r["naive_ms"]) > 0
        assert abs(float(r["fused_loss"]) - float(r["naive_loss"])) <= 1e-4 * max(1.0, abs(float(r["naive_loss"]))), r
    for warm, cold in zip(rows[::2], rows[1::2]):
        assert float(cold["max_lse_minus_logit"]) > float(warm["max_lse_minus_logit"])


def test_bench_logit_spread_times_the_banks_gradient_with_bank_grad(tmp_path):
    # --bank-grad: the losses with a bank time its gradient too (column bank_grad 1), the others are as before (0).
    import csv

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_logit_spread.py")
    proc = subprocess.run([sys.executable, path, "-N", "9", "-K", "13", "-d", "6", "--temperatures", "0.05",
                           "--losses", "info_nce,indexed,per_anchor,clip,bank_ce", "--bank-grad", "--reps", "1",
                           "--threads", "1", "--out", "bg"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-1000:]
    with open(tmp_path / "bg.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["loss"], r["bank_grad"]) for r in rows] == [
        ("info_nce", "1"), ("indexed", "1"), ("per_anchor", "1"), ("clip", "0"), ("bank_ce", "1")]
    for r in rows:
        assert abs(float(r["fused_loss"]) - float(r["naive_loss"])) <= 1e-4 * max(1.0, abs(float(r["naive_loss"]))), r


def test_bench_indexed_bank_runs_and_writes_its_csv(tmp_path):
    # benchmarks/bench_indexed_bank.py on a tiny bank: both methods run every dtype, on the same problem.
    import csv

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_indexed_bank.py")
    proc = subprocess.run([sys.executable, path, "-B", "5", "-K", "3", "--log2m", "9", "-d", "7", "--reps", "1",
                           "--threads", "1", "--out", "ib.csv"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-1000:]
    with open(tmp_path / "ib.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["dtype"], r["method"]) for r in rows] == [
        (dt, m) for dt in ("float32", "bfloat16", "float16") for m in ("fused", "naive")]
    for fused, naive in zip(rows[::2], rows[1::2]):
        assert float(fused["time_s"]) > 0 and float(naive["time_s"]) > 0 and fused["M"] == "512"
        tol = 1e-5 if fused["dtype"] == "float32" else 3e-2  # (naive's half logits are rounded to the half dtype)
        assert abs(float(fused["loss"]) - float(naive["loss"])) <= tol * abs(float(naive["loss"])), (fused, naive)


def test_bench_mining_runs_and_writes_its_csv(tmp_path):
    # benchmarks/bench_mining.py on tiny banks: both methods run each size and pick the same rows (float32, random
    # data: no near-ties at these sizes), with the same top similarities.
    import csv

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_mining.py")
    proc = subprocess.run([sys.executable, path, "-B", "5", "-d", "7", "-k", "3", "--log2m", "4,9", "--reps", "1",
                           "--threads", "1", "--out", "bm.csv"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-1000:]
    with open(tmp_path / "bm.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["M"], r["method"]) for r in rows] == [(m, x) for m in ("16", "512") for x in ("mine", "naive")]
    for mine, naive in zip(rows[::2], rows[1::2]):
        assert float(mine["time_s"]) > 0 and float(naive["time_s"]) > 0
        assert float(mine["agree"]) == 1.0 and float(naive["agree"]) == 1.0
        assert abs(float(mine["top_sum"]) - float(naive["top_sum"])) <= 1e-5 * abs(float(naive["top_sum"])), (mine,
                                                                                                             naive)


def test_bench_uniformity_runs_and_writes_its_csv(tmp_path):
    # benchmarks/bench_uniformity.py on tiny sizes: both methods where pdist is allowed, fused alone beyond, the same
    # value for both on the same problem
    import csv

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_uniformity.py")
    proc = subprocess.run([sys.executable, path, "-d", "5", "--log2n", "3,6", "--pdist-max-log2n", "3", "--reps", "1",
                           "--threads", "1", "--out", "bu.csv"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-1000:]
    with open(tmp_path / "bu.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["N"], r["method"]) for r in rows] == [("8", "fused"), ("8", "pdist"), ("64", "fused")]
    assert all(float(r["time_s"]) > 0 for r in rows)
    assert abs(float(rows[0]["value"]) - float(rows[1]["value"])) <= 1e-5 * abs(float(rows[1]["value"]))
    assert -8 <= float(rows[2]["value"]) <= 0  # (within [-4 t, 0])


def test_bench_clip_routes_runs_and_writes_its_csv(tmp_path):
    # benchmarks/bench_clip_routes.py on tiny cases: both routes run, on the same problem (the same loss).
    import csv

    from contrastbound import _backend

    if not _backend.clip_kernel_serves(torch.device("cpu")):
        pytest.skip("the compiled CPU clip kernel is not loaded")
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_clip_routes.py")
    proc = subprocess.run([sys.executable, path, "--cases", "9:5,600:3", "--reps", "1", "--threads", "1", "--out",
                           "cr.csv"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-1000:]
    with open(tmp_path / "cr.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["N"], r["d"]) for r in rows] == [("9", "5"), ("600", "3")]
    for r in rows:
        assert float(r["kernel_ms"]) > 0 and float(r["calls_ms"]) > 0
        assert abs(float(r["kernel_loss"]) - float(r["calls_loss"])) <= 1e-5 * abs(float(r["calls_loss"])), r
    proc = subprocess.run([sys.executable, path, "--loss", "nt_xent", "--cases", "9:5", "--reps", "1", "--threads", "1",
                           "--out", "nt.csv"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-1000:]
    with open(tmp_path / "nt.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["loss"] == "nt_xent"
    assert abs(float(row["kernel_loss"]) - float(row["calls_loss"])) <= 1e-5 * abs(float(row["calls_loss"])), row
    bad = subprocess.run([sys.executable, path, "--cases", "9"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert bad.returncode == 2 and "N:d" in bad.stderr


def test_worker_pythonpath_keeps_site_packages_off_it(tmp_path):
    # (a packaging review) an installed package's root is site-packages: put on a worker's PYTHONPATH it came
    # before the standard library there. A checkout's root goes first, once; the inherited path is kept last.
    import site

    from contrastbound.benchsuite.harness import worker_pythonpath

    checkout = str(tmp_path)
    installed = site.getsitepackages()[0]
    assert worker_pythonpath([installed], None) == ""
    assert worker_pythonpath([checkout, installed, checkout], "/inherited") == os.pathsep.join([checkout,
                                                                                               "/inherited"])
    assert worker_pythonpath([installed], "/inherited") == "/inherited"


def test_bench_accuracy_rows_agree(tmp_path):
    """benchmarks/bench_accuracy.py at a small size: both methods' rows, the same accuracies (the script's own
    check that the fused metric and MoCo's materialised one measure the same thing)."""
    out = tmp_path / "ba"
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_accuracy.py")
    proc = subprocess.run([sys.executable, script, "--log2k", "5,7", "-B", "16", "-d", "8", "--reps", "1",
                           "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-500:]
    rows = list(csv.DictReader(open(str(out) + ".csv")))
    assert [(r["K"], r["method"]) for r in rows] == [("32", "fused"), ("32", "naive"), ("128", "fused"),
                                                     ("128", "naive")]
    for fused, naive in (rows[:2], rows[2:]):
        assert (fused["acc1"], fused["acc5"]) == (naive["acc1"], naive["acc5"])
        assert float(fused["time_s"]) > 0 and float(fused["gflops"]) > 0
