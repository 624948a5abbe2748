"""Prepare: corpus → tokenizer → token files, split into train/val, written as one dataset directory.

Layout of a dataset directory (format version FORMAT_VERSION):

    train.bin, val.bin          raw token ids (uint16 when the vocab fits, else uint32), each document + EOT
    train_docs.npy, val_docs.npy  int64 start offset of every document in its split (np.save)
    tokenizer.json              the tokenizer (ours for char/byte, Hugging Face's for BPE)
    meta.json                   written last: counts, dtype, tokenizer fingerprint, sources, split, skipped

The directory is built under `<out>.tmp-<pid>` and renamed into place only when complete, so an interrupted
prepare never leaves something that looks like a dataset; what a killed one leaves is removed by the next
prepare there (the writer holds a lock inside its temporary while it works: a free lock means it died).
Text is read in pieces (data/readers.py) and tokens stream through a scratch file on disk, so memory stays flat
in corpus size; the split is then a copy of contiguous runs of documents (data/splits.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
from array import array
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flowtrain.data.config import DataConfig
from flowtrain.data.corpora import Corpus
from flowtrain.data.readers import Piece, join_pieces
from flowtrain.data.splits import SPLIT_CODES, Tokenized, write_splits
from flowtrain.data.tokenizers import BPETokenizer, ByteTokenizer, CharTokenizer, Tokenizer, load_tokenizer_file
from flowtrain.errors import DataError
from flowtrain.fsutil import DirectoryLock, fsync_dir, pid_alive, write_synced

FORMAT_VERSION = 1
_CHUNK_CHARS = 1 << 20  # documents are encoded in ~1 MB batches (lets BPE use all cores)


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32; a forced uint16 that cannot hold it fails."""
    if requested == "uint16" or (requested == "auto" and vocab_size <= 1 << 16):
        if vocab_size > 1 << 16:
            raise DataError(
                f"vocab size {vocab_size} does not fit data.token_dtype=uint16 (max 65536); use uint32 or auto"
            )
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def corpus_for(cfg: DataConfig) -> Corpus:
    return Corpus(cfg.sources, text_field=cfg.text_field, include=cfg.include, exclude=cfg.exclude, splits=cfg.splits)


def build_tokenizer(cfg: DataConfig, corpus: Corpus) -> Tokenizer:
    """The tokenizer for this corpus: loaded from cfg.tokenizer_path, or built (char) / trained (BPE) on it."""
    if cfg.tokenizer_path:
        return load_tokenizer_file(cfg.tokenizer_path)
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "char":
        return CharTokenizer.train(corpus.texts())
    return BPETokenizer.train(corpus.texts(cfg.bpe_train_bytes), cfg.bpe_vocab_size)


def _tokenize(corpus: Corpus, tokenizer: Tokenizer, dtype: np.dtype, scratch: Path, progress: bool) -> Tokenized:
    """Encode every document (+ EOT) into `scratch`, ~1 MB of text at a time; count tokens and UTF-8 bytes per
    document and per piece."""
    docs = {"tokens": array("q"), "bytes": array("q"), "split": array("b")}
    ends = {"tokens": array("q"), "bytes": array("q")}  # running totals at the end of every piece
    run = {"tokens": 0, "bytes": 0, "doc_tokens": 0, "doc_bytes": 0}
    eot = np.array([tokenizer.eot_id], dtype=dtype).tobytes()
    bar = tqdm(
        total=corpus.size_bytes() or None,
        unit="B",
        unit_scale=True,
        desc="tokenize",
        disable=not progress,
        file=sys.stderr,
    )
    pieces = corpus.pieces() if tokenizer.piecewise else join_pieces(corpus.pieces())
    with bar, open(scratch, "wb") as out:  # the bar is closed before any error is printed below it
        pending: list[Piece] = []
        pending_chars = 0

        def flush() -> None:
            for piece, ids in zip(pending, tokenizer.encode_many([p.text for p in pending]), strict=True):
                out.write(ids.astype(dtype).tobytes())
                n_tokens, n_bytes = len(ids), len(piece.text.encode("utf-8"))
                if piece.end:
                    out.write(eot)
                    n_tokens += 1
                run["tokens"] += n_tokens
                run["bytes"] += n_bytes
                ends["tokens"].append(run["tokens"])
                ends["bytes"].append(run["bytes"])
                run["doc_tokens"] += n_tokens
                run["doc_bytes"] += n_bytes
                if piece.end:
                    docs["tokens"].append(run["doc_tokens"])
                    docs["bytes"].append(run["doc_bytes"])
                    docs["split"].append(SPLIT_CODES[piece.split])
                    run["doc_tokens"] = run["doc_bytes"] = 0
                bar.update(n_bytes)
            pending.clear()

        for piece in pieces:
            pending.append(piece)
            pending_chars += len(piece.text)
            if pending_chars >= _CHUNK_CHARS:
                flush()
                pending_chars = 0
        flush()

    def arr(values: array, dt) -> np.ndarray:
        return np.frombuffer(values, dtype=dt) if len(values) else np.zeros(0, dtype=dt)

    per_doc = arr(docs["tokens"], np.int64), arr(docs["bytes"], np.int64), arr(docs["split"], np.int8)
    return Tokenized(scratch, np.dtype(dtype), *per_doc, arr(ends["tokens"], np.int64), arr(ends["bytes"], np.int64))


def prepare_dataset(
    cfg: DataConfig,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    replace: bool = True,
    cache_key: str | None = None,
) -> Path:
    """Tokenize cfg.sources into a complete dataset directory at `out_dir`.

    An existing directory there is replaced (`replace=True`) or, if complete, kept and ours discarded
    (`replace=False`, what the cache does when another process got there first).
    """
    out = Path(out_dir).expanduser()
    _refuse_foreign(out)
    corpus = corpus_for(cfg)
    try:
        return _prepare(cfg, corpus, out, progress, replace, cache_key)
    except OSError as exc:
        error = _write_error(exc, out, corpus)
        if error is None:
            raise
        raise error from None


def _write_error(exc: OSError, out: Path, corpus: Corpus) -> DataError | None:
    """A full disk (or quota, or file-size limit) and an unwritable place are the user's to fix: one line."""
    where = "data.cache_dir (train) or -o (prepare)"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        text = corpus.size_bytes()
        return DataError(
            f"no space left preparing the dataset {out} ({exc.strerror}); it needs up to about "
            f"{4 * text / 1e6:.1f} MB while it is made (2-byte tokens, written twice) for {text / 1e6:.1f} MB of "
            f"text: free some space or point {where} at a larger disk"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DataError(f"cannot write the dataset {out} ({exc.strerror}); point {where} at a writable directory")
    return None  # anything else is not the user's to fix: keep the traceback


def _prepare(cfg: DataConfig, corpus: Corpus, out: Path, progress: bool, replace: bool, cache_key: str | None):
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out.parent, out.name)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    held = DirectoryLock.acquire(tmp)  # "alive" to remove_leftovers in other processes
    try:
        tokenizer = build_tokenizer(cfg, corpus)
        dtype = token_dtype(tokenizer.vocab_size, cfg.token_dtype)
        tokenized = _tokenize(corpus, tokenizer, dtype, tmp / "all.scratch", progress)
        skipped = {k: int(v) for k, v in sorted(corpus.skipped.items())}
        if len(tokenized.doc_tokens) == 0:
            detail = ", ".join(f"{v} {k}" for k, v in skipped.items()) or "nothing readable"
            raise DataError(f"data.sources {cfg.sources} hold no documents (skipped: {detail}); give non-empty text")
        counts, split_by = write_splits(cfg, tokenizer, tokenized, tmp)
        (tmp / "all.scratch").unlink()
        predefined = corpus.predefined_splits()
        write_synced(tmp / "tokenizer.json", tokenizer.to_json().encode("utf-8"))
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer": {
                "kind": tokenizer.kind,
                "fingerprint": tokenizer.fingerprint,
                "vocab_size": tokenizer.vocab_size,
                "eot_id": tokenizer.eot_id,
                "pad_id": tokenizer.pad_id,
            },
            "vocab_size": tokenizer.vocab_size,
            "dtype": dtype.name,
            "splits": counts,
            "sources": [
                {"source": s.name, "kind": s.kind, "sha256": corpus.content_hashes.get(s.name)} for s in corpus.sources
            ],
            "split": {
                "split_by": split_by,
                "requested": cfg.split_by,
                "val_fraction": cfg.val_fraction,
                "seed": cfg.split_seed,
                "from_sources": predefined,
            },
            "skipped": skipped,
            "cache_key": cache_key,
        }
        for name in ("train_docs.npy", "val_docs.npy"):
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        write_synced(tmp / "meta.json", json.dumps(meta, indent=2, sort_keys=True).encode("utf-8"))
        held.path.unlink()  # not part of the dataset; still held, and the PID in the name says "alive" meanwhile
        fsync_dir(tmp)
        if not _install(tmp, out, replace):
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        held.release()
    if progress:
        note = f"; skipped {', '.join(f'{v} {k}' for k, v in skipped.items())} file(s)/record(s)" if skipped else ""
        note += "".join(_splits_note(name, plan) for name, plan in predefined.items())
        print(
            f"prepared {out}: {counts['train']['tokens']:,} train / {counts['val']['tokens']:,} val tokens, "
            f"{sum(c['documents'] for c in counts.values()):,} documents{note}",
            file=sys.stderr,
        )
    return out


def _splits_note(name: str, plan: dict) -> str:
    """What the prepare line says of a DatasetDict's splits: where val came from, and the splits not used."""
    val = f"val = its {plan['val']!r}" if plan["val"] else f"val drawn from its {plan['train']!r}"
    unused = f", not used: {', '.join(plan['unused'])} (data.splits maps others)" if plan["unused"] else ""
    return f"; {name}: train = its {plan['train']!r}, {val}{unused}"


_DATASET_FILES = {"meta.json", "tokenizer.json", "train.bin", "val.bin", "train_docs.npy", "val_docs.npy"}


def _refuse_foreign(out: Path) -> None:
    """Replacing `out` deletes it, so it must be absent, empty, or a dataset directory (complete or not)."""
    if out.exists() and (not out.is_dir() or any(p.name not in _DATASET_FILES for p in out.iterdir())):
        raise DataError(f"{out} exists and is not a dataset directory; choose another output path")


def remove_leftovers(parent: Path, name: str | None = None) -> list[str]:
    """Remove the temporaries (`NAME.tmp-PID`, `NAME.old-PID`; any NAME when None) of prepares that died in
    `parent`: one whose lock is free, or without a lock file, whose PID is gone from this machine. Returns
    their names."""
    pattern = re.compile(rf"^{re.escape(name) if name else '.+'}\.(tmp|old)-(\d+)$")
    removed = []
    for path in parent.iterdir() if parent.is_dir() else []:
        m = pattern.match(path.name)
        if not m or int(m.group(2)) == os.getpid() or not path.is_dir():
            continue
        has_lock = m.group(1) == "tmp" and (path / ".lock").exists()
        if DirectoryLock.is_free(path) if has_lock else not pid_alive(int(m.group(2))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def _install(tmp: Path, out: Path, replace: bool) -> bool:
    """Rename the finished directory into place. Returns False when a complete dataset already there wins."""
    old = None
    if out.exists():
        if not replace and (out / "meta.json").is_file():
            return False
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if not replace and (out / "meta.json").is_file():  # lost a race to another process
            return False
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return True


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("FLOWTRAIN_CACHE") or "~/.cache/flowtrain").expanduser()


def cache_key(cfg: DataConfig) -> str:
    """Hash of everything that affects a prepared dataset's bytes."""
    corpus = corpus_for(cfg)
    tok: dict = {"kind": cfg.tokenizer}
    if cfg.tokenizer_path and Path(cfg.tokenizer_path).is_dir():  # a transformers directory: its files decide
        tok = {"fingerprint": load_tokenizer_file(cfg.tokenizer_path).fingerprint}
    elif cfg.tokenizer_path:
        try:
            tok = {"file_sha256": hashlib.sha256(Path(cfg.tokenizer_path).read_bytes()).hexdigest()}
        except OSError as exc:
            raise DataError(
                f"cannot read data.tokenizer_path {cfg.tokenizer_path} ({exc.strerror}); fix the path"
            ) from None
    elif cfg.tokenizer == "bpe":
        import tokenizers  # the trained merges may change with the library's version

        tok.update(bpe_vocab_size=cfg.bpe_vocab_size, tokenizers=tokenizers.__version__)
        if corpus.sample_stride(cfg.bpe_train_bytes) > 1:  # older keys stay valid otherwise
            tok["bpe_train_bytes"] = cfg.bpe_train_bytes
    key = {
        "format_version": FORMAT_VERSION,
        "sources": corpus.identity(),
        "tokenizer": tok,
        "token_dtype": cfg.token_dtype,
        "split": [cfg.split_by, cfg.val_fraction, cfg.split_seed],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def dataset_for(cfg: DataConfig, *, progress: bool = True) -> Path:
    """cfg.dataset if set; otherwise the cached dataset for cfg.sources, prepared on first use.

    Two processes preparing the same key at once each build their own temp directory; the rename makes
    one of them win and both end up reading a complete dataset.
    """
    if cfg.dataset:
        return Path(cfg.dataset).expanduser()
    key = cache_key(cfg)
    out = cache_root(cfg) / "datasets" / key[:24]
    remove_leftovers(out.parent)  # of any dataset in the cache
    if (out / "meta.json").is_file():
        return out
    return prepare_dataset(cfg, out, progress=progress, replace=False, cache_key=key)
