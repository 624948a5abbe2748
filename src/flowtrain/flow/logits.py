"""The output logits: max |z| and mean log-sum-exp over every position of a monitored step (a forward hook on
the head). A growing log-sum-exp or max logit is the usual sign of output-logit divergence."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from flowtrain import tensorstats
from flowtrain.flow.hooks import HookSet, first_tensor, timed


class LogitsProbe:
    def __init__(self, head: nn.Module, clock) -> None:
        self.hooks = HookSet([(head, "forward", timed(clock, self._on_output))])
        self._reset()

    def _reset(self) -> None:
        self.max_abs: torch.Tensor | None = None
        self.lse_sum: torch.Tensor | None = None
        self.rows = 0

    @property
    def saw_forward(self) -> bool:
        """A training forward called the hook since arm()."""
        return self.rows > 0

    def arm(self) -> None:
        self._reset()
        self.hooks.attach()

    def disarm(self) -> None:
        self.hooks.detach()

    def _on_output(self, module, args, output) -> None:
        z = first_tensor(output)
        if z is None or not torch.is_grad_enabled():
            return
        z = z.detach()  # no autograd graph, no no_grad() needed
        mx = tensorstats.max_abs_one(z)
        lse = torch.logsumexp(z.float(), dim=-1).sum()
        self.max_abs = mx if self.max_abs is None else torch.maximum(self.max_abs, mx)
        self.lse_sum = lse if self.lse_sum is None else self.lse_sum + lse
        self.rows += math.prod(z.shape[:-1])

    def raw(self, device: torch.device, sync: bool) -> torch.Tensor:
        """[lse sum, rows, max |z|] float32 on `device` (0, 0, -inf when nothing was seen), over all ranks with
        `sync`."""
        lse = self.lse_sum if self.lse_sum is not None else torch.zeros((), device=device)
        mx = self.max_abs if self.max_abs is not None else torch.full((), float("-inf"), device=device)
        raw = torch.stack([lse.float().to(device), torch.full((), float(self.rows), device=device), mx.to(device)])
        if sync:
            tensorstats.all_reduce_sums_then_maxima(raw, 2)
        self._reset()
        return raw


def logits_figures(raw: np.ndarray) -> tuple[float, float]:
    """(max |z|, mean log-sum-exp) from the raw values on the host; NaN when nothing was seen."""
    lse_sum, rows, mx = (float(v) for v in raw)
    return (mx, lse_sum / rows) if rows > 0 else (math.nan, math.nan)
