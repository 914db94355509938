"""Streaming activation statistics: mean, second moment and covariance over a corpus.

ROME's key covariance, LEACE and whitening all need E[x], E[x x^T] or Cov[x] at one site
over many tokens. They are accumulated in float64 batch by batch (never holding all
activations), merged with Chan et al.'s pairwise update (a centered sum of outer products,
stabler than raw sums when the mean is large), and cached on disk under
`cache_dir()/stats`, keyed by the model fingerprint, site, corpus and sample count. A cache
file that fails its checksum or does not parse is logged and recomputed, never trusted.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from workbench.devices import resolve_device
from workbench.errors import CorruptFileError, UnsafeFileError, WorkbenchError
from workbench.fingerprint import model_fingerprint, tensor_digest
from workbench.hooks import capture
from workbench.progress import progress_bar
from workbench.sites import Site, resolve_site
from workbench.storage import cache_subdir, load_safetensors_checked, save_safetensors_checked, sha256_json

if TYPE_CHECKING:
    from workbench.handle import ModelHandle

log = logging.getLogger(__name__)

CACHE_FORMAT = "workbench.stats"
CACHE_VERSION = 1
_TOKENIZER_PROBE = "The quick brown fox, 1234 jumps: Zürich!"


class StreamingMoments:
    """Count, mean and centered outer-product sum of row vectors, accumulated in float64.

    `update(x)` takes activations of shape (..., dim); leading dims are flattened and an
    optional boolean `mask` of shape x.shape[:-1] drops rows (padding tokens).
    """

    def __init__(self, dim: int, *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float64) -> None:
        if dim <= 0:
            raise WorkbenchError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.device = torch.device("cpu") if device is None else resolve_device(device)
        self.dtype = dtype
        self.count = 0
        self._mean = torch.zeros(dim, device=self.device, dtype=dtype)
        self._m2 = torch.zeros(dim, dim, device=self.device, dtype=dtype)  # sum (x - mean)(x - mean)^T

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> int:
        """Add the rows of `x` (where `mask` is true); returns how many rows were added."""
        if x.shape[-1] != self.dim:
            raise WorkbenchError(f"activations have last dimension {x.shape[-1]}, expected {self.dim}")
        rows = x.detach().reshape(-1, self.dim)
        if mask is not None:
            if tuple(mask.shape) != tuple(x.shape[:-1]):
                raise WorkbenchError(f"mask has shape {tuple(mask.shape)}; expected {tuple(x.shape[:-1])} (x without its last dim)")
            rows = rows[mask.reshape(-1).to(device=rows.device, dtype=torch.bool)]
        n = rows.shape[0]
        if n == 0:
            return 0
        rows = rows.to(device=self.device, dtype=self.dtype)
        mean_b = rows.mean(dim=0)
        centered = rows - mean_b
        self._combine(n, mean_b, centered.T @ centered)
        return n

    def _combine(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    def merge(self, other: StreamingMoments) -> StreamingMoments:
        """Fold `other`'s samples into this accumulator (in place); returns self."""
        if other.dim != self.dim:
            raise WorkbenchError(f"cannot merge moments of dimension {other.dim} into {self.dim}")
        if other.count:
            self._combine(
                other.count,
                other._mean.to(self.device, self.dtype),
                other._m2.to(self.device, self.dtype),
            )
        return self

    def _need(self, n: int, what: str) -> None:
        if self.count < n:
            raise WorkbenchError(f"{what} needs at least {n} sample(s); only {self.count} were accumulated")

    @property
    def mean(self) -> torch.Tensor:
        self._need(1, "the mean")
        return self._mean.clone()

    @property
    def second_moment(self) -> torch.Tensor:
        """E[x x^T] (uncentered), what ROME's C is."""
        self._need(1, "the second moment")
        m = self._m2 / self.count + torch.outer(self._mean, self._mean)
        return (m + m.T) / 2

    @property
    def covariance(self) -> torch.Tensor:
        """Unbiased covariance (divides by count - 1), as `torch.cov`."""
        self._need(2, "the covariance")
        c = self._m2 / (self.count - 1)
        return (c + c.T) / 2

    def state(self) -> dict[str, torch.Tensor]:
        return {"mean": self._mean, "m2": self._m2, "count": torch.tensor([self.count], dtype=torch.int64)}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], *, device: str | torch.device | None = None) -> StreamingMoments:
        mean, m2 = state["mean"], state["m2"]
        out = cls(int(mean.shape[0]), device=device, dtype=mean.dtype)
        if tuple(m2.shape) != (out.dim, out.dim):
            raise WorkbenchError(f"moment state has m2 of shape {tuple(m2.shape)}, expected {(out.dim, out.dim)}")
        out.count = int(state["count"].reshape(-1)[0])
        out._mean, out._m2 = mean.to(out.device), m2.to(out.device)
        return out


@dataclass(frozen=True)
class SiteStatistics:
    """Statistics of one site over a corpus (float64; count = tokens or rows used; covariance is NaN for one sample)."""

    site: str
    mean: torch.Tensor
    second_moment: torch.Tensor
    covariance: torch.Tensor
    count: int
    key: str | None = None

    @classmethod
    def from_moments(cls, site: str, moments: StreamingMoments, key: str | None = None) -> SiteStatistics:
        cov = moments.covariance if moments.count >= 2 else torch.full_like(moments._m2, float("nan"))
        return cls(site, moments.mean, moments.second_moment, cov, moments.count, key)

    def to(self, device: str | torch.device) -> SiteStatistics:
        d = resolve_device(device)
        return SiteStatistics(self.site, self.mean.to(d), self.second_moment.to(d), self.covariance.to(d), self.count, self.key)


# --- collecting over a model -----------------------------------------------------------


def _run_to_site(source: ModelHandle | nn.Module, model: nn.Module, site: Site, inputs: Any) -> torch.Tensor:
    """One forward pass, stopped as soon as the site is reached (later layers are not needed)."""
    with capture(source, [site], detach=True, clone=False, stop=True) as acts:
        if isinstance(inputs, Mapping):
            model(**inputs)
        else:
            model(inputs)
    if site.name not in acts:
        raise WorkbenchError(f"the forward pass never reached site {site.name!r}; is {site.module_path} used by this model's forward?")
    return acts[site.name]


def _max_length(model: nn.Module, tokenizer: Any) -> int:
    config = getattr(model, "config", None)
    limits = [getattr(config, a, None) for a in ("n_positions", "max_position_embeddings")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    valid = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(valid) if valid else 512


def _tokenize(tokenizer: Any, texts: list[str], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded batch with an attention mask (works for tokenizers without a pad token)."""
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    ids: list[list[int]] = enc["input_ids"]
    width = max((len(row) for row in ids), default=0)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = pad_id if isinstance(pad_id, int) else 0
    out: dict[str, torch.Tensor] = {}
    for key, rows in enc.items():
        if key not in ("input_ids", "attention_mask", "token_type_ids"):
            continue
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.tensor([list(r) + [fill] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    if "attention_mask" not in out:
        out["attention_mask"] = torch.tensor(
            [[1] * len(r) + [0] * (width - len(r)) for r in ids], dtype=torch.long, device=device
        )
    return out


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _corpus_id(data: Any) -> str | None:
    """A content hash for a re-iterable corpus (list of texts or tensors); None otherwise."""
    if not isinstance(data, Sequence) or isinstance(data, (str, bytes)):
        return None
    if all(isinstance(t, str) for t in data):
        return "texts:" + sha256_json(list(data))
    parts: list[Any] = []
    for item in data:
        if isinstance(item, torch.Tensor):
            parts.append(tensor_digest(item))
        elif isinstance(item, Mapping) and all(isinstance(v, torch.Tensor) for v in item.values()):
            parts.append({k: tensor_digest(v) for k, v in item.items()})
        else:
            return None
    return "tensors:" + sha256_json(parts)


def statistics_key(
    model: nn.Module,
    site: Site,
    *,
    corpus_id: str,
    n_samples: int | None,
    tokenizer: Any = None,
    max_length: int | None = None,
    feature_dim: int = -1,
) -> tuple[str, dict[str, Any]]:
    """The cache key (sha256) and the fields it hashes."""
    param = next(model.parameters(), None)
    probe = list(tokenizer(_TOKENIZER_PROBE)["input_ids"]) if tokenizer is not None else None
    fields = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "model": model_fingerprint(model),
        "site": [site.name, site.module_path, site.side],
        "corpus": corpus_id,
        "n_samples": n_samples,
        "dtype": str(param.dtype) if param is not None else None,
        "tokenizer": None if tokenizer is None else [len(tokenizer), probe],
        "max_length": max_length,
        "feature_dim": feature_dim,
    }
    return sha256_json(fields), fields


def _load_cached(path: Path, key: str, device: torch.device) -> StreamingMoments | None:
    if not path.exists():
        return None
    try:
        tensors, meta = load_safetensors_checked(path, what="statistics cache file")
        if not isinstance(meta, dict) or meta.get("key") != key:
            raise CorruptFileError(f"statistics cache file {path} holds key {meta.get('key') if isinstance(meta, dict) else None!r}, not {key!r}")
        return StreamingMoments.from_state(tensors, device=device)
    except (CorruptFileError, UnsafeFileError, WorkbenchError, KeyError, ValueError) as exc:
        log.warning("ignoring statistics cache file %s and recomputing: %s", path, exc)
        return None


def collect_statistics(
    source: ModelHandle | nn.Module,
    site: str | Site,
    data: Iterable[str] | Iterable[torch.Tensor] | Iterable[Mapping[str, torch.Tensor]],
    *,
    n_samples: int | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    cache: bool | str | os.PathLike[str] = True,
    corpus_id: str | None = None,
    max_length: int | None = None,
    feature_dim: int = -1,
    progress: bool = True,
) -> SiteStatistics:
    """Mean, second moment and covariance of `site` over `data`, cached on disk.

    `data` is texts (tokenized with the handle's tokenizer, `batch_size` per forward pass,
    padding skipped, each token one sample) or ready batches: tensors fed as `model(x)` or
    dicts fed as `model(**batch)` (an `attention_mask` in the dict masks rows; a
    `sample_mask`, which is not passed to the model, picks which positions count as samples,
    e.g. only the token where an editor reads its key). Stops after
    exactly `n_samples` samples (all data when None). `feature_dim` picks the feature axis
    of the activation (e.g. 1 for per-channel CNN statistics). `device` is where the float64
    sums live (default: the model's device); the model is not moved. `cache`: True uses
    `cache_dir()` ($WORKBENCH_CACHE), a path uses that folder, False disables. The corpus is
    identified by `corpus_id`, or by a content hash when `data` is a list; a one-shot
    iterator without `corpus_id` is not cached.
    """
    model = source if isinstance(source, nn.Module) else source.model
    tokenizer = None if isinstance(source, nn.Module) else getattr(source, "tokenizer", None)
    resolved = resolve_site(source, site)
    param = next(model.parameters(), None)
    model_device = param.device if param is not None else torch.device("cpu")
    acc_device = model_device if device is None else resolve_device(device)
    if n_samples is not None and n_samples <= 0:
        raise WorkbenchError(f"n_samples must be positive (or None for the whole corpus), got {n_samples}")

    iterator = iter(data)
    first = next(iterator, None)
    if first is None:
        raise WorkbenchError("the corpus is empty; pass texts or batches")
    is_text = isinstance(first, str)
    if is_text and tokenizer is None:
        raise WorkbenchError("texts need a tokenizer: pass a ModelHandle with one, or pre-tokenized batches")
    if is_text:
        max_length = max_length or _max_length(model, tokenizer)
    items: Iterator[Any] = itertools.chain([first], iterator)

    if corpus_id is None:
        corpus_id = _corpus_id(data)
    root = cache_subdir(cache, "stats")
    key: str | None = None
    path: Path | None = None
    if root is not None and corpus_id is None:
        log.info("statistics for %s are not cached: pass corpus_id= to cache a one-shot iterator", resolved.name)
    elif root is not None:
        key, _fields = statistics_key(
            model,
            resolved,
            corpus_id=corpus_id,
            n_samples=n_samples,
            tokenizer=tokenizer if is_text else None,
            max_length=max_length if is_text else None,
            feature_dim=feature_dim,
        )
        path = root / f"{key}.safetensors"
        cached = _load_cached(path, key, acc_device)
        if cached is not None:
            log.info("statistics for %s loaded from cache %s (%d samples)", resolved.name, path, cached.count)
            return SiteStatistics.from_moments(resolved.name, cached, key)

    moments: StreamingMoments | None = None
    was_training = model.training
    model.eval()
    bar = progress_bar(
        total=n_samples,
        desc=f"statistics {resolved.name}",
        unit="tok" if is_text else "sample",
        enabled=progress,
        leave=False,
    )
    try:
        with torch.no_grad():
            batches: Iterator[Any] = (
                (_tokenize(tokenizer, list(chunk), max_length or 0, model_device) for chunk in _chunks(items, batch_size))
                if is_text
                else (_to_device(b, model_device) for b in items)
            )
            for batch in batches:
                sample_mask = None
                if isinstance(batch, Mapping) and "sample_mask" in batch:
                    batch = dict(batch)
                    sample_mask = batch.pop("sample_mask")
                x = _run_to_site(source, model, resolved, batch)
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                if sample_mask is not None:
                    mask = sample_mask if mask is None else mask.bool() & sample_mask.bool()
                if feature_dim != -1:
                    x = x.movedim(feature_dim, -1)
                if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
                    raise WorkbenchError(
                        f"site {resolved.name} has activations of shape {tuple(x.shape)}, which the attention "
                        f"mask {tuple(mask.shape)} does not index; choose a per-token site"
                    )
                if moments is None:
                    moments = StreamingMoments(int(x.shape[-1]), device=acc_device)
                rows = x.reshape(-1, x.shape[-1])
                if mask is not None:
                    rows = rows[mask.reshape(-1).bool()]
                if n_samples is not None:
                    rows = rows[: n_samples - moments.count]
                bar.update(moments.update(rows))
                if n_samples is not None and moments.count >= n_samples:
                    break
    finally:
        bar.close()
        model.train(was_training)

    if moments is None or moments.count == 0:
        raise WorkbenchError(f"no samples reached site {resolved.name}: the corpus is empty or fully masked")
    if n_samples is not None and moments.count < n_samples:
        log.warning("corpus ran out: %s statistics use %d of the %d samples asked for", resolved.name, moments.count, n_samples)
    if path is not None:
        save_safetensors_checked(
            path,
            {k: v.cpu() for k, v in moments.state().items()},
            {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "site": resolved.name, "count": moments.count},
        )
    return SiteStatistics.from_moments(resolved.name, moments, key)


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    if size <= 0:
        raise WorkbenchError(f"batch_size must be positive, got {size}")
    while chunk := list(itertools.islice(items, size)):
        for t in chunk:
            if not isinstance(t, str):
                raise WorkbenchError(f"a text corpus must hold only strings, found {type(t).__name__}")
        yield chunk
