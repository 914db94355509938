"""Feature-visualization objectives: what an optimized image should maximize.

An `Objective` maps one forward pass (the activations it asked for, the logits, the
images fed to the model) to one value per batch item; the engine maximizes the sum. As in
lucid they compose: `channel("layer2", 3) - 0.05 * total_variation()`,
`neuron(...) + 2 * diversity("layer1")`. Penalties (`total_variation`, `l1`, `l2`) return
a positive size, so they are subtracted. Every objective declares the sites it reads and
checks its unit indices against the activation shapes before the first step, so a wrong
unit fails at once with the valid range instead of as an index error mid-run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from workbench.errors import WorkbenchError


@dataclass
class ObjectiveContext:
    """What one forward pass gives an objective.

    `acts`: site -> activation (in the autograd graph); `logits`: the model's output (None
    when no objective needs it, so the forward pass stopped early); `images`: the images fed
    to the model after transforms (model input range); `unit_images`: the parameterization's
    output in [0, 1] before transforms (what penalties act on).
    """

    acts: Mapping[str, torch.Tensor]
    logits: torch.Tensor | None
    images: torch.Tensor
    unit_images: torch.Tensor

    @property
    def batch(self) -> int:
        return int(self.unit_images.shape[0])


Checker = Callable[[Mapping[str, tuple[int, ...]], int | None], None]


class Objective:
    """A value per batch item to maximize; supports `+`, `-`, scalar `*` and `/`.

    `fn(ctx) -> (B,)` tensor; `sites`: activations it reads; `needs_logits`: whether it
    reads the final output; `checks`: functions `(site shapes, n_classes) -> None` that
    raise WorkbenchError on a bad unit index; `min_batch`: smallest batch it is defined for.
    """

    def __init__(self, fn: Callable[[ObjectiveContext], torch.Tensor], *, name: str,
                 sites: frozenset[str] = frozenset(), needs_logits: bool = False,
                 checks: tuple[Checker, ...] = (), min_batch: int = 1) -> None:
        self.fn = fn
        self.name = name
        self.sites = frozenset(sites)
        self.needs_logits = needs_logits
        self.checks = tuple(checks)
        self.min_batch = min_batch

    def __call__(self, ctx: ObjectiveContext) -> torch.Tensor:
        value = self.fn(ctx)
        if value.ndim == 0:
            value = value.expand(ctx.batch)
        return value

    def check(self, shapes: Mapping[str, tuple[int, ...]], n_classes: int | None) -> None:
        for check in self.checks:
            check(shapes, n_classes)

    def _join(self, other: Objective, sign: float) -> Objective:
        return Objective(lambda ctx: self(ctx) + sign * other(ctx),
                         name=f"{self.name} {'+' if sign > 0 else '-'} {other.name}",
                         sites=self.sites | other.sites, needs_logits=self.needs_logits or other.needs_logits,
                         checks=self.checks + other.checks, min_batch=max(self.min_batch, other.min_batch))

    def __add__(self, other: Any) -> Objective:
        if isinstance(other, Objective):
            return self._join(other, 1.0)
        if isinstance(other, (int, float)) and other == 0:  # sum([...]) starts from 0
            return self
        return NotImplemented

    __radd__ = __add__

    def __sub__(self, other: Any) -> Objective:
        if isinstance(other, Objective):
            return self._join(other, -1.0)
        return NotImplemented

    def __mul__(self, scale: Any) -> Objective:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            return NotImplemented
        s = float(scale)
        return Objective(lambda ctx: s * self(ctx), name=f"{s:g} * ({self.name})", sites=self.sites,
                         needs_logits=self.needs_logits, checks=self.checks, min_batch=self.min_batch)

    __rmul__ = __mul__

    def __truediv__(self, scale: Any) -> Objective:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale == 0:
            return NotImplemented
        return self * (1.0 / float(scale))

    def __neg__(self) -> Objective:
        return self * -1.0

    def __repr__(self) -> str:
        return f"Objective({self.name})"


# --- helpers ------------------------------------------------------------------------------

def _check_unit(site: str, unit: int, what: str = "channel") -> Checker:
    def check(shapes: Mapping[str, tuple[int, ...]], _n: int | None) -> None:
        shape = shapes[site]
        n = shape[1]
        if not 0 <= unit < n:
            raise WorkbenchError(f"{what} {unit} is out of range for site {site!r}, which has {n} channels "
                                 f"(activation shape {list(shape)}); valid: 0..{n - 1}")
    return check


def _batch_mask(value: torch.Tensor, batch: int | None) -> torch.Tensor:
    if batch is None:
        return value
    if not 0 <= batch < value.shape[0]:
        raise WorkbenchError(f"objective restricted to batch item {batch}, but the batch has {value.shape[0]} items")
    mask = torch.zeros_like(value)
    mask[batch] = 1.0
    return value * mask


def _spatial_mean(act: torch.Tensor) -> torch.Tensor:
    return act.flatten(2).mean(-1) if act.ndim > 2 else act


# --- unit objectives ----------------------------------------------------------------------

def channel(site: str, c: int, *, batch: int | None = None) -> Objective:
    """Mean activation of channel `c` at `site` (over all positions)."""
    c = int(c)
    return Objective(lambda ctx: _batch_mask(_spatial_mean(ctx.acts[site])[:, c], batch),
                     name=f"channel({site}:{c})", sites=frozenset({site}), checks=(_check_unit(site, c),))


def neuron(site: str, c: int, x: int | None = None, y: int | None = None, *, batch: int | None = None) -> Objective:
    """Activation of channel `c` at one position (x, y) of `site` (default: the centre)."""
    c = int(c)

    def fn(ctx: ObjectiveContext) -> torch.Tensor:
        act = ctx.acts[site]
        if act.ndim == 2:
            return _batch_mask(act[:, c], batch)
        h, w = act.shape[-2:]
        yy = h // 2 if y is None else min(int(y), h - 1)
        xx = w // 2 if x is None else min(int(x), w - 1)
        return _batch_mask(act[:, c, yy, xx], batch)

    def check_pos(shapes: Mapping[str, tuple[int, ...]], _n: int | None) -> None:
        shape = shapes[site]
        if len(shape) == 4:
            h, w = shape[-2:]
            if (x is not None and not 0 <= x < w) or (y is not None and not 0 <= y < h):
                raise WorkbenchError(f"neuron position (x={x}, y={y}) is outside site {site!r}'s {w}x{h} grid "
                                     f"(activation shape {list(shape)}); valid x: 0..{w - 1}, y: 0..{h - 1}")
        elif x is not None or y is not None:
            raise WorkbenchError(f"site {site!r} has no spatial grid (activation shape {list(shape)}); drop x and y")

    return Objective(fn, name=f"neuron({site}:{c}@{x},{y})", sites=frozenset({site}),
                     checks=(_check_unit(site, c), check_pos))


def direction(site: str, vec: torch.Tensor | list[float], *, batch: int | None = None) -> Objective:
    """Mean over positions of the dot product of the activation with `vec` (one weight per channel)."""
    v = torch.as_tensor(vec, dtype=torch.float32).flatten()

    def fn(ctx: ObjectiveContext) -> torch.Tensor:
        act = ctx.acts[site]
        w = v.to(act.device, act.dtype).view(1, -1, *([1] * (act.ndim - 2)))
        return _batch_mask(_spatial_mean(act * w).sum(1), batch)

    def check(shapes: Mapping[str, tuple[int, ...]], _n: int | None) -> None:
        n = shapes[site][1]
        if v.numel() != n:
            raise WorkbenchError(f"direction has {v.numel()} entries but site {site!r} has {n} channels; "
                                 f"give one weight per channel")
        if not bool(torch.isfinite(v).all()):
            raise WorkbenchError("direction contains NaN or infinite entries")

    return Objective(fn, name=f"direction({site}, |v|={float(v.norm()):.3g})", sites=frozenset({site}), checks=(check,))


def class_logit(c: int, *, batch: int | None = None) -> Objective:
    """The model's output for class `c` (its logit)."""
    c = int(c)

    def fn(ctx: ObjectiveContext) -> torch.Tensor:
        assert ctx.logits is not None
        return _batch_mask(ctx.logits[:, c], batch)

    def check(_shapes: Mapping[str, tuple[int, ...]], n_classes: int | None) -> None:
        if n_classes is not None and not 0 <= c < n_classes:
            raise WorkbenchError(f"class {c} is out of range; the model has {n_classes} outputs (valid: 0..{n_classes - 1})")

    return Objective(fn, name=f"class_logit({c})", needs_logits=True, checks=(check,))


def class_log_prob(c: int, *, batch: int | None = None) -> Objective:
    """log softmax of class `c`: raises `c` against the other classes, not every logit at once."""
    c = int(c)

    def fn(ctx: ObjectiveContext) -> torch.Tensor:
        assert ctx.logits is not None
        return _batch_mask(torch.log_softmax(ctx.logits.float(), -1)[:, c], batch)

    def check(_shapes: Mapping[str, tuple[int, ...]], n_classes: int | None) -> None:
        if n_classes is not None and not 0 <= c < n_classes:
            raise WorkbenchError(f"class {c} is out of range; the model has {n_classes} outputs (valid: 0..{n_classes - 1})")

    return Objective(fn, name=f"class_log_prob({c})", needs_logits=True, checks=(check,))


def diversity(site: str) -> Objective:
    """Minus the mean cosine similarity of each item's Gram matrix at `site` to the others.

    Pushes a batch to show different facets of what the other objectives ask for (lucid's
    diversity term); needs batch >= 2.
    """
    def fn(ctx: ObjectiveContext) -> torch.Tensor:
        act = ctx.acts[site]
        b = act.shape[0]
        flat = act.flatten(2) if act.ndim > 2 else act[:, :, None]
        gram = torch.bmm(flat, flat.transpose(1, 2)).flatten(1)
        gram = gram / gram.norm(dim=1, keepdim=True).clamp_min(1e-8)
        sim = gram @ gram.T
        off = sim.sum(1) - sim.diagonal()
        return -off / max(b - 1, 1)

    return Objective(fn, name=f"diversity({site})", sites=frozenset({site}), min_batch=2)


# --- penalties (positive sizes; subtract them) ---------------------------------------------

def total_variation() -> Objective:
    """Total variation of the image (mean absolute difference of neighbouring pixels)."""
    def fn(ctx: ObjectiveContext) -> torch.Tensor:
        x = ctx.unit_images
        dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
        dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
        return dx + dy

    return Objective(fn, name="total_variation()")


def l1(site: str | None = None, *, constant: float = 0.5) -> Objective:
    """Mean |x - constant| of the image (or of the activation at `site`, constant 0 there)."""
    def fn(ctx: ObjectiveContext) -> torch.Tensor:
        x = ctx.unit_images - constant if site is None else ctx.acts[site]
        return x.abs().flatten(1).mean(1)

    return Objective(fn, name=f"l1({site or 'image'})", sites=frozenset({site}) if site else frozenset())


def l2(site: str | None = None, *, constant: float = 0.5) -> Objective:
    """Root mean square of (x - constant) of the image (or of the activation at `site`)."""
    def fn(ctx: ObjectiveContext) -> torch.Tensor:
        x = ctx.unit_images - constant if site is None else ctx.acts[site]
        return x.pow(2).flatten(1).mean(1).add(1e-12).sqrt()

    return Objective(fn, name=f"l2({site or 'image'})", sites=frozenset({site}) if site else frozenset())


def as_objective(spec: Objective | str) -> Objective:
    """Parse a short text spec (CLI): `channel:SITE:C`, `neuron:SITE:C[:X:Y]`, `logit:C`."""
    if isinstance(spec, Objective):
        return spec
    parts = spec.split(":")
    kind = parts[0]
    try:
        if kind == "channel" and len(parts) == 3:
            return channel(parts[1], int(parts[2]))
        if kind == "neuron" and len(parts) in (3, 5):
            x, y = (int(parts[3]), int(parts[4])) if len(parts) == 5 else (None, None)
            return neuron(parts[1], int(parts[2]), x, y)
        if kind == "logit" and len(parts) == 2:
            return class_logit(int(parts[1]))
    except ValueError:
        pass
    raise WorkbenchError(f"cannot parse objective {spec!r}; expected channel:SITE:C, neuron:SITE:C[:X:Y] or logit:C")
