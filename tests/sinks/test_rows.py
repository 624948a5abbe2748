"""RowBuffer's grouping (full groups, late rows, urgent flushes, each row once) and StepTimer's pauses."""

import pytest

from flowtrain.sinks.rows import RowBuffer, StepTimer


def test_rows_are_written_in_full_groups_and_at_flush():
    groups = []
    rows = RowBuffer(groups.append, flush_rows=3, flush_seconds=3600)
    for step in range(1, 8):
        rows.add(step, now=float(step), step_time=0.01)
    assert groups == [[1, 2, 3], [4, 5, 6]] and len(rows) == 1
    rows.flush()
    rows.flush()  # nothing waits: nothing written
    assert groups == [[1, 2, 3], [4, 5, 6], [7]]


def test_a_row_that_would_wait_too_long_or_an_urgent_one_goes_at_once():
    groups = []
    rows = RowBuffer(groups.append, flush_rows=10, flush_seconds=1.0, interval=2)
    rows.add(1, now=0.0, step_time=0.1)  # the next logged step comes 0.2 s later: it may wait
    rows.add(2, now=0.2, step_time=0.45)  # 0.2 + 2 * 0.45 >= 1.0: the oldest would wait too long
    rows.add(3, now=0.3, step_time=0.01, urgent=True)  # e.g. a guard action
    assert groups == [[1, 2], [3]]


def test_a_group_cut_short_by_an_error_is_not_written_again():
    calls = []

    def failing(group):
        calls.append(group)
        raise OSError("disk full")

    rows = RowBuffer(failing, flush_rows=2, flush_seconds=3600)
    rows.add(1, now=0.0, step_time=0.0)
    with pytest.raises(OSError):
        rows.add(2, now=0.0, step_time=0.0)
    rows.flush()  # the loop's `finally`
    assert calls == [[1, 2]]


def test_step_timer_leaves_paused_work_out():
    clock = iter([0.0, 1.0, 1.5, 3.0, 3.0, 3.0]).__next__
    timer = StepTimer(clock)  # starts at 0
    with timer.paused():  # 1.0 .. 1.5: side work
        pass
    now, per_step = timer.lap(steps=2)  # at 3.0: 2.5 s of steps over 2 steps
    assert (now, per_step) == (3.0, 1.25)
    timer.restart()
    assert timer.lap(steps=1) == (3.0, 0.0)
