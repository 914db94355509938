"""Case studies: a prediction stated as data and frozen before anything runs, then measured.

A study subclasses `CaseStudy` and declares

- `predictions()`: `Prediction`s, each naming a metric, the predicted direction and size
  (a number or an interval), the interpretability method whose finding it tests, and the
  verdict `Rule` (held / failed / inconclusive from the metric's confidence interval);
  no-change predictions are direction "none" with a `within` rule;
- `controls`: what the action is compared with (random units or layers of the same size,
  noise patches, the unedited model, wrong-layer edits), run by the same code as the action;
- `metrics()`: `workbench.bootstrap.Metric`s over the study's rows;
- `world`: the role of the models it runs on ("factgpt", "shapesnet", "minilm"; None for a
  study that loads no model), which the run's `workbench.suite.Suite` maps to model specs;
- `setup(ctx, model)`, `case_keys(state, seed)`, `run_case(state, seed, key) -> dict`.

`reproduce(out)` then: writes config.json (the study's options and the suite's models);
writes prediction.json (the registration: every prediction, control and rule) and its sha256
*before* setup or any case runs; loads and checks each model of its role, sets it up, and
runs every (model, seed, case) through `RunStore.run_cases`, one atomic file per case, each
stamped with the prediction hash it ran under and the model it ran on (a rerun resumes: no
case lost or duplicated; a changed prediction is refused); then computes metrics with
bootstrap intervals and applies each stored rule to get the verdicts. With several models
the intervals resample models, then cases (`estimate(..., cluster="model")`), case ids start
with the model's spec, and results also hold each model's own metrics and verdicts
(`by_model`). `analyze(store)` recomputes results from the stored files alone.

Per-case records are free-form JSON; by convention they may hold `comparisons` (see
`Comparison`): a method's chosen action against its control, which feeds the cross-study
leaderboard of interpretability methods (`workbench.calibration`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from workbench import study_plots
from workbench.bootstrap import Estimate, Metric, estimate
from workbench.errors import WorkbenchError
from workbench.results import RunStore
from workbench.storage import atomic_write_json, atomic_write_text, sha256_file
from workbench.study_plots import Figure
from workbench.suite import Suite, SuiteModel, check_model, dev_suite, model_record

log = logging.getLogger(__name__)

HARNESS_VERSION = 1
Direction = Literal["increase", "decrease", "none"]
Verdict = Literal["held", "failed", "inconclusive"]
RuleKind = Literal["ci_above", "ci_below", "ci_within"]
VERDICTS: tuple[str, ...] = ("held", "failed", "inconclusive")
Basis = Literal["finding", "paper", "replication", "target", "guess"]
BASES: tuple[str, ...] = ("finding", "paper", "replication", "target", "guess")
PREDICTION_FILE = "prediction.json"
HASH_FILE = "prediction.sha256"
RESULTS_FILE = "results.json"
MODELS_FILE = "models.json"


# --- the prediction, as data ------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """How the metric's confidence interval becomes a verdict, stated before the run.

    - `ci_above(t)`: held if the whole CI lies above t; failed if it lies at or below t
      (a predicted effect that is absent or smaller than t fails, it is never "held");
      inconclusive if the CI straddles t.
    - `ci_below(t)`: the mirror image.
    - `ci_within(lo, hi)`: held if the CI lies inside [lo, hi]; failed if it misses the band
      entirely; inconclusive if it overlaps an edge. The rule for "no change".
    A metric without an interval (too few cases) is inconclusive.
    """

    kind: RuleKind
    threshold: float | None = None
    low: float | None = None
    high: float | None = None
    level: float = 0.95

    def __post_init__(self) -> None:
        if self.kind in ("ci_above", "ci_below"):
            if self.threshold is None or not math.isfinite(self.threshold):
                raise WorkbenchError(f"rule {self.kind} needs a finite threshold")
        elif self.kind == "ci_within":
            if self.low is None or self.high is None or not self.low <= self.high:
                raise WorkbenchError(f"rule ci_within needs low <= high; got [{self.low}, {self.high}]")
        else:
            raise WorkbenchError(f"unknown rule kind {self.kind!r}; expected ci_above, ci_below or ci_within")
        if not 0 < self.level < 1:
            raise WorkbenchError(f"rule level {self.level}: expected a confidence level in (0, 1)")

    def judge(self, low: float | None, high: float | None) -> tuple[Verdict, str]:
        """The verdict for a CI [low, high], and why."""
        pct = f"{100 * self.level:g}% CI"
        if low is None or high is None:
            return "inconclusive", f"no {pct} (too few cases with data)"
        ci = f"{pct} [{low:.4g}, {high:.4g}]"
        if self.kind == "ci_above":
            t = float(self.threshold)  # type: ignore[arg-type]
            if low > t:
                return "held", f"{ci} lies above {t:g}"
            if high <= t:
                return "failed", f"{ci} lies at or below {t:g}"
            return "inconclusive", f"{ci} straddles {t:g}"
        if self.kind == "ci_below":
            t = float(self.threshold)  # type: ignore[arg-type]
            if high < t:
                return "held", f"{ci} lies below {t:g}"
            if low >= t:
                return "failed", f"{ci} lies at or above {t:g}"
            return "inconclusive", f"{ci} straddles {t:g}"
        lo, hi = float(self.low), float(self.high)  # type: ignore[arg-type]
        if lo <= low and high <= hi:
            return "held", f"{ci} lies inside [{lo:g}, {hi:g}]"
        if high < lo or low > hi:
            return "failed", f"{ci} misses [{lo:g}, {hi:g}]"
        return "inconclusive", f"{ci} overlaps an edge of [{lo:g}, {hi:g}]"

    def text(self) -> str:
        pct = f"{100 * self.level:g}% CI"
        if self.kind == "ci_above":
            return f"held if the {pct} lies above {self.threshold:g}; failed if at or below it"
        if self.kind == "ci_below":
            return f"held if the {pct} lies below {self.threshold:g}; failed if at or above it"
        return f"held if the {pct} lies inside [{self.low:g}, {self.high:g}]; failed if it misses the band"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "threshold": self.threshold, "low": self.low, "high": self.high,
                "level": self.level, "text": self.text()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Rule:
        return cls(kind=data["kind"], threshold=data.get("threshold"), low=data.get("low"), high=data.get("high"),
                   level=float(data.get("level", 0.95)))


def ci_above(threshold: float, *, level: float = 0.95) -> Rule:
    return Rule("ci_above", threshold=float(threshold), level=level)


def ci_below(threshold: float, *, level: float = 0.95) -> Rule:
    return Rule("ci_below", threshold=float(threshold), level=level)


def ci_within(low: float, high: float, *, level: float = 0.95) -> Rule:
    return Rule("ci_within", low=float(low), high=float(high), level=level)


_RULE_FOR = {"increase": "ci_above", "decrease": "ci_below", "none": "ci_within"}


@dataclass(frozen=True)
class Prediction:
    """One falsifiable claim: metric, direction, predicted size, verdict rule.

    `size` is the predicted value of the metric (a number, or a (low, high) interval); the
    calibration summary compares it with what was measured. `basis` says where a size comes
    from (`BASES`): computed from a finding made in the same run, a published result, a value
    this project measured before (a replication, which never counts as a prediction of an
    interpretation), a target set as a goal, or a guess; `source` says which. `method` names
    the interpretability method whose finding the claim rests on (None for claims about
    editors alone). Direction "none" is a no-change prediction and needs a `ci_within` rule;
    "increase" needs `ci_above`, "decrease" `ci_below`. `primary` claims decide the study's
    overall verdict.
    """

    id: str
    claim: str
    metric: str
    direction: Direction
    rule: Rule
    size: float | tuple[float, float] | None = None
    method: str | None = None
    source: str = ""
    primary: bool = True
    basis: Basis | None = None

    def __post_init__(self) -> None:
        if not self.id or not self.id.replace("_", "").replace("-", "").isalnum():
            raise WorkbenchError(f"prediction id {self.id!r}: use letters, digits, '_' or '-'")
        if self.direction not in _RULE_FOR:
            raise WorkbenchError(f"prediction {self.id}: direction {self.direction!r}; expected increase, decrease or none")
        if self.rule.kind != _RULE_FOR[self.direction]:
            raise WorkbenchError(f"prediction {self.id}: direction {self.direction!r} needs a {_RULE_FOR[self.direction]} "
                                 f"rule, got {self.rule.kind}")
        if isinstance(self.size, (tuple, list)) and (len(self.size) != 2 or self.size[0] > self.size[1]):
            raise WorkbenchError(f"prediction {self.id}: size interval must be (low, high); got {self.size!r}")
        if self.basis is not None and self.basis not in BASES:
            raise WorkbenchError(f"prediction {self.id}: basis {self.basis!r}; expected one of {', '.join(BASES)}")
        if self.size is not None and self.basis is None:
            raise WorkbenchError(f"prediction {self.id}: say where its size comes from (basis: {', '.join(BASES)})")

    def to_json(self) -> dict[str, Any]:
        size: Any = list(self.size) if isinstance(self.size, (tuple, list)) else self.size
        return {"id": self.id, "claim": self.claim, "metric": self.metric, "direction": self.direction,
                "size": size, "rule": self.rule.to_json(), "method": self.method, "source": self.source,
                "basis": self.basis, "primary": self.primary}


@dataclass(frozen=True)
class Control:
    """A comparison condition, run with the same code as the action."""

    name: str
    description: str


@dataclass(frozen=True)
class Anchor:
    """A published number to show beside ours: `ours` names our metric with the same meaning."""

    label: str
    published: float
    ours: str | None
    source: str
    protocol_match: str  # "same", "same metric, different model/data", ...


@dataclass(frozen=True)
class Comparison:
    """One case where a method's finding chose an action, measured against its control.

    `better` says which way is good for `metric` (e.g. the drop in the fact's probability:
    "higher"). Stored in case records (`record["comparisons"]`) and pooled across studies
    into the method leaderboard.
    """

    method: str
    action: str
    metric: str
    treatment: float
    control: float
    control_name: str
    better: Literal["higher", "lower"] = "higher"

    @property
    def advantage(self) -> float:
        d = self.treatment - self.control
        return d if self.better == "higher" else -d

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"advantage": self.advantage}


# --- shared state across studies of one run ----------------------------------------------------

@dataclass
class StudyContext:
    """What studies of one `reproduce` share: device, the suite, loaded models, memoized setup.

    Passed explicitly (no module-level cache): studies on FactGPT load it once per run.
    """

    device: str = "auto"
    progress: bool = True
    suite: Suite = field(default_factory=dev_suite)
    models: dict[str, Any] = field(default_factory=dict)
    memo: dict[str, Any] = field(default_factory=dict)
    checked: set[tuple[str, str]] = field(default_factory=set)
    workers: int = 1  # > 1: cases run as Ray tasks (`workbench.parallel`), each worker loading models by spec
    threads: int | None = None  # torch threads in each Ray worker (None: torch's default)

    def model(self, spec: str) -> Any:
        if spec not in self.models:
            from workbench.models import load

            self.models[spec] = load(spec, device=self.device, progress=self.progress)
        return self.models[spec]

    def checked_model(self, model: SuiteModel) -> Any:
        """The handle of a suite model, loaded (trained on demand) and checked once per run against its
        role and the zoo's checks (`workbench.suite.check_model`)."""
        handle = self.model(model.spec)
        if (model.role, model.spec) not in self.checked:
            check_model(model, handle)
            self.checked.add((model.role, model.spec))
        return handle

    def prepare(self, roles: Sequence[str]) -> None:
        """Load and check every model of `roles`, the user's first, before any study runs."""
        models = [m for role in roles for m in self.suite.models(role)]
        for m in sorted(models, key=lambda m: not m.given):
            self.checked_model(m)

    def remember(self, key: str, compute: Any) -> Any:
        """`compute()` once per run under `key` (e.g. a traced edit layer several studies use)."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]


def case_seed(seed: int, key: str) -> int:
    """A stable 63-bit seed for one (seed, case): the same on every run and resume."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --- the base class ------------------------------------------------------------------------------

class CaseStudy:
    """Base of every study; see the module docstring for what a subclass declares."""

    name: ClassVar[str] = ""
    number: ClassVar[int | None] = None
    world: ClassVar[str | None] = None
    title: ClassVar[str] = ""
    hypothesis: ClassVar[str] = ""
    controls: ClassVar[tuple[Control, ...]] = ()
    anchors: ClassVar[tuple[Anchor, ...]] = ()
    methods: ClassVar[tuple[str, ...]] = ()
    tune_target: ClassVar[str | None] = None
    default_seeds: ClassVar[int] = 5
    quick_seeds: ClassVar[int] = 5

    def __init__(self, *, quick: bool = False, seeds: int | Sequence[int] | None = None,
                 n_resamples: int = 2000) -> None:
        if not self.name:
            raise WorkbenchError(f"{type(self).__name__} must set the class attribute `name`")
        if seeds is None:
            seeds = self.quick_seeds if quick else self.default_seeds
        if isinstance(seeds, int):
            if seeds < 1:
                raise WorkbenchError(f"seeds={seeds}: expected at least 1")
            seeds = range(seeds)
        self.seeds: tuple[int, ...] = tuple(int(s) for s in seeds)
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise WorkbenchError(f"seeds must be distinct and non-empty; got {list(self.seeds)}")
        self.quick = bool(quick)
        self.n_resamples = int(n_resamples)
        self.store: RunStore | None = None
        self.suite: Suite | None = None

    # --- what a study declares ----------------------------------------------------------------

    def options(self) -> dict[str, Any]:
        """Sizes and settings (may depend on `self.quick`); recorded in config.json."""
        return {}

    def predictions(self) -> list[Prediction]:
        raise NotImplementedError

    def metrics(self) -> list[Metric]:
        raise NotImplementedError

    def setup(self, ctx: StudyContext, model: SuiteModel | None) -> Any:
        """Load `model` (`ctx.model(model.spec)`; None for a study without a `world`) and compute what
        every case on it needs; returns the state passed to its cases."""
        return None

    def case_keys(self, state: Any, seed: int) -> list[str]:
        raise NotImplementedError

    def run_case(self, state: Any, seed: int, key: str) -> dict[str, Any]:
        raise NotImplementedError

    def rows(self, record: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The rows metrics are computed over; default: the case record itself."""
        return [dict(record)]

    def figures(self, results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[Figure]:
        """Study-specific plots, from stored numbers only (so `workbench report` can redo them)."""
        return []

    # --- harness --------------------------------------------------------------------------------

    def registration(self) -> dict[str, Any]:
        """The prediction document frozen before the run (hashed; must not change on resume)."""
        preds = self.predictions()
        ids = [p.id for p in preds]
        if len(set(ids)) != len(ids):
            raise WorkbenchError(f"study {self.name}: prediction ids repeat: {ids}")
        known = {m.name for m in self.metrics()}
        unknown = [p.metric for p in preds if p.metric not in known]
        if unknown:
            raise WorkbenchError(f"study {self.name}: predictions name unknown metrics {unknown}; metrics: {sorted(known)}")
        return {
            "harness_version": HARNESS_VERSION,
            "study": self.name,
            "title": self.title,
            "hypothesis": self.hypothesis,
            "predictions": [p.to_json() for p in preds],
            "controls": [asdict(c) for c in self.controls],
            "methods": list(self.methods),
        }

    def suite_models(self, suite: Suite | None = None) -> list[SuiteModel | None]:
        """The models this study runs on in `suite` (default: the one it runs in, else the dev suite);
        [None] for a study without a `world`."""
        suite = suite or self.suite or dev_suite(self.quick)
        return [None] if self.world is None else list(suite.models(self.world))

    def config(self) -> dict[str, Any]:
        suite = self.suite or dev_suite(self.quick)
        return {"study": self.name, "quick": self.quick, "seeds": list(self.seeds), "options": self.options(),
                "harness_version": HARNESS_VERSION, "world": self.world,
                "models": [m.spec for m in self.suite_models(suite) if m is not None], "suite": suite.to_json()}

    def freeze(self, store: RunStore) -> str:
        """Write config and prediction (refusing changes on resume); return prediction.json's sha256."""
        store.write_config(self.config())
        store.write_prediction(self.registration())
        digest = sha256_file(store.root / PREDICTION_FILE)
        hash_path = store.root / HASH_FILE
        if hash_path.exists():
            recorded = hash_path.read_text().split()[0]
            if recorded != digest:
                raise WorkbenchError(f"{hash_path} records {recorded[:16]}… but {PREDICTION_FILE} hashes to "
                                     f"{digest[:16]}…: the prediction was edited after it was frozen")
        else:
            atomic_write_text(hash_path, f"{digest}  {PREDICTION_FILE}\nfrozen_at {time.time():.3f}\n")
        return digest

    def reproduce(self, out: str | Path, *, ctx: StudyContext | None = None, progress: bool = True) -> dict[str, Any]:
        """Freeze the prediction, run (or resume) every case on every model, analyze, write results; return them."""
        ctx = ctx or StudyContext(progress=progress)
        self.suite = ctx.suite
        models = self.suite_models()
        store = RunStore(out)
        self.store = store
        digest = self.freeze(store)
        t0 = time.perf_counter()
        states = []
        for m in models:
            if m is not None:
                ctx.checked_model(m)
            states.append(self.setup(ctx, m))
        atomic_write_json(store.root / MODELS_FILE,
                          [model_record(m, ctx.models.get(m.spec)) for m in models if m is not None])
        setup_s = time.perf_counter() - t0
        index: dict[str, tuple[int, int, str]] = {}
        for i, (m, state) in enumerate(zip(models, states)):
            prefix = f"{m.spec}|" if len(models) > 1 and m is not None else ""
            for seed in self.seeds:
                for key in self.case_keys(state, seed):
                    case_id = f"{prefix}s{seed}:{key}"
                    if case_id in index:
                        raise WorkbenchError(f"study {self.name}: case key {key!r} repeats for seed {seed}")
                    index[case_id] = (i, seed, key)

        def run_one(case_id: str) -> dict[str, Any]:
            i, seed, key = index[case_id]
            return self.case_record(store, states[i], models[i], seed, key, digest)

        t0 = time.perf_counter()
        todo = store.pending(list(index))
        if ctx.workers > 1 and todo:
            from workbench.parallel import run_cases_on_ray

            run_cases_on_ray(self, store, todo, index, digest, device=ctx.device, threads=ctx.threads,
                             done_before=len(index) - len(todo), progress=progress)
        else:
            store.run_cases(list(index), run_one, progress=progress, desc=self.name)
        run_s = time.perf_counter() - t0
        stale = sorted(set(store.case_ids()) - set(index))
        if stale:
            raise WorkbenchError(f"{store.root} holds cases this study no longer defines ({stale[:5]}); "
                                 "use a new --out folder")
        results = self.analyze(store, timing={"setup_s": round(setup_s, 3), "cases_s": round(run_s, 3)})
        return results

    def fresh_state(self, index: int, device: str) -> tuple[SuiteModel | None, Any]:
        """(model, setup state) of this study's model `index` in a new context: what a worker process builds."""
        ctx = StudyContext(device=device, progress=False, suite=self.suite)
        model = self.suite_models()[index]
        if model is not None:
            ctx.checked_model(model)
        return model, self.setup(ctx, model)

    def case_record(self, store: RunStore, state: Any, model: SuiteModel | None, seed: int, key: str,
                    digest: str) -> dict[str, Any]:
        """Run one case (seeded from its id, so it repeats on resume and in any process) as its stored record."""
        on_disk = sha256_file(store.root / PREDICTION_FILE)
        if on_disk != digest:
            raise WorkbenchError(f"{store.root / PREDICTION_FILE} changed during the run; refusing to continue")
        torch.manual_seed(case_seed(seed, key))  # any hidden use of the global RNG repeats on resume
        start = time.perf_counter()
        result = self.run_case(state, seed, key)
        return {"model": None if model is None else model.spec, "seed": seed, "key": key,
                "prediction_sha256": digest, "seconds": round(time.perf_counter() - start, 4), "result": result}

    def analyze(self, store: RunStore, *, timing: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Results from the stored files alone: metrics with CIs, verdicts by the stored rules."""
        registration = _read_json(store.root / PREDICTION_FILE)
        digest = sha256_file(store.root / PREDICTION_FILE)
        config = store.read_config()
        cases = store.load_cases()
        rows: list[dict[str, Any]] = []
        comparisons: list[dict[str, Any]] = []
        bad = [cid for cid, rec in cases.items() if rec.get("prediction_sha256") != digest]
        if bad:
            raise WorkbenchError(f"cases {bad[:5]} in {store.root} ran under another prediction; use a new --out")
        seconds = 0.0
        for cid, rec in cases.items():
            seconds += float(rec.get("seconds", 0.0))
            model = rec.get("model")
            for row in self.rows(rec["result"]):
                rows.append({**row, "seed": rec["seed"], "case": rec["key"], "model": model})
            for comp in rec["result"].get("comparisons", []):
                comparisons.append({**comp, "seed": rec["seed"], "case": rec["key"], "model": model,
                                    "study": self.name})
        metrics: dict[str, Any] = {}
        for i, metric in enumerate(self.metrics()):
            est = estimate(rows, metric, n_resamples=self.n_resamples, seed=i, cluster="model")
            per_seed = {}
            for seed in sorted({r["seed"] for r in rows}):
                v = metric.value([r for r in rows if r["seed"] == seed])
                per_seed[str(seed)] = None if not math.isfinite(v) else v
            metrics[metric.name] = {**est.to_json(), "description": metric.description, "unit": metric.unit,
                                    "per_seed": per_seed}
        verdicts = [judge(p, metrics.get(p["metric"])) for p in registration["predictions"]]
        models_path = store.root / MODELS_FILE
        models = _read_json(models_path) if models_path.is_file() else []
        primary = [v["verdict"] for v in verdicts if v["primary"]]
        overall: Verdict = ("failed" if "failed" in primary else "held" if primary and all(v == "held" for v in primary)
                            else "inconclusive")
        results: dict[str, Any] = {
            "study": self.name,
            "number": self.number,
            "title": self.title,
            "hypothesis": self.hypothesis,
            "prediction": {**registration, "sha256": digest},
            "prediction_sha256": digest,
            "config": config,
            "quick": config.get("quick"),
            "seeds": config.get("seeds"),
            "suite": config.get("suite"),
            "models": models,
            "by_model": self._by_model(rows, registration, metrics, models),
            "cases": {"n": len(cases), "ids": list(cases)},
            "n_rows": len(rows),
            "metrics": metrics,
            "controls": [asdict(c) for c in self.controls],
            "verdicts": verdicts,
            "verdict": overall,
            "comparisons": comparisons,
            "anchors": [self._anchor_row(a, metrics) for a in self.anchors],
            "timing": {**(dict(timing) if timing else {}), "sum_case_s": round(seconds, 3)},
            "environment": environment(),
        }
        results["figures"] = self._write_figures(store, results, rows)
        atomic_write_json(store.root / RESULTS_FILE, results)
        atomic_write_text(store.root / "cases.csv", rows_csv(rows))
        atomic_write_text(store.root / "metrics.csv", metrics_csv(self.name, metrics))
        return results

    def _by_model(self, rows: Sequence[Mapping[str, Any]], registration: Mapping[str, Any],
                  pooled: Mapping[str, Any], models: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Each model's own metrics (row bootstrap within the model) and the stored rules' verdicts on them."""
        specs = [s for s in dict.fromkeys(r["model"] for r in rows) if s is not None]
        described = {m.get("spec"): m for m in models}
        out: dict[str, Any] = {}
        for spec in specs:
            if len(specs) == 1:
                own = dict(pooled)
            else:
                mine = [r for r in rows if r["model"] == spec]
                own = {m.name: estimate(mine, m, n_resamples=self.n_resamples, seed=i).to_json()
                       for i, m in enumerate(self.metrics())}
            verdicts = [judge(p, own.get(p["metric"])) for p in registration["predictions"]]
            out[str(spec)] = {
                "model": described.get(spec, {"spec": spec}),
                "n_rows": sum(r["model"] == spec for r in rows),
                "metrics": {k: {"value": v["value"], "ci": v["ci"], "n": v["n"]} for k, v in own.items()},
                "verdicts": {v["id"]: {"verdict": v["verdict"], "measured": v["measured"], "ci": v["ci"]}
                             for v in verdicts},
            }
        return out

    def _anchor_row(self, anchor: Anchor, metrics: Mapping[str, Any]) -> dict[str, Any]:
        ours = metrics.get(anchor.ours) if anchor.ours else None
        return {"label": anchor.label, "published": anchor.published, "source": anchor.source,
                "protocol_match": anchor.protocol_match, "ours_metric": anchor.ours,
                "ours": None if ours is None else ours["value"], "ours_ci": None if ours is None else ours["ci"]}

    def _write_figures(self, store: RunStore, results: dict[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
        figures = [study_plots.verdict_figure(results)]
        figures += study_plots.distribution_figures(results, rows, self.metrics())
        try:
            figures += self.figures(results, rows)
        except Exception as exc:  # a plotting bug must not lose the measured numbers; it is shown in the report
            log.exception("study %s: plotting failed; results are kept without its figures", self.name)
            results["figure_error"] = f"{type(exc).__name__}: {exc}"  # type: ignore[index]
        out = []
        for fig in figures:
            if fig is None:
                continue
            store.write_artifact(fig.name, fig.png)
            out.append({"file": fig.name, "caption": fig.caption})
        return out


def judge(prediction: Mapping[str, Any], metric: Mapping[str, Any] | None) -> dict[str, Any]:
    """Apply a stored prediction's rule to a measured metric (dict with value and ci)."""
    rule = Rule.from_json(prediction["rule"])
    if metric is None:
        verdict, why = "inconclusive", f"metric {prediction['metric']!r} was not measured"
        value, ci = None, [None, None]
    else:
        value, ci = metric["value"], metric["ci"]
        verdict, why = rule.judge(ci[0], ci[1])
    return {"id": prediction["id"], "claim": prediction["claim"], "metric": prediction["metric"],
            "direction": prediction["direction"], "size": prediction["size"], "rule": rule.text(),
            "method": prediction.get("method"), "source": prediction.get("source", ""),
            "basis": prediction.get("basis"), "primary": bool(prediction.get("primary", True)), "measured": value,
            "ci": ci,
            "verdict": verdict, "why": why}


# --- helpers ---------------------------------------------------------------------------------

def environment() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}


def _read_json(path: Path) -> Any:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def _flat(row: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, name + "."))
        elif isinstance(value, (list, tuple)):
            if len(value) <= 8 and all(isinstance(v, (int, float, str, bool)) or v is None for v in value):
                out[name] = " ".join(str(v) for v in value)
        else:
            out[name] = value
    return out


def rows_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """Every row, nested dicts flattened to dotted columns (long lists left out)."""
    flat = [_flat(r) for r in rows]
    columns: list[str] = []
    seen: set[str] = set()
    for r in flat:
        for k in r:
            if k not in seen:
                seen.add(k)
                columns.append(k)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in flat:
        writer.writerow(r)
    return buf.getvalue()


def metrics_csv(study: str, metrics: Mapping[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["study", "metric", "value", "ci_low", "ci_high", "n", "unit", "description"])
    for name, m in metrics.items():
        writer.writerow([study, name, m["value"], m["ci"][0], m["ci"][1], m["n"], m["unit"], m["description"]])
    return buf.getvalue()


__all__ = [
    "BASES", "Anchor", "Basis", "CaseStudy", "Comparison", "Control", "Direction", "Estimate", "Figure", "Metric", "Prediction",
    "Rule", "StudyContext", "Suite", "SuiteModel", "VERDICTS", "Verdict", "case_seed", "ci_above", "ci_below",
    "ci_within", "judge", "rows_csv",
]
