"""The usual quality figures of a dictionary, measured on a stream it was not trained on.

- `l0`: mean number of active latents per activation;
- `explained_variance`: 1 - sum |x - x^|^2 / sum |x - mean x|^2 over the stream (float64 sums);
- `mse`: mean of |x - x^|^2 per activation;
- `dead` / `dense`: latents that never fire on the stream, and latents that fire on more than
  `dense_threshold` of it (counts and shares);
- `downstream`: the model's own figure with the reconstruction spliced in at the site (a
  transcoder's prediction replacing its output site), beside the clean model and the site
  zero-ablated: cross-entropy and accuracy on the world's labelled scenes for a ShapesNet,
  next-token cross-entropy for a causal LM, and the cosine between clean and spliced outputs
  otherwise; `recovered` = (ablated - spliced) / (ablated - clean) for a loss (the share of the
  loss gap the reconstruction closes, SAELens's "CE loss recovered"), the mirror for accuracy
  and cosine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from workbench.dictionaries.activations import ActivationSource, default_source, is_shapes_model, stream_rows
from workbench.dictionaries.sae import SparseDictionary
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.hooks import patch
from workbench.models import run_model
from workbench.progress import progress_bar
from workbench.sites import Site, resolve_site


@dataclass(frozen=True)
class DictionaryQuality:
    """Quality figures of one dictionary on `n_activations` held-out activations (see the module docstring)."""

    n_activations: int
    l0: float
    explained_variance: float
    mse: float
    dead: int
    dense: int
    d_sae: int
    dense_threshold: float
    downstream: dict[str, Any] = field(default_factory=dict)
    firing_frequency: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def dead_fraction(self) -> float:
        return self.dead / self.d_sae

    @property
    def dense_fraction(self) -> float:
        return self.dense / self.d_sae

    def to_json(self) -> dict[str, Any]:
        return {
            "n_activations": self.n_activations, "l0": round(self.l0, 4),
            "explained_variance": round(self.explained_variance, 6), "mse": round(self.mse, 6),
            "dead": self.dead, "dead_fraction": round(self.dead_fraction, 6), "dense": self.dense,
            "dense_fraction": round(self.dense_fraction, 6), "dense_threshold": self.dense_threshold,
            "d_sae": self.d_sae, "downstream": self.downstream,
        }


def dictionary_sites(handle: ModelHandle, dictionary: SparseDictionary) -> list[Site]:
    """The site(s) a dictionary reads (and, for a transcoder, writes) on `handle`."""
    cfg = dictionary.config
    if not cfg.hook_name:
        raise WorkbenchError("this dictionary names no site (cfg.json metadata.hook_name is empty); it cannot be run on a model")
    sites = [resolve_site(handle, cfg.hook_name)]
    if cfg.kind == "transcoder":
        if not cfg.hook_name_out:
            raise WorkbenchError("this transcoder names no output site (metadata.hook_name_out)")
        sites.append(resolve_site(handle, cfg.hook_name_out))
    return sites


@torch.no_grad()
def dictionary_quality(handle: ModelHandle, dictionary: SparseDictionary, *, source: ActivationSource | None = None,
                       n_activations: int = 65_536, dense_threshold: float = 0.1, downstream: bool = True,
                       n_downstream: int = 256, seed: int = 12_345, progress: bool = True) -> DictionaryQuality:
    """Measure `dictionary` on `n_activations` rows of `source` (default: the handle's stream at `seed`)."""
    if n_activations < 1:
        raise WorkbenchError(f"n_activations={n_activations}; expected at least 1")
    sites = dictionary_sites(handle, dictionary)
    source = default_source(handle, seed=seed) if source is None else source
    d = dictionary.to(handle.device).eval()
    n = 0
    active = 0.0
    sse = 0.0
    sum_y = torch.zeros(d.config.output_dim, dtype=torch.float64)
    sum_sq = 0.0
    fires = torch.zeros(d.d_sae, dtype=torch.float64)
    bar = progress_bar(total=n_activations, desc="dictionary quality", enabled=progress, unit="act", leave=False)
    stream = stream_rows(handle, sites, source)
    try:
        for _, rows in stream:
            x = rows[0][: n_activations - n].to(handle.device)
            y = rows[-1][: n_activations - n].to(handle.device) if d.kind == "transcoder" else x
            acts = d.encode(x)
            recon = d(x)
            on = acts > 0
            active += float(on.sum())
            fires += on.sum(0).double().cpu()
            sse += float((recon - y).double().pow(2).sum())
            sum_y += y.double().sum(0).cpu()
            sum_sq += float(y.double().pow(2).sum())
            n += x.shape[0]
            bar.update(x.shape[0])
            if n >= n_activations:
                break
    finally:
        bar.close()
        stream.close()
    total_var = sum_sq - float(sum_y.pow(2).sum()) / n
    freq = (fires / n).float()
    down = downstream_figures(handle, d, n=n_downstream, seed=seed, progress=progress) if downstream else {}
    return DictionaryQuality(
        n_activations=n, l0=active / n, explained_variance=1.0 - sse / total_var if total_var > 0 else float("nan"),
        mse=sse / n, dead=int((fires == 0).sum()), dense=int((freq > dense_threshold).sum()), d_sae=d.d_sae,
        dense_threshold=dense_threshold, downstream=down, firing_frequency=freq,
    )


@contextmanager
def spliced(handle: ModelHandle, dictionary: SparseDictionary, *, mode: str = "reconstruction") -> Iterator[None]:
    """Run the model with the dictionary's reconstruction in place of its site (mode "reconstruction"), or
    with that site zero-ablated (mode "zero"). A transcoder's prediction replaces its output site."""
    sites = dictionary_sites(handle, dictionary)
    if mode not in ("reconstruction", "zero"):
        raise WorkbenchError(f"mode={mode!r}; expected 'reconstruction' or 'zero'")
    target = sites[-1]
    if mode == "zero":
        with patch(handle, {target: lambda act: torch.zeros_like(act)}):
            yield
        return
    if dictionary.kind != "transcoder":
        with patch(handle, {target: dictionary.reconstruct_site}):
            yield
        return
    seen: dict[str, torch.Tensor] = {}

    def record(act: torch.Tensor) -> None:
        seen["in"] = act

    def predict(act: torch.Tensor) -> torch.Tensor:
        if "in" not in seen:
            raise WorkbenchError(f"transcoder input site {sites[0].name} did not run before its output site {target.name}")
        from workbench.dictionaries.sae import from_rows, site_rows

        rows, shape = site_rows(seen["in"])
        return from_rows(dictionary(rows.to(dictionary.W_enc.dtype)), shape).to(act.dtype)

    with patch(handle, {sites[0]: record, target: predict}):
        yield


def downstream_figures(handle: ModelHandle, dictionary: SparseDictionary, *, n: int = 256, seed: int = 12_345,
                       progress: bool = True) -> dict[str, Any]:
    """The model's figure clean, with the reconstruction spliced in, and with the site zero-ablated."""
    if is_shapes_model(handle):
        return _image_figures(handle, dictionary, n=n, seed=seed)
    if handle.tokenizer is None:
        return {}
    texts = _texts(handle, n=min(n, 64), seed=seed)
    if handle.kind == "causal_lm":
        return _recovered(_per_mode(handle, dictionary, lambda: _lm_loss(handle, texts)), "cross_entropy", lower_better=True)
    outs = _per_mode(handle, dictionary, lambda: _outputs(handle, texts))
    cos = {m: float(F.cosine_similarity(outs[m].flatten(1), outs["clean"].flatten(1), dim=-1).mean()) for m in outs}
    return _recovered(cos, "output_cosine", lower_better=False)


def _per_mode(handle: ModelHandle, dictionary: SparseDictionary, measure: Callable[[], Any]) -> dict[str, Any]:
    """`measure()` on the clean model, with the reconstruction spliced in, and with the site zero-ablated."""
    out = {"clean": measure()}
    with spliced(handle, dictionary):
        out["spliced"] = measure()
    with spliced(handle, dictionary, mode="zero"):
        out["ablated"] = measure()
    return out


def _recovered(values: dict[str, float], metric: str, *, lower_better: bool) -> dict[str, Any]:
    clean, spliced_v, ablated = values["clean"], values["spliced"], values["ablated"]
    gap = (ablated - clean) if lower_better else (clean - ablated)
    gained = (ablated - spliced_v) if lower_better else (spliced_v - ablated)
    rec = gained / gap if abs(gap) > 1e-12 else float("nan")
    return {"metric": metric, "clean": round(clean, 6), "spliced": round(spliced_v, 6), "ablated": round(ablated, 6),
            "recovered": round(rec, 6) if math.isfinite(rec) else None}


def _texts(handle: ModelHandle, *, n: int, seed: int) -> list[str]:
    world = handle.world
    if world is not None and hasattr(world, "corpus"):
        return list(world.corpus(n, seed=seed))
    import random

    from workbench.worlds.factworld import filler_sentence

    rng = random.Random(seed)
    return [" ".join(filler_sentence(rng) for _ in range(2)) for _ in range(n)]


@torch.no_grad()
def _lm_loss(handle: ModelHandle, texts: list[str]) -> float:
    from workbench.unit_selection import input_batches

    total, count = 0.0, 0
    for batch, mask in input_batches(handle, texts, 16):
        out = run_model(handle.model, batch)
        logits = (out.logits if hasattr(out, "logits") else out)[:, :-1].float()
        labels = batch["input_ids"][:, 1:]
        keep = mask[:, 1:].bool() if mask is not None else torch.ones_like(labels, dtype=torch.bool)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        total += float(loss[keep.reshape(-1)].sum())
        count += int(keep.sum())
    return total / max(count, 1)


@torch.no_grad()
def _outputs(handle: ModelHandle, texts: list[str]) -> torch.Tensor:
    from workbench.unit_selection import input_batches, pool_tokens

    outs = []
    for batch, mask in input_batches(handle, texts, 16):
        out = run_model(handle.model, batch)
        value = out.logits if hasattr(out, "logits") else (out.last_hidden_state if hasattr(out, "last_hidden_state") else out)
        if isinstance(value, (tuple, list)):
            value = value[0]
        outs.append(pool_tokens(value.float(), mask, "mean").cpu())
    return torch.cat(outs)


@torch.no_grad()
def _image_figures(handle: ModelHandle, dictionary: SparseDictionary, *, n: int, seed: int) -> dict[str, Any]:
    from workbench.devices import torch_threads
    from workbench.zoo.shapesnet import world_of

    world = world_of(handle)
    sample = world.sample(n, generator=torch.Generator().manual_seed(seed))
    with torch_threads(1):
        images = world.render(sample)
    assert isinstance(images, torch.Tensor)
    labels = sample.labels.to(handle.device)

    def logits() -> torch.Tensor:
        return torch.cat([handle.model(images[i:i + 128].to(handle.device)) for i in range(0, n, 128)]).float()

    per_mode = _per_mode(handle, dictionary, logits)
    ce = {m: float(F.cross_entropy(v, labels)) for m, v in per_mode.items()}
    acc = {m: float((v.argmax(-1) == labels).float().mean()) for m, v in per_mode.items()}
    out = _recovered(ce, "cross_entropy", lower_better=True)
    out["accuracy"] = _recovered(acc, "accuracy", lower_better=False)
    out["n_images"] = n
    return out


__all__ = ["DictionaryQuality", "dictionary_quality", "dictionary_sites", "downstream_figures", "spliced"]
