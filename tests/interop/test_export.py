"""flowtrain export: transformers' own forward pass on the written directory is the independent computation."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest
import torch

from flowtrain import cli
from flowtrain.errors import InteropError
from flowtrain.interop.export import EXPORT_FILES
from flowtrain.interop.layouts import layout_of
from flowtrain.model.config import ModelConfig
from flowtrain.sample import generate
from flowtrain.train.load import load_trained
from tests.interop.conftest import perturb, train_run, transformers

LLAMA_LIKE = ["model.pos_encoding=rope", "model.norm=rmsnorm", "model.activation=swiglu"]
VARIANTS = {
    "gpt2": [],
    "gpt2-bias-untied-relu": ["model.bias=true", "model.tie_embeddings=false", "model.activation=relu"],
    "gpt2-gelu_tanh-width": ["model.activation=gelu_tanh", "model.mlp_ratio=3", "model.norm_eps=1e-6"],
    "llama": LLAMA_LIKE,
    "llama-bias-untied-theta": [*LLAMA_LIKE, "model.bias=true", "model.tie_embeddings=false", "model.rope_theta=500"],
}


def export(run, out, *extra: str) -> int:
    return cli.main(["export", str(run), "-o", str(out), *extra])


def hf_logits(directory, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_computes_the_logits_flowtrain_does(name, tmp_path, small_text, capsys):
    run = train_run(tmp_path, small_text, name, *VARIANTS[name])
    assert export(run, tmp_path / "hf", "--verify") == 0
    out = capsys.readouterr().out
    assert "verified" in out and ("LlamaForCausalLM" if name.startswith("llama") else "GPT2LMHeadModel") in out
    assert {p.name for p in (tmp_path / "hf").iterdir()} == EXPORT_FILES
    loaded = load_trained(run)
    ids = torch.randint(0, loaded.tokenizer.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = loaded.model(ids)
    theirs = hf_logits(tmp_path / "hf", ids)
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: max |logit difference| {diff:.2e} (logits up to {ours.abs().max():.2f})")
    assert diff <= 1e-5


def test_a_perturbed_model_exports_exactly_too(tmp_path, small_text):
    """Non-trivial norm gains and biases in both layouts (a 4-step run leaves them near 1 and 0)."""
    from safetensors.torch import save_file

    from flowtrain.fsutil import atomic_directory
    from flowtrain.interop.layouts import Specials, hf_config
    from flowtrain.interop.weights import to_hf
    from flowtrain.model.gpt import GPT

    ids = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(1))
    for over in ({"bias": True}, {"pos_encoding": "rope", "norm": "rmsnorm", "activation": "swiglu", "bias": True}):
        torch.manual_seed(0)
        cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=50, **over)
        model = GPT(cfg).eval()
        perturb(model, scale=0.3)
        layout = layout_of(cfg)
        with atomic_directory(tmp_path / layout) as tmp:
            save_file(to_hf(model.state_dict(), cfg, layout), str(tmp / "model.safetensors"), {"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(hf_config(cfg, layout, Specials(49, None))))
        with torch.no_grad():
            ours = model(ids)
        diff = (ours - hf_logits(tmp_path / layout, ids)).abs().max().item()
        print(f"{layout} perturbed: max |logit difference| {diff:.2e} (logits up to {ours.abs().max():.2f})")
        assert diff <= 1e-5


def test_generate_with_the_exported_tokenizer_matches_flowtrain(tmp_path, small_text):
    """AutoTokenizer + AutoModelForCausalLM.generate (greedy, transformers' KV cache) against flowtrain's."""
    run = train_run(tmp_path, small_text, "bpe", "data.tokenizer=bpe", "data.bpe_vocab_size=300", steps=20)
    assert export(run, tmp_path / "hf") == 0
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    loaded = load_trained(run)
    prompt = "The value of the"
    ours_ids = loaded.tokenizer.encode(prompt)
    assert tok(prompt)["input_ids"] == ours_ids
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (loaded.tokenizer.eot_id,) * 2 + (
        loaded.tokenizer.pad_id,
    )
    with torch.no_grad():
        out = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=12, do_sample=False)
    theirs = out[0, len(ours_ids) :].tolist()
    ours = generate(loaded.model, ours_ids, 12, temperature=0, eos_id=loaded.tokenizer.eot_id)
    assert theirs[: len(ours)] == ours
    assert tok.decode(theirs[: len(ours)], skip_special_tokens=True) == loaded.tokenizer.decode(ours)


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_char_and_byte_tokenizers_export_as_equivalent_fast_tokenizers(kind, tmp_path, small_text):
    run = train_run(tmp_path, small_text, kind, f"data.tokenizer={kind}", steps=2)
    assert export(run, tmp_path / "hf") == 0
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ours = load_trained(run).tokenizer
    text = small_text.read_text()[:5000]
    assert tok(text)["input_ids"] == ours.encode(text)
    assert tok.decode(ours.encode(text)) == text
    assert tok.eos_token_id == tok.bos_token_id == ours.eot_id
    assert tok.pad_token_id == (ours.pad_id if ours.pad_id is not None else ours.eot_id)


CANNOT = {
    "norm_placement": ({"norm_placement": "post"}, "model.norm_placement=post"),
    "none": ({"norm_placement": "none"}, "model.norm_placement=none"),
    "residual": ({"residual": False}, "model.residual=false"),
    "qk_norm": ({"qk_norm": True}, "model.qk_norm=true"),
    "learned-rms": ({"norm": "rmsnorm"}, "model.norm=rmsnorm"),
    "learned-swiglu": ({"activation": "swiglu"}, "model.activation=swiglu"),
    "rope-layernorm": ({"pos_encoding": "rope", "activation": "swiglu"}, "model.norm=layernorm"),
    "rope-gelu": ({"pos_encoding": "rope", "norm": "rmsnorm"}, "model.activation=gelu"),
    "rope-relu": ({"pos_encoding": "rope", "norm": "rmsnorm", "activation": "relu"}, "model.activation=relu"),
}


@pytest.mark.parametrize("name", list(CANNOT))
def test_configs_neither_layout_represents_are_refused_naming_the_option(name):
    over, named = CANNOT[name]
    with pytest.raises(InteropError) as err:
        layout_of(ModelConfig(**over))
    assert named in str(err.value) and "\n" not in str(err.value)


def test_a_refused_export_is_one_line_exit_2_and_leaves_nothing(tmp_path, small_text, capsys):
    run = train_run(tmp_path, small_text, "post", "model.norm_placement=post", steps=2)
    capsys.readouterr()
    assert export(run, tmp_path / "hf") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flowtrain: error: cannot export model.norm_placement=post")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))


def test_export_replaces_an_export_but_not_a_foreign_directory(tmp_path, small_text, capsys):
    run = train_run(tmp_path, small_text, "a", steps=2)
    assert export(run, tmp_path / "hf") == 0
    assert export(run, tmp_path / "hf", "--checkpoint", "2") == 0  # an export is replaced whole
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert export(run, tmp_path / "mine") == 2
    assert "is not an exported model directory" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_verify_without_transformers_is_one_line(tmp_path, small_text, capsys, monkeypatch):
    run = train_run(tmp_path, small_text, "a", steps=2)
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an environment without it looks like
    capsys.readouterr()
    assert export(run, tmp_path / "hf", "--verify") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install transformers" in err
    assert not (tmp_path / "hf").exists()


def test_llama_export_notes_the_dropout_it_cannot_carry(tmp_path, small_text, capsys):
    run = train_run(tmp_path, small_text, "drop", *LLAMA_LIKE, "model.resid_dropout=0.1", steps=2)
    capsys.readouterr()
    assert export(run, tmp_path / "hf") == 0
    assert "model.resid_dropout=0.1 is not carried over" in capsys.readouterr().err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["attention_dropout"] == 0.0


def test_a_diverged_checkpoint_is_refused(tmp_path, small_text, capsys):
    run = train_run(tmp_path, small_text, "nan", "optim.lr=1e30", "guard.enabled=false", steps=2)
    capsys.readouterr()
    assert export(run, tmp_path / "hf") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "non-finite weights" in err and "--checkpoint STEP" in err


def test_the_export_follows_the_umask(tmp_path, small_text):
    run = train_run(tmp_path, small_text, "a", steps=2)
    old = os.umask(0o027)
    try:
        assert export(run, tmp_path / "hf") == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "hf").stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()} == {0o640}
