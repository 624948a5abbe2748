"""Bad inputs of issue 21 through the command's own entry point (cli.main, in this process: the same code path
as `flowtrain ...`, without a process start per case): exit 2 and exactly one line, or a notice where the input
is not an error. benchmarks/bad_inputs.py tries these and more as separate processes."""

from __future__ import annotations

import pytest

from flowtrain import cli
from flowtrain.config import load_config
from flowtrain.train.trainer import Trainer
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run (checkpoints at 2 and 4) and a diverged one, trained once for the module."""
    from tests.conftest import write_corpus

    tmp = tmp_path_factory.mktemp("inputs")
    text = write_corpus(tmp / "small.txt")
    extra = {"train.max_steps": 4, "train.checkpoint_interval": 2, "train.eval_interval": 2, "train.sample_tokens": 0}
    Trainer(load_config("default", tiny_overrides(text, tmp, **extra))).run_loop()
    nan = {**extra, "optim.lr": 1e30, "guard.enabled": False, "train.run_name": "nan"}
    Trainer(load_config("default", tiny_overrides(text, tmp, **nan))).run_loop()
    return tmp / "runs"


def _main(capsys, *argv) -> tuple[int, list[str]]:
    code = cli.main([str(a) for a in argv])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _one_error(capsys, *argv) -> str:
    code, lines = _main(capsys, *argv)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("flowtrain: error: "), lines
    return lines[0]


@pytest.mark.parametrize("command", [["train", "--resume"], ["diagnose"], ["report"]])
def test_invalid_yaml_in_a_runs_config_is_one_line_naming_it(trained, tmp_path, capsys, command):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained / "tiny", run)
    (run / "config.yaml").write_text("model: [unclosed\n  n_layer: 2\n")
    line = _one_error(capsys, *command, run)
    assert f"{run / 'config.yaml'} is not valid YAML (" in line and "at line 2" in line
    if command[0] != "report":  # the checkpoint's verified copy is the fix
        assert line.endswith(f"restore it from {run / 'checkpoints' / 'step_000004' / 'config.yaml'}")


def test_stop_after_is_checked_before_anything_runs(trained, capsys):
    line = _one_error(capsys, "train", "--resume", trained / "tiny", "--stop-after", "4")
    assert "--stop-after 4: the run is already at step 4" in line
    assert "give the step to stop after, >= 1" in _one_error(
        capsys, "train", "--stop-after", "0", "train.tune_allocator=false"
    )


def test_a_diverged_run_samples_as_one_line_and_reports_with_notices(trained, tmp_path, capsys):
    line = _one_error(capsys, "sample", trained / "nan")
    assert "logits are not finite" in line and "--checkpoint STEP" in line
    metrics = trained / "nan" / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b"\xff\xfe not UTF-8\n")
    code, lines = _main(capsys, "report", trained / "nan", "-o", tmp_path / "r.html")
    assert code == 0 and lines == [f"flowtrain: {metrics}: skipped 1 damaged line(s) (not UTF-8 JSON records)"]
    assert "skipped 1 damaged line(s)" in (tmp_path / "r.html").read_text()
