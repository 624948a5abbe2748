"""diagnose() verdicts on crafted records, plus JSON and the rendered table."""

import json

import numpy as np

from flowtrain.flow import DEPTH_STATS, TENSOR_STATS, FlowRecord, diagnose

LAYERS = ["embedding", "block.0", "block.1", "block.2", "head"]


def record(step, resid, grad_norm=1.0, update_ratio=1e-3, nonfinite=0.0, preclip=1.0):
    stats = np.full((len(LAYERS), len(TENSOR_STATS)), 1.0, dtype=np.float32)
    stats[:, TENSOR_STATS.index("grad_norm")] = grad_norm
    stats[:, TENSOR_STATS.index("update_ratio")] = update_ratio
    stats[:, TENSOR_STATS.index("grad_nonfinite")] = 0
    stats[2, TENSOR_STATS.index("grad_nonfinite")] = nonfinite
    depth = np.ones((4, len(DEPTH_STATS)), dtype=np.float32)
    depth[:, DEPTH_STATS.index("resid_grad_norm")] = resid
    names = [f"{n}.weight" for n in LAYERS]
    return FlowRecord(
        step, {"grad_norm_preclip": preclip}, names, LAYERS, stats, LAYERS, stats,
        ["h0", "h1", "h2", "h3"], LAYERS[:4], depth,
    )  # fmt: skip


def test_verdicts():
    healthy = [record(s, [1.0, 0.9, 0.8, 0.8]) for s in range(3)]
    assert diagnose(healthy).verdict == "healthy"
    assert diagnose([record(s, [1e-6, 1e-3, 0.1, 1.0]) for s in range(3)]).verdict == "vanishing"
    assert diagnose([record(s, [1e5, 10.0, 3.0, 1.0]) for s in range(3)]).verdict == "exploding"
    assert diagnose([record(s, [30.0, 10.0, 3.0, 1.0]) for s in range(3)]).verdict == "healthy"  # pre-norm rises
    growing = [record(s, [1.0, 1, 1, 1], preclip=10.0**s * 4) for s in range(3)]
    assert diagnose(growing).verdict == "healthy"  # early training grows the norm 10-40x in a few steps
    assert diagnose([record(s, [1.0, 1, 1, 1], update_ratio=1e-8) for s in range(3)]).verdict == "lr_too_low"
    high = diagnose([record(s, [1.0, 1, 1, 1], update_ratio=0.3) for s in range(3)])
    assert high.verdict == "lr_too_high" and high.evidence[0]["threshold"] == 2e-2
    bad = diagnose([record(0, [1.0, 1, 1, 1]), record(1, [1.0, 1, 1, 1], nonfinite=3)])
    assert bad.verdict == "nonfinite" and "block.1.weight" in bad.cause and "step 1" in bad.cause


def test_json_and_render():
    d = diagnose([record(s, [1e-6, 1e-3, 0.1, 1.0]) for s in range(2)])
    data = json.loads(d.to_json())
    assert data["verdict"] == "vanishing" and [row["layer"] for row in data["layers"]] == LAYERS
    assert data["layers"][-1]["resid_grad_norm"] is None  # head has no depth row: NaN -> null
    assert [row["tensor"] for row in data["tensors"]] == [f"{n}.weight" for n in LAYERS]
    (ev,) = data["evidence"]
    assert ev["metric"] == "resid_grad_ratio_h0_hL" and ev["op"] == "<" and ev["value"] < ev["threshold"]
    text = d.render()
    assert "VANISHING" in text and "block.2" in text and "try:" in text
