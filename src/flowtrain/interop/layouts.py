"""Which transformers architecture a flowtrain model is, and its config.json (both ways).

GPT-2 (`GPT2LMHeadModel`) is a pre-norm transformer with learned positions, LayerNorm (always with a bias) and
a GELU/ReLU MLP (Conv1D layers, always with biases); Llama (`LlamaForCausalLM`) one with RoPE (rotate-half
pairs, as flowtrain's), RMSNorm and a SwiGLU MLP, biases optional. A flowtrain model maps to one of them
exactly or is refused, naming the option that has no counterpart (docs/interop.md has the table). The
config.json is written here field by field, so exporting needs no transformers; the values it falls back to
for a key that a directory leaves out are transformers' defaults for that architecture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flowtrain.errors import InteropError
from flowtrain.model.config import ModelConfig, swiglu_hidden

GPT2, LLAMA = "gpt2", "llama"
ARCHITECTURES = {GPT2: "GPT2LMHeadModel", LLAMA: "LlamaForCausalLM"}
# GPT-2's activation names for flowtrain's; gelu_new and gelu_pytorch_tanh compute the same tanh formula
_GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
_FROM_GPT2_ACTIVATION = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_NEITHER = "GPT-2: learned positions, LayerNorm, GELU or ReLU; Llama: RoPE, RMSNorm, SwiGLU"


@dataclass(frozen=True)
class Specials:
    """Token ids the transformers configs name: flowtrain's EOT starts and ends documents."""

    eot_id: int
    pad_id: int | None


def layout_of(cfg: ModelConfig) -> str:
    """GPT2 or LLAMA, or an InteropError naming the first option neither can represent."""

    def refuse(option: str, why: str) -> InteropError:
        value = getattr(cfg, option)
        shown = str(value).lower() if isinstance(value, bool) else value
        return InteropError(
            f"cannot export model.{option}={shown}: {why}; only models that fit GPT-2 or Llama export (docs/interop.md)"
        )

    if cfg.norm_placement != "pre":
        raise refuse("norm_placement", "GPT-2 and Llama are pre-norm transformers")
    if not cfg.residual:
        raise refuse("residual", "GPT-2 and Llama blocks add their output to the residual stream")
    if cfg.qk_norm:
        raise refuse("qk_norm", "neither GPT-2 nor Llama normalises queries and keys")
    if cfg.pos_encoding == "learned":
        if cfg.norm != "layernorm":
            raise refuse("norm", f"with learned positions only GPT-2 fits, and it uses LayerNorm ({_NEITHER})")
        if cfg.activation not in _GPT2_ACTIVATIONS:
            raise refuse("activation", f"with learned positions only GPT-2 fits, whose MLP has no gate ({_NEITHER})")
        return GPT2
    if cfg.norm != "rmsnorm":
        raise refuse("norm", f"with RoPE only Llama fits, and it uses RMSNorm ({_NEITHER})")
    if cfg.activation != "swiglu":
        raise refuse("activation", f"with RoPE only Llama fits, and its MLP is SwiGLU ({_NEITHER})")
    return LLAMA


def dropped_settings(cfg: ModelConfig, layout: str) -> list[str]:
    """Training-only settings the layout has no place for (the exported function is exact without them)."""
    if layout == LLAMA:
        return [f"model.{n}={getattr(cfg, n)}" for n in ("embd_dropout", "resid_dropout") if getattr(cfg, n) > 0]
    return []


def hf_config(cfg: ModelConfig, layout: str, specials: Specials) -> dict[str, Any]:
    """config.json for the layout (float32 weights): the keys transformers 5 reads, and the ones 4 read instead."""
    pad = specials.pad_id if specials.pad_id is not None else specials.eot_id
    common = {
        "architectures": [ARCHITECTURES[layout]],
        "model_type": layout,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": specials.eot_id,
        "eos_token_id": specials.eot_id,
        "pad_token_id": pad,
        "use_cache": True,
        "dtype": "float32",
        "torch_dtype": "float32",  # transformers 4's name for it
    }
    if layout == GPT2:
        return {
            **common,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_embd": cfg.n_embd,
            "n_positions": cfg.block_size,
            "n_inner": cfg.ffn_hidden,
            "activation_function": _GPT2_ACTIVATIONS[cfg.activation],
            "layer_norm_epsilon": cfg.norm_eps,
            "embd_pdrop": cfg.embd_dropout,
            "attn_pdrop": cfg.attn_dropout,
            "resid_pdrop": cfg.resid_dropout,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
    return {
        **common,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "hidden_size": cfg.n_embd,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_hidden,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,  # transformers 4 reads this one
        "rope_scaling": None,
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.attn_dropout,
        "pretraining_tp": 1,
    }


# ---- import ---------------------------------------------------------------------------------------------------
@dataclass
class Imported:
    """What a transformers config.json says: flowtrain model fields, and the facts the weights must confirm."""

    layout: str
    fields: dict[str, Any]  # ModelConfig fields (bias: whether the layout has biases; GPT-2 always does)
    positions: int  # n_positions / max_position_embeddings


def _mlp_fields(activation: str, n_embd: int, hidden: int) -> dict[str, Any]:
    """The shortest mlp_ratio (fewest decimals) that gives the width exactly, as flowtrain's own configs
    spell it; else mlp_hidden (a SwiGLU width that is no multiple of 8, say)."""
    if activation == "swiglu":
        exact = 1.5 * hidden / n_embd
        width = lambda r: swiglu_hidden(n_embd, r)  # noqa: E731
    else:
        exact = hidden / n_embd
        width = lambda r: int(round(r * n_embd))  # noqa: E731
    for digits in range(4):
        scale = 10**digits
        for ratio in (math.floor(exact * scale) / scale, math.ceil(exact * scale) / scale):
            if ratio > 0 and width(ratio) == hidden:
                return {"mlp_ratio": float(ratio), "mlp_hidden": None}
    return {"mlp_ratio": 4.0, "mlp_hidden": hidden}


def read_hf_config(config: dict[str, Any], source: str) -> Imported:
    """The flowtrain model a transformers config.json describes, or an InteropError naming what has none."""
    kind = config.get("model_type")

    def refuse(key: str, value: Any, why: str) -> InteropError:
        return InteropError(f"cannot import {source}: its config.json has {key}={value!r}, {why}")

    def get(key: str, default: Any) -> Any:
        value = config.get(key, default)
        return default if value is None else value

    if kind == GPT2:
        if config.get("add_cross_attention"):
            raise refuse("add_cross_attention", True, "an encoder-decoder part flowtrain's GPT has no place for")
        for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if get(key, want) != want:
                raise refuse(key, config[key], "an attention scaling flowtrain does not compute")
        act = get("activation_function", "gelu_new")
        if act not in _FROM_GPT2_ACTIVATION:
            raise refuse("activation_function", act, f"flowtrain has {', '.join(_FROM_GPT2_ACTIVATION)}")
        n_embd = get("n_embd", 768)
        fields = {
            "n_layer": get("n_layer", 12),
            "n_head": get("n_head", 12),
            "n_embd": n_embd,
            "vocab_size": get("vocab_size", 50257),
            "pos_encoding": "learned",
            "norm": "layernorm",
            "norm_eps": float(get("layer_norm_epsilon", 1e-5)),
            "activation": _FROM_GPT2_ACTIVATION[act],
            **_mlp_fields(_FROM_GPT2_ACTIVATION[act], n_embd, get("n_inner", 4 * n_embd)),
            "tie_embeddings": bool(get("tie_word_embeddings", True)),
            "bias": True,
        }
        return Imported(GPT2, {**_always(), **fields}, get("n_positions", 1024))
    if kind == LLAMA:
        n_embd, heads = get("hidden_size", 4096), get("num_attention_heads", 32)
        if get("num_key_value_heads", heads) != heads:
            raise refuse(
                "num_key_value_heads",
                config["num_key_value_heads"],
                f"grouped-query attention (flowtrain has one key/value head per query head, {heads})",
            )
        if get("head_dim", n_embd // heads) != n_embd // heads:
            raise refuse(
                "head_dim", config["head_dim"], f"flowtrain's head width is hidden_size/heads = {n_embd // heads}"
            )
        if get("hidden_act", "silu") != "silu":
            raise refuse("hidden_act", config["hidden_act"], "flowtrain's gated MLP is SwiGLU (silu)")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
        if rope_type != "default" or config.get("rope_scaling"):
            raise refuse("rope_type", rope_type, "a RoPE scaling flowtrain does not compute (it has plain RoPE)")
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        attention_bias, mlp_bias = bool(get("attention_bias", False)), bool(get("mlp_bias", False))
        fields = {
            "n_layer": get("num_hidden_layers", 32),
            "n_head": heads,
            "n_embd": n_embd,
            "vocab_size": get("vocab_size", 32000),
            "pos_encoding": "rope",
            "rope_theta": float(theta or get("rope_theta", 10000.0)),
            "norm": "rmsnorm",
            "norm_eps": float(get("rms_norm_eps", 1e-6)),
            "activation": "swiglu",
            **_mlp_fields("swiglu", n_embd, get("intermediate_size", 11008)),
            "tie_embeddings": bool(get("tie_word_embeddings", False)),
            "bias": attention_bias or mlp_bias,  # the other part's biases then start at zero
        }
        positions = get("max_position_embeddings", 2048)
        return Imported(LLAMA, {**_always(), **fields}, positions)
    raise InteropError(
        f"cannot import {source}: its config.json has model_type={kind!r}; flowtrain imports the gpt2 and llama "
        "layouts (docs/interop.md)"
    )


def _always() -> dict[str, Any]:
    """What every importable layout has: pre-norm residual blocks without QK-norm."""
    return {"norm_placement": "pre", "residual": True, "qk_norm": False}
