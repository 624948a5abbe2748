"""What a run writes while it trains: metrics rows, the microscope's records, evaluations and alerts, to the
run directory's files, the console, TensorBoard and wandb. Only rank 0 writes; other ranks get silent sinks.

The loop hands logged steps to a RowBuffer (sinks/rows.py), which calls `write_rows` with a group of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from flowtrain.config import RunConfig
from flowtrain.flow.guard import Alert
from flowtrain.flow.records import FlowParquetWriter
from flowtrain.fsutil import atomic_write_text
from flowtrain.rundir import RunDir, write_env
from flowtrain.sinks.alerts import AlertFolder
from flowtrain.sinks.console import ConsoleSink
from flowtrain.sinks.jsonl import JsonlSink
from flowtrain.train.run_files import cut_back
from flowtrain.train.runtime import allocator
from flowtrain.train.step import StepOutput, TrainState


class Row(NamedTuple):
    """A logged step whose metrics row is not made yet: its numbers stay where train_step left them."""

    step: int
    out: StepOutput
    lr: float
    step_time: float  # seconds per step since the last logged step


class Silent:
    """Stands in for every sink on ranks other than 0: they compute what rank 0 records, and write nothing."""

    def write(self, *args, **kwargs) -> None:
        pass

    message = close = flush = mark_discarded_after = write


class RunLog:
    """The run's sinks, opened at the state's step (a resumed run first drops the lines past it).

    `on_record`: also called with every microscope record written (e.g. `flowtrain diagnose` keeps them).
    """

    def __init__(
        self,
        cfg: RunConfig,
        run: RunDir,
        state: TrainState,
        *,
        flops_per_token: float,
        peak_flops: float | None,
        continues: bool,
        write_config: bool = True,
        progress: bool = True,
        on_record: Callable[[Any], None] | None = None,
    ):
        self.cfg, self.state, self.monitor, self.guard = cfg, state, state.monitor, state.guard
        self.device, self.world_size = state.device, state.parallel.world_size
        self.flops_per_token, self.peak = flops_per_token, peak_flops
        self.on_record = on_record
        self.run, self.tb, self.flow_writer = run, None, None
        self.pending: list[Alert] = []  # written in step order at the next flush_alerts()
        self.folder = AlertFolder(cfg.guard.spike_window)
        self.last_loss: float | None = None  # of the last row written, and the last evaluation: the run's end
        self.last_eval: dict[str, float] = {}
        start_step = state.step
        if not state.parallel.is_main:
            self.metrics = self.alerts = self.evals = self.console = Silent()
            self.sinks: list = [self.metrics]
            return
        run.root.mkdir(parents=True, exist_ok=True)
        if continues:  # a resumed (or restarted) run: its files hold the history up to its start, nothing later
            redone = start_step == cfg.train.max_steps and cfg.train.eval_full_at_end
            cut_back(run, start_step, final_eval_redone=redone)
        if write_config:
            atomic_write_text(run.config, cfg.to_yaml())
        self.metrics = JsonlSink(run.metrics, flush_every=max(1, 50 // cfg.log.interval))
        self.alerts = JsonlSink(run.alerts)
        self.evals = JsonlSink(run.evals)
        if cfg.flow.enabled:
            self.flow_writer = FlowParquetWriter(run.flow, keep_before_step=start_step + 1 if start_step else None)
        self.console = ConsoleSink(cfg.train.max_steps, initial=start_step, enabled=progress)
        self.sinks = [self.metrics, self.console]  # the metrics rows go to each of these
        if cfg.log.tensorboard:
            from flowtrain.sinks.tensorboard import TensorBoardSink

            self.tb = TensorBoardSink(run.tensorboard, purge_step=start_step + 1 if continues else None)
            self.tb.write_config(start_step, cfg.to_yaml())  # what this process runs (a resume may override)
            self.sinks.append(self.tb)
        write_env(run, self.device, state.optimizer, allocator())
        if cfg.log.wandb:
            from flowtrain.sinks.wandb import WandbSink

            log = cfg.log
            self.sinks.append(
                WandbSink(log.wandb_project, log.wandb_mode, run.root.name, str(run.root), cfg.model_dump(mode="json"))
            )

    # ---- metrics rows and the microscope's records --------------------------------------------------------
    def write_rows(self, rows: list[Row]) -> None:
        """The metrics rows of the logged steps in `rows`, to every sink, in step order, with the microscope's
        records of every step since the last call (to flow.parquet, TensorBoard and the guard's record
        detectors; each record's scalars join its step's row). One host transfer for the rows' device numbers
        and one for the records, whatever their number. Not the time of the step it falls in."""
        with self.monitor.outside_step():
            self._write_rows(rows)

    def _write_rows(self, rows: list[Row]) -> None:
        per_row = [(r.out.loss, r.out.clip.grad_norm_preclip, r.out.clip.grad_norm_postclip, r.out.clip.clip_coef,
                    r.out.clip.clipped) for r in rows]  # fmt: skip
        values = torch.stack([v.float() for numbers in per_row for v in numbers]).view(len(rows), -1).tolist()
        mem_gb = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        records = self.monitor.collect_all(self.state.step)  # numbered back from the step done last
        written = 0
        for row, numbers in zip(rows, values, strict=True):
            scalars = self._scalars(row, numbers)
            if mem_gb is not None:
                scalars["mem_gb"] = mem_gb
            while written < len(records) and records[written].step <= row.step:  # its record and earlier ones
                record = records[written]
                self.write_record(record)
                if record.step == row.step:
                    scalars.update({k: v for k, v in record.scalars.items() if k not in scalars})
                written += 1
            for sink in self.sinks:
                sink.write(row.step, scalars)
            self.last_loss = scalars["loss"]
        for record in records[written:]:
            self.write_record(record)
        self.flush_alerts()  # every record up to the last step is in: its alerts and the steps' are complete

    def _scalars(self, row: Row, numbers: list[float]) -> dict[str, Any]:
        """One step's metrics row; `numbers`: its loss and clipping figures on the host (see write_rows)."""
        out, step_time = row.out, row.step_time
        tokens_per_s = out.tokens * self.world_size / step_time if step_time > 0 else 0.0  # all ranks
        scalars = {
            "loss": numbers[0],
            "lr": row.lr,
            "grad_norm_preclip": numbers[1],
            "grad_norm_postclip": numbers[2],
            "clip_coef": numbers[3],
            "clipped": bool(numbers[4]),
            "skipped": out.verdict.action == "skip",
            "tokens": row.step * out.tokens * self.world_size,
            "tokens_per_s": tokens_per_s,
            "step_time_ms": step_time * 1e3,
        }
        if self.peak:
            scalars["mfu"] = self.flops_per_token * tokens_per_s / (self.peak * self.world_size)
        return scalars

    def write_record(self, record) -> None:
        """A microscope record to flow.parquet, TensorBoard's per-layer series, the guard's record detectors and
        `on_record` (booked on the microscope's stopwatch: it is there because of the microscope)."""
        with self.monitor.booked():
            if self.flow_writer is not None:
                self.flow_writer.write(record)
            if self.tb is not None:
                self.tb.write_layers(record.step, record)
            alerts = self.guard.observe_record(record)
            if self.on_record is not None:
                self.on_record(record)
        for alert in alerts:
            self.alert(alert)

    def sync(self) -> None:
        """Everything written so far on disk (flushed and fsynced) and flow.parquet complete up to the step, the
        records not written yet included: the loop calls it before a checkpoint appears, so the run's files
        always hold the whole history of its newest checkpoint (a run resumed from it keeps what is before)."""
        if self.flow_writer is not None:
            step = self.state.step
            for record in self.monitor.collect_all(step):
                self.write_record(record)
            self.flow_writer.close()
            self.flow_writer = FlowParquetWriter(self.run.flow, keep_before_step=step + 1)
        self.flush_alerts(final=True)  # folds close at every checkpoint: a run resumed from it folds the same
        for sink in (self.metrics, self.evals, self.alerts):
            sink.flush()

    # ---- evaluations, alerts, rollbacks --------------------------------------------------------------------
    def write_eval(self, step: int, result: dict[str, float]) -> None:
        self.last_eval = result
        self.evals.write(step, result)
        for sink in self.sinks:
            if not isinstance(sink, (JsonlSink, ConsoleSink)):
                sink.write(step, result)
        self.console.message(
            f"step {step}: val loss {result['val_loss']:.4f}, ppl {result['val_ppl']:.2f}, "
            f"bits/byte {result['val_bpb']:.4f}"
        )

    def finish(self, best_val_loss: float | None, full_eval: dict[str, float]) -> None:
        """The run reached train.max_steps (every row written): its settings and final figures to TensorBoard's
        HParams view, the metrics as `final/*` scalars at the last step."""
        if self.tb is None:
            return
        from flowtrain.sinks.tensorboard import hparams_of

        final = {
            "final/train_loss": self.last_loss,
            "final/val_loss": self.last_eval.get("val_loss"),
            "final/val_bpb": self.last_eval.get("val_bpb"),
            "final/best_val_loss": best_val_loss,
            "final/val_loss_full": full_eval.get("val_loss"),
        }
        metrics = {k: float(v) for k, v in final.items() if v is not None}
        self.tb.write_hparams(self.state.step, hparams_of(self.cfg.model_dump(mode="json")), metrics)

    def alert(self, alert: Alert) -> None:
        """Queue an alert; flush_alerts writes the queue in step order (sinks/alerts.py folds repeats)."""
        self.pending.append(alert)

    def flush_alerts(self, final: bool = False) -> None:
        queued, self.pending = sorted(self.pending, key=lambda a: a.step), []
        for alert in queued:
            self._emit(*self.folder.add(alert.to_json()))
        if final:
            self._emit(*self.folder.close())

    def _emit(self, rows: list[dict], lines: list[str]) -> None:
        for row in rows:
            self.alerts.write(row["step"], {k: v for k, v in row.items() if k != "step"})
        for line in lines:
            self.console.message(line)

    def mark_discarded_after(self, step: int) -> None:
        """After a rollback to `step`: the undone steps' metrics and evaluations stay, flagged as discarded."""
        for sink in (self.metrics, self.evals):
            sink.mark_discarded_after(step)

    def close(self) -> None:
        self.flush_alerts(final=True)
        self.evals.close()
        for sink in self.sinks:
            sink.close()
        self.alerts.close()
        if self.flow_writer is not None:
            self.flow_writer.close()
