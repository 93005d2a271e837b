"""Registers and spills of the CUDA kernels, from the nvcc compile check's `ptxas -v` output.

    python scripts/ptxas_report.py cmake-build/compile.log [--all]

Prints the kernels that spill (with --all, every tensor-core kernel's line) and fails (exit 1) if a kernel that
must not spill does: the flash-layout and wgmma kernels (NO_SPILL), which hold a 16 x d (per warp) or 64 x d (per
warpgroup) float32 output in registers, where a spill in the tile loop would cost every tile. Others that spill
are listed (the mma.sync rows kernels spill a few bytes under their two-blocks-per-multiprocessor bound;
scripts/sass_spills.py tells in which loop).

The log must come from a build whose commands' outputs are not interleaved (ninja prints each command's output
whole); a log without ptxas lines (nothing was recompiled) is reported and passes.
"""

from __future__ import annotations

import re
import subprocess
import sys

NO_SPILL = ("flash_kernel", "wgmma_kernel")
TENSOR_CORE = ("tc_", "mma_", "flash_", "wgmma_")

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse(lines):
    """(mangled name, arch, registers, spill stores, spill loads) per compiled entry function."""
    out, cur, spill = [], None, (0, 0)
    for line in lines:
        m = _ENTRY.search(line)
        if m:
            cur, spill = (m.group(1), m.group(2)), (0, 0)
            continue
        m = _SPILL.search(line)
        if m and cur:
            spill = (int(m.group(2)), int(m.group(3)))
            continue
        m = _REGS.search(line)
        if m and cur:
            out.append((cur[0], cur[1], int(m.group(1)), spill[0], spill[1]))
            cur = None
    return out


def demangle(names):
    try:
        res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        dem = res.stdout.splitlines()
        if len(dem) == len(names):
            return dem
    except (OSError, subprocess.CalledProcessError):
        pass
    return list(names)


def short(name: str) -> str:
    """A demangled kernel name shortened to the function and its template arguments, e.g.
    "mma_rows_kernel<__nv_bfloat16, false>": return type, namespaces and parameters dropped (also used by
    benchmarks/bench_gpu.py for the profiler's names)."""
    s = re.sub(r"\(anonymous namespace\)::|contrastbound::cuda::", "", name)
    depth = 0
    for i, ch in enumerate(s):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:  # the parameters
            s = s[:i]
            break
    lt = s.find("<")
    head, args = (s, "") if lt < 0 else (s[:lt], s[lt:])
    words = head.split()  # the return type, if any, comes first
    return (words[-1] if words else head).split("::")[-1] + args.rstrip()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    show_all = "--all" in argv
    argv = [a for a in argv if a != "--all"]
    if len(argv) != 1:
        print(__doc__)
        return 64
    with open(argv[0], errors="replace") as f:
        entries = parse(f)
    if not entries:
        print("ptxas report: no ptxas -v lines in the log (nothing recompiled): not checked")
        return 0
    names = demangle([e[0] for e in entries])
    rows = sorted({(short(n), e[1], e[2], e[3], e[4]) for n, e in zip(names, entries)})
    bad = []
    guarded = [r for r in rows if any(k in r[0] for k in NO_SPILL)]
    print(f"ptxas report: {len(rows)} kernel instances; {', '.join(NO_SPILL)}: {len(guarded)}, at most "
          f"{max((r[2] for r in guarded), default=0)} registers; registers, spill stores / loads in bytes:")
    for kernel, arch, regs, st, ld in rows:
        flag = ""
        if st or ld:
            must = any(k in kernel for k in NO_SPILL)  # (also where c++filt is missing: the mangled name has it)
            flag = "  SPILLS (must not)" if must else "  spills"
            if must:
                bad.append(f"{kernel} {arch}")
        if flag or (show_all and kernel.startswith(TENSOR_CORE)):
            print(f"  {arch:<7} {regs:>4} regs {st:>4} / {ld:<4} {kernel}{flag}")
    if bad:
        print("FAILED: these kernels spill registers to local memory:\n  " + "\n  ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
