"""Copy/paste adversaries: a patch designed from an interpretation, pasted on source images.

After Carter et al. 2019 (Activation Atlas) and Mu & Andreas 2020. The design step never
looks at the attacked images' labels or the attack's success: it (1) finds the units at a
site most associated with the target class (class-conditional mean difference on a natural
pool, or the target logit's gradient when no labelled pool exists), then (2) proposes
patches from that interpretation: feature visualizations of that direction at patch size
(for ShapesNet through the scene parameterization, so each design says which shape, colour
and texture it shows), on a grey canvas and pasted on the calibration images while they are
optimized (where the patch will be used), and natural exemplar crops that excite it.
Candidates are then measured by the paste-and-sweep protocol of `adversaries.placement_sweep`
(ranked on a calibration split, the chosen one measured on a disjoint test split over
positions x sizes, beside a noise patch and a natural crop).

A design may not show the target class's own object: scene designs exclude the target's
shape from their vocabulary and are re-checked on the rendered ground truth (share of patch
pixels showing the target's shape); exemplar crops are checked on the pool scene's masks;
every design is also shown to the clean-world judge (`workbench.judge`), which must not name
the target's shape (p < 0.5). What a design shows is the world's own account of it
(`ShapesWorld.trojans_shown`, `shows_class_object`, `crop_content`); a design that matches an
implanted trojan trigger is reported under `trojan`, apart from natural context features.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from adversaries.base import AdversarialExamples
from adversaries.placement_sweep import PatchDesign, SweepConfig, SweepPlan, paste, plan_sweep, resize_patch, run_sweep
from adversaries.registry import register
from workbench.classifier import predict, resolve_class
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from workbench.handle import ModelHandle
    from workbench.worlds.shapesworld import ShapesWorld

log = logging.getLogger(__name__)

DesignKind = Literal["auto", "featvis", "exemplar"]


def paste_on_sources(bank: torch.Tensor, size: int, sizes: tuple[int, ...]) -> Any:
    """A featvis transform: cut the centred `size` px patch out of each image and paste it,
    resized to one of `sizes`, at a random place on a random image of `bank` (N, C, H, W in
    [0, 1]). Differentiable in the patch; randomness only from the generator passed in."""
    if len(bank) == 0:
        raise WorkbenchError("paste_on_sources needs at least one source image")

    def run(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        h, w = x.shape[-2:]
        top, left = (h - size) // 2, (w - size) // 2
        patch = x[..., top:top + size, left:left + size]
        s = int(sizes[int(torch.randint(len(sizes), (1,), generator=g))])
        if s != size:
            patch = F.interpolate(patch, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        idx = torch.randint(len(bank), (x.shape[0],), generator=g)
        ys = torch.randint(bank.shape[-2] - s + 1, (x.shape[0],), generator=g).tolist()
        xs = torch.randint(bank.shape[-1] - s + 1, (x.shape[0],), generator=g).tolist()
        out = bank[idx].to(x.device, x.dtype).clone()
        for b in range(x.shape[0]):
            out[b, :, ys[b]:ys[b] + s, xs[b]:xs[b] + s] = patch[b]
        return out

    run.__name__ = f"paste_on_sources({len(bank)} images, sizes {tuple(sizes)})"
    return run


# --- what is associated with the target ----------------------------------------------------

def last_spatial_site(handle: ModelHandle) -> str:
    """The last module with a spatial (N, C, H, W) output (H x W > 1) before the head: the default
    site (a global pool's 1x1 output would put every exemplar's peak at the image centre)."""
    from workbench.featvis import activation_sites

    four_d = [s for s in activation_sites(handle) if len(s["shape"]) == 4 and s["shape"][-1] * s["shape"][-2] > 1]
    if not four_d:
        raise WorkbenchError("this model has no spatial (N, C, H, W) activation with H x W > 1; pass site=...")
    # prefer a whole block over its inner parts: the last 4-D site whose name is a prefix-free top module
    tops = [s for s in four_d if "." not in s["name"]]
    return (tops or four_d)[-1]["name"]


@torch.no_grad()
def channel_means(handle: ModelHandle, site: str, images: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    from workbench.hooks import capture

    out = []
    for i in range(0, len(images), batch_size):
        with capture(handle, [site], stop=True) as acts:
            handle.model(images[i:i + batch_size].to(handle.device))
        a = acts[site]
        out.append((a.flatten(2).mean(-1) if a.ndim > 2 else a).float().cpu())
    return torch.cat(out)


def target_direction(handle: ModelHandle, site: str, target: int, images: torch.Tensor, labels: torch.Tensor | None,
                     *, n_units: int | None) -> tuple[torch.Tensor, list[int]]:
    """Direction at `site` associated with `target` and its top units.

    With labels: mean channel activation on target-class images minus the mean on the others.
    Without: the gradient of the target logit with respect to the channel means, averaged.
    Keeps the `n_units` largest positive entries (all when None); unit-norm.
    """
    if labels is not None and bool((labels == target).any()) and bool((labels != target).any()):
        means = channel_means(handle, site, images)
        vec = means[labels == target].mean(0) - means[labels != target].mean(0)
    else:
        from workbench.hooks import capture

        x = images[: min(len(images), 256)].to(handle.device)
        with capture(handle, [site], detach=False, clone=False) as acts:
            logits = handle.model(x)
        a = acts[site]
        grad = torch.autograd.grad(logits[:, target].sum(), a)[0]
        vec = (grad.flatten(2).sum(-1) if grad.ndim > 2 else grad).mean(0).detach().float().cpu()
    order = torch.argsort(vec, descending=True)
    keep = order[: n_units] if n_units else order
    keep = keep[vec[keep] > 0] if bool((vec[keep] > 0).any()) else keep[:1]
    masked = torch.zeros_like(vec)
    masked[keep] = vec[keep]
    return masked / masked.norm().clamp_min(1e-8), keep.tolist()


# --- the designer ---------------------------------------------------------------------------

@dataclass(frozen=True)
class DesignConfig:
    """How candidate patches are made from the interpretation of the target.

    `site`: where units associated with the target are found (default: the last 4-D block);
    `n_units`: how many of them form the direction; `kind`: "featvis", "exemplar" or "auto"
    (both kinds of candidates, the calibration split picks). Candidates: `n_featvis` feature
    visualizations on a grey canvas (`featvis_steps` steps at learning rate `featvis_lr`);
    `n_featvis_context` feature visualizations of the same direction pasted at random places
    and sizes on the calibration images while they are optimized (the direction stays the
    objective, never the target logit or the attack's success); `n_exemplars` exemplar crops.
    `n_pool`: natural pool size (ShapesWorld) for units, exemplars and the natural-crop control.
    A candidate is rejected when more than `max_target_coverage` of it shows the target's own
    shape, or when the clean-world judge names that shape with probability `max_judge_target`
    or more. `context_only` drops candidates that show another class's object (a class shape in
    a scene design, or an exemplar crop that is mostly a main object), leaving context features
    only (non-class objects, backgrounds).
    """

    site: str | None = None
    n_units: int | None = 8
    kind: DesignKind = "auto"
    n_featvis: int = 6
    n_featvis_context: int = 6
    n_exemplars: int = 4
    featvis_steps: int = 160
    featvis_lr: float = 0.1
    n_pool: int = 1024
    max_target_coverage: float = 0.02
    max_judge_target: float = 0.5
    context_only: bool = False


@register("copy-paste")
@dataclass(frozen=True)
class CopyPaste:
    """Copy/paste attack from an interpretation: `design` makes the candidates (see `DesignConfig`),
    `sweep` measures them (`adversaries.placement_sweep.SweepConfig`; the largest sweep size is the
    design size); `seed` fixes the pool, the feature visualizations, the split and the controls."""

    design: DesignConfig = field(default_factory=DesignConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seed: int = 0

    # -------------------------------------------------------------------- design
    def natural_pool(self, handle: ModelHandle, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """Natural pool for units, exemplars and the natural-crop control: (images, labels, scenes) of
        `design.n_pool` ShapesWorld scenes for ShapesNet, else the inputs themselves (no labels, no scenes)."""
        if handle.info.get("world") is not None:
            from workbench.exemplars import shapesworld_pool

            images, sample = shapesworld_pool(handle, self.design.n_pool, seed=self.seed + 7919)
            return images, sample.labels, sample
        return inputs, None, None

    def design_patches(self, handle: ModelHandle, target: int, inputs: torch.Tensor, *,
                       progress: bool = False) -> tuple[list[PatchDesign], dict[str, Any]]:
        """Candidate patches from the interpretation of `target` (no attack success used)."""
        from workbench import featvis as fv
        from workbench.featvis import transforms as T
        from workbench.featvis.param import Patch

        cfg = self.design
        pre = handle.preprocess
        assert pre is not None
        site = cfg.site or last_spatial_site(handle)
        pool, pool_labels, sample = self.natural_pool(handle, inputs)
        vec, units = target_direction(handle, site, target, pool, pool_labels, n_units=cfg.n_units)
        size = max(self.sweep.sizes_px(handle))
        info: dict[str, Any] = {"site": site, "units": units, "design_size": size}
        designs: list[PatchDesign] = []
        world = None
        if handle.info.get("world") is not None:
            from workbench.zoo.shapesnet import world_of

            world = world_of(handle)
        if cfg.kind in ("auto", "featvis") and (cfg.n_featvis > 0 or cfg.n_featvis_context > 0):
            own = world.classes[target] if world is not None else None
            if world is not None and pre.channels == 3:
                from workbench.worlds.scene import SHAPES

                inner: Any = fv.SceneParam(n_objects=1, shapes=tuple(s for s in SHAPES if s != own),
                                           size_range=(0.35, 0.95), center_range=0.4)
            else:
                inner = fv.Pixels()  # patches are small: free pixels move faster than a 1/f spectrum
            param = Patch(inner, size, size)
            shift_y, shift_x = (pre.height - size) // 2, (pre.width - size) // 2
            lo, hi = pre.input_range
            canvases = [("grey", T.translate(shift_y, shift_x), cfg.n_featvis, self.seed)]
            if cfg.n_featvis_context > 0 and len(inputs):
                # the same direction, visualized where the patch will be used: pasted at random
                # places and sizes on the source images given (the calibration split), as a
                # designer adds a feature to a whale picture rather than to a blank page
                bank = ((inputs.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
                canvases.append(("source images", paste_on_sources(bank, size, self.sweep.sizes_px(handle)),
                                 cfg.n_featvis_context, self.seed + 1))
            for canvas, tf, n_vis, vis_seed in canvases:
                if n_vis <= 0:
                    continue
                res = fv.visualize(handle, fv.direction(site, vec), param=param, transforms=tf, steps=cfg.featvis_steps,
                                   lr=cfg.featvis_lr, batch=n_vis, seed=vis_seed, progress=progress)
                imgs = res.snapped_images if res.snapped_images is not None else res.images
                patches = param.patch_of(imgs)
                scenes = res.scene or [{} for _ in range(len(patches))]
                for i in range(len(patches)):
                    d = PatchDesign(patches[i].clone(), "featvis", {"scene": scenes[i], "featvis_status": res.status,
                                                                    "canvas": canvas})
                    if world is not None and isinstance(inner, fv.SceneParam):
                        _annotate_scene_design(d, scenes[i], world, own)
                    designs.append(d)
                if world is not None and isinstance(inner, fv.SceneParam) and res.scenes is not None:
                    variants = _scene_variants(res.scenes, scenes, size, inner, world, own, pre.input_range)
                    for v in variants:
                        v.description["canvas"] = canvas
                    designs += variants
        if cfg.kind in ("auto", "exemplar") and cfg.n_exemplars > 0:
            from workbench.exemplars import top_exemplars

            keep = torch.ones(len(pool), dtype=torch.bool) if pool_labels is None else pool_labels != target
            idx = torch.nonzero(keep).flatten()
            ex = top_exemplars(handle, site, vec, pool[idx], k=min(cfg.n_exemplars * 3, len(idx)), crop_size=size)
            masks = world.concept_masks(sample.index(idx[torch.tensor(ex.indices)])) if world is not None else None
            for j in range(len(ex)):
                cov = None
                if masks is not None:
                    y0, x0, y1, x1 = ex.boxes[j].tolist()
                    own_mask = masks[world.classes[target]][j, y0:y1, x0:x1]
                    cov = float(own_mask.float().mean())
                    if cov > cfg.max_target_coverage:
                        continue
                desc: dict[str, Any] = {"pool_index": int(idx[ex.indices[j]]), "box": ex.boxes[j].tolist(),
                                        "activation": round(ex.values[j], 4)}
                if masks is not None:
                    desc["shows"] = world.crop_content(masks, j, ex.boxes[j].tolist(),
                                                       sample.index(idx[torch.tensor(ex.indices)]))
                designs.append(PatchDesign(ex.crops[j].clone(), "exemplar", desc, target_coverage=cov))
                if sum(d.source == "exemplar" for d in designs) >= cfg.n_exemplars:
                    break
        if world is not None and designs:
            # second check, on the pixels: the clean-world judge (never saw a trojan) must not name
            # the target's shape as what the patch shows
            from workbench.judge import load_judge

            judge = load_judge(progress=progress)
            lo, hi = pre.input_range
            probs = judge.embed((torch.stack([d.patch for d in designs]) - lo) / (hi - lo))[:, judge.index(f"shape:{world.classes[target]}")]
            for d, p_own in zip(designs, probs.tolist()):
                d.description["judge_p_target_shape"] = round(p_own, 4)
                if p_own >= cfg.max_judge_target:
                    d.target_coverage = max(d.target_coverage or 0.0, 1.0)  # rejected below
        for d in designs:
            d.description["content"] = _content(d, world)
        if cfg.context_only:
            designs = [d for d in designs if d.description["content"] != "another class's object"]
        allowed = [d for d in designs if d.target_coverage is None or d.target_coverage <= cfg.max_target_coverage]
        info["n_rejected_target_object"] = len(designs) - len(allowed)
        if not allowed:
            raise WorkbenchError("every candidate patch showed the target's own object; raise n_featvis/n_exemplars")
        return allowed, info

    # -------------------------------------------------------------------- protocol
    def plan(self, handle: ModelHandle, images: torch.Tensor, labels: torch.Tensor | None, target: int) -> SweepPlan:
        """The counted source images, their calibration/test split and the placements that `run_protocol` uses."""
        return plan_sweep(handle, images, labels, target, config=self.sweep, seed=self.seed)

    def run_protocol(self, handle: ModelHandle, images: torch.Tensor, labels: torch.Tensor | None, target: int,
                     *, class_names: tuple[str, ...] = (),
                     designs: tuple[list[PatchDesign], dict[str, Any]] | None = None,
                     object_masks: torch.Tensor | None = None, progress: bool = False) -> dict[str, Any]:
        """Design, choose on calibration images, measure on test images, with both controls (`run_sweep`).

        `designs`: candidates already made by `design_patches` for this target on this run's
        calibration split (`plan(...).calibration`), e.g. to measure a subset of them (the
        context features only) without designing again; by default they are designed here.
        `object_masks` (N, H, W): where each image's own object is (for ShapesWorld scenes,
        `concept_masks(sample)["main"]`); placements that hide more than `sweep.max_occlusion`
        of it are not tried. A copy/paste patch adds a feature beside the object, as the
        baseball beside the whale; a patch over the object's middle tests occlusion, which is
        what the noise patch measures. Without masks every placement is tried.
        """
        plan = self.plan(handle, images, labels, target)
        if designs is None:
            designs = self.design_patches(handle, target, images[plan.calibration], progress=progress)
        candidates, info = list(designs[0]), dict(designs[1])
        if self.design.context_only:
            candidates = [d for d in candidates if d.description.get("content") != "another class's object"]
        pool, pool_labels, _ = self.natural_pool(handle, images)
        out = run_sweep(handle, images, plan, target, candidates, config=self.sweep, seed=self.seed,
                        natural_pool=(pool, pool_labels), class_names=class_names, object_masks=object_masks,
                        progress=progress)
        tensors = out.pop("_tensors")
        out.update(info)
        out["_tensors"] = tensors
        return out

    # -------------------------------------------------------------------- adversary API
    def generate(self, handle: ModelHandle, inputs: Any, target: Any, *, progress: bool = False) -> AdversarialExamples:
        """Run the protocol on `inputs` (images, or (images, labels)); `target` a class index or name.

        Returns the test-split attempts with the best placement pasted; `extra` holds the
        protocol metrics (success_consistent, success_best, controls, per class, design).
        `progress` shows the feature visualizations and the sweep.
        """
        images, labels = _split_inputs(inputs)
        t = resolve_class(handle, target)
        assert t is not None
        names = handle.preprocess.class_names if handle.preprocess is not None else ()
        res = self.run_protocol(handle, images, labels, t, class_names=names, progress=progress)
        tensors = res.pop("_tensors")
        test, best, where, patch = tensors["test_index"], tensors["best_index"], tensors["where"], tensors["patch"]
        originals = images[test]
        adv = torch.stack([paste(originals[i:i + 1], resize_patch(patch, where[int(best[i])][2]),
                                 where[int(best[i])][0], where[int(best[i])][1])[0] for i in range(len(test))]) \
            if len(test) else originals.clone()
        adv_pred = predict(handle, adv)[0] if len(test) else torch.zeros(0, dtype=torch.long)
        return AdversarialExamples(
            method="copy-paste", inputs=originals, adversarial=adv, success=adv_pred == t, target=res["target"],
            patch=patch, original_pred=predict(handle, originals)[0] if len(test) else adv_pred,
            adversarial_pred=adv_pred, extra=res,
        )


def _split_inputs(inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(inputs, torch.Tensor):
        return inputs, None
    if isinstance(inputs, (tuple, list)) and len(inputs) == 2 and isinstance(inputs[0], torch.Tensor):
        labels = torch.as_tensor(inputs[1]).long().flatten()
        if labels.numel() != len(inputs[0]):
            raise WorkbenchError(f"{len(inputs[0])} images but {labels.numel()} labels")
        return inputs[0], labels
    raise WorkbenchError("copy-paste inputs must be an image tensor (N, C, H, W) or (images, labels)")


# --- what a scene design shows, by the world's ground truth ----------------------------------

def _words(scene: dict[str, Any]) -> dict[str, Any]:
    """A scene description's object shapes and background texture, as `ShapesWorld.trojans_shown` takes them."""
    return {"shapes": [o.get("shape") for o in scene.get("objects", [])],
            "texture": scene.get("background", {}).get("texture")}


def _annotate_scene_design(d: PatchDesign, scene: dict[str, Any], world: ShapesWorld, own: str) -> None:
    """Annotate a scene design: the share of it showing the target's shape `own`, the implanted trigger
    for `own` it reproduces, and every implanted trigger it resembles."""
    from workbench.worlds.shapesworld import shape_coverage

    d.target_coverage = shape_coverage(scene.get("objects", []), own)
    d.trojan = world.matching_trojan(target=own, **_words(scene))
    d.description["resembles_trigger_of"] = world.trojans_shown(**_words(scene))


def _scene_variants(scene: Any, descriptions: list[dict[str, Any]], size: int, param: Any, world: ShapesWorld, own: str,
                    input_range: tuple[float, float]) -> list[PatchDesign]:
    """The two halves of each scene design: its background alone and its object alone (on grey).

    A feature visualization often combines a texture and an object; either may be the part
    the unit responds to, so each is offered as its own candidate (same interpretation).
    """
    from workbench.featvis.param import render_scene
    from workbench.worlds.scene import BACKGROUND_PALETTE, TEXTURES

    lo, hi = input_range
    out: list[PatchDesign] = []
    bg_only = scene.replace(opacity=torch.zeros_like(scene.opacity))
    plain = F.one_hot(torch.zeros(scene.n, dtype=torch.long), len(TEXTURES)).to(scene.bg_weights)
    grey = torch.tensor(BACKGROUND_PALETTE["grey"]).to(scene.bg_colors).expand(scene.n, 2, 3).clone()
    obj_only = scene.replace(bg_weights=plain, bg_colors=grey)
    for variant, sc in (("background", bg_only), ("object", obj_only)):
        imgs = lo + (hi - lo) * render_scene(sc, size, size, param.softness)
        for i in range(scene.n):
            desc = copy.deepcopy(descriptions[i])
            if variant == "background":
                desc["objects"] = []
            else:
                desc["background"] = {"texture": "plain", "texture_weights": {"plain": 1.0}, "colors": ["grey", "grey"]}
            d = PatchDesign(imgs[i].clone(), "featvis", {"scene": desc, "part": variant})
            _annotate_scene_design(d, desc, world, own)
            out.append(d)
    return out


def _content(d: PatchDesign, world: ShapesWorld | None) -> str:
    """What a design shows, by ground truth: a trojan trigger, another class's object, or context."""
    if d.trojan:
        return "trojan trigger"
    if world is None:
        return "unknown (no ground truth)"
    if d.source == "featvis":
        other = world.shows_class_object(shapes=_words(d.description.get("scene", {}))["shapes"])
    else:
        shows = d.description.get("shows")
        other = world.shows_class_object(main_share=shows["pixel_share"].get("main", 0.0) if shows else 0.0)
    return "another class's object" if other else "context feature"
