"""Shared pieces of the reproduction: settings, determinism, progress, CSV, figures and the report."""

from __future__ import annotations

import base64
import contextlib
import csv
import dataclasses
import html
import math
import os
from typing import Any, Iterable, Sequence

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------
# Settings: one dataclass, three presets (full, --quick, the hidden --tiny used by the tests)
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    preset: str = "full"
    # bounds-vs-k / compare-bounds: closed forms, cheap at any size
    curve_classes: tuple[int, ...] = (50, 100)
    curve_kmax: int = 1000
    compare_classes: int = 10
    norm_bound: float = 1.0
    # toy (circle data)
    toy_classes: int = 10
    toy_per_class: int = 300
    toy_train_ratio: float = 0.6
    toy_ks: tuple[int, ...] = (1, 4, 16, 64, 256)
    toy_epochs: int = 60
    toy_hidden: int = 128
    toy_dim: int = 32
    # digits
    digits_ks: tuple[int, ...] = (4, 16, 64, 256, 1024)
    digits_seeds: int = 5
    digits_epochs: int = 50
    digits_eval_every: int = 10  # evaluate every n-th epoch (and the last)
    digits_per_class: int = 174  # the smallest class of load_digits: every class gets exactly this many samples
    digits_test_per_class: int = 50
    digits_hidden: int = 128
    digits_dim: int = 32
    # training, shared by toy and digits
    batch_size: int = 256
    train_threads: int = 1  # torch threads while training: small matrices, and numbers independent of the core count
    lr: float = 3e-3
    temperature: float = 1.0  # the paper's setting: normalised features at t = 1, so b = 1
    eval_anchor_repeats: int = 4  # R_cont estimates use this many anchors per sample (drawn with replacement)
    # k-scaling
    scaling_ks: tuple[int, ...] = (1024, 4096, 16384, 65536, 262144)
    scaling_batch: int = 256
    scaling_dim: int = 128
    scaling_repeats: int = 3
    scaling_threads: int = 2


PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    "quick": dict(
        toy_per_class=100, toy_epochs=10, digits_seeds=3, digits_epochs=10, digits_eval_every=10,
        scaling_ks=(1024, 4096, 16384, 65536), scaling_repeats=3,
    ),
    "tiny": dict(
        curve_classes=(5, 10), curve_kmax=40, toy_classes=4, toy_per_class=25, toy_ks=(1, 8), toy_epochs=3,
        toy_hidden=16, toy_dim=8, digits_ks=(4, 16), digits_seeds=1, digits_epochs=1, digits_eval_every=1,
        digits_per_class=30,
        digits_test_per_class=10, digits_hidden=32, digits_dim=16, scaling_ks=(256, 1024), scaling_batch=32,
        scaling_dim=16, scaling_repeats=1, eval_anchor_repeats=1,
    ),
}


def make_settings(preset: str = "full", **overrides: Any) -> Settings:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    values = dict(PRESETS[preset])
    values.update(overrides)
    unknown = set(values) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise ValueError(f"unknown settings: {sorted(unknown)}")
    return Settings(preset=preset, **values)


# ----------------------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def deterministic(seed: int):
    """Seed torch, and ask for deterministic algorithms (warn only: an op without one must not stop the run)."""
    prev_on = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_on, warn_only=prev_warn)


# ----------------------------------------------------------------------------------------------------------
# Progress bar: tqdm when it is installed and stderr is a terminal, silently nothing otherwise
# ----------------------------------------------------------------------------------------------------------


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, desc: str, enabled: bool = True):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except Exception:  # tqdm missing or broken: no bar
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)


# ----------------------------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------------------------


def write_csv(path: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for row in rows:
            w.writerow([_csv_cell(row.get(c)) for c in columns])


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    return str(v)


# ----------------------------------------------------------------------------------------------------------
# Figures: the object-oriented matplotlib API on the Agg canvas (no pyplot, no global backend switch)
# ----------------------------------------------------------------------------------------------------------


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6.0, 4.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(fig, path: str) -> None:
    fig.savefig(path, dpi=110)


REPRO_EXTRA = "pip install contrastbound[repro]"


def require_matplotlib() -> None:
    """Raise ImportError, naming the extra to install, when the figures cannot be drawn: every experiment plots, so
    this is checked before any work (it failed only when the first figure was drawn, after the computation)."""
    try:
        import matplotlib  # noqa: F401  (first: a cached submodule would be found even without its package)
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"the figures need matplotlib, an optional dependency that cannot be imported ({exc}); install the "
            f"reproduction's extras with `{REPRO_EXTRA}` (matplotlib, tqdm, scikit-learn) or `pip install matplotlib`"
        ) from exc


def _runs(ks: Sequence[int], most: int = 4) -> str:
    """Sorted integers as runs of consecutive values: [1, 2, 3, 7, 9, 10] -> '1-3, 7, 9-10'."""
    runs: list[list[int]] = []
    for k in ks:
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs]
    return ", ".join(parts[:most]) + (", ..." if len(parts) > most else "")


def _short(v: float) -> str:
    return f"{v:.0f}" if 100 <= abs(v) < 1e5 else f"{v:.3g}"


def off_scale(ax, x, y, label: str, color=None, markers: bool = False, nudge: float = 1.0) -> str:
    """``label`` with a note of the points of (x, y) outside the y-range of ``ax`` (set it first), which the axes
    clip: "(off scale: above 500 at K = 12-1000, up to 4.5e+45)". With ``markers``, each such point also gets a
    triangle at the top (or bottom) edge of the axes, in ``color``, at x times ``nudge`` (so that two series off
    scale at the same x stay apart). NaN (undefined) points are not off scale."""
    lo, hi = ax.get_ylim()
    x, y = np.asarray(x), np.asarray(y, dtype=float)
    notes = []
    for side, sel, edge, marker in (("above", y > hi, 0.985, "^"), ("below", y < lo, 0.015, "v")):
        if not sel.any():
            continue
        worst = y[sel].max() if side == "above" else y[sel].min()
        notes.append(f"{side} {hi if side == 'above' else lo:g} at K = {_runs(sorted(int(k) for k in x[sel]))}, "
                     f"{'up' if side == 'above' else 'down'} to {_short(worst)}")
        if markers:
            ax.plot(x[sel] * nudge, np.full(int(sel.sum()), edge), ls="none", marker=marker, color=color, ms=7,
                    transform=ax.get_xaxis_transform(), clip_on=False)
    return label + (f" (off scale: {'; '.join(notes)})" if notes else "")


def log_c_line(ax, C: int) -> None:
    """The horizontal line at log C: a bound of the supervised loss above it is vacuous (log C is the loss of a
    uniform guess, e.g. the mean classifier of a constant representation)."""
    ax.axhline(math.log(C), color="0.35", ls="-.", lw=1.0, label=f"log C = {math.log(C):.3f} (vacuous above)")


# ----------------------------------------------------------------------------------------------------------
# Report: one block list rendered to Markdown and to self-contained HTML
# ----------------------------------------------------------------------------------------------------------


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    if math.isnan(v):
        return "undefined"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}f}"


@dataclasses.dataclass
class Claim:
    text: str
    verdict: str  # "supported", "NOT supported", "partly supported", "measured", "undetermined (why)"
    evidence: str


class Section:
    """What one experiment contributes to the report: claims, tables, figures, notes."""

    def __init__(self, name: str, title: str):
        self.name, self.title = name, title
        self.blocks: list[tuple[str, Any]] = []
        self.claims: list[Claim] = []
        self.files: list[str] = []
        self.failed: str | None = None  # why its claims were not evaluated (an error, an interrupt)

    def text(self, s: str) -> None:
        self.blocks.append(("text", s))

    def claim(self, text: str, supported: bool | None, evidence: str, verdict: str | None = None) -> None:
        if verdict is None:
            verdict = "measured" if supported is None else ("supported" if supported else "NOT supported")
        c = Claim(text, verdict, evidence)
        self.claims.append(c)
        self.blocks.append(("claim", c))

    def trend_claim(self, text: str, ks: Sequence[int], holds: bool, evidence: str) -> None:
        """A claim about how something changes with K: with fewer than two K values there is no change to judge, so
        the verdict is undetermined rather than a vacuous "supported" (np.diff of one value is empty)."""
        if len(ks) < 2:
            self.claim(text, None, f"only K = {', '.join(map(str, ks)) or 'none'} on this grid: no change with K to "
                       "judge.", verdict="undetermined (a single K)")
        else:
            self.claim(text, holds, evidence)

    def table(self, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        cells = [[fmt(c) if not isinstance(c, str) else c for c in r] for r in rows]
        self.blocks.append(("table", (list(header), cells)))

    def figure(self, path: str, caption: str) -> None:
        self.files.append(path)
        self.blocks.append(("figure", (path, caption)))

    def csv(self, path: str) -> None:
        self.files.append(path)
        self.blocks.append(("text", f"Data: `{os.path.basename(path)}`."))


def render_markdown(title: str, preamble: Sequence[str], sections: Sequence[Section]) -> str:
    out = [f"# {title}", ""]
    out += [p + "\n" for p in preamble]
    out.append("## Summary of claims\n")
    out.append("| experiment | claim | verdict |")
    out.append("|---|---|---|")
    for s in sections:
        for c in s.claims:
            out.append(f"| {s.name} | {c.text} | **{c.verdict}** |")
        if s.failed:  # (an exception's message may hold newlines and "|": one cell)
            cell = " ".join(s.failed.split()).replace("|", "\\|")
            out.append(f"| {s.name} | (claims not evaluated: {cell}) | **not evaluated** |")
    out.append("")
    for s in sections:
        out.append(f"## {s.title}\n")
        for kind, b in s.blocks:
            if kind == "text":
                out.append(b + "\n")
            elif kind == "claim":
                out.append(f"- **Claim:** {b.text}  \n  **Verdict: {b.verdict}.** {b.evidence}\n")
            elif kind == "table":
                header, rows = b
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(r) + " |" for r in rows]
                out.append("")
            elif kind == "figure":
                path, caption = b
                escaped = caption.replace("*", "\\*")  # R_cont* would close the italics early
                out.append(f"![{escaped}]({os.path.basename(path)})\n\n*{escaped}*\n")
    return "\n".join(out)


def _inline_md(s: str) -> str:
    """The small Markdown subset used in the text blocks: `code` and **bold**."""
    s = html.escape(s)
    parts = s.split("`")
    s = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = s.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def render_html(title: str, preamble: Sequence[str], sections: Sequence[Section]) -> str:
    css = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
        "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}"
        "th{background:#eee}img{max-width:100%}.claim{margin:0.6em 0;padding:0.4em 0.8em;border-left:4px solid #888}"
        ".supported{border-color:#2a2}.not{border-color:#c22}figcaption{font-style:italic}"
    )
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{css}</style>"
           f"</head><body><h1>{html.escape(title)}</h1>"]
    out += [f"<p>{_inline_md(p)}</p>" for p in preamble]
    out.append("<h2>Summary of claims</h2><table><tr><th>experiment</th><th>claim</th><th>verdict</th></tr>")
    for s in sections:
        for c in s.claims:
            out.append(f"<tr><td>{html.escape(s.name)}</td><td style='text-align:left'>{_inline_md(c.text)}</td>"
                       f"<td><b>{html.escape(c.verdict)}</b></td></tr>")
        if s.failed:
            out.append(f"<tr><td>{html.escape(s.name)}</td><td style='text-align:left'>(claims not evaluated: "
                       f"{html.escape(s.failed)})</td><td><b>not evaluated</b></td></tr>")
    out.append("</table>")
    for s in sections:
        out.append(f"<h2>{html.escape(s.title)}</h2>")
        for kind, b in s.blocks:
            if kind == "text":
                out.append(f"<p>{_inline_md(b)}</p>")
            elif kind == "claim":
                cls = ("not" if b.verdict.lower().startswith("not")
                       else ("supported" if b.verdict == "supported" else ""))
                out.append(f"<div class='claim {cls}'><b>Claim:</b> {_inline_md(b.text)}<br><b>Verdict: "
                           f"{html.escape(b.verdict)}.</b> {_inline_md(b.evidence)}</div>")
            elif kind == "table":
                header, rows = b
                out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
                out.append("</table>")
            elif kind == "figure":
                path, caption = b
                with open(path, "rb") as fh:
                    data = base64.b64encode(fh.read()).decode("ascii")
                out.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{_inline_md(caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)
