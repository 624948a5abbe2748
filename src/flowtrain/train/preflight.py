"""What can be checked before step 1 is checked before step 1 (the config checks itself when it is read; these
need the data, the filesystem or the model's size): a run must never train for an hour and then fail at its
first evaluation or its first checkpoint.

* the context against every split: training windows (random and packed loaders) and evaluation windows (every
  loader) need block_size + 1 tokens;
* the place the run writes to: an existing directory (or one that can be made) where a file can be created;
* free disk for one checkpoint: weights plus optimizer state, estimated from a model built on the meta device
  (no memory is allocated, so a model too big for the disk is refused before it is built);
* a schedule longer than the run: the warmup is shortened, with a notice, rather than the run refused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from flowtrain.errors import ConfigError, DataError
from flowtrain.model.gpt import GPT

_SMALL_FILES = 64 << 10  # rng.safetensors, state.json, config.yaml, meta.json: a few KB together


def shorten_warmup(cfg) -> str | None:
    """A warmup longer than the run becomes a tenth of the run (the default config's ratio); returns the notice."""
    warmup, steps = cfg.schedule.warmup_steps, cfg.train.max_steps
    if warmup <= steps:
        return None
    cfg.schedule.warmup_steps = steps // 10
    return (
        f"schedule.warmup_steps={warmup} is longer than train.max_steps={steps}; warming up for "
        f"{cfg.schedule.warmup_steps} steps (a tenth of the run) instead"
    )


def check_splits(dataset, block_size: int, loader: str) -> None:
    """Every split the run reads holds at least one window of block_size + 1 tokens."""
    needs = {"val": "evaluation"} if loader == "varlen" else {"train": "training", "val": "evaluation"}
    for split, use in needs.items():
        n = dataset.n_tokens(split)
        if n < block_size + 1:
            raise DataError(
                f"model.block_size={block_size} is longer than the {split} split ({n} tokens), which {use} reads "
                f"in windows of block_size + 1; lower model.block_size to at most {max(n - 1, 0)} or add more text"
            )


def _existing_ancestor(path: Path) -> Path:
    """The path itself or its nearest existing parent; a file on the way is an error."""
    path = Path(os.path.abspath(path.expanduser()))
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise ConfigError(
                    f"{candidate} is a file, so the run cannot be written under {path}; "
                    "set train.out_dir to a directory"
                )
            return candidate
    return Path(path.anchor)


def check_writable(path: Path, what: str = "train.out_dir") -> None:
    """`path` (made if missing) accepts a new file: tried for real, since permissions, read-only mounts and
    root's privileges all answer differently than os.access would say."""
    _existing_ancestor(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".flowtrain-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"cannot write to {path} ({exc.strerror or exc}); set {what} to a writable directory"
        ) from None


def checkpoint_bytes(cfg) -> tuple[int, int]:
    """(weights, optimizer state) bytes of one checkpoint of `cfg`'s model, from a model on the meta device."""
    with torch.device("meta"):
        model = GPT(cfg.model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    optim = cfg.optim
    # moments per weight: Adam(W) two, SGD one with momentum, RMSprop its square average (+ momentum), muon at
    # most two (Muon keeps one, its AdamW half two)
    copies = {"adamw": 2, "adam": 2, "muon": 2, "sgd": int(optim.momentum > 0), "rmsprop": 1 + int(optim.momentum > 0)}
    return weights, weights * copies[optim.name]


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def check_free_space(path: Path, cfg, extra: int = 0) -> int:
    """Refuse a run whose first checkpoint cannot fit on the disk under `path`. Returns the estimate (bytes)."""
    weights, optim = checkpoint_bytes(cfg)
    needed = weights + optim + extra + _SMALL_FILES
    free = shutil.disk_usage(_existing_ancestor(path)).free
    if free < needed:
        raise ConfigError(
            f"not enough free disk for a checkpoint under {path}: one needs about {_size(needed)} (weights "
            f"{_size(weights)} + {cfg.optim.name} state {_size(optim)}), {_size(free)} is free; free some space "
            "or set train.out_dir to a larger disk"
        )
    return needed


def check_stop_after(stop_after: int | None, step: int) -> None:
    """`--stop-after N` stops after step N, which must be a step this run takes (else nothing is resumable)."""
    if stop_after is None:
        return
    if stop_after < 1:
        raise ConfigError(f"--stop-after {stop_after}: give the step to stop after, >= 1")
    if stop_after <= step:
        raise ConfigError(
            f"--stop-after {stop_after}: the run is already at step {step}; give a later step (or leave it out)"
        )
