"""Text generation from a GPT with a KV cache: temperature, top-k, top-p (nucleus), greedy at temperature 0.

The prompt is run once (prefill); afterwards each new token is one position through the model, reusing the
cached keys/values. The model is never shown more than block_size tokens, the context it was trained on:
once prompt + generated tokens fill block_size, generation falls back to a sliding window, re-running the
last block_size tokens from scratch for every further token. (Shifting the cache instead would be cheaper
but wrong: cached keys of the remaining tokens were computed while the dropped tokens were still visible.)
This is exact for both learned and rotary positions. Sampling draws from a local torch.Generator seeded with
`seed`, so the same seed gives the same text regardless of the global RNG state.
"""

from __future__ import annotations

import torch

from flowtrain.errors import ConfigError, DivergedError
from flowtrain.model.gpt import GPT


def restrict_logits(logits: torch.Tensor, *, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the sampling support to -inf (last dim is the vocabulary).

    top_k keeps the k largest logits (ties with the k-th are kept too); top_p then keeps the smallest set of
    most likely tokens whose probability reaches top_p (the most likely token is always kept).
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _check_args(prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k, top_p, vocab) -> None:
    if not prompt_ids:
        raise ConfigError("the prompt is empty; start generation from at least one token (e.g. the eot id)")
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise ConfigError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab}); re-encode the prompt")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens} is negative; ask for 0 or more tokens")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} is negative; use 0 (greedy) or a positive value")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k={top_k} keeps no tokens; use top_k >= 1 or leave it unset")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} is outside (0, 1]; use e.g. 0.9 or leave it unset")


def generate(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int | None = None,
) -> list[int]:
    """Continue prompt_ids by up to max_new_tokens tokens and return only the new ids.

    Stops early after emitting eos_id (which is included). temperature=0 is greedy (top_k/top_p unused).
    The model runs in eval mode under torch.no_grad; its previous train/eval mode is restored afterwards.
    """
    cfg = model.cfg
    _check_args(prompt_ids, max_new_tokens, temperature, top_k, top_p, cfg.vocab_size)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    window = cfg.block_size
    tokens = list(prompt_ids)
    new: list[int] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cache = model.new_kv_cache(window)

            def run(ids: list[int]) -> torch.Tensor:
                return model(torch.tensor([ids], dtype=torch.long, device=device), kv_cache=cache)[0, -1]

            logits = run(tokens[-window:])
            while len(new) < max_new_tokens:
                token = _pick(logits, temperature, top_k, top_p, generator)
                new.append(token)
                tokens.append(token)
                if token == eos_id or len(new) == max_new_tokens:
                    break
                if cache.length < window:
                    logits = run([token])
                else:  # context full: sliding window, recomputed from scratch
                    cache.reset()
                    logits = run(tokens[-window:])
    finally:
        model.train(was_training)
    return new


def _pick(logits: torch.Tensor, temperature: float, top_k, top_p, generator: torch.Generator) -> int:
    if not bool(torch.isfinite(logits).all()):  # NaN weights would pick garbage (greedy) or crash multinomial
        raise DivergedError(
            "the model's logits are not finite (its weights diverged to NaN or inf); sample an earlier checkpoint "
            "(--checkpoint STEP) or retrain with a lower optim.lr"
        )
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = restrict_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    probs = logits.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
