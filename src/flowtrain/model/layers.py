"""Building blocks of the GPT: norms, rotary positions, causal self-attention, the MLP and the Block.

Each switch in ModelConfig (norm kind and placement, activation, residual, QK-norm, RoPE) maps to one place
here, so a gradient-flow study that flips a switch changes exactly the math it names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flowtrain.model.config import ModelConfig
from flowtrain.model.kv_cache import LayerCache


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """LayerNorm (bias optional) or RMSNorm (never a bias: it has no mean to shift)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm kind {kind!r}; use 'layernorm' or 'rmsnorm'")


class Rotary(nn.Module):
    """Rotary position embedding (RoPE), "rotate-half" layout.

    Pair i of a head vector is (x[i], x[i + D/2]); it is rotated by the angle pos * theta^(-2i/D). Because
    q.k then depends only on the distance between positions, cached keys stay valid as decoding goes on.
    cos/sin are precomputed for block_size positions and computed on the fly beyond it.
    """

    def __init__(self, head_dim: int, block_size: int, theta: float) -> None:
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.inv_freq = inv_freq  # float64 on the CPU: angles for any position are computed the same way
        cos, sin = self._angles(torch.arange(block_size), inv_freq)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def _angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
        return angles.cos().float(), angles.sin().float()

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Rotate x [B,H,T,D] whose first position is `start`."""
        n = x.shape[-2]
        if start + n <= self.cos.shape[0]:
            cos, sin = self.cos[start : start + n], self.sin[start : start + n]
        else:
            cos, sin = self._angles(torch.arange(start, start + n), self.inv_freq)
        cos, sin = cos.to(device=x.device, dtype=x.dtype), sin.to(device=x.device, dtype=x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def doc_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask [B,1,T,T], True where query i may attend key j: j <= i and the same document.

    The diagonal is always True, so no row is fully masked (no NaN from softmax over nothing).
    """
    n = doc_ids.shape[-1]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(n, n, dtype=torch.bool, device=doc_ids.device).tril()
    return (same_doc & causal)[:, None]


class Attend(nn.Module):
    """The attention kernel, softmax(q k^T / sqrt(d)) v, via torch's scaled_dot_product_attention.

    A parameter-free module of its own (no state-dict keys) so that anything observing the model with a
    forward pre-hook sees the exact q and k it used, after QK-norm and RoPE; positional arguments for that
    reason: (q, k, v, attn_mask, dropout_p, is_causal).
    """

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None,
        dropout_p: float,
        is_causal: bool,
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection ([q; k; v] rows of `qkv.weight`).

    QK-norm (qk_norm=True) normalises q and k over head_dim (same norm kind as the model, weights shared
    across heads) before RoPE; it bounds the attention logits, a known fix for attention-logit growth.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        self.attn_dropout = cfg.attn_dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = make_norm(cfg.norm, cfg.head_dim, cfg.norm_eps, cfg.bias)
            self.k_norm = make_norm(cfg.norm, cfg.head_dim, cfg.norm_eps, cfg.bias)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = Rotary(cfg.head_dim, cfg.block_size, cfg.rope_theta) if cfg.pos_encoding == "rope" else None
        self.attend = Attend()

    def _qkv(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, n, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        q, k, v = (t.view(batch, n, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q, start), self.rotary(k, start)
        return q, k, v

    def forward(
        self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, cache: LayerCache | None = None
    ) -> torch.Tensor:
        batch, n, width = x.shape
        start = cache.start if cache is not None else 0
        q, k, v = self._qkv(x, start)
        mask, is_causal = None, True
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids cannot be combined with a KV cache; decode one document at a time")
            mask, is_causal = doc_causal_mask(doc_ids), False
        if cache is not None:
            k, v = cache.update(k, v)
            if start > 0:
                # Queries sit at positions start..start+n-1 and see every key up to their own position.
                # (SDPA's is_causal aligns the mask top-left, which is wrong once keys outnumber queries.)
                is_causal = False
                if n > 1:
                    keys = torch.arange(start + n, device=x.device)
                    queries = torch.arange(start, start + n, device=x.device)
                    mask = keys[None, :] <= queries[:, None]
        dropout = self.attn_dropout if self.training else 0.0
        y = self.attend(q, k, v, mask, dropout, is_causal)
        return self.proj(y.transpose(1, 2).reshape(batch, n, width))

    def attention_logits(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-softmax scores q.k/sqrt(D) [B,H,T,T] in float32, -inf where masked (for max-logit monitoring).

        `x` is this module's input (i.e. after the block's pre-norm, if any); positions start at 0.
        """
        q, k, _ = self._qkv(x, 0)
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(self.head_dim)
        n = x.shape[1]
        if doc_ids is not None:
            allowed = doc_causal_mask(doc_ids)
        else:
            allowed = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~allowed, float("-inf"))

    def attention_probs(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax attention weights [B,H,T,T] (float32, no dropout) for inspection; SDPA never returns them."""
        return self.attention_logits(x, doc_ids).softmax(dim=-1)


class MLP(nn.Module):
    """Position-wise feed-forward: fc -> activation -> proj, or SwiGLU: proj(silu(gate(x)) * fc(x)); hidden
    width cfg.ffn_hidden."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.activation = cfg.activation
        hidden = cfg.ffn_hidden
        self.gate = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias) if cfg.activation == "swiglu" else None
        self.fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            hidden = F.silu(self.gate(x)) * self.fc(x)
        elif self.activation == "relu":
            hidden = F.relu(self.fc(x))
        elif self.activation == "gelu_tanh":
            hidden = F.gelu(self.fc(x), approximate="tanh")
        else:
            hidden = F.gelu(self.fc(x))  # exact (erf) GELU
        return self.proj(hidden)


class Block(nn.Module):
    """One transformer block: attention then MLP, each with its norm placement and (optional) skip.

    norm_placement:  pre  -> x = x + drop(attn(norm1(x)));  x = x + drop(mlp(norm2(x)))
                     post -> x = norm1(x + drop(attn(x)));  x = norm2(x + drop(mlp(x)))
                     none -> x = x + drop(attn(x));         x = x + drop(mlp(x))      (norms are Identity)
    residual=False removes only the skip ("x +"): the norms stay exactly where the placement puts them, so
    pre gives drop(attn(norm1(x))), post gives norm1(drop(attn(x))), none gives drop(attn(x)).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.placement = cfg.norm_placement
        self.residual = cfg.residual
        if cfg.norm_placement == "none":
            self.norm1, self.norm2 = nn.Identity(), nn.Identity()
        else:
            self.norm1 = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, cfg.bias)
            self.norm2 = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.resid_dropout)

    def _sublayer(self, x: torch.Tensor, norm: nn.Module, branch) -> torch.Tensor:
        skip = x if self.residual else 0
        if self.placement == "pre":
            return skip + self.drop(branch(norm(x)))
        if self.placement == "post":
            return norm(skip + self.drop(branch(x)))
        return skip + self.drop(branch(x))

    def forward(
        self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, cache: LayerCache | None = None
    ) -> torch.Tensor:
        y = self._sublayer(x, self.norm1, lambda h: self.attn(h, doc_ids=doc_ids, cache=cache))
        return self._sublayer(y, self.norm2, self.mlp)

    def attention_logits(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Attention scores [B,H,T,T] for this block's input x (applies the pre-norm when placement is pre)."""
        return self.attn.attention_logits(self.norm1(x) if self.placement == "pre" else x, doc_ids)

    def attention_probs(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Attention weights [B,H,T,T] for this block's input x (applies the pre-norm when placement is pre)."""
        return self.attention_logits(x, doc_ids).softmax(dim=-1)
