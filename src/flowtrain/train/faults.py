"""Fault injection: rehearse a failure on a real run (docs/guard.md), for tests and for users who want to see what
the guard does before it matters.

Every fault is off by default and switched on by the `fault:` section of the run config. They act from outside
the step, through public hooks: a tensor hook on a parameter's gradient, the optimizer's step pre/post hooks,
and the loader's batch transform. They change the math on purpose and only where asked; the trainer prints a
notice naming each fault that is on.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from pydantic import Field

from flowtrain._base import Section
from flowtrain.errors import ConfigError


class FaultConfig(Section):
    """Induced failures (each off unless set). Steps count optimizer steps from 1; batches count the batches the
    loader served, from 1 (step N's batch in a run without rollbacks; a rollback skips past the batches that led
    to it, so a corrupted batch is never served again, as with real bad data)."""

    nan_grad_tensor: str | None = Field(None, description="parameter name whose gradient becomes NaN ...")
    nan_grad_step: int = Field(0, ge=0, description="... at this step (0: never)")
    corrupt_data_from: int = Field(0, ge=0, description="first batch served as random tokens (0: never)")
    corrupt_data_batches: int = Field(0, ge=0, description="how many batches in a row are corrupted")
    lr_spike_from: int = Field(0, ge=0, description="first step whose LR is multiplied by lr_spike_factor (0: never)")
    lr_spike_steps: int = Field(0, ge=0)
    lr_spike_factor: float = Field(100.0, gt=0)
    zero_grad_layer: str | None = Field(None, description="a layer (e.g. block.2) whose gradients become zero ...")
    zero_grad_from: int = Field(1, ge=1, description="... from this step on")
    scale_tensor: str | None = Field(None, description="parameter name multiplied by scale_factor ...")
    scale_step: int = Field(0, ge=0, description="... after this step's update (0: never)")
    scale_factor: float = Field(10.0, gt=0)

    def active(self) -> list[str]:
        """One phrase per fault that is on (for the notice)."""
        on = []
        if self.nan_grad_tensor and self.nan_grad_step:
            on.append(f"NaN gradient in {self.nan_grad_tensor} at step {self.nan_grad_step}")
        if self.corrupt_data_from and self.corrupt_data_batches:
            last = self.corrupt_data_from + self.corrupt_data_batches - 1
            on.append(f"random tokens in batches {self.corrupt_data_from}-{last}")
        if self.lr_spike_from and self.lr_spike_steps:
            last = self.lr_spike_from + self.lr_spike_steps - 1
            on.append(f"LR x{self.lr_spike_factor:g} at steps {self.lr_spike_from}-{last}")
        if self.zero_grad_layer:
            on.append(f"zero gradient in {self.zero_grad_layer} from step {self.zero_grad_from}")
        if self.scale_tensor and self.scale_step:
            on.append(f"{self.scale_tensor} x{self.scale_factor:g} after step {self.scale_step}")
        return on


def attach_faults(cfg: FaultConfig, state, layer_of: Callable[[str], str], vocab_size: int) -> list[str]:
    """Install the configured faults on a TrainState (its model, optimizer and loader); returns the notices."""
    params = dict(state.named_params)

    def param(name: str) -> torch.nn.Parameter:
        if name not in params:
            near = ", ".join(list(params)[:4])
            raise ConfigError(f"fault: no parameter named {name!r}; names look like: {near}, ...")
        return params[name]

    running = lambda: state.step + 1  # noqa: E731 - the step whose backward/update is under way
    fired: set[tuple[str, int]] = set()

    def once(kind: str, hit: bool) -> bool:
        """Step faults are transient: a rollback that replays the step does not replay the fault."""
        if not hit or (kind, running()) in fired:
            return False
        fired.add((kind, running()))
        return True

    if cfg.nan_grad_tensor and cfg.nan_grad_step:
        param(cfg.nan_grad_tensor).register_hook(
            lambda g: torch.full_like(g, float("nan")) if once("nan", running() == cfg.nan_grad_step) else g
        )
    if cfg.zero_grad_layer:
        chosen = [p for n, p in params.items() if layer_of(n) == cfg.zero_grad_layer]
        if not chosen:
            raise ConfigError(f"fault.zero_grad_layer: no parameter in layer {cfg.zero_grad_layer!r}")
        for p in chosen:
            p.register_hook(lambda g: torch.zeros_like(g) if running() >= cfg.zero_grad_from else g)
    if cfg.lr_spike_from and cfg.lr_spike_steps:
        _lr_spike(cfg, state, running, once)
    if cfg.scale_tensor and cfg.scale_step:
        target = param(cfg.scale_tensor)

        def scale(*_):
            if once("scale", running() == cfg.scale_step):
                with torch.no_grad():
                    target.mul_(cfg.scale_factor)

        state.optimizer.register_step_post_hook(scale)
    if cfg.corrupt_data_from and cfg.corrupt_data_batches:
        first, end = cfg.corrupt_data_from, cfg.corrupt_data_from + cfg.corrupt_data_batches
        rng = np.random.default_rng(0)

        def corrupt(batch, number: int):
            if first <= number < end:
                noise = torch.from_numpy(rng.integers(0, vocab_size, size=tuple(batch.targets.shape)))
                batch.inputs, batch.targets = noise.clone(), noise.roll(-1, dims=1)
            return batch

        state.loader.transform = corrupt
    return cfg.active()


def _lr_spike(cfg: FaultConfig, state, running, once) -> None:
    raised: list[bool] = [False]

    def raise_lr(*_):
        raised[0] = once("lr", cfg.lr_spike_from <= running() < cfg.lr_spike_from + cfg.lr_spike_steps)
        if raised[0]:
            for group in state.optimizer.param_groups:
                group["lr"] *= cfg.lr_spike_factor

    def restore_lr(*_):
        if raised[0]:
            for group in state.optimizer.param_groups:
                group["lr"] /= cfg.lr_spike_factor

    state.optimizer.register_step_pre_hook(raise_lr)
    state.optimizer.register_step_post_hook(restore_lr)
