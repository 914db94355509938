"""Knowledge-neuron edits (Dai et al. 2022) as weight deltas: suppress, amplify, replace.

A knowledge neuron is one MLP intermediate unit (layer, index) whose integrated-gradients
attribution to the true answer is high across paraphrases of a fact. Its effect on the
residual stream is its activation times its value vector: the matching column of the MLP
output projection (a row of GPT-2's `Conv1D` weight). Editing that vector edits the neuron
for every input at once, so the edit is a `WeightDelta`, not a hook:

- suppress: zero the value vector (the neuron's output is gone, as if its activation were 0);
- amplify: scale it by `factor` (1 is a no-op);
- replace: Dai et al.'s fact update, value += strength * (E[target_new] - E[target_true])
  with E the unembedding rows of the targets' first tokens.

`neuron_delta` builds the same deltas for any neuron list, e.g. random neurons as a control.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import torch

from editors.finetune import as_rewrites, request_json
from editors.registry import register
from workbench.delta import WeightDelta, assert_unchanged
from workbench.errors import WorkbenchError, require_finite
from workbench.handle import ModelHandle
from workbench.knowledge_neurons import attribute_neurons
from workbench.requests import Rewrite, target_token_ids
from workbench.sites import as_out_in, require_causal_lm

log = logging.getLogger(__name__)

Mode = Literal["suppress", "amplify", "replace"]
Neuron = tuple[int, int]


def mlp_width(handle: ModelHandle, layer: int = 0) -> int:
    """Number of MLP intermediate neurons of a layer (columns of mlp_out in out_in layout)."""
    site_map = require_causal_lm(handle, "knowledge-neuron edit", weight_role="mlp_out")
    weight, layout = site_map.weight(handle.model, "mlp_out", layer)
    return as_out_in(weight, layout).shape[1]


def _check_neurons(handle: ModelHandle, neurons: Iterable[Sequence[int]]) -> list[Neuron]:
    n_layers = handle.arch.site_map.n_layers(handle.model)
    out: list[Neuron] = []
    seen: set[Neuron] = set()
    for item in neurons:
        try:
            layer, idx = (int(v) for v in item)
        except (TypeError, ValueError):
            raise WorkbenchError(f"a neuron is a (layer, index) pair; got {item!r}") from None
        if not 0 <= layer < n_layers:
            raise WorkbenchError(f"neuron {item!r}: layer {layer} is out of range; {handle.spec} has layers 0..{n_layers - 1}")
        width = mlp_width(handle, layer)
        if not 0 <= idx < width:
            raise WorkbenchError(f"neuron {item!r}: index {idx} is out of range; layer {layer} has neurons 0..{width - 1}")
        if (layer, idx) not in seen:
            seen.add((layer, idx))
            out.append((layer, idx))
    if not out:
        raise WorkbenchError("no neurons given; pass (layer, index) pairs")
    return out


def _unembedding_row(handle: ModelHandle, target: str) -> torch.Tensor:
    """The output embedding of the target's first token (what the neuron should write)."""
    site_map = handle.arch.site_map
    if "unembedding" in site_map.weights:
        try:
            weight, layout = site_map.weight(handle.model, "unembedding")
        except WorkbenchError:
            weight, layout = site_map.weight(handle.model, "embedding")
    else:
        weight, layout = site_map.weight(handle.model, "embedding")
    table = weight if layout == "out_in" else weight.t()  # (vocab, d_model)
    return table[target_token_ids(handle.tokenizer, target)[0]].detach()


def _value_changes(handle: ModelHandle, neurons: Sequence[Neuron], vectors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense changes of mlp_out adding `vectors[i]` to neuron i's value vector (summed per parameter)."""
    site_map = handle.arch.site_map
    changes: dict[str, torch.Tensor] = {}
    for (layer, idx), vec in zip(neurons, vectors):
        name = site_map.weight_name(handle.model, "mlp_out", layer)
        weight, layout = site_map.weight(handle.model, "mlp_out", layer)
        change = changes.setdefault(name, torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))
        view = as_out_in(change, layout)  # a view: writes land in `change`
        view[:, idx] += vec.to(device=weight.device, dtype=torch.float32)
    return changes


def neuron_delta(
    handle: ModelHandle,
    neurons: Iterable[Sequence[int]],
    *,
    mode: Mode = "suppress",
    factor: float = 2.0,
    strength: float = 1.0,
    target_new: str | None = None,
    target_true: str | None = None,
    method: str = "kn",
    request: Any = None,
    extra: dict[str, Any] | None = None,
) -> WeightDelta:
    """A dense WeightDelta on mlp_out editing the given (layer, index) neurons.

    `suppress` zeroes each value vector; `amplify` scales it by `factor`; `replace` adds
    `strength * (E[target_new] - E[target_true])` (both targets required). The chosen
    neurons are recorded in the delta's `extra["neurons"]`. Works for any neurons, so the
    same call with random neurons is the control for an attributed edit.
    """
    site_map = require_causal_lm(handle, method, weight_role="mlp_out")
    chosen = _check_neurons(handle, neurons)
    with torch.no_grad():
        if mode == "suppress":
            vectors = [-_value(handle, n) for n in chosen]
        elif mode == "amplify":
            vectors = [(float(factor) - 1.0) * _value(handle, n) for n in chosen]
        elif mode == "replace":
            if not target_new or not target_true:
                raise WorkbenchError("mode 'replace' needs target_new and target_true (the answer to write and the one to remove)")
            direction = (_unembedding_row(handle, target_new).float() - _unembedding_row(handle, target_true).float())
            vectors = [float(strength) * direction for _ in chosen]
        else:
            raise WorkbenchError(f"mode must be 'suppress', 'amplify' or 'replace'; got {mode!r}")
        changes = _value_changes(handle, chosen, vectors)
    meta = {"mode": mode, "factor": factor, "strength": strength, "neurons": [list(n) for n in chosen],
            "params": sorted(changes), "family": site_map.family, **(extra or {})}
    return WeightDelta.from_model(handle.model, changes, method=method, request=request, extra=meta)


def _value(handle: ModelHandle, neuron: Neuron) -> torch.Tensor:
    layer, idx = neuron
    weight, layout = handle.arch.site_map.weight(handle.model, "mlp_out", layer)
    return as_out_in(weight, layout)[:, idx].detach().float()


def random_neurons(handle: ModelHandle, n: int, *, seed: int, layers: Sequence[int] | None = None,
                   exclude: Iterable[Sequence[int]] = ()) -> list[Neuron]:
    """`n` distinct neurons drawn uniformly (seeded) from `layers` (all by default), avoiding `exclude`."""
    require_causal_lm(handle, "random_neurons", weight_role="mlp_out")
    n_layers = handle.arch.site_map.n_layers(handle.model)
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise WorkbenchError(f"layer {layer} is out of range; {handle.spec} has layers 0..{n_layers - 1}")
    banned = {(int(a), int(b)) for a, b in exclude}
    pool = [(layer, i) for layer in layers for i in range(mlp_width(handle, layer)) if (layer, i) not in banned]
    if n > len(pool):
        raise WorkbenchError(f"asked for {n} random neurons but only {len(pool)} are available in layers {layers}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    picks = torch.randperm(len(pool), generator=gen)[:n].tolist()
    return [pool[i] for i in picks]


@register("kn")
@dataclass(frozen=True)
class KnowledgeNeuronEdit:
    """KN: attribute the fact to MLP neurons (integrated gradients), then edit their value vectors.

    Attribution runs on the rewrite prompt and its paraphrases toward the current answer
    (`target_true`; the model's own top-1 token when a rewrite has none), with the paper's
    relative `threshold` and `share` across prompts. At most `max_neurons` of the refined
    neurons are edited; if fewer than `min_neurons` pass the thresholds, the best by mean
    attribution are taken (logged, and marked `fallback_top` in the delta's metadata).
    `layers` restricts the search (None: every layer).
    """

    mode: Mode = "suppress"
    factor: float = 2.0
    strength: float = 1.0
    layers: tuple[int, ...] | None = None
    steps: int = 20
    threshold: float = 0.2
    share: float = 0.5
    max_neurons: int | None = 5
    min_neurons: int = 1
    use_paraphrases: bool = True
    batch_size: int | None = None

    method: ClassVar[str] = "kn"

    def __post_init__(self) -> None:
        require_finite(self)
        if self.mode not in ("suppress", "amplify", "replace"):
            raise WorkbenchError(f"mode must be 'suppress', 'amplify' or 'replace'; got {self.mode!r}")
        if self.steps < 1:
            raise WorkbenchError(f"steps must be at least 1; got {self.steps}")
        if self.max_neurons is not None and self.max_neurons < 1:
            raise WorkbenchError(f"max_neurons must be positive or None; got {self.max_neurons}")
        if self.min_neurons < 0:
            raise WorkbenchError(f"min_neurons must be >= 0; got {self.min_neurons}")

    def select(self, handle: ModelHandle, rewrite: Rewrite) -> tuple[list[Neuron], dict[str, Any]]:
        """The knowledge neurons of the rewrite's current fact, and the attribution record."""
        prompts = [rewrite.text, *(rewrite.paraphrase_prompts if self.use_paraphrases else ())]
        target: str | int = rewrite.target_true or _top1(handle, rewrite.text)
        attribution = attribute_neurons(
            handle, prompts, target, layers=None if self.layers is None else list(self.layers), steps=self.steps,
            threshold=self.threshold, share=self.share, batch_size=self.batch_size,
        )
        ranked = [(n.layer, n.neuron) for n in attribution.neurons]
        if self.max_neurons is not None:
            ranked = ranked[: self.max_neurons]
        fallback = len(ranked) < self.min_neurons
        if fallback:
            log.info("kn: %d neuron(s) passed the thresholds for %r; taking the top %d by mean attribution instead",
                     len(ranked), rewrite.text, self.min_neurons)
            ranked = [(n.layer, n.neuron) for n in attribution.ranked(self.min_neurons)]
        record = {"prompts": prompts, "target": attribution.target, "neurons": [list(n) for n in ranked],
                  "fallback_top": fallback, "attribution": attribution.to_json()}
        return ranked, record

    def fit(self, handle: ModelHandle, request: Rewrite | Sequence[Rewrite]) -> WeightDelta:
        """Attribute, then edit; the model is left exactly as it was."""
        require_causal_lm(handle, self.method, weight_role="mlp_out")
        rewrites = as_rewrites(request, self.method)
        if self.mode == "replace":
            missing = [i for i, rw in enumerate(rewrites) if not rw.target_true]
            if missing:
                raise WorkbenchError(f"kn mode 'replace' needs target_true (the answer to remove); rewrites {missing} have none")
        with assert_unchanged(handle.model):
            selections = [self.select(handle, rw) for rw in rewrites]
            union = list(dict.fromkeys(n for neurons, _ in selections for n in neurons))
            if not union:
                raise WorkbenchError("kn: no knowledge neurons were found for any rewrite "
                                     "(lower threshold, or set min_neurons >= 1)")
            if self.mode != "replace":
                # A neuron shared by two facts is suppressed (or scaled) once, not twice.
                changes = neuron_delta(handle, union, mode=self.mode, factor=self.factor).changes
            else:
                with torch.no_grad():
                    pairs = [(n, self.strength * (_unembedding_row(handle, rw.target_new).float()
                                                  - _unembedding_row(handle, rw.target_true).float()))
                             for rw, (neurons, _) in zip(rewrites, selections) for n in neurons]
                    changes = _value_changes(handle, [p[0] for p in pairs], [p[1] for p in pairs])
        neurons = sorted({tuple(n) for _, rec in selections for n in rec["neurons"]})
        delta = WeightDelta.from_model(
            handle.model, changes, method=self.method, request=request_json(rewrites),
            extra={"config": asdict(self), "mode": self.mode, "neurons": [list(n) for n in neurons],
                   "selections": [rec for _, rec in selections]},
        )
        log.info("kn %s: %d neuron(s) %s, norms %s", self.mode, len(neurons), neurons[:10],
                 {k: round(v, 4) for k, v in delta.norms().items()})
        return delta


@torch.no_grad()
def _top1(handle: ModelHandle, text: str) -> int:
    """The model's own next token after `text` (the answer to attribute when none is given)."""
    ids = handle.tokenizer(text, return_tensors="pt")["input_ids"].to(handle.device)
    return int(handle.model(input_ids=ids).logits[0, -1].argmax())
