"""Where a monitored step's extra time goes, timed inside the real training loop.

    python benchmarks/flow_breakdown.py [--steps 400]

One shakespeare-char run with everything on at every step (flow.interval=1, TensorBoard, metrics.jsonl,
flow.parquet, the guard), driven through `Trainer.steps()`. The microscope's entry points and parts, and the
sinks, are wrapped in wall-clock timers; the script prints each one's milliseconds per step. Nested entries
overlap (after_step contains the parameters' pass, the depth matrix and the attention sample). "hooks" is
what the microscope's stopwatch booked (flow_ms) beyond its entry points: the forward and gradient hooks.
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

from flowtrain.sinks.jsonl import read_jsonl  # noqa: E402

SPENT: dict[str, float] = collections.defaultdict(float)


def timed(owner, attribute: str, label: str) -> None:
    time_calls(owner, attribute, label, SPENT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    never = args.steps + args.warmup + 1
    overrides = [
        f"train.max_steps={never}",
        "schedule.warmup_steps=1",
        f"train.eval_interval={never}",
        f"train.checkpoint_interval={never}",
        "train.sample_tokens=0",
        "log.tensorboard=true",
        "flow.enabled=true",
        "flow.interval=1",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = shakespeare_trainer(Path(tmp), "breakdown", overrides)
        loop = trainer.steps()
        for _ in range(args.warmup):
            next(loop)
        monitor = trainer.state.monitor
        depth = monitor.depth
        timed(monitor, "after_backward", "monitor.after_backward")
        timed(monitor, "after_step", "monitor.after_step")
        timed(monitor, "collect_all", "monitor.collect_all")
        timed(monitor.params, "before_step", "  params.before_step (the clipper's pass, shared)")
        timed(monitor.params, "after_step", "  params.after_step")
        timed(depth, "raw", "  depth.raw")
        timed(depth.attention, "stats", "    attention.stats (the sample)")
        timed(monitor.logits, "raw", "  logits.raw")
        log = trainer.log  # the loop's sinks, open since the first step
        timed(log, "_write_rows", "run log: rows, records (in groups)")
        timed(log.flow_writer, "write", "  flow.parquet")
        timed(trainer.state.guard, "observe_record", "  guard.observe_record")
        for sink in log.sinks:
            timed(sink, "write", f"sink: {type(sink).__name__}")
        started = time.perf_counter()
        for _ in range(args.steps):
            next(loop)
        total = time.perf_counter() - started
        loop.close()
        rows = [r for r in read_jsonl(trainer.run.metrics) if r["step"] > args.warmup]
        entries = ("monitor.after_backward", "monitor.after_step", "monitor.collect_all")
        booked = sum(r["flow_ms"] for r in rows) / 1e3 - sum(SPENT[k] for k in entries)
        SPENT["hooks (stopwatch beyond the entry points)"] = booked
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.steps} steps")
    print(f"step {1e3 * total / args.steps:.2f} ms (wall, everything on at every step)")
    for label, seconds in sorted(SPENT.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<52} {1e3 * seconds / args.steps:7.3f} ms/step")


if __name__ == "__main__":
    main()
