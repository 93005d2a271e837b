"""Shared test configuration: devices, dtypes and per-dtype tolerances stated once."""

from __future__ import annotations

import importlib.util
import os
import textwrap

import pytest
import torch

torch.set_float32_matmul_precision("highest")

try:  # hypothesis: where CI is set, hypothesis loads its own "ci" profile (derandomized: the same examples each
    # run; the replay blob printed). Elsewhere the examples are drawn afresh and a failure prints the blob that
    # replays it (@reproduce_failure), unless --hypothesis-profile chose a profile
    from hypothesis import settings as _hypothesis_settings

    if not os.environ.get("CI") and getattr(_hypothesis_settings, "_current_profile", "default") == "default":
        _hypothesis_settings.register_profile("contrastbound", print_blob=True)
        _hypothesis_settings.load_profile("contrastbound")
except ImportError:
    pass

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# Largest allowed error, relative to the largest magnitude of the float64 reference (loss or gradient).
# Half inputs are computed with float32 accumulation; their tolerance is the rounding of the half output.
# float32 on the CPU: 1e-5, 4x the worst a test audit measured there (2.5e-6; 1e-4 before 2026-12-02 let a 40x
# larger error pass). CUDA keeps 1e-4 for float32 (CUDA_TOL): set on hardware, its tiles accumulate the logits in
# float32 where the CPU kernel keeps lse in float64, and tightening it could not be checked on a GPU since.
TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
CUDA_TOL = {**TOL, torch.float32: 1e-4}


def tol(dtype: torch.dtype, device) -> float:
    """TOL[dtype] for results computed on device (a torch.device or its name), CUDA_TOL's on a GPU."""
    return (CUDA_TOL if torch.device(device).type == "cuda" else TOL)[dtype]

MODES = ["shared", "per_anchor", "indexed", "in_batch"]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# The folder holding the contrastbound package these tests import (the checkout, or site-packages when an installed
# copy is tested from the checkout). A test's child Python gets it first on its path and as its working folder
# (`python -c` puts the working folder before PYTHONPATH), so that it imports the same package.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(importlib.util.find_spec("contrastbound").origin)))


# The peak resident memory of a test's child process, and its reset (Linux: VmHWM, /proc/self/clear_refs), for the
# memory tests' scripts: prepended to them. Blocks of 64 KiB and more come straight from mmap and go back to the
# system when freed (M_MMAP_THRESHOLD = -3 fixed: glibc otherwise raises it as blocks are freed), so the resident size
# follows the live tensors, not the heap's high water: without it one script's peak went from 43 to 51 MiB from run
# to run (supcon_loss, N = 2^14: a CI run failed its bound at 51.4, 2026-12-08; 38.0 +- 0.1 in 6 runs with it) and
# another's from 20 to 72 MiB.
PEAK_RSS_HELPERS = textwrap.dedent(
    """
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)


    def hwm_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024.0


    def reset_hwm():
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current resident size
    """
)


def package_env(**extra: str) -> dict[str, str]:
    """os.environ (and extra) with PACKAGE_ROOT first on PYTHONPATH: for a child process run with cwd=PACKAGE_ROOT."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def child_json(script: str, timeout: float = 600) -> dict:
    """Runs `script` in a child Python (package_env, cwd PACKAGE_ROOT) and returns the JSON object its last line
    of output prints; a child that fails fails the test with its standard error."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                         env=package_env(), cwd=PACKAGE_ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def pytest_collection_modifyitems(config, items):
    # A test parametrized with device="cuda" (DEVICES) is a CUDA test too: `-m cuda` (scripts/gpu_check.sh) selects it.
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cuda":
            item.add_marker(pytest.mark.cuda)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def as_float(x) -> float:
    """A number or a one-element tensor as a float, detached (float() of a tensor that needs grad warns)."""
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "", floor: float | None = None
) -> None:
    """max |actual - expected| <= tol * max(floor, max |expected|), computed in float64.

    floor = 0 (the default for CPU results) is relative to the largest magnitude (an all-zero result fails). A
    result at the rounding level of larger terms that cancelled (a loss near 0 at temperature 0.01, whose logits
    are ~100) passes the magnitude of those terms as floor, e.g. 1 / temperature. CUDA results default to floor = 1
    (absolute below magnitude 1): their tensor-core tolerances were set that way on hardware, and test_cuda.py
    adds norm-relative checks."""
    if floor is None:
        floor = 1.0 if actual.is_cuda else 0.0
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    scale = max(floor, e.abs().max().item(), 1e-300) if e.numel() else 1.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def make_inputs(
    mode: str,
    B: int,
    K: int,
    d: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    M: int | None = None,
    seed: int = 0,
    requires_grad: bool = True,
):
    """(anchors, positives, negatives, negative_indices) for one mode, leaves that require grad.

    Positives are correlated with their anchors so that the positive logit matters.
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, d, generator=g, dtype=torch.float64)
    p = a + 0.5 * torch.randn(B, d, generator=g, dtype=torch.float64)
    idx = None
    if mode == "shared":
        n = torch.randn(K, d, generator=g, dtype=torch.float64)
    elif mode == "per_anchor":
        n = torch.randn(B, K, d, generator=g, dtype=torch.float64)
    elif mode == "indexed":
        M = M if M is not None else max(1, K // 3 + 2)
        n = torch.randn(M, d, generator=g, dtype=torch.float64)
        idx = torch.randint(0, M, (B, K), generator=g).to(device)
    elif mode == "in_batch":
        n = None
    else:
        raise ValueError(mode)

    def leaf(x):
        if x is None:
            return None
        return x.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return leaf(a), leaf(p), leaf(n), idx


def near_duplicate_pairs(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random float32 problem at large logits (normalize=False): N in [2, 60) pairs of d in [2, 40) features of
    norm ~30, each second item near its first (noise 0.3), and item 1's second a near duplicate of item 0's (noise
    1e-4 ... 1e-1). Rounded to float32 from float64 draws, in a fixed order of g's calls."""
    N, d = int(torch.randint(2, 60, (), generator=g)), int(torch.randint(2, 40, (), generator=g))
    first = torch.randn(N, d, dtype=torch.float64, generator=g) * 10
    second = first + 0.3 * torch.randn(N, d, dtype=torch.float64, generator=g)
    second[1 % N] = second[0] + 10 ** float(torch.empty(()).uniform_(-4, -1, generator=g)) * torch.randn(
        d, dtype=torch.float64, generator=g)
    return first.float(), second.float()


def loss_and_grads(fn, a, p, n, idx, **kw):
    """Loss and the gradients of (a, p, n) for a fixed random upstream gradient (so reduction='none' is covered)."""
    loss = fn(a, p, n, negative_indices=idx, **kw)
    g = torch.Generator().manual_seed(1)
    upstream = torch.rand(loss.shape, generator=g, dtype=torch.float64).to(loss.device, loss.dtype) + 0.5
    leaves = [x for x in (a, p, n) if x is not None]
    grads = torch.autograd.grad(loss, leaves, upstream)
    return loss, grads


class FakeClock:
    """A clock the benchmark harness's tests advance by hand (harness.time.perf_counter replaced by it)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def load_module(path, name: str | None = None):
    """A Python file that is not part of the package (an example, a benchmark, a script) imported as a module."""
    path = os.fspath(path)
    spec = importlib.util.spec_from_file_location(name or os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
