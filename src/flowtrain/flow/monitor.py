"""FlowMonitor: the gradient-flow microscope, attached from outside to any model and optimizer.

    monitor = FlowMonitor(model, optimizer, FlowConfig())
    for step in ...:
        for micro in batches: loss_fn(model(micro)).backward()
        monitor.after_backward()             # the accumulated gradients of the whole step: read only
        clip = clipper(params)               # optional; its ClipStats are reported, not recomputed
        optimizer.step()
        monitor.after_step(clip_stats=clip)  # ΔW from the step that actually happened
        record = monitor.collect(step)       # host numbers (one device->host transfer), or None

Every call between collect()s only launches fused device work; collect() is the single host transfer.
A loop that logs every N steps calls `collect_all(step)` instead: the records of all N steps, still one
transfer (the trainer does; so flow.parquet has every monitored step whatever the logging interval).
Hooks are attached on monitored steps only (step % interval == 0); the others run the model without them
(C++ hooks in a model's tap slots stay, disarmed: see hooks._Probe.disarm).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from flowtrain import kernels
from flowtrain.flow.budget import Interval, Stopwatch
from flowtrain.flow.config import FlowConfig
from flowtrain.flow.deferred import Deferred
from flowtrain.flow.hooks import DEPTH_STATS, DepthProbe, LogitsProbe
from flowtrain.flow.records import FlowRecord, LayerGroups
from flowtrain.flow.stats import TENSOR_STATS, ParamStats

CLIP_FIELDS = ("grad_norm_preclip", "grad_norm_postclip", "clip_coef", "clipped")
_NONFINITE = TENSOR_STATS.index("grad_nonfinite")
# finished steps kept for collect_all(); a loop that never collects loses the oldest beyond this
MAX_UNCOLLECTED = 1000


def default_layer_of(model: nn.Module) -> Callable[[str], str]:
    """Group parameters by top-level child; children that are ModuleList/Sequential split by index.

    GPT-like names: tok_emb.weight -> "tok_emb", blocks.3.attn.qkv.weight -> "blocks.3", lm_head.weight ->
    "lm_head". A model with its own `layer_of(name)` method (flowtrain's GPT) is asked instead.
    """
    own = getattr(model, "layer_of", None)
    if callable(own):
        return own
    containers = {n for n, m in model.named_children() if isinstance(m, (nn.ModuleList, nn.Sequential))}
    if isinstance(model, (nn.ModuleList, nn.Sequential)):

        def by_index(name: str) -> str:
            return name.split(".", 1)[0]

        return by_index

    def by_child(name: str) -> str:
        parts = name.split(".")
        if parts[0] in containers and len(parts) > 2:
            return f"{parts[0]}.{parts[1]}"
        return parts[0]

    return by_child


def _sqrt_of_sum(values: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """sqrt(sum(values)) as a 1-element vector, on the host or the device as the values are."""
    if isinstance(values, np.ndarray):
        return np.sqrt(values.sum(keepdims=True))
    return values.sum().sqrt().reshape(1)


def _default_blocks(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks):
        return list(blocks)
    return []


class FlowMonitor:
    """Statistics of gradients, updates and the residual stream, for any nn.Module and torch optimizer.

    blocks: the modules whose outputs are the residual stream (default: `model.blocks` when it is a
    ModuleList); head: the module that produces the logits (default: `model.lm_head`); layer_of: parameter
    name -> layer label (default: `model.layer_of`, else default_layer_of); start_step: the step number of the
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
        blocks: Sequence[nn.Module] | None = None,
        head: nn.Module | None = None,
        start_step: int = 0,
        sync: bool = False,
    ) -> None:
        self.cfg = cfg or FlowConfig()
        # data parallel: activation-side statistics are combined over the default process group, and
        # residual gradients divided by `backward_scale` (the factor the trainer scaled each rank's loss by)
        self.sync = sync
        self.backward_scale: float | torch.Tensor = 1.0
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.layer_of = layer_of or default_layer_of(model)
        self.layers = [self.layer_of(n) for n in self.names]
        self.step_index = start_step
        self.clock = Stopwatch()  # the microscope's own seconds this step (hooks and the calls below)
        self.interval = Interval(self.cfg, start_step, self.clock)
        self._pending: dict | None = None
        self._ready: deque[dict] = deque(maxlen=MAX_UNCOLLECTED)  # finished steps not collected yet
        self._clipped: deque[float] = deque(maxlen=self.cfg.clip_rate_window)
        self._clipped_sum = 0.0  # of the values in _clipped (0/1): the rolling clip rate without a pass
        self.params: ParamStats | None = None
        self._boundary_names: list[str] = []
        self.depth: DepthProbe | None = None
        self.logits: LogitsProbe | None = None
        if not self.cfg.enabled:
            return
        self.params = ParamStats(self.names, [p for _, p in named], optimizer, self.cfg.updates)
        self._layer_groups = LayerGroups(self.layers, self.params.np_numels)
        blocks = list(blocks) if blocks is not None else _default_blocks(model)
        if blocks and (self.cfg.residual or self.cfg.activations or self.cfg.attention):
            self.depth = DepthProbe(blocks, self.cfg, self.clock)
            self.depth_layers = self._depth_layers(model, blocks)
        if head is None and isinstance(getattr(model, "lm_head", None), nn.Module):
            head = model.lm_head
        if self.cfg.logits and head is not None:
            self.logits = LogitsProbe(head, self.clock)
        self._arm()

    def _depth_layers(self, model: nn.Module, blocks: list[nn.Module]) -> list[str]:
        """Layer label of each boundary: h_l (l >= 1) gets block l-1's layer, h_0 the first non-block layer."""
        prefix = {id(m): n for n, m in model.named_modules()}
        labels = []
        block_prefixes = []
        for i, block in enumerate(blocks):
            pre = prefix.get(id(block), "")
            block_prefixes.append(pre + "." if pre else "")
            first = next((n for n in self.names if pre and n.startswith(pre + ".")), None)
            labels.append(self.layer_of(first) if first else f"block.{i}")
        outside = next((n for n in self.names if not any(bp and n.startswith(bp) for bp in block_prefixes)), None)
        return [self.layer_of(outside) if outside else "input", *labels]

    # -- the three calls of the step -------------------------------------------------------------------------

    def is_monitored(self, step: int | None = None) -> bool:
        """Whether per-tensor and depth statistics are taken at `step` (default: the step now running)."""
        step = self.step_index if step is None else step
        return self.cfg.enabled and self.interval.monitored(step)

    def invalidate(self) -> None:
        """The weights were changed outside the optimizer through `.data` (which bypasses the version counters
        the monitor checks; in-place edits of the parameters themselves are noticed): measure ΔW afresh."""
        if self.params is not None:
            self.params.invalidate()

    def restart_at(self, step: int) -> None:
        """Go on from `step` after the weights were replaced (a rollback): nothing kept from before is reused."""
        self.step_index = step
        self._pending = None
        self._ready.clear()
        self.interval.restart_at(step)
        if self.params is not None:
            self.params.invalidate()
        self._arm()

    def _arm(self) -> None:
        on = self.is_monitored()
        for probe in (self.depth, self.logits):
            if probe is not None:
                probe.arm() if on else probe.disarm()

    def after_backward(self) -> None:
        """Read the accumulated gradients (and snapshot the weights) before clipping and the optimizer step."""
        if self.params is None:
            return
        started = time.perf_counter()
        pending: dict = {"step": self.step_index, "monitored": self.is_monitored()}
        if pending["monitored"]:  # between monitored steps the microscope costs nothing
            pending["weight_sumsq"] = self.params.weights_and_snapshot()
            pending["grads"] = self.params.grad_stats()
            if self.depth is not None:
                pending["attention"] = self.depth.attention()
            hist = self.cfg.histogram_interval
            if hist and self.step_index % hist == 0:
                pending["histograms"] = self._histogram_samples()
        self._pending = pending
        self.clock.spent += time.perf_counter() - started

    @property
    def grad_sumsq(self) -> torch.Tensor | None:
        """Per-tensor sums of squares of this step's gradients, when measured (monitored step, every parameter
        has a gradient): a clipper can reuse them instead of another pass over the gradients."""
        grads = (self._pending or {}).get("grads")
        return grads["clip_sumsq"] if grads is not None and grads["complete"] else None

    def after_step(self, clip_stats=None) -> None:
        """Measure the update that happened; `clip_stats` (ClipStats or anything with its fields) is reported."""
        if self.params is None:
            return
        if self._pending is None:
            raise RuntimeError("FlowMonitor.after_step() called without after_backward() for this step")
        started = time.perf_counter()
        pending, self._pending = self._pending, None
        if clip_stats is not None:
            pending["clip"] = [getattr(clip_stats, f) for f in CLIP_FIELDS]
        if pending["monitored"]:
            usq, adam, wsq = self.params.after_step(self.is_monitored(self.step_index + 1))
            pending["update_sumsq"], pending["adam"] = usq, adam
            if wsq is not None:  # measured by an observing optimizer in its step
                pending["weight_sumsq"] = wsq
            device = self.params.device
            if self.depth is not None:
                attention = pending.pop("attention", [None] * len(self.depth.blocks))
                pending["depth"] = self.depth.matrix(attention, device, self.sync, self.backward_scale)
            if self.logits is not None:
                pending["logits"] = self.logits.values(device, self.sync)
        self._ready.append(pending)
        self.clock.spent += time.perf_counter() - started
        pending["flow_interval"] = self.interval.every  # the interval this step was taken under
        if self.interval.step_done(self.step_index, pending["monitored"]) and self.sync:
            self._agree_on_interval()
        pending["flow_ms"] = 1e3 * self.interval.last_spent
        self.step_index += 1
        self._arm()

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

    def collect(self, step: int | None = None) -> FlowRecord | None:
        """The last finished step's record as host numbers (one transfer), or None if there is none.
        Older steps not collected yet are dropped (collect_all() keeps them)."""
        if not self._ready:
            return None
        newest = self._ready[-1]
        self._ready.clear()
        return self._timed_collect([newest], step)[0]

    def collect_all(self, step: int | None = None) -> list[FlowRecord]:
        """Every finished step's record not collected yet, oldest first, with one host transfer for all of them.
        `step` numbers the newest record (the others count back from it), as in collect()."""
        ready = list(self._ready)
        self._ready.clear()
        return self._timed_collect(ready, step) if ready else []

    def discard(self) -> None:
        """Forget the finished steps not collected (a data-parallel rank that writes nothing)."""
        self._ready.clear()

    def _timed_collect(self, ready: list[dict], step: int | None) -> list[FlowRecord]:
        if self.params is None:
            return []
        started = time.perf_counter()
        try:
            newest = ready[-1]["step"]
            offset = 0 if step is None else step - newest
            return self._collect(ready, [r["step"] + offset for r in ready])
        finally:
            self.clock.spent += time.perf_counter() - started

    def _host_parts(self, ready: dict) -> dict[str, torch.Tensor | np.ndarray]:
        """One finished step's numbers, by name: numpy where measured on the host (CPU kernels), else tensors."""
        parts: dict[str, torch.Tensor | np.ndarray] = {}
        wsq, usq = ready.get("weight_sumsq"), ready.get("update_sumsq")
        if ready["monitored"]:
            grads, adam = ready["grads"], ready["adam"]
            sums = (*(grads[k] for k in kernels.GRAD_KEYS), wsq, adam, *(() if usq is None else (usq,)))
            if all(isinstance(v, np.ndarray) for v in sums) and kernels.library() is not None:
                # one call: both tables and the record's totals (||W||, ||dW||, non-finite gradient values)
                groups = self._layer_groups
                parts["tensors"], parts["layers"], ready["totals"] = kernels.flow_tables(
                    grads, wsq, usq, adam, self.params.np_numels, groups.order, groups.starts
                )
            else:
                parts["tensors"] = self.params.deferred_table(grads, wsq, usq, adam)
            for key in ("depth", "logits"):
                if key in ready:
                    parts[key] = ready[key]
        if "totals" not in ready:
            if wsq is not None:
                parts["param_norm"] = _sqrt_of_sum(wsq)
            if usq is not None:
                parts["update_norm"] = _sqrt_of_sum(usq)
        if "clip" in ready:
            clip = ready["clip"]
            if all(isinstance(v, torch.Tensor) and v.is_cpu for v in clip):
                ready["clip_values"] = [float(v.item()) for v in clip]  # CPU: read as they are
            else:
                device = self.params.device
                parts["clip"] = torch.stack([torch.as_tensor(v, device=device).float().reshape(()) for v in clip])
        for layer, values in ready.get("histograms", {}).items():
            parts["hist:" + layer] = values
        return parts

    def _collect(self, ready: list[dict], steps: list[int]) -> list[FlowRecord]:
        parts = [self._host_parts(r) for r in ready]
        host = [{k: v.astype(np.float32, copy=False) for k, v in p.items() if isinstance(v, np.ndarray)} for p in parts]
        on_device = [(i, k, v) for i, p in enumerate(parts) for k, v in p.items() if not isinstance(v, np.ndarray)]
        if on_device:  # one device->host transfer for all of them
            device = self.params.device
            tensors = [v.tensor if isinstance(v, Deferred) else v for _, _, v in on_device]
            flat = torch.cat([t.reshape(-1).float().to(device) for t in tensors]).cpu().numpy()
            offset = 0
            for (i, key, v), t in zip(on_device, tensors, strict=True):
                values = flat[offset : offset + t.numel()].reshape(t.shape)
                host[i][key] = v.finish(values).astype(np.float32, copy=False) if isinstance(v, Deferred) else values
                offset += t.numel()
        return [self._record(s, h, r) for s, h, r in zip(steps, host, ready, strict=True)]

    def _depth_names(self, n: int) -> list[str]:
        """h0 .. h{n-1}: the same list for every record (read only)."""
        if len(self._boundary_names) != n:
            self._boundary_names = [f"h{i}" for i in range(n)]
        return self._boundary_names

    def _record(self, step: int, host: dict[str, np.ndarray], ready: dict) -> FlowRecord:
        scalars: dict[str, float] = {}
        totals = ready.get("totals")  # [||W||, ||dW|| or NaN, non-finite gradient values] from the tables kernel
        if totals is not None:
            scalars["param_norm"] = totals[0]
            if ready.get("update_sumsq") is not None:
                scalars["update_norm"] = totals[1]
        else:
            if "param_norm" in host:
                scalars["param_norm"] = float(host["param_norm"][0])
            if "update_norm" in host:
                scalars["update_norm"] = float(host["update_norm"][0])
        clip = ready.get("clip_values") or (host["clip"].tolist() if "clip" in host else None)
        if clip is not None:
            scalars.update(zip(CLIP_FIELDS, clip, strict=True))
            if len(self._clipped) == self._clipped.maxlen:
                self._clipped_sum -= self._clipped[0]
            self._clipped.append(scalars["clipped"])
            self._clipped_sum += scalars["clipped"]
            scalars["clip_rate"] = self._clipped_sum / len(self._clipped)
        scalars["flow_ms"] = ready["flow_ms"]  # the microscope's own time, booked to this step
        scalars["flow_interval"] = float(ready["flow_interval"])
        record = FlowRecord(step=step, scalars=scalars)
        if "tensors" in host:
            stats = host["tensors"]
            record.tensor_names, record.tensor_layers, record.tensor_stats = self.names, self.layers, stats
            record.layer_names = self._layer_groups.names
            record.layer_stats = host["layers"] if "layers" in host else self._layer_groups(stats)
            if totals is not None:
                scalars["grad_nonfinite"] = totals[2]
            else:  # counts are >= 0; fmax drops the NaN of tensors without a gradient (what nansum does)
                scalars["grad_nonfinite"] = float(np.fmax(stats[:, _NONFINITE], 0.0).sum())
        if "depth" in host:
            record.depth_names = self._depth_names(len(host["depth"]))
            record.depth_layers = self.depth_layers
            record.depth_stats = host["depth"]
        if "logits" in host:
            scalars["logits_max_abs"], scalars["logits_lse_mean"] = host["logits"].tolist()
        record.histograms = {k[5:]: v for k, v in host.items() if k.startswith("hist:")}
        return record

    # -- histograms and teardown ------------------------------------------------------------------------------

    @torch.no_grad()
    def _histogram_samples(self) -> dict[str, torch.Tensor]:
        """Per layer, an evenly strided sample of at most histogram_values gradient values (on the device)."""
        by_layer: dict[str, list[torch.Tensor]] = {}
        for layer, p in zip(self.layers, self.params.params, strict=True):
            if p.grad is not None:
                by_layer.setdefault(layer, []).append(p.grad.detach().reshape(-1))
        out = {}
        for layer, grads in by_layer.items():
            total = sum(g.numel() for g in grads)
            stride = max(1, -(-total // self.cfg.histogram_values))
            out[layer] = torch.cat([g[::stride] for g in grads])[: self.cfg.histogram_values]
        return out

    def remove(self) -> None:
        """Detach every hook; the model is left exactly as it was."""
        for probe in (self.depth, self.logits):
            if probe is not None:
                probe.remove()

    close = remove


__all__ = ["FlowMonitor", "default_layer_of", "DEPTH_STATS", "TENSOR_STATS"]
