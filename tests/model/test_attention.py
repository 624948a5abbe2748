"""Attention weights for inspection, and the document mask's isolation between packed documents."""

import pytest
import torch

from flowtrain.model.config import ModelConfig
from flowtrain.model.gpt import GPT


def model_for(**overrides):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=29, n_layer=2, n_head=2, n_embd=16, block_size=10, init_std=0.3, **overrides)
    return GPT(cfg).eval()


@pytest.mark.parametrize("overrides", [{}, {"pos_encoding": "rope", "qk_norm": True}])
def test_attention_probs_rows_sum_to_one_and_are_causal(overrides):
    model = model_for(**overrides)
    idx = torch.randint(0, 29, (3, 10))
    maps = model.attention_probs(idx)
    assert len(maps) == 2
    for probs in maps:
        assert probs.shape == (3, 2, 10, 10)
        torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2, 10))
        above = torch.ones(10, 10, dtype=torch.bool).triu(1)
        assert (probs[..., above] == 0).all()
        assert (probs[..., ~above] > 0).all()


def test_attention_probs_reproduce_the_attention_output():
    """probs @ v, through the output projection, is what the SDPA path computes."""
    model = model_for(pos_encoding="rope")
    attn = model.blocks[0].attn
    x = torch.randn(2, 10, 16)
    probs = attn.attention_probs(x)
    _, _, v = attn.qkv(x).split(16, dim=-1)
    v = v.view(2, 10, 2, 8).transpose(1, 2)
    y = (probs @ v).transpose(1, 2).reshape(2, 10, 16)
    torch.testing.assert_close(attn.proj(y), attn(x), atol=1e-6, rtol=1e-5)


def test_attention_probs_respect_documents():
    model = model_for()
    idx = torch.randint(0, 29, (1, 10))
    doc_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2]])
    probs = model.attention_probs(idx, doc_ids)[1]
    same = doc_ids[0][:, None] == doc_ids[0][None, :]
    allowed = same & torch.ones(10, 10, dtype=torch.bool).tril()
    assert (probs[..., ~allowed] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, 10))


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_other_documents_do_not_leak(pos_encoding):
    model = model_for(pos_encoding=pos_encoding)
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 29, (2, 10), generator=gen)
    doc_ids = torch.tensor([[0] * 4 + [1] * 6, [5] * 3 + [6] * 3 + [7] * 4])
    base = model(idx, doc_ids=doc_ids)
    changed = idx.clone()
    changed[0, :4] = (changed[0, :4] + 1) % 29  # rewrite document 0 of row 0
    changed[1, 3:6] = (changed[1, 3:6] + 5) % 29  # rewrite the middle document of row 1
    out = model(changed, doc_ids=doc_ids)
    torch.testing.assert_close(out[0, 4:], base[0, 4:], atol=0, rtol=0)
    torch.testing.assert_close(out[1, :3], base[1, :3], atol=0, rtol=0)
    torch.testing.assert_close(out[1, 6:], base[1, 6:], atol=0, rtol=0)
    assert not torch.allclose(out[0, :4], base[0, :4])  # the rewritten document itself did change
    # Without the mask, later documents do see the earlier ones.
    assert not torch.allclose(model(changed)[0, 4:], model(idx)[0, 4:])


def test_rope_packed_document_equals_document_alone():
    """RoPE depends only on relative positions, so a masked document behaves as if it stood alone."""
    model = model_for(pos_encoding="rope")
    idx = torch.randint(0, 29, (1, 10), generator=torch.Generator().manual_seed(4))
    doc_ids = torch.tensor([[0] * 3 + [1] * 7])
    packed = model(idx, doc_ids=doc_ids)
    alone = model(idx[:, 3:])
    torch.testing.assert_close(packed[:, 3:], alone, atol=1e-5, rtol=1e-5)


def test_attention_logits_by_hand():
    model = model_for()  # learned positions: scores are plain q.k / sqrt(head_dim)
    attn = model.blocks[1].attn
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    attn.double()
    w = attn.qkv.weight.detach()
    q, k = x @ w[:16].T, x @ w[16:32].T
    logits = attn.attention_logits(x)
    above = torch.ones(10, 10, dtype=torch.bool).triu(1)
    for h in range(2):
        qh, kh = q[..., h * 8 : (h + 1) * 8], k[..., h * 8 : (h + 1) * 8]
        expected = (qh @ kh.transpose(-1, -2)) / 8**0.5
        torch.testing.assert_close(logits[:, h][..., ~above], expected.float()[..., ~above])
    assert torch.isneginf(logits[..., above]).all()


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_block_attention_probs_see_what_attention_sees(placement):
    model = model_for(norm_placement=placement)
    block = model.blocks[0]
    x = torch.randn(1, 10, 16)
    attn_input = block.norm1(x) if placement == "pre" else x
    torch.testing.assert_close(block.attention_probs(x), block.attn.attention_probs(attn_input))
