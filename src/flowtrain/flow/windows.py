"""The guard's windows over per-step numbers: robust spike scores, the loss trend, stalls and clip saturation.

Pure host-side state, NaN-safe (a non-finite value never enters a window) and saved with checkpoints. The
judgments made from them live in flow/health.py.
"""

from __future__ import annotations

import itertools
import math
from collections import deque

import numpy as np

MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation


class RobustSpike:
    """Robust z-score of log(value) against recent healthy values.

    Log space, because losses and gradient norms are positive and their noise is multiplicative. The level is
    the median of the last `level_window` healthy values, so it follows the steep descent of early training;
    the noise is the MAD of step-to-step differences / sqrt(2), which a trend does not inflate (the plain MAD
    of a descending window does, and hides spikes). The noise has a floor (`min_scale`, log units) so a very
    flat window does not turn tiny wiggles into 6-sigma events.
    """

    level_window = 16
    noise_refresh = 8  # the noise estimate is refreshed every this many healthy values (it drifts slowly)

    def __init__(self, window: int, threshold: float, min_count: int, min_scale: float):
        self.values: deque[float] = deque(maxlen=window)
        self.threshold = threshold
        self.min_count = min_count
        self.min_scale = min_scale
        self.appended = 0  # healthy values seen so far (drives the noise refresh; saved with the state)
        self.noise: float | None = None
        self._cached: tuple[int, tuple[float, float] | None] | None = None

    def _refresh_noise(self) -> None:
        logs = np.fromiter(self.values, dtype=np.float64)
        diffs = np.diff(logs)
        self.noise = MAD_TO_STD * float(np.median(np.abs(diffs - np.median(diffs)))) / math.sqrt(2)

    def level_and_scale(self) -> tuple[float, float] | None:
        """(level, noise) in log units, or None until min_count healthy values were seen.

        Cached per window state: the guard asks for it several times a step (score, device limit, message).
        """
        if self._cached is not None and self._cached[0] == self.appended:
            return self._cached[1]
        stats = None
        if len(self.values) >= self.min_count:
            if self.noise is None:
                self._refresh_noise()
            recent = sorted(itertools.islice(self.values, max(0, len(self.values) - self.level_window), None))
            mid = len(recent) // 2
            level = recent[mid] if len(recent) % 2 else 0.5 * (recent[mid - 1] + recent[mid])
            stats = (level, max(self.noise, self.min_scale))
        self._cached = (self.appended, stats)
        return stats

    def score(self, value: float) -> float | None:
        stats = self.level_and_scale()
        if stats is None or not math.isfinite(value) or value <= 0:
            return None
        level, scale = stats
        return (math.log(value) - level) / scale

    def limit(self) -> float:
        """The value above which `score` exceeds the threshold (inf until judged)."""
        stats = self.level_and_scale()
        return math.inf if stats is None else math.exp(stats[0] + self.threshold * stats[1])

    def observe(self, value: float) -> float | None:
        """Score `value`, then add it to the window unless it is non-finite or a spike."""
        z = self.score(value)
        if math.isfinite(value) and value > 0 and (z is None or z <= self.threshold):
            self.values.append(math.log(value))
            self.appended += 1
            if self.noise is None or self.appended % self.noise_refresh == 0:
                self.noise = None  # recomputed on the next judgement, from the window as it is then
        return z

    def median(self) -> float:
        """The recent level, as a value (not log)."""
        stats = self.level_and_scale()
        if stats is None:
            return math.exp(float(np.median(np.fromiter(self.values, dtype=np.float64)))) if self.values else math.nan
        return math.exp(stats[0])

    def state_dict(self) -> dict:
        return {"values": list(self.values), "appended": self.appended, "noise": self.noise}

    def load_state_dict(self, state: dict) -> None:
        self.values.clear()
        self.values.extend(state["values"])
        self.appended = state.get("appended", len(self.values))
        self.noise = state.get("noise")
        self._cached = None


class TrendDetector:
    """Slow divergence: the loss has been rising over a whole window (least-squares slope of log loss)."""

    def __init__(self, window: int, min_rise: float):
        self.values: deque[float] = deque(maxlen=window)
        self.min_rise = min_rise

    def observe(self, loss: float) -> float | None:
        """The fitted rise of log loss over a full window when it exceeds min_rise (then the window restarts)."""
        if not _full_after(self.values, loss):
            return None
        rise = fitted_change(self.values)
        if rise <= self.min_rise:
            return None
        self.values.clear()  # report once per window, not every step after
        return rise

    def state_dict(self) -> dict:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.values.clear()
        self.values.extend(state["values"])


def _full_after(values: deque[float], loss: float) -> bool:
    """Add log(loss) to a window (a non-finite or non-positive loss enters none); True when it is full."""
    if not math.isfinite(loss) or loss <= 0:
        return False
    values.append(math.log(loss))
    return len(values) == values.maxlen


def fitted_change(values: deque[float]) -> float:
    """Least-squares change of `values` (log losses) from the first to the last position of the window."""
    y = np.fromiter(values, dtype=np.float64)
    x = np.arange(len(y), dtype=np.float64)
    x -= x.mean()
    return float((x @ y) / (x @ x) * (len(y) - 1))


class StallWindow:
    """Has the loss stopped falling? The fitted change of log loss over blocks of `window` steps; a stall is two
    blocks in a row in which it did not fall (one flat block happens to healthy runs on a slow slope by noise)."""

    def __init__(self, window: int):
        self.values: deque[float] = deque(maxlen=window)
        self.flat_blocks = 0

    def observe(self, loss: float) -> float | None:
        """The change over the last two blocks when neither fell (then it starts over), else None."""
        if not _full_after(self.values, loss):
            return None
        change = fitted_change(self.values)
        self.values.clear()
        self.flat_blocks = self.flat_blocks + 1 if change >= 0 else 0
        if self.flat_blocks < 2:
            return None
        self.flat_blocks = 0
        return change

    def state_dict(self) -> dict:
        return {"values": list(self.values), "flat_blocks": self.flat_blocks}

    def load_state_dict(self, state: dict) -> None:
        self.values.clear()
        self.values.extend(state.get("values", []))
        self.flat_blocks = state.get("flat_blocks", 0)


class ClipWindow:
    """The fraction of the last `window` steps the clipper bit, and the recent grad-spike count."""

    def __init__(self, window: int):
        self.clipped: deque[bool] = deque(maxlen=window)
        self.spikes: deque[int] = deque(maxlen=window)  # steps of recent gradient spikes

    def observe(self, clipped: bool) -> float | None:
        """The clipped fraction once the window is full (then it restarts), else None."""
        self.clipped.append(bool(clipped))
        if len(self.clipped) < self.clipped.maxlen:
            return None
        fraction = sum(self.clipped) / len(self.clipped)
        self.clipped.clear()
        return fraction

    def recent_spikes(self, step: int, within: int) -> int:
        return sum(1 for s in self.spikes if step - s < within)

    def state_dict(self) -> dict:
        return {"clipped": list(self.clipped), "spikes": list(self.spikes)}

    def load_state_dict(self, state: dict) -> None:
        self.clipped.clear()
        self.clipped.extend(state.get("clipped", []))
        self.spikes.clear()
        self.spikes.extend(state.get("spikes", []))
