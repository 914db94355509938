"""Studies 5, 8, 9 and 10: their options (fast), their verdict logic on made-up rows (fast), and
what their part of the shared quick run measured (slow). Checks every study shares: test_studies.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import case_studies
from case_studies import concept_erasure, natural_adversaries, rule_rewrite, trojan_surgery
from tests.study_runs import reproduce
from workbench.bootstrap import estimate
from workbench.casestudy import CaseStudy, judge

MINE = {"5": "trojan_surgery", "8": "natural_adversaries", "9": "concept_erasure", "10": "rule_rewrite"}


# --- declarations (no model) ------------------------------------------------------------------

def test_full_mode_is_bigger_than_quick() -> None:
    for name in MINE.values():
        q, f = case_studies.make(name, quick=True).options(), case_studies.make(name, quick=False).options()
        assert q != f, name
    assert "attribution" in case_studies.make("trojan_surgery").options()["selection_methods"]
    assert "attribution" not in case_studies.make("trojan_surgery", quick=True).options()["selection_methods"]


# --- verdict logic on made-up rows: an absent effect fails, a present one holds -----------------

def _verdict(study: CaseStudy, rows: list[dict[str, Any]], pred_id: str) -> str:
    pred = next(p for p in study.registration()["predictions"] if p["id"] == pred_id)
    metric = next(m for m in study.metrics() if m.name == pred["metric"])
    est = estimate(rows, metric, n_resamples=500, seed=0)
    return judge(pred, {"value": est.value, "ci": [est.low, est.high]})["verdict"]


def _surgery_row(trojan: str, method: str, asr_after: float, random_after: float, seed: int) -> dict[str, Any]:
    record = {"trojan": trojan, "method": method, "site": "layer2.relu2", "n_units": 2, "units": [1, 2],
              "asr_before": 1.0, "asr_after": asr_after, "random_asr_after": random_after, "clean_before": 0.99,
              "clean_after": 0.985, "random_clean_after": 0.985, "asr_relative_cut": 1 - asr_after,
              "clean_drop": 0.005, "target_met": asr_after <= 0.1}
    return trojan_surgery.Study(quick=True).rows(record)[0] | {"seed": seed}


@pytest.mark.parametrize("asr_after, expected", [(0.99, "failed"), (0.02, "held")])
def test_trojan_surgery_verdicts_follow_the_effect(asr_after: float, expected: str) -> None:
    study = trojan_surgery.Study(quick=True)
    rows = [_surgery_row(t, "activation_difference", asr_after + 0.005 * s, 0.99, s)
            for t in trojan_surgery.PLAN for s in range(3)]
    assert _verdict(study, rows, "ad_beats_random") == expected
    assert _verdict(study, rows, "ad_cut_90") == expected
    assert _verdict(study, rows, "ad_clean_kept") == "held"


def test_natural_adversaries_key_round_trip_and_gap_verdict() -> None:
    for adv in natural_adversaries.ADVERSARIES:
        for pair in natural_adversaries.SN_BENCH:
            assert natural_adversaries._parse(natural_adversaries._key(adv, pair)) == (adv, pair)
    study = natural_adversaries.Study(quick=True)
    far = [{"adversary": "feature_level", "predicted": 0.9, "measured": 0.4 + 0.01 * i, "control": 0.3,
            "baseline": 0.0} for i in range(6)]
    near = [r | {"measured": 0.9 - 0.01 * i} for i, r in enumerate(far)]
    assert _verdict(study, far, "fl_fit_predicts_heldout") == "failed"
    assert _verdict(study, near, "fl_fit_predicts_heldout") == "held"


def test_rule_rewrite_rows_are_block_accuracies() -> None:
    study = rule_rewrite.Study(quick=True)
    bits = {"disagree": "1" * 50 + "0" * 50 + "1" * 100, "natural": "1" * 200}
    record = {"block": 100, "n_eval": 200, "correct": {c: bits for c in rule_rewrite.CONDITIONS}}
    rows = study.rows(record)
    assert [r["dis_rewrite"] for r in rows] == [0.5, 1.0] and all(r["nat_random"] == 1.0 for r in rows)


def test_random_update_matches_rank_and_norm_and_is_seeded() -> None:
    class Handle:
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))

    handle = Handle()
    a = rule_rewrite.random_update(handle, "2", rank=2, norm=3.0, seed=5)
    b = rule_rewrite.random_update(handle, "2", rank=2, norm=3.0, seed=5)
    c = rule_rewrite.random_update(handle, "2", rank=2, norm=3.0, seed=6)
    da = a.dense("2.weight")
    assert da.shape == handle.model[2].weight.shape
    assert torch.equal(da, b.dense("2.weight")) and not torch.equal(da, c.dense("2.weight"))
    assert abs(float(da.double().norm()) - 3.0) < 1e-4
    assert int(torch.linalg.matrix_rank(da.reshape(4, -1).double(), rtol=1e-5)) == 2  # float32 rounding aside


def test_random_subspace_is_orthonormal_and_seeded() -> None:
    s = concept_erasure.random_subspace(16, 3, seed=1)
    assert torch.allclose(s.proj_right @ s.proj_left, torch.eye(3, dtype=torch.float64), atol=1e-10)
    assert torch.equal(s.proj_left, concept_erasure.random_subspace(16, 3, seed=1).proj_left)
    assert not torch.equal(s.proj_left, concept_erasure.random_subspace(16, 3, seed=2).proj_left)


def test_constant_probe_chance_uses_the_training_majority() -> None:
    train = torch.tensor([0, 0, 0, 1, 1])
    test = torch.tensor([1, 1, 1, 0])
    assert concept_erasure.constant_probe_accuracy(train, test) == 0.25


# --- one quick run of these four studies (slow) ----------------------------------------------

def _results(run: dict[str, Any], name: str) -> dict[str, Any]:
    return json.loads((run["out"] / name / "results.json").read_text())


@pytest.mark.slow
def test_treatments_beat_their_controls(quick_run: dict[str, Any]) -> None:
    m5 = _results(quick_run, "trojan_surgery")["metrics"]
    assert m5["asr_after_ad"]["value"] < 0.5 < m5["asr_before"]["value"]
    assert m5["random_gap_ad"]["ci"][0] > 0  # activation-difference units beat random units
    assert abs(m5["random_cut_ad"]["value"]) < 0.1  # random units leave the trojan in place
    m8 = _results(quick_run, "natural_adversaries")["metrics"]
    assert m8["fl_minus_random"]["ci"][0] > 0 and m8["fl_baseline"]["value"] < 0.05
    m9 = _results(quick_run, "concept_erasure")["metrics"]
    assert m9["sent_site_before"]["value"] > 0.95 and m9["sent_site_random"]["value"] > 0.95
    assert m9["sent_site_erased"]["value"] < 0.6
    m10 = _results(quick_run, "rule_rewrite")["metrics"]
    assert m10["gain_rewrite"]["ci"][0] > 5 and m10["gain_rewrite_minus_random"]["ci"][0] > 0


@pytest.mark.slow
def test_methods_reach_the_leaderboard(quick_run: dict[str, Any]) -> None:
    board = {m["method"]: m for m in quick_run["summary"]["leaderboard"]}
    for method in ("activation_difference", "dissection", "feature_level", "snafue", "linear_probe"):
        assert board[method]["n"] > 0, method
    assert board["activation_difference"]["win_rate"] > 0.9


@pytest.mark.slow
def test_rerun_resumes_without_recomputing(quick_run: dict[str, Any], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(quick_run["out"], run)  # a private copy: the shared run stays as the other tests read it
    cases = run / "rule_rewrite" / "cases"
    before = {p.name: p.read_bytes() for p in cases.glob("*.json")}
    proc = reproduce(run, ["10"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in cases.glob("*.json")} == before
