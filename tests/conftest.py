"""Shared fixtures: small real corpora and a tiny, fast run config."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(1)  # tiny test models run fastest (and least noisily) on one thread


@pytest.fixture
def shakespeare_path() -> Path:
    if not SHAKESPEARE.exists():
        pytest.skip(f"reference corpus not found at {SHAKESPEARE}")
    return SHAKESPEARE


@pytest.fixture
def small_text(tmp_path: Path, shakespeare_path: Path) -> Path:
    """The first 60 kB of Tiny Shakespeare: real text, small enough for quick runs."""
    path = tmp_path / "small.txt"
    path.write_text(shakespeare_path.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return path


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
