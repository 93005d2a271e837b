"""SimCLR-style training on the scikit-learn digits with the fused NT-Xent (no 2N x 2N matrix).

    python examples/simclr_digits.py --steps 300 --batch 512
    python examples/simclr_digits.py --steps 300 --batch 4096 --chunk 512   # gradient caching (grad_cache)

Logs the loss, throughput and peak memory; evaluates the mean classifier on held-out digits at the end, with
the features' alignment and uniformity (cb.alignment, cb.uniformity).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contrastbound as cb  # noqa: E402
from _digits import augment, check_args, encoder, evaluate, load_digits_tensors, peak_rss_mib  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=512, help="N: 2N views, 2N - 2 negatives each")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--learn-temperature", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--chunk", type=int, default=0,
                        help="run each step through cb.grad_cache, the encoder over this many rows at a time "
                             "(0: the whole batch at once)")
    args = parser.parse_args(argv)
    check_args(parser, args, ("steps", "batch", "dim", "log_every", "queue"))
    if args.chunk < 0:
        parser.error(f"--chunk must be >= 0, got {args.chunk}")

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    train, test = load_digits_tensors(args.seed)
    model = encoder(args.dim)
    log_t = torch.nn.Parameter(torch.tensor(float(args.temperature)).log(), requires_grad=args.learn_temperature)
    params = list(model.parameters()) + ([log_t] if args.learn_temperature else [])
    opt = torch.optim.Adam(params, lr=1e-3)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train[0]), (args.batch,), generator=g)
        x = train[0][idx]
        views = [augment(x, g), augment(x, g)]
        opt.zero_grad(set_to_none=True)
        if args.chunk:  # the same gradients, one chunk's activations at a time (one more encoder forward)
            loss = cb.grad_cache(lambda z1, z2: cb.nt_xent(z1, z2, log_t.exp()), model, views, chunk_size=args.chunk)
        else:
            loss = cb.nt_xent(model(views[0]), model(views[1]), log_t.exp())
            loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == args.steps:
            rate = step * args.batch / (time.perf_counter() - start)
            print(f"step {step:5d}  loss {loss.item():.4f}  temperature {log_t.exp().item():.3f}  "
                  f"{rate:8.0f} samples/s  peak RSS {peak_rss_mib():.0f} MiB", flush=True)
    result = {"final_loss": loss.item(), **evaluate(model, train, test)}
    print(f"mean classifier on held-out digits: accuracy {result['test_accuracy']:.3f}, "
          f"supervised loss {result['test_supervised_loss']:.3f}; alignment {result['test_alignment']:.3f}, "
          f"uniformity {result['test_uniformity']:.3f}")
    return result


if __name__ == "__main__":
    main()
