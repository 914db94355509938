"""`workbench reproduce`, `workbench report`, `workbench tune`.

    workbench reproduce --quick --out runs/today          # every study that exists, reduced size
    workbench reproduce 1 4 --seeds 3 --out runs/kn       # by number or name
    workbench reproduce --suite heldout --suite-seed 7 --quick --dev-run runs/today --out runs/heldout-7
                                                          # on models nobody tuned on, beside the dev run
    workbench reproduce 5 --model shapesnet=./my-shapesnet --out runs/mine            # on your own model
    workbench reproduce --quick --workers 2 --out runs/today  # cases as Ray tasks (--ray-address joins a cluster)
    workbench report runs/today                           # re-render report.html from stored results
    workbench tune rome --trials 30 --out runs/tune-rome  # optuna, SQLite in the run folder
    workbench tune rome --storage postgresql://user@host/db --study-name shared   # several workers
    workbench tune rome --storage postgresql://user@host/db --workers 4            # ... as Ray tasks
    workbench tune ablate --set trojan=style-star --constraint 'clean_drop<=0.5' --fix value=mean
    workbench tune copy_paste --range featvis_steps=16:128   # a study resolves to its tunable action
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.suite import SUITES
from workbench_cli.checks import creatable, finite_float, int_in, positive_int, seed_int, threads

MAX_SEEDS = 1000
MAX_WORKER = 100_000  # the sampler's seed is seed + 1000 x worker
MAX_WORKERS = 1024  # workbench.parallel.MAX_WORKERS


def _reproduce(args: argparse.Namespace) -> None:
    import case_studies
    from workbench.reproduce import run_studies, suite_roles
    from workbench.suite import make_suite

    suite = make_suite(args.suite, seed=args.suite_seed, quick=args.quick, models=model_options(args.model))
    names = args.studies or case_studies.available()
    out = creatable(args.out or ("runs/reproduce-quick" if args.quick else "runs/reproduce"), "--out")
    studies = [case_studies.make(n, quick=args.quick, seeds=args.seeds) for n in names]
    seen = [s.name for s in studies]
    if len(set(seen)) != len(seen):
        raise WorkbenchError(f"a study is named twice: {seen}")
    roles = suite_roles(studies, suite)
    unused = [r for r in suite.given if r not in roles]
    if unused:
        raise WorkbenchError(f"--model {unused[0]}=...: none of the studies asked for runs on role {unused[0]!r}; "
                             f"they use {', '.join(roles) or 'no model'}")
    result = run_studies(studies, out, suite=suite, device=args.device, progress=not args.json, threads=args.threads,
                         dev_run=args.dev_run, workers=args.workers, ray_address=args.ray_address)
    args.emit(args, result, summary_text)


def _tune_on_ray(tunable: Any, args: argparse.Namespace, common: dict[str, Any],
                 announce: Callable[[str], None]) -> dict[str, Any]:
    """`--workers N`: N optuna workers as Ray tasks on one server-backed study, then one summary here."""
    from workbench.parallel import check_workers, map_on_ray, ray_runtime
    from workbench_protocols.tuning import tune

    check_workers(args.workers, args.ray_address)
    if args.storage is None or args.storage.startswith("sqlite"):
        raise WorkbenchError(f"--workers {args.workers} share one optuna study: give a database server with --storage "
                             "postgresql://user@host/db (SQLite does not take concurrent writers safely)")
    calls = [{"tunable": tunable, "n_trials": args.trials, "worker": args.worker + k, "timeout": args.timeout,
              "progress": False, "confirm": False, **common} for k in range(args.workers)]
    with ray_runtime(args.workers, args.ray_address):
        searched = map_on_ray(tune, calls, desc="tune workers", progress=not args.json)
    result = tune(tunable, n_trials=0, worker=args.worker, progress=not args.json, announce=announce,
                  confirm=not args.no_confirm, **common)
    result["ray_workers"] = [{"worker": r["worker"], "trials": r["worker_trials"], "seconds": r["worker_seconds"]}
                             for r in searched]
    return result


def model_options(items: list[str] | None) -> dict[str, list[str]]:
    """`--model ROLE=SPEC` flags as role -> specs (a role given twice runs on both models)."""
    out: dict[str, list[str]] = {}
    for item in items or []:
        role, sep, spec = item.partition("=")
        if not sep or not role.strip():
            raise WorkbenchError(f"--model {item!r}: expected ROLE=SPEC, e.g. --model factgpt=./my-factgpt")
        out.setdefault(role.strip(), []).append(spec.strip())
    return out


def _rate(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "  - "


def _report(args: argparse.Namespace) -> None:
    from workbench.reproduce import render

    result = render(Path(args.run_dir), dev_run=args.dev_run)
    args.emit(args, result, summary_text)


def summary_text(r: dict[str, Any]) -> str:
    lines = [f"report: {r['report']}"]
    suite = r.get("suite") or {}
    if suite:
        seed = f" seed {suite['seed']}" if suite.get("seed") is not None else ""
        lines.append(f"suite: {suite.get('name')}{seed}{' quick' if suite.get('quick') else ''} ("
                     + "; ".join(f"{role}: {len(specs)} model{'s' if len(specs) != 1 else ''}"
                                 for role, specs in (suite.get("roles") or {}).items()) + ")")
    compared = r.get("dev_vs_heldout")
    if compared:
        lines.append("held-out leaderboard (dev beside it):")
        for m in compared["leaderboard"]:
            lines.append(f"  {m['rank'] or '-':>2} {m['method']:<26} win rate {_rate(m['win_rate'])} on held-out, "
                         f"{_rate(m['dev_win_rate'])} on dev{'  LOSES ITS LEAD: ' + m['why'] if m['lost_lead'] else ''}")
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
    return "\n".join(lines)


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    """`KEY=VALUE` arguments (repeatable flags) as a dict; a clear error for anything else."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise WorkbenchError(f"{flag} {item!r}: expected NAME=VALUE")
        out[key.strip()] = value.strip()
    return out


def resolve_tune_target(target: str) -> Any:
    """A tunable's name, or a study (name, number) whose action is tuned (`CaseStudy.tune_target`)."""
    import case_studies
    from workbench_protocols.tunables import TUNABLES

    if target in TUNABLES:
        return TUNABLES[target]

    try:
        cls = case_studies.resolve(target)
    except WorkbenchError:
        cls = None
    if cls is not None and getattr(cls, "tune_target", None) in TUNABLES:
        return TUNABLES[cls.tune_target]
    studies = []
    for n in case_studies.available():
        try:
            t = getattr(case_studies.resolve(n), "tune_target", None)
        except WorkbenchError:
            t = None
        if t in TUNABLES:
            studies.append(f"{n} -> {t}")
    why = f"study {target!r} has no tunable action; " if cls is not None else ""
    raise WorkbenchError(f"cannot tune {target!r}: {why}give a tunable ({', '.join(TUNABLES)}) or a study with a "
                         f"tunable action ({', '.join(studies)})")


def _tune(args: argparse.Namespace) -> None:
    import sys

    from workbench_protocols.tuning import tune

    tunable = resolve_tune_target(args.target)
    out = creatable(args.out or f"runs/tune-{tunable.name}", "--out")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    ranges = {}
    for name, spec in _pairs(args.range, "--range").items():
        lo, sep, hi = spec.partition(":")
        if not sep:
            raise WorkbenchError(f"--range {name}={spec}: expected NAME=LOW:HIGH")
        ranges[name] = (lo, hi)

    def announce(text: str) -> None:  # the stated objective, before the search (stderr: stdout is the result)
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    common = dict(n_cases=args.cases, storage=args.storage, study_name=args.study_name, out=out, seed=args.seed,
                  max_ns_loss=args.max_ns_loss, settings=_pairs(args.set, "--set"), constraints=args.constraint or (),
                  fixed=_pairs(args.fix, "--fix"), ranges=ranges, device=args.device)
    if args.workers == 1:
        result = tune(tunable, n_trials=args.trials, worker=args.worker, timeout=args.timeout, progress=not args.json,
                      announce=announce, confirm=not args.no_confirm, **common)
    else:
        result = _tune_on_ray(tunable, args, common, announce)

    def text(r: dict[str, Any]) -> str:
        lines = [(f"study {r['study_name']} in {r['storage_display']}: {r['n_trials_total']} trials in all "
                  f"({r['n_complete']} complete, {r['n_failed']} failed), {len(r['worker_trials'])} by this worker"),
                 f"objective: {r['objective']}", f"baseline: {r['baseline']}"]
        b = r.get("best")
        if b:
            lines.append(f"best feasible: trial {b['number']} value {b['value']:.4g} options {b['options']}")
            lines.append("  metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in (b.get("metrics") or {}).items()))
            c = b.get("confirmation")
            if c:
                lines.append(f"confirmed on fresh data (seed {c['data_seed']}): value {c['value']:.4g}, constraints "
                             f"{'hold' if c['feasible'] else 'VIOLATED'}")
                lines.append("  metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in c["metrics"].items()))
        else:
            lines.append("no feasible trial yet")
        for f in r.get("failures", []):
            lines.append(f"failed trial {f['number']}: {f['error']}")
        return "\n".join(lines)

    args.emit(args, result, text)


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None], emit: Callable[..., None]) -> None:
    p = sub.add_parser("reproduce", help="run case studies (prediction frozen first), write results and a report")
    p.add_argument("studies", nargs="*", help="study names or numbers (default: every study that exists); "
                                              "module:Class for your own CaseStudy")
    p.add_argument("--quick", action="store_true", help="reduced sizes (all studies in a few minutes); with --suite "
                                                        "heldout also fewer models (one training of each)")
    p.add_argument("--suite", choices=SUITES, default="dev",
                   help="the models: dev (the zoo's, every default was chosen on them) or heldout (drawn from "
                        "--suite-seed, trained on demand; nothing was tuned on them)")
    p.add_argument("--suite-seed", type=seed_int, default=None, help="seed of the held-out suite (>= 1)")
    p.add_argument("--model", action="append", metavar="ROLE=SPEC",
                   help="run the studies of ROLE (factgpt, shapesnet, minilm) on your model instead of the suite's "
                        "(a zoo spec, minilm or a model folder); repeat a role for several models")
    p.add_argument("--seeds", type=int_in(1, MAX_SEEDS, "a number of seeds"), default=None,
                   help="seeds per study (default: the study's, usually 5)")
    p.add_argument("--out", default=None, help="run folder (default runs/reproduce[-quick]); rerun to resume")
    p.add_argument("--threads", type=threads, default=1,
                   help="torch CPU threads (default 1: small models, shared CPUs)")
    p.add_argument("--dev-run", default=None, metavar="DIR",
                   help="a finished dev-suite run of the same studies and mode: results and report set this run "
                        "beside it (held-out leaderboard first)")
    p.add_argument("--workers", type=int_in(1, MAX_WORKERS, "a number of workers"), default=1,
                   help="run cases as Ray tasks on this many workers (default 1: this process; needs ray)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join the Ray cluster at ADDR (e.g. ray://head:10001 or auto) instead of a local runtime")
    common(p)
    p.set_defaults(func=_reproduce, emit=emit)

    p = sub.add_parser("report", help="re-render a reproduce run's report.html from its stored results")
    p.add_argument("run_dir", help="the --out folder of `workbench reproduce`")
    p.add_argument("--dev-run", default=None, metavar="DIR",
                   help="a dev-suite run to compare with (default: the one the run recorded)")
    common(p)
    p.set_defaults(func=_report, emit=emit)

    p = sub.add_parser("tune", help="search an editor's or adversary's options with optuna toward a stated objective")
    p.add_argument("target", help="rome, memit, ft, ft-l, kn, adversarial-patch, copy-paste, ablate, or a study "
                                  "whose action it tunes (e.g. trojan_surgery, copy_paste)")
    p.add_argument("--trials", type=positive_int, default=20, help="trials this worker runs")
    p.add_argument("--cases", type=positive_int, default=None,
                   help="knowledge editors: rewrites each trial is scored on (10)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="an evaluation setting (e.g. target=star, trojan=style-star, n_heldout=64); repeatable")
    p.add_argument("--constraint", action="append", metavar="METRIC<=X",
                   help="replace or add a constraint of the stated objective (e.g. 'clean_drop<=0.5'); repeatable")
    p.add_argument("--fix", action="append", metavar="OPTION=VALUE",
                   help="pin an option inside its range instead of searching it; repeatable")
    p.add_argument("--range", action="append", metavar="OPTION=LOW:HIGH",
                   help="search an option on a sub-range of its declared range; repeatable")
    p.add_argument("--storage", default=None,
                   help="optuna storage URL (default: sqlite:///OUT/optuna.db); postgresql://... lets workers share")
    p.add_argument("--study-name", default=None, help="optuna study name (default: TARGET-HASH-seedN, the hash of the "
                                                      "statement: objective, settings, space)")
    p.add_argument("--out", default=None, help="run folder (default runs/tune-TARGET): optuna.db, tune-worker*.json")
    p.add_argument("--max-ns-loss", type=finite_float, default=None,
                   help="knowledge editors: NS may drop at most this many points (default 2; same as "
                        "--constraint 'NS_loss<=X')")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the evaluation data and the sampler")
    p.add_argument("--worker", type=int_in(0, MAX_WORKER, "a worker index"), default=0,
                   help="worker index (offsets the sampler seed)")
    p.add_argument("--timeout", type=finite_float, default=None, help="stop this worker after this many seconds")
    p.add_argument("--no-confirm", action="store_true",
                   help="skip re-evaluating the best trial on fresh data (seed + 5000) after the search")
    p.add_argument("--threads", type=threads, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--workers", type=int_in(1, MAX_WORKERS, "a number of workers"), default=1,
                   help="run this many optuna workers as Ray tasks (worker indices from --worker on) on the one "
                        "study in --storage (a PostgreSQL URL); then summarize and confirm here")
    p.add_argument("--ray-address", default=None, metavar="ADDR", help="join the Ray cluster at ADDR")
    common(p)
    p.set_defaults(func=_tune, emit=emit)
