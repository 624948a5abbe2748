"""Configuration of the GPT model (see model/gpt.py)."""

import math
from typing import Literal

from pydantic import Field, model_validator

from flowtrain._base import Section


class ModelConfig(Section):
    """Shape and architecture choices of the decoder-only transformer."""

    n_layer: int = Field(4, ge=1, description="number of transformer blocks")
    n_head: int = Field(4, ge=1, description="attention heads per block")
    n_embd: int = Field(128, ge=1, description="model width (d_model)")
    block_size: int = Field(64, ge=1, description="context length in tokens")
    vocab_size: int | None = Field(
        None, ge=2, description="filled in from the dataset's tokenizer; set only to pad it up"
    )
    pos_encoding: Literal["learned", "rope"] = "learned"
    rope_theta: float = Field(10000.0, gt=0)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_placement: Literal["pre", "post", "none"] = "pre"
    norm_eps: float = Field(1e-5, gt=0)
    activation: Literal["relu", "gelu", "gelu_tanh", "swiglu"] = Field(
        "gelu", description="gelu is exact (erf); gelu_tanh is the tanh approximation GPT-2 was trained with"
    )
    mlp_ratio: float = Field(4.0, gt=0, description="FFN hidden width / n_embd (SwiGLU uses 2/3 of it)")
    mlp_hidden: int | None = Field(
        None, ge=1, description="FFN hidden width in units; when set it replaces mlp_ratio (imports set it)"
    )
    residual: bool = Field(True, description="residual connections (off only for gradient-flow studies)")
    bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = True
    init: Literal["normal", "xavier", "kaiming", "scaled"] = "scaled"
    init_std: float = Field(0.02, gt=0)
    embd_dropout: float = Field(0.0, ge=0, lt=1)
    attn_dropout: float = Field(0.0, ge=0, lt=1)
    resid_dropout: float = Field(0.0, ge=0, lt=1)
    init_from: str | None = Field(
        None,
        description="start from these weights and their tokenizer: a transformers directory (GPT-2 or Llama "
        "layout) or a flowtrain run or checkpoint directory; the architecture comes from it (docs/interop.md)",
    )

    @model_validator(mode="after")
    def _shapes_fit(self) -> "ModelConfig":
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; choose n_embd as a multiple of n_head"
            )
        if self.pos_encoding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("RoPE needs an even head dimension (n_embd / n_head); change n_embd or n_head")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_hidden(self) -> int:
        """The FFN's hidden width: mlp_hidden, else mlp_ratio * n_embd (SwiGLU: 2/3 of it, rounded up to 8)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.activation == "swiglu":
            return swiglu_hidden(self.n_embd, self.mlp_ratio)
        return int(round(self.mlp_ratio * self.n_embd))


def swiglu_hidden(n_embd: int, mlp_ratio: float) -> int:
    """SwiGLU has three matrices instead of two, so 2/3 of the width keeps the parameter count (rounded up to 8)."""
    return int(math.ceil(2 / 3 * mlp_ratio * n_embd / 8) * 8)


# What model.init_from takes from its source: everything that decides the function the weights compute.
# block_size comes from it too, unless set (a shorter context is fine); init, init_std and the dropouts stay
# the run's own (they shape training, not the function).
ARCHITECTURE_FIELDS = (
    "n_layer", "n_head", "n_embd", "vocab_size", "pos_encoding", "rope_theta", "norm", "norm_placement",
    "norm_eps", "activation", "mlp_ratio", "mlp_hidden", "residual", "bias", "qk_norm", "tie_embeddings",
)  # fmt: skip
