"""A prepared dataset directory, opened read-only: memory-mapped splits, document offsets, tokenizer, meta.

Opening checks that the directory is complete (meta.json present and of a known format) and that each token
file has exactly the length meta.json promises, so a truncated or half-copied dataset fails here with a
clear message rather than as garbage batches later. Nothing is read into RAM beyond the offsets' memmaps.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowtrain.data.prepare import FORMAT_VERSION
from flowtrain.data.tokenizers import Tokenizer, tokenizer_from_json
from flowtrain.errors import DataError

SPLITS = ("train", "val")


@dataclass
class TokenDataset:
    path: Path
    meta: dict
    tokenizer: Tokenizer
    tokens: dict[str, np.ndarray]  # split -> memmap of token ids
    doc_starts: dict[str, np.ndarray]  # split -> int64 start offsets (memmap)

    @classmethod
    def open(cls, path: str | os.PathLike) -> TokenDataset:
        root = Path(path).expanduser()
        if not root.is_dir():
            raise DataError(f"dataset {root} does not exist; run `flowtrain prepare` or fix data.dataset")
        meta_path = root / "meta.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            complete = isinstance(meta, dict) and "splits" in meta and "dtype" in meta
        except (OSError, ValueError):
            complete = False
        if not complete:
            raise DataError(f"incomplete dataset {root} (no valid meta.json); re-run prepare to rebuild it")
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"dataset {root} has format version {meta.get('format_version')}, this flowtrain reads "
                f"{FORMAT_VERSION}; re-run prepare"
            )
        try:
            tok_text = (root / "tokenizer.json").read_text(encoding="utf-8")
        except OSError:
            raise DataError(f"incomplete dataset {root} (tokenizer.json missing); re-run prepare") from None
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{root}/tokenizer.json is corrupt (not UTF-8 text, byte {exc.start}); re-run prepare"
            ) from None
        tokenizer = tokenizer_from_json(tok_text, source=f"{root}/tokenizer.json")
        if tokenizer.fingerprint != meta["tokenizer"]["fingerprint"]:
            raise DataError(
                f"{root}/tokenizer.json does not match the tokenizer the tokens were made with; re-run prepare"
            )
        dtype = np.dtype(meta["dtype"])
        tokens, doc_starts = {}, {}
        for split in SPLITS:
            expected = meta["splits"][split]["tokens"]
            file = root / f"{split}.bin"
            size = file.stat().st_size if file.is_file() else -1
            if size != expected * dtype.itemsize:
                raise DataError(
                    f"{file} holds {max(size, 0)} bytes, meta.json promises {expected} {dtype.name} tokens; "
                    "the dataset is truncated or corrupt — re-run prepare"
                )
            tokens[split] = np.memmap(file, dtype=dtype, mode="r") if expected else np.zeros(0, dtype=dtype)
            try:
                doc_starts[split] = np.load(root / f"{split}_docs.npy", mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(f"{root}/{split}_docs.npy is unreadable ({exc}); re-run prepare") from None
        return cls(root, meta, tokenizer, tokens, doc_starts)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def n_tokens(self, split: str) -> int:
        return len(self.split(split))

    def split(self, name: str) -> np.ndarray:
        if name not in self.tokens:
            raise DataError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        return self.tokens[name]

    def fresh_view(self, name: str) -> np.ndarray:
        """A new memmap of a split. Loaders take one per batch and drop it, so pages touched by earlier
        batches are unmapped and resident memory stays flat however large the file (the trick nanoGPT uses)."""
        view = self.split(name)
        if not isinstance(view, np.memmap):
            return view
        return np.memmap(view.filename, dtype=view.dtype, mode="r")

    def documents(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(starts, lengths) of every document of `split`, as int64 arrays (lengths include the EOT)."""
        starts = np.asarray(self.doc_starts[split], dtype=np.int64)
        ends = np.append(starts[1:], self.n_tokens(split))
        return starts, ends - starts

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of source text per token: loss_nats / ln 2 / bytes_per_token = bits per byte."""
        counts = self.meta["splits"][split]
        return counts["bytes"] / max(counts["tokens"], 1)

    def check_tokenizer(self, fingerprint: str) -> None:
        """Refuse data made with a tokenizer other than the one a model was trained with."""
        if fingerprint != self.tokenizer.fingerprint:
            raise DataError(
                f"dataset {self.path} was made with tokenizer {self.tokenizer.fingerprint[:12]}, the model was "
                f"trained with {fingerprint[:12]}; prepare the data with the model's tokenizer (data.tokenizer_path)"
            )
