"""The trainer: builds every component from the config, then runs the step in a loop with evaluation,
checkpoints, logging and a closing sample hung around it.

The step's math lives in train/step.py and sees only a TrainState; around it the loop calls small objects:
Evaluation, Checkpoints, Recovery, RunLog, a RowBuffer (sinks/rows.py) and a StopRequest. Resume is exact on
CPU: train/restore.py puts back model, optimizer, schedule, loader position, clipper and RNG state, the same
way a rollback does; train/run_files.py opens the run directory (one writer, interrupted writes cleaned up,
logs cut back to the checkpoint). The CLI, not the trainer, tunes the CPU allocator and installs signal
handlers (train/runtime.py, interrupts.py).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowtrain.config import RunConfig
from flowtrain.data.dataset import TokenDataset
from flowtrain.data.loader import BatchLoader, eval_batches
from flowtrain.data.prepare import dataset_for
from flowtrain.data.tokenizers import tokenizer_from_json
from flowtrain.errors import ConfigError, DataError, DivergedError
from flowtrain.flow.guard import Guard
from flowtrain.flow.health import Context
from flowtrain.flow.monitor import FlowMonitor
from flowtrain.fsutil import DirectoryLock, atomic_write_text
from flowtrain.interop.init_from import init_source
from flowtrain.model.gpt import GPT
from flowtrain.optim.clipping import GradClipper
from flowtrain.optim.optimizers import build_optimizer
from flowtrain.optim.schedules import build_scheduler
from flowtrain.rundir import RunDir, default_run_name, summary_json
from flowtrain.sample import generate
from flowtrain.sinks.rows import RowBuffer, StepTimer
from flowtrain.train import distributed as dist_util
from flowtrain.train import preflight, run_files
from flowtrain.train.checkpoint import Checkpoint
from flowtrain.train.checkpoints import Checkpoints
from flowtrain.train.evaluate import Evaluation, evaluate
from flowtrain.train.faults import attach_faults
from flowtrain.train.recovery import Recovery
from flowtrain.train.restore import restore
from flowtrain.train.run_log import Row, RunLog
from flowtrain.train.runtime import peak_flops, seed_everything, select_device, select_precision
from flowtrain.train.step import TrainState, train_step
from flowtrain.train.stopping import StopRequest


@dataclass
class RunSummary:
    run_dir: Path
    steps: int
    final: dict[str, float] = field(default_factory=dict)
    best_val_loss: float | None = None
    sample: str = ""
    stopped: str | None = None  # why the loop ended early on request (request_stop's reason)
    checkpoint: Path | None = None  # the newest checkpoint of the run's state: written, or resumed from


class Trainer:
    """Builds the run described by `cfg` (or resumes `resume_dir`) and trains it.

    `run_dir`: write there instead of train.out_dir/run_name (or the resumed run's directory);
    `on_record`: called with each microscope record the loop writes (flowtrain diagnose collects them).
    The trainer holds its run directory (a lock: one writer) from construction until run_loop() ends, or
    close(); `request_stop()` ends the loop early with a checkpoint (the CLI calls it on SIGTERM / SIGINT).
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        resume_dir: Path | None = None,
        stop_after: int | None = None,
        progress: bool | None = None,
        run_dir: Path | None = None,
        on_record: Callable[[Any], None] | None = None,
    ):
        self.cfg, self.stop_after, self.on_record = cfg, stop_after, on_record
        self.progress = cfg.log.console if progress is None else progress
        tc = cfg.train
        warmup_notice = preflight.shorten_warmup(cfg)  # before the schedule is built
        preflight.check_stop_after(stop_after, 0)  # before anything is created; a resumed step is checked below
        self._writes_to = Path(run_dir or resume_dir or tc.out_dir)
        preflight.check_writable(self._writes_to)
        # distributed (torchrun): join the group first; the device is then cuda:LOCAL_RANK or cpu
        ctx, dist_device = dist_util.init_distributed(tc.parallel, tc.device)
        if warmup_notice and ctx.is_main:
            print(f"flowtrain: {warmup_notice}", file=sys.stderr)
        self.device = dist_device or select_device(tc.device)
        self.parallel = dist_util.DataParallel(ctx, self.device, padded_rows=cfg.data.loader == "varlen")
        self._lock: DirectoryLock | None = None  # rank 0's, on the run directory
        self.stop = StopRequest(self.parallel)
        self._in_loop = self._running = False
        try:
            self.run, self.resume_from = self._run_directory(run_dir, resume_dir)
            if self.resume_from is not None:
                preflight.check_stop_after(stop_after, self.resume_from.step)
            self._build(resume_dir is not None)
        except BaseException:
            if self._lock is not None and resume_dir is None:  # a new run that never started leaves nothing
                run_files.abandon_fresh(self._lock.path.parent, self._lock)
            self.close()  # a trainer that failed to build lets go of the directory at once
            raise

    # ---- building ----------------------------------------------------------------------------------------
    def _build(self, continues: bool) -> None:
        """Every component, from the config; a resumed run's state then comes back from its checkpoint."""
        cfg, tc, ctx = self.cfg, self.cfg.train, self.parallel.ctx
        self.precision = select_precision(tc.dtype, self.device)
        seed_everything(tc.seed)
        # model.init_from: architecture and tokenizer into the config now, weights into the model once built
        source = init_source(cfg) if self.resume_from is None else None  # a resumed run has its own weights
        self._open_data()
        preflight.check_splits(self.dataset, cfg.model.block_size, cfg.data.loader)
        preflight.check_free_space(self._writes_to, cfg, extra=len(self.tokenizer.to_json()))

        # model (sharded in place by FSDP2 before the optimizer sees its parameters), optimizer, schedule, clipping
        self.raw_model = GPT(cfg.model).to(self.device)
        if source is not None:
            source.load_into(self.raw_model)
        wrapped = dist_util.wrap_model(self.raw_model, ctx, self.device, tc.dtype == "bfloat16")
        optimizer = build_optimizer(self.raw_model, cfg.optim, self.device.type)
        named_params = [(n, p) for n, p in self.raw_model.named_parameters() if p.requires_grad]
        on_gpu = self.device.type == "cuda"
        self.state = TrainState(
            model=wrapped,
            raw_model=self.raw_model,
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, cfg.schedule, cfg.optim.lr, tc.max_steps, cfg.model.n_embd),
            # micro-batch slot i of every step is read by its own stream, so the global batch is the same on any
            # world size; this rank runs its share of the slots
            loader=dist_util.SlotLoaders(
                self._slot_loader, ctx, tc.grad_accum, self.parallel.comm_device, tc.batch_size
            ),
            clipper=GradClipper(cfg.clip),
            guard=Guard(cfg.guard, named_params, host_every_step=not on_gpu, context=Context.of(cfg)),
            precision=self.precision,
            parallel=self.parallel,
            device=self.device,
            loss_options={"label_smoothing": tc.label_smoothing, "z_loss": tc.z_loss},
            scaler=torch.amp.GradScaler(self.device.type) if self.precision.needs_grad_scaler else None,
            host_check_every=cfg.log.interval if on_gpu else 1,  # on GPU the guard's host checks wait for logging
        )
        self.evaluation = Evaluation(self.evaluate, tc.eval_interval, tc.max_steps)
        self.recovery = Recovery(self.state, cfg.guard, self.run.checkpoints, others=[self.evaluation])
        self.checkpoints = Checkpoints(
            self.run.checkpoints,
            self.state,
            self.recovery.owners,
            interval=tc.checkpoint_interval,
            keep_last=tc.keep_last,
            layout=tc.checkpoint_format,
            tokenizer_json=self.tokenizer.to_json(),
            config_yaml=cfg.to_yaml(),
            best_step=lambda: self.evaluation.best_step,
        )
        self.continues = continues  # its files are cut back to the step it starts from
        self.last_checkpoint: Path | None = None
        if self.resume_from is not None:
            restore(self.state, self.resume_from, self.recovery.owners)
            self.last_checkpoint = self.resume_from.path
        # the microscope attaches hooks from outside; monitoring off builds it disabled (no hooks, no copies)
        flow_cfg = dist_util.flow_config_for(cfg.flow, ctx, tensorboard=cfg.log.tensorboard)
        self.flow = FlowMonitor(
            self.raw_model, optimizer, flow_cfg, start_step=self.state.step, sync=self.parallel.world_size > 1
        )
        self.flow.backward_scale = self.parallel.world_size  # each rank's loss is scaled by it (train/step.py)
        # its clip-rate window goes into checkpoints too (not into rollbacks: a snapshot may precede its records)
        self.checkpoints.owners = (*self.recovery.owners, self.flow)
        if self.resume_from is not None:
            self.flow.load_state_dict(self.resume_from.state)
        self.state.monitor = self.flow
        faults = attach_faults(cfg.fault, self.state, self.raw_model.layer_of, self.tokenizer.vocab_size)
        if faults and self.parallel.is_main:
            print(f"flowtrain: fault injection on: {'; '.join(faults)}", file=sys.stderr)
        self.state.model, self.state.eager_model = (torch.compile(wrapped), wrapped) if tc.compile else (wrapped, None)
        self.log: RunLog | None = None  # opened by steps()
        self.final_eval: dict[str, float] = {}

    @property
    def step(self) -> int:
        """Optimizer steps done."""
        return self.state.step

    def _open_data(self) -> None:
        """Prepare (or reuse) the token files; the tokenizer then decides the vocabulary."""
        with self.parallel.main_first():  # rank 0 prepares the shared data cache
            self.dataset = TokenDataset.open(dataset_for(self.cfg.data))
        self.tokenizer = self.dataset.tokenizer
        if self.resume_from is not None:
            saved = tokenizer_from_json(self.resume_from.tokenizer_json)
            if saved.fingerprint != self.tokenizer.fingerprint:
                raise DataError(
                    f"the data at {self.dataset.path} was made with a different tokenizer than the checkpoint "
                    f"{self.resume_from.path}; prepare the data with the run's tokenizer"
                )
        vocab, model = self.tokenizer.vocab_size, self.cfg.model
        if model.vocab_size is None:
            model.vocab_size = vocab
        elif model.vocab_size < vocab:
            raise ConfigError(f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's {vocab}; unset it")

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

    def _run_directory(self, run_dir: Path | None, resume_dir: Path | None) -> tuple[RunDir, Checkpoint | None]:
        """The directory this run writes, locked (run_files.open_run_dir), and the checkpoint it resumes from."""
        if run_dir is None and resume_dir is None:  # a timestamp by default: rank 0's
            name = self.parallel.broadcast_json(self.cfg.train.run_name or default_run_name())
            run_dir = Path(self.cfg.train.out_dir) / name
        run, self._lock, resume_from = run_files.open_run_dir(self.parallel, run_dir, resume_dir)
        return run, resume_from

    def close(self) -> None:
        """Let go of the run directory (its lock); run_loop() does it at the end, the OS when the process ends."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def request_stop(self, reason: str) -> bool:
        """Ask the loop to stop after the step it is in: it then writes a checkpoint (unless that step has one),
        puts every row on disk and ends, RunSummary.stopped = `reason` (a signal's name, e.g. "SIGTERM"). Safe
        to call from a signal handler (it only sets a flag). False when no loop is running to honour it (before
        it starts, after it ends); during run_loop() True (after the last step the run finishes instead)."""
        self.stop.request(reason)
        return self._in_loop or self._running

    # ---- work around the step ------------------------------------------------------------------------------
    def evaluate(self, full: bool = False) -> dict[str, float]:
        """Every rank evaluates the same fixed batches (FSDP's forward is collective); rank 0 records."""
        tc = self.cfg.train
        batches = eval_batches(self.dataset, "val", tc.batch_size, self.cfg.model.block_size,
                               None if full else tc.eval_batches)  # fmt: skip
        return evaluate(
            self.raw_model if self.parallel.strategy == "ddp" else self.state.model,  # DDP: no collectives needed
            batches,
            device=self.device,
            precision=self.precision,
            bytes_per_token=self.dataset.bytes_per_token("val"),
        )

    # ---- the loop ----------------------------------------------------------------------------------------
    def run_loop(self) -> RunSummary:
        """Train to the end (max_steps, or stop_after): every iteration of steps(), then the run's summary."""
        self._running = True  # a stop requested after the last step lets the run finish (its summary)
        try:
            for _ in self.steps():
                pass
            return self._finish()
        finally:
            self._running = False

    def steps(self, until: int | None = None) -> Iterator[int]:
        """The training loop one iteration at a time: yields the step number after each step, its logging, guard
        action and side work (snapshot, eval, checkpoint). It ends at max_steps (or stop_after) with a checkpoint,
        or at step `until` when given: a window of steps, checkpointed only at train.checkpoint_interval; or,
        after request_stop(), after the step it is in, with a checkpoint. The sinks open at the first next() and
        close when the loop ends or the generator is closed, and so do the microscope's hooks: a trainer runs
        one loop. run_loop() is this plus the run's end."""
        tc, lc, state, parallel = self.cfg.train, self.cfg.log, self.state, self.parallel
        run_end = tc.max_steps if self.stop_after is None else min(tc.max_steps, self.stop_after)
        end = run_end if until is None else until
        checkpoint_end = run_end if until is None else None
        self.final_eval = {}
        self.log = log = RunLog(
            self.cfg,
            self.run,
            state,
            flops_per_token=self.raw_model.flops_per_token(),
            peak_flops=peak_flops(self.device, self.cfg.train.peak_tflops),
            continues=self.continues,
            write_config=self.resume_from is None,
            progress=self.progress,
            on_record=self.on_record,
        )
        rows = RowBuffer(log.write_rows, lc.flush_rows, lc.flush_seconds, lc.interval)
        state.model.train()
        self.recovery.start()
        timer = StepTimer()
        self._in_loop = True
        try:
            while state.step < end:
                if self.stop.agreed(state.host_check_every):
                    if state.step > 0 and self.last_checkpoint_step != state.step:
                        self._checkpoint(rows, log)
                    break
                lr = state.optimizer.param_groups[0]["lr"]
                out = train_step(state)
                acting = out.verdict.action in ("rollback", "stop")
                logged = acting or state.step % lc.interval == 0 or state.step == end
                if logged and parallel.is_main:
                    now, step_time = timer.lap(lc.interval if state.step % lc.interval == 0 else 1)
                    rows.add(Row(state.step, out, lr, step_time), now, step_time, urgent=acting)
                elif not parallel.is_main:
                    self.flow.discard()  # other ranks measure (their sums join rank 0's) but write nothing
                if self.recovery.act_on(out.verdict, log):  # rolled back: the loop goes on from there
                    timer.restart()
                    yield state.step
                    continue
                checkpoint_due = self.checkpoints.due(state.step, checkpoint_end)
                if self.evaluation.due(state.step) or checkpoint_due:
                    rows.flush()  # metrics and flow records complete up to here (booked as step time)
                with timer.paused():  # snapshots, evaluations, checkpoints: not step time
                    self.recovery.maybe_snapshot(out.verdict)
                    self.evaluation.maybe_eval(state.step, log.write_eval)
                    if checkpoint_due:
                        self._checkpoint(rows, log)
                yield state.step
            if state.step == tc.max_steps:
                if tc.eval_full_at_end:
                    self.final_eval = final = self.evaluate(full=True)
                    log.evals.write(state.step, {f"{k}_full": v for k, v in final.items()})
                rows.flush()
                log.finish(self.evaluation.best_val_loss, self.final_eval)
        except BaseException:
            self._in_loop = False
            with contextlib.suppress(Exception):  # the error in flight is the one to report, not a second one
                self._close_log(rows, log)
            self.close()  # the run is over: let go of its directory
            raise
        self._in_loop = False
        self._close_log(rows, log)

    def _close_log(self, rows: RowBuffer, log: RunLog) -> None:
        """Whatever the loop logged before it ended (also by an error or close()), then the sinks and hooks."""
        try:
            rows.flush()
        finally:
            log.close()
            self.flow.close()

    @property
    def last_checkpoint_step(self) -> int | None:
        return None if self.last_checkpoint is None else int(self.last_checkpoint.name.split("_")[-1])

    def _checkpoint(self, rows: RowBuffer, log: RunLog) -> None:
        """A checkpoint of the state now, made visible only after every row up to it is on disk (log.sync)."""
        rows.flush()
        log.sync()
        self.last_checkpoint = self.checkpoints.save()

    def _finish(self) -> RunSummary:
        """After the loop: the sample text, summary.json (a finished run only), the distributed teardown, and the
        run directory let go."""
        tc, final, step, parallel = self.cfg.train, self.final_eval, self.state.step, self.parallel
        try:
            text = ""
            if tc.sample_tokens and step == tc.max_steps and (parallel.is_main or parallel.strategy == "fsdp"):
                text = self._closing_sample()  # FSDP: every rank runs the (identical, seeded) generation; its
            text = text if parallel.is_main else ""  # forward all-gathers weights
            best = self.evaluation
            stopped = self.stop.reason if step < tc.max_steps else None
            summary = RunSummary(self.run.root, step, final, best.best_val_loss, text, stopped, self.last_checkpoint)
            parallel.shutdown()
            if step == tc.max_steps and parallel.is_main:
                done = {
                    "steps": step,
                    "best_val_loss": best.best_val_loss,
                    "best_step": best.best_step,
                    "final_full_eval": final,
                    "skipped_steps": self.state.guard.skipped_steps,
                    "rollbacks": self.state.guard.rollbacks,
                }
                atomic_write_text(self.run.summary, summary_json(done))  # NaN / inf as null, listed
        finally:
            self.close()
        return summary

    @torch.no_grad()
    def _closing_sample(self) -> str:
        """The sample that ends a run; a diverged model has none, which is said rather than raised: the run is
        over, and its summary must still be written."""
        tc, tok = self.cfg.train, self.tokenizer
        try:
            new = generate(self.raw_model, [tok.eot_id], tc.sample_tokens, temperature=0.8, top_k=200, seed=tc.seed,
                           eos_id=tok.eot_id)  # fmt: skip
        except DivergedError as exc:
            if self.parallel.is_main:
                print(f"flowtrain: no closing sample: {exc}", file=sys.stderr)
            return ""
        return tok.decode(new)
