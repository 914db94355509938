"""The editing protocol: trace -> edit site -> editor -> fit / apply / score / revert.

`workbench edit`, the editing studies and `workbench tune` all edit through these functions,
so a method is configured, placed and measured the same way wherever it runs:

- `rewrites_for(handle, n, seed)`: CounterFact-format rewrites of a zoo model's FactWorld;
  `request_rewrite` one rewrite from a user's request; `validate_rewrites` checks them all
  before anything is fitted.
- `trace_edit_site(handle, rewrites)`: the causal trace's finding as an edit site: the MLP
  layer where most traced facts peak (ties: the lower layer) and the token editors key on
  (the last subject token, or the prompt's last token when the trace peaks there).
- `choose_edit_site(handle, method, rewrites, layer=...)`: the site for a request: the layer
  given, the traced one (`"auto"`), or, when none is given, the layer the model ships as
  measured (zoo models), otherwise the traced one.
- `editor_at(method, handle, site, **overrides)`: the editor configured for a site, starting
  from the options the model ships (`handle.info["editor_defaults"]`, read from its folder).
- `edit_each` / `edit_batch`: fit (one rewrite at a time, or all at once), apply, score with
  `workbench.counterfact`, revert. An edit the editor refuses (ROME's "disabling edit" guard)
  is scored as no edit and flagged, so refusals count against the method instead of vanishing
  from the averages.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import editors
from workbench.bootstrap import harmonic
from workbench.counterfact import evaluate_rewrites
from workbench.errors import WorkbenchError
from workbench.requests import Rewrite, subject_token_span, target_token_ids, validate_rewrite
from workbench.tokens import check_fits, encode_prompt
from workbench.tracing import causal_trace

log = logging.getLogger(__name__)

# A key read at the prompt's last token sees the whole context, so sampled context prefixes
# (which name other subjects) move it away from the bare prompt's key: editors keyed there
# use no prefixes, and MEMIT a looser clamp and more steps to reach its target.
PROMPT_LAST_OPTIONS: dict[str, dict[str, Any]] = {
    "rome": {"n_prefixes": 0},
    "memit": {"n_prefixes": 0, "clamp_norm_factor": 1.25, "v_steps": 40},
}
# Options that make a method perform the protocol's action, a rewrite of target_true into
# target_new (knowledge neurons suppress the true answer unless told to replace it).
REWRITE_OPTIONS: dict[str, dict[str, Any]] = {"kn": {"mode": "replace"}}
TRACE_CASES = 5

SiteSource = Literal["given", "traced"]


@dataclass(frozen=True)
class EditSite:
    """Where to edit: the MLP layer and the key token kind, and where that choice came from."""

    layer: int
    fact_token: str  # "subject_last" or "prompt_last"
    traced: tuple[dict[str, Any], ...] = ()
    source: SiteSource = "traced"

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "fact_token": self.fact_token, "traced": list(self.traced), "source": self.source}


@dataclass
class EditOutcome:
    """One rewrite's result: its full CounterFact scores, the delta (when kept) and any refusal."""

    rewrite: Rewrite
    scores: dict[str, Any]
    delta: Any = None
    refusal: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The scores a study keeps per case: trimmed, with the case's S and the refusal flag."""
        row = trim_scores(self.scores)
        row["S_case"] = case_s(row)
        row["refused"] = self.refusal is not None
        if self.refusal is not None:
            row["refusal"] = self.refusal[:300]
        row.update(self.info)
        return row


# --- data ------------------------------------------------------------------------------------

def rewrites_for(handle: Any, n: int, *, seed: int) -> list[Rewrite]:
    """`n` rewrites of the handle's FactWorld (zoo models only), with string case ids."""
    world = getattr(handle, "world", None)
    if world is None:
        raise WorkbenchError(f"{handle.spec} has no FactWorld; the editing studies run on zoo:factgpt")
    out = []
    for rec in world.counterfact_records(n, seed=seed):
        rw = Rewrite.from_counterfact(rec)
        out.append(dataclasses.replace(rw, case_id=f"{seed}-{rec['case_id']}"))
    return out


def request_rewrite(handle: Any, *, prompt: str, subject: str, target: str, target_true: str | None = None,
                    case_id: str = "0") -> Rewrite:
    """One rewrite from a user's request; `prompt` may hold `{}` or the subject itself.

    `target_true=None` takes the model's own top-1 next token as the current answer.
    """
    import torch

    if not subject or not subject.strip():
        raise WorkbenchError("the subject is empty; give the entity whose fact is rewritten")
    if "{}" not in prompt:
        if subject not in prompt:
            subject_token_span(handle.tokenizer, prompt, subject)  # raises, listing the prompt's tokens
        prompt = prompt.replace(subject, "{}", 1)
    subject_token_span(handle.tokenizer, prompt, subject)
    target_ids = target_token_ids(handle.tokenizer, target)
    if target_true is None:
        ids = encode_prompt(handle.tokenizer, prompt.format(subject))
        check_fits(handle.model, len(ids) + len(target_ids), "the prompt with its target")
        with torch.no_grad():
            logits = handle.model(input_ids=torch.tensor([ids], device=handle.device)).logits[0, -1]
        target_true = handle.tokenizer.decode([int(logits.argmax())]).strip() or None
    return Rewrite(prompt=prompt, subject=subject, target_new=target.strip(), target_true=target_true, case_id=case_id)


def validate_rewrites(handle: Any, rewrites: Sequence[Rewrite], *, source: str = "request") -> None:
    """Fail before any fitting, naming the case, on a subject or target the tokenizer cannot place."""
    for i, rw in enumerate(rewrites):
        try:
            validate_rewrite(handle.tokenizer, rw, model=handle.model)
        except WorkbenchError as exc:
            raise WorkbenchError(f"{source} case {rw.case_id if rw.case_id is not None else i}: {exc}") from None


# --- where to edit ---------------------------------------------------------------------------

def trace_peak(handle: Any, rewrite: Rewrite, *, seed: int = 0, n_samples: int = 10, window: int = 1) -> dict[str, Any]:
    """The MLP peak of one fact's causal trace, and the per-layer indirect effects at the peak token."""
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


def trace_edit_site(handle: Any, rewrites: Sequence[Rewrite], *, n_trace: int = TRACE_CASES, seed: int = 0) -> EditSite:
    """The most common MLP peak layer over the first `n_trace` rewrites (ties: the lower layer)."""
    found = []
    for rw in rewrites[:n_trace]:
        p = trace_peak(handle, rw, seed=seed)
        found.append({k: p[k] for k in ("layer", "token", "token_text", "effect", "last_token", "fact_token")})
    if not found:
        raise WorkbenchError("tracing an edit site needs at least one rewrite")
    counts = Counter(f["layer"] for f in found)
    layer = min(counts, key=lambda L: (-counts[L], L))
    last = sum(f["last_token"] for f in found) * 2 > len(found)
    return EditSite(layer, "prompt_last" if last else "subject_last", tuple(found), "traced")


def shipped_options(handle: Any, method: str) -> dict[str, Any]:
    """The options the model ships for `method` (`handle.info["editor_defaults"]`), limited to the editor's fields."""
    info = getattr(handle, "info", None)
    shipped = (info.get("editor_defaults") or {}).get(method, {}) if isinstance(info, dict) else {}
    names = {f.name for f in dataclasses.fields(editors.get(method))}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in shipped.items() if k in names}


def _places_layer(cls: type, source: SiteSource) -> Literal["layer", "ending_at", "layers", None]:
    """How a site's layer reaches an editor class: its `layer`, `ending_at`, or (asked for) `layers`."""
    names = {f.name for f in dataclasses.fields(cls)}
    if "layer" in names:
        return "layer"
    if hasattr(cls, "ending_at"):
        return "ending_at"
    if "layers" in names and source == "given":  # e.g. knowledge neurons, restricted to one layer on request
        return "layers"
    return None


def choose_edit_site(handle: Any, method: str, rewrites: Sequence[Rewrite], *,
                     layer: int | Literal["auto"] | None = None, fact_token: str | None = None,
                     seed: int = 0) -> EditSite | None:
    """The site of an edit request: the `layer` given, the traced one (`"auto"`), or by default none.

    By default (`layer=None`) a model that ships a measured layer for `method` keeps it, and so
    does a method without a layer of its own (knowledge neurons attribute over every layer):
    both return None, which `editor_at` reads as "the shipped options as they are". Any other
    model is traced. `fact_token` replaces the key token a trace would choose.
    """
    if isinstance(layer, int) and not isinstance(layer, bool):
        return EditSite(layer, fact_token or "subject_last", (), "given")
    if layer not in (None, "auto"):
        raise WorkbenchError(f"layer {layer!r}: expected a layer number or 'auto'")
    if layer is None:
        shipped = shipped_options(handle, method)
        if "layer" in shipped or "layers" in shipped or _places_layer(editors.get(method), "traced") is None:
            return None
    site = trace_edit_site(handle, rewrites, seed=seed)
    return dataclasses.replace(site, fact_token=fact_token) if fact_token is not None else site


def editor_at(method: str, handle: Any, site: EditSite | None, **overrides: Any) -> Any:
    """Editor `method` configured to edit at `site` (None: where the model's shipped options say), plus overrides.

    Starts from the model's shipped options and the protocol's own (`REWRITE_OPTIONS`, and
    `PROMPT_LAST_OPTIONS` for a key at the prompt's last token); `overrides` (a user's
    settings, a tuner's trial) win over all of them.
    """
    cls = editors.get(method)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {**shipped_options(handle, method), **REWRITE_OPTIONS.get(method, {})}
    place = _places_layer(cls, site.source) if site is not None else None
    if site is not None:
        kwargs.pop("layer", None)
        kwargs.pop("layers", None)
        if "fact_token" in names:
            kwargs["fact_token"] = site.fact_token
            if site.fact_token == "prompt_last":
                kwargs.update(PROMPT_LAST_OPTIONS.get(method, {}))
    kwargs.update(overrides)
    try:
        if site is not None and not ({"layer", "layers"} & set(overrides)):
            if place == "layer":
                kwargs["layer"] = site.layer
            elif place == "ending_at":
                return cls.ending_at(site.layer, handle.arch.n_layers, **kwargs)
            elif place == "layers":
                kwargs["layers"] = (site.layer,)
        return cls(**kwargs)
    except TypeError as exc:
        raise WorkbenchError(f"invalid options for {method}: {exc}") from None


# --- fit, apply, score, revert ---------------------------------------------------------------

def score_rewrites(handle: Any, rewrites: Sequence[Rewrite], *, fluency: bool = False, seed: int = 0,
                   batch_size: int = 64) -> list[dict[str, Any]]:
    """Full CounterFact scores of each rewrite on the model as it is now."""
    return evaluate_rewrites(handle, rewrites, fluency=fluency, seed=seed, bootstrap=0, batch_size=batch_size).per_case


def trim_scores(case: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("ES", "PS", "NS", "EM", "PM", "NM", "EA", "PA", "NA", "GE", "rewrite_p_new", "rewrite_p_true")
    return {k: case.get(k) for k in keep if k in case}


def case_s(case: Mapping[str, Any]) -> float | None:
    """One case's S: harmonic mean of its ES, PS, NS shares (0..1)."""
    vals = [case.get(k) for k in ("ES", "PS", "NS")]
    if any(v is None for v in vals):
        return None
    return harmonic(*[float(v) for v in vals])


def edit_each(handle: Any, editor: Any, rewrites: Sequence[Rewrite], *, fluency: bool = False, seed: int = 0,
              batch_size: int = 64, keep_deltas: bool = False,
              on_case: Callable[[EditOutcome], None] | None = None) -> list[EditOutcome]:
    """Fit and score each rewrite alone (its own delta applied, then reverted)."""
    out = []
    for rw in rewrites:
        try:
            delta = editor.fit(handle, rw)
        except WorkbenchError as exc:
            log.info("%s refused %s: %s", type(editor).__name__, rw.case_id, exc)
            scores = score_rewrites(handle, [rw], fluency=fluency, seed=seed, batch_size=batch_size)[0]
            outcome = EditOutcome(rw, scores, refusal=str(exc))
        else:
            with delta.applied(handle.model):
                scores = score_rewrites(handle, [rw], fluency=fluency, seed=seed, batch_size=batch_size)[0]
            outcome = EditOutcome(rw, scores, delta if keep_deltas else None,
                                  info={"update_norm": sum(delta.norms().values())})
        if on_case is not None:
            on_case(outcome)
        out.append(outcome)
    return out


def edit_batch(handle: Any, editor: Any, rewrites: Sequence[Rewrite], *, fluency: bool = False, seed: int = 0,
               batch_size: int = 64, keep_delta: bool = False) -> tuple[list[EditOutcome], dict[str, Any]]:
    """Fit all rewrites in one delta (MEMIT), apply it, score every rewrite; also the fit's summary."""
    try:
        delta = editor.fit(handle, list(rewrites))
    except WorkbenchError as exc:
        scores = score_rewrites(handle, rewrites, fluency=fluency, seed=seed, batch_size=batch_size)
        return [EditOutcome(rw, s, refusal=str(exc)) for rw, s in zip(rewrites, scores)], {"refused": str(exc)[:300]}
    with delta.applied(handle.model):
        scores = score_rewrites(handle, rewrites, fluency=fluency, seed=seed, batch_size=batch_size)
    info = {"update_norm": sum(delta.norms().values())}
    return [EditOutcome(rw, s, delta if keep_delta else None) for rw, s in zip(rewrites, scores)], info


def unedited(handle: Any, rewrites: Sequence[Rewrite], *, fluency: bool = False, seed: int = 0) -> list[dict[str, Any]]:
    """The trimmed study rows of the unedited model."""
    rows = [trim_scores(s) for s in score_rewrites(handle, rewrites, fluency=fluency, seed=seed)]
    for r in rows:
        r["S_case"] = case_s(r)
    return rows


__all__ = ["EditOutcome", "EditSite", "PROMPT_LAST_OPTIONS", "REWRITE_OPTIONS", "case_s", "choose_edit_site",
           "edit_batch", "edit_each", "editor_at", "request_rewrite", "rewrites_for", "score_rewrites",
           "shipped_options", "trace_edit_site", "trace_peak", "trim_scores", "unedited", "validate_rewrites"]
