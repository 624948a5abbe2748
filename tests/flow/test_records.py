"""flow.parquet: roundtrip, atomic appearance, resume, and load time at 10k steps x 100 tensors."""

import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tiny_models import TinyTransformer
from torch.nn import functional as F

from flowtrain.errors import DataError
from flowtrain.flow import STAT_COLUMNS, TENSOR_STATS, FlowConfig, FlowMonitor, FlowParquetWriter, FlowRecord, read_flow


def records(n_steps=3):
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    monitor = FlowMonitor(model, opt, FlowConfig())
    out = []
    for step in range(n_steps):
        idx = torch.randint(0, 17, (2, 8))
        F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        monitor.after_backward()
        opt.step()
        monitor.after_step()
        out.append(monitor.collect(step))
        opt.zero_grad()
    return out


def test_roundtrip_rows_equal_the_records(tmp_path):
    recs = records()
    path = tmp_path / "flow.parquet"
    with FlowParquetWriter(path, row_group_rows=50) as writer:
        for rec in recs:
            writer.write(rec)
        assert not path.exists()  # appears only when complete
    table = read_flow(path)
    rows = [r for rec in recs for r in rec.rows()]
    assert table.num_rows == len(rows)
    assert table.column_names == ["step", "name", "layer", "kind", *STAT_COLUMNS]
    got = table.to_pylist()
    for a, b in zip(got, rows, strict=True):
        assert (a["step"], a["name"], a["layer"], a["kind"]) == (b["step"], b["name"], b["layer"], b["kind"])
        for c in STAT_COLUMNS:
            assert a[c] == pytest.approx(b[c], nan_ok=True)
    kinds = {r["kind"] for r in got}
    assert kinds == {"tensor", "layer", "depth"}
    rec = recs[1]
    one = [r for r in got if r["step"] == 1 and r["name"] == "blocks.0.mlp.0.weight"][0]
    assert one["grad_norm"] == pytest.approx(rec.tensor("blocks.0.mlp.0.weight")["grad_norm"])
    assert pq.ParquetFile(path).num_row_groups >= 2


def test_resume_keeps_rows_before_the_resume_step(tmp_path):
    recs = records()
    path = tmp_path / "flow.parquet"
    with FlowParquetWriter(path) as writer:
        for rec in recs:
            writer.write(rec)
    with FlowParquetWriter(path, keep_before_step=2) as writer:
        writer.write(recs[2])
    steps = read_flow(path).column("step").to_pylist()
    assert sorted(set(steps)) == [0, 1, 2] and len(steps) == sum(len(r.rows()) for r in recs)


def test_unreadable_file_is_a_data_error(tmp_path):
    bad = tmp_path / "flow.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="flow.parquet"):
        read_flow(bad)
    with pytest.raises(DataError, match="not found"):
        read_flow(tmp_path / "missing.parquet")


def test_ten_thousand_steps_of_a_hundred_tensors_load_in_under_two_seconds(tmp_path):
    n_tensors, n_steps = 100, 10_000
    names = [f"blocks.{i // 10}.w{i % 10}" for i in range(n_tensors)]
    layers = [n.rsplit(".", 1)[0] for n in names]
    rng = np.random.default_rng(0)
    path = tmp_path / "flow.parquet"
    with FlowParquetWriter(path) as writer:
        for step in range(n_steps):
            stats = rng.random((n_tensors, len(TENSOR_STATS)), dtype=np.float32)
            writer.write(FlowRecord(step, {}, names, layers, stats))
    t0 = time.perf_counter()
    table = read_flow(path)
    elapsed = time.perf_counter() - t0
    assert table.num_rows == n_steps * n_tensors
    assert elapsed < 2.0, f"loading took {elapsed:.2f} s"
