"""metrics.jsonl, eval.jsonl, alerts.jsonl: one JSON object per line, appended; flushed and fsynced every
`flush_every` lines and on flush() (the loop calls it before every checkpoint: docs/run-dir.md). Readers and
a resumed run skip lines a crash tore or that are not UTF-8 JSON."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowtrain.fsutil import atomic_write_bytes, atomic_write_text


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so the record stays valid JSON and the fact survives."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonlSink:
    """Appends records to a JSONL file; `truncate_after(step)` drops records a resumed run will redo."""

    def __init__(self, path: Path, flush_every: int = 1):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the sink
        self._flush_every = flush_every
        self._pending = 0

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._pending += 1
        if self._pending >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._pending = 0

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()

    def mark_discarded_after(self, step: int) -> None:
        """After a guard rollback: keep the records of undone steps, flagged `"discarded": true`.

        Readers that want the history of the surviving weights skip discarded records; the spike that caused
        the rollback stays visible.
        """
        self.close()
        kept = []
        for _, record in _parse(self.path.read_bytes())[0]:
            if record.get("step", 0) > step:
                record["discarded"] = True
            kept.append(json.dumps(record))
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    @staticmethod
    def truncate_after(path: Path, step: int, drop: Callable[[dict], bool] | None = None) -> int:
        """Keep only the records with record['step'] <= step (and not `drop(record)`); what a resumed run writes
        again goes. Unreadable lines are dropped too: returns their count, a torn last line (what a killed
        process leaves) not counted. The file is rewritten only when something goes."""
        path = Path(path)
        if not path.exists():
            return 0
        records, unreadable, torn = _parse(path.read_bytes())
        kept = [line for line, r in records if r.get("step", 0) <= step and not (drop is not None and drop(r))]
        if unreadable or torn or len(kept) != len(records):
            atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))
        return unreadable


def _parse(data: bytes) -> tuple[list[tuple[bytes, dict[str, Any]]], int, bool]:
    """(line, record) of every readable line; the number of unreadable ones (not UTF-8, not a JSON object),
    and whether the last line is torn (unreadable and without its newline: a write cut short)."""
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    records, unreadable = [], 0
    for line in lines:
        record = _record(line)
        if record is None:
            unreadable += line.strip() != b""
        else:
            records.append((line, record))
    torn = False
    if tail.strip():
        record = _record(tail)
        if record is None:
            torn = True
        else:
            records.append((tail, record))
    return records, unreadable, torn


def _record(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError is a ValueError
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step", 0), int)
    return record if ok else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file written by a sink, skipping unreadable lines (a torn last line, bytes that are not
    UTF-8 or not JSON)."""
    return [record for _, record in _parse(Path(path).read_bytes())[0]]
