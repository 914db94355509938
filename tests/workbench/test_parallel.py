"""Cases as Ray tasks: two local workers, one killed mid-case; nothing lost, nothing twice, same results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.casestudy_toys import ToyStudy
from workbench.errors import WorkbenchError
from workbench.parallel import check_workers
from workbench.reproduce import run_studies

ROOT = Path(__file__).resolve().parents[2]


def _records(study_dir: Path) -> dict[str, dict]:
    out = {}
    for path in sorted((study_dir / "cases").glob("*.json")):
        record = json.loads(path.read_text())
        out[record["case_id"]] = record
    return out


@pytest.mark.slow
def test_two_workers_one_killed_lose_and_repeat_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray", reason="parallel runs need Ray (pip install 'interp-workbench[ray]')")
    run_studies([ToyStudy(seeds=2)], tmp_path / "one", progress=False)
    log, mark = tmp_path / "starts.log", tmp_path / "killed"
    monkeypatch.setenv("TOY_LOG", str(log))
    monkeypatch.setenv("TOY_KILL", "c007")
    monkeypatch.setenv("TOY_KILL_MARK", str(mark))
    monkeypatch.setenv("TOY_SLEEP", "0.05")
    run_studies([ToyStudy(seeds=2)], tmp_path / "two", progress=False, workers=2)

    assert mark.is_file()  # a worker really died mid-case
    starts = log.read_text().splitlines()
    killed = [line for line in starts if line.endswith(":c007")]
    assert len(killed) == 3  # c007 of both seeds, one of them started again after its worker died
    others = [line for line in starts if not line.endswith(":c007")]
    assert len(others) == len(set(others)) == 2 * (ToyStudy.n_cases - 1)  # every other case ran once

    a, b = _records(tmp_path / "one" / "toy"), _records(tmp_path / "two" / "toy")
    assert sorted(a) == sorted(b) and len(b) == 2 * ToyStudy.n_cases
    for case_id, record in a.items():
        assert b[case_id]["record"]["result"] == record["record"]["result"], case_id
    metrics_a = json.loads((tmp_path / "one" / "toy" / "results.json").read_text())["metrics"]
    metrics_b = json.loads((tmp_path / "two" / "toy" / "results.json").read_text())["metrics"]
    assert metrics_a == metrics_b
    assert json.loads((tmp_path / "two" / "run.json").read_text())["workers"] == 2


def test_worker_counts_are_checked() -> None:
    assert check_workers(2) == 2
    for bad in (0, -1, 1.5, True, 5000):
        with pytest.raises(WorkbenchError, match="workers"):
            check_workers(bad)
    with pytest.raises(WorkbenchError, match="--workers 2"):
        check_workers(1, "auto")


@pytest.mark.parametrize("flags, message", [(["--workers", "0"], "--workers"),
                                            (["--ray-address", "auto"], "--ray-address")])
def test_cli_refuses_bad_worker_options(tmp_path: Path, flags: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "workbench_cli.main", "reproduce", "tests.casestudy_toys:ToyStudy",
                           "--out", str(tmp_path / "run"), *flags], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
