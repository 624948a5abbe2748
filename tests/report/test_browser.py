"""The report in a real browser: headless Chromium opens it with no console errors, no script runs (an escaped
`<script>` run name stays text), every figure has a rendered size, and a screenshot is far from blank."""

import io

import pytest
from PIL import Image

from flowtrain.report import build_report
from tests.report.conftest import write_run

pytestmark = pytest.mark.browser


def test_report_renders_in_chromium(tmp_path, browser):
    from selenium.common.exceptions import NoAlertPresentException

    evil = "<script>alert(1)</script>"
    runs = [
        write_run(
            tmp_path / "runs",
            name=evil,
            steps=40,
            rollback=(20, 4),
            run_name_in_config=evil,
            alert_text="<img src=x onerror=alert(2)>",
        ),
        write_run(tmp_path / "runs", name="baseline", steps=40, lr=3e-4),
    ]
    out = build_report(runs, tmp_path / "report.html")
    browser.get(out.resolve().as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert  # noqa: B018 - the property raises when no dialog is open
    assert browser.execute_script("return document.scripts.length") == 0
    title = browser.execute_script("return document.querySelector('h1').textContent")
    assert evil in title  # shown as text

    sizes = browser.execute_script(
        "return Array.from(document.querySelectorAll('svg, img')).map(e => {"
        "const r = e.getBoundingClientRect(); return [r.width, r.height]; })"
    )
    assert len(sizes) == 10  # one inline <svg> per figure (several runs share a figure)
    assert all(w > 100 and h > 50 for w, h in sizes), sizes

    errors = [e for e in browser.get_log("browser") if e.get("level") in ("SEVERE", "ERROR", "WARNING")]
    assert errors == []

    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1200, min(height, 4000))
    shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    colours = shot.getcolors(1 << 24)
    assert len(colours) > 200, f"screenshot looks blank: {len(colours)} distinct colours"
    top = max(count for count, _ in colours)
    assert top < 0.9 * shot.width * shot.height  # not one flat colour
