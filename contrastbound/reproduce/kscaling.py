"""Experiment 5: the fused InfoNCE against naive PyTorch at growing K (time and peak memory).

Each (method, K) point runs in its own Python subprocess, so that one measurement's allocations cannot hide
another's. Memory on the CPU is the peak resident set size during one forward + backward over the resident set
just before it, after the inputs exist and a small warm-up ran: the kernel's peak mark (VmHWM) is reset through
/proc/self/clear_refs, or, where that is not possible, the growth of ``resource.ru_maxrss`` is used (a lower
bound; the CSV's memory_method says which; tracemalloc does not see torch's allocator). On CUDA it is
``torch.cuda.max_memory_allocated`` over the same baseline.
Times are the median of repeated forward + backward passes, with a fixed torch thread count.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import numpy as np

from ..benchsuite.harness import worker_pythonpath
from ._common import Section, Settings, fmt, new_figure, progress, save_figure, write_csv


def _naive(a, p, bank, temperature):
    import torch
    import torch.nn.functional as F

    a, p, n = F.normalize(a, dim=1), F.normalize(p, dim=1), F.normalize(bank, dim=1)
    logits = torch.cat([(a * p).sum(1, keepdim=True), a @ n.t()], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(a.shape[0], dtype=torch.long, device=a.device))


def _worker(method: str, K: int, batch: int, dim: int, repeats: int, threads: int, device: str, seed: int) -> dict:
    import resource

    import torch

    from ..functional import info_nce

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    fn = (lambda a, p, n: info_nce(a, p, n, temperature=0.1)) if method == "fused" else \
        (lambda a, p, n: _naive(a, p, n, 0.1))
    a = torch.randn(batch, dim, device=dev, requires_grad=True)
    p = torch.randn(batch, dim, device=dev, requires_grad=True)
    bank = torch.randn(K, dim, device=dev)  # a detached queue, as in MoCo

    def step(n):
        if a.grad is not None:
            a.grad = None
            p.grad = None
        loss = fn(a, p, n)
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return loss.detach().item()

    step(bank[: min(K, 64)])  # warm-up: thread pools, allocator, kernels
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = step(bank)
        peak, how = torch.cuda.max_memory_allocated() - base, "cuda max_memory_allocated"
    elif _reset_peak_rss():
        base = _proc_status("VmRSS")
        loss = step(bank)
        peak, how = _proc_status("VmHWM") - base, "VmHWM after reset (clear_refs 5) - VmRSS"
    else:  # peak RSS cannot be reset: growth of the lifetime peak (a lower bound of the step's extra memory)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        loss = step(bank)
        peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, "ru_maxrss growth"
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(bank)
        times.append(time.perf_counter() - t0)
    return dict(method=method, K=K, loss=loss, time_s=float(np.median(times)), time_min_s=float(min(times)),
                peak_extra_mib=max(0, peak) / 2**20, logits_mib=batch * (K + 1) * 4 / 2**20, memory_method=how)


def _proc_status(key: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS: resident set now; VmHWM: its peak)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _proc_status("VmHWM") <= _proc_status("VmRSS") + (1 << 20)
    except OSError:
        return False
    except KeyError:
        return False


WORKER_TIMEOUT_S = 600  # seconds one (method, K) point may take


def measure(method: str, K: int, s: Settings, device: str, seed: int) -> dict:
    cmd = [sys.executable, "-m", "contrastbound.reproduce.kscaling", method, str(K), str(s.scaling_batch),
           str(s.scaling_dim), str(s.scaling_repeats), str(s.scaling_threads), device, str(seed)]
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = worker_pythonpath([pkg_root], env.get("PYTHONPATH"))
    env.setdefault("OMP_NUM_THREADS", str(s.scaling_threads))
    failed = dict(method=method, K=K, loss=math.nan, time_s=math.nan, time_min_s=math.nan, peak_extra_mib=math.nan,
                  logits_mib=s.scaling_batch * (K + 1) * 4 / 2**20)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # a hung worker fails its point, not the whole experiment
        return dict(failed, error=f"timed out after {WORKER_TIMEOUT_S:g} s")
    if proc.returncode != 0:
        return dict(failed, error=(proc.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


COLUMNS = ["method", "K", "batch", "dim", "threads", "device", "time_s", "time_min_s", "peak_extra_mib", "logits_mib",
           "loss", "memory_method", "error"]


_MEMORY_RESOLUTION_MIB = 1.0  # the least size of the logits at which the memory claim is judged


def run_k_scaling(s: Settings, out: str, seed: int, device, show_progress: bool = True) -> Section:
    dev = str(device)
    sec = Section("k-scaling", "k-scaling: why the fused kernels exist")
    sec.text(
        f"Forward + backward of InfoNCE with a shared bank of K negatives (batch {s.scaling_batch}, dim "
        f"{s.scaling_dim}, temperature 0.1, normalised features), fused `info_nce` against naive PyTorch "
        f"(materialised (B, K + 1) logits + `F.cross_entropy`), on {dev} with {s.scaling_threads} torch threads; "
        f"each point in its own subprocess; time = median of {s.scaling_repeats} runs; memory = growth of the peak "
        + ("resident set size during one forward + backward over the resident set just before it (after a "
           "warm-up; the kernel's peak mark is reset through /proc/self/clear_refs, or, where that is not possible, "
           "the growth of ru_maxrss, a lower bound: see the CSV's memory_method)."
           if dev == "cpu" else "allocated CUDA memory (max_memory_allocated) over a post-warm-up baseline.") +
        " Timings depend on the machine and its load (other work may share it); they are not deterministic."
    )
    rows = []
    bar = progress(2 * len(s.scaling_ks), "k-scaling", show_progress)
    try:
        for K in s.scaling_ks:
            for method in ("fused", "naive"):
                r = measure(method, K, s, dev, seed)
                r.update(batch=s.scaling_batch, dim=s.scaling_dim, threads=s.scaling_threads, device=dev)
                r.setdefault("error", "")
                rows.append(r)
                bar.update(1)
    finally:
        bar.close()
    path = os.path.join(out, "k_scaling.csv")
    write_csv(path, rows, COLUMNS)
    sec.csv(path)
    ks = list(s.scaling_ks)

    def get(m: str, key: str) -> np.ndarray:
        return np.array([next(r[key] for r in rows if r["method"] == m and r["K"] == k) for k in ks], float)

    fig, axes = new_figure(ncols=2, size=(5.0, 3.6))
    for m in ("fused", "naive"):
        axes[0, 0].plot(ks, 1e3 * get(m, "time_s"), "o-", label=m)
        axes[0, 1].plot(ks, get(m, "peak_extra_mib"), "o-", label=m)
    axes[0, 1].plot(ks, get("fused", "logits_mib"), "k:", label="size of the logits")
    for ax, yl in zip(axes[0], ("forward + backward (ms)", "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("K")
        ax.set_ylabel(yl)
        ax.legend()
    p = os.path.join(out, "k_scaling.png")
    save_figure(fig, p)
    tf, tn = get("fused", "time_s"), get("naive", "time_s")
    mf, mn = get("fused", "peak_extra_mib"), get("naive", "peak_extra_mib")
    sec.table(["K", "fused ms", "naive ms", "naive / fused time", "fused MiB", "naive MiB", "logits MiB"],
              [[k, 1e3 * tf[i], 1e3 * tn[i], tn[i] / tf[i], mf[i], mn[i], get("fused", "logits_mib")[i]]
               for i, k in enumerate(ks)])
    errors = [f"{r['method']} K = {r['K']}: {r['error']}" for r in rows if r.get("error")]
    if errors:
        sec.text("Failed points: " + "; ".join(errors))
    i = len(ks) - 1
    # A comparison whose measurement failed is undetermined, not "measured" (which the report keeps for numbers
    # that carry no verdict).
    undetermined = lambda ok: None if ok else "undetermined (a measurement failed)"  # noqa: E731
    logits_i = get("fused", "logits_mib")[i]
    measured = bool(np.isfinite(mf[i]) and np.isfinite(mn[i]))
    # Logits below 1 MiB are within the noise of a process's peak resident memory (the allocator's reuse of pages it
    # holds): on the tests' tiny grid (0.125 MiB) naive read 0.152 MiB and fused 0.156, and the claim read NOT
    # supported on that noise.
    verdict = undetermined(measured)
    if measured and logits_i < _MEMORY_RESOLUTION_MIB:
        verdict = f"undetermined (the logits, {fmt(logits_i, 3)} MiB, are below the {_MEMORY_RESOLUTION_MIB:g} MiB " \
                  "the memory measurement resolves)"
    sec.claim(
        f"The fused loss needs less extra memory than naive PyTorch at the largest K ({ks[i]}).",
        bool(mf[i] < mn[i]) if measured else None,
        f"fused {fmt(mf[i], 1)} MiB, naive {fmt(mn[i], 1)} MiB (the logits alone: {fmt(logits_i, 1)} MiB).",
        verdict=verdict,
    )
    # Time is measured, not judged: a wall-clock comparison depends on the machine and its load (on a busy 2-core
    # machine the tiny grid's naive / fused ratio swung from 0.3 to 2.7 between runs), and --strict must fail only
    # on what the data and the theory decide. The paper makes no claim about time.
    timed = np.isfinite(tf[i]) and np.isfinite(tn[i])  # (NaN: a failed point, neither faster nor slower)
    which = f"fused {'faster' if tf[i] <= tn[i] else 'slower'}" if timed else "not compared, a measurement failed"
    sec.claim(
        f"Time of the fused loss against naive PyTorch at the largest K ({ks[i]}), on this machine.",
        None,
        f"fused {fmt(1e3 * tf[i], 1)} ms, naive {fmt(1e3 * tn[i], 1)} ms (naive / fused = {fmt(tn[i] / tf[i], 2)}: "
        f"{which}); ratios over K: "
        + ", ".join(f"{k}: {fmt(tn[j] / tf[j], 2)}" for j, k in enumerate(ks)) + ".",
        verdict=undetermined(timed),
    )
    sec.figure(p, "k-scaling: forward + backward time (left) and peak extra memory (right) against K, log axes.")
    return sec


if __name__ == "__main__":
    m, K, b, d, rep, thr, dv, sd = sys.argv[1:9]
    print(json.dumps(_worker(m, int(K), int(b), int(d), int(rep), int(thr), dv, int(sd))))
