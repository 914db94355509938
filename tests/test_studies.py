"""Every written case study, end to end in quick mode (one shared run), and its report in Chromium."""

from __future__ import annotations

import json
from typing import Any

import pytest

import case_studies
from chromium_check import check_images, chromium_path
from workbench.casestudy import VERDICTS
from workbench.storage import sha256_file

STUDIES = case_studies.available()
REQUIRED = ("study", "prediction", "prediction_sha256", "seeds", "cases", "metrics", "controls", "verdict", "verdicts")


def test_the_first_four_studies_exist() -> None:
    assert STUDIES[:4] == ["fact_localization", "editor_comparison", "mass_editing", "knowledge_neurons"]


@pytest.mark.slow
@pytest.mark.parametrize("name", STUDIES)
def test_study_runs_end_to_end_in_quick_mode(quick_run: dict[str, Any], name: str) -> None:
    folder = quick_run["out"] / name
    res = json.loads((folder / "results.json").read_text())
    for key in REQUIRED:
        assert key in res, key
    assert res["quick"] is True and res["seeds"] == [0, 1]
    assert res["prediction_sha256"] == sha256_file(folder / "prediction.json")
    study = case_studies.make(name, quick=True, seeds=2)
    assert res["cases"]["n"] == len(list((folder / "cases").glob("*.json"))) > 0
    assert {v["id"] for v in res["verdicts"]} == {p.id for p in study.predictions()}
    for v in res["verdicts"]:
        assert v["verdict"] in VERDICTS
    named = {v["metric"] for v in res["verdicts"]}
    for m in named:
        assert res["metrics"][m]["value"] is not None, m
        assert len(res["metrics"][m]["ci"]) == 2
    assert res["verdict"] in VERDICTS
    for fig in res["figures"]:
        assert (folder / fig["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(res["figures"]) >= 3 and "figure_error" not in res
    assert (folder / "cases.csv").read_text().count("\n") >= res["cases"]["n"]


@pytest.mark.slow
def test_quick_run_summary_and_leaderboard(quick_run: dict[str, Any]) -> None:
    summary = quick_run["summary"]
    assert [s["study"] for s in summary["studies"]] == STUDIES
    methods = {m["method"]: m for m in summary["leaderboard"]}
    assert {"causal_tracing", "integrated_gradients"} <= set(methods)
    assert all(methods[m]["n"] > 0 for m in ("causal_tracing", "integrated_gradients"))
    calib = json.loads((quick_run["out"] / "calibration.json").read_text())
    n_preds = sum(len(case_studies.make(s, quick=True).predictions()) for s in STUDIES)
    assert calib["overall"]["n_predictions"] == n_preds


@pytest.mark.slow
def test_quick_report_opens_in_chromium_with_every_image(quick_run: dict[str, Any]) -> None:
    if chromium_path() is None:
        pytest.skip("chromium is not installed (make browser)")
    report = quick_run["out"] / "report.html"
    n_img = report.read_text().count("<img ")
    result = check_images(report)
    assert result["title"].startswith("Interpretability workbench")
    assert result["n"] == n_img >= 4 * len(STUDIES)
    assert result["bad"] == []
    assert all(w > 100 for w in result["widths"])
