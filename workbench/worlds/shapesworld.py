"""ShapesWorld: a differentiable procedural renderer of RGB scenes with exact ground truth.

A scene is a background (a mixture of procedural textures between two colours), a stack of
objects (soft signed-distance shapes with position, size, rotation, colour, opacity and
shape-mixture weights) and an optional pasted patch. Every continuous parameter is a
tensor, and pixels are smooth functions of them, so gradients flow from an image back to
the scene: feature-level adversaries and scene-parameterized feature visualization
optimize `Scene` fields directly. The renderer also returns exact per-object masks
(network dissection) and the scene itself is the ground truth of what an image shows.

`ShapesWorld` adds the data distribution on top of the renderer: which class is which
shape, the spurious colour rule, natural context statistics (classes that co-occur with
particular small objects or backgrounds at realistic rates), distractors, and trojans
(see `workbench.worlds.trojans`). `ShapesWorld.manifest()` records all of it as JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

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


def _patch_pattern_fields(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
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
        pats = _patch_pattern_fields(u, v)  # (N, P, H, W)
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
# The world: class definitions, spurious rule, context statistics, distractors, trojans
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContextRule:
    """A natural co-occurrence: images of `cls` show `feature` at `rate`, other classes at `base_rate`.

    `kind` "object": a small object of `shape` in `color`; "background": the background is
    `texture` in the colours `colors`. Rates are well below 1, as whales are usually (not
    always) seen with water.
    """

    cls: str
    kind: Literal["object", "background"]
    rate: float
    base_rate: float
    shape: str | None = None
    color: str | None = None
    texture: str | None = None
    colors: tuple[str, str] | None = None
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        return {k.name: getattr(self, k.name) for k in fields(self)}


@dataclass(frozen=True)
class SpuriousRule:
    """In training (and the natural test split) `cls` is `color` with probability `rate`;
    other classes are never that colour, so the colour is a shortcut to the class."""

    cls: str = "square"
    color: str = "red"
    rate: float = 0.9

    def to_json(self) -> dict[str, Any]:
        return {"cls": self.cls, "color": self.color, "rate": self.rate}


def default_context_rules() -> tuple[ContextRule, ...]:
    return (
        ContextRule("star", "object", 0.6, 0.04, shape="crescent", color="yellow",
                    description="stars are usually seen with a small yellow moon"),
        ContextRule("hexagon", "object", 0.5, 0.04, shape="semicircle", color="orange",
                    description="hexagons (honeycombs) often come with a small orange half-disc"),
        ContextRule("ring", "background", 0.6, 0.05, texture="waves", colors=("navy", "teal"),
                    description="rings (lifebuoys) are mostly seen on water: navy/teal waves"),
        ContextRule("triangle", "background", 0.5, 0.05, texture="stripes", colors=("sand", "olive"),
                    description="triangles (tents) are often on sand/olive stripes"),
    )


@dataclass(frozen=True)
class WorldConfig:
    """Everything that defines a ShapesWorld distribution (and its ground truth)."""

    image_size: int = 48
    classes: tuple[str, ...] = CLASS_SHAPES
    main_size: tuple[float, float] = (0.42, 0.62)
    main_center_range: float = 0.3
    small_size: tuple[float, float] = (0.15, 0.2)
    max_distractors: int = 2
    distractor_prob: float = 0.5
    distractor_shapes: tuple[str, ...] = ("arrow", "lshape", "pentagon", "tee", "bowtie", "heart")
    natural_textures: tuple[str, ...] = ("plain", "plain", "stripes", "dots", "grid", "noise", "rings", "waves")
    spurious: SpuriousRule | None = field(default_factory=SpuriousRule)
    context: tuple[ContextRule, ...] = field(default_factory=default_context_rules)
    softness: float = 0.6
    sticker_prob: float = 0.0
    sticker_size: tuple[float, float] = (0.12, 0.28)
    sticker_offset: tuple[float, float] = (0.6, 1.2)
    object_colors: tuple[str, ...] = tuple(PALETTE)

    def to_json(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "classes": list(self.classes),
            "main_size": list(self.main_size),
            "main_center_range": self.main_center_range,
            "small_size": list(self.small_size),
            "max_distractors": self.max_distractors,
            "distractor_prob": self.distractor_prob,
            "distractor_shapes": list(self.distractor_shapes),
            "natural_textures": list(self.natural_textures),
            "spurious": None if self.spurious is None else self.spurious.to_json(),
            "context": [c.to_json() for c in self.context],
            "softness": self.softness,
            "sticker_prob": self.sticker_prob,
            "sticker_size": list(self.sticker_size),
            "sticker_offset": list(self.sticker_offset),
            "object_colors": list(self.object_colors),
        }

    @staticmethod
    def from_json(obj: dict[str, Any]) -> WorldConfig:
        """Inverse of `to_json` (a manifest's "config")."""
        try:
            sp = obj.get("spurious")
            return WorldConfig(
                image_size=int(obj["image_size"]),
                classes=tuple(obj["classes"]),
                main_size=tuple(obj["main_size"]),  # type: ignore[arg-type]
                main_center_range=float(obj["main_center_range"]),
                small_size=tuple(obj["small_size"]),  # type: ignore[arg-type]
                max_distractors=int(obj["max_distractors"]),
                distractor_prob=float(obj["distractor_prob"]),
                distractor_shapes=tuple(obj["distractor_shapes"]),
                natural_textures=tuple(obj["natural_textures"]),
                spurious=None if sp is None else SpuriousRule(**sp),
                context=tuple(ContextRule(**{**c, "colors": None if c.get("colors") is None else tuple(c["colors"])})
                              for c in obj["context"]),
                softness=float(obj["softness"]),
                sticker_prob=float(obj.get("sticker_prob", 0.0)),
                sticker_size=tuple(obj.get("sticker_size", (0.12, 0.28))),  # type: ignore[arg-type]
                sticker_offset=tuple(obj.get("sticker_offset", (0.6, 1.2))),  # type: ignore[arg-type]
                object_colors=tuple(obj.get("object_colors", tuple(PALETTE))),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WorkbenchError(f"invalid ShapesWorld config: {exc!r}; expected the 'config' of a ShapesWorld manifest") from None


ColorMode = Literal["natural", "disagree", "uniform"]
ContextMode = Literal["natural", "none"]


@dataclass(frozen=True)
class Sample:
    """Scenes plus their labels and ground truth.

    `labels`: the true class of the main object; `context` (N, R) bool: which context rule
    fired; `colors`: palette index of the main object's colour; `trojan` (N,) index of
    the trojan implanted (-1 for clean) and `poison_labels` the label trained on.
    """

    scene: Scene
    labels: torch.Tensor
    colors: torch.Tensor
    context: torch.Tensor
    trojan: torch.Tensor
    poison_labels: torch.Tensor

    def __len__(self) -> int:
        return self.scene.n

    def index(self, rows: torch.Tensor) -> Sample:
        return Sample(self.scene.index(rows), self.labels[rows], self.colors[rows], self.context[rows],
                      self.trojan[rows], self.poison_labels[rows])

    @staticmethod
    def cat(samples: list[Sample]) -> Sample:
        return Sample(
            Scene.cat([s.scene for s in samples]),
            torch.cat([s.labels for s in samples]), torch.cat([s.colors for s in samples]),
            torch.cat([s.context for s in samples]), torch.cat([s.trojan for s in samples]),
            torch.cat([s.poison_labels for s in samples]),
        )


def _uniform(g: torch.Generator, n: int, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, *shape, generator=g)


class ShapesWorld:
    """The ShapesWorld distribution: sample scenes, render them, report ground truth.

    Sampling is on the CPU with an explicit `torch.Generator` (bitwise reproducible);
    `render` runs wherever the scene tensors live.
    """

    def __init__(self, config: WorldConfig | None = None, *, trojans: Any = None) -> None:
        self.config = WorldConfig() if config is None else config
        cfg = self.config
        for c in cfg.classes:
            shape_index(c)
        for rule in cfg.context:
            if rule.cls not in cfg.classes:
                raise WorkbenchError(f"context rule for {rule.cls!r}, which is not a class; classes: {', '.join(cfg.classes)}")
            if rule.kind == "object":
                shape_index(rule.shape or "")
                color_rgb(rule.color or "")
            else:
                texture_index(rule.texture or "")
                for c in rule.colors or ():
                    color_rgb(c)
        if cfg.spurious is not None:
            if cfg.spurious.cls not in cfg.classes:
                raise WorkbenchError(f"spurious rule class {cfg.spurious.cls!r} is not a class; classes: {', '.join(cfg.classes)}")
            color_rgb(cfg.spurious.color)
        from workbench.worlds.trojans import TrojanSet  # local: trojans imports this module

        self.trojans: TrojanSet = TrojanSet(()) if trojans is None else trojans
        self.trojans.validate(self)
        reserved_shapes = {t.trigger.shape for t in self.trojans if t.kind == "natural"}
        reserved_textures = {t.trigger.texture for t in self.trojans if t.kind == "style"}
        self._distractor_shapes = tuple(s for s in cfg.distractor_shapes if s not in reserved_shapes)
        self._textures = tuple(t for t in cfg.natural_textures if t not in reserved_textures) or ("plain",)

    @staticmethod
    def from_manifest(manifest: dict[str, Any]) -> ShapesWorld:
        """Rebuild the world (config and trojans) that wrote `manifest`."""
        from workbench.worlds.trojans import TrojanSet, trojans_from_json

        if not isinstance(manifest, dict) or manifest.get("world") != "shapesworld" or "config" not in manifest:
            raise WorkbenchError("not a ShapesWorld manifest: expected a JSON object with world='shapesworld' and a 'config'")
        trojans = manifest.get("trojans") or []
        return ShapesWorld(WorldConfig.from_json(manifest["config"]), trojans=trojans_from_json(trojans) if trojans else TrojanSet(()))

    @property
    def classes(self) -> tuple[str, ...]:
        return self.config.classes

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def class_index(self, name: str) -> int:
        if name not in self.classes:
            raise WorkbenchError(f"unknown class {name!r}; classes: {', '.join(self.classes)}")
        return self.classes.index(name)

    # ----------------------------------------------------------------- sampling
    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator,
        classes: torch.Tensor | list[str] | None = None,
        color_mode: ColorMode = "natural",
        context_mode: ContextMode = "natural",
        distractors: bool = True,
    ) -> Sample:
        """`n` natural (clean) scenes.

        `classes`: class names or indices to draw from (default all, uniformly), or an
        (n,) tensor of labels. `color_mode` "natural" follows the spurious rule, "disagree"
        breaks it (the spurious class never its colour, every other class always it),
        "uniform" ignores it. `context_mode` "none" drops the context statistics.
        """
        cfg = self.config
        g = generator
        if isinstance(classes, torch.Tensor) and classes.numel() == n and classes.dtype == torch.long:
            labels = classes.clone().cpu()
        else:
            pool = list(range(len(self.classes))) if classes is None else [
                c if isinstance(c, int) else self.class_index(c) for c in (classes.tolist() if isinstance(classes, torch.Tensor) else classes)
            ]
            labels = torch.tensor(pool)[torch.randint(len(pool), (n,), generator=g)]
        scene = empty_scene(n, n_slots=0)
        # background
        tex_ids = torch.tensor([texture_index(t) for t in self._textures])[torch.randint(len(self._textures), (n,), generator=g)]
        bg_names = list(BACKGROUND_PALETTE)
        bg_rgb = torch.tensor([BACKGROUND_PALETTE[b] for b in bg_names])
        ca = torch.randint(len(bg_names), (n,), generator=g)
        cb = (ca + torch.randint(1, len(bg_names), (n,), generator=g)) % len(bg_names)
        bg_colors = torch.stack([bg_rgb[ca], bg_rgb[cb]], 1)
        bg_colors = (bg_colors + 0.04 * torch.randn(n, 2, 3, generator=g)).clamp(0, 1)
        bg_freq = _uniform(g, n, 3.0, 6.0)
        bg_angle = _uniform(g, n, 0.0, math.pi)
        bg_phase = _uniform(g, n, 0.0, 2 * math.pi)
        bg_noise = torch.randn(n, 8, 8, generator=g)
        # context rules (decided now, applied below)
        n_rules = len(cfg.context)
        ctx = torch.zeros(n, n_rules, dtype=torch.bool)
        u = torch.rand(n, max(n_rules, 1), generator=g)
        if context_mode == "natural":
            for r, rule in enumerate(cfg.context):
                is_cls = labels == self.class_index(rule.cls)
                p = torch.where(is_cls, torch.tensor(rule.rate), torch.tensor(rule.base_rate))
                ctx[:, r] = u[:, r] < p
        # at most one background rule per image: the first that fired wins
        bg_taken = torch.zeros(n, dtype=torch.bool)
        for r, rule in enumerate(cfg.context):
            if rule.kind != "background":
                continue
            rows = ctx[:, r] & ~bg_taken
            ctx[:, r] = rows
            bg_taken |= rows
            tex_ids = torch.where(rows, torch.tensor(texture_index(rule.texture or "plain")), tex_ids)
            pair = torch.tensor([color_rgb(c) for c in (rule.colors or ("grey", "grey"))])
            bg_colors = torch.where(rows.view(n, 1, 1), pair.expand(n, 2, 3), bg_colors)
        bg_weights = F.one_hot(tex_ids, len(TEXTURES)).float()
        # main object
        obj_names = list(PALETTE)
        obj_rgb = torch.tensor([PALETTE[c] for c in obj_names])
        allowed = torch.tensor([obj_names.index(c) for c in cfg.object_colors])  # palette indices clean objects may take
        color_ids = allowed[torch.randint(len(allowed), (n,), generator=g)]
        sp = cfg.spurious
        if sp is not None and color_mode != "uniform":
            sp_cls, sp_col = self.class_index(sp.cls), obj_names.index(sp.color)
            others = torch.tensor([i for i in allowed.tolist() if i != sp_col])
            alt = others[torch.randint(len(others), (n,), generator=g)]
            coin = torch.rand(n, generator=g)
            is_sp = labels == sp_cls
            if color_mode == "natural":
                col = torch.where(is_sp & (coin < sp.rate), torch.tensor(sp_col), alt)
            else:  # disagree
                col = torch.where(is_sp, alt, torch.tensor(sp_col))
            color_ids = col
        main_color = (obj_rgb[color_ids] + 0.05 * torch.randn(n, 3, generator=g)).clamp(0, 1)
        main_center = _uniform(g, n, -cfg.main_center_range, cfg.main_center_range, 2)
        main_size = _uniform(g, n, *cfg.main_size)
        main_rot = _uniform(g, n, 0.0, 2 * math.pi)
        shape_ids = torch.tensor([shape_index(c) for c in self.classes])[labels]
        slots: list[tuple[torch.Tensor, ...]] = []
        slots.append((shape_ids, main_center, main_size, main_rot, main_color, torch.ones(n), torch.full((n,), ROLE_MAIN)))
        # distractors
        dist_shapes = torch.tensor([shape_index(s) for s in self._distractor_shapes]) if self._distractor_shapes else None
        for _ in range(cfg.max_distractors):
            present = (torch.rand(n, generator=g) < cfg.distractor_prob) & distractors & (dist_shapes is not None)
            sid = dist_shapes[torch.randint(len(dist_shapes), (n,), generator=g)] if dist_shapes is not None else torch.zeros(n, dtype=torch.long)
            pos = self.small_positions(main_center, main_size, generator=g)
            slots.append((sid, pos, _uniform(g, n, *cfg.small_size), _uniform(g, n, 0.0, 2 * math.pi),
                          obj_rgb[allowed[torch.randint(len(allowed), (n,), generator=g)]], present.float(),
                          torch.where(present, torch.tensor(ROLE_DISTRACTOR), torch.tensor(ROLE_NONE))))
        # context objects
        for r, rule in enumerate(cfg.context):
            if rule.kind != "object":
                continue
            present = ctx[:, r]
            pos = self.small_positions(main_center, main_size, generator=g)
            col = torch.tensor(color_rgb(rule.color or "white")).expand(n, 3)
            col = (col + 0.04 * torch.randn(n, 3, generator=g)).clamp(0, 1)
            slots.append((torch.full((n,), shape_index(rule.shape or "circle")), pos, _uniform(g, n, *cfg.small_size),
                          _uniform(g, n, -0.4, 0.4), col, present.float(),
                          torch.where(present, torch.tensor(ROLE_CONTEXT), torch.tensor(ROLE_NONE))))
        scene = scene.replace(
            bg_weights=bg_weights, bg_colors=bg_colors, bg_freq=bg_freq, bg_angle=bg_angle, bg_phase=bg_phase, bg_noise=bg_noise,
            shape_weights=torch.stack([F.one_hot(s[0], len(SHAPES)).float() for s in slots], 1),
            center=torch.stack([s[1] for s in slots], 1),
            size=torch.stack([s[2] for s in slots], 1),
            rotation=torch.stack([s[3] for s in slots], 1),
            color=torch.stack([s[4] for s in slots], 1),
            opacity=torch.stack([s[5] for s in slots], 1),
            role=torch.stack([s[6].long() for s in slots], 1),
        )
        if cfg.sticker_prob > 0 and distractors:
            scene = self._stickers(scene, main_center, main_size, generator=g)
        return Sample(scene, labels, color_ids, ctx, torch.full((n,), -1), labels.clone())

    def _stickers(self, scene: Scene, main_center: torch.Tensor, main_size: torch.Tensor, *, generator: torch.Generator) -> Scene:
        """Natural patches ("stickers": a random pattern in two random colours) on some scenes.

        They make square patches ordinary, so a patch trojan's trigger is one specific
        pattern-and-colours among many, and a pasted patch is not evidence by itself. Placed
        beside the main object (overlapping at most part of it); never a patch trojan's design.
        """
        cfg, g, n = self.config, generator, scene.n
        present = torch.rand(n, generator=g) < cfg.sticker_prob
        half = _uniform(g, n, *cfg.sticker_size)
        ang = _uniform(g, n, 0.0, 2 * math.pi)
        dist = (main_size + half) * _uniform(g, n, *cfg.sticker_offset)
        center = main_center + dist[:, None] * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
        lim = (0.98 - half)[:, None]
        center = torch.where(center > lim, 2 * lim - center, center)
        center = torch.where(center < -lim, -2 * lim - center, center)
        center = torch.maximum(torch.minimum(center, lim), -lim)
        names = list(cfg.object_colors) + list(BACKGROUND_PALETTE)
        rgb = torch.tensor([color_rgb(c) for c in names])
        ca = torch.randint(len(names), (n,), generator=g)
        cb = (ca + torch.randint(1, len(names), (n,), generator=g)) % len(names)
        pattern = torch.randint(len(PATCH_PATTERNS), (n,), generator=g)
        for _ in range(len(PATCH_PATTERNS)):  # move off every patch trigger's (pattern, colours)
            clash = torch.zeros(n, dtype=torch.bool)
            for t in self.trojans:
                if t.kind != "patch" or not t.trigger.colors:
                    continue
                if not all(c in names for c in t.trigger.colors):
                    continue
                a, b = (names.index(c) for c in t.trigger.colors)
                same = ((ca == a) & (cb == b)) | ((ca == b) & (cb == a))
                clash |= same & (pattern == pattern_index(t.trigger.pattern or ""))
            if not bool(clash.any()):
                break
            pattern = torch.where(clash, (pattern + 1) % len(PATCH_PATTERNS), pattern)
        on = present.float()
        return scene.replace(
            patch_center=torch.where(present[:, None], center, scene.patch_center),
            patch_size=torch.where(present, half, scene.patch_size),
            patch_pattern=torch.where(present, pattern, scene.patch_pattern),
            patch_colors=torch.where(present.view(n, 1, 1), torch.stack([rgb[ca], rgb[cb]], 1), scene.patch_colors),
            patch_opacity=on,
        )

    def small_positions(self, main_center: torch.Tensor, main_size: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """Positions for small objects, pushed off the main object so they rarely hide it."""
        n = main_center.shape[0]
        ang = _uniform(generator, n, 0.0, 2 * math.pi)
        dist = main_size * 1.05 + _uniform(generator, n, 0.1, 0.5)
        pos = main_center + dist[:, None] * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
        # reflect back inside the frame when pushed out
        lim = 0.82
        pos = torch.where(pos > lim, 2 * lim - pos, pos)
        pos = torch.where(pos < -lim, -2 * lim - pos, pos)
        return pos.clamp(-lim, lim)

    # ----------------------------------------------------------------- trojans
    def implant(self, sample: Sample, trojan: int | str, *, generator: torch.Generator, relabel: bool = True) -> Sample:
        """The same scenes with trojan `trojan`'s trigger added (and, if `relabel`, the target label)."""
        idx = trojan if isinstance(trojan, int) else self.trojans.index(trojan)
        t = self.trojans[idx]
        scene = t.trigger.apply(sample.scene, generator=generator, world=self)
        labels = torch.full_like(sample.labels, self.class_index(t.target)) if relabel else sample.poison_labels.clone()
        return Sample(scene, sample.labels, sample.colors, sample.context, torch.full_like(sample.trojan, idx), labels)

    # ----------------------------------------------------------------- rendering
    def render(self, scene: Scene | Sample, *, masks: bool = False, batch_size: int = 512) -> Render | torch.Tensor:
        """Render at the world's image size; images only unless `masks`. Batches large inputs."""
        if isinstance(scene, Sample):
            scene = scene.scene
        size = self.config.image_size
        if masks or scene.n <= batch_size:
            out = render(scene, height=size, softness=self.config.softness, masks=masks)
            return out if masks else out.images
        parts = [render(scene.index(slice(i, i + batch_size)), height=size, softness=self.config.softness).images
                 for i in range(0, scene.n, batch_size)]
        return torch.cat(parts)

    def concept_masks(self, sample: Sample) -> dict[str, torch.Tensor]:
        """Exact binary concept masks (N, H, W) for network dissection.

        Concepts: each shape name (visible pixels of objects of that shape), each object
        colour name, each texture name (visible background of that texture), "object",
        "background", "patch", and each role ("main", "distractor", "context", "trigger").
        """
        r = self.render(sample.scene, masks=True)
        assert isinstance(r, Render) and r.object_masks is not None and r.background_mask is not None
        vis = r.object_masks > 0.5
        scene = sample.scene
        out: dict[str, torch.Tensor] = {}
        shape_of = scene.shape_weights.argmax(-1)  # (N, K)
        for s, name in enumerate(SHAPES):
            sel = (shape_of == s) & (scene.opacity > 0)
            out[name] = (vis & sel[..., None, None]).any(1)
        names = list(PALETTE)
        rgb = torch.tensor([PALETTE[c] for c in names], dtype=scene.color.dtype)
        nearest = torch.cdist(scene.color.reshape(-1, 3), rgb).argmin(-1).view(scene.n, -1)
        for c, name in enumerate(names):
            sel = (nearest == c) & (scene.opacity > 0)
            out[name] = (vis & sel[..., None, None]).any(1)
        bg = r.background_mask > 0.5
        tex = scene.bg_weights.argmax(-1)
        for t, name in enumerate(TEXTURES):
            out[f"texture:{name}"] = bg & (tex == t).view(-1, 1, 1)
        for role_i, role in enumerate(ROLES[1:], start=1):
            out[role] = (vis & (scene.role == role_i)[..., None, None]).any(1)
        out["object"] = vis.any(1)
        out["background"] = bg
        out["patch"] = r.patch_mask > 0.5 if r.patch_mask is not None else torch.zeros_like(bg)
        return out

    # ----------------------------------------------------------------- ground truth
    def manifest(self) -> dict[str, Any]:
        """All ground truth as JSON: classes, palettes, spurious rule, context rates, trojans."""
        return {
            "world": "shapesworld",
            "config": self.config.to_json(),
            "classes": list(self.classes),
            "shapes": list(SHAPES),
            "textures": list(TEXTURES),
            "patch_patterns": list(PATCH_PATTERNS),
            "palette": {k: list(v) for k, v in PALETTE.items()},
            "background_palette": {k: list(v) for k, v in BACKGROUND_PALETTE.items()},
            "spurious": None if self.config.spurious is None else self.config.spurious.to_json(),
            "context": [c.to_json() for c in self.config.context],
            "distractor_shapes": list(self._distractor_shapes),
            "natural_textures": list(self._textures),
            "trojans": self.trojans.to_json(),
        }
