"""CounterFact metrics: did an edit change the fact, generalize, stay specific, keep fluency?

The protocol of Meng et al. (ROME), on CounterFact-format rewrites:

- ES (efficacy): share of cases where P(target_new) > P(target_true) on the rewrite prompt.
- PS (paraphrase): the same on each paraphrase prompt, averaged per case, then over cases.
- NS (neighbourhood): share of neighbourhood prompts (other subjects whose true answer is
  target_true) where P(target_true) > P(target_new) still; averaged per case.
- EM / PM / NM: the magnitudes, mean P(new) - P(true) (NM: P(true) - P(new)).
- S: harmonic mean of ES, PS and NS.
- Accuracy-style scores EA / PA / NA: the greedy (teacher-forced argmax) continuation is
  exactly target_new (EA, PA) or target_true (NA). Probability comparisons and accuracy can
  disagree (a target can beat the true object yet not be the top-1 answer), so both are
  reported.
- GE (fluency): weighted bi-/tri-gram entropy (weights 2/3 and 4/3, in bits) of text
  generated from the generation prompts, as in the ROME paper; a broken model repeats itself
  and its GE drops.

Scores are percentages (0-100) in the aggregate, shares (0-1) per case. The probability of
a multi-token target is the product of its token probabilities under teacher forcing. All
prompts of all cases are scored in a few batched forward passes.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.devices import model_device
from workbench.errors import WorkbenchError
from workbench.requests import Rewrite, target_token_ids
from workbench.tokens import context_length, encode_prompt, pad_batch, pad_id, sample_tokens

SCORE_KEYS = ("ES", "PS", "NS", "S")
MAGNITUDE_KEYS = ("EM", "PM", "NM")
ACCURACY_KEYS = ("EA", "PA", "NA")
_WORD = re.compile(r"\w+|[^\w\s]")


# --- scoring targets ------------------------------------------------------------------------

@torch.no_grad()
def score_continuations(
    handle: Any,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log probability of each continuation after its prompt, and whether it is the greedy one.

    `pairs` are (prompt ids, continuation ids). Returns (log_prob [n] float64: the sum of the
    continuation's token log-probabilities under teacher forcing; argmax [n] bool: every
    continuation token is the model's top-1 prediction at its position). Right padding keeps
    positions exact for causal models.
    """
    model = handle.model
    device = model_device(model)
    pad = pad_id(handle.tokenizer)
    logp_out = torch.zeros(len(pairs), dtype=torch.float64)
    top_out = torch.zeros(len(pairs), dtype=torch.bool)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            ids, mask = pad_batch([list(pairs[i][0]) + list(pairs[i][1]) for i in chunk], pad, device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            for row, i in enumerate(chunk):
                n_prompt, target = len(pairs[i][0]), list(pairs[i][1])
                pos = torch.arange(n_prompt - 1, n_prompt - 1 + len(target), device=logits.device)
                tgt = torch.tensor(target, device=logits.device)
                lp = logprobs[row, pos, tgt]
                logp_out[i] = float(lp.double().sum())
                top_out[i] = bool((logits[row, pos].argmax(-1) == tgt).all())
    finally:
        model.train(was_training)
    return logp_out, top_out


# --- fluency --------------------------------------------------------------------------------

def ngram_entropy(text: str, *, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Weighted mean of the n-gram entropies (bits) of `text`'s words (ROME's fluency measure).

    A text too short to hold an n-gram contributes 0 for that n.
    """
    words = _WORD.findall(text.lower())
    parts = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum((c / total) * math.log2(c / total) for c in grams.values()) if total else 0.0
        parts.append(w * h)
    return sum(parts) / len(parts)


@torch.no_grad()
def generate_texts(
    handle: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    top_k: int | None = 5,
    seed: int = 0,
    batch_size: int = 64,
) -> list[str]:
    """Continue each prompt (seeded top-k sampling, or greedy with `top_k=None`); returns the new text.

    Prompts of equal token length are batched together, so no padding (and no position
    bookkeeping) is needed. Generation stops at the model's context length.
    """
    model, tok = handle.model, handle.tokenizer
    device = model_device(model)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    encoded = [encode_prompt(tok, p) for p in prompts]
    limit = context_length(model)
    out: list[str] = [""] * len(prompts)
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    was_training = model.training
    model.eval()
    try:
        for length in sorted(groups):
            members = groups[length]
            steps = max(0, min(max_new_tokens, (limit or length + max_new_tokens) - length))
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                ids = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=device)
                new = sample_tokens(model, ids, steps, top_k=top_k, generator=gen)
                for row, i in enumerate(chunk):
                    out[i] = tok.decode(new[row].tolist(), skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out


# --- evaluation -----------------------------------------------------------------------------

@dataclass(frozen=True)
class EvaluationResult:
    """Per-case dicts (shares 0-1) and aggregate percentages, with bootstrap intervals."""

    per_case: list[dict[str, Any]]
    aggregate: dict[str, float | None]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"aggregate": dict(self.aggregate), "intervals": {k: list(v) for k, v in self.intervals.items()},
                "per_case": list(self.per_case)}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean; None if any value is missing, 0 if any is 0."""
    if not values or any(v is None for v in values):
        return None
    if any(v <= 0 for v in values):  # type: ignore[operator]
        return 0.0
    return len(values) / sum(1.0 / v for v in values)  # type: ignore[operator]


def drop_batch_conflicts(rewrites: Sequence[Rewrite], subjects: Sequence[str]) -> tuple[list[Rewrite], int]:
    """The rewrites with neighbourhood prompts about facts that the same batch rewrites removed.

    In mass editing a case's neighbour (another subject with the same true object) may itself
    be rewritten for the same relation in the batch: its answer is then meant to change, and
    counting it as an unwanted change mixes two things. A neighbourhood prompt's subject is
    found by name among `subjects` (longest match first). Returns the rewrites (those left
    with no neighbourhood prompt keep an empty tuple) and how many prompts were dropped.
    """
    from dataclasses import replace

    edited = {(rw.subject, rw.relation_id) for rw in rewrites}
    names = sorted(subjects, key=len, reverse=True)

    def subject_of(text: str) -> str | None:
        return next((s for s in names if s in text), None)

    out, dropped = [], 0
    for rw in rewrites:
        keep = tuple(p for p in rw.neighborhood_prompts if (subject_of(p), rw.relation_id) not in edited)
        dropped += len(rw.neighborhood_prompts) - len(keep)
        out.append(replace(rw, neighborhood_prompts=keep))
    return out, dropped


def evaluate_rewrites(
    handle: Any,
    rewrites: Sequence[Rewrite],
    *,
    batch_size: int = 64,
    fluency: bool = True,
    max_new_tokens: int = 32,
    top_k: int | None = 5,
    seed: int = 0,
    bootstrap: int = 1000,
) -> EvaluationResult:
    """Score every rewrite on its rewrite, paraphrase, neighbourhood and generation prompts.

    Rewrites without `target_true` cannot be scored by comparison and are refused. Returns
    per-case shares and magnitudes and the aggregate (percent) with seeded bootstrap 95%
    intervals over cases (`bootstrap=0` skips them).
    """
    rewrites = list(rewrites)
    if not rewrites:
        raise WorkbenchError("no rewrites to evaluate")
    tok = handle.tokenizer
    pairs: list[tuple[list[int], list[int]]] = []
    index: list[tuple[int, str, int]] = []  # (case, kind, prompt number); two pairs each: new, true
    for c, rw in enumerate(rewrites):
        if not rw.target_true:
            raise WorkbenchError(f"rewrite {rw.case_id if rw.case_id is not None else c} has no target_true; "
                                 "CounterFact metrics compare target_new with the true answer")
        new_ids, true_ids = target_token_ids(tok, rw.target_new), target_token_ids(tok, rw.target_true)
        kinds = (("rewrite", [rw.text]), ("paraphrase", list(rw.paraphrase_prompts)),
                 ("neighborhood", list(rw.neighborhood_prompts)))
        for kind, prompts in kinds:
            for j, text in enumerate(prompts):
                ids = encode_prompt(tok, text)
                pairs.append((ids, new_ids))
                pairs.append((ids, true_ids))
                index.append((c, kind, j))
    logp, top = score_continuations(handle, pairs, batch_size=batch_size)

    scored: list[dict[str, list[tuple[float, float, bool, bool]]]] = [
        {"rewrite": [], "paraphrase": [], "neighborhood": []} for _ in rewrites]
    for n, (c, kind, _j) in enumerate(index):
        lp_new, lp_true = float(logp[2 * n]), float(logp[2 * n + 1])
        scored[c][kind].append((lp_new, lp_true, bool(top[2 * n]), bool(top[2 * n + 1])))

    generations: list[list[str]] = [[] for _ in rewrites]
    if fluency:
        prompts, owner = [], []
        for c, rw in enumerate(rewrites):
            for p in rw.generation_prompts:
                prompts.append(p)
                owner.append(c)
        if prompts:
            texts = generate_texts(handle, prompts, max_new_tokens=max_new_tokens, top_k=top_k, seed=seed,
                                   batch_size=batch_size)
            for c, text in zip(owner, texts):
                generations[c].append(text)

    per_case = [case_metrics(rw, scored[c], generations[c] if fluency else None) for c, rw in enumerate(rewrites)]
    aggregate = aggregate_cases(per_case)
    intervals = bootstrap_intervals(per_case, n_resamples=bootstrap, seed=seed) if bootstrap else {}
    return EvaluationResult(per_case, aggregate, intervals)


def case_metrics(
    rewrite: Rewrite,
    scored: Mapping[str, Sequence[tuple[float, float, bool, bool]]],
    generations: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One case's shares and magnitudes from (log P(new), log P(true), new is top-1, true is top-1) tuples."""

    def success(rows: Sequence[tuple[float, float, bool, bool]], new_wins: bool) -> float | None:
        vals = [float((a > b) if new_wins else (b > a)) for a, b, _, _ in rows]
        return _mean(vals)

    def magnitude(rows: Sequence[tuple[float, float, bool, bool]], new_wins: bool) -> float | None:
        vals = [(math.exp(a) - math.exp(b)) * (1 if new_wins else -1) for a, b, _, _ in rows]
        return _mean(vals)

    def accuracy(rows: Sequence[tuple[float, float, bool, bool]], new: bool) -> float | None:
        return _mean([float(tn if new else tt) for _, _, tn, tt in rows])

    rw, pa, nb = scored["rewrite"], scored["paraphrase"], scored["neighborhood"]
    out: dict[str, Any] = {
        "case_id": rewrite.case_id,
        "subject": rewrite.subject,
        "target_new": rewrite.target_new,
        "target_true": rewrite.target_true,
        "ES": success(rw, True), "PS": success(pa, True), "NS": success(nb, False),
        "EM": magnitude(rw, True), "PM": magnitude(pa, True), "NM": magnitude(nb, False),
        "EA": accuracy(rw, True), "PA": accuracy(pa, True), "NA": accuracy(nb, False),
        "rewrite_p_new": math.exp(rw[0][0]) if rw else None,
        "rewrite_p_true": math.exp(rw[0][1]) if rw else None,
    }
    if generations is not None:
        out["GE"] = _mean([ngram_entropy(t) for t in generations])
        out["generations"] = list(generations)
    return out


_AGG_KEYS = ("ES", "PS", "NS", "EM", "PM", "NM", "EA", "PA", "NA", "GE")


def aggregate_cases(per_case: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Mean over cases (cases lacking a prompt kind are skipped for it); scores in percent, S = HM(ES, PS, NS).

    GE stays in bits; magnitudes are in percent points of probability.
    """
    out: dict[str, float | None] = {"n_cases": len(per_case)}
    for key in _AGG_KEYS:
        vals = [float(c[key]) for c in per_case if c.get(key) is not None]
        m = _mean(vals)
        out[key] = None if m is None else (m if key == "GE" else 100.0 * m)
    out["S"] = harmonic_mean([out["ES"], out["PS"], out["NS"]])
    out["S_accuracy"] = harmonic_mean([out["EA"], out["PA"], out["NA"]])
    return out


def bootstrap_intervals(
    per_case: Sequence[Mapping[str, Any]],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of the aggregate metrics, resampling cases (seeded)."""
    n = len(per_case)
    if n < 2 or n_resamples <= 0:
        return {}
    gen = torch.Generator().manual_seed(seed)
    keys = ("ES", "PS", "NS", "EM", "PM", "NM", "EA", "PA", "NA", "GE")
    table = torch.full((n, len(keys)), float("nan"), dtype=torch.float64)
    for i, case in enumerate(per_case):
        for j, key in enumerate(keys):
            if case.get(key) is not None:
                table[i, j] = float(case[key])
    idx = torch.randint(0, n, (n_resamples, n), generator=gen)
    samples = table[idx]  # [resamples, n, keys]
    means = torch.nanmean(samples, dim=1)
    scale = torch.tensor([1.0 if k == "GE" else 100.0 for k in keys], dtype=torch.float64)
    means = means * scale
    es, ps, ns = means[:, 0], means[:, 1], means[:, 2]
    s = 3.0 / (1.0 / es + 1.0 / ps + 1.0 / ns)
    s = torch.where((es <= 0) | (ps <= 0) | (ns <= 0), torch.zeros_like(s), s)
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    out: dict[str, tuple[float, float]] = {}
    for j, key in enumerate(keys):
        col = means[:, j]
        col = col[~torch.isnan(col)]
        if col.numel():
            out[key] = (float(torch.quantile(col, lo_q)), float(torch.quantile(col, hi_q)))
    s = s[~torch.isnan(s)]
    if s.numel():
        out["S"] = (float(torch.quantile(s, lo_q)), float(torch.quantile(s, hi_q)))
    return out
