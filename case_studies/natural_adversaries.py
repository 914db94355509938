"""Study 8: feature-level and natural adversaries. Does the fooling rate an adversary shows on
the images it was fitted on predict its fooling rate on fresh images?

Two adversaries that explain themselves, on ShapesNet:

- **feature-level** (`adversaries.feature_level.fooling_rates`): one added object optimized
  through the differentiable renderer, then discretized into words ("a medium-sized white
  cross at the left"); that *described* object is re-rendered and measured. Prediction: its
  fooling rate on the fit images; measurement: on fresh correctly classified source scenes.
  Controls: a random object of the same size (random shape, colour, position; 8 draws) and
  no object.
- **SNAFUE** (`adversaries.natural.SNAFUE`): a synthetic adversarial patch is trained on the
  fit images, and the natural patches (scene crops, rendered small objects) whose embedding
  is nearest to it are kept. Prediction: the top-k natural patches' fooling rate on the fit
  images; measurement: the same patches pasted on fresh source scenes at fresh random
  places. Controls: k random natural patches from the same pool, on the same fresh scenes
  and places, and the unpatched scenes. The synthetic patch's own fit-set rate is what the
  embedding match aims at (SNAFUE's premise); how much of it the natural patches keep is
  reported as a non-primary prediction.

Pairs (source -> target) are the ones of the adversaries benchmark, so the predicted sizes
come from there (benchmarks/RESULTS.md, "Adversaries").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch

from workbench.bootstrap import Metric, estimate, mean_of, paired_difference
from workbench.casestudy import (
    CaseStudy,
    Comparison,
    Control,
    Figure,
    Prediction,
    StudyContext,
    SuiteModel,
    ci_above,
    ci_within,
)
from workbench.errors import WorkbenchError

ADVERSARIES = ("feature_level", "snafue")
LABELS = {"feature_level": "feature-level object", "snafue": "SNAFUE natural patches"}
# Adversaries benchmark (benchmarks/RESULTS.md) per pair: fit-set / held-out rates and controls.
FL_BENCH = {("circle", "hexagon"): {"fit": 0.729, "held": 0.701, "random": 0.288},
            ("square", "diamond"): {"fit": 0.958, "held": 0.965, "random": 0.280}}
SN_BENCH = {("circle", "hexagon"): {"synthetic": 0.990, "natural": 0.735, "random": 0.248},
            ("triangle", "diamond"): {"synthetic": 1.000, "natural": 0.919, "random": 0.079},
            ("cross", "star"): {"synthetic": 0.406, "natural": 0.033, "random": 0.044}}
BENCH = "adversaries benchmark (benchmarks/RESULTS.md, 'Adversaries')"


def _key(adversary: str, pair: tuple[str, str]) -> str:
    return f"{adversary}:{pair[0]}_to_{pair[1]}"


def _parse(key: str) -> tuple[str, tuple[str, str]]:
    adversary, _, rest = key.partition(":")
    src, _, tgt = rest.partition("_to_")
    return adversary, (src, tgt)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


class Study(CaseStudy):
    name = "natural_adversaries"
    number = 8
    world = "shapesnet"
    title = "Feature-level and natural adversaries: predicted vs measured fooling rates"
    hypothesis = ("An adversary that is a describable feature (one added object, or a natural patch chosen by its "
                  "embedding) generalizes: its fooling rate on the images it was fitted on predicts, within 10 points, "
                  "its fooling rate on fresh images, and it beats random features of the same size by a wide margin.")
    controls = (
        Control("random object", "feature-level: 8 random objects of the same size (shape, colour, position), fresh scenes"),
        Control("random natural patches", "SNAFUE: k random patches from the same natural pool, same fresh scenes and places"),
        Control("no object / unpatched", "the fresh source scenes as they are (share already classified as the target)"),
    )
    methods = ("feature_level", "snafue")
    quick_seeds = 2
    default_seeds = 3

    def options(self) -> dict[str, Any]:
        quick = self.quick
        return {
            "feature_level_pairs": [list(p) for p in FL_BENCH],
            "snafue_pairs": [list(p) for p in SN_BENCH],
            "n": 32 if quick else 48,
            "feature_level": {"steps": 60 if quick else 120, "restarts": 1 if quick else 2},
            "snafue": {"synthetic_steps": 60 if quick else 150, "pool_size": 200 if quick else 400, "top_k": 5,
                       "eval_placements": 2},
            "scenes": "feature-level: fit seed 2s+100, held-out 2s+101 (fooling_rates); SNAFUE: fit 3s+200, "
                      "held-out 3s+201, held-out placements seed 7000+s",
        }

    def _pairs(self, adversary: str) -> list[tuple[str, str]]:
        key = "feature_level_pairs" if adversary == "feature_level" else "snafue_pairs"
        return [(p[0], p[1]) for p in self.options()[key]]

    def predictions(self) -> list[Prediction]:
        fl = [FL_BENCH[p] for p in self._pairs("feature_level")]
        sn = [SN_BENCH[p] for p in self._pairs("snafue")]
        return [
            Prediction("fl_fit_predicts_heldout", "the described object's fooling rate on fresh scenes is within 10 "
                       "points of its rate on the fit scenes", "fl_heldout_minus_fit", "none", ci_within(-0.10, 0.10),
                       size=round(_mean([b["held"] - b["fit"] for b in fl]), 4), method="feature_level",
                       source=f"{BENCH}: fit 0.729 / 0.958 vs held-out 0.701 / 0.965", basis="replication"),
            Prediction("fl_beats_random_object", "on fresh scenes the described object fools at least 20 points more "
                       "often than random objects of the same size", "fl_minus_random", "increase", ci_above(0.20),
                       size=round(_mean([b["held"] - b["random"] for b in fl]), 4), method="feature_level",
                       source=f"{BENCH}: 0.701 vs 0.288, 0.965 vs 0.280", basis="replication"),
            Prediction("snafue_fit_predicts_heldout", "the top natural patches' fooling rate on fresh scenes is within "
                       "10 points of their rate on the fit scenes", "snafue_heldout_minus_fit", "none",
                       ci_within(-0.10, 0.10), size=0.0, method="snafue",
                       source="no held-out number in the benchmark; the patches are chosen by embedding, not by "
                              "fit-set success, so no winner's curse is expected", basis="guess"),
            Prediction("snafue_beats_random_natural", "on fresh scenes the top natural patches fool at least 10 points "
                       "more often than random natural patches", "snafue_minus_random", "increase", ci_above(0.10),
                       size=round(_mean([b["natural"] - b["random"] for b in sn]), 4), method="snafue",
                       source=f"{BENCH}: natural top-5 mean minus random natural, per pair", basis="replication"),
            Prediction("snafue_natural_matches_synthetic", "natural patches matched by embedding keep the synthetic "
                       "patch's fooling rate within 20 points (SNAFUE's premise)", "snafue_natural_minus_synthetic",
                       "none", ci_within(-0.20, 0.20), size=round(_mean([b["natural"] - b["synthetic"] for b in sn]), 4),
                       method="snafue", source=f"{BENCH}: natural top-5 vs synthetic patch, per pair", primary=False,
                       basis="replication"),
            Prediction("fl_no_object_baseline", "without the object no fresh source scene is classified as the target",
                       "fl_baseline", "none", ci_within(0.0, 0.05), size=0.0,
                       source=f"{BENCH}: no-object baseline 0.000; scenes are correctly classified by construction",
                       primary=False, basis="replication"),
        ]

    def metrics(self) -> list[Metric]:
        def on(adversary: str, key: str) -> Any:
            return lambda r: r.get(key) if r["adversary"] == adversary else None

        out: list[Metric] = []
        for adv, short in (("feature_level", "fl"), ("snafue", "snafue")):
            out += [
                paired_difference(f"{short}_heldout_minus_fit", on(adv, "measured"), on(adv, "predicted"),
                                  description=f"{LABELS[adv]}: fooling rate on fresh scenes minus on the fit scenes"),
                paired_difference(f"{short}_minus_random", on(adv, "measured"), on(adv, "control"),
                                  description=f"{LABELS[adv]}: fooling rate minus the random control's (fresh scenes)"),
                Metric(f"{short}_predicted", (on(adv, "predicted"),), description=f"{LABELS[adv]}: fit-scene fooling rate"),
                Metric(f"{short}_measured", (on(adv, "measured"),), description=f"{LABELS[adv]}: fresh-scene fooling rate"),
                Metric(f"{short}_control", (on(adv, "control"),), description=f"{LABELS[adv]}: random control, fresh scenes"),
                Metric(f"{short}_baseline", (on(adv, "baseline"),), description=f"{LABELS[adv]}: no object, fresh scenes"),
            ]
        out += [
            paired_difference("snafue_natural_minus_synthetic", on("snafue", "measured"), on("snafue", "synthetic"),
                              description="SNAFUE: natural top-k on fresh scenes minus the synthetic patch on fit scenes"),
            paired_difference("snafue_best_heldout_minus_fit", on("snafue", "best_measured"), on("snafue", "best_predicted"),
                              description="SNAFUE: the best natural patch (chosen on fit scenes), fresh minus fit"),
            Metric("snafue_synthetic", (on("snafue", "synthetic"),), description="SNAFUE: synthetic patch, fit scenes"),
            Metric("fl_continuous_fit", (on("feature_level", "continuous_fit"),),
                   description="feature-level: the continuous (undiscretized) object, fit scenes"),
            Metric("abs_prediction_error", (lambda r: abs(r["measured"] - r["predicted"]),),
                   description="|fresh - fit| fooling rate, both adversaries"),
        ]
        return out

    def setup(self, ctx: StudyContext, model: SuiteModel | None) -> dict[str, Any]:
        assert model is not None
        return {"handle": ctx.model(model.spec)}

    def case_keys(self, state: Any, seed: int) -> list[str]:
        return [_key(a, p) for a in ADVERSARIES for p in self._pairs(a)]

    def run_case(self, state: Any, seed: int, key: str) -> dict[str, Any]:
        adversary, pair = _parse(key)
        if adversary == "feature_level":
            out = self._feature_level(state["handle"], pair, seed)
        elif adversary == "snafue":
            out = self._snafue(state["handle"], pair, seed)
        else:
            raise WorkbenchError(f"unknown adversary in case key {key!r}")
        comp = Comparison(adversary, f"{LABELS[adversary]} {pair[0]} -> {pair[1]}", "fooling rate on fresh scenes",
                          out["measured"], out["control"], "random object" if adversary == "feature_level"
                          else "random natural patches", better="higher")
        return {"adversary": adversary, "source": pair[0], "target": pair[1], **out, "comparisons": [comp.to_json()]}

    def _feature_level(self, handle: Any, pair: tuple[str, str], seed: int) -> dict[str, Any]:
        from adversaries.feature_level import FeatureLevel, fooling_rates

        opts = self.options()
        cfg = FeatureLevel(**opts["feature_level"])
        r = fooling_rates(handle, source=pair[0], target=pair[1], n=opts["n"], seeds=(seed,), config=cfg)["rows"][0]
        return {"predicted": r["predicted"], "measured": r["measured"], "control": r["control_random_object"],
                "baseline": r["baseline"], "continuous_fit": r["continuous_fit"], "description": r["description"],
                "object": r["object"], "matches_trojan": r["matches_trojan"]}

    def _snafue(self, handle: Any, pair: tuple[str, str], seed: int) -> dict[str, Any]:
        from adversaries.adversarial_patch import apply_patch, patch_pixels, sample_placements
        from adversaries.feature_level import source_scenes
        from adversaries.natural import SNAFUE, natural_patch_pool
        from workbench.classifier import predict, preprocess_of, render_for, resolve_class, world_or_default
        from workbench.worlds.scene import CLASS_SHAPES

        opts = self.options()
        n = opts["n"]
        cfg = SNAFUE(**opts["snafue"], seed=seed)
        tgt = resolve_class(handle, pair[1])
        assert tgt is not None
        soft = world_or_default(handle).config.softness
        fit = source_scenes(handle, pair[0], n, seed=3 * seed + 200)
        held = source_scenes(handle, pair[0], n, seed=3 * seed + 201)
        ae = cfg.generate(handle, fit, tgt)
        ex = ae.extra
        # The pool SNAFUE searched, rebuilt with its own seed; the best patch must match bit for bit.
        pre = preprocess_of(handle)
        side = patch_pixels(pre, frac=cfg.patch_frac)
        exclude = pair[1] if (cfg.exclude_target_shape and pair[1] in CLASS_SHAPES) else None
        pool = natural_patch_pool(handle, side=side, n=cfg.pool_size, seed=cfg.seed + 101, exclude_shape=exclude)
        top = ex["top_patches"]
        best = max(top, key=lambda t: t["fooling_rate"])
        if ae.patch is None or not torch.equal(pool.patches[best["index"]].cpu(), ae.patch.cpu()):
            raise WorkbenchError("the rebuilt natural patch pool does not match the one SNAFUE searched; "
                                 "adversaries.natural changed how it seeds its pool")
        g = torch.Generator().manual_seed(7000 + seed)
        rand = torch.randperm(len(pool.patches), generator=g)[: cfg.top_k].tolist()
        images = render_for(handle, held, softness=soft)
        places = [sample_placements(n, height=pre.height, width=pre.width, patch_hw=(side, side), generator=g)
                  for _ in range(cfg.eval_placements)]

        def fooling(patch: torch.Tensor) -> float:
            rates = []
            for pl in places:
                pred, _ = predict(handle, apply_patch(images, patch.to(images.device), pl)[0])
                rates.append(float((pred == tgt).float().mean()))
            return _mean(rates)

        held_top = [fooling(pool.patches[t["index"]]) for t in top]
        held_rand = [fooling(pool.patches[i]) for i in rand]
        base_pred, _ = predict(handle, images)
        return {"predicted": ex["natural_fooling_rate_mean"], "measured": _mean(held_top),
                "control": _mean(held_rand), "baseline": float((base_pred == tgt).float().mean()),
                "synthetic": ex["synthetic_fooling_rate"], "control_fit": ex["control_random_natural_fooling_rate"],
                "baseline_fit": ex["baseline_fooling_rate"], "best_predicted": best["fooling_rate"],
                "best_measured": held_top[top.index(best)], "description": ex["best_description"],
                "top_patches": [{**t, "heldout_fooling_rate": h} for t, h in zip(top, held_top)],
                "random_indices": rand, "config": asdict(cfg)}

    def rows(self, record: Mapping[str, Any]) -> list[dict[str, Any]]:
        keys = ("predicted", "measured", "control", "baseline", "synthetic", "best_predicted", "best_measured",
                "continuous_fit", "description", "matches_trojan")
        return [{"adversary": record["adversary"], "pair": f"{record['source']}->{record['target']}",
                 **{k: record.get(k) for k in keys}}]

    def figures(self, results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[Figure]:
        from workbench import study_plots

        if not rows:
            return []
        fig = study_plots.figure(5.2, 4.0)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot([0, 1], [0, 1], color="#888", lw=0.8, ls=":")
        markers = {"feature_level": "o", "snafue": "s"}
        pairs = sorted({r["pair"] for r in rows})
        colours = {p: f"C{i}" for i, p in enumerate(pairs)}
        for r in rows:
            ax.scatter([r["predicted"]], [r["measured"]], marker=markers[r["adversary"]], color=colours[r["pair"]],
                       s=28, alpha=0.75)
        for adv, m in markers.items():
            ax.scatter([], [], marker=m, color="#444", label=LABELS[adv])
        for p, c in colours.items():
            ax.scatter([], [], marker="o", color=c, label=p)
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("predicted: fooling rate on the fit scenes", fontsize=8)
        ax.set_ylabel("measured: fooling rate on fresh scenes", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, frameon=False, loc="upper left")
        ax.set_title("Predicted vs measured fooling rate, every case", fontsize=9)
        from workbench.casestudy import Figure as F

        figs = [F("fig_fooling_predicted_vs_measured.png", "Every case (seed x pair): fooling rate on the scenes the "
                  "adversary was fitted on (x) vs on fresh scenes (y); on the dotted line the prediction was exact.",
                  study_plots.png(fig))]
        groups = [f"{'FL' if a == 'feature_level' else 'SN'} {p}" for a in ADVERSARIES for p in pairs
                  if any(r["adversary"] == a and r["pair"] == p for r in rows)]
        keyed = [(a, p) for a in ADVERSARIES for p in pairs if any(r["adversary"] == a and r["pair"] == p for r in rows)]

        def bar(col: str, a: str, p: str) -> tuple[Any, Any, Any]:
            sub = [r for r in rows if r["adversary"] == a and r["pair"] == p]
            est = estimate(sub, mean_of("m", col), n_resamples=500, seed=0)
            return (est.value if est.value is not None else math.nan, est.low, est.high)

        series = {label: [bar(col, a, p) for a, p in keyed] for label, col in
                  (("no object / unpatched", "baseline"), ("random control", "control"),
                   ("predicted (fit scenes)", "predicted"), ("measured (fresh scenes)", "measured"))}
        figs.append(study_plots.bars(
            "fig_fooling_rates.png", "Fooling rates per adversary and pair (FL: feature-level object; SN: SNAFUE natural "
            "patches, top-k mean): no object, the random control and the adversary on fresh scenes, beside the "
            "prediction from the fit scenes (95% CIs over seeds).", groups, series, ylabel="fooling rate",
            title="Fooling rates: adversary vs controls"))
        return figs
