"""Trojan rediscovery: can feature-synthesis methods reveal implanted triggers? (Casper et al. 2023)

For each implanted trojan the methods know only the target class (and, for class-universal
trojans, the source class they attack, as the images they synthesize against); the trigger
stays hidden. Each method synthesizes images ("views"); an automatic judge then answers an
8-way multiple choice: the true trigger among 7 distractor triggers of the same kind (patch,
style or natural feature), the distractors being the library designs most similar to what
the method synthesized (so the hardest ones). Every view votes for the option it is most
similar to; the score is the share of votes for the true trigger (chance 1/8 = 0.125; the
published human best is 0.47, all methods together 0.49, CLIP as judge 0.06-0.21).

Options can also be given as they are (`options=`: e.g. `workbench.worlds.trojans.
near_miss_options`, generated from a seed, with near misses of the true trigger's colours and
form): then no option comes from the library and none is chosen by looking at the views, which
is how a model whose triggers are not library designs is asked.

The judge never saw a trojan: it is the colour content of the image (soft assignment to the
ShapesWorld palette, a fixed model) plus the attribute network of `workbench.judge`, trained
on clean scenes to name shapes, textures and patch patterns. Option pictures are the
triggers' canonical renderings (`TriggerDesign.example`), compared on their trigger pixels.

Methods are a table (`METHODS`): name -> function(handle, trojan, world, budget, seed) ->
views. Feature visualization of the target logit and copy/paste search are built here; the
feature-level adversary, natural search (SNAFUE, adversarial filtering), the scene-vocabulary
search and the adversarial patch come from the `adversaries` registry and are skipped, with
a note, when that generator is not installed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from workbench.handle import ModelHandle
    from workbench.judge import Judge
    from workbench.worlds.shapesworld import ShapesWorld
    from workbench.worlds.trojans import TriggerDesign, Trojan, TrojanSet

log = logging.getLogger(__name__)

CHANCE = 0.125
HUMAN_BEST = 0.47
Budget = Literal["tiny", "quick", "full"]


@dataclass
class Synthesis:
    """What one method made for one trojan: views (M, 3, H, W) in [0, 1] and notes.

    `facets` (optional, one per view): "natural", "style" or "patch" when a view shows only
    that kind of feature (an object, a background, a patch); a multiple-choice question about
    one kind of trigger is then judged on the views of that facet (all views when none match).
    `weights` (optional, one per view, >= 0): how much the method's own measurement says each
    view matters (e.g. how much it raised the target's probability on source images); votes
    count in proportion (all equal when None).
    """

    views: torch.Tensor
    notes: dict[str, Any] = field(default_factory=dict)
    facets: list[str] | None = None
    weights: torch.Tensor | None = None

    def _keep(self, kind: str) -> list[int] | None:
        if self.facets is None:
            return None
        keep = [i for i, f in enumerate(self.facets) if f in (kind, "any")]
        return keep or None

    def for_kind(self, kind: str) -> torch.Tensor:
        keep = self._keep(kind)
        return self.views if keep is None else self.views[keep]

    def weights_for_kind(self, kind: str) -> torch.Tensor | None:
        """The views' evidence weights (see `multiple_choice`) for the views `for_kind` returns."""
        if self.weights is None:
            return None
        keep = self._keep(kind)
        return self.weights if keep is None else self.weights[keep]


# --- source images --------------------------------------------------------------------------

def source_images(handle: ModelHandle, world: ShapesWorld, trojan: Trojan, n: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean scenes of the trojan's source class (every non-target class when universal), correct only."""
    from workbench.classifier import predict

    classes = [trojan.source] if trojan.source else [c for c in world.classes if c != trojan.target]
    g = torch.Generator().manual_seed(seed)
    s = world.sample(n * 2, generator=g, classes=classes, context_mode="none")
    x = world.render(s)
    assert isinstance(x, torch.Tensor)
    ok = predict(handle, x)[0] == s.labels
    keep = torch.nonzero(ok).flatten()[:n]
    return x[keep], s.labels[keep]


def _budget(budget: Budget, tiny: Any, quick: Any, full: Any) -> Any:
    return {"tiny": tiny, "quick": quick, "full": full}[budget]


# --- the methods ----------------------------------------------------------------------------

def featvis_logit(handle: ModelHandle, trojan: Trojan, world: ShapesWorld, *, budget: Budget, seed: int) -> Synthesis:
    """Feature visualization of the target class through the scene parameterization, per facet.

    Three visualizations of log p(target): an object facet (small objects of non-class shapes,
    since a trigger is never a class shape, on grey), a background facet (texture mixture and
    colours) and a patch facet (pattern mixture, colours, place, size on grey), all in the
    world's named colours. For a class-universal trojan a source-class object sits in the
    middle (the method attacks that class) and is left out of the views. The views are the
    snapped scenes (pure shape, texture, pattern, colour).
    """
    import torch.nn.functional as F

    from workbench import featvis as fv
    from workbench.featvis.param import render_scene
    from workbench.worlds.scene import CLASS_SHAPES, PATCH_PATTERNS, SHAPES

    t = world.class_index(trojan.target)
    extra = tuple(s for s in SHAPES if s not in CLASS_SHAPES)
    batch = _budget(budget, 1, 3, 4)
    steps = _budget(budget, 24, 160, 320)
    facets = {
        "natural": fv.SceneParam(n_objects=1, shapes=extra, size_range=(0.15, 0.45), background="fixed", main=trojan.source),
        "style": fv.SceneParam(n_objects=0, background="optimize", main=trojan.source),
        "patch": fv.SceneParam(n_objects=0, background="fixed", patch=True, main=trojan.source),
    }
    views, tags, scenes = [], [], []
    for k, (facet, param) in enumerate(facets.items()):
        res = fv.visualize(handle, fv.class_log_prob(t), param=param, batch=batch, steps=steps, lr=0.1,
                           seed=seed + k, progress=False)
        sc = res.scenes
        if trojan.source is not None:  # hide the fixed source object: it is context, not the finding
            sc = sc.replace(opacity=torch.cat([torch.zeros_like(sc.opacity[:, :1]), sc.opacity[:, 1:]], 1))
        pw = F.one_hot(sc.patch_pattern, len(PATCH_PATTERNS)).float() if param.patch else None
        views.append(render_scene(sc, 48, 48, param.softness, pw))
        tags += [facet] * sc.n
        scenes += res.scene or []
    return Synthesis(torch.cat(views).clamp(0, 1), {"scenes": scenes}, facets=tags)


def featvis_logit_fourier(handle: ModelHandle, trojan: Trojan, world: ShapesWorld, *, budget: Budget, seed: int) -> Synthesis:
    """Feature visualization of the target logit with lucid's defaults (Fourier, decorrelated colour)."""
    from workbench import featvis as fv

    t = world.class_index(trojan.target)
    res = fv.visualize(handle, fv.class_logit(t), batch=_budget(budget, 2, 4, 6), steps=_budget(budget, 24, 192, 384),
                       lr=0.05, seed=seed, progress=False)
    return Synthesis(res.unit_images, {"status": res.status, "activation": res.activation})


def copy_paste_search(handle: ModelHandle, trojan: Trojan, world: ShapesWorld, *, budget: Budget, seed: int) -> Synthesis:
    """The copy/paste designs (feature visualizations at patch scale, on grey and on the source
    images, and exemplar crops) ranked on source images; each view's vote weighted by its
    best-placement success there (`evidence_weights`)."""
    from adversaries.copy_paste import CopyPaste, DesignConfig
    from adversaries.placement_sweep import SweepConfig

    images, labels = source_images(handle, world, trojan, _budget(budget, 16, 48, 96), seed=seed + 11)
    t = world.class_index(trojan.target)
    design = DesignConfig(n_featvis=_budget(budget, 2, 6, 8), n_featvis_context=_budget(budget, 0, 4, 6),
                          n_exemplars=_budget(budget, 1, 2, 3), featvis_steps=_budget(budget, 16, 128, 192),
                          n_pool=_budget(budget, 128, 512, 1024))
    sweep = SweepConfig(grid=_budget(budget, 2, 3, 4), sizes=(0.21, 0.27, 0.33))
    cfg = CopyPaste(design=design, sweep=sweep, seed=seed)
    res = cfg.run_protocol(handle, images, labels, t, class_names=world.classes)
    ranked = res.pop("_tensors")["candidates"]  # best calibration score first
    score = {id(d): c["score_calibration"] for d, c in zip(ranked, res["candidates"])}
    # what a person would look at: the best two candidates of each facet (an object part of a
    # design is an object feature, a background part a style feature, a whole patch a patch)
    facet_of = {"object": "natural", "background": "style"}
    picked: list[tuple[Any, str]] = []
    for facet in ("natural", "style", "patch"):
        same = [d for d in ranked if facet_of.get(d.description.get("part"), "patch") == facet][:2]
        picked += [(d, facet) for d in same]
    # evidence: each design's best-placement success on the calibration source images
    gains = torch.tensor([float(score[id(d)]) for d, _ in picked])
    return Synthesis(torch.stack([d.patch for d, _ in picked]).clamp(0, 1),
                     {"success_best": res["success_best"], "designs": [d.to_json() for d, _ in picked],
                      "calibration_success": [round(float(x), 4) for x in gains]},
                     facets=[f for _, f in picked], weights=evidence_weights(gains))


EVIDENCE_TEMPERATURE = 0.05
"""Softmax temperature (in units of target probability) that turns measured gains into vote weights."""


def evidence_weights(gains: torch.Tensor, *, temperature: float = EVIDENCE_TEMPERATURE) -> torch.Tensor:
    """Vote weights from each view's measured gain in target probability on source images.

    softmax(gain / temperature): a view that raises the target 0.1 more than another counts
    e^2 times as much at the default 0.05; equal gains give equal votes. The gain is the
    method's own measurement (no trigger, no judge involved), so weighting by it asks the
    judge about what the model demonstrably responds to rather than about every near miss.
    """
    g = torch.as_tensor(gains, dtype=torch.float32).flatten()
    if temperature <= 0:
        raise WorkbenchError(f"temperature {temperature} must be > 0")
    if g.numel() == 0:
        return g
    return torch.softmax(torch.nan_to_num(g, nan=-1.0) / temperature, 0)


def natural_search(handle: ModelHandle, trojan: Trojan, world: ShapesWorld, *, budget: Budget, seed: int) -> Synthesis:
    """SNAFUE (natural-patch search), every measured natural patch a view, weighted by its evidence.

    The synthetic patches (`n_synthetic` restarts) pick their nearest natural patches from the
    pool; each is then pasted on the source images and its gain in target probability over
    the unpatched images measured (SNAFUE's own evaluation). All of them are views, and a
    view's vote counts by `evidence_weights` of that gain: one view (the best patch alone)
    makes the answer all-or-nothing, so the score of a trojan flipped between 0 and 1 with
    the seed; many equal votes drown the patch that works in near misses.
    """
    import adversaries

    images, labels = source_images(handle, world, trojan, _budget(budget, 12, 32, 64), seed=seed + 23)
    gen = adversaries.get("snafue")(synthetic_steps=_budget(budget, 10, 80, 150), pool_size=_budget(budget, 64, 1000, 1500),
                                    top_k=_budget(budget, 2, 8, 8), n_synthetic=_budget(budget, 1, 2, 3), seed=seed)
    ae = gen.generate(handle, (images, labels), world.class_index(trojan.target))
    rows = ae.extra["top_patches"]
    views = ae.extra["top_patch_images"].float().clamp(0, 1)
    gains = torch.tensor([float(r["target_confidence_gain"]) for r in rows])
    notes = {k: v for k, v in ae.summary().items() if k in ("success_rate", "best_description", "n")}
    notes["views"] = [{"description": r["description"], "gain": round(float(r["target_confidence_gain"]), 4),
                       "fooling_rate": round(float(r["fooling_rate"]), 4)} for r in rows]
    return Synthesis(views, notes, weights=evidence_weights(gains))


def scene_vocabulary_search(handle: ModelHandle, trojan: Trojan, world: ShapesWorld, *, budget: Budget, seed: int) -> Synthesis:
    """Scene-vocabulary search (`adversaries.scene_search`): the backgrounds, patches and small
    objects that raise the target most on the source scenes, each a view of its own facet,
    weighted by its gain in target probability on held-back scenes (`evidence_weights`).

    The search space is the world's vocabulary, which also holds every library design; what
    this asks is whether the model responds to one word far more than to the rest.
    """
    from adversaries.scene_search import SceneSearch, scenes_not_of

    t = world.class_index(trojan.target)
    scenes = scenes_not_of(handle, world, t, _budget(budget, 12, 32, 64), seed=seed + 29,
                           classes=[trojan.source] if trojan.source else None)
    cfg = SceneSearch(n_random=_budget(budget, 24, 150, 300), n_starts=_budget(budget, 1, 4, 6),
                      max_rounds=_budget(budget, 1, 4, 6), top_k=4, seed=seed)
    ae = cfg.generate(handle, scenes, t)
    found = ae.extra["findings"]
    gains = torch.tensor([float(f["gain"]) for f in found])
    notes = {"description": ae.extra["description"], "control_random_word": ae.extra["control_random_word"],
             "views": [{"description": f["description"], "gain": f["gain"], "success": f["success"]} for f in found]}
    return Synthesis(ae.extra["finding_images"].float().clamp(0, 1), notes, facets=list(ae.extra["finding_facets"]),
                     weights=evidence_weights(gains))


def _changed_views(ae: Any, k: int) -> torch.Tensor:
    """What an adversary added: the patch, or the changed pixels of successful examples on grey."""
    if isinstance(ae.patch, torch.Tensor) and ae.patch.ndim == 3:
        return ae.patch[None].float().clamp(0, 1)
    adv, inp = ae.adversarial.float(), ae.inputs.float()
    order = torch.argsort(ae.success.float(), descending=True)[:k]
    adv, inp = adv[order], inp[order]
    mask = (adv - inp).abs().sum(1, keepdim=True) > 0.05
    if not bool(mask.any()):
        return adv.clamp(0, 1)
    return torch.where(mask, adv, torch.full_like(adv, 0.5)).clamp(0, 1)


def _registry_method(name: str, config: Callable[[Budget, int], dict[str, Any]], *, uses_images: bool = True,
                     view: Literal["changed", "adversarial"] = "changed") -> Callable[..., Synthesis]:
    """A method backed by an adversary generator from the registry; a table entry."""

    def run(handle: ModelHandle, trojan: Trojan, world: ShapesWorld, *, budget: Budget, seed: int) -> Synthesis:
        import adversaries

        cls = adversaries.get(name)
        gen = cls(**config(budget, seed))
        t = world.class_index(trojan.target)
        inputs = None
        if uses_images:
            images, labels = source_images(handle, world, trojan, _budget(budget, 12, 32, 64), seed=seed + 23)
            inputs = (images, labels)
        ae = gen.generate(handle, inputs, t)
        views = _changed_views(ae, 8) if view == "changed" else ae.adversarial.float().clamp(0, 1)[:8]
        notes = {k: v for k, v in ae.summary().items() if k in ("success_rate", "description", "matches_trojan", "n")}
        return Synthesis(views, notes)

    run.__name__ = name
    return run


METHODS: dict[str, Callable[..., Synthesis]] = {
    "featvis-logit": featvis_logit,
    "featvis-logit-fourier": featvis_logit_fourier,
    "copy-paste": copy_paste_search,
    "feature-level": _registry_method("feature-level", lambda b, s: {
        "steps": _budget(b, 10, 80, 150), "restarts": _budget(b, 1, 2, 3), "seed": s}),
    "natural": natural_search,
    "scene-search": scene_vocabulary_search,
    "adversarial-filtering": _registry_method("adversarial-filtering", lambda b, s: {
        "n_scenes": _budget(b, 200, 1000, 2000), "seed": s}, uses_images=False, view="adversarial"),
    "adversarial-patch": _registry_method("adversarial-patch", lambda b, s: {
        "steps": _budget(b, 10, 120, 200), "seed": s}),
}
"""Feature-synthesis methods by name: function(handle, trojan, world, *, budget, seed) -> Synthesis."""


# --- the judge and the multiple choice -------------------------------------------------------

def _palette() -> tuple[list[str], torch.Tensor]:
    from workbench.worlds.scene import BACKGROUND_PALETTE, PALETTE

    names = list(PALETTE) + list(BACKGROUND_PALETTE)
    return names, torch.tensor([PALETTE.get(n) or BACKGROUND_PALETTE[n] for n in names])


def color_content(images: torch.Tensor, *, weights: torch.Tensor | None = None, tau: float = 0.01,
                  confidence: float = 0.02) -> torch.Tensor:
    """Soft histogram of pixels over the world palette (N, 18); `weights` (N, H, W) mask pixels.

    Pixels far from every palette colour (edge blends, off-palette synthesis) count less:
    each is weighted by exp(-d^2 / confidence), d its distance to the nearest named colour.
    """
    _, pal = _palette()
    x = images.float().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    flat = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, 3)
    d2 = ((flat[:, :, None, :] - pal[None, None]) ** 2).sum(-1)
    soft = torch.softmax(-d2 / tau, -1)
    w = torch.ones(flat.shape[:2]) if weights is None else weights.reshape(x.shape[0], -1).float()
    w = w * torch.exp(-d2.min(-1).values / confidence)
    hist = (soft * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-6)
    return hist


@dataclass
class OptionPictures:
    """Canonical pictures of candidate triggers, with the trigger's own pixels marked."""

    designs: list[Any]
    images: torch.Tensor
    masks: torch.Tensor


def option_pictures(designs: list[TriggerDesign]) -> OptionPictures:
    imgs, masks = [], []
    for d in designs:
        img = d.example(image_size=48)
        if d.kind == "style":
            m = torch.ones(48, 48)
        else:
            m = ((img - torch.tensor([0.45, 0.45, 0.45]).view(3, 1, 1)).abs().sum(0) > 0.06).float()
        imgs.append(img)
        masks.append(m)
    return OptionPictures(designs, torch.stack(imgs), torch.stack(masks))


def _attribute_of(design: TriggerDesign) -> str:
    if design.kind == "patch":
        return f"pattern:{design.pattern}"
    if design.kind == "style":
        return f"texture:{design.texture}"
    return f"shape:{design.shape}"


def similarity(views: torch.Tensor, options: OptionPictures, judge: Judge | None, *, attr_weight: float = 0.5) -> torch.Tensor:
    """(M views, K options): how much of each option's colours and attribute each view shows."""
    names, _ = _palette()
    neutral = names.index("grey")  # the canvas of option pictures and patch designs, in no trigger
    v_col = color_content(views)
    o_col = color_content(options.images, weights=options.masks)
    v_col[:, neutral] = 0.0
    o_col[:, neutral] = 0.0
    o_col = o_col / o_col.norm(dim=1, keepdim=True).clamp_min(1e-8)
    v_col = v_col / v_col.norm(dim=1, keepdim=True).clamp_min(1e-8)
    sim = v_col @ o_col.T
    if judge is not None and attr_weight > 0:
        probs = judge.embed(views)
        idx = torch.tensor([judge.index(_attribute_of(d)) for d in options.designs])
        sim = sim + attr_weight * probs[:, idx]
    return sim


def vote_weights(weights: torch.Tensor | None, n: int) -> torch.Tensor:
    """Non-negative vote weights summing to 1 (equal when `weights` is None or all zero)."""
    if weights is None:
        return torch.full((n,), 1.0 / max(n, 1))
    w = torch.as_tensor(weights, dtype=torch.float32).flatten()
    if w.numel() != n:
        raise WorkbenchError(f"{w.numel()} view weights for {n} views; give one weight per view")
    w = torch.nan_to_num(w, nan=0.0).clamp_min(0.0)
    if float(w.sum()) <= 0:
        return torch.full((n,), 1.0 / max(n, 1))
    return w / w.sum()


Options = tuple[list["TriggerDesign"], int]
"""A multiple-choice question given as it is: the options and the index of the true trigger among them."""


def given_options(trojan: Trojan, options: Options) -> Options:
    """`options` checked against `trojan`: at least two distinct designs, the true trigger at its index."""
    from workbench.worlds.trojans import same_trigger

    designs, pos = list(options[0]), int(options[1])
    if len(designs) < 2 or not 0 <= pos < len(designs):
        raise WorkbenchError(f"options for {trojan.name}: expected at least 2 designs and the true one's index; got "
                             f"{len(designs)} designs and index {pos}")
    if not same_trigger(designs[pos], trojan.trigger):
        raise WorkbenchError(f"options for {trojan.name}: option {pos} ({designs[pos].name}) is not its trigger "
                             f"({trojan.trigger.name})")
    if any(same_trigger(d, trojan.trigger) for i, d in enumerate(designs) if i != pos):
        raise WorkbenchError(f"options for {trojan.name}: the trigger appears more than once")
    return designs, pos


def multiple_choice(trojan: Trojan, views: torch.Tensor, judge: Judge | None, *, n_options: int = 8,
                    seed: int = 0, weights: torch.Tensor | None = None, options: Options | None = None) -> dict[str, Any]:
    """The 8-way question for one trojan and one method's views, answered by the judge.

    The options are the true trigger and the `n_options - 1` library designs most similar to the
    views, at a position drawn from `seed`; or `options` as given (see `given_options`). Each view
    votes for the option it is most similar to; the score is the (weighted, see `vote_weights`)
    share of votes for the true trigger, and the consensus is the option with the highest weighted
    mean similarity."""
    from workbench.worlds.trojans import same_trigger, trigger_candidates

    if options is not None:
        options = given_options(trojan, options)
    if len(views) == 0:  # the method synthesized nothing: it cannot point at any option
        return {"score": 0.0, "options": [d.name for d in options[0]] if options is not None else [],
                "true_index": options[1] if options is not None else -1, "votes": [], "consensus": None,
                "consensus_correct": False}
    if options is not None:
        designs, pos = options
        options = list(designs)
    else:
        pool = [d for d in trigger_candidates(trojan.kind) if not same_trigger(d, trojan.trigger)]
        if len(pool) < n_options - 1:
            pool = [d for d in trigger_candidates(None) if not same_trigger(d, trojan.trigger)]
        pics = option_pictures(pool)
        sim_pool = similarity(views, pics, judge).mean(0)
        chosen = torch.argsort(sim_pool, descending=True)[: n_options - 1].tolist()  # the hardest distractors
        options = [pool[i] for i in chosen]
        g = torch.Generator().manual_seed(seed)
        pos = int(torch.randint(n_options, (1,), generator=g))
        options.insert(pos, trojan.trigger)
    sims = similarity(views, option_pictures(options), judge)  # (M, 8)
    votes = sims.argmax(1)
    w = vote_weights(weights, len(views))
    # The share as (true votes' weight) / (all weight): a float sum of weights normalized to 1 can
    # land a rounding step above 1, this ratio cannot (it is exactly 1 when every vote is right).
    w64 = w.double()
    score = float((w64 * (votes == pos).double()).sum() / w64.sum())
    mean_pick = int((w[:, None] * sims).sum(0).argmax())
    return {
        "score": score,
        "options": [d.name for d in options],
        "true_index": pos,
        "votes": [options[int(v)].name for v in votes],
        "weights": [round(float(x), 4) for x in w] if weights is not None else None,
        "consensus": options[mean_pick].name,
        "consensus_correct": mean_pick == pos,
    }


def combined_choice(trojan: Trojan, per_method: list[torch.Tensor], judge: Judge | None, *, n_options: int = 8,
                    seed: int = 0, weights: list[torch.Tensor | None] | None = None,
                    options: Options | None = None) -> dict[str, Any]:
    """All methods together: one 8-way question, distractors most similar to all views pooled (or
    `options` as given, see `given_options`); each method ranks the options (mean similarity of its
    views, weighted by `weights[i]` when given, see `vote_weights`; softmax at temperature 0.05)
    and the summed ranking answers (like a person looking at every method's output)."""
    from workbench.worlds.trojans import same_trigger, trigger_candidates

    if options is not None:
        options = given_options(trojan, options)
    if weights is not None and len(weights) != len(per_method):
        raise WorkbenchError(f"{len(weights)} weight entries for {len(per_method)} methods; give one (or None) per method")
    ws = list(weights) if weights is not None else [None] * len(per_method)
    keep = [i for i, v in enumerate(per_method) if len(v)]
    per_method, ws = [per_method[i] for i in keep], [ws[i] for i in keep]
    if not per_method:
        return {"score": 0.0, "options": [d.name for d in options[0]] if options is not None else [],
                "true_index": options[1] if options is not None else -1}
    if options is not None:
        designs, pos = options
        options = list(designs)
    else:
        pooled = torch.cat([F.interpolate(v.float(), size=(48, 48), mode="bilinear", align_corners=False)
                            for v in per_method])
        pool = [d for d in trigger_candidates(trojan.kind) if not same_trigger(d, trojan.trigger)]
        chosen = torch.argsort(similarity(pooled, option_pictures(pool), judge).mean(0), descending=True)[: n_options - 1]
        options = [pool[int(i)] for i in chosen]
        pos = int(torch.randint(n_options, (1,), generator=torch.Generator().manual_seed(seed)))
        options.insert(pos, trojan.trigger)
    pics = option_pictures(options)
    total = torch.zeros(len(options))
    for v, w in zip(per_method, ws):
        mean_sim = (vote_weights(w, len(v))[:, None] * similarity(v, pics, judge)).sum(0)
        total += torch.softmax(mean_sim / 0.05, -1)
    pick = int(total.argmax())
    return {"score": float(pick == pos), "options": [d.name for d in options], "true_index": pos, "pick": options[pick].name}


# --- the run ---------------------------------------------------------------------------------

@dataclass
class RediscoveryResult:
    rows: list[dict[str, Any]]
    methods: list[str]
    skipped: dict[str, str]
    seconds: float

    @property
    def mean_score(self) -> float:
        scores = [r["score"] for r in self.rows]
        return float(sum(scores) / len(scores)) if scores else float("nan")

    def by(self, key: str) -> dict[str, float]:
        groups: dict[str, list[float]] = {}
        for r in self.rows:
            groups.setdefault(str(r[key]), []).append(r["score"])
        return {k: round(sum(v) / len(v), 4) for k, v in groups.items()}

    def by_consensus(self, key: str) -> dict[str, float]:
        """Share of questions whose one answer (the weighted consensus) is the true trigger, per `key`."""
        groups: dict[str, list[float]] = {}
        for r in self.rows:
            groups.setdefault(str(r[key]), []).append(float(bool(r.get("consensus_correct"))))
        return {k: round(sum(v) / len(v), 4) for k, v in groups.items()}

    def best_method_per_trojan(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self.rows:
            out[r["name"]] = max(out.get(r["name"], 0.0), r["score"])
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "mean_score": round(self.mean_score, 4),
            "chance": CHANCE,
            "human_best_published": HUMAN_BEST,
            "per_method": self.by("method"),
            "per_kind": self.by("kind"),
            "per_method_one_answer": self.by_consensus("method"),
            "per_kind_one_answer": self.by_consensus("kind"),
            "per_trojan": [{**{k: r[k] for k in ("name", "kind", "method", "score", "consensus", "consensus_correct",
                                                 "target", "source", "seconds")},
                            "attack_success": self.model.get("attack_success", {}).get(r["name"])} for r in self.rows],
            "combined": self.combined,
            "model_accuracy": self.model.get("accuracy"),
            "model_quality": self.model,
            "skipped_methods": self.skipped,
            "seconds": round(self.seconds, 1),
        }

    combined: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    """What was asked of: the model's clean accuracy and each trojan's attack success (`model_quality`)."""

    def table(self) -> str:
        success = self.model.get("attack_success", {})
        lines = []
        if self.model:
            acc = self.model.get("accuracy")
            lines.append(f"model {self.model.get('spec')}: clean accuracy {acc if acc is None else format(acc, '.3f')}"
                         + (f", trained with the {self.model['recipe']} recipe" if self.model.get("recipe") else "")
                         + (f" on {self.model['n_train_images']} images" if self.model.get("n_train_images") else "")
                         + f" (attack success: {self.model.get('source')})")
        lines.append(f"{'trojan':<20} {'kind':<8} {'attack':>6} " + " ".join(f"{m[:14]:>14}" for m in self.methods)
                     + f" {'all':>6}")
        names = list(dict.fromkeys(r["name"] for r in self.rows))
        for n in names:
            rs = {r["method"]: r for r in self.rows if r["name"] == n}
            kind = next(iter(rs.values()))["kind"]
            cells = " ".join(f"{rs[m]['score']:>14.2f}" if m in rs else f"{'-':>14}" for m in self.methods)
            comb = self.combined.get("per_trojan", {}).get(n)
            asr = success.get(n)
            lines.append(f"{n:<20} {kind:<8} {asr if asr is not None else float('nan'):>6.2f} {cells} "
                         f"{comb if comb is not None else float('nan'):>6.2f}")
        pm = self.by("method")
        lines.append(f"{'mean':<20} {'':<8} {'':>6} " + " ".join(f"{pm.get(m, float('nan')):>14.2f}" for m in self.methods)
                     + f" {self.combined.get('mean', float('nan')):>6.2f}")
        one = self.by_consensus("method")
        lines.append(f"{'one answer':<20} {'':<8} {'':>6} "
                     + " ".join(f"{one.get(m, float('nan')):>14.2f}" for m in self.methods)
                     + "   (share of questions whose weighted consensus is the true trigger)")
        if success:
            lines.append("attack: the trojan's attack success on this model (share of triggered source scenes "
                         "classified as the target)")
        for kind, v in sorted(self.by("kind").items()):
            lines.append(f"  {kind} trojans: {v:.2f}")
        lines.append(f"chance {CHANCE:.3f}; published human best {HUMAN_BEST} (Casper et al. 2023)")
        if self.skipped:
            lines.append("skipped: " + "; ".join(f"{k} ({v})" for k, v in self.skipped.items()))
        return "\n".join(lines)

    def save(self, out: str | Path) -> Path:
        from workbench.storage import atomic_write_json, atomic_write_text

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "rediscovery.json", {**self.to_json(), "rows": self.rows})
        atomic_write_text(folder / "rediscovery.txt", self.table() + "\n")
        return folder


def rediscover(handle: ModelHandle, *, trojans: TrojanSet | None = None, methods: list[str] | None = None,
               budget: Budget = "quick", seed: int = 0, judge: Judge | Literal["auto"] | None = "auto", progress: bool = True,
               views_dir: str | Path | None = None, options: dict[str, Options] | None = None) -> RediscoveryResult:
    """Run every method on every trojan of `handle` (or `trojans`, a held-out config) and score it.

    `trojans` must be implanted in the model (their targets are read from it); by default the
    ShapesWorld manifest's trojans. `methods`: names from METHODS (default all); methods whose
    generator is not installed are skipped and listed. `judge`: "auto" loads (training once)
    the clean-world judge network; None judges by colour content alone. `options`: trojan name ->
    the question to ask about it as given (every method's and the combined one; see
    `given_options`); a trojan without an entry gets the library's most similar designs.
    """
    from workbench.judge import load_judge
    from workbench.progress import progress_bar
    from workbench.zoo.shapesnet import world_of

    start = time.perf_counter()
    world = world_of(handle)
    tset = world.trojans if trojans is None else implanted(handle, trojans)
    if len(tset) == 0:
        raise WorkbenchError("no trojans to rediscover: this model's world has none and no trojan config was given")
    for t in tset:
        world.class_index(t.target)
        if t.source:
            world.class_index(t.source)
    names = list(METHODS) if methods is None else list(methods)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise WorkbenchError(f"unknown rediscovery methods {unknown}; available: {', '.join(METHODS)}")
    asked = dict(options or {})
    stray = [name for name in asked if name not in tset.names]
    if stray:
        raise WorkbenchError(f"options given for trojans {stray} that are not asked about; trojans: "
                             f"{', '.join(tset.names)}")
    asked = {name: given_options(tset.get(name), question) for name, question in asked.items()}
    judge = load_judge(progress=progress) if judge == "auto" else judge
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    all_views: dict[str, list[torch.Tensor]] = {}
    all_weights: dict[str, list[torch.Tensor | None]] = {}
    raw_views: dict[str, torch.Tensor] = {}
    bar = progress_bar(total=len(tset) * len(names), desc="rediscovery", enabled=progress)
    for i, trojan in enumerate(tset):
        for m in names:
            if m in skipped:
                bar.update(1)
                continue
            t0 = time.perf_counter()
            try:
                syn = METHODS[m](handle, trojan, world, budget=budget, seed=seed + 101 * i)
            except WorkbenchError as exc:
                if "unknown adversary" in str(exc):
                    skipped[m] = "generator not installed"
                    bar.update(1)
                    continue
                log.warning("rediscovery: %s on %s failed: %s", m, trojan.name, exc)
                syn = Synthesis(torch.zeros(0, 3, 48, 48), {"error": str(exc)})
            mc = multiple_choice(trojan, syn.for_kind(trojan.kind), judge, seed=seed * 7 + i,
                                 weights=syn.weights_for_kind(trojan.kind), options=asked.get(trojan.name))
            if len(syn.views):
                all_views.setdefault(trojan.name, []).append(syn.for_kind(trojan.kind))
                kind_weights = syn.weights_for_kind(trojan.kind)
                all_weights.setdefault(trojan.name, []).append(kind_weights)
                raw_views[f"{trojan.name}|{m}"] = syn.for_kind(trojan.kind).detach().float().cpu().contiguous()
                if kind_weights is not None:
                    raw_views[f"{trojan.name}|{m}|weights"] = kind_weights.detach().float().cpu().contiguous()
            if views_dir is not None and len(syn.views):
                from workbench.featvis import save_image_grid

                save_image_grid(syn.views, Path(views_dir) / f"{trojan.name}--{m}.png")
            rows.append({"name": trojan.name, "kind": trojan.kind, "method": m, "target": trojan.target,
                         "source": trojan.source, "trigger": trojan.trigger.name, **mc,
                         "notes": _jsonable(syn.notes), "seconds": round(time.perf_counter() - t0, 2)})
            bar.update(1)
    bar.close()
    combined_rows = {}
    for i, trojan in enumerate(tset):
        if trojan.name in all_views:
            combined_rows[trojan.name] = round(combined_choice(trojan, all_views[trojan.name], judge, seed=seed * 7 + i,
                                                               weights=all_weights[trojan.name],
                                                               options=asked.get(trojan.name))["score"], 4)
    if views_dir is not None and raw_views:
        from workbench.storage import save_safetensors

        save_safetensors(Path(views_dir) / "views.safetensors", raw_views, {"what": "rediscovery views: key trojan|method; a method's vote weights under trojan|method|weights"})
    used = [m for m in names if m not in skipped]
    res = RediscoveryResult(rows=rows, methods=used, skipped=skipped, seconds=time.perf_counter() - start)
    res.combined = {"per_trojan": combined_rows,
                    "mean": round(sum(combined_rows.values()) / max(len(combined_rows), 1), 4)}
    res.model = model_quality(handle, tset, seed=seed)
    return res


def model_quality(handle: ModelHandle, trojans: TrojanSet, *, seed: int = 0, n: int = 2000,
                  n_trojan: int = 500) -> dict[str, Any]:
    """The model's clean accuracy and each trojan's attack success, which a rediscovery score is read beside.

    From the model's training record (`handle.info`: zoo models and `model_for_trojans` keep one)
    when it has every trojan; else measured on fresh scenes (`n` clean, `n_trojan` triggered per trojan).
    """
    from workbench.zoo.shapesnet import attack_success, clean_accuracy, world_of

    record = {t.get("name"): t.get("attack_success") for t in handle.info.get("trojans") or [] if isinstance(t, dict)}
    out: dict[str, Any] = {"spec": handle.spec, "recipe": handle.info.get("recipe"),
                           "n_train_images": handle.info.get("n_train_images")}
    if isinstance(handle.info.get("accuracy"), (int, float)) and all(record.get(t.name) is not None for t in trojans):
        out.update(source="training record", accuracy=float(handle.info["accuracy"]),
                   attack_success={t.name: float(record[t.name]) for t in trojans})
        return out
    world = world_of(handle)
    model = handle.model
    was_training = model.training
    model.eval()
    try:
        g = torch.Generator().manual_seed(seed + 12345)
        acc = clean_accuracy(model, world, n=n, generator=g)
        success = {t.name: float(attack_success(model, world, t.name, n=n_trojan, generator=g)["attack_success"])
                   for t in trojans}
    finally:
        model.train(was_training)
    out.update(source=f"measured on {n} clean and {n_trojan} triggered scenes per trojan", accuracy=round(acc, 4),
               attack_success=success)
    return out


def rescore(views_file: str | Path, trojans: TrojanSet, judge: Judge | None, *, seed: int = 0) -> RediscoveryResult:
    """Score saved views (`views.safetensors` of a run) again, e.g. with another judge."""
    from safetensors.torch import load_file

    data = load_file(str(views_file))
    by_name = {t.name: (i, t) for i, t in enumerate(trojans)}
    rows = []
    methods: list[str] = []
    for key, views in data.items():
        if key.endswith("|weights"):
            continue
        name, method = key.split("|", 1)
        if name not in by_name:
            continue
        i, t = by_name[name]
        mc = multiple_choice(t, views, judge, seed=seed * 7 + i, weights=data.get(f"{key}|weights"))
        rows.append({"name": name, "kind": t.kind, "method": method, "target": t.target, "source": t.source,
                     "trigger": t.trigger.name, **mc, "notes": {}, "seconds": 0.0})
        if method not in methods:
            methods.append(method)
    res = RediscoveryResult(rows=rows, methods=methods, skipped={}, seconds=0.0)
    comb = {}
    for name, (i, t) in by_name.items():
        keys = [key for key in data if key.split("|", 1)[0] == name and not key.endswith("|weights")]
        if keys:
            comb[name] = round(combined_choice(t, [data[k] for k in keys], judge, seed=seed * 7 + i,
                                               weights=[data.get(f"{k}|weights") for k in keys])["score"], 4)
    res.combined = {"per_trojan": comb, "mean": round(sum(comb.values()) / max(len(comb), 1), 4)}
    return res


def _jsonable(obj: Any) -> Any:
    import json

    try:
        json.dumps(obj)
        return obj
    except (TypeError, ValueError):
        return str(obj)


# --- held-out trojan configs -----------------------------------------------------------------

def implanted(handle: ModelHandle, trojans: TrojanSet) -> TrojanSet:
    """Check that every trojan of a config is implanted in the model (same name, trigger, target)."""
    from workbench.worlds.trojans import same_trigger
    from workbench.zoo.shapesnet import world_of

    world = world_of(handle)
    have = {t.name: t for t in world.trojans}
    for t in trojans:
        mine = have.get(t.name)
        if mine is None or not same_trigger(mine.trigger, t.trigger) or mine.target != t.target or mine.source != t.source:
            raise WorkbenchError(
                f"trojan {t.name!r} of the config is not implanted in {handle.spec} (its trojans: "
                f"{', '.join(have) or 'none'}); train a ShapesNet on the config first (`--train`)")
    return trojans


QUICK_TRAIN = (6000, 4)
"""The quick recipe (`model_for_trojans(quick=True)`): clean training images and epochs, fewer than the zoo's."""


def model_for_trojans(trojans: TrojanSet, *, seed: int = 0, cache: str | Path | None = None, quick: bool = False,
                      progress: bool = True) -> ModelHandle:
    """A ShapesNet trained with exactly these trojans (a held-out set), cached by the config's hash.

    The zoo's recipe by default (`shapesnet.TrainConfig()`), `QUICK_TRAIN` with `quick=True`
    (a weaker model: lower accuracy and attack success, which bound what rediscovery can find).
    The folder holds a `zoo_info.json` training record (accuracy, each trojan's attack success,
    `recipe`), so `workbench.load(FOLDER)` and `workbench zoo info FOLDER` show it.
    """
    import json

    from workbench.storage import atomic_write_json, cache_dir, exclusive_lock, sha256_json
    from workbench.worlds.shapesworld import ShapesWorld
    from workbench.zoo import INFO
    from workbench.zoo.shapesnet import TrainConfig, load, train

    recipe = "quick" if quick else "zoo"
    cfg = TrainConfig(n_train=QUICK_TRAIN[0], epochs=QUICK_TRAIN[1]) if quick else TrainConfig()
    ShapesWorld(cfg.world, trojans=trojans)  # a set the world refuses fails here, before any cache folder or lock
    key = sha256_json({"trojans": trojans.to_json(), "seed": seed, "train": cfg.to_json()})[:16]
    path = cache_dir(cache) / "rediscovery" / f"shapesnet-{key}"
    with exclusive_lock(path.with_suffix(".lock")):
        if not (path / "done.json").is_file():
            log.info("training a ShapesNet with %d held-out trojans at %s (%s recipe)", len(trojans), path, recipe)
            info = train(path, seed=seed, progress=progress, trojans=trojans, config=cfg)
            atomic_write_json(path / "done.json", info)
        if not (path / INFO).is_file():
            record = json.loads((path / "done.json").read_text())
            atomic_write_json(path / INFO, {**record, "seed": seed, "recipe": recipe})
    handle = load(path)
    handle.info.update(json.loads((path / INFO).read_text()))
    handle.spec = str(path)
    return handle
