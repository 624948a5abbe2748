"""Where a whole training run's wall time goes outside its steps: evaluations, checkpoints, logging, the sample.

    python benchmarks/run_split.py [--config shakespeare-char] [--runs 2] [--tensorboard]

One real run of the config as shipped (its evaluations, checkpoints, metrics.jsonl, flow.parquet, the guard,
the closing sample; console off; TensorBoard with --tensorboard), driven by `Trainer.run_loop()` as
`flowtrain train` drives it, in this process. The parts are wrapped in wall-clock timers and printed as seconds
and as shares of the loop's wall time (Trainer built -> run finished; process start and data preparation are
startup.py's). "logging" is the writing of rows, evaluation results and the run's files; the microscope's
records (collecting its device statistics, the guard judging them) happen inside it and are shown as part of it.
Issue 23 asks evaluations, checkpoints and logging together to add <= 5% to a run's wall time.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import shakespeare_trainer, time_calls  # noqa: E402

from flowtrain.flow.guard import Guard  # noqa: E402
from flowtrain.flow.monitor import FlowMonitor  # noqa: E402
from flowtrain.train.run_log import RunLog  # noqa: E402

SPENT: dict[str, float] = collections.defaultdict(float)


def timed(owner, attribute: str, label: str) -> None:
    time_calls(owner, attribute, label, SPENT)


PARTS = (
    ("evaluations (every eval_interval)", "evaluation"),
    ("evaluation of the whole val split at the end", "final_eval"),
    ("checkpoints", "checkpoint"),
    ("logging: rows (metrics.jsonl, flow.parquet, TensorBoard)", "rows"),
    ("  of which the microscope's records (collect, guard)", "records"),
    ("logging: evaluation rows", "eval_rows"),
    ("logging: opening the run log", "open"),
    ("logging: finishing and closing it", "close"),
    ("the closing sample", "sample"),
)


def one_run(config: str, tensorboard: bool) -> dict[str, float]:
    SPENT.clear()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = shakespeare_trainer(Path(tmp), "split", [f"log.tensorboard={str(tensorboard).lower()}"], config)
        timed(trainer.evaluation, "run", "evaluation")
        timed(trainer, "evaluate", "final_eval")  # the loop's own call for the whole split; `run` holds the other
        timed(trainer.checkpoints, "save", "checkpoint")
        timed(trainer, "_closing_sample", "sample")
        started = time.perf_counter()
        trainer.run_loop()
        wall = time.perf_counter() - started
    return {"wall": wall, **SPENT}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="shakespeare-char")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--tensorboard", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timed(RunLog, "write_rows", "rows")
    timed(RunLog, "write_eval", "eval_rows")
    timed(RunLog, "__init__", "open")
    timed(RunLog, "finish", "close")
    timed(RunLog, "close", "close")
    timed(FlowMonitor, "collect_all", "records")
    timed(Guard, "observe_record", "records")
    runs = [one_run(args.config, args.tensorboard) for _ in range(args.runs)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.config}, {args.runs} run(s)")
    print(f"{'loop wall time (Trainer.run_loop)':<58}" + "".join(f"{r['wall']:>9.2f} s" for r in runs))
    for label, key in PARTS:
        cells = "".join(f"{r.get(key, 0.0):>7.2f} s {100 * r.get(key, 0.0) / r['wall']:>4.1f}%" for r in runs)
        print(f"{label:<58}{cells}")
    keys = ("evaluation", "final_eval", "checkpoint", "rows", "eval_rows", "open", "close")
    outside = [sum(r.get(k, 0.0) for k in keys) for r in runs]
    print(f"{'evaluations + checkpoints + logging':<58}" + "".join(
        f"{o:>7.2f} s {100 * o / r['wall']:>4.1f}%" for o, r in zip(outside, runs, strict=True)))  # fmt: skip


if __name__ == "__main__":
    main()
