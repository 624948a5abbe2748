"""FlowMonitor: the gradient-flow microscope, attached from outside to any model and optimizer.

    monitor = FlowMonitor(model, optimizer, FlowConfig())
    for step in ...:
        for micro in batches: loss_fn(model(micro)).backward()
        monitor.after_backward()             # the accumulated gradients of the whole step: read only
        clip = clipper(params)               # optional; its ClipStats are reported, not recomputed
        optimizer.step()
        monitor.after_step(clip_stats=clip)  # ΔW from the step that actually happened
        record = monitor.collect(step)       # host numbers (one device->host transfer), or None

Between collect()s every call only queues device work into a StepStats; collect() is the one host transfer.
A loop that logs every N steps calls `collect_all(step)` instead: the records of all N steps, still one
transfer. Hooks are attached on monitored steps only; the other steps run the model without them.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from flowtrain.flow import structure
from flowtrain.flow.budget import Interval, Stopwatch
from flowtrain.flow.config import FlowConfig
from flowtrain.flow.depth import DepthProbe, depth_table
from flowtrain.flow.logits import LogitsProbe, logits_figures
from flowtrain.flow.params import ParamStats
from flowtrain.flow.records import DEPTH_STATS, TENSOR_STATS, FlowRecord, LayerGroups

CLIP_FIELDS = ("grad_norm_preclip", "grad_norm_postclip", "clip_coef", "clipped")
# finished steps kept for collect_all(); a loop that never collects loses the oldest beyond this
MAX_UNCOLLECTED = 1000


def default_layer_of(model: nn.Module, blocks: Sequence[nn.Module] = ()) -> Callable[[str], str]:
    """Group parameters by module path: with blocks, the block holding them or the module beside the blocks that
    holds them (flow/structure.py: transformer.h.3, transformer.wte, lm_head); without, by top-level child, split
    by index for ModuleList/Sequential children. A model with its own `layer_of(name)` method (flowtrain's GPT)
    is asked instead.
    """
    own = getattr(model, "layer_of", None)
    if callable(own):
        return own
    if blocks:
        return structure.path_layer_of(model, blocks)
    if isinstance(model, (nn.ModuleList, nn.Sequential)):
        return lambda name: name.split(".", 1)[0]
    containers = {n for n, m in model.named_children() if isinstance(m, (nn.ModuleList, nn.Sequential))}

    def by_child(name: str) -> str:
        parts = name.split(".")
        if parts[0] in containers and len(parts) > 2:
            return f"{parts[0]}.{parts[1]}"
        return parts[0]

    return by_child


@dataclass
class StepStats:
    """What one step left for its record: device tensors until collect() moves them to the host in one go."""

    step: int
    monitored: bool
    flow_interval: int = 1  # the interval this step was taken under
    flow_ms: float = 0.0  # the microscope's own time booked to this step
    clip: list | None = None  # CLIP_FIELDS' values as the clipper gave them (0-dim device tensors or numbers)
    weight_sumsq: torch.Tensor | None = None  # [n_tensors], before the step
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # ParamStats.before_step's gradient figures
    tensors: torch.Tensor | None = None  # [6, n_tensors]: params.RAW_ROWS
    depth: torch.Tensor | None = None  # [8, L+1]: depth.RAW_ROWS + RAW_MAX_ROWS
    logits: torch.Tensor | None = None  # [3]: logits.LogitsProbe.raw
    histograms: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> sampled gradient values
    weight_histograms: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> sampled weights, after

    def on_device(self) -> dict[str, torch.Tensor]:
        """The tensors that travel to the host, by name."""
        named = {"tensors": self.tensors, "depth": self.depth, "logits": self.logits}
        named.update({"hist:" + k: v for k, v in self.histograms.items()})
        named.update({"whist:" + k: v for k, v in self.weight_histograms.items()})
        return {k: v for k, v in named.items() if v is not None}


class FlowMonitor:
    """Statistics of gradients, updates and the residual stream, for any nn.Module and torch optimizer.

    blocks: the modules whose outputs are the residual stream: modules, a container's path ("transformer.h") or
    module paths (default: `model.blocks`, else found: flow/structure.py); head: the module that produces the
    logits, or its path (default: `model.lm_head`, else `get_output_embeddings()`); layer_of: parameter name ->
    layer label (default: `model.layer_of`, else default_layer_of); start_step: the step number of the
    first step (so a resumed run monitors the same steps); sync: combine activation-side statistics (residual
    gradients, activations, attention, logits) over the ranks of a data-parallel job.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        cfg: FlowConfig | None = None,
        layer_of: Callable[[str], str] | None = None,
        *,
        blocks: structure.BlocksSpec = None,
        head: nn.Module | str | None = None,
        start_step: int = 0,
        sync: bool = False,
    ) -> None:
        self.cfg = cfg or FlowConfig()
        self.sync = sync
        # the factor each rank's loss was scaled by before backward (data parallel: the world size; fp16: also
        # the loss scale, a device tensor): residual gradients are divided by it
        self.backward_scale: float | torch.Tensor = 1.0
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        blocks, head = structure.resolve_blocks(model, blocks), structure.resolve_head(model, head)
        self.layer_of = layer_of or default_layer_of(model, blocks)
        self.layers = [self.layer_of(n) for n in self.names]
        self.step_index = start_step
        self.clock = Stopwatch()  # the microscope's own seconds this step (hooks and the calls below)
        self.interval = Interval(self.cfg, start_step, self.clock)
        self._pending: StepStats | None = None
        self._ready: deque[StepStats] = deque(maxlen=MAX_UNCOLLECTED)  # finished steps not collected yet
        self._clipped: deque[float] = deque(maxlen=self.cfg.clip_rate_window)
        self.params: ParamStats | None = None
        self.depth: DepthProbe | None = None
        self.logits: LogitsProbe | None = None
        self.structure = structure.describe(model, blocks, head)  # what was found, for run directories
        self.unavailable: dict[str, str] = {}  # stat -> why it cannot be measured on this model
        if not self.cfg.enabled:
            return
        self.params = ParamStats([p for _, p in named], optimizer, self.cfg.updates)
        self._numels = np.array([p.numel() for _, p in named], dtype=np.float64)  # whole tensors, also sharded
        self._layer_groups = LayerGroups(self.layers, self._numels)
        if blocks and (self.cfg.residual or self.cfg.activations or self.cfg.attention):
            self.depth = DepthProbe(blocks, self.cfg, self.clock)
            self.depth_layers = self._depth_layers(model, blocks)
        if self.cfg.logits and head is not None:
            self.logits = LogitsProbe(head, self.clock)
        sampler = self.depth.attention if self.depth is not None else None
        self.unavailable = structure.unavailable(model, self.cfg, blocks, sampler, head)
        self._arm()

    def _depth_layers(self, model: nn.Module, blocks: list[nn.Module]) -> list[str]:
        """Layer label of each boundary: h_l (l >= 1) gets block l-1's layer, h_0 the first non-block layer."""
        prefix = {id(m): n for n, m in model.named_modules()}
        labels, block_prefixes = [], []
        for i, block in enumerate(blocks):
            pre = prefix.get(id(block), "")
            block_prefixes.append(pre + "." if pre else "")
            first = next((n for n in self.names if pre and n.startswith(pre + ".")), None)
            labels.append(self.layer_of(first) if first else f"block.{i}")
        outside = next((n for n in self.names if not any(bp and n.startswith(bp) for bp in block_prefixes)), None)
        return [self.layer_of(outside) if outside else "input", *labels]

    # -- the calls of the step -------------------------------------------------------------------------------

    def is_monitored(self, step: int | None = None) -> bool:
        """Whether per-tensor and depth statistics are taken at `step` (default: the step now running)."""
        step = self.step_index if step is None else step
        return self.cfg.enabled and self.interval.monitored(step)

    def restart_at(self, step: int) -> None:
        """Go on from `step` after the weights were replaced (a rollback): nothing kept from before is reused."""
        self.step_index = step
        self._pending = None
        self._ready.clear()
        self.interval.restart_at(step)
        self._arm()

    def _arm(self) -> None:
        on = self.is_monitored()
        for probe in (self.depth, self.logits):
            if probe is not None:
                probe.arm() if on else probe.disarm()

    def after_backward(self, grads: dict[str, torch.Tensor] | None = None) -> None:
        """Read the accumulated gradients (and copy the weights) before clipping and the optimizer step.

        `grads`: the step's gradient figures taken before clipping by other means (flow/pre_clip.py), for loops
        that clip before an observer may look (transformers' Trainer); used instead of reading `.grad`."""
        if self.params is None:
            return
        with self.booked():
            stats = StepStats(self.step_index, self.is_monitored())
            if stats.monitored:  # between monitored steps the microscope costs nothing
                stats.weight_sumsq, stats.grads = self.params.before_step()
                if grads is not None:
                    stats.grads = grads
                if self._histogram_due(self.step_index) and grads is None:  # .grad may be clipped when given
                    stats.histograms = self.params.histogram_samples(self.layers, self.cfg.histogram_values)
            self._pending = stats

    def _histogram_due(self, step: int) -> bool:
        """Histograms at the first monitored step of every `histogram_interval` steps (a monitored step whose
        predecessor under the interval lies in an earlier window): steps that are multiples of both intervals
        would be rare under `auto`."""
        every = self.cfg.histogram_interval
        return bool(every) and step // every != (step - self.interval.every) // every

    @property
    def grad_sumsq(self) -> torch.Tensor | None:
        """Per-tensor float32 sums of squares of this step's gradients, when measured (monitored step, every
        parameter has a gradient): a clipper can reuse them instead of another pass over the gradients."""
        return self._pending.grads.get("clip_sumsq") if self._pending is not None else None

    def after_step(self, clip_stats=None) -> None:
        """Measure the update that happened; `clip_stats` (ClipStats or anything with its fields) is reported."""
        if self.params is None:
            return
        if self._pending is None:
            raise RuntimeError("FlowMonitor.after_step() called without after_backward() for this step")
        with self.booked():
            stats, self._pending = self._pending, None
            device = self.params.device
            if clip_stats is not None:  # kept as they are: collect() stacks every step's values at once
                stats.clip = [getattr(clip_stats, f) for f in CLIP_FIELDS]
            if stats.monitored:
                update_sumsq, adam_v_sum = self.params.after_step()
                grads = stats.grads
                stats.tensors = torch.stack(
                    [grads["grad_sumsq"], grads["grad_max_abs"], grads["grad_nonfinite"], stats.weight_sumsq,
                     update_sumsq, adam_v_sum]
                )  # fmt: skip
                stats.grads, stats.weight_sumsq = {}, None
                self._note_hooks_called()
                if self.depth is not None:
                    stats.depth = self.depth.raw(device, self.sync, self.backward_scale)
                if self.logits is not None:
                    stats.logits = self.logits.raw(device, self.sync)
                if self._histogram_due(stats.step):  # the weights the next step starts from
                    values = self.cfg.histogram_values
                    stats.weight_histograms = self.params.histogram_samples(self.layers, values, of="weight")
            self._ready.append(stats)
        stats.flow_interval = self.interval.every
        if self.interval.step_done(self.step_index, stats.monitored) and self.sync:
            self._agree_on_interval()
        stats.flow_ms = 1e3 * self.interval.last_spent
        self.step_index += 1
        self._arm()

    def _note_hooks_called(self) -> None:
        """Statistics of hooks that a monitored step's forward never called are unavailable, said once, not NaN."""
        for probe, stats in ((self.depth, DEPTH_STATS), (self.logits, structure.LOGIT_STATS)):
            if probe is not None and structure.note_hooks_called(self.unavailable, probe.saw_forward, stats):
                warnings.warn(structure.HOOKS_NOT_CALLED, stacklevel=3)

    @contextlib.contextmanager
    def outside_step(self):
        """Work inside this block is not the step's (the trainer's logging of several steps at once): `auto` leaves
        it out of the step times it compares; what the microscope books on its stopwatch inside stays its own."""
        started, spent = time.perf_counter(), self.clock.spent
        try:
            yield
        finally:
            self.interval.exclude(time.perf_counter() - started - (self.clock.spent - spent))

    @contextlib.contextmanager
    def booked(self):
        """Work inside this block is the microscope's (e.g. a loop writing its records): booked on its stopwatch."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.clock.spent += time.perf_counter() - started

    def _agree_on_interval(self) -> None:
        """Data parallel: every rank takes the largest interval any rank chose (they monitor the same steps)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            every = torch.tensor([self.interval.every], dtype=torch.int64, device=self.params.device)
            dist.all_reduce(every, op=dist.ReduceOp.MAX)
            self.interval.every = int(every.item())

    # -- records ---------------------------------------------------------------------------------------------

    def collect(self, step: int | None = None) -> FlowRecord | None:
        """The last finished step's record as host numbers (one transfer), or None if there is none.
        Older steps not collected yet are dropped (collect_all() keeps them)."""
        if not self._ready:
            return None
        newest = self._ready[-1]
        self._ready.clear()
        return self._collect([newest], step)[0]

    def collect_all(self, step: int | None = None) -> list[FlowRecord]:
        """Every finished step's record not collected yet, oldest first, with one host transfer for all of them.
        `step` numbers the newest record (the others count back from it), as in collect()."""
        ready = list(self._ready)
        self._ready.clear()
        return self._collect(ready, step) if ready else []

    def discard(self) -> None:
        """Forget the finished steps not collected (a data-parallel rank that writes nothing)."""
        self._ready.clear()

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to report what an uninterrupted one would: the clip rate's window (of the
        steps collected so far; the trainer collects every step before a checkpoint)."""
        return {"flow_clip_window": list(self._clipped)}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self._clipped.clear()
        self._clipped.extend(saved.get("flow_clip_window", []))

    def _collect(self, ready: list[StepStats], step: int | None) -> list[FlowRecord]:
        if self.params is None:
            return []
        with self.booked():
            device = self.params.device
            parts = [(i, key, t) for i, stats in enumerate(ready) for key, t in stats.on_device().items()]
            clipped = [i for i, stats in enumerate(ready) if stats.clip is not None]
            if clipped:  # every step's clip values in one stack (mixed dtypes promote)
                values = [v for i in clipped for v in ready[i].clip]
                if all(isinstance(v, torch.Tensor) for v in values):
                    clip = torch.stack([v.to(device) for v in values]).float()
                else:
                    clip = torch.tensor([float(v) for v in values], device=device)
                parts.append((-1, "clip", clip))
            host: list[dict[str, np.ndarray]] = [{} for _ in ready]
            flat = torch.cat([t.reshape(-1).float().to(device) for _, _, t in parts]).cpu().numpy() if parts else None
            offset = 0
            for i, key, t in parts:  # one device->host transfer for all of them
                values = flat[offset : offset + t.numel()]
                offset += t.numel()
                if key == "clip":
                    for j, row in zip(clipped, values.reshape(-1, len(CLIP_FIELDS)), strict=True):
                        host[j]["clip"] = row
                else:
                    host[i][key] = values.reshape(t.shape)
            shift = 0 if step is None else step - ready[-1].step
            return [self._record(s.step + shift, h, s) for s, h in zip(ready, host, strict=True)]

    def _record(self, step: int, host: dict[str, np.ndarray], stats: StepStats) -> FlowRecord:
        scalars: dict[str, float] = {}
        if "clip" in host:
            scalars.update(zip(CLIP_FIELDS, host["clip"].tolist(), strict=True))
            self._clipped.append(scalars["clipped"])
            scalars["clip_rate"] = sum(self._clipped) / len(self._clipped)
        scalars["flow_ms"] = stats.flow_ms
        scalars["flow_interval"] = float(stats.flow_interval)
        record = FlowRecord(step=step, scalars=scalars, unavailable=self.unavailable)
        if "tensors" in host:
            table, totals = self._tensor_table(host["tensors"])
            scalars.update(totals)
            record.tensor_names, record.tensor_layers, record.tensor_stats = self.names, self.layers, table
            record.layer_names, record.layer_stats = self._layer_groups.names, self._layer_groups(table)
        if "depth" in host:
            record.depth_names = [f"h{i}" for i in range(host["depth"].shape[1])]
            record.depth_layers = self.depth_layers
            record.depth_stats = depth_table(host["depth"])
        if "logits" in host:
            scalars["logits_max_abs"], scalars["logits_lse_mean"] = logits_figures(host["logits"])
        record.histograms = {k[5:]: v for k, v in host.items() if k.startswith("hist:")}
        record.weight_histograms = {k[6:]: v for k, v in host.items() if k.startswith("whist:")}
        return record

    def _tensor_table(self, raw: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """[n_tensors, len(TENSOR_STATS)] float32 from params.RAW_ROWS on the host, and the step's totals."""
        grad_sumsq, grad_max, bad, weight_sumsq, update_sumsq, v_sum = raw.astype(np.float64)
        numels = np.maximum(self._numels, 1)
        with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 is NaN, as in torch
            weight_norm, update_norm = np.sqrt(weight_sumsq), np.sqrt(update_sumsq)
            columns = {
                "grad_norm": np.sqrt(grad_sumsq),
                "grad_max_abs": grad_max,
                "grad_rms": np.sqrt(grad_sumsq / numels),
                "grad_nonfinite": bad,
                "weight_norm": weight_norm,
                "update_norm": update_norm,
                "update_ratio": update_norm / weight_norm,
                "adam_v_rms": np.sqrt(v_sum / numels),
            }
        table = np.stack([columns[k] for k in TENSOR_STATS], 1).astype(np.float32)
        # counts are >= 0; fmax drops the NaN of tensors without a gradient
        totals = {"param_norm": float(np.sqrt(weight_sumsq.sum())), "grad_nonfinite": float(np.fmax(bad, 0).sum())}
        if self.cfg.updates:
            totals["update_norm"] = float(np.sqrt(update_sumsq.sum()))
        return table, totals

    def remove(self) -> None:
        """Detach every hook; the model is left exactly as it was."""
        for probe in (self.depth, self.logits):
            if probe is not None:
                probe.disarm()
        self.depth = self.logits = None

    close = remove


__all__ = ["FlowMonitor", "StepStats", "default_layer_of", "DEPTH_STATS", "TENSOR_STATS"]
