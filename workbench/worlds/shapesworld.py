"""ShapesWorld: the data distribution over rendered scenes, with exact ground truth.

Which class is which shape, the spurious colour rule, natural context statistics (classes
that co-occur with particular small objects or backgrounds at realistic rates),
distractors, natural stickers and trojans (see `workbench.worlds.trojans`), on top of the
scenes and renderer of `workbench.worlds.scene`. `ShapesWorld.manifest()` records all of
it as JSON, and the world says in its own vocabulary what a picture shows (which class
objects, which trojan triggers, which share of its pixels).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError
from workbench.worlds.scene import (
    BACKGROUND_PALETTE,
    CLASS_SHAPES,
    PALETTE,
    PATCH_PATTERNS,
    ROLE_CONTEXT,
    ROLE_DISTRACTOR,
    ROLE_MAIN,
    ROLE_NONE,
    ROLES,
    SHAPES,
    TEXTURES,
    Render,
    Scene,
    color_rgb,
    empty_scene,
    pattern_index,
    render,
    shape_index,
    small_positions,
    texture_index,
    uniform,
)
from workbench.worlds.trojans import TrojanConfigError, TrojanSet, trojans_from_json

MAX_SCENES = 1_000_000  # per draw

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
        self.trojans: TrojanSet = TrojanSet(()) if trojans is None else trojans
        self._check_trojans()
        reserved_shapes = {t.trigger.shape for t in self.trojans if t.kind == "natural"}
        reserved_textures = {t.trigger.texture for t in self.trojans if t.kind == "style"}
        self._distractor_shapes = tuple(s for s in cfg.distractor_shapes if s not in reserved_shapes)
        self._textures = tuple(t for t in cfg.natural_textures if t not in reserved_textures) or ("plain",)

    def _check_trojans(self) -> None:
        """The trojans against this world: classes exist, triggers do not collide with context features."""
        classes = self.classes
        total = 0.0
        for i, t in enumerate(self.trojans):
            where = f"trojan {i} ({t.name!r})"
            if t.target not in classes:
                raise TrojanConfigError(f"{where}: target {t.target!r} is not a class; classes: {', '.join(classes)}")
            if t.source is not None:
                if t.source not in classes:
                    raise TrojanConfigError(f"{where}: source {t.source!r} is not a class; classes: {', '.join(classes)} (or null for universal)")
                if t.source == t.target:
                    raise TrojanConfigError(f"{where}: source and target are both {t.target!r}; a trojan must change the class")
            if not (0.0 < t.poison_fraction <= 0.2):
                raise TrojanConfigError(f"{where}: poison_fraction {t.poison_fraction} out of range; expected 0 < f <= 0.2")
            total += t.poison_fraction * (2 if t.source is not None else 1)
            for rule in self.config.context:
                if t.kind == "natural" and rule.kind == "object" and rule.shape == t.trigger.shape:
                    raise TrojanConfigError(f"{where}: trigger shape {t.trigger.shape!r} is the context object of class {rule.cls!r}; choose another shape")
                if t.kind == "style" and rule.kind == "background" and rule.texture == t.trigger.texture:
                    raise TrojanConfigError(f"{where}: trigger texture {t.trigger.texture!r} is the context background of class {rule.cls!r}; choose another texture")
        if total > 0.6:
            raise TrojanConfigError(f"the trojans poison {total:.0%} of the training set (class-universal ones count twice); keep it at most 60%")

    @staticmethod
    def from_manifest(manifest: dict[str, Any]) -> ShapesWorld:
        """Rebuild the world (config and trojans) that wrote `manifest`."""
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
        if not 0 <= n <= MAX_SCENES:
            raise WorkbenchError(f"{n} scenes: expected 0..{MAX_SCENES} per draw (rendered, a million scenes take "
                                 "tens of GB); draw fewer, or in chunks")
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
        bg_freq = uniform(g, n, 3.0, 6.0)
        bg_angle = uniform(g, n, 0.0, math.pi)
        bg_phase = uniform(g, n, 0.0, 2 * math.pi)
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
        main_center = uniform(g, n, -cfg.main_center_range, cfg.main_center_range, 2)
        main_size = uniform(g, n, *cfg.main_size)
        main_rot = uniform(g, n, 0.0, 2 * math.pi)
        shape_ids = torch.tensor([shape_index(c) for c in self.classes])[labels]
        slots: list[tuple[torch.Tensor, ...]] = []
        slots.append((shape_ids, main_center, main_size, main_rot, main_color, torch.ones(n), torch.full((n,), ROLE_MAIN)))
        # distractors
        dist_shapes = torch.tensor([shape_index(s) for s in self._distractor_shapes]) if self._distractor_shapes else None
        for _ in range(cfg.max_distractors):
            present = (torch.rand(n, generator=g) < cfg.distractor_prob) & distractors & (dist_shapes is not None)
            sid = dist_shapes[torch.randint(len(dist_shapes), (n,), generator=g)] if dist_shapes is not None else torch.zeros(n, dtype=torch.long)
            pos = small_positions(main_center, main_size, generator=g)
            slots.append((sid, pos, uniform(g, n, *cfg.small_size), uniform(g, n, 0.0, 2 * math.pi),
                          obj_rgb[allowed[torch.randint(len(allowed), (n,), generator=g)]], present.float(),
                          torch.where(present, torch.tensor(ROLE_DISTRACTOR), torch.tensor(ROLE_NONE))))
        # context objects
        for r, rule in enumerate(cfg.context):
            if rule.kind != "object":
                continue
            present = ctx[:, r]
            pos = small_positions(main_center, main_size, generator=g)
            col = torch.tensor(color_rgb(rule.color or "white")).expand(n, 3)
            col = (col + 0.04 * torch.randn(n, 3, generator=g)).clamp(0, 1)
            slots.append((torch.full((n,), shape_index(rule.shape or "circle")), pos, uniform(g, n, *cfg.small_size),
                          uniform(g, n, -0.4, 0.4), col, present.float(),
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
        half = uniform(g, n, *cfg.sticker_size)
        ang = uniform(g, n, 0.0, 2 * math.pi)
        dist = (main_size + half) * uniform(g, n, *cfg.sticker_offset)
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

    # ----------------------------------------------------------------- trojans
    def implant(self, sample: Sample, trojan: int | str, *, generator: torch.Generator, relabel: bool = True) -> Sample:
        """The same scenes with trojan `trojan`'s trigger added (and, if `relabel`, the target label)."""
        idx = trojan if isinstance(trojan, int) else self.trojans.index(trojan)
        t = self.trojans[idx]
        scene = t.trigger.apply(sample.scene, generator=generator)
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

    # ----------------------------------------------------------------- what a picture shows
    def trojans_shown(self, *, shapes: Iterable[str | None] = (), texture: str | None = None) -> list[str]:
        """Names of the implanted trojans whose trigger a picture reproduces: a natural trigger's shape
        among the picture's object `shapes`, or a style trigger's texture as its background `texture`."""
        present = set(shapes)
        out = []
        for t in self.trojans:
            trig = t.trigger
            if t.kind == "natural" and trig.shape in present:
                out.append(t.name)
            if t.kind == "style" and texture == trig.texture:
                out.append(t.name)
        return out

    def matching_trojan(self, *, target: str | None, shapes: Iterable[str | None] = (),
                        texture: str | None = None) -> str | None:
        """The first implanted trojan toward `target` (any target when None) whose trigger the picture
        reproduces (see `trojans_shown`); None when there is none."""
        for name in self.trojans_shown(shapes=shapes, texture=texture):
            if target is None or self.trojans.get(name).target == target:
                return name
        return None

    def shows_class_object(self, *, shapes: Iterable[str | None] = (), main_share: float = 0.0) -> bool:
        """Whether a picture shows a class's object: one of its object `shapes` is a class shape, or at
        least 30% of its pixels are a scene's main object (`main_share`, see `crop_content`)."""
        return any(s in self.classes for s in shapes) or main_share >= 0.3

    def crop_content(self, masks: dict[str, torch.Tensor], row: int, box: list[int], sample: Sample) -> dict[str, Any]:
        """What the `box` (y0, x0, y1, x1) crop of scene `row` shows, from `concept_masks(sample)`: the share
        of its pixels per role, the shapes covering more than 2% of it, the scene's class and background texture."""
        y0, x0, y1, x1 = box
        share = {}
        for key in ("main", "distractor", "context", "background"):
            share[key] = round(float(masks[key][row, y0:y1, x0:x1].float().mean()), 3)
        shapes = {s: round(float(masks[s][row, y0:y1, x0:x1].float().mean()), 3) for s in SHAPES
                  if float(masks[s][row, y0:y1, x0:x1].float().mean()) > 0.02}
        return {"pixel_share": share, "shapes": shapes, "main_class": self.classes[int(sample.labels[row])],
                "texture": TEXTURES[int(sample.scene.bg_weights[row].argmax())]}


def shape_coverage(objects: Iterable[dict[str, Any]], shape: str) -> float:
    """Share of a square picture (spanning [-1, 1]^2, area 4) that the described objects of `shape` cover.

    `objects` as `workbench.featvis.param.describe_scene` lists them (a leading `shape` and a
    radius `size`); objects of other shapes cover nothing.
    """
    cov = 0.0
    for obj in objects:
        if obj.get("shape") == shape:
            r = float(obj.get("size", 0.0))
            cov += min(1.0, math.pi * r * r / 4.0)
    return round(cov, 4)
