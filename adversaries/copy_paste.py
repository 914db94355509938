"""Copy/paste adversaries: a patch designed from an interpretation, pasted on source images.

After Carter et al. 2019 (Activation Atlas) and Mu & Andreas 2020. The design step never
looks at the attacked images' labels or the attack's success: it (1) finds the units at a
site most associated with the target class (class-conditional mean difference on a natural
pool, or the target logit's gradient when no labelled pool exists), then (2) proposes
patches from that interpretation: feature visualizations of that direction at patch size
(for ShapesNet through the scene parameterization, so each design says which shape, colour
and texture it shows), on a grey canvas and pasted on the calibration images while they are
optimized (where the patch will be used), and natural exemplar crops that excite it. Candidates are ranked on a
calibration split of source images and the chosen one is measured on a disjoint test split.

Protocol (Activation Atlas): only test images classified correctly before the patch count;
the patch is swept over positions x sizes (default 6 x 6 x 6, Mu & Andreas); *consistent* placement is the one placement
that works best on the calibration split, applied to every test image; *best* placement
counts an image when any placement flips it. Controls get the same sweep: a uniform-noise
patch and a random natural crop of the same size. Reported per source class, with the mean
target probability before and after. A design may not show the target class's own object:
scene designs exclude the target's shape from their vocabulary and are re-checked on the
rendered ground truth (share of patch pixels showing the target's shape); exemplar crops
are checked on the pool scene's masks; every design is also shown to the clean-world judge
(`workbench.judge`), which must not name the target's shape (p < 0.5). A design that matches an implanted trojan trigger is
reported under `trojan`, apart from natural context features.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from adversaries.base import AdversarialExamples
from adversaries.registry import register
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from workbench.handle import ModelHandle

log = logging.getLogger(__name__)

Design = Literal["auto", "featvis", "exemplar"]


@dataclass
class PatchDesign:
    """One candidate patch: pixels (C, s, s) in the model's input range, and where it came from."""

    patch: torch.Tensor
    source: str  # "featvis", "exemplar", "noise", "natural"
    description: dict[str, Any] = field(default_factory=dict)
    target_coverage: float | None = None  # ground truth: share of pixels showing the target's own shape
    trojan: str | None = None  # name of the implanted trojan whose trigger this design matches

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "description": self.description, "target_coverage": self.target_coverage,
                "trojan": self.trojan, "kind": "trojan trigger" if self.trojan else "natural feature",
                "content": self.description.get("content"),
                "size": list(self.patch.shape[-2:])}


# --- pasting and sweeping -----------------------------------------------------------------

def placements(height: int, width: int, sizes: tuple[int, ...], grid: int) -> list[tuple[int, int, int]]:
    """(top, left, size) for `grid` x `grid` evenly spaced positions of each size."""
    out = []
    for s in sizes:
        if not 1 <= s <= min(height, width):
            raise WorkbenchError(f"patch size {s} px does not fit a {height}x{width} image; sizes must be 1..{min(height, width)}")
        ys = torch.linspace(0, height - s, grid).round().long().unique().tolist()
        xs = torch.linspace(0, width - s, grid).round().long().unique().tolist()
        out += [(int(y), int(x), s) for y in ys for x in xs]
    return out


def occlusion(masks: torch.Tensor, where: list[tuple[int, int, int]]) -> torch.Tensor:
    """(P, N): the share of each image's object pixels (`masks` (N, H, W)) that a patch at each
    placement would cover (0 for an image whose mask is empty)."""
    m = (masks > 0.5).float() if masks.dtype != torch.bool else masks.float()
    total = m.flatten(1).sum(1)
    ii = F.pad(m.cumsum(1).cumsum(2), (1, 0, 1, 0))  # integral image: box sums in O(1)
    out = torch.zeros(len(where), len(m))
    for k, (t, l, z) in enumerate(where):
        covered = ii[:, t + z, l + z] - ii[:, t, l + z] - ii[:, t + z, l] + ii[:, t, l]
        out[k] = torch.where(total > 0, covered / total.clamp_min(1), torch.zeros_like(total))
    return out


def thin(where: list[tuple[int, int, int]], at_most: int) -> list[tuple[int, int, int]]:
    """Every k-th placement (k the smallest step leaving at most `at_most`): a cheaper sweep
    with the same spread of sizes and positions, for ranking many candidates."""
    if at_most < 1:
        raise WorkbenchError(f"at_most must be >= 1, got {at_most}")
    step = -(-len(where) // at_most)
    return where[::step]


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


def resize_patch(patch: torch.Tensor, size: int) -> torch.Tensor:
    if patch.shape[-1] == size and patch.shape[-2] == size:
        return patch
    return F.interpolate(patch[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def paste(images: torch.Tensor, patch: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """`images` with `patch` (C, s, s) pasted opaquely at (top, left)."""
    c, s, t = patch.shape
    if images.shape[1] != c:
        raise WorkbenchError(f"patch has {c} channels, images have {images.shape[1]}")
    if top < 0 or left < 0 or top + s > images.shape[-2] or left + t > images.shape[-1]:
        raise WorkbenchError(f"a {s}x{t} patch at ({top}, {left}) does not fit {images.shape[-2]}x{images.shape[-1]} images")
    out = images.clone()
    out[:, :, top:top + s, left:left + t] = patch.to(images.dtype)
    return out


@torch.no_grad()
def predictions(handle: ModelHandle, images: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Softmax probabilities (N, classes)."""
    outs = [torch.softmax(handle.model(images[i:i + batch_size].to(handle.device)).float(), -1).cpu()
            for i in range(0, len(images), batch_size)]
    return torch.cat(outs)


@torch.no_grad()
def sweep_success(handle: ModelHandle, images: torch.Tensor, patch: torch.Tensor, where: list[tuple[int, int, int]],
                  target: int, *, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(success (P, N) bool: predicted == target, p(target) (P, N)) for every placement x image."""
    model = handle.model
    dev = handle.device
    succ = torch.empty(len(where), len(images), dtype=torch.bool)
    prob = torch.empty(len(where), len(images))
    sized = {s: resize_patch(patch, s).to(dev) for s in {w[2] for w in where}}
    x = images.to(dev)
    per = max(1, batch_size // max(len(images), 1))
    for i in range(0, len(where), per):
        chunk = where[i:i + per]
        batch = torch.cat([paste(x, sized[s], top, left) for top, left, s in chunk])
        logits = model(batch).float()
        p = torch.softmax(logits, -1)
        succ[i:i + len(chunk)] = (logits.argmax(-1) == target).cpu().view(len(chunk), len(images))
        prob[i:i + len(chunk)] = p[:, target].cpu().view(len(chunk), len(images))
    return succ, prob


def protocol_metrics(calib: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                     where: list[tuple[int, int, int]]) -> dict[str, Any]:
    """Consistent placement chosen on the calibration split, best placement per test image."""
    c_succ, c_prob = calib
    t_succ, t_prob = test
    score = c_succ.float().mean(1) + 1e-3 * c_prob.mean(1)  # success first, target probability breaks ties
    k = int(score.argmax())
    n = t_succ.shape[1]
    best_idx = (t_succ.float() + 1e-3 * t_prob).argmax(0)
    return {
        "success_consistent": float(t_succ[k].float().mean()) if n else float("nan"),
        "success_best": float(t_succ.any(0).float().mean()) if n else float("nan"),
        "p_target_consistent": float(t_prob[k].mean()) if n else float("nan"),
        "p_target_best": float(t_prob.max(0).values.mean()) if n else float("nan"),
        "consistent_placement": {"top": where[k][0], "left": where[k][1], "size": where[k][2]},
        "best_placement_index": best_idx,
        "consistent_index": k,
    }


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


# --- the generator --------------------------------------------------------------------------

@register("copy-paste")
@dataclass(frozen=True)
class CopyPaste:
    """Copy/paste attack from an interpretation (see the module docstring for the protocol).

    `site`: where units associated with the target are found (default: the last 4-D block);
    `n_units`: how many of them form the direction; `design`: "featvis", "exemplar" or
    "auto" (both kinds of candidates, the calibration split picks); `sizes`: patch sides as
    fractions of the image side; `grid`: positions per axis (the default, 6 x 6 positions x
    6 sizes, is Mu & Andreas's sweep; the largest size is the design size). Candidates:
    `n_featvis` feature visualizations on a grey canvas; `n_featvis_context` feature
    visualizations of the same direction pasted at random places and sizes on the
    calibration images while they are optimized (the direction stays the objective, never
    the target logit or the attack's success); `n_exemplars` exemplar crops.
    `calib_fraction`: share of the inputs used to pick the design and the consistent
    placement; candidates are ranked on at most `n_rank` of them over an evenly thinned
    subset of at most `n_rank_placements` placements, and the chosen design's consistent
    placement is then picked from the whole sweep. `n_pool`: natural pool size (ShapesWorld)
    for units and exemplars. `max_occlusion`: with object masks
    (`run_protocol(object_masks=...)`), the largest share of an image's own object a
    placement may cover. `context_only` drops candidates that show another class's object (a class
    shape in a scene design, or an exemplar crop that is mostly a main object), leaving
    context features only (non-class objects, backgrounds).
    """

    site: str | None = None
    n_units: int | None = 8
    design: Design = "auto"
    sizes: tuple[float, ...] = (0.125, 0.167, 0.21, 0.25, 0.29, 0.33)
    grid: int = 6
    n_featvis: int = 6
    n_featvis_context: int = 6
    n_exemplars: int = 4
    featvis_steps: int = 160
    featvis_lr: float = 0.1
    calib_fraction: float = 0.4
    n_rank: int = 48
    n_rank_placements: int = 54
    n_pool: int = 1024
    max_target_coverage: float = 0.02
    max_occlusion: float = 0.5
    max_judge_target: float = 0.5
    context_only: bool = False
    seed: int = 0
    batch_size: int = 512
    progress: bool = False

    # -------------------------------------------------------------------- helpers
    def sizes_px(self, handle: ModelHandle) -> tuple[int, ...]:
        """The patch sizes in pixels of `handle`'s input (the `sizes` fractions of the shorter side)."""
        pre = handle.preprocess
        assert pre is not None
        side = min(pre.height, pre.width)
        px = tuple(sorted({max(2, round(f * side)) for f in self.sizes}))
        if any(p > side for p in px):
            raise WorkbenchError(f"patch sizes {self.sizes} (fractions of the image side) must be at most 1")
        return px

    def _pool(self, handle: ModelHandle, target: int, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """Natural pool for units and exemplars: ShapesWorld scenes for ShapesNet, else the inputs."""
        if handle.info.get("world") is not None:
            from workbench.exemplars import shapesworld_pool

            images, sample = shapesworld_pool(handle, self.n_pool, seed=self.seed + 7919)
            return images, sample.labels, sample
        return inputs, None, None

    def design_patches(self, handle: ModelHandle, target: int, inputs: torch.Tensor) -> tuple[list[PatchDesign], dict[str, Any]]:
        """Candidate patches from the interpretation of `target` (no attack success used)."""
        from workbench import featvis as fv
        from workbench.featvis import transforms as T
        from workbench.featvis.param import Patch

        pre = handle.preprocess
        assert pre is not None
        site = self.site or last_spatial_site(handle)
        pool, pool_labels, sample = self._pool(handle, target, inputs)
        vec, units = target_direction(handle, site, target, pool, pool_labels, n_units=self.n_units)
        size = max(self.sizes_px(handle))
        info: dict[str, Any] = {"site": site, "units": units, "design_size": size}
        designs: list[PatchDesign] = []
        world = None
        if handle.info.get("world") is not None:
            from workbench.zoo.shapesnet import world_of

            world = world_of(handle)
        if self.design in ("auto", "featvis") and (self.n_featvis > 0 or self.n_featvis_context > 0):
            own = world.classes[target] if world is not None else None
            if world is not None and pre.channels == 3:
                from workbench.worlds.shapesworld import SHAPES

                inner: Any = fv.SceneParam(n_objects=1, shapes=tuple(s for s in SHAPES if s != own),
                                           size_range=(0.35, 0.95), center_range=0.4)
            else:
                inner = fv.Pixels()  # patches are small: free pixels move faster than a 1/f spectrum
            param = Patch(inner, size, size)
            shift_y, shift_x = (pre.height - size) // 2, (pre.width - size) // 2
            lo, hi = pre.input_range
            canvases = [("grey", T.translate(shift_y, shift_x), self.n_featvis, self.seed)]
            if self.n_featvis_context > 0 and len(inputs):
                # the same direction, visualized where the patch will be used: pasted at random
                # places and sizes on the source images given (the calibration split), as a
                # designer adds a feature to a whale picture rather than to a blank page
                bank = ((inputs.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
                canvases.append(("source images", paste_on_sources(bank, size, self.sizes_px(handle)),
                                 self.n_featvis_context, self.seed + 1))
            for canvas, tf, n_vis, vis_seed in canvases:
                if n_vis <= 0:
                    continue
                res = fv.visualize(handle, fv.direction(site, vec), param=param, transforms=tf, steps=self.featvis_steps,
                                   lr=self.featvis_lr, batch=n_vis, seed=vis_seed, progress=self.progress)
                imgs = res.snapped_images if res.snapped_images is not None else res.images
                patches = param.patch_of(imgs)
                scenes = res.scene or [{} for _ in range(len(patches))]
                for i in range(len(patches)):
                    d = PatchDesign(patches[i].clone(), "featvis", {"scene": scenes[i], "featvis_status": res.status,
                                                                    "canvas": canvas})
                    if world is not None and isinstance(inner, fv.SceneParam):
                        d.target_coverage = _coverage_from_description(scenes[i], own)
                        d.trojan = _matching_trojan(scenes[i], world, own)
                        d.description["resembles_trigger_of"] = _resembles(scenes[i], world)
                    designs.append(d)
                if world is not None and isinstance(inner, fv.SceneParam) and res.scenes is not None:
                    variants = _scene_variants(res.scenes, scenes, size, inner, world, own, pre.input_range)
                    for v in variants:
                        v.description["canvas"] = canvas
                    designs += variants
        if self.design in ("auto", "exemplar") and self.n_exemplars > 0:
            from workbench.exemplars import top_exemplars

            keep = torch.ones(len(pool), dtype=torch.bool) if pool_labels is None else pool_labels != target
            idx = torch.nonzero(keep).flatten()
            ex = top_exemplars(handle, site, vec, pool[idx], k=min(self.n_exemplars * 3, len(idx)), crop_size=size)
            masks = world.concept_masks(sample.index(idx[torch.tensor(ex.indices)])) if world is not None else None
            for j in range(len(ex)):
                cov = None
                if masks is not None:
                    y0, x0, y1, x1 = ex.boxes[j].tolist()
                    own_mask = masks[world.classes[target]][j, y0:y1, x0:x1]
                    cov = float(own_mask.float().mean())
                    if cov > self.max_target_coverage:
                        continue
                desc: dict[str, Any] = {"pool_index": int(idx[ex.indices[j]]), "box": ex.boxes[j].tolist(),
                                        "activation": round(ex.values[j], 4)}
                if masks is not None:
                    desc["shows"] = _crop_content(masks, j, ex.boxes[j].tolist(), sample.index(idx[torch.tensor(ex.indices)]), world)
                designs.append(PatchDesign(ex.crops[j].clone(), "exemplar", desc, target_coverage=cov))
                if sum(d.source == "exemplar" for d in designs) >= self.n_exemplars:
                    break
        if world is not None and designs:
            # second check, on the pixels: the clean-world judge (never saw a trojan) must not name
            # the target's shape as what the patch shows
            from workbench.judge import load_judge

            judge = load_judge(progress=self.progress)
            lo, hi = pre.input_range
            probs = judge.embed((torch.stack([d.patch for d in designs]) - lo) / (hi - lo))[:, judge.index(f"shape:{world.classes[target]}")]
            for d, p_own in zip(designs, probs.tolist()):
                d.description["judge_p_target_shape"] = round(p_own, 4)
                if p_own >= self.max_judge_target:
                    d.target_coverage = max(d.target_coverage or 0.0, 1.0)  # rejected below
        for d in designs:
            d.description["content"] = _content(d, world)
        if self.context_only:
            designs = [d for d in designs if d.description["content"] != "another class's object"]
        allowed = [d for d in designs if d.target_coverage is None or d.target_coverage <= self.max_target_coverage]
        info["n_rejected_target_object"] = len(designs) - len(allowed)
        if not allowed:
            raise WorkbenchError("every candidate patch showed the target's own object; raise n_featvis/n_exemplars")
        return allowed, info

    # -------------------------------------------------------------------- protocol
    def run_protocol(self, handle: ModelHandle, images: torch.Tensor, labels: torch.Tensor | None, target: int,
                     *, class_names: tuple[str, ...] = (),
                     designs: tuple[list[PatchDesign], dict[str, Any]] | None = None,
                     object_masks: torch.Tensor | None = None) -> dict[str, Any]:
        """Design, choose on calibration images, measure on test images, with both controls.

        `designs`: candidates already made by `design_patches` for this target on this run's
        calibration split (`calibration_split`), e.g. to measure a subset of them (the
        context features only) without designing again; by default they are designed here.
        `object_masks` (N, H, W): where each image's own object is (for ShapesWorld scenes,
        `concept_masks(sample)["main"]`); a placement that would cover more than
        `max_occlusion` of an image's object is not tried on that image (it stays unpatched:
        no success, its own target probability), for the design and both controls alike. A
        copy/paste patch adds a feature beside the object, as the baseball beside the whale;
        a patch over the object's middle tests occlusion, which is what the noise patch
        measures. Without masks every placement is tried.
        """
        pre = handle.preprocess
        if pre is None:
            raise WorkbenchError(f"{handle.spec} is not an image model; copy/paste needs ImagePreprocess")
        pre.check(images)
        n_classes = int(predictions(handle, images[:1]).shape[1])
        if not 0 <= target < n_classes:
            raise WorkbenchError(f"target class {target} is out of range; the model has {n_classes} classes (0..{n_classes - 1})")
        if not 0.0 < self.calib_fraction < 1.0:
            raise WorkbenchError(f"calib_fraction {self.calib_fraction} must be between 0 and 1")
        probs0 = predictions(handle, images, batch_size=self.batch_size)
        pred0 = probs0.argmax(-1)
        truth = labels if labels is not None else pred0
        correct = (pred0 == truth) & (truth != target)
        idx = torch.nonzero(correct).flatten()
        if len(idx) < 2:
            raise WorkbenchError(f"only {len(idx)} inputs are non-target images classified correctly before the patch; "
                                 "give more source-class images (only those count, as in the Activation Atlas protocol)")
        cal, test = self._split(idx)
        where = placements(pre.height, pre.width, self.sizes_px(handle), self.grid)
        if designs is None:
            designs = self.design_patches(handle, target, images[cal])
        designs, info = list(designs[0]), dict(designs[1])
        if self.context_only:
            designs = [d for d in designs if d.description.get("content") != "another class's object"]
        if not designs:
            raise WorkbenchError("no candidate patch left to measure (all were another class's object, or none was given)")
        if object_masks is not None and tuple(object_masks.shape) != (len(images), *images.shape[-2:]):
            raise WorkbenchError(f"object_masks must be (N, H, W) = ({len(images)}, {images.shape[-2]}, {images.shape[-1]}), "
                                 f"one mask of the source object per image; got {tuple(object_masks.shape)}")

        def sweep(which: torch.Tensor, patch: torch.Tensor, at: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
            succ, prob = sweep_success(handle, images[which], patch, at, target, batch_size=self.batch_size)
            if object_masks is not None:  # a placement hiding too much of the object is not tried: the image stays as it was
                hidden = occlusion(object_masks[which], at) > self.max_occlusion
                succ = succ & ~hidden
                prob = torch.where(hidden, probs0[which, target][None].expand_as(prob), prob)
            return succ, prob

        bar = tqdm(total=len(designs) + 2, desc="copy-paste sweep", disable=not self.progress, leave=False)
        scored = []
        rank = cal[: self.n_rank]  # candidates are ranked on (at most) n_rank calibration images
        rank_where = thin(where, self.n_rank_placements)
        for d in designs:
            s, p = sweep(rank, d.patch, rank_where)
            scored.append((float(s.any(0).float().mean()) + 1e-3 * float(p.max(0).values.mean()), d, (s, p)))
            bar.update(1)
        scored.sort(key=lambda t: -t[0])
        chosen = scored[0][1]
        cal_sp = scored[0][2] if len(rank) == len(cal) and len(rank_where) == len(where) else None
        lo, hi = pre.input_range
        gen = torch.Generator().manual_seed(self.seed + 1)
        size = chosen.patch.shape[-1]
        noise = PatchDesign(lo + (hi - lo) * torch.rand(pre.channels, size, size, generator=gen), "noise")
        natural = self.natural_crop(handle, images, target, size, gen)
        results: dict[str, dict[str, Any]] = {}
        best_idx = None
        for name, d, cal_res in (("design", chosen, cal_sp), ("noise", noise, None), ("natural", natural, None)):
            if cal_res is None:
                cal_res = sweep(cal, d.patch, where)
            t_res = sweep(test, d.patch, where)
            m = protocol_metrics(cal_res, t_res, where)
            if name == "design":
                best_idx = m["best_placement_index"]
                consistent_k = m["consistent_index"]
                t_succ = t_res[0]
            results[name] = {k: v for k, v in m.items() if k not in ("best_placement_index", "consistent_index")}
            if name != "design":
                bar.update(1)
        bar.close()
        # per source class successes / attempts (test split, best placement)
        per_class: dict[str, dict[str, int]] = {}
        tl = truth[test]
        any_succ = t_succ.any(0)
        for c in sorted(set(tl.tolist())):
            sel = tl == c
            name = class_names[c] if c < len(class_names) else str(c)
            per_class[name] = {"successes": int(any_succ[sel].sum()), "attempts": int(sel.sum()),
                               "successes_consistent": int(t_succ[consistent_k][sel].sum())}
        p_before = float(probs0[test, target].mean())
        out = {
            "target": class_names[target] if target < len(class_names) else target,
            "target_index": target,
            "n_attempts": int(len(test)),
            "n_calibration": int(len(cal)),
            "n_excluded_incorrect_or_target": int(len(images) - len(idx)),
            "success_consistent": results["design"]["success_consistent"],
            "success_best": results["design"]["success_best"],
            "control_noise": results["noise"]["success_best"],
            "control_noise_consistent": results["noise"]["success_consistent"],
            "control_natural": results["natural"]["success_best"],
            "control_natural_consistent": results["natural"]["success_consistent"],
            "p_target_before": p_before,
            "p_target_consistent": results["design"]["p_target_consistent"],
            "p_target_best": results["design"]["p_target_best"],
            "consistent_placement": results["design"]["consistent_placement"],
            "n_placements": len(where),
            "placement_sizes": sorted({w[2] for w in where}),
            "per_class": per_class,
            "design": chosen.to_json(),
            "feature_kind": "trojan trigger" if chosen.trojan else "natural feature",
            "content": chosen.description.get("content"),
            "candidates": [{"score_calibration": round(s, 4), **d.to_json()} for s, d, _ in scored],
            "controls": {"noise": results["noise"], "natural": results["natural"]},
            **info,
        }
        out["_tensors"] = {"patch": chosen.patch, "test_index": test, "best_index": best_idx, "where": where,
                           "candidates": [d for _, d, _ in scored]}
        return out

    def _split(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        perm = idx[torch.randperm(len(idx), generator=g)]
        n_cal = max(1, min(len(perm) - 1, round(self.calib_fraction * len(perm))))
        return perm[:n_cal], perm[n_cal:]

    def calibration_split(self, handle: ModelHandle, images: torch.Tensor, labels: torch.Tensor | None,
                          target: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(calibration, test) indices into `images` that `run_protocol` uses: only non-target images
        classified correctly before the patch, split by `calib_fraction` with `seed`."""
        probs0 = predictions(handle, images, batch_size=self.batch_size)
        pred0 = probs0.argmax(-1)
        truth = labels if labels is not None else pred0
        idx = torch.nonzero((pred0 == truth) & (truth != target)).flatten()
        return self._split(idx)

    def natural_crop(self, handle: ModelHandle, images: torch.Tensor, target: int, size: int, gen: torch.Generator) -> PatchDesign:
        """The natural-crop control: a random `size` px crop of a random non-target pool image."""
        pool, labels, _ = self._pool(handle, target, images)
        cand = torch.arange(len(pool)) if labels is None else torch.nonzero(labels != target).flatten()
        i = int(cand[int(torch.randint(len(cand), (1,), generator=gen))])
        h, w = pool.shape[-2:]
        y = int(torch.randint(h - size + 1, (1,), generator=gen))
        x = int(torch.randint(w - size + 1, (1,), generator=gen))
        return PatchDesign(pool[i, :, y:y + size, x:x + size].clone(), "natural", {"pool_index": i, "box": [y, x, y + size, x + size]})

    # -------------------------------------------------------------------- adversary API
    def generate(self, handle: ModelHandle, inputs: Any, target: Any) -> AdversarialExamples:
        """Run the protocol on `inputs` (images, or (images, labels)); `target` a class index or name.

        Returns the test-split attempts with the best placement pasted; `extra` holds the
        protocol metrics (success_consistent, success_best, controls, per class, design).
        """
        images, labels = _split_inputs(inputs)
        t = _class_index(handle, target)
        names = handle.preprocess.class_names if handle.preprocess is not None else ()
        res = self.run_protocol(handle, images, labels, t, class_names=names)
        tensors = res.pop("_tensors")
        test, best, where, patch = tensors["test_index"], tensors["best_index"], tensors["where"], tensors["patch"]
        originals = images[test]
        adv = torch.stack([paste(originals[i:i + 1], resize_patch(patch, where[int(best[i])][2]),
                                 where[int(best[i])][0], where[int(best[i])][1])[0] for i in range(len(test))]) \
            if len(test) else originals.clone()
        adv_pred = predictions(handle, adv).argmax(-1) if len(test) else torch.zeros(0, dtype=torch.long)
        return AdversarialExamples(
            method="copy-paste", inputs=originals, adversarial=adv, success=adv_pred == t, target=res["target"],
            patch=patch, original_pred=predictions(handle, originals).argmax(-1) if len(test) else adv_pred,
            adversarial_pred=adv_pred, extra=res,
        )

    def cli_run(self, handle: ModelHandle, args: argparse.Namespace) -> dict[str, Any]:
        """`workbench attack copy-paste MODEL --target T [--source S] [--n N] [--seed S] [--inputs F] [--out DIR]`.

        Source images: `--inputs` (safetensors with `images`, optional `labels`), or for a
        ShapesWorld model `--n` scenes of `--source` (default: every class but the target)
        drawn with `--seed`. Writes examples, `grid.png` (originals over patched) and
        `patch.png` under `--out`; returns the protocol metrics (success_consistent,
        success_best, control_noise, control_natural, n_attempts, per_class, design, ...).
        """
        import dataclasses

        target = getattr(args, "target", None)
        if target is None:
            raise WorkbenchError("copy-paste needs --target CLASS (a class name or index)")
        t = _class_index(handle, target)
        seed = int(getattr(args, "seed", 0) or 0)
        n = int(getattr(args, "n", None) or 200)
        inputs_file = getattr(args, "inputs", None)
        if inputs_file:
            from safetensors.torch import load_file

            try:
                data = load_file(str(inputs_file))
            except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's mistake
                raise WorkbenchError(f"cannot read --inputs {inputs_file}: {exc}; expected a safetensors file with 'images'") from None
            if "images" not in data:
                raise WorkbenchError(f"--inputs {inputs_file} has no 'images' tensor (has: {', '.join(data)})")
            inputs: Any = (data["images"].float(), data["labels"]) if "labels" in data else data["images"].float()
        else:
            if handle.info.get("world") is None:
                raise WorkbenchError("copy-paste on this model needs --inputs FILE.safetensors (images, optional labels); "
                                     "only ShapesWorld models can draw their own source images")
            from workbench.zoo.shapesnet import world_of

            world = world_of(handle)
            source = getattr(args, "source", None)
            classes = [c for c in world.classes if c != world.classes[t]] if not source else [str(source)]
            for c in classes:
                world.class_index(c)
            g = torch.Generator().manual_seed(seed + 1000)
            sample = world.sample(max(n, 8), generator=g, classes=classes, context_mode="none")
            inputs = (world.render(sample), sample.labels)
        attack = dataclasses.replace(self, progress=True)
        ex = attack.generate(handle, inputs, t)
        out_dir = getattr(args, "out", None)
        if out_dir:
            from workbench.featvis import save_image_grid

            rng = handle.preprocess.input_range  # type: ignore[union-attr]
            ex.save(out_dir)
            k = min(8, len(ex))
            if k:
                save_image_grid(torch.cat([ex.inputs[:k], ex.adversarial[:k]]), Path(out_dir) / "grid.png", ncol=k, input_range=rng)
            save_image_grid(ex.patch[None], Path(out_dir) / "patch.png", input_range=rng)
        result = dict(ex.extra)
        result["out"] = out_dir
        return result


def _split_inputs(inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(inputs, torch.Tensor):
        return inputs, None
    if isinstance(inputs, (tuple, list)) and len(inputs) == 2 and isinstance(inputs[0], torch.Tensor):
        labels = torch.as_tensor(inputs[1]).long().flatten()
        if labels.numel() != len(inputs[0]):
            raise WorkbenchError(f"{len(inputs[0])} images but {labels.numel()} labels")
        return inputs[0], labels
    raise WorkbenchError("copy-paste inputs must be an image tensor (N, C, H, W) or (images, labels)")


def _class_index(handle: ModelHandle, target: Any) -> int:
    names = handle.preprocess.class_names if handle.preprocess is not None else ()
    if isinstance(target, str) and not target.lstrip("-").isdigit():
        if target not in names:
            raise WorkbenchError(f"unknown target class {target!r}; classes: {', '.join(names) or '(unnamed: give an index)'}")
        return names.index(target)
    return int(target)


def _scene_variants(scene: Any, descriptions: list[dict[str, Any]], size: int, param: Any, world: Any, own: str,
                    input_range: tuple[float, float]) -> list[PatchDesign]:
    """The two halves of each scene design: its background alone and its object alone (on grey).

    A feature visualization often combines a texture and an object; either may be the part
    the unit responds to, so each is offered as its own candidate (same interpretation).
    """
    import copy

    from workbench.featvis.param import render_scene
    from workbench.worlds.shapesworld import BACKGROUND_PALETTE, TEXTURES

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
            out.append(PatchDesign(imgs[i].clone(), "featvis",
                                   {"scene": desc, "part": variant, "resembles_trigger_of": _resembles(desc, world)},
                                   target_coverage=_coverage_from_description(desc, own), trojan=_matching_trojan(desc, world, own)))
    return out


def _content(d: PatchDesign, world: Any) -> str:
    """What a design shows, by ground truth: a trojan trigger, another class's object, or context."""
    if d.trojan:
        return "trojan trigger"
    if world is None:
        return "unknown (no ground truth)"
    desc = d.description
    if d.source == "featvis":
        shapes = [o.get("shape") for o in desc.get("scene", {}).get("objects", [])]
        return "another class's object" if any(s in world.classes for s in shapes) else "context feature"
    shows = desc.get("shows")
    if shows and shows["pixel_share"].get("main", 0.0) >= 0.3:
        return "another class's object"
    return "context feature"


def _crop_content(masks: dict[str, torch.Tensor], j: int, box: list[int], sample: Any, world: Any) -> dict[str, Any]:
    """Ground truth of what an exemplar crop shows: share of its pixels per role and shape,
    the main object's class, and the background texture."""
    from workbench.worlds.shapesworld import SHAPES, TEXTURES

    y0, x0, y1, x1 = box
    share = {}
    for key in ("main", "distractor", "context", "background"):
        share[key] = round(float(masks[key][j, y0:y1, x0:x1].float().mean()), 3)
    shapes = {s: round(float(masks[s][j, y0:y1, x0:x1].float().mean()), 3) for s in SHAPES
              if float(masks[s][j, y0:y1, x0:x1].float().mean()) > 0.02}
    return {"pixel_share": share, "shapes": shapes, "main_class": world.classes[int(sample.labels[j])],
            "texture": TEXTURES[int(sample.scene.bg_weights[j].argmax())]}


def _coverage_from_description(desc: dict[str, Any], own: str) -> float:
    """Objects whose snapped shape is the target's own cover their area share; others cover nothing."""
    import math

    cov = 0.0
    for obj in desc.get("objects", []):
        if obj.get("shape") == own:
            r = float(obj.get("size", 0.0))
            cov += min(1.0, math.pi * r * r / 4.0)  # patch spans [-1, 1]^2 = area 4
    return round(cov, 4)


def _matching_trojan(desc: dict[str, Any], world: Any, target: str) -> str | None:
    """Name of an implanted trojan for `target` whose trigger this scene design reproduces
    (a natural trigger's shape, a style trigger's texture); other triggers' look-alikes are
    noted in the description instead (see `_resembles`)."""
    for name in _resembles(desc, world):
        if world.trojans.get(name).target == target:
            return name
    return None


def _resembles(desc: dict[str, Any], world: Any) -> list[str]:
    out = []
    for t in world.trojans:
        trig = t.trigger
        if t.kind == "natural" and any(o.get("shape") == trig.shape for o in desc.get("objects", [])):
            out.append(t.name)
        if t.kind == "style" and desc.get("background", {}).get("texture") == trig.texture:
            out.append(t.name)
    return out
