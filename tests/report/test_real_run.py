"""The report on a real tiny training run (char-level Shakespeare excerpt, 2 layers, 30 steps)."""

import html as html_lib
import re

from flowtrain.config import load_config
from flowtrain.flow.records import read_flow
from flowtrain.report import build_report, load_run
from flowtrain.report.load import TIED_LABELS
from flowtrain.sinks.jsonl import read_jsonl
from flowtrain.train.trainer import Trainer
from tests.conftest import tiny_overrides
from tests.report.test_report import FIGURE_KEYS

FLOW_FIGURES = FIGURE_KEYS[4:]


def test_report_of_a_real_run(small_text, tmp_path):
    cfg = load_config("default", tiny_overrides(small_text, tmp_path, **{"train.max_steps": 30}))
    run_dir = Trainer(cfg).run_loop().run_dir
    run = load_run(run_dir)
    # what the report loaded is what the trainer wrote
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert run.metrics.step.tolist() == [r["step"] for r in records]
    assert run.metrics.get("loss").tolist() == [r["loss"] for r in records]
    assert run.evals.step.tolist() == [10, 20, 30]
    assert run.config["model"]["n_layer"] == 2 and run.env["torch_version"]

    html = build_report([run_dir], tmp_path / "report.html").read_text()
    figures = dict(re.findall(r'<figure id="(\w+)">(.*?)</figure>', html, re.S))
    assert set(figures) == set(FIGURE_KEYS)
    for key in FIGURE_KEYS[:4]:
        assert "<svg" in figures[key], key
    has_flow = (run_dir / "flow.parquet").is_file()
    for key in FLOW_FIGURES:  # drawn when the trainer wrote flow statistics, else said so in place
        assert ("<svg" in figures[key]) == has_flow, key
        if not has_flow:
            assert "flow.parquet not found" in figures[key]
    if has_flow:
        assert run.layer_flow.names[0] == "embedding" and run.layer_flow.names[-1] == "head"
        assert run.depth_flow.names == ["h0", "h1", "h2"]
        # the default model ties its head to the embedding: the shared matrix is in "embedding", and "head"
        # holds the final norm alone, which is what the figures' labels say
        assert cfg.model.tie_embeddings and run.layer_flow.labels[0] == TIED_LABELS["embedding"]
        table = read_flow(run_dir / "flow.parquet").to_pydict()
        head = {n for n, k, lay in zip(table["name"], table["kind"], table["layer"]) if k == "tensor" and lay == "head"}
        assert head and all(n.startswith("norm_f.") for n in head), head
        assert html_lib.escape(TIED_LABELS["embedding"]) in figures["grad_flow_heatmap"]
    assert "clip.max_norm = 1" in figures["grad_norm_clipping"]


def test_the_report_opens_with_the_verdict_the_guard_wrote(small_text, tmp_path):
    """A healthy run and one with an induced LR far too high: the top of the page says which is which."""
    runs = []
    for name, extra in (("calm", {}), ("hot", {"optim.lr": 10.0, "guard.loss_spike": "warn"})):
        over = tiny_overrides(small_text, tmp_path, **{"train.max_steps": 30, "train.run_name": name, **extra})
        runs.append(Trainer(load_config("default", over)).run_loop().run_dir)
    html = build_report(runs, tmp_path / "report.html").read_text()
    top = html[: html.index("<table")]
    assert 'calm <strong class="v-healthy">HEALTHY</strong>' in top
    assert 'class="v-lr_too_high">LR TOO HIGH</strong>' in top and "lower optim.lr" in top
