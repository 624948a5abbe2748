"""A run's training state, saved and put back: one restore path for `--resume` (a checkpoint on disk) and the
guard's rollback (a checkpoint, or a last-good snapshot in memory).

The state is the weights, the optimizer tensors, the RNG state and a JSON part: the schedule, the data position,
the clipper, the grad scaler, the guard's windows, and whatever the loop's helpers keep (`owners`: the best
evaluation, the rollbacks' LR factor), each of which gives its keys with `state_dict()` and takes them back
with `load_state_dict()`. That JSON part is what checkpoints store as state.json.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from flowtrain.train import checkpoint as ckpt
from flowtrain.train.runtime import rng_state, set_rng_state
from flowtrain.train.step import TrainState


class Owner(Protocol):
    """A loop helper whose keys are part of the saved training state."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Snapshot:
    """A last-good state in memory: copies (same device), never references to live tensors."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]
    state: dict[str, Any]


def training_state(state: TrainState, owners: Sequence[Owner] = ()) -> dict[str, Any]:
    """Everything besides weights, optimizer tensors and RNG that a resumed run needs, as plain JSON."""
    saved: dict[str, Any] = {
        "scheduler": state.scheduler.state_dict(),
        "loader": state.loader.state_dict(),
        "guard": state.guard.state_dict(),
    }
    if hasattr(state.clipper, "state_dict"):
        saved["clipper"] = state.clipper.state_dict()
    if state.scaler is not None:
        saved["grad_scaler"] = state.scaler.state_dict()
    for owner in owners:
        saved.update(owner.state_dict())
    return saved


def take_snapshot(state: TrainState, owners: Sequence[Owner] = ()) -> Snapshot:
    """The state now, as the last good one."""
    return Snapshot(
        step=state.step,
        model={k: v.detach().clone() for k, v in state.raw_model.state_dict().items()},
        optimizer=copy.deepcopy(state.optimizer.state_dict()),
        rng={k: v.clone() for k, v in rng_state().items()},
        state=copy.deepcopy(training_state(state, owners)),
    )


def restore(state: TrainState, source: ckpt.Checkpoint | Snapshot, owners: Sequence[Owner] = ()) -> None:
    """Put `source` back into `state` and the owners: weights, optimizer, RNG, JSON state and the step count.

    A monitor already attached restarts at the restored step (the weights it knew were replaced); one attached
    later is built at that step.
    """
    if isinstance(source, Snapshot):
        state.raw_model.load_state_dict(source.model)
        state.optimizer.load_state_dict(copy.deepcopy(source.optimizer))  # the snapshot may be restored again
        rng = source.rng
    else:
        ckpt.restore_model(source, state.raw_model)
        ckpt.restore_optimizer(source, state.optimizer, state.raw_model)  # before the scheduler: it has the LRs
        rng = ckpt.restore_rng(source)
    set_rng_state(rng)
    saved = copy.deepcopy(source.state)
    state.scheduler.load_state_dict(saved["scheduler"])
    state.loader.load_state_dict(saved["loader"])
    if "clipper" in saved and hasattr(state.clipper, "load_state_dict"):
        state.clipper.load_state_dict(saved["clipper"])
    if state.scaler is not None and "grad_scaler" in saved:
        state.scaler.load_state_dict(saved["grad_scaler"])
    state.guard.load_state_dict(saved["guard"])
    for owner in owners:
        owner.load_state_dict(saved)
    state.step = source.step
    if state.monitor is not None:
        state.monitor.restart_at(state.step)
