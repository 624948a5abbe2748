"""Configuration of the training loop and of logging."""

from typing import Literal

from pydantic import Field, field_validator

from flowtrain._base import Section


class TrainConfig(Section):
    """How long, how big a batch, on what device and precision, and when to evaluate and checkpoint."""

    max_steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    z_loss: float = Field(0.0, ge=0, description="weight of the z-loss term (log-sum-exp of the logits)^2")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="autocast precision (bfloat16 on CPU and CUDA, float16 with GradScaler on CUDA)"
    )
    compile: bool = False
    tune_allocator: bool = Field(
        True,
        description="on the CPU, keep freed tensor memory in the process (glibc malloc thresholds raised): no "
        "page faults on every step's fresh activations (docs/performance.md). "
        "Process-wide: the flowtrain command applies it before training; a Trainer built in your code does not",
    )
    seed: int = 1337
    eval_interval: int = Field(250, ge=1, description="evaluate every N steps (and at the end)")
    eval_batches: int = Field(20, ge=1, description="batches in the fixed validation subset")
    eval_full_at_end: bool = Field(False, description="also evaluate the whole val split at the end")
    checkpoint_interval: int = Field(500, ge=1, description="save a checkpoint every N steps (and at the end)")
    keep_last: int = Field(2, ge=1, description="checkpoints kept besides the best one")
    out_dir: str = Field("runs", description="parent directory of run directories")
    run_name: str | None = Field(None, description="default: a timestamp; a plain directory name inside out_dir")
    sample_tokens: int = Field(200, ge=0, description="length of the sample printed at the end")
    parallel: Literal["auto", "none", "ddp", "fsdp"] = Field(
        "auto",
        description="data parallelism under torchrun: ddp, fsdp (FSDP2 fully_shard per block, then the root), "
        "none; auto = ddp when WORLD_SIZE > 1. grad_accum stays global: divided over ranks, or with fewer "
        "micro-batches than ranks each one's rows split among them (docs/distributed.md)",
    )
    checkpoint_format: Literal["full", "sharded"] = Field(
        "full",
        description="full: one model.safetensors (+ optimizer.pt) written by rank 0; sharded: "
        "torch.distributed.checkpoint shards written by every rank (for FSDP models too big to gather)",
    )
    peak_tflops: float | None = Field(
        None, gt=0, description="the device's matmul peak for MFU (default: known GPUs; unset on CPU = no MFU)"
    )

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, name: str | None) -> str | None:
        """A run lives inside out_dir: a name with a path in it would write somewhere else."""
        if name is not None and (not name or "/" in name or "\\" in name or name in (".", "..")):
            raise ValueError(f"{name!r} is not a plain directory name; choose a name like my-run (no '/' or '..')")
        return name


class LogConfig(Section):
    """Where the per-step record goes."""

    interval: int = Field(1, ge=1, description="write metrics every N steps")
    flush_rows: int = Field(
        10,
        ge=1,
        description="the logged steps' rows are made and written together, N at a time (and at least every "
        "flush_seconds, at evaluations, checkpoints, guard actions and the end): one host transfer for their "
        "numbers, and the sinks' Python runs N times in warm caches instead of once a step in cold ones",
    )
    flush_seconds: float = Field(
        1.0, gt=0, description="the longest a logged row waits to be written (slower steps: every row at once)"
    )
    console: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "flowtrain"
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
