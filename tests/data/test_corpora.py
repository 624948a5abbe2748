import hashlib
import json
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flowtrain.data.corpora import Corpus, DirectorySource, StdlibSource
from flowtrain.data.hf_disk import HFDiskSource
from flowtrain.errors import DataError


def test_stdlib_is_every_py_file_sorted_without_site_packages():
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    src = StdlibSource()
    rels = [p.relative_to(root).as_posix() for p in src.files]
    assert rels == sorted(rels)
    assert not any("site-packages" in r for r in rels)
    assert "os.py" in rels and "json/__init__.py" in rels
    expected = {p.relative_to(root).as_posix() for p in root.rglob("*.py") if "site-packages" not in p.parts}
    assert set(rels) == expected - {r for r in expected if "__pycache__" in r}


def test_python_docs_is_one_document_per_topic():
    from pydoc_data.topics import topics

    corpus = Corpus(["python-docs"])
    docs = list(corpus.documents())
    assert docs == [topics[k] for k in sorted(topics) if topics[k]]
    assert corpus.content_hashes["python-docs"]


def test_text_file_is_one_document_and_hashed(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("héllo\nworld\n", encoding="utf-8")
    corpus = Corpus([str(f)])
    assert list(corpus.documents()) == ["héllo\nworld\n"]
    assert corpus.content_hashes[str(f)] == hashlib.sha256(f.read_bytes()).hexdigest()


def test_missing_path_names_it(tmp_path):
    with pytest.raises(DataError, match="nope.txt.*does not exist"):
        Corpus([str(tmp_path / "nope.txt")])


def test_non_utf8_file_names_file_and_byte_offset(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"abc\xe9def")
    with pytest.raises(DataError, match=r"latin1.txt is not valid UTF-8 \(byte offset 3\)"):
        list(Corpus([str(f)]).documents())


def test_directory_recursive_globs_and_skips(tmp_path):
    root = tmp_path / "tree"
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "a.py").write_text("A")
    (root / "sub" / "b.py").write_text("B")
    (root / "sub" / "deep" / "c.py").write_text("C")
    (root / "sub" / "notes.md").write_text("M")
    (root / "sub" / "skip_me.py").write_text("S")
    (root / "blob.py").write_bytes(b"\x00\x01binary")
    (root / "bad.py").write_bytes(b"\xff\xfe oops")
    (root / "empty.py").write_text("")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "h.py").write_text("H")
    corpus = Corpus([str(root)], include=["*.py"], exclude=["sub/skip_*"])
    assert isinstance(corpus.sources[0], DirectorySource)
    assert list(corpus.documents()) == ["A", "B", "C"]
    assert corpus.skipped == {"binary": 1, "undecodable": 1, "empty": 1}


def test_jsonl_documents_and_missing_field(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "one"}\n\n{"text": "two", "x": 1}\n{"text": ""}\n', encoding="utf-8")
    corpus = Corpus([str(good)])
    assert list(corpus.documents()) == ["one", "two"] and corpus.skipped["empty"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(DataError, match="bad.jsonl line 2 has no field 'text'"):
        list(Corpus([str(bad)]).documents())
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "one"}\n{"text": \n')
    with pytest.raises(DataError, match="broken.jsonl line 2 is not valid JSON"):
        list(Corpus([str(broken)]).documents())


def test_jsonl_custom_text_field(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"body": "x"}) + "\n")
    assert list(Corpus([str(f)], text_field="body").documents()) == ["x"]


def test_parquet_documents_and_missing_column(tmp_path):
    f = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a", None, "bc"], "n": [1, 2, 3]}), f, row_group_size=2)
    corpus = Corpus([str(f)])
    assert list(corpus.documents()) == ["a", "bc"] and corpus.skipped["empty"] == 1
    with pytest.raises(DataError, match="t.parquet has no column 'body' \\(columns: text, n\\)"):
        list(Corpus([str(f)], text_field="body").documents())


def _save_like_hf(root: Path, texts: list[str]) -> None:
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow IPC stream files listed in state.json."""
    root.mkdir(parents=True)
    table = pa.table({"text": texts, "id": list(range(len(texts)))})
    half = len(texts) // 2
    names = []
    for i, part in enumerate([table.slice(0, half), table.slice(half)]):
        name = f"data-0000{i}-of-00002.arrow"
        with pa.OSFile(str(root / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(part)
        names.append({"filename": name})
    (root / "state.json").write_text(json.dumps({"_data_files": names, "_split": "train"}))
    (root / "dataset_info.json").write_text("{}")


def test_hf_save_to_disk_directory(tmp_path):
    _save_like_hf(tmp_path / "hf", ["x", "yy", "zzz"])
    corpus = Corpus([str(tmp_path / "hf")])
    assert isinstance(corpus.sources[0], HFDiskSource)
    assert list(corpus.documents()) == ["x", "yy", "zzz"]
    with pytest.raises(DataError, match="has no column 'body'"):
        list(Corpus([str(tmp_path / "hf")], text_field="body").documents())


def test_hf_dataset_dict_directory(tmp_path):
    _save_like_hf(tmp_path / "dd" / "train", ["a", "b"])
    _save_like_hf(tmp_path / "dd" / "test", ["c", "d"])
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    corpus = Corpus([str(tmp_path / "dd")])  # flowtrain has no test split: it is not used (and not trained on)
    assert list(corpus.documents()) == ["a", "b"]
    assert corpus.predefined_splits() == {str(tmp_path / "dd"): {"train": "train", "val": None, "unused": ["test"]}}


def test_identity_changes_when_a_file_changes(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one")
    before = Corpus([str(f)]).identity()
    f.write_text("one more")
    assert Corpus([str(f)]).identity() != before
