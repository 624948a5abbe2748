"""FlowSummary: the numbers of one microscope record that the health model (flow/health.py) judges."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flowtrain.flow.records import DEPTH_STATS, TENSOR_STATS, FlowRecord


@dataclass
class FlowSummary:
    """The numbers of one FlowRecord the health model judges (NaN where the record lacks them)."""

    step: int
    layers: list[str]
    update_ratio: np.ndarray  # per layer ||dW||/||W||
    grad_norm: np.ndarray  # per layer
    first_nonfinite: str | None  # first tensor with a non-finite gradient, in backward order
    resid_ratio: float  # ||dL/dh_0|| / ||dL/dh_L||
    signal_ratio: float  # rms(h_L) / rms(h_0)
    min_entropy: tuple[float, str | None]
    max_attn_logit: tuple[float, str | None]
    logsumexp: float
    grad_norm_preclip: float
    first_block: str | None = None  # the layer of the first block along depth (h_1)

    @classmethod
    def of(cls, rec: FlowRecord) -> FlowSummary:
        nan = float("nan")
        col = TENSOR_STATS.index
        layers = list(rec.layer_names)
        ratio = grad = np.full(len(layers), np.nan)
        if rec.layer_stats is not None:
            ratio = rec.layer_stats[:, col("update_ratio")].astype(np.float64)
            grad = rec.layer_stats[:, col("grad_norm")].astype(np.float64)
        first_bad = None
        if rec.tensor_stats is not None:  # the backward pass reaches the output's tensors first
            bad = rec.tensor_stats[:, col("grad_nonfinite")]
            first_bad = next((n for n, c in zip(reversed(rec.tensor_names), bad[::-1], strict=True) if c > 0), None)
        resid = signal = nan
        entropy: tuple[float, str | None] = (nan, None)
        logit: tuple[float, str | None] = (nan, None)
        if rec.depth_stats is not None and len(rec.depth_stats) >= 2:
            d = rec.depth_stats.astype(np.float64)
            g, a = d[:, DEPTH_STATS.index("resid_grad_norm")], d[:, DEPTH_STATS.index("act_rms")]
            with np.errstate(divide="ignore", invalid="ignore"):
                resid = float(g[0] / g[-1]) if g[-1] > 0 else nan
                signal = float(a[-1] / a[0]) if a[0] > 0 else nan
            names = list(rec.depth_layers)
            entropy = _extreme(d[:, DEPTH_STATS.index("attn_entropy")], names, np.argmin)
            logit = _extreme(d[:, DEPTH_STATS.index("attn_max_logit")], names, np.argmax)
        first_block = rec.depth_layers[1] if len(rec.depth_layers) > 1 else None
        return cls(rec.step, layers, ratio, grad, first_bad, resid, signal, entropy, logit,
                   rec.scalars.get("logits_lse_mean", nan), rec.scalars.get("grad_norm_preclip", nan),
                   first_block)  # fmt: skip

    def to_json(self) -> dict:
        """Plain JSON (NaN as null), saved with the guard's state so a resumed run judges the same window."""
        return jsonable(self.__dict__)

    @classmethod
    def from_json(cls, data: dict) -> FlowSummary:
        num = lambda v: float("nan") if v is None else float(v)  # noqa: E731
        pair = lambda p: (num(p[0]), p[1])  # noqa: E731
        return cls(data["step"], data["layers"], np.array([num(v) for v in data["update_ratio"]]),
                   np.array([num(v) for v in data["grad_norm"]]), data["first_nonfinite"], num(data["resid_ratio"]),
                   num(data["signal_ratio"]), pair(data["min_entropy"]), pair(data["max_attn_logit"]),
                   num(data["logsumexp"]), num(data["grad_norm_preclip"]), data["first_block"])  # fmt: skip


def jsonable(value):
    """`value` with every non-finite float as null (strict JSON), arrays and tuples as lists, dicts recursed."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [jsonable(float(v)) for v in value]
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def _extreme(values: np.ndarray, names: list[str], pick) -> tuple[float, str | None]:
    finite = np.isfinite(values)
    if not finite.any():
        return float("nan"), None
    i = int(np.flatnonzero(finite)[pick(values[finite])])
    return float(values[i]), names[i]
