"""Command line: `contrastbound <command>` or `python -m contrastbound <command>`."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(steps=args.steps, batch=args.batch, queue=args.queue, dim=args.dim, seed=args.seed)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from ._backend import backend_info

    print(json.dumps(backend_info(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contrastbound", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a few steps with the fused loss and print loss and timing")
    demo.add_argument("--steps", type=int, default=12)
    demo.add_argument("--batch", type=int, default=256)
    demo.add_argument("--queue", type=int, default=2**17, help="number of negatives K in the queue")
    demo.add_argument("--dim", type=int, default=128)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    info = sub.add_parser("info", help="which backend serves CPU and CUDA tensors, and why")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
