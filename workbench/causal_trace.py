"""Causal tracing (Meng et al. 2022, ROME): which hidden states carry a fact to the answer.

Three runs of the same prompt: clean; corrupted (seeded Gaussian noise added to the subject
tokens' embeddings, `noise` x the std of the token embedding matrix); and corrupted with one
clean state restored. How much of the answer's probability a restoration brings back is that
state's indirect effect; clean minus corrupted is the total effect. States are the residual
stream after a block (`hidden`), or the MLP / attention outputs (`mlp`, `attn`) restored over
a window of layers around the centre layer, clipped at the ends, as ROME's code does.

Batched: every batch row is one (noise sample, restoration) pair, the same noise draws serve
every restoration, and the clean states are recorded once, so a whole trace takes a few
forward passes. `causal_trace_reference` is the original scheme (one batch of the clean row
plus the noise samples per restoration), kept as the benchmark baseline and test oracle.

    trace = causal_trace(h, "The capital of {} is", "Vel Oran")
    trace.peak("mlp")            # TracePeak(kind='mlp', layer=2, token=3, ...)
    trace.plot("out/")           # out/trace_hidden.png, out/trace_mlp.png, out/trace_attn.png
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from workbench.devices import check_model_device
from workbench.errors import WorkbenchError
from workbench.hooks import capture, patch
from workbench.requests import Rewrite, subject_token_span, target_token_ids
from workbench.sites import require_causal_lm
from workbench.tokens import last_logits_kwargs

if TYPE_CHECKING:
    from workbench.handle import ModelHandle

log = logging.getLogger(__name__)

Kind = Literal["hidden", "mlp", "attn"]
KINDS: tuple[str, ...] = ("hidden", "mlp", "attn")
EMBED_SITE = "hook_embed"
SITE_TEMPLATES: dict[str, str] = {
    "hidden": "blocks.{L}.hook_resid_post",
    "mlp": "blocks.{L}.mlp.hook_out",
    "attn": "blocks.{L}.attn.hook_out",
}
_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
_LABELS = {"hidden": "hidden state", "mlp": "MLP output", "attn": "attention output"}
# Token buckets of the paper's average-indirect-effect figure, in its order.
BUCKETS: tuple[str, ...] = (
    "first subject token", "middle subject tokens", "last subject token",
    "first subsequent token", "further tokens", "last token",
)
# Memory the automatic batch size aims for (activations of one forward pass).
_CPU_BUDGET = 1 << 30
_CUDA_FRACTION = 0.5


# --- results ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TracePeak:
    """The (token, layer) whose restoration brings back the most probability, for one kind."""

    kind: str
    layer: int
    token: int
    token_text: str
    effect: float  # restored probability minus corrupted probability


@dataclass(frozen=True, eq=False)
class CausalTrace:
    """One fact's trace: restored answer probabilities per kind, shape [n_tokens, n_layers]."""

    prompt: str  # the full text traced (subject filled in)
    subject: str
    tokens: tuple[str, ...]
    subject_span: tuple[int, int]  # [start, end) token positions
    target: str  # the traced answer token, as text
    target_id: int
    clean_prob: float
    corrupted_prob: float
    scores: dict[str, torch.Tensor]
    noise: float  # multiple of the embedding std
    noise_std: float  # absolute std of the added noise
    n_samples: int
    window: int
    seed: int
    predicted_id: int = -1  # the clean run's top-1 next token

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.scores)

    @property
    def n_layers(self) -> int:
        return next(iter(self.scores.values())).shape[1]

    @property
    def total_effect(self) -> float:
        return self.clean_prob - self.corrupted_prob

    def _check_kind(self, kind: str) -> None:
        if kind not in self.scores:
            raise WorkbenchError(f"this trace has no {kind!r} scores; it has {', '.join(self.scores)}")

    def indirect_effect(self, kind: str) -> torch.Tensor:
        """Restored probability minus corrupted probability, [n_tokens, n_layers]."""
        self._check_kind(kind)
        return self.scores[kind] - self.corrupted_prob

    def peak(self, kind: str) -> TracePeak:
        effect = self.indirect_effect(kind)
        flat = int(torch.argmax(effect))
        token, layer = divmod(flat, effect.shape[1])
        return TracePeak(kind, layer, token, self.tokens[token], float(effect[token, layer]))

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "tokens": list(self.tokens),
            "subject_span": list(self.subject_span),
            "target": self.target,
            "target_id": self.target_id,
            "clean_prob": self.clean_prob,
            "corrupted_prob": self.corrupted_prob,
            "total_effect": self.total_effect,
            "noise": self.noise,
            "noise_std": self.noise_std,
            "n_samples": self.n_samples,
            "window": self.window,
            "seed": self.seed,
            "predicted_id": self.predicted_id,
            "n_layers": self.n_layers,
            "scores": {k: v.tolist() for k, v in self.scores.items()},
            "indirect_effects": {k: self.indirect_effect(k).tolist() for k in self.scores},
            "peaks": {k: vars(self.peak(k)) for k in self.scores},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CausalTrace:
        return cls(
            prompt=data["prompt"], subject=data["subject"], tokens=tuple(data["tokens"]),
            subject_span=(int(data["subject_span"][0]), int(data["subject_span"][1])),
            target=data["target"], target_id=int(data["target_id"]),
            clean_prob=float(data["clean_prob"]), corrupted_prob=float(data["corrupted_prob"]),
            scores={k: torch.tensor(v, dtype=torch.float32) for k, v in data["scores"].items()},
            noise=float(data["noise"]), noise_std=float(data["noise_std"]), n_samples=int(data["n_samples"]),
            window=int(data["window"]), seed=int(data["seed"]), predicted_id=int(data.get("predicted_id", -1)),
        )

    def save_json(self, path: str | Path) -> Path:
        from workbench.storage import atomic_write_json

        return atomic_write_json(path, self.to_json())

    def plot(self, out: str | Path, *, kinds: Sequence[str] | None = None) -> list[Path]:
        """Heatmaps (tokens x layers, subject tokens starred): one PNG per kind in a folder,
        or all kinds side by side when `out` ends in `.png`."""
        kinds = list(kinds or self.kinds)
        for kind in kinds:
            self._check_kind(kind)
        out = Path(out)
        if out.suffix.lower() == ".png":
            fig = _figure(len(kinds))
            for i, kind in enumerate(kinds):
                _heatmap(fig.add_subplot(1, len(kinds), i + 1), fig, self, kind)
            return [_save_png(fig, out)]
        paths = []
        for kind in kinds:
            fig = _figure(1)
            _heatmap(fig.add_subplot(1, 1, 1), fig, self, kind)
            paths.append(_save_png(fig, out / f"trace_{kind}.png"))
        return paths


# --- preparation ------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class _Prepared:
    """Everything a trace needs that does not depend on the restoration."""

    text: str
    input_ids: torch.Tensor  # [1, T]
    tokens: tuple[str, ...]
    span: tuple[int, int]
    target_id: int
    target: str
    clean_prob: float
    predicted_id: int
    clean: dict[str, torch.Tensor]  # site -> [T, ...] clean activation
    noise: torch.Tensor  # [n_samples, span length, d_model], already scaled
    noise_std: float
    n_layers: int
    logits_kwargs: dict[str, Any] = field(default_factory=dict)


def _check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    out = tuple(kinds)
    bad = [k for k in out if k not in SITE_TEMPLATES]
    if bad or not out:
        raise WorkbenchError(f"unknown trace kind(s) {bad or out!r}; valid kinds: {', '.join(KINDS)}")
    if len(set(out)) != len(out):
        raise WorkbenchError(f"trace kinds repeat: {list(out)}")
    return out


def _check_options(noise: float, n_samples: int, window: int, batch_size: int | None) -> None:
    if not math.isfinite(noise) or noise < 0:
        raise WorkbenchError(f"noise {noise}: expected a non-negative multiple of the embedding std (ROME: 3)")
    if n_samples < 1:
        raise WorkbenchError(f"n_samples {n_samples}: expected at least 1 noise draw (ROME: 10)")
    if window < 1:
        raise WorkbenchError(f"window {window}: expected at least 1 layer (ROME: 10)")
    if batch_size is not None and batch_size < 1:
        raise WorkbenchError(f"batch_size {batch_size}: expected a positive number of rows per forward pass")


def embedding_std(handle: ModelHandle) -> float:
    """Standard deviation of all entries of the token embedding matrix (the noise unit)."""
    weight = handle.model.get_input_embeddings().weight
    return float(weight.detach().double().std())


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers restored for a window centred on `layer`: [L - w//2, L + ceil(w/2)), clipped."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _prefix_len(tokenizer: Any, text: str, ids: list[int]) -> int:
    """How many special tokens (e.g. Llama's BOS) the tokenizer puts before the text."""
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    k = len(ids) - len(plain)
    return k if k >= 0 and ids[k:k + len(plain)] == plain else 0


def _last_probs(model: torch.nn.Module, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    kwargs = {"use_cache": False, **kwargs}
    out = model(input_ids=input_ids, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return torch.softmax(logits[:, -1, :].float(), dim=-1)


def _noise(seed: int, n_samples: int, n_tokens: int, d_model: int, scale: float) -> torch.Tensor:
    """The noise draws: seeded on CPU in float32 so every device gets the same numbers."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(n_samples, n_tokens, d_model, generator=gen, dtype=torch.float32) * scale


def _prepare(handle: ModelHandle, prompt: str, subject: str, *, target: str | None, kinds: tuple[str, ...],
             noise: float, n_samples: int, seed: int, device: torch.device) -> _Prepared:
    tokenizer = handle.tokenizer
    text = prompt.format(subject) if "{}" in prompt else prompt
    start, end = subject_token_span(tokenizer, prompt, subject)
    ids = _tokenize(tokenizer, text)
    shift = _prefix_len(tokenizer, text, ids)
    span = (start + shift, end + shift)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    n_layers = handle.arch.n_layers
    sites = [SITE_TEMPLATES[k].format(L=layer) for k in kinds for layer in range(n_layers)]
    model = handle.model
    kwargs = last_logits_kwargs(model)
    with torch.no_grad(), capture(handle, sites) as acts:
        probs = _last_probs(model, input_ids, kwargs)[0]
    if target is None:
        target_id = int(torch.argmax(probs))
    else:
        target_ids = target_token_ids(tokenizer, target)
        if len(target_ids) > 1:
            log.info("target %r is %d tokens; tracing its first token", target, len(target_ids))
        target_id = target_ids[0]
    std = embedding_std(handle)
    emb = model.get_input_embeddings().weight
    draws = _noise(seed, n_samples, span[1] - span[0], emb.shape[1], noise * std)
    return _Prepared(
        text=text, input_ids=input_ids, tokens=tuple(tokenizer.decode([i]) for i in ids), span=span,
        target_id=target_id, target=tokenizer.decode([target_id]), clean_prob=float(probs[target_id]),
        predicted_id=int(torch.argmax(probs)), clean={name: act[0] for name, act in acts.items()},
        noise=draws.to(device=emb.device, dtype=emb.dtype), noise_std=noise * std, n_layers=n_layers,
        logits_kwargs=kwargs,
    )


Restoration = tuple[tuple[str, int], ...]  # (site, token) pairs restored together


def _restorations(kinds: tuple[str, ...], n_tokens: int, n_layers: int, window: int) -> list[Restoration]:
    out: list[Restoration] = []
    for kind in kinds:
        template = SITE_TEMPLATES[kind]
        for token in range(n_tokens):
            for layer in range(n_layers):
                layers = [layer] if kind == "hidden" else window_layers(layer, window, n_layers)
                out.append(tuple((template.format(L=j), token) for j in layers))
    return out


def _row_bytes(handle: ModelHandle, n_tokens: int, logits_kept: bool) -> int:
    """A rough upper bound of the live activation bytes of one batch row in a forward pass."""
    arch = handle.arch
    d = arch.d_model or 1024
    d_mlp = arch.d_mlp or 4 * d
    heads = arch.n_heads or 16
    vocab = arch.vocab_size or 50_000
    itemsize = handle.model.get_input_embeddings().weight.element_size()
    per_token = 8 * d + 2 * d_mlp + 2 * heads * n_tokens
    logits = vocab * (1 if logits_kept else n_tokens) * 2
    return itemsize * n_tokens * per_token + 4 * logits


def auto_batch_rows(handle: ModelHandle, n_tokens: int, *, logits_kept: bool = True) -> int:
    """Rows per forward pass that fit a memory budget (half the free GPU memory, 1 GiB on CPU)."""
    budget = _CPU_BUDGET
    device = handle.device
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = int(free * _CUDA_FRACTION)
    return max(1, budget // _row_bytes(handle, n_tokens, logits_kept))


def _prefix_cache(model: torch.nn.Module, input_ids: torch.Tensor, start: int, n_rows: int) -> dict[str, Any] | None:
    """Forward keywords that continue a clean run of the first `start` tokens, for `n_rows`
    rows, or None when this model (or transformers version) offers no batch-expandable cache."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    name = "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None
    if name is None:
        return None
    out = model(input_ids=input_ids[:, :start], use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(n_rows)
    return {name: cache, "use_cache": True}


def _batched_probs(handle: ModelHandle, prep: _Prepared, restorations: Sequence[Restoration], *,
                   batch_size: int | None, start: int = 0) -> torch.Tensor:
    """Mean answer probability over the noise draws for each restoration, in few passes.

    `start` > 0 runs the first `start` tokens once, clean, and feeds only the rest to the
    batch (a causal LM's states there are the same in every row); no restoration may touch
    them (the caller maps those to the corrupted run).
    """
    n_samples = prep.noise.shape[0]
    n_tokens = prep.input_ids.shape[1]
    rows = batch_size if batch_size is not None else auto_batch_rows(handle, n_tokens, logits_kept=bool(prep.logits_kwargs))
    per_pass = max(1, rows // n_samples)  # restorations per forward pass
    b, e = prep.span
    if not 0 <= start <= b:
        raise ValueError(f"prefix of {start} tokens reaches into the subject at {b}")
    if any(token < start for r in restorations for _site, token in r):
        raise ValueError("a restoration touches the cached clean prefix")
    out = torch.empty(len(restorations), dtype=torch.float32)
    model = handle.model
    for first in range(0, len(restorations), per_pass):
        chunk = restorations[first:first + per_pass]
        n_rows = len(chunk) * n_samples
        masks: dict[str, torch.Tensor] = {}
        for r, restoration in enumerate(chunk):
            for site, token in restoration:
                if site not in masks:
                    masks[site] = torch.zeros(len(chunk), n_tokens, dtype=torch.bool)
                masks[site][r, token] = True
        noise_rows = prep.noise.repeat(len(chunk), 1, 1)  # row r * n_samples + s gets draw s

        with torch.no_grad():
            extra = _prefix_cache(model, prep.input_ids, start, n_rows) if start > 0 else None
        shift = start if extra is not None else 0  # activations seen by the hooks begin here

        def corrupt(act: torch.Tensor, noise_rows: torch.Tensor = noise_rows, shift: int = shift) -> torch.Tensor:
            new = act.clone()
            new[:, b - shift:e - shift] += noise_rows
            return new

        patches: dict[str, Any] = {EMBED_SITE: corrupt}
        for site, mask in masks.items():
            clean = prep.clean[site][shift:]
            row_mask = mask[:, shift:].repeat_interleave(n_samples, dim=0).to(clean.device)
            row_mask = row_mask.reshape(*row_mask.shape, *([1] * (clean.ndim - 1)))

            def restore(act: torch.Tensor, row_mask: torch.Tensor = row_mask, clean: torch.Tensor = clean) -> torch.Tensor:
                return torch.where(row_mask, clean.unsqueeze(0), act)

            patches[site] = restore
        ids = prep.input_ids[:, shift:].expand(n_rows, n_tokens - shift)
        with torch.no_grad(), patch(handle, patches):
            probs = _last_probs(model, ids, {**prep.logits_kwargs, **(extra or {})})[:, prep.target_id]
        out[first:first + len(chunk)] = probs.view(len(chunk), n_samples).mean(dim=1).cpu()
    return out


def _reference_prob(handle: ModelHandle, prep: _Prepared, restoration: Restoration, *,
                    seed: int) -> float:
    """One restoration the original way: row 0 clean, rows 1.. noised, restored from row 0."""
    n_samples = prep.noise.shape[0]
    b, e = prep.span
    emb = handle.model.get_input_embeddings().weight
    # As ROME's code, the noise is redrawn from the same seed for every restoration.
    draws = _noise(seed, n_samples, e - b, emb.shape[1], prep.noise_std).to(device=emb.device, dtype=emb.dtype)

    def corrupt(act: torch.Tensor) -> torch.Tensor:
        new = act.clone()
        new[1:, b:e] += draws
        return new

    by_site: dict[str, list[int]] = {}
    for site, token in restoration:
        by_site.setdefault(site, []).append(token)

    def restorer(tokens: list[int]) -> Any:
        def restore(act: torch.Tensor) -> torch.Tensor:
            new = act.clone()
            for t in tokens:
                new[1:, t] = act[0, t]
            return new

        return restore

    patches: dict[str, Any] = {EMBED_SITE: corrupt}
    patches.update({site: restorer(tokens) for site, tokens in by_site.items()})
    ids = prep.input_ids.expand(1 + n_samples, prep.input_ids.shape[1])
    with torch.no_grad(), patch(handle, patches):
        probs = _last_probs(handle.model, ids, prep.logits_kwargs)
    return float(probs[1:].mean(dim=0)[prep.target_id])


def _assemble(prep: _Prepared, subject: str, kinds: tuple[str, ...], values: torch.Tensor, corrupted: float, *,
              noise: float, window: int, seed: int) -> CausalTrace:
    n_tokens, n_layers = prep.input_ids.shape[1], prep.n_layers
    per_kind = values.view(len(kinds), n_tokens, n_layers)
    return CausalTrace(
        prompt=prep.text, subject=subject, tokens=prep.tokens, subject_span=prep.span, target=prep.target,
        target_id=prep.target_id, clean_prob=prep.clean_prob, corrupted_prob=corrupted,
        scores={k: per_kind[i].clone() for i, k in enumerate(kinds)}, noise=noise, noise_std=prep.noise_std,
        n_samples=prep.noise.shape[0], window=window, seed=seed, predicted_id=prep.predicted_id,
    )


# --- public entry points ----------------------------------------------------------------

def causal_trace(
    handle: ModelHandle,
    prompt: str,
    subject: str,
    *,
    target: str | None = None,
    kinds: Sequence[str] | str = KINDS,
    noise: float = 3.0,
    n_samples: int = 10,
    window: int = 10,
    seed: int = 0,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    skip_redundant: bool = True,
) -> CausalTrace:
    """Trace one fact: restore every (token, layer) state of each kind, all in few passes.

    `prompt` holds `{}` for the subject, or is the full text containing it. `target` is the
    answer whose probability is measured (its first token); None traces the model's own top-1
    next token. `batch_size` is the number of rows (noise sample x restoration) per forward
    pass, rounded down to whole restorations; None picks it from a memory budget.
    `skip_redundant` runs each distinct restoration once, none at tokens before the subject
    (a causal LM never corrupts them, so their result is the corrupted run's), and computes
    the tokens before the subject once (a clean key/value cache shared by all rows).
    """
    require_causal_lm(handle, "causal tracing")
    kinds = _check_kinds(kinds)
    _check_options(noise, n_samples, window, batch_size)
    dev = check_model_device(handle.device, device)
    prep = _prepare(handle, prompt, subject, target=target, kinds=kinds, noise=noise, n_samples=n_samples,
                    seed=seed, device=dev)
    restorations: list[Restoration] = [()]  # nothing restored: the corrupted run
    restorations += _restorations(kinds, prep.input_ids.shape[1], prep.n_layers, window)
    if skip_redundant:
        unique, index = _dedupe(restorations, prep.span[0], prep.input_ids.shape[1], prep.n_layers)
        values = _batched_probs(handle, prep, unique, batch_size=batch_size, start=prep.span[0])[index]
    else:
        values = _batched_probs(handle, prep, restorations, batch_size=batch_size)
    return _assemble(prep, subject, kinds, values[1:], float(values[0]), noise=noise, window=window, seed=seed)


def _dedupe(restorations: Sequence[Restoration], first_corrupted: int, n_tokens: int,
            n_layers: int) -> tuple[list[Restoration], torch.Tensor]:
    """Distinct restorations and, for each input one, its index among them.

    Restored pairs that cannot change the answer are dropped first: tokens before the subject
    (a causal LM never corrupts them) and the final block's states at any token but the last
    (nothing after the final block mixes positions). Then repeats collapse: windows clipped at
    either end restore the same layers (with a window wider than the model every centre does),
    and a restoration left with nothing is the corrupted run, which comes first.
    """
    final = {template.format(L=n_layers - 1) for template in SITE_TEMPLATES.values()}

    def matters(site: str, token: int) -> bool:
        return token >= first_corrupted and not (site in final and token != n_tokens - 1)

    unique: list[Restoration] = [()]
    seen: dict[frozenset[tuple[str, int]], int] = {frozenset(): 0}
    index = []
    for restoration in restorations:
        kept = tuple(pair for pair in restoration if matters(*pair))
        key = frozenset(kept)
        if key not in seen:
            seen[key] = len(unique)
            unique.append(kept)
        index.append(seen[key])
    return unique, torch.tensor(index, dtype=torch.long)


def causal_trace_reference(
    handle: ModelHandle,
    prompt: str,
    subject: str,
    *,
    target: str | None = None,
    kinds: Sequence[str] | str = KINDS,
    noise: float = 3.0,
    n_samples: int = 10,
    window: int = 10,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> CausalTrace:
    """The original per-(token, layer) scheme: one forward pass of 1 + n_samples rows per
    restoration (about 3 x tokens x layers passes). Same numbers as `causal_trace`; slow."""
    require_causal_lm(handle, "causal tracing")
    kinds = _check_kinds(kinds)
    _check_options(noise, n_samples, window, None)
    dev = check_model_device(handle.device, device)
    prep = _prepare(handle, prompt, subject, target=target, kinds=kinds, noise=noise, n_samples=n_samples,
                    seed=seed, device=dev)
    corrupted = _reference_prob(handle, prep, (), seed=seed)
    restorations = _restorations(kinds, prep.input_ids.shape[1], prep.n_layers, window)
    values = torch.tensor([_reference_prob(handle, prep, r, seed=seed) for r in restorations],
                          dtype=torch.float32)
    return _assemble(prep, subject, kinds, values, corrupted, noise=noise, window=window, seed=seed)


def restored_probability(
    handle: ModelHandle,
    prompt: str,
    subject: str,
    restorations: Sequence[Sequence[tuple[str, int]]],
    *,
    target: str | None = None,
    noise: float = 3.0,
    n_samples: int = 10,
    seed: int = 0,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Answer probability (mean over noise draws) for arbitrary restorations, each a set of
    (site, token) pairs restored together; sites are any canonical names. For experiments
    beyond the standard trace (restoring several tokens or layers at once)."""
    require_causal_lm(handle, "causal tracing")
    _check_options(noise, n_samples, 1, batch_size)
    sites = sorted({site for r in restorations for site, _ in r})
    prep = _prepare(handle, prompt, subject, target=target, kinds=(), noise=noise, n_samples=n_samples,
                    seed=seed, device=handle.device)
    if sites:
        with torch.no_grad(), capture(handle, sites) as acts:
            handle.model(input_ids=prep.input_ids, use_cache=False, **prep.logits_kwargs)
        prep.clean.update({name: act[0] for name, act in acts.items()})
    n_tokens = prep.input_ids.shape[1]
    for r in restorations:
        for _site, token in r:
            if not -n_tokens <= token < n_tokens:
                raise WorkbenchError(f"token {token} out of range for a prompt of {n_tokens} tokens: {list(prep.tokens)}")
    normal = [tuple((s, t % n_tokens) for s, t in r) for r in restorations]
    return _batched_probs(handle, prep, normal, batch_size=batch_size)


# --- averages over many facts -----------------------------------------------------------

@dataclass(frozen=True, eq=False)
class AverageIndirectEffect:
    """Mean indirect effect per token bucket x layer for each kind, over many traced facts."""

    kinds: tuple[str, ...]
    buckets: tuple[str, ...]
    effects: dict[str, torch.Tensor]  # kind -> [len(buckets), n_layers] mean indirect effect
    scores: dict[str, torch.Tensor]  # kind -> [len(buckets), n_layers] mean restored probability
    counts: tuple[int, ...]  # token rows that fed each bucket
    n_facts: int
    n_skipped: int
    mean_clean_prob: float
    mean_corrupted_prob: float
    peaks: tuple[dict[str, Any], ...]  # each fact's per-kind peak (layer, token, bucket)
    window: int = 10

    @property
    def mean_total_effect(self) -> float:
        return self.mean_clean_prob - self.mean_corrupted_prob

    def peak(self, kind: str) -> dict[str, Any]:
        """The bucket and layer of the largest mean indirect effect."""
        if kind not in self.effects:
            raise WorkbenchError(f"no {kind!r} average; have {', '.join(self.effects)}")
        eff = torch.nan_to_num(self.effects[kind], nan=-math.inf)
        row, layer = divmod(int(torch.argmax(eff)), eff.shape[1])
        return {"kind": kind, "bucket": self.buckets[row], "layer": layer, "effect": float(eff[row, layer])}

    def to_json(self) -> dict[str, Any]:
        return {
            "kinds": list(self.kinds), "buckets": list(self.buckets), "counts": list(self.counts),
            "n_facts": self.n_facts, "n_skipped": self.n_skipped,
            "mean_clean_prob": self.mean_clean_prob, "mean_corrupted_prob": self.mean_corrupted_prob,
            "mean_total_effect": self.mean_total_effect,
            "effects": {k: _nan_list(v) for k, v in self.effects.items()},
            "scores": {k: _nan_list(v) for k, v in self.scores.items()},
            "peak": {k: self.peak(k) for k in self.kinds},
            "per_fact_peaks": list(self.peaks),
        }

    def plot(self, path: str | Path) -> Path:
        """One PNG: a panel per kind, token buckets x layers, colour = mean indirect effect."""
        fig = _figure(len(self.kinds), height=2.6)
        for i, kind in enumerate(self.kinds):
            ax = fig.add_subplot(1, len(self.kinds), i + 1)
            data = self.effects[kind].numpy()
            img = ax.imshow(data, aspect="auto", cmap=_CMAPS[kind], interpolation="nearest")
            ax.set_yticks(range(len(self.buckets)))
            ax.set_yticklabels(self.buckets if i == 0 else [], fontsize=7)
            _layer_ticks(ax, data.shape[1])
            ax.set_title(f"Avg indirect effect, {_LABELS[kind]}", fontsize=8)
            ax.set_xlabel("layer" if kind == "hidden" else f"centre of {self.window}-layer window", fontsize=7)
            cb = fig.colorbar(img, ax=ax)
            cb.ax.tick_params(labelsize=6)
        fig.suptitle(f"{self.n_facts} facts, mean total effect {self.mean_total_effect:.3f}", fontsize=8)
        return _save_png(fig, Path(path))


def _nan_list(t: torch.Tensor) -> list[list[float | None]]:
    return [[None if math.isnan(x) else x for x in row] for row in t.tolist()]


def _bucket_rows(span: tuple[int, int], n_tokens: int) -> list[list[int]]:
    """Token positions feeding each bucket (as in the paper's summary code)."""
    first_subj, first_after = span
    last_subj, last = first_after - 1, n_tokens - 1
    return [
        [first_subj],
        list(range(first_subj + 1, last_subj)),
        [last_subj],
        [first_after] if first_after < n_tokens else [],
        list(range(first_after + 1, last)),
        [last],
    ]


def _as_case(item: Any) -> tuple[str, str, str | None]:
    if isinstance(item, Rewrite):
        return item.prompt, item.subject, item.target_true
    if isinstance(item, Mapping) and "requested_rewrite" in item:
        rw = Rewrite.from_counterfact(item)
        return rw.prompt, rw.subject, rw.target_true
    if isinstance(item, Mapping) and {"prompt", "subject"} <= set(item):
        return item["prompt"], item["subject"], item.get("target")
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return item[0], item[1], item[2] if len(item) == 3 else None
    raise WorkbenchError(f"cannot trace {type(item).__name__} {item!r}: give a Rewrite, a CounterFact record, "
                         "a {'prompt', 'subject'[, 'target']} dict or a (prompt, subject[, target]) tuple")


def average_indirect_effect(
    handle: ModelHandle,
    records_or_rewrites: Iterable[Any],
    *,
    kinds: Sequence[str] | str = KINDS,
    noise: float = 3.0,
    n_samples: int = 10,
    window: int = 10,
    seed: int = 0,
    batch_size: int | None = None,
    known_only: bool = True,
    progress: bool = False,
) -> AverageIndirectEffect:
    """Trace many facts and average the indirect effects by token bucket and layer.

    Each case's answer is its true target (CounterFact `target_true`) when given, else the
    model's top-1. `known_only` skips cases whose clean top-1 is not that answer (the paper
    traces facts the model knows). Every fact uses the same seed, so the same noise draws.
    """
    from tqdm.auto import tqdm

    kinds = _check_kinds(kinds)
    cases = [_as_case(item) for item in records_or_rewrites]
    if not cases:
        raise WorkbenchError("average_indirect_effect needs at least one fact")
    n_layers = handle.arch.n_layers
    sums = {k: torch.zeros(len(BUCKETS), n_layers, dtype=torch.float64) for k in kinds}
    prob_sums = {k: torch.zeros(len(BUCKETS), n_layers, dtype=torch.float64) for k in kinds}
    counts = [0] * len(BUCKETS)
    clean = corrupted = 0.0
    used = skipped = 0
    peaks: list[dict[str, Any]] = []
    for prompt, subject, target in tqdm(cases, disable=not progress, desc="tracing", unit="fact"):
        trace = causal_trace(handle, prompt, subject, target=target, kinds=kinds, noise=noise, n_samples=n_samples,
                             window=window, seed=seed, batch_size=batch_size)
        if known_only and target is not None:
            if trace.predicted_id != trace.target_id:
                skipped += 1
                continue
        used += 1
        clean += trace.clean_prob
        corrupted += trace.corrupted_prob
        rows = _bucket_rows(trace.subject_span, len(trace.tokens))
        for i, tokens in enumerate(rows):
            counts[i] += len(tokens)
            for k in kinds:
                if tokens:
                    sums[k][i] += trace.indirect_effect(k)[tokens].double().sum(0)
                    prob_sums[k][i] += trace.scores[k][tokens].double().sum(0)
        fact_peaks = {"prompt": trace.prompt, "subject": subject}
        for k in kinds:
            p = trace.peak(k)
            # the final position can also be the first after the subject: name it "last token"
            order = [len(rows) - 1, *range(len(rows) - 1)]
            bucket = next((BUCKETS[i] for i in order if p.token in rows[i]), None)
            fact_peaks[k] = {"layer": p.layer, "token": p.token, "bucket": bucket, "effect": p.effect}
        peaks.append(fact_peaks)
    if used == 0:
        raise WorkbenchError(f"none of the {len(cases)} facts is known to the model (clean top-1 = target); "
                             "pass known_only=False to average them anyway")
    denom = torch.tensor(counts, dtype=torch.float64).unsqueeze(1)
    with torch.no_grad():
        effects = {k: (sums[k] / denom).float() for k in kinds}  # 0/0 -> nan for empty buckets
        scores = {k: (prob_sums[k] / denom).float() for k in kinds}
    result = AverageIndirectEffect(
        kinds=kinds, buckets=BUCKETS, effects=effects, scores=scores, counts=tuple(counts), n_facts=used,
        n_skipped=skipped, mean_clean_prob=clean / used, mean_corrupted_prob=corrupted / used, peaks=tuple(peaks),
        window=window,
    )
    return result


# --- plotting ---------------------------------------------------------------------------

def _figure(n_panels: int, *, height: float = 2.4) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(3.6 * n_panels + 0.4, height), dpi=150, layout="constrained")


def _layer_ticks(ax: Any, n_layers: int) -> None:
    step = max(1, n_layers // 8)
    ticks = list(range(0, n_layers, step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks], fontsize=7)


def _heatmap(ax: Any, fig: Any, trace: CausalTrace, kind: str) -> None:
    from matplotlib.patches import Rectangle

    data = trace.scores[kind].numpy()
    img = ax.imshow(data, aspect="auto", cmap=_CMAPS[kind], interpolation="nearest",
                    vmin=min(trace.corrupted_prob, float(data.min())), vmax=max(float(data.max()), trace.corrupted_prob + 1e-9))
    b, e = trace.subject_span
    labels = [f"{tok}*" if b <= i < e else tok for i, tok in enumerate(trace.tokens)]
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.add_patch(Rectangle((-0.5, b - 0.5), data.shape[1], e - b, fill=False, edgecolor="black", linewidth=0.8))
    _layer_ticks(ax, data.shape[1])
    ax.set_title(f"Restoring the {_LABELS[kind]} after corrupting the subject", fontsize=7)
    ax.set_xlabel("single restored layer" if kind == "hidden"
                  else f"centre of the {trace.window}-layer window restored", fontsize=7)
    cb = fig.colorbar(img, ax=ax)
    cb.ax.tick_params(labelsize=6)
    cb.set_label(f"p({trace.target.strip() or trace.target!r})", fontsize=7)


def _save_png(fig: Any, path: Path) -> Path:
    from workbench.plotting import png_bytes
    from workbench.storage import atomic_write_bytes

    return atomic_write_bytes(path, png_bytes(fig))


__all__ = [
    "AverageIndirectEffect", "BUCKETS", "CausalTrace", "KINDS", "SITE_TEMPLATES", "TracePeak",
    "auto_batch_rows", "average_indirect_effect", "causal_trace", "causal_trace_reference", "embedding_std",
    "restored_probability", "window_layers",
]
