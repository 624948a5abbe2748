"""Step-time overhead of the gradient-flow microscope in the real training loop: monitoring off vs everything on.

    python benchmarks/flow_overhead.py [--blocks 40] [--block 10] [--intervals 1 auto 10] [--big] [--processes 5]
    python benchmarks/flow_overhead.py --device cuda --big [--config gpt2-124m]
    python benchmarks/flow_overhead.py --foreign [--intervals 1 auto] [--processes 5]

Two real runs of shakespeare-char (nanoGPT's CPU recipe: 4 layers, 4 heads, 128 wide, context 64, batch 12,
fused AdamW, clip 1.0) on Tiny Shakespeare live in one process, with the product's defaults (TensorBoard,
metrics.jsonl, flow.parquet and the guard on): one with `flow.enabled=false`, one with the microscope on at
the interval under test. Each is driven through `Trainer.steps()` (the loop `run_loop()` runs: step, logging,
sinks, guard), and the two take turns in blocks of `--block` steps, the order flipping every block, so the
drifts of a shared, noisy machine hit both within seconds instead of between whole runs. Evaluation and
checkpoints fall outside the timed steps.

A block's figure is the mean wall time of its steps (the mean, so a cost paid once every `interval` steps is
amortized; the block length should be a multiple of the interval), a block pair gives one on/off ratio, and
the script prints the median ratio over the pairs with its quartiles and range (the figure we quote), and, as
a second view on the CPU, the on/off ratio of single-step times at their 10th and 50th percentiles (a burst
of the machine moves a block's mean; it moves the low quantiles of single steps less; with an interval above
1 these mix monitored and unmonitored steps, so quote them for interval 1 only). "stopwatch" is the
microscope's own time booked per step (`flow_ms`; it includes the gradient pass the clipper would otherwise
make, so it can exceed the extra time). --big adds a 12-layer, 768-wide model (context 64, batch 12).
On a GPU (`--device cuda`) each block ends by waiting for the device, so a block's time covers its work;
`--config gpt2-124m` runs that config instead (bf16, torch.compile, batch 16 x 1024 with its accumulation).

`--processes N` repeats everything in N fresh processes and quotes the median of their ratios: where the
allocator places a run's tensors biases its step time for the life of the process (see in_processes).
`--intervals control` times two monitoring-off runs against each other: the bias and noise of the measurement.

`--foreign` times a model that is not flowtrain's instead (benchmarks/_foreign.py: a nanoGPT-shaped GPT of the
same recipe, written with torch alone, trained in a plain loop with torch's fused AdamW and clip_grad_norm_):
one instance bare, one with `FlowMonitor(model, optimizer, FlowConfig(interval=...))` and only its public
calls (after_backward, after_step, collect_all every 10 steps: the collect's cost is amortized over them, so
keep --block a multiple of 10). No trainer, sinks, guard or metrics rows on either side: the ratio is the
microscope's cost on a user's own loop. Here the stopwatch covers no pass a clipper would make anyway (the
loop clips with torch's clip_grad_norm_, which does not reuse the microscope's sums). The microscope finds no
attention it can read in this model (no attention_logits/attention_probs, no flowtrain kernel tap), so its
attention entropy and max logit are NaN there: the on side does that much less than on flowtrain's GPT.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _foreign  # noqa: E402
from _common import corpus_path, shakespeare_trainer, summarize, synchronize  # noqa: E402

from flowtrain.flow.budget import WINDOW  # noqa: E402
from flowtrain.flow.config import FlowConfig  # noqa: E402
from flowtrain.sinks.jsonl import read_jsonl  # noqa: E402

BIG = ["model.n_layer=12", "model.n_head=12", "model.n_embd=768"]
FULL_STEPS = 100  # flow.full_steps of the auto variant: its every-step phase, run before the timed blocks


def side_by_side(
    workdir: Path, variants: dict[str, list[str]], blocks: int, block: int, warmup: int, config: str
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[dict]]]:
    """Per variant: the mean step ms of each timed block, every timed step's ms, and the metrics.jsonl rows of
    its timed steps."""
    total = warmup + blocks * block
    common = [
        f"train.max_steps={total + 1}",  # the last step (eval, checkpoint) is never driven
        "schedule.warmup_steps=1",
        f"train.eval_interval={total + 1}",
        "train.eval_batches=1",
        f"train.checkpoint_interval={total + 1}",
        "train.sample_tokens=0",
        "log.tensorboard=true",
    ]
    trainers = {name: shakespeare_trainer(workdir, name, [*common, *extra], config) for name, extra in variants.items()}
    device = next(iter(trainers.values())).device
    loops = {name: t.steps() for name, t in trainers.items()}
    means: dict[str, list[float]] = {name: [] for name in variants}
    each: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for loop in loops.values():  # one run after the other: auto sees its own step times while it chooses
            for _ in range(warmup):
                next(loop)
        for b in range(blocks):
            order = list(variants) if b % 2 == 0 else list(reversed(variants))
            for name in order:
                synchronize(device)
                started = step_started = time.perf_counter()
                for _ in range(block):
                    next(loops[name])
                    if device.type == "cpu":  # on a GPU a step's wall time says little without a sync
                        now = time.perf_counter()
                        each[name].append((now - step_started) * 1e3)
                        step_started = now
                synchronize(device)
                means[name].append((time.perf_counter() - started) * 1e3 / block)
    finally:
        for loop in loops.values():
            loop.close()  # closes the sinks: metrics.jsonl is complete
    rows = {name: [r for r in read_jsonl(t.run.metrics) if r["step"] > warmup] for name, t in trainers.items()}
    return means, each, rows


def quartiles(values: list[float]) -> str:
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return f"{q2:.4g} (quartiles {q1:.4g}-{q3:.4g}, range {min(values):.4g}-{max(values):.4g})"


def compare(
    label: str,
    blocks: int,
    block: int,
    warmup: int,
    model: list[str],
    interval: str,
    config: str = "shakespeare-char",
    foreign: torch.device | None = None,
) -> dict:
    """One on/off comparison of flowtrain's trainer, or of the foreign model on `foreign` (a device)."""
    on = ["flow.enabled=true", f"flow.interval={interval if interval != 'control' else 1}"]
    flow = FlowConfig(interval=int(interval) if interval.isdigit() else "auto")
    if interval == "auto":  # past its every-step phase and first check before the timed blocks; no re-choice
        on += [f"flow.full_steps={FULL_STEPS}", f"flow.reprobe_steps={10 * blocks * block}"]  # while timed
        flow = FlowConfig(interval="auto", full_steps=FULL_STEPS, reprobe_steps=10 * blocks * block)
        warmup = max(warmup, FULL_STEPS + WINDOW + 5)
    variants = {"off": [*model, "flow.enabled=false"], "on": [*model, *on]}
    if interval == "control":  # both runs monitoring off: the measurement's own bias and noise (ratio ~1)
        variants["on"] = variants["off"]
    if foreign is not None:  # the off side is the bare model: no monitor at all
        flows = {"off": None, "on": None if interval == "control" else flow}
        means, each, rows = _foreign.side_by_side(corpus_path(), flows, blocks, block, warmup, foreign)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            means, each, rows = side_by_side(Path(tmp), variants, blocks, block, warmup, config)
    ratios = [a / b for a, b in zip(means["on"], means["off"], strict=True)]
    extra = [a - b for a, b in zip(means["on"], means["off"], strict=True)]
    stopwatch = statistics.fmean([r.get("flow_ms", 0.0) for r in rows["on"]] or [0.0])  # none: a bare control
    total_ratio = statistics.fmean(means["on"]) / statistics.fmean(means["off"])
    print(label)
    for name, values in means.items():
        print(f"  monitoring {name:<3}: step ms median [min, max] over blocks {summarize(values)}")
    print(f"  on (interval {interval}) / off ratio: {quartiles(ratios)}; {blocks} block pairs of {block} steps")
    print(f"  ratio of the means over all timed steps: {total_ratio:.4f}")
    print(f"  extra ms per step {summarize(extra)}; microscope stopwatch {stopwatch:.3g} ms per step")
    if each["on"] and len(each["off"]) >= 20:  # a second view: quantiles of single steps, less moved by bursts
        on_q, off_q = (statistics.quantiles(each[name], n=10) for name in ("on", "off"))
        views = [f"p{10 * (i + 1)} {on_q[i] / off_q[i]:.4f} (+{on_q[i] - off_q[i]:.2f} ms)" for i in (0, 4)]
        print(f"  single steps, on / off at the same quantile: {'; '.join(views)}")
    if interval == "auto":
        print(f"  interval auto chose: {sorted({r.get('flow_interval') for r in rows['on']})}")
    return {"label": f"{label}, interval {interval}", "ratios": ratios, "extra": extra, "stopwatch": stopwatch}


def in_processes(count: int, argv: list[str]) -> None:
    """Run the whole comparison `count` times, each in a fresh process, and summarize over them.

    Why: where the allocator puts a run's tensors moves its step time by 0.1-0.4 ms for the life of the process
    (two monitoring-off instances of the same model differ by that much), ~1% of a shakespeare-char step, so
    one process's ratio carries a placement bias that no number of block pairs averages away. Fresh processes
    draw fresh placements: the median over processes is the figure to quote."""
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            out = Path(tmp) / f"run{i}.json"
            print(f"-- process {i + 1} of {count}", flush=True)
            subprocess.run([sys.executable, __file__, *argv, "--processes", "1", "--result", str(out)], check=True)
            for result in json.loads(out.read_text()):
                results.setdefault(result["label"], []).append(result)
    print(f"\nover {count} processes (each: the median on/off ratio of its block pairs):")
    for label, runs in results.items():
        medians = [statistics.median(r["ratios"]) for r in runs]
        pooled = [x for r in runs for x in r["ratios"]]
        extra = statistics.median([statistics.median(r["extra"]) for r in runs])
        stopwatch = statistics.median([r["stopwatch"] for r in runs])
        each = ", ".join(f"{m:.3f}" for m in medians)
        print(f"  {label}: median {statistics.median(medians):.3f} (each {each}; all block pairs {quartiles(pooled)})")
        print(f"    extra ms per step (median of the processes' medians) {extra:.3f}; stopwatch {stopwatch:.3g} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=40, help="block pairs (each variant runs this many blocks)")
    parser.add_argument("--block", type=int, default=10, help="steps per block")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps of each run first")
    parser.add_argument("--big", action="store_true")
    parser.add_argument("--big-blocks", type=int, default=6)
    parser.add_argument("--big-block", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--intervals", nargs="+", default=["1"], help="flow.interval values to compare (N, auto; control: off vs off)"
    )
    parser.add_argument("--device", default="cpu", help="train.device for both runs (cpu, cuda, auto)")
    parser.add_argument("--config", default="shakespeare-char", help="the recipe (another one keeps its own data)")
    parser.add_argument("--processes", type=int, default=1, help="repeat everything in N fresh processes")
    parser.add_argument("--foreign", action="store_true", help="a nanoGPT-shaped model of our own, plain loop")
    parser.add_argument("--result", help=argparse.SUPPRESS)  # a child process writes its figures here (JSON)
    args = parser.parse_args()
    if args.processes > 1:
        argv = sys.argv[1:]
        if "--processes" in argv:
            at = argv.index("--processes")
            del argv[at : at + 2]
        argv = [a for a in argv if not a.startswith("--processes=")]
        in_processes(args.processes, argv)
        return
    torch.set_num_threads(args.threads)
    device = [f"train.device={args.device}"]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}")
    label = args.config
    if label == "shakespeare-char":
        label += " (4 layers, 128 wide, ctx 64, batch 12)"
    if args.foreign:
        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        label = "foreign nanoGPT-shaped GPT, plain loop (4 layers, 128 wide, ctx 64, batch 12)"
        foreign = torch.device("cuda" if cuda else "cpu")
        results = [compare(label, args.blocks, args.block, args.warmup, [], i, foreign=foreign) for i in args.intervals]
    else:
        results = [compare(label, args.blocks, args.block, args.warmup, device, i, args.config) for i in args.intervals]
    if args.big and not args.foreign:
        big = "12 layers, 768 wide, ctx 64, batch 12"
        results.append(compare(big, args.big_blocks, args.big_block, 2, [*BIG, *device], "1"))
    if args.result:
        Path(args.result).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
