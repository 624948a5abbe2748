"""The decoder-only transformer: token (+ learned position) embeddings, a stack of Blocks, final norm, head.

Submodule names are part of the contract (docs/architecture.md): tok_emb, pos_emb, blocks, norm_f, lm_head.
The microscope (flow/) groups parameters by `layer_of(name)`, and checkpoints store these names.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flowtrain.errors import ConfigError
from flowtrain.model.config import ModelConfig
from flowtrain.model.kv_cache import KVCache
from flowtrain.model.layers import Block, make_norm

# Prefixes that wrappers put in front of parameter names (DDP, torch.compile, FSDP, activation checkpointing).
_WRAPPER_PREFIXES = {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


def layer_of(param_name: str) -> str:
    """The layer a parameter belongs to: "embedding", "block.{i}" or "head" (the final norm counts as head).

    Wrapper prefixes (module., _orig_mod., ...) are ignored, so names from DDP/compiled models work too.
    """
    parts = [p for p in param_name.split(".") if p not in _WRAPPER_PREFIXES]
    if parts and parts[0] in ("tok_emb", "pos_emb"):
        return "embedding"
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return f"block.{int(parts[1])}"
    if parts and parts[0] in ("norm_f", "lm_head"):
        return "head"
    raise ValueError(f"parameter {param_name!r} is not part of a flowtrain GPT (no layer to assign it to)")


class GPT(nn.Module):
    """GPT-style language model built from a ModelConfig; forward returns float logits [B,T,V]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError(
                "model.vocab_size is not set; take it from the tokenizer (tokenizer.vocab_size) before building"
            )
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_encoding == "learned" else None
        self.drop = nn.Dropout(cfg.embd_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        # Post-norm blocks already end in a norm, and "none" means no norms at all.
        self.norm_f = (
            make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, cfg.bias) if cfg.norm_placement == "pre" else nn.Identity()
        )
        # No head bias: with tied weights it would be the only untied part of the unembedding.
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------- init
    def reset_parameters(self) -> None:
        """Initialise every parameter by cfg.init (uses the global torch RNG; seed it for reproducibility).

        normal:  Linear and Embedding weights N(0, init_std), biases 0.
        xavier:  xavier_uniform_ on Linear weights, Embedding N(0, init_std).
        kaiming: kaiming_normal_(fan_in) on Linear weights with the activation's nonlinearity. torch has no
                 gain for GELU or SiLU (SwiGLU's gate); both are ReLU-like away from 0, so they use ReLU's
                 gain sqrt(2). Embedding N(0, init_std).
        scaled:  normal, then the residual output projections (attn.proj, mlp.proj) N(0, init_std/sqrt(2L)),
                 GPT-2 style, so the residual stream's variance does not grow with depth.
        Norm weights 1 and biases 0 in every scheme. A tied head shares the embedding's init.
        """
        cfg = self.cfg
        gain_name = "relu"  # relu, and gelu/swiglu as explained above
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
            elif isinstance(module, nn.Linear):
                if module is self.lm_head and cfg.tie_embeddings:
                    continue
                if cfg.init in ("normal", "scaled"):
                    nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
                elif cfg.init == "xavier":
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity=gain_name)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if cfg.init == "scaled":
            std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
            for block in self.blocks:
                for proj in (block.attn.proj, block.mlp.proj):
                    nn.init.normal_(proj.weight, mean=0.0, std=std)

    # -------------------------------------------------------------------------------------- forward
    def forward(
        self,
        idx: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits [B,T,V] (float32 or wider) for token ids idx [B,T].

        doc_ids [B,T]: a token attends only to earlier tokens of the same document (positions are not reset).
        kv_cache: positions continue from kv_cache.length, and this call's keys/values are appended to it.
        """
        x = self.embed(idx, doc_ids, kv_cache)
        for i, block in enumerate(self.blocks):
            x = block(x, doc_ids=doc_ids, cache=kv_cache.layer(i) if kv_cache is not None else None)
        if kv_cache is not None:
            kv_cache.advance(idx.shape[1])
        logits = self.lm_head(self.norm_f(x))
        return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()

    def embed(
        self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        """Token (+ learned position) embeddings after dropout: the input of block 0."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be [batch, time] token ids, got shape {tuple(idx.shape)}")
        n = idx.shape[1]
        if doc_ids is not None and doc_ids.shape != idx.shape:
            raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} differs from idx shape {tuple(idx.shape)}")
        start = 0
        if kv_cache is not None:
            kv_cache.check_room(n)
            start = kv_cache.length
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            if start + n > self.cfg.block_size:
                raise ConfigError(
                    f"sequence of {start + n} tokens exceeds model.block_size={self.cfg.block_size} "
                    "(learned positions); feed at most block_size tokens or raise model.block_size"
                )
            x = x + self.pos_emb(torch.arange(start, start + n, device=idx.device))
        return self.drop(x)

    @torch.no_grad()
    def attention_probs(self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every block's attention weights [B,H,T,T] for idx (one forward pass, no KV cache)."""
        x = self.embed(idx, doc_ids)
        maps = []
        for block in self.blocks:
            maps.append(block.attention_probs(x, doc_ids))
            x = block(x, doc_ids=doc_ids)
        return maps

    def new_kv_cache(self, capacity: int | None = None) -> KVCache:
        """An empty KV cache for this model (capacity defaults to block_size positions)."""
        return KVCache(self.cfg.n_layer, capacity or self.cfg.block_size)

    # -------------------------------------------------------------------------------------- helpers
    layer_of = staticmethod(layer_of)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of (unique) parameters.

        exclude_embeddings=True drops the lookup tables (tok_emb, pos_emb) but keeps the head: the head is a
        matmul that costs compute per token, so with tied weights the shared matrix is counted once, as head.
        This is the N of the 6N FLOPs rule.
        """
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            if self.pos_emb is not None:
                total -= self.pos_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                total -= self.tok_emb.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12 * L * T * d.

        6N for the matmuls with the N non-embedding parameters, plus the attention scores and weighted sum
        (PaLM paper, appendix B; nanoGPT's MFU estimate). T defaults to block_size.
        """
        cfg = self.cfg
        seq_len = cfg.block_size if seq_len is None else seq_len
        return 6 * self.num_parameters(exclude_embeddings=True) + 12 * cfg.n_layer * seq_len * cfg.n_embd
