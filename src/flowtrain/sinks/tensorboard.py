"""TensorBoard event files (the live view): `tensorboard --logdir runs/`."""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any


class TensorBoardSink:
    def __init__(self, logdir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # imported lazily: pulls in tensorboard

        self._writer = SummaryWriter(log_dir=str(logdir), purge_step=purge_step)

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        for key, value in scalars.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                self._writer.add_scalar(key.replace(".", "/", 1) if "/" not in key else key, value, step)

    def write_layers(self, step: int, record) -> None:
        """Per-layer gradient norm and update/weight ratio from a FlowRecord (one TensorBoard section each)."""
        if record.layer_stats is None:
            return
        from flowtrain.flow.stats import TENSOR_STATS

        for stat in ("grad_norm", "update_ratio"):
            column = record.layer_stats[:, TENSOR_STATS.index(stat)]
            for name, value in zip(record.layer_names, column.tolist()):
                if value == value:  # not NaN
                    self._writer.add_scalar(f"{stat}_by_layer/{name}", value, step)
        for layer, values in record.histograms.items():
            self._writer.add_histogram(f"grad_hist/{layer}", values, step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
