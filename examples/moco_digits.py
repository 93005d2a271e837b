"""MoCo-style training on the scikit-learn digits with the fused InfoNCE and a NegativeQueue.

    python examples/moco_digits.py --steps 600 --queue 1024

Logs the loss, throughput and peak memory; evaluates the mean classifier on held-out digits at the end, with
the features' alignment and uniformity (cb.alignment, cb.uniformity).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contrastbound as cb  # noqa: E402
from _digits import augment, check_args, encoder, evaluate, load_digits_tensors, peak_rss_mib  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--queue", type=int, default=1024, help="number of negatives K (keep it below the data set)")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--momentum", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args(argv)
    check_args(parser, args, ("steps", "batch", "dim", "log_every", "queue"))

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    train, test = load_digits_tensors(args.seed)
    query = encoder(args.dim)
    key = copy.deepcopy(query).requires_grad_(False)
    queue = cb.NegativeQueue(args.queue, args.dim)
    opt = torch.optim.Adam(query.parameters(), lr=1e-3)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train[0]), (args.batch,), generator=g)
        x = train[0][idx]
        q = query(augment(x, g))
        with torch.no_grad():
            k = key(augment(x, g))
        # The queue's keys are the negatives; the batch's keys are enqueued after the loss (not their own negatives).
        loss = cb.info_nce(q, k, queue.negatives() if len(queue) else None, temperature=args.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pk, pq in zip(key.parameters(), query.parameters()):
                pk.mul_(args.momentum).add_(pq, alpha=1 - args.momentum)
        queue.enqueue(k)
        if step % args.log_every == 0 or step == args.steps:
            rate = step * args.batch / (time.perf_counter() - start)
            print(f"step {step:5d}  loss {loss.item():.4f}  K {len(queue):6d}  {rate:8.0f} samples/s  "
                  f"peak RSS {peak_rss_mib():.0f} MiB", flush=True)
    result = {"final_loss": loss.item(), **evaluate(query, train, test)}
    print(f"mean classifier on held-out digits: accuracy {result['test_accuracy']:.3f}, "
          f"supervised loss {result['test_supervised_loss']:.3f}; alignment {result['test_alignment']:.3f}, "
          f"uniformity {result['test_uniformity']:.3f}")
    return result


if __name__ == "__main__":
    main()
