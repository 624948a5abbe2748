"""Fault injection on real tiny training runs: the guard skips, rolls back and stops as configured."""

import json

import pytest
import torch

from flowtrain.config import load_config
from flowtrain.errors import GuardStop
from flowtrain.sinks.jsonl import read_jsonl
from flowtrain.train import checkpoint as ckpt
from flowtrain.train.step import train_step
from flowtrain.train.trainer import Trainer
from tests.conftest import tiny_overrides


def _trainer(text, tmp_path, **extra):
    return Trainer(load_config("default", tiny_overrides(text, tmp_path, **extra)))


def _state(tr):
    weights = {k: v.clone() for k, v in tr.raw_model.state_dict().items()}
    opt = {
        i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for i, s in enumerate(tr.state.optimizer.state.values())
    }
    return weights, opt


def _same(a, b):
    (wa, oa), (wb, ob) = a, b
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for i in oa:
        for k in oa[i]:
            va, vb = oa[i][k], ob[i][k]
            assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb, (i, k)


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_nan_gradient_step_is_skipped_bitwise(small_text, tmp_path, implementation):
    """NaN in one gradient at step k: no weight or optimizer-state change, the alert names the tensor."""
    tr = _trainer(small_text, tmp_path, **{"optim.implementation": implementation})
    for _ in range(5):
        train_step(tr.state)
    before = _state(tr)
    target = dict(tr.raw_model.named_parameters())[_mlp_weight(tr)]
    handle = target.register_hook(lambda g: torch.full_like(g, float("nan")))
    out = train_step(tr.state)
    handle.remove()
    assert out.verdict.action == "skip"
    (alert,) = [a for a in out.verdict.alerts if a.detector == "nonfinite"]
    assert _mlp_weight(tr) in alert.explanation
    _same(before, _state(tr))
    for _ in range(3):  # and training goes on normally
        out = train_step(tr.state)
        assert out.verdict.action == "proceed" and torch.isfinite(out.loss)
    assert tr.state.guard.skipped_steps == 1


def _mlp_weight(tr):
    """The first MLP weight of the second block, by its model name."""
    return next(n for n, _ in tr.raw_model.named_parameters() if n.startswith("blocks.1.") and "mlp" in n)


def test_nan_run_finishes_and_records_the_skip(small_text, tmp_path):
    tr = _trainer(small_text, tmp_path, **{"train.max_steps": 12})
    name = _mlp_weight(tr)
    param = dict(tr.raw_model.named_parameters())[name]
    param.register_hook(lambda g: torch.full_like(g, float("inf")) if tr.step == 6 else g)
    summary = tr.run_loop()
    assert summary.steps == 12
    alerts = read_jsonl(summary.run_dir / "alerts.jsonl")
    assert [(a["step"], a["detector"], a["action"]) for a in alerts] == [(7, "nonfinite", "skip")]
    assert name in alerts[0]["explanation"] and alerts[0]["suggestion"]
    metrics = read_jsonl(summary.run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics if m["skipped"]] == [7]
    assert json.loads((summary.run_dir / "summary.json").read_text())["skipped_steps"] == 1


def _served(tr):
    """The batch numbers the loader serves to training steps, recorded as they go (after the fault's transform)."""
    loader, numbers = tr.state.loader, []
    fault = loader.transform

    def record(batch, number):
        numbers.append(number)
        return fault(batch, number) if fault else batch

    loader.transform = record
    return numbers


SPIKE_RUN = {
    "train.max_steps": 160,
    "train.eval_interval": 160,
    "train.eval_batches": 8,
    "train.checkpoint_interval": 80,
    "guard.snapshot_interval": 20,
    "guard.rollback_extra_skip": 10,
}


def test_loss_spike_rolls_back_skips_the_data_and_recovers(small_text, tmp_path):
    clean = _trainer(small_text, tmp_path, **{**SPIKE_RUN, "train.run_name": "clean"}).run_loop()

    corrupt = {"fault.corrupt_data_from": 101, "fault.corrupt_data_batches": 6}
    spiky = _trainer(small_text, tmp_path, **{**SPIKE_RUN, **corrupt, "train.run_name": "spiky"}).run_loop()

    alerts = read_jsonl(spiky.run_dir / "alerts.jsonl")
    spikes = [a for a in alerts if a["detector"] == "loss_spike"]
    assert spikes and spikes[0]["step"] == 101 and spikes[0]["action"] == "rollback"  # within 1 step
    rollbacks = [a for a in alerts if a["detector"] == "guard" and a["action"] == "rollback"]
    # the snapshot at step 100 was not confirmed yet (10 clean steps): back to the one at 80
    assert len(rollbacks) == 1 and rollbacks[0]["values"]["to_step"] == 80
    assert spiky.steps == 160
    # the undone step stays visible but flagged; the surviving history has every step once
    metrics = read_jsonl(spiky.run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics if m.get("discarded")] == list(range(81, 102))
    assert [m["step"] for m in metrics if not m.get("discarded")] == list(range(1, 161))
    final_clean = read_jsonl(clean.run_dir / "eval.jsonl")[-1]["val_loss"]
    final_spiky = read_jsonl(spiky.run_dir / "eval.jsonl")[-1]["val_loss"]
    assert abs(final_spiky - final_clean) / final_clean < 0.05


def test_repeated_failures_exhaust_the_budget_and_stop(small_text, tmp_path):
    endless = {"fault.corrupt_data_from": 91, "fault.corrupt_data_batches": 10**6}
    tr = _trainer(small_text, tmp_path, **{**SPIKE_RUN, **endless, "guard.max_rollbacks": 2,
                                           "guard.rollback_lr_factor": 0.5})  # fmt: skip
    base = list(tr.state.scheduler.base_lrs)
    with pytest.raises(GuardStop, match="rollback budget|rollback\\(s\\)"):
        tr.run_loop()
    # the LR factor compounds over rollbacks, even when both return to the same snapshot
    assert tr.recovery.lr_scale == 0.25 and tr.state.scheduler.base_lrs == [b * 0.25 for b in base]
    run = tr.run.root
    actions = [(a["detector"], a["action"]) for a in read_jsonl(run / "alerts.jsonl")]
    assert actions.count(("guard", "rollback")) == 2 and actions[-1] == ("guard", "stop")
    saved = ckpt.list_checkpoints(run / "checkpoints")
    assert [s for s, _ in saved] == [80]  # what was saved is still there, and still loads
    ckpt.read_checkpoint(saved[0][1])
    assert not (run / "summary.json").exists()


def test_rollbacks_into_one_corrupted_region_never_serve_a_skipped_batch_again(small_text, tmp_path):
    """Four rollbacks into one burst of bad data: each skips past every batch served before it, so each corrupted
    batch is trained on once at most, and the run ends as well as a clean one."""
    run = {**SPIKE_RUN, "guard.rollback_extra_skip": 2, "guard.max_rollbacks": 4}
    clean = _trainer(small_text, tmp_path, **{**run, "train.run_name": "clean"}).run_loop()
    burst = {"fault.corrupt_data_from": 101, "fault.corrupt_data_batches": 10, "train.run_name": "burst"}
    tr = _trainer(small_text, tmp_path, **{**run, **burst})
    served = _served(tr)
    summary = tr.run_loop()
    assert summary.steps == 160
    corrupted = [n for n in served if 101 <= n <= 110]
    assert corrupted == [101, 104, 107, 110]  # served once each; the rest skipped by the rollbacks
    rows = read_jsonl(summary.run_dir / "alerts.jsonl")
    assert [r["values"]["to_step"] for r in rows if r["action"] == "rollback" and r["detector"] == "guard"] == [80] * 4
    final = [read_jsonl(r.run_dir / "eval.jsonl")[-1]["val_loss"] for r in (clean, summary)]
    assert abs(final[1] - final[0]) / final[0] < 0.05


def test_a_rollback_in_the_first_steps_has_a_good_state_to_return_to(small_text, tmp_path):
    early = {"guard.nonfinite": "rollback", "fault.nan_grad_step": 4, "train.max_steps": 12}
    tr = _trainer(small_text, tmp_path, **early, **{"fault.nan_grad_tensor": "blocks.0.mlp.fc.weight"})
    summary = tr.run_loop()
    assert summary.steps == 12
    rows = read_jsonl(summary.run_dir / "alerts.jsonl")
    assert [(r["step"], r["detector"], r["action"]) for r in rows] == [(4, "nonfinite", "rollback"),
                                                                       (4, "guard", "rollback")]  # fmt: skip
    assert rows[1]["values"]["to_step"] == 0 and "blocks.0.mlp.fc.weight" in rows[0]["explanation"]


def test_a_snapshot_taken_just_before_the_damage_shows_is_not_returned_to(small_text, tmp_path):
    """An LR spike at a snapshot step: the snapshot holds the damaged weights (the loss shows it one step later),
    so the rollback goes to the confirmed one before it and the run recovers instead of stopping."""
    spike = {"fault.lr_spike_from": 100, "fault.lr_spike_steps": 1, "fault.lr_spike_factor": 1000.0}
    summary = _trainer(small_text, tmp_path, **{**SPIKE_RUN, **spike}).run_loop()
    assert summary.steps == 160
    rows = read_jsonl(summary.run_dir / "alerts.jsonl")
    back = [r["values"]["to_step"] for r in rows if r["detector"] == "guard" and r["action"] == "rollback"]
    assert back and all(step < 100 for step in back)


def test_no_false_alarm_on_healthy_runs(small_text, tmp_path):
    for seed in (1, 2, 3):
        tr = _trainer(
            small_text,
            tmp_path,
            **{
                "train.seed": seed,
                "train.max_steps": 200,
                "train.run_name": f"s{seed}",
                "train.eval_interval": 200,
                "train.checkpoint_interval": 200,
            },
        )
        run = tr.run_loop().run_dir
        alerts = read_jsonl(run / "alerts.jsonl")
        assert {a["severity"] for a in alerts} <= {"info"}, (seed, alerts)  # no warning, no action


def test_device_side_skip_needs_no_host_decision(small_text, tmp_path):
    """The GPU path on CPU: the skip stays a device tensor handed to the fused optimizer as found_inf."""
    tr = _trainer(small_text, tmp_path, **{"optim.implementation": "fused"})
    tr.state.guard.host_every_step = False  # as on CUDA
    tr.state.host_check_every = 10**9  # and not a logging step: the host reads nothing
    for _ in range(3):
        train_step(tr.state)
    before = _state(tr)
    handle = dict(tr.raw_model.named_parameters())[_mlp_weight(tr)].register_hook(lambda g: g * float("nan"))
    out = train_step(tr.state)
    handle.remove()
    assert torch.is_tensor(out.verdict.skip) and bool(out.verdict.skip)
    assert out.verdict.action == "proceed" and not out.verdict.alerts  # no host judgement was made
    _same(before, _state(tr))
