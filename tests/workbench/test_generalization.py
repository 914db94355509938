"""Dev versus held-out: the same frozen predictions on both suites, side by side, with the held-out
leaderboard first and the methods that lose their lead named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.casestudy_toys import ModelToy
from workbench.casestudy import StudyContext
from workbench.errors import WorkbenchError
from workbench.generalization import compare
from workbench.reproduce import collect, render, run_studies
from workbench.suite import Suite
from workbench_cli.main import main

# The toy method's action beats its control by ~1.0 plus the model's offset: it leads on the dev model
# and loses its lead on the held-out models, where the offset cancels the effect.
OFFSETS = {"dev-model": 0.0, "held-a": -1.0, "held-b": -1.1}


@pytest.fixture
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.setattr(StudyContext, "model", lambda self, spec: {"offset": OFFSETS[spec]})
    dev, held = tmp_path / "dev", tmp_path / "held"
    run_studies([ModelToy(seeds=2)], dev, suite=Suite("dev", {"toy": ("dev-model",)}), progress=False)
    run_studies([ModelToy(seeds=2)], held, suite=Suite("heldout", {"toy": ("held-a", "held-b")}, seed=5, quick=True),
                progress=False, dev_run=dev)
    return dev, held


def test_heldout_run_holds_the_comparison_per_prediction_and_method(runs: tuple[Path, Path]) -> None:
    dev, held = runs
    top = json.loads((held / "results.json").read_text())
    cmp = top["dev_vs_heldout"]
    assert top["dev_run"] == str(dev.resolve()) and cmp["dev_suite"] == "dev" and cmp["heldout_suite"] == "heldout"
    assert cmp["predictions_changed"] == []  # the same frozen predictions ran on both suites
    beats = next(p for p in cmp["predictions"] if p["id"] == "beats_random")
    assert beats["basis"] == "finding" and beats["method"] == "toy_method"
    assert beats["dev"]["verdict"] == "held" and beats["heldout"]["verdict"] == "failed"
    assert beats["gap"] == pytest.approx(beats["heldout"]["measured"] - beats["dev"]["measured"])
    assert beats["gap"] == pytest.approx(-1.05, abs=0.2)
    assert beats["heldout_by_model"] == {"held-a": "failed", "held-b": "failed"}
    assert beats["same_verdict"] is False
    method = next(m for m in cmp["methods"] if m["method"] == "toy_method")
    assert method["dev"]["held_share"] == 1.0 and method["heldout"]["held_share"] == 0.0
    assert method["held_share_gap"] == -1.0
    assert json.loads((held / "comparison.json").read_text())["predictions"] == cmp["predictions"]


def test_the_leaderboard_is_ranked_on_heldout_and_names_who_loses_the_lead(runs: tuple[Path, Path]) -> None:
    dev, held = runs
    board = compare(collect(dev), collect(held))["leaderboard"]
    toy = next(m for m in board if m["method"] == "toy_method")
    assert toy["dev_win_rate"] > 0.9 and toy["dev_win_rate_ci"][0] > 0.5
    assert toy["win_rate_ci"][0] <= 0.5 and toy["lost_lead"] and "not on held-out" in toy["why"]
    html = (held / "report.html").read_text()
    assert html.index("Held-out models: leaderboard") < html.index("Overview")
    assert "beat its control on dev" in html


def test_a_method_that_keeps_its_lead_is_not_flagged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(StudyContext, "model", lambda self, spec: {"offset": 0.0})
    dev, held = tmp_path / "dev", tmp_path / "held"
    run_studies([ModelToy(seeds=2)], dev, suite=Suite("dev", {"toy": ("m",)}), progress=False)
    run_studies([ModelToy(seeds=2)], held, suite=Suite("heldout", {"toy": ("h",)}, seed=5, quick=True), progress=False)
    board = compare(collect(dev), collect(held))["leaderboard"]
    assert [m["lost_lead"] for m in board] == [False]


def test_report_takes_a_dev_run_and_refuses_what_is_not_one(runs: tuple[Path, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    dev, held = runs
    code = main(["report", str(held), "--dev-run", str(dev)])
    out = capsys.readouterr().out
    assert code == 0 and "held-out leaderboard" in out and "LOSES ITS LEAD" in out
    for bad, fragment in ((held, "the run folder itself"), (tmp_path / "none", "no study results there")):
        code = main(["report", str(held), "--dev-run", str(bad)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and fragment in err and len(err.splitlines()) == 1
    with pytest.raises(WorkbenchError, match="holds a run of suite heldout"):
        render(dev, dev_run=held)


def test_compare_needs_shared_studies(runs: tuple[Path, Path]) -> None:
    dev, held = runs
    other: list[dict[str, Any]] = [{**r, "study": "another"} for r in collect(held)]
    with pytest.raises(WorkbenchError, match="share no study"):
        compare(collect(dev), other)
