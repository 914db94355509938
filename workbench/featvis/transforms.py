"""Transformation robustness: small random image transforms applied at every step.

A transform is a function `(images, generator) -> images` on `(B, C, H, W)` tensors in
[0, 1] (before the model's input range is applied); randomness comes only from the
`torch.Generator` passed in, so the same seed gives the same pictures. Compose them with
`compose(...)`. `default_transforms(h, w)` is lucid's standard set (pad, jitter, scale
0.9-1.1, rotate within +-10 degrees, jitter) scaled to the model's own input size and
fitted back to it, so models with a fixed-size head still work and nothing is resized to 224,
with one change: the padding and the corners the rotation uncovers are uniform noise, redrawn
every step, not flat grey. A flat border adds nothing a unit can respond to, so a unit that is
zero on grey stays zero there; noise gives such a unit edges and colours to fire on at the
border, and its gradient reaches the image through the receptive field.
`robust` computes that whole chain as one resampling (one grid_sample per step instead of
five tensor operations), drawing the same random numbers as the separate transforms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _choice(values: Sequence[float], g: torch.Generator) -> float:
    return float(values[int(torch.randint(len(values), (1,), generator=g))])


def _uniform(shape: tuple[int, ...], g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(*shape, generator=g).to(device=like.device, dtype=like.dtype)


def compose(*transforms: Transform) -> Transform:
    """Apply `transforms` left to right."""
    def run(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        for t in transforms:
            x = t(x, g)
        return x

    run.__name__ = "compose(" + ", ".join(getattr(t, "__name__", "t") for t in transforms) + ")"
    return run


def identity() -> Transform:
    def run(x: torch.Tensor, _g: torch.Generator) -> torch.Tensor:
        return x

    run.__name__ = "identity"
    return run


def pad(width: int, *, mode: str = "constant", value: float = 0.5) -> Transform:
    """Pad every side by `width` pixels: constant `value`, "noise" (uniform in [0, 1], drawn
    from the generator at every call), or "reflect"/"replicate"."""
    if width < 0:
        raise WorkbenchError(f"pad width must be >= 0, got {width}")
    if mode not in ("constant", "noise", "reflect", "replicate"):
        raise WorkbenchError(f"unknown pad mode {mode!r}; choose constant, noise, reflect or replicate")

    def run(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if width == 0:
            return x
        if mode == "constant":
            return F.pad(x, (width,) * 4, mode="constant", value=value)
        if mode == "noise":
            h, w = x.shape[-2:]
            out = _uniform((x.shape[0], x.shape[1], h + 2 * width, w + 2 * width), g, x)
            mask = F.pad(torch.ones_like(x[:1, :1]), (width,) * 4)
            return out * (1 - mask) + F.pad(x, (width,) * 4)
        return F.pad(x, (width,) * 4, mode=mode)

    run.__name__ = f"pad({width})"
    return run


def jitter(d: int) -> Transform:
    """Crop `d` pixels off at a random offset (the image shrinks by `d` on each axis)."""
    if d < 0:
        raise WorkbenchError(f"jitter must be >= 0, got {d}")

    def run(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if d == 0:
            return x
        h, w = x.shape[-2:]
        if d >= min(h, w):
            raise WorkbenchError(f"jitter {d} is not smaller than the image ({h}x{w})")
        dy, dx = (int(v) for v in torch.randint(d + 1, (2,), generator=g))
        return x[..., dy:dy + h - d, dx:dx + w - d]

    run.__name__ = f"jitter({d})"
    return run


def _affine(x: torch.Tensor, scale: float, angle_deg: float) -> torch.Tensor:
    if scale == 1.0 and angle_deg == 0.0:
        return x
    a = math.radians(angle_deg)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_scale(scales: Sequence[float]) -> Transform:
    """Zoom by a factor drawn from `scales` about the centre (same output size)."""
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise WorkbenchError(f"scales must be positive numbers, got {scales}")

    def run(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return _affine(x, _choice(scales, g), 0.0)

    run.__name__ = "random_scale"
    return run


def random_rotate(angles: Sequence[float]) -> Transform:
    """Rotate by an angle (degrees) drawn from `angles` about the centre."""
    angles = tuple(float(a) for a in angles)
    if not angles:
        raise WorkbenchError("random_rotate needs at least one angle")

    def run(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return _affine(x, 1.0, _choice(angles, g))

    run.__name__ = "random_rotate"
    return run


def affine(scales: Sequence[float], angles: Sequence[float]) -> Transform:
    """`random_scale` then `random_rotate` in one resampling (faster, one interpolation)."""
    scales = tuple(float(s) for s in scales)
    angles = tuple(float(a) for a in angles)
    if not scales or min(scales) <= 0 or not angles:
        raise WorkbenchError("affine needs positive scales and at least one angle")

    def run(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return _affine(x, _choice(scales, g), _choice(angles, g))

    run.__name__ = "affine"
    return run


def translate(max_dy: int, max_dx: int, *, value: float = 0.5) -> Transform:
    """Shift by a random whole number of pixels in [-max, max] on each axis, filling with `value`.

    With a patch parameterization (`param.Patch`) on a constant canvas this is random
    placement of the patch: the feature is visualized wherever it appears.
    """
    if max_dy < 0 or max_dx < 0:
        raise WorkbenchError("translate needs non-negative shifts")

    def run(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        dy = int(torch.randint(-max_dy, max_dy + 1, (1,), generator=g))
        dx = int(torch.randint(-max_dx, max_dx + 1, (1,), generator=g))
        if dy == 0 and dx == 0:
            return x
        h, w = x.shape[-2:]
        padded = F.pad(x, (max_dx, max_dx, max_dy, max_dy), mode="constant", value=value)
        return padded[..., max_dy - dy: max_dy - dy + h, max_dx - dx: max_dx - dx + w]

    run.__name__ = f"translate({max_dy}, {max_dx})"
    return run


def fit(height: int, width: int, *, value: float = 0.5) -> Transform:
    """Centre-crop or pad (constant `value`) to exactly `height` x `width`."""
    def run(x: torch.Tensor, _g: torch.Generator) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h > height:
            top = (h - height) // 2
            x = x[..., top:top + height, :]
        if w > width:
            left = (w - width) // 2
            x = x[..., :, left:left + width]
        h, w = x.shape[-2:]
        if h < height or w < width:
            ph, pw = height - h, width - w
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="constant", value=value)
        return x

    run.__name__ = f"fit({height}x{width})"
    return run


def robust(pad_width: int, jitter1: int, scales: Sequence[float], angles: Sequence[float], jitter2: int,
           height: int, width: int, *, value: float | Literal["noise"] = 0.5) -> Transform:
    """`compose(pad, jitter, affine, jitter, fit)` computed as ONE resampling of the input.

    The chain is a random affine map from output pixels to input pixels (the padding is a
    constant outside the image), so instead of five tensor operations per step it builds
    that map and calls `grid_sample` once. It draws its random numbers in the same order as
    the separate transforms, so with the same generator state both give the same image (up
    to interpolation at the border); the fused form is what `default_transforms` uses.
    `value` fills what lies outside the image: a constant, or "noise" (uniform in [0, 1],
    drawn after the geometry, so the geometry matches the constant case).
    """
    scales = tuple(float(s) for s in scales)
    angles = tuple(float(a) for a in angles)
    if pad_width < 0 or jitter1 < 0 or jitter2 < 0:
        raise WorkbenchError("pad and jitter widths must be >= 0")
    if not scales or min(scales) <= 0 or not angles:
        raise WorkbenchError("robust needs positive scales and at least one angle")
    if isinstance(value, str) and value != "noise":
        raise WorkbenchError(f"robust fill value must be a number or 'noise', got {value!r}")

    def run(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        h, w = x.shape[-2:]
        a1 = torch.randint(jitter1 + 1, (2,), generator=g).tolist() if jitter1 else [0, 0]
        scale, angle = _choice(scales, g), _choice(angles, g)
        a2 = torch.randint(jitter2 + 1, (2,), generator=g).tolist() if jitter2 else [0, 0]
        s1h, s1w = h + 2 * pad_width - jitter1, w + 2 * pad_width - jitter1  # after pad + jitter1 (= after affine)
        s2h, s2w = s1h - jitter2, s1w - jitter2
        if min(s2h, s2w) < 1:
            raise WorkbenchError(f"pad {pad_width} and jitters {jitter1}, {jitter2} leave nothing of a {h}x{w} image")
        # fit: centre-crop (positive offset) or pad (negative offset) to height x width
        off_y = (s2h - height) // 2 if s2h > height else -((height - s2h) // 2)
        off_x = (s2w - width) // 2 if s2w > width else -((width - s2w) // 2)
        # The chain is one affine map from output to input normalized coordinates
        # (align_corners=False): output -> affine-output pixels (fit offset + jitter2) ->
        # rotate/scale about the centre -> pad+jitter1 pixels -> input pixels.
        cy, cx = off_y + a2[0], off_x + a2[1]
        sx, tx = width / s1w, (width + 2 * cx) / s1w - 1  # output -> affine output (normalized)
        sy, ty = height / s1h, (height + 2 * cy) / s1h - 1
        a = math.radians(angle)
        cos, sin = math.cos(a) / scale, math.sin(a) / scale
        ux, vx = s1w / w, (s1w + 2 * (a1[1] - pad_width)) / w - 1  # pad+jitter1 image -> input (normalized)
        uy, vy = s1h / h, (s1h + 2 * (a1[0] - pad_width)) / h - 1
        theta = torch.tensor([[ux * cos * sx, -ux * sin * sy, ux * (cos * tx - sin * ty) + vx],
                              [uy * sin * sx, uy * cos * sy, uy * (sin * tx + cos * ty) + vy]], dtype=x.dtype, device=x.device)
        grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), [x.shape[0], x.shape[1], height, width], align_corners=False)
        if value != "noise":
            return F.grid_sample(x - value, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + value
        inside = F.grid_sample(torch.ones_like(x[:1, :1]), grid[:1], mode="bilinear", padding_mode="zeros",
                               align_corners=False)
        noise = _uniform((x.shape[0], x.shape[1], height, width), g, x)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + (1 - inside) * noise

    run.__name__ = f"robust(pad={pad_width}, jitter={jitter1}/{jitter2}, {height}x{width})"
    return run


LUCID_SCALES: tuple[float, ...] = tuple(1 + (i - 5) / 50 for i in range(11))
LUCID_ANGLES: tuple[float, ...] = tuple(range(-10, 11)) + (0.0,) * 5


def default_transforms(height: int, width: int) -> Transform:
    """Lucid's standard robustness set scaled from 224 px to this size, fitted back to it,
    with noise (not grey) in the padding and uncovered corners (see the module docstring)."""
    s = min(height, width)
    p = max(1, round(12 * s / 224))
    j1 = max(1, round(8 * s / 224))
    j2 = max(1, round(4 * s / 224))
    return robust(p, j1, LUCID_SCALES, LUCID_ANGLES, j2, height, width, value="noise")


def lucid_transforms(*, pad_width: int = 12, jitter1: int = 8, jitter2: int = 4) -> Transform:
    """Lucid's standard set with its own sizes (output size changes; for side-by-side runs)."""
    return compose(pad(pad_width), jitter(jitter1), random_scale(LUCID_SCALES), random_rotate(LUCID_ANGLES), jitter(jitter2))
