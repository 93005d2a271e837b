"""Packaging: the source distribution, setup.py's refusals, the message of an extension that does not load, and
the version. Each check runs the real thing in a child process (a build backend call, setup.py, an import)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap

import pytest
from conftest import PACKAGE_ROOT, child_json, package_env

import contrastbound
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tracked files a source distribution has no use for: CI's entry point and git's own.
NOT_SHIPPED = {".ci/run", ".gitignore"}


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not os.path.isdir(os.path.join(REPO, ".git")):
        pytest.skip("needs a git checkout (the tracked files are the reference)")
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if f and f not in NOT_SHIPPED]


def test_sdist_holds_every_tracked_file_and_no_build_output(tmp_path):
    # Without MANIFEST.in the sdist had setuptools' defaults only: no csrc headers (it could not be built), no CUDA
    # sources, no CMakeLists.txt, no tests/conftest.py.
    tracked = _tracked_files()
    code = f"from setuptools import build_meta; build_meta.build_sdist({str(tmp_path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (archive,) = tmp_path.glob("contrastbound-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name}
    missing = sorted(set(tracked) - names)
    assert not missing, f"tracked files missing from the sdist: {missing}"
    for required in ("LICENSE", "csrc/core/online_lse.h", "csrc/info_nce_checks.h", "tests/conftest.py"):
        assert required in names
    built = sorted(n for n in names if n.endswith((".so", ".o", ".pyc")) or "__pycache__" in n
                   or n.startswith(("build/", "cmake-build/", ".venv/")))
    assert not built, f"build output in the sdist: {built}"


def _run_setup(prelude: str, argv: tuple[str, ...] = ("--name",), **env: str) -> subprocess.CompletedProcess:
    code = prelude + textwrap.dedent(f"""
        import runpy, sys
        sys.argv = ["setup.py", *{list(argv)!r}]
        runpy.run_path("setup.py", run_name="__main__")
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **env))


def _nvcc_major() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("needs nvcc")
    found = re.search(r"release (\d+)\.", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
    assert found, "nvcc --version names no release"
    return found.group(1)


def test_setup_force_cuda_on_a_cpu_torch_says_so():
    # (a packaging review's find) a bare RuntimeError traceback before
    proc = _run_setup("import torch\ntorch.version.cuda = None\n", FORCE_CUDA="1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "FORCE_CUDA=1 needs a CUDA build of torch" in proc.stderr


def test_a_cuda_build_with_an_nvcc_of_another_major_version_stops_with_the_ways_out(tmp_path):
    # torch's build helpers refuse an nvcc of another CUDA major version than torch's, with a RuntimeError in the
    # middle of the build (a packaging review: a cu12x torch beside a system nvcc 13). build_ext now says so first
    # and names CUDA_HOME and FORCE_ONLY_CPU=1; setup.py for metadata or an sdist does not ask (nothing compiles).
    major = _nvcc_major()
    other = str(int(major) - 1)
    # (a CPU torch's cpp_extension leaves CUDA_HOME None: set where torch would find it, nvcc's folder's parent)
    cuda_home = os.path.dirname(os.path.dirname(shutil.which("nvcc")))
    home = f"import torch.utils.cpp_extension as ce\nce.CUDA_HOME = {cuda_home!r}\n"
    prelude = f"import torch\ntorch.version.cuda = '{other}.6'\n" + home
    proc = _run_setup(prelude, ("build_ext", "--build-lib", str(tmp_path), "--build-temp", str(tmp_path)),
                      FORCE_CUDA="1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"built with CUDA {other}.6" in proc.stderr and f"is CUDA {major}." in proc.stderr
    assert "CUDA_HOME" in proc.stderr and "FORCE_ONLY_CPU=1" in proc.stderr
    assert not list(tmp_path.rglob("*.o")), "it compiled before stopping"
    assert _run_setup(prelude, FORCE_CUDA="1").returncode == 0  # (--name: no check)
    # the same major version (another minor, which torch's build only warns about) passes the check
    check = textwrap.dedent("""
        import runpy, setuptools, sys
        setuptools.setup = lambda **kw: None
        sys.argv = ["setup.py", "--name"]
        runpy.run_path("setup.py", run_name="__main__")["_check_nvcc_matches_torch"]()
        print("passed")
    """)
    for cuda, ok in ((f"{major}.9", True), (f"{other}.6", False)):
        proc = subprocess.run([sys.executable, "-c", f"import torch\ntorch.version.cuda = '{cuda}'\n" + home + check],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert (proc.returncode == 0 and "passed" in proc.stdout) == ok, (cuda, proc.stdout, proc.stderr[-2000:])


def test_setup_without_torch_says_to_install_it_and_build_without_isolation():
    # pyproject no longer lists torch as a build requirement (an isolated build fetched the newest CUDA torch and
    # compiled against it): an isolated build finds none and must stop with what to do, not a bare traceback.
    proc = _run_setup("import sys\nsys.modules['torch'] = None  # import torch raises ImportError\n")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Install torch first" in proc.stderr and "--no-build-isolation" in proc.stderr


def test_setup_with_old_setuptools_names_the_version_needed():
    proc = _run_setup("import setuptools\nsetuptools.__version__ = '65.5.0'\n")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "setuptools >= 77" in proc.stderr and "65.5.0" in proc.stderr and "Traceback" not in proc.stderr


def test_setup_runs_with_this_environment():
    # The refusals above are not taken where torch and setuptools are fine.
    proc = _run_setup("")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "contrastbound"


_IMPORT_WARNING = textwrap.dedent("""
    import sys, warnings
    # An editable install's finder would serve contrastbound._C from the checkout whatever the path says.
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        import contrastbound as cb
    assert cb.__file__.startswith(sys.argv[1]), cb.__file__
    assert cb.backend_info()["cpu"] == "reference"
    ours = [w for w in caught if "contrastbound._C" in str(w.message)]
    # the warning points at the user's import (this script), not at a line inside the package
    assert ours and all(w.filename == "<string>" and w.lineno == line for w in ours), [(w.filename, w.lineno) for w in ours]
    print("\\n".join(str(w.message) for w in ours))
""")


def _copy_package_without_library(tmp_path):
    dest = tmp_path / "pkg"
    shutil.copytree(os.path.dirname(contrastbound.__file__), dest / "contrastbound",
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    return dest


def _import_message(root) -> str:
    proc = subprocess.run([sys.executable, "-c", _IMPORT_WARNING, str(root)], cwd=root,
                          env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_a_tree_never_built_says_so(tmp_path):
    # Python's own message was "cannot import name '_C' from partially initialized module 'contrastbound' (most
    # likely due to a circular import)".
    root = _copy_package_without_library(tmp_path)
    # A library built for another Python (3.9: never this one, the package needs 3.10) is not one this one loads.
    (root / "contrastbound" / "_C.cpython-39-x86_64-linux-gnu.so").write_bytes(b"\x7fELF for another Python\n")
    msg = _import_message(root)
    assert "never built" in msg and "circular import" not in msg
    assert "--no-build-isolation" in msg


def test_a_library_that_does_not_load_says_rebuild_against_this_torch(tmp_path):
    import importlib.machinery

    import torch

    root = _copy_package_without_library(tmp_path)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]  # a name this interpreter tries to load
    (root / "contrastbound" / f"_C{suffix}").write_bytes(b"not a shared library\n")
    msg = _import_message(root)
    assert "does not load" in msg and "another torch" in msg and torch.__version__ in msg
    assert "never built" not in msg


def test_version_is_stated_once_in_effect():
    # pyproject.toml's static version and contrastbound.__version__ must agree (and with the installed metadata).
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
        declared = re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)
    assert contrastbound.__version__ == declared
    from importlib import metadata

    try:
        installed = metadata.version("contrastbound")
    except metadata.PackageNotFoundError:
        return
    assert installed == declared


def test_cli_version_and_bare_command():
    import torch

    env, cwd = package_env(), PACKAGE_ROOT
    proc = subprocess.run([sys.executable, "-m", "contrastbound", "--version"], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == (
        f"contrastbound {contrastbound.__version__} (torch {torch.__version__})"), proc.stdout + proc.stderr
    # Without a command: a usage error, so the help goes to stderr with status 2 (as argparse does), stdout empty.
    proc = subprocess.run([sys.executable, "-m", "contrastbound"], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and "Commands:" in proc.stderr


def test_import_leaves_torch_dynamo_and_the_queue_until_used():
    # NegativeQueue's torch.compiler.disable decorators import torch._dynamo: ~1.2 s on top of torch's ~1.5 s at
    # every import of the package (measured 2.9 -> 1.7 s), so the queue's module loads on first use.
    script = textwrap.dedent("""
        import json, sys
        import torch
        before = "torch._dynamo" in sys.modules
        import contrastbound
        state = {"torch_imports_dynamo": before, "dynamo": "torch._dynamo" in sys.modules,
                 "queue": "contrastbound.queue" in sys.modules, "listed": "NegativeQueue" in dir(contrastbound)}
        from contrastbound import NegativeQueue
        import contrastbound.queue
        state["same"] = NegativeQueue is contrastbound.NegativeQueue is contrastbound.queue.NegativeQueue
        state["cached"] = vars(contrastbound).get("NegativeQueue") is NegativeQueue
        state["dynamo_after"] = "torch._dynamo" in sys.modules
        try:
            contrastbound.NoSuchName
        except AttributeError as e:
            state["missing"] = str(e)
        print(json.dumps(state))
    """)
    state = child_json(script, timeout=120)
    if state["torch_imports_dynamo"]:
        pytest.skip("this torch imports torch._dynamo itself")
    assert not state["dynamo"] and not state["queue"] and state["listed"]
    assert state["same"] and state["cached"] and state["dynamo_after"]
    assert state["missing"] == "module 'contrastbound' has no attribute 'NoSuchName'"


# Symbols that only libstdc++ itself defines (explicit instantiations and library objects that its headers declare
# extern): a module that defines one carries its own copy of the iostreams.
_LIBSTDCXX_OWN = ("std::ostream& std::ostream::_M_insert<long>(long)", "std::locale::classic()",
                  "std::ios_base::Init::Init()", "std::codecvt<char16_t, char, __mbstate_t>::do_unshift")


def test_the_module_carries_no_copy_of_libstdcxx():
    # On the H200 machine the compiler linked libstdc++ statically and Python's -Wl,-Bsymbolic-functions bound the
    # module to that copy, whose locale was never set up: every C++ error message formatting a number crashed the
    # process (a segmentation fault in std::ostream::_M_insert<long>, cuda-gdb, 2026-12-04). setup.py names torch's
    # libstdc++ on the link line (_libstdcxx_link_args); here, with -static-libstdc++ and without that, the module
    # defined 315 such symbols and the messages stopped at their first number.
    from contrastbound import _backend

    if not _backend.EXTENSION_LOADED:
        pytest.skip("compiled extension not loaded")
    nm = shutil.which("nm")
    if nm is None or not sys.platform.startswith("linux"):
        pytest.skip("needs nm (binutils) on Linux")
    lib = contrastbound._C.__file__
    out = subprocess.run([nm, "-C", "--defined-only", lib], capture_output=True, text=True, check=True).stdout
    found = [s for s in _LIBSTDCXX_OWN if s in out]
    assert not found, f"{lib} defines libstdc++'s own symbols {found}: rebuild (setup.py links torch's libstdc++)"
    # and a message with numbers in it keeps them
    a = torch.randn(3, 4)
    with pytest.raises(IndexError, match=r"\[0, M\) = \[0, 5\) or be -1 \(padding\), got values in \[7, 9\]"):
        torch.ops.contrastbound.info_nce_fwd(a, a, torch.randn(5, 4), torch.tensor([[7], [8], [9]]), 1.0, True, True,
                                             False)
