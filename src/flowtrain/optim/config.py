"""Configuration of the optimizer, the LR schedule and gradient clipping."""

from typing import Literal

from pydantic import Field, field_validator, model_validator

from flowtrain._base import Section


class OptimConfig(Section):
    """Which torch.optim optimizer, its hyperparameters, and which parameters get weight decay."""

    name: Literal["adamw", "adam", "sgd", "rmsprop", "muon"] = Field(
        "adamw", description="muon: torch's Muon for the blocks' matrices, AdamW for the rest (optim/muon.py)"
    )
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    adamw_lr_scale: float = Field(
        1.0,
        gt=0,
        description="muon: what AdamW steps (embeddings, the output head, norm gains, biases) runs at optim.lr "
        "times this (the schedule moves both alike)",
    )
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(
        0.1, ge=0, description="adamw: decoupled; sgd/rmsprop: L2; adam: ignored (its wd is L2), use adamw"
    )
    no_decay: list[str] = Field(
        default_factory=lambda: ["bias", "norm", "embedding"],
        description="parameter kinds that get no weight decay: any of bias, norm, embedding",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD / RMSprop momentum")
    nesterov: bool = False
    alpha: float = Field(0.99, gt=0, lt=1, description="RMSprop smoothing constant")
    implementation: Literal["auto", "fused", "foreach", "loop"] = Field(
        "auto",
        description="auto: torch's fused step where it has one for the device (CPU, CUDA), else foreach",
    )

    @field_validator("no_decay")
    @classmethod
    def _known_kinds(cls, kinds: list[str]) -> list[str]:
        unknown = sorted(set(kinds) - {"bias", "norm", "embedding"})
        if unknown:
            raise ValueError(f"unknown parameter kind(s) {unknown}; use any of bias, norm, embedding")
        return kinds

    @model_validator(mode="after")
    def _adamw_lr_scale_is_muons(self) -> "OptimConfig":
        if self.adamw_lr_scale != 1.0 and self.name != "muon":
            raise ValueError(
                f"optim.adamw_lr_scale scales the LR of Muon's AdamW half, and optim.name is {self.name}; "
                "set optim.adamw_lr_scale=1 or optim.name=muon"
            )
        return self


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

    kind: Literal["norm", "value", "off", "per_tensor", "agc", "zclip"] = "norm"
    max_norm: float = Field(
        1.0, gt=0, description="norm: clip the global L2 norm to this; per_tensor: clip each tensor's norm to this"
    )
    max_value: float = Field(1.0, gt=0, description="value: clamp every gradient element to +-this")
    agc_lambda: float = Field(
        0.01, gt=0, description="agc: largest allowed ||grad|| / max(||weight||, agc_eps) per unit (row)"
    )
    agc_eps: float = Field(1e-3, gt=0, description="agc: floor on a unit's weight norm (zero-initialised params)")
    zclip_alpha: float = Field(0.97, gt=0, lt=1, description="zclip: EMA decay of the grad-norm mean and variance")
    zclip_z: float = Field(2.5, gt=0, description="zclip: clip when the grad norm's z-score exceeds this")
    zclip_warmup: int = Field(
        25, ge=2, description="zclip: finite grad norms collected (no clipping) before the z-score is used"
    )
