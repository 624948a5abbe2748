"""Shared fixtures of the lab tests: a small real corpus and its own dataset cache."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest

from tests.conftest import write_corpus


@pytest.fixture(scope="session")
def lab_data(tmp_path_factory) -> Path:
    """60 kB of real text (tests/conftest.py: corpus_text; byte tokens make it ~60k tokens)."""
    return write_corpus(tmp_path_factory.mktemp("lab_data") / "small.txt")


@pytest.fixture(autouse=True)
def _lab_cache(tmp_path_factory, monkeypatch):
    """Prepared datasets go to a test-session cache, never the user's ~/.cache."""
    monkeypatch.setenv("FLOWTRAIN_CACHE", str(tmp_path_factory.getbasetemp() / "lab_cache"))


def check_report(result, evil_fragment: str | None = None) -> str:
    """The study wrote one self-contained, escaped HTML page with its verdict table and figures."""
    page = result.report.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()  # no JavaScript at all, and nothing injected
    assert 'id="verdict"' in page and "What you are seeing" in page
    for finding in result.findings:  # every measured line is on the page, escaped
        assert html.escape(finding.measured, quote=True) in page
    assert page.count("<svg") >= 4  # the study's own figures and the report's
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing loaded from the network
    if evil_fragment is not None:
        assert evil_fragment not in page
        assert html.escape(evil_fragment, quote=True) in page
    assert (result.out_dir / "verdicts.json").is_file()
    return page
