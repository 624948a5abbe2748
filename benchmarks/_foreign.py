"""A model that is not flowtrain's, for `flow_overhead.py --foreign`: a nanoGPT-shaped GPT and a plain loop.

Everything here is written with torch alone (no flowtrain code in the model, the data or the loop), so the
microscope is timed the way a user attaches it to their own model: `FlowMonitor(model, optimizer, cfg)` and its
public calls (after_backward, after_step, collect_all), nothing else. The shape is nanoGPT's shakespeare-char
CPU recipe: 4 layers, 4 heads, width 128, context 64, batch 12, vocabulary 65 (the characters of Tiny
Shakespeare), dropout 0, no biases, pre-LayerNorm blocks with a fused qkv projection and
F.scaled_dot_product_attention(is_causal=True), a GELU MLP, a final LayerNorm and the head tied to the token
embedding; AdamW (fused where torch has it on the device), lr 1e-3, betas (0.9, 0.99), weight decay 0.1 on
matrices, clip_grad_norm_(..., 1.0). Batches are random windows of the first 90% of the text, from a seeded
generator, so two instances built alike see the same batches and do the same work.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowtrain.flow.config import FlowConfig
from flowtrain.flow.monitor import FlowMonitor

SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64)
BATCH, LR, SEED = 12, 1e-3, 1337
COLLECT_EVERY = 10  # the loop fetches the microscope's records every N steps (one host transfer for them)


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.fc_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))


class ForeignGPT(nn.Module):
    def __init__(self, vocab: int, n_layer: int, n_head: int, n_embd: int, block_size: int) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2's init: N(0, 0.02), the residual projections scaled down by depth
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


class Run:
    """One instance: model, optimizer, its own seeded batch stream, and a FlowMonitor when `flow` is given."""

    def __init__(
        self, data: torch.Tensor, vocab: int, device: torch.device, flow: FlowConfig | None, fused: bool = True
    ) -> None:
        torch.manual_seed(SEED)
        self.model = ForeignGPT(vocab, **SHAPE).to(device).train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        try:
            self.optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.99), fused=fused or None)
        except (RuntimeError, TypeError):  # no fused kernel for this device in this torch
            self.optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.99))
        self.monitor = FlowMonitor(self.model, self.optimizer, flow) if flow is not None else None
        self.data, self.device = data, device
        self.gen = torch.Generator().manual_seed(SEED)
        self.step = 0
        self.records: list = []  # every collected record (their scalars: flow_ms, flow_interval)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = SHAPE["block_size"]
        starts = torch.randint(len(self.data) - t - 1, (BATCH,), generator=self.gen)
        x = torch.stack([self.data[s : s + t] for s in starts.tolist()])
        y = torch.stack([self.data[s + 1 : s + 1 + t] for s in starts.tolist()])
        return x.to(self.device), y.to(self.device)

    def train_step(self) -> None:
        x, y = self.batch()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(x, y)
        loss.backward()
        if self.monitor is not None:
            self.monitor.after_backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        if self.monitor is not None:
            self.monitor.after_step()
            if self.step % COLLECT_EVERY == 0:
                self.records += self.monitor.collect_all(self.step)


def encoded(corpus: Path) -> tuple[torch.Tensor, int]:
    """The first 90% of the text as character ids (int64), and the vocabulary size."""
    text = corpus.read_text(encoding="utf-8")
    chars = sorted(set(text))
    ids = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([ids[c] for c in text], dtype=torch.long)
    return data[: int(0.9 * len(data))], len(chars)


def side_by_side(
    corpus: Path, flows: dict[str, FlowConfig | None], blocks: int, block: int, warmup: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[dict]]]:
    """As flow_overhead.side_by_side for the foreign model: per variant, the mean step ms of each timed block,
    every timed step's ms (CPU), and the scalars of the records of its timed steps."""
    data, vocab = encoded(corpus)
    runs = {name: Run(data, vocab, device, flow) for name, flow in flows.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    means: dict[str, list[float]] = {name: [] for name in runs}
    each: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # one after the other: auto sees its own step times while it chooses
        for _ in range(warmup):
            run.train_step()
    for b in range(blocks):
        order = list(runs) if b % 2 == 0 else list(reversed(runs))
        for name in order:
            run = runs[name]
            sync()
            started = step_started = time.perf_counter()
            for _ in range(block):
                run.train_step()
                if device.type == "cpu":
                    now = time.perf_counter()
                    each[name].append((now - step_started) * 1e3)
                    step_started = now
            sync()
            means[name].append((time.perf_counter() - started) * 1e3 / block)
    rows = {}
    for name, run in runs.items():
        if run.monitor is not None:
            run.records += run.monitor.collect_all(run.step)
            run.monitor.remove()
        rows[name] = [r.scalars for r in run.records if r.step > warmup]
    return means, each, rows
