"""Run store: atomic per-case files, config checks on resume, no duplicate or lost case."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from workbench.errors import CorruptFileError, WorkbenchError
from workbench.results import RunStore, decode_case_id, encode_case_id

ROOT = Path(__file__).resolve().parents[2]


def test_config_is_checked_on_resume(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    config = {"model": "zoo:factgpt", "seeds": (1, 2), "editor": {"name": "rome", "layer": 3}}
    digest = store.write_config(config)
    assert store.read_config() == {"model": "zoo:factgpt", "seeds": [1, 2], "editor": {"name": "rome", "layer": 3}}
    assert RunStore(tmp_path / "run").write_config(dict(config)) == digest  # same config resumes
    changed = {"model": "zoo:factgpt", "seeds": [1, 2, 3], "editor": {"name": "rome", "layer": 4}, "n": 5}
    with pytest.raises(WorkbenchError) as info:
        RunStore(tmp_path / "run").write_config(changed)
    message = str(info.value)
    for fragment in ("editor.layer", "seeds", "n (new)", "--out"):
        assert fragment in message
    assert "zoo:factgpt" not in message  # unchanged keys are not listed
    assert store.read_config()["editor"]["layer"] == 3  # the stored config was not touched


def test_prediction_is_write_once(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    h = store.write_prediction({"direction": "up", "layer": 3})
    assert store.write_prediction({"layer": 3, "direction": "up"}) == h
    with pytest.raises(WorkbenchError, match="prediction"):
        store.write_prediction({"direction": "down", "layer": 3})


IDS = ["case-1", "Vel Oran / capital", "A", "a", "..", ".hidden", "é ü 事实", "x" * 400, "case%41", "100", "2"]


def test_case_ids_round_trip_to_distinct_safe_files(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    for i, case_id in enumerate(IDS):
        store.write_case(case_id, {"i": i, "id": case_id})
    names = [store.case_path(c).name for c in IDS]
    assert len({n.lower() for n in names}) == len(IDS)  # distinct even on case-insensitive disks
    for name in names:
        assert "/" not in name and not name.startswith(".") and len(name.encode()) < 255
    assert store.case_ids() == sorted(IDS)
    cases = store.load_cases()
    assert list(cases) == sorted(IDS)
    assert all(cases[c]["id"] == c for c in IDS)
    assert all(store.has_case(c) for c in IDS) and not store.has_case("missing")
    assert decode_case_id(encode_case_id("Vel Oran / capital")) == "Vel Oran / capital"


def test_overwrite_keeps_one_file(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.write_case("c", {"v": 1})
    store.write_case("c", {"v": 2})
    assert store.load_cases() == {"c": {"v": 2}}
    assert len(list((tmp_path / "cases").iterdir())) == 1


def test_corrupt_case_file_is_named(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.write_case("good", {"v": 1})
    store.write_case("bad", {"v": 2})
    path = store.case_path("bad")
    path.write_text('{"case_id": "bad", "record": {"v": ')  # truncated by something else
    with pytest.raises(CorruptFileError, match=str(path.name)):
        store.load_cases()
    path.write_text('{"case_id": "other", "record": 1}')
    with pytest.raises(CorruptFileError, match="another file"):
        store.load_cases()


def test_interrupted_write_temporaries_are_not_cases(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.write_case("done", 1)
    (tmp_path / "cases" / ".next.json.abc123.tmp").write_text("{partial")
    (tmp_path / "cases" / ".x.json").write_text("{partial")
    assert store.case_ids() == ["done"]
    assert store.load_cases() == {"done": 1}


def test_pending_keeps_order_and_rejects_duplicates(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.write_case("b", 0)
    assert store.pending(["c", "b", "a"]) == ["c", "a"]
    with pytest.raises(WorkbenchError, match="repeated"):
        store.pending(["a", "b", "a"])


def test_run_cases_resumes_after_interrupt(tmp_path: Path) -> None:
    ids = [f"case-{i}" for i in range(10)]
    calls: list[str] = []

    def flaky(case_id: str) -> dict[str, str]:
        if len(calls) == 4:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the fifth case
        calls.append(case_id)
        return {"id": case_id, "value": case_id.upper()}

    store = RunStore(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        store.run_cases(ids, flaky, progress=False)
    assert store.case_ids() == sorted(ids[:4])

    resumed: list[str] = []

    def steady(case_id: str) -> dict[str, str]:
        resumed.append(case_id)
        return {"id": case_id, "value": case_id.upper()}

    records = RunStore(tmp_path).run_cases(ids, steady, progress=False)
    assert resumed == ids[4:]  # finished cases are not recomputed
    assert list(records) == ids
    assert all(records[c] == {"id": c, "value": c.upper()} for c in ids)
    assert len(list((tmp_path / "cases").iterdir())) == len(ids)  # each exactly once
    assert RunStore(tmp_path).run_cases(ids, steady, progress=False) == records
    assert resumed == ids[4:]


def test_run_cases_survives_sigkill(tmp_path: Path) -> None:
    """A process killed outright mid-run loses nothing it had finished; a rerun completes it."""
    log = tmp_path / "computed.log"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from workbench.results import RunStore
        kill_at = int(sys.argv[1])
        def fn(case_id):
            with open({str(log)!r}, "a") as fh:
                fh.write(case_id + "\\n")
            if case_id == f"c{{kill_at:02d}}":
                os.kill(os.getpid(), signal.SIGKILL)
            return {{"case": case_id, "square": int(case_id[1:]) ** 2}}
        store = RunStore({str(tmp_path / "run")!r})
        store.write_config({{"n": 12}})
        store.run_cases([f"c{{i:02d}}" for i in range(12)], fn, progress=False)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run([sys.executable, "-c", script, "5"], env=env, cwd=ROOT)
    assert first.returncode == -signal.SIGKILL
    store = RunStore(tmp_path / "run")
    assert store.case_ids() == [f"c{i:02d}" for i in range(5)]
    second = subprocess.run([sys.executable, "-c", script, "99"], env=env, cwd=ROOT)
    assert second.returncode == 0
    computed = log.read_text().split()
    # c05 was killed mid-computation, so it runs again; no finished case is recomputed
    assert computed == [f"c{i:02d}" for i in range(6)] + [f"c{i:02d}" for i in range(5, 12)]
    cases = store.load_cases()
    assert list(cases) == [f"c{i:02d}" for i in range(12)]
    assert all(cases[f"c{i:02d}"]["square"] == i * i for i in range(12))


def test_artifacts_and_summary(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    assert store.write_artifact("plots/trace.png", b"\x89PNG").read_bytes() == b"\x89PNG"
    assert store.write_artifact("report.html", "<html></html>").read_text() == "<html></html>"
    assert json.loads(store.write_artifact("scores.json", {"es": 1.0}).read_text()) == {"es": 1.0}
    for bad in ("../escape.txt", "/abs.txt", "a/../../b", ""):
        with pytest.raises(WorkbenchError, match="relative path"):
            store.write_artifact(bad, "x")
    store.write_summary({"verdict": "held", "n": 3})
    assert store.read_summary() == {"verdict": "held", "n": 3}
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert leftovers == []
