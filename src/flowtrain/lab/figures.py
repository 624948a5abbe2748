"""The lab's own figures: profiles along depth and early-training curves, one colour per variant, one line per
seed (the first labelled, the others fainter), so the spread the verdicts weigh is on the page too.

Built on the report package's helpers (matplotlib Figure without pyplot, run colours, `$`-safe labels, legends
outside the axes), so they sit in a study page next to the report's standard figures and look the same.
"""

from __future__ import annotations

import numpy as np

from flowtrain.report.plotting import ReportFigure, legend_outside, mpl_text, new_figure, run_color

SEED_ALPHA = 0.45  # the second and later seeds: visible, but the variant's colour stays readable


def _seed_label(name: str, n_seeds: int) -> str:
    return mpl_text(name if n_seeds == 1 else f"{name} ({n_seeds} seeds)")


def profile_figure(
    key: str,
    title: str,
    caption: str,
    labels: dict[str, list[str]],
    series: dict[str, list[np.ndarray]],
    ylabel: str,
    *,
    logy: bool = True,
) -> ReportFigure:
    """One line per variant and seed over positions along depth (layers or boundaries h_0..h_L).

    Variants may have different lengths (post-norm has no final-norm 'head' layer): each is drawn at its own
    positions, with the tick labels of the longest.
    """
    out = ReportFigure(key=key, title=title, caption=caption)
    label_len = max((len(t) for names in labels.values() for t in names), default=0)
    # slanted tick labels take their length in height: the figure grows with them, the plot keeps its room
    fig, axes = new_figure(width=9.0, row_height=3.0 + 0.045 * label_len)
    ax = axes[0, 0]
    longest: list[str] = []
    drawn = False
    for i, (name, per_seed) in enumerate(series.items()):
        shown_any = False
        for k, values in enumerate(per_seed):
            values = np.asarray(values, dtype=np.float64)
            shown = np.where(np.isfinite(values) & ((values > 0) | (not logy)), values, np.nan)
            if not np.isfinite(shown).any():
                continue
            ax.plot(
                np.arange(len(values)),
                shown,
                marker="o",
                markersize=3,
                color=run_color(i),
                alpha=1.0 if k == 0 else SEED_ALPHA,
                label=_seed_label(name, len(per_seed)) if not shown_any else None,
            )
            shown_any = drawn = True
        if not shown_any:
            out.notes.append(f"{name}: no finite{' positive' if logy else ''} values to draw")
        elif len(labels[name]) > len(longest):
            longest = labels[name]
    if not drawn:
        return out
    every = max(1, int(np.ceil(len(longest) / 20)))
    ticks = list(range(0, len(longest), every))
    ax.set_xticks(ticks, [mpl_text(longest[t]) for t in ticks], rotation=45, ha="right", rotation_mode="anchor")
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(mpl_text(ylabel))
    legend_outside(ax)
    out.fig = fig
    return out


def curves_figure(
    key: str,
    title: str,
    caption: str,
    series: dict[str, list[tuple[np.ndarray, np.ndarray]]],
    ylabel: str,
    *,
    logy: bool = True,
) -> ReportFigure:
    """One line per variant and seed of a per-step quantity (steps, values); non-finite points are gaps."""
    out = ReportFigure(key=key, title=title, caption=caption)
    fig, axes = new_figure(width=9.0, row_height=3.2)
    ax = axes[0, 0]
    drawn = False
    for i, (name, per_seed) in enumerate(series.items()):
        shown_any = False
        for k, (steps, values) in enumerate(per_seed):
            values = np.asarray(values, dtype=np.float64)
            ok = np.isfinite(values) & ((values > 0) if logy else True)
            if not ok.any():
                continue
            ax.plot(
                steps,
                np.where(ok, values, np.nan),
                color=run_color(i),
                alpha=1.0 if k == 0 else SEED_ALPHA,
                label=_seed_label(name, len(per_seed)) if not shown_any else None,
                linewidth=1.2 if k == 0 else 0.9,
            )
            shown_any = drawn = True
        if not shown_any:
            out.notes.append(f"{name}: no finite values to draw")
    if not drawn:
        return out
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(mpl_text(ylabel))
    legend_outside(ax)
    out.fig = fig
    return out


def bars_figure(
    key: str, title: str, caption: str, groups: list[str], series: dict[str, list[np.ndarray]], ylabel: str
) -> ReportFigure:
    """Grouped bars: one group per entry of `groups` (e.g. blocks), one bar per series at its mean over seeds,
    with a whisker over the seeds' range (min..max) when there are several."""
    out = ReportFigure(key=key, title=title, caption=caption)
    fig, axes = new_figure(width=9.0, row_height=3.2)
    ax = axes[0, 0]
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, per_seed) in enumerate(series.items()):
        values = np.asarray(per_seed, dtype=np.float64).reshape(len(per_seed), -1)  # [seeds, groups]
        mean = values.mean(axis=0)
        whisker = None
        if len(values) > 1:
            whisker = np.vstack([mean - values.min(axis=0), values.max(axis=0) - mean])
        pos = x + (i - (len(series) - 1) / 2) * width
        ax.bar(pos, mean, width, color=run_color(i), label=_seed_label(name, len(values)))
        if whisker is not None:
            ax.errorbar(pos, mean, yerr=whisker, fmt="none", ecolor="0.2", elinewidth=1.0, capsize=2)
    ax.set_xticks(x, [mpl_text(g) for g in groups], rotation=30, ha="right", rotation_mode="anchor")
    ax.set_ylabel(mpl_text(ylabel))
    legend_outside(ax)
    out.fig = fig
    return out
