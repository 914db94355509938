"""Studies 6 and 7: their options (fast), their verdict logic on made-up rows (fast), and what
their part of the shared quick run measured (slow). Checks every study shares: test_studies.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

import case_studies
from case_studies import copy_paste, trojan_rediscovery
from tests.study_runs import reproduce
from workbench.bootstrap import estimate
from workbench.casestudy import CaseStudy, judge
from workbench.worlds.trojans import default_trojans, generated_trojans

MINE = {"6": "copy_paste", "7": "trojan_rediscovery"}


# --- declarations (no model) ------------------------------------------------------------------

def test_full_mode_is_bigger_than_quick() -> None:
    for name in MINE.values():
        q, f = case_studies.make(name, quick=True).options(), case_studies.make(name, quick=False).options()
        assert q != f, name
    q6, f6 = copy_paste.Study(quick=True), copy_paste.Study(quick=False)
    dev = default_trojans()  # zoo:shapesnet's
    assert len(f6.case_keys(f6.world_plan(dev), 0)) > len(q6.case_keys(q6.world_plan(dev), 0))
    assert q6.options()["designs_shared_across_seeds"] and not f6.options()["designs_shared_across_seeds"]
    assert f6.options()["design"]["featvis_steps"] > q6.options()["design"]["featvis_steps"]
    q7, f7 = trojan_rediscovery.Study(quick=True), trojan_rediscovery.Study(quick=False)
    qb, fb = q7.options()["budget"], f7.options()["budget"]
    assert set(qb) == set(fb) == set(trojan_rediscovery.NAMES) and set(fb.values()) == {"quick"}
    # quick mode: the best method keeps the budget that measures it; the others run "tiny" and say so
    assert qb["natural"] == "quick" and {qb[m] for m in qb if m != "natural"} == {"tiny"}
    for p in q7.predictions():
        if p.method and p.method != trojan_rediscovery.NAMES["natural"]:
            assert "tiny budget" in p.claim, p.id
        assert "quick mode" in p.source, p.id  # sized from what the quick configuration measured


def test_quick_case_keys_cover_targets_and_every_trojan_kind() -> None:
    dev = default_trojans()  # zoo:shapesnet's
    q6 = copy_paste.Study(quick=True)
    keys = [q6.case_keys(q6.world_plan(dev), s) for s in range(2)]
    assert keys[0] != keys[1] and all(len(k) == 2 for k in keys)  # one or two targets per seed
    assert {k[0] for k in keys} == set(copy_paste.CONTEXT_QUICK) and all(k[1] == "cross" for k in keys)
    assert set(copy_paste.Study(quick=False).world_plan(dev)["trojan_targets"]) == set(copy_paste.TROJAN_TARGETS)
    q7 = trojan_rediscovery.Study(quick=True)
    kinds = {"patch", "style", "natural"}
    for seed in range(2):
        per_seed = q7.case_keys(q7.world_plan(dev), seed)
        assert {k.split("-", 1)[0] for k in per_seed} == kinds  # one trojan of each kind per seed
    both = set(q7.case_keys(q7.world_plan(dev), 0)) | set(q7.case_keys(q7.world_plan(dev), 1))
    assert both == set(trojan_rediscovery.UNIVERSAL + trojan_rediscovery.CLASS_UNIVERSAL)
    f7 = trojan_rediscovery.Study(quick=False)
    assert set(f7.case_keys(f7.world_plan(dev), 0)) == both


def test_held_out_trojans_give_cases_by_the_same_rule() -> None:
    held = generated_trojans(5)
    universal_targets = {t.target for t in held if t.source is None}
    plan6 = copy_paste.Study(quick=False).world_plan(held)
    assert set(plan6["trojan_targets"]) == universal_targets
    assert set(plan6["context"]) == set(copy_paste.CONTEXT) - universal_targets
    q7 = trojan_rediscovery.Study(quick=True)
    kinds = {t.name: t.kind for t in held}
    for seed in range(2):
        keys = q7.case_keys(q7.world_plan(held), seed)
        assert sorted(kinds[k] for k in keys) == sorted(["patch", "style", "natural"])
    assert set(trojan_rediscovery.Study(quick=False).world_plan(held)["all"]) == set(held.names)


def test_every_rediscovery_method_is_a_leaderboard_entry() -> None:
    from workbench_protocols.rediscovery import METHODS

    assert set(trojan_rediscovery.NAMES) == set(METHODS)
    assert set(trojan_rediscovery.Study.methods) == set(trojan_rediscovery.NAMES.values())
    assert {"feature_level", "snafue"} <= set(trojan_rediscovery.Study.methods)  # the names study 8 uses
    assert set(copy_paste.Study.methods) == {"feature_visualization", "exemplars"}


# --- verdict logic on made-up rows: an absent effect fails, a present one holds -----------------

def _verdict(study: CaseStudy, rows: list[dict[str, Any]], pred_id: str) -> str:
    pred = next(p for p in study.registration()["predictions"] if p["id"] == pred_id)
    metric = next(m for m in study.metrics() if m.name == pred["metric"])
    est = estimate(rows, metric, n_resamples=500, seed=0)
    return judge(pred, {"value": est.value, "ci": [est.low, est.high]})["verdict"]


def _cp_rows(best: float, noise: float, natural: float, *, kind: str = copy_paste.NATURAL) -> list[dict[str, Any]]:
    study = copy_paste.Study(quick=True)
    out = []
    for seed in range(3):
        for target in ("star", "hexagon"):
            for src in copy_paste.SOURCES:
                row = {"target": target, "group": "context", "source": src, "method": copy_paste.METHOD[src],
                       "kind": kind, "trojan": None, "content": "context feature", "success_consistent": best / 2,
                       "success_best": best + 0.01 * seed, "control_noise": noise, "control_noise_consistent": noise,
                       "control_natural": natural, "control_natural_consistent": natural, "p_target_before": 0.01,
                       "p_target_consistent": best / 2, "p_target_best": best, "n_attempts": 50}
                out += [r | {"seed": seed} for r in study.rows({"rows": [row]})]
    return out


@pytest.mark.parametrize("best, expected", [(0.10, "failed"), (0.65, "held")])
def test_copy_paste_verdicts_follow_the_effect(best: float, expected: str) -> None:
    study = copy_paste.Study(quick=True)
    rows = _cp_rows(best, noise=0.15, natural=0.12)
    for pid in ("featvis_beats_noise", "featvis_beats_natural", "exemplars_beat_noise", "exemplars_beat_natural"):
        assert _verdict(study, rows, pid) == expected, pid
    assert _verdict(study, rows, "best_reaches_atlas") == expected
    assert _verdict(study, rows, "ratio_3x_noise") == expected  # 0.10/0.15 < 3 fails; 0.65/0.15 > 3 holds


def test_trojan_trigger_designs_stay_out_of_the_context_metrics() -> None:
    study = copy_paste.Study(quick=True)
    rows = _cp_rows(0.10, noise=0.15, natural=0.12) + _cp_rows(1.0, 0.15, 0.12, kind=copy_paste.TRIGGER)
    assert _verdict(study, rows, "featvis_beats_noise") == "failed"  # the trigger rows do not rescue it
    trig = next(m for m in study.metrics() if m.name == "best_trigger_designs")
    assert estimate(rows, trig, n_resamples=100).value == pytest.approx(1.0 + 0.01)  # mean of 1.00/1.01/1.02


def _rd_rows(score: float, *, kind_scores: dict[str, float] | None = None) -> list[dict[str, Any]]:
    study = trojan_rediscovery.Study(quick=True)
    out = []
    for seed in range(2):
        for trojan in study.case_keys(study.world_plan(default_trojans()), seed):
            kind = trojan.split("-", 1)[0]
            s = (kind_scores or {}).get(kind, score)
            record = {"trojan": trojan, "kind": kind, "target": "cross",
                      "rows": [{"method": m, "score": s, "consensus_correct": s > 0.5, "n_views": 4}
                               for m in trojan_rediscovery.NAMES],
                      "random_views": {"score": 0.0, "n_views": 4}, "combined": s}
            out += [r | {"seed": seed, "case": trojan} for r in study.rows(record)]
    return out


@pytest.mark.parametrize("score, expected", [(0.0, "failed"), (1.0, "held")])
def test_rediscovery_verdicts_follow_the_scores(score: float, expected: str) -> None:
    study = trojan_rediscovery.Study(quick=True)
    rows = _rd_rows(score)
    assert _verdict(study, rows, "methods_above_chance") == expected
    assert _verdict(study, rows, "best_method_above_chance") == expected
    assert _verdict(study, rows, "all_together_above_chance") == expected
    assert _verdict(study, rows, "random_views_not_above_chance") == "held"  # the control is not a method
    assert _verdict(study, rows, "style_nearly_undetectable") == ("held" if score == 0.0 else "failed")


def test_rediscovery_kinds_are_scored_separately() -> None:
    study = trojan_rediscovery.Study(quick=True)
    rows = _rd_rows(0.0, kind_scores={"patch": 1.0, "style": 0.0, "natural": 1.0})
    assert _verdict(study, rows, "patch_above_chance") == "held"
    assert _verdict(study, rows, "natural_above_chance") == "held"
    assert _verdict(study, rows, "style_nearly_undetectable") == "held"
    est = estimate(rows, next(m for m in study.metrics() if m.name == "score_all"), n_resamples=100)
    assert est.value == pytest.approx(2 / 3)  # random views and the together-answer are not pooled in


# --- one quick run of these two studies (slow) ----------------------------------------------

def _results(run: dict[str, Any], name: str) -> dict[str, Any]:
    return json.loads((run["out"] / name / "results.json").read_text())


def _cases(run: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text())["record"] for p in sorted((run["out"] / name / "cases").glob("*.json"))]


@pytest.mark.slow
def test_copy_paste_follows_the_activation_atlas_protocol(quick_run: dict[str, Any]) -> None:
    for rec in _cases(quick_run, "copy_paste"):
        result = rec["result"]
        target = result["target"]
        # only images classified correctly before the patch count: calibration + attempts = correct ones
        assert result["n_calibration"] + result["n_attempts"] == result["n_correct"] <= result["n_images"]
        assert {r["source"] for r in result["rows"] if r["kind"] == copy_paste.NATURAL} == set(copy_paste.SOURCES)
        for row in result["rows"]:
            assert target not in row["per_class"]  # the target's own images are never attempts
            assert sum(c["attempts"] for c in row["per_class"].values()) == row["n_attempts"]
            assert 0.0 <= row["success_consistent"] <= row["success_best"] <= 1.0  # best placement >= consistent
            assert row["p_target_before"] < 0.1  # correct images give the target little probability
            assert (row["kind"] == copy_paste.TRIGGER) == (row["trojan"] is not None)
            if row["design"]["source"] == "featvis" and row["design"]["description"].get("scene"):
                shapes = [o.get("shape") for o in row["design"]["description"]["scene"].get("objects", [])]
                assert target not in shapes  # no design shows the target's own shape
        tensors = load_file(str(quick_run["out"] / "copy_paste" / result["artifact"]))
        assert tensors["candidates"].shape[0] == len(result["candidates"])
        assert any(k.endswith(".patched") for k in tensors)


@pytest.mark.slow
def test_copy_paste_shares_designs_across_seeds_in_quick_mode(quick_run: dict[str, Any]) -> None:
    recs = {(r["seed"], r["result"]["target"]): r["result"] for r in _cases(quick_run, "copy_paste")}
    a, b = recs[(0, "cross")], recs[(1, "cross")]
    strip = [{k: v for k, v in c.items() if k not in ("score_calibration", "chosen")} for c in a["candidates"]]
    assert strip == [{k: v for k, v in c.items() if k not in ("score_calibration", "chosen")} for c in b["candidates"]]
    ta = load_file(str(quick_run["out"] / "copy_paste" / a["artifact"]))
    tb = load_file(str(quick_run["out"] / "copy_paste" / b["artifact"]))
    assert ta["candidates"].equal(tb["candidates"])  # same designs ...
    assert not ta["control.noise"].equal(tb["control.noise"])  # ... fresh controls and images per seed


@pytest.mark.slow
def test_rediscovery_scores_every_method_on_every_trojan(quick_run: dict[str, Any]) -> None:
    seen = set()
    for rec in _cases(quick_run, "trojan_rediscovery"):
        result = rec["result"]
        assert [r["method"] for r in result["rows"]] == list(trojan_rediscovery.NAMES)
        for r in result["rows"] + [result["random_views"]]:
            assert 0.0 <= r["score"] <= 1.0
            if r["options"]:
                assert len(r["options"]) == 8 and r["options"][r["true_index"]] == result["trigger"]
        seen.add(result["trojan"])
    assert seen == set(trojan_rediscovery.UNIVERSAL + trojan_rediscovery.CLASS_UNIVERSAL)
    m = _results(quick_run, "trojan_rediscovery")["metrics"]
    for kind in trojan_rediscovery.KINDS:
        assert m[f"score_{kind}"]["n"] == 2 * len(trojan_rediscovery.NAMES)  # two trojans of each kind (one per seed), every method


@pytest.mark.slow
def test_methods_reach_the_leaderboard(quick_run: dict[str, Any]) -> None:
    board = {m["method"]: m for m in quick_run["summary"]["leaderboard"]}
    for method in copy_paste.Study.methods + trojan_rediscovery.Study.methods:
        assert board[method]["n"] > 0, method
    m6 = _results(quick_run, "copy_paste")["metrics"]
    assert m6["best_featvis"]["value"] > m6["noise_ctx"]["value"]  # feature visualizations beat noise patches


@pytest.mark.slow
def test_rerun_resumes_without_recomputing(quick_run: dict[str, Any], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(quick_run["out"], run)  # a private copy: the shared run stays as the other tests read it
    before = {name: {p.name: p.read_bytes() for p in (run / name / "cases").glob("*.json")} for name in MINE.values()}
    proc = reproduce(run, sorted(MINE, key=int))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in MINE.values():
        assert {p.name: p.read_bytes() for p in (run / name / "cases").glob("*.json")} == before[name]
