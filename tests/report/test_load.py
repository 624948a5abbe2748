"""Reading run directories and the numeric helpers, checked against independent computations."""

import math

import numpy as np
import pytest

from flowtrain.errors import FlowtrainError
from flowtrain.flow.records import DEPTH_STATS, TENSOR_STATS
from flowtrain.report.figures_flow import chosen_steps
from flowtrain.report.figures_scalars import clip_threshold, rolling_clip_rate
from flowtrain.report.html import config_differences, flatten
from flowtrain.report.load import columns_from_records, load_run
from flowtrain.report.plotting import downsample, downsample_rows
from tests.report.conftest import LAYERS, depth_value, layer_value, write_run


def test_metrics_discarded_and_duplicates():
    records = [
        {"step": 1, "loss": 3.0, "clipped": True},
        {"step": 2, "loss": "nan", "clipped": False},
        {"step": 3, "loss": 9.0, "discarded": True},
        {"step": 3, "loss": 2.5, "lr": "inf"},
        {"step": 2, "loss": 2.8, "clipped": False},  # a resumed run logged step 2 again: the last one counts
        {"no_step": 1},
    ]
    kept, dropped = columns_from_records(records)
    assert kept.step.tolist() == [1, 2, 3]
    assert kept.get("loss").tolist() == [3.0, 2.8, 2.5]
    assert kept.get("clipped")[:2].tolist() == [1.0, 0.0]
    assert math.isinf(kept.get("lr")[2]) and math.isnan(kept.get("lr")[0])
    assert dropped.step.tolist() == [3] and dropped.get("loss").tolist() == [9.0]


def test_flow_grids_match_what_was_written(tmp_path):
    run = load_run(write_run(tmp_path, name="r", steps=12))
    grid = run.layer_flow
    assert grid.names == LAYERS and grid.steps.tolist() == list(range(1, 13))
    for stat in ("grad_norm", "grad_rms", "update_ratio", "weight_norm"):
        want = np.array([[layer_value(stat, s, li) for s in range(1, 13)] for li in range(len(LAYERS))])
        np.testing.assert_allclose(grid.stats[stat], want, rtol=1e-6)
    assert "grad_nonfinite" in grid.stats and not grid.stats["grad_nonfinite"].any()
    depth = run.depth_flow
    assert depth.names == ["h0", "h1", "h2"] and depth.layers == ["embedding", "block.0", "block.1"]
    for stat in DEPTH_STATS:
        want = np.array([[depth_value(stat, s, b) for s in range(1, 13)] for b in range(3)])
        np.testing.assert_allclose(depth.stats[stat], want, rtol=1e-6)
    assert set(TENSOR_STATS) - set(grid.stats) == set()  # every stat column made it


def test_rollback_replay_keeps_the_last_rows(tmp_path):
    run = load_run(write_run(tmp_path, name="r", steps=20, rollback=(12, 4)))
    assert run.metrics.step.tolist() == list(range(1, 21))
    assert run.discarded.step.tolist() == [9, 10, 11, 12]
    np.testing.assert_allclose(run.discarded.get("loss"), [3.0 - 0.02 * s + 0.5 for s in (9, 10, 11, 12)])
    np.testing.assert_allclose(run.metrics.get("loss"), [3.0 - 0.02 * s for s in range(1, 21)])
    g = run.layer_flow.stats["grad_norm"]
    for s in range(1, 21):
        bump = 2.0 if 9 <= s <= 12 else 1.0  # the replayed rows (written last) carry x2
        np.testing.assert_allclose(g[1, s - 1], bump * layer_value("grad_norm", s, 1), rtol=1e-6)


def test_depth_order_is_numeric(tmp_path):
    from flowtrain.flow.records import FlowParquetWriter
    from tests.report.conftest import flow_record

    run_dir = write_run(tmp_path, name="deep", flow=False)
    with FlowParquetWriter(run_dir / "flow.parquet") as w:
        for s in (1, 2):
            w.write(flow_record(s, n_depth=12))
    grid = load_run(run_dir).depth_flow
    assert grid.names == [f"h{i}" for i in range(12)]
    np.testing.assert_allclose(grid.stats["resid_grad_norm"][:, 0], [0.1 * (b + 1) for b in range(12)], rtol=1e-6)


def test_missing_optional_files_are_noted(tmp_path):
    run = load_run(write_run(tmp_path, name="bare", flow=False, alerts=False, evals=False))
    assert run.layer_flow is None and run.depth_flow is None and run.alerts is None and run.evals is None
    assert {"flow.parquet", "alerts.jsonl", "eval.jsonl"} <= set(run.missing)


def test_bad_run_dirs_name_the_path(tmp_path):
    with pytest.raises(FlowtrainError, match="nowhere"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlowtrainError, match="empty.*not a run directory"):
        load_run(tmp_path / "empty")
    bad = write_run(tmp_path, name="badyaml", flow=False)
    (bad / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(FlowtrainError, match="config.yaml"):
        load_run(bad)


def test_damaged_lines_are_skipped_and_said_and_a_damaged_config_is_one_line(tmp_path):
    run = write_run(tmp_path, name="damaged", flow=False, steps=10)
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    lines[3] = b'{"step": 4, "loss": \xff\xfe}\n'  # not UTF-8
    lines[5] = b"garbage\n"
    (run / "metrics.jsonl").write_bytes(b"".join(lines) + b'{"step": 11, "lo')  # and a torn last line
    (run / "alerts.jsonl").write_bytes(b"\x80\x81\n" + (run / "alerts.jsonl").read_bytes())
    loaded = load_run(run)
    assert list(loaded.metrics.step) == [1, 2, 3, 5, 7, 8, 9, 10] and len(loaded.alerts) == 2
    assert loaded.notices == [
        f"{run / 'metrics.jsonl'}: skipped 2 damaged line(s) (not UTF-8 JSON records)",
        f"{run / 'alerts.jsonl'}: skipped 1 damaged line(s) (not UTF-8 JSON records)",
    ]
    (run / "config.yaml").write_bytes(b"\xff\xfe model: {}")
    with pytest.raises(FlowtrainError, match="config.yaml .*restore it from a checkpoint's config.yaml") as info:
        load_run(run)
    assert "\n" not in str(info.value)
    (run / "config.yaml").write_text("model: [unclosed\n  n_layer: 2\n")
    with pytest.raises(FlowtrainError, match=r"config.yaml is not valid YAML \(.* at line 2\)") as info:
        load_run(run)
    assert "\n" not in str(info.value)


def test_downsample_against_hand_written_buckets():
    rng = np.random.default_rng(0)
    x = np.arange(1, 1001, dtype=float)
    y = rng.standard_normal(1000)
    y[17] = np.nan
    y[500] = np.inf
    xs, mean, band = downsample(x, y, 100)
    assert len(xs) == 100
    for b in (0, 1, 50, 99):
        chunk = [v for v in y[b * 10 : (b + 1) * 10] if math.isfinite(v)]
        assert mean[b] == pytest.approx(sum(chunk) / len(chunk))
        assert band[0, b] == min(chunk) and band[1, b] == max(chunk)
        assert xs[b] == pytest.approx(sum(x[b * 10 : (b + 1) * 10]) / 10)
    short = downsample(x[:50], y[:50], 100)
    assert short[2] is None and len(short[0]) == 50


def test_downsample_rows_and_chosen_steps():
    mat = np.arange(20, dtype=float).reshape(2, 10)
    mat[0, 3] = np.nan
    out, centres = downsample_rows(mat, np.arange(1, 11), 5)
    assert out.shape == (2, 5)
    assert out[0, 1] == pytest.approx(2.0)  # bucket (2, nan) -> 2
    assert out[1, 4] == pytest.approx((18 + 19) / 2)
    assert centres.tolist() == [1.5, 3.5, 5.5, 7.5, 9.5]
    assert chosen_steps(np.array([5, 10, 15, 20])) == {"start": 5, "middle": 15, "end": 20}


def test_rolling_clip_rate_against_a_loop():
    rng = np.random.default_rng(1)
    clipped = (rng.random(300) < 0.3).astype(float)
    clipped[40] = np.nan
    got = rolling_clip_rate(clipped, 25)
    for i in (0, 10, 40, 41, 100, 299):
        window = [c for c in clipped[max(0, i - 24) : i + 1] if not math.isnan(c)]
        assert got[i] == pytest.approx(sum(window) / len(window))


def test_config_helpers(tmp_path):
    a = load_run(write_run(tmp_path, name="a", flow=False, lr=1e-3))
    b = load_run(write_run(tmp_path, name="b", flow=False, lr=3e-4))
    assert flatten({"x": {"y": 1, "z": [1, 2]}, "w": {}}) == {"x.y": 1, "x.z": [1, 2], "w": {}}
    diffs = dict(config_differences([a, b]))
    assert diffs == {"optim.lr": [1e-3, 3e-4], "train.run_name": ["a", "b"]}
    assert clip_threshold(a) == 1.0
    a.config["clip"]["kind"] = "agc"
    assert clip_threshold(a) is None
