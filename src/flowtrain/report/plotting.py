"""Shared plotting helpers: downsampling long series, run colours, alert markers, figure rendering.

Figures are built on matplotlib.figure.Figure directly (no pyplot), so building a report never touches global
pyplot state or needs a display; PNG rendering goes through Agg. Text stays text in SVG (svg.fonttype=none):
smaller files, faster to render, and the browser draws it.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure

# A long series is cut into this many equal buckets of consecutive steps; the line is each bucket's mean and a
# shaded band spans its min..max, so a one-step spike still shows. Shorter series are drawn point by point.
MAX_LINE_POINTS = 800
# Lines drawn per layer (many at once) get fewer buckets: bucket means only.
MAX_LAYER_POINTS = 400
# The heatmap's step axis: at most this many columns, each the mean of log10 values over its bucket of steps.
MAX_HEATMAP_COLUMNS = 600

RC = {
    "svg.fonttype": "none",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "legend.framealpha": 0.8,
    "path.simplify": True,
}
ACTION_STYLE = {  # alert action -> (line style, width, alpha); colour is the run's
    "warn": (":", 0.8, 0.45),
    "skip": ("--", 1.0, 0.7),
    "rollback": ("-", 1.6, 0.8),
    "stop": ("-", 2.6, 0.95),
}
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f"]


@dataclass
class ReportFigure:
    """One figure of the report: a matplotlib figure (or None when nothing can be drawn) and what it shows."""

    key: str  # file stem for --figures and the HTML anchor
    title: str
    caption: str
    fig: Figure | None = None
    notes: list[str] = field(default_factory=list)  # e.g. which run lacks the data, in plain text


def run_color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def mpl_text(text: str) -> str:
    """User text for a matplotlib label: '$' would start mathtext (and can raise on odd input)."""
    return str(text).replace("$", r"\$")


def new_figure(n_rows: int = 1, n_cols: int = 1, *, width: float = 9.0, row_height: float = 3.0, **kw):
    fig = Figure(figsize=(width, row_height * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False, **kw)
    return fig, axes


def _bucket_edges(n: int, buckets: int) -> np.ndarray:
    return np.unique(np.linspace(0, n, buckets + 1).astype(np.int64))


def downsample(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(x, y_mean, [y_min, y_max] or None) with at most max_points points; non-finite values are ignored."""
    x = np.asarray(x, dtype=np.float64)
    y = np.where(np.isfinite(y), y, np.nan).astype(np.float64)
    if len(x) <= max_points:
        return x, y, None
    edges = _bucket_edges(len(x), max_points)
    starts = edges[:-1]
    counts = np.diff(edges)
    finite = ~np.isnan(y)
    sums = np.add.reduceat(np.where(finite, y, 0.0), starts)
    n_finite = np.add.reduceat(finite.astype(np.int64), starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_finite > 0, sums / np.maximum(n_finite, 1), np.nan)
    lo = np.minimum.reduceat(np.where(finite, y, np.inf), starts)
    hi = np.maximum.reduceat(np.where(finite, y, -np.inf), starts)
    lo[n_finite == 0] = np.nan
    hi[n_finite == 0] = np.nan
    xm = np.add.reduceat(x, starts) / counts
    return xm, mean, np.vstack([lo, hi])


def downsample_rows(mat: np.ndarray, steps: np.ndarray, max_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket means along the step axis of a [rows, steps] matrix (NaN ignored), and the bucket centres."""
    if mat.shape[1] <= max_cols:
        return mat, steps.astype(np.float64)
    edges = _bucket_edges(mat.shape[1], max_cols)
    starts = edges[:-1]
    finite = np.isfinite(mat)
    sums = np.add.reduceat(np.where(finite, mat, 0.0), starts, axis=1)
    counts = np.add.reduceat(finite.astype(np.int64), starts, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    centres = np.add.reduceat(steps.astype(np.float64), starts) / np.diff(edges)
    return out, centres


def plot_series(ax, x, y, *, color: str, label: str | None, max_points: int = MAX_LINE_POINTS, **kw) -> bool:
    """Line of y against x, downsampled with a min..max band; False when there is nothing finite to draw."""
    xs, ym, band = downsample(x, y, max_points)
    if not np.isfinite(ym).any():
        return False
    ax.plot(xs, ym, color=color, label=label, **kw)
    if band is not None:
        ax.fill_between(xs, band[0], band[1], color=color, alpha=0.18, linewidth=0)
    return True


def mark_alerts(ax, alerts: list[dict] | None, x_of_step, color: str) -> set[str]:
    """Vertical lines at alert steps, one style per action; returns the actions drawn (for the legend)."""
    drawn: set[str] = set()
    if not alerts:
        return drawn
    by_action: dict[str, list[float]] = {}
    for a in alerts:
        step = a.get("step")
        if isinstance(step, int):
            by_action.setdefault(str(a.get("action", "warn")), []).append(step)
    for action, steps in by_action.items():
        style, width, alpha = ACTION_STYLE.get(action, ACTION_STYLE["warn"])
        xs = x_of_step(np.unique(np.asarray(steps, dtype=np.int64)))
        xs = xs[np.isfinite(xs)]
        if len(xs):
            ax.vlines(
                xs,
                0,
                1,
                transform=ax.get_xaxis_transform(),
                colors=color,
                linestyles=style,
                linewidths=width,
                alpha=alpha,
            )
            drawn.add(action)
    return drawn


def action_entries(actions: set[str]) -> list[tuple[object, str]]:
    """Legend entries explaining the alert line styles (grey: the colour is each run's), in ACTION_STYLE order."""
    from matplotlib.lines import Line2D

    order = [a for a in ACTION_STYLE if a in actions] + sorted(actions - set(ACTION_STYLE))
    entries = []
    for a in order:
        style, width, _ = ACTION_STYLE.get(a, ACTION_STYLE["warn"])
        entries.append((Line2D([], [], color="0.3", linestyle=style, linewidth=width), f"alert: {a}"))
    return entries


# Legend entries per column before a legend outside the axes wraps into a second column.
LEGEND_ROWS = 16


def legend_outside(ax, extra: list[tuple[object, str]] = (), **kw) -> None:
    """The axes' legend to the right of its plot, where it cannot cover a line (constrained layout makes room);
    `extra` (handle, label) entries join it, so there is one legend per axes and none stacks on another."""
    handles, labels = ax.get_legend_handles_labels()
    for handle, label in extra:
        handles.append(handle)
        labels.append(label)
    if not handles:
        return
    ncol = max(1, -(-len(handles) // LEGEND_ROWS))
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, ncol=ncol, **kw)


_XML_HEAD = re.compile(r"^.*?(?=<svg)", re.S)


def svg_text(fig: Figure) -> str:
    """The figure as an <svg> element for inlining in HTML (XML prolog and DOCTYPE removed)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    return _XML_HEAD.sub("", buf.getvalue(), count=1)


def save_files(fig: Figure, stem_path) -> None:
    """PNG (150 dpi) and SVG next to each other, written atomically."""
    from flowtrain.fsutil import atomic_write_bytes

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=150)
    atomic_write_bytes(stem_path.with_suffix(".png"), png.getvalue())
    svg = io.BytesIO()
    fig.savefig(svg, format="svg", metadata={"Date": None, "Creator": None})
    atomic_write_bytes(stem_path.with_suffix(".svg"), svg.getvalue())
