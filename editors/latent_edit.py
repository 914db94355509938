"""Sparse-dictionary latents as weight edits: a latent's decoder direction projected out, or added.

A latent's decoder row is the direction it writes into its site. `LatentAblation` removes the span
of the chosen latents' directions from the site: `x -> (I - Q Q^T) x`, Q an orthonormal basis of
the unit decoder rows. That is an orthogonal projection, so it folds exactly where
`editors.concept_erasure` folds an eraser (`eraser_delta`): into the Linear, HF Conv1D or Conv2d
that writes the site (`W <- (I - Q Q^T) W`, `c <- (I - Q Q^T) c`) or the Linear that reads it, and
it is refused on the residual stream with the same explanation; `projection_hook` is the exact
run-time twin on any site.

What it removes is the whole direction, including whatever other latents or features write along
it, not only the chosen latent's own contribution (zeroing a latent inside the SAE would need the
reconstruction spliced into the model and would add its error); the controls in
`workbench sae ablate` are random latents of the same count.

`value="mean"` replaces the component along those directions by its mean on clean inputs instead
(`x -> x - Q Q^T (x - mu)`, `mu` given with the request): what the directions carry on average
stays, only its variation goes. The constant `Q Q^T mu` folds into the writer's bias, or, for a
bias-free convolution read only by a BatchNorm, into that BatchNorm's beta.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from editors.concept_erasure import eraser_delta, erasure_hook, fold_target
from editors.registry import register
from editors.steering import bias_target, steering_delta
from workbench.delta import WeightDelta, assert_unchanged
from workbench.dictionaries.ground_truth import check_dictionary_fits
from workbench.dictionaries.sae import SparseDictionary
from workbench.errors import WorkbenchError, require_finite
from workbench.handle import ModelHandle


@dataclass(frozen=True)
class Projection:
    """`x -> x - L R x` with L = Q (d, r) and R = Q^T: the eraser interface `concept_erasure` folds."""

    proj_left: torch.Tensor
    proj_right: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.proj_left.shape[1])


def check_latents(dictionary: SparseDictionary, latents: Sequence[int]) -> tuple[int, ...]:
    """The latent indices as a tuple: at least one, distinct, each in 0..d_sae-1."""
    chosen = tuple(int(i) for i in latents)
    if not chosen:
        raise WorkbenchError("give at least one latent index")
    bad = [i for i in chosen if not 0 <= i < dictionary.d_sae]
    if bad:
        raise WorkbenchError(f"latent {bad[0]} is out of range; the dictionary has latents 0..{dictionary.d_sae - 1}")
    if len(set(chosen)) != len(chosen):
        raise WorkbenchError(f"latents repeat: {list(chosen)}; give each once")
    return chosen


def latent_projection(dictionary: SparseDictionary, latents: Sequence[int],
                      mean: torch.Tensor | None = None) -> Projection:
    """The orthogonal projection off the span of the latents' decoder directions (float64); with `mean`,
    the component along them is set to the mean's instead of zero."""
    chosen = check_latents(dictionary, latents)
    directions = dictionary.decoder_directions()[list(chosen)].detach().double().cpu()  # (r, d)
    q, r = torch.linalg.qr(directions.T)
    keep = r.diagonal().abs() > 1e-8 * max(1.0, float(r.diagonal().abs().max()))  # drop directions already spanned
    q = q[:, keep]
    if mean is not None:
        mean = mean.detach().double().cpu().reshape(-1)
        if mean.shape[0] != q.shape[0] or not bool(torch.isfinite(mean).all()):
            raise WorkbenchError(f"the clean mean has {mean.shape[0]} finite values expected {q.shape[0]} (one per "
                                 "feature of the site)")
    return Projection(q, q.T.contiguous(), mean)


@dataclass(frozen=True)
class LatentRequest:
    """Which latents of which dictionary to ablate."""

    dictionary: SparseDictionary
    latents: tuple[int, ...] = field(default_factory=tuple)
    mean: torch.Tensor | None = None  # the site's clean mean per feature (value="mean")


@register("sae-ablate")
@dataclass(frozen=True)
class LatentAblation:
    """Project the decoder directions of `request.latents` out of the dictionary's site, as a WeightDelta.

    The dictionary must have been trained on this model (fingerprint) and its site must be foldable
    (see the module docstring); both are checked before anything is computed.
    """

    value: Literal["zero", "mean"] = "zero"

    name: ClassVar[str] = "sae-ablate"

    def fit(self, handle: ModelHandle, request: LatentRequest) -> WeightDelta:
        if not isinstance(request, LatentRequest):
            raise WorkbenchError("sae-ablate needs a LatentRequest(dictionary, latents) request")
        if self.value not in ("zero", "mean"):
            raise WorkbenchError(f"value={self.value!r}: expected 'zero' (remove the directions) or 'mean' (keep their "
                                 "clean mean)")
        if (self.value == "mean") != (request.mean is not None):
            raise WorkbenchError("value='mean' needs the site's clean mean in the request (LatentRequest(mean=...)), "
                                 "and only it takes one")
        d = request.dictionary
        if d.kind == "transcoder":
            raise WorkbenchError("a transcoder's decoder writes another site than it reads; ablate latents of an SAE")
        check_dictionary_fits(handle, d)
        site = d.config.hook_name
        fold_target(handle, site)  # a clear refusal before any work
        with assert_unchanged(handle.model):
            projection = latent_projection(d, request.latents, request.mean)
            return eraser_delta(handle, site, projection, method="sae-ablate",
                                request={"latents": list(check_latents(d, request.latents)), "value": self.value},
                                extra={"dictionary": d.config.metadata.get("cache_key"), "kind": d.kind,
                                       "width": d.d_sae})


@register("sae-steer")
@dataclass(frozen=True)
class LatentSteering:
    """Add `strength` x the sum of the latents' unit decoder directions to the site, as a bias WeightDelta."""

    strength: float = 1.0

    name: ClassVar[str] = "sae-steer"

    def __post_init__(self) -> None:
        require_finite(self)

    def fit(self, handle: ModelHandle, request: LatentRequest) -> WeightDelta:
        if not isinstance(request, LatentRequest):
            raise WorkbenchError("sae-steer needs a LatentRequest(dictionary, latents) request")
        d = request.dictionary
        check_dictionary_fits(handle, d)
        site = d.config.hook_name_out or d.config.hook_name  # where the decoder writes (a transcoder: its output site)
        bias_target(handle, site)  # a clear refusal before any work
        chosen = check_latents(d, request.latents)
        with assert_unchanged(handle.model):
            vector = self.strength * d.decoder_directions()[list(chosen)].sum(0).detach().float().cpu()
            return steering_delta(handle, site, vector, request={"latents": list(chosen)},
                                  extra={"strength": self.strength, "dictionary": d.config.metadata.get("cache_key")})


@contextmanager
def projection_hook(handle: ModelHandle, dictionary: SparseDictionary, latents: Sequence[int],
                    mean: torch.Tensor | None = None) -> Iterator[None]:
    """The same projection (to the clean `mean` along the directions, when given) applied to the site at run time."""
    with erasure_hook(handle, dictionary.config.hook_name, latent_projection(dictionary, latents, mean)):
        yield


def random_latents(dictionary: SparseDictionary, count: int, *, exclude: Sequence[int] = (), seed: int = 0) -> list[int]:
    """`count` distinct latents drawn at random (seeded), none of `exclude`: the control of an ablation."""
    pool = [i for i in range(dictionary.d_sae) if i not in set(exclude)]
    if count > len(pool):
        raise WorkbenchError(f"{count} random latents asked for, {len(pool)} available")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:count]
    return [pool[int(i)] for i in order]


__all__ = ["LatentAblation", "LatentRequest", "LatentSteering", "Projection", "check_latents", "latent_projection", "projection_hook",
           "random_latents"]
