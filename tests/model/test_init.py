"""Init schemes: measured weight statistics against each scheme's formula; weight tying."""

import math

import pytest
import torch
from torch import nn

from flowtrain.model.config import ModelConfig
from flowtrain.model.gpt import GPT

WIDTH, LAYERS = 96, 4


def build(**overrides):
    torch.manual_seed(0)
    base = dict(vocab_size=300, n_layer=LAYERS, n_head=4, n_embd=WIDTH, block_size=16, bias=True)
    return GPT(ModelConfig(**(base | overrides)))


def std(t):
    return t.detach().double().std().item()


def assert_std(t, expected, rel=0.05):
    assert abs(std(t) - expected) < rel * expected, (std(t), expected)


def test_scaled_residual_projections():
    model = build(init="scaled", init_std=0.02)
    target = 0.02 / math.sqrt(2 * LAYERS)
    all_attn_out = torch.cat([b.attn.proj.weight.flatten() for b in model.blocks])
    all_mlp_down = torch.cat([b.mlp.proj.weight.flatten() for b in model.blocks])
    assert_std(all_attn_out, target)
    assert_std(all_mlp_down, target)
    # Everything else keeps init_std.
    assert_std(model.blocks[0].attn.qkv.weight, 0.02)
    assert_std(model.blocks[0].mlp.fc.weight, 0.02)
    assert_std(model.tok_emb.weight, 0.02)
    assert_std(model.pos_emb.weight, 0.02)


def test_normal_is_plain_normal_everywhere():
    model = build(init="normal", init_std=0.05)
    for block in model.blocks:
        assert_std(block.attn.proj.weight, 0.05)
        assert_std(block.mlp.proj.weight, 0.05)
    assert_std(model.blocks[1].attn.qkv.weight, 0.05)
    assert abs(model.blocks[1].attn.qkv.weight.mean().item()) < 0.005


def test_xavier_uniform_bound_on_linear():
    model = build(init="xavier", init_std=0.02, tie_embeddings=False)
    for lin in (model.blocks[0].mlp.fc, model.blocks[2].attn.qkv, model.lm_head):
        fan_out, fan_in = lin.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert lin.weight.abs().max().item() <= bound
        assert_std(lin.weight, bound / math.sqrt(3))  # uniform(-a, a) has std a / sqrt(3)
    assert_std(model.tok_emb.weight, 0.02)


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_kaiming_fan_in_with_relu_gain(activation):
    model = build(init="kaiming", activation=activation)
    mlp = model.blocks[0].mlp
    layers = [mlp.fc, mlp.proj, model.blocks[1].attn.qkv] + ([mlp.gate] if mlp.gate is not None else [])
    for lin in layers:
        fan_in = lin.weight.shape[1]
        assert_std(lin.weight, math.sqrt(2 / fan_in))
    assert_std(model.tok_emb.weight, 0.02)


@pytest.mark.parametrize("init", ["normal", "xavier", "kaiming", "scaled"])
def test_norms_start_as_identity_and_biases_at_zero(init):
    model = build(init=init, qk_norm=True)
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))]
    assert len(norms) == 2 * LAYERS + 2 * LAYERS + 1  # block norms, q/k norms, final norm
    for m in norms:
        assert (m.weight == 1).all()
        assert m.bias is None or (m.bias == 0).all()
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            assert (m.bias == 0).all()


def test_tied_head_shares_storage_and_untied_does_not():
    tied = build(tie_embeddings=True)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    with torch.no_grad():
        tied.tok_emb.weight[3, 5] = 7.0
    assert tied.lm_head.weight[3, 5].item() == 7.0
    names = [n for n, _ in tied.named_parameters()]
    assert "tok_emb.weight" in names and "lm_head.weight" not in names  # counted once
    untied = build(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert_std(untied.lm_head.weight, 0.02)


def test_same_seed_same_weights():
    a, b = build(), build()
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
