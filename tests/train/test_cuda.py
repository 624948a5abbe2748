"""Training on a CUDA device: bf16 autocast, torch's fused AdamW, torch.compile, and FSDP2/DDP over NCCL, each
with the microscope on and its records checked against the run's own scalars.

Skipped where no CUDA device is visible (CI); run on a lent GPU with `benchmarks/cuda_checks.sh`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from flowtrain.config import load_config
from flowtrain.sinks.jsonl import read_jsonl
from flowtrain.train.trainer import Trainer
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")


def _tensor_rows(run_dir) -> dict[int, list[dict]]:
    by_step: dict[int, list[dict]] = {}
    for r in pq.read_table(run_dir / "flow.parquet").to_pylist():
        if r["kind"] == "tensor":
            by_step.setdefault(r["step"], []).append(r)
    return by_step


def _check_records_agree_with_scalars(run_dir, steps: list[int]) -> None:
    """Every monitored step is in flow.parquet; at logged steps, the per-tensor gradient norms add up (in squares)
    to the clipper's global norm."""
    metrics = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl")}
    tensors = _tensor_rows(run_dir)
    assert sorted(tensors) == steps
    assert set(tensors) & set(metrics)
    for step, rows in tensors.items():
        assert all(r["grad_nonfinite"] == 0 for r in rows)
        assert all(r["update_ratio"] > 0 for r in rows if math.isfinite(r["grad_norm"]))
        if step not in metrics:
            continue
        total = math.sqrt(sum(r["grad_norm"] ** 2 for r in rows if math.isfinite(r["grad_norm"])))
        assert total == pytest.approx(metrics[step]["grad_norm_preclip"], rel=1e-5), step


@pytest.mark.parametrize("interval", [1, 2])
def test_bf16_compiled_fused_run_on_cuda(small_text, tmp_path, interval):
    """torch.compile with hooks that come and go (interval 2 attaches them every other step) still trains."""
    overrides = {
        "train.device": "cuda",
        "train.dtype": "bfloat16",
        "train.compile": True,
        "flow.interval": interval,
        "log.interval": 5,
    }
    summary = Trainer(load_config("default", tiny_overrides(small_text, tmp_path, **overrides))).run_loop()
    run = summary.run_dir
    env = json.loads((run / "env.json").read_text())
    assert env["device"].startswith("cuda") and env["optimizer_step"] == "AdamW: torch's fused step", env
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl")]  # logged every 5th step
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    _check_records_agree_with_scalars(run, list(range(1, 21, interval)))
    depth = [r for r in pq.read_table(run / "flow.parquet").to_pylist() if r["kind"] == "depth"]
    assert depth and all(math.isfinite(r["resid_grad_norm"]) and r["resid_grad_norm"] > 0 for r in depth)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_gpu_torchrun_matches_the_plain_run(small_text, tmp_path, strategy):
    """One rank over NCCL (DDP, or FSDP2's DTensor shards of size 1) gives the plain run's losses and records:
    to 1e-5 over the first steps, 1e-3 later (FSDP2 computes on gathered copies, CUDA's embedding backward adds
    with atomics in no fixed order: rounding differs, and training carries such differences along)."""
    common = {"train.device": "cuda", "flow.interval": 1, "train.sample_tokens": 0}
    plain = Trainer(load_config("default", tiny_overrides(small_text, tmp_path, **common))).run_loop().run_dir
    args = tiny_overrides(small_text, tmp_path, **common, **{"train.parallel": strategy, "train.run_name": strategy})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run([*cmd, "-m", "flowtrain", "train", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    dist = tmp_path / "runs" / strategy
    ref = read_jsonl(plain / "metrics.jsonl")
    got = read_jsonl(dist / "metrics.jsonl")
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-3)
    ref_rows, got_rows = _tensor_rows(plain), _tensor_rows(dist)
    assert sorted(got_rows) == sorted(ref_rows) == list(range(1, 21))
    for step, rows in ref_rows.items():
        rel = 1e-5 if step <= 3 else 1e-3
        mine = {r["name"]: r for r in got_rows[step]}
        for r in rows:
            for stat in ("grad_norm", "weight_norm", "update_norm"):
                assert mine[r["name"]][stat] == pytest.approx(r[stat], rel=rel, nan_ok=True), (step, r["name"], stat)
