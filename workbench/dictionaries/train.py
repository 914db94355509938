"""Training dictionaries on streamed activations: bounded memory, resumable, cached by model fingerprint.

    d = train_dictionary(h, "layer2", TrainConfig(kind="topk", width=256, k=8))
    d.dictionary.encode(rows); d.quality.explained_variance; d.path   # cfg.json + sae_weights.safetensors

Activations come from an `ActivationSource` chunk by chunk (`workbench.dictionaries.activations`)
into a mixing buffer of `buffer` rows: when full it is shuffled (seeded), its first half is
trained on in batches and the second half kept, so memory is set by `buffer`, never by
`n_activations`. The optimization is SAELens's (6.x): Adam, gradient norm clipped at 1,
summed-squared-error reconstruction, and per kind an L1 penalty on decoder-norm-weighted
latents (relu, transcoder), a straight-through L0 penalty with a rectangle kernel (jumprelu),
or TopK with the auxiliary dead-latent loss (topk); inputs are scaled so that E|x| =
sqrt(d_in) while training, and the scale is folded into the saved weights (SAELens's
`expected_average_only_in`). Why not SAELens's own trainer: SAELens brings transformer-lens,
wandb and their dependencies, which this project's environment does not carry (it lives in the
peers environment), and its runner expects TransformerLens models, not ShapesNet's conv sites or
a world's generator. Its format is followed exactly and its training step is timed beside this
one (`benchmarks/RESULTS.md`, "Sparse dictionaries").

The result is cached under `cache_dir()/dictionaries/KEY/`, KEY hashing the model
fingerprint, the site(s), the activation source and the config; while training, a checkpoint
(`KEY.checkpoint.safetensors`: weights, Adam moments, the kept buffer rows, the generator
state, the next chunk) is written atomically at the end of a buffer round, at most every
`checkpoint_seconds`, and a later call with the same KEY resumes from it and ends with the
same dictionary as an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench.devices import torch_threads
from workbench.dictionaries.activations import ActivationSource, default_source, stream_rows
from workbench.dictionaries.sae import KINDS, DictionaryConfig, Kind, SparseDictionary, jumprelu_step
from workbench.errors import CorruptFileError, UnsafeFileError, WorkbenchError, require_finite
from workbench.fingerprint import model_fingerprint
from workbench.handle import ModelHandle
from workbench.progress import progress_bar
from workbench.sites import Site, resolve_site
from workbench.storage import (
    cache_subdir,
    exclusive_lock,
    load_safetensors_checked,
    replace_folder,
    save_safetensors_checked,
    sha256_json,
)

log = logging.getLogger(__name__)

FORMAT = "workbench.dictionary"
VERSION = 1
DEFAULT_SPARSITY = {"relu": 1.0, "transcoder": 1.0, "jumprelu": 1.0}
"""Sparsity coefficients (L1 for relu/transcoder, L0 for jumprelu) on activations scaled to E|x| = sqrt(d_in)."""


@dataclass(frozen=True)
class TrainConfig:
    """How a dictionary is trained. `width` (latents) defaults to `expansion` x d_in; `k` (TopK only)
    to min(64, d_in // 4, width); `sparsity` to `DEFAULT_SPARSITY[kind]`. The same config and seed give
    the same dictionary."""

    kind: Kind = "topk"
    width: int | None = None
    expansion: int = 8
    k: int | None = None
    n_activations: int = 1_048_576
    batch_size: int = 1024
    lr: float = 3e-3
    lr_decay_fraction: float = 0.2
    sparsity: float | None = None
    sparsity_warmup_fraction: float = 0.05
    aux_coefficient: float = 1.0
    dead_steps: int = 200
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    decoder_init_norm: float = 0.1
    init_b_dec_to_mean: bool = True
    normalize: bool = True
    buffer: int = 32_768
    seed: int = 0
    threads: int | None = None
    checkpoint_seconds: float = 30.0

    def __post_init__(self) -> None:
        require_finite(self)
        if self.kind not in KINDS:
            raise WorkbenchError(f"unknown dictionary kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.width is not None and self.width <= 0:
            raise WorkbenchError(f"width={self.width}: the number of latents must be positive")
        if self.expansion <= 0:
            raise WorkbenchError(f"expansion={self.expansion}: expected a positive multiple of d_in")
        if self.k is not None:
            if self.kind != "topk":
                raise WorkbenchError(f"k={self.k} is a TopK setting; kind {self.kind!r} has none (use --kind topk)")
            if self.k <= 0:
                raise WorkbenchError(f"k={self.k}: a TopK dictionary keeps at least one latent (k >= 1)")
            if self.width is not None and self.k > self.width:
                raise WorkbenchError(f"k={self.k} exceeds width={self.width}; TopK keeps at most width latents")
        for name in ("n_activations", "batch_size", "buffer", "dead_steps"):
            if getattr(self, name) <= 0:
                raise WorkbenchError(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.buffer < 2 * self.batch_size:
            raise WorkbenchError(f"buffer={self.buffer} must hold at least two batches (2 x batch_size={2 * self.batch_size})")
        if self.lr <= 0:
            raise WorkbenchError(f"lr={self.lr}: expected a positive learning rate")
        if self.sparsity is not None and self.sparsity < 0:
            raise WorkbenchError(f"sparsity={self.sparsity}: expected a coefficient >= 0")
        for name in ("lr_decay_fraction", "sparsity_warmup_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise WorkbenchError(f"{name}={getattr(self, name)}: expected a share between 0 and 1")

    def resolved(self, d_in: int) -> TrainConfig:
        """This config with width, k and sparsity filled in for a site of dimension `d_in`."""
        from dataclasses import replace

        width = self.width if self.width is not None else self.expansion * d_in
        k = self.k
        if self.kind == "topk" and k is None:
            k = max(1, min(64, d_in // 4, width))
        if k is not None and k > width:
            raise WorkbenchError(f"k={k} exceeds width={width}; TopK keeps at most width latents")
        sparsity = self.sparsity if self.sparsity is not None else DEFAULT_SPARSITY.get(self.kind)
        return replace(self, width=width, k=k, sparsity=sparsity)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that change the result (threads and checkpointing do not)."""
        out = self.to_json()
        out.pop("threads")
        out.pop("checkpoint_seconds")
        return out


# --------------------------------------------------------------------------------------
# The optimization
# --------------------------------------------------------------------------------------


class DictionaryTrainer:
    """Adam on a `SparseDictionary` with SAELens's losses: one `step(x, y)` per batch of rows.

    `x`: (B, d_in) input rows, `y`: (B, d_out) targets for a transcoder (x itself otherwise),
    both already scaled. Keeps SAELens's dead-latent bookkeeping (steps since each latent last
    fired) for the TopK auxiliary loss and the firing statistics.
    """

    def __init__(self, dictionary: SparseDictionary, config: TrainConfig, *, total_steps: int) -> None:
        self.dictionary = dictionary
        self.config = config
        self.total_steps = max(1, int(total_steps))
        self.optimizer = torch.optim.Adam(dictionary.parameters(), lr=config.lr, betas=(0.9, 0.999))
        self.steps = 0
        self.since_fired = torch.zeros(dictionary.d_sae, dtype=torch.long)

    def _lr(self) -> float:
        decay_start = self.total_steps * (1.0 - self.config.lr_decay_fraction)
        if self.steps < decay_start or self.config.lr_decay_fraction == 0:
            return self.config.lr
        return self.config.lr * max(0.0, (self.total_steps - self.steps) / (self.total_steps - decay_start))

    def _sparsity(self) -> float:
        warm = self.total_steps * self.config.sparsity_warmup_fraction
        base = float(self.config.sparsity or 0.0)
        return base if warm <= 0 else base * min(1.0, (self.steps + 1) / warm)

    def step(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, float]:
        d = self.dictionary
        cfg = d.config
        target = x if y is None else y
        d.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        if cfg.kind == "jumprelu":
            with torch.no_grad():
                d.threshold.clamp_(min=0.0)
        pre = d._pre(x)
        acts = d.activate(pre)
        recon = d.decode(acts)
        mse = (recon - target).pow(2).sum(-1).mean()
        loss = mse
        stats: dict[str, float] = {}
        if cfg.kind in ("relu", "transcoder"):
            l1 = (acts * d.W_dec.norm(dim=1)).sum(-1).mean()
            loss = loss + self._sparsity() * l1
            stats["l1"] = float(l1.detach())
        elif cfg.kind == "jumprelu":
            l0 = jumprelu_step(pre, d.threshold.to(pre.dtype), d.bandwidth).sum(-1).mean()
            loss = loss + self._sparsity() * l0
        elif cfg.kind == "topk":
            dead = self.since_fired > self.config.dead_steps
            n_dead = int(dead.sum())
            if n_dead:
                k_aux = max(1, min(x.shape[-1] // 2, n_dead))
                scale = min(n_dead / max(1, x.shape[-1] // 2), 1.0)
                masked = torch.where(dead[None], pre, torch.tensor(-torch.inf, dtype=pre.dtype))
                top = masked.topk(k_aux, dim=-1, sorted=False)
                aux_acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
                aux = (aux_acts @ d.W_dec - (target - recon).detach()).pow(2).sum(-1).mean()
                loss = loss + self.config.aux_coefficient * scale * aux
                stats["aux"] = float(aux.detach())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(d.parameters(), 1.0)
        self.optimizer.step()
        with torch.no_grad():
            fired = (acts > 0).any(0).cpu()
            self.since_fired += 1
            self.since_fired[fired] = 0
            stats["l0"] = float((acts > 0).float().sum(-1).mean())
        stats["mse"] = float(mse.detach())
        stats["loss"] = float(loss.detach())
        self.steps += 1
        return stats

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, torch.Tensor]:
        out = {f"sae.{k}": v.detach().clone() for k, v in self.dictionary.state_dict().items()}
        names = dict(self.dictionary.named_parameters())
        for name, p in names.items():
            s = self.optimizer.state.get(p)
            if s:
                out[f"adam.step.{name}"] = torch.as_tensor(s["step"], dtype=torch.float32).reshape(1)
                out[f"adam.exp_avg.{name}"] = s["exp_avg"].detach().clone()
                out[f"adam.exp_avg_sq.{name}"] = s["exp_avg_sq"].detach().clone()
        out["since_fired"] = self.since_fired.clone()
        out["steps"] = torch.tensor([self.steps], dtype=torch.long)
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.dictionary.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("sae.")})
        for name, p in self.dictionary.named_parameters():
            if f"adam.exp_avg.{name}" in state:
                self.optimizer.state[p] = {
                    "step": state[f"adam.step.{name}"].reshape(()).clone(),
                    "exp_avg": state[f"adam.exp_avg.{name}"].clone(),
                    "exp_avg_sq": state[f"adam.exp_avg_sq.{name}"].clone(),
                }
        self.since_fired = state["since_fired"].clone()
        self.steps = int(state["steps"].reshape(-1)[0])


# --------------------------------------------------------------------------------------
# Streaming, caching, resuming
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """Where a training run is (passed to `callback` after every step)."""

    step: int
    total_steps: int
    stats: dict[str, float]


@dataclass(frozen=True)
class TrainedDictionary:
    """A trained (or cached) dictionary with where it lives and how it was made.

    `throughput` holds `activations_per_second` (rows trained per second of the whole run,
    streaming included; absent when loaded from cache), `optimizer_activations_per_second` (of the
    optimization steps alone) and `peak_buffer_rows`.
    """

    dictionary: SparseDictionary
    path: Path | None
    key: str
    cached: bool
    resumed_from_step: int
    throughput: dict[str, float] = field(default_factory=dict)

    @property
    def quality(self) -> dict[str, Any]:
        return dict(self.dictionary.config.metadata.get("quality") or {})

    def save(self, path: str | os.PathLike[str]) -> Path:
        return self.dictionary.save(path)


def transcoder_sites(handle: ModelHandle, site: str | Site, out_site: str | Site | None) -> tuple[Site, Site]:
    """(input, output) sites of a transcoder: given, or the two sides of the module `site` names
    (`blocks.L.mlp.hook_out` -> that MLP's input and output)."""
    resolved = resolve_site(handle, site)
    if out_site is not None:
        return resolved, resolve_site(handle, out_site)
    if resolved.side == "output":
        return resolve_site(handle, f"{resolved.module_path}:input"), resolved
    return resolved, resolve_site(handle, resolved.module_path)


def dictionary_key(handle: ModelHandle, sites: Sequence[Site], source: ActivationSource, config: TrainConfig, *,
                   fingerprint: str | None = None) -> str:
    """The cache key: model fingerprint, sites, activation source and config."""
    return sha256_json({
        "format": FORMAT, "version": VERSION,
        "model": fingerprint or model_fingerprint(handle.model),
        "sites": [[s.name, s.module_path, s.side] for s in sites],
        "source": source.identity, "config": config.identity(),
    })


def load_cached(root: Path, key: str) -> SparseDictionary | None:
    folder = root / key
    if not folder.is_dir():
        return None
    try:
        d = SparseDictionary.load(folder)
    except (CorruptFileError, UnsafeFileError, WorkbenchError, OSError) as exc:
        log.warning("ignoring dictionary cache entry %s and retraining: %s", folder, exc)
        return None
    if d.config.metadata.get("cache_key") != key:
        log.warning("dictionary cache entry %s holds key %r, not %r; retraining", folder, d.config.metadata.get("cache_key"), key)
        return None
    return d


def train_dictionary(
    handle: ModelHandle,
    site: str | Site,
    config: TrainConfig | None = None,
    *,
    source: ActivationSource | None = None,
    corpus: Sequence[str] | None = None,
    out_site: str | Site | None = None,
    cache: bool | str | os.PathLike[str] = True,
    out: str | os.PathLike[str] | None = None,
    evaluate: bool = True,
    eval_activations: int = 65_536,
    progress: bool = True,
    callback: Callable[[Progress], None] | None = None,
) -> TrainedDictionary:
    """Train (or load from cache, or resume) a dictionary of `config.kind` on `site` of `handle`.

    `source`: the activation stream (default: `default_source`: the handle's world, or `corpus`).
    A transcoder reads `site` and predicts `out_site` (see `transcoder_sites`). `out`: also save
    the dictionary to this new folder. `evaluate`: measure `quality.dictionary_quality` on a
    held-out stream (seed + 1) and keep it in the dictionary's metadata. `callback(progress)`
    runs after every step (raising from it interrupts training; the last checkpoint stays).
    """
    config = TrainConfig() if config is None else config
    if config.kind == "transcoder":
        in_site, target_site = transcoder_sites(handle, site, out_site)
        sites = [in_site, target_site]
    else:
        if out_site is not None:
            raise WorkbenchError("out_site is for transcoders (kind='transcoder'); an SAE reconstructs its own site")
        sites = [resolve_site(handle, site)]
    if out is not None and Path(out).exists():
        raise WorkbenchError(f"{out} exists; give a new folder for the dictionary (it is never overwritten)")
    source = default_source(handle, seed=config.seed, corpus=corpus) if source is None else source
    fingerprint = model_fingerprint(handle.model)
    key = dictionary_key(handle, sites, source, config, fingerprint=fingerprint)
    root = cache_subdir(cache, "dictionaries")

    def finish(result: TrainedDictionary) -> TrainedDictionary:
        if out is not None:
            result.dictionary.save(out)
        return result

    with torch_threads(config.threads):
        if root is None:
            d, resumed, throughput = _train(handle, sites, source, config, key=key, fingerprint=fingerprint,
                                            checkpoint=None, progress=progress, callback=callback)
            if evaluate:
                d = _with_quality(handle, d, source, config, eval_activations, progress)
            return finish(TrainedDictionary(d, Path(out) if out is not None else None, key, False, resumed, throughput))
        with exclusive_lock(root / f"{key}.lock"):
            cached = load_cached(root, key)
            if cached is not None and (cached.config.metadata.get("quality") or not evaluate):
                log.info("dictionary %s loaded from cache", key[:12])
                return finish(TrainedDictionary(cached, root / key, key, True, 0, {}))
            if cached is not None:
                d, resumed, throughput = cached, 0, {}
            else:
                d, resumed, throughput = _train(handle, sites, source, config, key=key, fingerprint=fingerprint,
                                                checkpoint=root / f"{key}.checkpoint.safetensors", progress=progress,
                                                callback=callback)
            if evaluate:
                d = _with_quality(handle, d, source, config, eval_activations, progress)
            replace_folder(root / key, d.write)
            (root / f"{key}.checkpoint.safetensors").unlink(missing_ok=True)
            return finish(TrainedDictionary(d, root / key, key, False, resumed, throughput))


def _with_quality(handle: ModelHandle, d: SparseDictionary, source: ActivationSource, config: TrainConfig,
                  eval_activations: int, progress: bool) -> SparseDictionary:
    from dataclasses import replace

    from workbench.dictionaries.quality import dictionary_quality

    held_out = _reseeded(handle, source, config)
    q = dictionary_quality(handle, d, source=held_out, n_activations=eval_activations, progress=progress)
    meta = dict(d.config.metadata)
    meta["quality"] = q.to_json()
    d.config = replace(d.config, metadata=meta)
    return d


def _reseeded(handle: ModelHandle, source: ActivationSource, config: TrainConfig) -> ActivationSource:
    """The same kind of stream on seed + 1 (held out from training)."""
    from workbench.dictionaries.activations import chunk_seed

    offset = chunk_seed(config.seed, -1) % 1_000_000 + 1_000_000

    def make(index: int) -> tuple[Any, torch.Tensor | None]:
        return source.make(offset + index)

    return ActivationSource(identity=f"{source.identity}:held-out", make=make, description=source.description + " (held out)")


def _scale(rows: torch.Tensor) -> float:
    """sqrt(d) / E|x|: the factor that brings rows to SAELens's expected_average_only_in norm."""
    mean_norm = float(rows.norm(dim=-1).mean())
    return math.sqrt(rows.shape[-1]) / mean_norm if mean_norm > 0 else 1.0


def _train(handle: ModelHandle, sites: list[Site], source: ActivationSource, config: TrainConfig, *, key: str,
           fingerprint: str, checkpoint: Path | None, progress: bool,
           callback: Callable[[Progress], None] | None) -> tuple[SparseDictionary, int, dict[str, float]]:
    start_time = time.perf_counter()
    state: dict[str, torch.Tensor] | None = None
    meta: dict[str, Any] = {}
    if checkpoint is not None and checkpoint.exists():
        try:
            state, meta = load_safetensors_checked(checkpoint, what="dictionary checkpoint")
            if not isinstance(meta, dict) or meta.get("key") != key:
                raise CorruptFileError(f"{checkpoint} belongs to another training run")
        except (CorruptFileError, UnsafeFileError) as exc:
            log.warning("ignoring dictionary checkpoint %s and starting over: %s", checkpoint, exc)
            state, meta = None, {}

    transcoder = config.kind == "transcoder"
    stream = stream_rows(handle, sites, source, start=int(meta.get("next_chunk", 0)))
    g = torch.Generator().manual_seed(config.seed)
    buf_x: list[torch.Tensor] = []
    buf_y: list[torch.Tensor] = []
    if state is not None:
        buf_x = [state.pop("buffer.x")]
        if transcoder:
            buf_y = [state.pop("buffer.y")]
        g.set_state(state.pop("rng"))
        d_in, d_out = int(meta["d_in"]), int(meta["d_out"])
        scale_in, scale_out = float(meta["scale_in"]), float(meta["scale_out"])
        next_chunk = int(meta["next_chunk"])
    else:
        next_chunk = 0
        first_rows: list[torch.Tensor] = []
        count = 0
        while count < min(config.buffer, 8192):
            next_chunk, rows = next(stream)
            next_chunk += 1
            first_rows.append(rows[0])
            buf_x.append(rows[0])
            if transcoder:
                buf_y.append(rows[1])
            count += rows[0].shape[0]
        d_in = int(buf_x[0].shape[-1])
        d_out = int(buf_y[0].shape[-1]) if transcoder else d_in
        scale_in = _scale(torch.cat(first_rows)) if config.normalize else 1.0
        scale_out = (_scale(torch.cat(buf_y)) if config.normalize else 1.0) if transcoder else scale_in

    cfg = config.resolved(d_in)
    total_steps = math.ceil(cfg.n_activations / cfg.batch_size)
    dconfig = DictionaryConfig(
        kind=cfg.kind, d_in=d_in, d_sae=int(cfg.width),  # type: ignore[arg-type]
        d_out=d_out if transcoder else None, k=cfg.k, apply_b_dec_to_input=not transcoder,
        hook_name=sites[0].name, hook_name_out=sites[1].name if transcoder else None, model_name=handle.spec,
        metadata=_metadata(handle, sites, source, config, cfg, key=key, fingerprint=fingerprint),
    )
    d = SparseDictionary(dconfig, seed=cfg.seed, init_norm=cfg.decoder_init_norm,
                         jumprelu_init_threshold=cfg.jumprelu_init_threshold, jumprelu_bandwidth=cfg.jumprelu_bandwidth)
    if state is None and cfg.init_b_dec_to_mean:
        with torch.no_grad():
            d.b_dec.copy_(torch.cat(buf_y if transcoder else buf_x).mean(0) * scale_out)
    trainer = DictionaryTrainer(d, cfg, total_steps=total_steps)
    resumed = 0
    if state is not None:
        trainer.load_state(state)
        resumed = trainer.steps
        log.info("resuming dictionary %s at step %d of %d", key[:12], resumed, total_steps)

    steps_per_round = max(1, (cfg.buffer // 2) // cfg.batch_size)
    bar = progress_bar(total=total_steps, initial=trainer.steps, desc=f"dictionary {sites[0].name}", enabled=progress,
                       unit="step")
    step_seconds = 0.0
    rows_trained = 0
    peak_rows = 0
    last_save = time.perf_counter()
    try:
        while trainer.steps < total_steps:
            n_buf = sum(t.shape[0] for t in buf_x)
            while n_buf < cfg.buffer:
                index, rows = next(stream)
                next_chunk = index + 1
                buf_x.append(rows[0])
                if transcoder:
                    buf_y.append(rows[1])
                n_buf += rows[0].shape[0]
            peak_rows = max(peak_rows, n_buf)
            x_all = torch.cat(buf_x)
            order = torch.randperm(x_all.shape[0], generator=g)
            x_all = x_all[order]
            y_all = torch.cat(buf_y)[order] if transcoder else None
            emit = min(steps_per_round, total_steps - trainer.steps) * cfg.batch_size
            used = steps_per_round * cfg.batch_size
            for b in range(0, emit, cfg.batch_size):
                x = x_all[b:b + cfg.batch_size] * scale_in
                y = y_all[b:b + cfg.batch_size] * scale_out if y_all is not None else None
                t0 = time.perf_counter()
                stats = trainer.step(x, y)
                step_seconds += time.perf_counter() - t0
                rows_trained += x.shape[0]
                bar.update(1)
                if trainer.steps % 20 == 0:
                    bar.set_postfix(mse=f"{stats['mse']:.3g}", l0=f"{stats['l0']:.3g}")
                if callback is not None:
                    callback(Progress(trainer.steps, total_steps, stats))
            buf_x = [x_all[used:]]
            buf_y = [y_all[used:]] if y_all is not None else []
            due = time.perf_counter() - last_save >= cfg.checkpoint_seconds
            if checkpoint is not None and trainer.steps < total_steps and due:
                tensors = trainer.state()
                tensors["buffer.x"] = buf_x[0]
                if transcoder:
                    tensors["buffer.y"] = buf_y[0]
                tensors["rng"] = g.get_state()
                save_safetensors_checked(checkpoint, tensors, {
                    "key": key, "next_chunk": next_chunk, "d_in": d_in, "d_out": d_out, "scale_in": scale_in,
                    "scale_out": scale_out, "step": trainer.steps})
                last_save = time.perf_counter()
    finally:
        bar.close()
        stream.close()
    _fold_scales(d, scale_in, scale_out)
    d.eval()
    wall = time.perf_counter() - start_time
    throughput = {
        "activations_per_second": round(rows_trained / wall, 1) if wall > 0 else 0.0,
        "optimizer_activations_per_second": round(rows_trained / step_seconds, 1) if step_seconds > 0 else 0.0,
        "peak_buffer_rows": float(peak_rows), "seconds": round(wall, 2), "activations_trained": float(rows_trained),
    }
    meta_out = dict(d.config.metadata)
    meta_out["train_throughput"] = throughput
    meta_out["scale"] = {"input": scale_in, "output": scale_out}
    from dataclasses import replace

    d.config = replace(d.config, metadata=meta_out)
    return d, resumed, throughput


@torch.no_grad()
def _fold_scales(d: SparseDictionary, scale_in: float, scale_out: float) -> None:
    """Fold the training-time input/output scaling into the weights (SAELens's fold_activation_norm_scaling_factor)."""
    d.W_enc.mul_(scale_in)
    d.W_dec.div_(scale_out)
    d.b_dec.div_(scale_out)


def _metadata(handle: ModelHandle, sites: list[Site], source: ActivationSource, config: TrainConfig,
              resolved: TrainConfig, *, key: str, fingerprint: str) -> dict[str, Any]:
    def site_json(s: Site) -> dict[str, Any]:
        return {"name": s.name, "module_path": s.module_path, "side": s.side, "layer": s.layer}

    meta: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "model_spec": handle.spec, "model_fingerprint": fingerprint,
        "site": site_json(sites[0]), "source": {"identity": source.identity, "description": source.description},
        "train": resolved.to_json(), "train_requested": config.to_json(), "cache_key": key,
    }
    if len(sites) > 1:
        meta["site_out"] = site_json(sites[1])
    return meta


__all__ = ["DEFAULT_SPARSITY", "DictionaryTrainer", "Progress", "TrainConfig", "TrainedDictionary", "dictionary_key",
           "train_dictionary", "transcoder_sites"]
