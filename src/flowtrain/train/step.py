"""One optimizer step, exactly as the textbook draws it: one named call per arrow.

batch load → model (embedding → attention → FFN → prediction) → cross-entropy → backprop (× micro-steps)
→ observe gradients → clip → guard verdict → optimizer + schedule → observe the update
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowtrain.flow.guard import Verdict
from flowtrain.model.loss import lm_loss
from flowtrain.optim.clipping import ClipStats


@dataclass
class StepOutput:
    loss: torch.Tensor  # mean training loss over the step's real target tokens (device tensor, no sync)
    clip: ClipStats
    verdict: Verdict
    tokens: int  # input tokens processed (for tokens/s)


def train_step(run) -> StepOutput:
    """Run optimizer step number `run.step + 1` of `run` (a Trainer). Returns device tensors.

    Distributed (DDP/FSDP2): this rank's micro-batches are its share of the global batch; the frameworks
    average gradients over ranks, so each rank's loss is scaled by world_size (a no-op in one process) and
    the reported loss, norms and guard decision are those of the whole global batch.
    """
    micro_batches = run.micro_batches()  # batch load (this rank's slots of the global batch)
    real_targets = run.global_targets(sum(b.n_targets for b in micro_batches))
    step_loss = torch.zeros((), device=run.device)
    for i, batch in enumerate(micro_batches):
        inputs, targets, doc_ids = run.to_device(batch)
        with run.grad_sync(last=i == len(micro_batches) - 1):
            with run.precision.autocast():
                logits = run.model(inputs, doc_ids=doc_ids)  # embedding → attention → FFN → prediction
            loss = lm_loss(logits, targets, **run.loss_options).loss  # cross-entropy (+ smoothing, z-loss)
            weight = batch.n_targets / max(real_targets, 1)  # mean over all real tokens of the step
            run.backward(loss * (weight * run.world_size))  # backprop → gradients (accumulate)
        step_loss += loss.detach() * weight
    step_loss = run.global_loss(step_loss)  # sum over ranks = the global batch's mean
    run.unscale_gradients()  # fp16 only: gradients back to true scale before anyone looks at them
    run.flow.after_backward()  # observe gradients (reads only)
    clip = run.clipper(run.named_params, grad_sumsq=run.flow.grad_sumsq)  # gradient clipping (full norms)
    verdict = run.guard.check(run.step + 1, step_loss, clip.grad_norm_preclip, run.host_checks_now())
    verdict = run.agree(verdict)  # one decision on every rank
    run.optimizer_step(skip=verdict.skip)  # AdamW → weight update (unless the guard says skip)
    run.scheduler.step()  # LR schedule
    run.flow.after_step(clip_stats=clip)  # update/weight ratios
    run.optimizer.zero_grad(set_to_none=True)
    tokens = sum(b.inputs.numel() for b in micro_batches)
    return StepOutput(loss=step_loss, clip=clip, verdict=verdict, tokens=tokens)
