"""The TensorBoard sink's event files, read back with TensorBoard's own loader."""

import json
import re
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flowtrain.config import load_config
from flowtrain.flow.records import TENSOR_STATS, FlowRecord
from flowtrain.model.gpt import layer_of
from flowtrain.sinks.jsonl import read_jsonl
from flowtrain.sinks.tensorboard import TensorBoardSink
from flowtrain.train.trainer import Trainer
from tests.conftest import tiny_overrides, write_corpus


def load(path):
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def record(step):
    stats = np.full((2, len(TENSOR_STATS)), np.nan, dtype=np.float32)
    stats[:, TENSOR_STATS.index("grad_norm")] = [0.5 * step, 2.0]
    return FlowRecord(
        step=step, scalars={}, layer_names=["block.0", "head"], layer_stats=stats,
        histograms={"head": np.linspace(-1, 1, 64, dtype=np.float32)},
    )  # fmt: skip


def test_scalars_layers_and_histograms_share_a_step_and_read_back(tmp_path):
    sink = TensorBoardSink(tmp_path)
    for step in range(1, 4):
        sink.write_layers(step, record(step))
        sink.write(step, {"loss": 3.0 / step, "lr": 1e-3, "clipped": True, "name": "not a number"})
    sink.close()
    acc = load(tmp_path)
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("loss")] == [(1, 3.0), (2, 1.5), (3, 1.0)]
    assert [e.value for e in acc.Scalars("grad_norm_by_layer/block.0")] == [0.5, 1.0, 1.5]
    assert "clipped" not in acc.Tags()["scalars"]  # booleans and strings are not scalars here
    assert "update_ratio_by_layer/head" not in acc.Tags()["scalars"]  # NaN values are left out
    hist = acc.Histograms("grad_hist/head")
    assert [e.step for e in hist] == [1, 2, 3] and hist[0].histogram_value.num == 64
    (events,) = tmp_path.glob("events.out.tfevents.*")
    # one event a step (all its values together), after the file-version event and the custom-scalars layout
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    kinds = [e.WhichOneof("what") for e in EventFileLoader(str(events)).Load()]
    assert kinds.count("summary") == 1 + 3


def test_a_resumed_run_purges_the_steps_it_writes_again(tmp_path):
    sink = TensorBoardSink(tmp_path)
    for step in range(1, 5):
        sink.write(step, {"loss": float(step)})
    sink.close()
    time.sleep(1.1)  # event files are named by the second they were opened in
    resumed = TensorBoardSink(tmp_path, purge_step=3)
    resumed.write(3, {"loss": 30.0})
    resumed.close()
    assert [(e.step, e.value) for e in load(tmp_path).Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


# ---- a real run, read back with TensorBoard's loader and checked against the run's own files ----------------


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    """A real 16-step run: microscope every step, histograms of whole layers every 5 steps (steps 1, 6, 11, 16),
    a checkpoint at the end."""
    base = tmp_path_factory.mktemp("tb")
    extra = {"log.tensorboard": True, "flow.interval": 1, "flow.histogram_interval": 5,
             "flow.histogram_values": 1_000_000, "train.max_steps": 16, "train.eval_interval": 8,
             "train.checkpoint_interval": 16, "train.sample_tokens": 0}  # fmt: skip
    cfg = load_config(None, tiny_overrides(write_corpus(base / "small.txt"), base, **extra))
    return Trainer(cfg).run_loop().run_dir


def test_depth_and_layer_series_hold_the_flow_records_values(tb_run):
    acc = load(tb_run / "tb")
    flow = pq.read_table(tb_run / "flow.parquet").to_pylist()
    depth = [r for r in flow if r["kind"] == "depth"]
    assert {r["step"] for r in depth} == set(range(1, 17))
    checked = 0
    for stat in ("resid_grad_norm", "act_rms", "act_max_abs", "attn_entropy", "attn_max_logit"):
        for row in depth:
            if stat.startswith("attn") and row["name"] == "h0":
                continue  # the input of the first block has no attention
            tag = f"{stat}_by_layer/{row['layer']}" if stat.startswith("attn") else f"{stat}_by_depth/{row['name']}"
            (event,) = [e for e in acc.Scalars(tag) if e.step == row["step"]]
            assert np.float32(event.value) == np.float32(row[stat]), (tag, row["step"])
            checked += 1
    assert checked == 16 * (3 * 3 + 2 * 2)  # 2 blocks: boundaries h0..h2
    for row in (r for r in flow if r["kind"] == "layer"):
        (event,) = [e for e in acc.Scalars(f"grad_norm_by_layer/{row['name']}") if e.step == row["step"]]
        assert np.float32(event.value) == np.float32(row["grad_norm"])
    metrics = read_jsonl(tb_run / "metrics.jsonl")
    for key in ("loss", "grad_norm_preclip", "logits_max_abs", "logits_lse_mean"):
        assert [e.value for e in acc.Scalars(key)] == [np.float32(m[key]) for m in metrics]


def test_histograms_of_gradients_and_weights(tb_run):
    from safetensors.numpy import load_file

    acc = load(tb_run / "tb")
    layers = ("embedding", "block.0", "block.1", "head")
    for kind in ("grad_hist", "weight_hist"):
        for layer in layers:
            assert [e.step for e in acc.Histograms(f"{kind}/{layer}")] == [1, 6, 11, 16]
    weights = load_file(tb_run / "checkpoints" / "step_000016" / "model.safetensors")
    for layer in ("block.0", "block.1"):  # the weights after step 16 are the final checkpoint's
        values = np.concatenate([w.ravel() for n, w in weights.items() if layer_of(n) == layer]).astype(np.float64)
        hist = acc.Histograms(f"weight_hist/{layer}")[-1].histogram_value
        assert hist.num == values.size and (hist.min, hist.max) == (values.min(), values.max())
        assert hist.sum == pytest.approx(values.sum(), rel=1e-5, abs=1e-6)
        assert hist.sum_squares == pytest.approx((values**2).sum(), rel=1e-5)


def test_config_text_and_hparams_land_in_the_runs_own_directory(tb_run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    assert [p.name for p in (tb_run / "tb").iterdir() if p.is_dir()] == []  # no sub-directory: one run
    acc = load(tb_run / "tb")
    (config,) = acc.Tensors("config/text_summary")
    text = config.tensor_proto.string_val[0].decode()
    assert text == f"```yaml\n{(tb_run / 'config.yaml').read_text()}```"

    def plugin_data(tag):
        content = acc.SummaryMetadata(tag).plugin_data
        assert content.plugin_name == "hparams"
        return plugin_data_pb2.HParamsPluginData.FromString(content.content)

    cfg = yaml.safe_load((tb_run / "config.yaml").read_text())
    start = plugin_data("_hparams_/session_start_info").session_start_info
    assert start.hparams["optim.lr"].number_value == cfg["optim"]["lr"]
    assert start.hparams["data.tokenizer"].string_value == "char"
    assert start.hparams["model.n_layer"].number_value == 2
    assert not any(name.startswith(("log.", "flow.", "guard.")) for name in start.hparams)
    experiment = plugin_data("_hparams_/experiment").experiment
    tags = [m.name.tag for m in experiment.metric_infos]
    assert tags == ["final/train_loss", "final/val_loss", "final/val_bpb", "final/best_val_loss"]
    assert plugin_data("_hparams_/session_end_info").session_end_info.status == 1  # STATUS_SUCCESS

    last = read_jsonl(tb_run / "metrics.jsonl")[-1]
    evals = read_jsonl(tb_run / "eval.jsonl")
    summary = json.loads((tb_run / "summary.json").read_text())
    expected = {"final/train_loss": last["loss"], "final/val_loss": evals[-1]["val_loss"],
                "final/val_bpb": evals[-1]["val_bpb"], "final/best_val_loss": summary["best_val_loss"]}  # fmt: skip
    for tag, value in expected.items():
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == [(16, np.float32(value))]


def test_the_layout_draws_every_depth_series_as_one_chart(tb_run):
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = load(tb_run / "tb")
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    scalars = acc.Tags()["scalars"]
    for title, patterns in charts.items():
        assert any(re.match(p, tag) for p in patterns for tag in scalars), title  # every chart has lines
    assert len([t for t in scalars if re.match(charts["residual gradient ||dL/dh_l||"][0], t)]) == 3


def test_no_histograms_when_off(tmp_path):
    extra = {"log.tensorboard": True, "flow.histogram_interval": 0, "train.max_steps": 4, "train.sample_tokens": 0}
    cfg = load_config(None, tiny_overrides(write_corpus(tmp_path / "small.txt", 20_000), tmp_path, **extra))
    acc = load(Trainer(cfg).run_loop().run_dir / "tb")
    assert acc.Tags()["histograms"] == [] and "resid_grad_norm_by_depth/h1" in acc.Tags()["scalars"]
