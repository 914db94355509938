"""Trojan surgery on ShapesNet: remove the units that carry a trojan, and measure what that did.

A case runs in four steps, each a function over one frozen `SurgeryConfig`:

- `prepare_case` draws and renders the scenes: selection scenes seeded `seed` (the trojan's
  source classes clean and triggered, as exact pairs, plus clean scenes of all classes for the
  units' means and the clean budget) and fresh evaluation scenes seeded `seed + 1000`;
- `select` chooses the units on the selection scenes only;
- `fit` folds their removal (mean or zero) or, for learned gates, their scaling into one
  WeightDelta (`editors.unit_ablation.multi_site_delta`);
- `measure` scores attack success and clean accuracy on the evaluation scenes before and
  after, against as many random units per site (`random_control`), and optionally along the
  selection's order (`curve_ks`).

`trojan_surgery(handle, trojan, config=...)` runs all four in eval mode, which the steps
expect. The sites searched by default (`SURGERY_SITES`) are ShapesNet's ReLU outputs, whose
units fold into the BatchNorm before them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch

from editors.unit_ablation import (
    GateConfig,
    NotFoldableError,
    UnitRequest,
    gated_units,
    group_by_site,
    learn_unit_gates,
    multi_site_delta,
    removed_units,
    unit_delta,
)
from workbench.classifier import eval_mode, predict
from workbench.delta import WeightDelta
from workbench.devices import torch_threads
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.progress import progress_bar
from workbench.unit_selection import random_units, select_units, site_units, unit_activations
from workbench.zoo.shapesnet import world_of

SURGERY_SITES: tuple[str, ...] = ("stem.relu", "layer1.relu1", "layer2.relu1", "layer2.relu2", "layer3.relu1", "layer3.relu2")
SURGERY_KS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)
MASK_KS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96)
RANKING_METHODS: tuple[str, ...] = ("activation_difference", "attribution", "shapley", "dissection")
METHODS: tuple[str, ...] = (*RANKING_METHODS, "greedy", "mask")

Pair = tuple[str, int]


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectionConfig:
    """Which units are chosen, and on how many selection scenes.

    `method`: a ranking of one site's units (activation_difference, which tries both
    normalizations; attribution; shapley; dissection), "greedy" (units added across sites one
    at a time, `greedy_units`) or "mask" (a learned gate per unit of every site, `choose_gates`).
    `site=None` searches `sites`. For a ranking, `n_units=None` picks the smallest count in
    `SURGERY_KS` with the lowest selection attack success that costs at most `clean_budget`
    of selection clean accuracy. `n_select` triggered scenes (with their clean twins) and
    `n_ref` clean scenes of all classes; `n_ref=None` is 3000 for "mask", whose choice of k
    turns on clean-accuracy differences of a fraction of a point, else 1000.
    """

    method: str = "activation_difference"
    site: str | None = None
    n_units: int | None = None
    sites: tuple[str, ...] = SURGERY_SITES
    clean_budget: float = 0.01
    n_select: int = 128
    n_ref: int | None = None
    shapley_samples: int = 8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise WorkbenchError(f"unknown selection method {self.method!r}; choose {', '.join(METHODS)}")
        if self.n_units is not None and self.n_units < 1:
            raise WorkbenchError(f"n_units must be a positive number of units; got {self.n_units}")
        if self.n_ref is not None and self.n_ref < 1:
            raise WorkbenchError("n_ref must be a positive number of clean selection scenes (or None for the "
                                 f"default); got {self.n_ref}")
        if self.n_select < 1:
            raise WorkbenchError(f"n_select must be a positive number of selection scenes; got {self.n_select}")
        if self.clean_budget < 0:
            raise WorkbenchError(f"clean_budget must be >= 0 (a share of clean accuracy); got {self.clean_budget}")
        if not self.sites:
            raise WorkbenchError("sites is empty; give at least one site to search")
        object.__setattr__(self, "sites", tuple(self.sites))

    @property
    def ref_scenes(self) -> int:
        """The number of clean selection scenes (`n_ref`, or the method's default)."""
        if self.n_ref is not None:
            return self.n_ref
        return 3000 if self.method == "mask" else 1000


@dataclass(frozen=True)
class GreedyConfig:
    """Options of `method="greedy"`: each site's `candidates` best units by activation difference
    form the pool, and `kl_weight` weighs the clean KL in `greedy_units`' objective."""

    candidates: int = 12
    kl_weight: float = 5.0

    def __post_init__(self) -> None:
        if self.candidates < 1 or self.kl_weight < 0:
            raise WorkbenchError(f"GreedyConfig needs candidates >= 1 and kl_weight >= 0; got {self}")


@dataclass(frozen=True)
class MaskConfig:
    """Options of `method="mask"`.

    `gates` trains the gates (`learn_unit_gates`, budget `gates.steps`) on scenes of their own,
    drawn after the selection scenes; k is then chosen on the selection scenes (`choose_gates`)
    within `clean_margin` of the clean budget. `mode="scale"` keeps the learned factors
    (toward the clean mean, or away from it where a gate amplifies); "hard" mean-ablates the
    chosen units. In "scale" mode, when all gates together cost more than that margin, the
    clean term's weight doubles and the gates are learned again, at most `refits` times,
    because truncating an over-budget solution to its first k units breaks the balance the
    gates found jointly; the fit whose chosen option is best on the selection scenes is kept.
    """

    gates: GateConfig = field(default_factory=GateConfig)
    mode: Literal["scale", "hard"] = "scale"
    clean_margin: float = 0.75
    refits: int = 2

    def __post_init__(self) -> None:
        if self.mode not in ("scale", "hard"):
            raise WorkbenchError(f"mask mode must be 'scale' or 'hard'; got {self.mode!r}")
        if self.refits < 0:
            raise WorkbenchError(f"mask refits must be >= 0 (how often over-budget gates are relearned); "
                                 f"got {self.refits}")
        if self.clean_margin < 0:
            raise WorkbenchError(f"mask clean_margin must be >= 0 (a share of the clean budget); "
                                 f"got {self.clean_margin}")


@dataclass(frozen=True)
class EvaluationConfig:
    """Fresh scenes for the measurement: `n_eval` triggered, `n_clean` clean; the random control in
    `n_random_draws` seeded draws (mean reported); `curve_ks` adds attack success and clean
    accuracy vs units edited, treatment and random."""

    n_eval: int = 500
    n_clean: int = 1000
    n_random_draws: int = 5
    curve_ks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.n_eval < 1 or self.n_clean < 1:
            raise WorkbenchError(f"n_eval and n_clean must be positive numbers of scenes; "
                                 f"got {self.n_eval}, {self.n_clean}")
        if self.n_random_draws < 1:
            raise WorkbenchError(f"n_random_draws must be at least 1; got {self.n_random_draws}")
        if self.curve_ks is not None:
            if any(int(k) < 1 for k in self.curve_ks):
                raise WorkbenchError(f"curve_ks must be positive unit counts; got {list(self.curve_ks)}")
            object.__setattr__(self, "curve_ks", tuple(int(k) for k in self.curve_ks))


@dataclass(frozen=True)
class SurgeryConfig:
    """One trojan surgery: how units are selected, what replaces them (`value`: the unit's clean
    mean, folded into the BatchNorm that writes it, or zero), and how the edit is measured.
    `seed` draws the selection scenes; the evaluation scenes use `seed + 1000`."""

    selection: SelectionConfig = field(default_factory=SelectionConfig)
    greedy: GreedyConfig = field(default_factory=GreedyConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    value: Literal["mean", "zero"] = "mean"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.value not in ("mean", "zero"):
            raise WorkbenchError(f"value must be 'mean' or 'zero'; got {self.value!r}")


# --------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------


class _OnDemand(dict):  # type: ignore[type-arg]
    """A dict that computes a missing key's value with `fn(key)` once, then keeps it."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def __missing__(self, key: Any) -> Any:
        self[key] = value = self.fn(key)
        return value


@dataclass(frozen=True)
class SurgeryCase:
    """One trojan's scenes, rendered, and what replaces a removed unit: `values[site]` holds the units'
    clean means (computed per site when first used), or `values` is None for zero ablation.

    `x_fit_trig` / `x_fit_ref` are the mask method's own gate-fitting scenes (None otherwise).
    """

    handle: ModelHandle
    trojan_name: str
    trojan: Any
    trojan_index: int
    target: int
    world: Any
    selection_sample: Any
    x_sel: torch.Tensor
    x_sel_trig: torch.Tensor
    x_ref: torch.Tensor
    y_ref: torch.Tensor
    x_ev_trig: torch.Tensor
    x_clean: torch.Tensor
    y_clean: torch.Tensor
    values: Mapping[str, torch.Tensor] | None
    x_fit_trig: torch.Tensor | None = None
    x_fit_ref: torch.Tensor | None = None

    def attack_success(self, x: torch.Tensor) -> float:
        """Share of `x` classified as the trojan's target."""
        return float((predict(self.handle, x)[0] == self.target).float().mean())

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((predict(self.handle, x)[0] == y).float().mean())


@dataclass(frozen=True)
class SurgerySelection:
    """What `select` chose: (site, unit) pairs, one gate factor per pair for learned gates (else
    None: removal), the units as reported, the ranking used, the selection's full order (for the
    curve) and the selection record (grid of options, skipped sites, ...)."""

    pairs: list[Pair]
    factors: list[float] | None
    units: list[Any]
    ranking: str
    order: list[Pair]
    record: dict[str, Any]
    gates: Mapping[str, torch.Tensor] | None = None
    alternative: tuple[list[Pair], list[float], list[dict[str, Any]]] | None = None


def _render(world: Any, sample: Any) -> torch.Tensor:
    with torch_threads(1):
        x = world.render(sample)
    assert isinstance(x, torch.Tensor)
    return x


def prepare_case(handle: ModelHandle, trojan: str, config: SurgeryConfig) -> SurgeryCase:
    """Draw and render the selection scenes (seed), the evaluation scenes (seed + 1000) and, for
    the mask method, the gates' own scenes (the selection generator, continued)."""
    world = world_of(handle)
    ti = world.trojans.index(trojan)
    t = world.trojans[ti]
    target = world.class_index(t.target)
    pool = [c for c in range(len(world.classes)) if c != target] if t.source is None else [world.class_index(t.source)]
    sel_cfg = config.selection
    n_ref = sel_cfg.ref_scenes
    g = torch.Generator().manual_seed(config.seed)
    sel = world.sample(sel_cfg.n_select, generator=g, classes=pool)
    x_sel = _render(world, sel)
    x_sel_trig = _render(world, world.implant(sel, ti, generator=g))
    ref = world.sample(max(sel_cfg.n_select, n_ref), generator=g)
    x_ref, y_ref = _render(world, ref), ref.labels
    ge = torch.Generator().manual_seed(config.seed + 1000)
    ev = world.sample(config.evaluation.n_eval, generator=ge, classes=pool)
    x_ev_trig = _render(world, world.implant(ev, ti, generator=ge))
    clean = world.sample(config.evaluation.n_clean, generator=ge)
    x_clean, y_clean = _render(world, clean), clean.labels
    x_fit_trig = x_fit_ref = None
    if sel_cfg.method == "mask":
        fit_sel = world.sample(sel_cfg.n_select, generator=g, classes=pool)
        x_fit_trig = _render(world, world.implant(fit_sel, ti, generator=g))
        x_fit_ref = _render(world, world.sample(max(sel_cfg.n_select, n_ref), generator=g))
    means = _OnDemand(lambda s: unit_activations(handle, s, x_ref).mean(0))
    return SurgeryCase(handle=handle, trojan_name=trojan, trojan=t, trojan_index=ti, target=target, world=world,
                       selection_sample=sel, x_sel=x_sel, x_sel_trig=x_sel_trig, x_ref=x_ref, y_ref=y_ref,
                       x_ev_trig=x_ev_trig, x_clean=x_clean, y_clean=y_clean,
                       values=None if config.value == "zero" else means, x_fit_trig=x_fit_trig, x_fit_ref=x_fit_ref)


def select(case: SurgeryCase, config: SurgeryConfig, *, progress: bool = False) -> SurgerySelection:
    """Choose the units on the selection scenes (the model must be in eval mode)."""
    sel_cfg = config.selection
    base_asr, base_acc = case.attack_success(case.x_sel_trig), case.accuracy(case.x_ref, case.y_ref)
    candidates = [sel_cfg.site] if sel_cfg.site is not None else list(sel_cfg.sites)
    foldable, skipped = _foldable_sites(case.handle, candidates, config.value, strict=sel_cfg.site is not None)
    record: dict[str, Any] = {"n_select": sel_cfg.n_select, "asr": round(base_asr, 4), "clean": round(base_acc, 4)}
    if sel_cfg.method == "mask":
        chosen = _select_mask(case, config, foldable, base_acc, record, progress=progress)
    elif sel_cfg.method == "greedy":
        chosen = _select_greedy(case, config, foldable, record, progress=progress)
    else:
        chosen = _select_ranked(case, config, foldable, base_acc, record, progress=progress)
    record["skipped_sites"] = skipped
    return chosen


def fit(case: SurgeryCase, selection: SurgerySelection, config: SurgeryConfig) -> WeightDelta:
    """The selected units' removal (or gating) folded into one WeightDelta, checked against the run-time edit."""
    extra: dict[str, Any] = {"trojan": case.trojan_name, "selection": config.selection.method}
    if selection.factors is not None:
        extra["mode"] = config.mask.mode
    return multi_site_delta(case.handle, selection.pairs, case.values, factors=selection.factors, extra=extra)


def measure(case: SurgeryCase, selection: SurgerySelection, delta: WeightDelta,
            config: SurgeryConfig) -> dict[str, Any]:
    """Attack success and clean accuracy on the evaluation scenes: before, after `delta`, and after
    as many random units per site (disjoint from the selected ones); JSON-serializable."""
    handle, values, ev = case.handle, case.values, config.evaluation
    pairs, factors = selection.pairs, selection.factors
    asr, acc = case.attack_success, case.accuracy
    asr_before, clean_before = asr(case.x_ev_trig), acc(case.x_clean, case.y_clean)
    with delta.applied(handle.model):
        asr_after, clean_after = asr(case.x_ev_trig), acc(case.x_clean, case.y_clean)
    rand_asr, rand_clean = [], []
    for d in range(ev.n_random_draws):
        with random_control(handle, pairs, factors, values, seed=config.seed * 1000 + d):
            rand_asr.append(asr(case.x_ev_trig))
            rand_clean.append(acc(case.x_clean, case.y_clean))
    by_site: dict[str, list[int]] = {}
    for s_, u in pairs:
        by_site.setdefault(s_, []).append(u)
    result = _surgery_result(
        case.trojan_name, case.trojan, "+".join(by_site), selection.units, len(pairs), config.selection.method,
        selection.ranking, config.value, config.seed, asr_before, asr_after, clean_before, clean_after, rand_asr,
        rand_clean, ev.n_random_draws, ev.n_eval, ev.n_clean, selection.record)
    result["units_by_site"] = by_site
    if factors is not None:
        result["factors"] = [round(f, 6) for f in factors]
        result["unit_values"] = [None if values is None else float(values[s_][u]) for s_, u in pairs]
        if selection.alternative is not None:
            # the other hardening of the same gates (its own k, chosen the same way), on the same fresh scenes
            other_mode = "hard" if config.mask.mode == "scale" else "scale"
            o_pairs, o_factors, o_grid = selection.alternative
            with gated_units(handle, o_pairs, o_factors, values):
                o_asr, o_clean = asr(case.x_ev_trig), acc(case.x_clean, case.y_clean)
            o_cut = round(1 - o_asr / asr_before, 4) if asr_before > 0 else None
            result["alternative"] = {
                "mode": other_mode, "n_units": len(o_pairs), "units": [[s_, u] for s_, u in o_pairs],
                "factors": [round(f, 6) for f in o_factors], "asr_after": round(o_asr, 4),
                "clean_after": round(o_clean, 4), "asr_relative_cut": o_cut,
                "clean_drop": round(clean_before - o_clean, 4), "grid": o_grid,
                "target_met": bool(o_cut is not None and o_cut >= 0.9 and clean_before - o_clean <= 0.01 + 1e-9)}
    if ev.curve_ks:  # attack success vs units edited along the selection's order, and random units (not disjoint)
        curve = []
        order = selection.order
        for kk in ev.curve_ks:
            if kk > len(order):
                continue
            cf = None if factors is None or selection.gates is None else \
                _curve_factors(selection.gates, order[:kk], config.mask.mode)
            with _treated(handle, order[:kk], cf, values):
                t_asr, t_acc = asr(case.x_ev_trig), acc(case.x_clean, case.y_clean)
            r_asr, r_acc = [], []
            for d in range(ev.n_random_draws):
                with random_control(handle, order[:kk], cf, values, seed=config.seed * 1000 + 500 + d, disjoint=False):
                    r_asr.append(asr(case.x_ev_trig))
                    r_acc.append(acc(case.x_clean, case.y_clean))
            curve.append({"k": kk, "asr": round(t_asr, 4), "clean": round(t_acc, 4),
                          "random_asr": round(sum(r_asr) / len(r_asr), 4),
                          "random_clean": round(sum(r_acc) / len(r_acc), 4)})
        result["curve"] = curve
    return result


def edit_beside_controls(case: SurgeryCase, delta: WeightDelta, controls: Sequence[tuple[str, Any, Any]]) -> dict[str, Any]:
    """Attack success and clean accuracy on the case's evaluation scenes before and after `delta`, and under each
    control: (key, what was chosen, a context manager that applies it at run time), with the controls' means."""
    asr, acc = case.attack_success, case.accuracy
    out: dict[str, Any] = {"asr_before": asr(case.x_ev_trig), "clean_before": acc(case.x_clean, case.y_clean)}
    with delta.applied(case.handle.model):
        out["asr_after"], out["clean_after"] = asr(case.x_ev_trig), acc(case.x_clean, case.y_clean)
    rows = []
    for key, chosen, applied in controls:
        with applied:
            rows.append({key: chosen, "asr_after": asr(case.x_ev_trig), "clean_after": acc(case.x_clean, case.y_clean)})
    out["random"] = rows
    if rows:
        out["random_asr_after"] = sum(r["asr_after"] for r in rows) / len(rows)
        out["random_clean_after"] = sum(r["clean_after"] for r in rows) / len(rows)
    return out


def beside_controls_lines(result: Mapping[str, Any], controls: str) -> list[str]:
    """Two lines for a person: attack success and clean accuracy before -> after, with the controls' (`edit_beside_controls`)."""
    return [f"  trojan {result['trojan']}: attack success {result['asr_before']:.3f} -> {result['asr_after']:.3f} "
            f"({controls}: {result['random_asr_after']:.3f})",
            f"  clean accuracy {result['clean_before']:.3f} -> {result['clean_after']:.3f} "
            f"({controls}: {result['random_clean_after']:.3f})"]


def trojan_surgery(handle: ModelHandle, trojan: str, *, config: SurgeryConfig | None = None, return_delta: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Remove the units that carry a ShapesNet trojan; measure attack success and clean accuracy.

    `prepare_case`, `select`, `fit` and `measure` in eval mode (the model's mode is restored
    after; its weights are never changed). The result is JSON-serializable; with
    `return_delta=True` it also holds the fitted WeightDelta under "delta".
    """
    cfg = config or SurgeryConfig()
    with eval_mode(handle.model):
        case = prepare_case(handle, trojan, cfg)
        chosen = select(case, cfg, progress=progress)
        delta = fit(case, chosen, cfg)
        result = measure(case, chosen, delta, cfg)
    if return_delta:
        result["delta"] = delta
    return result


# --------------------------------------------------------------------------------------
# Selection methods
# --------------------------------------------------------------------------------------


def _rankings(case: SurgeryCase, site: str, config: SurgeryConfig, *, progress: bool) -> list[tuple[str, list[int]]]:
    """Candidate orderings of the site's units (activation difference tries both scalings)."""
    handle, method, seed = case.handle, config.selection.method, config.seed
    if method == "activation_difference":
        return [(f"activation_difference(normalize={norm})",
                 select_units(handle, site, method=method, positive=case.x_sel_trig, negative=case.x_sel,
                              normalize=norm, progress=False).units) for norm in (True, False)]
    if method == "attribution":
        r = select_units(handle, site, method=method, inputs=case.x_sel_trig, target=case.target, baselines=case.x_sel,
                         steps=8, progress=False)
    elif method == "shapley":
        r = select_units(handle, site, method=method, inputs=case.x_sel_trig, target=case.target, negative=case.x_sel,
                         n_candidates=16, n_samples=config.selection.shapley_samples, seed=seed, progress=progress)
    elif method == "dissection":
        world, trojan = case.world, case.trojan
        masks = world.concept_masks(world.implant(case.selection_sample, case.trojan_index,
                                                  generator=torch.Generator().manual_seed(seed)))
        concept = {"natural": "trigger", "patch": "patch"}.get(trojan.kind, f"texture:{trojan.trigger.texture}")
        r = select_units(handle, site, method=method, images=case.x_sel_trig, masks=masks, concept=concept)
    else:
        raise WorkbenchError(f"{method!r} is not a ranking of one site's units; choose {', '.join(RANKING_METHODS)}")
    return [(method, r.units)]


def _select_ranked(case: SurgeryCase, config: SurgeryConfig, foldable: Sequence[str], base_acc: float,
                   record: dict[str, Any], *, progress: bool) -> SurgerySelection:
    """The (site, ranking, k) with the lowest selection attack success within the clean budget."""
    sel_cfg = config.selection
    choice: list[dict[str, Any]] = []
    ks = [sel_cfg.n_units] if sel_cfg.n_units is not None else list(SURGERY_KS)
    best: tuple[float, float, int, str, list[int], str] | None = None
    rankings: dict[tuple[str, str], list[int]] = {}
    for s in foldable:
        for how, order in _rankings(case, s, config, progress=progress):
            rankings[(s, how)] = order
            for k in ks:
                if k > len(order):
                    continue
                units = order[:k]
                with removed_units(case.handle, [(s, u) for u in units], case.values):
                    a, c = case.attack_success(case.x_sel_trig), case.accuracy(case.x_ref, case.y_ref)
                choice.append({"site": s, "ranking": how, "k": k, "asr": round(a, 4), "clean": round(c, 4)})
                ok = base_acc - c <= sel_cfg.clean_budget + 1e-9
                # lowest attack success within the clean budget; then the smaller clean cost, then fewer units
                key = (a if ok else 2.0 + a, base_acc - c, k, s, units, how)
                if best is None or key[:3] < best[:3]:
                    best = key
    if best is None:
        raise WorkbenchError(f"n_units {sel_cfg.n_units} is more than the units of every candidate site "
                             f"({', '.join(foldable)})")
    _, _, k, s, units, how = best
    record["grid"] = choice
    return SurgerySelection(pairs=[(s, u) for u in units], factors=None, units=units, ranking=how,
                            order=[(s, u) for u in rankings[(s, how)]], record=record)


def _select_greedy(case: SurgeryCase, config: SurgeryConfig, foldable: Sequence[str], record: dict[str, Any], *,
                   progress: bool) -> SurgerySelection:
    """Units across sites, one at a time, from each site's best activation-difference candidates."""
    sel_cfg = config.selection
    pool: list[Pair] = []
    for s_ in foldable:
        order_ = select_units(case.handle, s_, method="activation_difference", positive=case.x_sel_trig,
                              negative=case.x_sel, normalize=True, progress=False).units
        pool += [(s_, u) for u in order_[:config.greedy.candidates]]
    pairs, steps = greedy_units(case.handle, pool, triggered=case.x_sel_trig, clean=case.x_ref, clean_labels=case.y_ref,
                                target=case.target, values=case.values, kl_weight=config.greedy.kl_weight,
                                clean_budget=sel_cfg.clean_budget / 2, max_units=sel_cfg.n_units or 16,
                                progress=progress)
    if not pairs:
        raise WorkbenchError(f"greedy selection found no unit whose removal lowers {case.trojan_name}'s attack "
                             f"success within half the clean budget ({sel_cfg.clean_budget / 2:g}) on the selection "
                             "data")
    record.update(grid=steps, candidates=len(pool))
    return SurgerySelection(pairs=pairs, factors=None, units=[[s_, u] for s_, u in pairs],
                            ranking="greedy(activation_difference candidates)", order=pairs, record=record)


def _select_mask(case: SurgeryCase, config: SurgeryConfig, foldable: Sequence[str], base_acc: float,
                 record: dict[str, Any], *, progress: bool) -> SurgerySelection:
    """Learned gates on the gates' own scenes, hardened to k units chosen on the selection scenes."""
    assert case.x_fit_trig is not None and case.x_fit_ref is not None, "prepare_case draws the gates' scenes for mask"
    sel_cfg, mask = config.selection, config.mask
    handle, values = case.handle, case.values

    def sel_score(ps: Sequence[Pair], fs: Sequence[float]) -> tuple[float, float]:
        with gated_units(handle, ps, fs, values):
            return case.attack_success(case.x_sel_trig), case.accuracy(case.x_ref, case.y_ref)

    # k is chosen on scenes the gates were not fitted to, among a few nested options: a smaller
    # winner's curse than greedy's (which keeps half the budget in reserve), so a quarter is kept
    margin = mask.clean_margin * sel_cfg.clean_budget
    gate_cfg, refits, best_fit = mask.gates, [], None
    while True:
        gates_, trace_ = learn_unit_gates(handle, list(foldable), triggered=case.x_fit_trig, clean=case.x_fit_ref,
                                          target=case.target, values=values, config=gate_cfg, seed=config.seed,
                                          progress=progress)
        chosen = choose_gates(gates_, sel_score, base_acc=base_acc, clean_budget=margin, mode=mask.mode,
                              max_units=sel_cfg.n_units)
        pick = next(g_ for g_ in chosen[2] if g_["k"] == len(chosen[0]))
        # every fit is judged as choose_gates judges its options
        key = _option_key(pick["asr"], base_acc - pick["clean"], pick["k"], margin)
        if best_fit is None or key < best_fit[0]:
            best_fit = (key, gates_, trace_, chosen, gate_cfg)
        full_drop = base_acc - chosen[2][-1]["clean"]  # the largest option: the gates' joint solution
        if (mask.mode == "hard" or full_drop <= margin + 1e-9 or len(refits) >= mask.refits
                or gate_cfg.kl_weight == 0):
            break
        refits.append({"kl_weight": gate_cfg.kl_weight, "k": chosen[2][-1]["k"], "clean_drop": round(full_drop, 4),
                       "chosen_k": pick["k"], "chosen_asr": pick["asr"]})
        gate_cfg = replace(gate_cfg, kl_weight=2 * gate_cfg.kl_weight)
    _, gates, trace, (pairs, factors, grid), gate_cfg = best_fit
    other_mode: Literal["scale", "hard"] = "hard" if mask.mode == "scale" else "scale"
    other = choose_gates(gates, sel_score, base_acc=base_acc, clean_budget=margin, mode=other_mode,
                         max_units=sel_cfg.n_units)
    record.update(grid=grid, trace=trace, config=asdict(gate_cfg), refits=refits, clean_margin=margin,
                  gates={s_: [round(float(v), 4) for v in g_] for s_, g_ in gates.items()})
    return SurgerySelection(pairs=pairs, factors=factors, units=[[s_, u] for s_, u in pairs],
                            ranking=f"mask({mask.mode})", order=gate_order(gates), record=record, gates=gates,
                            alternative=other)


# --------------------------------------------------------------------------------------
# Learned gates and greedy selection
# --------------------------------------------------------------------------------------


def gate_order(gates: Mapping[str, torch.Tensor]) -> list[tuple[str, int]]:
    """All (site, unit) pairs, the gate furthest from 1 first (closed or amplified; ties: site
    order, then unit index)."""
    sites = list(gates)
    pairs = [(s, u) for s in sites for u in range(len(gates[s]))]
    return sorted(pairs, key=lambda p: (-abs(1.0 - float(gates[p[0]][p[1]])), sites.index(p[0]), p[1]))


def _curve_factors(gates: Mapping[str, torch.Tensor], pairs: Sequence[tuple[str, int]], mode: str) -> list[float]:
    return [0.0 if mode == "hard" else float(gates[s][u]) for s, u in pairs]


def _option_key(asr: float, drop: float, k: int, clean_budget: float) -> tuple[float, float, int]:
    """How `choose_gates` orders options: within the clean budget, lowest attack success (then the
    smaller drop, fewer units); beyond it, the cheapest."""
    return (asr, drop, k) if drop <= clean_budget + 1e-9 else (2.0 + drop, asr, k)


def choose_gates(gates: Mapping[str, torch.Tensor], score: Callable[[Sequence[Pair], Sequence[float]], tuple[float, float]],
                 *, base_acc: float, clean_budget: float, mode: Literal["scale", "hard"] = "scale",
                 max_units: int | None = None, min_closure: float = 0.05,
                 ks: Sequence[int] = MASK_KS) -> tuple[list[tuple[str, int]], list[float], list[dict[str, Any]]]:
    """Harden learned gates: keep the k most-moved units (scaled by their gates, or removed).

    `score(pairs, factors) -> (attack success, clean accuracy)` on selection data. k runs over
    `ks` (or exactly `max_units`), among units whose gate moved at least `min_closure` from 1
    ("hard" mode: closed by that much; removing an amplified unit is not what it learned) and
    at most half of each site's units (so that a disjoint random control of the same size exists);
    the choice is the lowest attack success whose clean accuracy is within `clean_budget` of
    `base_acc` (then fewer units), or the smallest clean cost when no option is within it.
    Returns the pairs, their factors (0 for "hard") and the grid.
    """
    order: list[tuple[str, int]] = []
    per_site: dict[str, int] = {}
    for p in gate_order(gates):
        moved = 1 - float(gates[p[0]][p[1]])
        if (moved if mode == "hard" else abs(moved)) >= min_closure and per_site.get(p[0], 0) < len(gates[p[0]]) // 2:
            order.append(p)
            per_site[p[0]] = per_site.get(p[0], 0) + 1
    if not order:
        raise WorkbenchError(f"no unit's gate moved by {min_closure} or more: the learned gates leave the model as it "
                             "was (raise GateConfig.steps or lower GateConfig.sparsity)")
    options = [max_units] if max_units is not None else [k for k in ks if k < len(order)] + [min(len(order), max(ks))]
    grid: list[dict[str, Any]] = []
    best: tuple[float, float, int] | None = None
    for k in sorted(set(min(k, len(order)) for k in options)):
        fs = _curve_factors(gates, order[:k], mode)
        a, c = score(order[:k], fs)
        grid.append({"k": k, "asr": round(a, 4), "clean": round(c, 4)})
        key = _option_key(a, base_acc - c, k, clean_budget)
        if best is None or key < best:
            best = key
    assert best is not None
    k = best[2]
    return order[:k], _curve_factors(gates, order[:k], mode), grid


@torch.no_grad()
def greedy_units(handle: ModelHandle, candidates: Sequence[tuple[str, int]], *, triggered: torch.Tensor,
                 clean: torch.Tensor, clean_labels: torch.Tensor, target: int,
                 values: Mapping[str, torch.Tensor] | None,
                 kl_weight: float = 5.0, clean_budget: float = 0.005, max_units: int = 16,
                 progress: bool = False) -> tuple[list[tuple[str, int]], list[dict[str, Any]]]:
    """Forward selection of units (across sites) that remove a behaviour at the least clean cost.

    Each step adds the candidate whose removal (together with those chosen) most lowers
    p(target | triggered) + kl_weight * KL(unedited || edited) on the clean inputs, among those
    that keep clean accuracy within `clean_budget` of the unedited model; it stops when no
    candidate lowers that objective, attack success on `triggered` reaches 1% or `max_units`
    are chosen. Both terms are smooth, so steps are not decided by a handful of flipped
    images, as they would be by accuracy alone on the same data. Returns the chosen (site,
    unit) pairs in order and one record per step.
    """
    model = handle.model

    def logp(x: torch.Tensor) -> torch.Tensor:
        dev = next(model.parameters()).device
        return torch.cat([model(x[i:i + 500].to(dev)).float().log_softmax(-1).cpu() for i in range(0, len(x), 500)])

    ref = logp(clean)
    base_acc = float((ref.argmax(-1) == clean_labels).float().mean())

    def score(pairs: Sequence[tuple[str, int]]) -> tuple[float, float, float]:
        with removed_units(handle, pairs, values):
            trig, lp = logp(triggered), logp(clean)
        kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
        asr = float((trig.argmax(-1) == target).float().mean())
        return float(trig[:, target].exp().mean()) + kl_weight * kl, asr, float((lp.argmax(-1) == clean_labels).float().mean())

    chosen: list[tuple[str, int]] = []
    steps: list[dict[str, Any]] = []
    current = score([])[0]
    bar = progress_bar(total=max_units, desc="greedy unit selection", enabled=progress, leave=False)
    while len(chosen) < max_units:
        best: tuple[float, float, float, tuple[str, int]] | None = None
        for c in candidates:
            if c in chosen:
                continue
            obj, asr, acc = score([*chosen, c])
            if base_acc - acc > clean_budget + 1e-9:
                continue
            if best is None or obj < best[0]:
                best = (obj, asr, acc, c)
        if best is None or best[0] >= current - 1e-9:
            break
        current = best[0]
        chosen.append(best[3])
        steps.append({"site": best[3][0], "unit": best[3][1], "objective": round(best[0], 5), "asr": round(best[1], 4),
                      "clean": round(best[2], 4)})
        bar.update(1)
        if best[1] <= 0.01:
            break
    bar.close()
    return chosen, steps


# --------------------------------------------------------------------------------------
# Controls and results
# --------------------------------------------------------------------------------------


@contextmanager
def _treated(handle: ModelHandle, pairs: Sequence[tuple[str, int]], factors: Sequence[float] | None,
             values: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """Run-time removal (factors None) or gating of the pairs."""
    cm = removed_units(handle, pairs, values) if factors is None else gated_units(handle, pairs, factors, values)
    with cm:
        yield


def random_control(handle: ModelHandle, pairs: Sequence[Pair], factors: Sequence[float] | None,
                   values: Mapping[str, torch.Tensor] | None, *, seed: int, disjoint: bool = True) -> Any:
    """The random control, a context manager: as many random units per site as `pairs` has there
    (`random_pairs`), removed, or gated with the same factors per site (in the order given) when
    the treatment gates instead of removing."""
    rp = random_pairs(handle, pairs, seed=seed, disjoint=disjoint)
    if factors is None:
        return removed_units(handle, rp, values)
    grouped = group_by_site(pairs, factors)
    rf = []
    pos = {s: 0 for s in grouped}
    for s, _ in rp:
        rf.append(grouped[s][1][pos[s]])
        pos[s] += 1
    return gated_units(handle, rp, rf, values)


def random_pairs(handle: ModelHandle, pairs: Sequence[Pair], *, seed: int, disjoint: bool = True) -> list[Pair]:
    """As many random units per site as `pairs` has there (seeded), disjoint from them unless told."""
    by_site: dict[str, list[int]] = {}
    for s, u in pairs:
        by_site.setdefault(s, []).append(u)
    out = []
    for i, (s, us) in enumerate(by_site.items()):
        out += [(s, u) for u in random_units(site_units(handle, s), len(us), seed=seed + 7919 * i,
                                             exclude=us if disjoint else ())]
    return out


def _surgery_result(trojan_name: str, trojan: Any, site: str, units: Any, k: int, method: str, ranking: str,
                    value: str, seed: int, asr_before: float, asr_after: float, clean_before: float, clean_after: float,
                    rand_asr: Sequence[float], rand_clean: Sequence[float], n_random_draws: int, n_eval: int,
                    n_clean: int, selection: dict[str, Any]) -> dict[str, Any]:
    """The JSON result of `measure` (one shape for every selection method)."""
    cut = round(1 - asr_after / asr_before, 4) if asr_before > 0 else None
    drop = round(clean_before - clean_after, 4)
    return {
        "trojan": trojan_name, "kind": trojan.kind, "target": trojan.target, "source": trojan.source,
        "site": site, "units": units, "n_units": k, "method": method, "ranking": ranking, "value": value, "seed": seed,
        "asr_before": round(asr_before, 4), "asr_after": round(asr_after, 4),
        "clean_before": round(clean_before, 4), "clean_after": round(clean_after, 4),
        "asr_relative_cut": cut, "clean_drop": drop,
        "random_asr_after": round(sum(rand_asr) / len(rand_asr), 4),
        "random_asr_draws": [round(v, 4) for v in rand_asr],
        "random_clean_after": round(sum(rand_clean) / len(rand_clean), 4),
        "n_random_draws": n_random_draws, "n_eval": n_eval, "n_clean": n_clean,
        "selection": selection,
        "target_met": bool(cut is not None and cut >= 0.9 and drop <= 0.01 + 1e-9),
    }


def _foldable_sites(handle: ModelHandle, candidates: Sequence[str], value: str, *,
                    strict: bool = False) -> tuple[list[str], dict[str, str]]:
    """The sites where this kind of removal folds into weights exactly, and why the others do not
    (`strict`: a site that does not fold is an error, e.g. the one site the user asked for)."""
    ok, skipped = [], {}
    for s in candidates:
        try:
            unit_delta(handle, UnitRequest(s, (0,), (1.0,) if value == "mean" else None), verify=False)
            ok.append(s)
        except NotFoldableError as exc:
            if strict:
                raise
            skipped[s] = str(exc)
    if not ok:
        raise WorkbenchError(f"no candidate site allows an exact weight edit for {value} ablation: {skipped}")
    return ok, skipped


def plot_surgery_curve(results: Sequence[Mapping[str, Any]], path: Any, *,
                       xlabel: str = "units removed (mean ablation)") -> Any:
    """Attack success (left) and clean accuracy (right) vs number of units removed, treatment
    (solid) vs random units at the same site (dashed, mean of draws), one colour per trojan."""
    from workbench.plotting import pyplot, save_figure

    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, r in enumerate(results):
        curve = r.get("curve") or []
        if not curve:
            continue
        color = plt.cm.tab10(i % 10)
        ks = [c["k"] for c in curve]
        ax.plot(ks, [c["asr"] for c in curve], "-o", color=color, label=f"{r['trojan']} ({r['site']})")
        ax.plot(ks, [c["random_asr"] for c in curve], "--", color=color, alpha=0.6)
        bx.plot(ks, [c["clean"] for c in curve], "-o", color=color)
        bx.plot(ks, [c["random_clean"] for c in curve], "--", color=color, alpha=0.6)
    for a in (ax, bx):
        a.set_xscale("log", base=2)
        a.set_xlabel(xlabel)
    ax.set_ylabel("attack success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("attack success: selected (solid) vs random units (dashed)")
    ax.legend(fontsize=7, loc="lower left")
    bx.set_ylabel("clean accuracy")
    bx.set_title("clean accuracy, same edits")
    fig.tight_layout()

    return save_figure(fig, path, dpi=100)
