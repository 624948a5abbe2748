"""One self-contained HTML page per study, composed from the report package's public pieces.

Order: what you are seeing (plain words, the paper), the measured verdict table, the study's own figures, then
the standard report of its runs under the first seed (loss, LR and clipping, gradient flow, updates, alerts, config
differences, environment). Every string that comes from the user or a run goes through `esc`.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from matplotlib import rc_context

from flowtrain import __version__
from flowtrain.fsutil import atomic_write_text
from flowtrain.lab.verdicts import RULE, Finding, summary
from flowtrain.report import build as report_build
from flowtrain.report import html as h
from flowtrain.report.load import load_run
from flowtrain.report.plotting import RC, ReportFigure, svg_text

STATUS_CSS = (
    ".holds{color:#1b5e20;font-weight:600}.CONTRADICTED{color:#b71c1c;font-weight:600}"
    ".inconclusive{color:#8d6e00;font-weight:600}.indicative{color:#5d4037;font-style:italic}"
    ".not-judged{color:#616161;font-weight:600}.measured{color:#455a64}.lead{font-size:1rem;line-height:1.45}"
    ".banner{border-left:4px solid #8d6e00;background:#fff8e1;padding:.5rem .8rem}"
)


def verdict_table(findings: list[Finding], quick: bool, seeds: list[int]) -> str:
    """The measured verdicts: status (with the lean of an indicative one), claim, numbers, test, evidence."""
    rows = "".join(
        f"<tr><td class=num>{i}</td><td class={f.status.replace(' ', '-')}>{h.esc(f.label())}</td>"
        f"<td>{h.esc(f.claim)}</td><td>{h.esc(f.measured)}</td><td>{h.esc(f.rule)}</td>"
        f"<td>{h.esc(f.evidence)}</td></tr>"
        for i, f in enumerate(findings, 1)
    )
    head = f"<p class=banner>{h.esc(summary(findings, quick, seeds))}</p>"
    return (
        f"{head}<p>Every row is computed from the runs when the study finished. {h.esc(RULE)}</p>"
        "<div class=scroll><table><tr><th>#</th><th>result</th><th>textbook expectation</th><th>measured</th>"
        f"<th>test applied</th><th>effect vs spread</th></tr>{rows}</table></div>"
    )


def _figures_html(figures: list[ReportFigure]) -> str:
    parts = []
    for item in figures:
        parts.append(h.figure_html(item, svg_text(item.fig) if item.fig is not None else None))
    return "".join(parts)


def render_study_page(
    *,
    title: str,
    paragraphs: list[str],
    reference: str,
    settings: list[tuple[str, str]],
    findings: list[Finding],
    figures: list[ReportFigure],
    run_dirs: list[Path],
    quick: bool = False,
    seeds: list[int] | None = None,
) -> str:
    """The study page as HTML text (see the module docstring for its sections). run_dirs: the runs the
    standard report overlays (one seed's)."""
    runs = [load_run(d) for d in run_dirs]
    report_build.unique_names(runs)
    intro = "".join(f'<p class="lead">{h.esc(p)}</p>' for p in paragraphs)
    intro += f"<p><strong>Reproduces:</strong> {h.esc(reference)}</p>"
    rows = "".join(f"<tr><td><code>{h.esc(k)}</code></td><td>{h.esc(v)}</td></tr>" for k, v in settings)
    intro += f"<h3>Variants and settings</h3><div class=scroll><table>{rows}</table></div>"
    seeds = seeds or []
    verdict = verdict_table(findings, quick, seeds)
    sections = [("seeing", "What you are seeing", intro), ("verdict", "Measured verdict", verdict)]
    with rc_context(RC):
        sections.append(("study", "Study figures", _figures_html(figures)))
        for anchor, heading, items in report_build.build_figures(runs):
            sections.append((anchor, heading, _figures_html(items)))
    runs_text = "The standard report below overlays these runs."
    if len(seeds) > 1:  # the verdicts and the study figures use every seed; the standard report one of them
        runs_text = f"The runs of seed {seeds[0]}; the study figures and the verdicts use all {len(seeds)} seeds. "
        runs_text += "The standard report below overlays these runs; every seed's runs are in verdicts.json."
    sections.insert(2, ("summary", "Runs", f"<p>{h.esc(runs_text)}</p>" + h.summary_table(runs)))
    sections.append(("alerts", "Alerts and guard actions", h.alerts_section(runs)))
    sections.append(("config", "Config", h.config_section(runs)))
    sections.append(("environment", "Environment", h.environment_table(runs)))
    made = _dt.datetime.now().isoformat(timespec="seconds")
    subtitle = h.esc(
        f"A flowtrain lab study, made by flowtrain {__version__} on {made} from {len(runs) * max(1, len(seeds))} "
        f"run directories ({len(runs)} variants x {max(1, len(seeds))} seed{'s' if len(seeds) > 1 else ''}). "
        "The verdicts are computed from these runs, not written in advance."
        + (" A --quick study: every verdict is indicative only." if quick else "")
    )
    page = h.page(title, sections, subtitle)
    return page.replace("</style>", STATUS_CSS + "</style>", 1)


def write_study_page(out: Path, **parts) -> Path:
    """Render and write the page atomically; returns its path."""
    atomic_write_text(Path(out), render_study_page(**parts))
    return Path(out)
