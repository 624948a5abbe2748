"""The train/val split of a tokenized corpus: whole documents chosen with a seed, the last fraction of the token
stream, or the splits a source brought with it (a DatasetDict's own, data/hf_disk.py). The split files are
copied from the scratch token file in bounded chunks through a file handle (a memory map would keep every page
it touched resident), so memory stays flat in corpus size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowtrain.errors import DataError

FREE, TRAIN, VAL = 0, 1, 2  # a document's split: the configured split decides, or the source fixed it
SPLIT_CODES = {None: FREE, "train": TRAIN, "val": VAL}
_COPY_BYTES = 8 << 20


@dataclass
class Tokenized:
    """What tokenizing wrote: every document's tokens (each + EOT) in `scratch`, and their counts."""

    scratch: Path
    dtype: np.dtype
    doc_tokens: np.ndarray  # int64 per document, EOT included
    doc_bytes: np.ndarray  # int64 UTF-8 bytes of source text per document
    doc_split: np.ndarray  # int8 FREE / TRAIN / VAL per document
    piece_tokens: np.ndarray  # int64 running token count at the end of every piece (readers.Piece)
    piece_bytes: np.ndarray  # int64 running byte count at the end of every piece


def _copy_runs(src: Tokenized, starts: np.ndarray, lengths: np.ndarray, mask: np.ndarray, dst: Path) -> None:
    """Write the documents selected by `mask` to `dst`, copying maximal contiguous runs at once."""
    size = src.dtype.itemsize
    with open(src.scratch, "rb") as f, open(dst, "wb") as out:
        if mask.any():
            edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
            for first, stop in zip(edges[0::2], edges[1::2], strict=True):
                begin, end = int(starts[first]), int(starts[stop - 1] + lengths[stop - 1])
                f.seek(begin * size)
                left = (end - begin) * size
                while left:
                    chunk = f.read(min(left, _COPY_BYTES))
                    if not chunk:
                        raise OSError(f"{src.scratch} ended early while the dataset was split")
                    out.write(chunk)
                    left -= len(chunk)
        out.flush()
        os.fsync(out.fileno())


def _val_mask(cfg, doc_split: np.ndarray) -> np.ndarray:
    """The documents that go to val: those a source put there, and a seeded choice of the free ones."""
    mask = doc_split == VAL
    free = np.flatnonzero(doc_split == FREE)
    n_val = min(len(free) - 1, max(1, round(len(free) * cfg.val_fraction)))
    if n_val > 0:
        mask[free[np.random.default_rng(cfg.split_seed).choice(len(free), size=n_val, replace=False)]] = True
    return mask


def choose_split_by(cfg, tok: Tokenized) -> str:
    """document / tokens as configured (auto: document from 10 documents on); "source" when every document's
    split was fixed by its source. Free documents beside fixed ones are split by document."""
    fixed = tok.doc_split != FREE
    if not fixed.any():
        return cfg.split_by if cfg.split_by != "auto" else ("document" if len(tok.doc_tokens) >= 10 else "tokens")
    if fixed.all():
        return "source"
    if cfg.split_by == "tokens":
        raise DataError(
            "data.split_by=tokens cuts one token stream in two, but a source brings its own train/val splits; "
            "use data.split_by=document (or auto) to split the other sources by document"
        )
    return "document"


def write_splits(cfg, tokenizer, tok: Tokenized, tmp: Path) -> tuple[dict, str]:
    """Write train.bin / val.bin and their document offsets into `tmp`; returns (counts per split, split_by)."""
    doc_tokens, doc_bytes = tok.doc_tokens, tok.doc_bytes
    n_docs, n_tokens = len(doc_tokens), int(doc_tokens.sum())
    starts = np.concatenate(([0], np.cumsum(doc_tokens)[:-1])).astype(np.int64)
    split_by = choose_split_by(cfg, tok)
    counts: dict[str, dict] = {}
    if split_by != "tokens":
        if split_by == "document" and (tok.doc_split == FREE).all() and n_docs < 2:
            raise DataError(
                f"split_by=document needs at least 2 documents, the corpus has {n_docs}; use data.split_by=tokens"
            )
        val_mask = _val_mask(cfg, tok.doc_split)
        for name, mask in (("train", ~val_mask), ("val", val_mask)):
            _copy_runs(tok, starts, doc_tokens, mask, tmp / f"{name}.bin")
            lengths = doc_tokens[mask]
            np.save(tmp / f"{name}_docs.npy", np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64))
            counts[name] = {
                "tokens": int(lengths.sum()),
                "documents": int(mask.sum()),
                "bytes": int(doc_bytes[mask].sum()),
            }
        return counts, split_by
    if n_tokens < 2:
        raise DataError(f"the corpus has only {n_tokens} token(s), too few to split; give more text")
    cut = min(n_tokens - 1, max(1, round(n_tokens * (1 - cfg.val_fraction))))
    train_bytes = _bytes_before(tokenizer, tok, cut)
    val_starts = starts[starts >= cut] - cut
    if cut not in starts:  # the cut lies inside a document: its rest starts val
        val_starts = np.concatenate(([0], val_starts))
    one = np.ones(1, dtype=bool)
    for name, lo, hi in (("train", 0, cut), ("val", cut, n_tokens)):
        _copy_runs(tok, np.array([lo]), np.array([hi - lo]), one, tmp / f"{name}.bin")
    np.save(tmp / "train_docs.npy", starts[starts < cut].astype(np.int64))
    np.save(tmp / "val_docs.npy", val_starts.astype(np.int64))
    counts["train"] = {"tokens": cut, "documents": int((starts < cut).sum()), "bytes": train_bytes}
    val_bytes = int(doc_bytes.sum()) - train_bytes
    counts["val"] = {"tokens": n_tokens - cut, "documents": len(val_starts), "bytes": val_bytes}
    return counts, split_by


def _bytes_before(tokenizer, tok: Tokenized, cut: int) -> int:
    """UTF-8 bytes of source text before token `cut`: whole pieces, then the decoded head of the piece holding it
    (EOT decodes to nothing; only that piece is read back)."""
    k = int(np.searchsorted(tok.piece_tokens, cut, side="right"))
    first = int(tok.piece_tokens[k - 1]) if k else 0
    before = int(tok.piece_bytes[k - 1]) if k else 0
    if cut == first:
        return before
    ids = np.fromfile(tok.scratch, dtype=tok.dtype, count=cut - first, offset=first * tok.dtype.itemsize)
    head = len(tokenizer.decode(ids.tolist()).encode("utf-8"))
    return before + min(head, int(tok.piece_bytes[k]) - before)
