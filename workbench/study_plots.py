"""Plots for study reports (matplotlib Agg, returned as PNG bytes for data: URIs).

Every plot here is drawn from stored numbers only, so `workbench report RUN_DIR` redraws
them without a model: predicted-vs-measured panels, per-case distributions, dose-response
curves, layer curves, heatmaps, and the cross-study calibration and leaderboard charts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workbench.bootstrap import Metric

@dataclass(frozen=True)
class Figure:
    """A PNG for the report, with its caption (saved as `name` in the study folder)."""

    name: str
    caption: str
    png: bytes


VERDICT_COLORS = {"held": "#0a7a2f", "failed": "#b00020", "inconclusive": "#b07d00"}


def figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(width, height), dpi=110, layout="constrained")


def png(fig: Any) -> bytes:
    from workbench.plotting import png_bytes

    return png_bytes(fig)


def _fig(name: str, caption: str, mpl_fig: Any) -> Figure:
    return Figure(name, caption, png(mpl_fig))


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def prediction_panel(ax: Any, verdict: Mapping[str, Any], rule: Mapping[str, Any] | None = None) -> None:
    """One prediction: the region where it holds (green), predicted size (blue), measured CI (verdict colour)."""
    rule = rule or {}
    measured, ci = verdict.get("measured"), verdict.get("ci") or [None, None]
    size = verdict.get("size")
    xs = [v for v in (measured, *ci) if _finite(v)]
    if isinstance(size, (list, tuple)):
        xs += [v for v in size if _finite(v)]
    elif _finite(size):
        xs.append(size)
    for key in ("threshold", "low", "high"):
        if _finite(rule.get(key)):
            xs.append(rule[key])
    lo, hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    pad = (hi - lo) * 0.15 or max(abs(hi), 1.0) * 0.15
    lo, hi = lo - pad, hi + pad
    kind = rule.get("kind")
    if kind == "ci_above":
        ax.axvspan(rule["threshold"], hi, color="#0a7a2f", alpha=0.10, lw=0)
        ax.axvline(rule["threshold"], color="#0a7a2f", lw=1, ls="--")
    elif kind == "ci_below":
        ax.axvspan(lo, rule["threshold"], color="#0a7a2f", alpha=0.10, lw=0)
        ax.axvline(rule["threshold"], color="#0a7a2f", lw=1, ls="--")
    elif kind == "ci_within":
        ax.axvspan(rule["low"], rule["high"], color="#0a7a2f", alpha=0.10, lw=0)
    if isinstance(size, (list, tuple)) and all(_finite(v) for v in size):
        ax.plot(size, [0.35, 0.35], color="#1f5fbf", lw=4, alpha=0.7, solid_capstyle="butt", label="predicted")
    elif _finite(size):
        ax.plot([size], [0.35], marker="D", color="#1f5fbf", ms=6, ls="", label="predicted")
    color = VERDICT_COLORS.get(verdict.get("verdict", ""), "#444")
    if _finite(measured):
        if _finite(ci[0]) and _finite(ci[1]):
            ax.errorbar([measured], [-0.35], xerr=[[measured - ci[0]], [ci[1] - measured]], fmt="o", color=color,
                        capsize=4, ms=6, label="measured (95% CI)")
        else:
            ax.plot([measured], [-0.35], "o", color=color, ms=6, label="measured")
    ax.set_xlim(lo, hi)
    ax.set_ylim(-1, 1)
    ax.set_yticks([])
    ax.tick_params(axis="x", labelsize=7)
    title = f"[{verdict.get('verdict', '?')}] {verdict.get('id', '')}: {verdict.get('metric', '')}"
    ax.set_title(title, fontsize=8, loc="left", color=color)


def verdict_figure(results: Mapping[str, Any]) -> Figure | None:
    """Predicted vs measured, one panel per prediction of a study."""
    verdicts = results.get("verdicts") or []
    if not verdicts:
        return None
    rules = {p["id"]: p["rule"] for p in results["prediction"]["predictions"]}
    fig = figure(7.0, 0.95 * len(verdicts) + 0.4)
    axes = fig.subplots(len(verdicts), 1, squeeze=False)[:, 0]
    for ax, v in zip(axes, verdicts):
        prediction_panel(ax, v, rules.get(v["id"]))
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncol=3, frameon=False)
    return _fig("fig_predicted_vs_measured.png",
                "Predicted (blue: size stated before the run) vs measured (dot with 95% bootstrap CI; colour = "
                "verdict). Green band: where the stated rule says the prediction holds.", fig)


def distribution_figures(results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                         metrics: Sequence[Metric]) -> list[Figure]:
    """Every case's value of each single-column metric a prediction names, by seed."""
    named = {v["metric"] for v in results.get("verdicts", [])}
    chosen = [m for m in metrics if m.name in named and m.combine is None]
    if not chosen or not rows:
        return []
    import numpy as np

    fig = figure(7.0, 1.5 * len(chosen) + 0.4)
    axes = fig.subplots(len(chosen), 1, squeeze=False)[:, 0]
    seeds = sorted({r["seed"] for r in rows})
    rng = np.random.default_rng(0)
    for ax, metric in zip(axes, chosen):
        values = metric.per_row(rows)
        for j, seed in enumerate(seeds):
            ys = [v for v, r in zip(values, rows) if r["seed"] == seed and v is not None]
            ax.scatter(ys, j + rng.uniform(-0.25, 0.25, len(ys)), s=9, alpha=0.6)
        m = results["metrics"].get(metric.name, {})
        if _finite(m.get("value")):
            ax.axvline(m["value"], color="black", lw=1)
            lo, hi = m["ci"]
            if _finite(lo) and _finite(hi):
                ax.axvspan(lo, hi, color="black", alpha=0.08, lw=0)
        ax.set_yticks(range(len(seeds)))
        ax.set_yticklabels([f"seed {s}" for s in seeds], fontsize=6)
        ax.tick_params(axis="x", labelsize=7)
        n = sum(v is not None for v in values)
        ax.set_title(f"{metric.name}: every case (n={n}); line = mean, band = 95% CI", fontsize=8, loc="left")
    return [_fig("fig_distributions.png", "Distributions: every case of every seed, not the best ones.", fig)]


def curves(name: str, caption: str, series: Mapping[str, Sequence[tuple[float, float, float | None, float | None]]], *,
           xlabel: str, ylabel: str, logx: bool = False, title: str = "", xticks: Sequence[Any] | None = None) -> Figure:
    """Lines with CI bands: series label -> [(x, y, ci_low, ci_high)] (dose-response, layer curves)."""
    fig = figure(6.0, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    for label, pts in series.items():
        pts = [p for p in pts if _finite(p[1])]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        line = ax.plot(xs, ys, marker="o", label=label)[0]
        band = [(p[0], p[2], p[3]) for p in pts if _finite(p[2]) and _finite(p[3])]
        if band:
            ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band], color=line.get_color(),
                            alpha=0.15, lw=0)
    if logx:
        ax.set_xscale("log")
    if xticks is not None:
        ax.set_xticks(list(xticks))
        ax.set_xticklabels([str(x) for x in xticks])
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    return _fig(name, caption, fig)


def bars(name: str, caption: str, groups: Sequence[str], series: Mapping[str, Sequence[tuple[float | None, float | None, float | None]]],
         *, ylabel: str, published: Mapping[str, Sequence[float | None]] | None = None, title: str = "") -> Figure:
    """Grouped bars with CI whiskers: series label -> [(value, lo, hi)] per group; optional published markers."""
    import numpy as np

    fig = figure(7.0, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    n = max(1, len(series))
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (label, vals) in enumerate(series.items()):
        ys = [v[0] if _finite(v[0]) else 0.0 for v in vals]
        err = [[max(0.0, v[0] - v[1]) if _finite(v[0]) and _finite(v[1]) else 0.0 for v in vals],
               [max(0.0, v[2] - v[0]) if _finite(v[0]) and _finite(v[2]) else 0.0 for v in vals]]
        ax.bar(x + (i - (n - 1) / 2) * width, ys, width, yerr=err, capsize=2, label=label)
    if published:
        for i, (label, vals) in enumerate(published.items()):
            for g, v in enumerate(vals):
                if _finite(v):
                    ax.plot([g - 0.4, g + 0.4], [v, v], color="black", lw=1.2, ls=":",
                            label=label if g == next(k for k, w in enumerate(vals) if _finite(w)) else None)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, frameon=False, ncol=3)
    return _fig(name, caption, fig)


def heatmap(name: str, caption: str, data: Sequence[Sequence[float]], *, rows: Sequence[str], cols: Sequence[str],
            title: str = "", cmap: str = "Greens", colorbar: str = "") -> Figure:
    import numpy as np

    arr = np.array(data, dtype=float)
    fig = figure(0.5 * len(cols) + 2.6, 0.28 * len(rows) + 1.0)
    ax = fig.add_subplot(1, 1, 1)
    img = ax.imshow(arr, aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=7)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, fontsize=7)
    if title:
        ax.set_title(title, fontsize=8)
    cb = fig.colorbar(img, ax=ax)
    cb.ax.tick_params(labelsize=6)
    if colorbar:
        cb.set_label(colorbar, fontsize=7)
    return _fig(name, caption, fig)


def image_grid(name: str, caption: str, rows: Sequence[Sequence[tuple[Any, str, str]]], *, cell: tuple[float, float],
               fontsize: float, ncol: int | None = None, row_labels: Sequence[str] | None = None) -> Figure:
    """Image panels in rows: each panel is (image (3, H, W) in [0, 1], title, title colour).

    `ncol` columns (default: the longest row); cells past a row's last panel stay empty.
    `cell` is one panel's (width, height) in inches; `row_labels` name the rows at the left.
    """
    ncol = max(len(r) for r in rows) if ncol is None else ncol
    fig = figure(cell[0] * ncol, cell[1] * len(rows) + 0.3)
    axes = fig.subplots(len(rows), ncol, squeeze=False)
    for i, panels in enumerate(rows):
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(panels):
                img, title, color = panels[j]
                ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
                ax.set_title(title, fontsize=fontsize, color=color)
                if j == 0 and row_labels is not None:
                    ax.set_ylabel(row_labels[i], fontsize=7)
            else:
                ax.axis("off")
    return _fig(name, caption, fig)


def calibration_chart(rows: Sequence[Mapping[str, Any]], *, limits: tuple[float, float] = (-2.0, 3.0)) -> bytes | None:
    """Measured / predicted for every prediction with a non-zero numeric size, coloured by verdict.

    Values beyond `limits` are drawn at the edge as triangles (the table has the numbers).
    """
    pts = [r for r in rows if _finite(r.get("predicted")) and _finite(r.get("measured")) and abs(r["predicted"]) > 1e-9]
    if not pts:
        return None
    lo_lim, hi_lim = limits

    def clip(x: float) -> float:
        return min(max(x, lo_lim), hi_lim)

    fig = figure(7.0, 0.32 * len(pts) + 1.0)
    ax = fig.add_subplot(1, 1, 1)
    for i, r in enumerate(pts):
        color = VERDICT_COLORS.get(r["verdict"], "#444")
        scale = abs(r["predicted"])
        ratio = r["measured"] / scale
        lo, hi = r.get("ci") or (None, None)
        ax.plot([r["predicted"] / scale], [i], marker="D", color="#1f5fbf", ls="")
        if _finite(lo) and _finite(hi):
            ax.plot([clip(lo / scale), clip(hi / scale)], [i, i], color=color, lw=1.5)
        inside = lo_lim <= ratio <= hi_lim
        marker = "o" if inside else (">" if ratio > hi_lim else "<")
        ax.plot([clip(ratio)], [i], marker=marker, color=color, ms=6, ls="")
    ax.axvline(1.0, color="#1f5fbf", lw=0.8, ls=":")
    ax.axvline(-1.0, color="#1f5fbf", lw=0.8, ls=":")
    ax.axvline(0.0, color="#888", lw=0.6)
    ax.set_xlim(lo_lim - 0.1, hi_lim + 0.1)
    ax.set_yticks(range(len(pts)))
    ax.set_yticklabels([f"{r['study']}/{r['id']}" for r in pts], fontsize=6)
    ax.set_xlabel("value / |predicted size|  (diamond: predicted; dot and line: measured, 95% CI; triangle: off axis)",
                  fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title("Calibration: how far off the predicted sizes were", fontsize=9)
    return png(fig)


def leaderboard_chart(rows: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Win rate of each method's chosen actions over their controls, with CIs."""
    pts = [r for r in rows if _finite(r.get("win_rate"))]
    if not pts:
        return None
    fig = figure(6.5, 0.4 * len(pts) + 1.0)
    ax = fig.add_subplot(1, 1, 1)
    for i, r in enumerate(pts):
        lo, hi = r.get("win_rate_ci") or (None, None)
        if _finite(lo) and _finite(hi):
            ax.errorbar([r["win_rate"]], [i], xerr=[[r["win_rate"] - lo], [hi - r["win_rate"]]], fmt="o", capsize=3)
        else:
            ax.plot([r["win_rate"]], [i], "o")
    ax.axvline(0.5, color="#888", lw=0.8, ls=":")
    ax.set_xlim(-0.02, 1.02)
    ax.set_yticks(range(len(pts)))
    ax.set_yticklabels([f"{r['method']} (n={r['n']})" for r in pts], fontsize=7)
    ax.set_xlabel("share of cases where the method's chosen action beat its control (95% CI)", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    return png(fig)
