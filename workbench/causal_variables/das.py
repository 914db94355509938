"""Distributed alignment search and the subspaces it is compared with, scored by interchange accuracy.

DAS (Geiger et al.) learns a rotation R of a site's width by gradient descent so that swapping
the first k rotated coordinates of the base with the source's makes the model give the
counterfactual answer (cross-entropy on the counterfactual label); R is kept orthogonal by
`torch.nn.utils.parametrizations.orthogonal`. The baselines place the same k-dimensional
swap along directions found without interventions, fitted on the same training pairs'
representations and the variable's values:

- `probe`: the top-k right singular vectors of a multinomial logistic probe's (class-centred) weights;
- `leace`: the top-k directions (by erased variance) of the subspace LEACE (`concept_erasure`) erases;
- `diff_means`: the top-k principal directions of the class means;
- `sae`: the decoder directions of the k latents of a given dictionary whose activations separate
  the values best (between-class share of variance), orthonormalized;
- `neurons`: the k units (features, or channels of a conv map) the variable explains best, by the same
  score as the SAE latents (MIB's comparison for SAEs);
- `random`: k random orthonormal directions (the control);
- `full`: the whole vector (k = width): where the site carries the variable at all, and what else.

IIA, the interchange-intervention accuracy, is the share of held-out pairs on which the
intervened model outputs the counterfactual label, with a seeded bootstrap interval.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from workbench.causal_variables.interchange import InterchangeRunner, Target, interchange_hits
from workbench.causal_variables.pairs import InterchangePairs
from workbench.errors import WorkbenchError

log = logging.getLogger(__name__)

METHODS = ("das", "probe", "leace", "diff_means", "sae", "neurons", "random", "full")


@dataclass(frozen=True)
class DASConfig:
    """Subspace size, DAS's schedule, the split and the bootstrap; the same config and seed give the same numbers."""

    dim: int = 8
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-2
    held_out: float = 0.3
    seed: int = 0
    methods: tuple[str, ...] = ("das", "probe", "leace", "diff_means", "sae", "neurons", "random", "full")
    probe_steps: int = 200
    probe_weight_decay: float = 1e-3
    n_resamples: int = 2000

    def __post_init__(self) -> None:
        if self.dim <= 0:
            raise WorkbenchError(f"dim={self.dim}: the subspace needs at least one dimension")
        if self.steps <= 0 or self.batch_size <= 0 or self.probe_steps <= 0:
            raise WorkbenchError("steps, batch_size and probe_steps must be positive")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise WorkbenchError(f"lr={self.lr}: give a positive finite learning rate such as 0.01")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise WorkbenchError(f"methods {unknown or '()'}: choose from {', '.join(METHODS)}")


# --- directions ----------------------------------------------------------------------------------------------------


def orthonormal(vectors: torch.Tensor, k: int) -> torch.Tensor:
    """An orthonormal basis (width x r, r <= k) of the span of `vectors`' columns, leading directions first
    (by singular value); directions under 1e-6 of the largest are dropped."""
    u, s, _ = torch.linalg.svd(vectors.double(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        raise WorkbenchError("the directions found are all zero; the variable does not vary in these representations")
    keep = int((s > 1e-6 * s[0]).sum())
    return u[:, : min(k, keep)].float()


def random_basis(width: int, k: int, *, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(width, k, generator=g, dtype=torch.float64))
    return q.float()


def diff_means_basis(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Principal directions of the (count-weighted) class means about the overall mean."""
    classes, counts = torch.unique(y, return_counts=True)
    mu = x.double().mean(0)
    means = torch.stack([x[y == c].double().mean(0) - mu for c in classes])
    return orthonormal((means * counts.double().sqrt()[:, None]).T, k)


def probe_basis(x: torch.Tensor, y: torch.Tensor, k: int, *, steps: int = 200, weight_decay: float = 1e-3,
                seed: int = 0) -> torch.Tensor:
    """Row space of a multinomial logistic probe (L-BFGS on centred inputs), leading singular directions first."""
    classes = torch.unique(y)
    target = torch.searchsorted(classes, y)
    xc = (x.double() - x.double().mean(0)) / x.double().std().clamp(min=1e-12)
    g = torch.Generator().manual_seed(seed)
    w = (0.01 * torch.randn(len(classes), x.shape[1], generator=g, dtype=torch.float64)).requires_grad_(True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xc @ w.T + b, target) + weight_decay * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    weights = w.detach() - w.detach().mean(0)
    return orthonormal(weights.T, k)


def leace_basis(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Leading directions of the subspace a LEACE eraser of the variable removes (concept_erasure)."""
    from concept_erasure import LeaceFitter

    classes = torch.unique(y)
    z = F.one_hot(torch.searchsorted(classes, y), len(classes)).double()
    fitter = LeaceFitter(x.shape[1], len(classes), dtype=torch.float64)
    fitter.update(x.double(), z)
    eraser = fitter.eraser
    removed = eraser.proj_left.double() @ eraser.proj_right.double()  # x - eraser(x) = removed @ (x - mean)
    # An oblique projection's singular values do not rank its directions; the variance it erases does.
    erased = removed @ (x.double() - x.double().mean(0)).T
    return orthonormal(erased, k)


def sae_basis(latents: torch.Tensor, y: torch.Tensor, decoder: torch.Tensor, k: int) -> tuple[torch.Tensor, list[int]]:
    """Decoder directions of the k latents whose activations the variable explains best (between-class
    share of variance), orthonormalized; and those latents' indices."""
    lat = latents.double()
    total = lat.var(0, unbiased=False)
    classes = torch.unique(y)
    mu = lat.mean(0)
    between = sum((y == c).double().mean() * (lat[y == c].mean(0) - mu) ** 2 for c in classes)
    score = torch.where(total > 0, between / total.clamp(min=1e-12), torch.zeros_like(total))
    best = torch.argsort(score, descending=True, stable=True)[:k]
    return orthonormal(decoder[best].T.double(), k), [int(i) for i in best]


# --- DAS --------------------------------------------------------------------------------------------------------------


def train_das(runner: InterchangeRunner, rows: torch.Tensor, source: torch.Tensor, k: int, *, steps: int,
              batch_size: int, lr: float, seed: int, progress: bool = True) -> tuple[torch.Tensor, list[float]]:
    """Learn an orthogonal rotation whose first k coordinates carry the variable; (width x k basis, loss trace)."""
    from workbench.progress import progress_bar

    width = runner.width
    g = torch.Generator().manual_seed(seed)
    rotation = nn.Linear(width, width, bias=False)
    with torch.no_grad():
        rotation.weight.copy_(torch.randn(width, width, generator=g))
    rotation = orthogonal(rotation).to(runner.device)
    opt = torch.optim.Adam(rotation.parameters(), lr=lr)
    # Linear decay to zero: a constant rate keeps the rotation wandering once the loss is low.
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / steps)
    labels = runner.pairs.counterfactual_labels
    model = runner.target.model if hasattr(runner.target, "model") else runner.target
    was = model.training
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    losses: list[float] = []
    model.eval()
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        bar = progress_bar(range(steps), desc=f"DAS k={k}", enabled=progress, unit="step")
        for _ in bar:
            pick = torch.randperm(len(rows), generator=g)[:batch_size]
            logits = runner.logits(rows[pick], rotation.weight[:k].T, source[pick])
            loss = F.cross_entropy(logits.float(), labels[rows[pick]].to(logits.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.detach().item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        bar.close()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was)
    with torch.no_grad():
        basis = rotation.weight[:k].T.detach().float().cpu().clone()
    return basis, losses


# --- the comparison ---------------------------------------------------------------------------------------------------


@dataclass
class MethodResult:
    """One method's subspace and its held-out interchange accuracy."""

    method: str
    k: int
    iia: float
    ci: tuple[float | None, float | None]
    train_iia: float
    seconds: float
    hits: list[bool] = field(repr=False)
    detail: dict[str, Any] = field(default_factory=dict)
    basis: torch.Tensor | None = field(default=None, repr=False)  # width x k, orthonormal columns

    def to_json(self) -> dict[str, Any]:
        out = {"method": self.method, "k": self.k, "iia": round(self.iia, 4),
               "ci": [None if c is None else round(c, 4) for c in self.ci], "train_iia": round(self.train_iia, 4),
               "seconds": round(self.seconds, 3)}
        out.update(self.detail)
        return out


@dataclass
class AlignmentResult:
    """Every method's IIA for one variable at one site, with the settings that produced it."""

    variable: str
    site: str
    width: int
    dim: int
    n_train: int
    n_test: int
    methods: list[MethodResult]
    das_losses: list[float]
    config: DASConfig
    pairs_meta: dict[str, Any]
    baseline_iia: float  # the model left alone: 0 by construction (every pair changes the answer)

    def method(self, name: str) -> MethodResult:
        for m in self.methods:
            if m.method == name:
                return m
        raise WorkbenchError(f"no method {name!r} in this result; it has {', '.join(m.method for m in self.methods)}")

    def to_json(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        cfg["methods"] = list(cfg["methods"])
        return {"variable": self.variable, "site": self.site, "width": self.width, "dim": self.dim,
                "n_train": self.n_train, "n_test": self.n_test, "no_intervention_iia": round(self.baseline_iia, 4),
                "methods": [m.to_json() for m in self.methods],
                "das_loss": {"first": round(self.das_losses[0], 4) if self.das_losses else None,
                             "last": round(self.das_losses[-1], 4) if self.das_losses else None,
                             "every_10": [round(x, 4) for x in self.das_losses[::10]]},
                "settings": cfg, "pairs": self.pairs_meta}


def _ci(hits: torch.Tensor, *, n_resamples: int, seed: int) -> tuple[float | None, float | None]:
    from workbench.bootstrap import estimate, mean_of

    est = estimate([{"hit": bool(h)} for h in hits.tolist()], mean_of("iia", "hit"), n_resamples=n_resamples, seed=seed)
    return est.low, est.high


def align(target: Target, pairs: InterchangePairs, site: str, config: DASConfig | None = None, *,
          dictionary: Any = None, progress: bool = True) -> AlignmentResult:
    """Fit DAS and the baselines on the training pairs and score each by IIA on the held-out pairs.

    `dictionary` (a `SparseDictionary` on the same site and model) enables the `sae` method; without
    one it is skipped. Methods whose subspace has fewer than `dim` directions (a probe of a
    variable with c values spans at most c - 1) use what they have and report their k.
    """
    config = DASConfig() if config is None else config
    runner = InterchangeRunner(target, site, pairs)
    if config.dim > runner.width:
        raise WorkbenchError(f"dim={config.dim} is larger than site {site}'s width {runner.width}; "
                             f"give 1..{runner.width}")
    train_rows, test_rows = pairs.split_rows(config.held_out, seed=config.seed)
    source = runner.read("source")
    base = runner.read("base")
    x = torch.cat([base[train_rows], source[train_rows]])
    y = torch.cat([pairs.base_values[train_rows], pairs.source_values[train_rows]])
    if len(torch.unique(y)) < 2:
        raise WorkbenchError(f"the training pairs show one value of {pairs.variable}; draw more pairs")
    nothing = interchange_hits(runner, test_rows, None, source[test_rows])
    results: list[MethodResult] = []
    losses: list[float] = []
    k = config.dim
    for method in config.methods:
        t0 = time.perf_counter()
        detail: dict[str, Any] = {}
        if method == "das":
            basis, losses = train_das(runner, train_rows, source[train_rows], k, steps=config.steps,
                                      batch_size=config.batch_size, lr=config.lr, seed=config.seed, progress=progress)
        elif method == "probe":
            basis = probe_basis(x, y, k, steps=config.probe_steps, weight_decay=config.probe_weight_decay,
                                seed=config.seed)
        elif method == "leace":
            basis = leace_basis(x, y, k)
        elif method == "diff_means":
            basis = diff_means_basis(x, y, k)
        elif method == "sae":
            if dictionary is None:
                continue
            lat_b = runner.read("base", train_rows, transform=dictionary.encode_site)
            lat_s = runner.read("source", train_rows, transform=dictionary.encode_site)
            basis, latents = sae_basis(torch.cat([lat_b, lat_s]), y, dictionary.decoder_directions().cpu(), k)
            detail["latents"] = latents
        elif method == "neurons":
            basis, units = sae_basis(x, y, torch.eye(runner.width), k)
            detail["units"] = units
        elif method == "random":
            basis = random_basis(runner.width, k, seed=config.seed + 1)
        else:  # full
            basis = torch.eye(runner.width)
        hits = interchange_hits(runner, test_rows, basis, source[test_rows])
        train_hits = interchange_hits(runner, train_rows, basis, source[train_rows])
        seconds = time.perf_counter() - t0
        iia = float(hits.float().mean()) if len(hits) else float("nan")
        results.append(MethodResult(method, int(basis.shape[1]), iia, _ci(hits, n_resamples=config.n_resamples,
                                                                             seed=config.seed),
                                    float(train_hits.float().mean()), seconds, [bool(h) for h in hits], detail,
                                    basis))
        log.info("%s k=%d: IIA %.3f (train %.3f) in %.1f s", method, basis.shape[1], iia, results[-1].train_iia, seconds)
    return AlignmentResult(pairs.variable, runner.site, runner.width, k, len(train_rows), len(test_rows), results, losses,
                           config, dict(pairs.meta), float(nothing.float().mean()) if len(nothing) else float("nan"))


def plot_iia(result: AlignmentResult | dict[str, Any], path: Any) -> Any:
    """A bar per method: held-out IIA with its bootstrap interval (PNG, written atomically)."""
    from workbench.plotting import pyplot, save_figure

    data = result.to_json() if isinstance(result, AlignmentResult) else result
    rows = data["methods"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(rows), 3.4))
    values = [r["iia"] for r in rows]
    lows = [r["iia"] - (r["ci"][0] if r["ci"][0] is not None else r["iia"]) for r in rows]
    highs = [(r["ci"][1] if r["ci"][1] is not None else r["iia"]) - r["iia"] for r in rows]
    colors = ["tab:blue" if r["method"] == "das" else "tab:gray" if r["method"] in ("random", "full") else "tab:orange"
              for r in rows]
    ax.bar(range(len(rows)), values, yerr=[lows, highs], color=colors, capsize=3)
    ax.set_xticks(range(len(rows)), [f"{r['method']}\nk={r['k']}" for r in rows], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("interchange accuracy (held out)")
    ax.set_title(f"{data['variable']} at {data['site']}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = [
    "METHODS",
    "AlignmentResult",
    "DASConfig",
    "MethodResult",
    "align",
    "diff_means_basis",
    "leace_basis",
    "orthonormal",
    "plot_iia",
    "probe_basis",
    "random_basis",
    "sae_basis",
    "train_das",
]
