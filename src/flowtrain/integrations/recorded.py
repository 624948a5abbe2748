"""`flowtrain diagnose RUN` on a run flowtrain observed (integrations: no flowtrain config, no checkpoint to re-run
from): the health model's verdict over the last monitored steps as they were recorded, with the run's own guard
thresholds. Nothing is re-run, so nothing is assumed about the loop that trained it."""

from __future__ import annotations

from pathlib import Path

import pydantic

from flowtrain.config import parse_yaml, read_text
from flowtrain.errors import DataError, FlowtrainError
from flowtrain.flow.diagnose import Diagnosis, diagnose
from flowtrain.flow.guard import GuardConfig
from flowtrain.flow.health import Context
from flowtrain.flow.stored import read_records
from flowtrain.integrations.recorder import OBSERVED
from flowtrain.rundir import RunDir
from flowtrain.sinks.jsonl import read_jsonl


def observed_config(run_dir: Path) -> dict | None:
    """The config.yaml of a run an integration wrote (it has an `observed` section), else None (also when it
    cannot be read: the reading of a flowtrain run's config then names the fix, its checkpoint's copy)."""
    path = RunDir(Path(run_dir)).config
    if not path.is_file():
        return None
    fix = "restore it, or pass a run directory flowtrain wrote"
    try:
        config = parse_yaml(read_text(path, fix), str(path), fix)
    except FlowtrainError:
        return None
    return config if isinstance(config, dict) and isinstance(config.get(OBSERVED), dict) else None


def diagnose_recorded(run_dir: Path, steps: int, config: dict) -> tuple[Diagnosis, str]:
    """(diagnosis of the last `steps` monitored steps, where they came from)."""
    run = RunDir(Path(run_dir))
    try:
        thresholds = GuardConfig(**(config.get("guard") or {}))
    except pydantic.ValidationError as exc:
        why = exc.errors()[0]["msg"]
        raise DataError(f"{run.config}: its guard section is not valid ({why}); restore it") from None
    scalars = {row["step"]: row for row in read_jsonl(run.metrics)} if run.metrics.is_file() else {}
    records = read_records(run.flow, steps, scalars, config.get("unavailable") or {})
    if not records:
        raise DataError(f"{run.flow} has no monitored step; was the flow monitor enabled in that loop?")
    clip = config.get("clip") or {}
    result = diagnose(records, thresholds, Context(clip_kind=clip.get("kind")))
    loop = config[OBSERVED].get("loop", "another loop")
    span = f"step {records[0].step}" if len(records) == 1 else f"steps {records[0].step}..{records[-1].step}"
    return result, f"run {run_dir} recorded by {loop}, its last {len(records)} monitored step(s) ({span}) as recorded"
