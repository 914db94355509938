"""`workbench demo`: the main job on the built-in models, `workbench reproduce --quick` (the dev suite).

Trains (or loads from cache) the zoo models, then runs every case study that exists at
reduced size: each freezes its predictions (hashed) before acting, runs the action and its
controls over several seeds, and gets verdicts from the rules it stated. The result is
one self-contained `report.html` plus JSON/CSV of every number in `--out`. Rerunning with
the same `--out` resumes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench_cli.checks import creatable, int_in, threads
from workbench_cli.studies import MAX_SEEDS


def run_demo(out: Path, *, device: str = "auto", seeds: int | None = None, threads: int | None = 1,
             progress: bool = True) -> dict[str, Any]:
    """`reproduce --quick` of every available study into `out`; returns the run summary."""
    import case_studies
    from workbench.reproduce import run_studies
    from workbench.suite import dev_suite

    studies = [case_studies.make(name, quick=True, seeds=seeds) for name in case_studies.available()]
    return run_studies(studies, out, suite=dev_suite(quick=True), device=device, progress=progress, threads=threads)


def _cmd(args: argparse.Namespace) -> None:
    from workbench_cli.studies import summary_text

    result = run_demo(creatable(args.out, "--out"), device=args.device, seeds=args.seeds, threads=args.threads,
                      progress=not args.json)
    args.emit(args, result, summary_text)


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None], emit: Callable[..., None]) -> None:
    p = sub.add_parser("demo", help="run every case study in quick mode and write a report (= reproduce --quick)")
    p.add_argument("--out", default="demo-report", help="output folder (report.html, results.json, one folder per study)")
    p.add_argument("--seeds", type=int_in(1, MAX_SEEDS, "a number of seeds"), default=None,
                   help="seeds per study (default: each study's quick default)")
    p.add_argument("--threads", type=threads, default=1, help="torch CPU threads (default 1)")
    common(p)
    p.set_defaults(func=_cmd, emit=emit)
