"""`workbench tune`: the stated objective, and two workers sharing one study on a real PostgreSQL server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from workbench.errors import WorkbenchError
from workbench.tuning import Constraint, Objective, objective_for, resolve_target

PG_BIN = Path("/usr/local/bin")


def test_objective_states_the_constraint() -> None:
    obj = objective_for(2.0)
    assert obj.text() == "maximize S subject to NS_loss <= 2"
    c = Constraint("NS_loss", "<=", 2.0)
    assert c.violation({"NS_loss": 1.0}) < 0 < c.violation({"NS_loss": 3.0})
    assert Constraint("S", ">=", 80.0).violation({"S": 90.0}) < 0
    assert Objective("S").text() == "maximize S"


def test_tune_targets_are_editors_or_studies() -> None:
    assert resolve_target("rome").editor == "rome"
    assert resolve_target("knowledge_neurons").editor == "kn"
    assert resolve_target("1").editor == "rome"
    with pytest.raises(WorkbenchError, match="cannot tune"):
        resolve_target("nonsense")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its binaries as the `postgres` user then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists():
        pytest.skip("PostgreSQL binaries are not in /usr/local/bin")
    pytest.importorskip("psycopg")  # SQLAlchemy 2.1's default PostgreSQL driver
    root = Path(tempfile.mkdtemp(prefix="wb-pg-"))
    os.chmod(root, 0o755)
    if os.geteuid() == 0:
        shutil.chown(root, user="postgres")
    data = root / "data"
    port = _free_port()
    subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                 "-E", "UTF8"]), check=True, capture_output=True, timeout=120)
    subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w",
                                 "-o", f"-p {port} -h 127.0.0.1 -k {root}", "start"]),
                   check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_one_study_and_record_every_trial_once(postgres_url: str, tmp_path: Path) -> None:
    import optuna
    import psycopg

    trials_each = 3
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for worker in (0, 1):
        cmd = [sys.executable, "-m", "workbench.cli", "tune", "rome", "--trials", str(trials_each), "--cases", "2",
               "--storage", postgres_url, "--study-name", "shared-rome", "--worker", str(worker),
               "--out", str(tmp_path / f"w{worker}"), "--json", "--device", "cpu"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outputs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        outputs.append(json.loads(stdout))

    mine = [set(o["worker_trials"]) for o in outputs]
    assert all(len(m) == trials_each for m in mine)
    assert not mine[0] & mine[1]
    study = optuna.load_study(study_name="shared-rome", storage=postgres_url)
    trials = study.get_trials()
    numbers = sorted(t.number for t in trials)
    assert numbers == list(range(2 * trials_each)) and set(numbers) == mine[0] | mine[1]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for t in trials:
        assert t.number in mine[t.user_attrs["worker"]["worker"]]
        assert "NS_loss" in t.user_attrs["metrics"]
    assert study.user_attrs["objective"] == "maximize S subject to NS_loss <= 2"
    with psycopg.connect(postgres_url) as conn, conn.cursor() as cur:
        cur.execute("select count(*), count(distinct number) from trials")
        assert cur.fetchone() == (2 * trials_each, 2 * trials_each)
    assert outputs[1]["n_trials_total"] >= trials_each
