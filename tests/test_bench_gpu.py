"""The pure parts of benchmarks/bench_gpu.py's per-kernel profile (--kernels): kernel names and the modelled rates;
benchmarks/gpu_summary.py; benchmarks/wg_timing.py's parsing. The runs themselves need a GPU (scripts/gpu_check.sh
runs them)."""

import math
import os

import pytest
import torch
from conftest import load_module

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_gpu.py")


@pytest.fixture(scope="module")
def bench():
    return load_module(_PATH)


@pytest.mark.parametrize("raw, short", [
    ("void contrastbound::cuda::(anonymous namespace)::mma_lse_kernel<__nv_bfloat16, false>("
     "contrastbound::cuda::(anonymous namespace)::TcOperand<__nv_bfloat16>, float const*)",
     "mma_lse_kernel<__nv_bfloat16, false>"),
    ("void contrastbound::cuda::(anonymous namespace)::flash_kernel<__nv_bfloat16, "
     "(contrastbound::cuda::(anonymous namespace)::FlashMode)0, 32>(int)",
     "flash_kernel<__nv_bfloat16, (FlashMode)0, 32>"),
    ("contrastbound::cuda::(anonymous namespace)::tc_bound_kernel(float const*, long, float*)", "tc_bound_kernel"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >"
     "(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)",
     "vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "sm90_xmma_gemm_bf16bf16_bf16f32"),
])
def test_kernel_name(bench, raw, short):
    assert bench._kernel_name(raw) == short


def test_kernel_rows_rates(bench):
    B, K, d, mm = 8192, 2**18, 256, 500.0
    events = [
        ("void contrastbound::cuda::(anonymous namespace)::mma_rows_kernel<__nv_bfloat16, false>(int)", 2, 4000.0),
        ("void contrastbound::cuda::(anonymous namespace)::mma_lse_kernel<__nv_bfloat16, false>(int)", 1, 3000.0),
        ("void contrastbound::cuda::(anonymous namespace)::prepare_kernel<__nv_bfloat16, float>(int)", 3, 1000.0),
    ]
    rows = bench._kernel_rows(events, "fused", B, K, d, mm)
    assert [r["kernel"].split("<")[0] for r in rows] == ["mma_rows_kernel", "mma_lse_kernel", "prepare_kernel"]
    assert sum(r["pct_of_step"] for r in rows) == pytest.approx(100.0)
    assert rows[0]["pct_of_step"] == pytest.approx(50.0)
    # Two rows passes of 4 B K d flop each in 4 ms; one log-sum-exp pass of 2 B K d in 3 ms.
    assert rows[0]["model_tflops"] == pytest.approx(2 * 4 * B * K * d / 4e-3 / 1e12)
    assert rows[1]["model_tflops"] == pytest.approx(2 * B * K * d / 3e-3 / 1e12)
    assert rows[1]["pct_of_matmul"] == pytest.approx(100 * rows[1]["model_tflops"] / mm)
    assert rows[2]["model_tflops"] is None and rows[2]["pct_of_matmul"] is None  # O((B + K) d) work: no rate
    assert rows[0]["ms"] == pytest.approx(4.0)


def test_kernel_flop_model_names_real_kernels(bench):
    """Every kernel of the model exists in the CUDA sources (a renamed kernel would silently lose its rate)."""
    root = os.path.join(os.path.dirname(__file__), "..", "csrc", "cuda")
    text = "".join(open(os.path.join(root, f)).read() for f in os.listdir(root))
    for name in bench.KERNEL_FLOP:
        assert f" {name}(" in text or f"\n    {name}(" in text, name


# --- benchmarks/gpu_summary.py: issue 4's targets from bench_gpu CSVs ---

_SUMMARY = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_summary.py")
_FIELDS = ["problem", "impl", "B", "K", "d", "dtype", "fwd_ms", "bwd_ms", "fwdbwd_ms", "tflops", "matmul_tflops",
           "pct_of_matmul", "speedup_vs_naive", "peak_extra_gib", "grads_gib", "loss", "eval_fwd_ms",
           "eval_fwd_ms_wg_lse", "note"]


def _csv(path, rows):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in _FIELDS})
    return str(path)


def _r(impl, K, ms, pct=None, mem=None, note="", problem="shared"):
    return dict(problem=problem, impl=impl, K=K, fwdbwd_ms=ms, pct_of_matmul=pct, peak_extra_gib=mem, note=note)


def test_gpu_summary_targets(tmp_path, capsys):
    summary = load_module(_SUMMARY)
    main = _csv(tmp_path / "main.csv", [
        _r("fused", 2**14, 2.0, 20, 0.1), _r("naive", 2**14, 4.0, 10, 2.0),
        _r("fused", 2**18, 30.0, 20, 0.2), _r("naive", 2**18, 60.0, 10, 25.0),
        _r("cut_cross_entropy", 2**18, 15.0), _r("inf_cl", 2**18, 120.0),
        _r("fused", 2**22, 500.0, 22, 2.0), _r("naive", 2**22, "", note="skipped: needs ~400 GiB"),
        _r("fused", 2**20, "", note="skipped: time budget"),
    ])
    opt = _csv(tmp_path / "opt.csv", [
        _r("fused", 2**18, 31.0, 19),  # the opt-in run's own reference: the main file's row is kept
        _r("fused_flash", 2**18, 20.0, 30), _r("fused_flash", 2**22, 300.0, 36),
        _r("fused_wgmma", 2**18, "", note="CONTRASTBOUND_TC_WGMMA=1 WRONG RESULT: rel err 0.9 vs default"),
        _r("fused_wgmma", 2**22, 10.0, 90),
    ])
    lines, best = summary.summarise(summary.load([main, opt]))
    by = {ln["impl"]: ln for ln in lines}
    f = by["fused"]
    assert (f["measured"], f["failed"], f["ks"]) == (3, 0, [2**18, 2**22])  # the skipped 2^20 row: neither
    assert (f["pct_min"], f["pct_median"]) == (20, 21)  # K >= 2^18 only
    assert f["vs_naive_min"] == pytest.approx(2.0)  # 60 / 30 at 2^18, 4 / 2 at 2^14; none at 2^22
    assert f["vs_cut_cross_entropy_min"] == pytest.approx(0.5) and f["vs_inf_cl_min"] == pytest.approx(4.0)
    assert f["mem_k"] == 2**18 and f["mem_pct_of_naive"] == pytest.approx(100 * 0.2 / 25.0)
    assert by["fused_wgmma"]["failed"] == 1
    # The candidate default: the fastest at 2^18 among variants with no failure (wgmma disagreed there).
    assert best["shared"][0] == "fused_flash"
    assert summary.main([main, opt]) == 0
    out = capsys.readouterr().out
    assert "fastest without failures at K = 2^18, shared: fused_flash" in out
    # A variant out of memory where the default fits is a failure, not a skip; an error of the default kernels'
    # own calls ("rest of this problem") is theirs; without 2^18 the candidate is chosen at the largest K.
    more = _csv(tmp_path / "more.csv", [
        _r("fused_flash", 2**21, "", note="CONTRASTBOUND_TC_FLASH=1 failed: OutOfMemoryError: CUDA out of memory"),
        _r("rest of this problem", 2**19, "", note="failed: RuntimeError: CUDA error: an illegal memory access"),
        _r("fused", 2**14, 2.0, 20, problem="in_batch"), _r("fused", 2**17, 40.0, 20, problem="in_batch"),
        _r("fused_flash", 2**17, 30.0, 25, problem="in_batch"),
    ])
    lines, best = summary.summarise(summary.load([main, opt, more]))
    by = {(ln["problem"], ln["impl"]): ln for ln in lines}
    assert by[("shared", "fused_flash")]["failed"] == 1 and by[("shared", "fused")]["failed"] == 1
    assert "shared" not in best  # every variant measured at 2^18 failed somewhere
    assert best["in_batch"][0] == "fused_flash" and best["in_batch"][3] == 2**17
    summary.main([main, opt, more])
    assert "shared: no variant ran without failures" in capsys.readouterr().out


def test_gpu_summary_eval_forward(tmp_path, capsys):
    """The forward without gradients: the default kernels' at K = 2^18 (else the largest K measured), beside the
    wgmma Lse walk's, naive's and the training forward's; rows without the columns (older CSVs) give none."""
    summary = load_module(_SUMMARY)
    path = _csv(tmp_path / "eval.csv", [
        dict(_r("fused", 2**16, 4.0, 46), eval_fwd_ms=1.9, eval_fwd_ms_wg_lse=1.1, fwd_ms=2.0),
        dict(_r("fused", 2**18, 14.5, 47), eval_fwd_ms=6.6, eval_fwd_ms_wg_lse=3.5, fwd_ms=7.6),
        dict(_r("naive", 2**18, 60.0, 11), eval_fwd_ms=26.0),
        dict(_r("fused", 2**17, 114.0, 42, problem="in_batch"), eval_fwd_ms=30.0, fwd_ms=60.0),
        _r("fused", 2**16, 29.6, 41, problem="in_batch"),  # no eval column filled
    ])
    got = summary.eval_forward(summary.load([path]))
    assert got["shared"] == (2**18, 6.6, 3.5, 26.0, 7.6)
    K, ms, walk, naive, train = got["in_batch"]
    assert (K, ms, train) == (2**17, 30.0, 60.0) and math.isnan(walk) and math.isnan(naive)
    assert summary.main([path]) == 0
    assert ("forward without gradients at K = 2^18, shared: 6.6 ms (wgmma Lse walk, CONTRASTBOUND_TC_WG_LSE=1: "
            "3.5 ms; naive 26 ms; the training forward 7.6 ms)") in capsys.readouterr().out
    old = _csv(tmp_path / "old.csv", [_r("fused", 2**18, 14.5, 47)])
    assert summary.eval_forward(summary.load([old])) == {}


def test_gpu_summary_names_a_csv_it_cannot_read(tmp_path, capsys):
    # A glob of bench_gpu*.csv also catches the per-kernel CSV, whose rows have no problem column: a message naming
    # the file, exit status 2, not a KeyError.
    summary = load_module(_SUMMARY)
    main = _csv(tmp_path / "bench_gpu.csv", [_r("fused", 2**18, 30.0, 20)])
    kernels = tmp_path / "bench_gpu_opt_in_kernels.csv"
    kernels.write_text("impl,B,K,d,kernel,calls,ms\nfused,8192,262144,256,wgmma_kernel,1,7.0\n")
    assert summary.main([main, str(kernels)]) == 2
    err = capsys.readouterr().err
    assert "bench_gpu_opt_in_kernels.csv: not a bench_gpu.py results CSV (no column problem" in err
    assert summary.main([main, str(tmp_path / "absent.csv")]) == 2
    assert "absent.csv" in capsys.readouterr().err
    assert summary.main([main]) == 0


def test_gpu_summary_help(capsys):
    summary = load_module(_SUMMARY)
    assert summary.main(["--help"]) == 0 and summary.main([]) == 64
    assert "python benchmarks/gpu_summary.py" in capsys.readouterr().out


def test_gpu_summary_prefers_a_measured_row_to_a_skipped_one(tmp_path):
    # The main run skipped a size for its time budget and an opt-in run measured the default kernels there (its
    # reference): the measured row counts. An opt-in run's own "rest of this problem" row is not the default's.
    summary = load_module(_SUMMARY)
    main = _csv(tmp_path / "main.csv", [_r("fused", 2**18, 30.0, 20),
                                        _r("fused", 2**20, "", note="skipped: time budget")])
    opt = _csv(tmp_path / "opt.csv", [
        _r("fused", 2**18, 99.0, 5), _r("fused", 2**20, 120.0, 21),
        _r("fused_flash", 2**18, 10.0, 60), _r("fused_flash_1stage", 2**18, 12.0, 50),
        _r("fused_wgmma", 2**18, 20.0, 30),
        _r("rest of this problem (flash run)", 2**20, "", note="failed: RuntimeError: CUDA error"),
    ])
    rows = summary.load([main, opt])
    kept = {(r["impl"], int(r["K"])): r for r in rows}
    assert kept[("fused", 2**18)]["fwdbwd_ms"] == "30.0" and kept[("fused", 2**20)]["fwdbwd_ms"] == "120.0"
    lines, best = summary.summarise(rows)
    by = {ln["impl"]: ln for ln in lines}
    assert by["fused"]["failed"] == 0 and by["fused"]["measured"] == 2
    # the flash run's error: a failure of every flash variant, so the fastest without failures is wgmma
    assert by["fused_flash"]["failed"] == 1 and by["fused_flash_1stage"]["failed"] == 1
    assert by["fused_wgmma"]["failed"] == 0 and best["shared"][0] == "fused_wgmma"


def test_bench_rows_append_and_variants(bench, tmp_path, capsys):
    # gpu_check.sh runs one opt-in family per process, all appending to one CSV (one header).
    path = str(tmp_path / "opt.csv")
    for impl in ("fused_wgmma", "fused_flash"):
        sink = bench._RowSink(path, append=True)
        sink.append(dict(problem="shared", impl=impl, K=2**14))
        sink._file.close()
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("problem,") and len(lines) == 3 and "fused_flash" in lines[2]
    sink = bench._RowSink(path)  # without append: a new file
    sink._file.close()
    with open(path) as f:
        assert len(f.read().splitlines()) == 1
    with pytest.raises(SystemExit):
        bench.main(["--variants", "flash,foo"])
    assert "--variants: unknown foo" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a misspelt problem ran nothing, silently
        bench.main(["--problems", "shared,shared_label"])
    assert "--problems: unknown shared_label" in capsys.readouterr().err


def test_naive_with_mask_is_the_masked_loss(bench):
    """bench_gpu's naive masked baseline (the shared_mask rows) computes what info_nce(negative_mask=) does."""
    import torch

    import contrastbound as cb

    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(s, 16, generator=g, dtype=torch.float64) for s in (7, 7, 29))
    classes = torch.randint(0, bench.MASK_CLASSES // 25, (7 + 29,), generator=g)
    mask = classes[:7, None] != classes[None, 7:]
    assert not bool(mask.all()) and bool(mask.any())
    want = cb.info_nce(a, p, n, temperature=0.07, negative_mask=mask)
    torch.testing.assert_close(bench._naive(a, p, n, 0.07, mask).double(), want, rtol=1e-5, atol=1e-5)  # float32
    assert not torch.allclose(bench._naive(a, p, n, 0.07).double(), want)  # the mask changed the loss


# --- benchmarks/wg_timing.py: the wgmma kernels' phase cycles from a diagnostic build's CB_WGT lines ---

_WG_TIMING = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "wg_timing.py")


def test_wg_timing_sums_the_lines_between_the_markers():
    wt = load_module(_WG_TIMING)
    warm = "CB_WGT mode=1 warpgroups=9 units=9 tiles=9 cycles=9,9,9,9,9,9 max=9 min=9\n"  # the warm-up: not counted
    lines = [
        # forward: 4 warpgroups (two blocks) walked 16 tiles in 2 units; two launches of the bank pass
        "CB_WGT mode=1 warpgroups=4 units=2 tiles=16 cycles=230,430,660,880,1100,1320 max=2100 min=210",
        "CB_WGT mode=0 warpgroups=2 units=2 tiles=4 cycles=0,40,40,0,0,0 max=50 min=30",
        "CB_WGT mode=0 warpgroups=2 units=1 tiles=2 cycles=0,0,40,0,0,0 max=40 min=0",
    ]
    text = warm + "noise\nCB_WGT_BEGIN\n" + "\n".join(lines) + "\nCB_WGT_END\n" + warm
    stats = wt.parse(text)
    fwd, bank = stats[1], stats[0]
    assert (fwd["launches"], fwd["warpgroups"], fwd["units"], fwd["tiles"]) == (1, 4, 2, 16)
    assert fwd["cycles"] == [230, 430, 660, 880, 1100, 1320]
    assert (bank["launches"], bank["tiles"], bank["cycles"], bank["max"], bank["min"]) == (2, 6, [0, 40, 80, 0, 0, 0],
                                                                                          50, 0)
    rows = {r["kernel"]: r for r in wt.table(stats)}
    f = rows["forward (FlashMode 1)"]
    assert f["coef_per_tile"] == pytest.approx(880 / 32)  # 16 tiles, each walked by both warpgroups
    assert f["total_per_tile"] == pytest.approx(4620 / 32)
    assert sum(f[f"{p}_pct"] for p in wt.PHASES) == pytest.approx(100.0)
    assert f["warpgroup_cycles_mean"] == pytest.approx(4620 / 4) and f["warpgroup_cycles_max"] == 2100
    b = rows["bank pass (FlashMode 0)"]
    assert (b["tiles"], b["scores_per_tile"], b["wait_pct"]) == (6, pytest.approx(80 / 12), pytest.approx(100 / 3))
    # without markers every line counts; a line of the wrong width is an error, not a silent misreading
    assert wt.parse(lines[0])[1]["tiles"] == 16
    with pytest.raises(ValueError, match="5 phases, expected 6"):
        wt.parse("CB_WGT mode=1 warpgroups=2 units=1 tiles=1 cycles=1,2,3,4,5 max=1 min=1")


def test_wg_timing_without_a_gpu(capsys):
    wt = load_module(_WG_TIMING)
    if torch.cuda.is_available():
        pytest.skip("has a GPU: the script would run")
    assert wt.main([]) == 0
    assert "no GPU" in capsys.readouterr().out
