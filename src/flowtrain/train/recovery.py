"""Recovery from a guard rollback: the last good state kept in memory, and the way back to one.

Rolling back restores the newest good state (the snapshot, or the newest checkpoint on disk when there is no
usable snapshot) through the same path as `--resume` (train/restore.py), then moves the data loader past every
batch served before the event (plus `guard.rollback_extra_skip` steps' worth): the skipped batches accumulate
over rollbacks, so a batch once skipped is never served again. The learning rate is scaled by
`guard.rollback_lr_factor`, compounding over rollbacks. A first good state is kept when the loop starts, so a
rollback in the first steps has somewhere to go.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flowtrain.errors import GuardStop
from flowtrain.flow.guard import Alert, GuardConfig, Verdict
from flowtrain.train import checkpoint as ckpt
from flowtrain.train.restore import Owner, Snapshot, restore, take_snapshot
from flowtrain.train.step import TrainState


class Recovery:
    """Keeps a last-good snapshot every `guard.snapshot_interval` steps and rolls `state` back on request.

    A snapshot becomes the one to return to only after `CONFIRM_STEPS` clean steps have followed it: a bad update
    shows in the loss of the steps after it, so a snapshot taken right after one (an LR spike, a corrupted
    batch) is not yet known to be good. Until then the previous one stays the rollback target.

    `others`: the other loop helpers whose keys are part of the training state (they come back too); the
    rollbacks' LR factor so far is this object's own key (`lr_scale`).
    """

    CONFIRM_STEPS = 10

    def __init__(self, state: TrainState, cfg: GuardConfig, checkpoints: Path, others: Sequence[Owner] = ()):
        self.state, self.cfg, self.checkpoints = state, cfg, checkpoints
        self.owners: tuple[Owner, ...] = (*others, self)
        self.snapshot: Snapshot | None = None  # the confirmed last good state
        self.candidate: Snapshot | None = None  # a newer one, waiting for CONFIRM_STEPS clean steps
        self.lr_scale = 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"lr_scale": self.lr_scale}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.lr_scale = saved.get("lr_scale", 1.0)

    def start(self) -> None:
        """The state the loop starts from is the first good one (step 0, or the resumed step)."""
        if self.snapshot is None or self.snapshot.step != self.state.step:
            self.snapshot = take_snapshot(self.state, self.owners)
        self.candidate = None

    def maybe_snapshot(self, verdict: Verdict) -> None:
        """Take a candidate at snapshot steps whose verdict was a clean proceed; confirm it after CONFIRM_STEPS
        clean steps (any warning or action in between discards it)."""
        clean = verdict.action == "proceed" and not any(a.severity != "info" for a in verdict.alerts)
        if not clean:
            self.candidate = None
            return
        if self.candidate is not None and self.state.step - self.candidate.step >= self.CONFIRM_STEPS:
            self.snapshot, self.candidate = self.candidate, None
        every = self.cfg.snapshot_interval
        if every and self.state.step % every == 0:
            self.candidate = take_snapshot(self.state, self.owners)

    def act_on(self, verdict: Verdict, log) -> bool:
        """Log the verdict's alerts (to `log`, the run's RunLog) and carry out rollback / stop; every action and the
        final stop with its reason are rows of alerts.jsonl. True when the step was rolled back."""
        step, guard = self.state.step, self.state.guard
        for alert in verdict.alerts:
            log.alert(alert)
        if verdict.action == "stop":
            detectors = ", ".join(sorted({a.detector for a in verdict.alerts})) or "repeated skips"
            message = (
                f"stopped by the guard at step {step}: {detectors} after {guard.rollbacks} rollback(s) (budget "
                f"guard.max_rollbacks={self.cfg.max_rollbacks}); checkpoints in {self.checkpoints} are intact: "
                "lower optim.lr or check the data, then --resume"
            )
            self._stop(
                log, Alert(step, "guard", "stop", {"rollbacks": float(guard.rollbacks)}, message, "", "critical")
            )
        if verdict.action != "rollback":
            return False
        try:
            what = self.roll_back(step)
        except GuardStop as stop:
            self._stop(log, Alert(step, "guard", "stop", {}, str(stop), "", "critical"))
        log.mark_discarded_after(self.state.step)
        log.alert(Alert(step, "guard", "rollback", {"to_step": float(self.state.step)}, what, "", "critical"))
        log.flush_alerts(final=True)  # the steps are rewound: every fold closes before them
        return True

    @staticmethod
    def _stop(log, alert: Alert) -> None:
        log.alert(alert)
        log.flush_alerts(final=True)
        raise GuardStop(alert.explanation)

    def roll_back(self, event_step: int) -> str:
        """Return to the last good state before an event at `event_step`; a line saying what was done."""
        state, guard = self.state, self.state.guard
        lr_scale_wanted = self.lr_scale * self.cfg.rollback_lr_factor
        rollbacks = guard.rollbacks
        served = state.loader.position  # every batch up to the event's: none of them is served again
        self.candidate = None  # not confirmed: the event may be its doing
        source: ckpt.Checkpoint | Snapshot | None = self.snapshot
        if source is None or source.step >= event_step:
            latest = ckpt.latest_checkpoint(self.checkpoints)
            if latest is None:
                raise GuardStop(
                    f"step {event_step}: the guard asked for a rollback but there is no good state yet "
                    "(no snapshot or checkpoint before the event); lower optim.lr or lengthen warmup"
                )
            source = ckpt.read_checkpoint(latest)
        restore(state, source, self.owners)  # also the LR scale that state was saved with
        guard.rollbacks = rollbacks + 1
        # skip the data that led to the event (and any extra), exactly as the loader would serve it
        skip_steps = served + self.cfg.rollback_extra_skip - state.loader.position
        state.loader.skip_steps(skip_steps)
        self._scale_lr(lr_scale_wanted / self.lr_scale)
        return (
            f"rolled back from step {event_step} to step {source.step}, skipped {skip_steps} steps of data "
            f"(to batch {state.loader.position + 1})"
            + (f", LR x{self.lr_scale:g} of the schedule" if self.lr_scale != 1.0 else "")
            + f" (rollback {guard.rollbacks} of {self.cfg.max_rollbacks})"
        )

    def _scale_lr(self, factor: float) -> None:
        if factor == 1.0:
            return
        scheduler = self.state.scheduler
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        for group in self.state.optimizer.param_groups:
            group["lr"] *= factor
            group["initial_lr"] = group.get("initial_lr", group["lr"]) * factor
        self.lr_scale *= factor
