"""Kill real training runs at random moments, resume them, and count how many end identical to an
uninterrupted run (docs/run-dir.md: crash consistency).

    python benchmarks/kill_trials.py [--trials 20] [--signals KILL TERM] [--steps 30] [--out DIR]

One uninterrupted `flowtrain train` run is the reference (a tiny char-level model on generated text, a
checkpoint every 3 steps, the microscope every step). Each trial starts the same run afresh, waits for its
first metrics row on disk, sends the signal at a uniformly random moment of the time the reference took from
there to its summary.json (training, evaluations, checkpoints, the final evaluation), and
then continues it the way a user would: `--resume` when the directory holds a run (config.yaml), else the
same command again, until it finishes. A SIGTERM trial also checks that the stop was clean: exit 0 and a
checkpoint, or the run had finished. A trial is identical when metrics, evaluation and alert rows,
flow.parquet, summary.json and the final weights (bitwise, through safetensors) equal the reference's,
wall-clock fields aside (tests/train/killing.py: differences).
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
from tests.train import killing  # noqa: E402


def trial(text: Path, base: Path, name: str, steps: int, sig: int, delay: float) -> tuple[list[str], str]:
    """One run signalled `delay` s after its first row, then finished: (differences, what happened)."""
    run = base / "runs" / name
    args = killing.overrides(text, base, name, **{"train.max_steps": steps})
    proc = killing.start(args)
    killing.poll(proc, lambda: killing.logged_steps(run) > 0, timeout=300, every=0.005)
    time.sleep(delay)
    at = killing.logged_steps(run)
    proc.send_signal(sig)
    rc, _, err = killing.finish(proc)
    inside = killing.writing_checkpoint(run)
    what = f"{signal.Signals(sig).name} after {at} rows on disk" + (" inside a checkpoint write" if inside else "")
    clean = rc == 0 and ("flowtrain: stopped by SIGTERM" in err or (run / "summary.json").is_file())
    if sig == signal.SIGTERM and not clean:
        return [f"unclean SIGTERM stop: exit {rc}: {err.strip()[-300:]}"], what
    for _ in range(3):
        proc = killing.start(["--resume", run] if (run / "config.yaml").is_file() else args)
        rc, _, err = killing.finish(proc)
        if rc == 0 and (run / "summary.json").is_file():
            return killing.differences(base / "runs" / "reference", run), what
    return [f"did not finish: exit {rc}: {err.strip()[-300:]}"], what


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="trials per signal")
    parser.add_argument("--signals", nargs="+", default=["KILL", "TERM"], choices=["KILL", "TERM", "INT"])
    parser.add_argument("--steps", type=int, default=30, help="train.max_steps of every run")
    parser.add_argument("--seed", type=int, default=0, help="of the random moments")
    parser.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="kill-trials-") as scratch:
        base = Path(args.out or scratch)
        base.mkdir(parents=True, exist_ok=True)
        text = killing.corpus(base / "corpus.txt")
        reference = killing.start(killing.overrides(text, base, "reference", **{"train.max_steps": args.steps}))
        ref = base / "runs" / "reference"
        killing.poll(reference, lambda: killing.logged_steps(ref) > 0, timeout=300, every=0.005)
        began = time.monotonic()
        killing.poll(reference, lambda: (ref / "summary.json").exists(), timeout=300, every=0.005)
        window = time.monotonic() - began  # first row on disk to the run's end: the random moments land in it
        rc, _, err = killing.finish(reference)
        assert rc == 0, err
        print(f"reference: {args.steps} steps, {window:.2f} s from the first row on disk to summary.json", flush=True)
        for name in args.signals:
            sig = getattr(signal, f"SIG{name}")
            same = inside = 0
            for i in range(args.trials):
                found, what = trial(text, base, f"{name.lower()}{i}", args.steps, sig, rng.uniform(0, window))
                same += not found
                inside += "inside a checkpoint write" in what
                print(f"  {name} trial {i + 1}: {what}: {'identical' if not found else '; '.join(found)}", flush=True)
            print(f"SIG{name}: {same}/{args.trials} identical ({inside} inside a checkpoint write)", flush=True)


if __name__ == "__main__":
    main()
