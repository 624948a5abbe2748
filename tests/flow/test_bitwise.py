"""Monitoring on or off, training is bitwise identical on CPU (dropout on, so RNG use is checked too)."""

import torch
from tiny_models import TinyTransformer
from torch.nn import functional as F

from flowtrain.flow import FlowConfig, FlowMonitor
from flowtrain.model.config import ModelConfig
from flowtrain.model.gpt import GPT
from flowtrain.optim.clipping import GradClipper
from flowtrain.optim.config import ClipConfig


def train(make_model, monitored, steps=4, accum=2):
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    clipper = GradClipper(ClipConfig(kind="norm", max_norm=0.5))
    params = [p for p in model.parameters() if p.requires_grad]
    monitor = FlowMonitor(model, opt, FlowConfig(histogram_interval=2)) if monitored else None
    data = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        for _ in range(accum):
            idx = torch.randint(0, 17, (3, 8), generator=data)
            loss = F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten()) / accum
            loss.backward()
            losses.append(loss.detach())
        if monitor:
            monitor.after_backward()
        clip = clipper(params)
        opt.step()
        if monitor:
            monitor.after_step(clip_stats=clip)
            assert monitor.collect(step) is not None
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():  # evaluation pass with hooks still attached
        model(torch.randint(0, 17, (2, 8), generator=data))
    return losses, model.state_dict(), opt.state_dict(), torch.get_rng_state()


def assert_bitwise(make_model):
    off, on = train(make_model, False), train(make_model, True)
    assert all(torch.equal(a, b) for a, b in zip(off[0], on[0], strict=True))
    assert all(torch.equal(off[1][k], on[1][k]) for k in off[1])
    for p_off, p_on in zip(off[2]["state"].values(), on[2]["state"].values(), strict=True):
        assert all(torch.equal(p_off[k], p_on[k]) for k in p_off)
    assert torch.equal(off[3], on[3])  # the global RNG advanced identically


def test_bitwise_tiny_transformer_with_dropout():
    assert_bitwise(lambda: TinyTransformer(dropout=0.2))


def test_bitwise_flowtrain_gpt_with_dropout():
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=17, attn_dropout=0.1, resid_dropout=0.1)
    assert_bitwise(lambda: GPT(cfg))
