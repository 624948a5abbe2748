"""The stability guard: one decision per step (proceed, skip, roll back, stop), with an audit trail.

Each detector (flow/detectors.py) has a configured action. Per step the guard:

1. builds the *skip decision as a device tensor* — non-finite loss or gradient, or a loss / grad-norm above
   the spike limit derived from the recent window — so a fused optimizer can apply it without a host sync
   (torch's fused Adam/AdamW/SGD kernels take a `found_inf` tensor and leave weights, moments and step count
   untouched when it is non-zero; this is the mechanism GradScaler uses);
2. when host checks run (every step on CPU, where a sync costs nothing; every logging step on GPU), reads the
   numbers, runs every detector and returns the strongest action among those that fired.

Skip means no weight update and no optimizer-state update; the step still counts (the LR schedule and the data
move on). Roll back and stop are host decisions carried out by the trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field

from flowtrain import tensorstats
from flowtrain._base import Section
from flowtrain.flow import detectors as det

Action = Literal["off", "warn", "skip", "rollback", "stop"]
_RANK = {"off": 0, "warn": 1, "skip": 2, "rollback": 3, "stop": 4}


class GuardConfig(Section):
    """Which detector does what, and its thresholds. Defaults are documented in docs/guard.md."""

    enabled: bool = True
    nonfinite: Action = "skip"
    loss_spike: Action = "rollback"
    grad_spike: Action = "warn"
    divergence: Action = "warn"
    flow_profile: Action = "warn"
    attention: Action = "warn"
    logits: Action = "warn"
    spike_window: int = Field(128, ge=8, description="steps in the robust z-score window (OLMo-core: 128)")
    spike_threshold: float = Field(6.0, gt=0, description="robust z-score (log space) that counts as a spike")
    spike_min_count: int = Field(32, ge=4, description="healthy steps needed before spikes are judged")
    spike_min_scale: float = Field(0.02, gt=0, description="floor of the robust std, in log units (~2%)")
    divergence_window: int = Field(300, ge=10)
    divergence_min_rise: float = Field(0.15, gt=0, description="fitted rise of log loss over the window")
    vanish_ratio: float = Field(1e-3, gt=0, description="h0 / hL residual-gradient ratio below this: vanishing")
    explode_ratio: float = Field(1e3, gt=1, description="h0 / hL ratio above this: exploding")
    min_attn_entropy: float = Field(0.05, ge=0, description="nats; below this attention has collapsed")
    max_attn_logit: float = Field(100.0, gt=0)
    max_logsumexp: float = Field(30.0, gt=0, description="|mean log Z| of the output logits above this: diverging")
    max_consecutive_skips: int = Field(10, ge=1, description="more skips in a row escalate to a rollback")
    max_rollbacks: int = Field(3, ge=0, description="rollback budget; one more event stops the run")
    rollback_lr_factor: float = Field(1.0, gt=0, le=1, description="multiply the LR by this at each rollback")
    rollback_extra_skip: int = Field(
        20, ge=0, description="steps of data skipped beyond those that led to the event (bad data comes in bursts)"
    )
    snapshot_interval: int = Field(
        50, ge=0, description="keep a last-good state in memory every N steps (0: disk only)"
    )


@dataclass
class Alert:
    step: int
    detector: str
    action: str
    values: dict[str, float]
    explanation: str
    suggestion: str

    def to_json(self) -> dict:
        clean = {k: (v if math.isfinite(v) else str(v)) for k, v in self.values.items()}
        return {
            "step": self.step,
            "detector": self.detector,
            "action": self.action,
            "values": clean,
            "explanation": self.explanation,
            "suggestion": self.suggestion,
        }


@dataclass
class Verdict:
    skip: torch.Tensor | None  # 0-dim bool on the device: True = do not apply this update (None: never skips)
    action: str = "proceed"  # host decision: proceed | skip | rollback | stop (when host checks ran)
    alerts: list[Alert] = field(default_factory=list)


class Guard:
    """Detectors + actions for one run. `check` before the optimizer step, `observe_record` after collect."""

    def __init__(self, cfg: GuardConfig, named_params: list[tuple[str, torch.nn.Parameter]], host_every_step: bool):
        self.cfg = cfg
        self.named_params = named_params
        self.host_every_step = host_every_step
        self.loss_window = det.RobustSpike(
            cfg.spike_window, cfg.spike_threshold, cfg.spike_min_count, cfg.spike_min_scale
        )
        self.grad_window = det.RobustSpike(
            cfg.spike_window, cfg.spike_threshold, cfg.spike_min_count, cfg.spike_min_scale
        )
        self.trend = det.TrendDetector(cfg.divergence_window, cfg.divergence_min_rise)
        self.consecutive_skips = 0
        self.skipped_steps = 0
        self.rollbacks = 0

    # ---- per-step decision ------------------------------------------------------------------------
    @staticmethod
    def _limit(window: det.RobustSpike, action: str) -> float:
        """The value above which the device-side test calls a spike (inf when not judged or not skipping)."""
        return window.limit() if action in ("skip", "rollback", "stop") else math.inf

    @property
    def can_skip(self) -> bool:
        """Whether any detector's action can skip a step (if not, the step needs no skip tensor at all)."""
        return self.cfg.enabled and "skip" in (self.cfg.nonfinite, self.cfg.loss_spike, self.cfg.grad_spike)

    def device_skip(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Skip decision as a device tensor: no host sync."""
        bad = torch.zeros((), dtype=torch.bool, device=loss.device)
        if self.cfg.nonfinite == "skip":
            bad = bad | ~torch.isfinite(loss) | ~torch.isfinite(grad_norm)
        if self.cfg.loss_spike == "skip":
            bad = bad | (loss > self._limit(self.loss_window, "skip"))
        if self.cfg.grad_spike == "skip":
            bad = bad | (grad_norm > self._limit(self.grad_window, "skip"))
        return bad

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, host_now: bool) -> Verdict:
        """Decide for optimizer step `step` (1-based) from its loss and pre-clip gradient norm."""
        if not self.cfg.enabled:
            return Verdict(None)
        # where the host reads the numbers every step anyway (CPU), it decides alone: no device-side test
        device_test = self.can_skip and not self.host_every_step
        verdict = Verdict(self.device_skip(loss.detach(), grad_norm.detach()) if device_test else None)
        if not (self.host_every_step or host_now):
            return verdict
        loss_v, norm_v = torch.stack([loss.detach().float(), grad_norm.detach().float()]).tolist()
        findings: list[tuple[det.Finding, str]] = []
        first_bad = self._first_nonfinite_tensor() if not math.isfinite(norm_v) else None
        for finding, action in (
            (det.nonfinite(loss_v, norm_v, first_bad), self.cfg.nonfinite),
            (det.loss_spike(self.loss_window, loss_v), self.cfg.loss_spike),
            (det.grad_spike(self.grad_window, norm_v), self.cfg.grad_spike),
            (self.trend.observe(loss_v), self.cfg.divergence),
        ):
            if finding is not None and action != "off":
                findings.append((finding, action))
        action = max((a for _, a in findings), key=_RANK.__getitem__, default="proceed")
        if action == "warn":
            action = "proceed"
        device_skipped = verdict.skip is not None and bool(verdict.skip)
        if action == "proceed" and device_skipped:
            action = "skip"  # the device test saw a spike the host window judged differently: it wins
        if action == "skip":
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.consecutive_skips > self.cfg.max_consecutive_skips:
                action = "rollback"  # skips that keep coming mean the state itself is bad
        else:
            self.consecutive_skips = 0
        if action == "rollback" and self.rollbacks >= self.cfg.max_rollbacks:
            action = "stop"
        if action == "skip" and not device_skipped:  # host-only finding (e.g. grad spike set to skip late)
            verdict.skip = torch.ones((), dtype=torch.bool, device=loss.device)
        verdict.action = action
        verdict.alerts = [self._alert(step, f, a, action) for f, a in findings]
        return verdict

    def _alert(self, step: int, f: det.Finding, configured: str, taken: str) -> Alert:
        action = configured if configured in ("warn", "off") else taken
        return Alert(step, f.detector, action, f.values, f.explanation, f.suggestion)

    def _first_nonfinite_tensor(self) -> str | None:
        named = [(n, p.grad) for n, p in self.named_params if p.grad is not None]
        if not named:
            return None
        counts = tensorstats.nonfinite_counts([g for _, g in named]).tolist()
        return next((n for (n, _), c in zip(named, counts) if c > 0), None)

    # ---- slower signals from the microscope's record ------------------------------------------------
    def observe_record(self, record) -> list[Alert]:
        """Flow-profile, attention and logit detectors on a FlowRecord (warn-level by default)."""
        if not self.cfg.enabled or record is None:
            return []
        found: list[tuple[det.Finding, str]] = []
        if record.depth_stats is not None and len(record.depth_names) > 1:
            f = det.depth_profile(record.depth("resid_grad_norm"), self.cfg.vanish_ratio, self.cfg.explode_ratio)
            if f:
                found.append((f, self.cfg.flow_profile))
            f = det.attention_health(
                record.depth("attn_entropy"),
                record.depth("attn_max_logit"),
                self.cfg.min_attn_entropy,
                self.cfg.max_attn_logit,
            )
            if f:
                found.append((f, self.cfg.attention))
        lse = record.scalars.get("logits_lse_mean")
        if lse is not None:
            f = det.output_logits(lse, record.scalars.get("logits_max_abs", math.nan), self.cfg.max_logsumexp)
            if f:
                found.append((f, self.cfg.logits))
        return [
            Alert(record.step, f.detector, "warn", f.values, f.explanation, f.suggestion)
            for f, a in found
            if a != "off"
        ]

    # ---- persistence --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "loss_window": self.loss_window.state_dict(),
            "grad_window": self.grad_window.state_dict(),
            "trend": self.trend.state_dict(),
            "consecutive_skips": self.consecutive_skips,
            "skipped_steps": self.skipped_steps,
            "rollbacks": self.rollbacks,
        }

    def load_state_dict(self, state: dict) -> None:
        self.loss_window.load_state_dict(state["loss_window"])
        self.grad_window.load_state_dict(state["grad_window"])
        self.trend.load_state_dict(state["trend"])
        self.consecutive_skips = state["consecutive_skips"]
        self.skipped_steps = state["skipped_steps"]
        self.rollbacks = state["rollbacks"]
