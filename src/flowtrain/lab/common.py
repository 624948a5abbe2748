"""What every study shares: the tiny-model settings, training one variant, and reading its run directory back.

A study never looks inside the trainer: it builds a config, calls the public `Trainer(cfg).run_loop()`, and
reads what happened from the run directory (metrics.jsonl, eval.jsonl, flow.parquet, alerts.jsonl), exactly as
a user's notebook would. That keeps the lab honest: it can only report what the run directory records.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import yaml

from flowtrain.config import RunConfig, load_config
from flowtrain.errors import ConfigError, DataError
from flowtrain.flow.records import read_flow
from flowtrain.sinks.jsonl import read_jsonl

BUILTIN_DATA = ["python-stdlib", "python-docs"]
BASE_SEED = 1337  # a study's seeds are BASE_SEED, BASE_SEED + 1, ...


@dataclass
class LabContext:
    """Where a study writes, what data it reads, and how big it may be."""

    out_dir: Path
    quick: bool = False
    data: Path | None = None  # a text file or directory; None = the built-in Python corpus
    seeds: list[int] = field(default_factory=lambda: [BASE_SEED])  # every variant trains once per seed
    progress: bool = False  # per-run progress bars (the CLI prints one line per variant instead)
    log: list[str] = field(default_factory=list)

    def data_overrides(self) -> list[str]:
        sources = BUILTIN_DATA if self.data is None else [str(self.data)]
        return ["data.sources=[" + ",".join(json.dumps(s) for s in sources) + "]", "data.tokenizer=byte"]


def tiny_overrides(ctx: LabContext, **settings: object) -> list[str]:
    """Overrides of a small, fast run (byte tokens, CPU, no TensorBoard, no closing sample); `settings` win.

    Keys use the config's dotted names with `__` for dots in Python keywords: model__n_layer=8.
    """
    base: dict[str, object] = {
        "model.n_layer": 4,
        "model.n_head": 4,
        "model.n_embd": 64,
        "model.block_size": 64,
        "train.batch_size": 16,
        "train.max_steps": 200,
        "train.eval_interval": 50,
        "train.eval_batches": 8,
        "train.checkpoint_interval": 1_000_000,  # one checkpoint, at the end
        "train.keep_last": 1,
        "train.sample_tokens": 0,
        "train.device": "cpu",
        "train.seed": BASE_SEED,
        "optim.name": "adamw",  # the studies' baseline, whatever the main job's recipe (configs/default.yaml)
        "optim.lr": 3e-3,
        "optim.adamw_lr_scale": 1.0,  # the main job's scale of Muon's AdamW half
        "model.qk_norm": False,
        "model.tie_embeddings": True,
        "schedule.kind": "cosine",
        "schedule.warmup_steps": 0,
        "schedule.min_lr": 0.0,
        "log.console": False,
        "log.tensorboard": False,
        "flow.interval": 1,  # studies read every step's records, and must not depend on timings
    }
    base.update({k.replace("__", "."): v for k, v in settings.items()})
    return [*ctx.data_overrides(), *(f"{k}={_yaml_value(v)}" for k, v in base.items())]


def _yaml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a YAML double-quoted string: 'off' must not become False
    return repr(value) if isinstance(value, float) else str(value)


def seeded_name(name: str, seed: int) -> str:
    """The run directory of one variant under one seed."""
    return f"{name}-seed{seed}"


def variant_config(ctx: LabContext, name: str, overrides: list[str]) -> RunConfig:
    """The config of one variant, writing to out_dir/name."""
    return load_config(None, [*overrides, f"train.out_dir={ctx.out_dir}", f"train.run_name={name}"])


def train_variant(ctx: LabContext, name: str, overrides: list[str]) -> Path:
    """Train one variant with the public Trainer; returns its run directory."""
    from flowtrain.train.trainer import Trainer  # heavy import, only when a study really trains

    cfg = variant_config(ctx, name, overrides)
    summary = Trainer(cfg, progress=ctx.progress).run_loop()
    return Path(summary.run_dir)


# ---- reading a run directory back ---------------------------------------------------------------------------


def _float(value: object) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # the sinks write non-finite numbers as "nan" / "inf"
        except ValueError:
            return math.nan
    return math.nan


@dataclass
class RunRecord:
    """One run directory's scalars as arrays: metrics per step, evaluations, alerts."""

    path: Path
    steps: np.ndarray
    metrics: dict[str, np.ndarray]
    eval_steps: np.ndarray
    evals: dict[str, np.ndarray]
    alerts: list[dict]
    config: dict = field(default_factory=dict)  # config.yaml: what actually ran

    def series(self, name: str) -> np.ndarray:
        if name not in self.metrics:
            raise DataError(f"{self.path / 'metrics.jsonl'} has no {name!r} values; was the run logged?")
        return self.metrics[name]

    def final_val_loss(self) -> float:
        values = self.evals.get("val_loss")
        return float(values[-1]) if values is not None and len(values) else math.nan

    def steps_trained(self) -> int:
        """Steps the run really trained: up to its first non-finite loss (divergence ends training in all but
        name), else its last logged step."""
        bad = np.flatnonzero(~np.isfinite(self.series("loss")))
        if len(bad):
            return int(self.steps[bad[0]]) - 1
        return int(self.steps[-1]) if len(self.steps) else 0

    def finite_grad_norms(self) -> int:
        """Steps with a finite pre-clip gradient norm: what ZClip counts toward its warm-up."""
        return int(np.isfinite(self.series("grad_norm_preclip")).sum())

    def setting(self, dotted: str, default: object = None) -> object:
        """One value of config.yaml by its dotted name (e.g. "clip.zclip_warmup")."""
        node: object = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def _columns(records: list[dict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    kept: dict[int, dict] = {}
    for rec in records:
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec.get("discarded") is not True:
            kept[rec["step"]] = rec
    steps = sorted(kept)
    keys = dict.fromkeys(k for s in steps for k in kept[s] if k != "step")
    values = {k: np.array([_float(kept[s].get(k, math.nan)) for s in steps]) for k in keys}
    return np.asarray(steps, dtype=np.int64), values


def read_run(path: Path) -> RunRecord:
    path = Path(path)
    metrics_path = path / "metrics.jsonl"
    if not metrics_path.is_file():
        raise DataError(f"{path} has no metrics.jsonl; is it a flowtrain run directory?")
    steps, metrics = _columns(read_jsonl(metrics_path))
    eval_steps, evals = _columns(read_jsonl(path / "eval.jsonl")) if (path / "eval.jsonl").is_file() else ([], {})
    alerts = read_jsonl(path / "alerts.jsonl") if (path / "alerts.jsonl").is_file() else []
    config_path = path / "config.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    eval_steps = np.asarray(eval_steps, dtype=np.int64)
    return RunRecord(path, steps, metrics, eval_steps, evals, alerts, config if isinstance(config, dict) else {})


@dataclass
class FlowTable:
    """flow.parquet of one run: rows of one kind ('layer' or 'depth') as [name, step] matrices per stat."""

    names: list[str]
    steps: np.ndarray
    stats: dict[str, np.ndarray]

    def at(self, stat: str, step: int) -> np.ndarray:
        """One stat for every row name at one step."""
        j = int(np.searchsorted(self.steps, step))
        if j >= len(self.steps) or self.steps[j] != step:
            raise DataError(f"flow.parquet has no step {step}; it has steps {self.steps[:3]}...")
        return self.stats[stat][:, j]


def read_flow_kind(path: Path, kind: str) -> FlowTable:
    """Pivot flow.parquet rows of `kind`; names keep their first-appearance order (h0..hL for depth)."""
    table = read_flow(Path(path) / "flow.parquet")
    sub = table.filter(pc.equal(table["kind"], kind))
    names_col = sub["name"].to_pylist()
    names = list(dict.fromkeys(names_col))
    if kind == "depth":
        names.sort(key=lambda n: int(n[1:]))
    steps = np.unique(sub["step"].to_numpy())
    row = {n: i for i, n in enumerate(names)}
    col = np.searchsorted(steps, sub["step"].to_numpy())
    idx = np.array([row[n] for n in names_col], dtype=np.int64)
    stats = {}
    for c in sub.column_names:
        if c in ("step", "name", "layer", "kind"):
            continue
        mat = np.full((len(names), len(steps)), np.nan)
        mat[idx, col] = sub[c].to_numpy().astype(np.float64)  # a replayed step: the last row wins
        stats[c] = mat
    return FlowTable(names, steps, stats)


def require(condition: bool, message: str) -> None:
    """A study's own settings were refused (e.g. a data set too small for its context): say which and why."""
    if not condition:
        raise ConfigError(message)
