"""Feature-level adversaries: optimize an added *object*, not pixels, so the attack explains itself.

The adversary is one small object (a mixture of ShapesWorld shapes with a colour, an
optional texture, a position, size and rotation) drawn by the differentiable renderer and
composited onto the images; gradients flow from the classifier's loss to those few scene
parameters (Casper et al.'s "feature-level" adversaries, with the renderer as generator).
At the end the object is discretized into words -- the argmax shape, the nearest palette
colour, the texture, a named position and size -- and *that described object* is
re-rendered and measured, so "a small green ring in the top-left corner turns squares into
stars" is a claim with its own success rate, not a caption on a pixel soup.

    fl = FeatureLevel(steps=150).generate(handle, images_or_sample, target="star")
    fl.extra["description"], fl.extra["success_continuous"], fl.extra["control_random_object"]
    spec = ObjectSpec.from_json(fl.extra["object"]); apply_object(handle, other_images, spec)

Works on any image classifier: the object is rendered at the model's own size and channel
count and mapped into its declared input range. On ShapesNet the target class's own shape
is excluded by default (an adversary that draws a small star to get "star" shows nothing),
and an object that matches an implanted natural trojan trigger is flagged in
`extra["matches_trojan"]`. `fooling_rates` runs the protocol of case study 8 over seeds:
the described object on held-out images vs a random object of the same size vs no object.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from adversaries.base import AdversarialExamples
from adversaries.registry import register
from workbench.classifier import (
    class_name,
    diverged_record,
    from_unit,
    frozen,
    logits,
    num_classes,
    predict,
    preprocess_of,
    render_for,
    resolve_class,
    resolve_targets,
    split_inputs,
    world_or_default,
)
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.progress import progress_bar
from workbench.worlds.scene import (
    CLASS_SHAPES,
    PALETTE,
    ROLE_MAIN,
    SHAPES,
    TEXTURES,
    color_rgb,
    empty_scene,
    pixel_grid,
    render,
    shape_index,
    texture_fields,
    texture_index,
)
from workbench.worlds.shapesworld import Sample

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# The object, in words and in parameters
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """A discrete, describable object: what the words say, rendered exactly.

    `center` (x, y) in [-1, 1] image coordinates (x right, y down); `size` the radius in
    the same units; `texture`: a TEXTURES name filled between `color` and `color2`
    ("plain": flat `color`).
    """

    shape: str
    color: str
    center: tuple[float, float]
    size: float
    rotation: float = 0.0
    texture: str = "plain"
    color2: str | None = None

    def describe(self) -> str:
        size = "small" if self.size < 0.2 else ("medium-sized" if self.size < 0.35 else "large")
        fill = ""
        if self.texture != "plain" and self.color2 is not None:
            fill = f" with {self.color2} {self.texture}"
        return f"a {size} {self.color} {self.shape}{fill} {position_words(*self.center)}"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["center"] = list(self.center)
        return d

    @staticmethod
    def from_json(obj: dict[str, Any]) -> ObjectSpec:
        try:
            spec = ObjectSpec(shape=str(obj["shape"]), color=str(obj["color"]),
                              center=(float(obj["center"][0]), float(obj["center"][1])), size=float(obj["size"]),
                              rotation=float(obj.get("rotation", 0.0)), texture=str(obj.get("texture", "plain")),
                              color2=obj.get("color2"))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise WorkbenchError(f"invalid object spec {obj!r} ({exc!r}); expected shape, color, center [x, y], size") from None
        shape_index(spec.shape)
        color_rgb(spec.color)
        texture_index(spec.texture)
        return spec


def position_words(x: float, y: float) -> str:
    """'in the top-left corner', 'at the top', 'in the centre', ... for image coordinates."""
    v = "top" if y < -0.33 else ("bottom" if y > 0.33 else "")
    h = "left" if x < -0.33 else ("right" if x > 0.33 else "")
    if v and h:
        return f"in the {v}-{h} corner"
    if v or h:
        return f"at the {v or h}"
    return "in the centre"


def nearest_color(rgb: torch.Tensor) -> str:
    names = list(PALETTE)
    table = torch.tensor([PALETTE[c] for c in names], dtype=torch.float32)
    return names[int((table - rgb.detach().float().cpu().view(1, 3)).norm(dim=1).argmin())]


def _scene(n: int, *, shape_w: torch.Tensor, center: torch.Tensor, size: torch.Tensor, rotation: torch.Tensor,
           color: torch.Tensor) -> Any:
    """`n` empty scenes holding one object (parameters broadcast over n)."""
    dev, dt = center.device, center.dtype
    return empty_scene(n, device=dev, dtype=dt).add_object(
        shape=shape_w, center=center.expand(n, 2), size=size.expand(n), color=color.expand(n, 3),
        rotation=rotation.expand(n), opacity=1.0)


def object_layer(height: int, width: int, *, shape_w: torch.Tensor, center: torch.Tensor, size: torch.Tensor,
                 rotation: torch.Tensor, color: torch.Tensor, tex_w: torch.Tensor | None = None,
                 color2: torch.Tensor | None = None, softness: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """The object's RGB fill `(n, 3, H, W)` in [0, 1] and its coverage `(n, 1, H, W)`, differentiably.

    Parameters are batched over a leading axis n (centre `(n, 2)`, size `(n,)`, ...).
    """
    n = center.shape[0]
    scene = _scene(n, shape_w=shape_w, center=center, size=size, rotation=rotation, color=color)
    r = render(scene, height=height, width=width, softness=softness, masks=True)
    assert r.coverage is not None
    alpha = r.coverage[:, -1:]
    fill = color.view(-1, 3, 1, 1).expand(n, 3, height, width)
    if tex_w is not None and color2 is not None:
        grid = pixel_grid(height, width, device=center.device, dtype=center.dtype)
        tex_scene = scene.replace(bg_freq=(2.0 / size.clamp_min(0.05)).expand(n), bg_angle=rotation.expand(n),
                                  bg_noise=torch.zeros(n, 8, 8, device=center.device, dtype=center.dtype))
        fields_ = texture_fields(tex_scene, grid)  # (n, T, H, W)
        level = (fields_ * tex_w.view(-1, len(TEXTURES), 1, 1)).sum(1, keepdim=True)
        fill = fill + (color2.view(-1, 3, 1, 1) - fill) * level
    return fill, alpha


def spec_layer(spec: ObjectSpec, height: int, width: int, *, n: int = 1, softness: float = 0.6,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """`object_layer` for a discrete ObjectSpec."""
    dev = torch.device(device)
    w = F.one_hot(torch.tensor(shape_index(spec.shape)), len(SHAPES)).float().to(dev)
    tex = None
    col2 = None
    if spec.texture != "plain" and spec.color2 is not None:
        tex = F.one_hot(torch.tensor(texture_index(spec.texture)), len(TEXTURES)).float().to(dev).expand(n, -1)
        col2 = torch.tensor(color_rgb(spec.color2), device=dev).expand(n, 3)
    return object_layer(
        height, width, shape_w=w, center=torch.tensor(spec.center, device=dev).expand(n, 2),
        size=torch.tensor(spec.size, device=dev).expand(n), rotation=torch.tensor(spec.rotation, device=dev).expand(n),
        color=torch.tensor(color_rgb(spec.color), device=dev).expand(n, 3), tex_w=tex, color2=col2, softness=softness)


def composite(handle: ModelHandle, images: torch.Tensor, fill: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Paint the object over images already in the model's range (fill mapped to its channels and range)."""
    pre = preprocess_of(handle)
    return images * (1 - alpha) + from_unit(pre, fill) * alpha


def apply_object(handle: ModelHandle, images: torch.Tensor, spec: ObjectSpec, *, softness: float | None = None) -> torch.Tensor:
    """Images with the described object drawn on top (what the explanation claims)."""
    pre = preprocess_of(handle)
    soft = _softness(handle) if softness is None else softness
    fill, alpha = spec_layer(spec, pre.height, pre.width, softness=soft, device=images.device)
    return composite(handle, images, fill, alpha)


def _softness(handle: ModelHandle) -> float:
    return float(world_or_default(handle).config.softness)


# --------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------


def _as_images(handle: ModelHandle, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None, Sample | None]:
    """Images, labels and (when given scenes) the ShapesWorld Sample they were rendered from."""
    if isinstance(inputs, Sample):
        k = num_classes(handle)
        if len(inputs) and int(inputs.labels.max()) >= k:
            raise WorkbenchError(f"scene labels reach {int(inputs.labels.max())}; this model has classes 0..{k - 1}")
        images = render_for(handle, inputs, softness=_softness(handle))
        return images, inputs.labels.clone(), inputs
    images, labels = split_inputs(handle, inputs)
    return images, labels, None


@register("feature-level")
@dataclass(frozen=True)
class FeatureLevel:
    """Optimize one added object's scene parameters through the differentiable renderer.

    `shapes`: the shapes the object may mix (default: every shape except the target
    class's own when the model has a ShapesWorld, see `exclude_target_shape`).
    `size_range`: radius bounds (image spans [-1, 1]). `texture`: also learn a texture and
    a second colour. The shape mixture is a softmax whose temperature falls from 1 to
    `final_temperature`. Each step draws `eot` jittered copies of the object
    (`position_jitter`, +-10% size) so the described object survives re-rendering.
    With ShapesWorld scenes as inputs, `occlusion_penalty` times the share of the main
    object the added object covers is added to the loss: the adversary should add a
    feature, not hide the object (the share is reported as `mean_occlusion_of_main`).
    """

    steps: int = 150
    lr: float = 0.08
    size_range: tuple[float, float] = (0.12, 0.3)
    texture: bool = True
    shapes: tuple[str, ...] | None = None
    exclude_target_shape: bool = True
    final_temperature: float = 0.1
    eot: int = 4
    position_jitter: float = 0.05
    restarts: int = 3
    occlusion_penalty: float = 2.0
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.size_range
        if not 0 < lo <= hi <= 1:
            raise WorkbenchError(f"size_range {self.size_range}: expected 0 < min <= max <= 1 (radius; image spans -1..1)")
        if self.steps < 1 or self.eot < 1 or self.restarts < 1:
            raise WorkbenchError("steps, eot and restarts must be >= 1")
        for s in self.shapes or ():
            shape_index(s)

    def allowed_shapes(self, handle: ModelHandle, target: int | None) -> list[str]:
        shapes = list(self.shapes) if self.shapes else list(SHAPES)
        if self.exclude_target_shape and target is not None:
            name = class_name(handle, target)
            if name in CLASS_SHAPES and handle.info.get("world") is not None:
                shapes = [s for s in shapes if s != name]
        if not shapes:
            raise WorkbenchError("no shapes left to optimize over; widen `shapes` or set exclude_target_shape=False")
        return shapes

    def generate(self, handle: ModelHandle, inputs: Any, target: Any = None, *,
                 progress: bool = False) -> AdversarialExamples:
        """Fit one object on `inputs` (images, (images, labels) or ShapesWorld scenes) toward `target`
        (untargeted when None); `progress` shows each restart's optimization steps."""
        preprocess_of(handle)  # refuses a model without image preprocessing before any work
        images, labels, sample = _as_images(handle, inputs)
        n = images.shape[0]
        targets = resolve_targets(handle, target, n)
        if targets is not None and not bool((targets == targets[0]).all()):
            raise WorkbenchError("feature-level adversaries are universal: give one target class for all inputs")
        tgt = None if targets is None else int(targets[0])
        clean_pred, clean_prob = predict(handle, images)
        ref = targets if targets is not None else (labels if labels is not None else clean_pred)
        shapes = self.allowed_shapes(handle, tgt)
        soft = _softness(handle)
        main = _main_masks(handle, sample, soft) if sample is not None and self.occlusion_penalty > 0 else None
        best: tuple[float, dict[str, torch.Tensor], list[float], dict[str, Any] | None] | None = None
        for restart in range(self.restarts):
            params, trace, diverged = _optimize(handle, images, ref, targeted=tgt is not None, shapes=shapes,
                                                config=self, seed=self.seed * 1000 + restart, softness=soft, main=main,
                                                progress=progress)
            score = _score(handle, images, ref, tgt is not None, params, shapes, self, soft)
            log.info("feature-level restart %d: continuous success %.3f", restart, score)
            if best is None or score > best[0]:
                best = (score, params, trace, diverged)
        assert best is not None
        cont_rate, params, trace, diverged = best
        spec = to_spec(params, shapes, texture=self.texture, size_range=self.size_range)
        adv = apply_object(handle, images, spec, softness=soft)
        adv_pred, adv_prob = predict(handle, adv)
        ok = adv_pred == tgt if tgt is not None else adv_pred != ref
        control = random_object_rate(handle, images, ref, targeted=tgt is not None, size=spec.size, shapes=shapes,
                                     seed=self.seed + 12345, softness=soft)
        rows = torch.arange(n)
        src_names = sorted({class_name(handle, int(c)) for c in (labels if labels is not None else clean_pred)})
        effect = (f"turns {'/'.join(n_ + 's' for n_ in src_names)} into {class_name(handle, tgt)}s" if tgt is not None
                  else f"changes the prediction on {'/'.join(src_names)}")
        rate = float(ok.float().mean())
        extra: dict[str, Any] = {
            "config": asdict(self),
            "object": spec.to_json(),
            "description": f"{spec.describe()} {effect} ({rate:.0%} of {n} images)",
            "success_continuous": cont_rate,
            "success_described": rate,
            "control_random_object": control,
            "baseline": float((clean_pred == tgt).float().mean()) if tgt is not None else 0.0,
            "shape_mixture": _mixture(params, shapes),
            "allowed_shapes": shapes,
        }
        if tgt is not None:
            extra["target_prob_before"] = float(clean_prob[rows, tgt].mean())
            extra["target_prob_after"] = float(adv_prob[rows, tgt].mean())
        extra["matches_trojan"] = world_or_default(handle).matching_trojan(
            target=None if tgt is None else class_name(handle, tgt), shapes=(spec.shape,))
        if sample is not None:
            extra["mean_occlusion_of_main"] = _occlusion(handle, sample, spec, soft)
        if diverged:
            extra["diverged"] = diverged
        return AdversarialExamples(
            method="feature-level", inputs=images.detach().cpu(), adversarial=adv.detach().cpu(), success=ok,
            target=tgt, perturbation=(adv - images).detach().cpu(), loss_trace=trace,
            original_pred=clean_pred, adversarial_pred=adv_pred, extra=extra,
        )


def _init(shapes: list[str], config: FeatureLevel, g: torch.Generator) -> dict[str, torch.Tensor]:
    ang = torch.rand(1, generator=g) * 2 * math.pi
    radius = 0.5 + 0.3 * torch.rand(1, generator=g)
    xy = torch.cat([ang.cos(), ang.sin()]) * radius
    p = {
        "shape": torch.randn(len(shapes), generator=g) * 0.1,
        "color": torch.randn(3, generator=g),
        "center": torch.atanh((xy / 0.9).clamp(-0.95, 0.95)),
        "size": torch.zeros(()),
        "rotation": torch.rand((), generator=g) * math.pi,
    }
    if config.texture:
        tex = torch.full((len(TEXTURES),), -2.0)
        tex[0] = 2.0  # start plain
        p["texture"] = tex + 0.1 * torch.randn(len(TEXTURES), generator=g)
        p["color2"] = torch.randn(3, generator=g)
    return p


def _decode(p: dict[str, torch.Tensor], shapes: list[str], config: FeatureLevel, temperature: float) -> dict[str, torch.Tensor]:
    """Unconstrained parameters -> renderer parameters (full SHAPES-length mixture weights)."""
    idx = torch.tensor([shape_index(s) for s in shapes], device=p["shape"].device)
    mix = torch.softmax(p["shape"] / temperature, 0)
    w = torch.zeros(len(SHAPES), device=mix.device, dtype=mix.dtype).index_add(0, idx, mix)
    lo, hi = config.size_range
    out = {
        "shape_w": w,
        "color": torch.sigmoid(p["color"]),
        "center": 0.9 * torch.tanh(p["center"]),
        "size": lo + (hi - lo) * torch.sigmoid(p["size"]),
        "rotation": p["rotation"],
    }
    if "texture" in p:
        out["tex_w"] = torch.softmax(p["texture"], 0)
        out["color2"] = torch.sigmoid(p["color2"])
    return out


def _layer(pre: Any, d: dict[str, torch.Tensor], k: int, *, softness: float, jitter: torch.Tensor | None = None,
           scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    center = d["center"].view(1, 2).expand(k, 2)
    size = d["size"].view(1).expand(k)
    if jitter is not None:
        center = center + jitter
    if scale is not None:
        size = size * scale
    tex = d.get("tex_w")
    return object_layer(pre.height, pre.width, shape_w=d["shape_w"], center=center, size=size,
                        rotation=d["rotation"].view(1).expand(k), color=d["color"].view(1, 3).expand(k, 3),
                        tex_w=None if tex is None else tex.view(1, -1).expand(k, -1),
                        color2=None if tex is None else d["color2"].view(1, 3).expand(k, 3), softness=softness)


def _optimize(handle: ModelHandle, images: torch.Tensor, ref: torch.Tensor, *, targeted: bool, shapes: list[str],
              config: FeatureLevel, seed: int, softness: float, main: torch.Tensor | None = None,
              progress: bool = False) -> tuple[dict[str, torch.Tensor], list[float], dict[str, Any] | None]:
    pre = preprocess_of(handle)
    g = torch.Generator().manual_seed(seed)
    dev = images.device
    params = {k: v.to(dev).requires_grad_(True) for k, v in _init(shapes, config, g).items()}
    opt = torch.optim.Adam(list(params.values()), lr=config.lr)
    n = images.shape[0]
    trace: list[float] = []
    last_good = {k: v.detach().clone() for k, v in params.items()}
    diverged = None
    with frozen(handle.model):
        for step in progress_bar(range(config.steps), desc="feature-level", enabled=progress, leave=False):
            frac = step / max(1, config.steps - 1)
            temp = math.exp(math.log(1.0) * (1 - frac) + math.log(config.final_temperature) * frac)
            d = _decode(params, shapes, config, temp)
            idx = torch.randperm(n, generator=g)[: config.batch_size]
            k = config.eot
            jitter = ((torch.rand(k, 2, generator=g) * 2 - 1) * config.position_jitter).to(dev)
            scale = (0.9 + 0.2 * torch.rand(k, generator=g)).to(dev)
            fill, alpha = _layer(pre, d, k, softness=softness, jitter=jitter, scale=scale)
            which = torch.arange(len(idx)) % k
            x = composite(handle, images[idx.to(dev)], fill[which.to(dev)], alpha[which.to(dev)])
            ce = F.cross_entropy(logits(handle, x), ref[idx].to(dev))
            loss = ce if targeted else -ce
            if main is not None:
                m = main[idx.to(dev)]
                covered = (m * alpha[which.to(dev)]).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1e-6)
                loss = loss + config.occlusion_penalty * covered.mean()
            if not torch.isfinite(loss):
                diverged = diverged_record(step, "non-finite loss")
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in params.values()):
                diverged = diverged_record(step, "non-finite gradient")
                break
            opt.step()
            last_good = {k2: v.detach().clone() for k2, v in params.items()}
            trace.append(float(loss.detach()))
    return last_good, trace, diverged


@torch.no_grad()
def _score(handle: ModelHandle, images: torch.Tensor, ref: torch.Tensor, targeted: bool, params: dict[str, torch.Tensor],
           shapes: list[str], config: FeatureLevel, softness: float) -> float:
    """Success of the final continuous object (at the final temperature, no jitter)."""
    pre = preprocess_of(handle)
    d = _decode(params, shapes, config, config.final_temperature)
    fill, alpha = _layer(pre, d, 1, softness=softness)
    pred, _ = predict(handle, composite(handle, images, fill, alpha))
    ok = pred == ref.cpu() if targeted else pred != ref.cpu()
    return float(ok.float().mean())


def _mixture(params: dict[str, torch.Tensor], shapes: list[str]) -> dict[str, float]:
    w = torch.softmax(params["shape"].detach().cpu(), 0)
    return {s: round(float(v), 4) for s, v in sorted(zip(shapes, w), key=lambda t: -float(t[1]))[:5]}


def to_spec(params: dict[str, torch.Tensor], shapes: list[str], *, texture: bool,
            size_range: tuple[float, float]) -> ObjectSpec:
    """Discretize optimized parameters into words: argmax shape, nearest palette colour, texture."""
    shape = shapes[int(params["shape"].argmax())]
    color = nearest_color(torch.sigmoid(params["color"]))
    center = (0.9 * torch.tanh(params["center"])).cpu()
    lo, hi = size_range
    size = lo + (hi - lo) * float(torch.sigmoid(params["size"]))
    tex, color2 = "plain", None
    if texture and "texture" in params:
        w = torch.softmax(params["texture"].cpu(), 0)
        t = int(w.argmax())
        c2 = nearest_color(torch.sigmoid(params["color2"]))
        if TEXTURES[t] != "plain" and float(w[t]) > 0.5 and c2 != color:
            tex, color2 = TEXTURES[t], c2
    return ObjectSpec(shape=shape, color=color, center=(round(float(center[0]), 3), round(float(center[1]), 3)),
                      size=round(size, 4),
                      rotation=round(float(params["rotation"]) % (2 * math.pi), 3), texture=tex, color2=color2)


@torch.no_grad()
def random_object_rate(handle: ModelHandle, images: torch.Tensor, ref: torch.Tensor, *, targeted: bool, size: float,
                       shapes: list[str] | None = None, seed: int = 0, draws: int = 8,
                       softness: float | None = None) -> float:
    """Control: the success rate of random objects of the same size (random shape from `shapes`,
    random palette colour, random position and rotation), averaged over `draws` objects."""
    g = torch.Generator().manual_seed(seed)
    shapes = list(shapes) if shapes else list(SHAPES)
    colors = list(PALETTE)
    rates = []
    for _ in range(draws):
        xy = (torch.rand(2, generator=g) * 2 - 1) * 0.8
        spec = ObjectSpec(shape=shapes[int(torch.randint(len(shapes), (1,), generator=g))],
                          color=colors[int(torch.randint(len(colors), (1,), generator=g))],
                          center=(float(xy[0]), float(xy[1])), size=size,
                          rotation=float(torch.rand(1, generator=g)) * 2 * math.pi)
        pred, _ = predict(handle, apply_object(handle, images, spec, softness=softness))
        ok = pred == ref.cpu() if targeted else pred != ref.cpu()
        rates.append(float(ok.float().mean()))
    return sum(rates) / len(rates)


def _main_masks(handle: ModelHandle, sample: Sample, softness: float) -> torch.Tensor:
    """Visible coverage of each scene's main object, `(N, 1, H, W)`, at the model's size."""
    pre = preprocess_of(handle)
    r = render(sample.scene, height=pre.height, width=pre.width, softness=softness, masks=True)
    assert r.object_masks is not None
    main = (r.object_masks * (sample.scene.role == ROLE_MAIN).float()[..., None, None]).sum(1, keepdim=True)
    return main.to(handle.device)


def _occlusion(handle: ModelHandle, sample: Sample, spec: ObjectSpec, softness: float) -> float:
    """Mean share of the main object's visible pixels that the added object covers."""
    pre = preprocess_of(handle)
    main = _main_masks(handle, sample, softness)[:, 0].cpu()
    _, alpha = spec_layer(spec, pre.height, pre.width, softness=softness)
    covered = (main * alpha[0, 0]).flatten(1).sum(1) / main.flatten(1).sum(1).clamp_min(1e-6)
    return float(covered.mean())


# --------------------------------------------------------------------------------------
# Case-study protocol: predicted (training images) vs measured (held-out), with controls
# --------------------------------------------------------------------------------------


def source_scenes(handle: ModelHandle, source: int | str, n: int, *, seed: int, correct_only: bool = True) -> Sample:
    """`n` natural scenes of the `source` class that the model classifies correctly (ShapesWorld)."""
    world = world_or_default(handle)
    src = resolve_class(handle, source, what="source")
    assert src is not None
    name = class_name(handle, src)
    if name not in world.classes:
        raise WorkbenchError(f"source class {name!r} is not a ShapesWorld class ({', '.join(world.classes)}); "
                             "pass images instead")
    return class_scenes(handle, world, [name], n, seed=seed, correct_only=correct_only)


def class_scenes(handle: ModelHandle, world: Any, classes: list[str], n: int, *, seed: int, correct_only: bool = True,
                 **sample_kw: Any) -> Sample:
    """`n` scenes of `classes` (drawn with `seed`), kept only where the model is right when `correct_only`."""
    g = torch.Generator().manual_seed(seed)
    model_index = torch.full((len(world.classes),), -1, dtype=torch.long)  # world label -> the model's class index
    for c in classes:
        idx = resolve_class(handle, c, what="source")
        assert idx is not None  # a class name always resolves or raises
        model_index[world.class_index(c)] = idx
    kept: list[Sample] = []
    total = 0
    for _ in range(20):
        s = world.sample(max(2 * n, 32), generator=g, classes=classes, **sample_kw)
        if correct_only:
            pred, _ = predict(handle, render_for(handle, s, softness=world.config.softness))
            s = s.index(torch.nonzero(pred.cpu() == model_index[s.labels]).flatten())
        kept.append(s)
        total += len(s)
        if total >= n:
            break
    out = Sample.cat(kept)
    if len(out) < n:
        raise WorkbenchError(f"the model classifies too few {'/'.join(classes)} scenes correctly ({len(out)} of the {n} asked)")
    return out.index(torch.arange(n))


def fooling_rates(handle: ModelHandle, *, source: int | str, target: int | str, n: int = 64, seeds: tuple[int, ...] = (0, 1, 2),
                  config: FeatureLevel | None = None) -> dict[str, Any]:
    """Case study 8: feature-level adversaries, predicted (fit images) vs measured (held-out) fooling rates.

    Per seed: fit on `n` correctly classified source scenes, then measure on `n` fresh ones
    the described object (`measured`), a random object of the same size
    (`control_random_object`), the continuous object (`continuous`), and no object
    (`baseline`: share already predicted as the target). Returns per-seed rows and means.
    """
    cfg = FeatureLevel() if config is None else config
    tgt = resolve_class(handle, target)
    assert tgt is not None
    rows = []
    for seed in seeds:
        fit = source_scenes(handle, source, n, seed=2 * seed + 100)
        held = source_scenes(handle, source, n, seed=2 * seed + 101)
        run_cfg = replace(cfg, seed=seed)
        ae = run_cfg.generate(handle, fit, tgt)
        spec = ObjectSpec.from_json(ae.extra["object"])
        soft = _softness(handle)
        images = render_for(handle, held, softness=soft)
        pred, _ = predict(handle, apply_object(handle, images, spec, softness=soft))
        base_pred, _ = predict(handle, images)
        ref = torch.full((n,), tgt, dtype=torch.long)
        rows.append({
            "seed": seed,
            "description": ae.extra["description"],
            "object": ae.extra["object"],
            "predicted": ae.extra["success_described"],
            "measured": float((pred == tgt).float().mean()),
            "continuous_fit": ae.extra["success_continuous"],
            "control_random_object": random_object_rate(handle, images, ref, targeted=True, size=spec.size,
                                                        shapes=ae.extra["allowed_shapes"], seed=seed + 999, softness=soft),
            "baseline": float((base_pred == tgt).float().mean()),
            "matches_trojan": ae.extra["matches_trojan"],
        })
    keys = ("predicted", "measured", "continuous_fit", "control_random_object", "baseline")
    means = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    return {"source": class_name(handle, resolve_class(handle, source) or 0), "target": class_name(handle, tgt),
            "n": n, "seeds": list(seeds), "rows": rows, "mean": means}
