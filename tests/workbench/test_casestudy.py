"""Harness properties: predictions frozen first, verdict rules as stated, absent effects fail,
resume after a real kill, bootstrap, calibration and leaderboard (model-free toy studies)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.casestudy_toys import NullToy, SlowToy, ToyStudy
from workbench.bootstrap import Metric, correlation_of, estimate, harmonic, mean_of, paired_difference, share_of
from workbench.calibration import calibration, leaderboard
from workbench.casestudy import Prediction, Rule, ci_above, ci_below, ci_within, judge
from workbench.errors import WorkbenchError
from workbench.storage import sha256_file

ROOT = Path(__file__).resolve().parents[2]


# --- verdict rules ------------------------------------------------------------------------------

@pytest.mark.parametrize("rule, ci, expected", [
    (ci_above(0.2), (0.3, 0.9), "held"),
    (ci_above(0.2), (0.1, 0.5), "inconclusive"),
    (ci_above(0.2), (-0.1, 0.15), "failed"),
    (ci_above(0.2), (-0.1, 0.2), "failed"),  # at the threshold is not above it
    (ci_above(0.0), (-0.05, 0.05), "inconclusive"),
    (ci_below(-1.0), (-3.0, -1.5), "held"),
    (ci_below(-1.0), (-1.5, 0.5), "inconclusive"),
    (ci_below(-1.0), (-1.0, 2.0), "failed"),
    (ci_within(-0.1, 0.1), (-0.05, 0.08), "held"),
    (ci_within(-0.1, 0.1), (-0.2, 0.05), "inconclusive"),
    (ci_within(-0.1, 0.1), (0.2, 0.4), "failed"),
    (ci_within(-0.1, 0.1), (None, None), "inconclusive"),
])
def test_rule_judges_the_interval_as_stated(rule: Rule, ci: tuple, expected: str) -> None:
    verdict, why = rule.judge(*ci)
    assert verdict == expected, why
    assert Rule.from_json(rule.to_json()) == rule


def test_judge_uses_the_stored_rule_not_the_point_estimate() -> None:
    pred = Prediction("p", "claim", "m", "increase", ci_above(1.0), size=2.0, basis="paper").to_json()
    # point estimate above the threshold, CI straddling it: inconclusive, never held
    assert judge(pred, {"value": 1.5, "ci": [0.8, 2.2]})["verdict"] == "inconclusive"
    assert judge(pred, {"value": 1.5, "ci": [1.1, 2.2]})["verdict"] == "held"
    assert judge(pred, None)["verdict"] == "inconclusive"


@pytest.mark.parametrize("direction, rule", [("increase", ci_below(0.0)), ("none", ci_above(0.0)),
                                             ("decrease", ci_within(-1, 1))])
def test_prediction_direction_must_match_its_rule(direction: str, rule: Rule) -> None:
    with pytest.raises(WorkbenchError):
        Prediction("p", "claim", "m", direction, rule)  # type: ignore[arg-type]


def test_a_sized_prediction_says_where_its_size_comes_from() -> None:
    with pytest.raises(WorkbenchError, match="basis"):
        Prediction("p", "claim", "m", "increase", ci_above(0.0), size=1.0)
    with pytest.raises(WorkbenchError, match="basis 'hunch'"):
        Prediction("p", "claim", "m", "increase", ci_above(0.0), size=1.0, basis="hunch")  # type: ignore[arg-type]
    assert Prediction("p", "claim", "m", "increase", ci_above(0.0)).basis is None  # no size, nothing to source


def test_calibration_splits_by_basis_and_leaves_replications_out_of_the_methods() -> None:
    from workbench.calibration import calibration

    def verdict(pid: str, basis: str, measured: float) -> dict:
        return {"id": pid, "claim": pid, "metric": "m", "direction": "increase", "size": 1.0, "method": "probe",
                "basis": basis, "primary": True, "measured": measured, "ci": [measured - 0.1, measured + 0.1],
                "verdict": "held", "why": ""}

    rules = {"kind": "ci_above", "threshold": 0.0}
    result = {"study": "s", "prediction": {"predictions": [{"id": i, "rule": rules} for i in ("a", "b", "c")]},
              "verdicts": [verdict("a", "replication", 1.0), verdict("b", "finding", 2.0), verdict("c", "paper", 0.5)]}
    calib = calibration([result])
    assert set(calib["by_basis"]) == {"replication", "finding", "paper"}
    assert calib["by_basis"]["replication"]["median_abs_rel_error"] == 0.0
    assert calib["by_method"]["probe"]["n_predictions"] == 2  # the replication does not count for the method
    assert calib["overall"]["n_predictions"] == 3


# --- bootstrap ----------------------------------------------------------------------------------

def test_estimate_matches_numpy_and_covers_the_mean() -> None:
    rng = np.random.default_rng(0)
    xs = rng.normal(1.0, 1.0, 400)
    rows = [{"x": float(x), "y": float(2 * x + rng.normal())} for x in xs]
    est = estimate(rows, mean_of("m", "x"), n_resamples=1000, seed=0)
    assert est.value == pytest.approx(xs.mean())
    assert est.low < xs.mean() < est.high
    assert est.high - est.low == pytest.approx(2 * 1.96 * xs.std() / math.sqrt(len(xs)), rel=0.2)
    r = estimate(rows, correlation_of("r", "x", "y"), n_resamples=500, seed=0)
    assert r.value == pytest.approx(np.corrcoef(xs, [row["y"] for row in rows])[0, 1])
    again = estimate(rows, mean_of("m", "x"), n_resamples=1000, seed=0)
    assert (again.low, again.high) == (est.low, est.high)  # same seed, same numbers


def test_metric_builders_skip_missing_values() -> None:
    rows = [{"a": 1.0, "b": 0.0, "ok": True}, {"a": 3.0, "b": None, "ok": False}, {"a": None, "b": 1.0, "ok": None}]
    assert mean_of("a", "a").value(rows) == 2.0
    assert share_of("s", lambda r: r["ok"]).value(rows) == 0.5
    assert paired_difference("d", "a", "b").value(rows) == 1.0
    s = Metric("S", ("a", "b"), combine=harmonic)
    assert s.value([{"a": 0.5, "b": 1.0}]) == pytest.approx(2 / 3)
    assert s.value([{"a": 0.0, "b": 1.0}]) == 0.0


# --- studies --------------------------------------------------------------------------------

def test_prediction_is_frozen_and_hashed_before_any_case(tmp_path: Path) -> None:
    seen: list[tuple[bool, str | None]] = []

    class Watching(ToyStudy):
        name = "watching"

        def setup(self, ctx, model):  # runs after the freeze
            seen.append(((self.store.root / "prediction.json").exists(), None))

        def run_case(self, state, seed, key):
            path = self.store.root / "prediction.json"
            seen.append((path.exists(), sha256_file(path) if path.exists() else None))
            return super().run_case(state, seed, key)

    res = Watching(seeds=2).reproduce(tmp_path / "w", progress=False)
    digest = sha256_file(tmp_path / "w" / "prediction.json")
    assert res["prediction_sha256"] == digest == res["prediction"]["sha256"]
    assert (tmp_path / "w" / "prediction.sha256").read_text().split()[0] == digest
    assert all(exists for exists, _ in seen) and len(seen) == 1 + 2 * ToyStudy.n_cases
    assert {h for _, h in seen[1:]} == {digest}
    cases = [json.loads(p.read_text()) for p in (tmp_path / "w" / "cases").glob("*.json")]
    assert {c["record"]["prediction_sha256"] for c in cases} == {digest}
    stored = json.loads((tmp_path / "w" / "prediction.json").read_text())
    assert [p["id"] for p in stored["predictions"]] == ["beats_random", "no_side_effect"]
    assert stored["predictions"][0]["rule"]["kind"] == "ci_above"


def test_a_changed_prediction_is_refused_on_resume(tmp_path: Path) -> None:
    ToyStudy(seeds=1).reproduce(tmp_path / "r", progress=False)

    class Moved(ToyStudy):
        def predictions(self):
            preds = super().predictions()
            return [Prediction(p.id, p.claim, p.metric, p.direction, ci_above(0.0) if p.direction == "increase"
                               else p.rule, size=p.size, method=p.method, basis=p.basis) for p in preds]

    with pytest.raises(WorkbenchError, match="different prediction"):
        Moved(seeds=1).reproduce(tmp_path / "r", progress=False)
    (tmp_path / "r" / "prediction.sha256").write_text("0" * 64 + "  prediction.json\n")
    with pytest.raises(WorkbenchError, match="edited after it was frozen"):
        ToyStudy(seeds=1).reproduce(tmp_path / "r", progress=False)


def test_absent_effect_fails_and_present_effect_holds(tmp_path: Path) -> None:
    real = ToyStudy(seeds=3).reproduce(tmp_path / "real", progress=False)
    null = NullToy(seeds=3).reproduce(tmp_path / "null", progress=False)
    v_real = {v["id"]: v["verdict"] for v in real["verdicts"]}
    v_null = {v["id"]: v["verdict"] for v in null["verdicts"]}
    assert v_real["beats_random"] == "held" and real["verdict"] == "held"
    assert v_null["beats_random"] == "failed" and null["verdict"] == "failed"
    assert v_null["no_side_effect"] == "held"
    for res in (real, null):
        for key in ("study", "prediction", "seeds", "cases", "metrics", "controls", "verdict"):
            assert key in res
        assert res["cases"]["n"] == 3 * ToyStudy.n_cases
        assert all(len(m["ci"]) == 2 for m in res["metrics"].values())


def test_same_seeds_give_the_same_numbers(tmp_path: Path) -> None:
    a = ToyStudy(seeds=2).reproduce(tmp_path / "a", progress=False)
    b = ToyStudy(seeds=2).reproduce(tmp_path / "b", progress=False)
    assert a["metrics"] == b["metrics"]
    c = ToyStudy(seeds=[5, 6]).reproduce(tmp_path / "c", progress=False)
    assert c["metrics"]["advantage"]["value"] != a["metrics"]["advantage"]["value"]


def _case_files(folder: Path) -> list[Path]:
    cases = folder / "cases"
    return sorted(p for p in cases.glob("*.json") if not p.name.startswith(".")) if cases.is_dir() else []


def test_killed_run_resumes_without_losing_or_duplicating_cases(tmp_path: Path) -> None:
    out = tmp_path / "run"
    log = tmp_path / "starts.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOY_SLEEP": "0.15",
           "TOY_LOG": str(log), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "workbench_cli.main", "reproduce", "tests.casestudy_toys:SlowToy", "--seeds", "2",
           "--out", str(out), "--json"]
    total = 2 * SlowToy.n_cases
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while len(_case_files(out / "slow_toy")) < 5 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # a real kill: no cleanup handlers run
    finally:
        proc.wait(timeout=30)
    done_before = {json.loads(p.read_text())["case_id"] for p in _case_files(out / "slow_toy")}
    assert 5 <= len(done_before) < total, "the kill should land midway"
    assert not (out / "slow_toy" / "results.json").exists()

    rerun = subprocess.run(cmd, env={**env, "TOY_SLEEP": "0"}, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    files = _case_files(out / "slow_toy")
    ids = [json.loads(p.read_text())["case_id"] for p in files]
    expected = {f"s{s}:c{i:03d}" for s in range(2) for i in range(SlowToy.n_cases)}
    assert len(ids) == len(set(ids)) == total and set(ids) == expected
    starts = [line.split()[1] for line in log.read_text().splitlines()]
    # a case finished before the kill is never run again; at most the one in flight runs twice
    assert not done_before & {i for i in starts[len(starts) - (total - len(done_before)):]}
    assert len(starts) - total <= 1
    res = json.loads((out / "slow_toy" / "results.json").read_text())
    assert res["cases"]["n"] == total
    clean = SlowToy(seeds=2).reproduce(tmp_path / "clean", progress=False)
    assert res["metrics"] == clean["metrics"]  # interrupted and uninterrupted runs agree


def test_calibration_and_leaderboard_pool_studies(tmp_path: Path) -> None:
    real = ToyStudy(seeds=2).reproduce(tmp_path / "real", progress=False)
    null = NullToy(seeds=2).reproduce(tmp_path / "null", progress=False)
    calib = calibration([real, null])
    assert calib["overall"]["n_predictions"] == 4
    assert calib["overall"]["counts"] == {"held": 3, "failed": 1, "inconclusive": 0}
    sized = {(r["study"], r["id"]): r for r in calib["predictions"]}
    assert sized[("toy", "beats_random")]["abs_rel_error"] < 0.2  # predicted 1.0, true effect 1.0
    assert sized[("null_toy", "beats_random")]["abs_rel_error"] > 0.8  # predicted 1.0, true effect 0
    board_real = leaderboard([real])["methods"][0]
    board_null = leaderboard([null])["methods"][0]
    assert board_real["method"] == "toy_method" and board_real["win_rate_ci"][0] > 0.9
    assert board_null["win_rate_ci"][0] < 0.5 < board_null["win_rate_ci"][1]


def test_run_report_lists_every_study_and_embeds_every_figure(tmp_path: Path) -> None:
    from workbench.reproduce import render, run_studies

    summary = run_studies([ToyStudy(seeds=2), NullToy(seeds=2)], tmp_path / "run", progress=False)
    page = (tmp_path / "run" / "report.html").read_text()
    n_figs = sum(len(json.loads((tmp_path / "run" / s / "results.json").read_text())["figures"])
                 for s in ("toy", "null_toy"))
    assert page.count("<img ") == n_figs + 2  # + calibration and leaderboard charts
    assert "src='data:image/png;base64," in page and "<script" not in page
    for s in ("toy", "null_toy"):
        assert sha256_file(tmp_path / "run" / s / "prediction.json") in page
    assert {s["study"] for s in summary["studies"]} == {"toy", "null_toy"}
    for name in ("results.json", "calibration.json", "leaderboard.json", "predictions.csv", "metrics.csv"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    (tmp_path / "run" / "report.html").unlink()
    again = render(tmp_path / "run")  # re-render from stored results only
    assert Path(again["report"]).read_text().count("<img ") == n_figs + 2


def test_report_on_a_missing_run_is_a_user_error(tmp_path: Path) -> None:
    from workbench_cli.main import main

    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert main(["reproduce", "no_such_study", "--out", str(tmp_path / "x")]) == 2


def test_spearman_handles_ties_and_constants():
    from workbench.bootstrap import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254, abs=1e-6)  # tied ranks averaged
    assert spearman([5, 5, 5], [1, 2, 3]) is None


# --- several models per study ---------------------------------------------------------------------

def _toy_ctx(offsets: dict[str, float]) -> Any:
    from workbench.casestudy import StudyContext
    from workbench.suite import Suite

    return StudyContext(progress=False, suite=Suite("test", {"toy": tuple(offsets)}),
                        models={spec: {"offset": off} for spec, off in offsets.items()})


def test_one_model_gives_exactly_todays_numbers_and_case_ids(tmp_path: Path) -> None:
    from tests.casestudy_toys import ModelToy

    plain = ToyStudy(seeds=2).reproduce(tmp_path / "plain", progress=False)
    one = ModelToy(seeds=2).reproduce(tmp_path / "one", ctx=_toy_ctx({"m0": 0.0}), progress=False)
    assert one["metrics"] == plain["metrics"] and one["metrics"]["advantage"]["n_clusters"] == 1
    assert one["cases"]["ids"] == plain["cases"]["ids"] and one["cases"]["ids"][0] == "s0:c000"
    assert [m["spec"] for m in one["models"]] == ["m0"] and list(one["by_model"]) == ["m0"]
    assert one["by_model"]["m0"]["verdicts"]["beats_random"]["verdict"] == one["verdicts"][0]["verdict"]
    assert one["config"]["models"] == ["m0"] and one["suite"]["name"] == "test"


def test_cluster_bootstrap_with_one_cluster_is_the_row_bootstrap() -> None:
    rng = np.random.default_rng(3)
    rows = [{"x": float(v), "model": "only"} for v in rng.normal(size=40)]
    m = mean_of("m", "x")
    plain, clustered = estimate(rows, m, seed=4), estimate(rows, m, seed=4, cluster="model")
    assert (plain.value, plain.low, plain.high) == (clustered.value, clustered.low, clustered.high)
    assert clustered.n_clusters == 1 and plain.n_clusters is None


def test_several_models_carry_the_model_and_widen_the_interval(tmp_path: Path) -> None:
    from tests.casestudy_toys import ModelToy

    offsets = {"zoo:a@1": 0.0, "zoo:b@1": 0.8, "zoo:c@1": 1.6}
    res = ModelToy(seeds=2).reproduce(tmp_path / "three", ctx=_toy_ctx(offsets), progress=False)
    ids = res["cases"]["ids"]
    assert len(ids) == 3 * 2 * ModelToy.n_cases and all(i.split("|")[0] in offsets for i in ids)
    assert "zoo:b@1|s1:c003" in ids
    records = [json.loads(p.read_text()) for p in _case_files(tmp_path / "three")]
    assert {r["record"]["model"] for r in records} == set(offsets)
    header = (tmp_path / "three" / "cases.csv").read_text().splitlines()[0].split(",")
    assert "model" in header
    assert {c["model"] for c in res["comparisons"]} == set(offsets)
    assert set(res["by_model"]) == set(offsets) and [m["spec"] for m in res["models"]] == list(offsets)
    per = {s: res["by_model"][s]["metrics"]["advantage"]["value"] for s in offsets}
    assert per["zoo:c@1"] - per["zoo:a@1"] == pytest.approx(1.6)
    pooled = res["metrics"]["advantage"]
    assert pooled["n_clusters"] == 3
    # the same rows with the cases resampled as if independent: the model-level spread is left out
    naive = estimate(_rows_of(tmp_path / "three"), paired_difference("a", "treatment", "control"), seed=0)
    assert (pooled["ci"][1] - pooled["ci"][0]) > 2 * (naive.high - naive.low)


def _rows_of(folder: Path) -> list[dict[str, Any]]:
    import csv

    with open(folder / "cases.csv") as fh:
        return [{k: (float(v) if k in ("treatment", "control") else v) for k, v in row.items()}
                for row in csv.DictReader(fh)]


def test_several_models_resume_without_rerunning(tmp_path: Path) -> None:
    from tests.casestudy_toys import ModelToy

    calls: list[str] = []

    class Counting(ModelToy):
        def run_case(self, state: Any, seed: int, key: str) -> dict[str, Any]:
            calls.append(key)
            return super().run_case(state, seed, key)

    offsets = {"a": 0.0, "b": 1.0}
    first = Counting(seeds=1).reproduce(tmp_path / "r", ctx=_toy_ctx(offsets), progress=False)
    n = len(calls)
    again = Counting(seeds=1).reproduce(tmp_path / "r", ctx=_toy_ctx(offsets), progress=False)
    assert n == 2 * ModelToy.n_cases and len(calls) == n and again["metrics"] == first["metrics"]
    with pytest.raises(WorkbenchError, match="config"):  # other models in the same folder are refused
        Counting(seeds=1).reproduce(tmp_path / "r", ctx=_toy_ctx({"a": 0.0, "c": 1.0}), progress=False)


def test_a_model_failing_a_zoo_check_stops_the_run_before_any_study(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from tests.casestudy_toys import ModelToy
    from workbench.casestudy import StudyContext
    from workbench.reproduce import run_studies
    from workbench.suite import Suite

    weak = SimpleNamespace(info={"name": "factgpt", "accuracy": 0.5, "prefixed_accuracy": 0.5})
    handles = {"good": {"offset": 0.0}, "weak": weak}
    monkeypatch.setattr(StudyContext, "model", lambda self, spec: handles[spec])
    with pytest.raises(WorkbenchError, match=r"model weak \(toy\) fails the zoo's check 'fact accuracy'"):
        run_studies([ToyStudy(seeds=1), ModelToy(seeds=1)], tmp_path / "run", suite=Suite("test", {"toy": ("good", "weak")}),
                    progress=False)
    assert not (tmp_path / "run" / "toy").exists() and not (tmp_path / "run" / "run.json").exists()


def test_run_records_suite_code_and_options_and_refuses_another_suite(tmp_path: Path) -> None:
    from workbench.reproduce import run_studies
    from workbench.suite import Suite, dev_suite

    out = tmp_path / "run"
    run_studies([ToyStudy(seeds=1)], out, suite=dev_suite(quick=True), progress=False)
    run = json.loads((out / "run.json").read_text())
    assert run["suite"]["sha256"] == dev_suite(quick=True).sha256 and len(run["options_sha256"]) == 64
    assert "package" in run["code_version"]
    top = json.loads((out / "results.json").read_text())
    assert top["suite"]["name"] == "dev" and top["options_sha256"] == run["options_sha256"]
    run_studies([ToyStudy(seeds=1)], out, suite=dev_suite(quick=True), progress=False)  # resumes
    with pytest.raises(WorkbenchError, match="holds a run of suite dev"):
        run_studies([ToyStudy(seeds=1)], out, suite=Suite("other", {"toy": ("x",)}), progress=False)
