"""The health model: every judgment flowtrain makes about a run, in one place.

The guard applies it online, `flowtrain diagnose` over its few steps, and the report and the lab show the
verdicts it wrote, so the same numbers never get two verdicts. docs/guard.md lists each formula, threshold and
where the threshold comes from (the literature, or our measurement on healthy and induced-failure runs).

Two kinds of input:

* per step: the loss, the pre-clip gradient norm and whether the clip bit (`step_findings`, `nonfinite`);
* per monitored step: a `FlowSummary` of the microscope's record (per-layer update/weight ratios and gradient
  norms, the residual-gradient and activation profile along depth, attention, output logits). Those are judged
  on the median over a window of summaries (`judge_flow`), so one odd step is never a verdict.

A finding has a severity: "critical" (the step cannot be used as it is), "warning" (something to fix) or
"info" (worth knowing, nothing wrong: an event the clipper bounded, a clip that sets the step size).
Suggestions are conditioned on the run's config (`Context`): nothing already set is ever suggested.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import Field

from flowtrain._base import Section
from flowtrain.flow.summary import FlowSummary

# the verdict a set of findings gets is its first kind in this order: causes before their symptoms
PRIORITY = (
    "nonfinite",
    "lr_too_high",
    "exploding",
    "vanishing",
    "lr_too_low",
    "stalled",
    "attention_logit_growth",
    "attention_collapse",
    "logit_divergence",
    "loss_spike",
    "divergence",
    "grad_spike",
    "clip_saturation",
)
SEVERITIES = ("info", "warning", "critical")
# the statistic each judgment of the microscope's records needs: without it that judgment is not made
NEEDS = {
    "vanishing": "resid_grad_norm",
    "exploding": "resid_grad_norm",
    "attention_logit_growth": "attn_max_logit",
    "attention_collapse": "attn_entropy",
    "logit_divergence": "logits_lse_mean",
}
# without these no run is called healthy: how the gradient flows along depth is what the microscope is for
DEPTH_JUDGMENTS = ("vanishing", "exploding")


class Thresholds(Section):
    """Where each judgment draws its line (guard.* in the run config; docs/guard.md says where each comes from)."""

    update_ratio_high: float = Field(2e-2, gt=0, description="median ||dW||/||W|| per step above this: LR too high")
    update_ratio_low: float = Field(1e-6, gt=0, description="median ||dW||/||W|| per step below this: LR too low")
    vanish_ratio: float = Field(1e-4, gt=0, description="||dL/dh_0|| / ||dL/dh_L|| below this: vanishing")
    explode_ratio: float = Field(1e4, gt=1, description="||dL/dh_0|| / ||dL/dh_L|| above this: exploding")
    signal_collapse: float = Field(1e-3, gt=0, description="rms(h_L) / rms(h_0) below this: the forward signal dies")
    min_attn_entropy: float = Field(0.05, ge=0, description="nats; below this attention has collapsed")
    max_attn_logit: float = Field(100.0, gt=0, description="max attention logit above this: logit growth")
    max_logsumexp: float = Field(30.0, gt=0, description="|mean log Z| of the output logits above this: diverging")
    flow_window: int = Field(5, ge=1, description="monitored steps whose medians one flow judgment uses")
    clip_saturation: float = Field(0.95, gt=0, le=1, description="fraction of clipped steps that is saturation")
    stall_window: int = Field(200, ge=10, description="a loss that does not fall over two such blocks has stalled")


@dataclass
class Context:
    """What the run is set to, so suggestions never propose what is already there (unknown: suggest anything)."""

    norm_placement: str | None = None
    residual: bool | None = None
    qk_norm: bool | None = None
    z_loss: float | None = None
    warmup_steps: int | None = None
    clip_kind: str | None = None
    init: str | None = None
    dtype: str | None = None

    @classmethod
    def of(cls, cfg) -> Context:
        """From a RunConfig."""
        m = cfg.model
        return cls(m.norm_placement, m.residual, m.qk_norm, cfg.train.z_loss, cfg.schedule.warmup_steps,
                   cfg.clip.kind, m.init, cfg.train.dtype)  # fmt: skip

    def advise(self, *options: tuple[str, bool]) -> str:
        """The options whose condition holds (True: not already set), joined; always ends with something to do."""
        chosen = [text for text, applies in options if applies]
        return "; ".join(chosen) if chosen else "lower optim.lr"

    def not_set(self, value, wanted) -> bool:
        return value is None or value != wanted


@dataclass
class Finding:
    """One judgment: its kind, how bad, the numbers behind it (each with the threshold it crossed), what to do."""

    kind: str
    severity: str
    explanation: str
    suggestion: str
    evidence: list[dict] = field(default_factory=list)  # {"metric", "value", "op", "threshold"}
    where: str | None = None  # the tensor or layer it is about

    def values(self) -> dict[str, float]:
        """The evidence as name -> number (the alerts' `values`)."""
        out = {e["metric"]: e["value"] for e in self.evidence}
        out.update(
            {f"{e['metric']}_threshold": e["threshold"] for e in self.evidence if e.get("threshold") is not None}
        )
        return out


def evidence(metric: str, value: float, op: str | None = None, threshold: float | None = None) -> dict:
    return {"metric": metric, "value": float(value), "op": op, "threshold": threshold}


def verdict_of(findings: Sequence[Finding]) -> Finding | None:
    """The finding that names the run's state: the first warning or critical one in PRIORITY order."""
    serious = [f for f in findings if f.severity != "info"]
    return min(serious, key=lambda f: PRIORITY.index(f.kind), default=None)


# ---- per step -------------------------------------------------------------------------------------------------
def nonfinite(loss: float, grad_norm: float, first_bad: str | None, ctx: Context) -> Finding | None:
    """The loss or the gradient is NaN/Inf. `first_bad`: the first parameter whose gradient is non-finite, in the
    order the backward pass produced them (from the output back), when the gradient is the problem."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return None
    if not math.isfinite(loss):
        where, what = None, f"the loss is {loss}: the forward pass overflowed or read bad data"
    else:
        where = first_bad
        place = f", first in {first_bad} (backward order)" if first_bad else ""
        what = f"the loss was finite ({loss:.6g}) but the gradient is not (norm {grad_norm}){place}"
    evidenced = [evidence("loss", loss), evidence("grad_norm_preclip", grad_norm)]
    return Finding("nonfinite", "critical", what, _nonfinite_advice(ctx), evidenced, where)


def _nonfinite_advice(ctx: Context) -> str:
    return ctx.advise(
        ("lower optim.lr", True),
        ("use train.dtype=bfloat16 rather than float16", ctx.dtype == "float16"),
        ("add train.z_loss=1e-4", not ctx.z_loss),
        ("turn clipping on (clip.kind=norm)", ctx.clip_kind == "off"),
        ("check the data around this step", True),
    )


def spike(kind: str, value: float, z: float, level: float, threshold: float, severity: str, ctx: Context) -> Finding:
    """A robust z-score above the threshold (flow/windows.py RobustSpike)."""
    what = "the training loss" if kind == "loss_spike" else "the pre-clip gradient norm"
    if kind == "loss_spike":
        advice = ctx.advise(("check the data around this step", True), ("lower optim.lr", True),
                            ("lengthen schedule.warmup_steps", (ctx.warmup_steps or 0) < 100))  # fmt: skip
    elif severity == "info":
        advice = "nothing to do: the clip bounded this update; repeated spikes would be a warning"
    else:
        advice = ctx.advise(("lower optim.lr", True), ("lengthen schedule.warmup_steps", True),
                            ("clip gradients (clip.kind=norm)", ctx.clip_kind == "off"))  # fmt: skip
    metric = "loss" if kind == "loss_spike" else "grad_norm_preclip"
    return Finding(
        kind,
        severity,
        f"{what} jumped to {value:.4g}, {z:.1f} robust standard deviations above its recent level ({level:.4g})",
        advice,
        [evidence(metric, value), evidence("robust_z", z, ">", threshold), evidence("recent_level", level)],
    )


def divergence(rise: float, window: int, loss: float, threshold: float, ctx: Context) -> Finding:
    return Finding(
        "divergence",
        "warning",
        f"the loss has been rising for {window} steps (about {math.expm1(rise):.0%} over the window), now {loss:.4g}",
        ctx.advise(("lower optim.lr", True), ("check that the data is not repeating or shifting", True)),
        [evidence("log_loss_rise", rise, ">", threshold), evidence("window", window), evidence("loss", loss)],
    )


def stalled(change: float, window: int, loss: float, ctx: Context) -> Finding:
    """`window`: the steps judged (two blocks of guard.stall_window)."""
    return Finding(
        "stalled",
        "warning",
        f"the loss has not fallen in {window} steps (fitted change {change:+.2%}, now {loss:.4g})",
        ctx.advise(
            ("raise optim.lr", True),
            ("check for frozen or unused parameters", True),
            ("loosen clipping (clip.max_norm)", ctx.clip_kind not in (None, "off")),
        ),  # fmt: skip
        [evidence("log_loss_change", change, ">", 0.0), evidence("window", window), evidence("loss", loss)],
    )


def clip_saturation(fraction: float, window: int, threshold: float) -> Finding:
    return Finding(
        "clip_saturation",
        "info",
        f"{fraction:.0%} of the last {window} steps were clipped: the clip, not the LR, sets the step size now",
        "fine if intended; otherwise raise clip.max_norm or lower optim.lr so the schedule controls the step",
        [evidence("clipped_fraction", fraction, ">=", threshold), evidence("window", window)],
    )


# ---- per monitored step ---------------------------------------------------------------------------------------
def _median(values) -> float:
    """Median of the values that are not None or NaN (NaN when none is), in Python: numpy's is slow on a window's
    few values, and a guard judging every record takes a dozen (docs/performance.md)."""
    kept = [float(x) for x in values if x is not None and not math.isnan(x)]
    return statistics.median(kept) if kept else math.nan


def _over_layers(values: np.ndarray, reduce) -> float | None:
    """`reduce` (statistics.median, max) of one summary's per-layer values without NaN; None when none is finite."""
    kept = [x for x in values.tolist() if not math.isnan(x)]
    return reduce(kept) if any(math.isfinite(x) for x in kept) else None


def _where(pairs: list[tuple[float, str | None]], pick) -> str | None:
    named = [(v, n) for v, n in pairs if n is not None and math.isfinite(v)]
    return pick(named, key=lambda t: t[0])[1] if named else None


def judge_flow(window: Sequence[FlowSummary], th: Thresholds, ctx: Context) -> list[Finding]:
    """Every finding about a window of monitored steps, each on the median over the window (docs/guard.md)."""
    if not window:
        return []
    found: list[Finding] = []
    steps = f"steps {window[0].step}-{window[-1].step}" if len(window) > 1 else f"step {window[0].step}"
    bad = next((s for s in window if s.first_nonfinite), None)
    if bad is not None:  # a record names the tensor; the loss and global norm are the per-step check's
        what = f"non-finite gradient values at step {bad.step}, first in {bad.first_nonfinite} (backward order)"
        found.append(Finding("nonfinite", "critical", what, _nonfinite_advice(ctx), [evidence("step", bad.step)],
                             bad.first_nonfinite))  # fmt: skip
    ratio = _median(_over_layers(s.update_ratio, statistics.median) for s in window)
    if ratio > th.update_ratio_high:
        found.append(Finding(
            "lr_too_high", "warning",
            f"each step changes the weights by {ratio:.3g} of their norm (median over layers, {steps}); "
            f"healthy training moves them ~1e-3 per step",
            ctx.advise(("lower optim.lr (about 10x)", True), ("lengthen schedule.warmup_steps",
                        (ctx.warmup_steps or 0) < 100)),
            [evidence("median_update_ratio", ratio, ">", th.update_ratio_high)],
        ))  # fmt: skip
    resid = _median(s.resid_ratio for s in window)
    # (the growth of the global norm over a few steps is no sign: healthy runs grow it 10-40x in 5 steps early on)
    if resid > th.explode_ratio:
        found.append(Finding(
            "exploding", "warning",
            f"the residual-stream gradient grows {resid:.3g}x from the output back to the input ({steps}): "
            "gradients explode with depth",
            ctx.advise(("use a smaller init (model.init=scaled)", ctx.not_set(ctx.init, "scaled")),
                       ("use pre-norm (model.norm_placement=pre)", ctx.not_set(ctx.norm_placement, "pre")),
                       ("lower optim.lr", True), ("clip gradients (clip.kind=norm)", ctx.clip_kind == "off")),
            [evidence("resid_grad_ratio_h0_hL", resid, ">", th.explode_ratio)],
        ))  # fmt: skip
    signal = _median(s.signal_ratio for s in window)
    dead = _dead_layers(window)
    input_side_dead = window[-1].first_block in dead and len(dead) < len(window[-1].layers)
    if resid < th.vanish_ratio or signal < th.signal_collapse or input_side_dead:
        ev = []
        if resid < th.vanish_ratio:
            ev.append(evidence("resid_grad_ratio_h0_hL", resid, "<", th.vanish_ratio))
        if signal < th.signal_collapse:
            ev.append(evidence("act_rms_ratio_hL_h0", signal, "<", th.signal_collapse))
        if dead:
            ev.append(evidence("layers_without_gradient", len(dead), ">", 0))
        parts = []
        if resid < th.vanish_ratio:
            parts.append(f"the gradient reaching the input is {resid:.3g}x the one at the output")
        if signal < th.signal_collapse:
            parts.append(f"the activations shrink to {signal:.3g}x of the embedding's by the last block")
        if dead:
            parts.append(f"{len(dead)} layer(s) get exactly zero gradient ({', '.join(dead[:3])}...)")
        found.append(Finding(
            "vanishing", "warning", f"{'; '.join(parts)} ({steps}): the signal vanishes with depth",
            ctx.advise(("turn residual connections on (model.residual=true)", ctx.residual is not True),
                       ("use pre-norm (model.norm_placement=pre)", ctx.not_set(ctx.norm_placement, "pre")),
                       ("warm the LR up (schedule.warmup_steps)", not ctx.warmup_steps)), ev,
        ))  # fmt: skip
    elif dead:
        found.append(Finding(
            "stalled", "warning",
            f"{', '.join(dead[:5])} receive(s) exactly zero gradient ({steps}): those weights never change",
            "check for frozen, detached or unused parameters (a hook or a .detach() in the forward)",
            [evidence("layers_without_gradient", len(dead), ">", 0)], dead[0],
        ))  # fmt: skip
    grads_flow = _median(_over_layers(s.grad_norm, max) for s in window)
    if ratio < th.update_ratio_low and grads_flow > 0 and not dead:
        found.append(Finding(
            "lr_too_low", "warning",
            f"each step changes the weights by only {ratio:.3g} of their norm (median over layers, {steps}): "
            "they practically do not move",
            "raise optim.lr (healthy training moves weights ~1e-3 of their norm per step)",
            [evidence("median_update_ratio", ratio, "<", th.update_ratio_low)],
        ))  # fmt: skip
    logit = _median(s.max_attn_logit[0] for s in window)
    if logit > th.max_attn_logit:
        where = _where([s.max_attn_logit for s in window], max)
        found.append(Finding(
            "attention_logit_growth", "warning",
            f"attention logits reached {logit:.3g} (in {where}); uncontrolled growth precedes attention collapse",
            ctx.advise(("enable model.qk_norm=true", ctx.qk_norm is not True), ("lower optim.lr", True)),
            [evidence("max_attn_logit", logit, ">", th.max_attn_logit)], where,
        ))  # fmt: skip
    entropy = _median(s.min_entropy[0] for s in window)
    if entropy < th.min_attn_entropy:
        where = _where([s.min_entropy for s in window], min)
        found.append(Finding(
            "attention_collapse", "warning",
            f"attention in {where} has collapsed onto single tokens (entropy {entropy:.3g} nats)",
            ctx.advise(("enable model.qk_norm=true", ctx.qk_norm is not True), ("lower optim.lr", True),
                       ("lengthen schedule.warmup_steps", (ctx.warmup_steps or 0) < 100)),
            [evidence("min_attn_entropy", entropy, "<", th.min_attn_entropy)], where,
        ))  # fmt: skip
    lse = _median(s.logsumexp for s in window)
    if abs(lse) > th.max_logsumexp:
        found.append(Finding(
            "logit_divergence", "warning",
            f"the output logits' log-sum-exp drifted to {lse:.3g}; the softmax is losing precision",
            ctx.advise(("add a z-loss (train.z_loss=1e-4)", not ctx.z_loss), ("lower optim.lr", True)),
            [evidence("mean_logsumexp", lse, "|>|", th.max_logsumexp)],
        ))  # fmt: skip
    return found


def unjudged(window: Sequence[FlowSummary], unavailable: Mapping[str, str] | None = None) -> dict[str, str]:
    """judgment -> why it could not be made: its statistic is unavailable for the model (`unavailable`: stat ->
    reason, FlowRecord.unavailable), or no summary of the window has a finite value of it."""
    reasons = dict(unavailable or {})
    seen = {
        "resid_grad_norm": [s.resid_ratio for s in window],
        "attn_max_logit": [s.max_attn_logit[0] for s in window],
        "attn_entropy": [s.min_entropy[0] for s in window],
        "logits_lse_mean": [s.logsumexp for s in window],
    }
    out = {}
    for judgment, stat in NEEDS.items():
        if stat in reasons:
            out[judgment] = f"{stat} is not available for this model: {reasons[stat]}"
        elif window and not any(math.isfinite(v) for v in seen[stat]):
            out[judgment] = f"no recorded step has a finite {stat}"
    return out


def _dead_layers(window: Sequence[FlowSummary]) -> list[str]:
    """Layers whose gradient is exactly zero in every summary of the window."""
    last = window[-1]
    zero = np.ones(len(last.layers), dtype=bool)
    for s in window:
        if s.layers != last.layers:
            return []
        zero &= s.grad_norm == 0
    return [n for n, z in zip(last.layers, zero, strict=True) if z]


# ---- a whole run, from what it wrote -----------------------------------------------------------------------------
def run_verdict(alerts: Sequence[dict]) -> dict:
    """A run's verdict from its alerts.jsonl rows (the findings the guard wrote): the first kind in PRIORITY among
    the warnings and critical findings, with how often and over which steps it fired, the actions taken, and the
    kinds noted as information. The report and the lab show this, so they say what the guard said."""
    seen: dict[str, dict] = {}
    actions: dict[str, int] = {}
    info: set[str] = set()
    for row in alerts:
        kind, step = row.get("detector", "?"), int(row.get("step", 0))
        if kind == "guard":
            actions[row.get("action", "?")] = actions.get(row.get("action", "?"), 0) + 1
            continue
        if row.get("severity") == "info" or kind not in PRIORITY:
            info.add(kind)
            continue
        first, last = int(row.get("first_step", step)), int(row.get("last_step", step))
        entry = seen.setdefault(kind, {"count": 0, "first_step": first, "last_step": last, "row": row})
        entry["count"] += int(row.get("repeated", 1))
        entry["first_step"], entry["last_step"] = min(entry["first_step"], first), max(entry["last_step"], last)
    if not seen:
        return {"verdict": "healthy", "actions": actions, "info": sorted(info),
                "explanation": "no warning: no judgment of the health model fired", "suggestion": ""}  # fmt: skip
    kind = min(seen, key=PRIORITY.index)
    top = seen[kind]
    return {
        "verdict": kind, "count": top["count"], "first_step": top["first_step"], "last_step": top["last_step"],
        "explanation": top["row"].get("explanation", ""), "suggestion": top["row"].get("suggestion", ""),
        "also": [k for k in PRIORITY if k in seen and k != kind], "actions": actions, "info": sorted(info),
    }  # fmt: skip
