"""Validation: loss, perplexity and bits per byte on a fixed subset (or the whole split)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from flowtrain.model.loss import lm_loss
from flowtrain.train.runtime import Precision


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable,
    *,
    device: torch.device,
    precision: Precision,
    bytes_per_token: float,
) -> dict[str, float]:
    """Token-weighted mean cross-entropy (no label smoothing, no z-loss: the number papers report).

    Bits per byte = loss / ln 2 / (bytes per token), so runs with different tokenizers on the same text compare.
    """
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    try:
        for batch in batches:
            inputs = batch.inputs.to(device, non_blocking=True)
            targets = batch.targets.to(device, non_blocking=True)
            doc_ids = batch.doc_ids.to(device) if batch.doc_ids is not None else None
            with precision.autocast():
                logits = model(inputs, doc_ids=doc_ids)
            parts = lm_loss(logits, targets)
            total += parts.ce.double() * batch.n_targets
            count += batch.n_targets
    finally:
        model.train(was_training)
    if count == 0:
        return {}
    loss = (total / count).item()
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 700.0)),
        "val_bpb": loss / math.log(2) / bytes_per_token,
        "val_tokens": count,
    }
