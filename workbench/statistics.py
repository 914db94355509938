"""Streaming activation statistics: mean, second moment and covariance over a corpus.

ROME's key covariance, LEACE and whitening all need E[x], E[x x^T] or Cov[x] at one site
over many tokens. They are accumulated in float64 batch by batch (never holding all
activations), merged with Chan et al.'s pairwise update (a centered sum of outer products,
stabler than raw sums when the mean is large), and cached on disk under
`cache_dir()/stats`, keyed by the model fingerprint, site, corpus and sample count. A cache
file that fails its checksum or does not parse is logged and recomputed, never trusted.

Costs that would otherwise repeat: results are also kept in memory for the rest of the
process (least recently used first out, within `memory_budget()` bytes), so a run of edits
at one site reads the disk once; a long collection writes a checkpoint of its running sums
every `checkpoint_every` batches, and a collection interrupted after a checkpoint resumes
from it (skipping the batches already counted) to the same bits as an uninterrupted run.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import OrderedDict
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
CACHE_VERSION = 2  # 2: text batches sorted by length (same samples, other summation order)
PARTIAL_FORMAT = "workbench.stats.partial"
_TOKENIZER_PROBE = "The quick brown fox, 1234 jumps: Zürich!"
DEFAULT_MEMORY_BUDGET = 2 * 2**30
"""Bytes of statistics kept in memory per process (`WORKBENCH_STATS_MEMORY` overrides; 0 keeps none)."""
DEFAULT_CHECKPOINT_EVERY = 200
"""Batches between checkpoints of a collection that is cached (so an interruption loses at most these)."""


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


# --- in-process memory of finished statistics ------------------------------------------

_memory: OrderedDict[str, SiteStatistics] = OrderedDict()
_memory_lock = threading.Lock()


def memory_budget() -> int:
    """Bytes of statistics this process keeps in memory (`WORKBENCH_STATS_MEMORY`, else 2 GiB)."""
    raw = os.environ.get("WORKBENCH_STATS_MEMORY")
    if raw is None or not raw.strip():
        return DEFAULT_MEMORY_BUDGET
    try:
        value = int(raw)
    except ValueError:
        raise WorkbenchError(f"WORKBENCH_STATS_MEMORY={raw!r}: expected a number of bytes (0 keeps none in memory)") from None
    if value < 0:
        raise WorkbenchError(f"WORKBENCH_STATS_MEMORY={value}: expected a number of bytes >= 0")
    return value


def _nbytes(stats: SiteStatistics) -> int:
    return sum(t.numel() * t.element_size() for t in (stats.mean, stats.second_moment, stats.covariance))


def remember(stats: SiteStatistics) -> None:
    """Keep `stats` (which has a cache key) in memory, dropping the least recently used beyond the budget."""
    budget = memory_budget()
    if stats.key is None or _nbytes(stats) > budget:
        return
    with _memory_lock:
        _memory[stats.key] = stats
        _memory.move_to_end(stats.key)
        while sum(_nbytes(v) for v in _memory.values()) > budget:
            _memory.popitem(last=False)


def recall(key: str) -> SiteStatistics | None:
    """Statistics kept in memory under `key`, or None. Treat the tensors as read-only: they are shared."""
    with _memory_lock:
        stats = _memory.get(key)
        if stats is not None:
            _memory.move_to_end(key)
        return stats


def forget_all() -> None:
    """Empty the in-process memory (the disk cache stays)."""
    with _memory_lock:
        _memory.clear()


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


SORT_WINDOW = 16
"""Text batches are formed `batch_size * SORT_WINDOW` texts at a time, sorted by length (less padding)."""


def _padded(enc: Mapping[str, list[list[int]]], rows: Sequence[int], takes: Sequence[int], pad_id: int,
            device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded tensors of the encoded `rows`, with a `sample_mask` of each row's first `takes` tokens."""
    ids = [enc["input_ids"][r] for r in rows]
    width = max((len(row) for row in ids), default=0)
    out: dict[str, torch.Tensor] = {}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in enc:
            fill = pad_id if key == "input_ids" else 0
            out[key] = torch.tensor([list(enc[key][r]) + [fill] * (width - len(enc[key][r])) for r in rows],
                                    dtype=torch.long, device=device)
    if "attention_mask" not in out:
        out["attention_mask"] = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids], dtype=torch.long,
                                             device=device)
    out["sample_mask"] = torch.tensor([[1] * t + [0] * (width - t) for t in takes], dtype=torch.long, device=device)
    return out


def _sorted_text_batches(items: Iterator[str], tokenizer: Any, batch_size: int, max_length: int,
                         device: torch.device, n_samples: int | None) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of `batch_size` texts, sorted by length within windows of the corpus.

    The samples are the corpus's first `n_samples` tokens in corpus order (all when None), as
    if read text by text: a text cut by the count is still run whole (a bidirectional model's
    activations depend on the rest of it) and only its first tokens are counted. Sorting only
    changes which texts share a batch, so padding, the cost that grows with length spread, shrinks.
    """
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = pad_id if isinstance(pad_id, int) else 0
    remaining = n_samples
    for window in _chunks(items, batch_size * SORT_WINDOW):
        enc = tokenizer(window, truncation=True, max_length=max_length)
        lengths = [len(row) for row in enc["input_ids"]]
        takes = []
        for n in lengths:
            take = n if remaining is None else min(n, remaining)
            if take == 0 and remaining == 0:
                break
            takes.append(take)
            if remaining is not None:
                remaining -= take
        order = sorted(range(len(takes)), key=lambda i: lengths[i])
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            yield _padded(enc, rows, [takes[r] for r in rows], pad_id, device)
        if remaining == 0:
            return


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
    checkpoint_every: int | None = DEFAULT_CHECKPOINT_EVERY,
) -> SiteStatistics:
    """Mean, second moment and covariance of `site` over `data`, cached in memory and on disk.

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
    iterator without `corpus_id` is not cached. A cached collection checkpoints its running
    sums every `checkpoint_every` batches (None: never) and resumes from the last checkpoint
    when the same key is asked for again after an interruption.
    """
    model = source if isinstance(source, nn.Module) else source.model
    tokenizer = None if isinstance(source, nn.Module) else getattr(source, "tokenizer", None)
    resolved = resolve_site(source, site)
    param = next(model.parameters(), None)
    model_device = param.device if param is not None else torch.device("cpu")
    acc_device = model_device if device is None else resolve_device(device)
    if n_samples is not None and n_samples <= 0:
        raise WorkbenchError(f"n_samples must be positive (or None for the whole corpus), got {n_samples}")
    if checkpoint_every is not None and checkpoint_every <= 0:
        raise WorkbenchError(f"checkpoint_every must be a positive number of batches (or None), got {checkpoint_every}")

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
        kept = recall(key)
        if kept is not None and kept.site == resolved.name:
            log.info("statistics for %s found in memory (%d samples)", resolved.name, kept.count)
            return kept.to(acc_device)
        path = root / f"{key}.safetensors"
        cached = _load_cached(path, key, acc_device)
        if cached is not None:
            log.info("statistics for %s loaded from cache %s (%d samples)", resolved.name, path, cached.count)
            stats = SiteStatistics.from_moments(resolved.name, cached, key)
            remember(stats)
            return stats

    moments: StreamingMoments | None = None
    done = 0  # batches counted so far (resumed from a checkpoint, then this run's)
    partial = None if path is None else path.with_name(f"{key}.partial.safetensors")
    if partial is not None:
        resumed = _load_partial(partial, key, acc_device)
        if resumed is not None:
            moments, done = resumed
            log.info("statistics for %s resume from %s: %d batches, %d samples", resolved.name, partial, done,
                     moments.count)
    was_training = model.training
    model.eval()
    bar = progress_bar(
        total=n_samples,
        desc=f"statistics {resolved.name}",
        unit="tok" if is_text else "sample",
        enabled=progress,
        leave=False,
        initial=0 if moments is None else moments.count,
    )
    try:
        with torch.no_grad():
            batches: Iterator[Any] = (
                _sorted_text_batches(items, tokenizer, batch_size, max_length or 0, model_device, n_samples)
                if is_text
                else (_to_device(b, model_device) for b in items)
            )
            for batch in itertools.islice(batches, done, None):  # a resumed run skips what its checkpoint holds
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
                done += 1
                if n_samples is not None and moments.count >= n_samples:
                    break
                if partial is not None and checkpoint_every is not None and done % checkpoint_every == 0:
                    _save_partial(partial, key, moments, done)
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
        if partial is not None:
            partial.unlink(missing_ok=True)
    stats = SiteStatistics.from_moments(resolved.name, moments, key)
    remember(stats)
    return stats


def _save_partial(path: Path, key: str | None, moments: StreamingMoments, batches: int) -> None:
    save_safetensors_checked(path, {k: v.cpu() for k, v in moments.state().items()},
                             {"format": PARTIAL_FORMAT, "version": CACHE_VERSION, "key": key, "batches": batches})


def _load_partial(path: Path, key: str, device: torch.device) -> tuple[StreamingMoments, int] | None:
    """A checkpoint of an interrupted collection of `key`: (running sums, batches counted), or None."""
    if not path.exists():
        return None
    try:
        tensors, meta = load_safetensors_checked(path, what="statistics checkpoint")
        if not isinstance(meta, dict) or meta.get("key") != key or meta.get("format") != PARTIAL_FORMAT:
            raise CorruptFileError(f"statistics checkpoint {path} is not a checkpoint of key {key!r}")
        batches = meta.get("batches")
        if isinstance(batches, bool) or not isinstance(batches, int) or batches <= 0:
            raise CorruptFileError(f"statistics checkpoint {path} records {batches!r} batches")
        return StreamingMoments.from_state(tensors, device=device), batches
    except (CorruptFileError, UnsafeFileError, WorkbenchError, KeyError, ValueError) as exc:
        log.warning("ignoring statistics checkpoint %s and starting over: %s", path, exc)
        return None


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    if size <= 0:
        raise WorkbenchError(f"batch_size must be positive, got {size}")
    while chunk := list(itertools.islice(items, size)):
        for t in chunk:
            if not isinstance(t, str):
                raise WorkbenchError(f"a text corpus must hold only strings, found {type(t).__name__}")
        yield chunk
