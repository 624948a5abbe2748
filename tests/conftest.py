"""Shared fixtures: a small real corpus (derived from the built-in one: no download, nothing outside the
repository) and a tiny, fast run config."""

from __future__ import annotations

import functools
import hashlib
import shutil
import string
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from flowtrain.data.corpora import DocsSource

_PROSE = set(string.ascii_letters + " \n.,;:'\"()-?!")


def _is_prose(paragraph: str) -> bool:
    """A plain English paragraph: not a code block (indented), a heading, a grammar rule or a table."""
    if len(paragraph) < 200 or paragraph[0].isspace() or any(m in paragraph for m in ("::=", "***", "===", "---")):
        return False
    return sum(c in _PROSE for c in paragraph) >= 0.97 * len(paragraph)


@functools.cache
def corpus_text(n_chars: int = 60_000) -> str:
    """The first `n_chars` of the prose in the built-in python-docs corpus (the English text of the running
    Python's pydoc topics, data/corpora.py), in the corpus's fixed order. Code blocks, grammar, tables and rare
    symbols are left out, so the text is as even as a novel and a healthy tiny run has no loss or gradient
    spikes. Every machine with Python has it: the suite needs no download and nothing outside the repository."""
    paragraphs = []
    for doc in DocsSource().documents(Counter(), hashlib.sha256()):
        paragraphs += [p.strip("\n") for p in doc.split("\n\n") if _is_prose(p.strip("\n"))]
    text = "".join(c for c in "\n\n".join(paragraphs) if c in _PROSE) + "\n"  # no rare symbols left in it
    assert len(text) >= n_chars, f"the python-docs corpus has only {len(text)} characters of prose"
    return text[:n_chars]


def write_corpus(path: Path, n_chars: int = 60_000) -> Path:
    """`corpus_text(n_chars)` written to `path` (UTF-8)."""
    path.write_text(corpus_text(n_chars), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(1)  # tiny test models run fastest (and least noisily) on one thread


@pytest.fixture
def small_text(tmp_path: Path) -> Path:
    """60 kB of real text (corpus_text), small enough for quick runs."""
    return write_corpus(tmp_path / "small.txt")


# ---- headless Chromium for the report's browser tests (Debian packages chromium + chromium-driver) ----------
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1200,900",
]


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("Chromium or chromedriver not installed (Debian: apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium", reason="selenium not installed (pip install -e '.[dev]')")
    return browser, driver


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium (selenium) with console logging; skips only where Chromium is not installed."""
    binary, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def tiny_overrides(text: Path, tmp_path: Path, **extra: object) -> list[str]:
    """Overrides for a seconds-long char-level run on `text`, writing under tmp_path."""
    base = {
        "data.sources": f"[{text}]",
        "data.tokenizer": "char",
        "data.split_by": "tokens",
        "data.cache_dir": str(tmp_path / "cache"),
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 32,
        "model.block_size": 32,
        "train.batch_size": 4,
        "train.max_steps": 20,
        "train.eval_interval": 10,
        "train.eval_batches": 2,
        "train.checkpoint_interval": 10,
        "train.out_dir": str(tmp_path / "runs"),
        "train.run_name": "tiny",
        "train.sample_tokens": 20,
        "schedule.warmup_steps": 5,
        "log.console": False,
        "log.tensorboard": False,
    }
    base.update({k: v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]
