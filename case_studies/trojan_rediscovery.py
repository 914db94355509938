"""Study 7: trojan rediscovery benchmark (Casper et al. 2023 protocol) on ShapesNet.

Finding: what a feature-synthesis method makes when asked about a trojan's target class
(and, for a class-universal trojan, the source class it attacks), with the trigger hidden:
feature visualization of the target logit (scene parameters, and lucid's Fourier
default), copy/paste search, the feature-level adversary, natural search (SNAFUE),
adversarial filtering, a trained adversarial patch and the scene-vocabulary search
(`workbench_protocols.rediscovery.METHODS`).
Measurement: the 8-way multiple choice of Casper et al. 2023, answered automatically
(`workbench_protocols.rediscovery.multiple_choice`): the true trigger among the 7 same-kind library
designs most similar to the method's views, each view voting for the option it resembles
most; the score is the share of votes for the true trigger. The judge (palette colour
content plus the clean-world network of `workbench.judge`) never saw a trojan. Chance is
1/8; the published human best is 0.47 (all methods together 0.49, CLIP as judge
0.06-0.21); the workbench's target for the best method is 0.6.

On any model other than the development ShapesNet (a held-out one, whose triggers are drawn
from its seed and are not library designs, or a user's) the options are not the library's:
they are generated from the suite seed with near misses (`workbench.worlds.trojans.
near_miss_options`: the trigger's form in other colours, its colours in another form, random
designs of its kind), one question per (model, trojan, study seed) that every method, the
combined answer and the control answer alike. The trojans asked about are the model's own:
one per kind, universal ones on even seeds and class-universal ones on odd seeds in quick
mode, all of them in full mode.

Controls: chance (1/8, the protocol's baseline), and random views: clean ShapesWorld scenes
(no trigger) answering the same question with the same code, which measures what an
uninformative method scores when the distractors are chosen to look like its views; it is
each method's comparison on the leaderboard. Every method is a leaderboard entry (named
like the same method in other studies: "feature_level" and "snafue" as in study 8).
Scores are reported per method, per trojan kind (patch, style, natural feature) and for
all methods judged together.

Budgets and sizes. Full mode runs every method on all six trojans per seed at the
"quick" budget, the rediscovery benchmark's budget (benchmarks/RESULTS.md, "Trojan
rediscovery", one seed), which found most methods near or below chance and natural search
best (0.67); full-mode sizes come from that benchmark. Quick mode runs, per seed, one
trojan of each kind (universal ones on even seeds, class-universal ones on odd seeds, so two
seeds cover all six); the best method, natural search (SNAFUE), runs at the "quick" budget
there too (about 6 s a trojan on the shared 2-core machine, against about 1 s at "tiny"),
because at the "tiny" budget its one view comes from a 10-step synthetic patch and scored
1 of 18 questions (seeds 0-5; 0.06, below chance): a quick run at "tiny" would measure the
budget, not the method. The other methods run at "tiny" in quick mode, and quick-mode
predictions are sized from this study's own quick configuration run on seeds 2-5 (disjoint
from the default quick seeds 0-1; `QUICK_SCORE`: SNAFUE 0.20, scene search 0.42, the other
tiny-budget methods 0.00-0.17), so a quick-mode verdict is judged against what that configuration measured,
and the claims of the tiny-budget methods say "at the tiny budget". The judge is loaded once per run (`ctx.remember`; it
trains once per cache, ~1 minute, on first use); the views are not shared: the seed
changes every method's synthesis (its initialization and source images) and the option
order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from workbench.bootstrap import Metric, estimate, mean_of
from workbench.casestudy import (
    Anchor,
    CaseStudy,
    Comparison,
    Control,
    Figure,
    Prediction,
    StudyContext,
    case_seed,
    ci_above,
    ci_below,
    ci_within,
)
from workbench.suite import SuiteModel

CHANCE = 0.125
HUMAN_BEST = 0.47
ALL_TOGETHER = 0.49
TARGET = 0.6
KINDS = ("patch", "style", "natural")
# rediscovery method -> leaderboard name (the same name as that method in other studies)
NAMES: dict[str, str] = {
    "featvis-logit": "feature_visualization_logit",
    "featvis-logit-fourier": "feature_visualization_fourier",
    "copy-paste": "copy_paste_search",
    "feature-level": "feature_level",
    "natural": "snafue",
    "adversarial-filtering": "adversarial_filtering",
    "adversarial-patch": "adversarial_patch",
    "scene-search": "scene_search",
}
SHORT = {"featvis-logit": "featvis", "featvis-logit-fourier": "fourier", "copy-paste": "copy_paste",
         "feature-level": "feature_level", "natural": "snafue", "adversarial-filtering": "filtering",
         "adversarial-patch": "adv_patch", "scene-search": "scene_search"}
# benchmark scores per method (zoo ShapesNet, budget "quick", seed 0; scene-search: its own benchmark run)
BENCH_SCORE = {"featvis-logit": 0.11, "featvis-logit-fourier": 0.04, "copy-paste": 0.25, "feature-level": 0.15,
               "natural": 0.67, "adversarial-filtering": 0.00, "adversarial-patch": 0.33, "scene-search": 0.61}
BENCH = "rediscovery benchmark (benchmarks/RESULTS.md, 'Trojan rediscovery', zoo ShapesNet, budget quick, seed 0)"
# quick mode: natural search (the benchmark's best method) keeps the benchmark's budget; the rest run "tiny"
QUICK_FULL_BUDGET = ("natural",)
# this study's quick configuration (budgets above) run on seeds 2-5 (12 questions per method, 4 per kind),
# disjoint from the quick run's default seeds 0-1: metric -> measured value
QUICK_SCORE = {"featvis-logit": 0.167, "featvis-logit-fourier": 0.125, "copy-paste": 0.0, "feature-level": 0.156,
               "natural": 0.195, "adversarial-filtering": 0.083, "adversarial-patch": 0.083, "scene-search": 0.421,
               "all": 0.154, "patch": 0.102, "style": 0.111, "natural_kind": 0.248, "combined": 0.25, "random": 0.104}
QUICK_MEASURED = ("this study in quick mode (SNAFUE at budget quick, the other methods at tiny) on seeds 2-5, zoo "
                  "ShapesNet v1, eight methods, with the evidence-weighted views and the scene search "
                  "(12 questions per method; case_studies/trojan_rediscovery.py QUICK_SCORE)")
RANDOM, COMBINED = "random_views", "all_methods"
LABEL = {**SHORT, COMBINED: "together", RANDOM: "random"}
UNIVERSAL = ("patch-universal", "style-universal", "natural-universal")
CLASS_UNIVERSAL = ("patch-square", "style-star", "natural-circle")


class Study(CaseStudy):
    name = "trojan_rediscovery"
    number = 7
    world = "shapesnet"
    title = "Trojan rediscovery benchmark (Casper et al. 2023 protocol)"
    hypothesis = ("What feature-synthesis methods make for a trojan's target class reveals the hidden trigger: an "
                  "automatic judge picks the true trigger out of 8 options more often than chance (1/8), though style "
                  "(texture) triggers stay nearly undetectable, as Casper et al. found.")
    controls = (
        Control("chance", "1 in 8: the protocol's baseline"),
        Control("random views", "4 clean ShapesWorld scenes without any trigger answer the same question, same code "
                "(each method's comparison on the leaderboard)"),
    )
    anchors = (
        Anchor("Casper et al. 2023: best method with human judges (RFLA-Perturb)", HUMAN_BEST, "score_snafue",
               "ANCHORS.md", "same 8-way protocol; automatic judge, ShapesNet trojans instead of ResNet-50/ImageNet"),
        Anchor("Casper et al. 2023: all methods together, human judges", ALL_TOGETHER, "score_combined", "ANCHORS.md",
               "same protocol; our all-methods answer is the judge's summed ranking over every method's views"),
        Anchor("Casper et al. 2023: CLIP as judge, best method", 0.21, "score_all", "ANCHORS.md",
               "automatic judge in both; theirs CLIP, ours a clean-world ShapesWorld network (mean over methods)"),
        Anchor("Target: mean 8-way score across the implanted trojans", TARGET, "score_snafue", "workbench target",
               "our target, for the best method"),
        Anchor("Chance (8 options)", CHANCE, "score_random_views", "protocol", "same protocol"),
    )
    methods = tuple(NAMES.values())
    quick_seeds = 2
    default_seeds = 2

    def options(self) -> dict[str, Any]:
        quick = self.quick
        return {"methods": list(NAMES), "budget": self.budgets(),
                "trojans_per_seed": "one per kind: universal on even seeds, class-universal on odd seeds" if quick
                else "all of the model's", "n_random_views": 4,
                "judge": "workbench.judge (clean-world network) + palette colours", "synthesis_seed": "the study seed",
                "options": {"zoo:shapesnet": "the true trigger and the 7 library designs of its kind most similar to "
                                             "the views",
                            "other models": "near_miss_options of the trigger, drawn from (suite seed, model, trojan, "
                                            "study seed)"}}

    def budgets(self) -> dict[str, str]:
        """Each method's synthesis budget in this mode (see the module docstring)."""
        return {m: "quick" if not self.quick or m in QUICK_FULL_BUDGET else "tiny" for m in NAMES}

    def predictions(self) -> list[Prediction]:
        if self.quick:
            return self._quick_predictions()
        mean_bench = round(sum(BENCH_SCORE.values()) / len(BENCH_SCORE), 3)
        budget = ""
        preds = [
            Prediction("methods_above_chance", "pooled over methods and trojans, the 8-way score is above chance (1/8)",
                       "score_all", "increase", ci_above(CHANCE), size=mean_bench,
                       source=f"{BENCH}: mean of the {len(BENCH_SCORE)} methods' means {mean_bench}{budget}",
                       basis="replication"),
            Prediction("best_method_above_chance", "natural search (SNAFUE), the benchmark's best method, scores above "
                       "chance", "score_snafue", "increase", ci_above(CHANCE), size=BENCH_SCORE["natural"],
                       method=NAMES["natural"], source=f"{BENCH}: 0.67 (4 of 6 trojans right){budget}",
                       basis="replication"),
        ]
        for m in NAMES:
            if m == "natural":
                continue
            preds.append(Prediction(
                f"{SHORT[m]}_above_chance", f"{m} scores above chance", f"score_{SHORT[m]}", "increase",
                ci_above(CHANCE), size=BENCH_SCORE[m], method=NAMES[m], source=f"{BENCH}: {BENCH_SCORE[m]:.2f}{budget}",
                primary=False, basis="replication"))
        preds += [
            Prediction("best_method_meets_target", "natural search reaches the target of 0.6", "score_snafue",
                       "increase", ci_above(TARGET), size=BENCH_SCORE["natural"], method=NAMES["natural"],
                       source=f"target: the workbench's 0.6; size: {BENCH}", primary=False, basis="replication"),
            Prediction("patch_above_chance", "patch triggers are rediscovered above chance (all methods)", "score_patch",
                       "increase", ci_above(CHANCE), size=0.35, source=f"{BENCH}: patch trojans 0.35", primary=False,
                       basis="replication"),
            Prediction("natural_above_chance", "natural-feature triggers are rediscovered above chance (Casper et al.: "
                       "the easiest kind)", "score_natural", "increase", ci_above(CHANCE), size=0.10,
                       source=f"direction: Casper et al. 2023 (natural easiest); size: {BENCH}: 0.10 on the zoo model "
                              "(0.67 on its held-out set)", primary=False, basis="replication"),
            Prediction("style_nearly_undetectable", "style (texture) triggers stay nearly undetectable: their score "
                       "stays below twice chance (0.25)", "score_style", "decrease", ci_below(0.25), size=0.22,
                       source=f"Casper et al. 2023 (style nearly undetectable); size: {BENCH}: 0.22 on the zoo model, "
                              "0.00 on its held-out set", primary=False, basis="replication"),
            Prediction("all_together_above_chance", "all methods judged together answer above chance", "score_combined",
                       "increase", ci_above(CHANCE), size=0.17,
                       source=f"{BENCH}: 'all pooled' 0.17; Casper et al. (humans): 0.49", primary=False,
                       basis="replication"),
            Prediction("random_views_not_above_chance", "clean scenes without a trigger do not beat chance under this "
                       "protocol (the distractors are chosen to look like the views)", "score_random_views", "none",
                       ci_within(0.0, CHANCE), size=0.0, source="protocol: uninformative views, hardest distractors",
                       primary=False, basis="guess"),
        ]
        return preds

    def _quick_predictions(self) -> list[Prediction]:
        """Quick mode: the same claims, sized from this configuration's own measurement (`QUICK_SCORE`)."""
        q, src = QUICK_SCORE, QUICK_MEASURED
        tiny = "at the tiny budget (quick mode)"
        preds = [
            Prediction("methods_above_chance", "pooled over methods (SNAFUE at the quick budget, the others at the tiny "
                       "budget) and trojans, the 8-way score is above chance (1/8)", "score_all", "increase",
                       ci_above(CHANCE), size=q["all"], source=f"{src}: {q['all']:.3f}", basis="replication"),
            Prediction("best_method_above_chance", "natural search (SNAFUE), the benchmark's best method, run at the "
                       "benchmark's budget (quick), scores above chance", "score_snafue", "increase", ci_above(CHANCE),
                       size=q["natural"], method=NAMES["natural"],
                       source=f"{src}: {q['natural']:.2f}; {BENCH}: 0.67 (4 of 6 trojans right)", basis="replication"),
        ]
        for m in NAMES:
            if m == "natural":
                continue
            preds.append(Prediction(
                f"{SHORT[m]}_above_chance", f"{m} {tiny} scores above chance", f"score_{SHORT[m]}", "increase",
                ci_above(CHANCE), size=q[m], method=NAMES[m],
                source=f"{src}: {q[m]:.2f} (at budget quick, the benchmark's: {BENCH_SCORE[m]:.2f})", primary=False,
                basis="replication"))
        preds += [
            Prediction("best_method_meets_target", "natural search (budget quick) reaches the target of 0.6",
                       "score_snafue", "increase", ci_above(TARGET), size=q["natural"], method=NAMES["natural"],
                       source=f"target: the workbench's 0.6; size: {src}: {q['natural']:.2f}", primary=False,
                       basis="replication"),
            Prediction("patch_above_chance", "patch triggers are rediscovered above chance (all methods, quick-mode "
                       "budgets)", "score_patch", "increase", ci_above(CHANCE), size=q["patch"],
                       source=f"{src}: patch trojans {q['patch']:.2f}", primary=False, basis="replication"),
            Prediction("natural_above_chance", "natural-feature triggers are rediscovered above chance (Casper et al.: "
                       "the easiest kind; quick-mode budgets)", "score_natural", "increase", ci_above(CHANCE),
                       size=q["natural_kind"], source=f"direction: Casper et al. 2023 (natural easiest); size: {src}: "
                                                      f"{q['natural_kind']:.2f}", primary=False, basis="replication"),
            Prediction("style_nearly_undetectable", "style (texture) triggers stay nearly undetectable: their score "
                       "stays below twice chance (0.25; quick-mode budgets)", "score_style", "decrease", ci_below(0.25),
                       size=q["style"], source=f"Casper et al. 2023 (style nearly undetectable); size: {src}: "
                                               f"{q['style']:.2f}", primary=False, basis="replication"),
            Prediction("all_together_above_chance", "all methods judged together answer above chance (quick-mode "
                       "budgets)", "score_combined", "increase", ci_above(CHANCE), size=q["combined"],
                       source=f"{src}: {q['combined']:.2f}; Casper et al. (humans): 0.49", primary=False,
                       basis="replication"),
            Prediction("random_views_not_above_chance", "clean scenes without a trigger do not beat chance under this "
                       "protocol (the distractors are chosen to look like the views)", "score_random_views", "none",
                       ci_within(0.0, CHANCE), size=q["random"],
                       source=f"protocol: uninformative views, hardest distractors; {src}: {q['random']:.2f}",
                       primary=False, basis="guess"),
        ]
        return preds

    def metrics(self) -> list[Metric]:
        def score(method: str | None = None, kind: str | None = None) -> Any:
            def get(r: Mapping[str, Any]) -> Any:
                if method is None and r["method"] in (RANDOM, COMBINED):
                    return None
                if method is not None and r["method"] != method:
                    return None
                if kind is not None and r["kind"] != kind:
                    return None
                return r["score"]
            return get

        out = [mean_of("score_all", score(), description="8-way score, every synthesis method and trojan")]
        out += [mean_of(f"score_{SHORT[m]}", score(m), description=f"8-way score of {m}") for m in NAMES]
        out += [mean_of(f"score_{k}", score(kind=k), description=f"8-way score on {k} trojans, all methods")
                for k in KINDS]
        for m in NAMES:
            out += [mean_of(f"score_{SHORT[m]}_{k}", score(m, k), description=f"{m} on {k} trojans") for k in KINDS]
        out += [
            mean_of("score_combined", score(COMBINED), description="all methods judged together (summed ranking)"),
            mean_of("score_random_views", score(RANDOM), description="control: clean scenes without a trigger"),
            mean_of("consensus_all", lambda r: None if r["method"] in (RANDOM, COMBINED) or r.get("consensus_correct")
                    is None else float(r["consensus_correct"]),
                    description="share of questions where the mean similarity of a method's views picks the trigger"),
        ]
        return out

    # --- running ------------------------------------------------------------------------------

    def setup(self, ctx: StudyContext, model: SuiteModel | None) -> dict[str, Any]:
        from workbench.judge import load_judge
        from workbench.zoo.shapesnet import world_of

        assert model is not None
        handle = ctx.model(model.spec)
        judge = ctx.remember("judge:shapesworld:seed0", lambda: load_judge(progress=ctx.progress))
        return {"handle": handle, "judge": judge, "spec": model.spec, **self.world_plan(world_of(handle).trojans),
                "options_seed": None if model.dev else (ctx.suite.seed or 0)}

    def world_plan(self, trojans: Any) -> dict[str, Any]:
        """The trojans a model's set (a TrojanSet) is asked about: all (universal first), and per parity of
        the seed in quick mode one per kind (universal on even seeds; zoo:shapesnet: `UNIVERSAL`,
        `CLASS_UNIVERSAL`)."""
        universal = [t.name for t in trojans if t.source is None]
        class_universal = [t.name for t in trojans if t.source is not None]
        kind = {t.name: t.kind for t in trojans}

        def one_per_kind(names: list[str]) -> list[str]:
            return [next(n for n in names if kind[n] == k) for k in KINDS if any(kind[n] == k for n in names)]

        return {"all": universal + class_universal, "even": one_per_kind(universal), "odd": one_per_kind(class_universal)}

    def _trojans(self, state: Mapping[str, Any], seed: int) -> list[str]:
        if not self.quick:
            return list(state["all"])
        return list(state["even"] if seed % 2 == 0 else state["odd"])

    def case_keys(self, state: Any, seed: int) -> list[str]:
        return self._trojans(state, seed)

    def _question(self, state: Mapping[str, Any], seed: int, trojan: Any) -> Any:
        """The options asked about `trojan` as given (generated near misses), or None for the library's."""
        from workbench.worlds.trojans import near_miss_options

        if state["options_seed"] is None:
            return None
        g = torch.Generator().manual_seed(
            case_seed(state["options_seed"], f"rediscovery-options:{state['spec']}:{trojan.name}:{seed}") % (2 ** 62))
        return near_miss_options(trojan.trigger, generator=g)

    def run_case(self, state: Any, seed: int, key: str) -> dict[str, Any]:
        from workbench.zoo.shapesnet import world_of
        from workbench_protocols import rediscovery as rd

        handle, judge = state["handle"], state["judge"]
        world = world_of(handle)
        trojan = world.trojans[world.trojans.index(key)]
        views_dir = None
        if self.store is not None:
            views_dir = self.store.artifact_path(f"views/{self._views_name(state, seed, key)}")
        question = self._question(state, seed, trojan)
        res_rows, skipped, combined = self._synthesize(handle, trojan, judge, seed, views_dir, question)
        rows = []
        budgets = self.budgets()
        for r in res_rows:
            rows.append({"method": r["method"], "leaderboard_name": NAMES[r["method"]], "budget": budgets[r["method"]],
                         "score": r["score"],
                         "consensus_correct": r["consensus_correct"], "options": r["options"],
                         "true_index": r["true_index"], "votes": r["votes"][:16], "n_views": len(r["votes"]),
                         "seconds": r["seconds"], "error": (r.get("notes") or {}).get("error")
                         if isinstance(r.get("notes"), dict) else None})
        # control: clean scenes (no trigger) answer the same question with the same code
        g = torch.Generator().manual_seed(case_seed(seed, f"random-views:{key}") % (2 ** 62))
        n_rand = self.options()["n_random_views"]
        sample = world.sample(n_rand, generator=g)
        rand_views = world.render(sample)
        assert isinstance(rand_views, torch.Tensor)
        i = world.trojans.index(key)
        mc = rd.multiple_choice(trojan, rand_views.float().clamp(0, 1), judge, seed=seed * 7 + i, options=question)
        random_row = {"method": RANDOM, "score": mc["score"], "consensus_correct": mc["consensus_correct"],
                      "options": mc["options"], "true_index": mc["true_index"], "votes": mc["votes"],
                      "n_views": len(mc["votes"])}
        # the leaderboard's control is what uninformative views measurably score on the same question, which
        # is above 1/8 when the distractors are chosen to resemble the views
        comps = [Comparison(NAMES[r["method"]], f"synthesize views for {key} ({trojan.kind} trojan)",
                            "8-way rediscovery score", r["score"], random_row["score"],
                            "random clean views (same question, same code)", better="higher").to_json()
                 for r in rows]
        return {"trojan": key, "kind": trojan.kind, "target": trojan.target, "source": trojan.source,
                "trigger": trojan.trigger.name, "trojan_config": trojan.to_json(), "universal": trojan.source is None, "budget": budgets,
                "rows": rows, "random_views": random_row, "combined": combined, "skipped": skipped,
                "views": None if views_dir is None else f"views/{self._views_name(state, seed, key)}/views.safetensors",
                "options_source": "library designs most similar to the views" if question is None else
                f"near misses generated from suite seed {state['options_seed']}",
                "comparisons": comps}

    def _views_name(self, state: Mapping[str, Any], seed: int, key: str) -> str:
        """The views folder of a case: `s{seed}-{trojan}`, under the model's index when there are several."""
        models = [m.spec for m in self.suite_models() if m is not None]
        return f"s{seed}-{key}" if len(models) <= 1 else f"m{models.index(state['spec'])}/s{seed}-{key}"

    def _synthesize(self, handle: Any, trojan: Any, judge: Any, seed: int, views_dir: Any,
                    question: Any = None) -> tuple[list[dict[str, Any]], dict[str, str], float | None]:
        """Every method's rows for one trojan, one `rediscover` call per budget; all methods judged together.

        With one budget this is one call (its own combined answer); with two, the calls use the
        same seeds a single call would, their views are merged into one views.safetensors (and
        the grids moved beside it), and the combined question is asked over all of them.
        """
        import tempfile
        from pathlib import Path

        from safetensors.torch import load_file

        from workbench.storage import save_safetensors
        from workbench.worlds.trojans import TrojanSet
        from workbench_protocols import rediscovery as rd

        groups: dict[str, list[str]] = {}
        for m, b in self.budgets().items():
            groups.setdefault(b, []).append(m)
        if len(groups) == 1:
            (budget, methods), = groups.items()
            res = rd.rediscover(handle, trojans=TrojanSet([trojan]), methods=methods, budget=budget,  # type: ignore[arg-type]
                                seed=seed, judge=judge, progress=False, views_dir=views_dir,
                                options=None if question is None else {trojan.name: question})
            return res.rows, res.skipped, res.combined.get("per_trojan", {}).get(trojan.name)
        rows: list[dict[str, Any]] = []
        skipped: dict[str, str] = {}
        views: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="rediscovery-") as tmp:
            for budget, methods in groups.items():
                part = Path(tmp) / budget
                res = rd.rediscover(handle, trojans=TrojanSet([trojan]), methods=methods, budget=budget,  # type: ignore[arg-type]
                                    seed=seed, judge=judge, progress=False, views_dir=part,
                                    options=None if question is None else {trojan.name: question})
                rows += res.rows
                skipped.update(res.skipped)
                if (part / "views.safetensors").is_file():
                    views.update(load_file(str(part / "views.safetensors")))
                if views_dir is not None:
                    Path(views_dir).mkdir(parents=True, exist_ok=True)
                    for png in part.glob("*.png"):
                        png.replace(Path(views_dir) / png.name)
        order = list(NAMES)
        rows.sort(key=lambda r: order.index(r["method"]))
        have = [m for m in order if f"{trojan.name}|{m}" in views]
        per_method = [views[f"{trojan.name}|{m}"] for m in have]
        weights = [views.get(f"{trojan.name}|{m}|weights") for m in have]  # vote weights of methods that give them
        combined = None
        if per_method:
            combined = round(rd.combined_choice(trojan, per_method, judge, seed=seed * 7, weights=weights,
                                                options=question)["score"], 4)
        if views_dir is not None and views:
            save_safetensors(Path(views_dir) / "views.safetensors", views,
                             {"what": "rediscovery views, key trojan|method"})
        return rows, skipped, combined

    def rows(self, record: Mapping[str, Any]) -> list[dict[str, Any]]:
        base = {"trojan": record["trojan"], "kind": record["kind"], "target": record["target"]}
        out = [{**base, "method": r["method"], "score": r["score"], "consensus_correct": r["consensus_correct"],
                "n_views": r["n_views"]} for r in record["rows"]]
        rv = record["random_views"]
        out.append({**base, "method": RANDOM, "score": rv["score"], "consensus_correct": None, "n_views": rv["n_views"]})
        if record.get("combined") is not None:
            out.append({**base, "method": COMBINED, "score": record["combined"], "consensus_correct": None,
                        "n_views": None})
        return out

    # --- figures ------------------------------------------------------------------------------

    def figures(self, results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[Figure]:
        from workbench import study_plots

        if not rows:
            return []
        figs = [self._score_chart(rows)]
        trojans = list(dict.fromkeys(r["trojan"] for r in rows))  # every model's, by name
        cols = list(NAMES) + [COMBINED, RANDOM]
        data = []
        for t in trojans:
            line = []
            for m in cols:
                vals = [r["score"] for r in rows if r["trojan"] == t and r["method"] == m]
                line.append(sum(vals) / len(vals) if vals else math.nan)
            data.append(line)
        kinds = {r["trojan"]: r["kind"] for r in rows}
        figs.append(study_plots.heatmap(
            "fig_rediscovery_table.png", "The rediscovery table: 8-way score per trojan (row, with its kind) and method "
            "(column), mean over the seeds that ran it; 'together' is every method's views judged together, "
            "'random' the control (clean scenes). Chance 0.125, published human best 0.47.", data,
            rows=[f"{t} ({kinds[t]})" for t in trojans], cols=[LABEL.get(c, c) for c in cols],
            title="8-way rediscovery score", colorbar="score"))
        views = self._views_figure(rows)
        if views is not None:
            figs.append(views)
        return figs

    def _score_chart(self, rows: Sequence[Mapping[str, Any]]) -> Figure:
        import numpy as np

        from workbench import study_plots
        from workbench.casestudy import Figure as F

        groups = list(NAMES) + [COMBINED, RANDOM]
        fig = study_plots.figure(7.6, 3.6)
        ax = fig.add_subplot(1, 1, 1)
        series = [("all kinds", None)] + [(k, k) for k in KINDS]
        width = 0.8 / len(series)
        x = np.arange(len(groups))
        for i, (label, kind) in enumerate(series):
            vals, los, his = [], [], []
            for m in groups:
                sub = [r for r in rows if r["method"] == m and (kind is None or r["kind"] == kind)]
                est = estimate(sub, mean_of("s", "score"), n_resamples=500, seed=0)
                v = est.value if est.value is not None else math.nan
                vals.append(0.0 if math.isnan(v) else v)
                los.append(max(0.0, v - est.low) if est.low is not None and not math.isnan(v) else 0.0)
                his.append(max(0.0, est.high - v) if est.high is not None and not math.isnan(v) else 0.0)
            ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, yerr=[los, his], capsize=2, label=label)
        for y, label, style in ((CHANCE, "chance 1/8", ":"), (HUMAN_BEST, "human best 0.47 (Casper et al.)", "--"),
                                (TARGET, "target 0.6", "-.")):
            ax.axhline(y, color="black", lw=1.0, ls=style, label=label)
        ax.set_xticks(x)
        ax.set_xticklabels([LABEL.get(m, m) for m in groups], fontsize=7, rotation=20)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("8-way score (share of votes for the true trigger)", fontsize=7)
        ax.tick_params(labelsize=7)
        fig.legend(fontsize=6.5, frameon=False, ncol=4, loc="outside lower center")
        ax.set_title("Trojan rediscovery by method and trigger kind (95% CIs over trojans x seeds)", fontsize=9)
        return F("fig_rediscovery_scores.png", "Rediscovery score per method, all trojans and per trigger kind, with "
                 "chance (1/8), the published human best (0.47, Casper et al. 2023) and the target (0.6). "
                 "'together': every method's views judged together; 'random': the control (clean scenes).",
                 study_plots.png(fig))

    def _views_figure(self, rows: Sequence[Mapping[str, Any]]) -> Figure | None:
        """The true trigger beside the first view of every method, first seed (from the stored views)."""
        from safetensors.torch import load_file

        from workbench import study_plots
        from workbench.casestudy import Figure as F
        from workbench.worlds.trojans import trojans_from_json

        if self.store is None:
            return None
        first = min(self.seeds)
        model = rows[0].get("model") if rows else None
        recs = []
        for cid in self.store.case_ids():
            rec = self.store.load_case(cid)
            if rec["seed"] == first and rec.get("model") == model and rec["result"].get("views"):
                path = self.store.root / rec["result"]["views"]
                if path.is_file():
                    recs.append((rec["result"], load_file(str(path))))
        if not recs:
            return None
        scores = {(r["trojan"], r["method"]): r["score"] for r in rows if r["seed"] == first and r.get("model") == model}
        ncol = 1 + len(NAMES)
        fig = study_plots.figure(0.95 * ncol, 1.15 * len(recs) + 0.3)
        axes = fig.subplots(len(recs), ncol, squeeze=False)
        for i, (rec, views) in enumerate(recs):
            trig = trojans_from_json([rec["trojan_config"]])[0].trigger if rec.get("trojan_config") else None
            panels: list[tuple[Any, str, str]] = []
            panels.append((trig.example(image_size=48) if trig is not None else None,
                           f"{rec['trojan']}\ntrue trigger", "black"))
            for m in NAMES:
                v = views.get(f"{rec['trojan']}|{m}")
                s = scores.get((rec["trojan"], m))
                panels.append((None if v is None or len(v) == 0 else v[0], f"{SHORT[m]}\n"
                               + ("-" if s is None else f"{s:.2f}"), "#0a7a2f" if (s or 0) > CHANCE else "black"))
            for j, ax in enumerate(axes[i]):
                ax.set_xticks([])
                ax.set_yticks([])
                img, title, color = panels[j]
                if img is not None:
                    ax.imshow(img.float().clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
                else:
                    ax.set_facecolor("#eee")
                ax.set_title(title, fontsize=5.5, color=color)
        return F("fig_rediscovery_views.png", "What each method synthesized (first view, first seed) beside the true "
                 "trigger it had to reveal; titles give the 8-way score (green: above chance).", study_plots.png(fig))
