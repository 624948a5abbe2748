"""The trainer: builds every component from the config, then runs the step in a loop with evaluation,
checkpoints, logging and a closing sample hung around it.

Training-loop math lives in train/step.py; this module is bookkeeping. Resume is exact on CPU: model,
optimizer, schedule, loader position, clipper state and RNG state all come back from the checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from flowtrain.config import RunConfig, build_config
from flowtrain.data.dataset import TokenDataset
from flowtrain.data.loader import BatchLoader, eval_batches
from flowtrain.data.prepare import dataset_for
from flowtrain.data.tokenizers import tokenizer_from_json
from flowtrain.errors import CheckpointError, ConfigError, DataError
from flowtrain.fsutil import atomic_write_text
from flowtrain.model.gpt import GPT
from flowtrain.optim.clipping import GradClipper
from flowtrain.optim.optimizers import build_optimizer
from flowtrain.optim.schedules import build_scheduler
from flowtrain.sample import generate
from flowtrain.sinks.console import ConsoleSink
from flowtrain.sinks.jsonl import JsonlSink
from flowtrain.train import checkpoint as ckpt
from flowtrain.train.evaluate import evaluate
from flowtrain.train.rundir import RunDir, default_run_name, write_env
from flowtrain.train.runtime import rng_state, seed_everything, select_device, select_precision, set_rng_state
from flowtrain.train.step import train_step

# bf16 dense matmul peaks (FLOP/s) of common accelerators, for MFU when train.peak_tflops is unset.
_KNOWN_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


class _NoFlow:
    """Monitoring off: the step's observer calls do nothing."""

    def after_backward(self) -> None:
        pass

    def after_step(self, clip_stats=None) -> None:
        pass

    def collect(self, step: int):
        return None

    def close(self) -> None:
        pass


@dataclass
class RunSummary:
    run_dir: Path
    steps: int
    final: dict[str, float] = field(default_factory=dict)
    best_val_loss: float | None = None
    sample: str = ""


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
        self.device = select_device(tc.device)
        self.precision = select_precision(tc.dtype, self.device)
        seed_everything(tc.seed)

        # data: prepare (or reuse) the token files, then the tokenizer decides the vocabulary
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

        # model, optimizer, schedule, clipping
        self.raw_model = GPT(cfg.model).to(self.device)
        self.optimizer = build_optimizer(self.raw_model, cfg.optim, self.device.type)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.optim.lr, tc.max_steps, cfg.model.n_embd)
        self.clipper = GradClipper(cfg.clip)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision.needs_grad_scaler else None
        self.grad_accum = tc.grad_accum
        self.loss_options = {"label_smoothing": tc.label_smoothing, "z_loss": tc.z_loss}
        self.loader = BatchLoader(
            self.dataset,
            "train",
            batch_size=tc.batch_size,
            block_size=cfg.model.block_size,
            mode=cfg.data.loader,
            seed=tc.seed,
            doc_mask=cfg.data.doc_mask,
            bucket_by_length=cfg.data.bucket_by_length,
        )
        self.flow = _NoFlow()
        self.step = 0
        self.best_val_loss: float | None = None
        self.best_step: int | None = None

        # run directory
        if self.resume_from is not None:
            self.run = RunDir(Path(resume_dir))
        else:
            name = tc.run_name or default_run_name()
            self.run = RunDir(Path(tc.out_dir) / name)
            if self.run.root.exists() and any(self.run.root.iterdir()):
                raise ConfigError(
                    f"run directory {self.run.root} already exists; resume it with --resume {self.run.root} "
                    "or choose another train.run_name"
                )
        if self.resume_from is not None:
            self._restore(self.resume_from)
        self.model = torch.compile(self.raw_model) if tc.compile else self.raw_model
        self.progress = cfg.log.console if progress is None else progress

    # ---- the pieces train_step calls ---------------------------------------------------------------
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
            self.scaler.unscale_(self.optimizer)

    def optimizer_step(self) -> None:
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    # ---- resume ----------------------------------------------------------------------------------
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

    def _restore(self, c: ckpt.Checkpoint) -> None:
        ckpt.restore_model(c, self.raw_model)
        ckpt.restore_optimizer(c, self.optimizer)
        set_rng_state(ckpt.restore_rng(c))
        state = c.state
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        if "clipper" in state and hasattr(self.clipper, "load_state_dict"):
            self.clipper.load_state_dict(state["clipper"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step = c.step
        self.best_val_loss = state.get("best_val_loss")
        self.best_step = state.get("best_step")

    def save_checkpoint(self) -> Path:
        state: dict[str, Any] = {
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
        }
        if hasattr(self.clipper, "state_dict"):
            state["clipper"] = self.clipper.state_dict()
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        path = ckpt.save_checkpoint(
            self.run.checkpoints,
            self.step,
            model=self.raw_model,
            optimizer=self.optimizer,
            rng=rng_state(),
            state=state,
            tokenizer_json=self.tokenizer.to_json(),
            config_yaml=self.cfg.to_yaml(),
        )
        keep = {self.best_step} if self.best_step is not None else set()
        ckpt.prune_checkpoints(self.run.checkpoints, self.cfg.train.keep_last, keep)
        return path

    # ---- the loop --------------------------------------------------------------------------------
    def _open_sinks(self) -> list:
        self.run.root.mkdir(parents=True, exist_ok=True)
        if self.resume_from is None:
            atomic_write_text(self.run.config, self.cfg.to_yaml())
        else:
            JsonlSink.truncate_after(self.run.metrics, self.step)
            JsonlSink.truncate_after(self.run.evals, self.step)
        write_env(self.run, self.device)
        sinks: list = [JsonlSink(self.run.metrics, flush_every=max(1, 50 // self.cfg.log.interval))]
        self.console = ConsoleSink(self.cfg.train.max_steps, initial=self.step, enabled=self.progress)
        sinks.append(self.console)
        if self.cfg.log.tensorboard:
            from flowtrain.sinks.tensorboard import TensorBoardSink

            sinks.append(TensorBoardSink(self.run.tensorboard, purge_step=self.step + 1 if self.step else None))
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
        batches = eval_batches(
            self.dataset,
            "val",
            self.cfg.train.batch_size,
            self.cfg.model.block_size,
            None if full else self.cfg.train.eval_batches,
        )
        return evaluate(
            self.model,
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

    def run_loop(self) -> RunSummary:
        tc = self.cfg.train
        self.sinks = sinks = self._open_sinks()
        evals = JsonlSink(self.run.evals)
        peak = self._peak_flops()
        flops_per_token = self.raw_model.flops_per_token()
        self.model.train()
        end = tc.max_steps if self.stop_after is None else min(tc.max_steps, self.stop_after)
        last_time = time.perf_counter()
        try:
            while self.step < end:
                lr = self.optimizer.param_groups[0]["lr"]
                out = train_step(self)
                self.step += 1
                if self.step % self.cfg.log.interval == 0 or self.step == end:
                    now = time.perf_counter()
                    elapsed = (now - last_time) / (
                        self.cfg.log.interval if self.step % self.cfg.log.interval == 0 else 1
                    )
                    last_time = now
                    scalars = self._scalars(out, lr, elapsed, flops_per_token, peak)
                    for sink in sinks:
                        sink.write(self.step, scalars)
                if self.step % tc.eval_interval == 0 or self.step == tc.max_steps:
                    self._record_eval(evals, self.evaluate())
                if self.step % tc.checkpoint_interval == 0 or self.step == end:
                    self.save_checkpoint()
            final: dict[str, float] = {}
            if self.step == tc.max_steps and tc.eval_full_at_end:
                final = self.evaluate(full=True)
                evals.write(self.step, {f"{k}_full": v for k, v in final.items()})
        finally:
            evals.close()
            for sink in sinks:
                sink.close()
            self.flow.close()
        text = self.sample_text() if tc.sample_tokens and self.step == tc.max_steps else ""
        summary = RunSummary(self.run.root, self.step, final, self.best_val_loss, text)
        if self.step == tc.max_steps:
            atomic_write_text(
                self.run.summary,
                json.dumps(
                    {
                        "steps": self.step,
                        "best_val_loss": self.best_val_loss,
                        "best_step": self.best_step,
                        "final_full_eval": final,
                    },
                    indent=1,
                ),
            )
        return summary

    def _scalars(self, out, lr: float, step_time: float, flops_per_token: float, peak: float | None) -> dict:
        clip = out.clip
        values = torch.stack(
            [
                out.loss.float(),
                clip.grad_norm_preclip.float(),
                clip.grad_norm_postclip.float(),
                clip.clip_coef.float(),
                clip.clipped.float(),
            ]
        ).tolist()  # one host transfer for all step scalars
        tokens_per_s = out.tokens / step_time if step_time > 0 else 0.0
        scalars = {
            "loss": values[0],
            "lr": lr,
            "grad_norm_preclip": values[1],
            "grad_norm_postclip": values[2],
            "clip_coef": values[3],
            "clipped": bool(values[4]),
            "tokens": self.step * out.tokens,
            "tokens_per_s": tokens_per_s,
            "step_time_ms": step_time * 1e3,
        }
        if peak:
            scalars["mfu"] = flops_per_token * tokens_per_s / peak
        if self.device.type == "cuda":
            scalars["mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        record = self.flow.collect(self.step)
        if record is not None:
            scalars.update(record.scalars)
        return scalars

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


def config_for_resume(run_dir: Path, overrides: list[str]) -> RunConfig:
    """The resumed run's config: what the run directory says ran, with any overrides applied."""
    from flowtrain.config import _merge, parse_overrides

    path = RunDir(Path(run_dir)).config
    if not path.is_file():
        raise CheckpointError(f"cannot resume {run_dir}: it has no config.yaml; is it a flowtrain run directory?")
    tree = yaml.safe_load(path.read_text()) or {}
    return build_config(_merge(tree, parse_overrides(overrides)))
