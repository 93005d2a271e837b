"""Experiments 1 and 2: the closed-form curves of the paper's Figures 3 and 4 (no training)."""

from __future__ import annotations

import os

import numpy as np

from .. import bounds as B
from ._common import Section, Settings, fmt, log_c_line, new_figure, off_scale, save_figure, write_csv


def bounds_vs_k_rows(classes, kmax: int, norm_bound: float = 1.0) -> list[dict]:
    """Per (C, K): R_cont*, R_supv* (lower bounds of the two losses, the paper's reference curves), Delta_L, Delta_U,
    R_cont* + Delta_U and R_supv* - Delta_L (Figure 3)."""
    K = np.arange(1, kmax + 1)
    rows = []
    for C in classes:
        r_cont = B.min_contrastive_loss(K, num_classes=C, norm_bound=norm_bound)
        r_supv = B.min_supervised_loss(C, norm_bound=norm_bound)
        d_u = B.delta_upper(K, num_classes=C, norm_bound=norm_bound, form="paper")
        d_l = B.delta_lower(K, num_classes=C, norm_bound=norm_bound, form="paper")
        for i, k in enumerate(K.tolist()):
            rows.append(dict(
                C=C, K=k, R_cont_min=r_cont[i], R_supv_min=r_supv, delta_lower=d_l[i], delta_upper=d_u[i],
                upper_on_supv=r_cont[i] + d_u[i], lower_on_cont=r_supv - d_l[i],
                upper_gap=r_cont[i] + d_u[i] - r_supv, lower_gap=r_supv - d_l[i] - r_cont[i],
                interval_width=d_u[i] - d_l[i],
            ))
    return rows


BOUNDS_VS_K_COLUMNS = ["C", "K", "R_cont_min", "R_supv_min", "delta_lower", "delta_upper", "upper_on_supv",
                       "lower_on_cont", "upper_gap", "lower_gap", "interval_width"]


def run_bounds_vs_k(s: Settings, out: str, **_) -> Section:
    sec = Section("bounds-vs-k", "bounds-vs-k: the bounds on the paper's reference curves (Figure 3)")
    sec.text(
        f"For C in {list(s.curve_classes)} and K = 1 ... {s.curve_kmax} (b = {s.norm_bound:g}, uniform prior): "
        "R_cont* + Delta_U (an upper bound of the supervised loss, evaluated at the smallest contrastive loss) against "
        "R_supv*, and R_supv* - Delta_L (an upper bound of the contrastive loss, evaluated at the smallest supervised "
        "loss) against R_cont*. R_cont* = E_m log(1 + m + (K - m) e^{-2b^2}) and R_supv* = log(1 + (C - 1) e^{-2b^2}) "
        "are the paper's reference curves: lower bounds of the two losses with ||f|| <= b, attained only when every "
        "two classes are antipodal, i.e. for C = 2 (for C >= 3 the losses stay above them). So comparing the curves "
        "is not a consequence of the theorem and carries no pass/fail verdict. Delta_U and Delta_L are the paper's "
        "constants (`form=\"paper\"`)."
    )
    rows = bounds_vs_k_rows(s.curve_classes, s.curve_kmax, s.norm_bound)
    path = os.path.join(out, "bounds_vs_k.csv")
    write_csv(path, rows, BOUNDS_VS_K_COLUMNS)
    sec.csv(path)

    fig, axes = new_figure(ncols=len(s.curve_classes), nrows=2, size=(5.0, 3.4))
    table = []
    for j, C in enumerate(s.curve_classes):
        r = [x for x in rows if x["C"] == C]
        K = np.array([x["K"] for x in r])
        up = np.array([x["upper_on_supv"] for x in r])
        lo = np.array([x["lower_on_cont"] for x in r])
        rc = np.array([x["R_cont_min"] for x in r])
        rs = r[0]["R_supv_min"]
        ax = axes[0, j]
        ax.plot(K, up, label=r"$R^*_\mathrm{cont} + \Delta_U$")
        ax.axhline(rs, color="k", ls="--", label=r"$R^*_\mathrm{supv}$")
        ax.axvline(C, color="gray", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("K")
        ax.set_ylabel("loss (nats)")
        ax.set_title(f"C = {C}: upper bound of the supervised loss")
        ax.legend()
        ax = axes[1, j]
        ax.plot(K, lo, label=r"$R^*_\mathrm{supv} - \Delta_L$")
        ax.plot(K, rc, "k--", label=r"$R^*_\mathrm{cont}$")
        ax.axvline(C, color="gray", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("K")
        ax.set_ylabel("loss (nats)")
        ax.set_title(f"C = {C}: upper bound of the contrastive loss")
        ax.legend()
        ug = up - rs
        lg = lo - rc
        picks = sorted({1, min(C, K[-1]), int(K[len(K) // 10]), int(K[-1])})
        for k in picks:
            x = r[k - 1]
            table.append([C, k, x["R_cont_min"], rs, x["upper_on_supv"], x["upper_gap"], x["lower_on_cont"],
                          x["lower_gap"], x["interval_width"]])
        # Measured, not claimed: R_cont* and R_supv* are lower bounds, attained together only for C = 2, so neither
        # inequality follows from the theorem for C >= 3 (and a negative margin would not contradict the paper).
        sec.claim(
            f"C = {C}: how R_cont* + Delta_U compares with R_supv*, and R_supv* - Delta_L with R_cont*, over K (the "
            "paper's reference curves; lower bounds of the losses, not attained for C >= 3).",
            None,
            f"R_cont* + Delta_U - R_supv* is {'>= 0' if ug.min() >= -1e-12 else '< 0 somewhere'}: "
            f"{fmt(ug[0])} at K = 1, {fmt(ug[-1])} at K = {int(K[-1])} (smallest {fmt(ug.min())}, at K = "
            f"{int(K[ug.argmin()])}); as K grows it levels off near its limit 2 log cosh(b^2) = "
            f"{fmt(2 * np.log(np.cosh(s.norm_bound ** 2)))} rather than vanishing. R_supv* - Delta_L - R_cont* is "
            f"{'>= 0' if lg.min() >= -1e-12 else '< 0 somewhere'}: {fmt(lg[0])} at K = 1, {fmt(lg[-1])} at K = "
            f"{int(K[-1])} (smallest {fmt(lg.min())}, at K = {int(K[lg.argmin()])}).",
        )
        dec = bool(np.all(np.diff(ug) <= 1e-12))
        sec.trend_claim(
            f"C = {C}: the upper bound's gap R_cont* + Delta_U - R_supv* decreases as K grows.",
            [int(k) for k in K],
            dec,
            f"gap {fmt(ug[0])} at K = 1, {fmt(ug[min(C, len(ug)) - 1])} at K = {min(C, len(ug))}, {fmt(ug[-1])} at "
            f"K = {int(K[-1])}; " + ("monotone non-increasing over the whole grid." if dec else
                                     f"not monotone: it increases at {int(np.sum(np.diff(ug) > 1e-12))} of "
                                     f"{len(ug) - 1} steps (smallest gap {fmt(ug.min())} at K = "
                                     f"{int(K[ug.argmin()])})."),
        )
        wid = np.array([x["interval_width"] for x in r])
        sec.trend_claim(
            f"C = {C}: the width Delta_U - Delta_L of the interval shrinks with K towards 4 log cosh(b^2).",
            [int(k) for k in K],
            bool(np.all(np.diff(wid) < 0)),
            f"width {fmt(wid[0])} at K = 1, {fmt(wid[-1])} at K = {int(K[-1])}; limit "
            f"{fmt(4 * np.log(np.cosh(s.norm_bound ** 2)))}. The lower-side gap R_supv* - Delta_L - R_cont* is "
            f"{fmt(lg[0])} at K = 1 and {fmt(lg[-1])} at K = {int(K[-1])}.",
        )
    path = os.path.join(out, "bounds_vs_k.png")
    save_figure(fig, path)
    sec.table(["C", "K", "R_cont*", "R_supv*", "R_cont*+Delta_U", "upper gap", "R_supv*-Delta_L", "lower gap",
               "width"], table)
    sec.figure(path, "Figure 3: top, R_cont* + Delta_U (the upper bound of the supervised loss at the contrastive "
                     "loss's lower bound R_cont*) against R_supv* (dashed); it falls towards R_supv* as K grows and "
                     "levels off about 2 log cosh(b^2) above it. Bottom, R_supv* - Delta_L against R_cont* (dashed). "
                     "Dotted: K = C.")
    return sec


def compare_bounds_rows(C: int, kmax: int, norm_bound: float = 1.0) -> list[dict]:
    """Per K: coefficient of R_cont and value (at R_cont = R_cont*) of each upper bound (Figure 4)."""
    K = np.arange(1, kmax + 1)
    r = B.min_contrastive_loss(K, num_classes=C, norm_bound=norm_bound)
    log_1mtau = B.collision_probability(K, num_classes=C, log=True)
    log_ups = B.coupon_collector_probability(K + 1, num_classes=C, log=True)
    H = B.harmonic_number(C - 1)
    with np.errstate(over="ignore", divide="ignore"):
        coef_arora = np.where(K >= C, np.exp(-(log_1mtau + log_ups)), np.nan)
        coef_ns = np.where(K >= C, 2.0 * np.exp(-log_ups), np.nan)
        coef_ash = 2.0 * np.maximum(1.0, 2.0 * (C - 1) * H / K) * np.exp(-log_1mtau)
    ours = r + B.delta_upper(K, num_classes=C, norm_bound=norm_bound, form="paper")
    ar = B.arora(r, K, num_classes=C)
    ns = B.nozawa_sato(r, K, num_classes=C)
    ash = B.ash(r, K, num_classes=C)
    rows = []
    for i, k in enumerate(K.tolist()):
        rows.append(dict(
            C=C, K=k, R_cont_min=r[i], coef_ours=1.0, coef_arora=coef_arora[i], coef_nozawa_sato=coef_ns[i],
            coef_ash=coef_ash[i], bound_ours=ours[i], bound_arora=ar[i], bound_nozawa_sato=ns[i], bound_ash=ash[i],
        ))
    return rows


COMPARE_COLUMNS = ["C", "K", "R_cont_min", "coef_ours", "coef_arora", "coef_nozawa_sato", "coef_ash", "bound_ours",
                   "bound_arora", "bound_nozawa_sato", "bound_ash"]
_NAMES = {"ours": "ours (Bao et al.)", "arora": "Arora et al.", "nozawa_sato": "Nozawa & Sato", "ash": "Ash et al."}


def run_compare_bounds(s: Settings, out: str, **_) -> Section:
    C = s.compare_classes
    sec = Section("compare-bounds", "compare-bounds: the earlier upper bounds (the paper's Figure 4)")
    sec.text(
        f"For C = {C}, K = 1 ... {s.curve_kmax} (b = {s.norm_bound:g}): the coefficient of R_cont in each upper "
        "bound of the supervised loss, and each bound's value at R_cont = R_cont* (as in the authors' "
        "`compare_upper_bound.py`). Arora et al. and Nozawa & Sato are shown only for K >= C (undefined below); Ash "
        "et al. uses the exact harmonic number H_{C-1} (the authors' script uses log(C-1) + 0.577). 'Vacuous' below "
        f"means larger than log C = {fmt(np.log(C))}, the supervised loss of a uniform guess (e.g. the mean classifier "
        "of a constant representation)."
    )
    rows = compare_bounds_rows(C, s.curve_kmax, s.norm_bound)
    path = os.path.join(out, "compare_bounds.csv")
    write_csv(path, rows, COMPARE_COLUMNS)
    sec.csv(path)
    K = np.array([x["K"] for x in rows])
    fig, axes = new_figure(ncols=2, size=(5.5, 4.2))
    for j, kind in enumerate(("coef", "bound")):
        ax = axes[0, j]
        # A fixed range (the earlier bounds reach ~1e46 at K = 1000, which would flatten everything else); what
        # leaves it is named in the legend.
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(0.5, 500)
        ax.set_xlabel("K")
        for name in ("ours", "arora", "nozawa_sato", "ash"):
            y = np.array([x[f"{kind}_{name}"] for x in rows], dtype=float)
            ok = np.isfinite(y)
            (line,) = ax.plot(K[ok], y[ok])
            line.set_label(off_scale(ax, K[ok], y[ok], _NAMES[name]))
        if kind == "bound":
            log_c_line(ax, C)
        ax.axvline(C, color="gray", ls=":", lw=0.8)
        ax.set_ylabel("coefficient" if kind == "coef" else "bound (nats)")
        ax.set_title("coefficient of $R_\\mathrm{cont}$" if kind == "coef" else "upper bound at $R^*_\\mathrm{cont}$")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17))  # below: the curves fill the axes
    path = os.path.join(out, "compare_bounds.png")
    save_figure(fig, path)

    logC = float(np.log(C))
    ours = np.array([x["bound_ours"] for x in rows])
    table = []
    for k in sorted({1, C - 1 if C > 1 else 1, C, 2 * C, 100, s.curve_kmax} & set(K.tolist())):
        x = rows[k - 1]
        table.append([k, x["coef_arora"], x["coef_nozawa_sato"], x["coef_ash"], x["bound_ours"], x["bound_arora"],
                      x["bound_nozawa_sato"], x["bound_ash"]])
    sec.table(["K", "coef Arora", "coef N&S", "coef Ash", "ours", "Arora", "N&S", "Ash"], table)
    # Each bound's K where it has a value (inf counts as one: a coefficient that overflows), from the data.
    has_value = {name: ~np.isnan(np.array([x[f"bound_{name}"] for x in rows], dtype=float))
                 for name in ("arora", "nozawa_sato", "ash")}
    below_c = K < C
    undefined_ok = all(np.array_equal(has_value[name], ~below_c) for name in ("arora", "nozawa_sato"))
    everywhere_ok = bool(has_value["ash"].all() and np.all(np.isfinite(ours)))

    def where_defined(name):
        v = K[has_value[name]]
        return "no K" if v.size == 0 else f"{v.size} of {K.size} values of K, K = {int(v.min())} ... {int(v.max())}"

    sec.claim(
        f"Arora et al. and Nozawa & Sato are undefined for K < C = {C}; ours and Ash et al. are defined for every K.",
        bool(undefined_ok and everywhere_ok),
        f"a value at: Arora et al. {where_defined('arora')}; Nozawa & Sato {where_defined('nozawa_sato')}; Ash et al. "
        f"{where_defined('ash')}; ours finite at {int(np.isfinite(ours).sum())} of {K.size}.",
    )
    for name in ("arora", "nozawa_sato", "ash"):
        other = np.array([x[f"bound_{name}"] for x in rows], dtype=float)
        ok = ~np.isnan(other)
        smaller = ours[ok] <= other[ok]
        ratio = other[ok] / ours[ok]
        vac = other[ok] > logC
        kk = K[ok]
        if not ok.any():  # (K = 1 ... curve_kmax all below C: nothing to compare, not a vacuous "supported")
            sec.claim(f"Ours is smaller than {_NAMES[name]} wherever {_NAMES[name]} is defined.", None,
                      f"{_NAMES[name]} is defined at no K of this grid (K = 1 ... {int(K.max())}, C = {C}).",
                      verdict=f"undetermined ({_NAMES[name]} defined at no K)")
        else:
            sec.claim(
                f"Ours is smaller than {_NAMES[name]} wherever {_NAMES[name]} is defined.",
                bool(smaller.all()),
                f"{int(smaller.sum())} of {int(ok.sum())} values of K; ratio {_NAMES[name]} / ours from "
                f"{fmt(ratio.min())} (K = {int(kk[ratio.argmin()])}) to {fmt(ratio.max())} "
                f"(K = {int(kk[ratio.argmax()])}).",
            )
        tight = ours <= logC
        vac_or_undef = np.isnan(other) | (other > logC)
        both = tight & vac_or_undef
        sec.claim(
            f"Where ours is non-vacuous (<= log C), {_NAMES[name]} is vacuous or undefined.",
            bool(tight.any() and np.all(vac_or_undef[tight])),
            f"ours <= log C at {int(tight.sum())} of {len(ours)} values of K (from K = "
            f"{int(K[tight].min()) if tight.any() else '-'}); at {int(both.sum())} of them {_NAMES[name]} is vacuous "
            f"or undefined; {_NAMES[name]} exceeds log C at {int(vac[:].sum())} of the {int(ok.sum())} K where it is "
            f"defined (ours ranges over [{fmt(ours.min())}, {fmt(ours.max())}]).",
        )
    sec.figure(path, "Figure 4: left, the coefficient of R_cont in each upper bound; right, each bound at "
                     "R_cont = R_cont* and log C (dash-dot: a bound above it is vacuous). Log axes cut at 0.5 and 500, "
                     "the legend names what leaves that range; dotted: K = C; lines shown only where defined.")
    return sec
