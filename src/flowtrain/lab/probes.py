"""Measurements a run directory cannot hold: a fresh model's gradient flow at initialization, and dead MLP units.

`init_profile` builds the GPT a run would start from (same seed, same config) and runs forward + backward on
a few real training batches with flowtrain's FlowMonitor attached, with no optimizer step in between, so every
batch sees the initial weights. Medians over the batches are less noisy than the run's single first step.

`dead_units` puts a forward pre-hook on every block's MLP, recomputes the activation's local derivative for
every hidden unit and token, and counts units whose derivative stays below DEAD_THRESHOLD on every token: no
gradient reaches their input weights through any of these tokens. For ReLU that is "never positive" exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowtrain.config import RunConfig
from flowtrain.data.dataset import TokenDataset
from flowtrain.data.loader import BatchLoader, eval_batches
from flowtrain.data.prepare import dataset_for
from flowtrain.flow.config import FlowConfig
from flowtrain.flow.monitor import FlowMonitor
from flowtrain.model.gpt import GPT
from flowtrain.model.loss import lm_loss

DEAD_THRESHOLD = 1e-3  # |d activation / d pre-activation| below this on every token: a dead unit


@dataclass
class InitProfile:
    """Median over probe batches of the fresh model's per-layer and along-depth statistics."""

    layers: list[str]  # embedding, block.0, ..., head
    grad_norm: np.ndarray  # per layer
    grad_rms: np.ndarray  # per layer
    depth: list[str]  # h0..hL
    resid_grad_norm: np.ndarray  # per boundary
    act_rms: np.ndarray  # per boundary
    loss: float
    per_batch_grad_norm: np.ndarray  # [batches, layers], for tests and spread
    tied: bool = False  # the head shares the embedding's matrix (held by the "embedding" layer)

    def layer(self, name: str) -> int:
        return self.layers.index(name)


def open_dataset(cfg: RunConfig) -> TokenDataset:
    """The dataset a run with this config trains on (prepared and cached on first use)."""
    dataset = TokenDataset.open(dataset_for(cfg.data, progress=False))
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = dataset.tokenizer.vocab_size
    return dataset


def fresh_model(cfg: RunConfig) -> GPT:
    """The GPT a run with this config starts from: the trainer seeds torch with train.seed, then builds it."""
    torch.manual_seed(cfg.train.seed)
    return GPT(cfg.model)


def init_profile(cfg: RunConfig, n_batches: int) -> InitProfile:
    """Gradient flow of the initial weights on the first `n_batches` training batches of the run."""
    dataset = open_dataset(cfg)
    model = fresh_model(cfg)
    model.train()
    monitor = FlowMonitor(model, None, FlowConfig(updates=False, attention=False, logits=False, histogram_interval=0))
    loader = BatchLoader(dataset, "train", cfg.train.batch_size, cfg.model.block_size, cfg.data.loader, cfg.train.seed)
    records, losses = [], []
    try:
        for i in range(n_batches):
            batch = loader.next()
            logits = model(batch.inputs, doc_ids=batch.doc_ids)
            loss = lm_loss(logits, batch.targets).loss
            loss.backward()
            monitor.after_backward()
            monitor.after_step()
            records.append(monitor.collect(i))
            losses.append(float(loss.detach()))
            model.zero_grad(set_to_none=True)
    finally:
        monitor.remove()
    first = records[0]
    col = {s: np.stack([r.layer_stats[:, _tensor_col(s)] for r in records]) for s in ("grad_norm", "grad_rms")}
    depth = {s: np.stack([np.asarray(r.depth(s)) for r in records]) for s in ("resid_grad_norm", "act_rms")}
    return InitProfile(
        layers=list(first.layer_names),
        grad_norm=np.median(col["grad_norm"], axis=0),
        grad_rms=np.median(col["grad_rms"], axis=0),
        depth=list(first.depth_names),
        resid_grad_norm=np.median(depth["resid_grad_norm"], axis=0),
        act_rms=np.median(depth["act_rms"], axis=0),
        loss=float(np.median(losses)),
        per_batch_grad_norm=col["grad_norm"],
        tied=bool(cfg.model.tie_embeddings),
    )


def _tensor_col(stat: str) -> int:
    from flowtrain.flow.records import TENSOR_STATS

    return TENSOR_STATS.index(stat)


# ---- dead units ---------------------------------------------------------------------------------------------


def _local_gradient(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """|d hidden / d pre-activation| per token and hidden unit [tokens, hidden] for this MLP's input x.

    relu: 1 where fc(x) > 0 else 0;  gelu (exact): Phi(a) + a*phi(a), gelu_tanh too (its derivative is within
    1e-3 of that);  swiglu, hidden = silu(g) * u with
    g = gate(x), u = fc(x): the larger of |d/du| = |silu(g)| and |d/dg| = |silu'(g) * u|.
    """
    x = x.reshape(-1, x.shape[-1]).float()
    u = mlp.fc(x)
    if mlp.gate is not None:
        g = mlp.gate(x)
        s = torch.sigmoid(g)
        return torch.maximum(F.silu(g).abs(), (s * (1 + g * (1 - s)) * u).abs())
    if mlp.activation == "relu":
        return (u > 0).float()
    cdf = 0.5 * (1 + torch.erf(u / 2**0.5))
    pdf = torch.exp(-0.5 * u * u) / (2 * torch.pi) ** 0.5
    return (cdf + u * pdf).abs()


@torch.no_grad()
def dead_units(model: GPT, dataset: TokenDataset, batch_size: int, n_batches: int) -> np.ndarray:
    """Per block, the fraction of MLP hidden units that pass no gradient on any token of the probe batches.

    The probe batches are the fixed validation subset (eval_batches), the same for every model.
    """
    peak: list[torch.Tensor | None] = [None] * len(model.blocks)

    def hook_for(i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            local = _local_gradient(module, args[0]).amax(dim=0)
            peak[i] = local if peak[i] is None else torch.maximum(peak[i], local)

        return hook

    handles = [block.mlp.register_forward_pre_hook(hook_for(i)) for i, block in enumerate(model.blocks)]
    was_training = model.training
    model.eval()
    try:
        for batch in eval_batches(dataset, "val", batch_size, model.cfg.block_size, n_batches):
            model(batch.inputs, doc_ids=batch.doc_ids)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return np.array([float((p < DEAD_THRESHOLD).float().mean()) for p in peak])


def trained_model(run_dir: Path) -> GPT:
    """The final weights of a finished run, from its run directory's latest checkpoint (safetensors only)."""
    from flowtrain.train.load import load_trained

    return load_trained(Path(run_dir), "latest").model
