"""TensorBoard event files (the live view): `tensorboard --logdir runs/`.

All scalars of a step go into one event (one Summary protobuf with many values) instead of one event per
scalar: with the microscope's per-layer series that is ~30 values a step, and writing them one by one cost
~0.8 ms a step on a 2-core CPU. The per-layer values of a step (write_layers) wait for that step's scalars
(write) and share their event.

Each event record carries a CRC-32C checksum, which TensorBoard (without TensorFlow) computes in pure Python,
byte by byte, on its writer thread: ~100 us a KB, holding the GIL while the training loop's Python waits for it
and taking a core from torch's threads. On shakespeare-char that cost ~0.3 ms a step more with the microscope's
per-layer values than without (its events are ~3x larger). So the sink gives TensorBoard's record writer the C
implementation of the same checksum (google-crc32c), after checking that it gives TensorBoard's own numbers on
sample records (fast_record_checksum); the files are byte for byte those TensorBoard writes.
"""

from __future__ import annotations

import math
import numbers
import struct
from pathlib import Path
from typing import Any

# records to compare the two checksums on: empty, one byte, every byte value, a record header, longer than 4 KiB
_CHECK_RECORDS = (b"", b"\x00", bytes(range(256)), struct.pack("<Q", 1234567), bytes(range(256)) * 17 + b"ft")


def fast_record_checksum() -> str:
    """Put the C CRC-32C into TensorBoard's event record writer when it computes the checksum in Python; returns
    which implementation the writer now uses: "c" (or "tensorboard's own", with the reason when not replaced)."""
    try:
        import google_crc32c
        from tensorboard.summary.writer import record_writer
    except ImportError as e:
        return f"tensorboard's own (no google-crc32c: {e})"
    theirs = getattr(record_writer, "masked_crc32c", None)
    if getattr(theirs, "flowtrain_c", False):
        return "c"
    if theirs is None:
        return "tensorboard's own (its record writer has no masked_crc32c)"
    if google_crc32c.implementation != "c":
        return "tensorboard's own (google-crc32c has no C implementation here)"

    def masked_crc32c(data) -> int:
        """TensorBoard's masked CRC-32C of an event record (same contract as its pure-Python function)."""
        crc = google_crc32c.value(bytes(data))
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    if any(masked_crc32c(r) != theirs(r) for r in _CHECK_RECORDS):
        return "tensorboard's own (its checksum differs from CRC-32C here)"
    masked_crc32c.flowtrain_c = True
    record_writer.masked_crc32c = masked_crc32c
    return "c"


class TensorBoardSink:
    def __init__(self, logdir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # imported lazily: pulls in tensorboard

        self.checksum = fast_record_checksum()  # before the writer's thread starts writing records
        self._writer = SummaryWriter(log_dir=str(logdir), purge_step=purge_step)
        self._pending: tuple[int, dict[str, float]] | None = None  # per-layer values waiting for write()
        self._tags: dict[tuple, list[str]] = {}  # (stat, layer names) -> tags

    def _write_values(self, step: int, values: dict[str, float]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        if not values:
            return
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
        file_writer = getattr(self._writer, "_get_file_writer", None)
        if file_writer is None:  # a SummaryWriter without the (long-stable) private hook: one call per scalar
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)
        else:
            file_writer().add_summary(summary, step)

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
            from flowtrain.flow.stats import TENSOR_STATS

            values = {}
            for stat in ("grad_norm", "update_ratio"):
                column = record.layer_stats[:, TENSOR_STATS.index(stat)].tolist()
                for tag, value in zip(self._layer_tags(stat, record.layer_names), column):
                    if not math.isnan(value):
                        values[tag] = value
            if self._pending is not None:
                self._write_values(*self._pending)
            self._pending = (step, values)  # written with this step's scalars
        for layer, values in record.histograms.items():
            self._writer.add_histogram(f"grad_hist/{layer}", values, step)

    def close(self) -> None:
        if self._pending is not None:
            self._write_values(*self._pending)
            self._pending = None
        self._writer.flush()
        self._writer.close()
