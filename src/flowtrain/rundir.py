"""The run directory: the contract between training and everything that reads a run (report, diagnose, lab).

See docs/run-dir.md for the schema. Paths are named here once so no reader spells them differently; it lives
outside train/ so that readers never import the trainer.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from flowtrain import __version__
from flowtrain.fsutil import atomic_write_text

RUN_DIR_VERSION = 1
LOCK_FILE = ".lock"  # flock'ed by the run's writer (train/run_files.py); holds its PID and host
# Fields whose values depend on wall-clock time or on the process's history, not on the training: two runs of
# one config (one of them interrupted and resumed, say) differ only in these (docs/run-dir.md). flow_interval
# too while flow.interval=auto chooses it from timings.
TIMING_FIELDS = frozenset({"tokens_per_s", "step_time_ms", "mfu", "mem_gb", "flow_ms", "flow_interval"})


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def evals(self) -> Path:
        return self.root / "eval.jsonl"

    @property
    def flow(self) -> Path:
        return self.root / "flow.parquet"

    @property
    def alerts(self) -> Path:
        return self.root / "alerts.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def env(self) -> Path:
        return self.root / "env.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"


def _finite(value, path: str, found: list[str]):
    if isinstance(value, float) and not math.isfinite(value):
        found.append(path)
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    return value


def summary_json(summary: dict) -> str:
    """summary.json's text, strict JSON: a non-finite number (a diverged run's NaN loss) is written as null and
    its key listed under "nonfinite", so every JSON parser reads the file and the fact is not lost."""
    found: list[str] = []
    clean = _finite(summary, "", found)
    if found:
        clean["nonfinite"] = found
    return json.dumps(clean, indent=1, allow_nan=False)


def default_run_name() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _optimizer_step(optimizer) -> str:
    """Which torch implementation takes the optimizer step (fused, foreach or the for-loop)."""
    if optimizer is None:
        return "unknown"
    halves = getattr(optimizer, "halves", None)  # optim/muon.py: torch's Muon and AdamW as one
    if halves:
        return " + ".join(_optimizer_step(h) for h in halves)
    kind = next((k for k in ("fused", "foreach") if optimizer.defaults.get(k)), "for-loop")
    return f"{type(optimizer).__name__}: torch's {kind} step"


def write_env(run: RunDir, device: torch.device, optimizer=None, cpu_allocator: str = "default (not tuned)") -> None:
    """Versions and machine facts, so a report can say what produced the numbers. `cpu_allocator`: what the
    process did to its CPU allocator (train/runtime.py: allocator())."""
    env = {
        "run_dir_version": RUN_DIR_VERSION,
        "flowtrain_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "num_threads": torch.get_num_threads(),
        "cpu_allocator": cpu_allocator,
        "optimizer_step": _optimizer_step(optimizer),
        "git_commit": _git_commit(),
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    atomic_write_text(run.env, json.dumps(env, indent=1))
