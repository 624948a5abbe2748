"""Feeding a sequence through the KV cache (prefill, one token at a time, or in chunks) equals one full pass."""

import pytest
import torch

from flowtrain.model.config import ModelConfig
from flowtrain.model.gpt import GPT
from flowtrain.model.kv_cache import KVCache


def model_for(**overrides):
    torch.manual_seed(0)
    base = dict(vocab_size=31, n_layer=2, n_head=2, n_embd=16, block_size=12, init_std=0.2)
    return GPT(ModelConfig(**(base | overrides))).eval()


CONFIGS = [{}, {"pos_encoding": "rope", "qk_norm": True, "activation": "swiglu"}, {"norm_placement": "post"}]


@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("chunks", [[5, 1, 1, 1, 1, 1, 1, 1], [1] * 12, [4, 3, 5], [12]])
def test_incremental_equals_full_pass(overrides, chunks):
    model = model_for(**overrides)
    idx = torch.randint(0, 31, (2, 12), generator=torch.Generator().manual_seed(1))
    full = model(idx)
    cache = model.new_kv_cache()
    pieces, start = [], 0
    for size in chunks:
        pieces.append(model(idx[:, start : start + size], kv_cache=cache))
        start += size
        assert cache.length == start
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_overflow_leaves_cache_untouched():
    model = model_for(pos_encoding="rope")
    cache = model.new_kv_cache(capacity=6)
    model(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    assert cache.length == 4
    cache.reset()
    assert cache.length == 0
    model(torch.zeros(1, 6, dtype=torch.long), kv_cache=cache)


def test_learned_positions_past_block_size_fail_even_with_a_big_cache():
    model = model_for()
    cache = KVCache(n_layer=2, capacity=20)
    model(torch.zeros(1, 12, dtype=torch.long), kv_cache=cache)
    with pytest.raises(Exception, match="block_size"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


def test_doc_ids_with_cache_rejected():
    model = model_for()
    with pytest.raises(ValueError, match="doc_ids"):
        model(
            torch.zeros(1, 3, dtype=torch.long),
            doc_ids=torch.zeros(1, 3, dtype=torch.long),
            kv_cache=model.new_kv_cache(),
        )
