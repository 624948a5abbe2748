"""Instability detectors: pure host-side functions of the per-step streams, each testable on its own.

Every detector returns a `Finding` (or None): which detector, the measured values, and a plain-language
explanation and suggestion. They keep their own windows, are NaN-safe (a non-finite value never enters a
window) and do not let an outlier they flagged into the window either, so one spike cannot hide the next.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass
class Finding:
    detector: str
    values: dict[str, float]
    explanation: str
    suggestion: str
    severity: str = "warning"  # or "critical": the run cannot continue as it is
    extra: dict = field(default_factory=dict)


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


def _spike(detector: str, key: str, what: str, tracker: RobustSpike, value: float, suggestion: str) -> Finding | None:
    z = tracker.observe(value)
    if z is None or z <= tracker.threshold:
        return None
    level = tracker.median()
    return Finding(
        detector,
        {key: value, "z": z, "recent_level": level, "threshold": tracker.threshold},
        f"{what} jumped to {value:.4g}, {z:.1f} robust standard deviations above the recent level ({level:.4g})",
        suggestion,
    )


def loss_spike(tracker: RobustSpike, loss: float) -> Finding | None:
    return _spike(
        "loss_spike",
        "loss",
        "the training loss",
        tracker,
        loss,
        "a bad batch or an LR too high for this point of training; if it recurs, lower optim.lr or "
        "lengthen schedule.warmup_steps, and check the data around this step",
    )


def grad_spike(tracker: RobustSpike, norm: float) -> Finding | None:
    return _spike(
        "grad_spike",
        "grad_norm_preclip",
        "the pre-clip gradient norm",
        tracker,
        norm,
        "clipping bounds the update, but repeated spikes precede divergence: lower optim.lr, lengthen warmup, "
        "or try clip.kind=zclip / agc",
    )


def nonfinite(loss: float, grad_norm: float, first_bad_tensor: str | None) -> Finding | None:
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return None
    where = f"first in {first_bad_tensor}" if first_bad_tensor else "in the loss itself"
    what = "loss" if not math.isfinite(loss) else "gradient"
    return Finding(
        "nonfinite",
        {"loss": loss, "grad_norm_preclip": grad_norm},
        f"the {what} is not finite (loss={loss}, grad norm={grad_norm}), {where}",
        "skipping the step protects the weights; if it recurs: lower optim.lr, use train.dtype=bfloat16 "
        "rather than float16, add train.z_loss=1e-4, or check the data for corrupt tokens",
        severity="critical",
        extra={"tensor": first_bad_tensor},
    )


class TrendDetector:
    """Slow divergence: the loss has been rising over a whole window (least-squares slope of log loss)."""

    def __init__(self, window: int, min_rise: float):
        self.values: deque[float] = deque(maxlen=window)
        self.min_rise = min_rise
        self._x: np.ndarray | None = None

    def observe(self, loss: float) -> Finding | None:
        if not math.isfinite(loss) or loss <= 0:
            return None
        self.values.append(math.log(loss))
        if len(self.values) < self.values.maxlen:
            return None
        y = np.fromiter(self.values, dtype=np.float64)
        if self._x is None or len(self._x) != len(y):  # centred positions, for the least-squares slope
            x = np.arange(len(y), dtype=np.float64)
            self._x = (x - x.mean()) / float(((x - x.mean()) ** 2).sum())
        slope = float(self._x @ y)  # = cov(x, y) / var(x): one dot product instead of a polyfit per step
        rise = slope * (len(y) - 1)  # fitted change of log loss across the window
        if rise <= self.min_rise:
            return None
        self.values.clear()  # report once per window, not every step after
        return Finding(
            "divergence",
            {"log_loss_rise": rise, "window": float(len(y)), "loss": math.exp(y[-1])},
            f"the loss has been rising for {len(y)} steps (about {math.expm1(rise):.0%} over the window)",
            "the LR is likely too high for this stage: lower optim.lr or use a decaying schedule; check that the "
            "data is not repeating or changing distribution",
        )

    def state_dict(self) -> dict:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.values.clear()
        self.values.extend(state["values"])


def depth_profile(resid_grad: list[float], vanish_ratio: float, explode_ratio: float) -> Finding | None:
    """Vanishing / exploding flow from the residual-gradient norms along depth (h_0 .. h_L)."""
    g = [v for v in resid_grad if math.isfinite(v)]
    if len(g) < 2 or g[-1] <= 0:
        return None
    ratio = g[0] / g[-1] if g[-1] > 0 else math.inf
    if ratio < vanish_ratio:
        return Finding(
            "vanishing",
            {"first_over_last": ratio, "first": g[0], "last": g[-1]},
            f"the gradient reaching the first layers is {ratio:.2g}x the one at the last layer: it vanishes "
            "on its way down the residual stream",
            "use pre-norm blocks (model.norm_placement=pre), keep residual connections on, or warm the LR up; "
            "post-norm without warmup is the classic cause",
        )
    if ratio > explode_ratio:
        return Finding(
            "exploding",
            {"first_over_last": ratio, "first": g[0], "last": g[-1]},
            f"the gradient grows {ratio:.2g}x from the last layer to the first: it explodes with depth",
            "lower the init scale (model.init=scaled or a smaller model.init_std), use pre-norm, lower optim.lr",
        )
    return None


def attention_health(entropy: list[float], max_logit: list[float], min_entropy: float, max_attn_logit: float):
    """Attention entropy collapse and attention-logit growth (Wortsman et al. 2023; Zhai et al. 2023)."""
    ent = [(i, v) for i, v in enumerate(entropy) if math.isfinite(v)]
    if ent:
        layer, worst = min(ent, key=lambda t: t[1])
        if worst < min_entropy:
            return Finding(
                "attention_collapse",
                {"min_entropy": worst, "layer": float(layer)},
                f"attention in block {layer} has collapsed onto single tokens (entropy {worst:.3g} nats)",
                "enable model.qk_norm=true, lower optim.lr, or lengthen warmup",
            )
    logits = [(i, v) for i, v in enumerate(max_logit) if math.isfinite(v)]
    if logits:
        layer, worst = max(logits, key=lambda t: t[1])
        if worst > max_attn_logit:
            return Finding(
                "attention_logit_growth",
                {"max_attn_logit": worst, "layer": float(layer)},
                f"attention logits in block {layer} reached {worst:.3g}; uncontrolled growth precedes collapse",
                "enable model.qk_norm=true (QK-layernorm), or lower optim.lr",
            )
    return None


def output_logits(mean_lse: float, max_abs: float, max_lse: float) -> Finding | None:
    """Output-logit divergence: the log-partition function drifts far from zero (Wortsman et al. 2023)."""
    if math.isfinite(mean_lse) and abs(mean_lse) > max_lse:
        return Finding(
            "logit_divergence",
            {"mean_logsumexp": mean_lse, "max_abs_logit": max_abs},
            f"the output logits' log-sum-exp drifted to {mean_lse:.3g}; the softmax is losing precision",
            "add a z-loss (train.z_loss=1e-4) to keep log Z near 0, or lower optim.lr",
        )
    return None
