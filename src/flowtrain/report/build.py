"""Run directories -> one self-contained HTML report (and, on request, every figure as PNG and SVG)."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from pathlib import Path

from matplotlib import rc_context

from flowtrain import __version__
from flowtrain.errors import DataError
from flowtrain.fsutil import atomic_write_text
from flowtrain.report import figures_flow as ff
from flowtrain.report import figures_scalars as fs
from flowtrain.report import html as h
from flowtrain.report.load import RunData, load_run
from flowtrain.report.plotting import RC, ReportFigure, save_files, svg_text


def unique_names(runs: list[RunData]) -> None:
    """Two runs with the same name (e.g. runs/a/tiny and runs/b/tiny) get their parent directory prefixed."""
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
    for k, run in enumerate(runs):
        if seen[run.name] > 1:
            run.name = f"{run.path.resolve().parent.name}/{run.name}#{k + 1}"


def build_figures(runs: list[RunData]) -> list[tuple[str, str, list[ReportFigure]]]:
    """(section anchor, heading, figures) in page order."""
    return [
        ("loss", "Loss", [fs.loss_figure(runs, "step"), fs.loss_figure(runs, "tokens")]),
        ("optimizer", "Learning rate and gradient clipping", [fs.lr_figure(runs), fs.grad_norm_figure(runs)]),
        (
            "flow",
            "Gradient flow",
            [ff.heatmap_figure(runs), ff.residual_profile_figure(runs), ff.grad_bars_figure(runs)],
        ),
        (
            "updates",
            "Updates, activations and attention",
            [ff.update_ratio_figure(runs), ff.activation_figure(runs), ff.attention_figure(runs)],
        ),
    ]


def render_html(runs: list[RunData], figures_dir: Path | None = None) -> str:
    """The report page for loaded runs; with figures_dir, each figure is also saved there as PNG and SVG."""
    if figures_dir is not None:
        figures_dir = Path(figures_dir)
        if figures_dir.exists() and not figures_dir.is_dir():
            raise DataError(f"--figures {figures_dir} exists and is not a directory; pass a directory path")
        figures_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    with rc_context(RC):
        for anchor, heading, items in build_figures(runs):
            parts = []
            for item in items:
                svg = None
                if item.fig is not None:
                    svg = svg_text(item.fig)
                    if figures_dir is not None:
                        save_files(item.fig, figures_dir / item.key)
                parts.append(h.figure_html(item, svg))
            sections.append((anchor, heading, "".join(parts)))
    skipped = "".join(f'<p class="note">{h.esc(n)}</p>' for run in runs for n in run.notices)
    sections.insert(0, ("summary", "Runs", h.summary_table(runs) + skipped))
    sections.append(("alerts", "Alerts and guard actions", h.alerts_section(runs)))
    sections.append(("config", "Config", h.config_section(runs)))
    sections.append(("environment", "Environment", h.environment_table(runs)))
    names = ", ".join(r.name for r in runs)
    title = f"flowtrain report: {names}" if len(runs) <= 3 else f"flowtrain report: {len(runs)} runs"
    made = _dt.datetime.now().isoformat(timespec="seconds")
    subtitle = (
        f"Made by flowtrain {h.esc(__version__)} on {h.esc(made)} from {len(runs)} run director"
        f"{'y' if len(runs) == 1 else 'ies'}. Long series are drawn as bucket means with a min–max band; "
        "see each caption."
    )
    return h.page(title, sections, subtitle)


def build_report(
    run_dirs: list[str | Path],
    out: str | Path,
    *,
    figures_dir: str | Path | None = None,
    notice: Callable[[str], None] | None = None,
) -> Path:
    """Read run directories, write the self-contained HTML report to `out` atomically; returns `out`.
    `notice` hears what was skipped while reading (damaged lines); the page says it too."""
    if not run_dirs:
        raise DataError("no run directory given; pass one or more runs/NAME directories")
    runs = [load_run(Path(d)) for d in run_dirs]
    for line in (n for run in runs for n in run.notices):
        if notice is not None:
            notice(line)
    unique_names(runs)
    out = Path(out)
    if out.is_dir():
        raise DataError(f"-o {out} is a directory; pass a file name such as {out / 'report.html'}")
    text = render_html(runs, Path(figures_dir) if figures_dir is not None else None)
    atomic_write_text(out, text)
    return out
