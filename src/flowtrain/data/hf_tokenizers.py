"""Tokenizers as the Hugging Face ecosystem stores them: tokenizer.json equivalents of flowtrain's char and byte
tokenizers, and tokenizers read from a transformers model directory.

The equivalents are `tokenizers` models that give the same ids for every text flowtrain can encode, so an
exported char or byte model loads in `PreTrainedTokenizerFast` (docs/interop.md):

- byte: BPE without merges over GPT-2's byte-to-character alphabet behind a ByteLevel pre-tokenizer that keeps
  the text whole (no regex split), so every UTF-8 byte becomes the one token whose id is the byte's value.
- char: BPE without merges over the characters, no pre-tokenizer, a Fuse decoder (tokens joined as they are).
  A character outside the vocabulary is dropped there (flowtrain's char tokenizer refuses it).

Both end with EOT (and byte with PAD) as special tokens at flowtrain's ids. They are recognised when read back,
so an exported model imported again has the very tokenizer it was trained with (same fingerprint, same cache).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flowtrain.data.tokenizers import (
    EOT_TEXT,
    PAD_TEXT,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
)
from flowtrain.errors import DataError


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255: printable Latin-1 stands for itself, the other bytes
    take the code points from 256 on, in byte order (how byte-level BPE makes bytes into characters)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_in, extra = {}, 0
    for b in range(256):
        if b in printable:
            stand_in[b] = chr(b)
        else:
            stand_in[b] = chr(256 + extra)
            extra += 1
    return [stand_in[b] for b in range(256)]


def _no_merges(vocab: list[str], specials: list[str]):
    from tokenizers import AddedToken, models
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=[]))
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return hf


def byte_tokenizer_json() -> str:
    """tokenizer.json of ByteTokenizer: ids 0..255 are the bytes, 256 EOT, 257 PAD."""
    from tokenizers import decoders, pre_tokenizers

    hf = _no_merges(byte_alphabet(), [EOT_TEXT, PAD_TEXT])
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    return hf.to_str()


def char_tokenizer_json(chars: str) -> str:
    """tokenizer.json of CharTokenizer(chars): id i is chars[i], then EOT."""
    from tokenizers import decoders

    hf = _no_merges(list(chars), [EOT_TEXT])
    hf.decoder = decoders.Fuse()
    return hf.to_str()


def hf_tokenizer_json(tokenizer: Tokenizer) -> str:
    """The tokenizer.json a transformers directory gets for `tokenizer` (BPE: its own file, unchanged)."""
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.hf_json
    if isinstance(tokenizer, ByteTokenizer):
        return byte_tokenizer_json()
    if isinstance(tokenizer, CharTokenizer):
        return char_tokenizer_json(tokenizer.chars)
    raise DataError(f"a {tokenizer.kind} tokenizer has no tokenizer.json form; use a char, byte or bpe tokenizer")


def _canonical(text: str) -> Any:
    """The tokenizer as the `tokenizers` library writes it (its own defaults filled in), as a JSON value."""
    from tokenizers import Tokenizer as HFTokenizer

    return json.loads(HFTokenizer.from_str(text).to_str())


def flowtrain_equivalent(obj: dict[str, Any], text: str) -> Tokenizer | None:
    """The char or byte tokenizer whose tokenizer.json `text` (parsed: `obj`) is, or None (most are not)."""
    model = obj.get("model")
    if not (isinstance(model, dict) and model.get("type") == "BPE" and model.get("merges") == []):
        return None  # cheap test first: real BPE tokenizers have merges
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        return None
    try:
        ordered = [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        candidates: list[Tokenizer] = []
        if ordered == byte_alphabet():
            candidates.append(ByteTokenizer())
        if all(len(t) == 1 for t in ordered) and ordered == sorted(ordered):
            candidates.append(CharTokenizer("".join(ordered)))
        for candidate in candidates:
            if _canonical(hf_tokenizer_json(candidate)) == _canonical(text):
                return candidate
    except Exception:  # anything odd in a foreign file means "not ours"
        return None
    return None


# ---- a transformers model directory ---------------------------------------------------------------------------
def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} cannot be read as JSON ({exc}); repair or re-save the directory") from None
    return obj if isinstance(obj, dict) else {}


def special_tokens(directory: Path, hf: Any) -> tuple[str | None, str | None]:
    """(end-of-text, padding) token texts of a transformers directory: tokenizer_config.json's eos_token and
    pad_token, else special_tokens_map.json's; the end-of-text token else from the eos_token_id of
    generation_config.json or config.json, else <|endoftext|>. A padding token that is the end-of-text token
    counts as none (flowtrain then pads with EOT and masks it out, the same thing); none named: <|pad|>, if
    the tokenizer has it (flowtrain's convention)."""
    eos = pad = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        obj = _read_json(directory / name)
        eos = eos or _token_text(obj.get("eos_token"))
        pad = pad or _token_text(obj.get("pad_token"))
    for name in ("generation_config.json", "config.json"):
        value = _read_json(directory / name).get("eos_token_id")
        value = value[0] if isinstance(value, list) and value else value
        if eos is None and isinstance(value, int):
            eos = hf.id_to_token(value)
    if eos is None and hf.token_to_id(EOT_TEXT) is not None:
        eos = EOT_TEXT
    if pad is None:
        pad = PAD_TEXT if hf.token_to_id(PAD_TEXT) is not None else None
    return eos, (None if pad == eos else pad)


def load_tokenizer_dir(directory: Path) -> Tokenizer:
    """The tokenizer of a transformers model directory (its tokenizer.json, end-of-text token from its configs)."""
    from tokenizers import Tokenizer as HFTokenizer

    directory = Path(directory)
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise DataError(
            f"{directory} has no tokenizer.json (the file a fast tokenizer saves); write one with "
            f"AutoTokenizer.from_pretrained('{directory}').save_pretrained('{directory}')"
        )
    try:
        text = file.read_text(encoding="utf-8")
        obj = json.loads(text)
        hf = HFTokenizer.from_str(text)
    except (OSError, ValueError) as exc:
        raise DataError(f"{file} cannot be read ({exc}); re-save the tokenizer") from None
    except Exception as exc:  # the Rust side raises a bare Exception
        raise DataError(f"{file} is not a valid Hugging Face tokenizer ({exc}); re-save the tokenizer") from None
    ours = flowtrain_equivalent(obj, text)
    if ours is not None:
        return ours
    eos, pad = special_tokens(directory, hf)
    if eos is None or hf.token_to_id(eos) is None:
        raise DataError(
            f"{directory} names no end-of-text token that its tokenizer.json has (eos_token in "
            "tokenizer_config.json); set eos_token there: flowtrain ends every document with it"
        )
    return BPETokenizer(hf, eot_text=eos, pad_text=pad if pad is not None and hf.token_to_id(pad) is not None else None)
