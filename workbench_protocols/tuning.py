"""Search a method's options with optuna toward an objective stated before the search.

A `Tunable` says, as data, what a search means before it runs: its option space (`Param`:
name, range, scale), its stated objective (`TuningObjective`: a metric to maximize or
minimize subject to `Constraint`s, e.g. "maximize S subject to NS_loss <= 2"), the metrics
its evaluation returns, and its evaluation settings (which data, how much). Two steps run it:
`prepare` (data and baseline, once per worker, from the data seed) and `evaluate` (one
trial: build the method with the sampled options, run it, return a metrics dict). The
catalogue of tunables lives in `workbench_protocols.tunables`.

The statement (objective, space, fixed options, settings, data seed) is printed before the
search and stored with the study (optuna user attributes); a worker that joins an existing
study with a different statement is refused, so workers never mix objectives. Constraint
values go to optuna's constrained TPE sampler and the best *feasible* trial is reported.
Trials live in optuna's own storage: SQLite in the run folder by default, or any optuna
storage URL (PostgreSQL), so several worker processes or machines share one study; optuna
assigns trial numbers in the database, so every trial is recorded exactly once. A trial
whose options the method rejects is recorded as failed (with the reason), not scored. The
best feasible trial is then evaluated once more on fresh data (`confirm`): a search's best
value is optimistic, since it was picked on the search's own data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from workbench.errors import WorkbenchError, check_finite
from workbench.storage import atomic_write_json

log = logging.getLogger(__name__)

MAX_SETTING = 1_000_000  # evaluation settings are counts of cases, scenes or images: more is never a quick search


# --- the stated objective -------------------------------------------------------------------

@dataclass(frozen=True)
class Constraint:
    metric: str
    op: Literal["<=", ">="]
    bound: float

    def __post_init__(self) -> None:
        check_finite(f"constraint {self.metric} {self.op}", self.bound)

    def violation(self, metrics: Mapping[str, float]) -> float:
        """<= 0 when satisfied (optuna's convention)."""
        v = float(metrics[self.metric])
        return v - self.bound if self.op == "<=" else self.bound - v

    def text(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"

    @staticmethod
    def parse(text: str) -> Constraint:
        """`"NS_loss<=2"`, `"best_minus_noise >= 0.05"`."""
        m = re.fullmatch(r"\s*([A-Za-z_][\w.]*)\s*(<=|>=)\s*([-+0-9.eE]+)\s*", text)
        try:
            bound = float(m.group(3)) if m else math.nan
        except ValueError:
            bound = math.nan
        if m is None or not math.isfinite(bound):
            raise WorkbenchError(f"constraint {text!r}: expected METRIC<=NUMBER or METRIC>=NUMBER, e.g. 'NS_loss<=2'")
        return Constraint(m.group(1), m.group(2), bound)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TuningObjective:
    metric: str
    direction: Literal["maximize", "minimize"] = "maximize"
    constraints: tuple[Constraint, ...] = ()

    def text(self) -> str:
        s = f"{self.direction} {self.metric}"
        return s + (" subject to " + ", ".join(c.text() for c in self.constraints) if self.constraints else "")

    def with_constraints(self, extra: Sequence[Constraint]) -> TuningObjective:
        """Replace the constraint on each metric named in `extra` (or add it)."""
        named = {c.metric for c in extra}
        return replace(self, constraints=tuple(c for c in self.constraints if c.metric not in named) + tuple(extra))

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "direction": self.direction,
                "constraints": [{"metric": c.metric, "op": c.op, "bound": c.bound} for c in self.constraints],
                "text": self.text()}


def objective_for(max_ns_loss: float) -> TuningObjective:
    """The knowledge editors' objective: maximize S subject to NS loss <= `max_ns_loss` points."""
    return TuningObjective("S", "maximize", (Constraint("NS_loss", "<=", float(max_ns_loss)),))


# --- the option space -----------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One searched option: an int or float range (optionally log scale) or a set of choices."""

    name: str
    kind: Literal["int", "float", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "categorical":
            if not self.choices:
                raise WorkbenchError(f"option {self.name}: a categorical option needs choices")
        elif self.low is None or self.high is None or self.low > self.high or (self.log and self.low <= 0):
            raise WorkbenchError(f"option {self.name}: range [{self.low}, {self.high}] is empty or not positive "
                                 f"on a log scale")

    def suggest(self, trial: Any) -> Any:
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)  # type: ignore[arg-type]
        if self.kind == "float":
            return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)  # type: ignore[arg-type]
        return trial.suggest_categorical(self.name, list(self.choices))

    def range_text(self) -> str:
        if self.kind == "categorical":
            return "one of " + ", ".join(str(c) for c in self.choices)
        return f"{self.kind} in [{self.low:g}, {self.high:g}]" + (" (log)" if self.log else "")

    def text(self) -> str:
        return f"{self.name}: {self.range_text()}"

    def parse(self, raw: Any) -> Any:
        """A value for this option from the CLI or Python (checked against the range)."""
        if self.kind == "categorical":
            for c in self.choices:
                if raw == c or str(raw) == str(c):
                    return c
            raise WorkbenchError(f"option {self.name}={raw!r} is not allowed; expected {self.range_text()}")
        try:
            value: float = int(raw) if self.kind == "int" else float(raw)
            if self.kind == "int" and isinstance(raw, float) and raw != int(raw):
                raise ValueError
        except (TypeError, ValueError):
            raise WorkbenchError(f"option {self.name}={raw!r}: expected {'an integer' if self.kind == 'int' else 'a number'} "
                                 f"({self.range_text()})") from None
        assert self.low is not None and self.high is not None
        if not self.low <= value <= self.high:
            raise WorkbenchError(f"option {self.name}={raw} is outside its range: expected {self.range_text()}")
        return value

    def narrowed(self, low: Any, high: Any) -> Param:
        """The same option on a sub-range (both ends inside the declared range)."""
        if self.kind == "categorical":
            raise WorkbenchError(f"option {self.name} is categorical ({self.range_text()}): fix it instead of a range")
        lo, hi = self.parse(low), self.parse(high)
        if lo > hi:
            raise WorkbenchError(f"range for {self.name}: {low} > {high}; give LOW:HIGH")
        return replace(self, low=lo, high=hi)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.kind == "categorical":
            out["choices"] = list(self.choices)
        else:
            out.update({"low": self.low, "high": self.high, "log": self.log})
        return out


def _lookup(params: Sequence[Param], name: str) -> Param:
    for p in params:
        if p.name == name:
            return p
    raise WorkbenchError(f"unknown option {name!r}; options of this tunable: {', '.join(p.name for p in params)}")


def restrict(params: Sequence[Param], *, fixed: Mapping[str, Any] | None = None,
             ranges: Mapping[str, tuple[Any, Any]] | None = None) -> tuple[tuple[Param, ...], dict[str, Any]]:
    """Apply user pins and sub-ranges: (searched params, fixed values), both checked against the space."""
    pinned = {name: _lookup(params, name).parse(v) for name, v in (fixed or {}).items()}
    narrow = {name: _lookup(params, name).narrowed(*lh) for name, lh in (ranges or {}).items()}
    both = set(pinned) & set(narrow)
    if both:
        raise WorkbenchError(f"options {sorted(both)} are both fixed and given a range; choose one")
    searched = tuple(narrow.get(p.name, p) for p in params if p.name not in pinned)
    return searched, pinned


# --- what can be tuned ----------------------------------------------------------------------

@dataclass(frozen=True)
class Tunable:
    """What `tune` can search: a registered method, its data, option space, metrics and objective.

    Subclasses implement `space(handle)`, `prepare(handle, settings, seed)` and
    `evaluate(state, options)`; `to_options` maps sampled values to the method's options.
    `settings` are the evaluation's defaults (overridable, checked by type); `metrics` names
    what `evaluate` returns (constraints may use any of them).
    """

    name: str
    kind: Literal["editor", "adversary"]
    method: str
    model: str
    summary: str
    objective: TuningObjective
    metrics: tuple[tuple[str, str], ...]
    settings: tuple[tuple[str, Any], ...] = ()
    fixed: tuple[tuple[str, Any], ...] = ()  # options passed to the method, never searched

    # -- declared
    def space(self, handle: Any) -> tuple[Param, ...]:
        raise NotImplementedError

    def to_options(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return {**dict(self.fixed), **values}

    def prepare(self, handle: Any, settings: Mapping[str, Any], seed: int) -> Any:
        raise NotImplementedError

    def evaluate(self, state: Any, options: Mapping[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    def suggest(self, trial: Any, searched: Sequence[Param], pinned: Mapping[str, Any], state: Any) -> dict[str, Any]:
        """One trial's values of the searched options (independent by default; override for conditional ranges)."""
        return {p.name: p.suggest(trial) for p in searched}

    def validate(self, searched: Sequence[Param], pinned: Mapping[str, Any], state: Any) -> None:
        """Refuse, before any trial, a space that cannot produce a valid trial (default: any can)."""

    def baseline(self, state: Any) -> dict[str, Any]:
        return dict(state.get("baseline", {})) if isinstance(state, dict) else {}

    # -- derived
    def metric_names(self) -> list[str]:
        return [m for m, _ in self.metrics]

    def resolve_settings(self, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
        """Defaults with `overrides` applied, each coerced to its default's type."""
        out = dict(self.settings)
        for key, raw in (overrides or {}).items():
            if key not in out:
                valid = ", ".join(f"{k} (default {v})" for k, v in self.settings) or "none"
                raise WorkbenchError(f"unknown setting {key!r} for {self.name}; settings: {valid}")
            default = out[key]
            try:
                if isinstance(default, bool):
                    value: Any = raw if isinstance(raw, bool) else {"true": True, "false": False}[str(raw).lower()]
                elif isinstance(default, int):
                    value = int(raw)
                elif isinstance(default, float):
                    value = float(raw)
                else:
                    value = str(raw)
            except (KeyError, TypeError, ValueError):
                raise WorkbenchError(f"setting {key}={raw!r}: expected {type(default).__name__} "
                                     f"like the default {default!r}") from None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                check_finite(f"setting {key}", value)
                if not 0 <= value <= MAX_SETTING:
                    raise WorkbenchError(f"setting {key}={raw}: expected a number 0..{MAX_SETTING}")
            out[key] = value
        return out

    def check_objective(self, objective: TuningObjective) -> None:
        known = self.metric_names()
        for m in [objective.metric] + [c.metric for c in objective.constraints]:
            if m not in known:
                raise WorkbenchError(f"{self.name} reports no metric {m!r}; its metrics: {', '.join(known)}")


def int_setting(settings: Mapping[str, Any], key: str, *, low: int = 1) -> int:
    v = int(settings[key])
    if v < low:
        raise WorkbenchError(f"setting {key}={v}: expected at least {low}")
    return v


# --- the search -----------------------------------------------------------------------------

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


def check_storage_url(url: str) -> None:
    """Refuse a storage URL that names no database SQLAlchemy knows, before anything is created."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise WorkbenchError(f"storage {_display(url)!r} is not a database URL SQLAlchemy can open ({exc}); give "
                             "e.g. sqlite:///path/optuna.db or postgresql://user@host/db") from None


def _tune_run_file(name: str) -> bool:
    """What a tune run folder holds: optuna.db (and SQLite's journals beside it) and tune-worker*.json."""
    return name.startswith("optuna.db") or (name.startswith("tune-worker") and name.endswith(".json"))


def check_tune_folder(out: Path) -> None:
    """Refuse an `out` that exists but is not a tune run to add trials to: a file, or a folder of other things."""
    if not out.exists():
        return
    if not out.is_dir():
        raise WorkbenchError(f"--out {out} exists and is not a folder; give a new folder, or an earlier tune run's")
    others = sorted(p.name for p in out.iterdir() if not _tune_run_file(p.name))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise WorkbenchError(f"--out {out} holds {shown}: it is not a `workbench tune` run (optuna.db, "
                             "tune-worker*.json), and nothing in it is written over; give a new folder, or an "
                             "earlier tune run's --out")


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


def statement_text(statement: Mapping[str, Any]) -> str:
    """The statement as the lines printed before a search."""
    lines = [f"tune {statement['target']} ({statement['kind']} {statement['method']} on {statement['model']})",
             f"objective: {statement['objective']['text']}",
             "settings: " + ", ".join(f"{k}={v}" for k, v in statement["settings"].items()) + f", data seed {statement['seed']}"]
    if statement["fixed"]:
        lines.append("fixed: " + ", ".join(f"{k}={v}" for k, v in statement["fixed"].items()))
    lines.append("search: " + "; ".join(statement["space_text"]))
    return "\n".join(lines)


CONFIRM_SEED_OFFSET = 5000  # confirmation data: disjoint from the search's data seeds (500-900 + seed)


def _confirm(tunable: Tunable, handle: Any, settings: Mapping[str, Any], seed: int, objective: TuningObjective,
             values: Mapping[str, Any]) -> dict[str, Any]:
    """The chosen options evaluated on fresh data: metrics, objective value and constraint feasibility."""
    fresh = tunable.prepare(handle, settings, seed + CONFIRM_SEED_OFFSET)
    metrics = {k: float(v) for k, v in tunable.evaluate(fresh, tunable.to_options(values)).items()}
    return {"data_seed": seed + CONFIRM_SEED_OFFSET, "value": metrics[objective.metric], "metrics": metrics,
            "feasible": all(c.violation(metrics) <= 0 for c in objective.constraints),
            "baseline": _canonical(tunable.baseline(fresh))}


def _canonical(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def tune(
    tunable: Tunable,
    *,
    n_trials: int = 20,
    n_cases: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    out: Path | None = None,
    seed: int = 0,
    worker: int = 0,
    max_ns_loss: float | None = None,
    settings: Mapping[str, Any] | None = None,
    constraints: Sequence[str | Constraint] = (),
    fixed: Mapping[str, Any] | None = None,
    ranges: Mapping[str, tuple[Any, Any]] | None = None,
    device: str = "auto",
    timeout: float | None = None,
    progress: bool = True,
    announce: Callable[[str], None] | None = None,
    confirm: bool = True,
) -> dict[str, Any]:
    """Run `n_trials` trials of this worker on a (possibly shared) optuna study; return a summary.

    `n_trials=0` runs none: it summarizes (and confirms) the study as the workers left it.

    `settings` override the tunable's evaluation settings (`n_cases` is the knowledge editors'
    "cases"); `constraints` ("METRIC<=X") replace or add to the stated objective's (`max_ns_loss`
    is "NS_loss<=X"); `fixed` pins options and `ranges` narrows them, both inside the declared
    space. `announce` receives the statement before the search starts. With `confirm`, the best
    feasible trial is evaluated once more on fresh data (seed + CONFIRM_SEED_OFFSET): the search
    picks options on its own evaluation data, so its best value is optimistic; the confirmation
    says whether the objective and constraints hold on data the search never saw.
    """
    import optuna

    from workbench.models import load

    if n_trials < 0:
        raise WorkbenchError(f"n_trials={n_trials}: expected a number of trials >= 0 (0 summarizes the study)")
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise WorkbenchError(f"timeout={timeout}: expected a positive number of seconds, or None")
    if storage is not None:
        check_storage_url(storage)
    out = Path(out) if out is not None else Path(f"runs/tune-{tunable.name}")
    check_tune_folder(out)
    overrides = dict(settings or {})
    if n_cases is not None:
        if "cases" not in dict(tunable.settings):
            raise WorkbenchError(f"--cases applies to the knowledge editors; {tunable.name}'s settings are "
                                 f"{', '.join(k for k, _ in tunable.settings)} (use --set KEY=VALUE)")
        overrides["cases"] = n_cases
    sets = tunable.resolve_settings(overrides)
    extra = [c if isinstance(c, Constraint) else Constraint.parse(c) for c in constraints]
    if max_ns_loss is not None:
        extra.append(Constraint("NS_loss", "<=", float(max_ns_loss)))
    objective = tunable.objective.with_constraints(extra)
    tunable.check_objective(objective)
    handle = load(tunable.model, device=device, progress=progress)
    searched, pinned = restrict(tunable.space(handle), fixed=fixed, ranges=ranges)
    statement = _canonical({
        "target": tunable.name, "kind": tunable.kind, "method": tunable.method, "model": tunable.model,
        "objective": objective.to_json(), "settings": sets, "seed": seed, "fixed": pinned,
        "space": [p.to_json() for p in searched], "space_text": [p.text() for p in searched],
        "method_defaults": dict(tunable.fixed)})
    digest = hashlib.sha256(json.dumps(statement, sort_keys=True).encode()).hexdigest()[:10]
    name = study_name or f"{tunable.name}-{digest}-seed{seed}"
    state = tunable.prepare(handle, sets, seed)
    tunable.validate(searched, pinned, state)
    if announce is not None:
        announce(statement_text(statement))
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / 'optuna.db').resolve()}"

    # optuna >= 5 records constraints per trial (set_constraint); older versions take constraints_func.
    modern = hasattr(optuna.trial.Trial, "set_constraint")

    def constraints_of(trial: Any) -> Sequence[float]:
        return trial.user_attrs.get("constraints", [1.0])

    sampler = optuna.samplers.TPESampler(seed=seed + 1000 * worker,
                                         **({} if modern else {"constraints_func": constraints_of}))
    if not progress:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _create_study(_storage(url), name, sampler, objective.direction)
    stored = study.user_attrs.get("statement")
    if stored is not None and _canonical(stored) != statement:
        raise WorkbenchError(f"optuna study {name!r} in {_display(url)} was started with another statement "
                             f"({stored.get('objective', {}).get('text')}; settings {stored.get('settings')}; "
                             f"fixed {stored.get('fixed')}); this worker's: {objective.text()}, settings {sets}, "
                             f"fixed {pinned}. Use another --study-name or the same options")
    if stored is None:
        study.set_user_attr("statement", statement)
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
        values = tunable.suggest(trial, searched, pinned, state)
        options = tunable.to_options({**pinned, **values})
        trial.set_user_attr("worker", ident)
        trial.set_user_attr("options", _canonical(options))
        mine.append(trial.number)
        try:
            metrics = tunable.evaluate(state, options)
        except WorkbenchError as exc:  # the method refused these options: a failed trial, with the reason
            trial.set_user_attr("error", str(exc)[:500])
            raise
        metrics = {k: float(v) for k, v in metrics.items()}
        trial.set_user_attr("metrics", metrics)
        set_constraints(trial, [c.violation(metrics) for c in objective.constraints])
        value = metrics[objective.metric]
        if not math.isfinite(value):
            trial.set_user_attr("error", f"{objective.metric} is {value}")
            raise WorkbenchError(f"{objective.metric} is not finite ({value})")
        return value

    t0 = time.perf_counter()
    if n_trials:
        study.optimize(run, n_trials=n_trials, timeout=timeout, show_progress_bar=False, catch=(WorkbenchError,))
    seconds = time.perf_counter() - t0
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    feasible = [t for t in complete if all(v <= 0 for v in t.user_attrs.get("constraints", [1.0]))]
    best = None
    if feasible:
        pick = max if objective.direction == "maximize" else min
        b = pick(feasible, key=lambda t: t.value)
        best = {"number": b.number, "value": b.value, "params": b.params, "options": b.user_attrs.get("options"),
                "metrics": b.user_attrs.get("metrics")}
        if confirm:
            best["confirmation"] = _confirm(tunable, handle, sets, seed, objective, {**pinned, **b.params})
    result = {
        "target": tunable.name, "kind": tunable.kind, "method": tunable.method, "model": tunable.model,
        "study_name": name, "storage_display": _display(url), "objective": objective.text(), "statement": statement,
        "settings": sets, "baseline": _canonical(tunable.baseline(state)),
        "worker": ident, "worker_trials": mine, "worker_seconds": round(seconds, 2),
        "n_trials_total": len(trials), "n_complete": len(complete), "n_failed": len(failed),
        "failures": [{"number": t.number, "error": t.user_attrs.get("error")} for t in failed][:5],
        "n_feasible": len(feasible), "best": best,
    }
    if tunable.kind == "editor" and "cases" in sets:
        result["n_cases"] = sets["cases"]
        result["unedited"] = result["baseline"]
    atomic_write_json(out / f"tune-worker{worker}-{os.getpid()}.json", result)
    return result
