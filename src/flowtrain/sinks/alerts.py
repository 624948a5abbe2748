"""alerts.jsonl and the console's guard lines: in step order, repeats folded.

A finding that repeats (the same kind and action within `window` steps of its first row) is written once; when
its window has passed, one more row says how many times it fired and over which steps (`repeated`,
`first_step`, `last_step`; its `step` is the latest step already written, so the file stays in step order).
Actions (skip, rollback, stop) are always written, one row each: they are what happened to the run; the console
shows each kind of finding and action once per window. A rollback rewinds the steps, so the trainer closes every
fold before it (`close`).
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIONS = ("skip", "rollback", "stop")


@dataclass
class _Fold:
    first: dict  # the row that opened it
    last_step: int
    count: int = 1


class AlertFolder:
    """Turns alerts (rows of alerts.jsonl as dicts, in step order) into the rows to write and console lines."""

    def __init__(self, window: int):
        self.window = window
        self.open: dict[tuple, _Fold] = {}
        self.watermark = 0  # the latest step written

    def add(self, row: dict) -> tuple[list[dict], list[str]]:
        """(rows to write, console lines) for one alert row."""
        step = row["step"]
        rows, lines = self._expire(step)
        if row["action"] in ACTIONS or row["detector"] == "guard":  # what happened to the run: one row each
            rows.append(row)
            key = ("action", row["detector"], row["action"])  # the console still folds them
            if key not in self.open:
                self.open[key] = _Fold(row, step, count=0)
                lines.append(_line(row))
            self.watermark = max(self.watermark, step)
            return rows, lines
        key = (row["detector"], row["action"])
        fold = self.open.get(key)
        if fold is not None and step - fold.first["step"] < self.window:
            fold.count += 1
            fold.last_step = step
        else:
            self.open[key] = _Fold(row, step)
            rows.append(row)
            lines.append(_line(row))
        self.watermark = max(self.watermark, step)
        return rows, lines

    def _expire(self, step: int) -> tuple[list[dict], list[str]]:
        done = [k for k, f in self.open.items() if step - f.first["step"] >= self.window]
        return self._close(done)

    def close(self) -> tuple[list[dict], list[str]]:
        """The folds still open (at the end of a run or a write)."""
        return self._close(list(self.open))

    def _close(self, keys) -> tuple[list[dict], list[str]]:
        rows, lines = [], []
        for key in keys:
            fold = self.open.pop(key)
            if fold.count > 1:
                first = fold.first
                more = fold.count - 1
                span = f"steps {first['step']}-{fold.last_step}"
                text = f"{first['detector']} ({first['action']}) {more} more time(s), {span}"
                rows.append({
                    "step": max(self.watermark, fold.last_step), "detector": first["detector"],
                    "action": first["action"], "severity": first.get("severity", "warning"), "repeated": more,
                    "first_step": first["step"], "last_step": fold.last_step, "values": {},
                    "explanation": text, "suggestion": first.get("suggestion", ""),
                })  # fmt: skip
                lines.append(f"[guard] {text}")
        return rows, lines


def _line(row: dict) -> str:
    tip = f" Try: {row['suggestion']}" if row.get("suggestion") else ""
    return f"[guard] step {row['step']}: {row['detector']} -> {row['action']}: {row['explanation']}.{tip}"
