"""Public torch hooks the microscope places on monitored steps and removes between them.

Hooks only read: forward hooks and tensor gradient hooks return None, so training is bitwise unchanged. Between
monitored steps no hook is attached, and the model runs exactly as it would without the microscope.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn


def first_tensor(value) -> torch.Tensor | None:
    """A module's output may be a tensor or a tuple whose first element is the hidden state (LSTM, HF)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _run_eagerly(hook: Callable) -> Callable:
    """The hook as torch.compile should see it: run between compiled graphs, never traced (traced, its per-step
    bookkeeping became guards and the model was recompiled at every step). Outside compiled code it is called
    directly, which skips the disabled wrapper's cost."""
    disabled, compiling = torch.compiler.disable(hook, recursive=True), torch.compiler.is_compiling

    def hook_outside_graphs(*args):
        return disabled(*args) if compiling() else hook(*args)

    return hook_outside_graphs


def timed(clock, hook: Callable) -> Callable:
    """`hook`, booking its time on `clock` (a budget.Stopwatch)."""

    def booked(*args):
        started = time.perf_counter()
        try:
            return hook(*args)
        finally:
            clock.spent += time.perf_counter() - started

    return booked


class HookSet:
    """Module hooks attached together while armed: (module, kind, hook) with kind "forward", "forward_pre" or
    "forward_pre_kwargs"."""

    def __init__(self, plan: list[tuple[nn.Module, str, Callable]]) -> None:
        self.plan = [(module, kind, _run_eagerly(hook)) for module, kind, hook in plan]
        self.handles: list = []

    def attach(self) -> None:
        if self.handles:
            return
        for module, kind, hook in self.plan:
            if kind == "forward":
                self.handles.append(module.register_forward_hook(hook))
            else:
                self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=kind == "forward_pre_kwargs"))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
