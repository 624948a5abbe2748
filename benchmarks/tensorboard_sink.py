"""What TensorBoard costs a logging step: shakespeare-char's real microscope records written by TensorBoardSink.

A shakespeare-char trainer runs with the microscope on every step and histograms every step; its records are
then written again and again (each to a new step) in one process: the metrics row alone, the row with the
record's per-layer and along-depth series, and the row with those and the per-layer histograms of gradients and
weights. The microscope's own extra work on a histogram step (sampling gradients and weights, moving them to the
host) is timed on its own. Medians over `--reps`; the step time of the same trainer is printed for scale.

    python benchmarks/tensorboard_sink.py [--reps 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import shakespeare_trainer, time_steps  # noqa: E402

from flowtrain.sinks.tensorboard import TensorBoardSink  # noqa: E402
from flowtrain.train.step import train_step  # noqa: E402


def _median_ms(fn, reps: int) -> float:
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        # log.tensorboard: the trainer samples histograms only for TensorBoard (no sink opens without steps())
        overrides = ["flow.interval=1", "flow.histogram_interval=1", "log.tensorboard=true"]
        trainer = shakespeare_trainer(Path(tmp), "tb", overrides)
        state, monitor = trainer.state, trainer.state.monitor
        step_ms = 1e3 * statistics.median(time_steps(trainer, 30))
        out = train_step(state)
        record = monitor.collect(state.step)
        row = {"loss": float(out.loss), "lr": 1e-3, "grad_norm_preclip": 1.0, "grad_norm_postclip": 1.0,
               "clip_coef": 1.0, "clipped": False, "tokens": 1, "tokens_per_s": 1.0, "step_time_ms": step_ms,
               **record.scalars}  # fmt: skip
        bare = dataclasses.replace(record, histograms={}, weight_histograms={})
        sink = TensorBoardSink(Path(tmp) / "tb")
        step = [0]

        def write(with_record) -> None:
            step[0] += 1
            if with_record is not None:
                sink.write_layers(step[0], with_record)
            sink.write(step[0], row)

        row_ms = _median_ms(lambda i: write(None), args.reps)
        layers_ms = _median_ms(lambda i: write(bare), args.reps)
        hist_ms = _median_ms(lambda i: write(record), args.reps)
        sink.close()
        params, values = monitor.params, monitor.cfg.histogram_values

        def sample(i) -> None:
            grads = params.histogram_samples(monitor.layers, values)
            weights = params.histogram_samples(monitor.layers, values, of="weight")
            torch.cat([t.reshape(-1) for t in (*grads.values(), *weights.values())]).cpu()

        sample_ms = _median_ms(sample, args.reps)
        n_hist = len(record.histograms) + len(record.weight_histograms)
        n_values = len(bare.layer_names) * 2 + len(bare.depth_names) * 3 + (len(bare.depth_names) - 1) * 2
    print(f"shakespeare-char step (microscope on every step): {step_ms:.2f} ms")
    print(f"TensorBoard, metrics row only ({len(row)} values): {row_ms:.3f} ms a logged step")
    print(f"  + per-layer and along-depth series ({n_values} values): {layers_ms:.3f} ms (+{layers_ms - row_ms:.3f})")
    print(f"  + {n_hist} histograms (<= {values} values each): {hist_ms:.3f} ms (+{hist_ms - layers_ms:.3f})")
    print(f"microscope sampling the histograms' values (gradients and weights, to the host): {sample_ms:.3f} ms")
    extra = hist_ms - layers_ms + sample_ms
    print(f"a histogram step costs {extra:.2f} ms more; every 100 steps that is {extra / 100:.3f} ms a step "
          f"({100 * extra / 100 / step_ms:.2f}% of the step)")  # fmt: skip


if __name__ == "__main__":
    main()
