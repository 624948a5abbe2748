"""Gradient figures taken before clipping, for loops that clip before an observer may look.

transformers' Trainer clips between the last backward pass and its first callback event after it
(`on_pre_optimizer_step` already sees the clipped gradients). A hook that torch calls the moment backward has
finished accumulating a parameter's gradient (`Tensor.register_post_accumulate_grad_hook`, public since torch 2.1)
still sees the gradient as backward left it: its figures, taken there with the same tensorstats calls the monitor
uses, are the pre-clip picture. Under gradient accumulation each micro-batch's backward takes them again; the
last one stands, being of the whole accumulated gradient. Hooks only read, so training is unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from flowtrain import tensorstats
from flowtrain.flow.hooks import timed


class PreClipGrads:
    """Per-parameter gradient figures as backward leaves them; `start(full)` before a step's first micro-batch,
    `global_norm()` / `figures()` after its last backward, whatever happened to `.grad` since."""

    def __init__(self, params: Sequence[torch.nn.Parameter], clock=None) -> None:
        self.params = list(params)
        self.clock = clock  # a budget.Stopwatch: the hooks' time is the microscope's
        self.handles: list = []
        self.start(False)

    def attach(self) -> None:
        if not self.handles:
            hooks = [functools.partial(self._on_grad, i) for i in range(len(self.params))]
            if self.clock is not None:
                hooks = [timed(self.clock, h) for h in hooks]
            self.handles = [p.register_post_accumulate_grad_hook(h) for p, h in zip(self.params, hooks, strict=True)]

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def start(self, full: bool) -> None:
        """A new optimizer step: forget the last one's figures. `full`: also max |g| and non-finite counts (a
        monitored step); otherwise only the sums of squares for the global norm."""
        n = len(self.params)
        self.full = full
        self.sumsq: list[torch.Tensor | None] = [None] * n
        self.max_abs: list[torch.Tensor | None] = [None] * n
        self.nonfinite: list[torch.Tensor | None] = [None] * n

    @torch.no_grad()
    def _on_grad(self, index: int, param: torch.nn.Parameter) -> None:
        grad = param.grad
        sq = tensorstats.sums_of_squares([grad])
        self.sumsq[index] = sq[0]
        if self.full:
            self.max_abs[index] = tensorstats.max_abs_one(tensorstats.local(grad))
            # as ParamStats counts them: on the CPU only when the sum shows one, on accelerators always
            if grad.device.type != "cpu" or not bool(torch.isfinite(sq).all()):
                self.nonfinite[index] = tensorstats.nonfinite_counts([grad])[0]
            else:
                self.nonfinite[index] = torch.zeros((), device=grad.device)

    def global_norm(self, device: torch.device) -> torch.Tensor:
        """The step's pre-clip global L2 norm (NaN when no gradient was seen)."""
        seen = [s for s in self.sumsq if s is not None]
        if not seen:
            return torch.full((), float("nan"), device=device)
        return torch.stack(seen).sum().sqrt()

    def figures(self, device: torch.device) -> dict[str, torch.Tensor]:
        """grad_sumsq, grad_max_abs, grad_nonfinite per parameter (NaN for one without a gradient), the rows
        FlowMonitor.after_backward(grads=...) takes."""

        def row(values: list[torch.Tensor | None]) -> torch.Tensor:
            nan = torch.full((), float("nan"), device=device)
            return torch.stack([nan if v is None else v.float().to(device) for v in values])

        return {"grad_sumsq": row(self.sumsq), "grad_max_abs": row(self.max_abs),
                "grad_nonfinite": row(self.nonfinite)}  # fmt: skip
