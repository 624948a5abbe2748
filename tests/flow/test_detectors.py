"""Each detector on crafted streams: it fires on what it should, stays quiet otherwise, and is NaN-safe."""

import math
import random

import numpy as np

from flowtrain.flow import detectors as det
from flowtrain.flow.guard import Guard, GuardConfig


def _window(values, threshold=6.0):
    tracker = det.RobustSpike(window=128, threshold=threshold, min_count=32, min_scale=0.02)
    for v in values:
        tracker.observe(v)
    return tracker


def _noisy(n, level=2.0, noise=0.03, seed=0, trend=0.0):
    rng = random.Random(seed)
    return [level * math.exp(rng.gauss(0, noise) + trend * i) for i in range(n)]


def test_robust_z_matches_its_definition():
    values = _noisy(100, seed=1)
    tracker = _window(values)
    logs = np.log(values)
    level = np.median(logs[-16:])
    diffs = np.diff(logs)
    noise = max(1.4826 * np.median(np.abs(diffs - np.median(diffs))) / math.sqrt(2), 0.02)
    # the noise estimate is refreshed every 8 values: compare against the window it was taken from
    refreshed = logs[: (len(values) // 8) * 8]
    d = np.diff(refreshed)
    noise_then = max(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2), 0.02)
    assert tracker.score(3.0) == (math.log(3.0) - level) / noise_then
    assert abs(noise_then - noise) / noise < 0.2


def test_spikes_fire_only_above_the_threshold_and_do_not_poison_the_window():
    tracker = _window(_noisy(100))
    assert det.loss_spike(tracker, 2.05) is None
    finding = det.loss_spike(tracker, 4.0)
    assert finding.detector == "loss_spike" and finding.values["z"] > 6 and "4" in finding.explanation
    before = list(tracker.values)
    assert det.loss_spike(tracker, 4.0) is not None  # the spike did not enter the window
    for bad in (math.nan, math.inf, -1.0, 0.0):
        assert det.loss_spike(tracker, bad) is None
    assert list(tracker.values) == before  # nor did non-finite or non-positive values
    grad = det.grad_spike(_window(_noisy(100, level=0.5)), 5.0)
    assert grad.detector == "grad_spike" and grad.values["grad_norm_preclip"] == 5.0


def test_spike_level_follows_a_falling_loss():
    """Early training: the loss falls fast; a plain median of the window would hide a spike to the old level."""
    falling = _noisy(100, level=5.0, noise=0.01, trend=-0.01)  # 5.0 -> ~1.9
    tracker = _window(falling)
    assert det.loss_spike(tracker, 3.0) is not None  # 3.0 is far above the recent ~1.9, below the old 5.0
    assert det.loss_spike(_window(falling), falling[-1] * 0.98) is None


def test_nothing_is_judged_before_min_count():
    tracker = _window(_noisy(20))
    assert det.loss_spike(tracker, 100.0) is None and tracker.limit() == math.inf


def test_nonfinite_names_the_tensor():
    assert det.nonfinite(2.0, 1.0, None) is None
    finding = det.nonfinite(2.0, math.nan, "blocks.1.mlp.fc.weight")
    assert "blocks.1.mlp.fc.weight" in finding.explanation and finding.severity == "critical"
    assert "loss" in det.nonfinite(math.inf, 1.0, None).explanation


def test_divergence_needs_a_rising_window():
    trend = det.TrendDetector(window=100, min_rise=0.15)
    assert all(trend.observe(v) is None for v in _noisy(300, noise=0.02, trend=-0.001))
    trend = det.TrendDetector(window=100, min_rise=0.15)
    found = [trend.observe(v) for v in _noisy(100, noise=0.02, trend=0.003)]
    assert found[-1] is not None and found[-1].values["log_loss_rise"] > 0.15
    assert all(f is None for f in found[:-1])


def test_depth_profile():
    assert det.depth_profile([1.0, 0.9, 1.1], 1e-3, 1e3) is None
    assert det.depth_profile([1e-5, 1e-2, 1.0], 1e-3, 1e3).detector == "vanishing"
    assert det.depth_profile([1e4, 10.0, 1.0], 1e-3, 1e3).detector == "exploding"
    assert det.depth_profile([math.nan, 1.0], 1e-3, 1e3) is None


def test_attention_and_logits():
    assert det.attention_health([1.5, 1.2], [5.0, 6.0], 0.05, 100.0) is None
    collapse = det.attention_health([1.5, 0.01], [5.0, 6.0], 0.05, 100.0)
    assert collapse.detector == "attention_collapse" and collapse.values["layer"] == 1
    growth = det.attention_health([1.5, 1.2], [5.0, 250.0], 0.05, 100.0)
    assert growth.detector == "attention_logit_growth" and "qk_norm" in growth.suggestion
    assert det.output_logits(4.0, 10.0, 30.0) is None
    assert det.output_logits(-45.0, 60.0, 30.0).detector == "logit_divergence"


def test_guard_state_roundtrip_keeps_decisions_identical():
    import torch

    params = list(torch.nn.Linear(2, 2).named_parameters())
    a = Guard(GuardConfig(), params, host_every_step=True)
    for i, v in enumerate(_noisy(90, seed=3)):
        a.check(i + 1, torch.tensor(v), torch.tensor(1.0), True)
    b = Guard(GuardConfig(), params, host_every_step=True)
    b.load_state_dict(a.state_dict())
    for i, v in enumerate([*_noisy(20, seed=4), 9.0]):
        va = a.check(91 + i, torch.tensor(v), torch.tensor(1.0), True)
        vb = b.check(91 + i, torch.tensor(v), torch.tensor(1.0), True)
        assert va.action == vb.action and [x.to_json() for x in va.alerts] == [x.to_json() for x in vb.alerts]
    assert va.action == "rollback"
