"""Helpers shared by the benchmark scripts: the reference corpus, matmul peaks, robust timing summaries."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def corpus_path() -> Path:
    if not SHAKESPEARE.exists():
        raise SystemExit(f"benchmark corpus not found: {SHAKESPEARE}")
    return SHAKESPEARE


def matmul_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 20) -> float:
    """Best achieved FLOP/s of an n x n matmul in `dtype` on this machine right now (the MFU denominator)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def summarize(samples: list[float]) -> str:
    """median [min, max] over repeats, the spread this noisy shared machine shows."""
    return f"{statistics.median(samples):.4g} [{min(samples):.4g}, {max(samples):.4g}]"
