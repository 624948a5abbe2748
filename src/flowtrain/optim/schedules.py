"""Learning-rate schedules as closed forms, and the torch scheduler that applies them.

Convention (0-based): `lr_at(step)` is the LR used by optimizer step `step`, for step = 0 .. max_steps-1.
The trainer calls optimizer.step() then scheduler.step(), and LambdaLR sets lr_at(0) on construction, so
the LR in the optimizer is always lr_at(number of optimizer steps taken so far).

* Warmup (W = warmup_steps): lr = peak * (step + 1) / W for step < W: peak/W at step 0, peak at step W-1.
  (Step 0 never gets LR 0: a step with LR 0 would waste a batch.)
* After warmup, with p = (step - W) / (max_steps - 1 - W) clamped to [0, 1] (p = 1 if no steps are left):
  cosine: min + (peak - min) * (1 + cos(pi p)) / 2; linear: peak + (min - peak) * p; constant: peak.
  So decay starts at peak at step W (like nanoGPT) and reaches min_lr exactly at step max_steps-1.
* wsd (warmup-stable-decay): peak until the last D = max(1, round(decay_fraction * max_steps)) steps (never
  inside the warmup), then linear decay over those D steps, reaching min_lr at step max_steps-1.
* inverse_sqrt (Noam, "Attention is all you need"), with s = step + 1:
  noam_scale set: noam_scale * d_model^-0.5 * min(s^-0.5, s * W^-1.5);
  else the same shape scaled to peak at step W-1: peak * min(sqrt(W / s), s / W);
  W = 0: peak * s^-0.5 (or noam_scale * d_model^-0.5 * s^-0.5). It has no min_lr floor (its own form).
Steps past max_steps-1 get the LR of step max_steps-1 (inverse_sqrt keeps decaying).
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from flowtrain.errors import ConfigError
from flowtrain.optim.config import ScheduleConfig


def _inverse_sqrt(s: int, cfg: ScheduleConfig, peak_lr: float, d_model: int | None) -> float:
    w = cfg.warmup_steps
    if cfg.noam_scale is None:
        return peak_lr * (s**-0.5 if w == 0 else min(math.sqrt(w / s), s / w))
    if not d_model or d_model < 1:
        raise ConfigError("schedule.noam_scale needs the model width d_model (model.n_embd) to be a positive int")
    shape = s**-0.5 if w == 0 else min(s**-0.5, s * w**-1.5)
    return cfg.noam_scale * d_model**-0.5 * shape


def lr_at(step: int, cfg: ScheduleConfig, peak_lr: float, max_steps: int, d_model: int | None = None) -> float:
    """The LR applied at optimizer step `step` (0-based); see the module docstring for each form."""
    if max_steps < 1:
        raise ConfigError(f"max_steps={max_steps}: a schedule needs at least one step; set train.max_steps >= 1")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if cfg.kind == "inverse_sqrt":
        return _inverse_sqrt(step + 1, cfg, peak_lr, d_model)
    if cfg.min_lr > peak_lr:
        raise ConfigError(f"schedule.min_lr={cfg.min_lr} is above the peak lr {peak_lr}; lower min_lr")
    last = max_steps - 1
    step = min(step, last)
    w = cfg.warmup_steps
    if step < w:
        return peak_lr * (step + 1) / w
    if cfg.kind == "constant":
        return peak_lr
    if cfg.kind == "wsd":
        decay_start = max(w, max_steps - max(1, round(cfg.decay_fraction * max_steps)))
        if step < decay_start:
            return peak_lr
        p = min(1.0, (step - decay_start + 1) / (max_steps - decay_start))
        return peak_lr + (cfg.min_lr - peak_lr) * p
    p = 1.0 if last - w <= 0 else min(1.0, (step - w) / (last - w))
    if cfg.kind == "linear":
        return peak_lr + (cfg.min_lr - peak_lr) * p
    return cfg.min_lr + (peak_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: ScheduleConfig,
    peak_lr: float,
    max_steps: int,
    d_model: int | None = None,
) -> LambdaLR:
    """A LambdaLR whose optimizer LR is lr_at(k) after k scheduler steps, for groups created with lr=peak_lr.

    The factor is a plain closure, so scheduler.state_dict() holds only numbers (JSON-able, no pickled code).
    """
    lr_at(0, cfg, peak_lr, max_steps, d_model)  # config errors now, not at the first step

    def factor(step: int) -> float:
        return lr_at(step, cfg, peak_lr, max_steps, d_model) / peak_lr

    return LambdaLR(optimizer, factor)
