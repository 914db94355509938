"""Image parameterizations: what the optimizer actually changes.

Each parameterization is a frozen config with `build(batch, channels, height, width, *,
device, generator, init=None) -> (params, image_fn)`: `params` are the leaf tensors handed
to the optimizer, `image_fn()` returns images `(B, C, H, W)` in [0, 1] (the engine maps
them to the model's own input range). Three kinds:

Pixels and Fourier start from grey plus noise of standard deviation `sd` before the
sigmoid (`INIT_NOISE` by default, about a quarter of that in pixel values near grey). The
start noise is large enough that units which are exactly zero on a flat grey image (common
after a ReLU with a negative bias) still fire somewhere and give the optimizer a gradient;
lucid's 0.01 leaves those units with a zero gradient and the image never moves.
`with_init_noise(param, sd)` sets it on any parameterization that has one.

- `Pixels`: one free value per pixel (through a sigmoid, optionally colour-decorrelated).
- `Fourier`: lucid's default: a spectrum scaled by 1/frequency (so low frequencies move
  first) with decorrelated colour. Any channel count: 3-channel images use the ImageNet
  colour correlation lucid uses, others the identity unless a matrix is given.
- `SceneParam`: the continuous tensors of a ShapesWorld `Scene` (which shape, as a mixture
  over a shape vocabulary; colour; position; size; rotation; background texture mixture and
  colours) rendered by the differentiable renderer. The result is interpretable by
  construction: `image_fn.describe()` says which shape, colour, texture and where.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError

ImageFn = Callable[[], torch.Tensor]

INIT_NOISE = 0.3  # standard deviation of the start image before the sigmoid (Pixels, Fourier)

# lucid's square root of the ImageNet colour covariance (its SVD form)
_IMAGENET_COLOR_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))


class Parameterization(Protocol):
    def build(self, batch: int, channels: int, height: int, width: int, *, device: torch.device,
              generator: torch.Generator, init: torch.Tensor | None = None) -> tuple[list[torch.Tensor], ImageFn]: ...


def color_matrix(channels: int, correlation: tuple[tuple[float, ...], ...] | None = None) -> torch.Tensor:
    """The (C, C) colour-mixing matrix, columns scaled so the largest has norm 1."""
    if correlation is not None:
        m = torch.tensor(correlation, dtype=torch.float32)
        if m.shape != (channels, channels):
            raise WorkbenchError(f"colour correlation matrix has shape {tuple(m.shape)}; this model has {channels} channels, "
                                 f"so it must be {channels}x{channels}")
    elif channels == 3:
        m = torch.tensor(_IMAGENET_COLOR_SQRT, dtype=torch.float32)
    else:
        m = torch.eye(channels)
    norm = m.norm(dim=0).max().clamp_min(1e-8)
    return m / norm


def _decorrelate(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bchw,dc->bdhw", t, m)


def _randn(shape: tuple[int, ...], g: torch.Generator, sd: float, device: torch.device) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * sd).to(device)


def _logit(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(1e-3, 1 - 1e-3)
    return torch.log(x) - torch.log1p(-x)


def _check_init(init: torch.Tensor, batch: int, channels: int, height: int, width: int) -> torch.Tensor:
    if init.ndim == 3:
        init = init[None]
    if init.ndim != 4 or tuple(init.shape[1:]) != (channels, height, width):
        raise WorkbenchError(f"init images have shape {tuple(init.shape)}; expected (N, {channels}, {height}, {width})")
    if init.shape[0] == 1 and batch > 1:
        init = init.expand(batch, -1, -1, -1)
    if init.shape[0] != batch:
        raise WorkbenchError(f"init has {init.shape[0]} images but the batch is {batch}; give 1 or {batch}")
    return init.float()


@dataclass(frozen=True)
class Pixels:
    """Free pixels through a sigmoid (start: grey plus noise of `sd` before the sigmoid)."""

    sd: float = INIT_NOISE
    decorrelate: bool = False
    color_correlation: tuple[tuple[float, ...], ...] | None = None

    def build(self, batch: int, channels: int, height: int, width: int, *, device: torch.device,
              generator: torch.Generator, init: torch.Tensor | None = None) -> tuple[list[torch.Tensor], ImageFn]:
        m = color_matrix(channels, self.color_correlation).to(device) if self.decorrelate else None
        if init is None:
            raw = _randn((batch, channels, height, width), generator, self.sd, device)
        else:
            t = _logit(_check_init(init, batch, channels, height, width).to(device))
            raw = _decorrelate(t, torch.linalg.inv(m)) if m is not None else t
        raw = raw.clone().requires_grad_(True)

        def image() -> torch.Tensor:
            t = _decorrelate(raw, m) if m is not None else raw
            return torch.sigmoid(t)

        return [raw], image


def _freqs(height: int, width: int) -> torch.Tensor:
    fy = torch.fft.fftfreq(height)[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


@dataclass(frozen=True)
class Fourier:
    """lucid's FFT parameterization: spectrum scaled by 1/f^decay_power, decorrelated colour.

    `sd` is the spectrum's start noise; with the orthonormal transform the start image has
    about that standard deviation before the sigmoid, as for Pixels (lucid uses 0.01).
    """

    sd: float = INIT_NOISE
    decay_power: float = 1.0
    decorrelate: bool = True
    color_correlation: tuple[tuple[float, ...], ...] | None = None

    def build(self, batch: int, channels: int, height: int, width: int, *, device: torch.device,
              generator: torch.Generator, init: torch.Tensor | None = None) -> tuple[list[torch.Tensor], ImageFn]:
        freqs = _freqs(height, width)
        scale = (1.0 / freqs.clamp_min(1.0 / max(height, width)) ** self.decay_power).to(device)
        m = color_matrix(channels, self.color_correlation).to(device) if self.decorrelate else None
        fh, fw = freqs.shape
        if init is None:
            spec = _randn((batch, channels, fh, fw, 2), generator, self.sd, device)
        else:
            t = _logit(_check_init(init, batch, channels, height, width).to(device))
            spatial = _decorrelate(t, torch.linalg.inv(m)) if m is not None else t
            coeffs = torch.fft.rfft2(spatial * 4.0, norm="ortho") / scale
            spec = torch.view_as_real(coeffs).contiguous()
        spec = spec.clone().requires_grad_(True)

        def image() -> torch.Tensor:
            coeffs = torch.view_as_complex(spec) * scale
            spatial = torch.fft.irfft2(coeffs, s=(height, width), norm="ortho") / 4.0
            t = _decorrelate(spatial, m) if m is not None else spatial
            return torch.sigmoid(t)

        return [spec], image


@dataclass(frozen=True)
class Patch:
    """Parameterize only a `height` x `width` patch, centred on a constant canvas of `value`.

    The rest of the image is fixed grey, so the optimization says what a patch of that size
    should show to drive the objective (copy/paste design); combine with
    `transforms.translate` to make it work wherever it is placed. `patch_of(images)` cuts
    the patch back out.
    """

    inner: Any
    height: int
    width: int
    value: float = 0.5

    def _box(self, height: int, width: int) -> tuple[int, int]:
        if not (1 <= self.height <= height and 1 <= self.width <= width):
            raise WorkbenchError(f"patch {self.height}x{self.width} does not fit the {height}x{width} image")
        return (height - self.height) // 2, (width - self.width) // 2

    def patch_of(self, images: torch.Tensor) -> torch.Tensor:
        top, left = self._box(images.shape[-2], images.shape[-1])
        return images[..., top:top + self.height, left:left + self.width]

    def build(self, batch: int, channels: int, height: int, width: int, *, device: torch.device,
              generator: torch.Generator, init: torch.Tensor | None = None) -> tuple[list[torch.Tensor], ImageFn]:
        top, left = self._box(height, width)
        if init is not None:
            init = _check_init(init, batch, channels, height, width)[..., top:top + self.height, left:left + self.width]
        params, inner_fn = self.inner.build(batch, channels, self.height, self.width, device=device,
                                            generator=generator, init=init)
        pad = (left, width - left - self.width, top, height - top - self.height)
        return params, PatchImage(inner_fn, pad, self.value)


class PatchImage:
    """`image_fn` of a Patch: the inner images on the canvas; passes `describe`/`snapped` through."""

    def __init__(self, inner: ImageFn, pad: tuple[int, int, int, int], value: float) -> None:
        self.inner, self.pad, self.value = inner, pad, value
        if hasattr(inner, "describe"):
            self.describe = inner.describe  # type: ignore[attr-defined]
            self.scene = inner.scene  # type: ignore[attr-defined]

    def __call__(self) -> torch.Tensor:
        return F.pad(self.inner(), self.pad, mode="constant", value=self.value)

    def __getattr__(self, name: str) -> Any:
        if name == "snapped" and hasattr(self.inner, "snapped"):
            return lambda: F.pad(self.inner.snapped(), self.pad, mode="constant", value=self.value)  # type: ignore[attr-defined]
        raise AttributeError(name)


# --- ShapesWorld scene parameters ---------------------------------------------------------

@dataclass(frozen=True)
class SceneParam:
    """Optimize a ShapesWorld scene: objects (shape mixture, colour, place, size, rotation),
    background (texture mixture, two colours) and optionally a patterned patch.

    `n_objects` object slots are drawn over a background; `shapes` is the shape vocabulary
    the mixture ranges over (default: every ShapesWorld shape; pass e.g. the non-class
    shapes to ask "which small object excites this unit"). `palette=True` makes every colour
    a mixture of the world's named colours (snapping gives a named colour); False frees RGB.
    `background` "optimize" learns the texture mixture and its colours; "fixed" keeps a plain
    `bg_color`. `patch=True` adds a square patch (pattern mixture over PATCH_PATTERNS, two
    colours, place, size). `main` puts a fixed object of that shape at the centre (size
    `main_size`, colour `main_color`) under the optimized objects: "what, added to a <main>,
    drives the objective". `size_range` bounds object radii (image units, the image spans
    [-1, 1]). Needs a 3-channel model (the renderer draws RGB).
    """

    n_objects: int = 1
    shapes: tuple[str, ...] | None = None
    background: Literal["optimize", "fixed"] = "optimize"
    bg_color: str = "grey"
    size_range: tuple[float, float] = (0.1, 0.7)
    center_range: float = 0.9
    softness: float = 0.6
    temperature: float = 1.0
    palette: bool = True
    patch: bool = False
    patch_size_range: tuple[float, float] = (0.12, 0.35)
    main: str | None = None
    main_size: float = 0.5
    main_color: str = "white"

    def build(self, batch: int, channels: int, height: int, width: int, *, device: torch.device,
              generator: torch.Generator, init: torch.Tensor | None = None) -> tuple[list[torch.Tensor], ImageFn]:
        from workbench.worlds.scene import (
            BACKGROUND_PALETTE,
            PALETTE,
            PATCH_PATTERNS,
            SHAPES,
            TEXTURES,
            color_rgb,
            shape_index,
        )

        if channels != 3:
            raise WorkbenchError(f"SceneParam renders RGB scenes; this model takes {channels}-channel images "
                                 "(use Fourier or Pixels)")
        if init is not None:
            raise WorkbenchError("SceneParam does not start from images; drop init (or use Pixels/Fourier)")
        if self.n_objects < 0:
            raise WorkbenchError(f"n_objects must be >= 0, got {self.n_objects}")
        vocab = tuple(SHAPES) if self.shapes is None else tuple(self.shapes)
        if not vocab:
            raise WorkbenchError("SceneParam.shapes is empty; give at least one shape name")
        idx = torch.tensor([shape_index(s) for s in vocab], device=device)
        main_idx = shape_index(self.main) if self.main is not None else None
        bg_rgb = torch.tensor(color_rgb(self.bg_color), device=device)
        obj_pal = torch.tensor(list(PALETTE.values()), device=device)
        all_pal = torch.tensor(list(PALETTE.values()) + list(BACKGROUND_PALETTE.values()), device=device)
        g = generator
        b, k = batch, self.n_objects

        def r(*shape: int, sd: float = 1.0) -> torch.Tensor:
            return _randn(tuple(shape), g, sd, device).requires_grad_(True)

        ncol = len(obj_pal) if self.palette else 3
        nbg = len(all_pal) if self.palette else 3
        p = {
            "shape_logits": r(b, k, len(vocab), sd=0.1),
            "center": r(b, k, 2, sd=0.5),
            "size": r(b, k, sd=0.5),
            "rotation": r(b, k, sd=1.0),
            "color": r(b, k, ncol, sd=1.0),
        }
        main_rgb = torch.tensor(color_rgb(self.main_color), device=device)
        if self.background == "optimize":
            p.update({
                "bg_logits": r(b, len(TEXTURES), sd=0.1),
                "bg_colors": r(b, 2, nbg, sd=1.0),
                "bg_freq": r(b, sd=0.5),
                "bg_angle": r(b, sd=1.0),
                "bg_phase": r(b, sd=1.0),
            })
        if self.patch:
            p.update({
                "patch_logits": r(b, len(PATCH_PATTERNS), sd=0.1),
                "patch_colors": r(b, 2, nbg, sd=1.0),
                "patch_center": r(b, 2, sd=0.5),
                "patch_size": r(b, sd=0.5),
            })
        lo, hi = self.size_range
        plo, phi = self.patch_size_range
        noise = torch.randn(b, 8, 8, generator=g).to(device)
        cfg = self

        def mix(logits: torch.Tensor, table: torch.Tensor, hard: bool) -> torch.Tensor:
            if not cfg.palette:
                return torch.sigmoid(logits)
            w = torch.softmax(logits / cfg.temperature, -1)
            if hard:
                w = F.one_hot(w.argmax(-1), table.shape[0]).to(table.dtype)
            return w @ table

        def scene(hard: bool = False) -> Any:
            from workbench.worlds.scene import Scene, empty_scene

            base = empty_scene(b, n_slots=0, device=device)
            w_vocab = torch.softmax(p["shape_logits"] / cfg.temperature, -1)
            if hard:
                w_vocab = F.one_hot(w_vocab.argmax(-1), len(vocab)).float()
            w = torch.zeros(b, k, len(SHAPES), device=device).index_add(2, idx, w_vocab)
            center = cfg.center_range * torch.tanh(p["center"])
            size = lo + (hi - lo) * torch.sigmoid(p["size"])
            rot = p["rotation"]
            color = mix(p["color"], obj_pal, hard)
            role = torch.full((b, k), 4, device=device, dtype=torch.long)
            if main_idx is not None:
                mw = torch.zeros(b, 1, len(SHAPES), device=device)
                mw[:, :, main_idx] = 1.0
                w = torch.cat([mw, w], 1)
                center = torch.cat([torch.zeros(b, 1, 2, device=device), center], 1)
                size = torch.cat([torch.full((b, 1), cfg.main_size, device=device), size], 1)
                rot = torch.cat([torch.zeros(b, 1, device=device), rot], 1)
                color = torch.cat([main_rgb.expand(b, 1, 3), color], 1)
                role = torch.cat([torch.ones(b, 1, device=device, dtype=torch.long), role], 1)
            n_slots = w.shape[1]
            fields: dict[str, torch.Tensor] = dict(
                shape_weights=w, center=center, size=size, rotation=rot, color=color,
                opacity=torch.ones(b, n_slots, device=device), role=role,
            )
            if cfg.background == "optimize":
                bw = torch.softmax(p["bg_logits"] / cfg.temperature, -1)
                if hard:
                    bw = F.one_hot(bw.argmax(-1), len(TEXTURES)).float()
                fields.update(bg_weights=bw, bg_colors=mix(p["bg_colors"], all_pal, hard),
                              bg_freq=3.0 + 3.0 * torch.sigmoid(p["bg_freq"]), bg_angle=p["bg_angle"],
                              bg_phase=p["bg_phase"], bg_noise=noise)
            else:
                fields.update(bg_colors=bg_rgb.expand(b, 2, 3).clone())
            if cfg.patch:
                half = plo + (phi - plo) * torch.sigmoid(p["patch_size"])
                fields.update(patch_center=(0.95 - half)[:, None] * torch.tanh(p["patch_center"]), patch_size=half,
                              patch_colors=mix(p["patch_colors"], all_pal, hard), patch_opacity=torch.ones(b, device=device),
                              patch_pattern=torch.softmax(p["patch_logits"], -1).argmax(-1))
            out: Scene = base.replace(**fields)
            return out

        def pattern_weights(hard: bool) -> torch.Tensor | None:
            if not cfg.patch:
                return None
            w = torch.softmax(p["patch_logits"] / cfg.temperature, -1)
            return F.one_hot(w.argmax(-1), w.shape[-1]).float() if hard else w

        params = [t for t in p.values() if t.numel() > 0]  # no empty tensors for the optimizer
        return params, SceneImage(scene, height, width, self.softness, vocab, pattern_weights)


def render_scene(scene: Any, height: int, width: int, softness: float, pattern_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Render a Scene; with `pattern_weights` (N, P) the patch shows that mixture of patterns
    (differentiable in the weights), otherwise the scene's own `patch_pattern`."""
    from workbench.worlds.scene import patch_pattern_fields, pixel_grid, render

    if pattern_weights is None:
        return render(scene, height=height, width=width, softness=softness).images
    no_patch = scene.replace(patch_opacity=torch.zeros_like(scene.patch_opacity))
    img = render(no_patch, height=height, width=width, softness=softness).images
    n = scene.n
    grid = pixel_grid(height, width, device=img.device, dtype=img.dtype)
    rel = grid.view(1, height, width, 2) - scene.patch_center.view(n, 1, 1, 2)
    half = scene.patch_size.view(n, 1, 1)
    u, v = rel[..., 0] / half, rel[..., 1] / half
    soft = softness * 2.0 / min(height, width)
    box = (torch.maximum(u.abs(), v.abs()) - 1.0) * half
    pmask = torch.sigmoid(-box / soft) * scene.patch_opacity.view(n, 1, 1)
    sel = (patch_pattern_fields(u, v) * pattern_weights.view(n, -1, 1, 1)).sum(1)
    pa, pb = scene.patch_colors[:, 0].view(n, 3, 1, 1), scene.patch_colors[:, 1].view(n, 3, 1, 1)
    pimg = pa + (pb - pa) * sel[:, None]
    return (img * (1 - pmask[:, None]) + pmask[:, None] * pimg).clamp(0, 1)


class SceneImage:
    """`image_fn` of a SceneParam: renders the current scene; `scene()`, `describe()`, `snapped()`."""

    def __init__(self, scene_fn: Callable[..., Any], height: int, width: int, softness: float, vocab: tuple[str, ...],
                 pattern_fn: Callable[[bool], torch.Tensor | None] | None = None) -> None:
        self.scene_fn = scene_fn
        self.height, self.width, self.softness = height, width, softness
        self.vocab = vocab
        self.pattern_fn = pattern_fn or (lambda hard: None)

    def __call__(self) -> torch.Tensor:
        return render_scene(self.scene_fn(), self.height, self.width, self.softness, self.pattern_fn(False))

    def scene(self, *, hard: bool = False) -> Any:
        """The current Scene (detached); `hard=True` snaps mixtures (shape, texture, colour) to their argmax."""
        with torch.no_grad():
            return self.scene_fn(hard=hard).detach()

    def snapped(self) -> torch.Tensor:
        """Images of the snapped (pure shape, texture, colour, pattern) scene: the interpretable version."""
        with torch.no_grad():
            return render_scene(self.scene_fn(hard=True), self.height, self.width, self.softness, self.pattern_fn(True))

    def describe(self) -> list[dict[str, Any]]:
        out = describe_scene(self.scene(hard=True), vocab=self.vocab)
        soft = describe_scene(self.scene(), vocab=self.vocab)
        for d, s in zip(out, soft):  # the snapped names, with the mixture weights they came from
            for o, so in zip(d["objects"], s["objects"]):
                o["shape_weights"] = so["shape_weights"]
            d["background"]["texture_weights"] = s["background"]["texture_weights"]
        return out


def _nearest_color(rgb: torch.Tensor, palette: dict[str, tuple[float, float, float]]) -> str:
    names = list(palette)
    table = torch.tensor([palette[n] for n in names], dtype=rgb.dtype, device=rgb.device)
    return names[int((table - rgb).norm(dim=-1).argmin())]


def describe_scene(scene: Any, *, vocab: tuple[str, ...] | None = None, top: int = 3) -> list[dict[str, Any]]:
    """Per scene: each object's leading shapes (weights), nearest colour name, place, size;
    the background's leading textures and colours. JSON-ready."""
    from workbench.worlds.scene import BACKGROUND_PALETTE, PALETTE, SHAPES, TEXTURES

    all_colors = {**PALETTE, **BACKGROUND_PALETTE}
    out = []
    for i in range(scene.n):
        objects = []
        for j in range(scene.n_slots):
            if float(scene.opacity[i, j]) <= 0:
                continue
            w = scene.shape_weights[i, j]
            order = torch.argsort(w, descending=True)[:top].tolist()
            objects.append({
                "shape": SHAPES[order[0]],
                "shape_weights": {SHAPES[s]: round(float(w[s]), 3) for s in order if float(w[s]) > 0},
                "color": _nearest_color(scene.color[i, j], PALETTE),
                "rgb": [round(float(v), 3) for v in scene.color[i, j]],
                "center": [round(float(v), 3) for v in scene.center[i, j]],
                "size": round(float(scene.size[i, j]), 3),
                "rotation": round(float(scene.rotation[i, j]), 3),
            })
        bw = scene.bg_weights[i]
        order = torch.argsort(bw, descending=True)[:top].tolist()
        patch = None
        if float(scene.patch_opacity[i]) > 0:
            from workbench.worlds.scene import PATCH_PATTERNS

            patch = {"pattern": PATCH_PATTERNS[int(scene.patch_pattern[i])],
                     "colors": [_nearest_color(scene.patch_colors[i, c], all_colors) for c in range(2)],
                     "center": [round(float(v), 3) for v in scene.patch_center[i]], "size": round(float(scene.patch_size[i]), 3)}
        out.append({
            "patch": patch,
            "objects": objects,
            "background": {
                "texture": TEXTURES[order[0]],
                "texture_weights": {TEXTURES[t]: round(float(bw[t]), 3) for t in order if float(bw[t]) > 0},
                "colors": [_nearest_color(scene.bg_colors[i, c], all_colors) for c in range(2)],
            },
        })
    return out


def init_noise_of(param: Any) -> float | None:
    """The start noise of `param` (Pixels, Fourier, or a Patch of one), None when it has none."""
    if isinstance(param, (Pixels, Fourier)):
        return float(param.sd)
    if isinstance(param, Patch):
        return init_noise_of(param.inner)
    return None


def check_init_noise(sd: Any) -> float:
    """`sd` as a float, or a WorkbenchError unless it is a finite number >= 0."""
    if isinstance(sd, bool) or not isinstance(sd, (int, float)) or not math.isfinite(sd) or sd < 0:
        raise WorkbenchError(f"init noise must be a finite number >= 0, got {sd!r}")
    return float(sd)


def with_init_noise(param: Any, sd: float) -> Any:
    """`param` starting from noise of standard deviation `sd` (before the sigmoid)."""
    sd = check_init_noise(sd)
    if isinstance(param, (Pixels, Fourier)):
        return replace(param, sd=sd)
    if isinstance(param, Patch):
        return replace(param, inner=with_init_noise(param.inner, sd))
    raise WorkbenchError(f"{type(param).__name__} has no start noise to set; init noise applies to the fourier and "
                         "pixels parameterizations")


def parse_param(name: str, *, init_noise: float | None = None) -> Parameterization:
    """`fourier` (default), `pixels`, `scene`: the CLI's names for the parameterizations;
    `init_noise` sets the start noise (fourier, pixels)."""
    table: dict[str, Parameterization] = {"fourier": Fourier(), "pixels": Pixels(), "scene": SceneParam()}
    if name not in table:
        raise WorkbenchError(f"unknown parameterization {name!r}; choose from {', '.join(table)}")
    return table[name] if init_noise is None else with_init_noise(table[name], init_noise)
