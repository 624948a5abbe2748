"""alerts.jsonl folding: repeats of one finding become one row with a count and a span; actions stay one row each;
rows come out in step order; the console shows each kind once per window."""

from flowtrain.sinks.alerts import AlertFolder


def row(step, detector="lr_too_high", action="warn"):
    return {"step": step, "detector": detector, "action": action, "severity": "warning", "values": {},
            "explanation": "x", "suggestion": "lower optim.lr"}  # fmt: skip


def run(folder, rows):
    written, lines = [], []
    for r in rows:
        w, c = folder.add(r)
        written += w
        lines += c
    w, c = folder.close()
    return written + w, lines + c


def test_repeats_fold_into_one_row_with_count_and_span():
    written, lines = run(AlertFolder(window=100), [row(s) for s in range(10, 60)] + [row(150)])
    assert [(r["step"], r.get("repeated")) for r in written] == [(10, None), (59, 49), (150, None)]
    assert written[1]["first_step"] == 10 and written[1]["last_step"] == 59
    assert len(lines) == 3 and "49 more time(s), steps 10-59" in lines[1]
    steps = [r["step"] for r in written]
    assert steps == sorted(steps)


def test_actions_are_always_rows_but_the_console_folds_them():
    rows = [row(s, "nonfinite", "skip") for s in (5, 6, 7)] + [row(8, "grad_spike", "info")]
    written, lines = run(AlertFolder(window=100), rows)
    assert [(r["step"], r["action"]) for r in written] == [(5, "skip"), (6, "skip"), (7, "skip"), (8, "info")]
    assert len(lines) == 2  # one skip line, one info line


def test_a_fold_closes_when_its_window_passes_and_the_order_holds():
    folder = AlertFolder(window=10)
    written, _ = run(folder, [row(1), row(2), row(5, "grad_spike"), row(12, "grad_spike"), row(13)])
    assert [(r["step"], r["detector"], r.get("repeated")) for r in written] == [
        (1, "lr_too_high", None), (5, "grad_spike", None), (5, "lr_too_high", 1),  # step 12 closed it
        (13, "lr_too_high", None), (13, "grad_spike", 1),  # 12 was within grad_spike's window: folded
    ]  # fmt: skip
