"""Host-side results of one monitored step (FlowRecord) and their columnar file (flow.parquet).

A FlowRecord holds plain numbers: `scalars` (one value per name, for metrics.jsonl / TensorBoard) and three
small matrices (per tensor, per layer, along depth). The Parquet file stores one row per (step, name) with
columns step, name, layer, kind ('tensor' | 'layer' | 'depth') and every stat column as float32; a stat that
does not apply to a row's kind is NaN.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flowtrain.errors import DataError
from flowtrain.flow.hooks import DEPTH_STATS
from flowtrain.flow.stats import TENSOR_STATS

STAT_COLUMNS = TENSOR_STATS + DEPTH_STATS
SCHEMA = pa.schema(
    [("step", pa.int64()), ("name", pa.string()), ("layer", pa.string()), ("kind", pa.string())]
    + [(c, pa.float32()) for c in STAT_COLUMNS]
)


def aggregate_layers(layers: list[str], stats: np.ndarray, numels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Per-layer rows from per-tensor rows (TENSOR_STATS columns), in order of first appearance.

    Norms combine as sqrt of summed squares, maxima as max, counts as sums, RMS over all elements of the layer.
    Tensors without a gradient (grad_nonfinite is NaN for them) are left out of the gradient columns; a
    non-finite gradient value still makes its layer's norm non-finite, on purpose.
    """
    col = {name: i for i, name in enumerate(TENSOR_STATS)}
    s = stats.astype(np.float64)
    order = list(dict.fromkeys(layers))
    out = np.full((len(order), len(TENSOR_STATS)), np.nan)
    layer_arr = np.asarray(layers)
    for row, layer in enumerate(order):
        m = layer_arr == layer
        has_grad = m & ~np.isnan(s[:, col["grad_nonfinite"]])
        if has_grad.any():
            gsq = (s[has_grad, col["grad_norm"]] ** 2).sum()
            out[row, col["grad_norm"]] = np.sqrt(gsq)
            out[row, col["grad_max_abs"]] = s[has_grad, col["grad_max_abs"]].max()
            out[row, col["grad_rms"]] = np.sqrt(gsq / numels[has_grad].sum())
            out[row, col["grad_nonfinite"]] = s[has_grad, col["grad_nonfinite"]].sum()
        wn = np.sqrt((s[m, col["weight_norm"]] ** 2).sum())
        un = np.sqrt((s[m, col["update_norm"]] ** 2).sum())
        out[row, col["weight_norm"]] = wn
        out[row, col["update_norm"]] = un
        out[row, col["update_ratio"]] = un / wn if wn > 0 else np.nan
        has_v = m & ~np.isnan(s[:, col["adam_v_rms"]])
        if has_v.any():
            vsum = (s[has_v, col["adam_v_rms"]] ** 2 * numels[has_v]).sum()
            out[row, col["adam_v_rms"]] = np.sqrt(vsum / numels[has_v].sum())
    return order, out.astype(np.float32)


@dataclass
class FlowRecord:
    """What the microscope saw in one optimizer step, as host-side numbers."""

    step: int
    scalars: dict[str, float]
    tensor_names: list[str] = field(default_factory=list)
    tensor_layers: list[str] = field(default_factory=list)
    tensor_stats: np.ndarray | None = None  # [n_tensors, len(TENSOR_STATS)]
    layer_names: list[str] = field(default_factory=list)
    layer_stats: np.ndarray | None = None  # [n_layers, len(TENSOR_STATS)]
    depth_names: list[str] = field(default_factory=list)  # "h0".."hL"
    depth_layers: list[str] = field(default_factory=list)
    depth_stats: np.ndarray | None = None  # [L+1, len(DEPTH_STATS)]
    histograms: dict[str, np.ndarray] = field(default_factory=dict)  # "layer" -> sampled gradient values

    def tensor(self, name: str) -> dict[str, float]:
        """One parameter tensor's statistics by model name."""
        return dict(zip(TENSOR_STATS, self.tensor_stats[self.tensor_names.index(name)].tolist(), strict=True))

    def layer(self, name: str) -> dict[str, float]:
        return dict(zip(TENSOR_STATS, self.layer_stats[self.layer_names.index(name)].tolist(), strict=True))

    def depth(self, stat: str) -> list[float]:
        """One depth statistic along h_0..h_L."""
        return self.depth_stats[:, DEPTH_STATS.index(stat)].tolist()

    def columns(self) -> dict[str, np.ndarray]:
        """Columnar form (flow.parquet's schema) of every per-tensor, per-layer and depth row."""
        parts = []
        for kind, names, layers, stats, cols in (
            ("tensor", self.tensor_names, self.tensor_layers, self.tensor_stats, TENSOR_STATS),
            ("layer", self.layer_names, self.layer_names, self.layer_stats, TENSOR_STATS),
            ("depth", self.depth_names, self.depth_layers, self.depth_stats, DEPTH_STATS),
        ):
            if stats is None or not len(names):
                continue
            block = np.full((len(names), len(STAT_COLUMNS)), np.nan, dtype=np.float32)
            for j, c in enumerate(cols):
                block[:, STAT_COLUMNS.index(c)] = stats[:, j]
            parts.append((kind, names, layers, block))
        n = sum(len(p[1]) for p in parts)
        out: dict[str, np.ndarray] = {
            "step": np.full(n, self.step, dtype=np.int64),
            "name": np.array([x for p in parts for x in p[1]], dtype=object),
            "layer": np.array([x for p in parts for x in p[2]], dtype=object),
            "kind": np.array([p[0] for p in parts for _ in p[1]], dtype=object),
        }
        stats = np.concatenate([p[3] for p in parts]) if parts else np.zeros((0, len(STAT_COLUMNS)), np.float32)
        for j, c in enumerate(STAT_COLUMNS):
            out[c] = stats[:, j]
        return out

    def rows(self) -> list[dict]:
        """The same rows as dicts (convenient for small numbers of steps)."""
        cols = self.columns()
        lists = {k: v.tolist() for k, v in cols.items()}
        return [dict(zip(lists, values, strict=True)) for values in zip(*lists.values(), strict=True)]


class FlowParquetWriter:
    """Appends FlowRecords to a Parquet file, buffered into row groups.

    Rows go to `<path>.partial` and the file appears under `path` only at close() (fsync + rename), so a
    finished-looking flow.parquet is always complete. With `keep_before_step` (a resumed run) the rows of an
    existing file below that step are carried over first.
    """

    def __init__(self, path: str | os.PathLike, *, row_group_rows: int = 65536, keep_before_step: int | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.row_group_rows = row_group_rows
        self._buffer: list[dict[str, np.ndarray]] = []
        self._buffered = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        carried = None
        if keep_before_step is not None and self.path.exists():
            try:
                old = pq.read_table(self.path)
            except (OSError, pa.ArrowInvalid) as exc:
                raise DataError(f"cannot read {self.path} to resume it ({exc}); delete it or start a new run") from None
            carried = old.filter(pc.less(old["step"], keep_before_step)).cast(SCHEMA)
        self._writer = pq.ParquetWriter(self.tmp, SCHEMA, compression="zstd")
        if carried is not None and carried.num_rows:
            self._writer.write_table(carried, row_group_size=row_group_rows)

    def write(self, record: FlowRecord) -> None:
        cols = record.columns()
        if not len(cols["step"]):
            return
        self._buffer.append(cols)
        self._buffered += len(cols["step"])
        if self._buffered >= self.row_group_rows:
            self.flush()

    def flush(self) -> None:
        """Write buffered rows as one row group (still readable only after close)."""
        if not self._buffer:
            return
        arrays = []
        for f in SCHEMA:
            data = np.concatenate([b[f.name] for b in self._buffer])
            arrays.append(pa.array(data, type=f.type))
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=SCHEMA), row_group_size=self.row_group_rows)
        self._buffer.clear()
        self._buffered = 0

    def close(self) -> None:
        if self._writer is None:
            return
        self.flush()
        self._writer.close()
        self._writer = None
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def __enter__(self) -> FlowParquetWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_flow(path: str | os.PathLike) -> pa.Table:
    """Load flow.parquet (all rows); a missing or unreadable file is a DataError naming it."""
    try:
        return pq.read_table(path)
    except FileNotFoundError:
        raise DataError(f"{path} not found; was the run started with flow.enabled=true?") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{path} is not a readable flow.parquet ({exc}); was the run interrupted?") from None
