"""Measurement: inputs, one configuration's timing and peak memory, the fresh-process worker, and the sweep.

Timing: after ``warmup`` steps, each repeat times the forward (the call that returns the loss) and the backward
(``loss.backward()``) separately; forward+backward is their sum; the table reports medians. On CUDA every timer
read is preceded by a synchronise.

Peak memory on CPU: each configuration runs in a fresh process. The baseline is the resident memory once the
inputs exist, BLAS and the thread pool are initialised and the method was built (a peer's own queue is an input);
the peak (Linux VmHWM) is reset to it there (``_reset_rss_peak``; elsewhere ``ru_maxrss``, where a bank-sized
buffer allocated and freed before the baseline leaves room for the bank's gradient). The warm-up's peak over that
baseline is ``warmup_extra_mib`` (code pages, thread pools, autograd's and a compiler's first use); then the peak is
reset to what is resident after the warm-up (gradients and loss freed, garbage collected and the allocator's free
memory returned to the system, ``_trim_heap``: else a step reusing blocks the allocator kept resident would not
show them) and the extra, ``extra_mib``, is the peak
over the timed steps beyond it: a step's own memory, the inputs' gradients included (with ``--bank-grad`` the
(K, d) bank gradient). Where the peak cannot be reset (``ru_maxrss``) the extra covers the warm-up too, from the
first baseline, as every extra did before 2026-12-01. On CUDA it is ``torch.cuda.max_memory_allocated`` minus the
allocated memory, likewise.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .methods import CLIP_SETTING, METHODS, MODES, NTXENT_SETTING, PML_MEMORY_SETTING, Method

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 2.0**20


@dataclass(frozen=True)
class Config:
    """One point of the sweep. In mode "in-batch" the batch is N = K pairs and ``B`` is unused."""

    mode: str
    K: int
    B: int = 256
    d: int = 128
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 2
    reps: int = 3
    warmup: int = 1
    temperature: float = 0.1
    bank_grad: bool = False
    chunk: int = 8192
    time_bound: float = 120.0
    seed: int = 0

    @property
    def rows(self) -> int:
        """Rows of the logits: anchors, or the N = K pairs in-batch."""
        return self.K if self.mode == "in-batch" else self.B

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.dtype].itemsize


# ----------------------------------------------------------------------------------------------------------
# Inputs and the cost model.
# ----------------------------------------------------------------------------------------------------------


def make_inputs(cfg: Config) -> dict:
    """The tensors of ``cfg.mode`` (see contrastbound.benchsuite.methods), random normal, on ``cfg.device``."""
    g = torch.Generator().manual_seed(cfg.seed)
    dt, dev = _DTYPES[cfg.dtype], cfg.device

    def randn(*shape, grad):
        return torch.randn(*shape, generator=g).to(dev, dt).requires_grad_(grad)

    rows = cfg.rows
    x = {"anchors": randn(rows, cfg.d, grad=True), "positives": randn(rows, cfg.d, grad=True)}
    if cfg.mode == "shared":
        x["negatives"] = randn(cfg.K, cfg.d, grad=cfg.bank_grad)
    elif cfg.mode == "per-anchor":
        x["negatives"] = randn(cfg.B, cfg.K, cfg.d, grad=cfg.bank_grad)
    elif cfg.mode == "indexed":
        x["negatives"] = randn(cfg.K, cfg.d, grad=cfg.bank_grad)
        x["negative_indices"] = torch.randint(0, cfg.K, (cfg.B, cfg.K), generator=g).to(dev)
    elif cfg.mode == "bank-ce":
        x["negatives"] = randn(cfg.K, cfg.d, grad=True)  # classifier weights are trained
        x["targets"] = torch.randint(0, cfg.K, (cfg.B,), generator=g).to(dev)
        del x["positives"]
    elif cfg.mode != "in-batch":
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    return x


def input_bytes(cfg: Config) -> float:
    s = cfg.itemsize
    grad = 2 if cfg.bank_grad else 1
    n = 2 * cfg.rows * cfg.d * s * 2
    if cfg.mode in ("shared", "indexed"):
        n += cfg.K * cfg.d * s * grad + (cfg.B * cfg.K * 8 if cfg.mode == "indexed" else 0)
    elif cfg.mode == "per-anchor":
        n += cfg.B * cfg.K * cfg.d * s * grad
    elif cfg.mode == "bank-ce":
        n += cfg.K * cfg.d * s * 2
    return n


def model_flops(cfg: Config, setting: str | None) -> tuple[float, float]:
    """(forward, backward) FLOPs of the useful work: the logits GEMM and the gradients through it.

    Forward 2 R K d for R rows of logits over K columns; backward 2 R K d for the anchors' gradient plus as much
    again when the negatives need a gradient (in-batch, bank-ce, --bank-grad). Recomputation is not counted.
    """
    if cfg.mode == "in-batch":
        n = 2 * cfg.K if setting == NTXENT_SETTING else cfg.K
        return 2.0 * n * n * cfg.d, 4.0 * n * n * cfg.d
    rows = 2 * cfg.B if setting == PML_MEMORY_SETTING else cfg.B
    fwd = 2.0 * rows * cfg.K * cfg.d
    return fwd, fwd * (2 if (cfg.bank_grad or cfg.mode == "bank-ce") else 1)


def gemm_shape(cfg: Config) -> tuple[int, int, int]:
    """(rows, K, d): torch.mm of (rows, d) by (d, K), the logits GEMM of the configuration."""
    return cfg.rows, cfg.K, cfg.d


def static_extra_bytes(method: Method, cfg: Config) -> float:
    """Prior for the extra memory of ``method`` before any measurement (from its logits and bank factors)."""
    if method.extra_bytes is not None:
        return method.extra_bytes(cfg)
    setting = method.setting(cfg.mode)
    rows = cfg.rows * (2 if setting in (NTXENT_SETTING, PML_MEMORY_SETTING) else 1)
    cols = cfg.K * (2 if setting == NTXENT_SETTING else 1)
    logits = rows * cols * 4.0
    bank = {"per-anchor": cfg.B * cfg.K, "indexed": cfg.B * cfg.K}.get(cfg.mode, cfg.K) * cfg.d * cfg.itemsize
    if cfg.mode == "in-batch":
        bank = cfg.K * cfg.d * cfg.itemsize
    if setting == CLIP_SETTING:
        logits *= 2
    return method.logits_factor * logits + method.bank_copies * bank + 8 * MIB


# ----------------------------------------------------------------------------------------------------------
# One configuration, measured in this process.
# ----------------------------------------------------------------------------------------------------------


def _rss_peak_mib() -> float:
    """Peak resident memory of this process: VmHWM (resettable, see _reset_rss_peak), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _trim_heap() -> None:
    """Returns the allocator's free memory to the system (glibc's malloc_trim; nothing elsewhere). Freed blocks
    below glibc's mmap threshold, which rises to 32 MiB once a block that size is freed, stay resident: a later
    step reuses them without growing the resident memory, so a peak taken over such a baseline misses them
    (clip_loss at N = 2^13, d = 128: 4.4 MiB extra where its gradients alone take 8 MiB; 29.6 MiB trimmed)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> bool:
    """Resets the peak to the current resident memory (Linux: writing 5 to /proc/self/clear_refs), so that a
    transient peak before the baseline (imports, the inputs' construction) does not hide the measured one, after
    collecting garbage and returning the allocator's free memory to the system (_trim_heap), so that the
    baseline is what is alive. Whether it took: VmHWM is then at most VmRSS (a kernel may accept the write and
    keep the peak)."""
    gc.collect()
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        status = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    status[line.split(":")[0]] = int(line.split()[1])
        return status["VmHWM"] <= status["VmRSS"] + 1024
    except (OSError, KeyError, ValueError):
        return False



def timed_steps(step: Callable[[], torch.Tensor], clear: Callable[[], None], reps: int) -> dict:
    """The standalone benchmark scripts' CPU measurement of a training step: one warm-up step (its time and the
    peak resident memory it adds, one-off costs included), then, with clear() run before each step (gradients set
    to None) and the peak reset to the memory alive after the warm-up, reps timed steps: their median time and the
    peak over them beyond that baseline (``extra_mib``). Returns those and the last step's loss."""
    gc.collect()
    _reset_rss_peak()
    base = _rss_peak_mib()
    t0 = time.perf_counter()
    loss = step()  # warm-up (and compilation)
    warmup = time.perf_counter() - t0
    warmup_extra = _rss_peak_mib() - base
    del loss
    clear()
    gc.collect()
    if _reset_rss_peak():  # (else ru_maxrss: the peak covers the warm-up, from the first baseline)
        base = _rss_peak_mib()
    times = []
    for _ in range(reps):
        clear()
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {"time_s": statistics.median(times), "warmup_s": warmup, "extra_mib": _rss_peak_mib() - base,
            "warmup_extra_mib": warmup_extra, "loss": float(loss)}

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _zero_grads(x: dict) -> None:
    for t in x.values():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.grad = None


def _measure_gemm(cfg: Config, x: dict, clock: Callable[[], float]) -> dict:
    rows, K, d = gemm_shape(cfg)
    a = x["anchors"].detach()
    bank = x["negatives"].detach() if cfg.mode in ("shared", "indexed", "bank-ce") else None
    if bank is None or bank.dim() != 2:
        bank = x["positives"].detach() if cfg.mode == "in-batch" else torch.randn(K, d, dtype=a.dtype, device=a.device)
    # Column tiles of the (rows, K) product written into one reused buffer: on a CPU of at most 4 MiB, which stays
    # in cache, so the rate is the GEMM's compute rate (the whole product written to memory, as before 2026-12-01,
    # measured the rate of those writes, which the fused loss exceeded: 1.76x "of GEMM" at 2^20); on a GPU 256 MiB.
    tile = (256 if a.device.type == "cuda" else 4) * MIB
    cols = max(1, min(K, int(tile // (rows * a.element_size()))))
    out = torch.empty(rows, cols, dtype=a.dtype, device=a.device)

    def run():
        for s in range(0, K, cols):
            e = min(K, s + cols)
            torch.mm(a, bank[s:e].t(), out=out[:, : e - s])

    _sync(cfg.device)
    t0 = clock()
    run()  # the warm-up, counted in the time bound as measure()'s is
    _sync(cfg.device)
    warmup_s = clock() - t0
    times, start = [], clock()
    for i in range(max(cfg.reps, 1)):
        _sync(cfg.device)
        t0 = clock()
        run()
        _sync(cfg.device)
        times.append(clock() - t0)
        if clock() - start + warmup_s > cfg.time_bound:
            break
    t = max(statistics.median(times), 1e-12)
    return {"fwd_s": t, "fwdbwd_s": t, "reps": len(times), "gemm_gflops": 2.0 * rows * K * d / t / 1e9,
            "note": "" if cols == K else f"column tiles of {cols}"}


def measure(method: Method, cfg: Config, clock: Callable[[], float] = time.perf_counter,
            memory: bool = True) -> dict:
    """Times ``method`` on ``cfg`` in this process; with ``memory`` also its peak extra memory (meaningful only
    in a fresh process on CPU, see the module docstring)."""
    torch.manual_seed(cfg.seed)
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads)
    x = make_inputs(cfg)
    if method.kind == "gemm":
        return _measure_gemm(cfg, x, clock)
    cuda = cfg.device.startswith("cuda")
    # Where the peak cannot be reset (ru_maxrss), room for the bank's gradient before the baseline (an input-sized
    # buffer allocated and freed: a transient twice the inputs, which the memory planner does not count, so only
    # there); BLAS and the thread pool initialised before the baseline.
    if not cuda and not _reset_rss_peak():
        buf = torch.empty(int(input_bytes(cfg) // 8) or 1, dtype=torch.float64, device=cfg.device).fill_(1.0)
        del buf
    torch.mm(torch.randn(64, 64, device=cfg.device), torch.randn(64, 64, device=cfg.device)).sum().item()
    step = method.build(cfg, x)
    gc.collect()
    if cuda:
        torch.cuda.synchronize(cfg.device)
        torch.cuda.reset_peak_memory_stats(cfg.device)
        base = torch.cuda.memory_allocated(cfg.device) / MIB
    else:
        _reset_rss_peak()
        base = _rss_peak_mib()

    _sync(cfg.device)
    t0 = clock()
    for _ in range(max(cfg.warmup, 1)):
        _zero_grads(x)
        loss = step()
        loss.backward()
    _sync(cfg.device)
    warmup_s = clock() - t0
    # The peak is taken again after the warm-up, from what is resident then: the first step's one-off costs (code
    # pages, thread pools, autograd's and a compiler's first use: ~6-45 MiB on a CPU) are the warm-up's
    # (warmup_extra_mib), not every step's (they were counted in extra_mib before 2026-12-01)
    warm_peak = None
    _zero_grads(x)
    loss = None  # (the last warm-up step's graph and loss, freed before the measured steps)
    if memory:
        warm_peak = torch.cuda.max_memory_allocated(cfg.device) / MIB if cuda else _rss_peak_mib()
        gc.collect()
        if cuda:
            torch.cuda.synchronize(cfg.device)
            torch.cuda.reset_peak_memory_stats(cfg.device)
            steady = torch.cuda.memory_allocated(cfg.device) / MIB
        elif _reset_rss_peak():
            steady = _rss_peak_mib()
        else:  # the peak cannot be reset (ru_maxrss): it covers the warm-up, as before
            steady = base
    fwd, bwd, start = [], [], clock()
    for i in range(max(cfg.reps, 1)):
        if i:
            _zero_grads(x)
            loss = None  # (the previous step's, freed before this one)
        _sync(cfg.device)
        t0 = clock()
        loss = step()
        _sync(cfg.device)
        t1 = clock()
        loss.backward()
        _sync(cfg.device)
        t2 = clock()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        if clock() - start + warmup_s > cfg.time_bound:
            break
    row = {
        "fwd_s": statistics.median(fwd),
        "bwd_s": statistics.median(bwd),
        "fwdbwd_s": statistics.median(f + b for f, b in zip(fwd, bwd)),
        "warmup_s": warmup_s,
        "reps": len(fwd),
        "loss": float(loss.detach().float()),
    }
    if method.compiled:
        row["compile_s"] = max(0.0, warmup_s - max(cfg.warmup, 1) * row["fwdbwd_s"])
    if memory:
        peak = torch.cuda.max_memory_allocated(cfg.device) / MIB if cuda else _rss_peak_mib()
        row["extra_mib"] = peak - steady  # (beyond the inputs, the gradients included)
        row["warmup_extra_mib"] = warm_peak - base
    return row


# ----------------------------------------------------------------------------------------------------------
# The fresh-process worker.
# ----------------------------------------------------------------------------------------------------------


def resolve_method(ref: str, name: str) -> Method:
    """The method ``name`` from ``ref`` = "module:attr", attr a Method or a dict of them."""
    module, attr = ref.split(":")
    obj = getattr(importlib.import_module(module), attr)
    return obj[name] if isinstance(obj, dict) else obj


def _module_root(ref: str) -> str | None:
    """The sys.path entry from which the module of ``ref`` was imported here (for the worker's PYTHONPATH)."""
    module = sys.modules.get(ref.split(":")[0])
    path = getattr(module, "__file__", None)
    if not path:
        return None
    root = os.path.dirname(os.path.abspath(path))
    for _ in range(ref.split(":")[0].count(".")):
        root = os.path.dirname(root)
    return root


def worker_pythonpath(roots: list[str], pythonpath: str | None) -> str:
    """A worker's PYTHONPATH: ``roots`` (where this process imported the package from: a source checkout) ahead of
    the inherited ``pythonpath``, less the roots a fresh interpreter has on its path anyway (an installed package's
    site-packages: on PYTHONPATH it would come before the standard library, where a backport installed there, such
    as enum34's enum, would shadow the standard module)."""
    import site

    default = set()
    try:
        default.update(os.path.realpath(p) for p in site.getsitepackages())
    except AttributeError:  # (a virtualenv's old site module)
        pass
    if site.ENABLE_USER_SITE:
        default.add(os.path.realpath(site.getusersitepackages()))
    kept = [r for r in dict.fromkeys(roots) if os.path.realpath(r) not in default]
    return os.pathsep.join(kept + ([pythonpath] if pythonpath else []))


def worker_main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    cfg = Config(**spec["config"])
    method = resolve_method(spec["ref"], spec["method"])
    row = measure(method, cfg)
    print("BENCH-RESULT " + json.dumps(row), flush=True)
    return 0


def run_isolated(method: Method, cfg: Config, timeout: float | None = None) -> dict:
    """Measures in a fresh Python process; returns the row, or {"status": "failed", "reason": ...}."""
    spec = {"ref": method.ref or f"{__package__}.methods:METHODS", "method": method.name,
            "config": dataclasses.asdict(cfg)}
    env = dict(os.environ)
    roots = [r for r in (_module_root(spec["ref"]), _module_root(__name__ + ":x")) if r]
    env["PYTHONPATH"] = worker_pythonpath(roots, env.get("PYTHONPATH"))
    cmd = [sys.executable, "-m", f"{__package__}._worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "skipped", "reason": f"too slow: killed after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BENCH-RESULT "):
            return {"status": "ok", **json.loads(line[len("BENCH-RESULT "):])}
    if proc.returncode < 0:
        sig = -proc.returncode
        why = " (out of memory?)" if sig == 9 else ""
        return {"status": "failed", "reason": f"killed by signal {sig}{why}"}
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else f"exit status {proc.returncode}"
    if "memory" in last.lower() and ("alloc" in last.lower() or "out of" in last.lower()):
        last = "out of memory: " + last
    return {"status": "failed", "reason": last[:200]}


# ----------------------------------------------------------------------------------------------------------
# The sweep.
# ----------------------------------------------------------------------------------------------------------


def available_mib(device: str) -> float:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free / MIB
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("inf")


def probe(methods: Iterable[Method], modes: Iterable[str], device: str) -> dict[tuple[str, str], str]:
    """(method, mode) -> reason for the pairs that cannot run at all: unavailable, or failing on a tiny input.

    Runs here, not in a worker: builds each method on a tiny input and runs one step (compiled methods are only
    built, to not pay their compile time twice).
    """
    reasons = {}
    for m in methods:
        for mode in modes:
            if m.setting(mode) is None or m.kind == "gemm":
                continue
            why = m.unavailable(device)
            if why is None:
                cfg = Config(mode=mode, K=16, B=4, d=8, device=device, threads=torch.get_num_threads())
                try:
                    step = m.build(cfg, make_inputs(cfg))
                    if not m.compiled:
                        step().backward()
                except Exception as err:  # noqa: BLE001 - any failure is a reason to report
                    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
                    missing = getattr(err, "name", None) if isinstance(err, ImportError) else None
                    why = f"needs {missing}" if missing else f"fails on a tiny input: {type(err).__name__}: {msg}"[:160]
            if why:
                reasons[(m.name, mode)] = why
    return reasons


@dataclass
class _History:
    K: int
    fwdbwd_s: float
    extra_mib: float | None
    compile_s: float


def _growth(mode: str, k_new: int, k_old: int, power: float | None = None) -> float:
    return (k_new / k_old) ** (power if power is not None else (2 if mode == "in-batch" else 1))


def plan_row(method: Method, cfg: Config, last: _History | None, gemm_gflops: float | None,
             mem_fraction: float) -> str | None:
    """The reason ``method`` should not run on ``cfg`` (memory or time estimate), or None."""
    avail = available_mib(cfg.device)
    need_inputs = input_bytes(cfg) / MIB
    if last is not None and last.extra_mib is not None:
        extra = max(last.extra_mib, 1.0) * _growth(cfg.mode, cfg.K, last.K, method.growth.get(cfg.mode))
        basis = f"extrapolated from K={last.K}"
    else:
        extra = static_extra_bytes(method, cfg) / MIB
        basis = "estimated"
    if method.kind == "gemm":
        extra = 0.0
    if need_inputs + extra > mem_fraction * avail:
        return (f"out of memory by estimate: needs ~{(need_inputs + extra) / 1024:.1f} GiB ({basis}), "
                f"{avail / 1024:.1f} GiB available")
    setting = method.setting(cfg.mode)
    fwd, bwd = model_flops(cfg, setting)
    if last is not None:
        step_s = last.fwdbwd_s * _growth(cfg.mode, cfg.K, last.K)
    else:
        rate = (gemm_gflops or 10.0) * 1e9 * 0.25
        step_s = (fwd if method.kind == "gemm" else fwd + bwd) / rate
    if (max(cfg.warmup, 1) + 1) * step_s > cfg.time_bound:
        return f"too slow for the time bound: one step ~{step_s:.0f} s, bound {cfg.time_bound:.0f} s per configuration"
    return None


def run_sweep(
    methods: list[Method],
    configs: list[Config],
    isolate: bool = True,
    mem_fraction: float = 0.7,
    on_row: Callable[[dict], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    probe_reasons: dict[tuple[str, str], str] | None = None,
) -> list[dict]:
    """Runs every applicable (config, method) pair in order (configs sorted by K within a group) and returns the
    rows. A pair that cannot run gets ``status`` "skipped" or "failed" and a ``reason``; a method that failed or
    was too slow at some K is skipped at larger K of the same group with that reason."""
    probe_reasons = probe_reasons or {}
    rows: list[dict] = []
    history: dict[tuple, _History] = {}
    blocked: dict[tuple, str] = {}
    gemm_rate: dict[tuple, float] = {}
    order = sorted(configs, key=lambda c: (c.device, c.mode, c.dtype, c.B, c.d, c.K))
    methods = sorted(methods, key=lambda m: m.kind != "gemm")  # the GEMM rate first, for the estimates
    for cfg in order:
        group = (cfg.device, cfg.mode, cfg.dtype, cfg.B, cfg.d)
        for m in methods:
            setting = m.setting(cfg.mode)
            if setting is None:
                continue
            key = group + (m.name,)
            row = {"mode": cfg.mode, "setting": setting, "method": m.name, "kind": m.kind, "K": cfg.K,
                   "B": cfg.rows if cfg.mode == "in-batch" else cfg.B, "d": cfg.d, "dtype": cfg.dtype,
                   "device": cfg.device, "threads": cfg.threads,
                   "bank_grad": cfg.bank_grad or cfg.mode == "bank-ce"}  # (bank-ce's classifier rows are trained)
            reason = m.unavailable(cfg.device) or probe_reasons.get((m.name, cfg.mode)) or blocked.get(key)
            if reason is None and isolate:
                rate = gemm_rate.get(group)
                reason = plan_row(m, cfg, history.get(key), rate[1] if rate else None, mem_fraction)
            if reason is not None:
                row.update(status="skipped", reason=reason)
            else:
                if isolate:
                    result = run_isolated(m, cfg, timeout=2 * cfg.time_bound + 120)
                else:
                    try:
                        result = {"status": "ok", **measure(m, cfg, clock=clock, memory=False)}
                    except Exception as err:  # noqa: BLE001 - reported with its reason
                        result = {"status": "failed", "reason": f"{type(err).__name__}: {err}"[:200]}
                row.update(result)
                if row["status"] == "ok":
                    fwd, bwd = model_flops(cfg, setting)
                    if m.kind == "gemm":
                        gemm_rate[group] = (cfg.K, row["gemm_gflops"])
                        row["flops"] = 2.0 * cfg.rows * cfg.K * cfg.d
                    else:
                        row["flops"] = fwd + bwd
                        row["eff_gflops"] = (fwd + bwd) / max(row["fwdbwd_s"], 1e-12) / 1e9
                        row["fwd_gflops"] = fwd / max(row["fwd_s"], 1e-12) / 1e9
                        rate = gemm_rate.get(group)
                        if rate and rate[0] == cfg.K:  # the GEMM of this very shape, measured just before
                            row["gemm_gflops"] = rate[1]
                            row["frac_gemm"] = row["eff_gflops"] / rate[1]
                    history[key] = _History(cfg.K, row["fwdbwd_s"], row.get("extra_mib"), row.get("compile_s", 0.0))
                else:
                    blocked[key] = f"skipped: {row['reason'][:120]} at K={cfg.K}"
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def count_pairs(methods: list[Method], configs: list[Config]) -> int:
    return sum(1 for c in configs for m in methods if m.setting(c.mode) is not None)


def fit_slope(ks: list[int], times: list[float]) -> float | None:
    """Least-squares slope of log(time) against log(K); None with fewer than two points."""
    pts = [(math.log(k), math.log(t)) for k, t in zip(ks, times) if t and t > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else None


METHOD_NAMES = list(METHODS)
