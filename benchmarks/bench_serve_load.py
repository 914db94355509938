"""Load on `workbench serve`: concurrent clients read pages and results while edit jobs run.

    .venv/bin/python benchmarks/bench_serve_load.py --clients 20 --seconds 30 --out benchmarks/out/serve_load.json

Starts a real `workbench serve` process (one torch thread, CPU) on a free loopback port with a
temporary workspace, opens a zoo model (zoo:factgpt), and keeps a job running for the whole
measurement: a causal trace of one of its world's facts, then a ROME edit at the trace's MLP
peak, then an undo, again and again. Meanwhile `--clients` threads, each with its own HTTP
connection, read in turn the page (`/`, `/static/app.js`), the model (`/api/models/KEY`, its
stack), the job list and the running (or last) job with its result (`/api/jobs/ID`), for
`--seconds`. Prints one JSON document: requests, errors (any non-2xx answer or failed request),
latency p50 / p95 / p99 / max overall and per endpoint, the share of requests made while a
job ran, the jobs finished, and the machine (CPU count, load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENDPOINTS = ("page", "script", "model", "stack", "jobs", "job")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def summary(latencies: list[float]) -> dict[str, Any]:
    ms = [1000 * x for x in latencies]
    return {"n": len(ms), "p50_ms": _r(percentile(ms, 50)), "p95_ms": _r(percentile(ms, 95)),
            "p99_ms": _r(percentile(ms, 99)), "max_ms": _r(max(ms) if ms else None),
            "mean_ms": _r(statistics.fmean(ms) if ms else None)}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


class Server:
    """`workbench serve` as a child process on a free port, stopped on exit."""

    def __init__(self, workspace: Path, threads: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        self.log = open(workspace.parent / "server.log", "w+", encoding="utf-8")  # noqa: SIM115 - closed in stop
        self.proc = subprocess.Popen([sys.executable, "-m", "workbench_cli", "serve", "--port", str(self.port),
                                      "--workspace", str(workspace), "--threads", str(threads), "--device", "cpu"],
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"workbench serve exited {self.proc.returncode}: {self.log.read()[-2000:]}")
            try:
                httpx.get(self.url + "/api/health", timeout=2).raise_for_status()
                return
            except httpx.HTTPError:
                if time.time() > deadline:
                    raise SystemExit("workbench serve did not answer within 120 s") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def driver(url: str, key: str, stop: threading.Event, shared: dict[str, Any]) -> None:
    """Keep a job running: trace, ROME at the MLP peak, undo; again until `stop`."""
    client = httpx.Client(base_url=url, timeout=600)
    seed = 0

    def wait(job_id: str) -> dict[str, Any]:
        while True:
            rec = client.get(f"/api/jobs/{job_id}").json()
            if rec["state"]["status"] not in ("queued", "running"):
                return rec
            time.sleep(0.05)

    def run(kind: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = client.post(path, json=body)
        r.raise_for_status()
        job_id = r.json()["job"]["id"]
        t0 = time.perf_counter()
        with shared["lock"]:
            shared["job"] = job_id
            shared["busy_since"] = time.perf_counter()
        rec = wait(job_id)
        t1 = time.perf_counter()
        with shared["lock"]:
            shared["busy"].append((shared.pop("busy_since"), t1))
            shared["jobs"].append({"kind": kind, "status": rec["state"]["status"], "seconds": round(t1 - t0, 2)})
        return rec

    try:
        while not stop.is_set():
            ex = client.get(f"/api/models/{key}/example", params={"seed": seed}).json()
            seed += 1
            trace = run("trace", f"/api/models/{key}/trace", {"prompt": ex["prompt"], "subject": ex["subject"]})
            if stop.is_set() or trace["state"]["status"] != "done":
                break
            layer = trace["result"]["peaks"]["mlp"]["layer"]
            edit = run("edit", f"/api/models/{key}/edits", {
                "prompt": ex["prompt"], "subject": ex["subject"], "target": ex["target"], "method": "rome",
                "layer": layer, "prediction": {"should_change": [], "should_not_change": [],
                                               "expect": {"prompt_p_new_min": 0.5}}})
            if edit["state"]["status"] == "done" and edit["result"].get("edit"):
                with shared["lock"]:
                    shared["verdicts"].append(edit["result"]["verdict"])
                undone = client.delete(f"/api/models/{key}/edits/{edit['state']['id']}").json()
                with shared["lock"]:
                    shared["undo_bit_exact"].append(bool(undone.get("bit_exact")))
    except Exception as exc:  # noqa: BLE001 - reported, the measurement goes on
        shared["driver_error"] = f"{type(exc).__name__}: {exc}"
    finally:
        client.close()


def reader(url: str, key: str, index: int, stop: threading.Event, shared: dict[str, Any],
           records: list[tuple[str, float, float, int | None]]) -> None:
    """One client: the endpoints in turn (each client starts at another), timing each request."""
    paths = {"page": "/", "script": "/static/app.js", "model": f"/api/models/{key}",
             "stack": f"/api/models/{key}/edits", "jobs": "/api/jobs"}
    client = httpx.Client(base_url=url, timeout=30)
    i = index
    try:
        while not stop.is_set():
            name = ENDPOINTS[i % len(ENDPOINTS)]
            i += 1
            if name == "job":
                with shared["lock"]:
                    job = shared.get("job")
                if job is None:
                    continue
                path = f"/api/jobs/{job}"
            else:
                path = paths[name]
            t0 = time.perf_counter()
            try:
                status: int | None = client.get(path).status_code
            except httpx.HTTPError:
                status = None
            records.append((name, t0, time.perf_counter() - t0, status))
    finally:
        client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=20, help="concurrent reading clients (default 20)")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long the clients read (default 30)")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1)")
    ap.add_argument("--spec", default="zoo:factgpt", help="the model to open (default zoo:factgpt)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        server = Server(Path(tmp) / "ws", args.threads)
        try:
            opened = httpx.post(server.url + "/api/models", json={"spec": args.spec}, timeout=600)
            opened.raise_for_status()
            key = opened.json()["key"]
            stop = threading.Event()
            shared: dict[str, Any] = {"lock": threading.Lock(), "job": None, "busy": [], "jobs": [], "verdicts": [],
                                      "undo_bit_exact": []}
            records: list[tuple[str, float, float, int | None]] = []
            drive = threading.Thread(target=driver, args=(server.url, key, stop, shared), daemon=True)
            drive.start()
            while shared.get("job") is None and drive.is_alive():
                time.sleep(0.01)
            clients = [threading.Thread(target=reader, args=(server.url, key, i, stop, shared, records), daemon=True)
                       for i in range(args.clients)]
            t_start = time.perf_counter()
            for c in clients:
                c.start()
            time.sleep(args.seconds)
            stop.set()
            for c in clients:
                c.join(60)
            t_end = time.perf_counter()
            drive.join(600)
        finally:
            server.stop()
    busy = list(shared["busy"])
    in_job = [r for r in records if any(a <= r[1] <= b for a, b in busy) or
              (shared.get("busy_since") is not None and r[1] >= shared["busy_since"])]
    errors = [r for r in records if r[3] is None or not 200 <= r[3] < 300]
    result = {
        "clients": args.clients, "seconds": round(t_end - t_start, 2), "spec": args.spec,
        "server_threads": args.threads, "requests": len(records),
        "requests_per_s": round(len(records) / max(1e-9, t_end - t_start), 1),
        "errors": len(errors), "error_statuses": sorted({str(r[3]) for r in errors}),
        "share_during_a_job": round(len(in_job) / max(1, len(records)), 3),
        "latency": summary([r[2] for r in records]),
        "latency_during_a_job": summary([r[2] for r in in_job]),
        "by_endpoint": {name: summary([r[2] for r in records if r[0] == name]) for name in ENDPOINTS},
        "jobs": {kind: {"n": sum(j["kind"] == kind for j in shared["jobs"]),
                        "done": sum(j["kind"] == kind and j["status"] == "done" for j in shared["jobs"]),
                        "median_s": _r(statistics.median([j["seconds"] for j in shared["jobs"] if j["kind"] == kind]))
                        if any(j["kind"] == kind for j in shared["jobs"]) else None}
                 for kind in ("trace", "edit")},
        "edit_verdicts": dict(Counter(shared["verdicts"])),
        "undo_bit_exact": f"{sum(shared['undo_bit_exact'])} of {len(shared['undo_bit_exact'])}",
        "driver_error": shared.get("driver_error"),
        "machine": {"cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
                    "platform": platform.platform()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from workbench.storage import atomic_write_text

        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
