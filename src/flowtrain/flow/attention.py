"""Attention along depth, from a sample: entropy and max logit of a few query rows of each block.

Two ways, both forward pre-hooks on a module of the block, on the first `attn_batch` sequences of a step's
first micro-batch:

* an attention kernel module called as (q, k, v, attn_mask, dropout_p, is_causal) — flowtrain's `Attend` —
  shows the exact q and k the model used: the hook keeps the sampled query rows, their keys and which keys
  each row may see, and all blocks are reduced in one batch after the step;
* any other module offering `attention_logits(x[, doc_ids])` (or `attention_probs`, which gives no max logit)
  recomputes its scores for the sample inside the forward (where FSDP2 has the weights unsharded), under
  no_grad with the RNG state restored.

A block with neither reports NaN.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from flowtrain.flow.hooks import first_tensor
from flowtrain.model.layers import Attend


def find_attention(block: nn.Module) -> tuple[str, nn.Module] | None:
    """("kernel", module) for an attention kernel module in the block, else ("recompute", module) for the first
    submodule offering `attention_logits` or `attention_probs`, else None."""
    kernel = next((m for m in block.modules() if isinstance(m, Attend)), None)
    if kernel is not None:
        return "kernel", kernel
    for module in block.modules():
        if callable(getattr(module, "attention_logits", None)) or callable(getattr(module, "attention_probs", None)):
            return "recompute", module
    return None


@functools.lru_cache(maxsize=64)
def _rows(n: int, positions: int, device: torch.device) -> torch.Tensor:
    """`positions` evenly spaced query rows of n (all of them when n is smaller); the same few every step."""
    return torch.linspace(0, n - 1, min(positions, n), device=device).round().long()


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    """A bool mask as scores to add: 0 where a key may be seen, -inf where not."""
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, float("-inf"))


@functools.lru_cache(maxsize=64)
def _causal(n_query: int, n_key: int, positions: int, is_causal: bool, device: torch.device) -> torch.Tensor:
    """[1, 1, P, T]: the additive mask of the sampled rows without an explicit mask (query i sees keys up to i,
    aligned to the last key; all of them when not causal)."""
    rows, keys = _rows(n_query, positions, device), torch.arange(n_key, device=device)
    allowed = keys[None, :] <= rows[:, None] + (n_key - n_query) if is_causal else keys[None, :] >= 0
    return _additive(allowed[None, None])


def _entropy_and_max(scores: torch.Tensor, dims: int) -> torch.Tensor:
    """[..., 2]: mean entropy of softmax(scores) over rows and the max score, over the last `dims` dimensions
    before the keys; masked keys are -inf. -sum p log p with log p clamped at -1e4: a masked key (p = 0, log p =
    -inf) adds 0, and no float32 p with log p below -104 differs from 0 anyway."""
    logp = torch.log_softmax(scores, dim=-1).clamp_min_(-1e4)
    entropy = (torch.softmax(scores, dim=-1) * logp).sum(-1).flatten(-dims).mean(-1).neg().clamp_min(0)  # rounding
    return torch.stack([entropy, scores.flatten(-dims - 1).amax(-1)], dim=-1)


def kernel_attention_stats(samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """[n, 2] = (entropy, max logit) of n (q rows [b,h,P,d], k [b,h,T,d], mask [b or 1,1,P,T]: 0 where a key may
    be seen, -inf where not) samples, in one batch when their shapes agree."""
    if len({(q.shape, k.shape, m.shape) for q, k, m in samples}) > 1:
        return torch.cat([kernel_attention_stats([s]) for s in samples])
    q = torch.stack([s[0] for s in samples]).float()
    k = torch.stack([s[1] for s in samples]).float()
    bias = torch.stack([s[2] for s in samples])
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5).add_(bias)
    return _entropy_and_max(scores, 3)


def attention_stats(
    module: nn.Module, x: torch.Tensor, heads: int, positions: int, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """[entropy, max logit] of the module's own scores for input x: the first `heads` heads, `positions` evenly
    spaced query rows (the max logit is NaN when the module offers only probabilities)."""
    extra = (doc_ids,) if doc_ids is not None else ()
    logits_fn = getattr(module, "attention_logits", None)
    full = logits_fn(x, *extra) if callable(logits_fn) else module.attention_probs(x, *extra)
    sample = full[:, :heads, _rows(full.shape[-2], positions, full.device), :].float()
    if callable(logits_fn):
        return _entropy_and_max(sample, 3)
    entropy = torch.special.entr(sample).sum(-1).mean()  # entr(p) = -p log p, 0 at p = 0
    return torch.stack([entropy, torch.full_like(entropy, float("nan"))])


class AttentionSampler:
    """Forward pre-hooks on each block's attention module; `stats()` after the step."""

    def __init__(self, blocks: Sequence[nn.Module], cfg) -> None:
        self.cfg = cfg
        found = [find_attention(b) for b in blocks]
        self.modules = [f[1] if f is not None else None for f in found]
        self.plan = []
        for i, f in enumerate(found):
            if f is not None and f[0] == "kernel":
                self.plan.append((f[1], "forward_pre", functools.partial(self._on_kernel, i)))
            elif f is not None:
                self.plan.append((f[1], "forward_pre_kwargs", functools.partial(self._on_module, i)))
        self._reset()

    def _reset(self) -> None:
        self.pairs: list[torch.Tensor | None] = [None] * len(self.modules)  # recomputed
        self.samples: list[tuple | None] = [None] * len(self.modules)  # kept at a kernel

    def _taken(self, block: int) -> bool:
        """The first micro-batch's sample only; evaluation is not training."""
        return self.pairs[block] is not None or self.samples[block] is not None or not torch.is_grad_enabled()

    def _on_kernel(self, block: int, module, args) -> None:
        if len(args) < 2 or self._taken(block):
            return
        q, k = args[0].detach(), args[1].detach()
        mask = args[3] if len(args) > 3 else None
        is_causal = bool(args[5]) if len(args) > 5 else mask is None
        n, heads, positions = self.cfg.attn_batch, self.cfg.attn_heads, self.cfg.attn_positions
        rows = _rows(q.shape[-2], positions, q.device)
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
            bias = _additive(mask[:n].index_select(-2, rows))
        else:
            bias = _causal(q.shape[-2], k.shape[-2], positions, is_causal, q.device)
        self.samples[block] = (q[:n, :heads].index_select(-2, rows), k[:n, :heads], bias)

    def _on_module(self, block: int, module, args, kwargs) -> None:
        x = first_tensor(args[0]) if args else None
        if x is None or self._taken(block):
            return
        n = self.cfg.attn_batch
        doc_ids = kwargs.get("doc_ids", args[1] if len(args) > 1 else None)
        doc_ids = doc_ids[:n] if isinstance(doc_ids, torch.Tensor) else None
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            cfg = self.cfg
            self.pairs[block] = attention_stats(module, x.detach()[:n], cfg.attn_heads, cfg.attn_positions, doc_ids)

    def stats(self) -> list[torch.Tensor | None]:
        """Per block [entropy, max logit] (device tensors) of this step, None where nothing was sampled; forgets
        the step's samples."""
        pairs, samples = self.pairs, self.samples
        self._reset()
        kept = [i for i, s in enumerate(samples) if s is not None]
        if kept:
            with torch.no_grad():
                for i, pair in zip(kept, kernel_attention_stats([samples[i] for i in kept]), strict=True):
                    pairs[i] = pair
        return pairs
