"""ShapesWorld scenes: the vocabulary, a differentiable procedural renderer and exact masks.

A scene is a background (a mixture of procedural textures between two colours), a stack of
objects (soft signed-distance shapes with position, size, rotation, colour, opacity and
shape-mixture weights) and an optional pasted patch. Every continuous parameter is a
tensor, and pixels are smooth functions of them, so gradients flow from an image back to
the scene: feature-level adversaries and scene-parameterized feature visualization
optimize `Scene` fields directly. The renderer also returns exact per-object masks
(network dissection) and the scene itself is the ground truth of what an image shows.

The data distribution over scenes (classes, the spurious colour rule, context statistics,
distractors) is `workbench.worlds.shapesworld`; trojan triggers are
`workbench.worlds.trojans`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError

# --------------------------------------------------------------------------------------
# Vocabulary: shapes, textures, patch patterns, colours
# --------------------------------------------------------------------------------------

CLASS_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon")
"""The 8 shape classes ShapesNet recognizes (the large main object of a scene)."""

EXTRA_SHAPES: tuple[str, ...] = ("crescent", "heart", "arrow", "bowtie", "lshape", "pentagon", "semicircle", "tee")
"""Shapes that are never a class: small distractors, context objects and trojan triggers."""

SHAPES: tuple[str, ...] = CLASS_SHAPES + EXTRA_SHAPES

TEXTURES: tuple[str, ...] = ("plain", "stripes", "checker", "dots", "grid", "noise", "rings", "waves", "zigzag")
"""Procedural background textures; a background is a (differentiable) mixture of them."""

PATCH_PATTERNS: tuple[str, ...] = (
    "checker", "bullseye", "diagonal", "quadrants", "xmark", "gradient", "dots", "frame",
)
"""Procedural patterns for pasted square patches (patch trojans and their distractors)."""

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "orange": (0.98, 0.55, 0.10),
    "yellow": (0.95, 0.90, 0.15),
    "green": (0.15, 0.75, 0.25),
    "cyan": (0.15, 0.85, 0.90),
    "blue": (0.15, 0.30, 0.95),
    "purple": (0.60, 0.25, 0.85),
    "pink": (0.98, 0.50, 0.75),
    "white": (0.95, 0.95, 0.95),
    "lime": (0.65, 0.95, 0.20),
}
"""Saturated object colours, by name (RGB in [0, 1])."""

BACKGROUND_PALETTE: dict[str, tuple[float, float, float]] = {
    "charcoal": (0.15, 0.15, 0.17),
    "slate": (0.30, 0.33, 0.38),
    "grey": (0.45, 0.45, 0.45),
    "sand": (0.62, 0.57, 0.45),
    "olive": (0.35, 0.38, 0.22),
    "navy": (0.10, 0.12, 0.30),
    "plum": (0.32, 0.20, 0.30),
    "teal": (0.12, 0.32, 0.32),
}
"""Muted background colours, chosen to contrast with the object palette."""

Role = Literal["none", "main", "distractor", "context", "trigger"]
ROLES: tuple[str, ...] = ("none", "main", "distractor", "context", "trigger")
ROLE_NONE, ROLE_MAIN, ROLE_DISTRACTOR, ROLE_CONTEXT, ROLE_TRIGGER = range(5)


def shape_index(name: str) -> int:
    if name not in SHAPES:
        raise WorkbenchError(f"unknown shape {name!r}; valid shapes: {', '.join(SHAPES)}")
    return SHAPES.index(name)


def texture_index(name: str) -> int:
    if name not in TEXTURES:
        raise WorkbenchError(f"unknown texture {name!r}; valid textures: {', '.join(TEXTURES)}")
    return TEXTURES.index(name)


def pattern_index(name: str) -> int:
    if name not in PATCH_PATTERNS:
        raise WorkbenchError(f"unknown patch pattern {name!r}; valid patterns: {', '.join(PATCH_PATTERNS)}")
    return PATCH_PATTERNS.index(name)


def color_rgb(name: str) -> tuple[float, float, float]:
    """RGB of a named object or background colour."""
    if name in PALETTE:
        return PALETTE[name]
    if name in BACKGROUND_PALETTE:
        return BACKGROUND_PALETTE[name]
    raise WorkbenchError(
        f"unknown colour {name!r}; valid colours: {', '.join(list(PALETTE) + list(BACKGROUND_PALETTE))}"
    )


# --------------------------------------------------------------------------------------
# Signed distance functions (local unit coordinates: shapes fit in a radius of about 1)
# --------------------------------------------------------------------------------------


def _regular(n: int, radius: float = 1.0, start: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(radius * math.cos(start + 2 * math.pi * i / n), radius * math.sin(start + 2 * math.pi * i / n)) for i in range(n)]


def _star_pieces(points: int, outer: float, inner: float) -> list[list[tuple[float, float]]]:
    """A star as convex pieces: the inner pentagon plus one triangle per point."""
    tips = _regular(points, outer)
    valleys = _regular(points, inner, -math.pi / 2 + math.pi / points)
    pieces = [valleys]
    for i in range(points):
        pieces.append([valleys[i - 1], tips[i], valleys[i]])
    return pieces


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


# Shapes as unions of convex polygons (vertices in order; y points down). A convex
# polygon's signed distance is approximated by the max over its edges' half-plane
# distances: the zero level set (the edge the renderer draws) is exact, it is cheap, and
# its gradients are those of the nearest edge.
_CONVEX_PIECES: dict[str, list[list[tuple[float, float]]]] = {
    "square": [_rect(-0.75, -0.75, 0.75, 0.75)],
    "triangle": [_regular(3, 1.0)],
    "star": _star_pieces(5, 1.0, 0.42),
    "cross": [_rect(-0.3, -1.0, 0.3, 1.0), _rect(-1.0, -0.3, 1.0, 0.3)],
    "diamond": [[(0.0, -1.0), (0.58, 0.0), (0.0, 1.0), (-0.58, 0.0)]],
    "hexagon": [_regular(6, 0.95, 0.0)],
    "arrow": [_rect(-1.0, -0.25, 0.25, 0.25), [(0.2, -0.7), (1.0, 0.0), (0.2, 0.7)]],
    "bowtie": [[(-0.9, -0.8), (0.05, 0.0), (-0.9, 0.8)], [(0.9, -0.8), (0.9, 0.8), (-0.05, 0.0)]],
    "lshape": [_rect(-0.7, -0.9, -0.2, 0.9), _rect(-0.7, 0.4, 0.7, 0.9)],
    "pentagon": [_regular(5, 0.95)],
    "tee": [_rect(-0.9, -0.9, 0.9, -0.4), _rect(-0.25, -0.9, 0.25, 0.9)],
}


def _half_planes(verts: list[tuple[float, float]]) -> tuple[list[float], list[float], list[float]]:
    """Outward unit normals (nx, ny) and offsets c of a convex polygon's edges: d = n.p - c."""
    cx = sum(v[0] for v in verts) / len(verts)
    cy = sum(v[1] for v in verts) / len(verts)
    nxs, nys, cs = [], [], []
    for i, (ax, ay) in enumerate(verts):
        bx, by = verts[(i + 1) % len(verts)]
        nx, ny = by - ay, -(bx - ax)
        norm = math.hypot(nx, ny)
        nx, ny = nx / norm, ny / norm
        c = nx * ax + ny * ay
        if nx * cx + ny * cy - c > 0:  # make the normal point outward
            nx, ny, c = -nx, -ny, -c
        nxs.append(nx)
        nys.append(ny)
        cs.append(c)
    return nxs, nys, cs


_HALF_PLANES = {name: [_half_planes(piece) for piece in pieces] for name, pieces in _CONVEX_PIECES.items()}


def _convex_union_sdf(x: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
    rows = [(nx, ny, -c) for piece in _HALF_PLANES[name] for nx, ny, c in zip(*piece)]
    planes = torch.tensor(rows, dtype=x.dtype, device=x.device).T  # (3, E)
    d = torch.stack([x, y, torch.ones_like(x)], -1) @ planes  # (..., E) half-plane distances
    out = None
    start = 0
    for nxs, _, _ in _HALF_PLANES[name]:
        piece = d[..., start : start + len(nxs)].amax(-1)
        start += len(nxs)
        out = piece if out is None else torch.minimum(out, piece)
    assert out is not None
    return out


def _circle(x: torch.Tensor, y: torch.Tensor, cx: float, cy: float, r: float) -> torch.Tensor:
    return torch.sqrt((x - cx) ** 2 + (y - cy) ** 2 + 1e-12) - r


def shape_sdf(name: str, p: torch.Tensor) -> torch.Tensor:
    """Signed distance of shape `name` at local points `p` (..., 2); negative inside."""
    return _shape_sdf_xy(name, p[..., 0], p[..., 1])


def _shape_sdf_xy(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if name == "circle":
        return _circle(x, y, 0.0, 0.0, 0.9)
    if name == "ring":
        return _circle(x, y, 0.0, 0.0, 0.72).abs() - 0.24
    if name == "crescent":
        return torch.maximum(_circle(x, y, 0.0, 0.0, 0.9), -_circle(x, y, 0.4, -0.25, 0.75))
    if name == "heart":
        lobes = torch.minimum(_circle(x, y, -0.42, -0.3, 0.5), _circle(x, y, 0.42, -0.3, 0.5))
        return torch.minimum(lobes, _convex_union_sdf(x, y, "_heart_tip"))
    if name == "semicircle":
        return torch.maximum(_circle(x, y, 0.0, 0.35, 0.95), y - 0.35)
    if name in _HALF_PLANES:
        return _convex_union_sdf(x, y, name)
    raise WorkbenchError(f"unknown shape {name!r}; valid shapes: {', '.join(SHAPES)}")


_HALF_PLANES["_heart_tip"] = [_half_planes([(-0.88, -0.15), (0.88, -0.15), (0.0, 0.95)])]


# --------------------------------------------------------------------------------------
# Scene parameters
# --------------------------------------------------------------------------------------

CONTINUOUS_FIELDS: tuple[str, ...] = (
    "bg_weights", "bg_colors", "bg_freq", "bg_angle", "bg_phase", "bg_noise",
    "shape_weights", "center", "size", "rotation", "color", "opacity",
    "patch_center", "patch_size", "patch_colors", "patch_opacity",
)
"""Scene fields that are continuous and differentiable (the rest are integer labels)."""


@dataclass(frozen=True)
class Scene:
    """A batch of N scenes as tensors; every float field is differentiable.

    Background: `bg_weights` (N, T) mixes the procedural `TEXTURES` between `bg_colors`
    (N, 2, 3); `bg_freq` (cycles across the image), `bg_angle` (radians), `bg_phase`
    (N,) and `bg_noise` (N, 8, 8, the low-resolution field of the noise texture).
    Objects: K slots painted in order (later slots on top): `shape_weights` (N, K, S)
    mixes the signed distances of `SHAPES` (one-hot for a plain shape), `center` (N, K, 2)
    in [-1, 1] image coordinates (x right, y down), `size` (N, K) radius in the same
    units, `rotation` (N, K) radians, `color` (N, K, 3), `opacity` (N, K) (0 = absent),
    and `role` (N, K) integer `ROLES` index. Patch: a square of half-side `patch_size`
    at `patch_center` showing `PATCH_PATTERNS[patch_pattern]` in `patch_colors` (N, 2, 3),
    blended with `patch_opacity` (0 = no patch).
    """

    bg_weights: torch.Tensor
    bg_colors: torch.Tensor
    bg_freq: torch.Tensor
    bg_angle: torch.Tensor
    bg_phase: torch.Tensor
    bg_noise: torch.Tensor
    shape_weights: torch.Tensor
    center: torch.Tensor
    size: torch.Tensor
    rotation: torch.Tensor
    color: torch.Tensor
    opacity: torch.Tensor
    role: torch.Tensor
    patch_center: torch.Tensor
    patch_size: torch.Tensor
    patch_pattern: torch.Tensor
    patch_colors: torch.Tensor
    patch_opacity: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.bg_weights.shape[0])

    @property
    def n_slots(self) -> int:
        return int(self.shape_weights.shape[1])

    def __len__(self) -> int:
        return self.n

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: torch.Tensor) -> Scene:
        return replace(self, **changes)

    def to(self, device: torch.device | str) -> Scene:
        return Scene(**{k: v.to(device) for k, v in self.tensors().items()})

    def detach(self) -> Scene:
        return Scene(**{k: v.detach() for k, v in self.tensors().items()})

    def clone(self) -> Scene:
        return Scene(**{k: v.clone() for k, v in self.tensors().items()})

    def index(self, rows: torch.Tensor | slice | list[int]) -> Scene:
        return Scene(**{k: v[rows] for k, v in self.tensors().items()})

    def requires_grad_(self, names: tuple[str, ...] | list[str] | None = None) -> Scene:
        """A copy whose named continuous fields (all by default) are leaf tensors with grad."""
        names = CONTINUOUS_FIELDS if names is None else tuple(names)
        bad = [n for n in names if n not in CONTINUOUS_FIELDS]
        if bad:
            raise WorkbenchError(f"not continuous scene fields: {bad}; choose from {', '.join(CONTINUOUS_FIELDS)}")
        out = {k: (v.detach().clone().requires_grad_(True) if k in names else v) for k, v in self.tensors().items()}
        return Scene(**out)

    @staticmethod
    def cat(scenes: list[Scene]) -> Scene:
        if not scenes:
            raise WorkbenchError("Scene.cat needs at least one scene batch")
        k = max(s.n_slots for s in scenes)
        scenes = [s.with_slots(k) for s in scenes]
        return Scene(**{f.name: torch.cat([getattr(s, f.name) for s in scenes]) for f in fields(Scene)})

    def with_slots(self, k: int) -> Scene:
        """The same scenes padded with empty object slots to `k` slots."""
        pad = k - self.n_slots
        if pad < 0:
            raise WorkbenchError(f"cannot shrink a scene from {self.n_slots} to {k} object slots")
        if pad == 0:
            return self
        empty = empty_scene(self.n, n_slots=pad, device=self.center.device, dtype=self.center.dtype)
        obj = ("shape_weights", "center", "size", "rotation", "color", "opacity", "role")
        return replace(self, **{f: torch.cat([getattr(self, f), getattr(empty, f)], dim=1) for f in obj})

    def add_object(
        self,
        *,
        shape: str | torch.Tensor,
        center: torch.Tensor,
        size: torch.Tensor | float,
        color: torch.Tensor | tuple[float, float, float] | str,
        rotation: torch.Tensor | float = 0.0,
        opacity: torch.Tensor | float = 1.0,
        role: int = ROLE_TRIGGER,
    ) -> Scene:
        """These scenes with one more object slot on top (the copy/paste and trigger primitive).

        `shape` is a shape name or mixture weights (S,) / (N, S); tensors broadcast over N.
        """
        n = self.n
        dev, dt = self.center.device, self.center.dtype
        if isinstance(shape, str):
            w = torch.zeros(n, len(SHAPES), device=dev, dtype=dt)
            w[:, shape_index(shape)] = 1.0
        else:
            w = shape.to(dev, dt).expand(n, len(SHAPES))
        if isinstance(color, str):
            color = color_rgb(color)
        col = torch.as_tensor(color, device=dev, dtype=dt).expand(n, 3)

        def col1(x: torch.Tensor | float) -> torch.Tensor:
            return torch.as_tensor(x, device=dev, dtype=dt).expand(n)

        return replace(
            self,
            shape_weights=torch.cat([self.shape_weights, w[:, None]], 1),
            center=torch.cat([self.center, torch.as_tensor(center, device=dev, dtype=dt).expand(n, 2)[:, None]], 1),
            size=torch.cat([self.size, col1(size)[:, None]], 1),
            rotation=torch.cat([self.rotation, col1(rotation)[:, None]], 1),
            color=torch.cat([self.color, col[:, None]], 1),
            opacity=torch.cat([self.opacity, col1(opacity)[:, None]], 1),
            role=torch.cat([self.role, torch.full((n, 1), role, device=dev, dtype=torch.long)], 1),
        )


def empty_scene(n: int, *, n_slots: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Scene:
    """N plain grey scenes with `n_slots` empty object slots and no patch."""
    z = lambda *s: torch.zeros(*s, device=device, dtype=dtype)  # noqa: E731
    bg_w = z(n, len(TEXTURES))
    bg_w[:, 0] = 1.0
    bg_c = torch.tensor(BACKGROUND_PALETTE["grey"], device=device, dtype=dtype).expand(n, 2, 3).clone()
    return Scene(
        bg_weights=bg_w, bg_colors=bg_c, bg_freq=torch.full((n,), 4.0, device=device, dtype=dtype),
        bg_angle=z(n), bg_phase=z(n), bg_noise=z(n, 8, 8),
        shape_weights=z(n, n_slots, len(SHAPES)), center=z(n, n_slots, 2), size=torch.full((n, n_slots), 0.3, device=device, dtype=dtype),
        rotation=z(n, n_slots), color=z(n, n_slots, 3), opacity=z(n, n_slots),
        role=torch.zeros(n, n_slots, device=device, dtype=torch.long),
        patch_center=z(n, 2), patch_size=torch.full((n,), 0.2, device=device, dtype=dtype),
        patch_pattern=torch.zeros(n, device=device, dtype=torch.long), patch_colors=z(n, 2, 3), patch_opacity=z(n),
    )


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Render:
    """Images (N, 3, H, W) in [0, 1] plus exact masks.

    `object_masks` (N, K, H, W): the visible part of each object slot after occlusion by
    later slots and the patch (soft, in [0, 1]); `coverage` the same before occlusion;
    `patch_mask` (N, H, W) and `background_mask` (N, H, W) the visible patch/background.
    """

    images: torch.Tensor
    object_masks: torch.Tensor | None = None
    coverage: torch.Tensor | None = None
    patch_mask: torch.Tensor | None = None
    background_mask: torch.Tensor | None = None


def pixel_grid(height: int, width: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pixel centres in [-1, 1] image coordinates, (H, W, 2) as (x, y), y down."""
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], -1)


def _soft_step(x: torch.Tensor, sharp: float = 6.0) -> torch.Tensor:
    return torch.sigmoid(sharp * x)


def _texture(name: str, x: torch.Tensor, y: torch.Tensor, freq: torch.Tensor, angle: torch.Tensor,
             phase: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One texture in [0, 1] for M scenes: (M, H, W); freq/angle/phase are (M, 1, 1)."""
    m = freq.shape[0]
    h, w = x.shape
    tau = math.pi  # the image spans 2 units: `freq` cycles across it
    if name == "plain":
        return x.new_zeros(m, h, w)
    if name == "noise":
        return torch.sigmoid(3.0 * F.interpolate(noise[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0])
    cos, sin = torch.cos(angle), torch.sin(angle)
    u = cos * x + sin * y
    v = -sin * x + cos * y
    if name == "stripes":
        return _soft_step(torch.sin(tau * freq * u + phase))
    if name == "checker":
        return _soft_step(torch.sin(tau * freq * u + phase) * torch.sin(tau * freq * v + phase) * 2.0)
    if name == "dots":
        fu = torch.remainder(freq * u / 2 + phase / (2 * math.pi), 1.0) - 0.5
        fv = torch.remainder(freq * v / 2 + phase / (2 * math.pi), 1.0) - 0.5
        return _soft_step((0.28 - torch.sqrt(fu * fu + fv * fv + 1e-9)) * 20.0, 1.0)
    if name == "grid":
        su, sv = torch.sin(tau * freq * u + phase), torch.sin(tau * freq * v + phase)
        return _soft_step((torch.maximum(su.abs(), sv.abs()) - 0.92) * 20.0, 1.0)
    if name == "rings":
        return _soft_step(torch.sin(tau * freq * torch.sqrt(x * x + y * y + 1e-9) + phase))
    if name == "waves":
        return _soft_step(torch.sin(tau * freq * v + 1.5 * torch.sin(tau * 0.5 * freq * u) + phase))
    if name == "zigzag":
        zig = torch.abs(torch.remainder(freq * u / 2, 1.0) - 0.5)  # triangle wave in [0, 0.5]
        return _soft_step(torch.sin(tau * freq * v + 4.0 * zig * math.pi + phase))
    raise WorkbenchError(f"unknown texture {name!r}; valid textures: {', '.join(TEXTURES)}")


def background_level(scene: Scene, grid: torch.Tensor) -> torch.Tensor:
    """The texture mixture in [0, 1] at every pixel: (N, H, W) (0 = colour a, 1 = colour b).

    Only textures with a non-zero weight are evaluated unless the background parameters
    require gradients (then all are, so every mixture weight gets one).
    """
    n = scene.n
    h, w = grid.shape[:2]
    x, y = grid[..., 0], grid[..., 1]
    params = (scene.bg_freq.view(n, 1, 1), scene.bg_angle.view(n, 1, 1), scene.bg_phase.view(n, 1, 1), scene.bg_noise)
    dense = scene.bg_weights.requires_grad
    out = x.new_zeros(n, h, w)
    for t, name in enumerate(TEXTURES):
        wt = scene.bg_weights[:, t]
        if name == "plain":
            continue
        if dense:
            out = out + wt.view(n, 1, 1) * _texture(name, x, y, *params)
            continue
        rows = torch.nonzero(wt != 0).flatten()
        if rows.numel() == 0:
            continue
        part = wt[rows].view(-1, 1, 1) * _texture(name, x, y, *(p[rows] for p in params))
        out = out.index_add(0, rows, part)
    return out.clamp(0, 1)


def texture_fields(scene: Scene, grid: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] of every texture for every scene: (N, T, H, W) (for analysis and tests)."""
    n = scene.n
    params = (scene.bg_freq.view(n, 1, 1), scene.bg_angle.view(n, 1, 1), scene.bg_phase.view(n, 1, 1), scene.bg_noise)
    return torch.stack([_texture(name, grid[..., 0], grid[..., 1], *params) for name in TEXTURES], 1)


def patch_pattern_fields(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Every patch pattern in local patch coordinates u, v in [-1, 1]: (N, P, H, W) in [0, 1]."""
    s = 8.0
    checker = _soft_step(torch.sin(2 * math.pi * u) * torch.sin(2 * math.pi * v) * s, 1.0)
    r = torch.sqrt(u * u + v * v + 1e-9)
    bullseye = _soft_step(torch.sin(3 * math.pi * r) * s, 1.0)
    diagonal = _soft_step(torch.sin(2.5 * math.pi * (u + v)) * s, 1.0)
    quadrants = _soft_step(u * v * s * 4, 1.0)
    xmark = _soft_step((0.3 - torch.minimum((u - v).abs(), (u + v).abs())) * s * 3, 1.0)
    gradient = ((u + 1) / 2).clamp(0, 1)
    dots = _soft_step((0.25 - torch.sqrt((torch.remainder(u + 1, 1.0) - 0.5) ** 2 + (torch.remainder(v + 1, 1.0) - 0.5) ** 2 + 1e-9)) * s * 4, 1.0)
    frame = _soft_step((torch.maximum(u.abs(), v.abs()) - 0.6) * s * 4, 1.0)
    return torch.stack([checker, bullseye, diagonal, quadrants, xmark, gradient, dots, frame], 1)


def object_sdf(scene: Scene, grid: torch.Tensor) -> torch.Tensor:
    """Signed distance (image units) of every object slot at every pixel: (N, K, H, W).

    Shapes mix by `shape_weights`. Slots with opacity 0 and shapes with weight 0 are
    skipped unless those tensors require gradients (then every mixture weight and every
    slot gets one); skipped slots read as far away (+10).
    """
    n, k = scene.n, scene.n_slots
    h, w = grid.shape[:2]
    weights = scene.shape_weights.reshape(n * k, len(SHAPES))
    opacity = scene.opacity.reshape(n * k)
    dense = weights.requires_grad
    active = torch.ones_like(opacity, dtype=torch.bool) if (dense or opacity.requires_grad) else opacity != 0
    act = torch.nonzero(active).flatten()
    c = scene.center.reshape(n * k, 2)[act]
    size = scene.size.reshape(n * k)[act].view(-1, 1, 1)
    rot = scene.rotation.reshape(n * k)[act].view(-1, 1, 1)
    rx = grid[..., 0] - c[:, 0].view(-1, 1, 1)
    ry = grid[..., 1] - c[:, 1].view(-1, 1, 1)
    cos, sin = torch.cos(rot), torch.sin(rot)
    lx = (cos * rx + sin * ry) / size
    ly = (-sin * rx + cos * ry) / size
    wa = weights[act]
    sdf = grid.new_zeros(act.numel(), h, w)
    for s, name in enumerate(SHAPES):
        ws = wa[:, s]
        if dense:
            sdf = sdf + ws.view(-1, 1, 1) * _shape_sdf_xy(name, lx, ly)
            continue
        rows = torch.nonzero(ws != 0).flatten()
        if rows.numel() == 0:
            continue
        part = ws[rows].view(-1, 1, 1) * _shape_sdf_xy(name, lx[rows], ly[rows])
        sdf = sdf.index_add(0, rows, part)
    sdf = sdf * size
    if act.numel() == n * k:
        return sdf.view(n, k, h, w)
    full = grid.new_full((n * k, h, w), 10.0)
    return full.index_copy(0, act, sdf).view(n, k, h, w)


def render(
    scene: Scene,
    *,
    height: int = 48,
    width: int | None = None,
    softness: float = 0.6,
    masks: bool = False,
) -> Render:
    """Render a batch of scenes to images (N, 3, H, W) in [0, 1], differentiably.

    `softness` is the edge width in pixels of the sigmoid that turns signed distances into
    coverage (smaller: crisper edges, sharper gradients). With `masks=True` the result
    also carries exact per-object, patch and background masks.
    """
    width = height if width is None else width
    dev, dt = scene.center.device, scene.center.dtype
    grid = pixel_grid(height, width, device=dev, dtype=dt)
    n = scene.n
    # background
    t = background_level(scene, grid)  # (N, H, W)
    ca, cb = scene.bg_colors[:, 0].view(n, 3, 1, 1), scene.bg_colors[:, 1].view(n, 3, 1, 1)
    img = ca + (cb - ca) * t[:, None]
    # objects, painted in slot order
    soft = softness * 2.0 / min(height, width)
    cover = None
    if scene.n_slots:
        sdf = object_sdf(scene, grid)
        cover = torch.sigmoid(-sdf / soft) * scene.opacity.view(n, -1, 1, 1)  # (N, K, H, W)
        for k in range(scene.n_slots):
            a = cover[:, k : k + 1]
            img = img * (1 - a) + a * scene.color[:, k].view(n, 3, 1, 1)
    # patch on top
    rel = grid.view(1, height, width, 2) - scene.patch_center.view(n, 1, 1, 2)
    half = scene.patch_size.view(n, 1, 1)
    u, v = rel[..., 0] / half, rel[..., 1] / half
    box = (torch.maximum(u.abs(), v.abs()) - 1.0) * half  # signed distance to the square
    pmask = torch.sigmoid(-box / soft) * scene.patch_opacity.view(n, 1, 1)
    if bool((scene.patch_opacity != 0).any()) or scene.patch_opacity.requires_grad:
        pats = patch_pattern_fields(u, v)  # (N, P, H, W)
        sel = torch.gather(pats, 1, scene.patch_pattern.view(n, 1, 1, 1).expand(n, 1, height, width))
        pa, pb = scene.patch_colors[:, 0].view(n, 3, 1, 1), scene.patch_colors[:, 1].view(n, 3, 1, 1)
        pimg = pa + (pb - pa) * sel
        img = img * (1 - pmask[:, None]) + pmask[:, None] * pimg
    img = img.clamp(0.0, 1.0)
    if not masks:
        return Render(images=img)
    k = scene.n_slots
    if k:
        # visible part of slot k: its coverage times (1 - coverage) of every later slot and the patch
        after = torch.ones_like(cover[:, :1])
        vis = []
        for j in range(k - 1, -1, -1):
            vis.append(cover[:, j : j + 1] * after)
            after = after * (1 - cover[:, j : j + 1])
        visible = torch.cat(vis[::-1], 1) * (1 - pmask[:, None])
        background = after[:, 0] * (1 - pmask)
    else:
        visible = img.new_zeros(n, 0, height, width)
        cover = visible
        background = 1 - pmask
    return Render(images=img, object_masks=visible, coverage=cover, patch_mask=pmask, background_mask=background)


# --------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------


def uniform(generator: torch.Generator, n: int, low: float, high: float, *shape: int) -> torch.Tensor:
    """(n, *shape) draws, uniform in [low, high), from `generator`."""
    return low + (high - low) * torch.rand(n, *shape, generator=generator)


def small_positions(main_center: torch.Tensor, main_size: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """Positions for small objects, pushed off the main object so they rarely hide it."""
    n = main_center.shape[0]
    ang = uniform(generator, n, 0.0, 2 * math.pi)
    dist = main_size * 1.05 + uniform(generator, n, 0.1, 0.5)
    pos = main_center + dist[:, None] * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    # reflect back inside the frame when pushed out
    lim = 0.82
    pos = torch.where(pos > lim, 2 * lim - pos, pos)
    pos = torch.where(pos < -lim, -2 * lim - pos, pos)
    return pos.clamp(-lim, lim)
