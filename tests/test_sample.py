"""generate(): KV-cache decoding equals full recomputation, seeds reproduce, top-k/top-p restrict support."""

import pytest
import torch

from flowtrain.errors import ConfigError, DivergedError
from flowtrain.model.config import ModelConfig
from flowtrain.model.gpt import GPT
from flowtrain.sample import generate, restrict_logits

VOCAB, BLOCK = 23, 10


@pytest.fixture(autouse=True)
def _single_thread(_two_threads):
    """Tiny models: one intra-op thread avoids oversubscribing the shared CPU (after the root conftest's 2)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(2)


def model_for(**overrides):
    torch.manual_seed(0)
    base = dict(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=16, block_size=BLOCK, init_std=0.3)
    return GPT(ModelConfig(**(base | overrides)))


@torch.no_grad()
def full_logits(model, tokens):
    """Next-token logits recomputed from scratch over the last block_size tokens (no cache)."""
    return model(torch.tensor([tokens[-BLOCK:]]))[0, -1]


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_greedy_with_cache_equals_full_recompute(pos_encoding):
    model = model_for(pos_encoding=pos_encoding).eval()
    prompt = [3, 1, 4, 1, 5]
    steps = 2 * BLOCK  # runs well past the context: the sliding window is exercised too
    fed_lengths = []
    hook = model.register_forward_pre_hook(lambda m, args: fed_lengths.append(args[0].shape[1]))
    new = generate(model, prompt, steps, temperature=0)
    hook.remove()
    tokens = list(prompt)
    for token in new:
        assert token == int(full_logits(model, tokens).argmax())
        tokens.append(token)
    assert len(new) == steps
    # Prefill, then one position per token until the context is full, then full windows.
    assert fed_lengths[0] == len(prompt)
    assert fed_lengths[1 : BLOCK - len(prompt) + 1] == [1] * (BLOCK - len(prompt))
    assert set(fed_lengths[BLOCK - len(prompt) + 1 :]) == {BLOCK}


def test_long_prompt_is_cropped_to_the_context():
    model = model_for().eval()
    prompt = list(range(15))
    new = generate(model, prompt, 3, temperature=0)
    assert new[0] == int(full_logits(model, prompt).argmax())


def test_same_seed_same_sample_and_restores_mode():
    model = model_for(pos_encoding="rope").train()
    torch.manual_seed(123)
    a = generate(model, [1, 2], 25, seed=7)
    torch.manual_seed(999)  # the global RNG does not matter
    b = generate(model, [1, 2], 25, seed=7)
    c = generate(model, [1, 2], 25, seed=8)
    assert a == b and a != c
    assert model.training  # mode restored
    assert all(0 <= t < VOCAB for t in a)


def test_eos_stops_generation():
    model = model_for().eval()
    greedy = generate(model, [2], 12, temperature=0)
    eos = greedy[4]
    first = greedy.index(eos)
    assert generate(model, [2], 12, temperature=0, eos_id=eos) == greedy[: first + 1]


def support_of(logits, top_k=None, top_p=None):
    """Independent support: sort, then keep the first k / the shortest prefix reaching mass top_p."""
    order = sorted(range(len(logits)), key=lambda i: -float(logits[i]))
    if top_k is not None:
        order = order[:top_k]
    if top_p is not None:
        probs = torch.softmax(torch.tensor([float(logits[i]) for i in order]), dim=0).tolist()
        kept, mass = [], 0.0
        for i, p in zip(order, probs, strict=True):
            kept.append(i)
            mass += p
            if mass >= top_p:
                break
        order = kept
    return set(order)


@pytest.mark.parametrize("top_k,top_p", [(3, None), (None, 0.5), (6, 0.7), (1, None), (None, 1.0)])
def test_restrict_logits_matches_independent_support(top_k, top_p):
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        logits = 2 * torch.randn(VOCAB, generator=gen)
        kept = restrict_logits(logits, top_k=top_k, top_p=top_p)
        got = {i for i in range(VOCAB) if kept[i] > float("-inf")}
        assert got == support_of(logits, top_k, top_p)
        assert torch.equal(kept[sorted(got)], logits[sorted(got)])  # kept logits unchanged


@pytest.mark.parametrize("top_k,top_p", [(3, None), (None, 0.6)])
def test_generated_tokens_lie_in_the_support(top_k, top_p):
    model = model_for().eval()
    prompt = [0, 5]
    for seed in range(3):
        new = generate(model, prompt, 12, temperature=1.5, top_k=top_k, top_p=top_p, seed=seed)
        tokens = list(prompt)
        for token in new:
            logits = full_logits(model, tokens) / 1.5
            assert token in support_of(logits, top_k, top_p)
            tokens.append(token)
    # top_k=1 is greedy whatever the temperature.
    assert generate(model, prompt, 8, top_k=1, seed=3) == generate(model, prompt, 8, temperature=0)


def test_sampling_follows_the_distribution():
    """Over many draws the first sampled token's frequencies match softmax(logits / T)."""
    model = model_for(init_std=0.05).eval()
    probs = torch.softmax(full_logits(model, [4]) / 0.8, dim=0)
    counts = torch.zeros(VOCAB)
    for seed in range(400):
        counts[generate(model, [4], 1, temperature=0.8, seed=seed)[0]] += 1
    assert (counts / 400 - probs).abs().max() < 0.08


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt_ids=[]), "prompt is empty"),
        (dict(prompt_ids=[VOCAB]), "outside the vocabulary"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, match):
    model = model_for()
    args = dict(prompt_ids=[1], max_new_tokens=2) | kwargs
    with pytest.raises(ConfigError, match=match):
        generate(model, args.pop("prompt_ids"), args.pop("max_new_tokens"), **args)


def test_generation_under_bf16_autocast():
    model = model_for(pos_encoding="rope").eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        new = generate(model, [1, 2, 3], 15, temperature=0)
    assert len(new) == 15


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_diverged_model_is_a_user_error_not_a_crash(temperature):
    """NaN weights give NaN logits: multinomial would raise a RuntimeError, greedy would pick garbage."""
    model = model_for()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(DivergedError, match="logits are not finite"):
        generate(model, [1, 2], 5, temperature=temperature)
