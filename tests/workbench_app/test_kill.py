"""Kill the real server (SIGKILL) in the middle of a job, restart it on the same workspace.

What finished before the kill is all there (an edit on the stack, its job's result, a study
run), the job that was running is marked `interrupted` (not lost, not left `running`), the
cases it finished are kept and a rerun resumes from them, and the edited model reopens with
exactly the weights its stack says.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.workbench_app.server import get_json, serve
from tests.zoo_models import factgpt

SLOW = "tests.casestudy_toys:SlowToy"
TOY = "tests.casestudy_toys:ToyStudy"


def wait_job(url: str, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.time() + timeout
    while True:
        rec = get_json(f"{url}/api/jobs/{job_id}")
        if rec["state"]["status"] not in ("queued", "running"):
            return rec
        assert time.time() < deadline, f"job {job_id} still {rec['state']['status']} after {timeout} s"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_killed_server_restarts_with_a_consistent_store_and_the_job_marked_interrupted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    factgpt()  # trained on first use (minutes), then cached; the server loads the same cache entry
    monkeypatch.setenv("TOY_SLEEP", "0.3")  # 24 cases of 0.3 s: the study job runs for about 7 s
    workspace = tmp_path / "ws"
    cases = workspace / "runs" / "slow" / "slow_toy" / "cases"
    with serve(workspace, extra=("--study", SLOW, "--study", TOY)) as server:
        url = server["url"]
        # finished before the kill: an edit on zoo FactGPT ...
        key = get_json(url + "/api/models", method="POST", body={"spec": "zoo:factgpt"})["key"]
        ex = get_json(f"{url}/api/models/{key}/example?seed=5")
        body = {"prompt": ex["prompt"], "subject": ex["subject"], "target": ex["target"], "method": "rome",
                "layer": 0, "prediction": {"expect": {"prompt_p_new_min": 0.5}}}
        edit_id = get_json(f"{url}/api/models/{key}/edits", method="POST", body=body)["job"]["id"]
        edit = wait_job(url, edit_id)
        assert edit["state"]["status"] == "done" and edit["result"]["edit"] is not None
        model = get_json(f"{url}/api/models/{key}")
        assert len(model["stack"]) == 1 and model["fingerprint"] != model["original_fingerprint"]
        # ... and a study run
        first = get_json(url + "/api/studies", method="POST", body={"study": TOY, "out": "runs/first"})["job"]["id"]
        assert wait_job(url, first)["state"]["status"] == "done"
        # running at the kill: a study with cases already stored
        slow = get_json(url + "/api/studies", method="POST", body={"study": SLOW, "out": "runs/slow"})["job"]["id"]
        deadline = time.time() + 60
        while not (cases.is_dir() and len(list(cases.glob("*.json"))) >= 3):
            assert time.time() < deadline, "the study job stored no cases within 60 s"
            time.sleep(0.05)
        assert get_json(f"{url}/api/jobs/{slow}")["state"]["status"] == "running"
        server["proc"].send_signal(signal.SIGKILL)
        assert server["proc"].wait(10) == -signal.SIGKILL

    # what the killed server left on disk: the job still says running, the cases it finished are whole
    left = json.loads((workspace / "jobs" / slow / "state.json").read_text())
    assert left["status"] == "running"
    kept = sorted(p.name for p in cases.glob("*.json"))
    assert 3 <= len(kept) < 24 and not list(cases.glob(".*"))  # no partial write behind
    for p in kept:
        assert json.loads((cases / p).read_text())["record"]["result"]["treatment"] is not None

    with serve(workspace, extra=("--study", SLOW, "--study", TOY)) as server:
        url = server["url"]
        assert get_json(url + "/api/health")["interrupted_at_start"] == [slow]
        state = get_json(f"{url}/api/jobs/{slow}")["state"]
        assert state["status"] == "interrupted" and "server stopped" in state["error"] and not state["cancellable"]
        jobs = get_json(url + "/api/jobs")["jobs"]
        assert {j["id"]: j["status"] for j in jobs} == {edit_id: "done", first: "done", slow: "interrupted"}
        # finished work is all there
        again = get_json(f"{url}/api/jobs/{edit_id}")
        assert again["result"] == edit["result"] and again["state"]["prediction_sha256"] == \
            edit["state"]["prediction_sha256"]
        reopened = get_json(f"{url}/api/models/{key}")  # the stack re-applied to freshly loaded weights
        assert reopened["stack"] == model["stack"] and reopened["fingerprint"] == model["fingerprint"]
        assert reopened["original_fingerprint"] == model["original_fingerprint"] and reopened["busy"] is None
        runs = {r["path"]: r for r in get_json(url + "/api/runs")["runs"]}
        assert runs["runs/first"]["complete"] and runs["runs/first"]["counts"]["held"] == 2
        assert not runs["runs/slow"]["complete"] and not runs["runs/slow"]["running"]
        view = get_json(f"{url}/api/run?path=runs/slow")
        assert view["studies"][0]["cases"] == len(kept) and {p["verdict"] for p in view["predictions"]} == {"pending"}
        # the run resumes: the lock the killed server held is gone, only the missing cases run
        resumed = get_json(url + "/api/studies", method="POST", body={"study": SLOW, "out": "runs/slow"})["job"]["id"]
        rec = wait_job(url, resumed)
        assert rec["state"]["status"] == "done" and rec["result"]["cases_run"] == 24 - len(kept)
        assert get_json(f"{url}/api/run?path=runs/slow")["complete"]
        # and the edit made before the kill still undoes bit-exactly to the original weights
        undone = get_json(f"{url}/api/models/{key}/edits/{edit_id}", method="DELETE")
        assert undone["bit_exact"] and undone["original"]
