"""`workbench tune`: search an editor's options with optuna toward a stated objective.

The objective is stated as data before the search (`Objective`): a metric to maximize and
constraints, e.g. "maximize S subject to NS loss <= 2 points". Each trial fits the editor
with the sampled options on the same rewrites (one at a time, or one batch for MEMIT) and
scores them with the CounterFact metrics; constraint values go to optuna's constrained
TPE sampler, and the best *feasible* trial is reported. Trials live in optuna's own
storage: SQLite in the run folder by default, or any optuna storage URL (PostgreSQL), so
that several worker processes or machines share one study; optuna assigns trial numbers
in the database, so every trial is recorded exactly once.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from workbench.errors import WorkbenchError
from workbench.storage import atomic_write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Constraint:
    metric: str
    op: Literal["<=", ">="]
    bound: float

    def violation(self, metrics: Mapping[str, float]) -> float:
        """<= 0 when satisfied (optuna's convention)."""
        v = float(metrics[self.metric])
        return v - self.bound if self.op == "<=" else self.bound - v

    def text(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: Literal["maximize", "minimize"] = "maximize"
    constraints: tuple[Constraint, ...] = ()

    def text(self) -> str:
        s = f"{self.direction} {self.metric}"
        return s + (" subject to " + ", ".join(c.text() for c in self.constraints) if self.constraints else "")


Space = Callable[[Any, int], dict[str, Any]]  # (optuna trial, n_layers) -> editor options


@dataclass(frozen=True)
class Tunable:
    """What `tune` can search: an editor on a zoo model's rewrites, its option space."""

    name: str
    editor: str
    space: Space
    model: str = "zoo:factgpt"
    batch: bool = False
    fixed: dict[str, Any] = field(default_factory=dict)


def _rome_space(trial: Any, n_layers: int) -> dict[str, Any]:
    return {"layer": trial.suggest_int("layer", 0, n_layers - 1),
            "fact_token": trial.suggest_categorical("fact_token", ["subject_last", "prompt_last"]),
            "v_lr": trial.suggest_float("v_lr", 0.05, 2.0, log=True),
            "v_steps": trial.suggest_int("v_steps", 5, 40),
            "kl_factor": trial.suggest_float("kl_factor", 0.01, 1.0, log=True),
            "clamp_norm_factor": trial.suggest_float("clamp_norm_factor", 0.5, 8.0, log=True),
            "n_prefixes": trial.suggest_categorical("n_prefixes", [0, 5, 10]),
            "mom2_adjustment": trial.suggest_categorical("mom2_adjustment", [True, False]),
            "on_degenerate": "clamp"}


def _memit_space(trial: Any, n_layers: int) -> dict[str, Any]:
    last = trial.suggest_int("last_layer", 0, n_layers - 1)
    width = trial.suggest_int("width", 1, n_layers)
    return {"layers": tuple(range(max(0, last - width + 1), last + 1)),
            "fact_token": trial.suggest_categorical("fact_token", ["subject_last", "prompt_last"]),
            "clamp_norm_factor": trial.suggest_float("clamp_norm_factor", 0.25, 4.0, log=True),
            "v_steps": trial.suggest_int("v_steps", 10, 40),
            "n_prefixes": trial.suggest_categorical("n_prefixes", [0, 5, 10])}


def _ft_space(trial: Any, n_layers: int) -> dict[str, Any]:
    return {"layer": trial.suggest_int("layer", 0, n_layers - 1),
            "lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True),
            "steps": trial.suggest_int("steps", 5, 50)}


def _ftl_space(trial: Any, n_layers: int) -> dict[str, Any]:
    return {**_ft_space(trial, n_layers), "epsilon": trial.suggest_float("epsilon", 1e-3, 0.5, log=True)}


def _kn_space(trial: Any, n_layers: int) -> dict[str, Any]:
    return {"mode": "replace",
            "strength": trial.suggest_float("strength", 0.1, 20.0, log=True),
            "threshold": trial.suggest_float("threshold", 0.05, 0.5),
            "max_neurons": trial.suggest_int("max_neurons", 1, 20),
            "steps": trial.suggest_categorical("steps", [5, 10, 20])}


TUNABLES: dict[str, Tunable] = {
    "rome": Tunable("rome", "rome", _rome_space),
    "memit": Tunable("memit", "memit", _memit_space, batch=True),
    "ft": Tunable("ft", "ft", _ft_space),
    "ft-l": Tunable("ft-l", "ft-l", _ftl_space),
    "kn": Tunable("kn", "kn", _kn_space),
}


def resolve_target(target: str) -> Tunable:
    """An editor name, or a study (name, number) whose action is tuned (`CaseStudy.tune_target`)."""
    if target in TUNABLES:
        return TUNABLES[target]
    import case_studies

    try:
        cls = case_studies.resolve(target)
    except WorkbenchError:
        cls = None
    if cls is not None and getattr(cls, "tune_target", None) in TUNABLES:
        return TUNABLES[cls.tune_target]
    raise WorkbenchError(f"cannot tune {target!r}: give an editor ({', '.join(TUNABLES)}) or a study with a tunable "
                         f"action ({', '.join(n for n in case_studies.available())})")


def objective_for(max_ns_loss: float) -> Objective:
    return Objective("S", "maximize", (Constraint("NS_loss", "<=", float(max_ns_loss)),))


def evaluate_options(handle: Any, tunable: Tunable, options: Mapping[str, Any], rewrites: Sequence[Any],
                     baseline: Mapping[str, Any]) -> dict[str, float]:
    """Fit with `options`, score; S, ES, PS, NS (percent) and NS_loss against the unedited model."""
    import editors  # noqa: F401
    from editors.registry import get
    from workbench.counterfact import aggregate_cases
    from workbench.edit_eval import edit_batch, edit_each

    try:
        editor = get(tunable.editor)(**{**tunable.fixed, **options})
    except (WorkbenchError, TypeError) as exc:
        raise WorkbenchError(f"invalid options for {tunable.editor}: {exc}") from exc
    if tunable.batch:
        rows, _ = edit_batch(handle, editor, rewrites)
    else:
        rows = edit_each(handle, editor, rewrites)
    agg = aggregate_cases(rows)
    out = {k: float(agg[k] or 0.0) for k in ("S", "ES", "PS", "NS")}
    out["NS_loss"] = float(baseline["NS"] or 0.0) - out["NS"]
    out["refused"] = float(sum(bool(r.get("refused")) for r in rows))
    return out


def _storage(url: str) -> Any:
    """An optuna RDB storage; retried, because two workers creating the schema at once can collide."""
    import optuna

    last: Exception | None = None
    for attempt in range(8):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=None)
        except Exception as exc:  # sqlalchemy errors while the other worker creates tables
            last = exc
            time.sleep(0.25 * (attempt + 1))
    raise WorkbenchError(f"cannot open optuna storage {_display(url)}: {last}")


def _display(url: str) -> str:
    """The URL without a password."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}" if ":" in cred else url
    return url


def _create_study(storage: Any, name: str, sampler: Any, direction: str) -> Any:
    import optuna

    last: Exception | None = None
    for attempt in range(8):
        try:
            return optuna.create_study(storage=storage, study_name=name, sampler=sampler, direction=direction,
                                       load_if_exists=True)
        except Exception as exc:  # a concurrent worker created it between the check and the insert
            last = exc
            time.sleep(0.25 * (attempt + 1))
    raise WorkbenchError(f"cannot create or load optuna study {name!r}: {last}")


def tune(
    target: str,
    *,
    n_trials: int = 20,
    n_cases: int = 10,
    storage: str | None = None,
    study_name: str | None = None,
    out: Path | None = None,
    seed: int = 0,
    worker: int = 0,
    max_ns_loss: float = 2.0,
    device: str = "auto",
    timeout: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run `n_trials` trials of this worker on a (possibly shared) optuna study; return a summary."""
    import optuna

    from workbench.edit_eval import rewrites_for, unedited
    from workbench.counterfact import aggregate_cases
    from workbench.models import load

    tunable = resolve_target(target)
    if n_cases < 1:
        raise WorkbenchError(f"--cases {n_cases}: expected at least 1 rewrite per trial")
    out = Path(out) if out is not None else Path(f"runs/tune-{tunable.name}")
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / 'optuna.db').resolve()}"
    objective = objective_for(max_ns_loss)
    name = study_name or f"{tunable.name}-S-ns{max_ns_loss:g}-n{n_cases}-seed{seed}"
    handle = load(tunable.model, device=device, progress=progress)
    rewrites = rewrites_for(handle, n_cases, seed=500 + seed)
    baseline = aggregate_cases(unedited(handle, rewrites))
    n_layers = handle.arch.n_layers

    def constraints(trial: Any) -> Sequence[float]:
        return trial.user_attrs.get("constraints", [1.0])

    # optuna >= 5 records constraints per trial (set_constraint); older versions take constraints_func.
    modern = hasattr(optuna.trial.Trial, "set_constraint")
    sampler = optuna.samplers.TPESampler(seed=seed + 1000 * worker,
                                         **({} if modern else {"constraints_func": constraints}))
    if not progress:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _create_study(_storage(url), name, sampler, objective.direction)
    study.set_user_attr("objective", objective.text())
    study.set_user_attr("target", tunable.name)
    mine: list[int] = []
    ident = {"host": socket.gethostname(), "pid": os.getpid(), "worker": worker}

    def set_constraints(trial: Any, values: Sequence[float]) -> None:
        trial.set_user_attr("constraints", list(values))
        if modern:
            for c, v in zip(objective.constraints, values):
                trial.set_constraint(c.metric, v)

    def run(trial: Any) -> float:
        options = tunable.space(trial, n_layers)
        trial.set_user_attr("worker", ident)
        mine.append(trial.number)
        try:
            metrics = evaluate_options(handle, tunable, options, rewrites, baseline)
        except WorkbenchError as exc:
            trial.set_user_attr("error", str(exc)[:300])
            set_constraints(trial, [1e6] * len(objective.constraints))
            return -1e6 if objective.direction == "maximize" else 1e6
        trial.set_user_attr("metrics", metrics)
        set_constraints(trial, [c.violation(metrics) for c in objective.constraints])
        return metrics[objective.metric]

    t0 = time.perf_counter()
    study.optimize(run, n_trials=n_trials, timeout=timeout, show_progress_bar=False)
    seconds = time.perf_counter() - t0
    trials = study.get_trials(deepcopy=False)
    feasible = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE
                and all(v <= 0 for v in t.user_attrs.get("constraints", [1.0]))]
    best = None
    if feasible:
        pick = max if objective.direction == "maximize" else min
        b = pick(feasible, key=lambda t: t.value)
        best = {"number": b.number, "value": b.value, "params": b.params, "metrics": b.user_attrs.get("metrics")}
    result = {
        "target": tunable.name, "editor": tunable.editor, "model": tunable.model, "study_name": name,
        "storage_display": _display(url), "objective": objective.text(), "n_cases": n_cases,
        "unedited": {k: baseline[k] for k in ("S", "ES", "PS", "NS")},
        "worker": ident, "worker_trials": mine, "worker_seconds": round(seconds, 2),
        "n_trials_total": len(trials),
        "n_complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials),
        "n_feasible": len(feasible), "best": best,
    }
    atomic_write_json(out / f"tune-worker{worker}-{os.getpid()}.json", result)
    return result
