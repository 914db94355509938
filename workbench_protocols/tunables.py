"""What `workbench tune` can search: each tunable's option space, data, metrics and stated objective.

- knowledge editors on FactGPT rewrites: rome, memit, ft, ft-l, kn (CounterFact S, NS loss);
- "adversarial-patch" on ShapesNet: patch fraction, steps, lr, rotation; maximize targeted
  success on held-out images subject to the patch's share of the image area;
- "copy-paste" on ShapesNet: patch size, units, feature-visualization steps and candidates;
  maximize best-placement success subject to beating the noise-patch control;
- "ablate" (trojan surgery on ShapesNet): site, unit count, selection method, replacement
  value; minimize attack success subject to a clean-accuracy drop of at most 1 point.

The search itself (`workbench_protocols.tuning.tune`) knows none of these; studies whose
action is tunable name it in `CaseStudy.tune_target`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from workbench.errors import WorkbenchError
from workbench_protocols.tuning import Constraint, Param, Tunable, TuningObjective, int_setting, objective_for

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
        from workbench_protocols.editing import rewrites_for, unedited

        n = int_setting(settings, "cases")
        rewrites = rewrites_for(handle, n, seed=500 + seed)
        base = aggregate_cases(unedited(handle, rewrites))
        return {"handle": handle, "rewrites": rewrites, "baseline": {k: base[k] for k in ("S", "ES", "PS", "NS")}}

    def evaluate(self, state: Any, options: Mapping[str, Any]) -> dict[str, float]:
        return evaluate_options(state["handle"], self, options, state["rewrites"], state["baseline"])


def evaluate_options(handle: Any, tunable: EditorTunable, options: Mapping[str, Any], rewrites: Sequence[Any],
                     baseline: Mapping[str, Any]) -> dict[str, float]:
    """Fit with `options` (over the model's shipped ones), score; S, ES, PS, NS (percent) and NS_loss."""
    from workbench.counterfact import aggregate_cases
    from workbench_protocols.editing import edit_batch, edit_each, editor_at

    editor = editor_at(tunable.method, handle, None, **options)
    if tunable.batch:
        outcomes, _ = edit_batch(handle, editor, rewrites)
    else:
        outcomes = edit_each(handle, editor, rewrites)
    rows = [o.row() for o in outcomes]
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

    from workbench.classifier import predict
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
        from workbench.classifier import predict
        from workbench.zoo.shapesnet import world_of

        world = world_of(handle)
        target = world.class_index(str(settings["target"]))
        n_train, n_test = int_setting(settings, "n_train", low=2), int_setting(settings, "n_heldout", low=2)
        x_tr, y_tr = _scenes(handle, n_train, seed=700 + seed, exclude=world.classes[target], correct_only=True)
        x_te, _ = _scenes(handle, n_test, seed=800 + seed, exclude=world.classes[target], correct_only=True)
        base = float((predict(handle, x_te)[0].cpu() == target).float().mean())
        return {"handle": handle, "target": target, "train": (x_tr, y_tr), "heldout": x_te, "seed": seed,
                "placements": int_setting(settings, "eval_placements"),
                "baseline": {"target": world.classes[target], "success_unpatched": base, "n_train": len(x_tr),
                             "n_heldout": len(x_te)}}

    def evaluate(self, state: Any, options: Mapping[str, Any]) -> dict[str, float]:
        import torch

        import adversaries  # noqa: F401
        from adversaries.adversarial_patch import apply_patch, sample_placements
        from adversaries.registry import get
        from workbench.classifier import predict, preprocess_of

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
        x, y = _scenes(handle, int_setting(settings, "n_images", low=8), seed=600 + seed, exclude=world.classes[target])
        return {"handle": handle, "target": target, "images": x, "labels": y, "seed": seed,
                "n_pool": int_setting(settings, "n_pool", low=16), "classes": tuple(world.classes),
                "baseline": {"target": world.classes[target], "n_images": len(x)}}

    def config(self, options: Mapping[str, Any]) -> Any:
        """The CopyPaste config from flat options: `design` is the design kind, the design's and the
        sweep's fields go by their own names (`n_units`, `featvis_steps`, `grid`, `sizes`, ...), then `seed`."""
        from dataclasses import fields

        from adversaries.copy_paste import CopyPaste, DesignConfig
        from adversaries.placement_sweep import SweepConfig

        design_fields = {f.name for f in fields(DesignConfig)}
        sweep_fields = {f.name for f in fields(SweepConfig)}
        design: dict[str, Any] = {}
        sweep: dict[str, Any] = {}
        rest: dict[str, Any] = {}
        for key, value in options.items():
            if key == "design":
                design["kind"] = value
            elif key in design_fields:
                design[key] = value
            elif key in sweep_fields:
                sweep[key] = value
            else:
                rest[key] = value
        return CopyPaste(design=DesignConfig(**design), sweep=SweepConfig(**sweep), **rest)

    def evaluate(self, state: Any, options: Mapping[str, Any]) -> dict[str, float]:
        try:
            cfg = self.config({"n_pool": state["n_pool"], **options, "seed": state["seed"]})
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
    """Unit ablation as trojan surgery (`workbench_protocols.surgery.trojan_surgery`) for one trojan."""

    def space(self, handle: Any) -> tuple[Param, ...]:
        from workbench_protocols.surgery import SURGERY_SITES

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
        from workbench.unit_selection import site_units
        from workbench.zoo.shapesnet import world_of
        from workbench_protocols.surgery import SURGERY_SITES

        world = world_of(handle)
        name = str(settings["trojan"])
        names = [t.name for t in world.trojans]
        if name not in names:
            raise WorkbenchError(f"unknown trojan {name!r}; this model's trojans: {', '.join(names)}")
        sizes = {k: int_setting(settings, k) for k in ("n_select", "n_eval", "n_clean", "n_ref", "n_random_draws")}
        return {"handle": handle, "trojan": name, "seed": 900 + seed, "sizes": sizes,
                "widths": {s: site_units(handle, s) for s in SURGERY_SITES}, "baseline": {"trojan": name}}

    def evaluate(self, state: Any, options: Mapping[str, Any]) -> dict[str, float]:
        from workbench_protocols.surgery import EvaluationConfig, SelectionConfig, SurgeryConfig, trojan_surgery

        sizes = state["sizes"]
        config = SurgeryConfig(
            selection=SelectionConfig(method=str(options.get("method", "activation_difference")),
                                      site=str(options["site"]), n_units=int(options["n_units"]),
                                      n_select=sizes["n_select"], n_ref=sizes["n_ref"]),
            evaluation=EvaluationConfig(n_eval=sizes["n_eval"], n_clean=sizes["n_clean"],
                                        n_random_draws=sizes["n_random_draws"]),
            value=options.get("value", "mean"), seed=state["seed"])
        r = trojan_surgery(state["handle"], state["trojan"], config=config, progress=False)
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
        objective=TuningObjective("success_heldout", "maximize", (Constraint("area", "<=", 0.09),)),
        metrics=SHAPES_PATCH_METRICS,
        settings=(("target", "star"), ("n_train", 32), ("n_heldout", 64), ("eval_placements", 4)),
        fixed=(("batch_size", 32),)),
    "copy-paste": CopyPasteTunable(
        name="copy-paste", kind="adversary", method="copy-paste", model="zoo:shapesnet",
        summary="copy/paste patches designed from an interpretation of the target (Activation Atlas protocol)",
        objective=TuningObjective("success_best", "maximize", (Constraint("best_minus_noise", ">=", 0.05),)),
        metrics=COPY_PASTE_METRICS, settings=(("target", "star"), ("n_images", 96), ("n_pool", 256))),
    "ablate": AblateTunable(
        name="ablate", kind="editor", method="ablate", model="zoo:shapesnet",
        summary="trojan surgery: replace the units selected for a trojan (weight edit), ShapesNet",
        objective=TuningObjective("asr_after", "minimize", (Constraint("clean_drop", "<=", 1.0),)),
        metrics=ABLATE_METRICS,
        settings=(("trojan", "patch-universal"), ("n_select", 64), ("n_eval", 200), ("n_clean", 400), ("n_ref", 200),
                  ("n_random_draws", 1))),
}


def get_tunable(name: str) -> Tunable:
    """The tunable registered as `name`; an error listing the valid names otherwise."""
    if name not in TUNABLES:
        raise WorkbenchError(f"unknown tunable {name!r}; tunables: {', '.join(TUNABLES)}")
    return TUNABLES[name]
