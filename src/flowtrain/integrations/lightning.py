"""A Lightning `Callback`: flowtrain's microscope and the guard's warnings on a `lightning.Trainer` run, written to
a standard run directory (`flowtrain report RUN`, `flowtrain diagnose RUN`).

    trainer = lightning.Trainer(max_steps=100, gradient_clip_val=1.0, callbacks=[FlowtrainCallback(run_dir="runs/pl")])

When it looks (Lightning 2.x, Precision._after_closure): the closure runs the training step and backward, then
`on_before_optimizer_step` (the gradients of the whole step, not clipped yet: the monitor reads them and copies
the weights), then Lightning clips (`gradient_clip_val`), then the torch optimizer updates. The next event,
`on_train_batch_end`, comes after the update: the update is measured there, and the clipped gradients the
optimizer got are read from `.grad`, which torch's optimizers leave as they found it and Lightning zeroes only
at the next step. The step's loss is the sum of the training steps' losses Lightning hands to
`on_train_batch_end` (each already divided by `accumulate_grad_batches`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from flowtrain.errors import FlowtrainError, MissingDependency
from flowtrain.flow.config import FlowConfig
from flowtrain.flow.guard import GuardConfig
from flowtrain.integrations.recorder import Recorder, clip_stats, grad_norm

try:
    import lightning
    from lightning.pytorch.callbacks import Callback
except ImportError:
    raise MissingDependency("flowtrain.integrations.lightning needs Lightning: pip install lightning") from None


class FlowtrainCallback(Callback):
    """Observe one `Trainer.fit()` with one optimizer; `run_dir` must be new or empty. Options as flowtrain.watch:
    flow=FlowConfig, guard=GuardConfig (warn or off only), blocks=, head=, tensorboard, flush_rows."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        flow: FlowConfig | None = None,
        guard: GuardConfig | None = None,
        blocks=None,
        head=None,
        tensorboard: bool = True,
        flush_rows: int = 10,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.options = dict(flow=flow, guard=guard, blocks=blocks, head=head, tensorboard=tensorboard,
                            flush_rows=flush_rows)  # fmt: skip
        self.recorder: Recorder | None = None
        self._pre: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None
        self._lr: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if self.recorder is not None:
            raise FlowtrainError(f"this FlowtrainCallback already observed a run ({self.run_dir}); make a new one")
        if len(trainer.optimizers) != 1:
            raise FlowtrainError(
                f"FlowtrainCallback observes a module with one optimizer; this one has {len(trainer.optimizers)}"
            )
        clip_val = trainer.gradient_clip_val
        kind = (trainer.gradient_clip_algorithm or "norm") if clip_val else "off"
        clip = {"kind": str(kind), "max_norm": float(clip_val or 0.0), "by": "lightning.Trainer"}
        loop = {"loop": "lightning.Trainer", "lightning": lightning.__version__, "max_steps": trainer.max_steps,
                "max_epochs": trainer.max_epochs, "accumulate_grad_batches": trainer.accumulate_grad_batches,
                "precision": str(trainer.precision)}  # fmt: skip
        self.recorder = Recorder(self.run_dir, pl_module, trainer.optimizers[0], loop=loop, clip=clip,
                                 start_step=trainer.global_step, **self.options)  # fmt: skip

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.recorder is None:
            return
        monitor = self.recorder.monitor
        monitor.after_backward()
        sq = monitor.grad_sumsq  # the monitor's own sums on monitored steps: no second pass
        self._pre = sq.sum().sqrt() if sq is not None else grad_norm(self.recorder.params)
        self._lr = float(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.recorder is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()
        if self._pre is None:  # a micro-batch of an accumulating step: no optimizer step yet
            return
        clip = clip_stats(self._pre, grad_norm(self.recorder.params))
        self.recorder.monitor.after_step(clip_stats=clip)
        self.recorder.step_done(trainer.global_step, self._loss, clip, self._lr)
        self._pre = self._loss = None

    def on_train_end(self, trainer, pl_module) -> None:
        self.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.close()

    def close(self) -> None:
        """Complete the run directory and detach every hook (on_train_end and on_exception do this)."""
        if self.recorder is not None:
            self.recorder.close()
