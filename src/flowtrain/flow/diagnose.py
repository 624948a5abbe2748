"""`flowtrain diagnose`: from a few steps' FlowRecords, per-layer and per-tensor tables and the health model's
verdict (flow/health.py: the same judgment the guard makes online over the same number of monitored steps).

Every number is a median over the steps given. The verdict is the first warning-level finding in the health
model's priority order (causes before symptoms), or "healthy"; its evidence says which numbers crossed which
threshold. Where nothing fired but the flow along depth could not be judged (the model's residual stream was not
measured: health.unjudged), the verdict is "inconclusive", never "healthy"; `unjudged` lists every judgment not
made and why.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from flowtrain.flow import health
from flowtrain.flow.records import DEPTH_STATS, TENSOR_STATS, FlowRecord
from flowtrain.flow.summary import jsonable

TABLE_COLUMNS = ("grad_norm", "grad_rms", "update_ratio", "resid_grad_norm", "act_rms")


@dataclass
class Diagnosis:
    """The verdict, why, what to try, and the per-layer numbers it rests on."""

    verdict: str  # healthy, inconclusive, or a kind of health.PRIORITY
    cause: str
    suggestion: str
    steps: list[int]
    layers: list[dict] = field(default_factory=list)  # {"layer": ..., TABLE_COLUMNS...}
    tensors: list[dict] = field(default_factory=list)  # {"tensor": ..., "layer": ..., TENSOR_STATS...}
    evidence: list[dict] = field(default_factory=list)  # the verdict's numbers: metric, value, op, threshold
    findings: list[dict] = field(default_factory=list)  # every finding: kind, severity, explanation, evidence
    unjudged: dict[str, str] = field(default_factory=dict)  # judgment -> why it could not be made

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        """JSON text (NaN written as null) for `flowtrain diagnose --json`."""
        return json.dumps(jsonable(self.to_dict()), indent=1, allow_nan=False)

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
        lines += [f"not judged: {kind}: {why}" for kind, why in self.unjudged.items()]
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


def _tensor_table(records: Sequence[FlowRecord]) -> list[dict]:
    rows: dict[str, dict] = {}
    for rec in records:
        if rec.tensor_stats is None:
            continue
        for name, layer, stats in zip(rec.tensor_names, rec.tensor_layers, rec.tensor_stats, strict=True):
            row = rows.setdefault(name, {"tensor": name, "layer": layer, **{c: [] for c in TENSOR_STATS}})
            for c, v in zip(TENSOR_STATS, stats.tolist(), strict=True):
                row[c].append(v)
    return [{k: (_median(v) if isinstance(v, list) else v) for k, v in row.items()} for row in rows.values()]


def diagnose(
    records: Sequence[FlowRecord],
    thresholds: health.Thresholds | None = None,
    context: health.Context | None = None,
) -> Diagnosis:
    """The health model's verdict over a few monitored steps (records with per-tensor / depth statistics);
    `thresholds`: the run's guard section (defaults otherwise), `context`: the run's config, for suggestions."""
    records = [r for r in records if r is not None]
    steps = [r.step for r in records]
    layers, tensors = _layer_table(records), _tensor_table(records)
    if not records:
        return Diagnosis("inconclusive", "no monitored steps were given", "run a few steps with flow.enabled=true",
                         steps)  # fmt: skip
    summaries = [health.FlowSummary.of(r) for r in records]
    findings = health.judge_flow(summaries, thresholds or health.Thresholds(), context or health.Context())
    top = health.verdict_of(findings)
    every = [{"kind": f.kind, "severity": f.severity, "explanation": f.explanation, "evidence": f.evidence}
             for f in findings]  # fmt: skip
    unavailable = {k: v for r in records for k, v in r.unavailable.items()}
    unjudged = {k: v for k, v in health.unjudged(summaries, unavailable).items() if top is None or k != top.kind}
    if top is None:
        ratio = _median([row["update_ratio"] for row in layers])
        ev = [health.evidence("median_update_ratio", ratio)]
        blind = [k for k in health.DEPTH_JUDGMENTS if k in unjudged]
        if blind:  # no evidence about the flow along depth is no evidence of health
            return Diagnosis(
                "inconclusive",
                f"no judgment of the health model fired, but {' and '.join(blind)} gradients could not be judged: "
                f"{unjudged[blind[0]]}",
                "give the monitor the model's blocks (FlowMonitor(model, optimizer, blocks=...), docs/flow.md) so "
                "the residual stream is measured",
                steps, layers, tensors, ev, every, unjudged,
            )  # fmt: skip
        return Diagnosis(
            "healthy",
            f"no judgment of the health model fired; the median ||dW||/||W|| is {ratio:.3g}",
            "nothing to fix; watch these numbers as training goes on",
            steps, layers, tensors, ev, every, unjudged,
        )  # fmt: skip
    return Diagnosis(top.kind, top.explanation, top.suggestion, steps, layers, tensors, top.evidence, every, unjudged)
