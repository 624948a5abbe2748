"""The HTML report end to end on synthetic run directories: sections, figures, escaping, files, CLI."""

import re

import pytest
from PIL import Image

from flowtrain.cli import main
from flowtrain.errors import FlowtrainError
from flowtrain.report import build_report
from tests.report.conftest import write_run

FIGURE_KEYS = [
    "loss_vs_step",
    "loss_vs_tokens",
    "learning_rate",
    "grad_norm_clipping",
    "grad_flow_heatmap",
    "residual_gradient_profile",
    "grad_flow_bars",
    "update_weight_ratio",
    "activation_rms",
    "attention",
]
SECTIONS = ["summary", "loss", "optimizer", "flow", "updates", "alerts", "config", "environment"]


def _figure(html: str, key: str) -> str:
    """The <figure> element with this id."""
    m = re.search(rf'<figure id="{key}">(.*?)</figure>', html, re.S)
    assert m, f"figure {key} missing"
    return m.group(1)


def test_single_run_has_every_section_and_figure(tmp_path):
    run = write_run(tmp_path, name="alpha", steps=30, rollback=(12, 3))
    out = build_report([run], tmp_path / "out" / "report.html")
    html = out.read_text()
    for s in SECTIONS:
        assert f'<section id="{s}">' in html
    for key in FIGURE_KEYS:
        assert "<svg" in _figure(html, key), key
    assert html.count("<svg") == len(FIGURE_KEYS)
    # self-contained: no scripts, no external resources (in-page anchors and inline data: images only)
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert not re.search(r'(src|href)="(?!#|data:image/png;base64,)', html)
    assert '<image xlink:href="data:image/png;base64,' in _figure(html, "grad_flow_heatmap")
    # threshold, discarded steps, alerts table, env facts
    assert "clip.max_norm = 1" in _figure(html, "grad_norm_clipping")
    assert "discarded (3 steps)" in _figure(html, "loss_vs_step")
    assert "loss_spike" in html and "lower optim.lr" in html and "z=6.5, norm=nan" in html
    assert "2.13.0" in html and "abc123" in html
    assert list((tmp_path / "out").iterdir()) == [out]  # atomic write leaves no temporaries


def test_user_strings_are_escaped(tmp_path):
    evil = "<script>alert(1)</script>"
    run = write_run(
        tmp_path / "runs", name=evil, steps=15, alert_text="<img src=x onerror=alert(2)>", run_name_in_config=evil
    )
    assert run.name == "script>"  # the '/' made a nested directory: runs/<script>alert(1)< / script>
    html = build_report([run], tmp_path / "r.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html
    assert "<script" not in html.lower() and "<img" not in html.lower()


def test_dollar_signs_in_names_do_not_break_figures(tmp_path):
    run = write_run(tmp_path, name="cost$1$_{x}", steps=12, flow=False)
    html = build_report([run], tmp_path / "r.html").read_text()
    assert html.count("<svg") == 4  # loss x2, lr, grad norm: every figure without flow statistics
    assert "cost$1$_{x}" in html


def test_missing_files_are_said_in_place(tmp_path):
    run = write_run(tmp_path, name="bare", flow=False, alerts=False, evals=False)
    html = build_report([run], tmp_path / "r.html").read_text()
    for key in ("grad_flow_heatmap", "residual_gradient_profile", "grad_flow_bars", "update_weight_ratio"):
        fig = _figure(html, key)
        assert "<svg" not in fig and "flow.parquet not found" in fig
    assert "<svg" in _figure(html, "loss_vs_step") and "no evaluations" in _figure(html, "loss_vs_step")
    assert "alerts.jsonl not found" in html


def test_several_runs_overlay_and_diff_configs(tmp_path):
    a = write_run(tmp_path, name="a", lr=1e-3, steps=20)
    b = write_run(tmp_path, name="b", lr=3e-4, steps=25, flow=False)
    html = build_report([a, b], tmp_path / "r.html").read_text()
    diff = re.search(r"<h3>Config differences</h3>(.*?)</table>", html, re.S).group(1)
    assert "optim.lr" in diff and "0.0003" in diff and "0.001" in diff
    assert "model.n_layer" not in diff  # equal in both
    loss = _figure(html, "loss_vs_step")
    assert "a train" in loss and "b train" in loss  # one legend entry per run
    assert "b: flow.parquet not found" in _figure(html, "grad_flow_heatmap")


def test_duplicate_names_are_disambiguated(tmp_path):
    a = write_run(tmp_path / "x", name="tiny", flow=False)
    b = write_run(tmp_path / "y", name="tiny", flow=False)
    html = build_report([a, b], tmp_path / "r.html").read_text()
    assert "x/tiny#1" in html and "y/tiny#2" in html


def test_figures_dir_gets_png_and_svg(tmp_path):
    run = write_run(tmp_path, name="alpha", steps=12)
    build_report([run], tmp_path / "r.html", figures_dir=tmp_path / "figs")
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == sorted([f"{k}.png" for k in FIGURE_KEYS] + [f"{k}.svg" for k in FIGURE_KEYS])
    im = Image.open(tmp_path / "figs" / "grad_flow_heatmap.png").convert("RGB")
    assert im.width > 500 and len(im.getcolors(1 << 24)) > 20
    assert (tmp_path / "figs" / "attention.svg").read_text().lstrip().startswith("<?xml")


def test_cli_report(tmp_path, capsys):
    run = write_run(tmp_path, name="alpha", steps=12, flow=False)
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file() and "report:" in capsys.readouterr().out
    assert main(["report", str(run), str(run), "-o", str(tmp_path / "two.html"), "--figures", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "loss_vs_step.svg").is_file()
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["report", str(run), str(run)]) == 2
    assert "-o" in capsys.readouterr().err.splitlines()[-1]


def test_bad_outputs(tmp_path):
    run = write_run(tmp_path, name="alpha", steps=12, flow=False)
    with pytest.raises(FlowtrainError, match="is a directory"):
        build_report([run], tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FlowtrainError, match="not a directory"):
        build_report([run], tmp_path / "r.html", figures_dir=tmp_path / "file")
    with pytest.raises(FlowtrainError, match="no run directory"):
        build_report([], tmp_path / "r.html")
