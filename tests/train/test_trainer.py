"""End-to-end behaviour of the trainer on a tiny real run (char-level Shakespeare excerpt)."""

import json
import math
import os
import stat

import numpy as np
import pytest

from flowtrain.config import load_config
from flowtrain.sinks.jsonl import read_jsonl
from flowtrain.train.load import config_for_resume
from flowtrain.train.trainer import Trainer
from tests.conftest import tiny_overrides


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_jsonl(run_dir / "metrics.jsonl")]


def test_run_directory_contract(small_text, tmp_path):
    cfg = load_config("default", tiny_overrides(small_text, tmp_path, **{"log.tensorboard": True}))
    old_umask = os.umask(0o022)  # a shared machine's usual umask: what the run writes, colleagues can read
    try:
        summary = Trainer(cfg).run_loop()
    finally:
        os.umask(old_umask)
    run = summary.run_dir
    checkpoint = run / "checkpoints" / "step_000020"
    for path in (run / "config.yaml", run / "env.json", run / "summary.json", checkpoint / "model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o755
    assert summary.steps == 20
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 21))
    for r in records:
        assert {"loss", "lr", "grad_norm_preclip", "grad_norm_postclip", "clip_coef", "clipped", "tokens_per_s"} <= set(
            r
        )
        assert r["grad_norm_postclip"] <= 1.0 + 1e-5
        assert math.isclose(r["grad_norm_postclip"], r["grad_norm_preclip"] * r["clip_coef"], rel_tol=1e-4)
    evals = read_jsonl(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [10, 20]
    assert all(e["val_bpb"] > 0 and math.isclose(e["val_ppl"], math.exp(e["val_loss"])) for e in evals)
    assert (run / "config.yaml").is_file() and (run / "env.json").is_file()
    env = json.loads((run / "env.json").read_text())
    assert not {"cpu_kernels", "cpu_hooks", "tensorboard_checksum"} & set(env)  # gone with the C++ and the patch
    assert env["cpu_allocator"] and env["run_dir_version"] == 1
    assert env["optimizer_step"] == "Muon: torch's for-loop step + AdamW: torch's fused step"  # the default: muon
    assert json.loads((run / "summary.json").read_text())["steps"] == 20
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000010", "step_000020"]
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert isinstance(summary.sample, str) and summary.sample


def test_tensorboard_events_hold_the_scalars(small_text, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(
        "default", tiny_overrides(small_text, tmp_path, **{"log.tensorboard": True, "train.max_steps": 6})
    )
    run = Trainer(cfg).run_loop().run_dir
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss", "grad_norm_preclip", "lr", "val_loss"} <= set(tags)
    # the microscope's per-layer series
    assert {"grad_norm_by_layer/embedding", "grad_norm_by_layer/block.1", "update_ratio_by_layer/block.0"} <= set(tags)
    assert len(acc.Scalars("grad_norm_by_layer/block.0")) == 6
    tb_loss = [e.value for e in acc.Scalars("loss")]
    jsonl_loss = [r["loss"] for r in read_jsonl(run / "metrics.jsonl")]
    assert tb_loss == pytest.approx(jsonl_loss, rel=1e-6)


@pytest.mark.parametrize("extra", [{}, {"train.grad_accum": 2, "model.embd_dropout": 0.1}])
def test_resume_is_bitwise_identical(small_text, tmp_path, extra):
    """2N steps straight == N steps, stop, resume, N more: identical losses at every step (CPU)."""
    straight = load_config("default", tiny_overrides(small_text, tmp_path, **{"train.run_name": "straight", **extra}))
    full = Trainer(straight).run_loop()

    split = load_config("default", tiny_overrides(small_text, tmp_path, **{"train.run_name": "split", **extra}))
    first = Trainer(split, stop_after=10).run_loop()
    assert first.steps == 10 and not (first.run_dir / "summary.json").exists()
    resumed = Trainer(config_for_resume(first.run_dir, []), resume_dir=first.run_dir).run_loop()
    assert resumed.steps == 20

    assert _losses(resumed.run_dir) == _losses(full.run_dir)
    assert [e["val_loss"] for e in read_jsonl(resumed.run_dir / "eval.jsonl")] == [
        e["val_loss"] for e in read_jsonl(full.run_dir / "eval.jsonl")
    ]


def test_microscope_on_or_off_trains_bitwise_identically(small_text, tmp_path):
    """The trainer shares the microscope's gradient norms with the clipper: the math must not move a bit."""
    losses = {}
    for flow in ("true", "false"):
        cfg = load_config(
            "default",
            tiny_overrides(
                small_text,
                tmp_path,
                **{
                    "flow.enabled": flow,
                    "train.run_name": f"flow-{flow}",
                    "model.embd_dropout": 0.1,
                    "train.grad_accum": 2,
                    "clip.max_norm": 0.5,
                },
            ),
        )
        run = Trainer(cfg).run_loop().run_dir
        losses[flow] = [(r["loss"], r["grad_norm_preclip"], r["clip_coef"]) for r in read_jsonl(run / "metrics.jsonl")]
    assert losses["true"] == losses["false"]


def test_logging_every_n_steps_still_records_every_monitored_step(small_text, tmp_path):
    """log.interval=4: metrics.jsonl has every 4th step, but flow.parquet and the per-layer TensorBoard series
    have every step, with the same numbers a run logging every step records (checkpoints at 5 and 10 fall
    between logging steps: the records before them are written first)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flowtrain.flow.records import read_flow

    tables, runs = {}, {}
    for every in (1, 4):
        overrides = {
            "train.run_name": f"log{every}",
            "log.interval": every,
            "log.tensorboard": True,
            "flow.interval": 1,
            "train.max_steps": 10,
            "train.checkpoint_interval": 5,
            "train.sample_tokens": 0,
        }
        runs[every] = Trainer(load_config("default", tiny_overrides(small_text, tmp_path, **overrides))).run_loop()
        table = read_flow(runs[every].run_dir / "flow.parquet").to_pydict()
        tables[every] = {k: v for k, v in table.items() if k != "flow_ms"}  # the microscope's own timing
    assert [r["step"] for r in read_jsonl(runs[4].run_dir / "metrics.jsonl")] == [4, 8, 10]
    assert sorted(set(tables[4]["step"])) == list(range(1, 11))
    assert tables[4].keys() == tables[1].keys()
    for column, values in tables[1].items():
        np.testing.assert_array_equal(np.array(tables[4][column]), np.array(values), err_msg=column)  # NaN == NaN
    acc = EventAccumulator(str(runs[4].run_dir / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("grad_norm_by_layer/block.0")] == list(range(1, 11))


def test_rows_written_in_groups_are_the_rows_written_at_every_step(small_text, tmp_path):
    """log.flush_rows=7 (groups that straddle the evaluations and checkpoints at 10 and 20, and a last group cut
    short by the end) writes the same metrics rows, microscope scalars included, and the same TensorBoard
    values as writing every row at its step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    timing = {"tokens_per_s", "step_time_ms", "mfu", "flow_ms"}  # wall-clock figures differ between runs
    rows, tb = {}, {}
    for group in (1, 7):
        overrides = {
            "train.run_name": f"rows{group}",
            "log.flush_rows": group,
            "log.flush_seconds": 3600,
            "log.tensorboard": True,
            "flow.interval": 1,
            "train.sample_tokens": 0,
        }
        run = Trainer(load_config("default", tiny_overrides(small_text, tmp_path, **overrides))).run_loop().run_dir
        rows[group] = [{k: v for k, v in r.items() if k not in timing} for r in read_jsonl(run / "metrics.jsonl")]
        acc = EventAccumulator(str(run / "tb"))
        acc.Reload()
        tb[group] = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert [r["step"] for r in rows[7]] == list(range(1, 21))
    assert all("update_norm" in r and "logits_lse_mean" in r for r in rows[7])  # each row has its record's scalars
    assert rows[7] == rows[1]
    assert tb[7].keys() == tb[1].keys() and "grad_norm_by_layer/block.0" in tb[7]
    for tag, values in tb[1].items():
        if tag.split("/")[-1] not in timing:
            assert tb[7][tag] == values, tag


class _Recorder:
    """A sink that notes the steps of the metrics rows it is given (not the evaluations' rows)."""

    def __init__(self):
        self.steps = []

    def write(self, step, scalars):
        if "loss" in scalars:
            self.steps.append(step)

    def close(self):
        pass


@pytest.mark.parametrize(
    ("flush_rows", "flush_seconds", "latest"),
    [
        (4, 3600, [0, 0, 4, 4, 4, 4, 8, 8, 10, 11]),  # groups of 4; all before the evaluations at 10 and 11
        (4, 1e-9, list(range(2, 12))),  # each row would wait too long for the next: written at its own step
    ],
)
def test_rows_are_written_in_groups_or_before_they_wait_too_long(
    small_text, tmp_path, flush_rows, flush_seconds, latest
):
    """After each of steps 2-11, the newest step whose row the sinks have (a sink added after step 1)."""
    overrides = {"log.flush_rows": flush_rows, "log.flush_seconds": flush_seconds, "train.max_steps": 11}
    trainer = Trainer(load_config("default", tiny_overrides(small_text, tmp_path, **overrides)))
    loop = trainer.steps()
    next(loop)
    recorder = _Recorder()
    trainer.log.sinks.append(recorder)  # the loop's own list of sinks
    assert [max(recorder.steps, default=0) for _ in loop] == latest
    assert recorder.steps == list(range(1 if flush_seconds > 1 else 2, 12))  # each row once, in order


def test_a_window_of_steps_logs_them_and_saves_no_checkpoint(small_text, tmp_path):
    """steps(until=N) runs steps 1..N (what flowtrain diagnose drives), checkpointing only at the interval."""
    trainer = Trainer(load_config("default", tiny_overrides(small_text, tmp_path, **{"train.sample_tokens": 0})))
    assert list(trainer.steps(until=3)) == [1, 2, 3]
    assert [step for step, _ in _losses(trainer.run.root)] == [1, 2, 3]
    assert not (trainer.run.root / "checkpoints").exists()


def test_steps_drives_the_loop_one_iteration_at_a_time(small_text, tmp_path):
    """Trainer.steps() is run_loop's loop: the same losses step by step; closing it early closes the sinks
    (metrics.jsonl holds the steps done, also those whose rows were still waiting for their group) and leaves no
    summary.json (the run is not finished)."""
    whole = Trainer(load_config("default", tiny_overrides(small_text, tmp_path, **{"train.run_name": "whole"})))
    whole_run = whole.run_loop().run_dir
    stepped = Trainer(load_config("default", tiny_overrides(small_text, tmp_path, **{"train.run_name": "stepped"})))
    loop = stepped.steps()
    assert [next(loop) for _ in range(7)] == list(range(1, 8))
    loop.close()
    run = stepped.run.root
    assert _losses(run) == _losses(whole_run)[:7]
    assert not (run / "summary.json").exists()


@pytest.mark.parametrize("enabled", [True, False])
def test_a_compiled_run_runs_its_monitored_steps_eagerly(small_text, tmp_path, enabled):
    """train.compile=true: the compiled module between monitored steps, the same module uncompiled on them
    (tests/train/test_step.py runs such a state and counts the graphs); without the microscope, always compiled."""
    cfg = load_config("default", tiny_overrides(small_text, tmp_path, **{"train.compile": True, "flow.interval": 2,
                                                                        "flow.enabled": enabled}))  # fmt: skip
    state = Trainer(cfg).state  # torch.compile compiles at the first call: none is made here
    assert state.eager_model is not None and state.model is not state.eager_model
    for step in range(4):
        state.monitor.step_index = step
        eager = enabled and step % 2 == 0
        assert state.forward_model() is (state.eager_model if eager else state.model), step
