"""Small models written for these tests (not flowtrain's GPT): a pre/post-norm transformer, an MLP stack, an LSTM LM."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class TinyAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def _qkv(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        return [z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v)]

    def attention_logits(self, x):
        q, k, _ = self._qkv(x)
        scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
        t = x.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~mask, float("-inf"))

    def attention_probs(self, x):
        return torch.softmax(self.attention_logits(x), dim=-1)

    def forward(self, x):
        q, k, v = self._qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(x.shape))


class TinyBlock(nn.Module):
    def __init__(self, d: int, heads: int, pre_norm: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = TinyAttention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))

    def forward(self, x):
        if self.pre_norm:
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=17, d=16, heads=2, layers=3, ctx=8, pre_norm=True, dropout=0.0) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Embedding(ctx, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TinyBlock(d, heads, pre_norm, dropout) for _ in range(layers))
        self.norm_f = nn.LayerNorm(d) if pre_norm else nn.Identity()
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm_f(x))


class MLPStack(nn.Module):
    """Not a transformer: a tanh MLP whose layers sit in `layers` (passed to the monitor as blocks)."""

    def __init__(self, d_in=6, d=12, depth=4, d_out=3) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(depth))
        self.out = nn.Linear(d, d_out)

    def forward(self, x):
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


class LSTMLM(nn.Module):
    """A small LSTM language model: blocks are two single-layer LSTMs (outputs are tuples)."""

    def __init__(self, vocab=11, d=8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnns = nn.ModuleList([nn.LSTM(d, d, batch_first=True), nn.LSTM(d, d, batch_first=True)])
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        for rnn in self.rnns:
            x, _ = rnn(x)
        return self.lm_head(x)
