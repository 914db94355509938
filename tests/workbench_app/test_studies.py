"""The Studies endpoints: start a study as a job, browse and filter stored runs, bad input.

The studies here are the model-free toys of the harness tests (offered as the server's extra
`module:Class` studies), so a whole run takes about a second; the numbered studies go
through the same code (`workbench.reproduce.run_studies`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from workbench_app import AppConfig, create_app

TOY = "tests.casestudy_toys:ToyStudy"
SLOW = "tests.casestudy_toys:SlowToy"
CLIENT = ("127.0.0.1", 40000)


@pytest.fixture()
def app_client(tmp_path: Path) -> Iterator[tuple[Any, TestClient, Path]]:
    workspace = tmp_path / "ws"
    app = create_app(AppConfig(workspace=workspace, torch_threads=1, studies=(TOY, SLOW)))
    with TestClient(app, base_url="http://127.0.0.1:8000", client=CLIENT) as client:
        yield app, client, workspace


def error(r: Any, status: int) -> str:
    assert r.status_code == status, r.text
    message = r.json()["error"]
    assert "\n" not in message
    return message


def run_to_end(app: Any, c: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    r = c.post("/api/studies", json=body)
    assert r.status_code == 202, r.text
    job_id = r.json()["job"]["id"]
    app.state.runtime["jobs"].wait(job_id, 120)
    return c.get(f"/api/jobs/{job_id}").json()


def test_the_catalogue_lists_the_numbered_studies_and_the_offered_ones(app_client) -> None:
    import case_studies

    _, c, _ = app_client
    data = c.get("/api/studies").json()
    names = [s["name"] for s in data["studies"]]
    assert names[: len(case_studies.STUDIES)] == case_studies.available() and names[-2:] == [TOY, SLOW]
    by_name = {s["name"]: s for s in data["studies"]}
    assert by_name["knowledge_neurons"]["number"] == 4 and by_name["knowledge_neurons"]["world"] == "factgpt"
    assert by_name["trojan_surgery"]["world"] == "shapesnet" and by_name[TOY]["world"] is None
    assert data["busy"] is None and data["runs_folder"] == "runs"


def test_a_study_job_runs_into_a_run_folder_and_the_run_is_browsable(app_client) -> None:
    app, c, ws = app_client
    rec = run_to_end(app, c, {"study": TOY, "out": "runs/toy-a"})
    assert rec["state"]["status"] == "done" and rec["state"]["kind"] == "study"
    assert rec["config"]["study"] == "toy" and rec["config"]["quick"] is True and rec["config"]["seeds"] == [0, 1]
    assert rec["result"]["out"] == "runs/toy-a" and rec["result"]["cases_run"] == 40
    assert (ws / "runs" / "toy-a" / "toy" / "prediction.sha256").is_file()
    assert len(list((ws / "runs" / "toy-a" / "toy" / "cases").glob("*.json"))) == 40
    listed = c.get("/api/runs").json()["runs"]
    assert [r["path"] for r in listed] == ["runs/toy-a"]
    assert listed[0]["complete"] and listed[0]["report"] and not listed[0]["running"]
    assert listed[0]["counts"] == {"held": 2, "failed": 0, "inconclusive": 0, "pending": 0}
    view = c.get("/api/run", params={"path": "runs/toy-a"}).json()
    stored = json.loads((ws / "runs" / "toy-a" / "toy" / "results.json").read_text())
    assert view["complete"] and view["report"] == "report.html" and view["n_predictions"] == 2
    assert [(p["id"], p["verdict"], p["measured"]) for p in view["predictions"]] == \
        [(v["id"], v["verdict"], v["measured"]) for v in stored["verdicts"]]
    study = view["studies"][0]
    assert study["status"] == "done" and study["cases"] == 40 and study["prediction_sha256"] == stored["prediction_sha256"]
    assert view["facets"]["method"] == {"toy_method": 1, "": 1} and view["facets"]["basis"] == {"finding": 1, "guess": 1}
    assert view["facets"]["verdict"] == {"held": 2}
    # the files the run wrote: the report (sandboxed: shown, not scripted) and the figures
    report = c.get("/api/run/file", params={"path": "runs/toy-a", "name": "report.html"})
    assert report.status_code == 200 and report.headers["content-security-policy"] == "sandbox"
    assert report.headers["content-type"].startswith("text/html") and b"Toy" in report.content
    fig = study["figures"][0]["file"]
    png = c.get("/api/run/file", params={"path": "runs/toy-a", "name": f"toy/{fig}"})
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("key,value,expected", [
    ("verdict", "held", ["beats_random", "no_side_effect"]),
    ("verdict", "failed", []),
    ("method", "toy_method", ["beats_random"]),
    ("basis", "guess", ["no_side_effect"]),
    ("source", "toy", ["beats_random"]),
    ("study", "toy", ["beats_random", "no_side_effect"]),
])
def test_predictions_filter_by_verdict_method_basis_and_source(app_client, key, value, expected) -> None:
    app, c, _ = app_client
    run_to_end(app, c, {"study": TOY, "out": "runs/f"})
    view = c.get("/api/run", params={"path": "runs/f", key: value}).json()
    assert [p["id"] for p in view["predictions"]] == expected
    assert view["n_predictions"] == 2 and view["filters"] == {key: value}


def test_a_second_study_job_waits_and_cancel_keeps_the_finished_cases(app_client, monkeypatch) -> None:
    app, c, ws = app_client
    gate = ws.parent / "gate"
    monkeypatch.setenv("TOY_GATE", str(gate))  # every case waits for this file
    first = c.post("/api/studies", json={"study": SLOW, "out": "runs/slow"}).json()["job"]["id"]
    runner = app.state.runtime["jobs"]
    for _ in range(500):
        if "case" in runner.get(first).message:
            break
        threading.Event().wait(0.02)
    assert "slow_toy: case 1 of 24" in runner.get(first).message
    msg = error(c.post("/api/studies", json={"study": TOY}), 409)
    assert msg == f"a study job ({first}) is running on this workspace; wait for it to finish or cancel it, then try again"
    assert c.get("/api/studies").json()["busy"]["id"] == first
    listed = {r["path"]: r for r in c.get("/api/runs").json()["runs"]}
    assert listed["runs/slow"]["running"] and not listed["runs/slow"]["complete"]
    view = c.get("/api/run", params={"path": "runs/slow"}).json()  # a run still going shows its predictions pending
    assert view["running"] and {p["verdict"] for p in view["predictions"]} == {"pending"}
    assert c.post(f"/api/jobs/{first}/cancel").json()["job"]["cancel_requested"]
    gate.write_text("open")
    state = runner.wait(first, 60)
    assert state.status == "cancelled"
    kept = len(list((ws / "runs" / "slow" / "slow_toy" / "cases").glob("*.json")))
    assert 1 <= kept < 24  # stopped between cases, the finished ones stored
    view = c.get("/api/run", params={"path": "runs/slow", "verdict": "pending"}).json()
    assert not view["complete"] and not view["running"] and len(view["predictions"]) == 2
    assert view["studies"][0]["status"] == "incomplete" and view["studies"][0]["cases"] == kept
    # the same study into the same folder resumes: only the missing cases run
    rec = run_to_end(app, c, {"study": SLOW, "out": "runs/slow"})
    assert rec["state"]["status"] == "done" and rec["result"]["cases_run"] == 24 - kept
    assert c.get("/api/run", params={"path": "runs/slow"}).json()["complete"]
    assert [j["kind"] for j in c.get("/api/jobs?kind=study").json()["jobs"]] == ["study", "study"]


def test_bad_study_requests_are_4xx_with_one_line_messages(app_client, tmp_path: Path) -> None:
    import case_studies
    from workbench.errors import WorkbenchError

    _, c, ws = app_client
    with pytest.raises(WorkbenchError) as unknown:
        case_studies.resolve("nosuchstudy")
    assert error(c.post("/api/studies", json={"study": "nosuchstudy"}), 404) == str(unknown.value)
    assert "unknown study '99'" in error(c.post("/api/studies", json={"study": "99"}), 404)
    assert "study is missing" in error(c.post("/api/studies", json={}), 400)
    assert "study is missing" in error(c.post("/api/studies", json={"study": 4}), 400)
    assert "not offered by this server" in error(c.post("/api/studies", json={"study": "os:system"}), 400)
    assert "not offered by this server" in error(
        c.post("/api/studies", json={"study": "tests.casestudy_toys:NullToy"}), 400)
    assert "seeds 0: expected an integer 1..20" in error(c.post("/api/studies", json={"study": TOY, "seeds": 0}), 400)
    assert "expected an integer 1..20" in error(c.post("/api/studies", json={"study": TOY, "seeds": "3"}), 400)
    assert "quick 'yes'" in error(c.post("/api/studies", json={"study": TOY, "quick": "yes"}), 400)
    for out in ("../outside", "/tmp/run", "runs/../../x", "~/run"):
        assert "must be a relative path inside the workspace" in error(
            c.post("/api/studies", json={"study": TOY, "out": out}), 400), out
    for out in ("jobs/x", "stacks", "."):
        assert "one the app keeps for itself" in error(c.post("/api/studies", json={"study": TOY, "out": out}), 400)
    (ws / "notes").mkdir()
    (ws / "notes" / "mine.txt").write_text("not a run")
    assert "is not a `workbench reproduce` run" in error(
        c.post("/api/studies", json={"study": TOY, "out": "notes"}), 400)
    assert "malformed JSON" in error(c.post("/api/studies", content=b"{", headers={"Content-Type": "application/json"}),
                                     400)
    assert not (ws / "runs").exists()  # nothing started by any of these
    # browsing: unknown run folders, path traversal, files outside the run or of other kinds
    assert "no run at 'runs/none'" in error(c.get("/api/run", params={"path": "runs/none"}), 404)
    assert "no run at 'notes'" in error(c.get("/api/run", params={"path": "notes"}), 404)
    assert "path is missing" in error(c.get("/api/run"), 400)
    outside = tmp_path / "outside-run"
    outside.mkdir()
    (outside / "run.json").write_text("{}")
    for path in ("../outside-run", str(outside), "runs/../../outside-run", "..", "%2e%2e/outside-run"):
        assert c.get("/api/run", params={"path": path}).status_code in (400, 404), path
    assert "must be a relative path inside the workspace" in error(c.get("/api/run", params={"path": "../outside-run"}),
                                                                  400)
    (ws / "link").symlink_to(outside)
    assert "leads outside the workspace" in error(c.get("/api/run", params={"path": "link"}), 400)
    assert "link" not in [r["path"] for r in c.get("/api/runs").json()["runs"]]


def test_run_files_stay_inside_the_run_and_are_of_known_kinds(app_client) -> None:
    app, c, ws = app_client
    run_to_end(app, c, {"study": TOY, "out": "runs/files"})
    (ws / "secret.json").write_text("{}")
    (ws / "runs" / "files" / "notes.txt").write_text("x")
    get = lambda name: c.get("/api/run/file", params={"path": "runs/files", "name": name})
    assert "inside the run folder" in error(get("../../secret.json"), 400)
    assert "inside the run folder" in error(get("/etc/passwd"), 400)
    assert "serves a run's .png, .html, .csv, .json files only" in error(get("notes.txt"), 400)
    assert "no file 'missing.png'" in error(get("missing.png"), 404)
    assert "name is missing" in error(c.get("/api/run/file", params={"path": "runs/files"}), 400)
    assert get("run.json").json()["studies"] == ["toy"]
    assert "verdict 'maybe': expected one of held, failed, inconclusive, pending" in error(
        c.get("/api/run", params={"path": "runs/files", "verdict": "maybe"}), 400)


@pytest.mark.parametrize("flag,expected", [
    ("os:path", "study 'os:path' is a module, not a CaseStudy class"),
    ("nocolon", "--study 'nocolon': expected module:Class of a CaseStudy"),
    ("tests.casestudy_toys:Nothing", "cannot load study 'tests.casestudy_toys:Nothing'"),
])
def test_serve_refuses_a_bad_study_flag_before_it_starts(tmp_path: Path, flag: str, expected: str) -> None:
    import subprocess
    import sys

    workspace = tmp_path / "ws"
    done = subprocess.run([sys.executable, "-m", "workbench_cli", "serve", "--study", flag, "--port", "1",
                           "--workspace", str(workspace)], check=False, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and expected in done.stderr
    assert done.stderr.strip().count("\n") == 0 and not workspace.exists()  # one line; nothing created


def test_study_progress_is_pushed_over_server_sent_events(app_client, monkeypatch) -> None:
    _, c, _ = app_client
    monkeypatch.setenv("TOY_SLEEP", "0.02")
    job_id = c.post("/api/studies", json={"study": SLOW, "out": "runs/sse"}).json()["job"]["id"]
    states, events = [], []
    with c.stream("GET", f"/api/jobs/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                events.append(line.split(":", 1)[1].strip())
            elif line.startswith("data:") and events[-1] == "state":
                states.append(json.loads(line[5:]))
    assert events[-1] == "end" and states[-1]["status"] == "done"
    progress = [s["progress"] for s in states]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert any(s["message"].startswith("slow_toy: case ") for s in states)
