"""Study 1: does fact localization (causal tracing) predict where to edit? (Hase et al. 2023)

Finding: the causal trace of each fact (MLP states restored one layer at a time, window 1
on a small model) peaks at some (token, layer). Prediction, from ROME's reading of the
trace: editing with ROME at the traced layer works better than at other layers, the traced
layer is the best layer for most facts, and layers with a larger trace effect edit better.
Action: ROME at the traced layer. Control: ROME at every other layer, with the same code,
the same key token and the same rewrite (and, for the method leaderboard, one randomly
drawn other layer). Hase et al. found that the trace peak does not predict the best edit
layer; the honest outcome here may well be "failed".
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from workbench.bootstrap import Metric, correlation, harmonic, mean_of, paired_difference, share_of, spearman
from workbench.casestudy import (
    Anchor,
    CaseStudy,
    Comparison,
    Control,
    Figure,
    Prediction,
    StudyContext,
    SuiteModel,
    case_seed,
    ci_above,
    ci_within,
)


class Study(CaseStudy):
    name = "fact_localization"
    number = 1
    world = "factgpt"
    title = "Fact localization predicts editability (causal trace -> ROME layer)"
    hypothesis = ("The layer where a fact's causal trace peaks (MLP states, restored one layer at a time) is where "
                  "ROME should edit it: editing there beats editing at other layers, and layers with larger trace "
                  "effects edit better. Hase et al. (2023) report that this does not hold.")
    controls = (
        Control("other layers", "ROME at every other layer, same rewrite, same key token, same code"),
        Control("random other layer", "one other layer drawn at random per case (leaderboard comparison)"),
        Control("unedited", "the model before any edit (neighbourhood baseline)"),
    )
    anchors = (
        Anchor("ROME S at its (traced) layer, GPT-2 XL", 89.2, "S_traced", "ROME paper, CounterFact",
               "same metric, different model and data"),
        Anchor("ROME ES, GPT-2 XL", 100.0, "ES_traced", "ROME paper", "same metric, different model and data"),
        Anchor("ROME NS, GPT-2 XL", 75.4, "NS_traced", "ROME paper", "same metric, different model and data"),
        Anchor("unedited NS, GPT-2 XL", 78.1, "NS_unedited", "ROME paper", "same metric, different model and data"),
    )
    methods = ("causal_tracing",)
    tune_target = "rome"
    quick_seeds = 5
    default_seeds = 5

    def options(self) -> dict[str, Any]:
        return {"cases_per_seed": 3 if self.quick else 30,
                "trace": {"kind": "mlp", "window": 1, "n_samples": 10, "noise": 3.0},
                "editor": "rome with the options the model ships (none on held-out models), at every layer; key token "
                          "from the trace peak",
                "records_seed": "100 + seed"}

    def predictions(self) -> list[Prediction]:
        return [
            Prediction("traced_beats_other", "ROME at the traced layer scores higher S than the mean of the other "
                       "layers, by at least 5 points", "traced_minus_other", "increase", ci_above(5.0), size=20.0,
                       method="causal_tracing", source="ROME paper: edits at the traced mid-layer MLPs work best",
                       basis="paper"),
            Prediction("traced_is_best", "for most facts the traced layer is the best edit layer (S within 1 point "
                       "of the best)", "best_layer_match", "increase", ci_above(0.5), size=0.7, method="causal_tracing",
                       source="ROME's premise; Hase et al. predict failure", basis="paper"),
            Prediction("effect_predicts_success", "within a fact, layers with larger trace effects edit better "
                       "(Spearman across layers, mean over facts)", "within_fact_rank_corr", "increase",
                       ci_above(0.2), size=0.5, method="causal_tracing", source="ROME premise; Hase et al.: ~0",
                       basis="paper"),
            Prediction("rome_S_at_traced", "ROME at the traced layer reaches S of at least 75", "S_traced", "increase",
                       ci_above(75.0), size=98.5, source="editing benchmark on FactGPT v2 (benchmarks/RESULTS.md): 98.5",
                       basis="replication"),
            Prediction("neighbours_unchanged", "neighbourhood prompts keep their answers: NS moves by less than 10 "
                       "points from the unedited model", "NS_change_traced", "none", ci_within(-10.0, 10.0),
                       size=-2.7, source="ROME paper: NS 75.4 edited vs 78.1 unedited", basis="paper"),
        ]

    def metrics(self) -> list[Metric]:
        def hm3(prefix: str) -> Metric:
            return Metric(f"S_{prefix}", (f"ES_{prefix}", f"PS_{prefix}", f"NS_{prefix}"), combine=harmonic, scale=100.0,
                          unit="%", description=f"S = harmonic mean of ES, PS, NS at the {prefix} layer")

        return [
            paired_difference("traced_minus_other", "S_traced_case", "S_other_case", scale=100.0, unit="points",
                              description="per-case S at the traced layer minus the mean S at the other layers"),
            share_of("best_layer_match", lambda r: r.get("best_match"),
                     description="share of cases whose traced layer is (within 1 point) the best edit layer"),
            mean_of("within_fact_rank_corr", "rank_corr",
                    description="Spearman correlation across layers of trace effect and case S, mean over facts"),
            Metric("r_pooled", ("m_x", "m_y", "m_xx", "m_yy", "m_xy"), combine=correlation,
                   description="Pearson r of trace effect and case S over all (fact, layer) pairs (cluster bootstrap)"),
            paired_difference("regret", "S_traced_case", "S_best_case", scale=100.0, unit="points",
                              description="per-case S at the traced layer minus S at that case's best layer"),
            hm3("traced"), hm3("best"),
            mean_of("ES_traced", "ES_traced", scale=100.0, unit="%"),
            mean_of("PS_traced", "PS_traced", scale=100.0, unit="%"),
            mean_of("NS_traced", "NS_traced", scale=100.0, unit="%"),
            mean_of("NS_unedited", "NS_unedited", scale=100.0, unit="%"),
            paired_difference("NS_change_traced", "NS_traced", "NS_unedited", scale=100.0, unit="points",
                              description="NS at the traced layer minus NS of the unedited model"),
            mean_of("traced_random_advantage", "adv_random", scale=100.0, unit="points",
                    description="S at the traced layer minus S at one random other layer"),
            mean_of("refused_share", "refused_any", description="share of cases where ROME refused some layer's edit"),
        ]

    # --- running ------------------------------------------------------------------------------

    def setup(self, ctx: StudyContext, model: SuiteModel | None) -> dict[str, Any]:
        assert model is not None
        handle = ctx.model(model.spec)
        return {"handle": handle, "n_layers": handle.arch.n_layers}

    def _rewrites(self, state: Mapping[str, Any], seed: int) -> list[Any]:
        from workbench_protocols.editing import rewrites_for

        n = self.options()["cases_per_seed"]
        return rewrites_for(state["handle"], n, seed=100 + seed)

    def case_keys(self, state: Any, seed: int) -> list[str]:
        return [str(rw.case_id) for rw in self._rewrites(state, seed)]

    def run_case(self, state: Any, seed: int, key: str) -> dict[str, Any]:
        from workbench_protocols.editing import EditSite, edit_each, editor_at, trace_peak, unedited

        handle, n_layers = state["handle"], state["n_layers"]
        rw = next(r for r in self._rewrites(state, seed) if str(r.case_id) == key)
        peak = trace_peak(handle, rw, seed=seed, window=self.options()["trace"]["window"])
        by_layer = []
        for layer in range(n_layers):  # the action and its controls: one code path, layer is the only change
            editor = editor_at("rome", handle, EditSite(layer, peak["fact_token"]))
            by_layer.append({"layer": layer, **edit_each(handle, editor, [rw])[0].row()})
        base = unedited(handle, [rw])[0]
        traced = peak["layer"]
        others = [L for L in range(n_layers) if L != traced]
        rand_layer = random.Random(case_seed(seed, key)).choice(others) if others else traced
        s = [b["S_case"] for b in by_layer]
        comp = Comparison("causal_tracing", "ROME at the traced layer", "S (case, 0-1)", s[traced], s[rand_layer],
                          "random other layer")
        trace = peak.pop("trace")
        compact = {"tokens": trace["tokens"], "subject_span": trace["subject_span"], "scores": trace["scores"]["mlp"],
                   "corrupted_prob": trace["corrupted_prob"], "clean_prob": trace["clean_prob"], "prompt": trace["prompt"]}
        return {"rewrite": {"subject": rw.subject, "prompt": rw.prompt, "target_true": rw.target_true,
                            "target_new": rw.target_new},
                "peak": peak, "trace": compact, "by_layer": by_layer, "unedited": base,
                "random_layer": rand_layer, "comparisons": [comp.to_json()]}

    def rows(self, record: Mapping[str, Any]) -> list[dict[str, Any]]:
        by_layer = record["by_layer"]
        traced = record["peak"]["layer"]
        s = [b["S_case"] if b["S_case"] is not None else 0.0 for b in by_layer]
        ie = record["peak"]["effects_at_peak_token"]
        others = [s[L] for L in range(len(s)) if L != traced]
        best = max(range(len(s)), key=lambda L: (s[L], -L))
        t = by_layer[traced]
        pairs = list(zip(ie, s))
        n = len(pairs)
        row = {
            "traced_layer": traced, "fact_token": record["peak"]["fact_token"], "best_layer": best,
            "S_traced_case": s[traced], "S_other_case": sum(others) / len(others) if others else None,
            "S_best_case": s[best], "best_match": s[traced] >= s[best] - 0.01,
            "rank_corr": spearman(ie, s),
            "m_x": sum(x for x, _ in pairs) / n, "m_y": sum(y for _, y in pairs) / n,
            "m_xx": sum(x * x for x, _ in pairs) / n, "m_yy": sum(y * y for _, y in pairs) / n,
            "m_xy": sum(x * y for x, y in pairs) / n,
            "ES_traced": t["ES"], "PS_traced": t["PS"], "NS_traced": t["NS"],
            "ES_best": by_layer[best]["ES"], "PS_best": by_layer[best]["PS"], "NS_best": by_layer[best]["NS"],
            "NS_unedited": record["unedited"]["NS"],
            "adv_random": s[traced] - s[record["random_layer"]],
            "refused_any": any(b.get("refused") for b in by_layer),
            "peak_effect": record["peak"]["effect"],
        }
        for L, b in enumerate(by_layer):
            row[f"S_L{L}"] = s[L]
            row[f"ES_L{L}"] = b["ES"]
            row[f"NS_L{L}"] = b["NS"]
            row[f"IE_L{L}"] = ie[L]
        return [row]

    # --- figures --------------------------------------------------------------------------------

    def figures(self, results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[Figure]:
        from workbench import study_plots
        from workbench.bootstrap import estimate

        if not rows:
            return []
        n_layers = max(int(k[3:]) for r in rows for k in r if k.startswith("S_L")) + 1
        series: dict[str, list[tuple[float, float, float | None, float | None]]] = {}
        for label, key, scale in (("S (ROME at layer)", "S_L", 100.0), ("ES", "ES_L", 100.0), ("NS", "NS_L", 100.0),
                                  ("trace effect x100 (MLP, peak token)", "IE_L", 100.0)):
            pts = []
            for L in range(n_layers):
                est = estimate(rows, mean_of("m", f"{key}{L}", scale=scale), n_resamples=500, seed=L)
                pts.append((L, est.value if est.value is not None else math.nan, est.low, est.high))
            series[label] = pts
        figs = [study_plots.curves(
            "fig_layer_curves.png",
            "ROME at every layer (the action and its controls), mean over all cases with 95% CIs, beside the mean "
            "causal-trace effect at each layer. If localization predicted editability the curves would peak together.",
            series, xlabel="layer", ylabel="percent", xticks=list(range(n_layers)))]
        counts = [[0] * n_layers for _ in range(n_layers)]
        for r in rows:
            counts[r["traced_layer"]][r["best_layer"]] += 1
        figs.append(study_plots.heatmap(
            "fig_traced_vs_best.png", "Cases by traced layer (rows) and best edit layer (columns): on the diagonal "
            "the trace picked the best layer.", counts, rows=[f"traced L{L}" for L in range(n_layers)],
            cols=[f"best L{L}" for L in range(n_layers)], cmap="Blues", colorbar="cases"))
        figs.append(_scatter(rows, n_layers))
        trace_fig = _trace_heatmap(self.store, rows)
        if trace_fig is not None:
            figs.append(trace_fig)
        return figs


def _scatter(rows: Sequence[Mapping[str, Any]], n_layers: int) -> Figure:
    from workbench import study_plots

    fig = study_plots.figure(5.5, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    for L in range(n_layers):  # models of several depths: each layer's points come from the models that have it
        xs = [r[f"IE_L{L}"] for r in rows if f"S_L{L}" in r]
        ys = [100 * r[f"S_L{L}"] for r in rows if f"S_L{L}" in r]
        ax.scatter(xs, ys, s=10, alpha=0.6, label=f"layer {L}")
    ax.set_xlabel("causal-trace indirect effect of the layer's MLP (peak token)", fontsize=8)
    ax.set_ylabel("ROME S of the case at that layer", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, frameon=False)
    ax.set_title("Every (fact, layer): does a larger trace effect mean a better edit?", fontsize=9)
    from workbench.casestudy import Figure as F

    return F("fig_effect_vs_success.png", "Trace effect vs edit success for every fact and layer (Hase et al.'s "
             "analysis).", study_plots.png(fig))


def _trace_heatmap(store: Any, rows: Sequence[Mapping[str, Any]]) -> Figure | None:
    """The causal trace of the first stored case, drawn from its record."""
    from workbench import study_plots

    if store is None:
        return None
    ids = store.case_ids()
    if not ids:
        return None
    rec = store.load_case(ids[0])["result"]
    tr = rec["trace"]
    b, e = tr["subject_span"]
    labels = [f"{t}*" if b <= i < e else t for i, t in enumerate(tr["tokens"])]
    n_layers = len(tr["scores"][0])
    return study_plots.heatmap(
        "fig_causal_trace.png",
        f"Causal trace of one case ({tr['prompt']!r}): p(answer) with the MLP state at (token, layer) restored after "
        f"corrupting the subject (*). Clean {tr['clean_prob']:.3f}, corrupted {tr['corrupted_prob']:.3f}; traced "
        f"layer {rec['peak']['layer']} at token {rec['peak']['token_text']!r}.",
        tr["scores"], rows=labels, cols=[f"L{L}" for L in range(n_layers)], cmap="Greens", colorbar="p(answer)",
        title="Restoring MLP outputs (window 1)")
