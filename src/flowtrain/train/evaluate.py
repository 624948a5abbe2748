"""Validation: loss, perplexity and bits per byte on a fixed subset (or the whole split)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

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


class Evaluation:
    """When the loop evaluates (every `interval` steps and at `max_steps`), and the best result so far.

    `run(full)` evaluates the model now (the fixed subset, or the whole split); the best validation loss and
    its step are part of the training state (a resumed run keeps them; `best` checkpoints are kept).
    """

    def __init__(self, run: Callable[[bool], dict[str, float]], interval: int, max_steps: int):
        self.run, self.interval, self.max_steps = run, interval, max_steps
        self.best_val_loss: float | None = None
        self.best_step: int | None = None

    def due(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.max_steps

    def maybe_eval(self, step: int, record: Callable[[int, dict[str, float]], None]) -> dict[str, float] | None:
        """Evaluate when `step` is due; `record(step, result)` writes a non-empty result. Returns it (or None)."""
        if not self.due(step):
            return None
        result = self.run(False)
        if result:
            if self.best_val_loss is None or result["val_loss"] < self.best_val_loss:
                self.best_val_loss, self.best_step = result["val_loss"], step
            record(step, result)
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"best_val_loss": self.best_val_loss, "best_step": self.best_step}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.best_val_loss = saved.get("best_val_loss")
        self.best_step = saved.get("best_step")
