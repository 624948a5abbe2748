"""The monitoring interval: fixed, or auto (chosen from measured times to stay within the budget)."""

import math

import pytest
import torch

from flowtrain.config import load_config
from flowtrain.flow import budget
from flowtrain.flow.budget import Interval, Stopwatch
from flowtrain.flow.config import FlowConfig
from flowtrain.flow.records import read_flow
from flowtrain.sinks.jsonl import read_jsonl
from flowtrain.train.trainer import Trainer
from tests.conftest import tiny_overrides, write_corpus


class FakeTime:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def run(interval: Interval, clock: Stopwatch, fake: FakeTime, steps: int, step_s: float, cost_s: float) -> list[bool]:
    """Steps 0..steps-1 of `step_s` seconds of training plus `cost_s` of microscope time when monitored."""
    return run_from(interval, clock, fake, 0, steps, step_s, cost_s)


def run_from(interval, clock, fake, start, stop, step_s, cost_s) -> list[bool]:
    seen = []
    for step in range(start, stop):
        on = interval.monitored(step)
        seen.append(on)
        fake.now += step_s + (cost_s if on else 0.0)
        clock.spent += cost_s if on else 0.0
        interval.step_done(step, on)
    return seen


def test_auto_monitors_every_step_first_then_the_smallest_interval_within_budget(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(budget.time, "perf_counter", fake.perf_counter)
    clock = Stopwatch()
    interval = Interval(FlowConfig(full_steps=10, reprobe_steps=20, budget=0.03), 0, clock)
    seen = run(interval, clock, fake, 10, step_s=0.010, cost_s=0.002)
    # no unmonitored step seen yet: one is assumed to cost 5% of a monitored one; then the smallest N with
    # (2 ms + (N - 1) * 0.1 ms) / N <= 3% of 10 ms is 10
    off = budget.UNMONITORED_SHARE * 0.002
    assert all(seen) and interval.every == math.ceil((0.002 - off) / (0.03 * 0.010 - off)) == 10
    seen = run_from(interval, clock, fake, 10, 30, step_s=0.010, cost_s=0.002)
    assert [s for s, on in zip(range(10, 30), seen, strict=True) if on] == [10, 20]
    # re-chosen at step 29 (reprobe_steps after the first choice), now from measured unmonitored steps (free)
    assert interval.every == math.ceil(0.002 / (0.03 * 0.010)) == 7


def test_auto_stays_at_every_step_when_monitoring_is_cheap_and_caps_when_it_is_not(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(budget.time, "perf_counter", fake.perf_counter)
    clock = Stopwatch()
    cheap = Interval(FlowConfig(full_steps=5, budget=0.03), 0, clock)
    run(cheap, clock, fake, 8, step_s=0.100, cost_s=0.001)
    assert cheap.every == 2  # every step fits by the stopwatch: every other step until the check can compare
    run_from(cheap, clock, fake, 8, 5 + budget.WINDOW, step_s=0.100, cost_s=0.001)
    assert cheap.every == 1  # the step times show nothing beyond the stopwatch
    dear = Interval(FlowConfig(full_steps=5, budget=0.001), 0, clock)
    run(dear, clock, fake, 8, step_s=0.001, cost_s=1.0)
    assert dear.every == budget.MAX_INTERVAL


def test_fixed_interval_never_changes(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(budget.time, "perf_counter", fake.perf_counter)
    clock = Stopwatch()
    fixed = Interval(FlowConfig(interval=3, full_steps=2), 0, clock)
    seen = run(fixed, clock, fake, 9, step_s=0.01, cost_s=1.0)
    assert seen == [s % 3 == 0 for s in range(9)] and fixed.every == 3


def test_interval_config_accepts_auto_or_a_positive_integer():
    assert FlowConfig().interval == "auto"
    assert FlowConfig(interval=5).interval == 5
    for bad in (0, -1, "sometimes"):
        with pytest.raises(ValueError):
            FlowConfig(interval=bad)


def test_trainer_reports_the_interval_and_records_only_monitored_steps(tmp_path):
    text = write_corpus(tmp_path / "small.txt", 20_000)
    extra = {"train.max_steps": 30, "flow.full_steps": 6, "flow.reprobe_steps": 8, "flow.budget": 0.0001}
    torch.set_num_threads(1)
    summary = Trainer(load_config("default", tiny_overrides(text, tmp_path, **extra))).run_loop()
    rows = read_jsonl(summary.run_dir / "metrics.jsonl")
    intervals = [r["flow_interval"] for r in rows]
    assert intervals[:6] == [1.0] * 6 and intervals[-1] > 1  # a budget no step meets: the interval grows
    assert all(r["flow_ms"] > 0 for r in rows[:6])
    flow_steps = sorted(set(read_flow(summary.run_dir / "flow.parquet").column("step").to_pylist()))
    assert flow_steps[:6] == [1, 2, 3, 4, 5, 6] and len(flow_steps) < 30


def test_auto_adds_what_the_stopwatch_cannot_see_once_both_kinds_of_steps_are_timed(monkeypatch):
    """Monitored steps cost 2 ms more than the stopwatch books (hooks' side effects): the first choice (from the
    stopwatch alone) is too small; the check a window later, from measured step times, widens the interval."""
    fake = FakeTime()
    monkeypatch.setattr(budget.time, "perf_counter", fake.perf_counter)
    clock = Stopwatch()
    interval = Interval(FlowConfig(full_steps=10, reprobe_steps=1000, budget=0.03), 0, clock)
    hidden = 0.002

    def steps(start, stop):
        for step in range(start, stop):
            on = interval.monitored(step)
            fake.now += 0.010 + (0.001 + hidden if on else 0.0)
            clock.spent += 0.001 if on else 0.0
            interval.step_done(step, on)

    steps(0, 10)
    off = budget.UNMONITORED_SHARE * 0.001
    first = math.ceil((0.001 - off) / (0.03 * 0.010 - off))
    assert interval.every == first == 4
    steps(10, 10 + budget.WINDOW)
    assert interval.every == 10  # (1 ms booked + 2 ms unseen) / N <= 3% of 10 ms


def test_auto_tries_every_other_step_before_settling_on_every_step(monkeypatch):
    """The stopwatch books 0.2 ms of a 10 ms step (within 3%), but monitored steps take 1 ms more than that:
    the choice of every step is tried as every other step for one window, whose step times show the cost."""
    fake = FakeTime()
    monkeypatch.setattr(budget.time, "perf_counter", fake.perf_counter)
    clock = Stopwatch()
    interval = Interval(FlowConfig(full_steps=10, reprobe_steps=1000, budget=0.03), 0, clock)
    booked, hidden = 0.0002, 0.001

    def steps(start, stop):
        for step in range(start, stop):
            on = interval.monitored(step)
            fake.now += 0.010 + (booked + hidden if on else 0.0)
            clock.spent += booked if on else 0.0
            interval.step_done(step, on)

    steps(0, 10)
    assert interval.every == 2
    steps(10, 10 + budget.WINDOW)
    # (0.2 ms booked + 1 ms unseen) / N within 3% of the step time without the stopwatch's share: the window's
    # median of 10 ms (unmonitored) and 11 ms (monitored) steps, half of each
    assert interval.every == math.ceil((booked + hidden) / (0.03 * 0.0105)) == 4


@pytest.mark.parametrize("excluded", [True, False])
def test_auto_leaves_the_loops_grouped_work_out_of_the_step_times(monkeypatch, excluded):
    """The loop writes its logged rows every other step (1 ms), which under every-other-step monitoring always
    falls in a monitored step. Left out of the step times (Interval.exclude, as the trainer does), the check
    sees what monitoring costs (0.2 ms booked, nothing hidden) and settles on every step; counted, it would
    take the loop's own work for the microscope's and back off."""
    fake = FakeTime()
    monkeypatch.setattr(budget.time, "perf_counter", fake.perf_counter)
    clock = Stopwatch()
    interval = Interval(FlowConfig(full_steps=10, reprobe_steps=1000, budget=0.03), 0, clock)
    booked = 0.0002
    for step in range(10 + budget.WINDOW):
        on = interval.monitored(step)
        if step % 2 == 0:  # the rows written after the last step fall in this one
            fake.now += 0.001
            if excluded:
                interval.exclude(0.001)
        fake.now += 0.010 + (booked if on else 0.0)
        clock.spent += booked if on else 0.0
        interval.step_done(step, on)
    # counted: 1 ms unseen in every monitored step, (0.2 + 1 ms) / N within 3% of the window's median step
    assert interval.every == (1 if excluded else math.ceil((booked + 0.001) / (0.03 * 0.0105)))
