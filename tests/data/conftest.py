"""Shared fixtures: small corpora written to tmp dirs and prepared into datasets."""

from pathlib import Path

import pytest

from flowtrain.data.config import DataConfig
from flowtrain.data.dataset import TokenDataset
from flowtrain.data.prepare import prepare_dataset


def make_docs(n: int = 40) -> list[str]:
    """Documents of varied lengths (some longer than a row of 32 tokens, some much shorter) with non-ASCII."""
    return [f"doc {i:03d}: " + ("héllo wörld " * (1 + (i * 7) % 13)) + f"end {i}\n" for i in range(n)]


@pytest.fixture
def docs_dir(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    root.mkdir()
    for i, text in enumerate(make_docs()):
        (root / f"d{i:03d}.txt").write_text(text, encoding="utf-8")
    return root


def prepare(tmp_path: Path, sources, name: str = "ds", **kw) -> TokenDataset:
    cfg = DataConfig(sources=[str(s) for s in sources], **kw)
    return TokenDataset.open(prepare_dataset(cfg, tmp_path / name, progress=False))


@pytest.fixture
def byte_ds(tmp_path: Path, docs_dir: Path) -> TokenDataset:
    return prepare(tmp_path, [docs_dir], tokenizer="byte")
