"""MEMIT (Meng et al. 2023): many facts at once, spread over a range of MLP layers.

1. For every rewrite, optimize a change delta_i of the residual stream at the last edited
   layer (subject's last token) that makes target_new likely: the targets z_i = h_i + delta_i
   (batched over rewrites, `editors.mlp_update.optimize_values`).
2. Walk the layers from first to last. At layer l (with the updates of earlier layers in
   place) take the subjects' keys K (d_in x N) and the remaining residuals
   R = (z - h_current) / (layers left), and solve the batched least squares with the
   key statistics as a prior:

       delta W_l = R K^T (lambda C_l + K K^T)^-1

   where C_l = E[k k^T] over a corpus; lambda (`mom2_update_weight`) weighs keeping
   typical keys' outputs against fitting the N new ones (it acts like lambda prior samples).

Each layer's change has rank <= N; it is kept as factors (u = R, v = (lambda C + K K^T)^-1 K)
when that is smaller than the dense matrix, dense otherwise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import torch

from editors.mlp_update import (
    FactToken,
    MLPOut,
    PrefixSource,
    ValueConfig,
    check_layer,
    check_prefix_source,
    check_stat_samples,
    context_templates,
    dense_in_layout,
    given_statistics,
    in_layout,
    key_statistics,
    locate,
    mlp_out,
    optimize_values,
    site_at_subject,
    solve_second_moment,
    subject_keys,
    value_site,
)
from editors.registry import register
from workbench.delta import Change, WeightDelta, assert_unchanged, changes_added
from workbench.errors import WorkbenchError, require_finite
from workbench.requests import Rewrite, validate_rewrite
from workbench.sites import require_causal_lm

log = logging.getLogger(__name__)


def default_layers(n_layers: int) -> tuple[int, ...]:
    """A few early-middle layers, about 10%..30% of the depth (GPT-J's 28 layers -> 3..8, as in the paper)."""
    lo = max(0, round(0.1 * n_layers))
    hi = max(lo, min(n_layers - 1, round(0.3 * n_layers)))
    return tuple(range(lo, hi + 1))


def key_write_shares(edited: torch.Tensor, others: torch.Tensor, second_moment: torch.Tensor,
                     mom2_update_weight: float) -> dict[str, float]:
    """How much of the update MEMIT's least squares gives each key, before any value is fitted.

    A key k receives dW k = R a(k) with a(k) = K^T (lambda C + K K^T)^-1 k (module docstring).
    `self` is the mean a_ii(k_i) over the edited keys `edited` [N, d] (1: its whole residual
    lands), `leak` the mean ||a(k)|| over `others` [M, d], keys nobody edits (0: untouched).
    Lambda trades one for the other; where both are high at every lambda, as for 500 subjects
    of FactGPT-large (benchmarks/RESULTS.md, "MEMIT at 500"), no setting of the editor helps.
    """
    kt = edited.double().T  # [d, N], as in `fit`
    adj = solve_second_moment(second_moment, kt, extra=kt @ kt.T, scale=float(mom2_update_weight))  # A^-1 K^T
    own = (kt.T @ adj).diagonal()
    leak = others.double().to(adj.device) @ adj
    return {"self": float(own.mean()), "leak": float(leak.pow(2).sum(1).sqrt().mean())}


@register("memit")
@dataclass(frozen=True)
class MEMIT:
    """Mass-Editing Memory in a Transformer over `layers` (default: `default_layers`)."""

    BATCH: ClassVar[bool] = True  # fits all rewrites into one delta (single-edit methods fit one at a time)

    layers: tuple[int, ...] | None = None
    # lambda; None: the layer's key width d_in. The paper's GPT-J value 15000 is ~0.9 x its d_in
    # (16384): what matters is lambda relative to k^T C^-1 k, which is ~d_in for typical keys.
    mom2_update_weight: float | None = None
    v_lr: float = 0.5
    v_steps: int = 25
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 0.75
    fact_token: FactToken = "subject_last"
    n_prefixes: int = 10
    prefix_length: int = 8
    prefix_source: PrefixSource = "generated"  # "world": the zoo model's filler text (`context_templates`)
    # Contexts the value optimization sees: "all" (the paper) or "plain" (the bare prompt only,
    # several times faster; the keys still average over every context).
    value_contexts: Literal["all", "plain"] = "all"
    mom2_adjustment: bool = True
    mom2_n_samples: int = 100_000
    mom2_corpus: str = "auto"
    storage: Literal["auto", "low_rank", "dense"] = "auto"
    v_batch_requests: int = 128
    # Rewrites of one subject share one target (its last-token state is one vector; separate
    # targets for its facts would be averaged away by the least squares).
    joint_subject: bool = True
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(set(int(x) for x in self.layers))))
            if not self.layers:
                raise WorkbenchError("MEMIT layers is empty; give at least one layer, or None for the default range")
        if self.mom2_update_weight is not None and self.mom2_update_weight < 0:
            raise WorkbenchError(f"mom2_update_weight={self.mom2_update_weight}; expected >= 0")
        if self.storage not in ("auto", "low_rank", "dense"):
            raise WorkbenchError(f"storage={self.storage!r}; expected 'auto', 'low_rank' or 'dense'")
        check_prefix_source(self.prefix_source)
        if self.value_contexts not in ("all", "plain"):
            raise WorkbenchError(f"value_contexts={self.value_contexts!r}; expected 'all' or 'plain'")
        check_stat_samples(self.mom2_n_samples, "MEMIT ")
        require_finite(self)

    @classmethod
    def ending_at(cls, layer: int, n_layers: int, **kwargs: Any) -> MEMIT:
        """The default-width layer range shifted to end at `layer` (e.g. a causal trace's MLP peak)."""
        width = len(default_layers(n_layers))
        return cls(layers=tuple(range(max(0, layer - width + 1), layer + 1)), **kwargs)

    def resolved_layers(self, handle: Any) -> tuple[int, ...]:
        layers = self.layers if self.layers is not None else default_layers(handle.arch.n_layers)
        return tuple(check_layer(handle, layer) for layer in layers)

    def fit(self, handle: Any, request: Rewrite | Sequence[Rewrite], *, texts: Sequence[str] | None = None,
            statistics: Mapping[int, Any] | None = None, progress: bool = False) -> WeightDelta:
        """One WeightDelta changing the mlp_out weight of every layer in the range; the model is unchanged.

        `texts` overrides the statistics corpus; `statistics` gives precomputed key statistics by
        layer (what `key_statistics` returns) for the layers it covers.
        """
        rewrites = [request] if isinstance(request, Rewrite) else list(request)
        if not rewrites:
            raise WorkbenchError("MEMIT needs at least one rewrite")
        require_causal_lm(handle, "MEMIT", weight_role="mlp_out")
        layers = self.resolved_layers(handle)
        for rw in rewrites:
            validate_rewrite(handle.tokenizer, rw, model=handle.model)
        model = handle.model
        last = layers[-1]
        timings: dict[str, float] = {}
        changes: dict[str, Change] = {}
        layer_info: list[dict[str, Any]] = []
        with assert_unchanged(model) as guard:
            t0 = time.perf_counter()
            stats = {}
            if self.mom2_adjustment:
                for layer in layers:
                    stats[layer] = (given_statistics(statistics, layer) or key_statistics(
                        handle, layer, corpus=self.mom2_corpus, texts=texts, fact_token=self.fact_token,
                        n_samples=self.mom2_n_samples, seed=self.seed, progress=progress)).second_moment
            timings["statistics_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            templates = context_templates(handle, n_prefixes=self.n_prefixes, length=self.prefix_length,
                                          seed=self.seed, source=self.prefix_source)
            values = optimize_values(
                handle, rewrites, layer=last, site_kind="resid_post",
                templates=templates if self.value_contexts == "all" else ["{}"],
                config=ValueConfig(lr=self.v_lr, steps=self.v_steps, kl_factor=self.kl_factor,
                                   weight_decay=self.v_weight_decay, clamp_norm_factor=self.clamp_norm_factor, fact_token=self.fact_token,
                                   batch_requests=self.v_batch_requests, joint_subject=self.joint_subject),
                progress=progress,
            )
            timings["values_s"] = time.perf_counter() - t0
            targets = (values.init + values.delta).double()
            plain = [locate(handle.tokenizer, "{}", rw.prompt, rw.subject, self.fact_token) for rw in rewrites]
            t0 = time.perf_counter()
            for i, layer in enumerate(layers):
                keys, current = self._keys_and_current(handle, changes, layer, last, rewrites, templates, plain)
                resid = (targets - current) / (len(layers) - i)  # [N, d_out]
                info, param = mlp_out(handle, layer)
                kt = keys.T  # [d_in, N]
                lam = float(info.d_in) if self.mom2_update_weight is None else self.mom2_update_weight
                if self.mom2_adjustment:
                    adj = solve_second_moment(stats[layer], kt, extra=kt @ kt.T, scale=lam)
                else:
                    eye = torch.eye(info.d_in, dtype=torch.float64)
                    adj = torch.linalg.solve(lam * eye + kt @ kt.T, kt)
                changes[info.name], upd, storage = self._change(resid.T.contiguous(), adj.contiguous(), info)
                wnorm = float(param.detach().double().norm())
                # the share of its own residual each edited key receives (`key_write_shares`): well
                # below 1 means lambda, or keys that resemble each other, keep edits from landing fully
                self_share = float((kt.T.double() @ adj.double()).diagonal().mean())
                layer_info.append({"layer": layer, "param": info.name, "lambda": lam, "update_norm": upd, "weight_norm": wnorm,
                                   "update_ratio": upd / max(wnorm, 1e-30), "residual_norm": float(resid.norm(dim=1).mean()),
                                   "self_share": self_share, "storage": storage})
                log.info("MEMIT layer %d: |delta W| = %.4g (%.4g x |W|), mean |residual| = %.4g, self share %.3f", layer,
                         upd, upd / max(wnorm, 1e-30), layer_info[-1]["residual_norm"], self_share)
            timings["solve_s"] = time.perf_counter() - t0
        requests = [rw.to_json() for rw in rewrites]
        extra = {
            "layers": list(layers),
            "n_requests": len(rewrites),
            "per_layer": layer_info,
            "nll_before_mean": sum(values.nll_before) / len(rewrites),
            "nll_after_mean": sum(values.nll_after) / len(rewrites),
            "delta_norm_mean": float(values.delta.norm(dim=1).mean()),
            "n_contexts": len(templates),
            "timings": timings,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()},
        }
        return WeightDelta.from_model(model, changes, method="memit", request=requests, extra=extra, guard=guard)

    def _keys_and_current(self, handle: Any, changes: dict[str, Change], layer: int, value_layer: int,
                          rewrites: Sequence[Rewrite], templates: list[str],
                          plain: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys at `layer` and the value site's output at `value_layer`, read with the `changes` made so far."""
        with changes_added(handle.model, changes):
            keys = subject_keys(handle, layer, rewrites, templates, batch_size=self.batch_size, fact_token=self.fact_token)
            current = site_at_subject(handle, value_site("resid_post", value_layer), plain, batch_size=self.batch_size)
        return keys.double(), current.double()

    def _change(self, u: torch.Tensor, v: torch.Tensor, info: MLPOut) -> tuple[Change, float, str]:
        """The change u v^T ([d_out, N] x [d_in, N]) as factors or dense (`storage`), with its norm."""
        n = u.shape[1]
        dense = self.storage == "dense" or (self.storage == "auto" and n * (info.d_out + info.d_in) > info.d_out * info.d_in)
        if dense:
            full = u @ v.T
            return dense_in_layout(full.float(), info.layout), float(full.norm()), "dense"
        norm = float(torch.sqrt(torch.clamp(((u.T @ u) * (v.T @ v)).sum(), min=0)))
        return in_layout(u.float(), v.float(), info.layout), norm, "low_rank"
