"""Read one run directory (docs/run-dir.md) into plain numpy arrays for the report.

The report reads only the run directory, never the trainer, so this module is the whole contract on the reading
side. Optional files (eval.jsonl, flow.parquet, alerts.jsonl) may be missing: they load as None and the report
says so where their figure would be.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from flowtrain.config import parse_yaml, read_text
from flowtrain.errors import DataError
from flowtrain.flow.records import read_flow
from flowtrain.rundir import RunDir


@dataclass
class Columns:
    """Per-step scalars as aligned float arrays (NaN where a record lacks the field); `step` is int64."""

    step: np.ndarray
    values: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.step)

    def get(self, name: str) -> np.ndarray | None:
        return self.values.get(name)


@dataclass
class FlowGrid:
    """One kind of flow.parquet rows pivoted to [row name, step] matrices, one per stat column."""

    names: list[str]  # row labels in order of first appearance ('layer': embedding, block.0, ..., head)
    layers: list[str]  # the layer each row belongs to (for 'depth' rows h_l: the block that produced it)
    steps: np.ndarray  # sorted unique steps
    stats: dict[str, np.ndarray]  # stat -> float64 [len(names), len(steps)], NaN where absent
    labels: list[str] = field(default_factory=list)  # what figures print for each row (default: its name)

    def __post_init__(self) -> None:
        if not self.labels:
            self.labels = list(self.names)


# With weight tying the embedding matrix is also the output head's weight: the parameter is counted once, in the
# embedding layer, and the head layer keeps only the final norm. Figures say so, or a reader would take the
# "head" bars for the unembedding's gradient and the "embedding" ones for the input side alone.
TIED_LABELS = {"embedding": "embedding (tied: emb + head)", "head": "head (final norm only)"}


def ties_embeddings(config: dict) -> bool:
    """config.yaml says the model shares its embedding with its output head (flowtrain's model.tie_embeddings)."""
    model = config.get("model")
    return isinstance(model, dict) and model.get("tie_embeddings") is True


def layer_labels(names: list[str], tied: bool) -> list[str]:
    """Per-layer names as figures print them: with tied weights, the layers that hold the shared matrix say so."""
    return [TIED_LABELS.get(n, n) for n in names] if tied else list(names)


@dataclass
class RunData:
    path: Path
    name: str
    config: dict
    env: dict
    metrics: Columns
    discarded: Columns  # records marked "discarded": true (steps undone by a guard rollback)
    evals: Columns | None
    alerts: list[dict] | None
    layer_flow: FlowGrid | None
    depth_flow: FlowGrid | None
    summary: dict | None
    missing: dict[str, str] = field(default_factory=dict)  # file name -> why it is not shown
    notices: list[str] = field(default_factory=list)  # what was skipped while reading (damaged lines)


def _to_float(value) -> float:
    """JSON numbers, booleans and the sinks' "nan"/"inf"/"-inf" strings as floats; anything else NaN."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return float(value)
    return math.nan


def columns_from_records(records: list[dict]) -> tuple[Columns, Columns]:
    """(kept, discarded) columns from JSONL records; a step logged twice keeps its last record."""
    kept: dict[int, dict] = {}
    dropped: dict[int, dict] = {}
    for rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            continue
        (dropped if rec.get("discarded") is True else kept)[rec["step"]] = rec
    return _columns(kept), _columns(dropped)


def _columns(by_step: dict[int, dict]) -> Columns:
    steps = sorted(by_step)
    keys = list(dict.fromkeys(k for s in steps for k in by_step[s] if k not in ("step", "discarded")))
    values = {}
    for key in keys:
        arr = np.array([_to_float(by_step[s].get(key, math.nan)) for s in steps], dtype=np.float64)
        if not np.isnan(arr).all():
            values[key] = arr
    return Columns(np.asarray(steps, dtype=np.int64), values)


def _grid(table, kind: str) -> FlowGrid | None:
    """Pivot one kind of rows; when a (step, name) pair appears twice (rollback replay) the last row wins."""
    sub = table.filter(pc.equal(table["kind"], kind))
    if sub.num_rows == 0:
        return None
    name_codes = pc.dictionary_encode(sub["name"]).combine_chunks()
    names = name_codes.dictionary.to_pylist()
    name_idx = name_codes.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    first_row = np.unique(name_idx, return_index=True)[1]
    layer_of = dict(zip(names, sub["layer"].take(first_row).to_pylist()))
    steps_raw = sub["step"].to_numpy()
    steps, step_idx = np.unique(steps_raw, return_inverse=True)
    key = step_idx * len(names) + name_idx
    last = len(key) - 1 - np.unique(key[::-1], return_index=True)[1]
    stats = {}
    for col in sub.column_names:
        if col in ("step", "name", "layer", "kind"):
            continue
        vals = sub[col].to_numpy().astype(np.float64)
        if np.isnan(vals).all():
            continue
        mat = np.full((len(names), len(steps)), np.nan)
        mat[name_idx[last], step_idx[last]] = vals[last]
        stats[col] = mat
    if kind == "depth":  # h0, h1, ..., hL in numeric order whatever order they were first written in
        order = sorted(range(len(names)), key=lambda i: (len(names[i]), names[i]))
    else:
        order = list(range(len(names)))
    return FlowGrid(
        names=[names[i] for i in order],
        layers=[layer_of[names[i]] for i in order],
        steps=steps,
        stats={k: v[order] for k, v in stats.items()},
    )


def _read_records(path: Path, notices: list[str]) -> list[dict]:
    """A JSONL file's records; damaged lines (not UTF-8, not JSON) are skipped and counted in `notices`. An
    unterminated last line is a write a crash cut short, skipped silently as every reader does."""
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror}); check its permissions") from None
    records, bad = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError and JSONDecodeError alike
            bad += i < len(lines) - 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    if bad:
        notices.append(f"{path}: skipped {bad} damaged line(s) (not UTF-8 JSON records)")
    return records


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not readable JSON ({exc}); restore it or delete it") from None
    return data if isinstance(data, dict) else {}


def run_name(path: Path, config: dict) -> str:
    """The config's train.run_name when the directory path ends with it (runs live at out_dir/run_name), else
    the directory's own name."""
    configured = (config.get("train") or {}).get("run_name") if isinstance(config.get("train"), dict) else None
    if isinstance(configured, str) and configured and str(path).rstrip("/").endswith(configured):
        return configured
    return path.resolve().name or str(path)


def load_run(path: str | Path) -> RunData:
    """Everything the report shows about one run. A missing path or a directory that is not a run is a DataError."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"run directory {path} not found; pass a directory made by `flowtrain train` (runs/NAME)")
    run = RunDir(path)
    if not run.config.is_file() and not run.metrics.is_file():
        raise DataError(
            f"{path} is not a run directory (no config.yaml or metrics.jsonl); pass runs/NAME made by flowtrain train"
        )
    missing: dict[str, str] = {}
    notices: list[str] = []
    config: dict = {}
    if run.config.is_file():
        fix = "restore it from a checkpoint's config.yaml"
        config = parse_yaml(read_text(run.config, fix), str(run.config), fix)
    else:
        missing["config.yaml"] = "config.yaml not found"
    env = _read_json(run.env) if run.env.is_file() else {}
    if not env:
        missing["env.json"] = "env.json not found"
    if run.metrics.is_file():
        metrics, discarded = columns_from_records(_read_records(run.metrics, notices))
    else:
        missing["metrics.jsonl"] = "metrics.jsonl not found: the run logged no steps"
        metrics = discarded = Columns(np.zeros(0, np.int64), {})
    evals = None
    if run.evals.is_file():
        evals = columns_from_records(_read_records(run.evals, notices))[0]
    if evals is None or not len(evals):
        evals = None
        missing["eval.jsonl"] = "no evaluations (eval.jsonl missing or empty)"
    alerts = None
    if run.alerts.is_file():
        alerts = _read_records(run.alerts, notices)
    else:
        missing["alerts.jsonl"] = "alerts.jsonl not found: the stability guard was off for this run"
    unavailable = config.get("unavailable") if isinstance(config.get("unavailable"), dict) else {}
    for stat, why in unavailable.items():  # a run recorded in another loop says what its model could not give
        missing[f"stat:{stat}"] = f"{stat} is not available for this model: {why}"
    layer_flow = depth_flow = None
    if run.flow.is_file():
        table = read_flow(run.flow)
        layer_flow, depth_flow = _grid(table, "layer"), _grid(table, "depth")
        if layer_flow is not None:
            layer_flow.labels = layer_labels(layer_flow.names, ties_embeddings(config))
        if layer_flow is None:
            missing["flow.parquet:layer"] = "flow.parquet has no per-layer rows"
        if depth_flow is None:
            missing["flow.parquet:depth"] = missing.get(
                "stat:act_rms", "flow.parquet has no depth rows (residual / activation probes were off)"
            )
    else:
        missing["flow.parquet"] = "flow.parquet not found: the run was made without the flow monitor (flow.enabled)"
    summary = _read_json(run.summary) if run.summary.is_file() else None
    return RunData(
        path=path,
        name=run_name(path, config),
        config=config,
        env=env,
        metrics=metrics,
        discarded=discarded,
        evals=evals,
        alerts=alerts,
        layer_flow=layer_flow,
        depth_flow=depth_flow,
        summary=summary,
        missing=missing,
        notices=notices,
    )
