"""The TensorBoard sink's event files, read back with TensorBoard's own loader."""

import time

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flowtrain.flow.records import TENSOR_STATS, FlowRecord
from flowtrain.sinks.tensorboard import TensorBoardSink


def load(path):
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0})
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
    # one event a step (all its values together), after the file-version event
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    kinds = [e.WhichOneof("what") for e in EventFileLoader(str(events)).Load()]
    assert kinds.count("summary") == 3 + 3  # the scalars' event and the histogram's, each step


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
