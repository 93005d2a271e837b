"""nt_xent, clip_loss, supcon_loss and debiased_info_nce: fused vs plain PyTorch (the 2N x 2N or N x N matrix),
forward+backward time and memory (supcon_loss: N samples of 2 views, 100 classes, as SupCon's reference code forms
it; debiased_info_nce: in-batch over N pairs, tau_plus = 0.1, beta = 0.5, the authors' formula over the N x N
logits, one direction (their SimCLR code forms 2N x 2N); supcon_bank: supcon_loss over 256 samples of 2 views with a
labelled bank of N rows (a queue, no gradient; N is the bank's size here), against the 512 x (512 + N) logits with
a positive mask as pytorch-metric-learning's CrossBatchMemory forms them; supcon_bank_grad: the same with a bank
that needs a gradient, the (N, d) gradient in the extra memory); siglip_loss: N pairs, scale 10, bias -10,
against big_vision's / open_clip's form, -logsigmoid(z * logits) over the N x N logits); info_nce_mask: info_nce of
256 anchors against a detached bank of N rows with the rows of the anchor's own class (100 classes) masked out
(negative_mask, applied inside the shared-bank tiles), against the 256 x (1 + N) logits with those columns set to
-inf (the (256, N) mask an input, made before the measure); info_nce_labels: the same problem from the labels
(labels / negative_labels, compared inside the tiles: no mask at all), against the plain form that makes the mask
from the labels in its step; nt_xent_dcl: nt_xent(decoupled=True), the decoupled contrastive loss (DCL, temperature
0.5), against the 2N x 2N logits with each view's own and pair columns out of the log-sum-exp (the paper's eq. 6).

Each (loss, method, N) runs in a fresh subprocess. Memory: peak resident memory (VmHWM) after a warm-up step
(whose one-off costs, code pages, thread pools, autograd's first use, go to `warmup_extra_mib`), reset with the
warm-up's loss and gradients freed and read against a baseline taken then, the inputs' gradients included in the
extra (ru_maxrss, not resettable, where /proc is missing: then the peak covers the warm-up, from a baseline taken
once the inputs exist). Before 2026-12-01 the extra counted the warm-up. Plain PyTorch is skipped where its matrix
and the copies its step holds would take more than --mem-fraction of the memory available when the script starts
(MemAvailable, else the physical memory; before 2026-12-02 a fixed 16 GiB).

    python benchmarks/bench_training.py                       # every loss, N = 2^10 ... 2^16, d = 128, float32
    python benchmarks/bench_training.py --losses nt_xent,clip_loss,supcon_loss  # results/bench_training.csv
    python benchmarks/bench_training.py --max-log2n 13        # quicker
    python benchmarks/bench_training.py --losses supcon_loss  # one loss
    python benchmarks/bench_training.py --losses supcon_bank --min-log2n 14 --max-log2n 20  # banks of 2^14 ... 2^20
    python benchmarks/bench_training.py --losses supcon_bank_grad --min-log2n 14 --max-log2n 20 -d 64
Writes benchmarks/results/bench_training.csv (or --out); the committed results of the other losses are the
bench_training_<loss>.csv files beside it (docs/BENCHMARKS.md quotes each with its command).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import statistics
import sys
import time

# Runs from a checkout with an in-place build (no install): the repository root comes first on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


LOSSES = ("nt_xent", "clip_loss", "supcon_loss", "debiased_info_nce", "supcon_bank", "siglip_loss", "info_nce_mask",
          "info_nce_labels", "supcon_bank_grad", "nt_xent_dcl")
BANK_BATCH = 256  # supcon_bank: samples per batch (2 views each); info_nce_mask / info_nce_labels: anchors
BANKED = ("supcon_bank", "info_nce_mask", "info_nce_labels", "supcon_bank_grad")  # N is the bank's size


def _plain_nt_xent(z1, z2, t):
    import torch
    import torch.nn.functional as F

    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = (z @ z.t()) / t
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def _plain_dcl(z1, z2, t):
    import torch
    import torch.nn.functional as F

    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = (z @ z.t()) / t
    pair = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    pos = sim[torch.arange(2 * n), pair]
    out = torch.eye(2 * n, dtype=torch.bool)
    out[torch.arange(2 * n), pair] = True
    return (torch.logsumexp(sim.masked_fill(out, float("-inf")), dim=1) - pos).mean()


def _plain_clip(img, txt, scale):
    import torch
    import torch.nn.functional as F

    img, txt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    logits = scale * img @ txt.t()
    target = torch.arange(len(img))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def _plain_supcon(views, labels, t):
    # SupCon's reference form (Khosla et al.): the 2N x 2N logits, a positive mask, log-softmax, masked mean
    import torch
    import torch.nn.functional as F

    z = F.normalize(views.reshape(-1, views.shape[-1]), dim=1)
    y = labels.repeat_interleave(views.shape[1])
    logits = z @ z.t() / t
    own = torch.eye(len(z), dtype=torch.bool)
    log_prob = logits - torch.logsumexp(logits.masked_fill(own, float("-inf")), dim=1, keepdim=True)
    positive = (y[:, None] == y[None, :]) & ~own
    return (-(log_prob * positive).sum(1) / positive.sum(1).clamp_min(1)).mean()


def _plain_supcon_bank(views, labels, bank, bank_labels, t):
    # the batch's rows against [batch; bank] (M x (M + K) logits), the bank's rows positives of their label
    import torch
    import torch.nn.functional as F

    z = F.normalize(views.reshape(-1, views.shape[-1]), dim=1)
    y = labels.repeat_interleave(views.shape[1])
    columns = torch.cat([z, F.normalize(bank, dim=1)])
    logits = z @ columns.t() / t
    own = torch.eye(len(z), len(columns), dtype=torch.bool)
    log_prob = logits - torch.logsumexp(logits.masked_fill(own, float("-inf")), dim=1, keepdim=True)
    positive = (y[:, None] == torch.cat([y, bank_labels])[None, :]) & ~own
    return (-(log_prob * positive).sum(1) / positive.sum(1).clamp_min(1)).mean()


def _plain_siglip(img, txt, scale, bias):
    # SigLIP's reference form: the N x N logits, labels z = 2 I - 1, -log sigmoid(z l) summed / N
    import torch
    import torch.nn.functional as F

    logits = scale * F.normalize(img, dim=1) @ F.normalize(txt, dim=1).t() + bias
    z = 2 * torch.eye(len(img)) - 1
    return -F.logsigmoid(z * logits).sum() / len(img)


def _plain_info_nce_mask(a, p, bank, mask, t):
    # the B x (1 + N) logits, the masked-out bank columns -inf, the positive in column 0
    import torch
    import torch.nn.functional as F

    a, p, bank = F.normalize(a, dim=1), F.normalize(p, dim=1), F.normalize(bank, dim=1)
    neg = (a @ bank.t() / t).masked_fill(~mask, float("-inf"))
    logits = torch.cat([(a * p).sum(1, keepdim=True) / t, neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(a), dtype=torch.long))


def _plain_debiased(a, p, t, tau_plus, beta):
    # Robinson et al.'s form (hard negatives over Chuang et al.'s debiasing): exponentiated N x N logits, the
    # diagonal (each anchor's positive) apart
    import torch
    import torch.nn.functional as F

    a, p = F.normalize(a, dim=1), F.normalize(p, dim=1)
    e = torch.exp(a @ p.t() / t)
    pos = e.diagonal()
    neg = e.masked_select(~torch.eye(len(a), dtype=torch.bool)).view(len(a), -1)
    K = neg.shape[1]
    imp = (beta * neg.log()).exp()
    reweight = (imp * neg).sum(-1) / imp.mean(-1)
    ng = ((-tau_plus * K * pos + reweight) / (1 - tau_plus)).clamp(min=K * torch.exp(torch.tensor(-1 / t)))
    return (-torch.log(pos / (pos + ng))).mean()


def _worker(loss_name: str, method: str, N: int, d: int, reps: int, threads: int) -> dict:
    import torch

    import contrastbound as cb
    from contrastbound.benchsuite.harness import _reset_rss_peak, _rss_peak_mib

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = BANK_BATCH if loss_name in BANKED else N
    x1 = torch.randn(rows, d, requires_grad=True)
    x2 = torch.randn(rows, d, requires_grad=True)
    torch.mm(torch.randn(64, 64), torch.randn(64, 64))  # initialise BLAS before the baseline
    if loss_name == "nt_xent":
        fn = (lambda: cb.nt_xent(x1, x2, 0.5)) if method == "fused" else (lambda: _plain_nt_xent(x1, x2, 0.5))
    elif loss_name == "nt_xent_dcl":
        fn = (lambda: cb.nt_xent(x1, x2, 0.5, decoupled=True)) if method == "fused" else (lambda: _plain_dcl(x1, x2, 0.5))
    elif loss_name == "clip_loss":
        fn = (lambda: cb.clip_loss(x1, x2, 14.3)) if method == "fused" else (lambda: _plain_clip(x1, x2, 14.3))
    elif loss_name == "debiased_info_nce":
        fn = ((lambda: cb.debiased_info_nce(x1, x2, None, 0.1, tau_plus=0.1, beta=0.5)) if method == "fused"
              else (lambda: _plain_debiased(x1, x2, 0.1, 0.1, 0.5)))
    elif loss_name == "siglip_loss":
        fn = ((lambda: cb.siglip_loss(x1, x2, 10.0, -10.0)) if method == "fused"
              else (lambda: _plain_siglip(x1, x2, 10.0, -10.0)))
    elif loss_name in ("supcon_bank", "supcon_bank_grad"):  # (two views: every row has a positive, so the means agree)
        labels = torch.randint(0, 100, (rows,))
        bank = torch.randn(N, d, requires_grad=loss_name == "supcon_bank_grad")
        bank_labels = torch.randint(0, 100, (N,))
        fn = ((lambda: cb.supcon_loss(torch.stack([x1, x2], dim=1), labels, 0.1, bank=bank, bank_labels=bank_labels))
              if method == "fused" else
              (lambda: _plain_supcon_bank(torch.stack([x1, x2], dim=1), labels, bank, bank_labels, 0.1)))
    elif loss_name == "info_nce_mask":
        labels, bank, bank_labels = torch.randint(0, 100, (rows,)), torch.randn(N, d), torch.randint(0, 100, (N,))
        mask = labels[:, None] != bank_labels[None, :]
        fn = ((lambda: cb.info_nce(x1, x2, bank, 0.1, negative_mask=mask)) if method == "fused"
              else (lambda: _plain_info_nce_mask(x1, x2, bank, mask, 0.1)))
    elif loss_name == "info_nce_labels":
        labels, bank, bank_labels = torch.randint(0, 100, (rows,)), torch.randn(N, d), torch.randint(0, 100, (N,))
        fn = ((lambda: cb.info_nce(x1, x2, bank, 0.1, labels=labels, negative_labels=bank_labels))
              if method == "fused" else
              (lambda: _plain_info_nce_mask(x1, x2, bank, labels[:, None] != bank_labels[None, :], 0.1)))
    else:  # (two views: every row has a positive, so the two means agree)
        labels = torch.randint(0, 100, (N,))
        fn = ((lambda: cb.supcon_loss(torch.stack([x1, x2], dim=1), labels, 0.1)) if method == "fused"
              else (lambda: _plain_supcon(torch.stack([x1, x2], dim=1), labels, 0.1)))
    gc.collect()
    _reset_rss_peak()  # a transient peak before here (imports, building the inputs) would hide the loss's
    base = _rss_peak_mib()
    t0 = time.perf_counter()
    loss = fn()  # warm-up: its one-off costs (code pages, thread pools, autograd's first use) reported apart
    loss.backward()
    warmup = time.perf_counter() - t0
    warmup_extra = _rss_peak_mib() - base
    del loss
    x1.grad = x2.grad = None
    if loss_name == "supcon_bank_grad":
        bank.grad = None
    gc.collect()
    if _reset_rss_peak():  # (else ru_maxrss: the peak covers the warm-up, from the first baseline)
        base = _rss_peak_mib()
    times = []
    for _ in range(reps):
        x1.grad = x2.grad = None
        if loss_name == "supcon_bank_grad":
            bank.grad = None
        t0 = time.perf_counter()
        loss = fn()
        loss.backward()
        times.append(time.perf_counter() - t0)
    peak = _rss_peak_mib()
    return {"time_s": statistics.median(times), "warmup_s": warmup, "extra_mib": peak - base,
            "warmup_extra_mib": warmup_extra, "loss_value": float(loss)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-log2n", type=int, default=10)
    parser.add_argument("--max-log2n", type=int, default=16)
    parser.add_argument("-d", type=int, default=128)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "bench_training"),
                        help="output path without extension: writes OUT.csv (a trailing .csv is dropped; "
                             "default %(default)s)")
    parser.add_argument("--losses", default=",".join(LOSSES),
                        help=f"comma list of {', '.join(LOSSES)} (default %(default)s)")
    parser.add_argument("--mem-fraction", type=float, default=0.7,
                        help="run plain PyTorch only where its matrices fit in this fraction of the memory available "
                             "(default %(default)s)")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, method, N, d, reps, threads = args.worker
        print(json.dumps(_worker(name, method, int(N), int(d), int(reps), int(threads))))
        return 0
    for name, value in (("-d", args.d), ("--reps", args.reps), ("--threads", args.threads)):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    losses = list(dict.fromkeys(x.strip() for x in args.losses.split(",") if x.strip()))
    unknown = [x for x in losses if x not in LOSSES]
    if unknown or not losses:
        parser.error(f"--losses takes a comma list of {', '.join(LOSSES)}, got {args.losses!r}")
    if not 0.0 < args.mem_fraction <= 1.0:
        parser.error(f"--mem-fraction must lie in (0, 1], got {args.mem_fraction}")
    if not 0 <= args.min_log2n <= args.max_log2n:
        parser.error(f"need 0 <= --min-log2n <= --max-log2n, got {args.min_log2n} and {args.max_log2n}")
    from contrastbound.benchsuite.report import prepare_out_stem, run_worker

    args.out = prepare_out_stem(parser, args.out)  # (before measuring)
    from contrastbound.benchsuite.harness import available_mib

    available = available_mib("cpu")
    if not math.isfinite(available):  # (no /proc/meminfo: the physical memory, else the old fixed 16 GiB)
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
        except (ValueError, OSError, AttributeError):
            available = 16 * 1024 / args.mem_fraction
    plain_limit_mib = args.mem_fraction * available
    rows = []
    print(f"d = {args.d}, float32, {args.threads} threads; each row a fresh process")
    print(f"{'loss':>17} {'N':>7} {'method':>6} {'time s':>8} {'extra MiB':>10} {'warm-up MiB':>11} "
          f"{'matrix MiB':>10}  note")
    for log2n in range(args.min_log2n, args.max_log2n + 1):
        N = 2**log2n
        for name in losses:
            side = N if name in ("clip_loss", "debiased_info_nce", "siglip_loss") else 2 * N
            shape = ((2 * BANK_BATCH, 2 * BANK_BATCH + N) if name in ("supcon_bank", "supcon_bank_grad") else
                     (BANK_BATCH, 1 + N) if name in ("info_nce_mask", "info_nce_labels") else (side, side))
            matrix_mib = shape[0] * shape[1] * 4 / 2**20
            for method in ("fused", "plain"):
                row = {"loss": name, "N": N, "d": args.d, "method": method, "matrix_mib": matrix_mib}
                copies = 8 if name == "debiased_info_nce" else 4  # (the authors' form holds e, neg, imp, imp * neg)
                if method == "plain" and matrix_mib * copies > plain_limit_mib:
                    row["note"] = (f"not run: the {shape[0]} x {shape[1]} matrix and its gradients need "
                                   f"~{matrix_mib * copies / 1024:.1f} GiB, over {args.mem_fraction:g} of the "
                                   f"{plain_limit_mib / args.mem_fraction / 1024:.1f} GiB available")
                else:
                    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, method, str(N), str(args.d),
                           str(args.reps if N < 2**15 else 1), str(args.threads)]
                    r, error = run_worker(cmd)
                    if r is None:
                        row["note"] = "failed: " + error[:100]
                    else:
                        row.update(r)
                rows.append(row)
                print(f"{name:>17} {N:>7} {method:>6} {row.get('time_s', float('nan')):>8.3f} "
                      f"{row.get('extra_mib', float('nan')):>10.1f} {row.get('warmup_extra_mib', float('nan')):>11.1f} "
                      f"{matrix_mib:>10.1f}  {row.get('note', '')}", flush=True)
    with open(args.out + ".csv", "w", newline="") as f:
        keys = ["loss", "N", "d", "method", "time_s", "warmup_s", "extra_mib", "warmup_extra_mib", "matrix_mib",
                "loss_value", "note"]
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
