"""LR schedules: the closed forms, and the torch scheduler's actual LR over whole runs."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowtrain.errors import ConfigError
from flowtrain.optim.config import ScheduleConfig
from flowtrain.optim.schedules import build_scheduler, lr_at

PEAK, MIN = 1e-3, 1e-4


def reference(kind: str, steps: int, warmup: int, *, decay_fraction=0.2, noam_scale=None, d_model=64):
    """The LR of each step, written out independently of the module (lists, not one formula per step)."""
    warm = [PEAK * (i + 1) / warmup for i in range(warmup)]
    rest = steps - warmup
    if kind == "constant":
        return warm + [PEAK] * rest
    if kind in ("cosine", "linear"):
        span = steps - 1 - warmup
        fracs = [i / span if span > 0 else 1.0 for i in range(rest)]
        if kind == "cosine":
            return warm + [MIN + (PEAK - MIN) * (1 + math.cos(math.pi * f)) / 2 for f in fracs]
        return warm + [PEAK - (PEAK - MIN) * f for f in fracs]
    if kind == "wsd":
        n_decay = min(rest, max(1, round(decay_fraction * steps)))
        stable = rest - n_decay
        return warm + [PEAK] * stable + [PEAK - (PEAK - MIN) * (i + 1) / n_decay for i in range(n_decay)]
    assert kind == "inverse_sqrt"
    out = []
    for step in range(steps):
        s = step + 1
        if noam_scale is not None:
            shape = s**-0.5 if warmup == 0 else min(s**-0.5, s * warmup**-1.5)
            out.append(noam_scale / math.sqrt(d_model) * shape)
        else:
            out.append(PEAK / math.sqrt(s) if warmup == 0 else PEAK * min(math.sqrt(warmup / s), s / warmup))
    return out


def scheduler_lrs(cfg: ScheduleConfig, steps: int, d_model=64) -> list[float]:
    """The LR each optimizer step actually uses: read before step, as the trainer's loop runs."""
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=PEAK)
    sched = build_scheduler(opt, cfg, PEAK, steps, d_model)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        param.grad = torch.zeros_like(param)
        opt.step()
        sched.step()
    return seen


CASES = [
    ("cosine", 50, 10, {}),
    ("cosine", 20, 0, {}),
    ("linear", 30, 5, {}),
    ("constant", 25, 7, {}),
    ("wsd", 40, 6, {"decay_fraction": 0.25}),
    ("wsd", 10, 8, {"decay_fraction": 0.5}),  # decay window would overlap warmup: it starts after it
    ("inverse_sqrt", 60, 16, {}),
    ("inverse_sqrt", 30, 0, {}),
    ("inverse_sqrt", 60, 16, {"noam_scale": 2.0}),
    ("inverse_sqrt", 30, 0, {"noam_scale": 0.5}),
]


@pytest.mark.parametrize(("kind", "steps", "warmup", "extra"), CASES)
def test_closed_form_and_scheduler_match_reference_over_a_whole_run(kind, steps, warmup, extra):
    cfg = ScheduleConfig(kind=kind, warmup_steps=warmup, min_lr=MIN, **extra)
    expect = reference(kind, steps, warmup, **extra)
    closed = [lr_at(i, cfg, PEAK, steps, 64) for i in range(steps)]
    assert closed == pytest.approx(expect, rel=1e-12, abs=0)
    assert scheduler_lrs(cfg, steps) == pytest.approx(expect, rel=1e-12, abs=0)


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd"])
def test_warmup_ends_at_peak_and_decay_ends_at_min(kind):
    cfg = ScheduleConfig(kind=kind, warmup_steps=10, min_lr=MIN)
    assert lr_at(0, cfg, PEAK, 100) == pytest.approx(PEAK / 10)
    assert lr_at(9, cfg, PEAK, 100) == pytest.approx(PEAK)
    assert lr_at(99, cfg, PEAK, 100) == pytest.approx(MIN)
    assert lr_at(500, cfg, PEAK, 100) == pytest.approx(MIN)  # past the end: the final LR


def test_cosine_midpoint_and_wsd_plateau_length():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr=MIN)
    assert lr_at(10 + 45, cfg, PEAK, 101) == pytest.approx((PEAK + MIN) / 2, rel=1e-12)
    wsd = ScheduleConfig(kind="wsd", warmup_steps=10, min_lr=MIN, decay_fraction=0.2)
    lrs = [lr_at(i, wsd, PEAK, 100) for i in range(100)]
    assert sum(lr == PEAK for lr in lrs) == 71  # step 9 (end of warmup) through 79
    assert all(lr < PEAK for lr in lrs[80:]) and lrs[-1] == pytest.approx(MIN)


def test_inverse_sqrt_peaks_at_end_of_warmup_and_noam_constant():
    cfg = ScheduleConfig(kind="inverse_sqrt", warmup_steps=16, min_lr=0.0)
    lrs = [lr_at(i, cfg, PEAK, 100) for i in range(100)]
    assert max(lrs) == pytest.approx(PEAK) and lrs.index(max(lrs)) == 15
    assert lr_at(63, cfg, PEAK, 100) == pytest.approx(PEAK / 2)  # s = 64 = 4 * warmup: half the peak
    noam = ScheduleConfig(kind="inverse_sqrt", warmup_steps=4000, noam_scale=1.0)
    assert lr_at(3999, noam, PEAK, 100_000, 512) == pytest.approx(512**-0.5 * 4000**-0.5)


def test_scheduler_state_survives_json_and_continues_identically():
    """Resume as the trainer does: optimizer state (holds the current LR), then the scheduler's JSON state."""
    cfg = ScheduleConfig(kind="cosine", warmup_steps=5, min_lr=MIN)
    whole = scheduler_lrs(cfg, 30)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=PEAK)
    sched = build_scheduler(opt, cfg, PEAK, 30)
    for _ in range(12):
        opt.step()
        sched.step()
    state = json.loads(json.dumps(sched.state_dict()))
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    sched2 = build_scheduler(opt2, cfg, PEAK, 30)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    sched2.load_state_dict(state)
    resumed = []
    for _ in range(12, 30):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == whole[12:]


def test_bad_schedule_settings_are_config_errors():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    with pytest.raises(ConfigError, match="min_lr"):
        build_scheduler(opt, ScheduleConfig(min_lr=1.0), PEAK, 10)
    with pytest.raises(ConfigError, match="d_model"):
        build_scheduler(opt, ScheduleConfig(kind="inverse_sqrt", noam_scale=1.0), PEAK, 10, None)
    with pytest.raises(ConfigError, match="max_steps"):
        lr_at(0, ScheduleConfig(), PEAK, 0)


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["cosine", "linear", "constant", "wsd"]),
    steps=st.integers(1, 400),
    warmup_share=st.floats(0, 1),
    decay_fraction=st.floats(0.01, 1),
)
def test_lr_stays_in_range_and_never_rises_after_warmup(kind, steps, warmup_share, decay_fraction):
    warmup = int(warmup_share * steps)
    cfg = ScheduleConfig(kind=kind, warmup_steps=warmup, min_lr=MIN, decay_fraction=decay_fraction)
    lrs = [lr_at(i, cfg, PEAK, steps) for i in range(steps)]
    assert all(0 < lr <= PEAK * (1 + 1e-12) for lr in lrs)
    after = lrs[max(warmup - 1, 0) :]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(after, after[1:], strict=False))
    assert all(lr >= MIN * (1 - 1e-12) for lr in after)
