import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowtrain.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    load_tokenizer_file,
    tokenizer_from_json,
)
from flowtrain.errors import DataError

from .conftest import make_docs


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(iter(make_docs(200) * 3), vocab_size=300)


def test_byte_ids_are_utf8_bytes():
    tok = ByteTokenizer()
    text = "aé€😀"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert (tok.vocab_size, tok.eot_id, tok.pad_id) == (258, 256, 257)
    assert tok.decode(tok.encode(text) + [tok.eot_id, tok.pad_id]) == text


def test_byte_decode_of_partial_character_replaces():
    tok = ByteTokenizer()
    ids = tok.encode("a€")[:-1]  # cut inside the 3-byte euro sign
    assert tok.decode(ids) == "a\ufffd"


def test_char_vocab_is_sorted_distinct_chars_plus_eot():
    tok = CharTokenizer.train(["hello", "world!"])
    chars = sorted(set("helloworld!"))
    assert tok.chars == "".join(chars)
    assert tok.vocab_size == len(chars) + 1 and tok.eot_id == len(chars)
    assert tok.encode("low") == [chars.index(c) for c in "low"]
    assert tok.decode(tok.encode("hello world!".replace(" ", ""))) == "helloworld!"


def test_char_unknown_character_is_a_data_error():
    tok = CharTokenizer.train(["abc"])
    with pytest.raises(DataError, match="'z'"):
        tok.encode("abz")


@pytest.mark.parametrize("tok", [ByteTokenizer(), CharTokenizer.train(["héllo wörld"])])
def test_json_round_trip_and_fingerprint(tok):
    again = tokenizer_from_json(tok.to_json())
    assert type(again) is type(tok)
    assert again.fingerprint == tok.fingerprint
    assert again.encode("héllo") == tok.encode("héllo")
    assert json.loads(tok.to_json())["kind"] == tok.kind


def test_fingerprints_differ_between_tokenizers():
    prints = {
        ByteTokenizer().fingerprint,
        CharTokenizer.train(["ab"]).fingerprint,
        CharTokenizer.train(["abc"]).fingerprint,
    }
    assert len(prints) == 3


def test_bpe_specials_vocab_and_reload(bpe, tmp_path):
    assert bpe.vocab_size == 300
    assert bpe.eot_id is not None and bpe.pad_id is not None and bpe.eot_id != bpe.pad_id
    text = "doc 7: héllo wörld héllo"
    ids = bpe.encode(text)
    assert len(ids) < len(text.encode("utf-8"))  # merges learned
    assert bpe.decode(ids + [bpe.eot_id]) == text
    path = tmp_path / "tokenizer.json"
    path.write_text(bpe.to_json(), encoding="utf-8")
    again = load_tokenizer_file(str(path))
    assert again.fingerprint == bpe.fingerprint and again.encode(text) == ids
    many = bpe.encode_many([text, "end 3\n"])
    assert [m.tolist() for m in many] == [ids, bpe.encode("end 3\n")]


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "does not parse"),
        ("[1, 2]", "not a tokenizer"),
        ('{"model": {"type": "Nope"}}', "not a valid"),
        ('{"flowtrain_tokenizer": 1, "kind": "wat"}', "unknown"),
    ],
)
def test_bad_tokenizer_json_is_a_data_error(tmp_path, text, match):
    path = tmp_path / "tokenizer.json"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        load_tokenizer_file(str(path))


def test_missing_tokenizer_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer_file(str(tmp_path / "nope.json"))


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_round_trip_any_text(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text
    assert np.array_equal(tok.encode_array(text), np.frombuffer(text.encode("utf-8"), np.uint8))


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trip_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text
