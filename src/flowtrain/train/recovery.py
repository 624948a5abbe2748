"""Recovery from a guard rollback: last-good states kept in memory, and the way back to one of them.

A snapshot is a deep copy (same device) of everything a step changes: weights, optimizer state, RNG state and
the JSON training state (schedule, loader position, clipper, guard windows). Rolling back restores the newest
good state — the snapshot, or the newest checkpoint on disk when there is no usable snapshot — then moves the
data loader past the batches that led to the event (plus `guard.rollback_extra_skip` steps' worth), scales the
learning rate by `guard.rollback_lr_factor` (compounding over rollbacks), and flags the undone records.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from flowtrain.errors import GuardStop
from flowtrain.train import checkpoint as ckpt
from flowtrain.train.runtime import rng_state, set_rng_state

if TYPE_CHECKING:
    from flowtrain.train.trainer import Trainer


def take_snapshot(trainer: Trainer) -> dict[str, Any]:
    """The trainer's current state as the last good one (copies, not references)."""
    return {
        "step": trainer.step,
        "model": {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()},
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
        "rng": {k: v.clone() for k, v in rng_state().items()},
        "state": copy.deepcopy(trainer.training_state()),
    }


def _scale_lr(trainer: Trainer, factor: float) -> None:
    if factor == 1.0:
        return
    trainer.scheduler.base_lrs = [lr * factor for lr in trainer.scheduler.base_lrs]
    for group in trainer.optimizer.param_groups:
        group["lr"] *= factor
        group["initial_lr"] = group.get("initial_lr", group["lr"]) * factor
    trainer.lr_scale *= factor


def roll_back(trainer: Trainer, event_step: int) -> str:
    """Return `trainer` to its last good state after an event at `event_step`; a line saying what was done."""
    snap, cfg = trainer.snapshot, trainer.cfg.guard
    lr_scale_wanted = trainer.lr_scale * cfg.rollback_lr_factor
    rollbacks = trainer.guard.rollbacks
    if snap is None or snap["step"] >= event_step:
        latest = ckpt.latest_checkpoint(trainer.run.checkpoints)
        if latest is None:
            raise GuardStop(
                f"step {event_step}: the guard asked for a rollback but there is no good state yet "
                "(no snapshot or checkpoint before the event); lower optim.lr or lengthen warmup"
            )
        c = ckpt.read_checkpoint(latest)
        target, rng, state = c.step, ckpt.restore_rng(c), c.state
        ckpt.restore_model(c, trainer.raw_model)
        ckpt.restore_optimizer(c, trainer.optimizer, trainer.raw_model)
    else:
        target, rng, state = snap["step"], snap["rng"], snap["state"]
        trainer.raw_model.load_state_dict(snap["model"])
        trainer.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
    trainer.load_training_state(copy.deepcopy(state))  # also the LR scale that state was saved with
    trainer.guard.rollbacks = rollbacks + 1
    set_rng_state(rng)
    # skip the data window that led to the event (and any extra), exactly as the loader would serve it
    skip_steps = event_step - target + cfg.rollback_extra_skip
    trainer.slots.skip_steps(skip_steps)
    _scale_lr(trainer, lr_scale_wanted / trainer.lr_scale)
    trainer.step = target
    trainer.flow.restart_at(target)  # the weights were replaced: the microscope takes a fresh copy
    for sink in (trainer.metrics_sink, trainer.evals_sink):
        sink.mark_discarded_after(target)
    return (
        f"rolled back from step {event_step} to step {target}, skipped {skip_steps} steps of data"
        + (f", LR x{trainer.lr_scale:g} of the schedule" if trainer.lr_scale != 1.0 else "")
        + f" (rollback {trainer.guard.rollbacks} of {cfg.max_rollbacks})"
    )
