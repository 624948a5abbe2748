"""Real `flowtrain train` processes killed at the worst moments, then resumed: the run's files and weights end
up identical to an uninterrupted run's (wall-clock fields aside). benchmarks/kill_trials.py does the same at
random moments, many times."""

from __future__ import annotations

import re
import signal

import pytest

from flowtrain.sinks.jsonl import read_jsonl
from flowtrain.train import checkpoint as ckpt
from tests.train import killing as k


@pytest.mark.slow
def test_killed_stopped_and_resumed_run_ends_identical_to_an_uninterrupted_one(tmp_path):
    text = k.corpus(tmp_path / "corpus.txt")
    run = tmp_path / "runs" / "run"
    reference = k.start(k.overrides(text, tmp_path, "reference"))  # alongside the interrupted one
    started = [reference]
    try:
        # kill -9 inside a checkpoint write (its temporary directory outlives the process)
        landed, tries = k.kill_during_checkpoint_write(k.overrides(text, tmp_path, "run"), run)
        assert landed, f"no kill landed inside a checkpoint write in {tries} tries"

        # kill -9 the moment a checkpoint appears: the rows before it are on disk already
        proc = k.kill_after_new_checkpoint(["--resume", run], run)
        started.append(proc)
        rc, _, err = k.finish(proc)
        assert rc == -signal.SIGKILL, err
        assert "removed the unfinished checkpoint(s) an interrupted run left" in err, err
        newest = max(k.checkpoint_steps(run))
        assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")][:newest] == list(range(1, newest + 1))

        # Ctrl-C: the step finishes, a checkpoint is written, exit 130, and the message names the checkpoint
        # (SIGTERM does the same with exit 0: test_distributed.py; a second signal: test_interrupts.py)
        proc = k.start(["--resume", run])
        started.append(proc)
        k.poll(proc, lambda: k.logged_steps(run) >= max(k.checkpoint_steps(run)) + 2, every=0.002)
        proc.send_signal(signal.SIGINT)
        rc, _, err = k.finish(proc)
        stopped = re.search(r"stopped by SIGINT after step (\d+), checkpoint (\S+) holds it", err)
        assert rc == 130 and stopped, err
        assert ckpt.read_checkpoint(stopped.group(2)).step == int(stopped.group(1))

        rc, _, err = k.finish(k.start(["--resume", run]))
        assert rc == 0, err
        assert k.finish(reference)[0] == 0
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert k.differences(tmp_path / "runs" / "reference", run) == []
    assert not k.writing_checkpoint(run) and not (run / "flow.parquet.partial").exists()
