"""metrics.jsonl: one JSON object per logged step, appended, flushed so a crash loses at most one line."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from flowtrain.fsutil import atomic_write_text


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
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", 0) > step:
                record["discarded"] = True
            kept.append(json.dumps(record))
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    @staticmethod
    def truncate_after(path: Path, step: int) -> None:
        """Keep only records with record['step'] <= step (and drop a torn last line from a crash)."""
        path = Path(path)
        if not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file written by a sink (skipping a torn last line)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
