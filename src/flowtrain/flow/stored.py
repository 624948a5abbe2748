"""FlowRecords back from a run directory's flow.parquet (and its metrics rows' scalars), for judging steps that
were recorded rather than re-run (`flowtrain diagnose` on a run flowtrain observed: integrations/recorded.py)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flowtrain.flow.records import DEPTH_STATS, TENSOR_STATS, FlowRecord, read_flow


def read_records(
    path: str | os.PathLike,
    last: int | None = None,
    scalars: dict[int, dict] | None = None,
    unavailable: dict[str, str] | None = None,
) -> list[FlowRecord]:
    """The monitored steps of flow.parquet as FlowRecords, oldest first (the `last` N of them when given), each
    with its step's metrics row as `scalars` and the run's `unavailable` statistics."""
    table = read_flow(path)
    steps = np.unique(table["step"].to_numpy())
    if last is not None:
        steps = steps[-last:]
        table = table.filter(pc.is_in(table["step"], value_set=pa.array(steps.astype(np.int64))))
    cols = {c: table[c].to_numpy(zero_copy_only=False) for c in ("step", "name", "layer", "kind")}
    stats = {c: table[c].to_numpy() for c in TENSOR_STATS + DEPTH_STATS}
    records = []
    for step in steps:
        at = cols["step"] == step
        rec = FlowRecord(int(step), dict((scalars or {}).get(int(step), {})), unavailable=dict(unavailable or {}))
        for kind in ("tensor", "layer", "depth"):
            rows = np.flatnonzero(at & (cols["kind"] == kind))
            if kind == "depth":  # h0, h1, ..., hL in numeric order
                rows = rows[np.argsort([int(cols["name"][i][1:]) for i in rows], kind="stable")]
            if not len(rows):
                continue
            names, layers = cols["name"][rows].tolist(), cols["layer"][rows].tolist()
            block = np.stack([stats[c][rows] for c in (DEPTH_STATS if kind == "depth" else TENSOR_STATS)], 1)
            if kind == "tensor":
                rec.tensor_names, rec.tensor_layers, rec.tensor_stats = names, layers, block
            elif kind == "layer":
                rec.layer_names, rec.layer_stats = names, block
            else:
                rec.depth_names, rec.depth_layers, rec.depth_stats = names, layers, block
        records.append(rec)
    return records
