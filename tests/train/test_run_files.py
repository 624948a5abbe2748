"""The run directory as a writer finds it (train/run_files.py): one writer, interrupted writes cleaned up,
announced fallbacks, logs cut back to the checkpoint a run continues from, and a run with no checkpoint
restarted in place."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from flowtrain.config import load_config
from flowtrain.errors import CheckpointError, ConfigError, RunDirError
from flowtrain.rundir import RunDir
from flowtrain.sinks.jsonl import read_jsonl
from flowtrain.train import checkpoint as ckpt
from flowtrain.train import run_files
from flowtrain.train.checkpoint_space import size_estimate
from flowtrain.train.load import config_for_resume
from flowtrain.train.trainer import Trainer
from tests.train import killing


def _cfg(base, name="run", **extra):
    text = base / "corpus.txt"
    if not text.exists():
        killing.corpus(text, kb=20)
    extra = {"train.max_steps": 10, "train.checkpoint_interval": 5, "train.keep_last": 3, **extra}
    return load_config(None, killing.overrides(text, base, name, **extra))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real 10-step run with checkpoints at 5 and 10 (copied by each test that changes it)."""
    base = tmp_path_factory.mktemp("finished")
    return Trainer(_cfg(base)).run_loop().run_dir


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _notes(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("flowtrain: note: ")]


def test_one_writer_per_run_directory(tmp_path):
    root = tmp_path / "runs" / "run"
    held = run_files.claim_fresh(root)
    with pytest.raises(RunDirError, match=f"in use by another flowtrain process \\(PID {os.getpid()} on "):
        run_files.claim_fresh(root)  # two new runs with one name: the second is refused, not let in
    with pytest.raises(RunDirError, match="in use"):
        run_files.lock(root)  # and so is a --resume of it
    (root / "config.yaml").write_text("{}")
    held.release()
    with pytest.raises(ConfigError, match="already exists \\(it has no checkpoint yet: --resume .* starts it over"):
        run_files.claim_fresh(root)
    run_files.lock(root).release()


def test_a_second_resume_of_a_run_is_refused_in_one_line(finished_run, tmp_path):
    """A real second process: exit 2, one line naming the holder's PID."""
    run = _copy(finished_run, tmp_path)
    held = run_files.lock(run)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "flowtrain", "train", "--resume", str(run)],
            capture_output=True,
            text=True,
            env=killing.env(),
            timeout=120,
        )
    finally:
        held.release()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"flowtrain: error: run directory {run} is in use by another flowtrain process (PID {os.getpid()} on "
        f"{os.uname().nodename}): one run directory takes one writer; wait for that process to end (or stop it "
        "with kill -TERM), then try again"
    ]


def test_interrupted_writes_are_cleaned_and_a_checkpoint_moved_aside_comes_back(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    (run.checkpoints / "step_000004").mkdir(parents=True)
    (run.checkpoints / ".step_000008.tmp-abc").mkdir()  # killed while writing checkpoint 8
    (run.checkpoints / ".step_000008.tmp-abc" / "model.safetensors").write_bytes(b"half")
    (run.checkpoints / ".step_000004.old-123").mkdir()  # replaced: the old copy goes
    (run.checkpoints / ".step_000012.old-123").mkdir()  # killed between the two renames of a replacement
    (run.checkpoints / ".step_000012.old-123" / "meta.json").write_text("{}")
    for name in (".metrics.jsonl.x1y2.tmp", "flow.parquet.partial", ".report.html.abc.tmp"):
        (run.root / name).write_text("partial")
    run_files.clean_interrupted(run)
    assert sorted(os.listdir(run.checkpoints)) == ["step_000004", "step_000012"]
    assert (run.checkpoints / "step_000012" / "meta.json").is_file()
    assert sorted(os.listdir(run.root)) == [".report.html.abc.tmp", "checkpoints"]  # not a run file: not ours
    notes = _notes(capsys)
    assert len(notes) == 2 and "put back checkpoint" in notes[0]
    assert "removed the unfinished checkpoint(s)" in notes[1] and ".step_000008.tmp-abc" in notes[1]


def test_a_fallback_to_an_older_checkpoint_is_announced(finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    (run / "checkpoints" / "step_000010" / "meta.json").unlink()
    assert run_files.resume_point(run).step == 5
    assert _notes(capsys) == [
        "flowtrain: note: step_000010 is incomplete (no meta.json): resuming from the newest usable checkpoint, "
        "step_000005, instead"
    ]
    with open(run / "checkpoints" / "step_000005" / "model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    with pytest.raises(CheckpointError, match="none of its checkpoints can be used .*checksum mismatch"):
        run_files.resume_point(run)


def test_damaged_logs_never_block_a_valid_checkpoint(finished_run, tmp_path, capsys):
    """Resuming from step 5: a non-UTF-8 line in metrics.jsonl is dropped with a notice, a truncated
    flow.parquet is kept aside with a notice; rows past the checkpoint go, the ones before stay."""
    run = _copy(finished_run, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_000010")
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run / "metrics.jsonl").write_bytes(b"".join(lines[:2]) + b"\xff\xfe not utf-8\n" + b"".join(lines[2:]) + b"{tor")
    flow = (run / "flow.parquet").read_bytes()
    (run / "flow.parquet").write_bytes(flow[: len(flow) // 2])
    capsys.readouterr()
    run_files.cut_back(RunDir(run), 5, final_eval_redone=False)
    notes = _notes(capsys)
    assert len(notes) == 2, notes
    assert "metrics.jsonl: dropped 1 unreadable line(s)" in notes[0]
    assert "flow.parquet cannot be read" in notes[1] and "kept as flow.parquet.unreadable" in notes[1]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in read_jsonl(run / "eval.jsonl")] == []  # evaluations at 10 only
    assert not (run / "summary.json").exists() and (run / "flow.parquet.unreadable").is_file()
    resumed = Trainer(config_for_resume(run, []), resume_dir=run).run_loop()
    assert resumed.steps == 10 and [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 11))


def test_resuming_a_finished_run_makes_its_final_evaluation_once(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    before = read_jsonl(run / "eval.jsonl")
    Trainer(config_for_resume(run, []), resume_dir=run).run_loop()
    assert read_jsonl(run / "eval.jsonl") == before and (run / "summary.json").is_file()


def test_a_run_without_a_checkpoint_starts_over_in_place(tmp_path, capsys):
    """Stopped before its first checkpoint (here: killed while writing it): --resume restarts it from step 0
    with a notice, and ends with the files of a run that was never interrupted."""
    reference = Trainer(_cfg(tmp_path, "reference")).run_loop().run_dir
    run = tmp_path / "runs" / "run"
    trainer = Trainer(_cfg(tmp_path))
    for step in trainer.steps():
        if step == 3:
            break  # the loop ends (its generator closes): rows 1-3 written, no checkpoint
    (run / "checkpoints" / ".step_000005.tmp-xyz").mkdir(parents=True)
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    with pytest.raises(ConfigError, match="--resume .* starts it over from step 0"):
        Trainer(_cfg(tmp_path))
    capsys.readouterr()
    Trainer(config_for_resume(run, []), resume_dir=run).run_loop()
    notes = _notes(capsys)
    assert any(
        "has no checkpoint yet (it stopped before its first one): starting it over from step 0" in n for n in notes
    )
    assert killing.differences(reference, run) == []
    assert json.loads((run / "summary.json").read_text())["steps"] == 10


def test_a_new_run_that_fails_to_start_leaves_no_directory(tmp_path):
    with pytest.raises(ConfigError):
        Trainer(_cfg(tmp_path, **{"model.vocab_size": 3}))  # smaller than the tokenizer's
    assert not (tmp_path / "runs" / "run").exists()


def test_size_estimate_is_about_what_a_checkpoint_takes(finished_run):
    """Weights, optimizer moments and the small files, within 64 kB (what the out-of-space error quotes)."""
    from flowtrain.optim.optimizers import build_optimizer
    from flowtrain.train.load import load_trained

    path = finished_run / "checkpoints" / "step_000010"
    on_disk = sum(f.stat().st_size for f in path.iterdir())
    loaded = load_trained(finished_run)
    optimizer = build_optimizer(loaded.model, loaded.cfg.optim, "cpu")
    ckpt.restore_optimizer(ckpt.read_checkpoint(path), optimizer)
    assert on_disk <= size_estimate(loaded.model, optimizer) <= on_disk + (64 << 10)
