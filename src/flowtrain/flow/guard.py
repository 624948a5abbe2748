"""The stability guard: one decision per step (proceed, skip, roll back, stop), with an audit trail.

Each judgment of the health model (flow/health.py) has a configured action. Per step the guard:

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
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field

from flowtrain import tensorstats
from flowtrain.flow import health
from flowtrain.flow.health import Context, Finding, FlowSummary, Thresholds
from flowtrain.flow.windows import ClipWindow, RobustSpike, StallWindow, TrendDetector

Action = Literal["off", "warn", "skip", "rollback", "stop"]
Notice = Literal["off", "warn"]  # judgments made after the step (from the microscope's records) can only tell
_RANK = {"off": 0, "info": 0, "warn": 1, "skip": 2, "rollback": 3, "stop": 4}


class GuardConfig(Thresholds):
    """Which judgment does what, and its thresholds. Defaults and their sources: docs/guard.md."""

    enabled: bool = True
    nonfinite: Action = "skip"
    loss_spike: Action = "rollback"
    grad_spike: Action = "warn"
    divergence: Action = "warn"
    stall: Notice = "warn"
    update_ratio: Notice = "warn"
    flow_profile: Notice = "warn"
    attention: Notice = "warn"
    logits: Notice = "warn"
    spike_window: int = Field(128, ge=8, description="steps in the robust z-score window (OLMo-core: 128)")
    spike_threshold: float = Field(6.0, gt=0, description="robust z-score (log space) that counts as a spike")
    spike_min_count: int = Field(32, ge=4, description="healthy steps needed before spikes are judged")
    spike_min_scale: float = Field(0.02, gt=0, description="floor of the robust std, in log units (~2%)")
    spike_recur: int = Field(3, ge=2, description="clipped gradient spikes within spike_window that make a warning")
    grad_spike_factor: float = Field(
        4.0, gt=1, description="a gradient spike below this multiple of the recent level is information"
    )
    divergence_window: int = Field(300, ge=10)
    divergence_min_rise: float = Field(0.15, gt=0, description="fitted rise of log loss over the window")
    max_consecutive_skips: int = Field(10, ge=1, description="more skips in a row escalate to a rollback")
    max_rollbacks: int = Field(3, ge=0, description="rollback budget; one more event stops the run")
    rollback_lr_factor: float = Field(1.0, gt=0, le=1, description="multiply the LR by this at each rollback")
    rollback_extra_skip: int = Field(
        20, ge=0, description="steps of data skipped beyond those that led to the event (bad data comes in bursts)"
    )
    snapshot_interval: int = Field(
        50, ge=0, description="keep a last-good state in memory every N steps (0: disk only); also one at the start"
    )


# which config key sets the action of each kind the health model can find
ACTION_OF = {
    "nonfinite": "nonfinite", "loss_spike": "loss_spike", "grad_spike": "grad_spike", "divergence": "divergence",
    "stalled": "stall", "lr_too_high": "update_ratio", "lr_too_low": "update_ratio", "exploding": "flow_profile",
    "vanishing": "flow_profile", "attention_logit_growth": "attention", "attention_collapse": "attention",
    "logit_divergence": "logits",
}  # fmt: skip


@dataclass
class Alert:
    """One row of alerts.jsonl: a finding of the health model (detector = its kind) or a guard action."""

    step: int
    detector: str
    action: str  # info | warn | skip | rollback | stop
    values: dict[str, float]
    explanation: str
    suggestion: str
    severity: str = "warning"  # info | warning | critical
    where: str | None = None

    @classmethod
    def of(cls, step: int, finding: Finding, action: str) -> Alert:
        return cls(step, finding.kind, action, finding.values(), finding.explanation, finding.suggestion,
                   finding.severity, finding.where)  # fmt: skip

    def to_json(self) -> dict:
        clean = {k: (v if math.isfinite(v) else str(v)) for k, v in self.values.items()}
        row = {"step": self.step, "detector": self.detector, "action": self.action, "severity": self.severity,
               "values": clean, "explanation": self.explanation, "suggestion": self.suggestion}  # fmt: skip
        if self.where:
            row["where"] = self.where
        return row


@dataclass
class Verdict:
    skip: torch.Tensor | None  # 0-dim bool on the device: True = do not apply this update (None: never skips)
    action: str = "proceed"  # host decision: proceed | skip | rollback | stop (when host checks ran)
    alerts: list[Alert] = field(default_factory=list)


class Guard:
    """The health model applied online, with actions. `check` before the optimizer step, `observe_record` after a
    monitored step's record is collected.

    `context`: what the run is set to (suggestions never propose what is set)."""

    def __init__(
        self,
        cfg: GuardConfig,
        named_params: list[tuple[str, torch.nn.Parameter]],
        host_every_step: bool,
        context: Context | None = None,
    ):
        self.cfg = cfg
        self.named_params = named_params
        self.host_every_step = host_every_step
        self.context = context or Context()
        self.loss_window = self._spike_window()
        self.grad_window = self._spike_window()
        self.trend = TrendDetector(cfg.divergence_window, cfg.divergence_min_rise)
        self.stall = StallWindow(cfg.stall_window)
        self.clip = ClipWindow(cfg.spike_window)
        self.flow: deque[FlowSummary] = deque(maxlen=cfg.flow_window)
        self.consecutive_skips = 0
        self.skipped_steps = 0
        self.rollbacks = 0

    def _spike_window(self) -> RobustSpike:
        c = self.cfg
        return RobustSpike(c.spike_window, c.spike_threshold, c.spike_min_count, c.spike_min_scale)

    # ---- per-step decision ------------------------------------------------------------------------
    @staticmethod
    def _limit(window: RobustSpike, action: str) -> float:
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

    def check(
        self,
        step: int,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
        host_now: bool,
        clipped: torch.Tensor | None = None,
    ) -> Verdict:
        """Decide for optimizer step `step` (1-based) from its loss, pre-clip gradient norm and whether it was
        clipped."""
        if not self.cfg.enabled:
            return Verdict(None)
        # where the host reads the numbers every step anyway (CPU), it decides alone: no device-side test
        device_test = self.can_skip and not self.host_every_step
        verdict = Verdict(self.device_skip(loss.detach(), grad_norm.detach()) if device_test else None)
        if not (self.host_every_step or host_now):
            return verdict
        numbers = [loss.detach().float(), grad_norm.detach().float()]
        if clipped is not None:
            numbers.append(clipped.detach().float())
        loss_v, norm_v, *rest = torch.stack(numbers).tolist()
        findings = [(f, self._action(f)) for f in self._step_findings(step, loss_v, norm_v, bool(rest and rest[0]))]
        findings = [(f, a) for f, a in findings if a != "off"]
        action = max((a for _, a in findings), key=_RANK.__getitem__, default="proceed")
        if action in ("warn", "info"):
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
        verdict.alerts = [Alert.of(step, f, a if a in ("warn", "info", "off") else action) for f, a in findings]
        return verdict

    def _action(self, finding: Finding) -> str:
        return "info" if finding.severity == "info" else getattr(self.cfg, ACTION_OF[finding.kind])

    def _step_findings(self, step: int, loss: float, norm: float, clipped: bool) -> list[Finding]:
        """The health model's per-step judgments; every window sees the step (a non-finite value enters none)."""
        cfg, ctx, found = self.cfg, self.context, []
        first_bad = self._first_nonfinite_tensor() if not math.isfinite(norm) else None
        if (f := health.nonfinite(loss, norm, first_bad, ctx)) is not None:
            found.append(f)
        z = self.loss_window.observe(loss)
        if z is not None and z > cfg.spike_threshold:
            level = self.loss_window.median()
            found.append(health.spike("loss_spike", loss, z, level, cfg.spike_threshold, "warning", ctx))
        z = self.grad_window.observe(norm)
        if z is not None and z > cfg.spike_threshold:
            self.clip.spikes.append(step)
            recurring = self.clip.recent_spikes(step, cfg.spike_window) >= cfg.spike_recur
            level = self.grad_window.median()
            # healthy gradient norms have heavy tails (2x jumps at 8 sigma, measured); a one-off the clip bounded
            # is information too
            small = norm < cfg.grad_spike_factor * level
            severity = "info" if small or (clipped and not recurring) else "warning"
            found.append(health.spike("grad_spike", norm, z, level, cfg.spike_threshold, severity, ctx))
        if (rise := self.trend.observe(loss)) is not None:
            found.append(health.divergence(rise, cfg.divergence_window, loss, cfg.divergence_min_rise, ctx))
        if (change := self.stall.observe(loss)) is not None:
            found.append(health.stalled(change, 2 * cfg.stall_window, loss, ctx))
        fraction = self.clip.observe(clipped)
        if fraction is not None and fraction >= cfg.clip_saturation:
            found.append(health.clip_saturation(fraction, cfg.spike_window, cfg.clip_saturation))
        return found

    def _first_nonfinite_tensor(self) -> str | None:
        """The first parameter with a non-finite gradient in backward order (from the output back)."""
        named = [(n, p.grad) for n, p in reversed(self.named_params) if p.grad is not None]
        if not named:
            return None
        counts = tensorstats.nonfinite_counts([g for _, g in named]).tolist()
        return next((n for (n, _), c in zip(named, counts, strict=True) if c > 0), None)

    # ---- judgments from the microscope's records ----------------------------------------------------------------
    def observe_record(self, record) -> list[Alert]:
        """The health model's flow judgments on the last `flow_window` records (warn-level: after the fact)."""
        if not self.cfg.enabled or record is None:
            return []
        summary = FlowSummary.of(record)
        if summary.first_nonfinite or not math.isfinite(summary.grad_norm_preclip):
            return []  # the per-step check judged (and skipped) it; its numbers would skew the medians
        self.flow.append(summary)
        if len(self.flow) < self.flow.maxlen:
            return []
        findings = health.judge_flow(self.flow, self.cfg, self.context)
        # the per-step check already judged non-finite steps (and skipped them)
        return [
            Alert.of(record.step, f, "warn")
            for f in findings
            if f.kind != "nonfinite" and getattr(self.cfg, ACTION_OF[f.kind]) != "off"
        ]

    # ---- persistence --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "loss_window": self.loss_window.state_dict(),
            "grad_window": self.grad_window.state_dict(),
            "trend": self.trend.state_dict(),
            "stall": self.stall.state_dict(),
            "clip": self.clip.state_dict(),
            "flow": [summary.to_json() for summary in self.flow],
            "consecutive_skips": self.consecutive_skips,
            "skipped_steps": self.skipped_steps,
            "rollbacks": self.rollbacks,
        }

    def load_state_dict(self, state: dict) -> None:
        self.loss_window.load_state_dict(state["loss_window"])
        self.grad_window.load_state_dict(state["grad_window"])
        self.trend.load_state_dict(state["trend"])
        self.stall.load_state_dict(state.get("stall", {}))
        self.clip.load_state_dict(state.get("clip", {}))
        self.flow.clear()
        self.flow.extend(FlowSummary.from_json(summary) for summary in state.get("flow", []))
        self.consecutive_skips = state["consecutive_skips"]
        self.skipped_steps = state["skipped_steps"]
        self.rollbacks = state["rollbacks"]
