"""tokenizer.json equivalents of the char and byte tokenizers, and tokenizers read from transformers directories.
The `tokenizers` library's own encoder is the independent computation; transformers is not needed here."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer

from flowtrain.data.config import DataConfig
from flowtrain.data.hf_tokenizers import byte_alphabet, byte_tokenizer_json, char_tokenizer_json, load_tokenizer_dir
from flowtrain.data.prepare import cache_key, prepare_dataset
from flowtrain.data.tokenizers import (
    EOT_TEXT,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    load_tokenizer_file,
    tokenizer_from_json,
)
from flowtrain.errors import DataError
from tests.conftest import corpus_text

TEXT = corpus_text(20_000) + "héllo wörld ✓ 日本語 \t\x00\x7f"


def test_byte_alphabet_is_gpt2s_printable_stand_ins():
    alphabet = byte_alphabet()
    assert len(set(alphabet)) == 256 and alphabet[ord("A")] == "A" and alphabet[ord(" ")] == "Ġ"
    assert alphabet[ord("\n")] == "Ċ" and sorted(alphabet) == sorted(
        __import__("tokenizers").pre_tokenizers.ByteLevel.alphabet()
    )


@pytest.mark.parametrize("kind", ["byte", "char"])
def test_equivalents_give_the_same_ids_and_text_and_come_back_as_themselves(kind):
    ours = ByteTokenizer() if kind == "byte" else CharTokenizer.train([TEXT])
    text_json = byte_tokenizer_json() if kind == "byte" else char_tokenizer_json(ours.chars)
    hf = HFTokenizer.from_str(text_json)
    ids = ours.encode(TEXT)
    assert hf.encode(TEXT, add_special_tokens=False).ids == ids
    assert hf.decode(ids) == TEXT == ours.decode(ids)
    assert hf.token_to_id(EOT_TEXT) == ours.eot_id and hf.get_vocab_size() == ours.vocab_size
    back = tokenizer_from_json(text_json)
    assert type(back) is type(ours) and back.fingerprint == ours.fingerprint


def test_a_tokenizer_with_another_end_of_text_keeps_it_in_flowtrains_wrapper():
    base = BPETokenizer.train(iter([TEXT]), 300)
    hf = HFTokenizer.from_str(base.hf_json)
    llama_like = BPETokenizer(hf, eot_text="<|pad|>", pad_text=None)
    wrapped = json.loads(llama_like.to_json())
    assert wrapped["eot"] == "<|pad|>" and wrapped["tokenizer"] == json.loads(base.hf_json)
    back = tokenizer_from_json(llama_like.to_json())
    assert (back.eot_id, back.pad_id, back.fingerprint) == (1, None, llama_like.fingerprint)
    assert base.to_json() == base.hf_json  # flowtrain's own BPE stays Hugging Face's file, unchanged


def save_dir(path, tokenizer_config: dict | None, hf_json: str):
    path.mkdir()
    (path / "tokenizer.json").write_text(hf_json)
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


def test_a_transformers_directory_names_its_end_of_text(tmp_path):
    base = BPETokenizer.train(iter([TEXT]), 300)
    d = save_dir(tmp_path / "a", {"eos_token": {"content": "<|pad|>"}, "pad_token": "<|pad|>"}, base.hf_json)
    tok = load_tokenizer_file(str(d))
    assert (tok.eot_text, tok.pad_id) == ("<|pad|>", None)  # a pad that is the end-of-text token counts as none
    d = save_dir(tmp_path / "b", None, base.hf_json)
    (d / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert load_tokenizer_file(str(d)).fingerprint == base.fingerprint
    d = save_dir(tmp_path / "c", {"eos_token": "</s>"}, base.hf_json)
    with pytest.raises(DataError, match="names no end-of-text token"):
        load_tokenizer_dir(d)
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match=r"no tokenizer.json .*save_pretrained"):
        load_tokenizer_dir(tmp_path / "d")


def test_prepare_with_a_transformers_directory_keys_the_cache_by_the_tokenizer(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    base = BPETokenizer.train(iter([TEXT]), 300)
    d = save_dir(tmp_path / "tok", {"eos_token": "<|endoftext|>"}, base.hf_json)
    cfg = DataConfig(sources=[str(tmp_path / "t.txt")], tokenizer_path=str(d), split_by="tokens")
    key = cache_key(cfg)
    out = prepare_dataset(cfg, tmp_path / "ds", progress=False)
    assert json.loads((out / "meta.json").read_text())["tokenizer"]["fingerprint"] == base.fingerprint
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|pad|>"}))  # another end-of-text token
    assert cache_key(cfg) != key
