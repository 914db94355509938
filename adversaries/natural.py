"""Natural adversarial examples: adversarial filtering (ImageNet-A) and SNAFUE's natural-patch search.

*Adversarial filtering* generates many natural ShapesWorld scenes and keeps those the model
gets confidently wrong. Because every scene is its own ground truth, each failure comes
with the parameters that describe it (class, colour, background texture, context and
distractor objects, size, placement), and the failures are summarized by which parameter
values are over-represented among them relative to all scenes (the lift), which is how a
spurious rule or a context shortcut shows up without anyone looking for it.

*SNAFUE* (Casper et al.) finds natural adversarial features: train a synthetic adversarial
patch for a source -> target pair taken from the confusion matrix, embed it (the model's
latent for source images carrying it; by default the input of the last linear layer),
search a pool of natural patches (crops of rendered scenes and rendered small objects) for
the nearest embeddings, and measure those natural patches: target confidence and fooling
rate against the unpatched baseline and against random natural patches of the same size.

    AdversarialFiltering(n_scenes=4000).generate(handle, None, None).extra["over_represented"]
    SNAFUE().generate(handle, None, None).extra["pairs"]     # pairs from the confusion matrix
    snafue_fooling_rates(handle, source="circle", target="hexagon", seeds=(0, 1, 2))
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from adversaries.adversarial_patch import AdversarialPatch, apply_patch, patch_pixels, sample_placements, train_patch
from adversaries.base import AdversarialExamples
from adversaries.feature_level import source_scenes
from adversaries.registry import register
from workbench.classifier import (
    class_name,
    from_unit,
    num_classes,
    predict,
    preprocess_of,
    render_for,
    resolve_class,
    split_inputs,
    world_or_default,
)
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.hooks import capture
from workbench.worlds.scene import (
    BACKGROUND_PALETTE,
    CLASS_SHAPES,
    PALETTE,
    ROLE_CONTEXT,
    ROLE_DISTRACTOR,
    ROLE_MAIN,
    SHAPES,
    TEXTURES,
    empty_scene,
    render,
)
from workbench.worlds.shapesworld import Sample

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# Shared: confusion matrix and labelled inputs
# --------------------------------------------------------------------------------------


def confusion_matrix(handle: ModelHandle, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Counts `(classes, classes)`: row = true class, column = predicted class."""
    pred, _ = predict(handle, images)
    k = num_classes(handle)
    return torch.bincount(labels.long() * k + pred, minlength=k * k).view(k, k)


def confusion_pairs(matrix: torch.Tensor, *, k: int = 3, exclude: tuple[int, ...] = ()) -> list[tuple[int, int, float]]:
    """The `k` most confused (source, target, rate) pairs, off the diagonal, by row-normalized rate."""
    rates = matrix.float() / matrix.sum(1, keepdim=True).clamp_min(1)
    rates = rates.clone()
    rates.fill_diagonal_(-1)
    for c in exclude:
        rates[:, c] = -1
    order = rates.flatten().argsort(descending=True)[:k]
    n = matrix.shape[0]
    return [(int(i) // n, int(i) % n, float(rates.flatten()[i])) for i in order if float(rates.flatten()[i]) >= 0]


def _labelled_scenes(handle: ModelHandle, inputs: Any, *, n: int, seed: int, **sample_kw: Any) -> tuple[torch.Tensor, torch.Tensor, Sample | None]:
    """Images, labels and scenes: sampled from the handle's world (None), given as a Sample, or given as (images, labels)."""
    world = world_or_default(handle)
    k = num_classes(handle)
    if inputs is None:
        if not isinstance(handle.info.get("world"), dict):
            raise WorkbenchError(f"{handle.spec} has no ShapesWorld of its own; pass (images, labels) or a ShapesWorld "
                                 "Sample whose labels are this model's classes")
        sample = world.sample(n, generator=torch.Generator().manual_seed(seed), **sample_kw)
        return render_for(handle, sample, softness=world.config.softness), sample.labels.clone(), sample
    if isinstance(inputs, Sample):
        if len(inputs) and int(inputs.labels.max()) >= k:
            raise WorkbenchError(f"scene labels reach {int(inputs.labels.max())}; this model has classes 0..{k - 1}")
        return render_for(handle, inputs, softness=world.config.softness), inputs.labels.clone(), inputs
    images, labels = split_inputs(handle, inputs)
    if labels is None:
        raise WorkbenchError("this method needs labels: pass (images, labels), a ShapesWorld Sample, or None to sample scenes")
    return images, labels, None


# --------------------------------------------------------------------------------------
# Adversarial filtering
# --------------------------------------------------------------------------------------


def scene_features(handle: ModelHandle, sample: Sample) -> list[dict[str, Any]]:
    """Per scene, the parameters that describe it (JSON-ready): class, colour, texture, objects, size, offset."""
    world = world_or_default(handle)
    cfg = world.config
    sc = sample.scene
    colors = list(PALETTE)
    lo, hi = cfg.main_size
    out = []
    shape_of = sc.shape_weights.argmax(-1)
    for i in range(len(sample)):
        role = sc.role[i]
        present = sc.opacity[i] > 0
        main = torch.nonzero((role == ROLE_MAIN) & present).flatten()
        m = int(main[0]) if main.numel() else None
        distractors = [SHAPES[int(shape_of[i, j])] for j in torch.nonzero((role == ROLE_DISTRACTOR) & present).flatten()]
        context = [rule.description or f"{rule.kind} of {rule.cls}" for r, rule in enumerate(cfg.context)
                   if bool(sample.context[i, r])]
        context_objects = [SHAPES[int(shape_of[i, j])] for j in torch.nonzero((role == ROLE_CONTEXT) & present).flatten()]
        size = float(sc.size[i, m]) if m is not None else 0.0
        third = (hi - lo) / 3
        size_word = "small" if size < lo + third else ("medium" if size < lo + 2 * third else "large")
        center = sc.center[i, m].tolist() if m is not None else [0.0, 0.0]
        offset = "off-centre" if max(abs(center[0]), abs(center[1])) > 0.15 else "near-centre"
        out.append({
            "class": world.classes[int(sample.labels[i])] if int(sample.labels[i]) < len(world.classes) else str(int(sample.labels[i])),
            "color": colors[int(sample.colors[i])] if 0 <= int(sample.colors[i]) < len(colors) else "?",
            "texture": TEXTURES[int(sc.bg_weights[i].argmax())],
            "context": context,
            "context_objects": context_objects,
            "distractors": distractors,
            "size": size_word,
            "offset": offset,
            "center": [round(c, 3) for c in center],
        })
    return out


def _feature_tokens(f: dict[str, Any]) -> set[str]:
    tokens = {f"class={f['class']}", f"color={f['color']}", f"texture={f['texture']}", f"size={f['size']}",
              f"offset={f['offset']}", f"n_small_objects={len(f['distractors']) + len(f['context_objects'])}"}
    tokens |= {f"context={c}" for c in f["context"]}
    tokens |= {f"distractor={d}" for d in f["distractors"]}
    tokens |= {f"class+color={f['class']}+{f['color']}"}
    return tokens


def over_represented(features: list[dict[str, Any]], failed: torch.Tensor, *, min_count: int = 3, top: int = 15) -> list[dict[str, Any]]:
    """Parameter values ranked by lift = P(value | failure) / P(value | all scenes)."""
    n, n_fail = len(features), int(failed.sum())
    if n_fail == 0:
        return []
    all_counts: Counter[str] = Counter()
    fail_counts: Counter[str] = Counter()
    for f, bad in zip(features, failed.tolist()):
        toks = _feature_tokens(f)
        all_counts.update(toks)
        if bad:
            fail_counts.update(toks)
    rows = []
    for tok, c_fail in fail_counts.items():
        if c_fail < min_count:
            continue
        c_all = all_counts[tok]
        share_fail, share_all = c_fail / n_fail, c_all / n
        rows.append({"feature": tok, "n_failures_with": c_fail, "n_scenes_with": c_all,
                     "share_of_failures": round(share_fail, 4), "share_of_scenes": round(share_all, 4),
                     "lift": round(share_fail / share_all, 3), "failure_rate_given": round(c_fail / c_all, 4)})
    rows.sort(key=lambda r: (-r["lift"], -r["n_failures_with"]))
    return rows[:top]


def _describe_scene(f: dict[str, Any]) -> str:
    extra = f["context_objects"] + f["distractors"]
    objs = f" with {', '.join(extra)}" if extra else ""
    bg = "a plain background" if f["texture"] == "plain" else f"{f['texture']}"
    return f"a {f['size']} {f['color']} {f['class']} on {bg}{objs}"


@register("adversarial-filtering")
@dataclass(frozen=True)
class AdversarialFiltering:
    """Keep the natural scenes a model gets confidently wrong (ImageNet-A's filtering).

    `n_scenes` scenes are drawn from the model's ShapesWorld (`color_mode`,
    `context_mode`, `distractors` as in `ShapesWorld.sample`; "uniform" colours break
    the spurious rule, which is where a shortcut shows up). A scene is kept when the
    prediction is wrong with probability >= `confidence` (and equals `target` if one is
    given). `inputs` may also be a Sample or `(images, labels)`; without scenes there are
    no parameters to explain the failures with.
    """

    n_scenes: int = 2000
    confidence: float = 0.8
    color_mode: str = "natural"
    context_mode: str = "natural"
    distractors: bool = True
    max_keep: int = 64
    min_count: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.color_mode not in ("natural", "disagree", "uniform"):
            raise WorkbenchError(f"color_mode {self.color_mode!r}: expected natural, disagree or uniform")
        if self.context_mode not in ("natural", "none"):
            raise WorkbenchError(f"context_mode {self.context_mode!r}: expected natural or none")
        if not 0 <= self.confidence < 1:
            raise WorkbenchError(f"confidence {self.confidence}: expected 0 <= confidence < 1")
        if self.n_scenes < 1 or self.max_keep < 1:
            raise WorkbenchError("n_scenes and max_keep must be >= 1")

    def generate(self, handle: ModelHandle, inputs: Any = None, target: Any = None) -> AdversarialExamples:
        tgt = resolve_class(handle, target)
        images, labels, sample = _labelled_scenes(
            handle, inputs, n=self.n_scenes, seed=self.seed, color_mode=self.color_mode,
            context_mode=self.context_mode, distractors=self.distractors)
        pred, prob = predict(handle, images)
        conf = prob.max(1).values
        wrong = pred != labels
        keep = wrong & (conf >= self.confidence)
        if tgt is not None:
            keep = keep & (pred == tgt)
        idx = torch.nonzero(keep).flatten()
        order = idx[conf[idx].argsort(descending=True)][: self.max_keep]
        features = scene_features(handle, sample) if sample is not None else None
        examples = []
        for i in order.tolist():
            row: dict[str, Any] = {"index": i, "true": class_name(handle, int(labels[i])),
                                   "predicted": class_name(handle, int(pred[i])), "confidence": round(float(conf[i]), 4)}
            if features is not None:
                row["params"] = features[i]
                row["description"] = f"{_describe_scene(features[i])} -> predicted {row['predicted']} ({row['confidence']:.2f})"
            examples.append(row)
        n = len(labels)
        extra: dict[str, Any] = {
            "config": asdict(self),
            "n_scenes": n,
            "accuracy": float((~wrong).float().mean()),
            "n_wrong": int(wrong.sum()),
            "n_confident_wrong": int(keep.sum()),
            "confident_error_rate": float(keep.float().mean()),
            "over_represented": over_represented(features, keep, min_count=self.min_count) if features is not None else [],
            "confusions": [[class_name(handle, s), class_name(handle, t), c] for (s, t), c in
                           Counter(zip(labels[keep].tolist(), pred[keep].tolist())).most_common(10)],
            "examples": examples,
            "true_labels": labels[order].tolist(),
        }
        kept = images[order.to(images.device)].detach().cpu()
        return AdversarialExamples(
            method="adversarial-filtering", inputs=kept, adversarial=kept.clone(),
            success=torch.ones(len(order), dtype=torch.bool), target=tgt,
            original_pred=labels[order], adversarial_pred=pred[order], extra=extra,
        )


# --------------------------------------------------------------------------------------
# SNAFUE
# --------------------------------------------------------------------------------------


def default_embedding_site(handle: ModelHandle) -> str:
    """The input of the last `nn.Linear` (the penultimate representation), as a site name."""
    last = None
    for name, module in handle.model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise WorkbenchError(f"{handle.spec} has no nn.Linear head; pass site=... (any module name, or NAME:input)")
    return f"{last}:input"


@torch.no_grad()
def embed(handle: ModelHandle, images: torch.Tensor, site: str, *, batch_size: int = 512) -> torch.Tensor:
    """Flattened activations at `site` for images in the declared range, `(N, D)` on the CPU."""
    from workbench.classifier import eval_mode, to_model_input

    pre = preprocess_of(handle)
    out = []
    with eval_mode(handle.model):
        for i in range(0, len(images), batch_size):
            with capture(handle, [site], stop=True) as acts:
                handle.model(to_model_input(pre, images[i:i + batch_size].to(handle.device)))
            out.append(acts[site].flatten(1).float().cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class NaturalPatchPool:
    """Natural patches `(P, C, s, s)` in the model's range, with a description of each."""

    patches: torch.Tensor
    descriptions: list[str]
    kinds: list[str]


def natural_patch_pool(handle: ModelHandle, *, side: int, n: int, seed: int, exclude_shape: str | None = None,
                       max_exclude_cover: float = 0.2) -> NaturalPatchPool:
    """Half crops of rendered natural scenes, half small objects rendered alone on natural backgrounds.

    Crops showing more than `max_exclude_cover` of a main object of shape `exclude_shape`,
    and objects of that shape, are left out (a natural patch must not depict the target).
    """
    pre = preprocess_of(handle)
    world = world_or_default(handle)
    g = torch.Generator().manual_seed(seed)
    n_crops = n // 2
    # crops
    scenes = world.sample(2 * n_crops, generator=g)
    r = render(scenes.scene, height=pre.height, width=pre.width, softness=world.config.softness, masks=True)
    assert r.object_masks is not None
    shape_of = scenes.scene.shape_weights.argmax(-1)
    bad_cover = torch.zeros(len(scenes), pre.height, pre.width)
    if exclude_shape is not None and exclude_shape in SHAPES:
        sel = ((shape_of == SHAPES.index(exclude_shape)) & (scenes.scene.opacity > 0)).float()
        bad_cover = (r.object_masks * sel[..., None, None]).sum(1)
    imgs = from_unit(pre, r.images)
    patches, desc, kinds = [], [], []
    for i in range(len(scenes)):
        if len(patches) >= n_crops:
            break
        y0 = int(torch.randint(pre.height - side + 1, (1,), generator=g))
        x0 = int(torch.randint(pre.width - side + 1, (1,), generator=g))
        if float(bad_cover[i, y0:y0 + side, x0:x0 + side].mean()) > max_exclude_cover:
            continue
        patches.append(imgs[i, :, y0:y0 + side, x0:x0 + side])
        cls = world.classes[int(scenes.labels[i])]
        desc.append(f"crop of a {cls} scene at rows {y0}-{y0 + side}, cols {x0}-{x0 + side}")
        kinds.append("crop")
    # small objects alone on a natural background, rendered at the patch size
    shapes = [s for s in SHAPES if s != exclude_shape]
    colors, bgs = list(PALETTE), list(BACKGROUND_PALETTE)
    m = n - len(patches)
    sid = torch.randint(len(shapes), (m,), generator=g)
    cid = torch.randint(len(colors), (m,), generator=g)
    bid = torch.randint(len(bgs), (m,), generator=g)
    tex = [t for t in world.config.natural_textures]
    tid = torch.randint(len(tex), (m,), generator=g)
    scene = empty_scene(m)
    scene = scene.replace(
        bg_weights=torch.nn.functional.one_hot(torch.tensor([TEXTURES.index(tex[int(t)]) for t in tid], dtype=torch.long),
                                               len(TEXTURES)).float(),
        bg_colors=torch.stack([torch.tensor(BACKGROUND_PALETTE[bgs[int(b)]]) for b in bid])[:, None].expand(m, 2, 3).clone()
        * torch.tensor([1.0, 0.7]).view(1, 2, 1),
        bg_noise=torch.randn(m, 8, 8, generator=g),
    )
    w = torch.nn.functional.one_hot(torch.tensor([SHAPES.index(shapes[int(s)]) for s in sid]), len(SHAPES)).float()
    scene = scene.add_object(shape=w, center=(torch.rand(m, 2, generator=g) - 0.5) * 0.3,
                             size=0.55 + 0.3 * torch.rand(m, generator=g),
                             color=torch.stack([torch.tensor(PALETTE[colors[int(c)]]) for c in cid]),
                             rotation=torch.rand(m, generator=g) * 6.283)
    objs = from_unit(pre, render(scene, height=side, width=side, softness=world.config.softness).images)
    for j in range(m):
        patches.append(objs[j])
        t = tex[int(tid[j])]
        desc.append(f"a {colors[int(cid[j])]} {shapes[int(sid[j])]} on {'a plain' if t == 'plain' else t} {bgs[int(bid[j])]} background")
        kinds.append("object")
    return NaturalPatchPool(torch.stack(patches), desc, kinds)


@register("snafue")
@dataclass(frozen=True)
class SNAFUE:
    """Search natural patches whose embedding matches a synthetic adversarial patch.

    Pairs: `target` given -> one pair (source = the inputs' labels or predictions);
    `target` None -> the `n_pairs` most confused pairs of the confusion matrix on
    `n_confusion` natural scenes, each attacked on `n_source` correctly classified source
    scenes. `site`: where embeddings are read (default: the input of the last linear
    layer). The `top_k` nearest natural patches (cosine) are measured at
    `eval_placements` random placements per image, beside `top_k` random pool patches
    (control) and the unpatched baseline. `n_synthetic` > 1 trains that many synthetic
    patches (restarts, seeds `seed + 7919 r`), each bringing its own `top_k`
    neighbours: one synthetic patch is one local optimum, and its neighbours can miss a
    feature the model responds to that another restart finds. `extra["top_patch_images"]`
    holds the measured natural patches (first pair) in the order of `extra["top_patches"]`.
    """

    patch_frac: float = 0.3
    pool_size: int = 400
    top_k: int = 5
    site: str | None = None
    synthetic_steps: int = 150
    synthetic_lr: float = 0.2
    n_embed_images: int = 16
    eval_placements: int = 2
    n_pairs: int = 3
    n_confusion: int = 2000
    n_source: int = 48
    exclude_target_shape: bool = True
    n_synthetic: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pool_size < 2 * self.top_k or self.top_k < 1:
            raise WorkbenchError(f"pool_size {self.pool_size} must be at least 2 x top_k ({self.top_k}) and top_k >= 1")
        if self.n_synthetic < 1:
            raise WorkbenchError(f"n_synthetic {self.n_synthetic}: expected at least 1 synthetic patch")

    def generate(self, handle: ModelHandle, inputs: Any = None, target: Any = None) -> AdversarialExamples:
        tgt = resolve_class(handle, target)
        pairs: list[tuple[torch.Tensor, int, str]] = []
        confusion = None
        if tgt is not None:
            if inputs is None:
                raise WorkbenchError("with a target, pass the source images (or a Sample); without one, pairs come "
                                     "from the confusion matrix")
            if isinstance(inputs, Sample):
                images = render_for(handle, inputs, softness=world_or_default(handle).config.softness)
                labels: torch.Tensor | None = inputs.labels
            else:
                images, labels = split_inputs(handle, inputs)
            src = labels if labels is not None else predict(handle, images)[0]
            names = sorted({class_name(handle, int(c)) for c in src})
            pairs.append((images, tgt, "/".join(names)))
        else:
            images, labels, _ = _labelled_scenes(handle, inputs, n=self.n_confusion, seed=self.seed)
            confusion = confusion_matrix(handle, images, labels)
            for s, t, rate in confusion_pairs(confusion, k=self.n_pairs):
                log.info("snafue pair %s -> %s (confusion rate %.4f)", class_name(handle, s), class_name(handle, t), rate)
                src_imgs = render_for(handle, source_scenes(handle, s, self.n_source, seed=self.seed + 31 * s),
                                      softness=world_or_default(handle).config.softness)
                pairs.append((src_imgs, t, class_name(handle, s)))
        results = [self._one_pair(handle, imgs, t, src_name) for imgs, t, src_name in pairs]
        first = results[0]
        extra = {"config": asdict(self), "pairs": [r["metrics"] for r in results]}
        if confusion is not None:
            extra["confusion_matrix"] = confusion.tolist()
        extra.update({k: v for k, v in first["metrics"].items() if k not in ("top_patches",)})
        extra["top_patches"] = first["metrics"]["top_patches"]
        extra["top_patch_images"] = first["top_images"].cpu()
        return AdversarialExamples(
            method="snafue", inputs=first["images"].cpu(), adversarial=first["adversarial"].cpu(), success=first["success"],
            target=first["target"], patch=first["patch"].cpu(), loss_trace=first["trace"],
            original_pred=first["clean_pred"], adversarial_pred=first["adv_pred"], extra=extra,
        )

    def _one_pair(self, handle: ModelHandle, images: torch.Tensor, tgt: int, source_name: str) -> dict[str, Any]:
        pre = preprocess_of(handle)
        n = images.shape[0]
        side = patch_pixels(pre, frac=self.patch_frac)
        site = self.site or default_embedding_site(handle)
        ref = torch.full((n,), tgt, dtype=torch.long, device=images.device)
        syn_cfg = AdversarialPatch(patch_frac=self.patch_frac, scale_range=(1.0, 1.0), rotation_max=0.0,
                                   steps=self.synthetic_steps, lr=self.synthetic_lr, seed=self.seed)
        synthetics, trace = [], []
        for r in range(self.n_synthetic):
            cfg_r = syn_cfg if r == 0 else replace(syn_cfg, seed=self.seed + 7919 * r)
            patch_r, trace_r, _ = train_patch(handle, images, ref, targeted=True, side=side, config=cfg_r)
            synthetics.append(patch_r)
            if r == 0:
                trace = trace_r  # the loss trace reported is the first restart's
        synthetic = synthetics[0]
        g = torch.Generator().manual_seed(self.seed + 17)
        m = min(self.n_embed_images, n)
        emb_imgs = images[:m]
        emb_pl = sample_placements(m, height=pre.height, width=pre.width, patch_hw=(side, side), generator=g)

        def patch_embedding(patches: torch.Tensor) -> torch.Tensor:
            # each patch pasted into the same m images at the same places; mean latent per patch
            out = []
            for chunk in patches.split(max(1, 512 // m)):
                k = chunk.shape[0]
                x = apply_patch(emb_imgs.repeat(k, 1, 1, 1), chunk.repeat_interleave(m, 0).to(images.device),
                                emb_pl.repeat(k, 1))[0]
                out.append(embed(handle, x, site).view(k, m, -1).mean(1))
            return torch.cat(out)

        name = class_name(handle, tgt)
        exclude = name if (self.exclude_target_shape and name in CLASS_SHAPES and isinstance(handle.info.get("world"), dict)) else None
        pool = natural_patch_pool(handle, side=side, n=self.pool_size, seed=self.seed + 101, exclude_shape=exclude)
        target_emb = patch_embedding(torch.stack(synthetics))
        pool_emb = patch_embedding(pool.patches)
        sims = torch.nn.functional.cosine_similarity(pool_emb[None], target_emb[:, None], dim=2)  # (restarts, pool)
        sim = sims.max(0).values
        picked: list[int] = []
        restart_of: dict[int, int] = {}
        for r, row in enumerate(sims):  # each restart's top_k, in order, without repeats
            for i in row.argsort(descending=True)[: self.top_k].tolist():
                if i not in restart_of:
                    picked.append(i)
                    restart_of[i] = r
        top = torch.tensor(picked, dtype=torch.long)
        rand = torch.randperm(len(pool.patches), generator=g)[: self.top_k]
        pls = [sample_placements(n, height=pre.height, width=pre.width, patch_hw=(side, side), generator=g)
               for _ in range(self.eval_placements)]

        def measure(patch: torch.Tensor) -> tuple[float, float, torch.Tensor, torch.Tensor, torch.Tensor]:
            fool, conf = [], []
            first = None
            for pl in pls:
                adv = apply_patch(images, patch.to(images.device), pl)[0]
                pred, prob = predict(handle, adv)
                fool.append(float((pred == tgt).float().mean()))
                conf.append(float(prob[:, tgt].mean()))
                if first is None:
                    first = (adv, pred)
            assert first is not None
            return sum(fool) / len(fool), sum(conf) / len(conf), first[0], first[1], first[1] == tgt

        clean_pred, clean_prob = predict(handle, images)
        base_fool = float((clean_pred == tgt).float().mean())
        base_conf = float(clean_prob[:, tgt].mean())
        syn_fool, syn_conf, _, _, _ = measure(synthetic)
        top_rows, best = [], None
        for i in top.tolist():
            f, c, adv, pred, ok = measure(pool.patches[i])
            top_rows.append({"index": i, "similarity": round(float(sim[i]), 4), "fooling_rate": f, "target_confidence": c,
                             "target_confidence_gain": c - base_conf, "restart": restart_of[i],
                             "description": pool.descriptions[i], "kind": pool.kinds[i]})
            if best is None or f > best[0]:
                best = (f, i, adv, pred, ok)
        ctrl = [measure(pool.patches[i])[:2] for i in rand.tolist()]
        assert best is not None
        metrics = {
            "source": source_name, "target": name, "n_images": n, "site": site, "patch_side_pixels": side,
            "baseline_fooling_rate": base_fool, "baseline_target_confidence": base_conf,
            "synthetic_fooling_rate": syn_fool, "synthetic_target_confidence": syn_conf,
            "natural_fooling_rate_mean": sum(r["fooling_rate"] for r in top_rows) / len(top_rows),
            "natural_target_confidence_mean": sum(r["target_confidence"] for r in top_rows) / len(top_rows),
            "natural_fooling_rate_best": best[0],
            "control_random_natural_fooling_rate": sum(c[0] for c in ctrl) / len(ctrl),
            "control_random_natural_target_confidence": sum(c[1] for c in ctrl) / len(ctrl),
            "fooling_rate_increase": sum(r["fooling_rate"] for r in top_rows) / len(top_rows) - base_fool,
            "best_description": pool.descriptions[best[1]],
            "top_patches": top_rows,
        }
        return {"metrics": metrics, "images": images, "adversarial": best[2], "success": best[4], "target": tgt,
                "patch": pool.patches[best[1]], "trace": trace, "clean_pred": clean_pred, "adv_pred": best[3],
                "top_images": pool.patches[top]}


def snafue_fooling_rates(handle: ModelHandle, *, source: int | str, target: int | str, n: int = 48,
                         seeds: tuple[int, ...] = (0, 1, 2), config: SNAFUE | None = None) -> dict[str, Any]:
    """Case study 8: SNAFUE natural patches vs random natural patches vs no patch, over seeds.

    `predicted` is the synthetic patch's fooling rate (what the embedding match aims at);
    `measured` the mean fooling rate of the top-k natural patches on fresh source images.
    """
    cfg = SNAFUE() if config is None else config
    tgt = resolve_class(handle, target)
    assert tgt is not None
    soft = world_or_default(handle).config.softness
    rows = []
    for seed in seeds:
        run = SNAFUE(**{**asdict(cfg), "seed": seed})
        images = render_for(handle, source_scenes(handle, source, n, seed=3 * seed + 200), softness=soft)
        m = run._one_pair(handle, images, tgt, class_name(handle, resolve_class(handle, source) or 0))["metrics"]
        rows.append({"seed": seed, "predicted": m["synthetic_fooling_rate"], "measured": m["natural_fooling_rate_mean"],
                     "best": m["natural_fooling_rate_best"], "control_random_natural": m["control_random_natural_fooling_rate"],
                     "baseline": m["baseline_fooling_rate"], "best_description": m["best_description"]})
    keys = ("predicted", "measured", "best", "control_random_natural", "baseline")
    return {"source": str(source), "target": class_name(handle, tgt), "n": n, "seeds": list(seeds), "rows": rows,
            "mean": {k: sum(r[k] for r in rows) / len(rows) for k in keys}}


__all__ = [
    "AdversarialFiltering", "NaturalPatchPool", "SNAFUE", "confusion_matrix", "confusion_pairs", "default_embedding_site",
    "embed", "natural_patch_pool", "over_represented", "scene_features", "snafue_fooling_rates",
]
