"""Time to the first training step of the default config, from a fresh process: (a) to the dataset, (b) from it.

    python benchmarks/startup.py [--runs 3] [--modes fresh warm] [--no-cli] [KEY=VALUE ...]

What is measured, per fresh Python process (the median and range over --runs of them are printed):

- import: from just before the process is spawned (the parent's clock) to `import torch` done, and to
  flowtrain's trainer, config and data modules imported (the interpreter's start is in it).
- (a) dataset ready: spawn to `dataset_for(cfg.data)` returned, the prepared token files of the default
  config (`flowtrain train` with no options: the built-in corpus, byte tokens), config loading included.
- (b) dataset ready -> step 1 done: `Trainer(cfg)` (model, optimizer, microscope), then the first
  `next(trainer.steps())`, which opens the sinks (env.json, TensorBoard, metrics.jsonl) and runs step 1 with
  its logging; the issue asks that (b) <= 5 s on a fresh machine. Its parts are printed too.
- total: spawn to step 1 done = (a) + (b).

The child runs what `flowtrain train` runs (load_config, Trainer, the loop of run_loop()), with the prepared
dataset handed to the trainer as `data.dataset` so it is not looked up twice; it stops after step 1 (the
default run has no evaluation or checkpoint there). Modes: `fresh` gives every process an empty dataset cache
and an empty C++ kernel cache (FLOWTRAIN_KERNEL_CACHE): a fresh machine, except that the OS page cache holds
Python and torch (a first start after boot reads them from disk as well); `warm` shares a dataset and kernel
cache filled by an untimed run first. "C++ build" says whether the run's kernel cache gained files (a build
happened in it) and what env.json's `cpu_kernels` says (absent where flowtrain has no such kernels).

`--cli` (default on) adds, as a cross-check from outside, the wall time to exit of `python -m flowtrain train
train.max_steps=1 schedule.warmup_steps=1 train.eval_batches=1 train.sample_tokens=0`: the same start plus
the end of a run (one evaluation batch, a checkpoint, summary.json, closing the sinks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI_END = ["train.max_steps=1", "schedule.warmup_steps=1", "train.eval_batches=1", "train.sample_tokens=0"]


def child(out: Path, overrides: list[str]) -> None:
    """The timed process: marks (time.time()) after each phase, written to `out` as JSON."""
    marks = {}
    import torch  # noqa: F401

    marks["torch"] = time.time()
    from flowtrain.config import load_config
    from flowtrain.data.prepare import dataset_for
    from flowtrain.train.trainer import Trainer

    marks["imported"] = time.time()
    cfg = load_config(None, overrides)
    marks["config"] = time.time()
    cfg.data.dataset = str(dataset_for(cfg.data))
    marks["data_ready"] = time.time()
    trainer = Trainer(cfg)
    marks["trainer"] = time.time()
    loop = trainer.steps()
    next(loop)
    marks["step1"] = time.time()
    loop.close()
    env = trainer.run.root / "env.json"
    kernels = json.loads(env.read_text()).get("cpu_kernels") if env.exists() else None
    out.write_text(json.dumps({"marks": marks, "cpu_kernels": kernels}))


def files(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*")} if folder.exists() else set()


def spawn(command: list[str], kernel_cache: Path) -> tuple[float, float, bool]:
    """Run `command` in a fresh process: (time.time() at spawn, wall seconds to exit, kernel cache grew)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env["FLOWTRAIN_KERNEL_CACHE"] = str(kernel_cache)
    before = files(kernel_cache)
    spawned, started = time.time(), time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"failed (exit {done.returncode}): {' '.join(command)}")
    return spawned, wall, bool(files(kernel_cache) - before)


def places(home: Path, tmp: Path, name: str) -> list[str]:
    """Overrides: the dataset cache under `home`, the run directory under `tmp`."""
    return [f"data.cache_dir={home / 'data'}", f"train.out_dir={tmp / 'runs'}", f"train.run_name={name}"]


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):6.2f} s [{min(values):.2f}, {max(values):.2f}]"


def measure(mode: str, runs: int, tmp: Path, overrides: list[str], cli: bool) -> None:
    shared = tmp / mode  # warm: one dataset and kernel cache for every run, filled by an untimed run
    rows: dict[str, list[float]] = {}
    builds, kernels = [], set()
    for i in range(-1 if mode == "warm" else 0, runs):
        home = shared if mode == "warm" else tmp / f"{mode}-{i}"  # fresh: empty caches each time
        out = tmp / f"{mode}-{i}.json"
        command = [sys.executable, __file__, "--child", str(out), *places(home, tmp, f"{mode}-{i}"), *overrides]
        spawned, _, built = spawn(command, home / "kernels")
        if i < 0:
            print(f"  {mode}: untimed first run filled the caches (C++ build: {'yes' if built else 'no'})")
            continue
        result = json.loads(out.read_text())
        m = result["marks"]
        phases = {
            "import torch (from spawn)": m["torch"] - spawned,
            "import flowtrain (from spawn)": m["imported"] - spawned,
            "(a) spawn -> dataset ready": m["data_ready"] - spawned,
            "    of which config + dataset": m["data_ready"] - m["imported"],
            "(b) dataset ready -> step 1 done": m["step1"] - m["data_ready"],
            "    of which Trainer(cfg)": m["trainer"] - m["data_ready"],
            "    of which sinks + step 1": m["step1"] - m["trainer"],
            "total spawn -> step 1 done": m["step1"] - spawned,
        }
        if cli:
            cli_home = home if mode == "warm" else tmp / f"{mode}-cli-{i}"
            end = [*places(cli_home, tmp, f"cli-{mode}-{i}"), *CLI_END, *overrides]
            command = [sys.executable, "-m", "flowtrain", "train", *end]
            phases["cli: wall to exit (max_steps=1)"] = spawn(command, cli_home / "kernels")[1]
        for name, value in phases.items():
            rows.setdefault(name, []).append(value)
        builds.append(built)
        kernels.add(str(result["cpu_kernels"]) if result["cpu_kernels"] is not None else "no cpu_kernels in env.json")
    print(f"  {mode}: {runs} processes")
    for name, values in rows.items():
        print(f"    {name:<34} {spread(values)}")
    print(f"    C++ build during the run: {sum(builds)} of {len(builds)}; env.json cpu_kernels: {'; '.join(kernels)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed fresh processes per mode")
    parser.add_argument("--modes", nargs="+", default=["fresh", "warm"], choices=["fresh", "warm"])
    parser.add_argument("--cli", action=argparse.BooleanOptionalAction, default=True, help="also time the CLI")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # the timed process writes its marks here
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (default: none)")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.overrides)
        return
    print(f"default config, {args.runs} fresh processes per mode; working tree {ROOT}; overrides {args.overrides}")
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        for mode in args.modes:
            measure(mode, args.runs, Path(tmp), args.overrides, args.cli)


if __name__ == "__main__":
    main()
