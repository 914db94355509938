"""The Units endpoints on zoo ShapesNet: rank and ablate a trojan's units beside random units, apply, undo."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from workbench_app import AppConfig, create_app

SMALL = {"n_eval": 150, "n_clean": 200, "draws": 2}  # fewer scenes than the page's default: a faster job


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from tests.zoo_models import factgpt
    from workbench.models import load

    load("zoo:shapesnet", device="cpu", progress=False)  # trained on first use (minutes), then cached
    factgpt()
    workspace = tmp_path_factory.mktemp("units") / "ws"
    app = create_app(AppConfig(workspace=workspace, torch_threads=1))
    with TestClient(app, base_url="http://127.0.0.1:8000", client=("127.0.0.1", 40000)) as c:
        key = c.post("/api/models", json={"spec": "zoo:shapesnet"}).json()["key"]
        yield {"app": app, "c": c, "key": key, "ws": workspace}


def error(r: Any, status: int) -> str:
    assert r.status_code == status, r.text
    message = r.json()["error"]
    assert "\n" not in message
    return message


def run(server: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    c, key = server["c"], server["key"]
    r = c.post(f"/api/models/{key}/units", json=body)
    assert r.status_code == 202, r.text
    job_id = r.json()["job"]["id"]
    server["app"].state.runtime["jobs"].wait(job_id, 300)
    return c.get(f"/api/jobs/{job_id}").json()


def test_the_form_offers_the_models_trojans_sites_and_methods(server) -> None:
    from workbench.models import load
    from workbench.zoo.shapesnet import world_of

    world = world_of(load("zoo:shapesnet", device="cpu", progress=False))
    opts = server["c"].get(f"/api/models/{server['key']}/units").json()
    assert [t["name"] for t in opts["trojans"]] == [t.name for t in world.trojans]
    assert "layer2.relu2" in opts["sites"] and opts["methods"][0] == "activation_difference"
    assert opts["classes"] == list(world.classes)


def test_ranked_units_cut_attack_success_more_than_random_ones_and_apply_undoes_bit_exactly(server) -> None:
    c, key, ws = server["c"], server["key"], server["ws"]
    original = c.get(f"/api/models/{key}").json()["original_fingerprint"]
    rec = run(server, {"trojan": "patch-square", "site": "layer2.relu2", **SMALL})
    assert rec["state"]["status"] == "done" and rec["state"]["kind"] == "units", rec["state"]
    r = rec["result"]
    assert r["site"] == "layer2.relu2" and r["n_units"] == len(r["units"]) >= 1 and r["n_eval"] == 150
    assert r["asr_before"] > 0.9 and r["asr_after"] < r["random_asr_after"] - 0.2  # the control runs beside it
    assert r["clean_before"] - r["clean_after"] < 0.05 and len(r["random_asr_draws"]) == 2
    assert [p["k"] for p in r["curve"]] == [1, 2, 3, 4, 6, 8, 12, 16]
    assert r["fingerprint"] == original and (ws / "jobs" / rec["state"]["id"] / "delta.safetensors").is_file()
    assert c.get(f"/api/models/{key}").json()["fingerprint"] == original  # the job never changes the model
    applied = c.post(f"/api/models/{key}/units/{rec['state']['id']}/apply").json()
    entry = applied["edit"]
    assert entry["method"] == "ablate" and entry["layer"] == "layer2.relu2" and entry["units"] == r["units_by_site"]
    assert applied["fingerprint"] == entry["fingerprint_after"] != original
    assert "already on the stack" in error(c.post(f"/api/models/{key}/units/{rec['state']['id']}/apply"), 409)
    # a second ablation measured on the edited model; the first one can then no longer be re-applied on top
    second = run(server, {"trojan": "style-star", "site": "layer3.relu1", "n_units": 3, **SMALL})
    assert second["result"]["n_units"] == 3 and second["result"]["fingerprint"] == entry["fingerprint_after"]
    undone = c.delete(f"/api/models/{key}/edits/{rec['state']['id']}").json()
    assert undone["bit_exact"] and undone["original"]
    assert "has changed since job" in error(c.post(f"/api/models/{key}/units/{second['state']['id']}/apply"), 409)


def test_bad_units_requests_answer_4xx_with_one_line(server) -> None:
    c, key = server["c"], server["key"]
    jobs_before = c.get(f"/api/jobs?model={key}&kind=units").json()["jobs"]
    post = lambda body: c.post(f"/api/models/{key}/units", json=body)
    assert error(post({"trojan": "nope"}), 400).startswith("unknown trojan 'nope'; zoo:shapesnet has patch-universal")
    assert "unknown method 'magic'" in error(post({"trojan": "patch-square", "method": "magic"}), 400)
    assert "site 'fc' is not one whose units fold" in error(post({"trojan": "patch-square", "site": "fc"}), 400)
    assert "leave the site out" in error(post({"trojan": "patch-square", "method": "greedy", "site": "stem.relu"}), 400)
    assert "n_units 0: expected an integer 1..64" in error(post({"trojan": "patch-square", "n_units": 0}), 400)
    assert "n_eval 10: expected an integer 50..5000" in error(post({"trojan": "patch-square", "n_eval": 10}), 400)
    assert "malformed JSON" in error(c.post(f"/api/models/{key}/units", content=b"[",
                                            headers={"Content-Type": "application/json"}), 400)
    assert "unknown model" in error(c.get("/api/models/zoo-nothing-12345678/units"), 404)
    assert "unknown job" in error(c.post(f"/api/models/{key}/units/not-a-job/apply"), 404)
    fact = c.post("/api/models", json={"spec": "zoo:factgpt"}).json()["key"]
    assert "is not a ShapesWorld model" in error(c.get(f"/api/models/{fact}/units"), 400)
    assert "is not a ShapesWorld model" in error(c.post(f"/api/models/{fact}/units", json={"trojan": "x"}), 400)
    assert c.get(f"/api/jobs?model={key}&kind=units").json()["jobs"] == jobs_before  # none of these started a job


def test_a_job_of_another_kind_or_model_cannot_be_applied(server, tmp_path: Path) -> None:
    c, key = server["c"], server["key"]
    fact = c.post("/api/models", json={"spec": "zoo:factgpt"}).json()["key"]
    ex = c.get(f"/api/models/{fact}/example").json()
    job = c.post(f"/api/models/{fact}/trace", json={"prompt": ex["prompt"], "subject": ex["subject"], "samples": 2})
    job_id = job.json()["job"]["id"]
    server["app"].state.runtime["jobs"].wait(job_id, 120)
    assert "is not a units job of zoo:shapesnet" in error(c.post(f"/api/models/{key}/units/{job_id}/apply"), 404)
