"""scripts/ptxas_report.py: parsing of `ptxas -v` output and the no-spill rule for the flash / wgmma kernels (the
real log is checked by scripts/cpp_tests.sh after the nvcc compile check)."""

import os

import pytest
from conftest import load_module

_PATH = os.path.join(os.path.dirname(__file__), "..", "scripts", "ptxas_report.py")

FLASH = ("_ZN13contrastbound4cuda54_GLOBAL__N__04e851c3_21_info_nce_cuda_bf16_cu_6a3a08cd12flash_ker"
         "nelI13__nv_bfloat16LNS1_9FlashModeE0ELi32EEEvNS1_9TcOperandIT_EES7_NS1_6FlArgsENS1_6TcSmemE")
ROWS = ("_ZN13contrastbound4cuda54_GLOBAL__N__04e851c3_21_info_nce_cuda_bf16_cu_6a3a08cd15mma_rows_"
        "kernelI13__nv_bfloat16Lb0EEEvNS1_9TcOperandIT_EES6_NS1_10TcRowsArgsENS1_6TcSmemE")


def _entry(name, arch, regs, st, ld):
    return (f"ptxas info    : Compiling entry function '{name}' for '{arch}'\n"
            f"ptxas info    : Function properties for {name}\n"
            f"    {max(st, ld)} bytes stack frame, {st} bytes spill stores, {ld} bytes spill loads\n"
            f"ptxas info    : Used {regs} registers, used 1 barriers, 416 bytes cmem[0]\n")


@pytest.fixture(scope="module")
def report():
    return load_module(_PATH)


def test_parse_and_short_names(report):
    log = _entry(FLASH, "sm_90a", 247, 0, 0) + "[3/9] Building CUDA object x.o\n" + _entry(ROWS, "sm_80", 128, 40, 64)
    got = report.parse(log.splitlines())
    assert [(a, r, s, l) for _, a, r, s, l in got] == [("sm_90a", 247, 0, 0), ("sm_80", 128, 40, 64)]
    names = report.demangle([g[0] for g in got])
    assert [report.short(n) for n in names] == ["flash_kernel<__nv_bfloat16, (FlashMode)0, 32>",
                                                "mma_rows_kernel<__nv_bfloat16, false>"]


@pytest.mark.parametrize("demangled", [True, False])
@pytest.mark.parametrize("flash_spill, rc", [(0, 0), (120, 1)])
def test_no_spill_rule(report, tmp_path, capsys, monkeypatch, flash_spill, rc, demangled):
    """A spill in a flash / wgmma kernel fails; one in another kernel (mma_rows_kernel) is listed only; also where
    c++filt is missing (names stay mangled)."""
    if not demangled:
        monkeypatch.setattr(report, "demangle", list)
    log = tmp_path / "compile.log"
    log.write_text(_entry(FLASH, "sm_90a", 255, flash_spill, flash_spill) + _entry(ROWS, "sm_80", 128, 40, 64))
    assert report.main([str(log)]) == rc
    out = capsys.readouterr().out
    assert ("mma_rows_kernel<__nv_bfloat16, false>  spills" if demangled else "mma_rows_kernel") in out
    assert ("SPILLS (must not)" in out) == bool(flash_spill)


def test_log_without_ptxas_lines_passes(report, tmp_path, capsys):
    log = tmp_path / "compile.log"
    log.write_text("ninja: no work to do.\n")
    assert report.main([str(log)]) == 0
    assert "not checked" in capsys.readouterr().out


def test_help_prints_usage(report, capsys):
    assert report.main(["--help"]) == 0
    assert "python scripts/ptxas_report.py" in capsys.readouterr().out
