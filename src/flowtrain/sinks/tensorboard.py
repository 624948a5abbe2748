"""TensorBoard event files (the live view): `tensorboard --logdir runs/`.

All scalars of a step go into one event (one Summary with many values) instead of one event per scalar: with
the microscope's per-layer series that is ~30 values a step, and TensorBoard's writer frames and checksums
every event in Python (docs/performance.md). The per-layer values of a step (write_layers) wait for that
step's scalars (write) and share their event. torch's FileWriter writes the file, as SummaryWriter would.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any


class TensorBoardSink:
    def __init__(self, logdir: Path, purge_step: int | None = None):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from torch.utils.tensorboard.writer import FileWriter  # imported lazily: pulls in tensorboard

        self._writer = FileWriter(str(logdir))
        if purge_step is not None:  # a resumed run: TensorBoard drops what earlier files hold from this step on
            self._writer.add_event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self._pending: tuple[int, dict[str, float]] | None = None  # per-layer values waiting for write()
        self._tags: dict[tuple, list[str]] = {}  # (stat, layer names) -> tags

    def _write_values(self, step: int, values: dict[str, float]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        if not values:
            return
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
        self._writer.add_summary(summary, step)

    def _take_pending(self, step: int) -> dict[str, float]:
        """The per-layer values waiting for `step` (written on their own if they were for another step)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return {}
        if pending[0] != step:
            self._write_values(*pending)
            return {}
        return pending[1]

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        values = {
            key: float(value)
            for key, value in scalars.items()
            if isinstance(value, numbers.Real) and not isinstance(value, bool)
        }
        self._write_values(step, {**values, **self._take_pending(step)})

    def _layer_tags(self, stat: str, layers: list[str]) -> list[str]:
        """The TensorBoard tags of a per-layer series (made once, asked for at every monitored step)."""
        key = (stat, tuple(layers))
        tags = self._tags.get(key)
        if tags is None:
            tags = self._tags[key] = [f"{stat}_by_layer/{name}" for name in layers]
        return tags

    def write_layers(self, step: int, record) -> None:
        """Per-layer gradient norm and update/weight ratio from a FlowRecord (one TensorBoard section each)."""
        if record.layer_stats is not None:
            from flowtrain.flow.records import TENSOR_STATS

            values = {}
            for stat in ("grad_norm", "update_ratio"):
                column = record.layer_stats[:, TENSOR_STATS.index(stat)].tolist()
                for tag, value in zip(self._layer_tags(stat, record.layer_names), column):
                    if not math.isnan(value):
                        values[tag] = value
            if self._pending is not None:
                self._write_values(*self._pending)
            self._pending = (step, values)  # written with this step's scalars
        if record.histograms:
            from torch.utils.tensorboard.summary import histogram

            for layer, values in record.histograms.items():
                self._writer.add_summary(histogram(f"grad_hist/{layer}", values, "auto"), step)

    def close(self) -> None:
        if self._pending is not None:
            self._write_values(*self._pending)
            self._pending = None
        self._writer.flush()
        self._writer.close()
