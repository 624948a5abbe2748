"""flowtrain's parameter names and shapes ↔ the transformers layouts' (GPT-2, Llama), both ways.

The only changes of form: GPT-2 keeps its linear layers as Conv1D, whose weight is the transpose of
nn.Linear's [out, in]; Llama splits flowtrain's fused qkv projection (rows [q; k; v], heads contiguous within
each) into q_proj, k_proj and v_proj, and names the SwiGLU matrices gate_proj / up_proj / down_proj for
flowtrain's gate / fc / proj. GPT-2 always has biases, so a flowtrain model without them is written with zero
biases (the same function), and read back without them when every one of them is zero.
"""

from __future__ import annotations

import torch

from flowtrain.errors import InteropError
from flowtrain.interop.layouts import GPT2, LLAMA
from flowtrain.model.config import ModelConfig
from flowtrain.model.gpt import GPT

Tensors = dict[str, torch.Tensor]
# (flowtrain name, the layout's name(s), Conv1D-transposed): three names split / join qkv along its rows
Entry = tuple[str, tuple[str, ...], bool]
# Buffers that some saved models carry: the causal mask of old GPT-2 files, the RoPE frequencies of old Llamas
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
_PREFIX = {GPT2: "transformer.", LLAMA: "model."}
_GPT2_BLOCK = (
    ("norm1", "ln_1", False),
    ("attn.qkv", "attn.c_attn", True),
    ("attn.proj", "attn.c_proj", True),
    ("norm2", "ln_2", False),
    ("mlp.fc", "mlp.c_fc", True),
    ("mlp.proj", "mlp.c_proj", True),
)
_LLAMA_BLOCK = (
    ("attn.proj", "self_attn.o_proj"),
    ("mlp.gate", "mlp.gate_proj"),
    ("mlp.fc", "mlp.up_proj"),
    ("mlp.proj", "mlp.down_proj"),
)


def entries(cfg: ModelConfig, layout: str) -> list[Entry]:
    """Every tensor of the layout for `cfg` (GPT-2: its biases even where cfg has none), the head only untied."""
    out: list[Entry] = []
    if layout == GPT2:
        out += [
            ("tok_emb.weight", ("transformer.wte.weight",), False),
            ("pos_emb.weight", ("transformer.wpe.weight",), False),
        ]
        for i in range(cfg.n_layer):
            for ours, theirs, conv in _GPT2_BLOCK:
                out.append((f"blocks.{i}.{ours}.weight", (f"transformer.h.{i}.{theirs}.weight",), conv))
                out.append((f"blocks.{i}.{ours}.bias", (f"transformer.h.{i}.{theirs}.bias",), False))
        out += [
            ("norm_f.weight", ("transformer.ln_f.weight",), False),
            ("norm_f.bias", ("transformer.ln_f.bias",), False),
        ]
    else:
        out.append(("tok_emb.weight", ("model.embed_tokens.weight",), False))
        for i in range(cfg.n_layer):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            out.append((f"{ours}norm1.weight", (f"{theirs}input_layernorm.weight",), False))
            out.append((f"{ours}norm2.weight", (f"{theirs}post_attention_layernorm.weight",), False))
            parts = ("weight", "bias") if cfg.bias else ("weight",)
            for part in parts:
                qkv = tuple(f"{theirs}self_attn.{n}_proj.{part}" for n in "qkv")
                out.append((f"{ours}attn.qkv.{part}", qkv, False))
                out += [(f"{ours}{a}.{part}", (f"{theirs}{b}.{part}",), False) for a, b in _LLAMA_BLOCK]
        out.append(("norm_f.weight", ("model.norm.weight",), False))
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", ("lm_head.weight",), False))
    return out


def to_hf(state: Tensors, cfg: ModelConfig, layout: str) -> Tensors:
    """A flowtrain state dict as the layout stores it: contiguous float32 on the CPU, a tied head stored once
    (as the embedding), GPT-2's biases zero where flowtrain's model has none."""
    out: Tensors = {}
    for ours, theirs, conv in entries(cfg, layout):
        if ours not in state:  # a bias of a GPT-2 without biases
            out[theirs[0]] = torch.zeros(state[ours.removesuffix(".bias") + ".weight"].shape[0])
            continue
        tensor = state[ours].t() if conv else state[ours]
        for name, part in zip(theirs, tensor.chunk(len(theirs), dim=0)):
            out[name] = part
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def normalise_names(tensors: Tensors, layout: str) -> Tensors:
    """Names as the causal-LM class stores them: a base model's (no `transformer.` / `model.` prefix) get the
    prefix; the buffers some files carry go."""
    prefix, out = _PREFIX[layout], {}
    for name, tensor in tensors.items():
        if name.endswith(_BUFFERS) and not name.endswith(".c_attn.bias"):
            continue
        out[name if name.startswith(prefix) or name == "lm_head.weight" else prefix + name] = tensor
    return out


def biases_all_zero(tensors: Tensors) -> bool:
    """Whether every bias the tensors hold is zero (GPT-2: a flowtrain model without biases, exported)."""
    return all(not t.any() for n, t in tensors.items() if n.endswith(".bias"))


def from_hf(tensors: Tensors, cfg: ModelConfig, layout: str, source: str, *, positions: int, tied: bool) -> Tensors:
    """The layout's tensors (normalised names) as a flowtrain state dict for `cfg` (the architecture the
    source's config.json gave, with the run's block_size and choices): float32; the position table cut to
    block_size; biases the source lacks (or, GPT-2, has as zeros where `cfg` has none) as zeros or left out;
    a head that `tied` (the source's tie) shares with the embedding copied when `cfg` unties it. Every tensor
    must be there with its shape, and nothing else may be."""
    table = cfg.model_copy(update={"block_size": positions}) if cfg.pos_encoding == "learned" else cfg
    with torch.device("meta"):  # shapes only, nothing allocated
        shapes = {n: tuple(p.shape) for n, p in GPT(table).state_dict().items()}
    used: set[str] = set()
    out: Tensors = {}

    def take(name: str, shape: tuple[int, ...], zeros_if_absent: bool) -> torch.Tensor:
        if name not in tensors:
            if zeros_if_absent:
                return torch.zeros(shape)
            raise InteropError(f"cannot import {source}: its weights have no {name}; is it a whole {layout} model?")
        used.add(name)
        if tuple(tensors[name].shape) != shape:
            raise InteropError(
                f"cannot import {source}: {name} is {list(tensors[name].shape)} in its weights, "
                f"its config.json makes it {list(shape)}"
            )
        return tensors[name].to(torch.float32)

    for ours, theirs, conv in entries(cfg, layout):
        if ours not in shapes:  # GPT-2 biases, all zero, of a model that has none
            used.update(theirs)
            continue
        shape = shapes[ours][::-1] if conv else shapes[ours]
        part_shape = (shape[0] // len(theirs), *shape[1:])
        if ours == "lm_head.weight" and theirs[0] not in tensors and tied:
            continue  # filled from the embedding below
        # Llama's attention_bias and mlp_bias are separate switches: the absent side starts at zero
        absent_ok = layout == LLAMA and ours.endswith(".bias")
        tensor = torch.cat([take(name, part_shape, absent_ok) for name in theirs])
        out[ours] = tensor.t() if conv else tensor
    if "pos_emb.weight" in out:
        out["pos_emb.weight"] = out["pos_emb.weight"][: cfg.block_size]
    if not cfg.tie_embeddings and "lm_head.weight" not in out:
        out["lm_head.weight"] = out["tok_emb.weight"].clone()  # untied from here on, starting equal
    twice = cfg.tie_embeddings and "lm_head.weight" in tensors  # some files store a tied head twice
    if twice and not torch.equal(take("lm_head.weight", shapes["tok_emb.weight"], False), out["tok_emb.weight"]):
        raise InteropError(
            f"cannot import {source}: its config.json ties the head to the embedding, but its "
            "weights hold a different lm_head.weight"
        )
    extra = sorted(set(tensors) - used)
    if extra:
        raise InteropError(
            f"cannot import {source}: its weights hold {extra[0]}, which a {layout} model of its "
            "config.json has no place for"
        )
    return {k: v.contiguous() for k, v in out.items()}
