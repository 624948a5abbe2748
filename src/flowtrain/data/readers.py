"""Reading one file of a corpus, streamed: memory stays flat however large the file (docs/performance.md).

Every reader yields `Piece`s: a document's text, whole or in parts. A plain text file is one document, read in
blocks of PIECE_BYTES and cut only before the last whitespace character of a run that lies between two
non-whitespace characters. Byte-level BPE's pre-tokenizer (GPT-2's pattern) splits the text there anyway, so
encoding the pieces one by one gives exactly the tokens of the whole file (tested), and char and byte tokens
never depend on where a text is cut. JSONL is read a line at a time, Parquet and Arrow a record batch at a time;
every byte read goes to the source's content hash once.
"""

from __future__ import annotations

import codecs
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from flowtrain.errors import DataError

# a text is read and encoded 16 kB at a time: Hugging Face's encoder is fastest on short texts (measured:
# docs/performance.md) and encodes a batch of them in parallel
PIECE_BYTES = 1 << 14
WHOLE_BYTES = 8 << 20  # inside a directory, files up to this size are read whole (checked, then cut)
BINARY_SNIFF = 8192
_WS_RUN = re.compile(rb"[\t-\r ]+")  # ASCII whitespace runs: candidate places to cut a long text


class Piece(NamedTuple):
    """A document's text or a part of it; `end`: the document ends with it. `split`: "train" or "val" when the
    source fixed the document's split (a DatasetDict's own splits), None when the configured split decides."""

    text: str
    end: bool = True
    split: str | None = None


def join_pieces(pieces: Iterable[Piece]) -> Iterator[Piece]:
    """Whole documents from pieces (what a tokenizer that must see a document at once is given)."""
    parts: list[str] = []
    for piece in pieces:
        parts.append(piece.text)
        if piece.end:
            yield Piece("".join(parts), True, piece.split)
            parts = []


def decode_strict(raw: bytes, path: Path, offset: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not valid UTF-8 (byte offset {offset + exc.start}); convert it to UTF-8 or remove it from "
            "data.sources"
        ) from None


def decode_or_count(raw: bytes, skipped: Counter) -> str | None:
    """UTF-8 text of a file in a collection, or None after counting why it was skipped (undecodable / empty)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        skipped["undecodable"] += 1
        return None
    if not text:
        skipped["empty"] += 1
        return None
    return text


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror}); check the path and its permissions") from None


def _open(path: Path):
    try:
        return open(path, "rb")  # noqa: SIM115 - the callers close it
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror}); check the path and its permissions") from None


def hash_file(path: Path, hasher) -> None:
    with _open(path) as f:
        while block := f.read(PIECE_BYTES):
            hasher.update(block)


def _is_text_char(raw: bytes, first: bool) -> bool:
    """Whether the first (or last) whole character in `raw` exists and is not whitespace."""
    text = raw.decode("utf-8", "ignore")
    char = text[:1] if first else text[-1:]
    return bool(char) and not char.isspace()


def safe_cut(buf: bytes | bytearray, tail: int = 256) -> int | None:
    """The latest index where `buf` may be cut into pieces (see the module's docstring), or None."""
    for start in (max(0, len(buf) - tail), 0):
        for m in reversed(list(_WS_RUN.finditer(buf, start))):
            s, e = m.span()
            inside = s > 0 and e < len(buf)
            if inside and _is_text_char(buf[e : e + 4], True) and _is_text_char(buf[max(0, s - 4) : s], False):
                return e - 1
        if start == 0:
            break
    return None


def text_pieces(path: Path, hasher, *, raw: bytes | None = None, piece_bytes: int = PIECE_BYTES) -> Iterator[Piece]:
    """A text file (or its bytes `raw`, already hashed) as one document in pieces of about `piece_bytes` (a text
    without a place to cut stays whole); not UTF-8 is a DataError naming the byte offset."""
    with _open(path) if raw is None else io.BytesIO(raw) as f:
        buf, offset = bytearray(), 0  # offset: the file position of buf[0]
        while block := f.read(piece_bytes):
            if raw is None:
                hasher.update(block)
            buf += block
            cut = safe_cut(buf) if len(buf) >= piece_bytes else None
            if cut is not None:
                yield Piece(decode_strict(bytes(buf[:cut]), path, offset), end=False)
                del buf[:cut]
                offset += cut
        yield Piece(decode_strict(bytes(buf), path, offset), end=True)


def valid_text(path: Path) -> str | None:
    """None when the file is UTF-8 text, else why a collection skips it ("binary", "undecodable", "empty");
    streamed, so a large file is checked without holding it."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with _open(path) as f:
        head = f.read(BINARY_SNIFF)
        if not head:
            return "empty"
        if b"\0" in head:
            return "binary"
        try:
            decoder.decode(head)
            while block := f.read(PIECE_BYTES):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return "undecodable"
    return None


def jsonl_documents(path: Path, text_field: str, hasher, skipped: Counter) -> Iterator[Piece]:
    with _open(path) as f:
        offset = 0
        for lineno, raw in enumerate(f, start=1):
            hasher.update(raw)
            line = decode_strict(raw, path, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path} line {lineno} is not valid JSON ({exc.msg}); fix or remove that line"
                ) from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(
                    f"{path} line {lineno} has no field {text_field!r}; set data.text_field to the field holding "
                    "the text"
                )
            value = record[text_field]
            if value is None or value == "":
                skipped["empty"] += 1
                continue
            if not isinstance(value, str):
                raise DataError(
                    f"{path} line {lineno}: field {text_field!r} is {type(value).__name__}, not text; "
                    "set data.text_field to a text field"
                )
            yield Piece(value)


def _column_documents(batches, path: Path, text_field: str, skipped: Counter, split: str | None) -> Iterator[Piece]:
    for batch in batches:
        for value in batch.column(text_field).to_pylist():
            if value is None or value == "":
                skipped["empty"] += 1
                continue
            if not isinstance(value, str):
                raise DataError(
                    f"{path}: column {text_field!r} holds {type(value).__name__}, not text; "
                    "set data.text_field to a text column"
                )
            yield Piece(value, True, split)


def _require_column(names: list[str], path: Path, text_field: str) -> None:
    if text_field not in names:
        raise DataError(
            f"{path} has no column {text_field!r} (columns: {', '.join(names)}); set data.text_field to one of them"
        )


def parquet_documents(path: Path, text_field: str, hasher, skipped: Counter) -> Iterator[Piece]:
    import pyarrow.parquet as pq

    hash_file(path, hasher)
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError variants
        raise DataError(f"{path} is not a readable Parquet file ({exc}); replace it") from None
    _require_column(pf.schema_arrow.names, path, text_field)
    yield from _column_documents(pf.iter_batches(columns=[text_field]), path, text_field, skipped, None)


def arrow_documents(path: Path, text_field: str, hasher, skipped: Counter, split: str | None = None) -> Iterator[Piece]:
    """One .arrow file written by `datasets.save_to_disk` (Arrow IPC stream; the file format also works). Read
    through a file handle, not a memory map: pages of a map stay resident until it closes."""
    import pyarrow as pa

    hash_file(path, hasher)
    with pa.OSFile(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
            names = reader.schema.names
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                file_reader = pa.ipc.open_file(source)
            except pa.ArrowInvalid as exc:
                raise DataError(f"{path} is not a readable Arrow file ({exc}); re-save the dataset") from None
            names = file_reader.schema.names
            batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        _require_column(names, path, text_field)
        yield from _column_documents(batches, path, text_field, skipped, split)


def structured_reader(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return jsonl_documents
    if suffix == ".parquet":
        return parquet_documents
    return None
