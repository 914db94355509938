"""Steering folded into weights: a contrastive direction added to an output bias, with a strength.

The direction is the mean difference of a site's activations between two sets of inputs
(contrastive pairs, e.g. positive vs negative sentences; Turner et al.'s activation
addition, Li et al.'s mean-difference steering), read at a token position ("mean" over
real tokens, "first", "last", or an index). Adding `strength * direction` to the bias of
the layer that writes the site adds it at every position of every input, so the edit is a
WeightDelta that ships with the model (no hook at inference).

Where the bias lives:
- `blocks.L.mlp.hook_out` / `blocks.L.attn.hook_out` (or any Linear's output): that
  projection's bias.
- `blocks.L.hook_resid_post` of a pre-LN model (GPT-2, GPT-NeoX): the residual after block
  L is `resid_mid + mlp_out(...)` (NeoX parallel: `x + attn + mlp`), so adding to the MLP
  output bias adds exactly to the residual stream. In post-LN BERT the block output is a
  LayerNorm of that sum, so this equivalence fails and the site is refused (steer
  `blocks.L.mlp.hook_out` instead, which adds inside the LayerNorm).
- Llama-family projections have no bias at all: nothing to fold into; `steering_hook` adds
  the vector at run time instead.

`dose_response` sweeps the strength and records a measured quantity, with its Spearman
correlation to the strength (monotonic steering gives |rho| = 1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from editors.folding import NotFoldableError, canonical_kind, is_conv1d_hf
from editors.registry import register
from workbench.bootstrap import spearman
from workbench.delta import WeightDelta, assert_unchanged
from workbench.errors import WorkbenchError, require_finite
from workbench.handle import ModelHandle
from workbench.sites import Site, resolve_site
from workbench.unit_selection import Position

log = logging.getLogger(__name__)

_PRE_LN = ("gpt2", "gpt_neox")


@dataclass(frozen=True)
class ContrastPairs:
    """Two input sets whose activation difference defines the direction (positive minus negative)."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]

    @staticmethod
    def of(positive: Sequence[str], negative: Sequence[str]) -> ContrastPairs:
        return ContrastPairs(tuple(positive), tuple(negative))


def bias_target(handle: ModelHandle, site: str | Site) -> tuple[str, Site]:
    """The bias parameter that adds to `site` exactly (name), or NotFoldableError saying why not."""
    resolved = resolve_site(handle, site)
    model = handle.model
    module = model.get_submodule(resolved.module_path)
    family = handle.arch.family
    hook = ("use the run-time alternative `with editors.steering.steering_hook(handle, site, vector): ...`")
    if resolved.side == "output" and (isinstance(module, (nn.Linear, nn.Conv2d)) or is_conv1d_hf(module)):
        path = resolved.module_path
    else:
        kind = canonical_kind(resolved)
        site_map = handle.arch.site_map
        if site_map is None or resolved.layer is None or kind is None:
            raise NotFoldableError(f"site {resolved.name} is not the output of a layer with a bias; steer a Linear's output "
                                   f"(or blocks.L.mlp.hook_out / attn.hook_out on a transformer), or {hook}")
        if kind == "mlp.hook_out":
            role = "mlp_out"
        elif kind == "attn.hook_out":
            role = "attn_out"
        elif kind == "hook_resid_post" and family in _PRE_LN:
            role = "mlp_out"
        elif kind == "hook_resid_post":
            raise NotFoldableError(
                f"site {resolved.name}: in a {'post-LN ' if family == 'bert' else ''}{family} model the block output is not a "
                "plain sum ending in a biased projection, so a bias cannot add a vector to it exactly; steer "
                f"blocks.{resolved.layer}.mlp.hook_out (adds before the LayerNorm) or {hook}")
        else:
            raise NotFoldableError(f"site {resolved.name} is not written by a projection with a bias; steer blocks.L.mlp.hook_out, "
                                   f"blocks.L.attn.hook_out, or (GPT-2/NeoX) blocks.L.hook_resid_post; or {hook}")
        path = site_map.weight_name(model, role, resolved.layer).rsplit(".", 1)[0]
        module = model.get_submodule(path)
    if getattr(module, "bias", None) is None:
        raise NotFoldableError(f"{path} has no bias ({family} projections are bias-free), so steering cannot be folded into "
                               f"weights here; {hook}")
    return f"{path}.bias", resolved


def steering_direction(handle: ModelHandle, site: str | Site, pairs: ContrastPairs, *, position: Position = "mean",
                       batch_size: int = 32) -> torch.Tensor:
    """Mean activation on `pairs.positive` minus mean on `pairs.negative` at the site (a d-vector)."""
    from workbench.unit_selection import unit_activations

    if not pairs.positive or not pairs.negative:
        raise WorkbenchError("steering needs at least one positive and one negative input")
    pos = unit_activations(handle, site, list(pairs.positive), position=position, batch_size=batch_size)
    neg = unit_activations(handle, site, list(pairs.negative), position=position, batch_size=batch_size)
    return (pos.mean(0) - neg.mean(0)).float()


def steering_delta(handle: ModelHandle, site: str | Site, vector: torch.Tensor, *, request: Any = None,
                   extra: dict[str, Any] | None = None) -> WeightDelta:
    """A delta adding `vector` to the bias that writes `site`."""
    name, resolved = bias_target(handle, site)
    bias = dict(handle.model.named_parameters())[name]
    if vector.shape != bias.shape:
        raise WorkbenchError(f"steering vector has shape {tuple(vector.shape)} but {name} has {tuple(bias.shape)}")
    return WeightDelta.from_model(handle.model, {name: vector.detach().to(bias.dtype).cpu()}, method="steer", request=request,
                                  extra={"site": resolved.name, "param": name, "norm": float(vector.norm()), **(extra or {})})


@register("steer")
@dataclass(frozen=True)
class Steering:
    """Add `strength` x the contrastive mean-difference direction at `site` to its output bias.

    `unit_norm=True` scales the direction to norm 1 first (then `strength` is in activation
    units); otherwise strength 1 adds exactly the mean difference.
    """

    site: str
    strength: float = 1.0
    position: Position = "mean"
    unit_norm: bool = False

    name: ClassVar[str] = "steer"

    def __post_init__(self) -> None:
        require_finite(self)

    def fit(self, handle: ModelHandle, request: ContrastPairs) -> WeightDelta:
        if not isinstance(request, ContrastPairs):
            raise WorkbenchError("steer needs a ContrastPairs(positive, negative) request")
        bias_target(handle, self.site)  # refuse early when nothing can be folded
        with assert_unchanged(handle.model):
            direction = steering_direction(handle, self.site, request, position=self.position)
            if self.unit_norm:
                direction = direction / direction.norm().clamp(min=1e-12)
            return steering_delta(handle, self.site, self.strength * direction,
                                  request={"n_positive": len(request.positive), "n_negative": len(request.negative)},
                                  extra={"config": asdict(self), "direction_norm": float(direction.norm())})


@contextmanager
def steering_hook(handle: ModelHandle, site: str | Site, vector: torch.Tensor) -> Iterator[None]:
    """Add `vector` to a site's activation at every position at run time (any site, any family)."""
    from workbench.hooks import patch

    def add(act: torch.Tensor) -> torch.Tensor:
        v = vector.to(act)
        return act + (v.view(1, -1, 1, 1) if act.ndim == 4 else v)  # a conv map's features are its channels

    with patch(handle, {site: add}):
        yield


@dataclass(frozen=True)
class DoseResponse:
    """A measured quantity at each steering strength, and how monotonic the relation is."""

    strengths: list[float]
    values: list[float]
    spearman: float
    monotonic: bool
    site: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "strengths": self.strengths, "values": [round(v, 6) for v in self.values],
                "spearman": round(self.spearman, 6), "monotonic": self.monotonic, "details": self.details}

    def plot(self, path: str | Path, *, ylabel: str = "measured quantity") -> Path:
        from workbench.plotting import pyplot, save_figure

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ax.plot(self.strengths, self.values, "-o")
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_xlabel("steering strength")
        ax.set_ylabel(ylabel)
        ax.set_title(f"dose-response at {self.site} (Spearman {self.spearman:.3f})")
        fig.tight_layout()

        return save_figure(fig, path, dpi=100)


def dose_response(handle: ModelHandle, site: str | Site, direction: torch.Tensor, strengths: Sequence[float],
                  measure: Callable[[ModelHandle], float]) -> DoseResponse:
    """Apply `strength * direction` as a bias delta for each strength and record `measure(handle)`.

    `monotonic` is True when the values strictly increase or strictly decrease with strength.
    """
    if len(strengths) < 2:
        raise WorkbenchError("a dose-response sweep needs at least two strengths")
    xs = sorted(float(s) for s in strengths)
    values = []
    for s in xs:
        if s == 0.0:
            values.append(float(measure(handle)))
            continue
        delta = steering_delta(handle, site, s * direction)
        with delta.applied(handle.model):
            values.append(float(measure(handle)))
    diffs = [b - a for a, b in zip(values, values[1:])]
    mono = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    return DoseResponse(xs, values, spearman(xs, values) or 0.0, mono, resolve_site(handle, site).name,
                        {"direction_norm": float(direction.norm())})


NEUTRAL_SENTENCES: tuple[str, ...] = (
    "The meeting is on Tuesday at noon.", "She walked to the station.", "The report has twelve pages.",
    "They moved the table into the kitchen.", "The train leaves from platform four.", "He read the letter twice.",
    "The shop opens at nine.", "We painted the fence last week.")


def concept_axis_measure(handle: ModelHandle, texts: Sequence[str], labels: Sequence[int],
                         probe_texts: Sequence[str] = NEUTRAL_SENTENCES) -> Callable[[ModelHandle], float]:
    """A `dose_response` measure: the mean projection of `probe_texts`' pooled final states on the
    unedited model's class-1-minus-class-0 axis of `texts` (how far steering pushes neutral
    inputs toward the concept)."""
    from workbench.models import encode_sentences

    e = encode_sentences(handle, list(texts))
    y = torch.tensor(list(labels))
    axis = e[y == 1].mean(0) - e[y == 0].mean(0)
    axis = axis / axis.norm().clamp(min=1e-12)
    probes = list(probe_texts)

    def measure(h: ModelHandle) -> float:
        return float((encode_sentences(h, probes) @ axis).mean())

    return measure
