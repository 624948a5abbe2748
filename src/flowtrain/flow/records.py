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

from flowtrain.errors import DataError, FlowtrainError, NotAvailable

# per parameter tensor (and per layer): flow.parquet's stat columns of 'tensor' and 'layer' rows
TENSOR_STATS = (
    "grad_norm",
    "grad_max_abs",
    "grad_rms",
    "grad_nonfinite",
    "weight_norm",
    "update_norm",
    "update_ratio",
    "adam_v_rms",
)
# per residual-stream boundary h_0..h_L: the stat columns of 'depth' rows
DEPTH_STATS = ("resid_grad_norm", "act_rms", "act_max_abs", "attn_entropy", "attn_max_logit")
STAT_COLUMNS = TENSOR_STATS + DEPTH_STATS
SCHEMA = pa.schema(
    [("step", pa.int64()), ("name", pa.string()), ("layer", pa.string()), ("kind", pa.string())]
    + [(c, pa.float32()) for c in STAT_COLUMNS]
)
_TENSOR_COLS = [STAT_COLUMNS.index(c) for c in TENSOR_STATS]
_DEPTH_COLS = [STAT_COLUMNS.index(c) for c in DEPTH_STATS]


class LayerGroups:
    """Per-layer rows from per-tensor rows (TENSOR_STATS columns) for a fixed tensor -> layer assignment,
    layers in order of first appearance; vectorized (tensors sorted by layer once, then one np.add.reduceat
    for every summed column and one np.maximum.reduceat), as it runs every monitored step.

    Norms combine as sqrt of summed squares, maxima as max, counts as sums, RMS over all elements of the layer.
    Tensors without a gradient (grad_nonfinite is NaN for them) are left out of the gradient columns; a
    non-finite gradient value still makes its layer's norm non-finite, on purpose.
    """

    def __init__(self, layers: list[str], numels: np.ndarray):
        self.names = list(dict.fromkeys(layers))
        row = {name: i for i, name in enumerate(self.names)}
        index = np.array([row[layer] for layer in layers], dtype=np.int64)
        self.order = np.argsort(index, kind="stable")  # tensors grouped by layer
        self.starts = np.searchsorted(index[self.order], np.arange(len(self.names)))
        self.numels = np.asarray(numels, dtype=np.float64)[self.order]

    def __call__(self, stats: np.ndarray) -> np.ndarray:
        s = stats[self.order].astype(np.float64)
        g = _COL
        has_grad = ~np.isnan(s[:, g["grad_nonfinite"]])
        has_v = ~np.isnan(s[:, g["adam_v_rms"]])
        with np.errstate(divide="ignore", invalid="ignore"):  # NaN/Inf propagate on purpose
            summed = np.stack(
                [
                    np.where(has_grad, s[:, g["grad_norm"]] ** 2, 0.0),
                    np.where(has_grad, self.numels, 0.0),
                    np.where(has_grad, s[:, g["grad_nonfinite"]], 0.0),
                    s[:, g["weight_norm"]] ** 2,
                    s[:, g["update_norm"]] ** 2,
                    np.where(has_v, s[:, g["adam_v_rms"]] ** 2 * self.numels, 0.0),
                    np.where(has_v, self.numels, 0.0),
                ],
                axis=1,
            )
            gsq, g_numel, bad, wsq, usq, v_sum, v_numel = np.add.reduceat(summed, self.starts, axis=0).T
            gmax = np.maximum.reduceat(np.where(has_grad, s[:, g["grad_max_abs"]], -np.inf), self.starts)
            out = np.full((len(self.names), len(TENSOR_STATS)), np.nan)
            grads = g_numel > 0
            out[grads, g["grad_norm"]] = np.sqrt(gsq[grads])
            out[grads, g["grad_max_abs"]] = gmax[grads]
            out[grads, g["grad_rms"]] = np.sqrt(gsq[grads] / g_numel[grads])
            out[grads, g["grad_nonfinite"]] = bad[grads]
            wn, un = np.sqrt(wsq), np.sqrt(usq)
            out[:, g["weight_norm"]], out[:, g["update_norm"]] = wn, un
            out[:, g["update_ratio"]] = np.where(wn > 0, un / wn, np.nan)
            out[:, g["adam_v_rms"]] = np.where(v_numel > 0, np.sqrt(v_sum / v_numel), np.nan)
        return out.astype(np.float32)


_COL = {name: i for i, name in enumerate(TENSOR_STATS)}


def aggregate_layers(layers: list[str], stats: np.ndarray, numels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Per-layer rows from per-tensor rows: see LayerGroups (which a monitor builds once and reuses)."""
    groups = LayerGroups(layers, numels)
    return groups.names, groups(stats)


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
    weight_histograms: dict[str, np.ndarray] = field(default_factory=dict)  # "layer" -> sampled weights after the step
    unavailable: dict[str, str] = field(default_factory=dict)  # stat -> why it cannot be measured on this model

    def tensor(self, name: str) -> dict[str, float]:
        """One parameter tensor's statistics by model name."""
        return dict(zip(TENSOR_STATS, self.tensor_stats[self.tensor_names.index(name)].tolist(), strict=True))

    def layer(self, name: str) -> dict[str, float]:
        return dict(zip(TENSOR_STATS, self.layer_stats[self.layer_names.index(name)].tolist(), strict=True))

    def depth(self, stat: str) -> list[float]:
        """One depth statistic along h_0..h_L; NotAvailable (saying why) where it was not measured."""
        if stat not in DEPTH_STATS:
            raise FlowtrainError(f"unknown depth statistic {stat!r}; choose one of: {', '.join(DEPTH_STATS)}")
        if stat in self.unavailable:
            raise NotAvailable(f"{stat} is not available for this model: {self.unavailable[stat]}")
        if self.depth_stats is None:
            raise NotAvailable(f"step {self.step} has no depth statistics: it was not a monitored step (flow.interval)")
        return self.depth_stats[:, DEPTH_STATS.index(stat)].tolist()

    def _parts(self):
        """(kind, names, layers, stats, column indices in STAT_COLUMNS) of each non-empty block of rows."""
        for kind, names, layers, stats, cols in (
            ("tensor", self.tensor_names, self.tensor_layers, self.tensor_stats, _TENSOR_COLS),
            ("layer", self.layer_names, self.layer_names, self.layer_stats, _TENSOR_COLS),
            ("depth", self.depth_names, self.depth_layers, self.depth_stats, _DEPTH_COLS),
        ):
            if stats is not None and len(names):
                yield kind, names, layers, stats, cols

    def stat_block(self) -> np.ndarray:
        """[rows, len(STAT_COLUMNS)] float32: every row's stat columns (NaN where a stat does not apply)."""
        blocks = []
        for _, names, _, stats, cols in self._parts():
            block = np.full((len(names), len(STAT_COLUMNS)), np.nan, dtype=np.float32)
            block[:, cols] = stats
            blocks.append(block)
        return np.concatenate(blocks) if blocks else np.zeros((0, len(STAT_COLUMNS)), np.float32)

    def columns(self) -> dict[str, np.ndarray]:
        """Columnar form (flow.parquet's schema) of every per-tensor, per-layer and depth row."""
        parts = list(self._parts())
        n = sum(len(p[1]) for p in parts)
        out: dict[str, np.ndarray] = {
            "step": np.full(n, self.step, dtype=np.int64),
            "name": np.array([x for p in parts for x in p[1]], dtype=object),
            "layer": np.array([x for p in parts for x in p[2]], dtype=object),
            "kind": np.array([p[0] for p in parts for _ in p[1]], dtype=object),
        }
        stats = self.stat_block()
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
        """Buffer one step's record (its arrays are kept, not copied: the monitor makes new ones each step);
        rows are laid out when a row group is written."""
        rows = len(record.tensor_names) + len(record.layer_names) + len(record.depth_names)
        if not rows:
            return
        self._buffer.append(record)
        self._buffered += rows
        if self._buffered >= self.row_group_rows:
            self.flush()

    def flush(self) -> None:
        """Write buffered rows as one row group (still readable only after close)."""
        if not self._buffer:
            return
        parts: list[dict[str, np.ndarray]] = []
        run: list[FlowRecord] = []
        for record in self._buffer:  # runs of records with the same rows are laid out in one go
            if run and not _same_rows(run[0], record):
                parts.append(_columns_of_run(run))
                run = []
            run.append(record)
        parts.append(_columns_of_run(run))
        arrays = [pa.array(np.concatenate([p[f.name] for p in parts]), type=f.type) for f in SCHEMA]
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


def _same_rows(a: FlowRecord, b: FlowRecord) -> bool:
    return (
        a.tensor_names == b.tensor_names
        and a.layer_names == b.layer_names
        and a.depth_names == b.depth_names
        and (a.tensor_stats is None) == (b.tensor_stats is None)
        and (a.layer_stats is None) == (b.layer_stats is None)
        and (a.depth_stats is None) == (b.depth_stats is None)
    )


def _columns_of_run(run: list[FlowRecord]) -> dict[str, np.ndarray]:
    """flow.parquet columns of consecutive records that have the same rows: the first record's row layout
    repeated, the stat blocks stacked."""
    first = run[0].columns()
    per = len(first["step"])
    out = {key: np.tile(first[key], len(run)) for key in ("name", "layer", "kind")}
    out["step"] = np.repeat(np.array([r.step for r in run], dtype=np.int64), per)
    stats = np.concatenate([r.stat_block() for r in run])
    for j, c in enumerate(STAT_COLUMNS):
        out[c] = stats[:, j]
    return out


def read_flow(path: str | os.PathLike) -> pa.Table:
    """Load flow.parquet (all rows); a missing or unreadable file is a DataError naming it."""
    try:
        return pq.read_table(path)
    except FileNotFoundError:
        raise DataError(f"{path} not found; was the run started with flow.enabled=true?") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{path} is not a readable flow.parquet ({exc}); was the run interrupted?") from None
