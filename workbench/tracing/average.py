"""The average indirect effect over many facts, by token bucket and layer (the paper's summary figure)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from workbench.errors import WorkbenchError
from workbench.requests import Rewrite
from workbench.tracing.engine import KINDS, causal_trace, check_kinds
from workbench.tracing.plots import CMAPS, LABELS, figure, layer_ticks, save_png

if TYPE_CHECKING:
    from workbench.handle import ModelHandle

# Token buckets of the paper's average-indirect-effect figure, in its order.
BUCKETS: tuple[str, ...] = (
    "first subject token", "middle subject tokens", "last subject token",
    "first subsequent token", "further tokens", "last token",
)


@dataclass(frozen=True, eq=False)
class AverageIndirectEffect:
    """Mean indirect effect per token bucket x layer for each kind, over many traced facts."""

    kinds: tuple[str, ...]
    buckets: tuple[str, ...]
    effects: dict[str, torch.Tensor]  # kind -> [len(buckets), n_layers] mean indirect effect
    scores: dict[str, torch.Tensor]  # kind -> [len(buckets), n_layers] mean restored probability
    counts: tuple[int, ...]  # token rows that fed each bucket
    n_facts: int
    n_skipped: int
    mean_clean_prob: float
    mean_corrupted_prob: float
    peaks: tuple[dict[str, Any], ...]  # each fact's per-kind peak (layer, token, bucket)
    window: int = 10

    @property
    def mean_total_effect(self) -> float:
        return self.mean_clean_prob - self.mean_corrupted_prob

    def peak(self, kind: str) -> dict[str, Any]:
        """The bucket and layer of the largest mean indirect effect."""
        if kind not in self.effects:
            raise WorkbenchError(f"no {kind!r} average; have {', '.join(self.effects)}")
        eff = torch.nan_to_num(self.effects[kind], nan=-math.inf)
        row, layer = divmod(int(torch.argmax(eff)), eff.shape[1])
        return {"kind": kind, "bucket": self.buckets[row], "layer": layer, "effect": float(eff[row, layer])}

    def to_json(self) -> dict[str, Any]:
        return {
            "kinds": list(self.kinds), "buckets": list(self.buckets), "counts": list(self.counts),
            "n_facts": self.n_facts, "n_skipped": self.n_skipped,
            "mean_clean_prob": self.mean_clean_prob, "mean_corrupted_prob": self.mean_corrupted_prob,
            "mean_total_effect": self.mean_total_effect,
            "effects": {k: _nan_list(v) for k, v in self.effects.items()},
            "scores": {k: _nan_list(v) for k, v in self.scores.items()},
            "peak": {k: self.peak(k) for k in self.kinds},
            "per_fact_peaks": list(self.peaks),
        }

    def plot(self, path: str | Path) -> Path:
        """One PNG: a panel per kind, token buckets x layers, colour = mean indirect effect."""
        fig = figure(len(self.kinds), height=2.6)
        for i, kind in enumerate(self.kinds):
            ax = fig.add_subplot(1, len(self.kinds), i + 1)
            data = self.effects[kind].numpy()
            img = ax.imshow(data, aspect="auto", cmap=CMAPS[kind], interpolation="nearest")
            ax.set_yticks(range(len(self.buckets)))
            ax.set_yticklabels(self.buckets if i == 0 else [], fontsize=7)
            layer_ticks(ax, data.shape[1])
            ax.set_title(f"Avg indirect effect, {LABELS[kind]}", fontsize=8)
            ax.set_xlabel("layer" if kind == "hidden" else f"centre of {self.window}-layer window", fontsize=7)
            cb = fig.colorbar(img, ax=ax)
            cb.ax.tick_params(labelsize=6)
        fig.suptitle(f"{self.n_facts} facts, mean total effect {self.mean_total_effect:.3f}", fontsize=8)
        return save_png(fig, Path(path))


def _nan_list(t: torch.Tensor) -> list[list[float | None]]:
    return [[None if math.isnan(x) else x for x in row] for row in t.tolist()]


def _bucket_rows(span: tuple[int, int], n_tokens: int) -> list[list[int]]:
    """Token positions feeding each bucket (as in the paper's summary code)."""
    first_subj, first_after = span
    last_subj, last = first_after - 1, n_tokens - 1
    return [
        [first_subj],
        list(range(first_subj + 1, last_subj)),
        [last_subj],
        [first_after] if first_after < n_tokens else [],
        list(range(first_after + 1, last)),
        [last],
    ]


def _as_case(item: Any) -> tuple[str, str, str | None]:
    if isinstance(item, Rewrite):
        return item.prompt, item.subject, item.target_true
    if isinstance(item, Mapping) and "requested_rewrite" in item:
        rw = Rewrite.from_counterfact(item)
        return rw.prompt, rw.subject, rw.target_true
    if isinstance(item, Mapping) and {"prompt", "subject"} <= set(item):
        return item["prompt"], item["subject"], item.get("target")
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return item[0], item[1], item[2] if len(item) == 3 else None
    raise WorkbenchError(f"cannot trace {type(item).__name__} {item!r}: give a Rewrite, a CounterFact record, "
                         "a {'prompt', 'subject'[, 'target']} dict or a (prompt, subject[, target]) tuple")


def average_indirect_effect(
    handle: ModelHandle,
    records_or_rewrites: Iterable[Any],
    *,
    kinds: Sequence[str] | str = KINDS,
    noise: float = 3.0,
    n_samples: int = 10,
    window: int = 10,
    seed: int = 0,
    batch_size: int | None = None,
    known_only: bool = True,
    progress: bool = False,
) -> AverageIndirectEffect:
    """Trace many facts and average the indirect effects by token bucket and layer.

    Each case's answer is its true target (CounterFact `target_true`) when given, else the
    model's top-1. `known_only` skips cases whose clean top-1 is not that answer (the paper
    traces facts the model knows). Every fact uses the same seed, so the same noise draws.
    """
    from workbench.progress import progress_bar

    kinds = check_kinds(kinds)
    cases = [_as_case(item) for item in records_or_rewrites]
    if not cases:
        raise WorkbenchError("average_indirect_effect needs at least one fact")
    n_layers = handle.arch.n_layers
    sums = {k: torch.zeros(len(BUCKETS), n_layers, dtype=torch.float64) for k in kinds}
    prob_sums = {k: torch.zeros(len(BUCKETS), n_layers, dtype=torch.float64) for k in kinds}
    counts = [0] * len(BUCKETS)
    clean = corrupted = 0.0
    used = skipped = 0
    peaks: list[dict[str, Any]] = []
    for prompt, subject, target in progress_bar(cases, enabled=progress, desc="tracing", unit="fact"):
        trace = causal_trace(handle, prompt, subject, target=target, kinds=kinds, noise=noise, n_samples=n_samples,
                             window=window, seed=seed, batch_size=batch_size)
        if known_only and target is not None:
            if trace.predicted_id != trace.target_id:
                skipped += 1
                continue
        used += 1
        clean += trace.clean_prob
        corrupted += trace.corrupted_prob
        rows = _bucket_rows(trace.subject_span, len(trace.tokens))
        for i, tokens in enumerate(rows):
            counts[i] += len(tokens)
            for k in kinds:
                if tokens:
                    sums[k][i] += trace.indirect_effect(k)[tokens].double().sum(0)
                    prob_sums[k][i] += trace.scores[k][tokens].double().sum(0)
        fact_peaks = {"prompt": trace.prompt, "subject": subject}
        for k in kinds:
            p = trace.peak(k)
            # the final position can also be the first after the subject: name it "last token"
            order = [len(rows) - 1, *range(len(rows) - 1)]
            bucket = next((BUCKETS[i] for i in order if p.token in rows[i]), None)
            fact_peaks[k] = {"layer": p.layer, "token": p.token, "bucket": bucket, "effect": p.effect}
        peaks.append(fact_peaks)
    if used == 0:
        raise WorkbenchError(f"none of the {len(cases)} facts is known to the model (clean top-1 = target); "
                             "pass known_only=False to average them anyway")
    denom = torch.tensor(counts, dtype=torch.float64).unsqueeze(1)
    with torch.no_grad():
        effects = {k: (sums[k] / denom).float() for k in kinds}  # 0/0 -> nan for empty buckets
        scores = {k: (prob_sums[k] / denom).float() for k in kinds}
    result = AverageIndirectEffect(
        kinds=kinds, buckets=BUCKETS, effects=effects, scores=scores, counts=tuple(counts), n_facts=used,
        n_skipped=skipped, mean_clean_prob=clean / used, mean_corrupted_prob=corrupted / used, peaks=tuple(peaks),
        window=window,
    )
    return result


__all__ = ["BUCKETS", "AverageIndirectEffect", "average_indirect_effect"]
