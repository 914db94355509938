"""Knowledge-neuron attribution (Dai et al. 2022) with captum's integrated gradients.

For each prompt and layer, the MLP intermediate activations at the prompt's last position
(`blocks.{L}.mlp.hook_post`, the input of the MLP's output projection) are scaled from zero
to their actual value; integrated gradients of the target token's probability give each
neuron's attribution. All neurons of a layer share one path (the whole activation vector is
scaled, as in the authors' code), so one captum call with `steps` scaled copies in one batch
attributes the whole layer. Refinement as in the paper: per prompt keep neurons above
`threshold` x that prompt's max attribution, then keep the neurons kept for at least `share`
of the prompts (paraphrases of the same fact).

    attr = attribute_neurons(h, ["The capital of Vel Oran is", "Vel Oran's capital is"], "Quenn")
    attr.top(5)        # [KnowledgeNeuron(layer=2, neuron=117, score=0.031), ...]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch

from workbench.devices import check_model_device
from workbench.errors import WorkbenchError
from workbench.hooks import capture, patch
from workbench.requests import target_token_ids
from workbench.sites import require_causal_lm
from workbench.tokens import check_fits, last_logits_kwargs

if TYPE_CHECKING:
    from workbench.handle import ModelHandle

log = logging.getLogger(__name__)

SITE = "blocks.{L}.mlp.hook_post"
Method = Literal["riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre"]
METHODS: tuple[str, ...] = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre")
MAX_STEPS = 10_000  # integration steps: the paper uses 20; far beyond this the sum changes nothing measurable


class KnowledgeNeuron(NamedTuple):
    """One MLP neuron and its attribution (mean over the prompts); unpacks as a tuple."""

    layer: int
    neuron: int
    score: float


@dataclass(frozen=True, eq=False)
class NeuronAttribution:
    """Attributions of every neuron in the chosen layers for each prompt, plus the refined set."""

    prompts: tuple[str, ...]
    target: str  # the attributed token, as text
    target_id: int
    layers: tuple[int, ...]
    scores: torch.Tensor  # [n_prompts, len(layers), d_mlp] integrated gradients
    probs: tuple[float, ...]  # the target's probability on each prompt
    deltas: torch.Tensor  # [n_prompts, len(layers)] captum convergence delta
    neurons: tuple[KnowledgeNeuron, ...]  # refined (threshold + share), best first
    kept: tuple[tuple[tuple[int, int], ...], ...]  # per prompt: (layer, neuron) above threshold
    steps: int
    threshold: float
    share: float
    method: str

    @property
    def mean_scores(self) -> torch.Tensor:
        """[len(layers), d_mlp] attribution averaged over the prompts."""
        return self.scores.mean(dim=0)

    def top(self, k: int) -> list[KnowledgeNeuron]:
        """The k best refined neurons (fewer if fewer passed the thresholds)."""
        return list(self.neurons[:k])

    def ranked(self, k: int | None = None) -> list[KnowledgeNeuron]:
        """All neurons of the attributed layers by mean attribution, ignoring the thresholds."""
        mean = self.mean_scores
        order = torch.argsort(mean.flatten(), descending=True, stable=True)
        if k is not None:
            order = order[:k]
        d_mlp = mean.shape[1]
        return [KnowledgeNeuron(self.layers[int(i) // d_mlp], int(i) % d_mlp, float(mean.flatten()[i])) for i in order]

    def by_layer(self) -> dict[int, list[int]]:
        """Refined neurons grouped by layer (what a neuron editor needs)."""
        out: dict[int, list[int]] = {}
        for n in self.neurons:
            out.setdefault(n.layer, []).append(n.neuron)
        return out

    def to_json(self, *, include_scores: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "prompts": list(self.prompts), "target": self.target, "target_id": self.target_id,
            "layers": list(self.layers), "steps": self.steps, "threshold": self.threshold, "share": self.share,
            "method": self.method,
            "neurons": [n._asdict() for n in self.neurons],
            "per_prompt": [
                {
                    "prompt": p,
                    "prob": self.probs[i],
                    "max_score": float(self.scores[i].max()),
                    "kept": [{"layer": layer, "neuron": neuron, "score": float(self.scores[i, self.layers.index(layer), neuron])}
                             for layer, neuron in self.kept[i]],
                    "convergence_delta": {str(layer): float(self.deltas[i, j]) for j, layer in enumerate(self.layers)},
                }
                for i, p in enumerate(self.prompts)
            ],
        }
        if include_scores:
            data["scores"] = self.scores.tolist()
        return data


# --- refinement ---------------------------------------------------------------------------

def refine_neurons(scores: torch.Tensor, layers: Sequence[int], *, threshold: float = 0.2,
                   share: float = 0.5) -> tuple[tuple[KnowledgeNeuron, ...], tuple[tuple[tuple[int, int], ...], ...]]:
    """The paper's two filters on `scores` [n_prompts, n_layers, d_mlp].

    Per prompt: neurons with attribution > threshold x the prompt's max over all layers (none
    when that max is not positive). Across prompts: neurons kept for >= share of the prompts.
    Survivors are ranked by their mean attribution. Returns (neurons, per-prompt kept pairs).
    """
    if scores.ndim != 3 or scores.shape[1] != len(layers):
        raise WorkbenchError(f"scores must be [n_prompts, {len(layers)} layers, d_mlp]; got {tuple(scores.shape)}")
    _check_fraction("threshold", threshold)
    _check_fraction("share", share)
    n_prompts = scores.shape[0]
    peak = scores.flatten(1).max(dim=1).values  # [n_prompts]
    keep = (scores > threshold * peak.view(-1, 1, 1)) & (peak.view(-1, 1, 1) > 0)
    kept = tuple(tuple((layers[int(j)], int(n)) for j, n in torch.nonzero(keep[i]).tolist()) for i in range(n_prompts))
    needed = max(1, math.ceil(share * n_prompts - 1e-9))
    shared = keep.sum(dim=0) >= needed  # [n_layers, d_mlp]
    mean = scores.mean(dim=0)
    cells = torch.nonzero(shared).tolist()
    neurons = sorted((KnowledgeNeuron(layers[j], n, float(mean[j, n])) for j, n in cells), key=lambda k: (-k.score, k.layer, k.neuron))
    return tuple(neurons), kept


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise WorkbenchError(f"{name} {value!r}: expected a fraction in [0, 1] (paper: threshold 0.2)")


# --- attribution ----------------------------------------------------------------------------

def _check(handle: ModelHandle, layers: Sequence[int] | None, steps: int, method: str) -> tuple[int, ...]:
    require_causal_lm(handle, "knowledge-neuron attribution")
    if not 1 <= steps <= MAX_STEPS:
        raise WorkbenchError(f"steps {steps}: expected 1..{MAX_STEPS} integration steps (paper: 20)")
    if method not in METHODS:
        raise WorkbenchError(f"unknown integration method {method!r}; valid: {', '.join(METHODS)}")
    n = handle.arch.n_layers
    chosen = tuple(range(n)) if layers is None else tuple(int(layer) for layer in layers)
    bad = [layer for layer in chosen if not 0 <= layer < n]
    if bad or not chosen:
        raise WorkbenchError(f"layer(s) {bad or list(chosen)} out of range; this model has layers 0..{n - 1}")
    if len(set(chosen)) != len(chosen):
        raise WorkbenchError(f"layers repeat: {list(chosen)}")
    return chosen


def _target_id(tokenizer: Any, target: str | int) -> int:
    if isinstance(target, int):
        return target
    ids = target_token_ids(tokenizer, target)
    if len(ids) > 1:
        log.info("target %r is %d tokens; attributing its first token", target, len(ids))
    return ids[0]


def _encode(handle: ModelHandle, prompt: str) -> torch.Tensor:
    if not isinstance(prompt, str) or not prompt.strip():
        raise WorkbenchError(f"prompt {prompt!r} is empty; give the text whose next token is the target")
    ids = handle.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    check_fits(handle.model, len(ids), f"the prompt {prompt[:30]!r}{'...' if len(prompt) > 30 else ''}")
    return torch.tensor([ids], dtype=torch.long, device=handle.device)


def _probability_fn(handle: ModelHandle, input_ids: torch.Tensor, layer: int, target_id: int) -> Any:
    """f(x) = P(target | prompt, last-position MLP activation of `layer` set to x), x: [B, d_mlp]."""
    site = SITE.format(L=layer)
    model = handle.model
    kwargs = last_logits_kwargs(model)

    def forward(x: torch.Tensor) -> torch.Tensor:
        ids = input_ids.expand(x.shape[0], input_ids.shape[1])

        def put_last(act: torch.Tensor) -> torch.Tensor:
            return torch.cat([act[:, :-1], x.unsqueeze(1).to(act.dtype)], dim=1)

        with patch(handle, {site: put_last}):
            out = model(input_ids=ids, use_cache=False, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return torch.softmax(logits[:, -1, :].float(), dim=-1)[:, target_id]

    return forward


def _activations(handle: ModelHandle, input_ids: torch.Tensor, layers: Sequence[int], target_id: int) -> tuple[dict[int, torch.Tensor], float]:
    sites = [SITE.format(L=layer) for layer in layers]
    with torch.no_grad(), capture(handle, sites) as acts:
        out = handle.model(input_ids=input_ids, use_cache=False, **last_logits_kwargs(handle.model))
    logits = out.logits if hasattr(out, "logits") else out[0]
    prob = float(torch.softmax(logits[0, -1].float(), dim=-1)[target_id])
    return {layer: acts[SITE.format(L=layer)][0, -1] for layer in layers}, prob


def attribute_neurons(
    handle: ModelHandle,
    prompts: str | Sequence[str],
    target: str | int,
    *,
    layers: Sequence[int] | None = None,
    steps: int = 20,
    threshold: float = 0.2,
    share: float = 0.5,
    method: Method = "riemann_right",
    batch_size: int | None = None,
    device: str | torch.device | None = None,
) -> NeuronAttribution:
    """Integrated-gradients attribution of every MLP neuron in `layers` (default: all).

    `prompts` are full texts (paraphrases of one fact) whose next token should be `target`
    (text, its first token is used, or a token id). One captum pass per (prompt, layer),
    with the `steps` scaled copies in one batch (`batch_size` caps rows per pass instead).
    `method="riemann_right"` is the paper's Riemann sum; `gausslegendre` converges faster.
    """
    from captum.attr import IntegratedGradients

    chosen = _check(handle, layers, steps, method)
    _check_fraction("threshold", threshold)
    _check_fraction("share", share)
    if batch_size is not None and batch_size < 1:
        raise WorkbenchError(f"batch_size {batch_size}: expected a positive number of rows per pass, or None "
                             "(all steps at once)")
    if device is not None:
        check_model_device(handle.device, device)
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise WorkbenchError("attribute_neurons needs at least one prompt")
    target_id = _target_id(handle.tokenizer, target)
    all_scores, all_deltas, probs = [], [], []
    for prompt in prompt_list:
        input_ids = _encode(handle, prompt)
        acts, prob = _activations(handle, input_ids, chosen, target_id)
        probs.append(prob)
        per_layer, deltas = [], []
        for layer in chosen:
            x = acts[layer].detach().float().unsqueeze(0)
            ig = IntegratedGradients(_probability_fn(handle, input_ids, layer, target_id))
            attr, delta = ig.attribute(x, baselines=torch.zeros_like(x), n_steps=steps, method=method,
                                       internal_batch_size=batch_size, return_convergence_delta=True)
            per_layer.append(attr[0].detach().float().cpu())
            deltas.append(float(delta.reshape(-1)[0]))
        all_scores.append(torch.stack(per_layer))
        all_deltas.append(deltas)
    scores = torch.stack(all_scores)
    neurons, kept = refine_neurons(scores, chosen, threshold=threshold, share=share)
    return NeuronAttribution(
        prompts=tuple(prompt_list), target=handle.tokenizer.decode([target_id]), target_id=target_id, layers=chosen,
        scores=scores, probs=tuple(probs), deltas=torch.tensor(all_deltas, dtype=torch.float32), neurons=neurons,
        kept=kept, steps=steps, threshold=threshold, share=share, method=method,
    )


__all__ = ["METHODS", "SITE", "KnowledgeNeuron", "Method", "NeuronAttribution", "attribute_neurons", "refine_neurons"]
