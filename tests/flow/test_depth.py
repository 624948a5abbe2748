"""Depth statistics (residual-stream gradients, activations, attention, logits) vs a manual forward with
retain_grad on a copy of the model, with gradient accumulation over two micro-batches."""

import copy
import math

import numpy as np
import pytest
import torch
from tiny_models import LSTMLM, MLPStack, TinyTransformer
from torch.nn import functional as F

from flowtrain.flow import FlowConfig, FlowMonitor
from flowtrain.model.config import ModelConfig
from flowtrain.model.gpt import GPT

REL = 1e-6


def close(actual, expected, rel=REL):
    assert actual == pytest.approx(expected, rel=rel, abs=1e-12), (actual, expected)


def lm_loss(logits, idx):
    return F.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten())


def reference_forward(model, idx, blocks, embed, **block_kwargs):
    """Manual forward keeping every boundary h_0..h_L with retain_grad."""
    h = embed(idx)
    h.retain_grad()
    hs = [h]
    for block in blocks:
        h = block(h, **block_kwargs)
        h.retain_grad()
        hs.append(h)
    return hs


def check_depth(rec, hs, act_ok=True):
    resid = rec.depth("resid_grad_norm")
    assert len(resid) == len(hs)
    for got, h in zip(resid, hs, strict=True):
        close(got, float(torch.linalg.vector_norm(h.grad.double())))
    if act_ok:
        for got_rms, got_max, h in zip(rec.depth("act_rms"), rec.depth("act_max_abs"), hs, strict=True):
            close(got_rms, math.sqrt(float((h.detach().double() ** 2).mean())))
            close(got_max, float(h.detach().abs().max()))


def check_sampled_entropy(rec, blocks, hs, rows):
    """Attention entropy of the first sequence's sampled query rows, from each block's own attention_probs."""
    for i, block in enumerate(blocks):
        with torch.no_grad():
            p = block.attention_probs(hs[i][:1])[:, :, rows, :].double()
            ent = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1).mean()
        close(rec.depth("attn_entropy")[i + 1], float(ent), rel=1e-5)


def test_tiny_transformer_depth_stats_with_grad_accum_equal_one_big_batch():
    torch.manual_seed(0)
    model = TinyTransformer(layers=3)
    ref = copy.deepcopy(model)
    monitor = FlowMonitor(model, None, FlowConfig(attn_batch=1, attn_heads=4, attn_positions=16))
    idx = torch.randint(0, 17, (4, 8))
    for micro in idx.split(2):  # grad_accum = 2: each micro-batch's mean loss / 2
        (lm_loss(model(micro), micro) / 2).backward()
    monitor.after_backward()
    monitor.after_step()
    rec = monitor.collect(0)

    pos = torch.arange(8)
    hs = reference_forward(ref, idx, ref.blocks, lambda i: ref.tok_emb(i) + ref.pos_emb(pos))
    logits = ref.lm_head(ref.norm_f(hs[-1]))
    lm_loss(logits, idx).backward()
    check_depth(rec, hs)
    assert rec.depth_layers == ["tok_emb", "blocks.0", "blocks.1", "blocks.2"]

    # attention: first sequence of the first micro-batch, all 2 heads, all 8 positions (<= 16)
    for i, block in enumerate(ref.blocks):
        with torch.no_grad():
            x = block.ln1(hs[i][:1])
            q, k, _ = block.attn._qkv(x)
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            scores = scores.masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), float("-inf"))
            p = torch.exp(scores.double() - torch.logsumexp(scores.double(), -1, keepdim=True))
            ent = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1).mean()
        close(rec.depth("attn_entropy")[i + 1], float(ent), rel=1e-5)
        close(rec.depth("attn_max_logit")[i + 1], float(scores.max()))
    assert math.isnan(rec.depth("attn_entropy")[0])

    close(rec.scalars["logits_max_abs"], float(logits.detach().abs().max()))
    close(rec.scalars["logits_lse_mean"], float(torch.logsumexp(logits.detach().double(), -1).mean()))


@pytest.mark.parametrize("scale", [8.0, torch.tensor(8.0)], ids=["float", "tensor"])
def test_scaled_backward_reports_the_true_residual_gradients(scale):
    """A backward of scale x loss (data parallel: the world size; fp16: GradScaler's scale, a tensor) gives the
    residual gradients of the loss itself once the monitor knows the scale."""
    torch.manual_seed(0)
    model = TinyTransformer(layers=2)
    ref = copy.deepcopy(model)
    monitor = FlowMonitor(model, None, FlowConfig(attention=False))
    monitor.backward_scale = scale
    idx = torch.randint(0, 17, (4, 8))
    (lm_loss(model(idx), idx) * scale).backward()
    monitor.after_backward()
    monitor.after_step()
    rec = monitor.collect(0)
    pos = torch.arange(8)
    hs = reference_forward(ref, idx, ref.blocks, lambda i: ref.tok_emb(i) + ref.pos_emb(pos))
    lm_loss(ref.lm_head(ref.norm_f(hs[-1])), idx).backward()
    check_depth(rec, hs)


def test_gpt_depth_stats_and_layers():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=17)
    model = GPT(cfg)
    ref = copy.deepcopy(model)
    monitor = FlowMonitor(model, None, FlowConfig(attn_positions=4))
    idx = torch.randint(0, 17, (3, 8))
    lm_loss(model(idx), idx).backward()
    monitor.after_backward()
    monitor.after_step()
    rec = monitor.collect(0)
    hs = reference_forward(ref, idx, ref.blocks, ref.embed)
    lm_loss(ref.lm_head(ref.norm_f(hs[-1])), idx).backward()
    check_depth(rec, hs)
    assert rec.depth_layers == ["embedding", "block.0", "block.1"]
    assert rec.layer_names == ["embedding", "block.0", "block.1", "head"]
    check_sampled_entropy(rec, ref.blocks, hs, torch.tensor([0, 2, 5, 7]))  # 4 of 8 positions, evenly spaced


def test_mlp_stack_user_given_blocks():
    torch.manual_seed(0)
    model = MLPStack()
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    monitor = FlowMonitor(model, opt, FlowConfig(), blocks=model.layers, head=model.out)
    x, y = torch.randn(5, 6), torch.randn(5, 3)
    F.mse_loss(model(x), y).backward()
    monitor.after_backward()
    opt.step()
    monitor.after_step()
    rec = monitor.collect(0)
    hs = reference_forward(ref, x, ref.layers, ref.inp)
    out = ref.out(hs[-1])
    F.mse_loss(out, y).backward()
    check_depth(rec, hs)
    assert rec.layer_names == ["inp", "layers.0", "layers.1", "layers.2", "layers.3", "out"]
    close(rec.scalars["logits_max_abs"], float(out.detach().abs().max()))
    assert all(math.isfinite(v) for v in rec.layer_stats[:, 7])  # Adam second moment for every layer


class ScaledInPlace(torch.nn.Module):
    """A stack whose forward scales each block's output in place before the next block takes it."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(6, 8)
        layers = [torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)) for _ in range(3)]
        self.blocks = torch.nn.ModuleList(layers)
        self.out = torch.nn.Linear(8, 1)

    def forward(self, x, keep=None):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
            if keep is not None:
                h.retain_grad()
                keep.append(h.detach().clone())
            h.mul_(0.5)  # changes the block's output after its forward hook saw it
        return self.out(h)


def test_activations_changed_in_place_after_the_block():
    """Activations are read in the forward hook, as the block returned them: a model that changes them in place
    afterwards does not change what is reported. Residual gradients are right throughout."""
    torch.manual_seed(0)
    model = ScaledInPlace()
    monitor = FlowMonitor(model, None, FlowConfig(), blocks=model.blocks, head=model.out)
    x = torch.randn(5, 6)
    for step in range(2):
        returned: list[torch.Tensor] = []
        model(x).square().sum().backward()
        monitor.after_backward()
        monitor.after_step()
        rec = monitor.collect(step)
        model.zero_grad()
        ref = copy.deepcopy(model)
        ref(x, keep=returned).square().sum().backward()
        rms, mx = rec.depth("act_rms")[1:], rec.depth("act_max_abs")[1:]
        for got_rms, got_max, h in zip(rms, mx, returned, strict=True):
            close(got_rms, math.sqrt(float((h.double() ** 2).mean())))
            close(got_max, float(h.abs().max()))
        assert all(math.isfinite(v) and v > 0 for v in rec.depth("resid_grad_norm"))


def test_lstm_language_model_tuple_outputs():
    torch.manual_seed(0)
    model = LSTMLM()
    ref = copy.deepcopy(model)
    monitor = FlowMonitor(model, None, FlowConfig(), blocks=model.rnns)
    idx = torch.randint(0, 11, (2, 6))
    lm_loss(model(idx), idx).backward()
    monitor.after_backward()
    monitor.after_step()
    rec = monitor.collect(0)
    hs = reference_forward(ref, idx, [lambda h, r=r: r(h)[0] for r in ref.rnns], ref.emb)
    lm_loss(ref.lm_head(hs[-1]), idx).backward()
    check_depth(rec, hs)


def torch_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_between_monitored_steps_no_hook_is_attached_and_monitored_steps_match_every_step_monitoring():
    """Every 2nd step: no torch hook between monitored steps; a monitored step reports what a model monitored at
    every step reports on the same batches; a monitored model can be deep-copied and its copy runs hook-free."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=17))
    twin = copy.deepcopy(model)
    sparse, every = FlowMonitor(model, None, FlowConfig(interval=2)), FlowMonitor(twin, None, FlowConfig(interval=1))
    batches = [torch.randint(0, 17, (3, 8)) for _ in range(3)]
    for step, idx in enumerate(batches):
        assert torch_hooks(model) == (1 + 2 + 2 + 1 if step % 2 == 0 else 0)  # input, outputs, attention, head
        records = []
        for m, monitor in ((model, sparse), (twin, every)):
            lm_loss(m(idx), idx).backward()
            monitor.after_backward()
            monitor.after_step()
            records.append(monitor.collect(step))
            m.zero_grad(set_to_none=True)
        assert (records[0].depth_stats is not None) == (step % 2 == 0)
    np.testing.assert_array_equal(records[0].depth_stats, records[1].depth_stats)
    assert records[0].scalars["logits_lse_mean"] == records[1].scalars["logits_lse_mean"]
    copied = copy.deepcopy(model)
    sparse.remove()
    assert torch_hooks(model) == 0
    idx = batches[0]
    assert torch.equal(copied(idx), model(idx))


def test_hooks_are_silent_in_evaluation_and_removable():
    torch.manual_seed(0)
    model = TinyTransformer()
    monitor = FlowMonitor(model, None, FlowConfig())
    with torch.no_grad():
        model(torch.randint(0, 17, (2, 8)))
    assert all(v is None for v in monitor.depth.act_norm) and monitor.depth.act_count == [0] * 4
    monitor.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("with_doc_mask", [True, False])
def test_gpt_attention_sample_matches_an_independent_recomputation(with_doc_mask):
    """The sampled attention (RoPE, QK-norm, document masks) equals the block's own scores on its input, with the
    weights of the forward pass (not those after the optimizer step)."""
    torch.manual_seed(1)
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=16, block_size=12, vocab_size=17, pos_encoding="rope", qk_norm=True)
    model = GPT(cfg)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # a large step: the sample must use the forward's weights
    monitor = FlowMonitor(model, opt, FlowConfig(attn_positions=5, attn_batch=2, attn_heads=2))
    assert all(m is not None for m in monitor.depth.attention.modules)
    idx = torch.randint(0, 17, (3, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12, [0] * 3 + [1] * 9]) if with_doc_mask else None
    lm_loss(model(idx, doc_ids=doc_ids), idx).backward()
    monitor.after_backward()
    opt.step()
    monitor.after_step()
    rec = monitor.collect(0)
    hs = reference_forward(ref, idx, ref.blocks, ref.embed, doc_ids=doc_ids)
    rows = torch.linspace(0, 11, 5).round().long()
    for i, block in enumerate(ref.blocks):
        with torch.no_grad():
            docs = doc_ids[:2] if doc_ids is not None else None
            scores = block.attention_logits(hs[i][:2], docs)[:, :2, rows, :].double()
            p = torch.softmax(scores, -1)
            ent = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1).mean()
        close(rec.depth("attn_entropy")[i + 1], float(ent), rel=1e-5)
        close(rec.depth("attn_max_logit")[i + 1], float(scores.max()), rel=1e-5)


class Transposed(torch.nn.Module):
    """A layer that works on its input transposed: the gradient of its input arrives as a transposed view, and
    its output is one (not contiguous)."""

    def __init__(self, d=12) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x):
        return torch.tanh(self.lin.weight @ x.T + self.lin.bias[:, None]).T


def test_plain_and_unusual_boundaries_in_one_stack_with_two_micro_batches():
    """Plain boundaries beside a transposed view, with gradient accumulation: every statistic equals the
    reference of one big batch."""
    torch.manual_seed(0)
    model = MLPStack()
    model.layers[1] = Transposed()
    ref = copy.deepcopy(model)
    monitor = FlowMonitor(model, None, FlowConfig(), blocks=model.layers, head=model.out)
    x, y = torch.randn(6, 6), torch.randn(6, 3)
    for part in (slice(0, 3), slice(3, 6)):
        (F.mse_loss(model(x[part]), y[part], reduction="sum") / 6).backward()
    monitor.after_backward()
    monitor.after_step()
    rec = monitor.collect(0)
    hs = reference_forward(ref, x, ref.layers, ref.inp)
    (F.mse_loss(ref.out(hs[-1]), y, reduction="sum") / 6).backward()
    check_depth(rec, hs)


def test_a_gradient_that_is_an_expanded_view():
    """The gradient of a sum reaches the last boundary as an expanded (stride 0) view: read all the same."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()) for _ in range(2)))
    monitor = FlowMonitor(model, None, FlowConfig(), blocks=list(model))
    x = torch.randn(4, 6, requires_grad=True)
    (model(x).sum() * 0.5).backward()
    monitor.after_backward()
    monitor.after_step()
    rec = monitor.collect(0)
    seen = []
    h = model[1](model[0](x))  # the monitor hooks h too (the next step is monitored): a user's hook joins it
    h.register_hook(lambda g: seen.append(g.stride()))
    (h.sum() * 0.5).backward()
    assert seen == [(0, 0)]  # what the monitor's hook got too
    close(rec.depth("resid_grad_norm")[-1], 0.5 * math.sqrt(h.numel()))
    close(rec.depth("act_rms")[-1], math.sqrt(float((h.detach().double() ** 2).mean())))
