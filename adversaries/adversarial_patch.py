"""A trained adversarial patch under random placement, rotation and scale (Brown et al. 2017).

The reference behaviour is ART's `AdversarialPatchPyTorch`: one patch is optimized over
many images, each step pasting it at a random position with a random rotation and scale
(expectation over transformation), so the result is a universal, physically-minded patch
rather than a per-image perturbation. Images and the patch stay in the handle's declared
input range; the patch is parameterized through a sigmoid, so it can never leave it.

    ae = AdversarialPatch(patch_frac=0.3, steps=200).generate(handle, images, target="star")
    ae.patch                     # (C, h, w) in the input range
    ae.extra["success_random_placement"], ae.extra["control_noise"]

`apply_patch` and `sample_placements` are the pasting primitives (shared with SNAFUE):
a placement is `(cx, cy, scale, angle)` with the centre in pixels and the angle in
radians; pasting is a differentiable `grid_sample`, so any patch can be optimized through it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from adversaries.base import AdversarialExamples
from adversaries.registry import register
from workbench.classifier import diverged_record, frozen, logits, predict, preprocess_of, resolve_targets, split_inputs
from workbench.errors import WorkbenchError
from workbench.handle import ImagePreprocess, ModelHandle
from workbench.progress import progress_bar

log = logging.getLogger(__name__)

PatchShape = Literal["square", "circle"]


def patch_pixels(pre: ImagePreprocess, *, frac: float | None = None, pixels: int | None = None) -> int:
    """Side of a square patch in pixels; a clear error when it is larger than the image."""
    if pixels is None:
        if frac is None or not 0 < frac <= 1:
            raise WorkbenchError(f"patch fraction {frac}: expected 0 < frac <= 1 of the image's shorter side")
        pixels = max(1, round(frac * min(pre.height, pre.width)))
    if pixels < 1 or pixels > min(pre.height, pre.width):
        raise WorkbenchError(
            f"a {pixels}x{pixels} patch does not fit a {pre.height}x{pre.width} image; "
            f"choose at most {min(pre.height, pre.width)} pixels")
    return int(pixels)


def sample_placements(n: int, *, height: int, width: int, patch_hw: tuple[int, int], generator: torch.Generator,
                      scale_range: tuple[float, float] = (1.0, 1.0), rotation_max: float = 0.0) -> torch.Tensor:
    """`(n, 4)` placements `(cx, cy, scale, angle)`: random scale, rotation (degrees max) and a
    centre that keeps the rotated, scaled patch inside the image (centred when it cannot)."""
    lo, hi = scale_range
    s = lo + (hi - lo) * torch.rand(n, generator=generator)
    ang = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(rotation_max)
    ph, pw = patch_hw
    c, si = ang.cos().abs(), ang.sin().abs()
    hx = s * (pw / 2 * c + ph / 2 * si)
    hy = s * (pw / 2 * si + ph / 2 * c)
    ux, uy = torch.rand(n, generator=generator), torch.rand(n, generator=generator)
    cx = torch.where(hx * 2 < width, hx + ux * (width - 2 * hx), torch.full_like(hx, width / 2))
    cy = torch.where(hy * 2 < height, hy + uy * (height - 2 * hy), torch.full_like(hy, height / 2))
    return torch.stack([cx, cy, s, ang], 1)


def fixed_placements(n: int, *, cx: float, cy: float, scale: float = 1.0, angle: float = 0.0) -> torch.Tensor:
    """The same placement for every image (consistent placement, as in the copy/paste protocol)."""
    return torch.tensor([[cx, cy, scale, angle]], dtype=torch.float32).expand(n, 4).clone()


def apply_patch(images: torch.Tensor, patch: torch.Tensor, placements: torch.Tensor, *,
                shape: PatchShape = "square") -> tuple[torch.Tensor, torch.Tensor]:
    """Paste `patch` (C, h, w) (or one per image, (N, C, h, w)) into `images` at `placements`.

    Returns `(patched images, mask (N, 1, H, W))`; differentiable in the patch and the
    images. Pixels are resampled bilinearly and the edge is anti-aliased analytically, so an
    unrotated, unscaled, pixel-aligned paste is exact and rotated/scaled ones have soft edges.
    """
    n, c, height, width = images.shape
    if patch.ndim == 3:
        patch = patch.unsqueeze(0).expand(n, -1, -1, -1)
    if patch.shape[0] != n or patch.shape[1] != c:
        raise WorkbenchError(f"patch of shape {tuple(patch.shape)} does not fit images {tuple(images.shape)}; "
                             f"expected ({c}, h, w) or ({n}, {c}, h, w)")
    ph, pw = patch.shape[-2:]
    if ph > height or pw > width:
        raise WorkbenchError(f"a {ph}x{pw} patch is larger than the {height}x{width} image; use a smaller patch")
    dev, dt = images.device, images.dtype
    pl = placements.to(dev, dt)
    ys = torch.arange(height, device=dev, dtype=dt) + 0.5
    xs = torch.arange(width, device=dev, dtype=dt) + 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    rx = gx[None] - pl[:, 0].view(-1, 1, 1)
    ry = gy[None] - pl[:, 1].view(-1, 1, 1)
    cos, sin = pl[:, 3].cos().view(-1, 1, 1), pl[:, 3].sin().view(-1, 1, 1)
    s = pl[:, 2].view(-1, 1, 1)
    lx = (cos * rx + sin * ry) / s
    ly = (-sin * rx + cos * ry) / s
    grid = torch.stack([lx / (pw / 2), ly / (ph / 2)], -1)
    sampled = F.grid_sample(patch.to(dt), grid, mode="bilinear", padding_mode="border", align_corners=False)
    # analytic, anti-aliased coverage (in image pixels): exactly 1 inside, 0 half a pixel outside
    if shape == "circle":
        r = torch.sqrt((lx / (pw / 2)) ** 2 + (ly / (ph / 2)) ** 2 + 1e-12) * (min(ph, pw) / 2)
        mask = ((min(ph, pw) / 2 - r) * s + 0.5).clamp(0, 1)
    else:
        mx = ((pw / 2 - lx.abs()) * s + 0.5).clamp(0, 1)
        my = ((ph / 2 - ly.abs()) * s + 0.5).clamp(0, 1)
        mask = mx * my
    mask = mask.unsqueeze(1)
    return images * (1 - mask) + sampled * mask, mask


@register("adversarial-patch")
@dataclass(frozen=True)
class AdversarialPatch:
    """Train one patch over all inputs under random placement, rotation and scale.

    `patch_frac` sets the side as a share of the image's shorter side (`patch_pixels`
    overrides it). `scale_range` and `rotation_max` (degrees) are the random transformation
    during training and evaluation. `lr` is Adam's step on the patch logits. Evaluation
    pastes the trained patch at `eval_placements` fresh random placements per image and
    reports the mean success (`success_random_placement`) beside a uniform-noise patch of
    the same size at the same placements (`control_noise`).
    """

    patch_frac: float = 0.3
    patch_pixels: int | None = None
    shape: PatchShape = "square"
    scale_range: tuple[float, float] = (0.8, 1.2)
    rotation_max: float = 22.5
    steps: int = 200
    lr: float = 0.1
    batch_size: int = 64
    eval_placements: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shape not in ("square", "circle"):
            raise WorkbenchError(f"shape {self.shape!r}: expected 'square' or 'circle'")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise WorkbenchError(f"scale_range {self.scale_range}: expected 0 < min <= max")
        if self.steps < 1 or self.batch_size < 1 or self.eval_placements < 1:
            raise WorkbenchError("steps, batch_size and eval_placements must all be >= 1")

    def generate(self, handle: ModelHandle, inputs: Any, target: Any = None, *,
                 progress: bool = False) -> AdversarialExamples:
        """Train the patch on `inputs` (images or (images, labels)) toward `target` (untargeted when None) and
        measure it at fresh placements; `progress` shows the training steps."""
        pre = preprocess_of(handle)
        images, labels = split_inputs(handle, inputs)
        n = images.shape[0]
        side = patch_pixels(pre, frac=self.patch_frac, pixels=self.patch_pixels)
        targets = resolve_targets(handle, target, n)
        clean_pred, clean_prob = predict(handle, images)
        ref = targets if targets is not None else (labels if labels is not None else clean_pred)
        patch, trace, diverged = train_patch(handle, images, ref, targeted=targets is not None, side=side, config=self,
                                             progress=progress)
        # evaluation at fresh placements (a different stream from training)
        g = torch.Generator().manual_seed(self.seed + 7919)
        hw = (pre.height, pre.width)
        lo, hi = pre.input_range
        noise = lo + (hi - lo) * torch.rand(patch.shape, generator=g)
        rates, control, probs = [], [], []
        first_adv = first_pred = first_pl = None
        for k in range(self.eval_placements):
            pl = sample_placements(n, height=hw[0], width=hw[1], patch_hw=(side, side), generator=g,
                                   scale_range=self.scale_range, rotation_max=self.rotation_max)
            adv = apply_patch(images, patch.to(images.device), pl, shape=self.shape)[0]
            pred, prob = predict(handle, adv)
            ok = pred == targets if targets is not None else pred != ref
            rates.append(float(ok.float().mean()))
            if targets is not None:
                probs.append(float(prob[torch.arange(n), targets].mean()))
            cpred, _ = predict(handle, apply_patch(images, noise.to(images.device), pl, shape=self.shape)[0])
            control.append(float((cpred == targets if targets is not None else cpred != ref).float().mean()))
            if k == 0:
                first_adv, first_pred, first_pl, first_ok = adv, pred, pl, ok
        assert first_adv is not None and first_pred is not None and first_pl is not None
        extra: dict[str, Any] = {
            "config": asdict(self),
            "patch_side_pixels": side,
            "targeted": targets is not None,
            "success_random_placement": sum(rates) / len(rates),
            "control_noise": sum(control) / len(control),
            "placements": [[round(float(v), 4) for v in row] for row in first_pl],
        }
        if targets is not None:
            extra["target_prob_before"] = float(clean_prob[torch.arange(n), targets].mean())
            extra["target_prob_after"] = sum(probs) / len(probs)
        if diverged:
            extra["diverged"] = diverged
        single = int(targets[0]) if targets is not None and bool((targets == targets[0]).all()) else None
        return AdversarialExamples(
            method="adversarial-patch", inputs=images.detach().cpu(), adversarial=first_adv.detach().cpu(),
            success=first_ok, target=single, patch=patch.detach().cpu(), loss_trace=trace,
            original_pred=clean_pred, adversarial_pred=first_pred, extra=extra,
        )


def train_patch(handle: ModelHandle, images: torch.Tensor, ref: torch.Tensor, *, targeted: bool, side: int,
                config: AdversarialPatch, progress: bool = False) -> tuple[torch.Tensor, list[float], dict[str, Any] | None]:
    """Adam on sigmoid-parameterized patch logits; each step a random batch at random placements."""
    pre = preprocess_of(handle)
    lo, hi = (float(v) for v in pre.input_range)
    dev = images.device
    g = torch.Generator().manual_seed(config.seed)
    w = (torch.randn(pre.channels, side, side, generator=g) * 0.5).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=config.lr)
    n = images.shape[0]
    trace: list[float] = []
    last_good = w.detach().clone()
    diverged = None
    with frozen(handle.model):
        for step in progress_bar(range(config.steps), desc="adversarial patch", enabled=progress, leave=False):
            idx = torch.randint(n, (min(config.batch_size, n),), generator=g)
            pl = sample_placements(len(idx), height=pre.height, width=pre.width, patch_hw=(side, side), generator=g,
                                   scale_range=config.scale_range, rotation_max=config.rotation_max)
            patch = lo + (hi - lo) * torch.sigmoid(w)
            x = apply_patch(images[idx.to(dev)], patch, pl, shape=config.shape)[0]
            ce = F.cross_entropy(logits(handle, x), ref[idx].to(dev))
            loss = ce if targeted else -ce
            if not torch.isfinite(loss):
                diverged = diverged_record(step, "non-finite patch loss")
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if w.grad is None or not bool(torch.isfinite(w.grad).all()):
                diverged = diverged_record(step, "non-finite patch gradient")
                break
            opt.step()
            last_good = w.detach().clone()
            trace.append(float(loss.detach()))
    patch = lo + (hi - lo) * torch.sigmoid(last_good)
    return patch.detach(), trace, diverged
