"""A short training run with the fused loss: an MLP encoder, a detached bank of K negatives.

Prints the loss and the time of each step, and the same step with naive PyTorch (materialised logits) beside it.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

from .functional import info_nce


def _naive(anchors, positives, bank, temperature):
    a = F.normalize(anchors, dim=1)
    p = F.normalize(positives, dim=1)
    n = F.normalize(bank, dim=1)
    logits = torch.cat([(a * p).sum(1, keepdim=True), a @ n.t()], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(a), dtype=torch.long))


def run_demo(
    steps: int = 12, batch: int = 256, queue: int = 2**17, dim: int = 128, seed: int = 0, naive: bool = True
) -> list[dict]:
    torch.manual_seed(seed)
    in_dim = 64
    encoder = torch.nn.Sequential(torch.nn.Linear(in_dim, 256), torch.nn.ReLU(), torch.nn.Linear(256, dim))
    opt = torch.optim.SGD(encoder.parameters(), lr=0.1, momentum=0.9)
    bank = F.normalize(torch.randn(queue, dim), dim=1)  # a fixed, detached bank of K negative keys
    rows = []
    print(f"fused InfoNCE demo: batch {batch}, queue K = {queue}, dim {dim}, {torch.get_num_threads()} threads")
    print(f"{'step':>4} {'loss':>9} {'fused s':>8} {'naive loss':>10} {'naive s':>8}")
    for step in range(steps):
        x = torch.randn(batch, in_dim)  # instance discrimination: a view and a noisy view of each sample
        x_pos = x + 0.8 * torch.randn(batch, in_dim)
        # The naive loss on the same batch, forward + backward, for comparison (its gradients are discarded).
        t0 = time.perf_counter()
        naive_loss = _naive(encoder(x), encoder(x_pos), bank, 0.1) if naive else torch.tensor(math.nan)
        if naive:
            naive_loss.backward()
        t1 = time.perf_counter() if naive else math.nan
        # The training step with the fused loss.
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        loss = info_nce(encoder(x), encoder(x_pos), bank, temperature=0.1)
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        rows.append({"step": step, "loss": loss.item(), "fused_s": t3 - t2, "naive_loss": naive_loss.item(),
                     "naive_s": t1 - t0})
        print(f"{step:>4} {loss.item():>9.4f} {t3 - t2:>8.3f} {naive_loss.item():>10.4f} {t1 - t0:>8.3f}")
    first, last = rows[0]["loss"], rows[-1]["loss"]
    print(f"loss {first:.4f} -> {last:.4f}; median step time fused "
          f"{statistics.median([r['fused_s'] for r in rows]):.3f} s, "
          f"naive {statistics.median([r['naive_s'] for r in rows]):.3f} s")
    return rows
