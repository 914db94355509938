"""Study 3: mass editing. MEMIT at 10 / 100 / 1000 edits vs ROME applied sequentially.

For each seed one list of rewrites is drawn; the first N of it are edited (N = 10, 100,
1000; reduced in quick mode) by MEMIT in one batch, and by ROME one edit after another,
each fitted on the model carrying all previous edits (as in the MEMIT paper's baseline).
All N rewrites are then scored on the final model. Sequential ROME uses the unedited
model's key statistics for every edit, as the original code does (its statistics are
cached by model name); recomputing them after each edit would cost seconds per edit and
fill the statistics cache.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

from workbench.bootstrap import Metric, harmonic
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

METHODS = ("memit", "rome_seq")


class Study(CaseStudy):
    name = "mass_editing"
    number = 3
    world = "factgpt"
    title = "Mass editing: MEMIT at 10/100/1000 edits vs ROME applied sequentially"
    hypothesis = ("MEMIT writes many facts at once and keeps its scores as the number of edits grows; ROME applied "
                  "one edit after another degrades (earlier edits are overwritten, neighbours drift).")
    controls = (
        Control("ROME, sequential", "the same rewrites, one ROME edit after another on the accumulating model"),
        Control("smallest N", "the same methods at the smallest edit count (dose-response baseline)"),
    )
    anchors = (
        Anchor("MEMIT S, 10,000 edits, GPT-J", 85.8, "S_memit_max", "MEMIT paper, CounterFact",
               "same metric, far fewer edits and a smaller model"),
        Anchor("MEMIT ES, 10,000 edits, GPT-J", 98.9, "ES_memit_max", "MEMIT paper", "same metric, fewer edits"),
        Anchor("MEMIT NS, 10,000 edits, GPT-J", 73.7, "NS_memit_max", "MEMIT paper", "same metric, fewer edits"),
        Anchor("ROME applied 10,000 times, S, GPT-J", 50.3, "S_romeseq_max", "MEMIT paper",
               "same metric, fewer edits"),
    )
    methods = ()
    tune_target = "memit"
    quick_seeds = 2
    default_seeds = 2  # sequential ROME at 1000 edits dominates the full run (~5 min per seed on one core)

    def options(self) -> dict[str, Any]:
        sizes = [10, 40] if self.quick else [10, 100, 1000]
        return {"sizes": sizes, "records_seed": "300 + seed",
                "fluency": False, "edit_site": "the causal trace's (shared with study 2)",
                "rome_statistics": "the unedited model's, for every sequential edit"}

    @property
    def sizes(self) -> list[int]:
        return list(self.options()["sizes"])

    def predictions(self) -> list[Prediction]:
        return [
            Prediction("memit_beats_sequential_rome", "at the largest edit count MEMIT's S beats sequential ROME's "
                       "by at least 10 points", "S_memit_minus_romeseq_max", "increase", ci_above(10.0), size=35.5,
                       source="MEMIT paper, 10,000 edits on GPT-J: 85.8 vs 50.3", basis="paper"),
            Prediction("memit_scales", "MEMIT's S at the largest edit count is within 15 points of its S at the "
                       "smallest", "S_memit_max_minus_min", "none", ci_within(-15.0, 15.0), size=-5.0,
                       source="MEMIT paper: S stays high up to 10,000 edits", basis="paper"),
            Prediction("sequential_rome_degrades", "sequential ROME's S falls by at least 10 points from the "
                       "smallest to the largest edit count", "S_romeseq_max_minus_min", "decrease", ci_below(-10.0),
                       size=-39.0, source="MEMIT paper: ROME 89.2 single edit vs 50.3 at 10,000 sequential",
                       basis="paper"),
        ]

    def metrics(self) -> list[Metric]:
        lo, hi = min(self.sizes), max(self.sizes)

        def col(method: str, n: int, key: str) -> Any:
            return lambda r: r.get(key) if r["method"] == method and r["N"] == n else None

        def s_of(method: str, n: int) -> tuple[Any, ...]:
            return tuple(col(method, n, k) for k in ("ES", "PS", "NS"))

        out: list[Metric] = []
        for method in METHODS:
            k = method.replace("_", "")
            for tag, n in (("min", lo), ("max", hi)):
                out.append(Metric(f"S_{k}_{tag}", s_of(method, n), combine=harmonic, scale=100.0, unit="%",
                                  description=f"S of {method} at N={n}"))
                for s in ("ES", "PS", "NS", "NA"):
                    out.append(Metric(f"{s}_{k}_{tag}", (col(method, n, s),), scale=100.0, unit="%",
                                      description=f"{s} of {method} at N={n}"))
            out.append(Metric(f"S_{k}_max_minus_min", s_of(method, hi) + s_of(method, lo), combine=s_difference,
                              scale=100.0, unit="points", description=f"S({method}, N={hi}) - S({method}, N={lo})"))
        out.append(Metric("S_memit_minus_romeseq_max", s_of("memit", hi) + s_of("rome_seq", hi), combine=s_difference,
                          scale=100.0, unit="points", description=f"S(MEMIT) - S(sequential ROME) at N={hi}"))
        out.append(Metric("refused_share_romeseq", (lambda r: float(r["refused"]) if r["method"] == "rome_seq" else None,),
                          description="share of sequential ROME edits refused as degenerate"))
        return out

    def setup(self, ctx: StudyContext, model: SuiteModel | None) -> dict[str, Any]:
        from case_studies.editor_comparison import edit_site

        assert model is not None
        handle = ctx.model(model.spec)
        return {"handle": handle, "site": edit_site(ctx, handle), "n_layers": handle.arch.n_layers}

    def case_keys(self, state: Any, seed: int) -> list[str]:
        return [f"{m}-{n}" for n in self.sizes for m in METHODS]

    def run_case(self, state: Any, seed: int, key: str) -> dict[str, Any]:
        from workbench_protocols.editing import edit_batch, editor_at, rewrites_for, unedited

        handle, site = state["handle"], state["site"]
        method, n = key.rsplit("-", 1)
        n = int(n)
        rewrites = rewrites_for(handle, max(self.sizes), seed=300 + seed)[:n]
        t0 = time.perf_counter()
        if method == "memit":
            outcomes, info = edit_batch(handle, editor_at("memit", handle, site), rewrites)
            rows = [o.row() for o in outcomes]
        else:
            rows, info = self._sequential_rome(handle, site, rewrites)
        seconds = time.perf_counter() - t0
        base = unedited(handle, rewrites)
        return {"method": method, "N": n, "seconds": seconds, "info": info, "site": site.to_json(),
                "rows": [{"i": i, **r, "NS_unedited": b["NS"]} for i, (r, b) in enumerate(zip(rows, base))]}

    def _sequential_rome(self, handle: Any, site: Any, rewrites: Sequence[Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        from editors.mlp_update import key_statistics
        from workbench.errors import WorkbenchError
        from workbench_protocols.editing import case_s, editor_at, score_rewrites, trim_scores

        editor = editor_at("rome", handle, site)
        layer = editor.resolved_layer(handle)
        unedited = {layer: key_statistics(handle, layer, corpus=editor.mom2_corpus, n_samples=editor.mom2_n_samples,
                                          seed=editor.seed)}
        refused: list[bool] = []
        with contextlib.ExitStack() as stack:
            for rw in rewrites:
                try:
                    delta = editor.fit(handle, rw, statistics=unedited)
                except WorkbenchError:
                    refused.append(True)
                    continue
                stack.enter_context(delta.applied(handle.model))  # reverted, last first, when the block ends
                refused.append(False)
            scores = score_rewrites(handle, rewrites, fluency=False, seed=0)
        rows = []
        for s, r in zip(scores, refused):
            row = {**trim_scores(s), "refused": r}
            row["S_case"] = case_s(row)
            rows.append(row)
        return rows, {"n_refused": sum(refused)}

    def rows(self, record: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [{"method": record["method"], "N": record["N"], **r} for r in record["rows"]]

    def figures(self, results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[Figure]:
        from workbench import study_plots
        from workbench.bootstrap import estimate

        sizes = sorted({r["N"] for r in rows})
        figs = []
        for metric in ("S", "ES", "PS", "NS"):
            series = {}
            for method, label in (("memit", "MEMIT (one batch)"), ("rome_seq", "ROME (sequential)")):
                pts = []
                for n in sizes:
                    sub = [r for r in rows if r["method"] == method and r["N"] == n]
                    if metric == "S":
                        m = Metric("S", ("ES", "PS", "NS"), combine=harmonic, scale=100.0)
                    else:
                        m = Metric(metric, (metric,), scale=100.0)
                    est = estimate(sub, m, n_resamples=500, seed=n)
                    pts.append((n, est.value if est.value is not None else float("nan"), est.low, est.high))
                series[label] = pts
            figs.append(study_plots.curves(
                f"fig_dose_{metric}.png", f"Dose-response: {metric} after N edits (all N rewrites scored on the final "
                "model; 95% CIs over rewrites).", series, xlabel="number of edits N", ylabel=f"{metric} (%)",
                logx=True, xticks=sizes, title=f"{metric} vs number of edits"))
        return figs


def s_difference(e1: float, p1: float, n1: float, e2: float, p2: float, n2: float) -> float:
    """S of the first (ES, PS, NS) triple minus S of the second."""
    return harmonic(e1, p1, n1) - harmonic(e2, p2, n2)
