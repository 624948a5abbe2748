"""Tiny models on both sides, built from configs with random weights (no hub): flowtrain runs trained for a few
steps, and transformers GPT-2 / Llama models with a BPE tokenizer of their own, saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowtrain import cli
from tests.conftest import corpus_text, tiny_overrides

transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency: pip install -e '.[dev]'")

HF_VOCAB = 320
# the special tokens each family's tokenizer has (GPT-2: one end-of-text; Llama: <unk>, <s>, </s>)
FAMILY_SPECIALS = {
    "gpt2": {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"},
    "llama": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
}


def train_run(tmp_path: Path, text: Path, name: str, *extra: str, steps: int = 4) -> Path:
    """A tiny flowtrain run (2 layers, width 32, char tokens unless `extra` says otherwise) of `steps` steps."""
    over = tiny_overrides(
        text,
        tmp_path,
        **{
            "train.run_name": name,
            "train.max_steps": steps,
            "train.eval_interval": steps,
            "train.checkpoint_interval": steps,
            "schedule.warmup_steps": 1,
            "train.sample_tokens": 0,
        },
    )
    assert cli.main(["train", *over, *extra]) == 0
    return tmp_path / "runs" / name


def save_tokenizer(family: str, out: Path) -> object:
    """A byte-level BPE trained on the test corpus with the family's special tokens, saved for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(dict.fromkeys(FAMILY_SPECIALS[family].values()))
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=HF_VOCAB,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator([corpus_text()], trainer=trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, **FAMILY_SPECIALS[family])
    tok.save_pretrained(out)
    return tok


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Non-trivial values everywhere (norm gains, biases are 1 and 0 after init), so every term shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def save_hf_model(family: str, out: Path, **config: object) -> torch.nn.Module:
    """A random tiny GPT2LMHeadModel or LlamaForCausalLM (2 layers, width 32) and its tokenizer, in `out`."""
    torch.manual_seed(0)
    tok = save_tokenizer(family, out)
    ids = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=2,
            n_head=2,
            n_embd=32,
            n_positions=64,
            vocab_size=HF_VOCAB,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
            **config,
        )
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(
            num_hidden_layers=2,
            num_attention_heads=2,
            hidden_size=32,
            intermediate_size=44,
            max_position_embeddings=64,
            vocab_size=HF_VOCAB,
            **ids,
            **config,
        )
        model = transformers.LlamaForCausalLM(cfg)
    perturb(model)
    model.eval()
    model.save_pretrained(out)  # safetensors (transformers >= 5 writes nothing else)
    assert (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file()
    return model
