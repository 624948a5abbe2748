"""Real `flowtrain train` processes, killed and resumed: the helpers of tests/train/test_kill.py and
benchmarks/kill_trials.py (which imports them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def corpus(path: Path, kb: int = 40) -> Path:
    """Deterministic text of plain words (the tests' own data: nothing outside the repository)."""
    import random

    rng = random.Random(0)
    words = [
        "the",
        "flow",
        "of",
        "gradients",
        "through",
        "deep",
        "residual",
        "networks",
        "stays",
        "healthy",
        "when",
        "norms",
        "are",
        "watched",
    ]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(kb * 1024 // 80)]
    path.write_text("\n".join(lines) + "\n")
    return path


def overrides(text: Path, base: Path, name: str = "run", **extra) -> list[str]:
    """A tiny char-level run: a checkpoint every 3 steps, every row written at its step, microscope every step."""
    cfg = {
        "data.sources": str(text),
        "data.tokenizer": "char",
        "data.split_by": "tokens",
        "data.cache_dir": str(base / "cache"),
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 32,
        "model.block_size": 32,
        "train.batch_size": 4,
        "train.max_steps": 30,
        "train.eval_interval": 10,
        "train.eval_batches": 2,
        "train.checkpoint_interval": 3,
        "train.keep_last": 2,
        "train.out_dir": str(base / "runs"),
        "train.run_name": name,
        "train.sample_tokens": 0,
        "schedule.warmup_steps": 5,
        "flow.interval": 1,
        "log.console": False,
        "log.tensorboard": False,
        **extra,
    }
    return [f"{k}={v}" for k, v in cfg.items()]


def env() -> dict[str, str]:
    """One thread (bitwise the same math in every process), this checkout's package first."""
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flowtrain", "train", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def writing_checkpoint(run: Path) -> bool:
    """A checkpoint directory in progress (fsutil.atomic_directory's temporary) is there."""
    try:
        return any(e.name.startswith(".step_") and ".tmp-" in e.name for e in os.scandir(run / "checkpoints"))
    except FileNotFoundError:
        return False


def checkpoint_steps(run: Path) -> list[int]:
    try:
        names = os.listdir(run / "checkpoints")
    except FileNotFoundError:
        return []
    return sorted(int(n[5:]) for n in names if n.startswith("step_"))


def logged_steps(run: Path) -> int:
    """Rows in metrics.jsonl (lines, read without parsing: a line may be half written)."""
    try:
        return (run / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def poll(proc: subprocess.Popen, condition, timeout: float = 60, every: float = 0.0002) -> bool:
    """Wait until `condition()` holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(every)
    raise TimeoutError("the condition never held")


def kill_during_checkpoint_write(args: list[str], run: Path, tries: int = 4) -> tuple[bool, int]:
    """Start (or resume) and SIGKILL the moment a checkpoint write is seen, until the kill lands inside one
    (its temporary is still there after the process died). (landed, processes started)."""
    for attempt in range(1, tries + 1):
        proc = start(args if attempt == 1 else ["--resume", run])
        if poll(proc, lambda: writing_checkpoint(run)):
            proc.kill()
        proc.wait()
        if writing_checkpoint(run):
            return True, attempt
        args = ["--resume", run]
    return False, tries


def kill_after_new_checkpoint(args: list[str], run: Path, sig: int = signal.SIGKILL) -> subprocess.Popen:
    """Start (or resume) and send `sig` the moment a checkpoint newer than the ones there appears."""
    before = max(checkpoint_steps(run), default=0)
    proc = start(args)
    if poll(proc, lambda: max(checkpoint_steps(run), default=0) > before):
        proc.send_signal(sig)
    return proc


def rows(path: Path, timing: frozenset) -> list[dict]:
    """A JSONL file's rows without the wall-clock fields."""
    if not path.exists():
        return []
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in path.read_text().splitlines()]


def differences(a: Path, b: Path) -> list[str]:
    """What differs between two finished runs' files, wall-clock fields aside: metrics, evaluation and alert
    rows, flow.parquet, summary.json, and the final weights (bitwise, through safetensors)."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import load_file

    from flowtrain.rundir import TIMING_FIELDS

    found = []
    for name in ("metrics.jsonl", "eval.jsonl", "alerts.jsonl"):
        ra, rb = rows(a / name, TIMING_FIELDS), rows(b / name, TIMING_FIELDS)
        if ra != rb:
            bad = next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
            found.append(f"{name}: {len(ra)} vs {len(rb)} rows, first difference at row {bad}")
    fa, fb = pq.read_table(a / "flow.parquet").to_pydict(), pq.read_table(b / "flow.parquet").to_pydict()
    for column in sorted(set(fa) | set(fb) - TIMING_FIELDS):
        if column in TIMING_FIELDS:
            continue
        try:
            np.testing.assert_array_equal(np.array(fa.get(column)), np.array(fb.get(column)))  # NaN == NaN
        except AssertionError:
            found.append(f"flow.parquet: column {column} differs")
    if json.loads((a / "summary.json").read_text()) != json.loads((b / "summary.json").read_text()):
        found.append("summary.json differs")
    last_a, last_b = max(checkpoint_steps(a)), max(checkpoint_steps(b))
    wa = load_file(str(a / "checkpoints" / f"step_{last_a:06d}" / "model.safetensors"))
    wb = load_file(str(b / "checkpoints" / f"step_{last_b:06d}" / "model.safetensors"))
    if last_a != last_b or wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
        found.append(f"final weights differ (step {last_a} vs {last_b})")
    return found
