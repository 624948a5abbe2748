"""The language-modelling loss: cross-entropy (+ label smoothing) and the z-loss, in float32.

Why float32: under bf16 autocast the logits are low precision, and log-softmax over a large vocabulary
loses the small differences that carry the gradient. Why sum / count instead of mean: with every target
ignored (a fully padded micro-batch) a mean is 0/0 = NaN; here it is a zero that still backprops.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class LossParts(NamedTuple):
    """loss = ce + z_loss * z, each a 0-dim float32 tensor (no host sync)."""

    loss: torch.Tensor
    ce: torch.Tensor
    z: torch.Tensor


def lm_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int = -100,
) -> LossParts:
    """Next-token loss averaged over the targets that are not ignore_index.

    ce: F.cross_entropy with label smoothing, i.e. per token (1 - eps) * nll + eps * mean_c(-log p_c).
    z:  mean over real tokens of logsumexp(logits)^2 (PaLM's z-loss; it keeps the softmax normaliser near 1
        and the logits from drifting). When z_loss is 0 it is still reported but computed without autograd.
    """
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab).float()
    flat_targets = targets.reshape(-1)
    if flat_targets.shape[0] != flat_logits.shape[0]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not describe the same tokens"
        )
    real = flat_targets != ignore_index
    n_real = real.sum().clamp(min=1).to(torch.float32)
    ce_sum = F.cross_entropy(
        flat_logits,
        flat_targets,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    ce = ce_sum / n_real
    with torch.set_grad_enabled(torch.is_grad_enabled() and z_loss > 0):
        lse = torch.logsumexp(flat_logits, dim=-1)
        z = lse.masked_fill(~real, 0.0).square().sum() / n_real
    loss = ce + z_loss * z if z_loss > 0 else ce
    return LossParts(loss, ce, z.detach() if z_loss == 0 else z)
