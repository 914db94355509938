"""Who may talk to the server, body limits, paths inside the workspace, and the `serve` command's checks.

No model is loaded here: the guard answers before any route runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from workbench.errors import WorkbenchError
from workbench_app import AppConfig, create_app
from workbench_app.security import COOKIE, MAX_BODY_BYTES, inside, is_loopback, token_required
from workbench_app.workspace import Workspace

LOOPBACK = ("127.0.0.1", 40000)
REMOTE = ("192.0.2.7", 40000)  # TEST-NET-1: never a real peer
TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator:
    opened: list[TestClient] = []

    def make(*, token: str | None = None, client: tuple[str, int] = LOOPBACK, max_body: int = MAX_BODY_BYTES,
             host: str = "127.0.0.1:8000") -> TestClient:
        app = create_app(AppConfig(workspace=tmp_path / f"ws{len(opened)}", token=token, max_body=max_body))
        c = TestClient(app, base_url=f"http://{host}", client=client)
        c.__enter__()
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.__exit__(None, None, None)


def test_loopback_client_needs_no_token(make_client) -> None:
    c = make_client()
    r = c.get("/api/health")
    assert r.status_code == 200 and r.json()["token_required"] is False


@pytest.mark.parametrize("path", ["/", "/api/health", "/api/models", "/static/app.js", "/api/studies", "/api/runs",
                                  "/api/run?path=runs/x", "/api/run/file?path=runs/x&name=report.html",
                                  "/api/models/zoo-shapesnet-8cd74bd5/units"])
def test_a_remote_client_without_token_is_refused(make_client, path: str) -> None:
    c = make_client(client=REMOTE)
    r = c.get(path)
    assert r.status_code == 403
    assert "answers only its own machine" in r.json()["error"] and "192.0.2.7" in r.json()["error"]


def test_token_server_refuses_missing_and_wrong_tokens_and_accepts_each_form(make_client) -> None:
    c = make_client(token=TOKEN, client=REMOTE, host="192.0.2.1:8000")
    missing = c.get("/api/health")
    assert missing.status_code == 401 and "needs its token" in missing.json()["error"]
    assert missing.headers["www-authenticate"] == "Bearer"
    assert c.get("/api/health", headers={"Authorization": "Bearer wrong-token"}).status_code == 403
    assert c.post("/api/models", json={"spec": "zoo:factgpt"}).status_code == 401  # before any route or model
    assert c.post("/api/studies", json={"study": "4"}).status_code == 401
    assert c.get("/api/run/file", params={"path": "runs/x", "name": "report.html"}).status_code == 401
    assert c.get("/api/health", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert c.get("/api/health", headers={"X-Workbench-Token": TOKEN}).status_code == 200
    page = c.get(f"/?token={TOKEN}")
    assert page.status_code == 200 and "<title>Interpretability workbench</title>" in page.text
    cookie = page.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={TOKEN}") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert c.get("/api/health").status_code == 200  # the cookie set by the page now carries the token


def test_a_loopback_server_refuses_foreign_host_names(make_client) -> None:
    c = make_client()
    r = c.get("/api/health", headers={"Host": "attacker.example:8000"})
    assert r.status_code == 403 and "is not this machine" in r.json()["error"]
    for host in ("localhost:8000", "[::1]:8000", "127.0.0.2"):
        assert c.get("/api/health", headers={"Host": host}).status_code == 200


def test_pages_elsewhere_cannot_change_anything(make_client) -> None:
    c = make_client()
    r = c.post("/api/jobs/1700000000000-abcdef/cancel", headers={"Origin": "http://attacker.example"})
    assert r.status_code == 403 and "cross-site request from http://attacker.example refused" in r.json()["error"]
    r = c.delete("/api/models/x/edits/y", headers={"Origin": "http://127.0.0.1:9999"})  # another port: another origin
    assert r.status_code == 403
    empty_form = c.post("/api/jobs/1700000000000-abcdef/cancel",
                        headers={"Content-Type": "application/x-www-form-urlencoded", "Content-Length": "0"})
    assert empty_form.status_code == 415  # a form posted from elsewhere, even without a body
    same = c.post("/api/jobs/1700000000000-abcdef/cancel", headers={"Origin": "http://127.0.0.1:8000"})
    assert same.status_code == 404 and "unknown job" in same.json()["error"]  # the page's own origin gets through


def test_posts_must_be_json_within_the_size_limit(make_client) -> None:
    c = make_client(max_body=2048)
    form = c.post("/api/models", content="spec=zoo:factgpt", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415 and "must be JSON" in form.json()["error"]
    big = c.post("/api/models", content=json.dumps({"spec": "x" * 5000}), headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and "limit is 2048" in big.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while the body is read
        yield b'{"spec": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}'

    streamed = c.post("/api/models", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and "exceeds the limit" in streamed.json()["error"]
    assert c.get("/api/health").status_code == 200  # and the server keeps serving


def test_malformed_json_and_non_objects_are_one_line_400s(make_client) -> None:
    c = make_client()
    r = c.post("/api/models", content="{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("malformed JSON in the request body")
    assert "\n" not in r.json()["error"]
    r = c.post("/api/models", json=["zoo:factgpt"])
    assert r.status_code == 400 and "JSON list" in r.json()["error"]
    r = c.post("/api/models", json={"spec": 3})
    assert r.status_code == 400 and "spec must be text" in r.json()["error"]
    r = c.get("/api/nowhere")
    assert r.status_code == 404 and r.json()["error"] == "no such page or endpoint: GET /api/nowhere"


@pytest.mark.parametrize("bad", ["../outside", "/etc", "a/../../b", "~/x", "", "  "])
def test_paths_outside_the_workspace_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(WorkbenchError, match="workspace|empty"):
        inside(tmp_path, bad)


def test_a_link_out_of_the_workspace_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", root / "link")
    with pytest.raises(WorkbenchError, match="leads outside the workspace"):
        inside(root, "link")
    assert inside(root, "models/x") == root.resolve() / "models" / "x"


def test_which_hosts_need_a_token() -> None:
    assert token_required("127.0.0.1", None) is None and token_required("::1", None) is None
    generated = token_required("0.0.0.0", None)
    assert generated is not None and len(generated) >= 24 and generated != token_required("0.0.0.0", None)
    assert token_required("0.0.0.0", "given-token") == "given-token"
    with pytest.raises(WorkbenchError, match="at least 8"):
        token_required("127.0.0.1", "short")
    assert is_loopback("127.8.9.1") and is_loopback("localhost") and not is_loopback("10.0.0.1")
    assert not is_loopback("testclient") and not is_loopback(None)


def test_one_server_per_workspace(tmp_path: Path) -> None:
    first, second = Workspace(tmp_path), Workspace(tmp_path)
    first.acquire()
    try:
        with pytest.raises(WorkbenchError, match="in use by another server"):
            second.acquire()
    finally:
        first.release()
    second.acquire()
    second.release()


def test_serve_refuses_bad_options_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from workbench_cli.main import main

    assert main(["serve", "--port", "0"]) == 2
    assert "port 0 is out of range" in capsys.readouterr().err
    assert main(["serve", "--host", "0.0.0.0", "--token", "short", "--workspace", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("workbench: error: --token is 5 characters") and err.count("\n") == 1
    (tmp_path / "file").write_text("x")
    assert main(["serve", "--workspace", str(tmp_path / "file")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err


def test_serve_with_a_token_prints_it_and_refuses_requests_without_it(tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    from tests.workbench_app.server import serve

    with serve(tmp_path / "ws", extra=("--token", TOKEN)) as server:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(server["url"] + "/api/models", timeout=10)
        assert refused.value.code == 401
        req = urllib.request.Request(server["url"] + "/api/health", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as res:
            assert json.loads(res.read())["token_required"] is True
        server["log"].seek(0)
        assert f"?token={TOKEN}" in server["log"].read()
