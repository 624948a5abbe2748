"""How often the microscope looks: a fixed interval, or `auto`, which keeps its cost within a share of the step.

Why: what one monitored step costs depends on the model, the machine and the batch (docs/performance.md has
figures). `auto` measures it:
the microscope times its own work (every hook, the passes before and after the optimizer step, collect()),
the wall time between steps gives the step time without it, and the interval becomes the smallest N with
cost / N <= budget * step time. The first `full_steps` steps are monitored every step (the start of training
is where most gradient-flow trouble shows); the interval chosen then is checked a window (64 steps) later
and re-chosen every `reprobe_steps` steps.

The stopwatch does not see everything a monitored step costs (autograd calling into Python for the hooks, the
caches the microscope's passes evict). So once the window holds monitored and unmonitored steps, the choice
adds what the step times show beyond the stopwatch: median(monitored step) - median(other step) - the
stopwatch's own difference, when positive. A choice of every step made without unmonitored steps to compare
with is tried as every other step for one window first, so the check sees both kinds. What lands in the steps
after a monitored one is not seen at all: the default budget (2%) leaves room for it (docs/performance.md).

The choice depends on timings, so with `auto` which steps get per-tensor records can differ between two
otherwise identical runs; training itself does not depend on it (monitoring only reads). Set an integer
interval for reproducible record steps. In a data-parallel job every rank takes the largest interval any
rank chose, so all ranks monitor the same steps (their statistics are combined with collectives).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque

WINDOW = 64  # steps of timings a choice is made from
MAX_INTERVAL = 1000
UNMONITORED_SHARE = 0.05
MIN_SEEN = 8  # steps of each kind (monitored or not) before their step times are compared


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


class Stopwatch:
    """Seconds the microscope spent since the last step ended; hooks and monitor calls add to it."""

    __slots__ = ("spent",)

    def __init__(self) -> None:
        self.spent = 0.0


class Interval:
    """Which steps are monitored: `interval` (an int, or "auto") from FlowConfig."""

    def __init__(self, cfg, start_step: int, clock: Stopwatch) -> None:
        self.auto = cfg.interval == "auto"
        self.every = 1 if self.auto else int(cfg.interval)
        self.cfg = cfg
        self.start = start_step
        self.clock = clock
        self._window: deque[tuple[float, float, bool]] = deque(maxlen=WINDOW)  # (step s, microscope s, monitored)
        self._last_end: float | None = None
        self.last_spent = 0.0  # the microscope's stopwatch seconds of the last step booked
        self._check_at = WINDOW  # steps after the every-step phase when the choice is checked from step times

    def monitored(self, step: int) -> bool:
        if self.auto and step - self.start < self.cfg.full_steps:
            return True
        return step % self.every == 0

    def step_done(self, step: int, monitored: bool) -> bool:
        """Book the step that just ended; True when a new interval was chosen (auto) at this step."""
        now = time.perf_counter()
        if self._last_end is not None:
            self._window.append((now - self._last_end, self.clock.spent, monitored))
        self._last_end, self.last_spent, self.clock.spent = now, self.clock.spent, 0.0
        if not self.auto:
            return False
        done = step + 1 - self.start - self.cfg.full_steps
        # chosen at the end of the every-step phase, checked once a window of steps later (against step times
        # with both kinds of steps in it), then re-chosen every reprobe_steps
        due = done >= 0 and (done % self.cfg.reprobe_steps == 0 or done == self._check_at)
        if not due or not self._window:
            return False
        self.every = self.choose()
        if self.every == 1 and not self._both_kinds_seen():
            # the stopwatch alone says every step fits, but what it cannot see is measured only beside
            # unmonitored steps: every other step for one window, then the check decides (every step again
            # if the step times agree)
            self.every, self._check_at = 2, done + WINDOW
        return True

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` of the step now running out of its step time: work the training loop does for several
        steps at once (the trainer writes its logged rows in groups), which would otherwise land in whichever
        step it fell in, and under some intervals always in a monitored one."""
        if self._last_end is not None:
            self._last_end += seconds

    def _both_kinds_seen(self) -> bool:
        monitored = sum(1 for _, _, m in self._window if m)
        return min(monitored, len(self._window) - monitored) >= MIN_SEEN

    def choose(self) -> int:
        """Smallest N with (cost of a monitored step + (N - 1) * cost of another step) / N within
        budget * (step seconds without the microscope). The step time is the median over the window; the
        costs are the stopwatch's means (a loop logging every few steps collects all their records at once,
        and only the mean spreads that work over the steps it belongs to), plus, once the window holds enough
        of both kinds of steps, what the stopwatch cannot see: how much longer a monitored step takes than an
        unmonitored one beyond the difference the stopwatch booked (medians of both)."""
        base = _median([step - spent for step, spent, _ in self._window])
        on = [spent for _, spent, m in self._window if m]
        off = [spent for _, spent, m in self._window if not m]
        if base <= 0 or not on:
            return self.every
        cost_on = statistics.fmean(on)
        # between monitored steps the microscope still books the step (~5% of a monitored step measured on
        # shakespeare-char); before any such step was seen, assume that
        cost_off = statistics.fmean(off) if off else UNMONITORED_SHARE * cost_on
        if min(len(on), len(off)) >= MIN_SEEN:
            steps_on = [step for step, _, m in self._window if m]
            steps_off = [step for step, _, m in self._window if not m]
            unseen = _median(steps_on) - _median(steps_off) - (_median(on) - _median(off))
            cost_on += max(0.0, unseen)
        room = self.cfg.budget * base - cost_off
        if room <= 0:
            return MAX_INTERVAL
        return max(1, min(MAX_INTERVAL, math.ceil((cost_on - cost_off) / room)))

    def restart_at(self, step: int) -> None:
        """After a rollback: step timings go on, the monitored steps are counted from `step` again."""
        self._last_end = None
