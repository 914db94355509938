"""`workbench tune`: search an editor's or adversary's options with optuna toward a stated objective.

A `Tunable` says, as data, what a search means before it runs: its option space (`Param`:
name, range, scale), its stated objective (`Objective`: a metric to maximize or minimize
subject to `Constraint`s, e.g. "maximize S subject to NS_loss <= 2"), the metrics its
evaluation returns, and its evaluation settings (which data, how much). Two steps run it:
`prepare` (data and baseline, once per worker, from the data seed) and `evaluate` (one
trial: build the method with the sampled options, run it, return a metrics dict).

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

Tunables (`TUNABLES`):
- knowledge editors on FactGPT rewrites: rome, memit, ft, ft-l, kn (CounterFact S, NS loss);
- "adversarial-patch" on ShapesNet: patch fraction, steps, lr, rotation; maximize targeted
  success on held-out images subject to the patch's share of the image area;
- "copy-paste" on ShapesNet: patch size, units, feature-visualization steps and candidates;
  maximize best-placement success subject to beating the noise-patch control;
- "ablate" (trojan surgery on ShapesNet): site, unit count, selection method, replacement
  value; minimize attack success subject to a clean-accuracy drop of at most 1 point.
Studies whose action is tunable name it in `CaseStudy.tune_target`.
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

from workbench.errors import WorkbenchError
from workbench.storage import atomic_write_json

log = logging.getLogger(__name__)


# --- the stated objective -------------------------------------------------------------------

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
class Objective:
    metric: str
    direction: Literal["maximize", "minimize"] = "maximize"
    constraints: tuple[Constraint, ...] = ()

    def text(self) -> str:
        s = f"{self.direction} {self.metric}"
        return s + (" subject to " + ", ".join(c.text() for c in self.constraints) if self.constraints else "")

    def with_constraints(self, extra: Sequence[Constraint]) -> Objective:
        """Replace the constraint on each metric named in `extra` (or add it)."""
        named = {c.metric for c in extra}
        return replace(self, constraints=tuple(c for c in self.constraints if c.metric not in named) + tuple(extra))

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "direction": self.direction,
                "constraints": [{"metric": c.metric, "op": c.op, "bound": c.bound} for c in self.constraints],
                "text": self.text()}


def objective_for(max_ns_loss: float) -> Objective:
    """The knowledge editors' objective: maximize S subject to NS loss <= `max_ns_loss` points."""
    return Objective("S", "maximize", (Constraint("NS_loss", "<=", float(max_ns_loss)),))


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
    objective: Objective
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
    @property
    def editor(self) -> str:
        """The registry name (kept for callers of the editors-only version)."""
        return self.method

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
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise WorkbenchError(f"setting {key}={raw}: expected a non-negative number")
            out[key] = value
        return out

    def check_objective(self, objective: Objective) -> None:
        known = self.metric_names()
        for m in [objective.metric] + [c.metric for c in objective.constraints]:
            if m not in known:
                raise WorkbenchError(f"{self.name} reports no metric {m!r}; its metrics: {', '.join(known)}")


def _int_setting(settings: Mapping[str, Any], key: str, *, low: int = 1) -> int:
    v = int(settings[key])
    if v < low:
        raise WorkbenchError(f"setting {key}={v}: expected at least {low}")
    return v


# knowledge editors ---------------------------------------------------------------------------

def _rome_space(n_layers: int) -> tuple[Param, ...]:
    return (Param("layer", "int", 0, n_layers - 1),
            Param("fact_token", "categorical", choices=("subject_last", "prompt_last")),
            Param("v_lr", "float", 0.05, 2.0, log=True),
            Param("v_steps", "int", 5, 40),
            Param("kl_factor", "float", 0.01, 1.0, log=True),
            Param("clamp_norm_factor", "float", 0.5, 8.0, log=True),
            Param("n_prefixes", "categorical", choices=(0, 5, 10)),
            Param("mom2_adjustment", "categorical", choices=(True, False)))


def _memit_space(n_layers: int) -> tuple[Param, ...]:
    return (Param("last_layer", "int", 0, n_layers - 1), Param("width", "int", 1, n_layers),
            Param("fact_token", "categorical", choices=("subject_last", "prompt_last")),
            Param("clamp_norm_factor", "float", 0.25, 4.0, log=True),
            Param("v_steps", "int", 10, 40),
            Param("n_prefixes", "categorical", choices=(0, 5, 10)))


def _ft_space(n_layers: int) -> tuple[Param, ...]:
    return (Param("layer", "int", 0, n_layers - 1), Param("lr", "float", 1e-4, 1e-1, log=True),
            Param("steps", "int", 5, 50))


def _ftl_space(n_layers: int) -> tuple[Param, ...]:
    return _ft_space(n_layers) + (Param("epsilon", "float", 1e-3, 0.5, log=True),)


def _kn_space(n_layers: int) -> tuple[Param, ...]:
    return (Param("strength", "float", 0.1, 20.0, log=True), Param("threshold", "float", 0.05, 0.5),
            Param("max_neurons", "int", 1, 20), Param("steps", "categorical", choices=(5, 10, 20)))


KNOWLEDGE_METRICS = (("S", "CounterFact score (harmonic mean of ES, PS, NS), percent"),
                     ("ES", "efficacy: the new target beats the true one on the rewrite prompt, percent"),
                     ("PS", "paraphrase success, percent"), ("NS", "neighborhood success (untouched facts), percent"),
                     ("NS_loss", "unedited NS minus edited NS, points"), ("refused", "edits the editor refused"))


@dataclass(frozen=True)
class EditorTunable(Tunable):
    """A knowledge editor on FactGPT's CounterFact-format rewrites (one at a time, or one batch)."""

    space_of: Callable[[int], tuple[Param, ...]] = _rome_space
    batch: bool = False

    def space(self, handle: Any) -> tuple[Param, ...]:
        return self.space_of(handle.arch.n_layers)

    def to_options(self, values: Mapping[str, Any]) -> dict[str, Any]:
        v = dict(values)
        if "last_layer" in v:  # MEMIT: a window of layers ending at last_layer
            last, width = int(v.pop("last_layer")), int(v.pop("width"))
            v["layers"] = tuple(range(max(0, last - width + 1), last + 1))
        return {**dict(self.fixed), **v}

    def prepare(self, handle: Any, settings: Mapping[str, Any], seed: int) -> dict[str, Any]:
        from workbench.counterfact import aggregate_cases
        from workbench.edit_eval import rewrites_for, unedited

        n = _int_setting(settings, "cases")
        rewrites = rewrites_for(handle, n, seed=500 + seed)
        base = aggregate_cases(unedited(handle, rewrites))
        return {"handle": handle, "rewrites": rewrites, "baseline": {k: base[k] for k in ("S", "ES", "PS", "NS")}}

    def evaluate(self, state: Any, options: Mapping[str, Any]) -> dict[str, float]:
        return evaluate_options(state["handle"], self, options, state["rewrites"], state["baseline"])


def evaluate_options(handle: Any, tunable: EditorTunable, options: Mapping[str, Any], rewrites: Sequence[Any],
                     baseline: Mapping[str, Any]) -> dict[str, float]:
    """Fit with `options`, score; S, ES, PS, NS (percent) and NS_loss against the unedited model."""
    import editors  # noqa: F401
    from editors.registry import get
    from workbench.counterfact import aggregate_cases
    from workbench.edit_eval import edit_batch, edit_each

    try:
        editor = get(tunable.method)(**options)
    except (WorkbenchError, TypeError) as exc:
        raise WorkbenchError(f"invalid options for {tunable.method}: {exc}") from exc
    if tunable.batch:
        rows, _ = edit_batch(handle, editor, rewrites)
    else:
        rows = edit_each(handle, editor, rewrites)
    agg = aggregate_cases(rows)
    out = {k: float(agg[k] or 0.0) for k in ("S", "ES", "PS", "NS")}
    out["NS_loss"] = float(baseline["NS"] or 0.0) - out["NS"]
    out["refused"] = float(sum(bool(r.get("refused")) for r in rows))
    return out


def _knowledge(name: str, space_of: Callable[[int], tuple[Param, ...]], *, batch: bool = False,
               fixed: tuple[tuple[str, Any], ...] = ()) -> EditorTunable:
    return EditorTunable(name=name, kind="editor", method=name, model="zoo:factgpt",
                         summary=f"{name} on FactGPT rewrites (CounterFact metrics)", objective=objective_for(2.0),
                         metrics=KNOWLEDGE_METRICS, settings=(("cases", 10),), fixed=fixed, space_of=space_of,
                         batch=batch)


# ShapesNet helpers ---------------------------------------------------------------------------

def _scenes(handle: Any, n: int, *, seed: int, exclude: str | None = None, correct_only: bool = False) -> tuple[Any, Any]:
    """`n` fresh ShapesWorld scenes (no context objects) of every class but `exclude`, rendered."""
    import torch

    from adversaries.classifier import predict
    from workbench.zoo.shapesnet import world_of

    world = world_of(handle)
    g = torch.Generator().manual_seed(seed)
    classes = [c for c in world.classes if c != exclude]
    s = world.sample(2 * n if correct_only else n, generator=g, classes=classes, context_mode="none")
    x = world.render(s)
    assert isinstance(x, torch.Tensor)
    y = s.labels
    if correct_only:
        keep = torch.nonzero(predict(handle, x)[0].cpu() == y).flatten()[:n]
        x, y = x[keep], y[keep]
    return x, y


# adversarial patch ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PatchTunable(Tunable):
    """A trained adversarial patch toward one class; scored on held-out images at fresh placements."""

    def space(self, handle: Any) -> tuple[Param, ...]:
        return (Param("patch_frac", "float", 0.1, 0.5), Param("steps", "int", 5, 300, log=True),
                Param("lr", "float", 0.01, 0.5, log=True), Param("rotation_max", "float", 0.0, 45.0))

    def prepare(self, handle: Any, settings: Mapping[str, Any], seed: int) -> dict[str, Any]:
        from adversaries.classifier import predict
        from workbench.zoo.shapesnet import world_of

        world = world_of(handle)
        target = world.class_index(str(settings["target"]))
        n_train, n_test = _int_setting(settings, "n_train", low=2), _int_setting(settings, "n_heldout", low=2)
        x_tr, y_tr = _scenes(handle, n_train, seed=700 + seed, exclude=world.classes[target], correct_only=True)
        x_te, _ = _scenes(handle, n_test, seed=800 + seed, exclude=world.classes[target], correct_only=True)
        base = float((predict(handle, x_te)[0].cpu() == target).float().mean())
        return {"handle": handle, "target": target, "train": (x_tr, y_tr), "heldout": x_te, "seed": seed,
                "placements": _int_setting(settings, "eval_placements"),
                "baseline": {"target": world.classes[target], "success_unpatched": base, "n_train": len(x_tr),
                             "n_heldout": len(x_te)}}

    def evaluate(self, state: Any, options: Mapping[str, Any]) -> dict[str, float]:
        import torch

        import adversaries  # noqa: F401
        from adversaries.adversarial_patch import apply_patch, sample_placements
        from adversaries.classifier import predict, preprocess_of
        from adversaries.registry import get

        handle = state["handle"]
        try:
            gen = get(self.method)(**{**options, "seed": state["seed"]})
        except (WorkbenchError, TypeError) as exc:
            raise WorkbenchError(f"invalid options for {self.method}: {exc}") from exc
        ae = gen.generate(handle, state["train"], state["target"])
        pre = preprocess_of(handle)
        patch = ae.patch
        x = state["heldout"]
        side = int(patch.shape[-1])
        g = torch.Generator().manual_seed(state["seed"] + 4241)
        lo, hi = pre.input_range
        noise = lo + (hi - lo) * torch.rand(patch.shape, generator=g)
        hits, ctrl = [], []
        for _ in range(state["placements"]):
            pl = sample_placements(len(x), height=pre.height, width=pre.width, patch_hw=(side, side), generator=g,
                                   scale_range=gen.scale_range, rotation_max=gen.rotation_max)
            hits.append(float((predict(handle, apply_patch(x, patch, pl, shape=gen.shape)[0])[0].cpu()
                               == state["target"]).float().mean()))
            ctrl.append(float((predict(handle, apply_patch(x, noise, pl, shape=gen.shape)[0])[0].cpu()
                               == state["target"]).float().mean()))
        success = sum(hits) / len(hits)
        control = sum(ctrl) / len(ctrl)
        return {"success_heldout": success, "control_noise_heldout": control, "success_minus_noise": success - control,
                "success_train": float(ae.extra.get("success_random_placement", ae.success_rate)),
                "area": side * side / (pre.height * pre.width), "patch_side_px": float(side),
                "diverged": float(bool(ae.extra.get("diverged")))}


# copy/paste ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CopyPasteTunable(Tunable):
    """The copy/paste protocol (Activation Atlas) toward one class, on fresh source scenes."""

    def space(self, handle: Any) -> tuple[Param, ...]:
        return (Param("size", "float", 0.15, 0.45), Param("n_units", "int", 1, 32, log=True),
                Param("featvis_steps", "int", 8, 256, log=True), Param("n_featvis", "int", 1, 6),
                Param("n_exemplars", "int", 0, 4), Param("design", "categorical", choices=("auto", "featvis", "exemplar")),
                Param("grid", "int", 2, 5))

    def to_options(self, values: Mapping[str, Any]) -> dict[str, Any]:
        v = {**dict(self.fixed), **values}
        if "size" in v:
            v["sizes"] = (float(v.pop("size")),)
        return v

    def prepare(self, handle: Any, settings: Mapping[str, Any], seed: int) -> dict[str, Any]:
        from workbench.zoo.shapesnet import world_of

        world = world_of(handle)
        target = world.class_index(str(settings["target"]))
        x, y = _scenes(handle, _int_setting(settings, "n_images", low=8), seed=600 + seed, exclude=world.classes[target])
        return {"handle": handle, "target": target, "images": x, "labels": y, "seed": seed,
                "n_pool": _int_setting(settings, "n_pool", low=16), "classes": tuple(world.classes),
                "baseline": {"target": world.classes[target], "n_images": len(x)}}

    def evaluate(self, state: Any, options: Mapping[str, Any]) -> dict[str, float]:
        import adversaries  # noqa: F401
        from adversaries.registry import get

        try:
            cfg = get(self.method)(**{"n_pool": state["n_pool"], **options, "seed": state["seed"]})
        except (WorkbenchError, TypeError) as exc:
            raise WorkbenchError(f"invalid options for {self.method}: {exc}") from exc
        r = cfg.run_protocol(state["handle"], state["images"], state["labels"], state["target"],
                             class_names=state["classes"])
        return {"success_best": r["success_best"], "success_consistent": r["success_consistent"],
                "control_noise": r["control_noise"], "control_natural": r["control_natural"],
                "best_minus_noise": r["success_best"] - r["control_noise"],
                "best_minus_natural": r["success_best"] - r["control_natural"],
                "p_target_best": r["p_target_best"], "n_attempts": float(r["n_attempts"]),
                "trojan_trigger": float(r["feature_kind"] == "trojan trigger")}


# trojan surgery (unit ablation) --------------------------------------------------------------

@dataclass(frozen=True)
class AblateTunable(Tunable):
    """Unit ablation as trojan surgery (`editors.unit_ablation.trojan_surgery`) for one trojan."""

    def space(self, handle: Any) -> tuple[Param, ...]:
        from editors.unit_ablation import SURGERY_SITES

        return (Param("site", "categorical", choices=SURGERY_SITES), Param("n_units", "int", 1, 32),
                Param("method", "categorical", choices=("activation_difference", "dissection", "attribution")),
                Param("value", "categorical", choices=("mean", "zero")))

    def validate(self, searched: Sequence[Param], pinned: Mapping[str, Any], state: Any) -> None:
        n_units = next((p for p in searched if p.name == "n_units"), None)
        low = n_units.low if n_units is not None else pinned.get("n_units")
        sites = [pinned["site"]] if "site" in pinned else list(next(p for p in searched if p.name == "site").choices)
        caps = {s: max(1, state["widths"][s] // 2) for s in sites}
        if low is not None and all(low > c for c in caps.values()):
            raise WorkbenchError(f"n_units >= {low:g} leaves too few units for the random control (as many units, "
                                 f"disjoint from the selected ones) at {', '.join(sites)}: at most "
                                 f"{', '.join(f'{c} at {s}' for s, c in caps.items())}")

    def suggest(self, trial: Any, searched: Sequence[Param], pinned: Mapping[str, Any], state: Any) -> dict[str, Any]:
        """`n_units` goes up to half the chosen site's width, so the random-unit control (as many
        units, disjoint from the selected ones) can always be drawn; no trial is spent failing."""
        values: dict[str, Any] = {}
        by_name = {p.name: p for p in searched}
        if "site" in by_name:
            values["site"] = by_name["site"].suggest(trial)
        site = values.get("site", pinned.get("site"))
        for p in searched:
            if p.name == "site":
                continue
            if p.name == "n_units" and site is not None:
                cap = max(1, state["widths"][site] // 2)
                if p.low is not None and p.low > cap:
                    raise WorkbenchError(f"n_units >= {p.low:g} leaves too few units at {site} "
                                         f"({state['widths'][site]}) for the random control; at most {cap}")
                p = replace(p, high=min(p.high, cap))  # type: ignore[type-var]
            values[p.name] = p.suggest(trial)
        return values

    def prepare(self, handle: Any, settings: Mapping[str, Any], seed: int) -> dict[str, Any]:
        from editors.unit_ablation import SURGERY_SITES
        from workbench.unit_selection import site_units
        from workbench.zoo.shapesnet import world_of

        world = world_of(handle)
        name = str(settings["trojan"])
        names = [t.name for t in world.trojans]
        if name not in names:
            raise WorkbenchError(f"unknown trojan {name!r}; this model's trojans: {', '.join(names)}")
        sizes = {k: _int_setting(settings, k) for k in ("n_select", "n_eval", "n_clean", "n_ref", "n_random_draws")}
        return {"handle": handle, "trojan": name, "seed": 900 + seed, "sizes": sizes,
                "widths": {s: site_units(handle, s) for s in SURGERY_SITES}, "baseline": {"trojan": name}}

    def evaluate(self, state: Any, options: Mapping[str, Any]) -> dict[str, float]:
        from editors.unit_ablation import trojan_surgery

        opts = dict(options)
        r = trojan_surgery(state["handle"], state["trojan"], n_units=int(opts.pop("n_units")),
                           site=str(opts.pop("site")), seed=state["seed"], progress=False, **state["sizes"], **opts)
        state["baseline"].update({"asr_before": r["asr_before"], "clean_before": r["clean_before"]})
        return {"asr_after": r["asr_after"], "asr_before": r["asr_before"],
                "asr_relative_cut": float(r["asr_relative_cut"] if r["asr_relative_cut"] is not None else 0.0),
                "clean_after": r["clean_after"], "clean_drop": 100.0 * r["clean_drop"],
                "random_asr_after": r["random_asr_after"], "random_gap": r["random_asr_after"] - r["asr_after"]}


SHAPES_PATCH_METRICS = (
    ("success_heldout", "share of held-out non-target images classified as the target with the patch, fresh placements"),
    ("control_noise_heldout", "same with a uniform-noise patch of the same size and placements"),
    ("success_minus_noise", "success_heldout minus the noise control"),
    ("success_train", "success on the training images (the generator's own evaluation)"),
    ("area", "patch area as a share of the image area"), ("patch_side_px", "patch side in pixels"),
    ("diverged", "1 when the optimization diverged"))
COPY_PASTE_METRICS = (
    ("success_best", "best-placement success on the test split (Activation Atlas protocol)"),
    ("success_consistent", "consistent-placement success"), ("control_noise", "noise patch, best placement"),
    ("control_natural", "random natural crop, best placement"), ("best_minus_noise", "success_best - control_noise"),
    ("best_minus_natural", "success_best - control_natural"), ("p_target_best", "target probability, best placement"),
    ("n_attempts", "test images that count"), ("trojan_trigger", "1 when the chosen design is an implanted trigger"))
ABLATE_METRICS = (
    ("asr_after", "attack success rate after the edit (fresh triggered scenes)"),
    ("asr_before", "attack success rate before"), ("asr_relative_cut", "1 - after/before"),
    ("clean_after", "clean accuracy after the edit"), ("clean_drop", "clean accuracy drop, points"),
    ("random_asr_after", "attack success after removing as many random units (control)"),
    ("random_gap", "random_asr_after - asr_after"))


TUNABLES: dict[str, Tunable] = {
    "rome": _knowledge("rome", _rome_space, fixed=(("on_degenerate", "clamp"),)),
    "memit": _knowledge("memit", _memit_space, batch=True),
    "ft": _knowledge("ft", _ft_space),
    "ft-l": _knowledge("ft-l", _ftl_space),
    "kn": _knowledge("kn", _kn_space, fixed=(("mode", "replace"),)),
    "adversarial-patch": PatchTunable(
        name="adversarial-patch", kind="adversary", method="adversarial-patch", model="zoo:shapesnet",
        summary="trained adversarial patch toward a class, scored on held-out ShapesNet images",
        objective=Objective("success_heldout", "maximize", (Constraint("area", "<=", 0.09),)),
        metrics=SHAPES_PATCH_METRICS,
        settings=(("target", "star"), ("n_train", 32), ("n_heldout", 64), ("eval_placements", 4)),
        fixed=(("batch_size", 32),)),
    "copy-paste": CopyPasteTunable(
        name="copy-paste", kind="adversary", method="copy-paste", model="zoo:shapesnet",
        summary="copy/paste patches designed from an interpretation of the target (Activation Atlas protocol)",
        objective=Objective("success_best", "maximize", (Constraint("best_minus_noise", ">=", 0.05),)),
        metrics=COPY_PASTE_METRICS, settings=(("target", "star"), ("n_images", 96), ("n_pool", 256))),
    "ablate": AblateTunable(
        name="ablate", kind="editor", method="ablate", model="zoo:shapesnet",
        summary="trojan surgery: replace the units selected for a trojan (weight edit), ShapesNet",
        objective=Objective("asr_after", "minimize", (Constraint("clean_drop", "<=", 1.0),)),
        metrics=ABLATE_METRICS,
        settings=(("trojan", "patch-universal"), ("n_select", 64), ("n_eval", 200), ("n_clean", 400), ("n_ref", 200),
                  ("n_random_draws", 1))),
}


def resolve_target(target: str) -> Tunable:
    """A tunable's name, or a study (name, number) whose action is tuned (`CaseStudy.tune_target`)."""
    if target in TUNABLES:
        return TUNABLES[target]
    import case_studies

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


def _confirm(tunable: Tunable, handle: Any, settings: Mapping[str, Any], seed: int, objective: Objective,
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
    target: str,
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

    tunable = resolve_target(target)
    if n_trials < 1:
        raise WorkbenchError(f"n_trials={n_trials}: expected at least 1")
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
    out = Path(out) if out is not None else Path(f"runs/tune-{tunable.name}")
    handle = load(tunable.model, device=device, progress=progress)
    searched, pinned = restrict(tunable.space(handle), fixed=fixed, ranges=ranges)
    statement = _canonical({
        "target": tunable.name, "kind": tunable.kind, "method": tunable.method, "model": tunable.model,
        "objective": objective.to_json(), "settings": sets, "seed": seed, "fixed": pinned,
        "space": [p.to_json() for p in searched], "space_text": [p.text() for p in searched],
        "method_defaults": dict(tunable.fixed)})
    digest = hashlib.sha256(json.dumps(statement, sort_keys=True).encode()).hexdigest()[:10]
    name = study_name or f"{tunable.name}-{digest}-seed{seed}"
    if announce is not None:
        announce(statement_text(statement))
    state = tunable.prepare(handle, sets, seed)
    tunable.validate(searched, pinned, state)
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
