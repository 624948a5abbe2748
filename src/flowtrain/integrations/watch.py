"""`flowtrain.watch`: the microscope and the guard's warnings in a plain training loop, written to a run directory.

watcher = flowtrain.watch(model, optimizer, run_dir="runs/mine")
for inputs, targets in batches:
    loss = loss_fn(model(inputs), targets)
    loss.backward()
    watcher.after_backward()      # the gradients as backward left them, before any clipping: read only
    clip_grad_norm_(model.parameters(), 1.0)   # whatever the loop does
    optimizer.step()              # a step pre-hook on the optimizer reads the gradients it gets (post-clip)
    watcher.after_step(loss)      # the update that happened, the loss, the guard's warnings
    optimizer.zero_grad()
watcher.close()                   # flowtrain report runs/mine; flowtrain diagnose runs/mine
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowtrain.errors import FlowtrainError
from flowtrain.flow.config import FlowConfig
from flowtrain.flow.guard import GuardConfig
from flowtrain.integrations.recorder import Recorder, clip_stats, grad_norm


class Watch:
    """What `flowtrain.watch` returns: call `after_backward()` before clipping, `after_step(loss)` after the
    optimizer step, `close()` at the end (or use it as a context manager)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        run_dir: str | Path,
        *,
        flow: FlowConfig | None = None,
        guard: GuardConfig | None = None,
        blocks=None,
        head=None,
        tensorboard: bool = True,
        flush_rows: int = 10,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise FlowtrainError(f"watch() takes a torch.optim.Optimizer, not {type(optimizer).__name__}")
        loop = {"loop": "plain loop (flowtrain.watch)"}
        clip = {"by": "the loop; flowtrain measures the gradient norm at after_backward() and at optimizer.step()"}
        self.recorder = Recorder(run_dir, model, optimizer, loop=loop, clip=clip, flow=flow, guard=guard,
                                 blocks=blocks, head=head, tensorboard=tensorboard, flush_rows=flush_rows)  # fmt: skip
        self.monitor = self.recorder.monitor
        self.step = 0
        self._pre: torch.Tensor | None = None
        self._post: torch.Tensor | None = None
        self._lr: float | None = None
        # public torch hook, called inside optimizer.step() before the update: the gradients after the loop's clipping
        self._hook = optimizer.register_step_pre_hook(self._on_optimizer_step)

    def after_backward(self) -> None:
        """The step's gradients as backward left them (all micro-batches): call it before clipping."""
        self.monitor.after_backward()
        sq = self.monitor.grad_sumsq  # the monitor's own sums on monitored steps: no second pass
        self._pre = sq.sum().sqrt() if sq is not None else grad_norm(self.recorder.params)
        self._post, self._lr = None, None

    def _on_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self._pre is not None and self._post is None:
            self._post = grad_norm(self.recorder.params)
            self._lr = float(optimizer.param_groups[0]["lr"])

    def after_step(self, loss: torch.Tensor | float | None = None) -> None:
        """After `optimizer.step()`: the update, the step's loss (for the guard's loss detectors and metrics.jsonl),
        one metrics row. A step whose optimizer.step() was skipped counts, with no update."""
        if self._pre is None:
            raise FlowtrainError("after_step() without after_backward() for this step; call it after loss.backward()")
        clip = clip_stats(self._pre, self._post if self._post is not None else self._pre)
        self.monitor.after_step(clip_stats=clip)
        self.step += 1
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
        self.recorder.step_done(self.step, loss, clip, self._lr)
        self._pre = None

    @property
    def last_record(self):
        """The newest microscope record written to flow.parquet (rows are written in groups of flush_rows)."""
        return self.recorder.last_record

    @property
    def run_dir(self) -> Path:
        return self.recorder.run.root

    def close(self) -> None:
        """Write everything, remove every hook; the run directory is complete."""
        self._hook.remove()
        self.recorder.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def watch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, run_dir: str | Path, **options) -> Watch:
    """Watch a plain training loop: the microscope (blocks found by itself, flow/structure.py), the guard's
    detectors as warnings, and a standard run directory at `run_dir` (new or empty). Options: flow=FlowConfig,
    guard=GuardConfig (warn or off only), blocks=, head= (as FlowMonitor's), tensorboard=True, flush_rows=10."""
    return Watch(model, optimizer, run_dir, **options)
