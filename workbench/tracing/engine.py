"""The batched trace engine: every batch row is one (noise draw, restoration) pair.

The same noise draws serve every restoration and the clean states are recorded once, so a
whole trace takes a few forward passes instead of one per (token, layer).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from workbench.devices import check_model_device
from workbench.errors import WorkbenchError
from workbench.hooks import capture, patch
from workbench.requests import subject_token_span, target_token_ids
from workbench.sites import require_causal_lm
from workbench.tokens import check_fits, last_logits_kwargs
from workbench.tracing.result import CausalTrace

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
MAX_SAMPLES = 10_000  # noise draws: ROME uses 10; the estimate's error shrinks as 1/sqrt(n), long since settled here
# Memory the automatic batch size aims for (activations of one forward pass).
_CPU_BUDGET = 1 << 30
_CUDA_FRACTION = 0.5


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


def check_kinds(kinds: Iterable[str] | str) -> tuple[str, ...]:
    """Trace kinds from a sequence or a comma list (`"hidden,mlp"`), checked: known, none repeated."""
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
    if not 1 <= n_samples <= MAX_SAMPLES:
        raise WorkbenchError(f"n_samples {n_samples}: expected 1..{MAX_SAMPLES} noise draws (ROME: 10)")
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
    check_fits(handle.model, len(ids), "the prompt")
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


def trace_restorations(kinds: tuple[str, ...], n_tokens: int, n_layers: int, window: int) -> list[Restoration]:
    """Every restoration of a full trace, kind by kind, then token by token, then layer by layer."""
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

    `skip_redundant` is an exactness knob, not a speed setting. True (the default) runs each distinct
    restoration once, none at tokens before the subject (a causal LM never corrupts them, so
    their result is the corrupted run's), and computes the tokens before the subject once (a
    clean key/value cache shared by all rows). False measures every restoration in full, to
    check that shortcut and to time batching alone; the two agree up to float rounding.
    """
    require_causal_lm(handle, "causal tracing")
    kinds = check_kinds(kinds)
    _check_options(noise, n_samples, window, batch_size)
    dev = check_model_device(handle.device, device)
    prep = _prepare(handle, prompt, subject, target=target, kinds=kinds, noise=noise, n_samples=n_samples,
                    seed=seed, device=dev)
    restorations: list[Restoration] = [()]  # nothing restored: the corrupted run
    restorations += trace_restorations(kinds, prep.input_ids.shape[1], prep.n_layers, window)
    if skip_redundant:
        unique, index = distinct_restorations(restorations, prep.span[0], prep.input_ids.shape[1], prep.n_layers)
        values = _batched_probs(handle, prep, unique, batch_size=batch_size, start=prep.span[0])[index]
    else:
        values = _batched_probs(handle, prep, restorations, batch_size=batch_size)
    return _assemble(prep, subject, kinds, values[1:], float(values[0]), noise=noise, window=window, seed=seed)


def distinct_restorations(restorations: Sequence[Restoration], first_corrupted: int, n_tokens: int,
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


__all__ = [
    "EMBED_SITE", "KINDS", "SITE_TEMPLATES", "Kind", "Restoration", "auto_batch_rows", "causal_trace", "check_kinds",
    "distinct_restorations", "embedding_std", "restored_probability", "trace_restorations", "window_layers",
]
