"""The run report: run directories -> one self-contained HTML file with inline SVG figures (docs/report.md).

Public API: build_report(run_dirs, out, figures_dir=None) -> Path, load_run(path) -> RunData, render_html(runs).
"""

from flowtrain.report.build import build_report, render_html
from flowtrain.report.load import RunData, load_run

__all__ = ["RunData", "build_report", "load_run", "render_html"]
