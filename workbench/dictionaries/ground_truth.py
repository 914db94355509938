"""Dictionary latents judged against ground truth, beside AxBench's supervised baselines.

For every known feature of a world (ShapesWorld: each class shape, each main-object colour,
each implanted trojan's trigger; FactWorld: each relation a prompt asks) or of a user's
labelled examples, three detectors score every example, all from the same site and the same
labelled examples:

- `latent`: the best single latent's activation, max over the example's positions (conv
  positions or real tokens); the latent is picked by AUROC on the train split;
- `diffmean`: the difference-in-means direction (mean activation over the positions of
  positive train examples minus that of negative ones), projected at each position, max over
  positions (AxBench's DiffMean);
- `probe`: an L2-regularized logistic regression on the example's pooled activation (mean and
  max over positions, standardized), fitted on the train split.

Each is reported on the held-out test split: AUROC, and precision and recall at the threshold
that maximizes F1 on the train split, with percentile bootstrap intervals over test examples
(ties count half in the AUROC, exactly, also under resampling).

`trigger_search` asks whether a trojan's trigger latent is found without knowing the trigger:
on clean scenes it ranks every latent by the effect of adding its decoder direction (scaled to
the site's typical activation norm, at every position) on the target class's centered logit,
and reports where the trigger's best latent lands.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench.dictionaries.activations import is_shapes_model
from workbench.dictionaries.quality import dictionary_sites
from workbench.dictionaries.sae import SparseDictionary, feature_dim, site_rows
from workbench.errors import WorkbenchError
from workbench.fingerprint import model_fingerprint
from workbench.handle import ModelHandle
from workbench.hooks import capture, patch
from workbench.models import run_model
from workbench.progress import progress_bar
from workbench.sites import resolve_site
from workbench.unit_selection import input_batches

METHODS = ("latent", "diffmean", "probe")


# --------------------------------------------------------------------------------------
# Labelled examples
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledExamples:
    """Inputs (an image tensor or texts) with binary labels per named feature, and each feature's group."""

    inputs: torch.Tensor | list[str]
    labels: dict[str, torch.Tensor]
    groups: dict[str, str]
    description: str = ""

    def __post_init__(self) -> None:
        n = len(self)
        if n == 0:
            raise WorkbenchError("no labelled examples; give at least a few positives and negatives per feature")
        if not self.labels:
            raise WorkbenchError("the labelled examples name no feature")
        for name, lab in self.labels.items():
            if tuple(lab.shape) != (n,):
                raise WorkbenchError(f"feature {name!r} has {tuple(lab.shape)} labels for {n} examples; expected one per example")

    def __len__(self) -> int:
        return int(self.inputs.shape[0]) if isinstance(self.inputs, torch.Tensor) else len(self.inputs)


def world_examples(handle: ModelHandle, *, n_clean: int = 2000, n_per_trojan: int = 300, min_positives: int = 20,
                   seed: int = 0) -> LabelledExamples:
    """The known features of the handle's world with fresh labelled examples (see the module docstring).

    ShapesWorld: `n_clean` clean scenes plus `n_per_trojan` scenes of every class with one trojan's
    trigger (a trigger feature is the trigger's presence, whatever the class, so a class-universal
    trojan's trigger is not confounded with its source class); shapes and colours are the main
    object's; a colour is kept when at least `min_positives` scenes show it. FactWorld: its prompts (all, or `n_clean`).
    """
    if is_shapes_model(handle):
        return _shapes_examples(handle, n_clean=n_clean, n_per_trojan=n_per_trojan, min_positives=min_positives, seed=seed)
    world = handle.world
    if world is not None and hasattr(world, "prompts"):
        prompts = list(world.prompts())
        if len(prompts) > n_clean:
            keep = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))[:n_clean].sort().values
            prompts = [prompts[int(i)] for i in keep]
        relations = sorted({p.relation_id for p in prompts})
        labels = {f"relation:{r}": torch.tensor([p.relation_id == r for p in prompts]) for r in relations}
        return LabelledExamples([p.text for p in prompts], labels, {k: "relation" for k in labels},
                                f"{len(prompts)} FactWorld prompts")
    raise WorkbenchError(f"{handle.spec} has no world with known features; give labelled examples (--labels FILE)")


def _shapes_examples(handle: ModelHandle, *, n_clean: int, n_per_trojan: int, min_positives: int, seed: int) -> LabelledExamples:
    from workbench.devices import torch_threads
    from workbench.worlds.scene import PALETTE
    from workbench.worlds.shapesworld import Sample
    from workbench.zoo.shapesnet import world_of

    world = world_of(handle)
    g = torch.Generator().manual_seed(seed)
    parts = [world.sample(n_clean, generator=g)]
    for i in range(len(world.trojans)):
        parts.append(world.implant(world.sample(n_per_trojan, generator=g), i, generator=g, relabel=False))
    sample = Sample.cat(parts)
    with torch_threads(1):
        images = world.render(sample)
    assert isinstance(images, torch.Tensor)
    labels: dict[str, torch.Tensor] = {}
    groups: dict[str, str] = {}
    for c, name in enumerate(world.classes):
        labels[f"shape:{name}"] = sample.labels == c
        groups[f"shape:{name}"] = "shape"
    for c, name in enumerate(PALETTE):
        lab = sample.colors == c
        if int(lab.sum()) >= min_positives:
            labels[f"color:{name}"] = lab
            groups[f"color:{name}"] = "color"
    for i, t in enumerate(world.trojans):
        labels[f"trojan:{t.name}"] = sample.trojan == i
        groups[f"trojan:{t.name}"] = "trojan"
    return LabelledExamples(images, labels, groups,
                            f"{n_clean} clean ShapesWorld scenes + {n_per_trojan} triggered per trojan (seed {seed})")


def load_labelled_examples(path: str | os.PathLike[str]) -> LabelledExamples:
    """A user's labelled examples: JSON {"texts": [...], "labels": {"feature": [0/1, ...], ...}} (or one
    list of labels, named "label"), or safetensors with "images" (N, C, H, W) and a 0/1 tensor "label:NAME"
    per feature."""
    p = Path(path)
    if not p.is_file():
        raise WorkbenchError(f"labels file {p} does not exist")
    if p.suffix.lower() == ".safetensors":
        from workbench.dictionaries.sae import read_weights

        tensors = read_weights(p)
        if "images" not in tensors:
            raise WorkbenchError(f"{p} has no 'images' tensor; expected images (N, C, H, W) and 'label:NAME' tensors")
        labels = {k.split(":", 1)[1]: v.reshape(-1).bool() for k, v in tensors.items() if k.startswith("label:")}
        if not labels:
            raise WorkbenchError(f"{p} has no 'label:NAME' tensor; add one 0/1 tensor per feature")
        return LabelledExamples(tensors["images"].float(), labels, {k: "user" for k in labels}, f"labelled images from {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WorkbenchError(f"labels file {p} is not valid JSON ({exc}); expected {{\"texts\": [...], \"labels\": {{...}}}}") from None
    texts = data.get("texts") if isinstance(data, dict) else None
    raw = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise WorkbenchError(f"labels file {p} needs \"texts\": a non-empty list of strings")
    if isinstance(raw, list):
        raw = {"label": raw}
    if not isinstance(raw, dict) or not raw:
        raise WorkbenchError(f"labels file {p} needs \"labels\": {{\"feature\": [0/1 per text], ...}}")
    labels = {}
    for name, values in raw.items():
        if not isinstance(values, list) or not all(v in (0, 1, True, False) for v in values):
            raise WorkbenchError(f"labels file {p}: feature {name!r} must be a list of 0/1 values, one per text")
        labels[str(name)] = torch.tensor([bool(v) for v in values])
    return LabelledExamples(list(texts), labels, {k: "user" for k in labels}, f"labelled texts from {p}")


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


def check_dictionary_fits(handle: ModelHandle, dictionary: SparseDictionary, *, site: str | None = None) -> None:
    """Refuse a dictionary trained on another model (fingerprint) or site, or one whose size does not fit the site."""
    meta = dictionary.config.metadata
    if site is not None:
        given = resolve_site(handle, site)
        own = resolve_site(handle, dictionary.config.hook_name) if dictionary.config.hook_name else None
        if own is None or (given.module_path, given.side) != (own.module_path, own.side):
            raise WorkbenchError(f"the dictionary was trained on site {dictionary.config.hook_name!r}, not {site!r}; "
                                 "train one on that site or drop --site")
    sites = dictionary_sites(handle, dictionary)
    expected = meta.get("model_fingerprint")
    if expected:
        have = model_fingerprint(handle.model)
        if have != expected:
            raise WorkbenchError(f"the dictionary was trained on a model with fingerprint {str(expected)[:12]}..., and "
                                 f"{handle.spec} has {have[:12]}...; train a dictionary on this model")
    recorded = meta.get("site") or {}
    if recorded and (recorded.get("module_path"), recorded.get("side")) != (sites[0].module_path, sites[0].side):
        raise WorkbenchError(f"the dictionary's site {dictionary.config.hook_name!r} was {recorded.get('module_path')} "
                             f"({recorded.get('side')}) when trained, but is {sites[0].module_path} ({sites[0].side}) here")
    from workbench.hooks import site_shape

    shape = site_shape(handle, sites[0].name)
    dim = shape[1] if len(shape) == 4 else shape[-1]
    if dim != dictionary.config.d_in:
        raise WorkbenchError(f"site {sites[0].name} has {dim} features, the dictionary reads {dictionary.config.d_in}; "
                             "it was trained on another site or model")


# --------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------


def weighted_auroc(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AUROC of `scores` (n,) for boolean `labels` (n,) under example weights (B, n): (B,) values, ties counted
    half. Integer weights are a bootstrap resample; all-ones weights the plain AUROC (Mann-Whitney U)."""
    values, inverse = torch.unique(scores.double(), return_inverse=True)
    w = weights.double()
    lab = labels.double()
    pos = torch.zeros(w.shape[0], values.numel(), dtype=torch.float64).index_add_(1, inverse, w * lab)
    neg = torch.zeros_like(pos).index_add_(1, inverse, w * (1 - lab))
    below = neg.cumsum(1) - neg
    denom = pos.sum(1) * neg.sum(1)
    return torch.where(denom > 0, (pos * (below + 0.5 * neg)).sum(1) / denom.clamp(min=1e-300),
                       torch.tensor(float("nan"), dtype=torch.float64))


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float(weighted_auroc(scores, labels, torch.ones(1, scores.numel()))[0])


def auroc_columns(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AUROC of every column of `scores` (n, L) for every boolean column of `labels` (n, F): (F, L), ties
    counted half (average ranks)."""
    s = scores.double().T.contiguous()  # (L, n)
    ordered = s.sort(dim=1).values
    ranks = (torch.searchsorted(ordered, s, right=False) + torch.searchsorted(ordered, s, right=True) + 1).double() / 2
    y = labels.double()
    n_pos = y.sum(0)
    n_neg = y.shape[0] - n_pos
    u = y.T @ ranks.T - (n_pos * (n_pos + 1) / 2)[:, None]
    return u / (n_pos * n_neg).clamp(min=1)[:, None]


def best_f1_threshold(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The threshold t (predict positive when score >= t) that maximizes F1 on these examples."""
    values = torch.unique(scores.double())
    s, y = scores.double(), labels.bool()
    pred = s[None, :] >= values[:, None]
    tp = (pred & y[None]).sum(1).double()
    fp = (pred & ~y[None]).sum(1).double()
    fn = (~pred & y[None]).sum(1).double()
    f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
    return float(values[int(torch.argmax(f1))])


@dataclass(frozen=True)
class MethodScore:
    """One detector on the test split: AUROC, precision and recall at the train-chosen threshold, 95% intervals."""

    auroc: float
    auroc_ci: tuple[float, float]
    precision: float
    precision_ci: tuple[float, float]
    recall: float
    recall_ci: tuple[float, float]
    threshold: float

    def to_json(self) -> dict[str, Any]:
        def r(x: float) -> float | None:
            return round(x, 4) if math.isfinite(x) else None

        return {"auroc": r(self.auroc), "auroc_ci": [r(v) for v in self.auroc_ci], "precision": r(self.precision),
                "precision_ci": [r(v) for v in self.precision_ci], "recall": r(self.recall),
                "recall_ci": [r(v) for v in self.recall_ci], "threshold": r(self.threshold)}


def _ci(values: torch.Tensor) -> tuple[float, float]:
    v = values[torch.isfinite(values)]
    if v.numel() == 0:
        return (float("nan"), float("nan"))
    return (float(torch.quantile(v, 0.025)), float(torch.quantile(v, 0.975)))


def score_method(train_scores: torch.Tensor, train_labels: torch.Tensor, test_scores: torch.Tensor,
                 test_labels: torch.Tensor, resamples: torch.Tensor) -> MethodScore:
    """Test-split figures of one detector with bootstrap intervals (`resamples`: (B, n_test) example counts)."""
    threshold = best_f1_threshold(train_scores, train_labels)
    ones = torch.ones(1, test_scores.numel())
    a = float(weighted_auroc(test_scores, test_labels, ones)[0])
    boot_a = weighted_auroc(test_scores, test_labels, resamples)
    pred = (test_scores.double() >= threshold).double()
    y = test_labels.double()
    w = torch.cat([ones.double(), resamples.double()])
    tp = (w * pred * y).sum(1)
    pp = (w * pred).sum(1)
    p_all = (w * y).sum(1)
    precision = torch.where(pp > 0, tp / pp.clamp(min=1e-300), torch.tensor(float("nan"), dtype=torch.float64))
    recall = torch.where(p_all > 0, tp / p_all.clamp(min=1e-300), torch.tensor(float("nan"), dtype=torch.float64))
    return MethodScore(a, _ci(boot_a), float(precision[0]), _ci(precision[1:]), float(recall[0]), _ci(recall[1:]), threshold)


@dataclass(frozen=True)
class FeatureResult:
    feature: str
    group: str
    n_positive: int
    n_negative: int
    best_latent: int
    latent_train_auroc: float
    scores: dict[str, MethodScore]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"feature": self.feature, "group": self.group, "best_latent": self.best_latent,
                               "n_positive_test": self.n_positive, "n_negative_test": self.n_negative,
                               "latent_train_auroc": round(self.latent_train_auroc, 4)}
        lat = self.scores["latent"].to_json()
        out.update({"auroc": lat["auroc"], "auroc_ci": lat["auroc_ci"], "precision": lat["precision"], "recall": lat["recall"]})
        for m in ("diffmean", "probe"):
            js = self.scores[m].to_json()
            out[f"{m}_auroc"], out[f"{m}_auroc_ci"] = js["auroc"], js["auroc_ci"]
            out[f"{m}_precision"], out[f"{m}_recall"] = js["precision"], js["recall"]
        out["methods"] = {m: s.to_json() for m, s in self.scores.items()}
        return out


@dataclass(frozen=True)
class GroundTruthTable:
    """One `FeatureResult` per feature (features without enough positives or negatives are listed in `skipped`)."""

    site: str
    results: list[FeatureResult]
    n_train: int
    n_test: int
    n_bootstrap: int
    description: str
    skipped: dict[str, str] = field(default_factory=dict)

    def result(self, feature: str) -> FeatureResult:
        for r in self.results:
            if r.feature == feature:
                return r
        raise WorkbenchError(f"no result for feature {feature!r}; features: {', '.join(r.feature for r in self.results)}")

    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "n_train": self.n_train, "n_test": self.n_test, "n_bootstrap": self.n_bootstrap,
                "examples": self.description, "features": [r.to_json() for r in self.results], "skipped": self.skipped}

    def text(self) -> str:
        lines = [f"{'feature':<28} {'latent':>6} {'AUROC latent [95% CI]':>24} {'diff-in-means':>24} {'probe':>24}"]
        for r in self.results:
            cells = []
            for m in METHODS:
                s = r.scores[m]
                cells.append(f"{s.auroc:.3f} [{s.auroc_ci[0]:.3f}, {s.auroc_ci[1]:.3f}]")
            lines.append(f"{r.feature:<28} {r.best_latent:>6} {cells[0]:>24} {cells[1]:>24} {cells[2]:>24}")
        for name, why in self.skipped.items():
            lines.append(f"{name:<28} skipped: {why}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Activations:
    latent_max: torch.Tensor  # (N, d_sae)
    rows: torch.Tensor  # (N, P, d)
    mask: torch.Tensor  # (N, P) bool


@torch.no_grad()
def _collect(handle: ModelHandle, dictionary: SparseDictionary, inputs: torch.Tensor | list[str], *, batch_size: int,
             progress: bool) -> _Activations:
    site = dictionary_sites(handle, dictionary)[0]
    d = dictionary.to(handle.device).eval()
    lat, rows, masks = [], [], []
    n = int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) else len(inputs)
    bar = progress_bar(total=n, desc="latents on labelled examples", enabled=progress, unit="example", leave=False)
    try:
        for batch, mask in input_batches(handle, inputs, batch_size):
            with capture(handle, [site], stop=True) as acts:
                run_model(handle.model, batch)
            act = acts[site.name].float()
            if act.ndim == 4:
                per = act.flatten(2).transpose(1, 2)  # (B, H*W, C)
                m = torch.ones(per.shape[:2], dtype=torch.bool, device=per.device)
            elif act.ndim == 3:
                per = act
                m = mask.bool().to(act.device) if mask is not None else torch.ones(act.shape[:2], dtype=torch.bool, device=act.device)
            else:
                per = act.reshape(act.shape[0], 1, -1)
                m = torch.ones(per.shape[:2], dtype=torch.bool, device=per.device)
            codes = d.encode(per)
            codes = codes.masked_fill(~m[..., None], float("-inf"))
            lat.append(codes.amax(1).cpu())
            rows.append(per.cpu())
            masks.append(m.cpu())
            bar.update(per.shape[0])
    finally:
        bar.close()
    width = max(r.shape[1] for r in rows)
    rows = [torch.nn.functional.pad(r, (0, 0, 0, width - r.shape[1])) for r in rows]
    masks = [torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks]
    return _Activations(torch.cat(lat), torch.cat(rows), torch.cat(masks))


def _max_projection(acts: _Activations, directions: torch.Tensor) -> torch.Tensor:
    """(N, F): max over each example's positions of rows @ directions (d, F)."""
    proj = acts.rows @ directions
    return proj.masked_fill(~acts.mask[..., None], float("-inf")).amax(1)


def _pooled(acts: _Activations) -> torch.Tensor:
    m = acts.mask[..., None].float()
    mean = (acts.rows * m).sum(1) / m.sum(1).clamp(min=1)
    mx = acts.rows.masked_fill(~acts.mask[..., None], float("-inf")).amax(1)
    return torch.cat([mean, mx], dim=1).double()


def fit_probes(x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-3, steps: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logistic regressions, one per column of `y` (n, F), on standardized `x` (n, d): (W, b, mean, std)."""
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")
    target = y.double()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, target, reduction="sum") / z.shape[0]
        loss = loss + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach(), mean, std


def ground_truth_table(handle: ModelHandle, dictionary: SparseDictionary, examples: LabelledExamples | None = None, *,
                       test_fraction: float = 0.5, n_bootstrap: int = 1000, seed: int = 0, batch_size: int = 128,
                       progress: bool = True) -> GroundTruthTable:
    """Best latent vs difference-in-means vs probe for every feature (see the module docstring)."""
    if not 0.0 < test_fraction < 1.0:
        raise WorkbenchError(f"test_fraction={test_fraction}; expected a share strictly between 0 and 1")
    if n_bootstrap < 1:
        raise WorkbenchError(f"n_bootstrap={n_bootstrap}; expected at least 1")
    examples = world_examples(handle, seed=seed) if examples is None else examples
    if isinstance(examples.inputs, torch.Tensor) and handle.preprocess is None:
        raise WorkbenchError(f"{handle.spec} is not an image model; give texts as labelled examples")
    if not isinstance(examples.inputs, torch.Tensor) and handle.tokenizer is None:
        raise WorkbenchError(f"{handle.spec} has no tokenizer; give images as labelled examples")
    acts = _collect(handle, dictionary, examples.inputs, batch_size=batch_size, progress=progress)
    n = len(examples)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    n_test = max(1, int(round(n * test_fraction)))
    test, train = order[:n_test].sort().values, order[n_test:].sort().values
    resamples = torch.stack([torch.bincount(torch.randint(n_test, (n_test,), generator=g), minlength=n_test)
                             for _ in range(n_bootstrap)])

    names, skipped = [], {}
    for name, lab in examples.labels.items():
        lab = lab.bool()
        counts = [int(lab[train].sum()), int((~lab[train]).sum()), int(lab[test].sum()), int((~lab[test]).sum())]
        if min(counts) < 2:
            skipped[name] = f"too few positives or negatives in a split (train +{counts[0]}/-{counts[1]}, test +{counts[2]}/-{counts[3]})"
        else:
            names.append(name)
    if not names:
        raise WorkbenchError("no feature has at least 2 positives and 2 negatives in both halves; give more labelled examples")
    labels = torch.stack([examples.labels[k].bool() for k in names], 1)  # (N, F)

    # difference in means over positions, per feature
    m = acts.mask.float()
    pos_sum = torch.einsum("np,npd->nd", m, acts.rows)
    counts = m.sum(1)
    tr = labels[train].double()
    sums, cnt = pos_sum[train].double(), counts[train].double()
    mean_pos = (tr.T @ sums) / (tr.T @ cnt)[:, None]
    mean_neg = ((1 - tr).T @ sums) / ((1 - tr).T @ cnt)[:, None]
    dm_scores = _max_projection(acts, (mean_pos - mean_neg).T.float())  # (N, F)

    pooled = _pooled(acts)
    w, b, mu, sd = fit_probes(pooled[train], labels[train])
    probe_scores = ((pooled - mu) / sd) @ w + b  # (N, F)

    latent_train = auroc_columns(acts.latent_max[train], labels[train])  # (F, d_sae)
    results = []
    for j, name in enumerate(names):
        y = labels[:, j]
        train_aurocs = latent_train[j]
        best = int(torch.nan_to_num(train_aurocs, nan=-1.0).argmax())
        scores = {
            "latent": score_method(acts.latent_max[train, best], y[train], acts.latent_max[test, best], y[test], resamples),
            "diffmean": score_method(dm_scores[train, j], y[train], dm_scores[test, j], y[test], resamples),
            "probe": score_method(probe_scores[train, j], y[train], probe_scores[test, j], y[test], resamples),
        }
        results.append(FeatureResult(name, examples.groups.get(name, "user"), int(y[test].sum()), int((~y[test]).sum()),
                                     best, float(train_aurocs[best]), scores))
    return GroundTruthTable(dictionary.config.hook_name, results, int(train.numel()), n_test, n_bootstrap,
                            examples.description, skipped)


# --------------------------------------------------------------------------------------
# Finding a trigger's latent without the trigger
# --------------------------------------------------------------------------------------


@torch.no_grad()
def latent_logit_effects(handle: ModelHandle, dictionary: SparseDictionary, inputs: torch.Tensor | Sequence[str],
                         target: int, *, strength: float | None = None, batch_size: int = 128,
                         progress: bool = True) -> tuple[torch.Tensor, float]:
    """Per latent: the mean change of the target's centered logit (logit minus the mean logit) on `inputs`
    when its unit decoder direction, times `strength` (default: the mean norm of the site's activation
    vectors on `inputs`), is added at every position of the site. Returns (effects (d_sae,), strength)."""
    sites = dictionary_sites(handle, dictionary)
    site = sites[-1]
    directions = dictionary.decoder_directions().to(handle.device)
    batches = list(input_batches(handle, inputs if isinstance(inputs, torch.Tensor) else list(inputs), batch_size))

    def centered(out: Any, mask: torch.Tensor | None) -> torch.Tensor:
        logits = (out.logits if hasattr(out, "logits") else out).float()
        if logits.ndim == 3:
            last = (mask.sum(1).long() - 1) if mask is not None else torch.full((logits.shape[0],), logits.shape[1] - 1)
            logits = logits[torch.arange(logits.shape[0]), last.to(logits.device)]
        if logits.ndim != 2 or not 0 <= target < logits.shape[-1]:
            raise WorkbenchError(f"target {target} is not an output of this model (outputs of shape {tuple(logits.shape)})")
        return logits[:, target] - logits.mean(-1)

    base, norms = [], []
    for batch, mask in batches:
        with capture(handle, [site]) as acts:
            out = run_model(handle.model, batch)
        rows, _ = site_rows(acts[site.name].float())
        norms.append(rows.norm(dim=-1))
        base.append(centered(out, mask))
    base_value = torch.cat(base).mean()
    alpha = float(torch.cat(norms).mean()) if strength is None else float(strength)
    effects = torch.zeros(dictionary.d_sae)
    bar = progress_bar(total=dictionary.d_sae, desc="latent effects on the target logit", enabled=progress, unit="latent",
                       leave=False)
    try:
        for i in range(dictionary.d_sae):
            delta = alpha * directions[i]

            def add(act: torch.Tensor, delta: torch.Tensor = delta) -> torch.Tensor:
                shape = [1] * act.ndim
                shape[1 if act.ndim == 4 else act.ndim - 1] = feature_dim(act)
                return act + delta.to(act.dtype).reshape(shape)

            vals = []
            with patch(handle, {site: add}):
                for batch, mask in batches:
                    vals.append(centered(run_model(handle.model, batch), mask))
            effects[i] = float(torch.cat(vals).mean() - base_value)
            bar.update(1)
    finally:
        bar.close()
    return effects, alpha


def trigger_search(handle: ModelHandle, dictionary: SparseDictionary, table: GroundTruthTable, *, n_images: int = 128,
                   seed: int = 1, top: int = 5, progress: bool = True) -> list[dict[str, Any]]:
    """For each ShapesWorld trojan: rank latents by `latent_logit_effects` on clean scenes of the other classes
    (the trigger unknown, the target class given) and report where the trigger's best latent (from `table`) lands."""
    from workbench.devices import torch_threads
    from workbench.zoo.shapesnet import world_of

    if not is_shapes_model(handle):
        raise WorkbenchError(f"{handle.spec} has no implanted trojans (trigger search runs on a ShapesNet)")
    world = world_of(handle)
    out: list[dict[str, Any]] = []
    rankings: dict[str, tuple[torch.Tensor, float]] = {}
    for t in world.trojans:
        feature = f"trojan:{t.name}"
        if t.target not in rankings:
            target = world.class_index(t.target)
            others = [c for c in range(len(world.classes)) if c != target]
            sample = world.sample(n_images, generator=torch.Generator().manual_seed(seed), classes=others)
            with torch_threads(1):
                images = world.render(sample)
            assert isinstance(images, torch.Tensor)
            rankings[t.target] = latent_logit_effects(handle, dictionary, images, target, progress=progress)
        effects, alpha = rankings[t.target]
        order = torch.argsort(effects, descending=True, stable=True)
        try:
            trigger_latent = table.result(feature).best_latent
            trigger_auroc = table.result(feature).scores["latent"].auroc
        except WorkbenchError:
            continue
        rank = int((order == trigger_latent).nonzero()[0, 0]) + 1
        out.append({
            "trojan": t.name, "kind": t.kind, "target": t.target, "trigger_latent": trigger_latent,
            "trigger_latent_auroc": round(trigger_auroc, 4), "rank": rank, "n_latents": dictionary.d_sae,
            "found_in_top": rank <= top, "strength": round(alpha, 4),
            "top_latents": [{"latent": int(i), "effect": round(float(effects[i]), 4)} for i in order[:top]],
            "trigger_latent_effect": round(float(effects[trigger_latent]), 4),
        })
    return out


__all__ = ["FeatureResult", "GroundTruthTable", "LabelledExamples", "METHODS", "MethodScore", "auroc",
           "best_f1_threshold", "check_dictionary_fits", "fit_probes", "ground_truth_table", "latent_logit_effects",
           "load_labelled_examples", "score_method", "trigger_search", "weighted_auroc", "world_examples"]
