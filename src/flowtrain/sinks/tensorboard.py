"""TensorBoard event files (the live view): `tensorboard --logdir runs/`. What goes where: docs/report.md.

Scalars: the metrics row of every logged step under its metrics.jsonl names; per layer (`grad_norm_by_layer/`,
`update_ratio_by_layer/`, `attn_entropy_by_layer/`, `attn_max_logit_by_layer/`) and along depth at every block
boundary (`resid_grad_norm_by_depth/h03`, `act_rms_by_depth/`, `act_max_abs_by_depth/`) on monitored steps;
`final/*` at the end of a finished run. The custom-scalars layout (written at start) draws each depth and
per-layer series as one chart with a line per boundary or layer. Per-layer histograms of gradients and weights
(`grad_hist/`, `weight_hist/`) on the steps the microscope samples them (flow.histogram_interval). Text: the
resolved config. HParams: the settings that shape training and the final figures, in the run's own directory.

Everything a step has goes into one event (one Summary with many values), not one event per value: TensorBoard's
writer frames and checksums every event in Python (docs/performance.md). The microscope's values of a step
(write_layers) wait for that step's metrics row (write) and share its event. torch's FileWriter writes the
file, as SummaryWriter would; the summaries come from torch.utils.tensorboard.summary.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

# TensorBoard tag sections of the microscope's per-layer and along-depth statistics
LAYER_SERIES = ("grad_norm", "update_ratio")  # flow.records.TENSOR_STATS columns, per layer
DEPTH_SERIES = ("resid_grad_norm", "act_rms", "act_max_abs")  # per block boundary h_0..h_L
ATTENTION_SERIES = ("attn_entropy", "attn_max_logit")  # per block: boundary h_l (l >= 1) is block l-1's output
HPARAM_SECTIONS = ("model", "data", "optim", "schedule", "clip", "train")  # the settings that shape training
# TensorBoard's own bucket count: every byte of an event is checksummed in Python, and numpy's "auto" bin
# choice sorts the values first (docs/performance.md)
HISTOGRAM_BINS = 30


def layout() -> dict:
    """The custom-scalars layout: one multiline chart per series (tags are regular expressions)."""
    lines = {
        "flow along depth (line per block boundary h_l)": {
            "residual gradient ||dL/dh_l||": ["Multiline", [r"resid_grad_norm_by_depth/.*"]],
            "activation RMS": ["Multiline", [r"act_rms_by_depth/.*"]],
            "activation max |x|": ["Multiline", [r"act_max_abs_by_depth/.*"]],
        },
        "per layer": {
            "gradient norm": ["Multiline", [r"grad_norm_by_layer/.*"]],
            "update/weight ratio ||dW||/||W||": ["Multiline", [r"update_ratio_by_layer/.*"]],
            "attention entropy (nats)": ["Multiline", [r"attn_entropy_by_layer/.*"]],
            "attention max logit": ["Multiline", [r"attn_max_logit_by_layer/.*"]],
        },
        "training": {
            "loss": ["Multiline", [r"^loss$", r"^val_loss$"]],
            "gradient norm before and after clipping": ["Multiline", [r"^grad_norm_preclip$", r"^grad_norm_postclip$"]],
            "output logits: max |z|, mean log-sum-exp": ["Multiline", [r"^logits_max_abs$", r"^logits_lse_mean$"]],
        },
    }
    return lines


def hparams_of(config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """The run's settings for the HParams view: every value of HPARAM_SECTIONS as `section.key`; lists and
    mappings as JSON text, unset (None) values left out."""
    out: dict[str, bool | int | float | str] = {}
    for section in HPARAM_SECTIONS:
        for key, value in config.get(section, {}).items():
            if isinstance(value, (list, dict)):
                value = json.dumps(value)
            if value is not None:
                out[f"{section}.{key}"] = value
    return out


class TensorBoardSink:
    def __init__(self, logdir: Path, purge_step: int | None = None):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from torch.utils.tensorboard.summary import custom_scalars
        from torch.utils.tensorboard.writer import FileWriter  # imported lazily: pulls in tensorboard

        self._writer = FileWriter(str(logdir))
        if purge_step is not None:  # a resumed run: TensorBoard drops what earlier files hold from this step on
            self._writer.add_event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self._writer.add_summary(custom_scalars(layout()))
        self._pending: tuple[int, list] | None = None  # the microscope's values waiting for write()
        self._tags: dict[tuple, list[str]] = {}  # (section, names) -> tags

    def _write_values(self, step: int, values: list) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        if values:
            self._writer.add_summary(Summary(value=values), step)

    def _take_pending(self, step: int) -> list:
        """The microscope's values waiting for `step` (written on their own if they were for another step)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        if pending[0] != step:
            self._write_values(*pending)
            return []
        return pending[1]

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [
            Summary.Value(tag=key, simple_value=float(value))
            for key, value in scalars.items()
            if isinstance(value, numbers.Real) and not isinstance(value, bool)
        ]
        self._write_values(step, values + self._take_pending(step))

    def _series_tags(self, section: str, names: list[str]) -> list[str]:
        """The tags of one series (made once, asked for at every monitored step)."""
        key = (section, tuple(names))
        tags = self._tags.get(key)
        if tags is None:
            tags = self._tags[key] = [f"{section}/{name}" for name in names]
        return tags

    def _series(self, out: list, section: str, names: list[str], column: list[float]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        for tag, value in zip(self._series_tags(section, names), column, strict=True):
            if not math.isnan(value):  # NaN: the statistic does not apply there (h_0's attention, no gradient)
                out.append(Summary.Value(tag=tag, simple_value=value))

    def write_layers(self, step: int, record) -> None:
        """A FlowRecord's per-layer and along-depth series and its histograms, for `step`'s event."""
        from flowtrain.flow.records import DEPTH_STATS, TENSOR_STATS

        values: list = []
        if record.layer_stats is not None:
            for stat in LAYER_SERIES:
                column = record.layer_stats[:, TENSOR_STATS.index(stat)].tolist()
                self._series(values, f"{stat}_by_layer", record.layer_names, column)
        if record.depth_stats is not None:
            width = len(str(len(record.depth_names) - 1))  # h03 sorts before h10
            boundaries = [f"h{i:0{width}d}" for i in range(len(record.depth_names))]
            column = {stat: record.depth_stats[:, DEPTH_STATS.index(stat)].tolist() for stat in DEPTH_STATS}
            for stat in DEPTH_SERIES:  # a statistic the model does not offer is NaN throughout: no tag
                self._series(values, f"{stat}_by_depth", boundaries, column[stat])
            for stat in ATTENTION_SERIES:
                self._series(values, f"{stat}_by_layer", record.depth_layers[1:], column[stat][1:])
        values += self._histograms(record)
        if self._pending is not None:
            self._write_values(*self._pending)
        self._pending = (step, values)  # written with this step's metrics row

    @staticmethod
    def _histograms(record) -> list:
        from torch.utils.tensorboard.summary import histogram

        out = []
        for section, samples in (("grad_hist", record.histograms), ("weight_hist", record.weight_histograms)):
            for layer, values in samples.items():
                out.extend(histogram(f"{section}/{layer}", values, HISTOGRAM_BINS).value)
        return out

    def write_config(self, step: int, config_yaml: str) -> None:
        """The resolved config as text (a YAML block), at the step a process starts from."""
        from torch.utils.tensorboard.summary import text

        self._writer.add_summary(text("config", f"```yaml\n{config_yaml}```"), step)

    def write_hparams(self, step: int, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """HParams of a finished run, in this run's own event files (SummaryWriter.add_hparams would open a
        sub-directory, a run of its own in TensorBoard's lists): the experiment (which settings and metrics), the
        session's settings and its end; each metric is a scalar tag of its own, written here at `step`."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        for summary in hparams_summaries(hparams, metrics):
            self._writer.add_summary(summary, step)
        self.write(step, metrics)

    def close(self) -> None:
        if self._pending is not None:
            self._write_values(*self._pending)
            self._pending = None
        self._writer.flush()
        self._writer.close()
