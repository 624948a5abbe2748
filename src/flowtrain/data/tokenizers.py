"""Tokenizers: char, byte and byte-level BPE, each saved as JSON beside the tokens and reloadable from it.

A tokenizer is identified by its JSON: `fingerprint` is the sha256 of `to_json()`, so a model trained with one
tokenizer can refuse data (or a checkpoint) made with another. Char and byte tokenizers use a small schema of
our own (`{"flowtrain_tokenizer": 1, "kind": ...}`); BPE uses Hugging Face's tokenizer.json unchanged, so the
file works with any `tokenizers`-based tool (one imported with a model whose end-of-text token is not
<|endoftext|> is wrapped in our schema, which names it). data/hf_tokenizers.py has the tokenizer.json forms
of char and byte, and reads transformers model directories.

Bulk encoding (`encode_array`) goes through numpy (char, byte) or the Rust batch encoder (BPE), never a
per-token Python loop, because prepare runs it over tens of megabytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from flowtrain.errors import DataError

SCHEMA_VERSION = 1
EOT_TEXT = "<|endoftext|>"
PAD_TEXT = "<|pad|>"


class Tokenizer:
    """The interface every tokenizer offers. Special tokens (EOT, PAD) decode to nothing."""

    kind: str
    vocab_size: int
    eot_id: int
    pad_id: int | None
    eot_text: str = EOT_TEXT  # the special tokens' texts (what a transformers tokenizer_config.json names)
    pad_text: str | None = PAD_TEXT
    # encoding a text in the pieces data/readers.py cuts gives the tokens of the whole text
    piecewise: bool = True

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of `text` as an int64 array (the fast path prepare uses)."""
        raise NotImplementedError

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        """Encode several documents; BPE overrides this to use all cores."""
        return [self.encode_array(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def to_json(self) -> str:
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """sha256 of the JSON form: equal fingerprints mean identical token ids for every text."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"


def _canonical_json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then EOT (256) and PAD (257). Needs no training and can encode any text."""

    kind = "byte"

    def __init__(self) -> None:
        self.eot_id = 256
        self.pad_id = 257
        self.vocab_size = 258

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        # errors="replace": a sampled sequence may stop inside a multi-byte character.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return _canonical_json({"flowtrain_tokenizer": SCHEMA_VERSION, "kind": "byte"})


class CharTokenizer(Tokenizer):
    """One id per distinct character of the corpus (sorted by code point), then EOT. No PAD: loaders that
    pad use EOT as filler and mask it out of the loss."""

    kind = "char"
    pad_text = None

    def __init__(self, chars: str) -> None:
        if not chars:
            raise DataError("char tokenizer has no characters; the corpus is empty — give a non-empty text")
        codepoints = np.array(sorted({ord(c) for c in chars}), dtype=np.int64)
        self._codepoints = codepoints
        self.chars = "".join(chr(c) for c in codepoints)
        self.eot_id = len(codepoints)
        self.pad_id = None
        self.vocab_size = len(codepoints) + 1

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(seen))

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.searchsorted(self._codepoints, codes)
        ids_clipped = np.minimum(ids, len(self._codepoints) - 1)
        unknown = self._codepoints[ids_clipped] != codes
        if unknown.any():
            bad = chr(int(codes[np.argmax(unknown)]))
            raise DataError(
                f"character {bad!r} is not in the char tokenizer's vocabulary (it was built from the "
                "training text); use only characters from that text or the byte tokenizer"
            )
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] for i in ids if 0 <= i < n)

    def to_json(self) -> str:
        return _canonical_json({"flowtrain_tokenizer": SCHEMA_VERSION, "kind": "char", "chars": self.chars})


class BPETokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer: the byte-level BPE flowtrain trains (GPT-2 style: any text
    round-trips exactly), or one that came with an imported model (docs/interop.md).

    Its end-of-text token is <|endoftext|> and its padding token <|pad|> (when it has one), unless it names
    others (`eot_text`, `pad_text`: an imported Llama's </s>, say); then its JSON form wraps Hugging Face's
    tokenizer.json in a small object of ours that records them, since tokenizer.json itself cannot.
    """

    kind = "bpe"

    def __init__(self, hf_tokenizer: Any, eot_text: str = EOT_TEXT, pad_text: str | None = PAD_TEXT) -> None:
        self._hf = hf_tokenizer
        eot = hf_tokenizer.token_to_id(eot_text)
        if eot is None:
            raise DataError(f"tokenizer.json has no {eot_text} token; add it as a special token or train a new BPE")
        self.eot_id, self.eot_text = eot, eot_text
        self.pad_id = hf_tokenizer.token_to_id(pad_text) if pad_text is not None else None
        self.pad_text = pad_text if self.pad_id is not None else None
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.hf_json = hf_tokenizer.to_str()  # Hugging Face's tokenizer.json, as it is
        self.piecewise = _splits_like_gpt2(json.loads(self.hf_json))
        if eot_text == EOT_TEXT and self.pad_id == hf_tokenizer.token_to_id(PAD_TEXT):
            self._json = self.hf_json
        else:
            self._json = _canonical_json(
                {"flowtrain_tokenizer": SCHEMA_VERSION, "kind": "bpe", "eot": eot_text, "pad": self.pad_text,
                 "tokenizer": json.loads(self.hf_json)}
            )  # fmt: skip

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT_TEXT, PAD_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._hf.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        # parallel in Rust; "fast" skips the character offsets we never read (15-30% less time, the same ids)
        encodings = self._hf.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=True)

    def to_json(self) -> str:
        return self._json


def _splits_like_gpt2(spec: dict) -> bool:
    """Whether a tokenizer.json splits text exactly as GPT-2's byte-level pattern does (ours and GPT-2's do): no
    normalizer, and ByteLevel pre-tokenization with that pattern and no prefix space. Any other tokenizer is given
    whole documents."""
    pre = spec.get("pre_tokenizer") or {}
    return (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
    )


def tokenizer_from_json(text: str, *, source: str = "tokenizer JSON") -> Tokenizer:
    """Rebuild a tokenizer from `to_json()` output (ours) or a Hugging Face tokenizer.json."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{source} does not parse as JSON ({exc.msg} at line {exc.lineno}); replace the file") from None
    if not isinstance(obj, dict):
        raise DataError(f"{source} is not a tokenizer (not a JSON object); replace the file")
    if "flowtrain_tokenizer" in obj:
        kind = obj.get("kind")
        if kind == "byte":
            return ByteTokenizer()
        if kind == "char" and isinstance(obj.get("chars"), str):
            return CharTokenizer(obj["chars"])
        if kind == "bpe" and isinstance(obj.get("tokenizer"), dict) and isinstance(obj.get("eot"), str):
            hf = _hf_from_str(json.dumps(obj["tokenizer"]), source)
            return BPETokenizer(hf, eot_text=obj["eot"], pad_text=obj.get("pad"))
        raise DataError(f"{source} has an unknown or incomplete tokenizer kind {kind!r}; re-run prepare")
    if "model" in obj:
        from flowtrain.data.hf_tokenizers import flowtrain_equivalent  # it builds on the classes above

        hf = _hf_from_str(text, source)
        return flowtrain_equivalent(obj, text) or BPETokenizer(hf)
    raise DataError(f"{source} is neither a flowtrain nor a Hugging Face tokenizer; replace the file")


def _hf_from_str(text: str, source: str) -> Any:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_str(text)
    except Exception as exc:  # the Rust side raises a bare Exception
        raise DataError(f"{source} is not a valid Hugging Face tokenizer ({exc}); replace the file") from None


def load_tokenizer_file(path: str) -> Tokenizer:
    """Read a tokenizer.json from disk (ours or Hugging Face's), or the tokenizer of a transformers model
    directory (its tokenizer.json and end-of-text token: data/hf_tokenizers.py)."""
    if os.path.isdir(path):
        from flowtrain.data.hf_tokenizers import load_tokenizer_dir

        return load_tokenizer_dir(Path(path))
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"tokenizer file {path} does not exist; fix data.tokenizer_path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read tokenizer file {path} ({exc}); fix data.tokenizer_path") from None
    return tokenizer_from_json(text, source=f"tokenizer file {path}")
