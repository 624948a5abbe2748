"""transformers → flowtrain: random tiny GPT-2 and Llama models saved with save_pretrained, read back into
flowtrain's GPT; transformers' forward pass is the independent computation. And the round trip."""

from __future__ import annotations

import json

import pytest
import torch

from flowtrain.data.tokenizers import BPETokenizer
from flowtrain.errors import InteropError
from flowtrain.interop.source import open_source
from flowtrain.model.config import ModelConfig
from flowtrain.model.gpt import GPT
from flowtrain.train.load import load_trained
from tests.interop.conftest import HF_VOCAB, save_hf_model, train_run, transformers


def flowtrain_model(path, **choices) -> tuple[GPT, object]:
    """flowtrain's GPT of an init_from source, as a run with these model choices would build it."""
    source = open_source(path)
    fields = {"block_size": source.positions, **source.fields, **choices}
    model = GPT(ModelConfig(**fields)).eval()
    source.load_into(model)
    return model, source


def compare(theirs: torch.nn.Module, ours: GPT, n: int = 64) -> float:
    ids = torch.randint(0, HF_VOCAB, (2, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids), theirs(input_ids=ids).logits
    return (a - b).abs().max().item()


@pytest.mark.parametrize("activation", ["gelu_new", "gelu", "relu"])
def test_a_transformers_gpt2_gives_flowtrain_the_same_logits(activation, tmp_path):
    theirs = save_hf_model("gpt2", tmp_path / "gpt2", activation_function=activation)
    ours, source = flowtrain_model(tmp_path / "gpt2")
    assert source.fields["bias"] and source.fields["tie_embeddings"]  # GPT-2 has (here nonzero) biases
    assert source.fields["activation"] == {"gelu_new": "gelu_tanh"}.get(activation, activation)
    diff = compare(theirs, ours)
    print(f"gpt2 ({activation}) → flowtrain: max |logit difference| {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("extra", [{}, {"tie_word_embeddings": True, "attention_bias": True, "rope_theta": 500.0}])
def test_a_transformers_llama_gives_flowtrain_the_same_logits(extra, tmp_path):
    theirs = save_hf_model("llama", tmp_path / "llama", **extra)
    ours, source = flowtrain_model(tmp_path / "llama")
    assert source.fields["mlp_hidden"] == 44  # 44 is no mlp_ratio's SwiGLU width (multiples of 8)
    assert source.fields["bias"] == bool(extra) and source.fields["tie_embeddings"] == bool(extra)
    # Llama's end-of-text token is </s>: the tokenizer keeps it, in flowtrain's wrapper of tokenizer.json
    assert isinstance(source.tokenizer, BPETokenizer) and source.tokenizer.eot_text == "</s>"
    diff = compare(theirs, ours)
    print(f"llama {extra} → flowtrain: max |logit difference| {diff:.2e}")
    assert diff <= 1e-5


def test_a_shorter_context_and_the_allowed_choices_keep_the_function(tmp_path):
    """block_size below the source's table cuts it; bias=true (zero biases) and an untied head start equal."""
    theirs = save_hf_model("llama", tmp_path / "llama", tie_word_embeddings=True)
    ours, _ = flowtrain_model(tmp_path / "llama", block_size=16, bias=True, tie_embeddings=False)
    assert compare(theirs, ours, n=16) <= 1e-5
    theirs = save_hf_model("gpt2", tmp_path / "gpt2")
    ours, _ = flowtrain_model(tmp_path / "gpt2", block_size=16, tie_embeddings=False)
    assert ours.pos_emb.weight.shape[0] == 16 and compare(theirs, ours, n=16) <= 1e-5


def test_sharded_safetensors_are_followed(tmp_path):
    theirs = save_hf_model("gpt2", tmp_path / "gpt2")
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "sharded" / name).write_bytes((tmp_path / "gpt2" / name).read_bytes())
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours, _ = flowtrain_model(tmp_path / "sharded")
    assert compare(theirs, ours) <= 1e-5


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_round_trip_flowtrain_transformers_flowtrain_is_exact(layout, tmp_path, small_text):
    from flowtrain import cli

    extra = ["model.pos_encoding=rope", "model.norm=rmsnorm", "model.activation=swiglu"] if layout == "llama" else []
    run = train_run(tmp_path, small_text, layout, "data.tokenizer=bpe", "data.bpe_vocab_size=300", *extra, steps=2)
    assert cli.main(["export", str(run), "-o", str(tmp_path / "hf")]) == 0
    original = load_trained(run)
    again, source = flowtrain_model(tmp_path / "hf")
    assert again.cfg.model_dump(exclude={"init_from"}) == original.model.cfg.model_dump(exclude={"init_from"})
    for (name, a), (_, b) in zip(original.model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert source.tokenizer.fingerprint == original.tokenizer.fingerprint  # the very tokenizer: same data cache


def test_char_tokenizer_comes_back_as_itself(tmp_path, small_text):
    from flowtrain import cli

    run = train_run(tmp_path, small_text, "char", steps=2)
    assert cli.main(["export", str(run), "-o", str(tmp_path / "hf")]) == 0
    source = open_source(tmp_path / "hf")
    assert source.tokenizer.kind == "char"
    assert source.tokenizer.fingerprint == load_trained(run).tokenizer.fingerprint
    assert not source.fields["bias"]  # GPT-2's zero biases are flowtrain's "no biases"


def test_pickle_only_directories_are_refused(tmp_path):
    model = save_hf_model("gpt2", tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # what flowtrain must never unpickle
    with pytest.raises(InteropError, match=r"only as pickle \(pytorch_model.bin\).*safetensors"):
        open_source(tmp_path / "bin")


REFUSED = {
    "gqa": ("llama", {"num_key_value_heads": 1}, "num_key_value_heads=1"),
    "act": ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    "rope-scaling": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "linear"),
    "inverse-layer": ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_flowtrain_cannot_compute_is_refused_naming_it(name, tmp_path):
    family, config, named = REFUSED[name]
    save_hf_model(family, tmp_path / "m", **config)
    with pytest.raises(InteropError) as err:
        open_source(tmp_path / "m")
    assert named in str(err.value) and "\n" not in str(err.value)


def test_other_model_types_and_foreign_tensors_are_refused(tmp_path):
    save_hf_model("gpt2", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(InteropError, match="model_type='bert'; flowtrain imports the gpt2 and llama"):
        open_source(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "n_layer": 1}))
    with pytest.raises(InteropError, match=r"transformer\.h\.1\..*no place for"):
        open_source(tmp_path / "m").state_dict(ModelConfig(**{**open_source(tmp_path / "m").fields, "block_size": 8}))
    assert transformers  # the fixture module's import (skips without transformers)


@pytest.mark.parametrize(
    "config, named",
    [({"n_embd": 30, "n_head": 4}, "n_embd=30 is not divisible by n_head=4"), ({"n_embd": "big"}, "wrong type")],
)
def test_a_config_json_flowtrain_cannot_build_is_one_line(config, named, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2", **config}))
    with pytest.raises(InteropError, match=named) as err:
        open_source(tmp_path / "m")
    assert "\n" not in str(err.value)
