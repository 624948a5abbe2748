"""One restore path: a checkpoint on disk (--resume) and a snapshot in memory (rollback) put the same state
back through `restore()`, and training goes on bitwise as it went the first time."""

import torch

from flowtrain.config import load_config
from flowtrain.train import checkpoint as ckpt
from flowtrain.train.load import config_for_resume
from flowtrain.train.restore import restore, take_snapshot
from flowtrain.train.step import train_step
from flowtrain.train.trainer import Trainer
from tests.conftest import tiny_overrides


def _trainer(text, tmp_path, name, **extra):
    overrides = {"train.run_name": name, "model.embd_dropout": 0.1, "train.grad_accum": 2, **extra}
    return Trainer(load_config("default", tiny_overrides(text, tmp_path, **overrides)))


def _losses(trainer, steps):
    return [train_step(trainer.state).loss for _ in range(steps)]


def test_a_checkpoint_and_a_snapshot_restore_the_same_state(small_text, tmp_path):
    tr = _trainer(small_text, tmp_path, "first")
    _losses(tr, 3)
    snapshot = take_snapshot(tr.state, tr.recovery.owners)
    tr.evaluation.best_val_loss, tr.evaluation.best_step = 2.5, 3  # an owner's keys travel too
    saved = ckpt.read_checkpoint(tr.checkpoints.save())
    first = _losses(tr, 4)

    tr.evaluation.best_val_loss = None
    restore(tr.state, snapshot, tr.recovery.owners)  # the rollback's source
    assert tr.step == 3 and tr.evaluation.best_val_loss is None  # the snapshot was taken before the eval
    assert all(torch.equal(a, b) for a, b in zip(_losses(tr, 4), first, strict=True))

    other = _trainer(small_text, tmp_path, "second")  # a fresh process's trainer: the --resume source
    restore(other.state, saved, other.recovery.owners)
    assert other.step == 3 and (other.evaluation.best_val_loss, other.evaluation.best_step) == (2.5, 3)
    assert all(torch.equal(a, b) for a, b in zip(_losses(other, 4), first, strict=True))


def test_resume_and_rollback_both_go_through_restore(small_text, tmp_path, monkeypatch):
    from flowtrain.train import recovery, trainer

    calls = []

    def spy(real):
        def restore_and_note(state, source, owners=()):
            calls.append(type(source).__name__)
            return real(state, source, owners)

        return restore_and_note

    monkeypatch.setattr(trainer, "restore", spy(trainer.restore))
    monkeypatch.setattr(recovery, "restore", spy(recovery.restore))
    finished = _trainer(small_text, tmp_path, "run", **{"train.max_steps": 6, "train.sample_tokens": 0})
    finished.run_loop()
    assert calls == []
    Trainer(config_for_resume(finished.run.root, ["train.max_steps=8"]), resume_dir=finished.run.root)
    assert calls == ["Checkpoint"]

    tr = _trainer(small_text, tmp_path, "other")
    _losses(tr, 2)
    tr.checkpoints.save()
    tr.recovery.roll_back(event_step=3)  # no snapshot yet: the newest checkpoint
    tr.recovery.snapshot = take_snapshot(tr.state, tr.recovery.owners)
    tr.recovery.roll_back(event_step=3)
    assert calls == ["Checkpoint", "Checkpoint", "Snapshot"] and tr.state.guard.rollbacks == 2
