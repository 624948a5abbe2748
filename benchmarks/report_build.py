"""How long `flowtrain report` takes on a long run: 10k steps x 100 parameter tensors (issue 6 asks <= 5 s).

Writes a synthetic but well-formed run directory with the real writers (JsonlSink, FlowParquetWriter) — 12 blocks
of 8 tensors plus embedding and head = 100 tensors, per-layer and depth rows every step, evaluations, a rollback
(discarded records, replayed flow rows) and alerts — then times build_report on it, several times.

    python benchmarks/report_build.py [--steps 10000] [--repeats 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from flowtrain.flow.records import TENSOR_STATS, FlowParquetWriter, FlowRecord, aggregate_layers
from flowtrain.report import build_report
from flowtrain.sinks.jsonl import JsonlSink

N_BLOCKS = 12
BLOCK_TENSORS = [
    "ln1.weight",
    "attn.qkv.weight",
    "attn.proj.weight",
    "ln2.weight",
    "mlp.fc.weight",
    "mlp.fc.bias",
    "mlp.proj.weight",
    "mlp.proj.bias",
]


def tensor_layout() -> tuple[list[str], list[str], np.ndarray]:
    names, layers, numels = ["tok_emb.weight", "pos_emb.weight"], ["embedding", "embedding"], [65 * 768, 1024 * 768]
    for b in range(N_BLOCKS):
        for t in BLOCK_TENSORS:
            names.append(f"blocks.{b}.{t}")
            layers.append(f"block.{b}")
            numels.append(768 * 768 if t.endswith(".weight") and "ln" not in t else 768)
    names += ["norm_f.weight", "lm_head.weight"]
    layers += ["head", "head"]
    numels += [768, 65 * 768]
    return names, layers, np.asarray(numels, dtype=np.float64)


def write_synthetic_run(run: Path, steps: int, seed: int = 0) -> Path:
    """A run directory shaped like a real one; a rollback at 60% replays 50 steps (discarded + duplicates)."""
    rng = np.random.default_rng(seed)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(
        "model: {n_layer: 12, n_head: 12, n_embd: 768}\noptim: {name: adamw, lr: 6.0e-4}\n"
        "clip: {kind: norm, max_norm: 1.0}\nflow: {clip_rate_window: 100}\n"
        f"train: {{max_steps: {steps}, run_name: {run.name}}}\n"
    )
    (run / "env.json").write_text(
        json.dumps({"run_dir_version": 1, "flowtrain_version": "bench", "torch_version": "synthetic", "device": "cpu"})
    )
    names, layers, numels = tensor_layout()
    depth_of = np.repeat(np.arange(N_BLOCKS + 2), [2] + [len(BLOCK_TENSORS)] * N_BLOCKS + [2])
    rollback_at, replay = int(steps * 0.6), 50
    order = list(range(1, rollback_at + 1)) + list(range(rollback_at - replay + 1, steps + 1))
    metrics, alerts, evals = JsonlSink(run / "metrics.jsonl", 1000), JsonlSink(run / "alerts.jsonl"), None
    evals = JsonlSink(run / "eval.jsonl")
    seen: set[int] = set()
    with FlowParquetWriter(run / "flow.parquet") as writer:
        for step in order:
            replayed = step in seen
            seen.add(step)
            t = step / steps
            loss = 4.2 * np.exp(-3 * t) + 1.3 + 0.05 * rng.standard_normal()
            gnorm = 0.8 + 2.0 * np.exp(-6 * t) + 0.1 * abs(rng.standard_normal())
            rec = {
                "loss": loss,
                "lr": 6e-4 * min(1.0, step / 200) * (0.1 + 0.9 * (1 - t)),
                "grad_norm_preclip": gnorm,
                "grad_norm_postclip": min(gnorm, 1.0),
                "clip_coef": min(1.0, 1.0 / gnorm),
                "clipped": bool(gnorm > 1.0),
                "tokens": step * 8192,
                "tokens_per_s": 50000.0 + 100 * rng.standard_normal(),
            }
            if rollback_at - replay < step <= rollback_at and not replayed:  # undone by the rollback
                rec["discarded"] = True
            metrics.write(step, rec)
            if step % 500 == 0 and not rec.get("discarded"):
                evals.write(step, {"val_loss": loss + 0.05, "val_ppl": float(np.exp(loss + 0.05)), "val_bpb": 1.1})
            scale = np.exp(-0.15 * depth_of[::-1]) * (1 + 3 * np.exp(-8 * t))
            stats = np.empty((len(names), len(TENSOR_STATS)), dtype=np.float32)
            g = scale * 0.05 * np.exp(0.2 * rng.standard_normal(len(names)))
            stats[:, 0] = g
            stats[:, 1] = g * 8 / np.sqrt(numels) * 10
            stats[:, 2] = g / np.sqrt(numels)
            stats[:, 3] = 0
            stats[:, 4] = np.sqrt(numels) * 0.02
            stats[:, 5] = stats[:, 4] * 1e-3 * (1 + np.exp(-5 * t))
            stats[:, 6] = stats[:, 5] / stats[:, 4]
            stats[:, 7] = 1e-4
            layer_names, layer_stats = aggregate_layers(layers, stats, numels)
            depth = np.empty((N_BLOCKS + 1, 5), dtype=np.float32)
            depth[:, 0] = 0.3 * np.exp(-0.1 * np.arange(N_BLOCKS + 1)[::-1]) * (1 + rng.random())
            depth[:, 1] = 1 + 0.2 * np.arange(N_BLOCKS + 1) * (1 + t)
            depth[:, 2] = depth[:, 1] * 6
            depth[:, 3] = np.r_[np.nan, 2.0 - 1.5 * t * np.linspace(0.2, 1, N_BLOCKS)]
            depth[:, 4] = np.r_[np.nan, 5 + 10 * t * np.linspace(0.2, 1, N_BLOCKS)]
            writer.write(
                FlowRecord(
                    step=step,
                    scalars={},
                    tensor_names=names,
                    tensor_layers=layers,
                    tensor_stats=stats,
                    layer_names=layer_names,
                    layer_stats=layer_stats,
                    depth_names=[f"h{i}" for i in range(N_BLOCKS + 1)],
                    depth_layers=["embedding"] + [f"block.{b}" for b in range(N_BLOCKS)],
                    depth_stats=depth,
                )
            )
            if step == rollback_at and not replayed:
                alerts.write(
                    step,
                    {
                        "detector": "loss_spike",
                        "action": "rollback",
                        "values": {"z": 9.1},
                        "explanation": "loss jumped 9.1 robust sigma above the window",
                        "suggestion": "lower the LR or skip the data window",
                    },
                )
            elif step % 1000 == 0:
                alerts.write(
                    step,
                    {
                        "detector": "grad_spike",
                        "action": "warn",
                        "values": {"z": 6.5},
                        "explanation": "grad norm spike",
                        "suggestion": "watch it",
                    },
                )
    for sink in (metrics, alerts, evals):
        sink.close()
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="write the run dir and report here instead of a temp dir")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        t0 = time.perf_counter()
        run = write_synthetic_run(root / "bench-run", args.steps)
        print(f"wrote {run} ({args.steps} steps x 100 tensors) in {time.perf_counter() - t0:.1f} s")
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = build_report([run], root / "report.html")
            times.append(time.perf_counter() - t0)
        size = out.stat().st_size / 1e6
        print(
            f"build_report: median {statistics.median(times):.2f} s [min {min(times):.2f}, max {max(times):.2f}]"
            f" over {args.repeats} builds; report {size:.2f} MB"
        )
        return 0 if statistics.median(times) <= 5.0 else 1


if __name__ == "__main__":
    sys.exit(main())
