"""Streamed reading (data/readers.py): a long text is cut into pieces only where the tokens do not change."""

import hashlib
import inspect
import json
from collections import Counter

import numpy as np
import pytest

from flowtrain.data.corpora import Corpus
from flowtrain.data.readers import jsonl_documents, safe_cut, text_pieces, valid_text
from flowtrain.data.tokenizers import BPETokenizer, CharTokenizer
from flowtrain.errors import DataError
from tests.conftest import corpus_text


def _mixed_text() -> str:
    """Prose, indented code, CRLF lines, tabs, runs of blank lines, no-break spaces, CJK and emoji."""
    code = inspect.getsource(json.encoder)
    crlf = "first line\r\nsecond  line\r\n\r\n\tindented\r\nend"
    odd = "a\u00a0b  \u3000 中文\n\n\n  😀 x\x0cy\x1fz \u2028 w"
    return "\n".join([corpus_text(20_000), code, crlf, odd] * 2)


def test_pieces_join_to_the_file_and_are_bounded(tmp_path):
    text = _mixed_text()
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8", newline="")
    hasher = hashlib.sha256()
    pieces = list(text_pieces(path, hasher, piece_bytes=300))
    assert "".join(p.text for p in pieces) == text
    assert hasher.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.end for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert len(pieces) > len(text.encode()) // 600
    assert max(len(p.text.encode()) for p in pieces[:-1]) < 600  # a block and what was left of the last one


def test_byte_level_bpe_gives_the_same_tokens_in_pieces_as_whole(tmp_path):
    text = _mixed_text()
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8", newline="")
    pieces = [p.text for p in text_pieces(path, hashlib.sha256(), piece_bytes=64)]
    bpe = BPETokenizer.train(iter([text]), 600)
    assert bpe.piecewise
    whole = bpe.encode_array(text)
    assert np.array_equal(np.concatenate(bpe.encode_many(pieces)), whole)
    trained_on_pieces = BPETokenizer.train(iter(pieces), 600)  # the same pre-tokens, so the same merges
    assert trained_on_pieces.fingerprint == bpe.fingerprint
    char = CharTokenizer.train([text])
    assert np.array_equal(np.concatenate(char.encode_many(pieces)), char.encode_array(text))


@pytest.mark.parametrize(
    ("text", "cut"),
    [
        ("ab cd", 2),  # before the space: " cd" stays one pre-token
        ("ab   cd", 4),  # before the last space of the run
        ("ab\r\ncd", 3),  # between \r and \n
        ("ab\u00a0 cd", None),  # the run is longer than its ASCII part: not cut
        ("ab cd ", 2),  # a run at the end is no place to cut
        ("abcd", None),
    ],
)
def test_where_a_text_may_be_cut(text, cut):
    assert safe_cut(text.encode()) == cut


def test_a_tokenizer_that_splits_otherwise_sees_whole_documents():
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Metaspace()  # prepends a marker to the start of every text
    hf.add_special_tokens(["<|endoftext|>"])
    assert not BPETokenizer(hf).piecewise


def test_streamed_errors_name_the_byte_offset_past_the_first_piece(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"word " * 1000 + b"\xff tail")
    with pytest.raises(DataError, match=r"bad.txt is not valid UTF-8 \(byte offset 5000\)"):
        list(text_pieces(path, hashlib.sha256(), piece_bytes=256))
    assert valid_text(path) == "undecodable"
    (tmp_path / "blob").write_bytes(b"\0\1")
    (tmp_path / "empty").write_bytes(b"")
    assert [valid_text(tmp_path / n) for n in ("blob", "empty")] == ["binary", "empty"]


def test_jsonl_is_read_a_line_at_a_time_with_file_offsets(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "one"}\n{"text": "two\xe2\x80\xa8three"}\n{"text": "\xff"}\n')  # a raw U+2028 inside
    pieces = jsonl_documents(path, "text", hashlib.sha256(), Counter())
    assert next(pieces).text == "one" and next(pieces).text == "two\u2028three"
    with pytest.raises(DataError, match=r"d.jsonl is not valid UTF-8 \(byte offset 50\)"):
        next(pieces)


def test_a_long_file_is_one_document(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("word " * 50_000, encoding="utf-8")
    corpus = Corpus([str(path)])
    assert len(list(corpus.pieces())) > 1
    assert list(corpus.documents()) == ["word " * 50_000]
