"""One optimizer step, exactly as the textbook draws it: one named call per arrow.

batch load → model (embedding → attention → FFN → prediction) → cross-entropy → backprop (× micro-steps)
→ observe gradients → clip → guard verdict → optimizer + schedule → observe the update

The step sees only `TrainState`, the handful of objects it drives, so it can be read (and called) without the
trainer around it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flowtrain.flow.guard import Guard, Verdict
from flowtrain.flow.monitor import FlowMonitor
from flowtrain.model.loss import lm_loss
from flowtrain.optim.clipping import ClipStats, GradClipper
from flowtrain.train.distributed import DataParallel, SlotLoaders
from flowtrain.train.runtime import Precision


@dataclass
class TrainState:
    """What a training step reads and changes; `step` counts the optimizer steps done."""

    model: nn.Module  # runs the forward: the raw model, or its DDP / compiled wrapper
    raw_model: nn.Module  # the weights themselves (checkpoints, snapshots, the clipper's parameter names)
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch LR scheduler
    loader: SlotLoaders  # this rank's micro-batch slots of the global batch
    clipper: GradClipper
    guard: Guard
    precision: Precision
    parallel: DataParallel
    device: torch.device
    monitor: FlowMonitor | None = None  # attached once the state is restored (it counts from the restored step)
    eager_model: nn.Module | None = None  # a compiled `model` without torch.compile: the monitored steps' forward
    loss_options: dict[str, float] = field(default_factory=dict)  # lm_loss keywords (label smoothing, z-loss)
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling
    host_check_every: int = 1  # the guard reads numbers on the host every N steps (1 on CPU: always)
    step: int = 0
    named_params: list[tuple[str, nn.Parameter]] = field(init=False)

    def __post_init__(self) -> None:
        self.named_params = [(n, p) for n, p in self.raw_model.named_parameters() if p.requires_grad]

    def forward_model(self) -> nn.Module:
        """The module that runs this step's forward. A compiled model runs as compiled between monitored steps and
        eagerly on them: dynamo does not guard on module hooks, so a graph compiled without the microscope's hooks
        would never call them, and one compiled with them would break at every hook on every step."""
        if self.eager_model is not None and self.monitor is not None and self.monitor.is_monitored():
            return self.eager_model
        return self.model

    def host_checks_now(self) -> bool:
        """Whether the guard reads numbers on the host in the step about to run."""
        return (self.step + 1) % self.host_check_every == 0


@dataclass
class StepOutput:
    loss: torch.Tensor  # mean training loss over the step's real target tokens (device tensor, no sync)
    clip: ClipStats
    verdict: Verdict
    tokens: int  # input tokens processed (for tokens/s)


def train_step(state: TrainState) -> StepOutput:
    """Run optimizer step number `state.step + 1` and count it in `state.step`. Returns device tensors.

    Distributed (DDP/FSDP2): this rank's micro-batches are its share of the global batch; the frameworks
    average gradients over ranks, so each rank's loss is scaled by world_size (a no-op in one process) and
    the reported loss, norms and guard decision are those of the whole global batch.
    """
    parallel = state.parallel
    micro_batches = state.loader.next_step()  # batch load (this rank's slots of the global batch)
    real_targets = parallel.global_targets(sum(b.n_targets for b in micro_batches))
    step_loss = torch.zeros((), device=state.device)
    model = state.forward_model()
    for i, batch in enumerate(micro_batches):
        inputs, targets, doc_ids = _to_device(batch, state.device)
        with parallel.grad_sync(model, last=i == len(micro_batches) - 1):
            with state.precision.autocast():
                logits = model(inputs, doc_ids=doc_ids)  # embedding → attention → FFN → prediction
            loss = lm_loss(logits, targets, **state.loss_options).loss  # cross-entropy (+ smoothing, z-loss)
            weight = batch.n_targets / max(real_targets, 1)  # mean over all real tokens of the step
            _backward(state, loss * (weight * parallel.world_size))  # backprop → gradients (accumulate)
        step_loss += loss.detach() * weight
    step_loss = parallel.global_loss(step_loss)  # sum over ranks = the global batch's mean
    _unscale_gradients(state)  # fp16 only: gradients back to true scale before anyone looks at them
    state.monitor.after_backward()  # observe gradients (reads only)
    clip = state.clipper(state.named_params, grad_sumsq=state.monitor.grad_sumsq)  # gradient clipping
    host_now = state.host_checks_now()
    verdict = state.guard.check(state.step + 1, step_loss, clip.grad_norm_preclip, host_now, clip.clipped)
    verdict = parallel.agree(verdict, state.guard, host_now)  # one decision on every rank
    optimizer_step(state, skip=verdict.skip)  # AdamW → weight update (unless the guard says skip)
    state.scheduler.step()  # LR schedule
    state.monitor.after_step(clip_stats=clip)  # update/weight ratios
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    tokens = sum(b.inputs.numel() for b in micro_batches)
    return StepOutput(loss=step_loss, clip=clip, verdict=verdict, tokens=tokens)


def _to_device(batch, device: torch.device):
    doc_ids = batch.doc_ids.to(device, non_blocking=True) if batch.doc_ids is not None else None
    return batch.inputs.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True), doc_ids


def _backward(state: TrainState, loss: torch.Tensor) -> None:
    (state.scaler.scale(loss) if state.scaler else loss).backward()


def _unscale_gradients(state: TrainState) -> None:
    if state.scaler:
        # activation gradients seen by the microscope's hooks carry the loss scale too (a device tensor)
        state.monitor.backward_scale = state.parallel.world_size * state.scaler._scale.detach().clone()
        state.scaler.unscale_(state.optimizer)


def optimizer_step(state: TrainState, skip: torch.Tensor | None = None) -> None:
    """Apply the update unless `skip` (a device bool) is set.

    Fused torch optimizers take the decision as a tensor (`found_inf`, the GradScaler mechanism) and leave
    weights, moments and step counts untouched in-kernel, so no host sync is needed; otherwise we branch
    on the host.
    """
    optimizer, scaler = state.optimizer, state.scaler
    if scaler:
        if skip is None or not bool(skip):
            scaler.step(optimizer)
        scaler.update()
    elif skip is None:
        optimizer.step()
    elif optimizer.defaults.get("fused"):
        optimizer.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(skip):
        optimizer.step()
