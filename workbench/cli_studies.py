"""`workbench reproduce`, `workbench report`, `workbench tune`.

    workbench reproduce --quick --out runs/today          # every study that exists, reduced size
    workbench reproduce 1 4 --seeds 3 --out runs/kn       # by number or name
    workbench report runs/today                           # re-render report.html from stored results
    workbench tune rome --trials 30 --out runs/tune-rome  # optuna, SQLite in the run folder
    workbench tune rome --storage postgresql://user@host/db --study-name shared   # several workers
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError


def _reproduce(args: argparse.Namespace) -> None:
    import case_studies
    from workbench.reproduce import run_studies

    names = args.studies or case_studies.available()
    if args.seeds is not None and args.seeds < 1:
        raise WorkbenchError(f"--seeds {args.seeds}: expected at least 1")
    if args.threads is not None and args.threads < 1:
        raise WorkbenchError(f"--threads {args.threads}: expected at least 1")
    studies = [case_studies.make(n, quick=args.quick, seeds=args.seeds) for n in names]
    seen = [s.name for s in studies]
    if len(set(seen)) != len(seen):
        raise WorkbenchError(f"a study is named twice: {seen}")
    out = Path(args.out or ("runs/reproduce-quick" if args.quick else "runs/reproduce"))
    result = run_studies(studies, out, device=args.device, progress=not args.json, threads=args.threads)
    args.emit(args, result, summary_text)


def _report(args: argparse.Namespace) -> None:
    from workbench.reproduce import render

    result = render(Path(args.run_dir))
    args.emit(args, result, summary_text)


def summary_text(r: dict[str, Any]) -> str:
    lines = [f"report: {r['report']}"]
    for s in r["studies"]:
        marks = ", ".join(f"{k} {v}" for k, v in s["verdicts"].items())
        lines.append(f"  {s['number'] or '-':>2} {s['study']:<22} {s['verdict'].upper():<13} ({marks})")
    c = r["calibration"]
    lines.append(f"calibration: {c['counts']['held']}/{c['n_predictions']} predictions held, "
                 f"{c['counts']['failed']} failed, {c['counts']['inconclusive']} inconclusive")
    for m in r["leaderboard"]:
        if m["n"]:
            lo, hi = m["win_rate_ci"]
            ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None else ""
            lines.append(f"  method {m['method']:<24} beat its control in {m['win_rate']:.2f}{ci} of {m['n']} cases")
    if r.get("not_run"):
        lines.append(f"not run: {', '.join(r['not_run'])}")
    return "\n".join(lines)


def _tune(args: argparse.Namespace) -> None:
    from workbench.tuning import tune

    if args.trials < 1:
        raise WorkbenchError(f"--trials {args.trials}: expected at least 1")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    result = tune(args.target, n_trials=args.trials, n_cases=args.cases, storage=args.storage,
                  study_name=args.study_name, out=Path(args.out) if args.out else None, seed=args.seed,
                  worker=args.worker, max_ns_loss=args.max_ns_loss, device=args.device, timeout=args.timeout,
                  progress=not args.json)

    def text(r: dict[str, Any]) -> str:
        lines = [f"study {r['study_name']} in {r['storage_display']}: {r['n_trials_total']} trials in all, "
                 f"{len(r['worker_trials'])} by this worker",
                 f"objective: {r['objective']}"]
        b = r.get("best")
        if b:
            lines.append(f"best feasible: trial {b['number']} value {b['value']:.4g} params {b['params']}")
        else:
            lines.append("no feasible trial yet")
        return "\n".join(lines)

    args.emit(args, result, text)


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None], emit: Callable[..., None]) -> None:
    p = sub.add_parser("reproduce", help="run case studies (prediction frozen first), write results and a report")
    p.add_argument("studies", nargs="*", help="study names or numbers (default: every study that exists); "
                                              "module:Class for your own CaseStudy")
    p.add_argument("--quick", action="store_true", help="reduced sizes (all studies in a few minutes)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per study (default: the study's, usually 5)")
    p.add_argument("--out", default=None, help="run folder (default runs/reproduce[-quick]); rerun to resume")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: small models, shared CPUs)")
    common(p)
    p.set_defaults(func=_reproduce, emit=emit)

    p = sub.add_parser("report", help="re-render a reproduce run's report.html from its stored results")
    p.add_argument("run_dir", help="the --out folder of `workbench reproduce`")
    common(p)
    p.set_defaults(func=_report, emit=emit)

    p = sub.add_parser("tune", help="search an editor's options with optuna toward a stated objective")
    p.add_argument("target", help="editor (rome, memit, ft, ft-l, kn) or a study whose action it tunes")
    p.add_argument("--trials", type=int, default=20, help="trials this worker runs")
    p.add_argument("--cases", type=int, default=10, help="rewrites each trial is scored on")
    p.add_argument("--storage", default=None,
                   help="optuna storage URL (default: sqlite:///OUT/optuna.db); postgresql://... lets workers share")
    p.add_argument("--study-name", default=None, help="optuna study name (default: TARGET-S-ns2)")
    p.add_argument("--out", default=None, help="run folder (default runs/tune-TARGET): optuna.db, tune.json")
    p.add_argument("--max-ns-loss", type=float, default=2.0, help="constraint: NS may drop at most this many points")
    p.add_argument("--seed", type=int, default=0, help="seed of the rewrites and the sampler")
    p.add_argument("--worker", type=int, default=0, help="worker index (offsets the sampler seed)")
    p.add_argument("--timeout", type=float, default=None, help="stop this worker after this many seconds")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    common(p)
    p.set_defaults(func=_tune, emit=emit)
