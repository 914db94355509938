"""The HTML writer: self-contained pages, escaping, and images that a real browser loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chromium_check import check_images, chromium_path
from workbench import study_plots
from workbench.report import Details, Image, Raw, Section, Table, badge, fmt_ci, render_html, write_report


def _png() -> bytes:
    fig = study_plots.figure(2, 1.5)
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    return study_plots.png(fig)


def test_render_escapes_text_and_keeps_trusted_markup() -> None:
    sec = Section("A <b>title</b>", blocks=[Table(["x<y"], [["<script>", Raw("<b>ok</b>"), 1.23456789]]),
                                            Details("more", [Raw("inner")])])
    page = render_html("T & co", [sec])
    assert "A &lt;b&gt;title&lt;/b&gt;" in page and "&lt;script&gt;" in page and "<script>" not in page
    assert "<b>ok</b>" in page and "1.235" in page and "<details><summary>more</summary>" in page
    assert "v-held" in badge("held") and "v-none" in badge(None)
    assert fmt_ci(1.0, [0.5, None]) == "1" and fmt_ci(None, None) == "–"


def test_report_is_self_contained(tmp_path: Path) -> None:
    path = write_report(tmp_path / "r.html", "t", [Section("s", blocks=[Image("a plot", _png())])])
    page = path.read_text()
    assert page.count("data:image/png;base64,") == 1
    assert "src='http" not in page and "href='http" not in page


def test_chromium_loads_every_image_and_flags_a_broken_one(tmp_path: Path) -> None:
    if chromium_path() is None:
        pytest.skip("chromium is not installed (make browser)")
    good = write_report(tmp_path / "good.html", "good", [Section("s", blocks=[Image("one", _png()),
                                                                             Image("two", _png())])])
    result = check_images(good)
    assert result["n"] == 2 and result["bad"] == [] and all(w > 0 for w in result["widths"])
    bad = write_report(tmp_path / "bad.html", "bad", [Section("s", blocks=[Image("fine", _png()),
                                                                          Image("broken", b"not a png")])])
    result = check_images(bad)
    assert result["n"] == 2 and result["bad"] == ["broken"]
