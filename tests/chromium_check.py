"""Open an HTML report in headless Chromium and report which images loaded (test helper).

A copy of the page gets a small script that, after the load event, writes the number of
images and those without pixels (`naturalWidth == 0`) into the DOM; Chromium's
`--dump-dom` prints the DOM after load, and we read that back.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--virtual-time-budget=15000")
_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.alt; });
  var widths = imgs.map(function (i) { return i.naturalWidth; });
  var d = document.createElement('div'); d.id = 'img-check';
  d.textContent = JSON.stringify({n: imgs.length, bad: bad, widths: widths, title: document.title});
  document.body.appendChild(d);
});
</script>"""


def chromium_path() -> str | None:
    return CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")


def check_images(report: Path, *, timeout: float = 120.0) -> dict[str, Any]:
    """{'n': images, 'bad': alts of images that did not load, 'widths': natural widths, 'title': ...}."""
    exe = chromium_path()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (Debian package 'chromium'; `make browser` installs it)")
    text = Path(report).read_text(encoding="utf-8")
    if "</body>" not in text:
        raise ValueError(f"{report} has no </body>")
    with tempfile.TemporaryDirectory(prefix="wb-chromium-") as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(text.replace("</body>", _SCRIPT + "</body>", 1), encoding="utf-8")
        profile = Path(tmp) / "profile"
        proc = subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                              capture_output=True, text=True, timeout=timeout)
    match = re.search(r'<div id="img-check">(.*?)</div>', proc.stdout, re.S)
    if match is None:
        raise RuntimeError(f"chromium did not report on the page (exit {proc.returncode}): {proc.stderr[-800:]}")
    return json.loads(html.unescape(match.group(1)))
