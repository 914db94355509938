"""`workbench tune`: the stated objective, the option space's checks, tiny searches of each new
tunable, and two workers sharing one study on a real PostgreSQL server."""

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
from typing import Any

import pytest

from workbench.errors import WorkbenchError
from workbench_cli.studies import resolve_tune_target
from workbench_protocols.tunables import TUNABLES
from workbench_protocols.tuning import (
    CONFIRM_SEED_OFFSET,
    Constraint,
    Param,
    TuningObjective,
    objective_for,
    restrict,
    tune,
)

PG_BIN = Path("/usr/local/bin")


def test_objective_states_the_constraint() -> None:
    obj = objective_for(2.0)
    assert obj.text() == "maximize S subject to NS_loss <= 2"
    c = Constraint("NS_loss", "<=", 2.0)
    assert c.violation({"NS_loss": 1.0}) < 0 < c.violation({"NS_loss": 3.0})
    assert Constraint("S", ">=", 80.0).violation({"S": 90.0}) < 0
    assert TuningObjective("S").text() == "maximize S"
    assert Constraint.parse(" clean_drop <= 0.5") == Constraint("clean_drop", "<=", 0.5)
    assert obj.with_constraints([Constraint.parse("NS_loss<=1")]).text() == "maximize S subject to NS_loss <= 1"
    for bad in ("NS_loss < 2", "NS_loss<=two", "<=2", "NS_loss<=nan"):
        with pytest.raises(WorkbenchError, match="METRIC<=NUMBER"):
            Constraint.parse(bad)


def test_every_tunable_states_an_objective_over_its_own_metrics() -> None:
    for t in TUNABLES.values():
        t.check_objective(t.objective)
        assert t.objective.constraints, t.name
    assert {"adversarial-patch", "copy-paste", "ablate"} <= set(TUNABLES)


@pytest.mark.parametrize("target, tunable", [("rome", "rome"), ("knowledge_neurons", "kn"), ("1", "rome"),
                                             ("trojan_surgery", "ablate"), ("5", "ablate"),
                                             ("copy_paste", "copy-paste"), ("copy-paste", "copy-paste")])
def test_tune_targets_are_tunables_or_studies(target: str, tunable: str) -> None:
    assert resolve_tune_target(target).name == tunable


def test_unknown_target_lists_the_valid_ones() -> None:
    with pytest.raises(WorkbenchError, match="cannot tune") as err:
        resolve_tune_target("nonsense")
    for name in ("rome", "adversarial-patch", "copy-paste", "ablate", "trojan_surgery -> ablate"):
        assert name in str(err.value)
    with pytest.raises(WorkbenchError, match="rule_rewrite.* no tunable action"):
        resolve_tune_target("rule_rewrite")


def test_options_outside_their_range_are_clear_errors() -> None:
    space = (Param("layer", "int", 0, 7), Param("lr", "float", 0.01, 0.5, log=True),
             Param("token", "categorical", choices=("subject_last", "prompt_last")))
    searched, pinned = restrict(space, fixed={"token": "prompt_last"}, ranges={"layer": ("2", "4")})
    assert pinned == {"token": "prompt_last"}
    assert [(p.name, p.low, p.high) for p in searched] == [("layer", 2, 4), ("lr", 0.01, 0.5)]
    cases: list[tuple[dict[str, Any], dict[str, Any], str]] = [
        ({"layer": 9}, {}, r"layer=9 is outside its range: expected int in \[0, 7\]"),
        ({"layer": "2.5"}, {}, "expected an integer"),
        ({"token": "middle"}, {}, "not allowed; expected one of subject_last, prompt_last"),
        ({"depth": 1}, {}, "unknown option 'depth'; options of this tunable: layer, lr, token"),
        ({}, {"lr": ("0.001", "0.1")}, "lr=0.001 is outside its range"),
        ({}, {"layer": ("5", "3")}, "5 > 3"),
        ({}, {"token": ("a", "b")}, "categorical"),
        ({"layer": 3}, {"layer": ("2", "4")}, "both fixed and given a range"),
    ]
    for fixed, ranges, message in cases:
        with pytest.raises(WorkbenchError, match=message):
            restrict(space, fixed=fixed, ranges=ranges)


def test_settings_and_constraints_are_checked_before_any_work(tmp_path: Path) -> None:
    patch = TUNABLES["adversarial-patch"]
    assert patch.resolve_settings({"n_train": "8"})["n_train"] == 8
    with pytest.raises(WorkbenchError, match="unknown setting 'n_images' for adversarial-patch; settings: target"):
        patch.resolve_settings({"n_images": 3})
    with pytest.raises(WorkbenchError, match="expected int like the default 32"):
        patch.resolve_settings({"n_train": "many"})
    with pytest.raises(WorkbenchError, match="reports no metric 'S'; its metrics: asr_after"):
        tune(TUNABLES["ablate"], constraints=["S>=1"], out=tmp_path)
    with pytest.raises(WorkbenchError, match="--cases applies to the knowledge editors"):
        tune(TUNABLES["copy-paste"], n_cases=3, out=tmp_path)
    with pytest.raises(WorkbenchError, match="reports no metric 'NS_loss'"):
        tune(TUNABLES["ablate"], max_ns_loss=2.0, out=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was written


# tiny searches of the tunables beyond the knowledge editors: (target, settings, fixed, ranges)
TINY: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, tuple[Any, Any]]]] = {
    "adversarial-patch": ({"n_train": 16, "n_heldout": 24, "eval_placements": 1}, {}, {"steps": (5, 8)}),
    "ablate": ({"n_select": 16, "n_eval": 32, "n_clean": 64, "n_ref": 32}, {"method": "activation_difference"}, {}),
    "copy-paste": ({"n_images": 40, "n_pool": 64}, {"n_featvis": 1, "n_exemplars": 1, "grid": 2},
                   {"featvis_steps": (8, 12)}),
}


@pytest.mark.parametrize("target", list(TINY))
def test_new_tunables_run_tiny_searches_end_to_end(target: str, tmp_path: Path) -> None:
    import optuna

    settings, fixed, ranges = TINY[target]
    said: list[str] = []
    r = tune(TUNABLES[target], n_trials=2, out=tmp_path, settings=settings, fixed=fixed, ranges=ranges, device="cpu",
             progress=False, announce=said.append)
    tunable = TUNABLES[target]
    assert said and f"objective: {tunable.objective.text()}" in said[0]  # stated before the search
    assert r["n_trials_total"] == 2 and r["worker_trials"] == [0, 1]
    assert r["n_complete"] + r["n_failed"] == 2 and r["n_complete"] >= 1, r["failures"]
    study = optuna.load_study(study_name=r["study_name"], storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.user_attrs["objective"] == tunable.objective.text()
    assert study.user_attrs["statement"]["settings"] == {**dict(tunable.settings), **settings}
    assert study.user_attrs["statement"]["fixed"] == fixed
    for t in study.get_trials():
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        metrics = t.user_attrs["metrics"]
        assert set(metrics) == set(tunable.metric_names())
        assert t.value == metrics[tunable.objective.metric]
        assert all(t.user_attrs["options"][k] == v for k, v in fixed.items())
        for name, (lo, hi) in ranges.items():
            assert lo <= t.params[name] <= hi
        feasible = all(c.violation(metrics) <= 0 for c in tunable.objective.constraints)
        assert feasible == all(v <= 0 for v in t.user_attrs["constraints"])
    if r["best"] is not None:
        assert all(c.violation(r["best"]["metrics"]) <= 0 for c in tunable.objective.constraints)
        # the best options are re-evaluated on data the search never saw, and judged by the same rule
        conf = r["best"]["confirmation"]
        assert conf["data_seed"] == CONFIRM_SEED_OFFSET and set(conf["metrics"]) == set(tunable.metric_names())
        assert conf["value"] == conf["metrics"][tunable.objective.metric]
        assert conf["feasible"] == all(c.violation(conf["metrics"]) <= 0 for c in tunable.objective.constraints)
    assert (tmp_path / "optuna.db").is_file() and list(tmp_path.glob("tune-worker0-*.json"))


def test_a_study_resumes_and_refuses_another_statement(tmp_path: Path) -> None:
    settings, _, ranges = TINY["adversarial-patch"]
    kw: dict[str, Any] = {"out": tmp_path, "settings": settings, "ranges": ranges, "device": "cpu", "progress": False,
                          "confirm": False}
    first = tune(TUNABLES["adversarial-patch"], n_trials=1, **kw)
    assert first["best"] is None or "confirmation" not in first["best"]
    again = tune(TUNABLES["adversarial-patch"], n_trials=1, **kw)
    assert again["study_name"] == first["study_name"] and again["n_trials_total"] == 2
    assert again["worker_trials"] == [1]
    with pytest.raises(WorkbenchError, match="started with another statement"):
        tune(TUNABLES["adversarial-patch"], n_trials=1, study_name=first["study_name"], constraints=["area<=0.2"], **kw)
    with pytest.raises(WorkbenchError, match=r"patch_frac=0.9 is outside its range: expected float in \[0.1, 0.5\]"):
        tune(TUNABLES["adversarial-patch"], n_trials=1, fixed={"patch_frac": 0.9}, **kw)


@pytest.mark.parametrize("argv, message", [
    (["tune", "nonsense"], "cannot tune 'nonsense'"),
    (["tune", "ablate", "--set", "trojan"], "--set 'trojan': expected NAME=VALUE"),
    (["tune", "ablate", "--range", "n_units=4"], "expected NAME=LOW:HIGH"),
    (["tune", "ablate", "--constraint", "clean_drop<1"], "METRIC<=NUMBER"),
    (["tune", "ablate", "--trials", "0"], "argument --trials: 0"),
])
def test_tune_cli_bad_input_exits_2(argv: list[str], message: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from workbench_cli.main import main

    assert main([*argv, "--out", str(tmp_path), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_tune_cli_prints_the_statement_then_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from workbench_cli.main import main

    argv = ["tune", "trojan_surgery", "--trials", "1", "--out", str(tmp_path), "--json", "--device", "cpu",
            "--set", "n_select=16", "--set", "n_eval=32", "--set", "n_clean=64", "--set", "n_ref=32",
            "--set", "trojan=style-star", "--fix", "method=activation_difference", "--fix", "site=layer2.relu2",
            "--range", "n_units=1:2", "--constraint", "clean_drop<=0.5"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert "objective: minimize asr_after subject to clean_drop <= 0.5" in cap.err
    assert out["target"] == "ablate" and out["settings"]["trojan"] == "style-star"
    assert out["statement"]["fixed"] == {"method": "activation_difference", "site": "layer2.relu2"}
    assert out["n_complete"] == 1 and out["baseline"]["asr_before"] > 0.5


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
        cmd = [sys.executable, "-m", "workbench_cli.main", "tune", "rome", "--trials", str(trials_each), "--cases", "2",
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


@pytest.mark.slow
def test_ray_workers_share_one_postgres_study(postgres_url: str, tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="tune --workers needs Ray (pip install 'interp-workbench[ray]')")
    import optuna

    cmd = [sys.executable, "-m", "workbench_cli.main", "tune", "rome", "--trials", "2", "--cases", "2", "--storage",
           postgres_url, "--study-name", "ray-rome", "--workers", "2", "--out", str(tmp_path / "ray"), "--json",
           "--device", "cpu", "--no-confirm"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    per_worker = [set(w["trials"]) for w in result["ray_workers"]]
    assert [w["worker"]["worker"] for w in result["ray_workers"]] == [0, 1]
    assert all(len(m) == 2 for m in per_worker) and not per_worker[0] & per_worker[1]
    assert len({w["worker"]["pid"] for w in result["ray_workers"]}) == 2  # two processes
    study = optuna.load_study(study_name="ray-rome", storage=postgres_url)
    assert sorted(t.number for t in study.get_trials()) == sorted(per_worker[0] | per_worker[1])
    assert result["n_trials_total"] == 4 and result["worker_trials"] == []  # the summary ran no trial


def test_ray_workers_need_a_database_server(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "workbench_cli.main", "tune", "rome", "--workers", "2", "--out", str(tmp_path / "t")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "postgresql://" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()


def test_ablate_caps_n_units_at_half_the_site_so_the_random_control_exists(tmp_path: Path) -> None:
    # stem.relu has 16 units: more than 8 selected would leave too few for a disjoint random control
    settings, fixed, _ = TINY["ablate"]
    r = tune(TUNABLES["ablate"], n_trials=3, out=tmp_path, settings=settings, fixed={**fixed, "site": "stem.relu"},
             ranges={"n_units": (6, 32)}, device="cpu", progress=False)
    assert r["n_failed"] == 0 and r["n_complete"] == 3
    import optuna

    study = optuna.load_study(study_name=r["study_name"], storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert all(6 <= t.params["n_units"] <= 8 for t in study.get_trials())
    with pytest.raises(WorkbenchError, match="at most 8 at stem.relu"):  # refused before any trial or file
        tune(TUNABLES["ablate"], n_trials=1, out=tmp_path / "b", settings=settings, fixed={**fixed, "site": "stem.relu"},
             ranges={"n_units": (9, 32)}, device="cpu", progress=False)
    assert not (tmp_path / "b").exists()
