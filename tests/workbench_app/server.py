"""Start `workbench serve` as a real process on a free loopback port (for the tests)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, *, method: str = "GET", body: Any = None, timeout: float = 30.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    with urllib.request.urlopen(req, timeout=timeout) as res:
        return json.loads(res.read())


@contextmanager
def serve(workspace: Path, *, extra: tuple[str, ...] = (), timeout: float = 90.0) -> Iterator[dict[str, Any]]:
    """`workbench serve` on a free port, one torch thread; yields {url, proc}; stopped (SIGTERM) on exit."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "workbench_cli", "serve", "--port", str(port), "--workspace", str(workspace),
           "--threads", "1", "--device", "cpu", *extra]
    log = open(workspace.parent / f"server-{port}.log", "w+", encoding="utf-8")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"workbench serve exited {proc.returncode}: {log.read()[-3000:]}")
            try:
                get_json(url + "/api/health", timeout=2)
                break
            except urllib.error.HTTPError:  # an answer (401 without the token) means the server is up
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.time() > deadline:
                    raise RuntimeError(f"workbench serve did not answer within {timeout} s") from None
                time.sleep(0.2)
        yield {"url": url, "proc": proc, "log": log}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()
