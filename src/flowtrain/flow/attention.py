"""Attention along depth, from a sample: entropy and max logit of a few query rows of each block.

A forward pre-hook on each block's attention module takes its input (the first `attn_batch` sequences of a
step's first micro-batch) and has the module compute its scores for them with `attention_logits(x[, doc_ids])`
(or `attention_probs`, which gives no max logit) under no_grad, with the RNG state restored. It runs inside the
forward, so the weights are those the forward uses (also when FSDP2 unshards them only for the forward). Any
module offering either method is sampled the same way, flowtrain's blocks included.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from flowtrain.flow.hooks import first_tensor


def find_attention(block: nn.Module) -> nn.Module | None:
    """The submodule of a block that can show its attention (has `attention_logits` or `attention_probs`)."""
    for module in block.modules():
        if callable(getattr(module, "attention_logits", None)) or callable(getattr(module, "attention_probs", None)):
            return module
    return None


def attention_stats(
    module: nn.Module, x: torch.Tensor, heads: int, positions: int, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """[entropy, max logit] of a sample: the first `heads` heads, `positions` evenly spaced query rows.

    Entropy (nats) is the mean over sampled rows of -sum_j p_ij log p_ij; the max logit is over allowed keys
    (NaN when the module offers only probabilities). `doc_ids` is passed on when the forward got one.
    """
    extra = (doc_ids,) if doc_ids is not None else ()
    logits_fn = getattr(module, "attention_logits", None)
    if callable(logits_fn):
        scores = logits_fn(x, *extra).float()
        probs = torch.softmax(scores, dim=-1)
    else:
        scores, probs = None, module.attention_probs(x, *extra).float()
    t = probs.shape[-2]
    rows = torch.linspace(0, t - 1, min(positions, t), device=probs.device).round().long()
    p = probs[:, :heads, rows, :]
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-38)), torch.zeros_like(p))
    entropy = -plogp.sum(-1).mean()
    max_logit = scores[:, :heads, rows, :].amax() if scores is not None else torch.full_like(entropy, float("nan"))
    return torch.stack([entropy, max_logit])


class AttentionSampler:
    """Forward pre-hooks on each block's attention module; `stats()` after the step."""

    def __init__(self, blocks: Sequence[nn.Module], cfg) -> None:
        self.cfg = cfg
        self.modules = [find_attention(b) for b in blocks]
        self.plan = [
            (m, "forward_pre_kwargs", functools.partial(self._on_input, i))
            for i, m in enumerate(self.modules)
            if m is not None
        ]
        self.pairs: list[torch.Tensor | None] = [None] * len(self.modules)

    def _on_input(self, block: int, module, args, kwargs) -> None:
        if self.pairs[block] is not None or not args or not torch.is_grad_enabled():
            return  # the first micro-batch's sample only; evaluation is not training
        x = first_tensor(args[0])
        if x is None:
            return
        n, cfg = self.cfg.attn_batch, self.cfg
        doc_ids = kwargs.get("doc_ids", args[1] if len(args) > 1 else None)
        doc_ids = doc_ids[:n] if isinstance(doc_ids, torch.Tensor) else None
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            self.pairs[block] = attention_stats(module, x.detach()[:n], cfg.attn_heads, cfg.attn_positions, doc_ids)

    def stats(self) -> list[torch.Tensor | None]:
        """Per block [entropy, max logit] (device tensors) of this step, None where nothing was sampled."""
        pairs, self.pairs = self.pairs, [None] * len(self.modules)
        return pairs
