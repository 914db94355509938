"""Which units (conv channels, MLP neurons) carry a behaviour: ranked lists with their evidence.

A *unit* is one index of a site's feature axis: the channel axis (dim 1) of a CNN
activation `(N, C, H, W)`, the last axis of a transformer activation `(N, T, D)` (so at
`blocks.L.mlp.hook_post` a unit is an MLP neuron). Four ways to rank them:

- `activation_difference`: mean activation on a *positive* input set minus a *negative*
  one (e.g. triggered vs the same scenes clean), optionally in units of the negative set's
  standard deviation (so a unit that is merely loud everywhere does not win);
- `dissection` (Bau et al. 2017): IoU between each unit's thresholded, upsampled activation
  map (top `quantile` of its activations over the data set) and a binary concept mask;
  ShapesWorld renders those masks exactly (`ShapesWorld.concept_masks`);
- `attribution`: captum's layer conductance (image models) or layer integrated gradients
  of the target's logit with respect to the site, summed over positions;
- `shapley` (Ghorbani and Zou 2020): truncated Monte Carlo estimate of each unit's Shapley
  value for a metric (by default the target's mean log-probability) under unit removal;
  `n_samples` permutations is the accuracy/cost knob.

All return a `UnitRanking` (site, units best first, scores, method, evidence) that plots
its evidence (score bars and, for images, the top units' activation maps).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.hooks import capture, edit
from workbench.models import run_model
from workbench.progress import progress_bar
from workbench.sites import Site, resolve_site

log = logging.getLogger(__name__)

Method = Literal["activation_difference", "dissection", "attribution", "shapley"]
METHODS: tuple[str, ...] = ("activation_difference", "dissection", "attribution", "shapley")
Reduce = Literal["mean", "max"]
Position = Literal["mean", "last", "first"] | int
Inputs = torch.Tensor | Sequence[str]


# --------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitRanking:
    """Units of one site ranked best first, with the score behind each and the evidence.

    `scores[i]` belongs to `units[i]`; `all_scores` holds every unit's score by index (NaN
    where a method did not score it). `evidence` may hold `images` (n, C, H, W) and `maps`
    (k, n, h, w): the top units' activation maps on those images, which `plot` draws.
    """

    site: str
    units: list[int]
    scores: list[float]
    method: str
    n_units: int
    all_scores: list[float] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    evidence: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def top(self, k: int) -> list[int]:
        """The `k` best units (all of them when k exceeds the count)."""
        if k < 0:
            raise WorkbenchError(f"top(k) needs k >= 0, got {k}")
        return list(self.units[:k])

    def score_of(self, unit: int) -> float:
        return self.all_scores[unit] if self.all_scores else self.scores[self.units.index(unit)]

    def to_json(self) -> dict[str, Any]:
        return {
            "site": self.site, "method": self.method, "n_units": self.n_units,
            "units": list(self.units), "scores": [_round(s) for s in self.scores], "details": self.details,
        }

    def plot(self, path: str | Path, *, k: int = 8) -> Path:
        """Write a PNG: the top-k scores as bars and, for image sites, their activation maps."""
        from workbench.plotting import pyplot, save_figure

        plt = pyplot()
        k = min(k, len(self.units))
        images, maps = self.evidence.get("images"), self.evidence.get("maps")
        n_img = 0 if images is None or maps is None else min(int(images.shape[0]), 6)
        rows = 1 + (min(k, int(maps.shape[0])) if n_img else 0)
        cols = max(n_img + 1, 2)
        fig = plt.figure(figsize=(2.2 * cols, 2.0 * rows + 1.0))
        ax = fig.add_subplot(rows, 1, 1)
        ax.bar([str(u) for u in self.units[:k]], self.scores[:k], color="#4477aa")
        ax.set_title(f"{self.method} at {self.site}: top {k} of {self.n_units} units")
        ax.set_xlabel("unit")
        ax.set_ylabel("score")
        if n_img:
            assert images is not None and maps is not None
            for r in range(rows - 1):
                for c in range(n_img):
                    sub = fig.add_subplot(rows, cols, (r + 1) * cols + c + 1)
                    img = images[c].detach().float().cpu()
                    lo, hi = float(img.min()), float(img.max())
                    img = (img - lo) / max(hi - lo, 1e-8)
                    sub.imshow(img.permute(1, 2, 0).numpy() if img.shape[0] == 3 else img[0].numpy(), cmap=None if img.shape[0] == 3 else "gray")
                    heat = F.interpolate(maps[r, c][None, None].float(), size=img.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
                    sub.imshow(heat.numpy(), cmap="magma", alpha=0.55)
                    sub.set_xticks([])
                    sub.set_yticks([])
                    if c == 0:
                        sub.set_ylabel(f"unit {self.units[r]}")
        fig.tight_layout()

        return save_figure(fig, path, dpi=90)


def _round(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 6)


def _ranking(site: Site, scores: torch.Tensor, method: str, *, details: dict[str, Any],
             evidence: dict[str, torch.Tensor] | None = None, descending: bool = True) -> UnitRanking:
    scores = scores.detach().double().cpu()
    valid = ~torch.isnan(scores)
    key = torch.where(valid, scores if descending else -scores, torch.tensor(-math.inf, dtype=scores.dtype))
    order = [int(i) for i in torch.argsort(key, descending=True, stable=True) if bool(valid[i])]
    return UnitRanking(
        site=site.name, units=order, scores=[float(scores[i]) for i in order], method=method,
        n_units=int(scores.numel()), all_scores=[float(s) for s in scores], details=details,
        evidence=dict(evidence or {}),
    )


# --------------------------------------------------------------------------------------
# Activations per unit
# --------------------------------------------------------------------------------------


def _is_text(inputs: Any) -> bool:
    return isinstance(inputs, (list, tuple)) and len(inputs) > 0 and all(isinstance(t, str) for t in inputs)


def _check_inputs(inputs: Any, what: str) -> None:
    if inputs is None:
        raise WorkbenchError(f"{what} is required")
    if isinstance(inputs, torch.Tensor):
        if inputs.ndim < 2 or inputs.shape[0] == 0:
            raise WorkbenchError(f"{what} is an empty tensor or has no batch axis (shape {tuple(inputs.shape)})")
        return
    if isinstance(inputs, str):
        raise WorkbenchError(f"{what} must be a list of texts, not one string")
    if not _is_text(inputs):
        raise WorkbenchError(f"{what} must be an image tensor (N, C, H, W) or a non-empty list of texts")


def unit_axis(act: torch.Tensor, handle: ModelHandle) -> int:
    """Where units live in an activation: channels (dim 1) of a 4-D image activation, else the last dim."""
    return 1 if act.ndim == 4 else act.ndim - 1


def site_units(handle: ModelHandle, site: str | Site) -> int:
    """How many units a site has (from one forward pass on the handle's dummy input)."""
    from workbench.hooks import site_shape

    resolved = resolve_site(handle, site)
    shape = site_shape(handle, resolved.name if isinstance(site, Site) else site)
    return shape[1] if len(shape) == 4 else shape[-1]


def input_batches(handle: ModelHandle, inputs: Inputs, batch_size: int) -> Iterator[tuple[Any, torch.Tensor | None]]:
    """Model inputs batch by batch, with the attention mask for texts (None for images)."""
    dev = handle.device
    if isinstance(inputs, torch.Tensor):
        if handle.preprocess is not None:
            handle.preprocess.check(inputs)
        for i in range(0, inputs.shape[0], batch_size):
            yield inputs[i:i + batch_size].to(dev), None
        return
    from workbench.tokens import has_vocabulary, missing_tokenizer

    if handle.tokenizer is None:
        raise WorkbenchError(f"{handle.spec} has no tokenizer; give an image tensor instead of texts")
    if not has_vocabulary(handle.tokenizer):
        raise WorkbenchError(missing_tokenizer(handle.spec, handle.path))
    for i in range(0, len(inputs), batch_size):
        enc = handle.tokenizer(list(inputs[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                               max_length=min(int(getattr(handle.tokenizer, "model_max_length", 512) or 512), 512))
        enc = {k: v.to(dev) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        yield enc, enc.get("attention_mask")


def pool_tokens(act: torch.Tensor, mask: torch.Tensor | None, position: Position) -> torch.Tensor:
    """(N, T, D) -> (N, D): mean over real tokens, or the first/last real token, or a fixed index."""
    if act.ndim != 3:
        return act.reshape(act.shape[0], -1) if act.ndim == 2 else act.flatten(1, -2).mean(1)
    n, t, _ = act.shape
    m = torch.ones(n, t, device=act.device) if mask is None else mask.to(act.device).float()
    if position == "mean":
        return (act * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
    if position == "first":
        return act[:, 0]
    if position == "last":
        last = (m.sum(1).long() - 1).clamp(min=0)
        return act[torch.arange(n, device=act.device), last]
    if isinstance(position, int):
        if not -t <= position < t:
            raise WorkbenchError(f"position {position} is out of range for sequences of length {t}")
        return act[:, position]
    raise WorkbenchError(f"position must be 'mean', 'first', 'last' or a token index; got {position!r}")


def unit_activations(handle: ModelHandle, site: str | Site, inputs: Inputs, *, reduce: Reduce = "mean",
                     position: Position = "mean", batch_size: int = 64) -> torch.Tensor:
    """Per-input, per-unit activations (N, U): image maps reduced over space, text over tokens."""
    _check_inputs(inputs, "inputs")
    resolved = resolve_site(handle, site)
    out = []
    with torch.no_grad():
        for batch, mask in input_batches(handle, inputs, batch_size):
            with capture(handle, [resolved], stop=True) as acts:
                run_model(handle.model, batch)
            act = acts[resolved.name].float()
            if act.ndim == 4:
                out.append(act.amax((2, 3)) if reduce == "max" else act.mean((2, 3)))
            else:
                out.append(pool_tokens(act, mask, position))
    return torch.cat(out).cpu()


def activation_maps(handle: ModelHandle, site: str | Site, images: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """The raw (N, C, h, w) activation maps of an image site."""
    _check_inputs(images, "images")
    if not isinstance(images, torch.Tensor):
        raise WorkbenchError("activation maps need images (a tensor), not texts")
    resolved = resolve_site(handle, site)
    out = []
    with torch.no_grad():
        for batch, _ in input_batches(handle, images, batch_size):
            with capture(handle, [resolved], stop=True) as acts:
                run_model(handle.model, batch)
            act = acts[resolved.name]
            if act.ndim != 4:
                raise WorkbenchError(f"site {resolved.name} has activations of shape {tuple(act.shape)}; maps need (N, C, H, W)")
            out.append(act.float().cpu())
    return torch.cat(out)


def _map_evidence(handle: ModelHandle, site: Site, images: Any, units: list[int], k: int = 6) -> dict[str, torch.Tensor]:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not units:
        return {}
    imgs = images[:6]
    maps = activation_maps(handle, site, imgs)
    top = torch.tensor(units[:k])
    return {"images": imgs.detach().cpu(), "maps": maps[:, top].transpose(0, 1).contiguous()}


# --------------------------------------------------------------------------------------
# Removing units at run time (for selection; edits that ship are editors.unit_ablation)
# --------------------------------------------------------------------------------------


@contextmanager
def units_removed(handle: ModelHandle, site: str | Site, units: Sequence[int], *,
                  value: torch.Tensor | float = 0.0) -> Iterator[None]:
    """Run-time hook that sets the units' activations to `value` (scalar or per-unit (len(units),)).

    Used to score candidate removals quickly; `editors.unit_ablation` makes the same change
    permanent by editing weights.
    """
    resolved = resolve_site(handle, site)
    idx = torch.as_tensor(list(units), dtype=torch.long)

    def fn(act: torch.Tensor) -> None:
        if idx.numel() == 0:
            return
        axis = unit_axis(act, handle)
        v = torch.as_tensor(value, dtype=act.dtype, device=act.device)
        shape = [1] * act.ndim
        shape[axis] = -1
        sel = idx.to(act.device)
        fill = v.reshape(shape) if v.ndim else v
        index = [slice(None)] * act.ndim
        index[axis] = sel
        act[tuple(index)] = fill.expand_as(act[tuple(index)]) if v.ndim else fill

    with edit(handle, {resolved: fn}):
        yield


# --------------------------------------------------------------------------------------
# The four methods
# --------------------------------------------------------------------------------------


def _activation_difference(handle: ModelHandle, site: Site, *, positive: Inputs, negative: Inputs,
                           normalize: bool, reduce: Reduce, position: Position, batch_size: int) -> UnitRanking:
    _check_inputs(positive, "positive")
    _check_inputs(negative, "negative")
    a = unit_activations(handle, site, positive, reduce=reduce, position=position, batch_size=batch_size)
    b = unit_activations(handle, site, negative, reduce=reduce, position=position, batch_size=batch_size)
    diff = a.mean(0) - b.mean(0)
    if normalize:
        pooled = torch.sqrt((a.var(0, unbiased=False) + b.var(0, unbiased=False)) / 2)
        floor = 1e-3 * float(pooled.max().clamp(min=1e-12))
        diff = diff / pooled.clamp(min=floor)
    details = {"n_positive": int(a.shape[0]), "n_negative": int(b.shape[0]), "normalize": normalize,
               "reduce": reduce, "position": position}
    ranking = _ranking(site, diff, "activation_difference", details=details)
    return UnitRanking(**{**ranking.__dict__, "evidence": _map_evidence(handle, site, positive, ranking.units)})


def dissection_iou(handle: ModelHandle, site: str | Site, images: torch.Tensor, masks: torch.Tensor, *,
                   quantile: float = 0.99, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit IoU with a concept mask, and the per-unit activation thresholds.

    Each unit's threshold is the `quantile` of its activations over all images and
    positions (Bau et al.: top 0.5%); maps are upsampled bilinearly to the mask size.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise WorkbenchError("dissection needs images as a (N, C, H, W) tensor")
    if not isinstance(masks, torch.Tensor) or masks.ndim != 3 or masks.shape[0] != images.shape[0]:
        raise WorkbenchError(f"dissection needs masks of shape (N, H, W) with N = {images.shape[0]}; got "
                             f"{tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__}")
    if not 0.0 < quantile < 1.0:
        raise WorkbenchError(f"quantile must be in (0, 1); got {quantile}")
    if not bool(masks.any()):
        raise WorkbenchError("the concept mask is empty in every image; choose a concept these images show")
    maps = activation_maps(handle, site, images, batch_size=batch_size)  # (N, C, h, w)
    n, c = maps.shape[:2]
    flat = maps.transpose(0, 1).reshape(c, -1)
    if flat.shape[1] > 2_000_000:
        pick = torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(0))[:2_000_000]
        flat = flat[:, pick]
    thresholds = torch.quantile(flat, quantile, dim=1)
    inter = torch.zeros(c, dtype=torch.float64)
    union = torch.zeros(c, dtype=torch.float64)
    size = masks.shape[-2:]
    m = masks.bool()
    for i in range(0, n, batch_size):
        up = F.interpolate(maps[i:i + batch_size], size=size, mode="bilinear", align_corners=False)
        on = up > thresholds.view(1, -1, 1, 1)
        mm = m[i:i + batch_size, None]
        inter += (on & mm).sum((0, 2, 3)).double()
        union += (on | mm).sum((0, 2, 3)).double()
    return inter / union.clamp(min=1), thresholds


def _dissection(handle: ModelHandle, site: Site, *, images: torch.Tensor | None, masks: torch.Tensor | Mapping[str, torch.Tensor] | None,
                concept: str | None, quantile: float, batch_size: int) -> UnitRanking:
    if images is None or masks is None:
        raise WorkbenchError("dissection needs images=... and masks=... (a (N, H, W) mask, or ShapesWorld.concept_masks(sample) with concept=NAME)")
    if isinstance(masks, Mapping):
        if concept is None or concept not in masks:
            raise WorkbenchError(f"concept {concept!r} is not among the masks; concepts: {', '.join(sorted(masks))}")
        mask = masks[concept]
    else:
        mask = masks
    iou, thresholds = dissection_iou(handle, site, images, mask, quantile=quantile, batch_size=batch_size)
    details = {"concept": concept, "quantile": quantile, "n_images": int(images.shape[0]),
               "mask_fraction": round(float(mask.float().mean()), 6)}
    ranking = _ranking(site, iou, "dissection", details=details)
    pos = images[mask.flatten(1).any(1)] if bool(mask.any()) else images
    return UnitRanking(**{**ranking.__dict__, "evidence": _map_evidence(handle, site, pos, ranking.units)})


def _target_logit(handle: ModelHandle, output: Any, target: int, mask: torch.Tensor | None) -> torch.Tensor:
    logits = output.logits if hasattr(output, "logits") else output
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if logits.ndim == 2:
        return logits[:, target]
    if logits.ndim == 3:  # causal LM: the next token after the last real token
        n, t = logits.shape[:2]
        last = (mask.sum(1).long() - 1) if mask is not None else torch.full((n,), t - 1, device=logits.device)
        return logits[torch.arange(n, device=logits.device), last, target]
    raise WorkbenchError(f"cannot read a target logit from model output of shape {tuple(logits.shape)}")


def _check_target(handle: ModelHandle, target: int | None) -> int:
    if target is None:
        raise WorkbenchError("attribution and shapley need target=CLASS_OR_TOKEN_ID (whose logit or log-probability is explained)")
    if handle.kind == "encoder":
        raise WorkbenchError(f"{handle.spec} is a bare encoder with no logits to attribute; give metric=... (shapley) or use activation_difference")
    n_out = len(handle.preprocess.class_names) if handle.preprocess is not None and handle.preprocess.class_names else handle.arch.vocab_size
    if n_out is not None and not 0 <= int(target) < int(n_out):
        raise WorkbenchError(f"target {target} is out of range; this model has outputs 0..{int(n_out) - 1}")
    return int(target)


def _attribution(handle: ModelHandle, site: Site, *, inputs: Inputs, target: int | None, baselines: torch.Tensor | None,
                 steps: int, attribution: Literal["conductance", "integrated_gradients"], batch_size: int) -> UnitRanking:
    _check_inputs(inputs, "inputs")
    tgt = _check_target(handle, target)
    model = handle.model
    total: torch.Tensor | None = None
    count = 0
    if isinstance(inputs, torch.Tensor):
        from captum.attr import LayerConductance, LayerIntegratedGradients

        module = model.get_submodule(site.module_path)
        as_input = site.side == "input"
        algo = (LayerConductance if attribution == "conductance" else LayerIntegratedGradients)(model, module)
        if baselines is not None and baselines.shape != inputs.shape:
            raise WorkbenchError(f"baselines have shape {tuple(baselines.shape)}; they must match the inputs {tuple(inputs.shape)}")
        for i in range(0, inputs.shape[0], batch_size):
            x = inputs[i:i + batch_size].to(handle.device)
            base = torch.zeros_like(x) + (handle.preprocess.input_range[0] if handle.preprocess else 0.0) if baselines is None \
                else baselines[i:i + batch_size].to(handle.device)
            attr = algo.attribute(x, baselines=base, target=tgt, n_steps=steps, attribute_to_layer_input=as_input)
            if isinstance(attr, (tuple, list)):
                attr = attr[0]
            per = attr.detach().float().sum(tuple(range(2, attr.ndim))) if attr.ndim > 2 else attr.detach().float()
            total = per.sum(0) if total is None else total + per.sum(0)
            count += x.shape[0]
    else:
        # Layer integrated gradients along the site's own activation, from zero (text models).
        for batch, mask in input_batches(handle, inputs, batch_size):
            with torch.no_grad(), capture(handle, [site]) as acts:
                run_model(model, batch)
            act = acts[site.name].float()
            grads = torch.zeros_like(act)
            for alpha in ((k + 0.5) / steps for k in range(steps)):
                scaled = (alpha * act).detach().requires_grad_(True)
                from workbench.hooks import patch

                with patch(handle, {site: scaled}):
                    out = run_model(model, batch)
                value = _target_logit(handle, out, tgt, mask).sum()
                (g,) = torch.autograd.grad(value, scaled)
                grads += g / steps
            attr = act * grads
            if mask is not None and attr.ndim == 3:
                attr = attr * mask[..., None].to(attr.dtype)
            per = attr.sum(1) if attr.ndim == 3 else attr
            total = per.sum(0) if total is None else total + per.sum(0)
            count += per.shape[0]
    assert total is not None
    scores = total.cpu() / max(count, 1)
    details = {"target": tgt, "steps": steps, "attribution": attribution if isinstance(inputs, torch.Tensor) else "integrated_gradients",
               "n_inputs": count, "baseline": "given" if baselines is not None else "zero"}
    ranking = _ranking(site, scores, "attribution", details=details)
    return UnitRanking(**{**ranking.__dict__, "evidence": _map_evidence(handle, site, inputs, ranking.units)})


def target_logprob_metric(handle: ModelHandle, inputs: Inputs, target: int | Sequence[int] | torch.Tensor, *,
                          batch_size: int = 128) -> Callable[[], float]:
    """A metric for `shapley`: the mean log-probability of `target` (one id or one per input) on `inputs`."""
    batches = list(input_batches(handle, inputs, batch_size))
    n = inputs.shape[0] if isinstance(inputs, torch.Tensor) else len(inputs)
    tgt = torch.as_tensor(target, dtype=torch.long)
    if tgt.ndim == 0:
        tgt = tgt.expand(n)
    if tgt.numel() != n:
        raise WorkbenchError(f"target has {tgt.numel()} entries for {n} inputs")

    def metric() -> float:
        total, seen = 0.0, 0
        with torch.no_grad():
            for batch, mask in batches:
                out = run_model(handle.model, batch)
                logits = out.logits if hasattr(out, "logits") else out
                if logits.ndim == 3:
                    last = (mask.sum(1).long() - 1) if mask is not None else torch.full((logits.shape[0],), logits.shape[1] - 1)
                    logits = logits[torch.arange(logits.shape[0]), last.to(logits.device)]
                rows = tgt[seen:seen + logits.shape[0]].to(logits.device)
                total += float(logits.float().log_softmax(-1).gather(1, rows[:, None]).sum())
                seen += logits.shape[0]
        return total / max(seen, 1)

    return metric


def shapley_values(handle: ModelHandle, site: str | Site, metric: Callable[[], float], *, candidates: Sequence[int],
                   n_samples: int = 32, truncation: float = 0.05, value: torch.Tensor | float = 0.0, seed: int = 0,
                   progress: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """Truncated Monte Carlo Shapley values of `candidates` for `metric` under unit removal.

    Each sample is a random order of the candidates; units are removed one by one and each
    unit's marginal contribution is the metric's drop when it goes. Once the metric is within
    `truncation` x |v(none removed) - v(all removed)| of the all-removed value, the rest of the
    order is credited zero (their marginal contributions are then small). Returns the mean
    contribution per candidate (a tensor aligned with `candidates`) and bookkeeping.
    """
    cand = [int(c) for c in candidates]
    if not cand:
        raise WorkbenchError("shapley needs at least one candidate unit")
    if n_samples < 1:
        raise WorkbenchError(f"n_samples must be at least 1; got {n_samples}")
    values_per = torch.as_tensor(value, dtype=torch.float32)
    per_unit = values_per.ndim == 1

    def removed_value(units: list[int]) -> float:
        v = values_per[torch.as_tensor(units)] if per_unit and units else (values_per if not per_unit else 0.0)
        with units_removed(handle, site, units, value=v):
            return metric()

    full = metric()
    empty = removed_value(cand)
    span = abs(full - empty)
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(len(cand), dtype=torch.float64)
    evals = 2
    truncated = 0
    bar = progress_bar(total=n_samples, desc=f"shapley {resolve_site(handle, site).name}", enabled=progress, leave=False)
    try:
        for _ in range(n_samples):
            order = torch.randperm(len(cand), generator=g).tolist()
            prev = full
            removed: list[int] = []
            for pos, j in enumerate(order):
                if abs(prev - empty) <= truncation * span:
                    truncated += len(order) - pos
                    break
                removed.append(cand[j])
                now = removed_value(removed)
                evals += 1
                total[j] += prev - now
                prev = now
            bar.update(1)
    finally:
        bar.close()
    return (total / n_samples).float(), {"v_full": full, "v_all_removed": empty, "evaluations": evals,
                                         "truncated_steps": truncated, "n_samples": n_samples, "truncation": truncation}


def _shapley(handle: ModelHandle, site: Site, *, inputs: Inputs | None, target: Any, metric: Callable[[], float] | None,
             candidates: Sequence[int] | None, n_candidates: int | None, negative: Inputs | None, n_samples: int,
             truncation: float, seed: int, batch_size: int, progress: bool) -> UnitRanking:
    n_units = site_units(handle, site)
    if metric is None:
        _check_inputs(inputs, "inputs")
        if target is None:
            raise WorkbenchError("shapley needs metric=CALLABLE, or inputs=... with target=... (mean log-probability of the target)")
        if isinstance(target, int):
            _check_target(handle, target)
        assert inputs is not None
        metric = target_logprob_metric(handle, inputs, target, batch_size=batch_size)
    if candidates is None:
        if n_candidates is not None and n_candidates < n_units and inputs is not None and negative is not None:
            pre = _activation_difference(handle, site, positive=inputs, negative=negative, normalize=True,
                                         reduce="mean", position="mean", batch_size=batch_size)
            candidates = pre.top(n_candidates)
        else:
            candidates = list(range(n_units))
    bad = [c for c in candidates if not 0 <= int(c) < n_units]
    if bad:
        raise WorkbenchError(f"candidate units {bad[:5]} are out of range; {site.name} has units 0..{n_units - 1}")
    vals, info = shapley_values(handle, site, metric, candidates=candidates, n_samples=n_samples, truncation=truncation,
                                seed=seed, progress=progress)
    scores = torch.full((n_units,), float("nan"))
    scores[torch.as_tensor(list(candidates), dtype=torch.long)] = vals
    info["candidates"] = [int(c) for c in candidates]
    ranking = _ranking(site, scores, "shapley", details=info)
    ev = inputs if isinstance(inputs, torch.Tensor) else None
    return UnitRanking(**{**ranking.__dict__, "evidence": _map_evidence(handle, site, ev, ranking.units)})


def select_units(
    handle: ModelHandle,
    site: str | Site,
    *,
    method: Method = "activation_difference",
    positive: Inputs | None = None,
    negative: Inputs | None = None,
    inputs: Inputs | None = None,
    target: int | Sequence[int] | torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    masks: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    concept: str | None = None,
    quantile: float = 0.99,
    normalize: bool = True,
    reduce: Reduce = "mean",
    position: Position = "mean",
    baselines: torch.Tensor | None = None,
    steps: int = 16,
    attribution: Literal["conductance", "integrated_gradients"] = "conductance",
    metric: Callable[[], float] | None = None,
    candidates: Sequence[int] | None = None,
    n_candidates: int | None = None,
    n_samples: int = 32,
    truncation: float = 0.05,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> UnitRanking:
    """Rank the units of `site` by one method (see the module docstring for what each measures).

    - activation_difference: `positive`, `negative` (images or texts); `normalize`, `reduce`
      (image maps: mean or max over space), `position` (texts: mean, first, last, index).
    - dissection: `images`, `masks` ((N, H, W) bool, or a dict of concept masks + `concept`), `quantile`.
    - attribution: `inputs`, `target` (class or token id), `baselines` (images; e.g. the same
      scenes without the trigger), `steps`, `attribution` (conductance or integrated_gradients).
    - shapley: `metric` (a no-argument callable evaluated with units removed), or `inputs` +
      `target` (mean target log-probability); `candidates` or `n_candidates` (pre-ranked by
      activation difference against `negative`), `n_samples` permutations, `truncation`, `seed`.
    """
    if method not in METHODS:
        raise WorkbenchError(f"unknown unit-selection method {method!r}; choose one of {', '.join(METHODS)}")
    resolved = resolve_site(handle, site)
    was_training = handle.model.training
    handle.model.eval()
    try:
        if method == "activation_difference":
            if positive is None or negative is None:
                raise WorkbenchError("activation_difference needs positive=... and negative=... input sets")
            return _activation_difference(handle, resolved, positive=positive, negative=negative, normalize=normalize,
                                          reduce=reduce, position=position, batch_size=batch_size)
        if method == "dissection":
            return _dissection(handle, resolved, images=images, masks=masks, concept=concept, quantile=quantile,
                               batch_size=batch_size)
        if method == "attribution":
            return _attribution(handle, resolved, inputs=inputs, target=None if target is None else int(target),  # type: ignore[arg-type]
                                baselines=baselines, steps=steps, attribution=attribution, batch_size=batch_size)
        return _shapley(handle, resolved, inputs=inputs, target=target, metric=metric, candidates=candidates,
                        n_candidates=n_candidates, negative=negative, n_samples=n_samples, truncation=truncation,
                        seed=seed, batch_size=batch_size, progress=progress)
    finally:
        handle.model.train(was_training)


def random_units(n_units: int, k: int, *, seed: int, exclude: Sequence[int] = ()) -> list[int]:
    """`k` distinct units drawn uniformly (seeded) from 0..n_units-1, avoiding `exclude` (the control)."""
    pool = [u for u in range(n_units) if u not in set(exclude)]
    if k > len(pool):
        raise WorkbenchError(f"asked for {k} random units but only {len(pool)} are available")
    g = torch.Generator().manual_seed(seed)
    return [pool[i] for i in torch.randperm(len(pool), generator=g)[:k].tolist()]
