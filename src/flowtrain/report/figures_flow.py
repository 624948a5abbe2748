"""Figures from flow.parquet: where gradients vanish, explode or stall, layer by layer and along depth.

Per-layer figures use the kind='layer' rows (parameters grouped by layer: embedding, block.i, head); depth figures
use the kind='depth' rows (h_0 = the stream entering the first block, h_l = block l's output). Several runs get one
row of panels each, except the depth profile, which overlays them (one colour per run).
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.patches import Patch

from flowtrain.report.load import FlowGrid, RunData
from flowtrain.report.plotting import (
    MAX_HEATMAP_COLUMNS,
    MAX_LAYER_POINTS,
    ReportFigure,
    downsample_rows,
    legend_outside,
    mpl_text,
    new_figure,
    run_color,
)

PHASES = ("start", "middle", "end")
PHASE_STYLES = {"start": ":", "middle": "--", "end": "-"}


def chosen_steps(steps: np.ndarray) -> dict[str, int]:
    """The first, middle and last monitored step (fewer distinct ones on very short runs)."""
    return {"start": int(steps[0]), "middle": int(steps[len(steps) // 2]), "end": int(steps[-1])}


def _span(steps: np.ndarray) -> str:
    if len(steps) == 1:
        return f"step {int(steps[0])} only"
    return f"{len(steps)} monitored steps from {int(steps[0])} to {int(steps[-1])}"


def compared_steps(kept: list[tuple[int, RunData]], attr: str, out: ReportFigure) -> dict[str, dict[str, int]]:
    """Per run (by name), the steps its start / middle / end show. Several runs are compared at the same steps:
    the first, middle and last of the steps they all monitored; a note says so when their own steps differ, and
    says that the columns compare different steps when the runs share none."""
    grids = [(run.name, getattr(run, attr).steps) for _, run in kept]
    own = {name: chosen_steps(steps) for name, steps in grids}
    if len(grids) < 2:
        return own
    common = grids[0][1]
    for _, steps in grids[1:]:
        common = np.intersect1d(common, steps)
    same = all(np.array_equal(steps, grids[0][1]) for _, steps in grids[1:])
    if same:
        return own
    spans = "; ".join(f"{name}: {_span(steps)}" for name, steps in grids)
    if not len(common):
        out.notes.append(
            f"The runs share no monitored step ({spans}), so each shows its own first, middle and last step: "
            "the same column compares different steps."
        )
        return own
    shared = chosen_steps(common)
    out.notes.append(
        f"The runs monitored different steps ({spans}); all are shown at steps they share "
        f"({', '.join(str(s) for s in dict.fromkeys(shared.values()))}), so each column compares the same step."
    )
    return {name: shared for name, _ in grids}


def _with_flow(runs: list[RunData], out: ReportFigure, attr: str, stat: str | None) -> list[tuple[int, RunData]]:
    """Runs that have the grid (and the stat); a note for each that does not."""
    kept = []
    for i, run in enumerate(runs):
        grid: FlowGrid | None = getattr(run, attr)
        if grid is None:
            why = run.missing.get("flow.parquet") or run.missing.get(
                "flow.parquet:" + ("layer" if attr == "layer_flow" else "depth"), "no flow statistics"
            )
            out.notes.append(f"{run.name}: {why}")
        elif stat is not None and stat not in grid.stats:
            why = run.missing.get(f"stat:{stat}", f"flow.parquet has no '{stat}' values (that probe was off)")
            out.notes.append(f"{run.name}: {why}")
        else:
            kept.append((i, run))
    return kept


def _log10(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, np.log10(np.where(values > 0, values, 1.0)), np.nan)


def _layer_ticks(ax, names: list[str], max_ticks: int = 24) -> None:
    every = max(1, int(np.ceil(len(names) / max_ticks)))
    idx = list(range(0, len(names), every))
    if idx[-1] != len(names) - 1:
        idx.append(len(names) - 1)
    ax.set_yticks(idx, [mpl_text(names[i]) for i in idx])


def heatmap_figure(runs: list[RunData]) -> ReportFigure:
    out = ReportFigure(
        key="grad_flow_heatmap",
        title="Gradient-flow heatmap",
        caption=(
            "log10 of each layer's gradient L2 norm (all of the layer's parameters together) at every monitored "
            f"step; long runs are averaged (in log space) into at most {MAX_HEATMAP_COLUMNS} step buckets. One "
            "colour scale and one step axis for all runs; grey cells are non-finite or missing, white is past a "
            "run's last step. With tied weights the embedding row holds the matrix shared with the output head."
        ),
    )
    kept = _with_flow(runs, out, "layer_flow", "grad_norm")
    if not kept:
        return out
    logs = {i: _log10(run.layer_flow.stats["grad_norm"]) for i, run in kept}
    every = np.concatenate([v[np.isfinite(v)] for v in logs.values()] or [np.zeros(0)])
    vmin, vmax = np.percentile(every, [1, 99]) if every.size else (0.0, 1.0)
    if vmax <= vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    n_layers = max(len(run.layer_flow.names) for _, run in kept)
    fig, axes = new_figure(len(kept), 1, row_height=max(2.2, 0.8 + 0.16 * n_layers), sharex=True)
    cmap = colormaps["magma"].with_extremes(bad="#bdbdbd")
    image = None
    span = [np.inf, -np.inf]
    for row, (i, run) in enumerate(kept):
        ax, grid = axes[row, 0], run.layer_flow
        mat, centres = downsample_rows(logs[i], grid.steps, MAX_HEATMAP_COLUMNS)
        half = (centres[-1] - centres[0]) / max(len(centres) - 1, 1) / 2 if len(centres) > 1 else 0.5
        image = ax.imshow(
            np.ma.masked_invalid(mat),
            aspect="auto",
            interpolation="nearest",
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
            extent=(centres[0] - half, centres[-1] + half, len(grid.names) - 0.5, -0.5),
        )
        span = [min(span[0], centres[0] - half), max(span[1], centres[-1] + half)]
        ax.grid(False)
        _layer_ticks(ax, grid.labels)
        ax.set_title(mpl_text(run.name), loc="left", color=run_color(i))
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_xlim(*span)  # shared: every run's row on one step axis, the longest run setting its length
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="log10 grad norm", shrink=0.9)
    out.fig = fig
    return out


def residual_profile_figure(runs: list[RunData]) -> ReportFigure:
    out = ReportFigure(
        key="residual_gradient_profile",
        title="Residual-stream gradient along depth",
        caption=(
            "||dL/dh_l||, the gradient norm of the residual stream at each block boundary (h_0 enters the first "
            "block, h_L leaves the last), at the first, middle and last monitored step (dotted, dashed, solid); "
            "several runs at the first, middle and last step they all monitored. Healthy pre-norm runs rise "
            "toward h_0 (1.4-23x measured: the residual stream adds every block's gradient) and post-norm ones may "
            "fall (to 0.014x): the health model calls vanishing below 1e-4x and exploding above 1e4x (docs/guard.md)."
        ),
    )
    kept = _with_flow(runs, out, "depth_flow", "resid_grad_norm")
    if not kept:
        return out
    fig, axes = new_figure(row_height=3.2)
    ax = axes[0, 0]
    longest: list[str] = []
    phases = compared_steps(kept, "depth_flow", out)
    for i, run in kept:
        grid = run.depth_flow
        mat = grid.stats["resid_grad_norm"]
        for phase, step in phases[run.name].items():
            col = int(np.searchsorted(grid.steps, step))
            ax.plot(
                np.arange(len(grid.names)),
                mat[:, col],
                PHASE_STYLES[phase],
                marker="o",
                markersize=3,
                color=run_color(i),
                label=f"{mpl_text(run.name)} {phase} (step {step})",
            )
        if len(grid.names) > len(longest):
            longest = grid.names
    ax.set_xticks(range(len(longest)), [mpl_text(n) for n in longest])
    ax.set_yscale("log")
    ax.set_xlabel("block boundary (depth)")
    ax.set_ylabel("residual grad L2 norm")
    legend_outside(ax)
    out.fig = fig
    return out


def grad_bars_figure(runs: list[RunData]) -> ReportFigure:
    out = ReportFigure(
        key="grad_flow_bars",
        title="Gradient flow per layer (start, middle, end)",
        caption=(
            "The classic gradient-flow bar chart, per layer at the first, middle and last monitored step: max |g| "
            "over the layer's gradient entries (light bar) and the gradient's RMS, sqrt(mean g^2) over all its "
            "entries (dark bar), log scale; several runs at the steps they all monitored. RMS stands in for mean "
            "|g|, which is not recorded (RMS >= mean |g|). With tied weights the embedding bar holds the matrix "
            "shared with the output head, and the head bar only the final norm."
        ),
    )
    kept = _with_flow(runs, out, "layer_flow", "grad_rms")
    if not kept:
        return out
    n_layers = max(len(run.layer_flow.names) for _, run in kept)
    longest = max(len(label) for _, run in kept for label in run.layer_flow.labels)
    # rotated tick labels take their length in height: rows grow with them, so the bars keep their room
    fig, axes = new_figure(len(kept), 3, row_height=1.9 + 0.05 * n_layers + 0.055 * longest, sharey=True)
    phases = compared_steps(kept, "layer_flow", out)
    for row, (i, run) in enumerate(kept):
        grid, color = run.layer_flow, run_color(i)
        rms, mx = grid.stats["grad_rms"], grid.stats.get("grad_max_abs")
        x = np.arange(len(grid.names))
        for col, (phase, step) in enumerate(phases[run.name].items()):
            ax = axes[row, col]
            j = int(np.searchsorted(grid.steps, step))
            if mx is not None:
                ax.bar(x, np.nan_to_num(mx[:, j], nan=0.0, posinf=0.0), color=color, alpha=0.3)
            ax.bar(x, np.nan_to_num(rms[:, j], nan=0.0, posinf=0.0), color=color, alpha=0.9, width=0.5)
            ax.set_yscale("log")
            ax.set_title(f"{mpl_text(run.name)}: {phase} (step {step})", fontsize=9, loc="left")
            every = max(1, int(np.ceil(len(x) / 16)))
            ticks = [mpl_text(n) for n in grid.labels[::every]]
            ax.set_xticks(x[::every], ticks, rotation=60, ha="right", rotation_mode="anchor", fontsize=7)
            if col == 0:
                ax.set_ylabel("|gradient|")
    # one legend for all panels, outside them, in grey: light and dark mean the same in every run's colour
    keys = (
        [(Patch(color="0.35", alpha=0.3), "max |g|")]
        if any("grad_max_abs" in r.layer_flow.stats for _, r in kept)
        else []
    )
    keys.append((Patch(color="0.35", alpha=0.9), "RMS g"))
    fig.legend([k for k, _ in keys], [v for _, v in keys], loc="outside right upper", fontsize=7)
    out.fig = fig
    return out


def _layer_lines(ax, grid: FlowGrid, mat: np.ndarray, labels: list[str], rows: list[int]) -> None:
    """One line per row of mat over time (bucket means), coloured by depth, with a legend of at most 10."""
    mat, centres = downsample_rows(mat, grid.steps, MAX_LAYER_POINTS)
    cmap = colormaps["viridis"]
    show = set(rows[:: max(1, int(np.ceil(len(rows) / 10)))] + rows[-1:])
    for k, r in enumerate(rows):
        ax.plot(
            centres,
            mat[r],
            color=cmap(k / max(len(rows) - 1, 1)),
            linewidth=1.0,
            label=mpl_text(labels[r]) if r in show else None,
        )
    ax.set_xlabel("step")


def _per_run_lines(runs, out, attr, panels, *, row_height=2.8) -> ReportFigure:
    """Rows of runs x columns of (stat, y label, log scale, reference line) panels, one line per layer."""
    kept = _with_flow(runs, out, attr, panels[0][0])
    if not kept:
        return out
    # one step axis for every panel: runs of different lengths line up step for step
    fig, axes = new_figure(len(kept), len(panels), row_height=row_height, sharex=True)
    for row, (i, run) in enumerate(kept):
        grid: FlowGrid = getattr(run, attr)
        labels = grid.labels if attr == "layer_flow" else [f"{n} ({l})" for n, l in zip(grid.names, grid.layers)]
        drawn = []
        for col, (stat, ylabel, log, ref) in enumerate(panels):
            ax = axes[row, col]
            mat = grid.stats.get(stat)
            if mat is None:
                ax.set_axis_off()
                why = run.missing.get(f"stat:{stat}", f"flow.parquet has no '{stat}' values")
                out.notes.append(f"{run.name}: {why}")
                continue
            rows = [r for r in range(len(grid.names)) if np.isfinite(mat[r]).any()]
            if not rows:
                ax.set_axis_off()
                out.notes.append(f"{run.name}: '{stat}' is never finite")
                continue
            _layer_lines(ax, grid, mat, labels, rows)
            if log:
                ax.set_yscale("log")
            if ref is not None:
                ax.axhline(ref, color="#d62728", linestyle="--", linewidth=1.2, label=f"reference {ref:g}")
            ax.set_ylabel(ylabel)
            ax.set_title(mpl_text(run.name), loc="left", color=run_color(i), fontsize=9)
            drawn.append(ax)
        if drawn:  # the row's panels share their layer colours: one legend, right of the last panel
            legend_outside(drawn[-1], fontsize=6.5)
    out.fig = fig
    return out


def update_ratio_figure(runs: list[RunData]) -> ReportFigure:
    out = ReportFigure(
        key="update_weight_ratio",
        title="Update / weight ratio per layer",
        caption=(
            "||dW|| / ||W|| per layer for the update each optimizer step actually applied, log scale, coloured "
            f"from the first layer (purple) to the last (yellow); bucket means over at most {MAX_LAYER_POINTS} "
            "step buckets. The dashed line marks 1e-3, a common rule of thumb for a healthy Adam update; far below "
            "it a layer barely learns, far above it the step is large."
        ),
    )
    return _per_run_lines(runs, out, "layer_flow", [("update_ratio", "||dW|| / ||W||", True, 1e-3)])


def activation_figure(runs: list[RunData]) -> ReportFigure:
    out = ReportFigure(
        key="activation_rms",
        title="Activation RMS by layer",
        caption=(
            "RMS of the residual stream at each block boundary h_l (h_l is block l's output) over training, "
            f"coloured from shallow (purple) to deep (yellow); bucket means over at most {MAX_LAYER_POINTS} step "
            "buckets. Steady growth with depth or over time often precedes instability."
        ),
    )
    return _per_run_lines(runs, out, "depth_flow", [("act_rms", "activation RMS", True, None)])


def attention_figure(runs: list[RunData]) -> ReportFigure:
    out = ReportFigure(
        key="attention",
        title="Attention entropy and max attention logit by layer",
        caption=(
            "Per block, from a fixed sample of heads and query positions: mean attention entropy in nats (left; "
            "near 0 = attention collapsed onto one token) and the largest pre-softmax attention logit (right; "
            "growth signals attention-logit divergence). Labels h_l (block) name the block's output boundary."
        ),
    )
    return _per_run_lines(
        runs,
        out,
        "depth_flow",
        [("attn_entropy", "entropy (nats)", False, None), ("attn_max_logit", "max attention logit", False, None)],
    )
