import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flowtrain.data.config import DataConfig
from flowtrain.data.dataset import TokenDataset
from flowtrain.data.prepare import dataset_for, prepare_dataset, token_dtype
from flowtrain.data.tokenizers import ByteTokenizer
from flowtrain.errors import DataError
from tests.conftest import write_corpus

from .conftest import make_docs, prepare


def _split_docs(ds: TokenDataset, split: str) -> list[np.ndarray]:
    starts, lengths = ds.documents(split)
    data = np.asarray(ds.split(split))
    return [data[s : s + n] for s, n in zip(starts, lengths, strict=True)]


def test_document_split_holds_every_document_once(byte_ds):
    docs = make_docs()
    eot = byte_ds.tokenizer.eot_id
    seen = {}
    for split in ("train", "val"):
        for piece in _split_docs(byte_ds, split):
            assert piece[-1] == eot and eot not in piece[:-1]  # each document followed by one EOT
            text = bytes(piece[:-1].astype(np.uint8)).decode("utf-8")
            assert text not in seen, "a document is in both splits"
            seen[text] = split
    assert set(seen) == set(docs)
    assert sum(s == "val" for s in seen.values()) == round(len(docs) * 0.1)
    meta = byte_ds.meta
    assert meta["split"]["split_by"] == "document" and meta["dtype"] == "uint16"
    val_docs = [d for d in docs if seen[d] == "val"]
    assert meta["splits"]["val"]["bytes"] == sum(len(d.encode()) for d in val_docs)
    assert meta["splits"]["val"]["documents"] == len(val_docs)
    total_tokens = sum(len(d.encode()) + 1 for d in docs)
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == total_tokens
    assert byte_ds.bytes_per_token("val") == pytest.approx(
        meta["splits"]["val"]["bytes"] / meta["splits"]["val"]["tokens"]
    )


def test_token_split_is_the_last_fraction_of_the_stream(tmp_path):
    source = write_corpus(tmp_path / "one.txt", 120_000)
    text = source.read_text(encoding="utf-8")
    ds = prepare(tmp_path, [source], tokenizer="char", split_by="auto")
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    ids = np.array([lookup[c] for c in text])
    stream = np.append(ids, len(chars))  # + EOT
    cut = round(len(stream) * 0.9)
    assert ds.meta["split"]["split_by"] == "tokens" and ds.vocab_size == len(chars) + 1
    assert np.array_equal(ds.split("train"), stream[:cut])
    assert np.array_equal(ds.split("val"), stream[cut:])
    counts = ds.meta["splits"]
    assert counts["train"]["bytes"] == len(text[:cut].encode()) and counts["val"]["bytes"] == len(text[cut:].encode())
    assert list(ds.documents("val")[0]) == [0] and list(ds.documents("train")[0]) == [0]


def test_same_input_same_bytes(tmp_path, docs_dir):
    cfg = DataConfig(sources=[str(docs_dir)], tokenizer="char")
    a, b = prepare_dataset(cfg, tmp_path / "a", progress=False), prepare_dataset(cfg, tmp_path / "b", progress=False)
    names = sorted(os.listdir(a))
    assert (
        names
        == sorted(os.listdir(b))
        == sorted(["meta.json", "tokenizer.json", "train.bin", "val.bin", "train_docs.npy", "val_docs.npy"])
    )
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_failed_prepare_leaves_nothing(tmp_path, docs_dir):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff")
    cfg = DataConfig(sources=[str(docs_dir), str(bad)])
    with pytest.raises(DataError, match="bad.txt is not valid UTF-8"):
        prepare_dataset(cfg, tmp_path / "out", progress=False)
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_incomplete_or_truncated_dataset_refuses_to_open(tmp_path, byte_ds):
    half = tmp_path / "half"
    half.mkdir()
    (half / "train.bin").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match="incomplete dataset .*re-run prepare"):
        TokenDataset.open(half)
    train = byte_ds.path / "train.bin"
    train.write_bytes(train.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        TokenDataset.open(byte_ds.path)
    with pytest.raises(DataError, match="does not exist"):
        TokenDataset.open(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", "tokenizer.json is corrupt (not UTF-8 text, byte "),
        (b"{not json", "does not parse as JSON"),
        (b'{"model": {"type": "BPE", "vocab": 3}}', "is not a valid Hugging Face tokenizer"),
    ],
)
def test_a_corrupt_dataset_tokenizer_is_one_line(byte_ds, content, message):
    (byte_ds.path / "tokenizer.json").write_bytes(content)
    with pytest.raises(DataError) as info:
        TokenDataset.open(byte_ds.path)
    assert message in str(info.value) and "\n" not in str(info.value)


def _prepare_under_a_file_size_limit(tmp_path: Path, limit: int) -> subprocess.CompletedProcess:
    """`flowtrain prepare` in a process that may not write files bigger than `limit` bytes: the kernel answers its
    writes as a full disk would (EFBIG here, ENOSPC there), on any machine and without root."""

    def limit_writes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # report EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    text = write_corpus(tmp_path / "big.txt", 120_000)
    cmd = [sys.executable, "-m", "flowtrain", "prepare", str(text), "--tokenizer", "char", "-o", str(tmp_path / "ds")]
    return subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit_writes, timeout=120)


def test_a_full_disk_while_preparing_is_one_line_and_leaves_nothing(tmp_path):
    done = _prepare_under_a_file_size_limit(tmp_path, 50_000)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"flowtrain: error: no space left preparing the dataset {tmp_path / 'ds'} (File too large)")
    assert "it needs up to about 0.5 MB while it is made" in line and "at a larger disk" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt"]  # no dataset, no temporary directory


def test_empty_corpus_is_a_data_error(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "a.txt").write_text("")
    with pytest.raises(DataError, match="hold no documents.*1 empty"):
        prepare_dataset(DataConfig(sources=[str(tmp_path / "e")]), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_token_dtype_choice():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    assert token_dtype(300, "uint32") == np.uint32
    with pytest.raises(DataError, match="does not fit data.token_dtype=uint16"):
        token_dtype(70000, "uint16")


def test_uint32_tokens_when_asked(tmp_path, docs_dir):
    ds = prepare(tmp_path, [docs_dir], token_dtype="uint32")
    assert ds.split("train").dtype == np.uint32
    assert ds.tokenizer.decode(ds.split("train")[:5].tolist()) == make_docs()[0][:5]


def test_dataset_for_caches_and_rekeys(tmp_path, docs_dir):
    cfg = DataConfig(sources=[str(docs_dir)], cache_dir=str(tmp_path / "cache"))
    first = dataset_for(cfg, progress=False)
    stamp = (first / "meta.json").stat().st_mtime_ns
    assert first.parent == tmp_path / "cache" / "datasets"
    assert dataset_for(cfg, progress=False) == first and (first / "meta.json").stat().st_mtime_ns == stamp
    assert dataset_for(cfg.model_copy(update={"tokenizer": "char"}), progress=False) != first
    time.sleep(0.01)
    (docs_dir / "d000.txt").write_text("changed", encoding="utf-8")
    assert dataset_for(cfg, progress=False) != first
    assert dataset_for(DataConfig(dataset=str(first)), progress=False) == first


def test_losing_a_race_keeps_the_complete_dataset(tmp_path, docs_dir):
    cfg = DataConfig(sources=[str(docs_dir)])
    out = prepare_dataset(cfg, tmp_path / "ds", progress=False)
    stamp = (out / "meta.json").stat().st_mtime_ns
    prepare_dataset(cfg.model_copy(update={"tokenizer": "char"}), out, progress=False, replace=False)
    assert (out / "meta.json").stat().st_mtime_ns == stamp and TokenDataset.open(out).tokenizer.kind == "byte"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "ds"]
    prepare_dataset(cfg.model_copy(update={"tokenizer": "char"}), out, progress=False)  # replace=True
    assert TokenDataset.open(out).tokenizer.kind == "char"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "ds"]


def test_what_killed_prepares_left_in_the_cache_goes(tmp_path, docs_dir):
    """A killed prepare leaves its temporary (up to the corpus' size and more); the next use of the cache
    removes those whose writer is dead, and never one a live writer holds."""
    import subprocess
    import sys

    from flowtrain.fsutil import DirectoryLock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    datasets = tmp_path / "cache" / "datasets"
    for name in (f"a.tmp-{dead_pid}", f"b.tmp-{dead_pid}", f"c.tmp-{dead_pid}", f"d.old-{os.getppid()}"):
        (datasets / name).mkdir(parents=True)
        (datasets / name / "all.scratch").write_bytes(b"\0" * 1000)
    (datasets / f"b.tmp-{dead_pid}" / ".lock").write_text("")  # its writer died: the lock is free
    live = DirectoryLock.acquire(datasets / f"c.tmp-{dead_pid}")  # a live writer (the PID does not matter)
    out = dataset_for(DataConfig(sources=[str(docs_dir)], cache_dir=str(tmp_path / "cache")), progress=False)
    assert sorted(p.name for p in datasets.iterdir()) == sorted(
        [out.name, f"c.tmp-{dead_pid}", f"d.old-{os.getppid()}"]
    )
    live.release()


def test_never_replaces_a_directory_that_is_not_a_dataset(tmp_path, docs_dir):
    with pytest.raises(DataError, match="exists and is not a dataset directory"):
        prepare_dataset(DataConfig(sources=[str(docs_dir)]), docs_dir, progress=False)
    assert len(list(docs_dir.iterdir())) == 40


def test_summary_names_what_was_skipped(tmp_path, docs_dir, capsys):
    (docs_dir / "blob.bin").write_bytes(b"\0\1\2")
    prepare_dataset(DataConfig(sources=[str(docs_dir)]), tmp_path / "ds")
    err = capsys.readouterr().err
    assert "tokenize" in err and "B/s" in err  # the progress bar shows throughput
    assert "skipped 1 binary" in err


def test_builtin_corpus_with_byte_tokenizer_is_fast(tmp_path):
    start = time.perf_counter()
    ds = prepare(tmp_path, ["python-stdlib", "python-docs"], tokenizer="byte")
    assert time.perf_counter() - start < 15
    counts = ds.meta["splits"]
    # the sizes depend on the Python that provides the corpus (3.12's gave 10.1M train tokens, 65 val documents)
    assert counts["train"]["tokens"] > 5_000_000 and counts["val"]["documents"] > 20
    assert ds.meta["skipped"].get("undecodable", 0) >= 0
    assert [s["source"] for s in ds.meta["sources"]] == ["python-stdlib", "python-docs"]
    assert counts["train"]["bytes"] + counts["val"]["bytes"] == sum(
        counts[s]["tokens"] - counts[s]["documents"] for s in ("train", "val")
    )  # byte tokenizer: one token per byte + one EOT per document


def test_bpe_dataset_and_tokenizer_reuse(tmp_path, docs_dir):
    ds = prepare(tmp_path, [docs_dir], name="bpe", tokenizer="bpe", bpe_vocab_size=300)
    assert ds.tokenizer.kind == "bpe" and ds.vocab_size == 300
    assert ds.meta["tokenizer"]["fingerprint"] == ds.tokenizer.fingerprint
    texts = sorted(ds.tokenizer.decode(p[:-1].tolist()) for s in ("train", "val") for p in _split_docs(ds, s))
    assert texts == sorted(make_docs())
    again = prepare(tmp_path, [docs_dir], name="bpe2", tokenizer="byte", tokenizer_path=str(ds.path / "tokenizer.json"))
    assert again.tokenizer.fingerprint == ds.tokenizer.fingerprint
    with pytest.raises(DataError, match="prepare the data with the model's tokenizer"):
        ds.check_tokenizer(ByteTokenizer().fingerprint)
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(DataError, match="bad.json does not parse"):
        prepare(tmp_path, [docs_dir], name="bpe3", tokenizer_path=str(bad))
    assert not (tmp_path / "bpe3").exists()


def test_bpe_trains_on_an_even_sample_and_encodes_everything(tmp_path, docs_dir):
    from flowtrain.data.prepare import cache_key, corpus_for
    from flowtrain.data.tokenizers import BPETokenizer

    size = corpus_for(DataConfig(sources=[str(docs_dir)])).size_bytes()
    ds = prepare(tmp_path, [docs_dir], name="bpe", tokenizer="bpe", bpe_vocab_size=300, bpe_train_bytes=size // 3)
    every = -(-size // (size // 3))  # one file a document, one piece a file: every k-th document
    sample = [text for i, text in enumerate(make_docs()) if i % every == 0]
    assert ds.tokenizer.to_json() == BPETokenizer.train(iter(sample), 300).to_json()
    assert ds.tokenizer.to_json() != BPETokenizer.train(iter(make_docs()), 300).to_json()
    texts = sorted(ds.tokenizer.decode(p[:-1].tolist()) for s in ("train", "val") for p in _split_docs(ds, s))
    assert texts == sorted(make_docs())  # the whole corpus is still encoded

    def key(**kw):
        return cache_key(DataConfig(sources=[str(docs_dir)], tokenizer="bpe", **kw))

    assert key(bpe_train_bytes=size // 3) != key(bpe_train_bytes=size // 2) != key(bpe_train_bytes=0)
    assert key(bpe_train_bytes=size) == key(bpe_train_bytes=0) == key(bpe_train_bytes=10 * size)  # no sample


def test_meta_json_is_plain_json(byte_ds):
    meta = json.loads((byte_ds.path / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["tokenizer"]["kind"] == "byte"
    assert meta["sources"][0]["sha256"] and meta["skipped"] == {}
