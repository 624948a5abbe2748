"""Sources → documents: the built-in corpora, text files, directories, JSONL, Parquet and HF datasets on disk.

`Corpus(sources, ...)` resolves every source up front (so a bad path fails before any work) and then yields
documents in a fixed order, so the same input always gives the same token stream; they come in pieces
(`pieces()`: a long file is read 16 kB at a time, data/readers.py), and `documents()` joins them. Two fingerprints exist
for different jobs: `identity()` is cheap (paths, sizes, mtimes) and keys the dataset cache; the content
hash (sha256 of every byte read) is computed while documents are read and recorded in meta.json.

Policy for bad input: in the built-in corpora and inside directories, undecodable, binary and empty files
are skipped and counted (`skipped`); a single file the user named explicitly must be valid UTF-8 or it is a
DataError naming the file and byte offset.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from flowtrain.data.config import BUILTIN_CORPORA
from flowtrain.data.readers import (
    BINARY_SNIFF,
    WHOLE_BYTES,
    Piece,
    decode_or_count,
    hash_file,
    join_pieces,
    read_bytes,
    structured_reader,
    text_pieces,
    valid_text,
)
from flowtrain.errors import DataError


class Source:
    """One entry of data.sources. Subclasses yield pieces of documents (readers.Piece) and feed every raw byte
    they read to `hasher`."""

    kind = "source"

    def __init__(self, name: str) -> None:
        self.name = name

    def identity(self) -> dict:
        """Cheap description of everything that affects the documents (for the cache key)."""
        raise NotImplementedError

    def size_bytes(self) -> int:
        """Approximate input size, for the progress bar."""
        return 0

    def pieces(self, skipped: Counter, hasher) -> Iterator[Piece]:
        raise NotImplementedError

    def documents(self, skipped: Counter, hasher) -> Iterator[str]:
        """Whole documents (a long file's pieces joined)."""
        return (p.text for p in join_pieces(self.pieces(skipped, hasher)))


class FileListSource(Source):
    """A source that is a sorted list of files under a root."""

    def __init__(self, name: str, root: Path, files: list[Path]) -> None:
        super().__init__(name)
        self.root = root
        self.files = files

    def identity(self) -> dict:
        listing = hashlib.sha256()
        for f in self.files:
            st = f.stat()
            listing.update(f"{f.relative_to(self.root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {"kind": self.kind, "source": self.name, "root": str(self.root), "files": listing.hexdigest()}

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


class StdlibSource(FileListSource):
    """Every .py file of the running Python's standard library (site-packages excluded), in path order."""

    kind = "python-stdlib"

    def __init__(self) -> None:
        root = Path(sysconfig.get_paths()["stdlib"]).resolve()
        skip = {"site-packages", "dist-packages", "__pycache__"}
        files = sorted(
            (p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts) and p.is_file()),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        super().__init__("python-stdlib", root, files)

    def pieces(self, skipped: Counter, hasher) -> Iterator[Piece]:
        for path in self.files:
            raw = path.read_bytes()
            hasher.update(raw)
            if decode_or_count(raw, skipped) is not None:  # a few stdlib test fixtures are deliberately not UTF-8
                yield from text_pieces(path, hasher, raw=raw)


class DocsSource(Source):
    """The English text of the running Python's pydoc topics (`pydoc_data.topics`), one topic per document."""

    kind = "python-docs"

    def __init__(self) -> None:
        super().__init__("python-docs")
        from pydoc_data.topics import topics

        self.topics = {k: topics[k] for k in sorted(topics)}

    def identity(self) -> dict:
        digest = hashlib.sha256(json.dumps(self.topics, sort_keys=True).encode()).hexdigest()
        return {"kind": self.kind, "python": sys.version, "topics": digest}

    def size_bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.topics.values())

    def pieces(self, skipped: Counter, hasher) -> Iterator[Piece]:
        for text in self.topics.values():
            hasher.update(text.encode("utf-8"))
            if not text:
                skipped["empty"] += 1
                continue
            yield Piece(text)


class FileSource(FileListSource):
    """A single file the user named: plain text (one document), JSONL or Parquet (one document per record)."""

    kind = "file"

    def __init__(self, path: Path, text_field: str) -> None:
        super().__init__(str(path), path.parent, [path])
        self.text_field = text_field

    def identity(self) -> dict:
        return {**super().identity(), "text_field": self.text_field}

    def pieces(self, skipped: Counter, hasher) -> Iterator[Piece]:
        path = self.files[0]
        reader = structured_reader(path)
        if reader is not None:
            yield from reader(path, self.text_field, hasher, skipped)
        elif path.stat().st_size == 0:
            skipped["empty"] += 1
        else:
            yield from text_pieces(path, hasher)


def _matches(rel: str, patterns: list[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


class DirectorySource(FileListSource):
    """Every file under a directory (recursive, hidden entries skipped), filtered by include/exclude globs
    (matched against the relative path or the file name). Binary and undecodable files are skipped."""

    kind = "directory"

    def __init__(self, root: Path, text_field: str, include: list[str], exclude: list[str]) -> None:
        files = []
        for p in root.rglob("*"):
            rel = p.relative_to(root).as_posix()
            if any(part.startswith(".") for part in p.relative_to(root).parts) or not p.is_file():
                continue
            if include and not _matches(rel, include):
                continue
            if exclude and _matches(rel, exclude):
                continue
            files.append(p)
        files.sort(key=lambda p: p.relative_to(root).as_posix())
        super().__init__(str(root), root, files)
        self.text_field, self.include, self.exclude = text_field, include, exclude

    def identity(self) -> dict:
        return {**super().identity(), "text_field": self.text_field, "include": self.include, "exclude": self.exclude}

    def pieces(self, skipped: Counter, hasher) -> Iterator[Piece]:
        for path in self.files:
            reader = structured_reader(path)
            if reader is not None:
                yield from reader(path, self.text_field, hasher, skipped)
            elif path.stat().st_size <= WHOLE_BYTES:
                raw = read_bytes(path)
                hasher.update(raw)
                if b"\0" in raw[:BINARY_SNIFF]:
                    skipped["binary"] += 1
                elif decode_or_count(raw, skipped) is not None:
                    yield from text_pieces(path, hasher, raw=raw)
            elif (why := valid_text(path)) is not None:  # a large file is checked first, then streamed
                hash_file(path, hasher)
                skipped[why] += 1
            else:
                yield from text_pieces(path, hasher)


def resolve_source(spec: str, *, text_field: str = "text", include=(), exclude=(), splits=None) -> Source:
    """Turn one data.sources entry into a Source, failing now if the path does not exist. `splits`: data.splits,
    for a DatasetDict saved with save_to_disk (data/hf_disk.py)."""
    from flowtrain.data.hf_disk import HFDiskSource

    if spec == "python-stdlib":
        return StdlibSource()
    if spec == "python-docs":
        return DocsSource()
    path = Path(spec).expanduser()
    if path.is_dir():
        if HFDiskSource.looks_like(path):
            return HFDiskSource(path, text_field, splits or {})
        return DirectorySource(path, text_field, list(include), list(exclude))
    if path.is_file():
        return FileSource(path, text_field)
    raise DataError(
        f"data source {spec!r} does not exist; give an existing file or directory, "
        f"or a built-in corpus ({', '.join(BUILTIN_CORPORA)})"
    )


class Corpus:
    """The documents of all sources, in order. `skipped` counts what was left out, by reason."""

    def __init__(self, sources: list[str], *, text_field: str = "text", include=(), exclude=(), splits=None) -> None:
        if not sources:
            raise DataError("no data sources given; set data.sources to a path or python-stdlib/python-docs")
        self.sources = [
            resolve_source(s, text_field=text_field, include=include, exclude=exclude, splits=splits) for s in sources
        ]
        if splits and not any(getattr(s, "is_dict", False) for s in self.sources):
            raise DataError(
                f"data.splits is set ({splits}) but no source is a DatasetDict saved with save_to_disk (a directory "
                "with dataset_dict.json); remove data.splits"
            )
        self.skipped: Counter = Counter()
        self.content_hashes: dict[str, str] = {}

    def identity(self) -> list[dict]:
        return [s.identity() for s in self.sources]

    def size_bytes(self) -> int:
        return sum(s.size_bytes() for s in self.sources)

    def predefined_splits(self) -> dict[str, dict]:
        """Per source with splits of its own: which of its splits are train and val, and which are not used."""
        return {s.name: s.split_plan() for s in self.sources if getattr(s, "is_dict", False)}

    def pieces(self) -> Iterator[Piece]:
        """Every document, in pieces (readers.Piece); afterwards `skipped` and `content_hashes` describe this pass."""
        self.skipped = Counter()
        self.content_hashes = {}
        for source in self.sources:
            hasher = hashlib.sha256()
            yield from source.pieces(self.skipped, hasher)
            self.content_hashes[source.name] = hasher.hexdigest()

    def sample_stride(self, sample_bytes: int) -> int:
        """k such that every k-th piece makes about `sample_bytes` (1: all of them, also for sample_bytes=0)."""
        size = self.size_bytes() if sample_bytes else 0
        return -(-size // sample_bytes) if size > sample_bytes else 1

    def texts(self, sample_bytes: int = 0) -> Iterator[str]:
        """The pieces' texts (what a tokenizer is trained on: no piece holds a whole large file); with
        `sample_bytes`, every sample_stride(sample_bytes)-th piece."""
        every = self.sample_stride(sample_bytes)
        return (p.text for i, p in enumerate(self.pieces()) if i % every == 0)

    def documents(self) -> Iterator[str]:
        """Every whole document (a long file's pieces joined)."""
        return (p.text for p in join_pieces(self.pieces()))
