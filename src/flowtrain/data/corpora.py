"""Sources → documents: the built-in corpora, text files, directories, JSONL, Parquet and HF datasets on disk.

`Corpus(sources, ...)` resolves every source up front (so a bad path fails before any work) and then yields
documents in a fixed order, so the same input always gives the same token stream. Two fingerprints exist
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
from flowtrain.errors import DataError

_BINARY_SNIFF = 8192


def _decode_strict(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not valid UTF-8 (byte offset {exc.start}); convert it to UTF-8 or remove it from data.sources"
        ) from None


def _decode_or_count(raw: bytes, skipped: Counter) -> str | None:
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


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror}); check the path and its permissions") from None


class Source:
    """One entry of data.sources. Subclasses yield documents and feed every raw byte they read to `hasher`."""

    kind = "source"

    def __init__(self, name: str) -> None:
        self.name = name

    def identity(self) -> dict:
        """Cheap description of everything that affects the documents (for the cache key)."""
        raise NotImplementedError

    def size_bytes(self) -> int:
        """Approximate input size, for the progress bar."""
        return 0

    def documents(self, skipped: Counter, hasher) -> Iterator[str]:
        raise NotImplementedError


class _FileListSource(Source):
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


class StdlibSource(_FileListSource):
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

    def documents(self, skipped: Counter, hasher) -> Iterator[str]:
        for path in self.files:
            raw = path.read_bytes()
            hasher.update(raw)
            text = _decode_or_count(raw, skipped)  # a few stdlib test fixtures are deliberately not UTF-8
            if text is not None:
                yield text


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

    def documents(self, skipped: Counter, hasher) -> Iterator[str]:
        for text in self.topics.values():
            hasher.update(text.encode("utf-8"))
            if not text:
                skipped["empty"] += 1
                continue
            yield text


def _jsonl_documents(path: Path, text_field: str, hasher, skipped: Counter) -> Iterator[str]:
    raw = _read_bytes(path)
    hasher.update(raw)
    text = _decode_strict(raw, path)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {lineno} is not valid JSON ({exc.msg}); fix or remove that line") from None
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(
                f"{path} line {lineno} has no field {text_field!r}; set data.text_field to the field holding the text"
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
        yield value


def _column_documents(table_batches, path: Path, text_field: str, skipped: Counter) -> Iterator[str]:
    for batch in table_batches:
        for value in batch.column(text_field).to_pylist():
            if value is None or value == "":
                skipped["empty"] += 1
                continue
            if not isinstance(value, str):
                raise DataError(
                    f"{path}: column {text_field!r} holds {type(value).__name__}, not text; "
                    "set data.text_field to a text column"
                )
            yield value


def _require_column(names: list[str], path: Path, text_field: str) -> None:
    if text_field not in names:
        raise DataError(
            f"{path} has no column {text_field!r} (columns: {', '.join(names)}); set data.text_field to one of them"
        )


def _parquet_documents(path: Path, text_field: str, hasher, skipped: Counter) -> Iterator[str]:
    import pyarrow.parquet as pq

    hasher.update(_read_bytes(path))
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError variants
        raise DataError(f"{path} is not a readable Parquet file ({exc}); replace it") from None
    _require_column(pf.schema_arrow.names, path, text_field)
    yield from _column_documents(pf.iter_batches(columns=[text_field]), path, text_field, skipped)


def _arrow_documents(path: Path, text_field: str, hasher, skipped: Counter) -> Iterator[str]:
    """One .arrow file written by `datasets.save_to_disk` (Arrow IPC stream; the file format also works)."""
    import pyarrow as pa

    hasher.update(_read_bytes(path))
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        batches = iter(reader)
        names = reader.schema.names
    except pa.ArrowInvalid:
        try:
            file_reader = pa.ipc.open_file(pa.memory_map(str(path)))
        except pa.ArrowInvalid as exc:
            raise DataError(f"{path} is not a readable Arrow file ({exc}); re-save the dataset") from None
        names = file_reader.schema.names
        batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
    _require_column(names, path, text_field)
    yield from _column_documents(batches, path, text_field, skipped)


def _structured_reader(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_documents
    if suffix == ".parquet":
        return _parquet_documents
    return None


class FileSource(_FileListSource):
    """A single file the user named: plain text (one document), JSONL or Parquet (one document per record)."""

    kind = "file"

    def __init__(self, path: Path, text_field: str) -> None:
        super().__init__(str(path), path.parent, [path])
        self.text_field = text_field

    def identity(self) -> dict:
        return {**super().identity(), "text_field": self.text_field}

    def documents(self, skipped: Counter, hasher) -> Iterator[str]:
        path = self.files[0]
        reader = _structured_reader(path)
        if reader is not None:
            yield from reader(path, self.text_field, hasher, skipped)
            return
        raw = _read_bytes(path)
        hasher.update(raw)
        text = _decode_strict(raw, path)
        if not text:
            skipped["empty"] += 1
            return
        yield text


def _matches(rel: str, patterns: list[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


class DirectorySource(_FileListSource):
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

    def documents(self, skipped: Counter, hasher) -> Iterator[str]:
        for path in self.files:
            reader = _structured_reader(path)
            if reader is not None:
                yield from reader(path, self.text_field, hasher, skipped)
                continue
            raw = _read_bytes(path)
            hasher.update(raw)
            if b"\0" in raw[:_BINARY_SNIFF]:
                skipped["binary"] += 1
                continue
            text = _decode_or_count(raw, skipped)
            if text is not None:
                yield text


class HFDiskSource(_FileListSource):
    """A directory written by `datasets.Dataset.save_to_disk` (or DatasetDict), read with pyarrow only."""

    kind = "hf-disk"

    def __init__(self, root: Path, text_field: str) -> None:
        files = [root / f for f in self._arrow_files(root)]
        super().__init__(str(root), root, files)
        self.text_field = text_field

    @staticmethod
    def looks_like(root: Path) -> bool:
        return (root / "state.json").is_file() or (root / "dataset_dict.json").is_file()

    @classmethod
    def _arrow_files(cls, root: Path) -> list[str]:
        def read_json(path: Path) -> dict:
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise DataError(f"{path} is unreadable ({exc}); re-save the dataset with save_to_disk") from None

        if (root / "dataset_dict.json").is_file():
            splits = read_json(root / "dataset_dict.json").get("splits", [])
            return [f"{s}/{f}" for s in splits for f in cls._arrow_files(root / s)]
        state = read_json(root / "state.json")
        names = [entry["filename"] for entry in state.get("_data_files", []) if "filename" in entry]
        if not names:
            raise DataError(f"{root}/state.json lists no data files; re-save the dataset with save_to_disk")
        return names

    def identity(self) -> dict:
        return {**super().identity(), "text_field": self.text_field}

    def documents(self, skipped: Counter, hasher) -> Iterator[str]:
        for path in self.files:
            if not path.is_file():
                raise DataError(f"{path} is missing from the saved dataset; re-save it with save_to_disk")
            yield from _arrow_documents(path, self.text_field, hasher, skipped)


def resolve_source(spec: str, *, text_field: str = "text", include=(), exclude=()) -> Source:
    """Turn one data.sources entry into a Source, failing now if the path does not exist."""
    if spec == "python-stdlib":
        return StdlibSource()
    if spec == "python-docs":
        return DocsSource()
    path = Path(spec).expanduser()
    if path.is_dir():
        if HFDiskSource.looks_like(path):
            return HFDiskSource(path, text_field)
        return DirectorySource(path, text_field, list(include), list(exclude))
    if path.is_file():
        return FileSource(path, text_field)
    raise DataError(
        f"data source {spec!r} does not exist; give an existing file or directory, "
        f"or a built-in corpus ({', '.join(BUILTIN_CORPORA)})"
    )


class Corpus:
    """The documents of all sources, in order. `skipped` counts what was left out, by reason."""

    def __init__(self, sources: list[str], *, text_field: str = "text", include=(), exclude=()) -> None:
        if not sources:
            raise DataError("no data sources given; set data.sources to a path or python-stdlib/python-docs")
        self.sources = [resolve_source(s, text_field=text_field, include=include, exclude=exclude) for s in sources]
        self.skipped: Counter = Counter()
        self.content_hashes: dict[str, str] = {}

    def identity(self) -> list[dict]:
        return [s.identity() for s in self.sources]

    def size_bytes(self) -> int:
        return sum(s.size_bytes() for s in self.sources)

    def documents(self) -> Iterator[str]:
        """Yield every document; afterwards `skipped` and `content_hashes` describe this pass."""
        self.skipped = Counter()
        self.content_hashes = {}
        for source in self.sources:
            hasher = hashlib.sha256()
            yield from source.documents(self.skipped, hasher)
            self.content_hashes[source.name] = hasher.hexdigest()
