"""SIGTERM and SIGINT for the `flowtrain train` command (preemption, Ctrl-C).

The first signal asks the trainer to stop after the step it is in (Trainer.request_stop: it writes a
checkpoint and puts every row on disk); outside the training loop (setting up, finishing) it stops the command
where it is. A second signal exits at once: the checkpoints already complete stay intact (a checkpoint being
written is a temporary directory, removed at the next start). Installed by the CLI only: signal handlers are
process-wide, and library code makes no process-wide changes.

Under torchrun a signal usually arrives twice (from the terminal or SLURM, and forwarded by torchrun a moment
later), so there a repeat of the same signal within a second is the same request.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_COPY_WINDOW_S = 1.0


def exit_code(signum: int) -> int:
    """A clean stop on request: 0 for SIGTERM (preemption is not a failure), 130 for SIGINT (Ctrl-C)."""
    return 0 if signum == signal.SIGTERM else 128 + signum


class Interrupted(BaseException):
    """A signal stopped the command outside the training loop (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        self.signum, self.name = signum, signal.Signals(signum).name
        super().__init__(self.name)


def _say(text: str) -> None:
    """One line on stderr, written straight to the descriptor (print can be mid-write when a signal lands)."""
    os.write(2, f"flowtrain: {text}\n".encode())


def where_it_stands(run_root: Path | None) -> str:
    """What a user can do next with the run, as the directory says now (never more than it holds)."""
    if run_root is None:
        return "nothing was trained"
    from flowtrain.rundir import RunDir  # here: importing them loads torch
    from flowtrain.train.checkpoint import list_checkpoints

    found = list_checkpoints(RunDir(run_root).checkpoints)
    if not found:
        return f"no checkpoint was written: flowtrain train --resume {run_root} starts it over from step 0"
    return f"the newest complete checkpoint is {found[-1][1]}: flowtrain train --resume {run_root} continues from it"


class StopOnSignals:
    """`with StopOnSignals() as stops:` installs the handlers; set `stops.trainer` once the trainer exists and
    `stops.run_root` once its directory is known. At the end the old handlers come back, unless `to_the_end`
    (the command is the whole process): then they stay, and a first signal after the work is done has nothing
    left to stop and is ignored (the process is ending; its exit code stays the command's), a second still
    exits at once."""

    def __init__(self, under_torchrun: bool | None = None, to_the_end: bool = False):
        self.trainer = None
        self.run_root: Path | None = None
        self.first: tuple[int, float] | None = None  # (signal, when)
        self.to_the_end, self.done = to_the_end, False
        if under_torchrun is None:
            under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
        self.copy_window = _COPY_WINDOW_S if under_torchrun else 0.0
        self._old: dict = {}

    def __enter__(self) -> StopOnSignals:
        self._old = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self.done = True
        if not self.to_the_end:
            for sig, old in self._old.items():
                signal.signal(sig, old)

    def _handle(self, signum: int, frame) -> None:
        name, now = signal.Signals(signum).name, time.monotonic()
        if self.first is not None:
            if signum == self.first[0] and now - self.first[1] < self.copy_window:
                return  # the same signal, delivered twice (torchrun forwards what its workers already got)
            _say(f"{name} again: exiting at once; {where_it_stands(self.run_root)}")
            os._exit(128 + signum)
        self.first = (signum, now)
        if self.done:
            return  # the work is done and written: let the process end with its own exit code
        if self.trainer is not None and self.trainer.request_stop(name):
            _say(f"{name}: stopping at the end of this step, with a checkpoint ({name} again exits at once)")
            return
        raise Interrupted(signum)
