"""Whole shakespeare-char runs of a baseline revision against this checkout, alternating run by run.

    python benchmarks/vs_main.py [--runs 2] [--steps N] [--baseline a2c2729]

What is timed: the wall time of a whole `python -m flowtrain train -c shakespeare-char ...` subprocess (nanoGPT's
CPU recipe on Tiny Shakespeare, 2000 steps by default: interpreter start, imports, model build, every step,
the evaluations, checkpoints and the end-of-run sample; each side with its own defaults, the microscope
included), once with PYTHONPATH at the baseline's `src/` (a `git archive` of --baseline, default a2c2729: the
main before the rewrite) and once at this checkout's `src/`. The runs alternate A B B A A B ..., so a slow
stretch of a shared machine falls on both sides, and each pair (one run of each side, adjacent) gives one
new/baseline ratio; the median of the pair ratios is the figure to quote, with the walls' median and range per
side beside it. A ratio below 1 means the working tree is faster.

Outside the timing: the dataset is prepared once into one cache directory that every run reads
(`data.cache_dir`), and each side first does one untimed warm-up run of `--warmup-steps` steps (that is where a
side that compiles C++ kernels on first use builds them into its cache). Both sides get the same environment
and thread count; nothing else is shared between runs (fresh processes, fresh run directories).

Also printed per run: the final val loss (the last row of the run's eval.jsonl) and summary.json's best val
loss: the same seed and recipe on both sides, so a difference here is a change of numerics, not noise.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 100  # shakespeare-char's schedule.warmup_steps
sys.path.insert(0, str(Path(__file__).parent))
from _common import corpus_path  # noqa: E402


def baseline_src(rev: str, dest: Path) -> Path:
    """The baseline's `src/` unpacked under `dest` (git archive: no worktree is registered in the repository)."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True, text=True
    )
    if commit.returncode != 0:
        raise SystemExit(f"unknown baseline revision {rev!r}: {commit.stderr.strip()}")
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit.stdout.strip(), "src"],
                         capture_output=True, check=True)  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as archive:
        archive.extractall(dest, filter="data")
    return dest / "src"


def last_row(path: Path, key: str) -> float | None:
    """`key` of the last JSON line of `path` that has it (None when there is none)."""
    if not path.exists():
        return None
    found = None
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if key in row:
            found = float(row[key])  # non-finite values are written as "nan"/"inf" strings
    return found


def train(src: Path, work: Path, name: str, cache: Path, extra: list[str]) -> dict:
    """One whole run in a fresh process with PYTHONPATH=src: its wall seconds, val losses and env facts."""
    command = [
        sys.executable, "-m", "flowtrain", "train", "-c", "shakespeare-char",
        f"data.sources=[{corpus_path()}]", f"data.cache_dir={cache}", f"train.out_dir={work / 'runs'}",
        f"train.run_name={name}", "log.console=false", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(src)}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"run {name} failed (exit {done.returncode}): {' '.join(command)}")
    run = work / "runs" / name
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    env_json = json.loads((run / "env.json").read_text()) if (run / "env.json").exists() else {}
    return {
        "wall": wall,
        "val_loss": last_row(run / "eval.jsonl", "val_loss"),
        "best_val_loss": summary.get("best_val_loss"),
        "env": {k: env_json[k] for k in ("cpu_kernels", "cpu_hooks", "optimizer_step", "num_threads") if k in env_json},
    }


def steps(n: int) -> list[str]:
    """Overrides for an n-step run: the recipe's 100 warmup steps must fit in it (shortened to n // 10 if not)."""
    return [f"train.max_steps={n}", *([f"schedule.warmup_steps={max(1, n // 10)}"] if n < WARMUP else [])]


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.4g} [{min(values):.4g}, {max(values):.4g}]"


def fmt_loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="timed runs per side")
    parser.add_argument("--steps", type=int, help="train.max_steps (default: the config's, 2000)")
    parser.add_argument("--baseline", default="a2c2729", help="the git revision to compare against")
    parser.add_argument("--warmup-steps", type=int, default=20, help="steps of each side's untimed first run")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more config overrides for both sides")
    args = parser.parse_args()
    extra = [*args.overrides, *(steps(args.steps) if args.steps else [])]
    with tempfile.TemporaryDirectory(prefix="vs_main-") as tmp:
        tmp_path = Path(tmp)
        sides = {"baseline": baseline_src(args.baseline, tmp_path / "baseline"), "new": ROOT / "src"}
        cache = tmp_path / "cache"
        print(f"baseline {args.baseline} vs the working tree {ROOT}; shakespeare-char, overrides {extra or 'none'}")
        warmup = [*args.overrides, *steps(args.warmup_steps)]
        for side, src in sides.items():  # untimed: dataset preparation, kernel builds, page cache
            warm = train(src, tmp_path, f"warmup-{side}", cache, warmup)
            print(f"  warm-up {side:<8}: {warm['wall']:.1f} s (untimed); env {warm['env']}", flush=True)
        results: dict[str, list[dict]] = {side: [] for side in sides}
        for i in range(args.runs):
            order = ["baseline", "new"] if i % 2 == 0 else ["new", "baseline"]  # A B, B A, A B, ...
            for side in order:
                result = train(sides[side], tmp_path, f"{side}-{i}", cache, extra)
                results[side].append(result)
                print(f"  pair {i + 1} {side:<8}: {result['wall']:.2f} s, final val loss {fmt_loss(result['val_loss'])}"
                      f", best {fmt_loss(result['best_val_loss'])}", flush=True)  # fmt: skip
    print("\nwall seconds per run:")
    for side, runs in results.items():
        walls = [r["wall"] for r in runs]
        print(f"  {side:<8}: {spread(walls)}  (each {', '.join(f'{w:.2f}' for w in walls)})")
    ratios = [n["wall"] / b["wall"] for n, b in zip(results["new"], results["baseline"], strict=True)]
    each = ", ".join(f"{r:.4f}" for r in ratios)
    print(f"new / baseline per adjacent pair: {each}; median {statistics.median(ratios):.4f}")
    for side, runs in results.items():
        finals = [r["val_loss"] for r in runs if r["val_loss"] is not None]
        if finals:
            print(f"final val loss, {side:<8}: {spread(finals)}")


if __name__ == "__main__":
    main()
