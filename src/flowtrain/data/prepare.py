"""Prepare: corpus → tokenizer → token files, split into train/val, written as one dataset directory.

Layout of a dataset directory (format version FORMAT_VERSION):

    train.bin, val.bin          raw token ids (uint16 when the vocab fits, else uint32), each document + EOT
    train_docs.npy, val_docs.npy  int64 start offset of every document in its split (np.save)
    tokenizer.json              the tokenizer (ours for char/byte, Hugging Face's for BPE)
    meta.json                   written last: counts, dtype, tokenizer fingerprint, sources, split, skipped

The directory is built under `<out>.tmp-<pid>` and renamed into place only when complete, so an interrupted
prepare never leaves something that looks like a dataset; what a killed one leaves is removed by the next
prepare there (the writer holds a lock inside its temporary while it works: a free lock means it died).
Tokens stream through a scratch file on disk, so memory stays flat in corpus size; the split is then a copy
of contiguous runs of documents.
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


def build_tokenizer(cfg: DataConfig, corpus: Corpus) -> Tokenizer:
    """The tokenizer for this corpus: loaded from cfg.tokenizer_path, or built (char) / trained (BPE) on it."""
    if cfg.tokenizer_path:
        return load_tokenizer_file(cfg.tokenizer_path)
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "char":
        return CharTokenizer.train(corpus.documents())
    return BPETokenizer.train(corpus.documents(), cfg.bpe_vocab_size)


def _tokenize(corpus: Corpus, tokenizer: Tokenizer, dtype: np.dtype, scratch: Path, progress: bool):
    """Encode every document (+ EOT) into `scratch`; return per-document token and UTF-8 byte counts."""
    doc_tokens, doc_bytes = array("q"), array("q")
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    bar = tqdm(
        total=corpus.size_bytes() or None,
        unit="B",
        unit_scale=True,
        desc="tokenize",
        disable=not progress,
        file=sys.stderr,
    )
    with bar, open(scratch, "wb") as out:  # the bar is closed before any error is printed below it
        pending: list[str] = []
        pending_chars = 0

        def flush() -> None:
            for text, ids in zip(pending, tokenizer.encode_many(pending), strict=True):
                out.write(ids.astype(dtype).tobytes())
                out.write(eot.tobytes())
                n_bytes = len(text.encode("utf-8"))
                doc_tokens.append(len(ids) + 1)
                doc_bytes.append(n_bytes)
                bar.update(n_bytes)
            pending.clear()

        for text in corpus.documents():
            pending.append(text)
            pending_chars += len(text)
            if pending_chars >= _CHUNK_CHARS:
                flush()
                pending_chars = 0
        flush()
    return np.frombuffer(doc_tokens, dtype=np.int64), np.frombuffer(doc_bytes, dtype=np.int64)


def _copy_runs(src: np.ndarray, starts: np.ndarray, lengths: np.ndarray, mask: np.ndarray, dst: Path) -> None:
    """Append the documents selected by `mask` to `dst`, copying maximal contiguous runs at once."""
    with open(dst, "wb") as out:
        if not mask.any():
            return
        edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
        for first, stop in zip(edges[0::2], edges[1::2], strict=True):
            begin, end = starts[first], starts[stop - 1] + lengths[stop - 1]
            for lo in range(begin, end, 1 << 24):  # 16M tokens at a time keeps memory flat
                out.write(np.ascontiguousarray(src[lo : min(end, lo + (1 << 24))]).tobytes())
        out.flush()
        os.fsync(out.fileno())


def _split_documents(cfg: DataConfig, n_docs: int) -> np.ndarray:
    """Boolean mask of the documents that go to val: a seeded choice of whole documents."""
    n_val = min(n_docs - 1, max(1, round(n_docs * cfg.val_fraction)))
    mask = np.zeros(n_docs, dtype=bool)
    mask[np.random.default_rng(cfg.split_seed).choice(n_docs, size=n_val, replace=False)] = True
    return mask


def _write_splits(cfg, tokenizer, all_tokens, doc_tokens, doc_bytes, tmp: Path) -> tuple[dict, str]:
    n_docs, n_tokens = len(doc_tokens), int(doc_tokens.sum())
    starts = np.concatenate(([0], np.cumsum(doc_tokens)[:-1])).astype(np.int64)
    split_by = cfg.split_by if cfg.split_by != "auto" else ("document" if n_docs >= 10 else "tokens")
    counts: dict[str, dict] = {}
    if split_by == "document":
        if n_docs < 2:
            raise DataError(
                f"split_by=document needs at least 2 documents, the corpus has {n_docs}; use data.split_by=tokens"
            )
        val_mask = _split_documents(cfg, n_docs)
        for name, mask in (("train", ~val_mask), ("val", val_mask)):
            _copy_runs(all_tokens, starts, doc_tokens, mask, tmp / f"{name}.bin")
            lengths = doc_tokens[mask]
            np.save(tmp / f"{name}_docs.npy", np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64))
            counts[name] = {
                "tokens": int(lengths.sum()),
                "documents": int(mask.sum()),
                "bytes": int(doc_bytes[mask].sum()),
            }
    else:
        if n_tokens < 2:
            raise DataError(f"the corpus has only {n_tokens} token(s), too few to split; give more text")
        cut = min(n_tokens - 1, max(1, round(n_tokens * (1 - cfg.val_fraction))))
        cut_doc = int(np.searchsorted(starts, cut, side="right") - 1)  # document holding the cut
        head = int(cut - starts[cut_doc])
        # UTF-8 bytes of the cut document's train part: decode its head (EOT decodes to nothing).
        head_bytes = len(tokenizer.decode(all_tokens[starts[cut_doc] : cut].tolist()).encode("utf-8")) if head else 0
        head_bytes = min(head_bytes, int(doc_bytes[cut_doc]))
        train_bytes = int(doc_bytes[:cut_doc].sum()) + head_bytes
        val_starts = starts[starts >= cut] - cut
        if head:
            val_starts = np.concatenate(([0], val_starts))
        for name, lo, hi in (("train", 0, cut), ("val", cut, n_tokens)):
            _copy_runs(all_tokens, np.array([lo]), np.array([hi - lo]), np.ones(1, dtype=bool), tmp / f"{name}.bin")
        np.save(tmp / "train_docs.npy", starts[starts < cut].astype(np.int64))
        np.save(tmp / "val_docs.npy", val_starts.astype(np.int64))
        counts["train"] = {"tokens": cut, "documents": int((starts < cut).sum()), "bytes": train_bytes}
        counts["val"] = {
            "tokens": n_tokens - cut,
            "documents": len(val_starts),
            "bytes": int(doc_bytes.sum()) - train_bytes,
        }
    return counts, split_by


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
    corpus = Corpus(cfg.sources, text_field=cfg.text_field, include=cfg.include, exclude=cfg.exclude)
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
        doc_tokens, doc_bytes = _tokenize(corpus, tokenizer, dtype, tmp / "all.scratch", progress)
        skipped = {k: int(v) for k, v in sorted(corpus.skipped.items())}
        if len(doc_tokens) == 0:
            detail = ", ".join(f"{v} {k}" for k, v in skipped.items()) or "nothing readable"
            raise DataError(f"data.sources {cfg.sources} hold no documents (skipped: {detail}); give non-empty text")
        all_tokens = np.memmap(tmp / "all.scratch", dtype=dtype, mode="r")
        counts, split_by = _write_splits(cfg, tokenizer, all_tokens, doc_tokens, doc_bytes, tmp)
        del all_tokens
        (tmp / "all.scratch").unlink()
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
        print(
            f"prepared {out}: {counts['train']['tokens']:,} train / {counts['val']['tokens']:,} val tokens, "
            f"{sum(c['documents'] for c in counts.values()):,} documents{note}",
            file=sys.stderr,
        )
    return out


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
    corpus = Corpus(cfg.sources, text_field=cfg.text_field, include=cfg.include, exclude=cfg.exclude)
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
