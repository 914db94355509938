"""Predictions whose size comes from a finding of the same run on the same model (basis "finding"):
the finding is on each case's record, and the judged metric is the measured effect over what the
finding said, computed from those records."""

from __future__ import annotations

import csv
import json
from typing import Any

import pytest

import case_studies
from case_studies.copy_paste import NATURAL


@pytest.mark.parametrize("study, ids", [
    ("knowledge_neurons", {"ig_attribution_sizes_the_drop": "integrated_gradients",
                           "gxa_attribution_sizes_the_drop": "gradient_x_activation"}),
    ("copy_paste", {"ranking_sizes_success_featvis": "feature_visualization",
                    "ranking_sizes_success_exemplar": "exemplars"}),
])
def test_finding_predictions_name_their_rule_and_method(study: str, ids: dict[str, str]) -> None:
    preds = {p.id: p for p in case_studies.make(study, quick=True).predictions()}
    for pid, method in ids.items():
        p = preds[pid]
        assert p.basis == "finding" and p.method == method and p.size == 1.0
        assert p.source.startswith("rule: ") and "this run" in p.source


def _rows(run: dict[str, Any], study: str) -> list[dict[str, str]]:
    with open(run["out"] / study / "cases.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_knowledge_neuron_findings_size_the_drop(quick_run: dict[str, Any]) -> None:
    res = json.loads((quick_run["out"] / "knowledge_neurons" / "results.json").read_text())
    rows = _rows(quick_run, "knowledge_neurons")
    for a in ("ig", "gxa"):
        pred = [float(r[f"pdrop_pred_{a}"]) for r in rows]
        drop = [float(r[f"pdrop_{a}"]) for r in rows]
        assert all(p > 0 for p in pred)  # the chosen neurons are the top-attributed: their sum is positive
        value = res["metrics"][f"drop_over_attribution_{a}"]["value"]
        assert value == pytest.approx(sum(drop) / sum(pred), rel=1e-9)
    cases = sorted((quick_run["out"] / "knowledge_neurons" / "cases").glob("*.json"))
    record = json.loads(cases[0].read_text())["record"]["result"]
    assert set(record["predicted_drop"]) == {"ig", "gxa"}


@pytest.mark.slow
def test_copy_paste_ranking_score_is_the_finding(quick_run: dict[str, Any]) -> None:
    res = json.loads((quick_run["out"] / "copy_paste" / "results.json").read_text())
    rows = [r for r in _rows(quick_run, "copy_paste") if r["group"] == "context" and r["kind"] == NATURAL]
    for src in ("featvis", "exemplar"):
        mine = [r for r in rows if r["source"] == src]
        test = sum(float(r["success_best"]) for r in mine) / len(mine)
        ranked = sum(float(r["calibration_score"]) for r in mine) / len(mine)
        assert res["metrics"][f"test_over_ranking_{src}"]["value"] == pytest.approx(test / ranked, rel=1e-9)
