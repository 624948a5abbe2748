"""HTML pieces of the report: tables (summary, alerts, config, environment, config differences) and the page.

Every string that comes from a run (names, paths, config values, alert text, env facts) goes through `esc`
(html.escape with quotes), so a run called `<script>alert(1)</script>` shows as text. The page carries no
JavaScript at all, and its CSS is inline: it opens anywhere without network.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

from flowtrain.flow import health
from flowtrain.report.load import RunData
from flowtrain.report.plotting import ReportFigure, run_color

MAX_ALERT_ROWS = 500  # per run; a run that warned every step still gives a readable page

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2228;background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:1.2rem 1.5rem 4rem}
h1{font-size:1.5rem;margin:.4rem 0}h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #ddd}
h3{font-size:1rem;margin:.2rem 0 .4rem}
figure{margin:1.2rem 0;padding:.8rem;background:#fff;border:1px solid #e3e3e3;border-radius:6px}
figure svg{display:block;width:100%;height:auto}
figcaption{font-size:.85rem;color:#444;margin-top:.4rem}
.note{font-size:.85rem;color:#8a4b00;background:#fff6e5;border-left:3px solid #f0a020;
padding:.3rem .6rem;margin:.3rem 0}
table{border-collapse:collapse;font-size:.82rem;margin:.5rem 0;background:#fff}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f0f2f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.swatch{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.35em;vertical-align:middle}
.scroll{overflow-x:auto}code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.8rem}
pre{background:#fff;border:1px solid #e3e3e3;padding:.6rem;overflow-x:auto}
details{margin:.4rem 0}summary{cursor:pointer}
nav a{margin-right:.8rem;font-size:.85rem}
.act-warn{color:#8a6d00}.act-skip{color:#b35900}.act-rollback{color:#c62828;font-weight:600}
.act-stop{color:#fff;background:#c62828;font-weight:600}
.verdict strong{color:#c62828}.verdict strong.v-healthy{color:#2e7d32}.verdict strong.v-unjudged{color:#666}
.verdict strong.v-inconclusive{color:#666}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A number for a table cell: 4 significant digits, integers as they are; anything else as text."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (lists stay values)."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


_ABSENT = object()


def config_differences(runs: list[RunData]) -> list[tuple[str, list[Any]]]:
    """(dotted key, value per run) for every key whose values differ between runs (absent counts as a value)."""
    flats = [flatten(r.config) for r in runs]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    rows = []
    for key in keys:
        values = [f.get(key, _ABSENT) for f in flats]
        if len({json.dumps(v, sort_keys=True, default=str) if v is not _ABSENT else "\0absent" for v in values}) > 1:
            rows.append((key, values))
    return rows


def _cell_value(value: Any) -> str:
    if value is _ABSENT:
        return "<em>(absent)</em>"
    return f"<code>{esc(json.dumps(value, default=str) if not isinstance(value, str) else value)}</code>"


def run_label(i: int, run: RunData) -> str:
    return f'<span class="swatch" style="background:{run_color(i)}"></span>{esc(run.name)}'


def verdict_text(run: RunData) -> tuple[str, str]:
    """(verdict word, one plain sentence) from the run's alerts: what the guard's health model said."""
    if run.alerts is None:
        return "unjudged", "the guard was off for this run: no verdict"
    v = health.run_verdict(run.alerts)
    acted = ", ".join(f"{n} {a}" + ("s" if n > 1 else "") for a, n in sorted(v["actions"].items()))
    acted = f" Guard actions: {acted}." if acted else ""
    notes = f" Noted (information, nothing wrong): {', '.join(v['info'])}." if v["info"] else ""
    unjudged = health.unjudged([], {k[5:]: why for k, why in run.missing.items() if k.startswith("stat:")})
    blind = [k for k in health.DEPTH_JUDGMENTS if k in unjudged]
    if v["verdict"] == "healthy" and blind:  # no evidence along depth is no evidence of health
        why = unjudged[blind[0]]
        return "inconclusive", f"No warning, but {' and '.join(blind)} gradients could not be judged: {why}.{acted}"
    if v["verdict"] == "healthy":
        missed = f" Not judged (not available for this model): {', '.join(unjudged)}." if unjudged else ""
        return "healthy", f"No warning from the health model.{missed}{acted}{notes}"
    span = (
        f"step {v['first_step']}" if v["first_step"] == v["last_step"] else f"steps {v['first_step']}–{v['last_step']}"
    )
    also = f" Also: {', '.join(v['also'])}." if v["also"] else ""
    tip = f" Try: {v['suggestion']}." if v["suggestion"] else ""
    return v["verdict"], f"{v['count']}× ({span}): {v['explanation']}.{tip}{also}{acted}{notes}"


def verdicts(runs: list[RunData]) -> str:
    """The runs' verdicts, at the top of the page."""
    parts = []
    for i, run in enumerate(runs):
        word, text = verdict_text(run)
        label = run_label(i, run) + " " if len(runs) > 1 else ""
        parts.append(f'<p class="verdict">{label}<strong class="v-{esc(word)}">{esc(word.replace("_", " ").upper())}'
                     f"</strong> — {esc(text)}</p>")  # fmt: skip
    return "".join(parts)


def summary_table(runs: list[RunData]) -> str:
    head = (
        "<tr><th>run</th><th>directory</th><th>steps</th><th>tokens</th><th>final train loss</th>"
        "<th>best val loss</th><th>verdict</th><th>alerts</th><th>discarded steps</th><th>finished</th></tr>"
    )
    rows = []
    for i, run in enumerate(runs):
        m = run.metrics
        loss, tokens = m.get("loss"), m.get("tokens")
        last_step = int(m.step[-1]) if len(m) else 0
        final_loss = fmt(float(loss[-1])) if loss is not None and len(loss) else "–"
        tok = fmt(int(tokens[-1])) if tokens is not None and len(tokens) and math.isfinite(tokens[-1]) else "–"
        best = "–"
        if run.evals is not None and run.evals.get("val_loss") is not None:
            vals = run.evals.get("val_loss")
            j = int(vals.argmin()) if (vals == vals).any() else None
            if j is not None:
                best = f"{fmt(float(vals[j]))} (step {int(run.evals.step[j])})"
        alerts = "guard off" if run.alerts is None else str(len(run.alerts))
        finished = "yes" if run.summary is not None else "no (stopped, crashed or running)"
        rows.append(
            f"<tr><td>{run_label(i, run)}</td><td><code>{esc(run.path)}</code></td><td class=num>{last_step}</td>"
            f"<td class=num>{tok}</td><td class=num>{final_loss}</td><td class=num>{best}</td>"
            f"<td>{esc(verdict_text(run)[0].replace('_', ' '))}</td><td class=num>{alerts}</td>"
            f"<td class=num>{len(run.discarded)}</td><td>{finished}</td></tr>"
        )
    return f'{verdicts(runs)}<div class="scroll"><table>{head}{"".join(rows)}</table></div>'


def figure_html(item: ReportFigure, svg: str | None) -> str:
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in item.notes)
    body = svg if svg is not None else '<p class="note">No figure: none of the runs has the data it needs.</p>'
    return (
        f'<figure id="{esc(item.key)}"><h3>{esc(item.title)}</h3>{body}{notes}'
        f"<figcaption>{esc(item.caption)}</figcaption></figure>"
    )


def _values_text(values: Any) -> str:
    if isinstance(values, dict):
        return ", ".join(f"{k}={fmt(v)}" for k, v in values.items())
    return str(values)


def alerts_section(runs: list[RunData]) -> str:
    parts = []
    for i, run in enumerate(runs):
        label = run_label(i, run) if len(runs) > 1 else ""
        if run.alerts is None:
            parts.append(f'<p class="note">{label} {esc(run.missing.get("alerts.jsonl", "no alerts.jsonl"))}</p>')
            continue
        if not run.alerts:
            parts.append(f"<p>{label} No alerts: no detector fired.</p>")
            continue
        counts: dict[tuple[str, str], int] = {}
        for a in run.alerts:
            key = (str(a.get("detector", "?")), str(a.get("action", "?")))
            counts[key] = counts.get(key, 0) + 1
        tally = ", ".join(f"{esc(d)} → {esc(a)}: {n}" for (d, a), n in sorted(counts.items()))
        shown = run.alerts[:MAX_ALERT_ROWS]
        rows = "".join(
            f"<tr><td class=num>{esc(a.get('step', ''))}</td><td>{esc(a.get('detector', ''))}</td>"
            f'<td class="act-{esc(a.get("action", ""))}">{esc(a.get("action", ""))}</td>'
            f"<td><code>{esc(_values_text(a.get('values', {})))}</code></td>"
            f"<td>{esc(a.get('explanation', ''))}</td><td>{esc(a.get('suggestion', ''))}</td></tr>"
            for a in shown
        )
        more = (
            f'<p class="note">Showing the first {MAX_ALERT_ROWS} of {len(run.alerts)} alerts; all are in '
            f"{esc(run.path / 'alerts.jsonl')}.</p>"
            if len(run.alerts) > MAX_ALERT_ROWS
            else ""
        )
        parts.append(
            f"<p>{label} {len(run.alerts)} alert(s) — {tally}</p>{more}<div class=scroll><table>"
            "<tr><th>step</th><th>detector</th><th>action</th><th>values</th><th>explanation</th>"
            f"<th>suggestion</th></tr>{rows}</table></div>"
        )
    return "".join(parts)


ENV_KEYS = [
    ("flowtrain_version", "flowtrain"),
    ("torch_version", "torch"),
    ("python_version", "Python"),
    ("device", "device"),
    ("device_name", "device name"),
    ("num_threads", "threads"),
    ("platform", "platform"),
    ("git_commit", "commit"),
    ("started", "started"),
    ("run_dir_version", "run-dir version"),
]


def environment_table(runs: list[RunData]) -> str:
    head = "<tr><th></th>" + "".join(f"<th>{run_label(i, r)}</th>" for i, r in enumerate(runs)) + "</tr>"
    known = {k for k, _ in ENV_KEYS}
    extra = list(dict.fromkeys(k for r in runs for k in r.env if k not in known))
    rows = []
    for key, label in ENV_KEYS + [(k, k) for k in extra]:
        cells = []
        for r in runs:
            value = r.env.get(key)
            cells.append(f"<td><code>{esc(value)}</code></td>" if value is not None else "<td>(unknown)</td>")
        rows.append(f"<tr><th>{esc(label)}</th>{''.join(cells)}</tr>")
    return f'<div class="scroll"><table>{head}{"".join(rows)}</table></div>'


def config_section(runs: list[RunData]) -> str:
    parts = []
    if len(runs) > 1:
        diffs = config_differences(runs)
        if diffs:
            head = "<tr><th>key</th>" + "".join(f"<th>{run_label(i, r)}</th>" for i, r in enumerate(runs)) + "</tr>"
            rows = "".join(
                f"<tr><td><code>{esc(k)}</code></td>{''.join(f'<td>{_cell_value(v)}</td>' for v in vals)}</tr>"
                for k, vals in diffs
            )
            parts.append(f"<h3>Config differences</h3><div class=scroll><table>{head}{rows}</table></div>")
        else:
            parts.append("<h3>Config differences</h3><p>The runs' configs are identical.</p>")
    for i, run in enumerate(runs):
        flat = flatten(run.config)
        if not flat:
            why = esc(run.missing.get("config.yaml", "empty config"))
            parts.append(f'<p class="note">{run_label(i, run)}: {why}</p>')
            continue
        rows = "".join(f"<tr><td><code>{esc(k)}</code></td><td>{_cell_value(v)}</td></tr>" for k, v in flat.items())
        open_attr = " open" if len(runs) == 1 else ""
        parts.append(
            f"<details{open_attr}><summary>Full config of {run_label(i, run)} ({len(flat)} keys)</summary>"
            f"<div class=scroll><table><tr><th>key</th><th>value</th></tr>{rows}</table></div></details>"
        )
    return "".join(parts)


def page(title: str, sections: list[tuple[str, str, str]], subtitle: str) -> str:
    """The whole document; sections are (anchor, heading, inner HTML)."""
    nav = "".join(f'<a href="#{a}">{esc(h)}</a>' for a, h, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{esc(h)}</h2>{inner}</section>' for a, h, inner in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{esc(title)}</h1><p>{subtitle}</p><nav>{nav}</nav>{body}</main></body></html>\n"
    )
