"""Fit an editor on rewrites and measure it: the shared step of the editing studies and tuning.

- `rewrites_for(handle, n, seed)`: CounterFact-format rewrites of a zoo model's FactWorld.
- `trace_edit_site(handle, rewrites)`: the causal trace's finding, as an edit site (layer and
  the token editors should key on: the last subject token, or the prompt's last token when
  the trace peaks there, as FactGPT's does).
- `editor_for(name, site, n_layers, **overrides)`: an editor configured for that site.
- `edit_each` / `edit_batch`: fit (one rewrite at a time, or all at once), apply, score
  with `workbench.counterfact`, revert. An edit the editor refuses (ROME's "disabling edit"
  guard) is scored as no edit, and flagged, so refusals count against the method instead
  of vanishing from the averages.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from workbench.errors import WorkbenchError

log = logging.getLogger(__name__)

# Settings for editors keyed on the prompt's last token (FactGPT v1's lookup site). Measured by
# the editing helper (benchmarks/RESULTS.md, "Editing"): sampled context prefixes move the
# last-token key away from the plain prompt's (ES 40 with 10 prefixes, 100 without), and
# MEMIT needs a looser clamp and more steps there.
PROMPT_LAST_OPTIONS: dict[str, dict[str, Any]] = {
    "rome": {"n_prefixes": 0},
    "memit": {"n_prefixes": 0, "clamp_norm_factor": 1.25, "v_steps": 40},
}
SINGLE_EDITORS = ("rome", "ft", "ft-l", "kn")


@dataclass(frozen=True)
class EditSite:
    """Where the trace says the fact is read: the MLP layer and the key token kind."""

    layer: int
    fact_token: str  # "subject_last" or "prompt_last"
    traced: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "fact_token": self.fact_token, "traced": list(self.traced)}


def rewrites_for(handle: Any, n: int, *, seed: int) -> list[Any]:
    """`n` rewrites of the handle's FactWorld (zoo models only), with string case ids."""
    from dataclasses import replace

    from workbench.requests import Rewrite

    world = getattr(handle, "world", None)
    if world is None:
        raise WorkbenchError(f"{handle.spec} has no FactWorld; the editing studies run on zoo:factgpt")
    out = []
    for rec in world.counterfact_records(n, seed=seed):
        rw = Rewrite.from_counterfact(rec)
        out.append(replace(rw, case_id=f"{seed}-{rec['case_id']}"))
    return out


def trace_peak(handle: Any, rewrite: Any, *, seed: int = 0, n_samples: int = 10, window: int = 1) -> dict[str, Any]:
    """The MLP peak of one fact's causal trace, and the per-layer indirect effects at the peak token."""
    from workbench.causal_trace import causal_trace

    trace = causal_trace(handle, rewrite.prompt, rewrite.subject, target=rewrite.target_true, kinds=("mlp",),
                         n_samples=n_samples, window=window, seed=seed)
    peak = trace.peak("mlp")
    effects = trace.indirect_effect("mlp")
    last = len(trace.tokens) - 1
    subj_last = trace.subject_span[1] - 1
    return {"layer": int(peak.layer), "token": int(peak.token), "token_text": peak.token_text,
            "effect": float(peak.effect), "last_token": int(peak.token) == last,
            "fact_token": "prompt_last" if int(peak.token) == last else "subject_last",
            "effects_at_peak_token": [float(x) for x in effects[peak.token]],
            "effects_subject_last": [float(x) for x in effects[subj_last]],
            "effects_prompt_last": [float(x) for x in effects[last]],
            "clean_prob": trace.clean_prob, "corrupted_prob": trace.corrupted_prob,
            "trace": trace.to_json()}


def trace_edit_site(handle: Any, rewrites: Sequence[Any], *, n_trace: int = 5, seed: int = 0) -> EditSite:
    """The most common MLP peak layer over the first `n_trace` rewrites (ties: the lower layer)."""
    found = []
    for rw in rewrites[:n_trace]:
        p = trace_peak(handle, rw, seed=seed)
        found.append({k: p[k] for k in ("layer", "token", "token_text", "effect", "last_token", "fact_token")})
    counts = Counter(f["layer"] for f in found)
    layer = min(counts, key=lambda L: (-counts[L], L))
    last = sum(f["last_token"] for f in found) * 2 > len(found)
    return EditSite(layer, "prompt_last" if last else "subject_last", tuple(found))


def editor_for(name: str, site: EditSite, n_layers: int, **overrides: Any) -> Any:
    """Editor `name` configured to edit at `site` (plus any overrides)."""
    import editors  # noqa: F401  (registers every editor)
    from editors.registry import get
    from workbench.zoo.factgpt import EDITOR_DEFAULTS  # the studies' model ships its measured options

    cls = get(name)
    kwargs: dict[str, Any] = dict(EDITOR_DEFAULTS.get(name, {}))
    if name in ("rome", "memit"):
        kwargs["fact_token"] = site.fact_token
        if site.fact_token == "prompt_last":
            kwargs.update(PROMPT_LAST_OPTIONS[name])
    if name == "memit":
        kwargs.update(overrides)
        if "layers" not in kwargs:
            return cls.ending_at(site.layer, n_layers, **kwargs)
        return cls(**kwargs)
    if name in ("rome", "ft", "ft-l"):
        kwargs["layer"] = site.layer
    if name == "kn":
        kwargs["mode"] = "replace"
    kwargs.update(overrides)
    return cls(**kwargs)


def score_rewrites(handle: Any, rewrites: Sequence[Any], *, fluency: bool, seed: int) -> list[dict[str, Any]]:
    from workbench.counterfact import evaluate_rewrites

    return evaluate_rewrites(handle, rewrites, fluency=fluency, seed=seed, bootstrap=0).per_case


def trim_scores(case: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("ES", "PS", "NS", "EM", "PM", "NM", "EA", "PA", "NA", "GE", "rewrite_p_new", "rewrite_p_true")
    return {k: case.get(k) for k in keep if k in case}


def case_s(case: Mapping[str, Any]) -> float | None:
    """One case's S: harmonic mean of its ES, PS, NS shares (0..1)."""
    from workbench.bootstrap import harmonic

    vals = [case.get(k) for k in ("ES", "PS", "NS")]
    if any(v is None for v in vals):
        return None
    return harmonic(*[float(v) for v in vals])


def edit_each(handle: Any, editor: Any, rewrites: Sequence[Any], *, fluency: bool = False,
              seed: int = 0) -> list[dict[str, Any]]:
    """Fit and score each rewrite alone (its own delta applied, then reverted)."""
    out = []
    for rw in rewrites:
        refused = None
        info: dict[str, Any] = {}
        try:
            delta = editor.fit(handle, rw)
        except WorkbenchError as exc:
            refused = str(exc)
            log.info("%s refused %s: %s", type(editor).__name__, rw.case_id, exc)
            scores = score_rewrites(handle, [rw], fluency=fluency, seed=seed)[0]
        else:
            info = {"update_norm": sum(delta.norms().values())}
            with delta.applied(handle.model):
                scores = score_rewrites(handle, [rw], fluency=fluency, seed=seed)[0]
        row = trim_scores(scores)
        row["S_case"] = case_s(row)
        row["refused"] = refused is not None
        if refused:
            row["refusal"] = refused[:300]
        row.update(info)
        out.append(row)
    return out


def edit_batch(handle: Any, editor: Any, rewrites: Sequence[Any], *, fluency: bool = False,
               seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Fit all rewrites in one delta (MEMIT), apply it, score every rewrite."""
    try:
        delta = editor.fit(handle, list(rewrites))
    except WorkbenchError as exc:
        scores = score_rewrites(handle, rewrites, fluency=fluency, seed=seed)
        rows = [{**trim_scores(s), "refused": True} for s in scores]
        for r in rows:
            r["S_case"] = case_s(r)
        return rows, {"refused": str(exc)[:300]}
    with delta.applied(handle.model):
        scores = score_rewrites(handle, rewrites, fluency=fluency, seed=seed)
    rows = [{**trim_scores(s), "refused": False} for s in scores]
    for r in rows:
        r["S_case"] = case_s(r)
    return rows, {"update_norm": sum(delta.norms().values())}


def unedited(handle: Any, rewrites: Sequence[Any], *, fluency: bool = False, seed: int = 0) -> list[dict[str, Any]]:
    rows = [trim_scores(s) for s in score_rewrites(handle, rewrites, fluency=fluency, seed=seed)]
    for r in rows:
        r["S_case"] = case_s(r)
    return rows
