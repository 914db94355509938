"""Scene-vocabulary search: which background, patch or small object turns these scenes into the target?

A discrete counterpart of the feature-level adversary. ShapesWorld scenes are written in a
small vocabulary (background texture and two colours; patch pattern and two colours; a
small object's shape and colour). The scene-parameter feature visualization and the
feature-level adversary follow gradients through soft mixtures of those words and snap to
words at the end; this generator searches the words themselves: a seeded random sample of
the combinations, then coordinate ascent (change one word at a time, keep the best) from the
best few, scored by the mean log probability of the target on the given scenes. Every candidate is inserted into the same
scenes at the same random placements (common random numbers), so two candidates differ only
in what they are. The best few per kind are measured again on held-back scenes; those
numbers, not the search scores, are reported.

A finding is a `TriggerDesign` (the vocabulary ShapesWorld uses for trojans), so it reads as
words ("lime/navy zigzag background") and renders canonically. The sizes are this method's
own (`patch_size`, `object_size`), not a trojan's. The search space is the world's whole
vocabulary, which is also where implanted triggers come from: on a trojaned model the
question it answers is "does the model respond to one word far more than to the others".

    ss = SceneSearch(seed=0).generate(handle, scenes, target="cross")
    ss.extra["findings"][0]["description"], ss.extra["finding_images"]
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch

from adversaries.base import AdversarialExamples
from adversaries.registry import register
from workbench.classifier import (
    class_name,
    eval_mode,
    logits,
    num_classes,
    predict,
    preprocess_of,
    render_for,
    resolve_targets,
    world_or_default,
)
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.progress import progress_bar
from workbench.worlds.scene import (
    BACKGROUND_PALETTE,
    CLASS_SHAPES,
    EXTRA_SHAPES,
    PALETTE,
    PATCH_PATTERNS,
    TEXTURES,
    Scene,
    color_rgb,
)
from workbench.worlds.shapesworld import Sample
from workbench.worlds.trojans import TriggerDesign

log = logging.getLogger(__name__)

FACETS: tuple[str, ...] = ("style", "patch", "natural")
"""What a finding can be: a background (style), a pasted patch, or a small added object (natural)."""

Candidate = tuple[str, ...]
"""(texture, colour, colour) | (pattern, colour, colour) | (shape, colour)."""


def _words(facet: str, colors: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The choices for each word of a facet's candidates."""
    if facet == "style":
        return [tuple(t for t in TEXTURES if t != "plain"), colors, colors]
    if facet == "patch":
        return [PATCH_PATTERNS, colors, colors]
    return [tuple(s for s in EXTRA_SHAPES if s not in CLASS_SHAPES), colors]


def _valid(c: Candidate) -> bool:
    return len(c) < 3 or c[1] != c[2]


def all_candidates(facet: str, colors: tuple[str, ...]) -> list[Candidate]:
    """Every combination of a facet's words (two-colour facets: two different colours)."""
    words = _words(facet, colors)
    out: list[Candidate] = [()]
    for choices in words:
        out = [c + (w,) for c in out for w in choices]
    return [c for c in out if _valid(c)]


def neighbours(facet: str, c: Candidate, colors: tuple[str, ...]) -> list[Candidate]:
    """Candidates that differ from `c` in exactly one word."""
    out = []
    for i, choices in enumerate(_words(facet, colors)):
        for w in choices:
            d = c[:i] + (w,) + c[i + 1:]
            if d != c and _valid(d):
                out.append(d)
    return out


def design_of(facet: str, c: Candidate, *, patch_size: float, object_size: float) -> TriggerDesign:
    """A candidate as a TriggerDesign (words, canonical picture, and the world's way to insert it)."""
    if facet == "style":
        return TriggerDesign(f"found-{'-'.join(c)}", "style", texture=c[0], colors=(c[1], c[2]),
                             description=f"{c[1]}/{c[2]} {c[0]} background")
    if facet == "patch":
        return TriggerDesign(f"found-{'-'.join(c)}", "patch", pattern=c[0], colors=(c[1], c[2]), size=patch_size,
                             description=f"{c[1]}/{c[2]} {c[0]} patch")
    return TriggerDesign(f"found-{'-'.join(c)}", "natural", shape=c[0], color=c[1], size=object_size,
                         description=f"a small {c[1]} {c[0]}")


@register("scene-search")
@dataclass(frozen=True)
class SceneSearch:
    """Search the scene vocabulary for the background, patch and small object that raise `target` most.

    `facets`: which kinds of finding to search. `colors`: the colour words (default: every
    object and background colour of ShapesWorld). Per facet, `n_random` candidates are
    scored, then coordinate ascent runs from the best `n_starts` for at most `max_rounds`
    rounds. `top_k` findings per facet are re-measured on the held-back scenes
    (`check_fraction` of the inputs). Needs ShapesWorld scenes (a `Sample`): backgrounds
    are replaced in the scene parameters, not painted over pixels.
    """

    facets: tuple[str, ...] = FACETS
    colors: tuple[str, ...] | None = None
    n_random: int = 150
    n_starts: int = 4
    max_rounds: int = 4
    top_k: int = 4
    patch_size: float = 0.2
    object_size: float = 0.25
    check_fraction: float = 0.5
    n_scenes: int = 32
    batch_size: int = 256
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        bad = [f for f in self.facets if f not in FACETS]
        if bad or not self.facets:
            raise WorkbenchError(f"facets {list(self.facets)}: choose one or more of {', '.join(FACETS)}")
        for c in self.colors or ():
            color_rgb(c)
        if self.colors is not None and len(set(self.colors)) < 2:
            raise WorkbenchError("colors: give at least two different colour names")
        if self.n_random < 1 or self.n_starts < 1 or self.max_rounds < 0 or self.top_k < 1 or self.n_scenes < 2:
            raise WorkbenchError("n_random, n_starts, top_k must be >= 1, max_rounds >= 0 and n_scenes >= 2")
        if not 0 < self.check_fraction < 1:
            raise WorkbenchError(f"check_fraction {self.check_fraction}: expected a share strictly between 0 and 1")
        for name, v in (("patch_size", self.patch_size), ("object_size", self.object_size)):
            if not 0.08 <= v <= 0.4:
                raise WorkbenchError(f"{name} {v} is out of range; expected 0.08 to 0.4 (image spans -1..1)")

    @property
    def color_words(self) -> tuple[str, ...]:
        return tuple(self.colors) if self.colors else tuple(PALETTE) + tuple(BACKGROUND_PALETTE)

    # ------------------------------------------------------------------ scoring
    def _measure(self, handle: ModelHandle, world: Any, sample: Sample, facet: str, cands: list[Candidate],
                 tgt: int, *, placement_seed: int) -> list[dict[str, float]]:
        """Mean log p(target), mean p(target) and success rate of each candidate on the scenes (`target_stats`)."""
        soft = float(world.config.softness)
        n = len(sample)
        per_batch = max(1, self.batch_size // n)
        out: list[dict[str, float]] = []
        for i in range(0, len(cands), per_batch):
            chunk = cands[i:i + per_batch]
            scenes = []
            for c in chunk:
                g = torch.Generator().manual_seed(placement_seed)  # same placements for every candidate
                design = design_of(facet, c, patch_size=self.patch_size, object_size=self.object_size)
                scenes.append(design.apply(sample.scene, generator=g))
            out += target_stats(handle, render_for(handle, Scene.cat(scenes), softness=soft), tgt, len(chunk))
        return out

    def _search(self, handle: ModelHandle, world: Any, sample: Sample, facet: str, tgt: int, bar: Any) -> dict[Candidate, float]:
        """Random sample, then coordinate ascent from the best starts; every scored candidate and its score."""
        colors = self.color_words
        pool = all_candidates(facet, colors)
        g = torch.Generator().manual_seed(self.seed * 7919 + FACETS.index(facet))
        first = [pool[i] for i in torch.randperm(len(pool), generator=g)[: self.n_random].tolist()]
        seen: dict[Candidate, float] = {}

        def score(cands: list[Candidate]) -> None:
            new = [c for c in dict.fromkeys(cands) if c not in seen]
            if not new:
                return
            rows = self._measure(handle, world, sample, facet, new, tgt, placement_seed=self.seed * 31 + 1)
            seen.update({c: r["log_p"] for c, r in zip(new, rows)})
            bar.update(len(new))

        score(first)
        starts = sorted(first, key=lambda c: -seen[c])[: self.n_starts]
        for cur in starts:
            for _ in range(self.max_rounds):
                nb = neighbours(facet, cur, colors)
                score(nb)
                best = max([cur, *nb], key=lambda c: seen[c])
                if best == cur:
                    break
                cur = best
        return seen

    # ------------------------------------------------------------------ the generator
    def generate(self, handle: ModelHandle, inputs: Any = None, target: Any = None) -> AdversarialExamples:
        preprocess_of(handle)
        if target is None:
            raise WorkbenchError("scene search is targeted: give the target class (name or index)")
        targets = resolve_targets(handle, target, 1)
        assert targets is not None
        tgt = int(targets[0])
        world = world_or_default(handle)
        if inputs is None:
            if not isinstance(handle.info.get("world"), dict):
                raise WorkbenchError(f"{handle.spec} has no ShapesWorld to draw scenes from; pass scenes (a Sample) "
                                     "whose labels are this model's classes")
            sample = scenes_not_of(handle, world, tgt, self.n_scenes, seed=self.seed)
        elif isinstance(inputs, Sample):
            sample = inputs
            k = num_classes(handle)
            if len(sample) and int(sample.labels.max()) >= k:
                raise WorkbenchError(f"scene labels reach {int(sample.labels.max())}; this model has classes 0..{k - 1}")
        else:
            raise WorkbenchError("scene search needs ShapesWorld scenes (a Sample, e.g. world.sample(...)) or None to "
                                 "draw them: it replaces backgrounds and adds objects in the scene parameters, "
                                 "which pixels do not carry")
        n = len(sample)
        if n < 2:
            raise WorkbenchError(f"scene search needs at least 2 scenes (one to search on, one to check); got {n}")
        n_check = min(n - 1, max(1, round(n * self.check_fraction)))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 5))
        search_part, check_part = sample.index(perm[n_check:]), sample.index(perm[:n_check])
        soft = float(world.config.softness)
        images = render_for(handle, sample, softness=soft)
        clean_pred, _ = predict(handle, images)
        base = target_stats(handle, images[perm[:n_check]], tgt, 1)[0]  # the held-back scenes, already rendered
        findings: list[dict[str, Any]] = []
        controls: dict[str, float] = {}
        bar = progress_bar(desc="scene search", unit="cand", enabled=self.progress)
        for facet in self.facets:
            seen = self._search(handle, world, search_part, facet, tgt, bar)
            ranked = sorted(seen, key=lambda c: -seen[c])[: self.top_k]
            rows = self._measure(handle, world, check_part, facet, ranked, tgt, placement_seed=self.seed * 31 + 2)
            # control: what a random word of this facet does on the held-back scenes
            pool = all_candidates(facet, self.color_words)
            g = torch.Generator().manual_seed(self.seed * 104729 + FACETS.index(facet))
            rand = [pool[i] for i in torch.randperm(len(pool), generator=g)[: self.top_k * 4].tolist()]
            ctrl = self._measure(handle, world, check_part, facet, rand, tgt, placement_seed=self.seed * 31 + 2)
            controls[facet] = sum(r["p"] for r in ctrl) / len(ctrl) - base["p"]
            for c, r in zip(ranked, rows):
                d = design_of(facet, c, patch_size=self.patch_size, object_size=self.object_size)
                findings.append({"facet": facet, "words": list(c), "design": d.to_json(), "description": d.description,
                                 "gain": r["p"] - base["p"], "log_gain": r["log_p"] - base["log_p"],
                                 "success": r["success"], "search_log_p": seen[c], "n_scored": len(seen)})
        bar.close()
        findings.sort(key=lambda f: -f["log_gain"])
        best = findings[0]
        design = design_of(best["facet"], tuple(best["words"]), patch_size=self.patch_size, object_size=self.object_size)
        adv_scene = design.apply(sample.scene, generator=torch.Generator().manual_seed(self.seed * 31 + 3))
        adv = render_for(handle, adv_scene, softness=soft)
        adv_pred, _ = predict(handle, adv)
        pictures = torch.stack([design_of(f["facet"], tuple(f["words"]), patch_size=self.patch_size,
                                          object_size=self.object_size).example() for f in findings])
        src = sorted({class_name(handle, int(c)) for c in sample.labels})
        extra: dict[str, Any] = {
            "config": asdict(self),
            "findings": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in f.items()} for f in findings],
            "description": f"{best['description']} turns {'/'.join(src)} scenes into {class_name(handle, tgt)} "
                           f"(p(target) +{best['gain']:.2f} on {n_check} held-back scenes)",
            "control_random_word": {k: round(v, 4) for k, v in controls.items()},
            "target_prob_before": base["p"],
            "finding_images": pictures,
            "finding_facets": [f["facet"] for f in findings],
        }
        # the best finding on every given scene (search and held-back part); the findings' own numbers are held-back only
        return AdversarialExamples(method="scene-search", inputs=images.detach().cpu(), adversarial=adv.detach().cpu(),
                                   success=adv_pred.cpu() == tgt, target=tgt, perturbation=(adv - images).detach().cpu(),
                                   original_pred=clean_pred, adversarial_pred=adv_pred, extra=extra)


@torch.no_grad()
def target_stats(handle: ModelHandle, images: torch.Tensor, tgt: int, groups: int) -> list[dict[str, float]]:
    """Per group of equally many images: mean log p(target) (the targeted cross-entropy, from the
    logits so it does not round to 0 near p = 1; it rewards a word that works on every image over
    one that works hugely on some), mean p(target), and the share predicted as the target."""
    with eval_mode(handle.model):
        z = torch.cat([logits(handle, images[i:i + 512]).float().cpu() for i in range(0, len(images), 512)])
    logp = z.log_softmax(-1)[:, tgt].view(groups, -1)
    ok = (z.argmax(-1) == tgt).view(groups, -1).float()
    return [{"log_p": float(logp[j].mean()), "p": float(logp[j].exp().mean()), "success": float(ok[j].mean())}
            for j in range(groups)]


def scenes_not_of(handle: ModelHandle, world: Any, target: int, n: int, *, seed: int,
                  classes: list[str] | None = None) -> Sample:
    """`n` clean scenes (no context objects) of `classes` (default: every class but the target) that the model gets right."""
    from adversaries.feature_level import class_scenes

    names = classes or [c for i, c in enumerate(world.classes) if i != target]
    return class_scenes(handle, world, names, n, seed=seed, context_mode="none")
