"""A transformers `TrainerCallback`: flowtrain's microscope and the guard's warnings on a `Trainer` run, written to
a standard run directory (`flowtrain report RUN`, `flowtrain diagnose RUN`).

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[FlowtrainCallback(run_dir="runs/hf")])

When it looks (transformers 5.x, `Trainer._inner_training_loop`): per optimizer step `on_step_begin`, the
micro-batches' forward and backward passes, then the Trainer clips (`max_grad_norm`), then `on_pre_optimizer_step`,
`optimizer.step()`, `on_optimizer_step`. No event lies between the last backward pass and the clipping, so the
pre-clip gradients are read where backward leaves them: flow/pre_clip.py's hooks
(`Tensor.register_post_accumulate_grad_hook`). `on_pre_optimizer_step` copies the weights and measures the clipped
norm the optimizer gets; `on_optimizer_step` measures the update that happened. The loss of a step is the one the
model returns (`outputs.loss`, read by a forward hook): summed over micro-batches when the Trainer passed
`num_items_in_batch` (each is then a share of the step's loss), averaged otherwise; a model that returns none
(a custom `compute_loss`) leaves the step without a loss, and the guard's loss detectors without input.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from flowtrain.errors import FlowtrainError, MissingDependency
from flowtrain.flow.config import FlowConfig
from flowtrain.flow.guard import GuardConfig
from flowtrain.flow.pre_clip import PreClipGrads
from flowtrain.integrations.recorder import Recorder, clip_stats, grad_norm

try:
    import transformers
    from transformers import TrainerCallback
except ImportError:
    raise MissingDependency("flowtrain.integrations.hf needs transformers: pip install 'transformers[torch]'") from None


def _torch_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper (its state holds Adam's moments)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


class FlowtrainCallback(TrainerCallback):
    """Observe one `Trainer.train()`; `run_dir` must be new or empty. Options as flowtrain.watch: flow=FlowConfig,
    guard=GuardConfig (warn or off only), blocks=, head= (found by themselves otherwise), tensorboard, flush_rows."""

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
        self.tap: PreClipGrads | None = None
        self._loss_hook = None
        self._losses: list[torch.Tensor] = []
        self._summed = False
        self._clip = None
        self._lr: float | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.recorder is not None:
            raise FlowtrainError(f"this FlowtrainCallback already observed a run ({self.run_dir}); make a new one")
        optimizer = _torch_optimizer(optimizer)
        max_norm = float(args.max_grad_norm or 0.0)
        clip = {"kind": "norm" if max_norm > 0 else "off", "max_norm": max_norm, "by": "transformers.Trainer"}
        loop = {
            "loop": "transformers.Trainer", "transformers": transformers.__version__, "max_steps": state.max_steps,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "per_device_train_batch_size": args.per_device_train_batch_size, "learning_rate": args.learning_rate,
            "lr_scheduler_type": str(args.lr_scheduler_type), "warmup_steps": args.warmup_steps,
            "weight_decay": args.weight_decay, "seed": args.seed, "output_dir": str(args.output_dir),
        }  # fmt: skip
        self.recorder = Recorder(self.run_dir, model, optimizer, loop=loop, clip=clip, start_step=state.global_step,
                                 **self.options)  # fmt: skip
        self.tap = PreClipGrads(self.recorder.params, self.recorder.monitor.clock)
        self.tap.attach()
        self._loss_hook = model.register_forward_hook(self._on_output, with_kwargs=True)

    def _on_output(self, module, args, kwargs, output) -> None:
        if not (module.training and torch.is_grad_enabled()):  # evaluation is not a training step
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach())
            self._summed = kwargs.get("num_items_in_batch") is not None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.recorder is not None:
            self.tap.start(full=self.recorder.monitor.is_monitored())
            self._losses = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.recorder is None:
            return
        monitor, device = self.recorder.monitor, self._device()
        monitor.after_backward(grads=self.tap.figures(device) if monitor.is_monitored() else None)
        self._clip = clip_stats(self.tap.global_norm(device), grad_norm(self.recorder.params))
        self._lr = float(_torch_optimizer(optimizer).param_groups[0]["lr"])

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.recorder is None or self._clip is None:
            return
        self.recorder.monitor.after_step(clip_stats=self._clip)
        self.recorder.step_done(state.global_step + 1, self._step_loss(), self._clip, self._lr)
        self._clip = None

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def _step_loss(self) -> torch.Tensor | None:
        if not self._losses:
            return None
        total = torch.stack(self._losses).float().sum()
        return total if self._summed else total / len(self._losses)

    def _device(self) -> torch.device:
        params = self.recorder.params
        return params[0].device if params else torch.device("cpu")

    def close(self) -> None:
        """Detach every hook and complete the run directory (on_train_end does this; call it if train() raised)."""
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        if self.tap is not None:
            self.tap.detach()
        if self.recorder is not None:
            self.recorder.close()
