"""Study 2: ROME vs MEMIT vs FT vs FT-L vs KN on the same FactWorld rewrites (the ROME table).

Every method edits the same rewrite alone (its own delta, reverted after scoring), at the
edit site the causal trace picks (layer and key token, traced once at setup on other
facts), and is scored with the same CounterFact metrics, fluency included. The prediction
is the ROME paper's table: ROME has the best S; FT and FT-L reach the new fact but damage
neighbours; KN barely moves the fact; ROME keeps fluency. The paper's numbers (GPT-2 XL on
CounterFact) are shown beside ours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from workbench.bootstrap import Metric, harmonic, mean_of
from workbench.casestudy import (
    Anchor,
    CaseStudy,
    Control,
    Figure,
    Prediction,
    StudyContext,
    SuiteModel,
    ci_above,
    ci_below,
    ci_within,
)

METHODS = ("rome", "memit", "ft", "ft-l", "kn")
LABELS = {"unedited": "unedited", "rome": "ROME", "memit": "MEMIT", "ft": "FT", "ft-l": "FT-L", "kn": "KN"}
# ROME paper, Table (CounterFact, GPT-2 XL): ES, PS, NS, S per method (None: not in ANCHORS.md).
PAPER = {
    "unedited": {"ES": 22.2, "NS": 78.1},
    "rome": {"S": 89.2, "ES": 100.0, "PS": 96.4, "NS": 75.4},
    "ft": {"S": 65.1, "NS": 40.4},
    "ft-l": {"S": 66.9, "PS": 48.7},
    "kn": {"S": 35.6},
}


def _key(method: str) -> str:
    return method.replace("-", "")


def edit_site(ctx: StudyContext, handle: Any) -> Any:
    """The trace-chosen edit site of a FactGPT, computed once per model and run (studies 2 and 3 share it).

    Always traced, never the layer a model ships as measured: on a held-out model no layer was chosen."""
    from workbench_protocols.editing import rewrites_for, trace_edit_site

    return ctx.remember(f"edit_site:{handle.spec}", lambda: trace_edit_site(handle, rewrites_for(handle, 5, seed=7)))


class Study(CaseStudy):
    name = "editor_comparison"
    number = 2
    world = "factgpt"
    title = "ROME vs MEMIT vs FT vs FT-L vs KN on the same rewrites (the ROME table)"
    hypothesis = ("On the same rewrites, ROME gives the best balance of efficacy, generalization and specificity "
                  "(S); unconstrained and L-inf-constrained fine-tuning reach the new fact but break neighbours; "
                  "knowledge-neuron edits barely move the fact; ROME keeps fluency; MEMIT matches ROME for one edit.")
    controls = (
        Control("unedited", "the model before any edit, scored on the same prompts"),
        Control("FT / FT-L / KN", "the baseline editors of the ROME paper, same rewrite, same layer, same scoring"),
    )
    anchors = tuple(
        Anchor(f"{LABELS[m]} {k}, GPT-2 XL", v, f"{k}_{_key(m)}", "ROME paper, CounterFact table",
               "same metrics, different model and data")
        for m, d in PAPER.items() for k, v in d.items()
    )
    methods = ()
    tune_target = "rome"
    quick_seeds = 5
    default_seeds = 5

    def options(self) -> dict[str, Any]:
        return {"cases_per_seed": 2 if self.quick else 20, "methods": list(METHODS),
                "fluency": True, "records_seed": "200 + seed",
                "edit_site": "causal trace (MLP, window 1) of 5 other facts (records seed 7): most common peak layer; "
                             "key token = prompt's last if the peak is there", "kn_mode": "replace (Dai et al.)"}

    def predictions(self) -> list[Prediction]:
        src = "ROME paper, CounterFact, GPT-2 XL"
        return [
            Prediction("rome_beats_ft", "ROME's S beats FT's by at least 10 points", "S_rome_minus_ft", "increase",
                       ci_above(10.0), size=24.1, source=f"{src}: 89.2 vs 65.1", basis="paper"),
            Prediction("rome_beats_ftl", "ROME's S beats FT-L's by at least 10 points", "S_rome_minus_ftl", "increase",
                       ci_above(10.0), size=22.3, source=f"{src}: 89.2 vs 66.9", basis="paper"),
            Prediction("rome_beats_kn", "ROME's S beats KN's by at least 20 points", "S_rome_minus_kn", "increase",
                       ci_above(20.0), size=53.6, source=f"{src}: 89.2 vs 35.6", basis="paper"),
            Prediction("ft_breaks_neighbours", "FT's NS is at least 10 points below ROME's", "NS_ft_minus_rome",
                       "decrease", ci_below(-10.0), size=-35.0, source=f"{src}: 40.4 vs 75.4", basis="paper"),
            Prediction("rome_efficacy", "ROME's efficacy ES is at least 95", "ES_rome", "increase", ci_above(95.0),
                       size=100.0, source=f"{src}: 100", basis="paper"),
            Prediction("rome_fluency_kept", "ROME changes generation entropy GE by less than 5%", "GE_rome_rel_change",
                       "none", ci_within(-0.05, 0.05), size=-0.0075, source=f"{src}: GE 621.96 vs 626.64 unedited",
                       basis="paper"),
            Prediction("memit_matches_rome", "for single edits MEMIT's S is within 10 points of ROME's",
                       "S_memit_minus_rome", "none", ci_within(-10.0, 10.0), size=0.0,
                       source="MEMIT paper: MEMIT matches ROME at small edit counts", primary=False, basis="paper"),
        ]

    def metrics(self) -> list[Metric]:
        out: list[Metric] = []
        for m in ("unedited", *METHODS):
            k = _key(m)
            out.append(Metric(f"S_{k}", (f"ES_{k}", f"PS_{k}", f"NS_{k}"), combine=harmonic, scale=100.0, unit="%",
                              description=f"{LABELS[m]}: harmonic mean of ES, PS, NS"))
            for s in ("ES", "PS", "NS", "EA", "PA", "NA"):
                out.append(mean_of(f"{s}_{k}", f"{s}_{k}", scale=100.0, unit="%"))
            out.append(mean_of(f"GE_{k}", f"GE_{k}", unit="bits", description="weighted bi/tri-gram entropy"))

        def diff_s(a: str, b: str) -> Metric:
            ka, kb = _key(a), _key(b)
            return Metric(f"S_{ka}_minus_{kb}", tuple(f"{s}_{x}" for x in (ka, kb) for s in ("ES", "PS", "NS")),
                          combine=lambda e1, p1, n1, e2, p2, n2: harmonic(e1, p1, n1) - harmonic(e2, p2, n2),
                          scale=100.0, unit="points", description=f"S({LABELS[a]}) - S({LABELS[b]}), paired by case")

        out += [diff_s("rome", "ft"), diff_s("rome", "ft-l"), diff_s("rome", "kn"), diff_s("memit", "rome")]
        out.append(Metric("NS_ft_minus_rome", ("NS_ft", "NS_rome"), combine=lambda a, b: a - b, scale=100.0,
                          unit="points", description="NS(FT) - NS(ROME)"))
        out.append(Metric("GE_rome_rel_change", ("GE_rome", "GE_unedited"), combine=lambda a, b: a / b - 1.0,
                          description="GE(ROME) / GE(unedited) - 1"))
        out.append(mean_of("refused_share", "refused_any", description="share of cases where some editor refused"))
        return out

    def setup(self, ctx: StudyContext, model: SuiteModel | None) -> dict[str, Any]:
        assert model is not None
        handle = ctx.model(model.spec)
        return {"handle": handle, "site": edit_site(ctx, handle), "n_layers": handle.arch.n_layers}

    def _rewrites(self, state: Mapping[str, Any], seed: int) -> list[Any]:
        from workbench_protocols.editing import rewrites_for

        return rewrites_for(state["handle"], self.options()["cases_per_seed"], seed=200 + seed)

    def case_keys(self, state: Any, seed: int) -> list[str]:
        return [str(rw.case_id) for rw in self._rewrites(state, seed)]

    def run_case(self, state: Any, seed: int, key: str) -> dict[str, Any]:
        from workbench_protocols.editing import edit_each, editor_at, unedited

        handle, site = state["handle"], state["site"]
        rw = next(r for r in self._rewrites(state, seed) if str(r.case_id) == key)
        scores = {"unedited": unedited(handle, [rw], fluency=True, seed=seed)[0]}
        for m in METHODS:  # every method through the same fit-apply-score-revert code
            editor = editor_at(m, handle, site)
            scores[m] = edit_each(handle, editor, [rw], fluency=True, seed=seed)[0].row()
        return {"rewrite": {"subject": rw.subject, "prompt": rw.prompt, "target_true": rw.target_true,
                            "target_new": rw.target_new}, "site": site.to_json(), "scores": scores}

    def rows(self, record: Mapping[str, Any]) -> list[dict[str, Any]]:
        row: dict[str, Any] = {"subject": record["rewrite"]["subject"]}
        for m, sc in record["scores"].items():
            k = _key(m)
            for s in ("ES", "PS", "NS", "EA", "PA", "NA", "GE"):
                row[f"{s}_{k}"] = sc.get(s)
            row[f"S_case_{k}"] = sc.get("S_case")
        row["refused_any"] = any(sc.get("refused") for sc in record["scores"].values())
        return [row]

    def figures(self, results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[Figure]:
        from workbench import study_plots

        met = results["metrics"]
        groups = ["ES", "PS", "NS", "S"]
        series = {}
        for m in ("unedited", *METHODS):
            k = _key(m)
            series[LABELS[m]] = [(met[f"{g}_{k}"]["value"], *met[f"{g}_{k}"]["ci"]) for g in groups]
        return [study_plots.bars(
            "fig_editor_table.png", "The ROME table on FactWorld: every method edits the same rewrites one at a time "
            "(95% CIs). Dotted lines: ROME's row in the ROME paper (GPT-2 XL, CounterFact).", groups, series,
            ylabel="percent", published={"ROME paper (ROME)": [PAPER["rome"].get(g) for g in groups]})]
