"""Builds contrastbound._C against the torch that is installed (use `pip install --no-build-isolation`).

Environment:
  FORCE_CUDA=1       build the CUDA kernels too, even on a machine without a GPU (needs nvcc and a CUDA torch)
  FORCE_ONLY_CPU=1   never build CUDA kernels
  MAX_JOBS=N         parallel compile jobs (default: min(cores, 4), so nvcc does not exhaust memory)
  TORCH_CUDA_ARCH_LIST="8.0;9.0a"  GPU architectures (honoured by torch's build helpers)
  CONTRASTBOUND_DEBUG=1            -O0 -g (default: -O3 -g0, no debug information)
  CONTRASTBOUND_LINK_LIBSTDCXX=0   do not name torch's libstdc++ on the link line (see _libstdcxx_link_args)
  CONTRASTBOUND_WG_TIMING=1        diagnostic CUDA build: the wgmma kernels time their phases and print them after
                                   each launch (benchmarks/wg_timing.py reads them); not for training
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import setuptools
from setuptools import find_packages, setup


def _stop(message: str) -> None:
    sys.stderr.write(f"\ncontrastbound: {message}\n\n")
    raise SystemExit(1)


# pyproject.toml's licence expression needs setuptools 77; older ones fail on it with a schema error. (A build
# with --no-build-isolation uses the environment's setuptools, which pip does not check.)
if int(re.match(r"\d*", setuptools.__version__).group() or 0) < 77:
    _stop(f"the build needs setuptools >= 77 (this environment has {setuptools.__version__}): "
          "`pip install -U 'setuptools>=77'`, then build again.")
try:
    import torch
except ImportError:
    _stop("the extension compiles against the PyTorch it will run with, and none is importable here. Install "
          "torch first (a pinned version: `pip install torch==2.13.0`, or the build your machine needs), then "
          "build without isolation, so that the build sees it: `pip install --no-build-isolation .` (or `-e .`). "
          "A plain `pip install .` builds in an isolated environment without torch and stops here.")
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _nvcc() -> str | None:
    """The nvcc torch's build helpers compile with: CUDA_HOME's."""
    if CUDA_HOME is None:
        return None
    path = os.path.join(CUDA_HOME, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


def _want_cuda() -> tuple[bool, str]:
    if os.environ.get("FORCE_ONLY_CPU", "0") == "1":
        return False, "FORCE_ONLY_CPU=1"
    has_nvcc = _nvcc() is not None
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if torch.version.cuda is None:
            _stop(f"FORCE_CUDA=1 needs a CUDA build of torch; this torch ({torch.__version__}) is CPU-only. Install a "
                  "CUDA torch, or leave FORCE_CUDA unset for the CPU kernels.")
        if not has_nvcc:
            _stop("FORCE_CUDA=1 needs nvcc, and none was found (CUDA_HOME unset or without bin/nvcc, none on the "
                  "PATH): set CUDA_HOME to the CUDA toolkit.")
        return True, "FORCE_CUDA=1"
    # Decided from the torch build and the compiler, never from torch.cuda.is_available(): a build machine
    # without a GPU must still build the CUDA kernels for a CUDA torch.
    if torch.version.cuda is not None and has_nvcc:
        return True, "CUDA torch and nvcc found"
    return False, "CPU-only torch" if torch.version.cuda is None else "nvcc not found"


def _nvcc_release(nvcc: str) -> str | None:
    """nvcc's CUDA release ("13.0"), from `nvcc --version`; None where it cannot be read."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else None


def _check_nvcc_matches_torch() -> None:
    """Before a CUDA build: torch's build helpers refuse an nvcc of another CUDA major version than torch's (a
    RuntimeError deep in the build). Said here first, with the ways out. (Not at `setup.py` time: an sdist, or a
    metadata query, compiles nothing and needs no matching nvcc.)"""
    nvcc = _nvcc()
    release = _nvcc_release(nvcc) if nvcc else None
    if release is None or torch.version.cuda is None:
        return
    if release.split(".")[0] != torch.version.cuda.split(".")[0]:
        _stop(f"this torch ({torch.__version__}) was built with CUDA {torch.version.cuda}, and the nvcc found "
              f"({nvcc}) is CUDA {release}: torch's extension build refuses another major version. Point CUDA_HOME "
              f"at a CUDA {torch.version.cuda.split('.')[0]}.x toolkit, or build the CPU kernels only with "
              "FORCE_ONLY_CPU=1.")


class _BuildExtension(BuildExtension):
    def run(self):
        if any(isinstance(ext, setuptools.Extension) and any(src.endswith(".cu") for src in ext.sources)
               for ext in self.extensions):
            _check_nvcc_matches_torch()
        super().run()


def _loaded_libstdcxx() -> str | None:
    """The libstdc++ shared library this process (torch) has loaded, on Linux; None elsewhere or if none is."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                path = fields[-1] if len(fields) >= 6 else ""
                if os.path.basename(path).startswith("libstdc++.so") and os.path.isfile(path):
                    return path
    except OSError:
        pass
    return None


def _libstdcxx_link_args() -> list[str]:
    """The libstdc++ that torch runs with, named on the link line before the compiler's own, so that every C++
    library symbol resolves to it. A compiler that links its libstdc++ statically (the H200 machine's
    /opt/gcc/bin/g++, by cuda-gdb's backtrace, which found libstdc++'s own functions inside the module; with Python's
    -Wl,-Bsymbolic-functions) otherwise put a second copy of the iostreams into the module, bound to it, whose uninitialised locale made every C++ error message that formats a number crash
    (segmentation fault) or lose its numbers (reproduced here with -static-libstdc++: "[0, " and nothing after).
    The static archive then supplies nothing, since nothing is left undefined (on that machine, 2026-12-04, the
    module so built defined no libstdc++ symbol and its messages kept their numbers). CONTRASTBOUND_LINK_LIBSTDCXX=0
    leaves the link line as torch's build makes it."""
    if os.environ.get("CONTRASTBOUND_LINK_LIBSTDCXX", "1") == "0" or not sys.platform.startswith("linux"):
        return []
    lib = _loaded_libstdcxx()
    return [lib] if lib else []


def _extension():
    use_cuda, why = _want_cuda()
    print(f"contrastbound: building {'CPU + CUDA' if use_cuda else 'CPU'} extension ({why})")
    os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, 4))))
    debug = os.environ.get("CONTRASTBOUND_DEBUG", "0") == "1"
    # -g0: Python's own CFLAGS (sysconfig) carry -g, which made the CPU library 15.6 MB, 0.97 MB of it code and
    # symbols; function names stay in the symbol table for backtraces.
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # The language standard is the one torch asks for (C++17 up to torch 2.11, C++20 from 2.12); the code is C++17
    # (CMakeLists.txt's checks compile the CUDA sources as both).
    cxx = ["-fopenmp", "-fvisibility=hidden", "-Wall", "-Wno-unused-function", *opt]
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    kwargs = dict(extra_link_args=["-fopenmp", *_libstdcxx_link_args()])
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*_glue.cpp"))
        # -compress-all: the per-dtype parts' cubins are compressed in the fat binary too (uncompressed they
        # doubled the library's size when the kernels were split over three files).
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xfatbin", "-compress-all"]
        if os.environ.get("CONTRASTBOUND_WG_TIMING", "0") == "1":
            nvcc.append("-DCONTRASTBOUND_WG_TIMING=1")
        return CUDAExtension(
            "contrastbound._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DCONTRASTBOUND_WITH_CUDA"], "nvcc": nvcc},
            **kwargs,
        )
    return CppExtension("contrastbound._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    packages=find_packages(include=["contrastbound", "contrastbound.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExtension.with_options(use_ninja=True)},
)
