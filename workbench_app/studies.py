"""The Studies page: browse stored `workbench reproduce` runs and start a study as a background job.

A run folder is any folder inside the workspace that holds `run.json` (what `workbench
reproduce` writes first); the app starts its own under `WORKSPACE/runs/`. Browsing reads only
stored files (each study's `prediction.json`, `results.json` and `cases/`), so a run that was
cancelled or cut off shows its predictions as `pending` beside the finished ones.

A study job runs `workbench.reproduce.run_studies` on one study, exactly as `workbench
reproduce NAME --quick --out runs/...` does, holding the run folder's lock; before each case
it reports progress and stops there when cancel was asked (the cases finished so far stay
stored, so starting the same study into the same folder resumes it). Studies are named as on
the command line (name or number); `module:Class` studies only when the server offers them
(`workbench serve --study module:Class`), since naming one imports code.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from workbench.errors import UnknownModelError, WorkbenchError
from workbench_app.jobs import JobContext
from workbench_app.security import inside, relative_to_workspace
from workbench_app.workspace import STACKS, read_json

STUDY_JOBS = "studies"  # the JobRunner key of study jobs: one study job per workspace at a time
RUNS = "runs"
RUN_FILE = "run.json"
RESULTS_FILE = "results.json"
VERDICTS = ("held", "failed", "inconclusive", "pending")
FILTERS = ("verdict", "method", "source", "basis", "study")
FILE_TYPES = {".png": "image/png", ".html": "text/html; charset=utf-8", ".csv": "text/csv; charset=utf-8",
              ".json": "application/json"}
MAX_SEEDS = 20
MAX_DEPTH = 3


# --- which studies ---------------------------------------------------------------------------

def catalogue(offered: Sequence[str]) -> list[dict[str, Any]]:
    """The numbered studies and the server's extra `module:Class` ones, with the role of models each needs."""
    import case_studies

    rows = []
    for number, name, title in case_studies.STUDIES:
        rows.append({"name": name, "number": number, "title": title, "world": _world(name)})
    for spec in offered:
        cls = case_studies.resolve(spec)
        rows.append({"name": spec, "number": None, "title": cls.title or cls.name, "world": cls.world})
    return rows


def _world(name: str) -> str | None:
    import case_studies

    try:
        return case_studies.resolve(name).world
    except (WorkbenchError, ImportError):
        return None


def make_study(name: Any, offered: Sequence[str], *, quick: bool, seeds: int | None) -> Any:
    """The study object for a name or number (the CLI's message for an unknown one: 404)."""
    import case_studies

    if not isinstance(name, str) or not name.strip():
        raise WorkbenchError("study is missing: give a study name or number, e.g. \"knowledge_neurons\" or \"4\"")
    name = name.strip()
    if ":" in name and name not in offered:
        extra = f" (offered: {', '.join(offered)})" if offered else ""
        raise WorkbenchError(f"study {name!r} is not offered by this server{extra}; start it with `workbench serve "
                             f"--study {name}` to run your own CaseStudy class")
    try:
        return case_studies.make(name, quick=quick, seeds=seeds)
    except WorkbenchError as exc:
        if ":" not in name and str(exc).startswith("unknown study"):
            raise UnknownModelError(str(exc)) from None
        raise


def study_request(root: Path, body: Mapping[str, Any], offered: Sequence[str]) -> tuple[Any, Path, dict[str, Any]]:
    """The checked request of a study job: the study, its run folder (new or one to resume), the options."""
    from workbench.reproduce import check_run_folder

    quick = body.get("quick", True)
    if not isinstance(quick, bool):
        raise WorkbenchError(f"quick {quick!r}: expected true or false")
    seeds = body.get("seeds")
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= MAX_SEEDS):
        raise WorkbenchError(f"seeds {seeds!r}: expected an integer 1..{MAX_SEEDS} (or leave it out for the study's own)")
    study = make_study(body.get("study"), offered, quick=quick, seeds=seeds)
    out_text = body.get("out")
    if out_text is None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        out_text = f"{RUNS}/{stamp}-{study.name.replace(':', '-').replace('.', '-')}{'-quick' if quick else ''}"
    if not isinstance(out_text, str):
        raise WorkbenchError("out must be text: a folder inside the workspace, e.g. runs/my-run")
    out = inside(root, out_text, what="run folder")
    if out == root.resolve() or out.parts[len(root.resolve().parts)] in ("jobs", STACKS) or out.name.startswith("."):
        raise WorkbenchError(f"run folder {out_text!r} is one the app keeps for itself; give a folder like runs/my-run")
    check_run_folder(out)
    options = {"study": study.name, "quick": quick, "seeds": list(study.seeds), "out": relative_to_workspace(root, out)}
    return study, out, options


# --- running one -------------------------------------------------------------------------------

def run_study(study: Any, out: Path, root: Path, ctx: JobContext, *, device: str) -> dict[str, Any]:
    """`run_studies([study], out)` with progress before each case and cancellation between cases."""
    import torch

    from workbench.reproduce import run_studies

    totals: dict[str, int] = {}
    done = [0]
    before = _count_cases(out / study.name)  # cases a cut-off run of this folder already stored
    case_keys, run_case = study.case_keys, study.run_case

    def counted_keys(state: Any, seed: int) -> list[str]:
        keys = case_keys(state, seed)
        totals[f"{id(state)}:{seed}"] = len(keys)
        return keys

    def reported_case(state: Any, seed: int, key: str) -> dict[str, Any]:
        total = max(1, sum(totals.values()))
        n = min(before + done[0], total)
        ctx.progress(0.05 + 0.9 * n / total, f"{study.name}: case {n + 1} of {total} (seed {seed}, {key})")
        record = run_case(state, seed, key)
        done[0] += 1
        return record

    study.case_keys, study.run_case = counted_keys, reported_case  # instance attributes: only this job's study
    ctx.progress(0.0, f"{study.name}: loading and checking models")
    summary = run_studies([study], out, device=device, progress=False, threads=torch.get_num_threads())
    rel = relative_to_workspace(root, out)
    verdicts = summary["studies"][0]["verdicts"] if summary.get("studies") else {}
    counts = Counter(verdicts.values())
    return {"out": rel, "study": study.name, "cases_run": done[0], "studies": summary.get("studies"),
            "calibration": summary.get("calibration"), "wall_seconds": summary.get("wall_seconds"),
            "message": f"{study.name}: " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items())) + f" (run {rel})"}


# --- browsing ----------------------------------------------------------------------------------

def find_runs(root: Path) -> list[Path]:
    """Run folders (holding run.json) inside the workspace, a few levels deep, newest first."""
    root = root.resolve()
    found: list[Path] = []

    def walk(d: Path, level: int) -> None:
        if (d / RUN_FILE).is_file():
            found.append(d)
            return
        if level >= MAX_DEPTH or len(found) >= 500:
            return
        for child in sorted(d.iterdir()):
            if child.is_dir() and not child.is_symlink() and not child.name.startswith(".") and \
                    not (level == 0 and child.name in ("jobs", STACKS)):
                walk(child, level + 1)

    walk(root, 0)
    return sorted(found, key=lambda p: _mtime(p / RUN_FILE), reverse=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def run_folder(root: Path, path: Any) -> Path:
    """A run folder named by its workspace-relative path (no way out of the workspace)."""
    if not isinstance(path, str):
        raise WorkbenchError("path is missing: give a run folder inside the workspace, e.g. runs/my-run")
    folder = inside(root, path, what="run folder")
    if not (folder / RUN_FILE).is_file():
        raise UnknownModelError(f"no run at {path!r} inside the workspace (a run folder holds {RUN_FILE}); "
                                "GET /api/runs lists them")
    return folder


def _study_dirs(folder: Path, run: Mapping[str, Any]) -> list[tuple[str, Path]]:
    names = [n for n in run.get("studies") or [] if isinstance(n, str)]
    for d in sorted(folder.iterdir()):
        if d.is_dir() and (d / "prediction.json").is_file() and d.name not in names:
            names.append(d.name)
    out = []
    for n in names:
        d = folder / n
        if n and "/" not in n and "\\" not in n and n not in (".", "..") and d.is_dir():
            out.append((n, d))
    return out


def _count_cases(d: Path) -> int:
    cases = d / "cases"
    return sum(1 for p in cases.iterdir() if p.suffix == ".json" and not p.name.startswith(".")) if cases.is_dir() else 0


def _study_view(name: str, d: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One study of a run: what it is and its predictions with verdicts (pending until it finished)."""
    results = read_json(d / RESULTS_FILE, None)
    registration = read_json(d / "prediction.json", None) or {}
    config = read_json(d / "config.json", None) or {}
    if isinstance(results, dict):
        verdicts = results.get("verdicts") or []
        preds = [{**v, "study": name} for v in verdicts]
        view = {"study": name, "number": results.get("number"), "title": results.get("title"),
                "hypothesis": results.get("hypothesis"), "verdict": results.get("verdict"), "status": "done",
                "cases": (results.get("cases") or {}).get("n"), "quick": results.get("quick"),
                "seeds": results.get("seeds"), "prediction_sha256": results.get("prediction_sha256"),
                "models": [m.get("spec") for m in results.get("models") or [] if isinstance(m, dict)],
                "figures": [f for f in results.get("figures") or [] if isinstance(f, dict)],
                "controls": results.get("controls") or [], "timing": results.get("timing") or {}}
    else:
        preds = [{"id": p.get("id"), "claim": p.get("claim"), "metric": p.get("metric"),
                  "direction": p.get("direction"), "size": p.get("size"), "rule": (p.get("rule") or {}).get("text"),
                  "method": p.get("method"), "source": p.get("source", ""), "basis": p.get("basis"),
                  "primary": bool(p.get("primary", True)), "measured": None, "ci": [None, None],
                  "verdict": "pending", "why": "the study has not finished", "study": name}
                 for p in registration.get("predictions") or [] if isinstance(p, dict)]
        view = {"study": name, "number": None, "title": registration.get("title"),
                "hypothesis": registration.get("hypothesis"), "verdict": "pending", "status": "incomplete",
                "cases": _count_cases(d), "quick": config.get("quick"), "seeds": config.get("seeds"),
                "prediction_sha256": None, "models": config.get("models") or [], "figures": [],
                "controls": registration.get("controls") or [], "timing": {}}
    counts = Counter(p["verdict"] for p in preds)
    view["counts"] = {v: counts.get(v, 0) for v in VERDICTS}
    return view, preds


def run_summary(root: Path, folder: Path) -> dict[str, Any]:
    """One line of the runs list: studies, mode, when, whether finished, verdict counts."""
    run = read_json(folder / RUN_FILE, None) or {}
    studies, counts = [], Counter()
    for name, d in _study_dirs(folder, run):
        view, preds = _study_view(name, d)
        studies.append({"study": name, "verdict": view["verdict"], "status": view["status"], "cases": view["cases"]})
        counts.update(p["verdict"] for p in preds)
    suite = run.get("suite") or {}
    return {"path": relative_to_workspace(root, folder), "studies": studies,
            "quick": any(run.get("quick") or []), "started": run.get("started"), "suite": suite.get("name"),
            "complete": bool(studies) and all(s["status"] == "done" for s in studies),
            "report": (folder / "report.html").is_file(), "counts": {v: counts.get(v, 0) for v in VERDICTS}}


def list_runs(root: Path) -> list[dict[str, Any]]:
    return [run_summary(root, f) for f in find_runs(root)]


def check_filters(query: Mapping[str, Any]) -> dict[str, str]:
    """The filters of a run's predictions (exact values; `verdict` one of VERDICTS)."""
    out = {}
    for k in FILTERS:
        v = query.get(k)
        if v is None or v == "":
            continue
        if len(v) > 200:
            raise WorkbenchError(f"{k} filter is {len(v)} characters; the limit is 200")
        if k == "verdict" and v not in VERDICTS:
            raise WorkbenchError(f"verdict {v!r}: expected one of {', '.join(VERDICTS)}")
        out[k] = v
    return out


def view_run(root: Path, folder: Path, filters: Mapping[str, str]) -> dict[str, Any]:
    """A run as the Studies page shows it: its studies, and every prediction with its verdict (filtered)."""
    run = read_json(folder / RUN_FILE, None) or {}
    studies, preds = [], []
    for name, d in _study_dirs(folder, run):
        view, p = _study_view(name, d)
        studies.append(view)
        preds += p
    facets = {k: dict(Counter("" if p.get(k) is None else str(p.get(k)) for p in preds).most_common())
              for k in FILTERS}
    shown = [p for p in preds if all(("" if p.get(k) is None else str(p.get(k))) == v for k, v in filters.items())]
    top = read_json(folder / RESULTS_FILE, None)
    top = top if isinstance(top, dict) else {}
    suite = run.get("suite") or {}
    return {"path": relative_to_workspace(root, folder),
            "run": {"studies": run.get("studies"), "quick": run.get("quick"), "seeds": run.get("seeds"),
                    "device": run.get("device"), "threads": run.get("threads"), "started": run.get("started"),
                    "suite": {"name": suite.get("name"), "roles": suite.get("roles"), "quick": suite.get("quick")},
                    "code_version": run.get("code_version"), "options_sha256": run.get("options_sha256")},
            "complete": bool(studies) and all(s["status"] == "done" for s in studies),
            "report": "report.html" if (folder / "report.html").is_file() else None,
            "calibration": top.get("calibration"), "leaderboard": top.get("leaderboard"),
            "studies": studies, "filters": dict(filters), "facets": facets,
            "n_predictions": len(preds), "predictions": shown}


def run_file(root: Path, folder: Path, name: Any) -> tuple[Path, str]:
    """A file a run wrote (report, figure, CSV, JSON) inside that run folder, with its media type."""
    if not isinstance(name, str):
        raise WorkbenchError("name is missing: give a file of the run, e.g. report.html")
    if ".." in name.replace("\\", "/").split("/") or name.startswith(("/", "~")):
        raise WorkbenchError(f"file {name!r} must be a relative path inside the run folder, without '..'")
    path = inside(folder, name, what="file")
    media = FILE_TYPES.get(path.suffix.lower())
    if media is None:
        raise WorkbenchError(f"file {name!r}: the app serves a run's {', '.join(FILE_TYPES)} files only")
    if not path.is_file():
        raise UnknownModelError(f"no file {name!r} in the run {relative_to_workspace(root, folder)}")
    return path, media
