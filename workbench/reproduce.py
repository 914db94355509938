"""`workbench reproduce`: run case studies into one folder, then calibrate, rank and report.

    run_dir/
      run.json               what was asked last (studies, quick, seeds, device), the suite of models
                             (`workbench.suite`, with its sha256), the code version and a sha256 of every
                             option (the suite's and each study's config)
      <study>/               one RunStore per study (config, prediction.json + sha256, cases/, results.json,
                             metrics.csv, cases.csv, fig_*.png)
      results.json           every study's results + calibration + leaderboard (+ dev_vs_heldout with a dev run)
      comparison.json        with a dev run (`--dev-run`): dev versus this run (`workbench.generalization`)
      predictions.csv, metrics.csv, leaderboard.csv, calibration.json, leaderboard.json
      report.html            one self-contained page
      .lock                  who is writing the folder now (pid, start, options), while they do

Before any study runs, every model of the suite that the studies need is loaded (zoo models
train on demand) and checked: it must fit its role and pass the zoo's checks. Each study
resumes on its own: rerunning the same command after an interruption computes only the
missing cases; a folder that holds a run of another suite is refused. `render(run_dir)` rebuilds the run-level files and the report from
what is stored, without running anything. Both hold the folder's lock for their whole run,
so a second writer on the same folder stops at once instead of interleaving its cases,
config and report with the first's; the kernel drops the lock of a killed run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from workbench.casestudy import RESULTS_FILE, CaseStudy, StudyContext
from workbench.errors import LockHeldError, WorkbenchError
from workbench.storage import atomic_write_json, atomic_write_text, held_lock, sha256_json
from workbench.suite import Suite, code_version, dev_suite

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
RUN_FILE = "run.json"


@contextmanager
def folder_lock(run_dir: Path, command: str, options: str, advice: str) -> Iterator[None]:
    """Hold `run_dir`'s writer lock for the block, or raise a one-line `WorkbenchError` naming its holder."""
    holder = {"command": command, "pid": os.getpid(), "started": time.time(), "options": options}
    with ExitStack() as stack:
        try:
            stack.enter_context(held_lock(run_dir / LOCK_FILE, holder))
        except LockHeldError as exc:
            raise WorkbenchError(_busy_message(run_dir, exc.holder, advice)) from None
        yield


def _busy_message(run_dir: Path, holder: dict[str, Any], advice: str) -> str:
    if not holder:
        return f"another workbench process is writing {run_dir} (it has just started); {advice}"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    options = f", options {holder['options']}" if holder.get("options") else ""
    return (f"another {holder.get('command', 'workbench process')} (pid {holder.get('pid', '?')}, started at {when}"
            f"{options}) is writing {run_dir}; {advice}")


def _options(studies: Sequence[CaseStudy], suite: Suite, device: str, threads: int | None) -> str:
    parts = [f"{s.name}(seeds {','.join(map(str, s.seeds))}{', quick' if s.quick else ''})" for s in studies]
    return " ".join([*parts, f"suite={suite.name}{'' if suite.seed is None else f'@{suite.seed}'}", f"device={device}",
                     f"threads={threads}"])


def suite_roles(studies: Sequence[CaseStudy], suite: Suite) -> list[str]:
    """The roles the studies need, in suite order; a study whose role the suite lacks is an error."""
    needed = {s.world for s in studies if s.world is not None}
    missing = sorted(r for r in needed if r not in suite.roles)
    if missing:
        users = [s.name for s in studies if s.world in missing]
        raise WorkbenchError(f"studies {', '.join(users)} need role {missing[0]!r}, which suite {suite.name} lacks; "
                             f"its roles: {', '.join(suite.roles)}")
    return [r for r in suite.roles if r in needed]


def _check_same_suite(out: Path, suite: Suite) -> None:
    """Refuse to resume a folder that holds a run of another suite (its cases ran on other models)."""
    path = out / RUN_FILE
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("suite") or {}
    except (ValueError, AttributeError):
        return
    if recorded.get("sha256") not in (None, suite.sha256):
        raise WorkbenchError(f"--out {out} holds a run of suite {recorded.get('name')} "
                             f"({_described(recorded)}); resume it with the same --suite, --suite-seed, --quick and "
                             f"--model options, or give a new --out")


def _described(suite_json: dict[str, Any]) -> str:
    seed = suite_json.get("seed")
    mode = "quick" if suite_json.get("quick") else "full"
    given = suite_json.get("given") or {}
    return ", ".join([*([f"seed {seed}"] if seed is not None else []), mode,
                      *[f"--model {r}={s}" for r, specs in given.items() for s in specs]])


def check_run_folder(out: Path) -> None:
    """Refuse an `out` that exists but is not a reproduce run to resume: a file, or a folder of other things."""
    if not out.exists():
        return
    if not out.is_dir():
        raise WorkbenchError(f"--out {out} exists and is not a folder; give a new folder, or an earlier run's --out "
                             "to resume it")
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
    if others and not (out / RUN_FILE).is_file():
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise WorkbenchError(f"--out {out} holds {shown} but no {RUN_FILE}: it is not a `workbench reproduce` run, "
                             "and nothing in it is written over; give a new folder, or an earlier run's --out to "
                             "resume it")


def run_studies(
    studies: Sequence[CaseStudy],
    out: str | Path,
    *,
    suite: Suite | None = None,
    device: str = "auto",
    progress: bool = True,
    threads: int | None = 1,
    dev_run: str | Path | None = None,
    workers: int = 1,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Reproduce each study into `out/<name>` on its role's models in `suite` (default: the dev suite),
    sharing loaded models, then `render(out)` (beside the dev run `dev_run`, when given: see `render`).

    `workers` > 1 runs each study's cases as Ray tasks on a local runtime of that many CPUs, or on
    the cluster at `ray_address` (`workbench.parallel`); the store and report are the same.

    Every model the studies need is loaded and checked (`workbench.suite.check_model`) before any
    study runs. Holds `out`'s lock throughout: another run (or `render`) on the same folder is
    refused at once.
    """
    from workbench.parallel import check_workers

    out = Path(out)
    check_workers(workers, ray_address)
    if threads is not None and threads < 1:
        raise WorkbenchError(f"threads={threads}: expected at least 1 (or None for torch's default)")
    suite = suite or dev_suite(quick=any(s.quick for s in studies))
    roles = suite_roles(studies, suite)
    check_run_folder(out)
    _check_same_suite(out, suite)
    if dev_run is not None:
        check_dev_run(dev_run, out)
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "workbench reproduce", _options(studies, suite, device, threads),
                     "wait for it or use another --out"):
        if workers == 1:
            return _run_studies(studies, out, suite=suite, roles=roles, device=device, progress=progress,
                                threads=threads, dev_run=dev_run)
        from workbench.parallel import ray_runtime

        with ray_runtime(workers, ray_address):
            return _run_studies(studies, out, suite=suite, roles=roles, device=device, progress=progress,
                                threads=threads, dev_run=dev_run, workers=workers)


def _run_studies(studies: Sequence[CaseStudy], out: Path, *, suite: Suite, roles: Sequence[str], device: str,
                 progress: bool, threads: int | None, dev_run: str | Path | None, workers: int = 1) -> dict[str, Any]:
    if threads is not None:
        torch.set_num_threads(int(threads))
    ctx = StudyContext(device=device, progress=progress, suite=suite, workers=workers, threads=threads)
    ctx.prepare(roles)
    for study in studies:
        study.suite = suite
    configs = {s.name: s.config() for s in studies}
    atomic_write_json(out / RUN_FILE, {"studies": [s.name for s in studies], "quick": [s.quick for s in studies],
                                         "seeds": [list(s.seeds) for s in studies], "device": device,
                                         "threads": threads, "workers": workers, "started": time.time(),
                                         "suite": suite.to_json(),
                                         "code_version": code_version(),
                                         "options_sha256": sha256_json({"suite": suite.options(), "studies": configs}),
                                         "dev_run": None if dev_run is None else str(Path(dev_run).resolve())})
    timings = {}
    for study in studies:
        t0 = time.perf_counter()
        log.info("study %s: starting", study.name)
        study.reproduce(out / study.name, ctx=ctx, progress=progress)
        timings[study.name] = round(time.perf_counter() - t0, 2)
        log.info("study %s: done in %.1f s", study.name, timings[study.name])
    summary = _render(out)
    summary["wall_seconds"] = timings
    return summary


def collect(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every study result stored under `run_dir`, in study-number order."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise WorkbenchError(f"{run_dir} is not a folder; give the --out folder of a `workbench reproduce` run")
    found = []
    for path in sorted(run_dir.glob(f"*/{RESULTS_FILE}")):
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as exc:
            raise WorkbenchError(f"{path} is not valid JSON ({exc}); rerun `workbench reproduce` with this --out "
                                 "to recompute it") from exc
    found.sort(key=lambda r: (r.get("number") or 99, r["study"]))
    return found


def check_dev_run(dev_run: str | Path, out: str | Path) -> Path:
    """The folder of a dev-suite run to compare a run with: it must hold study results of the dev suite."""
    dev = Path(dev_run)
    if not dev.is_dir() or not any(dev.glob(f"*/{RESULTS_FILE}")):
        raise WorkbenchError(f"--dev-run {dev}: no study results there; give the --out folder of a finished "
                             "`workbench reproduce` run on the dev suite (e.g. `workbench reproduce --quick --out DEV`)")
    if dev.resolve() == Path(out).resolve():
        raise WorkbenchError(f"--dev-run {dev} is the run folder itself; give the folder of a dev-suite run")
    name = (_read_run(dev).get("suite") or {}).get("name", "dev")
    if name != "dev":
        raise WorkbenchError(f"--dev-run {dev} holds a run of suite {name}; give a run of the dev suite")
    return dev


def render(run_dir: str | Path, *, dev_run: str | Path | None = None) -> dict[str, Any]:
    """Calibration, leaderboard, CSVs and report.html from the stored study results (under the folder's lock).

    With a dev run (`dev_run`, else the one the run recorded) results.json and the report also hold the
    dev-versus-held-out comparison (`workbench.generalization.compare`), and the report opens with it.
    """
    run_dir = Path(run_dir)
    if not any(run_dir.glob(f"*/{RESULTS_FILE}")):
        collect(run_dir)  # the clear error for a missing folder
        raise WorkbenchError(f"{run_dir} holds no study results (*/results.json); run `workbench reproduce --out {run_dir}`")
    if dev_run is not None:
        check_dev_run(dev_run, run_dir)
    with folder_lock(run_dir, "workbench report", "", "wait for it, then render again"):
        return _render(run_dir, dev_run=dev_run)


def _render(run_dir: Path, *, dev_run: str | Path | None = None) -> dict[str, Any]:
    from workbench import study_plots
    from workbench.calibration import calibration, leaderboard
    from workbench.report import (
        Section,
        Table,
        badge,
        calibration_sections,
        fmt,
        generalization_sections,
        leaderboard_sections,
        study_section,
        write_report,
    )

    run_dir = Path(run_dir)
    results = collect(run_dir)
    if not results:
        raise WorkbenchError(f"{run_dir} holds no study results (*/results.json); run `workbench reproduce --out {run_dir}`")
    calib = calibration(results)
    board = leaderboard(results)
    atomic_write_json(run_dir / "calibration.json", calib)
    atomic_write_json(run_dir / "leaderboard.json", board)
    atomic_write_text(run_dir / "predictions.csv", _csv(calib["predictions"]))
    atomic_write_text(run_dir / "leaderboard.csv", _csv(board["details"]))
    parts = []
    for r in results:
        path = run_dir / r["study"] / "metrics.csv"
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            parts.append(text if not parts else text.split("\n", 1)[1])
    atomic_write_text(run_dir / "metrics.csv", "".join(parts))
    run = _read_run(run_dir)
    dev_run = dev_run if dev_run is not None else run.get("dev_run")
    comparison = None
    if dev_run is not None:
        from workbench.generalization import compare

        comparison = compare(collect(check_dev_run(dev_run, run_dir)), results)
        atomic_write_json(run_dir / "comparison.json", {"dev_run": str(dev_run), **comparison})
    overview = {"studies": [{"study": r["study"], "number": r.get("number"), "verdict": r["verdict"],
                             "verdicts": {v["id"]: v["verdict"] for v in r["verdicts"]},
                             "models": [m.get("spec") for m in r.get("models") or []]} for r in results],
                "calibration": calib["overall"], "leaderboard": board["methods"],
                "suite": run.get("suite"), "code_version": run.get("code_version"),
                "options_sha256": run.get("options_sha256")}
    extra = {} if comparison is None else {"dev_run": str(dev_run), "dev_vs_heldout": comparison}
    atomic_write_json(run_dir / RESULTS_FILE, {**overview, **extra, "models": _models(results), "results": results})

    sections: list[Section] = []
    suite = run.get("suite") or {}
    if comparison is not None or suite.get("name") == "heldout":
        sections += generalization_sections(comparison, None if dev_run is None else str(dev_run))
    top = Section("Overview", anchor="overview")
    top.blocks.append(
        "Each study stated its predictions as data (metric, direction, size, verdict rule) and froze them, hashed, "
        "before any action ran; the action and its controls ran with the same code over several seeds; every "
        "number below carries a 95% bootstrap confidence interval, and every case is kept (see each study's "
        "distributions and case table).")
    if suite:
        top.blocks.append(f"Models: suite {suite.get('name')} ({_described(suite)}, options sha256 "
                          f"{str(suite.get('sha256'))[:12]}): "
                          + "; ".join(f"{role} {', '.join(specs)}" for role, specs in (suite.get("roles") or {}).items())
                          + f". {str(suite.get('variance', '')).capitalize()}.")
    rows = []
    for r in results:
        counts = {k: sum(v["verdict"] == k for v in r["verdicts"]) for k in ("held", "failed", "inconclusive")}
        rows.append([r.get("number") or "–", r["title"], badge(r["verdict"]), counts["held"], counts["failed"],
                     counts["inconclusive"], r["cases"]["n"], ", ".join(map(str, r["seeds"])),
                     "quick" if r.get("quick") else "full", fmt(r["timing"].get("sum_case_s"), 3)])
    top.blocks.append(Table(["#", "study", "verdict", "held", "failed", "inconclusive", "cases", "seeds", "mode",
                             "case seconds"], rows))
    sections.append(top)
    sections += calibration_sections(calib, study_plots.calibration_chart(calib["predictions"]))
    sections += leaderboard_sections(board, study_plots.leaderboard_chart(board["methods"]))
    for r in results:
        sections += study_section(r, run_dir / r["study"])
    files = Section("Files", anchor="files")
    files.blocks.append("results.json (everything), calibration.json, leaderboard.json, predictions.csv, metrics.csv, "
                        "leaderboard.csv; per study: prediction.json (+ prediction.sha256), config.json, cases/*.json, "
                        "results.json, metrics.csv, cases.csv, fig_*.png. Re-render with "
                        "<span class='mono'>workbench report RUN_DIR</span>.")
    sections.append(files)
    env = results[0].get("environment", {})
    modes = sorted({"quick" if r.get("quick") else "full" for r in results})
    write_report(run_dir / "report.html", "Interpretability workbench: case studies", sections, nav=True,
                 subtitle=f"{len(results)} studies ({'/'.join(modes)} mode); torch {env.get('torch')}, "
                          f"python {env.get('python')}, {env.get('threads')} thread(s); rendered "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    return {"out": str(run_dir), "report": str(run_dir / "report.html"), "suite": overview["suite"],
            "dev_vs_heldout": None if comparison is None else
            {"overall": comparison["overall"], "leaderboard": comparison["leaderboard"]},
            "studies": overview["studies"], "calibration": calib["overall"],
            "leaderboard": [{k: m[k] for k in ("method", "n", "win_rate", "win_rate_ci", "rank")} for m in board["methods"]]}


def _read_run(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _models(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every model any study ran on (as the studies recorded it), with the studies that used it."""
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        for m in r.get("models") or []:
            entry = out.setdefault(str(m.get("spec")), {**m, "studies": []})
            entry["studies"].append(r["study"])
    return list(out.values())


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    from workbench.casestudy import rows_csv

    if not rows:
        return ""
    return rows_csv(rows)


__all__ = ["check_dev_run", "collect", "folder_lock", "render", "run_studies", "suite_roles"]
