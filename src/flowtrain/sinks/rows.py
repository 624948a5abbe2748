"""Logged steps' rows, written in groups: one host transfer for a group's numbers, and the sinks' Python run
several times in warm caches instead of once a step in cold ones (log.flush_rows, log.flush_seconds).

A row waits in the buffer until the group is full, until it would wait longer than `flush_seconds` for the
next logged step, or until the loop flushes (before evaluations and checkpoints, at guard actions, at the
end and on errors). Each row is written exactly once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any


class RowBuffer:
    """Holds logged steps until `write_group` receives them, oldest first, in groups."""

    def __init__(
        self, write_group: Callable[[list[Any]], None], flush_rows: int, flush_seconds: float, interval: int = 1
    ):
        self._write_group = write_group
        self.flush_rows, self.flush_seconds, self.interval = flush_rows, flush_seconds, interval
        self._rows: list[Any] = []
        self._oldest = 0.0  # when the oldest waiting row was added

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, row: Any, now: float, step_time: float, urgent: bool = False) -> None:
        """Queue `row` (logged at time `now`, steps taking `step_time` seconds); write the group when it is full,
        when its oldest row would wait past flush_seconds for the next logged step, or when `urgent`."""
        if not self._rows:
            self._oldest = now
        self._rows.append(row)
        late = now - self._oldest + self.interval * step_time >= self.flush_seconds
        if urgent or late or len(self._rows) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Write every waiting row now (nothing when none waits)."""
        if self._rows:
            group = self._rows.copy()
            self._rows.clear()  # first: a group cut short by an error is not written twice by a later flush
            self._write_group(group)


class StepTimer:
    """Seconds per step between logged steps; work the loop does beside the steps (snapshots, evaluations,
    checkpoints) is left out with `paused()`."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._last = clock()

    def lap(self, steps: int) -> tuple[float, float]:
        """(now, seconds per step over the `steps` steps since the last lap)."""
        now = self._clock()
        per_step, self._last = (now - self._last) / steps, now
        return now, per_step

    def restart(self) -> None:
        """Count from now (e.g. after a guard rollback, whose work is no step's)."""
        self._last = self._clock()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        started = self._clock()
        try:
            yield
        finally:
            self._last += self._clock() - started
