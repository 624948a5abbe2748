"""The run directory of a training loop flowtrain observes but does not run (transformers' Trainer, Lightning,
a plain loop): the files `flowtrain train` writes (docs/run-dir.md), so `flowtrain report` and `flowtrain
diagnose` read it like any run.

config.yaml holds what is known instead of a flowtrain config: an `observed` section (which loop, its versions
and settings), the model's structure as the monitor found it, the optimizer's hyperparameters, the loop's
clipping, the flow and guard settings, and `unavailable` (statistics the microscope cannot measure on this model,
with the reason). The guard's detectors run as warnings only: an observer never changes the training.

Rows are written in groups (`flush_rows` steps: one host transfer for their numbers and one for the records);
the guard's warnings for a group's steps are written and logged (logger "flowtrain") when the group is.
"""

from __future__ import annotations

import logging
import math
import platform
from pathlib import Path
from typing import Any

import torch
import yaml

from flowtrain.errors import ConfigError, RunDirError
from flowtrain.flow.config import FlowConfig
from flowtrain.flow.guard import Alert, Guard, GuardConfig
from flowtrain.flow.health import Context
from flowtrain.flow.monitor import FlowMonitor
from flowtrain.flow.records import FlowParquetWriter
from flowtrain.fsutil import DirectoryLock, Locked, atomic_write_text
from flowtrain.optim.clipping import ClipStats
from flowtrain.rundir import LOCK_FILE, RunDir, summary_json, write_env
from flowtrain.sinks.alerts import AlertFolder
from flowtrain.sinks.jsonl import JsonlSink

log = logging.getLogger("flowtrain")
ACTIONS = ("nonfinite", "loss_spike", "grad_spike", "divergence")  # the guard's acting detectors
OBSERVED = "observed"  # config.yaml's marker of a run flowtrain observed (integrations/recorded.py reads it)


def warn_only(guard: GuardConfig | None) -> GuardConfig:
    """The guard for an observed loop: every detector warns, or is off; an acting one set explicitly is refused
    (the acting defaults, skip and rollback, become warn)."""
    guard = guard or GuardConfig()
    for key in ACTIONS:
        if key in guard.model_fields_set and getattr(guard, key) not in ("warn", "off"):
            raise ConfigError(
                f"guard.{key}={getattr(guard, key)}: flowtrain only watches a loop it does not run, it never acts on "
                "it; set it to warn or off"
            )
    acting = {k: "warn" for k in ACTIONS if getattr(guard, k) not in ("warn", "off")}
    return guard.model_copy(update=acting)


def single_process() -> None:
    """The integrations observe one process (each rank would write its own partial picture)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RunDirError(
            f"flowtrain's integrations observe one process, and this job has {dist.get_world_size()}; run it in "
            "one process, or use `flowtrain train` for data-parallel runs (docs/integrations.md)"
        )


def clip_stats(pre: torch.Tensor, post: torch.Tensor) -> ClipStats:
    """What the loop's clipping did, from the global norms measured before and after it (device tensors)."""
    pre, post = pre.detach().float(), post.detach().float()
    coef = torch.where(pre > 0, post / pre, torch.ones_like(pre))
    return ClipStats(pre, post, coef, post < pre * (1 - 1e-6))  # rounding of the two measurements is no clip


def grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients present now (NaN when none)."""
    from flowtrain import tensorstats

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.full((), float("nan"))
    return tensorstats.sums_of_squares(grads).sum().sqrt()


def _claim(root: Path) -> DirectoryLock:
    try:
        held = DirectoryLock.acquire(root, LOCK_FILE, create=True)
    except Locked as exc:
        raise RunDirError(
            f"run directory {root} is in use by another process ({exc.holder}); pass another run_dir"
        ) from None
    except OSError as exc:
        raise RunDirError(f"cannot write in run directory {root} ({exc.strerror}); pass a writable run_dir") from None
    if any(p.name != LOCK_FILE for p in root.iterdir()):
        held.release()
        raise RunDirError(f"run directory {root} already exists and is not empty; pass a new run_dir")
    return held


def _plain(value: Any) -> Any:
    """A value as YAML can hold it (numbers, strings, lists), else its text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, str)):
        return type(value).__base__(value) if type(value) not in (int, str) else value  # str subclasses as str
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def optimizer_facts(optimizer) -> dict:
    """Class and first parameter group's hyperparameters (the first group is what most loops have)."""
    if optimizer is None:
        return {}
    group = {k: _plain(v) for k, v in optimizer.param_groups[0].items() if k != "params"}
    return {"class": type(optimizer).__name__, "param_groups": len(optimizer.param_groups), **group}


class Recorder:
    """A FlowMonitor, a warn-only Guard and the run directory's writers for one observed loop.

    The loop's adapter calls `monitor.after_backward()` / `monitor.after_step(clip)` at the right moments and
    `step_done(...)` once per optimizer step; `close()` at the end."""

    def __init__(
        self,
        run_dir: str | Path,
        model: torch.nn.Module,
        optimizer,
        *,
        loop: dict,
        clip: dict,
        flow: FlowConfig | None = None,
        guard: GuardConfig | None = None,
        blocks=None,
        head=None,
        start_step: int = 0,
        tensorboard: bool = True,
        flush_rows: int = 10,
    ) -> None:
        single_process()
        guard_cfg = warn_only(guard)
        self.flow_cfg = flow or FlowConfig()
        if not tensorboard:  # histograms are only drawn by TensorBoard
            self.flow_cfg = self.flow_cfg.model_copy(update={"histogram_interval": 0})
        self.monitor = FlowMonitor(model, optimizer, self.flow_cfg, blocks=blocks, head=head, start_step=start_step)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.guard = Guard(guard_cfg, named, host_every_step=True, context=Context(clip_kind=clip.get("kind")))
        self.run = RunDir(Path(run_dir))
        self.lock = _claim(self.run.root)
        config = {
            OBSERVED: {**loop, "python": platform.python_version(), "torch": torch.__version__},
            "model": self.monitor.structure,
            "optimizer": optimizer_facts(optimizer),
            "clip": clip,
            "flow": self.flow_cfg.model_dump(mode="json"),
            "guard": guard_cfg.model_dump(mode="json"),
            "unavailable": dict(self.monitor.unavailable),
        }
        atomic_write_text(self.run.config, yaml.safe_dump(_plain(config), sort_keys=False))
        device = self.params[0].device if self.params else torch.device("cpu")
        write_env(self.run, device, optimizer)
        self.metrics = JsonlSink(self.run.metrics, flush_every=50)
        self.alerts = JsonlSink(self.run.alerts)
        self.flow_writer = FlowParquetWriter(self.run.flow) if self.flow_cfg.enabled else None
        self.tb = None
        if tensorboard:
            from flowtrain.sinks.tensorboard import TensorBoardSink

            self.tb = TensorBoardSink(self.run.tensorboard)
        self.folder = AlertFolder(guard_cfg.spike_window)
        self.flush_rows = flush_rows
        self.rows: list[tuple] = []
        self.steps = 0
        self.last_record = None  # the newest microscope record written

    def step_done(self, step: int, loss: torch.Tensor | float | None, clip: ClipStats, lr: float | None) -> None:
        """One optimizer step finished (its after_step was called): its row waits for the group's write."""
        self.rows.append((step, loss, clip, lr))
        self.steps = step
        if len(self.rows) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Write the waiting rows, the microscope's records up to them and the guard's warnings."""
        if not self.rows:
            return
        rows, self.rows = self.rows, []
        with self.monitor.outside_step():
            self._write(rows)

    def _write(self, rows: list[tuple]) -> None:
        device = self.monitor.params.device if self.monitor.params is not None else torch.device("cpu")
        numbers = [[float("nan") if loss is None else loss, c.grad_norm_preclip, c.grad_norm_postclip, c.clip_coef,
                    c.clipped] for _, loss, c, _ in rows]  # fmt: skip
        flat = [torch.as_tensor(v, device=device).detach().float().reshape(()) for r in numbers for v in r]
        host = torch.stack(flat).cpu().view(len(rows), -1)  # one transfer for the group
        records = self.monitor.collect_all(rows[-1][0])
        alerts: list[Alert] = []
        written = 0
        for (step, loss, _, lr), values in zip(rows, host, strict=True):
            loss_v, pre, post, coef, clipped = values.tolist()
            scalars: dict[str, Any] = {"loss": loss_v} if loss is not None else {}
            if lr is not None:
                scalars["lr"] = float(lr)
            scalars.update(grad_norm_preclip=pre, grad_norm_postclip=post, clip_coef=coef, clipped=bool(clipped))
            if loss is not None:  # without the loss the per-step detectors have nothing to judge
                verdict = self.guard.check(step, values[0], values[1], host_now=True, clipped=values[4])
                alerts += verdict.alerts
            while written < len(records) and records[written].step <= step:
                alerts += self._write_record(records[written])
                if records[written].step == step:
                    scalars.update({k: v for k, v in records[written].scalars.items() if k not in scalars})
                written += 1
            self.metrics.write(step, scalars)
            if self.tb is not None:
                self.tb.write(step, scalars)
        for record in records[written:]:
            alerts += self._write_record(record)
        for alert in sorted(alerts, key=lambda a: a.step):
            self._emit(*self.folder.add(alert.to_json()))

    def _write_record(self, record) -> list[Alert]:
        with self.monitor.booked():
            if self.flow_writer is not None:
                self.flow_writer.write(record)
            if self.tb is not None:
                self.tb.write_layers(record.step, record)
            self.last_record = record
            return self.guard.observe_record(record)

    def _emit(self, rows: list[dict], lines: list[str]) -> None:
        for row in rows:
            self.alerts.write(row["step"], {k: v for k, v in row.items() if k != "step"})
        for line in lines:
            log.warning(line)

    def close(self) -> None:
        """Write everything, detach the hooks, mark the run finished (summary.json) and release the directory."""
        if self.lock is None:
            return
        try:
            self.flush()
            self._emit(*self.folder.close())
            for sink in (self.metrics, self.alerts):
                sink.close()
            if self.tb is not None:
                self.tb.close()
            if self.flow_writer is not None:
                self.flow_writer.close()
            atomic_write_text(self.run.summary, summary_json({"steps": self.steps}))
        finally:
            self.monitor.remove()
            self.lock.release()
            self.lock = None
