"""ROME (Meng et al. 2022): one fact rewritten by a rank-one update of one MLP's output projection.

    delta W = Lambda (C^-1 k*)^T,   Lambda = delta_v / (k*^T C^-1 k*)

so that the edited projection maps the subject's key k* to its old output plus delta_v (the
optimized value change, `editors.mlp_update.optimize_values`), while keys uncorrelated with
k* under the key second moment C move as little as possible.

`mom2_adjustment=True` (the paper's method) uses C estimated over a corpus. EasyEdit
switched it off for ROME by default (C = I, a plain rank-one update along k*); users then
found their numbers did not match the paper, because without C the update also moves every
key that merely points in a similar direction (in GPT-style MLPs most keys share a large
common component), which costs specificity (NS). We keep the paper's default; the
statistics are cached on disk, so only the first edit at a layer pays for them.

"Disabling edits": when k*^T C^-1 k* is tiny, Lambda explodes and the model breaks. Every
fit logs the denominator and the update norm; a degenerate one is refused with an
explanation (`on_degenerate="refuse"`) or scaled back to the limits (`"clamp"`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from editors.mlp_update import (
    FactToken,
    PrefixSource,
    ValueConfig,
    check_layer,
    check_prefix_source,
    check_stat_samples,
    context_templates,
    given_statistics,
    in_layout,
    key_statistics,
    mlp_out,
    optimize_values,
    solve_second_moment,
    subject_keys,
)
from editors.registry import register
from workbench.delta import WeightDelta, assert_unchanged
from workbench.errors import WorkbenchError, require_finite
from workbench.requests import Rewrite, validate_rewrite
from workbench.sites import require_causal_lm

log = logging.getLogger(__name__)


@register("rome")
@dataclass(frozen=True)
class ROME:
    """Rank-One Model Editing at MLP `layer` (see the module docstring).

    `layer=None` picks the middle layer (n_layers // 2); prefer a measured choice (the CLI's
    `--layer auto` uses the causal trace's MLP peak, and Hase et al. found the trace peak is
    not always the best layer to edit, so compare layers).
    """

    layer: int | None = None
    v_lr: float = 0.5
    v_steps: int = 25
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    fact_token: FactToken = "subject_last"
    n_prefixes: int = 10
    prefix_length: int = 8
    prefix_source: PrefixSource = "generated"  # "world": the zoo model's filler text (`context_templates`)
    mom2_adjustment: bool = True
    mom2_n_samples: int = 100_000
    mom2_corpus: str = "auto"
    min_denominator: float = 1e-3
    max_update_ratio: float = 10.0
    on_degenerate: Literal["refuse", "clamp"] = "refuse"
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.on_degenerate not in ("refuse", "clamp"):
            raise WorkbenchError(f"on_degenerate={self.on_degenerate!r}; expected 'refuse' or 'clamp'")
        for name in ("v_steps", "mom2_n_samples", "batch_size"):
            if getattr(self, name) <= 0:
                raise WorkbenchError(f"ROME {name}={getattr(self, name)}; expected a positive number")
        if self.n_prefixes < 0:
            raise WorkbenchError(f"ROME n_prefixes={self.n_prefixes}; expected >= 0")
        check_prefix_source(self.prefix_source, "ROME ")
        check_stat_samples(self.mom2_n_samples, "ROME ")
        require_finite(self)

    def resolved_layer(self, handle: Any) -> int:
        return check_layer(handle, handle.arch.n_layers // 2 if self.layer is None else self.layer)

    def fit(self, handle: Any, request: Rewrite | Sequence[Rewrite], *, texts: Sequence[str] | None = None,
            statistics: Mapping[int, Any] | None = None, progress: bool = False) -> WeightDelta:
        """A rank-one WeightDelta on the layer's mlp_out weight; the model is left unchanged.

        `texts` overrides the statistics corpus (`mom2_corpus`). `statistics` gives the key
        statistics to use instead, by layer (what `key_statistics` returns): edits applied one
        after another keep the unedited model's statistics this way, as the original code does.
        A sequence of one rewrite is accepted; several are refused (ROME edits one fact; use
        MEMIT for many).
        """
        if not isinstance(request, Rewrite):
            items = list(request)
            if len(items) != 1 or not isinstance(items[0], Rewrite):
                raise WorkbenchError(f"ROME edits one fact at a time; got {len(items)} requests "
                                     "(apply them one by one, or use MEMIT for many at once)")
            request = items[0]
        require_causal_lm(handle, "ROME", weight_role="mlp_out")
        layer = self.resolved_layer(handle)
        validate_rewrite(handle.tokenizer, request, model=handle.model)
        model = handle.model
        info, param = mlp_out(handle, layer)
        timings: dict[str, float] = {}
        with assert_unchanged(model) as guard:
            t0 = time.perf_counter()
            if self.mom2_adjustment:
                stats = given_statistics(statistics, layer) or key_statistics(
                    handle, layer, corpus=self.mom2_corpus, texts=texts, fact_token=self.fact_token,
                    n_samples=self.mom2_n_samples, seed=self.seed, progress=progress)
                second_moment = stats.second_moment
                stats_count = stats.count
            else:
                second_moment, stats_count = None, 0
            timings["statistics_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            templates = context_templates(handle, n_prefixes=self.n_prefixes, length=self.prefix_length,
                                          seed=self.seed, source=self.prefix_source)
            k_star = subject_keys(handle, layer, [request], templates, batch_size=self.batch_size,
                                  fact_token=self.fact_token)[0].double()
            timings["keys_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            values = optimize_values(
                handle, [request], layer=layer, site_kind="mlp_out", templates=templates,
                config=ValueConfig(lr=self.v_lr, steps=self.v_steps, kl_factor=self.kl_factor,
                                   weight_decay=self.v_weight_decay, clamp_norm_factor=self.clamp_norm_factor, fact_token=self.fact_token,
                                   batch_requests=1),
            )
            timings["values_s"] = time.perf_counter() - t0
        delta_v = values.delta[0].double()
        c_inv_k = solve_second_moment(second_moment, k_star) if second_moment is not None else k_star.clone()
        denominator = float(k_star @ c_inv_k)
        u = delta_v / denominator if denominator != 0 else torch.full_like(delta_v, math.inf)
        weight_norm = float(param.detach().double().norm())
        update_norm = float(u.norm() * c_inv_k.norm())
        relative = denominator / info.d_in
        ratio = update_norm / max(weight_norm, 1e-30)
        log.info("ROME layer %d: k*^T C^-1 k* = %.4g (%.4g x d_in), |delta W| = %.4g (%.4g x |W|), "
                 "|delta v| = %.4g", layer, denominator, relative, update_norm, ratio, float(delta_v.norm()))
        degenerate = (not math.isfinite(denominator) or not math.isfinite(update_norm)
                      or relative < self.min_denominator or ratio > self.max_update_ratio)
        clamped = False
        if degenerate:
            problem = (f"ROME update for subject {request.subject!r} at layer {layer} is degenerate: the denominator "
                       f"k*^T C^-1 k* = {denominator:.4g} ({relative:.3g} x d_in; minimum {self.min_denominator:g}) and "
                       f"the update norm is {update_norm:.4g} = {ratio:.3g} x the weight's norm (maximum "
                       f"{self.max_update_ratio:g}); applying it would likely break the model (a 'disabling edit')")
            if self.on_degenerate == "refuse" or not math.isfinite(denominator):
                raise WorkbenchError(problem + ". Try another layer, more statistics samples (mom2_n_samples), "
                                     "or on_degenerate='clamp' to scale the update down to the limits")
            log.warning("%s; clamping", problem)
            if relative < self.min_denominator:
                denominator = self.min_denominator * info.d_in
                u = delta_v / denominator
                update_norm = float(u.norm() * c_inv_k.norm())
            if update_norm / max(weight_norm, 1e-30) > self.max_update_ratio:
                u = u * (self.max_update_ratio * weight_norm / update_norm)
                update_norm = float(u.norm() * c_inv_k.norm())
            clamped = True
        change = in_layout(u.float()[:, None], c_inv_k.float()[:, None], info.layout)
        extra = {
            "layer": layer,
            "param": info.name,
            "layout": info.layout,
            "denominator": denominator,
            "relative_denominator": relative,
            "update_norm": update_norm,
            "weight_norm": weight_norm,
            "update_ratio": update_norm / max(weight_norm, 1e-30),
            "delta_v_norm": float(delta_v.norm()),
            "clamped": clamped,
            "nll_before": values.nll_before[0],
            "nll_after": values.nll_after[0],
            "v_steps_taken": values.steps[0],
            "statistics_samples": stats_count,
            "n_contexts": len(templates),
            "timings": timings,
            "config": asdict(self),
        }
        return WeightDelta.from_model(model, {info.name: change}, method="rome", request=request.to_json(),
                                      extra=extra, guard=guard)
