"""`contrastbound reproduce`: the claims of Bao, Nagano & Nozawa (ICML 2022), measured here, with plots and a report.

    contrastbound reproduce [EXPERIMENT ...] [--out DIR] [--quick] [--device cpu|cuda] [--seed N] [--no-progress]
                            [--strict]

Experiments (all five by default): bounds-vs-k (Figure 3), compare-bounds (Figure 4), toy (Figures 5 and 6),
digits (Figure 1, needs scikit-learn) and k-scaling (fused against naive PyTorch). Writes one PNG per figure, one
CSV per experiment, report.md and report.html (images inline) under DIR (default ./contrastbound-results).
While a run is in progress, report.md and report.html are a placeholder saying so (when it was started), which the
final report replaces: a run killed outright leaves no earlier run's report beside its new files.
See docs/REPRODUCE.md. Exit status: 0 once the report is written (with --strict: 3 if a claim is NOT supported),
1 if an experiment failed (the report is still written), the output folder cannot be written or matplotlib (the
figures; `pip install contrastbound[repro]`) cannot be imported (both checked before any work), 2 for bad
arguments. On Ctrl-C the report of what ran is written, marked as interrupted, and the process ends by SIGINT
(status 130 in a shell, which then stops a loop over runs too; run() raises KeyboardInterrupt after writing it).
SIGTERM (`timeout`, CI cancellation, Slurm) takes the same path while main() runs (its handler raises
KeyboardInterrupt): the report, marked as interrupted by SIGTERM, is written, then main() restores the previous
handler and sends SIGTERM to the process again, so that with the default disposition it ends by SIGTERM (status
143 in a shell) after writing the report; a second SIGTERM meanwhile acts at once as the previous handler would.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import sys
import threading
import time
from typing import Any, Sequence

import torch

from .._cli import Terminated, out_folder_problem, sigterm_as_interrupt

from ._common import (
    REPRO_EXTRA, Section, Settings, deterministic, make_settings, render_html, render_markdown,
    require_matplotlib,
)

__all__ = ["EXPERIMENTS", "main", "run", "make_settings", "Settings", "Terminated"]

EXPERIMENTS = ("bounds-vs-k", "compare-bounds", "toy", "digits", "k-scaling")


def _runner(name: str):
    # imported lazily: kscaling is also run as `python -m contrastbound.reproduce.kscaling` by its subprocesses
    if name == "bounds-vs-k":
        from .curves import run_bounds_vs_k as fn
    elif name == "compare-bounds":
        from .curves import run_compare_bounds as fn
    elif name == "toy":
        from .training import run_toy as fn
    elif name == "digits":
        from .training import run_digits as fn
    elif name == "k-scaling":
        from .kscaling import run_k_scaling as fn
    else:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    return fn


class _HeldSignals:
    """Ctrl-C (SIGINT) and SIGTERM held back between the experiments and while the report is written: a signal
    that arrives then is recorded, and release() puts the previous handlers back and raises it again, so that it
    takes effect where run() handles it (at the next experiment's start, as an interruption of that one, or after
    the report is written). One that arrived just after the last experiment had left the placeholder as the report.
    Python-level handlers (a blocked signal mask would not do: any other thread, such as torch's OpenMP workers,
    takes a process-directed signal); only in the main thread, and not where a signal is ignored."""

    def __init__(self) -> None:
        self._main = threading.current_thread() is threading.main_thread()
        self._saved: dict[int, Any] = {}
        self._pending: list[int] = []

    def _record(self, signum, frame) -> None:
        if signum not in self._pending:
            self._pending.append(signum)

    def hold(self, unheld: tuple[int, ...] = ()) -> None:
        """unheld: signals left as they are (after a SIGTERM interruption, SIGTERM: its second acts at once)."""
        if not self._main or self._saved:
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            if sig in unheld:
                continue
            previous = signal.getsignal(sig)
            if previous not in (signal.SIG_IGN, None):  # (None: a handler not installed from Python)
                self._saved[sig] = previous
                signal.signal(sig, self._record)

    def release(self) -> None:
        saved, self._saved = self._saved, {}
        for sig, previous in saved.items():
            signal.signal(sig, previous)
        pending, self._pending = self._pending, []
        for sig in pending:
            signal.raise_signal(sig)


def _write_placeholder(out: str, experiments: Sequence[str], preset: str) -> None:
    """report.md and report.html saying that a run is in progress, so that no earlier run's report stays beside
    this run's files if it is killed before writing its own (SIGKILL, a lost node); the report overwrites them."""
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [
        f"A `contrastbound reproduce` run (experiments {', '.join(experiments)}; preset `{preset}`; process "
        f"{os.getpid()} on {platform.node() or 'this machine'}) started at {when} and has not finished.",
        "Its report replaces this file when it ends, even when it is interrupted (Ctrl-C, SIGTERM). If this file is "
        "still here after the run ended, the run was killed before writing its report: the other files in this "
        "folder may be from it or from an earlier run.",
    ]
    title = "contrastbound reproduce: run in progress (not finished)"
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(render_markdown(title, lines, []))
    with open(os.path.join(out, "report.html"), "w") as fh:
        fh.write(render_html(title, lines, []))


def run(
    experiments: Sequence[str] = EXPERIMENTS,
    out: str = "contrastbound-results",
    settings: Settings | None = None,
    device: str = "cpu",
    seed: int = 0,
    show_progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Run the experiments, write their files and the report; return paths, sections and wall times.

    Before any work: a bad experiment name raises ValueError, a missing CUDA device RuntimeError, and matplotlib
    that cannot be imported ImportError (every experiment draws figures). Then report.md/report.html become a
    placeholder (a run in progress) until the report replaces them. A KeyboardInterrupt (Ctrl-C, or SIGTERM under
    main()) during an experiment still writes the report, marked, and is then raised again; one that arrives
    between experiments interrupts the next, and one while the report is written is raised after it (see
    _HeldSignals).
    """
    settings = settings or make_settings("full")
    for e in experiments:
        _runner(e)  # fail on a bad name before any work
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch.cuda.is_available() is False")
    require_matplotlib()
    held = _HeldSignals()
    held.hold()
    try:
        return _run_held(experiments, out, settings, dev, seed, show_progress, log, held)
    finally:
        held.release()  # (where an error ends the run: a signal held meanwhile acts now)


def _run_held(experiments, out, settings, dev, seed, show_progress, log, held: _HeldSignals) -> dict[str, Any]:
    """run() from the placeholder on, with Ctrl-C and SIGTERM held (see _HeldSignals) except during experiments."""
    os.makedirs(out, exist_ok=True)
    if "digits" in experiments:  # (said now: it failed only when its turn came, after the others' minutes)
        try:
            import sklearn.datasets  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - a broken install (a numpy ABI mismatch: ValueError) alike
            log("[reproduce] note: the 'digits' experiment needs scikit-learn, which cannot be imported here "
                f"({type(exc).__name__}: {exc}; `pip install scikit-learn`, or `{REPRO_EXTRA}`): it will be reported "
                "as failed; the others run")
    started = time.time()
    _write_placeholder(out, experiments, settings.preset)
    sections: list[Section] = []
    walls: dict[str, float] = {}
    failed: dict[str, str] = {}
    interrupted: str | None = None
    cause = "Ctrl-C"
    t_all = time.perf_counter()
    for n_done, e in enumerate(experiments):
        t0 = time.perf_counter()
        log(f"[reproduce] {e} ...")
        try:
            held.release()  # (a signal held since the last experiment acts here: as this one's interruption)
            with deterministic(seed):
                sec = _runner(e)(settings, out, seed=seed, device=dev, show_progress=show_progress)
            held.hold()
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - one failure must not cost the report
            # (after a SIGTERM interruption SIGTERM is not held: sigterm_as_interrupt has put the previous handler
            # back, so a second SIGTERM while the report is written acts at once, as documented; it was held, and
            # acted only once the report was done)
            held.hold(unheld=(signal.SIGTERM,) if isinstance(exc, Terminated) else ())
            walls[e] = time.perf_counter() - t0
            if isinstance(exc, KeyboardInterrupt):
                # Ctrl-C (or SIGTERM, under main()): the report is still written (marked), so that no placeholder
                # or earlier run's report sits beside this run's new files.
                interrupted = e
                cause = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
                failed[e] = f"interrupted ({cause})"
                log(f"[reproduce] {e}: INTERRUPTED after {walls[e]:.1f} s; writing the report of what ran")
            else:
                failed[e] = f"{type(exc).__name__}: {exc}"
                log(f"[reproduce] {e}: FAILED after {walls[e]:.1f} s: {failed[e]}")
            sec = Section(e, f"{e} ({'interrupted' if interrupted else 'failed'})")
            sec.failed = failed[e]
            sec.text(f"This experiment {'was interrupted' if interrupted else 'failed: ' + failed[e]}. "
                     "Its claims are not evaluated.")
            sections.append(sec)
            if interrupted:
                skipped = list(experiments[n_done + 1 :])
                if skipped:
                    failed.update({x: "not run (interrupted before it)" for x in skipped})
                break
            continue
        walls[e] = time.perf_counter() - t0
        sec.text(f"Wall time of this experiment: {walls[e]:.1f} s.")
        sections.append(sec)
        n_ok = sum(c.verdict == "supported" for c in sec.claims)
        n_no = sum(c.verdict.startswith("NOT") for c in sec.claims)
        log(f"[reproduce] {e}: {walls[e]:.1f} s; claims supported {n_ok}, not supported {n_no}, "
            f"other {len(sec.claims) - n_ok - n_no}")
    total = time.perf_counter() - t_all
    from .. import _backend

    try:
        backend = _backend.backend_info()
    except Exception as exc:  # the report must not fail on this
        backend = {"error": str(exc)}
    pre = [
        "Bao, Nagano & Nozawa, \"On the Surrogate Gap between Contrastive and Supervised Losses\" (ICML 2022): "
        "for every K, R_cont + Delta_L <= R_supv <= R_cont + Delta_U; the gap shrinks as K grows; earlier bounds "
        "(Arora et al. 2019, Nozawa & Sato 2021, Ash et al. 2022) are vacuous or undefined where this one is tight. "
        "Each claim below is stated with the numbers that support or contradict it.",
        f"Run: experiments {', '.join(experiments)}; preset `{settings.preset}`; seed {seed}; device {dev}; torch "
        f"{torch.__version__}; {torch.get_num_threads()} torch threads; Python {platform.python_version()} on "
        f"{platform.machine()}; backend {backend}. Total wall time {total:.1f} s.",
    ]
    if interrupted:
        not_run = list(experiments[list(experiments).index(interrupted) + 1 :])
        pre.insert(0, f"**INTERRUPTED ({cause}) during {interrupted}**: this report covers only the experiments "
                      f"before it{'; not run: ' + ', '.join(not_run) if not_run else ''}.")
    # Files an earlier run left in this folder (not rewritten now): named, so that they are not read as this run's.
    # Only names an experiment writes (<experiment>[_*].csv / .png): other files of a folder given as --out are not
    # the report's business.
    stems = [e.replace("-", "_") for e in EXPERIMENTS]

    def ours(f: str, of: Sequence[str] = stems) -> bool:
        stem, dot, ext = f.rpartition(".")
        return dot == "." and ext in ("csv", "png") and any(stem == e or stem.startswith(e + "_") for e in of)

    def written(f: str) -> bool:  # (by this run)
        return os.path.getmtime(os.path.join(out, f)) >= started - 1.0

    files = [f for f in os.listdir(out) if os.path.isfile(os.path.join(out, f)) and ours(f)]
    if interrupted:
        # what the interrupted experiment wrote before the signal: its report section has no claims, so they were
        # left unnamed beside the report (a whole CSV of it, say; a CLI audit's find)
        partial = sorted(f for f in files if ours(f, [interrupted.replace("-", "_")]) and written(f))
        if partial:
            pre.insert(1, f"Files {interrupted} wrote before it was interrupted (no claim checked them; they may be "
                          f"incomplete): {', '.join(partial)}.")
    stale = sorted(f for f in files if not written(f))
    if stale:
        pre.append(f"Files in this folder from an earlier run, not part of this report: {', '.join(stale)}.")
        log(f"[reproduce] note: {len(stale)} file(s) in {out} are from an earlier run and not in this report: "
            f"{', '.join(stale[:8])}{' ...' if len(stale) > 8 else ''}")
    md = render_markdown("contrastbound reproduce: report", pre, sections)
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(md)
    with open(os.path.join(out, "report.html"), "w") as fh:
        fh.write(render_html("contrastbound reproduce: report", pre, sections))
    log(f"[reproduce] wrote {os.path.join(out, 'report.md')} and report.html ({total:.1f} s)")
    try:
        held.release()  # a signal held while the report was written acts now, after it
    except KeyboardInterrupt as exc:
        if not interrupted:  # (else a second signal: the interrupt below is raised anyway)
            late = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
            raise type(exc)(f"interrupted after the last experiment ({late}); the report, complete, is in {out}") \
                from None
    if interrupted:  # the report of what ran is written; the caller's loop or script must stop as well
        earlier = [f"; {e} had failed ({m})" for e, m in failed.items() if e in walls and e != interrupted]
        raise (Terminated if cause == "SIGTERM" else KeyboardInterrupt)(
            f"interrupted during {interrupted} ({cause}); the report of what ran is in {out}" + "".join(earlier))
    return dict(out=out, sections=sections, wall_s=walls, total_s=total, failed=failed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="contrastbound reproduce",
        description="Reproduce the claims of Bao, Nagano & Nozawa (ICML 2022) with plots and a report.",
    )
    parser.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                        help=f"any of {', '.join(EXPERIMENTS)} (default: all)")
    parser.add_argument("--out", default="contrastbound-results",
                        help="output folder (default ./contrastbound-results)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller grids: all five in 20-90 s on 2 CPU cores (by the machine's load)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the losses and the k-scaling benchmark run (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every experiment, in [0, 2^63) (default 0)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the tests' grid
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 3 when a claim is NOT supported (default: 0 once the report is written)")
    # (intermixed: experiments may follow options, `reproduce bounds-vs-k --out X compare-bounds`)
    args = parser.parse_intermixed_args(argv)
    bad = [e for e in args.experiments if e not in EXPERIMENTS]
    if bad:
        # (quoted: an empty name printed as nothing, "unknown experiment(s) ; choose from ...")
        parser.error(f"unknown experiment(s) {', '.join(map(repr, bad))}; choose from {', '.join(EXPERIMENTS)}")
    preset = "tiny" if args.tiny else ("quick" if args.quick else "full")
    experiments = list(dict.fromkeys(args.experiments)) or list(EXPERIMENTS)
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be an integer in [0, 2^63), got {args.seed}")
    if not args.out or (os.path.exists(args.out) and not os.path.isdir(args.out)):
        parser.error(f"--out must name a folder, got {args.out!r}")
    if args.device == "cuda" and not torch.cuda.is_available():  # before --out is made
        parser.error("--device cuda: no CUDA device is available to this torch")
    try:  # every experiment draws figures: checked before any work (it failed after all of it), like --out below
        require_matplotlib()
    except ImportError as exc:
        print(f"contrastbound reproduce: error: {exc}", file=sys.stderr)
        return 1
    problem = out_folder_problem(args.out)  # before the experiments, not when the first one writes (minutes later)
    if problem is not None:
        print(f"contrastbound reproduce: error: --out {args.out!r} is not a folder that can be written: {problem}",
              file=sys.stderr)
        return 1
    try:
        with sigterm_as_interrupt():
            res = run(experiments, args.out, make_settings(preset), args.device, args.seed,
                      show_progress=not args.no_progress)
    except (RuntimeError, OSError, ImportError) as exc:
        print(f"contrastbound reproduce: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        # Re-raised after the message: a shell loop over runs must see the Ctrl-C too (the command-line entry
        # then ends the process by SIGINT, status 130, without a traceback).
        print(f"contrastbound reproduce: {str(exc) or 'interrupted'}", file=sys.stderr)  # (a bare one's str is '')
        if isinstance(exc, Terminated):
            # The report is written; now the SIGTERM does what it would have done without our handler (now
            # restored): with the default disposition the process ends here, by SIGTERM.
            sys.stdout.flush()
            sys.stderr.flush()
            signal.raise_signal(signal.SIGTERM)
        raise
    for e, msg in res["failed"].items():
        print(f"contrastbound reproduce: error: {e} failed ({msg}); the other experiments and the report were "
              "written", file=sys.stderr)
    if res["failed"]:
        return 1
    refuted = [(s.name, c.text) for s in res["sections"] for c in s.claims if c.verdict.startswith("NOT")]
    if args.strict and refuted:
        for name, text in refuted:
            print(f"contrastbound reproduce: NOT supported ({name}): {text}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    from contrastbound.__main__ import exit_from_cli

    exit_from_cli(main)
