"""Every case study: its declarations (fast), end to end in quick mode (one shared run), and the
report in Chromium. Study-specific checks live in test_studies_b.py / test_studies_c.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

import case_studies
from tests.chromium_check import check_images, chromium_path
from workbench.casestudy import VERDICTS, CaseStudy
from workbench.storage import sha256_file
from workbench.worlds.trojans import default_trojans

STUDIES = case_studies.available()
NUMBERS = {name: str(num) for num, name, _ in case_studies.STUDIES}
REQUIRED = ("study", "prediction", "prediction_sha256", "seeds", "cases", "metrics", "controls", "verdict", "verdicts")
# studies that reproduce a published protocol show its numbers beside ours
PUBLISHED = {"fact_localization", "editor_comparison", "mass_editing", "knowledge_neurons", "copy_paste",
             "trojan_rediscovery"}
# studies whose cases are fixed by the declaration (and the model's trojans), not by the model's facts
KEYS_WITHOUT_MODEL = {"mass_editing", "trojan_surgery", "copy_paste", "trojan_rediscovery", "natural_adversaries",
                      "concept_erasure", "rule_rewrite"}
FIGURES = {"trojan_surgery": {"fig_surgery_curve.png", "fig_attack_success.png", "fig_clean_accuracy.png"},
           "copy_paste": {"fig_copy_paste_success.png", "fig_adversarial_examples.png", "fig_designed_patches.png"},
           "trojan_rediscovery": {"fig_rediscovery_scores.png", "fig_rediscovery_table.png", "fig_rediscovery_views.png"},
           "natural_adversaries": {"fig_fooling_predicted_vs_measured.png", "fig_fooling_rates.png"},
           "concept_erasure": {"fig_probe_accuracy.png"},
           "rule_rewrite": {"fig_rewrite_accuracy.png"}}


def test_all_ten_studies_exist_in_order() -> None:
    assert STUDIES == [name for _, name, _ in case_studies.STUDIES] and len(STUDIES) == 10


# --- declarations (no model) ------------------------------------------------------------------

@pytest.mark.parametrize("name", STUDIES)
def test_studies_are_registered_by_name_and_number(name: str) -> None:
    cls = case_studies.resolve(NUMBERS[name])
    assert cls is case_studies.resolve(name) and cls.name == name and str(cls.number) == NUMBERS[name]


@pytest.mark.parametrize("quick", [True, False])
@pytest.mark.parametrize("name", STUDIES)
def test_registration_is_valid_and_stable(name: str, quick: bool) -> None:
    study: CaseStudy = case_studies.make(name, quick=quick, seeds=2)
    reg = study.registration()  # raises on unknown metrics or repeated ids
    assert reg == case_studies.make(name, quick=quick, seeds=2).registration()
    assert any(p["primary"] for p in reg["predictions"])
    assert all(p["source"] for p in reg["predictions"]), "every predicted size names its source"
    assert reg["controls"]
    assert bool(study.anchors) or name not in PUBLISHED
    known = {m.name for m in study.metrics()}
    assert all(a.ours in known for a in study.anchors if a.ours)
    json.dumps(study.config())


# --- the shared quick run ---------------------------------------------------------------------


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
    if name in KEYS_WITHOUT_MODEL:  # from the declaration, or the declaration and zoo:shapesnet's trojans
        state = study.world_plan(default_trojans()) if hasattr(study, "world_plan") else None
        assert res["cases"]["n"] == len(study.case_keys(state, 0)) + len(study.case_keys(state, 1))
    assert {v["id"] for v in res["verdicts"]} == {p.id for p in study.predictions()}
    for v in res["verdicts"]:
        assert v["verdict"] in VERDICTS
        m = res["metrics"][v["metric"]]
        assert m["value"] is not None and len(m["ci"]) == 2, v["metric"]
    assert res["verdict"] in VERDICTS
    assert all(a["ours"] is not None for a in res["anchors"])
    files = {f["file"] for f in res["figures"]}
    assert FIGURES.get(name, set()) <= files and len(files) >= 3 and "figure_error" not in res
    for f in files:
        assert (folder / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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
