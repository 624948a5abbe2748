"""Synthetic run directories written with the real writers (JsonlSink, FlowParquetWriter + FlowRecord).

Values are closed forms of (step, layer) so tests can check what the report loaded against an independent
computation: layer l's grad norm at step s is (l + 1) * 0.9**s, its update ratio 1e-3 * (l + 1) / s, and so on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from flowtrain.flow.records import DEPTH_STATS, TENSOR_STATS, FlowParquetWriter, FlowRecord
from flowtrain.sinks.jsonl import JsonlSink

LAYERS = ["embedding", "block.0", "block.1", "head"]
TENSORS = [
    ("tok_emb.weight", "embedding"),
    ("blocks.0.attn.weight", "block.0"),
    ("blocks.1.attn.weight", "block.1"),
    ("lm_head.weight", "head"),
]


def layer_value(stat: str, step: int, layer: int) -> float:
    """The closed form each synthetic per-layer stat follows."""
    base = {
        "grad_norm": 1.0,
        "grad_max_abs": 0.5,
        "grad_rms": 0.01,
        "grad_nonfinite": 0.0,
        "weight_norm": 10.0,
        "update_norm": 0.01,
        "update_ratio": 1e-3,
        "adam_v_rms": 1e-4,
    }[stat]
    if stat == "grad_nonfinite":
        return 0.0
    if stat == "update_ratio":
        return base * (layer + 1) / step
    return base * (layer + 1) * 0.9**step


def depth_value(stat: str, step: int, boundary: int) -> float:
    if stat in ("attn_entropy", "attn_max_logit") and boundary == 0:
        return float("nan")  # h_0 has no attention: nothing produced it
    return {
        "resid_grad_norm": 0.1 * (boundary + 1),
        "act_rms": 1.0 + 0.1 * boundary + 0.01 * step,
        "act_max_abs": 5.0 + boundary,
        "attn_entropy": 2.0 - 0.01 * step * boundary,
        "attn_max_logit": 3.0 + 0.1 * step * boundary,
    }[stat]


def flow_record(step: int, n_depth: int = 3, bump: float = 1.0) -> FlowRecord:
    layer_stats = np.array(
        [
            [layer_value(s, step, li) * (bump if s == "grad_norm" else 1.0) for s in TENSOR_STATS]
            for li in range(len(LAYERS))
        ],
        dtype=np.float32,
    )
    depth_stats = np.array([[depth_value(s, step, b) for s in DEPTH_STATS] for b in range(n_depth)], dtype=np.float32)
    return FlowRecord(
        step=step,
        scalars={},
        tensor_names=[n for n, _ in TENSORS],
        tensor_layers=[lay for _, lay in TENSORS],
        tensor_stats=layer_stats,
        layer_names=list(LAYERS),
        layer_stats=layer_stats,
        depth_names=[f"h{b}" for b in range(n_depth)],
        depth_layers=["embedding"] + [f"block.{b}" for b in range(n_depth - 1)],
        depth_stats=depth_stats,
    )


def write_run(
    root: Path,
    *,
    steps: int = 30,
    name: str | None = None,
    flow: bool = True,
    alerts: bool = True,
    evals: bool = True,
    lr: float = 1e-3,
    rollback: tuple[int, int] | None = None,
    alert_text: str = "loss jumped",
    run_name_in_config: str | None = None,
) -> Path:
    """A run directory. rollback=(at, n): steps at-n+1..at are logged, marked discarded, then replayed, and their
    flow rows written twice (the replay's grad norms are bumped x2 so a test can tell which one was kept)."""
    run = root if name is None else root / name
    run.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model": {"n_layer": 2, "n_embd": 32},
        "optim": {"name": "adamw", "lr": lr},
        "clip": {"kind": "norm", "max_norm": 1.0},
        "flow": {"clip_rate_window": 5},
        "train": {"max_steps": steps, "run_name": run_name_in_config or run.name},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "env.json").write_text(
        json.dumps(
            {
                "run_dir_version": 1,
                "flowtrain_version": "0.1.0",
                "torch_version": "2.13.0",
                "device": "cpu",
                "git_commit": "abc123",
            }
        )
    )
    order = list(range(1, steps + 1))
    if rollback is not None:
        at, n = rollback
        order = list(range(1, at + 1)) + list(range(at - n + 1, steps + 1))
    metrics = JsonlSink(run / "metrics.jsonl")
    writer = FlowParquetWriter(run / "flow.parquet") if flow else None
    seen: set[int] = set()
    for step in order:
        replay = step in seen
        seen.add(step)
        gnorm = 2.0 * 0.9**step
        rec = {
            "loss": 3.0
            - 0.02 * step
            + (
                0.5
                if replay is False and rollback and step > rollback[0] - rollback[1] and step <= rollback[0]
                else 0.0
            ),
            "lr": lr * min(1.0, step / 5),
            "grad_norm_preclip": gnorm,
            "grad_norm_postclip": min(gnorm, 1.0),
            "clip_coef": min(1.0, 1.0 / gnorm),
            "clipped": gnorm > 1.0,
            "tokens": 128 * step,
        }
        if rollback and not replay and rollback[0] - rollback[1] < step <= rollback[0]:
            rec["discarded"] = True
        metrics.write(step, rec)
        if writer is not None:
            writer.write(flow_record(step, bump=2.0 if replay else 1.0))
    metrics.close()
    if writer is not None:
        writer.close()
    if evals:
        ev = JsonlSink(run / "eval.jsonl")
        for step in range(10, steps + 1, 10):
            ev.write(step, {"val_loss": 3.1 - 0.02 * step, "val_ppl": float(np.exp(3.1 - 0.02 * step)), "val_bpb": 1.0})
        ev.close()
    if alerts:
        al = JsonlSink(run / "alerts.jsonl")
        al.write(
            7,
            {
                "detector": "grad_spike",
                "action": "warn",
                "values": {"z": 6.5, "norm": float("nan")},
                "explanation": alert_text,
                "suggestion": "lower optim.lr",
            },
        )
        al.write(
            12,
            {
                "detector": "loss_spike",
                "action": "rollback",
                "values": {"z": 9.0},
                "explanation": "loss spike",
                "suggestion": "skip the window",
            },
        )
        al.close()
    return run
