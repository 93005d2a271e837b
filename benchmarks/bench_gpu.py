"""GPU benchmark of the fused InfoNCE kernel: bf16, d = 256, B = 8192, K = 2^14 ... 2^22.

For each K (the smallest, 2^18, the largest, 2^16 and 2^20 first, then the rest), two problems: a shared bank (K, d) and in-batch (B = K, negatives = the positives). Measured with
CUDA events (median of a few runs): forward, forward+backward and their difference (backward); peak extra
memory from torch.cuda.max_memory_allocated beyond what the inputs already use; the bf16 torch.matmul rate of
the same (B, d) x (d, K) GEMM in the same run (K capped at 2^17 columns, where the rate has saturated, so the
output fits); naive PyTorch (materialised logits, F.cross_entropy) where its logits fit; and, where they
import, Inf-CL (inf_cl; on the shared problem with keys = [positives; bank]) and Cut Cross-Entropy
(cut_cross_entropy, with the bank as the classifier: the same GEMMs, not the same loss when the positive is not a
bank row).

Effective rate = 6 B K d flop / (forward+backward time) (the bank needs a gradient here). eval_fwd_ms: the
forward under torch.no_grad (evaluation: no anchors' term is formed; by default the lse pass), for the fused loss
and naive PyTorch; eval_fwd_ms_wg_lse: the fused one with CONTRASTBOUND_TC_WG_LSE=1 (the wgmma kernels' lse-only
walk, opt-in until its tests have run on a GPU), compute capability 9.0 only. Inf-CL's rate on the
shared problem counts its keys, B + K rows. peak_extra_gib includes the inputs' gradients (grads_gib, e.g. 2 GiB
for the bank's at K = 2^22); `loss` is each implementation's value, and where one computes the fused loss's very
problem (naive always; Inf-CL and Cut Cross-Entropy in-batch) a relative difference above 2e-2 is noted as
"LOSS MISMATCH". Per (K, problem) the order is: fused, naive, peers, then the other kernel variants, each of
which is first checked against the fused result and whose failure is noted in its row only.

With --kernels LOG2K, after the shared problem's rows at K = 2^LOG2K, one forward + backward of it runs under
torch.profiler for the default kernels and each opt-in variant that passed its checks (--one-pass), and every GPU
kernel's time, its share of the step and, for the tensor-core kernels, the rate their modelled work implies
(KERNEL_FLOP) go to <csv>_kernels.csv: which kernel holds the step back.

    python benchmarks/bench_gpu.py [--quick] [--csv out.csv] [--budget SECONDS] [--kernels 18]

Without a GPU it prints "no GPU" and exits with status 0 (so it can be smoke-tested anywhere).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FIELDS = [
    "problem", "impl", "B", "K", "d", "dtype", "fwd_ms", "bwd_ms", "fwdbwd_ms", "tflops", "matmul_tflops",
    "pct_of_matmul", "speedup_vs_naive", "peak_extra_gib", "grads_gib", "loss", "eval_fwd_ms", "eval_fwd_ms_wg_lse",
    "note",
]


def _timed(fn, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` runs after one warm-up, timed with CUDA events; one timed run
    only where that run took over half a second (the largest K: the budget goes further). (The warm-up's own time
    decided this before, and it includes a peer's Triton compilation, which made any K a single sample.)"""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if times[0] > 500.0:
            break
    return statistics.median(times)


def _eval_forward(loss_fn, repeats: int) -> tuple[float, float]:
    """Median ms of loss_fn() under torch.no_grad (an evaluation forward) and the loss's value."""
    last = []

    def fwd():
        with torch.no_grad():
            last[:] = [loss_fn()]

    ms = _timed(fwd, repeats)
    value = last[0].float().item()
    last.clear()
    return ms, value


def _peak_extra_gib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _matmul_tflops(B: int, K: int, d: int, dtype, repeats: int) -> float:
    cols = min(K, 2**17)
    a = torch.randn(B, d, device="cuda", dtype=dtype)
    b = torch.randn(cols, d, device="cuda", dtype=dtype)
    ms = _timed(lambda: torch.matmul(a, b.t()), repeats)
    return 2 * B * cols * d / (ms * 1e-3) / 1e12


def _naive(a, p, n, temperature, mask=None):
    """What a user writes: bf16 normalisation and logits (tensor-core matmul), cross-entropy over float32 logits
    (with a negative mask: the left-out bank columns set to -inf)."""
    an, pn = F.normalize(a, dim=-1), F.normalize(p, dim=-1)
    if n is None:
        logits = an @ pn.t()
        target = torch.arange(a.shape[0], device=a.device)
    else:
        bank = an @ F.normalize(n, dim=-1).t()
        if mask is not None:
            bank = bank.masked_fill(~mask, float("-inf"))
        logits = torch.cat([(an * pn).sum(-1, keepdim=True), bank], dim=1)
        target = torch.zeros(a.shape[0], dtype=torch.long, device=a.device)
    return F.cross_entropy(logits.float() / temperature, target)


# shared_mask / shared_labels: anchors and bank rows in 100 classes, each anchor's own class left out
MASK_CLASSES = 100
PROBLEMS = ("shared", "in_batch", "shared_mask", "shared_labels")  # --problems, in the order they are timed


def _peers():
    out = {}
    try:
        from inf_cl import cal_inf_loss  # type: ignore

        out["inf_cl"] = cal_inf_loss
    except Exception as exc:  # noqa: BLE001 - optional peer
        out["inf_cl_error"] = f"{type(exc).__name__}: {exc}"
    try:
        from cut_cross_entropy import linear_cross_entropy  # type: ignore

        out["cce"] = linear_cross_entropy
    except Exception as exc:  # noqa: BLE001 - optional peer
        out["cce_error"] = f"{type(exc).__name__}: {exc}"
    return out


def _measure(loss_fn, leaves, repeats, flop):
    """fwd, bwd, fwd+bwd ms, effective TFLOP/s, peak extra memory (gradients included) and the loss's value of one
    implementation."""
    last = []

    def fwd_train():  # forward as in training (inputs require grad, so it saves what backward needs)
        loss = loss_fn()
        last[:] = [loss.detach()]  # the value only: the graph goes before the next call
        return loss

    def both():
        for x in leaves:
            x.grad = None
        loss_fn().backward()

    try:
        fwd_ms = _timed(fwd_train, repeats)
        value = last[0].detach().float().item()
        last.clear()
        both_ms = _timed(both, repeats)
        for x in leaves:
            x.grad = None
        peak = _peak_extra_gib(both)
    finally:  # also after an error (e.g. out of memory half-way through backward): no stale partial gradients
        last.clear()
        for x in leaves:
            x.grad = None
    return fwd_ms, both_ms - fwd_ms, both_ms, flop / (both_ms * 1e-3) / 1e12, peak, value


# Work of one call of each kernel on the shared problem of a training step, in units of B K d flop (the model
# behind the per-kernel rates of --kernels): the log-sum-exp pass forms the scores (2), the rows passes (anchor
# term, bank gradients), the one-pass forwards (the SIMT forward_shared_kernel forms the anchors' term in the same
# walk when the anchors need a gradient) and the flash / wgmma kernels form the scores and the product with the
# coefficients (4). For d <= 256 only: wider rows passes recompute the scores per 256-feature slice. Kernels not
# named here (normalisation, merges, finishing) are O((B + K) d): no rate.
KERNEL_FLOP = {"tc_lse_kernel": 2, "mma_lse_kernel": 2, "forward_shared_kernel": 4, "tc_rows_kernel": 4,
               "mma_rows_kernel": 4, "mma_fwd_kernel": 4, "flash_kernel": 4, "wgmma_kernel": 4}
KERNEL_FIELDS = ["impl", "B", "K", "d", "kernel", "calls", "ms", "pct_of_step", "model_tflops", "pct_of_matmul",
                 "matmul_tflops"]


def _kernel_name(name: str) -> str:
    """A profiler event's kernel name shortened to the function and its template arguments: scripts/ptxas_report.py's
    short(), loaded by path (an installed package named "scripts" could shadow the folder)."""
    global _short
    if _short is None:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "ptxas_report.py")
        spec = importlib.util.spec_from_file_location("contrastbound_ptxas_report", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _short = mod.short
    return _short(name)


_short = None


@contextlib.contextmanager
def _env(env: dict):
    """The kernels' environment switches set for the block, restored after (also after an error)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def _kernel_rows(events, impl: str, B: int, K: int, d: int, matmul_tflops: float) -> list[dict]:
    """Per-kernel rows from (name, calls, device microseconds) triples of one profiled step: time, share of the
    step, and for the kernels of KERNEL_FLOP the rate that their modelled work implies, against the matmul rate."""
    total = sum(us for _, _, us in events) or 1.0
    rows = []
    for name, calls, us in sorted(events, key=lambda e: -e[2]):
        short = _kernel_name(name)
        units = KERNEL_FLOP.get(short.split("<", 1)[0])
        rate = units * B * K * d * calls / (us * 1e-6) / 1e12 if units and us > 0 else None
        rows.append(dict(impl=impl, B=B, K=K, d=d, kernel=short, calls=calls, ms=us / 1e3,
                         pct_of_step=100 * us / total, model_tflops=rate,
                         pct_of_matmul=None if rate is None else 100 * rate / matmul_tflops,
                         matmul_tflops=matmul_tflops))
    return rows


def _profile_step(step, impl, B, K, d, matmul_tflops, out) -> None:
    """step() once after a warm-up, under torch.profiler: its GPU kernels' rows (_kernel_rows) appended to out."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    # CPU activity too (torch's fallback profiler refuses CUDA alone); its events are filtered out below.
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = []
    for ev in prof.key_averages():
        # Device time under the names torch has used (device_time_total since 2.4; cuda_time_total before).
        us = max(float(getattr(ev, a, 0.0) or 0.0) for a in ("device_time_total", "cuda_time_total"))
        # GPU kernels only: not host-side events (aten ops, runtime calls such as cudaLaunchKernel, whose device
        # time would count their kernels twice), copies or memsets.
        host = getattr(ev, "device_type", None) == torch.autograd.DeviceType.CPU
        if us > 0 and ev.key and not host and not ev.key.startswith(("Memcpy", "Memset", "cuda")):
            events.append((ev.key, ev.count, us))
    out += _kernel_rows(events, impl, B, K, d, matmul_tflops) or [
        dict(impl=impl, B=B, K=K, d=d, kernel="(no kernels seen)")]


def _profile_kernels(step, variants, B, K, d, matmul_tflops, path, append=False):
    """Runs step() (forward and backward) once per variant (name, environment switches) under torch.profiler
    after a warm-up, and writes the GPU kernels' times (_kernel_rows) to path as CSV (appended to it, without a
    second header, with append); prints the table."""
    out = []
    for impl, env in variants:
        try:
            with _env(env):
                _profile_step(step, impl, B, K, d, matmul_tflops, out)
        except Exception as exc:  # noqa: BLE001 - one variant's failure must not cost the others
            out.append(dict(impl=impl, B=B, K=K, d=d, kernel=f"failed: {type(exc).__name__}: {exc}"[:200]))
    fresh = not (append and os.path.exists(path) and os.path.getsize(path) > 0)
    with open(path, "w" if fresh else "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=KERNEL_FIELDS)
        if fresh:
            w.writeheader()
        for r in out:
            w.writerow({k: r.get(k, "") for k in KERNEL_FIELDS})
    print(f"\nper-kernel device time, one forward + backward, shared bank B = {B}, K = {K}, d = {d} "
          f"(model rate: KERNEL_FLOP x B K d per call / time)")
    for r in out:
        rate = r.get("model_tflops")
        print(f"  {r['impl']:<14} {r['kernel'][:60]:<60} {r.get('calls', '')!s:>5} {r.get('ms', 0) or 0:9.3f} ms "
              f"{r.get('pct_of_step', 0) or 0:5.1f} %"
              + ("" if rate is None else f"  {rate:7.1f} TFLOP/s = {r['pct_of_matmul']:5.1f} % of matmul"))
    print(f"wrote {path}")
    return out


OPT_IN_FAMILIES = ("1pass", "flash", "wgmma")


# The wgmma kernels are the default where they run (compute capability 9.0, a 9.0a build): every variant that
# names other kernels turns them off, or it would time them again.
NO_WGMMA = {"CONTRASTBOUND_TC_WGMMA": "0"}


def _opt_in_variants(families=OPT_IN_FAMILIES) -> list[tuple[str, dict]]:
    """The opt-in kernels (name, environment switches) of the given families: one-pass forward, flash layout, and
    on compute capability 9.0 their warpgroup-MMA versions (the default there: asked for explicitly, =1)."""
    out = [("fused_1pass", {"CONTRASTBOUND_TC_FUSED_FWD": "1", **NO_WGMMA}),
           ("fused_flash", {"CONTRASTBOUND_TC_FLASH": "1", **NO_WGMMA})]
    if torch.cuda.get_device_capability() == (9, 0):
        out.append(("fused_wgmma", {"CONTRASTBOUND_TC_WGMMA": "1"}))
    return [v for v in out if v[0][len("fused_"):] in families]


def _row(base, impl, r, mm, grads_gib, note="", ref_loss=None):
    """A result row from _measure's tuple; the loss is compared with the fused one where ref_loss is given."""
    if ref_loss is not None and not abs(r[5] - ref_loss) <= 2e-2 * max(abs(ref_loss), 1e-6):
        note = f"LOSS MISMATCH: {r[5]:.6g} vs fused {ref_loss:.6g}; {note}".rstrip("; ")
    return dict(base, impl=impl, fwd_ms=r[0], bwd_ms=r[1], fwdbwd_ms=r[2], tflops=r[3], matmul_tflops=mm,
                pct_of_matmul=100 * r[3] / mm, peak_extra_gib=r[4], grads_gib=grads_gib, loss=r[5], note=note)


class _RowSink(list):
    """The result rows; each is appended to the CSV (header first) and flushed at once, so that a crash, a sticky
    CUDA error or the caller's timeout loses nothing measured before it."""

    def __init__(self, path: str, append: bool = False) -> None:
        super().__init__()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fresh = not (append and os.path.exists(path) and os.path.getsize(path) > 0)
        self._file = open(path, "w" if fresh else "a", newline="")  # noqa: SIM115 - open for the whole run
        self._writer = csv.DictWriter(self._file, fieldnames=FIELDS)
        if fresh:
            self._writer.writeheader()
        self._file.flush()

    def append(self, row: dict) -> None:
        super().append(row)
        self._writer.writerow({k: row.get(k, "") for k in FIELDS})
        self._file.flush()
        print("row:", {k: v for k, v in row.items() if v not in ("", None)}, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="K = 2^14, 2^16, 2^18 only and fewer repeats")
    ap.add_argument("--B", type=int, default=8192)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--kmin", type=int, default=14, help="log2 of the smallest K")
    ap.add_argument("--kmax", type=int, default=22, help="log2 of the largest K")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.07)
    ap.add_argument("--budget", type=float, default=300.0, help="seconds; later configurations are skipped")
    ap.add_argument("--csv", default="bench_gpu.csv")
    ap.add_argument("--problems", default="shared,in_batch",
                    help="comma-separated: shared, in_batch, shared_mask (a shared bank with a (B, K) negative_mask "
                         f"leaving out each anchor's own class of {MASK_CLASSES}; K <= 2^18), shared_labels (the "
                         "same classes as labels= and negative_labels=: O(B + K); naive masks its logits)")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--one-pass", action="store_true",
                    help="also time the opt-in kernels: the one-pass forward (CONTRASTBOUND_TC_FUSED_FWD=1), the "
                         "flash-layout kernels (CONTRASTBOUND_TC_FLASH=1) and, on compute capability 9.0, their "
                         "warpgroup-MMA versions (CONTRASTBOUND_TC_WGMMA=1)")
    ap.add_argument("--kernels", type=int, default=None, metavar="LOG2K",
                    help="after the shared problem's timed rows at K = 2^LOG2K, one forward + backward of it under "
                         "torch.profiler for the default kernels and (with --one-pass) each opt-in variant that "
                         "passed its checks: every GPU kernel's time and, for the tensor-core ones, the rate their "
                         "work implies (KERNEL_FLOP), to the CSV named like --csv with _kernels before .csv")
    ap.add_argument("--opt-in-only", action="store_true",
                    help="only the default fused kernels (the reference) and the opt-in variants of --one-pass: no "
                         "naive, peers or other variants (scripts/gpu_check.sh runs them in a process of their own, "
                         "so that a kernel that poisons the CUDA context cannot cost the main table)")
    ap.add_argument("--variants", default=",".join(OPT_IN_FAMILIES),
                    help="comma-separated opt-in families that --one-pass times: any of " + ", ".join(OPT_IN_FAMILIES)
                         + " (default all; scripts/gpu_check.sh runs one family per process, so that one that "
                           "poisons the CUDA context cannot cost the others)")
    ap.add_argument("--append", action="store_true",
                    help="append the rows to --csv (and the profile to its _kernels.csv) instead of rewriting them")
    args = ap.parse_args(argv)
    families = tuple(x for x in args.variants.split(",") if x)
    bad = [x for x in families if x not in OPT_IN_FAMILIES]
    if bad:
        ap.error(f"--variants: unknown {', '.join(bad)}; choose from {', '.join(OPT_IN_FAMILIES)}")
    bad = [x for x in args.problems.split(",") if x not in PROBLEMS]
    if bad:
        ap.error(f"--problems: unknown {', '.join(bad)}; choose from {', '.join(PROBLEMS)}")
    if args.opt_in_only:
        args.one_pass = args.no_naive = args.no_peers = True
    if args.kmin > args.kmax:
        ap.error(f"--kmin ({args.kmin}) must be at most --kmax ({args.kmax})")

    if not torch.cuda.is_available():
        print("bench_gpu: no GPU (torch.cuda.is_available() is False): nothing measured.")
        return 0

    import contrastbound as cb
    from contrastbound import _backend

    info = _backend.backend_info()
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name()}, contrastbound CUDA backend: "
          f"{info['cuda']} ({info['cuda_reason']})")
    if info["cuda"] != "kernel":
        # The fallback materialises the logits: at these sizes it measures nothing of interest and runs out of memory.
        print("bench_gpu: the fused CUDA kernel is not built (contrastbound.backend_info()); nothing measured")
        return 1

    dtype = torch.bfloat16
    B, d, t = args.B, args.d, args.temperature
    ks = [14, 16, 18] if args.quick else list(range(args.kmin, args.kmax + 1))
    repeats = 2 if args.quick else args.repeats
    peers = {} if args.no_peers else _peers()
    for key in ("inf_cl_error", "cce_error"):
        if key in peers:
            print(f"peer not available: {key[:-6]}: {peers[key]}")

    rows = _RowSink(args.csv, args.append)  # every row is written (and flushed) as soon as it is measured
    started = time.time()
    eval_failed = False  # (an error of the forward without gradients: not tried again)
    total_mem = torch.cuda.get_device_properties(0).total_memory
    # The issue's figures first where the budget is short: the smallest K, 2^18 (the speed target's start), the
    # largest (the memory target's), then 2^16, 2^20 and the rest; the table below is printed in K order.
    order = [k for k in dict.fromkeys([ks[0], 18, ks[-1], 16, 20]) if k in ks]
    order += [k for k in ks if k not in order]
    for logk in order:
        K = 2**logk
        for problem in [x for x in PROBLEMS if x in args.problems.split(",")]:
            if problem == "in_batch" and K > 2**17:
                continue  # B = K anchors: 2^17 x 256 bf16 in-batch is already far past the usual batch
            if problem == "shared_mask" and (K > 2**18 or args.opt_in_only):
                continue  # the (B, K) mask is B K bytes (2 GiB at 2^18), and naive's masked logits more
            if problem == "shared_labels" and args.opt_in_only:
                continue  # the opt-in kernels do not serve labels
            b = K if problem == "in_batch" else B
            base = dict(problem=problem, B=b, K=K, d=d, dtype="bf16")
            if time.time() - started > args.budget:
                rows.append(dict(base, impl="fused", note="skipped: time budget"))
                continue
            try:
                torch.manual_seed(logk)
                a = torch.randn(b, d, device="cuda", dtype=dtype, requires_grad=True)
                p = torch.randn(b, d, device="cuda", dtype=dtype, requires_grad=True)
                n = None if problem == "in_batch" else torch.randn(K, d, device="cuda", dtype=dtype, requires_grad=True)
                mask = classes = None
                extra = {}  # info_nce's keywords of the problem
                if problem in ("shared_mask", "shared_labels"):
                    classes = torch.randint(0, MASK_CLASSES, (b + K,), device="cuda")
                if problem == "shared_mask":
                    mask = classes[:b, None] != classes[None, b:]
                    extra = dict(negative_mask=mask)
                elif problem == "shared_labels":
                    extra = dict(labels=classes[:b], negative_labels=classes[b:])
                leaves = [x for x in (a, p, n) if x is not None]
                flop = 6 * b * K * d
                mm = _matmul_tflops(b, K, d, dtype, repeats)
                # One timed call first: if it is slow, one repeat is all there is time for.
                reps = repeats
                t0 = time.time()
                ref_loss = cb.info_nce(a, p, n, temperature=t, **extra)
                ref_loss.backward()
                torch.cuda.synchronize()
                if time.time() - t0 > 5.0:
                    reps = 1
                # The default kernels' result, against which each variant below is checked before it is timed.
                ref = [ref_loss.detach().float()] + [x.grad.detach().float().clone() for x in leaves]
                for x in leaves:
                    x.grad = None
                fused = lambda: cb.info_nce(a, p, n, temperature=t, **extra)  # noqa: E731
                grads_gib = sum(x.numel() * x.element_size() for x in leaves) / 2**30
                # (one repeat in an opt-in run: its variants are compared with this process's default row, but
                # gpu_summary takes the default kernels' figures from the main run, which times them in full)
                r = _measure(fused, leaves, 1 if args.opt_in_only else reps, flop)
                fused_row = _row(base, "fused", r, mm, grads_gib)
                fused_loss = r[5]

                naive_row = None
                try:  # the fused row is written after naive (it carries the speed-up), whatever naive does
                    if not args.no_naive:
                        # Measured on an H200: naive peaked at ~12.1 bytes per logit (K = 2^19); 13 leaves a margin.
                        # (labels: naive takes the (B, K) mask they make, one byte per logit more)
                        need = b * (K + 1) * (14 if problem == "shared_labels" else 13)
                        if need > 0.8 * (total_mem - torch.cuda.memory_allocated()):
                            naive_row = dict(base, impl="naive", note=f"skipped: needs ~{need / 2**30:.0f} GiB")
                        else:
                            try:
                                # (labels: the mask made in the step, so that its memory and time count)
                                step_mask = (lambda: classes[:b, None] != classes[None, b:]) if mask is None and \
                                    classes is not None else (lambda: mask)
                                rn = _measure(lambda: _naive(a, p, n, t, step_mask()), leaves, reps, flop)
                                naive_row = _row(base, "naive", rn, mm, grads_gib, ref_loss=fused_loss)
                                if not args.opt_in_only:
                                    naive_row["eval_fwd_ms"] = _eval_forward(
                                        lambda: _naive(a, p, n, t, step_mask()), reps)[0]
                                fused_row["speedup_vs_naive"] = rn[2] / r[2]
                            except torch.cuda.OutOfMemoryError:
                                naive_row = dict(base, impl="naive", note="out of memory")
                            except Exception as exc:  # noqa: BLE001 - the fused row (not yet written) must not be lost
                                naive_row = dict(base, impl="naive", note=f"failed: {type(exc).__name__}: {exc}"[:200])
                            torch.cuda.empty_cache()
                finally:
                    if not args.opt_in_only and not eval_failed:
                        # The forward without gradients (and on sm_90 with the wgmma Lse walk), after naive's, so that
                        # an error here (a kernel not yet run on a GPU) costs these columns only; noted in the row,
                        # and not tried again at the other sizes.
                        evals = [("eval_fwd_ms", {})]
                        if torch.cuda.get_device_capability() == (9, 0):
                            evals.append(("eval_fwd_ms_wg_lse", {"CONTRASTBOUND_TC_WG_LSE": "1"}))
                        for field, env in evals:
                            issue = ""
                            try:
                                with _env(env):
                                    fused_row[field], value = _eval_forward(fused, reps)
                                if not abs(value - fused_loss) <= 1e-3 * max(abs(fused_loss), 1e-6):
                                    issue = f"EVAL LOSS MISMATCH ({field}): {value:.6g} vs {fused_loss:.6g}"
                            except Exception as exc:  # noqa: BLE001 - the row measured above must not be lost
                                eval_failed = True
                                issue = f"{field} failed: {type(exc).__name__}: {exc}"[:200]
                            if issue:
                                fused_row["note"] = (f"{fused_row['note']}; " if fused_row["note"] else "") + issue
                    rows.append(fused_row)
                    if naive_row is not None:
                        rows.append(naive_row)

                if classes is not None:  # the peers have no mask; the opt-in kernels serve none (mma.sync does)
                    continue
                if "inf_cl" in peers:
                    try:
                        fn = peers["inf_cl"]
                        scale = torch.tensor(1.0 / t, device="cuda")
                        # In-batch: Inf-CL's own problem. Shared bank: keys = [positives; bank], labels = arange(B),
                        # so each anchor also sees the other anchors' positives (B more negatives: B + K columns
                        # in the rate). It casts q and k to float32 and multiplies in TF32 internally.
                        keys = (lambda: F.normalize(p, dim=-1)) if n is None else (
                            lambda: F.normalize(torch.cat([p, n]), dim=-1))
                        loss_fn = lambda: fn(F.normalize(a, dim=-1), keys(), scale=scale, head_dim=d)  # noqa: E731
                        cols = K if n is None else K + b
                        rp = _measure(lambda: loss_fn().mean(), leaves, reps, 6 * b * cols * d)
                        rows.append(_row(base, "inf_cl", rp, mm, grads_gib,
                                         note=("float32/TF32 inside"
                                               + ("" if n is None else "; keys = [positives; bank]")),
                                         ref_loss=fused_loss if n is None else None))
                    except Exception as exc:  # noqa: BLE001 - optional peer
                        rows.append(dict(base, impl="inf_cl", note=f"failed: {type(exc).__name__}: {exc}"[:200]))
                    torch.cuda.empty_cache()
                if "cce" in peers:
                    # Default settings (filter_eps="auto": its backward skips blocks whose softmax is below a
                    # threshold, bf16's eps / 32 ~ 2.4e-4: faster on random data, approximate gradients) and filter_eps=None (every
                    # block, exact like the fused loss). In-batch it is the fused loss's problem; on the shared
                    # problem the bank is the classifier with random targets (the same GEMMs, another loss).
                    # (cce_kw, not `extra`: the fused lambda above reads `extra` when called, so rebinding it here
                    # handed filter_eps to every later variant's info_nce, which failed with a TypeError on an H200)
                    for impl, cce_kw, what in (("cut_cross_entropy", {}, "gradient filtering: approximate, skips work"),
                                               ("cut_cross_entropy_exact", {"filter_eps": None}, "filter_eps=None")):
                        try:
                            fn = peers["cce"]
                            classifier = p if n is None else n
                            labels = (torch.arange(b, device="cuda") if n is None
                                      else torch.randint(0, K, (b,), device="cuda"))
                            loss_fn = lambda: fn(F.normalize(a, dim=-1) / t, F.normalize(classifier, dim=-1),  # noqa: E731
                                                 labels, **cce_kw)
                            rc = _measure(loss_fn, leaves, reps, flop)
                            rows.append(_row(base, impl, rc, mm, grads_gib,
                                             note=what + ("" if n is None else "; bank as classifier, random targets"),
                                             ref_loss=fused_loss if n is None else None))
                        except Exception as exc:  # noqa: BLE001 - optional peer
                            rows.append(dict(base, impl=impl, note=f"failed: {type(exc).__name__}: {exc}"[:200]))
                        torch.cuda.empty_cache()

                def variant(impl, env, variant_reps):
                    """The fused loss again with some of the kernels' environment switches set (restored after);
                    a failure is noted in its row and the next variant still runs."""
                    note = " ".join(f"{k}={v}" for k, v in env.items())
                    with _env(env):
                        checked_then_timed(impl, note, variant_reps)

                def checked_then_timed(impl, note, variant_reps):
                    try:
                        for x in leaves:
                            x.grad = None
                        # Same result as the default kernels first (bf16: gradients agree to ~1e-2 relative).
                        loss = fused()
                        loss.backward()
                        got = [loss.detach().float()] + [x.grad.detach().float() for x in leaves]
                        for x in leaves:
                            x.grad = None
                        err = max(((g - r).norm() / r.norm().clamp_min(1e-6)).item() for g, r in zip(got, ref))
                        del got
                        if not err <= 5e-2:
                            rows.append(dict(base, impl=impl,
                                             note=f"{note} WRONG RESULT: rel err {err:.3g} vs default"))
                            return
                        rows.append(_row(base, impl, _measure(fused, leaves, variant_reps, flop), mm, grads_gib,
                                         note=note))
                    except Exception as exc:  # noqa: BLE001 - the variants (some opt-in) must not cost the others
                        for x in leaves:
                            x.grad = None
                        rows.append(dict(base, impl=impl, note=f"{note} failed: {type(exc).__name__}: {exc}"[:200]))
                    finally:
                        torch.cuda.empty_cache()

                # The other Y-tile pipeline (slower than the default at every K on an H200: at the smallest K
                # and at 2^18 only), the opt-in one-pass forward with either pipeline, then the WMMA kernels
                # and the SIMT kernels (no tensor cores) at small K.
                stages = "2" if os.environ.get("CONTRASTBOUND_TC_STAGES", "1") != "2" else "1"
                if not args.opt_in_only and d <= 256 and logk in (ks[0], 18):  # wide rows: see below
                    if torch.cuda.get_device_capability() == (9, 0):
                        # the mma.sync kernels, the default before the wgmma ones (and elsewhere)
                        variant("fused_mma", NO_WGMMA, reps)
                    variant(f"fused_{stages}stage", {"CONTRASTBOUND_TC_STAGES": stages, **NO_WGMMA}, reps)
                if args.one_pass:
                    # Each opt-in variant, then with the other Y-tile pipeline: the one-pass forward with `stages`
                    # (the mma.sync kernels' other one); flash defaults to two stages (one block per
                    # multiprocessor), so one for comparison; wgmma has one pipeline (three Y buffers).
                    for name, env in _opt_in_variants(families):
                        alt = stages if name == "fused_1pass" else "1"
                        variant(name, env, reps)
                        if name != "fused_wgmma":
                            variant(f"{name}_{alt}stage", {**env, "CONTRASTBOUND_TC_STAGES": alt}, reps)
                if d > 256 and not args.opt_in_only:
                    # Wide rows: the default copies them in chunks of 256 features where that keeps more blocks
                    # per multiprocessor than whole rows (d > 384 on an H200; automatic past 848 where whole
                    # rows do not fit); whole rows (two Y stages where they keep the blocks, d <= 560 there), and
                    # whole rows with one stage, for comparison.
                    variant("fused_whole", {"CONTRASTBOUND_TC_CHUNKED": "0", **NO_WGMMA}, reps)
                    variant("fused_1stage", {"CONTRASTBOUND_TC_CHUNKED": "0", "CONTRASTBOUND_TC_STAGES": "1",
                                             **NO_WGMMA}, reps)
                if logk in ks[:2] and not args.opt_in_only and d <= 256:  # (past 256 WMMA = SIMT)
                    variant("fused_wmma", {"CONTRASTBOUND_TC_MMA": "0"}, reps)
                if logk == ks[0] and not args.opt_in_only:
                    variant("fused_simt", {"CONTRASTBOUND_TENSOR_CORES": "0"}, 1)
                if args.kernels == logk and problem == "shared":
                    # Per-kernel profile of this very problem, after its timed rows: only the variants whose
                    # every row so far passed the check against the default kernels (an opt-in kernel that failed
                    # or disagreed is not run again: a sticky CUDA error here would cost the rest of the table).
                    notes = [(r.get("impl"), r.get("note") or "") for r in rows]
                    bad = {impl for impl, nt in notes if "WRONG RESULT" in nt or "failed" in nt}
                    ok = [v for v in _opt_in_variants(families) if args.one_pass and v[0] not in bad]

                    def step():
                        for x in leaves:
                            x.grad = None
                        fused().backward()

                    kpath = (args.csv[:-4] if args.csv.endswith(".csv") else args.csv) + "_kernels.csv"
                    _profile_kernels(step, [("fused", {})] + ok, b, K, d, mm, kpath, args.append)
            except Exception as exc:  # noqa: BLE001 - a failure (e.g. a sticky CUDA error) ends this row only
                # (in an opt-in run, named after its families: most likely theirs, and the main run has the
                # default kernels' own rows)
                rest = "rest of this problem" + (f" ({'/'.join(families)} run)" if args.opt_in_only else "")
                rows.append(dict(base, impl=rest, note=f"failed: {type(exc).__name__}: {exc}"[:200]))
            finally:  # the next size's inputs need the memory, also after a failure
                a = p = n = mask = classes = extra = leaves = ref = ref_loss = fused = classifier = labels = x = None
                torch.cuda.empty_cache()

    def fmt(v):
        if v is None or v == "":
            return "-"
        return f"{v:.3g}" if isinstance(v, float) and math.isfinite(v) else str(v)

    cols = ["problem", "impl", "B", "K", "fwd_ms", "bwd_ms", "fwdbwd_ms", "tflops", "matmul_tflops",
            "pct_of_matmul", "speedup_vs_naive", "peak_extra_gib", "grads_gib", "loss", "note"]
    widths = [9, 18, 7, 8, 9, 9, 10, 7, 8, 7, 8, 9, 6, 8, 0]
    print(" ".join(c[:w].ljust(w) if w else c for c, w in zip(cols, widths)))
    for r in sorted(rows, key=lambda r: (r.get("K", 0), r.get("problem", ""))):  # (stable: impl order kept)
        print(" ".join(fmt(r.get(c, "")).ljust(w) if w else fmt(r.get(c, "")) for c, w in zip(cols, widths)))
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
