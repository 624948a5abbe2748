"""Statistics along depth: the residual stream h_0 (input of the first block) .. h_L (output of the last block).

Forward hooks on the blocks reduce each boundary's activation as the block returned it (L2 norm, max |x|) and
register a gradient hook on it that takes ||dL/dh_l||. Each micro-batch has its own activations, disjoint
variables of the step's loss L = sum_m L_m, so the squared gradient norm of the whole step is the sum of the
micro-batches' squared norms: combining them as sqrt(a² + b²) gives exactly what one big batch of the same
rows gives. Everything stays on the device until the monitor's one transfer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from flowtrain import tensorstats
from flowtrain.flow.attention import AttentionSampler
from flowtrain.flow.hooks import HookSet, first_tensor, timed

# rows of the raw [8, L+1] device matrix: six that add up over ranks, then two maxima
RAW_ROWS = ("resid_sumsq", "resid_seen", "act_sumsq", "act_count", "attn_entropy_sum", "attn_seen")
RAW_MAX_ROWS = ("act_max", "attn_max_logit")


def _hypot(total: torch.Tensor | None, norm: torch.Tensor) -> torch.Tensor:
    """Running L2 norm over micro-batches: sqrt(total² + norm²)."""
    return norm if total is None else torch.hypot(total, norm)


class DepthProbe:
    """Hooks on a stack of blocks; `arm()` before a monitored step, `raw()` after its backward pass."""

    def __init__(self, blocks: Sequence[nn.Module], cfg, clock) -> None:
        self.blocks, self.cfg = list(blocks), cfg
        self.n = len(self.blocks) + 1  # boundaries h_0..h_L
        self.attention = AttentionSampler(self.blocks, cfg) if cfg.attention else None
        plan = [(self.blocks[0], "forward_pre_kwargs", self._on_input)]
        plan += [(b, "forward", functools.partial(self._on_output, i + 1)) for i, b in enumerate(self.blocks)]
        plan += self.attention.plan if self.attention is not None else []
        self.hooks = HookSet([(m, kind, timed(clock, hook)) for m, kind, hook in plan])
        self._grad_hooks = [timed(clock, functools.partial(self._on_grad, i)) for i in range(self.n)]
        self._reset()

    def _reset(self) -> None:
        self.resid_norm: list[torch.Tensor | None] = [None] * self.n
        self.act_norm: list[torch.Tensor | None] = [None] * self.n
        self.act_max: list[torch.Tensor | None] = [None] * self.n
        self.act_count = [0] * self.n
        self.saw_forward = False  # a training forward called the hooks since arm()

    def arm(self) -> None:
        self._reset()
        if self.attention is not None:
            self.attention.stats()  # forget a sample of a step that never finished
        self.hooks.attach()

    def disarm(self) -> None:
        self.hooks.detach()

    def _on_input(self, module, args, kwargs) -> None:
        h = args[0] if args else kwargs.get("hidden_states")  # transformers' name, for a block called by keyword
        self._observe(0, first_tensor(h))

    def _on_output(self, index: int, module, args, output) -> None:
        self._observe(index, first_tensor(output))

    def _observe(self, index: int, h: torch.Tensor | None) -> None:
        if h is None or not torch.is_grad_enabled():  # evaluation and sampling are not training
            return
        self.saw_forward = True
        if self.cfg.activations:  # on the detached tensor: no autograd graph, no no_grad() needed
            d = h.detach()
            self.act_norm[index] = _hypot(self.act_norm[index], torch.linalg.vector_norm(d, dtype=torch.float32))
            mx, prev = tensorstats.max_abs_one(d), self.act_max[index]
            self.act_max[index] = mx if prev is None else torch.maximum(prev, mx)
            self.act_count[index] += d.numel()
        if self.cfg.residual and h.requires_grad:
            h.register_hook(self._grad_hooks[index])

    def _on_grad(self, index: int, grad: torch.Tensor) -> None:
        norm = torch.linalg.vector_norm(grad.detach(), dtype=torch.float32)
        self.resid_norm[index] = _hypot(self.resid_norm[index], norm)

    def raw(self, device: torch.device, sync: bool, backward_scale) -> torch.Tensor:
        """[8, L+1] float32 on `device` (rows RAW_ROWS + RAW_MAX_ROWS; zeros / -inf where nothing was seen; host
        values travel with non-blocking copies, so a monitored step never waits for the device),
        combined over the ranks of a data-parallel job with `sync`. Residual gradients are divided by
        `backward_scale` (a float or a device tensor), the factor the backward pass was scaled by."""
        zero = torch.zeros((), device=device)
        low = torch.full((), float("-inf"), device=device)
        attention = self.attention.stats() if self.attention is not None else [None] * len(self.blocks)
        attention = [None, *attention]  # h_0 has no attention

        def row(values: list, fill: torch.Tensor) -> torch.Tensor:
            return torch.stack([fill if v is None else v for v in values]).to(device)

        def seen(values: list) -> torch.Tensor:
            return torch.tensor([v is not None for v in values], dtype=torch.float32).to(device, non_blocking=True)

        entropy = [a[0] if a is not None else None for a in attention]
        rows = [
            row(self.resid_norm, zero).square(),
            seen(self.resid_norm),
            row(self.act_norm, zero).square(),
            torch.tensor(self.act_count, dtype=torch.float32).to(device, non_blocking=True),
            row(entropy, zero),
            seen(entropy),
            row(self.act_max, low),
            row([a[1] if a is not None else None for a in attention], low),
        ]
        raw = torch.stack(rows)
        if isinstance(backward_scale, torch.Tensor):  # the fp16 loss scale: on the device
            raw[0] = raw[0] / backward_scale.to(device).float() ** 2
        elif backward_scale != 1:
            raw[0] = raw[0] / float(backward_scale) ** 2
        if sync:
            tensorstats.all_reduce_sums_then_maxima(raw, len(RAW_ROWS))
        self._reset()
        return raw


def depth_table(raw: np.ndarray) -> np.ndarray:
    """[L+1, len(DEPTH_STATS)] from the raw rows on the host: norms, RMS, the attention averaged over ranks; NaN
    where a boundary was not seen."""
    resid_sumsq, resid_seen, act_sumsq, count, ent_sum, att_seen, act_max, att_max = raw.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        columns = [
            np.where(resid_seen > 0, np.sqrt(resid_sumsq), math.nan),
            np.where(count > 0, np.sqrt(act_sumsq / count), math.nan),
            np.where(count > 0, act_max, math.nan),
            np.where(att_seen > 0, ent_sum / att_seen, math.nan),
            np.where(att_seen > 0, att_max, math.nan),
        ]
    return np.stack(columns, 1).astype(np.float32)
