"""Step-time overhead of the gradient-flow microscope in the real training loop: monitoring off vs everything on.

    python benchmarks/flow_overhead.py [--steps 60] [--rounds 5] [--big]

Each variant is a real `Trainer.run_loop()` on shakespeare-char (nanoGPT's CPU recipe: 4 layers, 4 heads, 128
wide, context 64, batch 12, fused AdamW, clip 1.0) on Tiny Shakespeare, with the product's defaults (TensorBoard
and metrics.jsonl on, guard on) in both variants; "on" adds the microscope with everything every step
(per-tensor and per-layer stats, update/weight ratios, residual gradients, activations, attention sample,
logits, flow.parquet, per-layer TensorBoard series). The step time is the trainer's own `step_time_ms` (a
whole loop iteration: the step plus its logging; evaluation and checkpoints excluded), averaged over each run's
steps after a warm-up (mean over the run's steps, so a cost paid every `interval` steps is amortized).
Variants alternate order in rounds so a shared machine's drifts hit both. Prints the
median ratio of per-round medians and the spread.
--big adds a 12-layer, 768-wide model (context 64, batch 12; fewer steps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import shakespeare_trainer, summarize  # noqa: E402

from flowtrain.sinks.jsonl import read_jsonl  # noqa: E402

BIG = ["model.n_layer=12", "model.n_head=12", "model.n_embd=768"]


def run_once(workdir: Path, name: str, steps: int, warmup: int, extra: list[str]) -> tuple[float, float, float]:
    """(mean step ms, mean microscope stopwatch ms, last flow interval) of one real run of `steps` steps,
    skipping the first `warmup`.

    The mean, not the median: with flow.interval > 1 the cost sits in one step of every `interval`, and only
    the mean shows it amortized."""
    trainer = shakespeare_trainer(
        workdir,
        name,
        [
            f"train.max_steps={steps}",
            "schedule.warmup_steps=1",
            f"train.eval_interval={steps}",
            "train.eval_batches=1",
            f"train.checkpoint_interval={steps}",
            "train.sample_tokens=0",
            "log.tensorboard=true",
            *extra,
        ],
    )
    summary = trainer.run_loop()
    rows = [r for r in read_jsonl(summary.run_dir / "metrics.jsonl") if r["step"] > warmup]
    flow_ms = statistics.fmean(r.get("flow_ms", 0.0) for r in rows)
    return statistics.fmean(r["step_time_ms"] for r in rows), flow_ms, rows[-1].get("flow_interval", 0)


def compare(label: str, steps: int, rounds: int, warmup: int, model: list[str], interval: str = "1") -> None:
    """interval "auto": the run is `full` steps longer (monitored every step), and those steps are left out of
    the mean of both variants: the figure is auto's steady state once it has chosen its interval."""
    variants = {"off": ["flow.enabled=false"], "on": ["flow.enabled=true", f"flow.interval={interval}"]}
    if interval == "auto":
        full = 100
        variants["on"] += [f"flow.full_steps={full}", f"flow.reprobe_steps={steps}"]
        steps, warmup = steps + full, warmup + full
    medians: dict[str, list[float]] = {k: [] for k in variants}
    stopwatch, chosen = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                run = f"{name}-{r}"
                step_ms, flow_ms, every = run_once(Path(tmp), run, steps, warmup, [*model, *variants[name]])
                medians[name].append(step_ms)
                if name == "on":
                    stopwatch.append(flow_ms)
                    chosen.append(every)
    ratios = [on / off for on, off in zip(medians["on"], medians["off"])]
    extra = [on - off for on, off in zip(medians["on"], medians["off"])]
    print(label)
    for name, values in medians.items():
        print(f"  monitoring {name:<3}: step ms median [min, max] over rounds {summarize(values)}")
    spread = f"per-round ratios, {rounds} rounds of {steps} steps"
    print(f"  on (interval {interval}) / off ratio: {summarize(ratios)} ({spread})")
    print(f"  extra ms per step {summarize(extra)}; microscope stopwatch ms per step {summarize(stopwatch)}")
    if interval == "auto":
        print(f"  interval auto chose: {sorted(chosen)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--big", action="store_true")
    parser.add_argument("--big-steps", type=int, default=8)
    parser.add_argument("--big-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--intervals", nargs="+", default=["1"], help="flow.interval values to compare (N or auto)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for interval in args.intervals:
        compare("shakespeare-char (4 layers, 128 wide, ctx 64, batch 12)", args.steps, args.rounds, 10, [], interval)
    if args.big:
        compare("12 layers, 768 wide, ctx 64, batch 12", args.big_steps, args.big_rounds, 2, BIG)


if __name__ == "__main__":
    main()
