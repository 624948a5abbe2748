"""A study report in headless Chromium: no console errors, no script, every figure rendered with a size."""

from __future__ import annotations

import pytest

from flowtrain.lab import run_study

pytestmark = pytest.mark.browser


def test_study_report_renders_in_chromium(lab_data, tmp_path, browser):
    result = run_study("warmup", quick=True, data=lab_data, out=tmp_path / "warmup <i>")
    browser.get(result.report.resolve().as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    assert browser.execute_script("return document.scripts.length") == 0
    rows = browser.execute_script("return document.querySelectorAll('#verdict table tr').length")
    assert rows == len(result.findings) + 1
    sizes = browser.execute_script(
        "return Array.from(document.querySelectorAll('figure svg')).map(e => {"
        "const r = e.getBoundingClientRect(); return [r.width, r.height]; })"
    )
    assert len(sizes) >= 10 and all(w > 100 and h > 50 for w, h in sizes), sizes
    errors = [e for e in browser.get_log("browser") if e.get("level") in ("SEVERE", "ERROR", "WARNING")]
    assert errors == []
