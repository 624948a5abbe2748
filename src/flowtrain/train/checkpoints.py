"""When the loop saves a checkpoint, what goes into it, and which ones are kept (train/checkpoint.py writes
and reads them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from flowtrain.train import checkpoint as ckpt
from flowtrain.train.restore import Owner, training_state
from flowtrain.train.runtime import rng_state
from flowtrain.train.step import TrainState


class Checkpoints:
    """Saves `state` (and the owners' keys) every `interval` steps and at the run's last step (`end`: max_steps
    or stop_after; None for a loop that only runs a window of steps); rank 0 prunes to the newest `keep_last`
    plus the best evaluation's (`best_step()`)."""

    def __init__(
        self,
        directory: Path,
        state: TrainState,
        owners: Sequence[Owner],
        *,
        interval: int,
        keep_last: int,
        layout: str,
        tokenizer_json: str,
        config_yaml: str,
        best_step: Callable[[], int | None] = lambda: None,
    ):
        self.directory, self.state, self.owners = directory, state, owners
        self.interval, self.keep_last, self.layout = interval, keep_last, layout
        self.tokenizer_json, self.config_yaml, self.best_step = tokenizer_json, config_yaml, best_step

    def due(self, step: int, end: int | None) -> bool:
        return step % self.interval == 0 or step == end

    def save(self) -> Path:
        """A checkpoint of the state now; every rank takes part (sharded layouts write from every rank)."""
        state = self.state
        path = ckpt.save_checkpoint(
            self.directory,
            state.step,
            model=state.raw_model,
            optimizer=state.optimizer,
            rng=rng_state(),
            state=training_state(state, self.owners),
            tokenizer_json=self.tokenizer_json,
            config_yaml=self.config_yaml,
            layout=self.layout,
        )
        if state.parallel.is_main:
            best = self.best_step()
            ckpt.prune_checkpoints(self.directory, self.keep_last, {best} if best is not None else set())
        state.parallel.barrier()
        return path
