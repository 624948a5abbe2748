"""Shared fixtures: small real corpora and a tiny, fast run config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(1)  # tiny test models run fastest (and least noisily) on one thread


@pytest.fixture
def shakespeare_path() -> Path:
    if not SHAKESPEARE.exists():
        pytest.skip(f"reference corpus not found at {SHAKESPEARE}")
    return SHAKESPEARE


@pytest.fixture
def small_text(tmp_path: Path, shakespeare_path: Path) -> Path:
    """The first 60 kB of Tiny Shakespeare: real text, small enough for quick runs."""
    path = tmp_path / "small.txt"
    path.write_text(shakespeare_path.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return path


def tiny_overrides(text: Path, tmp_path: Path, **extra: object) -> list[str]:
    """Overrides for a seconds-long char-level run on `text`, writing under tmp_path."""
    base = {
        "data.sources": f"[{text}]",
        "data.tokenizer": "char",
        "data.split_by": "tokens",
        "data.cache_dir": str(tmp_path / "cache"),
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 32,
        "model.block_size": 32,
        "train.batch_size": 4,
        "train.max_steps": 20,
        "train.eval_interval": 10,
        "train.eval_batches": 2,
        "train.checkpoint_interval": 10,
        "train.out_dir": str(tmp_path / "runs"),
        "train.run_name": "tiny",
        "train.sample_tokens": 20,
        "schedule.warmup_steps": 5,
        "log.console": False,
        "log.tensorboard": False,
    }
    base.update({k: v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]
