"""flowtrain.watch in a plain loop: training is bitwise unchanged, the run directory is standard (report and
diagnose read it), the norms it records are the loop's own, and bad use is a one-line error."""

import json

import pytest
import torch
from torch.nn import functional as F

import flowtrain
from flowtrain import cli
from flowtrain.errors import ConfigError, FlowtrainError, RunDirError
from flowtrain.flow import FlowConfig
from flowtrain.flow.guard import GuardConfig
from flowtrain.model.config import ModelConfig
from flowtrain.model.gpt import GPT


def train(steps, run_dir=None, max_norm=0.1, seed=0):
    """flowtrain's GPT (dropout on, so the RNG is part of the math) in a plain loop, watched or not."""
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32, embd_dropout=0.1, resid_dropout=0.1)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    watcher = flowtrain.watch(model, opt, run_dir, flow=FlowConfig(interval=2)) if run_dir else None
    seen = []
    for _ in range(steps):
        for _micro in range(2):  # gradient accumulation
            idx = torch.randint(0, 32, (2, 9))
            loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()) / 2
            loss.backward()
        if watcher:
            watcher.after_backward()
        pre = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        post = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        seen.append((float(pre), float(post)))
        opt.step()
        if watcher:
            watcher.after_step(loss)
        opt.zero_grad()
    if watcher:
        watcher.close()
    return model, seen


def test_watching_changes_nothing_bitwise(tmp_path):
    bare, _ = train(6)
    watched, _ = train(6, tmp_path / "run")
    for (name, a), b in zip(bare.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_the_run_directory_holds_the_loops_numbers_and_reads_like_any_run(tmp_path, capsys):
    run = tmp_path / "run"
    _, seen = train(12, run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for row, (pre, post) in zip(rows, seen, strict=True):  # clip_grad_norm_ returns the pre-clip norm
        assert row["grad_norm_preclip"] == pytest.approx(pre, rel=1e-6)
        assert row["grad_norm_postclip"] == pytest.approx(post, rel=1e-6) and row["clipped"] is True
        assert row["lr"] == 3e-3 and row["loss"] > 0
    for name in ("config.yaml", "env.json", "flow.parquet", "alerts.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    assert cli.main(["report", str(run)]) == 0 and (run / "report.html").is_file()
    assert cli.main(["diagnose", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.split("\n", 1)[1])  # after the report's line
    assert result["verdict"] in ("healthy", "lr_too_high") and result["steps"] == [3, 5, 7, 9, 11]
    assert cli.main(["diagnose", str(run), "model.n_layer=3"]) == 2
    assert "judged as recorded" in capsys.readouterr().err


def test_bad_use_is_a_one_line_error(tmp_path):
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="guard.loss_spike=rollback: flowtrain only watches"):
        flowtrain.watch(model, opt, tmp_path / "a", guard=GuardConfig(loss_spike="rollback"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    with pytest.raises(RunDirError, match="already exists and is not empty"):
        flowtrain.watch(model, opt, tmp_path / "b")
    with flowtrain.watch(model, opt, tmp_path / "c") as watcher:
        with pytest.raises(RunDirError, match="in use by another process"):
            flowtrain.watch(model, opt, tmp_path / "c")
        with pytest.raises(FlowtrainError, match="after_step\\(\\) without after_backward\\(\\)"):
            watcher.after_step()
    with pytest.raises(FlowtrainError, match="takes a torch.optim.Optimizer"):
        flowtrain.watch(model, None, tmp_path / "d")


def test_a_model_without_blocks_is_reported_and_diagnosed_as_inconclusive(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with flowtrain.watch(model, opt, tmp_path / "run", flow=FlowConfig(interval=1)) as watcher:
        for _ in range(6):
            loss = F.mse_loss(model(torch.randn(5, 4)), torch.zeros(5, 2))
            loss.backward()
            watcher.after_backward()
            opt.step()
            watcher.after_step(loss)
            opt.zero_grad()
    assert cli.main(["diagnose", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "verdict: INCONCLUSIVE" in out and "no repeated blocks found in Sequential" in out
    assert cli.main(["report", str(tmp_path / "run")]) == 0
    page = (tmp_path / "run" / "report.html").read_text()
    assert "INCONCLUSIVE" in page and "act_rms is not available for this model" in page


def test_a_missing_framework_says_what_to_install(monkeypatch):
    import importlib
    import re
    import sys

    for framework, module, hint in (("transformers", "hf", "pip install 'transformers[torch]'"),
                                    ("lightning", "lightning", "pip install lightning")):  # fmt: skip
        monkeypatch.setitem(sys.modules, framework, None)  # what `import` finds for a package not installed
        monkeypatch.delitem(sys.modules, f"flowtrain.integrations.{module}", raising=False)
        with pytest.raises(ImportError, match=re.escape(hint)) as caught:
            importlib.import_module(f"flowtrain.integrations.{module}")
        assert isinstance(caught.value, FlowtrainError)
