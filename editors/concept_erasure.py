"""Concept erasure (LEACE, Belrose et al. 2023) folded into the weights around a site.

LEACE (from the `concept-erasure` package) fits an affine map `x -> x - L R (x - b)` on a
site's representations so that no linear classifier can predict the concept from them
better than a constant, while moving them as little as possible (least squares); the
"orth" variant is the plain orthogonal projection off the class-mean-difference directions.

The eraser is folded into the weights, as a WeightDelta (a rank-k change plus a bias):

- a site **written** by a Linear/Conv1D (`blocks.L.attn.hook_out`, `blocks.L.mlp.hook_out`,
  `blocks.L.mlp.hook_pre`, any Linear's output) or a Conv2d (its output channels, every
  position): `W <- (I - L R) W`, `c <- (I - L R) c + L R b`;
- a site **read** by a Linear/Conv1D (`blocks.L.mlp.hook_post`, `NAME:input`): the reader
  sees the erased vector: `W <- W (I - L R)`, `c <- c + W L R b`. The site's own activation
  is unchanged; what the next layer computes from it (the MLP output) no longer carries the
  concept linearly, because anything linear in an erased vector is erased too.

The residual stream cannot be done this way, and we say so instead of approximating: in
pre-LN GPT-2/NeoX/Llama it is a sum written by every layer through weightless skip
connections and read through LayerNorm (which is not affine over a batch), and in post-LN
BERT/MiniLM each block output is a LayerNorm of a skip sum. An affine map on it has no
exact weight equivalent. For such sites `ConceptErasure.fit` raises an error that says this
and points at `erasure_hook`, the exact run-time alternative (fit the eraser with
`fit_eraser`).

Probes: `probe_accuracy` (a logistic-regression probe trained on one split, scored on
another) is how the effect is measured; representations are pooled per input (`pooling`),
and the eraser is fitted on the same pooled vectors (mean pooling commutes with an affine
map, so per-token erasure of pooled-fitted LEACE erases the pooled representation).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from editors.folding import NotFoldableError, canonical_kind, following_batchnorm, is_conv1d_hf
from editors.registry import register
from workbench.delta import LowRank, WeightDelta, assert_unchanged
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.sites import Site, resolve_site

log = logging.getLogger(__name__)

EraseMethod = Literal["leace", "orth"]
Pooling = Literal["mean", "first", "last", "none"]

MIN_PER_CLASS = 2
IMBALANCE_WARN = 0.2  # warn when the smallest class is under 20% of the largest


@dataclass(frozen=True)
class ConceptData:
    """Inputs (texts or an image tensor) and one integer class label per input."""

    inputs: Any
    labels: tuple[int, ...]

    @staticmethod
    def of(inputs: Any, labels: Sequence[int] | torch.Tensor) -> ConceptData:
        lab = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
        return ConceptData(inputs, tuple(int(v) for v in lab))


def check_concept(data: ConceptData) -> dict[int, int]:
    """Validate concept data: non-empty, one label per input, >= 2 classes of >= 2 inputs each.

    Warns when the classes are unbalanced beyond what the estimate supports well (smallest
    class under 20% of the largest): LEACE's guarantee still holds on the fitting data, but
    the minority class's statistics are noisy and the erasure generalizes worse.
    Returns {class: count}.
    """
    n = data.inputs.shape[0] if isinstance(data.inputs, torch.Tensor) else len(data.inputs) if data.inputs is not None else 0
    if n == 0:
        raise WorkbenchError("concept data is empty: give inputs (texts or images) and one class label per input")
    if len(data.labels) != n:
        raise WorkbenchError(f"{n} inputs but {len(data.labels)} labels; give exactly one label per input")
    counts: dict[int, int] = {}
    for v in data.labels:
        if v < 0:
            raise WorkbenchError(f"labels must be class indices >= 0; got {v}")
        counts[v] = counts.get(v, 0) + 1
    if len(counts) < 2:
        raise WorkbenchError(f"concept data has a single class ({next(iter(counts))}); erasure needs examples of at least two "
                             "classes (e.g. positive and negative sentences)")
    small = {c: k for c, k in counts.items() if k < MIN_PER_CLASS}
    if small:
        raise WorkbenchError(f"classes {sorted(small)} have fewer than {MIN_PER_CLASS} examples; give more examples of each class")
    lo, hi = min(counts.values()), max(counts.values())
    if lo < IMBALANCE_WARN * hi:
        log.warning("concept classes are unbalanced (%s): the smallest is %.0f%% of the largest; LEACE still erases on the "
                    "fitting data, but its estimate (and a probe's chance level) is dominated by the large class; "
                    "balance the classes or add minority examples", counts, 100 * lo / hi)
    return counts


def representations(handle: ModelHandle, site: str | Site, inputs: Any, *, pooling: Pooling = "mean",
                    batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pooled site representations (N, d), or with pooling='none' every real token (rows, d) and
    the input index of each row."""
    from workbench.hooks import capture
    from workbench.models import run_model
    from workbench.unit_selection import input_batches, pool_tokens

    resolved = resolve_site(handle, site)
    rows, owners = [], []
    seen = 0
    with torch.no_grad():
        for batch, mask in input_batches(handle, inputs, batch_size):
            with capture(handle, [resolved], stop=True) as acts:
                run_model(handle.model, batch)
            act = acts[resolved.name].float()
            if act.ndim == 4:  # images: channels are the features; pool over space
                act = act.flatten(2).transpose(1, 2)
                mask = None
            if act.ndim == 2:
                rows.append(act)
                owners.append(torch.arange(seen, seen + act.shape[0]))
            elif pooling == "none":
                m = torch.ones(act.shape[:2], dtype=torch.bool) if mask is None else mask.bool().cpu()
                rows.append(act.cpu()[m])
                owners.append((torch.arange(act.shape[0])[:, None].expand_as(m) + seen)[m])
            else:
                rows.append(pool_tokens(act, mask, pooling).cpu())
            seen += act.shape[0]
    x = torch.cat(rows).cpu()
    return x, (torch.cat(owners) if pooling == "none" and owners else None)


def _one_hot(labels: torch.Tensor, classes: list[int]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(classes)}
    z = torch.zeros(labels.shape[0], len(classes), dtype=torch.float64)
    z[torch.arange(labels.shape[0]), torch.tensor([index[int(v)] for v in labels])] = 1.0
    return z


def fit_eraser(handle: ModelHandle, site: str | Site, data: ConceptData, *, method: EraseMethod = "leace",
               pooling: Pooling = "mean", affine: bool = True, batch_size: int = 64) -> Any:
    """Fit a `concept_erasure.LeaceEraser` on the site's (pooled) representations of `data`."""
    from concept_erasure import LeaceFitter

    counts = check_concept(data)
    if method not in ("leace", "orth"):
        raise WorkbenchError(f"method must be 'leace' or 'orth'; got {method!r}")
    x, owners = representations(handle, site, data.inputs, pooling=pooling, batch_size=batch_size)
    labels = torch.tensor(data.labels)
    if owners is not None:
        labels = labels[owners]
    x = x.double()
    classes = sorted(counts)
    fitter = LeaceFitter(x.shape[1], len(classes), method=method, affine=affine, dtype=torch.float64)
    fitter.update(x, _one_hot(labels, classes))
    return fitter.eraser


@contextmanager
def erasure_hook(handle: ModelHandle, site: str | Site, eraser: Any) -> Iterator[None]:
    """Apply a fitted eraser to every position of a site at run time (works for any site)."""
    from workbench.hooks import edit

    resolved = resolve_site(handle, site)

    def fn(act: torch.Tensor) -> torch.Tensor:
        if act.ndim == 4:  # (N, C, H, W): channels are the features
            moved = act.movedim(1, -1)
            return _apply(eraser, moved).movedim(-1, 1)
        return _apply(eraser, act)

    with edit(handle, {resolved: fn}):
        yield


def _apply(eraser: Any, act: torch.Tensor) -> torch.Tensor:
    left = eraser.proj_left.to(act.device, torch.float64)
    right = eraser.proj_right.to(act.device, torch.float64)
    x = act.double()
    delta = x - eraser.bias.to(act.device, torch.float64) if eraser.bias is not None else x
    return (x - (delta @ right.T) @ left.T).to(act.dtype)


# --------------------------------------------------------------------------------------
# Folding
# --------------------------------------------------------------------------------------

_WRITER_ROLES = {"mlp.hook_out": "mlp_out", "attn.hook_out": "attn_out", "mlp.hook_pre": "mlp_in"}


def _not_foldable(site: Site, why: str) -> NotFoldableError:
    return NotFoldableError(
        f"cannot fold an eraser for site {site.name} into weights: {why}. Use the exact run-time hook instead: "
        "`eraser = editors.concept_erasure.fit_eraser(handle, site, data)` then "
        "`with editors.concept_erasure.erasure_hook(handle, site, eraser): ...`; or choose a site that a projection "
        "writes (blocks.L.attn.hook_out, blocks.L.mlp.hook_out, blocks.L.mlp.hook_pre) or reads (blocks.L.mlp.hook_post)")


def fold_target(handle: ModelHandle, site: str | Site) -> tuple[str, str, nn.Module]:
    """Which layer absorbs an eraser for this site: ("write" | "read", module path, module).

    Raises NotFoldableError explaining why (residual stream, LayerNorm, no linear layer).
    """
    resolved = resolve_site(handle, site)
    model = handle.model
    module = model.get_submodule(resolved.module_path)
    linear = isinstance(module, nn.Linear) or is_conv1d_hf(module)
    if linear:
        return ("read" if resolved.side == "input" else "write"), resolved.module_path, module
    if isinstance(module, nn.Conv2d) and resolved.side == "output" and module.groups == 1:
        return "write", resolved.module_path, module  # output channels are the features: W <- (I - L R) W per tap
    kind = canonical_kind(resolved)
    site_map = handle.arch.site_map
    if resolved.side == "output" and kind in _WRITER_ROLES and site_map is not None and resolved.layer is not None:
        role = _WRITER_ROLES[kind]
        if kind == "mlp.hook_pre" and "mlp_gate" in site_map.weights:
            role = "mlp_gate"
        path = site_map.weight_name(model, role, resolved.layer).rsplit(".", 1)[0]
        _check_writer(handle, resolved, path)
        return "write", path, model.get_submodule(path)
    if kind is not None and ("resid" in kind or kind.startswith("hook_") or kind.startswith("ln_final")):
        family = handle.arch.family
        norm = "post-LN (each block output is LayerNorm(x + sublayer(x)))" if family == "bert" else \
            "pre-LN (every layer adds into it through a weightless skip connection and reads it through LayerNorm)"
        raise _not_foldable(resolved, f"it is the residual stream of a {norm} {family} model; no single weight writes or reads "
                                      "it linearly, so an affine map on it has no exact weight equivalent")
    if isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower():
        raise _not_foldable(resolved, f"{resolved.module_path} is a normalization layer, whose output is not an affine function of its input")
    raise _not_foldable(resolved, f"{resolved.module_path} ({type(module).__name__}, {resolved.side} side) is not written or read by a Linear layer")


def _check_writer(handle: ModelHandle, site: Site, path: str) -> None:
    """The site must equal the writer's output (e.g. no dropout/gating after the projection in eval mode)."""
    from workbench.hooks import capture
    from workbench.models import dummy_input, run_model

    with torch.no_grad(), capture(handle, [site.name, path]) as acts:
        run_model(handle.model, dummy_input(handle))
    a, b = acts.get(site.name), acts.get(path)
    if a is None or b is None or a.shape != b.shape or not torch.allclose(a, b, atol=1e-5, rtol=1e-4):
        raise _not_foldable(site, f"its activation is not exactly the output of {path}")


def eraser_delta(handle: ModelHandle, site: str | Site, eraser: Any, *, method: str = "erase",
                 request: Any = None, extra: dict[str, Any] | None = None) -> WeightDelta:
    """Fold a fitted eraser into the layer that writes (or reads) the site, as a WeightDelta."""
    resolved = resolve_site(handle, site)
    side, path, module = fold_target(handle, resolved)
    left = eraser.proj_left.detach().double().cpu()   # (d, k)
    right = eraser.proj_right.detach().double().cpu()  # (k, d)
    bias_b = None if eraser.bias is None else eraser.bias.detach().double().cpu()
    w = module.weight.detach().double().cpu()
    conv1d = is_conv1d_hf(module)
    conv2d = isinstance(module, nn.Conv2d)
    w_oi = w.T if conv1d else w.reshape(w.shape[0], -1) if conv2d else w  # (d_out, d_in [x taps])
    has_bias = getattr(module, "bias", None) is not None
    changes: dict[str, Any] = {}
    dtype = module.weight.dtype
    if side == "write":
        if w_oi.shape[0] != left.shape[0]:
            raise WorkbenchError(f"eraser is for {left.shape[0]}-dim vectors but {path} writes {w_oi.shape[0]}")
        # W_oi <- W_oi - L (R W_oi)
        rw = right @ w_oi  # (k, d_in)
        u, v = compact_factors(-left, rw.T)
        if conv2d:  # a dense change of the kernel: (I - L R) applied to every tap's output channels
            changes[f"{path}.weight"] = (u @ v.T).reshape(w.shape).to(dtype)
        else:  # W_io = W_oi^T: the change is v u^T
            changes[f"{path}.weight"] = LowRank(v.to(dtype), u.to(dtype)) if conv1d else LowRank(u.to(dtype), v.to(dtype))
        c = module.bias.detach().double().cpu() if has_bias else torch.zeros(w_oi.shape[0], dtype=torch.float64)
        db = -(left @ (right @ c))
        if bias_b is not None:
            db = db + left @ (right @ bias_b)
    else:
        if w_oi.shape[1] != left.shape[0]:
            raise WorkbenchError(f"eraser is for {left.shape[0]}-dim vectors but {path} reads {w_oi.shape[1]}")
        wl = w_oi @ left  # (d_out, k)
        u, v = compact_factors(-wl, right.T)
        changes[f"{path}.weight"] = LowRank(v.to(dtype), u.to(dtype)) if conv1d else LowRank(u.to(dtype), v.to(dtype))
        db = wl @ (right @ bias_b) if bias_b is not None else torch.zeros(w_oi.shape[0], dtype=torch.float64)
    if bool((db.abs() > 0).any()):
        norm = None if has_bias or side != "write" else following_batchnorm(handle.model, path)
        if norm is not None:  # a bias-free conv read only by a BatchNorm: the constant moves into its beta
            bn_path, bn = norm
            gain = bn.weight.detach().double().cpu() / torch.sqrt(bn.running_var.detach().double().cpu() + bn.eps)
            changes[f"{bn_path}.bias"] = (gain * db).to(bn.bias.dtype)
        elif not has_bias:
            raise _not_foldable(resolved, f"{path} has no bias to carry the eraser's constant term (LEACE keeps the mean), "
                                          "nor a BatchNorm alone after it; fit with affine=False to fold only the "
                                          "projection, or use the run-time hook")
        else:
            changes[f"{path}.bias"] = db.to(dtype)
    meta = {"site": resolved.name, "side": side, "module": path, "rank": int(u.shape[1]), **(extra or {})}
    return WeightDelta.from_model(handle.model, changes, method=method, request=request, extra=meta)


def compact_factors(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the change `u @ v.T` with as many columns as its numerical rank (float64).

    LEACE stores a k-class eraser in k columns, of which at most k - 1 are independent (the
    class indicators sum to one; a binary concept is a rank-1 change); the columns that add
    nothing are dropped, with the threshold `torch.linalg.matrix_rank` uses for float32.
    """
    u, v = u.double(), v.double()
    qu, ru = torch.linalg.qr(u)
    qv, rv = torch.linalg.qr(v)
    a, s, bh = torch.linalg.svd(ru @ rv.T)
    tol = float(s.max()) * max(u.shape[0], v.shape[0]) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    r = int((s > tol).sum())
    return qu @ (a[:, :r] * s[:r]), qv @ bh[:r].T


@register("erase")
@dataclass(frozen=True)
class ConceptErasure:
    """LEACE (or "orth") at `site`, folded into the layer that writes or reads it.

    `fit(handle, request)`: request is a ConceptData (inputs + integer labels). `pooling`:
    how a text's tokens become one vector for fitting (mean, first, last; "none" fits on
    every token with its text's label). `affine=False` drops the mean-restoring constant
    (needed for projections without a bias, e.g. Llama's).
    """

    site: str
    method: EraseMethod = "leace"
    pooling: Pooling = "mean"
    affine: bool = True

    name: ClassVar[str] = "erase"

    def __post_init__(self) -> None:
        if self.method not in ("leace", "orth"):
            raise WorkbenchError(f"method must be 'leace' or 'orth'; got {self.method!r}")
        if self.pooling not in ("mean", "first", "last", "none"):
            raise WorkbenchError(f"pooling must be mean, first, last or none; got {self.pooling!r}")

    def fit(self, handle: ModelHandle, request: ConceptData) -> WeightDelta:
        if not isinstance(request, ConceptData):
            raise WorkbenchError("erase needs a ConceptData(inputs, labels) request")
        fold_target(handle, self.site)  # fail before the (slower) fit when the site cannot be folded
        counts = check_concept(request)
        with assert_unchanged(handle.model):
            eraser = fit_eraser(handle, self.site, request, method=self.method, pooling=self.pooling, affine=self.affine)
            delta = eraser_delta(handle, self.site, eraser, method="erase",
                                 request={"n": len(request.labels), "classes": {str(k): v for k, v in sorted(counts.items())}},
                                 extra={"config": asdict(self)})
        if delta.extra["rank"] == 0:
            log.warning("the %s eraser at %s changes no direction: the concept's cross-covariance there is below the "
                        "fitter's tolerance (svd_tol 0.01), so nothing is erased; try leace or another site", self.method,
                        self.site)
        return delta


# --------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------


def stratified_split(labels: Sequence[int], *, train_share: float, seed: int,
                     keys: Sequence[Any] | None = None) -> tuple[list[int], list[int]]:
    """Seeded stratified split: (train indices, test indices), each class in both parts in proportion.

    Each class's examples are ordered by `keys` (e.g. the texts; default: their positions)
    and then shuffled with `seed`, so with keys the split depends on the data and the seed,
    not on the order of the file. A class of n >= 2 examples puts round(train_share * n),
    at least 1 and at most n - 1, in the training part.
    """
    if not 0.0 < train_share < 1.0:
        raise WorkbenchError(f"train share {train_share}: expected a number between 0 and 1")
    if keys is not None and len(keys) != len(labels):
        raise WorkbenchError(f"{len(keys)} keys for {len(labels)} labels; give one key per example")
    canonical = list(range(len(labels))) if keys is None else sorted(range(len(labels)), key=lambda i: (str(keys[i]), i))
    by_class: dict[int, list[int]] = {}
    for i in canonical:
        by_class.setdefault(int(labels[i]), []).append(i)
    rng = random.Random(seed)
    train: list[int] = []
    test: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        n = len(members)
        k = n if n < 2 else min(max(round(train_share * n), 1), n - 1)
        train += members[:k]
        test += members[k:]
    position = {i: rank for rank, i in enumerate(canonical)}
    return sorted(train, key=position.__getitem__), sorted(test, key=position.__getitem__)


def probe_accuracy(x_train: torch.Tensor, y_train: torch.Tensor | Sequence[int], x_test: torch.Tensor,
                   y_test: torch.Tensor | Sequence[int], *, l2: float = 1e-3, steps: int = 200) -> float:
    """Test accuracy of a multinomial logistic-regression probe (standardized features, L-BFGS)."""
    ytr = torch.as_tensor(y_train, dtype=torch.long)
    yte = torch.as_tensor(y_test, dtype=torch.long)
    classes = sorted(set(ytr.tolist()) | set(yte.tolist()))
    remap = {c: i for i, c in enumerate(classes)}
    ytr = torch.tensor([remap[int(v)] for v in ytr])
    yte = torch.tensor([remap[int(v)] for v in yte])
    xtr, xte = x_train.double(), x_test.double()
    mu, sd = xtr.mean(0), xtr.std(0).clamp(min=1e-6)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    w = torch.zeros(xtr.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, ytr) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xte @ w + b).argmax(1) == yte).double().mean())


# --------------------------------------------------------------------------------------
# Example concepts: sentences written from templates (sentiment x topic, independent)
# --------------------------------------------------------------------------------------

_SUBJECTS = ("My sister", "The new manager", "Our neighbour", "A friend of mine", "The teacher", "My uncle", "The visitor",
             "Everyone in the group", "The critic", "My colleague", "The old man", "A young student")
_TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "food": (("the soup", "the pasta", "the dessert", "the bread", "the curry", "the salad", "the pizza", "the breakfast"),
             ("at the restaurant", "in the kitchen", "at dinner", "at the cafe")),
    "sports": (("the match", "the race", "the football game", "the tennis final", "the training session", "the tournament",
                "the swim meet", "the marathon"), ("at the stadium", "on the field", "at the arena", "at the track")),
    "travel": (("the flight", "the hotel", "the train journey", "the beach holiday", "the road trip", "the city tour",
                "the cruise", "the mountain hike"), ("last summer", "on the trip", "abroad", "during the holiday")),
    "technology": (("the new phone", "the laptop", "the software update", "the camera", "the app", "the game console",
                    "the smart watch", "the printer"), ("at work", "at home", "in the office", "this week")),
}
_POSITIVE = ("wonderful", "excellent", "delightful", "fantastic", "lovely", "brilliant", "superb", "amazing", "great", "pleasant")
_NEGATIVE = ("terrible", "awful", "disappointing", "horrible", "dreadful", "miserable", "poor", "annoying", "bad", "unpleasant")
_POS_VERBS = ("loved", "enjoyed", "praised", "adored", "admired")
_NEG_VERBS = ("hated", "disliked", "complained about", "regretted", "despised")
_TEMPLATES = (
    "{subj} {verb} {thing} {place}; it was {adj}.",
    "{subj} said {thing} {place} was {adj}.",
    "I think {thing} {place} was {adj}, and {subj_l} {verb} it.",
    "{subj} {verb} {thing} {place} because it felt {adj}.",
    "Honestly, {thing} {place} was {adj}.",
    "{subj} described {thing} {place} as {adj}.",
)
SENTIMENTS = ("negative", "positive")
TOPICS = tuple(_TOPICS)


MAX_EXAMPLE_SENTENCES = 100_000


def example_sentences(n: int, *, seed: int) -> tuple[list[str], list[int], list[int]]:
    """`n` template sentences with two independent labels: sentiment (0 neg, 1 pos) and topic (index into TOPICS).

    Sentiment and topic are drawn independently and balanced, so erasing one should leave
    the other: the test of an unrelated concept.
    """
    if not 2 <= n <= MAX_EXAMPLE_SENTENCES:
        raise WorkbenchError(f"ask for 2..{MAX_EXAMPLE_SENTENCES} template sentences; got {n} (for more, give your own "
                             "texts)")
    rng = random.Random(seed)
    texts, sentiment, topic = [], [], []
    for i in range(n):
        s = i % 2
        t = (i // 2) % len(TOPICS)
        things, places = _TOPICS[TOPICS[t]]
        subj = rng.choice(_SUBJECTS)
        text = rng.choice(_TEMPLATES).format(
            subj=subj, subj_l=subj[0].lower() + subj[1:], thing=rng.choice(things), place=rng.choice(places),
            verb=rng.choice(_POS_VERBS if s else _NEG_VERBS), adj=rng.choice(_POSITIVE if s else _NEGATIVE))
        texts.append(text[0].upper() + text[1:])
        sentiment.append(s)
        topic.append(t)
    order = list(range(n))
    rng.shuffle(order)
    return [texts[i] for i in order], [sentiment[i] for i in order], [topic[i] for i in order]
