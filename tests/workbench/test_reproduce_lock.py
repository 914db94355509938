"""One writer per `workbench reproduce` folder: a second run is refused at once, a killed one frees it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.casestudy_toys import SlowToy, ToyStudy
from workbench.errors import WorkbenchError
from workbench.reproduce import LOCK_FILE, folder_lock, render, run_studies

ROOT = Path(__file__).resolve().parents[2]


def _cmd(out: Path, seeds: int) -> list[str]:
    return [sys.executable, "-m", "workbench_cli.main", "reproduce", "tests.casestudy_toys:SlowToy",
            "--seeds", str(seeds), "--out", str(out), "--json"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _holder(out: Path, proc: subprocess.Popen, timeout: float = 120.0) -> dict:
    """What the running `proc` wrote into the folder's lock file, once it holds the lock."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            found = json.loads((out / LOCK_FILE).read_text())
        except (OSError, ValueError):
            found = None
        if isinstance(found, dict) and found.get("pid") == proc.pid:
            return found
        time.sleep(0.05)
    raise AssertionError(f"the first run never took the lock (exit {proc.poll()})")


def _cases(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((folder / "cases").glob("*.json")) if not p.name.startswith(".")]


def test_second_run_on_a_held_folder_is_refused_and_the_folder_stays_consistent(tmp_path: Path) -> None:
    out, gate = tmp_path / "run", tmp_path / "gate"
    first = subprocess.Popen(_cmd(out, 2), env=_env(TOY_GATE=str(gate)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        holder = _holder(out, first)
        assert holder["command"] == "workbench reproduce" and "slow_toy(seeds 0,1)" in holder["options"]
        for seeds in (3, 2):  # different options, then the same ones: both refused
            t0 = time.perf_counter()
            second = subprocess.run(_cmd(out, seeds), env=_env(), capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr[-2000:]
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1, second.stderr
            assert f"another workbench reproduce (pid {first.pid}, started at " in lines[0]
            assert "options slow_toy(seeds 0,1)" in lines[0]
            assert f"is writing {out}; wait for it or use another --out" in lines[0]
            assert first.poll() is None  # refused while the first was still running: it did not wait
            assert time.perf_counter() - t0 < 60
        gate.touch()
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
    assert first.returncode == 0, stderr[-2000:]
    study = out / "slow_toy"
    config = json.loads((study / "config.json").read_text())
    assert config["seeds"] == [0, 1]
    cases = _cases(study)
    expected = {f"s{s}:c{i:03d}" for s in (0, 1) for i in range(SlowToy.n_cases)}
    assert len(cases) == len(expected) and {c["case_id"] for c in cases} == expected
    digest = (study / "prediction.sha256").read_text().split()[0]
    assert {c["record"]["prediction_sha256"] for c in cases} == {digest}
    results = json.loads((study / "results.json").read_text())
    assert results["seeds"] == [0, 1] and results["cases"]["n"] == len(expected)
    run = json.loads((out / "run.json").read_text())
    assert run["seeds"] == [[0, 1]]
    top = json.loads((out / "results.json").read_text())
    assert [r["cases"]["n"] for r in top["results"]] == [len(expected)]
    assert (out / LOCK_FILE).read_text() == ""  # released, and its record cleared


def test_a_killed_holder_does_not_leave_the_folder_locked(tmp_path: Path) -> None:
    out, gate = tmp_path / "run", tmp_path / "gate"
    first = subprocess.Popen(_cmd(out, 2), env=_env(TOY_GATE=str(gate)), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _holder(out, first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # no cleanup runs: the record stays, the kernel drops the lock
        first.wait(timeout=30)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == first.pid
    rerun = subprocess.run(_cmd(out, 2), env=_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads((out / "slow_toy" / "results.json").read_text())["cases"]["n"] == 2 * SlowToy.n_cases


def test_lock_refuses_run_and_render_in_process_and_is_released(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_studies([ToyStudy(seeds=1)], out, progress=False)
    with folder_lock(out, "workbench reproduce", "toy(seeds 0)", "wait"):
        with pytest.raises(WorkbenchError, match=rf"another workbench reproduce \(pid {os.getpid()}, started at .*"
                                                 r"options toy\(seeds 0\)\) is writing .*; wait for it or use another --out"):
            run_studies([ToyStudy(seeds=1)], out, progress=False)
        with pytest.raises(WorkbenchError, match="wait for it, then render again"):
            render(out)
    assert render(out)["studies"][0]["study"] == "toy"  # released on exit
    with pytest.raises(WorkbenchError, match="not a folder"):
        render(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
