"""Figures that do not hide their data: rendered with Agg and measured in display coordinates.

* No legend overlaps any plotting area (legends sit outside the axes), in every figure of a two-run report.
* Runs with different monitored steps are compared at the steps they share, and the figure says so; runs that
  share none say that the columns compare different steps.
* Per-run panels and heatmap rows share one step axis.
* With weight tying the layers holding the shared matrix are labelled for what they hold.
"""

from __future__ import annotations

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg

from flowtrain.report import build as report_build
from flowtrain.report import figures_flow as ff
from flowtrain.report.load import TIED_LABELS, load_run
from tests.report.conftest import write_run


def _render(fig) -> None:
    FigureCanvasAgg(fig).draw()  # layout and legend positions are final only after a draw


def _legends(fig) -> list:
    return [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)


def _overlap(a, b) -> bool:
    """Two display-space boxes share area (touching edges do not count)."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > 0.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0.5


def _two_runs(tmp_path, *, second_steps: int = 45):
    a = write_run(tmp_path, name="alpha", steps=30, rollback=(12, 3))
    b = write_run(tmp_path, name="beta", steps=second_steps, lr=3e-4)
    runs = [load_run(a), load_run(b)]
    report_build.unique_names(runs)
    return runs


def test_no_legend_covers_a_plotting_area(tmp_path):
    runs = _two_runs(tmp_path)
    checked = 0
    for _, _, figures in report_build.build_figures(runs):
        for item in figures:
            if item.fig is None:
                continue
            _render(item.fig)
            renderer = item.fig.canvas.get_renderer()
            for legend in _legends(item.fig):
                box = legend.get_window_extent(renderer)
                for ax in item.fig.axes:
                    assert not _overlap(box, ax.get_window_extent(renderer)), (item.key, legend.texts[0].get_text())
                assert box.x0 >= 0 and box.x1 <= item.fig.bbox.x1 + 1  # and still inside the image
                checked += 1
    assert checked >= 9  # loss x2, lr, grad norm x2, profile, bars, update ratio x2 rows, activations, attention


def test_runs_are_compared_at_the_steps_they_share(tmp_path):
    runs = _two_runs(tmp_path)  # alpha monitors 1..30, beta 1..45: own middles would be 16 and 23, ends 30 and 45
    profile = ff.residual_profile_figure(runs)
    labels = [t.get_text() for t in profile.fig.axes[0].get_legend().get_texts()]
    assert "alpha middle (step 16)" in labels and "beta middle (step 16)" in labels
    assert "beta end (step 30)" in labels and not any("45" in s or "23" in s for s in labels)
    assert any("all are shown at steps they share (1, 16, 30)" in n for n in profile.notes)
    bars = ff.grad_bars_figure(runs)
    titles = [ax.get_title(loc="left") for ax in bars.fig.axes]
    assert titles == [
        f"{r}: {p} (step {s})" for r in ("alpha", "beta") for p, s in (("start", 1), ("middle", 16), ("end", 30))
    ]

    same = _two_runs(tmp_path / "same", second_steps=30)  # identical steps: nothing to say
    assert ff.residual_profile_figure(same).notes == []


def test_runs_without_a_common_step_say_the_columns_differ(tmp_path):
    runs = _two_runs(tmp_path)
    runs[1].layer_flow.steps = runs[1].layer_flow.steps + 1000  # beta now monitored 1001..1045 only
    bars = ff.grad_bars_figure(runs)
    titles = [ax.get_title(loc="left") for ax in bars.fig.axes]
    assert titles[2] == "alpha: end (step 30)" and titles[5] == "beta: end (step 1045)"
    assert any("share no monitored step" in n and "different steps" in n for n in bars.notes)


def test_runs_of_different_length_share_one_step_axis(tmp_path):
    runs = _two_runs(tmp_path)
    for item in (ff.heatmap_figure(runs), ff.update_ratio_figure(runs), ff.attention_figure(runs)):
        _render(item.fig)
        limits = {tuple(np.round(ax.get_xlim(), 6)) for ax in item.fig.axes if ax.get_label() != "<colorbar>"}
        assert len(limits) == 1, (item.key, limits)
        lo, hi = limits.pop()
        assert lo <= 1 and hi >= 45  # the longer run's last step is on the axis of the shorter one too


def test_tied_layers_are_labelled_for_what_they_hold(tmp_path):
    run = write_run(tmp_path, name="tied", steps=12)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    untied = load_run(run)
    assert untied.layer_flow.labels == ["embedding", "block.0", "block.1", "head"]
    cfg["model"]["tie_embeddings"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    tied = load_run(run)
    assert tied.layer_flow.names == untied.layer_flow.names  # the data keeps its names; only labels change
    assert tied.layer_flow.labels == [TIED_LABELS["embedding"], "block.0", "block.1", TIED_LABELS["head"]]
    heat = ff.heatmap_figure([tied])
    assert [t.get_text() for t in heat.fig.axes[0].get_yticklabels()] == tied.layer_flow.labels
    bars = ff.grad_bars_figure([tied])
    assert TIED_LABELS["embedding"] in [t.get_text() for t in bars.fig.axes[0].get_xticklabels()]
    lines = ff.update_ratio_figure([tied])
    assert TIED_LABELS["head"] in [t.get_text() for t in lines.fig.axes[0].get_legend().get_texts()]
