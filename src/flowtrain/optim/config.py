"""Configuration of the optimizer, the LR schedule and gradient clipping."""

from typing import Literal

from pydantic import Field

from flowtrain._base import Section


class OptimConfig(Section):
    """Which torch.optim optimizer, its hyperparameters, and which parameters get weight decay."""

    name: Literal["adamw", "adam", "sgd", "rmsprop"] = "adamw"
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    no_decay: list[str] = Field(
        default_factory=lambda: ["bias", "norm", "embedding"],
        description="parameter kinds that get no weight decay: any of bias, norm, embedding",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD / RMSprop momentum")
    nesterov: bool = False
    alpha: float = Field(0.99, gt=0, lt=1, description="RMSprop smoothing constant")
    implementation: Literal["auto", "fused", "foreach", "loop"] = Field(
        "auto", description="auto: fused where torch supports it on the device, else foreach"
    )


class ScheduleConfig(Section):
    """Linear warmup, then a decay shape, never below min_lr (except inverse_sqrt, which has its own form)."""

    kind: Literal["cosine", "linear", "constant", "inverse_sqrt", "wsd"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    min_lr: float = Field(1e-4, ge=0)
    decay_fraction: float = Field(
        0.2, gt=0, le=1, description="wsd: fraction of training spent in the final linear decay"
    )
    noam_scale: float | None = Field(
        None,
        gt=0,
        description="inverse_sqrt: lr = noam_scale * d_model^-0.5 * min(s^-0.5, s*warmup^-1.5); "
        "unset: the same shape scaled so the peak (at the end of warmup) equals optim.lr",
    )


class ClipConfig(Section):
    """Gradient clipping. The pre-clip global norm is recorded whatever the kind."""

    kind: Literal["norm", "value", "off"] = "norm"
    max_norm: float = Field(1.0, gt=0, description="norm: clip the global L2 norm to this")
    max_value: float = Field(1.0, gt=0, description="value: clamp every gradient element to +-this")
