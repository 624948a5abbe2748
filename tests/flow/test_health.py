"""The health model: each judgment on crafted numbers, the guard's severities, and real runs whose pathology we
induced (`flowtrain diagnose` names it)."""

import json
import math
import random

import numpy as np
import pytest
import torch

from flowtrain.flow import health
from flowtrain.flow.guard import Guard, GuardConfig
from flowtrain.flow.health import Context, FlowSummary, Thresholds, judge_flow, verdict_of
from tests.conftest import tiny_overrides
from tests.test_cli import run_cli

LAYERS = ["embedding", "block.0", "block.1", "head"]


def summary(step=1, ratio=1e-3, grad=1.0, resid=20.0, signal=10.0, entropy=2.0, logit=5.0, lse=4.0, bad=None):
    grads = np.asarray(grad if isinstance(grad, list) else [grad] * len(LAYERS), dtype=np.float64)
    return FlowSummary(step, LAYERS, np.full(len(LAYERS), ratio), grads, bad, resid, signal, (entropy, "block.1"),
                       (logit, "block.0"), lse, 1.0, "block.0")  # fmt: skip


def kinds(window, ctx=None):
    return [f.kind for f in judge_flow(window, Thresholds(), ctx or Context())]


def test_each_flow_judgment_fires_on_its_numbers_only():
    assert kinds([summary(s) for s in range(5)]) == []  # a healthy pre-norm profile (rises ~20x toward h_0)
    cases = {
        "lr_too_high": {"ratio": 0.2},
        "lr_too_low": {"ratio": 1e-9},
        "exploding": {"resid": 1e6},
        "attention_logit_growth": {"logit": 500.0},
        "attention_collapse": {"entropy": 0.01},
        "logit_divergence": {"lse": -45.0},
    }
    for kind, numbers in cases.items():
        assert kinds([summary(s, **numbers) for s in range(5)]) == [kind], kind
    assert kinds([summary(s, resid=1e-8) for s in range(5)]) == ["vanishing"]
    assert kinds([summary(s, signal=1e-20) for s in range(5)]) == ["vanishing"]  # the forward signal dies
    # the input side gets no gradient at all (deep stack without norm or residual): vanishing, not "stalled"
    (starved,) = judge_flow([summary(s, grad=[1.0, 0.0, 0.0, 1.0]) for s in range(5)], Thresholds(), Context())
    assert starved.kind == "vanishing" and starved.evidence[-1]["metric"] == "layers_without_gradient"
    # one layer further up loses its gradient: that layer has stalled
    (stalled,) = judge_flow([summary(s, grad=[1.0, 1.0, 0.0, 1.0]) for s in range(5)], Thresholds(), Context())
    assert stalled.kind == "stalled" and stalled.where == "block.1"
    # the median over the window: one odd step is not a verdict
    assert kinds([summary(s, ratio=0.5 if s == 2 else 1e-3) for s in range(5)]) == []


def test_the_verdict_is_the_cause_not_the_symptom():
    findings = judge_flow([summary(s, ratio=0.3, resid=1e7, entropy=0.0) for s in range(5)], Thresholds(), Context())
    assert {f.kind for f in findings} == {"lr_too_high", "exploding", "attention_collapse"}
    assert verdict_of(findings).kind == "lr_too_high"
    info = health.clip_saturation(1.0, 128, 0.95)
    assert verdict_of([info]) is None  # information is never a verdict


def test_evidence_names_the_threshold_crossed():
    (f,) = judge_flow([summary(s, ratio=0.2) for s in range(5)], Thresholds(update_ratio_high=0.1), Context())
    assert f.evidence == [{"metric": "median_update_ratio", "value": 0.2, "op": ">", "threshold": 0.1}]
    assert f.values() == {"median_update_ratio": 0.2, "median_update_ratio_threshold": 0.1}


def test_suggestions_never_propose_what_is_set():
    vanishing = [summary(s, resid=1e-8) for s in range(5)]
    (f,) = judge_flow(vanishing, Thresholds(), Context(norm_placement="pre", residual=True, warmup_steps=100))
    assert "pre-norm" not in f.suggestion and "residual" not in f.suggestion and f.suggestion
    (f,) = judge_flow(vanishing, Thresholds(), Context(norm_placement="post", residual=False, warmup_steps=0))
    assert "model.norm_placement=pre" in f.suggestion and "model.residual=true" in f.suggestion
    (f,) = judge_flow([summary(s, logit=500.0) for s in range(5)], Thresholds(), Context(qk_norm=True))
    assert "qk_norm" not in f.suggestion


def test_nonfinite_says_where_it_happened():
    f = health.nonfinite(1483.9, math.inf, "blocks.3.mlp.proj.weight", Context())
    assert "loss was finite (1483.9)" in f.explanation and "blocks.3.mlp.proj.weight" in f.explanation
    assert f.severity == "critical" and f.where == "blocks.3.mlp.proj.weight"
    assert "the loss is nan" in health.nonfinite(math.nan, math.nan, None, Context()).explanation
    assert health.nonfinite(2.0, 1.0, None, Context()) is None


def _guard(**cfg):
    return Guard(GuardConfig(**cfg), list(torch.nn.Linear(2, 2).named_parameters()), host_every_step=True)


def _feed(guard, norms, start=1, clipped=True):
    out = []
    for i, norm in enumerate(norms):
        v = guard.check(start + i, torch.tensor(2.0), torch.tensor(norm), True, torch.tensor(clipped))
        out += [a for a in v.alerts if a.detector == "grad_spike"]
    return out


def test_a_clipped_gradient_spike_is_information_until_it_recurs():
    rng = random.Random(0)
    guard = _guard()
    assert _feed(guard, [math.exp(rng.gauss(0, 0.05)) for _ in range(100)]) == []
    (first,) = _feed(guard, [8.0], start=101)
    assert first.severity == "info" and first.action == "info"
    spikes = _feed(guard, [1.0, 8.0, 1.0, 8.0], start=102)
    assert [a.severity for a in spikes] == ["info", "warning"] and spikes[-1].action == "warn"
    unclipped = _guard()
    _feed(unclipped, [math.exp(rng.gauss(0, 0.05)) for _ in range(100)], clipped=False)
    assert _feed(unclipped, [2.1], start=101, clipped=False)[0].severity == "info"  # the heavy tail of healthy norms
    assert _feed(unclipped, [8.0], start=102, clipped=False)[0].severity == "warning"


def test_guard_state_roundtrip_keeps_new_windows():
    a = _guard(stall_window=20)
    for i in range(30):
        a.check(i + 1, torch.tensor(2.0), torch.tensor(1.0), True, torch.tensor(True))
    b = _guard(stall_window=20)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    seen = []
    for i in range(30, 60):
        va = a.check(i + 1, torch.tensor(2.0), torch.tensor(1.0), True, torch.tensor(True))
        vb = b.check(i + 1, torch.tensor(2.0), torch.tensor(1.0), True, torch.tensor(True))
        assert [x.to_json() for x in va.alerts] == [x.to_json() for x in vb.alerts]
        seen += [(x.step, x.detector) for x in va.alerts]
    assert (40, "stalled") in seen  # a loss that does not move for two blocks of 20 steps


# ---- real runs with an induced pathology ----------------------------------------------------------------------
def _diagnose(text, tmp_path, *extra, steps=5, **model):
    overrides = tiny_overrides(text, tmp_path, **{"model.n_embd": 64, **model})
    proc = run_cli("diagnose", *overrides, *extra, "--steps", steps, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.lr=10"], "lr_too_high"),  # the case: HEALTHY before, loss 794 by step 39 in training
        (["optim.lr=1e-9", "schedule.min_lr=0"], "lr_too_low"),
        (["model.norm_placement=none", "model.residual=false", "model.n_layer=16"], "vanishing"),
        ([], "healthy"),
    ],
)
def test_diagnose_names_the_induced_pathology(small_text, tmp_path, overrides, expected):
    result = _diagnose(small_text, tmp_path, *overrides)
    assert result["verdict"] == expected, (result["cause"], result["findings"])
    if expected != "healthy":
        assert result["evidence"] and all(e["threshold"] is not None for e in result["evidence"])


def test_the_flow_window_survives_a_checkpoint_as_json():
    a = summary(3, resid=math.nan, entropy=math.nan)
    b = FlowSummary.from_json(json.loads(json.dumps(a.to_json(), allow_nan=False)))
    assert b.layers == a.layers and b.step == 3 and math.isnan(b.resid_ratio) and math.isnan(b.min_entropy[0])
    assert np.array_equal(b.update_ratio, a.update_ratio) and b.max_attn_logit == a.max_attn_logit
