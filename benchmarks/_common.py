"""Helpers shared by the benchmark scripts: the reference corpus, matmul peaks, robust timing summaries."""

from __future__ import annotations

import functools
import os
import statistics
import time
from pathlib import Path

import torch

from flowtrain.config import load_config
from flowtrain.train.runtime import select_device, tune_cpu_allocator
from flowtrain.train.step import train_step
from flowtrain.train.trainer import Trainer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def corpus_path() -> Path:
    if not SHAKESPEARE.exists():
        raise SystemExit(f"benchmark corpus not found: {SHAKESPEARE}")
    return SHAKESPEARE


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work, so a wall clock read after it covers that work (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 20, device: str = "cpu") -> float:
    """Best achieved FLOP/s of an n x n matmul in `dtype` on `device` right now (the MFU denominator)."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def time_calls(owner, attribute: str, label: str, spent: dict[str, float]) -> None:
    """Wrap `owner.attribute` (an instance's bound method or a class's function) so that the wall time of every
    call adds to spent[label]."""
    inner = getattr(owner, attribute)

    @functools.wraps(inner)
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - started

    setattr(owner, attribute, timed)


def summarize(samples: list[float]) -> str:
    """median [min, max] over repeats, the spread this noisy shared machine shows."""
    return f"{statistics.median(samples):.4g} [{min(samples):.4g}, {max(samples):.4g}]"


def shakespeare_trainer(
    workdir: Path, name: str, overrides: list[str] = (), config: str = "shakespeare-char"
) -> Trainer:
    """A Trainer for the shakespeare-char recipe writing under `workdir` (quiet: no console, no TensorBoard), in a
    process whose CPU allocator is tuned as the CLI tunes it (train.tune_allocator).

    Another `config` (e.g. gpt2-124m) keeps its own data sources (the built-in corpus).
    """
    data = [f"data.sources=[{corpus_path()}]"] if config.startswith("shakespeare") else []
    cache = os.environ.get("FLOWTRAIN_BENCH_CACHE") or workdir / "cache"  # one prepared dataset for several scripts
    cfg = load_config(
        config,
        [
            *data,
            f"data.cache_dir={cache}",
            f"train.out_dir={workdir / 'runs'}",
            f"train.run_name={name}",
            "log.console=false",
            "log.tensorboard=false",
            *overrides,
        ],
    )
    if cfg.train.tune_allocator and select_device(cfg.train.device).type == "cpu":
        tune_cpu_allocator()  # as `flowtrain train` does: the Trainer itself changes nothing process-wide
    trainer = Trainer(cfg)
    trainer.state.model.train()
    return trainer


def time_steps(trainer: Trainer, steps: int) -> list[float]:
    """Wall time of each of `steps` training steps (the step is done when its loss is on the host)."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = train_step(trainer.state)
        out.loss.item()  # waits for the device
        times.append(time.perf_counter() - t0)
    return times
