"""The guard's windows on crafted streams: they score what they should, stay quiet otherwise, and are NaN-safe."""

import math
import random
from collections import deque

import numpy as np
from pytest import approx

from flowtrain.flow import windows as det
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


def _spike(tracker, value):
    z = tracker.observe(value)
    return z is not None and z > tracker.threshold


def test_spikes_fire_only_above_the_threshold_and_do_not_poison_the_window():
    tracker = _window(_noisy(100))
    assert not _spike(tracker, 2.05)
    assert tracker.score(4.0) > 6 and _spike(tracker, 4.0)
    before = list(tracker.values)
    assert _spike(tracker, 4.0)  # the spike did not enter the window
    for bad in (math.nan, math.inf, -1.0, 0.0):
        assert not _spike(tracker, bad)
    assert list(tracker.values) == before  # nor did non-finite or non-positive values


def test_spike_level_follows_a_falling_loss():
    """Early training: the loss falls fast; a plain median of the window would hide a spike to the old level."""
    falling = _noisy(100, level=5.0, noise=0.01, trend=-0.01)  # 5.0 -> ~1.9
    assert _spike(_window(falling), 3.0)  # 3.0 is far above the recent ~1.9, below the old 5.0
    assert not _spike(_window(falling), falling[-1] * 0.98)


def test_nothing_is_judged_before_min_count():
    tracker = _window(_noisy(20))
    assert not _spike(tracker, 100.0) and tracker.limit() == math.inf


def test_divergence_needs_a_rising_window():
    trend = det.TrendDetector(window=100, min_rise=0.15)
    assert all(trend.observe(v) is None for v in _noisy(300, noise=0.02, trend=-0.001))
    trend = det.TrendDetector(window=100, min_rise=0.15)
    found = [trend.observe(v) for v in _noisy(100, noise=0.02, trend=0.003)]
    assert found[-1] is not None and found[-1] > 0.15
    assert all(f is None for f in found[:-1])


def test_stall_needs_two_flat_blocks_in_a_row():
    stall = det.StallWindow(window=100)
    assert all(stall.observe(v) is None for v in _noisy(1000, noise=0.03, trend=-0.0005))  # slow but falling
    stall = det.StallWindow(window=100)
    found = [stall.observe(v) for v in _noisy(200, noise=0.01, trend=0.0003)]  # flat, drifting up
    assert found[-1] is not None and all(f is None for f in found[:-1])
    assert det.fitted_change(deque(math.log(v) for v in _noisy(100, noise=0.0, trend=0.01))) == approx(0.99)


def test_clip_window_fraction_per_block():
    clip = det.ClipWindow(window=10)
    assert [clip.observe(i % 2 == 0) for i in range(10)][-1] == 0.5
    assert clip.observe(True) is None  # a new block starts


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
