"""Figures from metrics.jsonl, eval.jsonl and alerts.jsonl: loss, learning rate, gradient norms and clipping."""

from __future__ import annotations

import numpy as np

from flowtrain.report.load import RunData
from flowtrain.report.plotting import (
    ReportFigure,
    action_entries,
    legend_outside,
    mark_alerts,
    mpl_text,
    new_figure,
    plot_series,
    run_color,
)

DISCARDED_NOTE = (
    "Steps a guard rollback undid (records marked discarded) are drawn as faded crosses and left out of the lines."
)


def _tokens_of(run: RunData):
    """step -> tokens seen, interpolated from metrics.jsonl (NaN outside the logged range or without tokens)."""
    tokens = run.metrics.get("tokens")
    steps = run.metrics.step
    if tokens is None or not len(steps):
        return None
    ok = np.isfinite(tokens)
    if not ok.any():
        return None
    s, t = steps[ok].astype(np.float64), tokens[ok]

    def convert(step):
        return np.interp(np.asarray(step, dtype=np.float64), s, t, left=np.nan, right=np.nan)

    return convert


def loss_figure(runs: list[RunData], x_axis: str) -> ReportFigure:
    by_tokens = x_axis == "tokens"
    out = ReportFigure(
        key=f"loss_vs_{x_axis}",
        title=f"Loss vs {'tokens' if by_tokens else 'step'}",
        caption=(
            f"Training loss per step (solid) and validation loss at each evaluation (circles, dashed), against "
            f"{'input tokens processed' if by_tokens else 'optimizer step'}. Vertical lines mark alerts, one line "
            f"style per guard action. {DISCARDED_NOTE}"
        ),
    )
    fig, axes = new_figure(row_height=3.6)
    ax = axes[0, 0]
    drawn_any = False
    actions: set[str] = set()
    for i, run in enumerate(runs):
        color, name = run_color(i), mpl_text(run.name)
        if by_tokens:
            x_of_step = _tokens_of(run)
            if x_of_step is None:
                out.notes.append(f"{run.name}: metrics.jsonl has no 'tokens' field, so it is not on this figure")
                continue
        else:

            def x_of_step(step):
                return np.asarray(step, dtype=np.float64)

        loss = run.metrics.get("loss")
        if loss is None:
            out.notes.append(f"{run.name}: no training loss in metrics.jsonl")
        elif plot_series(ax, x_of_step(run.metrics.step), loss, color=color, label=f"{name} train", linewidth=1.1):
            drawn_any = True
        dloss = run.discarded.get("loss")
        if dloss is not None and len(run.discarded):
            ax.scatter(
                x_of_step(run.discarded.step),
                dloss,
                marker="x",
                s=10,
                color=color,
                alpha=0.3,
                label=f"{name} discarded ({len(run.discarded)} steps)",
            )
        if run.evals is not None and run.evals.get("val_loss") is not None:
            ax.plot(
                x_of_step(run.evals.step),
                run.evals.get("val_loss"),
                "o--",
                color=color,
                markersize=3.5,
                linewidth=1.0,
                alpha=0.9,
                label=f"{name} val",
            )
            drawn_any = True
        elif run.evals is None:
            out.notes.append(f"{run.name}: {run.missing.get('eval.jsonl', 'no evaluations')}")
        actions |= mark_alerts(ax, run.alerts, x_of_step, color)
    if not drawn_any:
        out.notes.append("nothing to plot: no run has a loss")
        return out
    ax.set_xlabel("tokens" if by_tokens else "step")
    ax.set_ylabel("loss (nats / token)")
    legend_outside(ax, extra=action_entries(actions))
    out.fig = fig
    return out


def lr_figure(runs: list[RunData]) -> ReportFigure:
    out = ReportFigure(
        key="learning_rate",
        title="Learning rate",
        caption="The learning rate each step's update used (metrics.jsonl 'lr').",
    )
    fig, axes = new_figure(row_height=2.6)
    ax = axes[0, 0]
    drawn = False
    for i, run in enumerate(runs):
        lr = run.metrics.get("lr")
        if lr is None:
            out.notes.append(f"{run.name}: no 'lr' in metrics.jsonl")
            continue
        drawn |= plot_series(ax, run.metrics.step, lr, color=run_color(i), label=mpl_text(run.name))
    if not drawn:
        return out
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    legend_outside(ax)
    out.fig = fig
    return out


def clip_threshold(run: RunData) -> float | None:
    """config clip.max_norm when clip.kind is 'norm' (the only kind with one global threshold)."""
    clip = run.config.get("clip")
    if not isinstance(clip, dict) or clip.get("kind", "norm") != "norm":
        return None
    value = clip.get("max_norm")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def clip_rate_window(run: RunData) -> int:
    flow = run.config.get("flow")
    window = flow.get("clip_rate_window") if isinstance(flow, dict) else None
    return int(window) if isinstance(window, int) and window >= 1 else 100


def rolling_clip_rate(clipped: np.ndarray, window: int) -> np.ndarray:
    """Fraction of clipped steps among the last `window` logged steps (fewer at the start), NaN-safe."""
    c = np.where(np.isfinite(clipped), clipped, 0.0)
    n = np.isfinite(clipped).astype(np.float64)
    cs, ns = np.concatenate([[0.0], np.cumsum(c)]), np.concatenate([[0.0], np.cumsum(n)])
    idx = np.arange(1, len(c) + 1)
    lo = np.maximum(idx - window, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (cs[idx] - cs[lo]) / (ns[idx] - ns[lo])


def grad_norm_figure(runs: list[RunData]) -> ReportFigure:
    out = ReportFigure(
        key="grad_norm_clipping",
        title="Gradient norm and clipping",
        caption=(
            "Top: global L2 norm of the step's gradient before clipping (solid) and after (dashed), log scale, "
            "with the clip threshold clip.max_norm as a dash-dot line when clip.kind is 'norm'. Bottom: rolling "
            "clip rate, the fraction of clipped steps over the last flow.clip_rate_window logged steps "
            "(default 100)."
        ),
    )
    fig, axes = new_figure(2, 1, row_height=2.7, sharex=True)
    top, bottom = axes[0, 0], axes[1, 0]
    drawn = False
    for i, run in enumerate(runs):
        color, name, steps = run_color(i), mpl_text(run.name), run.metrics.step
        pre, post = run.metrics.get("grad_norm_preclip"), run.metrics.get("grad_norm_postclip")
        if pre is None:
            out.notes.append(f"{run.name}: no 'grad_norm_preclip' in metrics.jsonl")
            continue
        drawn |= plot_series(top, steps, pre, color=color, label=f"{name} pre-clip", linewidth=1.0)
        if post is not None:
            plot_series(top, steps, post, color=color, label=f"{name} post-clip", linewidth=1.0, linestyle="--")
        threshold = clip_threshold(run)
        if threshold is not None:
            top.axhline(
                threshold,
                color=color,
                linestyle="-.",
                linewidth=1.0,
                alpha=0.8,
                label=f"{name} clip.max_norm = {threshold:g}",
            )
        else:
            kind = (
                (run.config.get("clip") or {}).get("kind", "unknown")
                if isinstance(run.config.get("clip"), dict)
                else "unknown"
            )
            out.notes.append(f"{run.name}: clip.kind is {kind!r}, which has no single global-norm threshold to draw")
        clipped = run.metrics.get("clipped")
        if clipped is None and run.metrics.get("clip_coef") is not None:
            clipped = np.where(np.isfinite(run.metrics.get("clip_coef")), run.metrics.get("clip_coef") < 1.0, np.nan)
        if clipped is not None:
            window = clip_rate_window(run)
            plot_series(
                bottom,
                steps,
                rolling_clip_rate(clipped, window),
                color=color,
                label=f"{name} (window {window})",
                linewidth=1.1,
            )
    if not drawn:
        return out
    top.set_yscale("log")
    top.set_ylabel("grad L2 norm")
    legend_outside(top)
    bottom.set_ylim(-0.03, 1.03)
    bottom.set_ylabel("clip rate")
    bottom.set_xlabel("step")
    legend_outside(bottom)
    out.fig = fig
    return out
