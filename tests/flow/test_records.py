"""flow.parquet: roundtrip, atomic appearance, resume, and load time at 10k steps x 100 tensors."""

import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import TinyTransformer
from torch.nn import functional as F

from flowtrain.errors import DataError
from flowtrain.flow import STAT_COLUMNS, TENSOR_STATS, FlowConfig, FlowMonitor, FlowParquetWriter, FlowRecord, read_flow
from flowtrain.flow.records import LayerGroups


def monitored_model():
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, FlowMonitor(model, opt, FlowConfig())


def train_steps(model, opt, monitor, n_steps, after_each=lambda step: None) -> None:
    for step in range(n_steps):
        idx = torch.randint(0, 17, (2, 8))
        F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        monitor.after_backward()
        opt.step()
        monitor.after_step()
        opt.zero_grad()
        after_each(step)


def records(n_steps=3):
    model, opt, monitor = monitored_model()
    out = []
    train_steps(model, opt, monitor, n_steps, lambda step: out.append(monitor.collect(step)))
    return out


def test_collect_all_returns_every_uncollected_step_and_collect_the_newest():
    """collect_all(step): the records of every step since the last collect, oldest first, numbered back from
    `step`, equal to those collected one by one; collect() keeps only the newest."""
    one_by_one = records(4)
    model, opt, monitor = monitored_model()
    waiting = []
    train_steps(model, opt, monitor, 4, lambda step: waiting.append(len(monitor._ready)))
    assert waiting == [1, 2, 3, 4]
    together = monitor.collect_all(step=3)
    assert [r.step for r in together] == [0, 1, 2, 3]
    for a, b in zip(together, one_by_one, strict=True):
        np.testing.assert_array_equal(a.tensor_stats, b.tensor_stats)
        np.testing.assert_array_equal(a.depth_stats, b.depth_stats)
        assert a.scalars.keys() == b.scalars.keys()
    assert monitor.collect_all() == [] and monitor.collect() is None
    train_steps(model, opt, monitor, 2)
    newest = monitor.collect(step=6)
    assert newest.step == 6 and monitor.collect_all() == []


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


def test_records_with_different_rows_share_one_file(tmp_path):
    """Rows are laid out per run of records with the same rows: a change of rows (here: depth rows missing,
    then a record with only scalars) keeps every record's own rows."""
    recs = records(4)
    recs[1].depth_names, recs[1].depth_layers, recs[1].depth_stats = [], [], None
    recs[2] = FlowRecord(step=2, scalars={"loss": 1.0})
    path = tmp_path / "flow.parquet"
    with FlowParquetWriter(path) as writer:
        for rec in recs:
            writer.write(rec)
    got = read_flow(path).to_pylist()
    want = [r for rec in recs for r in rec.rows()]
    assert [(r["step"], r["name"], r["kind"]) for r in got] == [(r["step"], r["name"], r["kind"]) for r in want]
    for a, b in zip(got, want, strict=True):
        for c in STAT_COLUMNS:
            assert a[c] == pytest.approx(b[c], nan_ok=True)


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


def _layers_by_loop(layers, stats, numels):
    """The per-layer definition written out, one layer at a time (the reference for LayerGroups)."""
    col = {name: i for i, name in enumerate(TENSOR_STATS)}
    s = stats.astype(np.float64)
    names = list(dict.fromkeys(layers))
    out = np.full((len(names), len(TENSOR_STATS)), np.nan)
    for row, layer in enumerate(names):
        m = np.array([x == layer for x in layers])
        g = m & ~np.isnan(s[:, col["grad_nonfinite"]])
        if g.any():
            gsq = (s[g, col["grad_norm"]] ** 2).sum()
            out[row, col["grad_norm"]] = np.sqrt(gsq)
            out[row, col["grad_max_abs"]] = s[g, col["grad_max_abs"]].max()
            out[row, col["grad_rms"]] = np.sqrt(gsq / numels[g].sum())
            out[row, col["grad_nonfinite"]] = s[g, col["grad_nonfinite"]].sum()
        wn = np.sqrt((s[m, col["weight_norm"]] ** 2).sum())
        un = np.sqrt((s[m, col["update_norm"]] ** 2).sum())
        out[row, col["weight_norm"]], out[row, col["update_norm"]] = wn, un
        out[row, col["update_ratio"]] = un / wn if wn > 0 else np.nan
        v = m & ~np.isnan(s[:, col["adam_v_rms"]])
        if v.any():
            out[row, col["adam_v_rms"]] = np.sqrt((s[v, col["adam_v_rms"]] ** 2 * numels[v]).sum() / numels[v].sum())
    return names, out


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_layer_groups_match_the_per_layer_definition(n, seed):
    rng = np.random.default_rng(seed)
    layers = [f"l{rng.integers(0, 5)}" for _ in range(n)]
    stats = rng.random((n, len(TENSOR_STATS))).astype(np.float32)
    for _ in range(rng.integers(0, 5)):  # no gradient, non-finite, zero weights
        stats[rng.integers(0, n), rng.integers(0, len(TENSOR_STATS))] = rng.choice([np.nan, np.inf, 0.0])
    numels = rng.integers(1, 1000, n).astype(np.float64)
    with np.errstate(all="ignore"):
        want_names, want = _layers_by_loop(layers, stats, numels)
    groups = LayerGroups(layers, numels)
    assert groups.names == want_names
    np.testing.assert_allclose(groups(stats), want, rtol=1e-6, equal_nan=True)
