"""Command line: `contrastbound <command> ...` or `python -m contrastbound <command> ...`.

Commands:
  reproduce   reproduce the claims of Bao, Nagano & Nozawa (ICML 2022) with plots and a report (the main job)
  bench       large-K scaling benchmark of the fused loss beside naive PyTorch and peer libraries
  demo        train a few steps with the fused loss and print loss and timing
  info        which backend serves CPU and CUDA tensors, and why

`contrastbound <command> --help` shows each command's options; `contrastbound --version` the version.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys

# Commands implemented in their own modules, each with main(argv) -> int and its own options.
_MODULE_COMMANDS = {
    "reproduce": ("contrastbound.reproduce", "reproduce the paper's claims with plots and a report (main job)"),
    "bench": ("contrastbound.benchsuite", "large-K scaling benchmark beside naive PyTorch and peers"),
}


def _cmd_demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="contrastbound demo", description="a few training steps, fused vs naive",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="training steps")
    parser.add_argument("--batch", type=int, default=256, help="anchors per step (B)")
    parser.add_argument("--queue", type=int, default=2**17, help="number of negatives K in the bank")
    parser.add_argument("--dim", type=int, default=128, help="feature size d")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "queue", "dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be an integer in [0, 2^63), got {args.seed}")
    from .benchsuite.harness import available_mib
    from .demo import run_demo

    # The bank (K x dim floats) must fit; naive PyTorch's logits (batch x K, their softmax and gradient, a
    # normalised copy of the bank) are skipped where they would take more than half of the free memory.
    avail = available_mib("cpu")
    bank_mib = args.queue * args.dim * 4 / 2**20
    if bank_mib > 0.7 * avail:
        parser.error(f"--queue {args.queue} x --dim {args.dim}: the bank alone takes {bank_mib:.0f} MiB, more than "
                     f"70 % of the {avail:.0f} MiB free")
    # The fused steps' own tensors: per sample two views of in_dim = 64 floats, the encoder's 256 hidden and dim
    # outputs for each, and their gradients (~4x): refused by name rather than an allocator error mid-run.
    batch_mib = 4 * args.batch * 2 * (64 + 256 + args.dim) * 4 / 2**20
    if bank_mib + batch_mib > 0.7 * avail:
        parser.error(f"--batch {args.batch} x --dim {args.dim} (with --queue {args.queue}): the steps' tensors take "
                     f"~{bank_mib + batch_mib:.0f} MiB with the bank, more than 70 % of the {avail:.0f} MiB free")
    naive_mib = (4 * args.batch * (args.queue + 1) * 4 + 2 * bank_mib * 2**20) / 2**20
    run_naive = naive_mib <= 0.5 * avail
    if not run_naive:
        print(f"naive PyTorch skipped: its logits would take ~{naive_mib:.0f} MiB of the {avail:.0f} MiB free")
    run_demo(steps=args.steps, batch=args.batch, queue=args.queue, dim=args.dim, seed=args.seed, naive=run_naive)
    return 0


def _cmd_info(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="contrastbound info", description="backend_info() as JSON").parse_args(argv)
    from ._backend import backend_info

    print(json.dumps(backend_info(), indent=2))
    return 0


_LOCAL_COMMANDS = {"demo": _cmd_demo, "info": _cmd_info}


def exit_from_cli(fn, argv: list[str] | None = None) -> None:
    """sys.exit(fn(argv)), except that Ctrl-C ends the process by SIGINT, without a traceback (reproduce prints its
    own message first): a shell that sees a normal exit instead keeps running the script or loop that called us."""
    try:
        code = fn(argv)
    except KeyboardInterrupt as exc:
        from ._cli import Terminated

        if isinstance(exc, Terminated):
            # reproduce's SIGTERM: the signal went on to the previous handler, which did not end the process (a
            # caller's own handler): end it with SIGTERM's shell status rather than as a Ctrl-C.
            sys.exit(128 + signal.SIGTERM)
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        raise  # (not reached where SIGINT ends the process)
    except BrokenPipeError:
        # the reader went away (`contrastbound bench --list-methods | head`): end quietly, as coreutils do under
        # SIGPIPE, instead of a traceback; stdout to /dev/null so that the flush at exit does not raise again
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):  # (a replaced stdout without a file descriptor)
            pass
        sys.exit(128 + signal.SIGPIPE)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    """The command line; called without argv (the console script) it exits the process itself (exit_from_cli)."""
    if argv is None:
        exit_from_cli(_main, sys.argv[1:])
    return _main(argv)


def _main(argv: list[str]) -> int:
    argv = list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if not argv:  # a usage error, as argparse reports one: the help on stderr, status 2
        print(__doc__.strip(), file=sys.stderr)
        return 2
    if argv[0] in ("-V", "--version"):
        if len(argv) > 1:  # (a usage error, as argparse reports one)
            print(f"contrastbound: {argv[0]} takes no arguments, got {' '.join(argv[1:])}", file=sys.stderr)
            return 2
        import torch

        from . import __version__

        print(f"contrastbound {__version__} (torch {torch.__version__})")
        return 0
    command, rest = argv[0], argv[1:]
    if command in _LOCAL_COMMANDS:
        return _LOCAL_COMMANDS[command](rest)
    if command in _MODULE_COMMANDS:
        module = importlib.import_module(_MODULE_COMMANDS[command][0])
        return int(module.main(rest) or 0)
    print(f"contrastbound: unknown command {command!r}\n\n{__doc__.strip()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    exit_from_cli(_main, sys.argv[1:])
