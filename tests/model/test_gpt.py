"""GPT structure and helpers: contract names, errors, layer_of, parameter counts, FLOPs, dropout, precision."""

import pytest
import torch

from flowtrain.errors import ConfigError, FlowtrainError
from flowtrain.model.config import ModelConfig, swiglu_hidden
from flowtrain.model.gpt import GPT, layer_of


def cfg(**overrides):
    return ModelConfig(**(dict(vocab_size=50, n_layer=3, n_head=2, n_embd=16, block_size=8) | overrides))


def test_contract_submodule_names():
    model = GPT(cfg())
    assert isinstance(model.tok_emb, torch.nn.Embedding)
    assert isinstance(model.pos_emb, torch.nn.Embedding)
    assert len(model.blocks) == 3 and all(hasattr(b, "attn") and hasattr(b, "mlp") for b in model.blocks)
    assert isinstance(model.norm_f, torch.nn.LayerNorm)
    assert isinstance(model.lm_head, torch.nn.Linear)
    rope = GPT(cfg(pos_encoding="rope", norm_placement="post"))
    assert rope.pos_emb is None and isinstance(rope.norm_f, torch.nn.Identity)
    assert not any(".rotary." in name for name in rope.state_dict())  # cos/sin are not checkpointed


def test_missing_vocab_size_is_a_config_error():
    with pytest.raises(ConfigError, match="vocab_size"):
        GPT(ModelConfig(n_layer=1, n_head=2, n_embd=8))


def test_too_long_sequence_with_learned_positions():
    model = GPT(cfg())
    model(torch.zeros(1, 8, dtype=torch.long))  # exactly block_size is fine
    with pytest.raises(FlowtrainError, match="block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    rope = GPT(cfg(pos_encoding="rope"))
    assert rope(torch.zeros(1, 12, dtype=torch.long)).shape == (1, 12, 50)  # RoPE has no table to overrun


def test_layer_of_every_parameter():
    model = GPT(cfg(tie_embeddings=False, qk_norm=True, bias=True))
    layers = {name: layer_of(name) for name, _ in model.named_parameters()}
    assert layers["tok_emb.weight"] == "embedding" and layers["pos_emb.weight"] == "embedding"
    assert layers["lm_head.weight"] == "head" and layers["norm_f.weight"] == "head"
    assert layers["blocks.2.attn.q_norm.weight"] == "block.2"
    assert {v for k, v in layers.items() if k.startswith("blocks.")} == {"block.0", "block.1", "block.2"}
    assert model.layer_of("module._orig_mod.blocks.1.mlp.fc.weight") == "block.1"  # DDP / compile names
    with pytest.raises(ValueError, match="not part"):
        layer_of("encoder.weight")


def test_num_parameters_by_hand():
    c = cfg(tie_embeddings=False, bias=False)
    d, v, t, hidden = c.n_embd, c.vocab_size, c.block_size, 4 * c.n_embd
    block = 3 * d * d + d * d + d * hidden + hidden * d + 2 * d  # qkv, proj, fc, proj, two LayerNorm gains
    total = v * d + t * d + c.n_layer * block + d + d * v  # embeddings, blocks, norm_f, head
    model = GPT(c)
    assert model.num_parameters() == total
    assert model.num_parameters(exclude_embeddings=True) == total - v * d - t * d
    tied = GPT(cfg(tie_embeddings=True))
    assert tied.num_parameters() == total - d * v
    assert tied.num_parameters(exclude_embeddings=True) == total - v * d - t * d  # head matrix counted once
    swiglu = GPT(cfg(activation="swiglu", pos_encoding="rope"))
    h = swiglu_hidden(d, 4.0)
    assert h == 48  # round_up(2/3 * 4 * 16, 8) = round_up(42.67, 8)
    assert sum(p.numel() for p in swiglu.blocks[0].mlp.parameters()) == 3 * d * h


def test_flops_per_token_formula():
    model = GPT(cfg())
    n = model.num_parameters(exclude_embeddings=True)
    assert model.flops_per_token() == 6 * n + 12 * 3 * 8 * 16
    assert model.flops_per_token(seq_len=4) == 6 * n + 12 * 3 * 4 * 16


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = GPT(cfg(embd_dropout=0.2, attn_dropout=0.2, resid_dropout=0.2))
    idx = torch.randint(0, 50, (2, 8))
    model.eval()
    torch.testing.assert_close(model(idx), model(idx), atol=0, rtol=0)
    model.train()
    assert not torch.allclose(model(idx), model(idx))


def test_logits_are_float_under_bf16_autocast():
    model = GPT(cfg())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, 50, (2, 8)))
        rope_logits = GPT(cfg(pos_encoding="rope", qk_norm=True))(torch.randint(0, 50, (2, 8)))
    assert logits.dtype == torch.float32 and rope_logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_gradients_reach_every_parameter():
    model = GPT(cfg(activation="swiglu", qk_norm=True, bias=True, tie_embeddings=False))
    model(torch.randint(0, 50, (2, 8))).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
