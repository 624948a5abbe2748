"""The trainer: builds every component from the config, then runs the step in a loop with evaluation,
checkpoints, logging and a closing sample hung around it.

Training-loop math lives in train/step.py; this module is bookkeeping. Resume is exact on CPU: model,
optimizer, schedule, loader position, clipper state and RNG state all come back from the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml

from flowtrain.config import RunConfig, build_config
from flowtrain.data.dataset import TokenDataset
from flowtrain.data.loader import BatchLoader, eval_batches
from flowtrain.data.prepare import dataset_for
from flowtrain.data.tokenizers import tokenizer_from_json
from flowtrain.errors import CheckpointError, ConfigError, DataError, GuardStop
from flowtrain.flow.guard import Alert, Guard
from flowtrain.flow.monitor import FlowMonitor
from flowtrain.flow.records import FlowParquetWriter
from flowtrain.fsutil import atomic_write_text
from flowtrain.model.gpt import GPT
from flowtrain.optim.clipping import GradClipper
from flowtrain.optim.optimizers import build_optimizer
from flowtrain.optim.schedules import build_scheduler
from flowtrain.sample import generate
from flowtrain.sinks.console import ConsoleSink
from flowtrain.sinks.jsonl import JsonlSink
from flowtrain.train import checkpoint as ckpt
from flowtrain.train import distributed as dist_util
from flowtrain.train import recovery
from flowtrain.train.evaluate import evaluate
from flowtrain.train.rundir import RunDir, default_run_name, write_env
from flowtrain.train.runtime import (
    rng_state,
    seed_everything,
    select_device,
    select_precision,
    set_rng_state,
    tune_cpu_allocator,
)
from flowtrain.train.step import StepOutput, train_step

# bf16 dense matmul peaks (FLOP/s) of common accelerators, for MFU when train.peak_tflops is unset.
_KNOWN_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


@dataclass
class RunSummary:
    run_dir: Path
    steps: int
    final: dict[str, float] = field(default_factory=dict)
    best_val_loss: float | None = None
    sample: str = ""


class _Row(NamedTuple):
    """A logged step whose metrics row is not made yet: its numbers stay where train_step left them."""

    step: int
    out: StepOutput
    lr: float
    step_time: float  # seconds per step since the last logged step


class Trainer:
    """Builds the run described by `cfg` (or resumes `resume_dir`) and trains it."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        resume_dir: Path | None = None,
        stop_after: int | None = None,
        progress: bool | None = None,
    ):
        self.resume_from = None
        if resume_dir is not None:
            resume_dir, self.resume_from = self._find_resume_checkpoint(Path(resume_dir))
        self.cfg = cfg
        self.stop_after = stop_after
        tc = cfg.train
        # distributed (torchrun): join the group first; the device is then cuda:LOCAL_RANK or cpu
        self.dist, dist_device = dist_util.init_distributed(tc.parallel, tc.device)
        self.world_size, self.is_main = self.dist.world_size, self.dist.is_main
        self.device = dist_device or select_device(tc.device)
        if self.device.type == "cpu" and tc.tune_allocator:
            tune_cpu_allocator()
        self.precision = select_precision(tc.dtype, self.device)
        seed_everything(tc.seed)

        # data: prepare (or reuse) the token files, then the tokenizer decides the vocabulary
        with self._main_first():
            self.dataset = TokenDataset.open(dataset_for(cfg.data))
        self.tokenizer = self.dataset.tokenizer
        if self.resume_from is not None:
            saved = tokenizer_from_json(self.resume_from.tokenizer_json)
            if saved.fingerprint != self.tokenizer.fingerprint:
                raise DataError(
                    f"the data at {self.dataset.path} was made with a different tokenizer than the checkpoint "
                    f"{self.resume_from.path}; prepare the data with the run's tokenizer"
                )
        vocab = self.tokenizer.vocab_size
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = vocab
        elif cfg.model.vocab_size < vocab:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab}; unset it"
            )

        # model (sharded in place by FSDP2 before the optimizer sees its parameters), optimizer, schedule, clipping
        self.raw_model = GPT(cfg.model).to(self.device)
        wrapped = dist_util.wrap_model(self.raw_model, self.dist, self.device, tc.dtype == "bfloat16")
        self.optimizer = build_optimizer(self.raw_model, cfg.optim, self.device.type)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.optim.lr, tc.max_steps, cfg.model.n_embd)
        self.clipper = GradClipper(cfg.clip)
        self.named_params = [(n, p) for n, p in self.raw_model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision.needs_grad_scaler else None
        self.loss_options = {"label_smoothing": tc.label_smoothing, "z_loss": tc.z_loss}
        # micro-batch slot i of every step is read by its own stream, so the global batch is the same on any
        # world size; this rank runs its share of the slots
        self.slots = dist_util.SlotLoaders(self._slot_loader, self.dist, tc.grad_accum, self._comm_device)
        self.grad_accum = self.slots.per_rank  # micro-batches per rank
        self.loader = self.slots.loaders[0]
        self.guard = Guard(cfg.guard, self.named_params, host_every_step=self.device.type != "cuda")
        self.step = 0
        self.snapshot: dict[str, Any] | None = None  # last good state in memory (train/recovery.py)
        self.lr_scale = 1.0
        self.best_val_loss: float | None = None
        self.best_step: int | None = None

        # run directory
        if self.resume_from is not None:
            self.run = RunDir(Path(resume_dir))
        else:
            name = tc.run_name or default_run_name()
            if self.dist.enabled:  # the default name is a timestamp: take rank 0's
                name = dist_util.broadcast_json(name, self._comm_device)
            self.run = RunDir(Path(tc.out_dir) / name)
            if self.run.root.exists() and any(self.run.root.iterdir()):
                raise ConfigError(
                    f"run directory {self.run.root} already exists; resume it with --resume {self.run.root} "
                    "or choose another train.run_name"
                )
            dist_util.barrier()  # every rank has looked before rank 0 creates it
        if self.resume_from is not None:
            self._restore(self.resume_from)
        # the microscope attaches hooks from outside; monitoring off builds it disabled (no hooks, no copies)
        flow_cfg = dist_util.flow_config_for(cfg.flow, self.dist)
        self.flow = FlowMonitor(
            self.raw_model, self.optimizer, flow_cfg, start_step=self.step, sync=self.world_size > 1
        )
        self.flow.backward_scale = self.world_size  # each rank's loss is scaled by it (see train/step.py)
        self.model = torch.compile(wrapped) if tc.compile else wrapped
        self.progress = cfg.log.console if progress is None else progress

    # ---- distributed helpers ----------------------------------------------------------------------
    def _slot_loader(self, slot: int) -> BatchLoader:
        tc, cfg = self.cfg.train, self.cfg
        return BatchLoader(
            self.dataset,
            "train",
            batch_size=tc.batch_size,
            block_size=cfg.model.block_size,
            mode=cfg.data.loader,
            seed=tc.seed,
            rank=slot,
            world_size=tc.grad_accum,
            doc_mask=cfg.data.doc_mask,
            bucket_by_length=cfg.data.bucket_by_length,
        )

    @property
    def _comm_device(self) -> torch.device:
        """Where collective tensors live: the GPU for nccl, the CPU for gloo."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    @contextlib.contextmanager
    def _main_first(self):
        """Rank 0 does the work (e.g. prepares the shared data cache) before the others read its result."""
        if self.dist.enabled and not self.is_main:
            dist_util.barrier()
        yield
        if self.dist.enabled and self.is_main:
            dist_util.barrier()

    def micro_batches(self) -> list:
        """This rank's micro-batches of the next step: one from each of its slot loaders."""
        return self.slots.next_step()

    def global_targets(self, local: int) -> int:
        """Real targets in the whole global batch: the denominator of the step's mean loss."""
        if self.world_size == 1:
            return local
        if self.cfg.data.loader == "varlen":  # padded rows: counts differ by rank
            return dist_util.global_count(local, self._comm_device)
        return local * self.world_size  # random / packed rows are full: every rank has the same count

    def grad_sync(self, last: bool):
        """Context for one micro-batch's backward: DDP all-reduces only on the last one."""
        return dist_util.grad_sync(self.model, self.dist, last)

    def global_loss(self, local: torch.Tensor) -> torch.Tensor:
        return dist_util.all_reduce_sum(local) if self.world_size > 1 else local

    def agree(self, verdict):
        """The guard's decision, made identical on every rank (the strongest one wins)."""
        if self.world_size == 1:
            return verdict
        host_ran = self.cfg.guard.enabled and (self.guard.host_every_step or self.host_checks_now())
        return dist_util.agree_on_verdict(verdict, host_ran, self._comm_device, self.guard)

    def to_device(self, batch):
        doc_ids = batch.doc_ids.to(self.device, non_blocking=True) if batch.doc_ids is not None else None
        return (
            batch.inputs.to(self.device, non_blocking=True),
            batch.targets.to(self.device, non_blocking=True),
            doc_ids,
        )

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale_gradients(self) -> None:
        if self.scaler:
            # activation gradients seen by the microscope's hooks carry the loss scale too (a device tensor)
            self.flow.backward_scale = self.world_size * self.scaler._scale.detach().clone()
            self.scaler.unscale_(self.optimizer)

    def host_checks_now(self) -> bool:
        """Whether the guard reads numbers on the host this step (always on CPU; on GPU at logging steps)."""
        return self.device.type != "cuda" or (self.step + 1) % self.cfg.log.interval == 0

    def optimizer_step(self, skip: torch.Tensor | None = None) -> None:
        """Apply the update unless `skip` (a device bool) is set.

        Fused torch optimizers take the decision as a tensor (`found_inf`, the GradScaler mechanism) and leave
        weights, moments and step counts untouched in-kernel, so no host sync is needed; otherwise we branch
        on the host.
        """
        if self.scaler:
            if skip is None or not bool(skip):
                self.scaler.step(self.optimizer)
            self.scaler.update()
        elif skip is None:
            self.optimizer.step()
        elif self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = skip.float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not bool(skip):
            self.optimizer.step()

    # ---- state: checkpoints on disk, last-good snapshots in memory ------------------------------------
    @staticmethod
    def _find_resume_checkpoint(path: Path) -> tuple[Path, ckpt.Checkpoint]:
        """(run directory, checkpoint) for a run directory (its latest checkpoint) or a checkpoint directory."""
        if path.parent.name == "checkpoints":
            return path.parent.parent, ckpt.read_checkpoint(path)
        if not path.is_dir():
            raise CheckpointError(f"cannot resume {path}: no such run directory")
        latest = ckpt.latest_checkpoint(RunDir(path).checkpoints)
        if latest is None:
            raise CheckpointError(f"cannot resume {path}: it has no complete checkpoint; start a new run instead")
        return path, ckpt.read_checkpoint(latest)

    def training_state(self) -> dict[str, Any]:
        """Everything besides weights, optimizer tensors and RNG that a resumed run needs, as plain JSON."""
        state: dict[str, Any] = {
            "scheduler": self.scheduler.state_dict(),
            "loader": self.slots.state_dict(),
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "guard": self.guard.state_dict(),
            "lr_scale": self.lr_scale,
        }
        if hasattr(self.clipper, "state_dict"):
            state["clipper"] = self.clipper.state_dict()
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.slots.load_state_dict(state["loader"])
        if "clipper" in state and hasattr(self.clipper, "load_state_dict"):
            self.clipper.load_state_dict(state["clipper"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.guard.load_state_dict(state["guard"])
        self.best_val_loss = state.get("best_val_loss")
        self.best_step = state.get("best_step")
        self.lr_scale = state.get("lr_scale", 1.0)  # guard rollbacks' LR factors so far

    def _restore(self, c: ckpt.Checkpoint) -> None:
        ckpt.restore_model(c, self.raw_model)
        ckpt.restore_optimizer(c, self.optimizer, self.raw_model)  # before the scheduler: it carries the LRs
        set_rng_state(ckpt.restore_rng(c))
        self.load_training_state(c.state)
        self.step = c.step

    def save_checkpoint(self) -> Path:
        path = ckpt.save_checkpoint(
            self.run.checkpoints,
            self.step,
            model=self.raw_model,
            optimizer=self.optimizer,
            rng=rng_state(),
            state=self.training_state(),
            tokenizer_json=self.tokenizer.to_json(),
            config_yaml=self.cfg.to_yaml(),
            layout=self.cfg.train.checkpoint_format,
        )
        if self.is_main:
            keep = {self.best_step} if self.best_step is not None else set()
            ckpt.prune_checkpoints(self.run.checkpoints, self.cfg.train.keep_last, keep)
        dist_util.barrier()
        if self.flow_writer is not None:  # make flow.parquet complete up to this checkpoint
            self._write_flow_records()
            self.flow_writer.close()
            self.flow_writer = FlowParquetWriter(self.run.flow, keep_before_step=self.step + 1)
        return path

    # ---- the loop --------------------------------------------------------------------------------
    def _open_sinks(self) -> list:
        if not self.is_main:  # only rank 0 writes the run directory and prints
            self.metrics_sink = self.alerts_sink = _Silent()
            self.console, self.tb, self.flow_writer = _Silent(), None, None
            return [self.metrics_sink]
        self.run.root.mkdir(parents=True, exist_ok=True)
        if self.resume_from is None:
            atomic_write_text(self.run.config, self.cfg.to_yaml())
        else:
            for path in (self.run.metrics, self.run.evals, self.run.alerts):
                JsonlSink.truncate_after(path, self.step)
        self.metrics_sink = JsonlSink(self.run.metrics, flush_every=max(1, 50 // self.cfg.log.interval))
        self.alerts_sink = JsonlSink(self.run.alerts)
        self.flow_writer = (
            FlowParquetWriter(self.run.flow, keep_before_step=self.step + 1 if self.step else None)
            if self.cfg.flow.enabled
            else None
        )
        sinks: list = [self.metrics_sink]
        self.console = ConsoleSink(self.cfg.train.max_steps, initial=self.step, enabled=self.progress)
        sinks.append(self.console)
        self.tb = None
        if self.cfg.log.tensorboard:
            from flowtrain.sinks.tensorboard import TensorBoardSink

            self.tb = TensorBoardSink(self.run.tensorboard, purge_step=self.step + 1 if self.step else None)
            sinks.append(self.tb)
        write_env(self.run, self.device, self.optimizer)
        if self.cfg.log.wandb:
            from flowtrain.sinks.wandb import WandbSink

            sinks.append(
                WandbSink(
                    self.cfg.log.wandb_project,
                    self.cfg.log.wandb_mode,
                    self.run.root.name,
                    str(self.run.root),
                    self.cfg.model_dump(mode="json"),
                )
            )
        return sinks

    def _peak_flops(self) -> float | None:
        if self.cfg.train.peak_tflops:
            return self.cfg.train.peak_tflops * 1e12
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            return next((v for k, v in _KNOWN_PEAKS.items() if k in name), None)
        return None

    def evaluate(self, full: bool = False) -> dict[str, float]:
        """Every rank evaluates the same fixed batches (FSDP's forward is collective); rank 0 records."""
        batches = eval_batches(
            self.dataset,
            "val",
            self.cfg.train.batch_size,
            self.cfg.model.block_size,
            None if full else self.cfg.train.eval_batches,
        )
        return evaluate(
            self.raw_model if self.dist.strategy == "ddp" else self.model,  # DDP: no collectives needed
            batches,
            device=self.device,
            precision=self.precision,
            bytes_per_token=self.dataset.bytes_per_token("val"),
        )

    def _record_eval(self, evals: JsonlSink, result: dict[str, float]) -> None:
        if not result:
            return
        evals.write(self.step, result)
        for sink in self.sinks:
            if not isinstance(sink, (JsonlSink, ConsoleSink)):
                sink.write(self.step, result)
        if self.best_val_loss is None or result["val_loss"] < self.best_val_loss:
            self.best_val_loss, self.best_step = result["val_loss"], self.step
        self.console.message(
            f"step {self.step}: val loss {result['val_loss']:.4f}, ppl {result['val_ppl']:.2f}, "
            f"bits/byte {result['val_bpb']:.4f}"
        )

    def _alert(self, alert: Alert) -> None:
        self.alerts_sink.write(alert.step, {k: v for k, v in alert.to_json().items() if k != "step"})
        self.console.message(
            f"[guard] step {alert.step}: {alert.detector} -> {alert.action}: {alert.explanation}. "
            f"Try: {alert.suggestion}"
        )

    def _act_on(self, verdict) -> bool:
        """Log the verdict's alerts and carry out rollback / stop. True when the step was rolled back."""
        for alert in verdict.alerts:
            self._alert(alert)
        if verdict.action == "stop":
            detectors = ", ".join(sorted({a.detector for a in verdict.alerts})) or "repeated skips"
            message = (
                f"stopped by the guard at step {self.step}: {detectors} after "
                f"{self.guard.rollbacks} rollback(s) (budget guard.max_rollbacks={self.cfg.guard.max_rollbacks}); "
                f"checkpoints in {self.run.checkpoints} are intact: lower optim.lr or check the data, then --resume"
            )
            self._alert(Alert(self.step, "guard", "stop", {"rollbacks": float(self.guard.rollbacks)}, message, ""))
            raise GuardStop(message)
        if verdict.action == "rollback":
            event = self.step
            what = recovery.roll_back(self, event)
            self._alert(Alert(event, "guard", "rollback", {"to_step": float(self.step)}, what, ""))
            return True
        return False

    def run_loop(self) -> RunSummary:
        """Train to the end (max_steps, or stop_after): every iteration of steps(), then the run's summary."""
        for _ in self.steps():
            pass
        return self._finish()

    def steps(self) -> Iterator[int]:
        """The training loop one iteration at a time: yields the step number after each step, its logging, guard
        action and side work (snapshot, eval, checkpoint). The sinks open at the first next() and close when the
        loop ends or the generator is closed; run_loop() is this plus the run's end. Benchmarks drive two runs
        side by side with it."""
        tc = self.cfg.train
        self.final_eval: dict[str, float] = {}
        self.sinks = sinks = self._open_sinks()
        evals = self.evals_sink = JsonlSink(self.run.evals) if self.is_main else _Silent()
        peak = self._peak_flops()
        flops_per_token = self.raw_model.flops_per_token()
        self.model.train()
        end = tc.max_steps if self.stop_after is None else min(tc.max_steps, self.stop_after)
        log = self.cfg.log
        rows: list[_Row] = []  # logged steps whose rows are not written yet (see _write_rows)
        last_time = rows_since = time.perf_counter()

        def write_rows() -> None:
            if rows:
                group = rows.copy()
                rows.clear()  # first: a group cut short by an error is not written twice by the `finally` below
                with self.flow.outside_step():  # not the time of the step it falls in (interval: auto)
                    self._write_rows(group, sinks, flops_per_token, peak)

        try:
            while self.step < end:
                lr = self.optimizer.param_groups[0]["lr"]
                out = train_step(self)
                self.step += 1
                acting = out.verdict.action in ("rollback", "stop")
                logging = acting or self.step % log.interval == 0 or self.step == end
                if logging and self.is_main:
                    now = time.perf_counter()
                    steps = log.interval if self.step % log.interval == 0 else 1
                    elapsed, last_time = (now - last_time) / steps, now
                    if not rows:
                        rows_since = now
                    rows.append(_Row(self.step, out, lr, elapsed))
                    # write now if the oldest row would wait past flush_seconds for the next logged step
                    late = now - rows_since + log.interval * elapsed >= log.flush_seconds
                    if acting or late or len(rows) >= log.flush_rows:
                        write_rows()
                elif not self.is_main:
                    self.flow.discard()  # other ranks measure (their sums join rank 0's) but write nothing
                if self._act_on(out.verdict):  # rolled back: the loop goes on from the restored step
                    last_time = time.perf_counter()
                    yield self.step
                    continue
                snap = self.cfg.guard.snapshot_interval
                evaluation = self.step % tc.eval_interval == 0 or self.step == tc.max_steps
                checkpoint = self.step % tc.checkpoint_interval == 0 or self.step == end
                if evaluation or checkpoint:
                    write_rows()  # metrics and flow records complete up to here (booked as step time)
                side_work_started = time.perf_counter()  # snapshots, evals, checkpoints: not step time
                if snap and self.step % snap == 0 and out.verdict.action == "proceed" and not out.verdict.alerts:
                    self.snapshot = recovery.take_snapshot(self)
                if evaluation:
                    self._record_eval(evals, self.evaluate())
                if checkpoint:
                    self.save_checkpoint()
                last_time += time.perf_counter() - side_work_started
                yield self.step
            if self.step == tc.max_steps and tc.eval_full_at_end:
                self.final_eval = final = self.evaluate(full=True)
                evals.write(self.step, {f"{k}_full": v for k, v in final.items()})
        finally:
            try:
                write_rows()  # whatever the loop logged before it ended, also by an error or close()
            finally:
                self._close_sinks(evals, sinks)

    def _close_sinks(self, evals, sinks) -> None:
        evals.close()
        for sink in sinks:
            sink.close()
        self.alerts_sink.close()
        if self.flow_writer is not None:
            self.flow_writer.close()
        self.flow.close()

    def _finish(self) -> RunSummary:
        """After the loop: the sample text, summary.json (a finished run only) and the distributed teardown."""
        tc, final = self.cfg.train, self.final_eval
        text = ""
        if tc.sample_tokens and self.step == tc.max_steps and (self.is_main or self.dist.strategy == "fsdp"):
            text = self.sample_text()  # FSDP: every rank runs the (identical, seeded) generation; its forward
        text = text if self.is_main else ""  # all-gathers weights
        summary = RunSummary(self.run.root, self.step, final, self.best_val_loss, text)
        if self.dist.enabled:
            dist_util.barrier()
            dist_util.shutdown()
        if self.step == tc.max_steps and self.is_main:
            done = {
                "steps": self.step,
                "best_val_loss": self.best_val_loss,
                "best_step": self.best_step,
                "final_full_eval": final,
                "skipped_steps": self.guard.skipped_steps,
                "rollbacks": self.guard.rollbacks,
            }
            atomic_write_text(self.run.summary, json.dumps(done, indent=1))
        return summary

    def _write_rows(self, rows: list[_Row], sinks: list, flops_per_token: float, peak: float | None) -> None:
        """The metrics rows of the logged steps in `rows`, to every sink, in step order, with the microscope's
        records of every step since the last call (to flow.parquet, TensorBoard and the guard's record
        detectors; each record's scalars join its step's row). One host transfer for the rows' device numbers
        and one for the records, whatever their number."""
        per_row = [(r.out.loss, r.out.clip.grad_norm_preclip, r.out.clip.grad_norm_postclip, r.out.clip.clip_coef,
                    r.out.clip.clipped) for r in rows]  # fmt: skip
        values = torch.stack([v.float() for numbers in per_row for v in numbers]).view(len(rows), -1).tolist()
        mem_gb = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        records = self.flow.collect_all(self.step)
        written = 0
        for row, numbers in zip(rows, values, strict=True):
            scalars = self._scalars(row, numbers, flops_per_token, peak)
            if mem_gb is not None:
                scalars["mem_gb"] = mem_gb
            while written < len(records) and records[written].step <= row.step:  # its record and earlier ones
                record = records[written]
                self._write_record(record)
                if record.step == row.step:
                    scalars.update({k: v for k, v in record.scalars.items() if k not in scalars})
                written += 1
            for sink in sinks:
                sink.write(row.step, scalars)
        for record in records[written:]:
            self._write_record(record)

    def _scalars(self, row: _Row, numbers: list[float], flops_per_token: float, peak: float | None) -> dict:
        """One step's metrics row; `numbers`: its loss and clipping figures on the host (see _write_rows)."""
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
        if peak:
            scalars["mfu"] = flops_per_token * tokens_per_s / (peak * self.world_size)
        return scalars

    def _write_record(self, record) -> None:
        """A microscope record to flow.parquet, TensorBoard's per-layer series and the guard's record detectors
        (booked on the microscope's stopwatch: it is there because of the microscope)."""
        started = time.perf_counter()
        if self.flow_writer is not None:
            self.flow_writer.write(record)
        if self.tb is not None:
            self.tb.write_layers(record.step, record)
        alerts = self.guard.observe_record(record)
        self.flow.clock.spent += time.perf_counter() - started
        for alert in alerts:
            self._alert(alert)

    def _write_flow_records(self) -> None:
        """The microscope's records of every step since the last call (one host transfer), written. Logging every
        N steps still records every monitored step."""
        for record in self.flow.collect_all(self.step):
            self._write_record(record)

    @torch.no_grad()
    def sample_text(self, prompt: str = "", max_new_tokens: int | None = None, seed: int | None = None) -> str:
        ids = self.tokenizer.encode(prompt) if prompt else [self.tokenizer.eot_id]
        new = generate(
            self.raw_model,
            ids,
            max_new_tokens or self.cfg.train.sample_tokens,
            temperature=0.8,
            top_k=200,
            seed=self.cfg.train.seed if seed is None else seed,
            eos_id=self.tokenizer.eot_id,
        )
        return self.tokenizer.decode(new)


class _Silent:
    """Stands in for every sink on ranks other than 0: they compute what rank 0 records, and write nothing."""

    def write(self, *args, **kwargs) -> None:
        pass

    message = close = flush = mark_discarded_after = write


def config_for_resume(run_dir: Path, overrides: list[str]) -> RunConfig:
    """The resumed run's config: what the run directory says ran, with any overrides applied."""
    from flowtrain.config import _merge, parse_overrides

    path = RunDir(Path(run_dir)).config
    if not path.is_file():
        raise CheckpointError(f"cannot resume {run_dir}: it has no config.yaml; is it a flowtrain run directory?")
    tree = yaml.safe_load(path.read_text()) or {}
    return build_config(_merge(tree, parse_overrides(overrides)))
