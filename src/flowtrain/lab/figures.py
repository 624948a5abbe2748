"""The lab's own figures: profiles along depth and early-training curves, one line per variant.

Built on the report package's helpers (matplotlib Figure without pyplot, run colours, `$`-safe labels), so they
sit in a study page next to the report's standard figures and look the same.
"""

from __future__ import annotations

import numpy as np

from flowtrain.report.plotting import ReportFigure, mpl_text, new_figure, run_color


def _finite_positive(values: np.ndarray) -> bool:
    v = np.asarray(values, dtype=np.float64)
    return bool((np.isfinite(v) & (v > 0)).any())


def profile_figure(
    key: str,
    title: str,
    caption: str,
    labels: dict[str, list[str]],
    series: dict[str, np.ndarray],
    ylabel: str,
    *,
    logy: bool = True,
) -> ReportFigure:
    """One line per variant over positions along depth (layers or boundaries h_0..h_L).

    Variants may have different lengths (post-norm has no final-norm 'head' layer): each is drawn at its own
    positions, with the tick labels of the longest.
    """
    out = ReportFigure(key=key, title=title, caption=caption)
    fig, axes = new_figure(width=9.0, row_height=3.4)
    ax = axes[0, 0]
    longest: list[str] = []
    drawn = False
    for i, (name, values) in enumerate(series.items()):
        values = np.asarray(values, dtype=np.float64)
        shown = np.where(np.isfinite(values) & ((values > 0) | (not logy)), values, np.nan)
        if not np.isfinite(shown).any():
            out.notes.append(f"{name}: no finite{' positive' if logy else ''} values to draw")
            continue
        ax.plot(np.arange(len(values)), shown, marker="o", markersize=3, color=run_color(i), label=mpl_text(name))
        drawn = True
        if len(labels[name]) > len(longest):
            longest = labels[name]
    if not drawn:
        return out
    every = max(1, int(np.ceil(len(longest) / 20)))
    ticks = list(range(0, len(longest), every))
    ax.set_xticks(ticks, [mpl_text(longest[t]) for t in ticks], rotation=45, ha="right")
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(mpl_text(ylabel))
    ax.legend(loc="best")
    out.fig = fig
    return out


def curves_figure(
    key: str,
    title: str,
    caption: str,
    series: dict[str, tuple[np.ndarray, np.ndarray]],
    ylabel: str,
    *,
    logy: bool = True,
) -> ReportFigure:
    """One line per variant of a per-step quantity (steps, values); non-finite points are gaps."""
    out = ReportFigure(key=key, title=title, caption=caption)
    fig, axes = new_figure(width=9.0, row_height=3.2)
    ax = axes[0, 0]
    drawn = False
    for i, (name, (steps, values)) in enumerate(series.items()):
        values = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(values) & ((values > 0) if logy else True)
        if not ok.any():
            out.notes.append(f"{name}: no finite values to draw")
            continue
        ax.plot(steps, np.where(ok, values, np.nan), color=run_color(i), label=mpl_text(name), linewidth=1.2)
        drawn = True
    if not drawn:
        return out
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(mpl_text(ylabel))
    ax.legend(loc="best")
    out.fig = fig
    return out


def bars_figure(
    key: str, title: str, caption: str, groups: list[str], series: dict[str, list[float]], ylabel: str
) -> ReportFigure:
    """Grouped bars: one group per entry of `groups` (e.g. blocks), one bar per series (e.g. init / end)."""
    out = ReportFigure(key=key, title=title, caption=caption)
    fig, axes = new_figure(width=9.0, row_height=3.2)
    ax = axes[0, 0]
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, color=run_color(i), label=mpl_text(name))
    ax.set_xticks(x, [mpl_text(g) for g in groups], rotation=30, ha="right")
    ax.set_ylabel(mpl_text(ylabel))
    ax.legend(loc="best")
    out.fig = fig
    return out
