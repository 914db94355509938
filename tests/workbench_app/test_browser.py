"""The whole editing loop in real Chromium against a real `workbench serve` process.

trace -> click the MLP cell -> freeze a prediction -> ROME -> verdict -> undo -> the model's
fingerprint equals the original; and a study run started on the Studies page and seen to
finish. Screenshots of each page are saved in the test's temporary folder (and copied to
$WORKBENCH_ARTIFACTS when it is set). With $WORKBENCH_README_SHOT set to a path (e.g.
docs/serve.png) the knowledge-editing page after its verdict is also written there, reduced
to 256 colours so the README's image stays small.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.chromium_check import CHROMIUM, chromium_path
from tests.workbench_app.server import get_json, serve
from tests.zoo_models import factgpt

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@contextmanager
def app_page(workspace: Path, extra: tuple[str, ...] = ()) -> Iterator[tuple[dict, Any, list[str]]]:
    """A real server on `workspace` and a Chromium page on it, ready; errors the page logs are collected."""
    exe = chromium_path()
    if exe is None:
        pytest.skip(f"no Chromium at {CHROMIUM} or on PATH (Debian package 'chromium'; `make browser` installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra: pip install -e .[test]")
    with serve(workspace, extra=extra) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.goto(server["url"] + "/")
            page.wait_for_selector("body[data-ready='1']")
            yield server, page, errors
        finally:
            browser.close()


def _artifacts(shots: list[Path]) -> None:
    target = os.environ.get("WORKBENCH_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy(shot, Path(target) / shot.name)


def _readme_shot(shot: Path) -> None:
    target = os.environ.get("WORKBENCH_README_SHOT")
    if not target:
        return
    from PIL import Image

    from workbench.storage import atomic_write

    image = Image.open(shot).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                     dither=Image.Dither.NONE)
    atomic_write(target, lambda tmp: image.save(tmp, format="PNG", optimize=True))


def test_editing_loop_in_chromium(tmp_path: Path) -> None:
    factgpt()  # trained on first use (minutes), then cached; the server loads the same cache entry
    workspace = tmp_path / "ws"
    shots: list[Path] = []
    with app_page(workspace) as (server, page, errors):

        # Model page: open zoo FactGPT.
        page.select_option("#model-select", "zoo:factgpt")
        page.click("#open-model")
        page.wait_for_selector("#weights-badge")
        original = page.inner_text("#original-fingerprint")
        assert re.fullmatch(r"[0-9a-f]{64}", original)
        assert page.inner_text("#fingerprint") == original
        assert page.inner_text("#weights-badge") == "unedited"
        assert "gpt2" in page.inner_text("#arch") and "blocks.0.mlp.hook_post" in page.inner_text("#sites")
        shots.append(tmp_path / "1-model.png")
        page.screenshot(path=str(shots[-1]), full_page=True)

        # Ask: an example fact of the model's world, and its top answers.
        page.click("#tab-edit")
        page.click("#btn-example")
        page.wait_for_selector("#answers .answer")
        true_answer = page.input_value("#target-true")
        assert page.inner_text("#answers .answer code").strip() == true_answer
        assert page.input_value("#should-not-change").count("\n") >= 1  # neighbours suggested from the world

        # Find: trace, then click the MLP cell at its peak.
        page.click("#btn-trace")
        page.wait_for_selector("svg[data-kind='mlp'] rect.cell")
        assert page.locator("svg[data-kind='hidden'] rect.cell").count() > 0
        peak = page.evaluate("() => state.trace.peaks.mlp")
        cell = f"rect.cell[data-kind='mlp'][data-layer='{peak['layer']}'][data-token='{peak['token']}']"
        page.hover(cell)
        assert "restored p" in page.inner_text("#tooltip")
        page.click(cell)
        assert f"MLP of layer {peak['layer']}" in page.inner_text("#site")
        shots.append(tmp_path / "2-trace.png")
        page.screenshot(path=str(shots[-1]), full_page=True)

        # Predict (frozen, hashed), edit with ROME, see the verdict.
        page.select_option("#method", "rome")
        page.fill("#expect-p", "0.5")
        page.click("#btn-predict")
        page.wait_for_selector("#verdict", timeout=60_000)
        sha = page.inner_text("#prediction-sha")
        assert re.fullmatch(r"[0-9a-f]{64}", sha)
        assert page.is_disabled("#should-change")  # the prediction is frozen once submitted
        assert page.inner_text("#verdict") == "held"
        assert page.locator("#clauses .ok").count() >= 2
        shots.append(tmp_path / "3-verdict.png")
        page.screenshot(path=str(shots[-1]), full_page=True)
        _readme_shot(shots[-1])

        key = page.evaluate("() => state.model.key")
        stack = get_json(f"{server['url']}/api/models/{key}/edits")
        assert len(stack["stack"]) == 1 and stack["stack"][0]["prediction_sha256"] == sha
        assert stack["fingerprint"] != original

        page.click("#tab-model")
        assert page.locator("#stack-table tr").count() == 2
        assert page.inner_text("#fingerprint") != original
        shots.append(tmp_path / "4-stack.png")
        page.screenshot(path=str(shots[-1]), full_page=True)

        # Undo: the weights are the original bits again.
        page.click("#tab-edit")
        page.click("#btn-undo")
        page.wait_for_selector("#undo-result .ok")
        assert "bit-exact" in page.inner_text("#undo-result")
        page.click("#tab-model")
        page.wait_for_function("() => document.querySelector('#weights-badge').textContent === 'unedited'")
        assert page.inner_text("#fingerprint") == original
        after = get_json(f"{server['url']}/api/models/{key}")
        assert after["fingerprint"] == after["original_fingerprint"] == original and after["stack"] == []
        shots.append(tmp_path / "5-undone.png")
        page.screenshot(path=str(shots[-1]), full_page=True)
        assert errors == []
    assert all(s.stat().st_size > 10_000 for s in shots)
    _artifacts(shots)


def test_a_study_run_started_and_seen_to_finish_in_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Studies page: start a (toy) study, watch its progress over server-sent events, browse and filter its run."""
    monkeypatch.setenv("TOY_SLEEP", "0.1")  # 24 cases of 0.1 s: long enough to see it run
    study = "tests.casestudy_toys:SlowToy"
    workspace = tmp_path / "ws"
    shots: list[Path] = []
    with app_page(workspace, extra=("--study", study)) as (server, page, errors):
        page.click("#tab-studies")
        page.wait_for_selector(f"#study-select option[value='{study}']", state="attached")
        assert page.locator("#study-select option").count() == 11  # the ten numbered studies and the offered one
        assert "no runs yet" in page.inner_text("#runs")

        page.select_option("#study-select", study)
        page.click("#btn-study")
        page.wait_for_function("() => /case \\d+ of 24/.test((document.querySelector('#study-job .msg') || {}).textContent)")
        page.wait_for_selector("#study-status", timeout=60_000)
        assert page.inner_text("#study-status") == "done"
        page.wait_for_selector("#run-view:not([hidden]) #pred-table tr[data-verdict]")

        runs = get_json(server["url"] + "/api/runs")["runs"]
        assert len(runs) == 1 and runs[0]["complete"]
        path = runs[0]["path"]
        assert page.locator("#runs-table tr.run").count() == 1 and path in page.inner_text("#runs-table")
        assert page.inner_text("#run-title") == path and page.inner_text("#run-state") == "complete"
        view = get_json(f"{server['url']}/api/run?path={path}")
        rows = page.locator("#pred-table tr[data-verdict]")
        assert rows.count() == view["n_predictions"] == 2
        assert [rows.nth(i).get_attribute("data-verdict") for i in range(2)] == \
            [p["verdict"] for p in view["predictions"]]
        assert page.locator(".study-card .figs img").count() == len(view["studies"][0]["figures"]) >= 2
        page.wait_for_function("() => [...document.querySelectorAll('.figs img')].every((i) => i.naturalWidth > 0)")
        assert page.get_attribute("#run-report", "href").endswith("name=report.html")

        # filters: by method (one prediction names it), by basis, by verdict (the toy's effect is real: held)
        assert view["facets"]["verdict"] == {"held": 2}
        page.select_option("#filter-method", "toy_method")
        assert rows.count() == 1 and page.inner_text("#pred-count") == "1 of 2"
        page.select_option("#filter-basis", "guess")
        assert rows.count() == 0 and page.inner_text("#pred-count") == "0 of 2"
        page.select_option("#filter-method", "__all__")
        assert rows.count() == 1 and "no_side_effect" in rows.nth(0).inner_text()
        page.select_option("#filter-basis", "__all__")
        page.select_option("#filter-verdict", "held")
        assert rows.count() == 2
        page.select_option("#filter-verdict", "__all__")
        page.evaluate("() => { document.querySelector('#toast').hidden = true; }")
        shots.append(tmp_path / "6-studies.png")
        page.screenshot(path=str(shots[-1]), full_page=True)

        # a reload comes back to the same run
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        page.wait_for_selector("#run-view:not([hidden]) #pred-table tr[data-verdict]")
        assert page.inner_text("#run-title") == path
        assert errors == []
    assert all(s.stat().st_size > 10_000 for s in shots)
    _artifacts(shots)


def test_trojan_units_ranked_ablated_and_applied_in_chromium(tmp_path: Path) -> None:
    """Units page on zoo ShapesNet: rank a trojan's units, see them beside random units, apply, undo."""
    from workbench.models import load

    load("zoo:shapesnet", device="cpu", progress=False)  # trained on first use (minutes), then cached
    workspace = tmp_path / "ws"
    shots: list[Path] = []
    with app_page(workspace) as (server, page, errors):
        page.click("#tab-units")
        assert page.is_visible("#units-needs-model") and not page.is_visible("#units-body")
        page.click("#tab-model")
        page.select_option("#model-select", "zoo:shapesnet")
        page.click("#open-model")
        page.wait_for_selector("#weights-badge")
        original = page.inner_text("#original-fingerprint")

        page.click("#tab-units")
        page.wait_for_selector("#units-trojan option[value='patch-square']", state="attached")
        page.select_option("#units-trojan", "patch-square")
        assert page.input_value("#units-site") == "layer2.relu2"
        page.click("#btn-units")
        page.wait_for_selector("#units-verdict", timeout=120_000)
        key = page.evaluate("() => state.model.key")
        job = get_json(f"{server['url']}/api/jobs?model={key}&kind=units")["jobs"][0]
        result = get_json(f"{server['url']}/api/jobs/{job['id']}")["result"]
        assert page.inner_text("#units-verdict") == ("ranked units cut more" if result["asr_after"] <
                                                     result["random_asr_after"] else "no better than random")
        bars = page.inner_text("#units-bars")
        assert f"{round(100 * result['asr_after'])}%" in bars and f"{round(100 * result['random_asr_after'])}%" in bars
        assert page.locator("#units-curve polyline").count() == 4
        shots.append(tmp_path / "7-units.png")
        page.screenshot(path=str(shots[-1]), full_page=True)

        # apply: the ablation goes on the stack; undo there gives back the original bits
        page.click("#btn-apply-units")
        page.wait_for_selector("#btn-apply-units:disabled")
        page.click("#tab-model")
        assert page.locator("#stack-table tr").count() == 2 and "ablate" in page.inner_text("#stack-table")
        assert page.inner_text("#fingerprint") != original
        page.click("#stack-table button.undo")
        page.wait_for_function("() => document.querySelector('#weights-badge').textContent === 'unedited'")
        assert page.inner_text("#fingerprint") == original
        assert errors == []
    assert all(s.stat().st_size > 10_000 for s in shots)
    _artifacts(shots)
