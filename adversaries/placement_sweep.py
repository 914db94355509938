"""The paste-and-sweep protocol of copy/paste attacks (Activation Atlas, Carter et al. 2019).

A candidate patch is pasted opaquely on source images at every placement of a sweep: evenly
spaced positions x sizes (default 6 x 6 positions x 6 sizes, Mu & Andreas 2020). Only source
images classified correctly before the patch, and not already the target, count; they are
split into a calibration and a test part (`plan_sweep`). `run_sweep` ranks the candidates on
(at most `n_rank`) calibration images over an evenly thinned sweep, then measures the chosen
one on the test images: *consistent* placement is the one placement that works best on the
calibration split, applied to every test image; *best* placement counts a test image when any
placement flips it to the target. Two controls get the same sweep on the same images: a
uniform-noise patch and a random natural crop of the same size (`natural_crop`). With object
masks, a placement that hides more than `max_occlusion` of an image's own object is not tried
on that image. Results are reported per source class, with the mean target probability
before and after.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from workbench.classifier import logits, predict
from workbench.errors import WorkbenchError
from workbench.progress import progress_bar

if TYPE_CHECKING:
    from workbench.handle import ModelHandle

Placement = tuple[int, int, int]
"""(top, left, size) in pixels."""


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


@dataclass(frozen=True)
class SweepConfig:
    """The placement sweep and how a design is chosen.

    `sizes`: patch sides as fractions of the image's shorter side; `grid`: positions per axis
    (the default, 6 x 6 positions x 6 sizes, is Mu & Andreas's sweep). `calib_fraction`: share
    of the counted source images used to choose the design and its consistent placement;
    candidates are ranked on at most `n_rank` of them over an evenly thinned subset of at most
    `n_rank_placements` placements, and the chosen design's consistent placement is then picked
    from the whole sweep. `max_occlusion`: with object masks, the largest share of an image's
    own object a placement may cover. `batch_size`: images per forward pass.

    `controls`: how the noise patch and the natural crop are chosen. "best_of_n" (default)
    gives them the designs' own selection: as many random candidates of each as there are
    designs, ranked on the same calibration images and placements, the best measured; a
    single random control against the best of N designs would favour the designs. "single":
    one noise patch and one crop, as in the Activation Atlas.
    """

    sizes: tuple[float, ...] = (0.125, 0.167, 0.21, 0.25, 0.29, 0.33)
    grid: int = 6
    calib_fraction: float = 0.4
    n_rank: int = 48
    n_rank_placements: int = 54
    max_occlusion: float = 0.5
    batch_size: int = 512
    controls: Literal["best_of_n", "single"] = "best_of_n"

    def __post_init__(self) -> None:
        if self.controls not in ("best_of_n", "single"):
            raise WorkbenchError(f"controls={self.controls!r}; expected 'best_of_n' or 'single'")

    def sizes_px(self, handle: ModelHandle) -> tuple[int, ...]:
        """The patch sizes in pixels of `handle`'s input (the `sizes` fractions of the shorter side)."""
        pre = handle.preprocess
        assert pre is not None
        side = min(pre.height, pre.width)
        px = tuple(sorted({max(2, round(f * side)) for f in self.sizes}))
        if any(p > side for p in px):
            raise WorkbenchError(f"patch sizes {self.sizes} (fractions of the image side) must be at most 1")
        return px


# --- pasting and sweeping -----------------------------------------------------------------

def placements(height: int, width: int, sizes: tuple[int, ...], grid: int) -> list[Placement]:
    """(top, left, size) for `grid` x `grid` evenly spaced positions of each size."""
    out = []
    for s in sizes:
        if not 1 <= s <= min(height, width):
            raise WorkbenchError(f"patch size {s} px does not fit a {height}x{width} image; sizes must be 1..{min(height, width)}")
        ys = torch.linspace(0, height - s, grid).round().long().unique().tolist()
        xs = torch.linspace(0, width - s, grid).round().long().unique().tolist()
        out += [(int(y), int(x), s) for y in ys for x in xs]
    return out


def occlusion(masks: torch.Tensor, where: list[Placement]) -> torch.Tensor:
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


def thin(where: list[Placement], at_most: int) -> list[Placement]:
    """Every k-th placement (k the smallest step leaving at most `at_most`): a cheaper sweep
    with the same spread of sizes and positions, for ranking many candidates."""
    if at_most < 1:
        raise WorkbenchError(f"at_most must be >= 1, got {at_most}")
    step = -(-len(where) // at_most)
    return where[::step]


def resize_patch(patch: torch.Tensor, size: int) -> torch.Tensor:
    """`patch` (C, h, w) resized to `size` x `size` (antialiased bilinear; unchanged when it already is)."""
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
def sweep_success(handle: ModelHandle, images: torch.Tensor, patch: torch.Tensor, where: list[Placement],
                  target: int, *, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(success (P, N) bool: predicted == target, p(target) (P, N)) for every placement x image."""
    dev = handle.device
    succ = torch.empty(len(where), len(images), dtype=torch.bool)
    prob = torch.empty(len(where), len(images))
    sized = {s: resize_patch(patch, s).to(dev) for s in {w[2] for w in where}}
    x = images.to(dev)
    per = max(1, batch_size // max(len(images), 1))
    for i in range(0, len(where), per):
        chunk = where[i:i + per]
        batch = torch.cat([paste(x, sized[s], top, left) for top, left, s in chunk])
        out = logits(handle, batch).float()
        p = torch.softmax(out, -1)
        succ[i:i + len(chunk)] = (out.argmax(-1) == target).cpu().view(len(chunk), len(images))
        prob[i:i + len(chunk)] = p[:, target].cpu().view(len(chunk), len(images))
    return succ, prob


def protocol_metrics(calib: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                     where: list[Placement]) -> dict[str, Any]:
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


def natural_crop(pool: torch.Tensor, labels: torch.Tensor | None, target: int, size: int,
                 generator: torch.Generator) -> PatchDesign:
    """The natural-crop control: a random `size` px crop of a random non-target image of `pool`
    (any pool image when there are no `labels`)."""
    cand = torch.arange(len(pool)) if labels is None else torch.nonzero(labels != target).flatten()
    i = int(cand[int(torch.randint(len(cand), (1,), generator=generator))])
    h, w = pool.shape[-2:]
    y = int(torch.randint(h - size + 1, (1,), generator=generator))
    x = int(torch.randint(w - size + 1, (1,), generator=generator))
    return PatchDesign(pool[i, :, y:y + size, x:x + size].clone(), "natural", {"pool_index": i, "box": [y, x, y + size, x + size]})


def control_candidates(pre: Any, size: int, n: int, generator: torch.Generator, pool: torch.Tensor,
                       pool_labels: torch.Tensor | None, target: int) -> tuple[list[PatchDesign], list[PatchDesign]]:
    """`n` uniform-noise patches and `n` natural crops of `size` px, drawn in that order from `generator`."""
    lo, hi = pre.input_range
    noise = [PatchDesign(lo + (hi - lo) * torch.rand(pre.channels, size, size, generator=generator), "noise")
             for _ in range(n)]
    natural = [natural_crop(pool, pool_labels, target, size, generator) for _ in range(n)]
    return noise, natural


def rank_candidates(sweep: Any, candidates: list[PatchDesign]) -> list[tuple[float, PatchDesign, Any]]:
    """Candidates best first by `sweep(patch) -> (success, prob)` on the ranking images: the share of
    images flipped at some placement, ties broken by the mean best target probability."""
    scored = []
    for d in candidates:
        s, p = sweep(d.patch)
        scored.append((float(s.any(0).float().mean()) + 1e-3 * float(p.max(0).values.mean()), d, (s, p)))
    scored.sort(key=lambda t: -t[0])
    return scored


# --- the protocol ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepPlan:
    """The source images as the protocol counts them, and the sweep.

    `probs` (N, classes): predictions before the patch; `truth` (N,): the labels (the
    predictions when none were given); `counted`: indices of the non-target images classified
    correctly; `calibration` / `test`: its disjoint split; `where`: every placement.
    """

    probs: torch.Tensor
    truth: torch.Tensor
    counted: torch.Tensor
    calibration: torch.Tensor
    test: torch.Tensor
    where: list[Placement]


def plan_sweep(handle: ModelHandle, images: torch.Tensor, labels: torch.Tensor | None, target: int, *,
               config: SweepConfig, seed: int) -> SweepPlan:
    """Check the inputs, count the correctly classified non-target images and split them by
    `config.calib_fraction` with `seed` (the same split for the same images and seed)."""
    pre = handle.preprocess
    if pre is None:
        raise WorkbenchError(f"{handle.spec} is not an image model; copy/paste needs ImagePreprocess")
    pre.check(images)
    n_classes = int(predict(handle, images[:1])[1].shape[1])
    if not 0 <= target < n_classes:
        raise WorkbenchError(f"target class {target} is out of range; the model has {n_classes} classes (0..{n_classes - 1})")
    if not 0.0 < config.calib_fraction < 1.0:
        raise WorkbenchError(f"calib_fraction {config.calib_fraction} must be between 0 and 1")
    probs = predict(handle, images, batch_size=config.batch_size)[1]
    pred = probs.argmax(-1)
    truth = labels if labels is not None else pred
    counted = torch.nonzero((pred == truth) & (truth != target)).flatten()
    if len(counted) < 2:
        raise WorkbenchError(f"only {len(counted)} inputs are non-target images classified correctly before the patch; "
                             "give more source-class images (only those count, as in the Activation Atlas protocol)")
    g = torch.Generator().manual_seed(seed)
    perm = counted[torch.randperm(len(counted), generator=g)]
    n_cal = max(1, min(len(perm) - 1, round(config.calib_fraction * len(perm))))
    where = placements(pre.height, pre.width, config.sizes_px(handle), config.grid)
    return SweepPlan(probs, truth, counted, perm[:n_cal], perm[n_cal:], where)


def run_sweep(handle: ModelHandle, images: torch.Tensor, plan: SweepPlan, target: int, designs: list[PatchDesign], *,
              config: SweepConfig, seed: int, natural_pool: tuple[torch.Tensor, torch.Tensor | None],
              class_names: tuple[str, ...] = (), object_masks: torch.Tensor | None = None,
              progress: bool = False) -> dict[str, Any]:
    """Rank `designs` on the calibration split, measure the chosen one and both controls on the test split.

    `natural_pool`: (images, labels or None) the natural-crop control is cut from. `object_masks`
    (N, H, W): where each image's own object is; a placement that would cover more than
    `config.max_occlusion` of it is not tried on that image (it stays unpatched: no success, its
    own target probability), for the design and both controls alike. Returns the metrics, and
    under "_tensors" the chosen patch, the test indices, each test image's best placement index,
    the placements and the ranked candidates.
    """
    pre = handle.preprocess
    assert pre is not None
    if not designs:
        raise WorkbenchError("no candidate patch left to measure (all were another class's object, or none was given)")
    if object_masks is not None and tuple(object_masks.shape) != (len(images), *images.shape[-2:]):
        raise WorkbenchError(f"object_masks must be (N, H, W) = ({len(images)}, {images.shape[-2]}, {images.shape[-1]}), "
                             f"one mask of the source object per image; got {tuple(object_masks.shape)}")
    probs0, cal, test, where = plan.probs, plan.calibration, plan.test, plan.where

    def sweep(which: torch.Tensor, patch: torch.Tensor, at: list[Placement]) -> tuple[torch.Tensor, torch.Tensor]:
        succ, prob = sweep_success(handle, images[which], patch, at, target, batch_size=config.batch_size)
        if object_masks is not None:  # a placement hiding too much of the object is not tried: the image stays as it was
            hidden = occlusion(object_masks[which], at) > config.max_occlusion
            succ = succ & ~hidden
            prob = torch.where(hidden, probs0[which, target][None].expand_as(prob), prob)
        return succ, prob

    n_controls = len(designs) if config.controls == "best_of_n" else 1
    bar = progress_bar(total=len(designs) + (2 * n_controls if n_controls > 1 else 0), desc="copy-paste sweep",
                       enabled=progress, leave=False)
    rank = cal[: config.n_rank]  # candidates are ranked on (at most) n_rank calibration images
    rank_where = thin(where, config.n_rank_placements)
    whole = len(rank) == len(cal) and len(rank_where) == len(where)

    def on_rank(patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bar.update(1)
        return sweep(rank, patch, rank_where)

    scored = rank_candidates(on_rank, designs)
    chosen = scored[0][1]
    cal_sp = scored[0][2] if whole else None
    gen = torch.Generator().manual_seed(seed + 1)
    size = chosen.patch.shape[-1]
    noises, naturals = control_candidates(pre, size, n_controls, gen, *natural_pool, target)
    if n_controls > 1:  # the controls get the designs' own selection
        best_noise, best_natural = rank_candidates(on_rank, noises)[0], rank_candidates(on_rank, naturals)[0]
        noise, natural = best_noise[1], best_natural[1]
        noise_cal, natural_cal = (best_noise[2], best_natural[2]) if whole else (None, None)
    else:
        (noise,), (natural,), noise_cal, natural_cal = noises, naturals, None, None
    results: dict[str, dict[str, Any]] = {}
    best_idx = None
    measured = (("design", chosen, cal_sp), ("noise", noise, noise_cal), ("natural", natural, natural_cal))
    for name, d, cal_res in measured:
        if cal_res is None:
            cal_res = sweep(cal, d.patch, where)
        t_res = sweep(test, d.patch, where)
        m = protocol_metrics(cal_res, t_res, where)
        if name == "design":
            best_idx = m["best_placement_index"]
            consistent_k = m["consistent_index"]
            t_succ = t_res[0]
        results[name] = {k: v for k, v in m.items() if k not in ("best_placement_index", "consistent_index")}
    bar.close()
    # per source class successes / attempts (test split, best placement)
    per_class: dict[str, dict[str, int]] = {}
    tl = plan.truth[test]
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
        "n_excluded_incorrect_or_target": int(len(images) - len(plan.counted)),
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
        "controls": {"noise": results["noise"], "natural": results["natural"], "selection": config.controls,
                     "candidates_each": n_controls},
        "_tensors": {"patch": chosen.patch, "test_index": test, "best_index": best_idx, "where": where,
                     "candidates": [d for _, d, _ in scored]},
    }
    return out
