"""`flowtrain diagnose`: from a few steps' FlowRecords, a per-layer table and a plain-language verdict.

Verdicts, checked in this order (the first that applies wins); every number is a median over the steps given:

* nonfinite  any gradient element NaN/Inf (names the first tensor), or a non-finite pre-clip grad norm.
* exploding  the residual-stream gradient grows toward the input: depth ratio h_0 / h_L > EXPLODE_DEPTH
             (10), or the global gradient norm grew more than EXPLODE_STEPS (10x) from the first step to the
             last (at least 3 steps).
* vanishing  the residual-stream gradient at the input is far below the output's:
             depth ratio h_0 / h_L < VANISH_DEPTH (0.1).
* stalled    the weights barely move: median over layers of ||ΔW||/||W|| < STALL_RATIO (1e-6), or a layer
             whose gradient is exactly zero (it receives no signal).
* healthy    none of the above.

The depth ratio compares ||dL/dh_l|| * rms(h_l), the loss's sensitivity to a *relative* change of h_l:
a gradient norm alone depends on the scale of h (a post-norm model's embedding output has RMS ~0.02 where
its normalised block outputs have 1, which makes ||dL/dh_0|| ~50x larger with nothing wrong). Without
activation statistics the raw gradient norms are compared.

Without depth statistics (no block stack found) the depth ratio falls back to the gradient RMS of the first
layer over that of the last layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from flowtrain.flow.records import DEPTH_STATS, TENSOR_STATS, FlowRecord

EXPLODE_DEPTH = 10.0
EXPLODE_STEPS = 10.0
VANISH_DEPTH = 0.1
STALL_RATIO = 1e-6

TABLE_COLUMNS = ("grad_norm", "grad_rms", "update_ratio", "resid_grad_norm", "act_rms")


@dataclass
class Diagnosis:
    """The verdict, why, what to try, and the per-layer numbers it rests on."""

    verdict: str  # healthy | vanishing | exploding | stalled | nonfinite
    cause: str
    suggestion: str
    steps: list[int]
    layers: list[dict] = field(default_factory=list)  # {"layer": ..., TABLE_COLUMNS...}
    evidence: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        """JSON text (NaN written as null) for `flowtrain diagnose --json`."""

        def clean(value):
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        return json.dumps(clean(self.to_dict()), indent=1)

    def render(self) -> str:
        """A text table (one row per layer) followed by the verdict, cause and suggestion."""
        header = ["layer", *TABLE_COLUMNS]
        rows = [[row["layer"], *(_fmt(row[c]) for c in TABLE_COLUMNS)] for row in self.layers]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(
                str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in [header, *rows]
        ]
        steps = f"steps {self.steps[0]}..{self.steps[-1]}" if self.steps else "no steps"
        lines += ["", f"verdict: {self.verdict.upper()} ({steps})", f"cause: {self.cause}", f"try: {self.suggestion}"]
        return "\n".join(lines)


def _fmt(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3g}"


def _median(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.median(finite)) if finite else float("nan")


def _layer_table(records: Sequence[FlowRecord]) -> list[dict]:
    order: dict[str, dict[str, list[float]]] = {}
    for rec in records:
        if rec.layer_stats is not None:
            for name, row in zip(rec.layer_names, rec.layer_stats, strict=True):
                cols = order.setdefault(name, {c: [] for c in TABLE_COLUMNS})
                for c in ("grad_norm", "grad_rms", "update_ratio"):
                    cols[c].append(float(row[TENSOR_STATS.index(c)]))
        if rec.depth_stats is not None:
            for layer, row in zip(rec.depth_layers, rec.depth_stats, strict=True):
                cols = order.setdefault(layer, {c: [] for c in TABLE_COLUMNS})
                for c in ("resid_grad_norm", "act_rms"):
                    cols[c].append(float(row[DEPTH_STATS.index(c)]))
    return [{"layer": name, **{c: _median(v) for c, v in cols.items()}} for name, cols in order.items()]


def _first_nonfinite(records: Sequence[FlowRecord]) -> tuple[int, str] | None:
    for rec in records:
        if rec.tensor_stats is not None:
            bad = rec.tensor_stats[:, TENSOR_STATS.index("grad_nonfinite")]
            for name, count in zip(rec.tensor_names, bad, strict=True):
                if count > 0:
                    return rec.step, f"{name} ({int(count)} values)"
        pre = rec.scalars.get("grad_norm_preclip")
        if pre is not None and not math.isfinite(pre):
            return rec.step, "the global gradient norm"
    return None


def _grad_norm(rec: FlowRecord) -> float:
    if "grad_norm_preclip" in rec.scalars:
        return rec.scalars["grad_norm_preclip"]
    if rec.layer_stats is None:
        return float("nan")
    return float(np.sqrt(np.nansum(rec.layer_stats[:, TENSOR_STATS.index("grad_norm")].astype(np.float64) ** 2)))


def _depth_ratio(records: Sequence[FlowRecord], layers: list[dict]) -> tuple[float, str]:
    """||dL/dh_0|| / ||dL/dh_L|| (median over steps), or the first/last layer grad-RMS ratio as fallback."""
    ratios = []
    for rec in records:
        if rec.depth_stats is not None and len(rec.depth_stats) >= 2:
            resid = rec.depth_stats[:, DEPTH_STATS.index("resid_grad_norm")].astype(np.float64)
            act = rec.depth_stats[:, DEPTH_STATS.index("act_rms")].astype(np.float64)
            if np.isfinite(act).all():
                resid = resid * act  # scale-free: see the module docstring
            ratios.append(float(resid[0] / resid[-1]) if resid[-1] > 0 else float("nan"))
    ratio = _median(ratios)
    if math.isfinite(ratio):
        return ratio, "relative residual gradient (||dL/dh_0||*rms(h_0)) / (||dL/dh_L||*rms(h_L))"
    rms = [row["grad_rms"] for row in layers if math.isfinite(row["grad_rms"])]
    if len(rms) >= 2 and rms[-1] > 0:
        return rms[0] / rms[-1], "gradient RMS of the first layer / the last layer"
    return float("nan"), "no depth profile"


def diagnose(records: Sequence[FlowRecord]) -> Diagnosis:
    """Verdict over a few monitored steps (records with per-tensor / depth statistics)."""
    records = [r for r in records if r is not None]
    steps = [r.step for r in records]
    layers = _layer_table(records)
    ratio, ratio_name = _depth_ratio(records, layers)
    update = _median([row["update_ratio"] for row in layers])
    evidence = {"depth_ratio": ratio, "depth_ratio_of": ratio_name, "median_update_ratio": update}
    grad_norms = [_grad_norm(r) for r in records]
    growth = grad_norms[-1] / grad_norms[0] if len(grad_norms) >= 3 and grad_norms[0] > 0 else float("nan")
    evidence["grad_norm_growth"] = growth

    def verdict(kind: str, cause: str, suggestion: str) -> Diagnosis:
        return Diagnosis(kind, cause, suggestion, steps, layers, evidence)

    if not records:
        return verdict("healthy", "no monitored steps were given", "run a few steps with flow.enabled=true")
    bad = _first_nonfinite(records)
    if bad is not None:
        return verdict(
            "nonfinite",
            f"non-finite gradient values at step {bad[0]}, first in {bad[1]}",
            "lower the LR, turn on clipping (clip.kind=norm), prefer bfloat16 to float16, and check the data "
            "for bad inputs",
        )
    if ratio > EXPLODE_DEPTH:
        return verdict(
            "exploding",
            f"{ratio_name} is {ratio:.3g}: the gradient grows toward the input (above {EXPLODE_DEPTH:g})",
            "use a smaller init (model.init=scaled), pre-norm (model.norm_placement=pre), a lower LR with "
            "warmup, and gradient clipping",
        )
    if growth > EXPLODE_STEPS:
        return verdict(
            "exploding",
            f"the gradient norm grew {growth:.3g}x over {len(records)} steps (above {EXPLODE_STEPS:g}x)",
            "lower the LR or lengthen the warmup, and clip gradients (clip.kind=norm)",
        )
    if ratio < VANISH_DEPTH:
        return verdict(
            "vanishing",
            f"{ratio_name} is {ratio:.3g}: the earliest layers get far less gradient than the last "
            f"(below {VANISH_DEPTH:g})",
            "keep residual connections (model.residual=true) and use pre-norm (model.norm_placement=pre); "
            "post-norm needs LR warmup",
        )
    dead = [row["layer"] for row in layers if row["grad_norm"] == 0]
    if update < STALL_RATIO or dead:
        what = f"layers with zero gradient: {', '.join(dead)}" if dead else f"median ||dW||/||W|| is {update:.3g}"
        return verdict(
            "stalled",
            f"the weights barely move ({what})",
            "raise the LR (a warmup that starts at 0 stalls the first steps), loosen clipping "
            "(clip.max_norm), and check for unused or frozen parameters",
        )
    return verdict(
        "healthy",
        f"{ratio_name} is {ratio:.3g} and the median ||dW||/||W|| is {update:.3g}",
        "nothing to fix; watch these numbers as training goes on",
    )
